"""The verification checklist: `python scripts/verify.py <check> --config_path <recipe> [--ckpt_dir DIR] [--json]`.

Checks: plan (every input the recipe needs is on disk, or the command that makes it), geometry (derived sizes),
model (parameter counts on the meta device), vae, text, train (one generator and one critic step), all (the whole
checklist, PASS/FAIL/SKIP per item).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from utils.config import load_config, parse_cli
from utils.errors import OneLineArgumentParser, UserError, run_main
from utils.geometry import derive_geometry
from utils.tables import format_table, human_bytes


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


def meta_parameter_count(spec, attention_backend: str, causal: bool) -> int:
    """Parameters of a role's DiT built on the meta device (no memory, no weights); MoE counts both experts."""
    from dataclasses import replace

    from pipeline.components import build_dit

    arch_only = replace(spec, checkpoint=None, moe_boundary=None)
    model = build_dit(arch_only, causal=causal, attention_backend=attention_backend, device="meta")
    experts = 2 if spec.is_moe else 1
    return experts * sum(p.numel() for p in model.parameters())


def check_model(args, config) -> int:
    from utils.geometry import resolve_recipe

    resolved = resolve_recipe(config, need_scores=True, check_weights=False)
    counts = {
        "generator_params": meta_parameter_count(resolved.generator, config.attention_backend, causal=True),
        "real_score_params": meta_parameter_count(resolved.real_score, config.attention_backend, causal=False),
        "critic_params": meta_parameter_count(resolved.critic, config.attention_backend, causal=False),
    }
    data = {
        "generator": resolved.generator.name, "real_score": resolved.real_score.name, "critic": resolved.critic.name,
        "real_score_experts": 2 if resolved.real_score.is_moe else 1,
        **counts,
        "bf16_weights_bytes": {k.replace("_params", ""): 2 * v for k, v in counts.items()},
        "bf16_weights_total_bytes": 2 * sum(counts.values()),
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [(role, data[role], f"{counts[role + '_params']:,}", human_bytes(2 * counts[role + "_params"]))
            for role in ("generator", "real_score", "critic")]
    rows.append(("total", "", f"{sum(counts.values()):,}", human_bytes(data["bf16_weights_total_bytes"])))
    print(format_table(rows, header=("role", "model", "parameters", "bf16 weights")))
    return 0


RESULT_WORDS = {True: "PASS", False: "FAIL", None: "SKIP"}  # SKIP: the item could not run here (detail says why)


def print_checklist(items, as_json: bool) -> int:
    """PASS/FAIL/SKIP per item; exit status 1 when any item fails (a SKIP is not a pass, nor a failure)."""
    if as_json:
        print(json.dumps([{"check": n, "result": RESULT_WORDS[ok], "detail": d} for n, ok, d in items], indent=2))
    else:
        print(format_table([(RESULT_WORDS[ok], n, d) for n, ok, d in items], header=("result", "check", "detail")))
    return 0 if all(ok is not False for _, ok, _ in items) else 1


def checklist(module: str, function: str):
    """A check implemented as `function(config, ckpt_dir) -> [(name, passed, detail)]` in toolbox.verification.<module>."""

    def run(args, config) -> int:
        check = getattr(importlib.import_module(f"toolbox.verification.{module}"), function)
        return print_checklist([tuple(item) for item in check(config, args.ckpt_dir)], args.json)

    return run


def check_plan(args, config) -> int:
    from toolbox.verification.plan import check_plan as plan

    return print_checklist(plan(config, args.config_path), args.json)


CHECKS = {
    "plan": check_plan,
    "geometry": check_geometry,
    "model": check_model,
    "vae": checklist("vae_text", "check_vae"),
    "text": checklist("vae_text", "check_text"),
    "train": checklist("train", "check_train"),
    "all": checklist("checklist", "check_all"),
}


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=sorted(CHECKS), help="what to verify")
    parser.add_argument("--config_path", required=True, help="a recipe under configs/")
    parser.add_argument("--ckpt_dir", default=None, help="folder with real weights (optional)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    known, overrides = parse_cli(parser, argv)
    if known.ckpt_dir is not None and not os.path.exists(known.ckpt_dir):
        raise UserError(f"--ckpt_dir {known.ckpt_dir} does not exist: expected a checkpoint folder or weights file")
    config = load_config(known.config_path, overrides)
    return CHECKS[known.check](known, config)


if __name__ == "__main__":
    sys.exit(main())
