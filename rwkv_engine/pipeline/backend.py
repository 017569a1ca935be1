"""What ``service.CompletionService`` drives, and the one factory that builds it.

A *backend* answers the service's requests: the local engine (``completer.Completer``,
the model in this process) or a server (``remote_backend``: llama-server or an
OpenAI-compatible one). The service calls only what ``CompletionBackend`` lists and never
asks which backend it runs: where they differ, the backend says so as a capability
(``primes_neighbours_when_idle``), by what ``describe()`` returns, or by ``warm_up``
raising (a server that does not answer yet).

``backend_kind(config)`` picks the backend from ``config.backend`` once. The
built-in kinds are named by the module that builds them and imported only when chosen,
so a server backend never imports torch and the local engine never needs httpx;
``register_backend`` adds a kind.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Protocol, TypedDict, runtime_checkable

from .config import EngineConfig

Notify = Optional[Callable[[str], None]]       # on_warning / on_progress: one line each
ShouldStop = Optional[Callable[[], bool]]
Partial = Optional[Callable[[str], None]]


class Description(TypedDict):
    """What the "ready" event and ``:RwkvStatus`` show of a backend."""
    model: str            # "g1-0.1b", "default", "llama.cpp server http://host:8080"
    path: str             # the checkpoint file, or the server's address
    device: str           # "cpu", "cuda:0", "remote"
    dtype: str            # "float32", "n/a" for a server
    precision: str        # one-line summary: "int8 (auto: ...)", "n/a"
    precision_why: str    # why that precision ("" when there is nothing to say)
    cpu_kernels: str      # the CPU kernels' instruction-set path ("q8: avx2"), "" when none runs


@runtime_checkable
class CompletionBackend(Protocol):
    """The interface the service's worker thread uses (one call at a time)."""

    #: After each suggestion the service primes (``prime_step``) once the editor was idle
    #: for ``prime_after_ms``: worth it where priming prepares the neighbouring lines.
    primes_neighbours_when_idle: bool

    def warm_up(self, on_progress: Notify = None) -> None:
        """One-time work before the service says "ready": the local engine builds or loads
        its compiled kernel (``on_progress`` hears about a build); a server backend asks
        the server what it runs. Raises when a server cannot be reached (the service then
        says "ready" with the first request it answers)."""

    def complete(self, request: dict, on_partial: Partial = None,
                 should_stop: ShouldStop = None) -> Optional[dict]:
        """{"id", "candidates": [{"text", "logprob"}], "stats"}; None once ``should_stop()``."""

    def prime_step(self, should_stop: ShouldStop = None) -> bool:
        """One unit of idle work; True = it did some (call again)."""

    def accept(self, request_id, text: str) -> bool:
        """The user accepted ``text`` of request ``request_id``."""

    def add_chunk(self, text: str, filename: str = "") -> bool:
        """Queue an extra-context chunk (yanked, saved or entered text)."""

    def cache_stats(self) -> dict:
        """What ``:RwkvStatus`` shows under "cache"."""

    def describe(self) -> Description:
        """Where and how it runs, now (the local engine may have fallen back to the CPU)."""

    def close(self) -> None:
        """Release what it holds (connections, cached states); the service calls it last."""


@runtime_checkable
class SwitchesModel(Protocol):
    """A backend serving a model loaded in this process that the service may replace
    between requests (the same checkpoint in the CPU precision measured in the background,
    while ``model.precision["pending"]``)."""

    model: Any

    def switch_model(self, model) -> None:
        """Serve with ``model`` from now on."""


Builder = Callable[[EngineConfig, Notify, Any], CompletionBackend]   # (config, on_warning, model)


@dataclass(frozen=True)
class BackendKind:
    """One value of the ``backend`` engine option."""
    loading_label: Callable[[EngineConfig], str]   # the "loading" event's name, before building
    build: Builder             # ``model``: a model already loaded here (the local engine's)


def _local_engine(config: EngineConfig, on_warning: Notify, model: Any) -> CompletionBackend:
    from .completer import local_backend            # torch: imported only when chosen
    return local_backend(config, on_warning=on_warning, model=model)


def _server(config: EngineConfig, on_warning: Notify, model: Any) -> CompletionBackend:
    """llama-server or OpenAI-compatible (``remote_backend.servers`` picks the protocol);
    the server runs its own model."""
    from .remote_backend.servers import server_backend
    return server_backend(config, on_warning=on_warning)


def _model_name(config: EngineConfig) -> str:
    return config.model or "default"


def _server_name(config: EngineConfig) -> str:
    return f"{config.backend} server"


_KINDS: Dict[str, BackendKind] = {
    "local": BackendKind(_model_name, _local_engine),
    "llama.cpp": BackendKind(_server_name, _server),
    "openai": BackendKind(_server_name, _server),
}


def register_backend(name: str, kind: BackendKind) -> None:
    """Make ``backend = name`` build ``kind`` (replaces a kind of that name)."""
    _KINDS[name] = kind


def backend_kind(config: EngineConfig) -> BackendKind:
    """The kind ``config.backend`` names: ``kind.build(config, on_warning, model)`` builds
    it (the local engine loads its model there unless ``model`` is given)."""
    kind = _KINDS.get(config.backend)
    if kind is None:
        raise ValueError(f"engine option backend = {config.backend!r}: must be one of "
                         f"{', '.join(repr(k) for k in _KINDS)}")
    return kind
