"""Shared test helpers: device, dtypes with tolerances, and the kernel-vs-reference check."""

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch.nn.attention import SDPBackend, sdpa_kernel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_cuda = [pytest.mark.gpu, requires_cuda]  # marks for a pytest.param

# bf16 is unreliable in Triton's interpreter, so it is tested on CUDA only
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)]
TOLERANCES = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """|actual - expected| <= tol * max(1, max|expected|) elementwise, tol set by the kernel's dtype."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item())
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= TOLERANCES[dtype] * scale, f"{what}: max error {error:.3g} (scale {scale:.3g}, {dtype})"


def check_against_reference(fn, reference, inputs: list[torch.Tensor], dtype: torch.dtype) -> None:
    """fn's output, gradients for every input, and forward-mode tangent (torch.func.jvp and the dual tensors of
    torch.autograd.forward_ad, which the trainer uses) match reference's.

    fn runs on the inputs in `dtype`; reference runs in fp32 on the same (rounded) values, so
    the comparison measures the kernel's own error. Softmax references use PyTorch's math
    attention backend, the one that supports forward-mode AD.
    """
    generator = torch.Generator().manual_seed(1)
    inputs = [x.to(DEVICE, dtype) for x in inputs]
    leaves = [x.clone().requires_grad_() for x in inputs]
    reference_leaves = [x.float().requires_grad_() for x in inputs]
    with sdpa_kernel(SDPBackend.MATH):
        output = fn(*leaves)
        expected = reference(*reference_leaves)
        assert output.dtype == dtype
        assert_close(output, expected, dtype, "forward")

        cotangent = torch.randn(expected.shape, generator=generator).to(DEVICE)
        grads = torch.autograd.grad(output, leaves, cotangent.to(dtype))
        expected_grads = torch.autograd.grad(expected, reference_leaves, cotangent)
        for index, (grad, expected_grad) in enumerate(zip(grads, expected_grads)):
            assert_close(grad, expected_grad, dtype, f"gradient of input {index}")

        tangents = [torch.randn(x.shape, generator=generator).to(DEVICE, dtype) for x in inputs]
        with torch.no_grad():
            primal, tangent = torch.func.jvp(fn, tuple(inputs), tuple(tangents))
            _, expected_tangent = torch.func.jvp(
                reference, tuple(x.float() for x in inputs), tuple(t.float() for t in tangents))
            with fwad.dual_level():
                dual_tangent = fwad.unpack_dual(fn(*map(fwad.make_dual, inputs, tangents))).tangent
        assert_close(primal, expected, dtype, "jvp primal")
        assert_close(tangent, expected_tangent, dtype, "jvp tangent")
        assert_close(dual_tangent, expected_tangent, dtype, "dual-tensor tangent")
