"""The evaluator: Frechet distance against closed forms and an independent float64 reference, attribute accuracy on
hand-made logits, save/load, and (once shipped) the real evaluator's accuracy on real renders."""
import math

import pytest
import torch

from tbcm.world import world
from tbcm.world.evaluator import (WEIGHTS, Evaluator, attribute_accuracy, attribute_errors, frechet_distance, measure,
                              targets_of)
from tbcm.models.pipeline import WEIGHTS_DIR


def whitened(n: int, d: int, seed: int) -> torch.Tensor:
    """n samples in d dims whose sample mean is exactly 0 and unbiased sample covariance exactly I."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    cov = x.T @ x / (n - 1)
    return x @ torch.linalg.inv(torch.linalg.cholesky(cov)).T


def reference_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + Tr Sa + Tr Sb - 2 sum sqrt(eig(Sa Sb)): the eigenvalues of Sa Sb are those of
    Sa^1/2 Sb Sa^1/2 (real, >= 0), so Tr sqrtm(...) is the sum of their roots. Float64, no sqrtm."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)
    cb = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
    eig = torch.linalg.eigvals(ca @ cb).real.clamp(min=0)
    return float((mu_a - mu_b).square().sum() + ca.trace() + cb.trace() - 2 * eig.sqrt().sum())


def test_fd_of_a_set_with_itself_is_zero():
    a = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(a, a)) < 1e-8
    assert abs(frechet_distance(a, a[torch.randperm(200)])) < 1e-8  # order does not matter


def test_fd_is_symmetric_and_positive():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 6, generator=g)
    b = torch.randn(250, 6, generator=g) @ torch.randn(6, 6, generator=g) + 0.3
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9, abs=1e-10)
    assert frechet_distance(a, b) > 0.1


def test_fd_of_diagonal_gaussians_has_the_closed_form():
    d = 5
    f64 = dict(dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0], **f64), torch.tensor([1.0, 1.0, 0.0, -0.5, 3.0], **f64)
    s1, s2 = torch.tensor([1.0, 2.0, 0.5, 1.5, 0.1], **f64), torch.tensor([0.5, 2.0, 1.0, 3.0, 0.2], **f64)
    a = whitened(100, d, 0) * s1 + mu1
    b = whitened(140, d, 1) * s2 + mu2
    expected = float((mu1 - mu2).square().sum() + (s1 - s2).square().sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a.float(), b.float()) == pytest.approx(expected, rel=1e-5)  # float32 features
    # two of the dimensions
    assert frechet_distance(a[:, 2:4], b[:, 2:4]) == pytest.approx(2**2 + 1**2 + 0.5**2 + 1.5**2, rel=1e-9)


def test_fd_of_one_dimensional_features():
    a = whitened(50, 1, 0) * 2.0 + 1.0
    b = whitened(60, 1, 1) * 0.5 - 1.0
    assert frechet_distance(a, b) == pytest.approx(2.0**2 + 1.5**2, rel=1e-9)  # (mu1 - mu2)^2 + (s1 - s2)^2


def test_fd_of_commuting_covariances_has_the_closed_form():
    """Sa = Q diag(l1) Q^T, Sb = Q diag(l2) Q^T: FD = |mu1 - mu2|^2 + sum (sqrt l1 - sqrt l2)^2."""
    d = 4
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    l1 = torch.tensor([4.0, 1.0, 0.25, 2.0], dtype=torch.float64)
    l2 = torch.tensor([1.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    a = whitened(80, d, 3) @ (q * l1.sqrt()).T
    b = whitened(90, d, 4) @ (q * l2.sqrt()).T + 1.0
    expected = float(d * 1.0 + (l1.sqrt() - l2.sqrt()).square().sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fd_matches_an_independent_reference(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(64, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 10, generator=g,
                                                                            dtype=torch.float64)
    b = torch.randn(48, 10, generator=g, dtype=torch.float64) * 2 + torch.randn(10, generator=g,
                                                                                 dtype=torch.float64)
    assert frechet_distance(a, b) == pytest.approx(reference_fd(a, b), rel=1e-7)


def test_attribute_accuracy_on_hand_made_logits():
    def one_hot(indices, classes):
        return torch.nn.functional.one_hot(torch.tensor(indices), classes).float() * 5

    targets = {"colour": torch.tensor([0, 1, 2, 3]), "kind": torch.tensor([0, 1, 2, 3]),
               "size": torch.tensor([0, 1, 2, 0]), "position": torch.tensor([4, 3, 2, 1])}
    logits = {"colour": one_hot([0, 1, 2, 3], 6),       # all right
              "kind": one_hot([0, 0, 2, 3], 4),         # image 1 wrong
              "size": one_hot([0, 1, 2, 1], 3),         # image 3 wrong
              "position": one_hot([4, 3, 2, 1], 5)}     # all right
    every, per = attribute_accuracy(logits, targets)
    assert every == pytest.approx(0.5)  # images 0 and 2 have every attribute right
    assert per == pytest.approx({"colour": 1.0, "kind": 0.75, "size": 0.75, "position": 1.0})
    assert attribute_errors(logits, targets) == {"colour": {}, "kind": {"square -> circle": 1},
                                                 "size": {"small -> medium": 1}, "position": {}}
    logits["position"] = one_hot([0, 0, 0, 0], 5)
    assert attribute_accuracy(logits, targets)[0] == 0.0


def test_targets_of_scenes():
    scenes = [world.sample_scene(i) for i in range(5)]
    targets = targets_of(scenes)
    for i, scene in enumerate(scenes):
        for name, values in world.ATTRIBUTES.items():
            assert values[int(targets[name][i])] == getattr(scene.shapes[0], name)


def test_evaluator_shapes_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = Evaluator(width=8, features=16, image_size=32).eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    feats, logits = model(images)
    assert feats.shape == (3, 16)
    assert {k: v.shape[-1] for k, v in logits.items()} == {k: len(v) for k, v in world.ATTRIBUTES.items()}
    assert model(torch.rand(2, 3, 64, 64))[0].shape == (2, 16)  # other sizes are resized
    model.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS]
    loaded = Evaluator.load(tmp_path)
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(images)[0], model(images)[0])
    many_feats, many_logits = measure(loaded, images.repeat(3, 1, 1, 1), batch=4)
    assert many_feats.shape == (9, 16) and many_logits["colour"].shape == (9, 6)
    torch.testing.assert_close(many_feats[6:], feats, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        Evaluator.load(tmp_path / "missing")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_shipped_evaluator_is_accurate_on_real_renders(split):
    evaluator = Evaluator.load(WEIGHTS_DIR / "evaluator")
    size = evaluator.config["image_size"]
    scenes = [world.sample_scene(10**9 + i, split) for i in range(128)]
    images = torch.from_numpy(world.to_tensor_array([world.render(s, size) for s in scenes]))
    feats, logits = measure(evaluator, images)
    every, per = attribute_accuracy(logits, targets_of(scenes))
    assert every >= 0.95, per
    # FD between two independent real sets is small next to FD to noise
    others = [world.sample_scene(2 * 10**9 + i, split) for i in range(128)]
    other_feats, _ = measure(evaluator, torch.from_numpy(world.to_tensor_array([world.render(s, size)
                                                                                 for s in others])))
    noise_feats, _ = measure(evaluator, torch.rand(128, 3, size, size) * 2 - 1)
    assert math.isfinite(frechet_distance(feats, other_feats))
    assert frechet_distance(feats, other_feats) < frechet_distance(feats, noise_feats)
