"""Training data: ODE pairs from an LMDB, text prompts, and image + text pairs for TI2V; plus `collate`.

Every dataset checks its input when built (missing or empty files, a geometry that does not match the
recipe, unreadable images) and says what is wrong in one line, before any training step runs.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.errors import UserError
from utils.geometry import Geometry
from utils.lmdb_store import OdeLmdbReader, describe_geometry, fingerprint_fields, geometry_fingerprint

IMAGE_PROMPT_SEPARATOR = "\t"  # image-text files: one `image<TAB>prompt` per line


# --------------------------------------------------------------------------------------------- ODE pairs
class OdeLmdbDataset(Dataset):
    """ODE pairs: {"prompt": str, "ode_latents": float32 [P, F, C, H, W], "ode_timesteps": float32 [P]}.

    Refuses a database whose latents were made for another geometry (size, VAE, channels) than `geometry`.
    """

    def __init__(self, path: str | os.PathLike, geometry: Geometry) -> None:
        self.reader = OdeLmdbReader(path)
        self.header = self.reader.header
        try:
            self._check_geometry(geometry)
        except UserError:
            self.reader.close()
            raise
        self.ode_timesteps = torch.tensor(self.header["trajectory_timesteps"], dtype=torch.float32)

    def _check_geometry(self, geometry: Geometry) -> None:
        stored, expected = self.header["geometry"], fingerprint_fields(geometry)
        if stored != expected:
            raise UserError(
                f"ODE LMDB {self.reader.path} holds {describe_geometry(stored)} but the recipe expects "
                f"{describe_geometry(expected)}: generate pairs with this recipe or change video/vae settings"
            )
        fingerprint = geometry_fingerprint(geometry, self.header["trajectory_timesteps"])
        if fingerprint != self.header["fingerprint"]:
            raise UserError(
                f"ODE LMDB {self.reader.path} header fingerprint {self.header['fingerprint']} does not match its own "
                f"fields ({fingerprint}): the header is damaged, rebuild it with scripts/create_lmdb.py"
            )
        if len(self.reader) == 0:
            raise UserError(f"ODE LMDB {self.reader.path} holds no pairs: expected at least one")

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict:
        row = self.reader.read(index)
        # np.frombuffer gives a read-only view of the LMDB page; astype copies it into our own float32 array
        latents = torch.from_numpy(row.latents.astype(np.float32))
        return {"prompt": row.prompt, "ode_latents": latents, "ode_timesteps": self.ode_timesteps.clone()}


# --------------------------------------------------------------------------------------------- text
def read_text_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file, stripped; a missing or empty file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} not found: expected a UTF-8 text file with one entry per line")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise UserError(f"{what} file {path} is not UTF-8 text (byte {err.start}): expected one entry per line") from None
    lines = [line for line in lines if line]
    if not lines:
        raise UserError(f"{what} file {path} is empty: expected one entry per line")
    return lines


class TextPromptDataset(Dataset):
    """Prompts, one per non-blank line: {"prompt": str}."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.prompts = read_text_lines(path, "prompt")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        return {"prompt": self.prompts[index]}

    def prompt(self, index: int) -> str:
        return self.prompts[index]


# --------------------------------------------------------------------------------------------- images
MAX_IMAGE_PIXELS = 8192 * 8192  # a first frame larger than this is refused before it is decoded
MAX_IMAGE_ASPECT = 16  # and one longer than 16:1 either way (1x200000 is small but would cover a frame at 140 M pixels)


def load_image(path: str | os.PathLike, height: int, width: int) -> torch.Tensor:
    """An RGB image resized to cover height x width (aspect kept) and centre-cropped: float32 [3, H, W] in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as opened:  # reads the header only: the size is known before any decoding
            if opened.width * opened.height > MAX_IMAGE_PIXELS:
                raise UserError(f"image {path} is {opened.width}x{opened.height} ({opened.width * opened.height / 1e6:.0f} M "
                                f"pixels): expected at most {MAX_IMAGE_PIXELS / 1e6:.0f} M pixels (e.g. 8192x8192)")
            aspect = max(opened.width, opened.height) / max(1, min(opened.width, opened.height))
            if aspect > MAX_IMAGE_ASPECT:
                raise UserError(f"image {path} is {opened.width}x{opened.height}, {aspect:.0f}:1: expected a first frame "
                                f"at most {MAX_IMAGE_ASPECT}:1 (the video is {width}x{height})")
            image = opened.convert("RGB")
    except Image.DecompressionBombError:
        raise UserError(f"image {path} is larger than PIL will decode: expected at most {MAX_IMAGE_PIXELS / 1e6:.0f} M "
                        "pixels") from None
    except (OSError, UnidentifiedImageError, ValueError) as err:
        reason = "not found" if isinstance(err, FileNotFoundError) else "cannot be read as an image"
        raise UserError(f"image {path} {reason}: expected a PNG, JPEG or WebP file") from None
    # 1. The centre region with the target's aspect, resized straight to the target (the region is cut in the
    #    source's coordinates, so no intermediate is larger than the source or the target).
    scale = max(height / image.height, width / image.width)
    box_w, box_h = min(image.width, width / scale), min(image.height, height / scale)
    left, top = (image.width - box_w) / 2, (image.height - box_h) / 2
    image = image.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + box_w, top + box_h))
    # 2. HWC uint8 -> CHW float in [-1, 1].
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


class ImageTextDataset(Dataset):
    """TI2V first frames: each line `image<TAB>prompt` (image relative to `image_root`) -> {"prompt", "image" [3, H, W]}."""

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike, height: int, width: int) -> None:
        self.image_root, self.height, self.width = Path(image_root), height, width
        if not self.image_root.is_dir():
            raise UserError(f"image root {self.image_root} is not a folder: expected the folder of first-frame images")
        self.entries: list[tuple[Path, str]] = []
        for number, line in enumerate(read_text_lines(path, "image-prompt"), start=1):
            image_path, prompt = _image_line(line, number, path, self.image_root)
            if image_path is None:
                raise UserError(f"{path} line {number} has no tab-separated prompt: expected `image<TAB>prompt`")
            self.entries.append((image_path, prompt))

    @property
    def prompts(self) -> list[str]:
        return [prompt for _, prompt in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        image_path, prompt = self.entries[index]
        return {"prompt": prompt, "image": load_image(image_path, self.height, self.width)}

    def prompt(self, index: int) -> str:
        """The line's prompt alone (a long rollout's switch prompt: no image read)."""
        return self.entries[index][1]


def _image_line(line: str, number: int, path: str | os.PathLike, image_root: Path) -> tuple[Path | None, str]:
    """(image path, prompt) of an `image<TAB>prompt` line, (None, line) of a line without a tab; the image must exist."""
    image_name, separator, prompt = line.partition(IMAGE_PROMPT_SEPARATOR)
    if not separator:
        return None, line
    if not prompt.strip() or not image_name.strip():
        raise UserError(f"{path} line {number} has an empty image or prompt: expected `image<TAB>prompt`")
    image_path = image_root / image_name.strip()
    if not image_path.is_file():
        raise UserError(f"{path} line {number} names image {image_path}, which does not exist")
    return image_path, prompt.strip()


def read_video_requests(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[tuple[str, Path | None]]:
    """An inference list: (prompt, first-frame image or None) per line. A `prompt` line is text-to-video; an
    `image<TAB>prompt` line starts from that image (relative to `image_root`, by default the list's folder)."""
    root = Path(image_root) if image_root is not None else Path(path).parent
    if image_root is not None and not root.is_dir():
        raise UserError(f"image root {root} is not a folder: expected the folder of the list's first-frame images")
    requests = []
    for number, line in enumerate(read_text_lines(path, "prompt"), start=1):
        image_path, prompt = _image_line(line, number, path, root)
        requests.append((prompt, image_path))
    return requests


def read_switch_prompts(path: str | os.PathLike, prompts: list[str]) -> list[list[str]]:
    """Each of `prompts`' next prompts from a `prompt<TAB>next prompt` file (a prompt may have several lines), in the
    file's order; a training prompt with none is refused, naming it."""
    nexts: dict[str, list[str]] = {}
    for number, line in enumerate(read_text_lines(path, "switch-prompt"), start=1):
        prompt, separator, following = line.partition(IMAGE_PROMPT_SEPARATOR)
        if not separator or not prompt.strip() or not following.strip():
            raise UserError(f"{path} line {number}: expected `prompt<TAB>next prompt`")
        nexts.setdefault(prompt.strip(), []).append(following.strip())
    missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in nexts]
    if missing:
        raise UserError(f"distill.switch_prompts {path} has no next prompt for {len(missing)} training prompt(s), "
                        f"e.g. '{missing[0]}': expected a `prompt<TAB>next prompt` line for each")
    return [nexts[prompt] for prompt in prompts]


# --------------------------------------------------------------------------------------------- batching
def collate(items: list[dict]) -> dict:
    """Items -> a batch: "prompt" becomes "prompts" (a list); every tensor field is stacked along a new dim 0."""
    if not items:
        raise ValueError("collate needs at least one item")
    batch: dict = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "prompt":
            batch["prompts"] = values
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


__all__ = ["ImageTextDataset", "OdeLmdbDataset", "TextPromptDataset", "collate", "load_image", "read_text_lines",
           "read_switch_prompts", "read_video_requests"]
