"""tbcm: Trajectory-Backward Consistency Model distillation of Sana-family text-to-image models, and serving.

Components (each its own sub-package): `tbcm.kernels` (Triton kernels, imports nothing of ours), `tbcm.models`
(the Sana model core), `tbcm.world` (the embedded shapes world), `tbcm.distill` (the trainer), `tbcm.service`
(the HTTP service) and `tbcm.cli` (the `tbcm` command, which wires them together).
"""
