"""Layer drop (ShortGPT): remove whole blocks with the lowest cosine importance
I_L = -cos(h_in, h_out) (ShortGPT's Block Influence 1 - cos orders blocks the same way), then
recover.

The number of blocks is the whole number whose parameters come closest to the target fraction
of block parameters (at least one block always stays); the records report the fraction actually
removed. With K stages the blocks go in K steps (as evenly as whole blocks allow), importance
re-estimated on fresh calibration data before each step and recovery after each.
"""
from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from ..errors import ExplorerError
from ..surgery import drop_layers
from .base import MethodRun


def blocks_to_drop(layer_cos, block_params, fraction: float, max_blocks: int | None = None) -> list[int]:
    """Indices of the lowest-I_L blocks (ties: lower index first) whose total parameters come
    closest to `fraction` of all block parameters; never every block."""
    imp = np.asarray(layer_cos, dtype=np.float64)
    par = np.asarray(block_params, dtype=np.float64)
    order = np.lexsort((np.arange(len(imp)), imp))
    limit = len(imp) - 1 if max_blocks is None else min(max_blocks, len(imp) - 1)
    goal = fraction * par.sum()
    best_n, best_err = 0, goal
    removed = 0.0
    for n in range(1, limit + 1):
        removed += par[order[n - 1]]
        err = abs(removed - goal)
        if err < best_err - 1e-9:
            best_n, best_err = n, err
    return sorted(int(i) for i in order[:best_n])


class LayerDropRun(MethodRun):
    method = "layer-drop"
    chooses_widths = "it removes whole blocks, the lowest cosine importance first"

    def _body(self) -> Iterator[dict]:
        lm = self.lm
        adapter = lm.adapter
        n_layers = len(adapter.layers(lm.model))
        params = [b.params for b in adapter.blocks(lm.model)]
        alive = list(range(n_layers))  # original index of each current block
        dropped_all: list[int] = []
        done, n_total, K, k = 0, 0, 1, 0
        while k < K:
            k += 1
            t0 = time.perf_counter()
            texts, labels = self._calibration(k)
            imp = self._analyze(texts, labels, ("magnitude_l1",))
            yield {"type": "analysis", "stage": k, "importance": imp}
            if k == 1:  # the whole plan from the dense model: how many blocks in all
                plan = blocks_to_drop(imp.layer_cos, params, self.allocation.target)
                n_total = len(plan)
                if n_total == 0:
                    raise ExplorerError(f"target {self.allocation.target:g} is less than half a block's share of "
                                        f"the parameters ({1 / n_layers:.3f} per block): nothing to drop")
                K = max(1, min(self.prune.stages, n_total))
            n_k = round(n_total * k / K) - done
            order = np.lexsort((np.arange(len(imp.layer_cos)), imp.layer_cos))[:n_k]
            drop = plan if K == 1 else sorted(int(i) for i in order)
            originals = [alive[i] for i in drop]
            drop_layers(adapter, lm.model, drop)
            alive = [a for i, a in enumerate(alive) if i not in set(drop)]
            dropped_all += originals
            done += len(drop)
            yield {"type": "layer_drop", "stage": k, "dropped": sorted(originals),
                   "cosine_importance": [float(imp.layer_cos[i]) for i in drop]}
            losses: list[float] = []
            yield from self._train(k, self.prune, losses)
            kept_sparsity = [0.0] * len(alive)
            rec = self._record(k, losses, time.perf_counter() - t0, kept_sparsity,
                                    dropped=sorted(originals), kept_layers=list(alive))
            yield self._stage_event(rec)
        self.summary = {"dropped": sorted(dropped_all), "kept_layers": alive,
                        "removed_fraction": 1 - self.lm.block_params / self.original,
                        "target": self.allocation.target}


def make(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
    return LayerDropRun(lm, data, analysis, allocation, prune, opts=opts, label=label or f"layer-drop target={allocation.target:g}", **run_kw)
