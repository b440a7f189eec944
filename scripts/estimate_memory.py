"""Will a recipe fit? One rank's memory for a launch, estimated on this CPU from the real training step.

    python scripts/estimate_memory.py --config_path configs/self_forcing_dmd_5B.yaml --nnodes 1 --nproc_per_node 8 \
        [--gpu_memory_gb 79.6] [--json_out estimate.json] [key=value ...]

Builds the recipe's models at full size on fake tensors (no weights read, nothing allocated) with a fake process
group of nnodes x nproc_per_node ranks, runs one generator step and one critic step under PyTorch's memory
tracker and prints a per-rank table. When the peak does not fit --gpu_memory_gb, it tries the smallest changes
in turn (teacher / text encoder on the CPU, activation checkpointing, sp_size, LoRA) and names the first that fits.

    torchrun --nproc_per_node N scripts/estimate_memory.py --config_path ... --measure

measures the same step with real tensors (random weights) on the launched ranks instead: rank 0's table;
--compare (one process) prints the estimate for one rank beside the step measured on this machine's device.
"""
from __future__ import annotations

import math
import time

from utils.errors import OneLineArgumentParser, UserError, run_main

RESERVE_FRACTION = 0.05  # allocator fragmentation and CUDA context: a peak above 95% of the card does not fit


def _table(report, gpu_memory_gb: float) -> str:
    from utils.tables import format_table, human_bytes

    rows = [(name, human_bytes(nbytes), note) for name, nbytes, note in report.rows]
    phases = ", ".join(f"{name} {human_bytes(value)}" for name, value in report.phase_peaks.items())
    rows.append(("peak per rank", human_bytes(report.peak_bytes), f"step peak {human_bytes(report.step_peak_bytes)} "
                 f"({phases}) + weights beside it"))
    verdict = "fits" if report.fits(gpu_memory_gb, RESERVE_FRACTION) else "does NOT fit"
    rows.append((f"{gpu_memory_gb:g} GiB card", human_bytes(gpu_memory_gb * 1024**3),
                 f"{verdict} (keeping {RESERVE_FRACTION:.0%} for the allocator and CUDA context)"))
    return format_table(rows, header=("per rank", "memory", "note"))


def candidates(config, nproc_per_node: int) -> list[tuple[str, list[str]]]:
    """Changes to try when the recipe does not fit, least intrusive first (each keeps the published method)."""
    from model.registry import objective_class
    from utils.geometry import resolve_recipe

    found = []
    if config.text_encoder.device != "cpu":
        found.append(("text encoder on the CPU", ["text_encoder.device=cpu"]))
    if objective_class(config).uses_teacher and not config.train.real_score_cpu:
        found.append(("frozen teacher on the CPU between uses", ["train.real_score_cpu=true"]))
    if not config.train.gradient_checkpointing:
        found.append(("activation checkpointing", ["train.gradient_checkpointing=true"]))
    geometry = resolve_recipe(config, check_weights=False).geometry
    for sp in (2, 4, 8):
        if sp > config.parallel.sp_size and nproc_per_node % sp == 0 and geometry.num_heads % sp == 0 \
                and geometry.frame_seq_length % sp == 0:  # fmt: skip
            found.append((f"sequence parallelism over {sp} ranks", [f"parallel.sp_size={sp}"]))
    if not config.train.lora_rank:
        found.append(("LoRA rank 64 instead of full fine-tuning (not the published recipe)", ["train.lora_rank=64"]))
    return found


def compare(config, args, overrides) -> int:
    """Estimated vs measured step peak for one rank (the GPU check's memory item)."""
    import torch

    from trainer.memory_estimate import estimate, measure_step
    from utils.dist import DistInfo
    from utils.tables import human_bytes

    started = time.perf_counter()
    estimated = estimate(config, 1, 1)
    estimate_s = time.perf_counter() - started
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    measured = measure_step(config, DistInfo(0, 1, 0, 1, device), fake=False)
    result = {"config_path": args.config_path, "overrides": overrides, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "estimated_step_peak_bytes": estimated.step_peak_bytes, "measured_step_peak_bytes": measured.step_peak_bytes,
              "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
              "estimate_seconds": estimate_s, "ratio": estimated.step_peak_bytes / measured.step_peak_bytes}
    print(f"step peak: estimated {human_bytes(estimated.step_peak_bytes)}, measured {human_bytes(measured.step_peak_bytes)} "
          f"on {result['device_name']} (ratio {result['ratio']:.3f}; estimate took {estimate_s:.0f} s)")
    if args.json_out:
        from utils.io import atomic_write_json

        atomic_write_json(args.json_out, result)
    return 0


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="estimate_memory.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", required=True, help="the training recipe (YAML)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes of the launch")
    parser.add_argument("--nproc_per_node", type=int, default=8, help="ranks (GPUs) per node")
    parser.add_argument("--gpu_memory_gb", type=float, default=79.6,
                        help="memory of one GPU in GiB (an '80 GB' A100/H100 has about 79.6 GiB)")
    parser.add_argument("--json_out", default=None, help="also write the table(s) as JSON")
    parser.add_argument("--no_suggest", action="store_true", help="do not look for a change that fits")
    parser.add_argument("--measure", action="store_true",
                        help="under torchrun: run the step with real tensors on the launched ranks and report rank 0")
    parser.add_argument("--compare", action="store_true",
                        help="one process: estimate for 1 rank, then measure the same step on this machine's device")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise UserError(f"unexpected argument {bad[0]!r}: expected key=value overrides (see estimate_memory.py --help)")
    if not math.isfinite(args.gpu_memory_gb) or args.gpu_memory_gb <= 0:  # nan passes a plain <= 0 test
        raise UserError(f"--gpu_memory_gb {args.gpu_memory_gb}: expected a positive size in GB")

    from trainer.memory_estimate import GIB, estimate, measure_step
    from utils.config import load_config

    config = load_config(args.config_path, overrides)
    started = time.perf_counter()
    if args.compare:
        return compare(config, args, overrides)
    if args.measure:
        from utils.dist import cleanup, init_distributed

        info = init_distributed()
        report = measure_step(config, info, fake=False)
        cleanup()
        if info.rank != 0:
            return 0
        launch = f"measured on {info.world_size} rank(s), {info.device.type}"
    else:
        report = estimate(config, args.nnodes, args.nproc_per_node)
        launch = f"estimated for {args.nnodes} x {args.nproc_per_node} ranks"
    seconds = time.perf_counter() - started
    print(f"{args.config_path}: {launch}, sp_size {config.parallel.sp_size} ({seconds:.0f} s)")
    print(_table(report, args.gpu_memory_gb))
    result = {"config_path": args.config_path, "launch": launch, "overrides": overrides,
              "gpu_memory_gb": args.gpu_memory_gb, "peak_bytes": report.peak_bytes,
              "step_peak_bytes": report.step_peak_bytes, "phase_peaks": report.phase_peaks,
              "rows": [{"name": n, "bytes": b, "note": note} for n, b, note in report.rows],
              "fits": report.fits(args.gpu_memory_gb, RESERVE_FRACTION), "seconds": seconds}

    # Not fitting: changes in order of intrusiveness, each kept only when it lowers the peak, until one fits.
    if not args.measure and not result["fits"] and not args.no_suggest:
        tried, applied, best = [], [], report.peak_bytes
        for label, change in candidates(config, args.nproc_per_node):
            trial = estimate(load_config(args.config_path, overrides + applied + change), args.nnodes, args.nproc_per_node)
            fits = trial.fits(args.gpu_memory_gb, RESERVE_FRACTION)
            tried.append({"change": " ".join(applied + change), "peak_bytes": trial.peak_bytes, "fits": fits})
            verdict = "fits" if fits else ("kept" if trial.peak_bytes < best else "dropped: no lower")
            print(f"  + {label:<60s} -> peak {trial.peak_bytes / GIB:7.2f} GiB {verdict}")
            if trial.peak_bytes < best:  # a later value of the same key (sp_size 2 -> 4) replaces the earlier one
                keys = {item.split("=", 1)[0] for item in change}
                applied, best = [a for a in applied if a.split("=", 1)[0] not in keys] + change, trial.peak_bytes
            if fits:
                print(f"suggestion: add {' '.join(applied)}")
                print(_table(trial, args.gpu_memory_gb))
                break
        else:
            print("suggestion: none of the changes fits; use more ranks (nodes) or GPUs with more memory")
        result["suggestions"] = tried
    if args.json_out:
        from utils.io import atomic_write_json

        atomic_write_json(args.json_out, result)
    return 0


if __name__ == "__main__":
    main()
