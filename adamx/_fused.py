"""The fused Adam step: ``apply_gradients`` (one pass per step on XLA:CPU).

``adamx.adam``'s ``update`` returns optax ``updates``; the caller then adds them to the
params (``optax.apply_updates``). XLA:CPU cannot write several arrays from one loop, so
that step compiles to three full-size loops per leaf (new ``mu``, new ``nu``, new
params), about 40 bytes moved per float32 parameter where 28 suffice.

:func:`apply_gradients` does ``update`` + ``apply_updates`` in one call. On CPU it runs
a small C++ kernel (through ``jax.ffi``) that reads params, grads and moments once and
writes params and moments back in place, for all leaves in one call. The kernel is
compiled from the source below with the machine's C++ compiler on first use and cached
(``$ADAMX_CACHE_DIR``, else ``~/.cache/adamx``). Where it cannot apply (no compiler,
not CPU, sharded arrays, unusual dtypes, ``None`` gradients, an optimizer that is not
an ``adamx.adam``), it falls back to ``tx.update`` + ``optax.apply_updates``: the same
numbers, only slower. ``ADAMX_FUSED=0`` switches the kernel off.

The kernel mirrors the reference arithmetic of ``adamx.adam`` op by op in float32
(with XLA:CPU's FMA contraction and denormal flushing), so on the same machine its
results equal ``update`` + ``apply_updates`` to the last bit, except for the norms of
``clipnorm``/``global_clipnorm``, which are summed in another order (a float32
rounding apart).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamx import _averaging, _clipping, _decay, _tree
from adamx._flat import FlatBuffers

log = logging.getLogger("adamx")

_SRC = r"""// adamx fused Adam step for XLA:CPU (jax.ffi). One pass over every leaf:
// reads params, grads, mu, nu (+ nu_max, acc, ema) and writes them back in place.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define ADAMX_HAS_MXCSR 1
#endif

#include "xla/ffi/api/ffi.h"

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
// Layout of the f32 scalar operand (filled by adamx/_fused.py; keep in sync).
enum {
  kC1, kC2, kAlpha, kEps, kLr, kWd, kLsf, kHasLsf, kK, kIsReal,
  kClipMode, kClipC, kClipScale, kMom, kOneM, kOverwrite, kNumScalars
};

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

// ---------------------------------------------------------------- per-segment kernels
// The arithmetic below mirrors adamx.adam's reference update (adamx/_adam.py) op by op,
// in float32; every feature switch is a select on values computed unconditionally, so
// the loop stays branch-free and vectorizes.
template <typename P, typename G, typename M, typename V, bool AMS, bool ACC, bool EMA>
static void step_segment(P* __restrict p, const G* __restrict g, M* __restrict m, V* __restrict v,
                         V* __restrict vmax, float* __restrict acc, float* __restrict ema, int64_t b,
                         int64_t e, const Sc& s, float clip_denom, bool decay) {
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
  // XLA rewrites x / scalar as x * (1 / scalar); so does the kernel.
  const float inv_lsf = 1.0f / lsf, inv_k = 1.0f / kf, inv_denom = 1.0f / clip_denom;
  const float wd_lr = wd * lr;
  for (int64_t j = b; j < e; ++j) {
    // The gradient the moments see is g = ga * gb (gb = 1 when its last op is not a
    // product). XLA computes the new mu in its own loop where g has one use, and
    // contracts g - mu into fma(ga, gb, -mu); the kernel does the same.
    const float g0 = ld(g[j]);
    float ga = g0, gb = sel(has_lsf, inv_lsf, 1.0f);  // g / loss_scale_factor
    float gr = ga * gb;
    if constexpr (ACC) {
      const float a = acc[j];
      acc[j] = sel(real, 0.0f, a + gr);    // micro-step: acc <- acc + g, nothing else moves
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
    const float u1 = sel(dec, fmadd(-pf, wd_lr, u0), u0);
    float u = sel(real, round_to<P>(u1), 0.0f);  // updates are in the param dtype
    if constexpr (EMA) {
      const float p_new = round_to<P>(pf + u);
      const float a_new = fmadd(mom, ema[j], one_m * p_new);   // mom * avg + (1 - mom) * p
      ema[j] = a_new;
      u = sel(overwrite, round_to<P>(a_new - pf), u);
    }
    p[j] = st<P>(pf + u);  // optax.apply_updates, in the param dtype
  }
}

template <typename G, bool ACC>
static double sumsq_segment(const G* __restrict g, const float* __restrict acc, int64_t b0, int64_t e0,
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
        if constexpr (ACC) gr = (gr + acc[j + k]) * inv_k;
        lane[k] += gr * gr;
      }
    }
    double part = 0.0;
    for (; j < e; ++j) {
      const float g0 = ld(g[j]);
      float gr = sel(has_lsf, g0 * inv_lsf, g0);
      if constexpr (ACC) gr = (gr + acc[j]) * inv_k;
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

using StepFn = void (*)(void*, const void*, void*, void*, void*, float*, float*, int64_t, int64_t, const Sc&, float,
                        bool);

template <typename P, typename G, typename M, typename V, bool AMS, bool ACC, bool EMA>
static void step_erased(void* p, const void* g, void* m, void* v, void* vmax, float* acc, float* ema, int64_t b,
                        int64_t e, const Sc& s, float clip_denom, bool decay) {
  step_segment<P, G, M, V, AMS, ACC, EMA>(static_cast<P*>(p), static_cast<const G*>(g), static_cast<M*>(m),
                                          static_cast<V*>(v), static_cast<V*>(vmax), acc, ema, b, e, s, clip_denom,
                                          decay);
}

template <typename P, typename G, typename M, typename V>
static StepFn pick_flags(bool ams, bool acc, bool ema) {
  const int k = (ams ? 4 : 0) | (acc ? 2 : 0) | (ema ? 1 : 0);
  switch (k) {
    case 0: return &step_erased<P, G, M, V, false, false, false>;
    case 1: return &step_erased<P, G, M, V, false, false, true>;
    case 2: return &step_erased<P, G, M, V, false, true, false>;
    case 3: return &step_erased<P, G, M, V, false, true, true>;
    case 4: return &step_erased<P, G, M, V, true, false, false>;
    case 5: return &step_erased<P, G, M, V, true, false, true>;
    case 6: return &step_erased<P, G, M, V, true, true, false>;
    default: return &step_erased<P, G, M, V, true, true, true>;
  }
}

template <typename P, typename G>
static StepFn pick_mv(DT m, DT v, bool ams, bool acc, bool ema) {
  if (m == kF32 && v == kF32) return pick_flags<P, G, float, float>(ams, acc, ema);
  if (m == kF32 && v == kBF16) return pick_flags<P, G, float, bf16_t>(ams, acc, ema);
  if (m == kBF16 && v == kF32) return pick_flags<P, G, bf16_t, float>(ams, acc, ema);
  if (m == kBF16 && v == kBF16) return pick_flags<P, G, bf16_t, bf16_t>(ams, acc, ema);
  return nullptr;
}

// Supported: params f32/bf16/f16; grads in the param dtype or f32; moments f32 or bf16.
static StepFn pick_step(DT p, DT g, DT m, DT v, bool ams, bool acc, bool ema) {
  if (p == kF32 && g == kF32) return pick_mv<float, float>(m, v, ams, acc, ema);
  if (p == kBF16 && g == kBF16) return pick_mv<bf16_t, bf16_t>(m, v, ams, acc, ema);
  if (p == kBF16 && g == kF32) return pick_mv<bf16_t, float>(m, v, ams, acc, ema);
  if (p == kF16 && g == kF16) return pick_mv<f16_t, f16_t>(m, v, ams, acc, ema);
  if (p == kF16 && g == kF32) return pick_mv<f16_t, float>(m, v, ams, acc, ema);
  return nullptr;
}

using SumFn = double (*)(const void*, const float*, int64_t, int64_t, bool, float, float);
template <typename G, bool ACC>
static double sumsq_erased(const void* g, const float* acc, int64_t b, int64_t e, bool has_lsf, float lsf, float kf) {
  return sumsq_segment<G, ACC>(static_cast<const G*>(g), acc, b, e, has_lsf, lsf, kf);
}
static SumFn pick_sum(DT g, bool acc) {
  switch (g) {
    case kF32: return acc ? &sumsq_erased<float, true> : &sumsq_erased<float, false>;
    case kBF16: return acc ? &sumsq_erased<bf16_t, true> : &sumsq_erased<bf16_t, false>;
    case kF16: return acc ? &sumsq_erased<f16_t, true> : &sumsq_erased<f16_t, false>;
    default: return nullptr;
  }
}

// ---------------------------------------------------------------- work splitting
struct Seg { int64_t leaf, begin, end; };

// Segments of at most kSeg elements; a task is a run of segments of about kSeg elements
// in all (small leaves are grouped, large leaves split).
constexpr int64_t kSeg = int64_t{1} << 16;

static void make_tasks(const std::vector<int64_t>& sizes, std::vector<Seg>* segs, std::vector<int64_t>* task_start) {
  int64_t acc = 0;
  task_start->push_back(0);
  for (int64_t i = 0; i < static_cast<int64_t>(sizes.size()); ++i) {
    for (int64_t b = 0; b < sizes[i]; b += kSeg) {
      const int64_t e = std::min(sizes[i], b + kSeg);
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
  void* p; const void* g; void* m; void* v; void* vmax; float* acc; float* ema;
  StepFn fn; float clip_denom; bool decay;
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
    L.fn(L.p, L.g, L.m, L.v, L.vmax, L.acc, L.ema, sg.begin, sg.end, ctx->sc, L.clip_denom, L.decay);
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

// Args: scalars f32[kNumScalars], clip denominators f32[L], then
//   tree state (flat == 0): per leaf p, g, m, v[, vmax][, acc][, ema];
//     rets: per leaf p, m, v[, vmax][, acc][, ema];
//   flat state (flat == 1): m, v[, vmax][, acc][, ema] (1-D, all leaves, leaf i at
//     offsets[i]), then per leaf p, g; rets: the state buffers, then per leaf p.
static ffi::Error StepImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::F32> denoms,
                           ffi::RemainingArgs args, ffi::RemainingRets rets, ffi::Span<const int64_t> decay,
                           ffi::Span<const int64_t> offsets, int64_t ams, int64_t acc, int64_t ema, int64_t flat) {
  if (scalars.element_count() < kNumScalars) return bad("adamx: scalar operand too short");
  const int64_t nst = 2 + (ams ? 1 : 0) + (acc ? 1 : 0) + (ema ? 1 : 0);
  const int64_t nin = flat ? 2 : 2 + nst;
  const int64_t nout = flat ? 1 : 1 + nst;
  const int64_t base = flat ? nst : 0;
  const int64_t L = static_cast<int64_t>(decay.size());
  if (static_cast<int64_t>(args.size()) != base + L * nin || static_cast<int64_t>(rets.size()) != base + L * nout)
    return bad("adamx: operand count does not match the number of leaves");
  if (flat && static_cast<int64_t>(offsets.size()) != L) return bad("adamx: one offset per leaf expected");
  if (static_cast<int64_t>(denoms.element_count()) != L) return bad("adamx: clip operand has the wrong size");
  const Sc sc = read_scalars(scalars.typed_data());
  const float* den = denoms.typed_data();
  // flat state buffers, in place
  char* fbuf[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
  int64_t fcount[5] = {0, 0, 0, 0, 0};
  ffi::DataType ftype[5] = {};
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
    // state pointers and dtypes: m, v[, vmax][, acc][, ema]
    void* st[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
    ffi::DataType sty[5] = {};
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
    lp.fn = pick_step(dt_of(p->element_type()), dt_of(g->element_type()), dt_of(sty[0]), dt_of(sty[1]), ams != 0,
                      acc != 0, ema != 0);
    if (lp.fn == nullptr) return bad("adamx: unsupported dtype combination");
    lp.p = inplace(*p, *po);
    lp.g = g->untyped_data();
    lp.m = st[0];
    lp.v = st[1];
    lp.vmax = nullptr; lp.acc = nullptr; lp.ema = nullptr;
    int64_t k = 2;
    if (ams) {
      if (sty[k] != sty[1]) return bad("adamx: bad nu_max buffer");
      lp.vmax = st[k++];
    }
    if (acc) {
      if (sty[k] != ffi::DataType::F32) return bad("adamx: bad accumulator buffer");
      lp.acc = static_cast<float*>(st[k++]);
    }
    if (ema) {
      if (sty[k] != ffi::DataType::F32) return bad("adamx: bad average buffer");
      lp.ema = static_cast<float*>(st[k++]);
    }
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

// ---------------------------------------------------------------- sum of squares handler
struct SumCtx {
  const std::vector<const void*>* g;
  const std::vector<const float*>* acc;
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
  const float* flat_acc = nullptr;
  int64_t flat_count = 0;
  if (base) {
    auto a = args.get<ffi::AnyBuffer>(0);
    if (!a || a->element_type() != ffi::DataType::F32) return bad("adamx: bad accumulator buffer");
    flat_acc = static_cast<const float*>(a->untyped_data());
    flat_count = static_cast<int64_t>(a->element_count());
  }
  const Sc sc = read_scalars(scalars.typed_data());
  float* res = out->typed_data();
  std::vector<const void*> gp(L);
  std::vector<const float*> ap(L, nullptr);
  std::vector<SumFn> fns(L);
  std::vector<int64_t> sizes(L);
  for (int64_t i = 0; i < L; ++i) {
    auto g = args.get<ffi::AnyBuffer>(base + i * nin);
    if (!g) return bad("adamx: could not decode a gradient");
    gp[i] = g->untyped_data();
    sizes[i] = static_cast<int64_t>(g->element_count());
    fns[i] = pick_sum(dt_of(g->element_type()), acc != 0);
    if (fns[i] == nullptr) return bad("adamx: unsupported gradient dtype");
    if (acc && flat) {
      if (offsets[i] < 0 || offsets[i] + sizes[i] > flat_count) return bad("adamx: leaf offset outside the flat state");
      ap[i] = flat_acc + offsets[i];
    } else if (acc) {
      auto a = args.get<ffi::AnyBuffer>(i * nin + 1);
      if (!a || a->element_type() != ffi::DataType::F32 || static_cast<int64_t>(a->element_count()) != sizes[i])
        return bad("adamx: bad accumulator buffer");
      ap[i] = static_cast<const float*>(a->untyped_data());
    }
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
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("decay")
                                  .Attr<ffi::Span<const int64_t>>("offsets")
                                  .Attr<int64_t>("ams")
                                  .Attr<int64_t>("acc")
                                  .Attr<int64_t>("ema")
                                  .Attr<int64_t>("flat"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamxFusedSumsq, SumsqImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("offsets")
                                  .Attr<int64_t>("acc")
                                  .Attr<int64_t>("flat"));

extern "C" int adamx_fused_abi_version() { return 2; }
"""

_ABI = 2
_STEP = "adamx_fused_step_v2"
_SUMSQ = "adamx_fused_sumsq_v2"
# Keep in sync with the scalar enum in _SRC.
_SCALARS = (
    "c1", "c2", "alpha", "eps", "lr", "wd", "lsf", "has_lsf", "k", "is_real",
    "clip_mode", "clip_c", "clip_scale", "mom", "one_m", "overwrite",
)  # fmt: skip
_CXXFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-w"]

_PARAM_DTYPES = {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)}
_MOMENT_DTYPES = {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}

_OPERANDS_PER_CALL = 64
# flat state: 2 operands per leaf; calls of 256 operands measured best (docs/performance.md)
_FLAT_OPERANDS_PER_CALL = 256
_ASYNC_HINT = True

_lock = threading.Lock()
_status: dict[str, Any] = {"tried": False, "ok": False, "error": None, "path": None}


# ------------------------------------------------------------------ building the kernel
def _cache_dir() -> str:
    d = os.environ.get("ADAMX_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "adamx")
    return d


def _compiler() -> Optional[str]:
    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return shutil.which(cxx)
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _build_key(cxx: str) -> str:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    import jaxlib

    h = hashlib.sha256()
    for part in (_SRC, " ".join(_CXXFLAGS), version, jaxlib.__version__, platform.machine(), _cpu_id()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _build() -> str:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    out_dir = _cache_dir()
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError:
        out_dir = os.path.join(tempfile.gettempdir(), f"adamx-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
        os.makedirs(out_dir, exist_ok=True)
    so = os.path.join(out_dir, f"adamx_fused_{_build_key(cxx)}.so")
    if os.path.exists(so):
        return so
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        src = os.path.join(tmp, "adamx_fused.cc")
        with open(src, "w") as f:
            f.write(_SRC)
        tmp_so = os.path.join(tmp, "adamx_fused.so")
        cmd = [cxx, *_CXXFLAGS, "-I", jax.ffi.include_dir(), src, "-o", tmp_so]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"compiling the fused kernel failed ({' '.join(cmd)}):\n{r.stderr[-4000:]}")
        os.replace(tmp_so, so)  # atomic: concurrent builders all end with a complete file
    return so


def available() -> bool:
    """Whether the fused CPU kernel is built and registered (builds it on first call)."""
    if _status["tried"]:
        return bool(_status["ok"])
    with _lock:
        if _status["tried"]:
            return bool(_status["ok"])
        try:
            if os.environ.get("ADAMX_FUSED", "1").lower() in ("0", "false", "off", "no"):
                raise RuntimeError("disabled by ADAMX_FUSED=0")
            path = _build()
            lib = ctypes.CDLL(path)
            if lib.adamx_fused_abi_version() != _ABI:
                raise RuntimeError(f"{path} has another ABI version")
            jax.ffi.register_ffi_target(_STEP, jax.ffi.pycapsule(lib.AdamxFusedStep), platform="cpu")
            jax.ffi.register_ffi_target(_SUMSQ, jax.ffi.pycapsule(lib.AdamxFusedSumsq), platform="cpu")
            _status.update(ok=True, path=path, lib=lib)
        except Exception as e:  # noqa: BLE001 - any failure means: use the reference path
            _status.update(ok=False, error=f"{type(e).__name__}: {e}")
            log.info("adamx: fused kernel unavailable, using the reference path: %s", _status["error"])
        _status["tried"] = True
    return bool(_status["ok"])


def status() -> dict[str, Any]:
    """``{"ok": bool, "error": str | None, "path": str | None}`` of the fused kernel."""
    available()
    return {k: _status.get(k) for k in ("ok", "error", "path")}


# ------------------------------------------------------------------ eligibility
def _is_sharded(x: Any) -> bool:
    """True when ``x`` may be split over devices: the kernel sees one device's buffers.

    Concrete arrays: on more than one device. While tracing: the abstract mesh of the
    value has a non-manual axis of size > 1 (jit over sharded or replicated inputs);
    inside ``shard_map`` (manual axes) each shard is a plain local array, which is fine.
    """
    if not isinstance(x, jax.core.Tracer):
        sh = getattr(x, "sharding", None)
        if sh is None:
            return False
        try:
            return len(sh.device_set) > 1
        except Exception:  # noqa: BLE001
            return True
    try:
        mesh = jax.typeof(x).sharding.mesh
        sizes = dict(mesh.shape)
        types = tuple(mesh.axis_types)
    except Exception:  # noqa: BLE001 - no sharding information: a plain single-device value
        return False
    return any(size > 1 and "manual" not in str(t).lower() for size, t in zip(sizes.values(), types))


def _leaf_dtype_problem(g: Any, p: Any) -> Optional[str]:
    """Why the kernel cannot take this params/grads pair, or ``None``."""
    pd, gd = jnp.dtype(jnp.result_type(p)), jnp.dtype(g.dtype)
    if pd not in _PARAM_DTYPES or gd not in (pd, jnp.dtype(jnp.float32)):
        return f"unsupported dtypes (params {pd}, grads {gd})"
    return None


def _plan(tx: Any, grads: Any, state: Any, params: Any) -> tuple[Optional[str], Any]:
    """``(None, plan)`` when the fused kernel applies, else ``(reason, None)``."""
    from adamx._adam import Adam, AdamState

    if not isinstance(tx, Adam) or not isinstance(state, AdamState):
        return "not an adamx.adam optimizer and its AdamState", None
    if params is None:
        return "params are required", None
    if jax.default_backend() != "cpu":
        return f"backend is {jax.default_backend()}, the kernel is CPU only", None
    if not available():
        return f"kernel unavailable: {_status['error']}", None
    g_l, p_l, treedef = _tree.align_grads(grads, params)
    if any(g is None for g in g_l):
        return "a gradient is None", None
    if isinstance(state.mu, FlatBuffers):
        return _plan_flat(tx, state, g_l, p_l, treedef)
    flat = treedef.flatten_up_to
    try:
        mu_l, nu_l = flat(state.mu), flat(state.nu)
        nm_l = flat(state.nu_max) if state.nu_max is not None else None
        acc_l = flat(state.acc) if state.acc is not None else None
        ema_l = flat(state.ema) if state.ema is not None else None
    except (ValueError, TypeError):
        return "optimizer state does not match params", None
    hp = tx.hyperparams
    if (nm_l is not None) != bool(hp["amsgrad"]) or (ema_l is not None) != bool(hp["use_ema"]):
        return "optimizer state does not match the optimizer's options", None
    f32 = jnp.dtype(jnp.float32)
    for i, (g, p, m, v) in enumerate(zip(g_l, p_l, mu_l, nu_l)):
        reason = _leaf_dtype_problem(g, p)
        if reason:
            return reason, None
        if jnp.dtype(m.dtype) not in _MOMENT_DTYPES or jnp.dtype(v.dtype) not in _MOMENT_DTYPES:
            return f"unsupported moment dtypes ({m.dtype}, {v.dtype})", None
        shape = tuple(jnp.shape(p))
        for x in (m, v):
            if tuple(x.shape) != shape:
                return "optimizer state shapes do not match params", None
        extra = [(nm_l, v.dtype), (acc_l, f32), (ema_l, f32)]
        for lst, want in extra:
            if lst is not None and (jnp.dtype(lst[i].dtype) != jnp.dtype(want) or tuple(lst[i].shape) != shape):
                return "optimizer state dtypes or shapes are not the expected ones", None
        for x in (p, g, m, v):
            if _is_sharded(x):
                return "arrays are sharded over several devices", None
    return None, (g_l, p_l, treedef, mu_l, nu_l, nm_l, acc_l, ema_l, None)


def _plan_flat(tx: Any, state: Any, g_l: list, p_l: list, treedef: Any) -> tuple[Optional[str], Any]:
    """The plan for ``flat_state=True``: each state field one 1-D buffer, leaves at offsets."""
    hp = tx.hyperparams
    f32 = jnp.dtype(jnp.float32)
    sizes = [int(np.prod(jnp.shape(p), dtype=np.int64)) for p in p_l]
    total = int(sum(sizes))
    fields: dict[str, Any] = {}
    for name in ("mu", "nu", "nu_max", "acc", "ema"):
        field = getattr(state, name)
        if field is None:
            fields[name] = None
            continue
        if not isinstance(field, FlatBuffers) or len(field.buffers) != 1:
            return "flat state with several dtype groups", None
        (buf,) = field.buffers
        if tuple(buf.shape) != (total,):
            return "flat optimizer state does not match params", None
        fields[name] = buf
    if (fields["nu_max"] is not None) != bool(hp["amsgrad"]) or (fields["ema"] is not None) != bool(hp["use_ema"]):
        return "optimizer state does not match the optimizer's options", None
    mu, nu = fields["mu"], fields["nu"]
    if jnp.dtype(mu.dtype) not in _MOMENT_DTYPES or jnp.dtype(nu.dtype) not in _MOMENT_DTYPES:
        return f"unsupported moment dtypes ({mu.dtype}, {nu.dtype})", None
    if fields["nu_max"] is not None and fields["nu_max"].dtype != nu.dtype:
        return "optimizer state dtypes or shapes are not the expected ones", None
    for name in ("acc", "ema"):
        if fields[name] is not None and jnp.dtype(fields[name].dtype) != f32:
            return "optimizer state dtypes or shapes are not the expected ones", None
    for g, p in zip(g_l, p_l):
        reason = _leaf_dtype_problem(g, p)
        if reason:
            return reason, None
        if _is_sharded(p) or _is_sharded(g):
            return "arrays are sharded over several devices", None
    if any(_is_sharded(b) for b in fields.values() if b is not None):
        return "arrays are sharded over several devices", None
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)[:-1]]).astype(np.int64) if sizes else None
    return None, (g_l, p_l, treedef, mu, nu, fields["nu_max"], fields["acc"], fields["ema"], offsets)


def why_not(tx: Any, grads: Any, opt_state: Any, params: Any) -> Optional[str]:
    """``None`` when :func:`apply_gradients` takes the fused path, else the reason it does not."""
    return _plan(tx, grads, opt_state, params)[0]


# ------------------------------------------------------------------ the step
def apply_gradients(tx: Any, grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
    """``tx.update`` followed by ``optax.apply_updates``, as one fused pass where possible.

    Returns ``(new_params, new_opt_state)``: the same values as

    .. code-block:: python

        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)

    For an ``adamx.adam``/``adamx.adamw`` optimizer on CPU it runs one in-place pass over
    params, grads and optimizer state (jit the step and donate params and state to get
    the in-place update without copies). Anything else takes the two lines above.

    Example:
      >>> import jax, jax.numpy as jnp, adamx
      >>> opt = adamx.adam(learning_rate=0.1)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = opt.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> params, state = opt.apply_gradients(grads, state, params)
      >>> [round(x, 4) for x in params["w"].tolist()]
      [0.9, -1.9]
    """
    reason, plan = _plan(tx, grads, opt_state, params)
    if reason is not None:
        updates, new_state = tx.update(grads, opt_state, params)
        return _apply_updates(params, updates), new_state
    return _fused_step(tx, opt_state, params, *plan)


def _apply_updates(params: Any, updates: Any) -> Any:
    """``optax.apply_updates`` where a ``None`` update (no gradient) leaves the param alone."""
    if params is None:
        return optax.apply_updates(params, updates)
    return jax.tree.map(
        lambda p, u: p if u is None else optax.apply_updates(p, u), params, updates, is_leaf=lambda x: x is None
    )


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _fused_step(tx, state, params, g_l, p_l, treedef, mu_l, nu_l, nm_l, acc_l, ema_l, offsets):  # noqa: ANN001
    from adamx._adam import AdamState, derived_options, step_scalars

    hp = tx.hyperparams
    n = state.count
    k, decay_on, exclude = derived_options(hp)
    keep = _decay.decay_mask_leaves(params, exclude, hp["weight_decay_mask"]) if decay_on else [False] * len(g_l)

    # Per-step scalars: the same functions adamx.adam's update uses.
    lr, sc, wd = step_scalars(hp, k, decay_on, n)
    if wd is None:
        wd = _f32(0.0)
    lsf = hp["loss_scale_factor"]
    is_real = jnp.asarray(True) if k is None else (n + 1) % k == 0
    clip_mode, clip_c = 0, _f32(1.0)
    for mode, key in ((1, "clipnorm"), (2, "global_clipnorm"), (3, "clipvalue")):
        if hp[key] is not None:
            clip_mode, clip_c = mode, _f32(hp[key])
    mom, one_m, overwrite = _f32(0.0), _f32(1.0), jnp.asarray(False)
    if hp["use_ema"]:
        mom, one_m, ema_overwrite = _averaging.ema_scalars(n, hp["ema_momentum"], hp["ema_overwrite_frequency"], k)
        if ema_overwrite is not None:
            overwrite = ema_overwrite
    vals = {
        "c1": sc.c1, "c2": sc.c2, "alpha": sc.alpha, "eps": sc.eps, "lr": lr, "wd": wd,
        "lsf": _f32(1.0 if lsf is None else lsf), "has_lsf": _f32(lsf is not None),
        "k": _f32(1 if k is None else k), "is_real": is_real, "clip_mode": _f32(clip_mode), "clip_c": clip_c,
        "clip_scale": _f32(1.0), "mom": mom, "one_m": one_m, "overwrite": overwrite,
    }  # fmt: skip
    L = len(g_l)
    has_acc = acc_l is not None
    if L == 0:
        return params, state._replace(count=optax.safe_increment(n))

    def scalar_vec(v: dict) -> jax.Array:
        return jnp.stack([jnp.asarray(v[name]).astype(jnp.float32) for name in _SCALARS])

    # XLA's compile time grows faster than linearly with the operand count of one custom
    # call; calls of about _OPERANDS_PER_CALL operands keep it linear in the leaf count.
    flat = offsets is not None
    n_state = 2 + sum(x is not None for x in (nm_l, acc_l, ema_l))
    per_leaf = 2 if flat else 2 + n_state
    per_call = max(1, (_FLAT_OPERANDS_PER_CALL - n_state) // per_leaf) if flat else max(1, _OPERANDS_PER_CALL // per_leaf)
    groups = [range(i, min(L, i + per_call)) for i in range(0, L, per_call)]
    no_offsets = np.zeros((0,), np.int64)

    def offs(grp: range) -> np.ndarray:
        return offsets[grp.start : grp.stop] if flat else no_offsets

    denoms = jnp.ones((L,), jnp.float32)
    if clip_mode in (1, 2):
        sums = []
        for grp in groups:
            sum_ops: list[Any] = [acc_l] if (flat and has_acc) else []
            for i in grp:
                sum_ops.append(g_l[i])
                if has_acc and not flat:
                    sum_ops.append(acc_l[i])
            sums.append(
                jax.ffi.ffi_call(_SUMSQ, jax.ShapeDtypeStruct((len(grp),), jnp.float32), vmap_method="sequential")(
                    scalar_vec(vals), *sum_ops, offsets=offs(grp), acc=np.int64(has_acc), flat=np.int64(flat)
                )
            )
        sumsq = jnp.concatenate(sums)
        if clip_mode == 1:  # Keras clipnorm: g * c / max(||g||, c), per tensor
            denoms = jnp.maximum(jnp.sqrt(sumsq), clip_c)
        else:  # Keras global_clipnorm
            vals["clip_scale"] = _clipping.global_clip_scale(jnp.sqrt(jnp.sum(sumsq)), clip_c)

    scal = scalar_vec(vals)
    if _ASYNC_HINT:
        # PjRt:CPU runs a program whose HloCostAnalysis flop count is under 1000 inline on
        # the calling thread, without async dispatch; custom calls count 0 flops, so an
        # optimizer-only step would block Python. A 16x16 matmul on a runtime value (8192
        # flops, about a microsecond) makes the step count as real work. Its result is
        # passed to the kernel, which ignores it, so it is not removed.
        hint = jnp.full((16, 16), scal[0]) @ jnp.full((16, 16), scal[1])
        scal = jnp.concatenate([scal, hint[:1, 0] * 0.0])
    attrs = dict(ams=np.int64(nm_l is not None), acc=np.int64(has_acc), ema=np.int64(ema_l is not None))
    if flat:
        # the state buffers go through the calls in turn, each updating its leaves in place
        st = [x for x in (mu_l, nu_l, nm_l, acc_l, ema_l) if x is not None]
        new_p: list[Any] = []
        for grp in groups:
            ops: list[Any] = [scal, denoms[grp.start : grp.stop], *st]
            outs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in st]
            aliases = {2 + k: k for k in range(len(st))}
            for i in grp:
                p = jnp.asarray(p_l[i])
                aliases[len(ops)] = len(outs)
                ops.extend([p, g_l[i]])
                outs.append(jax.ShapeDtypeStruct(p.shape, p.dtype))
            r = jax.ffi.ffi_call(_STEP, outs, input_output_aliases=aliases, vmap_method="sequential")(
                *ops, decay=np.asarray([bool(keep[i]) for i in grp], np.int64), offsets=offs(grp), flat=np.int64(1),
                **attrs,
            )  # fmt: skip
            st = list(r[: len(st)])
            new_p.extend(r[len(st) :])
        it = iter(st)
        fb = lambda x: None if x is None else FlatBuffers((next(it),))  # noqa: E731
        new_mu, new_nu, new_nm, new_acc, new_ema = (fb(x) for x in (mu_l, nu_l, nm_l, acc_l, ema_l))
        new_state = AdamState(
            count=optax.safe_increment(n), mu=new_mu, nu=new_nu, nu_max=new_nm, acc=new_acc, ema=new_ema
        )
        return jax.tree_util.tree_unflatten(treedef, new_p), new_state

    res: list[Any] = []
    for grp in groups:
        ops = [scal, denoms[grp.start : grp.stop]]
        outs = []
        aliases = {}
        for i in grp:
            p, g = jnp.asarray(p_l[i]), g_l[i]
            leaf_in = [p, g, mu_l[i], nu_l[i]]
            leaf_out = [p, mu_l[i], nu_l[i]]
            for lst in (nm_l, acc_l, ema_l):
                if lst is not None:
                    leaf_in.append(lst[i])
                    leaf_out.append(lst[i])
            base = len(ops)
            ops.extend(leaf_in)
            for j, x in enumerate(leaf_out):
                aliases[base + (0 if j == 0 else j + 1)] = len(outs)
                outs.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
        res.extend(
            jax.ffi.ffi_call(_STEP, outs, input_output_aliases=aliases, vmap_method="sequential")(
                *ops, decay=np.asarray([bool(keep[i]) for i in grp], np.int64), offsets=offs(grp), flat=np.int64(0),
                **attrs,
            )
        )
    per = len(res) // L
    col = lambda j: [res[i * per + j] for i in range(L)]  # noqa: E731
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
    j = 3
    new_nm = new_acc = new_ema = None
    if nm_l is not None:
        new_nm, j = unflat(col(j)), j + 1
    if has_acc:
        new_acc, j = unflat(col(j)), j + 1
    if ema_l is not None:
        new_ema = unflat(col(j))
    new_state = AdamState(
        count=optax.safe_increment(n),
        mu=unflat(col(1)),
        nu=unflat(col(2)),
        nu_max=new_nm,
        acc=new_acc,
        ema=new_ema,
    )
    return unflat(col(0)), new_state


__all__ = ["apply_gradients", "available", "status", "why_not"]
