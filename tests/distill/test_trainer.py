"""The trainer end to end on tiny configs: both pair sources, rollout shards, exact resume after SIGKILL,
export through SanaSprintPipeline, and clear errors for bad teachers."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tbcm.distill.config import DistillConfig
from tbcm.distill.loss import tangent_r
from tbcm.distill.export import export_student
from tbcm.distill.config import RolloutConfig
from tbcm.distill.rollout import write_rollouts
from tbcm.distill.trainer import Distiller
from tbcm.cli.distill import sources
from tbcm.models.generator import Generator
from tbcm.models.pipeline import PipelineError, load_pipeline
from tbcm.models.sampling import seeded_noise
from tbcm.models.training import learning_rate
from tiny import make_tiny_pipeline

TINY = dict(steps=3, prompts_per_step=2, route_points=4, points_per_trajectory=3, sample_every=0, eval_every=0,
            checkpoint_every=1, tangent_warmup=2)


def distiller_for(config: DistillConfig, resume: bool = False) -> Distiller:
    """A Distiller with its sources wired as `tbcm distill` wires them (the embedded world for --prompts world)."""
    return Distiller(config, sources(config), resume=resume)


def losses(run: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("pairs", ["trajectory", "data"])
def test_trainer_runs_and_moves_the_student(tiny_teacher_dir, tmp_path, pairs):
    distiller = distiller_for(DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path), pairs=pairs, **TINY))
    before = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    distiller.train()
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(tmp_path).values())
    changed = [k for k, v in distiller.student.state_dict().items() if not torch.equal(v, before[k])]
    assert any("transformer_blocks" in k for k in changed) and any("guidance_embedder" in k for k in changed)
    assert (tmp_path / "checkpoint.safetensors").exists()


def test_clip_logvar_apart_gives_the_head_and_the_transformer_each_the_clip(tiny_teacher_dir, tmp_path):
    clipped = {}
    for apart in (False, True):
        config = DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path / str(apart)), grad_clip=1e-3,
                               clip_logvar_apart=apart, **TINY)
        distiller = distiller_for(config)
        step = distiller.optimizer.step

        def norms_then_step(*args, **kwargs):  # the gradients as the optimizer gets them, after clipping
            grads = {name: p.grad for name, p in distiller.student.named_parameters() if p.grad is not None}
            head = [g for name, g in grads.items() if name.startswith("logvar.")]
            rest = [g for name, g in grads.items() if not name.startswith("logvar.")]
            clipped[apart] = [float(torch.cat([g.flatten() for g in group]).norm()) for group in (rest, head)]
            return step(*args, **kwargs)

        distiller.optimizer.step = norms_then_step
        distiller.train_step()
    (rest_global, head_global), (rest_apart, head_apart) = clipped[False], clipped[True]
    assert (rest_global**2 + head_global**2) ** 0.5 == pytest.approx(1e-3, rel=1e-3)
    assert rest_apart == pytest.approx(1e-3, rel=1e-3) and head_apart == pytest.approx(1e-3, rel=1e-3)
    assert rest_global < rest_apart


def test_learn_logvar_off_keeps_the_weighting_at_zero(tiny_teacher_dir, tmp_path):
    distiller = distiller_for(DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path), learn_logvar=False,
                                            **TINY))
    before = {k: v.clone() for k, v in distiller.student.transformer.state_dict().items()}
    stats = distiller.train_step()
    assert stats["logvar"] == 0.0
    assert all(float(p.abs().max()) == 0.0 for p in distiller.student.logvar.parameters())
    assert any(not torch.equal(v, before[k]) for k, v in distiller.student.transformer.state_dict().items())


def test_frozen_modules_stay_the_teachers_while_the_rest_trains(tiny_teacher_dir, tmp_path):
    config = DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path), frozen_modules="attn2, caption",
                           weight_decay=0.1, **TINY)  # decay would move a frozen weight that AdamW still touched
    distiller = distiller_for(config)
    before = {k: v.clone() for k, v in distiller.student.transformer.state_dict().items()}
    distiller.train()
    changed = {k for k, v in distiller.student.transformer.state_dict().items() if not torch.equal(v, before[k])}
    frozen = {k for k in before if "attn2" in k or "caption" in k}
    assert frozen and not changed & frozen
    assert any(".attn1." in k for k in changed) and any(".ff." in k for k in changed)
    with pytest.raises(ValueError, match="--frozen-modules: 'cross_attn' is in no student parameter name"):
        distiller_for(DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path / "bad"),
                                    frozen_modules="cross_attn", **TINY))


def test_logvar_min_without_a_learned_weighting_is_refused(tiny_teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="--logvar-min and --logvar-detached shape the learned weighting"):
        distiller_for(DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path), learn_logvar=False,
                                    logvar_min=-2.0, **TINY))


def test_renoised_endpoints_join_the_trajectory_pairs(tiny_teacher_dir, tmp_path):
    config = DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path / "run"),
                           **{**TINY, "points_per_trajectory": 2}, renoised_per_trajectory=3)
    distiller = distiller_for(config)
    pairs, _, _ = distiller.make_pairs()
    assert len(pairs.t) == 2 * (2 + 3)
    distiller.train()
    assert len(losses(tmp_path / "run")) == 3
    with pytest.raises(ValueError, match="--renoised-per-trajectory"):
        distiller_for(DistillConfig(**{**config.__dict__, "pairs": "data", "out": str(tmp_path / "data")}))


def test_endpoint_regression_joins_the_loss_on_each_rollouts_start_noise(tiny_teacher_dir, tmp_path):
    config = DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path / "run"), **TINY, endpoint_weight=0.5)
    distiller = distiller_for(config)
    _, _, starts = distiller.make_pairs()
    assert starts.t.tolist() == [pytest.approx(math.pi / 2)] * 2  # one per prompt, at the rollout's noise
    torch.testing.assert_close(starts.x_t.std(), torch.tensor(0.5), atol=0.1, rtol=0)  # sigma_d x N(0, 1)
    distiller.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(row["endpoint"] > 0 for row in rows)
    with pytest.raises(ValueError, match="--endpoint-weight"):
        distiller_for(DistillConfig(**{**config.__dict__, "pairs": "data", "out": str(tmp_path / "data")}))


def test_dmd_trains_a_fake_denoiser_beside_the_student_and_resumes_it(tiny_teacher_dir, tmp_path):
    config = DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path / "run"), **TINY, dmd_weight=0.5,
                           dmd_fake_updates=2)
    distiller = distiller_for(config)
    teacher_weights = {k: v.clone() for k, v in distiller.teacher.transformer.state_dict().items()}
    distiller.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(row["dmd"] > 0 and row["fake"] > 0 for row in rows)
    moved = [k for k, v in distiller.fake_denoiser.state_dict().items() if not torch.equal(v, teacher_weights[k])]
    assert moved  # the fake denoiser learns; the teacher it started from does not
    assert all(torch.equal(v, teacher_weights[k]) for k, v in distiller.teacher.transformer.state_dict().items())
    resumed = distiller_for(DistillConfig(**{**config.__dict__, "steps": 3}), resume=True)
    for key, value in distiller.fake_denoiser.state_dict().items():
        torch.testing.assert_close(resumed.fake_denoiser.state_dict()[key], value, atol=0, rtol=0)
    with pytest.raises(ValueError, match="--dmd-weight must be >= 0"):
        DistillConfig(**{**config.__dict__, "dmd_weight": -1.0})


def test_fit_schedule_to_budget_runs_the_step_schedule_over_the_time_budget(tiny_teacher_dir, tmp_path,
                                                                           monkeypatch):
    ticks = iter(range(10**6))  # a clock where every training step takes exactly 1 s
    monkeypatch.setattr("tbcm.distill.trainer.time", type("Clock", (), {"perf_counter": staticmethod(lambda: next(ticks))}))
    config = DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path / "run"), **{**TINY, "steps": 4},
                           cosine_decay=True, warmup_steps=1, calm_down_start=1, calm_down_steps=2,
                           time_budget_s=8, fit_schedule_to_budget=True)
    broadcasts = []
    monkeypatch.setattr("tbcm.distill.trainer.broadcast", lambda clock, from_process: broadcasts.append(clock) or clock)
    distiller = distiller_for(config)
    distiller.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))  # the 8 s budget, not the 4 steps, ends it
    assert len(broadcasts) == 9  # rank 0's clock is sent once before the first step and once after each
    assert [row["schedule_step"] for row in rows] == [0, 0, 1, 1, 2, 2, 3, 3]  # 4 x the share of 8 s spent
    assert [row["r"] for row in rows] == [tangent_r(p, 2, 1, 2, config.final_r) for p in [0, 0, 1, 1, 2, 2, 3, 3]]
    assert distiller.optimizer.param_groups[0]["lr"] == learning_rate(config, 4) == 0  # annealed as the budget ends
    assert rows[-1]["budget_left_s"] == 0
    with pytest.raises(ValueError, match="--time-budget-s"):
        distiller_for(DistillConfig(**{**config.__dict__, "time_budget_s": 0, "out": str(tmp_path / "none")}))


def test_trainer_reads_rollout_shards(tiny_teacher_dir, tmp_path):
    config = DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path / "run"), **TINY)
    paths = write_rollouts(config, RolloutConfig(shards=2, prompts_per_shard=3, batch_size=2), sources(config).prompts,
                           tmp_path / "shards")
    assert len(paths) == 2
    distiller = distiller_for(DistillConfig(**{**config.__dict__, "rollouts": str(tmp_path / "shards")}))
    distiller.train()
    assert len(losses(tmp_path / "run")) == 3
    with pytest.raises(ValueError, match="rollouts-00000.safetensors: rolled out with route_points = 4"):
        distiller_for(DistillConfig(**{**config.__dict__, "rollouts": str(tmp_path / "shards"), "route_points": 8,
                                       "out": str(tmp_path / "other")}))
    with pytest.raises(ValueError, match="rolled out with guidance_max_sigma = 1.0, but this run has "
                                         "--guidance-max-sigma 0.5"):
        distiller_for(DistillConfig(**{**config.__dict__, "rollouts": str(tmp_path / "shards"),
                                       "guidance_max_sigma": 0.5, "out": str(tmp_path / "other")}))
    other_teacher = make_tiny_pipeline(tmp_path / "other-teacher", student=False, seed=3)
    with pytest.raises(ValueError, match="rollouts-00000.safetensors: rolled out by another teacher"):
        distiller_for(DistillConfig(**{**config.__dict__, "rollouts": str(tmp_path / "shards"),
                                       "teacher": str(other_teacher), "out": str(tmp_path / "other")}))


def run_cli(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "tbcm.cli.main", "distill", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2], **kwargs)


def test_sigkill_and_resume_reaches_the_same_losses(tiny_teacher_dir, tmp_path):
    common = ["--teacher", str(tiny_teacher_dir), "--prompts-per-step", "2", "--route-points", "4",
              "--points-per-trajectory", "3", "--sample-every", "0", "--eval-every", "0", "--checkpoint-every", "1",
              "--steps", "6",
              "--tangent-warmup", "3"]
    killed = run_cli([*common, "--out", str(tmp_path / "killed")])
    deadline = time.time() + 240
    while time.time() < deadline and killed.poll() is None:  # kill mid-run, once two checkpoints exist
        if (tmp_path / "killed" / "metrics.jsonl").exists() and len(losses(tmp_path / "killed")) >= 3:
            break
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert len(losses(tmp_path / "killed")) < 6, "the run finished before it could be killed"
    straight = run_cli([*common, "--out", str(tmp_path / "straight")])
    assert straight.wait(timeout=240) == 0, straight.stderr.read().decode()[-2000:]
    resumed = run_cli([*common, "--out", str(tmp_path / "killed"), "--resume"])
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read().decode()[-2000:]
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")


def test_export_loads_in_sana_sprint_pipeline_and_matches_our_generator(tiny_teacher_dir, tmp_path):
    from diffusers import SanaSprintPipeline

    distiller = distiller_for(DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path / "run"),
                                            guidance_embeds_scale=1.0, **TINY))
    distiller.train()
    torch.manual_seed(0)  # a guidance branch that matters, so both pipelines must embed w at the exported scale
    torch.nn.init.normal_(distiller.ema.time_embed.guidance_embedder.linear_2.weight, std=0.5)
    distiller.teacher.info |= {"made_by": "make world", "teacher_run": {"step": 3}}  # as a shipped teacher has
    folder = export_student(distiller.pipeline(), distiller.teacher, distiller.config, tmp_path / "student",
                            distiller.step, distiller.counters)
    info = json.loads((folder / "tbcm.json").read_text())
    manifest = info["manifest"]
    assert manifest["method"] == "custom" and manifest["teacher"]["transformer_sha256"]  # TINY matches no recipe
    assert manifest["teacher"]["run"] == {"step": 3} and "made_by" not in info and "teacher_run" not in info

    prompt, seed = "a small green square at the top", 7
    size = 32  # SanaSprintPipeline needs multiples of 32 pixels: 8x8 latents with the tiny f4 VAE
    ours = Generator(load_pipeline(folder)).generate([prompt], [seed], steps=1, guidance=4.5, size=size).images[0]
    sprint = SanaSprintPipeline.from_pretrained(folder)
    assert sprint.transformer.config.guidance_embeds_scale == 1.0
    noise, _ = seeded_noise([seed], (4, 8, 8))
    theirs = sprint(prompt, num_inference_steps=1, intermediate_timesteps=None, guidance_scale=4.5, latents=noise,
                    height=size, width=size, use_resolution_binning=False, max_sequence_length=16,
                    complex_human_instruction=None, output_type="np").images[0]
    theirs = torch.from_numpy(theirs * 255).round()
    assert (ours.float() - theirs).abs().max() <= 1


def test_export_extrapolation_carries_the_weight_change_past_the_student(tiny_teacher_dir, tmp_path):
    from tbcm.cli.main import main
    from tbcm.distill.student import teacher_weights_by_student_name

    config = DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path / "run"), lr=1e-2, ema_decay=0.0, **TINY)
    distiller_for(config).train()  # a large lr and the last weights exported, so the change is well above rounding
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "plain")]) == 0
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "far"),
                 "--export-extrapolation", "1.5"]) == 0
    teacher = teacher_weights_by_student_name(load_pipeline(tiny_teacher_dir).transformer)
    student = load_pipeline(tmp_path / "plain").transformer.state_dict()
    far = load_pipeline(tmp_path / "far").transformer.state_dict()
    moved = [k for k in teacher if (student[k] - teacher[k]).abs().max() > 1e-3]
    assert len(moved) > len(teacher) // 2  # training moved most weights well past assert_close's tolerance
    for name, value in far.items():  # theta_0 + 1.5 (theta_1 - theta_0); the guidance branch as trained
        expected = teacher[name] + 1.5 * (student[name] - teacher[name]) if name in teacher else student[name]
        torch.testing.assert_close(value, expected, msg=name)
    assert any(name not in teacher for name in far)
    info = json.loads((tmp_path / "far" / "tbcm.json").read_text())
    assert info["manifest"]["config"]["export_extrapolation"] == 1.5
    distiller_for(dataclasses.replace(config, steps=4, export_extrapolation=1.5), resume=True)  # an export knob only
    with pytest.raises(ValueError, match="--export-extrapolation must be > 0"):
        dataclasses.replace(config, export_extrapolation=0.0)
    with pytest.raises(ValueError, match=r"--guidance-max-sigma is a flow sigma in \(0, 1\]"):
        dataclasses.replace(config, guidance_max_sigma=0.0)
    with pytest.raises(ValueError, match="--text-microbatch must be >= 1"):
        dataclasses.replace(config, text_microbatch=0)


def test_bad_teachers_get_clear_errors(tiny_teacher_dir, tiny_student_dir, tmp_path):
    with pytest.raises(PipelineError, match="model_index.json"):
        distiller_for(DistillConfig(teacher=str(tmp_path), out=str(tmp_path / "run")))
    with pytest.raises(ValueError, match="guidance embedding"):
        distiller_for(DistillConfig(teacher=str(tiny_student_dir), out=str(tmp_path / "run")))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model_index.json", "transformer", "scheduler"):
        os.symlink(Path(tiny_teacher_dir) / name, broken / name)
    with pytest.raises(PipelineError, match="vae"):
        distiller_for(DistillConfig(teacher=str(broken), out=str(tmp_path / "run")))
    with pytest.raises(ValueError, match="pairs"):
        distiller_for(DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path / "run"), pairs="images"))


def test_the_cli_names_a_bad_knob_combination_before_any_work(tmp_path, capsys):
    from tbcm.cli.main import main

    missing_teacher, out = tmp_path / "no-teacher", tmp_path / "run"  # refused before the teacher is even looked for
    assert main(["distill", "--teacher", str(missing_teacher), "--pairs", "data", "--endpoint-weight", "0.1",
                 "--out", str(out)]) == 2
    assert "tbcm distill: error: --endpoint-weight must be >= 0, and 0 with --pairs data" in capsys.readouterr().err
    assert not out.exists()


class NoiseImages:
    """A captioned-image source of the user's own (here random images): `--pairs data` needs no world."""

    def sample(self, n: int, size: int):
        return [f"picture {i}" for i in range(n)], torch.rand(n, 3, size, size) * 2 - 1


def test_a_prompt_file_distils_with_no_world_and_no_evaluator_but_teacher_agreement(tiny_teacher_dir, tmp_path):
    from tbcm.cli.main import main
    from tbcm.distill.sources import Sources, prompt_file_sources

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\nan oil painting of a harbour\n")
    assert prompt_file_sources(str(prompts)).prompts == ["a photo of a cat", "an oil painting of a harbour"]
    run, student = tmp_path / "run", tmp_path / "student"
    assert main(["distill", "--teacher", str(tiny_teacher_dir), "--prompts", str(prompts), "--out", str(run),
                 "--prompts-per-step", "2", "--route-points", "4", "--points-per-trajectory", "3", "--steps", "2",
                 "--sample-every", "2", "--eval-every", "1", "--agreement-n", "2", "--export", str(student),
                 "--export-eval-n", "4"]) == 0
    curve = [json.loads(line) for line in (run / "eval_curve.jsonl").read_text().splitlines()]
    assert sorted(losses(run)) == [1, 2] and [row["step"] for row in curve] == [0, 1, 2]
    assert all(set(row) == {"step", "train_time_s", "teacher-agreement"} for row in curve)  # no evaluator: no FD
    assert (run / "samples" / "prompts.txt").read_text().splitlines() == prompts_in(prompts)
    manifest = json.loads((student / "tbcm.json").read_text())["manifest"]
    assert manifest["eval"] == {} and manifest["eval_status"].startswith("not run: no evaluator")
    assert manifest["evaluations"] == ["teacher-agreement"] and manifest["teacher_agreement"]["n"] == 2
    with pytest.raises(ValueError, match=f"--pairs data needs captioned images, and --prompts {prompts} gives"):
        Distiller(DistillConfig(teacher=str(tiny_teacher_dir), prompts=str(prompts), out=str(tmp_path / "data"),
                                pairs="data", **TINY), prompt_file_sources(str(prompts)))
    with_images = Sources(prompts_in(prompts), prompts_in(prompts), images=NoiseImages())
    config = DistillConfig(teacher=str(tiny_teacher_dir), prompts=str(prompts), out=str(tmp_path / "data"),
                           pairs="data", **{**TINY, "steps": 1})
    Distiller(config, with_images).train()
    assert sorted(losses(tmp_path / "data")) == [1]
    with pytest.raises(FileNotFoundError, match="--prompts nowhere.txt: file not found"):
        prompt_file_sources("nowhere.txt")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": " A cat ", "id": 3}\n\n"a dog"\n{"text": "a fox"}\n')
    with pytest.raises(ValueError, match=r'prompts.jsonl, line 4: expected \{"prompt": "..."\} or a JSON string'):
        prompt_file_sources(str(jsonl))
    jsonl.write_text('{"prompt": " A cat ", "id": 3}\n\n"a dog"\n')
    assert prompt_file_sources(str(jsonl)).prompts == ["A cat", "a dog"]


def prompts_in(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line]
