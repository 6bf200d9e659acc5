"""`tbcm distill`, `tbcm rollout`, `tbcm export`: the TBCM trainer and what surrounds it, wired to its sources:
the embedded shapes world for `--prompts world`, or a prompt file alone (a real teacher's prompts)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from tbcm.cli.options import add_config_options, config_from_args, override_config
from tbcm.distill.config import DistillConfig, RolloutConfig
from tbcm.distill.export import export_student, load_student_checkpoint
from tbcm.distill.sources import SAMPLE_PROMPTS, Evaluator, Sources, prompt_file_sources
from tbcm.world import sources as world

EXPORT_OVERRIDES = ("export_extrapolation",)  # run options that `tbcm export` may change (unset: the run's own)
WORLD = "world"  # the --prompts value that names the embedded world


def register(sub) -> None:
    p = sub.add_parser("distill", help="distil a teacher into a one-step student (TBCM, or --pairs data)")
    add_config_options(p, DistillConfig)
    unset_defaults(p)
    p.add_argument("--resume", action="store_true", help="continue exactly from the run folder's checkpoint")
    p.add_argument("--export", default=None, help="after training, export the student to this folder")
    p.add_argument("--export-eval-n", type=int, default=0,
                   help="images per split for the manifest's eval (--prompts world; a prompt file has no evaluator)")
    p.set_defaults(handler=distill)

    r = sub.add_parser("rollout", help="precompute teacher trajectories into sharded safetensors files")
    add_config_options(r, DistillConfig, skip=("out",))
    unset_defaults(r)
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


def unset_defaults(parser) -> None:
    """Leave each DistillConfig option out of the parsed args unless given, so that `distill_config` can put what
    was given over the --recipe's values (the help still shows the config's own defaults)."""
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    for action in parser._actions:
        if action.dest in fields:
            action.default = argparse.SUPPRESS


def distill_config(args) -> DistillConfig:
    """The --recipe's config with every option given on the command line over it."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig) if hasattr(args, f.name)}
    return DistillConfig.from_recipe(**given)


def sources(config: DistillConfig) -> Sources:
    """What `--prompts` names: the world's training captions (seeded by the run), sample captions, rendered scenes
    and evaluator; or a prompt file, with no images and no evaluator."""
    if config.prompts != WORLD:
        return prompt_file_sources(config.prompts)
    return Sources(world.training_captions(config.seed), world.sample_captions(SAMPLE_PROMPTS), world.SceneImages(),
                   world_evaluator())


def world_evaluator() -> Evaluator:
    """The shipped evaluator's FD and accuracy on the world's train and held-out splits."""
    return Evaluator(world.student_metrics, world.SPLITS)


def distill(args) -> None:
    from tbcm.distill.trainer import Distiller  # accelerate: the `train` extra

    config = distill_config(args)
    run = sources(config)
    distiller = Distiller(config, run, resume=args.resume)
    distiller.train()
    if args.export and distiller.main:
        path = export_student(distiller.pipeline(), distiller.teacher, distiller.config, Path(args.export),
                              distiller.step, distiller.counters, run.evaluator, args.export_eval_n)
        print(f"exported {path}")


def rollout(args) -> None:
    from tbcm.distill.rollout import write_rollouts  # accelerate: the `train` extra

    config = distill_config(args)
    paths = write_rollouts(config, config_from_args(RolloutConfig, args), sources(config).prompts, Path(args.out))
    print(f"wrote {len(paths)} shard(s) to {args.out}")


def export(args) -> None:
    student, teacher, config, step, counters = load_student_checkpoint(Path(args.run))
    config = override_config(config, args, EXPORT_OVERRIDES)
    evaluator = world_evaluator() if config.prompts == WORLD else None
    path = export_student(student, teacher, config, Path(args.out), step, counters, evaluator, args.eval_n,
                          args.standalone)
    print(f"exported {path}")
