"""One way to turn a failure into the one line a user sees, and to recognise
out-of-memory errors. No torch import: the editor side uses this too."""
from __future__ import annotations

import re
from typing import Union

MAX_CHARS = 300
# a compiler/tool diagnostic inside a longer log (``file.cpp:12:3: error: ...``)
_ERROR_LINE = re.compile(r"\berror\b", re.IGNORECASE)
_LOG_NOISE = ("Error building", "FAILED:", "Traceback")


class ExplainedError(Exception):
    """A failure whose one-line message says all a user (and the log) needs, such as a
    server that refused a request: the service logs it without a traceback (one per
    keystroke otherwise). Subclassed next to a builtin kind:
    ``class RemoteError(RuntimeError, ExplainedError)``."""


def one_line(error: Union[BaseException, str], limit: int = MAX_CHARS) -> str:
    """The most telling line of ``error`` (an exception or a message): for a multi-line
    text such as a build log the first line that names an error, else the first
    non-empty line; the exception's type name when there is no text at all."""
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1:
        for ln in lines:
            if _ERROR_LINE.search(ln) and not ln.startswith(_LOG_NOISE):
                return ln[:limit]
    if lines:
        return lines[0][:limit]
    return type(error).__name__ if isinstance(error, BaseException) else ""


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA/ROCm) or a RuntimeError saying "out of memory"
    (CPU allocators, older torch)."""
    if type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, (RuntimeError, MemoryError)) and (
        isinstance(error, MemoryError) or "out of memory" in str(error).lower())
