"""Shared test settings: one torch thread per test process (CI has 2 cores), GPU tests skipped without CUDA."""
import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

torch.set_num_threads(1)


# The longest files first (about 30 s to 5 min each on 2 cores): `make test` hands whole files to 2 workers in this
# order, so the long ones start at once and the short ones fill in, instead of a long file starting last.
LONG_FILES_FIRST = (
    "test_real_chain.py", "test_quickstart.py", "test_sequence_parallel.py", "test_quickstart_tasks.py",
    "test_memory_estimate.py", "test_published_folders.py", "test_serve.py", "test_reliability.py", "test_train_distill.py",
    "test_run_folder.py", "test_light_decoder_training.py", "test_speed_path.py", "test_inference.py", "test_ode_pairs.py",
    "test_train_resume.py", "test_long_tuning.py", "test_train_evaluation.py", "test_verify_model.py",
    "test_train_miniature_teacher.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order and the rest kept
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    """A random miniature teacher in the official layout (the quickstart chain's mechanics do not need a good one)."""
    from utils.io import atomic_save_safetensors, atomic_write_json
    from utils.presets import ARCH_FIELDS, arch_to_config_json, load_model_preset
    from wan.modules.model import WanModel

    folder = tmp_path_factory.mktemp("teacher")
    arch = {k: load_model_preset("configs/miniature/dit.yaml")[k] for k in ARCH_FIELDS}
    torch.manual_seed(0)
    atomic_save_safetensors(folder / "model.safetensors", WanModel(**arch).state_dict())
    atomic_write_json(folder / "config.json", arch_to_config_json(arch))
    return folder
