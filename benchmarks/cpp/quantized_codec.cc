// Per-element costs of the quantized fused steps' pieces (8-bit, fp8, 4-bit), one thread (benchmarks/quantized_codec.py
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
  float maps[512 + 62];  // the 8-bit maps, then the 4-bit tables (adamx.fused._kernel._LOWBIT_TABLES)
  FILE* f = std::fopen(argv[1], "rb");
  if (!f || std::fread(maps, 4, 512 + 62, f) != 512 + 62) return 2;
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
  QLeaf leaf{};
  leaf.p = p.data(); leaf.g = g.data(); leaf.mc = mc.data(); leaf.ms = ms.data(); leaf.vc = vc.data();
  leaf.vs = vs.data(); leaf.clip_denom = 1.0f;
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
  // fp8 and 4-bit (moment_format): the codecs of adamx/_lowbit.h and the whole step
  LMaps lm{};
  std::memcpy(lm.m.value, maps + 512, 16 * 4); std::memcpy(lm.m.thr, maps + 528, 15 * 4);
  std::memcpy(lm.v.value, maps + 543, 16 * 4); std::memcpy(lm.v.thr, maps + 559, 15 * 4);
  std::vector<uint8_t> fmc(n), fvc(n), hmc(n / 2), hvc(n / 2);
  std::vector<float> fms(n / 256), fvs(n / 256), hms(n / 128), hvs(n / 128);
  for (int64_t b = 0; b < n / 256; ++b) {
    lb::fp8_encode_block(m.data() + b * 256, 256, fmc.data() + b * 256, fms.data() + b);
    lb::fp8_encode_block(v.data() + b * 256, 256, fvc.data() + b * 256, fvs.data() + b);
  }
  for (int64_t b = 0; b < n / 128; ++b) {
    lb::q4_encode_block(lm.m, m.data() + b * 128, 128, hmc.data() + b * 64, hms.data() + b);
    lb::q4_encode_block(lm.v, v.data() + b * 128, 128, hvc.data() + b * 64, hvs.data() + b);
  }
  std::vector<float> os4(nc / 128);
  LLeaf fleaf{}, hleaf{};
  for (LLeaf* l : {&fleaf, &hleaf}) {
    l->p = p.data(); l->g = g.data(); l->clip_denom = 1.0f;
  }
  fleaf.mc = fmc.data(); fleaf.ms = fms.data(); fleaf.vc = fvc.data(); fleaf.vs = fvs.data();
  hleaf.mc = hmc.data(); hleaf.ms = hms.data(); hleaf.vc = hvc.data(); hleaf.vs = hvs.data();
  const double fp8_dec = best_ns(R, nc, [&] {
    for (int64_t b = 0; b < nc / 256; ++b) lb::fp8_decode_block(fmc.data() + b * 256, fms[b], 256, out.data() + b * 256);
  });
  const double fp8_enc_m = best_ns(R, nc, [&] {
    for (int64_t b = 0; b < nc / 256; ++b) lb::fp8_encode_block(m.data() + b * 256, 256, oc.data() + b * 256, os.data() + b);
  });
  const double fp8_enc_v = best_ns(R, nc, [&] {
    for (int64_t b = 0; b < nc / 256; ++b) lb::fp8_encode_block(v.data() + b * 256, 256, oc.data() + b * 256, os.data() + b);
  });
  const double q4_dec = best_ns(R, nc, [&] {
    for (int64_t b = 0; b < nc / 128; ++b) lb::q4_decode_block(lm.m, hmc.data() + b * 64, hms[b], 128, out.data() + b * 128);
  });
  const double q4_enc_m = best_ns(R, nc, [&] {
    for (int64_t b = 0; b < nc / 128; ++b) lb::q4_encode_block(lm.m, m.data() + b * 128, 128, oc.data() + b * 64, os4.data() + b);
  });
  const double q4_enc_v = best_ns(R, nc, [&] {
    for (int64_t b = 0; b < nc / 128; ++b) lb::q4_encode_block(lm.v, v.data() + b * 128, 128, oc.data() + b * 64, os4.data() + b);
  });
  const double fp8_l2 = best_ns(R, nc, [&] { lstep_segment<kFp8, float, float, false, false, false>(fleaf, lm, 0, nc, s); });
  const double q4_l2 = best_ns(R, nc, [&] { lstep_segment<kQ4, float, float, false, false, false>(hleaf, lm, 0, nc, s); });
  const double fp8_stream = best_ns(3, n, [&] { lstep_segment<kFp8, float, float, false, false, false>(fleaf, lm, 0, n, s); });
  const double q4_stream = best_ns(3, n, [&] { lstep_segment<kQ4, float, float, false, false, false>(hleaf, lm, 0, n, s); });
  std::printf("{\"fp8_decode\": %.4f, \"fp8_encode_mu\": %.4f, \"fp8_encode_nu\": %.4f, \"fp8_step_L2\": %.4f, "
              "\"fp8_step_stream\": %.4f, \"4bit_decode_mu\": %.4f, \"4bit_encode_mu\": %.4f, \"4bit_encode_nu\": %.4f, "
              "\"4bit_step_L2\": %.4f, \"4bit_step_stream\": %.4f, ",
              fp8_dec, fp8_enc_m, fp8_enc_v, fp8_l2, fp8_stream, q4_dec, q4_enc_m, q4_enc_v, q4_l2, q4_stream);
  std::printf("\"vbmi\": %d, \"decode_loop\": %.4f, \"decode_table\": %.4f, \"encode_mu\": %.4f, \"encode_nu\": %.4f, "
              "\"f32_step_L1\": %.4f, \"f32_step_L2\": %.4f, \"q8_step_L2\": %.4f, \"f32_step_stream\": %.4f, "
              "\"q8_step_stream\": %.4f, \"sink\": %g}\n",
              ADAMX_QUANT8_VBMI, dec_loop, dec_tab, enc_m, enc_v, arith_l1, f32_l2, q8_l2, f32_stream, q8_stream,
              static_cast<double>(out[5] + oc[7] + p[3]));
  return 0;
}
