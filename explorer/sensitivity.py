"""Sensitivity analysis (Distiller style): how much does quality drop when one layer alone is
pruned to a given sparsity?

For every block L and every sparsity s: prune block L only, one-shot, no recovery, and measure
quality on the **val** split (accuracy on its first `eval_samples` examples for classifiers,
perplexity on up to `eval_samples` tokens for LMs). Each measurement runs on a copy of that one
block, put back afterwards, so the model is unchanged when the function returns.

  kind="structured" (default): s is the fraction of the block's parameters removed, as whole
      attention units (KV groups) and FFN neurons, chosen like the allocation does
      (round((1-s)·G) groups, neurons fill the rest of the budget, at least one of each), the
      least salient by `metric` (units scored once on the dense model with calibration data);
  kind="unstructured": s is the fraction of each Linear weight matrix of the block set to zero
      by magnitude (|W|, lowest first).

Result: {"metric": "accuracy"|"perplexity", "salience": metric, "kind", "sparsities",
"dense": quality of the unpruned model, "layers": [{"index", "sparsity": [0, s1, ...],
"quality": [dense, q1, ...]}]} — every curve starts at sparsity 0 with the dense value.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import numpy as np
import torch

from .config import LABEL_FREE_METRICS, METRICS, AnalysisConfig
from .data import TextData
from .errors import Cancelled, ExplorerError
from .evaluate import accuracy, metric_name, perplexity
from .importance import analyze
from .models import LoadedModel
from .pruning import choose_units
from .surgery import prune_block

DEFAULT_SPARSITIES = (0.1, 0.3, 0.5, 0.7, 0.9)


def val_quality(lm: LoadedModel, data: TextData, eval_samples: int = 0) -> float:
    """Accuracy (classifiers) or perplexity (LMs) on the val split."""
    if lm.task == "classification":
        if not data.has_labels:
            raise ExplorerError("accuracy needs a labelled data set")
        n = eval_samples or len(data.texts["val"])
        return accuracy(lm, data.texts["val"][:n], data.labels["val"][:n])
    if lm.task == "causal-lm":
        return perplexity(lm, data.texts["val"], max_tokens=eval_samples or 16384)
    raise ExplorerError("sensitivity needs a task head (classification or causal LM) to measure quality")


def unit_counts(layer: dict, sparsity: float) -> tuple[int, int]:
    """Attention units and neurons a block keeps at `sparsity` of its parameters (as allocate)."""
    G, N, pg, pn, P = (layer[k] for k in ("groups", "n_neurons", "group_params", "neuron_params", "block_params"))
    fixed = P - G * pg - N * pn
    g = int(min(G, max(1, round((1 - sparsity) * G))))
    n = (1 - sparsity) * P - fixed - g * pg
    return g, int(min(N, max(1, math.floor(n / pn + 0.5))))


def _zero_lowest(block: torch.nn.Module, sparsity: float) -> None:
    with torch.no_grad():
        for m in block.modules():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.nn.Parameter) and w.dim() == 2:
                k = int(round(sparsity * w.numel()))
                if k:
                    idx = torch.argsort(w.detach().abs().flatten(), stable=True)[:k]
                    w.view(-1)[idx] = 0


def sensitivity(lm: LoadedModel, data: TextData, sparsities=DEFAULT_SPARSITIES, metric: str = "taylor",
                eval_samples: int = 200, progress: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], bool] | None = None, kind: str = "structured",
                calibration_samples: int = 64, layers: list[int] | None = None, seed: int = 0) -> dict:
    """One quality-vs-sparsity curve per layer (see the module docstring). `metric` is the
    salience metric that picks the units (structured only); label-free magnitude_l1 is used
    for models without a task head. `progress(done, total)` after each measurement;
    `should_stop()` -> True raises Cancelled (the model is restored first)."""
    if kind not in ("structured", "unstructured"):
        raise ExplorerError(f"unknown kind '{kind}': use structured or unstructured")
    if metric not in METRICS:
        raise ExplorerError(f"unknown metric '{metric}': use one of {', '.join(METRICS)}")
    sp = sorted({float(s) for s in sparsities} - {0.0})
    if not sp or any(not (0 < s < 1) for s in sp):
        raise ExplorerError(f"sparsities must lie in (0, 1), got {list(sparsities)}")
    t0 = time.perf_counter()
    model, adapter = lm.model, lm.adapter
    n_layers = len(adapter.layers(model))
    layers = list(range(n_layers)) if layers is None else [int(i) for i in layers]
    if any(not (0 <= i < n_layers) for i in layers):
        raise ExplorerError(f"layers must lie in 0..{n_layers - 1}, got {layers}")
    dense = val_quality(lm, data, eval_samples)
    imp = None
    if kind == "structured":
        texts, labels = data.calibration(calibration_samples, seed=seed)
        if lm.task != "classification":
            labels = None
        grads_ok = lm.task == "causal-lm" or labels is not None
        if metric not in LABEL_FREE_METRICS and not grads_ok:
            metric = "magnitude_l1"
        imp = analyze(lm, texts, labels, AnalysisConfig(samples=len(texts), metric=metric), metrics=(metric,),
                      should_stop=should_stop)
    total, done = len(layers) * len(sp), 0
    curves = []
    module_list = adapter.layers(model)
    was_training = model.training
    try:
        for i in layers:
            original = module_list[i]
            quality = [dense]
            try:
                for s in sp:
                    if should_stop and should_stop():
                        raise Cancelled()
                    module_list[i] = copy.deepcopy(original)
                    if kind == "structured":
                        g, n = unit_counts(imp.params[i], s)
                        prune_block(adapter, model, i, choose_units(imp.groups[metric][i], g),
                                    choose_units(imp.neurons[metric][i], n))
                    else:
                        _zero_lowest(module_list[i], s)
                    quality.append(val_quality(lm, data, eval_samples))
                    done += 1
                    if progress:
                        progress(done, total)
            finally:
                module_list[i] = original
            curves.append({"index": i, "sparsity": [0.0] + sp, "quality": quality})
    finally:
        model.train(was_training)
    return {"metric": metric_name(lm), "salience": metric if kind == "structured" else "magnitude",
            "kind": kind, "sparsities": [0.0] + sp, "dense": dense, "eval_split": "val",
            "eval_samples": eval_samples, "seconds": time.perf_counter() - t0, "layers": curves}


def most_sensitive(result: dict, at: float = 0.5) -> list[int]:
    """Layer indices ordered from most to least sensitive at sparsity `at` (the nearest
    measured one): biggest accuracy loss / perplexity rise first."""
    sign = -1 if result["metric"] == "accuracy" else 1
    out = []
    for layer in result["layers"]:
        j = int(np.argmin([abs(s - at) for s in layer["sparsity"]]))
        out.append((sign * (layer["quality"][j] - result["dense"]), layer["index"]))
    return [i for _, i in sorted(out, key=lambda t: (-t[0], t[1]))]
