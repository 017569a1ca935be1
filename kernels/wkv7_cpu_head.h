// The per-head WKV-7 recurrence on the CPU (fp32), shared by the WKV op
// (wkv7_cpu.cpp) and the fused one-token decode step (rwkv7_cpu_step.cpp).
// Per head, with S[value i, key j] (64 x 64 fp32):
//   decay[j] = exp(-exp(w[j]))
//   sa[i]    = sum_j S[i, j] * a[j]                   (old S)
//   S[i, j]  = S[i, j] * decay[j] + sa[i] * b[j] + v[i] * k[j]
//   y[i]     = sum_j S[i, j] * r[j]                   (new S)
// Each layout has its scalar reference (`*_scalar`: plain loops the x86 build
// vectorizes by itself) and, on aarch64, a NEON twin (`*_neon`: the same sums in the
// same j order with FMA); wkv7_head_rows / wkv7_head_cols pick one when compiling.
// No torch here: kernels/tests/cpu_kernels_check.cpp compares the two.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define RWKV_CPU_NEON_WKV 1
#endif

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

__attribute__((noinline)) inline void wkv7_head_rows_scalar(int64_t T, int64_t row_stride,
                                                            const float* S_in, float* S_out,
                                                            const float* r, const float* w,
                                                            const float* k, const float* v,
                                                            const float* a, const float* b, float* y) {
  if (S_in == S_out)
    wkv7_head_rows_impl<true>(T, row_stride, S_in, S_out, r, w, k, v, a, b, y);
  else
    wkv7_head_rows_impl<false>(T, row_stride, S_in, S_out, r, w, k, v, a, b, y);
}

#if defined(RWKV_CPU_NEON_WKV)
// The row layout with NEON: per row i, sa and y as four 4-lane partial sums.
template <bool kInPlace>
inline void wkv7_head_rows_neon_impl(int64_t T, int64_t row_stride, const float* S_in, float* S_out,
                                     const float* __restrict__ r, const float* __restrict__ w,
                                     const float* __restrict__ k, const float* __restrict__ v,
                                     const float* __restrict__ a, const float* __restrict__ b,
                                     float* __restrict__ y) {
  alignas(16) float decay[kHeadSize];
  for (int64_t t = 0; t < T; ++t) {
    const int64_t off = t * row_stride;
    const float* rt = r + off;
    const float* kt = k + off;
    const float* at_ = a + off;
    const float* bt = b + off;
    const float* wt = w + off;
    const float* src = (kInPlace || t > 0) ? S_out : S_in;
    for (int64_t j = 0; j < kHeadSize; ++j) decay[j] = std::exp(-std::exp(wt[j]));
    for (int64_t i = 0; i < kHeadSize; ++i) {
      const float* row = src + i * kHeadSize;  // S[i, :] before the step
      float* dst = S_out + i * kHeadSize;      // S[i, :] after it (may be row)
      float32x4_t p[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
      for (int64_t j = 0; j < kHeadSize; j += 16)
        for (int q = 0; q < 4; ++q) p[q] = vfmaq_f32(p[q], vld1q_f32(row + j + 4 * q), vld1q_f32(at_ + j + 4 * q));
      const float sa = vaddvq_f32(vaddq_f32(vaddq_f32(p[0], p[1]), vaddq_f32(p[2], p[3])));
      const float vi = v[off + i];
      float32x4_t o[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
      for (int64_t j = 0; j < kHeadSize; j += 16)
        for (int q = 0; q < 4; ++q) {
          const int64_t jj = j + 4 * q;
          float32x4_t s = vmulq_f32(vld1q_f32(row + jj), vld1q_f32(decay + jj));
          s = vfmaq_n_f32(s, vld1q_f32(bt + jj), sa);
          s = vfmaq_n_f32(s, vld1q_f32(kt + jj), vi);
          vst1q_f32(dst + jj, s);
          o[q] = vfmaq_f32(o[q], s, vld1q_f32(rt + jj));
        }
      y[off + i] = vaddvq_f32(vaddq_f32(vaddq_f32(o[0], o[1]), vaddq_f32(o[2], o[3])));
    }
  }
}

__attribute__((noinline)) inline void wkv7_head_rows_neon(int64_t T, int64_t row_stride,
                                                          const float* S_in, float* S_out,
                                                          const float* r, const float* w,
                                                          const float* k, const float* v,
                                                          const float* a, const float* b, float* y) {
  if (S_in == S_out)
    wkv7_head_rows_neon_impl<true>(T, row_stride, S_in, S_out, r, w, k, v, a, b, y);
  else
    wkv7_head_rows_neon_impl<false>(T, row_stride, S_in, S_out, r, w, k, v, a, b, y);
}

inline void wkv7_head_rows(int64_t T, int64_t row_stride, const float* S_in, float* S_out,
                           const float* r, const float* w, const float* k, const float* v,
                           const float* a, const float* b, float* y) {
  wkv7_head_rows_neon(T, row_stride, S_in, S_out, r, w, k, v, a, b, y);
}
#else
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
#endif

// Same result, for prefill: keeps a transposed copy ST[key j][value i] so that
// both mat-vecs (S a and S r) become vertical sums over 64-wide value vectors
// (no horizontal reductions); ~2x faster per step, but the two 16 KiB
// transpositions only pay off beyond a few steps.
inline void wkv7_head_cols_scalar(int64_t T, int64_t row_stride, float* __restrict__ S,
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

#if defined(RWKV_CPU_NEON_WKV)
// The column layout with NEON: each chunk of 16 values i keeps its sa, v and y sums in
// registers over all 64 keys j (the chunks are independent).
inline void wkv7_head_cols_neon(int64_t T, int64_t row_stride, float* __restrict__ S,
                                const float* __restrict__ r, const float* __restrict__ w,
                                const float* __restrict__ k, const float* __restrict__ v,
                                const float* __restrict__ a, const float* __restrict__ b,
                                float* __restrict__ y) {
  alignas(16) float ST[kHeadSize * kHeadSize];  // ST[j * 64 + i] = S[i, j]
  for (int64_t i = 0; i < kHeadSize; ++i)
    for (int64_t j = 0; j < kHeadSize; ++j) ST[j * kHeadSize + i] = S[i * kHeadSize + j];
  alignas(16) float decay[kHeadSize];
  for (int64_t t = 0; t < T; ++t) {
    const int64_t off = t * row_stride;
    const float* at_ = a + off;
    const float* bt = b + off;
    const float* kt = k + off;
    const float* rt = r + off;
    for (int64_t j = 0; j < kHeadSize; ++j) decay[j] = std::exp(-std::exp(w[off + j]));
    for (int64_t i0 = 0; i0 < kHeadSize; i0 += 16) {
      float32x4_t sa[4], vv[4], out[4];
      for (int q = 0; q < 4; ++q) {
        sa[q] = out[q] = vdupq_n_f32(0.f);
        vv[q] = vld1q_f32(v + off + i0 + 4 * q);
      }
      for (int64_t j = 0; j < kHeadSize; ++j) {  // sa = S a  (old S)
        const float* col = ST + j * kHeadSize + i0;
        for (int q = 0; q < 4; ++q) sa[q] = vfmaq_n_f32(sa[q], vld1q_f32(col + 4 * q), at_[j]);
      }
      for (int64_t j = 0; j < kHeadSize; ++j) {  // S = S diag(decay) + sa b^T + v k^T ; out = S r
        float* col = ST + j * kHeadSize + i0;
        const float dj = decay[j], bj = bt[j], kj = kt[j], rj = rt[j];
        for (int q = 0; q < 4; ++q) {
          float32x4_t s = vmulq_n_f32(vld1q_f32(col + 4 * q), dj);
          s = vfmaq_n_f32(s, sa[q], bj);
          s = vfmaq_n_f32(s, vv[q], kj);
          vst1q_f32(col + 4 * q, s);
          out[q] = vfmaq_n_f32(out[q], s, rj);
        }
      }
      for (int q = 0; q < 4; ++q) vst1q_f32(y + off + i0 + 4 * q, out[q]);
    }
  }
  for (int64_t i = 0; i < kHeadSize; ++i)
    for (int64_t j = 0; j < kHeadSize; ++j) S[i * kHeadSize + j] = ST[j * kHeadSize + i];
}

inline void wkv7_head_cols(int64_t T, int64_t row_stride, float* S, const float* r, const float* w,
                           const float* k, const float* v, const float* a, const float* b, float* y) {
  wkv7_head_cols_neon(T, row_stride, S, r, w, k, v, a, b, y);
}
#else
inline void wkv7_head_cols(int64_t T, int64_t row_stride, float* S, const float* r, const float* w,
                           const float* k, const float* v, const float* a, const float* b, float* y) {
  wkv7_head_cols_scalar(T, row_stride, S, r, w, k, v, a, b, y);
}
#endif

}  // namespace rwkv_cpu
