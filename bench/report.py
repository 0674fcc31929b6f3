"""``python -m bench.report FILE.jsonl [--run RUN_ID]``: the markdown tables of recorded runs.

Prints, per run (latest last), the header line (device, versions, commit, load) and each suite's table,
exactly as the run printed them; bench/README.md's recorded numbers are made with it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import bench_data, bench_ops, bench_step, common

TABLES = {"ops": bench_ops.table, "step": bench_step.table, "data": bench_data.table}


def render(records: list[dict], run_id: str | None = None) -> str:
    runs: dict[str, list[dict]] = {}
    for r in records:
        if run_id is None or r["run_id"] == run_id:
            runs.setdefault(r["run_id"], []).append(r)
    parts = []
    for rid, recs in runs.items():
        env = recs[0]["env"]
        end = env.get("loadavg_end")
        parts.append(f"run {rid}: " + common.header_line(env) + (f" (end {end[0]})" if end else ""))
        for suite in dict.fromkeys(r["suite"] for r in recs):
            parts.append(f"\n### {suite}\n\n" + TABLES[suite]([r for r in recs if r["suite"] == suite]) + "\n")
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--run", default=None, help="only this run id")
    args = parser.parse_args(argv)
    print(render(common.read_jsonl(args.file), args.run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
