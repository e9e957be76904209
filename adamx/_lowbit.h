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
// ops and one float add, branch-free, so that GCC vectorizes the loops that call it.
//   normal results (|y| >= 2**-6): round the 23-bit mantissa to 3 bits at bit 20 (the carry
//     may run into the exponent), rebias the exponent (127 -> 7);
//   subnormal results: |y| + 2**14 rounds |y| to a multiple of 2**-9 (the ulp of 2**14), the
//     low bits of the sum are the code (0..8; 8 is 2**-6, the smallest normal);
//   above 448 after rounding, inf and NaN: the NaN code 0x7f (e4m3fn has no inf; the normal
//     formula gives more than 0x7e for all of them, so one unsigned min caps them).
inline std::uint32_t e4m3fn_bits(float y) {
  const std::uint32_t u = bits_of(y);
  const std::uint32_t a = u & 0x7fffffffu;
  const std::uint32_t normal = ((a + 0x7ffffu + ((a >> 20) & 1u)) >> 20) - (120u << 3);
  const std::uint32_t sub = bits_of(float_of(a) + 16384.0f) - 0x46800000u;
  std::uint32_t code = a < 0x3c800000u ? sub : normal;
  code = code < 0x7fu ? code : 0x7fu;
  return code | ((u >> 24) & 0x80u);
}

// float8_e4m3fn bits -> float32 (exact): rebias the exponent (7 -> 127); a subnormal code
// (exponent 0) is taken as the normal 2**-6 * (1 + m/8) minus 2**-6 (exact), so no float32
// subnormal appears and denormals-are-zero changes nothing; 0x7f / 0xff as NaN of the code's sign.
inline float e4m3fn_value(std::uint32_t c) {
  const std::uint32_t mag = c & 0x7fu;
  const std::uint32_t is_sub = 0u - static_cast<std::uint32_t>(mag < 8u);
  const std::uint32_t is_nan = 0u - static_cast<std::uint32_t>(mag == 0x7fu);
  const std::uint32_t o = (mag << 20) + (120u << 23) + (is_sub & (1u << 23));
  const std::uint32_t v = bits_of(float_of(o) - float_of(is_sub & 0x3c800000u));  // - 2**-6 or - 0
  return float_of(((v & ~is_nan) | (0x7fc00000u & is_nan)) | ((c & 0x80u) << 24));
}

// The block loops below run in 512-bit vectors where the CPU has them (GCC's -march=native
// prefers 256; here the integer codec ops are the step's cost, and 512 measured 15-30% faster).
#if defined(__x86_64__) && defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#define ADAMX_LOWBIT_WIDE __attribute__((noinline, target("prefer-vector-width=512")))
#else
#define ADAMX_LOWBIT_WIDE
#endif

// max(|x|) over a block as torchao / adamx._lowbit take it: an integer max of the magnitude
// bits (the float order for non-NaN values), NaN when any element is NaN, then clipped below
// at 1e-12 (a subnormal absmax compares below it under denormals-are-zero, as in XLA).
ADAMX_LOWBIT_WIDE inline float block_absmax(const float* __restrict x, std::size_t count) {
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
ADAMX_LOWBIT_WIDE inline void fp8_encode_block(const float* __restrict x, std::size_t count,
                                               std::uint8_t* __restrict codes, float* __restrict scale_out) {
  const float scale = block_absmax(x, count) / 448.0f;  // a true division (448 has no exact reciprocal)
  *scale_out = scale;
  for (std::size_t i = 0; i < count; ++i) {
    // x / (scale + x * 0): XLA's divisor (adamx/_lowbit.py `_scaled`), NaN for an infinite x
    codes[i] = static_cast<std::uint8_t>(e4m3fn_bits(x[i] / (scale + x[i] * 0.0f)));
  }
}

ADAMX_LOWBIT_WIDE inline void fp8_decode_block(const std::uint8_t* __restrict codes, float scale,
                                               std::size_t count, float* __restrict out) {
  for (std::size_t i = 0; i < count; ++i) out[i] = e4m3fn_value(codes[i]) * scale;
}

// The 4-bit tables of one moment: the 16 map values and the 15 thresholds
// (adamx._lowbit.M4_MAP / V4_MAP and q4_thresholds of them).
struct Q4Map {
  float value[16];
  float thr[15];
};

// One 4-bit block of `count` (even, at most kQ4MaxBlock) values: count / 2 packed bytes and the
// block's scale. The codes go through a small scratch array, so that both loops vectorize.
constexpr std::size_t kQ4MaxBlock = 256;

ADAMX_LOWBIT_WIDE inline void q4_encode_block(const Q4Map& q, const float* __restrict x, std::size_t count,
                                              std::uint8_t* __restrict packed, float* __restrict scale_out) {
  const float scale = block_absmax(x, count);
  *scale_out = scale;
  float thr[15];
  std::memcpy(thr, q.thr, sizeof thr);
  std::uint8_t code[kQ4MaxBlock];
  for (std::size_t i = 0; i < count; ++i) {
    const float y = x[i] / (scale + x[i] * 0.0f);  // XLA's divisor, as for fp8
    std::uint32_t n = 0;
    for (int t = 0; t < 15; ++t) n += static_cast<std::uint32_t>(y >= thr[t]);  // NaN: 0
    code[i] = static_cast<std::uint8_t>(n);
  }
  for (std::size_t k = 0; k < count / 2; ++k) packed[k] = static_cast<std::uint8_t>((code[2 * k] << 4) | code[2 * k + 1]);
}

ADAMX_LOWBIT_WIDE inline void q4_decode_block(const Q4Map& q, const std::uint8_t* __restrict packed, float scale,
                                              std::size_t count, float* __restrict out) {
  float t[16];
  std::memcpy(t, q.value, sizeof t);
  float hi[kQ4MaxBlock / 2], lo[kQ4MaxBlock / 2];  // the first and the second code of each byte
  for (std::size_t k = 0; k < count / 2; ++k) {
    hi[k] = t[packed[k] >> 4] * scale;
    lo[k] = t[packed[k] & 15u] * scale;
  }
  for (std::size_t k = 0; k < count / 2; ++k) {
    out[2 * k] = hi[k];
    out[2 * k + 1] = lo[k];
  }
}

}  // namespace lowbit
}  // namespace adamx

#endif  // ADAMX_LOWBIT_H_
