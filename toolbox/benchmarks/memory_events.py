"""Print a memory_events.json (from --profile_memory) as a table: component loads, phase activations, the peak.

    python scripts/benchmark.py memory_events outputs/<video>/memory_events.json [--top N] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys

from utils.errors import run_main
from utils.memory import load_events
from utils.tables import format_table, human_bytes


def event_rows(events: list[dict]) -> list[tuple]:
    """One row per event: kind, name, memory before, after (components) or peak (phases), the increment, seconds."""
    rows = []
    for event in events:
        if event["kind"] == "component":
            rows.append(("component", event["name"], human_bytes(event["before_bytes"]), human_bytes(event["after_bytes"]),
                         human_bytes(event["incremental_bytes"]), f"{event['seconds']:.3f}"))
        else:
            indent = "  " * event.get("depth", 0)
            rows.append(("phase", indent + event["name"], human_bytes(event["before_bytes"]), human_bytes(event["peak_bytes"]),
                         human_bytes(event["activation_bytes"]), f"{event['seconds']:.3f}"))
    return rows


def summary_rows(summary: dict) -> list[tuple]:
    labels = {"base_bytes": "base (after loading)", "components_bytes": "components loaded",
              "max_activation_bytes": "largest activation", "peak_bytes": "total peak"}
    return [(label, "-" if summary.get(key) is None else human_bytes(summary[key])) for key, label in labels.items()]


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("events", help="a memory_events.json")
    parser.add_argument("--top", type=int, default=None, help="only the N phases with the largest activation")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    document = load_events(args.events)
    events = document["events"]
    if args.top is not None:
        phases = sorted((e for e in events if e["kind"] == "phase"), key=lambda e: e["activation_bytes"], reverse=True)
        events = [e for e in events if e["kind"] == "component"] + phases[: args.top]
    if args.json:
        print(json.dumps({"backend": document["backend"], "summary": document["summary"]}, indent=2))
        return 0
    print(f"backend: {document['backend']} ({document.get('device', '?')})"
          + (f"  note: {document['note']}" if document.get("note") else ""))
    header = ("kind", "name", "before", "after / peak", "increment / activation", "seconds")
    print(format_table(event_rows(events), header=header))
    print()
    print(format_table(summary_rows(document["summary"]), header=("summary", "memory")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
