// The B-cos conv epilogue on CUDA: the same maths as csrc/cpu/bcos_conv2d.cpp (read that header).
//
// Three memory-bound kernels around cuDNN's conv, which keeps the FLOPs:
//   1. sumsq:  q[n, g, h, w] = Σ_{c ∈ g} x²         one thread per (n, g, pixel): a channel loop,
//                                                     coalesced across pixels (NCHW) or channels (NHWC);
//   2. norm:   nrm[n, g, ho, wo] = sqrt(box sum of q + 1e-6)   one thread per output pixel (q is small);
//   3. scale:  s = |l| / nrm (B = 2) or (|l/nrm| + 1e-6)^(B−1), y = s·l   one thread per element of l,
//              walking l in its memory order (NCHW or channels_last) so loads and stores coalesce.
// q and nrm are fp32 (fp64 for double inputs); fp16/bf16 inputs are upcast on load.
// Registered for the CUDA dispatch key of the ops defined in the CPU file (TORCH_LIBRARY_FRAGMENT there);
// the input checks and the memory-format rule are shared with it in csrc/bcos_conv2d.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "../bcos_conv2d.h"

namespace e2kd_cpp {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

using bcos_conv2d::format_of;
using bcos_conv2d::Geometry;

struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename scalar_t, typename acc_t>
__global__ void sumsq_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ q, int64_t total, int64_t groups,
                             int64_t cg, int64_t H, int64_t W, Strides4 xs) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  // i enumerates (n, g, h, w) with w fastest; q is contiguous in that order.
  const int64_t w = i % W, h = (i / W) % H, ng = i / (W * H), g = ng % groups, n = ng / groups;
  const scalar_t* base = x + n * xs.n + g * cg * xs.c + h * xs.h + w * xs.w;
  acc_t acc = 0;
  for (int64_t c = 0; c < cg; ++c) {
    const acc_t v = static_cast<acc_t>(base[c * xs.c]);
    acc += v * v;
  }
  q[i] = acc;
}

template <typename acc_t>
__global__ void norm_kernel(const acc_t* __restrict__ q, acc_t* __restrict__ nrm, int64_t total, int64_t H,
                            int64_t W, int64_t Ho, int64_t Wo, int kh, int kw, int sh, int sw, int ph, int pw) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t wo = i % Wo, ho = (i / Wo) % Ho, ng = i / (Wo * Ho);
  const acc_t* plane = q + ng * H * W;
  acc_t acc = 0;
  for (int a = 0; a < kh; ++a) {
    const int64_t ih = ho * sh - ph + a;
    if (ih < 0 || ih >= H) continue;
    for (int c = 0; c < kw; ++c) {
      const int64_t iw = wo * sw - pw + c;
      if (iw >= 0 && iw < W) acc += plane[ih * W + iw];
    }
  }
  nrm[i] = sqrt(acc + acc_t(1e-6));
}

// MODE 0: s (and y) from l; MODE 1: the norm itself into s (patch_norm).
template <typename scalar_t, typename acc_t, int MODE>
__global__ void scale_kernel(const scalar_t* __restrict__ l, const acc_t* __restrict__ nrm, scalar_t* __restrict__ s,
                             scalar_t* __restrict__ y, int64_t total, int64_t O, int64_t Ho, int64_t Wo,
                             int64_t o_per_group, int64_t groups, Strides4 ls, Strides4 ss, bool channels_last,
                             bool b2, acc_t exponent) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  int64_t n, o, ho, wo;
  if (channels_last) {  // i enumerates (n, ho, wo, o) with o fastest
    o = i % O;
    wo = (i / O) % Wo;
    ho = (i / (O * Wo)) % Ho;
    n = i / (O * Wo * Ho);
  } else {  // (n, o, ho, wo) with wo fastest
    wo = i % Wo;
    ho = (i / Wo) % Ho;
    o = (i / (Wo * Ho)) % O;
    n = i / (Wo * Ho * O);
  }
  const int64_t g = o / o_per_group;
  const acc_t norm = nrm[((n * groups + g) * Ho + ho) * Wo + wo];
  const int64_t out_at = n * ss.n + o * ss.c + ho * ss.h + wo * ss.w;
  if (MODE == 1) {
    s[out_at] = static_cast<scalar_t>(norm);
    return;
  }
  const acc_t lv = static_cast<acc_t>(l[n * ls.n + o * ls.c + ho * ls.h + wo * ls.w]);
  const acc_t sv = b2 ? fabs(lv) / norm : pow(fabs(lv / norm) + acc_t(1e-6), exponent);
  s[out_at] = static_cast<scalar_t>(sv);
  if (y != nullptr) y[out_at] = static_cast<scalar_t>(sv * lv);
}

// q and the norm map, in the accumulation type.
template <typename scalar_t, typename acc_t>
Tensor norm_map(const Tensor& x, const Geometry& geo, int64_t Ho, int64_t Wo, cudaStream_t stream) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  Tensor q = at::empty({N, geo.groups, H, W}, acc_options);
  const int64_t q_total = q.numel();
  if (q_total > 0) {
    sumsq_kernel<scalar_t, acc_t><<<blocks_for(q_total), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), q.mutable_data_ptr<acc_t>(), q_total, geo.groups, C / geo.groups, H, W,
        strides_of(x));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  Tensor nrm = at::empty({N, geo.groups, Ho, Wo}, acc_options);
  const int64_t n_total = nrm.numel();
  if (n_total > 0) {
    // Kernel sizes, strides and paddings are small: int inside the kernel.
    norm_kernel<acc_t><<<blocks_for(n_total), kThreads, 0, stream>>>(
        q.const_data_ptr<acc_t>(), nrm.mutable_data_ptr<acc_t>(), n_total, H, W, Ho, Wo, static_cast<int>(geo.kh),
        static_cast<int>(geo.kw), static_cast<int>(geo.sh), static_cast<int>(geo.sw), static_cast<int>(geo.ph),
        static_cast<int>(geo.pw));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return nrm;
}

std::tuple<Tensor, Tensor> bcos_conv2d_epilogue_cuda(const Tensor& linear, const Tensor& x, at::IntArrayRef kernel,
                                                     at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups,
                                                     double b, bool write_out) {
  const Geometry geo = bcos_conv2d::check_epilogue_inputs(linear, x, kernel, stride, padding, groups, b);
  TORCH_CHECK(x.is_cuda(), "e2kd_cpp::bcos_conv2d_epilogue: x must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(x.device());
  const auto options = linear.options().memory_format(format_of(x));
  Tensor scale = at::empty(linear.sizes(), options);
  Tensor out = write_out ? at::empty(linear.sizes(), options) : at::empty({0}, linear.options());
  const int64_t O = linear.size(1), Ho = linear.size(2), Wo = linear.size(3), total = linear.numel();
  if (total == 0) return {scale, out};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "e2kd_cpp::bcos_conv2d_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor nrm = norm_map<scalar_t, acc_t>(x, geo, Ho, Wo, stream);
    scale_kernel<scalar_t, acc_t, 0><<<blocks_for(total), kThreads, 0, stream>>>(
        linear.const_data_ptr<scalar_t>(), nrm.const_data_ptr<acc_t>(), scale.mutable_data_ptr<scalar_t>(),
        write_out ? out.mutable_data_ptr<scalar_t>() : nullptr, total, O, Ho, Wo, O / groups, groups,
        strides_of(linear), strides_of(scale), scale.stride(1) == 1 && O > 1, b == 2.0,
        static_cast<acc_t>(b - 1.0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scale, out};
}

Tensor bcos_conv2d_patch_norm_cuda(const Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                                   at::IntArrayRef padding, int64_t groups, int64_t out_channels) {
  const Geometry geo = bcos_conv2d::check_patch_norm_inputs(x, kernel, stride, padding, groups, out_channels);
  TORCH_CHECK(x.is_cuda(), "e2kd_cpp::bcos_conv2d_patch_norm: x must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t Ho = geo.out_h(H), Wo = geo.out_w(W);
  const int64_t channels = groups > 1 ? out_channels : 1;
  Tensor norm = at::empty({N, channels, Ho, Wo}, x.options().memory_format(format_of(x)));
  const int64_t total = norm.numel();
  if (total == 0) return norm;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "e2kd_cpp::bcos_conv2d_patch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor nrm = norm_map<scalar_t, acc_t>(x, geo, Ho, Wo, stream);
    scale_kernel<scalar_t, acc_t, 1><<<blocks_for(total), kThreads, 0, stream>>>(
        nullptr, nrm.const_data_ptr<acc_t>(), norm.mutable_data_ptr<scalar_t>(), nullptr, total, channels, Ho, Wo,
        channels / groups, groups, strides_of(norm), strides_of(norm), norm.stride(1) == 1 && channels > 1, true,
        acc_t(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return norm;
}

}  // namespace

TORCH_LIBRARY_IMPL(e2kd_cpp, CUDA, m) {
  m.impl("bcos_conv2d_epilogue", &bcos_conv2d_epilogue_cuda);
  m.impl("bcos_conv2d_patch_norm", &bcos_conv2d_patch_norm_cuda);
}

}  // namespace e2kd_cpp
