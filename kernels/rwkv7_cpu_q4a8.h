// The q4 product with 8-bit activations ("q4a8" mode), without torch, in the style of
// rwkv7_cpu_q4.h, whose packed weights (layout, scales, nibbles u = q + 8) it reads
// unchanged: only the activations differ.
//
// Activations: int8 per row and block of 32, scale = max|x| / 127 (llama.cpp's Q8_0
// activations), so the products of a block fit the byte multiply-adds:
//   x86 AVX2 `vpmaddubsw` (unsigned byte x signed byte, adjacent pairs summed to int16):
//     the unsigned operand is the nibble u (0..15), so a pair is at most 2*15*127 = 3810
//     and 8 of them (one block, both nibbles of 4 input groups) still fit int16: the
//     int16 sums of a block are widened once (`vpmaddwd` by 1). 32 multiply-adds per
//     instruction and row, twice the int16 path's 16 (`vpmaddwd` on int16 pairs).
//   aarch64 SDOT: 4 int8 x int8 products into each int32 lane.
// The nibbles of one 32-byte load (8 outputs x 8 inputs, rwkv7_cpu_q4.h) are, as bytes,
// lane L = [u0, u4, u1, u5] (low nibbles) and [u2, u6, u3, u7] (high nibbles) of inputs
// 8k + i; the activations are stored in that order once per row (a8_interleave_row), so
// one 32-bit broadcast feeds all 8 outputs. The -8 is taken out per block:
// sum_j q x = sum_j u x - 8 sum_j x, exact in int32. y = sum_b d[o, b] xs[m, b] dot_b in
// the same block order in every path, so every path's block sums are the scalar ones
// bit for bit.
//
// Paths ("q4a8: <name>"): avx2 (x86 with AVX2, chosen when compiling), neon-dotprod
// (aarch64 with dotprod, chosen at run time like the q8 SDOT path), scalar (the
// reference; every other CPU). RWKV_NVIM_Q8_ISA=scalar sends it to scalar too.
#pragma once

#include "rwkv7_cpu_q4.h"

namespace rwkv_cpu {

constexpr float kAct8Max = 127.f;

enum class Q4A8Path : int { kScalar = 0, kAvx2, kNeonDotprod };

inline const char* q4a8_path_name(Q4A8Path p) {
  return p == Q4A8Path::kAvx2 ? "avx2" : (p == Q4A8Path::kNeonDotprod ? "neon-dotprod" : "scalar");
}

// One row: xq[I] int8 (input order), xs[I/32]: per block, scale = max|x| / 127;
// xsum[I/32]: per block, the sum of xq (the -8 correction).
inline void a8_quantize_row(const float* x, int64_t I, int8_t* xq, float* xs, int32_t* xsum) {
  const int64_t NB = I / kBlock;
  for (int64_t b = 0; b < NB; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.f;
#pragma omp simd reduction(max : amax)
    for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float inv = amax > 0.f ? kAct8Max / amax : 0.f;
    int8_t* qb = xq + b * kBlock;
    int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < kBlock; ++j) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(xb[j] * inv));
      qb[j] = static_cast<int8_t>(v);
      sum += v;
    }
    xs[b] = amax / kAct8Max;
    xsum[b] = sum;
  }
}

// xp[I]: xq with each group of 8 inputs in the nibble order [0, 4, 1, 5, 2, 6, 3, 7].
inline void a8_interleave_row(const int8_t* xq, int64_t I, int8_t* xp) {
  static constexpr int kOrder[8] = {0, 4, 1, 5, 2, 6, 3, 7};
  for (int64_t g = 0; g < I; g += 8)
    for (int i = 0; i < 8; ++i) xp[g + i] = xq[g + kOrder[i]];
}

// The 8-bit activations of M rows, as every path reads them.
struct A8Rows {
  const int8_t* xq;     // [M, I] input order (scalar)
  const int8_t* xp;     // [M, I] nibble order (avx2, neon-dotprod): a8_interleave_row
  const float* xs;      // [M, I/32]
  const int32_t* xsum;  // [M, I/32]
  int64_t M, I;
};

// ---------------------------------------------------------------- scalar (the reference)
inline float q4a8_dot_scalar(const int8_t* xq, const float* xs, int64_t NB, const uint8_t* wq,
                             const uint16_t* ws, int64_t o) {
  const int64_t tile = o / kTile, lane = o % kTile;
  float sum = 0.f;
  for (int64_t b = 0; b < NB; ++b) {
    const uint8_t* wb = wq + (tile * NB + b) * kQ4TileBlockBytes;
    int32_t dot = 0;
    for (int64_t j = 0; j < kBlock; ++j) dot += q4_weight(wb, lane, j) * static_cast<int32_t>(xq[b * kBlock + j]);
    sum += static_cast<float>(dot) * (half_to_float(ws[(tile * NB + b) * kTile + lane]) * xs[b]);
  }
  return sum;
}

// y[:, 16 t0 : 16 t1] for all rows (y [M, O]; = or += when accumulate).
inline void q4a8_tiles_scalar(const A8Rows& x, const uint8_t* wq, const uint16_t* ws, int64_t O,
                              float* y, bool accumulate, int64_t t0, int64_t t1) {
  const int64_t NB = x.I / kBlock;
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t m = 0; m < x.M; ++m)
      for (int64_t o = t * kTile; o < (t + 1) * kTile; ++o) {
        const float v = q4a8_dot_scalar(x.xq + m * x.I, x.xs + m * NB, NB, wq, ws, o);
        y[m * O + o] = accumulate ? y[m * O + o] + v : v;
      }
}

inline int32_t a8_load_quad(const int8_t* p) {  // four int8 as one 32-bit lane
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// ---------------------------------------------------------------- x86 AVX2
#if defined(__AVX2__)
#define RWKV_CPU_X86_Q4A8 1
constexpr int64_t kQ4A8X86MaxRows = 4;

// One tile (16 outputs, two halves of 8) for R rows. wt: the tile's packed weights; xp:
// [R, I] nibble-order activations. With 4 rows the 16 sums and 4 weight registers exceed
// the 16 ymm registers and some spill, yet sharing each activation broadcast between the
// halves measured faster than a pass per half (M = 64, 8192 x 2048, one Zen 3 thread:
// 200 vs 170 GOP/s).
template <int R>
inline void q4a8_tile_avx2(const int8_t* xp, const float* xs, const int32_t* xsum, int64_t I, int64_t NB,
                           const uint8_t* wt, const uint16_t* st, float* y, int64_t O, bool accumulate) {
  const __m256i nib = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 accf[R][2];
  for (int r = 0; r < R; ++r) accf[r][0] = accf[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < NB; ++b) {
    const uint8_t* wb = wt + b * kQ4TileBlockBytes;
    // fetch 8 tile-blocks (2 KiB) ahead: one core's stream of a matrix from DRAM runs ~30 %
    // faster with it (14 -> 19 GB/s, one Zen 3 thread, a 67 MB matrix at one row)
    for (int64_t line = 0; line < kQ4TileBlockBytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(wb + 8 * kQ4TileBlockBytes + line), _MM_HINT_T0);
    __m256i acc[R][2];  // int16: 8 outputs x 2 partial sums per half, at most 8 * 3810 each
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int64_t k = 0; k < 4; ++k) {
      __m256i lo[2], hi[2];
      for (int h = 0; h < 2; ++h) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + h * 128 + k * 32));
        lo[h] = _mm256_and_si256(w, nib);
        hi[h] = _mm256_and_si256(_mm256_srli_epi16(w, 4), nib);
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int8_t* xk = xp + r * I + b * kBlock + 8 * k;
        const __m256i xa = _mm256_set1_epi32(a8_load_quad(xk)), xb = _mm256_set1_epi32(a8_load_quad(xk + 4));
        for (int h = 0; h < 2; ++h)
          acc[r][h] = _mm256_add_epi16(acc[r][h], _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], xa),
                                                                   _mm256_maddubs_epi16(hi[h], xb)));
      }
    }
    __m256 s[2];
    for (int h = 0; h < 2; ++h)
      s[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + b * kTile + 8 * h)));
    for (int r = 0; r < R; ++r) {
      const __m256i corr = _mm256_set1_epi32(8 * xsum[r * NB + b]);
      const __m256 xsb = _mm256_set1_ps(xs[r * NB + b]);
      for (int h = 0; h < 2; ++h) {
        const __m256i dot = _mm256_sub_epi32(_mm256_madd_epi16(acc[r][h], ones), corr);
        accf[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s[h], xsb), accf[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) {
      float* yr = y + r * O + 8 * h;
      if (accumulate) accf[r][h] = _mm256_add_ps(accf[r][h], _mm256_loadu_ps(yr));
      _mm256_storeu_ps(yr, accf[r][h]);
    }
}

inline void q4a8_tiles_avx2(const A8Rows& x, const uint8_t* wq, const uint16_t* ws, int64_t O, float* y,
                            bool accumulate, int64_t t0, int64_t t1) {
  const int64_t I = x.I, NB = I / kBlock;
  for_tile_rows<kQ4A8X86MaxRows>(x.M, t0, t1, [&](auto R, int64_t t, int64_t m0) {
    q4a8_tile_avx2<decltype(R)::value>(x.xp + m0 * I, x.xs + m0 * NB, x.xsum + m0 * NB, I, NB,
                                       wq + t * NB * kQ4TileBlockBytes, ws + t * NB * kTile,
                                       y + m0 * O + t * kTile, O, accumulate);
  });
}
#endif  // __AVX2__

// ---------------------------------------------------------------- aarch64 SDOT
#if defined(RWKV_CPU_DOTPROD)
constexpr int64_t kQ4A8NeonMaxRows = 4;

// One tile for R rows: per 32-byte load (8 outputs x 8 inputs of group k) the low and
// high nibbles as bytes, each 16-byte half (4 outputs) SDOT by element with the 4
// matching activations: lane 2 (k % 2) (low nibbles) / 2 (k % 2) + 1 (high) of the 16
// nibble-order activations of groups k & ~1, k | 1.
template <int R>
RWKV_DOTPROD_TARGET inline void q4a8_tile_dotprod(const int8_t* xp, const float* xs, const int32_t* xsum,
                                                  int64_t I, int64_t NB, const uint8_t* wt,
                                                  const uint16_t* st, float* y, int64_t O, bool accumulate) {
  const uint8x16_t nib = vdupq_n_u8(15);
  float32x4_t accf[R][4];  // outputs 4j .. 4j + 3
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) accf[r][j] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < NB; ++b) {
    const uint8_t* wb = wt + b * kQ4TileBlockBytes;
    int32x4_t acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = vdupq_n_s32(0);
#pragma GCC unroll 2
    for (int q = 0; q < 2; ++q) {  // input groups 2q, 2q + 1
      int8x16_t xv[R];
      for (int r = 0; r < R; ++r) xv[r] = vld1q_s8(xp + r * I + b * kBlock + 16 * q);
#define RWKV_Q4A8_SDOT(K, H, J)                                                             \
  {                                                                                         \
    const uint8x16_t w = vld1q_u8(wb + (H) * 128 + (2 * q + (K)) * 32 + 16 * ((J) % 2));     \
    const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(w, nib));                             \
    const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(w, 4));                             \
    for (int r = 0; r < R; ++r) {                                                           \
      acc[r][J] = vdotq_laneq_s32(acc[r][J], lo, xv[r], 2 * (K));                           \
      acc[r][J] = vdotq_laneq_s32(acc[r][J], hi, xv[r], 2 * (K) + 1);                       \
    }                                                                                       \
  }
      RWKV_Q4A8_SDOT(0, 0, 0)
      RWKV_Q4A8_SDOT(0, 0, 1)
      RWKV_Q4A8_SDOT(0, 1, 2)
      RWKV_Q4A8_SDOT(0, 1, 3)
      RWKV_Q4A8_SDOT(1, 0, 0)
      RWKV_Q4A8_SDOT(1, 0, 1)
      RWKV_Q4A8_SDOT(1, 1, 2)
      RWKV_Q4A8_SDOT(1, 1, 3)
#undef RWKV_Q4A8_SDOT
    }
    const uint16_t* sb = st + b * kTile;
    for (int r = 0; r < R; ++r) {
      const int32x4_t corr = vdupq_n_s32(8 * xsum[r * NB + b]);
      const float xsb = xs[r * NB + b];
      for (int j = 0; j < 4; ++j) {
        const float32x4_t s = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sb + 4 * j)));
        accf[r][j] = vfmaq_f32(accf[r][j], vcvtq_f32_s32(vsubq_s32(acc[r][j], corr)), vmulq_n_f32(s, xsb));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float* yr = y + r * O;
    for (int j = 0; j < 4; ++j) {
      if (accumulate) accf[r][j] = vaddq_f32(accf[r][j], vld1q_f32(yr + 4 * j));
      vst1q_f32(yr + 4 * j, accf[r][j]);
    }
  }
}

RWKV_DOTPROD_TARGET inline void q4a8_tiles_dotprod(const A8Rows& x, const uint8_t* wq, const uint16_t* ws,
                                                   int64_t O, float* y, bool accumulate, int64_t t0,
                                                   int64_t t1) {
  const int64_t I = x.I, NB = I / kBlock;
  for_tile_rows<kQ4A8NeonMaxRows>(x.M, t0, t1, [&](auto R, int64_t t, int64_t m0) {
    q4a8_tile_dotprod<decltype(R)::value>(x.xp + m0 * I, x.xs + m0 * NB, x.xsum + m0 * NB, I, NB,
                                          wq + t * NB * kQ4TileBlockBytes, ws + t * NB * kTile,
                                          y + m0 * O + t * kTile, O, accumulate);
  });
}
#endif  // RWKV_CPU_DOTPROD

// ---------------------------------------------------------------- choice of path
inline Q4A8Path q4a8_best_path() {
#if defined(RWKV_CPU_X86_Q4A8)
  return Q4A8Path::kAvx2;
#elif defined(RWKV_CPU_DOTPROD)
  return cpu_has_dotprod() ? Q4A8Path::kNeonDotprod : Q4A8Path::kScalar;
#else
  return Q4A8Path::kScalar;
#endif
}

// The path in use: the best, unless RWKV_NVIM_Q8_ISA narrows the q8 product to scalar
// (or, on aarch64, to neon: no SDOT).
inline Q4A8Path q4a8_active_path() {
  static const Q4A8Path path = [] {
    const Q8Path q8 = q8_active_path();
    const Q4A8Path best = q4a8_best_path();
    if (q8 == Q8Path::kScalar || (best == Q4A8Path::kNeonDotprod && q8 != Q8Path::kNeonDotprod))
      return Q4A8Path::kScalar;
    return best;
  }();
  return path;
}

inline bool q4a8_path_interleaves(Q4A8Path p) { return p != Q4A8Path::kScalar; }

// y[:, 16 t0 : 16 t1] (= or +=) by `path` (q4a8_best_path() or scalar); x.xp must be
// filled for the interleaving paths.
inline void q4a8_tiles(Q4A8Path path, const A8Rows& x, const uint8_t* wq, const uint16_t* ws, int64_t O,
                       float* y, bool accumulate, int64_t t0, int64_t t1) {
  switch (path) {
#if defined(RWKV_CPU_X86_Q4A8)
    case Q4A8Path::kAvx2: q4a8_tiles_avx2(x, wq, ws, O, y, accumulate, t0, t1); return;
#endif
#if defined(RWKV_CPU_DOTPROD)
    case Q4A8Path::kNeonDotprod: q4a8_tiles_dotprod(x, wq, ws, O, y, accumulate, t0, t1); return;
#endif
    default: q4a8_tiles_scalar(x, wq, ws, O, y, accumulate, t0, t1); return;
  }
}

}  // namespace rwkv_cpu
