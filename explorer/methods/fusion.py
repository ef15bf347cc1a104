"""Adaptive estimation fusion (seed `adaptive-estimation-fusion-summary.md`; arXiv 2403.10799,
Liu et al., "Efficient Pruning of Large Language Model with Adaptive Estimation Fusion", later
versions "Toward Adaptive LLM Structured Pruning via Hybrid-grained Weight Importance Assessment"
(HyWIA, AAAI 2025)): fuse a coarse (vector-wise) and a fine (element-wise) first-order Taylor
estimate with weights adapted per sub-structure, then prune as Adapt-Pruner (per-layer
allocation, stages, recovery).

  coarse  C_u = |Σ_{w∈u} w·∂L/∂w|     (metric "taylor_vector": the unit as one vector)
  fine    F_u = Σ_{w∈u} |w·∂L/∂w|     (metric "taylor": element by element)

A sub-structure s is one (layer, kind) pair, kind = attention or MLP. Within s each estimate
is divided by its mean over the units of s (scale-free, mean 1): c, f (n units).

Where the rule comes from. The paper's method section (its fusion formula) is not in the
stored corpora we could search; what is there is its abstract ("adaptively fuse coarse-grained
and fine-grained estimations based on the results from complex and multilayer structures";
v5: "Leveraging an attention mechanism, HyWIA adaptively determines the optimal blend of
granularity") and the seed document (per sub-structure, coarse = global relevance of the
structure, fine = local gradient detail, fused adaptively, end to end). The default rule below
is **our reading** of that, not a transcription of the paper's equations:

  fusion_rule "attention" (default): parameter-free scaled dot-product attention over the two
  estimates of s, the query being their consensus q = (c + f)/2, keys = values = {c, f}:
      e_c = ⟨q, c⟩ / (n·τ),   e_f = ⟨q, f⟩ / (n·τ),   (a_c, a_f) = softmax(e_c, e_f),
      I_u = a_c · c_u + a_f · f_u.
  Since c and f have mean 1, e_c - e_f = (Var c - Var f) / (2τ): the granularity that tells
  the units of s apart more sharply gets more weight, a_c = σ((Var c - Var f) / (2τ)); each
  layer and each operator gets its own mix (τ = fusion_temperature, default 1). One pass over
  the stage's calibration samples.

  fusion_rule "inverse-variance" (our own variant, labelled as such): the samples are split into
  two interleaved halves a and b, both estimates computed on each, normalised as above (c_a, c_b,
  f_a, f_b); split-half noise σ_c² = mean_u (c_a - c_b)² / 4, σ_f² likewise;
      w_c = σ_f² / (σ_c² + σ_f²)   (1/2 when both are 0),   I_u = w_c (c_a+c_b)/2 + (1-w_c)(f_a+f_b)/2.

Both rules report w_coarse per (layer, kind) and the rank agreement (Spearman ρ of the two
normalised estimates; diagnostic only: when ρ ≈ 1 the mix hardly matters). Query heads (display
only) use their sub-structure's weights.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..config import FusionOptions
from ..errors import ExplorerError
from ..importance import Importance
from .base import MethodRun, normalized_scores

WHERE = (("attention", "groups"), ("mlp", "neurons"))
RULES = {"attention": "attention: softmax of <(c+f)/2, c>/(n tau) and <(c+f)/2, f>/(n tau) per (layer, kind) "
                      "(our reading of arXiv 2403.10799 / the seed document; the paper's exact formula was not available)",
         "inverse-variance": "inverse-variance (split-half) weighting of coarse and fine Taylor per (layer, kind) "
                             "(our own variant)"}


def attention_weights(coarse, fine, temperature: float = 1.0) -> tuple[float, float]:
    """(a_c, a_f) of the attention rule for one sub-structure from its raw coarse and fine
    estimates (normalised to mean 1 here): softmax over ⟨q, c⟩/(nτ), ⟨q, f⟩/(nτ), q = (c+f)/2."""
    c, f = normalized_scores(coarse), normalized_scores(fine)
    n = max(len(c), 1)
    q = (c + f) / 2
    e = np.array([q @ c, q @ f]) / (n * temperature)
    e = np.exp(e - e.max())
    a = e / e.sum()
    return float(a[0]), float(a[1])


def attention_fuse(coarse, fine, temperature: float = 1.0) -> tuple[np.ndarray, float]:
    """(fused scores a_c·c + a_f·f, a_c) for one sub-structure."""
    a_c, a_f = attention_weights(coarse, fine, temperature)
    return a_c * normalized_scores(coarse) + a_f * normalized_scores(fine), a_c


def fusion_weight(c_a, c_b, f_a, f_b) -> float:
    """w_c of the inverse-variance variant: the coarse estimate's weight from split-half noise."""
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


def fuse_attention(imp: Importance, temperature: float = 1.0, name: str = "fused") -> tuple[Importance, dict]:
    """imp with metric `name` fused by the attention rule, and {"w_coarse", "agreement"} per
    layer as [attention, mlp]."""
    heads, groups, neurons = [], [], []
    w_coarse, agreement = [], []
    for i in range(imp.n_layers):
        wl, al = [], []
        for kind, where in WHERE:
            src = getattr(imp, where)
            fused, a_c = attention_fuse(src["taylor_vector"][i], src["taylor"][i], temperature)
            (groups if where == "groups" else neurons).append(fused)
            if kind == "attention":
                heads.append(a_c * normalized_scores(imp.heads["taylor_vector"][i])
                             + (1 - a_c) * normalized_scores(imp.heads["taylor"][i]))
            wl.append(a_c)
            al.append(spearman(normalized_scores(src["taylor_vector"][i]), normalized_scores(src["taylor"][i])))
        w_coarse.append(wl)
        agreement.append(al)
    imp.heads[name], imp.groups[name], imp.neurons[name] = heads, groups, neurons
    imp.metric = name
    return imp, {"w_coarse": w_coarse, "agreement": agreement}


def fuse(a: Importance, b: Importance, name: str = "fused") -> tuple[Importance, dict]:
    """The inverse-variance variant: the fused Importance (metric `name`, plus the half-averaged
    taylor / taylor_vector) and the per-sub-structure weights {"w_coarse": [[attn, mlp] per layer],
    "agreement": same}."""
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
    Options = FusionOptions

    def _importance(self, k: int) -> Importance:
        texts, labels = self._calibration(k)
        rule = self.opts.fusion_rule
        if rule == "attention":
            imp, weights = fuse_attention(self._analyze(texts, labels, ("taylor", "taylor_vector")),
                                          self.opts.fusion_temperature)
        else:
            if len(texts) < 2:
                raise ExplorerError("the inverse-variance fusion rule needs at least 2 calibration samples (two halves)")
            halves = []
            for h in (0, 1):
                t = texts[h::2]
                lab = labels[h::2] if labels is not None else None
                halves.append(self._analyze(t, lab, ("taylor", "taylor_vector")))
            imp, weights = fuse(*halves)
        self.fusion_weights.append({"stage": k, "rule": rule, **weights})
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
        self.summary = {"rule": RULES[self.opts.fusion_rule], "fusion_rule": self.opts.fusion_rule,
                        "temperature": self.opts.fusion_temperature, "weights": self.fusion_weights}


def make(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
    opts = opts or FusionOptions()
    return FusionRun(lm, data, analysis, allocation, prune, opts=opts,
                     label=label or f"fusion ({opts.fusion_rule}) A={allocation.amplitude:g}", **run_kw)
