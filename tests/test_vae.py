"""The Wan VAE wrapper: official key maps on the real key sets, loading tiny official-layout files of both
versions, latent shapes, normalisation against raw AutoencoderKLWan, streaming decode, and user errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan

from utils.errors import UserError
from wan.vae import WanVAEWrapper
from wan.vae_convert import diffusers_to_official_names, infer_vae_arch, official_to_diffusers_names

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
if not REFERENCE.is_dir():
    REFERENCE = Path("/work/shared/reference")

TINY_ARCH = {
    "wan2.1": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                   attn_scales=[]),
    "wan2.2": dict(base_dim=8, decoder_base_dim=12, z_dim=6, dim_mult=[1, 2, 2], num_res_blocks=1,
                   temperal_downsample=[True, True], attn_scales=[], is_residual=True, in_channels=12,
                   out_channels=12, patch_size=2),
}
TINY_STRIDE = {"wan2.1": (4, 4, 4), "wan2.2": (4, 8, 8)}


def read_key_list(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (REFERENCE / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split(" ", 1)
        shapes[key] = tuple(int(s) for s in shape.strip("() ").split(",") if s.strip())
    return shapes


def tiny_preset(version: str, **extra) -> dict:
    arch = TINY_ARCH[version]
    return {"kind": version, "z_dim": arch["z_dim"], "stride": list(TINY_STRIDE[version]), "arch": arch, **extra}


def tiny_diffusers_model(version: str, seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(**TINY_ARCH[version]).eval()


def write_official(model: AutoencoderKLWan, path: Path) -> dict[str, torch.Tensor]:
    """Save a diffusers model's weights under official names (the inverse map), as the official files are."""
    state = model.state_dict()
    mapping, unmapped = diffusers_to_official_names(state)
    assert not unmapped
    official = {mapping[k]: v.clone() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(official, str(path))
    else:
        torch.save(official, path)
    return official


# ----------------------------------------------------------------------------------------- 1. key maps
@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_key_map_is_a_shape_preserving_bijection_on_the_real_key_set(version):
    official = read_key_list(f"keys_official_wan{version}_vae.txt")
    diffusers = read_key_list(f"keys_diffusers_wan{version}_vae.txt")
    mapping, unmapped = official_to_diffusers_names(official)
    assert unmapped == []
    assert sorted(mapping.values()) == sorted(diffusers)  # every official key used, every diffusers key hit once
    assert all(official[k] == diffusers[v] for k, v in mapping.items())
    inverse, unmapped_back = diffusers_to_official_names(diffusers)
    assert unmapped_back == []
    assert all(inverse[v] == k for k, v in mapping.items())


@pytest.mark.parametrize(
    "version, z_dim, base_dim, decoder_base_dim, stride",
    [("2.1", 16, 96, None, 8), ("2.2", 48, 160, 256, 16)],
)
def test_architecture_read_from_real_shapes_rebuilds_the_real_model(version, z_dim, base_dim, decoder_base_dim, stride):
    diffusers = read_key_list(f"keys_diffusers_wan{version}_vae.txt")
    arch = infer_vae_arch(diffusers)
    assert (arch["z_dim"], arch["base_dim"], arch["decoder_base_dim"]) == (z_dim, base_dim, decoder_base_dim)
    assert arch["scale_factor_spatial"] == stride and arch["scale_factor_temporal"] == 4
    with torch.device("meta"):
        model = AutoencoderKLWan(**arch)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == diffusers


# ----------------------------------------------------------------------------------------- 2. loading
@pytest.mark.parametrize("version", ["wan2.1", "wan2.2"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_tiny_official_file_loads_every_key(tmp_path, version, suffix):
    source = tiny_diffusers_model(version)
    path = tmp_path / f"vae{suffix}"
    official = write_official(source, path)
    assert ("encoder.downsamples.0.downsamples.0.residual.0.gamma" in official) == (version == "wan2.2")
    vae = WanVAEWrapper.from_pretrained(path)
    assert vae.version == version and vae.z_dim == TINY_ARCH[version]["z_dim"]
    assert vae.stride == TINY_STRIDE[version]
    loaded = vae.model.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    # a tiny file is not the real VAE: its latents are not normalised by the published numbers
    assert torch.equal(vae.latents_mean, torch.zeros(vae.z_dim)) and torch.equal(vae.latents_std, torch.ones(vae.z_dim))


def test_diffusers_folder_and_state_dict_wrapper_load(tmp_path):
    source = tiny_diffusers_model("wan2.2", seed=3)
    source.save_pretrained(tmp_path / "repo" / "vae")
    vae = WanVAEWrapper.from_pretrained(tmp_path / "repo")  # the parent of vae/ is accepted too
    assert vae.version == "wan2.2"
    assert all(torch.equal(vae.model.state_dict()[k], v) for k, v in source.state_dict().items())
    # an official file may also hold its weights under "state_dict"
    official = write_official(source, tmp_path / "plain.pth")
    torch.save({"state_dict": official}, tmp_path / "nested.pth")
    assert WanVAEWrapper.from_pretrained(tmp_path / "nested.pth", dtype=torch.bfloat16).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------- 3. shapes
@pytest.mark.parametrize("version", ["wan2.1", "wan2.2"])
def test_encode_decode_shapes(version):
    vae = WanVAEWrapper.from_preset(tiny_preset(version), seed=0)
    st, sh, sw = vae.stride
    for frames in (1, 5, 9):
        video = torch.rand(2, 3, frames, 2 * sh, 3 * sw) * 2 - 1
        with torch.no_grad():
            latents = vae.encode_to_latent(video)
            assert latents.shape == (2, (frames - 1) // st + 1, vae.z_dim, 2, 3)
            pixels = vae.decode_to_pixel(latents)
        assert pixels.shape == (2, frames, 3, 2 * sh, 3 * sw)
        assert pixels.abs().max() <= 1.0


@pytest.mark.parametrize(
    "version, frames, height, width, expected",
    [("2.2", 81, 704, 1280, (1, 21, 48, 44, 80)), ("2.1", 81, 480, 832, (1, 21, 16, 60, 104))],
)
def test_real_size_latent_shapes_on_meta(version, frames, height, width, expected):
    """The real architectures (read from the reference key lists) on the meta device: shapes, no memory."""
    arch = infer_vae_arch(read_key_list(f"keys_diffusers_wan{version}_vae.txt"))
    kind = f"wan{version}"
    stride = (arch["scale_factor_temporal"], arch["scale_factor_spatial"], arch["scale_factor_spatial"])
    vae = WanVAEWrapper.from_preset({"kind": kind, "z_dim": arch["z_dim"], "stride": list(stride), "arch": arch}, device="meta")
    assert vae.latent_shape(frames, height, width) == expected[1:]
    latents = vae.encode_to_latent(torch.empty(1, 3, frames, height, width, device="meta"))
    assert tuple(latents.shape) == expected
    pixels = vae.decode_to_pixel(latents)
    assert tuple(pixels.shape) == (1, frames, 3, height, width)


# ----------------------------------------------------------------------------------------- 4. normalisation
@pytest.mark.parametrize("version", ["wan2.1", "wan2.2"])
def test_normalisation_is_applied_and_inverted(version):
    z_dim = TINY_ARCH[version]["z_dim"]
    gen = torch.Generator().manual_seed(1)
    mean = (torch.randn(z_dim, generator=gen)).tolist()
    std = (torch.rand(z_dim, generator=gen) + 0.5).tolist()
    vae = WanVAEWrapper.from_preset(tiny_preset(version, latents_mean=mean, latents_std=std), seed=0)
    raw_model = vae.model
    video = torch.rand(1, 3, 5, 16, 16, generator=gen) * 2 - 1
    with torch.no_grad():
        latents = vae.encode_to_latent(video)
        raw = raw_model.encode(video).latent_dist.mode()  # [B, C, F, h, w], un-normalised
        m, s = torch.tensor(mean).view(1, -1, 1, 1, 1), torch.tensor(std).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(latents, ((raw - m) / s).permute(0, 2, 1, 3, 4))
        pixels = vae.decode_to_pixel(latents)
        torch.testing.assert_close(pixels, raw_model.decode(raw).sample.permute(0, 2, 1, 3, 4), atol=1e-5, rtol=1e-5)


def test_preset_latent_stats_apply_to_a_loaded_file(tmp_path):
    write_official(tiny_diffusers_model("wan2.1"), tmp_path / "vae.pth")
    mean, std = [0.5] * 4, [2.0] * 4
    vae = WanVAEWrapper.from_pretrained(tmp_path / "vae.pth", preset=tiny_preset("wan2.1", latents_mean=mean, latents_std=std))
    assert vae.latents_mean.tolist() == mean and vae.latents_std.tolist() == std
    with pytest.raises(UserError, match="z_dim"):
        WanVAEWrapper.from_pretrained(tmp_path / "vae.pth", preset=tiny_preset("wan2.2"))


# ----------------------------------------------------------------------------------------- 5. streaming
@pytest.mark.parametrize("version", ["wan2.1", "wan2.2"])
def test_streaming_decode_equals_full_decode(version):
    vae = WanVAEWrapper.from_preset(tiny_preset(version), seed=2)
    latents = torch.randn(1, 5, vae.z_dim, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = vae.decode_to_pixel(latents)
        decoder = vae.stream_decoder()
        blocks = [decoder.decode(latents[:, a:b]) for a, b in ((0, 1), (1, 3), (3, 5))]
        assert [b.shape[1] for b in blocks] == [1, 8, 8]
        torch.testing.assert_close(torch.cat(blocks, dim=1), full, atol=1e-5, rtol=0)
        decoder.reset()  # a second video through the same decoder starts clean
        torch.testing.assert_close(decoder.decode(latents), full, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------- 6. errors
def _one_line_naming(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message


def test_dit_file_given_as_vae_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "dit.safetensors"
    save_file({"patch_embedding.weight": torch.zeros(4, 4, 1, 2, 2), "blocks.0.modulation": torch.zeros(1, 6, 4)}, str(path))
    with pytest.raises(UserError, match="not a Wan VAE checkpoint") as err:
        WanVAEWrapper.from_pretrained(path)
    _one_line_naming(err, path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_refused(tmp_path, suffix):
    path = tmp_path / f"vae{suffix}"
    write_official(tiny_diffusers_model("wan2.1"), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="could not be read") as err:
        WanVAEWrapper.from_pretrained(path)
    _one_line_naming(err, path)


def test_mismatched_keys_are_refused(tmp_path):
    official = write_official(tiny_diffusers_model("wan2.2"), tmp_path / "ok.pth")
    extra = dict(official, **{"decoder.bogus.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(UserError, match="decoder.bogus.weight") as err:
        WanVAEWrapper.from_pretrained(tmp_path / "extra.pth")
    _one_line_naming(err, tmp_path / "extra.pth")

    missing = {k: v for k, v in official.items() if k != "decoder.head.0.gamma"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(UserError, match="missing keys decoder.norm_out.gamma") as err:
        WanVAEWrapper.from_pretrained(tmp_path / "missing.pth")
    _one_line_naming(err, tmp_path / "missing.pth")

    reshaped = dict(official, **{"decoder.middle.1.proj.bias": torch.zeros(1)})
    torch.save(reshaped, tmp_path / "shape.pth")
    with pytest.raises(UserError, match="wrong shapes decoder.mid_block.attentions.0.proj.bias") as err:
        WanVAEWrapper.from_pretrained(tmp_path / "shape.pth")
    _one_line_naming(err, tmp_path / "shape.pth")


def test_bad_video_shape_is_refused():
    vae = WanVAEWrapper.from_preset(tiny_preset("wan2.1"))
    with pytest.raises(UserError, match="4\\*k\\+1"):
        vae.encode_to_latent(torch.zeros(1, 3, 4, 8, 8))


@pytest.mark.parametrize("name", ["tiny-wan2.1", "tiny-wan2.2"])
def test_shipped_tiny_presets_build_and_round_trip(name):
    from utils.presets import load_vae_preset

    preset = load_vae_preset(name)
    vae = WanVAEWrapper.from_preset(name, seed=0)
    assert vae.stride == tuple(preset["stride"]) and vae.z_dim == preset["z_dim"] and vae.version == preset["kind"]
    _, sh, sw = vae.stride
    with torch.no_grad():
        pixels = vae.decode_to_pixel(vae.encode_to_latent(torch.zeros(1, 3, 5, sh, sw)))
    assert pixels.shape == (1, 5, 3, sh, sw)


def test_verify_check_vae_with_tiny_weights(tmp_path):
    """verify.py vae on the tiny recipe: real computation with a weights file, all checks pass."""
    from toolbox.verification import vae_text as module
    from utils.config import load_config
    from utils.presets import load_vae_preset

    root = Path(__file__).resolve().parents[1]
    torch.manual_seed(0)
    write_official(AutoencoderKLWan(**load_vae_preset("tiny-wan2.1")["arch"]), tmp_path / "Wan2.1_VAE.pth")
    config = load_config(root / "configs" / "tiny" / "self_forcing_dmd.yaml", ["video.num_frames=9"])
    checks = module.check_vae(config, str(tmp_path))
    assert checks[0][0] == "vae.weights" and "Wan2.1_VAE.pth" in checks[0][2]
    assert all(passed for _, passed, _ in checks), checks
