"""Shared pieces of the Triton kernels: where they can run, launch settings, tile addressing.

Kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1:
each program runs with numpy; correct, slow, for tests). The package never sets that variable:
whoever wants the interpreter (the tests, a smoke benchmark) sets it before importing any kernel
module; without CUDA and without it, `available()` is False and `reason()` says why.
"""

import functools
import os

import torch
import triton
import triton.language as tl

# @triton.jit reads TRITON_INTERPRET when a kernel is defined, and every kernel module imports
# this one before defining any, so this is the mode the kernels are built in.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# tl.sum, tl.max and tl.zeros are themselves @triton.jit functions, built in the mode that was on
# when triton was first imported. diffusers imports triton, usually before the interpreter is
# switched on, and those functions then refuse to run inside interpreted kernels. The kernels
# call the builtin tl.reduce with tl.sum's and tl.max's own combine functions instead (which the
# interpreter recognises and runs with numpy), and tl.full(shape, 0.0, tl.float32) for zeros.
@triton.jit
def sum_over(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def max_over(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _probe_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1.0)


@functools.cache
def _cuda_probe_failure() -> str:
    """Compile and launch one tiny kernel; '' if it worked, else why not."""
    try:
        x = torch.zeros(1, device="cuda")
        _probe_kernel[(1,)](x)
        torch.cuda.synchronize()
    except Exception as error:  # any compiler or driver failure means "no kernels"
        return f"triton kernel failed to run on CUDA: {type(error).__name__}: {error}"
    return "" if x.item() == 1.0 else "triton probe kernel returned a wrong value"


def reason() -> str:
    """One line saying where the kernels run, or why they cannot."""
    if INTERPRETED:
        return f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors, slowly"
    if not torch.cuda.is_available():
        return "CUDA not available and the Triton interpreter is off (TRITON_INTERPRET=0): the kernels cannot run"
    failure = _cuda_probe_failure()
    return failure or f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def available() -> bool:
    """True when the kernels can run here (CUDA with a working Triton, or the interpreter)."""
    if INTERPRETED:
        return True
    return torch.cuda.is_available() and not _cuda_probe_failure()


def default_enabled() -> bool:
    """Default of the trainer's and generator's kernel flag: on for CUDA with a working Triton, off on CPU."""
    return not INTERPRETED and available()


def check_runnable(*tensors: torch.Tensor) -> None:
    """Raise a clear error before launching a kernel on tensors it cannot read."""
    on_cpu = any(t.device.type != "cuda" for t in tensors)
    if on_cpu and not INTERPRETED:
        raise RuntimeError(f"kernels need CUDA tensors here: {reason()}")


def row_settings(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for kernels that hold one whole row of n_cols in registers."""
    block = triton.next_power_of_2(n_cols)
    if block > 65536:
        raise ValueError(f"rows of {n_cols} elements do not fit one block")
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16
    return block, num_warps


def parallel_programs(tensor: torch.Tensor) -> int:
    """How many programs a persistent reduction kernel launches: a few per SM on CUDA."""
    if tensor.device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(tensor.device).multi_processor_count
    return 2


def head_block(head_dim: int) -> int:
    """Head dimension padded to a power of two of at least 16 (tl.dot's minimum); 72 -> 128."""
    return max(16, triton.next_power_of_2(head_dim))


class _PlainTensorCall(torch.autograd.Function):
    """Calls `launch(*args)` from a forward, where every tensor argument is a plain tensor."""

    @staticmethod
    def forward(launch, *args):
        return launch(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass


def call_on_plain_tensors(launch, *args):
    """Run a kernel launcher from inside a jvp or backward rule.

    Under torch.func transforms those rules receive functorch-wrapped tensors, which Triton
    cannot read; an autograd.Function's forward always receives the plain tensors underneath.
    What `launch` returns has no backward: differentiating a kernel's tangent or gradient again
    raises an error instead of giving a wrong answer.
    """
    return _PlainTensorCall.apply(launch, *args)


def zeros_if_none(tangent: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """torch.func passes None for inputs without a tangent; the kernels read zeros instead."""
    return torch.zeros_like(like) if tangent is None else tangent.contiguous()


@triton.jit
def head_tile(batch, head, start, n_rows, n_heads, head_dim, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and mask of rows [start, start+BLOCK_ROWS) of one head in a contiguous [B, N, H*d] tensor."""
    rows = start + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_stride = n_heads * head_dim
    offsets = batch * n_rows * row_stride + rows[:, None] * row_stride + head * head_dim + cols[None, :]
    mask = (rows[:, None] < n_rows) & (cols[None, :] < head_dim)
    return offsets, mask
