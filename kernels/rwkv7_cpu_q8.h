// The arithmetic of the q8 product (layout in rwkv7_cpu_linear.h), without torch: raw
// pointers and sizes, so that kernels/tests/cpu_kernels_check.cpp can check every
// instruction-set path against the scalar reference (natively, and cross-built for
// aarch64 under qemu-aarch64). rwkv7_cpu_linear.cpp adds the threads (at::parallel_for
// over tiles) and the torch op.
//
// Paths ("q8: <name>" in `rwkv-nvim kernels` / `info`):
//   avx512-vnni, avx512bw, avx2  x86, chosen when compiling (-march=native): one of them
//                                is built in, beside the scalar one
//   neon-dotprod                 aarch64 with the dotprod extension (SDOT), chosen at RUN
//                                time (getauxval HWCAP_ASIMDDP on Linux,
//                                hw.optional.arm.FEAT_DotProd on macOS); compiled with a
//                                target attribute, so one binary serves both kinds of core
//   neon                         any aarch64 core: widening int16 multiply-adds (SMLAL)
//   scalar                       plain loops; also the reference every path is tested against
// Every path computes each block's dot product sum_j q[o, j] * xq[m, j] exactly in int32,
// so the block sums are bit for bit the scalar ones; the fp32 combination
// y += dot * (scale_w * scale_x) runs in the same block order in every path.
// RWKV_NVIM_Q8_ISA=<name> picks a narrower path than the best one (benchmarks, tests);
// a name this CPU or build cannot run is ignored.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "rwkv7_cpu_linear.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__aarch64__) && defined(__ARM_NEON)
#define RWKV_CPU_NEON 1
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#if defined(__APPLE__)
#include <sys/sysctl.h>
#endif
// The SDOT path: compiled for the whole file when the target has dotprod (Apple's arm64
// default, or -march=...+dotprod), else only inside functions with a target attribute
// (GCC >= 10, LLVM clang >= 16, whose arm_neon.h allows SDOT under such an attribute).
#if defined(__ARM_FEATURE_DOTPROD)
#define RWKV_CPU_DOTPROD 1
#define RWKV_DOTPROD_TARGET
#elif defined(__clang__) && !defined(__apple_build_version__) && __clang_major__ >= 16
#define RWKV_CPU_DOTPROD 1
#define RWKV_DOTPROD_TARGET __attribute__((target("dotprod")))
#elif defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#define RWKV_CPU_DOTPROD 1
#define RWKV_DOTPROD_TARGET __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#endif

namespace rwkv_cpu {

constexpr int64_t kPairs = kBlock / 2;  // 16 input pairs per block
constexpr float kActMax = 32767.f;

enum class Q8Path : int { kScalar = 0, kAvx2, kAvx512bw, kAvx512vnni, kNeon, kNeonDotprod };

inline const char* q8_path_name(Q8Path p) {
  switch (p) {
    case Q8Path::kAvx2: return "avx2";
    case Q8Path::kAvx512bw: return "avx512bw";
    case Q8Path::kAvx512vnni: return "avx512-vnni";
    case Q8Path::kNeon: return "neon";
    case Q8Path::kNeonDotprod: return "neon-dotprod";
    default: return "scalar";
  }
}

// fp16 bits -> fp32, exact (all 65536 values are checked against the hardware
// conversion by the test driver).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu, bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (man << 13);             // inf, nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);    // normal: rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;                                         // +-0
  } else {                                               // subnormal: man * 2^-24
    uint32_t e = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One row: xq[I] int16, xs[I/32]: per block, scale = max|x| / 32767.
inline void q8_quantize_row(const float* x, int64_t I, int16_t* xq, float* xs) {
  const int64_t NB = I / kBlock;
  for (int64_t b = 0; b < NB; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.f;
#pragma omp simd reduction(max : amax)
    for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float scale = amax / kActMax;
    const float inv = amax > 0.f ? kActMax / amax : 0.f;
    int16_t* qb = xq + b * kBlock;
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) qb[j] = static_cast<int16_t>(std::nearbyint(xb[j] * inv));
    xs[b] = scale;
  }
}

// For the SDOT path (int8 x int8 only): x = 256 h + l + 128 with h = x >> 8 and
// l = (x & 255) - 128, both int8 for every int16 x, so
//   sum q x = 256 sum q h + sum q l + 128 sum q     (exact in int32)
inline void q8_split_activations(const int16_t* xq, int64_t n, int8_t* xh, int8_t* xl) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const int32_t v = xq[i];
    xh[i] = static_cast<int8_t>(v >> 8);
    xl[i] = static_cast<int8_t>((v & 255) - 128);
  }
}

// The quantized activations of M rows, as every path reads them.
struct Q8Rows {
  const int16_t* xq;  // [M, I]
  const float* xs;    // [M, I/32]
  const int8_t* xh;   // [M, I] (neon-dotprod only, else null): q8_split_activations
  const int8_t* xl;   // [M, I]
  int64_t M, I;
};

// rows(std::integral_constant<int, R>{}) for the row count R (1..Max) of a group: each
// path's tile kernel is a template on its row count.
template <int R, int Max, typename F>
inline void with_rows(int64_t rows, F&& f) {
  if constexpr (R >= Max) {
    f(std::integral_constant<int, Max>{});
  } else {
    if (rows == R) f(std::integral_constant<int, R>{});
    else with_rows<R + 1, Max>(rows, f);
  }
}

// The loop every path runs: tiles t0..t1, and in each the rows in groups of up to
// MaxRows: tile(R, t, m0) with R the group's row count as an integral_constant.
template <int MaxRows, typename Tile>
inline void for_tile_rows(int64_t M, int64_t t0, int64_t t1, Tile&& tile) {
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t m0 = 0; m0 < M; m0 += MaxRows)
      with_rows<1, MaxRows>(std::min<int64_t>(MaxRows, M - m0), [&](auto R) { tile(R, t, m0); });
}

// ---------------------------------------------------------------- scalar (the reference)

// One output o of the packed layout for one row.
inline float q8_dot_scalar(const int16_t* xq, const float* xs, int64_t NB, const int8_t* wq,
                           const uint16_t* ws, int64_t o) {
  const int64_t tile = o / kTile, lane = o % kTile;
  float sum = 0.f;
  for (int64_t b = 0; b < NB; ++b) {
    const int8_t* wb = wq + (tile * NB + b) * kTileBlockBytes;
    int32_t dot = 0;
    for (int64_t g = 0; g < kPairs; ++g)
      for (int64_t p = 0; p < 2; ++p)
        dot += static_cast<int32_t>(wb[g * 32 + lane * 2 + p]) * xq[b * kBlock + 2 * g + p];
    sum += static_cast<float>(dot) * (half_to_float(ws[(tile * NB + b) * kTile + lane]) * xs[b]);
  }
  return sum;
}

// y[:, 16 t0 : 16 t1] for all rows (y [M, O]; = or += when accumulate).
inline void q8_tiles_scalar(const Q8Rows& x, const int8_t* wq, const uint16_t* ws, int64_t O,
                            float* y, bool accumulate, int64_t t0, int64_t t1) {
  const int64_t NB = x.I / kBlock;
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t m = 0; m < x.M; ++m)
      for (int64_t o = t * kTile; o < (t + 1) * kTile; ++o) {
        const float v = q8_dot_scalar(x.xq + m * x.I, x.xs + m * NB, NB, wq, ws, o);
        y[m * O + o] = accumulate ? y[m * O + o] + v : v;
      }
}

inline int32_t q8_load_pair(const int16_t* p) {  // two int16 as one 32-bit lane
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// ---------------------------------------------------------------- x86 (compile time)
#if defined(__AVX512BW__)
constexpr int64_t kX86MaxRows = 8;
constexpr Q8Path kX86Path =
#if defined(__AVX512VNNI__)
    Q8Path::kAvx512vnni;
#else
    Q8Path::kAvx512bw;
#endif

// One tile (16 outputs) for R rows: y[r, 0:16] over all NB blocks.
template <int R>
inline void q8_tile_x86(const int16_t* xq, const float* xs, int64_t I, int64_t NB, const int8_t* wt,
                        const uint16_t* st, float* y, int64_t O, bool accumulate) {
  __m512 accf[R];
  for (int r = 0; r < R; ++r) accf[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < NB; ++b) {
    const int8_t* wb = wt + b * kTileBlockBytes;
    const int16_t* xb = xq + b * kBlock;
    if constexpr (R >= 4) {  // compute-heavy rows: fetch 4 blocks (2 KiB) ahead meanwhile
      for (int64_t line = 0; line < kTileBlockBytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(wb + 4 * kTileBlockBytes + line), _MM_HINT_T0);
    }
    // S independent sums per row for few rows (pairs g, g + S, ...), so one row's chain
    // of dependent multiply-adds does not wait on the instruction latency
    constexpr int S = R == 1 ? 4 : (R == 2 ? 2 : 1);
    __m512i acci[R][S];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < S; ++u) acci[r][u] = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int64_t g = 0; g < kPairs; ++g) {
      // 32 int8 = 16 outputs x (q[o, 2g], q[o, 2g + 1]) -> 16 lanes of int16 pairs
      const __m512i w = _mm512_cvtepi8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + g * 32)));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512i xv = _mm512_set1_epi32(q8_load_pair(xb + r * I + 2 * g));
        __m512i& acc = acci[r][g % S];
#if defined(__AVX512VNNI__)
        acc = _mm512_dpwssd_epi32(acc, w, xv);
#else
        acc = _mm512_add_epi32(acc, _mm512_madd_epi16(w, xv));
#endif
      }
    }
    for (int r = 0; r < R; ++r)
      for (int u = 1; u < S; ++u) acci[r][0] = _mm512_add_epi32(acci[r][0], acci[r][u]);
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(st + b * kTile)));
    for (int r = 0; r < R; ++r)
      accf[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acci[r][0]),
                                _mm512_mul_ps(s, _mm512_set1_ps(xs[r * NB + b])), accf[r]);
  }
  for (int r = 0; r < R; ++r) {
    float* yr = y + r * O;
    if (accumulate) accf[r] = _mm512_add_ps(accf[r], _mm512_loadu_ps(yr));
    _mm512_storeu_ps(yr, accf[r]);
  }
}
#elif defined(__AVX2__)
constexpr int64_t kX86MaxRows = 4;
constexpr Q8Path kX86Path = Q8Path::kAvx2;

template <int R>
inline void q8_tile_x86(const int16_t* xq, const float* xs, int64_t I, int64_t NB, const int8_t* wt,
                        const uint16_t* st, float* y, int64_t O, bool accumulate) {
  __m256 lo[R], hi[R];  // outputs 0-7 and 8-15 of the tile
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < NB; ++b) {
    const int8_t* wb = wt + b * kTileBlockBytes;
    const int16_t* xb = xq + b * kBlock;
    __m256i ilo[R], ihi[R];
    for (int r = 0; r < R; ++r) ilo[r] = ihi[r] = _mm256_setzero_si256();
#pragma GCC unroll 16
    for (int64_t g = 0; g < kPairs; ++g) {
      const __m256i wl = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + g * 32)));
      const __m256i wh = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + g * 32 + 16)));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i xv = _mm256_set1_epi32(q8_load_pair(xb + r * I + 2 * g));
        ilo[r] = _mm256_add_epi32(ilo[r], _mm256_madd_epi16(wl, xv));
        ihi[r] = _mm256_add_epi32(ihi[r], _mm256_madd_epi16(wh, xv));
      }
    }
    const __m256 sl = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + b * kTile)));
    const __m256 sh = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + b * kTile + 8)));
    for (int r = 0; r < R; ++r) {
      const __m256 xsb = _mm256_set1_ps(xs[r * NB + b]);
      lo[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ilo[r]), _mm256_mul_ps(sl, xsb), lo[r]);
      hi[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ihi[r]), _mm256_mul_ps(sh, xsb), hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* yr = y + r * O;
    if (accumulate) {
      lo[r] = _mm256_add_ps(lo[r], _mm256_loadu_ps(yr));
      hi[r] = _mm256_add_ps(hi[r], _mm256_loadu_ps(yr + 8));
    }
    _mm256_storeu_ps(yr, lo[r]);
    _mm256_storeu_ps(yr + 8, hi[r]);
  }
}
#endif

#if defined(__AVX512BW__) || defined(__AVX2__)
#define RWKV_CPU_X86_Q8 1
inline void q8_tiles_x86(const Q8Rows& x, const int8_t* wq, const uint16_t* ws, int64_t O, float* y,
                         bool accumulate, int64_t t0, int64_t t1) {
  const int64_t I = x.I, NB = I / kBlock;
  for_tile_rows<kX86MaxRows>(x.M, t0, t1, [&](auto R, int64_t t, int64_t m0) {
    q8_tile_x86<decltype(R)::value>(x.xq + m0 * I, x.xs + m0 * NB, I, NB, wq + t * NB * kTileBlockBytes,
                                    ws + t * NB * kTile, y + m0 * O + t * kTile, O, accumulate);
  });
}
#endif

// ---------------------------------------------------------------- aarch64 NEON
#if defined(RWKV_CPU_NEON)
constexpr int64_t kNeonMaxRows = 4;

// One tile (16 outputs) for R rows with SMLAL (int16 x int16 -> int32, by element).
// Per input pair g the 32 weight bytes hold (q[o, 2g], q[o, 2g + 1]) for o = 0..15;
// UZP1/UZP2 split them into the 16 even-input and 16 odd-input weights, SXTL widens
// those to int16, and each is multiplied by one activation lane: no horizontal sums.
template <int R>
inline void q8_tile_neon(const int16_t* xq, const float* xs, int64_t I, int64_t NB, const int8_t* wt,
                         const uint16_t* st, float* y, int64_t O, bool accumulate) {
  // one row: two sets of sums (even and odd inputs) so the SMLAL chains can overlap
  constexpr int S = R == 1 ? 2 : 1;
  float32x4_t accf[R][4];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < 4; ++k) accf[r][k] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < NB; ++b) {
    const int8_t* wb = wt + b * kTileBlockBytes;
    const int16_t* xb = xq + b * kBlock;
    int32x4_t acc[R][S][4];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < S; ++u)
        for (int k = 0; k < 4; ++k) acc[r][u][k] = vdupq_n_s32(0);
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {  // activations 8q .. 8q + 7: pairs 4q .. 4q + 3
      int16x8_t xv[R];
      for (int r = 0; r < R; ++r) xv[r] = vld1q_s16(xb + r * I + 8 * q);
      // pair g = 4q + L: even input in lane 2L, odd input in lane 2L + 1
#define RWKV_Q8_NEON_PAIR(L)                                                             \
  {                                                                                      \
    const int8_t* wg = wb + (4 * q + (L)) * 32;                                          \
    const int8x16_t w0 = vld1q_s8(wg), w1 = vld1q_s8(wg + 16);                           \
    const int8x16_t we = vuzp1q_s8(w0, w1), wo = vuzp2q_s8(w0, w1);                      \
    const int16x8_t el = vmovl_s8(vget_low_s8(we)), eh = vmovl_high_s8(we);              \
    const int16x8_t ol = vmovl_s8(vget_low_s8(wo)), oh = vmovl_high_s8(wo);              \
    for (int r = 0; r < R; ++r) {                                                        \
      int32x4_t* ae = acc[r][0];                                                         \
      int32x4_t* ao = acc[r][S - 1];                                                     \
      ae[0] = vmlal_laneq_s16(ae[0], vget_low_s16(el), xv[r], 2 * (L));                  \
      ae[1] = vmlal_high_laneq_s16(ae[1], el, xv[r], 2 * (L));                           \
      ae[2] = vmlal_laneq_s16(ae[2], vget_low_s16(eh), xv[r], 2 * (L));                  \
      ae[3] = vmlal_high_laneq_s16(ae[3], eh, xv[r], 2 * (L));                           \
      ao[0] = vmlal_laneq_s16(ao[0], vget_low_s16(ol), xv[r], 2 * (L) + 1);              \
      ao[1] = vmlal_high_laneq_s16(ao[1], ol, xv[r], 2 * (L) + 1);                       \
      ao[2] = vmlal_laneq_s16(ao[2], vget_low_s16(oh), xv[r], 2 * (L) + 1);              \
      ao[3] = vmlal_high_laneq_s16(ao[3], oh, xv[r], 2 * (L) + 1);                       \
    }                                                                                    \
  }
      RWKV_Q8_NEON_PAIR(0)
      RWKV_Q8_NEON_PAIR(1)
      RWKV_Q8_NEON_PAIR(2)
      RWKV_Q8_NEON_PAIR(3)
#undef RWKV_Q8_NEON_PAIR
    }
    const uint16_t* sb = st + b * kTile;
    float32x4_t s[4];
    for (int k = 0; k < 4; ++k) s[k] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sb + 4 * k)));
    for (int r = 0; r < R; ++r) {
      const float xsb = xs[r * NB + b];
      for (int k = 0; k < 4; ++k) {
        const int32x4_t dot = S == 2 ? vaddq_s32(acc[r][0][k], acc[r][S - 1][k]) : acc[r][0][k];
        accf[r][k] = vfmaq_f32(accf[r][k], vcvtq_f32_s32(dot), vmulq_n_f32(s[k], xsb));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float* yr = y + r * O;
    for (int k = 0; k < 4; ++k) {
      if (accumulate) accf[r][k] = vaddq_f32(accf[r][k], vld1q_f32(yr + 4 * k));
      vst1q_f32(yr + 4 * k, accf[r][k]);
    }
  }
}

inline void q8_tiles_neon(const Q8Rows& x, const int8_t* wq, const uint16_t* ws, int64_t O, float* y,
                          bool accumulate, int64_t t0, int64_t t1) {
  const int64_t I = x.I, NB = I / kBlock;
  for_tile_rows<kNeonMaxRows>(x.M, t0, t1, [&](auto R, int64_t t, int64_t m0) {
    q8_tile_neon<decltype(R)::value>(x.xq + m0 * I, x.xs + m0 * NB, I, NB, wq + t * NB * kTileBlockBytes,
                                     ws + t * NB * kTile, y + m0 * O + t * kTile, O, accumulate);
  });
}

#if defined(RWKV_CPU_DOTPROD)
// One tile for R rows with SDOT (4 int8 x int8 products into each int32 lane), the
// activations split as in q8_split_activations. Two input pairs (g, g + 1) of the
// packed weights, zipped by 16-bit units (ZIP1/ZIP2), give each output its 4
// consecutive inputs in one 32-bit lane; SDOT by element takes the 4 matching
// activations from one lane of the activation register. Half a tile (8 outputs) at a
// time keeps the sums in registers.
template <int R>
RWKV_DOTPROD_TARGET inline void q8_tile_dotprod(const int8_t* xh, const int8_t* xl, const float* xs,
                                                int64_t I, int64_t NB, const int8_t* wt,
                                                const uint16_t* st, float* y, int64_t O,
                                                bool accumulate) {
  const int8x16_t ones = vdupq_n_s8(1);
  for (int half = 0; half < 2; ++half) {  // outputs 8 half .. 8 half + 7
    float32x4_t accf[R][2];
    for (int r = 0; r < R; ++r) accf[r][0] = accf[r][1] = vdupq_n_f32(0.f);
    for (int64_t b = 0; b < NB; ++b) {
      const int8_t* wb = wt + b * kTileBlockBytes + 16 * half;
      int32x4_t sw[2] = {vdupq_n_s32(0), vdupq_n_s32(0)};  // sum q, per output
      int32x4_t ah[R][2], al[R][2];
      for (int r = 0; r < R; ++r) ah[r][0] = ah[r][1] = al[r][0] = al[r][1] = vdupq_n_s32(0);
#pragma GCC unroll 2
      for (int q = 0; q < 2; ++q) {  // activations 16q .. 16q + 15: pairs 8q .. 8q + 7
        int8x16_t vh[R], vl[R];
        for (int r = 0; r < R; ++r) {
          vh[r] = vld1q_s8(xh + r * I + b * kBlock + 16 * q);
          vl[r] = vld1q_s8(xl + r * I + b * kBlock + 16 * q);
        }
        // pairs g = 8q + 2L and g + 1: inputs 16q + 4L .. + 3 = lane L of vh / vl
#define RWKV_Q8_SDOT_QUAD(L)                                                            \
  {                                                                                     \
    const int16x8_t pa = vreinterpretq_s16_s8(vld1q_s8(wb + (8 * q + 2 * (L)) * 32));   \
    const int16x8_t pb = vreinterpretq_s16_s8(vld1q_s8(wb + (8 * q + 2 * (L) + 1) * 32)); \
    const int8x16_t w0 = vreinterpretq_s8_s16(vzip1q_s16(pa, pb));                      \
    const int8x16_t w1 = vreinterpretq_s8_s16(vzip2q_s16(pa, pb));                      \
    sw[0] = vdotq_s32(sw[0], w0, ones);                                                 \
    sw[1] = vdotq_s32(sw[1], w1, ones);                                                 \
    for (int r = 0; r < R; ++r) {                                                       \
      ah[r][0] = vdotq_laneq_s32(ah[r][0], w0, vh[r], L);                               \
      ah[r][1] = vdotq_laneq_s32(ah[r][1], w1, vh[r], L);                               \
      al[r][0] = vdotq_laneq_s32(al[r][0], w0, vl[r], L);                               \
      al[r][1] = vdotq_laneq_s32(al[r][1], w1, vl[r], L);                               \
    }                                                                                   \
  }
        RWKV_Q8_SDOT_QUAD(0)
        RWKV_Q8_SDOT_QUAD(1)
        RWKV_Q8_SDOT_QUAD(2)
        RWKV_Q8_SDOT_QUAD(3)
#undef RWKV_Q8_SDOT_QUAD
      }
      const uint16_t* sb = st + b * kTile + 8 * half;
      const float32x4_t s0 = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sb)));
      const float32x4_t s1 = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sb + 4)));
      const int32x4_t c0 = vshlq_n_s32(sw[0], 7), c1 = vshlq_n_s32(sw[1], 7);
      for (int r = 0; r < R; ++r) {
        const float xsb = xs[r * NB + b];
        const int32x4_t d0 = vaddq_s32(vaddq_s32(vshlq_n_s32(ah[r][0], 8), al[r][0]), c0);
        const int32x4_t d1 = vaddq_s32(vaddq_s32(vshlq_n_s32(ah[r][1], 8), al[r][1]), c1);
        accf[r][0] = vfmaq_f32(accf[r][0], vcvtq_f32_s32(d0), vmulq_n_f32(s0, xsb));
        accf[r][1] = vfmaq_f32(accf[r][1], vcvtq_f32_s32(d1), vmulq_n_f32(s1, xsb));
      }
    }
    for (int r = 0; r < R; ++r) {
      float* yr = y + r * O + 8 * half;
      for (int k = 0; k < 2; ++k) {
        if (accumulate) accf[r][k] = vaddq_f32(accf[r][k], vld1q_f32(yr + 4 * k));
        vst1q_f32(yr + 4 * k, accf[r][k]);
      }
    }
  }
}

RWKV_DOTPROD_TARGET inline void q8_tiles_dotprod(const Q8Rows& x, const int8_t* wq, const uint16_t* ws,
                                                 int64_t O, float* y, bool accumulate, int64_t t0,
                                                 int64_t t1) {
  const int64_t I = x.I, NB = I / kBlock;
  for_tile_rows<kNeonMaxRows>(x.M, t0, t1, [&](auto R, int64_t t, int64_t m0) {
    q8_tile_dotprod<decltype(R)::value>(x.xh + m0 * I, x.xl + m0 * I, x.xs + m0 * NB, I, NB,
                                        wq + t * NB * kTileBlockBytes, ws + t * NB * kTile,
                                        y + m0 * O + t * kTile, O, accumulate);
  });
}
#endif  // RWKV_CPU_DOTPROD

// Whether this core has the dotprod extension (SDOT/UDOT): Linux's HWCAP_ASIMDDP, macOS's
// hw.optional.arm.FEAT_DotProd (macOS 12+; older ones answer with what the build targets:
// Apple's arm64 default, apple-m1, has dotprod).
inline bool cpu_has_dotprod() {
#if defined(__linux__)
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
  return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
  int value = 0;
  size_t size = sizeof value;
  if (sysctlbyname("hw.optional.arm.FEAT_DotProd", &value, &size, nullptr, 0) == 0) return value != 0;
#if defined(__ARM_FEATURE_DOTPROD)
  return true;
#else
  return false;
#endif
#elif defined(__ARM_FEATURE_DOTPROD)
  return true;
#else
  return false;
#endif
}
#endif  // RWKV_CPU_NEON

// ---------------------------------------------------------------- choice of path

// The widest path this build and this CPU can run.
inline Q8Path q8_best_path() {
#if defined(RWKV_CPU_X86_Q8)
  return kX86Path;
#elif defined(RWKV_CPU_NEON)
#if defined(RWKV_CPU_DOTPROD)
  if (cpu_has_dotprod()) return Q8Path::kNeonDotprod;
#endif
  return Q8Path::kNeon;
#else
  return Q8Path::kScalar;
#endif
}

// `request` (RWKV_NVIM_Q8_ISA: a path name) when this build and CPU can run it, else best.
inline Q8Path q8_select_path(Q8Path best, const char* request) {
  if (request == nullptr || *request == '\0') return best;
  for (Q8Path p : {Q8Path::kScalar, Q8Path::kAvx2, Q8Path::kAvx512bw, Q8Path::kAvx512vnni, Q8Path::kNeon,
                   Q8Path::kNeonDotprod}) {
    if (std::strcmp(request, q8_path_name(p)) != 0) continue;
    const bool runs = p == Q8Path::kScalar || p == best || (p == Q8Path::kNeon && best == Q8Path::kNeonDotprod);
    return runs ? p : best;
  }
  return best;
}

// The path the kernels use in this process: chosen once.
inline Q8Path q8_active_path() {
  static const Q8Path path = q8_select_path(q8_best_path(), std::getenv("RWKV_NVIM_Q8_ISA"));
  return path;
}

inline bool q8_path_splits(Q8Path p) { return p == Q8Path::kNeonDotprod; }

// y[:, 16 t0 : 16 t1] (= or +=) by `path`, which must be one this build and CPU run
// (q8_select_path's answer). x.xh / x.xl must be filled for neon-dotprod.
inline void q8_tiles(Q8Path path, const Q8Rows& x, const int8_t* wq, const uint16_t* ws, int64_t O,
                     float* y, bool accumulate, int64_t t0, int64_t t1) {
  switch (path) {
#if defined(RWKV_CPU_X86_Q8)
    case kX86Path: q8_tiles_x86(x, wq, ws, O, y, accumulate, t0, t1); return;
#endif
#if defined(RWKV_CPU_NEON)
    case Q8Path::kNeon: q8_tiles_neon(x, wq, ws, O, y, accumulate, t0, t1); return;
#if defined(RWKV_CPU_DOTPROD)
    case Q8Path::kNeonDotprod: q8_tiles_dotprod(x, wq, ws, O, y, accumulate, t0, t1); return;
#endif
#endif
    default: q8_tiles_scalar(x, wq, ws, O, y, accumulate, t0, t1); return;
  }
}

}  // namespace rwkv_cpu
