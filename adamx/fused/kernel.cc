// adamx fused Adam step for XLA:CPU (jax.ffi). One pass over every leaf:
// reads params, grads, mu, nu (+ nu_max, acc, ema) and writes them back in place.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define ADAMX_HAS_MXCSR 1
#endif

#include "xla/ffi/api/ffi.h"
#include "_quant8.h"  // adamx/_quant8.h: the 8-bit state codec (-I adamx, see _build.py)
#include "_lowbit.h"  // adamx/_lowbit.h: the fp8 and 4-bit state codecs

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------- dtypes
// Storage types: float, bf16 (raw uint16_t bits), f16 (_Float16).
using bf16_t = uint16_t;
using f16_t = _Float16;

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static inline float load(float x) { return x; }
  static inline float store(float f) { return f; }
};
template <> struct Cvt<bf16_t> {
  static inline float load(bf16_t x) {
    const uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  // Round to nearest even; NaN stays a quiet NaN (XLA's f32 -> bf16 convert).
  static inline bf16_t store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = (u >> 16) | 0x40u;
    return static_cast<bf16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
  }
};
template <> struct Cvt<f16_t> {
  static inline float load(f16_t x) { return static_cast<float>(x); }
  static inline f16_t store(float f) { return static_cast<f16_t>(f); }
};
template <typename T> static inline float ld(T x) { return Cvt<T>::load(x); }
template <typename T> static inline T st(float f) { return Cvt<T>::store(f); }
template <typename T> static inline T rnd(float f) { return st<T>(f); }
template <typename T> static inline float round_to(float f) { return ld<T>(st<T>(f)); }

// Loop-invariant switches are applied as bit masks (all ones / zeros): GCC does not
// vectorize a select on a scalar bool, but does vectorize and/or on the bits. Exact.
template <typename T> struct Bits;
template <> struct Bits<float> { using U = uint32_t; };
template <> struct Bits<bf16_t> { using U = uint16_t; };
template <> struct Bits<f16_t> { using U = uint16_t; };
template <typename T>
static inline T sel(typename Bits<T>::U mask, T a, T b) {
  using U = typename Bits<T>::U;
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(T));
  std::memcpy(&ub, &b, sizeof(T));
  const U r = static_cast<U>((ua & mask) | (ub & static_cast<U>(~mask)));
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}
template <typename T> static inline typename Bits<T>::U mask_of(bool c) {
  return c ? static_cast<typename Bits<T>::U>(~typename Bits<T>::U{0}) : typename Bits<T>::U{0};
}
// XLA:CPU contracts a*b+c into one fused multiply-add where the CPU has FMA. The kernel is
// compiled with -ffp-contract=off and contracts exactly where XLA does (checked by
// tests/test_performance_paths.py).
static inline float fmadd(float a, float b, float c) {
#ifdef __FMA__
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// jnp.maximum / jnp.minimum: NaN if either operand is NaN.
static inline float max_nan(float a, float b) {
  float r = a > b ? a : b;
  r = b != b ? b : r;
  return a != a ? a : r;
}
static inline float min_nan(float a, float b) {
  float r = a < b ? a : b;
  r = b != b ? b : r;
  return a != a ? a : r;
}

// ---------------------------------------------------------------- scalars
// Layout of the f32 scalar operand: one entry per field of adamx._step.Scalars, in order.
// adamx_fused_scalar_names() exports this list; the loader (adamx/fused/_build.py) refuses
// a kernel whose list differs from Scalars._fields.
#define ADAMX_SCALARS(X)                                                                          \
  X(kC1, c1) X(kC2, c2) X(kAlpha, alpha) X(kEps, eps) X(kLr, lr) X(kWd, wd) X(kLsf, lsf)            \
  X(kHasLsf, has_lsf) X(kK, k) X(kIsReal, is_real) X(kClipMode, clip_mode) X(kClipC, clip_c)          \
  X(kClipScale, clip_scale) X(kMom, mom) X(kOneM, one_m) X(kOverwrite, overwrite)
#define ADAMX_ENUM(e, n) e,
enum { ADAMX_SCALARS(ADAMX_ENUM) kNumScalars };
#undef ADAMX_ENUM

struct Sc {
  float c1, c2, alpha, eps, lr, wd, lsf, kf, clip_c, clip_scale, mom, one_m;
  bool has_lsf, is_real, overwrite;
  int clip_mode;  // 0 none, 1 per-tensor norm, 2 global norm, 3 value
};

static Sc read_scalars(const float* s) {
  Sc c;
  c.c1 = s[kC1]; c.c2 = s[kC2]; c.alpha = s[kAlpha]; c.eps = s[kEps]; c.lr = s[kLr]; c.wd = s[kWd];
  c.lsf = s[kLsf]; c.has_lsf = s[kHasLsf] != 0.0f; c.kf = s[kK]; c.is_real = s[kIsReal] != 0.0f;
  c.clip_mode = static_cast<int>(s[kClipMode]); c.clip_c = s[kClipC]; c.clip_scale = s[kClipScale];
  c.mom = s[kMom]; c.one_m = s[kOneM]; c.overwrite = s[kOverwrite] != 0.0f;
  return c;
}

// ---------------------------------------------------------------- param_rounding
// The same arithmetic as adamx/_rounding.py (read its docstring): MurmurHash3's finalizer
// as a counter-based hash, and stochastic rounding to one of the two neighbours in P.
static inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// Branch-free on 32-bit lanes so that the per-segment loop vectorizes: every switch is a
// mask, no 16-bit temporaries (GCC found "control flow in loop" in the ?: on 16-bit bits).
static inline uint32_t mask32(bool c) { return 0u - static_cast<uint32_t>(c); }

// The other neighbour of q (a P value, as float32) in P's bits: one step out (`away`) or in,
// and from a zero the smallest subnormal of x's sign (`neg`: x < 0). Only used where q is
// finite and != x, so the steps from NaN/inf bits need not be meaningful.
template <typename P> static inline float neighbour(float q, uint32_t away, uint32_t neg);
// bf16 is the top half of a float32: one bf16 step is 0x10000 in float32's bits (mod 2**32,
// as the 16-bit step is mod 2**16 in the top half).
template <> inline float neighbour<bf16_t>(float q, uint32_t away, uint32_t neg) {
  const uint32_t qb = __builtin_bit_cast(uint32_t, q);
  const uint32_t step = qb + ((away & 0x10000u) | (~away & 0xffff0000u));
  const uint32_t tiny = (neg & 0x80000000u) | 0x10000u;
  const uint32_t zero = mask32((qb & 0x7fff0000u) == 0);
  return __builtin_bit_cast(float, (zero & tiny) | (~zero & step));
}
// f16: the step on f16's bits (held in 32-bit lanes), converted back by the hardware.
template <> inline float neighbour<f16_t>(float q, uint32_t away, uint32_t neg) {
  const uint32_t qb = __builtin_bit_cast(uint16_t, st<f16_t>(q));
  const uint32_t step = qb + ((away & 1u) | (~away & 0xffffu));
  const uint32_t tiny = (neg & 0x8000u) | 1u;
  const uint32_t zero = mask32((qb & 0x7fffu) == 0);
  return ld(__builtin_bit_cast(f16_t, static_cast<uint16_t>((zero & tiny) | (~zero & step))));
}

// x (f32) rounded up or down to a P value: up with probability (x - lo) / (hi - lo).
// Exact values, non-finite values and overflow round to nearest (adamx/_rounding.py's stochastic).
template <typename P> static inline float stochastic_round(float x, uint32_t h) {
  const float q = round_to<P>(x);
  const uint32_t away = mask32((x > q) == (q > 0.0f));
  const float o = neighbour<P>(q, away, mask32(x < 0.0f));
  const float lo = std::min(q, o), hi = std::max(q, o);  // neither is NaN where the result is used
  const float r = static_cast<float>(h >> 8) * 0x1p-24f;
  const uint32_t up = mask32(r * (hi - lo) < (x - lo));
  const uint32_t inexact = mask32((std::fabs(q) < __builtin_inff()) & (q != x));  // finite and inexact
  return sel<float>(inexact, sel<float>(up, hi, lo), q);
}

// stochastic_round<bf16_t> as an integer add, exact where x is +-0 or kSrFastMin <= bits(|x|) <=
// kSrFastMax (2**-103 <= |x| <= the largest bf16; tests/test_stochastic_kernel.py checks every
// such x with three hashes, and edge x with every hash). There, with D the low 16 bits of x and H = h >> 16: where x is inexact, lo and hi are
// x's bf16 neighbours and x - lo = F * 2**(E - 150) (E: x's biased exponent; F = D for x > 0,
// 65536 - D for x < 0) is at least 2**-126, a normal float32, so the compare r * (hi - lo) <
// x - lo, r = (h >> 8) * 2**-24 and hi - lo = 2**(E - 134), is exactly (h >> 8) < 256 * F, i.e.
// H < F, whether or not r * (hi - lo) flushes to zero. x > 0: up means one step added to the
// truncated bits, and x + (0xffff - H) carries out of the low 16 bits iff D > H; x < 0: down
// (away from zero) iff x + H carries, iff D + H >= 65536, iff H >= F. Exact x (D == 0): no carry.
// Outside the range it is wrong: under 2**-103 x - lo may flush (then never up), and past the
// largest bf16 the general form gives inf or its largest value.
constexpr uint32_t kSrFastMin = 0x0c000000u, kSrFastMax = 0x7f7f0000u;
// round_to<bf16_t>(f) where f is not NaN (Cvt<bf16_t>::store's rounding; +-inf stay).
static inline float round_bf16_not_nan(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  return __builtin_bit_cast(float, (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
}
static inline float stochastic_round_bf16_fast(float x, uint32_t h) {
  const uint32_t xb = __builtin_bit_cast(uint32_t, x);
  const uint32_t neg = static_cast<uint32_t>(static_cast<int32_t>(xb) >> 31);
  return __builtin_bit_cast(float, (xb + ((h ^ neg ^ 0xffff0000u) >> 16)) & 0xffff0000u);
}
constexpr int64_t kSrBlock = 512;  // the kernel's blocks of j (aligned): each lies in one run of 2**16
static_assert(65536 % kSrBlock == 0, "SrHash needs each block inside a run of 2**16");
// The top 16 bits of mix32(mix32(j ^ key) + key) (the rest is not defined) for the j of one block:
// j ^ key has the same top 16 bits c there, so mix32's first xor-shift gives j ^ kc, kc = key ^ c,
// and with J = j & -kSrBlock and i = j % kSrBlock, j ^ kc is (J ^ kc & -kSrBlock) + (i ^ kc %
// kSrBlock) (disjoint bits): its product with 0x85ebca6b is a + t[i], t a table kept while kc %
// kSrBlock stays (a segment). The last xor-shift of mix32 changes the low 16 bits only.
struct SrHash {
  alignas(64) uint32_t t[kSrBlock];
  uint32_t t_of = ~0u;  // the kc % kSrBlock of t (none yet)
  // For j = j0 .. up to the end of j0's block: the first product of j is a + row[j - j0].
  const uint32_t* row(uint32_t j0, uint32_t key, uint32_t* a) {
    constexpr uint32_t kLow = static_cast<uint32_t>(kSrBlock) - 1;
    const uint32_t kc = key ^ ((j0 ^ key) >> 16);
    if ((kc & kLow) != t_of) {
      t_of = kc & kLow;
      for (uint32_t i = 0; i <= kLow; ++i) t[i] = (i ^ t_of) * 0x85ebca6bu;
    }
    *a = ((j0 ^ kc) & ~kLow) * 0x85ebca6bu;
    return t + (j0 & kLow);
  }
  // The rest of the hash from the first product h.
  static inline uint32_t hi16(uint32_t h, uint32_t key) {
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    h += key;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    return h * 0xc2b2ae35u;
  }
};

// ---------------------------------------------------------------- per-segment kernels
// The arithmetic below mirrors adamx.adam's reference step (adamx/_step.py) op by op,
// in float32; every feature switch is a select on values computed unconditionally, so
// the loop stays branch-free and vectorizes.
// A: the accumulator's storage type. RND: param_rounding, 0 nearest, 1 kahan, 2 stochastic
// (1 and 2 only for bf16/f16 params).
template <typename P, typename G, typename M, typename V, typename A, int RND, bool AMS, bool ACC, bool EMA>
static void step_segment(P* __restrict p, const G* __restrict g, M* __restrict m, V* __restrict v,
                         V* __restrict vmax, A* __restrict acc, float* __restrict ema, P* __restrict comp,
                         uint32_t key, int64_t b, int64_t e, const Sc& s, float clip_denom, bool decay) {
  const float c1 = s.c1, c2 = s.c2, alpha = s.alpha, eps = s.eps, lr = s.lr, wd = s.wd;
  const float lsf = s.lsf, kf = s.kf, clip_c = s.clip_c, clip_scale = s.clip_scale;
  const float mom = s.mom, one_m = s.one_m;
  const bool real_b = s.is_real || !ACC;
  const int mode = real_b ? s.clip_mode : 0;
  const uint32_t has_lsf = mask_of<float>(s.has_lsf), real = mask_of<float>(real_b);
  const uint32_t overwrite = mask_of<float>(s.overwrite), dec = mask_of<float>(decay);
  const uint32_t by_norm = mask_of<float>(mode == 1), by_global = mask_of<float>(mode == 2);
  const uint32_t by_value = mask_of<float>(mode == 3);
  const auto real_m = mask_of<M>(real_b);
  const auto real_v = mask_of<V>(real_b);
  const auto real_a = mask_of<A>(real_b);
  const auto real_p = mask_of<P>(real_b);
  // XLA rewrites x / scalar as x * (1 / scalar); so does the kernel.
  const float inv_lsf = 1.0f / lsf, inv_k = 1.0f / kf, inv_denom = 1.0f / clip_denom;
  const float wd_lr = wd * lr;
  // The moments and the update u1 of element j (m, v, v_max, acc written); pf: the param.
  auto front = [&](int64_t j, float& pf_out) __attribute__((always_inline)) -> float {
    // The gradient the moments see is g = ga * gb (gb = 1 when its last op is not a
    // product). XLA computes the new mu in its own loop where g has one use, and
    // contracts g - mu into fma(ga, gb, -mu); the kernel does the same.
    const float g0 = ld(g[j]);
    float ga = g0, gb = sel(has_lsf, inv_lsf, 1.0f);  // g / loss_scale_factor
    float gr = ga * gb;
    if constexpr (ACC) {
      const float a = ld(acc[j]);
      acc[j] = sel(real_a, st<A>(0.0f), st<A>(a + gr));  // micro-step: acc <- acc + g, nothing else moves
      ga = gr + a;                         // real step: (g + acc) / k, acc <- 0
      gb = inv_k;
      gr = ga * gb;
    }
    const float gc = gr * clip_c;
    const float g_val = min_nan(max_nan(-clip_c, gr), clip_c);
    ga = sel(by_norm, gc, sel(by_global, gr, sel(by_value, g_val, ga)));
    gb = sel(by_norm, inv_denom, sel(by_global, clip_scale, sel(by_value, 1.0f, gb)));
    gr = ga * gb;
    const M m_raw = m[j];
    const V v_raw = v[j];
    const float mf = ld(m_raw), vf = ld(v_raw);
    const float m2 = fmadd(fmadd(ga, gb, -mf), c1, mf);      // m + (g - m) * c1
    const float v2 = fmadd(fmadd(gr, gr, -vf), c2, vf);      // v + (g*g - v) * c2
    float vu = v2;
    if constexpr (AMS) {
      const V x_raw = vmax[j];
      vu = max_nan(ld(x_raw), v2);
      vmax[j] = sel(real_v, st<V>(vu), x_raw);
    }
    m[j] = sel(real_m, st<M>(m2), m_raw);
    v[j] = sel(real_v, st<V>(v2), v_raw);
    const float d = (m2 * alpha) / (std::sqrt(vu) + eps);
    const float pf = ld(p[j]);
    const float u0 = -d;
    // u - (p * wd) * lr; XLA folds the constant wd * lr first, then contracts.
    pf_out = pf;
    return sel(dec, fmadd(-pf, wd_lr, u0), u0);
  };
  // The update u (in the param dtype) received: EMA, and p + u written back.
  // not_nan (std::true_type): pf + u is not NaN, so its rounding may skip the NaN case (not with
  // EMA: then the average decides).
  auto finish = [&](int64_t j, float pf, float u, auto not_nan) __attribute__((always_inline)) {
    if constexpr (EMA) {
      const float p_new = round_to<P>(pf + u);
      const float a_new = fmadd(mom, ema[j], one_m * p_new);   // mom * avg + (1 - mom) * p
      ema[j] = a_new;
      u = sel(overwrite, round_to<P>(a_new - pf), u);
    }
    if constexpr (decltype(not_nan)::value && !EMA) {
      p[j] = static_cast<P>(__builtin_bit_cast(uint32_t, round_bf16_not_nan(pf + u)) >> 16);
    } else {
      p[j] = st<P>(pf + u);  // optax.apply_updates, in the param dtype
    }
  };
  using Maybe = std::false_type;
  if constexpr (RND == 2 && std::is_same<P, bf16_t>::value) {
    // bf16 stochastic rounding in blocks of j aligned to kSrBlock: a first loop runs the moments
    // and keeps x = p + u1 and the range of |x| of the block, a second one rounds and writes the
    // params. Where every x of the block is 0 or in the range where stochastic_round_bf16_fast is
    // exact (almost always), the second loop takes it, with SrHash; otherwise stochastic_round and
    // mix32, as the loop for the other cases does. The same bits either way; each loop vectorizes.
    alignas(64) float xs[kSrBlock], ps[kSrBlock];  // x and the param, as float32
    SrHash hash;
    for (int64_t b0 = b; b0 < e;) {
      const int64_t e0 = std::min(e, (b0 / kSrBlock + 1) * kSrBlock);
      const uint32_t n = static_cast<uint32_t>(e0 - b0);
      uint32_t below = ~0u, above = 0;  // min of bits(|x|) - 1 (0 wraps to the top), max of bits(|x|)
      for (int64_t j = b0; j < e0; ++j) {
        float pf;
        const float u1 = front(j, pf);
        const float x = pf + u1;
        xs[j - b0] = x;
        ps[j - b0] = pf;
        const uint32_t ax = __builtin_bit_cast(uint32_t, x) & 0x7fffffffu;
        below = std::min(below, ax - 1u);
        above = std::max(above, ax);
      }
      const uint32_t j0 = static_cast<uint32_t>(b0);  // the hash counter is j mod 2**32
      if (below >= kSrFastMin - 1u && above <= kSrFastMax) {
        uint32_t a;
        const uint32_t* row = hash.row(j0, key, &a);
        for (uint32_t i = 0; i < n; ++i) {
          // x is finite, so are pf, u1 and sr: sr - pf and pf + u may overflow, not be NaN
          const float sr = stochastic_round_bf16_fast(xs[i], SrHash::hi16(a + row[i], key));
          finish(b0 + i, ps[i], sel(real, round_bf16_not_nan(sr - ps[i]), 0.0f), std::true_type{});
        }
      } else {
        for (uint32_t i = 0; i < n; ++i) {
          const float sr = stochastic_round<P>(xs[i], mix32(mix32((j0 + i) ^ key) + key));
          finish(b0 + i, ps[i], sel(real, round_to<P>(sr - ps[i]), 0.0f), Maybe{});
        }
      }
      b0 = e0;
    }
  } else {
    // The hash counter: j mod 2**32 in its own 32-bit induction variable (a truncated 64-bit
    // one costs the vectorized loop a widen and a permute per vector).
    uint32_t j32 = static_cast<uint32_t>(b);
    for (int64_t j = b; j < e; ++j, ++j32) {
      float pf;
      const float u1 = front(j, pf);
      float u = sel(real, round_to<P>(u1), 0.0f);  // updates are in the param dtype
      // p_want = round(p + u1 + comp) (kahan) or stochastic_round(p + u1); the update is
      // round(p_want - p) and p + update the new param (adamx/_rounding.py).
      if constexpr (RND == 1) {
        const float y = u1 + ld(comp[j]);
        const float ur = round_to<P>(round_to<P>(pf + y) - pf);
        const float pn = round_to<P>(pf + ur);
        comp[j] = sel(real_p, st<P>(y - (pn - pf)), comp[j]);
        u = sel(real, ur, 0.0f);
      } else if constexpr (RND == 2) {
        const uint32_t h = mix32(mix32(j32 ^ key) + key);
        u = sel(real, round_to<P>(stochastic_round<P>(pf + u1, h) - pf), 0.0f);
      }
      finish(j, pf, u, Maybe{});
    }
  }
}

template <typename G, typename A, bool ACC>
static double sumsq_segment(const G* __restrict g, const A* __restrict acc, int64_t b0, int64_t e0,
                            bool has_lsf_b, float lsf, float kf) {
  const uint32_t has_lsf = mask_of<float>(has_lsf_b);
  const float inv_lsf = 1.0f / lsf, inv_k = 1.0f / kf;
  // 16 float lanes per block of 1024, blocks accumulated in double.
  constexpr int64_t kLanes = 16, kBlock = 1024;
  double total = 0.0;
  for (int64_t b = b0; b < e0; b += kBlock) {
    const int64_t e = std::min(e0, b + kBlock);
    float lane[kLanes] = {0};
    int64_t j = b;
    for (; j + kLanes <= e; j += kLanes) {
      for (int64_t k = 0; k < kLanes; ++k) {
        const float g0 = ld(g[j + k]);
        float gr = sel(has_lsf, g0 * inv_lsf, g0);
        if constexpr (ACC) gr = (gr + ld(acc[j + k])) * inv_k;
        lane[k] += gr * gr;
      }
    }
    double part = 0.0;
    for (; j < e; ++j) {
      const float g0 = ld(g[j]);
      float gr = sel(has_lsf, g0 * inv_lsf, g0);
      if constexpr (ACC) gr = (gr + ld(acc[j])) * inv_k;
      part += static_cast<double>(gr) * gr;
    }
    for (int64_t k = 0; k < kLanes; ++k) part += lane[k];
    total += part;
  }
  return total;
}

// ---------------------------------------------------------------- dispatch
enum DT { kF32 = 0, kBF16 = 1, kF16 = 2, kBad = 3 };
static DT dt_of(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return kF32;
    case ffi::DataType::BF16: return kBF16;
    case ffi::DataType::F16: return kF16;
    default: return kBad;
  }
}

using StepFn = void (*)(void*, const void*, void*, void*, void*, void*, float*, void*, uint32_t, int64_t, int64_t,
                        const Sc&, float, bool);

template <typename P, typename G, typename M, typename V, typename A, int RND, bool AMS, bool ACC, bool EMA>
static void step_erased(void* p, const void* g, void* m, void* v, void* vmax, void* acc, float* ema, void* comp,
                        uint32_t key, int64_t b, int64_t e, const Sc& s, float clip_denom, bool decay) {
  step_segment<P, G, M, V, A, RND, AMS, ACC, EMA>(static_cast<P*>(p), static_cast<const G*>(g), static_cast<M*>(m),
                                                  static_cast<V*>(v), static_cast<V*>(vmax), static_cast<A*>(acc), ema,
                                                  static_cast<P*>(comp), key, b, e, s, clip_denom, decay);
}

// Flags: ams, acc, ema. A bfloat16 accumulator only exists with acc (4 combinations).
template <typename P, typename G, typename M, typename V, typename A, int RND>
static StepFn pick_flags(bool ams, bool acc, bool ema) {
  const int k = (ams ? 4 : 0) | (acc ? 2 : 0) | (ema ? 1 : 0);
  if constexpr (std::is_same<A, float>::value) {
    switch (k) {
      case 0: return &step_erased<P, G, M, V, A, RND, false, false, false>;
      case 1: return &step_erased<P, G, M, V, A, RND, false, false, true>;
      case 4: return &step_erased<P, G, M, V, A, RND, true, false, false>;
      case 5: return &step_erased<P, G, M, V, A, RND, true, false, true>;
      default: break;
    }
  }
  switch (k) {
    case 2: return &step_erased<P, G, M, V, A, RND, false, true, false>;
    case 3: return &step_erased<P, G, M, V, A, RND, false, true, true>;
    case 6: return &step_erased<P, G, M, V, A, RND, true, true, false>;
    case 7: return &step_erased<P, G, M, V, A, RND, true, true, true>;
    default: return nullptr;
  }
}

template <typename P, typename G, typename M, typename V>
static StepFn pick_ar(DT a, int rnd, bool ams, bool acc, bool ema) {
  if (!acc) a = kF32;
  if constexpr (std::is_same<P, float>::value) {
    if (rnd) return nullptr;  // float32 params: every mode is nearest (the caller passes rnd = 0)
    if (a == kF32) return pick_flags<P, G, M, V, float, 0>(ams, acc, ema);
    if (a == kBF16) return pick_flags<P, G, M, V, bf16_t, 0>(ams, acc, ema);
  } else {
    if (a == kF32) {
      if (rnd == 1) return pick_flags<P, G, M, V, float, 1>(ams, acc, ema);
      if (rnd == 2) return pick_flags<P, G, M, V, float, 2>(ams, acc, ema);
      return pick_flags<P, G, M, V, float, 0>(ams, acc, ema);
    }
    if (a == kBF16) {
      if (rnd == 1) return pick_flags<P, G, M, V, bf16_t, 1>(ams, acc, ema);
      if (rnd == 2) return pick_flags<P, G, M, V, bf16_t, 2>(ams, acc, ema);
      return pick_flags<P, G, M, V, bf16_t, 0>(ams, acc, ema);
    }
  }
  return nullptr;
}

template <typename P, typename G>
static StepFn pick_mv(DT m, DT v, DT a, int rnd, bool ams, bool acc, bool ema) {
  if (m == kF32 && v == kF32) return pick_ar<P, G, float, float>(a, rnd, ams, acc, ema);
  if (m == kF32 && v == kBF16) return pick_ar<P, G, float, bf16_t>(a, rnd, ams, acc, ema);
  if (m == kBF16 && v == kF32) return pick_ar<P, G, bf16_t, float>(a, rnd, ams, acc, ema);
  if (m == kBF16 && v == kBF16) return pick_ar<P, G, bf16_t, bf16_t>(a, rnd, ams, acc, ema);
  return nullptr;
}

// Supported: params f32/bf16/f16; grads in the param dtype or f32; moments f32 or bf16;
// accumulator f32 or bf16; param_rounding for bf16/f16 params.
static StepFn pick_step(DT p, DT g, DT m, DT v, DT a, int rnd, bool ams, bool acc, bool ema) {
  if (p == kF32 && g == kF32) return pick_mv<float, float>(m, v, a, rnd, ams, acc, ema);
  if (p == kBF16 && g == kBF16) return pick_mv<bf16_t, bf16_t>(m, v, a, rnd, ams, acc, ema);
  if (p == kBF16 && g == kF32) return pick_mv<bf16_t, float>(m, v, a, rnd, ams, acc, ema);
  if (p == kF16 && g == kF16) return pick_mv<f16_t, f16_t>(m, v, a, rnd, ams, acc, ema);
  if (p == kF16 && g == kF32) return pick_mv<f16_t, float>(m, v, a, rnd, ams, acc, ema);
  return nullptr;
}

using SumFn = double (*)(const void*, const void*, int64_t, int64_t, bool, float, float);
template <typename G, typename A, bool ACC>
static double sumsq_erased(const void* g, const void* acc, int64_t b, int64_t e, bool has_lsf, float lsf, float kf) {
  return sumsq_segment<G, A, ACC>(static_cast<const G*>(g), static_cast<const A*>(acc), b, e, has_lsf, lsf, kf);
}
template <typename G>
static SumFn pick_sum_acc(bool acc, DT a) {
  if (!acc) return &sumsq_erased<G, float, false>;
  if (a == kF32) return &sumsq_erased<G, float, true>;
  if (a == kBF16) return &sumsq_erased<G, bf16_t, true>;
  return nullptr;
}
static SumFn pick_sum(DT g, bool acc, DT a) {
  switch (g) {
    case kF32: return pick_sum_acc<float>(acc, a);
    case kBF16: return pick_sum_acc<bf16_t>(acc, a);
    case kF16: return pick_sum_acc<f16_t>(acc, a);
    default: return nullptr;
  }
}

// ---------------------------------------------------------------- work splitting
struct Seg { int64_t leaf, begin, end; };

// Segments of at most kSeg elements; a task is a run of segments of about kSeg elements
// in all (small leaves are grouped, large leaves split).
constexpr int64_t kSeg = int64_t{1} << 16;

// seg_len: the segment length (quantized state: a multiple of the block size, so that
// segments and tasks hold whole quantization blocks).
static void make_tasks(const std::vector<int64_t>& sizes, std::vector<Seg>* segs, std::vector<int64_t>* task_start,
                       int64_t seg_len = kSeg) {
  int64_t acc = 0;
  task_start->push_back(0);
  for (int64_t i = 0; i < static_cast<int64_t>(sizes.size()); ++i) {
    for (int64_t b = 0; b < sizes[i]; b += seg_len) {
      const int64_t e = std::min(sizes[i], b + seg_len);
      segs->push_back({i, b, e});
      acc += e - b;
      if (acc >= kSeg) {
        task_start->push_back(static_cast<int64_t>(segs->size()));
        acc = 0;
      }
    }
  }
  if (task_start->back() != static_cast<int64_t>(segs->size())) task_start->push_back(static_cast<int64_t>(segs->size()));
}

// XLA:CPU flushes denormals; do the same so results match bit for bit.
struct ScopedFtz {
#ifdef ADAMX_HAS_MXCSR
  unsigned int saved;
  ScopedFtz() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }
  ~ScopedFtz() { _mm_setcsr(saved); }
#endif
};

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  void (*fn)(void*, int64_t) = nullptr;
  void* ctx = nullptr;
};

static void run_tasks(Shared* sh) {
  ScopedFtz ftz;
  for (;;) {
    const int64_t i = sh->next.fetch_add(1, std::memory_order_relaxed);
    if (i >= sh->n) return;
    sh->fn(sh->ctx, i);
    sh->done.fetch_add(1, std::memory_order_acq_rel);
  }
}

// Runs fn(ctx, 0..n-1) on the calling thread and on XLA's intra-op pool. The caller
// waits for the tasks, not for the helpers: a helper that starts late finds no work.
static void parallel_for(ffi::ThreadPool& pool, int64_t n, int64_t total_elems, void (*fn)(void*, int64_t), void* ctx) {
  auto sh = std::make_shared<Shared>();
  sh->n = n;
  sh->fn = fn;
  sh->ctx = ctx;
  int64_t helpers = 0;
  if (total_elems >= 2 * kSeg) helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t w = 0; w < helpers; ++w) pool.Schedule([sh] { run_tasks(sh.get()); });
  run_tasks(sh.get());
  while (sh->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// ---------------------------------------------------------------- step handler
struct LeafPtrs {
  void* p; const void* g; void* m; void* v; void* vmax; void* acc; float* ema; void* comp;
  StepFn fn; uint32_t key; float clip_denom; bool decay;
};

struct StepCtx {
  const LeafPtrs* leaves;
  const Seg* segs;
  const int64_t* task_start;
  Sc sc;
};

static void step_task(void* c, int64_t t) {
  const auto* ctx = static_cast<const StepCtx*>(c);
  for (int64_t s = ctx->task_start[t]; s < ctx->task_start[t + 1]; ++s) {
    const Seg& sg = ctx->segs[s];
    const LeafPtrs& L = ctx->leaves[sg.leaf];
    L.fn(L.p, L.g, L.m, L.v, L.vmax, L.acc, L.ema, L.comp, L.key, sg.begin, sg.end, ctx->sc, L.clip_denom, L.decay);
  }
}

static ffi::Error bad(const char* msg) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, msg); }

// In-place: result buffer k must alias its argument (jax passes input_output_aliases);
// if XLA ever hands over a distinct buffer, copy the argument into it first.
static void* inplace(const ffi::AnyBuffer& in, ffi::Result<ffi::AnyBuffer>& out) {
  void* dst = out->untyped_data();
  if (dst != in.untyped_data() && in.size_bytes() > 0) std::memcpy(dst, in.untyped_data(), in.size_bytes());
  return dst;
}

// Args: scalars f32[kNumScalars], clip denominators f32[L], stochastic rounding keys u32[L], then
//   tree state (flat == 0): per leaf p, g, m, v[, vmax][, acc][, ema][, comp];
//     rets: per leaf p, m, v[, vmax][, acc][, ema][, comp];
//   flat state (flat == 1): m, v[, vmax][, acc][, ema][, comp] (1-D, all leaves, leaf i at
//     offsets[i]), then per leaf p, g; rets: the state buffers, then per leaf p.
// rounding: 0 nearest, 1 kahan (comp present), 2 stochastic.
static ffi::Error StepImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::F32> denoms,
                           ffi::Buffer<ffi::U32> keys, ffi::RemainingArgs args, ffi::RemainingRets rets,
                           ffi::Span<const int64_t> decay, ffi::Span<const int64_t> offsets, int64_t ams, int64_t acc,
                           int64_t ema, int64_t flat, int64_t rounding) {
  if (scalars.element_count() < kNumScalars) return bad("adamx: scalar operand too short");
  const bool has_comp = rounding == 1;
  const int64_t nst = 2 + (ams ? 1 : 0) + (acc ? 1 : 0) + (ema ? 1 : 0) + (has_comp ? 1 : 0);
  const int64_t nin = flat ? 2 : 2 + nst;
  const int64_t nout = flat ? 1 : 1 + nst;
  const int64_t base = flat ? nst : 0;
  const int64_t L = static_cast<int64_t>(decay.size());
  if (static_cast<int64_t>(args.size()) != base + L * nin || static_cast<int64_t>(rets.size()) != base + L * nout)
    return bad("adamx: operand count does not match the number of leaves");
  if (flat && static_cast<int64_t>(offsets.size()) != L) return bad("adamx: one offset per leaf expected");
  if (static_cast<int64_t>(denoms.element_count()) != L) return bad("adamx: clip operand has the wrong size");
  if (static_cast<int64_t>(keys.element_count()) != L) return bad("adamx: key operand has the wrong size");
  if (rounding < 0 || rounding > 2) return bad("adamx: unknown rounding mode");
  const Sc sc = read_scalars(scalars.typed_data());
  const float* den = denoms.typed_data();
  const uint32_t* key = keys.typed_data();
  // flat state buffers, in place
  char* fbuf[6] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  int64_t fcount[6] = {0, 0, 0, 0, 0, 0};
  ffi::DataType ftype[6] = {};
  if (flat) {
    for (int64_t k = 0; k < nst; ++k) {
      auto x = args.get<ffi::AnyBuffer>(k);
      auto xo = rets.get<ffi::AnyBuffer>(k);
      if (!x || !xo) return bad("adamx: could not decode a state buffer");
      fbuf[k] = static_cast<char*>(inplace(*x, *xo));
      fcount[k] = static_cast<int64_t>(x->element_count());
      ftype[k] = x->element_type();
    }
  }
  std::vector<LeafPtrs> leaves(L);
  std::vector<int64_t> sizes(L);
  for (int64_t i = 0; i < L; ++i) {
    const int64_t a0 = base + i * nin, r0 = base + i * nout;
    auto p = args.get<ffi::AnyBuffer>(a0);
    auto g = args.get<ffi::AnyBuffer>(a0 + 1);
    auto po = rets.get<ffi::AnyBuffer>(r0);
    if (!p || !g || !po) return bad("adamx: could not decode a leaf");
    const int64_t n = static_cast<int64_t>(p->element_count());
    if (static_cast<int64_t>(g->element_count()) != n) return bad("adamx: leaf buffers differ in size");
    // state pointers and dtypes: m, v[, vmax][, acc][, ema][, comp]
    void* st[6] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
    ffi::DataType sty[6] = {};
    for (int64_t k = 0; k < nst; ++k) {
      if (flat) {
        const int64_t off = offsets[i];
        if (off < 0 || off + n > fcount[k]) return bad("adamx: leaf offset outside the flat state");
        st[k] = fbuf[k] + off * static_cast<int64_t>(ffi::ByteWidth(ftype[k]));
        sty[k] = ftype[k];
      } else {
        auto x = args.get<ffi::AnyBuffer>(a0 + 2 + k);
        auto xo = rets.get<ffi::AnyBuffer>(r0 + 1 + k);
        if (!x || !xo || static_cast<int64_t>(x->element_count()) != n) return bad("adamx: bad state buffer");
        st[k] = inplace(*x, *xo);
        sty[k] = x->element_type();
      }
    }
    LeafPtrs& lp = leaves[i];
    lp.p = inplace(*p, *po);
    lp.g = g->untyped_data();
    lp.m = st[0];
    lp.v = st[1];
    lp.vmax = nullptr; lp.acc = nullptr; lp.ema = nullptr; lp.comp = nullptr;
    int64_t k = 2;
    DT acc_dt = kF32;
    if (ams) {
      if (sty[k] != sty[1]) return bad("adamx: bad nu_max buffer");
      lp.vmax = st[k++];
    }
    if (acc) {
      acc_dt = dt_of(sty[k]);
      if (acc_dt != kF32 && acc_dt != kBF16) return bad("adamx: bad accumulator buffer");
      lp.acc = st[k++];
    }
    if (ema) {
      if (sty[k] != ffi::DataType::F32) return bad("adamx: bad average buffer");
      lp.ema = static_cast<float*>(st[k++]);
    }
    const DT pdt = dt_of(p->element_type());
    const int rnd = (pdt == kBF16 || pdt == kF16) ? static_cast<int>(rounding) : 0;  // float32 params: nearest
    if (has_comp) {
      if (sty[k] != p->element_type()) return bad("adamx: bad compensation buffer");
      if (rnd) lp.comp = st[k];
      ++k;
    }
    lp.fn = pick_step(pdt, dt_of(g->element_type()), dt_of(sty[0]), dt_of(sty[1]), acc_dt, rnd, ams != 0, acc != 0,
                      ema != 0);
    if (lp.fn == nullptr) return bad("adamx: unsupported dtype combination");
    lp.key = key[i];
    lp.clip_denom = den[i];
    lp.decay = decay[i] != 0;
    sizes[i] = n;
  }
  std::vector<Seg> segs;
  std::vector<int64_t> task_start;
  make_tasks(sizes, &segs, &task_start);
  const int64_t ntasks = static_cast<int64_t>(task_start.size()) - 1;
  if (ntasks <= 0) return ffi::Error::Success();
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  StepCtx ctx{leaves.data(), segs.data(), task_start.data(), sc};
  parallel_for(pool, ntasks, total, &step_task, &ctx);
  return ffi::Error::Success();
}


// ---------------------------------------------------------------- 8-bit moments (quantize_moments)
// Per quantization block: decode m, v (and v_max) to float32, run step_segment on the
// block (the float32 step, the same arithmetic and FMA contractions as above), encode the
// new moments (adamx/_quant8.h). One pass: the block's float32 moments live in a small
// scratch buffer. On an accumulation micro-step the moments do not move: codes and
// scales are left as they are (re-encoding decoded values would not give them back).
namespace q8 = adamx::quant8;

struct QMaps {  // mu: the signed dynamic map; nu, nu_max: the unsigned one
  const q8::TableEncoder* m_enc;
  const q8::TableEncoder* v_enc;
  const q8::TableDecoder* m_dec;
  const q8::TableDecoder* v_dec;
};

// One leaf with coded moments (8-bit, fp8 or 4-bit): params, grads, codes and scales of m, v
// (and v_max), the float32 accumulator and average, in place.
struct CodedPtrs {
  void* p; const void* g;
  uint8_t* mc; float* ms; uint8_t* vc; float* vs; uint8_t* xc; float* xs;
  float* acc; float* ema;
  float clip_denom; bool decay;
};

// What a coded leaf's codes and scales must be: element counts and the codes' dtype.
struct CodedLayout {
  int64_t codes, scales;
  ffi::DataType code_t;
};

struct QLeaf : CodedPtrs {
  void (*fn)(const QLeaf&, const QMaps&, int64_t, int64_t, int64_t, const Sc&);
};

// The encoders' tables (2 x 256 KiB) are built once per pair of code maps and kept (the
// maps are the same constants on every call); a call holds its own reference.
struct QTables {
  float maps[512];
  q8::TableEncoder m_enc, v_enc;
  q8::TableDecoder m_dec, v_dec;
  explicit QTables(const float* m) : m_enc(m), v_enc(m + 256), m_dec(m), v_dec(m + 256) {
    std::memcpy(maps, m, sizeof maps);
  }
};

static std::shared_ptr<const QTables> q_tables(const float* maps) {
  static std::mutex mu;
  static std::shared_ptr<const QTables> last;
  std::lock_guard<std::mutex> lock(mu);
  if (!last || std::memcmp(last->maps, maps, sizeof last->maps) != 0) last = std::make_shared<const QTables>(maps);
  return last;
}

// Per-thread scratch for one block's float32 moments (grown once, never per segment).
static float* q_scratch(int64_t floats) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < floats) buf.resize(static_cast<size_t>(floats));
  return buf.data();
}

template <typename P, typename G, bool AMS, bool ACC, bool EMA>
static void qstep_segment(const QLeaf& L, const QMaps& mp, int64_t b, int64_t e, int64_t bs, const Sc& s) {
  float* mf = q_scratch(3 * bs);
  float* vf = mf + bs;
  float* xf = vf + bs;
  P* p = static_cast<P*>(L.p);
  const G* g = static_cast<const G*>(L.g);
  const bool real = s.is_real || !ACC;
  for (int64_t start = b; start < e; start += bs) {
    const int64_t n = std::min(bs, e - start), blk = start / bs;
    const size_t un = static_cast<size_t>(n);
    q8::decode_block(*mp.m_dec, L.mc + start, L.ms[blk], un, mf);
    q8::decode_block(*mp.v_dec, L.vc + start, L.vs[blk], un, vf);
    if constexpr (AMS) q8::decode_block(*mp.v_dec, L.xc + start, L.xs[blk], un, xf);
    // 8-bit moments: float32 accumulator, nearest rounding (the plan refuses the others)
    step_segment<P, G, float, float, float, 0, AMS, ACC, EMA>(p + start, g + start, mf, vf, xf,
                                                              ACC ? L.acc + start : nullptr,
                                                              EMA ? L.ema + start : nullptr, nullptr, 0u, 0, n, s,
                                                              L.clip_denom, L.decay);
    if (real) {
      q8::encode_block(*mp.m_enc, mf, un, L.mc + start, L.ms + blk);
      q8::encode_block(*mp.v_enc, vf, un, L.vc + start, L.vs + blk);
      if constexpr (AMS) q8::encode_block(*mp.v_enc, xf, un, L.xc + start, L.xs + blk);
    }
  }
}

using QStepFn = void (*)(const QLeaf&, const QMaps&, int64_t, int64_t, int64_t, const Sc&);

// The step of a coded leaf as a function pointer: K::fn<P, G, AMS, ACC, EMA> for the leaf's
// param and grad dtypes and the flags (amsgrad, accumulation, EMA); nullptr for other dtypes.
template <typename K, typename P, typename G>
static typename K::Fn coded_flags(bool ams, bool acc, bool ema) {
  const int k = (ams ? 4 : 0) | (acc ? 2 : 0) | (ema ? 1 : 0);
  switch (k) {
    case 0: return K::template fn<P, G, false, false, false>;
    case 1: return K::template fn<P, G, false, false, true>;
    case 2: return K::template fn<P, G, false, true, false>;
    case 3: return K::template fn<P, G, false, true, true>;
    case 4: return K::template fn<P, G, true, false, false>;
    case 5: return K::template fn<P, G, true, false, true>;
    case 6: return K::template fn<P, G, true, true, false>;
    default: return K::template fn<P, G, true, true, true>;
  }
}

template <typename K>
static typename K::Fn coded_pick(DT p, DT g, bool ams, bool acc, bool ema) {
  if (p == kF32 && g == kF32) return coded_flags<K, float, float>(ams, acc, ema);
  if (p == kBF16 && g == kBF16) return coded_flags<K, bf16_t, bf16_t>(ams, acc, ema);
  if (p == kBF16 && g == kF32) return coded_flags<K, bf16_t, float>(ams, acc, ema);
  if (p == kF16 && g == kF16) return coded_flags<K, f16_t, f16_t>(ams, acc, ema);
  if (p == kF16 && g == kF32) return coded_flags<K, f16_t, float>(ams, acc, ema);
  return nullptr;
}

struct Q8Kernel {
  using Fn = QStepFn;
  template <typename P, typename G, bool AMS, bool ACC, bool EMA>
  static constexpr Fn fn = &qstep_segment<P, G, AMS, ACC, EMA>;
};

struct QStepCtx {
  const QLeaf* leaves;
  const Seg* segs;
  const int64_t* task_start;
  QMaps maps;
  int64_t bs;
  Sc sc;
};

static void qstep_task(void* c, int64_t t) {
  const auto* ctx = static_cast<const QStepCtx*>(c);
  for (int64_t s = ctx->task_start[t]; s < ctx->task_start[t + 1]; ++s) {
    const Seg& sg = ctx->segs[s];
    const QLeaf& L = ctx->leaves[sg.leaf];
    L.fn(L, ctx->maps, sg.begin, sg.end, ctx->bs, ctx->sc);
  }
}

// The operand counts of a coded call (see coded_leaf) for L leaves, or an error message.
static const char* coded_counts(const ffi::RemainingArgs& args, const ffi::RemainingRets& rets, int64_t L,
                                int64_t ndenoms, bool ams, bool acc, bool ema) {
  const int64_t nst = 4 + (ams ? 2 : 0) + (acc ? 1 : 0) + (ema ? 1 : 0);
  if (static_cast<int64_t>(args.size()) != L * (2 + nst) || static_cast<int64_t>(rets.size()) != L * (1 + nst))
    return "adamx: operand count does not match the number of leaves";
  if (ndenoms != L) return "adamx: clip operand has the wrong size";
  return nullptr;
}

// Runs the coded leaves of `sizes` on the pool in segments of whole blocks:
// run(segs, task_start, ntasks, total elements) builds the call's context and runs it.
template <typename Run>
static void run_blocks(const std::vector<int64_t>& sizes, int64_t block, Run run) {
  std::vector<Seg> segs;
  std::vector<int64_t> task_start;
  make_tasks(sizes, &segs, &task_start, std::max<int64_t>(1, kSeg / block) * block);
  const int64_t ntasks = static_cast<int64_t>(task_start.size()) - 1;
  if (ntasks <= 0) return;
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  run(segs.data(), task_start.data(), ntasks, total);
}

// Leaf i's operands of a coded call (args per leaf: p, g, m codes, m scales, v codes, v scales
// [, v_max codes, v_max scales][, acc][, ema]; rets: the same less g), checked against the
// layout (layout_of(n): n the leaf's size) and taken in place. Returns an error message or nullptr.
template <typename LayoutOf>
static const char* coded_leaf(ffi::RemainingArgs& args, ffi::RemainingRets& rets, int64_t i, bool ams, bool acc,
                              bool ema, LayoutOf layout_of, CodedPtrs* out, int64_t* size, DT* pdt, DT* gdt) {
  const int64_t nq = 4 + (ams ? 2 : 0);
  const int64_t nst = nq + (acc ? 1 : 0) + (ema ? 1 : 0);
  const int64_t a0 = i * (2 + nst), r0 = i * (1 + nst);
  auto p = args.get<ffi::AnyBuffer>(a0);
  auto g = args.get<ffi::AnyBuffer>(a0 + 1);
  auto po = rets.get<ffi::AnyBuffer>(r0);
  if (!p || !g || !po) return "adamx: could not decode a leaf";
  const int64_t n = static_cast<int64_t>(p->element_count());
  if (static_cast<int64_t>(g->element_count()) != n) return "adamx: leaf buffers differ in size";
  const CodedLayout lay = layout_of(n);
  if (lay.codes < 0) return "adamx: a leaf does not fit the moment format's blocks";
  void* st[8] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  for (int64_t k = 0; k < nst; ++k) {
    auto x = args.get<ffi::AnyBuffer>(a0 + 2 + k);
    auto xo = rets.get<ffi::AnyBuffer>(r0 + 1 + k);
    if (!x || !xo) return "adamx: bad state buffer";
    const bool is_codes = k < nq && k % 2 == 0;
    const int64_t want_n = k < nq ? (is_codes ? lay.codes : lay.scales) : n;
    const ffi::DataType want_t = is_codes ? lay.code_t : ffi::DataType::F32;
    if (static_cast<int64_t>(x->element_count()) != want_n || x->element_type() != want_t)
      return "adamx: bad quantized state buffer (codes, scales f32[blocks], acc/ema f32[n])";
    st[k] = inplace(*x, *xo);
  }
  out->p = inplace(*p, *po);
  out->g = g->untyped_data();
  out->mc = static_cast<uint8_t*>(st[0]); out->ms = static_cast<float*>(st[1]);
  out->vc = static_cast<uint8_t*>(st[2]); out->vs = static_cast<float*>(st[3]);
  out->xc = nullptr; out->xs = nullptr; out->acc = nullptr; out->ema = nullptr;
  int64_t k = 4;
  if (ams) {
    out->xc = static_cast<uint8_t*>(st[4]);
    out->xs = static_cast<float*>(st[5]);
    k = 6;
  }
  if (acc) out->acc = static_cast<float*>(st[k++]);
  if (ema) out->ema = static_cast<float*>(st[k++]);
  *size = n;
  *pdt = dt_of(p->element_type());
  *gdt = dt_of(g->element_type());
  return nullptr;
}

// 8-bit moments, tree state. Args: scalars f32[kNumScalars], clip denominators f32[L],
// code maps f32[512] (signed then unsigned), then per leaf p, g, m codes u8[n], m scales
// f32[nb], v codes, v scales[, v_max codes, v_max scales][, acc][, ema]; rets per leaf:
// p, m codes, m scales, v codes, v scales[, v_max codes, scales][, acc][, ema], in place.
// block: the quantization block size; nb = ceil(n / block).
static ffi::Error QStepImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::F32> denoms,
                            ffi::Buffer<ffi::F32> maps, ffi::RemainingArgs args, ffi::RemainingRets rets,
                            ffi::Span<const int64_t> decay, int64_t ams, int64_t acc, int64_t ema, int64_t block) {
  if (scalars.element_count() < kNumScalars) return bad("adamx: scalar operand too short");
  if (maps.element_count() != 512) return bad("adamx: code maps must be f32[512]");
  if (block < 1) return bad("adamx: block size must be positive");
  const int64_t L = static_cast<int64_t>(decay.size());
  const char* counts = coded_counts(args, rets, L, static_cast<int64_t>(denoms.element_count()), ams, acc, ema);
  if (counts != nullptr) return bad(counts);
  const Sc sc = read_scalars(scalars.typed_data());
  const float* den = denoms.typed_data();
  const std::shared_ptr<const QTables> tables = q_tables(maps.typed_data());
  std::vector<QLeaf> leaves(L);
  std::vector<int64_t> sizes(L);
  const auto layout = [block](int64_t n) { return CodedLayout{n, (n + block - 1) / block, ffi::DataType::U8}; };
  for (int64_t i = 0; i < L; ++i) {
    DT pdt = kBad, gdt = kBad;
    const char* err = coded_leaf(args, rets, i, ams != 0, acc != 0, ema != 0, layout, &leaves[i], &sizes[i], &pdt, &gdt);
    if (err != nullptr) return bad(err);
    leaves[i].clip_denom = den[i];
    leaves[i].decay = decay[i] != 0;
    leaves[i].fn = coded_pick<Q8Kernel>(pdt, gdt, ams != 0, acc != 0, ema != 0);
    if (leaves[i].fn == nullptr) return bad("adamx: unsupported dtype combination");
  }
  run_blocks(sizes, block, [&](const Seg* segs, const int64_t* task_start, int64_t ntasks, int64_t total) {
    QStepCtx ctx{leaves.data(), segs, task_start, QMaps{&tables->m_enc, &tables->v_enc, &tables->m_dec, &tables->v_dec}, block, sc};
    parallel_for(pool, ntasks, total, &qstep_task, &ctx);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- fp8 / 4-bit moments (moment_format)
// The same one-pass scheme as the 8-bit kernel above, with torchao's codecs (adamx/_lowbit.h):
// per block, decode m, v (and v_max) to float32, step_segment on the block, encode. Leaves
// are whole blocks (the codecs only take such leaves), so a block never spans segments.
namespace lb = adamx::lowbit;

struct LMaps {  // the 4-bit tables: mu's signed map, nu/nu_max's k/16 map (unused by fp8)
  lb::Q4Map m, v;
};

struct LLeaf : CodedPtrs {
  void (*fn)(const LLeaf&, const LMaps&, int64_t, int64_t, const Sc&);
};

enum LFormat { kFp8 = 1, kQ4 = 2 };
// Elements per step_segment call (the float32 scratch of m, v, v_max: 12 KiB, in L1), and how
// many such chunks ahead the step prefetches params, grads and codes.
constexpr int64_t kLowbitChunk = 1024, kLowbitAhead = 1;

template <int FMT> struct LCodec;
template <> struct LCodec<kFp8> {  // e4m3fn codes in the param's shape, block 256
  static constexpr int64_t kBlock = 256, kPerByte = 1;
  static void decode(const lb::Q4Map&, const uint8_t* c, float s, float* out) {
    lb::fp8_decode_block(c, s, kBlock, out);
  }
  static void encode(const lb::Q4Map&, const float* x, uint8_t* c, float* s) { lb::fp8_encode_block(x, kBlock, c, s); }
};
template <> struct LCodec<kQ4> {  // two 4-bit codes per byte, block 128
  static constexpr int64_t kBlock = 128, kPerByte = 2;
  static_assert(kBlock <= static_cast<int64_t>(lb::kQ4MaxBlock), "the 4-bit codec's scratch holds one block");
  static void decode(const lb::Q4Map& q, const uint8_t* c, float s, float* out) {
    lb::q4_decode_block(q, c, s, kBlock, out);
  }
  static void encode(const lb::Q4Map& q, const float* x, uint8_t* c, float* s) {
    lb::q4_encode_block(q, x, kBlock, c, s);
  }
};

template <int FMT, typename P, typename G, bool AMS, bool ACC, bool EMA>
static void lstep_segment(const LLeaf& L, const LMaps& mp, int64_t b, int64_t e, const Sc& s) {
  using C = LCodec<FMT>;
  constexpr int64_t bs = C::kBlock, chunk = kLowbitChunk;  // chunk: whole blocks, one step_segment call
  static_assert(chunk % bs == 0, "a chunk holds whole blocks");
  alignas(64) float mf[chunk], vf[chunk], xf[AMS ? chunk : 1];
  P* p = static_cast<P*>(L.p);
  const G* g = static_cast<const G*>(L.g);
  const bool real = s.is_real || !ACC;
  for (int64_t start = b; start < e; start += chunk) {
    const int64_t n = std::min(chunk, e - start);  // segments hold whole blocks
    // Prefetch the params, grads and codes kLowbitAhead chunks ahead: the phases (decode,
    // step, encode) are short loops, in which the hardware prefetchers alone left the streamed
    // step waiting on memory (1.5x the time, one thread, benchmarks/cpp/quantized_codec.cc).
    {
      const int64_t pb = start + kLowbitAhead * chunk, pe = std::min(e, pb + chunk);
      for (int64_t k = pb; k < pe; k += 16) {
        __builtin_prefetch(p + k, 1);
        __builtin_prefetch(g + k, 0);
      }
      for (int64_t k = pb / C::kPerByte; k < pe / C::kPerByte; k += 64) {
        __builtin_prefetch(L.mc + k, 1);
        __builtin_prefetch(L.vc + k, 1);
        if constexpr (AMS) __builtin_prefetch(L.xc + k, 1);
      }
    }
    for (int64_t k = 0; k < n; k += bs) {
      const int64_t blk = (start + k) / bs, c0 = (start + k) / C::kPerByte;
      C::decode(mp.m, L.mc + c0, L.ms[blk], mf + k);
      C::decode(mp.v, L.vc + c0, L.vs[blk], vf + k);
      if constexpr (AMS) C::decode(mp.v, L.xc + c0, L.xs[blk], xf + k);
    }
    // float32 accumulator, nearest rounding (the plan refuses the others, as for 8-bit)
    step_segment<P, G, float, float, float, 0, AMS, ACC, EMA>(p + start, g + start, mf, vf, xf,
                                                              ACC ? L.acc + start : nullptr,
                                                              EMA ? L.ema + start : nullptr, nullptr, 0u, 0, n, s,
                                                              L.clip_denom, L.decay);
    if (!real) continue;  // a micro-step leaves codes and scales as they are (as the reference's lax.cond)
    for (int64_t k = 0; k < n; k += bs) {
      const int64_t blk = (start + k) / bs, c0 = (start + k) / C::kPerByte;
      C::encode(mp.m, mf + k, L.mc + c0, L.ms + blk);
      C::encode(mp.v, vf + k, L.vc + c0, L.vs + blk);
      if constexpr (AMS) C::encode(mp.v, xf + k, L.xc + c0, L.xs + blk);
    }
  }
}

using LStepFn = void (*)(const LLeaf&, const LMaps&, int64_t, int64_t, const Sc&);

template <int FMT>
struct LKernel {
  using Fn = LStepFn;
  template <typename P, typename G, bool AMS, bool ACC, bool EMA>
  static constexpr Fn fn = &lstep_segment<FMT, P, G, AMS, ACC, EMA>;
};

static LStepFn lpick_step(int64_t fmt, DT p, DT g, bool ams, bool acc, bool ema) {
  if (fmt == kFp8) return coded_pick<LKernel<kFp8>>(p, g, ams, acc, ema);
  if (fmt == kQ4) return coded_pick<LKernel<kQ4>>(p, g, ams, acc, ema);
  return nullptr;
}

struct LStepCtx {
  const LLeaf* leaves;
  const Seg* segs;
  const int64_t* task_start;
  const LMaps* maps;
  Sc sc;
};

static void lstep_task(void* c, int64_t t) {
  const auto* ctx = static_cast<const LStepCtx*>(c);
  for (int64_t s = ctx->task_start[t]; s < ctx->task_start[t + 1]; ++s) {
    const Seg& sg = ctx->segs[s];
    const LLeaf& L = ctx->leaves[sg.leaf];
    L.fn(L, *ctx->maps, sg.begin, sg.end, ctx->sc);
  }
}

// fp8 / 4-bit moments, tree state. Args: scalars f32[kNumScalars], clip denominators f32[L],
// 4-bit tables f32[62] (mu: 16 map values, 15 thresholds; then nu's), then per leaf p, g,
// m codes, m scales, v codes, v scales[, v_max codes, v_max scales][, acc][, ema]; rets per
// leaf: p, the state in the same order, in place. format: 1 fp8 (codes f8e4m3fn[n], scales
// f32[n / 256]), 2 4-bit (codes u8[n / 2], scales f32[n / 128]); n a multiple of the block.
static ffi::Error LStepImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::F32> denoms,
                            ffi::Buffer<ffi::F32> tables, ffi::RemainingArgs args, ffi::RemainingRets rets,
                            ffi::Span<const int64_t> decay, int64_t ams, int64_t acc, int64_t ema, int64_t format) {
  if (scalars.element_count() < kNumScalars) return bad("adamx: scalar operand too short");
  if (tables.element_count() != 62) return bad("adamx: 4-bit tables must be f32[62]");
  if (format != kFp8 && format != kQ4) return bad("adamx: unknown moment format");
  const int64_t block = format == kFp8 ? LCodec<kFp8>::kBlock : LCodec<kQ4>::kBlock;
  const int64_t per_byte = format == kFp8 ? 1 : 2;
  const ffi::DataType code_t = format == kFp8 ? ffi::DataType::F8E4M3FN : ffi::DataType::U8;
  const int64_t L = static_cast<int64_t>(decay.size());
  const char* counts = coded_counts(args, rets, L, static_cast<int64_t>(denoms.element_count()), ams, acc, ema);
  if (counts != nullptr) return bad(counts);
  const Sc sc = read_scalars(scalars.typed_data());
  const float* den = denoms.typed_data();
  LMaps maps;
  const float* t = tables.typed_data();
  std::memcpy(maps.m.value, t, 16 * sizeof(float));
  std::memcpy(maps.m.thr, t + 16, 15 * sizeof(float));
  std::memcpy(maps.v.value, t + 31, 16 * sizeof(float));
  std::memcpy(maps.v.thr, t + 47, 15 * sizeof(float));
  std::vector<LLeaf> leaves(L);
  std::vector<int64_t> sizes(L);
  const auto layout = [block, per_byte, code_t](int64_t n) {
    return n % block ? CodedLayout{-1, -1, code_t} : CodedLayout{n / per_byte, n / block, code_t};
  };
  for (int64_t i = 0; i < L; ++i) {
    DT pdt = kBad, gdt = kBad;
    const char* err = coded_leaf(args, rets, i, ams != 0, acc != 0, ema != 0, layout, &leaves[i], &sizes[i], &pdt, &gdt);
    if (err != nullptr) return bad(err);
    leaves[i].clip_denom = den[i];
    leaves[i].decay = decay[i] != 0;
    leaves[i].fn = lpick_step(format, pdt, gdt, ams != 0, acc != 0, ema != 0);
    if (leaves[i].fn == nullptr) return bad("adamx: unsupported dtype combination");
  }
  run_blocks(sizes, block, [&](const Seg* segs, const int64_t* task_start, int64_t ntasks, int64_t total) {
    LStepCtx ctx{leaves.data(), segs, task_start, &maps, sc};
    parallel_for(pool, ntasks, total, &lstep_task, &ctx);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- 8-bit moments on the update path
// adamx.adam(quantize_moments=True).update on XLA:CPU (adamx/_step.py, moments_coded): per
// 8-bit leaf, the moments without the params. Per block: decode m, v (and v_max), the float32
// step (step_segment itself, so the arithmetic and FMA contractions are the fused step's),
// the direction d = m * alpha / (sqrt(v_u) + eps) out, the new moments encoded; the caller
// (XLA) does the rest of the step from d. The gradient arrives unscaled, averaged and
// clipped, as a float32 array; the caller passes it only where it is no product (no
// loss_scale_factor, accumulation or clipping by norm), where XLA's g - m is step_segment's
// fma(g, 1, -m). step_segment's params are the d block preset to -0.0 (float32, nearest, no
// decay, no EMA): it stores -0.0 + u = u = -d exactly, and d is its negation. The leaf is a
// QLeaf whose p is the direction's buffer (float32), run by qstep_task; acc and ema are unused.
template <bool AMS>
static void qdir_segment(const QLeaf& L, const QMaps& mp, int64_t b, int64_t e, int64_t bs, const Sc& s) {
  float* mf = q_scratch(3 * bs);
  float* vf = mf + bs;
  float* xf = vf + bs;
  const float* g = static_cast<const float*>(L.g);
  for (int64_t start = b; start < e; start += bs) {
    const int64_t n = std::min(bs, e - start), blk = start / bs;
    const size_t un = static_cast<size_t>(n);
    q8::decode_block(*mp.m_dec, L.mc + start, L.ms[blk], un, mf);
    q8::decode_block(*mp.v_dec, L.vc + start, L.vs[blk], un, vf);
    if constexpr (AMS) q8::decode_block(*mp.v_dec, L.xc + start, L.xs[blk], un, xf);
    float* d = static_cast<float*>(L.p) + start;
    std::fill(d, d + n, -0.0f);
    step_segment<float, float, float, float, float, 0, AMS, false, false>(d, g + start, mf, vf, xf, nullptr, nullptr,
                                                                         nullptr, 0u, 0, n, s, 1.0f, false);
    for (int64_t j = 0; j < n; ++j) d[j] = -d[j];
    q8::encode_block(*mp.m_enc, mf, un, L.mc + start, L.ms + blk);
    q8::encode_block(*mp.v_enc, vf, un, L.vc + start, L.vs + blk);
    if constexpr (AMS) q8::encode_block(*mp.v_enc, xf, un, L.xc + start, L.xs + blk);
  }
}

// One 8-bit leaf of n elements. Args: scalars f32[kNumScalars] (adamx._step.Scalars; only c1,
// c2, alpha, eps are read), code maps f32[512] (signed then unsigned), g f32[n], m codes u8[n],
// m scales f32[nb], v codes, v scales[, v_max codes, v_max scales]; rets: d f32[n], then the
// new codes and scales in the order of the args (in place). nb = ceil(n / block).
static ffi::Error QDirImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::F32> maps,
                           ffi::Buffer<ffi::F32> g, ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t ams,
                           int64_t block) {
  if (scalars.element_count() < kNumScalars) return bad("adamx: scalar operand too short");
  if (maps.element_count() != 512) return bad("adamx: code maps must be f32[512]");
  if (block < 1) return bad("adamx: block size must be positive");
  const int64_t nq = ams ? 6 : 4;
  if (static_cast<int64_t>(args.size()) != nq || static_cast<int64_t>(rets.size()) != nq + 1)
    return bad("adamx: the 8-bit moments call takes codes and scales of m, v[, v_max]");
  const int64_t n = static_cast<int64_t>(g.element_count());
  const int64_t nb = (n + block - 1) / block;
  auto d = rets.get<ffi::Buffer<ffi::F32>>(0);
  if (!d || static_cast<int64_t>((*d)->element_count()) != n) return bad("adamx: bad direction buffer");
  void* st[6] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  for (int64_t k = 0; k < nq; ++k) {
    auto x = args.get<ffi::AnyBuffer>(k);
    auto xo = rets.get<ffi::AnyBuffer>(k + 1);
    if (!x || !xo) return bad("adamx: bad 8-bit state buffer");
    const bool is_codes = k % 2 == 0;
    const ffi::DataType want_t = is_codes ? ffi::DataType::U8 : ffi::DataType::F32;
    if (static_cast<int64_t>(x->element_count()) != (is_codes ? n : nb) || x->element_type() != want_t)
      return bad("adamx: bad 8-bit state buffer (codes u8[n], scales f32[ceil(n / block)])");
    st[k] = inplace(*x, *xo);
  }
  Sc sc = read_scalars(scalars.typed_data());
  sc.has_lsf = false;  // the gradient arrives unscaled, averaged and clipped
  sc.is_real = true;
  sc.clip_mode = 0;
  const std::shared_ptr<const QTables> tables = q_tables(maps.typed_data());
  QLeaf leaf{};
  leaf.p = (*d)->typed_data();
  leaf.g = g.typed_data();
  leaf.mc = static_cast<uint8_t*>(st[0]); leaf.ms = static_cast<float*>(st[1]);
  leaf.vc = static_cast<uint8_t*>(st[2]); leaf.vs = static_cast<float*>(st[3]);
  leaf.xc = static_cast<uint8_t*>(st[4]); leaf.xs = static_cast<float*>(st[5]);
  leaf.fn = ams ? &qdir_segment<true> : &qdir_segment<false>;
  std::vector<Seg> segs;
  std::vector<int64_t> task_start;
  make_tasks({n}, &segs, &task_start, std::max<int64_t>(1, kSeg / block) * block);
  const int64_t ntasks = static_cast<int64_t>(task_start.size()) - 1;
  if (ntasks <= 0) return ffi::Error::Success();
  QStepCtx ctx{&leaf, segs.data(), task_start.data(),
               QMaps{&tables->m_enc, &tables->v_enc, &tables->m_dec, &tables->v_dec}, block, sc};
  parallel_for(pool, ntasks, n, &qstep_task, &ctx);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- sum of squares handler
struct SumCtx {
  const std::vector<const void*>* g;
  const std::vector<const void*>* acc;
  const std::vector<SumFn>* fn;
  const Seg* segs;
  const int64_t* task_start;
  double* partial;  // one per segment
  Sc sc;
};

static void sum_task(void* c, int64_t t) {
  const auto* ctx = static_cast<const SumCtx*>(c);
  for (int64_t s = ctx->task_start[t]; s < ctx->task_start[t + 1]; ++s) {
    const Seg& sg = ctx->segs[s];
    ctx->partial[s] = (*ctx->fn)[sg.leaf]((*ctx->g)[sg.leaf], (*ctx->acc)[sg.leaf], sg.begin, sg.end, ctx->sc.has_lsf,
                                          ctx->sc.lsf, ctx->sc.kf);
  }
}

// Per-leaf sum of squares of the gradient as the update would see it before clipping.
// Args: scalars, then per leaf g[, acc] (flat == 0), or [acc (1-D, leaf i at
// offsets[i]),] then per leaf g (flat == 1). Ret: f32[L]. Deterministic: partial sums
// are combined in a fixed order whatever thread computed them.
static ffi::Error SumsqImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args,
                            ffi::Result<ffi::Buffer<ffi::F32>> out, ffi::Span<const int64_t> offsets, int64_t acc,
                            int64_t flat) {
  if (scalars.element_count() < kNumScalars) return bad("adamx: scalar operand too short");
  const int64_t nin = (acc && !flat) ? 2 : 1;
  const int64_t base = (acc && flat) ? 1 : 0;
  const int64_t L = static_cast<int64_t>(out->element_count());
  if (static_cast<int64_t>(args.size()) != base + L * nin) return bad("adamx: operand count does not match");
  if (flat && static_cast<int64_t>(offsets.size()) != L) return bad("adamx: one offset per leaf expected");
  const char* flat_acc = nullptr;
  int64_t flat_count = 0;
  DT flat_dt = kF32;
  if (base) {
    auto a = args.get<ffi::AnyBuffer>(0);
    if (!a) return bad("adamx: bad accumulator buffer");
    flat_dt = dt_of(a->element_type());
    if (flat_dt != kF32 && flat_dt != kBF16) return bad("adamx: bad accumulator buffer");
    flat_acc = static_cast<const char*>(a->untyped_data());
    flat_count = static_cast<int64_t>(a->element_count());
  }
  const Sc sc = read_scalars(scalars.typed_data());
  float* res = out->typed_data();
  std::vector<const void*> gp(L);
  std::vector<const void*> ap(L, nullptr);
  std::vector<SumFn> fns(L);
  std::vector<int64_t> sizes(L);
  for (int64_t i = 0; i < L; ++i) {
    auto g = args.get<ffi::AnyBuffer>(base + i * nin);
    if (!g) return bad("adamx: could not decode a gradient");
    gp[i] = g->untyped_data();
    sizes[i] = static_cast<int64_t>(g->element_count());
    DT acc_dt = flat_dt;
    if (acc && flat) {
      if (offsets[i] < 0 || offsets[i] + sizes[i] > flat_count) return bad("adamx: leaf offset outside the flat state");
      ap[i] = flat_acc + offsets[i] * (flat_dt == kBF16 ? 2 : 4);
    } else if (acc) {
      auto a = args.get<ffi::AnyBuffer>(i * nin + 1);
      if (!a || static_cast<int64_t>(a->element_count()) != sizes[i]) return bad("adamx: bad accumulator buffer");
      acc_dt = dt_of(a->element_type());
      ap[i] = a->untyped_data();
    }
    fns[i] = pick_sum(dt_of(g->element_type()), acc != 0, acc_dt);
    if (fns[i] == nullptr) return bad("adamx: unsupported gradient or accumulator dtype");
  }
  if (!sc.is_real) {  // gradient-accumulation micro-step: no clipping happens
    for (int64_t i = 0; i < L; ++i) res[i] = 0.0f;
    return ffi::Error::Success();
  }
  std::vector<Seg> segs;
  std::vector<int64_t> task_start;
  make_tasks(sizes, &segs, &task_start);
  std::vector<double> partial(segs.size(), 0.0);
  const int64_t ntasks = static_cast<int64_t>(task_start.size()) - 1;
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  if (ntasks > 0) {
    SumCtx ctx{&gp, &ap, &fns, segs.data(), task_start.data(), partial.data(), sc};
    parallel_for(pool, ntasks, total, &sum_task, &ctx);
  }
  std::vector<double> per_leaf(L, 0.0);
  for (size_t s = 0; s < segs.size(); ++s) per_leaf[segs[s].leaf] += partial[s];
  for (int64_t i = 0; i < L; ++i) res[i] = static_cast<float>(per_leaf[i]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamxFusedStep, StepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("decay")
                                  .Attr<ffi::Span<const int64_t>>("offsets")
                                  .Attr<int64_t>("ams")
                                  .Attr<int64_t>("acc")
                                  .Attr<int64_t>("ema")
                                  .Attr<int64_t>("flat")
                                  .Attr<int64_t>("rounding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamxFusedStepQ8, QStepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("decay")
                                  .Attr<int64_t>("ams")
                                  .Attr<int64_t>("acc")
                                  .Attr<int64_t>("ema")
                                  .Attr<int64_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamxFusedStepLowbit, LStepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("decay")
                                  .Attr<int64_t>("ams")
                                  .Attr<int64_t>("acc")
                                  .Attr<int64_t>("ema")
                                  .Attr<int64_t>("format"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamxFusedSumsq, SumsqImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("offsets")
                                  .Attr<int64_t>("acc")
                                  .Attr<int64_t>("flat"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamxFusedMomentsQ8, QDirImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("ams")
                                  .Attr<int64_t>("block"));

extern "C" int adamx_fused_abi_version() { return 5; }

#define ADAMX_NAME(e, n) #n ","
extern "C" const char* adamx_fused_scalar_names() { return ADAMX_SCALARS(ADAMX_NAME); }
#undef ADAMX_NAME
