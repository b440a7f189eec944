"""Causal streaming inference: the training rollout run for a prompt, decoded block by block.

`CausalInferencePipeline` loads the text encoder, VAE and causal generator once; `generate` is then
called per prompt (what the CLI, a notebook or a server calls). Each call:
  1. encodes the prompt (and, for TI2V, the first-frame image into a clean latent);
  2. runs `pipeline.rollout.BlockRollout` (the same block-wise few-step KV-cache routine training
     uses), all steps, no gradient;
  3. decodes each finished block with the VAE's streaming decoder (or the light decoder,
     inference.decoder: light) from the rollout's `on_block` callback, so the first pixels exist after the
     first block; with inference.overlap_decode, block k decodes on a second CUDA stream (a worker thread)
     while block k+1 denoises, the same frames either way.

Frame counts: `num_output_frames` counts pixel frames (like `video.num_frames`); any count from 1 up is made
as the fewest whole latent frames in whole blocks that hold it (utils.geometry.frames_to_make: 40 frames are
made as 45), and the first `num_output_frames` are kept, streamed and returned. Past the training length the
KV cache rolls: a local window of `rollout.local_attn_size` frames (or the training video's latent frames when
that is -1, the window the model was trained on) with `rollout.sink_size` sink frames kept at the start.
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from pipeline.components import (
    build_dit,
    build_light_decoder,
    build_text_encoder,
    build_vae,
    check_light_decoder,
    compile_blocks,
    overlap_decode_enabled,
    text_encoder_device,
)
from pipeline.flow_matching import few_step_timesteps
from pipeline.rollout import ForwardPass
from utils.config import Config
from utils.errors import UserError
from utils.geometry import Geometry, ResolvedRecipe, inference_geometry
from utils.memory import MemoryProfiler, current_bytes, lifetime_peak_bytes
from utils.temporal import temporal_report
from wan.loading import resolve_generator_weights

PixelCallback = Callable[[int, Tensor], None]  # (block index, pixels [1, t, 3, H, W] in [-1, 1], float32 on the CPU)


# --------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class CheckedRequest:
    """A request checked once, before any work, into what generation needs; it travels from the check (the CLI
    before loading, the server at admission) to `generate`, which checks nothing again."""

    geometry: Geometry  # of the frames made: whole blocks
    kept: int  # pixel frames kept, streamed and returned (the first `kept` of those made)
    image: Optional[str]  # the first-frame image as named (for the record)
    first_frame: Optional[Tensor]  # [3, H, W] in [-1, 1]: the image, read, resized and cropped once


def check_request(config: Config, resolved: ResolvedRecipe, image: str | Path | None = None,
                  num_output_frames: Optional[int] = None) -> CheckedRequest:
    """Everything about a request that can be wrong (frame count, image), checked without any model loaded."""
    geometry = inference_geometry(config, resolved, num_output_frames)
    pixels = check_image(image, learnt_tasks(config), geometry)
    return CheckedRequest(geometry, num_output_frames or config.video.num_frames,
                          None if image is None else str(image), pixels)


def learnt_tasks(config: Config) -> tuple[str, ...]:
    """What the recipe's student learnt: text-to-video ("t2v"), image-to-video ("ti2v"), or both (video.task ti2v
    with train.image_share < 1: a share of its samples had no image)."""
    if config.video.task != "ti2v":
        return ("t2v",)
    return ("t2v", "ti2v") if config.train.image_share < 1 else ("ti2v",)


def check_image(image: str | Path | None, tasks: tuple[str, ...], geometry: Geometry) -> Optional[Tensor]:
    """A student does what it learnt: an image-to-video student needs a readable first-frame image, a text-to-video
    one takes none (started from an image it would run a conditioning it never trained on), one of both tasks
    either. Returns the image's pixels [3, H, W] in [-1, 1] at the output size (None without an image)."""
    from utils.datasets import load_image

    if image is None:
        if "t2v" not in tasks:
            raise UserError("video.task is ti2v: give the first frame with --image")
        return None
    pixels = load_image(image, geometry.height, geometry.width)  # a bad file fails here, before work
    if "ti2v" not in tasks:
        raise UserError("this student learnt text-to-video only (its recipe's video.task is t2v), so it does not "
                        "start from an image: leave --image out, or distil an image-to-video student (video.task: "
                        "ti2v)")
    return pixels


# --------------------------------------------------------------------------------------------- result
@dataclass
class InferenceResult:
    prompt: str
    task: str  # t2v or ti2v
    seed: int
    image: Optional[str]
    video: Tensor  # [T, 3, H, W] float32 in [-1, 1], on the CPU
    latents: Tensor  # [1, F, C, h, w] the rollout's clean latents
    geometry: Geometry
    nfe: int  # generator forwards (denoising steps + context passes)
    timings: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    temporal: dict = field(default_factory=dict)  # utils.temporal report of the pixels (seams, flicker, drift)
    prompt_switches: list = field(default_factory=list)  # [{"block", "prompt", "recache"}] in the order taken


# --------------------------------------------------------------------------------------------- pipeline
@dataclass
class InferenceComponents:
    """Prebuilt models: anything with `encode(prompts) -> [B, L, D]`, the VAE wrapper, the causal generator."""

    text_encoder: object
    vae: torch.nn.Module
    generator: torch.nn.Module
    light_decoder: Optional[torch.nn.Module] = None  # decodes instead of the VAE when given


class CausalInferencePipeline:
    """Loads once, generates many times."""

    def __init__(
        self,
        config: Config,
        resolved: ResolvedRecipe,
        device: torch.device | str,
        dtype: torch.dtype,
        checkpoint: str | Path | None = None,
        use_ema: bool = False,
        profiler: Optional[MemoryProfiler] = None,
        components: Optional[InferenceComponents] = None,
    ):
        """`components`: models already built (a server holding them, benchmarks); then nothing is loaded."""

        self.config, self.resolved = config, resolved
        self.device, self.dtype = torch.device(device), dtype
        self.profiler = profiler or MemoryProfiler(enabled=False, device=self.device)
        self.weights = resolve_generator_weights(checkpoint, use_ema, resolved.generator.arch)
        if components is None:
            check_light_decoder(config, resolved.vae)  # a decoder for other latents: refused before any load
        self.overlap_decode = overlap_decode_enabled(config, self.device)
        self.timesteps = few_step_timesteps(
            config.rollout.denoising_step_list, config.rollout.warp_denoising_step, config.flow.timestep_shift,
            config.flow.num_train_timesteps,
        )
        # 1. Components, each measured: text encoder, VAE, generator.
        start = self._clock()
        if components is not None:
            self.text_encoder, self.vae, self.generator = components.text_encoder, components.vae, components.generator
            self.light_decoder = components.light_decoder
            self.load_s, self.base_memory_bytes = 0.0, current_bytes(self.device)
            self.compiled = compile_blocks(self.generator, config.inference.compile, config.inference.compile_mode, self.device)
            return
        with self.profiler.component("text_encoder"):
            self.text_encoder = build_text_encoder(
                config, device=text_encoder_device(config, self.device), dtype=dtype, seed=config.train.seed)
        with self.profiler.component("vae"):
            self.vae = build_vae(resolved.vae, device=self.device, dtype=dtype)  # decodes, and encodes first frames
            self.light_decoder = build_light_decoder(config, resolved.vae, device=self.device, dtype=dtype)
        with self.profiler.component("generator"):
            self.generator = self._load_generator().eval().requires_grad_(False)
        # 2. Compiled blocks (inference.compile); the first generation pays the compilation.
        self.compiled = compile_blocks(self.generator, config.inference.compile, config.inference.compile_mode, self.device)
        self.load_s = self._clock() - start
        self.base_memory_bytes = current_bytes(self.device)

    def _load_generator(self) -> torch.nn.Module:
        from wan.modules.causal_model import CausalWanModel

        backend = self.config.attention_backend
        if self.weights.path is None:
            return build_dit(self.resolved.generator, causal=True, attention_backend=backend, device=self.device,
                             dtype=self.dtype, seed=self.config.train.seed)
        arch = None if self.weights.path.is_dir() else self.weights.arch
        return CausalWanModel.from_pretrained(str(self.weights.path), dtype=self.dtype, device=self.device,
                                              attention_backend=backend, arch=arch)

    def _clock(self) -> float:
        """Wall time once the calling thread's CUDA stream is idle (not the whole device: decoding beside
        denoising runs on a stream of its own, and each side times only its own work)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter()

    @property
    def decoder_name(self) -> str:
        return "light" if self.light_decoder is not None else "full"

    def stream_decoder(self):
        """A per-video decoder with `decode(block latents) -> pixels`: the light decoder's, or the VAE's."""
        return self.light_decoder.stream() if self.light_decoder is not None else self.vae.stream_decoder()

    # ----------------------------------------------------------------------------------------- per request
    @property
    def takes_image(self) -> bool:
        """Whether requests may give a first frame: the student learnt image-to-video."""
        return "ti2v" in learnt_tasks(self.config)

    @property
    def needs_image(self) -> bool:
        """Whether requests must give a first frame: the student learnt image-to-video only."""
        return "t2v" not in learnt_tasks(self.config)

    def check_request(self, image: str | Path | None = None, num_output_frames: Optional[int] = None) -> CheckedRequest:
        """Everything about a request that can be wrong, checked before any work (see `check_request`)."""
        return check_request(self.config, self.resolved, image, num_output_frames)

    def encode_first_frame(self, pixels: Tensor) -> Tensor:
        """The first-frame pixels [3, H, W] (already at the output size), encoded: a clean latent [1, 1, C, h, w]."""
        video = pixels[None, :, None].to(self.device, self.vae.dtype)  # [1, 3, T=1, H, W]
        return self.vae.encode_to_latent(video).float()

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        *,
        image: str | Path | None = None,
        num_output_frames: Optional[int] = None,
        seed: int = 0,
        on_block: Optional[PixelCallback] = None,
        prompt_switch: Optional[Callable[[int], Optional[tuple[str, bool]]]] = None,
        request: Optional[CheckedRequest] = None,
    ) -> InferenceResult:
        """One video for `prompt`; `on_block(index, pixels)` sees each block's pixels as soon as they exist.

        `request`: the image and frame count as already checked (check_request); without it they are checked here.

        prompt_switch(index) -> (new prompt, recache) or None is asked before each block after the first: the
        new prompt applies from that block on (streaming); every switch taken is listed in the result.
        """
        from pipeline.rollout import BlockRollout, PromptSwitch
        from wan.modules.kv_cache import KVCache
        from wan.modules.sequence_parallel import sp_size_of

        if request is None:
            request = self.check_request(image, num_output_frames)
        geometry, kept = request.geometry, request.kept  # the frames made are whole blocks; `kept` of them are kept
        task = "t2v" if request.first_frame is None else "ti2v"  # check_request: as the student learnt
        profiler = self.profiler
        if self.device.type == "cuda" and not profiler.enabled:
            torch.cuda.reset_peak_memory_stats(self.device)
        timings: dict = {"load_s": self.load_s}
        start = self._clock()
        with profiler.phase("generate"):
            # 1. Text (and first frame).
            with profiler.phase("text_encode"):
                context = self.text_encoder.encode([prompt]).to(self.device, self.dtype)
                first_frame = self.encode_first_frame(request.first_frame) if request.first_frame is not None else None
            timings["text_encode_s"] = self._clock() - start

            # 2. Noise from a CPU generator (the same seed gives the same start on any device); the rollout's
            #    fresh re-noising draws from its own seeded generator, so the caller's RNG is left alone.
            noise = torch.randn(
                (1, *geometry.latent_shape[1:]), generator=torch.Generator().manual_seed(seed), dtype=torch.float32
            ).to(self.device)
            renoise = torch.Generator(self.device).manual_seed(seed)
            kv_cache = KVCache.from_geometry(geometry, batch_size=1, dtype=self.dtype, device=self.device,
                                             sp_size=sp_size_of(self.generator))
            rollout = BlockRollout(geometry, self.timesteps.to(self.device), self.config.rollout.context_noise)

            # 3. Rollout with streaming decode of each finished block (and prompt switches, when asked).
            stream = _StreamingDecode(self, profiler, start, on_block, kept)
            switches: list[dict] = []

            def switch_hook(index: int) -> Optional[PromptSwitch]:
                asked = prompt_switch(index) if prompt_switch is not None else None
                if asked is None:
                    return None
                new_prompt, recache = asked
                switches.append({"block": index, "prompt": new_prompt, "recache": bool(recache)})
                return PromptSwitch(self.text_encoder.encode([new_prompt]).to(self.device, self.dtype), bool(recache))

            with profiler.phase("rollout"), stream:
                output = rollout.run(
                    self.generator, noise, context, first_frame=first_frame, kv_cache=kv_cache,
                    on_block=stream.on_block, noise_generator=renoise, prompt_switch=switch_hook, on_pass=stream.on_pass,
                )
                stream.finish()  # the last block's decode, when it runs beside
            made = torch.cat(stream.pixels, dim=1)[0]
            video = made[:kept]
        total_s = self._clock() - start
        if not bool(torch.isfinite(output.latents).all()):
            raise UserError(f"the generator produced non-finite latents (NaN/Inf) for {prompt[:40]!r}: its weights "
                            f"({self.weights.path or 'the recipe generator'}) are damaged or diverged; no video written")

        # 4. Timings and memory.
        timings.update(stream.timings())
        timings.update(total_s=total_s, fps=video.shape[0] / total_s)
        generate_events = [e for e in profiler.events if e["name"] == "generate"]
        peak = generate_events[-1]["peak_bytes"] if generate_events else lifetime_peak_bytes(self.device)
        memory = {"backend": profiler.backend, "base_bytes": self.base_memory_bytes, "peak_bytes": peak}
        # 5. Temporal quality of the frames made (whole blocks); drift segments have the training length, so a
        #    longer video compares its later stretches with the first.
        temporal = temporal_report(made, geometry.block_sizes, geometry.vae_stride[0],
                                   segment_frames=self.resolved.geometry.num_pixel_frames)
        return InferenceResult(
            prompt=prompt, task=task, seed=seed, image=request.image, video=video,
            latents=output.latents.float().cpu(), geometry=geometry, nfe=output.nfe, timings=timings, memory=memory,
            temporal=temporal, prompt_switches=switches,
        )


class _StreamingDecode:
    """The rollout's hooks: decode each finished block, time denoising and decoding apart, name memory phases.

    The rollout emits a block (on_block) before its context pass, so each block's context pass is
    measured on its own (the rollout says which pass runs: on_pass) and booked to that block, not to the next one.
    With overlap (pipe.overlap_decode, not while profiling memory phases), the first block is decoded at once
    and each later one is handed to one worker thread that decodes the blocks in order, on its own CUDA
    stream after the block's latents are ready, while the rollout goes on; a failure there (a stopped
    stream, say) is raised at the next generator forward. Use it as a context manager: leaving it waits for
    the worker.
    """

    def __init__(self, pipe: CausalInferencePipeline, profiler: MemoryProfiler, start: float,
                 on_pixels: Optional[PixelCallback], kept: int):
        self.pipe, self.profiler, self.start, self.on_pixels = pipe, profiler, start, on_pixels
        self.left_to_show = kept  # on_pixels sees the first `kept` frames; the last block's extra ones are not shown
        self.decoder = pipe.stream_decoder()
        self.pixels: list[Tensor] = []
        self.until_block_s: list[float] = []  # from the previous decode's end to this block's emission
        self.context_pass_s: list[float] = []  # the context pass of each emitted block
        self.decode_s = 0.0
        self.first_block_latency_s: Optional[float] = None
        overlap = pipe.overlap_decode and not profiler.enabled
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") if overlap else None
        self._side = torch.cuda.Stream(pipe.device) if overlap and pipe.device.type == "cuda" else None
        self._pending: list[Future] = []
        self._mark = pipe._clock()

    def __enter__(self) -> "_StreamingDecode":
        return self

    def __exit__(self, *exc) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)

    def on_block(self, block_index: int, latents: Tensor) -> None:
        # 1. The block's denoising ends here; its decode is timed apart.
        now = self.pipe._clock()
        self.until_block_s.append(now - self._mark)
        # 2. Decode it here (the first block always: its pixels are the stream's latency, and a decode beside the
        #    next block's denoising would share the device with it), or hand it to the worker.
        if self._worker is None or len(self.until_block_s) == 1:
            with self.profiler.phase(f"block_{block_index}/decode"):
                self._decode(block_index, latents)
        else:
            self._raise_failure(wait=False)
            ready = None
            if self._side is not None:
                ready = torch.cuda.Event()
                ready.record()  # on the rollout's stream: the block's latents are final there
            self._pending.append(self._worker.submit(self._decode_beside, block_index, latents, ready))
        self._mark = self.pipe._clock()

    def finish(self) -> None:
        """Wait for every block handed to the worker; raise the first failure."""
        if self._worker is not None:
            self._raise_failure(wait=True)

    def _raise_failure(self, wait: bool) -> None:
        """Raise a finished decode's failure (every decode's, waiting, when `wait`); forget the ones done well."""
        for future in self._pending:
            if wait or future.done():
                future.result()
        self._pending = [future for future in self._pending if not future.done()]

    def _decode_beside(self, block_index: int, latents: Tensor, ready: Optional["torch.cuda.Event"]) -> None:
        with torch.no_grad():  # grad mode is per thread
            if self._side is None:
                return self._decode(block_index, latents)
            with torch.cuda.stream(self._side):
                self._side.wait_event(ready)
                latents.record_stream(self._side)  # the allocator must not reuse it before this stream is done
                return self._decode(block_index, latents)

    def _decode(self, block_index: int, latents: Tensor) -> None:
        """Decode one block on the calling thread's stream; the first decoded pixels mark the first-block latency."""
        clock = self.pipe._clock
        started = clock()
        pixels = self.decoder.decode(latents)
        done = clock()
        self.decode_s += done - started
        if self.first_block_latency_s is None:
            self.first_block_latency_s = done - self.start
        pixels = pixels.float().cpu()  # the block's one copy to the host, shared by the result and the callback
        self.pixels.append(pixels)
        shown = pixels[:, :self.left_to_show]
        self.left_to_show -= shown.shape[1]
        if self.on_pixels is not None and shown.shape[1]:
            self.on_pixels(block_index, shown)

    @contextlib.contextmanager
    def on_pass(self, which: ForwardPass) -> Iterator[None]:
        """Around each generator forward: a named memory phase; context passes timed and booked to their block."""
        if self._pending:  # a decode beside failed (a stopped stream): stop at this step, not at the next block
            self._raise_failure(wait=False)
        name = {"step": f"block_{which.block}/step_{which.step}", "context": f"block_{which.block}/context_pass",
                "recache": f"block_{which.block}/recache"}[which.kind]
        start = self.pipe._clock() if which.kind == "context" else 0.0
        with self.profiler.phase(name):
            yield
        if which.kind == "context":
            self.context_pass_s.append(self.pipe._clock() - start)

    def timings(self) -> dict:
        # until_block[i] holds block i's steps plus block i-1's context pass: move that one back.
        per_block = [
            until - (self.context_pass_s[i - 1] if i > 0 else 0.0) + self.context_pass_s[i]
            for i, until in enumerate(self.until_block_s)
        ]
        return {
            "per_block_denoise_s": per_block,
            "denoise_s": sum(per_block),
            "vae_decode_s": self.decode_s,
            "first_block_latency_s": self.first_block_latency_s,
        }
