"""The top kernels of one step, by share of its time: ``python -m bench.profile_step``.

    python -m bench.profile_step --pair 'bcos_r18<-bcos_d169' --batch 128 --resolution 224 --compile
    python -m bench.profile_step --device cpu --pair tiny_bcos --batch 2 --resolution 32

Builds the `bench.bench_step` setup of one pair, runs ``--warmup`` steps of ``--variant`` (default
``e2kd-live``; with ``--compile`` the first compiles, or loads from the compile caches, and its time
is printed), then profiles ``--steps`` steps with `torch.profiler` and prints the ``--top`` kernels
sorted by their self time on the device (CUDA) or the CPU, with each one's share of the total.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from bench import bench_step, common


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--pair", default="bcos_r18<-bcos_d169")
    parser.add_argument("--variant", default="e2kd-live", choices=bench_step.VARIANTS)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default=None)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    device = common.resolve_device(args.device)
    ns = argparse.Namespace(
        pairs=args.pair,
        batch=args.batch,
        resolution=args.resolution,
        dtype=args.dtype,
        channels_last=args.channels_last,
        tau=1.0,
        lam=1.0,
        compile=args.compile,
    )
    (config,) = bench_step.build_configs(ns, device)
    print(common.header_line(common.environment(device)))
    print(f"{args.variant}: {config['pair']}, batch {config['batch']}, {config['resolution']}², {config['dtype']}")
    setup = bench_step.build_setup(config, device, frozen=args.variant == "e2kd-frozen")
    step = bench_step.make_step(setup, args.variant)
    for i in range(max(args.warmup, 1)):
        started = time.perf_counter()
        step()
        common.synchronize(device)
        if i == 0:
            print(f"first step (compile={args.compile}): {time.perf_counter() - started:.1f} s")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        common.synchronize(device)
    print(top_kernels(prof, device.type, args.top, args.steps))
    return 0


def top_kernels(prof: torch.profiler.profile, device_type: str, top: int, steps: int) -> str:
    """A markdown table of the ``top`` events by self time on ``device_type``, with shares of the total."""
    attr = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if device_type == "cuda":  # device kernels only (their CPU-side launch events have no device time)
        events = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA] or events
    total = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    rows = [
        [
            e.key[:90].replace("|", "/"),
            e.count // steps,
            f"{getattr(e, attr) / steps / 1e3:.3f}",
            f"{100 * getattr(e, attr) / total:.1f} %",
        ]
        for e in events[:top]
    ]
    header = f"per step: {total / steps / 1e3:.2f} ms of self {device_type} time in {len(events)} distinct events"
    table = common.markdown_table(["kernel", "calls/step", "ms/step", "share"], rows)
    return header + "\n\n" + table


if __name__ == "__main__":
    sys.exit(main())
