"""The FIM window sized by the measured prefill speed (issue 23, item 4; ``fim_window``).

A line move re-feeds the whole FIM window; ``fim_window_ms`` turns the prefill speed the
completer measures on its own prefills into a token budget, and the builder takes as many
near lines as fit. Checked here: the speed estimate and the budget (quantized, hysteresis),
the budget -> lines decision (bounds, alignment, monotone in the cursor row, typing never
changes it), and end to end with a slowed model: the window shrinks, a move re-feeds about
the budget, the state equals a cold prefill and the ids stay the whole-text encoding.
"""
from __future__ import annotations

import random
import time

import pytest

from rwkv_engine.core.tokenizer import WorldTokenizer
from rwkv_engine.pipeline.fim_window import (BUDGET_ALIGN, MIN_NEAR_PREFIX, MIN_NEAR_SUFFIX, PrefillSpeed,
                                             WindowBudget, fit_split, fit_suffix, grid_floor, grid_next)
from rwkv_engine.pipeline.prompt_layout import PromptBuilder, window_split

from pipeline_fixtures import (SOURCE_LINES, assert_logits_close, assert_states_close, cold_forward,
                               fast_config, flat, make_request, record_prefills)
from test_prompt_tokens import check_canonical

TOK = WorldTokenizer.default()
WINDOW_KINDS = ("marker", "suffix", "near", "cursor")


def window_tokens(prompt) -> int:
    return sum(len(s.tokens) for s in prompt.segments if s.kind in WINDOW_KINDS)


def window_text(prompt) -> str:
    """The FIM window's text (the healed text at the cursor put back)."""
    ids = [t for s in prompt.segments if s.kind in WINDOW_KINDS for t in s.tokens]
    return (TOK.decode_bytes(ids) + prompt.healed_bytes).decode()


def window_lines(prompt):
    """(near suffix lines, near prefix lines) of a FIM prompt at column 0."""
    suffix, near = window_text(prompt).split("✿suffix✿", 1)[1].split("✿middle✿", 1)
    return suffix.count("\n") - 1, near.count("\n")


# -- speed estimate and budget ------------------------------------------------------------
def test_prefill_speed_is_a_median_of_long_prefills():
    s = PrefillSpeed(samples=5, min_tokens=32)
    assert s.tokens_per_s() is None
    s.add(8, 1.0)                                   # a keystroke: not timed
    assert s.tokens_per_s() is None
    for rate in (100, 110, 90, 5000, 105):          # one outlier (a warm cache, say)
        s.add(200, 200 / rate)
    assert s.tokens_per_s() == 105
    for _ in range(5):                              # the window is the last 5 prefills
        s.add(400, 1.0)
    assert s.tokens_per_s() == 400


def test_budget_is_speed_times_time_on_a_grid():
    b = WindowBudget(700)
    assert b.tokens(None) is None                   # nothing measured yet: fixed lines
    got = b.tokens(100.0)                           # 70 tokens raw
    assert got == grid_floor(70) and got <= 70 < grid_next(got)
    assert WindowBudget(0).tokens(100.0) is None    # off
    assert grid_floor(1.0) == 16
    values = [grid_floor(x) for x in range(16, 5000)]
    assert values == sorted(values) and len(set(values)) < 40   # few sizes: ~4 per doubling


def test_budget_holds_while_the_speed_wobbles():
    rng = random.Random(3)
    b = WindowBudget(700)
    first = b.tokens(100.0)
    for _ in range(200):                            # +-20 % around the estimate
        assert b.tokens(100.0 * rng.uniform(0.8, 1.2)) == first
    assert b.tokens(None) == first                  # the model's speed is still known
    assert b.tokens(200.0) > first                  # a real change moves it
    assert b.tokens(50.0) < first


# -- budget -> lines ------------------------------------------------------------------------
def test_fit_split_bounds_and_alignment():
    near = [10] * 27                                # lines 100..126, cursor on 127
    assert fit_split(near, 100, 127, 10_000, 2) == 100          # everything fits: the line rule
    for budget in range(0, 300, 7):
        s = fit_split(near, 100, 127, budget, 2)
        assert 100 <= s <= 127 - 2 and (s == 100 or s % BUDGET_ALIGN == 0)
        kept = sum(near[s - 100:])
        # within the budget, unless only the minimum lines are left (then the fewest allowed)
        assert kept <= budget or s + BUDGET_ALIGN > 127 - 2
    assert fit_split(near, 100, 127, 0, 2) == 124                # 3 lines: the last aligned split
    assert fit_split([5, 5], 100, 102, 0, 2) == 100              # never below the minimum


def test_fit_split_moves_monotonically_with_the_cursor():
    """For fixed lines the split never moves against the cursor: it stays put or follows
    it, so moving inside a block keeps the far prefix."""
    rng = random.Random(5)
    tokens = [rng.randint(1, 40) for _ in range(400)]
    for budget in (20, 60, 150):
        prev = None
        for row in range(40, 400):
            lo = ((row - 24) // 8) * 8
            s = fit_split(tokens[lo:row], lo, row, budget, 2)
            assert prev is None or s >= prev
            prev = s


def test_fit_suffix_takes_whole_lines_within_the_budget():
    assert fit_suffix([5, 5, 5, 5], 100, 1) == 4
    assert fit_suffix([5, 5, 5, 5], 12, 1) == 2
    assert fit_suffix([50, 5], 10, 1) == 1                       # the minimum, over budget
    assert fit_suffix([50, 5], 10, 0) == 0
    assert fit_suffix([], 10, 1) == 0


def test_a_small_budget_shrinks_the_window_and_keeps_the_lines_above_in_the_far_prefix():
    cfg = fast_config(n_prefix=40, n_suffix=8, near_prefix=24, near_suffix=8)
    full, small = PromptBuilder(cfg, TOK), PromptBuilder(cfg, TOK)
    small.window_tokens = 40
    req = make_request(SOURCE_LINES, 35, 0)
    pf, ps = full.build(req), small.build(req)
    assert window_lines(pf) == (8, 35 - window_split(0, 35, 40, 24)[1])
    n_suffix, n_near = window_lines(ps)
    assert MIN_NEAR_SUFFIX <= n_suffix < 8 and MIN_NEAR_PREFIX <= n_near < 11
    assert window_tokens(ps) < window_tokens(pf) / 2
    text = (TOK.decode_bytes(flat(ps.segments)[1:]) + ps.healed_bytes).decode()
    far, window = text.split("✿prefix✿", 1)
    assert far == "\n".join(SOURCE_LINES[:35 - n_near]) + "\n"     # the lines above: all still there
    assert window.split("✿middle✿")[0] == "✿suffix✿\n" + "\n".join(SOURCE_LINES[36:36 + n_suffix]) + "\n"
    assert window.split("✿middle✿")[1] == "\n".join(SOURCE_LINES[35 - n_near:35]) + "\n"
    check_canonical(ps)
    huge = PromptBuilder(cfg, TOK)
    huge.window_tokens = 100_000                                 # fits: the fixed-size window
    assert flat(huge.build(req).segments) == flat(pf.segments)


def test_typing_on_the_cursor_line_never_resizes_the_window():
    b = PromptBuilder(fast_config(n_prefix=40, near_prefix=24, near_suffix=8), TOK)
    b.window_tokens = 48
    lines = list(SOURCE_LINES)
    heads = set()
    for text in ("    r", "    return", "    return y + 7 * zzz_long_name(1, 2, 3)"):
        lines[33] = text
        p = b.build(make_request(lines, 33))
        heads.add(tuple(tuple(s.tokens) for s in p.segments if s.kind not in ("near", "cursor")))
        heads.add(tuple(tuple(s.tokens) for s in p.segments if s.kind == "near"))
    assert len(heads) == 2                                       # the same far, suffix and near lines


def test_moving_inside_an_aligned_block_keeps_the_far_prefix_with_a_budget():
    b = PromptBuilder(fast_config(n_prefix=40, near_prefix=24, near_suffix=8), TOK)
    b.window_tokens = 40
    fars = [[s.tokens for s in b.build(make_request(SOURCE_LINES, row, 0)).segments if s.kind == "far"]
            for row in range(28, 40)]
    assert sum(a != c for a, c in zip(fars, fars[1:])) <= 12 // BUDGET_ALIGN + 1


@pytest.mark.parametrize("window", [16, 96])
def test_shrunk_windows_stay_the_whole_text_encoding_on_real_files(window):
    """The smallest budget and a middling one (test_prompt_tokens.py runs all files at 40)."""
    from test_prompt_tokens import _files, _random_requests
    rng = random.Random(11)
    b = PromptBuilder(fast_config(n_prefix=96, n_suffix=16, near_prefix=24, near_suffix=8), TOK)
    b.window_tokens = window
    checked = 0
    for path in _files()[::3]:
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
        for req in _random_requests(lines, rng, 4):
            check_canonical(b.build(req))
            checked += 1
    assert checked > 80


# -- end to end -------------------------------------------------------------------------------
class SlowModel:
    """The model with a fixed cost per token fed (a model ~100x larger on this CPU)."""

    def __init__(self, model, s_per_token: float):
        self.model, self.device, self.s_per_token = model, model.device, s_per_token

    def new_state(self, batch: int = 1):
        return self.model.new_state(batch)

    def forward(self, tokens, state=None):
        time.sleep(self.s_per_token * tokens.shape[1])
        return self.model.forward(tokens, state)


def test_a_slow_model_gets_a_smaller_window_and_cheaper_moves(completer_factory, tiny_model):
    greedy = dict(temperature=0.0, top_p=1.0, candidates=1, max_tokens=2, cache_disk_mb=0,
                  n_prefix=40, n_suffix=8, near_prefix=24, near_suffix=8)
    fixed = completer_factory(fim_window_ms=0, **greedy)
    sized = completer_factory(fim_window_ms=80, **greedy)        # 80 ms at <= 1000 tok/s: <= 80 tokens
    sized.prefiller.model = SlowModel(sized.prefiller.model, 0.001)
    got = record_prefills(sized)
    fed = {"fixed": [], "sized": []}
    for i, row in enumerate(range(30, 38)):
        req = make_request(SOURCE_LINES, row, 0, rid=i + 1)
        for name, c in (("fixed", fixed), ("sized", sized)):
            out = c.complete(dict(req))
            fed[name].append(out["stats"]["prefilled_tokens"])
        assert fixed.last_stats["window_tokens"] is None
        _, segments, res = got[-1]
        assert_equals_cold(tiny_model, res.snapshot, flat(segments))
        check_canonical(sized.build_prompt(req))
    budget = sized.last_stats["window_tokens"]
    assert budget is not None and budget <= 80, budget
    moves = sorted(fed["sized"][1:])                             # 7 moves
    assert moves[3] <= budget + 12, fed                          # p50 of a move ~ the budget
    assert sorted(fed["fixed"][1:])[3] > 2 * moves[3], fed
    assert sized.prefiller.speed.samples >= 1


def assert_equals_cold(model, snap, tokens) -> None:
    logits, state = cold_forward(model, tokens)
    assert snap.n_tokens == len(tokens)
    assert_logits_close(snap.logits, logits)
    assert_states_close(snap.state, state)


def test_the_option_off_keeps_the_fixed_window(completer_factory):
    c = completer_factory(fim_window_ms=0)
    c.prefiller.speed.add(1000, 100.0)                           # 10 tok/s
    c.complete(make_request(SOURCE_LINES, 30, 0))
    assert c.builder.window_tokens is None and c.last_stats["window_tokens"] is None
