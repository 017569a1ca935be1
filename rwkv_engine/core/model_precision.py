"""The accuracy gate run on the user's own model: does the lossy mode the CPU verdict
prefers (``core.cpu_precision``: timed once per CPU) keep THIS model's predictions?

How well a model survives int8 weights depends on the model, so the first time a model
file runs with ``dtype = "auto"`` on the CPU and the CPU verdict picks a mode other than
fp32, ``check`` compares that mode with fp32 on this model: teacher-forced over the first
``TOKENS_PER_FILE`` tokens of each of ``cpu_precision_accuracy.real_code_texts()`` (four
standard-library sources, 512 tokens), top-1 agreement (>= ``TOP1_MIN``, the CPU gate's
limit) and mean KL(fp32 || mode) (<= ``KL_MAX``). The fp32 reference's logits are taken
first and its model dropped before the mode's is built: the peak is one fp32 copy beside
what already runs. When that copy does not fit in the available memory (``fits``: a 7B
model is 29 GB in fp32), the 8-bit-weight mode is the reference instead
(``reference_mode``): the 4-bit modes are checked against int8, int8 itself runs
unchecked (the result says so), and int8, not fp32, is what the model serves in until a
mode passes (``safe_mode``).

Results are cached in ``<cache root>/model-precision.json`` under ``gate_key``: the file's
identity (``file_identity``: size, mtime and a hash of three 1 MiB samples, never a full
read of a multi-GB file), the mode, the engine version and code fingerprint, and the gate
itself (tokens, limits). A result is {"key", "mode", "passed", "checked", "top1", "kl",
"tokens", "why", "seconds", "time"}.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .cpu_precision_accuracy import REFERENCE, TOP1_MIN, logit_error, real_code_texts
from .cpu_precision_cache import code_fingerprint, default_cache_dir
from .cpu_precision_measure import MeasurementStopped
from .errors import one_line
from .private_fs import write_private_json

CACHE_NAME = "model-precision.json"
FORMAT = "rwkv.nvim model-precision 1"
KEEP = 32                      # results kept (models x modes x engine versions)
SAMPLE = 1 << 20               # bytes hashed at the start, middle and end of the file
TOKENS_PER_FILE = 128          # x 4 real-code files = 512 teacher-forced positions
# KL(fp32 || mode) on real code, mean over the positions, nats. int8 on the shipped default
# model measures 0.0001 (top-1 99.6 %, these 512 tokens); llama.cpp Q8_0 measured 0.0079 on
# a 0.1B (issue 23): 0.05 passes any working 8-bit weight format with room for a model that
# quantizes worse, and stops a broken one (a scrambled mode measures KL > 1).
KL_MAX = 0.05
MEMORY_SLACK = 1.25            # the fp32 reference needs this x its weight bytes available
SMALL_REFERENCE = "int8"       # the reference (and safe mode) of a model whose fp32 copy does not fit

Step = Optional[Callable[[str], None]]


# -- the file's identity -------------------------------------------------------------------
def file_identity(path) -> dict:
    """{"size", "mtime_ns", "sample"}: ``sample`` hashes the first, middle and last SAMPLE
    bytes (all of a file up to 3 MiB): a changed, touched or replaced file gets a new
    identity; a multi-GB checkpoint is not read whole."""
    p = Path(path)
    st = p.stat()
    h = hashlib.sha256(f"{st.st_size}\n".encode())
    with open(p, "rb") as fh:
        if st.st_size <= 3 * SAMPLE:
            h.update(fh.read())
        else:
            for at in (0, (st.st_size - SAMPLE) // 2, st.st_size - SAMPLE):
                fh.seek(at)
                h.update(fh.read(SAMPLE))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample": h.hexdigest()[:32]}


def gate_key(path, mode: str, reference: str = REFERENCE) -> dict:
    from .. import __version__
    return {"file": file_identity(path), "mode": mode, "reference": reference, "engine": __version__,
            "code": code_fingerprint(), "gate": f"{TOKENS_PER_FILE}x4 tokens, top-1 {TOP1_MIN}, KL {KL_MAX}"}


def _key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


# -- the cache file ------------------------------------------------------------------------
def cache_file(cache_dir=None) -> Path:
    return Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / CACHE_NAME


def _read(path: Path) -> List[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return []
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("results"), list):
        return []
    return [r for r in data["results"] if isinstance(r, dict) and isinstance(r.get("key"), dict)
            and isinstance(r.get("passed"), bool)]


def load_cached(key: dict, cache_dir=None) -> Optional[dict]:
    want = _key_text(key)
    return next((r for r in _read(cache_file(cache_dir)) if _key_text(r["key"]) == want), None)


def store(result: dict, cache_dir=None) -> Path:
    """Write ``result`` (replacing one with the same key), 0600 in a 0700 directory,
    atomically; OSError when the place is not writable."""
    path = cache_file(cache_dir)
    want = _key_text(result["key"])
    kept = [r for r in _read(path) if _key_text(r["key"]) != want]
    kept = sorted(kept, key=lambda r: r.get("time", 0))[-(KEEP - 1):] + [result]
    write_private_json(path, {"format": FORMAT, "results": kept})
    return path


# -- the gate ------------------------------------------------------------------------------
def available_memory() -> Optional[int]:
    """MemAvailable in bytes (Linux); None where it cannot be read (then: assumed to fit)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def fits(fp32_bytes: int) -> Optional[str]:
    """None when an fp32 copy of ``fp32_bytes`` fits in the available memory, else why not."""
    avail = available_memory()
    need = int(fp32_bytes * MEMORY_SLACK)
    if avail is None or avail >= need:
        return None
    return f"its fp32 reference needs {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"


def reference_mode(path) -> Tuple[str, Optional[str]]:
    """(mode, why) the gate compares the lossy modes of the model at ``path`` with: fp32
    when its copy fits in the available memory (why: None), else ``SMALL_REFERENCE``
    (int8: about 0.27 x fp32's bytes) and why fp32 does not fit."""
    no_room = fits(fp32_bytes(path))
    return (REFERENCE, None) if no_room is None else (SMALL_REFERENCE, no_room)


def safe_mode(path) -> str:
    """The mode the model at ``path`` serves in before (or without) a lossy mode that passed:
    the gate's reference (fp32, or int8 when fp32 does not fit in memory)."""
    return reference_mode(path)[0]


def decide(mode: str, top1: float, kl: float, tokens: int) -> dict:
    """{"passed", "why"} of ``mode`` with the measured figures."""
    fails = []
    if top1 < TOP1_MIN:
        fails.append(f"top-1 {top1 * 100:.1f} % < {TOP1_MIN * 100:.0f} %")
    if kl > KL_MAX:
        fails.append(f"KL {kl:.4f} > {KL_MAX}")
    figures = f"top-1 {top1 * 100:.1f} %, KL {kl:.4f} over {tokens} tokens"
    return {"passed": not fails, "why": figures if not fails else f"{', '.join(fails)} over {tokens} tokens"}


class Reference:
    """The reference mode's logits (fp32; int8 for a model whose fp32 copy does not fit) of
    one model on the gate's tokens, computed on first use and shared by the modes checked in
    turn (``auto``'s ladder): one reference pass however many are tried."""

    def __init__(self, path, mode: str = REFERENCE, why: Optional[str] = None):
        self.path = path
        self.mode = mode         # fp32, or int8 for a model whose fp32 copy does not fit
        self.why = why           # why it is not fp32 (``reference_mode``'s answer)
        self.batches = None      # [[1, T] token ids] per real-code file
        self.logits = None       # [tokens, V] fp32

    def get(self, mode: str, say):
        if self.logits is None:
            import torch

            from .checkpoint import load_checkpoint
            from .cpu_precision_measure import _build
            say(f"checking {mode} on this model: loading the {self.mode} reference")
            _, sd, shape, world_ids = load_checkpoint(self.path)
            ref = _build(sd, shape, self.mode, world_ids)
            self.batches = [torch.tensor([ref.tokenizer.encode(text)[:TOKENS_PER_FILE]])
                            for _, text in real_code_texts()]
            rows = []
            for toks in self.batches:                                        # each [1, T]
                rows.append(ref.forward(toks, all_logits=True)[0][0])          # [T, V]
                say(f"checking {mode} on this model: {self.mode} reference")
            del ref, sd
            self.logits = torch.cat(rows)
        return self.batches, self.logits


def measure(path, mode: str, step: Step = None, reference: Optional[Reference] = None) -> Dict[str, float]:
    """{"top1", "kl", "tokens"} of ``mode`` against fp32 on the checkpoint at ``path``.
    ``step(message)`` runs between the forward passes (progress, the engine's pause);
    ``reference``: the reference's logits (default: fp32), shared with other modes' checks."""
    import torch

    from .checkpoint import load_checkpoint
    from .cpu_precision_measure import _build

    def say(msg):
        if step is not None:
            step(msg)
    batches, ref_all = (reference or Reference(path)).get(mode, say)
    _, sd, shape, world_ids = load_checkpoint(path)
    model = _build(sd, shape, mode, world_ids)
    del sd
    got = []
    for i, toks in enumerate(batches):
        say(f"checking {mode} on this model: file {i + 1}/{len(batches)}")
        got.append(model.forward(toks, all_logits=True)[0][0])          # [T, V]
    del model
    got_all = torch.cat(got)                                            # [tokens, V]
    if not bool(torch.isfinite(got_all).all()):
        return {"top1": 0.0, "kl": float("inf"), "tokens": int(ref_all.shape[0])}
    kl, _, top1 = logit_error(ref_all, got_all)
    return {"top1": round(top1, 5), "kl": round(kl, 5), "tokens": int(ref_all.shape[0])}


def fp32_bytes(path) -> int:
    """Bytes of the model's weights in fp32 (the checkpoint is memory-mapped: no copy)."""
    from .checkpoint import load_checkpoint
    _, sd, _, _ = load_checkpoint(path)
    return sum(t.numel() for k, t in sd.items() if k != "vocab.world_ids") * 4


def check(path, mode: str, cache_dir=None, step: Step = None, measure_now: bool = True,
          reference: Optional[Reference] = None) -> Optional[dict]:
    """The gate's result for ``mode`` on the model at ``path``: cached, else measured now
    and cached (``measure_now=False``: None instead), against ``reference`` (shared between
    the modes of one ladder; default: a new one of ``reference_mode``). ``mode`` being the
    reference itself (int8 for a model too big for fp32) passes unchecked:
    {"passed": True, "checked": False, "why": ...}, not cached (memory changes)."""
    if reference is None:
        reference = Reference(path, *reference_mode(path))
    if mode == reference.mode and mode != REFERENCE:
        return {"key": gate_key(path, mode, reference.mode), "mode": mode, "passed": True, "checked": False,
                "why": f"the reference, unchecked ({reference.why or 'fp32 does not fit'})", "time": time.time(),
                "source": "measured"}
    key = gate_key(path, mode, reference.mode)
    hit = load_cached(key, cache_dir)
    if hit is not None:
        return dict(hit, source="cache")
    if not measure_now:
        return None
    if step is not None:
        step(f"checking {mode} against {reference.mode} on this model")   # the engine's pause: before any work
    t0 = time.perf_counter()
    try:
        figures = measure(path, mode, step, reference)
        result = dict(figures, **decide(mode, figures["top1"], figures["kl"], figures["tokens"]))
        if reference.mode != REFERENCE:
            result["why"] += f" against {reference.mode} ({reference.why or 'fp32 does not fit'})"
    except MemoryError as e:
        return {"key": key, "mode": mode, "passed": False, "checked": False,
                "why": f"not checked: {one_line(e, 100)}", "time": time.time(), "source": "measured"}
    except MeasurementStopped:
        raise
    except Exception as e:
        result = {"passed": False, "why": f"fails to run: {one_line(e, 160)}"}
    result.update(key=key, mode=mode, checked=True, seconds=round(time.perf_counter() - t0, 2), time=time.time())
    try:
        store(result, cache_dir)
    except OSError as e:
        import logging
        logging.getLogger("rwkv_engine").warning("rwkv.nvim: cannot cache the model precision check (%s)", e)
    return dict(result, source="measured")


def summary(cpu_line: str, mode: str, result: Optional[dict], failed: Sequence[Tuple[str, dict]] = (),
            fallback: str = REFERENCE) -> str:
    """The status line: ``cpu_line`` is what the CPU verdict says about ``mode`` (e.g.
    "decode 6.3 ms vs fp32 20.3 ms"); ``result`` the gate's result for ``mode`` on this model
    (None: being checked in the background); ``failed``: the (mode, result) of the faster
    modes this model failed before ``mode`` was checked (``auto``'s ladder); ``fallback``: what
    runs when no mode passes (fp32, or int8 for a model too big for fp32)."""
    before = "; ".join(f"{m} failed: {r['why']}" for m, r in failed)
    if result is None:
        head = f"{before}; " if before else ""
        return f"{fallback} (auto: {head}this CPU prefers {mode}: {cpu_line}; checking this model in the background)"
    if result.get("passed"):
        if before:
            return f"{mode} (auto: this CPU: {cpu_line}; this model: {before}; {mode} passed: {result['why']})"
        return f"{mode} (auto: this CPU: {cpu_line}; this model: {result['why']})"
    if not result.get("checked", True):
        return f"{fallback} (auto: this CPU prefers {mode}, but this model was {result['why']})"
    if before:
        return f"{fallback} (auto: this model failed every lossy mode: {before}; {mode} failed: {result['why']})"
    return f"{fallback} (auto: this model failed the {mode} gate: {result['why']})"
