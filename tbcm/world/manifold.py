"""Improved precision and recall (Kynkaenniemi et al., NeurIPS 2019, "Improved Precision and Recall Metric for
Assessing Generative Models", Sec. 2, eqs. 1-2), on the evaluator's features.

Each set of features spans a manifold: the union of balls around its points, each ball reaching that point's k-th
nearest neighbour in its own set. Precision is the share of generated features that fall inside the reference
manifold (fidelity); recall is the share of reference features inside the generated manifold (diversity: a
mode-seeking student keeps precision and loses recall).
"""
from __future__ import annotations

import torch

NEIGHBOURS = 3  # k of the paper's recommended setting (Sec. 3)
CHUNK = 1024  # rows of a distance matrix computed at once


def kth_neighbour_radii(features: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """Distance from each feature to its k-th nearest other feature of the same set."""
    if len(features) <= k:
        raise ValueError(f"the manifold of {len(features)} features needs more than k = {k} of them")
    radii = []
    for rows in features.split(CHUNK):
        distances = torch.cdist(rows, features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # the 1st is the point itself, at distance 0
    return torch.cat(radii)


def inside_share(queries: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of the queries within radii[j] of some manifold point j (eq. 1's indicator, averaged: eq. 2)."""
    inside = [(torch.cdist(rows, manifold) <= radii).any(dim=1) for rows in queries.split(CHUNK)]
    return torch.cat(inside).double().mean().item()


def precision_recall(reference: torch.Tensor, generated: torch.Tensor, k: int = NEIGHBOURS) -> dict[str, float]:
    """{"precision", "recall"} of generated features against reference features, both (n, d)."""
    reference, generated = reference.double(), generated.double()
    return {"precision": inside_share(generated, reference, kth_neighbour_radii(reference, k)),
            "recall": inside_share(reference, generated, kth_neighbour_radii(generated, k))}
