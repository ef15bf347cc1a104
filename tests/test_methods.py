"""Pruning methods: every method end to end on tiny models, and each one's defining property."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import stop_in_stage_2, tiny_data, tiny_lm
from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
from explorer.methods import METHODS, make_run
from explorer.methods.adapruner import tpe_search
from explorer.methods.apt import cubic_schedule, ema_update, ramp_masks, select_by_density
from explorer.methods.base import block_linear_weights, val_objective
from explorer.methods.fusion import fusion_weight
from explorer.methods.layer_drop import blocks_to_drop
from explorer.methods.lottery import LotteryRun
from explorer.methods.unstructured import lowest_mask, nm_mask
from explorer.surgery import widths


def _make(method, name="llama", stages=2, recovery="full", steps=2, target=0.4, amplitude=0.2, **options):
    lm = tiny_lm(name)
    run = make_run(method, lm, tiny_data(), AnalysisConfig(samples=8, batch_size=4),
                   AllocationConfig(target=target, amplitude=amplitude),
                   PruneConfig(stages=stages, recovery=recovery, recovery_steps=steps, train_batch_size=4,
                               eval_samples=16), timing=False, **options)
    return lm, run


def _out(lm, texts=("w5 w6 w7 w8", "w9 w10 w11")):
    with torch.no_grad():
        return lm.model(**{k: v for k, v in lm.encode(list(texts)).items() if k != "labels"}).logits


NEW = ["apt", "adapruner", "fusion", "magnitude", "wanda", "lottery", "layer-drop", "distill-baseline",
       "lora-before", "lora-after"]
CASES = [(m, n) for m in NEW for n in ("bert", "llama")] + [(m, "gpt2") for m in ("apt", "wanda", "lottery")]


def test_every_method_is_registered():
    assert set(NEW) <= set(METHODS)


@pytest.mark.parametrize("method,name", CASES)
def test_method_runs_end_to_end(method, name):
    opts = {"trials": 3, "subsets": 2} if method == "adapruner" else {}
    lm, run = _make(method, name, **opts)
    dense_params = lm.n_params
    events = list(run.events())
    types = [e["type"] for e in events]
    assert run.status == "done", events[-1]
    assert types[0] == "dense" and types[-1] == "done"
    assert "stage" in types and run.records
    assert all(e["record"] is r for e, r in zip([e for e in events if e["type"] == "stage"], run.records))
    rep = run.report()
    json.dumps(rep, allow_nan=False)
    assert rep["method"] == method and rep["final"]["params"] < dense_params
    assert torch.isfinite(_out(lm)).all()
    assert not any("lora" in n for n, _ in lm.model.named_parameters())
    if method == "adapruner":
        assert types.count("trial") == 3
    if method == "lottery":
        assert types.count("round") == 2


# --- APT ----------------------------------------------------------------------------------

def test_cubic_schedule():
    assert cubic_schedule(0, 10, 0.6) == 1.0
    assert cubic_schedule(10, 10, 0.6) == pytest.approx(0.6)
    assert cubic_schedule(5, 10, 0.6) == pytest.approx(0.6 + 0.4 / 8)  # (1 - 1/2)^3 = 1/8
    values = [cubic_schedule(t, 10, 0.3) for t in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert cubic_schedule(12, 10, 0.3) == pytest.approx(0.3)  # clipped after T


def test_density_ranks_fewer_params_higher_and_binary_search_meets_budget():
    keep, _ = select_by_density([4.0, 4.0], [10, 5], budget=5)
    assert keep.tolist() == [False, True]  # same salience, fewer parameters: higher density
    rng = np.random.default_rng(0)
    sal, par = rng.random(200), rng.integers(1, 50, 200)
    forced = np.zeros(200, bool)
    forced[[3, 77]] = True
    for budget in (0, 100, 1234.5, 3000, 10**6):
        keep, thr = select_by_density(sal, par, budget, forced)
        assert keep[forced].all()
        kept = par[keep].sum()
        assert kept <= max(budget, par[forced].sum())
        density = sal / par
        rest = np.flatnonzero(~keep)
        if len(rest):  # no unit left out would have fitted (the prefix's gap is filled)
            assert kept + par[rest].min() > budget
            # units ranked above the threshold are left out only as the exchange's payment: smaller
            # than a kept unit ranked below it
            above = rest[density[rest] > thr + 1e-12]
            below = np.flatnonzero(keep & ~forced & (density <= thr + 1e-12))
            assert not len(above) or (len(below) and par[above].max() < par[below].max())


def test_the_gap_a_big_unit_leaves_is_filled_with_later_smaller_units():
    """APT's 30 % overshoot: the prefix stopped at an attention head that did not fit, leaving up
    to a head's parameters unspent; the later (smaller) units that fit now fill it."""
    # densities 3, 2, 1, 0.5: the prefix keeps unit 0 (4), unit 1 (10) does not fit in 8
    keep, thr = select_by_density([12.0, 20.0, 2.0, 1.0], [4, 10, 2, 2], budget=8)
    assert keep.tolist() == [True, False, True, True]  # 4 + 2 + 2 = 8: the budget exactly
    assert thr == 3.0  # the threshold stays the prefix's (the ranking's cut point)
    keep, _ = select_by_density([12.0, 20.0, 2.0, 1.0], [4, 10, 2, 3], budget=8)
    assert keep.tolist() == [True, False, True, False]  # unit 3 (3) no longer fits in the 2 left


def test_a_gap_no_later_unit_can_fill_is_closed_by_an_exchange():
    """Every small unit ranks above the big ones (all kept by the prefix), so no later unit fits the
    gap: the next big unit is kept and paid for with the lowest-ranked small kept units."""
    sal = [10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0]  # small units 0-4 (density 10..6 each), then heads 5, 6
    par = [1, 1, 1, 1, 1, 10, 10]
    keep, thr = select_by_density(sal, par, budget=12)  # prefix: 5 small (5), head 5 does not fit (15)
    assert keep.tolist() == [True, True, False, False, False, True, False]  # 2 + 10 = 12: the budget
    assert thr == 6.0  # the prefix's threshold
    keep, _ = select_by_density(sal, par, budget=5)  # no gap: nothing exchanged
    assert keep.tolist() == [True] * 5 + [False, False]
    keep, _ = select_by_density(sal, par, budget=8)  # keeping a head would not fit even without the small ones
    assert keep.tolist() == [True] * 5 + [False, False]


def test_apt_masks_ramp_to_their_targets_within_the_run():
    m = torch.tensor([1.0, 0.5, 0.0, 1.0])
    keep = torch.tensor([False, True, False, True])
    ramp_masks(m, keep, 2)
    torch.testing.assert_close(m, torch.tensor([0.5, 0.75, 0.0, 1.0]))
    ramp_masks(m, keep, 1)
    assert m.tolist() == [0.0, 1.0, 0.0, 1.0]
    lm, run = _make("apt", "llama", stages=2, steps=3)
    for ev in run.events():
        if ev["type"] == "stage" and ev["record"].stage == 1:
            assert any((~t).any() for t in run.targets.values())
            for key, mask in run.masks.items():  # 3 of the 4 schedule steps (T_p = round(0.7 x 6)) done
                t = run.targets[key]
                # on their way: every unit outside the target below 1, every mask in [0, 1]; with the update
                # frequency scaled to the run (f = 1 here, decay 1/f per step: apt.schedule_for) a mask pruned
                # at one update is at 0 by the next, so zeros before T_p are expected
                assert (mask[~t] < 1).all() and ((mask >= 0) & (mask <= 1)).all()
                assert (mask[t] == 1).all()  # the kept units untouched
            assert ev["record"].extra["optimizer_steps"] == 3
    # the cut meets the final budget: at least the target removed, within one attention unit
    assert run.status == "done" and 0.4 <= run.records[-1].removed_fraction < 0.4 + 0.05


def test_salience_ema_momentum(monkeypatch):
    assert ema_update(None, [1.0, 2.0]).tolist() == [1.0, 2.0]
    np.testing.assert_allclose(ema_update(np.array([1.0, 2.0]), [3.0, 0.0]), [1.2, 1.8])
    np.testing.assert_allclose(ema_update(np.array([1.0, 2.0]), [3.0, 0.0], momentum=0.5), [2.0, 1.0])
    # the run's EMA uses the momentum it is given (not the default 0.9): s = m*s + (1-m)*s_new, every update
    from explorer.methods.apt import APTRun
    fresh, ema = [], []
    real_fresh, real_update = APTRun._fresh_salience, APTRun._update_salience

    def spy_fresh(self):
        fresh.append(real_fresh(self))
        return fresh[-1]

    def spy_update(self):
        real_update(self)
        ema.append({k: v.copy() for k, v in self.ema.items()})
    monkeypatch.setattr(APTRun, "_fresh_salience", spy_fresh)
    monkeypatch.setattr(APTRun, "_update_salience", spy_update)
    lm, run = _make("apt", "bert", stages=2, steps=2, salience_momentum=0.5)
    run.run()
    assert run.status == "done", run.error
    assert run.momentum == 0.5 and run.report()["summary"]["salience_momentum"] == 0.5
    assert len(ema) == len(fresh) >= 3
    for key in fresh[0]:
        np.testing.assert_allclose(ema[0][key], fresh[0][key])
        for i in range(1, len(fresh)):
            np.testing.assert_allclose(ema[i][key], 0.5 * ema[i - 1][key] + 0.5 * fresh[i][key])
    assert any(not np.allclose(ema[-1][k], fresh[-1][k]) for k in fresh[-1])  # the average is not the last estimate


def test_apt_keeps_a_unit_per_layer_and_ends_without_hooks():
    lm, run = _make("apt", "llama", stages=2, steps=1, target=0.9)
    run.run()
    assert run.status == "done"
    # 90 % is more than the tiny model can lose: only the protected head group and neuron stay
    assert [(w["groups"], w["neurons"]) for w in widths(lm.adapter, lm.model)] == [(1, 1)] * 3
    for b in lm.adapter.blocks(lm.model):
        assert not b.attn.out_module._forward_pre_hooks and not b.mlp.out_module._forward_pre_hooks


def test_apt_stop_restores_a_plain_model_with_masks_folded():
    lm, run = _make("apt", "gpt2", stages=2, steps=2)
    snapshot = None
    for ev in run.events():
        if ev["type"] == "stage":
            snapshot = _out(lm)  # the masked model of stage 1
        if ev["type"] == "step" and ev["stage"] == 2:
            run.stop()
    assert run.status == "stopped" and len(run.records) == 1
    for b in lm.adapter.blocks(lm.model):
        assert not b.attn.out_module._forward_pre_hooks and not b.mlp.out_module._forward_pre_hooks
    torch.testing.assert_close(_out(lm), snapshot)


# --- AdaPruner ----------------------------------------------------------------------------

def test_tpe_finds_better_than_first_trial_and_is_seeded():
    def objective(p):
        return (p["alpha1"] - 0.7) ** 2 + 0.05 * abs(p["subset"] - 3)
    space = {"subset": ("int", 0, 7), "alpha1": ("float", 0.0, 1.0)}
    runs = [list(tpe_search(objective, space, trials=20, seed=0)) for _ in range(2)]
    values = [e["value"] for e in runs[0]]
    assert values == [e["value"] for e in runs[1]]  # same seed, same trials
    assert min(values[1:]) < values[0]
    best = [e["best_value"] for e in runs[0]]
    assert best == sorted(best, reverse=True) and best[-1] == min(values)
    assert set(runs[0][-1]) >= {"trial", "value", "params", "best_value", "best_params"}


def test_adapruner_scores_on_val_never_test():
    lm = tiny_lm("bert")
    data = tiny_data()
    data.texts["test"], data.labels["test"] = [], []
    value, name = val_objective(lm, data, 8)
    assert name == "val_loss" and np.isfinite(value)
    lm, run = _make("adapruner", "bert", stages=1, trials=4, subsets=3, search_amplitude=True)
    trials = [e for e in run.events() if e["type"] == "trial"]
    assert [t["trial"] for t in trials] == [1, 2, 3, 4]
    assert {"subset", "alpha1", "alpha2", "amplitude"} <= set(trials[0]["params"])
    assert trials[-1]["best_value"] == min(t["value"] for t in trials)
    assert run.report()["summary"]["best_params"] == trials[-1]["best_params"]


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "llama"])
def test_zeroed_units_equal_a_cut_and_are_put_back(name):
    """A trial's cut without a copy: zeroing the removed units' output-projection channels gives the
    cut model's outputs exactly, and the weights come back bit-identical."""
    import copy as copy_
    from explorer.methods.base import zeroed_units
    from explorer.surgery import prune_block
    lm = tiny_lm(name)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    blocks = lm.adapter.blocks(lm.model)
    keeps = [([u for u in range(b.attn.n_units) if u % 2 == 0], list(range(0, b.mlp.n_units, 3))) for b in blocks]
    cut = copy_.deepcopy(lm)
    for i, (g, n) in enumerate(keeps):
        prune_block(cut.adapter, cut.model, i, g, n)
    with zeroed_units(lm, keeps) as masked:
        assert torch.allclose(_out(masked), _out(cut), atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_adapruner_search_copies_no_model(monkeypatch):
    """AdaPruner's trials score cuts on the model itself (zeroed channels), never on a clone."""
    import copy as copy_
    from torch import nn
    copies = {"n": 0}
    real = copy_.deepcopy

    def counting(obj, *a, **k):
        copies["n"] += isinstance(obj, nn.Module)
        return real(obj, *a, **k)
    lm, run = _make("adapruner", "llama", stages=1, recovery="none", steps=0, trials=3, subsets=2)
    monkeypatch.setattr(copy_, "deepcopy", counting)
    events = run.events()
    for ev in events:
        if ev["type"] == "trial" and ev["trial"] == 3:
            break
    else:  # the run ended (a failure: run() catches it) before its third trial: nothing was shown
        pytest.fail(f"the search never reached trial 3: {run.status} {run.error}")
    assert copies["n"] <= 1, f"{copies['n']} model copies during a 3-trial search"  # PruningRun's last-good copy
    events.close()


# --- fusion -------------------------------------------------------------------------------

def test_fusion_weight_is_inverse_variance():
    stable, noisy_a, noisy_b = [1.0, 2.0, 0.5], [1.0, 2.0, 0.5], [2.0, 0.5, 1.0]
    assert fusion_weight(stable, stable, noisy_a, noisy_b) == 1.0  # coarse agrees across halves
    assert fusion_weight(noisy_a, noisy_b, stable, stable) == 0.0
    assert fusion_weight(stable, stable, stable, stable) == 0.5
    w = fusion_weight([1, 2], [1.2, 1.8], [1, 2], [1.4, 1.6])  # fine twice as noisy (4x variance)
    assert w == pytest.approx(0.8)


def test_fusion_reports_weights_per_layer_and_kind():
    lm, run = _make("fusion", "llama", stages=1, steps=1)
    events = list(run.events())
    assert run.status == "done", run.error
    an = next(e for e in events if e["type"] == "analysis")
    assert an["importance"].metric == "fused"
    w = an["fusion"]["w_coarse"]
    assert len(w) == 3 and all(len(x) == 2 and all(0 <= v <= 1 for v in x) for x in w)


# --- magnitude / wanda --------------------------------------------------------------------

@pytest.mark.parametrize("method,name", [("magnitude", "llama"), ("wanda", "gpt2"), ("wanda", "bert")])
def test_unstructured_reaches_allocated_sparsity_and_masks_hold(method, name):
    lm, run = _make(method, name, stages=1, recovery="full", steps=3, target=0.5, amplitude=0.3)
    events = list(run.events())
    assert "note" in events[0] and "no faster" in run.report()["note"]
    rec = run.records[-1]
    allocated = rec.extra["allocated"]
    assert len(set(np.round(allocated, 6))) > 1, "expected non-uniform allocation"
    for got, want in zip(rec.sparsity, allocated):  # block-parameter sparsity per layer
        assert got == pytest.approx(want, abs=0.02)
    assert abs(rec.removed_fraction - 0.5) < 0.01
    for name_, w, _ in (x for block in block_linear_weights(lm) for x in block):
        assert (w[~run.masks[name_]] == 0).all()  # recovery did not regrow pruned weights
    zeros = sum(int((w == 0).sum()) for block in block_linear_weights(lm) for _, w, _ in block)
    assert rec.params == lm.n_params - zeros
    assert rec.extra["sparsity_reached"] == pytest.approx(
        zeros / sum(w.numel() for block in block_linear_weights(lm) for _, w, _ in block))


@pytest.mark.parametrize("method,name", [("magnitude", "llama"), ("wanda", "gpt2")])
def test_two_four_pattern(method, name):
    lm, run = _make(method, name, stages=1, recovery="lora", steps=2, pattern="2:4")
    run.run()
    assert run.status == "done"
    for block in block_linear_weights(lm):
        for _, w, in_dim in block:
            g = w.detach().movedim(in_dim, -1)
            g = g.reshape(*g.shape[:-1], -1, 4)
            assert ((g != 0).sum(-1) == 2).all()


def test_mask_helpers():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 9.0]])
    assert nm_mask(s, 2, 4, 1).tolist() == [[True, False, True, False, True, True]]
    assert lowest_mask(s, 0.5).sum() == 3
    assert lowest_mask(s, 0.5, per_row_dim=1).tolist() == [[True, False, True, False, False, True]]


# --- lottery ------------------------------------------------------------------------------

def test_lottery_rewinds_kept_weights_to_their_initial_values(monkeypatch):
    starts = []
    real = LotteryRun._train_masked

    def spy(self, k, cfg, losses, teacher):
        starts.append({n: p.detach().clone() for n, p in self.lm.model.named_parameters()})
        yield from real(self, k, cfg, losses, teacher)
    monkeypatch.setattr(LotteryRun, "_train_masked", spy)
    lm, run = _make("lottery", "llama", stages=3, steps=2, target=0.5)
    init = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    events = list(run.events())
    assert run.status == "done" and [e["round"] for e in events if e["type"] == "round"] == [1, 2, 3]
    assert len(starts) == 3
    for state in starts:  # after pruning and rewinding (rounds 2, 3: after a round of training)
        for n, v in state.items():
            if n in run.masks:
                kept = v != 0
                assert kept.float().mean() < 0.95
                assert torch.equal(v[kept], init[n][kept]), n
            else:
                assert torch.equal(v, init[n]), n
    sparsity = [e["sparsity"] for e in events if e["type"] == "round"]
    assert sparsity == sorted(sparsity) and sparsity[-1] > 0.4


def test_lottery_without_training_is_exactly_the_masked_initial_model():
    lm, run = _make("lottery", "gpt2", stages=2, recovery="none", target=0.5)
    init = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    run.run()
    assert run.status == "done", run.error  # run() catches a failure: without this the loop below proves nothing
    assert [r.extra["round"] for r in run.records] == [1, 2]
    reached = [r.extra["sparsity_reached"] for r in run.records]
    assert 0 < reached[0] < reached[1]
    assert run.masks and all((~keep).any() for keep in run.masks.values())  # every block matrix lost weights
    for n, p in lm.model.named_parameters():
        expected = init[n] * run.masks[n] if n in run.masks else init[n]
        assert torch.equal(p.detach(), expected)
    # untrained, every round ranks the initial weights again: the ticket keeps each matrix's largest |θ_0|
    for n, keep in run.masks.items():
        mag = init[n].abs()
        assert mag[~keep].max() <= mag[keep].min(), n


# --- layer drop, distillation, LoRA order --------------------------------------------------

def test_blocks_to_drop_lowest_first():
    assert blocks_to_drop([0.5, 0.1, 0.3, 0.2], [10] * 4, 0.5) == [1, 3]
    assert blocks_to_drop([0.5, 0.1, 0.3, 0.2], [10] * 4, 0.3) == [1]  # 1 block (0.25) is closest
    assert blocks_to_drop([0.1, 0.2], [10, 10], 0.9) == [0]  # never every block


def test_layer_drop_removes_the_lowest_cosine_blocks():
    from explorer.importance import analyze
    lm, run = _make("layer-drop", "llama", stages=1, steps=1, target=0.34)
    texts, _ = run.data.calibration(8, stage=1)
    imp = analyze(lm, texts, None, AnalysisConfig(samples=8, batch_size=4, metric="magnitude_l1"),
                  metrics=("magnitude_l1",))
    run.run()
    lowest = int(np.argmin(imp.layer_cos))
    assert run.summary["dropped"] == [lowest]
    assert len(lm.adapter.layers(lm.model)) == 2
    assert run.records[-1].removed_fraction == pytest.approx(1 / 3, abs=0.01)


def test_distill_baseline_is_uniform():
    lm, run = _make("distill-baseline", "llama", stages=2, steps=2)
    dense = widths(lm.adapter, lm.model)
    events = list(run.events())
    assert run.status == "done", run.error
    assert sum(e["type"] == "step" for e in events) == 4  # the whole recovery budget, in one go
    ws = widths(lm.adapter, lm.model)
    assert len({(w["groups"], w["neurons"]) for w in ws}) == 1  # (the dense model is uniform too:)
    assert ws[0]["neurons"] < dense[0]["neurons"] and 0.35 < run.records[-1].removed_fraction < 0.45  # it was cut


@pytest.mark.parametrize("method", ["lora-before", "lora-after"])
def test_lora_order_same_steps_and_both_numbers(method):
    lm, run = _make(method, "gpt2", stages=2, steps=2)
    events = list(run.events())
    assert run.status == "done", run.error
    assert sum(e["type"] == "step" for e in events) == 4
    pipe = run.report()["summary"]["pipeline"]
    middle = "dense_after_lora" if method == "lora-before" else "pruned_before_lora"
    assert {"dense", middle, "final"} <= set(pipe) and all(np.isfinite(pipe[k]) for k in ("dense", middle, "final"))


def test_stop_during_search_leaves_the_dense_model():
    lm, run = _make("adapruner", "llama", trials=5, subsets=2)
    before = _out(lm)
    for ev in run.events():
        if ev["type"] == "trial" and ev["trial"] == 2:
            run.stop()
    assert run.status == "stopped" and not run.records
    torch.testing.assert_close(_out(lm), before)


def test_stop_during_masked_recovery_keeps_the_last_stage():
    lm, run = _make("magnitude", "bert", stages=2, steps=3)
    snapshot = stop_in_stage_2(run, lambda: _out(lm))
    assert run.status == "stopped" and len(run.records) == 1
    torch.testing.assert_close(_out(lm), snapshot)
