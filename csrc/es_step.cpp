// State update (docs/spec.md section 3), selection (section 4) and the fused
// step (section 6) on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "ops.h"
#include "philox.h"
#include "spec.h"

namespace es_kernels {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void check_errors(const at::Tensor& errors) {
  check_cpu(errors, "errors");
  TORCH_CHECK_VALUE(errors.numel() == 2 && errors.scalar_type() == at::kLong,
                    "errors must be int64 [2]");
}

template <typename S, typename I>
inline void prefetch_pair(I id, S* st, int64_t N) {
  const int64_t i = static_cast<int64_t>(id);
  if (i >= 0 && i < N) __builtin_prefetch(st + 2 * i, 1);
}

// Section 3, serial over positions: distinct ids are the contract, and a
// duplicate then only decides which observation wins, never memory safety.
// `st` holds the (s, d) pairs; each observation writes its pair together.
// `scored` (may be null: every position) marks the observations; the other
// positions (a row or sequence with nothing to score) are skipped: no read,
// no write, no count, weight 0.
template <typename S, typename I>
void update_kernel(const I* ids, const S* l, const bool* scored, int64_t B, S* st, int64_t N,
                   int64_t* errors, float* w, double beta1, double beta2, double lam,
                   double w_min) {
  const S b1 = static_cast<S>(beta1), ob1 = static_cast<S>(1.0 - beta1);
  const S b2 = static_cast<S>(beta2), ob2 = static_cast<S>(1.0 - beta2);
  const S lm = static_cast<S>(lam), wmin = static_cast<S>(w_min);
  const float wmin_f = static_cast<float>(wmin);
  int64_t bad_id = 0, bad_obs = 0;
  // pairs requested ahead: after a pass over the logits the state is cold
  constexpr int64_t kAhead = 16;
  for (int64_t j = 0; j < std::min(B, kAhead); ++j) prefetch_pair(ids[j], st, N);
  for (int64_t j = 0; j < B; ++j) {
    if (j + kAhead < B) prefetch_pair(ids[j + kAhead], st, N);
    if (scored != nullptr && !scored[j]) {
      w[j] = 0.0f;
      continue;
    }
    const int64_t i = static_cast<int64_t>(ids[j]);
    w[j] = wmin_f;
    if (i < 0 || i >= N) {
      ++bad_id;
      continue;
    }
    const S x = l[j];
    if (!std::isfinite(x)) {
      ++bad_obs;
      continue;
    }
    const S so = st[2 * i];
    S sn, dn;
    if (std::isnan(so)) {
      sn = x;
      dn = S(0);
    } else {
      const S delta = x - so;
      sn = b1 * so + ob1 * x;
      dn = b2 * st[2 * i + 1] + ob2 * delta;
    }
    const S wi = sn + lm * dn;
    const float wf = static_cast<float>(wi < wmin ? wmin : wi);
    if (!std::isfinite(sn) || !std::isfinite(dn) || !std::isfinite(wf)) {
      ++bad_obs;  // an overflow: the state keeps only finite values
      continue;
    }
    st[2 * i] = sn;
    st[2 * i + 1] = dn;
    w[j] = wf;
  }
  errors[0] += bad_id;
  errors[1] += bad_obs;
}

bool parse_mode(c10::string_view mode, double eps) {
  TORCH_CHECK_VALUE(mode == "sample" || mode == "topk",
                    "select_mode must be 'sample' or 'topk', got '", std::string(mode), "'");
  TORCH_CHECK_VALUE(eps >= 0.0 && eps <= 1.0, "eps must be in [0, 1], got ", eps);
  TORCH_CHECK_VALUE(mode == "sample" || eps == 0.0, "eps needs select_mode='sample'");
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

inline double positive_part(float w) { return std::isfinite(w) && w > 0.0f ? w : 0.0; }

// Section 4, exploration mix: v_j = ((1 - eps) w_j) / mean + eps in float64,
// with the mean of the fixed-point values floor(w_j 2^(31 - e)) summed
// exactly in int64, so every backend gets the same bits in any order.
// A +inf weight is a priority: v = +inf (its key is +inf).
std::vector<double> exploration_mix(const float* w, int64_t B, double eps) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  std::vector<double> v(B, 1.0);
  double big = 0.0;
  for (int64_t j = 0; j < B; ++j) big = std::max(big, positive_part(w[j]));
  if (big == 0.0) {
    for (int64_t j = 0; j < B; ++j)
      if (w[j] == std::numeric_limits<float>::infinity()) v[j] = kInf;
    return v;
  }
  int e = 0;
  std::frexp(big, &e);
  const double up = std::ldexp(1.0, kSelectMeanBits - e);
  int64_t q = 0;
  for (int64_t j = 0; j < B; ++j) q += static_cast<int64_t>(std::floor(positive_part(w[j]) * up));
  const double mean =
      static_cast<double>(q) * std::ldexp(1.0, e - kSelectMeanBits) / static_cast<double>(B);
  for (int64_t j = 0; j < B; ++j) {
    v[j] = w[j] == std::numeric_limits<float>::infinity()
               ? kInf
               : ((1.0 - eps) * positive_part(w[j])) / mean + eps;
  }
  return v;
}

// Section 4: ascending positions of the b largest keys, ties to the lower
// position. Keys: w for topk; v / E with E = -log(u) ~ Exp(1) for sample
// (the exponential race, equivalent to log v + Gumbel), in float64 rounded to
// float32 so that every backend's libm gives the same key. Position j draws
// the noise of counter offset + j (a rank's positions in a gathered batch).
at::Tensor select_kernel(const float* w, int64_t B, int64_t b, bool sample, uint64_t seed,
                         uint64_t step, double eps, const at::TensorOptions& opts,
                         uint64_t offset = 0) {
  TORCH_CHECK_VALUE(b >= 0 && b <= B, "b must be in [0, B] = [0, ", B, "], got ", b);
  at::Tensor out = at::empty({b}, opts.dtype(at::kLong));
  if (b == 0) return out;
  const std::vector<double> v =
      sample && eps > 0.0 ? exploration_mix(w, B, eps) : std::vector<double>();
  // packed = (~ordered key) << 32 | position: ascending packed is descending
  // key, ties to the lower position; plain integer compares from here on.
  std::vector<uint64_t> packed(B);
  // grain: a meta-batch of up to 8192 keys (about 0.15 ms) runs on the calling
  // thread; waking the pool costs more than it saves there, on a busy machine a
  // scheduler slice
  at::parallel_for(0, B, 8192, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float k = w[j];
      if (sample) {
        const double u =
            uniform_from_bits(philox4x32_10(seed, offset + j, step, kStreamSelect).x[0]);
        const double vj = v.empty() ? static_cast<double>(w[j]) : v[j];
        k = static_cast<float>(vj / -std::log(u));
      }
      packed[j] = (static_cast<uint64_t>(~ordered_bits(k)) << 32) | static_cast<uint64_t>(j);
    }
  });
  if (b < B) std::nth_element(packed.begin(), packed.begin() + b, packed.end());
  // ascending positions: mark the chosen ones in a bitmap, then read it in order (O(B))
  std::vector<uint64_t> chosen((B + 63) / 64, 0);
  for (int64_t k = 0; k < b; ++k) {
    const uint64_t j = packed[k] & 0xFFFFFFFFu;
    chosen[j >> 6] |= uint64_t(1) << (j & 63);
  }
  int64_t* o = out.data_ptr<int64_t>();
  for (size_t wd = 0; wd < chosen.size(); ++wd)
    for (uint64_t m = chosen[wd]; m; m &= m - 1)
      *o++ = static_cast<int64_t>(wd * 64 + __builtin_ctzll(m));
  return out;
}

}  // namespace

namespace {

at::Tensor update(const at::Tensor& ids_in, const at::Tensor& losses_in, const bool* scored,
                  at::Tensor& state, at::Tensor& errors, double beta1, double beta2, double lam,
                  double w_min) {
  check_state(state);
  check_errors(errors);
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
  const at::Tensor losses = losses_in.to(state.scalar_type()).contiguous();
  const int64_t B = ids.size(0);
  at::Tensor w = at::empty({B}, losses.options().dtype(at::kFloat));
  if (B == 0) return w;
  with_contiguous(state, [&](at::Tensor& sc) {
    with_contiguous(errors, [&](at::Tensor& ec) {
      AT_DISPATCH_FLOATING_TYPES(sc.scalar_type(), "es_update", [&] {
        AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "es_update_ids", [&] {
          update_kernel<scalar_t, index_t>(ids.data_ptr<index_t>(), losses.data_ptr<scalar_t>(),
                                           scored, B, sc.data_ptr<scalar_t>(), sc.size(0),
                                           ec.data_ptr<int64_t>(), w.data_ptr<float>(), beta1,
                                           beta2, lam, w_min);
        });
      });
    });
  });
  return w;
}

// Per-row means of token losses [B, T] where `mask` (bool [B, T], or none:
// every token) holds: the exact fixed-point mean of section 6 (float32
// values x, q = trunc(x 2^(K - e)) summed in int64, so the order does not
// matter), rounded to float32; `scored` says which rows had a token.
at::Tensor sequence_means(const at::Tensor& losses_in, const OptTensor& mask_in,
                          std::vector<uint8_t>& scored) {
  const at::Tensor l = losses_in.to(at::kFloat).contiguous();
  const int64_t B = l.size(0), T = l.size(1);
  at::Tensor mask;
  if (mask_in.has_value()) {
    check_cpu(*mask_in, "mask");
    TORCH_CHECK_VALUE(mask_in->scalar_type() == at::kBool && mask_in->sizes() == l.sizes(),
                      "mask must be bool with the shape of losses ", l.sizes());
    mask = mask_in->contiguous();
  }
  at::Tensor out = at::empty({B}, l.options().dtype(at::kFloat));
  scored.assign(B, 0);
  const float* lp = l.data_ptr<float>();
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  float* o = out.data_ptr<float>();
  const int bits = seq_mean_bits(T);
  for (int64_t r = 0; r < B; ++r) {
    const float* x = lp + r * T;
    const bool* keep = mp != nullptr ? mp + r * T : nullptr;
    int64_t count = 0;
    double big = 0.0;
    bool nan = false, pinf = false, ninf = false;
    for (int64_t t = 0; t < T; ++t) {
      if (keep != nullptr && !keep[t]) continue;
      ++count;
      if (std::isfinite(x[t])) {
        big = std::max(big, std::fabs(static_cast<double>(x[t])));
      } else {
        nan |= std::isnan(x[t]);
        pinf |= x[t] > 0.0f && !std::isnan(x[t]);
        ninf |= x[t] < 0.0f;
      }
    }
    double mean = 0.0;
    if (nan || (pinf && ninf)) {
      mean = std::numeric_limits<double>::quiet_NaN();
    } else if (pinf || ninf) {
      mean =
          pinf ? std::numeric_limits<double>::infinity() : -std::numeric_limits<double>::infinity();
    } else if (big > 0.0) {
      int e = 0;
      std::frexp(big, &e);
      const double up = std::ldexp(1.0, bits - e);
      int64_t q = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (keep != nullptr && !keep[t]) continue;
        q += static_cast<int64_t>(std::trunc(static_cast<double>(x[t]) * up));
      }
      mean = static_cast<double>(q) * std::ldexp(1.0, e - bits) / static_cast<double>(count);
    }
    o[r] = count > 0 ? static_cast<float>(mean) : 0.0f;
    scored[r] = count > 0;
  }
  return out;
}

Tensor3 fused_step(const at::Tensor& losses, const bool* scored, const at::Tensor& ids,
                   at::Tensor& state, at::Tensor& errors, int64_t b, double beta1, double beta2,
                   c10::string_view select_mode, int64_t seed, int64_t step,
                   const OptTensor& seed_tensor, const OptTensor& step_tensor, bool advance_step,
                   double lam, double eps, double w_min, bool own_losses) {
  const bool sample = parse_mode(select_mode, eps);
  TORCH_CHECK_VALUE(b >= 0 && b <= ids.numel(), "b must be in [0, B] = [0, ", ids.numel(),
                    "], got ", b);
  const uint64_t useed = noise_value(seed, seed_tensor, "seed");
  const uint64_t ustep = noise_value(step, step_tensor, "step");
  at::Tensor w = update(ids, losses, scored, state, errors, beta1, beta2, lam, w_min);
  at::Tensor pos =
      select_kernel(w.data_ptr<float>(), w.size(0), b, sample, useed, ustep, eps, w.options());
  if (advance_step && step_tensor.has_value()) {
    int64_t* p = step_tensor->data_ptr<int64_t>();
    *p = static_cast<int64_t>(static_cast<uint64_t>(*p) + 1u);
  }
  // the losses output must not alias an input: copy the caller's, return our own
  return {pos, own_losses ? losses : losses.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true),
          w};
}

// Which rows (or sequences) have a target to score: targets != ignore_index,
// any over the sequence; one pass over the targets, no temporaries.
std::vector<uint8_t> scored_rows(const at::Tensor& targets_in, int64_t ignore_index) {
  const at::Tensor targets = targets_in.contiguous();
  const int64_t B = targets.size(0), T = targets.dim() == 2 ? targets.size(1) : 1;
  std::vector<uint8_t> scored(B, 0);
  AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "scored_rows", [&] {
    const index_t* tg = targets.const_data_ptr<index_t>();
    for (int64_t r = 0; r < B; ++r) {
      for (int64_t t = 0; t < T && !scored[r]; ++t) {
        scored[r] = static_cast<int64_t>(tg[r * T + t]) != ignore_index;
      }
    }
  });
  return scored;
}

// Section 12.2: the weight of each id from its stored pair, without an
// update: +inf (a priority) when never observed or due, 0 when capped, else
// section 3's max(s + lam d, w_min) in S, then float32.
template <typename S, typename I>
void state_weights_kernel(const I* ids, int64_t B, const S* st, int64_t N, int64_t* errors,
                          float* w, double lam, double w_min, int64_t now, const int64_t* last_seen,
                          int64_t max_age, const int64_t* picks, int64_t cap) {
  const S lm = static_cast<S>(lam), wmin = static_cast<S>(w_min);
  int64_t bad_id = 0;
  for (int64_t j = 0; j < B; ++j) {
    const int64_t i = static_cast<int64_t>(ids[j]);
    if (i < 0 || i >= N) {
      ++bad_id;
      w[j] = static_cast<float>(wmin);
      continue;
    }
    const S s = st[2 * i];
    // now - last_seen as int64 with wrap-around (unsigned subtraction)
    const bool due =
        std::isnan(s) ||
        (max_age >= 0 && static_cast<int64_t>(static_cast<uint64_t>(now) -
                                              static_cast<uint64_t>(last_seen[i])) > max_age);
    if (due) {
      w[j] = std::numeric_limits<float>::infinity();
    } else if (cap >= 0 && picks[i] >= cap) {
      w[j] = 0.0f;
    } else {
      const S wi = s + lm * st[2 * i + 1];
      w[j] = static_cast<float>(wi < wmin ? wmin : wi);
    }
  }
  errors[0] += bad_id;
}

at::Tensor counter(const OptTensor& t, int64_t limit, int64_t N, const char* name) {
  if (limit < 0) return at::Tensor();
  TORCH_CHECK_VALUE(t.has_value(), name, " must be given (int64 [N]) when its bound is >= 0");
  check_cpu(*t, name);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == N && t->scalar_type() == at::kLong, name,
                    " must be int64 [N] with N = ", N);
  return t->contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> es_select_from_state(
    const at::Tensor& ids_in, const at::Tensor& state, at::Tensor& errors, int64_t b, double lam,
    double w_min, c10::string_view select_mode, int64_t seed, int64_t step,
    const OptTensor& seed_tensor, const OptTensor& step_tensor, bool advance_step, double eps,
    const OptTensor& last_seen_in, int64_t max_age, const OptTensor& picks_in, int64_t cap) {
  // every check before anything is written
  check_state(state);
  check_errors(errors);
  check_cpu(ids_in, "ids");
  TORCH_CHECK_VALUE(ids_in.dim() == 1, "ids must be 1-D [B], got ", ids_in.sizes());
  TORCH_CHECK_VALUE(ids_in.scalar_type() == at::kLong || ids_in.scalar_type() == at::kInt,
                    "ids must be int64 or int32, got ", ids_in.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(lam) && lam >= 0.0, "lam must be finite and >= 0, got ", lam);
  TORCH_CHECK_VALUE(static_cast<float>(w_min) > 0.0f && std::isfinite(static_cast<float>(w_min)),
                    "w_min must be > 0 and finite in float32, got ", w_min);
  TORCH_CHECK_VALUE(max_age >= -1, "max_age must be >= -1, got ", max_age);
  TORCH_CHECK_VALUE(cap >= -1, "cap must be >= -1, got ", cap);
  const bool sample = parse_mode(select_mode, eps);
  const int64_t B = ids_in.size(0), N = state.size(0);
  TORCH_CHECK_VALUE(b >= 0 && b <= B, "b must be in [0, B] = [0, ", B, "], got ", b);
  TORCH_CHECK_VALUE(B < (int64_t(1) << 32), "ids: at most 2^32 - 1 positions");
  const at::Tensor last_seen = counter(last_seen_in, max_age, N, "last_seen");
  const at::Tensor picks = counter(picks_in, cap, N, "picks");
  const uint64_t useed = noise_value(seed, seed_tensor, "seed");
  const uint64_t ustep = noise_value(step, step_tensor, "step");
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor st = state.contiguous();
  at::Tensor w = at::empty({B}, state.options().dtype(at::kFloat));
  if (B > 0) {
    with_contiguous(errors, [&](at::Tensor& ec) {
      AT_DISPATCH_FLOATING_TYPES(st.scalar_type(), "es_select_from_state", [&] {
        AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "es_select_from_state_ids", [&] {
          state_weights_kernel<scalar_t, index_t>(
              ids.data_ptr<index_t>(), B, st.data_ptr<scalar_t>(), N, ec.data_ptr<int64_t>(),
              w.data_ptr<float>(), lam, w_min, static_cast<int64_t>(ustep),
              last_seen.defined() ? last_seen.data_ptr<int64_t>() : nullptr, max_age,
              picks.defined() ? picks.data_ptr<int64_t>() : nullptr, cap);
        });
      });
    });
  }
  at::Tensor pos = select_kernel(w.data_ptr<float>(), B, b, sample, useed, ustep, eps, w.options());
  if (advance_step && step_tensor.has_value()) {
    int64_t* p = step_tensor->data_ptr<int64_t>();
    *p = static_cast<int64_t>(static_cast<uint64_t>(*p) + 1u);
  }
  return {pos, w};
}

at::Tensor es_update(const at::Tensor& ids, const at::Tensor& losses, at::Tensor& state,
                     at::Tensor& errors, double beta1, double beta2, double lam, double w_min) {
  return update(ids, losses, nullptr, state, errors, beta1, beta2, lam, w_min);
}

at::Tensor weighted_select(const at::Tensor& weights_in, int64_t b, c10::string_view select_mode,
                           int64_t seed, int64_t step, const OptTensor& seed_tensor,
                           const OptTensor& step_tensor, double eps, int64_t offset) {
  check_cpu(weights_in, "weights");
  TORCH_CHECK_VALUE(weights_in.dim() == 1, "weights must be 1-D [B], got ", weights_in.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(weights_in.scalar_type()), "weights must be floating point");
  const bool sample = parse_mode(select_mode, eps);
  TORCH_CHECK_VALUE(weights_in.size(0) < (int64_t(1) << 32), "weights: at most 2^32 - 1 positions");
  TORCH_CHECK_VALUE(offset >= 0 && offset < (int64_t(1) << 48), "offset must be in [0, 2^48), got ",
                    offset);
  const at::Tensor w = weights_in.to(at::kFloat).contiguous();
  return select_kernel(
      w.data_ptr<float>(), w.size(0), b, sample, noise_value(seed, seed_tensor, "seed"),
      noise_value(step, step_tensor, "step"), eps, w.options(), static_cast<uint64_t>(offset));
}

Tensor3 es_step_from_losses(const at::Tensor& losses, const at::Tensor& ids, at::Tensor& state,
                            at::Tensor& errors, int64_t b, double beta1, double beta2,
                            c10::string_view select_mode, int64_t seed, int64_t step,
                            const OptTensor& seed_tensor, const OptTensor& step_tensor,
                            bool advance_step, double lam, double eps, double w_min,
                            const OptTensor& mask) {
  check_cpu(losses, "losses");
  TORCH_CHECK_VALUE(losses.dim() == 1 || losses.dim() == 2, "losses must be [B] or [B, T], got ",
                    losses.sizes());
  if (losses.dim() == 1) {
    TORCH_CHECK_VALUE(!mask.has_value(), "mask goes with token losses [B, T]");
    return fused_step(losses, nullptr, ids, state, errors, b, beta1, beta2, select_mode, seed, step,
                      seed_tensor, step_tensor, advance_step, lam, eps, w_min,
                      /*own_losses=*/false);
  }
  TORCH_CHECK_VALUE(at::isFloatingType(losses.scalar_type()), "losses must be floating point");
  std::vector<uint8_t> scored;
  const at::Tensor means = sequence_means(losses, mask, scored);
  return fused_step(means, reinterpret_cast<const bool*>(scored.data()), ids, state, errors, b,
                    beta1, beta2, select_mode, seed, step, seed_tensor, step_tensor, advance_step,
                    lam, eps, w_min, /*own_losses=*/true);
}

Tensor3 es_step(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& ids,
                at::Tensor& state, at::Tensor& errors, int64_t b, double beta1, double beta2,
                c10::string_view select_mode, int64_t seed, int64_t step,
                const OptTensor& seed_tensor, const OptTensor& step_tensor, bool advance_step,
                int64_t ignore_index, double label_smoothing, double lam, double eps,
                double w_min) {
  // select_mode, eps and b are checked by fused_step() before it writes any state
  TORCH_CHECK_VALUE(!(logits.requires_grad() && at::GradMode::is_enabled()),
                    "logits requires grad: the ES step is not differentiable. Score under "
                    "torch.no_grad() or torch.inference_mode() (or pass .detach())");
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == logits.size(0),
                    "ids must be 1-D with the batch size of logits (", logits.size(0), ")");
  at::Tensor losses = per_sample_cross_entropy(logits, targets, ignore_index, label_smoothing);
  // a row (or sequence) with no target to score is skipped by the update
  const std::vector<uint8_t> scored = scored_rows(targets, ignore_index);
  return fused_step(losses, reinterpret_cast<const bool*>(scored.data()), ids, state, errors, b,
                    beta1, beta2, select_mode, seed, step, seed_tensor, step_tensor, advance_step,
                    lam, eps, w_min, /*own_losses=*/true);
}

}  // namespace es_kernels
