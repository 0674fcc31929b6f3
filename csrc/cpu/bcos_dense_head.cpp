// A dense layer's head in eval mode on the CPU: the scaled concatenation, its 1×1 B-cos conv and scale.
//
// Given the feature maps f_i [N, C_i, H, W] (C = Σ C_i), the norm's per-channel scale a [C] and the
// unit-norm weight ŵ [K, C, 1, 1]:
//   x[n, c, h, w] = a[c] · cat(f)[n, c, h, w]          and   q[n, h, w] = Σ_c x²   (one pass over f)
//   l             = conv2d(x, ŵ)                        (ATen's convolution)
//   s             = |l| / sqrt(q + 1e-6)  (B = 2)   or   (|l / sqrt(q + 1e-6)| + 1e-6)^(B − 1)
//   out           = s · l                               (one pass over l)
// Arithmetic in at::opmath_type. Inductor's two kernels per head read the concatenation about four
// times; this reads the features once, writes x once, and the conv reads x.
//
// Library op, called by the cpp back end of e2kd::bcos_dense_head (e2kd_fast/ops/bcos_dense_head.py):
//   e2kd_cpp::bcos_dense_head(Tensor[] features, Tensor norm_scale, Tensor w_hat, float b) -> (out, scale)
// Outputs take features[0]'s memory format (NCHW or channels_last), as the Python fake says. The
// input checks are csrc/bcos_dense_head.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../bcos_conv2d.h"
#include "../bcos_dense_head.h"

namespace e2kd_cpp {
namespace {

using at::Tensor;
using bcos_conv2d::format_of;
using bcos_dense_head::check_inputs;
using bcos_dense_head::kOp;

// x = a ⊙ cat(features) in `fmt`, and q[n·H·W + p] = Σ_c x² (p = h·W + w).
template <typename scalar_t, typename acc_t>
std::vector<acc_t> scaled_concatenation(const std::vector<Tensor>& features, const Tensor& norm_scale, Tensor& x,
                                        bool channels_last) {
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const scalar_t* ap = norm_scale.const_data_ptr<scalar_t>();
  scalar_t* xp = x.mutable_data_ptr<scalar_t>();
  std::vector<acc_t> q(N * P, acc_t(0));
  if (channels_last) {  // one task per pixel: every map's channels are contiguous there
    at::parallel_for(0, N * P, 64, [&](int64_t begin, int64_t end) {
      for (int64_t pixel = begin; pixel < end; ++pixel) {
        scalar_t* __restrict__ dst = xp + pixel * C;
        acc_t acc = 0;
        int64_t c0 = 0;
        for (const Tensor& f : features) {
          const int64_t cf = f.size(1);
          const scalar_t* __restrict__ src = f.const_data_ptr<scalar_t>() + pixel * cf;
          for (int64_t c = 0; c < cf; ++c) {
            const acc_t v = static_cast<acc_t>(ap[c0 + c]) * static_cast<acc_t>(src[c]);
            dst[c0 + c] = static_cast<scalar_t>(v);
            acc += v * v;
          }
          c0 += cf;
        }
        q[pixel] = acc;
      }
    });
    return q;
  }
  constexpr int64_t kBlock = 256;  // pixels per task: a vectorisable inner loop over contiguous rows
  const int64_t blocks = (P + kBlock - 1) / kBlock;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, p0 = (task % blocks) * kBlock, len = std::min(kBlock, P - p0);
      acc_t* __restrict__ acc = q.data() + n * P + p0;
      int64_t c0 = 0;
      for (const Tensor& f : features) {
        const int64_t cf = f.size(1);
        const scalar_t* base = f.const_data_ptr<scalar_t>() + n * cf * P + p0;
        for (int64_t c = 0; c < cf; ++c) {
          const acc_t a = static_cast<acc_t>(ap[c0 + c]);
          const scalar_t* __restrict__ src = base + c * P;
          scalar_t* __restrict__ dst = xp + (n * C + c0 + c) * P + p0;
          for (int64_t i = 0; i < len; ++i) {
            const acc_t v = a * static_cast<acc_t>(src[i]);
            dst[i] = static_cast<scalar_t>(v);
            acc[i] += v * v;
          }
        }
        c0 += cf;
      }
    }
  });
  return q;
}

std::tuple<Tensor, Tensor> bcos_dense_head_cpu(at::TensorList features, const Tensor& norm_scale,
                                               const Tensor& w_hat, double b) {
  const int64_t C = check_inputs(features, norm_scale, w_hat, b);
  const at::MemoryFormat fmt = format_of(features[0]);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  std::vector<Tensor> dense;
  for (const Tensor& f : features) dense.push_back(f.contiguous(fmt));
  const int64_t N = features[0].size(0), H = features[0].size(2), W = features[0].size(3), P = H * W;
  const int64_t K = w_hat.size(0);
  Tensor x = at::empty({N, C, H, W}, features[0].options().memory_format(fmt));
  Tensor out = at::empty({N, K, H, W}, x.options().memory_format(fmt));
  Tensor scale = at::empty({N, K, H, W}, x.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto q = scaled_concatenation<scalar_t, acc_t>(dense, norm_scale.contiguous(), x, channels_last);
    const Tensor linear = at::conv2d(x, w_hat.contiguous()).contiguous(fmt);
    const scalar_t* lp = linear.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    scalar_t* sp = scale.mutable_data_ptr<scalar_t>();
    const bool b2 = b == 2.0;
    const acc_t exponent = static_cast<acc_t>(b - 1.0);
    auto apply = [&](int64_t at, acc_t norm) {
      const acc_t l = static_cast<acc_t>(lp[at]);
      const acc_t s = b2 ? std::abs(l) / norm : std::pow(std::abs(l / norm) + acc_t(1e-6), exponent);
      sp[at] = static_cast<scalar_t>(s);
      op[at] = static_cast<scalar_t>(s * l);
    };
    if (channels_last) {
      at::parallel_for(0, N * P, 64, [&](int64_t begin, int64_t end) {
        for (int64_t pixel = begin; pixel < end; ++pixel) {
          const acc_t norm = std::sqrt(q[pixel] + acc_t(1e-6));
          for (int64_t k = 0; k < K; ++k) apply(pixel * K + k, norm);
        }
      });
    } else {
      at::parallel_for(0, N * K, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const acc_t* qn = q.data() + (row / K) * P;
          for (int64_t p = 0; p < P; ++p) apply(row * P + p, std::sqrt(qn[p] + acc_t(1e-6)));
        }
      });
    }
  });
  return {out, scale};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(e2kd_cpp, m) {
  m.def("bcos_dense_head(Tensor[] features, Tensor norm_scale, Tensor w_hat, float b) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(e2kd_cpp, CPU, m) { m.impl("bcos_dense_head", &bcos_dense_head_cpu); }

}  // namespace e2kd_cpp
