// Registers the CPU kernels for the torch ops of the `es_kernels` namespace.
// The schemas (with `(a!)` on what an op mutates) and the fake
// implementations are defined once, in Python: es_kernels/_schema.py and
// es_kernels/_ops.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(es_kernels, CPU, m) {
  m.impl("per_sample_cross_entropy", &es_kernels::per_sample_cross_entropy);
  m.impl("per_sample_cross_entropy_backward", &es_kernels::per_sample_cross_entropy_backward);
  m.impl("es_update", &es_kernels::es_update);
  m.impl("weighted_select", &es_kernels::weighted_select);
  m.impl("es_step_from_losses", &es_kernels::es_step_from_losses);
  m.impl("es_step", &es_kernels::es_step);
  m.impl("eswp_prune", &es_kernels::eswp_prune);
  m.impl("es_select_from_state", &es_kernels::es_select_from_state);
}

// A Python module so that `import es_kernels._C` loads the library and runs
// the registrations above; its functions expose pieces of eswp_prune to
// the tests (python_tests/test_large_ids.py), not to users.
PYBIND11_MODULE(_C, mod) {
  mod.doc() = "es_kernels C++ CPU kernels (registered as torch.ops.es_kernels.*)";
  mod.def("_prune_visit_perm", &es_kernels::prune_visit_perm,
          "perm(q) of the visit order of n samples (docs/spec.md section 7)", pybind11::arg("n"),
          pybind11::arg("seed"), pybind11::arg("epoch"), pybind11::arg("q"),
          pybind11::arg("order_key") = 0);
  mod.def("_prune_exact_sum", &es_kernels::prune_exact_sum,
          "(hi, lo, float64) of the exact sum of int64 terms (section 7's threshold)");
  mod.def("_philox_words", &es_kernels::philox_words,
          "the four Philox 4x32-10 words of (seed, j, step, stream) for each j (section 9)");
}
