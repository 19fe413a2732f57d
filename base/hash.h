// The one content hash of the tree: FNV-1a, 64-bit. Plans store it (payload checksum, weights fingerprint),
// so its values are part of the file format and must never change.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvplan {

inline constexpr uint64_t kFnv1a64Seed = 0xcbf29ce484222325ull;

// Continues a hash: pass the previous result as seed to hash data in pieces.
uint64_t Fnv1a64(const void* data, size_t size, uint64_t seed = kFnv1a64Seed);

}  // namespace kvplan
