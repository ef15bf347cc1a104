"""LoRA before or after pruning (seed `other-pruning-techniques.md`): two pipelines with the
same pruning and the same number of LoRA steps, T = stages x recovery_steps.

  lora-before  LoRA fine-tune the dense model for T steps (merged into the weights), then prune
               adaptively in `stages` stages with no recovery, then evaluate.
  lora-after   prune adaptively in `stages` stages with no recovery, then LoRA fine-tune the
               pruned model for T steps (merged), then evaluate.

Pruning is Adapt-Pruner's (units by `analysis.metric`, per-layer allocation as configured).
Both reports carry `summary.pipeline` with the intermediate number (dense after LoRA, or pruned
before LoRA) next to the dense and final ones, so two runs in the history compare directly.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterator

from ..errors import ExplorerError
from ..evaluate import metric_name
from .base import MethodRun, total_steps


class LoraOrderRun(MethodRun):
    def __init__(self, *a, order: str = "before", **kw):
        super().__init__(*a, **kw)
        if order not in ("before", "after"):
            raise ExplorerError(f"order must be before or after, got '{order}'")
        self.order = order
        self.method = f"lora-{order}"

    def _importance(self, k: int):
        texts, labels = self._calibration(k)
        return self._analyze(texts, labels, (self.analysis.metric,))

    def _body(self) -> Iterator[dict]:
        lm = self.lm
        if lm.task not in ("classification", "causal-lm"):
            raise ExplorerError("LoRA fine-tuning needs a task head: use a classifier or a causal LM")
        m = metric_name(lm)
        T = total_steps(self.prune)
        lora = replace(self.prune, recovery="lora" if T > 0 else "none", recovery_steps=T)
        none = replace(self.prune, recovery="none")
        pipeline = {"order": self.method, "lora_steps": T, "dense": self.dense.get(m)}
        self.summary = {"pipeline": pipeline}
        if self.order == "before":
            t0 = time.perf_counter()
            losses: list[float] = []
            yield from self._train(0, lora, losses)
            ev = self._eval()
            pipeline["dense_after_lora"] = ev.get(m)
            self._commit()
            yield {"type": "lora", "phase": "dense model, before pruning", "eval": ev, "losses": losses,
                   "seconds": time.perf_counter() - t0}
            yield from self._structured_stages(self._importance, cfg=none)
        else:
            def lora_last(k: int, losses: list[float]) -> Iterator[dict]:
                if k < self.prune.stages:
                    return
                ev = self._eval()
                pipeline["pruned_before_lora"] = ev.get(m)
                yield {"type": "lora", "phase": "pruned model, before LoRA", "eval": ev}
                yield from self._train(k, lora, losses)
            yield from self._structured_stages(self._importance, cfg=none, before_record=lora_last)
        pipeline["final"] = self.records[-1].quality.get(m) if self.records else None


def make_before(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
    return LoraOrderRun(lm, data, analysis, allocation, prune, order="before", opts=opts,
                        label=label or "lora-before (LoRA, then prune)", **run_kw)


def make_after(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
    return LoraOrderRun(lm, data, analysis, allocation, prune, order="after", opts=opts,
                        label=label or "lora-after (prune, then LoRA)", **run_kw)
