// Per-sample cross-entropy (docs/spec.md section 5): one pass over the logits with
// an online log-sum-exp over chunks of the class axis, float32 arithmetic,
// float32 / bfloat16 / float16 input, parallel over rows. The logits are read
// in place with their batch and sequence strides (class stride 1). Non-finite
// logits are treated as in F.cross_entropy (see RowAcc).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops.h"

namespace es_kernels {
// The portable copy: vectors as wide as the baseline target's registers.
namespace ce_base {
#if defined(__AVX__)
#define ES_VEC_BYTES 32
#else
#define ES_VEC_BYTES 16
#endif
#include "ce_kernels.inc"
#undef ES_VEC_BYTES
}  // namespace ce_base

// An AVX2 + FMA copy for x86 CPUs that have them, chosen at run time (as
// ATen's own CPU kernels are) when the build does not target AVX2 already.
// `#pragma GCC target` applies to the functions defined here only: the
// library and torch helpers they call keep the portable code, so nothing
// shared can execute AVX2 on a CPU without it.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__AVX2__)
#define ES_CE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace ce_avx2 {
#define ES_VEC_BYTES 32
#include "ce_kernels.inc"
#undef ES_VEC_BYTES
}  // namespace ce_avx2
#pragma GCC pop_options
#endif

namespace {

bool use_avx2() {
#ifdef ES_CE_AVX2
  // ES_KERNELS_NO_AVX2=1 runs the portable copy (the tests run both)
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("ES_KERNELS_NO_AVX2") == nullptr;
  return yes;
#else
  return false;
#endif
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

#ifdef ES_CE_AVX2
  if (use_avx2()) {
    ce_avx2::token_losses_all(logits, targets, tok, stride_b, stride_t, T_len, rows, C,
                              ignore_index, label_smoothing);
  } else
#endif
  {
    ce_base::token_losses_all(logits, targets, tok, stride_b, stride_t, T_len, rows, C,
                              ignore_index, label_smoothing);
  }

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

// The gradient of per_sample_cross_entropy with respect to the logits
// (docs/spec.md section 5.1): each row's (max, sum of exp) recomputed from
// the logits, read in place as the forward reads them, and the gradient
// written once, contiguous, in the logits' dtype (no [B, C] float32
// intermediate: a 16-bit row goes through a per-thread chunk buffer).
at::Tensor per_sample_cross_entropy_backward(const at::Tensor& grad_in, const at::Tensor& logits_in,
                                             const at::Tensor& targets_in, int64_t ignore_index,
                                             double label_smoothing) {
  check_cpu(grad_in, "grad");
  check_cpu(logits_in, "logits");
  check_cpu(targets_in, "targets");
  const int64_t dim = logits_in.dim();
  TORCH_CHECK_VALUE(dim == 2 || dim == 3, "logits must be [B, C] or [B, T, V], got ",
                    logits_in.sizes());
  const auto dt = logits_in.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                    "logits must have dtype in (float32, bfloat16, float16), got ", dt);
  TORCH_CHECK_VALUE(
      targets_in.dim() == dim - 1 && targets_in.sizes() == logits_in.sizes().slice(0, dim - 1),
      "targets must have shape ", logits_in.sizes().slice(0, dim - 1), ", got ",
      targets_in.sizes());
  TORCH_CHECK_VALUE(targets_in.scalar_type() == at::kLong || targets_in.scalar_type() == at::kInt,
                    "targets must be int64 or int32, got ", targets_in.scalar_type());
  TORCH_CHECK_VALUE(grad_in.dim() == 1 && grad_in.size(0) == logits_in.size(0),
                    "grad must have shape (", logits_in.size(0), ",), got ", grad_in.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(grad_in.scalar_type()), "grad must be floating point, got ",
                    grad_in.scalar_type());
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "label_smoothing must be in [0.0, 1.0], got ", label_smoothing);
  const at::Tensor logits = logits_in.size(dim - 1) <= 1 || logits_in.stride(dim - 1) == 1
                                ? logits_in
                                : logits_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  at::Tensor out =
      at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t B = logits.size(0);
  const int64_t C = logits.size(dim - 1);
  const int64_t rows = targets.numel();
  if (rows == 0) return out;
  TORCH_CHECK_VALUE(C > 0, "logits must have at least one class");
  at::Tensor g = grad_in.to(at::kFloat).contiguous();
  const int64_t T_len = dim == 3 ? logits.size(1) : 1;
  if (dim == 3) {  // the factor of a sequence's tokens: grad_b / (its scored tokens)
    at::Tensor scaled = at::empty({B}, g.options());
    const float* gi = g.const_data_ptr<float>();
    float* go = scaled.data_ptr<float>();
    AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "per_sample_ce_backward_count", [&] {
      const index_t* tg = targets.const_data_ptr<index_t>();
      for (int64_t bi = 0; bi < B; ++bi) {
        int64_t count = 0;
        for (int64_t t = 0; t < T_len; ++t)
          count += static_cast<int64_t>(tg[bi * T_len + t]) != ignore_index;
        go[bi] = count > 0 ? gi[bi] / static_cast<float>(count) : 0.0f;
      }
    });
    g = scaled;
  }
  const int64_t stride_b = logits.stride(0), stride_t = dim == 3 ? logits.stride(1) : 0;
#ifdef ES_CE_AVX2
  if (use_avx2()) {
    ce_avx2::token_grads_all(logits, targets, g, out, stride_b, stride_t, T_len, rows, C,
                             ignore_index, label_smoothing);
  } else
#endif
  {
    ce_base::token_grads_all(logits, targets, g, out, stride_b, stride_t, T_len, rows, C,
                             ignore_index, label_smoothing);
  }
  return out;
}

}  // namespace es_kernels
