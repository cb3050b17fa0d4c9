// Declarations of the es_kernels CPU ops (docs/spec.md sections 3-7). The
// schemas are defined in Python (es_kernels/_schema.py); these functions take
// the schemas' arguments in order.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "spec.h"

namespace es_kernels {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

at::Tensor per_sample_cross_entropy(const at::Tensor& logits, const at::Tensor& targets,
                                    int64_t ignore_index, double label_smoothing);

at::Tensor per_sample_cross_entropy_backward(const at::Tensor& grad, const at::Tensor& logits,
                                             const at::Tensor& targets, int64_t ignore_index,
                                             double label_smoothing);

at::Tensor es_update(const at::Tensor& ids, const at::Tensor& losses, at::Tensor& state,
                     at::Tensor& errors, double beta1, double beta2, double lam, double w_min);

at::Tensor weighted_select(const at::Tensor& weights, int64_t b, c10::string_view select_mode,
                           int64_t seed, int64_t step, const OptTensor& seed_tensor,
                           const OptTensor& step_tensor, double eps, int64_t offset);

Tensor3 es_step_from_losses(const at::Tensor& losses, const at::Tensor& ids, at::Tensor& state,
                            at::Tensor& errors, int64_t b, double beta1, double beta2,
                            c10::string_view select_mode, int64_t seed, int64_t step,
                            const OptTensor& seed_tensor, const OptTensor& step_tensor,
                            bool advance_step, double lam, double eps, double w_min,
                            const OptTensor& mask);

Tensor3 es_step(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& ids,
                at::Tensor& state, at::Tensor& errors, int64_t b, double beta1, double beta2,
                c10::string_view select_mode, int64_t seed, int64_t step,
                const OptTensor& seed_tensor, const OptTensor& step_tensor, bool advance_step,
                int64_t ignore_index, double label_smoothing, double lam, double eps, double w_min);

std::tuple<at::Tensor, at::Tensor> es_select_from_state(
    const at::Tensor& ids, const at::Tensor& state, at::Tensor& errors, int64_t b, double lam,
    double w_min, c10::string_view select_mode, int64_t seed, int64_t step,
    const OptTensor& seed_tensor, const OptTensor& step_tensor, bool advance_step, double eps,
    const OptTensor& last_seen, int64_t max_age, const OptTensor& picks, int64_t cap);

Tensor3 eswp_prune(const at::Tensor& state, double prune_ratio, int64_t seed, int64_t epoch,
                   int64_t num_epochs, double anneal_frac, bool rescale, int64_t id_offset,
                   int64_t order_key, std::optional<double> threshold);

// Pieces of eswp_prune for the tests (es_kernels._C), at sizes no test can
// allocate: perm(q) of the visit order of n samples (section 7; keyed by order_key), the exact
// two-word sum of the threshold as (hi, lo, value) with sum = hi 2^32 + lo,
// and the Philox words of counters j (section 9: sample ids past 2^32).
std::vector<int64_t> prune_visit_perm(int64_t n, int64_t seed, int64_t epoch,
                                      const std::vector<int64_t>& q, int64_t order_key);
std::tuple<int64_t, int64_t, double> prune_exact_sum(const std::vector<int64_t>& terms);
std::vector<std::array<uint32_t, 4>> philox_words(int64_t seed, const std::vector<int64_t>& j,
                                                  int64_t step, int64_t stream);

// Memory-safety guards shared by the kernels. The Python API validates every
// argument first with messages that name it; these keep a direct call of
// torch.ops.es_kernels.* from reading or writing out of bounds.
inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for this kernel, got ",
                    t.device());
}

inline void check_state(const at::Tensor& state) {
  check_cpu(state, "state");
  TORCH_CHECK_VALUE(state.dim() == 2 && state.size(1) == 2, "state must be [N, 2], got ",
                    state.sizes());
  TORCH_CHECK_VALUE(state.scalar_type() == at::kFloat || state.scalar_type() == at::kDouble,
                    "state must be float32 or float64, got ", state.scalar_type());
  TORCH_CHECK_VALUE(state.size(0) <= kMaxSamples, "state: at most 2^48 - 1 samples");
}

// Runs `fn` on a contiguous view of the in-place argument `t` and writes the
// result back when `t` itself is not contiguous.
template <typename Fn>
void with_contiguous(at::Tensor& t, Fn&& fn) {
  if (t.is_contiguous()) {
    fn(t);
  } else {
    at::Tensor c = t.contiguous();
    fn(c);
    t.copy_(c);
  }
}

}  // namespace es_kernels
