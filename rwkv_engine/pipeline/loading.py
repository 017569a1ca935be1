"""Which model runs where: model resolution, device choice, CPU threads, and the
out-of-memory policy (fewer rows, then the CPU) shared by requests and priming.
torch is imported on use (``DEFAULT_MODEL`` is read by cheap command-line code).

No orchestration here: ``Completer`` calls these; nothing here imports it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, Optional

from ..core.checkpoint import CheckpointError
from ..core.errors import is_out_of_memory, one_line
from .config import EngineConfig

log = logging.getLogger("rwkv_engine")

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "data" / "default-model.pth"

Warn = Optional[Callable[[str], None]]


def resolve_model_path(config: EngineConfig) -> Path:
    """The checkpoint file for ``config.model`` (None = the shipped default model)."""
    if config.model is None:
        if not DEFAULT_MODEL.is_file():
            raise CheckpointError(f"{DEFAULT_MODEL}: the default model is missing; set engine.model "
                                  "to a checkpoint path or a downloaded model such as g1-0.1b")
        return DEFAULT_MODEL
    p = Path(os.path.expanduser(config.model))
    if p.is_file() or Path(str(p) + ".pth").is_file():
        return p
    if os.sep not in config.model and "/" not in config.model:
        from ..core.download import resolve_local
        found = resolve_local(config.model, config.download_dir)
        if found is not None:
            return found
        raise CheckpointError(f"model {config.model!r} is neither a file nor a downloaded model; "
                              f"run: rwkv-nvim download {config.model}")
    return p        # load_model raises a CheckpointError naming the missing file


def pick_device(config: EngineConfig) -> str:
    """The device ``config.device`` asks for: "auto" is CUDA/ROCm when torch sees a GPU,
    else the CPU (never MPS: it has not run on a Mac yet, so it is chosen explicitly)."""
    import torch
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def mps_available() -> bool:
    """torch's MPS backend (Apple Silicon GPU) is built in and usable here."""
    import torch
    mps = getattr(torch.backends, "mps", None)
    try:
        return bool(mps is not None and mps.is_available())
    except Exception:                                # an old torch, a broken Metal setup
        return False


def load_configured_model(config: EngineConfig, warn: Warn = None, measure_now: bool = True):
    """Load ``config.model``; ``device = "cuda"`` without a usable GPU falls back to the
    CPU with one ``warn`` (a log warning when ``warn`` is None). ``measure_now=False``:
    without a cached CPU precision verdict, load fp32 (safe on every CPU) at once and
    mark ``model.precision["pending"]`` (the caller measures later) instead of measuring."""
    import torch

    from ..core.model import load_model
    device = pick_device(config)
    if device == "cuda" and not torch.cuda.is_available():
        say(warn, "CUDA was requested but torch sees no CUDA/ROCm GPU: running on the CPU (slower)")
        device = "cpu"
    elif device == "mps" and not mps_available():
        say(warn, "MPS was requested but torch has no usable MPS backend here (an Apple Silicon "
                  "Mac with macOS 12.3+): running on the CPU")
        device = "cpu"
    dtype = None if config.dtype == "auto" else config.dtype
    path = resolve_model_path(config)
    precision = None
    if device == "cpu":
        dtype, precision = cpu_precision_for(config, path, warn, measure_now=measure_now)
    try:
        model = load_model(path, device=device, dtype=dtype)
    except RuntimeError as e:                       # not the file's fault (CheckpointError is not one)
        if device == "cpu":
            raise
        # the GPU cannot run it ("no kernel image is available", a driver error, out of
        # memory): the CPU can, slower; say why once
        say(warn, f"cannot run the model on the GPU ({one_line(e, 160)}): running on the CPU (slower)")
        dtype, precision = cpu_precision_for(config, path, warn, measure_now=measure_now)
        model = load_model(path, device="cpu", dtype=dtype)
    if model.device.type == "cpu":
        torch.set_num_threads(cpu_threads(config.threads, model.shape.n_embd))
    elif config.cuda_graphs and model.device.type == "cuda":
        model.enable_cuda_graphs().capture_all()   # at load, not on a keystroke; eager on any error
    model.precision = precision or precision_of(model)
    settle_garbage_collector()
    return model


def settle_garbage_collector() -> None:
    """Collect once, then move every object alive now (torch, the model, the host) out
    of the collector's reach (``gc.freeze``). Without it a full collection walks ~165k
    objects (75 ms measured on a 2-core EPYC) every ~70k allocations - a pause that
    lands on some keystroke; with it, collections only walk what requests create."""
    import gc
    gc.collect()
    gc.freeze()


def load_on_cpu(config: EngineConfig, error: BaseException, warn: Warn = None):
    """The configured model reloaded on the CPU after ``error`` (out of GPU memory);
    re-raises ``error`` when even that fails."""
    import torch

    from ..core.model import load_model
    try:
        path = resolve_model_path(config)
        dtype, precision = cpu_precision_for(config, path, warn)
        model = load_model(path, device="cpu", dtype=dtype)
    except Exception:
        raise error from None                    # cannot reload: report the original failure
    torch.set_num_threads(cpu_threads(config.threads, model.shape.n_embd))
    model.precision = precision
    say(warn, f"out of GPU memory ({one_line(error, 80)}): running on the CPU from now on (slower)")
    return model


# -- CPU precision -------------------------------------------------------------------------
def cpu_precision_for(config: EngineConfig, path: Path, warn: Warn = None,
                      progress: Optional[Callable[[str], None]] = None, measure_now: bool = True,
                      pause=None) -> tuple:
    """(dtype for ``load_model`` on the CPU, precision record) for ``config``: an explicit
    CPU mode as configured; ``"auto"`` (and a GPU-only dtype, once the model falls back to
    the CPU) the mode ``core.cpu_precision`` chose for this CPU by measurement (cached per
    CPU, measured on first use; ``progress`` hears about it), once this model passed the
    accuracy gate of that mode (``core.model_precision``, cached per model file; see
    ``gated_by_model``). A failed measurement is not fatal: fp32, with one ``warn``.
    ``measure_now=False`` and no verdict (or no gate result) yet: fp32 and ``"pending":
    True`` in the record. ``pause``: called between the measurement's steps (the service's
    background thread; it may raise MeasurementStopped, which passes through). The record
    (``precision_of``'s keys) is what status shows: {"mode", "source": "config" | "auto" |
    "env", "summary", "why"} (+ "model_check": the gate's result)."""
    from ..core import cpu_precision as cp
    if config.dtype != "auto" and config.dtype in cp.cpu_modes():
        return config.dtype, {"mode": config.dtype, "source": "config",
                              "summary": f"{config.dtype} (engine.dtype)", "why": "engine.dtype"}
    try:
        verdict = resolve_cpu_precision(config, path, progress=progress, measure_now=measure_now, pause=pause)
    except cp.MeasurementStopped:
        raise
    except Exception as e:                        # CheckpointError: load_model names the file
        if not isinstance(e, CheckpointError):
            log.warning("rwkv.nvim: CPU precision measurement failed", exc_info=True)
            say(warn, f"could not measure the CPU precision ({one_line(e, 120)}): running fp32")
        return cp.REFERENCE, {"mode": cp.REFERENCE, "source": "auto", "summary": f"{cp.REFERENCE} (auto: "
                              f"not measured: {one_line(e, 80)})", "why": one_line(e, 160)}
    if verdict is None:
        return pending_precision(path)
    mode = verdict["decode"]     # the model runs one dtype today: decode and prefill agree (see choose)
    source = "env" if verdict.get("source") == "env" else "auto"
    record = {"mode": mode, "source": source, "summary": cp.describe(verdict),
              "why": verdict.get("why", ""), "measured": verdict.get("measured", {})}
    if source == "auto" and mode != cp.REFERENCE:
        return gated_by_model(config, path, verdict, record, warn, progress, measure_now, pause)
    return mode, record


def gated_by_model(config: EngineConfig, path: Path, verdict: dict, record: dict, warn: Warn = None,
                   progress: Optional[Callable[[str], None]] = None, measure_now: bool = True,
                   pause=None) -> tuple:
    """(dtype, record) once the lossy modes this CPU's ``verdict`` allows are checked on the
    model at ``path`` (``core.model_precision.check``: top-1 and KL against fp32 on real
    code, cached per model file), fastest first (the verdict's ``ladder``; one fp32
    reference pass for all): the first that passes; fp32 with the reasons when none
    passes or they cannot be checked; fp32 and ``"pending"`` with ``measure_now=False`` and
    no cached result for the next mode. A model whose fp32 copy does not fit in memory
    gets int8 instead of fp32 in all of these (the gate's reference, ``mp.reference_mode``)."""
    from ..core import cpu_precision as cp
    from ..core import model_precision as mp

    def step(msg: str) -> None:
        if pause is not None:
            pause()
        if progress is not None:
            progress(msg)
    reference = mp.Reference(checkpoint_file(path), *mp.reference_mode(checkpoint_file(path)))
    ref_mode = reference.mode                                # fp32, or int8 when fp32 does not fit
    failed: list = []
    for mode in verdict.get("ladder") or [verdict["decode"]]:
        try:
            result = mp.check(checkpoint_file(path), mode, cache_dir=config.resolved_cache_dir(), step=step,
                              measure_now=measure_now, reference=reference)
        except cp.MeasurementStopped:
            raise
        except Exception as e:
            log.warning("rwkv.nvim: the model precision check failed", exc_info=True)
            say(warn, f"could not check {mode} on this model ({one_line(e, 120)}): running {ref_mode}")
            return ref_mode, dict(record, mode=ref_mode, summary=f"{ref_mode} (auto: {mode} not "
                                  f"checked on this model: {one_line(e, 80)})", why=one_line(e, 160))
        summary = mp.summary(cp.speed_line(verdict, mode) or verdict.get("why", ""), mode, result, failed, ref_mode)
        if result is None:
            return ref_mode, dict(record, mode=ref_mode, pending=True, summary=summary,
                                  why=f"this CPU prefers {mode}; checking it on this model first")
        why = f"{record['why']}; this model: " + "; ".join(
            [f"{m} failed: {r['why']}" for m, r in failed] + [result["why"]])
        if result["passed"]:
            return mode, dict(record, mode=mode, summary=summary, why=why, model_check=result)
        if not result.get("checked", True):        # no room for the reference: none can be checked
            break
        failed.append((mode, result))
    return ref_mode, dict(record, mode=ref_mode, summary=summary, why=why, model_check=result)


def checkpoint_file(path: Path) -> Path:
    """The file ``path`` names (``.pth`` optional, as ``load_model`` reads it)."""
    p = Path(path)
    return p if p.is_file() or not Path(str(p) + ".pth").is_file() else Path(str(p) + ".pth")


def pending_precision(path: Path) -> tuple:
    """(dtype, record) of a model loaded before this CPU was measured: fp32, or int8 when
    an fp32 copy of the model does not fit in memory (``model_precision.safe_mode``)."""
    from ..core import cpu_precision as cp
    from ..core import model_precision as mp
    mode = mp.safe_mode(checkpoint_file(path))
    why = "no verdict cached for this CPU yet: fp32 runs on every CPU until it is measured"
    if mode != cp.REFERENCE:
        why = f"no verdict cached for this CPU yet: {mode} runs until it is measured (fp32 does not fit in memory)"
    return mode, {"mode": mode, "source": "auto", "pending": True,
                  "summary": f"{mode} (auto: measuring this CPU in the background)", "why": why}


def resolve_cpu_precision(config: EngineConfig, path: Optional[Path] = None,
                          progress: Optional[Callable[[str], None]] = None, remeasure: bool = False,
                          measure_now: bool = True, pause=None) -> Optional[dict]:
    """The CPU precision verdict for ``config``'s model (``path``; default: resolved from
    ``config``): its shape (read from the memory-mapped checkpoint) and thread count pick
    the cached verdict; measured now if there is none (or ``remeasure``; with
    ``measure_now=False`` None instead)."""
    from ..core import cpu_precision as cp
    from ..core.checkpoint import load_checkpoint
    if cp.override() is not None and not remeasure and cp.override() in cp.cpu_modes():
        return cp.resolve((0, 0, 0), 1)             # no checkpoint read for the override
    _, sd, shape, _ = load_checkpoint(path if path is not None else resolve_model_path(config))
    del sd
    reference = DEFAULT_MODEL if DEFAULT_MODEL.is_file() else None
    return cp.resolve((shape.n_layer, shape.n_embd, shape.vocab_size), cpu_threads(config.threads, shape.n_embd),
                      cache_dir=config.resolved_cache_dir(), reference_path=reference, progress=progress,
                      remeasure=remeasure, measure_now=measure_now, pause=pause)


def precision_of(model) -> dict:
    """The precision record of a loaded ``model`` (``model.precision`` when loading set it)."""
    rec = getattr(model, "precision", None)
    if isinstance(rec, dict) and rec.get("mode"):
        return rec
    mode = getattr(model, "quant", None) or str(getattr(model, "dtype", "")).replace("torch.", "")
    where = getattr(getattr(model, "device", None), "type", "")
    return {"mode": mode, "source": "model", "summary": mode if where == "cpu" or not where
            else f"{mode} ({where})", "why": ""}


def cpu_kernels_in_use(model) -> str:
    """The instruction-set paths of the CPU products a CPU model runs: "q8: avx2" (int8:
    every product), "q8: avx2, q4a8: avx2" (the q4 modes: their big matrices, beside the
    q8 head and LoRAs), "q8: neon-dotprod", "q8: scalar"; "" on a GPU, for a model without
    the compiled kernel (``use_kernel=False``, RWKV_NVIM_NO_KERNEL) or when the kernel did
    not build. Never builds: a CPU model built the kernel when it loaded."""
    if getattr(getattr(model, "device", None), "type", "") != "cpu" or not getattr(model, "use_kernel", False):
        return ""
    from ..core.kernel_loader import cpu_isas, kernels_disabled, kernel_status
    if kernels_disabled() or not kernel_status().get("cpu", "").startswith("ready"):
        return ""
    try:
        isas = cpu_isas()
    except Exception:                               # an older build without these ops
        return ""
    if not isas:
        return ""
    names = ["q8"] + [n for n in (getattr(model, "quant", None),) if n in isas and n != "q8"]
    return ", ".join(f"{n}: {isas[n]}" for n in names)


def cpu_threads(configured: int, n_embd: int) -> int:
    """Torch CPU threads: the configured number, else 1 for small models (per-op overhead
    dominates and a second thread only competes with the editor), else up to 8 cores."""
    if configured:
        return configured
    return 1 if n_embd <= 512 else max(1, min(8, os.cpu_count() or 1))


def say(warn: Warn, message: str) -> None:
    """Deliver a one-line notice to ``warn``, or to the log without one."""
    if warn is not None:
        warn(message)
    else:
        log.warning("rwkv.nvim: %s", message)


# -- out of memory ------------------------------------------------------------------------
class OutOfMemory(Exception):
    """An out-of-memory error of one phase; the caller decides what to give up."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(str(error))
        self.stage, self.error = stage, error     # stage: "prefill" | "decode"


@contextlib.contextmanager
def out_of_memory_as(stage: str):
    """Re-raise an out-of-memory error inside the block as ``OutOfMemory(stage)``."""
    try:
        yield
    except Exception as e:
        if is_out_of_memory(e):
            raise OutOfMemory(stage, e) from e
        raise


def free_gpu_memory() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if mps_available():
        torch.mps.empty_cache()
