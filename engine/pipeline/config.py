"""Typed configuration of the completion engine (``EngineConfig``).

The Neovim plugin passes the user's ``setup({engine = {...}})`` table through
``EngineConfig.from_dict``; unknown keys and out-of-range values raise ValueError
with a one-line message naming the option. No torch import here.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

_DEVICES = ("auto", "cpu", "cuda")
_DTYPES = ("auto", "fp16", "bf16", "fp32", "int8")


@dataclass
class EngineConfig:
    # model
    model: Optional[str] = None          # None = engine/data/default-model.pth; a path; or a short name
    device: str = "auto"                 # "auto" | "cpu" | "cuda"
    dtype: str = "auto"                  # "auto" | "fp16" | "bf16" | "fp32"
    threads: int = 0                     # torch CPU threads; 0 = auto (1 for small models)
    download_dir: Optional[str] = None   # where `download` put models (None = the Hugging Face cache)
    # candidates and sampling
    candidates: int = 4                  # rows decoded in one batch (1..16)
    max_tokens: int = 64                 # per candidate
    max_lines: int = 8                   # per candidate (the rest of the cursor line counts as one)
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    alpha_presence: float = 0.0
    alpha_frequency: float = 0.2
    alpha_decay: float = 0.996
    seed: int = 0                        # row i samples with seed + i
    stop: List[str] = field(default_factory=list)   # extra stop strings
    time_budget_ms: int = 1000           # decode time budget per request
    # local context (lines around the cursor)
    n_prefix: int = 256                  # lines above the cursor
    n_suffix: int = 64                   # lines below the cursor
    near_prefix: int = 24                # lines above the cursor inside the FIM window (at least)
    near_suffix: int = 8                 # lines below the cursor inside the FIM window
    max_line_suffix: int = 8             # plugin: no auto-trigger with more text right of the cursor
    max_line_bytes: int = 1024           # longer lines are cut (minified code, data files)
    # extra context ring (llama.vim semantics)
    ring_n_chunks: int = 16
    ring_chunk_size: int = 64            # lines per chunk
    ring_queue: int = 16                 # pending chunks waiting for an idle moment
    # state cache
    cache_device_mb: int = 512
    cache_host_mb: int = 1024
    cache_disk_mb: int = 2048
    cache_dir: Optional[str] = None      # None = $XDG_CACHE_HOME/rwkv.nvim or ~/.cache/rwkv.nvim
    # prefill scheduling
    prefill_chunk: int = 64              # tokens per forward call during prefill (cancel granularity)
    tail_checkpoints: int = 4            # checkpoints kept at the last token positions of a prompt

    # -- construction ---------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "EngineConfig":
        """Build from a plain dict (e.g. from Lua); unknown keys are an error."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names)
        if unknown:
            raise ValueError(f"unknown engine option {unknown[0]!r} (known: {', '.join(sorted(names))})")
        for f in dataclasses.fields(cls):
            if f.name in d and d[f.name] is not None:
                d[f.name] = _coerce(f.name, f.type, d[f.name])
        return cls(**d)

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __post_init__(self):
        # the FIM window is part of the local window: shrinking n_prefix/n_suffix alone
        # shrinks the near window with it instead of failing
        if isinstance(self.n_prefix, int) and isinstance(self.near_prefix, int) and self.n_prefix >= 0:
            self.near_prefix = min(self.near_prefix, self.n_prefix)
        if isinstance(self.n_suffix, int) and isinstance(self.near_suffix, int) and self.n_suffix >= 0:
            self.near_suffix = min(self.near_suffix, self.n_suffix)
        self.validate()

    def validate(self) -> None:
        def check(name, ok, what):
            if not ok:
                raise ValueError(f"engine option {name} = {getattr(self, name)!r}: {what}")

        check("device", self.device in _DEVICES, f"must be one of {', '.join(_DEVICES)}")
        check("dtype", self.dtype in _DTYPES, f"must be one of {', '.join(_DTYPES)}")
        check("model", self.model is None or (isinstance(self.model, str) and self.model.strip() != ""),
              "must be a path, a model name, or nil for the default model")
        check("candidates", 1 <= self.candidates <= 16, "must be in 1..16")
        check("max_tokens", 1 <= self.max_tokens <= 4096, "must be in 1..4096")
        check("max_lines", 1 <= self.max_lines <= 1000, "must be in 1..1000")
        check("temperature", 0.0 <= self.temperature <= 10.0, "must be in 0..10 (0 = greedy)")
        check("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]")
        check("top_k", self.top_k >= 0, "must be >= 0 (0 = off)")
        check("alpha_decay", 0.0 <= self.alpha_decay <= 1.0, "must be in 0..1")
        check("stop", isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
              "must be a list of non-empty strings")
        check("time_budget_ms", self.time_budget_ms >= 1, "must be >= 1")
        check("n_prefix", self.n_prefix >= 0, "must be >= 0")
        check("n_suffix", self.n_suffix >= 0, "must be >= 0")
        check("near_prefix", 0 <= self.near_prefix <= self.n_prefix, "must be in 0..n_prefix")
        check("near_suffix", 0 <= self.near_suffix <= self.n_suffix, "must be in 0..n_suffix")
        check("max_line_suffix", self.max_line_suffix >= 0, "must be >= 0")
        check("max_line_bytes", 64 <= self.max_line_bytes <= 1 << 20, "must be in 64..1048576")
        check("ring_n_chunks", self.ring_n_chunks >= 0, "must be >= 0 (0 = no extra context)")
        check("ring_chunk_size", self.ring_chunk_size >= 3, "must be >= 3 lines")
        check("ring_queue", self.ring_queue >= 1, "must be >= 1")
        check("cache_device_mb", self.cache_device_mb >= 0, "must be >= 0")
        check("cache_host_mb", self.cache_host_mb >= 0, "must be >= 0")
        check("cache_disk_mb", self.cache_disk_mb >= 0, "must be >= 0 (0 = no disk cache)")
        check("prefill_chunk", 1 <= self.prefill_chunk <= 4096, "must be in 1..4096")
        check("threads", 0 <= self.threads <= 256, "must be in 0..256 (0 = auto)")
        check("tail_checkpoints", 0 <= self.tail_checkpoints <= 16, "must be in 0..16")

    # -- derived --------------------------------------------------------------
    def resolved_cache_dir(self) -> Path:
        """Cache root: ``cache_dir`` or $XDG_CACHE_HOME/rwkv.nvim or ~/.cache/rwkv.nvim."""
        if self.cache_dir:
            return Path(os.path.expanduser(self.cache_dir))
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) if xdg else Path.home() / ".cache"
        return base / "rwkv.nvim"

    def sampling_dict(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "alpha_presence": self.alpha_presence, "alpha_frequency": self.alpha_frequency,
                "alpha_decay": self.alpha_decay}


def _coerce(name: str, type_name, value):
    """Lua numbers arrive as float or int, lists as lists; coerce and reject the wrong kind."""
    t = str(type_name)
    if t == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ValueError(f"engine option {name} = {value!r}: must be an integer")
        return int(value)
    if t == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"engine option {name} = {value!r}: must be a number")
        return float(value)
    if t in ("str", "Optional[str]"):
        if not isinstance(value, str):
            raise ValueError(f"engine option {name} = {value!r}: must be a string")
        return value
    if t == "List[str]":
        if isinstance(value, str):
            value = [value]
        if isinstance(value, dict):       # an empty Lua table can arrive as {}
            value = list(value.values())
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"engine option {name} = {value!r}: must be a list of strings")
        return [v for v in value]
    return value
