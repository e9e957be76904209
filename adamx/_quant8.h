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
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#endif

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

// A whole block decoded: out[i] = decode(code_map, codes, scale, i), i < count. A table
// lookup (a gather) times the block scale; branch-free, GCC vectorizes it.
inline void decode_block(const float* __restrict code_map, const std::uint8_t* __restrict codes, float scale,
                         std::size_t count, float* __restrict out) {
  for (std::size_t i = 0; i < count; ++i) {
    const float value = code_map[codes[i]] * scale;
    out[i] = std::fabs(value) < FLT_MIN ? 0.0f : value;
  }
}

// decode_block through byte permutes where the CPU has AVX-512 VBMI (compiled with
// -march=native on such a CPU; otherwise the portable loop above). The 256-float map is
// kept as four byte planes (plane[k][c] = byte k of map[c]); 64 codes are looked up in each
// plane with two vpermi2b (codes 0-127, 128-255) and a blend on the codes' top bit, and the
// planes are interleaved back into floats. The codes are permuted first so that the
// interleave (which works within 128-bit lanes) puts the floats in order. Same values as
// decode_block bit for bit: a table lookup, the same product and the same flush.
struct TableDecoder {
  alignas(64) std::uint8_t plane[4][256];
  float map[256];

  explicit TableDecoder(const float* code_map) {
    std::memcpy(map, code_map, sizeof map);
    for (int c = 0; c < 256; ++c) {
      std::uint32_t u;
      std::memcpy(&u, code_map + c, 4);
      for (int k = 0; k < 4; ++k) plane[k][c] = static_cast<std::uint8_t>(u >> (8 * k));
    }
  }
};

// 1 when decode_block(TableDecoder&, ...) uses the AVX-512 VBMI path, 0 for the portable loop.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define ADAMX_QUANT8_VBMI 1
#else
#define ADAMX_QUANT8_VBMI 0
#endif

inline void decode_block(const TableDecoder& dec, const std::uint8_t* __restrict codes, float scale,
                         std::size_t count, float* __restrict out) {
  std::size_t i = 0;
#if ADAMX_QUANT8_VBMI
  // order[L*16 + 4r + s] = 16r + 4L + s: after the two unpack levels, float r*16 + j of the
  // group of 64 lands in output register r, slot j.
  alignas(64) static constexpr std::uint8_t kOrder[64] = {
      0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55,
      8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
  const __m512i order = _mm512_load_si512(kOrder);
  __m512i t[4][4];
  for (int k = 0; k < 4; ++k)
    for (int q = 0; q < 4; ++q) t[k][q] = _mm512_load_si512(dec.plane[k] + 64 * q);
  const __m512 vscale = _mm512_set1_ps(scale), tiny = _mm512_set1_ps(FLT_MIN);
  for (; i + 64 <= count; i += 64) {
    const __m512i c = _mm512_maskz_permutexvar_epi8(~__mmask64{0}, order, _mm512_loadu_si512(codes + i));
    const __mmask64 high = _mm512_movepi8_mask(c);
    __m512i b[4];
    for (int k = 0; k < 4; ++k)
      b[k] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(t[k][0], c, t[k][1]),
                                    _mm512_permutex2var_epi8(t[k][2], c, t[k][3]));
    const __m512i w01l = _mm512_unpacklo_epi8(b[0], b[1]), w01h = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i w23l = _mm512_unpacklo_epi8(b[2], b[3]), w23h = _mm512_unpackhi_epi8(b[2], b[3]);
    const __m512i d[4] = {_mm512_unpacklo_epi16(w01l, w23l), _mm512_unpackhi_epi16(w01l, w23l),
                          _mm512_unpacklo_epi16(w01h, w23h), _mm512_unpackhi_epi16(w01h, w23h)};
    for (int r = 0; r < 4; ++r) {
      const __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(d[r]), vscale);
      const __mmask16 flush = _mm512_cmp_ps_mask(_mm512_abs_ps(v), tiny, _CMP_LT_OQ);
      _mm512_storeu_ps(out + i + 16 * r, _mm512_mask_mov_ps(v, flush, _mm512_setzero_ps()));
    }
  }
#endif
  decode_block(dec.map, codes + i, scale, count - i, out + i);
}

// The same nearest-code search as encode_value, by one table lookup and one integer compare.
//
// Bucket k of a float32 y is its top 16 bits (sign, exponent, 7 mantissa bits): a
// contiguous interval of floats. encode_value is monotone in y, so over bucket k it runs
// from lo = encode_value(bucket min) to hi = encode_value(bucket max), and the answer for
// y is lo plus the number of midpoints mid[lo..hi) below y. For the dynamic maps every
// bucket holds at most one midpoint (hi - lo <= 1: their codes are >= 0.7% apart where a
// bucket is <= 0.4% wide), so the answer is lo + (mid[lo] < y). That midpoint lies in the
// bucket, so it shares y's top 16 bits, and mid < y is a compare of the low 16 bits (for
// negative y, of their complement, as the order of magnitudes is reversed). Table entry:
// (lo << 16) | t with t = the midpoint's low 16 bits (complemented for a negative bucket),
// or 0xffff when the bucket holds none (the compare t < s is then false for every y).
//
//   code(y) = y is NaN ? zero : (entry[k] >> 16) + ((entry[k] & 0xffff) < s(y))
//   s(y)    = (bits(y) & 0xffff) ^ (y negative ? 0xffff : 0)
//
// Exact (equal to encode_value) for every non-NaN y when `fast` is set; the constructor
// checks each bucket and otherwise (a map with denser codes) falls back to encode_value.
// Branch-free integer code: GCC vectorizes encode_block with -O3 -march=native.
// Checked once exhaustively against encode_value for both dynamic maps and both linear
// maps, with and without denormals-are-zero: every float32 with |y| in [2**-37, 2**2) and
// every non-finite one, 1 in 4096 elsewhere, 0 differences; tests/test_quantize.py checks
// every float within 300 ulps of every midpoint and a sweep of [-1, 1].
struct TableEncoder {
  std::uint32_t entry[65536];
  float map[256];               // the code map, for the fallback
  std::uint8_t zero;            // code of 0.0 (and of NaN)
  bool fast;                    // every bucket holds at most one midpoint: the table is exact

  explicit TableEncoder(const float* code_map) {
    std::memcpy(map, code_map, sizeof map);
    zero = zero_code(code_map);
    fast = true;
    for (std::uint32_t k = 0; k < 65536; ++k) {
      const std::uint32_t b0 = k << 16, b1 = b0 | 0xffffu;
      const bool negative = (k & 0x8000u) != 0;
      float f0, f1;
      std::memcpy(&f0, &b0, 4);
      std::memcpy(&f1, &b1, 4);
      const float a = negative ? f1 : f0, b = negative ? f0 : f1;  // bucket min, max
      const bool nan_a = a != a, nan_b = b != b;
      const unsigned lo = nan_a ? (nan_b ? zero : encode_value(code_map, b)) : encode_value(code_map, a);
      const unsigned hi = nan_b ? lo : encode_value(code_map, b);
      std::uint32_t t = 0xffffu;
      if (hi > lo + 1) {
        fast = false;
      } else if (hi == lo + 1) {
        const float mid = (code_map[lo] + code_map[lo + 1]) * 0.5f;
        std::uint32_t mb;
        std::memcpy(&mb, &mid, 4);
        // the midpoint must be a normal float of this bucket (not a subnormal, which the
        // kernel's denormals-are-zero mode compares as 0, and not a 0 of the other sign)
        if ((mb >> 16) != k || (k & 0x7f80u) == 0) fast = false;
        t = (mb & 0xffffu) ^ (negative ? 0xffffu : 0u);
      }
      entry[k] = (static_cast<std::uint32_t>(lo) << 16) | t;
    }
  }
  // The code of one y (scalar; encode_block has the same formula in its vectorized loop).
  std::uint8_t operator()(float y) const {
    if (y != y) return zero;
    if (!fast) return encode_value(map, y);
    std::uint32_t u;
    std::memcpy(&u, &y, 4);
    const std::uint32_t e = entry[u >> 16];
    const std::uint32_t s = (u & 0xffffu) ^ ((0u - (u >> 31)) & 0xffffu);
    return static_cast<std::uint8_t>((e >> 16) + ((e & 0xffffu) < s ? 1u : 0u));
  }
};

// encode_block with a TableEncoder: the same codes and scale. Two branch-free passes:
// absmax as an integer max of the magnitude bits (subnormals count as 0, a NaN as all
// ones, which makes the scale NaN), then the table encode.
inline void encode_block(const TableEncoder& enc, const float* __restrict values, std::size_t count,
                         std::uint8_t* __restrict codes_out, float* __restrict scale_out) {
  std::uint32_t amax = 0;  // max over the block of key = magnitude bits, 0 below FLT_MIN, all ones for a NaN
  for (std::size_t i = 0; i < count; ++i) {
    std::uint32_t u;
    std::memcpy(&u, values + i, 4);
    const std::uint32_t a = u & 0x7fffffffu;
    const std::uint32_t normal = 0u - static_cast<std::uint32_t>(a >= 0x00800000u);  // masks, not selects:
    const std::uint32_t is_nan = 0u - static_cast<std::uint32_t>(a > 0x7f800000u);   // GCC vectorizes these
    const std::uint32_t key = (a & normal) | is_nan;
    amax = key > amax ? key : amax;
  }
  const bool nan = amax > 0x7f800000u;
  float absmax;
  std::memcpy(&absmax, &amax, 4);
  const float scale = nan ? std::numeric_limits<float>::quiet_NaN() : absmax;
  const float inv = 1.0f / (scale == 0.0f ? 1.0f : scale);
  *scale_out = scale;
  if (!enc.fast) {
    for (std::size_t i = 0; i < count; ++i) {
      const float x = std::fabs(values[i]) < FLT_MIN ? 0.0f : values[i];
      codes_out[i] = enc(x * inv);
    }
    return;
  }
  const std::uint32_t* __restrict entry = enc.entry;
  const std::uint8_t zero = enc.zero;
  for (std::size_t i = 0; i < count; ++i) {
    const float x = std::fabs(values[i]) < FLT_MIN ? 0.0f : values[i];
    const float y = x * inv;
    std::uint32_t u;
    std::memcpy(&u, &y, 4);
    const std::uint32_t e = entry[static_cast<int>(u >> 16)];
    const std::uint32_t s = (u & 0xffffu) ^ ((0u - (u >> 31)) & 0xffffu);
    const std::uint32_t code = (e >> 16) + ((e & 0xffffu) < s ? 1u : 0u);
    codes_out[i] = (y != y) ? zero : static_cast<std::uint8_t>(code);
  }
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
