"""One GPU, a few minutes, random weights: the speed and memory figures docs/BENCHMARKS.md asks for, in one go.

    bash scripts/gpu_check.sh [--out DIR] [--budget_s 480]
    bash scripts/gpu_check.sh --dry-run          # the same chain at tiny sizes on the CPU (what the tests run)

Items, in order (each in its own process, so one failure or OOM costs only that item):
  1. causal inference, Wan2.1-T2V-1.3B at 480x832, 81 frames, 4 steps, compiled;
  2. causal inference, Wan2.2-TI2V-5B at 704x1280, 81 frames, 4 steps, compiled;
     each: the full VAE decoder and the light (TAEHV) decoder, each decoded in line and beside the denoising
     (inference.overlap_decode): end-to-end FPS, denoise-only FPS, decode FPS, time to the first block, peak;
  3. one DMD iteration (generator step + critic step) for the 1.3B student with a 1.3B teacher, batch 1;
  4. one DMD iteration for the 5B student with LoRA, batch 1;
  5. memory: scripts/estimate_memory.py's estimate of item 3's step peak beside the same step measured on the GPU;
  6. long video, 1.3B, 237 frames (60 latent frames, the KV cache rolling), both decoders beside the denoising;
  7. long video, 5B, 237 frames, the same;
  8. attention backends (sdpa, flash when installed, flex) x compilation off / on, 1.3B, full decoder in line.
Before each item the GPU's free memory is read; an item that cannot fit, or that would start after the time
budget, is skipped and the reason written. Results: DIR/gpu_check.json (everything) and DIR/gpu_check.md (rows
for docs/BENCHMARKS.md), rewritten after every item.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError, run_main
from utils.io import atomic_write_json, atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[2]

ATTENTION_VARIANTS = "sdpa:eager:full:inline,sdpa:compile:full:inline,flash:eager:full:inline,flash:compile:full:inline," \
    "flex:eager:full:inline,flex:compile:full:inline"
DECODER_VARIANTS = "sdpa:compile:full:inline,sdpa:compile:light:overlap,sdpa:compile:light:inline,sdpa:compile:full:overlap"
LONG_VARIANTS = "sdpa:compile:light:overlap,sdpa:compile:full:overlap"
LONG_FRAMES = "237"  # 60 latent frames: 20 blocks of 3, the cache rolling past the training length's 21
NO_ACCUMULATION = "train.total_batch_size=null"


@dataclass(frozen=True)
class Item:
    name: str
    kind: str  # inference, train or memory
    recipe: str
    need_gib: float  # rough peak: weights, optimizer states and activations at this size
    budget_s: float  # the item's own time limit
    overrides: tuple[str, ...] = ()
    args: tuple[str, ...] = field(default=())


GPU_ITEMS = (
    Item("Wan2.1-T2V-1.3B 480x832 inference", "inference", "configs/self_forcing_dmd.yaml", 20, 180,
         args=("--variants", DECODER_VARIANTS, "--repeats", "2")),
    Item("Wan2.2-TI2V-5B 704x1280 inference", "inference", "configs/self_forcing_dmd_5B.yaml", 45, 220,
         args=("--variants", DECODER_VARIANTS, "--repeats", "2")),
    Item("DMD 1.3B student + 1.3B teacher", "train", "configs/self_forcing_dmd.yaml", 90, 120,
         overrides=("real_score.preset=wan2.1-t2v-1.3b", "critic.preset=wan2.1-t2v-1.3b", NO_ACCUMULATION),
         args=("--steps", "1", "--warmup", "1")),
    Item("DMD 5B student, LoRA rank 64", "train", "configs/self_forcing_dmd_5B.yaml", 110, 150,
         overrides=("train.lora_rank=64", NO_ACCUMULATION), args=("--steps", "1", "--warmup", "1")),
    Item("memory estimate vs measured, DMD 1.3B + 1.3B teacher", "memory", "configs/self_forcing_dmd.yaml", 90, 420,
         overrides=("real_score.preset=wan2.1-t2v-1.3b", "critic.preset=wan2.1-t2v-1.3b", NO_ACCUMULATION)),
    Item("Wan2.1-T2V-1.3B 480x832 long video", "inference", "configs/self_forcing_dmd.yaml", 20, 120,
         args=("--variants", LONG_VARIANTS, "--repeats", "1", "--num_output_frames", LONG_FRAMES)),
    Item("Wan2.2-TI2V-5B 704x1280 long video", "inference", "configs/self_forcing_dmd_5B.yaml", 45, 170,
         args=("--variants", LONG_VARIANTS, "--repeats", "1", "--num_output_frames", LONG_FRAMES)),
    Item("Wan2.1-T2V-1.3B 480x832 attention backends", "inference", "configs/self_forcing_dmd.yaml", 20, 150,
         args=("--variants", ATTENTION_VARIANTS, "--repeats", "2")),
)
TINY = "configs/tiny/self_forcing_dmd.yaml"
DRY_RUN_ITEMS = (
    Item("tiny inference", "inference", TINY, 0, 120,
         args=("--variants", "sdpa:eager:full:inline,sdpa:eager:light:overlap,flash:eager,flex:eager", "--repeats", "1")),
    Item("tiny DMD, umT5 stand-in", "train", TINY, 0, 120, overrides=("text_encoder.preset=umt5-xxl",),
         args=("--steps", "1", "--warmup", "0")),
    Item("tiny DMD, LoRA rank 4", "train", TINY, 0, 120, overrides=("train.lora_rank=4",),
         args=("--steps", "1", "--warmup", "0")),
    Item("tiny memory estimate vs measured", "memory", TINY, 0, 120),
    Item("tiny long video", "inference", TINY, 0, 120,
         args=("--variants", "sdpa:eager:light:overlap", "--repeats", "1", "--num_output_frames", "69")),
)


def free_gib(python: str) -> float | None:
    """The GPU's free memory, read in a child process (the driver process itself never touches CUDA)."""
    probe = "import torch; print(torch.cuda.mem_get_info()[0] / 2**30 if torch.cuda.is_available() else -1)"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    value = float(out.stdout.strip() or -1)
    return None if value < 0 else value


def command(item: Item, python: str, json_out: Path, dry_run: bool) -> list[str]:
    script = {"inference": ["scripts/benchmark.py", "inference"], "train": ["scripts/benchmark.py", "train"],
              "memory": ["scripts/estimate_memory.py"]}[item.kind]
    cmd = [python, *script, "--config_path", item.recipe, *item.args, "--json_out", str(json_out)]
    if item.kind == "memory":
        cmd.append("--compare")
    if item.kind == "inference":
        cmd += ["--skip_bidirectional", "--deadline_s", str(item.budget_s * 0.55)]
        if dry_run:
            cmd += ["--device", "cpu", "--dtype", "fp32"]
    return cmd + list(item.overrides)


def run_item(item: Item, python: str, out: Path, index: int, dry_run: bool, time_left: float) -> dict:
    json_out = out / f"item{index}_{item.kind}.json"
    log = out / f"item{index}.log"
    cmd = command(item, python, json_out, dry_run)
    entry: dict = {"item": item.name, "kind": item.kind, "command": " ".join(cmd[1:])}
    limit = min(item.budget_s, time_left)
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as handle:
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=limit, env=env)
            entry["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            entry["returncode"] = None
            entry["note"] = f"stopped at its {limit:.0f} s limit; rows finished before that are kept"
    entry["seconds"] = round(time.monotonic() - started, 1)
    if json_out.is_file():
        entry["report"] = json.loads(json_out.read_text())
    elif entry.get("returncode") not in (0, None):
        entry["note"] = "failed: " + " | ".join(log.read_text().strip().splitlines()[-3:])
    return entry


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(entries: list[dict], device: str) -> str:
    """Rows for docs/BENCHMARKS.md: inference per variant, training per item, then what was skipped and why."""
    lines = [f"Device: {device}. Random weights; the text encoder is a fixed random context.", "",
             "| model | size, frames | attention | compiled | decoder | overlap | e2e FPS | denoise FPS | decode FPS | "
             "first block s | peak GiB | warm-up s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    skipped = []
    for entry in entries:
        report = entry.get("report")
        if entry["kind"] != "inference" or report is None:
            continue
        for r in report["results"]:
            lines.append(f"| {report['model']} | {report['size']}, {r['frames']} | {r['attention_backend']} | "
                         f"{'yes' if r['compiled'] else 'no'} | {r['decoder']} | {'yes' if r['overlap_decode'] else 'no'} | "
                         f"{r['fps']:.1f} | {r['denoise_fps']:.1f} | {r['decode_fps']:.1f} | "
                         f"{r['first_block_latency_s']:.3f} | {_fmt(r['peak_gib'], '.1f')} | {r['warmup_s']:.1f} |")
        skipped += [f"{entry['item']}, {s['variant']}: {s['reason']}" for s in report.get("skipped", [])]
    lines += ["", "| DMD iteration | LoRA | s / generator step | s / critic step | peak GiB |", "|---|---|---|---|---|"]
    for entry in entries:
        report = entry.get("report")
        if entry["kind"] == "train" and report is not None:
            lines.append(f"| {entry['item']} | {report['lora_rank'] or 'no'} | {report['seconds_per_generator_step']:.2f} | "
                         f"{report['seconds_per_critic_step']:.2f} | {report['peak_memory_gb']:.1f} |")
    memory = [e for e in entries if e["kind"] == "memory" and e.get("report") is not None]
    if memory:
        lines += ["", "| memory, one rank | estimated step peak GiB | measured (tracker) GiB | CUDA max allocated GiB | "
                  "estimate / measured |", "|---|---|---|---|---|"]
    for entry in memory:
        r = entry["report"]
        cuda = r["cuda_max_allocated_bytes"]
        lines.append(f"| {entry['item']} | {r['estimated_step_peak_bytes'] / 2**30:.2f} | "
                     f"{r['measured_step_peak_bytes'] / 2**30:.2f} | {_fmt(cuda and cuda / 2**30, '.2f')} | {r['ratio']:.3f} |")
    skipped += [f"{e['item']}: {e['note']}" for e in entries if "note" in e]
    if skipped:
        lines += ["", "Skipped or cut short:"] + [f"- {line}" for line in skipped]
    return "\n".join(lines) + "\n"


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "outputs/gpu_check", help="where the results go")
    parser.add_argument("--budget_s", type=float, default=480, help="start no item after this many seconds")
    parser.add_argument("--dry-run", dest="dry_run", action="store_true", help="tiny recipes on the CPU")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the benchmarks")
    parser.add_argument("--items", default=None, help="comma list of item numbers to run (default: all), e.g. 3,4")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        raise UserError(f"--budget_s {args.budget_s}: expected a positive number of seconds")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: expected a folder for the results")
    out.mkdir(parents=True, exist_ok=True)

    items = DRY_RUN_ITEMS if args.dry_run else GPU_ITEMS
    if args.items:
        try:
            chosen = [int(number) for number in args.items.split(",")]
        except ValueError:
            chosen = [0]
        if not all(1 <= number <= len(items) for number in chosen):
            raise UserError(f"--items {args.items!r}: expected a comma list of numbers 1..{len(items)}")
        items = tuple(items[number - 1] for number in chosen)
    free = None if args.dry_run else free_gib(args.python)
    if not args.dry_run and free is None:
        raise UserError("no CUDA GPU is visible: run on a GPU machine, or pass --dry-run for the tiny CPU chain")
    start_note = "dry run, tiny recipes" if args.dry_run else f"{free:.0f} GiB free at start"
    device = start_note
    deadline = time.monotonic() + args.budget_s
    entries: list[dict] = []
    for index, item in enumerate(items):
        left = deadline - time.monotonic()
        free = None if args.dry_run else free_gib(args.python)
        if left <= 10:
            entries.append({"item": item.name, "kind": item.kind, "note": f"skipped: the {args.budget_s:.0f} s budget is spent"})
        elif free is not None and free < item.need_gib:
            entries.append({"item": item.name, "kind": item.kind,
                            "note": f"skipped: needs about {item.need_gib:.0f} GiB, {free:.0f} GiB free"})
        else:
            print(f"[{index + 1}/{len(items)}] {item.name} (limit {min(item.budget_s, left):.0f} s)", flush=True)
            entries.append(run_item(item, args.python, out, index + 1, args.dry_run, left))
        named = [e["report"]["device"] for e in entries if "device" in e.get("report", {})]
        if named:
            device = named[0] if args.dry_run else f"{named[0]} ({start_note})"
        atomic_write_json(out / "gpu_check.json", {"device": device, "dry_run": args.dry_run, "items": entries})
        atomic_write_text(out / "gpu_check.md", markdown(entries, device))
    print(markdown(entries, device))
    failed = [e["item"] for e in entries if e.get("returncode") not in (0, None) and "returncode" in e]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
