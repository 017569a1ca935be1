// Vectorizable exp / log1p / sigmoid / softplus / tanh for the fused decode step
// (kernels/rwkv7_cpu_step.cpp). libm's scalar calls cost ~8 ns each and a step needs
// ~6 per channel and layer (147k at 0.4B); these are plain float arithmetic that the
// compiler turns into 16-wide vector code. Accuracy (checked against double precision
// over their ranges): exp 8.4e-8, log1p 2.1e-7 relative; the step's outputs are tested
// against the torch layer code (tests/core/test_cpu_linear.py).
//
// The step's loops over these functions are below (tanh_array, decay_array, ...): each
// has its scalar reference (`*_scalar`, the loop the x86 build vectorizes by itself) and,
// on aarch64, a NEON twin (`*_neon`, 4 lanes, the same polynomials with FMA);
// kernels/tests/cpu_kernels_check.cpp compares them. No torch here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace rwkv_cpu {

// Cephes-style expf: e^x = 2^n e^r, |r| <= ln2 / 2, degree-6 polynomial for e^r.
inline float exp_fast(float x) {
  x = std::min(std::max(x, -87.33654f), 88.3762626647949f);
  // n = round(x / ln2) by the 1.5 * 2^23 trick (vectorizes; std::floor does not here)
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// log(1 + u) for u in [0, 1]: 2 atanh(t), t = u / (2 + u) <= 1/3, odd series to t^15.
inline float log1p_unit(float u) {
  const float t = u / (2.0f + u), t2 = t * t;
  float p = 1.0f / 15;
  p = p * t2 + 1.0f / 13;
  p = p * t2 + 1.0f / 11;
  p = p * t2 + 1.0f / 9;
  p = p * t2 + 1.0f / 7;
  p = p * t2 + 1.0f / 5;
  p = p * t2 + 1.0f / 3;
  p = p * t2 + 1.0f;
  return 2.0f * t * p;
}

inline float sigmoid_fast(float z) { return 1.f / (1.f + exp_fast(-z)); }

// log(1 + e^z) = max(z, 0) + log1p(e^-|z|): no overflow, exact to fp32 where torch's
// softplus switches to z (z > 20)
inline float softplus_fast(float z) { return std::max(z, 0.f) + log1p_unit(exp_fast(-std::fabs(z))); }

inline float tanh_fast(float z) { return 2.f * sigmoid_fast(2.f * z) - 1.f; }

// ---- the fused step's loops (n values; pointers may not overlap unless said) ----

// x = tanh(x), in place
inline void tanh_array_scalar(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = tanh_fast(x[i]);
}
// x = sigmoid(x), in place
inline void sigmoid_array_scalar(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = sigmoid_fast(x[i]);
}
// decay: w = -softplus(-(w0 + w)) - 0.5, in place
inline void decay_array_scalar(float* w, const float* w0, int64_t n) {
  for (int64_t c = 0; c < n; ++c) w[c] = -softplus_fast(-(w0[c] + w[c])) - 0.5f;
}
// in-context rate: a = sigmoid(a0 + a), in place
inline void sigmoid_bias_array_scalar(float* a, const float* a0, int64_t n) {
  for (int64_t c = 0; c < n; ++c) a[c] = sigmoid_fast(a0[c] + a[c]);
}
// value residual: v += (vf - v) * sigmoid(v0 + t), in place
inline void value_mix_array_scalar(float* v, const float* vf, const float* t, const float* v0, int64_t n) {
  for (int64_t c = 0; c < n; ++c) v[c] += (vf[c] - v[c]) * sigmoid_fast(v0[c] + t[c]);
}

#if defined(__aarch64__) && defined(__ARM_NEON)
#define RWKV_CPU_NEON_MATH 1

inline float32x4_t exp_fast_neon(float32x4_t x) {
  x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.33654f)), vdupq_n_f32(88.3762626647949f));
  const float32x4_t shift = vdupq_n_f32(12582912.f);
  const float32x4_t n = vsubq_f32(vfmaq_f32(shift, x, vdupq_n_f32(1.44269504088896341f)), shift);
  float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
  r = vfmaq_f32(r, n, vdupq_n_f32(2.12194440e-4f));
  float32x4_t y = vdupq_n_f32(1.9875691500e-4f);
  y = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), y, r);
  y = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), y, r);
  y = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), y, r);
  y = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), y, r);
  y = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), y, r);
  y = vaddq_f32(vfmaq_f32(r, vmulq_f32(y, r), r), vdupq_n_f32(1.0f));  // y r^2 + r + 1
  const int32x4_t bits = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);  // 2^n
  return vmulq_f32(y, vreinterpretq_f32_s32(bits));
}

inline float32x4_t log1p_unit_neon(float32x4_t u) {
  const float32x4_t t = vdivq_f32(u, vaddq_f32(vdupq_n_f32(2.0f), u)), t2 = vmulq_f32(t, t);
  float32x4_t p = vdupq_n_f32(1.0f / 15);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 13), p, t2);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 11), p, t2);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 9), p, t2);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 7), p, t2);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 5), p, t2);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 3), p, t2);
  p = vfmaq_f32(vdupq_n_f32(1.0f), p, t2);
  return vmulq_f32(vmulq_f32(vdupq_n_f32(2.0f), t), p);
}

inline float32x4_t sigmoid_fast_neon(float32x4_t z) {
  const float32x4_t one = vdupq_n_f32(1.f);
  return vdivq_f32(one, vaddq_f32(one, exp_fast_neon(vnegq_f32(z))));
}

inline float32x4_t softplus_fast_neon(float32x4_t z) {
  return vaddq_f32(vmaxq_f32(z, vdupq_n_f32(0.f)), log1p_unit_neon(exp_fast_neon(vnegq_f32(vabsq_f32(z)))));
}

inline float32x4_t tanh_fast_neon(float32x4_t z) {
  return vfmsq_f32(vdupq_n_f32(-1.f), vdupq_n_f32(-2.f), sigmoid_fast_neon(vaddq_f32(z, z)));  // 2 s - 1
}

inline void tanh_array_neon(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(x + i, tanh_fast_neon(vld1q_f32(x + i)));
  for (; i < n; ++i) x[i] = tanh_fast(x[i]);
}
inline void sigmoid_array_neon(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(x + i, sigmoid_fast_neon(vld1q_f32(x + i)));
  for (; i < n; ++i) x[i] = sigmoid_fast(x[i]);
}
inline void decay_array_neon(float* w, const float* w0, int64_t n) {
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    const float32x4_t z = vnegq_f32(vaddq_f32(vld1q_f32(w0 + c), vld1q_f32(w + c)));
    vst1q_f32(w + c, vsubq_f32(vnegq_f32(softplus_fast_neon(z)), vdupq_n_f32(0.5f)));
  }
  for (; c < n; ++c) w[c] = -softplus_fast(-(w0[c] + w[c])) - 0.5f;
}
inline void sigmoid_bias_array_neon(float* a, const float* a0, int64_t n) {
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) vst1q_f32(a + c, sigmoid_fast_neon(vaddq_f32(vld1q_f32(a0 + c), vld1q_f32(a + c))));
  for (; c < n; ++c) a[c] = sigmoid_fast(a0[c] + a[c]);
}
inline void value_mix_array_neon(float* v, const float* vf, const float* t, const float* v0, int64_t n) {
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    const float32x4_t vc = vld1q_f32(v + c);
    const float32x4_t g = sigmoid_fast_neon(vaddq_f32(vld1q_f32(v0 + c), vld1q_f32(t + c)));
    vst1q_f32(v + c, vfmaq_f32(vc, vsubq_f32(vld1q_f32(vf + c), vc), g));
  }
  for (; c < n; ++c) v[c] += (vf[c] - v[c]) * sigmoid_fast(v0[c] + t[c]);
}
#endif

// What the step calls: the NEON loops on aarch64, the (auto-vectorized) scalar ones elsewhere.
#if defined(RWKV_CPU_NEON_MATH)
inline void tanh_array(float* x, int64_t n) { tanh_array_neon(x, n); }
inline void sigmoid_array(float* x, int64_t n) { sigmoid_array_neon(x, n); }
inline void decay_array(float* w, const float* w0, int64_t n) { decay_array_neon(w, w0, n); }
inline void sigmoid_bias_array(float* a, const float* a0, int64_t n) { sigmoid_bias_array_neon(a, a0, n); }
inline void value_mix_array(float* v, const float* vf, const float* t, const float* v0, int64_t n) {
  value_mix_array_neon(v, vf, t, v0, n);
}
#else
inline void tanh_array(float* x, int64_t n) { tanh_array_scalar(x, n); }
inline void sigmoid_array(float* x, int64_t n) { sigmoid_array_scalar(x, n); }
inline void decay_array(float* w, const float* w0, int64_t n) { decay_array_scalar(w, w0, n); }
inline void sigmoid_bias_array(float* a, const float* a0, int64_t n) { sigmoid_bias_array_scalar(a, a0, n); }
inline void value_mix_array(float* v, const float* vf, const float* t, const float* v0, int64_t n) {
  value_mix_array_scalar(v, vf, t, v0, n);
}
#endif

}  // namespace rwkv_cpu
