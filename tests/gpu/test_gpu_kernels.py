"""The CUDA/HIP WKV-7 kernel against rwkv_engine.core.wkv.wkv7_reference (skipped without a GPU).

fp16/bf16 (and fp32) inputs, batch 1 and 8, prefill and one-step decode, state
carried across calls, in-place use inside a captured CUDA graph.
"""
from __future__ import annotations

import pytest
import torch

from rwkv_engine.core import kernel_loader
from rwkv_engine.core.wkv import wkv7_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm device"),
]

N = 64
DEV = torch.device("cuda")
# y is rounded to the input dtype; the state stays fp32 (only summation order differs)
Y_TOL = {torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2), torch.float32: (1e-4, 1e-4)}
S_ATOL = 2e-4


def make_inputs(B: int, T: int, H: int, dtype, seed: int = 0):
    """Model-like inputs on the GPU: a = -kk, b = kk * gate with |kk| = 1.

    The per-token tensors are rounded to ``dtype``; the reference runs on exactly
    those rounded values (in fp32, on the CPU).
    """
    g = torch.Generator().manual_seed(seed)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    gate = torch.rand(B, T, H, N, generator=g)
    state = torch.randn(B, H, N, N, generator=g) * 0.5                    # [B, H, 64, 64] fp32
    r = torch.randn(B, T, H, N, generator=g) * 0.5                        # [B, T, H, 64]
    w = -0.6 - 2.5 * torch.rand(B, T, H, N, generator=g)
    k = torch.randn(B, T, H, N, generator=g) * 0.5
    v = torch.randn(B, T, H, N, generator=g) * 0.5
    per_token = [x.to(dtype).to(DEV) for x in (r, w, k, v, -kk, kk * gate)]
    return state.to(DEV), per_token


def reference(state, per_token):
    y, s = wkv7_reference(state.cpu(), *(x.cpu().float() for x in per_token))
    return y, s  # fp32, CPU


def assert_close(y, s, y_ref, s_ref, dtype):
    atol, rtol = Y_TOL[dtype]
    assert y.dtype == dtype and s.dtype == torch.float32
    torch.testing.assert_close(y.float().cpu(), y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(s.cpu(), s_ref, atol=S_ATOL, rtol=1e-4)


@pytest.fixture(scope="module")
def gpu_kernel():
    if kernel_loader.kernels_disabled():
        pytest.skip("RWKV_NVIM_NO_KERNEL is set")
    kernel = kernel_loader.get_wkv7(DEV)
    if kernel is None:
        pytest.fail(f"the GPU kernel did not build: {kernel_loader.kernel_status()}")
    return kernel


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("T", [1, 97], ids=["decode", "prefill"])
def test_kernel_matches_reference(gpu_kernel, dtype, B, T):
    H = 4
    state, seq = make_inputs(B, T, H, dtype, seed=B * 100 + T)
    before = state.clone()
    y_ref, s_ref = reference(state, seq)
    y, s = gpu_kernel(state, *seq)
    torch.cuda.synchronize()
    assert_close(y, s, y_ref, s_ref, dtype)
    assert torch.equal(state, before), "the out-of-place call mutated its input state"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_prefill_then_decode_carries_state(gpu_kernel, dtype):
    B, T, H = 8, 48, 12
    state, seq = make_inputs(B, T, H, dtype, seed=9)
    y_ref, s_ref = reference(state, seq)
    s, ys = state, []
    y, s = gpu_kernel(s, *(x[:, :40] for x in seq))            # prefill 40 tokens
    ys.append(y)
    for t in range(40, T):                                      # then 8 one-token decodes
        y, s = gpu_kernel(s, *(x[:, t:t + 1] for x in seq))
        ys.append(y)
    assert_close(torch.cat(ys, dim=1), s, y_ref, s_ref, dtype)


def test_mixed_dtypes_are_rejected(gpu_kernel):
    state, (r, w, k, v, a, b) = make_inputs(1, 2, 2, torch.float16)
    with pytest.raises(RuntimeError, match="wkv7: k is"):
        gpu_kernel(state, r, w, k.float(), v, a, b)
    with pytest.raises(RuntimeError, match="wkv7: state must be float32"):
        gpu_kernel.inplace(state.half(), r, w, k, v, a, b)
