"""Triton kernels for Sana-family transformers, with autograd and torch.func.jvp rules.

    kernels.install(transformer) / kernels.uninstall(transformer)   # swap into a SanaTransformer2DModel
    kernels.available(), kernels.reason()                            # can they run here, and why (not)
    kernels.default_enabled()                                        # default of the kernels flag
    kernels.CudaGraphRunner                                          # per-bucket CUDA-graph replay

The ops live in their modules, e.g. `from tbcm.kernels.linear_attention import linear_attention`:
rms_norm, layer_norm_modulate, linear_attention, cross_attention (softmax_attention and
softmax_attention_with_tangent); kernels.reference holds the plain-PyTorch versions.
This package imports nothing from the rest of the project. See docs/kernels.md.
"""

from tbcm.kernels.cuda_graphs import CudaGraphRunner
from tbcm.kernels.rms_norm import FusedRMSNorm
from tbcm.kernels.sana_patch import install, installed, uninstall
from tbcm.kernels.utils import available, default_enabled, reason

__all__ = ["CudaGraphRunner", "FusedRMSNorm", "available", "default_enabled", "install", "installed", "reason",
           "uninstall"]
