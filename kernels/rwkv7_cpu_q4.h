// The arithmetic of the q4 product ("q4" mode), without torch, in the style of
// rwkv7_cpu_q8.h (whose activation quantization, Q8Rows and fp16 conversion it reuses).
//
// q4 weights: W [O, I] quantized per block of 32 inputs like llama.cpp's Q4_0: the
// block's value of largest magnitude m maps to -8, scale d = m / -8 rounded to fp16 (the
// stored value; may be negative), q = clamp(round(W / d), -8, 7), stored as the nibble
// u = q + 8. Packed 16 outputs a tile, each 32-input block of a tile in 256 bytes: two
// halves of 8 outputs (h), four groups of 8 inputs (k), then per output lane L (0..7)
// four bytes c0..c3 holding the nibbles of inputs 8k + i:
//   c0 = u[0] | u[2] << 4,  c1 = u[4] | u[6] << 4,  c2 = u[1] | u[3] << 4,  c3 = u[5] | u[7] << 4
//   wq [O/16, I/32, 2 (h), 4 (k), 8 (L), 4 (c)] uint8        (256 bytes per tile-block)
//   ws [O/16, I/32, 16 (output lane)] fp16 bits              (0.5625 bytes per weight)
// so that in one 32-byte load (8 outputs x 8 inputs) the 16-bit units (c0 | c1 << 8,
// c2 | c3 << 8) give, by shifts of 0, 4, 8, 12 and `& 15`, the input pairs (8k + 2s,
// 8k + 2s + 1) of the 8 outputs as the int16 pairs vpmaddwd multiplies: no shuffles.
// The -8 is taken out per block: sum_j q x = sum_j u x - 8 sum_j x.
// Activations: int16 per row and block of 32 (q8_quantize_row), so each block's dot
// product is exact in int32 (|sum| <= 32 * 32767 * 8); y = sum_b d[o, b] xs[m, b] dot_b,
// in the same block order in every path.
//
// Paths ("q4: <name>"): avx2 (x86 with AVX2, AVX512 machines included: chosen when
// compiling), scalar (the reference, and what every other CPU, aarch64 included, runs).
// RWKV_NVIM_Q8_ISA=scalar also sends the q4 product to the scalar path.
#pragma once

#include "rwkv7_cpu_q8.h"

namespace rwkv_cpu {

constexpr int64_t kQ4TileBlockBytes = kTileBlockBytes / 2;  // 256

enum class Q4Path : int { kScalar = 0, kAvx2 };

inline const char* q4_path_name(Q4Path p) { return p == Q4Path::kAvx2 ? "avx2" : "scalar"; }

// The signed weight of output `lane`, input j (0..31) of one packed tile-block.
inline int32_t q4_weight(const uint8_t* wb, int64_t lane, int64_t j) {
  const int64_t h = lane / 8, L = lane % 8, k = j / 8, i = j % 8;
  const int64_t c = ((i >> 2) & 1) | ((i & 1) << 1);
  const uint8_t byte = wb[h * 128 + k * 32 + L * 4 + c];
  return static_cast<int32_t>((i >> 1) & 1 ? (byte >> 4) : (byte & 15)) - 8;
}

// Per row and block, the sum of the int16 activations (the AVX2 path's -8 correction).
inline void q4_block_sums(const int16_t* xq, int64_t n, int32_t* sums) {
  for (int64_t b = 0; b < n / kBlock; ++b) {
    int32_t t = 0;
    for (int64_t j = 0; j < kBlock; ++j) t += xq[b * kBlock + j];
    sums[b] = t;
  }
}

// ---------------------------------------------------------------- scalar (the reference)
inline float q4_dot_scalar(const int16_t* xq, const float* xs, int64_t NB, const uint8_t* wq,
                           const uint16_t* ws, int64_t o) {
  const int64_t tile = o / kTile, lane = o % kTile;
  float sum = 0.f;
  for (int64_t b = 0; b < NB; ++b) {
    const uint8_t* wb = wq + (tile * NB + b) * kQ4TileBlockBytes;
    int32_t dot = 0;
    for (int64_t j = 0; j < kBlock; ++j) dot += q4_weight(wb, lane, j) * xq[b * kBlock + j];
    sum += static_cast<float>(dot) * (half_to_float(ws[(tile * NB + b) * kTile + lane]) * xs[b]);
  }
  return sum;
}

// y[:, 16 t0 : 16 t1] for all rows (y [M, O]; = or += when accumulate).
inline void q4_tiles_scalar(const Q8Rows& x, const uint8_t* wq, const uint16_t* ws, int64_t O,
                            float* y, bool accumulate, int64_t t0, int64_t t1) {
  const int64_t NB = x.I / kBlock;
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t m = 0; m < x.M; ++m)
      for (int64_t o = t * kTile; o < (t + 1) * kTile; ++o) {
        const float v = q4_dot_scalar(x.xq + m * x.I, x.xs + m * NB, NB, wq, ws, o);
        y[m * O + o] = accumulate ? y[m * O + o] + v : v;
      }
}

// ---------------------------------------------------------------- x86 AVX2
#if defined(__AVX2__)
#define RWKV_CPU_X86_Q4 1
constexpr int64_t kQ4X86MaxRows = 4;

// One tile (16 outputs) for R rows. xsum: [R, NB] block sums of the activations.
template <int R>
inline void q4_tile_avx2(const int16_t* xq, const float* xs, const int32_t* xsum, int64_t I, int64_t NB,
                         const uint8_t* wt, const uint16_t* st, float* y, int64_t O, bool accumulate) {
  const __m256i nib = _mm256_set1_epi16(15);
  __m256 lo[R], hi[R];  // outputs 0-7 and 8-15 of the tile
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < NB; ++b) {
    const uint8_t* wb = wt + b * kQ4TileBlockBytes;
    const int16_t* xb = xq + b * kBlock;
    for (int64_t line = 0; line < kQ4TileBlockBytes; line += 64)  // 8 tile-blocks (2 KiB) ahead
      _mm_prefetch(reinterpret_cast<const char*>(wb + 8 * kQ4TileBlockBytes + line), _MM_HINT_T0);
    __m256i ilo[R], ihi[R];
    for (int r = 0; r < R; ++r) ilo[r] = ihi[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int64_t k = 0; k < 4; ++k) {
      const __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + k * 32));
      const __m256i r1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 128 + k * 32));
      const __m256i a0 = _mm256_and_si256(r0, nib), a1 = _mm256_and_si256(_mm256_srli_epi16(r0, 4), nib);
      const __m256i a2 = _mm256_and_si256(_mm256_srli_epi16(r0, 8), nib), a3 = _mm256_srli_epi16(r0, 12);
      const __m256i b0 = _mm256_and_si256(r1, nib), b1 = _mm256_and_si256(_mm256_srli_epi16(r1, 4), nib);
      const __m256i b2 = _mm256_and_si256(_mm256_srli_epi16(r1, 8), nib), b3 = _mm256_srli_epi16(r1, 12);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int16_t* xk = xb + r * I + 8 * k;
        const __m256i x0 = _mm256_set1_epi32(q8_load_pair(xk)), x1 = _mm256_set1_epi32(q8_load_pair(xk + 2));
        const __m256i x2 = _mm256_set1_epi32(q8_load_pair(xk + 4)), x3 = _mm256_set1_epi32(q8_load_pair(xk + 6));
        const __m256i sl = _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(a0, x0), _mm256_madd_epi16(a1, x1)),
                                            _mm256_add_epi32(_mm256_madd_epi16(a2, x2), _mm256_madd_epi16(a3, x3)));
        const __m256i sh = _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(b0, x0), _mm256_madd_epi16(b1, x1)),
                                            _mm256_add_epi32(_mm256_madd_epi16(b2, x2), _mm256_madd_epi16(b3, x3)));
        ilo[r] = _mm256_add_epi32(ilo[r], sl);
        ihi[r] = _mm256_add_epi32(ihi[r], sh);
      }
    }
    const __m256 sl = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + b * kTile)));
    const __m256 sh = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + b * kTile + 8)));
    for (int r = 0; r < R; ++r) {
      const __m256i corr = _mm256_set1_epi32(8 * xsum[r * NB + b]);
      const __m256 xsb = _mm256_set1_ps(xs[r * NB + b]);
      lo[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(ilo[r], corr)), _mm256_mul_ps(sl, xsb), lo[r]);
      hi[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(ihi[r], corr)), _mm256_mul_ps(sh, xsb), hi[r]);
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

inline void q4_tiles_avx2(const Q8Rows& x, const int32_t* xsum, const uint8_t* wq, const uint16_t* ws,
                          int64_t O, float* y, bool accumulate, int64_t t0, int64_t t1) {
  const int64_t I = x.I, NB = I / kBlock;
  for_tile_rows<kQ4X86MaxRows>(x.M, t0, t1, [&](auto R, int64_t t, int64_t m0) {
    q4_tile_avx2<decltype(R)::value>(x.xq + m0 * I, x.xs + m0 * NB, xsum + m0 * NB, I, NB,
                                     wq + t * NB * kQ4TileBlockBytes, ws + t * NB * kTile,
                                     y + m0 * O + t * kTile, O, accumulate);
  });
}
#endif  // __AVX2__

// ---------------------------------------------------------------- choice of path
inline Q4Path q4_best_path() {
#if defined(RWKV_CPU_X86_Q4)
  return Q4Path::kAvx2;
#else
  return Q4Path::kScalar;
#endif
}

// The path in use: the best, unless RWKV_NVIM_Q8_ISA sends the q8 product to scalar.
inline Q4Path q4_active_path() {
  static const Q4Path path = q8_active_path() == Q8Path::kScalar ? Q4Path::kScalar : q4_best_path();
  return path;
}

// y[:, 16 t0 : 16 t1] (= or +=) by `path` (q4_best_path() or scalar). x.xq / x.xs only;
// xsum [M, I/32]: q4_block_sums of each row (read by the avx2 path).
inline void q4_tiles(Q4Path path, const Q8Rows& x, const int32_t* xsum, const uint8_t* wq, const uint16_t* ws,
                     int64_t O, float* y, bool accumulate, int64_t t0, int64_t t1) {
#if defined(RWKV_CPU_X86_Q4)
  if (path == Q4Path::kAvx2) {
    q4_tiles_avx2(x, xsum, wq, ws, O, y, accumulate, t0, t1);
    return;
  }
#endif
  (void)path;
  (void)xsum;
  q4_tiles_scalar(x, wq, ws, O, y, accumulate, t0, t1);
}

}  // namespace rwkv_cpu
