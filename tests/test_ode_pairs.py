"""ODE-pair generation with the tiny random teacher: seeds, resume, two ranks with a crash, LMDB, refusals, TI2V."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import REPO_ROOT, assert_one_line_error
from tests.test_lmdb import load_script, run_in_process, tiny_geometry, write_pairs
from utils.datasets import OdeLmdbDataset
from utils.lmdb_store import pair_file_name, read_pair_tensors, scan_pair_folder

RECIPE = "configs/tiny/ode.yaml"
# index 3 repeats index 0's prompt: a different seed, so a different pair (create_lmdb keeps index 0)
PROMPTS = ["a red circle moving left", "a cat walks in the park", "a green square moving up slowly",
           "a red circle moving left", "a dog runs in the city at night"]
NUM_POINTS = 5  # the tiny recipe keeps [0, 2, 4, 6, -1] of 8 steps


def generate(folder, captions, *extra, capsys=None):
    argv = ["--config_path", RECIPE, "--caption_path", captions, "--output_folder", folder, *extra]
    if capsys is not None:
        return run_in_process("scripts/generate_ode_pairs.py", argv, capsys)
    assert load_script("scripts/generate_ode_pairs.py").main([str(a) for a in argv]) == 0


def torchrun(folder, captions, env=None):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO_ROOT, "scripts/generate_ode_pairs.py"), "--config_path", RECIPE,
               "--caption_path", str(captions), "--output_folder", str(folder)]
    full_env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def folder_contents(folder):
    """{file name: (metadata tuple, tensors)} of every pair in a folder."""
    return {info.path.name: ((info.index, info.prompt, info.seed, info.fingerprint), read_pair_tensors(info.path))
            for info in scan_pair_folder(folder)}


def assert_same_results(folder_a, folder_b):
    a, b = folder_contents(folder_a), folder_contents(folder_b)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name][0] == b[name][0], name
        for key in ("ode_latents", "ode_timesteps"):
            assert torch.equal(a[name][1][key], b[name][1][key]), (name, key)


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    path = tmp_path_factory.mktemp("captions") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, captions):
    """One uninterrupted single-process run over all prompts: the reference."""
    folder = tmp_path_factory.mktemp("single") / "pairs"
    generate(folder, captions)
    return folder


def test_one_file_per_prompt_starting_from_the_seeded_noise(single_run):
    script = load_script("scripts/generate_ode_pairs.py")
    latent_shape = tiny_geometry().latent_shape[1:]
    infos = scan_pair_folder(single_run)
    assert [info.index for info in infos] == list(range(len(PROMPTS)))
    assert [info.prompt for info in infos] == PROMPTS
    for info in infos:
        tensors = read_pair_tensors(info.path)
        latents, timesteps = tensors["ode_latents"], tensors["ode_timesteps"]
        assert latents.dtype == torch.float16 and latents.shape == (NUM_POINTS, *latent_shape)
        assert timesteps.shape == (NUM_POINTS,) and timesteps[-1] == 0 and torch.all(timesteps[:-1] > timesteps[1:])
        # point 0 is the noise itself, drawn from the pair's own seed
        assert info.seed == script.pair_seed(0, info.index)
        noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(info.seed))
        assert torch.equal(latents[0], noise.half())
    first, repeat = (read_pair_tensors(infos[i].path)["ode_latents"] for i in (0, 3))
    assert not torch.equal(first[-1], repeat[-1])  # same prompt, other seed: another sample
    assert (single_run / "config.yaml").is_file()


def test_rerun_skips_finished_prompts_and_redoes_only_missing_ones(single_run, captions, tmp_path, capsys):
    folder = tmp_path / "pairs"
    shutil.copytree(single_run, folder)
    kept = {name: os.stat(folder / name).st_mtime_ns for name in (pair_file_name(0), pair_file_name(2))}
    for index in (1, 3, 4):
        os.unlink(folder / pair_file_name(index))
    leftover = folder / f".{pair_file_name(3)}.x1y2z3.tmp"  # what a kill during a write leaves
    leftover.write_bytes(b"half a file")
    proc = generate(folder, captions, capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert "3 generated, 2 already done" in proc.stdout and "16 per prompt" in proc.stdout
    assert not leftover.exists()
    assert {name: os.stat(folder / name).st_mtime_ns for name in kept} == kept  # not redone
    assert_same_results(folder, single_run)
    proc = generate(folder, captions, capsys=capsys)
    assert "0 generated, 5 already done" in proc.stdout


@pytest.mark.distributed
def test_two_ranks_interrupted_then_rerun_equal_one_uninterrupted_run(single_run, captions, tmp_path):
    folder = tmp_path / "pairs"
    crashed = torchrun(folder, captions, env={"ODE_PAIRS_EXIT_AFTER": "1"})
    assert crashed.returncode != 0
    partial = scan_pair_folder(folder)
    assert 1 <= len(partial) < len(PROMPTS), crashed.stderr[-2000:]
    finished = torchrun(folder, captions)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"{len(PROMPTS) - len(partial)} generated, {len(partial)} already done" in finished.stdout
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]
    assert_same_results(folder, single_run)


def test_pairs_to_lmdb_to_dataset(single_run, tmp_path, capsys):
    proc = run_in_process("scripts/create_lmdb.py", ["--data_path", single_run, "--lmdb_path", tmp_path / "db.lmdb"], capsys)
    assert proc.returncode == 0, proc.stderr
    dataset = OdeLmdbDataset(tmp_path / "db.lmdb", tiny_geometry())
    assert len(dataset) == len(PROMPTS)  # the repeated prompt was sampled from two seeds: two rows
    assert dataset.header["keep_indices"] == [0, 2, 4, 6, -1]
    items = [dataset[i] for i in range(len(dataset)) if dataset[i]["prompt"] == PROMPTS[0]]
    sources = [read_pair_tensors(single_run / pair_file_name(i)) for i in (0, 3)]  # rows in index order
    assert not torch.equal(sources[0]["ode_latents"], sources[1]["ode_latents"])
    for item, source in zip(items, sources, strict=True):
        assert torch.equal(item["ode_latents"], source["ode_latents"].float())
        assert torch.equal(item["ode_timesteps"], source["ode_timesteps"])
    dataset.reader.close()


def test_bad_inputs_are_refused_before_any_model(tmp_path, captions, capsys):
    folder = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("\n")
    cases = [
        (tmp_path / "missing.txt", [], ("missing.txt", "not found")),
        (tmp_path / "empty.txt", [], ("empty.txt", "is empty")),
        (captions, ["--num_prompts", "0"], ("--num_prompts", "at least 1")),
    ]
    for caption_path, extra, fragments in cases:
        assert_one_line_error(generate(folder, caption_path, *extra, capsys=capsys), *fragments)
        assert not folder.exists()
    # a folder holding pairs of another geometry is left untouched
    write_pairs(folder, {0: PROMPTS[0]}, tiny_geometry("video.height=64"))
    before = sorted(os.listdir(folder))
    assert_one_line_error(generate(folder, captions, capsys=capsys), "another geometry", "000000.safetensors")
    assert sorted(os.listdir(folder)) == before


def test_ti2v_keeps_the_encoded_image_as_the_clean_first_frame(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name, colour in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        Image.fromarray(np.full((40, 70, 3), colour, np.uint8)).save(images / name)
    (tmp_path / "pairs.txt").write_text("red.png\ta red circle\nblue.png\ta blue square\n")
    overrides = ["generator.preset=tiny-ti2v", "real_score.preset=tiny-ti2v", "vae.preset=tiny-wan2.2",
                 "video.task=ti2v", "video.width=64"]
    proc = generate(tmp_path / "out", tmp_path / "pairs.txt", *overrides, capsys=capsys)
    assert_one_line_error(proc, "--image_root")
    proc = generate(tmp_path / "out", tmp_path / "pairs.txt", "--image_root", images, *overrides, capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    red, blue = (read_pair_tensors(tmp_path / "out" / pair_file_name(i))["ode_latents"] for i in (0, 1))
    for latents in (red, blue):
        assert latents.shape[2] == 48  # the Wan2.2 latent space
        assert all(torch.equal(latents[p, 0], latents[-1, 0]) for p in range(NUM_POINTS))  # frame 0 clean throughout
        assert not torch.equal(latents[0, 1], latents[-1, 1])  # later frames are denoised
    assert not torch.equal(red[-1, 0], blue[-1, 0])  # the image decides frame 0


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["parallel.sp_size=2", "parallel.cfg_parallel=true"], ids=["sp2", "cfg-parallel"])
def test_two_ranks_sharing_each_sample_equal_the_single_rank_sampler(single_run, captions, tmp_path, parallel):
    """Sequence parallelism and CFG-parallel: 2 ranks make each sample together, the group's first rank writes it."""
    folder = tmp_path / "pairs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO_ROOT, "scripts/generate_ode_pairs.py"), "--config_path", RECIPE,
               "--caption_path", str(captions), "--output_folder", str(folder), parallel]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(PROMPTS)} generated" in proc.stdout
    a, b = folder_contents(single_run), folder_contents(folder)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name][0] == b[name][0], name
        assert torch.equal(a[name][1]["ode_timesteps"], b[name][1]["ode_timesteps"])
        single, shared = a[name][1]["ode_latents"].float(), b[name][1]["ode_latents"].float()
        assert (single - shared).abs().max() <= 2e-3 * single.abs().max(), name  # float16 files, fp32 sampling
