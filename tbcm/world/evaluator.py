"""The shapes-world evaluator: a small classifier of every attribute, and the metrics built on it.

Its penultimate features define a Frechet distance (FD, the FID analogue) and its predictions define
prompt-attribute accuracy (the CLIP-score analogue). Weights are a safetensors file plus a JSON config.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from tbcm.world import world
from tbcm.models.training import atomic_write_safetensors, read_safetensors

WEIGHTS = "evaluator.safetensors"


class Evaluator(nn.Module):
    def __init__(self, width: int = 32, features: int = 128, image_size: int = 64):
        super().__init__()
        self.config = {"width": width, "features": features, "image_size": image_size}
        layers, channels = [], 3
        for out_channels in (width, 2 * width, 4 * width, 4 * width):  # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(channels, out_channels, 3, stride=2, padding=1), nn.GroupNorm(8, out_channels),
                       nn.SiLU()]
            channels = out_channels
        self.trunk = nn.Sequential(*layers, nn.Flatten(),
                                   nn.Linear(channels * (image_size // 16) ** 2, features), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(features, len(values))
                                    for name, values in world.ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images (B, 3, H, W) in [-1, 1] -> (features (B, F), {attribute: logits})."""
        if images.shape[-1] != self.config["image_size"]:
            images = nn.functional.interpolate(images, size=self.config["image_size"], mode="bilinear",
                                               antialias=True, align_corners=False)
        feats = self.trunk(images)
        return feats, {name: head(feats) for name, head in self.heads.items()}

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        atomic_write_safetensors(self.state_dict(), folder / WEIGHTS, self.config)

    @classmethod
    def load(cls, folder: Path) -> "Evaluator":
        path = Path(folder) / WEIGHTS
        if not path.exists():
            raise FileNotFoundError(f"{path}: evaluator weights missing; re-make them with `make world`")
        tensors, config = read_safetensors(path)
        model = cls(**config)
        model.load_state_dict(tensors)
        return model.eval().requires_grad_(False)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FD between Gaussians fitted to two feature sets: |mu_a - mu_b|^2 + Tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2)
    (Heusel et al. 2017, eq. 6), in float64 with symmetric square roots."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))

    def sqrtm(m: torch.Tensor) -> torch.Tensor:
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
        return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T

    root_a = sqrtm(cov_a)
    cross = sqrtm(root_a @ cov_b @ root_a)
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross))


def attribute_accuracy(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> tuple[float, dict]:
    """(fraction of images with every attribute right, {attribute: fraction right})."""
    correct = {name: logits[name].argmax(-1) == targets[name] for name in world.ATTRIBUTES}
    every = torch.stack(list(correct.values())).all(0)
    return float(every.float().mean()), {name: float(c.float().mean()) for name, c in correct.items()}


def attribute_errors(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{attribute: {"true -> predicted": count}} over the misread images, most frequent first."""
    errors = {}
    for name, classes in world.ATTRIBUTES.items():
        predicted = logits[name].argmax(-1)
        pairs = Counter(f"{classes[t]} -> {classes[p]}" for t, p in zip(targets[name].tolist(), predicted.tolist())
                        if t != p)
        errors[name] = dict(pairs.most_common())
    return errors


def targets_of(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    """Class-index targets of one-shape scenes, per attribute."""
    indices = [world.attribute_index(scene.shapes[0]) for scene in scenes]
    return {name: torch.tensor([ix[name] for ix in indices]) for name in world.ATTRIBUTES}


@torch.no_grad()
def measure(evaluator: Evaluator, images: torch.Tensor, batch: int = 256):
    """Features and logits of many images, in batches."""
    feats, logits = [], {name: [] for name in world.ATTRIBUTES}
    for i in range(0, len(images), batch):
        f, lg = evaluator(images[i:i + batch])
        feats.append(f)
        for name in logits:
            logits[name].append(lg[name])
    return torch.cat(feats), {name: torch.cat(v) for name, v in logits.items()}

