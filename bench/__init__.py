"""Benchmarks and the performance-regression gate (see bench/README.md).

``python -m bench ops|step|data|all`` measures; ``python -m bench.compare BASELINE NEW`` gates;
``python -m bench.floor`` predicts a step's roofline floor; ``python -m bench.profile_step`` lists its
top kernels; ``bench/gpu_session.sh`` is a GPU machine's whole run in one call.
Nothing here imports Triton, DALI or CUDA at import time: every suite runs on a CPU-only machine.
"""
