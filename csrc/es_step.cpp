// State update (ES_SPEC section 3), selection (section 4) and the fused step
// (section 6) on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "ops.h"
#include "philox.h"

namespace es_kernels {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void check_state(const at::Tensor& s, const at::Tensor& d, const at::Tensor& errors) {
  check_cpu(s, "s");
  check_cpu(d, "d");
  check_cpu(errors, "errors");
  TORCH_CHECK_VALUE(s.dim() == 1, "s must be 1-D [N], got ", s.sizes());
  TORCH_CHECK_VALUE(d.sizes() == s.sizes(), "d must have the shape of s ", s.sizes(), ", got ",
                    d.sizes());
  TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble,
                    "s must be float32 or float64, got ", s.scalar_type());
  TORCH_CHECK_VALUE(d.scalar_type() == s.scalar_type(), "d must have the dtype of s");
  TORCH_CHECK_VALUE(errors.numel() == 2 && errors.scalar_type() == at::kLong,
                    "errors must be int64 [2]");
}

// Section 3, serial over positions: distinct ids are the contract, and a
// duplicate then only decides which observation wins, never memory safety.
template <typename S, typename I>
void update_kernel(const I* ids, const S* l, int64_t B, S* s, S* d, int64_t N, int64_t* errors,
                   float* w, double beta1, double beta2, double w_min) {
  const S b1 = static_cast<S>(beta1), ob1 = static_cast<S>(1.0 - beta1);
  const S b2 = static_cast<S>(beta2), ob2 = static_cast<S>(1.0 - beta2);
  const S wmin = static_cast<S>(w_min);
  int64_t bad_id = 0, bad_loss = 0;
  for (int64_t j = 0; j < B; ++j) {
    const int64_t i = static_cast<int64_t>(ids[j]);
    if (i < 0 || i >= N) {
      ++bad_id;
      w[j] = static_cast<float>(wmin);
      continue;
    }
    const S x = l[j];
    if (!std::isfinite(x)) {
      ++bad_loss;
      w[j] = static_cast<float>(wmin);
      continue;
    }
    const S so = s[i];
    S sn, dn;
    if (std::isnan(so)) {
      sn = x;
      dn = S(0);
    } else {
      const S delta = x - so;
      sn = b1 * so + ob1 * x;
      dn = b2 * d[i] + ob2 * delta;
    }
    s[i] = sn;
    d[i] = dn;
    const S wi = sn + dn;
    w[j] = static_cast<float>(wi < wmin ? wmin : wi);  // NaN stays NaN, as torch.clamp
  }
  errors[0] += bad_id;
  errors[1] += bad_loss;
}

bool parse_mode(c10::string_view mode) {
  TORCH_CHECK_VALUE(mode == "sample" || mode == "topk", "mode must be 'sample' or 'topk', got '",
                    std::string(mode), "'");
  return mode == "sample";
}

// Order-preserving map of a float key to uint32 (NaN counts as -inf).
inline uint32_t ordered_bits(float k) {
  if (std::isnan(k)) k = kNegInf;
  if (k == 0.0f) k = 0.0f;  // -0 ties with +0, as in a float sort
  uint32_t u;
  std::memcpy(&u, &k, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Section 4: ascending positions of the b largest keys, ties to the lower
// position. Keys: w for topk; w / E with E = -log(u) ~ Exp(1) for sample
// (the exponential race, equivalent to log w + Gumbel), in float64 rounded to
// float32 so that every backend's libm gives the same key.
at::Tensor select_kernel(const float* w, int64_t B, int64_t b, bool sample, int64_t seed,
                         int64_t step, const at::TensorOptions& opts) {
  TORCH_CHECK_VALUE(b >= 0 && b <= B, "b must be in [0, B] = [0, ", B, "], got ", b);
  at::Tensor out = at::empty({b}, opts.dtype(at::kLong));
  if (b == 0) return out;
  // packed = (~ordered key) << 32 | position: ascending packed is descending
  // key, ties to the lower position; plain integer compares from here on.
  std::vector<uint64_t> packed(B);
  const uint64_t useed = static_cast<uint64_t>(seed), ustep = static_cast<uint64_t>(step);
  at::parallel_for(0, B, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float k = w[j];
      if (sample) {
        const double u = uniform_from_bits(philox4x32_10(useed, j, ustep, kStreamSelect).x[0]);
        k = static_cast<float>(static_cast<double>(w[j]) / -std::log(u));
      }
      packed[j] = (static_cast<uint64_t>(~ordered_bits(k)) << 32) | static_cast<uint64_t>(j);
    }
  });
  if (b < B) std::nth_element(packed.begin(), packed.begin() + b, packed.end());
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t k = 0; k < b; ++k) o[k] = static_cast<int64_t>(packed[k] & 0xFFFFFFFFu);
  std::sort(o, o + b);
  return out;
}

}  // namespace

at::Tensor es_update(const at::Tensor& ids_in, const at::Tensor& losses_in, at::Tensor& s,
                     at::Tensor& d, at::Tensor& errors, double beta1, double beta2,
                     double w_min) {
  check_state(s, d, errors);
  check_cpu(ids_in, "ids");
  check_cpu(losses_in, "losses");
  TORCH_CHECK_VALUE(ids_in.dim() == 1, "ids must be 1-D [B], got ", ids_in.sizes());
  TORCH_CHECK_VALUE(ids_in.scalar_type() == at::kLong || ids_in.scalar_type() == at::kInt,
                    "ids must be int64 or int32, got ", ids_in.scalar_type());
  TORCH_CHECK_VALUE(losses_in.dim() == 1 && losses_in.size(0) == ids_in.size(0),
                    "losses must be 1-D with the length of ids (", ids_in.size(0), "), got ",
                    losses_in.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(losses_in.scalar_type()), "losses must be floating point");
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor losses = losses_in.to(s.scalar_type()).contiguous();
  const int64_t B = ids.size(0);
  at::Tensor w = at::empty({B}, losses.options().dtype(at::kFloat));
  if (B == 0) return w;
  with_contiguous(s, [&](at::Tensor& sc) {
    with_contiguous(d, [&](at::Tensor& dc) {
      with_contiguous(errors, [&](at::Tensor& ec) {
        AT_DISPATCH_FLOATING_TYPES(sc.scalar_type(), "es_update", [&] {
          AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "es_update_ids", [&] {
            update_kernel<scalar_t, index_t>(ids.data_ptr<index_t>(), losses.data_ptr<scalar_t>(),
                                             B, sc.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
                                             sc.size(0), ec.data_ptr<int64_t>(),
                                             w.data_ptr<float>(), beta1, beta2, w_min);
          });
        });
      });
    });
  });
  return w;
}

at::Tensor weighted_select(const at::Tensor& weights_in, int64_t b, c10::string_view mode,
                           int64_t seed, int64_t step) {
  check_cpu(weights_in, "weights");
  TORCH_CHECK_VALUE(weights_in.dim() == 1, "weights must be 1-D [B], got ", weights_in.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(weights_in.scalar_type()), "weights must be floating point");
  const bool sample = parse_mode(mode);
  TORCH_CHECK_VALUE(weights_in.size(0) < (int64_t(1) << 32), "weights: at most 2^32 - 1 positions");
  const at::Tensor w = weights_in.to(at::kFloat).contiguous();
  return select_kernel(w.data_ptr<float>(), w.size(0), b, sample, seed, step, w.options());
}

Tensor3 es_step_losses(const at::Tensor& losses, const at::Tensor& ids, at::Tensor& s,
                       at::Tensor& d, at::Tensor& errors, int64_t b, double beta1,
                       double beta2, c10::string_view mode, int64_t seed, int64_t step,
                       double w_min) {
  const bool sample = parse_mode(mode);
  TORCH_CHECK_VALUE(b >= 0 && b <= ids.numel(), "b must be in [0, B] = [0, ", ids.numel(),
                    "], got ", b);
  at::Tensor w = es_update(ids, losses, s, d, errors, beta1, beta2, w_min);
  at::Tensor pos = select_kernel(w.data_ptr<float>(), w.size(0), b, sample, seed, step, w.options());
  return {pos, losses.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true), w};
}

Tensor3 es_step(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& ids,
                at::Tensor& s, at::Tensor& d, at::Tensor& errors, int64_t b, double beta1,
                double beta2, c10::string_view mode, int64_t seed, int64_t step,
                int64_t ignore_index, double label_smoothing, double w_min) {
  // mode and b are checked by es_step_losses before it writes any state
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == logits.size(0),
                    "ids must be 1-D with the batch size of logits (", logits.size(0), ")");
  at::Tensor losses = per_sample_cross_entropy(logits, targets, ignore_index, label_smoothing);
  return es_step_losses(losses, ids, s, d, errors, b, beta1, beta2, mode, seed, step, w_min);
}

}  // namespace es_kernels
