"""APT-style adaptive pruning during fine-tuning (seed `apt-adaptive-pruner-logic.md`).

Per update t = 1..T (T = stages):
  1. salience: APT's outlier-aware score per attention unit and FFN neuron (metric "apt" of
     `explorer.importance.analyze`, measured with the current soft masks in place), put on a
     common scale across layers and kinds (below), then an EMA over updates:
     s_t = 0.9·s_{t-1} + 0.1·ŝ_t (s_1 = ŝ_1; momentum option `momentum`).
  2. budget: cubic schedule of the density kept, γ_t = γ_T + (1-γ_T)(1-t/T)^3, γ_T = 1 - target;
     the kept block parameters must not exceed γ_t · (dense block parameters).
  3. cut: all units of all layers ranked together by salience *density* (salience /
     parameters of the unit); the highest-salience head group and neuron of every layer are
     always kept; a binary search over the ranked list finds the longest prefix whose
     parameters fit the budget (`select_by_density`).
  4. fine-tuning (full fine-tuning, explorer.recovery; a "lora" choice is run as "full" because
     the masks sit on the frozen base path) with soft masks on every unit's output channels
     (forward pre-hooks on o_proj / down_proj scale the unit's activation): after every
     optimiser step each mask moves 0.01 (option `mask_step`) toward 0 if its unit is below the
     cut and toward 1 if it is above (`step_masks`).
  5. units whose mask reached 0 are removed physically (exact: their output was already 0).
After the last update every unit below the cut is removed with `surgery.prune_block` and the
soft masks of the survivors are folded into the weights (W[:, unit] *= m), so the saved model is
a plain, physically smaller model without hooks.

Departure, stated: `analyze`'s "apt" divides each term by its mean over the layer's units, so
it is only comparable within one (layer, kind). To rank units of different layers and kinds by
density we rescale it per (layer, kind) so its mean equals the mean first-order Taylor score
|W ⊙ ∂L/∂W| of those units (additive over parameters, so comparable everywhere): the APT score
decides the order inside a layer, the Taylor scale the trade-off between layers and kinds.
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch

from ..config import APTOptions
from ..errors import ExplorerError
from ..surgery import prune_block
from .base import MethodRun, add_metric

KINDS = ("attention", "mlp")


def cubic_schedule(t: float, T: float, final_density: float) -> float:
    """Density kept at update t of T: γ_t = γ_T + (1-γ_T)(1-t/T)^3 (t clipped to [0, T])."""
    if T <= 0:
        return float(final_density)
    x = min(max(t / T, 0.0), 1.0)
    return float(final_density + (1 - final_density) * (1 - x) ** 3)


def ema_update(prev: np.ndarray | None, new: np.ndarray, momentum: float = 0.9) -> np.ndarray:
    """Exponential moving average: momentum·prev + (1-momentum)·new (new when there is no prev)."""
    new = np.asarray(new, dtype=np.float64)
    if prev is None:
        return new.copy()
    return momentum * np.asarray(prev, dtype=np.float64) + (1 - momentum) * new


def step_masks(mask: torch.Tensor, keep: torch.Tensor, step: float = 0.01) -> torch.Tensor:
    """Move every mask value `step` toward 1 (keep) or 0 (prune), in place, clamped to [0, 1]."""
    direction = keep.to(mask.dtype) * 2 - 1  # +1 keep, -1 prune
    return mask.add_(step * direction).clamp_(0.0, 1.0)


def select_by_density(salience, params, budget: float, always_keep=None) -> tuple[np.ndarray, float]:
    """Keep the units with the highest salience density (salience / params) whose parameters
    fit in `budget`. Units in `always_keep` are kept first (they count against the budget).
    Binary search over the ranked list for the longest prefix that fits. Returns (keep mask,
    density threshold: the density of the last unit kept by the ranking, inf if none)."""
    sal = np.asarray(salience, dtype=np.float64)
    par = np.asarray(params, dtype=np.float64)
    n = len(sal)
    forced = np.zeros(n, bool) if always_keep is None else np.asarray(always_keep, bool).copy()
    density = sal / np.maximum(par, 1)
    rest = np.flatnonzero(~forced)
    rest = rest[np.lexsort((rest, -density[rest]))]  # by density descending, ties by index
    cum = np.concatenate([[0.0], np.cumsum(par[rest])])
    spent = par[forced].sum()
    lo, hi = 0, len(rest)  # invariant: prefix lo fits; prefix hi+1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if spent + cum[mid] <= budget:
            lo = mid
        else:
            hi = mid - 1
    keep = forced
    keep[rest[:lo]] = True
    return keep, float(density[rest[lo - 1]]) if lo > 0 else float("inf")


class APTRun(MethodRun):
    method = "apt"
    Options = APTOptions

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.mask_step = self.opts.mask_step
        self.momentum = self.opts.momentum
        self.masks: dict[tuple[int, str], torch.Tensor] = {}
        self.targets: dict[tuple[int, str], torch.Tensor] = {}
        self.ema: dict[tuple[int, str], np.ndarray] = {}
        self._hooks: dict[tuple[int, str], object] = {}
        self.mask_updates = 0

    # --- masks as forward pre-hooks -----------------------------------------------------
    def _install_hooks(self) -> None:
        for b in self.lm.adapter.blocks(self.lm.model):
            for g in (b.attn, b.mlp):
                key = (b.index, g.kind)
                dev = g.out_module.weight.device  # the masks live where the activations they scale do
                self.masks[key] = torch.ones(g.n_units, device=dev)  # float32: 0.01 steps are exact enough
                self.targets[key] = torch.ones(g.n_units, dtype=torch.bool, device=dev)
                self._hooks[key] = g.out_module.register_forward_pre_hook(self._hook(key, g.act_unit_size))

    def _hook(self, key, size):
        def hook(module, args):
            m = self.masks[key]
            if bool((m == 1).all()):
                return None
            x = args[0]  # scaled in float32, rounded once to the activations' dtype
            return ((x * m.repeat_interleave(size)).to(x.dtype),) + tuple(args[1:])
        return hook

    def _cleanup(self) -> None:
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()

    def _fold(self, model) -> None:
        """Multiply each unit's input columns of o_proj / down_proj by its mask and drop the hooks."""
        with torch.no_grad():
            for (i, kind), m in self.masks.items():
                b = self.lm.adapter.block(model, i)
                g = b.attn if kind == "attention" else b.mlp
                h = self._hooks.get((i, kind))
                if h is not None:
                    g.out_module._forward_pre_hooks.pop(h.id, None)
                if bool((m == 1).all()):
                    continue
                s = next(s for s in g.slices if s.module is g.out_module and s.name == "weight")
                scale = m.repeat_interleave(g.act_unit_size).to(s.param.device)  # float32: one rounding
                shape = [1] * s.param.dim()
                shape[s.dim] = -1
                s.param.data.mul_(scale.view(shape))

    def _snapshot(self):
        model = copy.deepcopy(self.lm.model)
        if self._hooks:
            self._fold(model)
        return model

    def _move_masks(self) -> None:
        for key in self.masks:
            step_masks(self.masks[key], self.targets[key], self.mask_step)
        self.mask_updates += 1

    # --- salience -----------------------------------------------------------------------
    def _salience(self, imp) -> dict[tuple[int, str], np.ndarray]:
        out = {}
        for i in range(imp.n_layers):
            for kind, apt, tay in (("attention", imp.groups["apt"][i], imp.groups["taylor"][i]),
                                   ("mlp", imp.neurons["apt"][i], imp.neurons["taylor"][i])):
                apt = np.asarray(apt, np.float64)
                scale = float(np.mean(tay)) / max(float(np.mean(apt)), 1e-30)
                out[(i, kind)] = apt * scale
        return out

    def _remove(self, final: bool) -> None:
        """Physically remove units whose mask is 0 (and, at the end, every unit below the cut)."""
        lm = self.lm
        for i in range(len(lm.adapter.layers(lm.model))):
            keeps = {}
            for kind in KINDS:
                m, t = self.masks[(i, kind)], self.targets[(i, kind)]
                gone = (m <= 0) | (~t if final else torch.zeros_like(t))
                keeps[kind] = torch.nonzero(~gone).flatten().tolist()
            prune_block(lm.adapter, lm.model, i, keeps["attention"], keeps["mlp"])
            for kind in KINDS:
                idx = keeps[kind]
                self.masks[(i, kind)] = self.masks[(i, kind)][idx].clone()
                self.targets[(i, kind)] = self.targets[(i, kind)][idx].clone()
                self.ema[(i, kind)] = self.ema[(i, kind)][idx]

    # --- the run ------------------------------------------------------------------------
    def _body(self) -> Iterator[dict]:
        lm, K = self.lm, self.prune.stages
        if lm.task not in ("classification", "causal-lm"):
            raise ExplorerError("APT's salience needs gradients: use a classifier or a causal LM")
        cfg = self.prune
        if cfg.recovery == "lora":
            cfg = replace(cfg, recovery="full")
        teacher = self.teacher
        final_density = 1 - self.allocation.target
        dense_layer = [b.params for b in lm.adapter.blocks(lm.model)]
        self._install_hooks()
        for k in range(1, K + 1):
            t0 = time.perf_counter()
            texts, labels = self._calibration(k)
            imp = self._analyze(texts, labels, ("apt", "taylor"), metric="apt")
            fresh = self._salience(imp)
            for key, v in fresh.items():
                self.ema[key] = ema_update(self.ema.get(key), v, self.momentum)
            add_metric(imp, "apt_ema", lambda kind, i, where: (
                self.ema[(i, kind)] if where != "heads" else
                np.repeat(self.ema[(i, kind)], imp.params[i]["heads_per_group"]) / imp.params[i]["heads_per_group"]))
            yield {"type": "analysis", "stage": k, "importance": imp}
            gamma = cubic_schedule(k, K, final_density)
            keys, sal, par, forced = [], [], [], []
            for b in lm.adapter.blocks(lm.model):
                for g in (b.attn, b.mlp):
                    key = (b.index, g.kind)
                    s = self.ema[key]
                    top = int(np.argmax(s))
                    for u in range(g.n_units):
                        keys.append((key, u))
                        sal.append(s[u])
                        par.append(g.params_per_unit)
                        forced.append(u == top)
            unit_params = float(np.sum(par))
            fixed = lm.block_params - unit_params  # layer norms, output biases: never pruned
            budget = gamma * self.original - fixed
            keep, threshold = select_by_density(sal, par, budget, forced)
            for key in self.targets:
                self.targets[key].zero_()
            for (key, u), kp in zip(keys, keep):
                self.targets[key][u] = bool(kp)
            losses: list[float] = []
            trains = cfg.recovery != "none" and cfg.recovery_steps > 0
            yield from self._train(k, cfg, losses, teacher, after_step=self._move_masks)
            if not trains:
                self._move_masks()
            self._remove(final=(k == K))
            if k == K:
                self._fold(lm.model)
                self._hooks.clear()
            target_removed = 1 - (fixed + float(np.dot(keep, par))) / self.original
            sparsity = []
            for b, dense_params in zip(lm.adapter.blocks(lm.model), dense_layer):
                # effective: units below the cut count as removed already
                eff = b.params - sum(int((~self.targets[(b.index, g.kind)]).sum()) * g.params_per_unit
                                     for g in (b.attn, b.mlp))
                sparsity.append(1 - eff / dense_params)
            mask_mean = float(torch.cat([m for m in self.masks.values()]).mean()) if self.masks else 1.0
            rec = self._make_record(k, losses, time.perf_counter() - t0, sparsity,
                                    density_target=gamma, below_cut_fraction=target_removed,
                                    density_threshold=threshold if np.isfinite(threshold) else None,
                                    mask_mean=mask_mean,
                                    mask_updates=self.mask_updates)
            yield self._stage_event(rec)
        self.summary = {"final_density_target": final_density, "mask_step": self.mask_step,
                        "momentum": self.momentum, "mask_updates": self.mask_updates,
                        "fine_tuning": cfg.recovery}


def make(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
    return APTRun(lm, data, analysis, allocation, prune, opts=opts, label=label or f"apt target={allocation.target:g}",
                  **run_kw)
