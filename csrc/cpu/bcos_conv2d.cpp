// The B-cos conv epilogue on the CPU: patch norm and dynamic scale from the conv output and its input.
//
// Given l = conv2d(x, ŵ) [N, O, Ho, Wo] and x [N, C, H, W] (NCHW or channels_last, any strides):
//   q[n, g, h, w]   = Σ_{c ∈ group g} x[n, c, h, w]²                (one pass over x)
//   n[n, g, ho, wo] = sqrt(Σ_{kh, kw} q[n, g, ho·sh − ph + kh, wo·sw − pw + kw] + 1e-6)   (zero padding)
//   s               = |l| / n  (B = 2)   or   (|l / n| + 1e-6)^(B − 1)
//   y               = s · l  (only when asked)
// The norm of one output row is computed once and applied to every output channel of its group, so
// l is read once. Arithmetic is in at::opmath_type (float for float, double for double).
//
// Library ops, called by the cpp back ends of e2kd::bcos_conv2d and e2kd::patch_norm
// (e2kd_fast/ops/bcos_conv2d.py):
//   e2kd_cpp::bcos_conv2d_epilogue(linear, x, kernel, stride, padding, groups, b, write_out) -> (scale, out)
//   e2kd_cpp::bcos_conv2d_patch_norm(x, kernel, stride, padding, groups, out_channels) -> norm
// `out` is an empty tensor when write_out is false. Outputs take x's memory format (the Python fakes
// say the same). The CUDA implementation is csrc/cuda/bcos_conv2d.cu; the input checks and the
// memory-format rule both use are csrc/bcos_conv2d.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../bcos_conv2d.h"

namespace e2kd_cpp {
namespace {

using at::Tensor;

using bcos_conv2d::format_of;
using bcos_conv2d::Geometry;

// q[(n·G + g)·H·W + h·W + w] = Σ_c x², in opmath precision.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> channel_sum_of_squares(const Tensor& x, int64_t groups) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), cg = C / groups;
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  std::vector<acc_t> q(N * groups * H * W, acc_t(0));
  // One task per (n, g, h) row; the inner loop runs along the contiguous dimension.
  at::parallel_for(0, N * groups * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % H, ng = row / H, g = ng % groups, n = ng / groups;
      acc_t* out = q.data() + row * W;
      const scalar_t* base = xp + n * sn + g * cg * sc + h * sh;
      if (sc == 1 && cg > 1) {  // channels_last: channels are contiguous per pixel
        for (int64_t w = 0; w < W; ++w) {
          const scalar_t* px = base + w * sw;
          acc_t acc = 0;
          for (int64_t c = 0; c < cg; ++c) {
            const acc_t v = static_cast<acc_t>(px[c]);
            acc += v * v;
          }
          out[w] = acc;
        }
      } else if (sw == 1) {  // NCHW: contiguous rows, a vectorisable inner loop
        for (int64_t c = 0; c < cg; ++c) {
          const scalar_t* __restrict__ pc = base + c * sc;
          acc_t* __restrict__ o = out;
          for (int64_t w = 0; w < W; ++w) {
            const acc_t v = static_cast<acc_t>(pc[w]);
            o[w] += v * v;
          }
        }
      } else {
        for (int64_t c = 0; c < cg; ++c) {
          const scalar_t* pc = base + c * sc;
          for (int64_t w = 0; w < W; ++w) {
            const acc_t v = static_cast<acc_t>(pc[w * sw]);
            out[w] += v * v;
          }
        }
      }
    }
  });
  return q;
}

// The norms of output row ho of plane (n, g) into norm[0 .. Wo).
template <typename acc_t>
inline void norm_row(const acc_t* plane, int64_t H, int64_t W, int64_t ho, int64_t Wo, const Geometry& geo,
                     acc_t* norm) {
  for (int64_t wo = 0; wo < Wo; ++wo) norm[wo] = 0;
  for (int64_t kh = 0; kh < geo.kh; ++kh) {
    const int64_t ih = ho * geo.sh - geo.ph + kh;
    if (ih < 0 || ih >= H) continue;
    const acc_t* row = plane + ih * W;
    for (int64_t kw = 0; kw < geo.kw; ++kw) {
      for (int64_t wo = 0; wo < Wo; ++wo) {
        const int64_t iw = wo * geo.sw - geo.pw + kw;
        if (iw >= 0 && iw < W) norm[wo] += row[iw];
      }
    }
  }
  for (int64_t wo = 0; wo < Wo; ++wo) norm[wo] = std::sqrt(norm[wo] + acc_t(1e-6));
}

// For every (n, g, ho): one norm row, then `apply(n, o, ho, wo, norm)` for every channel o of group g,
// in the order that walks `layout` contiguously.
template <typename acc_t, typename F>
void for_each_row(const std::vector<acc_t>& q, int64_t N, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                  int64_t o_per_group, bool channels_inner, const Geometry& geo, const F& apply) {
  at::parallel_for(0, N * geo.groups * Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> norm(Wo);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t ho = row % Ho, ng = row / Ho, g = ng % geo.groups, n = ng / geo.groups;
      norm_row(q.data() + ng * H * W, H, W, ho, Wo, geo, norm.data());
      const int64_t o0 = g * o_per_group;
      if (channels_inner) {
        for (int64_t wo = 0; wo < Wo; ++wo)
          for (int64_t o = o0; o < o0 + o_per_group; ++o) apply(n, o, ho, wo, norm[wo]);
      } else {
        for (int64_t o = o0; o < o0 + o_per_group; ++o)
          for (int64_t wo = 0; wo < Wo; ++wo) apply(n, o, ho, wo, norm[wo]);
      }
    }
  });
}

std::tuple<Tensor, Tensor> bcos_conv2d_epilogue_cpu(const Tensor& linear, const Tensor& x, at::IntArrayRef kernel,
                                                    at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups,
                                                    double b, bool write_out) {
  const Geometry geo = bcos_conv2d::check_epilogue_inputs(linear, x, kernel, stride, padding, groups, b);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t O = linear.size(1), Ho = linear.size(2), Wo = linear.size(3);
  const auto options = linear.options().memory_format(format_of(x));
  Tensor scale = at::empty(linear.sizes(), options);
  Tensor out = write_out ? at::empty(linear.sizes(), options) : at::empty({0}, linear.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "e2kd_cpp::bcos_conv2d_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto q = channel_sum_of_squares<scalar_t, acc_t>(x, groups);
    const scalar_t* lp = linear.const_data_ptr<scalar_t>();
    scalar_t* sp = scale.mutable_data_ptr<scalar_t>();
    scalar_t* yp = write_out ? out.mutable_data_ptr<scalar_t>() : nullptr;
    const auto ls = linear.strides();
    const auto ss = scale.strides();
    const bool b2 = b == 2.0;
    const acc_t exponent = static_cast<acc_t>(b - 1.0);
    const bool flat_rows = ls[3] == 1 && ss[3] == 1 && ss[1] != 1;
    if (flat_rows) {  // NCHW: one vectorisable loop per (n, o, ho) row of l
      const int64_t og = O / groups;
      at::parallel_for(0, N * groups * Ho, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> norm(Wo);
        for (int64_t row = begin; row < end; ++row) {
          const int64_t ho = row % Ho, ng = row / Ho, g = ng % groups, n = ng / groups;
          norm_row(q.data() + ng * H * W, H, W, ho, Wo, geo, norm.data());
          const acc_t* __restrict__ nr = norm.data();
          for (int64_t o = g * og; o < (g + 1) * og; ++o) {
            const scalar_t* __restrict__ lr = lp + n * ls[0] + o * ls[1] + ho * ls[2];
            scalar_t* __restrict__ sr = sp + n * ss[0] + o * ss[1] + ho * ss[2];
            if (b2) {
              for (int64_t wo = 0; wo < Wo; ++wo) sr[wo] = static_cast<scalar_t>(std::abs(static_cast<acc_t>(lr[wo])) / nr[wo]);
            } else {
              for (int64_t wo = 0; wo < Wo; ++wo)
                sr[wo] = static_cast<scalar_t>(std::pow(std::abs(static_cast<acc_t>(lr[wo]) / nr[wo]) + acc_t(1e-6), exponent));
            }
            if (yp) {
              scalar_t* __restrict__ yr = yp + n * ss[0] + o * ss[1] + ho * ss[2];
              for (int64_t wo = 0; wo < Wo; ++wo) yr[wo] = static_cast<scalar_t>(static_cast<acc_t>(sr[wo]) * static_cast<acc_t>(lr[wo]));
            }
          }
        }
      });
      return;
    }
    for_each_row<acc_t>(q, N, H, W, Ho, Wo, O / groups, ss[1] == 1, geo,
                        [&](int64_t n, int64_t o, int64_t ho, int64_t wo, acc_t norm) {
                          const acc_t l = static_cast<acc_t>(lp[n * ls[0] + o * ls[1] + ho * ls[2] + wo * ls[3]]);
                          const acc_t s = b2 ? std::abs(l) / norm : std::pow(std::abs(l / norm) + acc_t(1e-6), exponent);
                          const int64_t at = n * ss[0] + o * ss[1] + ho * ss[2] + wo * ss[3];
                          sp[at] = static_cast<scalar_t>(s);
                          if (yp) yp[at] = static_cast<scalar_t>(s * l);
                        });
  });
  return {scale, out};
}

Tensor bcos_conv2d_patch_norm_cpu(const Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                                  at::IntArrayRef padding, int64_t groups, int64_t out_channels) {
  const Geometry geo = bcos_conv2d::check_patch_norm_inputs(x, kernel, stride, padding, groups, out_channels);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t Ho = geo.out_h(H), Wo = geo.out_w(W);
  const int64_t channels = groups > 1 ? out_channels : 1;
  Tensor norm = at::empty({N, channels, Ho, Wo}, x.options().memory_format(format_of(x)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "e2kd_cpp::bcos_conv2d_patch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto q = channel_sum_of_squares<scalar_t, acc_t>(x, groups);
    scalar_t* np = norm.mutable_data_ptr<scalar_t>();
    const auto ns = norm.strides();
    for_each_row<acc_t>(q, N, H, W, Ho, Wo, channels / groups, ns[1] == 1, geo,
                        [&](int64_t n, int64_t o, int64_t ho, int64_t wo, acc_t value) {
                          np[n * ns[0] + o * ns[1] + ho * ns[2] + wo * ns[3]] = static_cast<scalar_t>(value);
                        });
  });
  return norm;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(e2kd_cpp, m) {
  m.def(
      "bcos_conv2d_epilogue(Tensor linear, Tensor x, int[] kernel, int[] stride, int[] padding, int groups, float b, "
      "bool write_out) -> (Tensor, Tensor)");
  m.def(
      "bcos_conv2d_patch_norm(Tensor x, int[] kernel, int[] stride, int[] padding, int groups, int out_channels) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(e2kd_cpp, CPU, m) {
  m.impl("bcos_conv2d_epilogue", &bcos_conv2d_epilogue_cpu);
  m.impl("bcos_conv2d_patch_norm", &bcos_conv2d_patch_norm_cpu);
}

}  // namespace e2kd_cpp
