"""`tbcm rollout`: precompute teacher trajectories into sharded safetensors files, and read them back.

A shard holds, for M prompts, the K states, velocities and times of one rollout each, the endpoints and the CFG
scales, plus the prompts, the route and the teacher's transformer SHA-256 in the header. Under `accelerate launch`,
rank r writes shards r, r + W, ... Several training runs (or ranks) can then reuse the same trajectories instead of
rolling out.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from tbcm.models.training import atomic_write_safetensors, read_safetensors, seed_everything

from tbcm.distill.config import DistillConfig, RolloutConfig
from tbcm.distill.pairs import Rollout, rollout
from tbcm.distill.teacher import load_teacher, teacher_fingerprint

SHARD_GLOB = "rollouts-*.safetensors"


def write_rollouts(config: DistillConfig, rollout_config: RolloutConfig, prompts: list[str], out: Path) -> list[Path]:
    """Shards of rollouts of prompts drawn from `prompts` (this rank's share of the shard indices)."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    teacher = load_teacher(config, accelerator.device)
    teacher_sha256 = teacher_fingerprint(teacher)["transformer_sha256"]
    out.mkdir(parents=True, exist_ok=True)
    mine = range(accelerator.process_index, rollout_config.shards, accelerator.num_processes)
    written = []
    for shard in tqdm(mine, desc=f"rollouts (rank {accelerator.process_index})", unit="shard"):
        seed_everything(config.seed * 100003 + shard)  # a shard is a pure function of (seed, shard index)
        chosen = [random.choice(prompts) for _ in range(rollout_config.prompts_per_shard)]
        parts = []
        for i in range(0, len(chosen), rollout_config.batch_size):
            batch = chosen[i:i + rollout_config.batch_size]
            states, mask = teacher.text.encode(batch)
            null_states, null_mask = teacher.text.null(len(batch))
            parts.append(rollout(teacher, states, mask, null_states, null_mask, config))
        tensors = {name: torch.cat([getattr(p, name) for p in parts]).cpu()
                   for name in ("states", "velocities", "times", "endpoints", "guidance")}
        path = out / f"rollouts-{shard:05d}.safetensors"
        atomic_write_safetensors(tensors, path, {"prompts": chosen, "teacher": str(config.teacher),
                                                 "teacher_sha256": teacher_sha256,
                                                 "route_points": config.route_points,
                                                 "time_sampling": config.time_sampling,
                                                 "guidance_max_sigma": config.guidance_max_sigma})
        written.append(path)
    return written


class RolloutShards:
    """Random access to precomputed rollouts: `sample(n)` draws n stored trajectories (Python's RNG). Every shard
    must have been rolled out by the run's teacher (its transformer's SHA-256) with the run's route (`route_points`,
    `time_sampling`) and guidance interval (`guidance_max_sigma`), which its header records."""

    def __init__(self, folder: str | Path, config: DistillConfig, teacher_sha256: dict[str, str]):
        paths = sorted(Path(folder).glob(SHARD_GLOB))
        if not paths:
            raise FileNotFoundError(f"--rollouts {folder}: no {SHARD_GLOB} files (make them with `tbcm rollout`)")
        loaded = [read_safetensors(p) for p in paths]
        for path, (_, meta) in zip(paths, loaded):
            meta = {"guidance_max_sigma": 1.0} | meta  # shards written before the knob were guided everywhere
            for knob in ("route_points", "time_sampling", "guidance_max_sigma"):
                if meta.get(knob) != getattr(config, knob):
                    raise ValueError(f"--rollouts {path}: rolled out with {knob} = {meta.get(knob)!r}, but this run "
                                     f"has --{knob.replace('_', '-')} {getattr(config, knob)!r}; pass the shards' "
                                     "value or re-run `tbcm rollout`")
            if meta.get("teacher_sha256") != teacher_sha256:
                raise ValueError(f"--rollouts {path}: rolled out by another teacher (transformer SHA-256 "
                                 f"{meta.get('teacher_sha256')}, this run's --teacher {config.teacher} has "
                                 f"{teacher_sha256}); re-run `tbcm rollout` with this teacher")
        self.tensors = {name: torch.cat([t[name] for t, _ in loaded]) for name in loaded[0][0]}
        self.prompts = [p for _, meta in loaded for p in meta["prompts"]]

    def sample(self, n: int) -> tuple[Rollout, list[str]]:
        rows = [random.randrange(len(self.prompts)) for _ in range(n)]
        t = {name: value[rows] for name, value in self.tensors.items()}
        return Rollout(t["states"], t["velocities"], t["times"], t["endpoints"], t["guidance"]), \
            [self.prompts[r] for r in rows]
