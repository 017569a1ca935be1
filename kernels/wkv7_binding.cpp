// Torch glue for the GPU WKV-7 kernel, shared by the CUDA build (with
// kernels/wkv7_cuda.cu) and the ROCm build (with kernels/wkv7_hip.hip).
// Registers `torch.ops.rwkv_nvim_wkv7_gpu.wkv7_` under the CUDA dispatch key
// (ROCm torch uses the same key for its HIP tensors). Only device-generic c10
// APIs are used (DeviceGuard, the current Stream's native handle), so the same
// file builds against CUDA and ROCm torch with nothing to hipify. The kernel
// sources stay free of torch headers and export the extern "C" launcher below.

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>

extern "C" {
int rwkv_wkv7_forward(int dtype, int B, int T, int H, float* state, const void* r, const void* w,
                      const void* k, const void* v, const void* a, const void* b, void* y,
                      void* stream);
const char* rwkv_wkv7_error_string(int code);
}

namespace {

constexpr int64_t kHeadSize = 64;

// dtype codes of the launcher (see the kernel sources)
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "wkv7 (gpu): inputs must be float16, bfloat16 or float32, got ", t);
  }
  return -1;
}

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
  TORCH_CHECK(state.is_cuda(), "wkv7 (gpu): state is on ", state.device());
  TORCH_CHECK(B * H <= INT32_MAX && T <= INT32_MAX, "wkv7 (gpu): sizes too large");
  const at::Tensor* per_token[] = {&r, &w, &k, &v, &a, &b, &y};
  const char* names[] = {"r", "w", "k", "v", "a", "b", "y"};
  for (int n = 0; n < 7; ++n) {
    const at::Tensor& x = *per_token[n];
    TORCH_CHECK(x.sizes() == r.sizes(), "wkv7: ", names[n], " must have r's shape ", r.sizes(),
                ", got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == r.scalar_type(), "wkv7: ", names[n], " is ", x.scalar_type(),
                " but r is ", r.scalar_type());
    TORCH_CHECK(x.is_contiguous(), "wkv7: ", names[n], " must be contiguous");
    TORCH_CHECK(x.device() == state.device(), "wkv7: ", names[n], " is on ", x.device(),
                " but state is on ", state.device());
  }
}

// In place: state <- state after the T steps; y <- outputs, on the current stream.
void wkv7_gpu_(at::Tensor state, const at::Tensor& r, const at::Tensor& w, const at::Tensor& k,
               const at::Tensor& v, const at::Tensor& a, const at::Tensor& b, at::Tensor y) {
  check_inputs(state, r, w, k, v, a, b, y);
  const int code = dtype_code(r.scalar_type());
  const c10::DeviceGuard guard(state.device());
  // The current stream (honours torch.cuda.stream(...) and CUDA-graph capture).
  const c10::Stream current =
      c10::impl::getDeviceGuardImpl(state.device().type())->getStream(state.device());
  void* stream = current.native_handle();
  const int err = rwkv_wkv7_forward(
      code, static_cast<int>(r.size(0)), static_cast<int>(r.size(1)), static_cast<int>(r.size(2)),
      state.data_ptr<float>(), r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(), a.data_ptr(),
      b.data_ptr(), y.data_ptr(), stream);
  TORCH_CHECK(err == 0, "wkv7 (gpu): kernel launch failed: ", rwkv_wkv7_error_string(err));
}

}  // namespace

TORCH_LIBRARY(rwkv_nvim_wkv7_gpu, m) {
  m.def(
      "wkv7_(Tensor(a!) state, Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, "
      "Tensor(b!) y) -> ()");
}

TORCH_LIBRARY_IMPL(rwkv_nvim_wkv7_gpu, CUDA, m) { m.impl("wkv7_", &wkv7_gpu_); }
