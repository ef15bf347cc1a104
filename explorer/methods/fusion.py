"""Adaptive estimation fusion (seed `adaptive-estimation-fusion-summary.md`): fuse a coarse
(vector-wise) and a fine (element-wise) first-order Taylor estimate with weights adapted per
sub-structure, then prune as Adapt-Pruner (per-layer allocation, stages, recovery).

  coarse  C_u = |Σ_{w∈u} w·∂L/∂w|     (metric "taylor_vector": the unit as one vector)
  fine    F_u = Σ_{w∈u} |w·∂L/∂w|     (metric "taylor": element by element)

The exact rule. A sub-structure s is one (layer, kind) pair, kind = attention or MLP. The
stage's calibration samples are split into two interleaved halves a and b, and both estimates
are computed on each half. Within s each estimate is divided by its mean over the units of s
(scale-free, mean 1): c_a, c_b, f_a, f_b. The estimation noise of each is measured by the
split-half disagreement, the variance of the mean of two halves being
    σ_c² = mean_u (c_a - c_b)² / 4,     σ_f² = mean_u (f_a - f_b)² / 4,
and the two are fused by inverse-variance (precision) weighting:
    w_c = σ_f² / (σ_c² + σ_f²)    (w_c = 1/2 when both are 0),   w_f = 1 - w_c,
    I_u = w_c · (c_a + c_b)/2 + w_f · (f_a + f_b)/2.
So in a sub-structure where the coarse estimate is stable across data and the fine one is not,
the coarse one dominates, and vice versa; each layer and each operator gets its own mix. The
rank agreement of the two estimates (Spearman ρ of (c_a+c_b)/2 and (f_a+f_b)/2) is reported
per sub-structure next to the weights (diagnostic only: when ρ ≈ 1 the mix hardly matters).
Query heads (display only) use their sub-structure's weights. Layer cosine importance is the
mean of the two halves.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..errors import ExplorerError
from ..importance import Importance
from .base import MethodRun, normalized_scores

WHERE = (("attention", "groups"), ("mlp", "neurons"))


def fusion_weight(c_a, c_b, f_a, f_b) -> float:
    """w_c: the coarse estimate's weight from split-half noise (inverse-variance rule)."""
    var_c = float(np.mean((np.asarray(c_a) - np.asarray(c_b)) ** 2)) / 4
    var_f = float(np.mean((np.asarray(f_a) - np.asarray(f_b)) ** 2)) / 4
    if var_c + var_f <= 0:
        return 0.5
    return var_f / (var_c + var_f)


def spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2:
        return 1.0
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if rx.std() == 0 or ry.std() == 0:
        return 1.0
    return float(np.corrcoef(rx, ry)[0, 1])


def fuse(a: Importance, b: Importance, name: str = "fused") -> tuple[Importance, dict]:
    """The fused Importance (metric `name`, plus the half-averaged taylor / taylor_vector) and
    the per-sub-structure weights {"w_coarse": [[attn, mlp] per layer], "agreement": same}."""
    L = a.n_layers
    heads, groups, neurons = {}, {}, {}
    for m in ("taylor", "taylor_vector"):
        heads[m] = [(x + y) / 2 for x, y in zip(a.heads[m], b.heads[m])]
        groups[m] = [(x + y) / 2 for x, y in zip(a.groups[m], b.groups[m])]
        neurons[m] = [(x + y) / 2 for x, y in zip(a.neurons[m], b.neurons[m])]
    heads[name], groups[name], neurons[name] = [], [], []
    w_coarse, agreement = [], []
    for i in range(L):
        wl, al = [], []
        for kind, where in WHERE:
            src_a, src_b = getattr(a, where), getattr(b, where)
            c_a, c_b = normalized_scores(src_a["taylor_vector"][i]), normalized_scores(src_b["taylor_vector"][i])
            f_a, f_b = normalized_scores(src_a["taylor"][i]), normalized_scores(src_b["taylor"][i])
            w = fusion_weight(c_a, c_b, f_a, f_b)
            fused = w * (c_a + c_b) / 2 + (1 - w) * (f_a + f_b) / 2
            (groups if where == "groups" else neurons)[name].append(fused)
            if kind == "attention":
                hc, hf = ((normalized_scores(a.heads[m][i]) + normalized_scores(b.heads[m][i])) / 2
                          for m in ("taylor_vector", "taylor"))
                heads[name].append(w * hc + (1 - w) * hf)
            wl.append(w)
            al.append(spearman((c_a + c_b) / 2, (f_a + f_b) / 2))
        w_coarse.append(wl)
        agreement.append(al)
    imp = Importance((a.layer_cos + b.layer_cos) / 2, (a.attn_cos + b.attn_cos) / 2, (a.mlp_cos + b.mlp_cos) / 2,
                     groups, heads, neurons, name, samples=a.samples + b.samples, tokens=a.tokens + b.tokens,
                     seconds=a.seconds + b.seconds, params=a.params)
    return imp, {"w_coarse": w_coarse, "agreement": agreement}


class FusionRun(MethodRun):
    method = "fusion"

    def _importance(self, k: int) -> Importance:
        texts, labels = self._calibration(k)
        if len(texts) < 2:
            raise ExplorerError("fusion needs at least 2 calibration samples (two halves)")
        halves = []
        for h in (0, 1):
            t = texts[h::2]
            lab = labels[h::2] if labels is not None else None
            halves.append(self._analyze(t, lab, ("taylor", "taylor_vector")))
        imp, weights = fuse(*halves)
        self.fusion_weights.append({"stage": k, **weights})
        return imp

    def _body(self) -> Iterator[dict]:
        if self.lm.task not in ("classification", "causal-lm"):
            raise ExplorerError("Taylor estimates need gradients: use a classifier or a causal LM")
        self.fusion_weights: list[dict] = []
        for ev in self._structured_stages(self._importance):
            if ev["type"] == "analysis":
                ev["fusion"] = self.fusion_weights[-1]
            if ev["type"] == "stage":
                ev["record"].extra = self.fusion_weights[-1]
            yield ev
        self.summary = {"rule": "inverse-variance (split-half) weighting of coarse and fine Taylor per (layer, kind)",
                        "weights": self.fusion_weights}


def make(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
    return FusionRun(lm, data, analysis, allocation, prune, opts=opts, label=label or f"fusion A={allocation.amplitude:g}", **run_kw)
