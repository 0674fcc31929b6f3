"""The floor model (FLOPs, fewest bytes, roofline floor), the compiled step's Inductor counters and their
gate, and the one-call GPU script's dry run on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import bench_step, compare, floor, profile_step
from tests.test_bench import TINY_STEP_CONFIG

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------
# Counting FLOPs and bytes against hand counts
# --------------------------------------------------------------------------------------------------


def test_one_matmul_against_a_hand_count():
    m, k, n = 64, 32, 16
    a, b = torch.randn(m, k), torch.randn(k, n)
    t = floor.count_traffic(lambda: a @ b)
    assert t.flops == 2 * m * n * k
    assert t.bytes == (m * k + k * n + m * n) * 4


def test_flops_agree_with_flop_counter_mode():
    from torch.utils.flop_counter import FlopCounterMode

    conv, lin = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8 * 6 * 6, 5)
    x = torch.randn(2, 3, 8, 8)

    def step():
        lin(conv(x).flatten(1)).sum().backward()

    with FlopCounterMode(display=False) as counter:
        step()
    assert floor.count_traffic(step).flops == counter.get_total_flops() > 0


def test_a_registered_op_counts_the_flops_of_its_reference():
    """The sweep's adjoint is one op to the dispatch mode; its transposed conv must still count."""
    from torch.utils.flop_counter import FlopCounterMode

    from e2kd_fast import ops
    from e2kd_fast.ops import backends

    g, scale = torch.randn(2, 8, 6, 6), torch.rand(2, 8, 6, 6)
    weight = torch.randn(8, 3, 3, 3)
    geometry = ([8, 8], [1, 1], [0, 0], [1, 1], 1)
    reference = backends.registered("e2kd::scaled_conv_adjoint")["reference"]
    with FlopCounterMode(display=False) as counter:
        reference(g, scale, weight, *geometry)
    expected = counter.get_total_flops()
    assert expected > 0
    for backend in ("reference", "triton"):
        with backends.use_backend(backend):
            assert floor.count_traffic(lambda: ops.scaled_conv_adjoint(g, scale, weight, *geometry)).flops == expected


def test_each_storage_counts_once_views_and_in_place_add_nothing():
    x = torch.randn(100)

    def fn():
        y = x * 2  # read x (400 B), write y (400 B)
        y.add_(1)  # in place: y already counted
        y.view(10, 10).sum()  # a view of y adds nothing; the scalar sum writes 4 B
        return x[:50] + 1  # half of x was already counted; writes 200 B

    assert floor.count_traffic(fn).bytes == 400 + 400 + 4 + 200


def test_a_reused_address_is_new_data():
    x = torch.randn(1000)

    def fn():
        for _ in range(3):  # each temporary is freed; the allocator may hand its address to the next
            (x * 2).sum()

    assert floor.count_traffic(fn).bytes == 4000 + 3 * (4000 + 4)


def test_backward_and_optimizer_are_counted():
    lin = torch.nn.Linear(8, 4, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    x = torch.randn(2, 8)

    def step():
        opt.zero_grad(set_to_none=True)
        lin(x).sum().backward()
        opt.step()

    t = floor.count_traffic(step)
    assert t.flops == 2 * (2 * 2 * 8 * 4)  # forward and weight gradient, 2·M·N·K each (x needs no gradient)
    assert t.bytes >= (2 * 8 + 2 * 32 + 2 * 4) * 4  # x, weight and its gradient, the output


def test_floor_is_the_roofline_of_the_ceilings():
    t = floor.Traffic(flops=790 * 10**12, bytes=10**12, ops=1)  # 1 s of matmul, 0.23 s of copy on an H200
    f = floor.floor(t, "nvidia-h200", "bfloat16")
    assert f["bound"] == "compute" and f["floor_ms"] == pytest.approx(1000.0)
    assert f["memory_ms"] == pytest.approx(1e12 / 4.3e12 * 1e3)
    assert floor.over_floor(2000.0, t, "nvidia-h200", "bfloat16") == pytest.approx(2.0)
    assert floor.floor(t, "cpu-2core-x86_64", "float32") is None
    assert floor.over_floor(1.0, t, "cpu-2core-x86_64", "float32") is None
    # Every device's ceilings name their source, measured or datasheet.
    for kind, c in floor.CEILINGS.items():
        assert set(c["source"]) == {"bytes_per_s", "flops_per_s"}, kind
        assert all(s.startswith(("measured", "datasheet")) for s in c["source"].values()), kind


def test_extrapolation_from_two_batches_is_exact_for_a_step():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.randn(1, 3, 8, 8))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    def count(batch: int) -> floor.Traffic:
        x = torch.randn(batch, 3, 8, 8)

        def step():
            opt.zero_grad(set_to_none=True)
            net(x).square().sum().backward()
            opt.step()

        step()
        return floor.count_traffic(step)

    guess = floor.extrapolate(count(1), 1, count(2), 2, 5)
    exact = count(5)
    assert (guess.flops, guess.bytes) == (exact.flops, exact.bytes)


# --------------------------------------------------------------------------------------------------
# Inductor's counters and the gate on them
# --------------------------------------------------------------------------------------------------


def test_inductor_metrics_count_kernels_and_bytes():
    # The suite's Inductor cache: a hit replays the counts, and a cache of its own would rebuild the
    # C++ prelude (about 40 s on 2 cores).
    torch._dynamo.reset()
    x = torch.randn(64, 64)
    fn = torch.compile(lambda t: (t.sin() + 1).sum(1))
    with bench_step.inductor_metrics() as counted:
        fn(x)
    assert counted["kernels"] >= 1 and counted["bytes"] >= x.numel() * 4
    assert all(t >= 0.5 for t in counted["phases"].values())  # the compiler's timed phases of 0.5 s and more
    with bench_step.inductor_metrics() as again:
        fn(x)  # compiled already: nothing generated
    assert again["kernels"] == 0 and again["bytes"] is None and again["phases"] == {}


def _rec(variant: str, kernels: int, torch_version: str = "2.14.1") -> dict:
    return {
        "suite": "step",
        "key": "pair=a",
        "variant": variant,
        "reference": "reference",
        "status": "ok",
        "ratio": 0.5,
        "inductor_kernels": kernels,
        "env": {"device_kind": "cpu-2core-x86_64", "torch": torch_version},
    }


def test_gate_on_kernel_counts(tmp_path, capsys):
    def gate(base, new) -> int:
        paths = []
        for name, recs in (("base", base), ("new", new)):
            p = tmp_path / f"{name}.jsonl"
            p.write_text("".join(json.dumps(r) + "\n" for r in recs))
            paths.append(str(p))
        return compare.main([*paths, "--metrics", "ratio,inductor_kernels"])

    assert gate([_rec("e2kd-live", 100)], [_rec("e2kd-live", 100)]) == 0
    assert gate([_rec("e2kd-live", 100)], [_rec("e2kd-live", 99)]) == 0  # a fusion gained
    assert gate([_rec("e2kd-live", 100)], [_rec("e2kd-live", 101)]) == 1  # one lost: counts are exact
    capsys.readouterr()
    assert gate([_rec("e2kd-live", 100)], [_rec("e2kd-live", 130)]) == 1
    row = "| step | pair=a | e2kd-live | inductor_kernels | 100 | 130 | +30.0 % | REGRESSION |"
    assert row in capsys.readouterr().out
    # Another torch generates other kernels: shown, never a failure.
    assert gate([_rec("e2kd-live", 100)], [_rec("e2kd-live", 130, "2.15.0")]) == 0
    assert "torch differs" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# The step suite's records and the pieces of the GPU script
# --------------------------------------------------------------------------------------------------


def test_step_records_carry_bytes_floors_and_first_step_time(tmp_path):
    from bench.__main__ import main as bench_main

    out = tmp_path / "step.jsonl"
    args = ["step", "--device", "cpu", "--pairs", "tiny_bcos", "--batch", "2", "--resolution", "32"]
    bench_main([*args, "--variants", "reference,kd", "--rounds", "1", "--memory", "none", "--quiet", "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["variant"] for r in records} == {"reference", "kd"}
    for r in records:
        assert r["flops"] > 0 and r["bytes"] > 0 and r["first_step_s"] > 0
        assert set(r["floor_ms"]) == set(floor.CEILINGS) and all(v > 0 for v in r["floor_ms"].values())
        assert r["time_over_floor"] is None  # a CPU: no ceilings
        assert r["inductor_kernels"] is None  # not compiled


def test_step_time_budget_skips_later_variants_with_a_note(tmp_path):
    from bench.__main__ import main as bench_main

    out = tmp_path / "step.jsonl"
    args = ["step", "--device", "cpu", "--pairs", "tiny_bcos", "--batch", "2", "--resolution", "32", "--no-flops"]
    bench_main([*args, "--variants", "kd,reference", "--time-budget", "0.001", "--rounds", "1", "--memory", "none"]
               + ["--quiet", "--out", str(out)])  # fmt: skip
    by = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert by["kd"]["status"] == "ok" and by["kd"]["first_step_s"] > 0
    assert by["reference"]["status"] == "error" and "--time-budget" in by["reference"]["note"]


def test_warm_compile_probe_times_a_first_step_in_a_fresh_process():
    # compile off: the probe's mechanics; compiling here would take minutes
    config = {**TINY_STEP_CONFIG, "compile": False}
    seconds = bench_step.run_warm_compile_probe(config, "kd", torch.device("cpu"))
    assert seconds is not None and seconds > 0


def test_profile_step_prints_top_kernels(capsys):
    argv = ["--device", "cpu", "--pair", "tiny_bcos", "--batch", "2", "--resolution", "32", "--variant", "kd"]
    assert profile_step.main([*argv, "--warmup", "1", "--steps", "1", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "| kernel | calls/step | ms/step | share |" in out and "self cpu time" in out
    assert "by kind: " in out and "under 1 % each: " in out
    assert profile_step.kernel_kind("triton_per_fused_add_0") == "generated"
    assert profile_step.kernel_kind("sm90_xmma_dgrad_implicit_gemm_bf16") == "conv/matmul library"
    assert profile_step.kernel_kind("_conv_gemm_kernel") == "other"  # this project's Triton kernel
    assert profile_step.kernel_kind("void at::native::vectorized_elementwise_kernel<4>") == "other"


def test_gpu_script_is_valid_bash_and_knows_its_parts():
    script = ROOT / "bench" / "gpu_session.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for part in ("env", "build", "ceilings", "tests", "step", "profile", "layer", "loss", "graphs"):
        assert f"part {part} " in text or f'say "{part}: skipped' in text, part


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    """The whole script on the CPU at tiny sizes, eager (compiling takes minutes here), one variant."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), PY=sys.executable, STEP_COMPILE="0", STEP_VARIANTS="kd")
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_session.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert proc.returncode == 0, summary
    lines = {line.split(":")[0]: line for line in summary.splitlines()}
    for part in ("env", "ceilings", "step", "profile", "layer", "loss"):
        assert ": ok," in lines[part], summary
    for part in ("build", "tests"):
        assert ": skipped:" in lines[part], summary
    records = [json.loads(line) for line in (tmp_path / "out" / "step.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in records] == ["kd"] and records[0]["bytes"] > 0
    assert "| kernel | calls/step | ms/step | share |" in (tmp_path / "out" / "profile.log").read_text()
