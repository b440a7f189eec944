"""Seconds per generator step and per critic step, and peak memory, for a recipe with random weights.

    [torchrun --nproc_per_node G] scripts/benchmark.py train --config_path <recipe> [--steps N] [--warmup W] [key=value ...]

The recipe's models are built at their real size from presets (checkpoints are ignored: random weights), with the
recipe's precision, sharding and checkpointing; prompts are synthetic. The umT5-XXL text encoder (which needs its
weights and tokenizer) is replaced by a fixed random context of its output size: the step's DiT work is unchanged.
Not a test: GPU figures are recorded by hand or by scripts/gpu_check.sh (--json_out).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from utils.errors import UserError, run_main

GIB = float(1 << 30)


def _random_weights(config):
    from utils.config import ModelRef

    def strip(ref: ModelRef) -> ModelRef:
        if ref.checkpoint and not ref.preset:
            raise UserError(f"{ref.checkpoint} has no preset: set a preset so the benchmark can build random weights")
        return replace(ref, checkpoint=None)

    return replace(config, generator=strip(config.generator), real_score=strip(config.real_score),
                   critic=strip(config.critic) if config.critic.preset else config.critic,
                   vae=replace(config.vae, checkpoint=None),  # random VAE (TI2V first frames only)
                   text_encoder=replace(config.text_encoder, checkpoint=None, tokenizer=None))


def _stand_ins(config, device) -> contextlib.ExitStack:
    """Registered stand-ins for the run: a fixed random context for umT5-XXL (it needs its weights and tokenizer),
    and on a GPU random DiTs made there (not initialised on the CPU and copied: at 5B that saves minutes)."""
    import torch

    from pipeline.components import DIT_FAMILY
    from toolbox.benchmarks.support import RandomTextEncoder, random_dit
    from utils.presets import load_model_preset
    from utils.registry import DITS, TEXT_ENCODERS

    arch = load_model_preset(config.generator.preset)
    stack = contextlib.ExitStack()
    stack.enter_context(TEXT_ENCODERS.replaced(
        "umt5", lambda config, preset, device, dtype=None, seed=0: RandomTextEncoder(arch["text_len"], arch["text_dim"], device)))
    if device.type == "cuda":
        def build(spec, *, causal, attention_backend, device="cpu", dtype=torch.float32, seed=0):
            return random_dit(spec, causal=causal, attention_backend=attention_backend, device=run_device, dtype=dtype,
                              seed=seed)

        run_device = device
        stack.enter_context(DITS.replaced(DIT_FAMILY, build))
    return stack


def _timed(step, synchronize) -> float:
    synchronize()
    started = time.perf_counter()
    result = step()
    synchronize()
    if not result.applied:
        raise RuntimeError("a benchmark step produced a non-finite loss or gradient")
    return time.perf_counter() - started


@run_main
def main(argv: list[str] | None = None) -> None:
    from utils.config import load_config, split_cli

    overrides, rest = split_cli(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", required=True)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--json_out", default=None, help="also write the report here")
    args = parser.parse_args(rest)

    import torch

    from model.registry import build_objective, objective_class
    from toolbox.benchmarks.support import device_name
    from trainer.loop import RunOptions, Trainer
    from utils.dist import cleanup, init_distributed
    from utils.memory import lifetime_peak_bytes

    config = _random_weights(load_config(args.config_path, overrides))
    prompts = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    prompts.write("a red circle moving left on a blue background\n" * 64)
    prompts.close()
    if not objective_class(config).has_critic:
        raise UserError(f"{args.config_path} trains with train.trainer={config.train.trainer}: the benchmark times score "
                        "distillation (generator + critic), pick a DMD or SiD recipe")
    config = replace(config, train=replace(config.train, data_path=prompts.name))
    info = init_distributed()
    stand_ins = _stand_ins(config, info.device)  # held until main returns (a collected stack would undo them)
    logdir = tempfile.TemporaryDirectory()  # nothing is saved; the trainer only needs a place
    trainer = Trainer(config, info, RunOptions(logdir=Path(logdir.name)), build_objective)
    synchronize = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    seconds: dict[str, list[float]] = {"generator": [], "critic": []}
    for index in range(args.warmup + args.steps):
        for name in seconds:
            elapsed = _timed(lambda: trainer.train_step(name, step=index), synchronize)
            if index >= args.warmup:
                seconds[name].append(elapsed)
    report = {
        "recipe": args.config_path,
        "device": device_name(info.device),
        "world_size": info.world_size,
        "geometry": list(trainer.setup.geometry.latent_shape),
        "seconds_per_generator_step": statistics.median(seconds["generator"]),
        "seconds_per_critic_step": statistics.median(seconds["critic"]),
        "peak_memory_gb": lifetime_peak_bytes(info.device) / GIB,
        "lora_rank": config.train.lora_rank,
        "gradient_checkpointing": config.train.gradient_checkpointing,
        "command": " ".join(["python", "scripts/benchmark.py", "train", *(sys.argv[1:] if argv is None else argv)]),
    }
    if info.is_main:
        print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
        if args.json_out:
            from utils.io import atomic_write_json

            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(args.json_out), report)
    os.unlink(prompts.name)
    logdir.cleanup()
    cleanup()
    stand_ins.close()


if __name__ == "__main__":
    main()
