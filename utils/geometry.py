"""The one geometry function: every derived size (latent shape, tokens per frame, KV-cache shapes) comes from here.

Inputs are declared once: the model's architecture (preset or config.json), the VAE's strides and
channels, the video's pixel size and frame count, the block size and the cache window. Nothing else in
the project computes frame_seq_length, seq_len or latent shapes itself.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

from utils.config import Config
from utils.errors import UserError
from utils.presets import ROPE_MAX_POSITIONS, ModelSpec, VaeSpec, resolve_model, resolve_vae

BF16_BYTES = 2


@dataclass(frozen=True)
class Geometry:
    """Sizes of one model at one video size. Shapes are tuples; latents are [B, F, C, H, W]."""

    model: str
    dim: int
    num_heads: int
    head_dim: int
    num_layers: int
    latent_channels: int
    vae: str
    vae_stride: tuple
    patch_size: tuple
    height: int
    width: int
    num_pixel_frames: int
    num_latent_frames: int
    latent_height: int
    latent_width: int
    batch_size: int
    latent_shape: tuple
    frame_seq_length: int  # tokens per latent frame
    seq_len: int  # tokens of the whole video
    num_frame_per_block: int
    num_blocks: int
    block_sizes: tuple  # latent frames in each block of the rollout
    text_len: int
    text_dim: int
    cache_frames: int  # latent frames the self-attention KV cache holds
    sink_frames: int  # frames kept at the start of a rolling cache
    kv_cache_shape: tuple  # one layer's k (or v): [B, tokens, heads, head_dim]
    crossattn_cache_shape: tuple  # one layer's cross-attention k (or v): [B, text_len, heads, head_dim]
    kv_cache_bytes: int  # bf16, all layers, self-attention k and v

    def to_dict(self) -> dict:
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def latent_frames_for(num_pixel_frames: int, temporal_stride: int) -> int:
    """Wan's causal VAE keeps the first frame alone: F = (T - 1) / stride + 1."""
    if (num_pixel_frames - 1) % temporal_stride:
        raise UserError(
            f"video.num_frames={num_pixel_frames} does not fit the VAE's temporal stride {temporal_stride}: "
            f"expected {temporal_stride}*k+1 frames (e.g. {temporal_stride * ((num_pixel_frames - 1) // temporal_stride) + 1})"
        )
    return (num_pixel_frames - 1) // temporal_stride + 1


def vae_latent_shape(stride: tuple, z_dim: int, num_frames: int, height: int, width: int, vae_name: str) -> tuple:
    """(F, C, h, w) of a video through a VAE of this stride; a size that does not fit is one UserError line."""
    stride_t, stride_h, stride_w = stride
    if (num_frames - 1) % stride_t or height % stride_h or width % stride_w:
        raise UserError(
            f"video of {num_frames} frames at {height}x{width} does not fit the {vae_name} VAE: expected frames = "
            f"{stride_t}*k+1 and height/width multiples of {stride_h}/{stride_w}"
        )
    return (num_frames - 1) // stride_t + 1, z_dim, height // stride_h, width // stride_w


def pixel_frames_for(num_latent_frames: int, temporal_stride: int) -> int:
    return temporal_stride * (num_latent_frames - 1) + 1


def frames_to_make(asked: int, temporal_stride: int, num_frame_per_block: int, independent_first_frame: bool) -> int:
    """The fewest pixel frames of whole latent frames and whole blocks that hold `asked` frames (inference keeps
    the first `asked`): 40 frames with stride 4 and blocks of 3 are made as 45, 1 frame as 9."""
    latent = -(-(asked - 1) // temporal_stride) + 1
    if independent_first_frame:
        latent = 1 + -(-(latent - 1) // num_frame_per_block) * num_frame_per_block if latent > 1 else 1
    else:
        latent = -(-latent // num_frame_per_block) * num_frame_per_block
    return pixel_frames_for(latent, temporal_stride)


def block_sizes_for(num_latent_frames: int, num_frame_per_block: int, independent_first_frame: bool) -> tuple:
    """Latent frames per rollout block; the first block may hold the TI2V image frame alone."""
    rest = num_latent_frames - 1 if independent_first_frame else num_latent_frames
    if rest % num_frame_per_block:
        first = " after the independent first frame" if independent_first_frame else ""
        raise UserError(
            f"{num_latent_frames} latent frames{first} are not a whole number of blocks of "
            f"video.num_frame_per_block={num_frame_per_block}: change video.num_frames or the block size"
        )
    head = (1,) if independent_first_frame else ()
    return head + (num_frame_per_block,) * (rest // num_frame_per_block)


def compute_geometry(
    spec: ModelSpec,
    vae: VaeSpec,
    *,
    height: int,
    width: int,
    num_frames: int,
    num_frame_per_block: int,
    batch_size: int = 1,
    local_attn_size: int = -1,
    sink_size: int = 0,
    independent_first_frame: bool = False,
) -> Geometry:
    """All derived sizes for one model at one video size; raises UserError when the numbers do not fit."""
    arch = spec.arch
    patch_t, patch_h, patch_w = arch["patch_size"]
    stride_t, stride_h, stride_w = vae.stride
    # 1. the latent space must be the VAE's
    if arch["in_dim"] != vae.z_dim:
        raise UserError(
            f"{spec.role} '{spec.name}' takes {arch['in_dim']}-channel latents but VAE '{vae.name}' has {vae.z_dim} channels: "
            "teacher, student and VAE must share one latent space"
        )
    # 2. pixels -> latents -> tokens
    for axis, pixels, stride, patch in (("height", height, stride_h, patch_h), ("width", width, stride_w, patch_w)):
        if pixels % (stride * patch):
            raise UserError(
                f"video.{axis}={pixels} is not divisible by VAE stride x patch = {stride}x{patch} = {stride * patch}: "
                f"expected a multiple of {stride * patch}"
            )
    num_latent_frames = latent_frames_for(num_frames, stride_t)
    if num_latent_frames % patch_t:
        raise UserError(f"{num_latent_frames} latent frames are not divisible by the temporal patch {patch_t}")
    latent_height, latent_width = height // stride_h, width // stride_w
    frame_seq_length = (latent_height // patch_h) * (latent_width // patch_w)
    blocks = block_sizes_for(num_latent_frames, num_frame_per_block, independent_first_frame)
    # 3. the KV cache: all frames, or a rolling window with an attention sink
    cache_frames = num_latent_frames if local_attn_size == -1 else local_attn_size
    if local_attn_size != -1 and local_attn_size < max(blocks) + sink_size:
        raise UserError(
            f"rollout.local_attn_size={local_attn_size} frames cannot hold the sink ({sink_size}) plus one block "
            f"({max(blocks)}): expected at least {max(blocks) + sink_size}, or -1 for global attention"
        )
    head_dim = arch["dim"] // arch["num_heads"]
    kv_cache_shape = (batch_size, cache_frames * frame_seq_length, arch["num_heads"], head_dim)
    crossattn_cache_shape = (batch_size, arch["text_len"], arch["num_heads"], head_dim)
    return Geometry(
        model=spec.name,
        dim=arch["dim"],
        num_heads=arch["num_heads"],
        head_dim=head_dim,
        num_layers=arch["num_layers"],
        latent_channels=arch["in_dim"],
        vae=vae.name,
        vae_stride=tuple(vae.stride),
        patch_size=tuple(arch["patch_size"]),
        height=height,
        width=width,
        num_pixel_frames=num_frames,
        num_latent_frames=num_latent_frames,
        latent_height=latent_height,
        latent_width=latent_width,
        batch_size=batch_size,
        latent_shape=(batch_size, num_latent_frames, arch["in_dim"], latent_height, latent_width),
        frame_seq_length=frame_seq_length,
        seq_len=num_latent_frames * frame_seq_length,
        num_frame_per_block=num_frame_per_block,
        num_blocks=len(blocks),
        block_sizes=blocks,
        text_len=arch["text_len"],
        text_dim=arch["text_dim"],
        cache_frames=cache_frames,
        sink_frames=sink_size,
        kv_cache_shape=kv_cache_shape,
        crossattn_cache_shape=crossattn_cache_shape,
        kv_cache_bytes=2 * arch["num_layers"] * math.prod(kv_cache_shape) * BF16_BYTES,
    )


def check_sequence_parallel(size: int, num_heads: int, frame_seq_length: int, what: str = "the model") -> None:
    """sp_size must divide the heads (Ulysses splits them) and the tokens of a latent frame (each rank a slice)."""
    if size < 1:
        raise UserError(f"parallel.sp_size={size}: expected 1 (off) or more ranks per sample")
    if num_heads % size:
        raise UserError(f"parallel.sp_size={size} does not divide the {num_heads} attention heads of {what}: "
                        f"expected a divisor of {num_heads}")
    if frame_seq_length % size:
        raise UserError(f"parallel.sp_size={size} does not divide the {frame_seq_length} tokens of a latent frame of "
                        f"{what}: expected a divisor of {frame_seq_length}")


@dataclass(frozen=True)
class ResolvedRecipe:
    """A recipe's models, VAE and the generator's geometry, all checked against each other."""

    generator: ModelSpec
    real_score: Optional[ModelSpec]
    critic: Optional[ModelSpec]
    vae: VaeSpec
    geometry: Geometry


def _check_latent_space(student: ModelSpec, other: ModelSpec, vae: VaeSpec) -> None:
    if other.latent_channels != student.latent_channels or (other.vae and student.vae and other.vae != student.vae):
        raise UserError(
            f"{other.role} '{other.name}' lives in latent space {other.vae or '?'} ({other.latent_channels} channels) but the "
            f"generator '{student.name}' in {student.vae or vae.name} ({student.latent_channels} channels): "
            "a teacher must share the student's VAE"
        )


def geometry_for(config: Config, spec: ModelSpec, vae: VaeSpec, num_frames: Optional[int] = None) -> Geometry:
    """The geometry of `spec` at the recipe's video size (or another pixel frame count, for long inference)."""
    video, rollout = config.video, config.rollout
    return compute_geometry(
        spec,
        vae,
        height=video.height,
        width=video.width,
        num_frames=num_frames or video.num_frames,
        num_frame_per_block=video.num_frame_per_block,
        batch_size=config.train.batch_size,
        local_attn_size=rollout.local_attn_size,
        sink_size=rollout.sink_size,
        independent_first_frame=rollout.independent_first_frame,
    )


def resolve_recipe(config: Config, *, need_scores: Optional[bool] = None, check_weights: bool = True) -> ResolvedRecipe:
    """Resolve generator, scores and VAE and derive the generator's geometry; every check happens here, before work.

    `need_scores`: whether real/fake scores must be named (default: when the recipe's objective runs them).
    `check_weights`: whether named checkpoints must exist (False: geometry from presets only, e.g. verify.py geometry).
    """
    if need_scores is None:
        from model.registry import objective_class  # objectives import this module

        need_scores = objective_class(config).uses_teacher or objective_class(config).has_critic
    generator = resolve_model("generator", config.generator, check_weights)
    vae = resolve_vae(config.vae, generator, check_weights)
    real = fake = None
    if need_scores or config.real_score.preset or config.real_score.checkpoint:
        real = resolve_model("real_score", config.real_score, check_weights)
        _check_latent_space(generator, real, vae)
        fake_ref = config.critic if (config.critic.preset or config.critic.checkpoint) else config.real_score
        fake = resolve_model("critic", fake_ref, check_weights)
        _check_latent_space(generator, fake, vae)
    geometry = geometry_for(config, generator, vae)
    for spec in (generator, real, fake):
        if spec is not None:
            check_sequence_parallel(config.parallel.sp_size, spec.arch["num_heads"], geometry.frame_seq_length,
                                    f"{spec.role} '{spec.name}'")
    stated = config.video.image_or_video_shape
    if stated is not None and tuple(stated) != geometry.latent_shape:
        raise UserError(
            f"video.image_or_video_shape {list(stated)} disagrees with VAE '{vae.name}' ({vae.z_dim} channels, stride "
            f"{list(vae.stride)}) at {geometry.height}x{geometry.width}, {geometry.num_pixel_frames} frames: expected "
            f"{list(geometry.latent_shape)}"
        )
    return ResolvedRecipe(generator=generator, real_score=real, critic=fake, vae=vae, geometry=geometry)


def derive_geometry(config: Config, check_weights: bool = True) -> Geometry:
    """The generator's geometry for a recipe (all checks included)."""
    return resolve_recipe(config, need_scores=False, check_weights=check_weights).geometry


# --------------------------------------------------------------------------------------------- videos longer than training
def inference_geometry(config: Config, resolved: ResolvedRecipe, num_output_frames: Optional[int]) -> Geometry:
    """Geometry of an output video of `num_output_frames` pixel frames (None: the recipe's), cache window included.

    Any count from 1 to max_pixel_frames: the geometry is of the frames made (frames_to_make), whole blocks.
    Raises UserError for a count out of range: call it before loading anything.
    """
    asked = num_output_frames or config.video.num_frames
    if asked < 1:
        raise UserError(f"--num_output_frames {asked}: expected a positive number of pixel frames")
    stride = resolved.vae.stride[0]
    longest = max_pixel_frames(config, stride)
    if asked > longest:  # frame positions are absolute: past the RoPE table the generator cannot place a frame
        raise UserError(f"--num_output_frames {asked}: at most {longest} pixel frames (the RoPE position table holds "
                        f"{ROPE_MAX_POSITIONS} latent frames)")
    frames = frames_to_make(asked, stride, config.video.num_frame_per_block, config.rollout.independent_first_frame)
    rollout = config.rollout
    if rollout.local_attn_size == -1 and frames > config.video.num_frames:
        # Global attention means "everything the model was trained to see"; beyond that the cache rolls.
        trained = resolved.geometry.num_latent_frames
        if rollout.sink_size >= trained:
            raise UserError(f"rollout.sink_size={rollout.sink_size} leaves no room in the {trained}-frame cache window")
        rollout = replace(rollout, local_attn_size=trained)
        config = replace(config, rollout=rollout)
    try:
        return geometry_for(config, resolved.generator, resolved.vae, num_frames=frames)
    except UserError as err:
        raise UserError(f"--num_output_frames {asked}: {err}") from None


def max_pixel_frames(config: Config, temporal_stride: int) -> int:
    """The longest video the generator can place: whole blocks within the RoPE table's frame positions."""
    block = config.video.num_frame_per_block
    if config.rollout.independent_first_frame:
        latent = 1 + (ROPE_MAX_POSITIONS - 1) // block * block
    else:
        latent = ROPE_MAX_POSITIONS // block * block
    return pixel_frames_for(latent, temporal_stride)
