"""How fast each CPU mode runs on this CPU, and whether it passes the accuracy gate: the
measurement behind ``dtype = "auto"`` (``core.cpu_precision`` decides from its figures).

* **speed** on a random checkpoint built in memory (``measurement_checkpoint``: the shared
  generator, ``core.random_checkpoint``, with trained-like peaked logits): the real
  model's shape when it is at most 0.1B-sized (``timing_shape``; ``CAP_SHAPE``, 12 x 768,
  vocabulary 65536), else ``CAP_SHAPE`` itself: a bigger model has the same balance of
  products (all of them memory- or compute-bound alike), and building and timing a 0.4B
  or 1.5B one would cost a minute. Decode-shaped: a forward of tokens [1, 1] and [8, 1]
  from a state; prefill-shaped: tokens [1, 64]. The modes are timed in turn, round after
  round (the best of up to ``ROUNDS`` counts; after ``MIN_ROUNDS``, more only within
  ``TIMING_BUDGET_S``), so a background load hits them all alike. Building and the
  accuracy checks use up to 8 cores; timing uses the model's own thread count.
* **accuracy** against fp32 (``core.cpu_precision_accuracy``): logit error on a random
  checkpoint of ``CAP_SHAPE``, and top-1 agreement on real code with the trained default
  model when one is given. A mode that fails the gate (or fails to build or run) is
  rejected, with the reason.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

from . import cpu_precision_accuracy as accuracy

log = logging.getLogger("rwkv_engine")

CAP_SHAPE = (12, 768, 65536)   # (layers, width, vocabulary): G1 0.1B
ROUNDS = {"decode_1": 6, "decode_8": 4, "prefill_64": 3}   # timed calls per mode (best counts)
MIN_ROUNDS = 2                 # after these, a round starts only within TIMING_BUDGET_S
TIMING_BUDGET_S = 5.0

Progress = Optional[Callable[[str], None]]
Pause = Optional[Callable[[], None]]    # called between measurement steps; may wait (the engine is busy)
Figures = Dict[str, Dict[str, float]]   # mode -> {"decode_1": ms, ..., "kl": nats, "top1": share}
Rejected = Dict[str, str]               # mode -> why it may not be chosen


class MeasurementStopped(Exception):
    """Raised by a ``pause`` callback to end a measurement early (the engine is closing)."""


# -- the random checkpoint -----------------------------------------------------------------
def timing_shape(n_layer: int, n_embd: int, vocab: int) -> Tuple[int, int, int]:
    """The shape timed for a model of this shape: itself up to 0.1B, else ``CAP_SHAPE``."""
    L, C, V = CAP_SHAPE
    if n_layer * n_embd * n_embd <= L * C * C and vocab * n_embd <= V * C:
        return (n_layer, n_embd, vocab)
    return CAP_SHAPE


def measurement_checkpoint(n_layer: int, n_embd: int, vocab: int, seed: int = 0) -> dict:
    """The random x070 state dict the measurement runs: ``core.random_checkpoint``'s, with
    trained-like (peaked) logits so that top-1 and KL measure precision rather than ties of
    a flat distribution; a vocabulary other than 65536 is declared as World ids 0..V-1."""
    from .random_checkpoint import make_state_dict
    return make_state_dict(n_layer, n_embd, vocab, seed=seed, trained_like=True,
                           world_ids=range(vocab) if vocab != 65536 else None)


def shape_of(sd: dict):
    from .checkpoint import infer_shape
    return infer_shape(sd, Path("<random checkpoint>"))[0]


def _build(sd: dict, shape, mode: str, world_ids=None):
    """The model of ``sd`` in CPU mode ``mode`` (tests replace this to inject a mode)."""
    from .model import RWKV7
    return RWKV7(sd, shape, device="cpu", dtype=mode, world_ids=world_ids)


# -- progress ------------------------------------------------------------------------------
def listener(progress: Progress, pause: Pause):
    """What the measurement's steps call (``say``): ``pause`` first (never inside a timed
    call: a busy engine holds the measurement there, between steps), then ``progress``."""
    def hear(msg: str, step: bool) -> None:
        if pause is not None:
            pause()
        if progress is not None and not step:
            progress(msg)
    return hear


def say(hear, msg: str, step: bool = False) -> None:
    """Log ``msg``; tell the listener (``listener``; None: nobody) about it, ``step``: a
    minor one (no notification)."""
    log.info("rwkv.nvim: %s", msg)
    if hear is not None:
        try:
            hear(msg, step)
        except MeasurementStopped:
            raise
        except Exception:                         # a broken listener must not stop the measurement
            log.exception("rwkv.nvim: precision progress callback failed")


# -- the figures ---------------------------------------------------------------------------
def _time_modes(models: Dict[str, object], vocab: int, hear) -> Figures:
    """Best-of ms per mode for decode_1, decode_8 and prefill_64, round-robin over modes
    (``hear``: ``listener``'s, told before each round; None: nobody)."""
    import torch
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (1, 64), generator=g)                  # [1, 64]
    one, eight = prompt[:, :1].clone(), torch.randint(0, vocab, (8, 1), generator=g)   # [1, 1], [8, 1]
    states = {}
    for name, m in models.items():                # warm-up; states after a short prompt
        s1 = m.forward(prompt[:, :16])[1]
        s8 = s1.fork(8)
        m.forward(one, s1), m.forward(eight, s8), m.forward(prompt, s1)
        states[name] = (s1, s8)
    best = {name: {k: math.inf for k in ROUNDS} for name in models}
    calls = {"decode_1": lambda m, s: m.forward(one, s[0]),
             "decode_8": lambda m, s: m.forward(eight, s[1]),
             "prefill_64": lambda m, s: m.forward(prompt, s[0])}
    t0 = time.perf_counter()                      # the budget counts from the first round
    for r in range(max(ROUNDS.values())):
        if r >= MIN_ROUNDS and time.perf_counter() - t0 > TIMING_BUDGET_S:
            break                                 # a slow or busy machine: the best so far
        say(hear, f"timing CPU precision modes ({r + 1}/{max(ROUNDS.values())})", step=True)
        for kind, n in ROUNDS.items():
            if r >= n:
                continue
            for name, m in models.items():
                t1 = time.perf_counter()
                calls[kind](m, states[name])
                best[name][kind] = min(best[name][kind], (time.perf_counter() - t1) * 1000)
    return {name: {k: round(v, 3) for k, v in b.items()} for name, b in best.items()}


# -- the measurement -----------------------------------------------------------------------
def measure(modes: Sequence[str], shape: Sequence[int], reference_path=None,
            progress: Progress = None, seed: int = 0,
            threads: Optional[int] = None, pause: Pause = None) -> Tuple[Figures, Rejected]:
    """Measure ``modes`` (see the module doc). ``shape``: (layers, width, vocabulary) of the
    timing checkpoint; ``threads``: torch threads while timing (the model's own; None: as
    set); building and the accuracy checks use up to 8 cores. ``reference_path``: the
    trained model for the top-1 gate (None: that part of the gate is skipped). Returns
    (measured, rejected): figures per mode, and the modes that fail the gate (or to build
    or run) with the reason. ``pause`` runs before each step and each timing round (and
    source file of the top-1 check), outside the timed calls."""
    import torch
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    timing_threads = max(1, int(threads)) if threads else old_threads
    try:
        torch.set_num_threads(max(old_threads, min(8, os.cpu_count() or 1)))
        return _measure(modes, shape, reference_path, listener(progress, pause), seed, timing_threads, t_start)
    finally:
        torch.set_num_threads(old_threads)


def _measure(modes, shape, reference_path, hear, seed, timing_threads, t_start) -> Tuple[Figures, Rejected]:
    measured: Figures = {m: {} for m in modes}
    rejected: Rejected = {}

    def step(msg: str) -> None:
        say(hear, msg, step=True)

    # 1. speed, on the timing shape
    L, C, V = (int(x) for x in shape)
    say(hear, f"measuring which weight precision is fastest on this CPU ({', '.join(modes)}; "
              f"once per CPU, several seconds)")
    sd = measurement_checkpoint(L, C, V, seed)
    shp = shape_of(sd)
    models = {}
    for mode in modes:
        step(f"building the {L}x{C} timing model in {mode}")
        try:
            models[mode] = _build(sd, shp, mode)
        except Exception as e:                    # a mode this CPU or torch build cannot run
            rejected[mode] = f"cannot build: {one_line(e)}"
    _time_step(models, V, hear, timing_threads, measured, rejected)

    # 2. logit error on a random 0.1B checkpoint (peaked logits), against fp32
    if (L, C, V) != tuple(CAP_SHAPE):
        models, sd = {}, None
        gc.collect()
        gL, gC, gV = CAP_SHAPE
        step(f"precision accuracy check: random {gL}x{gC} checkpoint")
        sd = measurement_checkpoint(gL, gC, gV, seed + 1)
        shp = shape_of(sd)
    accuracy.random_checkpoint_errors(sd, shp, models, modes, seed, _build, measured, rejected)
    del models, sd
    gc.collect()

    # 3. top-1 agreement on real code with the trained default model
    if reference_path is not None:
        accuracy.real_code_top1(reference_path, modes, _build, step, measured, rejected)
        gc.collect()

    for mode in modes:
        if mode in rejected:
            continue
        why = accuracy.gate_failures(measured[mode], mode)
        if not all(math.isfinite(measured[mode].get(k, math.inf)) for k in ROUNDS):
            why.append("not timed")
        if why:
            rejected[mode] = "; ".join(why)
    log.info("rwkv.nvim: CPU precision measured in %.1f s", time.perf_counter() - t_start)
    return measured, rejected


def _time_step(models: Dict[str, object], vocab: int, hear, timing_threads: int,
               measured: Figures, rejected: Rejected) -> None:
    """Time ``models`` with the model's thread count into ``measured``; when one mode
    fails at run time, the others are timed alone and that one is rejected."""
    import torch
    build_threads = torch.get_num_threads()
    torch.set_num_threads(timing_threads)
    try:
        timed = _time_modes(models, vocab, hear)
    except Exception as e:                        # one mode failing at run time: time the others alone
        timed = {}
        for mode, m in list(models.items()):
            try:
                timed.update(_time_modes({mode: m}, vocab, None))
            except Exception as e2:
                rejected[mode] = f"fails to run: {one_line(e2)}"
        log.info("rwkv.nvim: timing all modes together failed (%s); timed one by one", one_line(e))
    finally:
        torch.set_num_threads(build_threads)
    for mode, figures in timed.items():
        measured[mode].update(figures)


def one_line(e: BaseException) -> str:
    from .errors import one_line as shorten
    return shorten(e, 160)
