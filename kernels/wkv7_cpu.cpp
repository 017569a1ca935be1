// RWKV-7 WKV state-passing kernel for the CPU (fp32), registered as the torch
// op `torch.ops.rwkv_nvim_wkv7_cpu.wkv7_`. JIT-built by engine/core/kernel_loader.py.
//
// Same math as kernels/wkv7_cuda.cu. Per (batch b, head h), with S[value i, key j]:
//   decay[j] = exp(-exp(w[j]))
//   sa[i]    = sum_j S[i, j] * a[j]                   (old S)
//   S[i, j]  = S[i, j] * decay[j] + sa[i] * b[j] + v[i] * k[j]
//   y[i]     = sum_j S[i, j] * r[j]                   (new S)
// Heads are independent: at::parallel_for splits the B*H heads over the intra-op
// threads; each head walks its T steps with the 16 KiB state hot in L1, and the
// 64-wide inner loops are written for the auto-vectorizer (-O3 -fopenmp-simd).
// Decode (T < 4) works on the row layout; prefill on a transposed copy.
//
// Only headers of the op-registration layer are included (not torch/extension.h)
// to keep the first-use build short.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kHeadSize = 64;

void check_inputs(const at::Tensor& state, const at::Tensor& r, const at::Tensor& w,
                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
                  const at::Tensor& b, const at::Tensor& y) {
  TORCH_CHECK(r.dim() == 4 && r.size(3) == kHeadSize,
              "wkv7: r must be [B, T, H, 64], got ", r.sizes());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
  TORCH_CHECK(state.dim() == 4 && state.size(0) == B && state.size(1) == H &&
                  state.size(2) == kHeadSize && state.size(3) == kHeadSize,
              "wkv7: state must be [B, H, 64, 64] = [", B, ", ", H, ", 64, 64], got ", state.sizes());
  TORCH_CHECK(state.scalar_type() == at::kFloat, "wkv7: state must be float32, got ",
              state.scalar_type());
  TORCH_CHECK(state.is_contiguous(), "wkv7: state must be contiguous");
  const at::Tensor* per_token[] = {&r, &w, &k, &v, &a, &b, &y};
  const char* names[] = {"r", "w", "k", "v", "a", "b", "y"};
  for (int n = 0; n < 7; ++n) {
    const at::Tensor& x = *per_token[n];
    TORCH_CHECK(x.sizes() == r.sizes(), "wkv7: ", names[n], " must have r's shape ", r.sizes(),
                ", got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == at::kFloat, "wkv7 (cpu): ", names[n],
                " must be float32, got ", x.scalar_type());
    TORCH_CHECK(x.is_contiguous(), "wkv7: ", names[n], " must be contiguous");
    TORCH_CHECK(x.device().is_cpu(), "wkv7 (cpu): ", names[n], " is on ", x.device());
  }
  TORCH_CHECK(state.device().is_cpu(), "wkv7 (cpu): state is on ", state.device());
}

// One head over T steps, working on S in its own row layout. Best for a few
// steps (decode): no transposition. S: [64, 64] of this head; the per-token
// vectors advance by row_stride = H * 64 floats per time step.
void wkv7_head_rows(int64_t T, int64_t row_stride, float* __restrict__ S,
                    const float* __restrict__ r, const float* __restrict__ w,
                    const float* __restrict__ k, const float* __restrict__ v,
                    const float* __restrict__ a, const float* __restrict__ b,
                    float* __restrict__ y) {
  alignas(64) float decay[kHeadSize];
  for (int64_t t = 0; t < T; ++t) {
    const int64_t off = t * row_stride;
    const float* rt = r + off;
    const float* kt = k + off;
    const float* at_ = a + off;
    const float* bt = b + off;
    const float* wt = w + off;
    for (int64_t j = 0; j < kHeadSize; ++j) decay[j] = std::exp(-std::exp(wt[j]));
    for (int64_t i = 0; i < kHeadSize; ++i) {
      float* __restrict__ row = S + i * kHeadSize;  // S[i, :]
      float sa = 0.f;
#pragma omp simd reduction(+ : sa)
      for (int64_t j = 0; j < kHeadSize; ++j) sa += row[j] * at_[j];
      const float vi = v[off + i];
      float out = 0.f;
#pragma omp simd reduction(+ : out)
      for (int64_t j = 0; j < kHeadSize; ++j) {
        const float s = row[j] * decay[j] + sa * bt[j] + vi * kt[j];
        row[j] = s;
        out += s * rt[j];
      }
      y[off + i] = out;
    }
  }
}

// Same result, for prefill: keeps a transposed copy ST[key j][value i] so that
// both mat-vecs (S a and S r) become vertical sums over 64-wide value vectors
// (no horizontal reductions); ~2x faster per step, but the two 16 KiB
// transpositions only pay off beyond a few steps.
void wkv7_head_cols(int64_t T, int64_t row_stride, float* __restrict__ S,
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

constexpr int64_t kMinStepsForColumns = 4;  // measured break-even of the transposition

// In place: state <- state after the T steps; y <- outputs. Returns nothing.
void wkv7_cpu_(at::Tensor state, const at::Tensor& r, const at::Tensor& w, const at::Tensor& k,
               const at::Tensor& v, const at::Tensor& a, const at::Tensor& b, at::Tensor y) {
  check_inputs(state, r, w, k, v, a, b, y);
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
  if (B == 0 || T == 0 || H == 0) return;
  float* S = state.data_ptr<float>();
  const float* rp = r.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t row_stride = H * kHeadSize;
  // A head-step is ~25k flops (a few microseconds); keep tasks >= ~32 of them.
  const int64_t grain = std::max<int64_t>(1, 32 / T);
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t batch = bh / H, head = bh % H;
      const int64_t base = batch * T * row_stride + head * kHeadSize;  // (batch, t=0, head, 0)
      const auto head_fn = T >= kMinStepsForColumns ? wkv7_head_cols : wkv7_head_rows;
      head_fn(T, row_stride, S + bh * kHeadSize * kHeadSize, rp + base, wp + base, kp + base,
              vp + base, ap + base, bp + base, yp + base);
    }
  });
}

}  // namespace

TORCH_LIBRARY(rwkv_nvim_wkv7_cpu, m) {
  m.def(
      "wkv7_(Tensor(a!) state, Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, "
      "Tensor(b!) y) -> ()");
}

TORCH_LIBRARY_IMPL(rwkv_nvim_wkv7_cpu, CPU, m) { m.impl("wkv7_", &wkv7_cpu_); }
