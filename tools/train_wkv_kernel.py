"""Trainable WKV-7 operator for CPU training: a C++ kernel with a hand-written backward.

The recurrence, per batch row b and head h, S[value i, key j] fp32, zero initial state:

    sa_t = S_{t-1} @ a_t                       # [N]
    S_t  = S_{t-1} * w_t[None, :] + sa_t b_t^T + v_t k_t^T
    y_t  = S_t @ r_t

Here ``w`` is the multiplicative decay in (0, 1) (the caller computes
exp(-exp(log-log decay)) with autograd). The forward saves S every CHUNK steps;
the backward walks the chunks from the end, recomputes the CHUNK+1 states of a
chunk from its checkpoint into a small buffer and steps the adjoint backwards:

    dS_t += dy_t r_t^T            dr_t = S_t^T dy_t
    dv = dS k      dsa = dS b     dk = dS^T v     db = dS^T sa    dw = sum_i dS * S_{t-1}
    da = S_{t-1}^T dsa            dS_{t-1} = dS * w[None, :] + dsa a^T

``wkv7_train`` picks the compiled kernel and falls back to ``wkv7_train_torch``
(plain autograd over a per-token loop, slow but exact) when it cannot be built.
"""
from __future__ import annotations

import os
import warnings

import torch

CHUNK = 16
HEAD_SIZE = 64

_CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>
#include <cstring>

constexpr int N = 64;
constexpr int CH = 16;

// One (b, h) row forward. Pointers are to element [b, 0, h, 0] of [B, T, H, N] tensors; stride = H*N.
static void fwd_row(int64_t T, int64_t stride, const float* w, const float* r, const float* k,
                    const float* v, const float* a, const float* bb, float* y, float* ckpt) {
    alignas(64) float S[N][N];
    std::memset(S, 0, sizeof(S));
    for (int64_t t = 0; t < T; ++t) {
        const int64_t o = t * stride;
        if (t % CH == 0) std::memcpy(ckpt + (t / CH) * N * N, S, sizeof(S));
        const float *wt = w + o, *rt = r + o, *kt = k + o, *vt = v + o, *at = a + o, *bt = bb + o;
        for (int i = 0; i < N; ++i) {
            float sa = 0.f;
            for (int j = 0; j < N; ++j) sa += S[i][j] * at[j];
            const float vi = vt[i];
            float yi = 0.f;
            for (int j = 0; j < N; ++j) {
                const float s = S[i][j] * wt[j] + sa * bt[j] + vi * kt[j];
                S[i][j] = s;
                yi += s * rt[j];
            }
            y[o + i] = yi;
        }
    }
}

static void bwd_row(int64_t T, int64_t stride, const float* w, const float* r, const float* k,
                    const float* v, const float* a, const float* bb, const float* dy, const float* ckpt,
                    float* dw, float* dr, float* dk, float* dv, float* da, float* db) {
    alignas(64) float buf[CH + 1][N][N];   // buf[l] = state before step t0 + l
    alignas(64) float sabuf[CH][N];
    alignas(64) float dS[N][N];
    std::memset(dS, 0, sizeof(dS));
    const int64_t n_chunks = (T + CH - 1) / CH;
    for (int64_t c = n_chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * CH;
        const int64_t len = std::min<int64_t>(CH, T - t0);
        std::memcpy(buf[0], ckpt + c * N * N, sizeof(float) * N * N);
        for (int64_t l = 0; l < len; ++l) {     // recompute the chunk's states
            const int64_t o = (t0 + l) * stride;
            const float *wt = w + o, *kt = k + o, *vt = v + o, *at = a + o, *bt = bb + o;
            for (int i = 0; i < N; ++i) {
                float sa = 0.f;
                for (int j = 0; j < N; ++j) sa += buf[l][i][j] * at[j];
                sabuf[l][i] = sa;
                const float vi = vt[i];
                for (int j = 0; j < N; ++j) buf[l + 1][i][j] = buf[l][i][j] * wt[j] + sa * bt[j] + vi * kt[j];
            }
        }
        for (int64_t l = len - 1; l >= 0; --l) {
            const int64_t o = (t0 + l) * stride;
            const float *wt = w + o, *rt = r + o, *kt = k + o, *vt = v + o, *at = a + o, *bt = bb + o, *dyt = dy + o;
            alignas(64) float gr[N], gk[N], gw[N], ga[N], gb[N];
            for (int j = 0; j < N; ++j) { gr[j] = 0.f; gk[j] = 0.f; gw[j] = 0.f; ga[j] = 0.f; gb[j] = 0.f; }
            const float* sa = sabuf[l];
            for (int i = 0; i < N; ++i) {
                const float dyi = dyt[i], vi = vt[i], sai = sa[i];
                float dvi = 0.f, dsai = 0.f;
                for (int j = 0; j < N; ++j) {
                    const float g = dS[i][j] + dyi * rt[j];
                    dS[i][j] = g;
                    dvi += g * kt[j];
                    dsai += g * bt[j];
                    gr[j] += buf[l + 1][i][j] * dyi;
                    gk[j] += g * vi;
                    gb[j] += g * sai;
                    gw[j] += g * buf[l][i][j];
                }
                for (int j = 0; j < N; ++j) {
                    ga[j] += dsai * buf[l][i][j];
                    dS[i][j] = dS[i][j] * wt[j] + dsai * at[j];
                }
                dv[o + i] = dvi;
            }
            for (int j = 0; j < N; ++j) {
                dr[o + j] = gr[j]; dk[o + j] = gk[j]; dw[o + j] = gw[j]; da[o + j] = ga[j]; db[o + j] = gb[j];
            }
        }
    }
}

std::vector<torch::Tensor> wkv7_forward(torch::Tensor w, torch::Tensor r, torch::Tensor k,
                                        torch::Tensor v, torch::Tensor a, torch::Tensor b) {
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    TORCH_CHECK(r.size(3) == N, "head size must be 64");
    auto y = torch::empty_like(r);
    const int64_t n_chunks = (T + CH - 1) / CH;
    auto ckpt = torch::empty({B, H, n_chunks, N, N}, r.options());
    const float *pw = w.data_ptr<float>(), *pr = r.data_ptr<float>(), *pk = k.data_ptr<float>(),
                *pv = v.data_ptr<float>(), *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
    float *py = y.data_ptr<float>(), *pc = ckpt.data_ptr<float>();
    const int64_t stride = H * N;
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh) {
            const int64_t bi = bh / H, h = bh % H;
            const int64_t off = bi * T * stride + h * N;
            fwd_row(T, stride, pw + off, pr + off, pk + off, pv + off, pa + off, pb + off, py + off,
                    pc + bh * n_chunks * N * N);
        }
    });
    return {y, ckpt};
}

std::vector<torch::Tensor> wkv7_backward(torch::Tensor w, torch::Tensor r, torch::Tensor k, torch::Tensor v,
                                         torch::Tensor a, torch::Tensor b, torch::Tensor dy, torch::Tensor ckpt) {
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    auto dw = torch::empty_like(r), dr = torch::empty_like(r), dk = torch::empty_like(r);
    auto dv = torch::empty_like(r), da = torch::empty_like(r), db = torch::empty_like(r);
    const int64_t n_chunks = (T + CH - 1) / CH;
    const int64_t stride = H * N;
    const float *pw = w.data_ptr<float>(), *pr = r.data_ptr<float>(), *pk = k.data_ptr<float>(),
                *pv = v.data_ptr<float>(), *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>(),
                *pdy = dy.data_ptr<float>(), *pc = ckpt.data_ptr<float>();
    float *gw = dw.data_ptr<float>(), *gr = dr.data_ptr<float>(), *gk = dk.data_ptr<float>(),
          *gv = dv.data_ptr<float>(), *ga = da.data_ptr<float>(), *gb = db.data_ptr<float>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh) {
            const int64_t bi = bh / H, h = bh % H;
            const int64_t off = bi * T * stride + h * N;
            bwd_row(T, stride, pw + off, pr + off, pk + off, pv + off, pa + off, pb + off, pdy + off,
                    pc + bh * n_chunks * N * N, gw + off, gr + off, gk + off, gv + off, ga + off, gb + off);
        }
    });
    return {dw, dr, dk, dv, da, db};
}
"""

_CPP_DECLS = """
std::vector<torch::Tensor> wkv7_forward(torch::Tensor w, torch::Tensor r, torch::Tensor k,
                                        torch::Tensor v, torch::Tensor a, torch::Tensor b);
std::vector<torch::Tensor> wkv7_backward(torch::Tensor w, torch::Tensor r, torch::Tensor k, torch::Tensor v,
                                         torch::Tensor a, torch::Tensor b, torch::Tensor dy, torch::Tensor ckpt);
"""

_kernel = None
_kernel_failed = False


def load_kernel():
    """Build (once, cached by torch in its extension dir) and return the C++ module, or None."""
    global _kernel, _kernel_failed
    if _kernel is not None or _kernel_failed:
        return _kernel
    try:
        from torch.utils.cpp_extension import load_inline

        _kernel = load_inline(
            name="rwkv7_train_wkv_cpu",
            cpp_sources=[_CPP_DECLS, _CPP_SOURCE],
            functions=["wkv7_forward", "wkv7_backward"],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=bool(os.environ.get("RWKV_TRAIN_VERBOSE_BUILD")),
        )
    except Exception as exc:  # compiler missing, headers missing, ...
        warnings.warn(f"WKV-7 CPU training kernel could not be built ({exc}); using the slow torch loop")
        _kernel_failed = True
    return _kernel


class _WKV7Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, r, k, v, a, b):  # all [B, T, H, 64] fp32
        tensors = [x.contiguous().float() for x in (w, r, k, v, a, b)]
        y, ckpt = _kernel.wkv7_forward(*tensors)  # y [B, T, H, 64], ckpt [B, H, T/16, 64, 64]
        ctx.save_for_backward(*tensors, ckpt)
        return y

    @staticmethod
    def backward(ctx, dy):
        w, r, k, v, a, b, ckpt = ctx.saved_tensors
        return tuple(_kernel.wkv7_backward(w, r, k, v, a, b, dy.contiguous().float(), ckpt))


def wkv7_train_torch(w: torch.Tensor, r, k, v, a, b) -> torch.Tensor:
    """Reference: per-token loop with autograd. All inputs [B, T, H, 64]; returns y [B, T, H, 64]."""
    B, T, H, N = r.shape
    S = torch.zeros(B, H, N, N, dtype=torch.promote_types(r.dtype, torch.float32), device=r.device)  # [B, H, N(value), N(key)]
    ys = []
    for t in range(T):
        sa = S @ a[:, t, :, :, None]                                   # [B, H, N, 1]
        S = S * w[:, t, :, None, :] + sa * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append((S @ r[:, t, :, :, None])[..., 0])                  # [B, H, N]
    return torch.stack(ys, dim=1)


def wkv7_train(w: torch.Tensor, r, k, v, a, b, use_kernel: bool = True) -> torch.Tensor:
    """WKV-7 over a whole sequence from a zero state; differentiable. Inputs [B, T, H, 64] fp32.

    ``use_kernel``: True picks the C++ kernel on the CPU and tools/train_wkv_chunked.py on
    CUDA; "chunked" the chunked formulation anywhere (the CPU runs of the GPU path); "fla"
    flash-linear-attention's chunked Triton op (CUDA); False the per-token reference loop."""
    if r.shape[-1] != HEAD_SIZE:
        raise ValueError(f"head size must be {HEAD_SIZE}, got {r.shape[-1]}")
    if use_kernel == "fla":                                     # measured faster on this GPU
        from train_wkv_chunked import wkv7_fla
        return wkv7_fla(w, r, k, v, a, b)
    if use_kernel and (r.is_cuda or use_kernel == "chunked"):   # GPU: the chunked torch formulation
        from train_wkv_chunked import wkv7_chunked
        return wkv7_chunked(w, r, k, v, a, b)
    if use_kernel and load_kernel() is not None:
        return _WKV7Function.apply(w, r, k, v, a, b)
    return wkv7_train_torch(w, r, k, v, a, b)
