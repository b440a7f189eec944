"""Where inference results go: one folder per video with video.mp4, frames.png and inference_record.json.

    <output_folder>/<task>_<W>x<H>_<YYYYmmdd_HHMMSS>_<prompt-slug>/

Folders are never reused: a second video in the same second with the same prompt gets a -2, -3 suffix.
A folder is created only once its video has been generated, and removed again if writing fails, so a
failed run leaves nothing behind.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from pipeline.causal_inference import InferenceResult
from utils.errors import DiskFull, is_disk_full
from utils.io import atomic_save_safetensors, atomic_write_json
from utils.video_io import write_frame_strip, write_mp4

SLUG_MAX_CHARS = 40
VIDEO_FILE = "video.mp4"
RECORD_FILE = "inference_record.json"
STRIP_FILE = "frames.png"
LATENTS_FILE = "latents.safetensors"
RECORD_TIMINGS = ("load_s", "text_encode_s", "per_block_denoise_s", "denoise_s", "vae_decode_s", "total_s",
                  "first_block_latency_s", "fps")


def slugify(prompt: str, max_chars: int = SLUG_MAX_CHARS) -> str:
    """Lowercase letters, digits and dashes, at most `max_chars`; 'video' when nothing is left."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:max_chars].rstrip("-") or "video"


def new_output_dir(root: str | Path, task: str, width: int, height: int, prompt: str,
                   now: Optional[dt.datetime] = None) -> Path:
    """Create and return a fresh folder for one video (never an existing one)."""
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d_%H%M%S")
    base = f"{task}_{width}x{height}_{stamp}_{slugify(prompt)}"
    Path(root).mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 10_000):
        folder = Path(root) / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            folder.mkdir()  # atomic: two writers racing for a name cannot both get it
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"no free output folder name for {base} in {root}")


def build_record(result: InferenceResult, parameters: dict) -> dict:
    """The inference record: prompt, every parameter, checkpoint, seed, frame counts, timings, memory."""
    geometry = result.geometry
    return {
        "prompt": result.prompt,
        "task": result.task,
        "seed": result.seed,
        "image": result.image,
        "checkpoint": parameters.get("checkpoint"),
        "num_pixel_frames": int(result.video.shape[0]),  # kept: the frames asked for
        "num_pixel_frames_made": geometry.num_pixel_frames,  # whole latent frames in whole blocks
        "num_latent_frames": geometry.num_latent_frames,
        "height": geometry.height,
        "width": geometry.width,
        "nfe": result.nfe,
        "parameters": parameters,
        "geometry": geometry.to_dict(),
        "timings": {key: result.timings[key] for key in RECORD_TIMINGS},
        "memory": result.memory,
        "temporal": result.temporal,
        "prompt_switches": result.prompt_switches,
    }


def save_result(result: InferenceResult, output_root: str | Path, parameters: dict, fps: int,
                save_latents: bool = False) -> Path:
    """Write one result's folder (and the clean latents, [F, C, h, w] float32, when asked); returns it."""
    geometry = result.geometry
    record = build_record(result, parameters)
    # Written into a hidden staging folder and renamed whole: a kill never leaves a half-filled video folder.
    Path(output_root).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=output_root))
    try:
        write_mp4(staging / VIDEO_FILE, result.video, fps)
        write_frame_strip(staging / STRIP_FILE, result.video)
        if save_latents:
            atomic_save_safetensors(staging / LATENTS_FILE, {"latents": result.latents[0]})
        atomic_write_json(staging / RECORD_FILE, record)
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the video folder gets the usual permissions
        folder = new_output_dir(output_root, result.task, geometry.width, geometry.height, result.prompt)
        os.replace(staging, folder)  # onto the freshly reserved (empty) name
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(err):
            raise DiskFull(output_root) from err
        raise
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
