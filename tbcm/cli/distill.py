"""`tbcm distill`, `tbcm rollout`, `tbcm export`: the TBCM trainer and what surrounds it."""
from __future__ import annotations

from pathlib import Path

from tbcm.cli.options import add_config_options, config_from_args, override_config

EXPORT_OVERRIDES = ("export_extrapolation",)  # run options that `tbcm export` may change (unset: the run's own)


def register(sub) -> None:
    from tbcm.distill.config import DistillConfig
    from tbcm.distill.rollout import RolloutConfig

    p = sub.add_parser("distill", help="distil a teacher into a one-step student (TBCM, or --pairs data)")
    add_config_options(p, DistillConfig)
    p.add_argument("--resume", action="store_true", help="continue exactly from the run folder's checkpoint")
    p.add_argument("--export", default=None, help="after training, export the student to this folder")
    p.add_argument("--export-eval-n", type=int, default=0, help="images per split for the manifest's eval")
    p.set_defaults(handler=distill)

    r = sub.add_parser("rollout", help="precompute teacher trajectories into sharded safetensors files")
    add_config_options(r, DistillConfig, skip=("out",))
    add_config_options(r, RolloutConfig)
    r.add_argument("--out", required=True, help="folder for rollouts-*.safetensors")
    r.set_defaults(handler=rollout)

    e = sub.add_parser("export", help="export a distill run's EMA student as a SanaSprintPipeline folder")
    e.add_argument("--run", required=True, help="distill run folder (with checkpoint.safetensors)")
    e.add_argument("--out", required=True, help="pipeline folder to write")
    e.add_argument("--eval-n", type=int, default=0, help="images per split for the manifest's eval numbers")
    e.add_argument("--standalone", action="store_true",
                   help="copy the text encoder in (otherwise shipped-world folders name its package)")
    add_config_options(e, DistillConfig, overrides=EXPORT_OVERRIDES)
    e.set_defaults(handler=export)


def distill(args) -> None:
    from tbcm.distill.config import DistillConfig
    from tbcm.distill.export import export_student
    from tbcm.distill.trainer import Distiller

    distiller = Distiller(config_from_args(DistillConfig, args), resume=args.resume)
    distiller.train()
    if args.export and distiller.accelerator.is_main_process:
        path = export_student(distiller.pipeline(), distiller.teacher, distiller.config, Path(args.export),
                              distiller.step, distiller.counters, args.export_eval_n)
        print(f"exported {path}")


def rollout(args) -> None:
    from tbcm.distill.config import DistillConfig
    from tbcm.distill.rollout import RolloutConfig, write_rollouts

    paths = write_rollouts(config_from_args(DistillConfig, args), config_from_args(RolloutConfig, args),
                           Path(args.out))
    print(f"wrote {len(paths)} shard(s) to {args.out}")


def export(args) -> None:
    from tbcm.distill.export import export_student, load_student_checkpoint

    student, teacher, config, step, counters = load_student_checkpoint(Path(args.run))
    config = override_config(config, args, EXPORT_OVERRIDES)
    path = export_student(student, teacher, config, Path(args.out), step, counters, args.eval_n, args.standalone)
    print(f"exported {path}")
