"""Remote backend: the same requests, answered by an existing inference server.

It loads no model: the prompt is built by the same ``PromptBuilder`` (the RWKV World
tokenizer only) and sent over HTTP (httpx, ``http``) to one of two server protocols,
one module each over a shared base (``server_backend.ServerBackend``):

* ``llama_server`` (``backend = "llama.cpp"``): llama-server's ``/completion`` (the local
  engine's suffix-first FIM prompt for RWKV models) and ``/infill`` (models with FIM
  tokens), ``n_cmpl`` candidates, its prompt cache warmed on idle;
* ``openai_compat`` (``backend = "openai"``): an OpenAI-compatible ``/v1/completions``
  (vLLM, SGLang, Ollama, ...), ``n`` candidates over SSE.

``servers.server_backend(config)`` picks the protocol from the option; the service
builds it through ``backend.backend_kind`` and drives it as a
``backend.CompletionBackend``, like the local engine.

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

from .http import RemoteError, sse_data
from .llama_server import LlamaServerBackend
from .openai_compat import OpenAICompatBackend
from .probe import probe
from .server_backend import ServerBackend
from .servers import SERVER_PROTOCOLS, server_backend

__all__ = ["ServerBackend", "LlamaServerBackend", "OpenAICompatBackend", "SERVER_PROTOCOLS", "server_backend",
           "RemoteError", "sse_data", "probe"]
