"""Print the temporal report (seam ratio, flicker, drift) of every video under a folder.

    python scripts/temporal_report.py FOLDER [--json_out report.json] [--block_frames 3 --temporal_stride 4]

Each inference folder (video.mp4 + inference_record.json) is measured from its mp4 with the blocks its record
names; a bare .mp4 needs --block_frames (latent frames per block) and --temporal_stride (the VAE's, 4 for Wan).
Drift segments have the length the record's recipe was trained on (bare mp4: --segment_frames, else halves).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from utils.errors import OneLineArgumentParser, UserError, run_main


def _bare_blocks(num_frames: int, block_frames: int, stride: int) -> list[int]:
    latent_frames = (num_frames - 1) // stride + 1 if stride > 1 else num_frames
    sizes = [block_frames] * (latent_frames // block_frames)
    if latent_frames % block_frames:
        sizes.append(latent_frames % block_frames)
    return sizes


def measure(video_path: Path, args) -> dict:
    import torch

    from utils.temporal import temporal_report
    from utils.video_io import read_mp4

    try:
        frames = torch.from_numpy(read_mp4(video_path)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    except Exception as err:  # noqa: BLE001 - ffmpeg reports damaged files in many ways
        raise UserError(f"{video_path} cannot be decoded ({type(err).__name__}): expected an mp4 video") from None
    record_path = video_path.with_name("inference_record.json")
    if record_path.exists():
        record = json.loads(record_path.read_text())
        geometry = record["geometry"]
        trained = (record.get("temporal") or {}).get("drift", {}).get("segment_frames")  # as at generation time
        return temporal_report(frames, geometry["block_sizes"], geometry["vae_stride"][0], segment_frames=trained)
    if args.block_frames is None:
        raise UserError(f"{video_path} has no inference_record.json beside it: give --block_frames (and "
                        "--temporal_stride) to say where its blocks end")
    blocks = _bare_blocks(len(frames), args.block_frames, args.temporal_stride)
    return temporal_report(frames, blocks, args.temporal_stride, segment_frames=args.segment_frames)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="temporal_report.py", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder of inference outputs or mp4 files (searched recursively)")
    parser.add_argument("--block_frames", type=int, default=None, help="latent frames per block, for bare mp4 files")
    parser.add_argument("--temporal_stride", type=int, default=4, help="the VAE's temporal stride (bare mp4 files)")
    parser.add_argument("--segment_frames", type=int, default=None, help="drift segment length (bare mp4 files)")
    parser.add_argument("--json_out", default=None, help="also write every report to this JSON file")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: expected a folder of generated videos")
    counts = {"--block_frames": args.block_frames, "--temporal_stride": args.temporal_stride,
              "--segment_frames": args.segment_frames}
    for flag, value in counts.items():
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: expected a positive count")
    videos = sorted(p for p in folder.rglob("*.mp4") if not any(part.startswith(".") for part in p.parts))
    if not videos:
        raise UserError(f"{folder} holds no .mp4 videos")

    from tqdm import tqdm

    from utils.tables import format_table

    reports = {str(p.relative_to(folder)): measure(p, args) for p in tqdm(videos, desc="videos", disable=len(videos) < 4)}
    rows = [(name, _fmt(r["seam_ratio"]), " ".join(_fmt(x) for x in r["seam_ratio_by_boundary"]), _fmt(r["flicker"]),
             _fmt(r["frame_change"]), " ".join(_fmt(s["drift"]) for s in r["drift"]["segments"]))
            for name, r in reports.items()]
    print(format_table(rows, header=("video", "seam ratio", "by boundary", "flicker", "frame change", "drift per segment")))
    if args.json_out:
        from utils.io import atomic_write_json

        atomic_write_json(Path(args.json_out), reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
