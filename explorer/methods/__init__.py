"""Pruning methods, selectable by name from the library, the CLI (`prune --method NAME`)
and the UI. Every method returns a *run*: an object with `events()` (a generator of event
dicts, as `explorer.pruning.PruningRun`), `stop()`, `status`, `records` and `report()`,
so that all of them stream into the same charts and run history.

    run = make_run("adaptive", lm, data, analysis_cfg, allocation_cfg, prune_cfg)
    for event in run.events(): ...
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..config import AllocationConfig, AnalysisConfig, PruneConfig
from ..data import TextData
from ..errors import ExplorerError
from ..models import LoadedModel
from ..pruning import PruningRun


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    factory: Callable  # (lm, data, analysis, allocation, prune, **options) -> run
    structural: bool = True  # physically smaller weights (False: masks only)


def _adaptive(lm, data, analysis, allocation, prune, **options):
    mode = allocation.mode if allocation.mode != "uniform" else "exact"
    return PruningRun(lm, data, analysis, replace(allocation, mode=mode), prune,
                      label=options.get("label") or f"adaptive A={allocation.amplitude:g}", **_run_kw(options))


def _uniform(lm, data, analysis, allocation, prune, **options):
    return PruningRun(lm, data, analysis, replace(allocation, mode="uniform"), prune,
                      label=options.get("label") or "uniform", **_run_kw(options))


def _run_kw(options: dict) -> dict:
    return {k: options[k] for k in ("timing", "final_plan") if k in options}


METHODS: dict[str, Method] = {
    "adaptive": Method("adaptive", "Adapt-Pruner: S_L = S_base - A·Î_L per stage, Taylor units, recovery between stages",
                       _adaptive),
    "uniform": Method("uniform", "same sparsity in every layer (LLM-Pruner style), same units and recovery", _uniform),
}


def register(method: Method) -> None:
    METHODS[method.name] = method


def make_run(name: str, lm: LoadedModel, data: TextData, analysis: AnalysisConfig | None = None,
             allocation: AllocationConfig | None = None, prune: PruneConfig | None = None, **options):
    if name not in METHODS:
        raise ExplorerError(f"unknown method '{name}': use one of {', '.join(METHODS)}")
    return METHODS[name].factory(lm, data, analysis or AnalysisConfig(), allocation or AllocationConfig(),
                                 prune or PruneConfig(), **options)
