"""Generation jobs of the streaming service: a bounded queue, a fixed number of concurrent streams, and events
for the listeners of each job (its WebSocket), produced as each block is decoded.

A job runs CausalInferencePipeline.generate in a worker thread, with its own KV cache and decoder state (made
per call), so sessions never share state; the model weights are shared read-only. A stop (the client's, or
its disconnect) takes effect before the next block; a queued job that is stopped leaves the queue at once.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from utils.errors import UserError

if TYPE_CHECKING:
    from pipeline.causal_inference import CheckedRequest

log = logging.getLogger("serve")

MAX_PROMPT_CHARS = 2000
MAX_IMAGE_BYTES = 20 << 20  # base64-decoded first-frame image
FINISHED_JOBS_KEPT = 200  # finished jobs whose status and files stay reachable


class GenerationStopped(Exception):
    """Raised inside the generation thread when its job was stopped."""


class ServiceBusy(Exception):
    """The queue is full."""


@dataclass
class JobRequest:
    prompt: str
    seed: int = 0
    num_frames: Optional[int] = None
    image_path: Optional[Path] = None  # a temporary file holding the decoded first-frame image
    checked: Optional[CheckedRequest] = None  # frame count and image as checked at admission; generation reuses it


@dataclass
class Job:
    id: str
    request: JobRequest
    status: str = "queued"  # queued, running, done, stopped, failed
    error: Optional[str] = None
    blocks_done: int = 0
    num_blocks: int = 0
    frames_done: int = 0
    folder: Optional[Path] = None
    record: Optional[dict] = None
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: Optional[float] = None
    first_block_s: Optional[float] = None  # from submission to the first decoded block (queue wait included)
    stop: threading.Event = field(default_factory=threading.Event)
    switches: collections.deque = field(default_factory=collections.deque)  # (prompt, recache) asked by the client
    listeners: list = field(default_factory=list)  # (event loop, asyncio.Queue)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "stopped", "failed")

    def publish(self, event: Any) -> None:
        """Hand an event (a dict, or bytes of frames) to every listener; safe from any thread."""
        for loop, queue in list(self.listeners):
            loop.call_soon_threadsafe(queue.put_nowait, event)

    def summary(self, position: int) -> dict:
        return {
            "job_id": self.id, "status": self.status, "queue_position": position, "error": self.error,
            "blocks_done": self.blocks_done, "num_blocks": self.num_blocks, "frames_done": self.frames_done,
            "prompt": self.request.prompt, "seed": self.request.seed,
            "first_block_s": self.first_block_s,
            "video_url": f"/jobs/{self.id}/video.mp4" if self.status == "done" else None,
            "record_url": f"/jobs/{self.id}/record" if self.status == "done" else None,
        }  # fmt: skip


def decode_image(data: str, folder: Path) -> Path:
    """A base64 image (optionally a data: URL) written to a temporary file in `folder`."""
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UserError("image is not base64: expected a PNG, JPEG or WebP file encoded in base64") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise UserError(f"image is {len(raw) >> 20} MiB: expected at most {MAX_IMAGE_BYTES >> 20} MiB")
    handle = tempfile.NamedTemporaryFile(dir=folder, prefix="image-", delete=False)
    with handle:
        handle.write(raw)
    return Path(handle.name)


class JobManager:
    """Admits, queues, runs and remembers jobs. `max_active` streams at once, `max_queue` waiting behind them."""

    def __init__(self, pipe, output_folder: Path, *, max_active: int, max_queue: int, max_frames: int,
                 parameters: dict, judge=None, segment_frames: Optional[int] = None) -> None:
        self.pipe, self.output_folder = pipe, Path(output_folder)
        self.judge, self.segment_frames = judge, segment_frames  # live per-segment adherence (service.segments)
        self.max_active, self.max_queue, self.max_frames = max_active, max_queue, max_frames
        self.parameters = parameters
        self.jobs: dict[str, Job] = {}
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[str, Job] = {}  # by id: the jobs generating now (at most max_active)
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=max_active, thread_name_prefix="generate")
        self.uploads = Path(tempfile.mkdtemp(prefix="serve-uploads-"))

    # ------------------------------------------------------------------------------------- admission
    def check(self, prompt: str, seed: int, num_frames: Optional[int], image: Optional[str]) -> JobRequest:
        """Validate a request before it takes a place in the queue (UserError: one line for a 4xx answer)."""
        from pipeline.run_options import MAX_SEED

        prompt = prompt.strip()
        if not prompt:
            raise UserError("prompt is empty: expected a text prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise UserError(f"prompt has {len(prompt)} characters: expected at most {MAX_PROMPT_CHARS}")
        if not 0 <= seed <= MAX_SEED:
            raise UserError(f"seed {seed}: expected 0..{MAX_SEED}")
        if num_frames is not None and not 1 <= num_frames <= self.max_frames:
            raise UserError(f"num_frames {num_frames}: expected 1..{self.max_frames} pixel frames")
        image_path = decode_image(image, self.uploads) if image else None
        try:
            checked = self.pipe.check_request(image_path, num_frames)  # frame counts that fit the blocks, the image read
        except UserError as err:
            if image_path is None:
                raise
            image_path.unlink(missing_ok=True)
            # the client never saw the server's temporary file: name what it sent instead
            raise UserError(str(err).replace(f"image {image_path}", "the uploaded image")
                            .replace(str(image_path), "the uploaded image")) from None
        return JobRequest(prompt=prompt, seed=seed, num_frames=num_frames, image_path=image_path, checked=checked)

    def submit(self, request: JobRequest, listener: Optional[tuple] = None) -> Job:
        """Queue a checked request; `listener` (loop, queue) hears every event from the first one on."""
        with self.lock:
            if len(self.running) >= self.max_active and len(self.waiting) >= self.max_queue:
                if request.image_path is not None:
                    request.image_path.unlink(missing_ok=True)
                raise ServiceBusy(f"{len(self.running)} streams running and {len(self.waiting)} waiting (the limit): try later")
            job = Job(id=uuid.uuid4().hex[:12], request=request)
            if listener is not None:
                job.listeners.append(listener)
            self.jobs[job.id] = job
            self.waiting.append(job)
            self._forget_old()
        self._start_next()
        return job

    def position(self, job: Job) -> int:
        """0 when running or finished; n when n - 1 jobs wait before it."""
        with self.lock:
            try:
                return self.waiting.index(job) + 1
            except ValueError:
                return 0

    def stop(self, job: Job) -> None:
        job.stop.set()
        with self.lock:
            if job in self.waiting:  # never started: leaves the queue now
                self.waiting.remove(job)
                job.status = "stopped"
                self._release_upload(job)
        if job.status == "stopped":
            job.publish({"type": "stopped", "job_id": job.id})
            self._announce_positions()

    def status(self) -> dict:
        with self.lock:
            stopping = sum(job.stop.is_set() for job in self.running.values())  # asked to stop, not yet at their next block
            return {"active": len(self.running), "stopping": stopping, "queued": len(self.waiting),
                    "max_active": self.max_active, "max_queue": self.max_queue}

    # ------------------------------------------------------------------------------------- running
    def _start_next(self) -> None:
        started = []
        with self.lock:
            while len(self.running) < self.max_active and self.waiting:
                job = self.waiting.popleft()
                job.status = "running"
                self.running[job.id] = job
                started.append(job)
        for job in started:
            self.executor.submit(self._run, job)
        if started:
            self._announce_positions()

    def _announce_positions(self) -> None:
        with self.lock:
            waiting = list(self.waiting)
        for index, job in enumerate(waiting):
            job.publish({"type": "queued", "job_id": job.id, "queue_position": index + 1})

    def _run(self, job: Job) -> None:
        from pipeline.inference_outputs import RECORD_FILE, save_result
        from service.segments import SegmentJudge
        from utils.video_io import to_uint8_frames

        request = job.request
        job.started_at = time.perf_counter()
        try:
            checked = request.checked or self.pipe.check_request(request.image_path, request.num_frames)
            geometry, kept = checked.geometry, checked.kept  # made in whole blocks, `kept` of them are sent
            job.num_blocks = len(geometry.block_sizes)
            job.publish({"type": "started", "job_id": job.id, "num_blocks": job.num_blocks,
                         "num_frames": kept, "width": geometry.width, "height": geometry.height,
                         "fps": self.pipe.config.video.fps})
            segments = None if self.judge is None else SegmentJudge(self.judge, self.segment_frames)
            judged: list[dict] = []
            prompt_now = [request.prompt]  # the prompt in effect (a switch replaces it)

            def on_block(index: int, pixels) -> None:
                frames = to_uint8_frames(pixels[0])  # [f, H, W, 3]
                now = time.perf_counter()
                if job.first_block_s is None:
                    job.first_block_s = now - job.submitted_at
                job.blocks_done, job.frames_done = index + 1, job.frames_done + len(frames)
                job.publish({"type": "block", "index": index, "frames": len(frames), "server_time": time.time(),
                             "elapsed_s": now - job.started_at, "first_block_s": job.first_block_s})
                job.publish(frames.tobytes())
                if segments is not None:
                    for event in segments.add(pixels[0], prompt_now[0]):
                        judged.append(event)
                        job.publish(event)
                if job.stop.is_set():
                    raise GenerationStopped

            def prompt_switch(index: int):
                if job.stop.is_set():
                    raise GenerationStopped
                asked = None
                while job.switches:  # the latest request wins
                    asked = job.switches.popleft()
                if asked is not None:
                    prompt_now[0] = asked[0]
                    job.publish({"type": "prompt_switched", "block": index, "prompt": asked[0], "recache": asked[1]})
                return asked

            result = self.pipe.generate(request.prompt, request=checked, seed=request.seed, on_block=on_block,
                                        prompt_switch=prompt_switch)
            parameters = {**self.parameters, "seed": request.seed, "num_output_frames": kept,
                          "image": None if request.image_path is None else "uploaded"}
            job.folder = save_result(result, self.output_folder, parameters, fps=self.pipe.config.video.fps)
            job.record = json.loads((job.folder / RECORD_FILE).read_text())  # the record as written, not built twice
            job.status = "done"
            job.publish({"type": "done", "job_id": job.id, "video_url": f"/jobs/{job.id}/video.mp4",
                         "record_url": f"/jobs/{job.id}/record", "timings": result.timings,
                         "temporal": result.temporal, "prompt_switches": result.prompt_switches,
                         "segments": judged if segments is not None else None})
        except GenerationStopped:
            job.status = "stopped"
            job.publish({"type": "stopped", "job_id": job.id})
        except UserError as err:
            job.status, job.error = "failed", str(err)
            job.publish({"type": "error", "status": 422, "error": str(err)})
        except Exception as err:  # noqa: BLE001 - the server keeps serving the other sessions
            log.exception("job %s failed", job.id)
            job.status, job.error = "failed", f"{type(err).__name__}: {err}"
            job.publish({"type": "error", "status": 500, "error": job.error})
        finally:
            self._release_upload(job)
            with self.lock:
                self.running.pop(job.id, None)
            self._start_next()

    # ------------------------------------------------------------------------------------- housekeeping
    @staticmethod
    def _release_upload(job: Job) -> None:
        if job.request.image_path is not None:
            job.request.image_path.unlink(missing_ok=True)

    def _forget_old(self) -> None:
        finished = [job for job in self.jobs.values() if job.finished]
        for job in finished[: max(0, len(finished) - FINISHED_JOBS_KEPT)]:
            del self.jobs[job.id]

    def shutdown(self) -> None:
        """Stop every job, wait for the workers, remove the uploads (idempotent: the app's shutdown and serve.py's
        exit may both call it)."""
        for job in list(self.jobs.values()):
            job.stop.set()
        self.executor.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.uploads, ignore_errors=True)  # uploads of jobs that never ran, and the folder itself


def new_listener() -> tuple[asyncio.AbstractEventLoop, asyncio.Queue]:
    """(loop, queue) for JobManager.submit: the calling event loop receives the job's events in the queue."""
    return asyncio.get_running_loop(), asyncio.Queue()
