"""Memory and time of a matrix of configurations, one table: base, activation and peak memory, seconds.

    python scripts/benchmark.py profile configs/profile/tiny_inference.yaml [--json]

The matrix file names a recipe, a workload and a list of configurations; each configuration gives a
dtype and `key=value` overrides of the recipe (attention backend, resolution, frames, text-encoder
device, activation checkpointing, ...). Each configuration runs in its own process, so memory from
one never shows in another. Weights are random (sizes are what matter here). Workloads:
  - inference: load text encoder, VAE and causal generator, generate one video (streaming decode);
  - train_step: build generator (+ real and fake score for DMD/SiD), one generator loss and backward,
    with per-block activation checkpointing when train.gradient_checkpointing is true.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipeline.run_options import DTYPES
from utils.errors import UserError, run_main
from utils.tables import format_table, human_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]

WORKLOADS = ("inference", "train_step")
SEED = 0


def read_matrix(path: str) -> dict:
    """The matrix file, checked: recipe, workload, configurations (name, dtype, overrides)."""
    if not Path(path).is_file():
        raise UserError(f"matrix file {path} not found: expected a YAML like configs/profile/tiny_inference.yaml")
    matrix = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(matrix, dict) or not matrix.get("recipe") or not matrix.get("configurations"):
        raise UserError(f"matrix file {path} needs 'recipe' and a non-empty 'configurations' list")
    if matrix.get("workload", "inference") not in WORKLOADS:
        raise UserError(f"matrix file {path}: workload '{matrix['workload']}' is not one of {', '.join(WORKLOADS)}")
    for index, entry in enumerate(matrix["configurations"]):
        if not isinstance(entry, dict) or "name" not in entry:
            raise UserError(f"matrix file {path}: configuration {index} needs a 'name'")
        if entry.get("dtype", "fp32") not in DTYPES:
            raise UserError(f"matrix file {path}: configuration '{entry['name']}' dtype must be one of {', '.join(DTYPES)}")
    return matrix


# --------------------------------------------------------------------------------------------- one configuration
def run_inference(config, resolved, device, dtype, profiler) -> None:
    from pipeline.causal_inference import CausalInferencePipeline

    pipe = CausalInferencePipeline(config, resolved, device, dtype, profiler=profiler)  # random generator
    pipe.generate("a red circle moving left", seed=SEED)


def run_train_step(config, resolved, device, dtype, profiler) -> None:
    from model.registry import build_objective, random_batch, step_models
    from pipeline.components import build_dit

    g = resolved.geometry
    with profiler.component("generator"):
        generator = build_dit(resolved.generator, causal=True, attention_backend=config.attention_backend,
                              device=device, dtype=dtype)
    with profiler.component("scores"):
        models = step_models(config, resolved, generator, device=device, dtype=dtype)
    if config.train.gradient_checkpointing:
        from trainer.parallel import apply_activation_checkpointing

        for model in (models.generator, models.critic):
            if model is not None:
                apply_activation_checkpointing(model)
    batch = random_batch(config, g, 1, device, dtype, torch.Generator().manual_seed(SEED))
    objective = build_objective(config, g)
    with profiler.phase("generator_step"):
        loss, _ = objective.generator_loss(models, batch)
        loss.backward()


def worker(entry_json: str) -> dict:
    """Run one configuration in this process; returns its figures."""
    from utils.config import load_config
    from utils.geometry import resolve_recipe
    from utils.memory import MemoryProfiler

    entry = json.loads(entry_json)
    config = load_config(entry["recipe"], entry.get("overrides", []))
    resolved = resolve_recipe(config, check_weights=False)
    resolved = dataclasses.replace(resolved, generator=dataclasses.replace(resolved.generator, checkpoint=None))
    device = torch.device(entry.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[entry.get("dtype", "fp32")]
    profiler = MemoryProfiler(enabled=True, device=device)
    start = time.perf_counter()
    run = run_inference if entry["workload"] == "inference" else run_train_step
    with profiler.phase("total"):
        run(config, resolved, device, dtype, profiler)
    seconds = time.perf_counter() - start
    profiler.close()
    summary = profiler.summary()
    return {"name": entry["name"], "backend": profiler.backend, "base_bytes": summary["base_bytes"],
            "activation_bytes": max((e["activation_bytes"] for e in profiler.events
                                     if e["kind"] == "phase" and e["name"] != "total"), default=None),
            "peak_bytes": summary["peak_bytes"], "seconds": seconds}


def run_configuration(matrix: dict, entry: dict, device: str | None) -> dict:
    payload = {"recipe": matrix["recipe"], "workload": matrix.get("workload", "inference"), "device": device, **entry}
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(payload)], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"name": entry["name"], "error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("matrix", nargs="?", help="a matrix YAML (configs/profile/)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one configuration
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return 0
    if not args.matrix:
        parser.error("give a matrix YAML")
    matrix = read_matrix(args.matrix)
    results = [run_configuration(matrix, entry, args.device) for entry in matrix["configurations"]]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"recipe {matrix['recipe']}, workload {matrix.get('workload', 'inference')}")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["name"], "-", "-", "-", "-", "-", f"failed: {r['error']}"))
            continue
        shown = [human_bytes(r[k]) if r[k] is not None else "-" for k in ("base_bytes", "activation_bytes", "peak_bytes")]
        rows.append((r["name"], r["backend"], *shown, f"{r['seconds']:.2f}", ""))
    print(format_table(rows, header=("configuration", "backend", "base", "activation", "peak", "seconds", "note")))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
