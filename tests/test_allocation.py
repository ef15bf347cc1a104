"""Per-layer sparsity allocation (explorer.allocation) on synthetic structures: the
formula in each mode, the parameter budget, unit counts, manual overrides, rounding, and
input validation. Property tests use hypothesis."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explorer.allocation import allocate, layer_sparsities, validate
from explorer.config import AllocationConfig
from explorer.errors import ExplorerError
from explorer.importance import normalize

# all-MiniLM-L6-v2 layer: hidden 384, 12 heads of 32, FFN 1536.
MINILM = {"groups": 12, "n_neurons": 1536, "group_params": 4 * 384 * 32 + 3 * 32,
          "neuron_params": 2 * 384 + 1, "block_params": 1774464}
# SmolLM2-135M-like GQA layer: hidden 576, 9 query / 3 KV heads of 64, SwiGLU 1536.
GQA = {"groups": 3, "n_neurons": 1536, "group_params": 8 * 64 * 576, "neuron_params": 3 * 576,
       "block_params": 3 * 8 * 64 * 576 + 1536 * 3 * 576 + 2 * 576}
STRUCTURES = {"minilm": MINILM, "gqa": GQA}
MODES = ("exact", "reference", "uniform")

PROPS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

importances = st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=40).map(normalize)
targets = st.floats(0, 0.9)
amplitudes = st.floats(0, 1)
structures = st.sampled_from(sorted(STRUCTURES))
modes = st.sampled_from(MODES)


def fixed_params(l: dict) -> int:
    return l["block_params"] - l["groups"] * l["group_params"] - l["n_neurons"] * l["neuron_params"]


def test_structures_are_consistent():
    assert fixed_params(MINILM) == 2 * 384 + 4 * 384  # two output biases, two LayerNorms
    assert fixed_params(GQA) == 2 * 576  # two RMSNorms


def neuron_target(plan, l: dict) -> float:
    """Neurons that fill the layer's budget (1 - S_L)·P_L once its groups are chosen."""
    return ((1 - plan.sparsity) * l["block_params"] - fixed_params(l)
            - plan.keep_groups * l["group_params"]) / l["neuron_params"]


def reachable(alloc, structure) -> bool:
    """Every layer's budget can be met with 1..N neurons (no one-unit minimum / full-width clip)."""
    return all(1 <= neuron_target(p, l) <= l["n_neurons"] for p, l in zip(alloc.layers, structure))


def check_counts(alloc, structure, cfg):
    assert len(alloc.layers) == len(structure)
    for i, (p, l) in enumerate(zip(alloc.layers, structure)):
        assert p.index == i
        assert p.groups == l["groups"] and p.neurons == l["n_neurons"]
        assert 1 <= p.keep_groups <= l["groups"]
        assert 1 <= p.keep_neurons <= l["n_neurons"]
        assert isinstance(p.keep_groups, int) and isinstance(p.keep_neurons, int)
        after = (l["block_params"] - (l["groups"] - p.keep_groups) * l["group_params"]
                 - (l["n_neurons"] - p.keep_neurons) * l["neuron_params"])
        assert p.params_before == l["block_params"] and p.params_after == after
        assert 0 <= p.sparsity <= cfg.max_sparsity
    assert alloc.params_after <= alloc.params_before
    json.dumps(alloc.to_json())


def check_monotonic(alloc, manual=()):
    free = [p for p in alloc.layers if p.index not in manual]
    for a in free:
        for b in free:
            if a.importance > b.importance:
                assert a.sparsity <= b.sparsity + 1e-12, (a, b)


# --- the formula in each mode ----------------------------------------------------------------

@PROPS
@given(imp=importances, target=targets, amp=amplitudes, smax=st.floats(0.5, 0.99))
def test_reference_mode_is_the_clipped_formula(imp, target, amp, smax):
    target = min(target, smax)
    cfg = AllocationConfig(target=target, amplitude=amp, mode="reference", max_sparsity=smax)
    w = np.ones(len(imp))
    s, clipped = layer_sparsities(imp, w, cfg)
    raw = target - amp * np.asarray(imp)
    np.testing.assert_array_equal(s, np.clip(raw, 0, smax))
    assert np.all(clipped[(raw < 0) | (raw > smax)])
    assert not np.any(clipped[(raw > 0) & (raw < smax)])
    alloc = allocate(imp, [MINILM] * len(imp), cfg)
    assert [p.sparsity for p in alloc.layers] == [float(x) for x in s]
    assert [p.clipped for p in alloc.layers] == [bool(c) for c in clipped]
    assert alloc.clipped_layers == [i for i, c in enumerate(clipped) if c]


def test_reference_mode_examples():
    cfg = AllocationConfig(target=0.3, amplitude=0.5, mode="reference", max_sparsity=0.6)
    s, clipped = layer_sparsities([-1.0, -0.2, 0.0, 0.4, 1.0], [1] * 5, cfg)
    np.testing.assert_allclose(s, [0.6, 0.4, 0.3, 0.1, 0.0])
    assert clipped.tolist() == [True, False, False, False, True]


@PROPS
@given(imp=importances, target=targets, amp=amplitudes, name=structures)
def test_uniform_mode(imp, target, amp, name):
    cfg = AllocationConfig(target=target, amplitude=amp, mode="uniform")
    alloc = allocate(imp, [STRUCTURES[name]] * len(imp), cfg)
    assert all(p.sparsity == target for p in alloc.layers)
    assert not any(p.clipped for p in alloc.layers)
    check_counts(alloc, [STRUCTURES[name]] * len(imp), cfg)
    # same counts in every layer, whatever the importances
    assert len({(p.keep_groups, p.keep_neurons) for p in alloc.layers}) == 1


@PROPS
@given(imp=importances, target=targets, amp=amplitudes)
def test_exact_mode_sparsities_meet_the_budget(imp, target, amp):
    w = np.array([MINILM["block_params"]] * len(imp), float)
    w[::3] *= 2  # unequal layer sizes
    cfg = AllocationConfig(target=target, amplitude=amp, mode="exact")
    s, clipped = layer_sparsities(imp, w, cfg)
    assert (w * s).sum() == pytest.approx(target * w.sum(), rel=1e-9, abs=1e-6)
    assert np.all((s >= 0) & (s <= cfg.max_sparsity))
    # a common shift c of the reference formula: S_L + A·Î_L is the same wherever unclipped
    inner = s[(s > 1e-9) & (s < cfg.max_sparsity - 1e-9)]
    shifted = (s + amp * np.asarray(imp))[(s > 1e-9) & (s < cfg.max_sparsity - 1e-9)]
    if len(inner) > 1:
        assert np.ptp(shifted) < 1e-9
    # "clipped" means the shifted formula left [0, S_max] (strictly): such layers sit on a bound;
    # a layer exactly on a bound (e.g. target 0, A 0) is not flagged.
    assert not np.any(clipped & (s > 0) & (s < cfg.max_sparsity))
    c = np.median(shifted) - target if len(inner) else None
    if c is not None:
        formula = target - amp * np.asarray(imp) + c
        outside = (formula < -1e-9) | (formula > cfg.max_sparsity + 1e-9)
        assert np.all(clipped[outside])
    assert not np.any(clipped[(s > 1e-9) & (s < cfg.max_sparsity - 1e-9)])


@PROPS
@given(imp=importances, target=targets, amp=amplitudes, name=structures)
def test_exact_mode_meets_the_budget_within_one_neuron(imp, target, amp, name):
    structure = [STRUCTURES[name]] * len(imp)
    cfg = AllocationConfig(target=target, amplitude=amp, mode="exact")
    alloc = allocate(imp, structure, cfg)
    check_counts(alloc, structure, cfg)
    total = sum(l["block_params"] for l in structure)
    if reachable(alloc, structure):
        removed = alloc.params_before - alloc.params_after
        assert abs(removed - target * total) <= STRUCTURES[name]["neuron_params"]
    else:  # only the GQA layers at high sparsity: one group + one neuron exceed the budget
        assert name == "gqa" and max(p.sparsity for p in alloc.layers) > 0.9


@PROPS
@given(imp=importances, target=targets, amp=amplitudes, name=structures, mode=modes)
def test_each_layer_follows_its_sparsity_within_one_neuron(imp, target, amp, name, mode):
    structure = [STRUCTURES[name]] * len(imp)
    cfg = AllocationConfig(target=target, amplitude=amp, mode=mode)
    alloc = allocate(imp, structure, cfg)
    check_counts(alloc, structure, cfg)
    for p, l in zip(alloc.layers, structure):
        if 1 <= neuron_target(p, l) <= l["n_neurons"]:
            assert abs(p.params_after - (1 - p.sparsity) * p.params_before) <= l["neuron_params"]
        # the groups follow S_L as closely as whole groups can
        assert abs(p.keep_groups - (1 - p.sparsity) * l["groups"]) <= 0.5 or p.keep_groups == 1


@PROPS
@given(imp=importances, target=targets, amp=amplitudes, name=structures, mode=modes)
def test_more_important_layers_are_never_pruned_more(imp, target, amp, name, mode):
    structure = [STRUCTURES[name]] * len(imp)
    alloc = allocate(imp, structure, AllocationConfig(target=target, amplitude=amp, mode=mode))
    check_monotonic(alloc)


def test_direction_example():
    """The least important layer (Î = -1) gets the most sparsity and loses the most."""
    imp = normalize([0.9, 0.2, 0.5, 0.1, 0.7, 0.4])
    alloc = allocate(imp, [MINILM] * 6, AllocationConfig(target=0.4, amplitude=0.1))
    s = [p.sparsity for p in alloc.layers]
    assert int(np.argmax(s)) == 3 and int(np.argmin(s)) == 0
    after = [p.params_after for p in alloc.layers]
    assert int(np.argmin(after)) == 3 and int(np.argmax(after)) == 0
    assert s[3] - s[0] == pytest.approx(0.1 * (imp[0] - imp[3]))
    assert alloc.removed_fraction == pytest.approx(0.4, abs=MINILM["neuron_params"] / alloc.params_before)


def test_zero_target_keeps_everything():
    for mode in MODES:
        # reference mode does not keep the budget: with A > 0 the least important layer
        # gets S_L = A > 0 even at target 0, so it is checked with A = 0
        amp = 0.0 if mode == "reference" else 0.05
        for name, l in STRUCTURES.items():
            alloc = allocate(normalize([1, 2, 3]), [l] * 3, AllocationConfig(target=0.0, amplitude=amp, mode=mode))
            assert alloc.params_after == alloc.params_before, (mode, name)
            assert all(p.keep_groups == l["groups"] and p.keep_neurons == l["n_neurons"] for p in alloc.layers)


# --- manual overrides ------------------------------------------------------------------------

def test_manual_overrides_example():
    imp = normalize([0.1, -0.5, 0.3, 0.9, -1.0, 0.2])
    manual = {0: 0.6, 3: 0.05}
    cfg = AllocationConfig(target=0.3, amplitude=0.05, mode="exact")
    alloc = allocate(imp, [MINILM] * 6, cfg, manual=manual)
    for i, v in manual.items():
        p = alloc.layers[i]
        assert p.sparsity == v and p.manual and not p.clipped
        assert abs(p.params_after - (1 - v) * p.params_before) <= MINILM["neuron_params"]
    assert [p.manual for p in alloc.layers] == [True, False, False, True, False, False]
    removed = alloc.params_before - alloc.params_after
    assert abs(removed - 0.3 * alloc.params_before) <= MINILM["neuron_params"]
    free = [p.sparsity for p in alloc.layers if not p.manual]
    plain = allocate(imp, [MINILM] * 6, cfg)
    # the other layers adjust (here they remove less than without the overrides)
    assert sum(free) < sum(p.sparsity for p in plain.layers if p.index not in manual)
    assert free != [p.sparsity for p in plain.layers if p.index not in manual]
    check_monotonic(alloc, manual)


@PROPS
@given(imp=st.lists(st.floats(-1, 1, allow_nan=False), min_size=2, max_size=12).map(normalize),
       target=targets, amp=amplitudes, name=structures,
       manual_raw=st.dictionaries(st.integers(0, 11), st.floats(0, 0.9), max_size=4))
def test_manual_overrides_are_kept_and_budget_met(imp, target, amp, name, manual_raw):
    n = len(imp)
    manual = {k: v for k, v in manual_raw.items() if k < n}
    if len(manual) == n:
        manual.pop(next(iter(manual)))
    structure = [STRUCTURES[name]] * n
    cfg = AllocationConfig(target=target, amplitude=amp, mode="exact")
    alloc = allocate(imp, structure, cfg, manual=manual)
    check_counts(alloc, structure, cfg)
    check_monotonic(alloc, manual)
    for p in alloc.layers:
        assert p.manual == (p.index in manual)
        if p.manual:
            assert p.sparsity == manual[p.index] and not p.clipped
    P = STRUCTURES[name]["block_params"]
    goal = target * n * P - sum(manual.values()) * P  # what the free layers must remove
    s = np.array([p.sparsity for p in alloc.layers])
    free = np.array([i not in manual for i in range(n)])
    if 0 <= goal <= cfg.max_sparsity * free.sum() * P:
        assert (s * P).sum() == pytest.approx(target * n * P, rel=1e-9, abs=1e-3)
        if reachable(alloc, structure):
            # within one neuron per manual layer, plus one: a manual layer's rounding is not
            # always made up by the free layers (see test_manual_budget_within_one_neuron)
            removed = alloc.params_before - alloc.params_after
            assert abs(removed - target * n * P) <= (1 + len(manual)) * STRUCTURES[name]["neuron_params"]
    elif goal < 0:  # the manual layers alone remove more than the target: free layers prune nothing
        assert np.all(s[free] == 0)
    else:
        assert np.all(s[free] == pytest.approx(cfg.max_sparsity))


def test_manual_budget_within_one_neuron():
    imp = normalize([0.0] * 10 + [-1.0, -1.0])
    manual = {0: 0.5, 1: 0.6422057128418337, 2: 0.814217759374083, 3: 0.5573960889321853}
    alloc = allocate(imp, [GQA] * 12, AllocationConfig(target=0.34375, amplitude=1.0, mode="exact"), manual=manual)
    assert reachable(alloc, [GQA] * 12)
    removed = alloc.params_before - alloc.params_after
    assert abs(removed - 0.34375 * alloc.params_before) <= GQA["neuron_params"]  # actual: 2736 = 1.58 neurons


def test_manual_in_reference_and_uniform_modes():
    imp = normalize([0.1, -0.5, 0.3])
    for mode in ("reference", "uniform"):
        alloc = allocate(imp, [MINILM] * 3, AllocationConfig(target=0.3, amplitude=0.1, mode=mode), manual={1: 0.7})
        assert alloc.layers[1].sparsity == 0.7 and alloc.layers[1].manual
        plain = allocate(imp, [MINILM] * 3, AllocationConfig(target=0.3, amplitude=0.1, mode=mode))
        for i in (0, 2):  # no redistribution outside exact mode
            assert alloc.layers[i].sparsity == plain.layers[i].sparsity


# --- rounding, attention / MLP only ----------------------------------------------------------

@PROPS
@given(imp=importances, target=targets, amp=amplitudes, name=structures, mode=modes)
def test_round_to_8(imp, target, amp, name, mode):
    structure = [STRUCTURES[name]] * len(imp)
    cfg = AllocationConfig(target=target, amplitude=amp, mode=mode, round_to=8)
    alloc = allocate(imp, structure, cfg)
    check_counts(alloc, structure, cfg)
    for p, l in zip(alloc.layers, structure):
        if neuron_target(p, l) >= 8:  # below one block of 8 see test_round_to_8_minimum_is_a_block
            assert p.keep_neurons % 8 == 0 or p.keep_neurons == l["n_neurons"], p
            if neuron_target(p, l) <= l["n_neurons"]:
                assert abs(p.params_after - (1 - p.sparsity) * p.params_before) <= 8 * l["neuron_params"]
    if mode == "exact" and reachable(alloc, structure) and all(neuron_target(p, l) >= 8 for p, l in zip(alloc.layers, structure)):
        removed = alloc.params_before - alloc.params_after
        assert abs(removed - target * alloc.params_before) <= 8 * STRUCTURES[name]["neuron_params"]


def test_round_to_8_minimum_is_a_block():
    alloc = allocate([-1.0, 1.0], [GQA] * 2,
                     AllocationConfig(target=0.9, amplitude=0.5, mode="reference", round_to=8))
    assert alloc.layers[0].sparsity == 0.95
    assert alloc.layers[0].keep_neurons == 8  # actual: 1


def test_round_to_keeps_full_width_at_zero_sparsity():
    odd = dict(MINILM, n_neurons=100, block_params=MINILM["block_params"] - 1436 * MINILM["neuron_params"])
    for mode in MODES:
        alloc = allocate([0.0, 0.0], [odd] * 2, AllocationConfig(target=0.0, amplitude=0.0, mode=mode, round_to=8))
        assert [p.keep_neurons for p in alloc.layers] == [100, 100], mode


@PROPS
@given(imp=importances, target=targets, amp=amplitudes, name=structures, mode=modes)
def test_attention_only_and_mlp_only(imp, target, amp, name, mode):
    structure = [STRUCTURES[name]] * len(imp)
    cfg = AllocationConfig(target=target, amplitude=amp, mode=mode, prune_mlp=False)
    alloc = allocate(imp, structure, cfg)
    check_counts(alloc, structure, cfg)
    assert all(p.keep_neurons == p.neurons for p in alloc.layers)
    check_monotonic(alloc)
    cfg = AllocationConfig(target=target, amplitude=amp, mode=mode, prune_attention=False)
    alloc = allocate(imp, structure, cfg)
    check_counts(alloc, structure, cfg)
    assert all(p.keep_groups == p.groups for p in alloc.layers)
    check_monotonic(alloc)
    for p, l in zip(alloc.layers, structure):
        if 1 <= neuron_target(p, l) <= l["n_neurons"]:
            assert abs(p.params_after - (1 - p.sparsity) * p.params_before) <= l["neuron_params"]


def test_attention_only_follows_the_budget_in_whole_groups():
    alloc = allocate(normalize([0, 1, 2, 3]), [MINILM] * 4,
                     AllocationConfig(target=0.2, amplitude=0.05, mode="reference", prune_mlp=False))
    for p in alloc.layers:
        # the layer's budget is met to within half a group (attention is a third of the block)
        assert abs(p.params_after - (1 - p.sparsity) * p.params_before) <= MINILM["group_params"] / 2
        assert p.keep_groups < 12


# --- invalid input ----------------------------------------------------------------------------

@pytest.mark.parametrize("kw, shown", [
    ({"target": -0.1}, "-0.1"), ({"target": 1.0}, "1.0"), ({"target": float("nan")}, "nan"),
    ({"target": 0.97}, "0.97"),  # above S_max 0.95
    ({"amplitude": -1.0}, "-1.0"), ({"amplitude": 5.0}, "5.0"), ({"amplitude": float("inf")}, "inf"),
    ({"amplitude": float("nan")}, "nan"),
    ({"mode": "greedy"}, "greedy"), ({"max_sparsity": 1.0}, "1.0"), ({"max_sparsity": 0.0}, "0.0"),
    ({"round_to": 0}, "0"),
])
def test_invalid_config_raises(kw, shown):
    cfg = AllocationConfig(**kw)
    with pytest.raises(ExplorerError) as e:
        allocate([0.0, 0.0], [MINILM] * 2, cfg)
    assert shown in str(e.value)
    with pytest.raises(ExplorerError):
        validate(cfg)


def test_nothing_to_prune_raises():
    with pytest.raises(ExplorerError, match="nothing to prune"):
        allocate([0.0], [MINILM], AllocationConfig(prune_attention=False, prune_mlp=False))


@pytest.mark.parametrize("manual, shown", [
    ({0: 1.5}, "1.5"), ({1: -0.2}, "-0.2"), ({0: float("nan")}, "nan"), ({0: 1.0}, "1.0"),
    ({6: 0.3}, "layer 6"), ({-1: 0.3}, "layer -1"),
])
def test_invalid_manual_raises(manual, shown):
    with pytest.raises(ExplorerError) as e:
        allocate(normalize(range(6)), [MINILM] * 6, AllocationConfig(), manual=manual)
    assert shown in str(e.value)
    with pytest.raises(ExplorerError) as e:
        layer_sparsities(normalize(range(6)), [1] * 6, AllocationConfig(), manual)
    assert shown in str(e.value)


def test_layer_count_mismatch_raises():
    with pytest.raises(ExplorerError, match="number of layers"):
        allocate([0.0, 0.0, 0.0], [MINILM] * 2, AllocationConfig())


def test_to_json():
    alloc = allocate(normalize([0.3, 0.1, 0.7]), [GQA] * 3, AllocationConfig(target=0.25))
    d = json.loads(json.dumps(alloc.to_json()))
    assert d["target"] == 0.25 and d["mode"] == "exact" and len(d["layers"]) == 3
    assert d["params_before"] == 3 * GQA["block_params"]
    assert d["removed_fraction"] == pytest.approx(alloc.removed_fraction)
    for l, p in zip(d["layers"], alloc.layers):
        assert l["keep_groups"] == p.keep_groups and l["keep_neurons"] == p.keep_neurons
        assert math.isclose(l["actual_sparsity"], p.actual_sparsity)


# --- the attention / FFN split inside a layer ---------------------------------------------------

def scores_for(structure, group_score: float, rng=None):
    """Per layer (group scores, neuron scores): neurons ~U(0, 1) per parameter, groups scaled so
    one group's salience per parameter is `group_score` times a neuron's mean."""
    rng = rng or np.random.default_rng(0)
    out = []
    for l in structure:
        n = rng.uniform(0, 1, l["n_neurons"]) * l["neuron_params"]
        g = rng.uniform(0.9, 1.1, l["groups"]) * group_score * 0.5 * l["group_params"]
        out.append((g, n))
    return out


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_salience_split_cuts_attention_only_where_it_is_cheap(name):
    imp = normalize([0.1, 0.5, 0.2, 0.9])
    structure = [STRUCTURES[name]] * 4
    cfg = AllocationConfig(target=0.4, amplitude=0.1)
    assert cfg.split == "salience"
    proportional = allocate(imp, structure, cfg)  # no scores: proportional, and it says so
    assert proportional.split == "proportional"
    precious = allocate(imp, structure, cfg, scores=scores_for(structure, 100.0))
    cheap = allocate(imp, structure, cfg, scores=scores_for(structure, 1e-3))
    assert precious.split == cheap.split == "salience"
    assert all(p.keep_groups == p.groups for p in precious.layers)  # attention is worth far more: FFN only
    assert all(c.keep_groups < p.keep_groups for c, p in zip(cheap.layers, proportional.layers))
    for alloc in (precious, cheap):  # the budget does not depend on the split
        check_counts(alloc, structure, cfg)
        removed = alloc.params_before - alloc.params_after
        assert abs(removed - 0.4 * alloc.params_before) <= structure[0]["neuron_params"]
        assert [p.sparsity for p in alloc.layers] == [p.sparsity for p in proportional.layers]


def test_salience_split_minimises_the_removed_salience():
    """Brute force over every number of groups removed, on one small layer."""
    layer = {"groups": 4, "n_neurons": 40, "group_params": 50, "neuron_params": 10, "block_params": 600}
    rng = np.random.default_rng(3)
    for _ in range(50):
        g, n = rng.uniform(0, 60, 4), rng.uniform(0, 10, 40)
        sl = float(rng.uniform(0.05, 0.6))
        alloc = allocate([0.0], [layer], AllocationConfig(target=sl, amplitude=0.0, mode="reference"), scores=[(g, n)])
        best = min((np.sort(g)[:k].sum() + np.sort(n)[:math.ceil(max(0, sl * 600 - 50 * k) / 10 - 1e-9)].sum(), 4 - k)
                   for k in range(4) if math.ceil(max(0, sl * 600 - 50 * k) / 10 - 1e-9) <= 39)
        assert alloc.layers[0].keep_groups == best[1]


@PROPS
@given(imp=importances, target=targets, amp=amplitudes, name=structures, mode=modes,
       group_score=st.floats(1e-4, 1e4), seed=st.integers(0, 2**16))
def test_salience_split_keeps_every_invariant(imp, target, amp, name, mode, group_score, seed):
    structure = [STRUCTURES[name]] * len(imp)
    cfg = AllocationConfig(target=target, amplitude=amp, mode=mode)
    alloc = allocate(imp, structure, cfg, scores=scores_for(structure, group_score, np.random.default_rng(seed)))
    check_counts(alloc, structure, cfg)
    if mode == "exact" and reachable(alloc, structure):
        assert abs(alloc.params_before - alloc.params_after - target * alloc.params_before) <= structure[0]["neuron_params"]


def test_scores_must_fit_the_layers():
    with pytest.raises(ExplorerError, match="unit scores and model structure disagree"):
        allocate([0.0, 0.0], [MINILM] * 2, AllocationConfig(), scores=scores_for([MINILM], 1.0))
    with pytest.raises(ExplorerError, match="unknown split 'half'"):
        allocate([0.0], [MINILM], AllocationConfig(split="half"))
