"""Small random RWKV-7 checkpoints in the official x070 key layout (test fixtures).

The values are random but scaled like a trained model's so that logits are not
degenerate: decays spread over (0, 1), LoRAs small, LayerNorms near identity.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch


def lora_dims(C: int) -> tuple:
    """(dim_w, dim_a, dim_v, dim_g) as in the official models."""
    dw = max(32, int(round(1.8 * math.sqrt(C) / 32) * 32))
    dv = max(32, int(round(1.3 * math.sqrt(C) / 32) * 32))
    dg = max(32, int(round(0.6 * C ** 0.8 / 32) * 32))
    return dw, dw, dv, dg


def make_state_dict(n_layer: int = 2, n_embd: int = 128, vocab: int = 65536, seed: int = 0,
                    dtype=torch.float32, world_ids: Optional[Sequence[int]] = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    C, H, N = n_embd, n_embd // 64, 64
    Fdim = 4 * C
    dw, da, dv, dg = lora_dims(C)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale)

    def uni(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    sd = {"emb.weight": rnd(vocab, C, scale=1.0)}
    for i in range(n_layer):
        b = f"blocks.{i}."
        if i == 0:
            sd[b + "ln0.weight"] = 1 + rnd(C, scale=0.1)
            sd[b + "ln0.bias"] = rnd(C, scale=0.1)
        for ln in ("ln1", "ln2"):
            sd[b + ln + ".weight"] = 1 + rnd(C, scale=0.1)
            sd[b + ln + ".bias"] = rnd(C, scale=0.1)
        a = b + "att."
        for c in "rwkvag":
            sd[a + "x_" + c] = uni(1, 1, C)
        sd[a + "w0"] = uni(1, 1, C, lo=-6.0, hi=1.0)
        sd[a + "w1"] = rnd(C, dw, scale=0.1)
        sd[a + "w2"] = rnd(dw, C, scale=0.1)
        sd[a + "a0"] = rnd(1, 1, C, scale=0.5)
        sd[a + "a1"] = rnd(C, da, scale=0.1)
        sd[a + "a2"] = rnd(da, C, scale=0.1)
        sd[a + "v0"] = rnd(1, 1, C, scale=0.5)
        sd[a + "v1"] = rnd(C, dv, scale=0.1)
        sd[a + "v2"] = rnd(dv, C, scale=0.1)
        sd[a + "g1"] = rnd(C, dg, scale=0.1)
        sd[a + "g2"] = rnd(dg, C, scale=0.1)
        sd[a + "k_k"] = uni(1, 1, C, lo=0.5, hi=1.0)
        sd[a + "k_a"] = uni(1, 1, C, lo=0.5, hi=1.5)
        sd[a + "r_k"] = rnd(H, N, scale=0.3)
        for name in ("receptance", "key", "value", "output"):
            sd[a + name + ".weight"] = rnd(C, C, scale=1 / math.sqrt(C))
        sd[a + "ln_x.weight"] = 1 + rnd(C, scale=0.1)
        sd[a + "ln_x.bias"] = rnd(C, scale=0.1)
        f = b + "ffn."
        sd[f + "x_k"] = uni(1, 1, C)
        sd[f + "key.weight"] = rnd(Fdim, C, scale=1 / math.sqrt(C))
        sd[f + "value.weight"] = rnd(C, Fdim, scale=1 / math.sqrt(Fdim))
    sd["ln_out.weight"] = 1 + rnd(C, scale=0.1)
    sd["ln_out.bias"] = rnd(C, scale=0.1)
    sd["head.weight"] = rnd(vocab, C, scale=1 / math.sqrt(C))
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    if world_ids is not None:
        sd["vocab.world_ids"] = torch.tensor(list(world_ids), dtype=torch.long)
    return sd


def write_checkpoint(path: Path, **kwargs) -> Path:
    path = Path(path)
    torch.save(make_state_dict(**kwargs), str(path))
    return path


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write a random RWKV-7 checkpoint")
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    a = ap.parse_args()
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    write_checkpoint(Path(a.out), n_layer=a.layers, n_embd=a.embd, vocab=a.vocab, seed=a.seed, dtype=dt)
    print(a.out)
