"""Bad input and faults end in one clear line, exit status 2, before any work, with nothing written."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import REPO_ROOT, assert_one_line_error, run_script
from utils.config import load_config
from utils.errors import UserError

TINY_DMD = os.path.join(REPO_ROOT, "configs/tiny/self_forcing_dmd.yaml")
TINY_ODE = os.path.join(REPO_ROOT, "configs/tiny/ode.yaml")


# --------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("override,key", [
    ("distill.guidance_scale=nan", "distill.guidance_scale"),
    ("ode.guidance_scale=inf", "ode.guidance_scale"),
    ("optim.lr=-inf", "optim.lr"),
    ("flow.timestep_shift=nan", "flow.timestep_shift"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.log_iters=0", "train.log_iters"),
    ("optim.lr=-1e-5", "optim.lr"),
    ("optim.lr_critic=0", "optim.lr_critic"),
    ("optim.grad_clip=0", "optim.grad_clip"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("teacher.num_steps=0", "teacher.num_steps"),
])
def test_bad_settings_are_refused_by_name(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(TINY_DMD, [override])


def test_bad_settings_stop_every_entry_point_before_work(tmp_path):
    logdir = tmp_path / "run"
    assert_one_line_error(run_script(["train.py", "--config_path", TINY_DMD, "--logdir", str(logdir),
                                      "distill.guidance_scale=nan"]), "distill.guidance_scale", "finite")
    assert not logdir.exists()
    out = tmp_path / "pairs"
    assert_one_line_error(run_script(["scripts/generate_ode_pairs.py", "--config_path", TINY_ODE, "--caption_path",
                                      "prompts/tiny_prompts.txt", "--output_folder", str(out), "ode.guidance_scale=nan"]),
                          "ode.guidance_scale")
    assert not out.exists()


def test_yaml_that_is_not_a_mapping_or_not_yaml(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="top level: expected a mapping"):
        load_config(listed)
    broken = tmp_path / "broken.yaml"
    broken.write_text("video: {height: 32\ntrain: [1, 2\n")
    with pytest.raises(UserError, match=r"not valid YAML \(line \d+, column \d+\)"):
        load_config(broken)


# --------------------------------------------------------------------------------------------- run folders
def test_logdir_empty_or_a_file_is_refused(tmp_path):
    assert_one_line_error(run_script(["train.py", "--config_path", TINY_DMD, "--logdir", ""]), "--logdir is empty")
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert_one_line_error(run_script(["train.py", "--config_path", TINY_DMD, "--logdir", str(a_file)]), "is a file")
    assert a_file.read_text() == "keep me"


def test_output_folders_that_are_files_are_refused_by_every_writer(tmp_path, weights):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert_one_line_error(run_script(["scripts/generate_ode_pairs.py", "--config_path", TINY_ODE, "--caption_path",
                                      "prompts/tiny_prompts.txt", "--output_folder", str(a_file)]), "is a file")
    assert_one_line_error(run_script(["scripts/convert_checkpoint.py", "--input", str(weights.parent), "--output",
                                      str(a_file), "--to", "diffusers"]), "is a file")
    assert_one_line_error(run_script(["scripts/convert_checkpoint.py", "--input", str(weights.parent), "--output",
                                      str(tmp_path / "new"), "--to", "diffusers", "--max_shard_gb", "0"]), "--max_shard_gb")
    assert a_file.read_text() == "keep me" and not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A tiny official checkpoint folder of the recipe's generator (config.json + safetensors)."""
    import json

    from pipeline.components import build_dit
    from utils.geometry import resolve_recipe
    from utils.presets import arch_to_config_json

    recipe = resolve_recipe(load_config(TINY_DMD), check_weights=False)
    model = build_dit(recipe.generator, causal=True, attention_backend="sdpa")
    folder = tmp_path_factory.mktemp("generator")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(arch_to_config_json(recipe.generator.arch)))
    return folder / "diffusion_pytorch_model.safetensors"


def _inference(weights: Path, out: Path, *extra: str):
    return run_script(["inference.py", "--config_path", TINY_DMD, "--checkpoint", str(weights.parent), "--prompt",
                       "a red circle", "--output_folder", str(out), *extra])


@pytest.mark.parametrize("args,fragment", [
    (["--num_output_frames", "0"], "--num_output_frames 0"),
    (["--num_output_frames", "-5"], "--num_output_frames -5"),
    (["--seed", "-1"], "--seed -1"),
    (["--seed", str(2**63)], "--seed"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--device", "tpu"], "--device"),
])
def test_inference_arguments_are_checked_before_loading(tmp_path, weights, args, fragment):
    out = tmp_path / "out"
    assert_one_line_error(_inference(weights, out, *args), fragment)
    assert not out.exists()


def test_inference_output_folder_that_is_a_file_is_refused_before_generating(tmp_path, weights):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert_one_line_error(_inference(weights, a_file), "--output_folder", "is a file")
    assert a_file.read_text() == "keep me"


def test_a_checkpoint_full_of_nan_writes_no_video(tmp_path, weights):
    from safetensors.torch import load_file

    broken = tmp_path / "nan_generator"
    broken.mkdir()
    state = {k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}
    save_file(state, broken / weights.name)
    (broken / "config.json").write_text((weights.parent / "config.json").read_text())
    out = tmp_path / "out"
    assert_one_line_error(_inference(broken / weights.name, out), "non-finite latents", "no video written")
    assert not any(out.rglob("video.mp4"))


# --------------------------------------------------------------------------------------------- resume
def test_resume_repairs_a_half_written_metrics_line_and_drops_steps_it_will_redo(tmp_path):
    import json

    logdir = tmp_path / "run"
    common = ["train.py", "--config_path", TINY_DMD, "--logdir", str(logdir), "--disable-wandb", "train.save_iters=2",
              "train.log_iters=1"]
    first = run_script([*common, "train.max_steps=2"])
    assert first.returncode == 0, first.stderr
    metrics = logdir / "metrics.jsonl"
    with open(metrics, "a") as handle:  # a record after the checkpoint, then a line cut by a kill
        handle.write(json.dumps({"step": 3, "generator_loss": 1.0}) + "\n" + '{"step": 4, "gener')
    second = run_script([*common, "train.max_steps=4"])
    assert second.returncode == 0, second.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # no zig-zag, no broken line


def test_a_config_folder_is_not_a_recipe(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        load_config(tmp_path)


def test_a_video_folder_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """A failure while writing leaves no video folder and no staging leftovers; a success has every file."""
    from pipeline import inference_outputs
    from pipeline.causal_inference import InferenceResult
    from utils.geometry import resolve_recipe

    geometry = resolve_recipe(load_config(TINY_DMD), check_weights=False).geometry
    video = torch.zeros(geometry.num_pixel_frames, 3, geometry.height, geometry.width)
    result = InferenceResult(prompt="a cat", task="t2v", seed=0, image=None, video=video,
                             latents=torch.zeros(1, *geometry.latent_shape[1:]), geometry=geometry, nfe=10,
                             timings={key: 0.0 for key in inference_outputs.RECORD_TIMINGS}, memory={})
    out = tmp_path / "out"

    def broken_strip(path, frames):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(inference_outputs, "write_frame_strip", broken_strip)
        with pytest.raises(OSError):
            inference_outputs.save_result(result, out, {}, fps=16)
    assert list(out.iterdir()) == []
    folder = inference_outputs.save_result(result, out, {}, fps=16)
    assert sorted(p.name for p in folder.iterdir()) == ["frames.png", "inference_record.json", "video.mp4"]
    assert [p for p in out.iterdir()] == [folder] and (folder.stat().st_mode & 0o777) != 0o700


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    from utils.io import atomic_save_safetensors, atomic_write_text

    umask = os.umask(0)
    os.umask(umask)
    weights = atomic_save_safetensors(tmp_path / "w.safetensors", {"x": torch.zeros(2)})
    text = atomic_write_text(tmp_path / "t.txt", "x")
    assert (weights.stat().st_mode & 0o777) == (text.stat().st_mode & 0o777) == 0o666 & ~umask


def test_command_line_mistakes_are_one_line(tmp_path, weights):
    # a missing required flag or an unknown one: one line, not argparse's usage block
    assert_one_line_error(run_script(["inference.py", "--config_path", TINY_DMD, "--prompt", "a cat"]), "--checkpoint")
    assert_one_line_error(run_script(["inference.py", "--config_path", TINY_DMD, "--checkpoint", str(weights.parent),
                                      "--prompt", "a", "--bogus"]), "--bogus")
    assert_one_line_error(run_script(["scripts/create_lmdb.py", "--data_path", str(tmp_path)]), "--lmdb_path")
    assert_one_line_error(run_script(["scripts/verify.py", "all", "--config_path", TINY_DMD, "--ckpt_dir",
                                      str(tmp_path / "missing")]), "--ckpt_dir", "does not exist")


def test_an_image_over_the_pixel_budget_is_refused_before_decoding(tmp_path):
    from PIL import Image

    from utils.datasets import MAX_IMAGE_PIXELS, load_image

    huge = tmp_path / "huge.png"
    Image.new("RGB", (9000, 8000)).save(huge)  # 72 M pixels, over the 67 M budget
    assert 9000 * 8000 > MAX_IMAGE_PIXELS
    with pytest.raises(UserError, match="9000x8000"):
        load_image(huge, 32, 48)


def test_an_image_of_extreme_shape_is_refused_and_a_long_one_stays_small(tmp_path):
    """A 1x200000 PNG is 859 bytes but covering a frame with it took gigabytes: refused by its aspect ratio; one
    within the limit is cut in its own coordinates, never resized past the source or the target."""
    from PIL import Image

    from utils.datasets import MAX_IMAGE_ASPECT, load_image

    thin = tmp_path / "thin.png"
    Image.new("RGB", (200000, 1)).save(thin)
    with pytest.raises(UserError, match="200000x1, 200000:1"):
        load_image(thin, 704, 1280)
    long = tmp_path / "long.png"
    Image.new("RGB", (4000, 4000 // MAX_IMAGE_ASPECT), (200, 10, 10)).save(long)
    sizes = []
    resize = Image.Image.resize

    def recorded(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    Image.Image.resize = recorded
    try:
        pixels = load_image(long, 704, 1280)
    finally:
        Image.Image.resize = resize
    assert pixels.shape == (3, 704, 1280)
    assert torch.allclose(pixels[:, 300, 600], torch.tensor([200, 10, 10]) / 127.5 - 1, atol=1e-2)
    assert sizes == [(1280, 704)]  # straight to the frame, not through a 11264x704 cover of it
