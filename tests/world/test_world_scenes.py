"""The embedded shapes world: deterministic scenes and renders, captions that name every attribute, and a clean
held-out split of (colour, kind) pairs."""
import itertools
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from tbcm.world import world

SEEDS = range(200)


def pixel_centre(scene: world.Scene, shape: world.Shape, size: int, mirror: bool = False) -> tuple[int, int]:
    """Pixel (row, col) of a shape's centre in a `size` render (or of the point mirrored through the image centre)."""
    fx, fy = world.POSITIONS[shape.position]
    if mirror:
        fx, fy = 1 - fx, 1 - fy
    return int((fy + scene.jitter[1]) * size), int((fx + scene.jitter[0]) * size)


def patch_mean(image: np.ndarray, row: int, col: int) -> np.ndarray:
    return image[row - 1:row + 2, col - 1:col + 2].reshape(-1, 3).mean(0)


def words_present(text: str, table: dict[str, tuple[str, ...]]) -> set[str]:
    """The attribute values whose words or phrases occur in `text` as whole words."""
    return {value for value, words in table.items()
            if any(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text) for w in words)}


COLOUR_WORDS = {c: (c,) for c in world.COLOURS}


def test_scene_and_render_are_deterministic_by_seed():
    for seed in (0, 1, 12345):
        a, b = world.sample_scene(seed), world.sample_scene(seed)
        assert a == b
        im_a, im_b = world.render(a), world.render(b)
        assert im_a.size == (64, 64) and im_a.mode == "RGB"
        assert im_a.tobytes() == im_b.tobytes()
        small = world.render(a, size=32)
        assert small.size == (32, 32) and small.mode == "RGB"
    scenes = {world.sample_scene(seed) for seed in range(30)}
    assert len(scenes) > 20  # the seed matters


def test_scene_is_the_same_in_another_process(tmp_path):
    """Seeds are strings hashed by random.Random (not hash()), so PYTHONHASHSEED cannot change a scene."""
    code = "from tbcm.world import world; s = world.sample_scene(7, 'heldout', 2); print(repr((s.caption, s.jitter)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=tmp_path)
    here = world.sample_scene(7, "heldout", 2)
    assert out.stdout.strip() == repr((here.caption, here.jitter))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_colour_appears_at_the_stated_position(split):
    for seed in range(60):
        scene = world.sample_scene(seed, split)
        image = np.asarray(world.render(scene), dtype=np.float64)
        shape = scene.shapes[0]
        colour = np.array(world.COLOURS[shape.colour])
        background = np.array(world.BACKGROUNDS[scene.background])
        assert np.abs(patch_mean(image, *pixel_centre(scene, shape, 64)) - colour).max() < 8, (seed, shape)
        if shape.position == "center":
            far = [image[2, 2], image[2, -3], image[-3, 2], image[-3, -3]]
        else:  # the opposite side holds only background
            far = [patch_mean(image, *pixel_centre(scene, shape, 64, mirror=True))]
        for pixel in far:
            assert np.abs(pixel - background).max() < 8, (seed, shape)
            assert np.abs(pixel - colour).max() > 40


def test_two_shape_scenes_draw_both_shapes_at_two_positions():
    """Both colours appear at their positions. Large shapes at adjacent positions can overlap (the second drawn
    covers part of the first, up to about a pixel from its centre), so look for the colour within +-2 pixels."""
    for seed in range(100):
        scene = world.sample_scene(seed, "train", shapes_per_image=2)
        first, second = scene.shapes
        assert first.position != second.position
        assert "center" not in (first.position, second.position)
        image = np.asarray(world.render(scene), dtype=np.float64)
        for shape in scene.shapes:
            row, col = pixel_centre(scene, shape, 64)
            window = image[row - 2:row + 3, col - 2:col + 3].reshape(-1, 3)
            distance = np.abs(window - np.array(world.COLOURS[shape.colour])).max(1)
            assert (distance < 8).sum() >= 5, (seed, shape)


@pytest.mark.parametrize("split,shapes_per_image", [("train", 1), ("heldout", 1), ("train", 2), ("heldout", 2)])
def test_caption_names_every_attribute(split, shapes_per_image):
    for seed in SEEDS:
        scene = world.sample_scene(seed, split, shapes_per_image)
        parts = scene.caption.split(" and ")
        assert len(parts) == shapes_per_image, scene.caption
        for part, shape in zip(parts, scene.shapes):
            # exactly the right value of every attribute is named, and no other value of it
            assert words_present(part, COLOUR_WORDS) == {shape.colour}, part
            assert words_present(part, world.KIND_WORDS) == {shape.kind}, part
            assert words_present(part, world.SIZE_WORDS) == {shape.size}, part
            assert words_present(part, world.POSITION_WORDS) == {shape.position}, part


def test_grammar_gives_several_phrasings():
    shape = world.Shape("green", "square", "medium", "top")
    captions = {world.describe(shape, random.Random(i)) for i in range(300)}
    assert len(captions) >= 30
    # every template is used
    patterns = [re.compile("^" + re.escape(t).replace(r"\{size\}", ".+").replace(r"\{colour\}", ".+")
                           .replace(r"\{kind\}", ".+").replace(r"\{position\}", ".+") + "$")
                for t in world.TEMPLATES]
    used = {i for c in captions for i, p in enumerate(patterns) if p.match(c)}
    assert used == set(range(len(world.TEMPLATES)))
    # and every synonym of each attribute
    for table, value in ((world.SIZE_WORDS, "medium"), (world.KIND_WORDS, "square"), (world.POSITION_WORDS, "top")):
        for word in table[value]:
            assert any(word in c for c in captions), word


def test_heldout_and_train_are_disjoint_and_cover_everything():
    train, heldout = world.all_shapes("train"), world.all_shapes("heldout")
    everything = {world.Shape(*combo) for combo in itertools.product(world.COLOURS, world.KINDS, world.SIZES,
                                                                     world.POSITIONS)}
    assert len(everything) == 6 * 4 * 3 * 5
    assert set(train).isdisjoint(heldout)
    assert set(train) | set(heldout) == everything
    assert len(train) == len(set(train)) and len(heldout) == len(set(heldout))
    assert {(s.colour, s.kind) for s in heldout} == set(world.HELDOUT_PAIRS)
    assert len(heldout) == len(world.HELDOUT_PAIRS) * len(world.SIZES) * len(world.POSITIONS)
    # one held-out pair per kind, each colour at most once
    kinds = [k for _, k in world.HELDOUT_PAIRS]
    colours = [c for c, _ in world.HELDOUT_PAIRS]
    assert sorted(kinds) == sorted(world.KINDS) and len(set(colours)) == len(colours)
    assert world.all_shapes.__wrapped__("train") == train  # a fixed order, built afresh or cached


def test_train_scenes_never_show_a_heldout_pair():
    seen = set()
    for shapes_per_image in (1, 2):
        for seed in range(800):
            for shape in world.sample_scene(seed, "train", shapes_per_image).shapes:
                assert (shape.colour, shape.kind) not in world.HELDOUT_PAIRS, (seed, shape)
                assert world.split_of(shape) == "train"
                seen.add(shape)
            for shape in world.sample_scene(seed, "heldout", shapes_per_image).shapes:
                assert (shape.colour, shape.kind) in world.HELDOUT_PAIRS, (seed, shape)
    # and the train split really is sampled over all its attribute values
    for name, values in world.ATTRIBUTES.items():
        assert {getattr(s, name) for s in seen} == set(values)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="split"):
        world.sample_scene(0, "test")
    with pytest.raises(ValueError, match="split"):
        world.all_shapes("validation")
    for n in (0, 3):
        with pytest.raises(ValueError, match="shapes_per_image"):
            world.sample_scene(0, "train", n)


def test_to_tensor_array_and_attribute_index():
    scenes = [world.sample_scene(i) for i in range(3)]
    images = [world.render(s, 32) for s in scenes]
    array = world.to_tensor_array(images)
    assert array.shape == (3, 3, 32, 32) and array.dtype == np.float32
    assert array.min() >= -1 and array.max() <= 1
    expected = np.asarray(images[1], dtype=np.float32)[5, 7] / 127.5 - 1  # pixel (row 5, col 7), RGB
    np.testing.assert_allclose(array[1, :, 5, 7], expected, rtol=0, atol=1e-6)
    index = world.attribute_index(scenes[0].shapes[0])
    assert {name: world.ATTRIBUTES[name][i] for name, i in index.items()} == scenes[0].shapes[0].attributes()


def test_render_tensor_is_the_array_of_the_renders():
    scenes = [world.sample_scene(i) for i in range(2)]
    tensor = world.render_tensor(scenes, 16)
    np.testing.assert_array_equal(tensor.numpy(), world.to_tensor_array([world.render(s, 16) for s in scenes]))


def test_the_world_as_a_distillation_runs_sources():
    from tbcm.world import sources

    captions = sources.training_captions(seed=3, count=50)
    assert captions == sources.training_captions(seed=3, count=50) != sources.training_captions(seed=4, count=50)
    samples = sources.sample_captions(4)
    assert samples == [world.sample_scene(i, "heldout" if i % 2 else "train").caption for i in range(4)]
    random.seed(7)
    captions, images = sources.SceneImages().sample(3, 16)
    random.seed(7)
    assert (captions, images.shape) == (sources.SceneImages().sample(3, 16)[0], (3, 3, 16, 16))
    assert images.min() >= -1 and images.max() <= 1
