// Declarations of the es_kernels CPU ops (ES_SPEC sections 3-7).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace es_kernels {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

at::Tensor per_sample_cross_entropy(const at::Tensor& logits, const at::Tensor& targets,
                                    int64_t ignore_index, double label_smoothing);

at::Tensor es_update(const at::Tensor& ids, const at::Tensor& losses, at::Tensor& s,
                     at::Tensor& d, at::Tensor& errors, double beta1, double beta2,
                     double w_min);

at::Tensor weighted_select(const at::Tensor& weights, int64_t b, c10::string_view mode,
                           int64_t seed, int64_t step);

Tensor3 es_step_losses(const at::Tensor& losses, const at::Tensor& ids, at::Tensor& s,
                       at::Tensor& d, at::Tensor& errors, int64_t b, double beta1,
                       double beta2, c10::string_view mode, int64_t seed, int64_t step,
                       double w_min);

Tensor3 es_step(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& ids,
                at::Tensor& s, at::Tensor& d, at::Tensor& errors, int64_t b, double beta1,
                double beta2, c10::string_view mode, int64_t seed, int64_t step,
                int64_t ignore_index, double label_smoothing, double w_min);

Tensor3 eswp_prune(const at::Tensor& s, const at::Tensor& d, double prune_ratio, int64_t seed,
                   int64_t epoch, int64_t num_epochs, double anneal_frac, bool rescale);

// Memory-safety guards shared by the kernels. The Python API validates every
// argument first with messages that name it; these keep a direct call of
// torch.ops.es_kernels.* from reading or writing out of bounds.
inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for this kernel, got ",
                    t.device());
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
