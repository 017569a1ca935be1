// The per-head WKV-7 recurrence on the CPU (fp32), shared by the WKV op
// (wkv7_cpu.cpp) and the fused one-token decode step (rwkv7_cpu_step.cpp).
// Per head, with S[value i, key j] (64 x 64 fp32):
//   decay[j] = exp(-exp(w[j]))
//   sa[i]    = sum_j S[i, j] * a[j]                   (old S)
//   S[i, j]  = S[i, j] * decay[j] + sa[i] * b[j] + v[i] * k[j]
//   y[i]     = sum_j S[i, j] * r[j]                   (new S)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace rwkv_cpu {

constexpr int64_t kHeadSize = 64;

// One head over T steps, working on S in its own row layout. Best for a few
// steps (decode): no transposition. The first step reads S_in, every step writes
// S_out (S_in == S_out updates in place). S_in, S_out: [64, 64] of this head; the
// per-token vectors advance by row_stride = H * 64 floats per time step.
template <bool kInPlace>
inline void wkv7_head_rows_impl(int64_t T, int64_t row_stride, const float* S_in, float* S_out,
                                const float* __restrict__ r, const float* __restrict__ w,
                                const float* __restrict__ k, const float* __restrict__ v,
                                const float* __restrict__ a, const float* __restrict__ b,
                                float* __restrict__ y) {
  // The two dot products use kLanes partial sums: plain loops the compiler turns into
  // vector code (GCC leaves `omp simd reduction` loops of this shape scalar).
  constexpr int64_t kLanes = 16;
  alignas(64) float decay[kHeadSize];
  for (int64_t t = 0; t < T; ++t) {
    const int64_t off = t * row_stride;
    const float* rt = r + off;
    const float* kt = k + off;
    const float* at_ = a + off;
    const float* bt = b + off;
    const float* wt = w + off;
    // out of place, only the first step reads S_in (later ones continue in S_out)
    const float* __restrict__ src = (kInPlace || t > 0) ? S_out : S_in;
    for (int64_t j = 0; j < kHeadSize; ++j) decay[j] = std::exp(-std::exp(wt[j]));
    for (int64_t i = 0; i < kHeadSize; ++i) {
      const float* __restrict__ row = src + i * kHeadSize;  // S[i, :] before the step
      float* __restrict__ dst = S_out + i * kHeadSize;      // S[i, :] after it
      float part[kLanes] = {};
      for (int64_t j = 0; j < kHeadSize; j += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) part[l] += row[j + l] * at_[j + l];
      float sa = 0.f;
      for (int64_t l = 0; l < kLanes; ++l) sa += part[l];
      const float vi = v[off + i];
      float outp[kLanes] = {};
      for (int64_t j = 0; j < kHeadSize; j += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) {
          const float s = row[j + l] * decay[j + l] + sa * bt[j + l] + vi * kt[j + l];
          dst[j + l] = s;
          outp[l] += s * rt[j + l];
        }
      float out = 0.f;
      for (int64_t l = 0; l < kLanes; ++l) out += outp[l];
      y[off + i] = out;
    }
  }
}

__attribute__((noinline)) inline void wkv7_head_rows(int64_t T, int64_t row_stride,
                                                     const float* S_in, float* S_out,
                                                     const float* r, const float* w,
                                                     const float* k, const float* v,
                                                     const float* a, const float* b, float* y) {
  if (S_in == S_out)
    wkv7_head_rows_impl<true>(T, row_stride, S_in, S_out, r, w, k, v, a, b, y);
  else
    wkv7_head_rows_impl<false>(T, row_stride, S_in, S_out, r, w, k, v, a, b, y);
}

// Same result, for prefill: keeps a transposed copy ST[key j][value i] so that
// both mat-vecs (S a and S r) become vertical sums over 64-wide value vectors
// (no horizontal reductions); ~2x faster per step, but the two 16 KiB
// transpositions only pay off beyond a few steps.
inline void wkv7_head_cols(int64_t T, int64_t row_stride, float* __restrict__ S,
                    const float* __restrict__ r, const float* __restrict__ w,
                    const float* __restrict__ k, const float* __restrict__ v,
                    const float* __restrict__ a, const float* __restrict__ b,
                    float* __restrict__ y) {
  alignas(64) float ST[kHeadSize * kHeadSize];  // ST[j * 64 + i] = S[i, j]
  for (int64_t i = 0; i < kHeadSize; ++i)
    for (int64_t j = 0; j < kHeadSize; ++j) ST[j * kHeadSize + i] = S[i * kHeadSize + j];
  alignas(64) float sa[kHeadSize], out[kHeadSize], vv[kHeadSize];
  for (int64_t t = 0; t < T; ++t) {
    const int64_t off = t * row_stride;
    for (int64_t i = 0; i < kHeadSize; ++i) {
      sa[i] = 0.f;
      out[i] = 0.f;
      vv[i] = v[off + i];
    }
    for (int64_t j = 0; j < kHeadSize; ++j) {  // sa = S a  (old S)
      const float aj = a[off + j];
      const float* __restrict__ col = ST + j * kHeadSize;
#pragma omp simd
      for (int64_t i = 0; i < kHeadSize; ++i) sa[i] += col[i] * aj;
    }
    for (int64_t j = 0; j < kHeadSize; ++j) {  // S = S diag(decay) + sa b^T + v k^T ; out = S r
      const float dj = std::exp(-std::exp(w[off + j]));
      const float bj = b[off + j], kj = k[off + j], rj = r[off + j];
      float* __restrict__ col = ST + j * kHeadSize;
#pragma omp simd
      for (int64_t i = 0; i < kHeadSize; ++i) {
        const float s = col[i] * dj + sa[i] * bj + vv[i] * kj;
        col[i] = s;
        out[i] += s * rj;
      }
    }
    for (int64_t i = 0; i < kHeadSize; ++i) y[off + i] = out[i];
  }
  for (int64_t i = 0; i < kHeadSize; ++i)
    for (int64_t j = 0; j < kHeadSize; ++j) S[i * kHeadSize + j] = ST[j * kHeadSize + i];
}

}  // namespace rwkv_cpu
