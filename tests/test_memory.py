"""MemoryProfiler: component increments, phase activations (nested), the events file and its table."""
import gc
import json

import pytest
import torch

from tests.helpers import assert_one_line_error, run_script
from utils.memory import MemoryProfiler

MIB = 1 << 20
BIG = 64 * MIB  # large enough to stand out of RSS noise on a CPU


def _touch(num_bytes: int) -> torch.Tensor:
    return torch.ones(num_bytes // 4, dtype=torch.float32)  # ones, not empty: the pages must be resident


@pytest.fixture
def profiler():
    gc.collect()  # garbage of earlier tests in this process, freed mid-measurement, would hide the increments
    prof = MemoryProfiler(enabled=True, device=torch.device("cpu"))
    yield prof
    prof.close()


def in_a_fresh_process(tmp_path, body: str) -> None:
    """Run `body` (with a CPU profiler `profiler`, `_touch` and BIG defined) in a new interpreter: RSS figures in a
    process that ran other tests first move with that history (freed pages reused, garbage collected mid-way)."""
    script = tmp_path / "rss_check.py"
    script.write_text("import torch\nfrom utils.memory import MemoryProfiler\nBIG = 64 << 20\n"
                      "def _touch(n):\n    return torch.ones(n // 4, dtype=torch.float32)\n"
                      "profiler = MemoryProfiler(enabled=True, device=torch.device('cpu'))\n" + body + "\nprint('checked')\n")
    proc = run_script([str(script)])
    assert proc.returncode == 0 and "checked" in proc.stdout, proc.stderr[-2000:]


def test_component_records_what_stays_resident(tmp_path):
    in_a_fresh_process(tmp_path, """
with profiler.component("weights"):
    kept = _touch(BIG)
(event,) = profiler.events
assert event["kind"] == "component" and event["name"] == "weights"
assert event["incremental_bytes"] > 0.8 * BIG, event
assert kept.numel() * 4 == BIG
""")


def test_phase_activation_is_peak_minus_before_and_nests(tmp_path):
    in_a_fresh_process(tmp_path, """
with profiler.phase("outer"):
    with profiler.phase("inner"):
        scratch = _touch(BIG)
        del scratch  # freed inside the phase: only the peak remembers it
    with profiler.phase("quiet"):
        pass
events = {e["name"]: e for e in profiler.events}
assert events["inner"]["activation_bytes"] > 0.8 * BIG, events
assert events["quiet"]["activation_bytes"] < 0.5 * BIG, events
# The inner phase reset the running peak; the outer one must still include it.
assert events["outer"]["peak_bytes"] >= events["inner"]["peak_bytes"]
""")


def test_disabled_profiler_records_and_writes_nothing(tmp_path):
    prof = MemoryProfiler(enabled=False, device=torch.device("cpu"))
    with prof.component("x"), prof.phase("y"):
        _touch(MIB)
    assert prof.events == [] and prof.save(tmp_path / "m.json") is None
    assert not (tmp_path / "m.json").exists()


def test_events_file_says_its_backend_and_analyze_prints_a_table(tmp_path, profiler):
    with profiler.component("generator"):
        kept = _touch(BIG)
    with profiler.phase("block_0/step_0"):
        _touch(BIG)
    path = profiler.save(tmp_path / "memory_events.json")
    document = json.loads(path.read_text())
    assert document["backend"] == "cpu-rss" and "note" in document
    assert document["summary"]["base_bytes"] == document["events"][0]["after_bytes"]
    assert document["summary"]["peak_bytes"] >= document["summary"]["base_bytes"]
    proc = run_script(["scripts/benchmark.py", "memory_events", str(path)])
    assert proc.returncode == 0, proc.stderr
    assert "generator" in proc.stdout and "block_0/step_0" in proc.stdout and "total peak" in proc.stdout
    assert "cpu-rss" in proc.stdout
    del kept


def test_analyze_refuses_a_missing_or_foreign_file(tmp_path):
    assert_one_line_error(run_script(["scripts/benchmark.py", "memory_events", str(tmp_path / "none.json")]), "none.json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    assert_one_line_error(run_script(["scripts/benchmark.py", "memory_events", str(other)]), "other.json", "backend")


@pytest.mark.gpu
def test_cuda_backend_measures_allocator_bytes():
    device = torch.device("cuda")
    prof = MemoryProfiler(enabled=True, device=device)
    with prof.component("weights"):
        kept = torch.ones(BIG // 4, device=device)
    with prof.phase("scratch"):
        torch.ones(BIG // 4, device=device)
    component, phase = prof.events
    assert prof.backend == "cuda"
    assert component["incremental_bytes"] == BIG and phase["activation_bytes"] == BIG
    del kept
