"""The miniature world: captions, their parsing, and deterministic clips that keep the shape in view."""
import itertools

import pytest
import torch

from miniature.world import (
    BACKGROUND_COLOURS,
    DEFAULT_WORLD,
    SHAPE_COLOURS,
    WORLDS,
    Caption,
    all_captions,
    parse_caption,
    render,
    vocabulary,
    world_named,
)
from utils.errors import UserError


def test_every_caption_parses_back_to_its_ground_truth():
    captions = all_captions()
    assert len(captions) == 2 * 4 * 4 * 2 * 4 == len(set(captions))
    for caption in captions:
        assert parse_caption(caption.text) == caption
    assert parse_caption("A  Red circle moving LEFT slowly on a blue background".replace("blue", "black")) == Caption(
        "circle", "red", "left", "slow", "black"
    )


@pytest.mark.parametrize(
    "text",
    [
        "a red triangle moving left slowly on a black background",  # unknown shape
        "a red circle moving left slowly on a red background",  # background from the shape palette
        "a red circle moving left sideways on a black background",  # unknown speed
        "a cat walks in the park",
    ],
)
def test_captions_outside_the_world_are_user_errors(text):
    with pytest.raises(UserError):
        parse_caption(text)


def test_colours_are_far_apart_and_palettes_disjoint():
    assert not set(SHAPE_COLOURS) & set(BACKGROUND_COLOURS)
    colours = [torch.tensor(c) for c in [*SHAPE_COLOURS.values(), *BACKGROUND_COLOURS.values()]]
    assert min(float((a - b).norm()) for a, b in itertools.combinations(colours, 2)) >= 2.0


def test_clip_geometry_matches_the_causal_vae_rule():
    spec = DEFAULT_WORLD
    assert spec.latent_frames % 3 == 0  # whole blocks of 3 latent frames
    clip = render(all_captions()[0], seed=0)
    assert clip.shape == (4 * (spec.latent_frames - 1) + 1, 3, spec.height, spec.width)
    assert clip.min() >= -1 and clip.max() <= 1


def test_render_is_deterministic_in_the_seed():
    caption = parse_caption("a green square moving up quickly on a white background")
    assert torch.equal(render(caption, 7), render(caption, 7))
    assert not torch.equal(render(caption, 7), render(caption, 8))


def _coverage(clip, caption):
    """Coverage of each pixel by the shape [T, H, W], recovered from the blend of the two colours."""
    background = torch.tensor(BACKGROUND_COLOURS[caption.background]).view(1, 3, 1, 1)
    shape = torch.tensor(SHAPE_COLOURS[caption.colour]).view(1, 3, 1, 1)
    return ((clip - background) * (shape - background)).sum(1) / (shape - background).pow(2).sum()


@pytest.mark.parametrize("seed", range(4))
def test_shape_in_the_bounded_world_stays_whole_and_moves_the_right_way(seed):
    spec = DEFAULT_WORLD
    assert not spec.wrap and WORLDS["bounded"] is spec
    for caption in all_captions()[seed::16]:
        clip = render(caption, seed, spec)
        coverage = _coverage(clip, caption)
        area = coverage.sum(dim=(1, 2))
        assert float(area.max() - area.min()) < 0.02 * float(area.mean())  # never clipped by the border
        border = torch.cat([coverage[:, 0], coverage[:, -1], coverage[:, :, 0], coverage[:, :, -1]], dim=1)
        assert float(border.abs().max()) < 1e-6
        xs = torch.arange(clip.shape[-1], dtype=torch.float32)
        ys = torch.arange(clip.shape[-2], dtype=torch.float32)
        cx = (coverage.sum(1) * xs).sum(-1) / area
        cy = (coverage.sum(2) * ys).sum(-1) / area
        step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[caption.direction]
        speed = spec.speed(caption.speed)
        travel = torch.stack([cx[-1] - cx[0], cy[-1] - cy[0]])
        expected = torch.tensor(step, dtype=torch.float32) * speed * (clip.shape[0] - 1)
        assert torch.allclose(travel, expected, atol=0.25)  # 4x4 supersampling quantises sub-pixel coverage


@pytest.mark.parametrize("seed", range(4))
def test_on_the_wrapping_canvas_the_shape_is_the_first_frame_rolled_along_its_direction(seed):
    """Far past the clip length (4x and beyond) every frame is the first frame rolled around the torus by the
    distance travelled: whole, the same size, crossing the border instead of leaving the canvas."""
    spec = world_named("wrap")
    for caption in all_captions()[seed::16]:
        speed = spec.speed(caption.speed)
        every = 10 if caption.speed == "slow" else 5  # frames after which the distance is 3 whole pixels
        clip = render(caption, seed, spec, num_frames=4 * spec.num_frames)
        assert torch.equal(clip[: spec.num_frames], render(caption, seed, spec))  # the same trajectory
        coverage = _coverage(clip, caption)
        area = coverage.sum(dim=(1, 2))
        assert float(area.max() - area.min()) < 0.02 * float(area.mean())
        dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[caption.direction]
        crossed = False
        for t in range(every, clip.shape[0], every):
            pixels = round(speed * t)
            rolled = torch.roll(clip[0], shifts=(dy * pixels, dx * pixels), dims=(1, 2))
            assert float((clip[t] - rolled).abs().mean()) < 1e-3, (caption.text, t)
            border = torch.cat([coverage[t, 0], coverage[t, -1], coverage[t, :, 0], coverage[t, :, -1]])
            crossed |= float(border.max()) > 0.5
        assert crossed  # the trajectory goes over the border at least once


def test_an_unknown_world_is_a_user_error():
    with pytest.raises(UserError, match="bounded, wrap"):
        world_named("sphere")


def test_vocabulary_covers_every_caption_word():
    words = vocabulary()
    assert len(words) == len(set(words))
    for caption in all_captions():
        assert set(caption.text.split()) <= set(words)
