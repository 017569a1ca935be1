"""Load and validate official RWKV-7 ("x070") ``.pth`` checkpoints.

Every failure becomes one :class:`CheckpointError` naming the file and the problem
(missing, truncated/corrupt, refused pickle, not RWKV-7, inconsistent shapes).
Loading always uses ``torch.load(weights_only=True)``: a checkpoint that would run
code when unpickled is refused, never executed.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HEAD_SIZE = 64
VOCAB_KEY = "vocab.world_ids"  # optional: trimmed vocabulary, int64 [V] of World ids

_LAYER_ATT_KEYS = (
    "x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2",
    "g1", "g2", "k_k", "k_a", "r_k", "receptance.weight", "key.weight",
    "value.weight", "output.weight", "ln_x.weight", "ln_x.bias",
)
_LAYER_V_KEYS = ("v0", "v1", "v2")  # layers >= 1 (layer 0 sets v_first)
_LAYER_FFN_KEYS = ("x_k", "key.weight", "value.weight")
_LAYER_LN_KEYS = ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")
_TOP_KEYS = ("emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias",
             "ln_out.weight", "ln_out.bias", "head.weight")


class CheckpointError(ValueError):
    """A model file that cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_embd: int        # C = D
    n_head: int        # H = C / 64
    head_size: int     # N = 64
    vocab_size: int    # V (model-local)
    dim_w: int         # LoRA widths inferred from the tensors
    dim_a: int
    dim_v: int
    dim_g: int
    dim_ffn: int

    def state_bytes(self, batch: int = 1, shift_bytes: int = 4) -> int:
        """Bytes of one recurrent state: 2 token-shifts [B, C] + WKV [B, H, 64, 64] fp32 per layer."""
        per_layer = 2 * self.n_embd * shift_bytes + self.n_head * self.head_size ** 2 * 4
        return batch * self.n_layer * per_layer


def resolve_path(path) -> Path:
    """The checkpoint file for ``path``; the ``.pth`` suffix is optional."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        return p
    with_suffix = Path(str(p) + ".pth")
    if p.suffix != ".pth" and with_suffix.is_file():
        return with_suffix
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory, not an RWKV-7 .pth checkpoint")
    tried = f" (also tried {with_suffix})" if p.suffix != ".pth" else ""
    raise CheckpointError(f"{p}: model file not found{tried}")


def read_state_dict(path) -> tuple:
    """(resolved path, state dict of CPU tensors, memory-mapped where possible)."""
    import torch

    p = resolve_path(path)
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"{p}: file is empty")
    try:
        # mmap needs the zip format of torch.save; older (legacy) files load without it
        mmap = zipfile.is_zipfile(str(p))
        sd = torch.load(str(p), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "GLOBAL" in text:
            raise CheckpointError(f"{p}: refused to load: the file contains Python objects, not only "
                                  "tensors (loaded with weights_only=True, nothing was executed)") from None
        raise CheckpointError(f"{p}: truncated or corrupt checkpoint (not a readable torch file)") from None
    except MemoryError:
        raise
    except Exception as e:      # the unpickler fails in many ways on garbage (IndexError, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError)):
            msg = f"{type(e).__name__}: {msg}"
        hint = "truncated or corrupt" if size < 1024 or "central directory" in msg or "EOF" in msg \
            or "zip" in msg.lower() or isinstance(e, EOFError) else "unreadable"
        raise CheckpointError(f"{p}: {hint} checkpoint ({msg[:160]})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"{p}: not an RWKV-7 checkpoint (expected a dict of named tensors)")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{p}: not an RWKV-7 checkpoint (entry {bad[0]!r} is not a tensor)")
    return p, sd


def _guess_family(sd: dict) -> str:
    keys = sd.keys()
    if any(k.endswith("att.time_faaaa") or k.endswith("att.time_maa_x") for k in keys):
        return "it looks like RWKV-5/6"
    if any(k.endswith("att.time_first") for k in keys):
        return "it looks like RWKV-4"
    if any(k.startswith("model.layers.") or k.startswith("transformer.") for k in keys):
        return "it looks like a transformer checkpoint"
    return "the RWKV-7 tensor names are missing"


def infer_shape(sd: dict, path: Path) -> tuple:
    """(ModelShape, world_ids or None) inferred from tensor shapes, with full validation."""
    missing = [k for k in _TOP_KEYS + ("blocks.0.att.r_k",) if k not in sd]
    if missing:
        raise CheckpointError(f"{path}: not an RWKV-7 (x070) checkpoint: missing {missing[0]!r}; "
                              f"{_guess_family(sd)}")
    V, C = sd["emb.weight"].shape if sd["emb.weight"].dim() == 2 else (0, 0)
    if C == 0 or C % HEAD_SIZE:
        raise CheckpointError(f"{path}: emb.weight has shape {tuple(sd['emb.weight'].shape)}; "
                              f"expected [vocab, n_embd] with n_embd a multiple of {HEAD_SIZE}")
    H, N = sd["blocks.0.att.r_k"].shape
    if N != HEAD_SIZE or H * N != C:
        raise CheckpointError(f"{path}: blocks.0.att.r_k has shape {(H, N)}; expected "
                              f"[{C // HEAD_SIZE}, {HEAD_SIZE}] (head size 64)")
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    L = max(layers) + 1
    if layers != set(range(L)):
        raise CheckpointError(f"{path}: layer numbers are not contiguous (found {sorted(layers)})")
    for i in range(L):
        need = [f"blocks.{i}.att.{k}" for k in _LAYER_ATT_KEYS]
        need += [f"blocks.{i}.ffn.{k}" for k in _LAYER_FFN_KEYS]
        need += [f"blocks.{i}.{k}" for k in _LAYER_LN_KEYS]
        if i > 0:
            need += [f"blocks.{i}.att.{k}" for k in _LAYER_V_KEYS]
        for k in need:
            if k not in sd:
                raise CheckpointError(f"{path}: not a complete RWKV-7 (x070) checkpoint: missing {k!r}")
    a0 = "blocks.0.att."
    shape = ModelShape(
        n_layer=L, n_embd=C, n_head=H, head_size=N, vocab_size=V,
        dim_w=sd[a0 + "w1"].shape[-1], dim_a=sd[a0 + "a1"].shape[-1],
        dim_v=sd["blocks.1.att.v1"].shape[-1] if L > 1 else 0,
        dim_g=sd[a0 + "g1"].shape[-1], dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0],
    )
    expect = {
        "head.weight": (V, C), "blocks.0.att.receptance.weight": (C, C),
        "blocks.0.att.output.weight": (C, C), "blocks.0.ffn.value.weight": (C, shape.dim_ffn),
        "blocks.0.att.w2": (shape.dim_w, C), "blocks.0.att.g2": (shape.dim_g, C),
    }
    for k, want in expect.items():
        got = tuple(sd[k].shape)
        if got != want:
            raise CheckpointError(f"{path}: {k} has shape {got}, expected {want} for n_embd {C}, vocab {V}")
    world_ids = None
    if VOCAB_KEY in sd:
        ids = sd[VOCAB_KEY]
        if ids.dim() != 1 or ids.numel() != V:
            raise CheckpointError(f"{path}: {VOCAB_KEY} has {ids.numel()} entries but the model has "
                                  f"vocabulary size {V}")
        world_ids = [int(i) for i in ids.tolist()]
    elif V != 65536:
        raise CheckpointError(f"{path}: vocabulary size {V} is not the RWKV World vocabulary (65536) "
                              f"and the file declares no '{VOCAB_KEY}'")
    return shape, world_ids


def model_identity(path: Path, extra: str = "") -> str:
    """A stable id for cache keys: resolved path, size and mtime (no full-file hash)."""
    import hashlib

    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{extra}".encode())
    return h.hexdigest()[:24]


def load_checkpoint(path) -> tuple:
    """(path, state dict, ModelShape, world_ids or None) — validated."""
    p, sd = read_state_dict(path)
    shape, world_ids = infer_shape(sd, p)
    return p, sd, shape, world_ids

