"""Importance analysis: per-layer cosine importance and per-unit salience, all metrics from
one pass over the calibration data (forward, plus one backward per batch when a metric
needs gradients).

Layer importance (Adapt-Pruner reference): I_L = -cos(h_in, h_out), where h_in/h_out are
the block's input and output *including* the residual stream, averaged over non-padding
tokens. Normalised (`normalize`, AllocationConfig.normalization) onto [-1, 1]:
  maxabs   Î_L = (I_L - mean I) / max|I_L - mean I|  (the reference)
  rank     ranks of I_L (ties averaged) mapped linearly onto [-1, 1]  (departure)
  zscore   clip((I_L - mean I) / (2 std I), -1, 1)  (departure; std over layers, ddof 0)
maxabs lets one outlier layer take Î = ±1 and squeeze the others towards 0; rank and zscore
spread them.

Unit salience metrics (one score per attention unit / query head / FFN neuron; higher =
more important), each a small function of per-unit sums over the coupled parameters:
  magnitude_l1   Σ|W|
  magnitude_l2   sqrt(Σ W²)
  taylor         Σ|W ⊙ G|,  G = ∂L/∂W summed over calibration batches  (first order)
  taylor_vector  |Σ W ⊙ G|  (coarse, vector-wise first order, used by fusion)
  fisher         ½ Σ_b Σ (W ⊙ g_b)²  (second order, diagonal Fisher from per-batch grads)
  act_grad       Σ_samples |Σ_tokens,channels H ⊙ ∂L/∂H|  (activation x gradient of the unit's output)
  apt            Σ|∂L/∂H|·Σ|H| + sqrt(kurtosis(W_:j ∘ X_j))  (APT outlier-aware; each term divided
                 by its mean over the layer's units before adding: a departure, so that
                 neither term swamps the other)
  fluctuation    Σ_j Var_tokens(X_j)·||W_:j||²  (FLAP, An et al. 2024; forward only, no labels), X the
                 out_module input (the units' activations), W_:j the out_module weights that read
                 channel j, the variance the population one (divide by N) over the non-padding
                 calibration tokens: the mean squared change of the residual stream per token when
                 the unit is removed and its mean output folded into the bias (FLAP's compensation)

The scores that a salience split may compare across attention and FFN (LOSS_METRICS): taylor,
taylor_vector, fisher and act_grad (loss estimates) and fluctuation (squared output error,
one scale for both kinds too).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .adapters import Block, UnitGroup
from .config import LABEL_FREE_METRICS, METRICS, NORMALIZATIONS, AnalysisConfig
from .errors import Cancelled, ExplorerError
from .models import LoadedModel

GRAD_METRICS = ("taylor", "taylor_vector", "fisher", "act_grad", "apt")
# Estimates of what a unit's removal costs, on one scale for heads and neurons: the only scores a
# salience split may compare across attention and FFN. The first four estimate the loss added,
# fluctuation the squared residual-stream error (magnitudes are neither; apt and the methods'
# mixtures are rescaled per (layer, kind)).
LOSS_METRICS = ("taylor", "taylor_vector", "fisher", "act_grad", "fluctuation")


def normalize(values, method: str = "maxabs") -> np.ndarray:
    """Layer importance I -> Î in [-1, 1] (zeros if all equal), by `method`:
    maxabs (reference): (I - mean I) / max|I - mean I|, mean 0;
    rank: ranks of I (ties averaged) mapped linearly onto [-1, 1], mean 0;
    zscore: (I - mean I) / std I (ddof 0), halved and clipped to [-1, 1]."""
    v = np.asarray(values, dtype=np.float64)
    if method == "rank":
        return _rank_normalize(v)
    c = v - v.mean() if len(v) else v
    if method == "zscore":
        sd = c.std() if len(c) else 0.0
        return np.clip(c / (2 * sd), -1.0, 1.0) if sd > 0 else np.zeros_like(c)
    if method != "maxabs":
        raise ExplorerError(f"unknown normalisation '{method}': use one of {', '.join(NORMALIZATIONS)}")
    m = np.abs(c).max() if len(c) else 0.0
    return c / m if m > 0 else np.zeros_like(c)


def _rank_normalize(v: np.ndarray) -> np.ndarray:
    """Average ranks 0..n-1 of v (ties share their mean rank), mapped onto [-1, 1]."""
    n = len(v)
    if n < 2:
        return np.zeros_like(v)
    ranks = np.empty(n)
    ranks[np.argsort(v, kind="stable")] = np.arange(n)
    _, tie = np.unique(v, return_inverse=True)  # (n,) index of each value's tie class
    ranks = (np.bincount(tie, ranks) / np.bincount(tie))[tie]  # mean rank per tie class
    return 2 * ranks / (n - 1) - 1


@dataclass
class Importance:
    """Result of one analysis; per-layer lists because widths may differ between layers."""

    layer_cos: np.ndarray  # (L,) raw I_L = -cos(in, out)
    attn_cos: np.ndarray  # (L,) -cos(in, mid)
    mlp_cos: np.ndarray  # (L,) -cos(mid, out)
    groups: dict[str, list[np.ndarray]]  # metric -> per layer (n_groups,)
    heads: dict[str, list[np.ndarray]]  # metric -> per layer (n_query_heads,)
    neurons: dict[str, list[np.ndarray]]  # metric -> per layer (n_neurons,)
    metric: str
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    params: list[dict] = field(default_factory=list)  # per layer: params per group/neuron, totals

    @property
    def normalized(self) -> np.ndarray:
        """Î by the reference max-abs normalisation."""
        return normalize(self.layer_cos)

    def normalized_by(self, method: str = "maxabs") -> np.ndarray:
        """Î by `method` (AllocationConfig.normalization): maxabs, rank or zscore."""
        return normalize(self.layer_cos, method)

    @property
    def n_layers(self) -> int:
        return len(self.layer_cos)

    def unit_scores(self, metric: str | None = None) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """Per layer (KV-group scores, neuron scores): what `allocate(..., scores=)` takes; None
        when the metric puts attention and FFN on different scales (not in LOSS_METRICS: the loss
        estimates and fluctuation qualify)."""
        m = metric or self.metric
        return list(zip(self.groups[m], self.neurons[m])) if m in LOSS_METRICS else None

    def to_json(self, all_metrics: bool = False) -> dict:
        m = self.metric
        layers = []
        for i in range(self.n_layers):
            d = {"index": i, "cosine_importance": float(self.layer_cos[i]),
                 "normalized_importance": float(self.normalized[i]),
                 "attention_cosine_importance": float(self.attn_cos[i]),
                 "mlp_cosine_importance": float(self.mlp_cos[i]),
                 "heads": self.heads[m][i].tolist(), "kv_groups": self.groups[m][i].tolist(),
                 "neurons": self.neurons[m][i].tolist(), **self.params[i]}
            if all_metrics:
                d["by_metric"] = {k: {"heads": self.heads[k][i].tolist(), "kv_groups": self.groups[k][i].tolist(),
                                      "neurons": self.neurons[k][i].tolist()} for k in self.heads}
            layers.append(d)
        return {"metric": m, "metrics": sorted(self.heads), "samples": self.samples, "tokens": self.tokens,
                "seconds": round(self.seconds, 3), "layers": layers}

    @classmethod
    def from_json(cls, d: dict) -> "Importance":
        layers = d["layers"]
        m = d["metric"]
        per_layer = [l.get("by_metric") or {m: l} for l in layers]  # every metric, or just the chosen one
        heads = {k: [np.asarray(pl[k]["heads"], float) for pl in per_layer] for k in per_layer[0]}
        groups = {k: [np.asarray(pl[k]["kv_groups"], float) for pl in per_layer] for k in per_layer[0]}
        neurons = {k: [np.asarray(pl[k]["neurons"], float) for pl in per_layer] for k in per_layer[0]}
        keys = ("group_params", "neuron_params", "block_params", "groups", "heads_per_group", "n_neurons")
        return cls(np.asarray([l["cosine_importance"] for l in layers]),
                   np.asarray([l.get("attention_cosine_importance", 0.0) for l in layers]),
                   np.asarray([l.get("mlp_cosine_importance", 0.0) for l in layers]),
                   groups, heads, neurons, m, d.get("samples", 0), d.get("tokens", 0), d.get("seconds", 0.0),
                   [{k: l[k] for k in keys if k in l} for l in layers])


# --- per-unit reductions --------------------------------------------------------------

def unit_sums(t: torch.Tensor, s, n_units: int, unit_size: int | None = None) -> torch.Tensor:
    """Sum an elementwise tensor shaped like `s.param` over each unit's indices -> (n_units,)."""
    size = unit_size or s.unit_size
    x = t.narrow(s.dim, s.offset, n_units * size)  # the units' part along dim
    return x.movedim(s.dim, 0).reshape(n_units, -1).sum(1)


def head_and_group(group: UnitGroup, qpk: int, elementwise: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query-head and per-group sums of `elementwise(slice)` over all coupled slices.
    Query/output slices split into query heads; key/value slices are shared by the
    group's query heads and split evenly among them for display."""
    n = group.n_units
    per_head = torch.zeros(n * qpk, dtype=torch.float64)
    for s in group.slices:
        t = elementwise(s).double()
        if s.per_head and qpk > 1:
            per_head += unit_sums(t, s, n * qpk, s.unit_size // qpk)
        else:
            per_head += unit_sums(t, s, n).repeat_interleave(qpk) / qpk
    return per_head, per_head.view(n, qpk).sum(1)


def kurtosis_from_moments(m1, m2, m3, m4) -> torch.Tensor:
    """Kurtosis (not excess) from raw moments E[z^k]."""
    var = (m2 - m1 ** 2).clamp_min(1e-30)
    mu4 = m4 - 4 * m1 * m3 + 6 * m1 ** 2 * m2 - 3 * m1 ** 4
    return (mu4 / var ** 2).clamp_min(0)


# --- the pass ---------------------------------------------------------------------------

class _Recorder:
    """Forward/backward hooks over all blocks; accumulates everything in one pass. Unit
    activations (the out_modules' inputs) are hooked when gradients are computed or when
    `fluctuation` asks for their per-channel sums of x and x² (forward only)."""

    def __init__(self, lm: LoadedModel, blocks: list[Block], grads: bool, apt: bool, fluctuation: bool = False):
        self.lm, self.blocks, self.grads, self.apt, self.fluct = lm, blocks, grads, apt, fluctuation
        self.mask: torch.Tensor | None = None  # (B, T) of the current batch
        L = len(blocks)
        self.cos_sum = torch.zeros(L, 3, dtype=torch.float64)  # block, attention, mlp
        self.tokens = 0
        self.h_in: dict[int, torch.Tensor] = {}
        self.h_mid: dict[int, torch.Tensor] = {}
        self.act: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self.handles = []
        for b in blocks:
            i = b.index
            self.handles.append(b.module.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(b.mid_module.register_forward_hook(self._mid(i, b.mid_adds_input)))
            self.handles.append(b.module.register_forward_hook(self._post(i)))
            if grads or fluctuation:
                for g in (b.attn, b.mlp):
                    qpk = b.heads_per_group if g.kind == "attention" else 1
                    self.handles.append(g.out_module.register_forward_pre_hook(self._act(i, g, qpk)))

    def close(self):
        for h in self.handles:
            h.remove()

    @staticmethod
    def _first(x):
        return x[0] if isinstance(x, (tuple, list)) else x

    def _pre(self, i):
        def hook(module, args, kwargs):
            self.h_in[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def _mid(self, i, adds_input):
        def hook(module, args, out):
            mid = self._first(out).detach()
            self.h_mid[i] = self.h_in[i] + mid if adds_input else mid
        return hook

    def _masked_mean_cos(self, a, b):
        c = F.cosine_similarity(a.float(), b.float(), dim=-1)  # (B, T)
        return (c * self.mask).sum().double()

    def _post(self, i):
        def hook(module, args, out):
            h_out = self._first(out).detach()
            h_in, h_mid = self.h_in.pop(i), self.h_mid.pop(i)
            self.cos_sum[i, 0] += self._masked_mean_cos(h_in, h_out)
            self.cos_sum[i, 1] += self._masked_mean_cos(h_in, h_mid)
            self.cos_sum[i, 2] += self._masked_mean_cos(h_mid, h_out)
        return hook

    def _act(self, i, group: UnitGroup, qpk: int):
        key = (i, group.kind)
        n, size = group.n_units, group.act_unit_size
        n_heads, head_size = n * qpk, size // qpk

        def hook(module, args):
            x = args[0]  # (B, T, C) with C = n_units * act_unit_size
            st = self.act.setdefault(key, {})
            if self.fluct:
                _fluct_sums(st, x.detach(), self.mask)
            if not (self.grads and x.requires_grad):
                return
            m = self.mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
            xd = x.detach()
            _acc(st, "abs_x", (xd.abs() * m).sum((0, 1)))  # (C,)
            if self.apt:
                _acc(st, "n", m.sum())
                xm = xd.double() * m
                for k in range(1, 5):
                    _acc(st, f"x{k}", (xm ** k).sum((0, 1)))  # raw moment sums (C,)

            def grad_hook(g):  # g: (B, T, C)
                gm = g.detach() * m
                _acc(st, "abs_g", gm.abs().sum((0, 1)))
                xg = (xd * gm).sum(1)  # (B, C): per-sample first-order effect per channel
                B = xg.shape[0]
                _acc(st, "ag_head", xg.view(B, n_heads, head_size).sum(-1).abs().sum(0))
                _acc(st, "ag_group", xg.view(B, n, size).sum(-1).abs().sum(0))
            x.register_hook(grad_hook)
        return hook


def _acc(d: dict, k: str, v: torch.Tensor) -> None:
    v = v.detach().double().cpu()
    d[k] = d[k] + v if k in d else v


def _fluct_sums(st: dict, x: torch.Tensor, mask: torch.Tensor) -> None:
    """Add one batch's per-channel Σx, Σx² and token count over non-padding tokens to `st`,
    kept on x's device (float64; float32 where the device has no float64, e.g. MPS)."""
    dt = torch.float32 if x.device.type == "mps" else torch.float64
    m = mask.to(x.device, dt).unsqueeze(-1)  # (B, T, 1)
    xm = x.to(dt) * m  # (B, T, C), padding zeroed
    for k, v in (("fl_n", m.sum()), ("fl_s1", xm.sum((0, 1))), ("fl_s2", (xm * xm).sum((0, 1)))):  # (), (C,), (C,)
        st[k] = st[k] + v if k in st else v


def _batches(texts, labels, bs):
    for i in range(0, len(texts), bs):
        yield texts[i:i + bs], (labels[i:i + bs] if labels is not None else None)


def analyze(lm: LoadedModel, texts: list[str], labels: list[int] | None = None,
            cfg: AnalysisConfig | None = None, metrics: tuple[str, ...] | None = None,
            progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> Importance:
    """One pass over `texts`: cosine importance per layer and salience per head / neuron
    for every metric in `metrics` (default: all the task allows)."""
    cfg = cfg or AnalysisConfig()
    if not texts:
        raise ExplorerError("no calibration texts")
    grads_ok = lm.task == "causal-lm" or (lm.task == "classification" and labels is not None)
    if cfg.metric not in METRICS:
        raise ExplorerError(f"unknown metric '{cfg.metric}': use one of {', '.join(METRICS)}")
    if cfg.metric not in LABEL_FREE_METRICS and not grads_ok:
        raise ExplorerError(f"metric '{cfg.metric}' needs gradients, which need a task head and labels; "
                            f"this {lm.task} model/data only supports {', '.join(LABEL_FREE_METRICS)} (and cosine)")
    if lm.task == "classification" and labels is not None:
        n_cls = lm.model.config.num_labels
        bad = [y for y in labels if not 0 <= int(y) < n_cls]
        if bad:
            raise ExplorerError(f"label {bad[0]} does not match the model's {n_cls} classes "
                                f"({', '.join(map(str, lm.model.config.id2label.values()))})")
    metrics = tuple(metrics or (METRICS if grads_ok else LABEL_FREE_METRICS))
    if cfg.metric not in metrics:
        metrics = metrics + (cfg.metric,)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ExplorerError(f"unknown metric '{unknown[0]}': use one of {', '.join(METRICS)}")
    if not grads_ok and any(m in GRAD_METRICS for m in metrics):
        raise ExplorerError(f"metrics {', '.join(m for m in metrics if m in GRAD_METRICS)} need gradients, which "
                            f"need a task head and labels; use {', '.join(LABEL_FREE_METRICS)}")
    grads = grads_ok and any(m in GRAD_METRICS for m in metrics)
    model, adapter = lm.model, lm.adapter
    blocks = adapter.blocks(model)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    # Gradients only for the prunable parameters; activations still carry them through.
    tracked = {id(s.param): s.param for b in blocks for g in (b.attn, b.mlp) for s in g.slices}
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(grads and id(p) in tracked)
        p.grad = None
    gsum = {k: torch.zeros_like(p) for k, p in tracked.items()} if grads else {}
    fisher = {(b.index, g.kind): None for b in blocks for g in (b.attn, b.mlp)}
    rec = _Recorder(lm, blocks, grads, "apt" in metrics, "fluctuation" in metrics)
    n_batches = (len(texts) + cfg.batch_size - 1) // cfg.batch_size
    try:
        for bi, (bt, bl) in enumerate(_batches(texts, labels, cfg.batch_size)):
            if should_stop and should_stop():
                raise Cancelled()
            batch = lm.encode(bt, bl, max_length=cfg.max_length or None)
            rec.mask = batch["attention_mask"].float()
            rec.tokens += int(batch["attention_mask"].sum())
            if grads:
                out = model(**batch)
                out.loss.backward()
                with torch.no_grad():
                    for k, p in tracked.items():
                        gsum[k] += p.grad
                    if "fisher" in metrics:
                        for b in blocks:
                            for g in (b.attn, b.mlp):
                                ph, pg = head_and_group(g, b.heads_per_group if g.kind == "attention" else 1,
                                                        lambda s: (s.param * s.param.grad) ** 2)
                                prev = fisher[(b.index, g.kind)]
                                fisher[(b.index, g.kind)] = (ph, pg) if prev is None else (prev[0] + ph, prev[1] + pg)
                    for p in tracked.values():
                        p.grad = None
            else:
                with torch.no_grad():
                    model(**batch)
            if progress:
                progress(bi + 1, n_batches)
    finally:
        rec.close()
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
            p.grad = None
        model.train(was_training)

    tok = max(rec.tokens, 1)
    cos = (rec.cos_sum / tok).numpy()
    heads: dict[str, list] = {m: [] for m in metrics}
    groups: dict[str, list] = {m: [] for m in metrics}
    neurons: dict[str, list] = {m: [] for m in metrics}
    params = []
    with torch.no_grad():
        for b in blocks:
            params.append({"group_params": b.attn.params_per_unit, "neuron_params": b.mlp.params_per_unit,
                           "block_params": b.params, "groups": b.attn.n_units,
                           "heads_per_group": b.heads_per_group, "n_neurons": b.mlp.n_units})
            for g in (b.attn, b.mlp):
                qpk = b.heads_per_group if g.kind == "attention" else 1
                scores = _unit_scores(g, qpk, metrics, gsum, fisher[(b.index, g.kind)],
                                      rec.act.get((b.index, g.kind), {}))
                for m, (ph, pg) in scores.items():
                    if g.kind == "attention":
                        heads[m].append(ph.numpy())
                        groups[m].append(pg.numpy())
                    else:
                        neurons[m].append(pg.numpy())
    return Importance(-cos[:, 0], -cos[:, 1], -cos[:, 2], groups, heads, neurons, cfg.metric,
                      samples=len(texts), tokens=rec.tokens, seconds=time.perf_counter() - t0, params=params)


def _unit_scores(g: UnitGroup, qpk: int, metrics, gsum, fisher, act) -> dict[str, tuple]:
    """Each metric -> (per query head, per group) for one unit group."""
    out = {}
    for m in metrics:
        if m == "magnitude_l1":
            out[m] = head_and_group(g, qpk, lambda s: s.param.abs())
        elif m == "magnitude_l2":
            ph, pg = head_and_group(g, qpk, lambda s: s.param ** 2)
            out[m] = (ph.sqrt(), pg.sqrt())
        elif m == "taylor":
            out[m] = head_and_group(g, qpk, lambda s: (s.param * gsum[id(s.param)]).abs())
        elif m == "taylor_vector":
            ph, pg = head_and_group(g, qpk, lambda s: s.param * gsum[id(s.param)])
            out[m] = (ph.abs(), pg.abs())
        elif m == "fisher":
            out[m] = (0.5 * fisher[0], 0.5 * fisher[1])
        elif m == "act_grad":
            out[m] = (act["ag_head"], act["ag_group"])
        elif m == "apt":
            out[m] = _apt(g, qpk, act)
        elif m == "fluctuation":
            out[m] = _fluctuation(g, qpk, act)
    return out


def _out_weight_rows(g: UnitGroup) -> torch.Tensor:
    """The out_module weight as (C, out) on the CPU in float64: row j holds the weights that read
    input channel j (W[:, j] of an nn.Linear, W[j, :] of a GPT-2 Conv1D)."""
    s = next(s for s in g.slices if s.module is g.out_module and s.name == "weight")
    return s.param.detach().double().cpu().movedim(s.dim, 0)


def _fluctuation(g: UnitGroup, qpk: int, act: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP fluctuation per query head and per group: Σ over the unit's input channels j of the
    out_module of Var(X_j)·||W_:j||², Var the population variance over calibration tokens."""
    n_tok = act["fl_n"].cpu().double().clamp_min(1)
    mean = act["fl_s1"].cpu().double() / n_tok  # (C,)
    var = (act["fl_s2"].cpu().double() / n_tok - mean ** 2).clamp_min(0)  # (C,) E[x²] - E[x]²
    per_channel = var * (_out_weight_rows(g) ** 2).sum(1)  # (C,)
    n = g.n_units
    return per_channel.view(n * qpk, -1).sum(1), per_channel.view(n, -1).sum(1)


def _apt(g: UnitGroup, qpk: int, act: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """APT outlier-aware salience for per-head and per-group units."""
    w = _out_weight_rows(g)  # (C, out): one row per input channel
    C = w.shape[0]
    n_tok = act["n"].clamp_min(1)
    results = []
    for n_units in (g.n_units * qpk, g.n_units):
        size = C // n_units
        sal = act["abs_g"].view(n_units, size).sum(1) * act["abs_x"].view(n_units, size).sum(1)
        # raw moments of {W_ic * x_tc}: mean over (i, c, t) = mean_c [mean_i W^k * mean_t x^k]
        mom = []
        for k in range(1, 5):
            wk = (w ** k).mean(1)  # (C,)
            xk = act[f"x{k}"] / n_tok  # (C,) mean over tokens
            mom.append((wk * xk).view(n_units, size).mean(1))
        kurt = kurtosis_from_moments(*mom)
        outlier = kurt.sqrt()
        sal_n = sal / sal.mean().clamp_min(1e-30)
        out_n = outlier / outlier.mean().clamp_min(1e-30)
        results.append(sal_n + out_n)
    return results[0], results[1]
