"""The published checkpoint folders load exactly as users download them (tiny replicas: tests/fixtures/published.py).

Every replica goes through the loaders and the user-facing entry points, unedited; numerics are compared with
diffusers / transformers on the same files; broken folders give one line and exit 2.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.dit_helpers import relative_error
from tests.fixtures.published import (
    CONSTRUCTOR_DEFAULTS,
    OFFICIAL_CONFIG_KEYS,
    T5_FILE,
    TOKENIZER_DIR,
    diffusers_pipeline,
    official_folder,
)
from tests.helpers import assert_one_line_error, run_script
from utils.config import load_config
from utils.errors import UserError
from utils.presets import read_checkpoint_config
from wan.modules.model import WanModel
from wan.moe import MoEWanModel

OFFICIAL = ("Wan2.2-TI2V-5B", "Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B", "Wan2.2-T2V-A14B")
DIFFUSERS = ("Wan2.2-TI2V-5B", "Wan2.1-T2V-1.3B", "Wan2.2-T2V-A14B")
VAE_PRESET = {"Wan2.2-TI2V-5B": "tiny-wan2.2", "Wan2.1-T2V-1.3B": "tiny-wan2.1"}
VIDEO = {"Wan2.2-TI2V-5B": "{height: 64, width: 96, num_frames: 9, num_frame_per_block: 3}",
         "Wan2.1-T2V-1.3B": "{height: 32, width: 48, num_frames: 9, num_frame_per_block: 3}"}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wan_models")
    for family in OFFICIAL:
        official_folder(root / family, family)
    for family in DIFFUSERS:
        diffusers_pipeline(root / f"{family}-Diffusers", family)
    return root


# --------------------------------------------------------------------------------------------- the replicas
def test_replicas_are_the_published_layouts(replicas):
    """The fixture itself: 12-key configs, indexes with total_size, companions beside the DiT, bf16 T5."""
    for family in OFFICIAL:
        folders = [replicas / family / e for e in ("high_noise_model", "low_noise_model")] if "A14B" in family \
            else [replicas / family]  # fmt: skip
        for folder in folders:
            assert tuple(sorted(json.loads((folder / "config.json").read_text()))) == tuple(sorted(OFFICIAL_CONFIG_KEYS))
            index = folder / "diffusion_pytorch_model.safetensors.index.json"
            if index.is_file():
                data = json.loads(index.read_text())
                shards = sorted(set(data["weight_map"].values()))
                assert data["metadata"]["total_size"] > 0 and all((folder / s).is_file() for s in shards)
        t5 = torch.load(replicas / family / T5_FILE, weights_only=True, mmap=True)
        assert {t.dtype for t in t5.values()} == {torch.bfloat16}
        assert (replicas / family / TOKENIZER_DIR / "spiece.model").is_file()
    assert len(list((replicas / "Wan2.1-T2V-14B").glob("diffusion_pytorch_model-*-of-00006.safetensors"))) == 6
    one = sorted(p.name for p in (replicas / "Wan2.1-T2V-1.3B").iterdir() if p.is_file())
    assert one == ["Wan2.1_VAE.pth", "config.json", "configuration.json", "diffusion_pytorch_model.safetensors", T5_FILE]


def test_official_config_takes_the_constructor_defaults(replicas):
    arch = read_checkpoint_config(replicas / "Wan2.2-TI2V-5B")
    assert {k: arch[k] for k in CONSTRUCTOR_DEFAULTS} == CONSTRUCTOR_DEFAULTS
    assert arch["model_type"] == "ti2v" and arch["in_dim"] == 48


@pytest.mark.parametrize("family", OFFICIAL[:3] + tuple(f"{f}-Diffusers" for f in DIFFUSERS[:2]))
def test_dit_folders_load_as_downloaded(replicas, family):
    model = WanModel.from_pretrained(replicas / family)
    assert model.config["text_dim"] == 4096 and not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("family", ["Wan2.2-T2V-A14B", "Wan2.2-T2V-A14B-Diffusers"])
def test_moe_folders_load_as_downloaded(replicas, family):
    boundary = None if family.endswith("Diffusers") else 0.875  # diffusers: model_index.json's boundary_ratio
    model = MoEWanModel.from_pretrained(replicas / family, boundary=boundary)
    assert model.boundary == 0.875


def test_numerics_match_diffusers_and_transformers_on_the_same_files(replicas):
    """Official and diffusers replicas hold the same weights (same seed): our loaders on the official files
    against diffusers' and transformers' own loaders on the diffusers files."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from wan.text_encoder import WanTextEncoder
    from wan.vae import WanVAEWrapper

    ours = WanModel.from_pretrained(replicas / "Wan2.1-T2V-1.3B")
    theirs = WanTransformer3DModel.from_pretrained(replicas / "Wan2.1-T2V-1.3B-Diffusers" / "transformer").eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 16, 4, 6, generator=generator)
    context = torch.randn(1, 512, 4096, generator=generator)
    with torch.no_grad():
        flow = ours.predict_flow(x, torch.full((1, 2), 700.0), context)
        reference = theirs(x.transpose(1, 2), torch.tensor([700.0]), context, return_dict=False)[0].transpose(1, 2)
    assert relative_error(flow, reference) < 1e-5

    root, pipe = replicas / "Wan2.2-TI2V-5B", replicas / "Wan2.2-TI2V-5B-Diffusers"
    encoder = WanTextEncoder.from_pretrained(root / T5_FILE, root / TOKENIZER_DIR, dtype=torch.float32)
    hf = UMT5EncoderModel.from_pretrained(pipe / "text_encoder", dtype=torch.float32).eval()
    ids, mask = encoder.tokenizer(["a red cat moving left"], 16)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    assert relative_error(encoder.encode_ids(ids, mask), expected) < 1e-5
    # the diffusers text_encoder/ folder loads through our encoder too
    assert relative_error(WanTextEncoder.from_pretrained(pipe / "text_encoder", pipe / "tokenizer",
                                                         dtype=torch.float32).encode_ids(ids, mask), expected) < 1e-5

    vae = WanVAEWrapper.from_pretrained(root / "Wan2.2_VAE.pth", preset="tiny-wan2.2")
    reference_vae = AutoencoderKLWan.from_pretrained(pipe / "vae").eval()
    video = torch.rand(1, 3, 5, 32, 32, generator=generator) * 2 - 1
    with torch.no_grad():
        ours_latent = vae.model.encode(video).latent_dist.mode()
        their_latent = reference_vae.encode(video).latent_dist.mode()
    assert relative_error(ours_latent, their_latent) < 1e-5


# --------------------------------------------------------------------------------------------- one setting
def test_model_folder_finds_the_components_and_explicit_paths_win(replicas):
    for family, vae in (("Wan2.2-TI2V-5B", "Wan2.2_VAE.pth"), ("Wan2.1-T2V-1.3B", "Wan2.1_VAE.pth")):
        root = replicas / family
        config = load_config(None, [f"model_folder={root}", f"generator.checkpoint={root}", f"vae.preset={VAE_PRESET[family]}"])
        assert config.vae.checkpoint == str(root / vae)
        assert config.text_encoder.checkpoint == str(root / T5_FILE)
        assert config.text_encoder.tokenizer == str(root / TOKENIZER_DIR)
    pipe = replicas / "Wan2.2-TI2V-5B-Diffusers"
    config = load_config(None, [f"model_folder={pipe}", "vae.preset=tiny-wan2.2", "text_encoder.tokenizer=/elsewhere"])
    assert (config.vae.checkpoint, config.text_encoder.checkpoint) == (str(pipe / "vae"), str(pipe / "text_encoder"))
    assert config.text_encoder.tokenizer == "/elsewhere"  # explicit wins
    # a folder missing a component: one line naming it
    broken = replicas.parent / "broken_5B"
    shutil.copytree(replicas / "Wan2.2-TI2V-5B", broken)
    (broken / T5_FILE).unlink()
    with pytest.raises(UserError, match="has no text encoder"):
        load_config(None, [f"model_folder={broken}", "vae.preset=tiny-wan2.2"])


# --------------------------------------------------------------------------------------------- broken folders
def _copy(replicas: Path, family: str, name: str) -> Path:
    target = replicas.parent / name
    if target.exists():
        shutil.rmtree(target)
    return Path(shutil.copytree(replicas / family, target))


def test_broken_folders_give_one_line(replicas):
    missing = _copy(replicas, "Wan2.2-TI2V-5B", "missing_shard")
    (missing / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(UserError, match="names shards missing .*00002-of-00003"):
        WanModel.from_pretrained(missing)
    truncated = _copy(replicas, "Wan2.2-TI2V-5B", "truncated_shard")
    shard = truncated / "diffusion_pytorch_model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(UserError, match="00003-of-00003.safetensors"):
        WanModel.from_pretrained(truncated)
    two = _copy(replicas, "Wan2.1-T2V-1.3B", "two_dits")
    shutil.copy(two / "diffusion_pytorch_model.safetensors", two / "model_copy.safetensors")
    with pytest.raises(UserError, match="one DiT weights file .*diffusion_pytorch_model.safetensors, model_copy"):
        WanModel.from_pretrained(two)
    no_dim = _copy(replicas, "Wan2.1-T2V-1.3B", "no_dim")
    config = json.loads((no_dim / "config.json").read_text())
    del config["dim"]
    (no_dim / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="lacks dim"):
        WanModel.from_pretrained(no_dim)
    (no_dim / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        WanModel.from_pretrained(no_dim)


def _recipe(tmp_path: Path, root: Path, family: str, extra: str = "") -> Path:
    recipe = tmp_path / f"{family}.yaml"
    recipe.write_text(f"""model_folder: {root}
generator: {{checkpoint: {root}}}
real_score: {{checkpoint: {root}}}
vae: {{preset: {VAE_PRESET[family]}}}
video: {VIDEO[family]}
teacher: {{sampler: euler, num_steps: 2}}
ode: {{sampler: euler, num_steps: 4, keep_indices: [0, 1, 2, 3, -1]}}
distill: {{dfake_gen_update_ratio: 1}}
train: {{trainer: score_distillation, mixed_precision: false, gradient_checkpointing: false, sharding_strategy: full,
        max_steps: 1, log_iters: 1, save_iters: 1, ema_start_step: 0, data_path: prompts/tiny_prompts.txt}}
{extra}""")
    return recipe


def test_a_config_of_another_model_is_refused_before_anything_is_written(replicas, tmp_path):
    recipe = _recipe(tmp_path, replicas / "Wan2.1-T2V-1.3B", "Wan2.1-T2V-1.3B")
    out = tmp_path / "out"
    proc = run_script(["inference.py", "--config_path", str(recipe), "--checkpoint", str(replicas / "Wan2.2-TI2V-5B"),
                       "--prompt", "a red cat", "--output_folder", str(out)])
    assert_one_line_error(proc, "config.json has", "recipe")
    assert not out.exists()


# --------------------------------------------------------------------------------------------- entry points
@pytest.mark.slow
@pytest.mark.parametrize("family,layout", [("Wan2.1-T2V-1.3B", "official"), ("Wan2.2-TI2V-5B", "official"),
                                           ("Wan2.2-TI2V-5B", "diffusers")])
def test_entry_points_run_on_the_downloaded_folder(replicas, tmp_path, family, layout):
    root = replicas / (family if layout == "official" else f"{family}-Diffusers")
    recipe = _recipe(tmp_path, root, family)
    # verify.py all: every weight file read and compared; nothing FAILs; the weights item PASSes
    proc = run_script(["scripts/verify.py", "all", "--config_path", str(recipe), "--ckpt_dir", str(root)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout and any(line.split()[:2] == ["PASS", "weights"] for line in proc.stdout.splitlines())
    proc = run_script(["scripts/verify.py", "text", "--config_path", str(recipe)])
    assert proc.returncode == 0 and "SKIP" not in proc.stdout, proc.stdout + proc.stderr  # the folder's T5 was read
    # inference.py: one tiny video with the folder as the generator
    out = tmp_path / "videos"
    proc = run_script(["inference.py", "--config_path", str(recipe), "--checkpoint", str(root), "--prompt", "a red cat",
                       "--output_folder", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*/video.mp4"))) == 1
    if layout == "official":
        return  # ODE pairs and training from official folders: README's chain on them (tests/test_real_chain.py)
    # generate_ode_pairs.py: one pair
    pairs = tmp_path / "pairs"
    proc = run_script(["scripts/generate_ode_pairs.py", "--config_path", str(recipe), "--caption_path",
                       "prompts/tiny_prompts.txt", "--output_folder", str(pairs), "--num_prompts", "1"])
    assert proc.returncode == 0, proc.stderr
    assert len(list(pairs.glob("*.safetensors"))) == 1
    # train.py: one DMD step with the folder as generator, teacher and critic
    proc = run_script(["train.py", "--config_path", str(recipe), "--logdir", str(tmp_path / "run"), "--disable-wandb"])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "latest" / "generator.safetensors").is_file()


@pytest.mark.slow
def test_convert_checkpoint_both_ways_on_a_downloaded_folder(replicas, tmp_path):
    source = replicas / "Wan2.1-T2V-1.3B"  # the DiT beside the VAE and T5 files
    proc = run_script(["scripts/convert_checkpoint.py", "--input", str(source), "--output", str(tmp_path / "d"),
                       "--to", "diffusers", "--max_shard_gb", "0.002"])
    assert proc.returncode == 0, proc.stderr
    index = json.loads((tmp_path / "d" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    state = WanModel.from_pretrained(source).state_dict()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    proc = run_script(["scripts/convert_checkpoint.py", "--input", str(tmp_path / "d"), "--output", str(tmp_path / "o"),
                       "--to", "official"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "o" / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    back = WanModel.from_pretrained(tmp_path / "o").state_dict()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["Wan2.1-T2V-14B", "Wan2.2-T2V-A14B", "Wan2.2-T2V-A14B-Diffusers"])
def test_big_teachers_sample_ode_pairs_and_train_from_their_folders(replicas, tmp_path, teacher):
    """The 14B (6 shards) and the A14B (official experts; diffusers transformer/ + transformer_2/ with
    boundary_ratio) as the teacher of a 1.3B student: ODE pairs and a DMD step, unedited folders."""
    student = replicas / "Wan2.1-T2V-1.3B-Diffusers"
    extra = ""
    if teacher == "Wan2.2-T2V-A14B":  # the official folder has no boundary: a MoE preset gives it
        preset = tmp_path / "tiny-a14b.yaml"
        arch = read_checkpoint_config(replicas / teacher / "high_noise_model")
        preset.write_text(json.dumps({**arch, "vae": "tiny-wan2.1", "moe": {"boundary": 0.875}}))
        extra = f"real_score: {{preset: {preset}, checkpoint: {replicas / teacher}}}\n"
    recipe = _recipe(tmp_path, student, "Wan2.1-T2V-1.3B")
    text = recipe.read_text().replace(f"real_score: {{checkpoint: {student}}}",
                                      extra.strip() or f"real_score: {{checkpoint: {replicas / teacher}}}")
    recipe.write_text(text)
    pairs = tmp_path / "pairs"
    proc = run_script(["scripts/generate_ode_pairs.py", "--config_path", str(recipe), "--caption_path",
                       "prompts/tiny_prompts.txt", "--output_folder", str(pairs), "--num_prompts", "1"])
    assert proc.returncode == 0, proc.stderr
    assert len(list(pairs.glob("*.safetensors"))) == 1
    proc = run_script(["train.py", "--config_path", str(recipe), "--logdir", str(tmp_path / "run"), "--disable-wandb",
                       f"critic.checkpoint={student}"])
    assert proc.returncode == 0, proc.stderr
