"""The one block-wise KV-cache rollout of a causal student: Self-Forcing training and causal inference both run it.

Frames are produced block by block (geometry.block_sizes). For one block:
  1. steps before the block's exit step, without gradient: predict x0 from the flow, re-noise it to
     the next timestep with fresh noise;
  2. the exit step: its x0 is the block's output (with gradient in training);
  3. the context pass: the output, re-noised to `context_noise`, is run once more with commit=True
     under no_grad, which writes the block's keys and values (detached) into the cache.
Inference is the same routine with every block exiting at the last step and no gradient anywhere.

TI2V: the given first latent frame is held clean at timestep 0. With an independent first frame
(a one-frame first block) the block is just a context pass on that frame; otherwise frame 0 rides
along inside the first block at t = 0 and is re-imposed after every step, as the teacher does. A batch of
both tasks holds it in the rows given by `first_frame_rows` only; the other rows make frame 0 from noise.
Video extension: given clean latents for the leading whole blocks are context passes at t = 0 only, and the
rollout continues after them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from pipeline.flow_matching import add_noise, predict_x0
from utils.config import Config, FlowConfig
from utils.dist import broadcast_int_list
from utils.errors import UserError
from utils.fake import real_values
from utils.geometry import Geometry
from wan.modules.kv_cache import KVCache
from wan.modules.sequence_parallel import sp_size_of

BlockCallback = Callable[[int, Tensor], None]


class CausalGenerator(Protocol):
    def forward_cached(
        self, x: Tensor, timestep: Tensor, context: Tensor, kv_cache: KVCache, start_frame: int, commit: bool
    ) -> Tensor:
        """Flow v for one block x [B, f, C, H, W] (timestep [B, f]) against the cached frames."""
        ...


@dataclass
class RolloutOutput:
    latents: Tensor  # [B, F, C, H, W]; in training, differentiable through the exit steps
    exit_timesteps: Tensor  # [B, F] float32: the timestep each frame exited at (0 for a given first frame)
    nfe: int  # generator forwards, context passes included


# --------------------------------------------------------------------------------------------- exit steps
def draw_exit_steps(
    num_blocks: int,
    num_steps: int,
    same_step_across_blocks: bool,
    last_step_only: bool,
    generator: Optional[torch.Generator] = None,
) -> list[int]:
    """One exit step index per block; rank 0's draw is broadcast so every rank rolls out alike.

    Every rank draws (and discards all but rank 0's), so the ranks of a sequence group, seeded alike, stay alike."""
    if last_step_only:
        return [num_steps - 1] * num_blocks
    with real_values():  # Python values even when a memory estimate runs the step on fake tensors
        drawn = torch.randint(0, num_steps, (num_blocks,), generator=generator).tolist()
    steps = [drawn[0]] * num_blocks if same_step_across_blocks else drawn
    return broadcast_int_list(steps)


def rollout_block_sizes(geometry: Geometry, num_frames: int) -> tuple[int, ...]:
    """Block sizes for `num_frames` latent frames: the geometry's layout, extended in whole blocks for long videos."""
    if num_frames == geometry.num_latent_frames:
        return tuple(geometry.block_sizes)
    # A one-frame head block that is not the regular block size is the independent first frame.
    has_head = geometry.block_sizes[0] != geometry.num_frame_per_block
    head = tuple(geometry.block_sizes[:1]) if has_head else ()
    rest = num_frames - sum(head)
    if rest <= 0 or rest % geometry.num_frame_per_block:
        raise UserError(
            f"{num_frames} latent frames are not {'one first frame plus ' if head else ''}whole blocks of "
            f"{geometry.num_frame_per_block} frames: pick a frame count that fits video.num_frame_per_block"
        )
    return head + (geometry.num_frame_per_block,) * (rest // geometry.num_frame_per_block)


# --------------------------------------------------------------------------------------------- the rollout
class BlockRollout:
    """Block-wise few-step rollout with a KV cache. `timesteps` [S] are the student's (already warped) steps."""

    def __init__(
        self,
        geometry: Geometry,
        timesteps: Tensor,
        context_noise: int,
        *,
        num_train_timesteps: int = FlowConfig.num_train_timesteps,
        cache_dtype: Optional[torch.dtype] = None,
    ):
        if timesteps.ndim != 1 or timesteps.numel() == 0:
            raise UserError(f"student timesteps must be a non-empty 1-D list, got shape {list(timesteps.shape)}")
        if not 0 <= context_noise < num_train_timesteps:
            raise UserError(f"rollout.context_noise is {context_noise}: expected 0..{num_train_timesteps - 1}")
        self.geometry = geometry
        self.timesteps = timesteps.to(torch.float32).cpu()
        self.timestep_values = self.timesteps.tolist()  # Python floats for the per-step loop
        self.context_noise = context_noise
        self.num_train_timesteps = num_train_timesteps
        # dtype of a KV cache the rollout makes itself (None: the noise's). bf16 under mixed precision: the keys and
        # values reach attention in bf16 either way, so an fp32 cache only doubles its memory (12.7 -> 6.3 GiB at 5B).
        self.cache_dtype = cache_dtype

    @classmethod
    def from_config(cls, config: Config, geometry: Geometry) -> "BlockRollout":
        """The recipe's student rollout: its warped few-step list and context noise."""
        from pipeline.flow_matching import few_step_timesteps

        timesteps = few_step_timesteps(
            config.rollout.denoising_step_list,
            config.rollout.warp_denoising_step,
            config.flow.timestep_shift,
            config.flow.num_train_timesteps,
        )
        return cls(geometry, timesteps, config.rollout.context_noise, num_train_timesteps=config.flow.num_train_timesteps,
                   cache_dtype=torch.bfloat16 if config.train.mixed_precision else None)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    def block_sizes(self, num_frames: int) -> tuple[int, ...]:
        return rollout_block_sizes(self.geometry, num_frames)

    def _check(self, noise: Tensor, context: Tensor, blocks: Sequence[int], exit_steps: list[int],
               first_frame: Optional[Tensor], given_blocks: Optional[Tensor]) -> None:
        g = self.geometry
        expected = (g.latent_channels, g.latent_height, g.latent_width)
        if noise.ndim != 5 or tuple(noise.shape[2:]) != expected:
            raise UserError(f"rollout noise must be [B, F, {', '.join(map(str, expected))}], got {list(noise.shape)}")
        if context.ndim != 3 or context.shape[0] != noise.shape[0]:
            raise UserError(f"rollout text context must be [B={noise.shape[0]}, L, D], got {list(context.shape)}")
        if len(exit_steps) != len(blocks) or not all(0 <= s < self.num_steps for s in exit_steps):
            raise UserError(
                f"exit_steps {exit_steps} must hold one step index in 0..{self.num_steps - 1} per block ({len(blocks)})"
            )
        if first_frame is not None and tuple(first_frame.shape) != (noise.shape[0], 1, *noise.shape[2:]):
            raise UserError(f"first_frame must be [B, 1, C, H, W] = {[noise.shape[0], 1, *noise.shape[2:]]}, "
                            f"got {list(first_frame.shape)}")
        if given_blocks is not None:
            leading = [sum(blocks[:n]) for n in range(1, len(blocks))]  # whole leading blocks, at least one generated
            if first_frame is not None:
                raise UserError("give either first_frame (TI2V) or given_blocks (video extension), not both")
            if given_blocks.ndim != 5 or given_blocks.shape[0] != noise.shape[0] or given_blocks.shape[2:] != noise.shape[2:] \
                    or given_blocks.shape[1] not in leading:
                raise UserError(f"given_blocks must be [B={noise.shape[0]}, n, {', '.join(map(str, noise.shape[2:]))}] with "
                                f"n the frames of whole leading blocks, one of {leading}; got {list(given_blocks.shape)}")

    def run(
        self,
        generator: CausalGenerator,
        noise: Tensor,
        context: Tensor,
        *,
        exit_steps: Optional[list[int]] = None,
        grad_last_frames: Optional[int] = None,
        first_frame: Optional[Tensor] = None,
        first_frame_rows: Optional[Tensor] = None,
        given_blocks: Optional[Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        on_block: Optional[BlockCallback] = None,
        noise_generator: Optional[torch.Generator] = None,
        prompt_switch: Optional[PromptSwitchHook] = None,
        on_pass: Optional[PassHook] = None,
        keep_last_frames: Optional[int] = None,
    ) -> RolloutOutput:
        """Roll out noise [B, F, C, H, W] into clean latents, block by block.

        exit_steps: one step index per block (training); None is inference (every step, no gradient).
        grad_last_frames: only blocks starting in the last N frames keep gradient (long rollouts).
        first_frame [B, 1, C, H, W]: TI2V's clean first latent, written into the cache at t = 0.
        first_frame_rows [B] bool: the rows that hold it (a batch of both tasks); None: every row.
        given_blocks [B, n, C, H, W]: clean latents of the first whole blocks (video extension), written into the
            cache at t = 0 and returned as they are; the rollout makes the frames after them.
        kv_cache: storage to reuse (reset here); a new one sized by the geometry otherwise.
        on_block(index, latents [B, f, C, H, W]) is called as soon as a block is final (streaming decode).
        noise_generator: RNG of the fresh re-noising noise (default: the global one).
        prompt_switch(index) -> PromptSwitch or None, asked before every block after the first (inference, and long
            tuning's switches).
        on_pass(ForwardPass) -> a context manager entered around each generator forward, told which pass it is
            (inference's timing and memory phases).
        keep_last_frames: return only the blocks within the last N frames (latents and exit timesteps); the others
            are dropped as soon as their context pass is written (long tuning: memory stays one window's).
        """
        # 1. Validate and plan the blocks; inference exits every block at the last step, without gradient.
        if noise.ndim != 5:
            raise UserError(f"rollout noise must be [B, F, C, H, W], got {list(noise.shape)}")
        num_frames = noise.shape[1]
        blocks = self.block_sizes(num_frames)
        inference = exit_steps is None
        if exit_steps is None:
            exit_steps = [self.num_steps - 1] * len(blocks)
        self._check(noise, context, blocks, exit_steps, first_frame, given_blocks)
        held_rows = self._held_rows(noise, blocks, first_frame, first_frame_rows, given_blocks)
        grad_from_frame = 0 if grad_last_frames is None else max(num_frames - grad_last_frames, 0)
        if kv_cache is None:
            kv_cache = KVCache.from_geometry(self.geometry, noise.shape[0], dtype=self.cache_dtype or noise.dtype,
                                             device=noise.device, sp_size=sp_size_of(generator))
        kv_cache.reset(num_frames=num_frames)
        shared = _Forward(generator, context, kv_cache, noise_generator, on_pass)
        keep_from = 0 if keep_last_frames is None else max(num_frames - keep_last_frames, 0)
        with torch.no_grad() if inference else contextlib.nullcontext():
            return self._roll(shared, noise, blocks, exit_steps, grad_from_frame, first_frame, on_block, prompt_switch,
                              given_blocks, keep_from, held_rows)

    @staticmethod
    def _held_rows(noise: Tensor, blocks: Sequence[int], first_frame: Optional[Tensor], rows: Optional[Tensor],
                   given_blocks: Optional[Tensor]) -> Optional[Tensor]:
        """A batch of both tasks: [B] float, 1 in the rows that hold the TI2V first frame, 0 in the others. None when
        every row holds the frames given to it (TI2V frame, given blocks): the plain path, also on fake tensors."""
        batch = noise.shape[0]
        if rows is None:
            return None
        if first_frame is None:
            raise UserError("first_frame_rows names the rows that hold a first frame: give first_frame too")
        if rows.shape != (batch,) or rows.dtype != torch.bool:
            raise UserError(f"first_frame_rows must be a [B={batch}] bool tensor, got {rows.dtype} {list(rows.shape)}")
        if blocks[0] == 1 and not bool(rows.all()):
            raise UserError("rollout.independent_first_frame makes the first frame a block of its own: every row of "
                            "the batch must hold it (a batch of both tasks needs independent_first_frame false)")
        return None if bool(rows.all()) else rows.to(device=noise.device, dtype=torch.float32)

    def _roll(
        self,
        shared: "_Forward",
        noise: Tensor,
        blocks: Sequence[int],
        exit_steps: list[int],
        grad_from_frame: int,
        first_frame: Optional[Tensor],
        on_block: Optional[BlockCallback],
        prompt_switch: Optional[PromptSwitchHook] = None,
        given_blocks: Optional[Tensor] = None,
        keep_from: int = 0,
        held_rows: Optional[Tensor] = None,
    ) -> RolloutOutput:
        batch, num_frames = noise.shape[:2]
        given_frames = 0 if given_blocks is None else given_blocks.shape[1]
        clean_frames = 1 if first_frame is not None else given_frames  # frames held clean at t = 0
        grad_allowed = torch.is_grad_enabled()  # an outer no_grad (e.g. the critic's rollout) wins
        timesteps = self.timesteps.to(noise.device)
        outputs: list[Tensor] = []
        cached: dict[int, Tensor] = {}  # frame -> its detached latent, for the frames the cache holds (a recache's input)
        exit_timesteps = torch.zeros(batch, num_frames, dtype=torch.float32, device=noise.device)
        nfe = 0

        # 2. Block by block, each attending to the cached frames before it.
        start = 0
        for index, size in enumerate(blocks):
            frames = slice(start, start + size)
            # 2b. A new prompt from this block on; the cached frames re-encoded under it when asked.
            switch = prompt_switch(index) if prompt_switch is not None and index > 0 else None
            if switch is not None:
                shared.context = switch.context
                if switch.recache:
                    nfe += self._recache(shared, cached, blocks[:index], clean_frames, held_rows, index)
            # 3. Frames held clean at t = 0 (the TI2V first frame): mask 0 there, 1 elsewhere.
            holds_first_frame = first_frame is not None and start == 0
            mask = torch.ones(batch, size, dtype=torch.float32, device=noise.device)
            if holds_first_frame:
                mask[:, 0] = 0.0 if held_rows is None else 1.0 - held_rows  # 0 in the rows that hold it
            if start + size <= given_frames:
                mask.zero_()
                block = given_blocks[:, frames].to(noise.dtype)  # a given block (video extension): nothing to denoise
            elif holds_first_frame and size == 1:
                block = first_frame.to(noise.dtype)  # independent first frame: nothing to denoise
            else:
                keep_grad = grad_allowed and start >= grad_from_frame
                held = first_frame if holds_first_frame else None
                block = self._denoise_block(shared, noise[:, frames], start, mask, exit_steps[index], keep_grad, held,
                                            index, held_rows)
                nfe += exit_steps[index] + 1
                exit_timesteps[:, frames] = timesteps[exit_steps[index]] * mask
            if start >= keep_from:  # blocks before it are history: their keys are in the cache, their latents go
                outputs.append(block)
            if on_block is not None:
                on_block(index, block)
            # 4. Context pass: write the finished block's K/V into the cache (no gradient, detached).
            self._context_pass(shared, block, start, mask, ForwardPass("context", index))
            nfe += 1
            if prompt_switch is not None:  # what a later recache re-encodes: the frames the cache now holds
                cached.update((start + f, block[:, f:f + 1].detach()) for f in range(size))
                cached = {frame: cached[frame] for frame in shared.kv_cache.slot_frames}
            start += size
        return RolloutOutput(latents=torch.cat(outputs, dim=1), exit_timesteps=exit_timesteps[:, keep_from:], nfe=nfe)

    def _context_pass(self, shared: "_Forward", block: Tensor, start: int, mask: Tensor, which: ForwardPass) -> None:
        """Write a finished block's K/V into the cache at the context timestep (no gradient, detached)."""
        with torch.no_grad():
            context_t = self.context_noise * mask
            block_in = block.detach()
            if self.context_noise > 0:
                block_in = add_noise(block_in, shared.fresh_noise(block_in), context_t, self.num_train_timesteps)
            shared.flow(block_in, context_t, start, commit=True, which=which)

    def _recache(self, shared: "_Forward", held: dict[int, Tensor], blocks: Sequence[int], clean_frames: int,
                 held_rows: Optional[Tensor], before_block: int) -> int:
        """Re-run the context passes of the frames the cache holds (`held`: frame -> latent) under shared.context;
        returns the forwards. The frames kept (sink and recent window) are recommitted at their own positions, per
        original block.
        """
        shared.kv_cache.reset()
        passes, start = 0, 0
        for size in blocks:
            frames = [f for f in range(start, start + size) if f in held]
            if frames:
                first, count = frames[0], len(frames)
                latents = torch.cat([held[f] for f in frames], dim=1)
                mask = torch.ones(latents.shape[0], count, dtype=torch.float32, device=latents.device)
                # given frames (TI2V frame, given blocks) stay clean in the rows that hold them
                mask[:, : max(0, clean_frames - first)] = 0.0 if held_rows is None else 1.0 - held_rows[:, None]
                self._context_pass(shared, latents, first, mask, ForwardPass("recache", before_block))
                passes += 1
            start += size
        return passes

    def _denoise_block(
        self,
        shared: "_Forward",
        block_noise: Tensor,
        start: int,
        mask: Tensor,
        exit_step: int,
        keep_grad: bool,
        clean_head: Optional[Tensor],
        block_index: int,
        held_rows: Optional[Tensor] = None,
    ) -> Tensor:
        """Steps 0..exit_step of one block; only the exit step may keep gradient. Returns the block's x0.

        clean_head [B, 1, ...]: frame 0, held clean in every row, or in the rows `held_rows` [B] (1: held) marks."""

        def hold(frames: Tensor) -> Tensor:  # frame 0 replaced by the clean head in the rows that hold it
            head = clean_head.to(frames.dtype)
            if held_rows is not None:
                head = torch.where(held_rows.bool()[:, None, None, None, None], head, frames[:, :1])
            return torch.cat([head, frames[:, 1:]], dim=1)

        x = block_noise if clean_head is None else hold(block_noise)
        for step in range(exit_step + 1):
            step_t = self.timestep_values[step] * mask
            with torch.set_grad_enabled(keep_grad and step == exit_step):
                flow = shared.flow(x, step_t, start, commit=False, which=ForwardPass("step", block_index, step))
                x0 = predict_x0(x, flow, step_t, self.num_train_timesteps)
                if clean_head is not None:
                    x0 = hold(x0)
            if step == exit_step:
                return x0
            # Re-noise to the next step's timestep with fresh noise (the held frame stays clean: mask 0).
            next_t = self.timestep_values[step + 1] * mask
            x = add_noise(x0, shared.fresh_noise(x0), next_t, self.num_train_timesteps)
        raise AssertionError("unreachable: the loop returns at the exit step")


@dataclass
class PromptSwitch:
    """A new text context from a given block on (interactive streaming).

    recache: re-encode the frames the KV cache holds (sink and recent window) under the new prompt before the
    block, so the next blocks continue the scene under the new text; false: a plain switch (the cached keys keep
    the old prompt's cross-attention imprint).
    """

    context: Tensor  # [B, L, D]
    recache: bool = True


PromptSwitchHook = Callable[[int], Optional[PromptSwitch]]


@dataclass(frozen=True)
class ForwardPass:
    """Which generator forward of a rollout is running: a denoising step of a block, the context pass that writes a
    finished block into the cache, or a recache of held frames under a switched prompt (before block `block`)."""

    kind: str  # "step", "context" or "recache"
    block: int
    step: int = 0  # the denoising step's index (kind "step")


PassHook = Callable[[ForwardPass], contextlib.AbstractContextManager]  # entered around each generator forward


@dataclass
class _Forward:
    """What every generator forward of one rollout shares: the model, the text, the cache and the noise RNG."""

    generator: CausalGenerator
    context: Tensor
    kv_cache: KVCache
    noise_generator: Optional[torch.Generator]
    on_pass: Optional[PassHook] = None

    def flow(self, x: Tensor, timestep: Tensor, start_frame: int, commit: bool, which: ForwardPass) -> Tensor:
        around = self.on_pass(which) if self.on_pass is not None else contextlib.nullcontext()
        with around:
            return self.generator.forward_cached(x, timestep, self.context, self.kv_cache, start_frame, commit=commit)

    def fresh_noise(self, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=self.noise_generator, dtype=like.dtype, device=like.device)
