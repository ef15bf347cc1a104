"""Incremental pruning runs: stage records, stop, failures, save and reload."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import fail_recovery_at_stage, tiny_data, tiny_lm
from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
from explorer.models import PLAN_FILE, load_model, save_model
from explorer.pruning import PruningRun, choose_units
from explorer.surgery import widths

NAMES = ["bert", "distilbert", "gpt2", "llama"]


def _run(name, stages=3, recovery_="full", steps=2, target=0.5, **kw):
    lm = tiny_lm(name)
    run = PruningRun(lm, tiny_data(), AnalysisConfig(samples=8, batch_size=4),
                     AllocationConfig(target=target, amplitude=0.2),
                     PruneConfig(stages=stages, recovery=recovery_, recovery_steps=steps, train_batch_size=4),
                     timing=False, **kw)
    return lm, run


def _out(lm, texts=("w5 w6 w7 w8", "w9 w10 w11")):
    with torch.no_grad():
        return lm.model(**{k: v for k, v in lm.encode(list(texts)).items() if k != "labels"}).logits


def test_choose_units_ties_break_by_index():
    assert choose_units([1.0, 3.0, 3.0, 0.5, 3.0], 2) == [1, 2]
    assert choose_units([0, 0, 0], 1) == [0]


@pytest.mark.parametrize("name", NAMES)
def test_stage_records_reach_the_target(name):
    lm, run = _run(name)
    events = list(run.events())
    types = [e["type"] for e in events]
    assert types[0] == "dense" and types[-1] == "done"
    assert types.count("stage") == 3 and types.count("step") == 6
    removed = [r.removed_fraction for r in run.records]
    assert removed == sorted(removed)
    # each stage lands near k/K of the target (whole units make it approximate)
    for k, r in enumerate(removed, 1):
        assert abs(r - 0.5 * k / 3) < 0.06, removed
    rep = run.report()
    assert rep["final"]["params"] < rep["dense"]["params"]
    assert len(rep["stages"]) == 3 and set(rep["dense"]) >= {"params", "latency_ms"}
    json.dumps(rep)


@pytest.mark.parametrize("recovery_", ["none", "full", "lora", "kd"])
def test_every_recovery_method_runs_and_merges(recovery_):
    """Against the same cut with no recovery: each method trains (its steps, its losses), the training
    reaches the model's own weights (LoRA merged into the linear layers, nothing of it left), and none
    changes the widths."""
    ref_lm, ref = _run("llama", stages=1, recovery_="none")
    ref.run()
    lm, run = _run("llama", stages=1, recovery_=recovery_)
    run.run()
    assert run.status == "done" and ref.status == "done", (run.error, ref.error)
    assert type(lm.model).__name__ == "LlamaForCausalLM"  # LoRA merged away
    assert widths(lm.adapter, lm.model) == widths(ref_lm.adapter, ref_lm.model)
    ref_params = dict(ref_lm.model.named_parameters())
    params = dict(lm.model.named_parameters())
    assert params.keys() == ref_params.keys() and not any("lora" in n for n in params)
    changed = {n for n, p in params.items() if not torch.equal(p, ref_params[n])}
    losses = run.records[-1].losses
    if recovery_ == "none":
        assert not losses and not changed
        return
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert changed, "the recovery left every weight as the cut made it"
    if recovery_ == "lora":  # only the adapted (linear) weights move; norms and biases stay
        assert all(ref_params[n].dim() == 2 for n in changed)
    else:
        assert any(ref_params[n].dim() == 1 for n in changed)  # every parameter trains


def test_stop_during_recovery_keeps_last_completed_stage():
    lm, run = _run("bert", stages=3, steps=3)
    snapshot = None
    for ev in run.events():
        if ev["type"] == "stage" and ev["record"].stage == 1:
            snapshot = (widths(lm.adapter, lm.model), _out(lm))
        if ev["type"] == "step" and ev["stage"] == 2 and ev["step"] == 1:
            run.stop()
    assert run.status == "stopped" and len(run.records) == 1
    assert widths(lm.adapter, lm.model) == snapshot[0]
    torch.testing.assert_close(_out(lm), snapshot[1])


def test_exception_inside_a_stage_keeps_last_good_model(monkeypatch):
    lm, run = _run("gpt2", stages=3)
    fail_recovery_at_stage(monkeypatch, 2)
    events = list(run.events())
    assert events[-1]["type"] == "error" and "simulated failure" in events[-1]["message"]
    assert run.status == "error" and len(run.records) == 1
    assert [w["groups"] for w in widths(lm.adapter, lm.model)] == [w["groups"] for w in run.records[0].widths]
    assert torch.isfinite(_out(lm)).all()


def test_zero_stages_is_a_clear_error():
    from explorer.errors import ExplorerError
    with pytest.raises(ExplorerError, match="stages"):
        _run("bert", stages=0)


@pytest.mark.parametrize("name", NAMES)
def test_save_and_reload_non_uniform(name, tmp_path):
    lm, run = _run(name, stages=2, recovery_="none")
    run.run()
    ws = widths(lm.adapter, lm.model)
    assert len({(w["groups"], w["neurons"]) for w in ws}) > 1, "expected non-uniform widths"
    before = _out(lm)
    path = save_model(lm, tmp_path / "pruned")
    assert (path / "model.safetensors").exists() and (path / PLAN_FILE).exists()
    assert not list(path.glob("*.bin"))
    again = load_model(str(path), device="cpu")
    assert widths(again.adapter, again.model) == ws
    torch.testing.assert_close(_out(again), before)
    assert not list(tmp_path.glob(".saving-*")), "temporary directory left behind"


def test_uniform_llama_loads_with_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM
    lm = tiny_lm("llama")
    from explorer.surgery import prune_block
    for i in range(3):
        prune_block(lm.adapter, lm.model, i, [0, 2], list(range(0, 64, 2)))
    before = _out(lm)
    path = save_model(lm, tmp_path / "uniform")
    plan = json.loads((path / PLAN_FILE).read_text())
    assert plan["loads_with_plain_from_pretrained"] is True
    plain = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        out = plain(**{k: v for k, v in lm.encode(["w5 w6 w7 w8", "w9 w10 w11"]).items() if k != "labels"}).logits
    torch.testing.assert_close(out, before)


def test_full_recovery_trains_a_model_with_frozen_weights():
    """Models merged from a peft adapter come back with requires_grad=False everywhere."""
    lm, run = _run("bert", stages=1, recovery_="full", steps=2)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    before = [p.detach().clone() for p in lm.model.parameters()]
    run.run()
    assert run.status == "done", run.error
    assert any(not torch.equal(a, b) for a, b in zip(before, lm.model.parameters()) if a.shape == b.shape)


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2"])
def test_uniform_ffn_cut_loads_with_plain_from_pretrained(tmp_path, name):
    """Configs of these families express a uniform FFN width but not fewer heads."""
    from transformers import AutoModel
    from explorer.surgery import prune_block
    lm = tiny_lm(name)
    for i in range(3):
        prune_block(lm.adapter, lm.model, i, list(range(4)), list(range(0, 64, 2)))
    plan = json.loads((save_model(lm, tmp_path / "ffn") / PLAN_FILE).read_text())
    assert plan["loads_with_plain_from_pretrained"] is True
    plain = AutoModel.from_pretrained(str(tmp_path / "ffn"))
    assert lm.adapter.uniform_widths(plain) == (4, 32)
    prune_block(lm.adapter, lm.model, 0, [0, 1, 2], list(range(32)))  # one layer loses a head
    plan = json.loads((save_model(lm, tmp_path / "heads") / PLAN_FILE).read_text())
    assert plan["loads_with_plain_from_pretrained"] is False
