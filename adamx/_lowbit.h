// Block-wise fp8 and 4-bit codecs of optimizer state: the C++ side of adamx/_lowbit.py
// (torchao 0.18's AdamFp8 / Adam4bit schemes).
//
// Plain C++17, header only, no dependencies. The fused CPU kernel includes it to decode a
// block of moments, take the Adam step in float32 and encode the block again in one pass.
// Bit for bit the same as adamx._lowbit's JAX codecs run by XLA:CPU (tested from Python in
// tests/test_lowbit_fused.py through tests/cpp/lowbit_test.cc), which means: float32 with
// denormals flushed (the kernel runs with FTZ/DAZ set, as XLA:CPU does), no FMA contraction
// in these functions (-ffp-contract=off), true divisions.
//
//   fp8:  scale  = max(absmax, 1e-12) / 448          (NaN when the block holds a NaN)
//         code   = e4m3fn(x / scale)                 (round to nearest even, subnormals kept;
//                                                     |x / scale| <= 448, else NaN)
//         decode = f32(code) * scale
//   4bit: scale  = max(absmax, 1e-12)                (the absmax itself)
//         code   = #{k in 0..14 : x / scale >= thr[k]}   (thr: adamx._lowbit.q4_thresholds)
//         decode = map[code] * scale                 (map: M4_MAP for mu, V4_MAP for nu)
//         codes packed two per byte: byte[k] = code[2k] << 4 | code[2k+1]
//
// The caller owns the block layout: block b covers elements [b * block, (b + 1) * block);
// torchao's formats only quantize leaves that are a whole number of blocks.
// Requires IEEE float32 without -ffast-math (NaN tests and exact float32 ops are relied on).

#ifndef ADAMX_LOWBIT_H_
#define ADAMX_LOWBIT_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

namespace adamx {
namespace lowbit {

inline std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float32 -> float8_e4m3fn bits, round to nearest even (XLA's / ml_dtypes' convert). Integer
// and one float add, branch-free (masks), so that GCC vectorizes the loops that call it.
//   normal results (|y| >= 2**-6): round the 23-bit mantissa to 3 bits at bit 20 (the carry
//     may run into the exponent), rebias the exponent (127 -> 7);
//   subnormal results: |y| + 2**14 rounds |y| to a multiple of 2**-9 (the ulp of 2**14), the
//     low bits of the sum are the code (0..8; 8 is 2**-6, the smallest normal);
//   above 448 after rounding, inf and NaN: the NaN code 0x7f (e4m3fn has no inf).
inline std::uint32_t e4m3fn_bits(float y) {
  const std::uint32_t u = bits_of(y);
  const std::uint32_t sign = (u >> 24) & 0x80u;
  const std::uint32_t a = u & 0x7fffffffu;
  const std::uint32_t normal = ((a + 0x7ffffu + ((a >> 20) & 1u)) >> 20) - (120u << 3);
  const std::uint32_t sub = bits_of(float_of(a) + 16384.0f) - 0x46800000u;
  const std::uint32_t is_sub = 0u - static_cast<std::uint32_t>(a < 0x3c800000u);
  std::uint32_t code = (sub & is_sub) | (normal & ~is_sub);
  const std::uint32_t over = 0u - static_cast<std::uint32_t>(code > 0x7eu || a > 0x7f800000u);
  code = (0x7fu & over) | (code & ~over);
  return code | sign;
}

// float8_e4m3fn bits -> float32 (exact): normal codes by rebiasing, subnormal codes
// (exponent 0) as m * 2**-9 through an integer conversion (no float32 subnormal appears, so
// denormals-are-zero changes nothing), 0x7f / 0xff as NaN of the code's sign.
inline float e4m3fn_value(std::uint32_t c) {
  const std::uint32_t mag = c & 0x7fu;
  const std::uint32_t normal = (mag << 20) + (120u << 23);
  const std::uint32_t sub = bits_of(static_cast<float>(static_cast<std::int32_t>(mag & 7u)) * 0x1p-9f);
  const std::uint32_t is_sub = 0u - static_cast<std::uint32_t>(mag < 8u);
  const std::uint32_t is_nan = 0u - static_cast<std::uint32_t>(mag == 0x7fu);
  std::uint32_t v = (sub & is_sub) | (normal & ~is_sub);
  v = (0x7fc00000u & is_nan) | (v & ~is_nan);
  return float_of(v | ((c & 0x80u) << 24));
}

// max(|x|) over a block as torchao / adamx._lowbit take it: an integer max of the magnitude
// bits (the float order for non-NaN values), NaN when any element is NaN, then clipped below
// at 1e-12 (a subnormal absmax compares below it under denormals-are-zero, as in XLA).
inline float block_absmax(const float* __restrict x, std::size_t count) {
  std::uint32_t amax = 0;
  for (std::size_t i = 0; i < count; ++i) {
    const std::uint32_t a = bits_of(x[i]) & 0x7fffffffu;
    amax = a > amax ? a : amax;
  }
  if (amax > 0x7f800000u) return std::numeric_limits<float>::quiet_NaN();
  const float m = float_of(amax);
  return m < 1e-12f ? 1e-12f : m;
}

// One fp8 block of `count` values: codes[i] and the block's scale.
inline void fp8_encode_block(const float* __restrict x, std::size_t count, std::uint8_t* __restrict codes,
                             float* __restrict scale_out) {
  const float scale = block_absmax(x, count) / 448.0f;  // a true division (448 has no exact reciprocal)
  *scale_out = scale;
  for (std::size_t i = 0; i < count; ++i) {
    // x / (scale + x * 0): XLA's divisor (adamx/_lowbit.py `_scaled`), NaN for an infinite x
    codes[i] = static_cast<std::uint8_t>(e4m3fn_bits(x[i] / (scale + x[i] * 0.0f)));
  }
}

inline void fp8_decode_block(const std::uint8_t* __restrict codes, float scale, std::size_t count,
                             float* __restrict out) {
  for (std::size_t i = 0; i < count; ++i) out[i] = e4m3fn_value(codes[i]) * scale;
}

// The 4-bit tables of one moment: the 16 map values and the 15 thresholds
// (adamx._lowbit.M4_MAP / V4_MAP and q4_thresholds of them).
struct Q4Map {
  float value[16];
  float thr[15];
};

// One 4-bit block of `count` (even) values: count / 2 packed bytes and the block's scale.
inline void q4_encode_block(const Q4Map& q, const float* __restrict x, std::size_t count, std::uint8_t* __restrict packed,
                            float* __restrict scale_out) {
  const float scale = block_absmax(x, count);
  *scale_out = scale;
  for (std::size_t k = 0; k < count / 2; ++k) {
    std::uint32_t c[2] = {0u, 0u};
    for (int h = 0; h < 2; ++h) {
      const float v = x[2 * k + h];
      const float y = v / (scale + v * 0.0f);
      std::uint32_t n = 0;
      for (int t = 0; t < 15; ++t) n += static_cast<std::uint32_t>(y >= q.thr[t]);  // NaN: 0
      c[h] = n;
    }
    packed[k] = static_cast<std::uint8_t>((c[0] << 4) | c[1]);
  }
}

inline void q4_decode_block(const Q4Map& q, const std::uint8_t* __restrict packed, float scale, std::size_t count,
                            float* __restrict out) {
  for (std::size_t k = 0; k < count / 2; ++k) {
    const std::uint32_t b = packed[k];
    out[2 * k] = q.value[b >> 4] * scale;
    out[2 * k + 1] = q.value[b & 15u] * scale;
  }
}

}  // namespace lowbit
}  // namespace adamx

#endif  // ADAMX_LOWBIT_H_
