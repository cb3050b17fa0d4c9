// ESWP set-level pruning at the start of an epoch (docs/spec.md section 7).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"
#include "philox.h"
#include "spec.h"

namespace es_kernels {
namespace {

constexpr int64_t kReduceChunks =
    256;  // work split of the reductions (the result does not depend on it)

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

// Section 7's threshold: the mean of score = float64(s) + float64(d) over
// observed samples (finite score), as an exact fixed-point int64 sum of
// trunc(score 2^(30 - e)), e from the largest |score|: any thread count and
// any backend get the same bits.
template <typename S>
double prune_threshold(const S* st, int64_t N) {
  auto score = [&](int64_t i) {
    return static_cast<double>(st[2 * i]) + static_cast<double>(st[2 * i + 1]);
  };
  std::vector<double> pmax(kReduceChunks, 0.0);
  std::vector<int64_t> pcount(kReduceChunks, 0), psum(kReduceChunks, 0);
  const int64_t per = (N + kReduceChunks - 1) / kReduceChunks;
  at::parallel_for(0, kReduceChunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      double m = 0.0;
      int64_t cnt = 0;
      for (int64_t i = c * per; i < std::min(N, (c + 1) * per); ++i) {
        const double x = score(i);
        if (!std::isfinite(x)) continue;
        m = std::max(m, std::fabs(x));
        ++cnt;
      }
      pmax[c] = m;
      pcount[c] = cnt;
    }
  });
  double big = 0.0;
  int64_t observed = 0;
  for (int64_t c = 0; c < kReduceChunks; ++c) {
    big = std::max(big, pmax[c]);
    observed += pcount[c];
  }
  if (observed == 0) return std::numeric_limits<double>::quiet_NaN();
  if (big == 0.0) return 0.0;
  int e = 0;
  std::frexp(big, &e);
  const double up = std::ldexp(1.0, kPruneMeanBits - e);
  at::parallel_for(0, kReduceChunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int64_t acc = 0;
      for (int64_t i = c * per; i < std::min(N, (c + 1) * per); ++i) {
        const double x = score(i);
        if (std::isfinite(x)) acc += static_cast<int64_t>(std::trunc(x * up));
      }
      psum[c] = acc;
    }
  });
  int64_t total = 0;
  for (int64_t c = 0; c < kReduceChunks; ++c) total += psum[c];
  return static_cast<double>(total) * std::ldexp(1.0, e - kPruneMeanBits) /
         static_cast<double>(observed);
}

template <typename S>
void prune_kernel(const S* st, int64_t N, double r, uint64_t seed, uint64_t epoch, bool annealing,
                  bool rescale, int64_t* order, int64_t* num_kept, float* scale) {
  const double tau = prune_threshold(st, N);
  const float kept_scale = rescale ? static_cast<float>(1.0 / (1.0 - r)) : 1.0f;

  // per sample: drop decision, scale, order key
  std::vector<uint32_t> key(N);
  std::vector<uint8_t> dropped(N);
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double score = static_cast<double>(st[2 * i]) + static_cast<double>(st[2 * i + 1]);
      const bool below = !annealing && std::isfinite(score) && score < tau;
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
    if (dropped[i])
      gone.push_back(i);
    else
      kept.push_back((static_cast<uint64_t>(key[i]) << 32) | static_cast<uint64_t>(i));
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

Tensor3 eswp_prune(const at::Tensor& state_in, double prune_ratio, int64_t seed, int64_t epoch,
                   int64_t num_epochs, double anneal_frac, bool rescale) {
  check_state(state_in);
  TORCH_CHECK_VALUE(prune_ratio >= 0.0 && prune_ratio < 1.0, "prune_ratio must be in [0, 1), got ",
                    prune_ratio);
  const at::Tensor st = state_in.contiguous();
  const int64_t N = st.size(0);
  at::Tensor order = at::empty({N}, st.options().dtype(at::kLong));
  at::Tensor num_kept = at::zeros({}, st.options().dtype(at::kLong));
  at::Tensor scale = at::empty({N}, st.options().dtype(at::kFloat));
  if (N == 0) return {order, num_kept, scale};
  const bool annealing = epoch >= anneal_stop(num_epochs, anneal_frac);
  AT_DISPATCH_FLOATING_TYPES(st.scalar_type(), "eswp_prune", [&] {
    prune_kernel<scalar_t>(st.data_ptr<scalar_t>(), N, prune_ratio, static_cast<uint64_t>(seed),
                           static_cast<uint64_t>(epoch), annealing, rescale,
                           order.data_ptr<int64_t>(), num_kept.data_ptr<int64_t>(),
                           scale.data_ptr<float>());
  });
  return {order, num_kept, scale};
}

}  // namespace es_kernels
