"""The teacher's training entry point continued from saved weights (init_from) and shipped with its provenance:
tiny configs of the real classes, a real (tiny) dataset, and `ship_world` into a temporary weights folder."""
import dataclasses
import json

import pytest
import torch
from diffusers import SanaTransformer2DModel

from tbcm.models.pipeline import load_pipeline
from tbcm.world.ship import ship_world
from tbcm.world.teacher_train import TeacherConfig, train_teacher

TINY = TeacherConfig(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=100, dataset_size=8, image_size=16,
                     max_sequence_length=16, num_layers=1, heads=2, head_dim=8)


def test_continued_teacher_starts_from_its_init_and_ships_with_provenance(tmp_path, teacher_pipe, tiny_teacher_dir):
    vae, text = teacher_pipe.vae, teacher_pipe.text
    first = train_teacher(TINY, vae, text, tmp_path / "first")
    # lr 0: a continued run must end exactly where it started, so the weights came from init_from
    init = str(tmp_path / "first" / "transformer")
    frozen = dataclasses.replace(TINY, lr=0.0, init_from=init, cosine_decay=True)
    second = train_teacher(frozen, vae, text, tmp_path / "second")
    for key, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], value), key
    fresh = train_teacher(dataclasses.replace(TINY, lr=0.0), vae, text, tmp_path / "fresh")
    assert not torch.equal(fresh.state_dict()["proj_out.weight"], first.state_dict()["proj_out.weight"])

    weights = ship_world(tiny_teacher_dir, None, tmp_path / "second", tmp_path / "weights", eval_n=0)
    manifest = json.loads((weights / "teacher" / "tbcm.json").read_text())
    record = manifest["teacher_run"]
    assert record["config"]["init_from"] == init and record["config"]["cosine_decay"] is True
    assert record["init_run"]["config"]["lr"] == TINY.lr and record["init_run"]["step"] == TINY.steps
    assert not (weights / "evaluator").exists()  # no evaluator run given: the shipped one is left alone
    shipped = SanaTransformer2DModel.from_pretrained(weights / "teacher" / "transformer")
    assert torch.equal(shipped.state_dict()["proj_out.weight"], first.state_dict()["proj_out.weight"])
    assert load_pipeline(weights / "teacher").info["teacher_run"]["step"] == TINY.steps


def test_a_continued_teacher_with_another_architecture_is_refused_before_any_work(tmp_path, teacher_pipe):
    vae, text = teacher_pipe.vae, teacher_pipe.text
    train_teacher(TINY, vae, text, tmp_path / "first")
    init = str(tmp_path / "first" / "transformer")
    with pytest.raises(ValueError, match=r"--heads 1 \(the init has 2\)"):
        train_teacher(dataclasses.replace(TINY, init_from=init, heads=1), vae, text, tmp_path / "second")
    assert not (tmp_path / "second").exists()
