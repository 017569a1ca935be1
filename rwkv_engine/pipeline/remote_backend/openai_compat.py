"""An OpenAI-compatible ``/v1/completions`` (``backend = "openai"``: vLLM, SGLang, Ollama,
llama-server's /v1, ...).

``prompt`` (+ ``suffix`` in "infill" mode), ``n`` candidates, SSE streaming with
``usage`` (cached prompt tokens where the server reports them). An optional field the
server refuses (suffix, logprobs, stream_options, top_k, seed) is dropped once and the
request repeated. "auto" FIM: the RWKV prompt (as text) for a model with the RWKV
vocabulary (llama-server's model list says so) or "rwkv" in its name, else "infill".
"""
from __future__ import annotations

from typing import Callable, List, Optional

from ..config import EngineConfig
from ..prompt_layout import Prompt
from .http import RWKV_VOCAB_TYPE
from .server_backend import HttpCall, ServerBackend

_STOP_REASONS = {"stop": "stop", "length": "max_tokens"}                # finish_reason -> ours
_OPTIONAL_FIELDS = ("stream_options", "logprobs", "top_k", "seed")      # dropped when refused


class OpenAICompatBackend(ServerBackend):
    option = "openai"

    def __init__(self, config: EngineConfig, on_warning: Optional[Callable[[str], None]] = None,
                 tokenizer=None):
        super().__init__(config, on_warning, tokenizer)
        self._dropped: set = set()                # optional request fields the server refused

    def _api_base(self, url, base: str) -> str:
        """".../v1/completions" and ".../v1" as given; a bare host gets "/v1"."""
        if base.endswith("/completions"):
            return base[: -len("/completions")]
        return base + "/v1" if not url.path.strip("/") else base

    def _detect_server(self) -> dict:
        cfg = self.config
        models = self._optional_json("/models") or {}
        data = models.get("data") if isinstance(models, dict) else None
        entries = [m for m in data or [] if isinstance(m, dict) and m.get("id")]
        ids = [m["id"] for m in entries]
        name = cfg.remote_model or (ids[0] if ids else None)
        entry = next((m for m in entries if m["id"] == name), {})
        rwkv_vocab = (entry.get("meta") or {}).get("vocab_type") == RWKV_VOCAB_TYPE   # llama-server's /v1
        fim = cfg.fim
        if fim == "auto":
            fim = "rwkv" if rwkv_vocab or (name and "rwkv" in name.lower()) else "infill"
        return {"backend": self.option, "model": name or "?", "models": ids[:8], "slots": None,
                "fim": fim, "ids": False}

    def _rwkv_prompt(self, prompt: Prompt) -> str:
        """The text after the start token (the server's tokenizer adds what the model starts with)."""
        tokens = prompt.tokens()
        return self.tokenizer.decode(tokens[1:] if tokens[:1] == [0] else tokens)

    def _request(self, info: dict, request: dict, prompt: Prompt, n: int, stops: List[str]) -> HttpCall:
        cfg = self.config
        payload = dict(self._sampling(stops), max_tokens=cfg.max_tokens, n=n, logprobs=1,
                       stream_options={"include_usage": True})
        payload["stop"] = stops[:4] or None
        if cfg.top_k > 0:
            payload["top_k"] = cfg.top_k
        if info.get("model") and info["model"] != "?":
            payload["model"] = info["model"]
        if info["fim"] == "rwkv":
            payload["prompt"] = self._rwkv_prompt(prompt)
        else:
            above, middle, after = self._texts(request, prompt)
            payload["prompt"] = above + middle
            if info["fim"] == "infill":
                payload["suffix"] = after
        for field in self._dropped:
            payload.pop(field, None)
        payload = {k: v for k, v in payload.items() if v is not None}
        return "/v1/completions", self.base + "/completions", payload

    def _simpler_request(self, message: str) -> bool:
        for field in _OPTIONAL_FIELDS:
            if field in message and field not in self._dropped:
                self._dropped.add(field)
                return True
        return False

    def _event_pieces(self, obj: dict) -> Optional[List[dict]]:
        """{choices: [{index, text, logprobs: {token_logprobs} or {content: [{logprob}]},
        finish_reason}], usage}."""
        if "choices" not in obj:
            return None
        out = []
        for ch in obj.get("choices") or []:
            if not isinstance(ch, dict):
                continue
            lp = ch.get("logprobs") or {}
            lps = lp.get("token_logprobs") if isinstance(lp, dict) else None
            if lps is None and isinstance(lp, dict) and isinstance(lp.get("content"), list):
                lps = [c.get("logprob") for c in lp["content"] if isinstance(c, dict)]
            fin = ch.get("finish_reason")
            out.append({"index": int(ch.get("index") or 0), "text": ch.get("text") or "",
                        "logprobs": [float(x) for x in lps or [] if isinstance(x, (int, float))],
                        "final": fin is not None, "reason": _STOP_REASONS.get(fin, "stop") if fin else "",
                        "timings": obj.get("timings") if fin else None})
        if obj.get("usage"):
            out.append({"index": -1, "usage": obj["usage"]})
        return out
