// Counter-based Philox 4x32-10, bit-identical to Triton's tl.philox / tl.rand
// generator and to es_kernels.reference.philox4x32.
//
// Counter layout of the project (ES_SPEC section 4, README "Randomness"):
//   key     = 64-bit seed (low word, high word)
//   counter = (j low 32, j high 32, step low 32, stream)
//   stream  = 0 for ES selection (step = training step), 1 for ESWP's drops,
//             2 for the keys of ESWP's visit order (step = epoch)
#pragma once
#include <cstdint>

namespace es_kernels {

constexpr uint32_t kStreamSelect = 0;
constexpr uint32_t kStreamPrune = 1;       // j = sample id: x0 decides the drop
constexpr uint32_t kStreamPruneOrder = 2;  // j = 0: the visit order's round keys

struct Philox4 {
  uint32_t x[4];
};

inline Philox4 philox4x32_10(uint64_t seed, uint64_t j, uint64_t step, uint32_t stream) {
  uint32_t c0 = static_cast<uint32_t>(j), c1 = static_cast<uint32_t>(j >> 32);
  uint32_t c2 = static_cast<uint32_t>(step), c3 = stream;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Uniform in (0, 1): (x >> 9) * 2^-23 + 2^-24, exact in float32.
inline float uniform_from_bits(uint32_t x) {
  return static_cast<float>(x >> 9) * (1.0f / 8388608.0f) + (1.0f / 16777216.0f);
}

}  // namespace es_kernels
