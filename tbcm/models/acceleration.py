"""The one switch for our Triton kernels, so trainers and the generator decide the same way (and distill/ and
service/ reach kernels/ only through models/)."""
from __future__ import annotations

from tbcm import kernels


def maybe_install_kernels(transformer, enabled: bool | None = None) -> bool:
    """Install the kernels into a SanaTransformer2DModel when `enabled` (None: kernels.default_enabled(), i.e.
    on with CUDA and a working Triton, off on the CPU). Returns whether they are installed."""
    if kernels.default_enabled() if enabled is None else enabled:
        kernels.install(transformer)
        return True
    return False
