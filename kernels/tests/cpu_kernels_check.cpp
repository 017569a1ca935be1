// Checks every instruction-set path of the CPU kernels against its scalar reference, on
// random inputs, without torch: the q8, q4 and q4a8 products (rwkv7_cpu_q8.h, rwkv7_cpu_q4.h,
// rwkv7_cpu_q4a8.h), the fused step's
// transcendental loops (rwkv7_cpu_math.h) and the WKV head (wkv7_cpu_head.h).
//
//   c++ -std=c++17 -O2 -march=native kernels/tests/cpu_kernels_check.cpp -o check && ./check
//   aarch64-linux-gnu-g++ -std=c++17 -O2 -static kernels/tests/cpu_kernels_check.cpp -o check-arm64
//   qemu-aarch64 -cpu cortex-a53 ./check-arm64 --expect neon          (no dotprod)
//   qemu-aarch64 -cpu neoverse-n1 ./check-arm64 --expect neon-dotprod
//
// Options: --expect NAME (the best q8 path this CPU should get), --expect-active NAME
// (the path in use after RWKV_NVIM_Q8_ISA). Prints one line per check
// ("ok"/"FAIL", the path, the largest error) and ends with "ALL OK" (exit 0) or
// "FAILED <n>" (exit 1). tests/core/test_kernels_arm64.py runs it.
//
// Where the math is integer (each q8 block's dot product) the paths must agree BIT FOR
// BIT: with power-of-two scales every fp32 step after the integer sum is exact, so the
// whole output must be identical. With real scales the fp32 combination may round
// differently (FMA or not): relative 1e-5, as tests/core/test_cpu_linear.py allows.
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../rwkv7_cpu_math.h"
#include "../rwkv7_cpu_q4.h"
#include "../rwkv7_cpu_q4a8.h"
#include "../rwkv7_cpu_q8.h"
#include "../wkv7_cpu_head.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

using namespace rwkv_cpu;

namespace {

int g_failures = 0;

void report(bool ok, const std::string& what, const std::string& path, double err, const char* unit = "max_err") {
  std::printf("%s %-44s %-13s %s=%.3g\n", ok ? "ok  " : "FAIL", what.c_str(), path.c_str(), unit, err);
  if (!ok) ++g_failures;
}

std::mt19937 rng(12345);

int rand_int(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }
float rand_normal(float scale = 1.f) { return std::normal_distribution<float>(0.f, scale)(rng); }
float rand_uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }

// The q8 paths this build and CPU run: scalar, then the others.
std::vector<Q8Path> runnable_paths() {
  std::vector<Q8Path> out{Q8Path::kScalar};
  const Q8Path best = q8_best_path();
  if (best == Q8Path::kNeonDotprod) out.push_back(Q8Path::kNeon);
  if (best != Q8Path::kScalar) out.push_back(best);
  return out;
}

// ---------------------------------------------------------------- fp16 scales

void check_half_to_float() {
  int64_t bad = 0, compared = 0;
#if defined(__aarch64__) && defined(__ARM_NEON)
  for (uint32_t h = 0; h < 65536; h += 4) {
    const uint16_t in[4] = {uint16_t(h), uint16_t(h + 1), uint16_t(h + 2), uint16_t(h + 3)};
    float hw[4];
    vst1q_f32(hw, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(in))));
    for (int i = 0; i < 4; ++i) {
      const float sw = half_to_float(in[i]);
      ++compared;
      if (std::isnan(hw[i]) ? !std::isnan(sw) : std::memcmp(&hw[i], &sw, 4) != 0) ++bad;
    }
  }
  report(bad == 0 && compared == 65536, "fp16->fp32 (all 65536)", "neon fcvtl", double(bad), "mismatches");
#elif defined(__F16C__)
  for (uint32_t h = 0; h < 65536; ++h) {
    const float hw = _cvtsh_ss(uint16_t(h)), sw = half_to_float(uint16_t(h));
    ++compared;
    if (std::isnan(hw) ? !std::isnan(sw) : std::memcmp(&hw, &sw, 4) != 0) ++bad;
  }
  report(bad == 0 && compared == 65536, "fp16->fp32 (all 65536)", "f16c", double(bad), "mismatches");
#else
  std::printf("skip fp16->fp32: no hardware conversion to compare with\n");
#endif
}

// ---------------------------------------------------------------- q8 product

struct Q8Case {
  int64_t M = 0, I = 0, O = 0;
  std::vector<int8_t> wq;
  std::vector<uint16_t> ws;
  std::vector<int16_t> xq;
  std::vector<float> xs;
  std::vector<int8_t> xh, xl;
  std::vector<float> y0;  // initial y (accumulate)

  Q8Rows rows() const { return Q8Rows{xq.data(), xs.data(), xh.data(), xl.data(), M, I}; }
  void split() {
    xh.resize(M * I);
    xl.resize(M * I);
    q8_split_activations(xq.data(), M * I, xh.data(), xl.data());
  }
};

uint16_t half_pow2(int e) { return uint16_t((e + 15) << 10); }  // 2^e, -14 <= e <= 15

// kind 0: full int16 activations, powers of two for every scale (fp32 steps exact)
// kind 1: |xq| <= 4095 (each block's sum below 2^24, so its fp32 value is exact), powers of two
// kind 2: extremes: |q| = 127, |x| = 32767 (and -32768), powers of two
// kind 3: real data: x ~ N(0, 1) quantized by q8_quantize_row, random fp16 scales
Q8Case make_q8_case(int64_t M, int64_t I, int64_t O, int kind) {
  Q8Case c;
  c.M = M;
  c.I = I;
  c.O = O;
  const int64_t NB = I / kBlock;
  c.wq.resize(O * I);
  c.ws.resize(O * NB);
  c.xq.resize(M * I);
  c.xs.resize(M * NB);
  for (auto& q : c.wq) q = int8_t(kind == 2 ? (rand_int(0, 1) ? 127 : -127) : rand_int(-127, 127));
  for (auto& s : c.ws)
    s = kind == 3 ? uint16_t((rand_int(0, 1) << 15) | (rand_int(3, 14) << 10) | rand_int(0, 1023))
                  : half_pow2(rand_int(-14, 2));
  if (kind == 3) {
    std::vector<float> x(M * I);
    for (auto& v : x) v = rand_normal();
    for (int64_t j = 0; j < std::min<int64_t>(I, 32); ++j) x[j] *= 1e3f;  // one loud block
    for (int64_t m = 0; m < M; ++m) q8_quantize_row(x.data() + m * I, I, c.xq.data() + m * I, c.xs.data() + m * NB);
  } else {
    const int lim = kind == 1 ? 4095 : 32767;
    for (auto& v : c.xq) v = int16_t(kind == 2 ? (rand_int(0, 1) ? 32767 : -32767) : rand_int(-lim, lim));
    if (kind == 2) c.xq[0] = -32768;
    for (auto& s : c.xs) s = std::ldexp(1.f, rand_int(-20, 0));
  }
  c.y0.resize(M * O);
  for (auto& v : c.y0) v = kind == 3 ? rand_normal() : std::ldexp(float(rand_int(-64, 64)), -4);
  c.split();
  return c;
}

std::vector<float> run_q8(const Q8Case& c, Q8Path path, bool accumulate, int64_t tile_split = 0) {
  std::vector<float> y = accumulate ? c.y0 : std::vector<float>(c.M * c.O, -1.f);
  const int64_t tiles = c.O / kTile;
  const int64_t mid = tile_split > 0 && tile_split < tiles ? tile_split : tiles;
  // two ranges, as two threads would call it
  q8_tiles(path, c.rows(), c.wq.data(), c.ws.data(), c.O, y.data(), accumulate, 0, mid);
  if (mid < tiles) q8_tiles(path, c.rows(), c.wq.data(), c.ws.data(), c.O, y.data(), accumulate, mid, tiles);
  return y;
}

// the exact result in double: sum over blocks of dot * scale_w * scale_x
std::vector<double> q8_double(const Q8Case& c) {
  const int64_t NB = c.I / kBlock;
  std::vector<double> y(c.M * c.O, 0.0);
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t o = 0; o < c.O; ++o) {
      const int64_t tile = o / kTile, lane = o % kTile;
      double sum = 0.0;
      for (int64_t b = 0; b < NB; ++b) {
        const int8_t* wb = c.wq.data() + (tile * NB + b) * kTileBlockBytes;
        int64_t dot = 0;
        for (int64_t j = 0; j < kBlock; ++j)
          dot += int64_t(wb[(j / 2) * 32 + lane * 2 + (j % 2)]) * c.xq[m * c.I + b * kBlock + j];
        sum += double(dot) * half_to_float(c.ws[(tile * NB + b) * kTile + lane]) * c.xs[m * NB + b];
      }
      y[m * c.O + o] = sum;
    }
  return y;
}

void check_q8() {
  const std::vector<Q8Path> paths = runnable_paths();
  const int64_t shapes[][2] = {{16, 32}, {48, 96}, {256, 1024}, {64, 3072}, {320, 64}};
  const int64_t rows[] = {1, 2, 3, 4, 5, 8, 9, 13};
  const char* kinds[] = {"full int16, pow2 scales", "small int16, pow2 scales", "extremes, pow2 scales",
                         "real data"};
  for (int kind = 0; kind < 4; ++kind) {
    // per path: mismatching outputs (exact kinds) or largest relative error (real data)
    std::vector<double> worst(paths.size(), 0.0), worst_double(paths.size(), 0.0);
    std::vector<int64_t> mismatches(paths.size(), 0), compared(paths.size(), 0);
    for (const auto& shape : shapes)
      for (int64_t M : rows) {
        if (shape[1] >= 3072 && M > 5) continue;  // keep it quick under emulation
        const Q8Case c = make_q8_case(M, shape[1], shape[0], kind);
        const std::vector<double> exact = q8_double(c);
        double scale = 0.0;
        for (double v : exact) scale = std::max(scale, std::fabs(v));
        scale = std::max(scale, 1e-30);
        for (bool accumulate : {false, true}) {
          const std::vector<float> ref = run_q8(c, Q8Path::kScalar, accumulate);
          for (size_t p = 0; p < paths.size(); ++p) {
            const std::vector<float> y = run_q8(c, paths[p], accumulate, (c.O / kTile) / 2);
            for (int64_t i = 0; i < c.M * c.O; ++i) {
              ++compared[p];
              if (std::memcmp(&y[i], &ref[i], 4) != 0) ++mismatches[p];
              worst[p] = std::max(worst[p], std::fabs(double(y[i]) - ref[i]) / scale);
              const double want = exact[i] + (accumulate ? c.y0[i] : 0.0);
              worst_double[p] = std::max(worst_double[p], std::fabs(double(y[i]) - want) / scale);
            }
          }
        }
      }
    for (size_t p = 0; p < paths.size(); ++p) {
      const std::string name = q8_path_name(paths[p]);
      if (kind < 3) {
        report(mismatches[p] == 0, std::string("q8 bit-exact: ") + kinds[kind], name, double(mismatches[p]),
               ("mismatches/" + std::to_string(compared[p])).c_str());
      } else {
        report(worst[p] <= 1e-5, "q8 vs scalar: real data", name, worst[p], "max_rel_err");
        report(worst_double[p] <= 1e-5, "q8 vs fp64: real data", name, worst_double[p], "max_rel_err");
        std::printf("info q8 real data %s: %" PRId64 " of %" PRId64 " outputs differ from scalar in any bit\n",
                    name.c_str(), mismatches[p], compared[p]);
      }
    }
  }
}

// The best path's outputs against the scalar path's (bit for bit) and fp64's, over the
// cases of one kind of input; reported as "<what> bit-exact vs scalar (kind k)" for the
// exact kinds 0-2, "<what> vs scalar / fp64: real data" for kind 3.
struct PairCheck {
  int64_t mismatches = 0, compared = 0;
  double worst = 0.0, worst_double = 0.0;

  // ys[0]: scalar, ys[1]: best path; exact: fp64 products; y0: what was accumulated onto
  void add(const std::vector<float> (&ys)[2], const std::vector<double>& exact, const std::vector<float>& y0,
           bool accumulate, double scale) {
    for (size_t i = 0; i < exact.size(); ++i) {
      ++compared;
      if (std::memcmp(&ys[0][i], &ys[1][i], 4) != 0) ++mismatches;
      worst = std::max(worst, std::fabs(double(ys[1][i]) - ys[0][i]) / scale);
      const double want = exact[i] + (accumulate ? y0[i] : 0.0);
      worst_double = std::max(worst_double, std::fabs(double(ys[1][i]) - want) / scale);
      worst_double = std::max(worst_double, std::fabs(double(ys[0][i]) - want) / scale);
    }
  }

  void report_kind(const std::string& what, int kind, const char* name) const {
    if (kind < 3) {
      report(mismatches == 0, what + " bit-exact vs scalar (kind " + std::to_string(kind) + ")", name,
             double(mismatches), ("mismatches/" + std::to_string(compared)).c_str());
    } else {
      report(worst <= 1e-5, what + " vs scalar: real data", name, worst, "max_rel_err");
      report(worst_double <= 1e-5, what + " vs fp64: real data", name, worst_double, "max_rel_err");
    }
  }
};

// q4: random packed nibbles (every byte is valid), activations as the q8 kinds 0-3; the
// best path against the scalar one (bit for bit with power-of-two scales) and fp64.
void check_q4() {
  const Q4Path paths[] = {Q4Path::kScalar, q4_best_path()};
  const int64_t shapes[][2] = {{16, 32}, {48, 96}, {256, 1024}, {320, 64}};
  const int64_t rows[] = {1, 2, 3, 4, 5, 8, 9};
  for (int kind = 0; kind < 4; ++kind) {
    PairCheck check;
    for (const auto& shape : shapes)
      for (int64_t M : rows) {
        const int64_t O = shape[0], I = shape[1], NB = I / kBlock;
        Q8Case c = make_q8_case(M, I, O, kind);
        std::vector<uint8_t> wq(O * I / 2);
        for (auto& b : wq) b = uint8_t(kind == 2 ? (rand_int(0, 1) ? 0x00 : 0xFF) : rand_int(0, 255));
        std::vector<int32_t> xsum(M * NB);
        for (int64_t m = 0; m < M; ++m) q4_block_sums(c.xq.data() + m * I, I, xsum.data() + m * NB);
        std::vector<double> exact(M * O, 0.0);
        double scale = 1e-30;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t o = 0; o < O; ++o) {
            for (int64_t b = 0; b < NB; ++b) {
              const uint8_t* wb = wq.data() + ((o / kTile) * NB + b) * kQ4TileBlockBytes;
              int64_t dot = 0;
              for (int64_t j = 0; j < kBlock; ++j) dot += int64_t(q4_weight(wb, o % kTile, j)) * c.xq[m * I + b * kBlock + j];
              exact[m * O + o] += double(dot) * half_to_float(c.ws[((o / kTile) * NB + b) * kTile + o % kTile]) * c.xs[m * NB + b];
            }
            scale = std::max(scale, std::fabs(exact[m * O + o]));
          }
        for (bool accumulate : {false, true}) {
          std::vector<float> ys[2];
          for (int p = 0; p < 2; ++p) {
            ys[p] = accumulate ? c.y0 : std::vector<float>(M * O, -1.f);
            const int64_t tiles = O / kTile, mid = tiles / 2;  // two ranges, as two threads
            q4_tiles(paths[p], c.rows(), xsum.data(), wq.data(), c.ws.data(), O, ys[p].data(), accumulate, 0, mid);
            q4_tiles(paths[p], c.rows(), xsum.data(), wq.data(), c.ws.data(), O, ys[p].data(), accumulate, mid, tiles);
          }
          check.add(ys, exact, c.y0, accumulate, scale);
        }
      }
    check.report_kind("q4", kind, q4_path_name(q4_best_path()));
  }
}

// q4a8: random packed nibbles, int8 activations: full range, small, extremes (all with
// power-of-two scales: bit for bit) and real data (quantized by a8_quantize_row); the
// best path against the scalar one and fp64.
void check_q4a8() {
  const Q4A8Path paths[] = {Q4A8Path::kScalar, q4a8_best_path()};
  const int64_t shapes[][2] = {{16, 32}, {48, 96}, {256, 1024}, {320, 64}};
  const int64_t rows[] = {1, 2, 3, 4, 5, 8, 9};
  for (int kind = 0; kind < 4; ++kind) {
    PairCheck check;
    for (const auto& shape : shapes)
      for (int64_t M : rows) {
        const int64_t O = shape[0], I = shape[1], NB = I / kBlock;
        std::vector<uint8_t> wq(O * I / 2);
        for (auto& b : wq) b = uint8_t(kind == 2 ? (rand_int(0, 1) ? 0x00 : 0xFF) : rand_int(0, 255));
        std::vector<uint16_t> ws(O * NB);
        for (auto& v : ws) v = uint16_t((rand_int(0, 1) << 15) | (rand_int(10, 18) << 10));  // +-2^-5 .. 2^3
        std::vector<int8_t> xq(M * I), xp(M * I);
        std::vector<float> xs(M * NB), xf(M * I);
        std::vector<int32_t> xsum(M * NB);
        if (kind == 3) {
          for (auto& v : xf) v = rand_normal() * (rand_int(0, 9) == 0 ? 30.f : 1.f);
          for (int64_t m = 0; m < M; ++m)
            a8_quantize_row(xf.data() + m * I, I, xq.data() + m * I, xs.data() + m * NB, xsum.data() + m * NB);
        } else {
          for (auto& v : xq) v = int8_t(kind == 0 ? rand_int(-127, 127) : kind == 1 ? rand_int(-3, 3)
                                                                                    : (rand_int(0, 1) ? 127 : -127));
          for (auto& v : xs) v = std::ldexp(1.f, rand_int(-12, -4));
          for (int64_t m = 0; m < M; ++m)
            for (int64_t b = 0; b < NB; ++b) {
              int32_t t = 0;
              for (int64_t j = 0; j < kBlock; ++j) t += xq[m * I + b * kBlock + j];
              xsum[m * NB + b] = t;
            }
        }
        for (int64_t m = 0; m < M; ++m) a8_interleave_row(xq.data() + m * I, I, xp.data() + m * I);
        const A8Rows x{xq.data(), xp.data(), xs.data(), xsum.data(), M, I};
        std::vector<float> y0(M * O);
        for (auto& v : y0) v = std::ldexp(float(rand_int(-64, 64)), -4);
        std::vector<double> exact(M * O, 0.0);
        double scale = 1e-30;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t o = 0; o < O; ++o) {
            for (int64_t b = 0; b < NB; ++b) {
              const uint8_t* wb = wq.data() + ((o / kTile) * NB + b) * kQ4TileBlockBytes;
              int64_t dot = 0;
              for (int64_t j = 0; j < kBlock; ++j) dot += int64_t(q4_weight(wb, o % kTile, j)) * xq[m * I + b * kBlock + j];
              exact[m * O + o] += double(dot) * half_to_float(ws[((o / kTile) * NB + b) * kTile + o % kTile]) * xs[m * NB + b];
            }
            scale = std::max(scale, std::fabs(exact[m * O + o]));
          }
        for (bool accumulate : {false, true}) {
          std::vector<float> ys[2];
          for (int p = 0; p < 2; ++p) {
            ys[p] = accumulate ? y0 : std::vector<float>(M * O, -1.f);
            const int64_t tiles = O / kTile, mid = tiles / 2;  // two ranges, as two threads
            q4a8_tiles(paths[p], x, wq.data(), ws.data(), O, ys[p].data(), accumulate, 0, mid);
            q4a8_tiles(paths[p], x, wq.data(), ws.data(), O, ys[p].data(), accumulate, mid, tiles);
          }
          check.add(ys, exact, y0, accumulate, scale);
        }
      }
    check.report_kind("q4a8", kind, q4a8_path_name(q4a8_best_path()));
  }
}

void check_q8_choice(const char* expect, const char* expect_active) {
  const Q8Path best = q8_best_path();
  std::printf("info q8 best path on this CPU: %s; active (RWKV_NVIM_Q8_ISA=%s): %s\n", q8_path_name(best),
              std::getenv("RWKV_NVIM_Q8_ISA") ? std::getenv("RWKV_NVIM_Q8_ISA") : "", q8_path_name(q8_active_path()));
  bool ok = q8_select_path(best, nullptr) == best && q8_select_path(best, "") == best &&
            q8_select_path(best, "no-such-isa") == best && q8_select_path(best, "scalar") == Q8Path::kScalar &&
            q8_select_path(best, q8_path_name(best)) == best &&
            q8_select_path(Q8Path::kNeonDotprod, "neon") == Q8Path::kNeon &&
            q8_select_path(Q8Path::kNeon, "neon-dotprod") == Q8Path::kNeon &&
            q8_select_path(Q8Path::kAvx2, "avx512-vnni") == Q8Path::kAvx2 &&
            q8_select_path(Q8Path::kAvx2, "neon") == Q8Path::kAvx2;
  report(ok, "q8 path selection rules", q8_path_name(best), ok ? 0 : 1, "errors");
  if (expect != nullptr) report(std::strcmp(q8_path_name(best), expect) == 0, std::string("q8 detected = ") + expect,
                                q8_path_name(best), 0, "-");
  if (expect_active != nullptr)
    report(std::strcmp(q8_path_name(q8_active_path()), expect_active) == 0,
           std::string("q8 active = ") + expect_active, q8_path_name(q8_active_path()), 0, "-");
}

// ---------------------------------------------------------------- transcendental loops

void check_math() {
  const int64_t n = 4099;  // not a multiple of 4: the tails too
  std::vector<float> a(n), b(n), c(n), d(n);
  auto fill = [&](std::vector<float>& v, float lo, float hi) {
    for (auto& x : v) x = rand_uniform(lo, hi);
  };
  struct Case {
    const char* name;
    double tol;  // absolute, on outputs of size ~1 (decay: relative to |w|)
  };
  auto compare = [&](const char* name, const std::vector<float>& fast, const std::vector<float>& ref,
                     const std::vector<double>& exact, const char* path) {
    double err = 0.0, err_exact = 0.0, err_ref_exact = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double s = std::max(1.0, std::fabs(exact[i]));
      err = std::max(err, std::fabs(double(fast[i]) - ref[i]) / s);
      err_exact = std::max(err_exact, std::fabs(double(fast[i]) - exact[i]) / s);
      err_ref_exact = std::max(err_ref_exact, std::fabs(double(ref[i]) - exact[i]) / s);
    }
    report(err <= 1e-6, std::string(name) + " vs scalar", path, err);
    report(err_exact <= 2e-6, std::string(name) + " vs fp64", path, err_exact);
    if (std::strcmp(path, "scalar") != 0) report(err_ref_exact <= 2e-6, std::string(name) + " vs fp64", "scalar", err_ref_exact);
  };
  auto sig = [](double z) { return 1.0 / (1.0 + std::exp(-z)); };
  auto softplus = [](double z) { return std::max(z, 0.0) + std::log1p(std::exp(-std::fabs(z))); };
#if defined(RWKV_CPU_NEON_MATH)
  const char* path = "neon";
#define RWKV_FAST(fn) fn##_neon
#else
  const char* path = "scalar";
#define RWKV_FAST(fn) fn##_scalar
#endif
  std::vector<double> exact(n);
  // tanh, sigmoid: LoRA outputs
  fill(a, -12.f, 12.f);
  b = a;
  c = a;
  RWKV_FAST(tanh_array)(b.data(), n);
  tanh_array_scalar(c.data(), n);
  for (int64_t i = 0; i < n; ++i) exact[i] = std::tanh(double(a[i]));
  compare("tanh", b, c, exact, path);
  fill(a, -30.f, 30.f);
  b = a;
  c = a;
  RWKV_FAST(sigmoid_array)(b.data(), n);
  sigmoid_array_scalar(c.data(), n);
  for (int64_t i = 0; i < n; ++i) exact[i] = sig(a[i]);
  compare("sigmoid", b, c, exact, path);
  // decay: w0 + lora in [-12, 12]
  fill(a, -6.f, 6.f);
  fill(d, -6.f, 6.f);
  b = a;
  c = a;
  RWKV_FAST(decay_array)(b.data(), d.data(), n);
  decay_array_scalar(c.data(), d.data(), n);
  for (int64_t i = 0; i < n; ++i) exact[i] = -softplus(-(double(d[i]) + a[i])) - 0.5;
  compare("decay (softplus)", b, c, exact, path);
  // in-context rate
  fill(a, -10.f, 10.f);
  fill(d, -10.f, 10.f);
  b = a;
  c = a;
  RWKV_FAST(sigmoid_bias_array)(b.data(), d.data(), n);
  sigmoid_bias_array_scalar(c.data(), d.data(), n);
  for (int64_t i = 0; i < n; ++i) exact[i] = sig(double(d[i]) + a[i]);
  compare("sigmoid(a0 + a)", b, c, exact, path);
  // value residual
  std::vector<float> vf(n), t(n), v0(n);
  fill(a, -3.f, 3.f);
  fill(vf, -3.f, 3.f);
  fill(t, -8.f, 8.f);
  fill(v0, -4.f, 4.f);
  b = a;
  c = a;
  RWKV_FAST(value_mix_array)(b.data(), vf.data(), t.data(), v0.data(), n);
  value_mix_array_scalar(c.data(), vf.data(), t.data(), v0.data(), n);
  for (int64_t i = 0; i < n; ++i) exact[i] = double(a[i]) + (double(vf[i]) - a[i]) * sig(double(v0[i]) + t[i]);
  compare("value mix", b, c, exact, path);
#undef RWKV_FAST
}

// ---------------------------------------------------------------- WKV head

struct WkvInputs {
  int64_t T = 0, H = 0;
  std::vector<float> S, r, w, k, v, a, b;
};

// Shaped like the model's (tests/core/test_kernel_cpu.py): a = -kk, b = kk * gate, |kk| = 1.
WkvInputs make_wkv(int64_t T, int64_t H) {
  WkvInputs in;
  in.T = T;
  in.H = H;
  const int64_t n = T * H * kHeadSize;
  in.S.resize(H * kHeadSize * kHeadSize);
  for (auto& x : in.S) x = rand_normal(0.5f);
  for (auto* vec : {&in.r, &in.w, &in.k, &in.v, &in.a, &in.b}) vec->resize(n);
  for (int64_t i = 0; i < n; ++i) {
    in.r[i] = rand_normal(0.5f);
    in.w[i] = -0.6f - 2.5f * rand_uniform(0.f, 1.f);
    in.k[i] = rand_normal(0.5f);
    in.v[i] = rand_normal(0.5f);
  }
  for (int64_t th = 0; th < T * H; ++th) {
    float kk[kHeadSize], ss = 0.f;
    for (int64_t j = 0; j < kHeadSize; ++j) {
      kk[j] = rand_normal();
      ss += kk[j] * kk[j];
    }
    const float inv = 1.f / std::sqrt(ss);
    for (int64_t j = 0; j < kHeadSize; ++j) {
      in.a[th * kHeadSize + j] = -kk[j] * inv;
      in.b[th * kHeadSize + j] = kk[j] * inv * rand_uniform(0.f, 1.f);
    }
  }
  return in;
}

// The recurrence in double, per head (ground truth for both layouts).
void wkv_double(const WkvInputs& in, std::vector<double>& S, std::vector<double>& y) {
  const int64_t H = in.H, N = kHeadSize, stride = H * N;
  S.assign(in.S.begin(), in.S.end());
  y.assign(in.T * stride, 0.0);
  for (int64_t h = 0; h < H; ++h) {
    double* Sh = S.data() + h * N * N;
    for (int64_t t = 0; t < in.T; ++t) {
      const int64_t off = t * stride + h * N;
      double sa[kHeadSize];
      for (int64_t i = 0; i < N; ++i) {
        sa[i] = 0.0;
        for (int64_t j = 0; j < N; ++j) sa[i] += Sh[i * N + j] * in.a[off + j];
      }
      for (int64_t i = 0; i < N; ++i) {
        double out = 0.0;
        for (int64_t j = 0; j < N; ++j) {
          const double decay = std::exp(-std::exp(double(in.w[off + j])));
          double& s = Sh[i * N + j];
          s = s * decay + sa[i] * in.b[off + j] + double(in.v[off + i]) * in.k[off + j];
          out += s * in.r[off + j];
        }
        y[off + i] = out;
      }
    }
  }
}

using RowsFn = void (*)(int64_t, int64_t, const float*, float*, const float*, const float*, const float*,
                        const float*, const float*, const float*, float*);
using ColsFn = void (*)(int64_t, int64_t, float*, const float*, const float*, const float*, const float*,
                        const float*, const float*, float*);

// Runs one layout over every head; returns (y, S).
std::pair<std::vector<float>, std::vector<float>> run_wkv(const WkvInputs& in, RowsFn rows, ColsFn cols,
                                                          bool in_place) {
  const int64_t H = in.H, N = kHeadSize, stride = H * N;
  std::vector<float> S = in.S, S_out(S.size(), 0.f), y(in.T * stride, 0.f);
  for (int64_t h = 0; h < H; ++h) {
    float* Sh = S.data() + h * N * N;
    const int64_t o = h * N;
    if (cols != nullptr) {
      cols(in.T, stride, Sh, in.r.data() + o, in.w.data() + o, in.k.data() + o, in.v.data() + o, in.a.data() + o,
           in.b.data() + o, y.data() + o);
    } else {
      float* dst = in_place ? Sh : S_out.data() + h * N * N;
      rows(in.T, stride, Sh, dst, in.r.data() + o, in.w.data() + o, in.k.data() + o, in.v.data() + o,
           in.a.data() + o, in.b.data() + o, y.data() + o);
    }
  }
  if (cols == nullptr && !in_place) S = S_out;
  return {y, S};
}

void check_wkv() {
#if defined(RWKV_CPU_NEON_WKV)
  const char* path = "neon";
  const RowsFn rows_fast = wkv7_head_rows_neon;
  const ColsFn cols_fast = wkv7_head_cols_neon;
#else
  const char* path = "scalar";
  const RowsFn rows_fast = wkv7_head_rows_scalar;
  const ColsFn cols_fast = wkv7_head_cols_scalar;
#endif
  struct Layout {
    const char* name;
    int64_t T;
    bool cols, in_place;
  };
  const Layout layouts[] = {{"wkv rows T=1 in place", 1, false, true}, {"wkv rows T=1 out of place", 1, false, false},
                            {"wkv rows T=3 out of place", 3, false, false}, {"wkv cols T=4", 4, true, false},
                            {"wkv cols T=33", 33, true, false}};
  for (const Layout& l : layouts) {
    const WkvInputs in = make_wkv(l.T, 3);
    const auto fast = run_wkv(in, rows_fast, l.cols ? cols_fast : nullptr, l.in_place);
    const auto ref = run_wkv(in, wkv7_head_rows_scalar, l.cols ? wkv7_head_cols_scalar : nullptr, l.in_place);
    std::vector<double> S, y;
    wkv_double(in, S, y);
    double err = 0.0, err_exact = 0.0, err_ref = 0.0;
    for (size_t i = 0; i < y.size(); ++i) {
      err = std::max(err, double(std::fabs(fast.first[i] - ref.first[i])));
      err_exact = std::max(err_exact, std::fabs(fast.first[i] - y[i]));
      err_ref = std::max(err_ref, std::fabs(ref.first[i] - y[i]));
    }
    for (size_t i = 0; i < S.size(); ++i) {
      err = std::max(err, double(std::fabs(fast.second[i] - ref.second[i])));
      err_exact = std::max(err_exact, std::fabs(fast.second[i] - S[i]));
      err_ref = std::max(err_ref, std::fabs(ref.second[i] - S[i]));
    }
    // the CPU kernel's tests allow 1e-4 against the torch reference
    report(err <= 1e-5, std::string(l.name) + " vs scalar", path, err, "max_abs_err");
    report(err_exact <= 1e-4, std::string(l.name) + " vs fp64", path, err_exact, "max_abs_err");
    if (std::strcmp(path, "scalar") != 0)
      report(err_ref <= 1e-4, std::string(l.name) + " vs fp64", "scalar", err_ref, "max_abs_err");
  }
}

}  // namespace

int main(int argc, char** argv) {
  const char* expect = nullptr;
  const char* expect_active = nullptr;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--expect") == 0) expect = argv[i + 1];
    else if (std::strcmp(argv[i], "--expect-active") == 0) expect_active = argv[i + 1];
  }
#if defined(__aarch64__)
  std::printf("info arch aarch64\n");
#elif defined(__x86_64__)
  std::printf("info arch x86_64\n");
#endif
  check_q8_choice(expect, expect_active);
  check_half_to_float();
  check_q8();
  check_q4();
  check_q4a8();
  check_math();
  check_wkv();
  if (g_failures == 0) {
    std::printf("ALL OK\n");
    return 0;
  }
  std::printf("FAILED %d\n", g_failures);
  return 1;
}
