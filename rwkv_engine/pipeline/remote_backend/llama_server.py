"""llama-server's own API (``backend = "llama.cpp"``): ``/completion`` and ``/infill``.

RWKV models get the local engine's suffix-first FIM prompt on ``/completion`` (as token
ids when the server's vocabulary is ours, which ``/tokenize`` tells; else the start
token plus the text); models with FIM tokens get ``/infill`` (``input_extra`` = ring
chunks, ``input_prefix``, ``input_suffix``, ``prompt`` = the cursor line up to the
cursor). Candidates come from ``n_cmpl`` (the prompt is read once and its state copied,
at most the server's slot count), streamed with ``timings_per_token`` (cache_n / prompt_n
even when the stream is cut short); ``cache_prompt`` lets the server resume from its saved
state of the shared prefix (for a recurrent model llama-server keeps states 4 and
4 + n_ubatch tokens before the end of each prompt, so a keystroke on the cursor line costs
it about 5 tokens). Idle priming warms that cache with the prompt new ring chunks made.
"""
from __future__ import annotations

import logging
import os
import time
from typing import List, Optional

from ..prompt_layout import Prompt
from .http import RWKV_VOCAB_TYPE, TOKENIZE_PROBE, RemoteError, ShouldStop, _Watch
from .server_backend import HttpCall, ServerBackend

log = logging.getLogger("rwkv_engine")

_STOP_REASONS = {"eos": "eos", "word": "stop", "limit": "max_tokens"}     # stop_type -> ours


class LlamaServerBackend(ServerBackend):
    option = "llama.cpp"

    def _api_base(self, url, base: str) -> str:
        return base[:-3] if base.endswith("/v1") else base

    def _detect_server(self) -> dict:
        cfg = self.config
        props = self._optional_json("/props") or {}
        models = self._optional_json("/v1/models") or {}
        entry = (models.get("data") or [{}])[0] if isinstance(models, dict) else {}
        meta = (entry.get("meta") if isinstance(entry, dict) else None) or {}
        name = (cfg.remote_model or props.get("model_alias") or entry.get("id")
                or os.path.basename(str(props.get("model_path") or "")) or "?")
        slots = props.get("total_slots")
        info = {"backend": self.option, "model": name,
                "slots": int(slots) if isinstance(slots, int) and slots > 0 else 1,
                "vocab_type": meta.get("vocab_type"), "n_ctx": meta.get("n_ctx"), "ids": False}
        rwkv = meta.get("vocab_type") == RWKV_VOCAB_TYPE
        fim = cfg.fim if cfg.fim != "auto" else ("rwkv" if rwkv else "infill")
        info["fim"] = fim
        if fim == "rwkv":
            tok = self._optional_json("/tokenize", {"content": TOKENIZE_PROBE}) or {}
            info["ids"] = tok.get("tokens") == self.tokenizer.encode(TOKENIZE_PROBE)
        return info

    def _rwkv_prompt(self, prompt: Prompt):
        """The token ids (when the server's vocabulary is ours) or [start token, text]."""
        tokens = prompt.tokens()
        if self.server and self.server.get("ids"):
            return tokens
        start = tokens[:1] if tokens[:1] == [0] else []
        text = self.tokenizer.decode(tokens[len(start):])
        return start + [text] if start else text

    def _request(self, info: dict, request: dict, prompt: Prompt, n: int, stops: List[str]) -> HttpCall:
        cfg = self.config
        n = min(n, max(1, info.get("slots") or 1))
        payload = dict(self._sampling(stops), n_predict=cfg.max_tokens, top_k=cfg.top_k,
                       min_p=0.0, typical_p=1.0, repeat_penalty=1.0, cache_prompt=True,
                       return_tokens=True, n_probs=1, n_cmpl=n, timings_per_token=True)
        fim = info["fim"]
        if fim == "infill":
            above, middle, after = self._texts(request, prompt)
            payload.update(input_prefix=above, input_suffix=after, prompt=middle,
                           input_extra=[{"filename": c.filename or "untitled",
                                         "text": "".join(ln + "\n" for ln in c.lines)}
                                        for c in self.ring.chunks])
            return "/infill", self.base + "/infill", payload
        if fim == "plain":
            above, middle, _ = self._texts(request, prompt)
            payload["prompt"] = above + middle
        else:
            payload["prompt"] = self._rwkv_prompt(prompt)
        return "/completion", self.base + "/completion", payload

    def _event_pieces(self, obj: dict) -> Optional[List[dict]]:
        """/completion and /infill: {index, content, tokens, stop, stop_type,
        completion_probabilities, timings} (timings in every event: timings_per_token)."""
        if "content" not in obj and "stop" not in obj:
            return None
        probs = obj.get("completion_probabilities") or []
        lps = [float(p["logprob"]) for p in probs if isinstance(p, dict) and "logprob" in p]
        toks = obj.get("tokens") or []
        final = bool(obj.get("stop"))
        return [{"index": int(obj.get("index") or 0), "text": obj.get("content") or "",
                 "tokens": [int(t) for t in toks if isinstance(t, int)],
                 "logprobs": lps, "final": final,
                 "reason": _STOP_REASONS.get(obj.get("stop_type"), "eos") if final else "",
                 "timings": obj.get("timings")}]

    def _warm_server(self, should_stop: ShouldStop) -> bool:
        """Once the ring changed the last request's prompt, warm the server's prompt cache
        with the new one ("rwkv" prompts: a request for one token with cache_prompt), so
        the next keystroke does not wait for the server to read the new chunks."""
        if self.server is None or self.server.get("fim") != "rwkv" or self._down is not None:
            return False
        try:
            prompt = self.build_prompt(self._last)
        except Exception:
            return False
        key = tuple(prompt.tokens())
        if key == self._warmed:
            return False
        t0 = time.perf_counter()
        payload = {"prompt": self._rwkv_prompt(prompt), "n_predict": 1, "cache_prompt": True,
                   "stream": False, "temperature": 0.0, "n_probs": 0}
        try:
            with _Watch(self.http, should_stop, None) as watch:
                try:
                    res = self.http.post_json(self.base + "/completion", "/completion", payload)
                except RemoteError:
                    if watch.fired:
                        return False
                    raise
        except RemoteError as e:
            log.debug("rwkv.nvim: warming the server cache failed: %s", e)
            self._warmed = key                    # do not retry the same prompt at every idle pass
            return False
        self._warmed = key
        timings = (res.get("timings") if isinstance(res, dict) else None) or {}
        self.last_prime = {"what": "request", "done": True, "reused_tokens": timings.get("cache_n"),
                           "prefilled_tokens": timings.get("prompt_n"),
                           "ms": round((time.perf_counter() - t0) * 1000, 2)}
        return True
