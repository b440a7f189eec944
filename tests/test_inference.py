"""Causal inference on the tiny recipe: the CLI's outputs and errors, TI2V, long videos, determinism."""
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import assert_one_line_error, run_script
from utils.errors import UserError

RECIPE = "configs/tiny/self_forcing_dmd.yaml"
PROMPT = "a red circle moving left on a blue background"
RECORD_FIELDS = ("prompt", "task", "seed", "image", "checkpoint", "num_pixel_frames", "num_latent_frames", "height", "width",
                 "nfe", "parameters", "geometry", "timings", "memory")
TIMING_FIELDS = ("load_s", "text_encode_s", "per_block_denoise_s", "denoise_s", "vae_decode_s", "total_s",
                 "first_block_latency_s", "fps")


@pytest.fixture(scope="module")
def recipe():
    from utils.config import load_config
    from utils.geometry import resolve_recipe

    config = load_config(RECIPE)
    return config, resolve_recipe(config, need_scores=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, recipe):
    """A trainer-style export folder: generator.safetensors (+ EMA with other weights) and config.json."""
    from pipeline.components import build_dit
    from utils.io import atomic_save_safetensors, atomic_write_json
    from utils.presets import arch_to_config_json

    _, resolved = recipe
    folder = tmp_path_factory.mktemp("export")
    for name, seed in (("generator", 11), ("generator_ema", 12)):
        model = build_dit(resolved.generator, causal=True, attention_backend="sdpa", seed=seed)
        atomic_save_safetensors(folder / f"{name}.safetensors", model.state_dict())
    atomic_write_json(folder / "config.json", arch_to_config_json(resolved.generator.arch))
    return folder


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    import imageio.v3 as iio

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("images") / "first.png"
    iio.imwrite(path, rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8))  # not the output size: resized + cropped
    return path


@pytest.fixture(scope="module")
def pipe(recipe, checkpoint):
    from pipeline.causal_inference import CausalInferencePipeline

    config, resolved = recipe
    return CausalInferencePipeline(config, resolved, "cpu", torch.float32, checkpoint=checkpoint)


# --------------------------------------------------------------------------------------------- CLI
def test_cli_writes_mp4_with_expected_frames_size_and_full_record(tmp_path, checkpoint, recipe):
    from utils.video_io import read_mp4

    config, _ = recipe
    out = tmp_path / "out"
    proc = run_script(["inference.py", "--config_path", RECIPE, "--checkpoint", str(checkpoint), "--prompt", PROMPT,
                       "--output_folder", str(out), "--seed", "3", "--profile_memory"])
    assert proc.returncode == 0, proc.stderr
    (folder,) = list(out.iterdir())
    assert folder.name.startswith(f"t2v_{config.video.width}x{config.video.height}_")
    assert folder.name.endswith("_a-red-circle-moving-left-on-a-blue-backg")  # slug cut at 40 characters
    frames = read_mp4(folder / "video.mp4")
    assert frames.shape == (config.video.num_frames, config.video.height, config.video.width, 3)
    record = json.loads((folder / "inference_record.json").read_text())
    assert set(RECORD_FIELDS) <= set(record)
    assert set(TIMING_FIELDS) == set(record["timings"])
    assert all(v is not None for v in record["timings"].values())
    assert len(record["timings"]["per_block_denoise_s"]) == 2  # 6 latent frames = 2 blocks of 3
    assert record["timings"]["first_block_latency_s"] < record["timings"]["total_s"]
    assert record["prompt"] == PROMPT and record["seed"] == 3 and record["num_pixel_frames"] == config.video.num_frames
    assert record["checkpoint"] == str(checkpoint)
    assert record["memory"]["backend"] == "cpu-rss" and record["memory"]["peak_bytes"] >= record["memory"]["base_bytes"] > 0
    assert record["nfe"] == 2 * (len(config.rollout.denoising_step_list) + 1)  # steps + context pass per block
    temporal = record["temporal"]  # computed from this video's pixels: 21 frames, one seam (after pixel frame 8)
    assert temporal["seam_ratio"] > 0 and 0 <= temporal["flicker"] <= 1.5 and temporal["frame_change"] > 0
    assert temporal["seam_ratio_by_boundary"] == [pytest.approx(temporal["seam_ratio"])]  # one seam
    assert temporal["drift"]["segment_frames"] == 11 and [s["start"] for s in temporal["drift"]["segments"]] == [0, 11]
    # the folder's report script measures the mp4 again (after H.264) with the blocks the record names
    report = run_script(["scripts/temporal_report.py", str(out), "--json_out", str(tmp_path / "temporal.json")])
    assert report.returncode == 0, report.stderr
    assert folder.name in report.stdout and "seam ratio" in report.stdout and "by boundary" in report.stdout
    (measured,) = json.loads((tmp_path / "temporal.json").read_text()).values()
    assert measured["seam_ratio"] == pytest.approx(temporal["seam_ratio"], rel=0.3)
    assert measured["drift"]["segment_frames"] == 11
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "clip.mp4").write_bytes((folder / "video.mp4").read_bytes())
    assert_one_line_error(run_script(["scripts/temporal_report.py", str(bare)]), "no inference_record.json", "--block_frames")
    assert run_script(["scripts/temporal_report.py", str(bare), "--block_frames", "3"]).returncode == 0
    events = json.loads((folder / "memory_events.json").read_text())
    names = {e["name"] for e in events["events"]}
    assert {"text_encoder", "vae", "generator", "block_0/step_0", "block_1/context_pass", "block_0/decode"} <= names


@pytest.mark.parametrize("case", ["missing_image", "unreadable_checkpoint", "missing_ema", "no_frames",
                                  "frames_past_the_position_table", "image_for_a_text_to_video_student"])
def test_cli_bad_input_gives_one_line_and_writes_nothing(tmp_path, checkpoint, case):
    ckpt = checkpoint
    extra = []
    if case == "missing_image":
        extra, fragment = ["--image", str(tmp_path / "nope.png")], "nope.png"
    elif case == "unreadable_checkpoint":
        ckpt = tmp_path / "broken"
        ckpt.mkdir()
        (ckpt / "generator.safetensors").write_bytes(b"this is not a safetensors file")
        fragment = "generator.safetensors"
    elif case == "image_for_a_text_to_video_student":
        import imageio.v3 as iio

        iio.imwrite(tmp_path / "first.png", np.zeros((32, 48, 3), dtype=np.uint8))
        extra, fragment = ["--image", str(tmp_path / "first.png")], "learnt text-to-video only"
    elif case == "no_frames":
        extra, fragment = ["--num_output_frames", "0"], "--num_output_frames 0"
    elif case == "frames_past_the_position_table":  # made as 1026 latent frames, past the 1024 RoPE positions
        extra, fragment = ["--num_output_frames", "4093"], "at most 4089 pixel frames"
    else:
        ckpt = tmp_path / "no_ema"
        ckpt.mkdir()
        (ckpt / "generator.safetensors").write_bytes((checkpoint / "generator.safetensors").read_bytes())
        extra, fragment = ["--use_ema"], "generator_ema.safetensors"
    out = tmp_path / "out"
    proc = run_script(["inference.py", "--config_path", RECIPE, "--checkpoint", str(ckpt), "--prompt", PROMPT,
                       "--output_folder", str(out), *extra])
    assert_one_line_error(proc, fragment)
    assert not out.exists()


def test_any_frame_count_is_made_in_whole_blocks_and_kept(tmp_path, checkpoint, pipe):
    from utils.video_io import read_mp4

    for asked, made in ((1, 9), (40, 45), (100, 105)):  # stride 4, blocks of 3 latent frames
        streamed = []
        result = pipe.generate(PROMPT, seed=2, num_output_frames=asked,
                               on_block=lambda index, pixels: streamed.append(pixels.shape[1]))
        assert result.video.shape[0] == sum(streamed) == asked and result.geometry.num_pixel_frames == made
        whole = pipe.generate(PROMPT, seed=2, num_output_frames=made)
        assert torch.equal(result.video, whole.video[:asked])  # the first frames of the whole blocks made
    out = tmp_path / "out"
    proc = run_script(["inference.py", "--config_path", RECIPE, "--checkpoint", str(checkpoint), "--prompt", PROMPT,
                       "--output_folder", str(out), "--num_output_frames", "40"])
    assert proc.returncode == 0, proc.stderr
    (folder,) = list(out.iterdir())
    record = json.loads((folder / "inference_record.json").read_text())
    assert (record["num_pixel_frames"], record["num_pixel_frames_made"]) == (40, 45)
    assert record["parameters"]["num_output_frames"] == 40 and read_mp4(folder / "video.mp4").shape[0] == 40


# --------------------------------------------------------------------------------------------- Python API
def test_same_seed_same_video_other_seed_other_video(pipe):
    first = pipe.generate(PROMPT, seed=5)
    again = pipe.generate(PROMPT, seed=5)
    other = pipe.generate(PROMPT, seed=6)
    assert torch.equal(first.video, again.video) and torch.equal(first.latents, again.latents)
    assert not torch.allclose(first.latents, other.latents)


def test_streamed_blocks_match_the_video_and_a_full_decode(pipe):
    seen = []
    result = pipe.generate(PROMPT, seed=1, on_block=lambda index, pixels: seen.append((index, pixels.shape[1])))
    stride = pipe.resolved.vae.stride[0]
    assert seen == [(0, stride * 3 - (stride - 1)), (1, stride * 3)]  # causal VAE: first block 4f-3 frames, then 4f
    full = pipe.vae.decode_to_pixel(result.latents).clamp(-1, 1)[0]
    assert torch.allclose(result.video, full, atol=1e-4)


def test_ema_weights_are_used_when_asked(recipe, checkpoint, pipe):
    from pipeline.causal_inference import CausalInferencePipeline

    config, resolved = recipe
    ema = CausalInferencePipeline(config, resolved, "cpu", torch.float32, checkpoint=checkpoint, use_ema=True)
    assert not torch.allclose(ema.generate(PROMPT, seed=0).latents, pipe.generate(PROMPT, seed=0).latents)


def test_ti2v_keeps_the_encoded_first_frame(pipe, image_path, recipe):
    import dataclasses

    from pipeline.causal_inference import CausalInferencePipeline, InferenceComponents

    config, resolved = recipe
    ti2v = dataclasses.replace(config, video=dataclasses.replace(config.video, task="ti2v"))
    student = CausalInferencePipeline(ti2v, resolved, "cpu", torch.float32, components=InferenceComponents(
        text_encoder=pipe.text_encoder, vae=pipe.vae, generator=pipe.generator))
    result = student.generate(PROMPT, image=image_path, seed=2)
    encoded = student.encode_first_frame(student.check_request(image_path).first_frame)
    assert result.task == "ti2v"
    assert torch.equal(result.latents[:, :1], encoded)
    assert not torch.allclose(result.latents[:, 1:2], encoded)
    # the same generator as a text-to-video student: an image is refused in one line, before any work
    with pytest.raises(UserError, match="learnt text-to-video only .*video.task: ti2v"):
        pipe.generate(PROMPT, image=image_path, seed=2)
    # an image-to-video student needs one; a student of both tasks (train.image_share < 1) takes one or none
    with pytest.raises(UserError, match="give the first frame with --image"):
        student.generate(PROMPT, seed=2)
    both = dataclasses.replace(ti2v, train=dataclasses.replace(ti2v.train, image_share=0.5))
    either = CausalInferencePipeline(both, resolved, "cpu", torch.float32, components=InferenceComponents(
        text_encoder=pipe.text_encoder, vae=pipe.vae, generator=pipe.generator))
    assert either.takes_image and not either.needs_image and student.needs_image and not pipe.takes_image
    from_image, from_text = either.generate(PROMPT, image=image_path, seed=2), either.generate(PROMPT, seed=2)
    assert from_image.task == "ti2v" and torch.equal(from_image.latents, result.latents)
    assert from_text.task == "t2v" and torch.equal(from_text.latents, pipe.generate(PROMPT, seed=2).latents)


def test_longer_than_cache_rolls_and_starts_like_the_short_video(pipe, recipe):
    config, resolved = recipe
    short = pipe.generate(PROMPT, seed=4)
    frames = config.video.num_frames + 2 * 3 * resolved.vae.stride[0]  # two more blocks of pixel frames
    long = pipe.generate(PROMPT, seed=4, num_output_frames=frames)
    trained = resolved.geometry.num_latent_frames
    assert long.video.shape[0] == frames and long.geometry.num_latent_frames == trained + 6
    assert long.geometry.cache_frames == trained  # the window the model was trained on, not the whole video
    # Until the cache is full nothing rolls: the first blocks equal the short video's.
    assert torch.allclose(long.latents[:, :trained], short.latents, atol=1e-5)
    assert torch.isfinite(long.latents).all()


def test_rolling_window_with_sink_changes_later_blocks_only(recipe, checkpoint, pipe):
    import dataclasses

    from pipeline.causal_inference import CausalInferencePipeline

    config, resolved = recipe
    frames = config.video.num_frames + 2 * 3 * resolved.vae.stride[0]
    with_sink = dataclasses.replace(config, rollout=dataclasses.replace(config.rollout, sink_size=1))
    results = {
        0: pipe.generate(PROMPT, seed=4, num_output_frames=frames),
        1: CausalInferencePipeline(with_sink, resolved, "cpu", torch.float32, checkpoint=checkpoint).generate(
            PROMPT, seed=4, num_output_frames=frames),
    }
    trained = resolved.geometry.num_latent_frames
    assert results[1].geometry.sink_frames == 1
    assert torch.allclose(results[0].latents[:, :trained], results[1].latents[:, :trained], atol=1e-5)
    assert not torch.allclose(results[0].latents[:, trained:], results[1].latents[:, trained:], atol=1e-4)


@pytest.mark.parametrize("rolling", [False, True])
def test_a_prompt_switch_changes_the_blocks_from_its_block_on(recipe, pipe, rolling):
    config, resolved = recipe
    frames = config.video.num_frames + (2 * 3 * resolved.vae.stride[0] if rolling else 0)  # 4 blocks roll the cache
    other = "a green square moving up on a white background"
    base = pipe.generate(PROMPT, seed=5, num_output_frames=frames)
    blocks = base.geometry.block_sizes
    switch_at = len(blocks) - 1
    start = sum(blocks[:switch_at])  # first latent frame of the switched block

    def at(block, prompt, recache):
        return lambda index: (prompt, recache) if index == block else None

    recached = pipe.generate(PROMPT, seed=5, num_output_frames=frames, prompt_switch=at(switch_at, other, True))
    plain = pipe.generate(PROMPT, seed=5, num_output_frames=frames, prompt_switch=at(switch_at, other, False))
    for switched in (recached, plain):
        assert torch.equal(switched.latents[:, :start], base.latents[:, :start])  # earlier blocks as they were
        assert not torch.allclose(switched.latents[:, start:], base.latents[:, start:], atol=1e-3)
    assert not torch.allclose(recached.latents[:, start:], plain.latents[:, start:], atol=1e-4)  # re-caching acts
    assert recached.prompt_switches == [{"block": switch_at, "prompt": other, "recache": True}]
    assert recached.nfe > plain.nfe == base.nfe  # the re-cache passes are counted
    # re-caching under the same prompt rebuilds the same cache: the video is unchanged
    same = pipe.generate(PROMPT, seed=5, num_output_frames=frames, prompt_switch=at(switch_at, PROMPT, True))
    assert torch.allclose(same.latents, base.latents, atol=1e-5)


# --------------------------------------------------------------------------------------------- outputs
def test_output_folders_are_slugged_and_never_reused(tmp_path):
    from pipeline.inference_outputs import new_output_dir, slugify

    assert slugify("A Cat, walks -- in the PARK!") == "a-cat-walks-in-the-park"
    assert slugify("???") == "video" and len(slugify("x" * 100)) == 40
    now = dt.datetime(2025, 1, 2, 3, 4, 5)
    first = new_output_dir(tmp_path, "t2v", 48, 32, "a cat", now=now)
    second = new_output_dir(tmp_path, "t2v", 48, 32, "a cat", now=now)
    assert first.name == "t2v_48x32_20250102_030405_a-cat" and second.name == first.name + "-2"


# --------------------------------------------------------------------------------------------- verify all
def test_verify_all_checklist_passes_and_reports_a_bad_checkpoint(recipe, checkpoint, tmp_path):
    from toolbox.verification.checklist import check_all

    config, _ = recipe
    results = check_all(config, str(checkpoint), device=torch.device("cpu"))
    names = [name for name, _, _ in results]
    assert names == ["config", "weights", "model build", "kv cache shapes", "frame_seq_length", "vae round trip",
                     "one forward", "one training step"]
    assert all(ok for _, ok, _ in results), results
    assert "keys and shapes match the recipe" in dict((n, d) for n, _, d in results)["weights"]
    without = {name: ok for name, ok, _ in check_all(config, None, device=torch.device("cpu"))}
    assert without["weights"] is None  # nothing to read: SKIP, never PASS
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not weights")
    outcome = {name: (ok, detail) for name, ok, detail in check_all(config, str(broken), device=torch.device("cpu"))}
    assert outcome["weights"][0] is False and "broken.safetensors" in outcome["weights"][1]
    assert outcome["model build"][0] is False and "broken.safetensors" in outcome["model build"][1]
    assert outcome["one forward"] == (False, "skipped: needs generator")
    assert outcome["kv cache shapes"][0] and outcome["vae round trip"][0]  # the rest still runs


def test_prompt_file_gives_each_line_its_own_seed_and_saves_latents(tmp_path, checkpoint, recipe):
    from safetensors.torch import load_file

    from pipeline.components import build_vae
    from utils.video_io import read_mp4

    _, resolved = recipe
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat walks in the park\na dog runs in the city\n")
    out = tmp_path / "out"
    proc = run_script(["inference.py", "--config_path", RECIPE, "--checkpoint", str(checkpoint), "--data_path",
                       str(prompts), "--seed", "5", "--save_latents", "--output_folder", str(out)])
    assert proc.returncode == 0, proc.stderr
    records = {json.loads((f / "inference_record.json").read_text())["prompt"]: f for f in out.iterdir()}
    assert len(records) == 2
    seeds = sorted(json.loads((f / "inference_record.json").read_text())["seed"] for f in records.values())
    assert seeds == [5, 6]  # line i uses seed + i
    vae = build_vae(resolved.vae)

    def mp4(prompt):
        return torch.from_numpy(read_mp4(records[prompt] / "video.mp4")).permute(0, 3, 1, 2).float() / 127.5 - 1

    latents = load_file(str(records["a cat walks in the park"] / "latents.safetensors"))["latents"]
    assert latents.shape == resolved.geometry.latent_shape[1:]
    # the saved latents decode to their own video (up to mp4 compression), not to the other prompt's
    with torch.no_grad():
        decoded = vae.decode_to_pixel(latents[None])[0]
    own = (decoded - mp4("a cat walks in the park")).abs().mean()
    other = (decoded - mp4("a dog runs in the city")).abs().mean()
    assert decoded.shape == mp4("a cat walks in the park").shape and own < 0.5 * other, (own, other)


def test_an_image_list_starts_each_video_from_its_own_image(tmp_path, checkpoint, recipe):
    """`image<TAB>prompt` lines: each video's first latent is its own image's encoding; bad lists are refused."""
    import imageio.v3 as iio
    from safetensors.torch import load_file

    from pipeline.components import build_vae
    from utils.datasets import load_image

    _, resolved = recipe
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png"):
        iio.imwrite(images / name, rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8))
    listing = tmp_path / "list.txt"
    listing.write_text(f"a.png\t{PROMPT}\nb.png\t{PROMPT}\n")
    out = tmp_path / "out"
    common = ["inference.py", "--config_path", RECIPE, "--checkpoint", str(checkpoint), "video.task=ti2v"]
    proc = run_script([*common, "--data_path", str(listing), "--image_root", str(images), "--save_latents",
                       "--output_folder", str(out)])
    assert proc.returncode == 0, proc.stderr
    vae = build_vae(resolved.vae)
    geometry = resolved.geometry
    for folder in out.iterdir():
        record = json.loads((folder / "inference_record.json").read_text())
        latents = load_file(str(folder / "latents.safetensors"))["latents"]
        image = load_image(record["image"], geometry.height, geometry.width)
        encoded = vae.encode_to_latent(image[None, :, None]).float()[0, 0]
        assert record["task"] == "ti2v" and torch.allclose(latents[0], encoded, atol=1e-6)
    assert sorted(Path(json.loads((f / "inference_record.json").read_text())["image"]).name for f in out.iterdir()) == [
        "a.png", "b.png"]
    # refused in one line, nothing written: an image named twice, a missing image, a root without a list
    (listing.parent / "missing.txt").write_text(f"c.png\t{PROMPT}\n")
    for extra, fragment in (
            (["--data_path", str(listing), "--image_root", str(images), "--image", str(images / "a.png")],
             "in one place"),
            (["--data_path", str(listing.parent / "missing.txt"), "--image_root", str(images)], "c.png"),
            (["--prompt", PROMPT, "--image_root", str(images)], "give --data_path too")):
        bad = tmp_path / "bad"
        assert_one_line_error(run_script([*common, *extra, "--output_folder", str(bad)]), fragment)
        assert not bad.exists()


@pytest.mark.distributed
def test_two_ranks_with_sequence_parallelism_make_the_same_video(tmp_path, checkpoint, recipe):
    """torchrun --nproc_per_node 2 inference.py ... parallel.sp_size=2: one video made by both ranks, written once."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.helpers import REPO_ROOT

    args = ["--config_path", RECIPE, "--checkpoint", str(checkpoint), "--prompt", "a red circle moving left",
            "--seed", "3", "--save_latents", "--device", "cpu"]
    single = tmp_path / "single"
    proc = run_script(["inference.py", *args, "--output_folder", str(single)])
    assert proc.returncode == 0, proc.stderr
    split = tmp_path / "sp2"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO_ROOT, "inference.py"), *args, "--output_folder", str(split), "parallel.sp_size=2"]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (one,), (two,) = list(single.iterdir()), list(split.iterdir())  # written once, by the group's first rank
    a = load_file(str(one / "latents.safetensors"))["latents"]
    b = load_file(str(two / "latents.safetensors"))["latents"]
    assert a.abs().max() > 0.1 and (a - b).abs().max() <= 1e-4 * a.abs().max()
    # alone, sp_size 2 is refused before loading anything
    proc = run_script(["inference.py", *args, "--output_folder", str(tmp_path / "alone"), "parallel.sp_size=2"])
    assert_one_line_error(proc, "parallel.sp_size=2 needs that many ranks", "torchrun --nproc_per_node 2")
    assert not (tmp_path / "alone").exists()


def test_a_checked_request_is_not_checked_again(pipe, monkeypatch):
    """generate with a checked request reads nothing again: the geometry and the image travel with it."""
    import pipeline.causal_inference as causal_inference

    request = pipe.check_request(num_output_frames=5)
    calls = []
    monkeypatch.setattr(causal_inference, "inference_geometry", lambda *a, **k: calls.append(a))
    result = pipe.generate(PROMPT, request=request, seed=1)
    assert calls == [] and result.video.shape[0] == 5 and result.geometry == request.geometry
