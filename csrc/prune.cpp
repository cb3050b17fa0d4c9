// ESWP set-level pruning at the start of an epoch (docs/spec.md section 7), in
// O(N) work and memory:
//
// 1. the threshold: max |score| and the count, then the exact fixed-point sum;
// 2. per id: the drop (into a bitmask, N/8 bytes), the scale, a count per chunk;
// 3. the kept ids in the visit order: perm(q) over q in [0, 2^k), a keyed
//    Feistel bijection, kept where perm(q) < N and not dropped; a count per
//    chunk of q, an exclusive scan, then ordered writes (stream compaction);
// 4. the dropped ids, ascending, after them (the same compaction over ids).
//
// Work is split into fixed chunks of kChunk ids (or q); the results do not
// depend on the split. Up to kChunk samples everything runs on the calling
// thread: no thread pool wake-up for a small data set.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "ops.h"
#include "philox.h"
#include "spec.h"

namespace es_kernels {
namespace {

constexpr int64_t kChunk = int64_t(1) << 15;  // ids per task: a multiple of 64 (bitmask words)

int64_t chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// fn(c, begin, end) for every chunk c of [0, n), on the thread pool when there
// are several chunks, inline otherwise.
template <typename Fn>
void for_chunks(int64_t n, const Fn& fn) {
  at::parallel_for(0, chunks(n), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) fn(c, c * kChunk, std::min(n, (c + 1) * kChunk));
  });
}

// Exclusive prefix sum in place; returns the total.
int64_t exclusive_scan(std::vector<int64_t>& v) {
  int64_t sum = 0;
  for (auto& x : v) {
    const int64_t n = x;
    x = sum;
    sum += n;
  }
  return sum;
}

template <typename S>
double score_of(const S* st, int64_t i) {
  return static_cast<double>(st[2 * i]) + static_cast<double>(st[2 * i + 1]);
}

// Section 7's threshold: the mean of score = float64(s) + float64(d) over
// observed samples (finite score), from the exact sum of the fixed-point
// floor(score 2^p), p = min(30 - e, 1074), e from the largest |score|: an int64
// sum per chunk (at most 2^45), the chunks' sums added exactly in two words
// (ExactSum: N up to 2^48 goes past int64), so any split and any backend get
// the same bits. 2^p is applied as two finite factors 2^p1 2^p2 (2^p overflows
// from p = 1024: float64 scores below 2^-993), and tau divides before scaling
// up (p < 0), so a sum of scores near the float64 maximum cannot overflow.
template <typename S>
double prune_threshold(const S* st, int64_t N) {
  const int64_t nc = chunks(N);
  std::vector<double> pmax(nc, 0.0);
  std::vector<int64_t> pcount(nc, 0), psum(nc, 0);  // a chunk's |sum| < 2^15 2^30
  for_chunks(N, [&](int64_t c, int64_t b, int64_t e) {
    double m = 0.0;
    int64_t cnt = 0;
    for (int64_t i = b; i < e; ++i) {
      const double x = score_of(st, i);
      if (!std::isfinite(x)) continue;
      m = std::max(m, std::fabs(x));
      ++cnt;
    }
    pmax[c] = m;
    pcount[c] = cnt;
  });
  double big = 0.0;
  int64_t observed = 0;
  for (int64_t c = 0; c < nc; ++c) {
    big = std::max(big, pmax[c]);
    observed += pcount[c];
  }
  if (observed == 0) return std::numeric_limits<double>::quiet_NaN();
  if (big == 0.0) return 0.0;
  int e = 0;
  std::frexp(big, &e);
  const int p = std::min(kPruneMeanBits - e, kPruneMaxShift);
  const int p2 = std::max(p - 1023, 0);
  const double up1 = std::ldexp(1.0, p - p2), up2 = std::ldexp(1.0, p2);
  for_chunks(N, [&](int64_t c, int64_t b, int64_t end) {
    int64_t acc = 0;
    for (int64_t i = b; i < end; ++i) {
      const double x = score_of(st, i);
      if (std::isfinite(x)) acc += static_cast<int64_t>(std::floor(x * up1 * up2));
    }
    psum[c] = acc;
  });
  ExactSum total;
  for (int64_t c = 0; c < nc; ++c) total.add(psum[c]);
  const double count = static_cast<double>(observed);
  // p >= 0: the product is exact (2^-p >= 2^-1074); p < 0: divide first
  return p >= 0 ? total.value() * std::ldexp(1.0, -p) / count
                : total.value() / count * std::ldexp(1.0, -p);
}

// perm: the visit order's bijection of [0, 2^k) (section 7): 4 Feistel rounds
// over a high half of k - k/2 bits and a low half of k/2 bits, keyed by the
// Philox words of (seed, j = order_key, step = epoch, stream 2). The halves are 32-bit
// words (k <= 48: at most 24 bits each); q and perm(q) are X = uint32_t when
// k <= 32, else uint64_t. The same operations for every q: the loop over a
// block vectorises.
struct VisitPerm {
  int k, lo;
  uint32_t key[4], mask[4];

  VisitPerm(int64_t n, uint64_t seed, uint64_t epoch, uint64_t order_key = 0)
      : k(prune_perm_bits(n)), lo(k / 2) {
    const Philox4 p = philox4x32_10(seed, order_key, epoch, kStreamPruneOrder);
    for (int r = 0; r < 4; ++r) {
      key[r] = p.x[r];
      const int width = r % 2 == 0 ? k - lo : lo;  // of the half round r xors
      mask[r] = static_cast<uint32_t>((uint64_t(1) << width) - 1);
    }
  }

  template <typename X>
  X operator()(X q) const {
    uint32_t a = static_cast<uint32_t>(q >> lo), b = static_cast<uint32_t>(q) & mask[1];
    for (int r = 0; r < 4; ++r) {
      uint32_t h = (b ^ key[r]) * kPrunePermMul[0];
      h ^= h >> kPrunePermShift[0];
      h *= kPrunePermMul[1];
      h ^= h >> kPrunePermShift[1];
      const uint32_t nb = a ^ (h & mask[r]);
      a = b;
      b = nb;
    }
    return (static_cast<X>(a) << lo) | b;
  }
};

// out[j] = perm(q0 + j) for j < n. On x86 with GCC an AVX2 copy (8 lanes of
// 32-bit multiplies) is chosen at run time where the CPU has it; the portable
// copy emulates the multiplies with SSE2.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__AVX2__)
__attribute__((target_clones("avx2", "default")))
#endif
void perm_block(const VisitPerm& perm, int64_t q0, int64_t n, uint32_t* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = perm(static_cast<uint32_t>(q0 + j));
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__AVX2__)
__attribute__((target_clones("avx2", "default")))
#endif
void perm_block(const VisitPerm& perm, int64_t q0, int64_t n, uint64_t* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = perm(static_cast<uint64_t>(q0 + j));
}

constexpr int64_t kPermBlock = 512;  // perm values computed at once (on the stack)

// The kept ids in the visit order, into order[0, ...): perm(q) for q in
// [0, domain) where its bit of `skip` is clear; a count per chunk of q (when
// there are several), an exclusive scan, then each chunk writes from its
// offset. X: uint32_t for domains up to 2^32 (the faster lanes), else uint64_t.
template <typename X>
void write_kept(const VisitPerm& perm, int64_t domain, const std::vector<uint64_t>& skip,
                int64_t* order) {
  auto kept = [&](X x) { return !((skip[x >> 6] >> (x & 63)) & 1); };
  std::vector<int64_t> at(chunks(domain), 0);
  if (at.size() > 1) {
    for_chunks(domain, [&](int64_t c, int64_t b, int64_t e) {
      X x[kPermBlock];
      int64_t cnt = 0;
      for (int64_t q = b; q < e; q += kPermBlock) {
        const int64_t n = std::min(kPermBlock, e - q);
        perm_block(perm, q, n, x);
        for (int64_t j = 0; j < n; ++j) cnt += kept(x[j]);
      }
      at[c] = cnt;
    });
    exclusive_scan(at);
  }
  for_chunks(domain, [&](int64_t c, int64_t b, int64_t e) {
    X x[kPermBlock];
    int64_t ids[kPermBlock];
    int64_t* out = order + at[c];
    for (int64_t q = b; q < e; q += kPermBlock) {
      const int64_t n = std::min(kPermBlock, e - q);
      perm_block(perm, q, n, x);
      int64_t m = 0;
      for (int64_t j = 0; j < n; ++j) {  // branch-free compaction into ids
        ids[m] = static_cast<int64_t>(x[j]);
        m += kept(x[j]);
      }
      std::copy(ids, ids + m, out);  // only this chunk's slots are written
      out += m;
    }
  });
}

// The drop noise of row i is that of the id id_offset + i; the visit order is
// keyed by order_key; tau is the state's own threshold unless given.
template <typename S>
void prune_kernel(const S* st, int64_t N, double r, uint64_t seed, uint64_t epoch, bool annealing,
                  bool rescale, uint64_t id_offset, uint64_t order_key,
                  const std::optional<double>& threshold, int64_t* order, int64_t* num_kept,
                  float* scale) {
  const double tau = threshold.has_value() ? *threshold : prune_threshold(st, N);
  const float kept_scale = rescale ? static_cast<float>(1.0 / (1.0 - r)) : 1.0f;
  const VisitPerm perm(N, seed, epoch, order_key);
  const int64_t domain = int64_t(1) << perm.k;

  // skip[x] (a bit of x in [0, 2^k)): x >= N, or x dropped; the scales; drops per chunk
  std::vector<uint64_t> skip(domain / 64, 0);  // domain >= 256
  std::vector<int64_t> gone(chunks(N), 0);
  for_chunks(N, [&](int64_t c, int64_t b, int64_t e) {
    int64_t cnt = 0;
    for (int64_t i = b; i < e; ++i) {
      const double score = score_of(st, i);
      const bool below = !annealing && std::isfinite(score) && score < tau;
      const bool drop =
          below && static_cast<double>(uniform_from_bits(
                       philox4x32_10(seed, id_offset + i, epoch, kStreamPrune).x[0])) < r;
      skip[i >> 6] |= static_cast<uint64_t>(drop) << (i & 63);  // a word is one chunk's
      cnt += drop;
      scale[i] = drop ? 0.0f : (below ? kept_scale : 1.0f);
    }
    gone[c] = cnt;
  });
  const int64_t K = N - exclusive_scan(gone);
  if (N % 64) skip[N >> 6] |= ~uint64_t(0) << (N % 64);
  for (int64_t w = (N + 63) >> 6; w < domain / 64; ++w) skip[w] = ~uint64_t(0);
  if (perm.k <= 32) {
    write_kept<uint32_t>(perm, domain, skip, order);
  } else {
    write_kept<uint64_t>(perm, domain, skip, order);
  }
  // the dropped ids, ascending, after them
  for_chunks(N, [&](int64_t c, int64_t b, int64_t e) {
    int64_t* out = order + K + gone[c];
    for (int64_t w = b >> 6; w < (e + 63) >> 6; ++w) {
      uint64_t m = skip[w];
      if (N % 64 && w == N >> 6) m &= (uint64_t(1) << (N % 64)) - 1;  // bits from N on: no ids
      for (; m; m &= m - 1) *out++ = (w << 6) + __builtin_ctzll(m);
    }
  });
  *num_kept = K;
}

}  // namespace

std::vector<int64_t> prune_visit_perm(int64_t n, int64_t seed, int64_t epoch,
                                      const std::vector<int64_t>& q, int64_t order_key) {
  TORCH_CHECK_VALUE(n >= 1 && n <= kMaxSamples, "n must be in [1, 2^48)");
  TORCH_CHECK_VALUE(order_key >= 0, "order_key must be >= 0");
  const VisitPerm perm(n, static_cast<uint64_t>(seed), static_cast<uint64_t>(epoch),
                       static_cast<uint64_t>(order_key));
  std::vector<int64_t> out(q.size());
  for (size_t j = 0; j < q.size(); ++j) {
    TORCH_CHECK_VALUE(q[j] >= 0 && q[j] < (int64_t(1) << perm.k), "q must be in [0, 2^k)");
    out[j] = static_cast<int64_t>(perm(static_cast<uint64_t>(q[j])));
  }
  return out;
}

std::tuple<int64_t, int64_t, double> prune_exact_sum(const std::vector<int64_t>& terms) {
  ExactSum sum;
  for (const int64_t t : terms) sum.add(t);
  return {sum.hi, sum.lo, sum.value()};
}

std::vector<std::array<uint32_t, 4>> philox_words(int64_t seed, const std::vector<int64_t>& j,
                                                  int64_t step, int64_t stream) {
  std::vector<std::array<uint32_t, 4>> out(j.size());
  for (size_t i = 0; i < j.size(); ++i) {
    const Philox4 p = philox4x32_10(static_cast<uint64_t>(seed), static_cast<uint64_t>(j[i]),
                                    static_cast<uint64_t>(step), static_cast<uint32_t>(stream));
    out[i] = {p.x[0], p.x[1], p.x[2], p.x[3]};
  }
  return out;
}

Tensor3 eswp_prune(const at::Tensor& state_in, double prune_ratio, int64_t seed, int64_t epoch,
                   int64_t num_epochs, double anneal_frac, bool rescale, int64_t id_offset,
                   int64_t order_key, std::optional<double> threshold) {
  check_state(state_in);
  TORCH_CHECK_VALUE(prune_ratio >= 0.0 && prune_ratio < 1.0, "prune_ratio must be in [0, 1), got ",
                    prune_ratio);
  TORCH_CHECK_VALUE(id_offset >= 0 && id_offset <= kMaxSamples - state_in.size(0),
                    "id_offset must be in [0, 2^48 - 1 - N], got ", id_offset);
  TORCH_CHECK_VALUE(order_key >= 0, "order_key must be >= 0, got ", order_key);
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
                           static_cast<uint64_t>(id_offset), static_cast<uint64_t>(order_key),
                           threshold, order.data_ptr<int64_t>(), num_kept.data_ptr<int64_t>(),
                           scale.data_ptr<float>());
  });
  return {order, num_kept, scale};
}

}  // namespace es_kernels
