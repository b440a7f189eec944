"""Train a causal streaming generator: ODE regression (ode_init) or score distillation (DMD / SiD).

    torchrun [--nnodes N --nproc_per_node G ...] train.py --config_path <recipe> --logdir DIR [--disable-wandb]
             [--profile_memory] [key=value ...]

The recipe's train.trainer picks ODE regression or score distillation, distill.distribution_loss picks dmd
or sid. The same command with the same --logdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.errors import UserError, run_main


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2 through run_main, not argparse's usage block
        raise UserError(f"{message}: usage: train.py --config_path <recipe> --logdir DIR [--disable-wandb] [key=value ...]")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    from utils.config import split_cli

    overrides, rest = split_cli(argv)
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", required=True, help="the recipe (YAML)")
    parser.add_argument("--logdir", required=True, help="checkpoints, exports, metrics; resumed when it has a checkpoint")
    parser.add_argument("--disable-wandb", action="store_true", help="no wandb even when logging.wandb is true")
    parser.add_argument("--profile_memory", action="store_true", help="write <logdir>/memory_events.json")
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        raise UserError(f"unknown argument {unknown[0]}: expected --config_path, --logdir, --disable-wandb, "
                        "--profile_memory or key=value overrides")
    return args, overrides


@run_main
def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from model import build_objective
    from trainer.checkpoint import check_run_folders
    from trainer.loop import RunOptions, Trainer, TrainingDiverged
    from utils.config import load_config
    from utils.dist import cleanup, init_distributed
    from utils.io import check_output_folder

    check_output_folder(args.logdir, "--logdir")
    check_run_folders(args.logdir)
    config = load_config(args.config_path, overrides)
    info = init_distributed()
    options = RunOptions(logdir=Path(args.logdir), use_wandb=config.logging.wandb and not args.disable_wandb,
                         profile_memory=args.profile_memory)
    try:
        Trainer(config, info, options, build_objective).train()
    except TrainingDiverged as err:
        if info.is_main:
            print(f"training stopped: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    cleanup()


if __name__ == "__main__":
    main()
