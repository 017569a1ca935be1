"""Remote backend: the same requests, answered by an existing inference server.

``RemoteCompleter`` has the interface of ``completer.Completer`` (complete, accept,
add_chunk, prime_step, cache_stats, build_prompt) and is what ``service`` runs when
``EngineConfig.backend`` is not "local". It loads no model: the prompt is built by the
same ``PromptBuilder`` (the RWKV World tokenizer only) and sent over HTTP (httpx) to

* ``"llama.cpp"``: llama-server. RWKV models get the local engine's suffix-first FIM
  prompt on ``/completion`` (as token ids when the server's vocabulary is ours, which
  ``/tokenize`` tells; else the start token plus the text); models with FIM tokens get
  ``/infill`` (``input_extra`` = ring chunks, ``input_prefix``, ``input_suffix``,
  ``prompt`` = the cursor line up to the cursor). Candidates come from ``n_cmpl`` (the
  prompt is read once and its state copied, at most the server's slot count), streamed
  with ``timings_per_token`` (cache_n / prompt_n even when the stream is cut short);
  ``cache_prompt`` lets the server resume from its saved state of the shared prefix (for
  a recurrent model llama-server keeps states 4 and 4 + n_ubatch tokens before the end of
  each prompt, so a keystroke on the cursor line costs it about 5 tokens).
* ``"openai"``: an OpenAI-compatible ``/v1/completions`` (vLLM, SGLang, Ollama, ...):
  ``prompt`` (+ ``suffix`` in "infill" mode), ``n`` candidates, SSE streaming; an optional
  field the server refuses (suffix, logprobs, stream_options, top_k, seed) is dropped
  once and the request repeated.

The prompt puts what changes least first (ring chunks, far prefix) and the cursor line
last, so a server's prefix cache is reused between keystrokes.

Streamed text goes through the local engine's stop rules and ranking
(``candidate_rules.apply_text_rules`` / ``rank_candidates``): the same candidates a local
decode of the same tokens would give. The stream is closed as soon as every candidate
stopped, the decode budget (``time_budget_ms`` after the first streamed piece: llama-server
sends its headers before it reads the prompt) or
``timeout_total_ms`` ran out, or ``should_stop()`` says the request was superseded: a
helper thread polls ``should_stop`` every few ms and shuts the socket down, so even a
read blocked on a slow server returns at once (and the server sees the disconnect and
stops generating).

Failures raise :class:`RemoteError`: one line that names the server, the same text for
the same failure (the editor notifies each distinct message once). After a failure to
connect, requests fail at once with that message for ``RETRY_AFTER_S`` seconds instead
of waiting on the network at every keystroke. Request bodies (buffer text) are never
logged; the API key is read from the environment variable ``api_key_env`` names.

``probe(config)`` is the ``:checkhealth`` check (reachability, model, FIM mode).
"""
from __future__ import annotations

from .completer import RemoteCompleter, RemoteModel
from .http import RemoteError, sse_data
from .probe import probe

__all__ = ["RemoteCompleter", "RemoteModel", "RemoteError", "sse_data", "probe"]
