"""A per-layer allocation searched on the real model (allocation mode "search").

EvoPress-style (1 + λ) evolutionary search over per-layer sparsity levels on a grid of `step`:

  start   the best, on the large val slice, of uniform, the adaptive plan (S_L = S_base − A·Î_L) and,
          with a measured predictor (explorer.predict), the predictor's optimum;
  mutate  level switches: move one level of sparsity from one layer to another (1..max_moves of
          them), so the parameter total stays fixed; levels stay in [0, S_max];
  select  multi-step: λ offspring ranked on `small` val tokens (or examples), the best `survivors`
          re-scored on `large` ones against the parent; the best of them replaces the parent if
          better. With a predictor, 3λ candidates are drawn and the λ it predicts best are scored.

Fitness is the real model's val loss (mean NLL per token, or cross-entropy) with the plan's removed
units zeroed in place (`methods.base.zeroed_units`: exact for a cut, no copy), units chosen as a run
chooses them (the analysis metric within each layer, the plan's attention / FFN split). Never the
test split. `PlanSearch.events()` streams one event per generation (the search curve, trials per
second, ETA); `stop()` ends it with the best plan so far.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Iterator

import numpy as np

from .allocation import Allocation, allocate
from .config import AllocationConfig, SearchConfig
from .data import TextData
from .errors import ExplorerError
from .importance import Importance
from .methods.base import zeroed_units
from .models import LoadedModel
from .predict import Predictor, ValScorer
from .pruning import plan_keeps


class Grid:
    """Per-layer levels k_L (sparsity k_L·step) at a fixed parameter total."""

    def __init__(self, params: list[dict], target: float, step: float, max_sparsity: float):
        self.P = np.array([l["block_params"] for l in params], dtype=np.float64)  # (L,)
        self.step, self.kmax = step, int(np.floor(max_sparsity / step + 1e-9))
        self.goal = target * self.P.sum()  # parameters to remove
        if target > self.kmax * step + 1e-9:
            raise ExplorerError(f"target {target} cannot be met on levels of {step} up to S_max {max_sparsity}")

    def sparsity(self, k: np.ndarray) -> list[float]:
        return [float(x) for x in k * self.step]

    def removed(self, k: np.ndarray) -> float:
        return float((self.P * k * self.step).sum())

    def snap(self, s) -> np.ndarray:
        """The nearest grid plan to continuous levels `s` that removes the goal (largest remainder)."""
        u = np.clip(np.asarray(s, dtype=np.float64) / self.step, 0, self.kmax)  # (L,) fractional levels
        k = np.floor(u).astype(int)
        order = np.argsort(-(u - k), kind="stable")
        for i in list(order) * (self.kmax + 1):
            if self.removed(k) + self.P[i] * self.step / 2 > self.goal:
                break
            if k[i] < self.kmax:
                k[i] += 1
        return k

    def mutate(self, k: np.ndarray, rng: np.random.Generator, moves: int) -> np.ndarray | None:
        """`moves` level switches (one level from layer b to layer a), each keeping the total when the
        layers are the same size; None when no legal switch exists."""
        v = k.copy()
        for _ in range(moves):
            up = np.flatnonzero(v < self.kmax)
            down = np.flatnonzero(v > 0)
            if len(up) == 0 or len(down) == 0:
                return None
            a, b = int(rng.choice(up)), int(rng.choice(down))
            if a == b or abs(self.P[a] - self.P[b]) > 1e-9 * self.P[a]:  # unequal layers would move the total
                continue
            v[a] += 1
            v[b] -= 1
        return None if np.array_equal(v, k) else v


def predicted_optimum(pred: Predictor, grid: Grid, start: np.ndarray, max_rounds: int = 2000) -> np.ndarray:
    """The predictor's best grid plan near `start`: greedy level switches, each the one that lowers the
    predicted val loss most (exact on the grid: Δ tabulated per layer and level), until none does."""
    L, K = len(grid.P), grid.kmax
    table = np.array([[pred.layer_delta(i, j * grid.step, loss=True) for j in range(K + 1)]
                      for i in range(L)])  # (L, K+1): Δ val loss, lower is better
    k = start.copy()
    same = np.abs(grid.P[:, None] - grid.P[None, :]) <= 1e-9 * grid.P.max()  # (L, L) layers of one size
    for _ in range(max_rounds):
        rows = np.arange(L)
        gain_up = np.where(k < K, table[rows, np.minimum(k + 1, K)] - table[rows, k], np.inf)  # (L,) cost of +1
        gain_down = np.where(k > 0, table[rows, np.maximum(k - 1, 0)] - table[rows, k], np.inf)  # (L,) of −1
        total = gain_up[:, None] + gain_down[None, :]  # (L, L): a up, b down
        total[~same] = np.inf
        np.fill_diagonal(total, np.inf)
        a, b = np.unravel_index(int(np.argmin(total)), total.shape)
        if not total[a, b] < -1e-12:
            break
        k[a] += 1
        k[b] -= 1
    return k


class PlanSearch:
    """The search over one loaded model (its units scored by `imp`); see the module docstring."""

    def __init__(self, lm: LoadedModel, data: TextData, imp: Importance, allocation: AllocationConfig,
                 cfg: SearchConfig | None = None, predictor: Predictor | None = None,
                 fits: Callable[[Allocation], bool] | None = None):
        self.lm, self.data, self.imp = lm, data, imp
        self.alloc_cfg, self.cfg = allocation, cfg or SearchConfig()
        if not (0 < allocation.target < 1):
            raise ExplorerError(f"the search needs a target in (0, 1), got {allocation.target}")
        if self.cfg.survivors > self.cfg.offspring:
            raise ExplorerError(f"survivors ({self.cfg.survivors}) cannot exceed offspring ({self.cfg.offspring})")
        self.predictor = predictor
        self.fits = fits  # a FLOPs / latency budget: offspring that break it are never scored
        self.grid = Grid(imp.params, allocation.target, self.cfg.step, allocation.max_sparsity)
        self.scorer = ValScorer(lm, data, max(self.cfg.small, self.cfg.large))
        self.norm, self.scores = imp.normalized_by(allocation.normalization), imp.unit_scores()
        self.best: Allocation | None = None
        self.best_k: np.ndarray | None = None
        self.best_loss = float("inf")
        self.curve: list[dict] = []  # {"trial", "seconds", "loss"}: the best (large slice) after each generation
        self.start: dict[str, float] = {}
        self.trials = 0
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    def plan(self, k: np.ndarray) -> Allocation:
        """The Allocation of grid levels k (mode "search": hand edits and the exact shift still apply)."""
        cfg = replace(self.alloc_cfg, mode="search")
        return allocate(self.norm, self.imp.params, cfg, scores=self.scores, base=self.grid.sparsity(k))

    def loss(self, k: np.ndarray, limit: int) -> float:
        """Mean val loss with the plan's removed units zeroed (no copy of the model)."""
        alloc = self.plan(k)
        with zeroed_units(self.lm, plan_keeps(self.imp, alloc)):
            losses, _ = self.scorer.losses(self.lm, limit)
        self.trials += 1
        return float(losses.mean())

    def _starts(self) -> dict[str, np.ndarray]:
        c = self.alloc_cfg
        out = {"uniform": self.grid.snap([c.target] * len(self.grid.P))}
        adaptive = allocate(self.norm, self.imp.params, replace(c, mode="exact"), scores=self.scores)
        out[f"adaptive A={c.amplitude:g}"] = self.grid.snap([lp.sparsity for lp in adaptive.layers])
        if self.predictor is not None:
            out["predictor optimum"] = predicted_optimum(self.predictor, self.grid, out["uniform"])
        return out

    def events(self) -> Iterator[dict]:
        """{"type": "start"}, one {"type": "generation"} per generation, then {"type": "done"} (also after
        Stop or the time limit, with the best plan so far)."""
        cfg, t0 = self.cfg, time.perf_counter()
        rng = np.random.default_rng(cfg.seed)
        starts = self._starts()
        seen: set[tuple] = set()
        for name, k in starts.items():
            if self._stop:
                break
            key = tuple(int(x) for x in k)
            loss = self.loss(k, cfg.large)
            seen.add(key)
            self.start[name] = loss
            if loss < self.best_loss:
                self.best_k, self.best_loss, chosen = k, loss, name
        if self.best_k is None:
            raise ExplorerError("the search was stopped before its first trial: the plan is unchanged")
        self.best = self.plan(self.best_k)
        self.curve.append({"trial": self.trials, "seconds": time.perf_counter() - t0, "loss": self.best_loss})
        yield {"type": "start", "start": dict(self.start), "chosen": chosen, "loss": self.best_loss,
               "metric": self.scorer.metric, "generations": cfg.generations}
        reason = "finished"
        for g in range(1, cfg.generations + 1):
            if self._stop:
                reason = "stopped"
                break
            if cfg.max_seconds and time.perf_counter() - t0 > cfg.max_seconds:
                reason = "time limit"
                break
            kids = self._offspring(rng, seen)
            if not kids:
                reason = "no new plans"
                break
            ranked = sorted((self.loss(k, cfg.small), i) for i, k in enumerate(kids))
            improved = False
            for _, i in ranked[: cfg.survivors]:
                loss = self.loss(kids[i], cfg.large)
                if loss < self.best_loss:
                    self.best_k, self.best_loss, improved = kids[i], loss, True
            if improved:
                self.best = self.plan(self.best_k)
            el = time.perf_counter() - t0
            self.curve.append({"trial": self.trials, "seconds": el, "loss": self.best_loss})
            per_gen = el / g
            left = cfg.generations - g
            eta = per_gen * left if not cfg.max_seconds else min(per_gen * left, max(0.0, cfg.max_seconds - el))
            yield {"type": "generation", "generation": g, "generations": cfg.generations, "loss": self.best_loss,
                   "improved": improved, "trials": self.trials, "trials_per_s": self.trials / el if el else 0.0,
                   "eta_s": eta, "seconds": el, "sparsity": self.grid.sparsity(self.best_k)}
        yield {"type": "done", "reason": reason, "allocation": self.best, "loss": self.best_loss,
               "start": dict(self.start), "trials": self.trials, "seconds": time.perf_counter() - t0,
               "curve": list(self.curve)}

    def _offspring(self, rng: np.random.Generator, seen: set[tuple]) -> list[np.ndarray]:
        cfg = self.cfg
        want = cfg.offspring * (3 if (self.predictor is not None and cfg.prescreen) else 1)
        kids: list[np.ndarray] = []
        for _ in range(want * 20):
            if len(kids) >= want:
                break
            k = self.grid.mutate(self.best_k, rng, int(rng.integers(1, cfg.max_moves + 1)))
            if k is None:
                continue
            key = tuple(int(x) for x in k)
            if key in seen:
                continue
            seen.add(key)
            if self.fits is not None and not self.fits(self.plan(k)):
                continue
            kids.append(k)
        if self.predictor is not None and cfg.prescreen and len(kids) > cfg.offspring:
            kids.sort(key=lambda k: self.predictor.additive(self.grid.sparsity(k), loss=True))
            kids = kids[: cfg.offspring]
        return kids

    def run(self) -> Allocation:
        """Run to the end; the best plan."""
        for _ in self.events():
            pass
        return self.best

