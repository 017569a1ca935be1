"""Candidate text rules, free of torch (the remote backend uses them without it): the
stop rules cut on text, the streamed-row choice, and the filters and ranking applied to
the decoded rows. ``candidates`` decodes the rows on the model and uses these.

Stop rules (on text): a stop string, leaving the block (a non-empty line indented less
than the cursor line; at top level, a blank line after some code), ``max_lines`` lines.
Afterwards candidates that are whitespace-only, that only repeat the text already after
the cursor, or that duplicate a better one are dropped; the rest are ranked by mean
log-probability, the streamed row first (see ``candidates``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from .prompt_layout import indent_width


@dataclass
class StopRules:
    max_tokens: int = 64
    max_lines: int = 8
    stop_strings: Sequence[str] = ()
    indent: int = 0                      # cursor line indentation; a dedent below it ends the block
    blank_line_ends_block: bool = False  # at top level (indent 0): a blank line after code ends it
    deadline: Optional[float] = None     # time.monotonic() value after which every row stops


LINE_TOKENS = 10     # a line of code is about this many tokens (~40 characters): what the
                     # float needs of a row that has not reached its newline yet (stats only)


@dataclass
class Row:
    tokens: List[int] = field(default_factory=list)      # sampled tokens (without the final 0)
    logprobs: List[float] = field(default_factory=list)  # of every sampled token (with the final 0)
    raw: str = ""                                        # decoded text of ``tokens``
    text: str = ""                                       # raw text cut by the stop rules
    done: bool = False
    reason: str = ""                                     # eos|stop|block|max_lines|max_tokens|time
    streamed: bool = False                               # the row on_partial showed last
    first_line_at: Optional[float] = None                # perf_counter() when its first line was whole
                                                         # (a newline, the end, or LINE_TOKENS tokens)

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else float("-inf")


def apply_text_rules(text: str, rules: StopRules):
    """(text cut at the first text-based stop, reason or "") for a row's decoded text."""
    cut, reason = len(text), ""
    for s in rules.stop_strings:
        i = text.find(s)
        if 0 <= i < cut:
            cut, reason = i, "stop"
    lines = text[:cut].split("\n")
    pos = len(lines[0])
    seen_code = bool(lines[0].strip())
    for n, line in enumerate(lines[1:], start=1):
        if n >= rules.max_lines:              # the max_lines-th newline ends the candidate
            return text[:pos], "max_lines"
        if line.strip() and indent_width(line) < rules.indent:
            return text[:pos], "block"        # cut before the newline that starts the dedented line
        if rules.blank_line_ends_block and seen_code and not line.strip() and n < len(lines) - 1:
            return text[:pos], "block"        # a finished blank line after code at top level
        seen_code = seen_code or bool(line.strip())
        pos += 1 + len(line)
    return text[:cut], reason


def stream_row(rows: Sequence[Row], current: Optional[int], shown: Optional[str],
                after_lines: Sequence[str] = ()) -> Optional[int]:
    """The row to stream: the best (mean log-probability) row with non-blank text among
    those whose text extends ``shown`` (all, before anything shows); ``current`` when none
    does (its text was cut by a stop rule): the ghost text never switches to another text."""
    best = None
    for i, r in enumerate(rows):
        if not r.text.strip() or (shown is not None and not r.text.startswith(shown)):
            continue
        if after_lines and echoes_after_cursor(r.text, after_lines):
            continue                           # (so far) only what follows the cursor: not shown
        if best is None or r.mean_logprob > rows[best].mean_logprob:
            best = i
    return current if best is None else best


_TRAILING_BLANK_LINES = re.compile(r"(\n[ \t]*)+\Z")


def clean_text(text: str) -> str:
    """Drop trailing blank lines (a suggestion never ends with empty lines)."""
    return _TRAILING_BLANK_LINES.sub("", text)


def repeats_after_cursor(text: str, after_lines: Sequence[str]) -> bool:
    """True when ``text`` only repeats what already follows the cursor (line by line,
    ignoring surrounding whitespace and blank lines)."""
    cand = [ln.strip() for ln in text.split("\n") if ln.strip()]
    after = [ln.strip() for ln in after_lines if ln.strip()]
    return bool(cand) and cand == after[: len(cand)]


def echoes_after_cursor(text: str, after_lines: Sequence[str]) -> bool:
    """True when ``text`` so far is only the start of what follows the cursor (line by line,
    ignoring surrounding whitespace and blank lines; its last line may be cut short): such a
    row would show nothing new, and once complete it is dropped by ``repeats_after_cursor``."""
    cand = [ln.strip() for ln in text.split("\n") if ln.strip()]
    after = [ln.strip() for ln in after_lines if ln.strip()]
    if not cand or len(cand) > len(after):
        return False
    return cand[:-1] == after[:len(cand) - 1] and after[len(cand) - 1].startswith(cand[-1])


def rank_candidates(rows: Sequence[Row], after_lines: Sequence[str]) -> List[dict]:
    """Filtered, deduplicated candidates: [{"text": str, "logprob": float, "row": int}].

    The streamed row's candidate (``Row.streamed``: the text the user has been reading)
    comes first; among duplicates it is the one kept. When the filters dropped it (it only
    repeats the text after the cursor), the best candidate that extends its text comes
    first, if any. The rest follow by mean log-probability, best first.
    """
    best_by_text = {}
    streamed_text = None                       # the streamed row's cleaned text, filtered or not
    for i, r in enumerate(rows):
        text = clean_text(r.text)
        if r.streamed:
            streamed_text = text
        if not text.strip() or repeats_after_cursor(text, after_lines):
            continue
        norm = "\n".join(ln.rstrip() for ln in text.split("\n"))
        lp = r.mean_logprob
        old = best_by_text.get(norm)
        if old is None or r.streamed or (lp > old["logprob"] and not old["streamed"]):
            best_by_text[norm] = {"text": text, "logprob": lp, "row": i, "streamed": r.streamed}
    ranked = sorted(best_by_text.values(), key=lambda c: -c["logprob"])
    first = next((c for c in ranked if c["streamed"]), None)
    if first is None and streamed_text is not None and streamed_text.strip():
        first = next((c for c in ranked if c["text"].startswith(streamed_text.rstrip())), None)
    if first is not None:
        ranked.remove(first)
        ranked.insert(0, first)
    for c in ranked:
        del c["streamed"]
    return ranked
