"""The kernel traffic model (`bench.kernel_traffic`): byte and FLOP counts by hand, floors from `bench.floor`."""

from __future__ import annotations

import pytest

from bench import floor, kernel_traffic


def test_conv_kernel_bytes_and_flops_match_a_hand_count():
    # N 2, C 4 → O 8, 6×6, 3×3, stride 1, padding 1: X = 288, Y = 576, Q = 72, K = 288, bf16.
    conv = kernel_traffic.Conv(4, 6, 6, 8, 3, 1, 1, 1)
    parts = kernel_traffic.conv_kernels(conv, 2, 2)
    assert parts["conv"][0].bytes == 2 * (288 + 288 + 576)
    assert parts["conv"][0].flops == 2 * 576 * 4 * 9
    assert parts["sumsq"][0].bytes == 2 * 288 + 4 * 72 and parts["sumsq"][1] == 2 * 288
    assert parts["epilogue"][0].bytes == 4 * 72 + 2 * 2 * 576
    assert parts["product"][0].bytes == 3 * 2 * 576
    assert parts["fused_conv"][0].bytes == 2 * (288 + 288 + 2 * 576) + 4 * 2 * 36
    # The implicit GEMM as built: its norm map (P = 72) instead of Σx², the two box-sum passes apart.
    assert parts["gemm_conv"][0].bytes == 2 * (288 + 288 + 2 * 576) + 4 * 72
    assert parts["box_norm"][0].bytes == 4 * (72 + 2 * 72 + 72)
    assert parts["gemm_product"][0].bytes == 2 * (288 + 288 + 4 * 576)
    # The memory-bound kernels put no FLOPs against the matmul rate.
    assert all(parts[k][0].flops == 0 for k in ("sumsq", "epilogue", "norm_epilogue", "product"))


@pytest.mark.parametrize("kind", sorted(floor.CEILINGS))
def test_layer_floor_is_the_sum_of_its_kernels(kind):
    conv = kernel_traffic.Conv(64, 56, 56, 64, 3, 1, 1, 1)
    f = kernel_traffic.op_floors(conv, 64, "bfloat16", kind)
    assert f["triton_layer"] == pytest.approx(f["conv"] + f["sumsq"] + f["epilogue"])
    assert f["conv"] <= f["fused_conv"] < f["triton_layer"]  # equal where the conv is compute-bound
    assert f["gemm_layer"] == pytest.approx(f["producer_sums"] + f["box_norm"] + f["gemm_conv"])
    assert f["fused_conv"] <= f["gemm_layer"] < f["triton_layer"]
    assert f["gemm_product"] < f["adjoint_backward"] == pytest.approx(f["conv"] + 2 * f["product"])
    assert f["sumsq"] == pytest.approx(
        kernel_traffic.conv_kernels(conv, 64, 2)["sumsq"][0].bytes / floor.CEILINGS[kind]["bytes_per_s"] * 1e3
    )


def test_loss_bytes_two_passes_and_on_chip():
    n, d, c = 4, kernel_traffic.MAP_ELEMENTS, kernel_traffic.LOSS_CLASSES
    assert kernel_traffic.loss_traffic(n, 2, False).bytes == 2 * 2 * n * (d + c)
    assert kernel_traffic.loss_traffic(n, 2, True).bytes == 2 * n * (5 * d + 3 * c)
    assert kernel_traffic.loss_traffic(n, 2, True, on_chip=True).bytes == 2 * n * (3 * d + 3 * c)
