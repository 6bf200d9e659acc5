"""The generator: prompts and seeds -> images, for any pipeline folder, timed per stage.

Students (guidance embedded, Sana-Sprint layout) run the consistency sampler at 1-4 steps in one forward pass per
step; teachers run the flow sampler with classifier-free guidance. Each image depends only on its own seed,
prompt, steps, guidance and size, never on the batch around it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .pipeline import Pipeline
from .sampling import cfg_flow_model, flow_model, sample_consistency, sample_trigflow, seeded_noise, \
    teacher_sigmas, to_uint8

DEFAULT_GUIDANCE = 4.5  # Sana-Sprint's default embedded guidance and the middle of TBCM's {4, 4.5, 5}
STUDENT_MAX_STEPS = 4
TEACHER_DEFAULT_STEPS = 16


@dataclass
class Generation:
    images: torch.Tensor                                          # uint8 (B, H, W, 3)
    timings: dict[str, float] = field(default_factory=dict)      # seconds per stage for the whole batch


class Generator:
    def __init__(self, pipe: Pipeline, microbatch: int = 4):
        self.pipe = pipe
        self.microbatch = microbatch  # rows per transformer / VAE call; batches are padded to a multiple
        self.device = next(pipe.transformer.parameters()).device
        self.dtype = next(pipe.transformer.parameters()).dtype

    @property
    def default_steps(self) -> int:
        return 1 if self.pipe.is_student else TEACHER_DEFAULT_STEPS

    @property
    def max_steps(self) -> int:
        return STUDENT_MAX_STEPS if self.pipe.is_student else 100

    def check(self, steps: int, size: int) -> None:
        """Raise ValueError naming the field when a request cannot be served by this model."""
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"steps must be between 1 and {self.max_steps} for this model, got {steps}")
        if size % self.pipe.vae_factor or size < self.pipe.vae_factor:
            raise ValueError(f"size must be a positive multiple of {self.pipe.vae_factor}, got {size}")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pad(self, tensor: torch.Tensor, rows: int) -> torch.Tensor:
        """Pad dim 0 up to `rows` by repeating the last row (padded rows are computed, then dropped)."""
        extra = rows - len(tensor)
        return tensor if extra == 0 else torch.cat([tensor, tensor[-1:].expand(extra, *tensor.shape[1:])])

    def _latents(self, states, mask, scale, noise, generators, steps: int) -> torch.Tensor:
        pipe = self.pipe
        if pipe.is_student:
            embedded = (scale * pipe.transformer.config.guidance_embeds_scale).to(self.dtype)
            return sample_consistency(flow_model(pipe.transformer, states, mask, guidance=embedded), noise,
                                      generators, steps)
        null_states, null_mask = pipe.text.null(len(states))
        velocity = cfg_flow_model(pipe.transformer, states, mask, null_states.to(states), null_mask.to(mask),
                                  scale.to(self.dtype))
        return sample_trigflow(velocity, noise, teacher_sigmas(steps, pipe.flow_shift))

    @torch.inference_mode()
    def generate(self, prompts: list[str], seeds: list[int], steps: int | None = None,
                 guidance: float | list[float] = DEFAULT_GUIDANCE, size: int | None = None) -> Generation:
        """Images for prompts[i] with seeds[i]. The batch runs in chunks of exactly `microbatch` rows (the last
        one padded): CPU kernels pick different reduction orders for different batch sizes, so a fixed shape is
        what makes an image independent of the batch it lands in."""
        pipe, n = self.pipe, len(prompts)
        steps = self.default_steps if steps is None else steps
        size = pipe.default_size if size is None else size
        self.check(steps, size)
        scale = torch.as_tensor(guidance, dtype=torch.float32).expand(n).to(self.device)
        timings, t0 = {}, time.perf_counter()

        states, mask = pipe.text.encode(list(prompts))
        states, mask = states.to(self.device, self.dtype), mask.to(self.device)
        self._sync()
        timings["text_encoding"], t0 = time.perf_counter() - t0, time.perf_counter()

        side = size // pipe.vae_factor
        noise, generators = seeded_noise(seeds, (pipe.latent_channels, side, side))
        noise = noise.to(self.device, self.dtype)
        rows, chunks = self.microbatch, []
        for i in range(0, n, rows):
            part = slice(i, i + rows)
            real = len(noise[part])
            padded_generators = generators[part] + [torch.Generator()] * (rows - real)
            x0 = self._latents(*(self._pad(t[part], rows) for t in (states, mask, scale, noise)),
                               padded_generators, steps)
            chunks.append(x0[:real])
        x0 = torch.cat(chunks)
        self._sync()
        timings["transformer"], t0 = time.perf_counter() - t0, time.perf_counter()

        decoded = torch.cat([pipe.vae.decode(self._pad(x0[i:i + rows] / pipe.vae.config.scaling_factor, rows)
                                             .to(pipe.vae.dtype)).sample[: len(x0[i:i + rows])]
                             for i in range(0, n, rows)])
        images = to_uint8(decoded)
        timings["vae_decode"] = time.perf_counter() - t0
        return Generation(images, timings)
