"""One rank of `accelerate launch ... ddp_worker.py JOBS`, for test_ddp.py (not a test itself).

JOBS is a JSON list of {"config": DistillConfig fields, "resume": bool}, run one after another in this process;
an optional "skew_s": {rank: seconds} adds that much to the rank's training clock after each of its steps.
Each rank appends its own per-step losses to `losses-rank{N}.jsonl` in the job's run folder and, at the end,
writes its student weights to `student-rank{N}.safetensors` there, so the test can compare ranks and runs.
"""
import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tbcm.cli.distill import sources
from tbcm.distill.config import DistillConfig
from tbcm.distill.trainer import Distiller
from tbcm.models.training import atomic_write_safetensors


def run(config: DistillConfig, resume: bool, skew_s: float = 0.0) -> None:
    distiller = Distiller(config, sources(config), resume=resume)
    rank, out = distiller.accelerator.process_index, Path(config.out)
    step = distiller.train_step

    def recorded() -> dict:
        metrics = step()
        distiller.counters["train_time_s"] += skew_s
        with open(out / f"losses-rank{rank}.jsonl", "a") as handle:
            handle.write(json.dumps({"step": distiller.step, "loss": metrics["loss"],
                                     "world": distiller.accelerator.num_processes}) + "\n")
        return metrics

    distiller.train_step = recorded
    distiller.train()
    whole = StateDictOptions(full_state_dict=True)  # FSDP shards gathered; DDP and one process: as they are
    weights = get_model_state_dict(distiller.student, options=whole)
    atomic_write_safetensors({k: v.cpu() for k, v in weights.items()}, out / f"student-rank{rank}.safetensors")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for job in json.loads(sys.argv[1]):
        config = job["config"]
        run(DistillConfig(**{**config, "cfg_scales": tuple(config.get("cfg_scales", (4.0, 4.5, 5.0)))}),
            job["resume"], float(job.get("skew_s", {}).get(os.environ["RANK"], 0.0)))
