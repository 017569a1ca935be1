"""Convert an official RWKV-7 ("x070") ``.pth`` checkpoint into a llama.cpp GGUF (arch ``rwkv7``).

The layout follows llama.cpp's own converter (``convert_hf_to_gguf.py``, class
``Rwkv7Model``, which reads the Hugging Face / fla-hub layout) and its loader
(``src/models/rwkv7.cpp``); the official ``.pth`` names map as follows (numpy shapes,
i.e. reversed ggml ``ne``; "T" = transposed from the .pth; C = n_embd):

=============================  ======================================  ==============
GGUF tensor                    from the .pth                           stored as
=============================  ======================================  ==============
token_embd.weight              emb.weight [V, C] (ln0 NOT folded)      type
token_embd_norm.weight/.bias   blocks.0.ln0.weight/.bias               f32 [C]
blk.N.attn_norm.weight/.bias   blocks.N.ln1.*                          f32 [C]
blk.N.attn_norm_2.weight/.bias blocks.N.ln2.*                          f32 [C]
blk.N.time_mix_lerp_fused      stack(att.x_r,x_w,x_k,x_v,x_a,x_g)      f32 [6,1,1,C]
blk.N.time_mix_w0/a0/v0        att.w0/a0/v0 [1,1,C] -> [C]             f32
blk.N.time_mix_w1 / w2         att.w1 [C,dw] T / att.w2 [dw,C] T       f32 (always)
blk.N.time_mix_a1/a2/v1/v2/g1/g2  att.* T                              type
blk.0.time_mix_v0/v1/v2        copies of layer 0's a0/a1/a2 (llama.cpp
                               wants them, never reads them)
blk.N.time_mix_k_k / k_a       att.k_k / k_a [1,1,C] -> [C]            f32
blk.N.time_mix_r_k             att.r_k [H,64] -> [C]                   f32
blk.N.time_mix_key/value/receptance/output  att.*.weight [out,in]      type
blk.N.time_mix_ln.weight/.bias att.ln_x.*  (GroupNorm, eps 64e-5 is
                               hard-coded in llama.cpp)                f32 [C]
blk.N.channel_mix_lerp_k       ffn.x_k [1,1,C] -> [C]                  f32
blk.N.channel_mix_key/value    ffn.key.weight [4C,C] / value [C,4C]    type
output_norm.weight/.bias       ln_out.*                                f32 [C]
output.weight                  head.weight [V, C]                      type
=============================  ======================================  ==============

"type" is the requested ``f32``/``f16``/``q8_0`` (q8_0 needs rows that are a multiple
of 32 values, else that tensor is f16), exactly the rules of llama.cpp's converter:
1-D tensors, norms, time_mix_w1/w2 and the fused lerp stay f32.

Metadata (prefix ``rwkv7.``): context_length 1048576, embedding_length C, block_count,
feed_forward_length, attention.layer_norm_epsilon 1e-5, attention.head_count 0 (llama.cpp
requires the key, RWKV-7 ignores it), wkv.head_size 64, token_shift_count 2,
attention.{decay,iclr,value_residual_mix,gate}_lora_rank from the tensor shapes.

Tokenizer: ``tokenizer.ggml.model = "rwkv"``; token i's text is ``repr(bytes)[2:-1]`` of
its World bytes (llama.cpp unescapes \\t \\n \\r \\xNN \\\\ \\' back to bytes); id 0 is
``<s>`` (CONTROL), the bos and eos id; ids without a token are ``[PADi]`` (UNUSED).
A trimmed vocabulary (``vocab.world_ids``) is representable as it is: local index i gets
the bytes of World id ``world_ids[i]`` (llama.cpp's RWKV tokenizer is the same greedy
longest match over whatever tokens the file lists); the World ids are also recorded
under ``rwkv_nvim.vocab.world_ids``. llama.cpp's converter also marks ``"\\n\\n"`` (261)
as end-of-turn, which makes llama-server stop at every blank line: that is off here
unless ``eot_double_newline=True`` (chat use).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from .checkpoint import CheckpointError, ModelShape, load_checkpoint

ARCH = "rwkv7"
GGUF_TYPES = ("f32", "f16", "q8_0")
LAYER_NORM_EPS = 1e-5
CONTEXT_LENGTH = 1048576      # RWKV has no context limit; what llama.cpp's converter writes
DOUBLE_NEWLINE_WORLD_ID = 261
INSTALL_HINT = ("the `gguf` package is needed to write GGUF files: "
                "pip install 'rwkv-nvim[gguf]'  (or: pip install 'gguf>=0.10')")

# tensor kinds: "vec" 1-D (f32), "f32" always f32, "mat" the requested type
_Kind = str
_Item = Tuple[str, Callable[[], "object"], _Kind]


class GGUFExportError(ValueError):
    """The checkpoint cannot be written as a llama.cpp GGUF; the message says why."""


def require_gguf():
    """The ``gguf`` module, or ImportError with the install command."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return gguf


# -- tensors ------------------------------------------------------------------------------
def tensor_plan(sd: dict, shape: ModelShape) -> Iterator[_Item]:
    """(GGUF name, loader returning an fp32 torch tensor in GGUF numpy layout, kind)."""
    import torch

    C = shape.n_embd

    def t(key: str, fn=None):
        def load():
            x = sd[key].float()
            return (fn(x) if fn else x).contiguous()
        return load

    def vec(key):
        return t(key, lambda x: x.reshape(C))

    def tr(key):                                  # LoRA matrices: [in, r] -> ggml {in, r}
        return t(key, lambda x: x.t())

    yield "token_embd.weight", t("emb.weight"), "mat"
    yield "token_embd_norm.weight", vec("blocks.0.ln0.weight"), "vec"
    yield "token_embd_norm.bias", vec("blocks.0.ln0.bias"), "vec"
    for i in range(shape.n_layer):
        b, a, f, o = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn.", f"blk.{i}."
        yield o + "attn_norm.weight", vec(b + "ln1.weight"), "vec"
        yield o + "attn_norm.bias", vec(b + "ln1.bias"), "vec"
        yield o + "attn_norm_2.weight", vec(b + "ln2.weight"), "vec"
        yield o + "attn_norm_2.bias", vec(b + "ln2.bias"), "vec"

        def lerp(a=a):                            # order r, w, k, v, a, g: llama.cpp's views
            return torch.stack([sd[a + "x_" + c].float().reshape(C) for c in "rwkvag"]
                               ).reshape(6, 1, 1, C).contiguous()
        yield o + "time_mix_lerp_fused.weight", lerp, "f32"
        yield o + "time_mix_w0.weight", vec(a + "w0"), "vec"
        yield o + "time_mix_w1.weight", tr(a + "w1"), "f32"
        yield o + "time_mix_w2.weight", tr(a + "w2"), "f32"
        yield o + "time_mix_a0.weight", vec(a + "a0"), "vec"
        yield o + "time_mix_a1.weight", tr(a + "a1"), "mat"
        yield o + "time_mix_a2.weight", tr(a + "a2"), "mat"
        v = a + ("a" if i == 0 else "v")          # layer 0: unused dummies shaped like a*
        yield o + "time_mix_v0.weight", vec(v + "0"), "vec"
        yield o + "time_mix_v1.weight", tr(v + "1"), "mat"
        yield o + "time_mix_v2.weight", tr(v + "2"), "mat"
        yield o + "time_mix_g1.weight", tr(a + "g1"), "mat"
        yield o + "time_mix_g2.weight", tr(a + "g2"), "mat"
        yield o + "time_mix_k_k.weight", vec(a + "k_k"), "vec"
        yield o + "time_mix_k_a.weight", vec(a + "k_a"), "vec"
        yield o + "time_mix_r_k.weight", vec(a + "r_k"), "vec"
        yield o + "time_mix_key.weight", t(a + "key.weight"), "mat"
        yield o + "time_mix_value.weight", t(a + "value.weight"), "mat"
        yield o + "time_mix_receptance.weight", t(a + "receptance.weight"), "mat"
        yield o + "time_mix_ln.weight", vec(a + "ln_x.weight"), "vec"
        yield o + "time_mix_ln.bias", vec(a + "ln_x.bias"), "vec"
        yield o + "time_mix_output.weight", t(a + "output.weight"), "mat"
        yield o + "channel_mix_lerp_k.weight", vec(f + "x_k"), "vec"
        yield o + "channel_mix_key.weight", t(f + "key.weight"), "mat"
        yield o + "channel_mix_value.weight", t(f + "value.weight"), "mat"
    yield "output_norm.weight", vec("ln_out.weight"), "vec"
    yield "output_norm.bias", vec("ln_out.bias"), "vec"
    yield "output.weight", t("head.weight"), "mat"


def expected_shapes(shape: ModelShape) -> Dict[str, tuple]:
    """GGUF tensor name -> numpy shape, as llama.cpp's rwkv7 loader wants them."""
    C, V, Fd = shape.n_embd, shape.vocab_size, shape.dim_ffn
    dw, da, dv, dg = shape.dim_w, shape.dim_a, shape.dim_v, shape.dim_g
    out = {"token_embd.weight": (V, C), "token_embd_norm.weight": (C,), "token_embd_norm.bias": (C,),
           "output_norm.weight": (C,), "output_norm.bias": (C,), "output.weight": (V, C)}
    for i in range(shape.n_layer):
        o = f"blk.{i}."
        rv = da if i == 0 else dv
        out.update({
            o + "attn_norm.weight": (C,), o + "attn_norm.bias": (C,),
            o + "attn_norm_2.weight": (C,), o + "attn_norm_2.bias": (C,),
            o + "time_mix_lerp_fused.weight": (6, 1, 1, C),
            o + "time_mix_w0.weight": (C,), o + "time_mix_w1.weight": (dw, C), o + "time_mix_w2.weight": (C, dw),
            o + "time_mix_a0.weight": (C,), o + "time_mix_a1.weight": (da, C), o + "time_mix_a2.weight": (C, da),
            o + "time_mix_v0.weight": (C,), o + "time_mix_v1.weight": (rv, C), o + "time_mix_v2.weight": (C, rv),
            o + "time_mix_g1.weight": (dg, C), o + "time_mix_g2.weight": (C, dg),
            o + "time_mix_k_k.weight": (C,), o + "time_mix_k_a.weight": (C,), o + "time_mix_r_k.weight": (C,),
            o + "time_mix_key.weight": (C, C), o + "time_mix_value.weight": (C, C),
            o + "time_mix_receptance.weight": (C, C), o + "time_mix_output.weight": (C, C),
            o + "time_mix_ln.weight": (C,), o + "time_mix_ln.bias": (C,),
            o + "channel_mix_lerp_k.weight": (C,),
            o + "channel_mix_key.weight": (Fd, C), o + "channel_mix_value.weight": (C, Fd),
        })
    return out


def _qtype(gguf, kind: _Kind, out_type: str, shape: tuple):
    Q = gguf.GGMLQuantizationType
    if kind != "mat" or len(shape) < 2 or out_type == "f32":
        return Q.F32
    if out_type == "q8_0":
        block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
        return Q.Q8_0 if shape[-1] % block == 0 else Q.F16
    return Q.F16


def _nbytes(gguf, qtype, shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return n // block * type_size


def _encode(gguf, arr, qtype):
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


# -- vocabulary ---------------------------------------------------------------------------
def token_text(tok: bytes) -> bytes:
    """llama.cpp's RWKV token text: the body of the bytes literal (``repr(b)[2:-1]``)."""
    return repr(bytes(tok))[2:-1].encode("utf-8")


def vocabulary(shape: ModelShape, world_ids: Optional[List[int]]) -> Tuple[List[bytes], List[int], Dict[str, int]]:
    """(token texts, token types, special ids) for a model of ``shape.vocab_size`` outputs."""
    from .tokenizer import END_OF_TEXT, WorldTokenizer, _read_world_vocab

    NORMAL, CONTROL, UNUSED = 1, 3, 5            # gguf.TokenType values
    world = _read_world_vocab()
    V = shape.vocab_size
    if world_ids is None:
        local_to_world = list(range(V))
    else:
        try:                                      # same rules as the engine's tokenizer
            WorldTokenizer.from_world_ids(world_ids)
        except ValueError as e:
            raise GGUFExportError(f"unusable trimmed vocabulary: {e}") from None
        local_to_world = list(world_ids)
    tokens: List[bytes] = []
    types: List[int] = []
    for local, wid in enumerate(local_to_world):
        if wid == END_OF_TEXT:
            tokens.append(b"<s>")
            types.append(CONTROL)
        elif wid in world:
            tokens.append(token_text(world[wid]))
            types.append(NORMAL)
        else:
            tokens.append(f"[PAD{local}]".encode())
            types.append(UNUSED)
    if len(set(tokens)) != len(tokens):
        raise GGUFExportError("the vocabulary has two tokens with the same bytes; "
                              "llama.cpp cannot represent it")
    special = {"bos": local_to_world.index(END_OF_TEXT), "eos": local_to_world.index(END_OF_TEXT)}
    if DOUBLE_NEWLINE_WORLD_ID in local_to_world:
        special["eot"] = local_to_world.index(DOUBLE_NEWLINE_WORLD_ID)
    return tokens, types, special


# -- export -------------------------------------------------------------------------------
def export_gguf(src, dst, out_type: str = "f16", *, eot_double_newline: bool = False,
                name: Optional[str] = None, overwrite: bool = True, progress=None) -> dict:
    """Write ``dst`` (GGUF, arch rwkv7) from the RWKV-7 checkpoint ``src``; returns a summary.

    ``out_type``: f32 / f16 / q8_0 for the large matrices. Raises CheckpointError for an
    unusable checkpoint, GGUFExportError for one llama.cpp cannot represent, ImportError
    (with the install command) without the gguf package. Written to ``dst + ".part"``
    and renamed, so a failed export never leaves a half file under ``dst``."""
    gguf = require_gguf()
    import numpy as np  # noqa: F401  (gguf needs it anyway)

    if out_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {out_type!r}; use one of {', '.join(GGUF_TYPES)}")
    t0 = time.perf_counter()
    path, sd, shape, world_ids = load_checkpoint(src)
    if shape.n_layer < 2:
        raise GGUFExportError(f"{path}: llama.cpp's rwkv7 needs at least 2 layers (value residual "
                              "LoRA ranks come from layer 1)")
    dst = Path(os.path.expanduser(str(dst)))
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (use --force to overwrite)")
    if dst.resolve() == path.resolve():
        raise ValueError("the output would overwrite the checkpoint")
    tokens, types, special = vocabulary(shape, world_ids)

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    tmp = dst.with_name(dst.name + ".part")
    w = gguf.GGUFWriter(str(tmp), ARCH)
    try:
        w.add_type("model")
        w.add_name(name or path.stem)
        p = ARCH + "."
        w.add_uint32(p + "context_length", CONTEXT_LENGTH)
        w.add_uint32(p + "embedding_length", shape.n_embd)
        w.add_uint32(p + "block_count", shape.n_layer)
        w.add_uint32(p + "feed_forward_length", shape.dim_ffn)
        w.add_float32(p + "attention.layer_norm_epsilon", LAYER_NORM_EPS)
        w.add_uint32(p + "attention.head_count", 0)
        w.add_uint32(p + "wkv.head_size", shape.head_size)
        w.add_uint32(p + "token_shift_count", 2)
        w.add_uint32(p + "attention.decay_lora_rank", shape.dim_w)
        w.add_uint32(p + "attention.iclr_lora_rank", shape.dim_a)
        w.add_uint32(p + "attention.value_residual_mix_lora_rank", shape.dim_v)
        w.add_uint32(p + "attention.gate_lora_rank", shape.dim_g)
        w.add_uint32("general.file_type", int(ftype))
        w.add_uint32("general.quantization_version", int(gguf.GGML_QUANT_VERSION))
        w.add_string("tokenizer.ggml.model", "rwkv")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_uint32("tokenizer.ggml.bos_token_id", special["bos"])
        w.add_uint32("tokenizer.ggml.eos_token_id", special["eos"])
        if eot_double_newline and "eot" in special:
            w.add_uint32("tokenizer.ggml.eot_token_id", special["eot"])
        if world_ids is not None:
            w.add_array("rwkv_nvim.vocab.world_ids", [int(i) for i in world_ids])

        want = expected_shapes(shape)
        plan = []
        for gname, load, kind in tensor_plan(sd, shape):
            shp = want[gname]
            q = _qtype(gguf, kind, out_type, shp)
            plan.append((gname, load, q, shp))
            w.add_tensor_info(gname, shp, np.dtype(np.float32), _nbytes(gguf, q, shp), raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        total = 0
        for k, (gname, load, q, shp) in enumerate(plan):
            x = load()
            if tuple(x.shape) != shp:
                raise CheckpointError(f"{path}: {gname} would have shape {tuple(x.shape)}, "
                                      f"llama.cpp expects {shp}")
            data = _encode(gguf, x.numpy(), q)
            w.write_tensor_data(data)
            total += data.nbytes
            if progress:
                progress(k + 1, len(plan), gname)
        w.close()
        os.replace(tmp, dst)
    except BaseException:
        w.close()
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return {"path": str(dst), "source": str(path), "type": out_type, "arch": ARCH,
            "n_layer": shape.n_layer, "n_embd": shape.n_embd, "vocab_size": shape.vocab_size,
            "vocabulary": "trimmed World" if world_ids is not None else "RWKV World",
            "tensors": len(plan), "tensor_bytes": total, "file_bytes": dst.stat().st_size,
            "eot": special.get("eot") if eot_double_newline else None,
            "seconds": round(time.perf_counter() - t0, 3)}
