"""The miniature world: procedural captioned clips of one shape moving across a plain background.

A clip is fully described by its `Caption` (shape, colour, direction, speed, background) and a seed
that only picks the start position. Colours are corners of the RGB cube, so any two are at least
2.0 apart in [-1, 1] space and a judge can tell them apart after blur, blocking or noise.

Two worlds share the captions (`WORLDS`). "bounded" (the default, the world of the shipped teacher): the
start position keeps the shape inside the canvas for exactly the clip's frames; past them it would leave
the canvas, so a longer video has no true trajectory. "wrap": the canvas is a torus (a shape leaving one
side comes back in at the opposite one), so a trajectory goes on for any number of frames and every
stretch of a clip looks like a clip of the training length: a video four times the training length can
be judged segment by segment (`checkpoints/miniature/teacher_wrap` was trained on it).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch

from utils.errors import UserError

# Corners of the RGB cube in [-1, 1]; shape and background palettes are disjoint.
SHAPE_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
BACKGROUND_COLOURS: dict[str, tuple[float, float, float]] = {
    "black": (-1.0, -1.0, -1.0),
    "white": (1.0, 1.0, 1.0),
    "cyan": (-1.0, 1.0, 1.0),
    "magenta": (1.0, -1.0, 1.0),
}
SHAPES = ("circle", "square")
# Unit steps in image coordinates (x to the right, y downwards).
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
SPEED_ADVERBS = {"slow": "slowly", "fast": "quickly"}

_CAPTION_PATTERN = re.compile(
    r"a (?P<colour>\w+) (?P<shape>\w+) moving (?P<direction>\w+) (?P<adverb>\w+) on an? (?P<background>\w+) background"
)


@dataclass(frozen=True)
class WorldSpec:
    """Canvas, clip length and motion of the world; the defaults are the shipped miniature recipe.

    9 latent frames (3 blocks of 3) rather than 21: every teacher sample and ODE pair costs full
    many-step sampling on 2 CPU cores, and 3 blocks already exercise the KV cache across blocks.
    """

    height: int = 32
    width: int = 32
    latent_frames: int = 9
    temporal_stride: int = 4  # Wan's causal VAE: pixel frames = stride * (latent frames - 1) + 1
    shape_size: float = 10.0  # circle diameter / square side, in pixels
    slow_speed: float = 0.3  # pixels per pixel frame
    fast_speed: float = 0.6
    supersample: int = 4  # sub-pixel samples per axis for anti-aliased edges
    # Toroidal canvas: positions are taken modulo the canvas, start positions are uniform over it. False: the
    # shape stays inside the canvas for exactly `num_frames` frames.
    wrap: bool = False

    @property
    def num_frames(self) -> int:
        return self.temporal_stride * (self.latent_frames - 1) + 1

    def speed(self, name: str) -> float:
        return {"slow": self.slow_speed, "fast": self.fast_speed}[name]


DEFAULT_WORLD = WorldSpec()
WORLDS = {"bounded": DEFAULT_WORLD, "wrap": WorldSpec(wrap=True)}
# Each world's teacher folder under checkpoints/miniature (scripts/train_miniature_teacher.py writes it there).
TEACHER_FOLDERS = {"bounded": "teacher", "wrap": "teacher_wrap"}
# ODE pairs per caption in each world's quickstart (each from its own noise seed). The wrapping world's start
# positions are uniform, so one trajectory per caption under-samples it: with 4 per caption its ODE-init student
# scored 0.519 instead of 0.270 and its DMD student's last / first long-video segment 0.996 instead of 0.876
# (docs/EXPERIMENTS.md, 2026-11-30). The bounded world keeps 1: its chain meets its checks and the seam goal (1.16x
# the teacher's; 1.02x with 4 per caption), and 4 would add ~14 minutes of teacher sampling to `make quickstart`.
ODE_PAIRS_PER_CAPTION = {"bounded": 1, "wrap": 4}


def world_named(name: str) -> WorldSpec:
    if name not in WORLDS:
        raise UserError(f"miniature world '{name}' does not exist: expected one of {', '.join(WORLDS)}")
    return WORLDS[name]


@dataclass(frozen=True)
class Caption:
    """The ground truth of one clip."""

    shape: str
    colour: str
    direction: str
    speed: str  # "slow" or "fast"
    background: str

    def __post_init__(self) -> None:
        checks = (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(SHAPE_COLOURS)),
            ("direction", self.direction, tuple(DIRECTIONS)),
            ("speed", self.speed, tuple(SPEED_ADVERBS)),
            ("background", self.background, tuple(BACKGROUND_COLOURS)),
        )
        for name, value, allowed in checks:
            if value not in allowed:
                raise UserError(f"caption {name} '{value}' is not in the miniature world: expected one of {', '.join(allowed)}")

    @property
    def text(self) -> str:
        return (
            f"a {self.colour} {self.shape} moving {self.direction} {SPEED_ADVERBS[self.speed]}"
            f" on a {self.background} background"
        )


def parse_caption(text: str) -> Caption:
    """Read a caption written by `Caption.text` back into its ground truth."""
    match = _CAPTION_PATTERN.fullmatch(" ".join(text.lower().split()))
    if match is None:
        raise UserError(
            f"caption '{text}' is not a miniature-world caption: expected 'a <colour> <shape> moving <direction> "
            "<slowly|quickly> on a <colour> background'"
        )
    speeds = {adverb: speed for speed, adverb in SPEED_ADVERBS.items()}
    if match["adverb"] not in speeds:
        raise UserError(f"caption '{text}' has speed '{match['adverb']}': expected slowly or quickly")
    return Caption(
        shape=match["shape"],
        colour=match["colour"],
        direction=match["direction"],
        speed=speeds[match["adverb"]],
        background=match["background"],
    )


def all_captions() -> list[Caption]:
    """Every caption of the world, in a fixed order (2 shapes x 4 colours x 4 directions x 2 speeds x 4 backgrounds)."""
    return [
        Caption(shape, colour, direction, speed, background)
        for shape, colour, direction, speed, background in itertools.product(
            SHAPES, SHAPE_COLOURS, DIRECTIONS, SPEED_ADVERBS, BACKGROUND_COLOURS
        )
    ]


def vocabulary() -> list[str]:
    """The words captions are made of, in a fixed order (the miniature text encoder's vocabulary)."""
    words: list[str] = []
    for caption in all_captions():
        for word in caption.text.split():
            if word not in words:
                words.append(word)
    return words


def start_position(caption: Caption, seed: int, spec: WorldSpec = DEFAULT_WORLD) -> tuple[float, float]:
    """A seeded start centre (x, y): anywhere on a wrapping canvas, else where the trajectory stays inside."""
    generator = torch.Generator().manual_seed(seed)
    if spec.wrap:
        return (spec.width * torch.rand((), generator=generator).item(),
                spec.height * torch.rand((), generator=generator).item())
    travel = spec.speed(caption.speed) * (spec.num_frames - 1)
    dx, dy = DIRECTIONS[caption.direction]
    margin = spec.shape_size / 2 + 1.0  # one pixel of background between the shape and the border
    centre = []
    for size, step in ((spec.width, dx), (spec.height, dy)):
        low, high = margin, size - margin
        if step > 0:
            high -= travel
        elif step < 0:
            low += travel
        if high < low:
            raise UserError(
                f"world canvas {spec.width}x{spec.height} is too small for {caption.speed} motion over {spec.num_frames} frames"
            )
        centre.append(low + (high - low) * torch.rand((), generator=generator).item())
    return centre[0], centre[1]


def render(caption: Caption, seed: int, spec: WorldSpec = DEFAULT_WORLD, num_frames: int | None = None) -> torch.Tensor:
    """The clip [T, 3, H, W] in [-1, 1] for a caption; deterministic in (caption, seed).

    num_frames: the clip's length (default: the world's); longer clips continue the same trajectory, which on a
    canvas that does not wrap leaves the canvas after `spec.num_frames` frames.
    """
    x0, y0 = start_position(caption, seed, spec)
    dx, dy = DIRECTIONS[caption.direction]
    speed = spec.speed(caption.speed)
    num_frames = num_frames or spec.num_frames
    times = torch.arange(num_frames, dtype=torch.float64)
    centre_x = (x0 + dx * speed * times).view(-1, 1, 1)
    centre_y = (y0 + dy * speed * times).view(-1, 1, 1)

    # Sub-pixel sample grid: coverage of each pixel gives anti-aliased, sub-pixel motion.
    s = spec.supersample
    ys = (torch.arange(spec.height * s, dtype=torch.float64) + 0.5) / s
    xs = (torch.arange(spec.width * s, dtype=torch.float64) + 0.5) / s
    grid_y, grid_x = ys.view(1, -1, 1), xs.view(1, 1, -1)
    half = spec.shape_size / 2
    offset_x, offset_y = grid_x - centre_x, grid_y - centre_y
    if spec.wrap:  # the nearest copy of the centre on the torus
        offset_x = periodic_offset(offset_x, spec.width)
        offset_y = periodic_offset(offset_y, spec.height)
    if caption.shape == "circle":
        inside = offset_x**2 + offset_y**2 <= half**2
    else:
        inside = (offset_x.abs() <= half) & (offset_y.abs() <= half)
    coverage = inside.to(torch.float32).view(num_frames, spec.height, s, spec.width, s).mean(dim=(2, 4))

    shape_rgb = torch.tensor(SHAPE_COLOURS[caption.colour]).view(1, 3, 1, 1)
    background_rgb = torch.tensor(BACKGROUND_COLOURS[caption.background]).view(1, 3, 1, 1)
    coverage = coverage.unsqueeze(1)
    return coverage * shape_rgb + (1 - coverage) * background_rgb


def periodic_offset(offset: torch.Tensor, size: float) -> torch.Tensor:
    """Offsets along a wrapping axis of length `size`, brought into [-size / 2, size / 2)."""
    return torch.remainder(offset + size / 2, size) - size / 2


def render_caption_text(text: str, seed: int, spec: WorldSpec = DEFAULT_WORLD) -> torch.Tensor:
    return render(parse_caption(text), seed, spec)
