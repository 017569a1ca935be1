"""One-token decode on the CPU in one kernel call (kernels/rwkv7_cpu_step.cpp).

``RWKV7.forward`` routes a single-token step (tokens [B, 1], last logits only) here
when the CPU kernels are built: every layer and the head run inside
``torch.ops.rwkv_nvim_cpu.decode_step`` instead of ~50 torch ops per layer. The
unfused torch path (``RWKV7._time_mix`` / ``_channel_mix``) is the reference it is
tested against (tests/core/test_cpu_linear.py).

The kernel takes the weights as one flat list, LAYER_PARAMS tensors per layer in the
order below (the C++ enum ``Param`` mirrors it), then ln_out.weight, ln_out.bias and the
head's (A, B) pair; a product is a pair (A, B): packed q8 (int8) or q4 (uint8) weights
and their scales, or an fp32 W [O, I] and an empty tensor. In the q4a8 mode the q4
products take 8-bit activations (the op's ``q4_a8`` flag).
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from .state import State

_VECTORS = ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "x_r", "x_w", "x_k", "x_v", "x_a", "x_g",
            "w0", "a0", "v0", "k_k", "k_a", "r_k", "lnx_w", "lnx_b", "ffn_x_k")
_PRODUCTS = ("W_r", "W_k", "W_v", "W_o", "w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2",
             "ffn_K", "ffn_V")
LAYER_PARAMS = len(_VECTORS) + 2 * len(_PRODUCTS)     # 47, = Param::LAYER_PARAMS in C++

_EMPTY = torch.empty(0)


def layer_params(layer) -> List[torch.Tensor]:
    """One layer's tensors in the kernel's order (layer 0 has no value-mix LoRA: empty)."""
    out: List[torch.Tensor] = []
    for name in _VECTORS:
        t = getattr(layer, name, None)
        out.append(_EMPTY if t is None else t.reshape(-1).contiguous())
    for name in _PRODUCTS:
        lin = getattr(layer, name, None)
        out.extend((_EMPTY, _EMPTY) if lin is None else lin.step_tensors())
    return out


class FusedDecode:
    """``decode(x [B, C] fp32, state) -> (logits [B, V] fp32, new state)`` for one token."""

    def __init__(self, model, ops):
        self._op = ops.decode_step
        self.n_head = model.shape.n_head
        self.q4_a8 = model.quant == "q4a8"
        params: List[torch.Tensor] = []
        for layer in model.layers:
            params.extend(layer_params(layer))
        params.extend((model.ln_out_w.contiguous(), model.ln_out_b.contiguous()))
        params.extend(model.head.step_tensors())
        self.params = params

    def __call__(self, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        L = len(state.wkv)
        new = State([torch.empty_like(t) for t in state.att_x],
                    [torch.empty_like(t) for t in state.wkv],
                    [torch.empty_like(t) for t in state.ffn_x])
        s_in: List[torch.Tensor] = []
        s_out: List[torch.Tensor] = []
        for i in range(L):
            s_in.extend((state.att_x[i].contiguous(), state.wkv[i].contiguous(), state.ffn_x[i].contiguous()))
            s_out.extend((new.att_x[i], new.wkv[i], new.ffn_x[i]))
        logits = self._op(x.contiguous(), self.params, s_in, s_out, self.n_head, self.q4_a8)
        return logits, new
