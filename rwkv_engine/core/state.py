"""Recurrent state of an RWKV-7 model: the whole "KV cache", fixed size per row.

Per layer l (lists of length n_layer):
    att_x[l]  [B, C]            token-shift of the time-mix block (model dtype)
    wkv[l]    [B, H, 64, 64]    WKV state, fp32, S[value i, key j]
    ffn_x[l]  [B, C]            token-shift of the channel-mix block (model dtype)
A state is a value: ``RWKV7.forward`` returns a new one and never mutates its input,
so states can be cached, forked and shared freely.

Memory: every tensor of a state owns compact storage (never a view into a larger
activation buffer), and ``nbytes`` counts the storage really held (each distinct
storage once, whole), so a view could never be under-counted by the state cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch


def storages(tensors: Iterable[Optional[torch.Tensor]]) -> Dict[tuple, int]:
    """The distinct storages behind ``tensors``: {(device, address): bytes of the whole
    storage}. Keeping the tensors alive keeps exactly these bytes alive (views of a
    larger buffer hold all of it). None entries are skipped."""
    seen: Dict[tuple, int] = {}
    for t in tensors:
        if t is None:
            continue
        try:
            st = t.untyped_storage()
            key, n = (str(st.device), st.data_ptr()), st.nbytes()
        except (RuntimeError, NotImplementedError):     # no real storage (e.g. meta tensors)
            key, n = ("tensor", id(t)), t.numel() * t.element_size()
        if n:
            seen[key] = max(seen.get(key, 0), n)
    return seen


def storage_bytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (each counted once, whole)."""
    return sum(storages(tensors).values())


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it owns exactly its storage, else a compact copy (a view of a
    larger buffer would keep the whole buffer alive)."""
    try:
        if t.is_contiguous() and t.storage_offset() == 0 \
                and t.untyped_storage().nbytes() == t.numel() * t.element_size():
            return t
    except (RuntimeError, NotImplementedError):
        return t
    return t.clone(memory_format=torch.contiguous_format)


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
        """Storage held by this state (distinct storages, whole): never less than the
        bytes really kept alive by caching it."""
        return storage_bytes(self.tensors())

    def tensors(self) -> List[torch.Tensor]:
        return [*self.att_x, *self.wkv, *self.ffn_x]

    # -- value operations (each returns a new State) -------------------------
    def _map(self, fn) -> "State":
        return State([fn(t) for t in self.att_x], [fn(t) for t in self.wkv], [fn(t) for t in self.ffn_x])

    def compact(self) -> "State":
        """This state with every tensor owning compact storage (copies only the views)."""
        return self._map(compact)

    def copy(self) -> "State":
        return self._map(lambda t: t.clone(memory_format=torch.contiguous_format))

    def fork(self, n: int, row: int = 0) -> "State":
        """Row ``row`` repeated ``n`` times: N candidates from one prefilled prompt."""
        # clone, not .contiguous(): for n = 1 that would return a view of the whole batch
        return self._map(lambda t: t[row:row + 1].expand(n, *t.shape[1:]).clone(
            memory_format=torch.contiguous_format))

    def select(self, rows: Sequence[int]) -> "State":
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        return self._map(lambda t: t.index_select(0, idx))

    def to(self, device=None, non_blocking: bool = False) -> "State":
        return self._map(lambda t: compact(t.to(device, non_blocking=non_blocking)))

    def equal(self, other: "State") -> bool:
        return all(torch.equal(a, b) for a, b in zip(self.tensors(), other.tensors()))

    # -- serialisation (disk cache) -----------------------------------------
    def to_dict(self) -> dict:
        return {"att_x": torch.stack(self.att_x).cpu(), "wkv": torch.stack(self.wkv).cpu(),
                "ffn_x": torch.stack(self.ffn_x).cpu()}

    @classmethod
    def from_dict(cls, d: dict, device=None) -> "State":
        def layers(t):   # one compact tensor per layer, not views of the stacked tensor
            return [compact(x) for x in t.to(device).unbind(0)]
        return cls(layers(d["att_x"]), layers(d["wkv"]), layers(d["ffn_x"]))
