"""Distilling a light decoder from the recipe's VAE on the student's latents: trains, resumes exactly, exports."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import assert_one_line_error, run_script

RECIPE = "configs/miniature/dmd.yaml"  # the miniature VAE: 6 channels, stride (4, 4, 4)
STUDENT = "checkpoints/miniature/teacher"  # any weights of the architecture make latents to decode
ABSENT_INIT = "generator.checkpoint=outputs/absent/ode_init/latest/generator.safetensors"


def command(out, prompts, *extra):
    return ["scripts/train_light_decoder.py", "--config_path", RECIPE, "--checkpoint", STUDENT, "--prompts", str(prompts),
            "--out", str(out), "--clips", "5", "--eval_clips", "2", "--batch_size", "2", "--widths", "16,16,8,8",
            "--save_every", "3", "--lr", "2e-3", *extra, ABSENT_INIT]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle moving left\na blue square moving up\n")
    return path


def test_trains_resumes_exactly_and_exports_a_decoder_inference_can_use(tmp_path, prompts):
    from wan.light_decoder import LightDecoder

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_script(command(straight, prompts, "--steps", "6"))
    assert proc.returncode == 0, proc.stderr
    assert "PSNR" in proc.stdout
    proc = run_script(command(resumed, prompts, "--steps", "3"))
    assert proc.returncode == 0, proc.stderr
    proc = run_script(command(resumed, prompts, "--steps", "6"))  # same bank, checkpoint at 3: resumes
    assert proc.returncode == 0 and "(resumed)" in proc.stdout, proc.stderr
    a, b = load_file(str(straight / "light_decoder.safetensors")), load_file(str(resumed / "light_decoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exact resume
    losses = [json.loads(line)["loss"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and (resumed / "loss.png").stat().st_size > 1000
    report = json.loads((resumed / "report.json").read_text())
    from utils.config import load_config

    frames_per_clip = load_config(RECIPE, [ABSENT_INIT]).video.num_frames
    assert report["held_out_clips"] == 2 and report["frames"] == frames_per_clip and report["psnr_db"] > 0
    assert report["arch"]["space_upscale"] == [True, True, False] and report["light_decode_s"] > 0
    assert sorted(p.name for p in (resumed / "bank").iterdir()) == [f"clip_{i:05d}.safetensors" for i in range(5)]
    # the export decodes the bank's held-out latents as the report says
    decoder = LightDecoder.from_pretrained(resumed / "light_decoder.safetensors")
    stored = load_file(str(resumed / "bank" / "clip_00004.safetensors"))
    frames = decoder.decode(stored["latents"][None])[0]
    mse = float(((frames - (stored["pixels"].float() / 127.5 - 1)) ** 2).mean())
    assert abs(10 * torch.log10(torch.tensor(4.0 / mse)).item() - report["psnr_per_clip_db"][-1]) < 1e-3
    # and inference takes it for the recipe's latents
    out = tmp_path / "videos"
    proc = run_script(["inference.py", "--config_path", RECIPE, "--checkpoint", STUDENT, "--prompt", "a red circle",
                       "--output_folder", str(out), ABSENT_INIT, "inference.decoder=light",
                       f"inference.light_decoder={resumed / 'light_decoder.safetensors'}"])
    assert proc.returncode == 0, proc.stderr
    (folder,) = list(out.iterdir())
    assert json.loads((folder / "inference_record.json").read_text())["parameters"]["decoder"] == "light"


def test_other_settings_and_bad_flags_are_refused_in_one_line(tmp_path, prompts):
    out = tmp_path / "run"
    assert run_script(command(out, prompts, "--steps", "3")).returncode == 0
    assert_one_line_error(run_script(command(out, prompts, "--steps", "3", "--crop", "4")), "other settings", "crop")
    assert_one_line_error(run_script(command(tmp_path / "x", prompts, "--widths", "16,16")), "--widths")
    assert_one_line_error(run_script(command(tmp_path / "x", prompts, "--eval_clips", "5")), "--eval_clips 5")
    assert not (tmp_path / "x").exists()
