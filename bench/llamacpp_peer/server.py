"""``llama-server`` on a loopback port for one GGUF, and greedy runs through it."""
from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .build import BuildError, build


# -- llama-server -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``llama-server`` on a loopback port for one GGUF (a context manager).

    One slot, no prompt cache between requests unless asked, CPU threads as given."""

    def __init__(self, gguf, bins: Optional[Path] = None, ctx: int = 4096, threads: int = 2,
                 extra: Sequence[str] = (), startup_timeout: float = 120.0):
        self.gguf = Path(gguf)
        self.bins = Path(bins) if bins else build()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(self.bins / "llama-server"), "-m", str(self.gguf), "--host", "127.0.0.1",
               "--port", str(self.port), "-c", str(ctx), "-np", "1", "-t", str(threads),
               "-tb", str(threads), "--no-warmup", *extra]
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise BuildError(f"llama-server exited with {self.proc.returncode} loading "
                                 f"{self.gguf}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise BuildError(f"llama-server did not become ready in {startup_timeout:.0f} s:\n"
                                 f"{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, n: int = 20) -> str:
        self._log.seek(0)
        return "\n".join(self._log.read().strip().splitlines()[-n:])

    def post(self, path: str, payload: dict, timeout: float = 300.0) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise BuildError(f"llama-server {path}: HTTP {e.code}: {e.read()[:500]!r}") from None

    def get(self, path: str, timeout: float = 30.0) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def greedy(self, prompt_ids: Sequence[int], n: int, n_probs: int = 0) -> dict:
        """/completion from token ids, argmax decoding, exactly ``n`` tokens (EOS ignored).

        Returns ``{"tokens": [...], "top_logprobs": [{id: logprob, ...} per step]}``; the
        logprobs (n_probs > 0) are a plain log-softmax of the raw logits."""
        res = self.post("/completion", {
            "prompt": [int(t) for t in prompt_ids], "n_predict": int(n), "temperature": 0.0,
            "top_k": 1, "ignore_eos": True, "return_tokens": True, "cache_prompt": False,
            "n_probs": int(n_probs), "post_sampling_probs": False, "seed": 0, "stream": False,
        })
        tops = []
        for step in res.get("completion_probabilities") or []:
            tops.append({int(p["id"]): float(p["logprob"]) for p in step.get("top_logprobs", [])})
        return {"tokens": [int(t) for t in res.get("tokens") or []], "top_logprobs": tops,
                "timings": res.get("timings", {})}

    def next_logprobs(self, prompt_ids: Sequence[int], n_probs: int,
                      force_token: Optional[int] = None) -> Dict[int, float]:
        """The top ``n_probs`` log-probabilities of the token after ``prompt_ids``.

        The prompt is cached (``cache_prompt``): a prompt that extends the previous one by
        k tokens costs k tokens of prefill, also for the recurrent rwkv7 state (the
        sampled token is never decoded, so the cache ends exactly at the prompt).
        ``force_token``: a logit bias makes it the sampled token. llama-server returns no
        probabilities for a token whose text is an incomplete UTF-8 sequence (it waits for
        the rest), so forcing a plain ASCII token keeps every position; the probabilities
        are those of the raw logits, before any bias (``post_sampling_probs`` false)."""
        payload = {
            "prompt": [int(t) for t in prompt_ids], "n_predict": 1, "temperature": 0.0,
            "top_k": 1, "ignore_eos": True, "cache_prompt": True, "n_probs": int(n_probs),
            "post_sampling_probs": False, "seed": 0, "stream": False,
        }
        if force_token is not None:
            payload["logit_bias"] = [[int(force_token), 1000.0]]
        res = self.post("/completion", payload)
        steps = res.get("completion_probabilities") or []
        if not steps:
            raise BuildError(f"llama-server returned no probabilities: {str(res)[:300]}")
        return {int(p["id"]): float(p["logprob"]) for p in steps[0].get("top_logprobs", [])}

    def teacher_forced(self, ids: Sequence[int], start: int, n: int,
                       n_probs: int) -> List[Dict[int, float]]:
        """Top-``n_probs`` log-probabilities after ``ids[:start + 1 + j]`` for j < n: the
        distributions at positions start .. start+n-1 of one fixed token sequence."""
        if start + n > len(ids):
            raise ValueError(f"{len(ids)} tokens cannot give {n} positions from {start}")
        ascii_tok = (self.post("/tokenize", {"content": "a"}).get("tokens") or [None])[0]
        return [self.next_logprobs(ids[:start + 1 + j], n_probs, ascii_tok) for j in range(n)]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def greedy_tokens(gguf, prompt_ids: Sequence[int], n: int, bins: Optional[Path] = None) -> List[int]:
    """llama.cpp's greedy continuation (``n`` token ids) of ``prompt_ids`` for ``gguf``."""
    with Server(gguf, bins=bins) as srv:
        return srv.greedy(prompt_ids, n)["tokens"]


def greedy_with_logprobs(gguf, prompt_ids: Sequence[int], n: int, n_probs: int = 5,
                         bins: Optional[Path] = None) -> dict:
    """Like greedy_tokens, plus each step's top ``n_probs`` log-probabilities."""
    with Server(gguf, bins=bins) as srv:
        return srv.greedy(prompt_ids, n, n_probs)
