"""Tiered cache of recurrent-state snapshots keyed by a hash chain over token segments.

A snapshot is the state after a prompt prefix (batch 1) plus the logits of its last
position, so a fully cached prompt needs no forward call at all. Keys:

    root  = H("rwkv-state" | STATE_FORMAT | engine version | model_id)
    key_i = H(key_{i-1} | tokens of segment i)          (segment boundary)
    partial key inside segment i = H(key_{i-1} | tokens[:p])   (same function)

so the key of a prefix names the model, the engine that computed the state and every
token before it: a snapshot written by an engine that computed differently (another
``STATE_FORMAT`` or ``rwkv_engine.__version__``) is never found. Tiers:
device LRU (the model's device) -> host RAM LRU (``State.to("cpu")``) -> disk
(only snapshots put with ``persist=True``: the global-context/chunk checkpoints).
Each tier has a byte budget, counted in the storage really held (``State.nbytes``:
distinct storages, whole, so a view is never under-counted); the least recently used
entry is demoted (device -> host) or dropped (host) when a budget is exceeded. Disk files live in
``<cache_dir>/states`` (dirs 0700, files 0600), are written atomically
(temp file + rename), carry a digest so a corrupt file is detected, deleted and
treated as a miss, and round-trip tensors bit-exactly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import __version__ as _PACKAGE_VERSION
from ..core.private_fs import make_private_dir
from ..core.state import State, compact, storage_bytes, storages

log = logging.getLogger("rwkv_engine")

_MAGIC = b"RWKVST01"
_SUFFIX = ".rwst"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TIERS = ("device", "host", "disk")

# Bump STATE_FORMAT whenever the model's computation (numerics of forward, state
# layout) or the snapshot layout changes: it is part of every key, so states computed
# by an older engine are never reused. The package version is part of the key too.
STATE_FORMAT = 2
ENGINE_VERSION = _PACKAGE_VERSION


# -- keys ---------------------------------------------------------------------------
def _tok_bytes(tokens: Sequence[int]) -> bytes:
    return array("i", tokens).tobytes()


def engine_tag() -> str:
    """What computed a state: the state format and the engine version (read at call time)."""
    return f"format {STATE_FORMAT}|engine {ENGINE_VERSION}"


def root_key(model_id: str) -> str:
    head = f"rwkv-state|{engine_tag()}|".encode("utf-8")
    return hashlib.blake2b(head + model_id.encode("utf-8"), digest_size=16).hexdigest()


def chain_key(parent: str, tokens: Sequence[int]) -> str:
    h = hashlib.blake2b(parent.encode("ascii") + b"|", digest_size=16)
    h.update(_tok_bytes(tokens))
    return h.hexdigest()


def partial_keys(parent: str, tokens: Sequence[int]) -> List[str]:
    """Keys of tokens[:1], tokens[:2], ... tokens[:n] under ``parent`` (incremental)."""
    h = hashlib.blake2b(parent.encode("ascii") + b"|", digest_size=16)
    out = []
    for t in tokens:
        h.update(_tok_bytes((t,)))
        out.append(h.copy().hexdigest())
    return out


# -- snapshots ------------------------------------------------------------------------
@dataclass
class Snapshot:
    state: State                       # batch 1
    logits: Optional[torch.Tensor]     # [1, V] fp32 of the last position
    n_tokens: int                      # prompt tokens this state has seen

    def tensors(self) -> List[torch.Tensor]:
        return self.state.tensors() + ([] if self.logits is None else [self.logits])

    def storages(self) -> Dict[tuple, int]:
        return storages(self.tensors())

    @property
    def nbytes(self) -> int:
        """Bytes really held: distinct storages of the state and the logits, whole."""
        return storage_bytes(self.tensors())

    def compact(self) -> "Snapshot":
        """This snapshot with every tensor owning compact storage (copies only views)."""
        return Snapshot(self.state.compact(), None if self.logits is None else compact(self.logits),
                        self.n_tokens)

    def to(self, device) -> "Snapshot":
        return Snapshot(self.state.to(device),
                        None if self.logits is None else compact(self.logits.to(device)), self.n_tokens)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def encode_snapshot(key: str, model_id: str, snap: Snapshot) -> bytes:
    tensors = dict(snap.state.to_dict())
    if snap.logits is not None:
        tensors["logits"] = snap.logits
    metas, blobs = [], []
    for name, t in tensors.items():
        b = _tensor_bytes(t)
        metas.append({"name": name, "dtype": str(t.dtype).replace("torch.", ""),
                      "shape": list(t.shape), "nbytes": len(b)})
        blobs.append(b)
    data = b"".join(blobs)
    header = json.dumps({"key": key, "model_id": model_id, "engine": engine_tag(),
                         "n_tokens": snap.n_tokens, "tensors": metas,
                         "digest": hashlib.blake2b(data, digest_size=16).hexdigest()}).encode("utf-8")
    return _MAGIC + struct.pack("<I", len(header)) + header + data


def decode_snapshot(raw: bytes, key: str, model_id: str, device) -> Snapshot:
    """Parse a snapshot file; ValueError for anything wrong with it."""
    if raw[:8] != _MAGIC or len(raw) < 12:
        raise ValueError("not a state snapshot")
    (hlen,) = struct.unpack("<I", raw[8:12])
    header = json.loads(raw[12:12 + hlen].decode("utf-8"))
    data = raw[12 + hlen:]
    if header.get("key") != key or header.get("model_id") != model_id:
        raise ValueError("snapshot key or model does not match")
    if header.get("engine") != engine_tag():
        raise ValueError("snapshot written by another engine version")
    if hashlib.blake2b(data, digest_size=16).hexdigest() != header.get("digest"):
        raise ValueError("snapshot digest mismatch")
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    tensors, off = {}, 0
    for m in header["tensors"]:
        n = int(m["nbytes"])
        # a copy with its own storage: a view would keep the whole file buffer alive
        t = buf[off:off + n].view(_DTYPES[m["dtype"]]).reshape(m["shape"])
        tensors[m["name"]] = t.clone(memory_format=torch.contiguous_format)
        off += n
    if off != len(data):
        raise ValueError("snapshot length mismatch")
    logits = tensors.pop("logits", None)
    state = State.from_dict(tensors, device=device)
    return Snapshot(state, None if logits is None else compact(logits.to(device)), int(header["n_tokens"]))


# -- tiers ---------------------------------------------------------------------------
class _LRU:
    """Entries oldest first. ``bytes`` (what the budget limits) adds up each entry's
    ``Snapshot.nbytes``, so storage shared by two entries counts twice: never less than
    ``storage_bytes``, the distinct storages the tier really holds (kept for stats)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.items: "OrderedDict[str, Tuple[Snapshot, bool]]" = OrderedDict()   # key -> (snap, persist)
        self.bytes = 0
        self._held: Dict[str, Dict[tuple, int]] = {}          # key -> the entry's storages
        self._refs: Dict[tuple, List[int]] = {}               # storage -> [entries using it, bytes]
        self.storage_bytes = 0

    def pop(self, key: str):
        item = self.items.pop(key, None)
        if item is not None:
            held = self._held.pop(key)
            self.bytes -= sum(held.values())
            for sk in held:
                ref = self._refs[sk]
                ref[0] -= 1
                if ref[0] == 0:
                    del self._refs[sk]
                    self.storage_bytes -= ref[1]
        return item

    def popitem(self):
        """Remove and return the least recently used (key, (snap, persist))."""
        key = next(iter(self.items))
        return key, self.pop(key)

    def push(self, key: str, snap: Snapshot, persist: bool) -> None:
        self.pop(key)
        held = snap.storages()
        self.items[key] = (snap, persist)
        self._held[key] = held
        self.bytes += sum(held.values())
        for sk, n in held.items():
            ref = self._refs.get(sk)
            if ref is None:
                self._refs[sk] = [1, n]
                self.storage_bytes += n
            else:
                ref[0] += 1

    def over(self) -> bool:
        return self.bytes > self.budget and bool(self.items)


class DiskTier:
    """Snapshot files under ``root`` (0700), one file per key (0600), LRU by mtime."""

    def __init__(self, root: Path, budget: int, model_id: str):
        self.root = Path(root)
        self.budget = budget
        self.model_id = model_id
        self.index: "OrderedDict[str, int]" = OrderedDict()     # key -> file size, oldest first
        self.bytes = 0
        self.enabled = budget > 0
        if self.enabled:
            try:
                make_private_dir(self.root)
                self._scan()
            except OSError as e:
                log.warning("state cache: disk tier disabled (%s)", e)
                self.enabled = False

    def _scan(self) -> None:
        found = []
        for p in self.root.glob("*" + _SUFFIX):
            try:
                st = p.stat()
            except OSError:
                continue
            if p.name.startswith("."):            # a temp file: another writer's, or a crash's
                if time.time() - st.st_mtime > 600:
                    _unlink(p)
                continue
            found.append((st.st_mtime, p.stem, st.st_size))
        for _, key, size in sorted(found):
            self.index[key] = size
            self.bytes += size

    def path(self, key: str) -> Path:
        return self.root / (key + _SUFFIX)

    def __contains__(self, key: str) -> bool:
        return self.enabled and key in self.index

    def write(self, key: str, snap: Snapshot) -> None:
        if not self.enabled or key in self.index:
            return
        raw = encode_snapshot(key, self.model_id, snap)
        if len(raw) > self.budget:
            return
        try:
            fd, tmp = tempfile.mkstemp(dir=str(self.root), prefix=".tmp-", suffix=_SUFFIX)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(raw)
                os.chmod(tmp, 0o600)
                os.replace(tmp, self.path(key))
            except BaseException:
                _unlink(Path(tmp))
                raise
        except OSError as e:
            log.warning("state cache: cannot write %s (%s)", self.path(key), e)
            return
        self.index[key] = len(raw)
        self.bytes += len(raw)
        while self.bytes > self.budget and self.index:
            old, size = self.index.popitem(last=False)
            self.bytes -= size
            _unlink(self.path(old))

    def read(self, key: str, device) -> Optional[Snapshot]:
        if key not in self:
            return None
        p = self.path(key)
        try:
            raw = p.read_bytes()
            snap = decode_snapshot(raw, key, self.model_id, device)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, UnicodeDecodeError) as e:
            log.warning("state cache: dropping unreadable %s (%s)", p, e)
            self.forget(key)
            _unlink(p)
            return None
        try:
            os.utime(p)
        except OSError:
            pass
        self.index.move_to_end(key)
        return snap

    def forget(self, key: str) -> None:
        size = self.index.pop(key, None)
        if size is not None:
            self.bytes -= size


class StateCache:
    """device LRU -> host LRU -> disk; ``get`` promotes a hit back to the device tier."""

    def __init__(self, model_id: str, device="cpu", device_bytes: int = 512 << 20,
                 host_bytes: int = 1024 << 20, disk_bytes: int = 0, disk_dir: Optional[Path] = None):
        self.model_id = model_id
        self.root = root_key(model_id)
        self.device = torch.device(device)
        self.dev = _LRU(device_bytes)
        self.host = _LRU(host_bytes)
        self.disk = DiskTier(Path(disk_dir), disk_bytes, model_id) if disk_dir is not None else None
        self.hits: Dict[str, int] = {"device": 0, "host": 0, "disk": 0, "miss": 0}

    @classmethod
    def from_config(cls, config, model_id: str, device) -> "StateCache":
        disk_dir = config.resolved_cache_dir() / "states" if config.cache_disk_mb > 0 else None
        return cls(model_id, device, config.cache_device_mb << 20, config.cache_host_mb << 20,
                   config.cache_disk_mb << 20, disk_dir)

    def tier_of(self, key: str) -> Optional[str]:
        if key in self.dev.items:
            return "device"
        if key in self.host.items:
            return "host"
        if self.disk is not None and key in self.disk:
            return "disk"
        return None

    def get(self, key: str) -> Optional[Tuple[Snapshot, str]]:
        """The snapshot for ``key`` on the model's device and the tier it came from."""
        tier = self.tier_of(key)
        snap, persist = None, False
        if tier == "device":
            snap, persist = self.dev.items[key]
            self.dev.items.move_to_end(key)
            return snap, tier
        if tier == "host":
            snap, persist = self.host.pop(key)
            snap = snap.to(self.device)
        elif tier == "disk":
            snap, persist = self.disk.read(key, self.device), True
            if snap is None:
                return None
        else:
            return None
        self._push_device(key, snap, persist)
        return snap, tier

    def put(self, key: str, snap: Snapshot, persist: bool = False) -> None:
        """Store a batch-1 snapshot; ``persist`` also writes it to the disk tier. Tensors
        that are views of larger buffers are copied first (only what the state needs
        stays alive)."""
        if snap.state.batch != 1:
            raise ValueError("the state cache stores batch-1 states")
        snap = snap.compact()
        self.host.pop(key)
        self._push_device(key, snap, persist)
        if persist and self.disk is not None:
            self.disk.write(key, snap)

    def _push_device(self, key: str, snap: Snapshot, persist: bool) -> None:
        self.dev.push(key, snap, persist)
        while self.dev.over():
            old, (s, p) = self.dev.popitem()
            if self.host.budget > 0:
                self.host.push(old, s.to("cpu"), p)
        while self.host.over():
            self.host.popitem()

    def count_hit(self, tier: Optional[str]) -> None:
        self.hits[tier or "miss"] += 1

    def clear_memory(self) -> None:
        self.dev = _LRU(self.dev.budget)
        self.host = _LRU(self.host.budget)

    def stats(self) -> dict:
        disk = self.disk
        return {
            "device": {"bytes": self.dev.bytes, "storage_bytes": self.dev.storage_bytes,
                       "entries": len(self.dev.items), "budget": self.dev.budget},
            "host": {"bytes": self.host.bytes, "storage_bytes": self.host.storage_bytes,
                     "entries": len(self.host.items), "budget": self.host.budget},
            "disk": {"bytes": disk.bytes if disk else 0, "entries": len(disk.index) if disk else 0,
                     "budget": disk.budget if disk else 0,
                     "dir": str(disk.root) if disk else None},
            "hits": dict(self.hits),
        }


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass
