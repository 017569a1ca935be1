// Few-row matrix products of the CPU engine (see rwkv7_cpu_linear.h for the q8 layout)
// and their torch ops:
//   torch.ops.rwkv_nvim_cpu.q8_linear(x [M, I] f32, wq int8, ws f16) -> y [M, O] f32
//   torch.ops.rwkv_nvim_cpu.q8_linear_reference(...)   (scalar loops, the test oracle)
//   torch.ops.rwkv_nvim_cpu.f32_linear(x [M, I] f32, W [O, I] f32) -> y [M, O] f32
//   torch.ops.rwkv_nvim_cpu.q8_isa() -> str
//
// Why our own: one-token decode streams every weight once per step, so it is a
// memory-bandwidth problem at 1 row and should stay one at 8 rows. torch's CPU
// products for M <= 8 run far below the memory rate (bench/RESULTS.md). The q8
// inner loop multiplies int16 activation pairs with sign-extended int8 weight pairs
// (AVX512-VNNI vpdpwssd, or vpmaddwd on AVX512BW / AVX2): 32 multiply-adds per
// instruction and row, so 8 rows cost little more than one weight stream.
// Built with -march=native by rwkv_engine/core/kernel_loader.py: the preprocessor picks the
// widest path this CPU has.

#include "rwkv7_cpu_linear.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace rwkv_cpu {
namespace {

constexpr int64_t kPairs = kBlock / 2;  // 16 input pairs per block
constexpr float kActMax = 32767.f;

// xq [M, I] int16, xs [M, I/32] fp32: per row and block, scale = max|x| / 32767.
void quantize_rows(const float* x, int64_t M, int64_t I, int16_t* xq, float* xs) {
  const int64_t NB = I / kBlock;
  at::parallel_for(0, M, M >= 16 ? 4 : M, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t b = 0; b < NB; ++b) {
        const float* xb = x + m * I + b * kBlock;
        float amax = 0.f;
#pragma omp simd reduction(max : amax)
        for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
        const float scale = amax / kActMax;
        const float inv = amax > 0.f ? kActMax / amax : 0.f;
        int16_t* qb = xq + m * I + b * kBlock;
#pragma omp simd
        for (int64_t j = 0; j < kBlock; ++j) qb[j] = static_cast<int16_t>(std::nearbyint(xb[j] * inv));
        xs[m * NB + b] = scale;
      }
    }
  });
}

struct Scratch {  // per thread: quantized activations of the current call
  std::vector<int16_t> xq;
  std::vector<float> xs;
};

Scratch& scratch(int64_t M, int64_t I) {
  thread_local Scratch s;
  if (static_cast<int64_t>(s.xq.size()) < M * I) s.xq.resize(M * I);
  if (static_cast<int64_t>(s.xs.size()) < M * (I / kBlock)) s.xs.resize(M * (I / kBlock));
  return s;
}

inline int32_t load_pair(const int16_t* p) {  // two int16 as one 32-bit lane
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

#if defined(__AVX512BW__)
constexpr int64_t kMaxRows = 8;
const char* const kIsa =
#if defined(__AVX512VNNI__)
    "avx512-vnni";
#else
    "avx512bw";
#endif

// One tile (16 outputs) for R rows: y[r, 0:16] over all NB blocks.
template <int R>
void q8_tile(const int16_t* xq, const float* xs, int64_t I, int64_t NB, const int8_t* wt,
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
        const __m512i xv = _mm512_set1_epi32(load_pair(xb + r * I + 2 * g));
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
constexpr int64_t kMaxRows = 4;
const char* const kIsa = "avx2";

template <int R>
void q8_tile(const int16_t* xq, const float* xs, int64_t I, int64_t NB, const int8_t* wt,
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
        const __m256i xv = _mm256_set1_epi32(load_pair(xb + r * I + 2 * g));
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
#else
constexpr int64_t kMaxRows = 1;
const char* const kIsa = "scalar";
#endif

inline float half_to_float(uint16_t bits) { return c10::detail::fp16_ieee_to_fp32_value(bits); }

// One output o of the packed layout for one row (the scalar path and the reference).
float q8_dot_scalar(const int16_t* xq, const float* xs, int64_t NB, const int8_t* wq,
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

void check_q8_shapes(int64_t I, int64_t O) {
  TORCH_CHECK(I % kBlock == 0 && I > 0, "q8 linear: inputs must be a positive multiple of 32, got ", I);
  TORCH_CHECK(O % kTile == 0 && O > 0, "q8 linear: outputs must be a positive multiple of 16, got ", O);
}

}  // namespace

const char* q8_isa() { return kIsa; }

void q8_linear(const float* x, int64_t M, int64_t I, const int8_t* wq, const uint16_t* ws,
               int64_t O, float* y, bool accumulate) {
  check_q8_shapes(I, O);
  const int64_t NB = I / kBlock, tiles = O / kTile;
  Scratch& s = scratch(M, I);
  quantize_rows(x, M, I, s.xq.data(), s.xs.data());
  const int16_t* xq = s.xq.data();
  const float* xs = s.xs.data();
  // ~4 KiB of weights per tile-block row; aim for tasks of >= ~64 KiB of weights
  const int64_t grain = std::max<int64_t>(1, 128 / NB);
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int8_t* wt = wq + t * NB * kTileBlockBytes;
      const uint16_t* st = ws + t * NB * kTile;
#if defined(__AVX512BW__) || defined(__AVX2__)
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int64_t rows = std::min(kMaxRows, M - m0);
        const int16_t* xr = xq + m0 * I;
        const float* sr = xs + m0 * NB;
        float* yr = y + m0 * O + t * kTile;
        switch (rows) {
          case 1: q8_tile<1>(xr, sr, I, NB, wt, st, yr, O, accumulate); break;
          case 2: q8_tile<2>(xr, sr, I, NB, wt, st, yr, O, accumulate); break;
          case 3: q8_tile<3>(xr, sr, I, NB, wt, st, yr, O, accumulate); break;
          case 4: q8_tile<4>(xr, sr, I, NB, wt, st, yr, O, accumulate); break;
#if defined(__AVX512BW__)
          case 5: q8_tile<5>(xr, sr, I, NB, wt, st, yr, O, accumulate); break;
          case 6: q8_tile<6>(xr, sr, I, NB, wt, st, yr, O, accumulate); break;
          case 7: q8_tile<7>(xr, sr, I, NB, wt, st, yr, O, accumulate); break;
          default: q8_tile<8>(xr, sr, I, NB, wt, st, yr, O, accumulate); break;
#endif
        }
      }
#else
      for (int64_t m = 0; m < M; ++m)
        for (int64_t o = t * kTile; o < (t + 1) * kTile; ++o) {
          const float v = q8_dot_scalar(xq + m * I, xs + m * NB, NB, wq, ws, o);
          y[m * O + o] = accumulate ? y[m * O + o] + v : v;
        }
#endif
    }
  });
}

void q8_linear_reference(const float* x, int64_t M, int64_t I, const int8_t* wq,
                         const uint16_t* ws, int64_t O, float* y, bool accumulate) {
  check_q8_shapes(I, O);
  const int64_t NB = I / kBlock;
  std::vector<int16_t> xq(M * I);
  std::vector<float> xs(M * NB);
  quantize_rows(x, M, I, xq.data(), xs.data());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < O; ++o) {
      const float v = q8_dot_scalar(xq.data() + m * I, xs.data() + m * NB, NB, wq, ws, o);
      y[m * O + o] = accumulate ? y[m * O + o] + v : v;
    }
}

namespace {

#if defined(__AVX512F__)
constexpr int64_t kF32Rows = 8;
template <int R>
void f32_output(const float* x, int64_t I, const float* w, float* y, int64_t O, bool accumulate) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= I; j += 16) {
    const __m512 wv = _mm512_loadu_ps(w + j);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * I + j), acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    float v = _mm512_reduce_add_ps(acc[r]);
    for (int64_t jj = j; jj < I; ++jj) v += w[jj] * x[r * I + jj];
    y[r * O] = accumulate ? y[r * O] + v : v;
  }
}
#else
constexpr int64_t kF32Rows = 4;
template <int R>
void f32_output(const float* x, int64_t I, const float* w, float* y, int64_t O, bool accumulate) {
  for (int r = 0; r < R; ++r) {
    const float* xr = x + r * I;
    float v = 0.f;
#pragma omp simd reduction(+ : v)
    for (int64_t j = 0; j < I; ++j) v += w[j] * xr[j];
    y[r * O] = accumulate ? y[r * O] + v : v;
  }
}
#endif

}  // namespace

void f32_linear(const float* x, int64_t M, int64_t I, const float* W, int64_t O, float* y,
                bool accumulate) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1));
  at::parallel_for(0, O, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += kF32Rows) {
      const int64_t rows = std::min(kF32Rows, M - m0);
      for (int64_t o = begin; o < end; ++o) {
        const float* w = W + o * I;
        const float* xr = x + m0 * I;
        float* yr = y + m0 * O + o;
        switch (rows) {
          case 1: f32_output<1>(xr, I, w, yr, O, accumulate); break;
          case 2: f32_output<2>(xr, I, w, yr, O, accumulate); break;
          case 3: f32_output<3>(xr, I, w, yr, O, accumulate); break;
#if defined(__AVX512F__)
          case 4: f32_output<4>(xr, I, w, yr, O, accumulate); break;
          case 5: f32_output<5>(xr, I, w, yr, O, accumulate); break;
          case 6: f32_output<6>(xr, I, w, yr, O, accumulate); break;
          case 7: f32_output<7>(xr, I, w, yr, O, accumulate); break;
          default: f32_output<8>(xr, I, w, yr, O, accumulate); break;
#else
          default: f32_output<4>(xr, I, w, yr, O, accumulate); break;
#endif
        }
      }
    }
  });
}

}  // namespace rwkv_cpu

// ---- torch ops -------------------------------------------------------------
namespace {

void check_x(const at::Tensor& x, int64_t I, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [M, I], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(), op,
              ": x must be a contiguous float32 CPU tensor");
  TORCH_CHECK(x.size(1) == I, op, ": x has ", x.size(1), " inputs, the weight ", I);
}

// wq [O/16, I/32, 512] int8, ws [O/16, I/32, 16] fp16 -> (I, O)
std::pair<int64_t, int64_t> q8_dims(const at::Tensor& wq, const at::Tensor& ws) {
  TORCH_CHECK(wq.dim() == 3 && wq.size(2) == rwkv_cpu::kTileBlockBytes && wq.scalar_type() == at::kChar &&
                  wq.is_contiguous(),
              "q8 linear: wq must be contiguous int8 [O/16, I/32, 512], got ", wq.sizes());
  TORCH_CHECK(ws.dim() == 3 && ws.size(0) == wq.size(0) && ws.size(1) == wq.size(1) &&
                  ws.size(2) == rwkv_cpu::kTile && ws.scalar_type() == at::kHalf && ws.is_contiguous(),
              "q8 linear: ws must be contiguous float16 [O/16, I/32, 16], got ", ws.sizes());
  return {wq.size(1) * rwkv_cpu::kBlock, wq.size(0) * rwkv_cpu::kTile};
}

at::Tensor q8_linear_op(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws) {
  const auto [I, O] = q8_dims(wq, ws);
  check_x(x, I, "q8_linear");
  at::Tensor y = at::empty({x.size(0), O}, x.options());
  if (x.size(0) > 0)
    rwkv_cpu::q8_linear(x.data_ptr<float>(), x.size(0), I, wq.data_ptr<int8_t>(), reinterpret_cast<const uint16_t*>(ws.data_ptr<at::Half>()),
                        O, y.data_ptr<float>(), false);
  return y;
}

at::Tensor q8_linear_reference_op(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws) {
  const auto [I, O] = q8_dims(wq, ws);
  check_x(x, I, "q8_linear_reference");
  at::Tensor y = at::empty({x.size(0), O}, x.options());
  rwkv_cpu::q8_linear_reference(x.data_ptr<float>(), x.size(0), I, wq.data_ptr<int8_t>(),
                                reinterpret_cast<const uint16_t*>(ws.data_ptr<at::Half>()), O, y.data_ptr<float>(), false);
  return y;
}

at::Tensor f32_linear_op(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous(),
              "f32_linear: W must be contiguous float32 [O, I], got ", w.sizes());
  check_x(x, w.size(1), "f32_linear");
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  rwkv_cpu::f32_linear(x.data_ptr<float>(), x.size(0), w.size(1), w.data_ptr<float>(), w.size(0),
                       y.data_ptr<float>(), false);
  return y;
}

std::string q8_isa_op() { return rwkv_cpu::q8_isa(); }

// How many threads an at::parallel_for of these kernels really runs on (1 when the
// library was built without OpenMP: the pragma inside the ATen header is then ignored).
int64_t parallel_threads_op() {
  std::vector<int> used(std::max(at::get_num_threads(), 1) * 4, 0);
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
    const int t = at::get_thread_num();
    if (t >= 0 && t < static_cast<int>(used.size())) used[t] = 1;
    volatile float sink = 0.f;  // a little work, so one thread cannot take every chunk
    for (int i = 0; i < 20000; ++i) sink = sink + 1.f;
  });
  return std::count(used.begin(), used.end(), 1);
}

}  // namespace

TORCH_LIBRARY(rwkv_nvim_cpu, m) {
  m.def("q8_linear(Tensor x, Tensor wq, Tensor ws) -> Tensor");
  m.def("q8_linear_reference(Tensor x, Tensor wq, Tensor ws) -> Tensor");
  m.def("f32_linear(Tensor x, Tensor w) -> Tensor");
  m.def("q8_isa() -> str", &q8_isa_op);
  m.def("parallel_threads() -> int", &parallel_threads_op);
}

TORCH_LIBRARY_IMPL(rwkv_nvim_cpu, CPU, m) {
  m.impl("q8_linear", &q8_linear_op);
  m.impl("q8_linear_reference", &q8_linear_reference_op);
  m.impl("f32_linear", &f32_linear_op);
}
