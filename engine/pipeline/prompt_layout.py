"""Prompt layout for state reuse: what changes most often goes at the END.

    [0]                                          start token
    [chunk 1] ... [chunk n]                      ring chunks, oldest first
    [far prefix of this file]                    lines above the FIM window
    ✿prefix✿✿suffix✿ {near suffix} ✿middle✿ {near prefix lines}{cursor line up to the cursor}

(RWKV-7 G1c suffix-first FIM; generation continues the prefix.) When only
whitespace follows the cursor the FIM markers are left out and the prompt is the
plain text up to the cursor. Text is tokenized LINE BY LINE: every line with its
"\n" is encoded on its own (cached per line text in an LRU), so a token never
spans two lines and a 2,000-line window re-tokenizes from the cache.

The prompt is a list of *segments* (start token, chunks, lines, markers, the cursor
line); the state cache keys checkpoints by a hash chain over segments, so each
segment boundary is a possible resume point (kept in memory; the ring chunks and, in
the far prefix, every FAR_SPARSE-th line and the far/near split also on disk, so a
restarted editor reopening a file resumes from them). Boundaries are placed so that
  * typing on one line changes only the last segment,
  * moving one line changes only the FIM window: the far/near split is aligned to
    ``NEAR_ALIGN`` lines and the far prefix start to ``FAR_ALIGN`` lines, so both
    stay put while the cursor moves inside a block of lines.
No torch import here.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

from .context_ring import Chunk

FIM_PREFIX = "✿prefix✿"
FIM_SUFFIX = "✿suffix✿"
FIM_MIDDLE = "✿middle✿"
CHUNK_HEADER = "✿file✿{filename}\n"   # first line of a ring chunk in the prompt
START_TOKEN = 0

NEAR_ALIGN = 8        # the far/near split sits on a multiple of this many lines
FAR_ALIGN = 64        # the far prefix starts on a multiple of this many lines
FAR_DENSE = 32        # checkpoint every NEAR_ALIGN lines within this many lines above the split
FAR_SPARSE = 64       # ... and every FAR_SPARSE lines further up

# checkpoint kinds of a segment boundary
CK_NONE, CK_MEM, CK_PERSIST = 0, 1, 2


@dataclass
class Segment:
    kind: str                  # "start" | "chunk" | "far" | "marker" | "suffix" | "near" | "cursor"
    tokens: Tuple[int, ...]
    checkpoint: int = CK_NONE  # store the state after this segment: none / memory / memory+disk


@dataclass
class Prompt:
    segments: List[Segment]
    fim: bool                       # FIM layout (False = plain continuation)
    line_prefix: str                # cursor line up to the cursor
    line_suffix: str                # cursor line after the cursor
    after_lines: List[str]          # text after the cursor: [line_suffix, following lines...]
    indent: int                     # display width of the cursor line's indentation
    around_cursor: List[str] = field(default_factory=list)   # lines near the cursor (ring eviction)
    n_chunks: int = 0

    @property
    def n_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.segments)

    def tokens(self) -> List[int]:
        out: List[int] = []
        for s in self.segments:
            out.extend(s.tokens)
        return out


class LineTokenizer:
    """Encodes text pieces through an LRU cache keyed by the exact text."""

    def __init__(self, tokenizer, max_entries: int = 16384):
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._cache: "OrderedDict[str, Tuple[int, ...]]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    def encode(self, text: str) -> Tuple[int, ...]:
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            self.hits += 1
            return cached
        self.misses += 1
        toks = tuple(self.tokenizer.encode(text))
        self._cache[text] = toks
        if len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return toks


def indent_width(line: str, tabstop: int = 8) -> int:
    """Display width of the leading whitespace of ``line``."""
    lead = line[: len(line) - len(line.lstrip(" \t"))]
    return len(lead.expandtabs(tabstop))


def split_at_byte_col(line: str, col: int) -> Tuple[str, str]:
    """Split ``line`` at byte column ``col`` (backs off to a character boundary)."""
    raw = to_bytes(line)
    col = _char_start(raw, max(0, min(col, len(raw))), forward=False)   # inside a character: back off
    return raw[:col].decode("utf-8", errors="replace"), raw[col:].decode("utf-8", errors="replace")


def to_bytes(text: str) -> bytes:
    """UTF-8 bytes of ``text``; lone surrogates (pynvim's surrogateescape for bytes that
    are not valid UTF-8) become the bytes they stand for."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return text.encode("utf-8", "surrogatepass")


def _char_start(raw: bytes, i: int, forward: bool) -> int:
    """Move byte index ``i`` off UTF-8 continuation bytes (to a character boundary)."""
    step = 1 if forward else -1
    for _ in range(3):
        if 0 < i < len(raw) and (raw[i] & 0xC0) == 0x80:
            i += step
    return i


def clip_bytes(text: str, max_bytes: int, keep_end: bool = False) -> str:
    """``text`` as clean text (invalid bytes -> U+FFFD) of at most ``max_bytes`` UTF-8
    bytes, cut on a character boundary (keeping its start, or its end with ``keep_end``)."""
    if text.isascii() and len(text) <= max_bytes:
        return text
    raw = to_bytes(text)
    if len(raw) > max_bytes:
        if keep_end:
            raw = raw[_char_start(raw, len(raw) - max_bytes, forward=True):]
        else:
            raw = raw[:_char_start(raw, max_bytes, forward=False)]
    return raw.decode("utf-8", errors="replace")


class MalformedRequest(ValueError):
    """A completion request the caller built wrong (a missing key, a wrong type, the
    cursor outside its window of lines): the caller's fault, not an engine failure.
    Only :func:`validate_request` raises it; any other exception while completing
    (CheckpointError and TokenizerError are ValueErrors too) is the engine's."""


def validate_request(req: dict) -> None:
    """One-line :class:`MalformedRequest` for a malformed completion request."""
    for key in ("lines", "first", "row", "col"):
        if key not in req:
            raise MalformedRequest(f"completion request has no {key!r}")
    lines = req["lines"]
    if not isinstance(lines, (list, tuple)) or not all(isinstance(x, str) for x in lines):
        raise MalformedRequest("completion request 'lines' must be a list of strings")
    first, row, col = req["first"], req["row"], req["col"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (first, row, col)):
        raise MalformedRequest("completion request 'first', 'row' and 'col' must be integers")
    if first < 0 or col < 0:
        raise MalformedRequest("completion request 'first' and 'col' must be >= 0")
    if not first <= row < first + len(lines):
        raise MalformedRequest(f"cursor row {row} is outside the window of lines "
                               f"{first}..{first + len(lines) - 1}")


class PromptBuilder:
    """Turns a request (window of buffer lines + cursor) and ring chunks into a Prompt."""

    def __init__(self, config, tokenizer, line_cache_entries: int = 16384):
        self.config = config
        self.lines = LineTokenizer(tokenizer, line_cache_entries)

    def line(self, text: str) -> Tuple[int, ...]:
        """Tokens of one whole line (cut to max_line_bytes) with its newline."""
        return self.lines.encode(clip_bytes(text, self.config.max_line_bytes) + "\n")

    def chunk_segment(self, chunk: Chunk) -> Segment:
        name = clip_bytes(chunk.filename or "untitled", self.config.max_line_bytes)
        toks: List[int] = list(self.lines.encode(CHUNK_HEADER.format(filename=name)))
        for ln in chunk.lines:
            toks.extend(self.line(ln))
        return Segment("chunk", tuple(toks), CK_PERSIST)

    def around_cursor(self, req: dict) -> List[str]:
        """Non-blank lines within half a ring chunk of the cursor (ring chunks too similar
        to these are evicted: they make the model repeat what is already there)."""
        validate_request(req)
        r, half = req["row"] - req["first"], self.config.ring_chunk_size // 2
        return [ln for ln in req["lines"][max(0, r - half): r + half] if ln.strip()]

    def build(self, req: dict, chunks: Sequence[Chunk] = ()) -> Prompt:
        validate_request(req)
        cfg = self.config
        enc = self.lines.encode
        lines: List[str] = list(req["lines"])
        first, row = req["first"], req["row"]
        r = row - first                                   # cursor index inside the window
        line_prefix, line_suffix = split_at_byte_col(lines[r], req["col"])
        line_prefix = clip_bytes(line_prefix, cfg.max_line_bytes, keep_end=True)
        line_suffix = clip_bytes(line_suffix, cfg.max_line_bytes)
        line = self.line
        below = lines[r + 1: r + 1 + cfg.n_suffix]
        fim = bool(line_suffix.strip()) or any(ln.strip() for ln in below)

        far_start, split = window_split(first, row, cfg.n_prefix, cfg.near_prefix)
        if not fim:
            split = row                                   # plain text: every line is "far"

        segments: List[Segment] = [Segment("start", (START_TOKEN,))]
        for c in chunks:
            segments.append(self.chunk_segment(c))

        for ln_no in range(far_start, split):
            end = ln_no + 1                               # boundary after this line
            dense = end >= split - FAR_DENSE and end % min(NEAR_ALIGN, max(1, cfg.near_prefix)) == 0
            ck = CK_MEM if (dense or end % FAR_SPARSE == 0 or end == split or end >= row - 1) else CK_NONE
            if end % FAR_SPARSE == 0 or (end == split and end % NEAR_ALIGN == 0):
                ck = CK_PERSIST                           # on disk too: reopening the file starts warm
            segments.append(Segment("far", line(lines[ln_no - first]), ck))

        if fim:
            segments.append(Segment("marker", enc(FIM_PREFIX + FIM_SUFFIX)))
            segments.append(Segment("suffix", enc(line_suffix + "\n")))
            for ln in below[: cfg.near_suffix]:
                segments.append(Segment("suffix", line(ln)))
            segments.append(Segment("marker", enc(FIM_MIDDLE), CK_MEM))
            for ln_no in range(split, row):
                ck = CK_MEM if ln_no + 1 >= row - 1 else CK_NONE
                segments.append(Segment("near", line(lines[ln_no - first]), ck))

        segments.append(Segment("cursor", enc(line_prefix) if line_prefix else ()))
        segments = [s for s in segments if s.tokens]

        return Prompt(
            segments=segments, fim=fim, line_prefix=line_prefix, line_suffix=line_suffix,
            after_lines=[line_suffix] + list(below), indent=_cursor_indent(line_prefix, lines[r]),
            around_cursor=self.around_cursor(req), n_chunks=len(chunks),
        )


def window_split(first: int, row: int, n_prefix: int, near_prefix: int) -> Tuple[int, int]:
    """(far prefix start, far/near split) as buffer line numbers, first <= start <= split <= row.

    The start is aligned UP to a multiple of ``far_align`` (so it stays within n_prefix
    lines of the cursor and moves only every ``far_align`` lines); the split is
    aligned DOWN to NEAR_ALIGN, leaving at least ``near_prefix`` lines in the FIM window.
    """
    near_align = min(NEAR_ALIGN, max(1, near_prefix))
    far_align = min(FAR_ALIGN, max(1, (n_prefix - near_prefix) // 2))
    # aligning the window's first line too keeps the start stable even when the caller
    # sends fewer than n_prefix lines above the cursor
    start = min(row, max(_ceil_to(first, far_align), _ceil_to(row - n_prefix, far_align)))
    split = min(row, max(start, _floor_to(row - near_prefix, near_align)))
    return start, split


def _cursor_indent(line_prefix: str, line: str) -> int:
    """Indentation that a completion must not leave: the cursor line's (or the cursor's
    column when the line is blank up to the cursor)."""
    if line_prefix.strip():
        return indent_width(line)
    return len(line_prefix.expandtabs(8))


def _ceil_to(x: int, m: int) -> int:
    return -((-x) // m) * m


def _floor_to(x: int, m: int) -> int:
    return (x // m) * m
