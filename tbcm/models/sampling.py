"""Samplers: a folder's own diffusers scheduler with CFG, the teacher's flow-Euler and TrigFlow samplers, and the
student's consistency sampler (diffusers' SCMScheduler).

All work on unit-variance latents x0' = latent * scaling_factor (TrigFlow multiplies by sigma_d inside). Noise
comes from one generator per image, so an image depends on its seed only, not on the batch it lands in. The
velocity functions take flow time s in [0, 1] and feed the transformer the timestep diffusers' Sana pipelines
feed it (`timestep_input_scale`), in the transformer's dtype; their output comes back in the state's dtype.
"""
from __future__ import annotations

import inspect

import torch
from diffusers import SanaSprintPipeline, SCMScheduler

from tbcm.models.trigflow import SIGMA_DATA, consistency_x0, flow_sigmas, trig_time, trigflow_from_flow, trigflow_step

FLOW_TRAIN_TIMESTEPS = 1000  # diffusers' flow schedulers (Sana's): scheduler timestep = sigma x num_train_timesteps
DENSE_TIMESTEP_SCALE = 1 / FLOW_TRAIN_TIMESTEPS  # a teacher fed flow time s itself (Sprint Sec. 3.2's dense time)
# SanaSprintPipeline's schedule defaults: max_timesteps (pi/2 to 5 decimals) and the 2-step intermediate time.
_SPRINT_CALL = inspect.signature(SanaSprintPipeline.__call__).parameters
SCM_MAX_TIME = _SPRINT_CALL["max_timesteps"].default
SCM_INTERMEDIATE_TIME = _SPRINT_CALL["intermediate_timesteps"].default
CM_STEPS = (1, 2, 3, 4)


def seeded_noise(seeds: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """One standard-normal tensor per seed, drawn from its own CPU generator (kept for later draws)."""
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in generators]), generators


def timestep_input_scale(transformer) -> float:
    """The transformer's `timestep` input per unit of flow time, as diffusers' Sana pipelines pass it.

    SanaPipeline passes the scheduler timestep (sigma x 1000) times `config.timestep_scale` (1.0 for Sana
    600M/1.6B, which embed t in [0, 1000]; 0.001 for dense-time teachers, Sprint Sec. 3.2); SanaSprintPipeline
    (a guidance-embedded transformer) passes flow time itself and ignores timestep_scale."""
    if transformer.config.guidance_embeds:
        return 1.0
    return FLOW_TRAIN_TIMESTEPS * float(transformer.config.timestep_scale)


def _call(transformer, x_s, states, mask, s, guidance=None):
    dtype = transformer.dtype
    timestep = s * timestep_input_scale(transformer)
    guidance = None if guidance is None else guidance.to(states.device, dtype)
    out = transformer(x_s.to(dtype), encoder_hidden_states=states.to(dtype), encoder_attention_mask=mask,
                      timestep=timestep, guidance=guidance, return_dict=False)[0]
    return out.to(x_s.dtype)


def flow_model(transformer, states, mask, guidance: torch.Tensor | None = None):
    """The transformer as a function v(x_s, s) of a flow-matching state and flow time (Sana's convention);
    `guidance` is the embedded guidance of a Sprint-layout transformer (w x guidance_embeds_scale)."""
    def v(x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return _call(transformer, x_s, states, mask, s, guidance)
    return v


def cfg_flow_model(transformer, states, mask, null_states, null_mask, scale: torch.Tensor,
                   guidance_max_sigma: float = 1.0):
    """Classifier-free guidance v = v_null + w (v_cond - v_null), both halves in one batch (Ho & Salimans eq. 6).

    `scale` has shape (B,): each prompt may have its own guidance scale; w <= 1 gives the conditional velocity,
    as SanaPipeline does (it guides only when guidance_scale > 1). Below 1, `guidance_max_sigma` limits guidance
    to flow times s <= it (the guidance interval of Kynkaanniemi et al. 2024): above it a sample gets the
    conditional velocity alone. Rows without guidance skip their unconditional half.
    """
    guides = scale > 1
    selective = guidance_max_sigma < 1 or not bool(guides.all())

    def v(x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        rows = (guides.to(s.device) & (s <= guidance_max_sigma)).nonzero().squeeze(1) if selective else slice(None)
        out = _call(transformer, torch.cat([x_s, x_s[rows]]), torch.cat([states, null_states[rows]]),
                    torch.cat([mask, null_mask[rows]]), torch.cat([s, s[rows]]))
        cond, null = out[:len(x_s)], out[len(x_s):]
        guided = null + scale.to(out.device)[rows].view(-1, 1, 1, 1).to(out.dtype) * (cond[rows] - null)
        return guided if not selective else cond.index_copy(0, rows, guided)
    return v


def fresh_scheduler(scheduler):
    """A new scheduler of the same class and config (diffusers schedulers keep per-run step state)."""
    return type(scheduler).from_config(scheduler.config)


@torch.no_grad()
def sample_scheduler(velocity, noise: torch.Tensor, scheduler, steps: int,
                     generators: list[torch.Generator] = ()) -> torch.Tensor:
    """The loop of diffusers' SanaPipeline with any diffusers scheduler: set_timesteps(steps), then for each
    timestep t the model output at flow time t / 1000 and `scheduler.step` (with the per-image generators when
    the step takes one, as SanaPipeline's extra_step_kwargs pass them)."""
    scheduler = fresh_scheduler(scheduler)
    scheduler.set_timesteps(steps, device=noise.device)
    extra = {"generator": list(generators)} if generators and "generator" in inspect.signature(
        scheduler.step).parameters else {}
    x = noise
    for t in scheduler.timesteps:
        s = (t.float() / FLOW_TRAIN_TIMESTEPS).expand(len(x))
        x = scheduler.step(velocity(x, s), t, x, **extra, return_dict=False)[0]
    return x


def teacher_sigmas(steps: int, shift: float) -> torch.Tensor:
    """Flow sigmas of an N-step teacher run, ending at 0 (float64)."""
    return torch.cat([flow_sigmas(steps, shift), torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def sample_flow_euler(velocity, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Euler steps of the flow ODE dx/ds = v from s = 1 to 0: x <- x + (s_next - s) v (rectified flow eq. 1)."""
    x = noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + float(s_next - s) * velocity(x, torch.full((len(x),), float(s), dtype=x.dtype))
    return x


def trigflow_trajectory(velocity, noise: torch.Tensor, times: torch.Tensor, record: bool = False):
    """Roll the TrigFlow PF-ODE from t = times[0] with DDIM steps through `times` and on to 0 (sCM eq. 10).

    `times` has shape (K,) or (B, K) (one decreasing route per sample). Returns (x0', states, velocities): with
    `record`, the state x_tk and velocity dx/dt at every time (K entries each; velocities are sigma_d F).
    """
    times = times.expand(len(noise), -1) if times.ndim == 1 else times
    x = noise * SIGMA_DATA
    states, velocities = [], []
    for k in range(times.shape[1]):
        t = times[:, k]
        v = SIGMA_DATA * trigflow_from_flow(velocity, x / SIGMA_DATA, t.to(x.dtype))
        if record:
            states.append(x)
            velocities.append(v)
        t_next = times[:, k + 1] if k + 1 < times.shape[1] else torch.zeros_like(t)
        x = trigflow_step(x, v, (t - t_next).to(x.dtype))
    return x / SIGMA_DATA, states, velocities


@torch.no_grad()
def sample_trigflow(velocity, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The same schedule as `sample_flow_euler`, integrated in TrigFlow time (TBCM's rollout route): identical up
    to rounding."""
    x0, _, _ = trigflow_trajectory(velocity, noise, trig_time(sigmas[:-1]).to(noise.dtype))
    return x0


def scm_schedule(steps: int, intermediate: tuple[float, ...] = ()) -> dict:
    """`SCMScheduler.set_timesteps` arguments: SanaSprintPipeline's defaults (max, intermediate 1.3, 0 at 2 steps;
    linspace(max, 0, steps + 1) otherwise), or the given times between max and 0 (custom timesteps)."""
    if steps not in CM_STEPS:
        raise ValueError(f"steps must be one of {list(CM_STEPS)}, got {steps}")
    if not intermediate:
        return {"max_timesteps": SCM_MAX_TIME, "intermediate_timesteps": SCM_INTERMEDIATE_TIME if steps == 2 else None}
    times = [SCM_MAX_TIME, *map(float, intermediate), 0.0]
    if len(times) != steps + 1 or not all(a > b for a, b in zip(times, times[1:])):
        raise ValueError(f"intermediate_times must hold steps - 1 = {steps - 1} decreasing times in "
                         f"(0, {SCM_MAX_TIME}), got {tuple(intermediate)}")
    return {"timesteps": times, "max_timesteps": None, "intermediate_timesteps": None}


def cm_times(steps: int, intermediate: tuple[float, ...] = ()) -> list[float]:
    """The student's sampling times, SCM_MAX_TIME down to 0, as SCMScheduler sets them (see `scm_schedule`)."""
    scheduler = SCMScheduler()
    scheduler.set_timesteps(steps, **scm_schedule(steps, intermediate))
    return scheduler.timesteps.tolist()


@torch.no_grad()
def sample_consistency(velocity, noise: torch.Tensor, generators: list[torch.Generator],
                       steps: int, intermediate: tuple[float, ...] = (), scheduler=None) -> torch.Tensor:
    """Multistep consistency sampling as SanaSprintPipeline runs it (sCM Alg. 1): x = sigma_d noise; at each time
    the model's x0 = f(x_t, t) (sCM eq. 9), then `SCMScheduler.step` re-noises to the next time with fresh noise
    from each image's generator. `scheduler` is the folder's SCMScheduler (its sigma_data), default SCMScheduler().
    """
    scheduler = SCMScheduler() if scheduler is None else fresh_scheduler(scheduler)
    scheduler.set_timesteps(steps, **scm_schedule(steps, intermediate))
    sigma = scheduler.config.sigma_data
    x = noise * sigma
    times = scheduler.timesteps.to(x.device)
    for i, t in enumerate(times[:-1]):
        tt = t.expand(len(x))
        v = sigma * trigflow_from_flow(velocity, x / sigma, tt)
        if i == len(times) - 2:  # the last step's output is the step's x0; its re-noising draw would be unused
            return consistency_x0(x, v, tt) / sigma
        x = scheduler.step(v, t, x, generator=list(generators), return_dict=False)[0]
    raise AssertionError("unreachable: the schedule ends at 0")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoded images in [-1, 1], (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
