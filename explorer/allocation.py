"""Per-layer sparsity allocation and its conversion into unit counts.

  S_L = clip(S_base - A·Î_L, 0, S_max)                         (reference, Adapt-Pruner)
  exact mode (our default, a departure from the reference): S_L = clip(S_base - A·Î_L + c, 0, S_max)
  with the shift c found by bisection so that Σ P_L·S_L = S_base·Σ P_L, i.e. what clipping
  removed is redistributed and the parameter budget is met exactly.
  uniform: S_L = S_base.
Î_L is the layer importance normalised by the caller (`Importance.normalized_by(cfg.normalization)`:
maxabs, the reference, or the rank / zscore departures); the plan records which.

Counts, split "proportional": a layer keeps round((1-S_L)·G) attention units (KV groups; at
least one), and its FFN neurons fill the rest of the layer's parameter budget (at least one),
so each layer's pruned size follows S_L to within one neuron even though heads are coarse.
Split "salience" (the default, given unit scores): of the ways to remove S_L·P_L parameters
(k = 0..G-1 attention units, neurons for the rest), take the one whose removed units have the
least summed salience (the lowest-scored k units plus the lowest-scored neurons): a
first-order estimate of the loss added (or, for fluctuation, of the squared output error),
compared per parameter across attention and FFN. In
exact mode
the neuron counts are rounded by largest remainder so the total is within one neuron of
the target.

Budgets: allocate() meets a *parameter* budget. FLOPs and latency budgets (AllocationConfig.budget)
are met by explorer.latency.allocate_flops / allocate_latency, which bisect S_base around
allocate() (so A still shapes the plan) and return the same Allocation, with `budget` and `cost` set.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .config import NORMALIZATIONS, AllocationConfig, choices_of
from .errors import ExplorerError

BUDGETS = choices_of(AllocationConfig, "budget")  # params (allocate), flops and latency (explorer.latency)


@dataclass
class LayerPlan:
    index: int
    importance: float  # Î_L
    sparsity: float  # S_L from the formula (or the manual value)
    clipped: bool  # the formula hit 0 or S_max here
    manual: bool
    keep_groups: int
    keep_neurons: int
    groups: int  # before
    neurons: int  # before
    params_before: int
    params_after: int

    @property
    def actual_sparsity(self) -> float:
        return 1 - self.params_after / self.params_before


@dataclass
class Allocation:
    layers: list[LayerPlan]
    target: float
    amplitude: float
    mode: str
    split: str = "proportional"  # how attention and FFN shared each layer's cut (see the module docstring)
    normalization: str = "maxabs"  # how I_L became Î_L (AllocationConfig.normalization)
    budget: str = "params"  # what the plan met: params, flops or latency (explorer.latency)
    cost: dict | None = None  # flops / latency budgets: unit, reference, goal, predicted (see explorer.latency)

    @property
    def params_before(self) -> int:
        return sum(l.params_before for l in self.layers)

    @property
    def params_after(self) -> int:
        return sum(l.params_after for l in self.layers)

    @property
    def removed_fraction(self) -> float:
        return 1 - self.params_after / self.params_before

    @property
    def clipped_layers(self) -> list[int]:
        return [l.index for l in self.layers if l.clipped]

    def to_json(self) -> dict:
        return {"target": self.target, "amplitude": self.amplitude, "mode": self.mode, "split": self.split,
                "normalization": self.normalization, "budget": self.budget, "cost": self.cost,
                "params_before": self.params_before, "params_after": self.params_after,
                "removed_fraction": self.removed_fraction,
                "layers": [{**asdict(l), "actual_sparsity": l.actual_sparsity} for l in self.layers]}

    @classmethod
    def from_json(cls, d: dict) -> "Allocation":
        """A plan read back from `to_json()` (the app's plan JSON) or from the `allocate` command's
        output (the analysis' layers with the plan's fields added and an "allocation" summary). Per
        layer the kept widths (keep_groups, keep_neurons) and the level (sparsity) are read as
        written; params_after is recomputed from the widths where the record has the per-unit
        parameter counts (the `allocate` output), so an edited width counts. Whether the plan fits
        a model is for the caller to check. Raises ExplorerError naming what is missing or wrong."""
        if not isinstance(d, dict) or not isinstance(d.get("layers"), list) or not d["layers"]:
            raise ExplorerError("not a plan: expected a JSON object with a non-empty 'layers' list "
                                "(the output of `allocate --json`)")
        meta = d["allocation"] if isinstance(d.get("allocation"), dict) else d
        layers = []
        for i, l in enumerate(d["layers"]):
            try:
                if not isinstance(l, dict):
                    raise TypeError("not an object")
                index = int(l.get("index", i))
                if index != i:
                    raise ValueError(f"index {index} out of order")
                g, n = int(l["keep_groups"]), int(l["keep_neurons"])
                if g != l["keep_groups"] or n != l["keep_neurons"]:
                    raise ValueError("keep_groups / keep_neurons must be whole numbers")
                G = int(l["groups"])
                N = int(l["n_neurons"] if "n_neurons" in l else l["neurons"])  # allocate's "neurons" are scores
                before = int(l["block_params"] if "block_params" in l else l["params_before"])
                if "group_params" in l and "neuron_params" in l:
                    after = before - (G - g) * int(l["group_params"]) - (N - n) * int(l["neuron_params"])
                else:
                    after = int(l["params_after"])
                level = float(l["sparsity"])
                importance = float(l.get("importance", l.get("normalized_importance", 0.0)))
            except (KeyError, TypeError, ValueError, OverflowError) as e:
                what = f"missing {e}" if isinstance(e, KeyError) else str(e)
                raise ExplorerError(f"not a plan: layer {i}: {what}") from None
            layers.append(LayerPlan(i, importance, level, bool(l.get("clipped", False)), bool(l.get("manual", False)),
                                    g, n, G, N, before, after))
        try:
            return cls(layers, float(meta.get("target", 0.0)), float(meta.get("amplitude", 0.0)),
                       str(meta.get("mode", "manual")), str(meta.get("split", "proportional")),
                       str(meta.get("normalization", "maxabs")), str(meta.get("budget", "params")), meta.get("cost"))
        except (TypeError, ValueError) as e:
            raise ExplorerError(f"not a plan: its allocation summary: {e}") from None


def validate(cfg: AllocationConfig) -> None:
    if not (isinstance(cfg.target, (int, float)) and math.isfinite(cfg.target) and 0 <= cfg.target < 1):
        raise ExplorerError(f"target sparsity must be in [0, 1), got {cfg.target}")
    if not (math.isfinite(cfg.amplitude) and 0 <= cfg.amplitude <= 1):
        raise ExplorerError(f"amplitude A must be in [0, 1] (sparsity units), got {cfg.amplitude}")
    if not (0 < cfg.max_sparsity < 1):
        raise ExplorerError(f"S_max must be in (0, 1), got {cfg.max_sparsity}")
    if cfg.target > cfg.max_sparsity:
        raise ExplorerError(f"target {cfg.target} exceeds S_max {cfg.max_sparsity}")
    if cfg.mode not in ("exact", "reference", "uniform", "search"):
        raise ExplorerError(f"unknown allocation mode '{cfg.mode}': use exact, reference, uniform or search")
    if cfg.split not in ("proportional", "salience"):
        raise ExplorerError(f"unknown split '{cfg.split}': use proportional or salience")
    if cfg.normalization not in NORMALIZATIONS:
        raise ExplorerError(f"unknown normalisation '{cfg.normalization}': use {', '.join(NORMALIZATIONS)}")
    if cfg.round_to < 1:
        raise ExplorerError(f"round_to must be at least 1, got {cfg.round_to}")
    if not (cfg.prune_attention or cfg.prune_mlp):
        raise ExplorerError("nothing to prune: enable attention and/or MLP pruning")
    if cfg.budget not in BUDGETS:
        raise ExplorerError(f"unknown budget '{cfg.budget}': use {', '.join(BUDGETS)}")
    if not (isinstance(cfg.speedup, (int, float)) and math.isfinite(cfg.speedup) and cfg.speedup >= 0):
        raise ExplorerError(f"speed-up must be a finite number >= 0, got {cfg.speedup}")
    if cfg.budget == "latency" and cfg.speedup < 1:
        raise ExplorerError(f"budget latency needs a speed-up of at least 1 (e.g. --speedup 1.6), got {cfg.speedup}")


def layer_sparsities(norm_imp, weights, cfg: AllocationConfig,
                     manual: dict[int, float] | None = None, base=None) -> tuple[np.ndarray, np.ndarray]:
    """Continuous S_L per layer and whether the formula was clipped there. Mode "search": `base` (the
    searched per-layer levels) takes the formula's place; hand edits and the exact shift apply as usual."""
    imp = np.asarray(norm_imp, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    manual = {int(k): float(v) for k, v in (manual or {}).items()}
    for k, v in manual.items():
        if not (0 <= k < len(imp)):
            raise ExplorerError(f"manual sparsity for layer {k}, but the model has layers 0..{len(imp) - 1}")
        if not (math.isfinite(v) and 0 <= v < 1):
            raise ExplorerError(f"manual sparsity for layer {k} must be in [0, 1), got {v}")
    if cfg.mode == "search":
        if base is None or len(base) != len(imp):
            raise ExplorerError("mode 'search' needs a searched plan: run the search first (app: Search; "
                                "CLI: allocate --mode search)")
        raw = np.asarray(base, dtype=np.float64)
    else:
        raw = np.full_like(imp, cfg.target) if cfg.mode == "uniform" else cfg.target - cfg.amplitude * imp
    free = np.array([i not in manual for i in range(len(imp))])
    s = np.clip(raw, 0.0, cfg.max_sparsity)
    if cfg.mode in ("exact", "search") and free.any():
        fixed = sum(w[i] * v for i, v in manual.items())
        goal = cfg.target * w.sum() - fixed

        def removed(c):
            return (w[free] * np.clip(raw[free] + c, 0.0, cfg.max_sparsity)).sum()

        lo, hi = -2.0, 2.0
        if removed(lo) <= goal <= removed(hi):
            for _ in range(80):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if removed(mid) < goal else (lo, mid)
            s = np.clip(raw + (lo + hi) / 2, 0.0, cfg.max_sparsity)
        else:  # manual values make the target unreachable: best effort
            s = np.clip(raw + (lo if removed(lo) > goal else hi), 0.0, cfg.max_sparsity)
        clipped = (raw + (lo + hi) / 2 < 0) | (raw + (lo + hi) / 2 > cfg.max_sparsity)
    else:
        clipped = (raw < 0) | (raw > cfg.max_sparsity)
    if cfg.mode == "uniform":
        clipped = np.zeros_like(free)
    for i, v in manual.items():
        s[i] = v
    clipped = clipped & free
    return s, clipped


def groups_to_keep(sl: float, layer: dict, scores: tuple[np.ndarray, np.ndarray] | None) -> int:
    """KV groups a layer keeps when attention and FFN are both pruned (see the module docstring)."""
    G, N, pg, pn = layer["groups"], layer["n_neurons"], layer["group_params"], layer["neuron_params"]
    if scores is None:  # proportional
        return int(min(G, max(1, round((1 - sl) * G))))
    g_scores, n_scores = (np.sort(np.asarray(x, dtype=np.float64)) for x in scores)  # ascending
    assert len(g_scores) == G and len(n_scores) == N, "scores do not fit the layer"
    g_cost = np.concatenate([[0.0], np.cumsum(g_scores)])  # (G+1,) salience of the k lowest groups
    n_cost = np.concatenate([[0.0], np.cumsum(n_scores)])  # (N+1,)
    remove = sl * layer["block_params"]
    best_k, best = 0, math.inf
    for k in range(G):  # remove k groups (never all), neurons for the rest of the budget
        m = math.ceil(max(0.0, remove - k * pg) / pn - 1e-9)
        if m > N - 1:
            continue
        if g_cost[k] + n_cost[m] < best:
            best_k, best = k, g_cost[k] + n_cost[m]
    if best == math.inf:  # neurons alone cannot reach S_L: cut attention as the proportional split does
        return groups_to_keep(sl, layer, None)
    return G - best_k


def allocate(norm_imp, structure: list[dict], cfg: AllocationConfig,
             manual: dict[int, float] | None = None,
             scores: list[tuple[np.ndarray, np.ndarray]] | None = None, base=None) -> Allocation:
    """`structure`: per layer {groups, n_neurons, group_params, neuron_params, block_params}
    (as recorded by importance analysis). `scores`: per layer (group scores, neuron scores),
    e.g. `Importance.unit_scores()`. Split "salience" uses them; without them (a plan from the
    layer importance alone) the split is proportional, as the returned `Allocation.split` says.
    `norm_imp` should be `Importance.normalized_by(cfg.normalization)`: the plan records
    cfg.normalization as the normalisation used."""
    validate(cfg)
    if len(structure) != len(norm_imp):
        raise ExplorerError("importance and model structure disagree on the number of layers")
    if scores is not None and len(scores) != len(structure):
        raise ExplorerError("unit scores and model structure disagree on the number of layers")
    if not (cfg.split == "salience" and cfg.prune_attention and cfg.prune_mlp):
        scores = None
    P = np.array([l["block_params"] for l in structure], dtype=np.float64)
    s, clipped = layer_sparsities(norm_imp, P, cfg, manual, base)
    exact = cfg.mode in ("exact", "search")
    manual = manual or {}
    k = cfg.round_to
    keep_g, neuron_f = [], []
    for i, (l, sl) in enumerate(zip(structure, s)):
        G, N, pg, pn, Pl = l["groups"], l["n_neurons"], l["group_params"], l["neuron_params"], l["block_params"]
        fixed = Pl - G * pg - N * pn  # layer norms, output biases: never pruned
        budget = (1 - sl) * Pl
        if cfg.prune_attention and cfg.prune_mlp:
            g = groups_to_keep(sl, l, scores[i] if scores else None)
            n = (budget - fixed - g * pg) / pn
        elif cfg.prune_attention:
            n = N
            g = int(min(G, max(1, round((budget - fixed - N * pn) / pg))))
        else:
            g = G
            n = (budget - fixed - G * pg) / pn
        keep_g.append(g)
        neuron_f.append(float(np.clip(n, 1, N)))
    # neurons in blocks of k (the last block of a width that is no multiple of k may be partial)
    widths_n = np.array([l["n_neurons"] for l in structure])
    units = np.array(neuron_f) / k
    max_units = np.ceil(widths_n / k)
    n_units = np.clip(np.floor(units) if exact else np.floor(units + 0.5), 1, max_units)

    def kept(u):
        return np.minimum(widths_n, u * k)

    if exact and cfg.prune_mlp:
        # largest remainder: add blocks where rounding down cost the most, until the total
        # neuron parameters are within half a block of what the budget leaves for neurons
        pn = np.array([l["neuron_params"] for l in structure], dtype=np.float64)
        want = P.sum() * (1 - cfg.target) - sum(
            l["block_params"] - l["n_neurons"] * l["neuron_params"] - (l["groups"] - g) * l["group_params"]
            for l, g in zip(structure, keep_g))
        order = [int(i) for i in np.argsort(-(units - np.floor(units)), kind="stable") if int(i) not in manual]
        grew = True
        while grew:
            grew = False
            for i in order:
                step = min(widths_n[i], (n_units[i] + 1) * k) - min(widths_n[i], n_units[i] * k)  # neurons
                if n_units[i] >= max_units[i] or want - (kept(n_units) * pn).sum() < step * pn[i] / 2:
                    continue
                n_units[i] += 1
                grew = True
    neurons_kept = kept(n_units).astype(int)
    layers = []
    for i, (l, g, n) in enumerate(zip(structure, keep_g, neurons_kept)):
        n = int(n)
        if not cfg.prune_mlp:
            n = l["n_neurons"]
        after = l["block_params"] - (l["groups"] - g) * l["group_params"] - (l["n_neurons"] - n) * l["neuron_params"]
        assert 1 <= g <= l["groups"] and 1 <= n <= l["n_neurons"]
        layers.append(LayerPlan(i, float(norm_imp[i]), float(s[i]), bool(clipped[i]), i in manual,
                                g, n, l["groups"], l["n_neurons"], int(l["block_params"]), int(after)))
    return Allocation(layers, cfg.target, cfg.amplitude, cfg.mode, "salience" if scores else "proportional",
                      cfg.normalization)
