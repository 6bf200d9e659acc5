"""Probe of sCM's learned log-variance weighting (sCM arXiv 2410.11081, eq. 14) in a distillation run: where the
weighting puts the student's gradient, step by step, against the student's quality. Prints a table, writes JSON.

    python -m benchmarks.probe_weighting --recipe tbcm --steps 250 --json docs/results/weighting-probe.json \
        [--no-learn-logvar | --logvar-detached | any other DistillConfig option over the recipe's]

Every `--every` steps, on one fixed batch of pairs drawn at step 0 (its times split into `--bins` equal-count
bins), per bin: the sCM per-pair MSE ||F - F^- - g||^2 / D, the learned logvar, the weight prior(t) e^{-logvar}
that the loss puts on that MSE, and the norm of the gradient that the bin's pairs alone give the transformer
(scm_loss on the bin, the run's r, prior and logvar bound; the logvar head excluded). Also per step: the gradient
norms of the transformer and the logvar head before clipping, and the size of the AdamW update of the
transformer's weights (||delta theta|| / ||theta||). Every `--eval-every` steps, the run's own evaluation
(the shapes evaluator, one step, the training split, at --eval-n) of the EMA student.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks.provenance import command
from tbcm.cli.distill import sources
from tbcm.cli.options import add_config_options, override_config
from tbcm.distill.config import DistillConfig
from tbcm.distill.loss import Pairs, scm_loss
from tbcm.distill.trainer import Distiller


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tbcm", help="the run's recipe (tbcm/distill/recipes.py)")
    parser.add_argument("--steps", type=int, default=250, help="training steps probed")
    parser.add_argument("--every", type=int, default=10, help="steps between probes of the fixed batch")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between evaluations of the student")
    parser.add_argument("--eval-n", type=int, default=128, help="images per evaluation")
    parser.add_argument("--bins", type=int, default=4, help="equal-count time bins of the fixed batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/probe-weighting", help="the run folder")
    parser.add_argument("--json", default="runs/probe-weighting/probe.json", help="where the JSON goes")
    add_config_options(parser, DistillConfig, overrides=RECIPE_OVERRIDES)
    return parser.parse_args()


def subset(pairs: Pairs, index: torch.Tensor) -> Pairs:
    return Pairs(*(getattr(pairs, f.name)[index] for f in dataclasses.fields(Pairs)))


def grad_norm(parameters) -> float:
    grads = [p.grad.detach().flatten() for p in parameters if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


# the DistillConfig options a probe may set over its recipe: all but those the probe fixes itself
PROBE_FIXED = ("recipe", "teacher", "prompts", "seed", "steps", "out", "eval_every", "sample_every", "agreement_n",
               "eval_n", "checkpoint_every")
RECIPE_OVERRIDES = tuple(f.name for f in dataclasses.fields(DistillConfig) if f.name not in PROBE_FIXED)


def probe_bins(distiller: Distiller, pairs: Pairs, bins: list[torch.Tensor]) -> list[dict]:
    """Per time bin of the fixed batch: MSE, logvar, weight and the transformer gradient norm of its loss alone."""
    config, student, r = distiller.config, distiller.student, distiller.tangent_r()
    rows = []
    for index in bins:
        part = subset(pairs, index)
        distiller.optimizer.zero_grad(set_to_none=True)
        loss, stats = scm_loss(distiller.model, part, r, config.prior_weight, config.logvar_min)
        loss.backward()
        rows.append({"t_min": float(part.t.min()), "t_max": float(part.t.max()), "mse": stats["mse"],
                     "logvar": stats["logvar"], "weight": stats["weight"],
                     "grad_norm": grad_norm(student.transformer.parameters())})
    distiller.optimizer.zero_grad(set_to_none=True)
    return rows


def main() -> None:
    args = parse_args()
    config = DistillConfig.from_recipe(recipe=args.recipe, teacher="teacher", prompts="world", seed=args.seed,
                                       steps=args.steps, out=args.out, eval_every=0, sample_every=0,
                                       agreement_n=0, eval_n=args.eval_n, checkpoint_every=10**9)
    config = override_config(config, args, RECIPE_OVERRIDES)
    distiller = Distiller(config, sources(config))
    torch.manual_seed(args.seed + 1)
    fixed = distiller.make_pairs()[0]
    order = torch.argsort(fixed.t)
    bins = list(order.chunk(args.bins))
    transformer = list(distiller.student.transformer.parameters())
    head = list(distiller.student.logvar.parameters())
    probes, steps, evals = [], [], []
    started = time.perf_counter()
    while distiller.step < args.steps:
        if distiller.step % args.eval_every == 0:
            evals.append({"step": distiller.step, **distiller.sources.evaluator.evaluate(
                distiller.pipeline(), args.eval_n, distiller.sources.evaluator.splits[0])})
            print(f"step {distiller.step}: eval {evals[-1].get('fd', float('nan')):.1f} / "
                  f"{evals[-1].get('accuracy', float('nan')):.3f}", flush=True)
        if distiller.step % args.every == 0:
            probes.append({"step": distiller.step, "bins": probe_bins(distiller, fixed, bins)})
        before = torch.cat([p.detach().flatten() for p in transformer])
        grads = {}
        original_step = distiller.optimizer.step

        def recording_step(*a, **k):  # the gradient norms right before the (clipped) AdamW step
            grads.update(transformer=grad_norm(transformer), head=grad_norm(head))
            return original_step(*a, **k)

        distiller.optimizer.step = recording_step
        record = distiller.train_step()
        distiller.optimizer.step = original_step
        after = torch.cat([p.detach().flatten() for p in transformer])
        steps.append({"step": distiller.step, "loss": record["loss"], "mse": record["mse"],
                      "logvar": record["logvar"], "grad_norm_reported": record["grad_norm"],
                      "transformer_grad_norm_clipped": grads.get("transformer"), "head_grad_norm": grads.get("head"),
                      "relative_update": float((after - before).norm() / before.norm())})
        if distiller.step % args.every == 0:
            rate = distiller.step / (time.perf_counter() - started)
            eta = (args.steps - distiller.step) / rate
            print(f"step {distiller.step}/{args.steps} ({rate:.2f} steps/s, ETA {eta:.0f} s): loss "
                  f"{record['loss']:.4g} logvar {record['logvar']:.2f} update "
                  f"{steps[-1]['relative_update']:.2e}", flush=True)
    evals.append({"step": distiller.step, **distiller.sources.evaluator.evaluate(
        distiller.pipeline(), args.eval_n, distiller.sources.evaluator.splits[0])})
    probes.append({"step": distiller.step, "bins": probe_bins(distiller, fixed, bins)})
    report = {"command": command(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "config": dataclasses.asdict(distiller.config), "probes": probes, "steps": steps,
              "evals": [{k: v for k, v in e.items() if k in ("step", "fd", "accuracy")} for e in evals]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"{'step':>5} " + " ".join(f"{'bin ' + str(i):>30}" for i in range(args.bins)))
    for probe in probes:
        print(f"{probe['step']:>5} " + " ".join(f"lv {b['logvar']:6.2f} w {b['weight']:8.3g} |g| {b['grad_norm']:7.3g}"
                                                 for b in probe["bins"]))
    print("evals:", [(e["step"], round(e.get("fd", 0), 1), e.get("accuracy")) for e in report["evals"]])
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
