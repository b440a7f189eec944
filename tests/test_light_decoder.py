"""The light decoder (TAEHV architecture) against the published implementation's own decodes.

The golden frames were made by the published taehv.py (tests/fixtures/make_taehv_golden.py) from the seeded
weights regenerated here, in the published key layout (tests/fixtures/taehv/*.keys.txt).
"""
from __future__ import annotations

import pytest
import torch

from tests.fixtures.light_decoder import CHECKPOINTS, golden, published_keys, seeded_state, write_checkpoint
from utils.errors import UserError
from wan.light_decoder import LightDecoder, check_light_decoder_matches, read_light_decoder_arch

TOLERANCE = 2e-5  # fp32 on a CPU; frames live in [-1, 1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("taehv")
    return {name: write_checkpoint(name, folder / f"{name}.pth") for name in CHECKPOINTS}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_whole_decode_equals_the_published_decode(checkpoints, name):
    latents, published = golden(name)
    decoder = LightDecoder.from_pretrained(checkpoints[name])
    channels, patch, variant = CHECKPOINTS[name]
    assert (decoder.latent_channels, decoder.patch_size, decoder.variant) == (channels, patch, variant)
    frames = decoder.decode(latents)
    assert frames.shape == (1, 4 * latents.shape[1] - 3, 3, 8 * patch * latents.shape[3], 8 * patch * latents.shape[4])
    assert (frames - (published * 2 - 1)).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("name", ["taew2_1", "taew2_2_super"])
def test_blocks_concatenated_equal_the_whole_decode(checkpoints, name):
    latents, published = golden(name)
    stream = LightDecoder.from_pretrained(checkpoints[name]).stream()
    blocks = [stream.decode(latents[:, :1]), stream.decode(latents[:, 1:3]), stream.decode(latents[:, 3:])]
    assert [b.shape[1] for b in blocks] == [1, 8, 4]  # 4f - 3 for the first block, 4f after
    assert (torch.cat(blocks, dim=1) - (published * 2 - 1)).abs().max().item() < TOLERANCE
    stream.reset()  # a new video starts from empty memory
    again = torch.cat([stream.decode(latents[:, :2]), stream.decode(latents[:, 2:])], dim=1)
    assert (again - (published * 2 - 1)).abs().max().item() < TOLERANCE


def test_variant_is_read_from_the_shapes_not_the_file_name(checkpoints, tmp_path):
    misnamed = tmp_path / "taew2_1.safetensors"  # a Wan2.2 decoder under a Wan2.1 name, as safetensors
    write_checkpoint("taew2_2", misnamed)
    decoder = LightDecoder.from_pretrained(misnamed)
    assert (decoder.latent_channels, decoder.patch_size) == (48, 2)
    assert read_light_decoder_arch(checkpoints["taew2_1"])["latent_channels"] == 16


def test_a_growth_layer_stored_for_stride_two_keeps_its_last_frame(tmp_path):
    """Checkpoints whose first growth layer holds two frames' channels load as the published loader does."""
    state = seeded_state(published_keys("taew2_1"))
    kept = state["decoder.7.conv.weight"]
    state["decoder.7.conv.weight"] = torch.cat([torch.randn_like(kept), kept])
    decoder = LightDecoder.from_pretrained(write_checkpoint("taew2_1", tmp_path / "wide.pth", state))
    latents, published = golden("taew2_1")
    assert (decoder.decode(latents) - (published * 2 - 1)).abs().max().item() < TOLERANCE


def test_damaged_checkpoints_are_refused_in_one_line(tmp_path):
    state = seeded_state(published_keys("taew2_1"))
    del state["decoder.9.conv.2.weight"]
    with pytest.raises(UserError, match="missing decoder.9.conv.2.weight"):
        LightDecoder.from_pretrained(write_checkpoint("taew2_1", tmp_path / "missing.pth", state))
    encoder_only = {k: v for k, v in seeded_state(published_keys("taew2_1")).items() if k.startswith("encoder.")}
    with pytest.raises(UserError, match="no decoder"):
        LightDecoder.from_pretrained(write_checkpoint("taew2_1", tmp_path / "encoder.pth", encoder_only))
    with pytest.raises(UserError, match="does not exist"):
        LightDecoder.from_pretrained(tmp_path / "absent.pth")


def test_a_decoder_for_other_latents_is_refused():
    arch = {"latent_channels": 16, "patch_size": 1, "variant": "base", "widths": (256, 128, 64, 64),
            "time_upscale": (False, True, True), "space_upscale": (True, True, True)}
    check_light_decoder_matches(arch, 16, (4, 8, 8), "taew2_1.pth")  # Wan2.1 latents: fine
    with pytest.raises(UserError, match="use taew2_1 for Wan2.1 latents.*taew2_2 for Wan2.2-TI2V-5B"):
        check_light_decoder_matches(arch, 48, (4, 16, 16), "taew2_1.pth")
    with pytest.raises(UserError, match="16-channel latents at 8x space and 4x time"):
        check_light_decoder_matches({**arch, "latent_channels": 16}, 16, (4, 16, 16), "x.pth")


@pytest.mark.parametrize("variant", ["base", "super"])
def test_our_own_export_round_trips_with_its_upscaling_stages(tmp_path, variant):
    """A decoder for other latents (6 channels, 4x space: the miniature VAE's) keeps its stages in the metadata."""
    torch.manual_seed(0)
    model = LightDecoder(latent_channels=6, variant=variant, widths=(16, 16, 8, 8), space_upscale=(True, True, False))
    assert model.spatial_upscale == 4 and model.t_upscale == 4
    path = model.save(tmp_path / "light_decoder.safetensors")
    loaded = LightDecoder.from_pretrained(path)
    assert loaded.arch() == model.arch()
    latents = torch.randn(1, 3, 6, 5, 4)
    frames = loaded.decode(latents)
    assert frames.shape == (1, 9, 3, 20, 16)
    assert torch.equal(frames, model.eval().decode(latents))
    check_light_decoder_matches(read_light_decoder_arch(path), 6, (4, 4, 4), path)
    with pytest.raises(UserError, match="4x space"):
        check_light_decoder_matches(read_light_decoder_arch(path), 6, (4, 8, 8), path)
