"""The benchmarks of scripts/benchmark.py and what they share (support.py)."""
