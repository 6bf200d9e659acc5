"""`tbcm distill`: the TBCM trainer (and the data-based sCM baseline), one process or many under accelerate.

Each step: pairs (teacher rollouts, precomputed rollout shards, or noised captioned images) -> sCM loss with one
JVP and one differentiable forward -> clipped AdamW step, skipped when the gradient norm is not finite -> EMA.
Every rank rolls out its own prompts (seeded by rank); gradients are averaged by DDP, or reduced by FSDP when the
accelerate config shards the student (FSDP version 2; the JVP pass runs through the sharded model). The loop,
its atomic checkpoints and exact `--resume` are the shared ones (tbcm.models.training.TrainingRun). Prompts,
captioned images and the evaluator come from `Sources` (tbcm.distill.sources): the trainer knows no domain.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import broadcast

from tbcm.models.acceleration import maybe_install_kernels
from tbcm.models.generator import Generator
from tbcm.models.pipeline import Pipeline
from tbcm.models.training import RESUME_MAY_CHANGE, TrainingRun, clipped_update, ema_update, learning_rate, save_grid

from tbcm.distill.agreement import NAME as AGREEMENT
from tbcm.distill.agreement import TeacherReference, teacher_agreement, teacher_reference
from tbcm.distill.config import DistillConfig
from tbcm.distill.dmd import dmd_loss, fake_denoiser, fake_denoiser_loss
from tbcm.distill.ladd import Discriminator, discriminator_loss, generator_loss, one_per_prompt
from tbcm.distill.loss import endpoint_loss, one_step, prior_weight, scm_loss, tangent_r
from tbcm.distill.pairs import concat_pairs, data_pairs, degenerate_weight, noise_starts, pairs_from_rollout, \
    renoised_endpoint_pairs, rollout, start_pairs
from tbcm.distill.rollout import RolloutShards
from tbcm.distill.sources import Sources
from tbcm.distill.student import Student, freeze, student_from_teacher, student_pipeline
from tbcm.distill.teacher import load_teacher, teacher_fingerprint


class Distiller(TrainingRun):
    def __init__(self, config: DistillConfig, sources: Sources, resume: bool = False):
        prior_weight(torch.ones(1), config.prior_weight)  # a wrong --prior-weight is named before any rollout
        if config.pairs == "trajectory" and config.points_per_trajectory > config.route_points - 1:
            raise ValueError(f"--points-per-trajectory must be at most K-1 = {config.route_points - 1} "
                             f"(--route-points {config.route_points}), got {config.points_per_trajectory}")
        if config.pairs == "data" and sources.images is None:
            raise ValueError(f"--pairs data needs captioned images, and --prompts {config.prompts} gives prompts "
                             "only; use --pairs trajectory (image-free)")
        self.sources = sources
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        if (config.ladd or config.dmd_weight) and self.accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("--ladd and --dmd-weight run with DDP only: accelerate's FSDP version 2 prepares one "
                             "model per run, and the LADD heads or DMD's fake denoiser would be a second")
        self.teacher = load_teacher(config, self.accelerator.device)
        self.shards = RolloutShards(config.rollouts, config, teacher_fingerprint(self.teacher)["transformer_sha256"]) \
            if config.rollouts else None
        torch.manual_seed(config.seed)
        self.student = Student(student_from_teacher(self.teacher.transformer, config.guidance_embeds_scale),
                               config.logvar_detached).train()
        self.student.logvar.requires_grad_(config.learn_logvar)  # zero-initialised: off keeps logvar = 0
        freeze(self.student.transformer, config.frozen_modules)
        self.ema = student_from_teacher(self.teacher.transformer, config.guidance_embeds_scale).eval()
        self.ema.requires_grad_(False)
        self.ema.load_state_dict(self.student.transformer.state_dict())
        maybe_install_kernels(self.student.transformer)  # on with CUDA and Triton, off on the CPU
        optimizer = torch.optim.AdamW(self.student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.discriminator = Discriminator(self.teacher.transformer).to(
            self.accelerator.device) if config.ladd else None
        if config.ladd:  # the heads' own param group: one optimizer to checkpoint, and as each step gives only one
            # side gradients and Adam's state is per parameter, it acts as two AdamWs
            optimizer.add_param_group({"params": list(self.discriminator.parameters()), "lr": config.ladd_lr})
        self.fake_denoiser = fake_denoiser(self.teacher.transformer) if config.dmd_weight else None
        if self.fake_denoiser is not None:  # likewise its own param group
            optimizer.add_param_group({"params": list(self.fake_denoiser.parameters()), "lr": config.dmd_fake_lr})
        self.model, optimizer = self.accelerator.prepare(self.student, optimizer)
        self.clip_groups = [list(self.model.parameters())]
        if config.clip_logvar_apart:  # the head's gradient (about 1 per pair, whatever the loss) stays out of the
            # budget that grad_clip gives the transformer: [transformer, head]
            self.clip_groups = [[], []]
            for name, param in self.model.named_parameters():
                self.clip_groups[name.removeprefix("module.").startswith("logvar.")].append(param)
        self.wrapped_discriminator = self.accelerator.prepare(self.discriminator) if config.ladd else None
        self.wrapped_fake_denoiser = self.accelerator.prepare(self.fake_denoiser) if config.dmd_weight else None
        heads = {"ladd": self.discriminator} if self.discriminator is not None else {}
        denoiser = {"dmd_fake": self.fake_denoiser} if self.fake_denoiser is not None else {}
        super().__init__(config, config.out, {"student": self.student, "ema": self.ema} | heads | denoiser, optimizer,
                         self.accelerator.process_index, self.accelerator.num_processes, f"distill ({config.pairs})")
        self.total = None if config.fit_schedule_to_budget else config.steps  # fitted: the budget ends the run
        self.counters = {"skipped_steps": 0, "degenerate_prompts": 0, "pairs": 0, "train_time_s": 0.0}
        self._spent_at = (-1, 0.0)  # (step, budget share) of the last clock broadcast: one broadcast per step
        resumed = self.start(resume, free=(*RESUME_MAY_CHANGE, "export_extrapolation", "recipe"))
        self.counters = resumed.get("counters", self.counters)
        self.evaluates = bool(config.eval_every) and bool(sources.evaluator or config.agreement_n) and self.main
        self._reference: TeacherReference | None = None  # the teacher's agreement images, made at the first eval

    def extra(self) -> dict:
        return {"counters": self.counters}

    def _null(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's text states and mask for n prompts, on this rank's device (CFG's unconditional side)."""
        return tuple(x.to(self.accelerator.device) for x in self.teacher.text.null(n))

    def _conditioning(self, prompts: list[str]):
        states, mask = self.teacher.text.encode(prompts)
        return states.to(self.accelerator.device), mask.to(self.accelerator.device), *self._null(len(prompts))

    def make_pairs(self):
        """One step's pairs, the number of prompts the degenerate filter dropped, and one start pair per prompt
        (noise at pi/2: the rollout's, with its endpoint; for data pairs fresh noise, `noise_starts`)."""
        config = self.config
        if config.pairs == "data":
            captions, images = self.sources.images.sample(config.prompts_per_step * config.points_per_trajectory,
                                                          self.teacher.default_size)
            pairs = data_pairs(self.teacher, images, *self._conditioning(captions), config)
            return pairs, 0, noise_starts(pairs, config.points_per_trajectory)
        if self.shards is not None:
            roll, prompts = self.shards.sample(config.prompts_per_step)
            cond = self._conditioning(prompts)
        else:
            prompts = [random.choice(self.sources.prompts) for _ in range(config.prompts_per_step)]
            cond = self._conditioning(prompts)
            roll = rollout(self.teacher, *cond, config)
        weight = degenerate_weight(roll.endpoints, config.degenerate_std)  # per prompt
        parts = [pairs_from_rollout(roll, *cond[:2], weight, config)] if config.points_per_trajectory else []
        if config.renoised_per_trajectory:
            parts.append(renoised_endpoint_pairs(self.teacher, roll, weight, *cond, config))
        return concat_pairs(*parts), int((weight == 0).sum()), start_pairs(roll, *cond[:2], weight)

    def train_step(self) -> dict:
        config = self.config
        t0 = time.perf_counter()
        pairs, dropped, starts = self.make_pairs()
        position = self.schedule_position()
        r = self.tangent_r()
        student = self.accelerator.unwrap_model(self.model)
        self.optimizer.param_groups[0]["lr"] = learning_rate(config, position + 1)  # the student's; heads: ladd_lr
        with self.accelerator.autocast():
            loss, stats = scm_loss(self.model, pairs, r, config.prior_weight, config.logvar_min)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if config.endpoint_weight:  # L = L_sCM + endpoint_weight L_end, its gradient added by a second backward
            with self.accelerator.autocast():
                end_loss = endpoint_loss(self.model, starts)
            self.accelerator.backward(config.endpoint_weight * end_loss)
            stats["endpoint"] = end_loss.item()
        if config.dmd_weight:  # L = L_sCM + dmd_weight L_DMD, likewise
            with self.accelerator.autocast():
                x0_hat = one_step(self.model, starts)
                distribution_loss = dmd_loss(self.teacher.transformer, self.fake_denoiser, x0_hat, starts,
                                             self._null(len(starts.t)), config.dmd_shift, config.guidance_max_sigma)
            self.accelerator.backward(config.dmd_weight * distribution_loss)
            stats["dmd"] = distribution_loss.item()
        if config.ladd:  # L = L_sCM + ladd_weight L_G (Sprint §3.3): L_G's gradient is added by a second backward
            ladd_batch, fake = self._ladd_generator(pairs, stats)
        # grad_norm: the student's (the whole model's unless clip_logvar_apart)
        grad_norm, applied = clipped_update(self.optimizer, self.clip_groups, config.grad_clip,
                                            self.accelerator.clip_grad_norm_)
        if applied:
            ema_update(self.ema, student.transformer, config.ema_decay)
        else:
            self.counters["skipped_steps"] += 1
        if config.ladd:  # then the alternating discriminator step
            stats["d_loss"] = self._side_step(lambda: discriminator_loss(
                self.wrapped_discriminator, self.teacher.transformer, ladd_batch.x0, fake, ladd_batch.states,
                ladd_batch.mask), self.discriminator.parameters())
        for _ in range(config.dmd_fake_updates if config.dmd_weight else 0):  # and the fake denoiser's steps
            stats["fake"] = self._side_step(lambda: fake_denoiser_loss(
                self.wrapped_fake_denoiser, x0_hat.detach(), starts, config.dmd_shift), self.fake_denoiser.parameters())
        self.step += 1
        elapsed = time.perf_counter() - t0
        self.counters["pairs"] += len(pairs.t)
        self.counters["degenerate_prompts"] += dropped
        self.counters["train_time_s"] += elapsed
        if config.fit_schedule_to_budget:  # the bar has no total then: what is left of the budget stands for an ETA
            stats.update(schedule_step=position, budget_left_s=config.time_budget_s - self.counters["train_time_s"])
        return {"loss": loss.item(), "grad_norm": float(grad_norm), "r": r, "pairs_per_s": len(pairs.t) / elapsed,
                **stats, **{k: v for k, v in self.counters.items() if k != "pairs"}}

    def budget_spent(self) -> float:
        """Training time over the time budget (0 without one), on rank 0's clock, so that every rank reads the same
        schedule and stops at the same step. The clock only moves when a step ends, so it is broadcast once per step:
        the stop check after a step and the next step's schedule read the same value."""
        if not self.config.time_budget_s:
            return 0.0
        if self._spent_at[0] != self.step:
            clock = torch.tensor([self.counters["train_time_s"]], dtype=torch.float64, device=self.accelerator.device)
            self._spent_at = (self.step, broadcast(clock, from_process=0).item() / self.config.time_budget_s)
        return self._spent_at[1]

    def continues(self) -> bool:
        """Whether another step runs: steps remain (unless the schedule is fitted to the budget) and budget does."""
        return (self.config.fit_schedule_to_budget or self.step < self.config.steps) and self.budget_spent() < 1

    def tangent_r(self) -> float:
        """The tangent's r at this step of the schedules (warm-up, calm-down: `tangent_r`)."""
        config = self.config
        return tangent_r(self.schedule_position(), config.tangent_warmup, config.calm_down_start,
                         config.calm_down_steps, config.final_r)

    def schedule_position(self) -> int:
        """The step the schedules read: the step itself, or with fit_schedule_to_budget the budget's spent share of
        the steps, so warm-ups, calm-down and cosine decay all end when the budget does."""
        if not self.config.fit_schedule_to_budget:
            return self.step
        return min(self.config.steps, int(self.config.steps * self.budget_spent()))

    def _ladd_generator(self, pairs, stats: dict):
        """Backpropagates ladd_weight L_G into the student (one forward per backward, as DDP wants) on one pair
        per prompt; returns that batch and its detached fakes x̂0 for the discriminator step."""
        batch = one_per_prompt(pairs, self.config.points_per_trajectory, self.config.prompts_per_step)
        with self.accelerator.autocast():
            g_loss, fake = generator_loss(self.discriminator, self.teacher.transformer, self.model, batch)
        self.accelerator.backward(self.config.ladd_weight * g_loss)
        stats["g_loss"] = g_loss.item()
        return batch, fake

    def _side_step(self, loss_fn, parameters) -> float:
        """One step of a side network on the pre-update one-step samples: the LADD heads' hinge step (clean x0 as
        real, x̂0 as fake) or DMD's fake denoiser's denoising step. Only its parameters get gradients."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.accelerator.autocast():
            loss = loss_fn()
        self.accelerator.backward(loss)
        clipped_update(self.optimizer, [parameters], self.config.grad_clip, self.accelerator.clip_grad_norm_)
        return loss.item()

    def pipeline(self) -> Pipeline:
        """The student as a pipeline, with the EMA weights (what is sampled, evaluated and exported)."""
        return student_pipeline(self.teacher, self.ema)

    def sample_grid(self) -> Path:
        """The sources' fixed sample prompts and seeds at 1, 2 and 4 steps: one row per step count."""
        prompts = self.sources.sample_prompts
        generator = Generator(self.pipeline())
        rows = [generator.generate(prompts, list(range(len(prompts))), steps).images for steps in (1, 2, 4)]
        path = self.out / "samples" / f"step{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(torch.cat(rows), path, columns=len(prompts))
        (path.parent / "prompts.txt").write_text("\n".join(prompts) + "\n")
        return path

    def teacher_reference(self) -> TeacherReference:
        """The teacher's images of the agreement evaluation, made once."""
        if self._reference is None:
            self._reference = teacher_reference(self.teacher, self.sources.sample_prompts, self.config.agreement_n)
        return self._reference

    def evaluate_now(self) -> dict:
        """The student's teacher agreement (at 1, 2 and 4 steps) and, with an evaluator, its 1-step scores on the
        evaluator's first split, appended to eval_curve.jsonl."""
        evaluator, student = self.sources.evaluator, self.pipeline()
        record = {"step": self.step, "train_time_s": self.counters["train_time_s"]}
        if self.config.agreement_n:
            record[AGREEMENT] = teacher_agreement(student, self.teacher_reference())["steps"]
        if evaluator is not None:
            record |= evaluator.evaluate(student, self.config.eval_n, evaluator.splits[0])
        with open(self.out / "eval_curve.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        return record

    def before(self) -> None:
        if self.evaluates and self.step == 0:
            self.evaluate_now()

    def after_step(self) -> None:
        if self.main and self.config.sample_every and self.step % self.config.sample_every == 0:
            self.sample_grid()
        if self.evaluates and self.step % self.config.eval_every == 0:
            self.evaluate_now()

    def after(self) -> None:
        if self.evaluates and self.step % self.config.eval_every:
            self.evaluate_now()  # the curve's last point is where training stopped
