"""The command-line tools' code: verification checks (scripts/verify.py) and benchmarks (scripts/benchmark.py)."""
