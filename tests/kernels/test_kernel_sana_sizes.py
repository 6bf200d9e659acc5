"""Every kernel in bf16 at Sana 600M and 1.6B widths with 1024 image and 300 caption tokens (CUDA only)."""

import pytest
import torch
from kernel_test_utils import check_against_reference, requires_cuda

from tbcm.kernels import reference
from tbcm.kernels.cross_attention import softmax_attention
from tbcm.kernels.layer_norm_modulate import layer_norm_modulate
from tbcm.kernels.linear_attention import linear_attention
from tbcm.kernels.rms_norm import rms_norm

pytestmark = [pytest.mark.gpu, requires_cuda]

SIZES = {"600M": (1152, 16, 72), "1.6B": (2240, 20, 112)}  # hidden, cross-attention heads, cross-attention head dim


@pytest.fixture(params=list(SIZES), ids=list(SIZES))
def size(request):
    torch.manual_seed(0)
    return SIZES[request.param]


def test_qk_rms_norm(size):
    hidden, _, _ = size
    check_against_reference(lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: reference.rms_norm(x, w, 1e-5),
                            [torch.randn(2, 1024, hidden), 1 + 0.1 * torch.randn(hidden)], torch.bfloat16)


def test_layer_norm_modulate(size):
    hidden, _, _ = size
    check_against_reference(layer_norm_modulate, reference.layer_norm_modulate,
                            [torch.randn(2, 1024, hidden), 0.1 * torch.randn(2, 1, hidden),
                             0.1 * torch.randn(2, 1, hidden)], torch.bfloat16)


def test_linear_attention(size):
    hidden, _, _ = size
    heads = hidden // 32
    check_against_reference(lambda *a: linear_attention(*a, heads),
                            lambda *a: reference.linear_attention(*a, heads),
                            [torch.randn(2, 1024, hidden) for _ in range(3)], torch.bfloat16)


def test_cross_attention(size):
    _, heads, head_dim = size
    keep = torch.ones(2, 300)
    keep[0, 120:] = 0
    bias = ((1 - keep) * -10000.0).cuda()
    check_against_reference(lambda *a: softmax_attention(*a, heads, bias),
                            lambda *a: reference.softmax_attention(*a, heads, bias),
                            [torch.randn(2, 1024, heads * head_dim), torch.randn(2, 300, heads * head_dim),
                             torch.randn(2, 300, heads * head_dim)], torch.bfloat16)
