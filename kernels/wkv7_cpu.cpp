// RWKV-7 WKV state-passing kernel for the CPU (fp32), registered as the torch
// op `torch.ops.rwkv_nvim_wkv7_cpu.wkv7_`. JIT-built by rwkv_engine/core/kernel_loader.py.
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

#include "wkv7_cpu_head.h"

namespace {

using rwkv_cpu::kHeadSize;
using rwkv_cpu::wkv7_head_cols;
using rwkv_cpu::wkv7_head_rows;

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
      float* Sh = S + bh * kHeadSize * kHeadSize;
      if (T >= kMinStepsForColumns)
        wkv7_head_cols(T, row_stride, Sh, rp + base, wp + base, kp + base, vp + base, ap + base,
                       bp + base, yp + base);
      else
        wkv7_head_rows(T, row_stride, Sh, Sh, rp + base, wp + base, kp + base, vp + base,
                       ap + base, bp + base, yp + base);
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
