"""Synchronous completion pipeline: one request in, ranked candidates + stats out.

``Completer`` owns the model, the state cache, the context ring and the prompt
builder. Per request:

    prompt (segments) -> longest cached prefix (hash chain) -> prefill the rest,
    storing checkpoints at segment boundaries and at the last few token positions
    -> fork into N rows -> batched decode with stops -> filter/rank -> stats

It is single-threaded; ``rwkv_engine.service.CompletionService`` runs it on a worker
thread, and ``rwkv-nvim complete`` / ``bench`` drive it directly. ``should_stop``
is polled between prefill pieces (``config.prefill_chunk`` tokens) and decode steps;
a stopped request returns None and leaves every checkpoint it reached in the cache.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from .candidates import Row, StopRules, decode_candidates, rank_candidates
from .checkpoint import CheckpointError
from .config import EngineConfig
from .context_ring import ContextRing
from .prompt_layout import CK_NONE, CK_PERSIST, Prompt, PromptBuilder, Segment
from .sampler import SamplingParams
from .state_cache import Snapshot, StateCache, chain_key, partial_keys

log = logging.getLogger("rwkv_engine")

DEFAULT_MODEL = Path(__file__).with_name("data") / "default-model.pth"
_PARTIAL_PARENTS = 256     # segment starts remembered as having checkpoints inside the segment
_SPEC_CONTEXT = 8          # lines above/below the cursor compared to confirm a speculation

ShouldStop = Optional[Callable[[], bool]]


# -- model selection -----------------------------------------------------------------
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
        from .download import resolve_local
        found = resolve_local(config.model, config.download_dir)
        if found is not None:
            return found
        raise CheckpointError(f"model {config.model!r} is neither a file nor a downloaded model; "
                              f"run: rwkv-nvim download {config.model}")
    return p        # load_model raises a CheckpointError naming the missing file


def pick_device(config: EngineConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def load_configured_model(config: EngineConfig, warn: Optional[Callable[[str], None]] = None):
    """Load ``config.model``; ``device = "cuda"`` without a usable GPU falls back to the
    CPU with one ``warn`` (a log warning when ``warn`` is None)."""
    from .model import load_model
    device = pick_device(config)
    if device == "cuda" and not torch.cuda.is_available():
        _warn(warn, "CUDA was requested but torch sees no CUDA/ROCm GPU: running on the CPU (slower)")
        device = "cpu"
    dtype = None if config.dtype == "auto" else config.dtype
    model = load_model(resolve_model_path(config), device=device, dtype=dtype)
    if model.device.type == "cpu":
        torch.set_num_threads(cpu_threads(config.threads, model.shape.n_embd))
    return model


def cpu_threads(configured: int, n_embd: int) -> int:
    """Torch CPU threads: the configured number, else 1 for small models (per-op overhead
    dominates and a second thread only competes with the editor), else up to 8 cores."""
    if configured:
        return configured
    return 1 if n_embd <= 512 else max(1, min(8, os.cpu_count() or 1))


def _warn(warn: Optional[Callable[[str], None]], message: str) -> None:
    if warn is not None:
        warn(message)
    else:
        log.warning("rwkv.nvim: %s", message)


def is_out_of_memory(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


class _OutOfMemory(Exception):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(str(error))
        self.stage, self.error = stage, error     # stage: "prefill" | "decode"


@contextlib.contextmanager
def _out_of_memory_as(phase: str):
    """Re-raise an out-of-memory error of ``phase`` as _OutOfMemory (the service retries)."""
    try:
        yield
    except Exception as e:
        if is_out_of_memory(e):
            raise _OutOfMemory(phase, e) from e
        raise


# -- bookkeeping -----------------------------------------------------------------------
@dataclass
class PrefillResult:
    snapshot: Snapshot        # state + logits after the whole prompt
    key: str                  # cache key of the whole prompt
    reused: int               # tokens taken from the cache
    fed: int                  # tokens run through the model
    tier: Optional[str]       # tier of the resume checkpoint (None = cold start)


@dataclass
class _LastRequest:
    id: object
    request: dict
    prompt: Prompt
    key: str                  # cache key of the state after the prompt
    rows: List[Row]


@dataclass
class _Speculation:
    parent_key: str           # state after the accepted request's prompt
    tokens: List[int]         # accepted text as the model's tokens
    expect: dict              # what the next request must look like to use it


class Completer:
    """Owns model + state cache + context ring; does one request at a time."""

    def __init__(self, config: Optional[EngineConfig] = None, model=None,
                 on_warning: Optional[Callable[[str], None]] = None):
        """``on_warning(message)`` receives one-line notices (CPU fallback, fewer candidates
        after running out of memory); without it they go to the log."""
        self.config = config if config is not None else EngineConfig()
        self.on_warning = on_warning
        cfg = self.config
        self.ring = ContextRing(cfg.ring_n_chunks, cfg.ring_chunk_size, cfg.ring_queue)
        self._use_model(model if model is not None else load_configured_model(cfg, on_warning))
        self.last_stats: dict = {}
        self.last_prime: dict = {}

    def _use_model(self, model) -> None:
        """(Re)build everything that depends on the model (its cache keys name it)."""
        self.model = model
        self.tokenizer = model.tokenizer
        self.builder = PromptBuilder(self.config, self.tokenizer)
        self.cache = StateCache.from_config(self.config, model.model_id, model.device)
        self._partial_parents: "OrderedDict[str, None]" = OrderedDict()
        self._chunk_segments: "OrderedDict[tuple, Segment]" = OrderedDict()
        self._last: Optional[_LastRequest] = None
        self._spec: Optional[_Speculation] = None
        self.rows = self.config.candidates        # candidates decoded together (lowered on OOM)

    # -- public API --------------------------------------------------------------------
    def add_chunk(self, text: str, filename: str = "") -> bool:
        """Queue an extra-context chunk (moved into the ring by ``prime_step``)."""
        return self.ring.add(text, filename)

    def cache_stats(self) -> dict:
        s = self.cache.stats()
        s["ring"] = {"chunks": len(self.ring.chunks), "queued": len(self.ring.queue)}
        s["line_cache"] = {"hits": self.builder.lines.hits, "misses": self.builder.lines.misses}
        return s

    def build_prompt(self, request: dict) -> Prompt:
        """The prompt ``complete`` would use now (evicts ring chunks too similar to the cursor)."""
        self.ring.evict_similar(self.builder.around_cursor(request))
        return self.builder.build(request, self._ring_chunks())

    def complete(self, request: dict, on_partial: Optional[Callable[[str], None]] = None,
                 should_stop: ShouldStop = None) -> Optional[dict]:
        """Candidates for ``request`` ({lines, first, row, col, ...}); None if stopped.

        Out of memory while decoding N rows retries with N/2 (remembered, one warning);
        out of memory with one row on a GPU reloads the model on the CPU (one warning).
        """
        reduced_from = None
        while True:
            try:
                result = self._complete(request, on_partial, should_stop)
                break
            except _OutOfMemory as oom:
                _free_gpu_memory()
                if oom.stage == "decode" and self.rows > 1:
                    reduced_from = reduced_from or self.rows
                    self.rows = max(1, self.rows // 2)
                elif self.model.device.type != "cpu":
                    self._fall_back_to_cpu(oom.error)
                    reduced_from = None
                else:
                    raise oom.error
        if reduced_from is not None:
            n = self.rows
            _warn(self.on_warning, f"out of memory decoding {reduced_from} candidates at once: "
                                   f"decoding {n} candidate{'s' if n > 1 else ''} from now on")
        return result

    def _fall_back_to_cpu(self, error: BaseException) -> None:
        from .model import load_model
        try:
            model = load_model(resolve_model_path(self.config), device="cpu")
        except Exception:
            raise error from None                    # cannot reload: report the original failure
        self._use_model(model)
        first = (str(error).splitlines() or ["out of memory"])[0]
        _warn(self.on_warning, f"out of GPU memory ({first[:80]}): running on the CPU from now on (slower)")

    def _complete(self, request: dict, on_partial, should_stop) -> Optional[dict]:
        t0 = time.perf_counter()
        cfg = self.config
        prompt = self.build_prompt(request)
        hits = {"device": 0, "host": 0, "disk": 0, "miss": 0}
        with _out_of_memory_as("prefill"):
            pre = self._speculative_prefill(request, prompt)
            speculative = pre is not None
            if pre is None:
                pre = self.prefill(prompt.segments, should_stop, tail=cfg.tail_checkpoints)
        if pre is None:
            return None
        hits[pre.tier or "miss"] += 1
        self.cache.count_hit(pre.tier)
        t1 = time.perf_counter()

        single_line = bool(prompt.line_suffix.strip())   # inside a line: finish that line only
        rules = StopRules(max_tokens=cfg.max_tokens, max_lines=1 if single_line else cfg.max_lines,
                          stop_strings=list(cfg.stop), indent=prompt.indent,
                          blank_line_ends_block=prompt.indent == 0,
                          deadline=time.monotonic() + cfg.time_budget_ms / 1000.0)
        n = self.rows
        params = SamplingParams(**cfg.sampling_dict())
        with _out_of_memory_as("decode"):
            rows = decode_candidates(self.model, pre.snapshot.state, pre.snapshot.logits, n, params,
                                     [cfg.seed + i for i in range(n)], rules, should_stop=should_stop,
                                     on_partial=on_partial)
        if rows is None:
            return None
        ranked = rank_candidates(rows, prompt.after_lines)
        t2 = time.perf_counter()
        stats = {
            "reused_tokens": pre.reused, "prefilled_tokens": pre.fed,
            "decoded_tokens": sum(len(r.logprobs) for r in rows),
            "ms_prefill": round((t1 - t0) * 1000, 2), "ms_decode": round((t2 - t1) * 1000, 2),
            "ms_total": round((t2 - t0) * 1000, 2), "candidates": len(ranked), "cache_hits": hits,
            "prompt_tokens": pre.snapshot.n_tokens, "fim": prompt.fim, "speculative": speculative,
            "stop_reasons": [r.reason for r in rows],
        }
        self.last_stats = stats
        self._last = _LastRequest(request.get("id"), _request_copy(request), prompt, pre.key, rows)
        return {"id": request.get("id"),
                "candidates": [{"text": c["text"], "logprob": round(c["logprob"], 4)} for c in ranked],
                "stats": stats}

    def accept(self, request_id, text: str) -> bool:
        """The user accepted ``text`` of the last request: the next request that shows
        exactly that buffer continues from the state after the accepted tokens."""
        last = self._last
        if last is None or not text or (request_id is not None and last.id is not None
                                        and request_id != last.id):
            return False
        want = text.encode("utf-8")
        best: List[int] = []
        for r in sorted(last.rows, key=lambda r: -r.mean_logprob):
            toks, got = [], b""
            for t in r.tokens:
                b = self.tokenizer.token_bytes(t)
                if not want.startswith(got + b):
                    break
                toks.append(t)
                got += b
            if len(got) > len(self.tokenizer.decode_bytes(best)):
                best = toks
        rest = want[len(self.tokenizer.decode_bytes(best)):]
        tokens = best + (list(self.tokenizer.encode(rest)) if rest else [])
        self._spec = _Speculation(last.key, tokens, _expected_after_accept(last, text))
        return True

    def prime_step(self, should_stop: ShouldStop = None) -> bool:
        """One unit of idle work: move a queued chunk into the ring and prefill the ring's
        checkpoints, then the last request's prompt. True = did work (call again)."""
        promoted = self.ring.promote()
        t0 = time.perf_counter()
        segments = [Segment("start", (0,))] + [self._chunk_segment(c) for c in self.ring.chunks]
        what = "chunks"
        if self.cache.tier_of(self._final_key(segments)) is not None:
            if self._last is None:
                return promoted
            segments, what = self.build_prompt(self._last.request).segments, "request"
            if self.cache.tier_of(self._final_key(segments)) is not None:
                return promoted
        pre = self.prefill(segments, should_stop, tail=self.config.tail_checkpoints if what == "request" else 0)
        self.last_prime = {"what": what, "done": pre is not None,
                           "reused_tokens": pre.reused if pre else None,
                           "prefilled_tokens": pre.fed if pre else None,
                           "ms": round((time.perf_counter() - t0) * 1000, 2)}
        return True

    # -- prefill -------------------------------------------------------------------------
    def segment_keys(self, segments: Sequence[Segment]) -> List[str]:
        keys, k = [], self.cache.root
        for s in segments:
            k = chain_key(k, s.tokens)
            keys.append(k)
        return keys

    def _final_key(self, segments: Sequence[Segment]) -> str:
        return self.segment_keys(segments)[-1]

    def find_resume(self, segments: Sequence[Segment], keys: Sequence[str]):
        """(snapshot, tier, segment index, position in it) of the longest cached prefix."""
        root = self.cache.root
        for i in range(len(segments) - 1, -1, -1):
            if self.cache.tier_of(keys[i]) is not None:
                got = self.cache.get(keys[i])
                if got is not None:
                    return got[0], got[1], i + 1, 0
            parent = keys[i - 1] if i else root
            if parent in self._partial_parents and len(segments[i].tokens) > 1:
                pks = partial_keys(parent, segments[i].tokens[:-1])
                for p in range(len(pks), 0, -1):
                    if self.cache.tier_of(pks[p - 1]) is not None:
                        got = self.cache.get(pks[p - 1])
                        if got is not None:
                            return got[0], got[1], i, p
        return None, None, 0, 0

    def prefill(self, segments: Sequence[Segment], should_stop: ShouldStop = None,
                tail: int = 0) -> Optional[PrefillResult]:
        """Run the uncached part of ``segments``; checkpoints go to the cache as they are
        reached. ``tail`` extra checkpoints are stored at the last token positions.

        Forward pieces span segments and end only at ``prefill_chunk`` tokens, at a
        checkpointed boundary, or (in the tail) after every token.
        """
        model, cache = self.model, self.cache
        keys = self.segment_keys(segments)
        snap, tier, si, pos = self.find_resume(segments, keys)
        reused = snap.n_tokens if snap is not None else 0
        state = snap.state if snap is not None else model.new_state(1)
        logits = snap.logits if snap is not None else None
        # flat view of what is left: offsets are relative to the resume point
        flat: List[int] = list(segments[si].tokens[pos:]) if si < len(segments) else []
        starts, ends = {si: -pos}, {}
        for i in range(si, len(segments)):
            if i > si:
                starts[i] = len(flat)
                flat.extend(segments[i].tokens)
            ends[i] = len(flat)
        last = len(segments) - 1
        stops = {ends[i]: i for i in ends if segments[i].checkpoint != CK_NONE or i == last}
        tail_at = set()
        if tail > 0 and si <= last:
            lo = max(starts[last] + 1, ends[last] - tail, 1)
            tail_at = set(range(lo, ends[last]))
        marks = sorted(set(stops) | tail_at)
        chunk = self.config.prefill_chunk
        cur, mi = 0, 0
        while cur < len(flat):
            if should_stop is not None and should_stop():
                if cur > 0:                          # keep the work done so far
                    self._put_at(cur, segments, keys, starts, ends, Snapshot(state, logits, reused + cur))
                return None
            while mi < len(marks) and marks[mi] <= cur:
                mi += 1
            nxt = min(len(flat), cur + chunk, marks[mi] if mi < len(marks) else len(flat))
            piece = torch.tensor([flat[cur:nxt]], dtype=torch.long, device=model.device)   # [1, T]
            logits, state = model.forward(piece, state)                                     # [1, V]
            cur = nxt
            if cur in stops:
                i = stops[cur]
                cache.put(keys[i], Snapshot(state, logits, reused + cur),
                          persist=segments[i].checkpoint == CK_PERSIST)
            elif cur in tail_at:
                self._put_at(cur, segments, keys, starts, ends, Snapshot(state, logits, reused + cur))
        if logits is None:
            raise RuntimeError("empty prompt")       # segments always start with token 0
        final = Snapshot(state, logits, reused + len(flat))
        return PrefillResult(final, keys[last], reused, len(flat), tier)

    def _put_at(self, cur: int, segments, keys, starts, ends, snap: Snapshot) -> None:
        """Store ``snap`` under the key of flat offset ``cur`` (a boundary or inside a segment)."""
        for i in sorted(ends):
            if cur == ends[i]:
                self.cache.put(keys[i], snap)
                return
            if cur < ends[i]:
                parent = keys[i - 1] if i else self.cache.root
                self._put_partial(parent, segments[i].tokens[:cur - starts[i]], snap)
                return

    def _put_partial(self, parent: str, tokens: Sequence[int], snap: Snapshot) -> None:
        self.cache.put(chain_key(parent, tokens), snap)
        self._partial_parents[parent] = None
        self._partial_parents.move_to_end(parent)
        while len(self._partial_parents) > _PARTIAL_PARENTS:
            self._partial_parents.popitem(last=False)

    # -- helpers -------------------------------------------------------------------------
    def _ring_chunks(self):
        return list(self.ring.chunks)

    def _chunk_segment(self, chunk) -> Segment:
        k = (chunk.filename, chunk.lines)
        seg = self._chunk_segments.get(k)
        if seg is None:
            seg = self._chunk_segments[k] = self.builder.chunk_segment(chunk)
            while len(self._chunk_segments) > 4 * max(1, self.config.ring_n_chunks):
                self._chunk_segments.popitem(last=False)
        return seg

    def _speculative_prefill(self, request: dict, prompt: Prompt) -> Optional[PrefillResult]:
        spec, self._spec = self._spec, None
        if spec is None or not _matches(spec.expect, request, prompt):
            return None
        got = self.cache.get(spec.parent_key)
        if got is None:
            return None
        snap, tier = got
        key = chain_key(spec.parent_key, spec.tokens)
        have = self.cache.get(key)
        if have is not None:
            return PrefillResult(have[0], key, have[0].n_tokens, 0, have[1])
        piece = torch.tensor([spec.tokens], dtype=torch.long, device=self.model.device)
        logits, state = self.model.forward(piece, snap.state)
        new = Snapshot(state, logits, snap.n_tokens + len(spec.tokens))
        self.cache.put(key, new)
        return PrefillResult(new, key, snap.n_tokens, len(spec.tokens), tier)


def _free_gpu_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _request_copy(req: dict) -> dict:
    keep = ("id", "buf", "filename", "lines", "first", "row", "col")
    return {k: (list(req[k]) if k == "lines" else req[k]) for k in keep if k in req}


def _expected_after_accept(last: _LastRequest, text: str) -> dict:
    """The buffer around the cursor after inserting ``text`` at the last request's cursor."""
    req, prompt = last.request, last.prompt
    lines, first, row = req["lines"], req["first"], req["row"]
    r = row - first
    inserted = (prompt.line_prefix + text).split("\n")
    above = lines[max(0, r - _SPEC_CONTEXT): r] + inserted[:-1]
    below = lines[r + 1: r + 1 + _SPEC_CONTEXT]
    return {"buf": req.get("buf"), "filename": req.get("filename"), "row": row + len(inserted) - 1,
            "line_prefix": inserted[-1], "line_suffix": prompt.line_suffix,
            "above": above[-_SPEC_CONTEXT:], "below": below}


def _matches(expect: dict, req: dict, prompt: Prompt) -> bool:
    if req.get("buf") != expect["buf"] or req.get("filename") != expect["filename"]:
        return False
    if req["row"] != expect["row"] or prompt.line_prefix != expect["line_prefix"] \
            or prompt.line_suffix != expect["line_suffix"]:
        return False
    lines, r = req["lines"], req["row"] - req["first"]
    above = lines[max(0, r - len(expect["above"])): r]
    if above != expect["above"][len(expect["above"]) - len(above):]:
        return False
    below = lines[r + 1: r + 1 + len(expect["below"])]
    return below == expect["below"][: len(below)]
