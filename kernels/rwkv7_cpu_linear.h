// Matrix products of the CPU engine for few rows (decode: 1-8 rows; prefill: any M),
// shared by the linear ops (rwkv7_cpu_linear.cpp) and the fused decode step
// (rwkv7_cpu_step.cpp).
//
// q8 weights ("int8" mode): W [O, I] fp32 quantized symmetrically per block of 32
// inputs: scale[o, b] = max|W[o, 32b:32b+32]| / 127 rounded to fp16 (the stored value),
// q = round(W / scale) in [-127, 127].
// Packed for 16 outputs at a time (a tile), interleaved by input pairs so that one
// 32-bit lane of a 512-bit register holds the pair (q[o, 2g], q[o, 2g + 1]) of one
// output o:
//   wq [O/16, I/32, 16 (pair g), 16 (output lane), 2] int8      (512 bytes per tile-block)
//   ws [O/16, I/32, 16 (output lane)] fp16 bits (1.0625 bytes per weight in all)
// Activations are quantized per row and block of 32 to int16 (scale = max|x| / 32767),
// so a block's dot product is exact in int32 (|sum| <= 32 * 32767 * 127 < 2^31); the
// fp32 result is sum_b ws[o, b] * xs[m, b] * dot_b. O % 16 == 0 and I % 32 == 0.
// The arithmetic of every instruction-set path is in rwkv7_cpu_q8.h (no torch).
//
// f32 weights ("fp32" mode): W [O, I] fp32 row-major.
#pragma once

#include <cstdint>

namespace rwkv_cpu {

constexpr int64_t kTile = 16;    // outputs per tile
constexpr int64_t kBlock = 32;   // inputs per scale block
constexpr int64_t kTileBlockBytes = kTile * kBlock;

// y[M, O] (=, or += when accumulate) x[M, I] W^T, W as packed q8. Parallel over tiles.
void q8_linear(const float* x, int64_t M, int64_t I, const int8_t* wq, const uint16_t* ws,
               int64_t O, float* y, bool accumulate);

// The scalar reference of q8_linear (same quantization of x, plain loops, one thread).
void q8_linear_reference(const float* x, int64_t M, int64_t I, const int8_t* wq,
                         const uint16_t* ws, int64_t O, float* y, bool accumulate);

// y[M, O] (=, or +=) x[M, I] W^T, W as packed q4 (wq [O/16, I/32, 256] nibbles, ws as
// for q8; layout in rwkv7_cpu_q4.h). Parallel over tiles.
void q4_linear(const float* x, int64_t M, int64_t I, const uint8_t* wq, const uint16_t* ws,
               int64_t O, float* y, bool accumulate);

// The scalar reference of q4_linear.
void q4_linear_reference(const float* x, int64_t M, int64_t I, const uint8_t* wq,
                         const uint16_t* ws, int64_t O, float* y, bool accumulate);

// q4_linear with 8-bit activations (int8 per row and block of 32; rwkv7_cpu_q4a8.h).
void q4a8_linear(const float* x, int64_t M, int64_t I, const uint8_t* wq, const uint16_t* ws,
                 int64_t O, float* y, bool accumulate);

// The scalar reference of q4a8_linear.
void q4a8_linear_reference(const float* x, int64_t M, int64_t I, const uint8_t* wq,
                           const uint16_t* ws, int64_t O, float* y, bool accumulate);

// y[M, O] (=, or +=) x[M, I] W^T with W [O, I] fp32. Parallel over outputs.
void f32_linear(const float* x, int64_t M, int64_t I, const float* W, int64_t O, float* y,
                bool accumulate);

// The instruction-set path the q8 product runs ("avx512-vnni", "avx512bw", "avx2":
// compiled in; "neon-dotprod", "neon": picked at run time on aarch64; "scalar"), see
// rwkv7_cpu_q8.h.
const char* q8_isa();

// The path of the q4 product ("avx2" or "scalar"), see rwkv7_cpu_q4.h.
const char* q4_isa();

// The path of the q4a8 product ("avx2", "neon-dotprod" or "scalar"), see rwkv7_cpu_q4a8.h.
const char* q4a8_isa();

}  // namespace rwkv_cpu
