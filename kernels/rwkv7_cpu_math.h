// Vectorizable exp / log1p / sigmoid / softplus / tanh for the fused decode step
// (kernels/rwkv7_cpu_step.cpp). libm's scalar calls cost ~8 ns each and a step needs
// ~6 per channel and layer (147k at 0.4B); these are plain float arithmetic that the
// compiler turns into 16-wide vector code. Accuracy (checked against double precision
// over their ranges): exp 8.4e-8, log1p 2.1e-7 relative; the step's outputs are tested
// against the torch layer code (tests/core/test_cpu_linear.py).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

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

}  // namespace rwkv_cpu
