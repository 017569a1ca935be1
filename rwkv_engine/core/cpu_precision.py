"""Which weight representation runs the model on this CPU: measured once, cached on disk.

``dtype = "auto"`` on the CPU resolves here. The candidates are ``model.cpu_modes()``
(each a valid ``dtype=`` of ``RWKV7`` on the CPU: "fp32", "int8", ...); nothing below
knows what a mode is beyond its name.

Measurement (``measure``), once per CPU:

* **speed** on a random checkpoint built in memory: the real model's shape (layers,
  width, vocabulary) when it is at most 0.1B-sized (``CAP_SHAPE``, 12 x 768, vocabulary
  65536), else ``CAP_SHAPE`` itself: a bigger model has the same balance of products
  (all of them memory- or compute-bound alike), and building and timing a 0.4B or 1.5B
  one would cost a minute. Decode-shaped: a forward of tokens [1, 1] and [8, 1] from a
  state; prefill-shaped: tokens [1, 64]. The modes are timed in turn, round after round
  (the best of up to ``ROUNDS`` counts; after ``MIN_ROUNDS``, more only within
  ``TIMING_BUDGET_S``), so a background load hits them all alike. Building and the
  accuracy checks use up to 8 cores; timing uses the model's own thread count.
* **accuracy gate**, against fp32: top-1 agreement >= ``TOP1_MIN`` teacher-forced over
  ``TOP1_TOKENS`` tokens of each of four standard-library sources (``REAL_CODE_MODULES``) with
  the trained default model, when one is given; and on a random checkpoint of
  ``CAP_SHAPE`` with trained-like (peaked) logits, over ``GATE_TOKENS`` random tokens:
  mean KL(fp32 || mode) <= ``KL_MAX`` and max |logit - fp32 logit| / max |fp32 logit|
  <= ``ERR_MAX``. A mode that fails (or fails to build or run) is never chosen; the
  verdict says why.

The rule (``choose``): among the modes that pass, order by the decode figure
(``decode_1 + decode_8``: one step of 1 row and one of 8 rows, the first ghost text and
the candidates); take the first whose ``prefill_64`` is at most ``PREFILL_SLACK`` (2x)
the fastest passing prefill. fp32 (the reference) is kept unless the pick is at least
``MARGIN`` (5 %) faster at decode: a tie within timing noise goes to the exact mode.
Today the model takes one dtype, so decode and prefill name the same mode; with
``split=True`` (a model that can run the phases in different representations) each
phase gets its own fastest passing mode.

Cache: ``<cache root>/cpu-precision.json`` (``$XDG_CACHE_HOME/rwkv.nvim`` or
``~/.cache/rwkv.nvim``; directories 0700, the file 0600), a list of verdicts, each with
its ``key``: CPU model name, a digest of the CPU flags, torch version, engine version,
a fingerprint of the model/kernel sources, the candidate list, the timing shape and
the thread count. A verdict is used only when its key matches; a corrupt or foreign
file is ignored and rewritten. ``RWKV_NVIM_CPU_PRECISION=<mode>`` skips all of it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .cache_paths import cache_root
from .private_fs import make_private_dir

log = logging.getLogger("rwkv_engine")

ENV = "RWKV_NVIM_CPU_PRECISION"
CACHE_NAME = "cpu-precision.json"
FORMAT = "rwkv.nvim cpu-precision 1"
KEEP = 16                      # verdicts kept in the file (other shapes, thread counts, torch versions)

REFERENCE = "fp32"             # the exact mode every other one is compared with
TOP1_MIN = 0.99                # top-1 agreement with fp32 on real code (default model)
TOP1_TOKENS = 1000              # per file, over REAL_CODE_MODULES (4000 tokens: 1 token = 0.025 %)
KL_MAX = 0.10                  # nats, mean over GATE_TOKENS positions of the random 0.1B checkpoint
ERR_MAX = 0.25                 # max |logit diff| / max |fp32 logit| there
GATE_TOKENS = 48
MARGIN = 0.05                  # a mode other than fp32 must be this much faster at decode
PREFILL_SLACK = 2.0            # the decode pick's prefill may be at most this x the fastest
CAP_SHAPE = (12, 768, 65536)   # (layers, width, vocabulary): G1 0.1B
ROUNDS = {"decode_1": 6, "decode_8": 4, "prefill_64": 3}   # timed calls per mode (best counts)
MIN_ROUNDS = 2                 # after these, a round starts only within TIMING_BUDGET_S
TIMING_BUDGET_S = 5.0

Progress = Optional[Callable[[str], None]]
Pause = Optional[Callable[[], None]]    # called between measurement steps; may wait (the engine is busy)

_memo: Dict[str, dict] = {}    # key (JSON) -> verdict, for this process


# -- candidates and key --------------------------------------------------------------------
def candidates() -> Tuple[str, ...]:
    """The CPU modes the model offers, fp32 first (the reference)."""
    from . import model as model_module
    modes = tuple(model_module.cpu_modes())
    return (REFERENCE,) + tuple(m for m in modes if m != REFERENCE) if REFERENCE in modes else modes


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


def _code_fingerprint() -> str:
    """A hash of the engine's core sources and the kernel sources: a new model or kernel
    implementation (same version number, e.g. in development) measures anew; the same
    code in a fresh clone or reinstall (new file times) does not."""
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


def timing_shape(n_layer: int, n_embd: int, vocab: int) -> Tuple[int, int, int]:
    """The shape timed for a model of this shape: itself up to 0.1B, else ``CAP_SHAPE``."""
    L, C, V = CAP_SHAPE
    if n_layer * n_embd * n_embd <= L * C * C and vocab * n_embd <= V * C:
        return (n_layer, n_embd, vocab)
    return CAP_SHAPE


def cache_key(shape: Sequence[int], threads: int, modes: Optional[Sequence[str]] = None) -> dict:
    import torch

    from .. import __version__
    return {**cpu_identity(), "torch": torch.__version__, "engine": __version__,
            "code": _code_fingerprint(), "candidates": list(modes if modes is not None else candidates()),
            "shape": "x".join(str(int(x)) for x in shape), "threads": int(threads)}


def _key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


# -- cache file ----------------------------------------------------------------------------
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
    want = _key_text(key)
    for v in _read_verdicts(cache_file(cache_dir)):
        if _key_text(v["key"]) == want:
            return v
    return None


def store(verdict: dict, cache_dir=None) -> Path:
    """Write ``verdict`` into the cache file (replacing one with the same key), 0600 in a
    0700 directory, atomically. Raises OSError when the place is not writable."""
    path = cache_file(cache_dir)
    make_private_dir(path.parent)
    want = _key_text(verdict["key"])
    kept = [v for v in _read_verdicts(path) if _key_text(v["key"]) != want]
    kept = sorted(kept, key=lambda v: v.get("time", 0))[-(KEEP - 1):] + [verdict]
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"format": FORMAT, "verdicts": kept}, fh, indent=1)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# -- random checkpoints --------------------------------------------------------------------
def random_state_dict(n_layer: int, n_embd: int, vocab: int, seed: int = 0) -> dict:
    """A random x070 state dict scaled like a trained model's, with peaked (trained-like)
    logits: ln_out's bias carries a gain along a unit vector u and head row v carries a
    Zipf-like prior along u (as tests/random_checkpoint.py ``trained_like``), so top-1
    and KL measure precision rather than ties of a flat distribution."""
    import torch
    g = torch.Generator().manual_seed(seed)
    C, H = n_embd, n_embd // 64
    Fd = 4 * C

    def lora(x):
        return max(32, int(round(x / 32) * 32))
    dw, dv, dg = lora(1.8 * math.sqrt(C)), lora(1.3 * math.sqrt(C)), lora(0.6 * C ** 0.8)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g).mul_(scale)

    def uni(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g).mul_(hi - lo).add_(lo)

    # the embedding is only looked up (then normed): 1024 drawn rows, repeated
    sd = {"emb.weight": rnd(min(vocab, 1024), C).repeat(-(-vocab // 1024), 1)[:vocab].contiguous()}
    for i in range(n_layer):
        b, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        lns = ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2")
        for ln in lns:
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = 1 + rnd(C, scale=0.1), rnd(C, scale=0.1)
        for c in "rwkvag":
            sd[a + "x_" + c] = uni(1, 1, C)
        sd[a + "w0"] = uni(1, 1, C, lo=-6.0, hi=1.0)
        for name, d in (("w", dw), ("a", dw), ("v", dv), ("g", dg)):
            sd[a + name + "1"], sd[a + name + "2"] = rnd(C, d, scale=0.1), rnd(d, C, scale=0.1)
        sd[a + "a0"], sd[a + "v0"] = rnd(1, 1, C, scale=0.5), rnd(1, 1, C, scale=0.5)
        sd[a + "k_k"], sd[a + "k_a"] = uni(1, 1, C, lo=0.5, hi=1.0), uni(1, 1, C, lo=0.5, hi=1.5)
        sd[a + "r_k"] = rnd(H, 64, scale=0.3)
        for name in ("receptance", "key", "value", "output"):
            sd[a + name + ".weight"] = rnd(C, C, scale=1 / math.sqrt(C))
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = 1 + rnd(C, scale=0.1), rnd(C, scale=0.1)
        sd[f + "x_k"] = uni(1, 1, C)
        sd[f + "key.weight"] = rnd(Fd, C, scale=1 / math.sqrt(C))
        sd[f + "value.weight"] = rnd(C, Fd, scale=1 / math.sqrt(Fd))
    u = torch.nn.functional.normalize(torch.randn(C, generator=g), dim=0)
    prior = 14.0 - 2.0 * torch.log(torch.randperm(vocab, generator=g).float() + 1)
    sd["ln_out.weight"] = 1 + rnd(C, scale=0.1)
    sd["ln_out.bias"] = rnd(C, scale=0.1) + 8.0 * u
    sd["head.weight"] = rnd(vocab, C, scale=2.0 / math.sqrt(C)).add_(prior[:, None] / 8.0 * u)
    if vocab != 65536:
        sd["vocab.world_ids"] = torch.arange(vocab, dtype=torch.long)
    return sd


def _shape_of(sd: dict):
    from .checkpoint import infer_shape
    return infer_shape(sd, Path("<random checkpoint>"))[0]


def _build(sd: dict, shape, mode: str, world_ids=None):
    """The model of ``sd`` in CPU mode ``mode`` (tests replace this to inject a mode)."""
    from .model import RWKV7
    return RWKV7(sd, shape, device="cpu", dtype=mode, world_ids=world_ids)


# -- measurement ---------------------------------------------------------------------------
def _listener(progress: Progress, pause: Pause):
    """What the measurement's steps call (``_say``): ``pause`` first (never inside a timed
    call: a busy engine holds the measurement there, between steps), then ``progress``."""
    def hear(msg: str, step: bool) -> None:
        if pause is not None:
            pause()
        if progress is not None and not step:
            progress(msg)
    return hear


def _say(hear, msg: str, step: bool = False) -> None:
    """Log ``msg``; tell the listener (``_listener``; None: nobody) about it, ``step``: a
    minor one (no notification)."""
    log.info("rwkv.nvim: %s", msg)
    if hear is not None:
        try:
            hear(msg, step)
        except MeasurementStopped:
            raise
        except Exception:                         # a broken listener must not stop the measurement
            log.exception("rwkv.nvim: precision progress callback failed")


def _time_modes(models: Dict[str, object], vocab: int, progress: Progress) -> Dict[str, dict]:
    """Best-of ms per mode for decode_1, decode_8 and prefill_64, round-robin over modes."""
    import torch
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (1, 64), generator=g)
    one, eight = prompt[:, :1].clone(), torch.randint(0, vocab, (8, 1), generator=g)
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
    t0 = time.perf_counter()
    for r in range(max(ROUNDS.values())):
        if r >= MIN_ROUNDS and time.perf_counter() - t0 > TIMING_BUDGET_S:
            break                                 # a slow or busy machine: the best so far
        _say(progress, f"timing CPU precision modes ({r + 1}/{max(ROUNDS.values())})", step=True)
        for kind, n in ROUNDS.items():
            if r >= n:
                continue
            for name, m in models.items():
                t0 = time.perf_counter()
                calls[kind](m, states[name])
                best[name][kind] = min(best[name][kind], (time.perf_counter() - t0) * 1000)
    return {name: {k: round(v, 3) for k, v in b.items()} for name, b in best.items()}


def _logit_error(ref, got) -> Tuple[float, float, float]:
    """(mean KL(ref || got) in nats, max |diff| / max |ref|, top-1 agreement) over rows."""
    import torch
    ref, got = ref.reshape(-1, ref.shape[-1]).double(), got.reshape(-1, got.shape[-1]).double()
    lr, lg = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (lr.exp() * (lr - lg)).sum(-1).mean().item()
    err = ((ref - got).abs().max() / ref.abs().max().clamp_min(1e-9)).item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).double().mean().item()
    return kl, err, top1


REAL_CODE_MODULES = ("json.decoder", "argparse", "textwrap", "shutil")


def real_code_texts() -> List[Tuple[str, str]]:
    """[(label, text)]: four standard-library sources (always present). One file of 512
    tokens was too small a sample: a mode at 99.3 % over these 4000 tokens measured
    98.8 % on json/decoder.py alone."""
    import importlib
    out = []
    for name in REAL_CODE_MODULES:
        path = Path(importlib.import_module(name).__file__)
        out.append((path.name, path.read_text(encoding="utf-8")))
    return out


def _finite(x) -> bool:
    import torch
    return bool(torch.isfinite(x).all())


class MeasurementStopped(Exception):
    """Raised by a ``pause`` callback to end a measurement early (the engine is closing)."""


def measure(modes: Sequence[str], shape: Sequence[int], reference_path=None,
            progress: Progress = None, seed: int = 0,
            threads: Optional[int] = None, pause: Pause = None) -> Tuple[Dict[str, dict], Dict[str, str]]:
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
        return _measure(modes, shape, reference_path, _listener(progress, pause), seed, timing_threads, t_start)
    finally:
        torch.set_num_threads(old_threads)


def _measure(modes, shape, reference_path, progress, seed, timing_threads, t_start):
    import gc

    import torch
    measured: Dict[str, dict] = {m: {} for m in modes}
    rejected: Dict[str, str] = {}

    def build_all(sd, shp, what):
        built = {}
        for mode in modes:
            if mode in rejected:
                continue
            _say(progress, f"building the {what} in {mode}", step=True)
            try:
                built[mode] = _build(sd, shp, mode)
            except Exception as e:                 # a mode this CPU or torch build cannot run
                rejected[mode] = f"cannot build: {_one_line(e)}"
        return built

    # 1. speed, on the timing shape
    L, C, V = (int(x) for x in shape)
    _say(progress, f"measuring which weight precision is fastest on this CPU ({', '.join(modes)}; "
                   f"once per CPU, several seconds)")
    sd = random_state_dict(L, C, V, seed)
    shp = _shape_of(sd)
    models = build_all(sd, shp, f"{L}x{C} timing model")
    build_threads = torch.get_num_threads()
    torch.set_num_threads(timing_threads)
    try:
        timed = _time_modes(models, V, progress)
    except Exception as e:                        # one mode failing at run time: time the others alone
        timed = {}
        for mode, m in list(models.items()):
            try:
                timed.update(_time_modes({mode: m}, V, None))
            except Exception as e2:
                rejected[mode] = f"fails to run: {_one_line(e2)}"
        log.info("rwkv.nvim: timing all modes together failed (%s); timed one by one", _one_line(e))
    finally:
        torch.set_num_threads(build_threads)
    for mode, figures in timed.items():
        measured[mode].update(figures)

    # 2. logit error on a random 0.1B checkpoint (peaked logits), against fp32
    if (L, C, V) != tuple(CAP_SHAPE):
        models = {}
        gc.collect()
        gL, gC, gV = CAP_SHAPE
        _say(progress, f"precision accuracy check: random {gL}x{gC} checkpoint", step=True)
        sd = random_state_dict(gL, gC, gV, seed + 1)
        shp = _shape_of(sd)
    gV = shp.vocab_size
    toks = torch.randint(0, gV, (1, GATE_TOKENS), generator=torch.Generator().manual_seed(seed + 2))
    ref_model = models.get(REFERENCE)
    if ref_model is None:
        ref_model = _build(sd, shp, REFERENCE)
    ref_logits = ref_model.forward(toks, all_logits=True)[0]
    for mode in modes:
        if mode in rejected:
            continue
        if mode == REFERENCE:
            measured[mode].update(kl=0.0, max_logit_err=0.0)
            continue
        try:
            m = models.pop(mode, None)
            if m is None:
                m = _build(sd, shp, mode)
            got = m.forward(toks, all_logits=True)[0]
            del m
        except Exception as e:
            rejected[mode] = f"fails to run: {_one_line(e)}"
            continue
        if not _finite(got):
            rejected[mode] = "non-finite logits"
            continue
        kl, err, _ = _logit_error(ref_logits, got)
        measured[mode].update(kl=round(kl, 5), max_logit_err=round(err, 5))
    del models, ref_model, sd
    gc.collect()

    # 3. top-1 agreement on real code with the trained default model
    if reference_path is not None:
        from .checkpoint import load_checkpoint
        texts = real_code_texts()
        _say(progress, f"precision accuracy check: top-1 on {len(texts)} source files with the "
                       "default model", step=True)
        _, sd, shp, world_ids = load_checkpoint(reference_path)
        ref = _build(sd, shp, REFERENCE, world_ids)
        batches = [torch.tensor([ref.tokenizer.encode(text)[:TOP1_TOKENS]]) for _, text in texts]
        ref_top = [ref.forward(toks, all_logits=True)[0].argmax(-1) for toks in batches]
        total = sum(int(t.numel()) for t in batches)
        del ref
        for mode in modes:
            if mode in rejected:
                continue
            if mode == REFERENCE:
                measured[mode]["top1"] = 1.0
                continue
            try:
                model = _build(sd, shp, mode, world_ids)
                agree = 0
                for i, (toks, top) in enumerate(zip(batches, ref_top)):
                    _say(progress, f"top-1 check of {mode}: file {i + 1}/{len(batches)}", step=True)
                    agree += int((model.forward(toks, all_logits=True)[0].argmax(-1) == top).sum())
            except Exception as e:
                rejected[mode] = f"fails to run: {_one_line(e)}"
                continue
            measured[mode]["top1"] = round(agree / total, 5)
            measured[mode]["top1_tokens"] = total
        del sd
        gc.collect()

    for mode in modes:
        if mode in rejected:
            continue
        f = measured[mode]
        why = []
        if "top1" in f and f["top1"] < TOP1_MIN:
            why.append(f"top-1 {f['top1'] * 100:.1f} % < {TOP1_MIN * 100:.0f} % on real code")
        if f.get("kl", 0.0) > KL_MAX:
            why.append(f"KL {f['kl']:.3f} > {KL_MAX} on a random 0.1B checkpoint")
        if f.get("max_logit_err", 0.0) > ERR_MAX:
            why.append(f"logit error {f['max_logit_err']:.3f} > {ERR_MAX}")
        if not all(math.isfinite(f.get(k, math.inf)) for k in ROUNDS):
            why.append("not timed")
        if why:
            rejected[mode] = "; ".join(why)
    log.info("rwkv.nvim: CPU precision measured in %.1f s", time.perf_counter() - t_start)
    return measured, rejected


def _one_line(e: BaseException) -> str:
    from .errors import one_line
    return one_line(e, 160)


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
        if forced in modes:
            return {"decode": forced, "prefill": forced, "source": "env", "measured": {},
                    "why": f"{ENV}={forced}", "key": {}, "time": time.time()}
        log.warning("rwkv.nvim: %s=%r is not a CPU mode (%s): ignored", ENV, forced, ", ".join(modes))
    tshape = timing_shape(*shape)
    key = cache_key(tshape, threads, modes)
    text = _key_text(key)
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
    v = {"decode": dec, "prefill": pre, "why": why, "measured": measured, "rejected": rejected,
         "key": key, "time": time.time()}
    try:
        where = store(v, cache_dir)
        log.info("rwkv.nvim: CPU precision %s (%s), cached in %s", dec, why, where)
    except OSError as e:
        log.warning("rwkv.nvim: cannot cache the CPU precision verdict (%s): measured again next start", e)
    v = dict(v, source="measured")
    _memo[text] = v
    _say(_listener(progress, None), f"CPU precision measured in {time.perf_counter() - t0:.1f} s: {describe(v)}")
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
    parts = []
    if "decode_1" in f:
        cmp = [f"{m} {measured[m]['decode_1']:.1f} ms" for m in measured
               if m != mode and "decode_1" in measured[m]]
        parts.append(f"decode {f['decode_1']:.1f} ms" + (f" vs {', '.join(cmp)}" if cmp else ""))
    if "top1" in f and mode != REFERENCE:
        parts.append(f"top-1 {f['top1'] * 100:.1f} %")
    for m, r in rejected.items():
        parts.append(f"{m} rejected: {r}")
    return f"{head} (auto: {'; '.join(parts) or v.get('why', '')})"


def forget() -> None:
    """Drop this process's verdicts (tests; after ``rwkv-nvim info --measure-precision``)."""
    _memo.clear()
