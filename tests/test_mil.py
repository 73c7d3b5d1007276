"""MIL poolings: permutation invariance, attention properties, masks, empty bags."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsimil.mil import create_mil, list_mil_models

ALL = [
    "instance_max",
    "instance_mean",
    "embedding_max",
    "embedding_mean",
    "attention",
    "gated_attention",
]


def _model(name, d=8, seed=0):
    torch.manual_seed(seed)
    return create_mil(name, d, hidden_dim=16, attention_dim=8, dropout=0.0).eval()


def test_registry_has_the_six_poolings_of_the_paper():
    assert sorted(ALL) == list_mil_models()
    with pytest.raises(ValueError, match="unknown MIL model"):
        create_mil("nope", 4)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(ALL), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_permutation_invariance(name, n, seed):
    g = torch.Generator().manual_seed(seed)
    model = _model(name)
    x = torch.randn(1, n, 8, generator=g)
    perm = torch.randperm(n, generator=g)
    with torch.no_grad():
        a, b = model(x), model(x[:, perm])
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    for field in ("attention", "instance_scores"):
        wa, wb = getattr(a, field), getattr(b, field)
        if wa is not None:
            torch.testing.assert_close(wa[:, perm], wb, atol=1e-6, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(gated=st.booleans(), n=st.integers(1, 60), seed=st.integers(0, 2**16))
def test_attention_is_a_distribution_over_the_bag(gated, n, seed):
    g = torch.Generator().manual_seed(seed)
    model = _model("gated_attention" if gated else "attention")
    x = torch.randn(2, n, 8, generator=g) * 3
    with torch.no_grad():
        out = model(x)
    assert out.attention.shape == (2, n)
    assert torch.all(out.attention >= 0)
    torch.testing.assert_close(out.attention.sum(1), torch.ones(2), atol=1e-5, rtol=0)


def test_gated_attention_follows_the_paper_equations():
    model = _model("gated_attention")
    x = torch.randn(1, 7, 8)
    with torch.no_grad():
        h = model.f(x)[0]
        scores = model.w(torch.tanh(model.V(h)) * torch.sigmoid(model.U(h))).squeeze(-1)
        a = torch.softmax(scores, 0)
        z = (a[:, None] * h).sum(0)
        expected = model.g(z).squeeze(-1)
        out = model(x)
    torch.testing.assert_close(out.attention[0], a)
    torch.testing.assert_close(out.logits[0], expected)


@pytest.mark.parametrize("name", ALL)
def test_padding_never_changes_the_output_or_gets_weight(name):
    model = _model(name)
    x = torch.randn(1, 5, 8)
    padded = torch.cat([x, torch.randn(1, 3, 8) * 100], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    with torch.no_grad():
        a, b = model(x), model(padded, mask)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    for field in ("attention", "instance_scores"):
        w = getattr(b, field)
        if w is not None:
            assert torch.all(w[0, 5:] == 0)


@pytest.mark.parametrize("name", ALL)
def test_single_instance_bag_works_and_empty_bag_is_refused(name):
    model = _model(name)
    with torch.no_grad():
        out = model(torch.randn(1, 1, 8))
    assert out.logits.shape == (1,)
    if out.attention is not None:
        assert float(out.attention[0, 0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.randn(1, 0, 8))
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.randn(2, 3, 8), torch.tensor([[True, True, False], [False, False, False]]))


def test_attention_does_not_underflow_for_huge_bags_under_bf16_autocast():
    model = _model("gated_attention")
    x = torch.randn(1, 100_000, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.attention.dtype == torch.float32
    assert torch.isfinite(out.logits).all()
    assert float(out.attention.sum()) == pytest.approx(1.0, abs=1e-4)
    assert int((out.attention > 0).sum()) == 100_000
