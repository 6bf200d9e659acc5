"""Fused ReLU linear attention against diffusers' SanaLinearAttnProcessor2_0 maths."""

import pytest
import torch
from kernel_test_utils import DTYPES, check_against_reference

from tbcm.kernels import reference
from tbcm.kernels.linear_attention import linear_attention


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, tokens, heads, head_dim", [(2, 15, 2, 32), (1, 77, 1, 72), (1, 999, 1, 32)])
def test_matches_diffusers_maths(batch, tokens, heads, head_dim, dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, tokens, heads * head_dim) for _ in range(3))
    check_against_reference(lambda *a: linear_attention(*a, heads), lambda *a: reference.linear_attention(*a, heads),
                            [q, k, v], dtype)


def test_rows_with_no_positive_query_give_zero():
    # phi(q) = 0 makes num = den = 0; diffusers' eps gives 0 / 1e-15 = 0, not NaN
    q = -torch.rand(1, 15, 32)
    k, v = torch.randn(1, 15, 32), torch.randn(1, 15, 32)
    out = linear_attention(q, k, v, heads=1)
    assert torch.equal(out, torch.zeros_like(out))
