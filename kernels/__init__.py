"""Triton kernels, installed as ``e2kd_fast.kernels``.

One file per op (``<op>.py``) with ``@triton.jit`` kernels and their launchers. Every module here
must import without Triton and without a GPU: guard ``import triton`` and never query the device at
import time. The ops that call these kernels live in ``e2kd_fast/ops``.
"""
