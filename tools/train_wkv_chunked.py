"""Chunked WKV-7 for GPU training: pure torch (batched matmuls + one triangular solve per
chunk), differentiable by autograd, no compiled kernel.

The recurrence (tools/train_wkv_kernel.py; S[value i, key j], zero initial state):

    S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T        y_t = S_t r_t

Within a chunk of L steps starting from S_0, with u_t = S_{t-1} a_t and the cumulative
decay Lam_t = prod_{s<=t} w_s (a vector over keys), every step is a diagonal-decay linear
attention over two kinds of pairs, (k_s, v_s) and (b_s, u_s):

    U = A_k V + A_b U + (a * Lam_{t-1}) S_0^T    A_k[t,s] = (a_t Lam_{t-1}).(k_s / Lam_s), s < t
      -> U = W_a S_0^T + U_v,  W_a = (I - A_b)^-1 (a * Lam_{t-1}),  U_v = (I - A_b)^-1 A_k V
    Y = (r * Lam) S_0^T + Q_k V + Q_b U          Q_k[t,s] = (r_t Lam_t).(k_s / Lam_s), s <= t
    S_L = S_0 M + E,   M = diag(Lam_L) + W_a^T (b * Lam_L / Lam),  E = V^T (k * Lam_L / Lam) + U_v^T (b * Lam_L / Lam)

so the chunks are independent except for S_{c+1} = S_c M_c + E_c, a short sequential
loop of one batched matmul per chunk (T / L steps). Everything runs in fp32 (autocast
off inside). 1 / Lam stays below 0.545^-L (the model's decay is exp(-exp(x)) with
x <= -0.5, so w >= 0.545): 1.6e4 for L = 16, well inside fp32.

Shapes: inputs [B, T, H, N]; per chunk [B, H, C, L, N]; states [B, H, N, N] fp32.
``wkv7_train_torch`` (the per-token loop) is the reference it is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 16


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunks(x: torch.Tensor, L: int) -> torch.Tensor:
    """[B, T, H, N] (T a multiple of L) -> [B, H, T/L, L, N] fp32 (fp64 stays fp64)."""
    B, T, H, N = x.shape
    return _f32(x).view(B, T // L, L, H, N).permute(0, 3, 1, 2, 4)


def wkv7_chunked(w: torch.Tensor, r, k, v, a, b, chunk: int = CHUNK) -> torch.Tensor:
    """y [B, T, H, N] (dtype of r) of the WKV-7 recurrence from a zero state; ``w`` is the
    decay in (0, 1]. Differentiable in every input."""
    B, T, H, N = r.shape
    L, out_dtype = chunk, r.dtype
    pad = (-T) % L
    with torch.autocast(device_type=r.device.type, enabled=False):
        if pad:      # decay 1 and zeros: the padded steps leave the state alone
            w = F.pad(_f32(w), (0, 0, 0, 0, 0, pad), value=1.0)
            r, k, v, a, b = (F.pad(_f32(x), (0, 0, 0, 0, 0, pad)) for x in (r, k, v, a, b))
        Tp = T + pad
        logw = torch.log(_chunks(w, L))                          # [B, H, C, L, N] <= 0
        r, k, v, a, b = (_chunks(x, L) for x in (r, k, v, a, b))
        cum = logw.cumsum(-2)                                    # log Lam_t (inclusive)
        lam, lam_prev, inv = cum.exp(), (cum - logw).exp(), (-cum).exp()
        to_end = (cum[..., -1:, :] - cum).exp()                  # Lam_L / Lam_s  [B, H, C, L, N]
        a_t, r_t = a * lam_prev, r * lam                         # a Lam_{t-1}, r Lam_t
        k_i, b_i = k * inv, b * inv                              # k / Lam_s, b / Lam_s
        strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
        incl = torch.ones(L, L, dtype=torch.bool, device=r.device).tril()
        A_k = (a_t @ k_i.transpose(-1, -2)).masked_fill(~strict, 0.0)      # [B, H, C, L, L]
        A_b = (a_t @ b_i.transpose(-1, -2)).masked_fill(~strict, 0.0)
        Q_k = (r_t @ k_i.transpose(-1, -2)).masked_fill(~incl, 0.0)
        Q_b = (r_t @ b_i.transpose(-1, -2)).masked_fill(~incl, 0.0)
        eye = torch.eye(L, dtype=r.dtype, device=r.device)
        I_Ab = eye - A_b                                         # unit lower triangular
        W_a = torch.linalg.solve_triangular(I_Ab, a_t, upper=False, unitriangular=True)        # [.., L, N]
        U_v = torch.linalg.solve_triangular(I_Ab, A_k @ v, upper=False, unitriangular=True)    # [.., L, N]
        k_hat, b_hat = k * to_end, b * to_end
        lam_L = lam[..., -1, :]                                  # [B, H, C, N]
        M = torch.diag_embed(lam_L) + W_a.transpose(-1, -2) @ b_hat            # [B, H, C, N, N]
        E = v.transpose(-1, -2) @ k_hat + U_v.transpose(-1, -2) @ b_hat      # [B, H, C, N, N]
        C = Tp // L
        S = torch.zeros(B * H, N, N, dtype=r.dtype, device=r.device)         # fp32 (fp64 in tests)
        M = M.permute(2, 0, 1, 3, 4).reshape(C, B * H, N, N)    # [C, B*H, N, N]
        E = E.permute(2, 0, 1, 3, 4).reshape(C, B * H, N, N)
        starts = []
        for c in range(C):                                       # S_{c+1} = S_c M_c + E_c
            starts.append(S)
            S = torch.baddbmm(E[c], S, M[c])
        S0 = torch.stack(starts, 1).view(B, H, C, N, N)          # state at each chunk's start
        S0t = S0.transpose(-1, -2)                               # [B, H, C, N(key), N(value)]
        U = W_a @ S0t + U_v                                      # [B, H, C, L, N]
        y = r_t @ S0t + Q_k @ v + Q_b @ U                        # [B, H, C, L, N]
        y = y.permute(0, 2, 3, 1, 4).reshape(B, Tp, H, N)[:, :T]
    return y.to(out_dtype)


# -------------------------------------------------------- flash-linear-attention, measured
def wkv7_fla(w: torch.Tensor, r, k, v, a, b) -> torch.Tensor:
    """The same recurrence through flash-linear-attention's chunked Triton op (CUDA only;
    ``w`` the decay, passed as its log). Inputs [B, T, H, N]; y [B, T, H, N]."""
    from fla.ops.rwkv7 import chunk_rwkv7
    dt = r.dtype
    y, _ = chunk_rwkv7(r, torch.log(w.float()).to(dt), k.to(dt), v.to(dt), a.to(dt), b.to(dt), scale=1.0)
    return y


def choose_backend(device: torch.device, shape=(8, 1024, 6), log=print) -> dict:
    """On CUDA with ``fla`` importable: check wkv7_fla against wkv7_chunked (bf16 inputs, as
    under autocast; values and gradients within 3e-2 of the largest), time both forward +
    backward at ``shape`` (B, T, H), and return {"backend": "fla" | "chunked", ...}; the
    chunked op on any failure or mismatch."""
    import importlib.util
    import time
    rec: dict = {"backend": "chunked"}
    if device.type != "cuda" or importlib.util.find_spec("fla") is None:
        rec["why"] = "no CUDA" if device.type != "cuda" else "fla not installed"
        return rec
    try:
        def inputs(B, T, H, seed):
            g = torch.Generator(device=device).manual_seed(seed)
            N, bf = 64, torch.bfloat16
            x = -0.5 - 3 * torch.rand(B, T, H, N, generator=g, device=device)
            w = torch.exp(-torch.exp(x))                                             # fp32, as the model
            r, k, v = (0.5 * torch.randn(B, T, H, N, generator=g, device=device).to(bf) for _ in range(3))
            kk = F.normalize(torch.randn(B, T, H, N, generator=g, device=device), dim=-1)
            ag = torch.rand(B, T, H, N, generator=g, device=device)
            return [t.requires_grad_() for t in (w, r, k, v, (-kk).to(bf), (kk * ag).to(bf))]

        def run(fn, xs):
            y = fn(*xs)
            grads = torch.autograd.grad(y.float().square().sum(), xs)
            return y.float(), grads

        xs = inputs(2, 200, 2, 0)
        y0, g0 = run(wkv7_chunked, xs)
        t0 = time.perf_counter()
        y1, g1 = run(wkv7_fla, xs)                              # the first call compiles (Triton)
        rec["fla_first_call_s"] = round(time.perf_counter() - t0, 2)
        errs = [float((y1 - y0).abs().max() / y0.abs().max())]
        errs += [float((b.float() - a.float()).abs().max() / a.float().abs().max().clamp_min(1e-12))
                 for a, b in zip(g0, g1)]
        rec["max_rel_err"] = max(errs)
        big = inputs(*shape, 1)
        times = {}
        for name, fn in (("chunked", wkv7_chunked), ("fla", wkv7_fla)):
            run(fn, big)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(3):
                run(fn, big)
            torch.cuda.synchronize(device)
            times[name] = (time.perf_counter() - t0) / 3 * 1e3
        rec["ms_fwd_bwd"] = {k: round(v, 3) for k, v in times.items()}
        if rec["max_rel_err"] < 3e-2 and times["fla"] < times["chunked"]:
            rec["backend"] = "fla"
        rec["why"] = f"max rel err {rec['max_rel_err']:.2e}, ms {rec['ms_fwd_bwd']}"
    except Exception as e:  # noqa: BLE001 - the chunked op always works
        rec["why"] = f"fla failed: {type(e).__name__}: {str(e)[:200]}"
    log(f"wkv backend: {rec}")
    return rec
