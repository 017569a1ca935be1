"""The FIM window sized by the measured prefill speed (engine option ``fim_window_ms``).

The FIM window is suffix-first (``prompt_layout``), so a one-line cursor move changes the
prompt from its near suffix on and, without idle priming, re-feeds all of it: the markers,
the near suffix and the near prefix lines (~350 tokens with 8 / 24 lines): ~3.5 s at
100 tok/s, 8 s for the G1 1.5B shape (int8) on a 2-core EPYC, which prefills ~35-40 tok/s
(bench/out/linemove-1.5b-*-2026-12-07.json). Here the window gets a token budget
instead: the prefill speed the completer measures on its own prefills (``PrefillSpeed``)
times ``fim_window_ms`` (``WindowBudget``), and the builder takes as many lines as fit
(``fit_split``, ``fit_suffix``):

* near prefix: a share of the budget proportional to ``near_prefix`` / (``near_prefix`` +
  ``near_suffix``); the far/near split moves UP from where the line rule puts it, in steps
  of ``BUDGET_ALIGN`` lines, until the lines between it and the cursor fit, leaving at least
  ``MIN_NEAR_PREFIX`` lines. The lines it leaves out stay in the prompt, in the far prefix
  (before the FIM markers), whose states are cached.
* near suffix: what the near prefix left of the budget, line by line, at least
  ``MIN_NEAR_SUFFIX`` line; the lines below it are not in the prompt at all.

Never more lines than ``near_prefix`` / ``near_suffix`` give (on a fast machine the whole
window fits and the prompt is the fixed-size one). Token counts are the builder's own
encodings of "\\n" + line (its LRU-cached segments). The count leaves out the cursor line, so
typing never changes the window; for a fixed split the near lines' tokens only grow as the
cursor moves down, so the split moves monotonically with the cursor and stays put inside
an aligned block like the line rule's. The budget is quantized to a geometric grid with
hysteresis, so a wobbling speed estimate does not resize the window (which would make the
next keystroke re-feed it). Until a model's first long prefill is timed (its first request,
or the first after a switch to a faster precision) the window is the fixed one, so the
request after that one re-feeds the window once as it shrinks. No torch import here.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable, Optional, Sequence, Tuple

MIN_NEAR_PREFIX = 2       # lines above the cursor kept in the window, whatever the budget
MIN_NEAR_SUFFIX = 1       # lines below the cursor kept in the window, whatever the budget
BUDGET_ALIGN = 4          # a budgeted split sits on a multiple of this many lines (divides NEAR_ALIGN)

SPEED_SAMPLES = 9         # prefills the speed estimate is the median of
MIN_SAMPLE_TOKENS = 32    # shorter prefills (keystrokes) are not timed: overheads dominate them
GRID_STEP = 2 ** 0.25     # budgets are grid values 16 * GRID_STEP**k (4 per doubling)
GRID_BASE = 16
HYSTERESIS = 1.25         # the budget is re-quantized only when the raw one leaves its cell by this


class PrefillSpeed:
    """Running estimate of the model's prefill speed (tokens/s): the median of the last
    ``SPEED_SAMPLES`` prefills of at least ``MIN_SAMPLE_TOKENS`` tokens (robust to a
    prefill slowed by another process, or sped up by a warm cache)."""

    def __init__(self, samples: int = SPEED_SAMPLES, min_tokens: int = MIN_SAMPLE_TOKENS):
        self.min_tokens = min_tokens
        self._rates: "deque[float]" = deque(maxlen=samples)

    def add(self, tokens: int, seconds: float) -> None:
        if tokens >= self.min_tokens and seconds > 0:
            self._rates.append(tokens / seconds)

    @property
    def samples(self) -> int:
        return len(self._rates)

    def tokens_per_s(self) -> Optional[float]:
        """The estimate, or None before the first timed prefill."""
        if not self._rates:
            return None
        rates = sorted(self._rates)
        mid = len(rates) // 2
        return rates[mid] if len(rates) % 2 else (rates[mid - 1] + rates[mid]) / 2


def grid_floor(x: float) -> int:
    """The largest budget grid value <= x (GRID_BASE at least)."""
    if x <= GRID_BASE:
        return GRID_BASE
    k = math.floor(math.log(x / GRID_BASE, GRID_STEP) + 1e-9)
    return int(round(GRID_BASE * GRID_STEP ** k))


def grid_next(value: int) -> int:
    """The grid value after ``value`` (a grid value)."""
    k = round(math.log(value / GRID_BASE, GRID_STEP))
    return int(round(GRID_BASE * GRID_STEP ** (k + 1)))


class WindowBudget:
    """Tokens the FIM window may take so that re-feeding it lasts about ``target_ms``:
    speed x time, quantized down to the grid, kept while the raw value stays within
    [budget / HYSTERESIS, next grid value x HYSTERESIS)."""

    def __init__(self, target_ms: int):
        self.target_ms = target_ms
        self.current: Optional[int] = None

    def tokens(self, tokens_per_s: Optional[float]) -> Optional[int]:
        """The budget for this speed; None = no budget (option off, or no speed measured
        yet): the window keeps its fixed line counts."""
        if self.target_ms <= 0 or tokens_per_s is None:
            return self.current if self.target_ms > 0 else None
        raw = tokens_per_s * self.target_ms / 1000.0
        cur = self.current
        if cur is None or raw < cur / HYSTERESIS or raw >= grid_next(cur) * HYSTERESIS:
            self.current = grid_floor(raw)
        return self.current


def near_share(budget: int, near_prefix: int, near_suffix: int) -> int:
    """The part of a line budget that the near prefix may take (in proportion to the lines)."""
    total = near_prefix + near_suffix
    return budget if total <= 0 else (budget * near_prefix) // total


def fit_split(near_tokens: Sequence[int], split: int, row: int, budget: int, min_lines: int,
              align: int = BUDGET_ALIGN) -> int:
    """The far/near split for a token budget. ``near_tokens[i]``: tokens of buffer line
    ``split + i`` (the line rule's near lines, ``split``..``row - 1``). Moves the split up
    to the next multiples of ``align`` until the lines from it to the cursor take at most
    ``budget`` tokens, but not past the last multiple that leaves ``min_lines`` lines (nor
    below ``split``)."""
    highest = max(split, min(row, ((row - min_lines) // align) * align))
    used = sum(near_tokens)
    s = split
    while s < highest and used > budget:
        nxt = min(highest, (s // align + 1) * align)
        used -= sum(near_tokens[s - split: nxt - split])
        s = nxt
    return s


def fit_suffix(suffix_tokens: Sequence[int], budget: int, min_lines: int) -> int:
    """How many of the near suffix lines (tokens ``suffix_tokens``, nearest first) fit in
    ``budget`` tokens, ``min_lines`` at least."""
    n, used = 0, 0
    for t in suffix_tokens:
        if n >= min_lines and used + t > budget:
            break
        n, used = n + 1, used + t
    return n


def fit_window(config, budget: int, tokens: Callable[[str], int], near_lines: Sequence[str],
               split: int, row: int, below: Sequence[str]) -> Tuple[int, int]:
    """(far/near split, near suffix lines) for ``budget`` tokens of window lines.
    ``near_lines``: the line rule's near lines (buffer lines ``split``..``row - 1``),
    ``below``: the lines after the cursor line; ``tokens(line)``: what a line costs."""
    budget = max(0, budget)
    near = [tokens(ln) for ln in near_lines]
    fitted = fit_split(near, split, row, near_share(budget, config.near_prefix, config.near_suffix),
                       min(MIN_NEAR_PREFIX, config.near_prefix))
    left = budget - sum(near[fitted - split:])
    n_below = fit_suffix([tokens(ln) for ln in below[:config.near_suffix]], left,
                         min(MIN_NEAR_SUFFIX, config.near_suffix))
    return fitted, n_below
