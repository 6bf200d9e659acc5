"""The sCM loss under FSDP2 (`fully_shard`, what accelerate's FSDP version 2 applies) on two CPU processes (gloo):
the JVP pass runs with the student's parameters sharded, and loss, every gradient and the EMA update equal the
unsharded single-process ones. Accelerate enables FSDP only on accelerators, so the test shards by hand."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tbcm.distill.loss import Pairs, scm_loss
from tbcm.distill.student import Student, student_from_teacher
from tiny import tiny_transformer
from tbcm.models.training import ema_update
from tbcm.models.trigflow import SIGMA_DATA

DECAY = 0.9


def make_student() -> Student:
    torch.manual_seed(0)
    student = Student(student_from_teacher(tiny_transformer(student=False)))
    with torch.no_grad():
        for p in student.parameters():  # non-zero guidance branch and log-variance, so every path is exercised
            p += 0.01 * torch.randn_like(p)
    return student


def make_pairs(n: int = 4) -> Pairs:
    g = torch.Generator().manual_seed(1)
    return Pairs(x_t=torch.randn(n, 4, 4, 4, generator=g) * SIGMA_DATA, t=torch.rand(n, generator=g) * 1.4 + 0.05,
                 velocity=torch.randn(n, 4, 4, 4, generator=g) * SIGMA_DATA, states=torch.randn(n, 16, 32, generator=g),
                 mask=torch.ones(n, 16, dtype=torch.long), guidance=torch.full((n,), 4.5), weight=torch.ones(n),
                 x0=torch.randn(n, 4, 4, 4, generator=g))


def step(student: Student) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(loss, gradients, EMA after one update from a zero-initialised copy), whole tensors."""
    loss, _ = scm_loss(student, make_pairs(), r=1.0)
    loss.backward()
    grads = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for name, p in student.named_parameters()}
    ema = student_from_teacher(tiny_transformer(student=False)).requires_grad_(False)
    for p in ema.parameters():
        p.data.zero_()
    ema_update(ema, student.transformer, DECAY)
    return loss.detach(), grads, ema.state_dict()


def sharded_rank(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        student = make_student()
        for block in student.transformer.transformer_blocks:
            fully_shard(block)
        fully_shard(student)
        assert any(p.to_local().numel() < p.numel() for p in student.parameters())  # really sharded
        loss, grads, ema = step(student)  # both ranks see the same pairs: the averaged gradient is the same
        if rank == 0:
            torch.save({"loss": loss, "grads": grads, "ema": ema}, out)
        dist.barrier()  # neither rank tears gloo down while the other still has collectives in flight
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_scm_loss_gradients_and_ema_under_fsdp2_equal_unsharded(tmp_path):
    expected_loss, expected_grads, expected_ema = step(make_student())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(sharded_rank, args=(port, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    torch.testing.assert_close(got["loss"], expected_loss, rtol=1e-5, atol=1e-6)
    assert set(got["grads"]) == set(expected_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for name, value in expected_ema.items():
        torch.testing.assert_close(got["ema"][name], value, rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().max() > 0 for n, g in expected_grads.items() if "guidance_embedder" in n)
