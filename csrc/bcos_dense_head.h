// Input checks of the library op e2kd_cpp::bcos_dense_head (csrc/cpu/bcos_dense_head.cpp), the cpp
// back end of e2kd::bcos_dense_head (e2kd_fast/ops/bcos_dense_head.py). A CUDA kernel would share them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace e2kd_cpp::bcos_dense_head {

constexpr const char* kOp = "e2kd_cpp::bcos_dense_head";

// Feature maps [N, C_i, H, W] sharing N, H, W, dtype and device; norm_scale [C] and w_hat [K, C, 1, 1]
// in their dtype (C = Σ C_i); B > 1. Returns C.
inline int64_t check_inputs(at::TensorList features, const at::Tensor& norm_scale, const at::Tensor& w_hat, double b) {
  TORCH_CHECK(!features.empty(), kOp, ": no feature maps");
  const at::Tensor& first = features[0];
  TORCH_CHECK(first.dim() == 4, kOp, ": feature maps must be [N, C, H, W], got ", first.sizes());
  int64_t channels = 0;
  for (const at::Tensor& f : features) {
    TORCH_CHECK(f.dim() == 4 && f.size(0) == first.size(0) && f.size(2) == first.size(2) &&
                    f.size(3) == first.size(3),
                kOp, ": feature maps must share N, H and W, got ", first.sizes(), " and ", f.sizes());
    TORCH_CHECK(f.scalar_type() == first.scalar_type() && f.device() == first.device(), kOp,
                ": feature maps must share dtype and device");
    channels += f.size(1);
  }
  TORCH_CHECK(norm_scale.dim() == 1 && norm_scale.size(0) == channels, kOp, ": norm_scale must be [", channels,
              "], got ", norm_scale.sizes());
  TORCH_CHECK(w_hat.dim() == 4 && w_hat.size(1) == channels && w_hat.size(2) == 1 && w_hat.size(3) == 1, kOp,
              ": w_hat must be [K, ", channels, ", 1, 1], got ", w_hat.sizes());
  TORCH_CHECK(norm_scale.scalar_type() == first.scalar_type() && w_hat.scalar_type() == first.scalar_type(), kOp,
              ": norm_scale and w_hat must have the feature maps' dtype");
  TORCH_CHECK(b > 1, kOp, ": b must be > 1, got ", b);
  return channels;
}

}  // namespace e2kd_cpp::bcos_dense_head
