"""The miniature world: captions, their parsing, and deterministic clips that keep the shape in view."""
import itertools

import pytest
import torch

from miniature.world import (
    BACKGROUND_COLOURS,
    DEFAULT_WORLD,
    SHAPE_COLOURS,
    Caption,
    all_captions,
    parse_caption,
    render,
    vocabulary,
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


@pytest.mark.parametrize("seed", range(4))
def test_shape_stays_whole_and_moves_the_right_way(seed):
    for caption in all_captions()[seed::16]:
        clip = render(caption, seed)
        background = torch.tensor(BACKGROUND_COLOURS[caption.background]).view(1, 3, 1, 1)
        shape = torch.tensor(SHAPE_COLOURS[caption.colour]).view(1, 3, 1, 1)
        # Coverage of each pixel by the shape, recovered from the blend of the two colours.
        coverage = ((clip - background) * (shape - background)).sum(1) / (shape - background).pow(2).sum()
        area = coverage.sum(dim=(1, 2))
        assert float(area.max() - area.min()) < 0.02 * float(area.mean())  # never clipped by the border
        border = torch.cat([coverage[:, 0], coverage[:, -1], coverage[:, :, 0], coverage[:, :, -1]], dim=1)
        assert float(border.abs().max()) < 1e-6
        xs = torch.arange(clip.shape[-1], dtype=torch.float32)
        ys = torch.arange(clip.shape[-2], dtype=torch.float32)
        cx = (coverage.sum(1) * xs).sum(-1) / area
        cy = (coverage.sum(2) * ys).sum(-1) / area
        step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[caption.direction]
        speed = DEFAULT_WORLD.speed(caption.speed)
        travel = torch.stack([cx[-1] - cx[0], cy[-1] - cy[0]])
        expected = torch.tensor(step, dtype=torch.float32) * speed * (clip.shape[0] - 1)
        assert torch.allclose(travel, expected, atol=0.25)  # 4x4 supersampling quantises sub-pixel coverage


def test_vocabulary_covers_every_caption_word():
    words = vocabulary()
    assert len(words) == len(set(words))
    for caption in all_captions():
        assert set(caption.text.split()) <= set(words)
