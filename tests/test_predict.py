"""The plan predictor (explorer.predict) and the plan search (explorer.search) on tiny random models,
and their Allocation-tab handlers."""
from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import tiny_data, tiny_lm

from explorer.allocation import allocate
from explorer.config import AllocationConfig, AnalysisConfig, PredictConfig, PruneConfig, SearchConfig
from explorer.errors import Cancelled, ExplorerError
from explorer.importance import analyze
from explorer.predict import (Predictor, Recipe, ValScorer, check_fits, fit_alpha, load_cached, measure,
                              plan_sparsity, run_plan, single_layer_plan)
from explorer.search import Grid, PlanSearch, predicted_optimum


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLORER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EXPLORER_CACHE", "1")
    return tmp_path / "cache"


def setup(name="llama", recovery="reconstruct", checks=2):
    lm, data = tiny_lm(name), tiny_data(200)
    texts, labels = data.calibration(16, stage=1)
    imp = analyze(lm, texts, labels if lm.task == "classification" else None, AnalysisConfig(samples=16))
    recipe = Recipe(AnalysisConfig(samples=16), AllocationConfig(target=0.3), replace(PruneConfig(), recovery=recovery),
                    PredictConfig(tokens=256, examples=40, seq_len=16, checks=checks))
    return lm, data, imp, recipe


def state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2", "distilbert"])
def test_measure_leaves_the_model_and_matches_a_single_layer_run(name):
    """Each measured point is exactly what the pipeline produces for that one-layer plan: the model is cut
    and refit by `run_plan` (the run's reconstruct on a whole model) and scored the same."""
    lm, data, imp, recipe = setup(name, checks=0)
    before = state(lm)
    pred = measure(lm, data, imp, recipe, use_cache=False)
    after = state(lm)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert pred.n_layers == 3 and len(pred.delta[0]) == 3
    scorer = ValScorer(lm, data, 256 if lm.task == "causal-lm" else 40, 16)
    levels = [0.0, 0.5, 0.0]  # layer 1 alone at the middle level
    got = run_plan(lm, data, imp, recipe, levels, scorer)
    assert got["objective"] - pred.dense == pytest.approx(pred.delta[1][1], abs=1e-4)
    assert state(lm).keys() == before.keys()


def test_prediction_is_additive_and_interpolates():
    p = Predictor("perplexity", 2.0, [0.25, 0.5], [[0.25, 0.5], [0.25, 0.5]], [[0.1, 0.3], [0.0, 0.2]])
    assert p.layer_delta(0, 0.125) == pytest.approx(0.05)
    assert p.layer_delta(0, 0.75) == pytest.approx(0.5)  # extrapolated from the last two levels
    assert p.additive([0.5, 0.5]) == pytest.approx(0.5)
    assert p.predict([0.5, 0.5]) == pytest.approx(np.exp(2.5))
    p.alpha = 2.0
    assert p.predict([0.5, 0.5]) == pytest.approx(np.exp(3.0))
    with pytest.raises(ExplorerError, match="3 layers"):
        p.predict([0.1, 0.1, 0.1])
    acc = Predictor("accuracy", 0.9, [0.5], [[0.5]], [[-0.5]])
    assert acc.predict([1.0]) == 0.0  # clipped to [0, 1]


def test_alpha_and_leave_one_out_error():
    checks = [{"dense": 1.0, "additive": a, "measured": 1.0 + 2 * a} for a in (0.1, 0.2, 0.4)]
    assert fit_alpha(checks) == pytest.approx(2.0)
    p = Predictor("perplexity", 1.0, [0.5], [[0.5]], [[0.1]], checks=checks, alpha=2.0)
    err = p.error()
    assert err["median_share_of_gap"] == pytest.approx(0.0, abs=1e-9) and err["spearman"] == pytest.approx(1.0)
    checks[0]["measured"] = 1.0 + 0.1  # additivity off by 2x on one plan: its leave-one-out error is 100 %
    assert p.error()["max_share_of_gap"] == pytest.approx(1.0)


def test_checks_measure_the_predictor_error():
    lm, data, imp, recipe = setup("llama", checks=2)
    pred = measure(lm, data, imp, recipe, use_cache=False)
    assert [c["name"] for c in pred.checks] == ["uniform", "random 1"]
    assert all(np.isfinite(c["measured"]) for c in pred.checks)
    assert pred.error()["plans"] == 2 and 0.25 <= pred.alpha <= 4


def test_cache_hit_stale_and_other_model(cache_dir):
    lm, data, imp, recipe = setup("gpt2", recovery="none", checks=0)
    pred = measure(lm, data, imp, recipe)
    files = list((cache_dir / "predictors").glob("*.json"))
    assert len(files) == 1
    t0 = time.perf_counter()
    again = measure(lm, data, imp, recipe)
    assert again.cached and again.delta == pred.delta and time.perf_counter() - t0 < 1.0
    # other settings miss
    assert load_cached(Recipe(recipe.analysis, recipe.allocation, replace(recipe.prune, recovery="reconstruct"),
                              recipe.predict).signature(lm, data)) is None
    # a half-written or other-version file is refused and removed
    files[0].write_text(files[0].read_text()[:50])
    assert load_cached(recipe.signature(lm, data)) is None and not files[0].exists()
    measure(lm, data, imp, recipe)
    d = json.loads(files[0].read_text())
    d["version"] = -1
    files[0].write_text(json.dumps(d))
    assert load_cached(recipe.signature(lm, data)) is None
    # a predictor measured on another model is refused
    other = tiny_lm("llama")
    with pytest.raises(ExplorerError, match="measured on 'tiny-gpt2'"):
        check_fits(pred, other, data)


def test_unwritable_cache_costs_the_cache_not_the_result(cache_dir):
    cache_dir.mkdir(parents=True)
    (cache_dir / "predictors").write_text("not a folder")
    lm, data, imp, recipe = setup("gpt2", recovery="none", checks=0)
    pred = measure(lm, data, imp, recipe)
    # the result: what a measurement without the cache gives
    ref = measure(lm, data, imp, recipe, use_cache=False)
    assert pred.n_layers == 3 and not pred.cached
    assert (pred.dense, pred.sparsity, pred.delta) == (ref.dense, ref.sparsity, ref.delta)
    # the cache: nothing written, the file in the way left as it was, and the next call measures again
    assert (cache_dir / "predictors").is_file() and (cache_dir / "predictors").read_text() == "not a folder"
    assert [p.name for p in cache_dir.iterdir() if not p.name.startswith("importance-")] == ["predictors"]
    assert not measure(lm, data, imp, recipe).cached


def test_stop_raises_cancelled_and_keeps_the_model():
    lm, data, imp, recipe = setup("llama", checks=0)
    before = state(lm)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 4
    with pytest.raises(Cancelled):
        measure(lm, data, imp, recipe, should_stop=stop, use_cache=False)
    assert all(torch.equal(v, state(lm)[k]) for k, v in before.items())


def test_single_layer_plan_cuts_one_layer():
    lm, data, imp, recipe = setup("llama", checks=0)
    plan = single_layer_plan(imp, recipe.allocation, 1, 0.5)
    assert [lp.actual_sparsity > 0 for lp in plan.layers] == [False, True, False]
    assert plan.layers[1].actual_sparsity == pytest.approx(0.5, abs=0.1)


def test_grid_snap_and_mutation_keep_the_total():
    params = [{"block_params": 100}] * 6
    g = Grid(params, 0.3, 0.05, 0.95)
    k = g.snap([0.3] * 6)
    assert k.sum() == 36 and g.removed(k) == pytest.approx(0.3 * 600)
    k2 = g.snap([0.0, 0.1, 0.32, 0.4, 0.5, 0.48])
    assert k2.sum() == 36
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = g.mutate(k2, rng, 3)
        if m is not None:
            assert m.sum() == 36 and m.min() >= 0 and m.max() <= g.kmax


def test_predicted_optimum_moves_sparsity_to_cheap_layers():
    p = Predictor("perplexity", 1.0, [0.5], [[0.5]] * 3, [[1.0], [0.1], [0.1]])
    g = Grid([{"block_params": 10}] * 3, 0.3, 0.1, 0.9)
    k = predicted_optimum(p, g, g.snap([0.3] * 3))
    assert k.sum() == 9 and k[0] == 0 and p.additive(g.sparsity(k)) < p.additive([0.3] * 3)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_search_improves_or_keeps_the_best_start_and_meets_the_budget(name):
    lm, data, imp, recipe = setup(name, recovery="none", checks=0)
    before = state(lm)
    s = PlanSearch(lm, data, imp, AllocationConfig(target=0.3), SearchConfig(generations=4, small=32, large=64))
    events = list(s.events())
    assert events[0]["type"] == "start" and events[-1]["type"] == "done"
    gens = [e for e in events if e["type"] == "generation"]
    assert gens and all(b["loss"] <= a["loss"] for a, b in zip(gens, gens[1:]))  # the best never gets worse
    assert events[-1]["loss"] <= min(events[0]["start"].values())
    best = events[-1]["allocation"]
    assert best.mode == "search" and abs(best.removed_fraction - 0.3) < 0.03
    assert all(torch.equal(v, state(lm)[k]) for k, v in before.items())  # zeroed units put back
    assert gens[-1]["trials_per_s"] > 0 and "eta_s" in gens[-1]


def test_search_stop_keeps_the_best_so_far_and_refuses_before_the_first_trial():
    lm, data, imp, recipe = setup("llama", recovery="none", checks=0)
    s = PlanSearch(lm, data, imp, AllocationConfig(target=0.3), SearchConfig(generations=50, small=32, large=64))
    evs = []
    for ev in s.events():
        evs.append(ev)
        if ev["type"] == "generation" and ev["generation"] == 2:
            s.stop()
    done, gens = evs[-1], [e for e in evs if e["type"] == "generation"]
    assert done["type"] == "done" and done["reason"] == "stopped" and done["allocation"] is not None
    assert [g["generation"] for g in gens] == [1, 2] and done["trials"] == gens[-1]["trials"]  # nothing after Stop
    # the best so far: the loss of the last generation, found after the start (the search improved on it) ...
    assert done["loss"] == gens[-1]["loss"] < evs[0]["loss"] == min(evs[0]["start"].values())
    # ... and the returned plan is the one that scored it, not a start plan
    from explorer.methods.base import zeroed_units
    from explorer.pruning import plan_keeps
    with zeroed_units(lm, plan_keeps(imp, done["allocation"])):
        losses, _ = s.scorer.losses(lm, s.cfg.large)
    assert float(losses.mean()) == pytest.approx(done["loss"], rel=1e-6)
    assert abs(done["allocation"].removed_fraction - 0.3) < 0.03
    s2 = PlanSearch(lm, data, imp, AllocationConfig(target=0.3), SearchConfig(generations=5, small=32, large=64))
    s2.stop()
    with pytest.raises(ExplorerError, match="before its first trial"):
        list(s2.events())


def test_mode_search_needs_a_searched_plan_and_honours_hand_edits():
    lm, data, imp, recipe = setup("llama", recovery="none", checks=0)
    cfg = AllocationConfig(target=0.3, mode="search")
    with pytest.raises(ExplorerError, match="searched plan"):
        allocate(imp.normalized, imp.params, cfg, scores=imp.unit_scores())
    a = allocate(imp.normalized, imp.params, cfg, scores=imp.unit_scores(), base=[0.1, 0.3, 0.5])
    assert [round(lp.sparsity, 6) for lp in a.layers] == pytest.approx([0.1, 0.3, 0.5], abs=0.02)
    b = allocate(imp.normalized, imp.params, cfg, {0: 0.3}, scores=imp.unit_scores(), base=[0.1, 0.3, 0.5])
    assert b.layers[0].sparsity == 0.3 and b.layers[0].manual
    assert abs(b.removed_fraction - 0.3) < 0.03  # the other layers made up the budget


# --- the Allocation tab's handlers (tiny BERT classifier, see conftest) ----------------------------------

def test_app_predictor_then_table_edit_and_search(ready):
    from app_helpers import alloc_args, req
    from ui.outputs import PredictOut
    app = ready
    out = app.on_predict("none", *alloc_args(), req("a"))
    assert isinstance(out, PredictOut) and "Predictor measured" in out.predict_status, out.predict_status
    assert "Predicted val accuracy" in out.alloc_md and "this plan" in out.alloc_md
    names = [tr.name for tr in out.predict_plot.data]
    assert {"uniform", "this plan", "adaptive, A sweep"} <= set(names)
    s = app.session(req("a"))
    pred = s.predictor
    # a redraw of the plan costs well under 100 ms with the prediction
    t0 = time.perf_counter()
    again = app.on_allocation(*alloc_args(amplitude=0.2), req("a"))
    assert time.perf_counter() - t0 < 0.5 and "Predicted val accuracy" in again.alloc_md
    # the same predictor read from the cache the second time
    assert "read from the cache" in app.on_predict("none", *alloc_args(), req("a")).predict_status
    # a search: curve, then the searched plan in the table (mode search), still editable
    outs = list(app.on_search(*alloc_args(), 3, req("a")))
    last = outs[-1]
    assert "Search finished" in last.predict_status or "Search no new plans" in last.predict_status, last.predict_status
    assert last.mode_in["value"] == "search" and s.searched is not None
    assert len(last.plan_search_plot.data) == 2  # trials and the best so far
    shown = app.on_allocation(*alloc_args(mode="search"), req("a"))
    assert [round(v, 4) for v in shown.alloc_table.iloc[:, 2]] == [round(v, 4) for v in s.searched]
    assert s.predictor.delta == pred.delta


def test_app_search_mode_without_a_search_says_so(ready):
    from app_helpers import alloc_args, req
    out = ready.on_allocation(*alloc_args(mode="search"), req("a"))
    assert "press Search plan first" in out.alloc_md


def test_app_predict_needs_importance(app):
    from app_helpers import alloc_args, req
    out = app.on_predict("none", *alloc_args(), req("b"))
    assert "compute importance first" in out.predict_status


def test_app_runs_the_searched_plan(ready):
    from app_helpers import alloc_args, req, run_all
    app = ready
    list(app.on_search(*alloc_args(), 2, req("a")))
    s = app.session(req("a"))
    assert "the searched plan" in app.on_prune_plan("adaptive", *alloc_args(mode="search"), req("a"))
    run_all(app, req("a"), mode="search", stages=1)
    rep = s.history[-1]
    assert rep["status"] == "done" and "searched plan" in rep["label"]
    want = [(lp.keep_groups, lp.keep_neurons) for lp in s.allocation.layers]
    assert [(w["groups"], w["neurons"]) for w in rep["plan"]["widths"]] == want


def test_app_bad_predictor_and_search_settings_are_messages(ready):
    from app_helpers import alloc_args, req
    out = ready.on_predict("none", *alloc_args(), req("a"), 256, 32, "0.5,abc")
    assert "levels must be comma-separated numbers" in out.predict_status
    out = ready.on_predict("none", *alloc_args(), req("a"), 256, 2)
    assert "--examples must be in [16" in out.predict_status
    last = list(ready.on_search(*alloc_args(), 2, req("a"), "many"))[-1]
    assert "small must be a whole number" in last.predict_status
    last = list(ready.on_search(*alloc_args(budget="flops"), 2, req("a")))[-1]
    assert "params budget" in last.predict_status
    s = ready.session(req("a"))
    assert s.searched is None and s.predictor is None  # nothing was kept from the refused requests
