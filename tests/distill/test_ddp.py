"""Two processes under `accelerate launch` on CPU (gloo DDP): both ranks train on their own prompts, DDP keeps
their weights identical, and a 2-rank run checkpointed at step 2 and resumed in fresh processes ends exactly
where an uninterrupted 2-rank run does (every rank's RNG is checkpointed, not just rank 0's)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tbcm.distill.config import DistillConfig

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")
TINY = dict(prompts_per_step=2, route_points=4, points_per_trajectory=3, sample_every=0, eval_every=0,
            checkpoint_every=1, tangent_warmup=2)


DDP_ON_CPU = ("--multi_gpu", "--num_processes", "2")
FSDP2_ON_ONE_GPU = ("--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                    "--fsdp_transformer_layer_cls_to_wrap", "SanaTransformerBlock",
                    "--fsdp_cpu_ram_efficient_loading", "false", "--num_processes", "1")


def launch(jobs: list[dict], mode: tuple[str, ...] = DDP_ON_CPU, timeout_s: int = 1800) -> None:
    """`accelerate launch --multi_gpu --num_processes 2`: with no CUDA device the trainer's Accelerator(cpu=True)
    makes accelerate pick MULTI_CPU with the gloo backend (`--cpu` alone would start a single process).
    FSDP2_ON_ONE_GPU shards over one CUDA process instead (accelerate enables FSDP on accelerators only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if mode == DDP_ON_CPU:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode,
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(WORKER), json.dumps(jobs)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def rank_losses(run: Path, rank: int, world: int = 2) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / f"losses-rank{rank}.jsonl").read_text().splitlines()]
    assert all(row["world"] == world for row in rows)
    return {row["step"]: row["loss"] for row in rows}


@pytest.mark.slow
def test_two_rank_ddp_trains_in_lockstep_and_resumes_exactly(tiny_teacher_dir, tmp_path):
    def job(name: str, steps: int, resume: bool = False) -> dict:
        config = DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path / name), steps=steps, **TINY)
        return {"config": config.__dict__, "resume": resume}

    launch([job("straight", 4), job("resumed", 2)])  # one launch, two runs: the reference and the first half
    assert sorted(p.name for p in (tmp_path / "resumed").glob("rng-rank*")) == \
        ["rng-rank0-step2.safetensors", "rng-rank1-step2.safetensors"]
    launch([job("resumed", 4, resume=True)])  # fresh processes continue from the step-2 checkpoint

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for rank in (0, 1):
        losses = rank_losses(straight, rank)
        assert sorted(losses) == [1, 2, 3, 4] and all(abs(v) < float("inf") for v in losses.values())
        assert rank_losses(resumed, rank) == losses, f"rank {rank} did not continue exactly"
    assert rank_losses(straight, 0) != rank_losses(straight, 1), "both ranks drew the same prompts and noise"
    weights = {(run.name, rank): load_file(run / f"student-rank{rank}.safetensors")
               for run in (straight, resumed) for rank in (0, 1)}
    reference = weights["straight", 0]
    for key, state in weights.items():  # DDP-averaged gradients: every rank and both runs hold the same weights
        assert state.keys() == reference.keys()
        assert all(state[k].equal(reference[k]) for k in reference), key
    assert sorted(p.name for p in resumed.glob("rng-rank*")) == \
        ["rng-rank0-step4.safetensors", "rng-rank1-step4.safetensors"]
    logged = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (straight, resumed)]
    assert logged[0] == logged[1] == [rank_losses(straight, 0)[s] for s in (1, 2, 3, 4)]  # rank 0's log


@pytest.mark.slow
def test_a_time_budget_stops_every_rank_at_the_same_step(tiny_teacher_dir, tmp_path):
    """Rank 1's clock runs past the budget after its first step, rank 0's never does: both follow rank 0's, so
    neither rank is left waiting in an all-reduce the other never joins."""
    config = DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path / "run"), steps=3, time_budget_s=1e4,
                           **TINY)
    launch([{"config": config.__dict__, "resume": False, "skew_s": {"1": 2e4}}], timeout_s=300)  # a hang fails
    assert sorted(rank_losses(tmp_path / "run", 0)) == sorted(rank_losses(tmp_path / "run", 1)) == [1, 2, 3]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate enables FSDP on accelerators only")
def test_fsdp2_run_resumes_where_the_uninterrupted_one_ends(tiny_teacher_dir, tmp_path):
    """Under accelerate's FSDP version 2 (the student sharded, the JVP through it, checkpoints gathered), a run
    checkpointed at step 2 and resumed in a fresh process ends where the uninterrupted run does (CUDA kernels
    are not bitwise deterministic, hence the tolerance)."""
    def job(name: str, steps: int, resume: bool = False) -> dict:
        config = DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path / name), steps=steps, **TINY)
        return {"config": config.__dict__, "resume": resume}

    launch([job("straight", 4), job("resumed", 2)], FSDP2_ON_ONE_GPU)
    launch([job("resumed", 4, resume=True)], FSDP2_ON_ONE_GPU)
    straight, resumed = (rank_losses(tmp_path / name, 0, world=1) for name in ("straight", "resumed"))
    assert sorted(straight) == [1, 2, 3, 4]
    assert straight == pytest.approx(resumed, rel=1e-3)
    weights = [load_file(tmp_path / name / "student-rank0.safetensors") for name in ("straight", "resumed")]
    assert all(torch.allclose(weights[0][k], weights[1][k], rtol=1e-3, atol=1e-5) for k in weights[0])


def test_rank_rng_files_round_trip_and_fail_clearly(tmp_path):
    import random

    from tbcm.models.training import load_rank_rng, prune_rank_rng, save_rank_rng

    torch.manual_seed(5)
    random.seed(5)
    path = save_rank_rng(tmp_path, 1, 7)
    expected = (torch.rand(3), random.random())
    torch.rand(10)
    load_rank_rng(tmp_path, 1, 7)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    with pytest.raises(FileNotFoundError, match="rng-rank1-step8.safetensors"):
        load_rank_rng(tmp_path, 1, 8)
    save_rank_rng(tmp_path, 1, 8)
    prune_rank_rng(tmp_path, 1, 8)
    assert not path.exists() and (tmp_path / "rng-rank1-step8.safetensors").exists()
    (tmp_path / "rng-rank1-step8.safetensors").write_bytes(b"\x00" * 12)  # truncated
    with pytest.raises(RuntimeError, match="rng-rank1-step8.safetensors"):
        load_rank_rng(tmp_path, 1, 8)
