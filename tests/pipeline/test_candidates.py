"""Candidates: forked batched decode, per-row stop rules, filtering and ranking."""
from __future__ import annotations

import time

import pytest
import torch

from rwkv_engine.pipeline.candidates import (Row, StopRules, apply_text_rules, decode_candidates,
                                    rank_candidates, repeats_after_cursor)
from rwkv_engine.core.sampler import SamplingParams
from rwkv_engine.core.state import State
from rwkv_engine.tokenizer import WorldTokenizer

from pipeline_fixtures import SOURCE_LINES, make_request

TOK = WorldTokenizer.default()
GREEDY = SamplingParams(temperature=0.0, top_p=1.0, alpha_frequency=0.0, alpha_presence=0.0)


class ScriptedModel:
    """Greedy decoding from it yields ``script`` token by token (the step lives in the state)."""

    def __init__(self, script):
        self.script = list(script)
        self.tokenizer = TOK
        self.device = torch.device("cpu")
        self.calls = []

    def new_state(self, batch=1):
        return State.zeros(1, batch, 2, 1, 64, torch.float32, "cpu")

    def logits_for(self, steps):                            # steps [B] -> logits [B, V]
        out = torch.full((len(steps), 65536), -30.0)
        for b, s in enumerate(steps):
            out[b, self.script[min(int(s), len(self.script) - 1)]] = 0.0
        return out

    def forward(self, tokens, state):
        self.calls.append(tuple(tokens.shape))
        step = state.att_x[0][:, 0] + 1
        att = state.att_x[0].clone()
        att[:, 0] = step
        new = State([att], [s.clone() for s in state.wkv], [s.clone() for s in state.ffn_x])
        return self.logits_for(step.tolist()), new


def run_script(text_or_ids, n=2, **rules):
    ids = TOK.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
    model = ScriptedModel(ids)
    rows = decode_candidates(model, model.new_state(1), model.logits_for([0]), n, GREEDY,
                             list(range(n)), StopRules(**rules))
    return rows, model


# -- stop rules, one case each ---------------------------------------------------------
def test_stop_on_end_of_text_token():
    rows, _ = run_script(TOK.encode("ab") + [0] + TOK.encode("zz"))
    assert [(r.text, r.reason) for r in rows] == [("ab", "eos")] * 2


def test_stop_on_the_fim_marker_token():
    """G1 ends a FIM middle with "✿" (10060; candle and rwkv_lightning stop on it): the
    decoder stopped only on token 0 and showed the marker and what followed."""
    rows, _ = run_script(TOK.encode("ab") + [10060] + TOK.encode("zz"))
    assert [(r.text, r.reason) for r in rows] == [("ab", "eos")] * 2


def test_healed_text_is_reproduced_first_and_never_shown():
    # the script starts with tokens the mask forbids ("x"), then "return" (starts with the healed
    # "ret"): a healing row must skip "x" (masked), take "return", and show only "urn ..."
    ids = TOK.encode("return a") + [0]
    model = ScriptedModel(ids)
    logits = model.logits_for([0])
    logits[0, TOK.encode("x")[0]] = 5.0                    # the unconstrained favourite
    rows = decode_candidates(model, model.new_state(1), logits, 2, GREEDY, [0, 1], StopRules(max_tokens=4),
                             heal=b"ret")
    for r in rows:
        assert TOK.token_bytes(r.tokens[0]).startswith(b"ret")
        assert r.text == "urn a"
    # a healed text longer than one token: first a token that is a prefix of it, then the rest
    ids = TOK.encode("\n") + TOK.encode("    pass") + [0]
    model = ScriptedModel(ids)
    rows = decode_candidates(model, model.new_state(1), model.logits_for([0]), 1, GREEDY, [0],
                             StopRules(max_tokens=4), heal=b"\n  ")
    assert TOK.decode(rows[0].tokens).startswith("\n  ") and rows[0].text == TOK.decode(rows[0].tokens)[3:]
    # end of text is not allowed while healed bytes are owed
    model = ScriptedModel([0] + TOK.encode("retry"))
    rows = decode_candidates(model, model.new_state(1), model.logits_for([0]), 1, GREEDY, [0],
                             StopRules(max_tokens=3), heal=b"ret")
    first = TOK.token_bytes(rows[0].tokens[0])
    assert first.startswith(b"ret") or b"ret".startswith(first)


def test_stop_on_configured_stop_string():
    rows, _ = run_script("x = 1 ## more text here", stop_strings=["##"])
    assert (rows[0].text, rows[0].reason) == ("x = 1 ", "stop")


def test_stop_on_leaving_the_block():
    rows, _ = run_script("foo()\n    bar()\n\nbaz()\nqux()", indent=4)
    assert (rows[0].text, rows[0].reason) == ("foo()\n    bar()\n", "block")


def test_stop_on_a_blank_line_at_top_level():
    rows, _ = run_script("x = 1\ny = 2\n\ndef g():\n", blank_line_ends_block=True)
    assert (rows[0].text, rows[0].reason) == ("x = 1\ny = 2", "block")
    rows, _ = run_script("\n\nx = 1\ny", blank_line_ends_block=True, max_tokens=6)
    assert rows[0].reason != "block"                # leading blank lines are not an end


def test_stop_on_max_lines():
    rows, _ = run_script("a\nb\nc\nd\ne", max_lines=2)
    assert (rows[0].text, rows[0].reason) == ("a\nb", "max_lines")


def test_stop_on_max_tokens():
    rows, _ = run_script("one two three four five six", max_tokens=3)
    assert len(rows[0].tokens) == 3 and rows[0].reason == "max_tokens"
    assert rows[0].text == TOK.decode(TOK.encode("one two three four five six")[:3])


def test_stop_on_time_budget():
    rows, _ = run_script("one two three four", deadline=time.monotonic() - 1.0)
    assert all(r.reason == "time" and len(r.tokens) == 1 for r in rows)


def test_superseded_decode_returns_nothing():
    model = ScriptedModel(TOK.encode("abcdef"))
    steps = []

    def should_stop():
        steps.append(1)
        return len(steps) > 2
    out = decode_candidates(model, model.new_state(1), model.logits_for([0]), 2, GREEDY, [0, 1],
                            StopRules(), should_stop=should_stop)
    assert out is None and len(model.calls) == 2


def test_text_rules_directly():
    r = StopRules(max_lines=8, indent=4, stop_strings=["<END>"])
    assert apply_text_rules("x\n    y\n  z", r) == ("x\n    y", "block")
    assert apply_text_rules("x\n    \n    y", r) == ("x\n    \n    y", "")   # blank lines are fine
    assert apply_text_rules("ab<END>cd\nzz", r) == ("ab", "stop")
    assert apply_text_rules("x\n  ", r) == ("x\n  ", "")                  # dedent not decided yet


def test_all_rows_decode_in_one_batched_call_per_step():
    model = ScriptedModel(TOK.encode("a b c d e f g h"))
    decode_candidates(model, model.new_state(1), model.logits_for([0]), 3, GREEDY, [0, 1, 2],
                      StopRules(max_tokens=4))
    assert all(shape == (3, 1) for shape in model.calls)      # one batched call per step


# -- filtering and ranking --------------------------------------------------------------------
def row(text, lps):
    return Row(tokens=[1] * len(lps), logprobs=list(lps), raw=text, text=text, done=True)


def test_rank_drops_duplicates_whitespace_and_repeats_of_the_following_text():
    rows = [row("foo(x)", [-1.0, -1.0]), row("foo(x)  ", [-0.5]), row("   \n ", [-0.1]),
            row(")\n    return y", [-0.2]), row("bar()", [-2.0]), row("baz()\n\n\n", [-3.0])]
    after = [")", "    return y", "other"]
    out = rank_candidates(rows, after)
    assert [c["text"] for c in out] == ["foo(x)  ", "bar()", "baz()"]
    assert out[0]["logprob"] == -0.5                   # the better duplicate wins
    assert [c["logprob"] for c in out] == sorted([c["logprob"] for c in out], reverse=True)


def test_repeats_after_cursor():
    assert repeats_after_cursor("}", ["", "}", "int x;"])
    assert not repeats_after_cursor("x = 1;\n}", ["", "}"])


# -- the real batched decode (tiny random model) ---------------------------------------------
@pytest.fixture
def prompt_state(completer_factory):
    c = completer_factory()
    pre = c.prefiller.prefill(c.build_prompt(make_request(SOURCE_LINES[:12], 9)).segments)
    return c.model, pre.snapshot


def test_forked_decode_equals_separate_decodes_with_the_same_seeds(prompt_state):
    model, snap = prompt_state
    params = SamplingParams(temperature=1.0, top_p=1.0, alpha_frequency=0.3)
    rules = StopRules(max_tokens=5, max_lines=3)
    seeds = [11, 12, 13]
    forked = decode_candidates(model, snap.state, snap.logits, 3, params, seeds, rules)
    for i, seed in enumerate(seeds):
        (single,) = decode_candidates(model, snap.state, snap.logits, 1, params, [seed], rules)
        assert single.tokens == forked[i].tokens
        assert single.logprobs == pytest.approx(forked[i].logprobs, abs=1e-4)
    assert len({tuple(r.tokens) for r in forked}) > 1      # different seeds, different rows


def test_candidates_are_distinct_and_streamed(prompt_state):
    model, snap = prompt_state
    partials = []
    rows = decode_candidates(model, snap.state, snap.logits, 4,
                             SamplingParams(temperature=1.0, top_p=1.0), [0, 1, 2, 3],
                             StopRules(max_tokens=4), on_partial=partials.append)
    out = rank_candidates(rows, [])
    texts = [c["text"] for c in out]
    assert len(texts) == len(set(texts)) >= 2
    assert partials and all(isinstance(p, str) for p in partials)
    assert partials[-1] in {r.text for r in rows}


# -- the streamed row stays first (issue 11: the ghost text must not jump) -------------------
def streamed_row(text, lps):
    r = row(text, lps)
    r.streamed = True
    return r


def test_rank_puts_the_streamed_row_first_then_the_rest_by_log_probability():
    rows = [row("bar()", [-0.5]), streamed_row("foo(x)", [-2.0]), row("baz()", [-1.0])]
    out = rank_candidates(rows, [])
    assert [c["text"] for c in out] == ["foo(x)", "bar()", "baz()"]
    assert out[0]["row"] == 1
    assert [c["text"] for c in rank_candidates([row(r.text, r.logprobs) for r in rows], [])] == \
        ["bar()", "baz()", "foo(x)"]                   # nothing streamed: plain rank order


def test_a_streamed_duplicate_of_a_better_row_keeps_the_streamed_text_first():
    rows = [row("foo(x)", [-0.5]), row("bar()", [-1.0]), streamed_row("foo(x)  ", [-2.0])]
    out = rank_candidates(rows, [])
    assert [c["text"] for c in out] == ["foo(x)  ", "bar()"]   # the text the user watched
    assert out[0]["row"] == 2


def test_a_streamed_row_that_is_filtered_out_leaves_first_a_row_that_extends_it():
    after = [")", "    return y", "other"]
    # the streamed text only repeats what follows the cursor: a row extending it goes first
    rows = [streamed_row(")", [-0.1]), row("pass", [-0.5]), row(")\n    return y + 1", [-1.0])]
    assert [c["text"] for c in rank_candidates(rows, after)] == [")\n    return y + 1", "pass"]
    # none extends it: plain rank order
    rows = [streamed_row(")", [-0.1]), row("pass", [-0.5]), row("z = 2", [-1.0])]
    assert [c["text"] for c in rank_candidates(rows, after)] == ["pass", "z = 2"]
    # whitespace only (after cleaning): plain rank order
    rows = [streamed_row("\n   \n", [-0.1]), row("b", [-2.0]), row("a", [-1.0])]
    assert [c["text"] for c in rank_candidates(rows, [])] == ["a", "b"]


class _RowsState:
    """A stand-in decode state that knows each batch row's id and step (fork / select)."""

    def __init__(self, ids, step=0):
        self.ids, self.step = list(ids), step

    @property
    def batch(self):
        return len(self.ids)

    def fork(self, n):
        return _RowsState(range(n), self.step)

    def select(self, keep):
        return _RowsState([self.ids[j] for j in keep], self.step)


def _logits_for(token, logprob, vocab=65536):
    """Logits [V] whose argmax is ``token`` with log-probability ``logprob``."""
    import math
    rest = math.log((math.exp(-logprob) - 1.0) / (vocab - 1))
    out = torch.full((vocab,), rest)
    out[token] = 0.0
    return out


class PerRowModel:
    """Greedy decoding yields ``scripts[row]``: a list of (text of one token, log-probability);
    the first step is shared (the forked prompt logits), later steps follow each row's script."""

    def __init__(self, first, scripts):
        self.tokenizer = TOK
        self.device = torch.device("cpu")
        self.first = first
        self.scripts = [[(self._tok(t), lp) for t, lp in s] for s in scripts]

    @staticmethod
    def _tok(text):
        if text == "":
            return 0
        (tok,) = TOK.encode(text)
        return tok

    def prompt_logits(self):
        text, lp = self.first
        return _logits_for(self._tok(text), lp)[None]

    def forward(self, tokens, state):
        rows = []
        for rid in state.ids:
            script = self.scripts[rid]
            rows.append(_logits_for(*script[min(state.step, len(script) - 1)]))
        return torch.stack(rows), _RowsState(state.ids, state.step + 1)


def decode_scripted(first, scripts, after_lines=()):
    model = PerRowModel(first, scripts)
    partials = []
    rows = decode_candidates(model, _RowsState([0]), model.prompt_logits(), len(scripts), GREEDY,
                             list(range(len(scripts))), StopRules(max_tokens=16),
                             on_partial=partials.append, after_lines=after_lines)
    return rows, partials


def test_streaming_stays_on_its_row_and_that_row_stays_first():
    # row 0 leads after two tokens ("x="), then falls behind row 1 ("x()"), whose text does
    # not extend what shows: the stream stays on row 0 and row 0 stays first
    rows, partials = decode_scripted(("x", -0.1), [
        [("=", -0.1), ("1", -5.0), ("", -0.1)],
        [("(", -1.0), (")", -0.5), ("", -0.1)],
    ])
    assert [r.text for r in rows] == ["x=1", "x()"]
    assert rows[1].mean_logprob > rows[0].mean_logprob     # row 1 is the better-ranked one
    assert partials == ["x", "x=", "x=1"]                  # the ghost text only grows
    assert [r.streamed for r in rows] == [True, False]
    assert [c["text"] for c in rank_candidates(rows, [])] == ["x=1", "x()"]


def test_streaming_moves_only_to_a_better_row_that_extends_what_shows():
    # row 2 extends "x=" and becomes the best: the stream moves to it (the text still grows);
    # row 1 is better than row 0 but never extends what shows
    rows, partials = decode_scripted(("x", -0.1), [
        [("=", -0.1), ("1", -5.0), ("", -0.1)],
        [("(", -1.0), (")", -0.5), ("", -0.1)],
        [("=", -0.2), ("2", -0.1), ("", -0.1)],
    ])
    assert partials == ["x", "x=", "x=2"]
    assert [r.streamed for r in rows] == [False, False, True]
    assert [c["text"] for c in rank_candidates(rows, [])] == ["x=2", "x()", "x=1"]
    for a, b in zip(partials, partials[1:]):
        assert b.startswith(a)


def test_a_row_that_repeats_the_text_after_the_cursor_is_never_streamed():
    # row 0 is the best but only repeats what follows the cursor ("x=1"): the final list
    # drops it, so showing it would make the ghost text jump at the end
    rows, partials = decode_scripted(("x", -0.1), [
        [("=", -0.1), ("1", -0.1), ("", -0.1)],
        [("(", -1.0), (")", -0.5), ("", -0.1)],
    ], after_lines=["", "x=1"])
    assert partials == ["x(", "x()"]                       # "x" and "x=" only echo "x=1"
    assert [c["text"] for c in rank_candidates(rows, ["", "x=1"])] == ["x()"]


def test_each_row_notes_when_its_first_line_was_whole():
    class Timed(ScriptedModel):
        def forward(self, tokens, state):
            self.times = getattr(self, "times", []) + [time.perf_counter()]
            return super().forward(tokens, state)

    model = Timed(TOK.encode("abc = 1\nsecond_line_here = 2\nthird = 3\n"))
    rows = decode_candidates(model, model.new_state(1), model.logits_for([0]), 2, GREEDY, [0, 1],
                             StopRules(max_lines=3))
    for r in rows:
        # set at the newline's step: the steps of the second and third lines came after it
        assert r.first_line_at is not None and r.first_line_at < model.times[-5]
    rows2, _ = run_script(TOK.encode("ab") + [0])            # a row that ends without a newline
    assert all(r.first_line_at is not None for r in rows2)
    # a long line without a newline counts as one line at LINE_TOKENS tokens
    from rwkv_engine.pipeline.candidates import LINE_TOKENS
    model = Timed([TOK.encode("x")[0]] * 40)
    rows3 = decode_candidates(model, model.new_state(1), model.logits_for([0]), 1, GREEDY, [0],
                              StopRules(max_tokens=40))
    assert model.times[LINE_TOKENS - 2] <= rows3[0].first_line_at < model.times[LINE_TOKENS]
