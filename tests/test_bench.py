"""The benchmark harness: statistics, device keys, the regression gate on crafted inputs, and CPU smoke
runs of every suite at tiny sizes (they check the harness and its JSON lines, not the speed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import bench_ops, bench_step, common, compare
from bench.__main__ import main as bench_main

REQUIRED_FIELDS = {"schema", "run_id", "timestamp", "suite", "key", "variant", "reference", "status", "config", "env"}
ENV_FIELDS = {"device", "device_kind", "driver", "torch", "triton", "cuda", "cudnn", "python", "git_commit", "loadavg"}


# --------------------------------------------------------------------------------------------------
# Helpers and statistics
# --------------------------------------------------------------------------------------------------


def test_summarize_gives_median_and_spread():
    stats = common.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stats["median"] == 3.0 and stats["min"] == 1.0 and stats["max"] == 5.0 and stats["n"] == 5
    assert stats["p20"] == pytest.approx(1.8) and stats["p80"] == pytest.approx(4.2)
    with pytest.raises(ValueError):
        common.summarize([])


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("NVIDIA H100 80GB HBM3", "nvidia-h100"),
        ("NVIDIA H200", "nvidia-h200"),
        ("NVIDIA A100-SXM4-80GB", "nvidia-a100"),
    ],
)
def test_gpu_device_kind(name, kind):
    assert common.device_kind_from_name(name) == kind


def test_cpu_device_kind_and_config_key():
    assert common.device_kind_from_name("AMD EPYC", cores=2, machine="x86_64") == "cpu-2core-x86_64"
    assert common.config_key({"b": 2, "a": [1, 2]}) == common.config_key({"a": (1, 2), "b": 2}) == "a=1x2,b=2"


def test_roofline_share_on_a_known_device():
    # 1 GB in 1 ms on an H100 (3.35 TB/s): the bandwidth bound is 1e9 / 3.35e12 s → share ≈ 0.30.
    out = common.roofline("nvidia-h100", "bfloat16", flops=None, nbytes=10**9, time_ms=1.0)
    assert out["gbps"] == pytest.approx(1000.0) and out["roofline_share"] == pytest.approx(1e9 / 3.35e12 / 1e-3)
    assert common.roofline("cpu-2core-x86_64", "float32", 10**9, 10**9, 1.0)["roofline_share"] is None


def test_count_flops_sees_through_autograd_grad():
    conv = torch.nn.Conv2d(3, 8, 3)
    x = torch.randn(1, 3, 10, 10, requires_grad=True)

    def explain_and_backward():
        (e,) = torch.autograd.grad(conv(x).sum(), x, create_graph=True)
        e.pow(2).sum().backward()

    forward_flops = 2 * 8 * 3 * 9 * 8 * 8
    assert common.count_flops(lambda: conv(x)) == forward_flops
    assert common.count_flops(explain_and_backward) >= 3 * forward_flops


# --------------------------------------------------------------------------------------------------
# The gate on crafted inputs
# --------------------------------------------------------------------------------------------------


def rec(
    variant: str,
    ratio: float | None,
    *,
    key: str = "pair=a",
    kind: str = "nvidia-h100",
    suite: str = "step",
    status: str = "ok",
    mem_ratio: float | None = None,
    reference: str = "reference",
) -> dict[str, Any]:
    return {
        "schema": 1,
        "suite": suite,
        "key": key,
        "variant": variant,
        "reference": reference,
        "status": status,
        "ratio": ratio,
        "mem_ratio": mem_ratio,
        "env": {"device_kind": kind},
    }


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def gate(tmp_path: Path, baseline: list[dict], new: list[dict], *extra: str) -> int:
    return compare.main(
        [str(write(tmp_path / "base.jsonl", baseline)), str(write(tmp_path / "new.jsonl", new)), *extra]
    )


def test_gate_passes_within_the_threshold(tmp_path, capsys):
    base = [rec("reference", 1.0), rec("e2kd-live", 0.50), rec("kd", 0.25)]
    new = [rec("reference", 1.0), rec("e2kd-live", 0.54), rec("kd", 0.20)]  # +8 %, −20 %
    assert gate(tmp_path, base, new, "--max-regression", "0.10") == 0
    out = capsys.readouterr().out
    assert "improved" in out and "REGRESSION" not in out
    assert "| step | pair=a | reference |" not in out  # a reference against itself is not an entry


def test_gate_fails_on_a_regression_and_names_it(tmp_path, capsys):
    base = [rec("e2kd-live", 0.50), rec("kd", 0.25, key="pair=b")]
    new = [rec("e2kd-live", 0.56), rec("kd", 0.25, key="pair=b")]  # +12 % > 10 %
    assert gate(tmp_path, base, new) == 1
    out = capsys.readouterr().out
    assert "| step | pair=a | e2kd-live | ratio | 0.500 | 0.560 | +12.0 % | REGRESSION |" in out
    assert "1 regression(s)" in out
    assert gate(tmp_path, base, new, "--max-regression", "0.15") == 0


def test_gate_refuses_different_device_kinds(tmp_path, capsys):
    assert gate(tmp_path, [rec("kd", 0.3)], [rec("kd", 0.3, kind="nvidia-h200")]) == 2
    assert "device kinds differ" in capsys.readouterr().err


def test_gate_can_select_one_kind_from_a_mixed_file(tmp_path):
    base = [rec("kd", 0.3), rec("kd", 0.9, kind="cpu-2core-x86_64")]
    new = [rec("kd", 0.3), rec("kd", 2.0, kind="cpu-2core-x86_64")]
    assert gate(tmp_path, base, new) == 2  # mixed kinds without a choice
    assert gate(tmp_path, base, new, "--device-kind", "nvidia-h100") == 0
    assert gate(tmp_path, base, new, "--device-kind", "cpu-2core-x86_64") == 1


def test_gate_reports_missing_entries(tmp_path, capsys):
    base = [rec("kd", 0.3), rec("e2kd-live", 0.5)]
    new = [rec("kd", 0.3), rec("e2kd-frozen", 0.4)]
    assert gate(tmp_path, base, new) == 0
    out = capsys.readouterr().out
    assert "missing in new" in out and "new entry" in out and "1 missing in new" in out
    assert gate(tmp_path, base, new, "--fail-on-missing") == 1


def test_gate_uses_the_latest_record_and_ignores_unusable_ones(tmp_path):
    base = [rec("kd", 0.3)]
    history = [rec("kd", 0.9), rec("kd", 0.31), rec("kd", 5.0, status="error"), rec("fast", None, suite="ops")]
    assert gate(tmp_path, base, history) == 0
    assert gate(tmp_path, base, [*history, rec("kd", 0.5)]) == 1


def test_gate_on_memory_ratios(tmp_path):
    base = [rec("e2kd-live", 0.5, mem_ratio=0.20)]
    new = [rec("e2kd-live", 0.5, mem_ratio=0.30)]
    assert gate(tmp_path, base, new) == 0
    assert gate(tmp_path, base, new, "--metrics", "ratio,mem_ratio") == 1


def test_gate_rejects_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"suite": "step"\n')
    good = write(tmp_path / "good.jsonl", [rec("kd", 0.3)])
    assert compare.main([str(bad), str(good)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert gate(tmp_path, [], [rec("kd", 0.3)]) == 2


# --------------------------------------------------------------------------------------------------
# CPU smoke runs of the suites
# --------------------------------------------------------------------------------------------------


def read_records(path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        assert REQUIRED_FIELDS <= r.keys(), REQUIRED_FIELDS - r.keys()
        assert ENV_FIELDS <= r["env"].keys(), ENV_FIELDS - r["env"].keys()
        assert r["env"]["device_kind"].startswith("cpu-")
        if r["status"] == "ok":
            t = r["time_ms"]
            assert 0 < t["min"] <= t["p20"] <= t["median"] <= t["p80"] <= t["max"]
    return records


def test_ops_suite_smoke(tmp_path, capsys):
    out = tmp_path / "ops.jsonl"
    args = ["ops", "--device", "cpu", "--shapes", "small", "--providers", "reference-eager,fast", "--repeats", "2"]
    bench_main([*args, "--warmup", "1", "--quiet", "--out", str(out)])
    records = read_records(out)
    eager = [r for r in records if r["variant"] == "reference-eager"]
    assert eager and all(r["status"] == "ok" for r in eager)
    assert {r["config"]["mode"] for r in eager if r["config"]["op"] == "bcos_conv2d"} == {
        "fwd",
        "bwd",
        "exp",
        "exp_bwd",
    }
    assert {r["config"]["mode"] for r in eager if r["config"]["op"] == "kd_kl"} == {"fwd", "bwd"}
    conv_fwd = next(r for r in eager if r["config"]["op"] == "bcos_conv2d" and r["config"]["mode"] == "fwd")
    assert conv_fwd["flops"] > 0 and conv_fwd["bytes"] > 0 and conv_fwd["ratio"] == 1.0
    fast = [r for r in records if r["variant"] == "fast"]
    assert len(fast) == len(eager)
    # Ops without a fast path have "unsupported" fast records; the others ran (or name why not).
    no_path = [r for r in fast if r["config"]["op"] not in bench_ops.FAST_PATHS]
    assert no_path and all(r["status"] == "unsupported" and r["ratio"] is None for r in no_path)
    table = capsys.readouterr().out
    assert "| op | shape | mode | reference-eager ms | fast ms |" in table and "| – |" in table


def test_ops_compiled_provider_skips_double_backward_without_compiling(tmp_path):
    out = tmp_path / "ops.jsonl"
    bench_main(["ops", "--device", "cpu", "--shapes", "small", "--ops", "bcos_conv2d", "--modes", "exp,exp_bwd",
                "--providers", "reference-compiled", "--quiet", "--out", str(out)])  # fmt: skip
    records = read_records(out)
    assert records and all(r["status"] == "unsupported" and "double backward" in r["note"] for r in records)


def test_step_suite_smoke(tmp_path, capsys):
    out = tmp_path / "step.jsonl"
    args = ["step", "--device", "cpu", "--pairs", "tiny_bcos,tiny_gradcam", "--batch", "2", "--resolution", "32"]
    bench_main([*args, "--rounds", "2", "--memory", "none", "--quiet", "--out", str(out)])
    records = read_records(out)
    assert {(r["config"]["pair"], r["variant"]) for r in records} == {
        (p, v) for p in ("tiny_bcos", "tiny_gradcam") for v in bench_step.DEFAULT_VARIANTS
    }
    for r in records:
        assert r["status"] == "ok" and r["time_ms"]["n"] == 2 and len(r["samples_ms"]) == 2
        assert r["throughput"]["unit"] == "img/s" and r["ratio"] > 0
        assert r["teacher_requires_grad"] == (r["variant"] == "reference")
    by = {(r["config"]["pair"], r["variant"]): r for r in records}
    # The same maths: our live step and the reference recipe do the same FLOPs; KD about half.
    # The sweep needs no double backward: our step does at most the reference recipe's FLOPs.
    assert by["tiny_bcos", "e2kd-live"]["flops"] <= by["tiny_bcos", "reference"]["flops"]
    assert by["tiny_bcos", "kd"]["flops"] < by["tiny_bcos", "e2kd-live"]["flops"]
    assert by["tiny_bcos", "reference"]["ratio"] == 1.0
    assert "speed vs reference" in capsys.readouterr().out
    # The recorded file gates against itself.
    assert compare.main([str(out), str(out)]) == 0


def test_warm_compile_records_the_median_of_its_fresh_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)  # the harness, not the compiler
    probes = iter([3.0, None, 1.0])  # one probe process failed
    monkeypatch.setattr(bench_step, "run_warm_compile_probe", lambda config, variant, device: next(probes))
    out = tmp_path / "step.jsonl"
    args = ["step", "--device", "cpu", "--pairs", "tiny_bcos", "--batch", "2", "--resolution", "32", "--compile"]
    bench_main([*args, "--variants", "reference,kd", "--warm-compile", "--warm-compile-runs", "3", "--rounds", "1",
                "--memory", "none", "--no-flops", "--quiet", "--out", str(out)])  # fmt: skip
    by = {r["variant"]: r for r in read_records(out)}
    assert by["kd"]["warm_first_step_samples_s"] == [3.0, None, 1.0] and by["kd"]["warm_first_step_s"] == 2.0
    assert by["reference"]["warm_first_step_s"] is None
    with pytest.raises(SystemExit, match="--warm-compile-runs must be at least 1"):
        bench_main([*args, "--warm-compile", "--warm-compile-runs", "0", "--quiet", "--out", str(out)])


# One configuration of the step suite at tiny sizes, for the probes that run in a fresh process.
TINY_STEP_CONFIG = {
    "pair": "tiny_bcos",
    "student": "bcos_resnet20_cifar",
    "teacher": "bcos_resnet32_cifar",
    "explanation": "bcos",
    "batch": 2,
    "resolution": 32,
    "dtype": "float32",
    "channels_last": False,
    "tau": 1.0,
    "lam": 1.0,
    "optimizer": "sgd",
}


def test_step_memory_probe_in_a_fresh_process():
    memory = bench_step.run_memory_probe(TINY_STEP_CONFIG, "reference", torch.device("cpu"))
    assert memory["step_bytes"] > 0 and memory["peak_bytes"] > memory["step_bytes"], memory
    assert "fresh process" in memory["method"]


def test_data_suite_smoke(tmp_path):
    out = tmp_path / "data.jsonl"
    args = ["data", "--device", "cpu", "--images", "8", "--batch", "4", "--workers", "0", "--size", "32"]
    bench_main([*args, "--rounds", "1", "--data-root", str(tmp_path / "jpegs"), "--quiet", "--out", str(out)])
    records = {r["variant"]: r for r in read_records(out)}
    assert len(list((tmp_path / "jpegs" / "train").rglob("*.JPEG"))) == 8
    assert records["torchvision"]["status"] == "ok" and records["torchvision"]["epoch_images"] == 8
    assert records["torchvision"]["ratio"] == 1.0
    assert records["dali-cpu"]["status"] in ("ok", "unsupported")
    if records["dali-cpu"]["status"] == "ok":
        assert records["dali-cpu"]["epoch_images"] == 8 and records["dali-cpu"]["ratio"] > 0
    if not torch.cuda.is_available():
        assert records["dali-gpu"]["status"] == "unsupported"


def test_layer_benchmark_proposes_the_fastest_per_shape_class():
    """Per op and conv shape class, the candidate with the lowest median time over the class's
    shapes; a kernel must beat the reference there to be proposed."""
    from bench.bench_bcos_conv2d import propose_fastest

    def row(ref, epilogue, gemm, ref_adj, adj, gemm_adj):
        return {
            "ref layer": ref,
            "triton layer": epilogue,
            "triton implicit-gemm layer": gemm,
            "ref adjoint": ref_adj,
            "triton adjoint": adj,
            "triton implicit-gemm adjoint": gemm_adj,
        }

    results = [
        ((64, 56, 56, 64, 3, 1, 1, 1), row(1.0, 2.0, 0.8, 1.0, 3.0, 0.9)),
        ((128, 28, 28, 128, 3, 1, 1, 1), row(1.0, 2.0, 0.9, 1.0, 3.0, 1.2)),
        ((128, 28, 28, 128, 3, 1, 1, 1), row(1.0, 2.0, 0.7, 1.0, 3.0, 0.95)),
        ((64, 56, 56, 128, 1, 2, 0, 1), row(1.0, 0.9, 1.5, 1.0, 3.0, 2.0)),
    ]
    assert propose_fastest(results, "cuda") == {
        "e2kd::bcos_conv2d@cuda@k1x1-s2x2": "triton:cudnn-epilogue",
        "e2kd::bcos_conv2d@cuda@k3x3-s1x1": "triton:implicit-gemm",
        "e2kd::scaled_conv_adjoint@cuda@k1x1-s2x2": "reference",
        "e2kd::scaled_conv_adjoint@cuda@k3x3-s1x1": "triton:implicit-gemm",
    }
    assert propose_fastest([((6, 8, 8, 4, 3, 1, 1, 1), {"ref epilogue": 1.0})], "cpu") == {}


# --------------------------------------------------------------------------------------------------
# The offline sm_90 compile
# --------------------------------------------------------------------------------------------------


def test_offline_gpu_compile_restores_what_it_patches():
    """Leaving the fake sm_90 device, normally or by an error, puts back every attribute it patched,
    the Triton driver and Inductor's build threads; meanwhile only the compiler's view changes."""
    from bench import offline_gpu_compile as offline

    if offline.missing_internals():
        pytest.skip(offline.missing_internals())
    from torch._dynamo.device_interface import CudaInterface
    from triton.runtime.driver import driver

    def state():
        return (
            [vars(t).get(name) if isinstance(t, type) else getattr(t, name) for t, name, _ in offline._patches([])],
            driver._active,
            torch._inductor.config.compile_threads,
        )

    before = state()
    with offline.sm90_without_a_device([]):
        assert CudaInterface.get_compute_capability() == 90 and CudaInterface.is_available()
        assert torch.cuda.get_device_properties().multi_processor_count == 132
        assert torch._inductor.config.compile_threads == 1
        assert not torch.cuda.is_available()
    assert state() == before
    with pytest.raises(RuntimeError, match="inside"), offline.sm90_without_a_device([]):
        raise RuntimeError("inside")
    assert state() == before


def test_offline_gpu_compile_builds_a_teacher_graph_for_sm90(tmp_path):
    """The tiny pair's e²KD teacher graph, compiled cold for sm_90 under bf16 autocast in a process of
    its own (outside Triton's interpreter, which would build nothing): kernels built with their
    configs, the counts consistent. The tool itself fails if the compiled graph runs."""
    import os
    import subprocess
    import sys

    from bench import offline_gpu_compile as offline

    if offline.missing_internals():
        pytest.skip(offline.missing_internals())
    out = tmp_path / "offline.jsonl"
    args = ["--pair", "tiny_bcos", "--batch", "2", "--resolution", "16", "--quiet", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.offline_gpu_compile", *args],
        cwd=common.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = common.read_jsonl(out)
    assert record["graph"] == "teacher e2kd" and record["dtype"] == "bfloat16" and record["channels_last"]
    per_kernel = {int(k): n for k, n in record["configs_per_kernel"].items()}
    assert record["triton_kernels"] > 0 and sum(per_kernel.values()) == record["triton_kernels"]
    assert sum(k * n for k, n in per_kernel.items()) == record["configs_built"]
    assert record["configs_benchmarked"] == record["configs_built"] - per_kernel.get(1, 0)
    assert record["kernels_autotuned"] == record["triton_kernels"] - per_kernel.get(1, 0)
    assert record["build_s"] > 0 and record["main_process_s"] > 0
    assert record["device_kind"].startswith("cpu-") and record["git_commit"]
    assert "| tiny_bcos teacher e2kd |" in done.stdout
    # Triton's interpreter leaves nothing to build: the tool says so rather than report nothing.
    refused = subprocess.run(
        [sys.executable, "-m", "bench.offline_gpu_compile", "--pair", "tiny_bcos", "--quiet"],
        cwd=common.REPO_ROOT,
        env={**env, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2 and "TRITON_INTERPRET=1" in refused.stderr
