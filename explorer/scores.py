"""What an analysis pass computes, shared by the whole-model pass (`explorer.importance.analyze`)
and the layer-streamed one (`explorer.stream.analyze_streamed`): the `Importance` result, the hooks
that record one pass's statistics (`Recorder`) and the reductions that turn those totals into
scores (`collect`).

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
from .config import NORMALIZATIONS
from .errors import ExplorerError
from .models import LoadedModel

# Estimates of what a unit's removal costs, on one scale for heads and neurons: the only scores a
# salience split may compare across attention and FFN. The first four estimate the loss added,
# fluctuation the squared residual-stream error (magnitudes are neither; apt and the methods'
# mixtures are rescaled per (layer, kind)).
LOSS_METRICS = ("taylor", "taylor_vector", "fisher", "act_grad", "fluctuation")

# A causal LM's backward pass sees at most this many tokens per batch (importance.analysis_batch_size);
# the memory formula (stream.memory_estimate) assumes the same cap.
MAX_LM_BATCH_TOKENS = 1024


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


def average_ranks(values) -> np.ndarray:
    """(n,) ranks 0..n-1 of `values` (n,), ties sharing their mean rank (float64)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    ranks = np.empty(n)
    ranks[np.argsort(v, kind="stable")] = np.arange(n)
    if n == 0:
        return ranks
    _, tie = np.unique(v, return_inverse=True)  # (n,) index of each value's tie class
    return (np.bincount(tie, ranks) / np.bincount(tie))[tie]  # mean rank per tie class


def _rank_normalize(v: np.ndarray) -> np.ndarray:
    """Average ranks 0..n-1 of v (ties share their mean rank), mapped onto [-1, 1]."""
    n = len(v)
    if n < 2:
        return np.zeros_like(v)
    return 2 * average_ranks(v) / (n - 1) - 1


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
    batch_size: int = 0  # calibration samples per batch actually used (see analysis_batch_size)
    cached: bool = False  # reused from the result cache (explorer.cache); `seconds` is then the original pass's

    def to_cache(self) -> dict:
        """Everything, as plain tensors / lists / dicts (explorer.cache stores it; `from_cache` reads it)."""
        per = lambda d: {m: [np.asarray(v) for v in vs] for m, vs in d.items()}  # noqa: E731
        return {"layer_cos": np.asarray(self.layer_cos), "attn_cos": np.asarray(self.attn_cos),
                "mlp_cos": np.asarray(self.mlp_cos), "groups": per(self.groups), "heads": per(self.heads),
                "neurons": per(self.neurons), "metric": self.metric, "samples": int(self.samples),
                "tokens": int(self.tokens), "seconds": float(self.seconds), "params": self.params,
                "batch_size": int(self.batch_size)}

    @classmethod
    def from_cache(cls, d: dict) -> "Importance":
        arr = lambda t: t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)  # noqa: E731
        per = lambda x: {str(m): [arr(v) for v in vs] for m, vs in x.items()}  # noqa: E731
        return cls(arr(d["layer_cos"]), arr(d["attn_cos"]), arr(d["mlp_cos"]), per(d["groups"]), per(d["heads"]),
                   per(d["neurons"]), str(d["metric"]), int(d["samples"]), int(d["tokens"]), float(d["seconds"]),
                   [dict(p) for p in d["params"]], int(d["batch_size"]), cached=True)

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


# --- precision and placement -----------------------------------------------------------
# Everything per token or per weight is computed on the model's device in the accumulation dtype
# (float32 for float32 / bfloat16 / float16 models: half-precision activations, gradients and
# weights are cast up *before* they are multiplied or squared; float64 for a float64 model).
# Running totals stay on the device; the per-unit vectors move to the CPU once, after the pass,
# as float64, and the few operations on (n_units,) vectors (query heads summed into groups,
# sqrt, kurtosis, normalisations) run there.

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics of a `dtype` tensor accumulate in: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


def to_acc(t: torch.Tensor) -> torch.Tensor:
    """`t` detached, in its accumulation dtype (no copy when it already is), on its device."""
    t = t.detach()
    return t.to(acc_dtype(t.dtype))


def to_cpu64(t: torch.Tensor) -> torch.Tensor:
    """The move to the CPU at the end of a pass: detached, float64."""
    return t.detach().to("cpu", torch.float64)


# --- per-unit reductions --------------------------------------------------------------

def unit_sums(t: torch.Tensor, s, n_units: int, unit_size: int | None = None) -> torch.Tensor:
    """Sum an elementwise tensor shaped like `s.param` over each unit's indices -> (n_units,)."""
    size = unit_size or s.unit_size
    x = t.narrow(s.dim, s.offset, n_units * size)  # the units' part along dim
    return x.movedim(s.dim, 0).reshape(n_units, -1).sum(1)


def head_sums(group: UnitGroup, qpk: int, elementwise: Callable) -> torch.Tensor:
    """Per-query-head sums (n_units * qpk,) of `elementwise(slice)` over all coupled slices, on
    the parameters' device in `elementwise`'s dtype. Query/output slices split into query heads;
    key/value slices are shared by the group's query heads and split evenly among them."""
    n = group.n_units
    per_head = None
    for s in group.slices:
        t = elementwise(s)
        if s.per_head and qpk > 1:
            v = unit_sums(t, s, n * qpk, s.unit_size // qpk)
        else:
            v = unit_sums(t, s, n).repeat_interleave(qpk) / qpk
        per_head = v if per_head is None else per_head + v
    return per_head


def heads_to_groups(per_head: torch.Tensor, n_units: int, qpk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per query head, per group) on the CPU in float64 from per-head sums on any device."""
    ph = to_cpu64(per_head)
    return ph, ph.view(n_units, qpk).sum(1)


def head_and_group(group: UnitGroup, qpk: int, elementwise: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query-head and per-group sums of `elementwise(slice)` (see `head_sums`), on the CPU
    in float64."""
    return heads_to_groups(head_sums(group, qpk, elementwise), group.n_units, qpk)


def kurtosis_from_moments(m1, m2, m3, m4) -> torch.Tensor:
    """Kurtosis (not excess) from raw moments E[z^k]."""
    var = (m2 - m1 ** 2).clamp_min(1e-30)
    mu4 = m4 - 4 * m1 * m3 + 6 * m1 ** 2 * m2 - 3 * m1 ** 4
    return (mu4 / var ** 2).clamp_min(0)


class Recorder:
    """Forward/backward hooks over all blocks; accumulates everything in one pass. Unit
    activations (the out_modules' inputs) are hooked when gradients are computed or when
    `fluctuation` asks for their per-channel statistics (forward only). Every total lives on
    the device of the tensors it sums, in their accumulation dtype."""

    def __init__(self, lm: LoadedModel, blocks: list[Block], grads: bool, apt: bool, fluctuation: bool = False):
        self.lm, self.blocks, self.grads, self.apt, self.fluct = lm, blocks, grads, apt, fluctuation
        self.mask: torch.Tensor | None = None  # (B, T) of the current batch, on the input device
        self.cos_sum: dict[int, torch.Tensor] = {}  # layer -> (3,) block, attention, mlp
        self.n_tok: torch.Tensor | None = None  # non-padding tokens so far (a device scalar)
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

    def count(self, mask: torch.Tensor) -> None:
        """Start a batch: its (B, T) attention mask."""
        self.mask = mask.float()
        n = mask.sum()
        self.n_tok = n if self.n_tok is None else self.n_tok + n

    @property
    def tokens(self) -> int:
        return int(self.n_tok) if self.n_tok is not None else 0

    def layer_cos(self) -> np.ndarray:
        """(L, 3) summed cosines on the CPU (float64), in block order."""
        return torch.stack([to_cpu64(self.cos_sum[b.index]) for b in self.blocks]).numpy()

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

    def _masked_cos_sum(self, a, b):
        dt = acc_dtype(a.dtype)
        c = F.cosine_similarity(a.to(dt), b.to(dt), dim=-1)  # (B, T)
        return (c * self.mask.to(c.device, dt)).sum()

    def _post(self, i):
        def hook(module, args, out):
            h_out = self._first(out).detach()
            h_in, h_mid = self.h_in.pop(i), self.h_mid.pop(i)
            v = torch.stack([self._masked_cos_sum(h_in, h_out), self._masked_cos_sum(h_in, h_mid),
                             self._masked_cos_sum(h_mid, h_out)])  # (3,)
            self.cos_sum[i] = self.cos_sum[i] + v if i in self.cos_sum else v
        return hook

    def _act(self, i, group: UnitGroup, qpk: int):
        key = (i, group.kind)
        n, size = group.n_units, group.act_unit_size
        n_heads, head_size = n * qpk, size // qpk

        def hook(module, args):
            x = args[0]  # (B, T, C) with C = n_units * act_unit_size, in the model's dtype
            st = self.act.setdefault(key, {})
            dt = acc_dtype(x.dtype)
            m = self.mask.to(x.device, dt).unsqueeze(-1)  # (B, T, 1)
            xd = x.detach()  # kept in the model's dtype for the backward; cast up where used
            if self.fluct:
                _fluct_sums(st, xd, m)
            if not (self.grads and x.requires_grad):
                return
            xu = xd.to(dt)
            _acc(st, "abs_x", (xu.abs() * m).sum((0, 1)))  # (C,)
            if self.apt:
                _acc(st, "n", m.sum())
                xm = xu * m
                xk = xm
                for k in range(1, 5):
                    _acc(st, f"x{k}", xk.sum((0, 1)))  # raw moment sums (C,)
                    if k < 4:
                        xk = xk * xm
            del xu

            def grad_hook(g):  # g: (B, T, C)
                gm = g.detach().to(dt) * m
                _acc(st, "abs_g", gm.abs().sum((0, 1)))
                xg = (xd.to(dt) * gm).sum(1)  # (B, C): per-sample first-order effect per channel
                B = xg.shape[0]
                _acc(st, "ag_head", xg.view(B, n_heads, head_size).sum(-1).abs().sum(0))
                _acc(st, "ag_group", xg.view(B, n, size).sum(-1).abs().sum(0))
            x.register_hook(grad_hook)
        return hook


def _acc(d: dict, k: str, v: torch.Tensor) -> None:
    """d[k] += v, on v's device in v's dtype (the first value starts the total)."""
    v = v.detach()
    d[k] = d[k] + v if k in d else v


def _fluct_sums(st: dict, x: torch.Tensor, m: torch.Tensor) -> None:
    """Merge one batch's per-channel token count, mean and sum of squared deviations over the
    non-padding tokens into `st` (Chan et al.'s parallel update): each batch is centred on its
    own mean first, so E[x²] - E[x]² never cancels, and float32 is enough. x: (B, T, C), m:
    (B, T, 1) in the accumulation dtype on x's device. No host synchronisation."""
    xf = x.to(m.dtype)
    n_b = m.sum()  # ()
    mean_b = (xf * m).sum((0, 1)) / n_b.clamp_min(1)  # (C,)
    m2_b = (((xf - mean_b) * m) ** 2).sum((0, 1))  # (C,)
    if "fl_n" not in st:
        st["fl_n"], st["fl_mean"], st["fl_m2"] = n_b, mean_b, m2_b
        return
    n_a, mean_a = st["fl_n"], st["fl_mean"]
    n = n_a + n_b
    delta = mean_b - mean_a
    share = n_b / n.clamp_min(1)
    st["fl_mean"] = mean_a + delta * share
    st["fl_m2"] = st["fl_m2"] + m2_b + delta * delta * n_a * share
    st["fl_n"] = n


def collect(rec: Recorder, blocks, metrics, metric: str, samples: int, t0: float, batch_size: int,
            gsum: dict | None = None, fisher: dict | None = None) -> Importance:
    """A finished pass's totals -> Importance: cosine importance per layer and every metric's
    salience per head / KV group / neuron (whole-model `analyze` and `stream.analyze_streamed`)."""
    tokens = rec.tokens  # the pass's one host synchronisation for the totals: everything moves now
    cos = rec.layer_cos() / max(tokens, 1)
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
                scores = _unit_scores(g, qpk, metrics, gsum if gsum is not None else {},
                                      fisher[(b.index, g.kind)] if fisher is not None else None,
                                      rec.act.get((b.index, g.kind), {}))
                for m, (ph, pg) in scores.items():  # CPU float64 tensors
                    if g.kind == "attention":
                        heads[m].append(ph.numpy())
                        groups[m].append(pg.numpy())
                    else:
                        neurons[m].append(pg.numpy())
    return Importance(-cos[:, 0], -cos[:, 1], -cos[:, 2], groups, heads, neurons, metric,
                      samples=samples, tokens=tokens, seconds=time.perf_counter() - t0, params=params,
                      batch_size=batch_size)


def _unit_scores(g: UnitGroup, qpk: int, metrics, gsum, fisher, act) -> dict[str, tuple]:
    """Each metric -> (per query head, per group) for one unit group, on the CPU in float64.
    The sums over weights run on the device in the accumulation dtype; only (n_units,) vectors
    move."""
    out = {}
    n = g.n_units
    for m in metrics:
        if m == "magnitude_l1":
            out[m] = head_and_group(g, qpk, lambda s: to_acc(s.param).abs())
        elif m == "magnitude_l2":
            ph, pg = head_and_group(g, qpk, lambda s: to_acc(s.param) ** 2)
            out[m] = (ph.sqrt(), pg.sqrt())
        elif m == "taylor":
            out[m] = head_and_group(g, qpk, lambda s: (to_acc(s.param) * gsum[id(s.param)]).abs())
        elif m == "taylor_vector":
            ph, pg = head_and_group(g, qpk, lambda s: to_acc(s.param) * gsum[id(s.param)])
            out[m] = (ph.abs(), pg.abs())
        elif m == "fisher":
            ph, pg = heads_to_groups(fisher, n, qpk)
            out[m] = (0.5 * ph, 0.5 * pg)
        elif m == "act_grad":
            out[m] = (to_cpu64(act["ag_head"]), to_cpu64(act["ag_group"]))
        elif m == "apt":
            out[m] = _apt(g, qpk, act)
        elif m == "fluctuation":
            out[m] = _fluctuation(g, qpk, act)
    return out


def _out_weight_rows(g: UnitGroup) -> torch.Tensor:
    """The out_module weight as (C, out) on its device in the accumulation dtype: row j holds the
    weights that read input channel j (W[:, j] of an nn.Linear, W[j, :] of a GPT-2 Conv1D)."""
    s = next(s for s in g.slices if s.module is g.out_module and s.name == "weight")
    return to_acc(s.param).movedim(s.dim, 0)


def _fluctuation(g: UnitGroup, qpk: int, act: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP fluctuation per query head and per group: Σ over the unit's input channels j of the
    out_module of Var(X_j)·||W_:j||², Var the population variance over calibration tokens."""
    w = _out_weight_rows(g)  # (C, out)
    var = act["fl_m2"].to(w.device) / act["fl_n"].to(w.device).clamp_min(1)  # (C,) Σ (x - mean)² / N
    per_channel = to_cpu64(var * (w * w).sum(1))  # (C,)
    n = g.n_units
    return per_channel.view(n * qpk, -1).sum(1), per_channel.view(n, -1).sum(1)


def _apt(g: UnitGroup, qpk: int, act: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """APT outlier-aware salience for per-head and per-group units. The weight's power means and
    the activations' moment sums are (C,) vectors from the device; they combine on the CPU in
    float64 (the kurtosis subtracts moments)."""
    w = _out_weight_rows(g)  # (C, out): one row per input channel
    C = w.shape[0]
    wk_dev, wp = [], w
    for k in range(1, 5):
        wk_dev.append(wp.mean(1))  # (C,) mean_i W_ic^k
        if k < 4:
            wp = wp * w
    wk = [to_cpu64(v) for v in wk_dev]
    n_tok = to_cpu64(act["n"]).clamp_min(1)
    abs_g, abs_x = to_cpu64(act["abs_g"]), to_cpu64(act["abs_x"])
    xk = [to_cpu64(act[f"x{k}"]) / n_tok for k in range(1, 5)]  # (C,) mean over tokens
    results = []
    for n_units in (g.n_units * qpk, g.n_units):
        size = C // n_units
        sal = abs_g.view(n_units, size).sum(1) * abs_x.view(n_units, size).sum(1)
        # raw moments of {W_ic * x_tc}: mean over (i, c, t) = mean_c [mean_i W^k * mean_t x^k]
        mom = [(wk[k] * xk[k]).view(n_units, size).mean(1) for k in range(4)]
        kurt = kurtosis_from_moments(*mom)
        outlier = kurt.sqrt()
        sal_n = sal / sal.mean().clamp_min(1e-30)
        out_n = outlier / outlier.mean().clamp_min(1e-30)
        results.append(sal_n + out_n)
    return results[0], results[1]
