"""Prompt layout for state reuse: what changes most often goes at the END.

    [0]                                          start token
    [chunk 1] ... [chunk n]                      ring chunks, oldest first, each under a
                                                 comment line naming its file ("# a.py")
    [far prefix of this file]                    lines above the FIM window
    ✿prefix✿✿suffix✿{near suffix}\n✿middle✿{near prefix lines}\n{cursor line up to the cursor}

(RWKV-7 G1c suffix-first FIM; generation continues the prefix.) When only
whitespace follows the cursor the FIM markers are left out and the prompt is the
plain text up to the cursor.

**The ids are the whole-text tokenization** of that text, as G1 was trained (greedy
longest match over the whole string, like rwkv_lightning's FIM server): 127 World
tokens join a newline with the indentation after it ("\n    "), so encoding each line
with its own "\n" gave another sequence on most lines of indented code. The text is
cut into *segments* of about one line whose separator goes at their START (a line's
segment is "\n" + its text), and only at boundaries no vocabulary token can span
(``VocabIndex.joins``: only after text that is not whitespace or one of "…。，");
a piece that would start at another boundary (after a blank line, trailing spaces) is
merged into the previous one. So the segments' encodings concatenate to ``encode``
of the whole prompt, and each is still cached per text in an LRU.

**Token healing.** The prompt ends at the cursor, often inside a word: the last token
of the cursor line, and before it any token a longer vocabulary token could absorb
with it, are left out (``Prompt.healed_bytes``); the decoder makes every candidate
re-produce them first (``candidates.HealMask``) and shows what follows.

The state cache keys checkpoints by a hash chain over segments, so each segment
boundary is a possible resume point (kept in memory; the ring chunks and, in the far
prefix, every FAR_SPARSE-th line and the far/near split also on disk, so a restarted
editor reopening a file resumes from them). A checkpoint wanted at a boundary that a
merge removed goes to the boundary before. Boundaries are placed so that
  * typing on one line changes only the last segment,
  * moving one line changes only the FIM window: the far/near split is aligned to
    ``NEAR_ALIGN`` lines and the far prefix start to ``FAR_ALIGN`` lines, so both
    stay put while the cursor moves inside a block of lines.

**The FIM window's size.** Since the window is suffix-first, a one-line move re-feeds all
of it. With ``PromptBuilder.window_tokens`` set (the completer sets it from the measured
prefill speed and ``fim_window_ms``; see ``fim_window``) the window holds only the lines
that fit that many tokens: the split moves up from the line rule's (in ``BUDGET_ALIGN``-line
steps, at least 2 near lines), and the near suffix takes what is left (at least 1 line).
What the smaller window trades: the near prefix lines it leaves out are still in the prompt,
as far prefix lines before ``✿prefix✿`` (the model reads them, just not inside the FIM
markers, and their states are cached); the near suffix lines it leaves out are NOT in the
prompt at all (only the lines of the window's suffix are; ``after_lines``, which the
candidates' stop and ranking rules read, keeps every line sent). The far prefix start
(``window_split``) does not depend on the budget, so remote backends, which have no
prefill speed and leave ``window_tokens`` None, see the same far prefix.
No torch import here.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from ..core.vocab_index import vocab_index
from .context_ring import Chunk
from .fim_window import fit_window

FIM_MARK = "✿"                 # one World token (10060); G1 knows it only in the FIM markers
FIM_PREFIX = "✿prefix✿"
FIM_SUFFIX = "✿suffix✿"
FIM_MIDDLE = "✿middle✿"
CHUNK_SEPARATOR = "\n\n"   # between ring chunks (each starts with a comment line naming its file)
DOC_SEPARATOR = "\n\n"     # between the last ring chunk and the text of the file being edited
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
    healed_bytes: bytes = b""       # text removed at the cursor: decoding must re-produce it first

    @property
    def healed(self) -> str:
        return self.healed_bytes.decode("utf-8", errors="replace")

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
    """Turns a request (window of buffer lines + cursor) and ring chunks into a Prompt.

    ``heal``: drop the tokens at the cursor that typing may still change (the local
    engine constrains decoding to re-produce them); False keeps every token up to the
    cursor (servers that cannot constrain their first tokens).

    ``window_tokens``: the token budget of the FIM window (``fim_window``; the completer sets
    it from the measured prefill speed); None keeps the fixed near_prefix / near_suffix lines."""

    def __init__(self, config, tokenizer, line_cache_entries: int = 16384, heal: bool = True):
        self.config = config
        self.tokenizer = tokenizer
        self.heal = heal
        self.window_tokens: Optional[int] = None
        self.lines = LineTokenizer(tokenizer, line_cache_entries)
        self.vocab = vocab_index(tokenizer)
        self._chunk_segments: "OrderedDict[tuple, Segment]" = OrderedDict()

    def chunk_segment(self, chunk: Chunk, first: bool = True) -> Segment:
        """One ring chunk: a comment line naming its file, then its lines (see module doc)."""
        key = (first, chunk.filename, chunk.lines)
        seg = self._chunk_segments.get(key)
        if seg is None:
            text = chunk_text(chunk, self.config.max_line_bytes, self.vocab)
            seg = Segment("chunk", self.lines.encode(text if first else CHUNK_SEPARATOR + text), CK_PERSIST)
            self._chunk_segments[key] = seg
            while len(self._chunk_segments) > 64:
                self._chunk_segments.popitem(last=False)
        return seg

    def head_segments(self, chunks: Sequence[Chunk]) -> List[Segment]:
        """The start token and the ring chunks: the part every prompt shares."""
        return [Segment("start", (START_TOKEN,))] + [self.chunk_segment(c, i == 0) for i, c in enumerate(chunks)]

    def around_cursor(self, req: dict) -> List[str]:
        """Non-blank lines within half a ring chunk of the cursor (ring chunks too similar
        to these are evicted: they make the model repeat what is already there)."""
        validate_request(req)
        r, half = req["row"] - req["first"], self.config.ring_chunk_size // 2
        return [ln for ln in req["lines"][max(0, r - half): r + half] if ln.strip()]

    def build(self, req: dict, chunks: Sequence[Chunk] = ()) -> Prompt:
        validate_request(req)
        cfg = self.config
        lines: List[str] = list(req["lines"])
        first, row = req["first"], req["row"]
        r = row - first                                   # cursor index inside the window
        line_prefix, line_suffix = split_at_byte_col(lines[r], req["col"])
        line_prefix = clip_bytes(line_prefix, cfg.max_line_bytes, keep_end=True)
        line_suffix = clip_bytes(line_suffix, cfg.max_line_bytes)
        below = lines[r + 1: r + 1 + cfg.n_suffix]
        fim = bool(line_suffix.strip()) or any(ln.strip() for ln in below)

        far_start, split = window_split(first, row, cfg.n_prefix, cfg.near_prefix)
        n_below = cfg.near_suffix
        if not fim:
            split = row                                   # plain text: every line is "far"
        elif self.window_tokens is not None:
            split, n_below = self.fit_window(lines, first, row, split, below)

        head = self.head_segments(chunks)
        text = _Pieces(self.vocab, after_chunks=bool(chunks))
        clip = cfg.max_line_bytes
        for ln_no in range(far_start, split):
            end = ln_no + 1                               # boundary after this line
            dense = end >= split - FAR_DENSE and end % min(NEAR_ALIGN, max(1, cfg.near_prefix)) == 0
            ck = CK_MEM if (dense or end % FAR_SPARSE == 0 or end == split or end >= row - 1) else CK_NONE
            if end % FAR_SPARSE == 0 or (end == split and end % NEAR_ALIGN == 0):
                ck = CK_PERSIST                           # on disk too: reopening the file starts warm
            text.add("far", clip_bytes(lines[ln_no - first], clip), ck)

        if fim:
            if split > far_start:
                # the newline after the far prefix is a piece of its own: "\n" never joins "✿",
                # and the last far line's own segment is the one it has when the split moves on
                text.add("far", "", CK_MEM)
            text.add("marker", FIM_PREFIX + FIM_SUFFIX, sep="")
            text.add("suffix", line_suffix, sep="")
            for ln in below[:n_below]:
                text.add("suffix", clip_bytes(ln, clip))
            text.add("marker", "\n" + FIM_MIDDLE, CK_MEM, sep="")
            for ln_no in range(split, row):
                ck = CK_MEM if ln_no + 1 >= row - 1 else CK_NONE
                text.add("near", clip_bytes(lines[ln_no - first], clip), ck,
                         sep="" if ln_no == split else "\n")
            text.add("cursor", line_prefix, sep="" if row == split else "\n")
        else:
            text.add("cursor", line_prefix)

        segments = head + [Segment(kind, self.lines.encode(t), ck) for kind, t, ck in text.pieces if t]
        healed = b""
        if self.heal:
            segments, healed = heal_cursor(segments, self.vocab, self.tokenizer)

        return Prompt(
            segments=segments, fim=fim, line_prefix=line_prefix, line_suffix=line_suffix,
            after_lines=[line_suffix] + list(below), indent=_cursor_indent(line_prefix, lines[r]),
            around_cursor=self.around_cursor(req), n_chunks=len(chunks), healed_bytes=healed,
        )

    def fit_window(self, lines: Sequence[str], first: int, row: int, split: int,
                   below: Sequence[str]) -> Tuple[int, int]:
        """(far/near split, near suffix lines) within ``window_tokens`` (``fim_window``),
        counted in this builder's own tokens: the FIM markers, then "\n" + each line."""
        clip = self.config.max_line_bytes
        markers = len(self.lines.encode(FIM_PREFIX + FIM_SUFFIX)) + len(self.lines.encode("\n" + FIM_MIDDLE))
        return fit_window(self.config, self.window_tokens - markers,
                          lambda ln: len(self.lines.encode("\n" + clip_bytes(ln, clip))),
                          lines[split - first: row - first], split, row, below)


class _Pieces:
    """Prompt text after the ring chunks as (kind, text, checkpoint) pieces, each with its
    separator at its START (a newline and the next line's indentation belong together,
    as whole-text tokenization joins them). A piece whose first byte a token may join to
    the previous piece's last byte is merged into that piece (``VocabIndex.joins``), so
    every boundary left is one that ``encode`` of the whole text also has."""

    def __init__(self, vocab, after_chunks: bool):
        self.vocab = vocab
        self.pieces: List[list] = []            # [kind, text, checkpoint]
        self.after_chunks = after_chunks        # the first piece follows ring chunks
        self.started = False

    def add(self, kind: str, text: str, ck: int = CK_NONE, sep: str = "\n") -> None:
        """Append ``sep + text`` (the first piece: DOC_SEPARATOR after ring chunks, else
        nothing; an empty first line still counts as started, so the next has its newline)."""
        text = (sep if self.started else DOC_SEPARATOR if self.after_chunks else "") + text
        self.started = True
        if not text:
            return
        if self.pieces and self.vocab.joins(to_bytes(self.pieces[-1][1][-1:]), to_bytes(text[:1])):
            # no boundary here (a blank line, trailing spaces): merge, and move the checkpoint
            # wanted here to the boundary before, which the same lines give every prompt
            last = self.pieces[-1]
            if len(self.pieces) > 1:
                self.pieces[-2][2] = max(self.pieces[-2][2], last[2])
            last[0], last[1], last[2] = kind, last[1] + text, ck
        else:
            self.pieces.append([kind, text, ck])


def heal_cursor(segments: List[Segment], vocab, tokenizer) -> Tuple[List[Segment], bytes]:
    """Drop the trailing tokens of the last (cursor) segment whose text the cursor may
    still extend: the last token, and before it every token that a longer vocabulary
    token could absorb together with the dropped text. Returns (segments, dropped bytes)."""
    if not segments or segments[-1].kind in ("start", "chunk"):
        return segments, b""
    last = segments[-1]
    toks = list(last.tokens)
    healed = tokenizer.token_bytes(toks.pop())
    while toks and vocab.extends(tokenizer.token_bytes(toks[-1]) + healed):
        healed = tokenizer.token_bytes(toks.pop()) + healed
    out = list(segments[:-1])
    if toks:
        out.append(Segment(last.kind, tuple(toks), last.checkpoint))
    return out, healed


def chunk_text(chunk: Chunk, max_line_bytes: int, vocab) -> str:
    """A ring chunk as prompt text: a comment line naming the file in the chunk's language,
    then its lines; trailing whitespace and characters that a token joins with a following
    newline are cut, so the next segment can start with its newline."""
    name = clip_bytes(chunk.filename or "untitled", max_line_bytes)
    body = "\n".join(clip_bytes(ln, max_line_bytes) for ln in chunk.lines)
    text = (chunk_header(name) + "\n" + body).rstrip()
    while text and vocab.joins(to_bytes(text[-1]), b"\n"):
        text = text[:-1].rstrip()
    return text


_COMMENT_BY_EXT = {}
for _prefix, _exts in (("#", "py pyi sh bash zsh fish rb pl r yaml yml toml cfg ini conf mk cmake nix jl ex exs"),
                       ("--", "lua sql hs elm ada"),
                       ("//", "c h cc cpp cxx hpp hh cu cuh hip js jsx ts tsx mjs go rs java kt kts scala swift"
                              " cs dart zig php proto glsl"),
                       ('"', "vim"), (";", "el lisp clj scm asm s"), ("%", "tex erl m")):
    for _ext in _exts.split():
        _COMMENT_BY_EXT[_ext] = _prefix


def chunk_header(filename: str) -> str:
    """``# path/name.py``: a comment line in the file's language (``#`` when unknown)."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    ext = base.rsplit(".", 1)[-1].lower() if "." in base else base.lower()
    if ext in ("html", "htm", "xml", "md", "svg", "vue"):
        return f"<!-- {filename} -->"
    return f"{_COMMENT_BY_EXT.get(ext, '#')} {filename}"


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
