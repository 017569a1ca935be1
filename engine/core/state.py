"""Recurrent state of an RWKV-7 model: the whole "KV cache", fixed size per row.

Per layer l (lists of length n_layer):
    att_x[l]  [B, C]            token-shift of the time-mix block (model dtype)
    wkv[l]    [B, H, 64, 64]    WKV state, fp32, S[value i, key j]
    ffn_x[l]  [B, C]            token-shift of the channel-mix block (model dtype)
A state is a value: ``RWKV7.forward`` returns a new one and never mutates its input,
so states can be cached, forked and shared freely.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch


@dataclass
class State:
    att_x: List[torch.Tensor]   # L x [B, C]
    wkv: List[torch.Tensor]     # L x [B, H, 64, 64] fp32
    ffn_x: List[torch.Tensor]   # L x [B, C]

    @classmethod
    def zeros(cls, n_layer: int, batch: int, n_embd: int, n_head: int, head_size: int,
              dtype: torch.dtype, device) -> "State":
        def shift():
            return torch.zeros(batch, n_embd, dtype=dtype, device=device)
        return cls(
            att_x=[shift() for _ in range(n_layer)],
            wkv=[torch.zeros(batch, n_head, head_size, head_size, dtype=torch.float32, device=device)
                 for _ in range(n_layer)],
            ffn_x=[shift() for _ in range(n_layer)],
        )

    # -- shape ---------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.att_x[0].shape[0]

    @property
    def n_layer(self) -> int:
        return len(self.att_x)

    @property
    def device(self) -> torch.device:
        return self.wkv[0].device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> List[torch.Tensor]:
        return [*self.att_x, *self.wkv, *self.ffn_x]

    # -- value operations (each returns a new State) -------------------------
    def _map(self, fn) -> "State":
        return State([fn(t) for t in self.att_x], [fn(t) for t in self.wkv], [fn(t) for t in self.ffn_x])

    def copy(self) -> "State":
        return self._map(lambda t: t.clone())

    def fork(self, n: int, row: int = 0) -> "State":
        """Row ``row`` repeated ``n`` times: N candidates from one prefilled prompt."""
        return self._map(lambda t: t[row:row + 1].expand(n, *t.shape[1:]).contiguous())

    def select(self, rows: Sequence[int]) -> "State":
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        return self._map(lambda t: t.index_select(0, idx))

    def row(self, i: int) -> "State":
        return self._map(lambda t: t[i:i + 1].clone())

    def to(self, device=None, non_blocking: bool = False) -> "State":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    @staticmethod
    def cat(states: Sequence["State"]) -> "State":
        L = states[0].n_layer
        return State([torch.cat([s.att_x[l] for s in states]) for l in range(L)],
                     [torch.cat([s.wkv[l] for s in states]) for l in range(L)],
                     [torch.cat([s.ffn_x[l] for s in states]) for l in range(L)])

    def equal(self, other: "State") -> bool:
        return all(torch.equal(a, b) for a, b in zip(self.tensors(), other.tensors()))

    # -- serialisation (disk cache) -----------------------------------------
    def to_dict(self) -> dict:
        return {"att_x": torch.stack(self.att_x).cpu(), "wkv": torch.stack(self.wkv).cpu(),
                "ffn_x": torch.stack(self.ffn_x).cpu()}

    @classmethod
    def from_dict(cls, d: dict, device=None) -> "State":
        return cls(list(d["att_x"].to(device).unbind(0)), list(d["wkv"].to(device).unbind(0)),
                   list(d["ffn_x"].to(device).unbind(0)))
