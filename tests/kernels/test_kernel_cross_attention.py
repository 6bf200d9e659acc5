"""Flash-style softmax attention (with its one-pass JVP) against PyTorch's math attention."""

import pytest
import torch
from kernel_test_utils import DEVICE, DTYPES, assert_close, check_against_reference
from torch.nn.attention import SDPBackend, sdpa_kernel

from tbcm.kernels.cross_attention import softmax_attention, softmax_attention_with_tangent
from tbcm.kernels.reference import softmax_attention as reference


def padding_bias(batch, n_keys, kept):
    """diffusers' caption mask as a bias: 0 for the first `kept` keys of sample 0, -10000 after."""
    keep = torch.ones(batch, n_keys)
    keep[0, kept:] = 0
    return ((1 - keep) * -10000.0).to(DEVICE)


CASES = [  # batch, queries, keys, heads, head_dim, kept keys of sample 0 (None: no mask)
    (2, 15, 77, 2, 32, 40),
    (1, 77, 15, 1, 72, 9),
    (1, 20, 77, 1, 112, 50),
    (1, 999, 15, 1, 32, None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, n_queries, n_keys, heads, head_dim, kept", CASES)
def test_matches_math_attention(batch, n_queries, n_keys, heads, head_dim, kept, dtype):
    torch.manual_seed(0)
    q = torch.randn(batch, n_queries, heads * head_dim)
    k, v = (torch.randn(batch, n_keys, heads * head_dim) for _ in range(2))
    bias = None if kept is None else padding_bias(batch, n_keys, kept)
    check_against_reference(lambda *a: softmax_attention(*a, heads, bias), lambda *a: reference(*a, heads, bias),
                            [q, k, v], dtype)


def test_first_key_block_fully_masked():
    # the first 64-key tile is all -inf: the online softmax must not produce NaN from (-inf) - (-inf)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 15, 32), torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    bias = torch.zeros(1, 77)
    bias[:, :70] = float("-inf")
    check_against_reference(lambda *a: softmax_attention(*a, 1, bias.to(DEVICE)),
                            lambda *a: reference(*a, 1, bias.to(DEVICE)), [q, k, v], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_pass_output_and_tangent_with_query_tangent_only(dtype):
    # TBCM's case: captions carry no tangent, so only q has one in the cross-attention
    torch.manual_seed(0)
    heads, bias = 2, padding_bias(2, 30, 11)
    q, tq = (torch.randn(2, 17, 2 * 72, device=DEVICE, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(2, 30, 2 * 72, device=DEVICE, dtype=dtype) for _ in range(2))
    out, tout = softmax_attention_with_tangent(q, k, v, tq, None, None, heads, bias)
    with sdpa_kernel(SDPBackend.MATH):
        expected, expected_tangent = torch.func.jvp(
            lambda q: reference(q, k.float(), v.float(), heads, bias), (q.float(),), (tq.float(),))
    assert_close(out, expected, dtype, "output")
    assert_close(tout, expected_tangent, dtype, "tangent")
