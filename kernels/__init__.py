"""Triton kernels for Sana-family transformers, with autograd and torch.func.jvp rules.

    kernels.install(transformer) / kernels.uninstall(transformer)   # swap into a SanaTransformer2DModel
    kernels.available(), kernels.reason()                            # can they run here, and why (not)
    kernels.default_enabled()                                        # default of the kernels flag
    kernels.CudaGraphRunner                                          # per-bucket CUDA-graph replay

This package imports nothing from the rest of the project. See docs/kernels.md.
"""

from kernels.cross_attention import softmax_attention, softmax_attention_with_tangent
from kernels.cuda_graphs import CudaGraphRunner
from kernels.sana_patch import install, installed, uninstall
from kernels.layer_norm_modulate import layer_norm_modulate
from kernels.linear_attention import linear_attention
from kernels.rms_norm import FusedRMSNorm, rms_norm
from kernels.utils import available, default_enabled, reason

__all__ = [
    "CudaGraphRunner", "FusedRMSNorm", "available", "default_enabled", "install", "installed",
    "layer_norm_modulate", "linear_attention", "reason", "rms_norm", "softmax_attention",
    "softmax_attention_with_tangent", "uninstall",
]
