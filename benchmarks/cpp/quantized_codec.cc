// Per-element costs of the 8-bit fused step's pieces, one thread (benchmarks/quantized_codec.py
// builds this with the fused kernel's flags and runs it). Includes the kernel's source, so it
// times exactly the functions the kernel runs. Best of R rounds; ns per element.
#include "kernel.cc"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>

namespace {
double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

template <typename F> double best_ns(int rounds, int64_t elems, F&& f) {
  double best = 1e30;
  for (int r = 0; r < rounds; ++r) {
    const double t0 = now();
    f();
    best = std::min(best, now() - t0);
  }
  return best / static_cast<double>(elems) * 1e9;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: quantized_codec MAPS_BIN STREAM_N\n");
    return 2;
  }
  float maps[512];
  FILE* f = std::fopen(argv[1], "rb");
  if (!f || std::fread(maps, 4, 512, f) != 512) return 2;
  std::fclose(f);
  const int64_t n = std::atoll(argv[2]), bs = 256, nb = n / bs;
  ScopedFtz ftz;  // as the kernel runs
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  std::vector<float> p(n), g(n), m(n, 0.0f), v(n, 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    p[i] = nd(rng);
    g[i] = nd(rng) * 0.01f;
  }
  Sc s{};
  s.c1 = 0.1f; s.c2 = 0.001f; s.alpha = 1e-3f; s.eps = 1e-7f; s.lr = 1e-3f; s.lsf = 1.0f; s.kf = 1.0f;
  s.is_real = true; s.clip_c = 1.0f; s.clip_scale = 1.0f; s.mom = 0.99f; s.one_m = 0.01f;
  auto f32_step = [&](int64_t b, int64_t e) {
    step_segment<float, float, float, float, float, 0, false, false, false>(p.data(), g.data(), m.data(), v.data(), nullptr,
                                                                          nullptr, nullptr, nullptr, 0, b, e, s, 1.0f, false);
  };
  for (int r = 0; r < 3; ++r) f32_step(0, n);  // realistic moments
  const auto tables = q_tables(maps);
  const QMaps mp{&tables->m_enc, &tables->v_enc, &tables->m_dec, &tables->v_dec};
  std::vector<uint8_t> mc(n), vc(n);
  std::vector<float> ms(nb), vs(nb);
  for (int64_t b = 0; b < nb; ++b) {
    q8::encode_block(tables->m_enc, m.data() + b * bs, bs, mc.data() + b * bs, ms.data() + b);
    q8::encode_block(tables->v_enc, v.data() + b * bs, bs, vc.data() + b * bs, vs.data() + b);
  }
  const QLeaf leaf{p.data(), g.data(), mc.data(), ms.data(), vc.data(), vs.data(), nullptr, nullptr,
                   nullptr, nullptr, 1.0f, false, nullptr};
  // in cache: 16K elements (the step's arrays in L2, a block's scratch in L1)
  const int64_t nc = 16384, R = 300;
  std::vector<float> out(nc);
  std::vector<uint8_t> oc(nc);
  std::vector<float> os(nc / bs);
  const double dec_loop = best_ns(R, nc, [&] {
    for (int64_t b = 0; b < nc / bs; ++b) q8::decode_block(tables->maps, mc.data() + b * bs, ms[b], bs, out.data() + b * bs);
  });
  const double dec_tab = best_ns(R, nc, [&] {
    for (int64_t b = 0; b < nc / bs; ++b) q8::decode_block(*mp.m_dec, mc.data() + b * bs, ms[b], bs, out.data() + b * bs);
  });
  const double enc_m = best_ns(R, nc, [&] {
    for (int64_t b = 0; b < nc / bs; ++b) q8::encode_block(*mp.m_enc, m.data() + b * bs, bs, oc.data() + b * bs, os.data() + b);
  });
  const double enc_v = best_ns(R, nc, [&] {
    for (int64_t b = 0; b < nc / bs; ++b) q8::encode_block(*mp.v_enc, v.data() + b * bs, bs, oc.data() + b * bs, os.data() + b);
  });
  const double arith_l1 = best_ns(20 * R, bs, [&] { f32_step(0, bs); });
  const double f32_l2 = best_ns(R, nc, [&] { f32_step(0, nc); });
  const double q8_l2 = best_ns(R, nc, [&] { qstep_segment<float, float, false, false, false>(leaf, mp, 0, nc, bs, s); });
  const double f32_stream = best_ns(3, n, [&] { f32_step(0, n); });
  const double q8_stream = best_ns(3, n, [&] { qstep_segment<float, float, false, false, false>(leaf, mp, 0, n, bs, s); });
  std::printf("{\"vbmi\": %d, \"decode_loop\": %.4f, \"decode_table\": %.4f, \"encode_mu\": %.4f, \"encode_nu\": %.4f, "
              "\"f32_step_L1\": %.4f, \"f32_step_L2\": %.4f, \"q8_step_L2\": %.4f, \"f32_step_stream\": %.4f, "
              "\"q8_step_stream\": %.4f, \"sink\": %g}\n",
              ADAMX_QUANT8_VBMI, dec_loop, dec_tab, enc_m, enc_v, arith_l1, f32_l2, q8_l2, f32_stream, q8_stream,
              static_cast<double>(out[5] + oc[7] + p[3]));
  return 0;
}
