"""The configs of distillation: every knob of a run, defined once and saved with every checkpoint, and the
rollout bank's own."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tbcm.models.training import TrainConfig

from tbcm.distill.recipes import recipe_overrides


@dataclass
class DistillConfig(TrainConfig):
    # the shared training knobs at distillation's defaults (grad_clip 0.1: Sana-Sprint Alg. 2 and TBCM's config)
    steps: int = 250
    warmup_steps: int = 20
    grad_clip: float = 0.1
    checkpoint_every: int = 50
    recipe: str = ""                      # the named preset the run starts from (tbcm/distill/recipes.py: tbcm,
                                          #   tbcm+dmd, tbcm+synthetic, tbcm+synthetic+dmd, synthetic-scm,
                                          #   synthetic-scm+dmd, data-scm, data-scm+dmd); options given beside it
                                          #   override its values; "": none
    teacher: str = "teacher"              # teacher pipeline folder or shipped name
    prompts: str = "world"                # prompt file (one per line, or .jsonl with "prompt" keys; no images, no
                                          #   evaluator), or "world": the embedded world's captions, renders and,
                                          #   for a shapes-world teacher, evaluator (tbcm/cli/distill.py)
    out: str = "runs/distill"             # run folder: checkpoint, metrics.jsonl, samples, export/
    pairs: str = "trajectory"             # "trajectory" (TBCM, image-free) or "data" (sCM on captioned images)
    rollouts: str | None = None           # folder of `tbcm rollout` shards to read instead of rolling out
    time_budget_s: float = 0.0            # also stop once training time (evals excluded) reaches this; 0: off
    fit_schedule_to_budget: bool = False  # run the step schedule (warm-ups, calm-down, cosine) over the
                                          #   budget: position = steps x time spent / time_budget_s
    prompts_per_step: int = 8             # prompts per step per rank (TBCM) / images are prompts x points (data)
    route_points: int = 16                # K, points of the reference route (teacher NFE = 2K per prompt)
    points_per_trajectory: int = 15       # trajectory states trained on per prompt, 0..K-1 (0: re-noised endpoints
                                          #   only); with --pairs data, images per prompt
    renoised_per_trajectory: int = 0      # extra pairs per prompt off the trajectory: its endpoint re-noised at a
                                          #   log-normal t, with a fresh teacher CFG velocity (1 CFG call each)
    endpoint_weight: float = 0.0          # L += this x ||f(z, pi/2) - x0'||^2 / sigma_d^2: each rollout's start noise
                                          #   mapped in one step onto its own endpoint (TBCM pairs only; 0: off)
    dmd_weight: float = 0.0               # L += this x DMD's reverse-divergence term on the one-step samples, with a
                                          #   fake denoiser trained on them alongside (rCM; 0: off): from each
                                          #   rollout's start noise, or with --pairs data fresh noise per prompt
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
    weight_decay: float = 0.0             # AdamW weight decay
    clip_logvar_apart: bool = False       # clip the log-variance head's gradient on its own, not with the student's
    tangent_warmup: int = 100             # r = min(1, step / tangent_warmup) (sCM §4.2, tangent warmup)
    calm_down_start: int = 10**9          # step at which r starts moving to final_r (TBCM's config: 15000)
    calm_down_steps: int = 2000           # length of that linear move (TBCM's config: 2000)
    final_r: float = 0.75                 # r after the calm-down (TBCM's config: 0.75)
    learn_logvar: bool = True             # learn the log-variance weighting (sCM eq. 14); off: logvar stays 0
    logvar_detached: bool = False         # the log-variance head reads the time embedding detached, so its gradient
                                          #   trains the head only; off: as Sana's logvar_linear, it also trains
                                          #   the transformer's time and guidance embedders (docs/results.md, §8)
    logvar_min: float | None = None       # lower bound on the learned logvar, i.e. at most e^-min extra weight
    prior_weight: str = "tan"             # per-pair prior: "tan" = 1/(sigma_d tan t) (sCM eq. 14), "uniform" = 1
    degenerate_std: float = 0.05          # an endpoint whose latent spatial std is below this is near-constant
    frozen_modules: str = ""              # parameters named with any of these comma-separated parts stay the teacher's
                                          #   (e.g. "attn2,caption": the text pathway); "": train every one
    export_extrapolation: float = 1.0     # export teacher + this x (EMA student - teacher) (ExPO); 1: as trained
                                          #   (past 1 it carries the training's weight change further)
    sample_every: int = 100               # steps between sample grids (1, 2 and 4 steps)
    eval_every: int = 100                 # steps between evaluations of the student (0: off): teacher agreement
                                          #   and, for a shapes-world teacher, the evaluator's 1-step FD, in
                                          #   eval_curve.jsonl
    eval_n: int = 256                     # images per periodic shapes-evaluator evaluation
    agreement_n: int = 8                  # images of the teacher-agreement evaluation (the sample prompts cycled,
                                          #   seeds 0..n-1; tbcm/distill/agreement.py), periodic and at export; 0: off
    ladd: bool = False                    # add Sana-Sprint's adversarial branch (Sana-Sprint §3.3; TBCM pairs use
                                          #   their rollout endpoints as the real side)
    ladd_weight: float = 0.5              # L = L_sCM + ladd_weight L_G (Sana-Sprint Tab. 5)
    ladd_lr: float = 1e-4                 # AdamW learning rate of the discriminator heads (constant)

    # knobs removed since runs were saved, with the value each is fixed at now (a saved run with another value
    # cannot be resumed or exported; tbcm.models.training.saved_config)
    retired: ClassVar[dict] = {"tangent_norm_c": 0.1, "use_kernels": None, "mixed_precision": "no",
                               "ladd_blocks": (), "ladd_p_mean": -0.6, "ladd_p_std": 1.0, "ladd_max_time_prob": 0.5}

    def __post_init__(self):
        """Refuse a bad combination when the config is built: before any rollout, and never after training."""
        if self.pairs not in ("trajectory", "data"):
            raise ValueError(f"--pairs must be 'trajectory' or 'data', got {self.pairs!r}")
        if (self.logvar_min is not None or self.logvar_detached) and not self.learn_logvar:
            raise ValueError("--logvar-min and --logvar-detached shape the learned weighting: drop them or drop "
                             "--no-learn-logvar")
        if self.renoised_per_trajectory < 0 or (self.renoised_per_trajectory and self.pairs == "data"):
            raise ValueError("--renoised-per-trajectory must be >= 0, and 0 with --pairs data (it re-noises "
                             f"trajectory endpoints), got {self.renoised_per_trajectory}")
        recipe_overrides(self.recipe)  # an unknown --recipe is named
        if self.dmd_weight < 0:
            raise ValueError(f"--dmd-weight must be >= 0, got {self.dmd_weight}")
        if self.endpoint_weight < 0 or (self.endpoint_weight and self.pairs == "data"):
            raise ValueError("--endpoint-weight must be >= 0, and 0 with --pairs data (it needs each rollout's start "
                             f"noise and endpoint), got {self.endpoint_weight}")
        if self.points_per_trajectory < (0 if self.pairs == "trajectory" and self.renoised_per_trajectory else 1):
            raise ValueError("--points-per-trajectory must be >= 1 (with --pairs data: images per prompt), or 0 with "
                             f"--renoised-per-trajectory (re-noised endpoints only), got {self.points_per_trajectory}")
        if self.ladd and self.points_per_trajectory < 1:  # its generator branch takes one pair per prompt
            raise ValueError("--ladd needs --points-per-trajectory >= 1")
        if self.fit_schedule_to_budget and self.time_budget_s <= 0:
            raise ValueError("--fit-schedule-to-budget runs the schedule over the time budget: give --time-budget-s "
                             f"> 0, got {self.time_budget_s}")
        if not self.export_extrapolation > 0:
            raise ValueError(f"--export-extrapolation must be > 0 (1: the student as trained), "
                             f"got {self.export_extrapolation}")
        if self.text_microbatch < 1:
            raise ValueError(f"--text-microbatch must be >= 1 (captions per encoder pass), got {self.text_microbatch}")
        if self.agreement_n < 0:
            raise ValueError(f"--agreement-n must be >= 0 (0: no teacher agreement), got {self.agreement_n}")
        if not 0 < self.guidance_max_sigma <= 1:
            raise ValueError(f"--guidance-max-sigma is a flow sigma in (0, 1] (1: CFG at every step), "
                             f"got {self.guidance_max_sigma}")


    @classmethod
    def from_recipe(cls, recipe: str = "", **explicit) -> "DistillConfig":
        """The config of recipe `recipe` ("": the defaults) with the `explicit` values over it, the name recorded."""
        return cls(**(recipe_overrides(recipe) | {"recipe": recipe} | explicit))


@dataclass
class RolloutConfig:
    shards: int = 4              # shard files to write
    prompts_per_shard: int = 64  # rollouts per shard
    batch_size: int = 16         # prompts rolled out together
