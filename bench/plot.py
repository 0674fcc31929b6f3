"""``python -m bench.plot [FILE.jsonl ...] [--out DIR]``: the recorded benchmarks as pictures.

Reads JSON lines (default: every ``bench/results/*.jsonl``; one file per device kind, or a kind with
a qualifier such as ``-threads1``) and writes into DIR (default ``.cache/bench/plots``):

- ``step_vs_recipe.png``: one row per file with step records. Left, each variant's speed against
  the official recipe (reference time ÷ variant time, the tables' "speed vs reference"; above 1 is
  faster), grouped by step configuration (pair, batch × resolution, dtype, compiled or eager), from
  the latest run of each configuration; right, step memory ÷ the recipe's where it was measured
  (below 1 is less).
- ``gate_history-<file>.png``: what `bench.compare` gates, over the file's runs in time order (x:
  commit and date of each run): one panel per metric with values (``ratio``, ``mem_ratio``,
  ``inductor_kernels``, ``inductor_bytes``), one line per entry (suite, configuration, variant), as
  the gate matches them. Suites: ``--suites`` (default ``step``).

Drawn with matplotlib's object API (no display needed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import common
from bench.compare import METRICS

DEFAULT_OUT = common.SCRATCH_DIR / "plots"
# Variants in a fixed order and colour across panels; others follow in the order met.
VARIANT_ORDER = ("kd", "e2kd-live", "e2kd-frozen", "e2kd-ckpt", "e2kd-live-graphed")
METRIC_LABELS = {
    "ratio": "time ÷ reference time",
    "mem_ratio": "step memory ÷ reference's",
    "inductor_kernels": "Inductor kernels (compiled step)",
    "inductor_bytes": "Inductor's estimated bytes (compiled step)",
}


def _ok(record: dict[str, Any]) -> bool:
    return record.get("status") == "ok"


def step_config(record: dict[str, Any]) -> tuple:
    """What makes step runs comparable: pair, batch, resolution, dtype, channels_last, compiled (missing = eager)."""
    cfg = record["config"]
    return (
        cfg.get("pair"),
        cfg.get("batch"),
        cfg.get("resolution"),
        cfg.get("dtype"),
        bool(cfg.get("channels_last")),
        bool(cfg.get("compile")),
    )


def _config_label(config: tuple) -> str:
    pair, batch, resolution, dtype, channels_last, compiled = config
    layout = ", channels_last" if channels_last else ""
    return f"{pair}\n{batch}×{resolution}² {dtype}{layout}\n{'compiled' if compiled else 'eager'}"


def latest_step_runs(records: Sequence[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Step configuration → the records of its latest run (by timestamp), in the order of the file."""
    latest: dict[tuple, tuple[str, str]] = {}
    for r in records:
        if r.get("suite") != "step":
            continue
        config, stamp = step_config(r), r.get("timestamp", "")
        if config not in latest or stamp > latest[config][0]:
            latest[config] = (stamp, r["run_id"])
    return {
        config: [r for r in records if r.get("suite") == "step" and r["run_id"] == run and step_config(r) == config]
        for config, (_, run) in latest.items()
    }


def _variants(records: Sequence[dict[str, Any]]) -> list[str]:
    seen = dict.fromkeys(v for v in VARIANT_ORDER if any(r["variant"] == v for r in records))
    seen.update(dict.fromkeys(r["variant"] for r in records))
    return [v for v in seen if not any(r["variant"] == v == r.get("reference") for r in records)]


def _bars(ax, runs: dict[tuple, list[dict[str, Any]]], value, colours: dict[str, str], ylabel: str) -> int:
    """Grouped bars of value(record) per configuration and variant; returns the number of bars drawn."""
    drawn_here = [r for c in runs for r in runs[c] if _ok(r) and r["variant"] in colours and value(r) is not None]
    configs = [c for c in runs if any(r in drawn_here for r in runs[c])]
    variants = [v for v in colours if any(r["variant"] == v for c in configs for r in runs[c])]
    width = 0.8 / max(1, len(variants))
    drawn = 0
    for i, variant in enumerate(variants):
        xs, heights = [], []
        for g, config in enumerate(configs):
            match = [r for r in runs[config] if r["variant"] == variant and _ok(r) and value(r) is not None]
            if match:
                xs.append(g - 0.4 + width * (i + 0.5))
                heights.append(value(match[-1]))
        if xs:
            bars = ax.bar(xs, heights, width, color=colours[variant], label=variant)
            ax.bar_label(bars, labels=[f"{h:.2f}×" for h in heights], fontsize=7, padding=1)
            drawn += len(xs)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="official recipe (1×)")
    ticks = [f"{_config_label(c)}\nrun {_commit(runs[c][0])}, {runs[c][0].get('timestamp', '')[:10]}" for c in configs]
    ax.set_xticks(range(len(configs)), ticks, fontsize=7)
    pad = 0.6 if len(configs) == 1 else 0.1  # one configuration: bars of a readable width
    ax.set_xlim(-0.5 - pad, len(configs) - 0.5 + pad)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.margins(y=0.15)
    return drawn


def step_vs_recipe_figure(files: dict[str, list[dict[str, Any]]]):
    """The bar chart (see the module docstring); None when no file has step records."""
    from matplotlib.figure import Figure

    runs_per_file = {name: latest_step_runs(records) for name, records in files.items()}
    runs_per_file = {name: runs for name, runs in runs_per_file.items() if runs}
    if not runs_per_file:
        return None
    every = [r for runs in runs_per_file.values() for recs in runs.values() for r in recs]
    colours = {v: f"C{i % 10}" for i, v in enumerate(_variants(every))}
    widest = max(len(runs) for runs in runs_per_file.values())
    fig = Figure(figsize=(2.0 + 2.2 * widest * 2, 3.6 * len(runs_per_file)), layout="constrained")
    axes = fig.subplots(len(runs_per_file), 2, squeeze=False)
    for (name, runs), (speed_ax, memory_ax) in zip(runs_per_file.items(), axes, strict=True):
        _bars(speed_ax, runs, lambda r: 1 / r["ratio"] if r.get("ratio") else None, colours, "speed vs recipe (×)")
        speed_ax.set_title(f"{name}: speed against the official recipe (higher is faster)", fontsize=9)
        if any(r.get("mem_ratio") is not None and _ok(r) for recs in runs.values() for r in recs):
            _bars(memory_ax, runs, lambda r: r.get("mem_ratio"), colours, "step memory ÷ recipe's (×)")
            memory_ax.set_title(f"{name}: step memory against the recipe (below 1: less)", fontsize=9)
        else:
            memory_ax.set_title(f"{name}: step memory", fontsize=9)
            memory_ax.text(0.5, 0.5, "not measured in these runs", ha="center", va="center", fontsize=8)
            memory_ax.axis("off")
    return fig


def _commit(record: dict[str, Any]) -> str:
    """The commit a record was measured at: ``measured_at_commit`` when given, else env.git_commit (``*``: dirty)."""
    if record.get("measured_at_commit"):
        return str(record["measured_at_commit"]).split()[0][:7]
    commit = (record.get("env") or {}).get("git_commit") or "?"
    return commit[:7] + ("*" if commit.endswith("-dirty") else "")


def _entry_label(record: dict[str, Any]) -> str:
    cfg = record["config"]
    if record["suite"] == "step":
        return _config_label(step_config(record)).replace("\n", " ") + f": {record['variant']}"
    if record["suite"] == "ops":
        return f"{cfg.get('op')} {cfg.get('mode')} {cfg.get('shapes', '')}: {record['variant']}"
    return f"{record['suite']}: {record['variant']}"


def _line_key(record: dict[str, Any]) -> tuple:
    """A history line: the gate's entry (suite, key, variant); step entries by `step_config`, so that a
    field older runs did not record (``compile``: eager) does not split a line."""
    if record["suite"] == "step":
        return ("step", step_config(record), record["variant"])
    return (record["suite"], record["key"], record["variant"])


def gate_history_figure(records: Sequence[dict[str, Any]], suites: Sequence[str] = ("step",), title: str = ""):
    """Each gated metric over the runs (see the module docstring); None when no metric has a value."""
    from matplotlib.figure import Figure

    chosen = [r for r in records if r.get("suite") in suites and _ok(r) and r.get("variant") != r.get("reference")]
    panels = [m for m in METRICS if any(r.get(m) is not None for r in chosen)]
    if not panels:
        return None
    fig = Figure(figsize=(11, 3.2 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, metric in zip(axes, panels, strict=True):
        with_value = [r for r in chosen if r.get(metric) is not None]
        runs: dict[str, dict[str, Any]] = {}
        for r in sorted(with_value, key=lambda r: r.get("timestamp", "")):
            runs.setdefault(r["run_id"], r)
        position = {run: i for i, run in enumerate(runs)}
        entries: dict[tuple, dict[str, float]] = {}
        labels: dict[tuple, str] = {}
        for r in with_value:  # later lines win, as in the gate
            key = _line_key(r)
            entries.setdefault(key, {})[r["run_id"]] = float(r[metric])
            labels[key] = _entry_label(r)
        for index, (key, values) in enumerate(sorted(entries.items(), key=lambda kv: labels[kv[0]])):
            order = sorted(values, key=position.__getitem__)
            ax.plot(
                [position[run] for run in order],
                [values[run] for run in order],
                marker="o",
                markersize=4,
                color=f"C{index % 10}",
                linestyle="-" if index < 10 else "--",
                label=labels[key],
            )
        ticks = [f"{_commit(first)}\n{first.get('timestamp', '')[:10]}" for first in runs.values()]
        ax.set_xticks(range(len(runs)), ticks, fontsize=7)
        ax.set_xlim(-0.5, len(runs) - 0.5)
        ax.set_xlabel("run: commit (* with uncommitted changes), date", fontsize=8)
        ax.set_ylabel(f"{metric}\n{METRIC_LABELS[metric]}", fontsize=8)
        ax.set_title(f"{title}{': ' if title else ''}{metric} per run (lower is better)", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return path


def write_plots(paths: Sequence[Path], out: Path, suites: Sequence[str] = ("step",)) -> list[Path]:
    """Writes the PNGs of the module docstring for ``paths`` into ``out``; returns what it wrote."""
    files = {path.stem: common.read_jsonl(path) for path in paths}
    written = []
    fig = step_vs_recipe_figure(files)
    if fig is not None:
        written.append(_save(fig, out / "step_vs_recipe.png"))
    for name, records in files.items():
        fig = gate_history_figure(records, suites, title=name)
        if fig is not None:
            written.append(_save(fig, out / f"gate_history-{name}.png"))
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*", type=Path, help="JSONL files (default: bench/results/*.jsonl)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--suites", default="step", help="suites in the gate history, comma-separated (default step)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = args.files or sorted(common.RESULTS_DIR.glob("*.jsonl"))
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    try:
        written = write_plots(paths, args.out, suites)
    except (OSError, ValueError, KeyError) as exc:
        print(f"bench.plot: {exc}", file=sys.stderr)
        return 2
    if not written:
        print(f"bench.plot: nothing to plot in {', '.join(map(str, paths)) or 'no files'}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
