"""`tbcm world ...`, `tbcm generate` and `tbcm eval`: the embedded world and the model core."""
from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderDC
from PIL import Image

from tbcm.cli.options import add_config_options, config_from_args
from tbcm.models.generator import DEFAULT_GUIDANCE, TEACHER_SAMPLERS, Generator
from tbcm.models.pipeline import embedded_text_encoder, load_pipeline
from tbcm.models.training import save_grid
from tbcm.world import evaluate as world_eval
from tbcm.world import ship, teacher_train, world_train
from tbcm.world.evaluate import EvalConfig
from tbcm.world.teacher_train import TeacherConfig
from tbcm.world.world_train import EvaluatorConfig, VAEConfig


def register(sub) -> None:
    world = sub.add_parser("world", help="train and ship the embedded shapes world (VAE, evaluator, teacher)")
    world_sub = world.add_subparsers(dest="world_command", required=True)
    for name, cls, handler in (("train-vae", VAEConfig, train_vae), ("train-evaluator", EvaluatorConfig,
                               train_evaluator), ("train-teacher", TeacherConfig, train_teacher)):
        p = world_sub.add_parser(name, help=f"{name.replace('-', ' ')} (progress, checkpoints, --resume)")
        add_config_options(p, cls)
        p.add_argument("--out", required=True, help="run folder (checkpoint, metrics.jsonl, result)")
        p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
        if name == "train-teacher":
            p.add_argument("--vae", required=True, help="run folder of train-vae (its vae/ subfolder is used)")
        p.set_defaults(handler=handler, config_cls=cls)
    ship = world_sub.add_parser("ship", help="assemble the shipped teacher pipeline folder and evaluator")
    ship.add_argument("--vae", required=True)
    ship.add_argument("--evaluator", default=None, help="train-evaluator run folder (default: keep the shipped one)")
    ship.add_argument("--teacher", required=True)
    ship.add_argument("--weights", default=None, help="destination (default: the repo's weights/)")
    ship.add_argument("--eval-n", type=int, default=512,
                      help="images per split for the teacher's 16-step eval recorded in tbcm.json (0: skip)")
    ship.set_defaults(handler=ship_world)

    gen = sub.add_parser("generate", help="generate images from a prompt with a teacher or student")
    gen.add_argument("prompt")
    gen.add_argument("--model", default="teacher", help="pipeline folder or shipped name (teacher, student)")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (default 1 student, 16 teacher)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    gen.add_argument("--n", type=int, default=1, help="images to generate")
    gen.add_argument("--guidance", type=float, default=None, help="CFG / embedded guidance scale (default 4.5)")
    gen.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    gen.add_argument("--sampler", choices=TEACHER_SAMPLERS, default="scheduler",
                     help="a teacher's sampler: its folder's scheduler (what SanaPipeline runs), flow-Euler, or the "
                     "TBCM TrigFlow route (students always sample with their SCMScheduler)")
    gen.add_argument("--out", required=True, help="PNG path (with --n > 1, a grid)")
    gen.set_defaults(handler=generate)

    ev = sub.add_parser("eval", help="FD, precision/recall, attribute accuracy, NFE and images/s of a model "
                        "(or 'real')")
    add_config_options(ev, EvalConfig)
    ev.set_defaults(handler=evaluate)


def train_vae(args) -> None:
    world_train.train_vae(config_from_args(args.config_cls, args), Path(args.out), resume=args.resume)


def train_evaluator(args) -> None:
    world_train.train_evaluator(config_from_args(args.config_cls, args), Path(args.out), resume=args.resume)


def train_teacher(args) -> None:
    config = config_from_args(args.config_cls, args)
    vae = AutoencoderDC.from_pretrained(Path(args.vae) / "vae", use_safetensors=True).eval()
    teacher_train.train_teacher(config, vae, embedded_text_encoder(config.max_sequence_length), Path(args.out),
                                resume=args.resume)


def ship_world(args) -> None:
    ship.ship_world(Path(args.vae), Path(args.evaluator) if args.evaluator else None, Path(args.teacher),
                    Path(args.weights) if args.weights else None, args.eval_n)


def generate(args) -> None:
    generator = Generator(load_pipeline(args.model), sampler=args.sampler)
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    out = generator.generate([args.prompt] * args.n, [args.seed + i for i in range(args.n)], args.steps, guidance,
                             args.size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.n == 1:
        Image.fromarray(out.images[0].numpy()).save(args.out)
    else:
        save_grid(out.images, Path(args.out), columns=min(8, args.n))
    timing = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in out.timings.items())
    print(f"wrote {args.out} ({args.n} image(s), steps {args.steps or generator.default_steps}; {timing})")


EVAL_TABLE = (("FD", "fd", ".3f"), ("precision", "precision", ".3f"), ("recall", "recall", ".3f"),
              ("accuracy", "accuracy", ".3f"), ("NFE", "nfe", "d"), ("images/s", "images_per_s", ".1f"))


def evaluate(args) -> None:
    result = world_eval.evaluate(config_from_args(EvalConfig, args))
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
    print(f"\n{result['model']} on {result['prompts']} prompts, n = {result['n']}:")
    print("".join(f"{name:>11}" for name, _, _ in EVAL_TABLE))
    print("".join(f"{'-' if result[key] is None else format(result[key], spec):>11}" for _, key, spec in EVAL_TABLE))
