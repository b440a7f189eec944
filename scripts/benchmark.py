"""Speed and memory, one entry: `python scripts/benchmark.py <what> [options]` (each `<what> --help` says more).

    dit            one DiT forward (and backward) at a recipe's or a preset's geometry: seconds, peak memory
    inference      causal (and bidirectional) video generation with random weights: FPS, time to the first block,
                   decode share, peak memory; variants of attention backend, compilation, decoder, overlap
    train          one generator and one critic step of a DMD/SiD recipe with random weights (torchrun for FSDP)
    serve          the streaming server under load on loopback: time to the first frame, frames per second
    profile        a matrix of configurations (configs/profile/), each in its own process: memory and time table
    memory_events  a memory_events.json (inference --profile_memory) as a table
    gpu            the whole GPU check (what scripts/gpu_check.sh runs): the figures docs/BENCHMARKS.md records

Memory before a run: scripts/estimate_memory.py. Correctness: scripts/verify.py.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"dit": "dit", "inference": "inference", "train": "train", "serve": "serve", "profile": "profile",
            "memory_events": "memory_events", "gpu": "gpu_check"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    what, rest = argv[0], argv[1:]
    if what not in COMMANDS:
        print(f"error: unknown benchmark '{what}': expected one of {', '.join(COMMANDS)} (see --help)", file=sys.stderr)
        return 2
    sys.argv = [f"{sys.argv[0]} {what}", *rest]  # each tool's --help and errors name the command as typed
    module = importlib.import_module(f"toolbox.benchmarks.{COMMANDS[what]}")
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
