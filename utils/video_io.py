"""Writing generated videos: mp4 (libx264, yuv420p) and a frame-strip PNG for reports, both atomic.

Frames arrive as the VAE gives them, `[T, 3, H, W]` floats in [-1, 1], or already as uint8.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from utils.errors import UserError
from utils.io import atomic_write

MP4_QUALITY = 8  # imageio-ffmpeg's 0..10 scale; 8 keeps tiny test videos readable
YUV420_MULTIPLE = 2  # 4:2:0 chroma subsampling halves both axes


def to_uint8_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """[T, 3, H, W] floats in [-1, 1] (or uint8) -> uint8 [T, H, W, 3] for writers."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(video)
    if video.ndim != 4 or video.shape[1] != 3:
        raise UserError(f"video of shape {tuple(video.shape)}: expected [T, 3, H, W]")
    if video.dtype != torch.uint8:
        video = ((video.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def write_mp4(path: str | Path, video: torch.Tensor | np.ndarray, fps: int) -> Path:
    """Encode frames as H.264 mp4; the file appears under its name only once complete."""
    import imageio_ffmpeg

    frames = to_uint8_frames(video)
    num_frames, height, width, _ = frames.shape
    if height % YUV420_MULTIPLE or width % YUV420_MULTIPLE:
        raise UserError(f"video size {width}x{height} cannot be written as yuv420p mp4: expected even width and height")

    def write(tmp: str) -> None:
        writer = imageio_ffmpeg.write_frames(
            tmp, (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=MP4_QUALITY,
            macro_block_size=1, output_params=["-f", "mp4"],  # the temp name has no .mp4 suffix to guess from
        )
        writer.send(None)  # start the generator
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()

    return atomic_write(path, write)


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode an mp4 to uint8 [T, H, W, 3] (tests and reports)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    return np.stack(frames)


def frame_strip(video: torch.Tensor | np.ndarray, max_frames: int = 8) -> np.ndarray:
    """A row of up to `max_frames` evenly spaced frames (first and last included) as uint8 [H, n*W, 3]."""
    frames = to_uint8_frames(video)
    count = min(max_frames, len(frames))
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return np.concatenate(list(frames[picks]), axis=1)


def write_frame_strip(path: str | Path, video: torch.Tensor | np.ndarray, max_frames: int = 8) -> Path:
    """Save `frame_strip` as a PNG, atomically."""
    import imageio.v3 as iio

    strip = frame_strip(video, max_frames)
    return atomic_write(path, lambda tmp: iio.imwrite(tmp, strip, extension=".png"))
