// The number formats kvplan stores and reads: bf16 (weights, KV cache entries), fp16 (checkpoint tensors,
// sparse-code coefficients, quantization scales) and quantized vectors (their layout: kernels/compressed_layout.h), as
// bit patterns in uint16_t so host code needs no CUDA headers. Header-only and free of abseil, so every room, kernels'
// CPU references included, uses these one definitions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvplan {

inline float Bf16ToFloat(uint16_t bits) {
  const uint32_t word = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

// Round to nearest even, as __float2bfloat16 does.
inline uint16_t FloatToBf16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  if ((word & 0x7fffffff) > 0x7f800000) return uint16_t((word >> 16) | 0x40);  // keep NaN a NaN
  return uint16_t((word + 0x7fff + ((word >> 16) & 1)) >> 16);
}

inline float RoundToBf16(float value) { return Bf16ToFloat(FloatToBf16(value)); }

inline float Fp16ToFloat(uint16_t bits) {
  const uint32_t sign = uint32_t(bits & 0x8000) << 16;
  uint32_t exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff, word;
  if (exponent == 0) {
    if (mantissa == 0) {
      word = sign;
    } else {  // subnormal: renormalise
      exponent = 127 - 15 + 1;
      while (!(mantissa & 0x400)) {
        mantissa <<= 1;
        --exponent;
      }
      word = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
    }
  } else if (exponent == 0x1f) {
    word = sign | 0x7f800000 | (mantissa << 13);
  } else {
    word = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

// Round to nearest even, saturating at the largest finite fp16 (65504) as sparse-code coefficients are stored;
// NaN stays NaN.
inline uint16_t FloatToFp16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  const uint16_t sign = uint16_t((word >> 16) & 0x8000);
  const float magnitude = std::fabs(value);
  if (std::isnan(value)) return uint16_t(sign | 0x7e00);
  if (magnitude >= 65520.0f) return uint16_t(sign | 0x7bff);  // rounds past the largest finite: saturate
  if (magnitude < 0x1p-14f) {                                 // subnormal: multiples of 2^-24
    return uint16_t(sign | uint16_t(std::nearbyint(magnitude * 0x1p24f)));
  }
  const uint32_t bits = word & 0x7fffffff;
  const uint32_t exponent = (bits >> 23) - 127 + 15;
  uint32_t mantissa = bits & 0x7fffff;
  // Round the 23-bit mantissa to 10 bits, to nearest even; a carry moves into the exponent, as it should.
  uint32_t half = (exponent << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) ++half;
  return uint16_t(sign | half);
}

// Integer widths KV quantization offers.
inline bool IsQuantizationWidth(int bits) { return bits == 2 || bits == 4 || bits == 8; }
// 32-bit words one quantized vector of `dim` channels takes: its fp16 scale and minimum, then the integers.
inline int QuantizedWords(int dim, int bits) { return 1 + dim * bits / 32; }

}  // namespace kvplan
