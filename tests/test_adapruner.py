"""AdaPruner's search: categorical subsets and both Taylor orders in the space, trials cut and refit
the model in place (no copy, weights restored bit for bit), the refit is the ridge least-squares
solution, the best configuration serves every stage, and the search curve."""
from __future__ import annotations

import copy as copy_

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_data, tiny_lm
from explorer import plots
from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
from explorer.errors import ExplorerError
from explorer.importance import Importance
from explorer.methods import make_run
from explorer.methods import adapruner as ada
from explorer.reconstruct import out_weight


def _make(name="bert", stages=1, recovery="none", steps=0, trials=3, subsets=2, **options):
    lm = tiny_lm(name)
    run = make_run("adapruner", lm, tiny_data(), AnalysisConfig(samples=8, batch_size=4),
                   AllocationConfig(target=0.4, amplitude=0.1),
                   PruneConfig(stages=stages, recovery=recovery, recovery_steps=steps, train_batch_size=4,
                               eval_samples=16, speed_repeats=0), timing=False,
                   trials=trials, subsets=subsets, val_samples=8, **options)
    return lm, run


def _until_trial(run, n):
    events = run.events()
    for ev in events:
        if ev["type"] == "trial" and ev["trial"] == n:
            return events, ev
    raise AssertionError("the search ended early")


def test_space_has_categorical_subsets_and_both_taylor_orders(monkeypatch):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    lm, run = _make(subsets=3)
    sp = run.space()
    assert sp["subset"] == ("cat", (0, 1, 2))
    assert sp["order"] == ("cat", ("first", "second", "both"))
    assert sp["alpha1"] == ("float", 0.0, 1.0)
    seen = []
    real_ask = optuna.study.Study.ask

    def ask(self, fixed_distributions=None):
        seen.append(fixed_distributions)
        return real_ask(self, fixed_distributions)
    monkeypatch.setattr(optuna.study.Study, "ask", ask)
    events, ev = _until_trial(run, 1)
    events.close()
    d = seen[0]
    assert isinstance(d["subset"], CategoricalDistribution) and d["subset"].choices == (0, 1, 2)
    assert isinstance(d["order"], CategoricalDistribution) and set(d["order"].choices) == {"first", "second", "both"}
    assert isinstance(d["alpha1"], FloatDistribution)
    assert {"subset", "order", "alpha1", "alpha2", "amplitude"} <= set(ev["params"])
    _, fixed = _make(taylor_orders="second")
    assert "order" not in fixed.space()


def test_default_is_at_least_50_trials():
    from explorer.config import AdaPrunerOptions
    assert AdaPrunerOptions().trials >= 50


def test_three_trial_search_copies_no_model_and_puts_every_weight_back(monkeypatch):
    lm, run = _make("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    copies = {"n": 0}
    real = copy_.deepcopy

    def counting(obj, *a, **k):
        copies["n"] += isinstance(obj, nn.Module)
        return real(obj, *a, **k)
    monkeypatch.setattr(copy_, "deepcopy", counting)
    changed = []
    real_val = ada.val_objective

    def spy(cut, data, n):  # inside a trial: the cut and refit weights are in place
        changed.append(any(not torch.equal(before[k], v) for k, v in cut.model.state_dict().items()))
        return real_val(cut, data, n)
    monkeypatch.setattr(ada, "val_objective", spy)
    events, ev = _until_trial(run, 3)
    assert copies["n"] <= 1, f"{copies['n']} model copies during a 3-trial search"  # the run's last-good snapshot
    assert changed == [True, True, True]
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # bit-identical after the search
    imp = next(iter(run._imp.values()))
    assert {"taylor", "taylor_vector", "fisher", "fisher_vector"} <= set(imp.groups)  # both orders estimated
    assert all(np.all(v >= 0) for v in imp.neurons["fisher_vector"])
    events.close()


def test_trial_refit_equals_the_ridge_least_squares_solution():
    """One projection by hand: numpy lstsq on [X_K 1; sqrt(λD) 0] against [W x + b; sqrt(λD) W_K]."""
    lm = tiny_lm("bert")
    texts = tiny_data().texts["train"][:8]
    blocks = lm.adapter.blocks(lm.model)
    g = blocks[1].mlp
    m = g.out_module
    xs = []
    mask = {}
    h = m.register_forward_pre_hook(lambda mod, args: xs.append(args[0][mask["m"]].detach().double()))
    with torch.no_grad():
        for _, batch in lm.forward_batches(texts, 4):
            mask["m"] = batch["attention_mask"].bool()
            lm.model(**batch)
    h.remove()
    X = torch.cat(xs).numpy()  # (N, C) real tokens
    W = out_weight(m).detach().double().numpy()  # (out, C)
    b = m.bias.detach().double().numpy()
    kept = [0, 3, 4, 10, 20, 33, 50, 63]
    lam = 0.1
    XK = X[:, kept]
    D = (XK ** 2).sum(0)
    A = np.block([[XK, np.ones((len(X), 1))], [np.diag(np.sqrt(lam * D)), np.zeros((len(kept), 1))]])
    T = np.vstack([X @ W.T + b, np.sqrt(lam * D)[:, None] * W[:, kept].T])
    sol = np.linalg.lstsq(A, T, rcond=None)[0]
    W_ref, b_ref = sol[:-1].T, sol[-1]

    grams = ada.dense_grams(lm, texts, 4, relative=False)
    keeps = [(None, None)] * len(blocks)
    keeps[1] = (None, kept)
    w0, b0 = m.weight.detach().clone(), m.bias.detach().clone()
    other = blocks[0].mlp.out_module.weight.detach().clone()
    with ada.refit_units(lm, keeps, grams, lam, fit_bias=True):
        Wn = m.weight.detach().double().numpy()
        np.testing.assert_allclose(Wn[:, kept], W_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m.bias.detach().double().numpy(), b_ref, rtol=1e-4, atol=1e-5)
        gone = sorted(set(range(g.n_units)) - set(kept))
        assert not Wn[:, gone].any()  # removed channels contribute nothing, as a cut
        assert torch.equal(blocks[0].mlp.out_module.weight, other)  # uncut projections are not touched
    assert torch.equal(m.weight, w0) and torch.equal(m.bias, b0)


def test_refit_in_place_gives_the_cut_models_outputs():
    """Zeroed + refit projections equal a physically cut model with the same refit weights."""
    from explorer.surgery import prune_block
    lm = tiny_lm("gpt2")  # Conv1D (in, out) layout
    texts = tiny_data().texts["train"][:8]
    grams = ada.dense_grams(lm, texts, 4)
    blocks = lm.adapter.blocks(lm.model)
    keeps = [([0, 2], list(range(0, b.mlp.n_units, 2))) for b in blocks]
    batch = {k: v for k, v in lm.encode(texts[:3]).items() if k != "labels"}
    cut = copy_.deepcopy(lm)
    with ada.refit_units(lm, keeps, grams, 0.1) as fitted:
        with torch.no_grad():
            want = fitted.model(**batch).logits
        new = [[(g.out_module.weight.detach().clone(), g.out_module.bias.detach().clone())
                for g in (b.attn, b.mlp)] for b in blocks]
    for i, (kg, kn) in enumerate(keeps):
        prune_block(cut.adapter, cut.model, i, kg, kn)
    for b, nb, (kg, kn), ob in zip(cut.adapter.blocks(cut.model), new, keeps, blocks):
        for g, (w, bias), kept, og in zip((b.attn, b.mlp), nb, (kg, kn), (ob.attn, ob.mlp)):
            with torch.no_grad():
                g.out_module.weight.copy_(w.index_select(0, ada.unit_channels(og, kept)))  # Conv1D: rows = inputs
                g.out_module.bias.copy_(bias)
    with torch.no_grad():
        got = cut.model(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_best_configuration_serves_every_stage():
    lm, run = _make("bert", stages=2, recovery="reconstruct", trials=4, subsets=3, search_amplitude=True)
    events = list(run.events())
    assert run.status == "done", events[-1]
    trials = [e for e in events if e["type"] == "trial"]
    best = run.best
    assert best == trials[-1]["best_params"] and trials[-1]["best_value"] == min(t["value"] for t in trials)
    texts, _ = run.data.calibration(8, stage=best["subset"], seed=0)
    assert [c["stage"] for c in run.stage_configs] == [1, 2]
    for c in run.stage_configs:
        assert {k: c[k] for k in best} == best and c["samples"] == texts
    assert run._calibration(2)[0] == texts  # the stages' reconstruction samples too
    assert run.allocation.amplitude == best["amplitude"] and run.prune.recon_select == "metric"
    assert [r.extra["config"] for r in run.records] == [best, best]
    analyses = [e for e in events if e["type"] == "analysis"]
    assert all(e["importance"].metric == "mix" and e["config"] == best for e in analyses)
    s = run.report()["summary"]
    assert len(s["trials"]) == 4 and s["seconds_per_trial"] > 0 and s["space"]["subset"] == [0, 1, 2]
    assert [t["best_value"] for t in s["trials"]] == [t["best_value"] for t in trials]


def test_taylor_mix_by_hand():
    g = {"taylor": [np.array([1.0, 3.0])], "taylor_vector": [np.array([2.0, 2.0])],
         "fisher": [np.array([1.0, 1.0])], "fisher_vector": [np.array([0.0, 4.0])]}
    imp = Importance(np.zeros(1), np.zeros(1), np.zeros(1), {k: list(v) for k, v in g.items()},
                     {k: list(v) for k, v in g.items()}, {k: list(v) for k, v in g.items()}, "taylor")
    ada.taylor_mix(imp, "both", 0.25)
    vec, elem = np.array([2.0, 6.0]), np.array([2.0, 4.0])  # first + second per granularity
    want = 0.25 * vec / vec.mean() + 0.75 * elem / elem.mean()
    np.testing.assert_allclose(imp.groups["mix"][0], want)
    ada.taylor_mix(imp, "second", 1.0)
    np.testing.assert_allclose(imp.neurons["mix"][0], [0.0, 2.0])
    assert imp.metric == "mix"


def test_search_curve_draws_trials_and_best_so_far():
    trials = [{"trial": 1, "value": 3.0, "params": {"subset": 1, "alpha1": 0.5}},
              {"trial": 2, "value": 2.0}, {"trial": 3, "value": 2.5}, {"trial": 4, "value": 1.0}]
    fig = plots.search_curve(trials)
    assert [t.name for t in fig.data] == ["trial", "best so far"]
    assert list(fig.data[0].y) == [3.0, 2.0, 2.5, 1.0]
    assert list(fig.data[1].y) == [3.0, 2.0, 2.0, 1.0]
    assert list(fig.data[1].x) == [1, 2, 3, 4]
    assert "best 1.0000 after 4 trials" in fig.layout.title.text
    empty = plots.search_curve([])
    assert not empty.data and empty.layout.annotations[0].text == "no trials yet"


@pytest.mark.parametrize("bad", [{"trials": 0}, {"taylor_orders": "third"}, {"trial_lambda": 0.0},
                                 {"subsets": 0}, {"no_such_option": 1}])
def test_bad_options_are_messages(bad):
    with pytest.raises(ExplorerError):
        make_run("adapruner", tiny_lm("bert"), tiny_data(), **bad)
