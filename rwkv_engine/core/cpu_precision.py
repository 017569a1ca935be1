"""Which weight representation runs the model on this CPU: measured once, cached on disk.

``dtype = "auto"`` on the CPU resolves here (``resolve``; ``describe`` for status and
``rwkv-nvim info``). The candidates are ``model.cpu_modes()`` (each a valid ``dtype=`` of
``RWKV7`` on the CPU: "fp32", "int8", ...); nothing here knows what a mode is beyond its
name. The work is split by job:

* ``core.cpu_precision_measure``: the measurement, once per CPU: speed on a random
  checkpoint, and the accuracy gate against fp32 (``core.cpu_precision_accuracy``);
* ``core.cpu_precision_cache``: this CPU's identity, the verdict's key and the cache file
  (``<cache root>/cpu-precision.json``);
* this module: the rule that picks a mode from the figures, and the entry points.

The rule (``choose``): among the modes that pass, order by the decode figure
(``decode_1 + decode_8``: one step of 1 row and one of 8 rows, the first ghost text and
the candidates); take the first whose ``prefill_64`` is at most ``PREFILL_SLACK`` (2x)
the fastest passing prefill. fp32 (the reference) is kept unless the pick is at least
``MARGIN`` (5 %) faster at decode: a tie within timing noise goes to the exact mode.
Today the model takes one dtype, so decode and prefill name the same mode; with
``split=True`` (a model that can run the phases in different representations) each
phase gets its own fastest passing mode.

A verdict is used only when its key matches (CPU, flags, torch, engine, sources,
candidates, timing shape, threads); ``RWKV_NVIM_CPU_PRECISION=<mode>`` skips all of it.
A lossy pick is then checked on the user's own model, once per model file
(``core.model_precision``, applied by ``pipeline.loading.gated_by_model``); when it fails
there, the next mode of the verdict's ``ladder`` (the other lossy modes the rule would
take over fp32, fastest first) is checked, and fp32 runs when none passes.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Dict, Optional, Sequence, Tuple

# Names the rest of the engine imports from here (the service: MeasurementStopped; `info`:
# TOP1_MIN) are re-exported. ``resolve`` calls ``measure`` through this module's namespace,
# so replacing ``cpu_precision.measure`` (the tests do) replaces what it runs.
from .cpu_precision_accuracy import ERR_MAX, KL_MAX, REFERENCE, TOP1_MIN  # noqa: F401
from .cpu_precision_cache import FORMAT, cache_file, cache_key, key_text, load_cached, store  # noqa: F401
from .cpu_precision_measure import (CAP_SHAPE, MeasurementStopped, Pause, Progress,  # noqa: F401
                                    listener, measure, say, timing_shape)

log = logging.getLogger("rwkv_engine")

ENV = "RWKV_NVIM_CPU_PRECISION"
MARGIN = 0.05                  # a mode other than fp32 must be this much faster at decode
PREFILL_SLACK = 2.0            # the decode pick's prefill may be at most this x the fastest

_memo: Dict[str, dict] = {}    # key (JSON) -> verdict, for this process


# Modes that only an explicit ``dtype`` selects, never ``auto``: q4 (4-bit weights, int16
# activations) is slower than q4a8 (the same weights, 8-bit activations) wherever either
# has a kernel, and the gates cannot tell their accuracy apart (default model: KL 0.0199
# both, top-1 90.6 %), so timing it at every build would only cost time.
EXPLICIT_ONLY = ("q4",)


def cpu_modes() -> Tuple[str, ...]:
    """Every CPU mode the model offers (``model.cpu_modes()``): what an explicit ``dtype``
    or ``RWKV_NVIM_CPU_PRECISION`` may name."""
    from . import model as model_module
    return tuple(model_module.cpu_modes())


def candidates() -> Tuple[str, ...]:
    """The CPU modes ``auto`` chooses from, fp32 first (the reference): ``cpu_modes()``
    less ``EXPLICIT_ONLY``."""
    modes = tuple(m for m in cpu_modes() if m not in EXPLICIT_ONLY)
    return (REFERENCE,) + tuple(m for m in modes if m != REFERENCE) if REFERENCE in modes else modes


# -- the rule ------------------------------------------------------------------------------
def decode_ms(f: dict) -> float:
    return f.get("decode_1", math.inf) + f.get("decode_8", math.inf)


def choose(measured: Dict[str, dict], rejected: Dict[str, str], split: bool = False) -> Tuple[str, str, str]:
    """(decode mode, prefill mode, one-line why) by the rule in the module doc."""
    passing = [m for m in measured if m not in rejected]
    if not passing:
        fallback = REFERENCE
        return fallback, fallback, "no mode passed the checks: " + "; ".join(f"{m}: {r}" for m, r in rejected.items())
    by_decode = sorted(passing, key=lambda m: decode_ms(measured[m]))
    by_prefill = sorted(passing, key=lambda m: measured[m].get("prefill_64", math.inf))
    if split:
        dec, pre = by_decode[0], by_prefill[0]
    else:
        limit = PREFILL_SLACK * measured[by_prefill[0]]["prefill_64"]
        dec = next((m for m in by_decode if measured[m]["prefill_64"] <= limit), by_decode[0])
        ref = measured.get(REFERENCE)
        if (dec != REFERENCE and REFERENCE in passing and ref["prefill_64"] <= limit
                and decode_ms(measured[dec]) > (1 - MARGIN) * decode_ms(ref)):
            dec = REFERENCE
        pre = dec
    return dec, pre, _why(dec, pre, measured, rejected)


def ladder(measured: Dict[str, dict], rejected: Dict[str, str], pick: str) -> Tuple[str, ...]:
    """The lossy modes ``auto`` may run, in the order they are tried on the user's model
    (``core.model_precision``): ``pick`` (``choose``'s), then the other passing modes by
    decode speed that the same rule would take over fp32 (at most PREFILL_SLACK x the
    fastest prefill, at least MARGIN faster at decode than fp32). () when fp32 is the pick."""
    if pick == REFERENCE:
        return ()
    passing = [m for m in measured if m not in rejected]
    fastest_prefill = min((measured[m].get("prefill_64", math.inf) for m in passing), default=math.inf)
    ref = measured.get(REFERENCE) if REFERENCE in passing else None
    out = [pick]
    for m in sorted(passing, key=lambda m: decode_ms(measured[m])):
        if m in (pick, REFERENCE) or measured[m].get("prefill_64", math.inf) > PREFILL_SLACK * fastest_prefill:
            continue
        if ref is not None and decode_ms(measured[m]) > (1 - MARGIN) * decode_ms(ref):
            continue
        out.append(m)
    return tuple(out)


def _why(dec: str, pre: str, measured: Dict[str, dict], rejected: Dict[str, str]) -> str:
    def fig(m):
        f = measured[m]
        return f"{m} {f['decode_1']:.1f}/{f['decode_8']:.1f} ms, prefill {f['prefill_64']:.0f} ms"
    others = [m for m in measured if m not in rejected and m not in (dec, pre)]
    parts = [f"decode 1/8 rows: {fig(dec)}" + (f" vs {', '.join(fig(m) for m in others)}" if others else "")]
    if pre != dec:
        parts.append(f"prefill: {pre}")
    if "top1" in measured[dec] and dec != REFERENCE:
        parts.append(f"top-1 {measured[dec]['top1'] * 100:.1f} % on real code")
    if rejected:
        parts.append("rejected " + ", ".join(f"{m} ({r})" for m, r in rejected.items()))
    return "; ".join(parts)


# -- entry points --------------------------------------------------------------------------
def override() -> Optional[str]:
    """The mode named by ``RWKV_NVIM_CPU_PRECISION`` (None when unset or empty)."""
    return os.environ.get(ENV, "").strip() or None


def resolve(shape: Sequence[int], threads: int, cache_dir=None, reference_path=None,
            progress: Progress = None, remeasure: bool = False, measure_now: bool = True,
            pause: Pause = None) -> Optional[dict]:
    """The verdict for a model of ``shape`` (layers, width, vocabulary) run with ``threads``:
    the environment override, else this process's or the cache file's verdict for the
    same key, else measured now (and stored; a cache place that cannot be written only
    costs a log line). ``remeasure``: measure and rewrite even if a verdict is cached;
    ``measure_now=False``: None instead of measuring."""
    modes = candidates()
    forced = override()
    if forced is not None and not remeasure:
        if forced in cpu_modes():
            return {"decode": forced, "prefill": forced, "source": "env", "measured": {},
                    "why": f"{ENV}={forced}", "key": {}, "time": time.time()}
        log.warning("rwkv.nvim: %s=%r is not a CPU mode (%s): ignored", ENV, forced, ", ".join(cpu_modes()))
    tshape = timing_shape(*shape)
    key = cache_key(tshape, threads, modes)
    text = key_text(key)
    if not remeasure:
        v = _memo.get(text) or load_cached(key, cache_dir)
        if v is not None:
            v = dict(v, source="cache")
            _memo[text] = v
            return v
    if not measure_now:
        return None
    t0 = time.perf_counter()
    measured, rejected = measure(modes, tshape, reference_path, progress, threads=threads, pause=pause)
    dec, pre, why = choose(measured, rejected)
    v = {"decode": dec, "prefill": pre, "ladder": list(ladder(measured, rejected, dec)), "why": why,
         "measured": measured, "rejected": rejected, "key": key, "time": time.time()}
    try:
        where = store(v, cache_dir)
        log.info("rwkv.nvim: CPU precision %s (%s), cached in %s", dec, why, where)
    except OSError as e:
        log.warning("rwkv.nvim: cannot cache the CPU precision verdict (%s): measured again next start", e)
    v = dict(v, source="measured")
    _memo[text] = v
    say(listener(progress, None), f"CPU precision measured in {time.perf_counter() - t0:.1f} s: {describe(v)}")
    return v


def describe(v: dict) -> str:
    """One line for :RwkvStatus and ``rwkv-nvim info``:
    "int8 (auto: decode 4.1 ms vs fp32 12.0 ms; top-1 99.6 %)"."""
    mode = v.get("decode", "?")
    head = mode if v.get("prefill", mode) == mode else f"{mode} decode, {v['prefill']} prefill"
    if v.get("source") == "env":
        return f"{head} ({ENV})"
    measured, rejected = v.get("measured") or {}, v.get("rejected") or {}
    f = measured.get(mode, {})
    parts = [speed_line(v)] if "decode_1" in f else []
    if "top1" in f and mode != REFERENCE:
        parts.append(f"top-1 {f['top1'] * 100:.1f} %")
    for m, r in rejected.items():
        parts.append(f"{m} rejected: {r}")
    return f"{head} (auto: {'; '.join(parts) or v.get('why', '')})"


def speed_line(v: dict, mode: Optional[str] = None) -> str:
    """"decode 4.0 ms vs fp32 10.0 ms": the 1-row decode step of ``mode`` (default: the
    verdict's pick) and of the other measured modes ("" when not timed)."""
    mode = mode or v.get("decode", "?")
    measured = v.get("measured") or {}
    f = measured.get(mode, {})
    if "decode_1" not in f:
        return ""
    cmp = [f"{m} {measured[m]['decode_1']:.1f} ms" for m in measured if m != mode and "decode_1" in measured[m]]
    return f"decode {f['decode_1']:.1f} ms" + (f" vs {', '.join(cmp)}" if cmp else "")


def forget() -> None:
    """Drop this process's verdicts (tests; after ``rwkv-nvim info --measure-precision``)."""
    _memo.clear()
