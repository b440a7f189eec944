"""ODE pairs on the student's own steps: the recipes sample there, the ODE stage refuses other points, and
Self-Forcing's published labelling is an explicit option."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.helpers import assert_one_line_error, run_script
from tests.train_helpers import PROMPTS, TINY
from utils.config import load_config

ODE_RECIPES = ("configs/ode.yaml", "configs/ode_5B.yaml", "configs/miniature/ode.yaml", "configs/miniature/ode_causal.yaml",
               "configs/tiny/ode.yaml", "configs/ode_causal.yaml", "configs/ode_causal_5B.yaml", "configs/ode_a14b.yaml")
TINY_ODE = os.path.join(TINY, "ode.yaml")
PUBLISHED_POINTS = [1000.0, 750.0, 500.0, 250.0, 0.0]  # an LMDB labelled like the unwarped list: not the student's steps


def student_steps(config) -> list[float]:
    from pipeline.flow_matching import few_step_timesteps

    rollout, flow = config.rollout, config.flow
    return few_step_timesteps(rollout.denoising_step_list, rollout.warp_denoising_step, flow.timestep_shift,
                              flow.num_train_timesteps).tolist()


@pytest.mark.parametrize("recipe", ODE_RECIPES)
def test_every_ode_recipe_keeps_the_student_steps(recipe):
    from pipeline.schedule import teacher_sigmas
    from pipeline.teacher_sampling import ode_sampling_plan, resolve_keep_indices

    config = load_config(recipe)
    ode, steps = config.ode, config.flow.num_train_timesteps
    official = teacher_sigmas(ode.num_steps, ode.shift, steps)
    if ode.insert_student_steps:  # the teacher's own schedule, with the student's steps inserted into it
        sigmas, keep = ode_sampling_plan(ode, torch.tensor(student_steps(config)), steps)
        inserted = [s for s in sigmas.tolist() if not any(abs(s - o) < 1e-9 for o in official.tolist())]
        assert len(sigmas) == len(official) + len(inserted) and len(inserted) == len(student_steps(config)) - 1
        kept = (sigmas[keep] * steps).tolist()
    else:
        kept = (official[resolve_keep_indices(ode.keep_indices, ode.num_steps)] * steps).tolist()
    assert kept[-1] == 0.0
    assert kept[:-1] == pytest.approx(student_steps(config), abs=1.0)
    assert config.train.ode_point_timesteps == "stored"


def write_lmdb_with_points(config, path, timesteps):
    from utils.geometry import derive_geometry
    from utils.lmdb_store import fingerprint_fields, geometry_fingerprint, make_header, write_ode_lmdb

    geometry = derive_geometry(config)
    latents = np.zeros((len(timesteps), *geometry.latent_shape[1:]), dtype=np.float16)
    header = make_header(count=1, shape=latents.shape, dtype="float16", trajectory_timesteps=timesteps,
                         keep_indices=list(range(len(timesteps) - 1)) + [-1], geometry_fields=fingerprint_fields(geometry),
                         fingerprint=geometry_fingerprint(geometry, timesteps))
    return write_ode_lmdb(path, header, [("a prompt", latents)])


def test_an_lmdb_off_the_student_steps_is_refused_before_training(tmp_path):
    config = load_config(TINY_ODE)
    lmdb = write_lmdb_with_points(config, tmp_path / "off.lmdb", PUBLISHED_POINTS)
    proc = run_script(["train.py", "--config_path", TINY_ODE, "--logdir", str(tmp_path / "run"), "--disable-wandb",
                       f"train.data_path={lmdb}"])
    assert_one_line_error(proc, "keeps noisy points at t = [1000.0, 750.0, 500.0, 250.0]",
                          "the student rolls out at [1000.0, 937.5, 833.3, 625.0]", "train.ode_point_timesteps=student_steps")
    assert not (tmp_path / "run" / "latest").exists()
    # points on the student's steps (within a timestep) are taken as they are
    from trainer.data import build_dataset
    from utils.geometry import derive_geometry

    on_steps = [t - 0.4 for t in student_steps(config)] + [0.0]
    config = load_config(TINY_ODE, [f"train.data_path={write_lmdb_with_points(config, tmp_path / 'on.lmdb', on_steps)}"])
    dataset = build_dataset(config, derive_geometry(config))
    assert dataset[0]["ode_timesteps"].tolist() == pytest.approx(on_steps)


def test_the_published_labelling_is_an_explicit_option(tmp_path):
    from trainer.data import build_dataset
    from utils.geometry import derive_geometry

    base = load_config(TINY_ODE)
    lmdb = write_lmdb_with_points(base, tmp_path / "off.lmdb", PUBLISHED_POINTS)
    config = load_config(TINY_ODE, [f"train.data_path={lmdb}", "train.ode_point_timesteps=student_steps"])
    dataset = build_dataset(config, derive_geometry(config))
    assert dataset[0]["ode_timesteps"].tolist() == pytest.approx(student_steps(config) + [0.0])
    # the labels must be one per student step
    three = write_lmdb_with_points(base, tmp_path / "three.lmdb", [1000.0, 500.0, 250.0, 0.0])
    config = load_config(TINY_ODE, [f"train.data_path={three}", "train.ode_point_timesteps=student_steps"])
    with pytest.raises(Exception, match="keeps 3 noisy points"):
        build_dataset(config, derive_geometry(config))
    with pytest.raises(Exception, match="train.ode_point_timesteps"):
        load_config(TINY_ODE, ["train.ode_point_timesteps=shifted"])


def test_the_objective_regresses_at_the_labelled_timesteps(tmp_path):
    """What the dataset labels is what the model is fed: the stored points, or the student's list."""
    from model.objective import Batch, Models
    from model.ode import OdeRegression
    from trainer.data import build_dataset
    from utils.geometry import derive_geometry

    base = load_config(TINY_ODE)
    lmdb = write_lmdb_with_points(base, tmp_path / "off.lmdb", PUBLISHED_POINTS)
    config = load_config(TINY_ODE, [f"train.data_path={lmdb}", "train.ode_point_timesteps=student_steps"])
    geometry = derive_geometry(config)
    item = build_dataset(config, geometry)[0]
    seen = []

    class Recorder:
        def forward_block_causal(self, x, t, *args, **kwargs):
            seen.append(t.clone())
            return torch.zeros_like(x, requires_grad=True)

    objective = OdeRegression(geometry, config.flow.num_train_timesteps, clean_context=False)
    batch = Batch(prompts=["p"], context=torch.zeros(1, geometry.text_len, geometry.text_dim),
                  ode_latents=item["ode_latents"][None], ode_timesteps=item["ode_timesteps"])
    objective.generator_loss(Models(generator=Recorder()), batch)
    assert seen, "the objective never called the generator"
    fed = set(np.round(seen[0].flatten().tolist(), 1))
    assert fed <= {round(t, 1) for t in student_steps(config)}


def test_pairs_off_the_student_steps_are_refused_before_sampling(tmp_path):
    proc = run_script(["scripts/generate_ode_pairs.py", "--config_path", TINY_ODE, "--caption_path", PROMPTS,
                       "--output_folder", str(tmp_path / "pairs"), "--num_prompts", "1", "ode.shift=8"])
    assert_one_line_error(proc, "ode.shift 8", "[999.9, 959.8, 888.7, 727.0]", "[1000.0, 937.5, 833.3, 625.0]")
    assert not (tmp_path / "pairs").exists()
    proc = run_script(["scripts/generate_ode_pairs.py", "--config_path", TINY_ODE, "--caption_path", PROMPTS,
                       "--output_folder", str(tmp_path / "pairs"), "--num_prompts", "1", "ode.shift=8", "ode.num_steps=8",
                       "ode.keep_indices=[0,2,4,6,-1]", "train.ode_point_timesteps=student_steps"])
    assert proc.returncode == 0, proc.stderr
