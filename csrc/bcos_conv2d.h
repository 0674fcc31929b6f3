// Input checks and layout helpers of the library ops e2kd_cpp::bcos_conv2d_epilogue and
// e2kd_cpp::bcos_conv2d_patch_norm, shared by their CPU kernels (csrc/cpu/bcos_conv2d.cpp) and
// their CUDA kernels (csrc/cuda/bcos_conv2d.cu).
//
// The Python ops e2kd::bcos_conv2d and e2kd::patch_norm (e2kd_fast/ops/bcos_conv2d.py) call them
// as back ends; their fakes allocate the outputs in the memory format `format_of` picks, so both
// sides must decide it the same way (e2kd_fast/ops/_common.py `memory_format_of`).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace e2kd_cpp::bcos_conv2d {

// ChannelsLast for a 4-D tensor dense in that order (and not plain contiguous), else Contiguous.
inline at::MemoryFormat format_of(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// The conv's geometry (no dilation): kernel, stride and padding per spatial dimension, and groups.
struct Geometry {
  int64_t kh, kw, sh, sw, ph, pw, groups;

  int64_t out_h(int64_t h) const { return (h + 2 * ph - kh) / sh + 1; }
  int64_t out_w(int64_t w) const { return (w + 2 * pw - kw) / sw + 1; }
};

// x [N, C, H, W] with C divisible by groups; kernel, stride and padding pairs, positive (padding ≥ 0).
inline Geometry check_geometry(const char* op, const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                               at::IntArrayRef padding, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": kernel, stride and padding must be pairs");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, op, ": groups=", groups, " must divide the ", x.size(1),
              " input channels");
  TORCH_CHECK(kernel[0] > 0 && kernel[1] > 0 && stride[0] > 0 && stride[1] > 0 && padding[0] >= 0 &&
                  padding[1] >= 0,
              op, ": invalid kernel/stride/padding ", kernel, " ", stride, " ", padding);
  return {kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], groups};
}

// e2kd_cpp::bcos_conv2d_epilogue: linear = conv2d(x, ŵ) [N, O, Ho, Wo] with O divisible by groups
// and (Ho, Wo) the geometry's output size, in x's dtype and on x's device; B > 1.
inline Geometry check_epilogue_inputs(const at::Tensor& linear, const at::Tensor& x, at::IntArrayRef kernel,
                                      at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups, double b) {
  constexpr const char* op = "e2kd_cpp::bcos_conv2d_epilogue";
  const Geometry geo = check_geometry(op, x, kernel, stride, padding, groups);
  TORCH_CHECK(linear.dim() == 4 && linear.size(0) == x.size(0) && linear.size(1) % groups == 0, op,
              ": linear must be [N, O, Ho, Wo] with O divisible by groups, got ", linear.sizes());
  TORCH_CHECK(linear.scalar_type() == x.scalar_type(), op, ": linear and x dtypes differ");
  TORCH_CHECK(linear.device() == x.device(), op, ": linear and x are on different devices");
  TORCH_CHECK(b > 1, op, ": b must be > 1, got ", b);
  TORCH_CHECK(linear.size(2) == geo.out_h(x.size(2)) && linear.size(3) == geo.out_w(x.size(3)), op,
              ": linear's spatial size ", linear.sizes(), " does not match the geometry");
  return geo;
}

// e2kd_cpp::bcos_conv2d_patch_norm: with groups > 1 the norm is repeated to out_channels outputs.
inline Geometry check_patch_norm_inputs(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                                        at::IntArrayRef padding, int64_t groups, int64_t out_channels) {
  constexpr const char* op = "e2kd_cpp::bcos_conv2d_patch_norm";
  const Geometry geo = check_geometry(op, x, kernel, stride, padding, groups);
  TORCH_CHECK(groups == 1 || out_channels % groups == 0, op, ": out_channels=", out_channels,
              " is not divisible by groups=", groups);
  return geo;
}

}  // namespace e2kd_cpp::bcos_conv2d
