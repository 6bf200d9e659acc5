"""`tbcm eval` adds improved precision and recall on the features and reference images FD uses."""
import pytest
import torch

from tbcm.world import evaluate as world_eval
from tbcm.world.evaluate import EvalConfig
from tbcm.world.evaluator import Evaluator
from tbcm.world.manifold import precision_recall


def test_eval_reports_precision_and_recall_on_the_features_of_fd(tiny_teacher_dir, tmp_path, monkeypatch):
    torch.manual_seed(0)
    Evaluator(width=8, features=16, image_size=16).save(tmp_path / "evaluator")
    seen = []
    fd = world_eval.frechet_distance
    monkeypatch.setattr(world_eval, "frechet_distance", lambda a, b: seen.append((a, b)) or fd(a, b))
    config = EvalConfig(model=str(tiny_teacher_dir), steps=1, n=8, batch_size=8, evaluator=str(tmp_path / "evaluator"))
    with pytest.warns(UserWarning, match="not a shapes-world folder"):  # the tiny teacher is no shapes teacher
        result = world_eval.evaluate(config)
    (generated, reference), = seen
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert {k: result[k] for k in ("precision", "recall")} == precision_recall(reference, generated)
    real = world_eval.evaluate(EvalConfig(model="real", n=8, evaluator=str(tmp_path / "evaluator")))
    assert 0 <= real["precision"] <= 1 and 0 <= real["recall"] <= 1
