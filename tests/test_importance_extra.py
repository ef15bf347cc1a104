"""The FLAP fluctuation metric against a hand computation (numpy) from hooked out_module inputs,
its label-free use and the salience split; the layer-importance normalisations (maxabs, rank,
zscore) and allocation with each; and the gradient metrics (taylor, fisher, act_grad) against
independent torch.autograd computations, all on 2-layer tiny random models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)

from explorer.allocation import allocate, validate
from explorer.config import LABEL_FREE_METRICS, METRICS, NORMALIZATIONS, AllocationConfig, AnalysisConfig
from explorer.errors import ExplorerError
from explorer.importance import LOSS_METRICS, Importance, analyze, normalize
from test_importance import BATCH, LABELS, TEXTS, batches, make_lm

ARCHS = ("llama", "gpt2", "bert")
RTOL = 1e-5


def tiny2(arch: str):
    """2-layer tiny models: LLaMA with GQA (3 query heads per KV head), GPT-2 (Conv1D), BERT."""
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                          num_key_value_heads=2, head_dim=8, intermediate_size=40, max_position_embeddings=64,
                          tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).eval()
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                          n_positions=64)).eval()
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, num_labels=2)
    return (BertModel(cfg) if arch == "bert-encoder" else BertForSequenceClassification(cfg)).eval()


def lm2(arch: str):
    if arch == "bert-encoder":
        return make_lm("bert", tiny2(arch), task="encoder")
    return make_lm(arch, tiny2(arch))


def labels_of(lm):
    return LABELS if lm.task == "classification" else None


def run(lm, metrics, metric=None, labels=True):
    cfg = AnalysisConfig(batch_size=BATCH, metric=metric or metrics[0])
    return analyze(lm, TEXTS, labels_of(lm) if labels else None, cfg, metrics=metrics)


def encoded_batches(lm, labels=True):
    """The batches `analyze` sees: TEXTS in chunks of BATCH, encoded by lm.encode."""
    labs = labels_of(lm) if labels else None
    return [lm.encode(bt, labs[i * BATCH:(i + 1) * BATCH] if labs else None) for i, bt in enumerate(batches(TEXTS))]


# --- fluctuation against a hand computation ------------------------------------------------

def out_inputs(lm, labels=True) -> dict[tuple[int, str], np.ndarray]:
    """(layer, kind) -> (N, C) inputs of the group's out_module over all non-padding tokens."""
    blocks = lm.adapter.blocks(lm.model)
    got: dict[tuple[int, str], list] = {}
    masks: list[torch.Tensor] = []
    handles = [g.out_module.register_forward_pre_hook(
        lambda m, args, key=(b.index, g.kind): got.setdefault(key, []).append(args[0].detach()))
        for b in blocks for g in (b.attn, b.mlp)]
    try:
        with torch.no_grad():
            for batch in encoded_batches(lm, labels):
                masks.append(batch["attention_mask"].bool())
                lm.model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {k: np.concatenate([x[m].double().numpy() for x, m in zip(xs, masks)]) for k, xs in got.items()}


def weight_col_sq(module) -> np.ndarray:
    """||W[:, j]||² per input channel j: nn.Linear weight is (out, in), GPT-2 Conv1D (in, out)."""
    w = module.weight.detach().double().numpy()
    if isinstance(module, torch.nn.Linear):
        return (w ** 2).sum(0)
    assert type(module).__name__ == "Conv1D"
    return (w ** 2).sum(1)


def hand_fluctuation(lm, labels=True) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """(layer, kind) -> (per query head, per group / neuron) Σ_j Var(X_j)·||W_:j||², Var with ddof 0."""
    X = out_inputs(lm, labels)
    out = {}
    for b in lm.adapter.blocks(lm.model):
        for g in (b.attn, b.mlp):
            x = X[(b.index, g.kind)]  # (N, C)
            per_channel = x.var(0, ddof=0) * weight_col_sq(g.out_module)  # (C,)
            qpk = b.heads_per_group if g.kind == "attention" else 1
            heads = np.array([per_channel[h * b.head_dim:(h + 1) * b.head_dim].sum()
                              for h in range(g.n_units * qpk)]) if g.kind == "attention" else per_channel
            size = g.act_unit_size
            groups = np.array([per_channel[u * size:(u + 1) * size].sum() for u in range(g.n_units)])
            out[(b.index, g.kind)] = heads, groups
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fluctuation_matches_hand_computation(arch):
    lm = lm2(arch)
    blocks = lm.adapter.blocks(lm.model)
    assert len(blocks) == 2
    if arch == "llama":
        assert blocks[0].heads_per_group == 3 and blocks[0].attn.n_units == 2
    else:
        assert type(blocks[0].attn.out_module).__name__ == "Conv1D"
        assert blocks[0].mlp.out_module.weight.shape == (48, 32)  # (in, out)
    imp = run(lm, ("fluctuation",))
    ref = hand_fluctuation(lm)
    for b in blocks:
        i = b.index
        h, g = ref[(i, "attention")]
        np.testing.assert_allclose(imp.heads["fluctuation"][i], h, rtol=RTOL)
        np.testing.assert_allclose(imp.groups["fluctuation"][i], g, rtol=RTOL)
        np.testing.assert_allclose(imp.neurons["fluctuation"][i], ref[(i, "mlp")][1], rtol=RTOL)
        assert imp.neurons["fluctuation"][i].shape == (b.mlp.n_units,)
        assert np.ptp(imp.neurons["fluctuation"][i]) > 0 and (imp.neurons["fluctuation"][i] > 0).all()


def test_fluctuation_same_with_and_without_gradients():
    """The statistics come from the same forward pass whether or not a backward follows."""
    lm = lm2("llama")
    a = run(lm, ("fluctuation",))
    b = run(lm, ("taylor", "fluctuation"))
    for kind in ("heads", "groups", "neurons"):
        for x, y in zip(getattr(a, kind)["fluctuation"], getattr(b, kind)["fluctuation"]):
            np.testing.assert_allclose(x, y, rtol=1e-9)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_a_forward_only_metric_runs_no_backward_and_no_head(arch, monkeypatch):
    """The default metrics for a forward-only metric are the forward-only ones, even where gradients
    are possible (a causal LM, a labelled classifier): no backward and no task head runs (the
    transformer body only), and its scores are those of a pass that also took gradients."""
    lm = lm2(arch)
    head = lm.model.get_output_embeddings() if arch != "bert" else lm.model.classifier
    calls = []
    handle = head.register_forward_hook(lambda *a: calls.append("head"))
    monkeypatch.setattr(torch.Tensor, "backward", lambda *a, **k: calls.append("backward"))
    try:
        alone = analyze(lm, TEXTS, labels_of(lm), AnalysisConfig(batch_size=BATCH, metric="fluctuation"), cache=False)
    finally:
        handle.remove()
        monkeypatch.undo()
    assert calls == [] and set(alone.heads) == set(LABEL_FREE_METRICS)
    full = run(lm, ("taylor", "fluctuation"), metric="fluctuation")
    for x, y in zip(alone.neurons["fluctuation"], full.neurons["fluctuation"]):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    np.testing.assert_allclose(alone.layer_cos, full.layer_cos, rtol=1e-6)
    assert set(analyze(lm, TEXTS, labels_of(lm), AnalysisConfig(batch_size=BATCH, metric="taylor")).heads) == set(METRICS)


def test_fluctuation_is_label_free_on_an_encoder():
    assert "fluctuation" in METRICS and "fluctuation" in LABEL_FREE_METRICS
    enc = lm2("bert-encoder")
    imp = run(enc, ("fluctuation",), labels=False)
    default = analyze(enc, TEXTS, None, AnalysisConfig(batch_size=BATCH, metric="fluctuation"))
    assert set(default.heads) == set(LABEL_FREE_METRICS)
    ref = hand_fluctuation(enc, labels=False)
    for i in range(2):
        np.testing.assert_allclose(imp.groups["fluctuation"][i], ref[(i, "attention")][1], rtol=RTOL)
        np.testing.assert_allclose(imp.neurons["fluctuation"][i], ref[(i, "mlp")][1], rtol=RTOL)
        np.testing.assert_allclose(default.neurons["fluctuation"][i], imp.neurons["fluctuation"][i], rtol=1e-12)
    # a classifier without labels (no gradients possible) gets it too, and the same values as with labels
    cls = lm2("bert")
    no_labels = run(cls, ("fluctuation",), labels=False)
    with_grads = run(cls, ("taylor", "fluctuation"), metric="fluctuation")
    for x, y in zip(no_labels.neurons["fluctuation"], with_grads.neurons["fluctuation"]):
        np.testing.assert_allclose(x, y, rtol=1e-9)


def test_fluctuation_feeds_the_salience_split():
    lm = lm2("llama")
    imp = run(lm, ("fluctuation",))
    assert "fluctuation" in LOSS_METRICS
    scores = imp.unit_scores()
    assert scores is not None and len(scores) == 2
    for (g, n), gi, ni in zip(scores, imp.groups["fluctuation"], imp.neurons["fluctuation"]):
        assert g is gi and n is ni
    alloc = allocate(imp.normalized, imp.params, AllocationConfig(target=0.3, amplitude=0.05), scores=scores)
    assert alloc.split == "salience"
    # survives the JSON round trip with the metric
    r = Importance.from_json(json.loads(json.dumps(imp.to_json())))
    assert r.metric == "fluctuation" and r.unit_scores() is not None
    with pytest.raises(ExplorerError, match="needs gradients"):  # still no gradient metric on an encoder
        analyze(lm2("bert-encoder"), TEXTS, None, AnalysisConfig(batch_size=BATCH, metric="taylor"))


# --- normalisations ---------------------------------------------------------------------------

def test_normalizations_range_and_order():
    rng = np.random.default_rng(0)
    for method in NORMALIZATIONS:
        for n in (1, 2, 3, 7, 30):
            for _ in range(10):
                v = rng.normal(size=n) * rng.uniform(0.001, 10) + rng.normal()
                z = normalize(v, method)
                assert z.shape == (n,) and np.isfinite(z).all()
                assert np.all(z >= -1) and np.all(z <= 1), method
                if n == 1:
                    assert z.tolist() == [0.0]
                    continue
                order = np.argsort(v, kind="stable")
                assert np.all(np.diff(z[order]) >= 0), method  # order preserved (never flips)
                if method != "zscore":  # no clipping: strictly increasing for distinct values
                    assert np.all(np.diff(z[order]) > 0), method
                    assert np.abs(z).max() == pytest.approx(1.0) and abs(z.mean()) < 1e-12
        np.testing.assert_array_equal(normalize([0.3, 0.3, 0.3], method), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(normalize([1.0, 2.0, 3.0]), normalize([1.0, 2.0, 3.0], "maxabs"))


def test_rank_normalization_spreads_an_outlier_and_averages_ties():
    v = np.r_[np.linspace(-0.01, 0.01, 29), 5.0]  # one outlier layer, as on SmolLM2
    assert np.sum(np.abs(normalize(v)) < 0.1) == 29  # maxabs squeezes the 29 others
    np.testing.assert_allclose(normalize(v[::-1], "rank"), np.linspace(-1, 1, 30)[::-1], atol=1e-12)
    np.testing.assert_allclose(normalize([1.0, 2.0, 2.0, 3.0], "rank"), [-1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(normalize([3.0, 1.0, 3.0, 3.0], "rank"), [1 / 3, -1.0, 1 / 3, 1 / 3])  # ranks 2, 0, 2, 2


def test_zscore_normalization_halves_and_clips():
    v = np.r_[np.zeros(9), 100.0]  # mean 10, std 30
    z = normalize(v, "zscore")
    np.testing.assert_allclose(z, np.r_[np.full(9, -10 / 30 / 2), 1.0])  # outlier 90 / 30 / 2 = 1.5 -> 1
    np.testing.assert_allclose(normalize([-1.0, 0.0, 1.0], "zscore"), [-np.sqrt(1.5) / 2, 0.0, np.sqrt(1.5) / 2])
    w = np.r_[0.0, 100.0, np.zeros(8), -100.0]
    assert normalize(w, "zscore")[[1, 10]].tolist() == [1.0, -1.0]


def test_unknown_normalization_raises():
    with pytest.raises(ExplorerError, match="'minmax'"):
        normalize([1.0, 2.0], "minmax")
    with pytest.raises(ExplorerError, match="minmax"):
        validate(AllocationConfig(normalization="minmax"))


def test_importance_normalized_by():
    lm = lm2("gpt2")
    imp = run(lm, ("magnitude_l1",))
    np.testing.assert_array_equal(imp.normalized, normalize(imp.layer_cos))
    for m in NORMALIZATIONS:
        np.testing.assert_array_equal(imp.normalized_by(m), normalize(imp.layer_cos, m))
    np.testing.assert_array_equal(imp.normalized_by(), imp.normalized)


GQA = {"groups": 3, "n_neurons": 1536, "group_params": 8 * 64 * 576, "neuron_params": 3 * 576,
       "block_params": 3 * 8 * 64 * 576 + 1536 * 3 * 576 + 2 * 576}


@pytest.mark.parametrize("method", NORMALIZATIONS)
@pytest.mark.parametrize("split", ["proportional", "salience"])
def test_allocate_with_each_normalization_meets_the_budget(method, split):
    raw = np.r_[np.linspace(0.1, 0.2, 11), 0.9]  # one outlier layer
    rng = np.random.default_rng(1)
    scores = [(rng.uniform(size=3) * 1e3, rng.uniform(size=1536)) for _ in raw]
    cfg = AllocationConfig(target=0.4, amplitude=0.1, normalization=method, split=split)
    alloc = allocate(normalize(raw, method), [GQA] * len(raw), cfg, scores=scores)
    ref = allocate(normalize(raw), [GQA] * len(raw), AllocationConfig(target=0.4, amplitude=0.1, split=split),
                   scores=scores)
    assert alloc.removed_fraction == pytest.approx(0.4, abs=GQA["neuron_params"] / alloc.params_before)
    assert alloc.normalization == method
    d = json.loads(json.dumps(alloc.to_json()))
    assert d["normalization"] == method
    np.testing.assert_allclose([l["importance"] for l in d["layers"]], normalize(raw, method))
    s = [l.sparsity for l in alloc.layers]
    assert s[-1] == min(s)  # the most important layer is pruned least
    if method != "maxabs":  # the others are spread more than the reference squeezes them
        assert np.ptp(s[:-1]) > 1.5 * np.ptp([l.sparsity for l in ref.layers[:-1]])


def test_allocation_config_default_is_the_reference():
    assert AllocationConfig().normalization == "maxabs"
    assert allocate([0.0, 1.0], [GQA] * 2, AllocationConfig()).to_json()["normalization"] == "maxabs"


def test_cli_allocate_has_the_normalization_flag(capsys):
    from explorer.cli import main
    with pytest.raises(SystemExit):
        main(["allocate", "--help"])
    out = capsys.readouterr().out
    assert "--normalization {maxabs,rank,zscore}" in out


# --- gradient metrics against torch.autograd ------------------------------------------------------

def unit_part(t: torch.Tensor, s, u: int, size: int | None = None) -> torch.Tensor:
    size = size or s.unit_size
    return t.narrow(s.dim, s.offset + u * size, size)


def param_grads(lm) -> tuple[list, list[list[torch.Tensor]]]:
    """The prunable parameters and, per batch, ∂L_b/∂p by torch.autograd.grad."""
    blocks = lm.adapter.blocks(lm.model)
    params = list({id(s.param): s.param for b in blocks for g in (b.attn, b.mlp) for s in g.slices}.values())
    per_batch = []
    for batch in encoded_batches(lm):
        loss = lm.model(**batch).loss
        per_batch.append([x.detach().double() for x in torch.autograd.grad(loss, params)])
    return params, per_batch


def by_unit(g, qpk: int, fn) -> tuple[np.ndarray, np.ndarray]:
    """(per query head, per group / neuron) sums of fn(slice) by hand: a query head owns its rows of
    the per-head slices and 1/qpk of its group's shared (key / value) slices."""
    n = g.n_units
    vals = [(s, fn(s)) for s in g.slices]  # elementwise, shaped like each slice's parameter
    groups = np.array([sum(float(unit_part(t, s, u).sum()) for s, t in vals) for u in range(n)])
    heads = np.zeros(n * qpk)
    for h in range(n * qpk):
        for s, t in vals:
            if s.per_head and qpk > 1:
                heads[h] += float(unit_part(t, s, h, s.unit_size // qpk).sum())
            else:
                heads[h] += float(unit_part(t, s, h // qpk).sum()) / qpk
    return heads, groups


def check_units(imp, metric, lm, fn, heads=True):
    for b in lm.adapter.blocks(lm.model):
        for g in (b.attn, b.mlp):
            qpk = b.heads_per_group if g.kind == "attention" else 1
            h, grp = by_unit(g, qpk, fn)
            if g.kind == "attention":
                np.testing.assert_allclose(imp.groups[metric][b.index], grp, rtol=RTOL, err_msg=metric)
                if heads:
                    np.testing.assert_allclose(imp.heads[metric][b.index], h, rtol=RTOL, err_msg=metric)
            else:
                np.testing.assert_allclose(imp.neurons[metric][b.index], grp, rtol=RTOL, err_msg=metric)


@pytest.fixture(scope="module", params=ARCHS)
def graded(request):
    """(lm, Importance with taylor / fisher / act_grad, autograd's parameters and per-batch grads)."""
    lm = lm2(request.param)
    imp = run(lm, ("taylor", "fisher", "act_grad"))
    params, per_batch = param_grads(lm)
    return lm, imp, params, per_batch


def test_taylor_matches_autograd(graded):
    lm, imp, params, per_batch = graded
    G = {id(p): sum(gb[k] for gb in per_batch) for k, p in enumerate(params)}  # gradient of Σ_b L_b
    check_units(imp, "taylor", lm, lambda s: (s.param.detach().double() * G[id(s.param)]).abs())


def test_fisher_matches_autograd(graded):
    lm, imp, params, per_batch = graded
    index = {id(p): k for k, p in enumerate(params)}
    check_units(imp, "fisher", lm, lambda s: 0.5 * sum((s.param.detach().double() * gb[index[id(s.param)]]) ** 2
                                                       for gb in per_batch))


def test_act_grad_matches_autograd(graded):
    """Σ_samples |Σ_tokens,channels H ⊙ ∂L/∂H|, H the out_module input, ∂L/∂H by autograd.grad."""
    lm, imp, _, _ = graded
    blocks = lm.adapter.blocks(lm.model)
    groups = [g for b in blocks for g in (b.attn, b.mlp)]
    total = {id(g): {"heads": 0.0, "units": 0.0} for g in groups}
    for batch in encoded_batches(lm):
        acts = {}
        handles = [g.out_module.register_forward_pre_hook(lambda m, args, k=id(g): acts.__setitem__(k, args[0]))
                   for g in groups]
        try:
            loss = lm.model(**batch).loss
        finally:
            for hd in handles:
                hd.remove()
        grads = torch.autograd.grad(loss, [acts[id(g)] for g in groups])
        mask = batch["attention_mask"].double().unsqueeze(-1)  # (B, T, 1)
        for b in blocks:
            for g in (b.attn, b.mlp):
                H = acts[id(g)].detach().double()  # (B, T, C)
                xg = (H * grads[groups.index(g)].double() * mask).sum(1)  # (B, C)
                B = xg.shape[0]
                head_size = b.head_dim if g.kind == "attention" else 1
                total[id(g)]["heads"] += xg.view(B, -1, head_size).sum(-1).abs().sum(0).numpy()
                total[id(g)]["units"] += xg.view(B, g.n_units, g.act_unit_size).sum(-1).abs().sum(0).numpy()
    for b in blocks:
        t = total[id(b.attn)]
        np.testing.assert_allclose(imp.groups["act_grad"][b.index], t["units"], rtol=RTOL)
        np.testing.assert_allclose(imp.heads["act_grad"][b.index], t["heads"], rtol=RTOL)
        np.testing.assert_allclose(imp.neurons["act_grad"][b.index], total[id(b.mlp)]["units"], rtol=RTOL)


# --- the UI's layer normalisation control -----------------------------------------------------------

def test_app_allocation_uses_the_chosen_normalization(ready):
    """Handlers take the normalisation as a field of the Allocation tab's settings (one `alloc` value)."""
    from app_helpers import alloc_args, req
    s = ready.session(req("a"))
    raw = s.importance.layer_cos
    for method in NORMALIZATIONS:
        fig, table, summary, _ = ready.on_allocation(*alloc_args(normalization=method), req("a"))
        assert s.allocation.normalization == method, summary
        np.testing.assert_allclose(table["Î_L"], np.round(normalize(raw, method), 3))
        layer_fig, *alloc_out = ready.on_normalization(*alloc_args(normalization=method), req("a"))
        bars = next(t for t in layer_fig.data if t.type == "bar")
        np.testing.assert_allclose(bars.y, normalize(raw, method))
        assert s.figures["layer importance"] is layer_fig
        assert len(alloc_out) == 4  # plot, table, summary, predicted-quality chart
    assert ready.on_allocation(*alloc_args(), req("a")) is not None and s.allocation.normalization == "maxabs"
    assert "layer normalisation must be one of" in ready.on_allocation(*alloc_args(normalization="minmax"), req("a"))[2]
    imp_out = ready.on_importance("fluctuation", 16, 8, *alloc_args(normalization="rank"), req("a"))
    assert "Importance from 16" in imp_out[3] and s.allocation.normalization == "rank"
    assert s.importance.metric == "fluctuation" and s.allocation.split == "salience"
