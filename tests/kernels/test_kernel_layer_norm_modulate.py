"""LayerNorm + adaLN modulation against the PyTorch expression in diffusers' Sana block."""

import pytest
import torch
from kernel_test_utils import DTYPES, check_against_reference

from tbcm.kernels import reference as pytorch
from tbcm.kernels.layer_norm_modulate import layer_norm_modulate

EPS = 1e-6


def reference(x, scale, shift):
    return pytorch.layer_norm_modulate(x, scale, shift, EPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, tokens, width, modulation_batch", [(2, 15, 72, 2), (1, 77, 32, 1), (3, 4, 112, 1)])
def test_matches_pytorch(batch, tokens, width, modulation_batch, dtype):
    torch.manual_seed(0)
    x = 2 * torch.randn(batch, tokens, width) + 0.5
    scale, shift = (0.3 * torch.randn(modulation_batch, 1, width) for _ in range(2))
    check_against_reference(lambda *a: layer_norm_modulate(*a, EPS), reference, [x, scale, shift], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_modulation_chunks_of_a_table(dtype):
    # the block slices scale and shift out of one [B, 6, D] tensor: strided views, gradients into the table
    torch.manual_seed(0)

    def through_table(fn):
        return lambda x, table: fn(x, table[:, 1:2], table[:, 0:1])

    check_against_reference(through_table(lambda *a: layer_norm_modulate(*a, EPS)), through_table(reference),
                            [torch.randn(2, 15, 48), torch.randn(2, 6, 48)], dtype)
