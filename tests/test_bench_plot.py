"""`python -m bench.plot`: bars of each step variant against the recipe per device, and the gate's history.

Crafted records; structure is checked through matplotlib's objects (bars, tick labels, lines)."""

from __future__ import annotations

import json

from matplotlib.patches import Rectangle

from bench import common, plot


def _record(run: int, variant: str, ratio: float, *, compile_: bool | None = False, mem: float | None = None, **extra):
    config = {"pair": "tiny_bcos", "batch": 2, "resolution": 32, "dtype": "float32"}
    if compile_ is not None:  # the oldest runs did not record it
        config["compile"] = compile_
    return {
        "suite": "step",
        "run_id": f"run{run}",
        "timestamp": f"2026-11-2{run}T00:00:00+00:00",
        "key": common.config_key(config),
        "config": config,
        "variant": variant,
        "reference": "reference",
        "status": "ok",
        "ratio": ratio,
        "mem_ratio": mem,
        "env": {"device_kind": "cpu-test", "git_commit": f"abc{run}def0123-dirty" if run == 1 else f"abc{run}def0123"},
        **extra,
    }


def _history() -> list[dict]:
    records = []
    for run, compile_ in ((1, None), (2, False), (3, True)):
        records.append(_record(run, "reference", 1.0, compile_=compile_, mem=1.0))
        records.append(_record(run, "kd", 0.5 / run, compile_=compile_, mem=0.3 if run < 3 else None))
        records.append(
            _record(run, "e2kd-live", 1.0 / run, compile_=compile_, inductor_kernels=900 if run == 3 else None)
        )
    records.append({**_record(3, "e2kd-frozen", 0.4, compile_=True), "status": "error"})
    return records


def _bars(ax) -> dict[str, int]:
    """Legend label → number of bars in the panel."""
    counts: dict[str, int] = {}
    for container in ax.containers:
        counts[container.get_label()] = sum(isinstance(p, Rectangle) for p in container.patches)
    return counts


def test_step_bars_show_each_variant_against_the_recipe_per_device_from_the_latest_runs():
    gpu = [{**r, "env": {**r["env"], "device_kind": "gpu-test"}, "mem_ratio": None} for r in _history()[:3]]
    fig = plot.step_vs_recipe_figure({"cpu-test": _history(), "gpu-test": gpu})
    speed, memory, gpu_speed, gpu_memory = fig.axes[:4]
    # Runs 1 (no compile field) and 2 are both eager: the later one wins; run 3 is the compiled group.
    ticks = [t.get_text() for t in speed.get_xticklabels()]
    assert ticks == [
        "tiny_bcos\n2×32² float32\neager\nrun abc2def, 2026-11-22",
        "tiny_bcos\n2×32² float32\ncompiled\nrun abc3def, 2026-11-23",
    ]
    assert _bars(speed) == {"kd": 2, "e2kd-live": 2}  # the reference is the dashed 1× line; errors are left out
    heights = {c.get_label(): [p.get_height() for p in c.patches] for c in speed.containers}
    assert heights["kd"] == [4.0, 6.0] and heights["e2kd-live"] == [2.0, 3.0]  # 1 / ratio
    assert any(line.get_ydata()[0] == 1.0 for line in speed.get_lines())
    assert _bars(memory) == {"kd": 1} and len(memory.get_xticklabels()) == 1  # measured in run 2 only
    assert "gpu-test" in gpu_speed.get_title() and _bars(gpu_speed) == {"kd": 1, "e2kd-live": 1}
    assert not gpu_memory.axison and "not measured" in gpu_memory.texts[0].get_text()
    assert plot.step_vs_recipe_figure({"ops-only": [{**_history()[0], "suite": "ops"}]}) is None


def test_gate_history_has_a_panel_per_gated_metric_and_a_line_per_entry_over_commits():
    fig = plot.gate_history_figure(_history(), title="cpu-test")
    ratio, mem, kernels = fig.axes[:3]
    assert [ax.get_title() for ax in (ratio, mem, kernels)] == [
        "cpu-test: ratio per run (lower is better)",
        "cpu-test: mem_ratio per run (lower is better)",
        "cpu-test: inductor_kernels per run (lower is better)",
    ]
    assert [t.get_text() for t in ratio.get_xticklabels()] == [
        "abc1def*\n2026-11-21",
        "abc2def\n2026-11-22",
        "abc3def\n2026-11-23",
    ]
    lines = {line.get_label(): list(line.get_xdata()) for line in ratio.get_lines()}
    # The run without a compile field joins the eager line; the compiled run is its own entry.
    assert lines == {
        "tiny_bcos 2×32² float32 compiled: e2kd-live": [2],
        "tiny_bcos 2×32² float32 compiled: kd": [2],
        "tiny_bcos 2×32² float32 eager: e2kd-live": [0, 1],
        "tiny_bcos 2×32² float32 eager: kd": [0, 1],
    }
    assert [line.get_label() for line in kernels.get_lines()] == ["tiny_bcos 2×32² float32 compiled: e2kd-live"]
    assert plot.gate_history_figure(_history(), suites=("ops",)) is None


def test_command_writes_the_pngs_and_reads_the_recorded_results(tmp_path, capsys):
    results = tmp_path / "cpu-test.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _history()))
    assert plot.main([str(results), "--out", str(tmp_path / "out")]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["gate_history-cpu-test.png", "step_vs_recipe.png"]
    assert all((tmp_path / "out" / name).read_bytes().startswith(b"\x89PNG") for name in written)
    assert "step_vs_recipe.png" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    assert plot.main([str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "bad.jsonl:1: not a JSON line" in capsys.readouterr().err
    # The recorded results draw, per file, a history and a row of the bar chart.
    files = {p.stem: common.read_jsonl(p) for p in sorted(common.RESULTS_DIR.glob("*.jsonl"))}
    fig = plot.step_vs_recipe_figure(files)
    with_steps = [name for name, records in files.items() if any(r.get("suite") == "step" for r in records)]
    assert len(fig.axes) == 2 * len(with_steps)
