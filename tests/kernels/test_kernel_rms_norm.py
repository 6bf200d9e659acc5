"""Fused RMSNorm against diffusers' RMSNorm: forward, input and weight gradients, tangents."""

import pytest
import torch
from diffusers.models.normalization import RMSNorm
from kernel_test_utils import DEVICE, DTYPES, check_against_reference, needs_cuda

from tbcm.kernels import reference
from tbcm.kernels.rms_norm import FusedRMSNorm, rms_norm

EPS = 1e-5


def diffusers_rms_norm(x, weight=None):
    return reference.rms_norm(x, weight, EPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 15, 64), (1, 77, 72), (3, 112)])
def test_with_weight_matches_diffusers(shape, dtype):
    torch.manual_seed(0)
    x, weight = torch.randn(shape), 1 + 0.5 * torch.randn(shape[-1])
    check_against_reference(lambda x, w: rms_norm(x, w, EPS), diffusers_rms_norm, [x, weight], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_weight_matches_diffusers(dtype):
    torch.manual_seed(0)
    check_against_reference(lambda x: rms_norm(x, None, EPS), diffusers_rms_norm, [3 * torch.randn(15, 40)], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)])
def test_half_precision_rounding_is_diffusers(dtype):
    # diffusers rounds x * rsqrt(mean(x^2) + eps) to the weight's dtype before the multiply
    torch.manual_seed(0)
    reference = RMSNorm(96, eps=EPS).to(DEVICE, dtype)
    with torch.no_grad():
        reference.weight.normal_()
    x = torch.randn(2, 5, 96, device=DEVICE, dtype=dtype)
    torch.testing.assert_close(FusedRMSNorm.sharing_parameters_of(reference)(x), reference(x), atol=0, rtol=0)


def test_output_dtype_follows_diffusers():
    x = torch.randn(4, 32, device=DEVICE, dtype=torch.float16)
    fp32_weight = torch.ones(32, device=DEVICE)
    assert rms_norm(x, fp32_weight, EPS).dtype == diffusers_rms_norm(x, fp32_weight).dtype == torch.float32
    assert rms_norm(x, None, EPS).dtype == torch.float16


def test_module_shares_the_diffusers_parameter():
    reference = RMSNorm(64, eps=1e-6)
    fused = FusedRMSNorm.sharing_parameters_of(reference)
    assert fused.weight is reference.weight and fused.eps == 1e-6
    assert list(fused.state_dict()) == list(reference.state_dict())
    with pytest.raises(ValueError):
        FusedRMSNorm.sharing_parameters_of(RMSNorm(64, eps=1e-6, bias=True))
