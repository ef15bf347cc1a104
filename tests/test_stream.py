"""Layer-streamed analysis (explorer.stream): the same forward-only scores as whole-model
analysis on the tiny models (GQA LLaMA, BERT and the others, float32 and bfloat16), the dispatch
from `analyze(streamed=True)`, a clear error for gradient metrics, the memory formula, and the
big-model bench's smoke run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, tiny_lm
from explorer.config import AnalysisConfig
from explorer.errors import Cancelled, ExplorerError
from explorer.importance import analyze
from explorer.models import cast_model
from explorer.stream import LLAMA_SHAPES, STREAMED_METRICS, analyze_streamed, llama_params, memory_estimate

ROOT = Path(__file__).resolve().parent.parent
# varying lengths: every batch of 4 has padding; 10 texts -> batches of 4, 4, 2
TEXTS = [" ".join(f"w{3 + (7 * i + 5 * j) % 117}" for j in range(3 + i % 9)) for i in range(10)]
LABELS = [i % 2 for i in range(10)]


def make_lm(arch: str, dtype: torch.dtype | None = None):
    """A tiny model with its blocks' weights redrawn at std 0.2, so that every block changes the
    residual stream a lot (with the default init -cos stays near -1 and a wrong score could pass)."""
    lm = tiny_lm(arch)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lm.adapter.layers(lm.model):
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.2)
    if dtype is not None:
        cast_model(lm.model, dtype)
    return lm


def labels_for(lm):
    return LABELS if lm.task == "classification" else None


def assert_same(whole, streamed, rtol: float, atol: float = 0.0):
    assert whole.tokens == streamed.tokens and whole.samples == streamed.samples
    for name in ("layer_cos", "attn_cos", "mlp_cos"):
        np.testing.assert_allclose(getattr(streamed, name), getattr(whole, name), rtol=rtol, atol=atol, err_msg=name)
    assert set(streamed.heads) == set(STREAMED_METRICS)
    for m in STREAMED_METRICS:
        for kind in ("heads", "groups", "neurons"):
            for i, (w, s) in enumerate(zip(getattr(whole, kind)[m], getattr(streamed, kind)[m])):
                assert w.shape == s.shape
                np.testing.assert_allclose(s, w, rtol=rtol, atol=atol * float(np.abs(w).max()),
                                           err_msg=f"{m} {kind} layer {i}")
    assert streamed.params == whole.params


@pytest.mark.parametrize("arch", sorted(TINY))
def test_streamed_equals_whole_model(arch):
    """Cosine importance (block, attention, MLP), magnitude_l1/l2 and fluctuation: the same values
    block by block on cached activations as from the whole model's forward (float32 rounding)."""
    lm = make_lm(arch)
    cfg = AnalysisConfig(batch_size=4, metric="fluctuation")
    whole = analyze(lm, TEXTS, labels_for(lm), cfg)
    streamed = analyze_streamed(lm, TEXTS, labels_for(lm), cfg)
    assert streamed.n_layers == whole.n_layers == 3
    assert np.ptp(whole.layer_cos) > 1e-3, "the layers should differ"
    assert_same(whole, streamed, rtol=1e-5, atol=1e-6)
    assert streamed.metric == "fluctuation" and streamed.unit_scores() is not None


def test_streamed_equals_whole_model_bfloat16_gqa():
    """A bfloat16 GQA LLaMA: statistics in float32 either way, the same numbers."""
    lm = make_lm("llama", torch.bfloat16)
    assert lm.adapter.block(lm.model, 0).heads_per_group == 2
    cfg = AnalysisConfig(batch_size=4, metric="magnitude_l2")
    whole, streamed = analyze(lm, TEXTS, None, cfg), analyze_streamed(lm, TEXTS, None, cfg)
    assert_same(whole, streamed, rtol=1e-4, atol=1e-5)
    assert all(v.dtype == np.float64 for v in streamed.neurons["fluctuation"])


def test_analyze_dispatches_on_streamed(monkeypatch):
    lm = make_lm("bert")
    calls = []
    import explorer.stream as S
    real = S.analyze_streamed
    monkeypatch.setattr(S, "analyze_streamed", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = AnalysisConfig(batch_size=4, metric="fluctuation", streamed=True)
    seen = []
    imp = analyze(lm, TEXTS, LABELS, cfg, progress=lambda i, n: seen.append((i, n)))
    assert calls == [1] and seen == [(1, 3), (2, 3), (3, 3)]
    assert_same(analyze(lm, TEXTS, LABELS, replace(cfg, streamed=False)), imp, rtol=1e-5, atol=1e-6)
    # the metrics= argument of analyze() is checked too (PruningRun's layer drop asks for magnitude_l1)
    assert set(analyze(lm, TEXTS, None, replace(cfg, metric="magnitude_l1"), metrics=("magnitude_l1",)).heads) \
        == set(STREAMED_METRICS)


@pytest.mark.parametrize("metric", ["taylor", "fisher", "act_grad", "apt", "taylor_vector"])
def test_streamed_refuses_gradient_metrics(metric):
    lm = make_lm("llama")
    with pytest.raises(ExplorerError) as e:
        analyze(lm, TEXTS, None, AnalysisConfig(batch_size=4, metric=metric, streamed=True))
    msg = str(e.value)
    assert metric in msg and "streamed" in msg
    for m in STREAMED_METRICS:
        assert m in msg
    with pytest.raises(ExplorerError, match="magnitude_l1, magnitude_l2, fluctuation"):
        analyze(lm, TEXTS, None, AnalysisConfig(batch_size=4, metric="fluctuation", streamed=True),
                metrics=("fluctuation", metric))
    with pytest.raises(ExplorerError, match="unknown metric"):
        analyze(lm, TEXTS, None, AnalysisConfig(metric="nonsense", streamed=True))


def test_streamed_leaves_the_model_as_it_was_and_can_stop():
    lm = make_lm("llama")
    lm.model.train()
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    before = {n: p.detach().clone() for n, p in lm.model.state_dict().items()}
    cfg = AnalysisConfig(batch_size=4, metric="fluctuation", streamed=True)
    analyze(lm, TEXTS, None, cfg)
    assert lm.model.training
    assert flags == {n: p.requires_grad for n, p in lm.model.named_parameters()}
    assert all(p.grad is None for p in lm.model.parameters())
    for n, p in lm.model.state_dict().items():
        assert torch.equal(p, before[n]), n
    hooks = [m for m in lm.model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooks, "hooks left behind"
    calls = []
    with pytest.raises(Cancelled):
        analyze(lm, TEXTS, None, cfg, should_stop=lambda: calls.append(1) or len(calls) > 1)
    assert not [m for m in lm.model.modules() if m._forward_hooks or m._forward_pre_hooks]
    with pytest.raises(ExplorerError, match="no calibration texts"):
        analyze_streamed(lm, [], None, cfg)


# --- the memory formula ------------------------------------------------------------------------

def test_llama_params_match_the_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=200, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    assert llama_params(shape)["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("mode", ["streamed", "whole"])
def test_memory_estimate_is_monotone(mode):
    base = LLAMA_SHAPES["1B"]
    peak = lambda **kw: memory_estimate({**base, **kw}, 1024, "bfloat16", mode)["peak"]  # noqa: E731
    layers = [peak(num_hidden_layers=n) for n in (4, 8, 16, 22, 32)]
    hidden = [peak(hidden_size=h) for h in (1024, 2048, 3072, 4096)]
    ffn = [peak(intermediate_size=c) for c in (2816, 5632, 11264)]
    for xs in (layers, hidden, ffn):
        assert all(a < b for a, b in zip(xs, xs[1:])), xs
    tokens = [memory_estimate(base, t, "bfloat16", mode, seq_len=128)["peak"] for t in (1024, 8192, 65536)]
    assert all(a <= b for a, b in zip(tokens, tokens[1:])), tokens
    assert memory_estimate(base, 1024, "float32", mode)["peak"] > memory_estimate(base, 1024, "bfloat16", mode)["peak"]


def test_memory_estimate_1b_is_sane():
    cfg = LLAMA_SHAPES["1B"]
    s = memory_estimate(cfg, 1024, "bfloat16", "streamed")
    w = memory_estimate(cfg, 1024, "bfloat16", "whole")
    assert 1.05e9 < s["params"] < 1.15e9  # TinyLlama-1.1B
    assert 1.9 < s["weights_gib"] < 2.2
    assert 1.3 < s["ratio"] < 2.5, s  # the bound for streamed analysis + reconstruction
    assert 3.5 < w["ratio"] < 7, w  # gradients and their float32 sum: several times the weights
    assert w["peak"] > s["peak"] + 2 * 2**30
    # the parts add up to the peak as the docstring says
    p = s["parts"]
    assert s["peak"] == int(p["weights"] + p["cache"] + max(p["block"], p["recon"]))
    # reconstruction's float64 statistics of down_proj (5632 wide): a few C x C matrices
    assert 4 * 5632**2 * 8 < p["recon"] < 10 * 5632**2 * 8
    # cheaper reconstruction settings never need more
    fixed = memory_estimate(cfg, 1024, "bfloat16", "streamed", lam_search=False, obs=False)
    assert fixed["peak"] < s["peak"]
    for big in ("8B", "70B"):
        e = memory_estimate(LLAMA_SHAPES[big], 1024, "bfloat16", "streamed")
        assert e["ratio"] < 2.5 and e["peak"] > s["peak"]
    with pytest.raises(ValueError):
        memory_estimate(cfg, 1024, "bfloat16", "sideways")


# --- the bench -------------------------------------------------------------------------------------

def test_bigmodel_bench_smoke(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "bench.bigmodel", "--smoke", "--modes", "streamed,whole,defaults",
                           "--probe-layers", "1", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "bigmodel.json").read_text())
    runs = {r["mode"]: r for r in data["runs"]}
    assert set(runs) == {"streamed", "whole", "defaults"}
    for r in runs.values():
        assert "error" not in r, r
        assert r["peak_rss"] > r["weight_bytes"] > 0 and r["ratio"] > 0
        assert r["tokens"] == 4 * 16 and r["removed_fraction"] > 0.1
        assert len(r["recon_block_seconds"]) == r["shape"]["layers"]
        assert r["estimate"]["peak"] > 0
    assert runs["streamed"]["metric"] == "fluctuation" and runs["whole"]["metric"] == "taylor"
    assert "taylor" in runs["whole"]["metrics"] and "taylor" not in runs["streamed"]["metrics"]
    assert len(runs["streamed"]["analysis_block_seconds"]) == 2
    assert "extrapolated" in runs["defaults"] and runs["defaults"]["extrapolated"]["layers"] == 2
    assert {r["model"] for r in data["estimates"]} == {"1B", "8B", "70B"}
    md = (tmp_path / "BIGMODEL.md").read_text()
    for part in ("## GPU and big models", "python -m bench.bigmodel --smoke", "| 70B |", "extrapolated",
                 "load average before/after"):
        assert part in md, part
    # --rewrite recomputes the estimates from the saved measurements, without running anything
    proc = subprocess.run([sys.executable, "-m", "bench.bigmodel", "--rewrite", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((tmp_path / "bigmodel.json").read_text())
    assert [r["peak_rss"] for r in again["runs"]] == [r["peak_rss"] for r in data["runs"]]
    assert again["meta"]["date"] == data["meta"]["date"] and "rewritten" in again["meta"]
    assert "Estimates recomputed" in (tmp_path / "BIGMODEL.md").read_text()
