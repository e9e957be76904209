// The fused kernel's fp8 and 4-bit codecs (adamx/_lowbit.h) as a C ABI for tests/test_lowbit_fused.py,
// which loads it with ctypes and compares it bit for bit with XLA (tests/cpp/__init__.py builds it).
// Every function runs with denormals flushed (FTZ and DAZ), as the kernel and XLA:CPU do.
#include <cstddef>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif
#include "_lowbit.h"

namespace lb = adamx::lowbit;

namespace {
struct Ftz {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int saved;
  Ftz() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }
  ~Ftz() { _mm_setcsr(saved); }
#endif
};

lb::Q4Map q4_of(const float* table) {  // 16 map values, then 15 thresholds
  lb::Q4Map q;
  std::memcpy(q.value, table, sizeof q.value);
  std::memcpy(q.thr, table + 16, sizeof q.thr);
  return q;
}
}  // namespace

extern "C" {
void lb_e4m3fn_bits(const float* y, std::size_t n, std::uint8_t* out) {
  Ftz ftz;
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<std::uint8_t>(lb::e4m3fn_bits(y[i]));
}
void lb_e4m3fn_values(const std::uint8_t* codes, std::size_t n, float* out) {
  Ftz ftz;
  for (std::size_t i = 0; i < n; ++i) out[i] = lb::e4m3fn_value(codes[i]);
}
void lb_fp8_encode(const float* x, std::size_t n, std::uint8_t* codes, float* scales) {
  Ftz ftz;
  for (std::size_t b = 0; b * 256 < n; ++b) lb::fp8_encode_block(x + 256 * b, 256, codes + 256 * b, scales + b);
}
void lb_fp8_decode(const std::uint8_t* codes, const float* scales, std::size_t n, float* out) {
  Ftz ftz;
  for (std::size_t b = 0; b * 256 < n; ++b) lb::fp8_decode_block(codes + 256 * b, scales[b], 256, out + 256 * b);
}
void lb_q4_encode(const float* table, const float* x, std::size_t n, std::uint8_t* packed, float* scales) {
  Ftz ftz;
  const lb::Q4Map q = q4_of(table);
  for (std::size_t b = 0; b * 128 < n; ++b) lb::q4_encode_block(q, x + 128 * b, 128, packed + 64 * b, scales + b);
}
void lb_q4_decode(const float* table, const std::uint8_t* packed, const float* scales, std::size_t n, float* out) {
  Ftz ftz;
  const lb::Q4Map q = q4_of(table);
  for (std::size_t b = 0; b * 128 < n; ++b) lb::q4_decode_block(q, packed + 64 * b, scales[b], 128, out + 128 * b);
}
}
