"""Training checkpoints (torch.distributed.checkpoint) and the inference export in <logdir>/latest/.

Layout under <logdir>/checkpoints/:
    step_000123.tmp/   written by every rank (DCP shards + rng_rank{r}.pt), then renamed by rank 0 to
    step_000123/       only once complete; then
    latest.txt         rewritten atomically to name it. A crash at any moment leaves the previous latest whole.
The export <logdir>/latest/ holds generator.safetensors (+ generator_ema.safetensors once EMA has started)
with official Wan key names, config.json (architecture, for WanModel.from_pretrained) and config.yaml.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from trainer.parallel import clean_name
from utils.dist import barrier
from utils.errors import UserError
from utils.io import atomic_save_safetensors, atomic_write_json, atomic_write_text

# Test-only: the process exits (as if killed) in the middle of saving this step, after the shards are
# written and before the rename; used by tests/test_train_resume.py to prove a crash keeps latest intact.
EXIT_DURING_SAVE_ENV = "SF_TEST_EXIT_DURING_SAVE"


class ModelAndOptimizer(Stateful):
    """One trainable model and its optimizer, as FQN-keyed (possibly sharded) state for DCP."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def rng_state() -> dict[str, Any]:
    """This rank's random states (torch, CUDA, python; numpy only when it is loaded)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    np = __import__("sys").modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every save/load in a single process (no process group); that case is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class CheckpointManager:
    def __init__(self, logdir: str | Path, keep_last: int, rank: int) -> None:
        self.root = Path(logdir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank

    def _dir(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def latest_step(self) -> int | None:
        """The step named by latest.txt, or None for a fresh run; a latest.txt naming a missing folder is an error."""
        pointer = self.root / "latest.txt"
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        if not (self.root / name).is_dir() or not name.startswith("step_"):
            raise UserError(f"{pointer} names '{name}', which is not a checkpoint folder in {self.root}")
        return int(name.removeprefix("step_"))

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Collective: every rank writes its shards and its RNG; rank 0 publishes the folder."""
        tmp = self.root / f"step_{step:06d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        barrier()
        if os.environ.get(EXIT_DURING_SAVE_ENV) == str(step):
            os._exit(17)
        if self.rank == 0:
            final = self._dir(step)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_text(self.root / "latest.txt", final.name + "\n")
            self._prune()
        barrier()

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def remove_partial(self) -> None:
        """Rank 0 drops folders a crash left half-written (never named by latest.txt)."""
        if self.rank == 0:
            for partial in self.root.glob("step_*.tmp"):
                shutil.rmtree(partial, ignore_errors=True)
        barrier()

    def load(self, step: int, state: dict[str, Any]) -> None:
        """Collective: restore `state` in place from step `step`, and this rank's RNG."""
        folder = self._dir(step)
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(folder))
        rng_file = folder / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank takes part (collective); rank 0 receives the unsharded weights on the CPU.

    Copies: unsharded CPU models hand back their live parameters, which the EMA swap would then overwrite.
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {clean_name(key): value.detach().clone() for key, value in state.items()}


def write_export(folder: Path, weights: dict[str, dict[str, torch.Tensor]], config_json: dict, config_yaml: str) -> None:
    """Rank 0: <folder>/{name}.safetensors for each entry, config.json and config.yaml, swapped in as a whole.

    Everything is written into <folder>.tmp first, so generator and EMA weights of different steps never
    stand side by side; a crash leaves the previous export (or, between the two renames, <folder>.old).
    """
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, tensors in weights.items():
        atomic_save_safetensors(tmp / f"{name}.safetensors", tensors, metadata={"format": "pt"})
    atomic_write_json(tmp / "config.json", config_json)
    atomic_write_text(tmp / "config.yaml", config_yaml)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
