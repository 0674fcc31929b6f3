"""``python -m bench <suite>``: run a suite, write JSON lines, print a markdown table last.

``python -m bench ptxas`` is the offline resource report of the Triton kernels (`bench.ptxas_report`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench import bench_data, bench_ops, bench_step, common

SUITES = {"ops": bench_ops, "step": bench_step, "data": bench_data}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="suite", required=True)
    sub.add_parser(
        "ptxas",
        add_help=False,
        help="offline sm_90a resource report of every Triton kernel (bench/ptxas_report.py; --help there)",
    )
    for name, module in [*SUITES.items(), ("all", None)]:
        p = sub.add_parser(name, help=f"the {name} suite" if module else "ops, step and data with their defaults")
        p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
        p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
        p.add_argument(
            "--out", type=Path, default=None, help="JSONL output (default: .cache/bench/<kind>-<suite>-<run>.jsonl)"
        )
        p.add_argument(
            "--record", action="store_true", help="also append the records to bench/results/<device kind>.jsonl"
        )
        p.add_argument("--quiet", action="store_true", help="no progress lines (the table is still printed)")
        if module is not None:
            module.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ptxas"]:  # offline: no device, its own options and results file
        from bench import ptxas_report

        code = ptxas_report.main(argv[1:])
        if code:
            sys.exit(code)
        return []
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    env = common.environment(device)
    run_id = common.new_run_id()

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    log(common.header_line(env))
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    records: list[dict[str, Any]] = []
    tables = []
    for name in suites:
        module = SUITES[name]
        suite_args = args
        if args.suite == "all":  # each suite's own defaults, with the shared options
            shared = ["--device", args.device]
            suite_args = build_parser().parse_args([name, *shared])
        new = module.run(suite_args, device, env, run_id, log)
        records.extend(new)
        tables.append(f"### {name}\n\n{module.table(new)}")
    if hasattr(os, "getloadavg"):  # the load at the end too: a run that another job overlapped shows it
        env["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    out = args.out or common.SCRATCH_DIR / f"{env['device_kind']}-{args.suite}-{run_id}.jsonl"
    common.write_jsonl(records, out, append=False)
    log(f"wrote {len(records)} records to {out}")
    if args.record:
        recorded = common.RESULTS_DIR / f"{env['device_kind']}.jsonl"
        common.write_jsonl(records, recorded, append=True)
        log(f"appended them to {recorded}")
    print(common.header_line(env) + "\n\n" + "\n\n".join(tables))
    return records


if __name__ == "__main__":
    main()
