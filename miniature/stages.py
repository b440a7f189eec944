"""The quickstart's stages: run each entry point once, and again only when what it reads has changed.

A finished stage leaves `<stage>.done` holding its inputs: the command line (with the output folder and the
repository written as <out> and <repo>, so a stage folder copied into another run still matches), the settings of
every recipe the command names, with its `base:` recipes (as parsed: an edited comment changes nothing), and the
content of every prompt list (.txt) it names (another evaluation set makes the clips again). A stage runs again
when those differ, or when an earlier stage ran in this invocation (it reads what that one made); before it runs,
what it wrote is removed, so a training stage starts over instead of resuming from checkpoints made under other
options. The marker also names what the stage wrote (`outputs`, as <out>/...), so another run can take a finished
stage over by copying those paths and the marker (scripts/compare_inits.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import yaml

from utils.io import atomic_write_json


class Stages:
    def __init__(self, out: Path, repo_root: Path, fresh: bool = False):
        self.out, self.repo_root = out, repo_root
        self.rerun_rest = fresh  # set once a stage runs: every later stage runs too
        # seconds of each stage of this invocation, a reused one's as its marker recorded it
        self.timings: dict[str, dict] = {}

    def inputs(self, command: Sequence[str]) -> dict:
        """What a stage reads: its portable command line, the recipes it names (settings, bases included) and the
        prompt lists it names (their content's hash)."""
        from utils.config import recipe_files

        portable = [self._portable(arg) for arg in command]
        recipes, texts = {}, {}
        for arg in command:
            path = self.repo_root / arg if not os.path.isabs(arg) else Path(arg)
            if arg.endswith((".yaml", ".yml")) and path.is_file():
                for recipe in recipe_files(path):
                    recipes[self._portable(str(recipe))] = yaml.safe_load(recipe.read_text())
            elif arg.endswith(".txt") and path.is_file():  # a prompt or caption list
                texts[self._portable(arg)] = hashlib.sha256(path.read_bytes()).hexdigest()
        return {"command": portable, "recipes": recipes, "texts": texts}

    def _portable(self, arg: str) -> str:
        return arg.replace(str(self.out), "<out>").replace(str(self.repo_root), "<repo>")

    def stale_reason(self, name: str, inputs: dict) -> str | None:
        """Why a finished stage must run again (None: reuse it)."""
        marker = self.out / f"{name}.done"
        if not marker.exists():
            return "not run yet"
        if self.rerun_rest:
            return "an earlier stage ran again"
        recorded = json.loads(marker.read_text()).get("inputs")
        if recorded is None:
            return "its marker does not record what it read (made by an older quickstart)"
        if recorded["command"] != inputs["command"]:
            return "its command line changed"
        for key, what in (("recipes", "its recipe changed"), ("texts", "a prompt list it reads changed")):
            before, now = recorded.get(key) or {}, inputs[key]
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            if changed:
                return f"{what} ({', '.join(Path(k).name for k in changed)})"
        return None

    def run(self, name: str, command: list[str], outputs: Sequence[Path] = (), processes: int = 1) -> bool:
        """Run `python <command>` unless finished with the same inputs; returns whether it ran.

        outputs: what the stage writes, removed before it runs again. A failure stops the chain with its status.
        processes: above 1, the command runs under torchrun with that many ranks of one thread each (for a command
        whose result does not depend on the rank count, so it is not one of the stage's inputs).
        """
        inputs = self.inputs(command)
        reason = self.stale_reason(name, inputs)
        marker = self.out / f"{name}.done"
        if reason is None:
            print(f"[quickstart] {name}: done earlier with the same inputs, reused ({marker})", flush=True)
            self.timings[name] = {"seconds": json.loads(marker.read_text()).get("seconds"), "reused": True}
            return False
        if marker.exists():
            print(f"[quickstart] {name}: running it again: {reason}", flush=True)
            marker.unlink()
        for path in outputs:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        self.rerun_rest = True
        print(f"[quickstart] {name}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(self.repo_root)}
        launcher = [sys.executable]
        if processes > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
            env["OMP_NUM_THREADS"] = "1"
        status = subprocess.call([*launcher, *command], cwd=self.repo_root, env=env)
        if status != 0:
            raise SystemExit(f"[quickstart] {name} failed with exit status {status}")
        seconds = time.perf_counter() - start
        atomic_write_json(marker, {"seconds": seconds, "command": command, "inputs": inputs,
                                   "outputs": [self._portable(str(path)) for path in outputs]})
        self.timings[name] = {"seconds": seconds, "reused": False}
        return True
