"""The one config of a distillation run: every knob, defined once, saved with every checkpoint."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistillConfig:
    teacher: str = "teacher"              # teacher pipeline folder or shipped name
    prompts: str = "world"                # prompt file (one per line) or "world" (training-split captions)
    out: str = "runs/distill"             # run folder: checkpoint, metrics.jsonl, samples, export/
    pairs: str = "trajectory"             # "trajectory" (TBCM, image-free) or "data" (sCM on real world images)
    rollouts: str | None = None           # folder of `tbcm rollout` shards to read instead of rolling out
    seed: int = 0                         # everything is a function of it (per rank: seed + rank)
    steps: int = 250                      # optimizer steps
    time_budget_s: float = 0.0            # also stop once training time (evals excluded) reaches this; 0: off
    fit_schedule_to_budget: bool = False  # run the step schedule (warm-ups, calm-down, cosine) over the
                                          #   budget: position = steps x time spent / time_budget_s
    prompts_per_step: int = 8             # prompts per step per rank (TBCM) / images are prompts x points (data)
    route_points: int = 16                # K, points of the reference route (teacher NFE = 2K per prompt)
    points_per_trajectory: int = 15       # trajectory states trained on per prompt, 1..K-1
    renoised_per_trajectory: int = 0      # extra pairs per prompt off the trajectory: its endpoint re-noised at a
                                          #   log-normal t, with a fresh teacher CFG velocity (1 CFG call each)
    endpoint_weight: float = 0.0          # L += this x ||f(z, pi/2) - x0'||^2 / sigma_d^2: each rollout's start noise
                                          #   mapped in one step onto its own endpoint (TBCM pairs only; 0: off)
    dmd_weight: float = 0.0               # L += this x DMD's reverse-divergence term on the one-step samples, with a
                                          #   fake denoiser trained on them alongside (rCM; TBCM pairs only; 0: off)
    dmd_fake_lr: float = 1e-4             # AdamW learning rate of the fake denoiser (constant)
    dmd_fake_updates: int = 1             # fake-denoiser steps per student step (DMD2 uses 5, rCM 4)
    dmd_shift: float = 5.0                # the term's noise times: flow time U(0, 1) shifted by this (rCM: 5)
    time_sampling: str = "route"          # "route" (jittered reference route), "lognormal" or "uniform"
    cfg_scales: tuple = (4.0, 4.5, 5.0)   # teacher CFG scale drawn per prompt, embedded into the student
    text_microbatch: int = 16             # captions per text-encoder pass, padded with "" to this fixed shape (a
                                          #   caption's states never depend on its company; 1: one at a time)
    guidance_embeds_scale: float = 0.1    # the student's guidance embedder reads this x the CFG scale (Sprint: 0.1)
    guidance_max_sigma: float = 1.0       # the teacher's CFG acts only at flow sigma <= this, conditioned alone
                                          #   above (guidance interval); 1: everywhere (rollouts, pairs, DMD)
    p_mean: float = -0.8                  # log-normal TrigFlow proposal tan t = e^tau / sigma_d, tau ~ N(p_mean,
    p_std: float = 1.6                    #   p_std^2): data pairs and --time-sampling lognormal (sCM App. G)
    lr: float = 1e-4                      # AdamW learning rate (after warm-up)
    warmup_steps: int = 20                # linear LR warm-up
    cosine_decay: bool = False            # after warm-up, anneal the lr to 0 at `steps` (else constant)
    weight_decay: float = 0.0             # AdamW weight decay
    grad_clip: float = 0.1                # max global grad norm (Sana-Sprint / TBCM)
    clip_logvar_apart: bool = False       # clip the log-variance head's gradient on its own, not with the student's
    tangent_warmup: int = 100             # r = min(1, step / tangent_warmup) (sCM §4.2)
    calm_down_start: int = 10**9          # step at which r starts moving to final_r (TBCM config: 15000)
    calm_down_steps: int = 2000           # length of that linear move
    final_r: float = 0.75                 # r after the calm-down
    tangent_norm_c: float = 0.1           # g <- g / (||g|| + c), per sample (sCM §4.2)
    learn_logvar: bool = True             # learn the log-variance weighting (sCM eq. 14); off: logvar stays 0
    logvar_min: float | None = None       # lower bound on the learned logvar, i.e. at most e^-min extra weight
    prior_weight: str = "tan"             # per-pair prior: "tan" = 1/(sigma_d tan t) (sCM eq. 14), "uniform" = 1
    degenerate_std: float = 0.05          # an endpoint whose latent spatial std is below this is near-constant
    frozen_modules: str = ""              # parameters named with any of these comma-separated parts stay the teacher's
                                          #   (e.g. "attn2,caption": the text pathway); "": train every one
    ema_decay: float = 0.99               # EMA of the exported student
    export_extrapolation: float = 1.0     # export teacher + this x (EMA student - teacher) (ExPO); 1: as trained
                                          #   (past 1 it carries the training's weight change further)
    sample_every: int = 100               # steps between sample grids (1, 2 and 4 steps)
    checkpoint_every: int = 50            # steps between atomic checkpoints
    eval_every: int = 100                 # steps between FD/accuracy evaluations (0: off): FD-vs-time curves
    eval_n: int = 256                     # images per periodic evaluation
    use_kernels: bool | None = None       # Triton kernels in the student (default: on with CUDA, off on CPU)
    mixed_precision: str = "no"           # accelerate mixed precision: "no", "fp16" or "bf16"
    ladd: bool = False                    # add Sana-Sprint's adversarial branch (distill-spec §6; real = endpoints)
    ladd_weight: float = 0.5              # L = L_sCM + ladd_weight L_G (Sprint Tab. 5)
    ladd_blocks: tuple = ()               # teacher blocks feeding a discriminator head; () = 4 evenly spaced
    ladd_lr: float = 1e-4                 # AdamW learning rate of the discriminator heads (constant)
    ladd_p_mean: float = -0.6             # discriminator re-noising time: log-normal TrigFlow proposal with
    ladd_p_std: float = 1.0               #   (ladd_p_mean, ladd_p_std) (Sprint Tab. 8)
    ladd_max_time_prob: float = 0.5       # generator input t set to pi/2 with this probability (Sprint Tab. 6)

    def __post_init__(self):
        """Refuse a bad combination when the config is built: before any rollout, and never after training."""
        if self.pairs not in ("trajectory", "data"):
            raise ValueError(f"--pairs must be 'trajectory' or 'data', got {self.pairs!r}")
        if self.logvar_min is not None and not self.learn_logvar:
            raise ValueError("--logvar-min bounds the learned weighting: drop it or drop --no-learn-logvar")
        if self.pairs == "data" and self.prompts != "world":
            raise ValueError("--pairs data needs captioned images: only --prompts world provides them")
        if self.renoised_per_trajectory < 0 or (self.renoised_per_trajectory and self.pairs == "data"):
            raise ValueError("--renoised-per-trajectory must be >= 0, and 0 with --pairs data (it re-noises "
                             f"trajectory endpoints), got {self.renoised_per_trajectory}")
        for knob in ("endpoint_weight", "dmd_weight"):  # both act on the one-step samples of the rollouts' noise
            if getattr(self, knob) < 0 or (getattr(self, knob) and self.pairs == "data"):
                raise ValueError(f"--{knob.replace('_', '-')} must be >= 0, and 0 with --pairs data (it needs each "
                                 f"rollout's start noise), got {getattr(self, knob)}")
        if self.fit_schedule_to_budget and self.time_budget_s <= 0:
            raise ValueError("--fit-schedule-to-budget runs the schedule over the time budget: give --time-budget-s "
                             f"> 0, got {self.time_budget_s}")
        if not self.export_extrapolation > 0:
            raise ValueError(f"--export-extrapolation must be > 0 (1: the student as trained), "
                             f"got {self.export_extrapolation}")
        if self.text_microbatch < 1:
            raise ValueError(f"--text-microbatch must be >= 1 (captions per encoder pass), got {self.text_microbatch}")
        if not 0 < self.guidance_max_sigma <= 1:
            raise ValueError(f"--guidance-max-sigma is a flow sigma in (0, 1] (1: CFG at every step), "
                             f"got {self.guidance_max_sigma}")
