"""Distillation baseline: a student of the same depth at the target width, trained only by
distillation from the dense teacher.

The student is the dense model pruned one-shot and *uniformly* (the same sparsity S_base in
every layer, units chosen by `analysis.metric`; or to the per-layer table when it was set by hand), then trained for the same number of steps as
the other methods' whole recovery budget (stages x recovery_steps) with the distillation loss
alone, as DistilBERT's recipe (Sanh et al. 2019) without its masked-LM term:
    KL(teacher || student) on logits softened by `kd_temperature`  (kd_alpha = 1, no task loss)
    + distill_hidden_weight · hidden-state loss (explorer.recovery.hidden_kd_loss: the residual
      stream after every kd_hidden_every-th block and the last, cosine as DistilBERT or mse as Minitron).
The student keeps every block, so each of its hidden states has the teacher's shape and index.
A baseline for the adaptive methods: same size, same training budget, no adaptivity.
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Iterator

from ..allocation import allocate
from ..config import DistillOptions
from ..errors import ExplorerError
from ..pruning import apply_allocation
from .base import MethodRun, total_steps


class DistillBaselineRun(MethodRun):
    method = "distill-baseline"
    Options = DistillOptions

    def _body(self) -> Iterator[dict]:
        lm = self.lm
        if lm.task not in ("classification", "causal-lm"):
            raise ExplorerError("distillation needs logits: use a classifier or a causal LM")
        teacher = self.teacher or copy.deepcopy(lm.model).eval()
        t0 = time.perf_counter()
        texts, labels = self._calibration(1)
        imp = self._analyze(texts, labels, (self.analysis.metric,))
        yield {"type": "analysis", "stage": 1, "importance": imp}
        alloc = self._one_shot_plan(imp) or allocate(imp.normalized_by(self.allocation.normalization), imp.params,
                                                     replace(self.allocation, mode="uniform"),
                                                     scores=imp.unit_scores())
        apply_allocation(lm, imp, alloc)
        steps = total_steps(self.prune)
        cfg = replace(self.prune, recovery="kd" if steps > 0 else "none", kd_alpha=1.0, recovery_steps=steps,
                      kd_hidden_weight=self.opts.distill_hidden_weight, kd_hidden_loss=self.opts.distill_hidden_loss)
        losses: list[float] = []
        yield from self._train(1, cfg, losses, teacher)
        rec = self._record(1, losses, time.perf_counter() - t0, [l.sparsity for l in alloc.layers],
                                distill_steps=steps, kd_temperature=self.prune.kd_temperature,
                                hidden_weight=cfg.kd_hidden_weight, hidden_loss=cfg.kd_hidden_loss)
        yield self._stage_event(rec)
        student = ("one-shot prune of the dense model to the per-layer table set by hand" if self.final_plan is not None
                   else "uniform one-shot prune of the dense model")
        self.summary = {"student": student, "distill_steps": steps,
                        "loss": "KL(teacher || student) on logits (kd_alpha = 1)"
                                + (f" + {cfg.kd_hidden_weight:g} x {cfg.kd_hidden_loss} hidden-state loss every "
                                   f"{cfg.kd_hidden_every} blocks" if cfg.kd_hidden_weight > 0 else "")}


def make(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
    return DistillBaselineRun(lm, data, analysis, allocation, prune, opts=opts, label=label or "distill-baseline", **run_kw)
