"""Adaptive estimation fusion: the default attention rule by hand, the inverse-variance variant
labelled as ours, the run's reported weights, and bad options."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_data, tiny_lm
from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
from explorer.errors import ExplorerError
from explorer.methods import make_run
from explorer.methods.fusion import attention_fuse, attention_weights, fuse_attention


def _make(name="llama", **options):
    lm = tiny_lm(name)
    return lm, make_run("fusion", lm, tiny_data(), AnalysisConfig(samples=8, batch_size=4),
                        AllocationConfig(target=0.4, amplitude=0.1),
                        PruneConfig(stages=1, recovery="none", recovery_steps=0, eval_samples=16, speed_repeats=0),
                        timing=False, **options)


def test_attention_rule_by_hand():
    coarse, fine = [1.0, 2.0, 3.0], [2.0, 2.0, 2.0]
    c, f = np.array([0.5, 1.0, 1.5]), np.array([1.0, 1.0, 1.0])  # each divided by its mean
    q = (c + f) / 2  # [0.75, 1, 1.25]
    e_c, e_f = q @ c / 3, q @ f / 3  # 3.25 / 3 and 3 / 3
    a_c = np.exp(e_c) / (np.exp(e_c) + np.exp(e_f))
    assert a_c == pytest.approx(1 / (1 + np.exp(-1 / 12)))  # σ((Var c − Var f) / 2) = σ((1/6) / 2)
    assert attention_weights(coarse, fine) == pytest.approx((a_c, 1 - a_c))
    fused, w = attention_fuse(coarse, fine)
    assert w == pytest.approx(a_c)
    np.testing.assert_allclose(fused, a_c * c + (1 - a_c) * f)
    assert attention_weights(coarse, fine, temperature=1e6)[0] == pytest.approx(0.5, abs=1e-6)  # hot: plain mean
    assert attention_weights(coarse, fine, temperature=1e-3)[0] == pytest.approx(1.0)  # cold: the sharper estimate


def test_attention_weight_is_a_sigmoid_of_the_variance_gap():
    rng = np.random.default_rng(0)
    for tau in (0.3, 1.0, 4.0):
        c, f = rng.random(12) * 3, rng.random(12)
        cn, fn = c / c.mean(), f / f.mean()
        want = 1 / (1 + np.exp(-(cn.var() - fn.var()) / (2 * tau)))
        assert attention_weights(c, f, tau)[0] == pytest.approx(want)


def test_run_uses_the_attention_rule_per_layer_and_kind_by_default():
    lm, run = _make()
    events = list(run.events())
    assert run.status == "done", events[-1]
    an = next(e for e in events if e["type"] == "analysis")
    imp = an["importance"]
    assert imp.metric == "fused" and an["fusion"]["rule"] == "attention"
    w = an["fusion"]["w_coarse"]
    assert len(w) == 3 and all(len(x) == 2 and all(0 < v < 1 for v in x) for x in w)
    fused, a_c = attention_fuse(imp.neurons["taylor_vector"][1], imp.neurons["taylor"][1])
    np.testing.assert_allclose(imp.neurons["fused"][1], fused)
    assert w[1][1] == pytest.approx(a_c)
    s = run.report()["summary"]
    assert s["fusion_rule"] == "attention" and "our reading" in s["rule"] and "2403.10799" in s["rule"]
    assert run.records[0].extra["rule"] == "attention"


def test_inverse_variance_is_a_labelled_variant():
    lm, run = _make("bert", fusion_rule="inverse-variance")
    events = list(run.events())
    assert run.status == "done", events[-1]
    s = run.report()["summary"]
    assert s["fusion_rule"] == "inverse-variance" and "our own variant" in s["rule"]
    assert next(e for e in events if e["type"] == "analysis")["fusion"]["rule"] == "inverse-variance"


def test_fuse_attention_heads_follow_their_group_weight():
    lm, run = _make()
    texts, labels = run._calibration(1)
    imp = run._analyze(texts, labels, ("taylor", "taylor_vector"))
    imp, weights = fuse_attention(imp, 2.0)
    from explorer.methods.base import normalized_scores
    a = weights["w_coarse"][0][0]
    np.testing.assert_allclose(imp.heads["fused"][0], a * normalized_scores(imp.heads["taylor_vector"][0])
                               + (1 - a) * normalized_scores(imp.heads["taylor"][0]))


@pytest.mark.parametrize("bad", [{"fusion_rule": "bogus"}, {"fusion_temperature": 0.0}, {"trials": 3}])
def test_bad_options_are_messages(bad):
    with pytest.raises(ExplorerError):
        make_run("fusion", tiny_lm("llama"), tiny_data(), **bad)
