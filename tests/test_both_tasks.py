"""One student for both tasks: text-to-video and image-conditioned pairs packed into one LMDB are told apart by row,
a share of a prompt file's samples is given its image (drawn per item, the same on resume), and ODE regression trains
each row as its own task."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import REPO_ROOT, run_script
from trainer.data import held_first_frames
from trainer.data_position import ShardedSampler
from utils.config import load_config
from utils.errors import UserError
from utils.geometry import derive_geometry

ODE = f"{REPO_ROOT}/configs/tiny/ode.yaml"


def trajectory(geometry, timesteps, generator, held: bool) -> torch.Tensor:
    """Kept points [P, F, C, H, W] on the flow path; an image-conditioned one holds frame 0 clean at every point."""
    clean = 0.5 * torch.randn(geometry.latent_shape[1:], generator=generator)
    noise = torch.randn(geometry.latent_shape[1:], generator=generator)
    points = torch.stack([(1 - t / 1000) * clean + (t / 1000) * noise for t in timesteps])
    if held:
        points[:, 0] = clean[0]
    return points


def test_rows_that_hold_their_first_frame_are_told_from_the_data():
    g = derive_geometry(load_config(ODE))
    timesteps = [1000.0, 750.0, 500.0, 250.0, 0.0]
    generator = torch.Generator().manual_seed(0)
    latents = torch.stack([trajectory(g, timesteps, generator, held) for held in (True, False, True, False)])
    first, rows = held_first_frames(latents)
    assert rows.tolist() == [True, False, True, False] and torch.equal(first, latents[:, -1, :1])
    first, rows = held_first_frames(latents[::2])
    assert rows is None and first is not None  # every row holds it: the plain image-to-video batch
    first, rows = held_first_frames(latents[1::2])
    assert first is None and rows is None  # none does: a text-to-video batch


def test_a_share_of_rows_gets_its_image_drawn_per_item_and_epoch():
    sampler = ShardedSampler(200, batch_size=200, rank=0, world_size=1, seed=5)
    indices = sampler.next_indices()
    draws = sampler.draw_below(indices, 0.25)
    assert abs(sum(draws) / len(draws) - 0.25) < 0.1 and 0 < sum(draws) < 200
    again = ShardedSampler(200, batch_size=200, rank=0, world_size=1, seed=5)
    assert again.draw_below(indices, 0.25) == draws  # from the seed, the epoch and the item alone
    assert sampler.draw_below(indices, 1.0) == [True] * 200


def test_image_share_is_checked():
    with pytest.raises(UserError, match="train.image_share.*1 unless video.task is ti2v"):
        load_config(ODE, ["train.image_share=0.5"])
    with pytest.raises(UserError, match=r"train.image_share.*\(0, 1\]"):
        load_config(ODE, ["video.task=ti2v", "train.image_share=0"])


def test_both_kinds_of_pairs_pack_into_one_lmdb_and_train_each_row_as_its_own_task(tmp_path):
    """create_lmdb.py packs a text-to-video folder and an image-conditioned one of the same prompts and seeds (no row
    dropped as a copy); ode_init on it with video.task ti2v trains (the held frames never regressed)."""
    from utils.lmdb_store import OdeLmdbReader, write_pair_file

    config = load_config(ODE)
    g = derive_geometry(config)
    from pipeline.flow_matching import few_step_timesteps

    rollout, flow = config.rollout, config.flow
    student = few_step_timesteps(rollout.denoising_step_list, rollout.warp_denoising_step, flow.timestep_shift,
                                 flow.num_train_timesteps).tolist()
    timesteps = torch.tensor([*student, 0.0])
    generator = torch.Generator().manual_seed(1)
    for folder, held in (("t2v", False), ("ti2v", True)):
        for index, prompt in enumerate(["a red cat", "a blue dog"]):
            write_pair_file(tmp_path / folder, index, trajectory(g, timesteps.tolist(), generator, held), timesteps,
                            prompt=prompt, seed=index, geometry=g, keep_indices=[0, 2, 4, 6, -1])
    lmdb = tmp_path / "both.lmdb"
    proc = run_script(["scripts/create_lmdb.py", "--data_path", str(tmp_path / "t2v"), str(tmp_path / "ti2v"),
                       "--lmdb_path", str(lmdb)])
    assert proc.returncode == 0, proc.stderr
    reader = OdeLmdbReader(lmdb)
    rows = [reader.read(i) for i in range(reader.header["count"])]
    reader.close()
    latents = torch.from_numpy(np.stack([r.latents.astype(np.float32) for r in rows]))
    assert len(rows) == 4 and held_first_frames(latents)[1].sum() == 2  # two of each task
    proc = run_script(["train.py", "--config_path", ODE, "--logdir", str(tmp_path / "run"), "--disable-wandb",
                       f"train.data_path={lmdb}", "video.task=ti2v", "train.max_steps=2", "train.batch_size=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["generator_loss"]) for r in records if "generator_loss" in r)


class Encodes:
    """Stand-ins for the text encoder and the VAE: shapes only (what the batch source hands on is under test)."""

    def encode(self, prompts):
        return torch.zeros(len(prompts), 4, 8)

    def encode_cached(self, prompt):
        return torch.zeros(1, 4, 8)

    def encode_to_latent(self, video):
        return video.mean(dim=1, keepdim=True).transpose(1, 2)  # [B, 3, 1, H, W] -> [B, 1, 1, H, W]


def test_a_prompt_file_of_images_gives_a_share_of_rows_their_image(tmp_path):
    from PIL import Image

    from trainer.data import BatchSource
    from utils.datasets import ImageTextDataset

    (tmp_path / "images").mkdir()
    lines = []
    for index in range(16):
        Image.new("RGB", (8, 8), (index * 10, 0, 0)).save(tmp_path / "images" / f"{index}.png")
        lines.append(f"{index}.png\ta prompt {index}")
    (tmp_path / "list.tsv").write_text("\n".join(lines) + "\n")
    dataset = ImageTextDataset(tmp_path / "list.tsv", tmp_path / "images", 8, 8)

    def batches(share, count=4):
        sampler = ShardedSampler(len(dataset), 4, rank=0, world_size=1, seed=2)
        source = BatchSource(dataset, sampler, Encodes(), "", torch.device("cpu"), ti2v=True, vae=Encodes(),
                             image_share=share)
        return [source.next() for _ in range(count)]

    every = batches(1.0)
    assert all(b.first_frame is not None and b.first_frame_rows is None for b in every)  # the image-to-video student

    def rows(batch):
        return batch.first_frame_rows.tolist() if batch.first_frame_rows is not None else [batch.first_frame is not None] * 4

    mixed = [rows(b) for b in batches(0.5)]
    flat = sum(mixed, [])
    assert 0 < sum(flat) < len(flat) and any(0 < sum(r) < 4 for r in mixed)  # both tasks, and batches holding both
    assert [rows(b) for b in batches(0.5)] == mixed  # drawn from the seed, epoch and item: the same on a rerun
