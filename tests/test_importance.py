"""Importance analysis on the tiny random models: shapes, the cosine layer importance
against an independent computation from `output_hidden_states`, the direction of every
score, label-free use, JSON round trip, and that the analysis leaves the model as it was."""
from __future__ import annotations

import json
import warnings
import zlib

import numpy as np
import pytest
import torch

from explorer.adapters import adapter_for
from explorer.config import LABEL_FREE_METRICS, METRICS, AnalysisConfig
from explorer.errors import Cancelled, ExplorerError
from explorer.importance import GRAD_METRICS, LOSS_METRICS, Importance, analyze, normalize
from explorer.models import LoadedModel
from conftest import TINY

ARCHS = sorted(TINY)
ADDITIVE = ("taylor", "fisher", "magnitude_l1")  # per-group score = sum of its query heads'
TEXTS = [f"calibration sentence number {i} " + "word " * (i % 4) for i in range(10)]
LABELS = [i % 2 for i in range(10)]
BATCH = 4  # 10 texts -> batches of 4, 4, 2 (the last one partial)
CFG = AnalysisConfig(batch_size=BATCH, metric="taylor")


class FakeTokenizer:
    """Deterministic stand-in for a HF tokenizer: ids seeded from each text, lengths 3..12,
    right padding with id 0 (so every batch of several texts has some padding)."""

    pad_token = "[PAD]"
    pad_token_id = 0

    def __init__(self, vocab: int = 120):
        self.vocab = vocab

    def __call__(self, texts, padding=True, truncation=True, max_length=None, return_tensors="pt"):
        assert return_tensors == "pt"
        seqs = []
        for t in texts:
            h = zlib.crc32(t.encode())
            n = 3 + h % 10
            if truncation and max_length:
                n = min(n, max_length)
            g = torch.Generator().manual_seed(h)
            seqs.append(torch.randint(3, self.vocab, (n,), generator=g))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
            mask[i, :len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _reinit_blocks(model, std: float = 0.2, seed: int = 3) -> None:
    """Redraw the blocks' projection weights with a larger spread. With the default init
    (std 0.02) every block barely changes the residual stream (cos > 0.9999 in BERT), so
    a wrong layer score could still pass a 1e-4 comparison; here -cos ranges over about
    [-0.9, 0]."""
    ad = adapter_for(model.config.model_type)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ad.layers(model):
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)


def make_lm(arch: str, model=None, task: str | None = None) -> LoadedModel:
    model = model if model is not None else TINY[arch]()
    _reinit_blocks(model)
    task = task or ("classification" if "bert" in arch else "causal-lm")
    return LoadedModel(model, FakeTokenizer(), task, f"tiny-{arch}",
                       adapter_for(model.config.model_type), torch.device("cpu"))


def labels_for(lm: LoadedModel):
    return LABELS if lm.task == "classification" else None


def run(lm: LoadedModel, metric: str = "taylor", texts=TEXTS, **kw) -> Importance:
    return analyze(lm, texts, labels_for(lm), AnalysisConfig(batch_size=BATCH, metric=metric), **kw)


@pytest.fixture(scope="module", params=ARCHS)
def analysed(request):
    """(arch, lm, Importance with every metric), computed once per architecture."""
    lm = make_lm(request.param)
    return request.param, lm, run(lm)


def batches(texts, bs=BATCH):
    return [texts[i:i + bs] for i in range(0, len(texts), bs)]


def cos64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


# --- shapes --------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
def test_shapes_finite_nonnegative(analysed, metric):
    arch, lm, imp = analysed
    blocks = lm.adapter.blocks(lm.model)
    assert set(imp.heads) == set(METRICS) == set(imp.groups) == set(imp.neurons)
    assert imp.n_layers == len(blocks) == 3
    for b, h, g, n in zip(blocks, imp.heads[metric], imp.groups[metric], imp.neurons[metric]):
        qpk = b.heads_per_group
        assert qpk == (2 if arch == "llama" else 1)
        assert h.shape == (b.attn.n_units * qpk,)  # n_query_heads
        assert g.shape == (b.attn.n_units,)  # n_groups
        assert n.shape == (b.mlp.n_units,) == (64,)
        for x in (h, g, n):
            assert np.isfinite(x).all() and (x >= 0).all()
            assert x.max() > 0, "a random model should not score every unit zero"
        if metric in ADDITIVE:
            np.testing.assert_allclose(g, h.reshape(-1, qpk).sum(1), rtol=1e-9, atol=1e-12)


def test_unit_scores_only_for_losses_on_one_scale(analysed):
    """The salience split compares attention and FFN scores: only loss estimates qualify."""
    _, _, imp = analysed
    for m in METRICS:
        scores = imp.unit_scores(m)
        if m in LOSS_METRICS:
            assert [len(g) for g, _ in scores] == [len(x) for x in imp.groups[m]]
            assert all(n is x for (_, n), x in zip(scores, imp.neurons[m]))
        else:
            assert scores is None, m  # magnitudes are not losses; apt is rescaled per kind


def test_counts_and_params(analysed):
    arch, lm, imp = analysed
    assert imp.samples == len(TEXTS)
    assert imp.tokens == sum(int(lm.encode(bt)["attention_mask"].sum()) for bt in batches(TEXTS))
    for b, p in zip(lm.adapter.blocks(lm.model), imp.params):
        assert p == {"group_params": b.attn.params_per_unit, "neuron_params": b.mlp.params_per_unit,
                     "block_params": b.params, "groups": b.attn.n_units,
                     "heads_per_group": b.heads_per_group, "n_neurons": b.mlp.n_units}
        assert b.params > b.attn.n_units * b.attn.params_per_unit + b.mlp.n_units * b.mlp.params_per_unit


# --- cosine importance against output_hidden_states -------------------------------------------

def reference_layer_cos(lm: LoadedModel, texts, bs=BATCH):
    """I_L = -mean over non-padding tokens (all batches) of cos(h_L, h_{L+1}), from
    `output_hidden_states`. For pre-LN models (GPT-2, LLaMA) the last entry of
    hidden_states has the final norm applied, so the last block's raw output is taken
    from a forward hook instead (and hidden_states[-1] == final_norm(that) is checked)."""
    model = lm.model
    layers = lm.adapter.layers(model)
    n_layers = len(layers)
    pre_ln = lm.adapter.family in ("GPT-2", "LLaMA")
    last = {}
    handle = layers[-1].register_forward_hook(
        lambda m, a, out: last.__setitem__("out", (out[0] if isinstance(out, tuple) else out).detach()))
    sums = torch.zeros(n_layers, dtype=torch.float64)
    tokens = 0
    try:
        with torch.no_grad():
            for bt in batches(texts, bs):
                enc = lm.tokenizer(bt, padding=True, truncation=True, max_length=lm.max_length, return_tensors="pt")
                out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                            output_hidden_states=True)
                hs = list(out.hidden_states)
                assert len(hs) == n_layers + 1
                mask = enc["attention_mask"].double()
                if pre_ln:
                    final_norm = lm.adapter.base(model).ln_f if lm.adapter.family == "GPT-2" else lm.adapter.base(model).norm
                    torch.testing.assert_close(hs[-1], final_norm(last["out"]))
                    hs[-1] = last["out"]
                else:  # post-LN: the last hidden state is the last block's output as is
                    torch.testing.assert_close(hs[-1], last["out"])
                for i in range(n_layers):
                    sums[i] += (cos64(hs[i], hs[i + 1]) * mask).sum()
                tokens += int(mask.sum())
    finally:
        handle.remove()
    return -(sums / tokens).numpy(), tokens


def test_layer_cos_matches_hidden_states(analysed):
    arch, lm, imp = analysed
    ref, tokens = reference_layer_cos(lm, TEXTS)
    assert imp.tokens == tokens
    np.testing.assert_allclose(imp.layer_cos, ref, atol=1e-4, rtol=0)
    assert np.ptp(ref) > 0.05  # the layers really differ, so the comparison means something
    assert np.all(imp.layer_cos >= -1 - 1e-6) and np.all(imp.layer_cos <= 1 + 1e-6)
    for x in (imp.attn_cos, imp.mlp_cos):
        assert x.shape == (3,) and np.isfinite(x).all() and np.all(np.abs(x) <= 1 + 1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_cos_does_not_depend_on_batching(arch):
    """Token-weighted mean: one batch of everything (more padding) gives the same I_L."""
    lm = make_lm(arch)
    a = analyze(lm, TEXTS, None, AnalysisConfig(batch_size=3, metric="magnitude_l1"), metrics=("magnitude_l1",))
    b = analyze(lm, TEXTS, None, AnalysisConfig(batch_size=len(TEXTS), metric="magnitude_l1"),
                metrics=("magnitude_l1",))
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.layer_cos, b.layer_cos, atol=1e-5, rtol=0)
    for x, y in zip(a.neurons["magnitude_l1"], b.neurons["magnitude_l1"]):
        np.testing.assert_array_equal(x, y)


# --- direction of the layer score -----------------------------------------------------------

def _make_identity(lm: LoadedModel, i: int) -> None:
    """Zero the attention output and MLP down projections (weights and biases) of block i
    of a pre-LN model: its output is then exactly its input."""
    b = lm.adapter.block(lm.model, i)
    with torch.no_grad():
        for m in (b.attn.out_module, b.mlp.out_module):
            m.weight.zero_()
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()


# Post-LN blocks (BERT, DistilBERT) cannot be made the identity by zeroing weights: the
# LayerNorm after each residual sum changes the input, so they are not part of this test.
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_identity_layer_is_least_important(arch, layer):
    lm = make_lm(arch)
    _make_identity(lm, layer)
    imp = run(lm, "magnitude_l1", metrics=("magnitude_l1",))
    assert imp.layer_cos[layer] == pytest.approx(-1.0, abs=1e-5)
    assert imp.attn_cos[layer] == pytest.approx(-1.0, abs=1e-5)
    assert imp.mlp_cos[layer] == pytest.approx(-1.0, abs=1e-5)
    others = [j for j in range(3) if j != layer]
    assert all(imp.layer_cos[j] > imp.layer_cos[layer] + 1e-3 for j in others)
    norm = imp.normalized
    assert int(np.argmin(norm)) == layer
    assert all(norm[j] > norm[layer] for j in others)
    assert np.mean(norm) == pytest.approx(0.0, abs=1e-12)
    assert np.max(np.abs(norm)) == pytest.approx(1.0)


def test_normalize():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 6, 30):
        for _ in range(20):
            v = rng.normal(size=n) * rng.uniform(0.001, 10) + rng.normal()
            z = normalize(v)
            assert z.shape == (n,)
            assert abs(z.mean()) < 1e-12
            if n > 1:
                assert np.max(np.abs(z)) == pytest.approx(1.0)
                # order preserved (the direction of the score does not flip)
                assert np.array_equal(np.argsort(z, kind="stable"), np.argsort(v, kind="stable"))
            else:
                assert z.tolist() == [0.0]
    np.testing.assert_array_equal(normalize([0.3, 0.3, 0.3]), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(normalize([-1.0, 0.0, 4.0]), [-2 / 3, -1 / 3, 1.0])
    with warnings.catch_warnings():  # numpy warns about the mean of an empty array
        warnings.simplefilter("ignore")
        assert normalize([]).shape == (0,)


# --- direction of unit salience ----------------------------------------------------------

def _narrow(s, u: int):
    return s.param.narrow(s.dim, s.offset + u * s.unit_size, s.unit_size)


@pytest.mark.parametrize("arch", ARCHS)
def test_unit_salience_direction(arch):
    """Layer 1: neuron 5's down-projection column and attention unit 1's output-projection
    columns are zero (dead units: their other weights are intact but unused), so every
    gradient-based score is exactly 0 there, the lowest. Layer 0: neuron 7 has all its
    weights zero (lowest magnitude) and neuron 11 its weights x10 (highest magnitude)."""
    lm = make_lm(arch)
    blocks = lm.adapter.blocks(lm.model)
    with torch.no_grad():
        b1 = blocks[1]
        for g, u in ((b1.mlp, 5), (b1.attn, 1)):
            outs = [s for s in g.slices if s.module is g.out_module]
            assert len(outs) == 1
            _narrow(outs[0], u).zero_()
        b0 = blocks[0]
        for s in b0.mlp.slices:
            _narrow(s, 7).zero_()
            _narrow(s, 11).mul_(10)
    imp = run(lm)
    qpk = b1.heads_per_group
    dead_heads = list(range(qpk, 2 * qpk))  # query heads of attention unit 1
    for m in GRAD_METRICS:
        n1 = imp.neurons[m][1]
        assert n1[5] == pytest.approx(0.0, abs=1e-12), m
        assert np.all(np.delete(n1, 5) > n1[5]), m
        g1, h1 = imp.groups[m][1], imp.heads[m][1]
        assert g1[1] == pytest.approx(0.0, abs=1e-12), m
        assert np.all(np.delete(g1, 1) > g1[1]), m
        assert np.all(h1[dead_heads] <= 1e-12) and np.all(np.delete(h1, dead_heads) > 1e-12), m
    for m in ("magnitude_l1", "magnitude_l2"):
        n0 = imp.neurons[m][0]
        assert n0[7] == 0.0 and np.all(np.delete(n0, 7) > 0), m
        assert int(np.argmax(n0)) == 11, m
        assert n0[11] > 5 * np.sort(n0)[-2], m
    # taylor: the all-zero neuron is the least salient in its layer too
    assert int(np.argmin(imp.neurons["taylor"][0])) == 7


# --- label-free use --------------------------------------------------------------------------

def _bare(arch: str):
    """The bare transformer of a tiny model, without a task head."""
    model = TINY[arch]()
    return adapter_for(model.config.model_type).base(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_encoder_task_magnitude_without_labels(arch):
    lm = make_lm(arch, _bare(arch), task="encoder")
    for metric in LABEL_FREE_METRICS:
        imp = analyze(lm, TEXTS, None, AnalysisConfig(batch_size=BATCH, metric=metric))
        assert imp.metric == metric
        assert set(imp.heads) == set(LABEL_FREE_METRICS)  # no gradient metric without labels
        assert imp.n_layers == 3
        for x in imp.heads[metric] + imp.groups[metric] + imp.neurons[metric]:
            assert np.isfinite(x).all() and (x > 0).all()
        ref, _ = reference_layer_cos(lm, TEXTS)
        np.testing.assert_allclose(imp.layer_cos, ref, atol=1e-4, rtol=0)
    # same magnitudes as on the full model (with its head): magnitudes need no data
    full = run(make_lm(arch), "magnitude_l1", metrics=LABEL_FREE_METRICS)
    for m in LABEL_FREE_METRICS:
        for kind in ("heads", "groups", "neurons"):
            for x, y in zip(getattr(imp, kind)[m], getattr(full, kind)[m]):
                np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("metric", GRAD_METRICS)
def test_gradient_metric_on_encoder_raises(metric):
    lm = make_lm("bert", _bare("bert"), task="encoder")
    with pytest.raises(ExplorerError, match=rf"'{metric}' needs gradients.*magnitude_l1"):
        analyze(lm, TEXTS, None, AnalysisConfig(batch_size=BATCH, metric=metric))


def test_gradient_metric_on_classifier_without_labels_raises():
    lm = make_lm("bert")
    with pytest.raises(ExplorerError, match="needs gradients"):
        analyze(lm, TEXTS, None, AnalysisConfig(batch_size=BATCH, metric="taylor"))
    # label-free metrics still work there, and the result has no gradient metric
    imp = analyze(lm, TEXTS, None, AnalysisConfig(batch_size=BATCH, metric="magnitude_l1"))
    assert set(imp.heads) == set(LABEL_FREE_METRICS)


def test_explicit_gradient_metrics_on_encoder_raise_explorer_error():
    lm = make_lm("bert", _bare("bert"), task="encoder")
    with pytest.raises(ExplorerError, match="taylor"):
        analyze(lm, TEXTS, None, AnalysisConfig(batch_size=BATCH, metric="magnitude_l1"), metrics=("taylor",))


def test_bad_inputs_raise():
    lm = make_lm("gpt2")
    with pytest.raises(ExplorerError, match="no calibration texts"):
        analyze(lm, [], None, AnalysisConfig(metric="magnitude_l1"))
    with pytest.raises(ExplorerError, match="'euclidean'"):
        analyze(lm, TEXTS, None, AnalysisConfig(metric="euclidean"))


# --- JSON round trip ----------------------------------------------------------------------------

def test_json_round_trip(analysed):
    arch, lm, imp = analysed
    d = json.loads(json.dumps(imp.to_json()))
    assert d["metric"] == "taylor" and d["samples"] == imp.samples and d["tokens"] == imp.tokens
    assert len(d["layers"]) == 3
    for i, layer in enumerate(d["layers"]):
        assert layer["normalized_importance"] == pytest.approx(imp.normalized[i])
    r = Importance.from_json(d)
    assert r.metric == imp.metric and r.samples == imp.samples and r.tokens == imp.tokens
    np.testing.assert_array_equal(r.layer_cos, imp.layer_cos)
    np.testing.assert_array_equal(r.attn_cos, imp.attn_cos)
    np.testing.assert_array_equal(r.mlp_cos, imp.mlp_cos)
    np.testing.assert_array_equal(r.normalized, imp.normalized)
    for kind in ("heads", "groups", "neurons"):
        a, b = getattr(r, kind)[imp.metric], getattr(imp, kind)[imp.metric]
        assert len(a) == len(b) == 3
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert r.params == imp.params
    # and again: a stable fixed point
    assert Importance.from_json(r.to_json()).to_json() == r.to_json()


def test_json_round_trip_all_metrics(analysed):
    arch, lm, imp = analysed
    r = Importance.from_json(json.loads(json.dumps(imp.to_json(all_metrics=True))))
    assert set(r.heads) == set(METRICS)
    for m in METRICS:
        for kind in ("heads", "groups", "neurons"):
            a, b = getattr(r, kind)[m], getattr(imp, kind)[m]
            assert len(a) == len(b) == 3, (m, kind)
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)


# --- the analysis leaves the model as it was ---------------------------------------------------------

def _no_hooks(model) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                    or getattr(m, "_backward_pre_hooks", None))
               for m in model.modules())


def _snapshot(lm):
    model = lm.model
    was = model.training
    model.eval()
    with torch.no_grad():
        enc = lm.tokenizer(TEXTS[:4], padding=True, truncation=True, max_length=64, return_tensors="pt")
        out = model(**enc).logits.clone()
    model.train(was)
    return out, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_analysis_leaves_model_unchanged(arch):
    lm = make_lm(arch)
    model = lm.model
    base = lm.adapter.base(model)
    emb = next(base.children())  # embeddings: frozen, to check flags are restored (not just set True)
    for p in emb.parameters():
        p.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not all(flags.values()) and any(flags.values())
    out0, state0 = _snapshot(lm)
    model.train()
    progress = []
    imp = run(lm, progress=lambda i, n: progress.append((i, n)))
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert model.training  # mode restored
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert _no_hooks(model)
    out1, state1 = _snapshot(lm)
    torch.testing.assert_close(out1, out0, atol=0, rtol=0)
    assert state1.keys() == state0.keys()
    for k in state0:
        assert torch.equal(state0[k], state1[k]), k
    # a second analysis on the restored model gives the same scores
    model.eval()
    imp2 = run(lm)
    np.testing.assert_allclose(imp2.layer_cos, imp.layer_cos, atol=1e-6)
    for x, y in zip(imp2.neurons["taylor"], imp.neurons["taylor"]):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_cancel_leaves_model_unchanged(arch):
    lm = make_lm(arch)
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    out0, _ = _snapshot(lm)
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 1  # stop before the second batch

    with pytest.raises(Cancelled):
        run(lm, should_stop=should_stop)
    assert not lm.model.training
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == flags
    assert all(p.grad is None for p in lm.model.parameters())
    assert _no_hooks(lm.model)
    out1, _ = _snapshot(lm)
    torch.testing.assert_close(out1, out0, atol=0, rtol=0)
