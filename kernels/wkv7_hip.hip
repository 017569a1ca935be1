// RWKV-7 WKV state-passing kernel (HIP / ROCm twin of wkv7_cuda.cu: same
// algorithm, same extern "C" launcher, so kernels/wkv7_binding.cpp serves both).
// Free of torch headers: compiles standalone with
// `HIP_PLATFORM=amd hipcc --offload-arch=gfx90a -c kernels/wkv7_hip.hip`.
// bf16 is handled as raw 16-bit words (the top half of an fp32), which works
// on every ROCm release whatever its bf16 header is called.
//
// Per (batch b, head h), with the head's state S[value i, key j] (64 x 64, fp32)
// and per-step vectors r, w, k, v, a, b (64 each, fp16/bf16/fp32):
//   decay[j] = exp(-exp(w[j]))                        (fp32)
//   sa[i]    = sum_j S[i, j] * a[j]                   (old S)
//   S[i, j]  = S[i, j] * decay[j] + sa[i] * b[j] + v[i] * k[j]
//   y[i]     = sum_j S[i, j] * r[j]                   (new S; y in the input dtype)
// Row i of S depends only on row i, so thread i owns row i in 64 registers;
// the key-indexed vectors (r, decay, k, a, b) are shared by all rows and staged
// in shared memory once per step. One block of 64 threads per (b, h); the same
// kernel runs a T-token prefill and a T=1 decode step.
//
// Layouts (all contiguous):
//   state  [B, H, 64, 64] fp32, updated in place
//   r..b   [B, T, H, 64]  element (b, t, h, n) at ((b*T + t)*H + h)*64 + n
//   y      [B, T, H, 64]  same dtype as the inputs

#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#include <stdint.h>

namespace {

constexpr int kHeadSize = 64;
constexpr int kRowPad = kHeadSize + 1;  // shared-memory row stride: conflict-free transpose

__device__ __forceinline__ float load_as_float(const float* p) { return *p; }
__device__ __forceinline__ float load_as_float(const __half* p) { return __half2float(*p); }
struct bf16_bits { uint16_t x; };  // storage-only bf16

__device__ __forceinline__ float load_as_float(const bf16_bits* p) {
  return __uint_as_float(static_cast<uint32_t>(p->x) << 16);
}

__device__ __forceinline__ void store_from_float(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_from_float(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store_from_float(bf16_bits* p, float x) {
  const uint32_t u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a quiet NaN
    p->x = static_cast<uint16_t>((u >> 16) | 0x0040u);
    return;
  }
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  p->x = static_cast<uint16_t>(rounded >> 16);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kHeadSize)
wkv7_forward_kernel(int T, int H,
                    float* __restrict__ state,            // [B, H, 64, 64] fp32
                    const scalar_t* __restrict__ r,       // [B, T, H, 64]
                    const scalar_t* __restrict__ w,
                    const scalar_t* __restrict__ k,
                    const scalar_t* __restrict__ v,
                    const scalar_t* __restrict__ a,
                    const scalar_t* __restrict__ b,
                    scalar_t* __restrict__ y) {
  const int bh = blockIdx.x;              // b * H + h
  const int batch = bh / H;
  const int head = bh - batch * H;
  const int i = threadIdx.x;              // value row owned by this thread

  __shared__ float tile[kHeadSize * kRowPad];  // state transpose buffer
  __shared__ __align__(16) float r_s[kHeadSize];
  __shared__ __align__(16) float decay_s[kHeadSize];
  __shared__ __align__(16) float k_s[kHeadSize];
  __shared__ __align__(16) float a_s[kHeadSize];
  __shared__ __align__(16) float b_s[kHeadSize];

  float* head_state = state + (size_t)bh * kHeadSize * kHeadSize;

  // Coalesced load of the 64x64 state: pass c reads row c, thread i column i.
#pragma unroll 8
  for (int c = 0; c < kHeadSize; ++c) tile[c * kRowPad + i] = head_state[c * kHeadSize + i];
  __syncthreads();
  float s[kHeadSize];  // S[i, :]
#pragma unroll
  for (int j = 0; j < kHeadSize; ++j) s[j] = tile[i * kRowPad + j];

  for (int t = 0; t < T; ++t) {
    const size_t off = ((size_t)(batch * T + t) * H + head) * kHeadSize + i;
    __syncthreads();  // previous step finished reading the staged vectors
    r_s[i] = load_as_float(r + off);
    decay_s[i] = expf(-expf(load_as_float(w + off)));
    k_s[i] = load_as_float(k + off);
    a_s[i] = load_as_float(a + off);
    b_s[i] = load_as_float(b + off);
    const float v_i = load_as_float(v + off);
    __syncthreads();

    float sa = 0.f;
#pragma unroll
    for (int j = 0; j < kHeadSize; j += 4) {
      const float4 a4 = *reinterpret_cast<const float4*>(a_s + j);
      sa += s[j] * a4.x + s[j + 1] * a4.y + s[j + 2] * a4.z + s[j + 3] * a4.w;
    }

    float out = 0.f;
#pragma unroll
    for (int j = 0; j < kHeadSize; j += 4) {
      const float4 d4 = *reinterpret_cast<const float4*>(decay_s + j);
      const float4 b4 = *reinterpret_cast<const float4*>(b_s + j);
      const float4 k4 = *reinterpret_cast<const float4*>(k_s + j);
      const float4 r4 = *reinterpret_cast<const float4*>(r_s + j);
      s[j] = s[j] * d4.x + sa * b4.x + v_i * k4.x;
      s[j + 1] = s[j + 1] * d4.y + sa * b4.y + v_i * k4.y;
      s[j + 2] = s[j + 2] * d4.z + sa * b4.z + v_i * k4.z;
      s[j + 3] = s[j + 3] * d4.w + sa * b4.w + v_i * k4.w;
      out += s[j] * r4.x + s[j + 1] * r4.y + s[j + 2] * r4.z + s[j + 3] * r4.w;
    }
    store_from_float(y + off, out);
  }

  // Coalesced store back through the same transpose buffer.
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kHeadSize; ++j) tile[i * kRowPad + j] = s[j];
  __syncthreads();
#pragma unroll 8
  for (int c = 0; c < kHeadSize; ++c) head_state[c * kHeadSize + i] = tile[c * kRowPad + i];
}

template <typename scalar_t>
hipError_t launch(int B, int T, int H, float* state, const void* r, const void* w, const void* k,
                   const void* v, const void* a, const void* b, void* y, hipStream_t stream) {
  wkv7_forward_kernel<scalar_t><<<B * H, kHeadSize, 0, stream>>>(
      T, H, state, static_cast<const scalar_t*>(r), static_cast<const scalar_t*>(w),
      static_cast<const scalar_t*>(k), static_cast<const scalar_t*>(v),
      static_cast<const scalar_t*>(a), static_cast<const scalar_t*>(b), static_cast<scalar_t*>(y));
  return hipGetLastError();
}

}  // namespace

extern "C" {

// dtype codes shared with wkv7_binding.cpp
enum { RWKV_WKV7_FP32 = 0, RWKV_WKV7_FP16 = 1, RWKV_WKV7_BF16 = 2 };

// Runs the WKV-7 recurrence over T steps for B*H heads on `stream`.
// Returns 0 on success, -1 for bad arguments, otherwise the hipError_t code.
int rwkv_wkv7_forward(int dtype, int B, int T, int H, float* state, const void* r, const void* w,
                      const void* k, const void* v, const void* a, const void* b, void* y,
                      void* stream) {
  if (B <= 0 || T <= 0 || H <= 0) return (B == 0 || T == 0 || H == 0) ? 0 : -1;
  const hipStream_t s = static_cast<hipStream_t>(stream);
  hipError_t err;
  switch (dtype) {
    case RWKV_WKV7_FP32: err = launch<float>(B, T, H, state, r, w, k, v, a, b, y, s); break;
    case RWKV_WKV7_FP16: err = launch<__half>(B, T, H, state, r, w, k, v, a, b, y, s); break;
    case RWKV_WKV7_BF16: err = launch<bf16_bits>(B, T, H, state, r, w, k, v, a, b, y, s); break;
    default: return -1;
  }
  return static_cast<int>(err);
}

const char* rwkv_wkv7_error_string(int code) {
  if (code == -1) return "invalid arguments (dtype code or sizes)";
  return hipGetErrorString(static_cast<hipError_t>(code));
}

}  // extern "C"
