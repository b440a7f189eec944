"""How inference decodes: the full VAE or the light decoder, in line or beside the denoising (same frames)."""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from tests.fixtures.light_decoder import write_checkpoint
from tests.helpers import assert_one_line_error, run_script

RECIPE = "configs/tiny/self_forcing_dmd.yaml"  # Wan2.1 latents: 16 channels, stride (4, 8, 8)
PROMPT = "a red circle moving left on a blue background"


@pytest.fixture(scope="module")
def recipe():
    from utils.config import load_config
    from utils.geometry import resolve_recipe

    config = load_config(RECIPE)
    return config, resolve_recipe(config, need_scores=False)


@pytest.fixture(scope="module")
def components(recipe):
    from pipeline.causal_inference import CausalInferencePipeline, InferenceComponents

    config, resolved = recipe
    pipe = CausalInferencePipeline(config, resolved, "cpu", torch.float32)
    return InferenceComponents(text_encoder=pipe.text_encoder, vae=pipe.vae, generator=pipe.generator)


@pytest.fixture(scope="module")
def taew2_1(tmp_path_factory):
    return write_checkpoint("taew2_1", tmp_path_factory.mktemp("taehv") / "taew2_1.pth")


def pipeline_with(recipe, components, **inference):
    from pipeline.causal_inference import CausalInferencePipeline

    config, resolved = recipe
    config = dataclasses.replace(config, inference=dataclasses.replace(config.inference, **inference))
    return CausalInferencePipeline(config, resolved, "cpu", torch.float32, components=components)


@pytest.mark.parametrize("light", [False, True])
def test_decoding_beside_the_denoising_gives_the_same_frames(recipe, components, taew2_1, light):
    from wan.light_decoder import LightDecoder

    if light:
        components = dataclasses.replace(components, light_decoder=LightDecoder.from_pretrained(taew2_1))
    videos, blocks, threads = {}, {}, {}
    for overlap in (False, True):
        pipe = pipeline_with(recipe, components, overlap_decode=overlap)
        seen, names = [], []

        def on_block(index, pixels):
            seen.append((index, pixels.shape[1]))
            names.append(threading.current_thread().name.split("_")[0])

        result = pipe.generate(PROMPT, seed=5, num_output_frames=45, on_block=on_block)
        videos[overlap], blocks[overlap], threads[overlap] = result.video, seen, names
        assert result.timings["first_block_latency_s"] > 0 and result.timings["vae_decode_s"] > 0
    assert torch.equal(videos[False], videos[True])  # bit-identical
    assert blocks[False] == blocks[True] == [(0, 9), (1, 12), (2, 12), (3, 12)]
    # in line; beside: the first block at once (the stream's latency), the later ones on the decode worker
    assert threads == {False: ["MainThread"] * 4, True: ["MainThread"] + ["decode"] * 3}
    assert videos[True].shape[0] == 45


def test_the_light_decoder_decodes_the_rollout_as_one_whole_decode(recipe, components, taew2_1):
    from wan.light_decoder import LightDecoder

    light = LightDecoder.from_pretrained(taew2_1)
    pipe = pipeline_with(recipe, dataclasses.replace(components, light_decoder=light))
    assert pipe.decoder_name == "light"
    result = pipe.generate(PROMPT, seed=1)
    whole = light.decode(result.latents)[0]
    assert result.video.shape == whole.shape
    assert (result.video - whole).abs().max().item() < 1e-5
    full = pipeline_with(recipe, components).generate(PROMPT, seed=1)
    assert torch.equal(full.latents, result.latents)  # the decoder changes the pixels only
    assert not torch.allclose(full.video, result.video, atol=1e-2)


def test_a_failure_while_decoding_beside_stops_the_rollout(recipe, components):
    pipe = pipeline_with(recipe, components, overlap_decode=True)
    calls = {"forwards": 0, "after": 0}
    original = pipe.generator.forward_cached

    def counting(*args, **kwargs):
        calls["forwards"] += 1
        return original(*args, **kwargs)

    class Stopped(Exception):
        pass

    def on_block(index, pixels):
        if index == 1:  # the first block handed to the decode worker
            assert threading.current_thread().name.startswith("decode")
            calls["after"] = calls["forwards"]
            raise Stopped

    pipe.generator.forward_cached = counting
    try:
        with pytest.raises(Stopped):
            pipe.generate(PROMPT, seed=0, num_output_frames=93, on_block=on_block)  # 8 blocks
    finally:
        del pipe.generator.forward_cached
    per_block = len(pipe.config.rollout.denoising_step_list) + 1
    assert calls["forwards"] <= calls["after"] + per_block  # stopped within the block after the failure


def test_light_decoder_setting_and_mismatch_are_refused_in_one_line(tmp_path):
    proc = run_script(["inference.py", "--config_path", RECIPE, "--checkpoint", "absent", "--prompt", PROMPT,
                       "--output_folder", str(tmp_path / "out"), "inference.decoder=light"])
    assert_one_line_error(proc, "inference.light_decoder", "taew2_1")
    wan22 = write_checkpoint("taew2_2", tmp_path / "taew2_2.safetensors")
    export = tmp_path / "export"
    proc = run_script(["inference.py", "--config_path", RECIPE, "--checkpoint", str(export), "--prompt", PROMPT,
                       "--output_folder", str(tmp_path / "out"), "inference.decoder=light",
                       f"inference.light_decoder={wan22}"])
    assert_one_line_error(proc, "48-channel latents", "16-channel latents", "use taew2_1")
    assert not (tmp_path / "out").exists()
