"""Speed as the budget: a per-layer latency cost model measured on this device, a FLOPs model,
and allocations that meet a predicted speed-up or a FLOPs cut instead of a parameter budget.

Cost model. One block's time is measured as a function of its kept attention units (KV groups)
and FFN neurons on a small grid (`grid`, e.g. 4 x 4 widths from 1 to the config's width), on a
standalone one-block copy of the model (built from the config, random weights: time depends on
the shapes only) pruned with the same surgery as a run; each point is the median of a few
timed calls of the block's forward on the hidden states (and mask, rotary embeddings, cache)
the model itself hands it, in interleaved rounds (every point once per round, so load from other
jobs falls on all alike). Measurements are noisy, so the grid is then made monotone
(cumulative max along both axes: a narrower block is never predicted slower) and interpolated
bilinearly. The fixed cost of everything outside the blocks (embeddings, final norm, head,
masks) is measured once on the same model with no blocks. Predicted model time:

    T(widths) = fixed + Σ_L block(g_L, n_L)

What the time refers to (`batch_size`, `seq_len`, `mode`):
  * encoders and classifiers ("forward"): one forward pass at 32 x 128 by default;
  * causal LMs ("decode", the default for them): one decode step at batch 1, one new token over a
    KV cache of `seq_len` = 32 tokens (the prompt length of evaluate.SpeedSetup), i.e. what
    decode tokens/s measures; the cache is copied before every timed call so it never grows.
A cost model is cached as JSON (with its measurement date) per (model shape, device, threads,
dtype, batch, seq, mode, grid) under $PRUNING_EXPLORER_CACHE or ~/.cache/pruning-explorer/.
It also records a check: the whole model timed the same way against its prediction.

Allocation (`allocate_latency`, `allocate_flops`, both on `allocate_to_cost`): bisection on
S_base with the ordinary allocate() (so S_L = S_base - A·Î_L, S_max and the salience split
still shape the plan) to the last plan still over the goal, then a greedy touch-up that removes
the unit (KV group or block of round_to neurons) with the least salience per unit of predicted
cost saved until the goal is met, and adds back the most salient removed units that still fit.
The predicted cost ends at most the goal and, but where every layer is full, less than one
unit's cost below it. Same Allocation type as allocate(), with `budget` and `cost` filled in.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
import torch

from transformers.cache_utils import Cache

from .allocation import Allocation, allocate, validate
from .config import AllocationConfig
from .errors import ExplorerError
from .hidden import fresh_like
from .models import LoadedModel
from .surgery import prune_block
from .surgery import widths as model_widths  # `widths` is the per-layer list predict() takes
from .timing import random_ids, timed

CACHE_ENV = "PRUNING_EXPLORER_CACHE"
ENCODER_SHAPE = (32, 128)  # (batch, seq) of an encoder's forward
DECODE_SHAPE = (1, 32)  # (batch, KV-cache tokens) of an LM's decode step
SHELL_VOCAB = 1024  # vocabulary of the one-block copy that times blocks


class Cost(Protocol):
    """What the budget allocations need from a cost model (CostModel, FlopsModel or a test's fake)."""
    unit: str
    fixed: float  # cost outside the blocks

    def block(self, groups: float, neurons: float) -> float: ...


def predict(cost: Cost, widths: Iterable) -> float:
    """fixed + Σ block(g, n) over per-layer widths: (groups, neurons) pairs or dicts with
    "groups" and "neurons" (as surgery.widths writes them)."""
    total = float(cost.fixed)
    for w in widths:
        g, n = (w["groups"], w["neurons"]) if isinstance(w, dict) else w
        total += cost.block(g, n)
    return total


# --- the FLOPs model ------------------------------------------------------------------------

@dataclass
class FlopsModel:
    """Forward FLOPs per token of one block as evaluate.flops_per_token counts them: 2 per
    weight of every matrix multiply plus attention scores and mixing (4·seq·heads·head_dim),
    linear in the widths. Nothing outside the blocks is counted (fixed = 0)."""
    fixed_flops: float  # 2 x the matrix weights no unit owns
    group_flops: float  # one KV group: its matrix weights and its query heads' attention
    neuron_flops: float  # one FFN neuron
    seq_len: int = 128
    unit: str = "FLOPs/token"
    fixed: float = 0.0

    def block(self, groups: float, neurons: float) -> float:
        return self.fixed_flops + groups * self.group_flops + neurons * self.neuron_flops

    def predict(self, widths) -> float:
        return predict(self, widths)

    @classmethod
    def from_model(cls, lm: LoadedModel, seq_len: int = 128) -> "FlopsModel":
        """Per-unit matrix weights read off the adapter's slices of the first block."""
        b = lm.adapter.block(lm.model, 0)

        def matrix_per_unit(group) -> int:
            return sum(s.unit_size * (s.param.numel() // s.param.shape[s.dim]) for s in group.slices
                       if s.param.dim() == 2)
        mat = sum(p.numel() for p in b.module.parameters() if p.dim() == 2)
        g_mat, n_mat = matrix_per_unit(b.attn), matrix_per_unit(b.mlp)
        fixed = mat - b.attn.n_units * g_mat - b.mlp.n_units * n_mat
        return cls(2.0 * fixed, 2.0 * g_mat + 4.0 * seq_len * b.heads_per_group * b.head_dim, 2.0 * n_mat, seq_len)

    @classmethod
    def from_structure(cls, layer: dict, head_dim: int, seq_len: int = 128) -> "FlopsModel":
        """From an analysis' per-layer structure (no model at hand): every parameter counted as a
        weight (biases and norms too, a small overestimate on both sides; the Allocation summary uses it too)."""
        G, N, pg, pn = layer["groups"], layer["n_neurons"], layer["group_params"], layer["neuron_params"]
        fixed = layer["block_params"] - G * pg - N * pn
        attention = 4.0 * seq_len * layer.get("heads_per_group", 1) * head_dim  # scores and mixing of one group
        return cls(2.0 * fixed, 2.0 * pg + attention, 2.0 * pn, seq_len)


# --- the latency cost model ------------------------------------------------------------------

@dataclass
class CostModel:
    """Measured block time (ms) on a (groups x neurons) grid, made monotone, interpolated
    bilinearly; plus the fixed time outside the blocks. See the module docstring."""
    signature: dict  # what the times refer to (model shape, device, dtype, batch, seq, mode)
    groups: list[int]  # ascending grid of KV groups
    neurons: list[int]  # ascending grid of FFN neurons
    block_ms: list[list[float]]  # [len(groups)][len(neurons)], monotone
    fixed_ms: float
    raw_ms: list[list[float]] = field(default_factory=list)  # the medians as measured
    spread_ms: list[list[list[float]]] = field(default_factory=list)  # [min, max] of each point's repeats
    measured_at: str = ""
    seconds: float = 0.0  # how long measuring took
    check: dict | None = None  # the measured model, timed whole, against its prediction
    cached: bool = False  # loaded from the cache file rather than measured now
    unit: str = "ms"

    def __post_init__(self):
        self._t = np.asarray(self.block_ms, dtype=np.float64)  # (G, N)
        assert self._t.shape == (len(self.groups), len(self.neurons)), "grid and times disagree"

    @property
    def fixed(self) -> float:
        return self.fixed_ms

    def block(self, groups: float, neurons: float) -> float:
        """Predicted ms of one block at these widths (clipped to the grid's range)."""
        t = self._t
        i, u = _cell(self.groups, groups)
        j, v = _cell(self.neurons, neurons)
        i1, j1 = min(i + 1, t.shape[0] - 1), min(j + 1, t.shape[1] - 1)
        return float((1 - u) * (1 - v) * t[i, j] + u * (1 - v) * t[i1, j]
                     + (1 - u) * v * t[i, j1] + u * v * t[i1, j1])

    def predict(self, widths) -> float:
        return predict(self, widths)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "cached"}

    @classmethod
    def from_json(cls, d: dict) -> "CostModel":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "cached"}, cached=True)


def _cell(grid: list[int], x: float) -> tuple[int, float]:
    """(i, w): x lies between grid[i] and grid[i+1], a fraction w of the way (clipped to the grid)."""
    if len(grid) == 1:
        return 0, 0.0
    x = min(max(float(x), grid[0]), grid[-1])
    i = int(np.clip(np.searchsorted(grid, x, side="right") - 1, 0, len(grid) - 2))
    return i, (x - grid[i]) / (grid[i + 1] - grid[i])


def monotone(t) -> np.ndarray:
    """The smallest grid >= t that never decreases along either axis: the max over the
    rectangle of narrower-or-equal widths (cumulative max along groups, then neurons)."""
    t = np.asarray(t, dtype=np.float64)  # (G, N)
    return np.maximum.accumulate(np.maximum.accumulate(t, axis=0), axis=1)


def grid_points(full: int, points: int) -> list[int]:
    """`points` widths from 1 to `full`, evenly spaced and rounded (fewer where they coincide)."""
    if full <= 1:
        return [1]
    return sorted({int(round(x)) for x in np.linspace(1, full, max(2, points))})


def default_shape(lm: LoadedModel, batch_size: int | None = None, seq_len: int | None = None,
                  mode: str | None = None) -> tuple[int, int, str]:
    """(batch, seq, mode) the cost refers to: decode at 1 x 32 for causal LMs, forward at 32 x 128 otherwise."""
    mode = mode or ("decode" if lm.task == "causal-lm" else "forward")
    if mode not in ("forward", "decode"):
        raise ExplorerError(f"unknown cost-model mode '{mode}': use forward or decode")
    b, t = DECODE_SHAPE if mode == "decode" else ENCODER_SHAPE
    return batch_size or b, min(seq_len or t, lm.max_positions - (mode == "decode")), mode


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{torch.get_num_threads()} threads"


def signature(lm: LoadedModel, shell: "_Shell", batch_size: int, seq_len: int, mode: str,
              grid: tuple[int, int]) -> dict:
    """What a cost model depends on: the block shape built from the config (the widest a layer
    of this model can be), the rest of the model, the device, dtype and setting."""
    cfg = lm.model.config
    b = shell.block()
    return {"model_class": type(lm.model).__name__, "model_type": cfg.model_type,
            "hidden": int(getattr(cfg, "hidden_size", 0) or 0), "vocab": int(getattr(cfg, "vocab_size", 0) or 0),
            "groups": b.attn.n_units, "neurons": b.mlp.n_units, "heads_per_group": b.heads_per_group,
            "head_dim": b.head_dim, "layers": len(lm.adapter.layers(lm.model)),
            "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
            "device": _device_name(lm.device), "torch": torch.__version__.split("+")[0],
            "batch_size": batch_size, "seq_len": seq_len, "mode": mode, "grid": list(grid)}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pruning-explorer")


def cache_path(sig: dict) -> Path:
    key = hashlib.sha1(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"latency-{sig['model_type']}-{key}.json"


class _Timer:
    """The samples of one timed thing, taken over interleaved rounds: its first sample starts
    with a warm-up call that also sets how many calls make a sample (enough to last
    `min_sample_s`); every sample is the mean ms per call."""

    def __init__(self, device: torch.device, min_sample_s: float = 0.02):
        self.device, self.min_sample_s = device, min_sample_s
        self.number: int | None = None
        self.ms: list[float] = []

    def sample(self, prepare, call) -> None:
        """`prepare()` makes one call's input, untimed (e.g. a fresh copy of a KV cache)."""
        if self.number is None:
            x = prepare()
            once = timed(lambda: call(x), self.device)
            self.number = max(1, min(64, math.ceil(self.min_sample_s / max(once, 1e-6))))
        xs = [prepare() for _ in range(self.number)]
        self.ms.append(timed(lambda: [call(x) for x in xs], self.device) / self.number * 1000)

    @property
    def median(self) -> float:
        return statistics.median(self.ms)

    @property
    def spread(self) -> list[float]:
        return [min(self.ms), max(self.ms)]


def _fresh_caches(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A copy of a call's inputs with every KV cache deep-copied (a decode step appends to it)."""
    def fresh(v):
        return copy.deepcopy(v) if isinstance(v, Cache) else v
    return tuple(fresh(a) for a in args), {k: fresh(v) for k, v in kwargs.items()}


class _Captured(Exception):
    pass


class _Shell:
    """A one-block copy of `lm`'s architecture, built from its config (random weights, same dtype,
    device and attention implementation; a vocabulary of at most SHELL_VOCAB tokens, which the
    block never sees), whose block can be pruned to any widths and timed on the inputs the model
    itself hands the block."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        cfg = copy.deepcopy(lm.model.config)
        cfg.num_hidden_layers = 1
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = list(cfg.layer_types[:1])
        if getattr(cfg, "vocab_size", 0) > SHELL_VOCAB:
            cfg.vocab_size = SHELL_VOCAB
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                if isinstance(getattr(cfg, name, None), int) and getattr(cfg, name) >= SHELL_VOCAB:
                    setattr(cfg, name, None)
        self.model = fresh_like(lm, cfg).to(lm.device).eval()  # the model's dtype and (pruned) hidden size
        self.dense_layer = copy.deepcopy(lm.adapter.layers(self.model)[0])

    def block(self):
        return self.lm.adapter.block(self.model, 0)

    def set_widths(self, groups: int, neurons: int) -> None:
        """The block at `groups` KV groups and `neurons` FFN neurons (the first ones), from a
        fresh copy of the dense block when it has to grow back."""
        b = self.block()
        if b.attn.n_units < groups or b.mlp.n_units < neurons:
            self.lm.adapter.layers(self.model)[0] = copy.deepcopy(self.dense_layer)
        prune_block(self.lm.adapter, self.model, 0, list(range(groups)), list(range(neurons)))

    @torch.inference_mode()
    def block_inputs(self, batch: int, seq: int, mode: str) -> tuple[tuple, dict]:
        """(args, kwargs) the model passes its block: for "forward" over batch x seq tokens; for
        "decode" for one new token after a prefill of seq tokens (the KV cache before the step)."""
        layer = self.lm.adapter.layers(self.model)[0]
        seen = {}

        def hook(module, args, kwargs):
            seen["call"] = (args, dict(kwargs))
            raise _Captured
        ids = random_ids(self.model.config.vocab_size, batch, seq, self.lm.device)  # (B, T)
        step = {}
        if mode == "decode":
            out = self.model(input_ids=ids, use_cache=True)
            step = {"input_ids": ids[:, -1:], "cache": getattr(out, "cache", None) or out.past_key_values,
                    "use_cache": True}
        handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            if mode == "decode":
                self.model(**step)
            else:
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        except _Captured:
            pass
        finally:
            handle.remove()
        return seen["call"]

    @torch.inference_mode()
    def time_block(self, batch: int, seq: int, mode: str, timer: _Timer) -> None:
        """One sample of the block's forward at its current widths."""
        layer = self.lm.adapter.layers(self.model)[0]
        args, kwargs = self.block_inputs(batch, seq, mode)
        timer.sample(lambda: _fresh_caches(args, kwargs), lambda x: layer(*x[0], **x[1]))



@torch.inference_mode()
def time_without_blocks(lm: LoadedModel, batch: int, seq: int, mode: str, timer: _Timer) -> None:
    """One sample of `lm` with its blocks taken out for the measurement (embeddings, final norm,
    head, masks: what pruning the blocks leaves as it is); a decode step is one token."""
    model, layers = lm.model, lm.adapter.layers(lm.model)
    cfg = model.config
    saved = (cfg.num_hidden_layers, getattr(cfg, "layer_types", None))
    ids = random_ids(lm.model.config.vocab_size, batch, 1 if mode == "decode" else seq)
    kw = {"use_cache": False} if mode == "decode" else {"attention_mask": torch.ones_like(ids)}
    try:
        lm.adapter._replace_layers(model, torch.nn.ModuleList())
        cfg.num_hidden_layers = 0
        if saved[1]:
            cfg.layer_types = []
        timer.sample(lambda: None, lambda _: model(input_ids=ids, **kw))
    finally:
        lm.adapter._replace_layers(model, layers)
        cfg.num_hidden_layers = saved[0]
        if saved[1]:
            cfg.layer_types = saved[1]


@torch.inference_mode()
def time_model(lm: LoadedModel, batch: int, seq: int, mode: str, timer: _Timer) -> None:
    """One sample of the whole model in the cost model's setting: a forward over batch x seq, or
    one decode step after a prefill of seq tokens (the cache copied before every call)."""
    lm.model.eval()
    ids = random_ids(lm.model.config.vocab_size, batch, seq)
    if mode == "forward":
        timer.sample(lambda: None, lambda _: lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)))
        return
    out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    nxt = ids[:, -1:]
    timer.sample(lambda: copy.deepcopy(cache), lambda c: lm.model(input_ids=nxt, cache=c, use_cache=True))


def measure(lm: LoadedModel, batch_size: int | None = None, seq_len: int | None = None, mode: str | None = None,
            grid: tuple[int, int] = (4, 4), repeats: int = 3, check: bool = True, progress=None,
            shell: "_Shell | None" = None) -> CostModel:
    """Measure a cost model now (no cache). `grid`: points along (KV groups, neurons). Timed in
    `repeats` interleaved rounds (each round samples every grid point, the model without blocks
    and, with `check`, the whole model once), so that a machine getting busier or quieter shifts
    them all alike; medians over the rounds. `check` records the whole model's prediction error."""
    t0 = time.perf_counter()
    batch, seq, mode = default_shape(lm, batch_size, seq_len, mode)
    shell = shell or _Shell(lm)
    sig = signature(lm, shell, batch, seq, mode, grid)
    gs, ns = grid_points(sig["groups"], grid[0]), grid_points(sig["neurons"], grid[1])
    points = {(i, j): _Timer(lm.device) for i in range(len(gs)) for j in range(len(ns))}
    fixed, whole = _Timer(lm.device), _Timer(lm.device)
    for r in range(repeats):
        for i in reversed(range(len(gs))):  # widest first: each block is cut from the one before
            for j in reversed(range(len(ns))):
                shell.set_widths(gs[i], ns[j])
                shell.time_block(batch, seq, mode, points[i, j])
        time_without_blocks(lm, batch, seq, mode, fixed)
        if check:
            time_model(lm, batch, seq, mode, whole)
        if progress:
            progress(r + 1, repeats)
    raw = np.array([[points[i, j].median for j in range(len(ns))] for i in range(len(gs))])  # (G, N)
    spread = [[points[i, j].spread for j in range(len(ns))] for i in range(len(gs))]
    model = CostModel(sig, gs, ns, monotone(raw).tolist(), fixed.median, raw.tolist(), spread,
                      _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    if check:
        predicted = model.predict(model_widths(lm.adapter, lm.model))
        model.check = {"measured_ms": whole.median, "measured_spread_ms": whole.spread, "predicted_ms": predicted,
                       "error": predicted / whole.median - 1}
    model.seconds = time.perf_counter() - t0
    return model


def cost_model(lm: LoadedModel, batch_size: int | None = None, seq_len: int | None = None, mode: str | None = None,
               grid: tuple[int, int] = (4, 4), repeats: int = 3, refresh: bool = False, cache: bool = True,
               progress=None) -> CostModel:
    """The cost model of `lm`'s architecture on its device: read from the cache when one was
    measured for the same signature (unless `refresh`), else measured and cached."""
    batch, seq, mode = default_shape(lm, batch_size, seq_len, mode)
    shell = _Shell(lm)
    sig = signature(lm, shell, batch, seq, mode, grid)
    path = cache_path(sig)
    if cache and not refresh and path.exists():
        try:
            d = json.loads(path.read_text())
            if d.get("signature") == sig:
                return CostModel.from_json(d)
        except (OSError, ValueError, TypeError):
            pass  # unreadable: measure again
    model = measure(lm, batch, seq, mode, grid, repeats, progress=progress, shell=shell)
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(model.to_json(), indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home: the model is still usable
    return model


# --- allocation to a cost -------------------------------------------------------------------

def _kept(alloc: Allocation) -> list[tuple[int, int]]:
    return [(lp.keep_groups, lp.keep_neurons) for lp in alloc.layers]


def _fewer(n: int, k: int) -> int:
    """Neurons after removing one block of k (down to the multiple of k below)."""
    return (n - 1) // k * k if n % k else n - k


def _more(n: int, full: int, k: int) -> int:
    return min(full, (n // k + 1) * k)


class _Touchup:
    """Greedy unit moves on a plan: remove the unit with the least salience per cost saved, add
    back the one with the most salience per cost added. Salience: the unit scores (the lowest
    kept / highest removed ones, as plan_keeps keeps the top scores); without comparable scores
    the parameters a unit holds, weighted by 2 + Î_L (important layers keep theirs longer)."""

    def __init__(self, structure, cfg: AllocationConfig, cost: Cost, kept, norm_imp, scores):
        self.st, self.cfg, self.cost = structure, cfg, cost
        self.g = [g for g, _ in kept]
        self.n = [n for _, n in kept]
        self.sal = []  # per layer (ascending group salience, ascending neuron salience)
        for i, l in enumerate(structure):
            if scores is not None:
                gs, ns = (np.sort(np.asarray(x, dtype=np.float64)) for x in scores[i])
            else:
                w = 2.0 + float(norm_imp[i])
                gs = np.full(l["groups"], l["group_params"] * w)
                ns = np.full(l["n_neurons"], l["neuron_params"] * w)
            self.sal.append((gs, ns))

    def params_after(self, i: int, g: int, n: int) -> int:
        l = self.st[i]
        return l["block_params"] - (l["groups"] - g) * l["group_params"] - (l["n_neurons"] - n) * l["neuron_params"]

    def total(self) -> float:
        return predict(self.cost, zip(self.g, self.n))

    def _moves(self, i: int, grow: bool):
        """(salience, cost change, new g, new n) of the possible one-unit moves in layer i."""
        l, g, n, k = self.st[i], self.g[i], self.n[i], self.cfg.round_to
        G, N = l["groups"], l["n_neurons"]
        gs, ns = self.sal[i]
        here = self.cost.block(g, n)
        out = []
        if grow:
            if self.cfg.prune_attention and g < G:
                out.append((gs[G - g - 1], self.cost.block(g + 1, n) - here, g + 1, n))
            if self.cfg.prune_mlp and n < N:
                m = _more(n, N, k)
                out.append((ns[N - m:N - n].sum(), self.cost.block(g, m) - here, g, m))
            return out
        floor = (1 - self.cfg.max_sparsity) * l["block_params"]
        if self.cfg.prune_attention and g > 1 and self.params_after(i, g - 1, n) >= floor:
            out.append((gs[G - g], here - self.cost.block(g - 1, n), g - 1, n))
        m = _fewer(n, k)
        if self.cfg.prune_mlp and m >= 1 and self.params_after(i, g, m) >= floor:
            out.append((ns[N - n:N - m].sum(), here - self.cost.block(g, m), g, m))
        return out

    def shrink_to(self, goal: float) -> bool:
        """Remove units until the predicted cost is at most `goal`; False if it cannot get there."""
        total = self.total()
        while total > goal:
            best = None
            for i in range(len(self.st)):
                for sal, saved, g, n in self._moves(i, grow=False):
                    if saved > 0 and (best is None or sal / saved < best[0]):
                        best = (sal / saved, saved, i, g, n)
            if best is None:
                return False
            _, _, i, self.g[i], self.n[i] = best
            total = self.total()  # afresh: no drift from summed differences
        return True

    def grow_within(self, goal: float) -> None:
        """Add back the most salient units per cost while the predicted cost stays within `goal`."""
        total = self.total()
        while True:
            best = None
            for i in range(len(self.st)):
                for sal, added, g, n in self._moves(i, grow=True):
                    if total + added <= goal:
                        ratio = math.inf if added <= 0 else sal / added
                        if best is None or ratio > best[0]:
                            best = (ratio, added, i, g, n)
            if best is None:
                return
            _, _, i, self.g[i], self.n[i] = best
            total = self.total()


def allocate_to_cost(norm_imp, structure: list[dict], cfg: AllocationConfig, cost: Cost, goal: float,
                     scores: list[tuple[np.ndarray, np.ndarray]] | None = None, reference: float | None = None,
                     budget: str = "latency") -> Allocation:
    """The plan whose predicted cost (`cost`: fixed + Σ block(g, n)) is at most `goal`, shaped
    by allocate() (bisection on S_base) and finished unit by unit (see the module docstring).
    `reference`: the cost the goal was derived from (default: the structure at full width),
    recorded in the plan's `cost`. Raises ExplorerError when S_max cannot reach the goal."""
    validate(replace(cfg, target=0.0, budget="params", speedup=0.0))  # the shape's settings (A, S_max, split, ...)
    full = [(l["groups"], l["n_neurons"]) for l in structure]
    reference = predict(cost, full) if reference is None else float(reference)

    def plan(s: float) -> Allocation:
        return allocate(norm_imp, structure, replace(cfg, target=s), scores=scores)

    lo, hi = 0.0, float(cfg.max_sparsity)
    start = plan(lo)
    if predict(cost, _kept(start)) > goal:
        at_max = plan(hi)
        if predict(cost, _kept(at_max)) > goal:
            start, lo = at_max, hi
        else:
            for _ in range(30):  # start: the last plan still over the goal
                mid = (lo + hi) / 2
                a = plan(mid)
                if predict(cost, _kept(a)) > goal:
                    start, lo = a, mid
                else:
                    hi = mid
    fine = _Touchup(structure, cfg, cost, _kept(start), norm_imp, scores if start.split == "salience" else None)
    if not fine.shrink_to(goal):
        unit = cost.unit
        raise ExplorerError(f"the {budget} budget cannot be met: with every layer at S_max {cfg.max_sparsity:g} the "
                            f"predicted cost is {fine.total():.4g} {unit}, the goal {goal:.4g} {unit} (reference "
                            f"{reference:.4g}): lower the target or raise S_max")
    fine.grow_within(goal)
    layers = [replace(lp, keep_groups=g, keep_neurons=n, params_after=int(fine.params_after(i, g, n)))
              for i, (lp, g, n) in enumerate(zip(start.layers, fine.g, fine.n))]
    predicted = fine.total()
    info = {"unit": cost.unit, "reference": reference, "goal": goal, "predicted": predicted, "s_base": lo}
    return Allocation(layers, lo, cfg.amplitude, cfg.mode, start.split, cfg.normalization, budget, info)


def allocate_latency(norm_imp, structure: list[dict], cfg: AllocationConfig, cost_model: Cost,
                     speedup: float | None = None, scores=None, reference_ms: float | None = None) -> Allocation:
    """The plan predicted to run `speedup` (default cfg.speedup) times faster than `reference_ms`
    (default: the structure at full width, by the cost model): goal = reference / speedup."""
    speedup = float(speedup or cfg.speedup)
    if not (math.isfinite(speedup) and speedup >= 1):
        raise ExplorerError(f"a latency budget needs a speed-up of at least 1, got {speedup}")
    reference = predict(cost_model, [(l["groups"], l["n_neurons"]) for l in structure]) \
        if reference_ms is None else float(reference_ms)
    alloc = allocate_to_cost(norm_imp, structure, cfg, cost_model, reference / speedup, scores, reference, "latency")
    alloc.cost.update(speedup_target=speedup, predicted_speedup=reference / alloc.cost["predicted"])
    return alloc


def allocate_flops(norm_imp, structure: list[dict], cfg: AllocationConfig, flops: Cost, scores=None,
                   reference: float | None = None, removed: float | None = None) -> Allocation:
    """The plan that removes the fraction `removed` (default cfg.target) of the block FLOPs per
    token of `reference` (default: the structure at full width)."""
    removed = cfg.target if removed is None else float(removed)
    if not (math.isfinite(removed) and 0 <= removed < 1):
        raise ExplorerError(f"the fraction of FLOPs to remove must be in [0, 1), got {removed}")
    reference = predict(flops, [(l["groups"], l["n_neurons"]) for l in structure]) \
        if reference is None else float(reference)
    alloc = allocate_to_cost(norm_imp, structure, cfg, flops, reference * (1 - removed), scores, reference, "flops")
    alloc.cost.update(removed_target=removed, removed_fraction=1 - alloc.cost["predicted"] / reference)
    return alloc


def plan_flops(alloc, structure: list[dict], head_dim: int, seq_len: int = 128) -> tuple[int, int]:
    """Forward FLOPs per token of the blocks before and after a plan, by the FLOPs budget's own model
    (latency.FlopsModel.from_structure, layer by layer: 2 per weight plus attention scores and mixing)."""
    before = after = 0.0
    for lp, st in zip(alloc.layers, structure):
        fm = FlopsModel.from_structure(st, head_dim, seq_len)
        before += fm.block(lp.groups, lp.neurons)
        after += fm.block(lp.keep_groups, lp.keep_neurons)
    return int(before), int(after)
