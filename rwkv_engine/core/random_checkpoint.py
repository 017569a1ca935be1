"""Random RWKV-7 checkpoints in the official x070 key layout: the one generator of the
package and the tooling. ``core.cpu_precision_measure`` times the CPU modes and gates
their accuracy on one (``trained_like=True``); the tests' fixtures and the benchmarks
build theirs with it (``write_checkpoint``, or ``python -m rwkv_engine.core.random_checkpoint``).

The values are random but scaled like a trained model's so that logits are not
degenerate: decays spread over (0, 1), LoRAs small, LayerNorms near identity.

``device=`` generates the tensors on that device (a GPU: a 1.5B or 7.2B shape in
seconds, without a host copy), each converted to ``dtype`` as soon as it is drawn.
``trained_like=True`` adds what makes a trained model's next-token distribution
peaked (see ``_trained_like_head``); the default draws are unchanged by it.
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
                    dtype=torch.float32, world_ids: Optional[Sequence[int]] = None,
                    device=None, trained_like: bool = False) -> dict:
    """A random x070 state dict. ``device``: where the tensors are drawn and kept (default
    the CPU, with the CPU generator: the same values as ever for a seed); on a GPU the
    values come from that device's generator. ``trained_like``: peaked logits (below)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.Generator(device=dev).manual_seed(seed)
    C, H, N = n_embd, n_embd // 64, 64
    Fdim = 4 * C
    dw, da, dv, dg = lora_dims(C)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=dev) * scale

    def uni(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g, device=dev) * (hi - lo) + lo

    class _Stored(dict):   # computed in fp32, stored in dtype at once (no fp32 copy of a big model)
        def __setitem__(self, key, value):
            super().__setitem__(key, value.to(dtype).contiguous())

    sd = _Stored()
    sd["emb.weight"] = rnd(vocab, C, scale=1.0)
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
    sd = dict(sd)
    if trained_like:
        _trained_like_head(sd, seed, dev, dtype)
    if world_ids is not None:
        sd["vocab.world_ids"] = torch.tensor(list(world_ids), dtype=torch.long)
    return sd


# trained_like: the logit of token v is  prior_v + context part, where prior_v falls with
# the token's (random) frequency rank as in a trained model's unigram distribution
# (rank 1: PRIOR_TOP nats, then -PRIOR_SLOPE per e-fold of rank) and the context part,
# <ln_out(x), row_v>, has a standard deviation of CONTEXT_STD nats. Top-1 probability
# then averages 0.54-0.58 and the top-1/top-2 gap's median is 1.1-1.4 nats (4 x 256 and
# 12 x 768; the trained default model: 0.53 and 1.3) instead of plain random weights'
# flat 0.001, so top-1 agreement and relative logit error measure precision, not ties.
PRIOR_TOP, PRIOR_SLOPE, CONTEXT_STD, PRIOR_GAIN = 14.0, 2.0, 2.0, 8.0


def _trained_like_head(sd: dict, seed: int, dev, dtype) -> None:
    """Make ``sd``'s logits peaked like a trained model's, in the weights alone: ln_out's
    bias gets a component PRIOR_GAIN * u (u a random unit vector), so <ln_out(x), u> is
    about PRIOR_GAIN at every position, and head row v gets prior_v / PRIOR_GAIN * u on top
    of its random part (scaled to CONTEXT_STD). Drawn from a second generator, so the
    other tensors are those of ``trained_like=False``."""
    V, C = sd["head.weight"].shape
    g = torch.Generator(device=dev).manual_seed(seed + 7919)
    u = torch.nn.functional.normalize(torch.randn(C, generator=g, device=dev), dim=0)   # [C]
    rank = torch.randperm(V, generator=g, device=dev).float() + 1                       # [V]
    prior = PRIOR_TOP - PRIOR_SLOPE * torch.log(rank)                                   # [V] nats
    sd["ln_out.bias"] = (sd["ln_out.bias"].float() + PRIOR_GAIN * u).to(dtype).contiguous()
    head = torch.empty(V, C, dtype=dtype, device=dev)
    for lo in range(0, V, 8192):            # in slices: a 7.2B head is 65536 x 4096
        hi = min(V, lo + 8192)
        part = sd["head.weight"][lo:hi].float() * CONTEXT_STD
        head[lo:hi] = (part + (prior[lo:hi, None] / PRIOR_GAIN) * u).to(dtype)
    sd["head.weight"] = head


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
    ap.add_argument("--trained-like", action="store_true", help="peaked logits like a trained model's")
    a = ap.parse_args()
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    write_checkpoint(Path(a.out), n_layer=a.layers, n_embd=a.embd, vocab=a.vocab, seed=a.seed, dtype=dt,
                     trained_like=a.trained_like)
    print(a.out)
