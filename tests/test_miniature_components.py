"""The miniature VAE, DiT and text-encoder presets, and the shipped teacher and text-encoder weights."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from miniature.judge import eval_prompts, score_clip
from miniature.vae import LATENT_STD_FLOOR, MiniatureVAE, latent_statistics, temporal_polynomial_basis
from miniature.world import DEFAULT_WORLD, TEACHER_FOLDERS, all_captions, parse_caption, render, vocabulary
from utils.errors import UserError
from utils.presets import ARCH_FIELDS, read_checkpoint_config
from wan.loading import list_like

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs" / "miniature"
CHECKPOINTS = REPO_ROOT / "checkpoints" / "miniature"


def _preset(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"), resolve=True)


@pytest.fixture(scope="module")
def vae() -> MiniatureVAE:
    return MiniatureVAE.from_preset(_preset("vae"))


def _as_vae_input(clips: torch.Tensor) -> torch.Tensor:
    return clips.permute(0, 2, 1, 3, 4)  # [B, T, 3, H, W] -> [B, 3, T, H, W]


# ------------------------------------------------------------------------------------------------ VAE
def test_vae_interface_and_latent_geometry(vae):
    assert vae.version == "miniature" and vae.z_dim == 6 and vae.stride == (4, 4, 4)
    clip = render(all_captions()[0], 0).unsqueeze(0)
    latents = vae.encode_to_latent(_as_vae_input(clip))
    assert latents.shape == (1, DEFAULT_WORLD.latent_frames, 6, 8, 8)
    assert vae.latent_shape(DEFAULT_WORLD.num_frames, 32, 32) == tuple(latents.shape[1:])
    video = vae.decode_to_pixel(latents)
    assert video.shape == clip.shape and video.min() >= -1 and video.max() <= 1


def test_vae_round_trip_keeps_the_judge_score(vae):
    prompts = eval_prompts()
    captions = [parse_caption(text) for text, _ in prompts]
    clips = torch.stack([render(c, seed) for c, (_, seed) in zip(captions, prompts)])
    decoded = vae.decode_to_pixel(vae.encode_to_latent(_as_vae_input(clips)))
    totals = [score_clip(video, caption)["total"] for video, caption in zip(decoded, captions)]
    assert min(totals) >= 0.95, totals


def test_vae_is_exact_on_block_and_cell_constant_video(vae):
    # Content constant over 4x4 blocks and linear in time within each 4-frame cell is kept exactly.
    blocks = torch.rand(1, 3, 1, 8, 8) * 2 - 1
    ramp = torch.linspace(-0.5, 0.5, DEFAULT_WORLD.num_frames).view(1, 1, -1, 1, 1)
    video = (blocks * 0.5 + ramp).repeat_interleave(4, dim=-1).repeat_interleave(4, dim=-2)
    decoded = vae.decode_to_pixel(vae.encode_to_latent(video))
    assert torch.allclose(decoded.permute(0, 2, 1, 3, 4), video, atol=1e-5)


def test_vae_encoder_is_causal_in_time(vae):
    clip = _as_vae_input(render(all_captions()[5], 1).unsqueeze(0))
    changed = clip.clone()
    changed[:, :, 5:] = -changed[:, :, 5:]  # pixel frames 5.. belong to latent frames 2..
    a, b = vae.encode_to_latent(clip), vae.encode_to_latent(changed)
    assert torch.equal(a[:, :2], b[:, :2]) and not torch.equal(a[:, 2:], b[:, 2:])


def test_stream_decode_equals_full_decode(vae):
    latents = torch.randn(2, DEFAULT_WORLD.latent_frames, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    full = vae.decode_to_pixel(latents)
    decoder = vae.stream_decoder()
    blocks = [decoder.decode(latents[:, i : i + 3]) for i in range(0, latents.shape[1], 3)]
    assert [b.shape[1] for b in blocks] == [9, 12, 12]
    assert torch.equal(torch.cat(blocks, dim=1), full)
    decoder.reset()
    assert torch.equal(decoder.decode(latents[:, :3]), blocks[0])


def test_shipped_latent_statistics_match_the_world(vae):
    clips = torch.stack([render(c, i) for i, c in enumerate(all_captions()[::5])])  # stride 5 mixes every attribute
    mean, std = latent_statistics(vae, clips)
    assert torch.allclose(torch.tensor(mean), vae.latents_mean, atol=0.1)
    assert torch.allclose(torch.tensor(std), vae.latents_std, rtol=0.15)
    # Channels above the floor are unit-std after normalisation; floored ones (the trends) stay below 1.
    per_channel = vae.encode_to_latent(_as_vae_input(clips)).transpose(0, 2).reshape(vae.z_dim, -1).std(dim=1)
    floored = vae.latents_std == LATENT_STD_FLOOR
    assert floored.any() and bool((per_channel[floored] < 1.0).all())
    assert torch.allclose(per_channel[~floored], torch.ones(int((~floored).sum())), atol=0.15)


def test_temporal_basis_is_orthonormal_mean_and_trend():
    basis = temporal_polynomial_basis(4)
    assert torch.allclose(basis @ basis.T, torch.eye(4), atol=1e-6)
    assert torch.allclose(basis[0], torch.full((4,), 0.5))
    assert torch.allclose(basis[1], torch.tensor([-3.0, -1.0, 1.0, 3.0]) / 20**0.5)


def test_vae_rejects_bad_presets_and_inputs(vae):
    with pytest.raises(UserError, match="kind"):
        MiniatureVAE.from_preset({**_preset("vae"), "kind": "wan2.1"})
    with pytest.raises(UserError, match="latents_mean"):
        MiniatureVAE.from_preset({**_preset("vae"), "latents_std": [1.0] * 5})
    with pytest.raises(UserError, match="frames"):
        vae.encode_to_latent(torch.zeros(1, 3, 8, 32, 32))


# ------------------------------------------------------------------------------------------------ presets
def test_dit_preset_fits_the_vae_and_text_encoder(vae):
    dit, text = _preset("dit"), _preset("text_encoder")
    assert set(ARCH_FIELDS) <= set(dit)
    assert dit["in_dim"] == dit["out_dim"] == vae.z_dim
    assert dit["text_dim"] == text["d_model"] and dit["text_len"] >= text["text_len"]
    longest = max(len(c.text.split()) for c in all_captions())
    assert text["text_len"] >= longest + 1  # every caption fits with its EOS
    assert text["vocab"] == vocabulary()
    tokens_per_frame = (8 // dit["patch_size"][1]) * (8 // dit["patch_size"][2])
    assert tokens_per_frame == 16


# ------------------------------------------------------------------------------------------------ shipped weights
@pytest.mark.parametrize("name", list(TEACHER_FOLDERS.values()))  # every world's shipped teacher
def test_shipped_teacher_loads_with_the_preset_shapes(name):
    from wan.modules.model import WanModel

    folder = CHECKPOINTS / name
    config = read_checkpoint_config(folder)  # the official file may leave default fields out
    arch = {k: v for k, v in _preset("dit").items() if k != "vae"}
    assert {k: list_like(config[k]) for k in ARCH_FIELDS} == arch
    model = WanModel(**arch)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    loaded = WanModel.from_pretrained(str(folder))
    assert (folder / "model.safetensors").stat().st_size < 8 * 2**20
    x = torch.randn(1, 3, 6, 8, 8)
    v = loaded.predict_flow(x, torch.full((1, 3), 500.0), torch.randn(1, 11, arch["text_dim"]))
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_shipped_text_encoder_loads_and_is_fixed():
    from wan.text_encoder import WanTextEncoder

    path = CHECKPOINTS / "text_encoder.safetensors"
    encoder = WanTextEncoder.from_preset(_preset("text_encoder"), weights=path)
    again = WanTextEncoder.from_preset(_preset("text_encoder"), weights=path)
    texts = [all_captions()[0].text, all_captions()[1].text]
    embeddings = encoder.encode(texts)
    assert embeddings.shape == (2, _preset("text_encoder")["text_len"], _preset("dit")["text_dim"])
    assert torch.equal(embeddings, again.encode(texts))
    assert not torch.allclose(embeddings[0], embeddings[1])  # the captions differ in one word
