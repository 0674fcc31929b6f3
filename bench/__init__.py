"""Benchmarks and the performance-regression gate (see bench/README.md).

``python -m bench ops|step|data|all`` measures; ``python -m bench.compare BASELINE NEW`` gates.
Nothing here imports Triton, DALI or CUDA at import time: every suite runs on a CPU-only machine.
"""
