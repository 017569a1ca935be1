"""The model's matrix products: y = x W^T for W [out, in], in the representation run.

``F32Linear``  W [O, I] in the model dtype (CPU fp32, GPU fp16/bf16/fp32): torch's
               product for many rows, our few-row kernel (``f32_linear``) for <= 8 rows
               on the CPU (torch's M <= 8 CPU products run far below the memory rate).
``Q8Linear``   CPU "int8" mode: W quantized per block of 32 inputs (one fp16 scale per
               32 weights, symmetric int8), activations quantized per row and block to
               int16 inside the kernel (see kernels/rwkv7_cpu_linear.h for the packed
               layout). Weights are held only in this form: 1.0625 bytes per weight.
``Q4Linear``   CPU "q4" mode (its big matrices): W quantized per block of 32 inputs to
               4 bits like llama.cpp's Q4_0 (one fp16 scale per 32 weights, the block's
               largest-magnitude weight at -8), activations as for q8 (layout in
               kernels/rwkv7_cpu_q4.h): 0.5625 bytes per weight.
``Q4A8Linear`` CPU "q4a8" mode: the same q4 weights, activations quantized per row and
               block of 32 to int8 (scale = max|x| / 127, llama.cpp's Q8_0 activations),
               so the kernel multiplies bytes (kernels/rwkv7_cpu_q4a8.h): about twice
               the multiply-adds per instruction, for prefill and many-row steps.

Each keeps its slow reference next to it (``reference``: plain torch on dequantized
values, the same math), which tests compare with the compiled kernel, and which runs
when no kernel can be built. ``step_tensors()`` hands the weights to the fused decode
step (kernels/rwkv7_cpu_step.cpp) as the (A, B) pair it expects.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

TILE = 16           # outputs per packed tile
BLOCK = 32          # inputs per scale block
ACT_MAX = 32767.0   # activations: int16 per row and block
ACT8_MAX = 127.0    # ... or int8 (q4a8)
FEW_ROWS = 8        # at most this many rows go through our CPU kernel in fp32 mode

_EMPTY = torch.empty(0)


def cpu_ops():
    """``torch.ops.rwkv_nvim_cpu`` when the CPU kernels are built (or can be), else None."""
    from .kernel_loader import get_cpu_ops, kernels_disabled
    return None if kernels_disabled() else get_cpu_ops()


def q8_fits(W: torch.Tensor) -> bool:
    """Whether a [O, I] matrix has the q8 kernel's shape (O % 16 == 0, I % 32 == 0)."""
    return W.dim() == 2 and W.shape[0] % TILE == 0 and W.shape[1] % BLOCK == 0 and W.numel() > 0


def quantize_q8(W: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """W [O, I] -> (wq [O/16, I/32, 512] int8 packed, ws [O/16, I/32, 16] fp16).

    scale[o, b] = max|W[o, 32b:32b+32]| / 127, rounded to fp16 (what is stored; a block
    below ~1e-5 gets scale 0 and stays 0); q = round(W / scale) in [-127, 127];
    packed as [tile, block, input pair g, output lane, 2] (kernels/rwkv7_cpu_linear.h).
    Works row-chunk by row-chunk so a big matrix never needs a second fp32 copy.
    """
    O, I = W.shape
    if not q8_fits(W):
        raise ValueError(f"q8 weights need O % {TILE} == 0 and I % {BLOCK} == 0, got {tuple(W.shape)}")
    nb = I // BLOCK
    wq = torch.empty(O // TILE, nb, TILE * BLOCK, dtype=torch.int8)
    ws = torch.empty(O // TILE, nb, TILE, dtype=torch.float16)
    rows = 4096                                                   # a multiple of TILE
    for o0 in range(0, O, rows):
        blk = W[o0:o0 + rows].float().reshape(-1, nb, BLOCK)      # [o, b, 32]
        scale = (blk.abs().amax(dim=-1) / 127.0).half()           # [o, b] as stored
        inv = torch.where(scale > 0, 1.0 / scale.float(), torch.zeros(()))
        q = torch.round(blk * inv[..., None]).clamp_(-127, 127).to(torch.int8)
        t0, n = o0 // TILE, blk.shape[0] // TILE
        # [tile, lane, b, g, 2] -> [tile, b, g, lane, 2]
        wq[t0:t0 + n] = q.view(n, TILE, nb, BLOCK // 2, 2).permute(0, 2, 3, 1, 4).reshape(n, nb, -1)
        ws[t0:t0 + n] = scale.view(n, TILE, nb).permute(0, 2, 1)
    return wq, ws


def dequantize_q8(wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """The fp32 matrix [O, I] a packed q8 pair stands for (exact: int8 * scale)."""
    tiles, nb, _ = wq.shape
    q = wq.view(tiles, nb, BLOCK // 2, TILE, 2).permute(0, 3, 1, 2, 4).reshape(tiles * TILE, nb, BLOCK)
    s = ws.float().permute(0, 2, 1).reshape(tiles * TILE, nb, 1)
    return (q.float() * s).reshape(tiles * TILE, nb * BLOCK)


Q4_BYTES = TILE * BLOCK // 2   # packed bytes per tile-block
_Q4_LOW = [0, 4, 1, 5]         # input i (of a group of 8) in the low nibble of byte c0..c3
_Q4_HIGH = [2, 6, 3, 7]        # ... in the high nibble


def quantize_q4(W: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """W [O, I] -> (wq [O/16, I/32, 256] uint8 packed nibbles, ws [O/16, I/32, 16] fp16).

    Per block of 32 inputs: m = the weight of largest magnitude, scale d = m / -8
    rounded to fp16 (stored; a block below ~1e-5 gets 0), q = clamp(round(W / d), -8, 7),
    stored as u = q + 8. Packed as [tile, block, half h (2), input group k (4), output lane
    L (8), byte c (4)], c0..c3 = u[8k + (0|2)], u[8k + (4|6)], u[8k + (1|3)], u[8k + (5|7)]
    (low | high nibble): the layout of kernels/rwkv7_cpu_q4.h.
    """
    O, I = W.shape
    if not q8_fits(W):
        raise ValueError(f"q4 weights need O % {TILE} == 0 and I % {BLOCK} == 0, got {tuple(W.shape)}")
    nb = I // BLOCK
    wq = torch.empty(O // TILE, nb, Q4_BYTES, dtype=torch.uint8)
    ws = torch.empty(O // TILE, nb, TILE, dtype=torch.float16)
    rows = 4096
    for o0 in range(0, O, rows):
        blk = W[o0:o0 + rows].float().reshape(-1, nb, BLOCK)      # [o, b, 32]
        idx = blk.abs().argmax(dim=-1, keepdim=True)
        scale = (blk.gather(-1, idx)[..., 0] / -8.0).half()        # [o, b] as stored
        s32 = scale.float()
        inv = torch.where(s32 != 0, 1.0 / s32, torch.zeros(()))
        q = torch.round(blk * inv[..., None]).clamp_(-8, 7).to(torch.int16) + 8
        t0, n = o0 // TILE, blk.shape[0] // TILE
        # [tile, h, L, b, k, i] -> [tile, b, h, k, L, i]
        u = q.view(n, 2, 8, nb, 4, 8).permute(0, 3, 1, 4, 2, 5)
        packed = u[..., _Q4_LOW] | (u[..., _Q4_HIGH] << 4)
        wq[t0:t0 + n] = packed.to(torch.uint8).reshape(n, nb, -1)
        ws[t0:t0 + n] = scale.view(n, TILE, nb).permute(0, 2, 1)
    return wq, ws


def unpack_q4(wq: torch.Tensor) -> torch.Tensor:
    """The signed 4-bit values [O, I] (int8, -8..7) of packed q4 weights."""
    tiles, nb, _ = wq.shape
    b = wq.view(tiles, nb, 2, 4, 8, 4).to(torch.int16)           # [tile, b, h, k, L, c]
    u = torch.empty(tiles, nb, 2, 4, 8, 8, dtype=torch.int16)
    u[..., _Q4_LOW] = b & 15
    u[..., _Q4_HIGH] = b >> 4
    q = (u - 8).to(torch.int8).permute(0, 2, 4, 1, 3, 5)          # [tile, h, L, b, k, i]
    return q.reshape(tiles * TILE, nb * BLOCK)


def dequantize_q4(wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """The fp32 matrix [O, I] a packed q4 pair stands for (exact: q * scale)."""
    tiles, nb, _ = wq.shape
    q = unpack_q4(wq).view(tiles * TILE, nb, BLOCK)
    s = ws.float().permute(0, 2, 1).reshape(tiles * TILE, nb, 1)
    return (q.float() * s).reshape(tiles * TILE, nb * BLOCK)


def quantize_activations(x: torch.Tensor, act_max: float = ACT_MAX) -> torch.Tensor:
    """x [M, I] rounded the way the q8 kernel sees it: int16 per row and block of 32
    (scale = max|x| / 32767; int8 with act_max=ACT8_MAX), returned dequantized in fp32."""
    M, I = x.shape
    xb = x.float().reshape(M, I // BLOCK, BLOCK)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, act_max / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / act_max)).reshape(M, I)


class F32Linear:
    """W [O, I] in the model dtype."""

    kind = "fp32"

    def __init__(self, W: torch.Tensor):
        self.weight = W.contiguous()
        self.out_features, self.in_features = W.shape
        self._ops = cpu_ops() if (W.device.type == "cpu" and W.dtype == torch.float32) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self._ops is not None and rows <= FEW_ROWS and x.dtype == torch.float32:
            y = self._ops.f32_linear(x.reshape(rows, self.in_features).contiguous(), self.weight)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def step_tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.weight, _EMPTY

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class Q8Linear:
    """W quantized per block of 32 (CPU only); see the module docstring."""

    kind = "q8"

    def __init__(self, W: torch.Tensor):
        self.out_features, self.in_features = W.shape
        self.wq, self.ws = quantize_q8(W)
        self._ops = cpu_ops()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._ops is None:
            return self.reference(x)
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        return self._ops.q8_linear(x2, self.wq, self.ws).view(*x.shape[:-1], self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Same math in plain torch: quantized activations times the dequantized matrix."""
        x2 = quantize_activations(x.reshape(-1, self.in_features))
        y = x2 @ dequantize_q8(self.wq, self.ws).T
        return y.view(*x.shape[:-1], self.out_features)

    def step_tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.wq, self.ws

    @property
    def nbytes(self) -> int:
        return self.wq.numel() + self.ws.numel() * 2


class Q4Linear(Q8Linear):
    """W quantized to 4 bits per block of 32 (CPU only); see the module docstring."""

    kind = "q4"

    def __init__(self, W: torch.Tensor):
        self.out_features, self.in_features = W.shape
        self.wq, self.ws = quantize_q4(W)
        self._ops = cpu_ops()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._ops is None:
            return self.reference(x)
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        return self._ops.q4_linear(x2, self.wq, self.ws).view(*x.shape[:-1], self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Same math in plain torch: quantized activations times the dequantized matrix."""
        x2 = quantize_activations(x.reshape(-1, self.in_features))
        y = x2 @ dequantize_q4(self.wq, self.ws).T
        return y.view(*x.shape[:-1], self.out_features)


class Q4A8Linear(Q4Linear):
    """The q4 weights with 8-bit activations (CPU only); see the module docstring."""

    kind = "q4a8"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._ops is None:
            return self.reference(x)
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        return self._ops.q4a8_linear(x2, self.wq, self.ws).view(*x.shape[:-1], self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Same math in plain torch: int8 activations times the dequantized matrix."""
        x2 = quantize_activations(x.reshape(-1, self.in_features), ACT8_MAX)
        y = x2 @ dequantize_q4(self.wq, self.ws).T
        return y.view(*x.shape[:-1], self.out_features)


def make_linear(W: torch.Tensor, quant: Optional[str], dtype=torch.float32, device="cpu"):
    """The product for W [O, I] as stored in the checkpoint (any dtype, maybe a view):
    q8 in the CPU int8 mode, q4 for quant "q4" ("q4a8": with 8-bit activations), when the
    shape allows (quantized chunk by chunk, so no full fp32 copy of a big matrix is ever
    made), else W in ``dtype`` on ``device``."""
    if quant == "q4" and q8_fits(W):
        return Q4Linear(W)
    if quant == "q4a8" and q8_fits(W):
        return Q4A8Linear(W)
    if quant == "int8" and q8_fits(W):
        return Q8Linear(W)
    return F32Linear(W.to(device=device, dtype=dtype))
