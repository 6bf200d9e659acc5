"""`tbcm distill`, `tbcm rollout`, `tbcm export`: the TBCM trainer and what surrounds it, wired to its sources:
the embedded shapes world for `--prompts world`, or a prompt file alone (a real teacher's prompts).

Every run measures its teacher agreement (tbcm/distill/agreement.py). The shapes evaluator scores only students of
a shapes-world teacher (`is_shapes_world`): `--prompts world` with any other teacher (a Sana folder, say) still
trains on the world's captions, as any text-to-image teacher can, but warns that it gets teacher agreement only,
since the evaluator's FD and accuracy say nothing of a model that never learnt the world.
"""
from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

from tbcm.cli.options import add_config_options, config_from_args, override_config
from tbcm.distill.config import DistillConfig, RolloutConfig
from tbcm.distill.export import export_student, load_student_checkpoint
from tbcm.distill.sources import SAMPLE_PROMPTS, Evaluator, Sources, prompt_file_sources, read_prompt_file
from tbcm.models.card import is_shapes_world
from tbcm.models.pipeline import load_pipeline, read_info, save_pipeline
from tbcm.models.training import CHECKPOINT
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
                   help="images per split for the manifest's shapes-evaluator numbers (--prompts world with a "
                   "shapes-world teacher; every export also measures teacher agreement, --agreement-n)")
    p.set_defaults(handler=distill)

    r = sub.add_parser("rollout", help="precompute teacher trajectories into sharded safetensors files")
    add_config_options(r, DistillConfig, skip=("out",))
    unset_defaults(r)
    add_config_options(r, RolloutConfig)
    r.add_argument("--out", required=True, help="folder for rollouts-*.safetensors")
    r.set_defaults(handler=rollout)

    e = sub.add_parser("export", help="export a distill run's EMA student as a SanaSprintPipeline folder, or copy "
                       "any pipeline folder (--standalone: with its text encoder in it)")
    e.add_argument("source", nargs="?", metavar="SOURCE", help="distill run folder (with checkpoint.safetensors), "
                   "or a pipeline folder or shipped name (teacher, student) to copy")
    e.add_argument("target", nargs="?", metavar="OUT", help="pipeline folder to write")
    e.add_argument("--run", default=None, help="the distill run folder (the same as SOURCE)")
    e.add_argument("--out", default=None, help="pipeline folder to write (the same as OUT)")
    e.add_argument("--eval-n", type=int, default=0, help="images per split for the manifest's shapes-evaluator "
                   "numbers (a run of a shapes-world teacher only)")
    e.add_argument("--standalone", action="store_true", help="copy the text encoder in, so that plain "
                   "`from_pretrained(OUT)` loads it (otherwise shipped-world folders name its package)")
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
    and, for a shapes-world teacher, its evaluator; or a prompt file, with no images and no evaluator."""
    if config.prompts != WORLD:
        return prompt_file_sources(config.prompts)
    return Sources(world.training_captions(config.seed), world.sample_captions(SAMPLE_PROMPTS), world.SceneImages(),
                   world_evaluator(config.teacher))


def world_evaluator(teacher: str) -> Evaluator | None:
    """The shipped evaluator's FD and accuracy on the world's train and held-out splits, for a shapes-world
    teacher; None, with a warning, for any other."""
    if is_shapes_world(read_info(teacher)):
        return Evaluator(world.student_metrics, world.SPLITS)
    warnings.warn(f"--teacher {teacher} is not a shapes-world teacher (its tbcm.json records no world VAE run): "
                  f"--prompts world trains on the world's captions, but the shapes evaluator is not run (its FD and "
                  f"accuracy mean nothing for this model); the run reports teacher agreement only", stacklevel=2)
    return None


def distill(args) -> None:
    from tbcm.distill.trainer import Distiller  # accelerate: the `train` extra

    config = distill_config(args)
    run = sources(config)
    distiller = Distiller(config, run, resume=args.resume)
    distiller.train()
    if args.export and distiller.main:
        path = export_student(distiller.pipeline(), distiller.teacher, distiller.config, Path(args.export),
                              distiller.step, distiller.counters, run.evaluator, args.export_eval_n,
                              agreement_prompts=run.sample_prompts)
        print(f"exported {path}")


def rollout(args) -> None:
    from tbcm.distill.rollout import write_rollouts  # accelerate: the `train` extra

    config = distill_config(args)
    prompts = world.training_captions(config.seed) if config.prompts == WORLD else read_prompt_file(config.prompts)
    paths = write_rollouts(config, config_from_args(RolloutConfig, args), prompts, Path(args.out))
    print(f"wrote {len(paths)} shard(s) to {args.out}")


def export_paths(args) -> tuple[str, Path]:
    """(SOURCE, OUT), given as positionals or as --run and --out."""
    source, out = args.source or args.run, args.target or args.out
    if (args.source and args.run) or (args.target and args.out):
        raise ValueError("give SOURCE OUT or --run RUN --out OUT, not both")
    if not source or not out:
        raise ValueError("name what to export and where: tbcm export SOURCE OUT (or --run RUN --out OUT)")
    return source, Path(out)


def export(args) -> None:
    source, out = export_paths(args)
    if not (Path(source) / CHECKPOINT).exists():  # a pipeline folder: copied as it is
        if args.eval_n or args.export_extrapolation is not None:
            raise ValueError(f"{source} is a pipeline folder, not a distill run (no {CHECKPOINT}): --eval-n "
                             "and --export-extrapolation apply to runs only")
        pipe = load_pipeline(source)
        print(f"exported {save_pipeline(pipe, out, pipe.info, copy_text_encoder=args.standalone)}")
        return
    student, teacher, config, step, counters = load_student_checkpoint(Path(source))
    config = override_config(config, args, EXPORT_OVERRIDES)
    run = sources(config)
    path = export_student(student, teacher, config, out, step, counters, run.evaluator, args.eval_n,
                          args.standalone, agreement_prompts=run.sample_prompts)
    print(f"exported {path}")
