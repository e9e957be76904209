// Block-wise 8-bit quantization of optimizer state: the C++ side of adamx/_quantize.py.
//
// Plain C++17, header only, no dependencies. The fused CPU kernel includes it to
// dequantize a moment, take the Adam step in float32 and requantize in one pass.
// Bit for bit the same scheme as adamx._quantize.quantize / dequantize (tested from
// Python in tests/test_quantize.py):
//
//   x        = |x| < FLT_MIN ? 0 : x                 (subnormal inputs count as 0)
//   scale    = max |x| over the block                (NaN if the block holds a NaN)
//   y        = x * (1 / (scale != 0 ? scale : 1))    (float32 reciprocal, then product)
//   mid[j]   = (code_map[j] + code_map[j+1]) * 0.5f  (float32, j = 0..254)
//   code     = #{ j : mid[j] < y }                   (nearest; a tie goes to the lower code)
//   code     = code of 0.0 when y is NaN
//   decode   = code_map[code] * scale, 0 if its magnitude is below FLT_MIN
//
// code_map: 256 sorted float32 values (adamx._quantize.SIGNED_DYNAMIC_MAP /
// UNSIGNED_DYNAMIC_MAP), containing 0. The caller owns the block layout: block b of a
// leaf with n elements covers [b * block_size, min(n, (b + 1) * block_size)).
// Requires IEEE float32 without -ffast-math (NaN tests and exact float32 ops are relied on).

#ifndef ADAMX_QUANT8_H_
#define ADAMX_QUANT8_H_

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

namespace adamx {
namespace quant8 {

// Index of the nearest code to y (y in [-1, 1], not NaN): the number of midpoints below y.
// Branch-light binary search over the 255 midpoints, computed on the fly.
inline std::uint8_t encode_value(const float* code_map, float y) {
  unsigned idx = 0;
  for (unsigned step = 128; step > 0; step >>= 1) {
    const unsigned j = idx + step - 1;  // <= 254 for every path
    const float mid = (code_map[j] + code_map[j + 1]) * 0.5f;
    if (mid < y) idx += step;
  }
  return static_cast<std::uint8_t>(idx);
}

// The code that 0.0 encodes to (decodes to exactly 0 when the map contains 0).
inline std::uint8_t zero_code(const float* code_map) { return encode_value(code_map, 0.0f); }

// Element i of a block (i counted from the start of the codes array) scaled by its block's scale.
inline float decode(const float* code_map, const std::uint8_t* codes, float scale, std::size_t i) {
  const float value = code_map[codes[i]] * scale;
  return std::fabs(value) < FLT_MIN ? 0.0f : value;
}

// Quantize one block of `count` float32 values (count <= block size; the last block of
// a leaf is shorter). Writes `count` codes and the block's scale (its absmax).
inline void encode_block(const float* code_map, const float* values, std::size_t count, std::uint8_t* codes_out,
                         float* scale_out) {
  float absmax = 0.0f;
  bool has_nan = false;
  for (std::size_t i = 0; i < count; ++i) {
    const float a = std::fabs(values[i]);
    if (a != a) {
      has_nan = true;
    } else if (a >= FLT_MIN && a > absmax) {
      absmax = a;
    }
  }
  const float scale = has_nan ? std::numeric_limits<float>::quiet_NaN() : absmax;
  const float inv = 1.0f / (scale == 0.0f ? 1.0f : scale);
  const std::uint8_t zero = zero_code(code_map);
  for (std::size_t i = 0; i < count; ++i) {
    const float x = std::fabs(values[i]) < FLT_MIN ? 0.0f : values[i];
    const float y = x * inv;
    codes_out[i] = (y != y) ? zero : encode_value(code_map, y);
  }
  *scale_out = scale;
}

// The same nearest-code search as encode_value, by table: faster, and exact (equal to
// encode_value for every non-NaN y). The float32 bits of y with the low 19 mantissa bits
// dropped (sign, exponent, 4 mantissa bits) name one of 8192 buckets, each a contiguous
// interval of floats. encode_value is monotone in y, so over a bucket it runs from
// lo = encode_value(bucket min) to hi = encode_value(bucket max); the answer is lo plus
// the number of midpoints mid[lo..hi) below y (usually none or one to test).
// With at most kWidth midpoints per bucket (the dynamic maps have 3 and 5) the count is
// branch-free: kWidth compares against mid[lo..lo+kWidth) masked by hi.
struct TableEncoder {
  static constexpr unsigned kWidth = 6;
  float mid[256 + kWidth];      // mid[j] = (code_map[j] + code_map[j + 1]) * 0.5f, j = 0..254; then +inf
  std::uint8_t lo[8192], hi[8192];
  std::uint8_t zero;
  bool narrow;                  // every bucket holds at most kWidth midpoints

  explicit TableEncoder(const float* code_map) {
    for (unsigned j = 0; j < 255; ++j) mid[j] = (code_map[j] + code_map[j + 1]) * 0.5f;
    for (unsigned j = 255; j < 256 + kWidth; ++j) mid[j] = std::numeric_limits<float>::infinity();
    zero = zero_code(code_map);
    narrow = true;
    for (std::uint32_t k = 0; k < 8192; ++k) {
      const std::uint32_t b0 = k << 19, b1 = b0 | 0x7ffffu;
      float f0, f1;
      std::memcpy(&f0, &b0, 4);
      std::memcpy(&f1, &b1, 4);
      const float a = (k & 0x1000u) ? f1 : f0, b = (k & 0x1000u) ? f0 : f1;  // bucket min, max
      lo[k] = (a != a) ? 255 : encode_value(code_map, a);
      hi[k] = (b != b) ? 255 : encode_value(code_map, b);
      if (a == a && b == b && hi[k] - lo[k] > static_cast<int>(kWidth)) narrow = false;
    }
  }
  std::uint8_t operator()(float y) const {
    std::uint32_t u;
    std::memcpy(&u, &y, 4);
    const std::uint32_t k = u >> 19;
    unsigned idx = lo[k];
    const unsigned top = hi[k];
    if (narrow) {
      const unsigned base = idx;
      for (unsigned t = 0; t < kWidth; ++t) idx += static_cast<unsigned>((base + t < top) & (mid[base + t] < y));
      return static_cast<std::uint8_t>(idx);
    }
    while (idx < top && mid[idx] < y) ++idx;
    return static_cast<std::uint8_t>(idx);
  }
};

// encode_block with a TableEncoder: the same codes and scale.
inline void encode_block(const TableEncoder& enc, const float* values, std::size_t count, std::uint8_t* codes_out,
                         float* scale_out) {
  float absmax = 0.0f;
  bool has_nan = false;
  for (std::size_t i = 0; i < count; ++i) {  // branch-free: the same absmax and NaN flag
    const float a = std::fabs(values[i]);
    has_nan |= (a != a);
    absmax = (a >= FLT_MIN && a > absmax) ? a : absmax;
  }
  const float scale = has_nan ? std::numeric_limits<float>::quiet_NaN() : absmax;
  const float inv = 1.0f / (scale == 0.0f ? 1.0f : scale);
  for (std::size_t i = 0; i < count; ++i) {
    const float x = std::fabs(values[i]) < FLT_MIN ? 0.0f : values[i];
    const float y = x * inv;
    codes_out[i] = (y != y) ? enc.zero : enc(y);
  }
  *scale_out = scale;
}

// Whole leaf of n values, block after block (a convenience for tests and simple kernels).
inline void encode(const float* code_map, const float* values, std::size_t n, std::size_t block_size,
                   std::uint8_t* codes_out, float* scales_out) {
  for (std::size_t start = 0, b = 0; start < n; start += block_size, ++b) {
    const std::size_t count = n - start < block_size ? n - start : block_size;
    encode_block(code_map, values + start, count, codes_out + start, scales_out + b);
  }
}

}  // namespace quant8
}  // namespace adamx

#endif  // ADAMX_QUANT8_H_
