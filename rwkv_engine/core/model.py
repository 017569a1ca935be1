"""RWKV-7 ("x070") inference: batched prefill and one-step decode with explicit state.

Shapes: B rows, T tokens, C = n_embd, H = C / 64 heads, N = 64, V vocabulary.
CPU computes in fp32 with fp32 weights, or (dtype "int8") with weights quantized per
block of 32 (rwkv_engine/core/linear.py), or (dtype "q4") with the big matrices in 4 bits
per weight and the LoRAs in int8 (``QUANT_PLAN``; "q4a8": the same weights, 8-bit
activations); one-token steps on the CPU run fused in one kernel
call (rwkv_engine/core/fused_step.py). CUDA (and MPS, Apple's GPU, with the pure-torch WKV
path: no kernel) keeps weights and activations in fp16 (default) or bf16
and the WKV state in fp32. ``forward`` never mutates the state it is given.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, ModelShape, load_checkpoint, model_identity
from .embedding import EmbeddingTable
from .linear import make_linear
from .state import State
from .tokenizer import WorldTokenizer
from .wkv import wkv7, wkv7_reference

log = logging.getLogger("rwkv_engine")

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16}


def _parse_dtype(dtype, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        if dtype not in (None, "auto", torch.float32, "fp32", "float32", "int8", "q4", "q4a8"):
            log.info("device cpu computes in fp32 (asked for %s)", dtype)
        return torch.float32
    if dtype in (None, "auto"):
        return torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use fp16, bf16 or fp32 (int8, q4, q4a8 are CPU only)")
    return _DTYPES[dtype]


def cpu_modes() -> tuple:
    """The weight representations the CPU engine can run (``dtype=`` names): fp32, int8
    (block-quantized q8 weights, rwkv_engine/core/linear.py), q4 (4-bit big matrices,
    ``QUANT_PLAN``) and q4a8 (the q4 weights with 8-bit activations)."""
    return ("fp32", "int8", "q4", "q4a8")


# Per CPU mode, the weight format of each kind of matrix: "mats" the [C, C] and ffn
# matrices (the bulk of the bytes), "lora" the small LoRA matrices, "head" the output
# head (a linear's quant name for make_linear; the embedding table is bf16 in both).
# q4 keeps the LoRAs (~2 % of the bytes) and the head at 8 bits. Measured (KL(fp32 ||
# mode) teacher-forced over 4 x 256 tokens of real code, the shipped default model): int8
# 0.0001; 4-bit matrices 0.0164 (top-1 91.8 %); + 4-bit head 0.0257 (90.3 %); + 4-bit
# LoRAs 0.0265. A per-block offset (Q4_1-like, +0.0625 B/weight) gave 0.0136 / 92.2 %
# (random trained-like 12 x 768: 0.421 vs 0.442): not worth 11 % more bytes per step.
QUANT_PLAN = {
    "int8": {"mats": "int8", "lora": "int8", "head": "int8"},
    "q4": {"mats": "q4", "lora": "int8", "head": "int8"},
    "q4a8": {"mats": "q4a8", "lora": "int8", "head": "int8"},   # q4 with int8 activations
}


class _Layer:
    """Weights of one block, prepared for inference (vectors flattened to [C])."""

    def __init__(self, sd: dict, i: int, dtype, device, n_head: int, quant: Optional[str]):
        plan = QUANT_PLAN.get(quant, {})

        def g(name, shape=None):
            t = sd[f"blocks.{i}.{name}"].to(device=device, dtype=dtype)
            return (t.reshape(shape) if shape is not None else t).contiguous()

        C = sd["emb.weight"].shape[1]

        def lin(name):                                   # checkpoint W [out, in]
            return make_linear(sd[f"blocks.{i}.{name}"], plan.get("mats"), dtype, device)

        def lora(name):                                  # checkpoint stores x @ M: M [in, out]
            return make_linear(sd[f"blocks.{i}.{name}"].t(), plan.get("lora"), dtype, device)

        self.ln1_w, self.ln1_b = g("ln1.weight"), g("ln1.bias")
        self.ln2_w, self.ln2_b = g("ln2.weight"), g("ln2.bias")
        # time-mix token-shift coefficients, each [C]
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (
            g(f"att.x_{c}", (C,)) for c in "rwkvag")
        # LoRAs as products: w1 [dw, C] (down), w2 [C, dw] (up); likewise a, v, g
        self.w0, self.w1, self.w2 = g("att.w0", (C,)), lora("att.w1"), lora("att.w2")
        self.a0, self.a1, self.a2 = g("att.a0", (C,)), lora("att.a1"), lora("att.a2")
        self.has_v_mix = i > 0
        if self.has_v_mix:
            self.v0, self.v1, self.v2 = g("att.v0", (C,)), lora("att.v1"), lora("att.v2")
        self.g1, self.g2 = lora("att.g1"), lora("att.g2")
        self.k_k, self.k_a = g("att.k_k", (C,)), g("att.k_a", (C,))
        self.r_k = g("att.r_k", (n_head, C // n_head))                            # [H, N]
        self.W_r, self.W_k = lin("att.receptance.weight"), lin("att.key.weight")  # [C, C]
        self.W_v, self.W_o = lin("att.value.weight"), lin("att.output.weight")
        self.lnx_w, self.lnx_b = g("att.ln_x.weight"), g("att.ln_x.bias")
        self.ffn_x_k = g("ffn.x_k", (C,))
        self.ffn_K, self.ffn_V = lin("ffn.key.weight"), lin("ffn.value.weight")  # [F, C], [C, F]


class RWKV7:
    """An RWKV-7 language model with an explicit, copyable recurrent state."""

    def __init__(self, sd: dict, shape: ModelShape, device="cpu", dtype=None,
                 world_ids=None, path: Optional[Path] = None, use_kernel: bool = True,
                 fused: bool = True):
        self.device = torch.device(device)
        self.dtype = _parse_dtype(dtype, self.device)
        self.quant = dtype if (dtype in QUANT_PLAN and self.device.type == "cpu") else None
        if dtype in QUANT_PLAN and self.device.type != "cpu":
            raise ValueError(f"dtype {dtype} is a CPU mode; use fp16 or bf16 on a GPU")
        self.shape = shape
        self.path = path
        self.use_kernel = use_kernel
        self._fused = None if fused else False   # fused=False: one-token steps take the torch path
        self.graphs = None                         # GraphDecode once enable_cuda_graphs() ran
        self.world_ids = world_ids
        self.tokenizer = (WorldTokenizer.from_world_ids(world_ids) if world_ids is not None
                          else WorldTokenizer.default())
        C, dt, dev = shape.n_embd, self.dtype, self.device
        with torch.no_grad():
            # fold blocks.0.ln0 into the embedding table (it only ever sees embeddings)
            self.emb = EmbeddingTable.build(sd["emb.weight"], sd["blocks.0.ln0.weight"],
                                            sd["blocks.0.ln0.bias"], self.quant, dt, dev)  # [V, C]
            self.layers = [_Layer(sd, i, dt, dev, shape.n_head, self.quant) for i in range(shape.n_layer)]
            self.ln_out_w = sd["ln_out.weight"].to(device=dev, dtype=dt)
            self.ln_out_b = sd["ln_out.bias"].to(device=dev, dtype=dt)
            plan = QUANT_PLAN.get(self.quant, {})
            self.head = make_linear(sd["head.weight"], plan.get("head"), dt, dev)  # [V, C]
        # the weight format is part of the identity: states of another format never match
        ident = f"{dev.type}|{dt}|{self.quant}" + {"int8": "-q8b32", "q4": "-q4b32", "q4a8": "-q4b32a8"}.get(self.quant, "")
        self.model_id = model_identity(path, ident) if path is not None else f"anon-{id(self)}"

    def weight_bytes(self) -> int:
        """Bytes one decode step reads from the weights as they are held: every product's
        matrices (int8 + scales, or the dtype) and the per-layer vectors (the few
        embedding rows it looks up are left out)."""
        total = self.head.nbytes + 2 * self.ln_out_w.numel() * self.ln_out_w.element_size()
        for layer in self.layers:
            for value in vars(layer).values():
                if hasattr(value, "nbytes") and not isinstance(value, torch.Tensor):
                    total += value.nbytes                                   # a product
                elif isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total

    # -- state ---------------------------------------------------------------
    def new_state(self, batch: int = 1) -> State:
        s = self.shape
        return State.zeros(s.n_layer, batch, s.n_embd, s.n_head, s.head_size, self.dtype, self.device)

    def state_bytes(self, batch: int = 1) -> int:
        return self.shape.state_bytes(batch, torch.tensor([], dtype=self.dtype).element_size())

    # -- forward -------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens, state: Optional[State] = None,
                all_logits: bool = False) -> Tuple[torch.Tensor, State]:
        """tokens LongTensor [B, T] -> (logits [B, V] fp32 of the last position, new state).

        With ``all_logits`` the logits of every position are returned, [B, T, V].
        """
        tokens = self._checked_tokens(tokens)
        if tokens.dim() == 1:
            tokens = tokens[None]
        B, T = tokens.shape
        if T == 0:
            raise ValueError("forward needs at least one token")
        if state is None:
            state = self.new_state(B)
        if state.batch != B:
            raise ValueError(f"state has {state.batch} rows but tokens have {B}")
        if T == 1 and not all_logits:
            if self.graphs is not None:
                out = self.graphs(tokens, state)                                   # CUDA-graph replay
                if out is not None:
                    return out
            fused = self._fused_decode()
            if fused is not None:
                return fused(self.emb[tokens[:, 0]], state)                        # [B, V], new state
        return self._step(tokens, state, all_logits)

    __call__ = forward

    def _step(self, tokens: torch.Tensor, state: State, all_logits: bool = False):
        """The eager torch path: tokens [B, T] on the device -> (logits, new state); what
        rwkv_engine/core/cuda_graph.py captures for T = 1 (and is tested against)."""
        x = self.emb[tokens]                                                       # [B, T, C]
        new = State([], [], [])
        v_first = None
        for i, layer in enumerate(self.layers):
            x, v_first = self._time_mix(layer, x, state, new, i, v_first)
            x = self._channel_mix(layer, x, state, new, i)
        if not all_logits:
            x = x[:, -1]                                                           # [B, C]
        x = F.layer_norm(x, (self.shape.n_embd,), self.ln_out_w, self.ln_out_b)
        return self.head(x).float(), new

    def enable_cuda_graphs(self, buckets=None, backend=None):
        """Replay one-token steps from CUDA graphs (rwkv_engine/core/cuda_graph.py) for batch
        buckets (default 1, 2, 4, 8); a no-op returning None on a CPU model unless a
        ``backend`` is given (the CPU tests' ReplayBackend). Returns the GraphDecode."""
        from .cuda_graph import BUCKETS, GraphDecode
        if self.device.type != "cuda" and backend is None:
            log.info("CUDA graphs need a CUDA model (this one is on %s): not enabled", self.device)
            return None
        self.graphs = GraphDecode(self, buckets or BUCKETS, backend)
        return self.graphs

    def disable_cuda_graphs(self) -> None:
        self.graphs = None

    def _fused_decode(self):
        """The fused one-token CPU step (rwkv_engine/core/fused_step.py), or None: on a GPU, with
        use_kernel=False (the reference path) or when the CPU kernels cannot be built."""
        if self._fused is None:
            self._fused = False
            if self.device.type == "cpu" and self.use_kernel and self.dtype == torch.float32:
                from .fused_step import FusedDecode
                from .linear import cpu_ops
                ops = cpu_ops()
                if ops is not None:
                    self._fused = FusedDecode(self, ops)
        return self._fused or None

    def _checked_tokens(self, tokens) -> torch.Tensor:
        """``tokens`` as a long tensor on the model's device. Ids from the host (lists, CPU
        tensors: prompts) are range-checked on the host BEFORE the copy, so the check never
        waits for the GPU; a tensor already on the device (ids the sampler drew from this
        model's logits) is used as it is."""
        t = torch.as_tensor(tokens, dtype=torch.long)
        if t.device.type == "cpu" and t.numel():
            lo, hi = torch.aminmax(t)
            if int(lo) < 0 or int(hi) >= self.shape.vocab_size:
                raise ValueError(f"token id out of range for vocabulary size {self.shape.vocab_size}")
        return t.to(self.device)

    def _time_mix(self, p: _Layer, x, state: State, new: State, i: int, v_first):
        B, T, C = x.shape
        H, N = self.shape.n_head, self.shape.head_size
        h = F.layer_norm(x, (C,), p.ln1_w, p.ln1_b)                                # [B, T, C]
        prev = torch.cat([state.att_x[i][:, None], h[:, :-1]], dim=1) if T > 1 else state.att_x[i][:, None]
        new.att_x.append(h[:, -1].clone(memory_format=torch.contiguous_format))   # own storage, not a view of h
        d = prev - h
        xr, xw, xk = torch.addcmul(h, d, p.x_r), torch.addcmul(h, d, p.x_w), torch.addcmul(h, d, p.x_k)
        xv, xa, xg = torch.addcmul(h, d, p.x_v), torch.addcmul(h, d, p.x_a), torch.addcmul(h, d, p.x_g)
        r, k, v = p.W_r(xr), p.W_k(xk), p.W_v(xv)
        w = -F.softplus(-(p.w0 + p.w2(torch.tanh(p.w1(xw))))) - 0.5               # log-log decay [B, T, C]
        a = torch.sigmoid(p.a0 + p.a2(p.a1(xa)))                                   # in-context learning rate
        g = p.g2(torch.sigmoid(p.g1(xg)))                                          # output gate
        kk = F.normalize((k * p.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * p.k_a)
        if p.has_v_mix:
            v = v + (v_first - v) * torch.sigmoid(p.v0 + p.v2(p.v1(xv)))
        else:
            v_first = v
        shp = (B, T, H, N)
        wkv_fn = wkv7 if self.use_kernel else wkv7_reference
        y, s_new = wkv_fn(state.wkv[i], r.view(shp).contiguous(), w.view(shp).contiguous(),
                          k.view(shp).contiguous(), v.view(shp).contiguous(),
                          (-kk).view(shp).contiguous(), (kk * a).view(shp).contiguous())
        new.wkv.append(s_new)                                                      # [B, H, N, N] fp32
        y = F.group_norm(y.reshape(B * T, C), H, p.lnx_w, p.lnx_b, eps=64e-5).view(B, T, C)
        bonus = ((r * k).view(shp) * p.r_k).sum(dim=-1, keepdim=True) * v.view(shp)   # [B, T, H, N]
        y = y + bonus.view(B, T, C)
        return x + p.W_o(y * g), v_first

    def _channel_mix(self, p: _Layer, x, state: State, new: State, i: int):
        B, T, C = x.shape
        f = F.layer_norm(x, (C,), p.ln2_w, p.ln2_b)
        prev = torch.cat([state.ffn_x[i][:, None], f[:, :-1]], dim=1) if T > 1 else state.ffn_x[i][:, None]
        new.ffn_x.append(f[:, -1].clone(memory_format=torch.contiguous_format))   # own storage, not a view of f
        kx = torch.addcmul(f, prev - f, p.ffn_x_k)
        hidden = torch.relu_(p.ffn_K(kx))                                          # [B, T, F]
        return x + p.ffn_V(hidden.mul_(hidden))                                    # relu(.)^2


def load_model(path, device="cpu", dtype=None, use_kernel: bool = True) -> RWKV7:
    """Load an official RWKV-7 ``.pth`` checkpoint (suffix optional) onto ``device``.

    Raises CheckpointError (one line naming the file) for an unusable file only: a
    missing tensor, a tensor of the wrong shape or size, a bad trimmed vocabulary.
    What is not the file's fault keeps its kind: out of memory re-raised as is (the
    caller's memory policy), an option error (dtype) as ValueError, and any other
    failure to build the model on ``device`` (no CUDA, "no kernel image is available"
    for this GPU, a driver error) as a one-line RuntimeError saying so.
    """
    import re

    from .errors import is_out_of_memory, one_line
    from .tokenizer import TokenizerError

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA/ROCm GPU is available to torch")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' requested but torch has no usable MPS backend here")
    p, sd, shape, world_ids = load_checkpoint(path)
    try:
        return RWKV7(sd, shape, device=dev, dtype=dtype, world_ids=world_ids, path=p,
                     use_kernel=use_kernel)
    except CheckpointError:
        raise
    except KeyError as e:               # a tensor infer_shape did not ask for
        raise CheckpointError(f"{p}: not a complete RWKV-7 (x070) checkpoint: missing "
                              f"{one_line(e.args[0] if e.args else e, 160)!r}") from None
    except TokenizerError as e:
        if world_ids is None:           # the shipped vocabulary, not this file
            raise
        raise CheckpointError(f"{p}: unusable trimmed vocabulary ({one_line(e, 160)})") from None
    except RuntimeError as e:
        if is_out_of_memory(e):
            raise
        cause = one_line(e)
        # torch's words for tensors that do not fit together ("shape '[128]' is invalid
        # for input of size 256", "size of tensor a (64) must match ...", "Given
        # normalized_shape=[128], expected input with shape ..."), unless the device
        # speaks (a CUDA/HIP error message may mention sizes too)
        device_words = re.search(r"\b(CUDA|HIP|ROCm|cuDNN|cuBLAS|CUBLAS|NCCL|MPS|XPU|driver|device)\b"
                                 r"|kernel image", cause, re.IGNORECASE)
        shape_words = re.search(r"\bshapes?\b|\bsize\b|must match|mismatch|cannot be multiplied"
                                r"|normalized_shape", cause)
        if shape_words and not device_words:
            raise CheckpointError(f"{p}: cannot build the model ({one_line(e, 160)})") from None
        raise RuntimeError(f"could not put the model {p.name} on {dev}: {cause}") from e
