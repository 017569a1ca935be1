"""Which server protocol answers for each ``backend`` option value: the one place that
chooses (``server_backend``); the service reaches it through ``backend.backend_kind``."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Type

from ..config import EngineConfig
from .llama_server import LlamaServerBackend
from .openai_compat import OpenAICompatBackend
from .server_backend import ServerBackend

SERVER_PROTOCOLS: Dict[str, Type[ServerBackend]] = {
    cls.option: cls for cls in (LlamaServerBackend, OpenAICompatBackend)}


def server_backend(config: EngineConfig, on_warning: Optional[Callable[[str], None]] = None,
                   tokenizer=None) -> ServerBackend:
    """The backend speaking ``config.backend``'s server protocol."""
    cls = SERVER_PROTOCOLS.get(config.backend)
    if cls is None:
        raise ValueError(f"engine option backend = {config.backend!r}: not a server backend "
                         f"(one of {', '.join(repr(k) for k in SERVER_PROTOCOLS)})")
    return cls(config, on_warning=on_warning, tokenizer=tokenizer)
