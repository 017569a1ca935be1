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

from pipeline_fixtures import SOURCE_LINES, completer_factory, make_request, one_torch_thread  # noqa: F401

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
