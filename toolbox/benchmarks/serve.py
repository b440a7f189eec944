"""Time to first block and frames per second through serve.py (a WebSocket client) vs inference.py, same run.

    python scripts/benchmark.py serve --config_path configs/miniature/dmd.yaml --checkpoint checkpoints/miniature/teacher
        [--num_frames 141] [--repeats 5] [--device cpu]

inference.py's figures come from its inference_record.json (first_block_latency_s, fps: from the start of the
request, models loaded). The server's are measured by the client: from sending the request to receiving the first
block's frames, and frames received per second until the last one. Medians over --repeats, after one warm-up each.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from utils.errors import OneLineArgumentParser, UserError, run_main

REPO = Path(__file__).resolve().parents[2]

PROMPT = "a red circle moving left on a blue background"


def through_inference(args, out: Path) -> list[dict]:
    out.mkdir(parents=True)
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join([PROMPT] * (args.repeats + 1)) + "\n")
    command = [sys.executable, "inference.py", "--config_path", args.config_path, "--checkpoint", args.checkpoint,
               "--data_path", str(prompts), "--num_output_frames", str(args.num_frames), "--output_folder",
               str(out / "videos"), *(["--device", args.device] if args.device else [])]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"inference.py failed: {proc.stderr.strip().splitlines()[-1]}")
    records = sorted((json.loads(p.read_text()) for p in (out / "videos").glob("*/inference_record.json")),
                     key=lambda r: r["seed"])
    return [{"first_block_s": r["timings"]["first_block_latency_s"], "fps": r["timings"]["fps"]} for r in records[1:]]


def through_server(args, out: Path) -> list[dict]:
    import socket as sockets

    from websockets.sync.client import connect

    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out.mkdir(parents=True)
    log = open(out / "server.log", "w")
    server = subprocess.Popen([sys.executable, "serve.py", "--config_path", args.config_path, "--checkpoint",
                               args.checkpoint, "--port", str(port), "--output_folder", str(out / "served"),
                               *(["--device", args.device] if args.device else [])],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 300
        while True:
            try:
                with connect(f"ws://127.0.0.1:{port}/ws"):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise UserError(f"serve.py did not start: see {out / 'server.log'}") from None
                time.sleep(0.3)
        results = []
        for repeat in range(args.repeats + 1):
            with connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as socket:
                start = time.perf_counter()
                socket.send(json.dumps({"prompt": PROMPT, "seed": repeat, "num_frames": args.num_frames}))
                first = last = None
                frames = 0
                while True:
                    message = socket.recv(timeout=600)
                    if isinstance(message, bytes):
                        last = time.perf_counter()
                        first = first or last
                        continue
                    event = json.loads(message)
                    frames += event.get("frames", 0) if event["type"] == "block" else 0
                    if event["type"] in ("done", "stopped", "error"):
                        break
            if repeat:
                results.append({"first_block_s": first - start, "fps": frames / (last - start)})
        return results
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="benchmark.py serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num_frames", type=int, default=141)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: expected at least 1")
    from utils.tables import format_table

    with tempfile.TemporaryDirectory() as tmp:
        offline = through_inference(args, Path(tmp) / "inference")
        served = through_server(args, Path(tmp) / "serve")
    rows = [(name, f"{statistics.median(r['first_block_s'] for r in runs):.3f}",
             f"{statistics.median(r['fps'] for r in runs):.1f}", len(runs))
            for name, runs in (("inference.py", offline), ("serve.py (WebSocket client)", served))]
    print(format_table(rows, header=("path", "first block (s)", "frames / s", "videos")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
