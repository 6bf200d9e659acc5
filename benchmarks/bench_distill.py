"""Training efficiency: TBCM (trajectory pairs) against data-based sCM, same student, loss, pairs and optimiser.

Each method runs in its own process (so peak memory is its own): per-iteration time, time per training pair,
peak RSS (and CUDA max allocated on a GPU). Settings: `world` (the shipped shapes teacher) or `sana600m`
(the Sana 600M transformer architecture and DC-AE f32c32 with random weights; only speed and memory matter;
on a CPU use --layers and --resolution to shrink it, and the table says so).

    python -m benchmarks.bench_distill --setting world --steps 6 --json runs/bench/distill_world.json
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.provenance import command as provenance_command

REPO = Path(__file__).resolve().parents[1]


def sana600m_teacher(folder: Path, layers: int, resolution: int) -> Path:
    """A random-weight pipeline folder with Sana 600M's transformer widths and DC-AE f32c32."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import BertConfig, BertModel

    from tbcm.models.pipeline import Pipeline, default_scheduler, save_pipeline
    from tbcm.models.sampling import DENSE_TIMESTEP_SCALE
    from tbcm.models.text import TextEncoder
    from tests.tiny import tiny_text_encoder

    tokenizer, _ = tiny_text_encoder()
    encoder = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=2304, num_hidden_layers=1,
                                   num_attention_heads=16, intermediate_size=512))  # Gemma-2-2b's width 2304
    transformer = SanaTransformer2DModel(
        in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=layers,
        num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152, caption_channels=2304,
        mlp_ratio=2.5, sample_size=resolution // 32, patch_size=1, qk_norm="rms_norm_across_heads",
        timestep_scale=DENSE_TIMESTEP_SCALE)  # dense time, as Sprint students need (Sana-Sprint Sec. 3.2)
    vae = AutoencoderDC(latent_channels=32, scaling_factor=0.41407)  # diffusers' defaults are DC-AE f32c32
    pipe = Pipeline(transformer, vae, TextEncoder(tokenizer, encoder, 300), default_scheduler(False, 3.0))
    return save_pipeline(pipe, folder, {"image_size": resolution})


def run_one(teacher: str, pairs: str, steps: int, prompts_per_step: int, points: int, out: Path) -> dict:
    """Train `steps` iterations in this process and report time and memory (first iteration excluded)."""
    from tbcm.cli.distill import sources
    from tbcm.distill.config import DistillConfig
    from tbcm.distill.trainer import Distiller

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    config = DistillConfig(teacher=teacher, out=str(out), pairs=pairs, steps=steps, prompts_per_step=prompts_per_step,
                           points_per_trajectory=points, sample_every=0, eval_every=0, checkpoint_every=10**9)
    distiller = Distiller(config, sources(config))  # --prompts world: the world's captions and renders
    times = []
    for _ in range(steps):
        metrics = distiller.train_step()
        times.append(distiller.counters["train_time_s"])
    per_step = [b - a for a, b in zip(times[:-1], times[1:])] or [times[0]]
    pairs_per_step = prompts_per_step * points
    result = {"pairs": pairs, "steps": steps, "pairs_per_step": pairs_per_step,
              "iteration_s": statistics.median(per_step), "time_per_pair_s": statistics.median(per_step) /
              pairs_per_step, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "last_loss": metrics["loss"]}
    if torch.cuda.is_available():
        result["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def markdown_table(rows: list[dict], command: str) -> str:
    lines = [f"`{command}`", "", "| pairs | iteration s | s / pair | peak RSS GB | CUDA max GB |",
             "|---|---|---|---|---|"]
    for r in rows:
        cuda = f"{r['cuda_max_allocated_gb']:.2f}" if "cuda_max_allocated_gb" in r else "-"
        lines.append(f"| {r['pairs']} | {r['iteration_s']:.3f} | {r['time_per_pair_s']:.4f} | {r['peak_rss_gb']:.2f} | "
                     f"{cuda} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("world", "sana600m"), default="world")
    parser.add_argument("--teacher", default="weights/teacher", help="teacher folder for --setting world")
    parser.add_argument("--steps", type=int, default=6, help="iterations per method (the first is excluded)")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--points", type=int, default=15, help="points per trajectory (pairs = prompts x points)")
    parser.add_argument("--layers", type=int, default=28, help="sana600m: transformer blocks (600M has 28)")
    parser.add_argument("--resolution", type=int, default=1024, help="sana600m: image side in pixels")
    parser.add_argument("--json", default="runs/bench/distill.json")
    parser.add_argument("--one", choices=("trajectory", "data"), help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_distill_"))
    if args.one:
        print(json.dumps(run_one(args.teacher, args.one, args.steps, args.prompts_per_step, args.points,
                                 work / args.one)))
        return
    teacher = args.teacher if args.setting == "world" else str(sana600m_teacher(work / "teacher", args.layers,
                                                                                 args.resolution))
    rows = []
    for pairs in ("trajectory", "data"):
        cmd = [sys.executable, __file__, "--one", pairs, "--teacher", teacher, "--steps", str(args.steps),
               "--prompts-per-step", str(args.prompts_per_step), "--points", str(args.points)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if done.returncode:
            sys.exit(f"{pairs} run failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    setting = args.setting if args.setting == "world" else \
        f"sana600m widths, {args.layers} layers, {args.resolution}px, random weights"
    print(f"\nTBCM vs data-sCM training efficiency — {setting} — {device}, torch {torch.__version__}")
    print(f"{'pairs':<11}{'iter s':>9}{'s/pair':>10}{'peak RSS GB':>13}{'CUDA max GB':>13}")
    for r in rows:
        cuda = f"{r['cuda_max_allocated_gb']:.2f}" if "cuda_max_allocated_gb" in r else "-"
        print(f"{r['pairs']:<11}{r['iteration_s']:>9.3f}{r['time_per_pair_s']:>10.4f}{r['peak_rss_gb']:>13.2f}"
              f"{cuda:>13}")
    ratio = rows[0]["iteration_s"] / rows[1]["iteration_s"]
    print(f"TBCM / data iteration time: {ratio:.2f}x")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setting": setting, "device": device, "torch": torch.__version__,
                               "rows": rows, "tbcm_over_data_iteration_time": ratio,
                               "command": provenance_command()}, indent=2))
    out.with_suffix(".md").write_text(markdown_table(rows, provenance_command()))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
