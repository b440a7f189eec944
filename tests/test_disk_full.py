"""A full disk ends in one line naming the path and the space left, with nothing half-written left behind and the
last good checkpoint kept. The fault is injected by a sitecustomize module that makes one writer raise ENOSPC (as the
operating system would) from its n-th call, in the entry point's own process."""
from __future__ import annotations

import os
import re
from pathlib import Path

from tests.helpers import REPO_ROOT, run_script

TINY_DMD = os.path.join(REPO_ROOT, "configs/tiny/self_forcing_dmd.yaml")
INJECT = '''
import errno, importlib, os
_module, _name, _from_call = os.environ["SF_TEST_DISK_FULL"].split(":")
_target = importlib.import_module(_module)
_original, _calls = getattr(_target, _name), [0]

def _full(*args, **kwargs):
    _calls[0] += 1
    if _calls[0] >= int(_from_call):
        raise OSError(errno.ENOSPC, "No space left on device")
    return _original(*args, **kwargs)

setattr(_target, _name, _full)
'''


def run_with_full_disk(tmp_path: Path, target: str, from_call: int, args: list[str]):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(INJECT)
    env = {"PYTHONPATH": f"{site}{os.pathsep}{REPO_ROOT}", "SF_TEST_DISK_FULL": f"{target}:{from_call}"}
    return run_script(args, env=env)


def one_error_line(proc) -> str:
    lines = [line for line in re.split(r"[\r\n]+", proc.stderr) if line.strip() and "%|" not in line]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: no space left"), proc.stderr[-3000:]
    return lines[0]


def test_training_keeps_the_last_good_checkpoint_when_the_disk_fills(tmp_path):
    logdir = tmp_path / "run"
    proc = run_with_full_disk(tmp_path, "torch.distributed.checkpoint:save", 2, [
        "train.py", "--config_path", TINY_DMD, "--logdir", str(logdir), "--disable-wandb", "train.max_steps=4",
        "train.save_iters=2", "train.log_iters=2"])
    line = one_error_line(proc)
    assert "step_000004.tmp" in line and "free there" in line
    checkpoints = logdir / "checkpoints"
    assert (checkpoints / "latest.txt").read_text().strip() == "step_000002"
    assert (checkpoints / "step_000002" / "checkpoint.json").is_file()
    assert not list(logdir.rglob("*.tmp")) and not (logdir / "run.lock").exists()


def test_inference_leaves_no_half_video_when_the_disk_fills(tmp_path):
    from safetensors.torch import save_file

    from pipeline.components import build_dit
    from utils.config import load_config
    from utils.geometry import resolve_recipe

    weights = tmp_path / "generator.safetensors"  # a random student in the trainer's export format
    generator = build_dit(resolve_recipe(load_config(TINY_DMD)).generator, causal=True, attention_backend="sdpa")
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(weights))
    out = tmp_path / "videos"
    proc = run_with_full_disk(tmp_path, "utils.video_io:write_mp4", 1, [
        "inference.py", "--config_path", TINY_DMD, "--checkpoint", str(weights), "--prompt", "a red circle",
        "--output_folder", str(out)])
    assert str(out) in one_error_line(proc)
    assert list(out.iterdir()) == []  # the staging folder went with the failure


def test_packing_pairs_leaves_no_half_database_when_the_disk_fills(tmp_path, capsys, monkeypatch):
    import errno

    import utils.lmdb_store as store
    from tests.test_lmdb import create, tiny_geometry, write_pairs

    write_pairs(tmp_path / "pairs", {0: "a cat", 1: "a dog", 2: "a cow"}, tiny_geometry())
    original, calls = store.row_checksum, []

    def full(*args):
        calls.append(args)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args)

    monkeypatch.setattr(store, "row_checksum", full)
    result = create(tmp_path / "pairs", tmp_path / "pairs.lmdb", capsys)
    assert str(tmp_path / "pairs.lmdb") in one_error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]  # no database, no .tmp, no lock file
