"""Sensitivity analysis: one quality-vs-sparsity curve per layer, the model left unchanged."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_data, tiny_lm
from explorer.errors import Cancelled, ExplorerError
from explorer.sensitivity import most_sensitive, sensitivity, unit_counts, val_quality


def _state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


@pytest.mark.parametrize("name,kind", [("gpt2", "structured"), ("llama", "structured"), ("bert", "structured"),
                                       ("llama", "unstructured")])
def test_one_curve_per_layer_starting_at_dense(name, kind):
    lm, data = tiny_lm(name), tiny_data()
    before = _state(lm)
    calls = []
    res = sensitivity(lm, data, [0.3, 0.7], metric="taylor", eval_samples=64, kind=kind,
                      progress=lambda d, t: calls.append((d, t)), calibration_samples=8)
    assert res["metric"] == ("accuracy" if name == "bert" else "perplexity")
    assert [l["index"] for l in res["layers"]] == [0, 1, 2]
    for layer in res["layers"]:
        assert layer["sparsity"] == [0.0, 0.3, 0.7]
        assert layer["quality"][0] == res["dense"]
        assert len(layer["quality"]) == 3
    assert res["dense"] == val_quality(lm, data, 64)
    assert calls[-1] == (6, 6)
    after = _state(lm)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    if name != "bert":  # pruning a random LM's layer moves perplexity
        assert any(l["quality"][2] != res["dense"] for l in res["layers"])
    assert sorted(most_sensitive(res, 0.7)) == [0, 1, 2]


def test_unit_counts_follow_the_budget():
    layer = {"groups": 4, "n_neurons": 64, "group_params": 100, "neuron_params": 10, "block_params": 1100}
    assert unit_counts(layer, 0.0) == (4, 64)
    g, n = unit_counts(layer, 0.5)
    assert g == 2 and abs((1100 - (4 - g) * 100 - (64 - n) * 10) - 550) <= 5
    assert unit_counts(layer, 0.99) == (1, 1)


def test_stop_and_bad_input_restore_the_model():
    lm, data = tiny_lm("llama"), tiny_data()
    before = _state(lm)
    with pytest.raises(Cancelled):
        sensitivity(lm, data, [0.5], eval_samples=32, should_stop=lambda: True, calibration_samples=4,
                    metric="magnitude_l1")
    assert all(torch.equal(before[k], v) for k, v in _state(lm).items())
    with pytest.raises(ExplorerError, match="sparsities"):
        sensitivity(lm, data, [1.5])
    with pytest.raises(ExplorerError, match="layers"):
        sensitivity(lm, data, [0.5], layers=[7])
