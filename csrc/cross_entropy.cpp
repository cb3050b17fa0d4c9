// Per-sample cross-entropy (ES_SPEC section 5): one pass over the logits with
// an online log-sum-exp over chunks of the class axis, float32 arithmetic,
// float32 / bfloat16 / float16 input, parallel over rows. The logits are read
// in place with their batch and sequence strides (class stride 1). Non-finite
// logits are treated as in F.cross_entropy (see RowAcc).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops.h"

namespace es_kernels {
namespace {

constexpr int64_t kChunk = 2048;  // classes per chunk (8 KiB of float32, stays in L1)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 8 floats in GCC/Clang vector extensions: AVX2 registers with -march=native,
// two SSE registers otherwise. Explicit vectors with independent accumulators
// keep the exp polynomial's latency chains overlapped.
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
constexpr int64_t kW = 8;

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vf splat(float x) { return vf{} + x; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline float hsum(vf v) {
  float s = 0.0f;
  for (int l = 0; l < kW; ++l) s += v[l];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int l = 1; l < kW; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// exp(x) to about 2 ulp for finite x (Cephes expf polynomial with a 2^n
// scale), branch-free; the scalar and vector forms compute the same thing.
template <typename V, typename I>
inline V exp_poly(V x) {
  x = x < -87.0f ? V{} - 87.0f : x;
  x = x > 88.0f ? V{} + 88.0f : x;
  const V fn = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round: 1.5 * 2^23
  const V r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * (r * r) + r + 1.0f;
  I n;
  if constexpr (std::is_same_v<V, float>) {
    n = static_cast<int32_t>(fn);
  } else {
    n = __builtin_convertvector(fn, I);
  }
  const I bits = (n + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
inline float exp1(float x) { return exp_poly<float, int32_t>(x); }
inline vf exp8(vf x) { return exp_poly<vf, vi>(x); }

// Running state of one row: max m, sum s of exp(x - m), and (for label
// smoothing only) d = sum of (m - x), a sum of non-negative terms that stays
// finite for huge finite logits; `bad` marks a NaN or +inf logit.
//
// Non-finite logits, as F.cross_entropy treats them: a -inf logit (masked
// class) adds nothing to s, and +inf to d (its log-probability is -inf); a NaN
// or +inf logit, or a row of -inf only, makes the loss NaN.
template <bool Smooth>
struct RowAcc {
  float m = kNegInf;
  float s = 0.0f;
  float d = 0.0f;
  int64_t n = 0;  // classes seen
  bool bad = false;

  void add_chunk(const float* x, int64_t nc) {
    // max: four independent vector accumulators (a NaN is skipped here and
    // caught through the sum below)
    const int64_t n32 = nc / (4 * kW) * (4 * kW), n16 = nc / (2 * kW) * (2 * kW);
    vf m0 = splat(kNegInf), m1 = m0, m2 = m0, m3 = m0;
    for (int64_t i = 0; i < n32; i += 4 * kW) {
      m0 = vmax(vload(x + i), m0);
      m1 = vmax(vload(x + i + kW), m1);
      m2 = vmax(vload(x + i + 2 * kW), m2);
      m3 = vmax(vload(x + i + 3 * kW), m3);
    }
    float cm = hmax(vmax(vmax(m0, m1), vmax(m2, m3)));
    for (int64_t i = n32; i < nc; ++i) cm = x[i] > cm ? x[i] : cm;
    // sum of exp(x - ref), and of (ref - x) when smoothing: two vectors per
    // iteration. A NaN logit, or +inf (then ref = +inf and inf - inf), makes
    // the sum NaN; ref = 0 for a chunk of -inf only keeps that check.
    const float ref = cm == kNegInf ? 0.0f : cm;
    const vf refv = splat(ref);
    vf s0 = vf{}, s1 = vf{}, d0 = vf{}, d1 = vf{};
    for (int64_t i = 0; i < n16; i += 2 * kW) {
      const vf a = vload(x + i), b = vload(x + i + kW);
      s0 += exp8(a - refv);
      s1 += exp8(b - refv);
      if constexpr (Smooth) {
        d0 += refv - a;
        d1 += refv - b;
      }
    }
    float cs = hsum(s0 + s1), cd = 0.0f;
    if constexpr (Smooth) cd = hsum(d0 + d1);
    for (int64_t i = n16; i < nc; ++i) {
      cs += exp1(x[i] - ref);
      if constexpr (Smooth) cd += ref - x[i];
    }
    if (cs != cs) bad = true;
    const int64_t prev = n;
    n += nc;
    if (cm == kNegInf) {  // masked classes only: nothing to s, +inf to d
      if constexpr (Smooth) d = std::numeric_limits<float>::infinity();
      return;
    }
    if (m == kNegInf) {  // first chunk with a finite max: no rescale (d is 0 or +inf)
      m = cm;
      s = cs;
      if constexpr (Smooth) d += cd;
    } else if (cm > m) {
      s = s * std::exp(m - cm) + cs;
      if constexpr (Smooth) d += static_cast<float>(prev) * (cm - m) + cd;
      m = cm;
    } else {
      s += cs * std::exp(cm - m);
      if constexpr (Smooth) d += cd + static_cast<float>(nc) * (m - cm);
    }
  }
};

// Loss of one token row; `x` holds C logits of type T (unit stride). As in
// F.cross_entropy: nll = (m - x_t) + log s, and with smoothing eps
// (1 - eps) * nll + eps / C * sum_c -log p_c, where sum_c -log p_c =
// d + C log s; a -inf target logit gives +inf (NaN when 0 * inf arises).
template <bool Smooth, typename T>
float row_loss(const T* x, int64_t C, int64_t target, double eps, float* buf) {
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  if (target < 0 || target >= C) return kNaN;
  RowAcc<Smooth> acc;
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    if constexpr (std::is_same_v<T, float>) {
      acc.add_chunk(x + c0, n);
    } else {
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[c0 + i]);
      acc.add_chunk(buf, n);
    }
  }
  if (acc.bad || acc.m == kNegInf) return kNaN;
  const float log_s = std::log(acc.s);
  const float nll = (acc.m - static_cast<float>(x[target])) + log_s;
  if constexpr (!Smooth) {
    return nll;
  } else {
    const float smooth = acc.d + static_cast<float>(C) * log_s;
    return static_cast<float>(1.0 - eps) * nll +
           static_cast<float>(eps / static_cast<double>(C)) * smooth;
  }
}

// Token row r of the logits starts at (r / T) * stride_b + (r % T) * stride_t.
template <bool Smooth, typename T, typename I>
void token_losses(const T* logits, int64_t stride_b, int64_t stride_t, int64_t T_len,
                  const I* targets, int64_t rows, int64_t C, int64_t ignore_index, double eps,
                  float* out) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : kChunk);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = static_cast<int64_t>(targets[r]);
      if (t == ignore_index) {  // the row is not read
        out[r] = 0.0f;
        continue;
      }
      const T* x = logits + (r / T_len) * stride_b + (r % T_len) * stride_t;
      out[r] = row_loss<Smooth>(x, C, t, eps, buf.data());
    }
  });
}

}  // namespace

at::Tensor per_sample_cross_entropy(const at::Tensor& logits_in, const at::Tensor& targets_in,
                                    int64_t ignore_index, double label_smoothing) {
  check_cpu(logits_in, "logits");
  check_cpu(targets_in, "targets");
  const int64_t dim = logits_in.dim();
  TORCH_CHECK_VALUE(dim == 2 || dim == 3, "logits must be [B, C] or [B, T, V], got ",
                    logits_in.sizes());
  TORCH_CHECK_VALUE(
      targets_in.dim() == dim - 1 && targets_in.sizes() == logits_in.sizes().slice(0, dim - 1),
      "targets must have shape ", logits_in.sizes().slice(0, dim - 1), ", got ",
      targets_in.sizes());
  TORCH_CHECK_VALUE(targets_in.scalar_type() == at::kLong || targets_in.scalar_type() == at::kInt,
                    "targets must be int64 or int32, got ", targets_in.scalar_type());
  // The logits are read in place with their batch (and sequence) strides, so
  // that a view such as logits[:, :-1] costs no copy; only a class stride
  // other than 1 is copied.
  const at::Tensor logits = logits_in.size(dim - 1) <= 1 || logits_in.stride(dim - 1) == 1
                                ? logits_in
                                : logits_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const int64_t B = logits.size(0);
  const int64_t C = logits.size(dim - 1);
  const int64_t rows = targets.numel();
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kFloat));
  if (B == 0) return out;
  TORCH_CHECK_VALUE(C > 0, "logits must have at least one class");
  at::Tensor tok = dim == 2 ? out : at::empty({rows}, out.options());
  const int64_t T_len = dim == 3 ? logits.size(1) : 1;
  const int64_t stride_b = logits.stride(0), stride_t = dim == 3 ? logits.stride(1) : 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "per_sample_ce", [&] {
        AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "per_sample_ce_targets", [&] {
          const scalar_t* x = logits.const_data_ptr<scalar_t>();
          const index_t* tg = targets.const_data_ptr<index_t>();
          float* o = tok.data_ptr<float>();
          if (label_smoothing > 0.0) {
            token_losses<true>(x, stride_b, stride_t, T_len, tg, rows, C, ignore_index,
                               label_smoothing, o);
          } else {
            token_losses<false>(x, stride_b, stride_t, T_len, tg, rows, C, ignore_index,
                                label_smoothing, o);
          }
        });
      });

  if (dim == 3) {  // mean over the non-ignored tokens of each sequence
    const int64_t T = logits.size(1);
    const float* tk = tok.data_ptr<float>();
    float* o = out.data_ptr<float>();
    AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "per_sample_ce_mean", [&] {
      const index_t* tg = targets.data_ptr<index_t>();
      at::parallel_for(0, B, 256, [&](int64_t begin, int64_t end) {
        for (int64_t bi = begin; bi < end; ++bi) {
          float sum = 0.0f;
          int64_t count = 0;
          for (int64_t t = 0; t < T; ++t) {
            if (static_cast<int64_t>(tg[bi * T + t]) == ignore_index) continue;
            sum += tk[bi * T + t];
            ++count;
          }
          o[bi] = count > 0 ? sum / static_cast<float>(count) : 0.0f;
        }
      });
    });
  }
  return out;
}

}  // namespace es_kernels
