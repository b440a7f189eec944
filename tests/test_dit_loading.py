"""Loading the DiT from every checkpoint layout, and one-line errors for broken checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.dit_helpers import tiny_arch, tiny_model
from utils.errors import UserError
from utils.presets import arch_to_config_json
from wan.convert import official_to_diffusers_config, official_to_diffusers_key
from wan.loading import load_weights_into
from wan.modules.causal_model import CausalWanModel
from wan.modules.model import WanModel
from wan.moe import MoEWanModel

SHARDS = ("diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors")


def write_sharded(folder: Path, state: dict, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    halves = {SHARDS[0]: keys[: len(keys) // 2], SHARDS[1]: keys[len(keys) // 2 :]}
    for name, shard_keys in halves.items():
        save_file({k: state[k].contiguous() for k in shard_keys}, folder / name)
    weight_map = {k: name for name, shard_keys in halves.items() for k in shard_keys}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_single(folder: Path, state: dict, config: dict, name="diffusion_pytorch_model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, folder / name)
    else:
        torch.save(state, folder / name)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def reference():
    model = tiny_model(WanModel, preset="tiny-t2v", seed=11)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 16, 4, 4, generator=generator)
    timestep = torch.tensor([[700.0, 300.0]])
    context = torch.randn(1, 3, 32, generator=generator)
    with torch.no_grad():
        flow = model.predict_flow(x, timestep, context)
    return model, (x, timestep, context), flow


def official_config(model) -> dict:
    return arch_to_config_json(model.config)


def assert_reproduces(loaded, reference):
    _, inputs, flow = reference
    assert not any(p.is_meta for p in loaded.parameters())
    with torch.no_grad():
        assert torch.allclose(loaded.predict_flow(*inputs), flow, atol=1e-6)


def test_sharded_official(tmp_path, reference):
    model = reference[0]
    folder = write_sharded(tmp_path / "ckpt", model.state_dict(), official_config(model))
    assert_reproduces(WanModel.from_pretrained(folder), reference)
    causal = CausalWanModel.from_pretrained(folder)  # the same checkpoint builds the causal student
    assert isinstance(causal, CausalWanModel)
    assert_reproduces(causal, reference)


def test_single_safetensors_pth_and_bare_file(tmp_path, reference):
    model = reference[0]
    single = write_single(tmp_path / "st", model.state_dict(), official_config(model))
    assert_reproduces(WanModel.from_pretrained(single), reference)
    pth = write_single(tmp_path / "pth", model.state_dict(), official_config(model), name="model.pth")
    assert_reproduces(WanModel.from_pretrained(pth), reference)
    assert_reproduces(WanModel.from_pretrained(pth / "model.pth", arch=tiny_arch("tiny-t2v")), reference)
    with pytest.raises(UserError, match="single weights file"):
        WanModel.from_pretrained(pth / "model.pth")


def test_diffusers_names_and_config(tmp_path, reference):
    model = reference[0]
    state = {official_to_diffusers_key(k): v for k, v in model.state_dict().items()}
    folder = write_single(tmp_path / "diffusers", state, official_to_diffusers_config(model.config))
    assert_reproduces(WanModel.from_pretrained(folder), reference)


def test_dtype_device_and_load_into_existing(tmp_path, reference):
    model = reference[0]
    folder = write_sharded(tmp_path / "ckpt", model.state_dict(), official_config(model))
    half = WanModel.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    target = tiny_model(WanModel, preset="tiny-t2v", seed=99)
    weight = target.blocks[0].self_attn.q.weight
    load_weights_into(target, folder)
    assert target.blocks[0].self_attn.q.weight is weight  # copied in place: optimizer references stay valid
    assert_reproduces(target, reference)


def test_moe_expert_folders(tmp_path, reference):
    high = tiny_model(WanModel, preset="tiny-t2v", seed=21)
    low = reference[0]
    write_sharded(tmp_path / "a14b" / "high_noise_model", high.state_dict(), official_config(high))
    write_sharded(tmp_path / "a14b" / "low_noise_model", low.state_dict(), official_config(low))
    moe = MoEWanModel.from_pretrained(tmp_path / "a14b", boundary=0.875)
    x, _, context = reference[1]
    with torch.no_grad():
        noisy = moe.predict_flow(x, torch.tensor([[900.0, 875.0]]), context)
        assert torch.allclose(noisy, high.predict_flow(x, torch.tensor([[900.0, 875.0]]), context), atol=1e-6)
        assert torch.allclose(moe.predict_flow(*reference[1]), reference[2], atol=1e-6)  # t = 700: low-noise expert
    with pytest.raises(UserError, match="straddle"):
        moe.predict_flow(x.repeat(2, 1, 1, 1, 1), torch.tensor([[900.0, 900.0], [100.0, 100.0]]), context.repeat(2, 1, 1))
    with pytest.raises(UserError, match="boundary"):
        MoEWanModel.from_pretrained(tmp_path / "a14b")


# ---- broken checkpoints: one line, naming the file --------------------------------------------


def _break(folder: Path, how: str, state: dict, config: dict) -> Path:
    """A sharded checkpoint broken in one way; returns the path the error must name."""
    if how == "missing key":
        state = {k: v for k, v in state.items() if k != "blocks.1.ffn.2.bias"}
    elif how == "extra key":
        state = {**state, "blocks.0.self_attn.extra.weight": torch.zeros(2)}
    elif how == "wrong shape":
        state = {**state, "head.modulation": torch.zeros(1, 3, 256)}
    write_sharded(folder, state, config)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if how == "extra key":  # the extra key lives in the second shard
        weight_map = json.loads(index.read_text())["weight_map"]
        weight_map["blocks.0.self_attn.extra.weight"] = SHARDS[1]
        index.write_text(json.dumps({"weight_map": weight_map}))
    if how == "missing shard":
        (folder / SHARDS[1]).unlink()
        return index
    if how == "missing config.json":
        (folder / "config.json").unlink()
        return folder
    if how == "truncated file":
        data = (folder / SHARDS[0]).read_bytes()
        (folder / SHARDS[0]).write_bytes(data[: len(data) // 2])
        return folder / SHARDS[0]
    if how in ("extra key", "wrong shape"):
        return folder / (SHARDS[1] if how == "extra key" else next(n for n in SHARDS if "head.modulation" in _keys(folder / n)))
    return folder


def _keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize(
    "how, words",
    [
        ("missing key", "blocks.1.ffn.2.bias"),
        ("extra key", "blocks.0.self_attn.extra.weight"),
        ("wrong shape", "head.modulation"),
        ("missing shard", SHARDS[1]),
        ("missing config.json", "config.json"),
        ("truncated file", "truncated"),
    ],
)
def test_broken_checkpoint_is_one_line_naming_the_file(tmp_path, reference, how, words):
    model = reference[0]
    named = _break(tmp_path / "ckpt", how, model.state_dict(), official_config(model))
    with pytest.raises(UserError) as caught:
        WanModel.from_pretrained(tmp_path / "ckpt")
    message = str(caught.value)
    assert "\n" not in message and str(named) in message and words in message, message


def test_truncated_pth_is_one_line(tmp_path, reference):
    model = reference[0]
    folder = write_single(tmp_path / "pth", model.state_dict(), official_config(model), name="model.pth")
    data = (folder / "model.pth").read_bytes()
    (folder / "model.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as caught:
        WanModel.from_pretrained(folder)
    assert "\n" not in str(caught.value) and str(folder / "model.pth") in str(caught.value)


def test_convert_script_round_trip(tmp_path, reference):
    from tests.helpers import assert_one_line_error, run_script

    model = reference[0]
    source = write_sharded(tmp_path / "official", model.state_dict(), official_config(model))
    to_diffusers = run_script(["scripts/convert_checkpoint.py", "--input", str(source), "--output", str(tmp_path / "d"),
                               "--to", "diffusers", "--max_shard_gb", "0.0005"])  # fmt: skip
    assert to_diffusers.returncode == 0, to_diffusers.stderr
    index = json.loads((tmp_path / "d" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert set(index["weight_map"]) == {official_to_diffusers_key(k) for k in model.state_dict()}
    assert json.loads((tmp_path / "d" / "config.json").read_text())["num_attention_heads"] == 2
    back = run_script(["scripts/convert_checkpoint.py", "--input", str(tmp_path / "d"), "--output", str(tmp_path / "o"),
                       "--to", "official"])  # fmt: skip
    assert back.returncode == 0, back.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert_reproduces(WanModel.from_pretrained(tmp_path / "o"), reference)
    again = run_script(["scripts/convert_checkpoint.py", "--input", str(tmp_path / "d"), "--output", str(tmp_path / "o"),
                        "--to", "official"])  # fmt: skip
    assert_one_line_error(again, "not empty")
