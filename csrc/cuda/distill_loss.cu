// e2kd_cpp::distill_loss on CUDA: the same contract and maths as csrc/cpu/distill_loss.cpp (read
// that file's header for the formulas and the schema); the input checks are csrc/distill_loss.h.
//
// Four launches, no atomics (deterministic), memory flat apart from the outputs:
//   1. map_partials: one block per (sample, chunk) reads its chunk of s and t once (16-byte loads
//      when the rows allow it) and writes (s·t, ‖s‖², ‖t‖²) in double to a [N, chunks, 3] buffer;
//   2. kd_rows: one block per logit row: online max/sum of both rows, then KL and (with_grad)
//      ∂kd/∂z_S written in the same pass;
//   3. finalize: one block: per-sample cosines and gradient coefficients (α_i, β_i), the batch
//      means, and the three scalars;
//   4. map_grad (with_grad only): one block per (sample, chunk) writes α_i t + β_i s.
// Accumulation: float for half/bfloat16/float, double for double.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../distill_loss.h"

namespace e2kd_cpp {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;  // loads (of one pack each) in flight per thread and chunk

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

__device__ inline float dexp(float x) { return expf(x); }
__device__ inline double dexp(double x) { return exp(x); }
__device__ inline float dlog(float x) { return logf(x); }
__device__ inline double dlog(double x) { return log(x); }

template <typename T>
__device__ inline T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block of three values; the result is valid in thread 0.
template <typename T>
__device__ inline void block_sum3(T& a, T& b, T& c) {
  __shared__ T shared[3][kThreads / 32];
  a = warp_sum(a);
  b = warp_sum(b);
  c = warp_sum(c);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    shared[0][warp] = a;
    shared[1][warp] = b;
    shared[2][warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    a = lane < warps ? shared[0][lane] : T(0);
    b = lane < warps ? shared[1][lane] : T(0);
    c = lane < warps ? shared[2][lane] : T(0);
    a = warp_sum(a);
    b = warp_sum(b);
    c = warp_sum(c);
  }
  __syncthreads();
}

// (max, Σ exp(x − max)) merged from two partial states; empty states carry max = −inf.
template <typename T>
__device__ inline void lse_merge(T& m, T& l, T m2, T l2) {
  if (m2 == -std::numeric_limits<T>::infinity()) return;
  if (m == -std::numeric_limits<T>::infinity()) {
    m = m2;
    l = l2;
    return;
  }
  const T mx = m > m2 ? m : m2;
  l = l * dexp(m - mx) + l2 * dexp(m2 - mx);
  m = mx;
}

template <typename T>
__device__ inline void block_lse(T& m, T& l) {
  __shared__ T sm[kThreads / 32], sl[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    lse_merge(m, l, __shfl_down_sync(0xffffffffu, m, offset), __shfl_down_sync(0xffffffffu, l, offset));
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    sm[warp] = m;
    sl[warp] = l;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) lse_merge(m, l, sm[w], sl[w]);
    sm[0] = m;
    sl[0] = l;
  }
  __syncthreads();
  m = sm[0];
  l = sl[0];
  __syncthreads();
}

// Block (chunk c of sample n) = blockIdx.x = n·chunks + c; chunk = kThreads·kItems packs of V.
template <typename scalar_t, typename acc_t, int V>
__global__ void map_partials_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t D,
                                    int64_t chunks, double* __restrict__ partial) {
  const int64_t n = blockIdx.x / chunks, c = blockIdx.x % chunks;
  const int64_t chunk = static_cast<int64_t>(kThreads) * kItems * V;
  const int64_t lo = c * chunk, hi = lo + chunk < D ? lo + chunk : D;
  const scalar_t* sr = s + n * D;
  const scalar_t* tr = t + n * D;
  acc_t dot = 0, ss = 0, tt = 0;
  if (V > 1) {
    // Rows and chunks start on pack boundaries (checked by the launcher); D % V == 0.
    using P = Pack<scalar_t, V>;
    const P* sp = reinterpret_cast<const P*>(sr);
    const P* tp = reinterpret_cast<const P*>(tr);
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t j = lo / V + static_cast<int64_t>(k) * kThreads + threadIdx.x;
      if (j * V < hi) {
        const P a = sp[j], b = tp[j];
#pragma unroll
        for (int q = 0; q < V; ++q) {
          const acc_t x = static_cast<acc_t>(a.v[q]), y = static_cast<acc_t>(b.v[q]);
          dot += x * y;
          ss += x * x;
          tt += y * y;
        }
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t j = lo + static_cast<int64_t>(k) * kThreads + threadIdx.x;
      if (j < hi) {
        const acc_t x = static_cast<acc_t>(sr[j]), y = static_cast<acc_t>(tr[j]);
        dot += x * y;
        ss += x * x;
        tt += y * y;
      }
    }
  }
  block_sum3(dot, ss, tt);
  if (threadIdx.x == 0) {
    double* out = partial + blockIdx.x * 3;
    out[0] = static_cast<double>(dot);
    out[1] = static_cast<double>(ss);
    out[2] = static_cast<double>(tt);
  }
}

template <typename scalar_t, typename acc_t, int V>
__global__ void map_grad_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t D,
                                int64_t chunks, const double* __restrict__ coef, scalar_t* __restrict__ g) {
  const int64_t n = blockIdx.x / chunks, c = blockIdx.x % chunks;
  const int64_t chunk = static_cast<int64_t>(kThreads) * kItems * V;
  const int64_t lo = c * chunk, hi = lo + chunk < D ? lo + chunk : D;
  const acc_t alpha = static_cast<acc_t>(coef[2 * n]), beta = static_cast<acc_t>(coef[2 * n + 1]);
  const int64_t row = n * D;
  if (V > 1) {
    using P = Pack<scalar_t, V>;
    const P* sp = reinterpret_cast<const P*>(s + row);
    const P* tp = reinterpret_cast<const P*>(t + row);
    P* gp = reinterpret_cast<P*>(g + row);
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t j = lo / V + static_cast<int64_t>(k) * kThreads + threadIdx.x;
      if (j * V < hi) {
        const P a = sp[j], b = tp[j];
        P out;
#pragma unroll
        for (int q = 0; q < V; ++q) {
          out.v[q] = static_cast<scalar_t>(alpha * static_cast<acc_t>(b.v[q]) + beta * static_cast<acc_t>(a.v[q]));
        }
        gp[j] = out;
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t j = lo + static_cast<int64_t>(k) * kThreads + threadIdx.x;
      if (j < hi) {
        g[row + j] = static_cast<scalar_t>(alpha * static_cast<acc_t>(t[row + j]) +
                                           beta * static_cast<acc_t>(s[row + j]));
      }
    }
  }
}

// One block per row: KL(p_t ‖ p_s) at temperature τ into kl[n]; grad = scale·(p_s − p_t) if non-null.
template <typename scalar_t, typename acc_t>
__global__ void kd_rows_kernel(const scalar_t* __restrict__ zs, const scalar_t* __restrict__ zt, int64_t C,
                               acc_t inv_tau, acc_t scale, double* __restrict__ kl, scalar_t* __restrict__ grad) {
  const int64_t n = blockIdx.x;
  const scalar_t* a = zs + n * C;
  const scalar_t* b = zt + n * C;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  acc_t ms = ninf, ls = 0, mt = ninf, lt = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    lse_merge(ms, ls, static_cast<acc_t>(a[c]) * inv_tau, acc_t(1));
    lse_merge(mt, lt, static_cast<acc_t>(b[c]) * inv_tau, acc_t(1));
  }
  block_lse(ms, ls);
  block_lse(mt, lt);
  const acc_t lse_s = ms + dlog(ls), lse_t = mt + dlog(lt);
  acc_t part = 0, unused1 = 0, unused2 = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t log_ps = static_cast<acc_t>(a[c]) * inv_tau - lse_s;
    const acc_t log_pt = static_cast<acc_t>(b[c]) * inv_tau - lse_t;
    const acc_t p_t = dexp(log_pt);
    part += p_t * (log_pt - log_ps);
    if (grad != nullptr) grad[n * C + c] = static_cast<scalar_t>(scale * (dexp(log_ps) - p_t));
  }
  block_sum3(part, unused1, unused2);
  if (threadIdx.x == 0) kl[n] = static_cast<double>(part);
}

// One block: cosines, coefficients coef[n] = (α_n, β_n), and the scalars loss, kd, exp.
template <typename out_t>
__global__ void finalize_kernel(const double* __restrict__ partial, const double* __restrict__ kl, int64_t N,
                                int64_t chunks, double tau, double lam, double eps, double* __restrict__ coef,
                                out_t* __restrict__ loss, out_t* __restrict__ kd_out, out_t* __restrict__ exp_out) {
  double exp_sum = 0, kl_sum = 0, unused = 0;
  const double inv_n = 1.0 / static_cast<double>(N);
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    double dot = 0, ss = 0, tt = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const double* p = partial + (n * chunks + c) * 3;
      dot += p[0];
      ss += p[1];
      tt += p[2];
    }
    const double s_norm = sqrt(ss);
    const double a = fmax(s_norm, eps), b = fmax(sqrt(tt), eps);  // per-norm clamp
    const double cos = dot / a / b;
    exp_sum += 1.0 - cos;
    kl_sum += kl[n];
    coef[2 * n] = -inv_n / a / b;
    coef[2 * n + 1] = s_norm > 0 ? cos * inv_n / a / s_norm : 0.0;
  }
  block_sum3(exp_sum, kl_sum, unused);
  if (threadIdx.x == 0) {
    const double kd = kl_sum * tau * tau * inv_n, exp_mean = exp_sum * inv_n;
    *loss = static_cast<out_t>(kd + lam * exp_mean);
    *kd_out = static_cast<out_t>(kd);
    *exp_out = static_cast<out_t>(exp_mean);
  }
}

template <typename scalar_t>
int pack_width(const at::Tensor& s, const at::Tensor& t, const at::Tensor& g, int64_t D) {
  constexpr int V = 16 / sizeof(scalar_t);
  auto aligned = [](const at::Tensor& x) {
    return !x.defined() || x.numel() == 0 || reinterpret_cast<std::uintptr_t>(x.const_data_ptr()) % 16 == 0;
  };
  return (D % V == 0 && aligned(s) && aligned(t) && aligned(g)) ? V : 1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_loss_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& student_maps,
    const at::Tensor& teacher_maps, double tau, double lam, double eps, bool with_grad) {
  distill_loss::check_inputs(student_logits, teacher_logits, student_maps, teacher_maps);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = student_logits.size(0), C = student_logits.size(1);
  const at::Tensor zs = student_logits.contiguous(), zt = teacher_logits.contiguous();
  const at::Tensor es = student_maps.contiguous(), et = teacher_maps.contiguous();
  const int64_t D = es.numel() / N;

  at::Tensor grad_logits = with_grad ? at::empty_like(zs) : at::empty({0}, zs.options());
  at::Tensor grad_maps = with_grad ? at::empty_like(es) : at::empty({0}, es.options());
  const auto f64 = zs.options().dtype(at::kDouble);
  at::Tensor kl = at::empty({N}, f64);
  at::Tensor coef = at::empty({N, 2}, f64);
  at::Tensor loss = at::empty({}, zs.options()), kd = at::empty({}, zs.options());
  at::Tensor exp_out = at::empty({}, zs.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zs.scalar_type(), "distill_loss_cuda_kd", [&] {
    using acc = at::acc_type<scalar_t, true>;
    kd_rows_kernel<scalar_t, acc><<<N, kThreads, 0, stream>>>(
        zs.const_data_ptr<scalar_t>(), zt.const_data_ptr<scalar_t>(), C, static_cast<acc>(1.0 / tau),
        static_cast<acc>(tau / static_cast<double>(N)), kl.mutable_data_ptr<double>(),
        with_grad ? grad_logits.mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  at::Tensor partial;
  int64_t chunks = 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, es.scalar_type(), "distill_loss_cuda_maps", [&] {
    using acc = at::acc_type<scalar_t, true>;
    const int V = pack_width<scalar_t>(es, et, grad_maps, D);
    const int64_t chunk = static_cast<int64_t>(kThreads) * kItems * V;
    chunks = std::max<int64_t>(1, (D + chunk - 1) / chunk);
    TORCH_CHECK(N * chunks < (int64_t{1} << 31), "e2kd_cpp::distill_loss: too many map chunks (", N * chunks, ")");
    partial = at::empty({N, chunks, 3}, f64);
    const scalar_t* ps = es.const_data_ptr<scalar_t>();
    const scalar_t* pt = et.const_data_ptr<scalar_t>();
    constexpr int VW = 16 / sizeof(scalar_t);
    if (V == VW) {
      map_partials_kernel<scalar_t, acc, VW>
          <<<N * chunks, kThreads, 0, stream>>>(ps, pt, D, chunks, partial.mutable_data_ptr<double>());
    } else {
      map_partials_kernel<scalar_t, acc, 1>
          <<<N * chunks, kThreads, 0, stream>>>(ps, pt, D, chunks, partial.mutable_data_ptr<double>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zs.scalar_type(), "distill_loss_cuda_finalize", [&] {
    finalize_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
        partial.const_data_ptr<double>(), kl.const_data_ptr<double>(), N, chunks, tau, lam, eps,
        coef.mutable_data_ptr<double>(), loss.mutable_data_ptr<scalar_t>(), kd.mutable_data_ptr<scalar_t>(),
        exp_out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  if (with_grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, es.scalar_type(), "distill_loss_cuda_grad", [&] {
      using acc = at::acc_type<scalar_t, true>;
      const int V = pack_width<scalar_t>(es, et, grad_maps, D);
      constexpr int VW = 16 / sizeof(scalar_t);
      const scalar_t* ps = es.const_data_ptr<scalar_t>();
      const scalar_t* pt = et.const_data_ptr<scalar_t>();
      scalar_t* pg = grad_maps.mutable_data_ptr<scalar_t>();
      if (V == VW) {
        map_grad_kernel<scalar_t, acc, VW>
            <<<N * chunks, kThreads, 0, stream>>>(ps, pt, D, chunks, coef.const_data_ptr<double>(), pg);
      } else {
        map_grad_kernel<scalar_t, acc, 1>
            <<<N * chunks, kThreads, 0, stream>>>(ps, pt, D, chunks, coef.const_data_ptr<double>(), pg);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {loss, kd, exp_out, grad_logits, grad_maps};
}

}  // namespace

TORCH_LIBRARY_IMPL(e2kd_cpp, CUDA, m) { m.impl("distill_loss", &distill_loss_cuda); }

}  // namespace e2kd_cpp
