"""The student: a Sana-Sprint-layout copy of the teacher with a guidance embedding and a learned log-variance.

The student transformer is `SanaTransformer2DModel(guidance_embeds=True)` initialised from the teacher, with the
guidance embedder's last layer zeroed so that at step 0 it computes exactly the teacher's conditional velocity
(Sana-Sprint arXiv 2503.09641, §3.2 and Tab. 4: the CFG scale as an input). The log-variance head reads the
time(+guidance) embedding, as Sana's `logvar_linear` does (or, with `logvar_detached`, that embedding detached, so
that its gradient trains the head alone: docs/results.md, section 8), and is dropped at export.
"""
from __future__ import annotations

import copy
import warnings

import torch
from diffusers import SanaTransformer2DModel, SCMScheduler
from torch import nn

from tbcm.models.pipeline import Pipeline
from tbcm.models.sampling import DENSE_TIMESTEP_SCALE, flow_model, timestep_input_scale
from tbcm.models.trigflow import SIGMA_DATA, trigflow_from_flow

from tbcm.distill.config import DistillConfig

TEACHER_TIME_PREFIX = "time_embed.emb.timestep_embedder."  # AdaLayerNormSingle (teacher)
STUDENT_TIME_PREFIX = "time_embed.timestep_embedder."      # SanaCombinedTimestepGuidanceEmbeddings (student)


def teacher_weights_by_student_name(teacher: SanaTransformer2DModel) -> dict[str, torch.Tensor]:
    """The teacher's state dict under the student's parameter names (only the time embedder is renamed)."""
    return {k.replace(TEACHER_TIME_PREFIX, STUDENT_TIME_PREFIX): v for k, v in teacher.state_dict().items()}


def student_from_teacher(teacher: SanaTransformer2DModel,
                         guidance_scale: float = DistillConfig.guidance_embeds_scale) -> SanaTransformer2DModel:
    """Same architecture plus the guidance embedder, which reads guidance_scale x w; every teacher weight copied,
    the new branch zero at init."""
    if teacher.config.guidance_embeds:
        raise ValueError("the teacher already has a guidance embedding; distil from a CFG teacher")
    if timestep_input_scale(teacher) != 1.0:
        # SanaSprintPipeline feeds the student flow time s in [0, 1]; this teacher embeds 1000 s x timestep_scale,
        # so the student would not start as the teacher (Sana-Sprint Sec. 3.2 first fine-tunes it to dense time)
        warnings.warn(f"the teacher's timestep_scale is {teacher.config.timestep_scale}, so it embeds "
                      f"{timestep_input_scale(teacher):g} x flow time where its Sprint student embeds flow time "
                      f"itself: the student does not start as the teacher; a teacher fine-tuned to "
                      f"timestep_scale {DENSE_TIMESTEP_SCALE} (dense time, Sana-Sprint Sec. 3.2) does", stacklevel=2)
    student = SanaTransformer2DModel.from_config({**teacher.config, "guidance_embeds": True,
                                                  "guidance_embeds_scale": guidance_scale})
    missing, unexpected = student.load_state_dict(teacher_weights_by_student_name(teacher), strict=False)
    if unexpected or any(not k.startswith("time_embed.guidance_embedder.") for k in missing):
        raise ValueError(f"teacher -> student weight mapping failed: missing {missing}, unexpected {unexpected}")
    nn.init.zeros_(student.time_embed.guidance_embedder.linear_2.weight)
    nn.init.zeros_(student.time_embed.guidance_embedder.linear_2.bias)
    dtype = next(teacher.parameters()).dtype
    return student if dtype == torch.float32 else student.to(dtype)


def extrapolate_from_teacher(student: SanaTransformer2DModel, teacher: SanaTransformer2DModel,
                             scale: float) -> SanaTransformer2DModel:
    """A copy of the student at teacher + scale x (student - teacher); the guidance branch, which the teacher lacks,
    is kept as trained."""
    # theta_0 + a (theta_1 - theta_0): ExPO's model extrapolation (Zheng et al., ACL 2025, arXiv 2404.16792)
    start = teacher_weights_by_student_name(teacher)
    moved = copy.deepcopy(student)
    with torch.no_grad():
        for name, value in moved.state_dict().items():
            if name in start:
                origin = start[name].to(value)
                value.copy_(origin + scale * (value - origin))
    return moved


def freeze(transformer: SanaTransformer2DModel, parts: str) -> None:
    """Hold every parameter whose name contains one of the comma-separated `parts` at its current (teacher) value."""
    names = dict(transformer.named_parameters())
    for part in filter(None, (p.strip() for p in parts.split(","))):
        matched = [name for name in names if part in name]
        if not matched:
            raise ValueError(f"--frozen-modules: {part!r} is in no student parameter name (they look like "
                             f"{next(iter(names))!r})")
        for name in matched:
            names[name].requires_grad_(False)


class Student(nn.Module):
    """F_theta(x_t / sigma_d, t, caption, w) in TrigFlow units plus the adaptive-weight log-variance."""

    def __init__(self, transformer: SanaTransformer2DModel, logvar_detached: bool = False):
        super().__init__()
        self.transformer = transformer
        self.logvar_detached = logvar_detached  # the head's gradient stops at the embedding (DistillConfig)
        width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.logvar = nn.Linear(width, 1)  # w_phi(t) = -logvar (sCM eq. 14), on the time embedding
        nn.init.zeros_(self.logvar.weight)
        nn.init.zeros_(self.logvar.bias)
        self._embedding: torch.Tensor | None = None
        transformer.time_embed.register_forward_hook(self._keep_embedding)

    def _keep_embedding(self, module, inputs, output) -> None:
        self._embedding = output[1]

    def velocity(self, x_over_sigma: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor,
                 guidance: torch.Tensor) -> torch.Tensor:
        """F_theta through the flow->TrigFlow conversion; `guidance` is the CFG scale w (embedded as 0.1 w)."""
        embedded = guidance * self.transformer.config.guidance_embeds_scale
        return trigflow_from_flow(flow_model(self.transformer, states, mask, guidance=embedded.to(states.dtype)),
                                  x_over_sigma, t)

    def forward(self, x_over_sigma, t, states, mask, guidance) -> tuple[torch.Tensor, torch.Tensor]:
        velocity = self.velocity(x_over_sigma, t, states, mask, guidance)
        embedding = self._embedding.detach() if self.logvar_detached else self._embedding
        return velocity, self.logvar(embedding).view(-1)


def student_pipeline(teacher: Pipeline, transformer: SanaTransformer2DModel, info: dict | None = None) -> Pipeline:
    """The student as a servable pipeline: its transformer with the teacher's VAE, text encoder and info."""
    return Pipeline(transformer, teacher.vae, teacher.text, SCMScheduler(sigma_data=SIGMA_DATA),
                    {**teacher.info, **(info or {})}, None)
