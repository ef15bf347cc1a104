"""Distillation baseline: a student of the same depth at the target width, trained only by
distillation from the dense teacher.

The student is the dense model pruned one-shot and *uniformly* (the same sparsity S_base in
every layer, units chosen by `analysis.metric`), then trained for the same number of steps as
the other methods' whole recovery budget (stages x recovery_steps) with the distillation loss
alone: KL(teacher || student) on logits softened by `kd_temperature` (kd_alpha = 1, no task
loss). A baseline for the adaptive methods: same size, same training budget, no adaptivity.
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Iterator

from ..allocation import allocate
from ..errors import ExplorerError
from ..pruning import apply_allocation
from .base import MethodRun, total_steps


class DistillBaselineRun(MethodRun):
    method = "distill-baseline"

    def _body(self) -> Iterator[dict]:
        lm = self.lm
        if lm.task not in ("classification", "causal-lm"):
            raise ExplorerError("distillation needs logits: use a classifier or a causal LM")
        teacher = self.teacher or copy.deepcopy(lm.model).eval()
        t0 = time.perf_counter()
        texts, labels = self._calibration(1)
        imp = self._analyze(texts, labels, (self.analysis.metric,))
        yield {"type": "analysis", "stage": 1, "importance": imp}
        alloc = allocate(imp.normalized_by(self.allocation.normalization), imp.params,
                         replace(self.allocation, mode="uniform"), scores=imp.unit_scores())
        apply_allocation(lm, imp, alloc)
        steps = total_steps(self.prune)
        cfg = replace(self.prune, recovery="kd" if steps > 0 else "none", kd_alpha=1.0, recovery_steps=steps)
        losses: list[float] = []
        yield from self._train(1, cfg, losses, teacher)
        rec = self._make_record(1, losses, time.perf_counter() - t0, [l.sparsity for l in alloc.layers],
                                distill_steps=steps, kd_temperature=self.prune.kd_temperature)
        yield self._stage_event(rec)
        self.summary = {"student": "uniform one-shot prune of the dense model", "distill_steps": steps,
                        "loss": "KL(teacher || student) only (kd_alpha = 1)"}


def make(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
    return DistillBaselineRun(lm, data, analysis, allocation, prune, opts=opts, label=label or "distill-baseline", **run_kw)
