"""RWKV-7 ("x070") model for training, with the official parameter names and shapes.

The state_dict of ``RWKV7Train`` is an official RWKV-7 checkpoint layout (emb.weight,
blocks.N.ln0/ln1/ln2, blocks.N.att.*, blocks.N.ffn.*, ln_out.*, head.weight), so
``export_checkpoint`` only casts it (bf16/fp16) and adds ``vocab.world_ids``.
Initialisation follows BlinkDL/RWKV-LM RWKV-v7 train_temp; the sequence mixer is
the CPU WKV kernel of ``train_wkv_kernel`` (zero initial state per row).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from train_wkv_kernel import HEAD_SIZE, wkv7_train


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_embd: int = 256
    vocab_size: int = 4096
    head_size: int = HEAD_SIZE

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def lora_dims(self) -> dict:
        """LoRA widths, as in official checkpoints of this width."""
        d = self.n_embd
        return {
            "w": max(32, int(round(1.8 * math.sqrt(d) / 32)) * 32),
            "a": max(32, int(round(1.8 * math.sqrt(d) / 32)) * 32),
            "v": max(32, int(round(1.3 * math.sqrt(d) / 32)) * 32),
            "g": max(32, int(round(0.6 * d ** 0.8 / 32)) * 32),
        }

    def to_dict(self) -> dict:
        return asdict(self)


def _ortho(shape, scale: float) -> torch.Tensor:
    x = torch.empty(shape)
    gain = math.sqrt(shape[0] / shape[1]) if shape[0] > shape[1] else 1.0
    nn.init.orthogonal_(x, gain=gain * scale)
    return x


def _time_shift(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, C] -> previous token's x (zeros at t = 0)."""
    return F.pad(x, (0, 0, 1, -1))


class TimeMix(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer_id, self.n_head = layer_id, H
        ratio_0_to_1 = layer_id / max(1, cfg.n_layer - 1)
        ratio_1_to_0 = 1.0 - layer_id / cfg.n_layer
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        n = torch.arange(C, dtype=torch.float32)
        linear = n / (C - 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / (C - 1)) ** (1 + ratio_0_to_1 ** 0.3)
        dims = cfg.lora_dims()

        self.x_r = nn.Parameter(1.0 - ddd ** (0.2 * ratio_1_to_0))
        self.x_w = nn.Parameter(1.0 - ddd ** (0.9 * ratio_1_to_0))
        self.x_k = nn.Parameter(1.0 - ddd ** (0.7 * ratio_1_to_0))
        self.x_v = nn.Parameter(1.0 - ddd ** (0.7 * ratio_1_to_0))
        self.x_a = nn.Parameter(1.0 - ddd ** (0.9 * ratio_1_to_0))
        self.x_g = nn.Parameter(1.0 - ddd ** (0.2 * ratio_1_to_0))
        self.w0 = nn.Parameter((www + 0.5 + zigzag * 2.5).view(1, 1, C))
        self.w1 = nn.Parameter(torch.zeros(C, dims["w"]))
        self.w2 = nn.Parameter(_ortho((dims["w"], C), 0.1))
        self.a0 = nn.Parameter((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
        self.a1 = nn.Parameter(torch.zeros(C, dims["a"]))
        self.a2 = nn.Parameter(_ortho((dims["a"], C), 0.1))
        self.v0 = nn.Parameter((0.73 - linear * 0.4).view(1, 1, C))
        self.v1 = nn.Parameter(torch.zeros(C, dims["v"]))
        self.v2 = nn.Parameter(_ortho((dims["v"], C), 0.1))
        self.g1 = nn.Parameter(torch.zeros(C, dims["g"]))
        self.g2 = nn.Parameter(_ortho((dims["g"], C), 0.1))
        self.k_k = nn.Parameter((0.71 - linear * 0.1).view(1, 1, C))
        self.k_a = nn.Parameter(torch.full((1, 1, C), 1.02))
        self.r_k = nn.Parameter(torch.full((H, N), -0.04))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)
        with torch.no_grad():
            self.receptance.weight.uniform_(-0.5 / C ** 0.5, 0.5 / C ** 0.5)
            self.key.weight.uniform_(-0.05 / C ** 0.5, 0.05 / C ** 0.5)
            self.value.weight.uniform_(-0.5 / C ** 0.5, 0.5 / C ** 0.5)
            self.output.weight.zero_()

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None, use_kernel: bool = True):
        B, T, C = x.shape                                                   # x [B, T, C]
        H = self.n_head
        xx = _time_shift(x) - x
        xr, xw, xk = x + xx * self.x_r, x + xx * self.x_w, x + xx * self.x_k
        xv, xa, xg = x + xx * self.x_v, x + xx * self.x_a, x + xx * self.x_g
        r = self.receptance(xr)
        # log(-log decay) in fp32 also under bf16 autocast: a decay near 1 needs more than 8 bits
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2).float()) - 0.5
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, -1), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)
        decay = torch.exp(-torch.exp(w))                                    # [B, T, C] in (0.545, 1)
        shp = (B, T, H, -1)
        y = wkv7_train(decay.view(shp), r.view(shp), k.view(shp), v.view(shp),
                       (-kk).view(shp), (kk * a).view(shp), use_kernel=use_kernel).reshape(B, T, C)
        y = self.ln_x(y.view(B * T, C)).view(B, T, C)
        y = y + ((r.view(shp) * k.view(shp) * self.r_k).sum(-1, keepdim=True) * v.view(shp)).view(B, T, C)
        return self.output(y * g), v_first


class ChannelMix(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        ratio_1_to_0 = 1.0 - layer_id / cfg.n_layer
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        self.x_k = nn.Parameter(1.0 - ddd ** (ratio_1_to_0 ** 4))
        self.key = nn.Linear(C, 4 * C, bias=False)
        self.value = nn.Linear(4 * C, C, bias=False)
        with torch.no_grad():
            self.key.weight.uniform_(-0.5 / C ** 0.5, 0.5 / C ** 0.5)
            self.value.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x + (_time_shift(x) - x) * self.x_k
        return self.value(torch.relu(self.key(k)) ** 2)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x, v_first, use_kernel: bool = True):
        if hasattr(self, "ln0"):
            x = self.ln0(x)
        dx, v_first = self.att(self.ln1(x), v_first, use_kernel)
        x = x + dx
        return x + self.ffn(self.ln2(x)), v_first


class RWKV7Train(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        with torch.no_grad():
            self.emb.weight.uniform_(-1e-4, 1e-4)
            scale = 0.5 * math.sqrt(cfg.vocab_size / cfg.n_embd) if cfg.vocab_size > cfg.n_embd else 0.5
            nn.init.orthogonal_(self.head.weight, gain=scale)

    def forward(self, tokens: torch.Tensor, use_kernel: bool = True) -> torch.Tensor:
        """tokens [B, T] int64 -> logits [B, T, V] fp32, from a zero state."""
        x = self.emb(tokens)
        v_first = None
        for block in self.blocks:
            x, v_first = block(x, v_first, use_kernel)
        return self.head(self.ln_out(x))

    def param_groups(self, weight_decay: float) -> list:
        """AdamW groups: weight decay on the big matrices only (as in official training)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            big = p.dim() == 2 and name.endswith(".weight") and ("ln" not in name)
            (decay if big else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def export_state_dict(model: RWKV7Train, world_ids: torch.Tensor, dtype=torch.bfloat16) -> dict:
    """Official-layout checkpoint dict: weights cast to ``dtype`` plus ``vocab.world_ids`` int64 [V]."""
    if world_ids.shape != (model.cfg.vocab_size,):
        raise ValueError(f"world_ids has shape {tuple(world_ids.shape)}, expected ({model.cfg.vocab_size},)")
    sd = {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}
    sd["vocab.world_ids"] = world_ids.to(torch.int64).clone()
    return sd


def load_exported(path: str) -> tuple[RWKV7Train, torch.Tensor]:
    """Rebuild an fp32 RWKV7Train from an exported checkpoint; returns (model, world_ids)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    world_ids = sd.pop("vocab.world_ids")
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    V, C = sd["emb.weight"].shape
    model = RWKV7Train(ModelConfig(n_layer=n_layer, n_embd=C, vocab_size=V))
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model, world_ids
