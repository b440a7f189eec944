"""Shared pieces of the tests/test_train_*.py files: a torchrun launcher, metrics, checkpoint tensors, ODE pairs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tests.helpers import REPO_ROOT

TINY = os.path.join(REPO_ROOT, "configs", "tiny")
PROMPTS = os.path.join(REPO_ROOT, "prompts", "tiny_prompts.txt")


def torchrun_train(config_path, logdir, *overrides, env=None, nproc=2, timeout=300):
    """`torchrun --standalone --nproc_per_node=N train.py ...` on CPU (gloo); returns the CompletedProcess."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(REPO_ROOT, "train.py"), "--config_path", str(config_path), "--logdir", str(logdir),
               "--disable-wandb", *overrides]
    full_env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                **(env or {})}
    return subprocess.run(command, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout={proc.stdout[-3000:]}\nstderr={proc.stderr[-6000:]}"


def metrics(logdir):
    path = Path(logdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_tensors(folder):
    """Every tensor of a DCP checkpoint folder, read in this (single) process: {key: tensor}."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    state = _load_state_dict_from_keys(checkpoint_id=str(folder))
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(node, torch.Tensor):
            flat[prefix] = node

    walk("", state)
    return flat


def write_tiny_ode_lmdb(config, path, seed=0):
    """Consistent synthetic ODE pairs for the recipe's geometry: x_t = (1 - s) x0 + s n at the kept timesteps, which
    are the student's warped steps (as the recipes' pairs are sampled) and the clean point."""
    from pipeline.flow_matching import few_step_timesteps
    from utils.geometry import derive_geometry
    from utils.lmdb_store import fingerprint_fields, geometry_fingerprint, make_header, write_ode_lmdb

    geometry = derive_geometry(config)
    rollout, flow = config.rollout, config.flow
    student = few_step_timesteps(rollout.denoising_step_list, rollout.warp_denoising_step, flow.timestep_shift,
                                 flow.num_train_timesteps)
    timesteps = [*student.tolist(), 0.0]
    prompts = Path(PROMPTS).read_text().split("\n")
    prompts = [p for p in prompts if p.strip()]
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for prompt in prompts:
        clean = 0.5 * torch.randn(geometry.latent_shape[1:], generator=generator)
        noise = torch.randn(geometry.latent_shape[1:], generator=generator)
        points = torch.stack([(1 - t / 1000) * clean + (t / 1000) * noise for t in timesteps])
        rows.append((prompt, points.numpy().astype(np.float16)))
    header = make_header(count=len(rows), shape=rows[0][1].shape, dtype="float16", trajectory_timesteps=timesteps,
                         keep_indices=[0, 2, 4, 6, -1], geometry_fields=fingerprint_fields(geometry),
                         fingerprint=geometry_fingerprint(geometry, timesteps))
    return write_ode_lmdb(path, header, rows)
