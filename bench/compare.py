"""The performance-regression gate: ``python -m bench.compare BASELINE NEW --max-regression 0.10``.

It compares *ratios* measured inside one run (a variant's time ÷ its reference's time, e.g. our e²KD
step ÷ the official recipe, or a fast op ÷ the eager reference), never absolute times, so a busier or
differently clocked machine does not fail the gate. Entries are matched by (suite, config key,
variant); only records with status ``ok`` and a ratio count; when a file holds several runs, the
latest record of an entry wins. Both files must come from the same device kind.

Lower ratios are better. An entry regresses when ``new > baseline × (1 + max_regression)``.

With ``--metrics inductor_kernels,inductor_bytes`` it also gates the compiled step's CPU proxies of
fusion: the kernels Inductor generated and the bytes it estimates they move. They are absolute
counts, not ratios, and depend on the torch version: entries whose records name different torch
versions are shown ("torch differs") but never fail the gate.

Exit status: 0 no regression, 1 regression (or, with ``--fail-on-missing``, entries missing from
NEW), 2 unusable input (device kinds differ, nothing to compare, unreadable file).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common

# Lower is better for all: time and step memory ÷ the reference's (ratios inside one run), and the
# compiled step's Inductor kernel count and estimated bytes (deterministic for one torch version and
# device kind: CPU proxies of fusion that show a regression without a GPU).
METRICS = ("ratio", "mem_ratio", "inductor_kernels", "inductor_bytes")
EntryKey = tuple[str, str, str]


@dataclass
class Comparison:
    """The outcome: per-entry rows, regressions, and entries present on one side only."""

    rows: list[list[str]]
    regressions: list[EntryKey]
    missing_in_new: list[EntryKey]
    missing_in_baseline: list[EntryKey]
    kind: str


class GateInputError(ValueError):
    """The inputs cannot be compared (different device kinds, nothing in common, bad files)."""


def latest_entries(records: Sequence[dict[str, Any]], metric: str) -> dict[EntryKey, dict[str, Any]]:
    """(suite, key, variant) → the last usable record (later lines are later runs)."""
    out: dict[EntryKey, dict[str, Any]] = {}
    for r in records:
        if r.get("status") != "ok" or r.get(metric) is None or r.get("variant") == r.get("reference"):
            continue  # a reference compared with itself is 1.0 by definition
        out[(r["suite"], r["key"], r["variant"])] = r
    return out


def device_kinds(records: Sequence[dict[str, Any]]) -> set[str]:
    return {r["env"]["device_kind"] for r in records if "env" in r}


def compare(
    baseline: Sequence[dict[str, Any]],
    new: Sequence[dict[str, Any]],
    *,
    max_regression: float = 0.10,
    metrics: Sequence[str] = ("ratio",),
    device_kind: str | None = None,
) -> Comparison:
    """Compares two record lists; raises `GateInputError` when they cannot be compared."""
    if device_kind is not None:
        baseline = [r for r in baseline if r.get("env", {}).get("device_kind") == device_kind]
        new = [r for r in new if r.get("env", {}).get("device_kind") == device_kind]
    kinds_b, kinds_n = device_kinds(baseline), device_kinds(new)
    if not kinds_b or not kinds_n:
        raise GateInputError("no records to compare" + (f" for device kind {device_kind}" if device_kind else ""))
    if len(kinds_b) > 1 or len(kinds_n) > 1:
        raise GateInputError(
            f"a file mixes device kinds (baseline {sorted(kinds_b)}, new {sorted(kinds_n)}); "
            "pick one with --device-kind"
        )
    if kinds_b != kinds_n:
        raise GateInputError(
            f"device kinds differ: baseline {kinds_b.pop()}, new {kinds_n.pop()}; "
            "ratios are compared on one device kind only"
        )
    kind = kinds_b.pop()
    rows, regressions, missing_new, missing_base = [], [], [], []
    for metric in metrics:
        if metric not in METRICS:
            raise GateInputError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
        base_e, new_e = latest_entries(baseline, metric), latest_entries(new, metric)
        for key in sorted(base_e.keys() | new_e.keys()):
            b, n = base_e.get(key), new_e.get(key)
            if n is None:
                missing_new.append(key)
                rows.append([*key, metric, common.fmt_num(b[metric]), "–", "–", "missing in new"])
                continue
            if b is None:
                missing_base.append(key)
                rows.append([*key, metric, "–", common.fmt_num(n[metric]), "–", "new entry"])
                continue
            change = n[metric] / b[metric] - 1
            if metric.startswith("inductor_") and b.get("env", {}).get("torch") != n.get("env", {}).get("torch"):
                rows.append(
                    [*key, metric, common.fmt_num(b[metric]), common.fmt_num(n[metric]), f"{100 * change:+.1f} %"]
                    + ["torch differs"]
                )
                continue
            # Inductor's counts are exact for one torch version: any increase is a fusion lost.
            allowed = 0.0 if metric.startswith("inductor_") else max_regression
            regressed = n[metric] > b[metric] * (1 + allowed)
            if regressed:
                regressions.append(key)
            status = "REGRESSION" if regressed else ("improved" if change < -allowed else "ok")
            rows.append(
                [*key, metric, common.fmt_num(b[metric]), common.fmt_num(n[metric]), f"{100 * change:+.1f} %", status]
            )
    return Comparison(rows, regressions, missing_new, missing_base, kind)


def render(result: Comparison, max_regression: float, only_problems: bool = False) -> str:
    headers = ["suite", "config", "variant", "metric", "baseline", "new", "change", "status"]
    rows = [r for r in result.rows if not only_problems or r[-1] != "ok"]
    lines = [
        f"device kind: {result.kind}; lower ratios are better; regression = worse than baseline by more than "
        f"{100 * max_regression:.0f} %",
        "",
        common.markdown_table(headers, rows) if rows else "(nothing to show)",
        "",
        f"{len(result.regressions)} regression(s), {len(result.missing_in_new)} missing in new, "
        f"{len(result.missing_in_baseline)} new entr{'y' if len(result.missing_in_baseline) == 1 else 'ies'}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("baseline", type=Path, help="JSONL of the baseline run(s)")
    parser.add_argument("new", type=Path, help="JSONL of the new run(s)")
    parser.add_argument(
        "--max-regression", type=float, default=0.10, help="allowed relative worsening of a ratio (default 0.10)"
    )
    parser.add_argument(
        "--metrics",
        default="ratio",
        help="comma-separated: ratio (time), mem_ratio (step memory), inductor_kernels, inductor_bytes "
        "(compiled step: generated kernels and Inductor's estimated bytes)",
    )
    parser.add_argument("--device-kind", default=None, help="compare only records of this device kind")
    parser.add_argument(
        "--fail-on-missing", action="store_true", help="entries of the baseline missing in NEW fail the gate"
    )
    parser.add_argument("--only-problems", action="store_true", help="print only rows that are not ok")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_regression < 0:
            raise GateInputError("--max-regression must be >= 0")
        baseline, new = common.read_jsonl(args.baseline), common.read_jsonl(args.new)
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        result = compare(
            baseline, new, max_regression=args.max_regression, metrics=metrics, device_kind=args.device_kind
        )
    except (GateInputError, OSError, ValueError) as exc:
        print(f"bench.compare: {exc}", file=sys.stderr)
        return 2
    print(render(result, args.max_regression, args.only_problems))
    if result.regressions:
        return 1
    if args.fail_on_missing and result.missing_in_new:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
