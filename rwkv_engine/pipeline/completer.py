"""Synchronous completion pipeline: one request in, ranked candidates + stats out.

``Completer`` owns the model, the state cache, the context ring and the prompt
builder, and puts the jobs of its helpers in order. Per request:

    build prompt (prompt_layout) -> speculative state after an accept (speculation)
    or resume + prefill the rest (prefill) -> fork into N rows and decode with stops
    (candidates) -> rank -> stats

Idle work (``prime_step``, one unit per call): queued ring chunks, then the last
request's prompt, then the prompts of its neighbouring lines (``PRIME_NEIGHBOURS``
above and below, the direction of the last move first, the cursor at the column a
one-line move would most likely leave it at). The FIM window is suffix-first, so a
one-line move changes the window from its suffix on and, cold, re-feeds all of it
(marker, near suffix, near prefix lines: ~350 tokens with the default windows); a
primed neighbour re-feeds nothing. Without idle time the window is what a move costs:
``fim_window_ms`` sizes it from the prefill speed measured on this model's prefills
(``fim_window``; the budget is set on the builder before each prompt is built, for
requests and primed neighbours alike). Tail checkpoints (``tail_checkpoints``) are
stored only inside the cursor-line segment: typing resumes from them, while at
column 0 (no cursor segment) they would cost one single-token forward each for
positions inside a full line that no request resumes from.

Out-of-memory policy and model loading live in ``loading``. It is single-threaded;
``service.CompletionService`` runs it on a worker thread, and ``rwkv-nvim complete`` /
``bench`` drive it directly. ``should_stop`` is polled between prefill pieces and
decode steps; a stopped request returns None and keeps every checkpoint it reached.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from ..core.errors import one_line
from ..core.sampler import SamplingParams
from .candidates import StopRules, decode_candidates, rank_candidates
from .config import EngineConfig
from .context_ring import ContextRing
from .fim_window import WindowBudget
from .loading import (OutOfMemory, cpu_kernels_in_use, free_gpu_memory, load_configured_model, load_on_cpu,
                      out_of_memory_as, precision_of, say)
from .prefill import Prefiller, ShouldStop
from .prompt_layout import Prompt, PromptBuilder, to_bytes
from .speculation import LastRequest, Speculator
from .state_cache import StateCache

PRIME_NEIGHBOURS = 1       # lines above and below the last request's cursor primed on idle


class Completer:
    """Owns model + state cache + context ring; does one request at a time. The service's
    backend (``backend.CompletionBackend``, ``backend.SwitchesModel``) for ``backend = "local"``."""

    primes_neighbours_when_idle = True       # a primed neighbour line re-feeds nothing (module doc)

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
        self.prefiller = Prefiller(model, self.cache, self.config.prefill_chunk)
        self.speculator = Speculator(self.prefiller)
        self.window_budget = WindowBudget(self.config.fim_window_ms)   # the speed is this model's
        self._last: Optional[LastRequest] = None
        self._cpu_kernels = cpu_kernels_in_use(model)   # a fact of this model: not asked per request
        self._direction = 1                       # last line move: +1 down, -1 up
        self.rows = self.config.candidates        # candidates decoded together (lowered on OOM)

    # -- public API --------------------------------------------------------------------
    def switch_model(self, model) -> None:
        """Serve with ``model`` from now on (the same checkpoint in a faster precision):
        the cached states are rebuilt for it as requests come; the ring chunks stay."""
        self._use_model(model)

    def warm_up(self, on_progress: Optional[Callable[[str], None]] = None) -> None:
        """Build or load the compiled WKV kernel now (``on_progress`` hears about a build)
        rather than inside the first request. Never raises: without the kernel the torch
        reference runs, with one warning."""
        model = self.model
        if not getattr(model, "use_kernel", False):
            return
        prefix = "WKV-7 kernel unavailable, using the slower torch reference: "
        try:
            from ..core.kernel_loader import backend_for, get_wkv7, kernel_status, kernels_disabled
            if kernels_disabled() or model.device.type == "meta":
                return
            kernel = get_wkv7(model.device, progress=on_progress)
            failed = kernel_status().get(backend_for(model.device) or "", "")
            if kernel is None and failed.startswith("failed"):
                say(self.on_warning, prefix + failed[len("failed: "):])
        except Exception as e:                          # never fatal: the reference path works
            say(self.on_warning, prefix + one_line(e))

    def describe(self) -> dict:
        """Model name, checkpoint path, device, dtype and precision (``backend.Description``)."""
        m = self.model
        prec = precision_of(m)
        return {"model": self.config.model or "default", "path": str(getattr(m, "path", "") or ""),
                "device": str(m.device), "dtype": str(m.dtype).replace("torch.", ""),
                "precision": prec["summary"], "precision_why": prec.get("why", ""),
                "cpu_kernels": self._cpu_kernels}

    def close(self) -> None:
        """Drop the states cached in memory (device and host tiers; the disk tier stays for
        the next start). ``complete`` still works after, from cold states."""
        self.cache.clear_memory()

    def add_chunk(self, text: str, filename: str = "") -> bool:
        """Queue an extra-context chunk (moved into the ring by ``prime_step``)."""
        return self.ring.add(text, filename)

    def cache_stats(self) -> dict:
        s = self.cache.stats()
        s["ring"] = {"chunks": len(self.ring.chunks), "queued": len(self.ring.queue)}
        s["line_cache"] = {"hits": self.builder.lines.hits, "misses": self.builder.lines.misses}
        return s

    def last_prompt(self) -> Optional[dict]:
        """The last completed request's prompt: every id its state holds, in order (start
        token first; resumed from the cache or computed alike) and the text healed at the
        cursor (the candidates' first tokens re-produce it)."""
        if self._last is None:
            return None
        p = self._last.prompt
        return {"tokens": p.tokens(), "healed": p.healed}

    def build_prompt(self, request: dict) -> Prompt:
        """The prompt ``complete`` would use now (evicts ring chunks too similar to the cursor)."""
        self.ring.evict_similar(self.builder.around_cursor(request))
        self._size_window()
        return self.builder.build(request, list(self.ring.chunks))

    def _size_window(self) -> None:
        """The FIM window's token budget from the prefill speed measured so far (module doc)."""
        self.builder.window_tokens = self.window_budget.tokens(self.prefiller.speed.tokens_per_s())

    def complete(self, request: dict, on_partial: Optional[Callable[[str], None]] = None,
                 should_stop: ShouldStop = None) -> Optional[dict]:
        """Candidates for ``request`` ({lines, first, row, col, ...}); None if stopped."""
        return self._with_memory_policy(lambda: self._complete(request, on_partial, should_stop))

    def prime_step(self, should_stop: ShouldStop = None) -> bool:
        """One unit of idle work: move a queued chunk into the ring and prefill the ring's
        checkpoints, then the last request's prompt. True = did work (call again)."""
        return self._with_memory_policy(lambda: self._prime_step(should_stop))

    def accept(self, request_id, text: str) -> bool:
        """The user accepted ``text`` of the last request: the next request that shows
        exactly that buffer continues from the state after the accepted tokens."""
        last = self._last
        if last is None or not text or (request_id is not None and last.id is not None
                                        and request_id != last.id):
            return False
        self.speculator.after_accept(last, text)
        return True

    # -- steps ---------------------------------------------------------------------------
    def _with_memory_policy(self, run):
        """Out of memory while decoding N rows retries with N/2 (remembered, one warning);
        otherwise on a GPU the model is reloaded on the CPU (one warning) and ``run`` retried."""
        reduced_from = None
        while True:
            try:
                result = run()
                break
            except OutOfMemory as oom:
                free_gpu_memory()
                self.cache.clear_memory()            # cached states are the first thing to give up
                if oom.stage == "decode" and self.rows > 1:
                    reduced_from = reduced_from or self.rows
                    self.rows = max(1, self.rows // 2)
                elif self.model.device.type != "cpu":
                    self._use_model(load_on_cpu(self.config, oom.error, self.on_warning))
                    reduced_from = None
                else:
                    raise oom.error
        if reduced_from is not None:
            n = self.rows
            say(self.on_warning, f"out of memory decoding {reduced_from} candidates at once: "
                                 f"decoding {n} candidate{'s' if n > 1 else ''} from now on")
        return result

    def _complete(self, request: dict, on_partial, should_stop) -> Optional[dict]:
        t0 = time.perf_counter()
        cfg = self.config
        prompt = self.build_prompt(request)
        keys = self.prefiller.segment_keys(prompt.segments)         # hashed once per request
        ring_key = keys[prompt.n_chunks]                            # after the start token + ring chunks
        with out_of_memory_as("prefill"):
            pre = self.speculator.prefill(prompt, keys)
            speculative = pre is not None
            if pre is None:
                pre = self.prefiller.prefill(prompt.segments, should_stop, tail=self._tail(prompt.segments),
                                             keys=keys)
        if pre is None:
            return None
        self.cache.count_hit(pre.tier)
        t1 = time.perf_counter()

        single_line = bool(prompt.line_suffix.strip())   # inside a line: finish that line only
        rules = StopRules(max_tokens=cfg.max_tokens, max_lines=1 if single_line else cfg.max_lines,
                          stop_strings=list(cfg.stop), indent=prompt.indent,
                          blank_line_ends_block=prompt.indent == 0,
                          deadline=time.monotonic() + cfg.time_budget_ms / 1000.0)
        n = self.rows
        with out_of_memory_as("decode"):
            rows = decode_candidates(self.model, pre.snapshot.state, pre.snapshot.logits, n,
                                     SamplingParams(**cfg.sampling_dict()),
                                     [cfg.seed + i for i in range(n)], rules, should_stop=should_stop,
                                     on_partial=on_partial, after_lines=prompt.after_lines,
                                     heal=prompt.healed_bytes)
        if rows is None:
            return None
        ranked = rank_candidates(rows, prompt.after_lines)
        t2 = time.perf_counter()
        stats = {
            "reused_tokens": pre.reused, "prefilled_tokens": pre.fed,
            "decoded_tokens": sum(len(r.logprobs) for r in rows),
            "ms_prefill": round((t1 - t0) * 1000, 2), "ms_decode": round((t2 - t1) * 1000, 2),
            "ms_total": round((t2 - t0) * 1000, 2), "candidates": len(ranked),
            # until every candidate had its first line (a newline, its end or LINE_TOKENS
            # tokens): what the float shows first
            "ms_first_lines": round((max((r.first_line_at or t2) for r in rows) - t0) * 1000, 2),
            "cache_hits": {t: int(t == (pre.tier or "miss")) for t in ("device", "host", "disk", "miss")},
            "prompt_tokens": pre.snapshot.n_tokens, "fim": prompt.fim, "speculative": speculative,
            "window_tokens": self.builder.window_tokens,      # None: the fixed near_prefix/near_suffix lines
            "stop_reasons": [r.reason for r in rows],
        }
        self.last_stats = stats
        prev = self._last.request if self._last is not None else None
        if prev is not None and prev.get("buf") == request.get("buf") and prev["row"] != request["row"]:
            self._direction = 1 if request["row"] > prev["row"] else -1
        self._last = LastRequest(request.get("id"), _request_copy(request), prompt, pre.key, ring_key, rows)
        return {"id": request.get("id"),
                "candidates": [{"text": c["text"], "logprob": round(c["logprob"], 4)} for c in ranked],
                "stats": stats}

    def _tail(self, segments) -> int:
        """Tail checkpoints for a prompt: only inside a cursor-line segment (see module doc)."""
        return self.config.tail_checkpoints if segments and segments[-1].kind == "cursor" else 0

    def _prime_step(self, should_stop: ShouldStop) -> bool:
        promoted = self.ring.promote()
        t0 = time.perf_counter()
        segments = self.builder.head_segments(self.ring.chunks)
        what = "chunks"
        if self.prefiller.is_cached(segments):
            if self._last is None:
                return promoted
            segments, what = self.build_prompt(self._last.request).segments, "request"
            if self.prefiller.is_cached(segments):
                for req in self._neighbour_requests():
                    chunks = self.ring.kept_after_evict(self.builder.around_cursor(req))
                    segments, what = self.builder.build(req, chunks).segments, f"line {req['row']}"
                    if not self.prefiller.is_cached(segments):
                        break
                else:
                    return promoted
        with out_of_memory_as("prefill"):
            pre = self.prefiller.prefill(segments, should_stop,
                                         tail=self._tail(segments) if what != "chunks" else 0)
        self.last_prime = {"what": what, "done": pre is not None,
                           "reused_tokens": pre.reused if pre else None,
                           "prefilled_tokens": pre.fed if pre else None,
                           "ms": round((time.perf_counter() - t0) * 1000, 2)}
        return True

    def _neighbour_requests(self):
        """Requests for the lines next to the last request's cursor, nearest first, the
        direction of the last move first; each within the last request's window of lines
        (the lines as they were then; a request that finds the buffer changed simply
        misses). Column: 0 stays 0, the end of a line goes to the end of the other line,
        anything else keeps its byte column, clamped to the other line's length."""
        last = self._last.request
        lines, first, row, col = last["lines"], last["first"], last["row"], last["col"]
        cur = len(to_bytes(lines[row - first]))
        for d in range(1, PRIME_NEIGHBOURS + 1):
            for r in (row + d * self._direction, row - d * self._direction):
                if not first <= r < first + len(lines):
                    continue
                other = len(to_bytes(lines[r - first]))
                c = 0 if col == 0 else other if col >= cur else min(col, other)
                req = dict(last)
                req["row"], req["col"] = r, c
                yield req


def local_backend(config: EngineConfig, on_warning: Optional[Callable[[str], None]] = None,
                  model=None) -> Completer:
    """The completer the service runs for ``backend = "local"`` (``backend.backend_kind``):
    without ``model`` the configured one loads now, in fp32 when this CPU's precision is not
    measured yet (``model.precision["pending"]``: the service measures it in the background
    and switches the model)."""
    if model is None:
        model = load_configured_model(config, on_warning, measure_now=False)
    return Completer(config, model=model, on_warning=on_warning)


def _request_copy(req: dict) -> dict:
    keep = ("id", "buf", "filename", "lines", "first", "row", "col")
    return {k: (list(req[k]) if k == "lines" else req[k]) for k in keep if k in req}
