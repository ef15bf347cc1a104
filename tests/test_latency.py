"""Speed as the budget (explorer.latency, evaluate.same_width_reference): the latency cost model
(monotone, reproduces its grid, cached), allocations to a latency or FLOPs budget (synthetic cost
models, so nothing here depends on timing), the honest same-width limit, the config fields, and
pruning runs with these budgets. Fast: tiny random models from conftest."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_data, tiny_lm
from explorer import evaluate as ev_mod
from explorer import latency as L
from explorer.allocation import Allocation
from explorer.allocation import validate as validate_allocation
from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
from explorer.config import validate as validate_config
from explorer.errors import ExplorerError
from explorer.importance import analyze, normalize
from explorer.pruning import PruningRun, apply_allocation
from explorer.surgery import prune_block, widths

# all-MiniLM-L6-v2 and SmolLM2-135M-like layers (as tests/test_allocation.py)
MINILM = {"groups": 12, "n_neurons": 1536, "group_params": 4 * 384 * 32 + 3 * 32,
          "neuron_params": 2 * 384 + 1, "block_params": 1774464, "heads_per_group": 1}
GQA = {"groups": 3, "n_neurons": 1536, "group_params": 8 * 64 * 576, "neuron_params": 3 * 576,
       "block_params": 3 * 8 * 64 * 576 + 1536 * 3 * 576 + 2 * 576, "heads_per_group": 3}


class LinearCost:
    """A synthetic cost model: block = base + per_group·g + per_neuron·n (ms), fixed outside."""
    unit = "ms"

    def __init__(self, base=1.0, per_group=2.0, per_neuron=0.01, fixed=5.0):
        self.base, self.per_group, self.per_neuron, self.fixed = base, per_group, per_neuron, fixed

    def block(self, g, n):
        return self.base + self.per_group * g + self.per_neuron * n

    def predict(self, ws):
        return L.predict(self, ws)


class FlatCost(LinearCost):
    """Latency that flattens below a width (Kwon et al.): pruning under it buys nothing."""

    def block(self, g, n):
        return self.base + self.per_group * max(g, 2) + self.per_neuron * max(n, 300)


def structure_and_scores(layer: dict, n_layers: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    imp = normalize(rng.normal(size=n_layers))
    scores = [(rng.gamma(2.0, 1.0, layer["groups"]) * layer["group_params"] / layer["neuron_params"],
               rng.gamma(2.0, 1.0, layer["n_neurons"])) for _ in range(n_layers)]
    return imp, [dict(layer) for _ in range(n_layers)], scores


def check_plan(alloc: Allocation, structure: list[dict], cfg: AllocationConfig) -> None:
    assert isinstance(alloc, Allocation) and len(alloc.layers) == len(structure)
    for p, l in zip(alloc.layers, structure):
        assert 1 <= p.keep_groups <= l["groups"] and 1 <= p.keep_neurons <= l["n_neurons"]
        after = (l["block_params"] - (l["groups"] - p.keep_groups) * l["group_params"]
                 - (l["n_neurons"] - p.keep_neurons) * l["neuron_params"])
        assert p.params_after == after
        assert p.params_after >= (1 - cfg.max_sparsity) * l["block_params"] - l["group_params"] - l["neuron_params"]
    json.dumps(alloc.to_json())


# --- the cost model --------------------------------------------------------------------------

def test_monotone_is_the_least_non_decreasing_majorant():
    rng = np.random.default_rng(0)
    raw = rng.uniform(1, 2, size=(4, 5)) + np.add.outer(np.arange(4), np.arange(5))
    raw[1, 2] = 0.1  # a noisy dip
    m = L.monotone(raw)
    assert (m >= raw).all()
    assert (np.diff(m, axis=0) >= 0).all() and (np.diff(m, axis=1) >= 0).all()
    ok = np.add.outer(np.arange(4.0), np.arange(5.0))  # already monotone: unchanged
    assert (L.monotone(ok) == ok).all()


def synthetic_cost_model(groups=(1, 4, 8, 12), neurons=(1, 513, 1025, 1536), fixed=3.0, noisy=False):
    g, n = np.meshgrid(np.asarray(groups, float), np.asarray(neurons, float), indexing="ij")
    raw = 10 + 2.0 * g + 0.01 * n + 0.001 * g * n  # (G, N)
    if noisy:
        raw = raw + np.random.default_rng(1).normal(0, 3, raw.shape)
    return L.CostModel({"mode": "forward"}, list(groups), list(neurons), L.monotone(raw).tolist(), fixed,
                       raw.tolist()), raw


@pytest.mark.parametrize("noisy", [False, True])
def test_cost_model_reproduces_its_grid_and_is_monotone(noisy):
    cm, raw = synthetic_cost_model(noisy=noisy)
    grid = np.asarray(cm.block_ms)
    for i, g in enumerate(cm.groups):
        for j, n in enumerate(cm.neurons):
            assert cm.block(g, n) == pytest.approx(grid[i, j])
            if not noisy:
                assert cm.block(g, n) == pytest.approx(raw[i, j])  # a monotone measurement is kept as it is
    gs, ns = np.arange(1, 13), np.arange(1, 1537, 37)
    t = np.array([[cm.block(g, n) for n in ns] for g in gs])  # (12, 42)
    assert (np.diff(t, axis=0) >= -1e-12).all() and (np.diff(t, axis=1) >= -1e-12).all()
    assert cm.block(0, 0) == pytest.approx(grid[0, 0]) and cm.block(99, 9999) == pytest.approx(grid[-1, -1])
    assert cm.predict([(12, 1536)] * 6) == pytest.approx(3.0 + 6 * grid[-1, -1])
    again = L.CostModel.from_json(json.loads(json.dumps(cm.to_json())))
    assert again.block(6, 700) == pytest.approx(cm.block(6, 700)) and again.cached


def test_grid_points_span_the_widths():
    assert L.grid_points(12, 4) == [1, 5, 8, 12]
    assert L.grid_points(3, 4) == [1, 2, 3]
    assert L.grid_points(1, 4) == [1]


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_measured_cost_model_is_cached_and_leaves_the_model_alone(name, tmp_path, monkeypatch):
    monkeypatch.setenv(L.CACHE_ENV, str(tmp_path))
    lm = tiny_lm(name)
    prune_block(lm.adapter, lm.model, 1, [0], list(range(40)))  # a pruned layer: the grid still spans the config
    before = widths(lm.adapter, lm.model)
    ids = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        out = lm.model(input_ids=ids).logits
    cm = L.cost_model(lm, grid=(2, 3), repeats=1)
    assert not cm.cached and cm.signature["mode"] == ("decode" if name == "llama" else "forward")
    G, N = cm.signature["groups"], cm.signature["neurons"]
    assert cm.groups == [1, G] and cm.neurons[0] == 1 and cm.neurons[-1] == N
    raw, grid = np.asarray(cm.raw_ms), np.asarray(cm.block_ms)
    assert (raw > 0).all() and (grid >= raw).all() and cm.fixed_ms > 0
    assert (np.diff(grid, axis=0) >= 0).all() and (np.diff(grid, axis=1) >= 0).all()
    assert cm.block(cm.groups[-1], cm.neurons[1]) == pytest.approx(grid[-1, 1])
    assert cm.check["measured_ms"] > 0 and math.isfinite(cm.check["error"])
    files = list(tmp_path.glob("latency-*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["measured_at"] and stored["signature"] == cm.signature
    again = L.cost_model(lm, grid=(2, 3), repeats=1)
    assert again.cached and again.block_ms == cm.block_ms and again.fixed_ms == cm.fixed_ms
    assert widths(lm.adapter, lm.model) == before
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, out)


# --- allocation to a latency budget ------------------------------------------------------------

@pytest.mark.parametrize("layer,n_layers", [(MINILM, 6), (GQA, 30)])
@pytest.mark.parametrize("cost", [LinearCost(), FlatCost()], ids=["linear", "flat"])
@pytest.mark.parametrize("speedup", [1.3, 1.6, 2.2])
def test_latency_budget_meets_a_synthetic_target_within_one_unit(layer, n_layers, cost, speedup):
    imp, structure, scores = structure_and_scores(layer, n_layers)
    cfg = AllocationConfig(amplitude=0.1, budget="latency", speedup=speedup)
    alloc = L.allocate_latency(imp, structure, cfg, cost, scores=scores)
    check_plan(alloc, structure, cfg)
    dense = cost.predict([(layer["groups"], layer["n_neurons"])] * n_layers)
    goal = dense / speedup
    predicted = cost.predict([(p.keep_groups, p.keep_neurons) for p in alloc.layers])
    assert alloc.budget == "latency" and alloc.cost["predicted"] == pytest.approx(predicted)
    assert predicted <= goal + 1e-9
    assert goal - predicted < cost.per_neuron + 1e-9, (goal, predicted)  # within one unit's cost
    assert alloc.cost["predicted_speedup"] == pytest.approx(dense / predicted) and dense / predicted >= speedup


def test_latency_budget_keeps_the_adaptive_shape():
    imp, structure, _ = structure_and_scores(MINILM, 6, seed=3)
    cfg = AllocationConfig(amplitude=0.3, split="proportional", budget="latency", speedup=1.6)
    alloc = L.allocate_latency(imp, structure, cfg, LinearCost())
    most, least = int(np.argmax(imp)), int(np.argmin(imp))
    assert alloc.layers[most].params_after > alloc.layers[least].params_after
    assert 0 < alloc.target < cfg.max_sparsity  # the S_base bisection found


def test_latency_budget_reference_and_limits():
    imp, structure, scores = structure_and_scores(GQA, 4)
    cfg = AllocationConfig(budget="latency", speedup=1.0)
    whole = L.allocate_latency(imp, structure, cfg, LinearCost(), scores=scores)
    assert all(p.keep_groups == 3 and p.keep_neurons == 1536 for p in whole.layers)  # 1x: nothing to remove
    with pytest.raises(ExplorerError, match="cannot be met"):
        L.allocate_latency(imp, structure, replace_cfg(cfg, speedup=50.0), LinearCost(), scores=scores)
    # a reference from elsewhere (the run's dense model) sets the goal, not the current widths
    cost = LinearCost()
    ref = 2 * cost.predict([(3, 1536)] * 4)
    alloc = L.allocate_latency(imp, structure, replace_cfg(cfg, speedup=2.0), cost, scores=scores, reference_ms=ref)
    assert all(p.keep_groups == 3 and p.keep_neurons == 1536 for p in alloc.layers)


def replace_cfg(cfg, **kw):
    from dataclasses import replace
    return replace(cfg, **kw)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_latency_plan_prunes_a_tiny_model_to_its_prediction(name):
    lm = tiny_lm(name)
    data = tiny_data()
    imp = analyze(lm, data.texts["train"][:8], data.labels["train"][:8] if name == "bert" else None,
                  AnalysisConfig(samples=8, batch_size=4))
    cost = LinearCost(base=0.5, per_group=1.0, per_neuron=0.02, fixed=1.0)
    cfg = AllocationConfig(amplitude=0.2, budget="latency", speedup=1.5)
    alloc = L.allocate_latency(imp.normalized_by(cfg.normalization), imp.params, cfg, cost, scores=imp.unit_scores())
    apply_allocation(lm, imp, alloc)
    predicted = cost.predict(widths(lm.adapter, lm.model))
    assert predicted == pytest.approx(alloc.cost["predicted"]) and predicted <= alloc.cost["goal"] + 1e-9


# --- the FLOPs budget ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("target", [0.25, 0.5])
def test_flops_budget_removes_the_requested_fraction(name, target):
    lm = tiny_lm(name)
    dense = ev_mod.flops_per_token(lm)
    fm = L.FlopsModel.from_model(lm)
    assert fm.predict(widths(lm.adapter, lm.model)) == dense  # counts as evaluate.flops_per_token does
    data = tiny_data()
    imp = analyze(lm, data.texts["train"][:8], data.labels["train"][:8] if name == "bert" else None,
                  AnalysisConfig(samples=8, batch_size=4))
    cfg = AllocationConfig(target=target, amplitude=0.2, budget="flops")
    alloc = L.allocate_flops(imp.normalized_by(cfg.normalization), imp.params, cfg, fm, scores=imp.unit_scores())
    apply_allocation(lm, imp, alloc)
    removed = 1 - ev_mod.flops_per_token(lm) / dense
    assert removed >= target - 1e-9
    assert removed - target < max(fm.group_flops, fm.neuron_flops) / dense  # within one unit
    assert alloc.cost["removed_fraction"] == pytest.approx(removed)


def test_flops_model_from_structure_matches_the_ui_count():
    fm = L.FlopsModel.from_structure(MINILM, head_dim=32, seq_len=128)
    full = fm.block(12, 1536)
    assert full == 2 * MINILM["block_params"] + 4 * 128 * 12 * 32  # as ui.views.plan_flops


# --- the same-width limit -------------------------------------------------------------------

def test_even_split_is_divmod():
    assert ev_mod.even_split(78, 30) == [3] * 18 + [2] * 12
    assert ev_mod.even_split(9, 3) == [3, 3, 3]


@pytest.mark.parametrize("name,cuts", [("bert", [(1, 10), (4, 64), (2, 33)]), ("llama", [(1, 64), (3, 5), (2, 40)])])
def test_same_width_reference_has_exactly_the_pruned_totals(name, cuts):
    lm = tiny_lm(name)
    for i, (g, n) in enumerate(cuts):  # non-uniform: the mean width is not a whole number
        prune_block(lm.adapter, lm.model, i, list(range(g)), list(range(n)))
    ws = widths(lm.adapter, lm.model)
    ref = ev_mod.same_width_reference(lm)
    rs = widths(ref.adapter, ref.model)
    assert len(rs) == len(ws)
    assert sum(w["groups"] for w in rs) == sum(w["groups"] for w in ws)
    assert sum(w["neurons"] for w in rs) == sum(w["neurons"] for w in ws)
    for key in ("groups", "neurons"):
        assert max(w[key] for w in rs) - min(w[key] for w in rs) <= 1  # as even as integers allow
    assert ref.model.config.hidden_size == lm.model.config.hidden_size


def test_speedup_report_interleaves_and_flags_a_noisy_limit(monkeypatch):
    lm, dense = tiny_lm("bert"), tiny_lm("bert")
    prune_block(lm.adapter, lm.model, 0, [0, 1], list(range(20)))
    order = []
    clock = {"dense": 0.010, "pruned": 0.008, "reference": 0.007}

    def fake_forward(model, ids):
        name = "dense" if model is dense else "pruned" if model is lm else "reference"
        order.append(name)
        return clock[name]
    monkeypatch.setattr(ev_mod, "_forward_once", fake_forward)
    rep = ev_mod.speedup_report(dense, lm, batch_size=2, seq_len=8, repeats=3, warmup=1)
    assert order == ["dense", "pruned", "reference"] * 4  # warm-up, then interleaved repeats
    assert rep["speedup"] == pytest.approx(1.25) and rep["limit_speedup"] == pytest.approx(10 / 7)
    assert rep["fraction_of_limit"] == pytest.approx(7 / 8)
    assert rep["fraction_of_limit_spread"] == pytest.approx([7 / 8] * 2)
    assert not rep["limit_is_noise"]
    assert sum(rep["same_width_groups"]) == 2 + 4 + 4 and sum(rep["same_width_neurons"]) == 20 + 64 + 64
    clock["reference"] = 0.011  # the limit slower than dense: noise, not a fraction
    rep = ev_mod.speedup_report(dense, lm, batch_size=2, seq_len=8, repeats=3)
    assert rep["limit_is_noise"] and rep["fraction_of_limit"] is None


# --- configuration ---------------------------------------------------------------------------

def test_budget_fields_validate():
    assert AllocationConfig().budget == "params" and AllocationConfig().speedup == 0
    with pytest.raises(ExplorerError, match="budget"):
        validate_allocation(AllocationConfig(budget="time"))
    with pytest.raises(ExplorerError, match="budget"):
        validate_config(AllocationConfig(budget="time"))
    with pytest.raises(ExplorerError, match="speed-up"):
        validate_allocation(AllocationConfig(budget="latency"))  # no --speedup
    with pytest.raises(ExplorerError):
        validate_allocation(AllocationConfig(speedup=-1.0))
    with pytest.raises(ExplorerError):
        validate_allocation(AllocationConfig(speedup=float("nan")))
    validate_allocation(AllocationConfig(budget="latency", speedup=1.6))
    validate_allocation(AllocationConfig(budget="flops", target=0.4))


def test_cli_prune_has_budget_flags():
    from explorer.cli import build_parser
    from explorer.config import from_args
    args = build_parser().parse_args(["prune", "--model", "m", "--json", "o.json", "--budget", "latency",
                                      "--speedup", "1.6"])
    cfg = from_args(AllocationConfig, args)
    assert cfg.budget == "latency" and cfg.speedup == 1.6
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--model", "m", "--json", "o.json", "--budget", "time"])


# --- pruning runs with a budget -----------------------------------------------------------------

def _run(budget: str, **alloc):
    lm = tiny_lm("bert")
    cost = LinearCost(base=0.5, per_group=1.0, per_neuron=0.02, fixed=1.0)
    run = PruningRun(lm, tiny_data(), AnalysisConfig(samples=8, batch_size=4),
                     AllocationConfig(amplitude=0.2, budget=budget, **alloc),
                     PruneConfig(stages=2, recovery="none", recovery_steps=0, eval_phases=False),
                     timing=False, cost_model=cost)
    return lm, run, cost


def test_latency_budget_run_reports_the_predicted_speedup():
    lm, run, cost = _run("latency", speedup=1.6)
    dense = cost.predict(widths(lm.adapter, lm.model))
    events = list(run.events())
    assert run.status == "done", run.error
    assert any(e["type"] == "cost_model" for e in events)
    s1, s2 = run.records
    assert s1.predicted_speedup >= 1.6 ** 0.5 - 1e-9 and s1.predicted_speedup < 1.6  # stage k of K: speedup ** (k/K)
    assert s2.predicted_speedup >= 1.6 - 1e-9
    assert s2.predicted_speedup == pytest.approx(dense / cost.predict(widths(lm.adapter, lm.model)))
    rep = run.report()
    assert rep["final"]["predicted_speedup"] == pytest.approx(s2.predicted_speedup)
    assert "measured_speedup" in rep["final"] and rep["budget"]["budget"] == "latency"
    json.dumps(rep, default=float)


def test_flops_budget_run_reaches_the_target():
    lm, run, _ = _run("flops", target=0.4)
    dense = ev_mod.flops_per_token(lm)
    run.run()
    assert run.status == "done", run.error
    removed = [1 - r.flops_per_token / dense for r in run.records]
    assert removed[0] >= 0.2 - 1e-9 and removed[0] < 0.4
    assert removed[1] >= 0.4 - 1e-9


def test_allocate_command_plans_a_flops_budget_from_an_analysis():
    from explorer.cli import _allocate_from_analysis
    from explorer.importance import Importance
    lm = tiny_lm("llama")
    data = tiny_data()
    imp = analyze(lm, data.texts["train"][:8], None, AnalysisConfig(samples=8, batch_size=4))
    analysis = {"summary": lm.summary(), **imp.to_json()}
    imp = Importance.from_json(json.loads(json.dumps(analysis)))
    alloc = _allocate_from_analysis(imp, analysis, AllocationConfig(target=0.3, budget="flops"), {})
    assert alloc.budget == "flops" and alloc.cost["removed_fraction"] >= 0.3 - 1e-9
    with pytest.raises(ExplorerError, match="prune"):
        _allocate_from_analysis(imp, analysis, AllocationConfig(budget="latency", speedup=1.5), {})
