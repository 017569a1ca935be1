"""Where a CPU precision verdict (``core.cpu_precision``) is kept: this CPU's identity,
the key a verdict is stored under, and the verdict file.

File: ``<cache root>/cpu-precision.json`` (``$XDG_CACHE_HOME/rwkv.nvim`` or
``~/.cache/rwkv.nvim``; directories 0700, the file 0600), a list of verdicts, each with
its ``key``: CPU model name, a digest of the CPU flags, torch version, engine version, a
fingerprint of the model/kernel sources, the candidate list, the timing shape and the
thread count. A verdict is used only when its key matches; a corrupt or foreign file is
ignored and rewritten. A verdict is a dict with at least "key", "decode", "prefill"
(modes among the key's candidates) and "measured" (figures per mode).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import List, Optional, Sequence

from .cache_paths import cache_root
from .private_fs import write_private_json

CACHE_NAME = "cpu-precision.json"
FORMAT = "rwkv.nvim cpu-precision 1"
KEEP = 16                      # verdicts kept in the file (other shapes, thread counts, torch versions)


# -- the key -------------------------------------------------------------------------------
def cpu_identity() -> dict:
    """{"cpu": model name, "flags": digest of the feature flags} from /proc/cpuinfo (Linux),
    sysctl (macOS), or the platform module elsewhere."""
    name, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if not name and k in ("model name", "cpu model", "hardware", "processor") \
                        and not v.strip().isdigit():
                    name = v.strip()
                elif not flags and k in ("flags", "features", "isa"):
                    flags = " ".join(sorted(v.split()))
                if name and flags:
                    break
    except OSError:
        pass
    if not name or not flags:
        import subprocess
        for what, key in (("machdep.cpu.brand_string", "name"), ("machdep.cpu.features", "flags"),
                          ("hw.optional", "flags")):
            try:
                out = subprocess.run(["sysctl", "-n", what] if what != "hw.optional" else ["sysctl", what],
                                     capture_output=True, text=True, timeout=2).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                continue
            if out and key == "name" and not name:
                name = out
            elif out and key == "flags" and not flags:
                flags = " ".join(sorted(out.split()))
    name = name or platform.processor() or platform.machine() or "unknown"
    return {"cpu": f"{name} ({platform.machine()}, {os.cpu_count()} cores)",
            "flags": hashlib.sha256(flags.encode()).hexdigest()[:16] if flags else "none"}


def code_fingerprint() -> str:
    """A hash of the engine's core sources (this folder's ``*.py``: the model, the
    measurement) and the kernel sources: a new model or kernel implementation (same
    version number, e.g. in development) measures anew; the same code in a fresh clone or
    reinstall (new file times) does not."""
    here = Path(__file__).resolve().parent
    files = sorted(here.glob("*.py"))
    for d in (here / "kernels", here.parent / "kernels", here.parent.parent / "kernels"):
        if d.is_dir():
            files += sorted(p for p in d.iterdir() if p.is_file())
            break
    h = hashlib.sha256()
    for p in files:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        h.update(f"{p.name}|{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()[:16]


def cache_key(shape: Sequence[int], threads: int, modes: Sequence[str]) -> dict:
    """The key of the verdict for timing ``shape`` (layers, width, vocabulary), ``threads``
    torch threads and candidate ``modes`` on this CPU, torch, engine and code."""
    import torch

    from .. import __version__
    return {**cpu_identity(), "torch": torch.__version__, "engine": __version__,
            "code": code_fingerprint(), "candidates": list(modes),
            "shape": "x".join(str(int(x)) for x in shape), "threads": int(threads)}


def key_text(key: dict) -> str:
    """``key`` as one canonical string (what verdicts are matched by)."""
    return json.dumps(key, sort_keys=True)


# -- the file ------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    return cache_root()


def cache_file(cache_dir=None) -> Path:
    return Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / CACHE_NAME


def _read_verdicts(path: Path) -> List[dict]:
    """The verdicts in ``path``; [] for a missing, corrupt or foreign file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return []
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("verdicts"), list):
        return []
    return [v for v in data["verdicts"] if _valid(v)]


def _valid(v) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("key"), dict) and isinstance(v.get("decode"), str)
            and isinstance(v.get("prefill"), str) and isinstance(v.get("measured"), dict)
            and v["decode"] in v["key"].get("candidates", ()) and v["prefill"] in v["key"].get("candidates", ()))


def load_cached(key: dict, cache_dir=None) -> Optional[dict]:
    """The stored verdict with exactly ``key``; None when there is none."""
    want = key_text(key)
    for v in _read_verdicts(cache_file(cache_dir)):
        if key_text(v["key"]) == want:
            return v
    return None


def store(verdict: dict, cache_dir=None) -> Path:
    """Write ``verdict`` into the cache file (replacing one with the same key), 0600 in a
    0700 directory, atomically. Raises OSError when the place is not writable."""
    path = cache_file(cache_dir)
    want = key_text(verdict["key"])
    kept = [v for v in _read_verdicts(path) if key_text(v["key"]) != want]
    kept = sorted(kept, key=lambda v: v.get("time", 0))[-(KEEP - 1):] + [verdict]
    write_private_json(path, {"format": FORMAT, "verdicts": kept})
    return path
