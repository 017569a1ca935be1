// Few-row matrix products of the CPU engine (see rwkv7_cpu_linear.h for the q8 layout)
// and their torch ops:
//   torch.ops.rwkv_nvim_cpu.q8_linear(x [M, I] f32, wq int8, ws f16) -> y [M, O] f32
//   torch.ops.rwkv_nvim_cpu.q8_linear_reference(...)   (scalar loops, the test oracle)
//   torch.ops.rwkv_nvim_cpu.f32_linear(x [M, I] f32, W [O, I] f32) -> y [M, O] f32
//   torch.ops.rwkv_nvim_cpu.q8_isa() -> str
//   torch.ops.rwkv_nvim_cpu.q4_linear(x [M, I] f32, wq uint8, ws f16) -> y [M, O] f32
//   torch.ops.rwkv_nvim_cpu.q4_linear_reference(...), q4_isa() -> str  (rwkv7_cpu_q4.h)
//   torch.ops.rwkv_nvim_cpu.q4a8_linear(x, wq uint8, ws f16) -> y [M, O] f32: the q4
//   weights with 8-bit activations; q4a8_linear_reference(...), q4a8_isa() (rwkv7_cpu_q4a8.h)
//
// Why our own: one-token decode streams every weight once per step, so it is a
// memory-bandwidth problem at 1 row and should stay one at 8 rows. torch's CPU
// products for M <= 8 run far below the memory rate (bench/RESULTS.md). The q8
// inner loop multiplies int16 activation pairs with sign-extended int8 weight pairs
// (AVX512-VNNI vpdpwssd, or vpmaddwd on AVX512BW / AVX2): 32 multiply-adds per
// instruction and row, so 8 rows cost little more than one weight stream.
// The arithmetic of every path (x86: chosen when compiling with -march=native; aarch64:
// NEON, or SDOT when the core has dotprod, chosen at run time) is in rwkv7_cpu_q8.h.

#include "rwkv7_cpu_linear.h"
#include "rwkv7_cpu_q4.h"
#include "rwkv7_cpu_q4a8.h"
#include "rwkv7_cpu_q8.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace rwkv_cpu {
namespace {

// xq [M, I] int16, xs [M, I/32] fp32: per row and block, scale = max|x| / 32767.
void quantize_rows(const float* x, int64_t M, int64_t I, int16_t* xq, float* xs) {
  const int64_t NB = I / kBlock;
  at::parallel_for(0, M, M >= 16 ? 4 : M, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) q8_quantize_row(x + m * I, I, xq + m * I, xs + m * NB);
  });
}

struct Scratch {  // per thread: quantized activations of the current call
  std::vector<int16_t> xq;
  std::vector<float> xs;
  std::vector<int8_t> xh, xl;  // the SDOT path's split of xq
  std::vector<int32_t> xsum;   // q4, q4a8: per row and block, the sum of xq (or xq8)
  std::vector<int8_t> xq8, xp8;  // q4a8: int8 activations, in input and in nibble order
};

Scratch& scratch(int64_t M, int64_t I, bool split) {
  thread_local Scratch s;
  if (static_cast<int64_t>(s.xq.size()) < M * I) s.xq.resize(M * I);
  if (static_cast<int64_t>(s.xs.size()) < M * (I / kBlock)) s.xs.resize(M * (I / kBlock));
  if (split && static_cast<int64_t>(s.xh.size()) < M * I) {
    s.xh.resize(M * I);
    s.xl.resize(M * I);
  }
  return s;
}

void check_q8_shapes(int64_t I, int64_t O) {
  TORCH_CHECK(I % kBlock == 0 && I > 0, "q8 linear: inputs must be a positive multiple of 32, got ", I);
  TORCH_CHECK(O % kTile == 0 && O > 0, "q8 linear: outputs must be a positive multiple of 16, got ", O);
}

}  // namespace

const char* q8_isa() { return q8_path_name(q8_active_path()); }

void q8_linear(const float* x, int64_t M, int64_t I, const int8_t* wq, const uint16_t* ws,
               int64_t O, float* y, bool accumulate) {
  check_q8_shapes(I, O);
  const int64_t NB = I / kBlock, tiles = O / kTile;
  const Q8Path path = q8_active_path();  // the widest this build and CPU run (or RWKV_NVIM_Q8_ISA's)
  const bool split = q8_path_splits(path);
  Scratch& s = scratch(M, I, split);
  quantize_rows(x, M, I, s.xq.data(), s.xs.data());
  if (split) q8_split_activations(s.xq.data(), M * I, s.xh.data(), s.xl.data());
  const Q8Rows rows{s.xq.data(), s.xs.data(), split ? s.xh.data() : nullptr,
                    split ? s.xl.data() : nullptr, M, I};
  // ~4 KiB of weights per tile-block row; aim for tasks of >= ~64 KiB of weights
  const int64_t grain = std::max<int64_t>(1, 128 / NB);
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    q8_tiles(path, rows, wq, ws, O, y, accumulate, begin, end);
  });
}

void q8_linear_reference(const float* x, int64_t M, int64_t I, const int8_t* wq,
                         const uint16_t* ws, int64_t O, float* y, bool accumulate) {
  check_q8_shapes(I, O);
  const int64_t NB = I / kBlock;
  std::vector<int16_t> xq(M * I);
  std::vector<float> xs(M * NB);
  quantize_rows(x, M, I, xq.data(), xs.data());
  q8_tiles_scalar(Q8Rows{xq.data(), xs.data(), nullptr, nullptr, M, I}, wq, ws, O, y, accumulate, 0, O / kTile);
}

const char* q4_isa() { return q4_path_name(q4_active_path()); }

void q4_linear(const float* x, int64_t M, int64_t I, const uint8_t* wq, const uint16_t* ws,
               int64_t O, float* y, bool accumulate) {
  check_q8_shapes(I, O);
  const int64_t NB = I / kBlock, tiles = O / kTile;
  const Q4Path path = q4_active_path();
  Scratch& s = scratch(M, I, false);
  quantize_rows(x, M, I, s.xq.data(), s.xs.data());
  if (static_cast<int64_t>(s.xsum.size()) < M * NB) s.xsum.resize(M * NB);
  for (int64_t m = 0; m < M; ++m) q4_block_sums(s.xq.data() + m * I, I, s.xsum.data() + m * NB);
  const Q8Rows rows{s.xq.data(), s.xs.data(), nullptr, nullptr, M, I};
  const int32_t* xsum = s.xsum.data();
  // ~2 KiB of weights per tile-block row; tasks of >= ~64 KiB of weights
  const int64_t grain = std::max<int64_t>(1, 256 / NB);
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    q4_tiles(path, rows, xsum, wq, ws, O, y, accumulate, begin, end);
  });
}

void q4_linear_reference(const float* x, int64_t M, int64_t I, const uint8_t* wq,
                         const uint16_t* ws, int64_t O, float* y, bool accumulate) {
  check_q8_shapes(I, O);
  const int64_t NB = I / kBlock;
  std::vector<int16_t> xq(M * I);
  std::vector<float> xs(M * NB);
  quantize_rows(x, M, I, xq.data(), xs.data());
  q4_tiles_scalar(Q8Rows{xq.data(), xs.data(), nullptr, nullptr, M, I}, wq, ws, O, y, accumulate, 0,
                  O / kTile);
}

const char* q4a8_isa() { return q4a8_path_name(q4a8_active_path()); }

namespace {
// int8 activations of M rows (input order; also nibble order when `interleave`).
A8Rows quantize_rows_a8(const float* x, int64_t M, int64_t I, bool interleave, std::vector<int8_t>& xq,
                        std::vector<int8_t>& xp, std::vector<float>& xs, std::vector<int32_t>& xsum) {
  const int64_t NB = I / kBlock;
  if (static_cast<int64_t>(xq.size()) < M * I) xq.resize(M * I);
  if (interleave && static_cast<int64_t>(xp.size()) < M * I) xp.resize(M * I);
  if (static_cast<int64_t>(xs.size()) < M * NB) xs.resize(M * NB);
  if (static_cast<int64_t>(xsum.size()) < M * NB) xsum.resize(M * NB);
  at::parallel_for(0, M, M >= 16 ? 4 : M, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      a8_quantize_row(x + m * I, I, xq.data() + m * I, xs.data() + m * NB, xsum.data() + m * NB);
      if (interleave) a8_interleave_row(xq.data() + m * I, I, xp.data() + m * I);
    }
  });
  return A8Rows{xq.data(), interleave ? xp.data() : nullptr, xs.data(), xsum.data(), M, I};
}
}  // namespace

void q4a8_linear(const float* x, int64_t M, int64_t I, const uint8_t* wq, const uint16_t* ws,
                 int64_t O, float* y, bool accumulate) {
  check_q8_shapes(I, O);
  const int64_t NB = I / kBlock, tiles = O / kTile;
  const Q4A8Path path = q4a8_active_path();
  Scratch& s = scratch(0, I, false);
  const A8Rows rows = quantize_rows_a8(x, M, I, q4a8_path_interleaves(path), s.xq8, s.xp8, s.xs, s.xsum);
  // ~2 KiB of weights per tile-block row; tasks of >= ~64 KiB of weights
  const int64_t grain = std::max<int64_t>(1, 256 / NB);
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    q4a8_tiles(path, rows, wq, ws, O, y, accumulate, begin, end);
  });
}

void q4a8_linear_reference(const float* x, int64_t M, int64_t I, const uint8_t* wq,
                           const uint16_t* ws, int64_t O, float* y, bool accumulate) {
  check_q8_shapes(I, O);
  std::vector<int8_t> xq, xp;
  std::vector<float> xs;
  std::vector<int32_t> xsum;
  const A8Rows rows = quantize_rows_a8(x, M, I, false, xq, xp, xs, xsum);
  q4a8_tiles_scalar(rows, wq, ws, O, y, accumulate, 0, O / kTile);
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

// wq [O/16, I/32, 256] uint8, ws [O/16, I/32, 16] fp16 -> (I, O)
std::pair<int64_t, int64_t> q4_dims(const at::Tensor& wq, const at::Tensor& ws) {
  TORCH_CHECK(wq.dim() == 3 && wq.size(2) == rwkv_cpu::kQ4TileBlockBytes && wq.scalar_type() == at::kByte &&
                  wq.is_contiguous(),
              "q4 linear: wq must be contiguous uint8 [O/16, I/32, 256], got ", wq.sizes());
  TORCH_CHECK(ws.dim() == 3 && ws.size(0) == wq.size(0) && ws.size(1) == wq.size(1) &&
                  ws.size(2) == rwkv_cpu::kTile && ws.scalar_type() == at::kHalf && ws.is_contiguous(),
              "q4 linear: ws must be contiguous float16 [O/16, I/32, 16], got ", ws.sizes());
  return {wq.size(1) * rwkv_cpu::kBlock, wq.size(0) * rwkv_cpu::kTile};
}

// The ops on packed q4 weights (wq [O/16, I/32, 256] uint8, ws fp16): `fn` is the product
// (q4 or q4a8, fast or the scalar reference), `op` names it in errors.
using Q4Product = void (*)(const float*, int64_t, int64_t, const uint8_t*, const uint16_t*, int64_t, float*, bool);

at::Tensor q4_weights_op(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws, Q4Product fn,
                         const char* op) {
  const auto [I, O] = q4_dims(wq, ws);
  check_x(x, I, op);
  at::Tensor y = at::empty({x.size(0), O}, x.options());
  if (x.size(0) > 0)
    fn(x.data_ptr<float>(), x.size(0), I, wq.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(ws.data_ptr<at::Half>()),
       O, y.data_ptr<float>(), false);
  return y;
}

at::Tensor q4_linear_op(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws) {
  return q4_weights_op(x, wq, ws, rwkv_cpu::q4_linear, "q4_linear");
}

at::Tensor q4_linear_reference_op(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws) {
  return q4_weights_op(x, wq, ws, rwkv_cpu::q4_linear_reference, "q4_linear_reference");
}

at::Tensor q4a8_linear_op(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws) {
  return q4_weights_op(x, wq, ws, rwkv_cpu::q4a8_linear, "q4a8_linear");
}

at::Tensor q4a8_linear_reference_op(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws) {
  return q4_weights_op(x, wq, ws, rwkv_cpu::q4a8_linear_reference, "q4a8_linear_reference");
}

std::string q4_isa_op() { return rwkv_cpu::q4_isa(); }

std::string q4a8_isa_op() { return rwkv_cpu::q4a8_isa(); }

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
  m.def("q4_linear(Tensor x, Tensor wq, Tensor ws) -> Tensor");
  m.def("q4_linear_reference(Tensor x, Tensor wq, Tensor ws) -> Tensor");
  m.def("q4_isa() -> str", &q4_isa_op);
  m.def("q4a8_linear(Tensor x, Tensor wq, Tensor ws) -> Tensor");
  m.def("q4a8_linear_reference(Tensor x, Tensor wq, Tensor ws) -> Tensor");
  m.def("q4a8_isa() -> str", &q4a8_isa_op);
  m.def("parallel_threads() -> int", &parallel_threads_op);
}

TORCH_LIBRARY_IMPL(rwkv_nvim_cpu, CPU, m) {
  m.impl("q8_linear", &q8_linear_op);
  m.impl("q8_linear_reference", &q8_linear_reference_op);
  m.impl("f32_linear", &f32_linear_op);
  m.impl("q4_linear", &q4_linear_op);
  m.impl("q4_linear_reference", &q4_linear_reference_op);
  m.impl("q4a8_linear", &q4a8_linear_op);
  m.impl("q4a8_linear_reference", &q4a8_linear_reference_op);
}
