"""The three inits side by side in the miniature: Self-Forcing, Causal Forcing and LongLive 2.0, over DMD seeds.

    python scripts/compare_inits.py [--world bounded|wrap] [--seeds 0 1 2]
        [--chains self_forcing causal_forcing longlive] [--out outputs/inits_<world>] [--eval_clips 48]
        [--pairs_per_caption N] [--short]

Runs `scripts/quickstart.py --chain <chain> --seed <seed>` into <out>/<chain>_s<seed> for every seed and chain (seeds
outer, so the first seed of every chain is done first), each run starting with the finished stages it shares with
the runs before it (the bidirectional ODE pairs, the causal teacher and its pairs, a chain's ODE init) copied in, so
only what differs is trained again; the quickstart's stage markers decide what is reused. A run with a report.json is
read, not run again (--fresh: every run anew). Writes inits.json, inits.md and inits.png (seams against adherence)
in <out>: one line per run and one per chain, every figure over the teacher's, and the chain that meets the
recommended chain's goal in the most seeds.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from miniature.inits import CHAIN_STAGES, CHAINS, chain_summary, init_picture, recommended, run_row, table_lines
from utils.errors import OneLineArgumentParser, UserError, run_main
from utils.io import atomic_write_json, atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]


def _marker(folder: Path, stage: str) -> dict:
    """A finished stage's marker in a run folder ({} when the stage has not finished there)."""
    path = folder / f"{stage}.done"
    return json.loads(path.read_text()) if path.is_file() else {}


def seed_run(run: Path, chain: str, finished: list[tuple[str, Path]]) -> list[str]:
    """Copy into a new run folder the stages of its chain that finished runs made (ode_init only from a run of the
    same chain: the chains' ODE stages differ); returns the stages copied."""
    copied = []
    for stage in CHAIN_STAGES[chain]:
        donors = [folder for donor_chain, folder in finished if stage != "ode_init" or donor_chain == chain]
        # a donor whose marker names what the stage wrote (an older quickstart's does not: the stage runs again)
        donor = next((folder for folder in donors if "outputs" in _marker(folder, stage)), None)
        if donor is None or (run / f"{stage}.done").exists():
            continue
        for portable in _marker(donor, stage)["outputs"]:
            name = portable.removeprefix("<out>/")
            source, target = donor / name, run / name
            if source.is_dir():
                shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
            elif source.exists():
                shutil.copy2(source, target)
        shutil.copy2(donor / f"{stage}.done", run / f"{stage}.done")  # last: a marker only beside its copied outputs
        copied.append(stage)
    return copied


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=("bounded", "wrap"), default="bounded", help="the miniature world")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="DMD seeds (train.seed of the DMD stage)")
    parser.add_argument("--chains", nargs="+", choices=CHAINS, default=list(CHAINS), help="the inits compared")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: outputs/inits_<world>)")
    parser.add_argument("--eval_clips", type=int, default=None, help="evaluation clips per run (the quickstart's default)")
    parser.add_argument("--pairs_per_caption", type=int, default=None,
                        help="ODE pairs per caption in every run (the quickstart's default: the world's)")
    parser.add_argument("--short", action="store_true", help="the quickstart's shortened runs (tests)")
    parser.add_argument("--teacher", type=Path, default=None, help="teacher folder instead of the world's shipped one")
    parser.add_argument("--fresh", action="store_true", help="run every chain and seed anew")
    args = parser.parse_args(argv)
    if args.pairs_per_caption is not None and args.pairs_per_caption < 1:
        raise UserError(f"--pairs_per_caption {args.pairs_per_caption}: expected at least 1")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise UserError(f"--seeds {' '.join(map(str, args.seeds))}: expected distinct seeds of 0 or more")
    out = (args.out or REPO_ROOT / f"outputs/inits_{args.world}").resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    finished: list[tuple[str, Path]] = []
    reports: dict[str, dict[int, dict]] = {chain: {} for chain in args.chains}
    for seed in args.seeds:
        for chain in args.chains:
            run = out / f"{chain}_s{seed}"
            if not (run / "report.json").is_file():
                run.mkdir(parents=True, exist_ok=True)
                copied = seed_run(run, chain, finished)
                print(f"[compare_inits] {chain}, DMD seed {seed}: {run}"
                      + (f" (copied from earlier runs: {', '.join(copied)})" if copied else ""), flush=True)
                command = [sys.executable, str(REPO_ROOT / "scripts" / "quickstart.py"), "--world", args.world,
                           "--chain", chain, "--seed", str(seed), "--out", str(run)]
                command += [*(["--short"] if args.short else []), *(["--teacher", str(args.teacher)] if args.teacher else []),
                            *(["--eval_clips", str(args.eval_clips)] if args.eval_clips is not None else []),
                            *(["--pairs_per_caption", str(args.pairs_per_caption)] if args.pairs_per_caption else [])]
                status = subprocess.call(command, cwd=REPO_ROOT)
                if status != 0:
                    raise SystemExit(f"[compare_inits] the quickstart of {run} failed with exit status {status}")
            reports[chain][seed] = json.loads((run / "report.json").read_text())
            finished.append((chain, run))

    runs = {chain: {seed: run_row(report) for seed, report in by_seed.items()} for chain, by_seed in reports.items()}
    summaries = {chain: chain_summary(rows) for chain, rows in runs.items()}
    teacher = next(iter(reports[args.chains[0]].values()))["teacher"]
    winner = recommended(summaries)
    atomic_write_json(out / "inits.json", {"world": args.world, "seeds": args.seeds, "teacher": teacher, "runs": runs,
                                           "chains": summaries, "recommended": winner})
    lines = table_lines(args.world, teacher, runs, summaries)
    atomic_write_text(out / "inits.md", "\n".join(lines) + "\n")
    init_picture(out / "inits.png", runs, args.world)
    print("\n".join(lines), flush=True)
    print(f"[compare_inits] {out / 'inits.md'}, inits.json, inits.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
