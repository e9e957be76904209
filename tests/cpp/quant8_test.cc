// The fused kernel's 8-bit codec (adamx/_quant8.h) as a C ABI for tests/test_quantize.py, which
// loads it with ctypes and compares it bit for bit with JAX (tests/cpp/__init__.py builds it).
#include <algorithm>
#include <memory>
#include "_quant8.h"
extern "C" {
void q8_encode(const float* map, const float* x, std::size_t n, std::size_t bs, std::uint8_t* codes, float* scales) {
  adamx::quant8::encode(map, x, n, bs, codes, scales);
}
void q8_encode_block(const float* map, const float* x, std::size_t count, std::uint8_t* codes, float* scale) {
  adamx::quant8::encode_block(map, x, count, codes, scale);
}
void q8_decode(const float* map, const std::uint8_t* codes, const float* scales, std::size_t n, std::size_t bs,
               float* out) {
  for (std::size_t i = 0; i < n; ++i) out[i] = adamx::quant8::decode(map, codes, scales[i / bs], i);
}
int q8_zero_code(const float* map) { return adamx::quant8::zero_code(map); }
// the kernel's encoder: TableEncoder (one lookup + one compare) and decode_block
int q8_encode_table(const float* map, const float* x, std::size_t n, std::size_t bs, std::uint8_t* codes,
                    float* scales) {
  const auto enc = std::make_unique<adamx::quant8::TableEncoder>(map);
  for (std::size_t start = 0, b = 0; start < n; start += bs, ++b)
    adamx::quant8::encode_block(*enc, x + start, std::min(bs, n - start), codes + start, scales + b);
  return enc->fast ? 1 : 0;
}
// the kernel's decoder: TableDecoder (byte-plane permutes under AVX-512 VBMI, else the loop)
void q8_decode_blocks(const float* map, const std::uint8_t* codes, const float* scales, std::size_t n,
                      std::size_t bs, float* out) {
  const auto dec = std::make_unique<adamx::quant8::TableDecoder>(map);
  for (std::size_t start = 0, b = 0; start < n; start += bs, ++b)
    adamx::quant8::decode_block(*dec, codes + start, scales[b], std::min(bs, n - start), out + start);
}
int q8_vbmi() { return ADAMX_QUANT8_VBMI; }
}
