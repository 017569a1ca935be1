"""The WKV-7 recurrence: the reference torch path and the dispatch to fast kernels.

Per step t and head (S[value i, key j] fp32, all vectors of length N = 64):
    S = S * decay[None, :] + (S @ a) b^T + v k^T ;   y_t = S @ r_t
with decay = exp(-exp(w)) (w is the "log-log" decay, computed in fp32), a = -kk and
b = kk * a_gate in the model. Shapes: state [B, H, N, N] fp32; r, w, k, v, a, b
[B, T, H, N]; y [B, T, H, N] in r.dtype.
"""
from __future__ import annotations


import torch


def wkv7_reference(state, r, w, k, v, a, b):
    """Slow, obviously-correct per-token loop (the reference every kernel is tested against)."""
    B, T, H, N = r.shape
    S = state.float()                                  # [B, H, N, N] fp32 (new tensor when updated)
    decay = torch.exp(-torch.exp(w.float()))           # [B, T, H, N]
    rf, kf, vf, af, bf = (t.float() for t in (r, k, v, a, b))
    ys = []
    for t in range(T):
        sa = S @ af[:, t, :, :, None]                  # [B, H, N, 1]
        S = (S * decay[:, t, :, None, :]
             + sa @ bf[:, t, :, None, :]               # (S a) b^T
             + vf[:, t, :, :, None] @ kf[:, t, :, None, :])  # v k^T
        ys.append(S @ rf[:, t, :, :, None])            # [B, H, N, 1]
    y = torch.cat(ys, dim=-1).permute(0, 3, 1, 2)      # [B, T, H, N]
    return y.to(r.dtype).contiguous(), S


def wkv7(state, r, w, k, v, a, b):
    """WKV-7 via the compiled kernel for this device when available, else the reference."""
    fn = _kernel_for(r.device)
    if fn is not None:
        return fn(state, r, w, k, v, a, b)
    return wkv7_reference(state, r, w, k, v, a, b)


_KERNELS: dict = {}


def _kernel_for(device: torch.device):
    key = device.type
    if key not in _KERNELS:
        fn = None
        from .kernel_loader import get_wkv7, kernels_disabled
        if not kernels_disabled():
            fn = get_wkv7(device)
        _KERNELS[key] = fn
    return _KERNELS[key]
