"""Typed configuration of the completion engine (``EngineConfig``) and its schema.

``EngineConfig`` is the single source of every engine-option fact: each field carries
its type, default, allowed range or choices and its documentation in
``dataclasses.field(metadata=...)`` (built by :func:`option`). Three things are
derived from it:

- ``__post_init__``/``validate()``: coercion of Lua values and the checks below,
- ``tools/gen_config.py`` -> ``lua/rwkv/engine_options.lua`` (the same checks in
  ``setup()``, before anything reaches Python) and the engine-options section of
  ``doc/rwkv.txt``; ``tools/gen_config.py --check`` fails when those are stale.

The Neovim plugin passes the user's ``setup({engine = {...}})`` table through
``EngineConfig.from_dict``; unknown keys and bad values raise ValueError with a
one-line message ``engine option NAME = VALUE: must be ...``. No torch import here.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

# Schema value types, named as the Lua side checks them. "table" is a list of non-empty
# strings (the only list option); "number" is a finite float; "integer" a whole number.
TYPES = ("string", "number", "integer", "boolean", "table")

# "engine option NAME = VALUE: <this>" for a value of the wrong type
TYPE_MUST = {
    "string": "must be a string",
    "number": "must be a finite number",
    "integer": "must be an integer",
    "boolean": "must be true or false",
    "table": "must be a list of non-empty strings",
}


def _num(x) -> str:
    """A bound as the messages print it: 0.0 -> "0", 1 << 20 -> "1048576"."""
    return str(int(x)) if float(x).is_integer() else repr(x)


def option(type: str, default: Any, doc: str, *, group: str, min=None, max=None,
           min_open: bool = False, max_option: Optional[str] = None,
           choices: Optional[tuple] = None, nullable: bool = False, nonblank: bool = False,
           hint: str = "", must: Optional[str] = None):
    """One schema entry as a dataclass field.

    type      one of TYPES
    doc       help text (doc/rwkv.txt, the generated Lua table); the allowed values are
              appended by the generator, so do not repeat them here
    group     help-file heading the option is listed under
    min, max  inclusive bounds (min_open: min itself is excluded)
    max_option  cross-field rule: the value is lowered to that option's value when larger
              (``__post_init__``) and must then be in min..that option
    choices   allowed values of a string option
    nullable  None (Lua nil) is a valid value
    nonblank  a string must contain a non-blank character
    hint      appended to the range in messages: "must be >= 0 (0 = off)"
    must      the whole "must be ..." text, when the derived one does not fit
    """
    assert type in TYPES, type
    derived = None
    if choices:
        derived = "must be one of " + ", ".join(choices)
    elif max_option is not None:
        derived = f"must be in {_num(min)}..{max_option}"
    elif min is not None and max is not None:
        derived = f"must be in ({_num(min)}, {_num(max)}]" if min_open else f"must be in {_num(min)}..{_num(max)}"
    elif min is not None:
        derived = f"must be {'>' if min_open else '>='} {_num(min)}"
    if derived and hint:
        derived += " " + hint
    if type == "table":             # list elements are checked as values, with the type's words
        must = must or TYPE_MUST["table"]
    meta = {"type": type, "doc": doc, "group": group, "min": min, "max": max, "min_open": min_open,
            "max_option": max_option, "choices": tuple(choices) if choices else None,
            "nullable": nullable, "nonblank": nonblank,
            "must": must or derived,      # the message for a well-typed but disallowed value
            "shows_range": derived is not None and must is None}   # the help lists `must`
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_MODEL, _SAMPLING, _LOCAL = "Model", "Candidates and sampling", "Context around the cursor"
_RING, _CACHE, _PREFILL = "Extra context ring", "State cache", "Prefill scheduling"
_REMOTE = "Remote server (|rwkv-remote|)"
BACKENDS = ("local", "llama.cpp", "openai")


@dataclass
class EngineConfig:
    model: Optional[str] = option(
        "string", None, group=_MODEL, nullable=True, nonblank=True,
        must="must be a path, a model name, or nil for the default model",
        doc='nil: the small model shipped with the plugin; a path to an RWKV-7 `.pth` checkpoint '
            '(".pth" optional); or a downloaded model\'s short name such as "g1-0.4b" '
            '(see |:RwkvDownload|).')
    device: str = option(
        "string", "auto", group=_MODEL, choices=("auto", "cpu", "cuda", "mps"),
        doc='"auto": CUDA/ROCm when available, else the CPU. "mps": the GPU of an Apple Silicon '
            'Mac through torch\'s MPS backend (fp16, the pure-torch WKV path; not yet run on a '
            'Mac); without MPS it falls back to the CPU with one warning, as "cuda" does.')
    dtype: str = option(
        "string", "auto", group=_MODEL, choices=("auto", "fp16", "bf16", "fp32", "int8", "q4", "q4a8"),
        doc='"auto" is fp16 on a GPU; on the CPU, the fastest CPU mode (fp32, int8 or q4a8) '
            'whose kernels work here, timed once per CPU by the build (:RwkvBuild, the quick '
            'start; ~10-30 s) and cached in cache_dir/cpu-precision.json; the first load of each '
            'model then checks the lossy modes, fastest first, on the model itself against fp32 '
            '(top-1 agreement >= 99 % and KL <= 0.05 on real code; in the background, cached in '
            'cache_dir/model-precision.json) and runs the first that passes, else fp32. Without a '
            'cached verdict the model serves in fp32 at once and the CPU is measured in the '
            'background between requests, then the engine switches. A model whose fp32 copy '
            'does not fit in memory (7B: 29 GB) is checked against int8 and serves in int8 '
            'instead of fp32. :RwkvStatus and '
            '`rwkv-nvim info` say what was chosen and why, `rwkv-nvim info --measure-precision` '
            'measures again, $RWKV_NVIM_CPU_PRECISION=<mode> skips it. "int8" (CPU only) stores the '
            'matrices as int8 with one scale per 32 weights (1.1 bytes per weight) and runs them '
            'with the plugin\'s own AVX512-VNNI/AVX2/NEON kernels. "q4" (CPU only) stores the big '
            'matrices in 4 bits with one scale per 32 weights (0.56 bytes per weight; head and '
            'LoRAs int8): less accurate (KL to fp32 0.020 on the bundled model vs 0.0001 for '
            'int8). "q4a8" (CPU only): the q4 weights with 8-bit activations, about twice q4\'s '
            'speed where the CPU has AVX2 or ARM dotprod (prefill, several candidates); its '
            'accuracy is q4\'s. "q4" is only chosen explicitly. A dtype that is not a CPU mode '
            '(fp16) counts as "auto" on the CPU.')
    threads: int = option(
        "integer", 0, group=_MODEL, min=0, max=256, hint="(0 = auto)",
        doc="Torch CPU threads. 0: 1 thread for small models (the bundled one), up to 8 cores "
            "for models of n_embd > 512.")
    cuda_graphs: bool = option(
        "boolean", False, group=_MODEL,
        doc="On a GPU, replay the one-token decode step from CUDA graphs captured per batch size "
            "(1, 2, 4, 8): one launch per token instead of ~1,000 kernel launches. Falls back to "
            "eager decode (one log line) if a capture fails. Off until it has run on a GPU.")
    download_dir: Optional[str] = option(
        "string", None, group=_MODEL, nullable=True,
        doc="Where |:RwkvDownload| puts models (nil: the Hugging Face cache).")

    candidates: int = option(
        "integer", 4, group=_SAMPLING, min=1, max=16,
        doc="Candidates decoded together in one batch.")
    max_tokens: int = option(
        "integer", 64, group=_SAMPLING, min=1, max=4096, doc="Tokens per candidate at most.")
    max_lines: int = option(
        "integer", 8, group=_SAMPLING, min=1, max=1000,
        doc="Lines per candidate at most (the rest of the cursor line counts as one).")
    temperature: float = option(
        "number", 0.6, group=_SAMPLING, min=0.0, max=10.0, hint="(0 = greedy)",
        doc="Sampling temperature.")
    top_p: float = option(
        "number", 0.9, group=_SAMPLING, min=0.0, max=1.0, min_open=True,
        doc="Nucleus sampling: the smallest set of tokens with this much probability.")
    top_k: int = option(
        "integer", 0, group=_SAMPLING, min=0, hint="(0 = off)",
        doc="Sample from the k most likely tokens only.")
    alpha_presence: float = option(
        "number", 0.0, group=_SAMPLING,
        doc="Repetition penalties (as in the `rwkv` package): per token already generated.")
    alpha_frequency: float = option(
        "number", 0.2, group=_SAMPLING, doc="Penalty per occurrence of a generated token.")
    alpha_decay: float = option(
        "number", 0.996, group=_SAMPLING, min=0.0, max=1.0,
        doc="Per-token decay of the repetition counts.")
    seed: int = option(
        "integer", 0, group=_SAMPLING, doc="Candidate i samples with seed + i.")
    stop: List[str] = option(
        "table", [], group=_SAMPLING,
        doc="Extra stop strings (a single string counts as a list of one).")
    time_budget_ms: int = option(
        "integer", 1000, group=_SAMPLING, min=1, doc="Decode time budget per request.")

    n_prefix: int = option(
        "integer", 256, group=_LOCAL, min=0, doc="Lines above the cursor sent with a request.")
    n_suffix: int = option(
        "integer", 64, group=_LOCAL, min=0, doc="Lines below the cursor sent with a request.")
    near_prefix: int = option(
        "integer", 24, group=_LOCAL, min=0, max_option="n_prefix",
        doc='Of those, lines above the cursor inside the fill-in-the-middle window (the rest '
            'is "far" prefix). A larger value is lowered to n_prefix.')
    near_suffix: int = option(
        "integer", 8, group=_LOCAL, min=0, max_option="n_suffix",
        doc="Lines below the cursor inside that window. A larger value is lowered to n_suffix.")
    fim_window_ms: int = option(
        "integer", 700, group=_LOCAL, min=0, max=60000,
        hint="(0 = off)",
        doc="Time a one-line cursor move may spend re-reading the fill-in-the-middle window (a "
            "move changes the whole window), turned into tokens by the prefill speed measured "
            "on this model's own requests: the window then takes as many of the near_suffix "
            "lines below and near_prefix lines above the cursor as fit (at least 1 below and 2 "
            "above). Lines above left out of the window stay in the prompt, before it (the far "
            "prefix, whose states are cached); lines below left out are not in the prompt. On a "
            "fast machine the whole window fits and nothing changes; at 100 tokens/s of prefill "
            "the window gets 64 tokens. 0: always near_prefix / near_suffix lines.")
    max_line_suffix: int = option(
        "integer", 8, group=_LOCAL, min=0,
        doc="No automatic suggestion when more than this many non-blank characters are right "
            "of the cursor (the `trigger` key still works).")
    max_line_bytes: int = option(
        "integer", 1024, group=_LOCAL, min=64, max=1 << 20,
        doc="Longest line sent or put in a prompt, in bytes; a longer line is cut (the cursor "
            "line around the cursor), so a minified 10 MB line costs nothing.")

    ring_n_chunks: int = option(
        "integer", 16, group=_RING, min=0, hint="(0 = no extra context)", doc="Chunks kept.")
    ring_chunk_size: int = option(
        "integer", 64, group=_RING, min=3, hint="lines", doc="Lines per chunk.")
    ring_queue: int = option(
        "integer", 16, group=_RING, min=1, doc="Chunks waiting for an idle moment.")

    cache_device_mb: int = option(
        "integer", 512, group=_CACHE, min=0, doc="Budget on the GPU (or in RAM when on the CPU).")
    cache_host_mb: int = option(
        "integer", 1024, group=_CACHE, min=0, doc="Budget in RAM for states moved off the device.")
    cache_disk_mb: int = option(
        "integer", 2048, group=_CACHE, min=0, hint="(0 = no disk cache)",
        doc="Budget on disk for project-wide context states.")
    cache_dir: Optional[str] = option(
        "string", None, group=_CACHE, nullable=True,
        doc="nil: $XDG_CACHE_HOME/rwkv.nvim or ~/.cache/rwkv.nvim.")

    prefill_chunk: int = option(
        "integer", 64, group=_PREFILL, min=1, max=4096,
        doc="Tokens per forward call while reading the prompt (a newer request can interrupt "
            "between chunks).")
    tail_checkpoints: int = option(
        "integer", 4, group=_PREFILL, min=0, max=16,
        doc="States kept at the last token positions of a prompt.")
    prime_after_ms: int = option(
        "integer", 400, group=_PREFILL, min=0, max=60000, hint="(0 = only on CursorHold)",
        doc="Idle time after a suggestion before the engine prepares the states of the lines "
            "above and below the cursor (a one-line move then re-feeds nothing), besides the "
            "editor's own idle event. A keystroke interrupts it between prefill chunks.")

    backend: str = option(
        "string", "local", group=_REMOTE, choices=BACKENDS,
        doc='"local": the model runs inside Neovim\'s Python host. "llama.cpp": requests go to '
            'a llama-server at `url`; "openai": to an OpenAI-compatible /v1/completions server '
            '(vLLM, SGLang, Ollama, ...). The model options above do not apply to a server.')
    url: Optional[str] = option(
        "string", None, group=_REMOTE, nullable=True, nonblank=True,
        must="must be a non-blank server address, or nil",
        doc='The server, e.g. "http://127.0.0.1:8080" (llama-server) or '
            '"http://gpu-box:8000/v1" (OpenAI-compatible; "/v1" is added when the address '
            'has no path). Required when backend is not "local".')
    api_key_env: Optional[str] = option(
        "string", None, group=_REMOTE, nullable=True, nonblank=True,
        must="must be the name of an environment variable, or nil",
        doc='Name of the environment variable that holds the API key, sent as '
            '"Authorization: Bearer ...". The key itself never goes in the configuration.')
    remote_model: Optional[str] = option(
        "string", None, group=_REMOTE, nullable=True, nonblank=True,
        must="must be a model name, or nil",
        doc='Model name sent with each request (the OpenAI API\'s "model"). nil: the first '
            'model the server lists.')
    fim: str = option(
        "string", "auto", group=_REMOTE, choices=("auto", "rwkv", "infill", "plain"),
        doc='How the text around the cursor is sent. "rwkv": the suffix-first prompt of the '
            'local engine, for RWKV-7 models; "infill": the server\'s own fill-in-the-middle '
            '(llama-server /infill, the "suffix" field of /v1/completions) for models with '
            'FIM tokens; "plain": the text before the cursor only; "auto": "rwkv" when the '
            'model has the RWKV vocabulary, else "infill", else "plain".')
    timeout_connect_ms: int = option(
        "integer", 2000, group=_REMOTE, min=1, max=600_000,
        doc="Connecting to the server (and the TLS handshake) at most.")
    timeout_first_byte_ms: int = option(
        "integer", 10000, group=_REMOTE, min=1, max=600_000,
        doc="Waiting for the first piece of an answer (the server reads the prompt) at most, "
            "and for each next piece. A newer keystroke cancels the wait at once.")
    timeout_total_ms: int = option(
        "integer", 30000, group=_REMOTE, min=1, max=600_000,
        doc="A whole request at most; the text received by then is kept. Decoding also stops "
            "`time_budget_ms` after the first piece of the answer, as locally.")

    # -- construction ---------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "EngineConfig":
        """Build from a plain dict (e.g. from Lua); unknown keys are an error, None (Lua
        vim.NIL) means "the default"."""
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"engine options = {d!r}: must be a table of option = value")
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((k for k in d if k not in names), key=str)
        if unknown:
            raise ValueError(f"unknown engine option {unknown[0]!r} (known: {', '.join(sorted(names))})")
        return cls(**{k: v for k, v in d.items() if v is not None})

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __post_init__(self):
        # three passes, in field order, mirrored by lua/rwkv/config.lua: types, then the
        # cross-field clamp, then values
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, f.metadata, getattr(self, f.name)))
        # the FIM window is part of the local window: shrinking n_prefix/n_suffix alone
        # shrinks the near window with it instead of failing
        for f in dataclasses.fields(self):
            limit = getattr(self, f.metadata["max_option"]) if f.metadata["max_option"] else None
            if limit is not None and limit >= 0:
                setattr(self, f.name, min(getattr(self, f.name), limit))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for the first option (in field order) the schema rejects."""
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if not _has_type(meta, value):
                raise ValueError(f"engine option {f.name} = {value!r}: {TYPE_MUST[meta['type']]}")
            if not _allowed(meta, value, self):
                raise ValueError(f"engine option {f.name} = {value!r}: {meta['must']}")
        # cross-field (after every per-field check; lua/rwkv/config.lua does the same)
        if self.backend != "local" and self.url is None:
            raise ValueError(f"engine option url = None: must be set when backend is {self.backend!r}")

    # -- derived --------------------------------------------------------------
    def resolved_cache_dir(self) -> Path:
        """Cache root: ``cache_dir`` or $XDG_CACHE_HOME/rwkv.nvim or ~/.cache/rwkv.nvim."""
        if self.cache_dir:
            return Path(os.path.expanduser(self.cache_dir))
        from ..core.cache_paths import cache_root
        return cache_root()

    def sampling_dict(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "alpha_presence": self.alpha_presence, "alpha_frequency": self.alpha_frequency,
                "alpha_decay": self.alpha_decay}


def schema() -> List[dict]:
    """Every option in field order: {"name", "default", **metadata} (for tools/gen_config.py
    and the tests)."""
    out = []
    for f in dataclasses.fields(EngineConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out.append({"name": f.name, "default": default, **f.metadata})
    return out


# -- checks (driven by the field metadata) -------------------------------------------
_FLOAT_MAX = sys.float_info.max     # a larger Python int has no float


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _coerce(name: str, meta, value):
    """Lua numbers arrive as float or int, lists as lists (an empty table possibly as {});
    normalise to the field's type or raise the type's message."""
    t = meta["type"]
    if value is None and meta["nullable"]:
        return None
    if t == "integer" and _is_number(value) and (isinstance(value, int) or value.is_integer()):
        return int(value)
    if t == "number" and _has_type(meta, value):
        return float(value)
    if t == "table":
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict) and not value:
            return []
        if isinstance(value, (list, tuple)):
            return list(value)
    if _has_type(meta, value):
        return value
    raise ValueError(f"engine option {name} = {value!r}: {TYPE_MUST[t]}")


def _has_type(meta, value) -> bool:
    """Whether a (coerced) value has the field's type; elements of lists are a value check."""
    t = meta["type"]
    if value is None:
        return meta["nullable"]
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return _is_number(value) and abs(value) <= _FLOAT_MAX
    if t == "string":
        return isinstance(value, str)
    if t == "boolean":
        return isinstance(value, bool)
    return isinstance(value, list)      # "table"


def _allowed(meta, value, cfg: EngineConfig) -> bool:
    """Range, choices, non-blank strings, list elements and the cross-field bound."""
    if value is None:
        return True
    if meta["type"] == "table":
        return all(isinstance(s, str) and s != "" for s in value)
    if meta["choices"] is not None and value not in meta["choices"]:
        return False
    if meta["nonblank"] and value.strip() == "":
        return False
    lo, hi = meta["min"], meta["max"]
    if meta["max_option"] is not None:
        hi = getattr(cfg, meta["max_option"])
    if lo is not None and (value <= lo if meta["min_open"] else value < lo):
        return False
    return hi is None or value <= hi
