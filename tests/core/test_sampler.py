import torch
import pytest

from rwkv_engine.core.sampler import Sampler, SamplingParams


def _logits(B=3, V=50, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_at_temperature_zero():
    lg = _logits()
    tok, lp = Sampler(SamplingParams(temperature=0, alpha_frequency=0), 3, 50).sample(lg)
    assert torch.equal(tok, lg.argmax(-1))
    assert torch.allclose(lp, torch.log_softmax(lg, -1).max(-1).values)


def test_rows_are_independent_and_seedable():
    lg = _logits(4)
    p = SamplingParams(temperature=1.0, top_p=1.0)
    a = Sampler(p, 4, 50, seeds=[1, 2, 3, 4])
    b = Sampler(p, 4, 50, seeds=[1, 2, 3, 4])
    single = Sampler(p, 1, 50, seeds=[3])
    ta, tb, ts = [], [], []
    for _ in range(20):
        ta.append(a.sample(lg)[0]); tb.append(b.sample(lg)[0]); ts.append(single.sample(lg[2:3])[0])
    assert torch.equal(torch.stack(ta), torch.stack(tb))
    assert torch.equal(torch.stack(ta)[:, 2], torch.stack(ts)[:, 0])


def test_top_k_one_is_greedy_and_top_p_restricts():
    lg = _logits(2, 30, seed=5)
    s = Sampler(SamplingParams(temperature=1.0, top_k=1, alpha_frequency=0), 2, 30, seeds=[7, 8])
    for _ in range(5):
        assert torch.equal(s.sample(lg)[0], lg.argmax(-1))
    probs = torch.softmax(lg[0], -1)
    top = torch.sort(probs, descending=True)
    allowed = set(top.indices[: int((torch.cumsum(top.values, 0) < 0.5).sum()) + 1].tolist())
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, alpha_frequency=0), 1, 30, seeds=[3])
    for _ in range(40):
        assert int(s.sample(lg[:1])[0]) in allowed


def test_frequency_and_presence_penalties_with_decay():
    lg = torch.zeros(1, 5)
    lg[0, 2] = 1.0
    s = Sampler(SamplingParams(temperature=0, alpha_presence=0.8, alpha_frequency=0.3, alpha_decay=0.5), 1, 5)
    assert int(s.sample(lg)[0]) == 2
    pen = s.penalized(lg)
    assert pen[0, 2].item() == pytest.approx(1.0 - 0.8 - 0.3 * 1.0)
    assert int(s.sample(lg)[0]) != 2      # penalized below the others
    assert s.occurrences[0, 2].item() == pytest.approx(0.5)   # decayed once


def test_bad_params_are_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


@pytest.mark.parametrize("temperature", [0.01, 1e-3, 1e-4])
def test_small_temperature_on_a_flat_distribution_samples(temperature):
    """probs ** (1/T) after the cut underflowed to all zeros -> NaN -> multinomial error."""
    lg = torch.zeros(2, 60)                                   # flat: every token 1/60
    lg[1, 7] = 0.2                                            # almost flat, one slightly ahead
    s = Sampler(SamplingParams(temperature=temperature, top_p=0.9, alpha_frequency=0), 2, 60, seeds=[1, 2])
    tok, lp = s.sample(lg)
    assert 0 <= int(tok[0]) < 60 and torch.isfinite(lp).all()
    assert int(tok[1]) == 7                                   # 0.2 / T >= 20: T -> 0 is greedy


def test_temperature_scales_the_kept_logits():
    """Within the nucleus, P(token) is softmax(logit / T): two tokens, T = 0.5."""
    lg = torch.full((1, 10), -30.0)
    lg[0, 3], lg[0, 4] = 1.0, 0.0                             # P(3) : P(4) = e^1 : 1 untempered
    s = Sampler(SamplingParams(temperature=0.5, top_p=1.0, alpha_frequency=0), 1, 10, seeds=[5])
    draws = [int(s.sample(lg)[0]) for _ in range(3000)]
    share = draws.count(3) / len(draws)
    want = torch.softmax(torch.tensor([1.0, 0.0]) / 0.5, 0)[0].item()   # e^2 / (e^2 + 1) = 0.881
    assert abs(share - want) < 0.03
