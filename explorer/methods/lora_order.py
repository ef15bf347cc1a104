"""Where LoRA goes relative to pruning (seed `other-pruning-techniques.md`): three pipelines with
the same pruning and the same number of LoRA optimiser steps, T = stages x recovery_steps.

  lora-before    LoRA fine-tune the dense model for T steps (merged into the weights), then prune
                 adaptively in `stages` stages with no training, then evaluate.
  lora-after     prune adaptively in `stages` stages with no training, then LoRA fine-tune the
                 pruned model for T steps (merged), then evaluate.
  lora-prune-ft  the document's recommended pipeline: LoRA fine-tune the dense model for
                 round(pre_fraction·T) steps (merged), prune adaptively, then fine-tune the pruned
                 model with LoRA for the remaining steps (merged), then evaluate.

Pruning is Adapt-Pruner's (units by `analysis.metric`, per-layer allocation as configured); when
the recovery starts with "reconstruct" every cut is refit (explorer.reconstruct) in all three, so
they differ only in where the T steps go. Each report carries `summary.pipeline` with the
intermediate numbers (dense after LoRA, pruned before LoRA) next to the dense and final ones and
the steps of each phase, so the runs compare directly in the history.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterator

from ..config import LoraPruneFtOptions
from ..errors import ExplorerError
from ..evaluate import metric_name
from .base import MethodRun, total_steps


ORDERS = ("before", "after", "prune-ft")


class LoraOrderRun(MethodRun):
    Options = LoraPruneFtOptions

    def __init__(self, *a, order: str = "before", **kw):
        super().__init__(*a, **kw)
        if order not in ORDERS:
            raise ExplorerError(f"order must be one of {', '.join(ORDERS)}, got '{order}'")
        self.order = order
        self.method = f"lora-{order}"

    def split_steps(self, T: int) -> tuple[int, int]:
        """(LoRA steps on the dense model, LoRA steps on the pruned model), summing to T."""
        if self.order == "before":
            return T, 0
        if self.order == "after":
            return 0, T
        pre = int(round(self.opts.pre_fraction * T))
        return pre, T - pre

    def _importance(self, k: int):
        texts, labels = self._calibration(k)
        return self._analyze(texts, labels, (self.analysis.metric,))

    def _body(self) -> Iterator[dict]:
        lm = self.lm
        if lm.task not in ("classification", "causal-lm"):
            raise ExplorerError("LoRA fine-tuning needs a task head: use a classifier or a causal LM")
        m = metric_name(lm)
        T = total_steps(self.prune)
        pre, post = self.split_steps(T)
        none = replace(self.prune, recovery="none")
        pipeline = {"order": self.method, "lora_steps": T, "lora_steps_dense": pre, "lora_steps_pruned": post,
                    "dense": self.dense.get(m)}
        self.summary = {"pipeline": pipeline}
        if pre:
            t0 = time.perf_counter()
            losses: list[float] = []
            yield from self._train(0, replace(self.prune, recovery="lora", recovery_steps=pre), losses)
            ev = self._eval()
            pipeline["dense_after_lora"] = ev.get(m)
            self._commit()
            yield {"type": "lora", "phase": "dense model, before pruning", "eval": ev, "losses": losses,
                   "seconds": time.perf_counter() - t0}

        def lora_last(k: int, losses: list[float]) -> Iterator[dict]:
            if k < self.prune.stages or not post:
                return
            ev = self._eval()
            pipeline["pruned_before_lora"] = ev.get(m)
            yield {"type": "lora", "phase": "pruned model, before LoRA", "eval": ev}
            yield from self._train(k, replace(self.prune, recovery="lora", recovery_steps=post), losses)
        yield from self._structured_stages(self._importance, cfg=none, before_record=lora_last)
        pipeline["final"] = self.records[-1].quality.get(m) if self.records else None


def _factory(order: str, default_label: str):
    def make(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
        return LoraOrderRun(lm, data, analysis, allocation, prune, order=order, opts=opts,
                            label=label or default_label, **run_kw)
    return make


make_before = _factory("before", "lora-before (LoRA, then prune)")
make_after = _factory("after", "lora-after (prune, then LoRA)")
make_prune_ft = _factory("prune-ft", "lora-prune-ft (LoRA, prune, LoRA)")
