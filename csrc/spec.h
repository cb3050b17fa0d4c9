// Constants and small rules of docs/spec.md shared by the CPU kernels; the
// Python side keeps the same values in es_kernels/_spec.py (a test checks
// that both agree through the ops' results).
#pragma once
#include <cmath>
#include <cstdint>
#include <optional>

#include <ATen/ATen.h>

namespace es_kernels {

// Fixed-point exponents of the order-independent means (sections 4 and 7).
constexpr int kSelectMeanBits = 31;
constexpr int kPruneMeanBits = 30;
constexpr int kPruneMaxShift = 1074;  // every float64 is a multiple of 2^-1074

// K of the fixed-point sequence means (section 6): 62 - bit_length(T), so
// that T values |q_t| < 2^K sum below 2^62 (as _spec.seq_mean_bits).
inline int seq_mean_bits(int64_t T) {
  int n = 0;
  for (uint64_t t = static_cast<uint64_t>(T); t != 0; t >>= 1) ++n;
  return 62 - n;
}

// N, the samples of a state (section 2): ids in [0, 2^48) (as _spec.MAX_SAMPLES).
constexpr int64_t kMaxSamples = (int64_t(1) << 48) - 1;

// The visit order of pruning (section 7): a 4-round Feistel permutation of
// [0, 2^k), k = max(bit length of N - 1, kPrunePermMinBits) <= 48, filtered to
// [0, N); the halves (at most 24 bits) are uint32 words.
constexpr int kPrunePermMinBits = 8;
constexpr uint32_t kPrunePermMul[2] = {0xD2511F53u, 0xCD9E8D57u};
constexpr int kPrunePermShift[2] = {15, 16};

inline int prune_perm_bits(int64_t n) {
  int k = 0;
  while (k < 64 && (int64_t(1) << k) < n) ++k;  // bit length of n - 1
  return k < kPrunePermMinBits ? kPrunePermMinBits : k;
}

// An exact integer sum of int64 terms, held as hi 2^32 + lo with 0 <= lo < 2^32
// (pruning's threshold, section 7: up to 2^48 terms of |q| < 2^30, beyond
// int64). value() is the sum correctly rounded to float64: hi 2^32 and lo are
// exact doubles while |hi| < 2^53, so their one addition rounds once.
struct ExactSum {
  int64_t hi = 0, lo = 0;

  void add(int64_t v) {
    lo += v & 0xFFFFFFFF;          // [0, 2^33)
    hi += (v >> 32) + (lo >> 32);  // arithmetic shift: v = (v >> 32) 2^32 + (v & M)
    lo &= 0xFFFFFFFF;
  }
  void add(const ExactSum& o) {
    add(o.lo);
    hi += o.hi;
  }
  double value() const { return std::ldexp(static_cast<double>(hi), 32) + static_cast<double>(lo); }
};

// First epoch of the annealing phase: floor((1 - anneal_frac) * num_epochs)
// in float64, compared with the epoch as integers (section 7).
inline int64_t anneal_stop(int64_t num_epochs, double anneal_frac) {
  return static_cast<int64_t>(std::floor((1.0 - anneal_frac) * static_cast<double>(num_epochs)));
}

// The value of `seed` / `step` (section 9): a 0-d int64 tensor, when given,
// wins over the host int; taken as its 64-bit two's complement.
inline uint64_t noise_value(int64_t value, const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return static_cast<uint64_t>(value);
  TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == at::kLong && t->numel() == 1, name,
                    "_tensor must be a 0-d int64 CPU tensor for this kernel");
  return static_cast<uint64_t>(t->data_ptr<int64_t>()[0]);
}

}  // namespace es_kernels
