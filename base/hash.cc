#include "base/hash.h"

#include <cstring>

namespace kvplan {

// FNV-1a over 64-bit words, then the tail bytes: eight times fewer multiplies than the bytewise form, so a
// 16 GB checkpoint fingerprints in seconds.
uint64_t Fnv1a64(const void* data, size_t size, uint64_t seed) {
  constexpr uint64_t kPrime = 0x100000001b3ull;
  const auto* bytes = static_cast<const uint8_t*>(data);
  uint64_t hash = seed;
  size_t i = 0;
  for (; i + 8 <= size; i += 8) {
    uint64_t word;
    std::memcpy(&word, bytes + i, 8);
    hash = (hash ^ word) * kPrime;
  }
  for (; i < size; ++i) hash = (hash ^ bytes[i]) * kPrime;
  return hash;
}

}  // namespace kvplan
