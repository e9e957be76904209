// The fused kernel's stochastic rounding (adamx/fused/kernel.cc) as a C ABI for
// tests/test_stochastic_kernel.py, which loads it with ctypes. The test cuts the kernel's own
// code out of kernel.cc into "kernel_rounding.inc" (on the include path): its dtypes and
// param_rounding sections (no XLA headers) and ScopedFtz, under which every function here runs
// (denormals flushed, FTZ and DAZ, as in the kernel and XLA:CPU).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {
#include "kernel_rounding.inc"

inline uint32_t bits(float f) { return __builtin_bit_cast(uint32_t, f); }
inline float from_bits(uint32_t u) { return __builtin_bit_cast(float, u); }
// Where the kernel takes stochastic_round_bf16_fast: its block test (step_segment), for one x.
inline bool fast_ok(uint32_t xb) {
  const uint32_t ax = xb & 0x7fffffffu;
  return ax - 1u >= kSrFastMin - 1u && ax <= kSrFastMax;
}
constexpr uint32_t kChunk = 4096;

// A count of differences and where the first one was.
struct Diff {
  uint64_t n = 0;
  uint32_t first = 0;
  void add(bool differ, uint32_t at) {
    if (differ && n++ == 0) first = at;
  }
  uint64_t report(uint32_t* bad) const {
    if (n != 0) *bad = first;
    return n;
  }
};

// Adds the inputs (at[i] names input i) the kernel would round with stochastic_round_bf16_fast
// (fast_ok) and that it rounds otherwise than stochastic_round<bf16_t>.
void diff_chunk(const float* x, const uint32_t* h, const uint32_t* at, uint32_t m, Diff* d) {
  float fast[kChunk], general[kChunk];
  for (uint32_t i = 0; i < m; ++i) fast[i] = stochastic_round_bf16_fast(x[i], h[i]);
  for (uint32_t i = 0; i < m; ++i) general[i] = stochastic_round<bf16_t>(x[i], h[i]);
  for (uint32_t i = 0; i < m; ++i) d->add(fast_ok(bits(x[i])) && bits(fast[i]) != bits(general[i]), at[i]);
}
}  // namespace

extern "C" {
// out[i] = form(x[i], h[i]) for P = bf16 (dtype 1) or f16 (2); form 0: stochastic_round<P>,
// 1: stochastic_round_bf16_fast (bf16 only).
void sr_round(int dtype, int form, const float* x, const uint32_t* h, std::size_t n, float* out) {
  ScopedFtz ftz;
  for (std::size_t i = 0; i < n; ++i) {
    if (dtype == 1) {
      out[i] = form == 0 ? stochastic_round<bf16_t>(x[i], h[i]) : stochastic_round_bf16_fast(x[i], h[i]);
    } else {
      out[i] = stochastic_round<f16_t>(x[i], h[i]);
    }
  }
}

// diff_chunk over the float32 x of bits x0 .. x0 + count - 1 (wrapping), hash h; *bad: the
// first x's bits.
uint64_t sr_bf16_diff_over_x(uint32_t h, uint32_t x0, uint64_t count, uint32_t* bad) {
  ScopedFtz ftz;
  float x[kChunk];
  uint32_t hs[kChunk], at[kChunk];
  std::fill(hs, hs + kChunk, h);
  Diff d;
  for (uint64_t done = 0; done < count; done += kChunk) {
    const uint32_t m = static_cast<uint32_t>(std::min<uint64_t>(kChunk, count - done));
    for (uint32_t i = 0; i < m; ++i) at[i] = x0 + static_cast<uint32_t>(done) + i;
    for (uint32_t i = 0; i < m; ++i) x[i] = from_bits(at[i]);
    diff_chunk(x, hs, at, m, &d);
  }
  return d.report(bad);
}

// diff_chunk for one x over the hashes h = (k << 8) | low, every k < 2**24 (the bits
// stochastic_round reads; the fast form reads the top 16); *bad: the first k.
uint64_t sr_bf16_diff_over_h(float x, uint32_t low, uint32_t* bad) {
  ScopedFtz ftz;
  float xs[kChunk];
  uint32_t hs[kChunk], at[kChunk];
  std::fill(xs, xs + kChunk, x);
  Diff d;
  for (uint32_t base = 0; base < (1u << 24); base += kChunk) {
    for (uint32_t i = 0; i < kChunk; ++i) at[i] = base + i;
    for (uint32_t i = 0; i < kChunk; ++i) hs[i] = (at[i] << 8) | low;
    diff_chunk(xs, hs, at, kChunk, &d);
  }
  return d.report(bad);
}

// How many non-NaN float32 (bits x0 .. x0 + count - 1, wrapping) round_bf16_not_nan rounds
// otherwise than round_to<bf16_t>; *bad: the first.
uint64_t sr_round_not_nan_diff(uint32_t x0, uint64_t count, uint32_t* bad) {
  Diff d;
  for (uint64_t i = 0; i < count; ++i) {
    const uint32_t u = x0 + static_cast<uint32_t>(i);
    const float f = from_bits(u);
    d.add((u & 0x7fffffffu) <= 0x7f800000u && bits(round_bf16_not_nan(f)) != bits(round_to<bf16_t>(f)), u);
  }
  return d.report(bad);
}

// How many j in j0 .. j0 + count - 1 (wrapping) SrHash, run over them in the kernel's blocks (from
// j0, which need not start one), gives other top 16 bits than mix32(mix32(j ^ key) + key); *bad:
// the first.
uint64_t sr_hash_diff(uint32_t key, uint32_t j0, uint64_t count, uint32_t* bad) {
  SrHash hash;
  Diff d;
  uint32_t got[kSrBlock];
  for (uint64_t done = 0; done < count;) {
    const uint32_t b0 = j0 + static_cast<uint32_t>(done);
    const uint32_t m = static_cast<uint32_t>(std::min<uint64_t>(kSrBlock - b0 % kSrBlock, count - done));
    uint32_t a;
    const uint32_t* row = hash.row(b0, key, &a);
    for (uint32_t i = 0; i < m; ++i) got[i] = SrHash::hi16(a + row[i], key) >> 16;
    for (uint32_t i = 0; i < m; ++i) d.add(got[i] != mix32(mix32((b0 + i) ^ key) + key) >> 16, b0 + i);
    done += m;
  }
  return d.report(bad);
}
}
