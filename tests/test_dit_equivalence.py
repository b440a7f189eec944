"""WanModel against diffusers' WanTransformer3DModel (an independent implementation) with converted weights."""
from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import WanTransformer3DModel

from tests.dit_helpers import relative_error, tiny_arch, tiny_model
from wan.convert import official_to_diffusers_config, official_to_diffusers_key
from wan.modules.embeddings import pad_context
from wan.modules.model import WanModel
from wan.modules.rope import rope_split

TOLERANCE = 1e-5


def diffusers_twin(model: WanModel) -> WanTransformer3DModel:
    accepted = inspect.signature(WanTransformer3DModel.__init__).parameters
    config = {k: v for k, v in official_to_diffusers_config(model.config).items() if k in accepted}
    twin = WanTransformer3DModel(**config).eval()
    state = {official_to_diffusers_key(k): v for k, v in model.state_dict().items()}
    twin.load_state_dict(state, strict=True)
    return twin


def diffusers_flow(twin, x, timestep, context, text_len):
    """diffusers takes [B, C, F, H, W] and does not pad the text: give it the zero-padded context."""
    out = twin(x.transpose(1, 2), timestep, pad_context(context, text_len), return_dict=False)[0]
    return out.transpose(1, 2)


@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-ti2v"])
def test_predict_flow_matches_diffusers_scalar_timestep(preset):
    torch.manual_seed(0)
    model = tiny_model(preset=preset)
    twin = diffusers_twin(model)
    channels = model.config["in_dim"]
    x = torch.randn(2, 3, channels, 4, 6)  # non-square latent, 3 frames
    context = torch.randn(2, 5, model.config["text_dim"])  # shorter than text_len
    t = torch.tensor([937.5, 250.0])
    ours = model.predict_flow(x, t[:, None].expand(-1, 3), context)
    theirs = diffusers_flow(twin, x, t, context, model.text_len)
    assert ours.shape == x.shape
    assert relative_error(ours, theirs) < TOLERANCE


def test_predict_flow_matches_diffusers_per_token_timesteps():
    """Wan2.2 style: one timestep per token ([B, seq_len]), here the TI2V mask (first frame at t = 0)."""
    torch.manual_seed(1)
    model = tiny_model(preset="tiny-ti2v", seed=3)
    twin = diffusers_twin(model)
    x = torch.randn(2, 3, 48, 6, 4)
    frame_tokens = (6 // 2) * (4 // 2)
    t = torch.tensor([999.0, 400.0])[:, None].expand(-1, 3 * frame_tokens).clone()
    t[:, :frame_tokens] = 0.0
    t[1, -1] = 17.0  # truly per token, not per frame
    context = torch.randn(2, 7, model.config["text_dim"])
    ours = model.predict_flow(x, t, context)
    theirs = diffusers_flow(twin, x, t, context, model.text_len)
    assert relative_error(ours, theirs) < TOLERANCE
    # The per-frame form equals the per-token form when the tokens of a frame share a timestep.
    per_frame = torch.tensor([[0.0, 999.0, 999.0]])
    per_token = per_frame.repeat_interleave(frame_tokens, dim=1)
    assert torch.allclose(
        model.predict_flow(x[:1], per_frame, context[:1]), model.predict_flow(x[:1], per_token, context[:1]), atol=1e-6
    )


def test_official_list_call_matches_predict_flow():
    model = tiny_model(preset="tiny-t2v", seed=5)
    x = torch.randn(2, 2, 16, 4, 4)
    context = [torch.randn(3, 32), torch.randn(9, 32)]
    t = torch.tensor([500.0, 20.0])
    seq_len = 2 * 2 * 2 + 4  # longer than the latent's 8 tokens, like the official padding
    listed = model(x=list(x.transpose(1, 2)), t=t, context=context, seq_len=seq_len)
    batched = model.predict_flow(x, t[:, None].expand(-1, 2), torch.stack([pad_context(c[None], 16)[0] for c in context]))
    assert [tuple(u.shape) for u in listed] == [(16, 2, 4, 4)] * 2
    assert torch.allclose(torch.stack(listed).transpose(1, 2), batched, atol=1e-6)
    # Per-token t of length seq_len (padding positions ignored) gives the same answer.
    per_token = t[:, None].expand(-1, seq_len)
    again = model(x=list(x.transpose(1, 2)), t=per_token, context=context, seq_len=seq_len)
    assert torch.allclose(torch.stack(again), torch.stack(listed), atol=1e-6)


def test_text_padding_matters_and_is_zero_padding():
    """Cross-attention sees all text_len rows: padding the context by hand changes nothing, truncating does."""
    model = tiny_model(seed=7)
    x, t = torch.randn(1, 2, 16, 4, 4), torch.full((1, 2), 600.0)
    context = torch.randn(1, 4, 32)
    base = model.predict_flow(x, t, context)
    assert torch.allclose(base, model.predict_flow(x, t, pad_context(context, 16)), atol=1e-6)
    assert not torch.allclose(base, model.predict_flow(x, t, context[:, :3]), atol=1e-4)


def test_state_dict_names_and_parameter_count_follow_the_reference():
    """Key names of the official 5B list (with layer indices < num_layers), no img_emb, and the per-block formula."""
    model = WanModel(**tiny_arch("tiny-ti2v"))
    reference = [line.split()[0] for line in open("/work/shared/reference/keys_official_wan2.2_ti2v_5b_dit.txt")
                 if not line.startswith("#")]  # fmt: skip
    expected = [k for k in reference if not k.startswith("blocks.") or int(k.split(".")[1]) < 2]
    assert list(model.state_dict().keys()) == expected
    d, f, channels = 256, 512, 48
    block = 8 * d * d + 2 * d * f + f + 21 * d
    outside = (4 * channels + 1) * d + (32 + 2) * d + d * d + (256 + 2) * d + d * d + 6 * d * d + 6 * d
    outside += 4 * channels * d + 4 * channels + 2 * d
    assert sum(p.numel() for p in model.parameters()) == 2 * block + outside


def test_rope_split_is_the_official_one():
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(64) == (24, 20, 20)


def test_geometry_is_required():
    arch = tiny_arch()
    del arch["dim"]
    with pytest.raises(TypeError):
        WanModel(**arch)
