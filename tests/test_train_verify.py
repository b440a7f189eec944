"""verify.py train (toolbox/verification/train.py): one generator and one critic step at tiny geometry, tiny and full-size
recipes."""
import os

import pytest

from tests.helpers import REPO_ROOT


@pytest.mark.parametrize("recipe, has_critic", [("configs/tiny/self_forcing_sid.yaml", True), ("configs/ode_5B.yaml", False),
                                              ("configs/causal_teacher_5B.yaml", False)])
def test_check_train_steps_reach_the_trained_models(recipe, has_critic):
    from toolbox.verification.train import check_train
    from utils.config import load_config

    items = check_train(load_config(os.path.join(REPO_ROOT, recipe)))
    names = [name for name, _, _ in items]
    assert all(ok for _, ok, _ in items), items
    assert "gradients reach the generator" in names
    assert ("gradients reach the critic" in names) == has_critic


def test_tiny_variant_keeps_the_objective_and_the_latent_space():
    from toolbox.verification.train import tiny_variant
    from utils.config import load_config
    from utils.geometry import derive_geometry

    config = load_config(os.path.join(REPO_ROOT, "configs/self_forcing_dmd_5B.yaml"))
    tiny = tiny_variant(config)
    geometry = derive_geometry(tiny, check_weights=False)
    assert geometry.latent_channels == derive_geometry(config, check_weights=False).latent_channels
    assert geometry.num_blocks == 2 and tiny.distill == config.distill and tiny.rollout == config.rollout
