"""Memory profiling: what loading each component costs, the activation memory of each phase, the peak.

CUDA reports allocator statistics (`torch.cuda.memory_allocated` / `max_memory_allocated`). On a CPU
the only honest figure is the process's resident set size (RSS, via psutil), sampled by a background
thread for peaks; the events file says which backend produced it ("cuda" or "cpu-rss"). RSS also
moves with the allocator's caching and with other threads, so CPU figures are indicative.

    profiler = MemoryProfiler(enabled=True, device=torch.device("cuda"))
    with profiler.component("generator"):
        generator = build(...)
    with profiler.phase("block_0"):
        run(...)
    profiler.save("outputs/memory_events.json")
"""
from __future__ import annotations

import contextlib
import json
import resource
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import torch

from utils.errors import UserError
from utils.io import atomic_write, atomic_write_json

RSS_SAMPLE_INTERVAL_S = 0.005  # CPU peak sampling; finer costs a core on a small machine


def current_bytes(device: torch.device) -> int:
    """Memory in use now: CUDA allocated bytes on `device`, or the process RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return psutil.Process().memory_info().rss


def lifetime_peak_bytes(device: torch.device) -> int:
    """The highest memory since the process started (CUDA: since the last peak reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


class _PeakTracker:
    """A resettable running peak: the CUDA allocator's, or RSS sampled by a daemon thread."""

    def __init__(self, device: torch.device):
        self.device = device
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device.type != "cuda":
            self._thread = threading.Thread(target=self._sample, name="rss-peak", daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(RSS_SAMPLE_INTERVAL_S):
            rss = process.memory_info().rss
            with self._lock:
                self._peak = max(self._peak, rss)

    def read(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        with self._lock:  # include "now": a phase shorter than one sampling interval still counts
            self._peak = max(self._peak, current_bytes(self.device))
            return self._peak

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with self._lock:
            self._peak = current_bytes(self.device)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


@dataclass
class _OpenPhase:
    name: str
    before: int
    start: float
    peak: int


class MemoryProfiler:
    """Records `component` (incremental memory of loading) and `phase` (activation memory) events.

    Phases nest: an inner phase resets the device peak, so the outer phases fold the inner peaks in.
    Disabled, every context manager is a no-op and nothing is recorded or written.
    """

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.device = torch.device(device)
        self.backend = "cuda" if self.device.type == "cuda" else "cpu-rss"
        self._events: list[dict] = []
        self._open: list[_OpenPhase] = []
        self._tracker = _PeakTracker(self.device) if enabled else None

    @property
    def events(self) -> list[dict]:
        return list(self._events)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _fold_peak(self) -> int:
        """Fold the device peak since the last reset into every open phase; returns it."""
        peak = self._tracker.read()
        for phase in self._open:
            phase.peak = max(phase.peak, peak)
        return peak

    @contextlib.contextmanager
    def component(self, name: str) -> Iterator[None]:
        """Incremental memory of building/loading a component (what stays resident afterwards)."""
        if not self.enabled:
            yield
            return
        self._sync()
        before, start = current_bytes(self.device), time.perf_counter()
        yield
        self._sync()
        after = current_bytes(self.device)
        self._fold_peak()
        self._events.append({
            "kind": "component", "name": name, "before_bytes": before, "after_bytes": after,
            "incremental_bytes": after - before, "seconds": time.perf_counter() - start,
        })

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Activation memory of a phase: its peak minus the memory in use when it started."""
        if not self.enabled:
            yield
            return
        self._sync()
        self._fold_peak()
        self._tracker.reset()
        before = current_bytes(self.device)
        self._open.append(_OpenPhase(name, before, time.perf_counter(), before))
        try:
            yield
        finally:
            self._sync()
            self._fold_peak()
            phase = self._open.pop()
            after = current_bytes(self.device)
            self._events.append({
                "kind": "phase", "name": phase.name, "depth": len(self._open), "before_bytes": phase.before,
                "peak_bytes": phase.peak, "after_bytes": after, "activation_bytes": phase.peak - phase.before,
                "seconds": time.perf_counter() - phase.start,
            })

    def summary(self) -> dict:
        """Base (resident after the components loaded), largest activation, and the total peak."""
        components = [e for e in self._events if e["kind"] == "component"]
        phases = [e for e in self._events if e["kind"] == "phase"]
        peaks = [e["peak_bytes"] for e in phases] + [e["after_bytes"] for e in components]
        return {
            "base_bytes": components[-1]["after_bytes"] if components else None,
            "components_bytes": sum(e["incremental_bytes"] for e in components),
            "max_activation_bytes": max((e["activation_bytes"] for e in phases), default=None),
            "peak_bytes": max(peaks, default=None),
        }

    def save(self, path: str | Path) -> Path | None:
        """Write memory_events.json atomically (nothing when disabled)."""
        if not self.enabled:
            return None
        document = {"backend": self.backend, "device": str(self.device), "summary": self.summary(), "events": self.events}
        if self.backend == "cpu-rss":
            document["note"] = "CPU: process resident set size (psutil), peaks sampled every few ms; indicative only"
        return atomic_write_json(path, document)

    def close(self) -> None:
        if self._tracker is not None:
            self._tracker.close()


@contextlib.contextmanager
def torch_trace(path: str | Path | None, device: torch.device) -> Iterator[None]:
    """An optional torch.profiler trace (Chrome JSON with memory) of the enclosed work; no-op when path is None."""
    if path is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True) as prof:
        yield
    atomic_write(path, prof.export_chrome_trace)


def load_events(path: str | Path) -> dict:
    """Read a memory_events.json (UserError when missing or not one)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"memory events file {path} not found: expected a memory_events.json written with --profile_memory")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(document, dict) or "events" not in document or "backend" not in document:
        raise UserError(f"{path} is not a memory events file: expected keys 'backend' and 'events'")
    return document
