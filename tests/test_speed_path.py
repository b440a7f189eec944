"""The inference speed path: compiled blocks equal eager ones and compile once per block size; the GPU check
script runs end to end (--dry-run, tiny recipes on the CPU) and refuses bad input in one line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.dit_helpers import relative_error, tiny_model
from tests.helpers import REPO_ROOT, assert_one_line_error
from utils.config import load_config
from utils.errors import UserError
from wan.modules.causal_model import CausalWanModel
from wan.modules.kv_cache import KVCache

HEIGHT, WIDTH, FRAMES, BLOCK = 4, 6, 12, 3


def _rollout(model, cache_frames=6, sink=1):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, FRAMES, model.config["in_dim"], HEIGHT, WIDTH, generator=generator)
    timestep = torch.rand(1, FRAMES, generator=generator) * 1000
    context = torch.randn(1, 5, model.config["text_dim"], generator=generator)
    config = model.config
    cache = KVCache(config["num_layers"], 1, cache_frames, (HEIGHT // 2) * (WIDTH // 2), config["num_heads"],
                    model.head_dim, torch.float32, "cpu", sink_frames=sink)  # fmt: skip
    outputs = []
    with torch.no_grad():
        for start in range(0, FRAMES, BLOCK):
            block = slice(start, start + BLOCK)
            model.forward_cached(x[:, block], timestep[:, block], context, cache, start, commit=False)
            outputs.append(model.forward_cached(x[:, block], timestep[:, block], context, cache, start, commit=True))
    return torch.cat(outputs, dim=1)


@pytest.mark.slow
def test_compiled_blocks_equal_eager_and_compile_once_per_block_size():
    """Four blocks (growing cache, then a rolling window with a sink), two forwards each, every layer: one
    compilation of the block (its two regions around the cached attention) serves them all."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from pipeline.components import compile_blocks

    model = tiny_model(CausalWanModel, seed=3)
    eager = _rollout(model)
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(model, True, "default", torch.device("cpu"))
    compiled = _rollout(model)
    assert relative_error(compiled, eager) < 1e-5
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    again = _rollout(model)
    assert counters["stats"]["unique_graphs"] == 2 and torch.equal(again, compiled)
    torch._dynamo.reset()


def test_compile_setting_defaults_to_the_device():
    model = tiny_model(CausalWanModel)
    assert not compile_blocks_default(model, "cpu")  # empty: off on a CPU
    assert load_config(None).inference.compile is None
    with pytest.raises(UserError, match="inference.compile_mode"):
        load_config(None, ["inference.compile_mode=fastest"])


def compile_blocks_default(model, device: str) -> bool:
    from pipeline.components import compile_blocks

    return compile_blocks(model, None, "default", torch.device(device))


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=900, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                            "PYTHON": sys.executable})  # fmt: skip


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "gpu_check"
    proc = _gpu_check("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    kinds = [item["kind"] for item in report["items"]]
    assert report["dry_run"] and kinds == ["inference", "train", "train", "memory", "inference"]
    inference = report["items"][0]["report"]
    backends = [row["attention_backend"] for row in inference["results"]]
    assert backends[0] == "sdpa" and "flex" in backends
    for row in inference["results"]:
        assert row["frames"] == 21 and row["fps"] > 0 and row["denoise_fps"] >= row["fps"] and row["first_block_latency_s"] > 0
        assert row["decode_fps"] > 0
    decoding = [(row["decoder"], row["overlap_decode"]) for row in inference["results"]]
    assert decoding[:2] == [("full", False), ("light", True)]
    (long_row,) = report["items"][4]["report"]["results"]
    assert long_row["frames"] == 69 and (long_row["decoder"], long_row["overlap_decode"]) == ("light", True)
    # flash is either measured or skipped with the reason (flash-attn is not installed on a CPU machine)
    flash_skips = [s for s in inference["skipped"] if s["variant"].startswith("flash")]
    assert "flash" in backends or "flash-attn" in flash_skips[0]["reason"]
    memory = report["items"][3]
    assert memory["returncode"] == 0 and 0.9 <= memory["report"]["ratio"] <= 1.1
    for item in report["items"][1:3]:
        assert item["returncode"] == 0
        assert item["report"]["seconds_per_generator_step"] > 0 and item["report"]["seconds_per_critic_step"] > 0
    assert report["items"][2]["report"]["lora_rank"] == 4
    table = (out / "gpu_check.md").read_text()
    assert table.count("| tiny-t2v | 48x32, 21 |") == len(backends)
    assert "| tiny-t2v | 48x32, 69 | sdpa | no | light | yes |" in table
    assert "| tiny DMD, LoRA rank 4 | 4 |" in table
    assert "| tiny memory estimate vs measured | " in table


def test_gpu_check_refuses_bad_input(tmp_path):
    assert_one_line_error(_gpu_check("--dry-run", "--items", "9"), "--items", "1..5")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_one_line_error(_gpu_check("--dry-run", "--out", str(a_file)), "--out", "is a file")
    if not torch.cuda.is_available():
        assert_one_line_error(_gpu_check("--out", str(tmp_path / "out")), "no CUDA GPU")
