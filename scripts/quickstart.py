"""`make quickstart`: the main job on the miniature default, end to end on a CPU.

Until the miniature world lands this runs what exists: it loads the tiny recipe and prints its geometry.
"""
from __future__ import annotations

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    recipe = os.path.join(REPO_ROOT, "configs/tiny/self_forcing_dmd.yaml")
    return subprocess.call([sys.executable, os.path.join(REPO_ROOT, "scripts/verify.py"), "geometry", "--config_path", recipe])


if __name__ == "__main__":
    sys.exit(main())
