// Registers the CPU kernels as torch ops in the `es_kernels` namespace. The
// schemas are the op contracts of ES_SPEC; `(a!)` marks the per-sample state
// an op mutates in place. Python (es_kernels/_ops.py) adds the fake (meta)
// implementations and, where Triton is present, the CUDA kernels.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include "ops.h"

TORCH_LIBRARY(es_kernels, m) {
  m.def("per_sample_cross_entropy(Tensor logits, Tensor targets, int ignore_index=-100, "
        "float label_smoothing=0.0) -> Tensor");
  m.def("es_update(Tensor ids, Tensor losses, Tensor(a!) s, Tensor(b!) d, Tensor(c!) errors, "
        "float beta1, float beta2, float w_min=1e-08) -> Tensor");
  m.def("weighted_select(Tensor weights, int b, str select_mode=\"sample\", int seed=0, int step=0) "
        "-> Tensor");
  m.def("es_step_losses(Tensor losses, Tensor ids, Tensor(a!) s, Tensor(b!) d, "
        "Tensor(c!) errors, int b, float beta1, float beta2, str select_mode=\"sample\", int seed=0, "
        "int step=0, float w_min=1e-08) -> (Tensor, Tensor, Tensor)");
  m.def("es_step(Tensor logits, Tensor targets, Tensor ids, Tensor(a!) s, Tensor(b!) d, "
        "Tensor(c!) errors, int b, float beta1, float beta2, str select_mode=\"sample\", int seed=0, "
        "int step=0, int ignore_index=-100, float label_smoothing=0.0, float w_min=1e-08) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("eswp_prune(Tensor s, Tensor d, float prune_ratio, int seed=0, int epoch=0, "
        "int num_epochs=1, float anneal_frac=0.125, bool rescale=True) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(es_kernels, CPU, m) {
  m.impl("per_sample_cross_entropy", &es_kernels::per_sample_cross_entropy);
  m.impl("es_update", &es_kernels::es_update);
  m.impl("weighted_select", &es_kernels::weighted_select);
  m.impl("es_step_losses", &es_kernels::es_step_losses);
  m.impl("es_step", &es_kernels::es_step);
  m.impl("eswp_prune", &es_kernels::eswp_prune);
}

// A Python module only so that `import es_kernels._C` loads the library and
// runs the registrations above.
PYBIND11_MODULE(_C, mod) {
  mod.doc() = "es_kernels C++ CPU kernels (registered as torch.ops.es_kernels.*)";
}
