"""The procedural image world: deterministic examples, captions and alt-texts that
say what they claim, and a scene parser that reads rendered images exactly."""

import io

import numpy as np
import pytest
from PIL import Image

from patchwork.training.imageworld import (
    CELLS,
    NOISE_KINDS,
    ImageWorld,
    Scene,
    Shape,
    caption,
    parse_image,
    read_caption,
    render,
)
from patchwork.training.imageworld.text import Mention


def test_examples_are_a_pure_function_of_seed_and_index():
    first, again, other = ImageWorld(seed=3)[17], ImageWorld(seed=3)[17], ImageWorld(seed=4)[17]
    assert first.scene == again.scene and np.array_equal(first.image, again.image)
    assert (first.caption, first.alt_text, first.noise) == (again.caption, again.alt_text, again.noise)
    assert [ImageWorld(seed=3)[i].scene for i in range(20)] != [ImageWorld(seed=4)[i].scene for i in range(20)]
    assert other.image.shape == (32, 32, 3) and other.image.dtype == np.uint8
    assert ImageWorld(image_size=64)[0].image.shape == (64, 64, 3)
    with pytest.raises(ValueError, match="image_size must be 32 or 64"):
        ImageWorld(image_size=48)


@pytest.mark.parametrize("image_size", [32, 64])
def test_jitter_bounds_how_far_a_shape_sits_from_its_cells_centre(image_size):
    from patchwork.training.imageworld.scene import side_of

    def offsets(world):
        found = {}
        for example in world.take(400):
            for shape in example.scene.shapes:
                room = image_size // 2 - side_of(shape.size, image_size) - 1
                found.setdefault(shape.size, set()).update({shape.dx - (1 + room) // 2, shape.dy - (1 + room) // 2})
        return found

    centred, free = offsets(ImageWorld(seed=1, image_size=image_size, jitter=0)), offsets(ImageWorld(seed=1,
                                                                                              image_size=image_size))
    assert centred == {"small": {0}, "large": {0}}
    assert len(free["small"]) > 3  # anywhere in the cell
    assert all(-1 <= o <= 1 for found in offsets(ImageWorld(seed=1, image_size=image_size, jitter=1)).values()
               for o in found)
    world = ImageWorld(seed=1, image_size=image_size, jitter=0)
    assert [world[i].caption for i in range(50)] == [ImageWorld(seed=1, image_size=image_size)[i].caption
                                                      for i in range(50)]  # the same scenes, placed differently
    for example in world.take(100):
        assert parse_image(example.image) == example.scene
    with pytest.raises(ValueError, match="jitter"):
        ImageWorld(jitter=-1)


@pytest.mark.parametrize("image_size", [32, 64])
def test_the_parser_reads_every_rendered_scene_exactly(image_size):
    world = ImageWorld(seed=11, image_size=image_size)
    for example in world.take(400):
        assert parse_image(example.image) == example.scene  # kinds, colours, sizes, cells and placement


def test_the_parser_tolerates_noise_and_drops_specks():
    world, rng = ImageWorld(seed=5), np.random.default_rng(0)
    for example in world.take(200):
        noisy = np.clip(example.image + rng.normal(0, 20, example.image.shape), 0, 255).astype(np.uint8)
        assert parse_image(noisy).attributes == example.scene.attributes
        compressed = io.BytesIO()
        Image.fromarray(example.image).save(compressed, "JPEG", quality=90)
        assert parse_image(np.asarray(Image.open(compressed))).attributes == example.scene.attributes
    speck = render(Scene((Shape("square", "red", "large", 0, 2, 2),))).copy()
    speck[25, 25] = (50, 80, 220)  # one blue pixel in another cell
    assert parse_image(speck).attributes == [("square", "red", "large", 0)]


def test_a_true_caption_reads_back_as_its_scene():
    scene = Scene((Shape("circle", "red", "large", 0), Shape("square", "blue", "small", 3)))
    assert caption(scene) == "a large red circle at the top left and a small blue square at the bottom right"
    for example in ImageWorld(seed=2).take(300):
        mentions = read_caption(example.caption)
        assert [(m.kind, m.colour, m.size, m.cell) for m in mentions] == example.scene.attributes


def test_alt_texts_carry_exactly_the_noise_they_record():
    examples = ImageWorld(seed=7, noisy_fraction=0.5).take(1200)
    seen = {kind: 0 for kind in NOISE_KINDS}
    for example in examples:
        truth = example.scene.attributes
        said = [(m.kind, m.colour, m.size, m.cell) for m in read_caption(example.alt_text)]
        if not example.noise:
            assert example.alt_text == example.caption
            continue
        (noise,) = example.noise
        seen[noise] += 1
        if noise == "boilerplate":
            assert example.caption in example.alt_text and example.alt_text != example.caption
        elif noise == "spam":
            assert said == []
        elif noise == "missing_object":
            assert len(said) == len(truth) - 1 and set(said) < set(truth)
        else:
            differ = [(s, t) for s, t in zip(said, truth) if s != t]
            assert len(said) == len(truth) and len(differ) == 1
            (s, t), = differ
            changed = {name for name, a, b in zip(("kind", "colour", "size", "cell"), s, t) if a != b}
            expected = {"wrong_colour": {"colour"}, "wrong_shape": {"kind"}}.get(noise)
            if expected is not None:
                assert changed == expected
            else:  # missing_attribute: a size or a colour left out, nothing else changed
                assert len(changed) == 1 and None in s
    noisy = sum(seen.values())
    assert 0.4 < noisy / len(examples) < 0.6 and all(count > 0 for count in seen.values())
    # What a text leaves out reads as None.
    assert read_caption("A small circle, and a blue triangle at the top right") == [
        Mention("circle", None, "small", None), Mention("triangle", "blue", None, CELLS.index("top right"))]
