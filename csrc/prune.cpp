// ESWP set-level pruning at the start of an epoch (ES_SPEC section 7).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"
#include "philox.h"

namespace es_kernels {
namespace {

constexpr int64_t kReduceChunks = 256;  // fixed, so the mean is the same on any thread count

// Sorts packed (key << 32 | id) values by key, stably: two LSD passes of 16
// bits over the high word. Input is in ascending id, so ties stay by id.
void radix_sort_by_high_word(std::vector<uint64_t>& v) {
  std::vector<uint64_t> tmp(v.size());
  std::vector<int64_t> count(1 << 16);
  for (int shift = 32; shift < 64; shift += 16) {
    std::fill(count.begin(), count.end(), 0);
    for (uint64_t x : v) ++count[(x >> shift) & 0xFFFF];
    int64_t sum = 0;
    for (auto& c : count) {
      const int64_t n = c;
      c = sum;
      sum += n;
    }
    for (uint64_t x : v) tmp[count[(x >> shift) & 0xFFFF]++] = x;
    v.swap(tmp);
  }
}

template <typename S>
void prune_kernel(const S* s, const S* d, int64_t N, double r, uint64_t seed, uint64_t epoch,
                  bool annealing, bool rescale, int64_t* order, int64_t* num_kept, float* scale) {
  // tau: mean of s + d over observed samples, in float64, fixed reduction tree
  std::vector<double> psum(kReduceChunks, 0.0);
  std::vector<int64_t> pcount(kReduceChunks, 0);
  const int64_t per = (N + kReduceChunks - 1) / kReduceChunks;
  at::parallel_for(0, kReduceChunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      double acc = 0.0;
      int64_t cnt = 0;
      for (int64_t i = c * per; i < std::min(N, (c + 1) * per); ++i) {
        if (std::isnan(s[i])) continue;
        acc += static_cast<double>(s[i] + d[i]);
        ++cnt;
      }
      psum[c] = acc;
      pcount[c] = cnt;
    }
  });
  double total = 0.0;
  int64_t observed = 0;
  for (int64_t c = 0; c < kReduceChunks; ++c) {
    total += psum[c];
    observed += pcount[c];
  }
  const double tau = observed > 0 ? total / static_cast<double>(observed)
                                  : std::numeric_limits<double>::quiet_NaN();
  const float kept_scale = rescale ? static_cast<float>(1.0 / (1.0 - r)) : 1.0f;

  // per sample: drop decision, scale, order key
  std::vector<uint32_t> key(N);
  std::vector<uint8_t> dropped(N);
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const bool below = !annealing && !std::isnan(s[i]) && static_cast<double>(s[i] + d[i]) < tau;
      const Philox4 p = philox4x32_10(seed, i, epoch, kStreamPrune);
      const bool drop = below && static_cast<double>(uniform_from_bits(p.x[0])) < r;
      dropped[i] = drop;
      key[i] = p.x[1];
      scale[i] = drop ? 0.0f : (below ? kept_scale : 1.0f);
    }
  });

  // compaction: kept ids by (key, id), then dropped ids ascending
  std::vector<uint64_t> kept;
  kept.reserve(N);
  int64_t tail = 0;
  std::vector<int64_t> gone;
  for (int64_t i = 0; i < N; ++i) {
    if (dropped[i]) gone.push_back(i);
    else kept.push_back((static_cast<uint64_t>(key[i]) << 32) | static_cast<uint64_t>(i));
  }
  radix_sort_by_high_word(kept);
  const int64_t K = static_cast<int64_t>(kept.size());
  at::parallel_for(0, K, 65536, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) order[k] = static_cast<int64_t>(kept[k] & 0xFFFFFFFFu);
  });
  for (int64_t g : gone) order[K + tail++] = g;
  *num_kept = K;
}

}  // namespace

Tensor3 eswp_prune(const at::Tensor& s_in, const at::Tensor& d_in, double prune_ratio,
                   int64_t seed, int64_t epoch, int64_t num_epochs, double anneal_frac,
                   bool rescale) {
  check_cpu(s_in, "s");
  check_cpu(d_in, "d");
  TORCH_CHECK_VALUE(s_in.dim() == 1, "s must be 1-D [N], got ", s_in.sizes());
  TORCH_CHECK_VALUE(d_in.sizes() == s_in.sizes() && d_in.scalar_type() == s_in.scalar_type(),
                    "d must have the shape and dtype of s");
  TORCH_CHECK_VALUE(s_in.size(0) < (int64_t(1) << 32), "s: at most 2^32 - 1 samples");
  TORCH_CHECK_VALUE(prune_ratio >= 0.0 && prune_ratio < 1.0, "prune_ratio must be in [0, 1), got ",
                    prune_ratio);
  const at::Tensor s = s_in.contiguous(), d = d_in.contiguous();
  const int64_t N = s.size(0);
  at::Tensor order = at::empty({N}, s.options().dtype(at::kLong));
  at::Tensor num_kept = at::zeros({}, s.options().dtype(at::kLong));
  at::Tensor scale = at::empty({N}, s.options().dtype(at::kFloat));
  if (N == 0) return {order, num_kept, scale};
  const bool annealing = static_cast<double>(epoch) >= (1.0 - anneal_frac) * static_cast<double>(num_epochs);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "eswp_prune", [&] {
    prune_kernel<scalar_t>(s.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), N, prune_ratio,
                           static_cast<uint64_t>(seed), static_cast<uint64_t>(epoch), annealing,
                           rescale, order.data_ptr<int64_t>(), num_kept.data_ptr<int64_t>(),
                           scale.data_ptr<float>());
  });
  return {order, num_kept, scale};
}

}  // namespace es_kernels
