"""The generator: prompts and seeds -> images, for any pipeline folder, timed per stage.

Students (guidance embedded, Sana-Sprint layout) run the consistency sampler (SCMScheduler semantics) at 1-4 steps
in one forward pass per step; teachers run, with classifier-free guidance, the scheduler their folder ships (as
diffusers' SanaPipeline does), or by choice flow-Euler or TBCM's TrigFlow route. Latents stay float32 and the
transformer runs in its own dtype, as in diffusers. Each image depends only on its own seed, prompt, steps,
guidance and size, never on the batch around it.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import torch

from tbcm.kernels.cuda_graphs import CudaGraphRunner, batch_chunks, pad_batch

from tbcm.models.acceleration import maybe_install_kernels
from tbcm.models.pipeline import Pipeline
from tbcm.models.sampling import cfg_flow_model, cm_times, flow_model, sample_consistency, sample_flow_euler, \
    sample_scheduler, sample_trigflow, seeded_noise, teacher_sigmas, to_uint8

DEFAULT_GUIDANCE = 4.5  # Sana-Sprint's default embedded guidance and the middle of TBCM's {4, 4.5, 5}
STUDENT_MAX_STEPS = 4
TEACHER_DEFAULT_STEPS = 16
# Teacher samplers: the folder's own diffusers scheduler, flow-Euler on the shifted sigmas, TBCM's TrigFlow route.
TEACHER_SAMPLERS = ("scheduler", "euler", "trigflow")


@dataclass
class Generation:
    images: torch.Tensor                                          # uint8 (B, H, W, 3)
    timings: dict[str, float] = field(default_factory=dict)      # seconds per stage for the whole batch
    latents: torch.Tensor | None = None                          # with keep_latents: the decoded x0, (B, C, h, w)
                                                                 #   float32, as the transformer sees it


def weak_method(method):
    """`method`, called through a weak reference to its object: a runner that holds it does not keep that object
    alive, so a Generator (and its pipeline's weights) is freed by reference counting once unused: no reference
    cycle, no full garbage collection needed after a hot swap (tests/service/test_service_runtime.py)."""
    ref = weakref.WeakMethod(method)
    return lambda *inputs: ref()(*inputs)


class Generator:
    """Runs a pipeline in fixed microbatches of `microbatch` rows (the last one padded): CPU and GPU kernels pick
    different reduction orders for different batch sizes, so one fixed shape is what makes an image independent
    of the batch it lands in. The one-step student path and the VAE decode go through `CudaGraphRunner` (CUDA
    graphs when CUDA is present, the same padded chunks eagerly otherwise); Triton kernels are installed behind
    `use_kernels` (default: on with CUDA)."""

    def __init__(self, pipe: Pipeline, microbatch: int = 4, use_kernels: bool | None = None,
                 intermediate_times: tuple[float, ...] = (), sampler: str = "scheduler"):
        if sampler not in TEACHER_SAMPLERS:
            raise ValueError(f"sampler must be one of {TEACHER_SAMPLERS}, got {sampler!r}")
        if sampler != "scheduler" and pipe.is_student:
            raise ValueError(f"sampler {sampler!r} is a teacher's; a student samples with its SCMScheduler")
        self.pipe = pipe
        self.microbatch = microbatch
        self.sampler = sampler
        self.intermediate_times = tuple(intermediate_times)  # students' multistep times; (): the defaults
        self.device = next(pipe.transformer.parameters()).device
        self.dtype = next(pipe.transformer.parameters()).dtype
        self.kernels_installed = maybe_install_kernels(pipe.transformer, use_kernels)
        self.one_step = CudaGraphRunner(weak_method(self._one_step), batch_buckets=(microbatch,))
        self.decode = CudaGraphRunner(weak_method(self._decode), batch_buckets=(microbatch,))

    @property
    def captures_graphs(self) -> bool:
        """Whether its calls capture CUDA graphs (a call that captures must have the device alone)."""
        return self.one_step.available and self.device.type == "cuda"

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
        if self.intermediate_times and not self.pipe.is_student:
            raise ValueError("intermediate_times are a student's sampling times; this model is a flow teacher")
        if self.intermediate_times:
            cm_times(steps, self.intermediate_times)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _velocity(self, states, mask, scale):
        pipe = self.pipe
        if pipe.is_student:  # SanaSprintPipeline: w in the text dtype, times guidance_embeds_scale
            embedded = scale.to(self.dtype) * pipe.transformer.config.guidance_embeds_scale
            return flow_model(pipe.transformer, states, mask, guidance=embedded)
        null_states, null_mask = pipe.text.null(len(states))
        return cfg_flow_model(pipe.transformer, states, mask, null_states.to(states), null_mask.to(mask), scale)

    def _one_step(self, noise, states, mask, scale) -> torch.Tensor:
        return sample_consistency(self._velocity(states, mask, scale), noise, [], 1, scheduler=self.pipe.scheduler)

    def _decode(self, x0: torch.Tensor) -> torch.Tensor:
        """diffusers' decode: latents cast to the VAE dtype, then divided by its scaling factor."""
        return self.pipe.vae.decode(x0.to(self.pipe.vae.dtype) / self.pipe.vae.config.scaling_factor).sample

    def _teacher(self, velocity, noise, generators, steps: int) -> torch.Tensor:
        if self.sampler == "scheduler":
            return sample_scheduler(velocity, noise, self.pipe.scheduler, steps, generators)
        sampler = sample_flow_euler if self.sampler == "euler" else sample_trigflow
        return sampler(velocity, noise, teacher_sigmas(steps, self.pipe.flow_shift))

    def _multi_step(self, noise, states, mask, scale, generators, steps: int) -> torch.Tensor:
        """Students at 2-4 steps (fresh noise per step from each image's generator) and teachers, eagerly."""
        rows, chunks = self.microbatch, []
        for start, stop in batch_chunks(len(noise), rows):
            padded = [pad_batch(t[start:stop], rows) for t in (noise, states, mask, scale)]
            velocity = self._velocity(*padded[1:])
            gens = generators[start:stop] + [torch.Generator()] * (rows - (stop - start))
            if self.pipe.is_student:
                x0 = sample_consistency(velocity, padded[0], gens, steps, self.intermediate_times,
                                        scheduler=self.pipe.scheduler)
            else:
                x0 = self._teacher(velocity, padded[0], gens, steps)
            chunks.append(x0[: stop - start])
        return torch.cat(chunks)

    @torch.inference_mode()
    def generate(self, prompts: list[str], seeds: list[int], steps: int | None = None,
                 guidance: float | list[float] = DEFAULT_GUIDANCE, size: int | None = None,
                 keep_latents: bool = False) -> Generation:
        """Images for prompts[i] with seeds[i]; one call shares steps and size, guidance may differ per image.
        `keep_latents` also returns the decoded latents (a CPU copy, off the serving path)."""
        pipe, n = self.pipe, len(prompts)
        if n == 0 or n != len(seeds):
            raise ValueError(f"prompts and seeds must be non-empty lists of equal length, got {n} and {len(seeds)}")
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
        noise = noise.to(self.device)  # float32, as diffusers' prepare_latents draws it
        if pipe.is_student and steps == 1:
            x0 = self.one_step(noise, states, mask, scale)
        else:
            x0 = self._multi_step(noise, states, mask, scale, generators, steps)
        self._sync()
        timings["transformer"], t0 = time.perf_counter() - t0, time.perf_counter()

        images = to_uint8(self.decode(x0))
        timings["vae_decode"] = time.perf_counter() - t0
        latents = x0.float().cpu() if keep_latents else None  # a copy: a CUDA graph reuses its output buffer
        return Generation(images, timings, latents)
