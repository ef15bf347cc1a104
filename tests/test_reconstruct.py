"""Reconstruction (explorer/reconstruct.py): the closed form against numpy's lstsq, identity
when nothing is cut, never worse than plain removal on the calibration tokens, layer-
sequential inputs, bias compensation that survives save/reload, and the pipeline phases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_data, tiny_lm

from explorer import reconstruct as R
from explorer.config import PruneConfig
from explorer.pruning import PruningRun


def _keeps(lm, attn_step=2, mlp_step=2):
    out = []
    for b in lm.adapter.blocks(lm.model):
        out.append((list(range(0, b.attn.n_units, attn_step)), list(range(0, b.mlp.n_units, mlp_step))))
    return out


def _logits(lm, texts):
    batch = lm.encode(texts)
    batch.pop("labels", None)
    with torch.no_grad():
        return lm.model(**batch).logits


def _stats(x: torch.Tensor) -> R.GramStats:
    st = R.GramStats.zeros(x.shape[1])
    st.add(x)
    return st


@pytest.mark.parametrize("fit_bias", [True, False])
@pytest.mark.parametrize("lam", [0.0, 0.05, 2.0])
def test_refit_equals_lstsq(lam, fit_bias):
    """The Gram-matrix solution equals numpy's lstsq on the stacked ridge problem."""
    g = torch.Generator().manual_seed(0)
    n, c, out = 300, 12, 5
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, c, dtype=torch.float64) + 0.7
    W = torch.randn(out, c, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    st = _stats(x)
    Wn, bn = R.refit(W, b, st, keep, lam, fit_bias)
    # min ||Y - Z θ||² + λ Σ_k D_k ||θ_k - W_k||² as one stacked least-squares problem
    Y = (x @ W.T + b).numpy()  # (n, out)
    Z = x[:, keep].numpy()
    if fit_bias:
        Z = np.hstack([Z, np.ones((n, 1))])
    else:
        Y = Y - b.numpy()
    D = (x[:, keep] ** 2).sum(0).numpy()
    reg = np.diag(np.sqrt(lam * D))
    if fit_bias:
        reg = np.hstack([reg, np.zeros((len(keep), 1))])
    A = np.vstack([Z, reg])
    T = np.vstack([Y, np.sqrt(lam * D)[:, None] * W[:, keep].numpy().T])
    theta = np.linalg.lstsq(A, T, rcond=None)[0]  # (K[+1], out)
    np.testing.assert_allclose(Wn.numpy(), theta[:len(keep)].T, rtol=1e-6, atol=1e-8)
    if fit_bias:
        np.testing.assert_allclose(bn.numpy(), theta[-1], rtol=1e-6, atol=1e-8)
    else:
        assert bn is b


def test_infinite_lambda_is_flap_bias_compensation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) + 2.0
    W = torch.randn(3, 6, generator=g, dtype=torch.float64)
    keep = torch.tensor([1, 4])
    Wn, bn = R.refit(W, None, _stats(x), keep, math.inf, True)
    removed = torch.tensor([0, 2, 3, 5])
    torch.testing.assert_close(Wn, W[:, keep])
    torch.testing.assert_close(bn, W[:, removed] @ x[:, removed].mean(0))


def test_error_from_gram_matches_direct():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(150, 8, generator=g, dtype=torch.float64) + 0.3
    W, b = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 1, 5])
    Wn, bn = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    direct = ((x @ W.T + b - x[:, keep] @ Wn.T - bn) ** 2).sum()
    assert R.error(W, b, Wn, bn, _stats(x), keep) == pytest.approx(float(direct), rel=1e-9)


def test_choose_lambda_prefers_ridge_when_few_tokens():
    """With fewer fit tokens than channels the unregularised fit overfits; held-out picks λ > min."""
    g = torch.Generator().manual_seed(3)
    c = 40
    mix = torch.randn(c, c, generator=g, dtype=torch.float64)
    fit, held = _stats(torch.randn(30, c, generator=g, dtype=torch.float64) @ mix), \
        _stats(torch.randn(400, c, generator=g, dtype=torch.float64) @ mix)
    W = torch.randn(6, c, generator=g, dtype=torch.float64)
    lam, errs = R.choose_lambda(W, None, fit, held, torch.arange(0, c, 2), True)
    assert lam > R.LAMBDA_GRID[0] and errs[lam] == min(errs.values())


def test_keeping_every_unit_is_identity(tiny):
    name, _ = tiny
    lm, data = tiny_lm(name), tiny_data(60)
    before = _logits(lm, data.texts["test"])
    full = [(list(range(b.attn.n_units)), list(range(b.mlp.n_units))) for b in lm.adapter.blocks(lm.model)]
    rep = R.reconstruct(lm, full, data.texts["train"])
    torch.testing.assert_close(_logits(lm, data.texts["test"]), before)
    assert all(layer == [] for layer in rep.layers)


@pytest.mark.parametrize("lam", [0.0, 0.01])
def test_refit_never_worse_than_plain_removal(tiny, lam):
    """Per projection on the calibration tokens (Gram errors), and in the block outputs."""
    name, _ = tiny
    lm, data = tiny_lm(name), tiny_data(120)
    keeps = _keeps(lm)
    rep = R.reconstruct(lm, keeps, data.texts["train"], lam=lam)
    rows = [r for layer in rep.layers for r in layer]
    assert len(rows) == 2 * len(rep.layers)
    for r in rows:
        assert r["error_refit"] <= r["error_removed"] * (1 + 1e-9), r
    assert rep.error_ratio < 0.9  # a real gain on these random models
    widths = [(b.attn.n_units, b.mlp.n_units) for b in lm.adapter.blocks(lm.model)]
    assert widths == [(len(a), len(m)) for a, m in keeps]


def test_sequential_inputs_come_from_pruned_predecessors(monkeypatch):
    """When layer 1 is refit, its stream is layer 0's output *after* layer 0 was cut and refit."""
    lm, data = tiny_lm("llama"), tiny_data(60)
    texts = data.texts["train"][:20]
    dense_l1_in = _layer_inputs(lm, texts, 1)
    seen = {}
    real = R._forward_block

    def spy(layer, inp, collect=None, update=False, **kw):
        if collect is not None and layer is lm.adapter.layers(lm.model)[1] and "x" not in seen:
            seen["x"] = inp.hidden(0).clone()
        return real(layer, inp, collect=collect, update=update, **kw)
    monkeypatch.setattr(R, "_forward_block", spy)
    R.reconstruct(lm, _keeps(lm), texts, batch_size=len(texts))
    pruned_l1_in = _layer_inputs(lm, texts, 1)
    torch.testing.assert_close(seen["x"], pruned_l1_in, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen["x"], dense_l1_in, atol=1e-4)


def _layer_inputs(lm, texts, i):
    got = {}

    def hook(module, args, kwargs):
        got.setdefault("x", (args[0] if args else kwargs["hidden_states"]).detach().clone())
    h = lm.adapter.layers(lm.model)[i].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _logits(lm, texts)
    finally:
        h.remove()
    return got["x"]


def test_llama_bias_compensation_survives_save_and_reload(tmp_path):
    from explorer.models import load_model, save_model
    lm, data = tiny_lm("llama"), tiny_data(80)
    R.reconstruct(lm, _keeps(lm), data.texts["train"], fit_bias=True)
    o = lm.adapter.layers(lm.model)[0].self_attn.o_proj
    assert o.bias is not None and float(o.bias.abs().sum()) > 0
    assert lm.model.config.attention_bias and lm.model.config.mlp_bias
    before = _logits(lm, data.texts["test"])
    save_model(lm, tmp_path / "m")
    back = load_model(str(tmp_path / "m"), device="cpu")
    back.model.eval()
    batch = lm.encode(data.texts["test"])
    batch.pop("labels", None)
    with torch.no_grad():
        torch.testing.assert_close(back.model(**batch).logits, before, rtol=1e-4, atol=1e-4)


def test_without_bias_llama_keeps_its_architecture():
    lm, data = tiny_lm("llama"), tiny_data(60)
    R.reconstruct(lm, _keeps(lm), data.texts["train"], fit_bias=False)
    assert lm.adapter.layers(lm.model)[0].self_attn.o_proj.bias is None
    assert not getattr(lm.model.config, "attention_bias", False)


@pytest.mark.parametrize("recovery", ["reconstruct", "reconstruct+lora"])
def test_pipeline_records_each_phase(recovery):
    from explorer.config import AllocationConfig, AnalysisConfig
    lm, data = tiny_lm("gpt2"), tiny_data(120)
    run = PruningRun(lm, data, AnalysisConfig(samples=40, batch_size=8, metric="taylor"),
                     AllocationConfig(target=0.4, amplitude=0.0, mode="uniform"),
                     PruneConfig(stages=2, recovery=recovery, recovery_steps=2, train_batch_size=4), timing=False)
    events = list(run.events())
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "done", events[-1]
    assert kinds.count("reconstruct") == 2
    phases = [e["phase"] for e in events if e["type"] == "phase"]
    want = ["cut"] if recovery == "reconstruct" else ["cut", "reconstructed"]
    assert phases == want * 2
    for r in run.records:
        assert r.reconstruction["error_ratio"] <= 1.0 and r.reconstruction["tokens"] > 0
        assert set(r.phases) == set(want)
    rep = run.report()
    assert rep["stages"][0]["phases"]["cut"]["perplexity"] > 0


def test_encoder_without_head_can_reconstruct():
    from explorer.config import AllocationConfig, AnalysisConfig
    from explorer.data import TextData
    lm = tiny_lm("bert")
    lm.task = "encoder"
    data = tiny_data(80)
    data = TextData("tiny", data.texts, None, None)
    run = PruningRun(lm, data, AnalysisConfig(samples=30, metric="fluctuation"),
                     AllocationConfig(target=0.3, amplitude=0.0, mode="uniform"),
                     PruneConfig(stages=1, recovery="reconstruct", eval_phases=False), timing=False)
    rep = run.run()
    assert rep["status"] == "done", rep.get("error")  # run() catches a failure: the status must be read
    r = run.records[0]
    assert r.removed_fraction >= 0.3  # the cut happened (whole heads: a little more than asked)
    # the refit ran on the encoder's own hidden states (no head, no labels) and beat plain removal by far
    assert r.reconstruction["tokens"] > 0 and r.reconstruction["error_ratio"] < 0.5
    with pytest.raises(Exception, match="no task head to train"):
        PruningRun(lm, data, AnalysisConfig(metric="fluctuation"), None, PruneConfig(recovery="reconstruct+lora"))


def test_obs_removes_the_channel_the_refit_can_rebuild():
    """Channel 2 is a copy of channel 0 (x2 = x0): after the refit its removal costs nothing,
    though it has the largest weights; OBS removes it, a magnitude choice would not."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(500, 5, generator=g, dtype=torch.float64)
    x[:, 2] = x[:, 0]
    W = torch.randn(3, 5, generator=g, dtype=torch.float64)
    W[:, 2] *= 10
    keep = R.obs_select(W, _stats(x), 5, 1, 4, centred=False, damp=1e-9)
    assert keep == [0, 1, 3, 4] or keep == [1, 2, 3, 4]  # one of the twins goes
    Wn, _ = R.refit(W, None, _stats(x), torch.tensor(keep), 1e-9, False)
    assert R.error(W, None, Wn, None, _stats(x), torch.tensor(keep)) < 1e-6 * float((x @ W.T).pow(2).sum())


def test_obs_selection_keeps_the_plan_counts_and_beats_the_given_units(tiny):
    name, _ = tiny
    data = tiny_data(160)
    out = {}
    for select in ("given", "obs"):
        lm = tiny_lm(name)
        keeps = _keeps(lm)
        rep = R.reconstruct(lm, keeps, data.texts["train"], lam=1e-3, select=select, weighting="none")
        assert [(b.attn.n_units, b.mlp.n_units) for b in lm.adapter.blocks(lm.model)] == \
            [(len(a), len(m)) for a, m in keeps]
        out[select] = rep.layers[0][-1]["error_refit"]  # layer 0's MLP: the same inputs either way
    assert out["obs"] <= out["given"] * 1.001
