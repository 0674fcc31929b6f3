// e2kd_cpp::distill_loss on the CPU: the e²KD loss (τ²·KL + λ·(1 − cos)) and, on request, its
// gradients w.r.t. the student logits and maps, in one call.
//
//   kd   = τ²/N · Σ_i KL(p_T,i^τ ‖ p_S,i^τ)          ∂kd/∂z_S  = τ (p_S^τ − p_T^τ) / N
//   exp  = 1/N · Σ_i (1 − cos_i)                       ∂exp/∂s_i = α_i t_i + β_i s_i
//   cos_i = s·t / (a b),   α_i = −1 / (N a b),   β_i = cos_i / (N a ‖s‖)  (0 where ‖s‖ = 0)
//   with a = max(‖s‖, ε), b = max(‖t‖, ε): F.cosine_similarity's per-norm clamp and the gradient
//   torch's autograd gives it (e2kd_fast/reference/losses.py states both; ε is passed from there).
//
// The maps are read in chunks of kChunk elements, in parallel over (sample, chunk): phase 1 sums
// s·t, ‖s‖², ‖t‖² per chunk (float vectors inside a block of kBlock elements, double across blocks,
// so a float map of 300k values keeps ~1e-7 relative accuracy); the per-sample reduction over the
// chunk partials is sequential (deterministic); phase 2 (with_grad only) writes α t + β s with the
// same partition of work, so a thread writes the chunks it has just read. Logits: one row per task,
// the exponentials kept in a row buffer so each is computed once.
//
// Schema (the Python wrappers in e2kd_fast/ops/distill_loss.py are the only callers):
//   distill_loss(Tensor zs, Tensor zt, Tensor es, Tensor et, float tau, float lam, float eps, bool with_grad)
//     -> (loss, kd, exp, grad_logits, grad_maps)
// loss/kd/exp are 0-dim tensors of the logits' dtype; grad_logits [N, C] (logits' dtype) and
// grad_maps (shape and dtype of es, contiguous) are the unit-upstream gradients ∂kd/∂zs and
// ∂exp/∂es, or empty tensors when with_grad is false. The input checks, shared with the CUDA kernel,
// are in csrc/distill_loss.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../distill_loss.h"

namespace e2kd_cpp {
namespace {

constexpr int64_t kChunk = 32768;    // map elements per parallel task
constexpr int64_t kBlock = 1024;     // elements summed in acc_t lanes before the double accumulator

// float for float/half/bfloat16, double for double.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// GCC/Clang vector types of 32 bytes: compiled to whatever SIMD the target has (SSE2 pairs at the
// x86-64 baseline), unlike lane arrays, which the compiler left scalar in the reductions.
template <typename A>
struct Vec32 {
  typedef A type __attribute__((vector_size(32)));
  static constexpr int width = 32 / sizeof(A);
};

// Σ s·t, Σ s², Σ t² over n elements.
template <typename scalar_t>
void chunk_sums(const scalar_t* s, const scalar_t* t, int64_t n, double out[3]) {
  using A = acc_t<scalar_t>;
  double dot = 0, ss = 0, tt = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    A bd = 0, bs = 0, bt = 0;
    int64_t i = b;
    if constexpr (std::is_same_v<scalar_t, A>) {
      // float / double: two independent vector accumulators per sum.
      using V = typename Vec32<A>::type;
      constexpr int W = Vec32<A>::width;
      V d0 = {}, d1 = {}, s0 = {}, s1 = {}, t0 = {}, t1 = {};
      for (; i + 2 * W <= e; i += 2 * W) {
        V a0, a1, c0, c1;
        std::memcpy(&a0, s + i, sizeof(V));
        std::memcpy(&a1, s + i + W, sizeof(V));
        std::memcpy(&c0, t + i, sizeof(V));
        std::memcpy(&c1, t + i + W, sizeof(V));
        d0 += a0 * c0;
        d1 += a1 * c1;
        s0 += a0 * a0;
        s1 += a1 * a1;
        t0 += c0 * c0;
        t1 += c1 * c1;
      }
      for (int j = 0; j < W; ++j) {
        bd += d0[j] + d1[j];
        bs += s0[j] + s1[j];
        bt += t0[j] + t1[j];
      }
    }
    for (; i < e; ++i) {  // the tail, and half / bfloat16 (converted to float)
      const A a = static_cast<A>(s[i]), c = static_cast<A>(t[i]);
      bd += a * c;
      bs += a * a;
      bt += c * c;
    }
    dot += bd;
    ss += bs;
    tt += bt;
  }
  out[0] = dot;
  out[1] = ss;
  out[2] = tt;
}

// KL(p_t ‖ p_s) of one row at temperature τ; writes scale·(p_s − p_t) to grad when it is non-null.
// buf holds 2·C acc_t values (the exponentials of both rows).
template <typename scalar_t>
double kd_row(const scalar_t* zs, const scalar_t* zt, int64_t C, double inv_tau, scalar_t* grad, double scale,
              acc_t<scalar_t>* buf) {
  using A = acc_t<scalar_t>;
  const A it = static_cast<A>(inv_tau);
  A ms = -std::numeric_limits<A>::infinity(), mt = ms;
  for (int64_t c = 0; c < C; ++c) {
    ms = std::max(ms, static_cast<A>(zs[c]) * it);
    mt = std::max(mt, static_cast<A>(zt[c]) * it);
  }
  A* es = buf;
  A* et = buf + C;
  A sum_s = 0, sum_t = 0;
  for (int64_t c = 0; c < C; ++c) {
    es[c] = std::exp(static_cast<A>(zs[c]) * it - ms);
    et[c] = std::exp(static_cast<A>(zt[c]) * it - mt);
    sum_s += es[c];
    sum_t += et[c];
  }
  const A lse_s = ms + std::log(sum_s), lse_t = mt + std::log(sum_t);
  const A inv_s = A(1) / sum_s, inv_t = A(1) / sum_t;
  A kl = 0;
  for (int64_t c = 0; c < C; ++c) {
    const A p_t = et[c] * inv_t;
    // p_t · (log p_t − log p_s), written as the reference does (no use of Σ p_t = 1).
    kl += p_t * ((static_cast<A>(zt[c]) * it - lse_t) - (static_cast<A>(zs[c]) * it - lse_s));
    if (grad != nullptr) {
      grad[c] = static_cast<scalar_t>(static_cast<A>(scale) * (es[c] * inv_s - p_t));
    }
  }
  return static_cast<double>(kl);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_loss_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& student_maps,
    const at::Tensor& teacher_maps, double tau, double lam, double eps, bool with_grad) {
  distill_loss::check_inputs(student_logits, teacher_logits, student_maps, teacher_maps);
  const int64_t N = student_logits.size(0), C = student_logits.size(1);
  const at::Tensor zs = student_logits.contiguous(), zt = teacher_logits.contiguous();
  const at::Tensor es = student_maps.contiguous(), et = teacher_maps.contiguous();
  const int64_t D = es.numel() / N;

  at::Tensor grad_logits = with_grad ? at::empty_like(zs) : at::empty({0}, zs.options());
  at::Tensor grad_maps = with_grad ? at::empty_like(es) : at::empty({0}, es.options());

  // Logits: one KL value per row, summed afterwards in row order (deterministic).
  std::vector<double> kl(N, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zs.scalar_type(), "distill_loss_cpu_kd", [&] {
    const scalar_t* ps = zs.const_data_ptr<scalar_t>();
    const scalar_t* pt = zt.const_data_ptr<scalar_t>();
    scalar_t* pg = with_grad ? grad_logits.mutable_data_ptr<scalar_t>() : nullptr;
    const double scale = tau / static_cast<double>(N);
    at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t<scalar_t>> buf(2 * C);
      for (int64_t i = begin; i < end; ++i) {
        kl[i] = kd_row(ps + i * C, pt + i * C, C, 1.0 / tau, pg ? pg + i * C : nullptr, scale, buf.data());
      }
    });
  });

  // Maps: phase 1, chunk partials of (s·t, ‖s‖², ‖t‖²).
  const int64_t chunks = std::max<int64_t>(1, (D + kChunk - 1) / kChunk);
  std::vector<double> partial(N * chunks * 3, 0.0);
  std::vector<double> alpha(N), beta(N);
  double exp_sum = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, es.scalar_type(), "distill_loss_cpu_maps", [&] {
    const scalar_t* ps = es.const_data_ptr<scalar_t>();
    const scalar_t* pt = et.const_data_ptr<scalar_t>();
    at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = task / chunks, lo = (task % chunks) * kChunk, hi = std::min(D, lo + kChunk);
        if (hi > lo) chunk_sums(ps + i * D + lo, pt + i * D + lo, hi - lo, &partial[task * 3]);
      }
    });
    for (int64_t i = 0; i < N; ++i) {
      double dot = 0, ss = 0, tt = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        dot += partial[(i * chunks + c) * 3];
        ss += partial[(i * chunks + c) * 3 + 1];
        tt += partial[(i * chunks + c) * 3 + 2];
      }
      const double s_norm = std::sqrt(ss);
      const double a = std::max(s_norm, eps), b = std::max(std::sqrt(tt), eps);
      const double cos = dot / a / b;
      exp_sum += 1.0 - cos;
      alpha[i] = -1.0 / static_cast<double>(N) / a / b;
      beta[i] = s_norm > 0 ? cos / static_cast<double>(N) / a / s_norm : 0.0;
    }
    if (!with_grad) return;
    // Phase 2: ∂exp/∂s = α t + β s, with the partition of phase 1.
    scalar_t* pg = grad_maps.mutable_data_ptr<scalar_t>();
    using A = acc_t<scalar_t>;
    at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = task / chunks, lo = (task % chunks) * kChunk, hi = std::min(D, lo + kChunk);
        const A a = static_cast<A>(alpha[i]), b = static_cast<A>(beta[i]);
        const scalar_t* s = ps + i * D;
        const scalar_t* t = pt + i * D;
        scalar_t* g = pg + i * D;
        int64_t j = lo;
        if constexpr (std::is_same_v<scalar_t, A>) {
          using V = typename Vec32<A>::type;
          constexpr int W = Vec32<A>::width;
          for (; j + W <= hi; j += W) {
            V vs, vt;
            std::memcpy(&vs, s + j, sizeof(V));
            std::memcpy(&vt, t + j, sizeof(V));
            const V vg = a * vt + b * vs;
            std::memcpy(g + j, &vg, sizeof(V));
          }
        }
        for (; j < hi; ++j) {
          g[j] = static_cast<scalar_t>(a * static_cast<A>(t[j]) + b * static_cast<A>(s[j]));
        }
      }
    });
  });

  double kl_sum = 0.0;
  for (int64_t i = 0; i < N; ++i) kl_sum += kl[i];
  const double kd = kl_sum * tau * tau / static_cast<double>(N);
  const double exp_mean = exp_sum / static_cast<double>(N);
  const auto opts = zs.options();
  return {at::scalar_tensor(kd + lam * exp_mean, opts), at::scalar_tensor(kd, opts),
          at::scalar_tensor(exp_mean, opts),
          grad_logits, grad_maps};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(e2kd_cpp, m) {
  m.def(
      "distill_loss(Tensor student_logits, Tensor teacher_logits, Tensor student_maps, Tensor teacher_maps, "
      "float tau, float lam, float eps, bool with_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(e2kd_cpp, CPU, m) { m.impl("distill_loss", &distill_loss_cpu); }

}  // namespace e2kd_cpp
