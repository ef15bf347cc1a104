"""What the methods share: a `MethodRun` (a `PruningRun` whose `_body()` a subclass writes from
PruningRun's pieces: the one stage loop `_stages` with its hooks for importance, plan and an extra
phase, `_train`, `_record`, `_commit`), and small helpers (validation loss, cuts without a copy,
per-(layer, kind) score normalisation).

A method run keeps PruningRun's contract: `events()` yields "dense" first, then whatever
the method yields ("analysis", "step", "stage", "trial", "round"), then "done"; `stop()`
cancels between steps; on Stop or any failure the model of the last completed stage (the
last `_commit()`) is put back and "stopped"/"error" is yielded.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..allocation import Allocation, allocate
from ..config import PruneConfig
from ..errors import Cancelled, ExplorerError
from ..evaluate import batched_logits, perplexity
from ..importance import Importance, analyze
from ..models import LoadedModel
from ..pruning import PruningRun, interpolate_plan
from ..surgery import zeroed_units  # noqa: F401 (the methods' cheap cut, exported here too)


class MethodRun(PruningRun):
    """Base class: subclasses implement `_body()` (a generator) from PruningRun's pieces (the stage
    loop `_stages` with its hooks, `_train`, `_record`, `_stage_event`) and call `_commit()` after
    each completed step. `note` (if any) goes into the "dense" event and the report."""

    note: str = ""
    method: str = ""
    Options: type | None = None  # the method's options dataclass (explorer.config.opt fields), if it has one
    chooses_widths: str = ""  # how a method that picks its own widths does it (it then refuses a hand plan)

    def __init__(self, lm, data, analysis=None, allocation=None, prune=None, *, opts=None, label: str = "",
                 timing: bool = True, final_plan: Allocation | None = None):
        super().__init__(lm, data, analysis, allocation, prune, final_plan=final_plan, timing=timing,
                         label=label or self.method)
        self.opts = opts if opts is not None or self.Options is None else self.Options()
        self.summary: dict = {}  # method-specific results for the report
        self._plan_stages = self.prune.stages  # the stage count the hand plan is interpolated over
        if final_plan is not None:  # the per-layer table set by hand: every stage moves towards it
            if self.chooses_widths:
                raise ExplorerError(f"{self.method} chooses its own widths ({self.chooses_widths}), so it cannot "
                                    "prune to the per-layer table set by hand: reset the hand edits (app) or drop "
                                    "--plan / --manual (CLI), or pick a method that follows the table")
            check_plan_fits(lm, final_plan)

    def _dense_event(self) -> dict:
        ev = {**super()._dense_event(), "method": self.method}
        if self.note:
            ev["note"] = self.note
        return ev

    def _body(self) -> Iterator[dict]:
        raise NotImplementedError

    def _check_stop(self) -> None:
        if self._stop:
            raise Cancelled()

    # --- pieces -------------------------------------------------------------------------
    def _labels_for_analysis(self, labels):
        return labels if self.lm.task == "classification" else None

    def _analyze(self, texts, labels, metrics: tuple[str, ...], metric: str | None = None) -> Importance:
        cfg = replace(self.analysis, metric=metric or metrics[0])
        return analyze(self.lm, texts, self._labels_for_analysis(labels), cfg, metrics=metrics,
                       should_stop=self._should_stop)

    def _structured_stages(self, importance: Callable[[int], Importance], cfg: PruneConfig | None = None,
                           teacher=None, stages: int | None = None,
                           before_record: Callable[[int, list], Iterator[dict]] | None = None) -> Iterator[dict]:
        """PruningRun's stage loop with the method's importance estimate (a per-(layer) allocation by
        self.allocation, adaptive or uniform, to k/K of the target; the cut; training with `cfg`)."""
        self._plan_stages = stages or self.prune.stages
        return self._stages(importance, self._param_plan, cfg, teacher, stages, before_record)

    def _param_plan(self, k: int, imp: Importance, stage_target: float):
        """Stage k's plan: the allocation at the stage's target, or, with a hand-edited plan, k/K of the
        way from the original widths to the table's (as PruningRun._plan)."""
        if self.final_plan is not None:
            return interpolate_plan(self.final_plan, imp.params, self.original_structure or imp.params,
                                    k / self._plan_stages, self.allocation)
        return allocate(imp.normalized_by(self.allocation.normalization), imp.params,
                        replace(self.allocation, target=stage_target), scores=imp.unit_scores())

    def _one_shot_plan(self, imp: Importance) -> Allocation | None:
        """The hand-edited plan for a one-shot cut of the model as it is now (None without one)."""
        if self.final_plan is None:
            return None
        return interpolate_plan(self.final_plan, imp.params, imp.params, 1.0, self.allocation)

    def report(self) -> dict:
        rep = super().report()
        rep["method"] = self.method
        if self.note:
            rep["note"] = self.note
        if self.summary:
            rep["summary"] = _jsonable(self.summary)
        return rep


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


# --- helpers ------------------------------------------------------------------------------

def model_structure(lm: LoadedModel) -> list[dict]:
    """Per layer what an analysis records as `Importance.params`: groups, n_neurons, group_params,
    neuron_params, block_params, heads_per_group (from the model as it is now)."""
    return [{"group_params": b.attn.params_per_unit, "neuron_params": b.mlp.params_per_unit,
             "block_params": b.params, "groups": b.attn.n_units, "heads_per_group": b.heads_per_group,
             "n_neurons": b.mlp.n_units} for b in lm.adapter.blocks(lm.model)]


def check_plan_fits(lm: LoadedModel, plan: Allocation) -> None:
    """A hand-edited plan (the table) must be one of this model's: one entry per layer, each made
    for the layer's current attention units and neurons, keeping between 1 and all of them."""
    structure = model_structure(lm)
    if len(plan.layers) != len(structure):
        raise ExplorerError(f"the per-layer table (plan) has {len(plan.layers)} layer(s) but the model has "
                            f"{len(structure)}: it was made for another model")
    for lp, st in zip(plan.layers, structure):
        if (lp.groups, lp.neurons) != (st["groups"], st["n_neurons"]):
            raise ExplorerError(f"the per-layer table (plan), layer {lp.index}: made for {lp.groups} attention "
                                f"unit(s) and {lp.neurons} neurons, but the model's layer has {st['groups']} and "
                                f"{st['n_neurons']}: it was made for another model")
        if not (1 <= lp.keep_groups <= lp.groups and 1 <= lp.keep_neurons <= lp.neurons):
            raise ExplorerError(f"the per-layer table (plan), layer {lp.index}: keeps {lp.keep_groups} of "
                                f"{lp.groups} attention unit(s) and {lp.keep_neurons} of {lp.neurons} neurons; "
                                "a layer keeps at least 1 and at most all of each")


def clone_lm(lm: LoadedModel) -> LoadedModel:
    """A LoadedModel around a deep copy of the model (tokenizer and adapter shared)."""
    return replace(lm, model=copy.deepcopy(lm.model))


def classification_loss(lm: LoadedModel, texts: list[str], labels: list[int], batch_size: int = 64) -> float:
    """Mean cross-entropy over the examples."""
    total = sum(float(F.cross_entropy(logits.float(), y, reduction="sum"))
                for logits, y in batched_logits(lm, texts, labels, batch_size))
    return total / max(len(texts), 1)


def val_objective(lm: LoadedModel, data, n: int) -> tuple[float, str]:
    """Lower is better: cross-entropy on the first n **val** examples (classifiers) or
    perplexity on up to n val tokens (LMs). Never touches the test split."""
    if lm.task == "classification":
        texts, labels = data.texts["val"][:n], data.labels["val"][:n]
        if not texts:
            raise ExplorerError(f"data '{data.name}' has no val split to score on")
        return classification_loss(lm, texts, labels), "val_loss"
    if lm.task == "causal-lm":
        if not data.texts["val"]:
            raise ExplorerError(f"data '{data.name}' has no val split to score on")
        return perplexity(lm, data.texts["val"], max_tokens=n), "val_perplexity"
    raise ExplorerError("scoring on held-out data needs a task head (classification or causal LM)")


def normalized_scores(values: np.ndarray) -> np.ndarray:
    """Scores divided by their mean over the units of one (layer, kind): scale-free, mean 1."""
    v = np.asarray(values, dtype=np.float64)
    m = np.abs(v).mean() if len(v) else 0.0
    return v / m if m > 0 else np.ones_like(v)


def add_metric(imp: Importance, name: str, fn: Callable[[str, int, str], np.ndarray]) -> Importance:
    """Add a derived metric `name` to imp: fn(unit_kind, layer, "heads"|"groups"|"neurons")
    -> scores; makes it the Importance's metric."""
    imp.heads[name] = [fn("attention", i, "heads") for i in range(imp.n_layers)]
    imp.groups[name] = [fn("attention", i, "groups") for i in range(imp.n_layers)]
    imp.neurons[name] = [fn("mlp", i, "neurons") for i in range(imp.n_layers)]
    imp.metric = name
    return imp


def mixed_importance(imp: Importance, w_vector, w_element, name: str = "mix") -> Importance:
    """name = w_vector·norm(taylor_vector) + w_element·norm(taylor), each normalised to mean 1
    over the units of its (layer, kind). Weights are scalars or callables (kind, layer) -> w."""
    def w(x, kind, i):
        return x(kind, i) if callable(x) else x

    def fn(kind, i, where):
        src = getattr(imp, where)
        return w(w_vector, kind, i) * normalized_scores(src["taylor_vector"][i]) \
            + w(w_element, kind, i) * normalized_scores(src["taylor"][i])
    return add_metric(imp, name, fn)


def block_linear_weights(lm: LoadedModel) -> list[list[tuple[str, torch.nn.Parameter, int]]]:
    """Per block: (name, weight, input dim) of every Linear / GPT-2 Conv1D inside it. The
    input dimension is 1 for nn.Linear (out, in) and 0 for Conv1D (in, out)."""
    out = []
    layers = lm.adapter.layers(lm.model)
    prefix = {id(m): n for n, m in lm.model.named_modules()}
    for layer in layers:
        items = []
        for n, m in layer.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.nn.Parameter) and w.dim() == 2:
                in_dim = 1 if isinstance(m, torch.nn.Linear) else 0
                items.append((f"{prefix[id(layer)]}.{n}.weight", w, in_dim))
        out.append(items)
    return out


def total_steps(cfg: PruneConfig) -> int:
    """The whole recovery budget of a run: stages x recovery_steps."""
    return cfg.stages * max(cfg.recovery_steps, 0)


__all__ = ["MethodRun", "model_structure", "check_plan_fits", "clone_lm", "val_objective", "classification_loss",
           "normalized_scores", "add_metric", "mixed_importance", "block_linear_weights", "total_steps"]
