"""Hand edits honoured everywhere: a per-layer plan with layers set by hand (the app's table, the CLI's
--manual / --plan) is what every method that takes per-layer widths prunes to; the methods that choose
their own widths refuse it before running; the report says which plan was used."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_data, tiny_lm
from explorer.allocation import Allocation, allocate
from explorer.cli import main
from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
from explorer.errors import ExplorerError
from explorer.methods import make_run
from explorer.methods.base import block_linear_weights, model_structure
from explorer.models import save_model

HAND = {0: 0.1, 2: 0.6}  # layers set by hand; layer 1 follows the allocation


def hand_plan(lm, manual=HAND, target=0.35) -> Allocation:
    """A plan as the app's table makes it: the allocation with some layers' levels set by hand."""
    structure = model_structure(lm)
    return allocate(np.zeros(len(structure)), structure, AllocationConfig(target=target, amplitude=0.0,
                                                                         split="proportional"), manual)


def run_with_plan(method, name="llama", stages=2, recovery="none", steps=1, **options):
    lm = tiny_lm(name)
    plan = hand_plan(lm)
    run = make_run(method, lm, tiny_data(), AnalysisConfig(samples=8, batch_size=4),
                   AllocationConfig(target=0.35, amplitude=0.2),
                   PruneConfig(stages=stages, recovery=recovery, recovery_steps=steps, train_batch_size=4,
                               eval_samples=16, speed_repeats=0, eval_phases=False),
                   timing=False, final_plan=plan, **options)
    events = list(run.events())
    assert run.status == "done", events[-1]
    return lm, plan, run


def planned_widths(plan):
    return [(lp.keep_groups, lp.keep_neurons) for lp in plan.layers]


def final_widths(run):
    return [(w["groups"], w["neurons"]) for w in run.records[-1].widths]


def test_the_hand_plan_is_not_what_the_allocation_would_give():
    lm = tiny_lm("llama")
    plan, free = hand_plan(lm), hand_plan(lm, {})
    assert [lp.index for lp in plan.layers if lp.manual] == sorted(HAND)
    assert len(set(planned_widths(plan))) == 3 and planned_widths(plan) != planned_widths(free)


@pytest.mark.parametrize("method,options", [
    ("fusion", {}),
    ("distill-baseline", {}),
    ("lora-before", {}),
    ("lora-after", {}),
    ("lora-prune-ft", {}),
    ("adapruner", {"trials": 2, "subsets": 2, "taylor_orders": "first"}),
])
def test_structured_methods_end_at_the_hand_widths(method, options):
    lm, plan, run = run_with_plan(method, stages=1 if method == "distill-baseline" else 2, **options)
    assert final_widths(run) == planned_widths(plan)
    if len(run.records) == 2:  # stage 1 moves half way: between dense and the table in every layer
        dense = [(lp.groups, lp.neurons) for lp in plan.layers]
        for (g, n), (g0, n0), (g1, n1) in zip([(w["groups"], w["neurons"]) for w in run.records[0].widths],
                                              dense, planned_widths(plan)):
            assert g1 <= g <= g0 and n1 <= n <= n0
        assert final_widths(run) != [(w["groups"], w["neurons"]) for w in run.records[0].widths]
    rep = run.report()
    json.dumps(rep, allow_nan=False)
    assert rep["plan"]["source"] == "table" and rep["plan"]["by_hand"] == sorted(HAND)
    assert [(w["groups"], w["neurons"]) for w in rep["plan"]["widths"]] == planned_widths(plan)
    assert "by hand" in rep["plan"]["description"]


def test_the_adaptive_run_reports_its_plan_too():
    lm, plan, run = run_with_plan("adaptive", stages=1)
    rep = run.report()
    assert final_widths(run) == planned_widths(plan)
    assert rep["plan"]["source"] == "table" and [p["neurons"] for p in rep["plan"]["planned"]] == \
        [lp.keep_neurons for lp in plan.layers]
    lm = tiny_lm("llama")
    free = make_run("adaptive", lm, tiny_data(), AnalysisConfig(samples=8, batch_size=4), AllocationConfig(target=0.3),
                    PruneConfig(stages=1, recovery="none", eval_samples=16, speed_repeats=0, eval_phases=False),
                    timing=False)
    free.run()
    assert free.report()["plan"]["source"] == "allocation" and free.report()["plan"]["by_hand"] == []


@pytest.mark.parametrize("method", ["magnitude", "wanda", "lottery"])
def test_masks_follow_the_hand_levels(method):
    lm, plan, run = run_with_plan(method, name="llama", stages=2)
    rec = run.records[-1]
    levels = [lp.sparsity for lp in plan.layers]
    assert rec.extra["allocated"] == pytest.approx(levels)
    for got, want in zip(rec.sparsity, levels):  # block-parameter sparsity reached per layer
        assert got == pytest.approx(want, abs=0.02)
    zeros = [sum(int((w == 0).sum()) for _, w, _ in block) for block in block_linear_weights(lm)]
    assert zeros[2] > 3 * zeros[0] > 0  # layer 2 at 0.6 by hand, layer 0 at 0.1
    assert run.report()["plan"]["by_hand"] == sorted(HAND)


@pytest.mark.parametrize("method", ["apt", "layer-drop"])
def test_methods_choosing_their_widths_refuse_the_table(method):
    lm = tiny_lm("llama")
    with pytest.raises(ExplorerError, match="table set by hand"):
        make_run(method, lm, tiny_data(), prune=PruneConfig(stages=1, recovery_steps=1), final_plan=hand_plan(lm))


@pytest.mark.parametrize("method,options,needle", [
    ("magnitude", {"pattern": "2:4"}, "pattern 2:4"),
    ("adapruner", {"search_amplitude": True}, "search_amplitude"),
])
def test_options_that_override_the_table_are_refused(method, options, needle):
    lm = tiny_lm("llama")
    with pytest.raises(ExplorerError, match=needle):
        make_run(method, lm, tiny_data(), final_plan=hand_plan(lm), **options)


def test_a_plan_for_another_model_is_refused():
    llama, bert = tiny_lm("llama"), tiny_lm("bert")
    with pytest.raises(ExplorerError, match="another model"):
        make_run("fusion", bert, tiny_data(), final_plan=hand_plan(llama))
    short = hand_plan(llama)
    short.layers = short.layers[:2]
    with pytest.raises(ExplorerError, match="2 layer"):
        make_run("wanda", llama, tiny_data(), final_plan=short)


# --- the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan-cli")
    data = tiny_data(120)
    txt = root / "data.txt"
    txt.write_text("\n\n".join(sum(data.texts.values(), [])))
    out = {"llama": str(save_model(tiny_lm("llama"), root / "llama")), "txt": str(txt), "root": root,
           "plan": root / "plan.json"}
    a = root / "a.json"  # analyze -> allocate: the plan file a user edits
    assert main(["analyze", "--model", out["llama"], "--data", out["txt"], "--samples", "8", "--batch-size", "4",
                 "--json", str(a)]) == 0
    assert main(["allocate", "--analysis", str(a), "--target", "0.35", "--amplitude", "0.2",
                 "--json", str(out["plan"])]) == 0
    return out


def _prune(d, *extra):
    return ["prune", "--model", d["llama"], "--data", d["txt"], "--stages", "1", "--recovery", "none",
            "--samples", "8", "--batch-size", "4", "--eval-samples", "64", "--speed-repeats", "0",
            "--no-eval-phases", *extra]


def _one_error_line(capsys, needle):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    return err[0]


def test_cli_prune_manual(cli_dirs, capsys):
    rep_path = cli_dirs["root"] / "manual.json"
    assert main(_prune(cli_dirs, "--target", "0.35", "--method", "fusion", "--manual", "0=0.1", "2=0.6",
                       "--json", str(rep_path))) == 0
    rep = json.loads(rep_path.read_text())
    plan = rep["plan"]
    assert plan["source"] == "table" and plan["by_hand"] == [0, 2]
    assert [p["sparsity"] for p in plan["planned"]][0::2] == [0.1, 0.6]
    assert [(w["groups"], w["neurons"]) for w in plan["widths"]] == [(p["groups"], p["neurons"]) for p in plan["planned"]]
    assert "by hand: 0, 2" in rep["label"]
    structure = model_structure(tiny_lm("llama"))  # the widths really remove about the hand levels
    for i, level in ((0, 0.1), (2, 0.6)):
        st, w = structure[i], plan["widths"][i]
        removed = (st["groups"] - w["groups"]) * st["group_params"] + (st["n_neurons"] - w["neurons"]) * st["neuron_params"]
        assert removed / st["block_params"] == pytest.approx(level, abs=0.03)


def test_cli_allocate_edit_prune_plan_round_trip(cli_dirs, capsys, tmp_path):
    fresh, b, rep_path = cli_dirs["plan"], tmp_path / "b.json", tmp_path / "plan-report.json"
    plan = json.loads(fresh.read_text())
    untouched = (plan["layers"][2]["keep_groups"], plan["layers"][2]["keep_neurons"])
    plan["layers"][0]["keep_neurons"] = 40  # a width edited by hand
    plan["layers"][1]["sparsity"] = 0.7  # a level edited by hand
    b.write_text(json.dumps(plan))
    assert main(_prune(cli_dirs, "--method", "distill-baseline", "--plan", str(b), "--json", str(rep_path))) == 0
    rep = json.loads(rep_path.read_text())
    widths = [(w["groups"], w["neurons"]) for w in rep["plan"]["widths"]]
    assert widths[0] == (plan["layers"][0]["keep_groups"], 40) and widths[2] == untouched
    assert rep["plan"]["by_hand"] == [0, 1] and rep["plan"]["planned"][1]["sparsity"] == 0.7
    st = model_structure(tiny_lm("llama"))[1]
    removed = (st["groups"] - widths[1][0]) * st["group_params"] + (st["n_neurons"] - widths[1][1]) * st["neuron_params"]
    assert removed / st["block_params"] == pytest.approx(0.7, abs=0.03)
    # unedited, the file prunes to exactly its widths (adaptive), nothing by hand
    assert main(_prune(cli_dirs, "--plan", str(fresh), "--json", str(rep_path))) == 0
    rep, want = json.loads(rep_path.read_text()), json.loads(fresh.read_text())["layers"]
    assert [(w["groups"], w["neurons"]) for w in rep["plan"]["widths"]] == \
        [(l["keep_groups"], l["keep_neurons"]) for l in want]
    assert rep["plan"]["by_hand"] == []


@pytest.mark.parametrize("edit,extra,needle", [
    (lambda p: p["layers"].pop(), (), "2 layer(s) but the model has 3"),
    (lambda p: p["layers"][1].update(sparsity=0.99), (), "outside [0, S_max = 0.95]"),
    (lambda p: p.update(layers="nope"), (), "not a plan"),
    (None, ("--manual", "1=0.5", "--budget", "flops"), "--budget flops"),
    (None, ("--manual", "1=0.97"), "outside [0, S_max"),
    (None, ("--method", "apt", "--manual", "1=0.5"), "table set by hand"),
])
def test_cli_bad_plans_are_one_line_and_exit_2(cli_dirs, capsys, tmp_path, edit, extra, needle):
    args = list(extra)
    if edit is not None:
        plan, b = json.loads(cli_dirs["plan"].read_text()), tmp_path / "b.json"
        edit(plan)
        b.write_text(json.dumps(plan))
        args += ["--plan", str(b)]
    capsys.readouterr()
    assert main(_prune(cli_dirs, *args, "--json", str(tmp_path / "r.json"))) == 2
    _one_error_line(capsys, needle)


def test_cli_plan_with_manual_reallocates_only_those_layers(cli_dirs):
    import argparse

    from explorer.cli import _hand_plan, _read_hand_plan
    cfg, lm = AllocationConfig(), tiny_lm("llama")
    hand = _read_hand_plan(argparse.Namespace(plan=str(cli_dirs["plan"]), manual=["2=0.6"]), cfg, PruneConfig())
    plan, cfg2, what = _hand_plan(lm, None, AnalysisConfig(), cfg, hand)
    rows = json.loads(cli_dirs["plan"].read_text())["layers"]
    assert [(lp.keep_groups, lp.keep_neurons) for lp in plan.layers[:2]] == \
        [(r["keep_groups"], r["keep_neurons"]) for r in rows[:2]]  # the file's widths
    assert [lp.manual for lp in plan.layers] == [False, False, True] and plan.layers[2].sparsity == 0.6
    assert plan.layers[2].actual_sparsity == pytest.approx(0.6, abs=0.03) != rows[2]["actual_sparsity"]
    assert cfg2.target == pytest.approx(plan.removed_fraction, abs=1e-6) and "--manual: 2" in what
