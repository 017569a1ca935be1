"""Shared cases of the 4-bit mode tests (tests/core/test_q4.py, test_q4a8.py): weights whose
q4 packing is exact, and a small random model built twice, fused and unfused."""
from __future__ import annotations

import torch


def exact_q4_weights(O, I, seed=0, one_scale=False):
    """(W, q, d): W = q * d with q in [-8, 7], each block holding a -8 (so the packer's
    scale is d exactly) and d a power of two per (output, block), or 2^-4 everywhere."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (O, I // 32, 32), generator=g)
    q[:, :, 5] = -8
    d = 2.0 ** torch.randint(-9, -2, (O, I // 32, 1), generator=g).float()
    if one_scale:
        d = torch.full_like(d, 2.0 ** -4)
    return (q * d).reshape(O, I), q.reshape(O, I), d


def fused_pair(dtype):
    """The same 3 x 128 random model in ``dtype``: with the fused one-token step, and without."""
    from rwkv_engine.core.checkpoint import infer_shape
    from rwkv_engine.core.model import RWKV7
    from rwkv_engine.core.random_checkpoint import make_state_dict
    sd = make_state_dict(n_layer=3, n_embd=128, vocab=65536, seed=4)
    shape, world_ids = infer_shape(sd, "random")
    return (RWKV7(sd, shape, dtype=dtype, world_ids=world_ids),
            RWKV7(sd, shape, dtype=dtype, world_ids=world_ids, fused=False))
