"""The embedded "shapes" world: a procedural text-to-image domain with ground truth.

Each scene is one shape (two with `shapes_per_image=2`) with a colour, kind, size and position on a coloured
background; each comes with a caption drawn from a small grammar and its attributes. Everything is a pure
function of a seed. Some (colour, kind) pairs are held out of training to measure composition.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = {  # name -> RGB; far apart so a small classifier can tell them from a 64x64 render
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230),
    "yellow": (240, 210, 40), "purple": (150, 60, 190), "orange": (245, 130, 30),
}
KINDS = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.16, "medium": 0.24, "large": 0.34}  # radius as a fraction of the image side
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}
BACKGROUNDS = ((30, 30, 40), (60, 60, 70), (200, 200, 195), (235, 235, 230), (40, 55, 70), (70, 50, 45))
ATTRIBUTES = {"colour": tuple(COLOURS), "kind": KINDS, "size": tuple(SIZES), "position": tuple(POSITIONS)}
# (colour, kind) pairs never shown in training: one per kind, each colour at most once.
HELDOUT_PAIRS = frozenset({("red", "triangle"), ("blue", "cross"), ("yellow", "circle"), ("purple", "square")})

SIZE_WORDS = {"small": ("small", "tiny", "little"), "medium": ("medium", "medium-sized", "mid-sized"),
              "large": ("large", "big", "huge")}
POSITION_WORDS = {"left": ("on the left", "at the left", "in the left part"),
                  "right": ("on the right", "at the right", "in the right part"),
                  "top": ("at the top", "near the top", "in the upper part"),
                  "bottom": ("at the bottom", "near the bottom", "in the lower part"),
                  "center": ("in the center", "in the middle", "at the centre")}
KIND_WORDS = {"circle": ("circle", "disc"), "square": ("square", "box"), "triangle": ("triangle",),
              "cross": ("cross", "plus sign")}
TEMPLATES = ("a {size} {colour} {kind} {position}", "{size} {colour} {kind} {position}",
             "there is a {size} {colour} {kind} {position}", "an image of a {size} {colour} {kind} {position}",
             "{position}, a {size} {colour} {kind}")


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    size: str
    position: str

    def attributes(self) -> dict[str, str]:
        return {"colour": self.colour, "kind": self.kind, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: int  # index into BACKGROUNDS
    jitter: tuple[float, float]  # small offset of the whole layout, as a fraction of the side
    caption: str


def split_of(shape: Shape) -> str:
    return "heldout" if (shape.colour, shape.kind) in HELDOUT_PAIRS else "train"


@functools.cache  # built once per split: every scene draws from it
def all_shapes(split: str) -> tuple[Shape, ...]:
    """Every attribute combination in a split ("train" or "heldout"), in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    combos = [Shape(c, k, s, p) for c in COLOURS for k in KINDS for s in SIZES for p in POSITIONS]
    return tuple(shape for shape in combos if split_of(shape) == split)


def describe(shape: Shape, rng: random.Random) -> str:
    """One caption for a shape, drawn from the grammar."""
    template = rng.choice(TEMPLATES)
    text = template.format(size=rng.choice(SIZE_WORDS[shape.size]), colour=shape.colour,
                           kind=rng.choice(KIND_WORDS[shape.kind]), position=rng.choice(POSITION_WORDS[shape.position]))
    return text


def sample_scene(seed: int, split: str = "train", shapes_per_image: int = 1) -> Scene:
    """A scene as a pure function of (seed, split): attributes, background, layout jitter and caption."""
    rng = random.Random(f"scene:{split}:{shapes_per_image}:{seed}")
    if shapes_per_image not in (1, 2):
        raise ValueError(f"shapes_per_image must be 1 or 2, got {shapes_per_image}")
    pool = all_shapes(split)
    if shapes_per_image == 2:  # two shapes at two different off-centre positions, joined with "and"
        pool = [s for s in pool if s.position != "center"]
    shapes = [rng.choice(pool)]
    if shapes_per_image == 2:
        shapes.append(rng.choice([s for s in pool if s.position != shapes[0].position]))
    caption = " and ".join(describe(s, rng) for s in shapes)
    jitter = (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
    return Scene(tuple(shapes), rng.randrange(len(BACKGROUNDS)), jitter, caption)


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        h = r * 0.86
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "cross":
        a, b = r, r * 0.34
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(f"unknown kind {kind!r}")


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw a scene at `size` x `size` pixels (anti-aliased by drawing large and downsampling)."""
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        fx, fy = POSITIONS[shape.position]
        cx, cy, r = (fx + scene.jitter[0]) * big, (fy + scene.jitter[1]) * big, SIZES[shape.size] * big
        if len(scene.shapes) == 2:
            r *= 0.75
        colour = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_polygon(shape.kind, cx, cy, r), fill=colour)
    return image.resize((size, size), Image.LANCZOS)


def to_tensor_array(images: list[Image.Image]) -> np.ndarray:
    """PIL images -> float32 array (N, 3, H, W) in [-1, 1], the VAE's and evaluator's input range."""
    return np.stack([np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0 for im in images])


def render_tensor(scenes: list[Scene], size: int = 64) -> torch.Tensor:
    """Scenes drawn at `size` pixels, as one float32 tensor (N, 3, size, size) in [-1, 1]."""
    return torch.from_numpy(to_tensor_array([render(scene, size) for scene in scenes]))


def attribute_index(shape: Shape) -> dict[str, int]:
    """Attributes as class indices, in ATTRIBUTES order."""
    return {name: ATTRIBUTES[name].index(value) for name, value in shape.attributes().items()}
