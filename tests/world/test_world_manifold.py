"""Improved precision and recall against a plain loop over the paper's definition, and on sets whose answer is known."""
from __future__ import annotations

import pytest
import torch

from tbcm.world.manifold import kth_neighbour_radii, precision_recall


def loop_reference(reference, generated, k):
    """Kynkaenniemi et al. 2019, eqs. 1-2, written as loops over points."""
    def radius(points, i):
        return sorted(float((points[i] - points[j]).norm()) for j in range(len(points)) if j != i)[k - 1]

    def share(queries, points):
        radii = [radius(points, i) for i in range(len(points))]
        return sum(any(float((q - p).norm()) <= r for p, r in zip(points, radii)) for q in queries) / len(queries)

    return {"precision": share(generated, reference), "recall": share(reference, generated)}


@pytest.mark.parametrize("k", [1, 3])
def test_matches_the_definition(k):
    torch.manual_seed(0)
    reference, generated = torch.randn(40, 5), torch.randn(30, 5) * 1.5 + 0.5
    assert precision_recall(reference, generated, k) == pytest.approx(loop_reference(reference, generated, k))


def test_known_answers():
    torch.manual_seed(1)
    reference = torch.randn(300, 8)
    same = precision_recall(reference, reference.clone())
    assert same == {"precision": 1.0, "recall": 1.0}
    collapsed = reference[:5].repeat(20, 1) + 1e-3 * torch.randn(100, 8)  # five modes kept, every sample real
    modes = precision_recall(reference, collapsed)
    assert modes["precision"] == 1.0 and modes["recall"] < 0.1
    far = precision_recall(reference, torch.randn(300, 8) + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0}


def test_radii_skip_the_point_itself_and_refuse_tiny_sets():
    points = torch.tensor([[0.0], [1.0], [3.0]])
    assert kth_neighbour_radii(points, 1).tolist() == [1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="needs more than k = 3"):
        kth_neighbour_radii(points, 3)
