"""Evaluation figures with their uncertainty: the perplexity from its tokens' NLLs (and its
batch-means interval), the accuracy with its Wilson interval (issue 24: a quality point on a
stated budget with its uncertainty shown)."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_data, tiny_lm
from explorer import evaluate as E


def test_wilson_interval_matches_the_textbook_values():
    lo, hi = E.binomial_interval(8, 10)  # Wilson, z = 1.96: [0.490, 0.943]
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    lo, hi = E.binomial_interval(0, 20)  # never below 0, and not empty at p = 0
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-3)
    lo, hi = E.binomial_interval(500, 1000)
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 1000), rel=1e-2)
    assert E.binomial_interval(0, 0) == [0.0, 1.0]


def test_perplexity_interval_uses_block_means():
    g = torch.Generator().manual_seed(0)
    nll = 3.0 + torch.randn(4096, generator=g)  # independent tokens: blocks shrink the spread by √128
    lo, hi = E.perplexity_interval(nll, block=128)
    mean = float(nll.double().mean())
    assert lo < math.exp(mean) < hi
    se = (math.log(hi) - math.log(lo)) / (2 * E.Z95)
    assert se == pytest.approx(1 / math.sqrt(4096), rel=0.35)
    # correlated tokens (each block one level) must widen the interval far beyond the i.i.d. one
    levels = torch.randn(32, generator=g).repeat_interleave(128)
    lo2, hi2 = E.perplexity_interval(3.0 + levels, block=128)
    assert math.log(hi2) - math.log(lo2) > 5 * (math.log(hi) - math.log(lo))
    assert E.perplexity_interval(torch.full((100,), 2.0)) == [math.exp(2.0), math.exp(2.0)]  # < 2 blocks


def test_perplexity_is_the_mean_of_the_scored_tokens_and_every_token_is_scored_once():
    lm, data = tiny_lm("llama"), tiny_data(60)
    texts = data.texts["test"]
    nll = E.token_nlls(lm, texts, max_tokens=120, window=16, stride=8)
    ids = lm.tokenizer((lm.tokenizer.eos_token or "\n\n").join(texts), return_tensors="pt").input_ids[0][:121]
    assert nll.shape == (len(ids) - 1,) and len(ids) > 6 * 8  # every token but the first scored exactly once
    assert E.perplexity(lm, texts, max_tokens=120, window=16, stride=8) == pytest.approx(
        math.exp(float(nll.double().mean())), rel=1e-6)
    # by hand, in text order: token p is scored once, by the first window (starts 0, 8, 16, ...) that holds it
    # after its first position, i.e. with the longest context the windows give it
    want = []
    with torch.inference_mode():
        for p in range(1, len(ids)):
            begin = next(b for b in range(0, len(ids), 8) if b + 16 > p)
            logits = lm.model(input_ids=ids[begin:p].unsqueeze(0)).logits[0, -1].float()
            want.append(torch.nn.functional.cross_entropy(logits, ids[p]))
    torch.testing.assert_close(nll, torch.stack(want), atol=1e-5, rtol=1e-5)
    # one window over everything: the NLLs are the model's own per-token losses
    with torch.inference_mode():
        logits = lm.model(input_ids=ids[:16].unsqueeze(0)).logits[0, :-1].float()
        want = torch.nn.functional.cross_entropy(logits, ids[1:16], reduction="none")
    assert torch.allclose(E.token_nlls(lm, texts, max_tokens=15, window=16, stride=16), want, atol=1e-5)


def test_quality_reports_its_interval_around_the_figure():
    lm, data = tiny_lm("llama"), tiny_data(2000)  # val: ~1,600 tokens, 12 blocks
    q = E.quality(lm, data, 512, "val")
    lo, hi = q["perplexity_ci"]
    assert lo <= q["perplexity"] <= hi and hi > lo
    clf = tiny_lm("bert")
    q = E.quality(clf, data, 0, "test")
    n = q["eval_examples"]
    assert q["accuracy_ci"] == pytest.approx(E.binomial_interval(round(q["accuracy"] * n), n))
