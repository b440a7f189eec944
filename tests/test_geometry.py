"""The one geometry function pins the reference figures of every Wan family (shared/reference/wan_facts.md)."""
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT
from utils.config import load_config
from utils.geometry import compute_geometry, derive_geometry
from utils.presets import resolve_model, resolve_vae

FAMILIES = [
    # preset, vae, height, width, latent [C,H,W], frame_seq_length, seq_len (21 frames), heads, layers, dim
    ("wan2.1-t2v-1.3b", "wan2.1", 480, 832, (16, 60, 104), 1560, 32760, 12, 30, 1536),
    ("wan2.1-t2v-14b", "wan2.1", 720, 1280, (16, 90, 160), 3600, 75600, 40, 40, 5120),
    ("wan2.2-t2v-a14b", "wan2.1", 720, 1280, (16, 90, 160), 3600, 75600, 40, 40, 5120),
    ("wan2.2-ti2v-5b", "wan2.2", 704, 1280, (48, 44, 80), 880, 18480, 24, 30, 3072),
]


@pytest.mark.parametrize("preset,vae,height,width,latent,fsl,seq_len,heads,layers,dim", FAMILIES)
def test_family_geometry(preset, vae, height, width, latent, fsl, seq_len, heads, layers, dim):
    config = load_config(None, [f"generator.preset={preset}", f"video.height={height}", f"video.width={width}"])
    g = derive_geometry(config)
    assert g.vae == vae
    assert g.latent_shape == (1, 21) + latent
    assert g.frame_seq_length == fsl and g.seq_len == seq_len
    assert (g.num_heads, g.num_layers, g.dim, g.head_dim) == (heads, layers, dim, 128)
    assert g.kv_cache_shape == (1, seq_len, heads, 128)
    assert g.crossattn_cache_shape == (1, 512, heads, 128)
    assert g.kv_cache_bytes == 2 * layers * seq_len * heads * 128 * 2
    assert g.num_blocks == 7 and g.block_sizes == (3,) * 7


def test_moe_preset_has_boundary():
    spec = resolve_model("real_score", load_config(None, ["real_score.preset=wan2.2-t2v-a14b"]).real_score)
    assert spec.moe_boundary == 0.875 and spec.is_moe


@pytest.mark.parametrize(
    "recipe,shape,fsl,seq_len,kv",
    [
        ("configs/self_forcing_dmd_5B.yaml", [1, 21, 48, 44, 80], 880, 18480, [1, 18480, 24, 128]),
        ("configs/self_forcing_sid_5B.yaml", [1, 21, 48, 44, 80], 880, 18480, [1, 18480, 24, 128]),
        ("configs/ode_5B.yaml", [1, 21, 48, 44, 80], 880, 18480, [1, 18480, 24, 128]),
        ("configs/self_forcing_dmd.yaml", [1, 21, 16, 60, 104], 1560, 32760, [1, 32760, 12, 128]),
    ],
)
def test_verify_geometry_json(recipe, shape, fsl, seq_len, kv):
    out = subprocess.run(
        [sys.executable, "scripts/verify.py", "geometry", "--config_path", recipe, "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    data = json.loads(out.stdout)
    for key in ("model", "dim", "num_heads", "head_dim", "num_layers", "latent_channels", "vae_stride", "patch_size",
                "height", "width", "num_pixel_frames", "num_latent_frames", "num_frame_per_block", "num_blocks",
                "crossattn_cache_shape", "kv_cache_bytes"):
        assert key in data
    assert data["latent_shape"] == shape
    assert data["frame_seq_length"] == fsl and data["seq_len"] == seq_len
    assert data["kv_cache_shape"] == kv


def test_verify_geometry_table():
    out = subprocess.run(
        [sys.executable, "scripts/verify.py", "geometry", "--config_path", "configs/self_forcing_dmd_5B.yaml"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    assert "frame_seq_length" in out.stdout and "880" in out.stdout and "GiB" in out.stdout


def test_second_resolution_and_frame_count():
    # 5B at 1280x704 (portrait) with 121 pixel frames: 31 latent frames is not a whole number of 3-frame blocks ...
    base = ["generator.preset=wan2.2-ti2v-5b", "video.height=1280", "video.width=704"]
    g = derive_geometry(load_config(None, base + ["video.num_frames=121", "rollout.independent_first_frame=true"]))
    assert g.latent_shape == (1, 31, 48, 80, 44)
    assert g.frame_seq_length == 40 * 22 and g.seq_len == 31 * 880
    assert g.block_sizes == (1,) + (3,) * 10
    # ... and 1.3B at 832x480 with 45 frames, batch 2 and a 6-frame rolling window with a 3-frame sink.
    g = derive_geometry(load_config(None, [
        "generator.preset=wan2.1-t2v-1.3b", "video.height=832", "video.width=480", "video.num_frames=45",
        "train.batch_size=2", "rollout.local_attn_size=6", "rollout.sink_size=3",
    ]))
    assert g.latent_shape == (2, 12, 16, 104, 60)
    assert g.num_blocks == 4 and g.cache_frames == 6 and g.sink_frames == 3
    assert g.kv_cache_shape == (2, 6 * 1560, 12, 128)


def test_tiny_recipe_geometry():
    g = derive_geometry(load_config("configs/tiny/self_forcing_dmd.yaml"))
    assert g.latent_shape == (1, 6, 16, 4, 6) and g.frame_seq_length == 6 and g.num_blocks == 2


def test_compute_geometry_is_pure_arithmetic():
    config = load_config(None, ["generator.preset=wan2.2-ti2v-5b"])
    spec = resolve_model("generator", config.generator)
    vae = resolve_vae(config.vae, spec)
    g = compute_geometry(spec, vae, height=352, width=640, num_frames=9, num_frame_per_block=1)
    assert g.latent_shape == (1, 3, 48, 22, 40) and g.frame_seq_length == 220 and g.num_blocks == 3
