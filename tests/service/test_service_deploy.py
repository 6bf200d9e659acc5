"""`tbcm deploy`: a candidate student is scored against the live model (same n, same seeds) and refused below its
bar with the reason, the live model unchanged; one that passes goes live through /admin/swap. The service runs
in-process; the evaluator is a tiny random one, as in tests/world."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tbcm.cli import deploy
from tbcm.cli.main import main
from tbcm.service.client import ServiceClient
from tbcm.service.gate import GateConfig, compare, recorded_scores

N = 16  # images per split: enough for a tiny FD, milliseconds with the tiny student
TOKEN = "deploy-token"


@pytest.fixture(scope="module")
def tiny_evaluator(tmp_path_factory):
    from tbcm.world.evaluator import Evaluator

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("evaluator")
    Evaluator(width=8, features=16, image_size=16).save(folder)
    return folder


def perturbed_copy(folder, out, noise: float):
    """The folder with Gaussian noise of this std added to every transformer weight (its tbcm.json unchanged)."""
    shutil.copytree(folder, out)
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    generator = torch.Generator().manual_seed(1)
    tensors = load_file(weights)
    save_file({k: v + noise * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}, weights)
    return out


@pytest.fixture
def shapes_student(tiny_student_dir, tmp_path):
    """The tiny student, marked as a shapes-world student (its tbcm.json names the VAE run, as world students'
    do), so the shapes evaluator may score it."""
    folder = shutil.copytree(tiny_student_dir, tmp_path / "live")
    info = json.loads((folder / "tbcm.json").read_text())
    (folder / "tbcm.json").write_text(json.dumps({**info, "vae_run": "tiny"}))
    return folder


@pytest.fixture
def serve_and_deploy(make_service, monkeypatch, tmp_path, tiny_evaluator, one_thread):
    """serve_and_deploy(live) -> deploy(folder, *args) -> (exit code, the live model's spec after it)."""
    monkeypatch.setenv("TBCM_ADMIN_TOKEN", TOKEN)

    def serve(live):
        client = make_service(model=str(live), model_roots=str(tmp_path))
        monkeypatch.setattr(deploy, "connect", lambda url: ServiceClient(url, http=client))

        def run(folder, *args):
            code = main(["deploy", str(folder), "--url", "http://testserver", "--n", str(N),
                         "--evaluator", str(tiny_evaluator), *args])
            return code, client.get("/info").json()["model"]["spec"]

        return run

    return serve


@pytest.fixture
def deploy_to(serve_and_deploy, shapes_student):
    """deploy_to(folder, *args) -> (exit code, the live model's spec after it); the live model: shapes_student."""
    return serve_and_deploy(shapes_student)


def test_a_worse_student_is_refused_with_the_reason_and_a_good_one_goes_live(deploy_to, shapes_student, tmp_path,
                                                                             capsys):
    worse = perturbed_copy(shapes_student, tmp_path / "worse", noise=0.3)
    code, live = deploy_to(worse)
    refusal = capsys.readouterr().err
    assert code == 1 and live == str(shapes_student)
    assert "refused" in refusal and "fd: candidate" in refusal and "fd_tolerance 0.05" in refusal
    assert f"{str(shapes_student)!r} stays live" in refusal
    good = shutil.copytree(shapes_student, tmp_path / "good")  # scores as the live one: within every bound
    code, live = deploy_to(good)
    out = capsys.readouterr().out
    assert code == 0 and live == str(good)
    assert "precision" in out and "recall" in out and "scored here" in out and "deployed" in out


def test_what_the_shapes_evaluator_cannot_score_is_gated_by_teacher_agreement_and_a_teacher_not_at_all(
        deploy_to, shapes_student, tiny_student_dir, tmp_path, capsys):
    size32 = shutil.copytree(shapes_student, tmp_path / "size32")
    info = json.loads((size32 / "tbcm.json").read_text())
    (size32 / "tbcm.json").write_text(json.dumps({**info, "image_size": 32}))
    code, live = deploy_to(size32)
    refusal = capsys.readouterr().err
    assert code == 2 and live == str(shapes_student)
    assert "gating by teacher agreement" in refusal and "renders 32 px images" in refusal
    assert "records no teacher to measure agreement with; --teacher names it" in refusal
    foreign = shutil.copytree(tiny_student_dir, tmp_path / "foreign")  # a student of no shapes-world teacher
    assert deploy_to(foreign)[0] == 2
    refusal = capsys.readouterr().err
    assert "gating by teacher agreement" in refusal and "no shapes-world student" in refusal
    teacher_like = shutil.copytree(shapes_student, tmp_path / "teacher-like")
    (teacher_like / "tbcm.json").write_text(json.dumps({**info, "kind": "teacher"}))
    assert deploy_to(teacher_like)[0] == 2
    assert "cannot be gated: it is a teacher, not a one-step student" in capsys.readouterr().err
    assert deploy_to(teacher_like, "--no-gate") == (0, str(teacher_like))

@pytest.fixture
def sana_student(teacher_pipe, tmp_path):
    """A student of the tiny teacher, no shapes-world one (initialised from it, as distillation starts), with what
    a distilled student's manifest records: the teacher's path and transformer sha256, and the prompt file."""
    from tbcm.distill.student import student_from_teacher, student_pipeline
    from tbcm.distill.teacher import teacher_fingerprint
    from tbcm.models.pipeline import save_pipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square on the left\n")
    torch.manual_seed(0)
    student = student_pipeline(teacher_pipe, student_from_teacher(teacher_pipe.transformer).eval())
    manifest = {"teacher": teacher_fingerprint(teacher_pipe), "config": {"prompts": str(prompts)}}
    return save_pipeline(student, tmp_path / "sana-live", info={**student.info, "kind": "student",
                                                                  "manifest": manifest})


def test_students_of_another_teacher_are_gated_by_teacher_agreement(serve_and_deploy, sana_student, tmp_path,
                                                                     capsys):
    deploy_to = serve_and_deploy(sana_student)
    worse = perturbed_copy(sana_student, tmp_path / "worse", noise=0.3)
    code, live = deploy_to(worse, "--agreement-n", "4")
    captured = capsys.readouterr()
    assert code == 1 and live == str(sana_student)
    assert "gating by teacher agreement" in captured.err and "1 step psnr_db: candidate" in captured.err
    assert "psnr_tolerance_db 0.5" in captured.err and "latent_mse" in captured.out
    good = shutil.copytree(sana_student, tmp_path / "good")
    assert deploy_to(good, "--agreement-n", "4") == (0, str(good))
    other = shutil.copytree(sana_student, tmp_path / "other-teacher")
    info = json.loads((other / "tbcm.json").read_text())
    info["manifest"]["teacher"]["transformer_sha256"] = {"diffusion_pytorch_model.safetensors": "0" * 64}
    (other / "tbcm.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert deploy_to(other, "--agreement-n", "4")[0] == 2
    assert "is not recorded as a student of the teacher" in capsys.readouterr().err


def gated(fd_train: float, accuracy_heldout: float) -> dict:
    return {"train": {"fd": fd_train, "accuracy": 0.9, "precision": 0.5},
            "heldout": {"fd": 10.0, "accuracy": accuracy_heldout}}


def test_each_split_and_metric_must_meet_its_bound():
    config = GateConfig(fd_tolerance=0.1, accuracy_tolerance=0.02)
    live = gated(10.0, 0.9)
    assert compare(gated(10.9, 0.881), live, config, "here").passed
    verdict = compare(gated(11.2, 0.87), live, config, "here")
    assert [(r["split"], r["metric"]) for r in verdict.failures] == [("train", "fd"), ("heldout", "accuracy")]
    assert verdict.reason(config) == ("train fd: candidate 11.2, live 10, allowed <= 11 (fd_tolerance 0.1); "
                                      "heldout accuracy: candidate 0.87, live 0.9, allowed >= 0.88 "
                                      "(accuracy_tolerance 0.02)")


def test_recorded_scores_stand_in_only_at_the_same_n_seed_and_evaluator():
    evals = gated(10.0, 0.9)
    info = {"manifest": {"eval": evals, "eval_status": "run: 256 images per split"}}
    assert recorded_scores(info, GateConfig())[0] == evals
    assert "at n 256, the gate's n is 64" in recorded_scores(info, GateConfig(n=64))[1]
    assert recorded_scores(info, GateConfig(seed=1))[0] is None
    assert recorded_scores({"manifest": {"eval": evals, "eval_n": 64}}, GateConfig(n=64))[0] == evals
    assert "no scores at a stated n" in recorded_scores({"manifest": {"eval": evals}}, GateConfig())[1]
    assert "no eval scores" in recorded_scores({}, GateConfig())[1]


def test_the_live_models_manifest_numbers_are_used_only_when_its_folder_is_not_here(monkeypatch, tmp_path):
    recorded = gated(10.0, 0.9)
    live = {"spec": "student", "path": str(tmp_path / "elsewhere"), "manifest_sha256": "0" * 64,
            "manifest": {"manifest": {"eval": recorded, "eval_status": "run: 256 images per split"}}}
    monkeypatch.setattr(deploy, "score", lambda folder, config: pytest.fail("nothing to score here"))
    scores, source = deploy.live_scores(live, GateConfig(), None)
    assert scores == recorded and "not on this machine" in source and "recorded in its manifest" in source
    with pytest.raises(deploy.GateError, match="no bar to compare with.*n 256, the gate's n is 32"):
        deploy.live_scores(live, GateConfig(n=32), None)
