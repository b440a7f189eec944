"""Small helpers shared by tests."""
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(args, cwd=REPO_ROOT, env=None, timeout=600):
    """Run `python <args>` from the repo root; returns the CompletedProcess (never raises on failure)."""
    script = args[0] if os.path.isabs(args[0]) else os.path.join(REPO_ROOT, args[0])
    args = [script, *args[1:]]
    full_env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *fragments, after_progress=False):
    """A bad input: exit status 2, one line on stderr starting with 'error:', naming the given fragments.

    after_progress: the fault shows up during the work (a damaged row read mid-training), so progress-bar lines
    that came before the error are allowed.
    """
    assert proc.returncode == 2, f"expected exit 2, got {proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr}"
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    if after_progress:
        lines = [line for line in lines if "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
