"""Probe: what bounds the teacher's FD, which bounds a TBCM student's? Two floors and a sampler.

- real: an independent set of real renders (the FD floor of the evaluation itself);
- VAE reconstruction: the same scenes' renders, encoded and decoded by the teacher's VAE (any latent model's floor);
- the teacher with stochastic sampling. Each step keeps a fraction c of the predicted noise and replaces the rest
  with fresh noise (DDIM-eta in TrigFlow time): c = 1 is the teacher's own deterministic sampler, c = 0 a fully
  ancestral one. If some c < 1 lowered the teacher's FD, rollouts made that way could feed TBCM better endpoints.
- the teacher with its CFG limited to flow sigma <= g (the guidance interval; `tbcm distill --guidance-max-sigma`
  rolls out that way), and conditioned alone above g.

    python -m benchmarks.probe_teacher_limits --keep 1,0.8,0.5,0 --prompts train --n 1024 --seed 2 \
        --json docs/results/teacher-limits-probe-seed2.json
    python -m benchmarks.probe_teacher_limits --keep 1 --guidance-max-sigma 0.6,0.5,0.4,0.3 --prompts SPLIT \
        --n 1024 --seed 2 --json docs/results/teacher-guidance-interval-probe-SPLIT-seed2.json
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import platform
from pathlib import Path

import torch

from benchmarks.provenance import command as provenance_command
from tbcm.models import generator
from tbcm.world import world
from tbcm.world.evaluate import EVAL_SEED_BASE, REFERENCE_SEED_BASE, EvalConfig, evaluate
from tbcm.world.evaluator import Evaluator, attribute_accuracy, frechet_distance, measure, targets_of
from tbcm.models.pipeline import WEIGHTS_DIR, load_pipeline
from tbcm.models.trigflow import SIGMA_DATA, consistency_x0, renoise, trig_time, trigflow_from_flow


def stochastic_sampler(keep: float, seed: int):
    """A drop-in for `sample_trigflow`: x_t' = cos t' x0 + sin t' (c eps + sqrt(1 - c^2) z) (DDIM eq. 12, in
    TrigFlow time), with x0 and eps predicted from the teacher's velocity at x_t (sCM eq. 9)."""
    noise_source = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def sample(velocity, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        times = trig_time(sigmas[:-1]).to(noise.dtype)
        x = noise * SIGMA_DATA
        for k, t in enumerate(times):
            tt = t.expand(len(x))
            v = SIGMA_DATA * trigflow_from_flow(velocity, x / SIGMA_DATA, tt)
            x0 = consistency_x0(x, v, tt)
            if k + 1 == len(times):
                return x0 / SIGMA_DATA
            eps = torch.sin(t) * x + torch.cos(t) * v  # the predicted noise, already scaled by sigma_d
            fresh = torch.randn(x.shape, generator=noise_source).to(x) * SIGMA_DATA
            x = renoise(x0, keep * eps + math.sqrt(1 - keep**2) * fresh, times[k + 1].expand(len(x)))
        raise AssertionError("unreachable: the last step returns")
    return sample


@torch.no_grad()
def reconstruction_floor(model: str, prompts: str, n: int, seed: int) -> dict:
    """FD and accuracy of VAE reconstructions of the scenes `tbcm eval` would prompt with, as uint8 images."""
    evaluator = Evaluator.load(WEIGHTS_DIR / "evaluator")
    size, vae = evaluator.config["image_size"], load_pipeline(model).vae
    scenes, references = ([world.sample_scene(base + seed * n + i, prompts) for i in range(n)]
                          for base in (EVAL_SEED_BASE, REFERENCE_SEED_BASE))
    real = world.render_tensor(scenes, size)
    decoded = torch.cat([vae.decode(vae.encode(real[i:i + 128]).latent).sample for i in range(0, n, 128)])
    decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    feats, logits = measure(evaluator, decoded)
    ref_feats, _ = measure(evaluator, world.render_tensor(references, size))
    accuracy, per_attribute = attribute_accuracy(logits, targets_of(scenes))
    return {"fd": frechet_distance(feats, ref_feats), "accuracy": accuracy, "accuracy_per_attribute": per_attribute}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", default="1,0.8,0.5,0", help="fractions c of the predicted noise kept per step")
    parser.add_argument("--guidance-max-sigma", default="", help="limits g < 1 of the CFG interval, deterministic")
    parser.add_argument("--model", default="teacher")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prompts", default="train")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()

    def measured(**model) -> dict:
        result = evaluate(EvalConfig(**model, prompts=args.prompts, n=args.n, seed=args.seed))
        return {k: result[k] for k in ("fd", "accuracy", "accuracy_per_attribute")}
    rows = [{"images": "real", **measured(model="real")},
            {"images": "VAE reconstruction", **reconstruction_floor(args.model, args.prompts, args.n, args.seed)}]
    deterministic, guided_everywhere = generator.sample_trigflow, generator.cfg_flow_model
    for keep in (float(k) for k in args.keep.split(",")):
        if not 0 <= keep <= 1:
            raise SystemExit(f"--keep: each fraction must be in [0, 1], got {keep}")
        generator.sample_trigflow = deterministic if keep == 1 else stochastic_sampler(keep, args.seed)
        rows.append({"images": f"{args.model}, c = {keep}", "keep": keep,
                     **measured(model=args.model, steps=args.steps, sampler="trigflow")})
    generator.sample_trigflow = deterministic
    for limit in (float(g) for g in filter(None, args.guidance_max_sigma.split(","))):
        if not 0 < limit < 1:
            raise SystemExit(f"--guidance-max-sigma: each limit must be in (0, 1), got {limit}")
        generator.cfg_flow_model = functools.partial(guided_everywhere, guidance_max_sigma=limit)
        rows.append({"images": f"{args.model}, CFG at sigma <= {limit}", "guidance_max_sigma": limit,
                     **measured(model=args.model, steps=args.steps, sampler="trigflow")})
    generator.cfg_flow_model = guided_everywhere
    print(f"\n{args.prompts}, n = {args.n}, seed {args.seed}")
    for row in rows:
        print(f"{row['images']:<24} FD {row['fd']:7.2f}  accuracy {row['accuracy']:.3f}")
    out = {"command": provenance_command(), "model": args.model, "steps": args.steps,
           "prompts": args.prompts, "n": args.n, "seed": args.seed, "rows": rows,
           "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
