"""Pruning methods, selectable by name from the library, the CLI (`prune --method NAME`)
and the UI. Every method returns a *run*: an object with `events()` (a generator of event
dicts, as `explorer.pruning.PruningRun`), `stop()`, `status`, `records` and `report()`,
so that all of them stream into the same charts and run history.

    run = make_run("adaptive", lm, data, analysis_cfg, allocation_cfg, prune_cfg)
    for event in run.events(): ...
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

from ..config import METHOD_OPTIONS, AllocationConfig, AnalysisConfig, PruneConfig, validate
from ..data import TextData
from ..errors import ExplorerError
from ..models import LoadedModel
from ..pruning import PruningRun


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    factory: Callable  # (lm, data, analysis, allocation, prune, opts, **RUN_OPTIONS) -> run
    structural: bool = True  # physically smaller weights (False: masks only)
    departs: str = ""  # where it departs from its paper / design document (README's methods table)


RUN_OPTIONS = ("label", "timing", "final_plan")  # what every run takes besides the method's own options


def _adaptive(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
    mode = allocation.mode if allocation.mode != "uniform" else "exact"
    return PruningRun(lm, data, analysis, replace(allocation, mode=mode), prune,
                      label=label or f"adaptive A={allocation.amplitude:g}", **run_kw)


def _uniform(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
    return PruningRun(lm, data, analysis, replace(allocation, mode="uniform"), prune,
                      label=label or "uniform", **run_kw)


METHODS: dict[str, Method] = {
    "adaptive": Method("adaptive", "Adapt-Pruner: S_L = S_base - A·Î_L per stage, Taylor units, recovery between stages",
                       _adaptive, departs="exact budget (clipped sparsity redistributed) and the salience split of attention / FFN by default; optional rank / z-score normalisation of Î_L"),
    "uniform": Method("uniform", "same sparsity in every layer (LLM-Pruner style), same units and recovery", _uniform,
                      departs="Taylor units and the salience split as adaptive, not LLM-Pruner's dependency groups"),
}


def register(method: Method) -> None:
    METHODS[method.name] = method


def make_run(name: str, lm: LoadedModel, data: TextData, analysis: AnalysisConfig | None = None,
             allocation: AllocationConfig | None = None, prune: PruneConfig | None = None, **options):
    """options: RUN_OPTIONS (label, timing, final_plan) and the fields of the method's options
    dataclass by name (e.g. trials=50 for adapruner); anything else is a message."""
    if name not in METHODS:
        raise ExplorerError(f"unknown method '{name}': use one of {', '.join(METHODS)}")
    run_kw = {k: options.pop(k) for k in RUN_OPTIONS if k in options}
    return METHODS[name].factory(lm, data, analysis or AnalysisConfig(), allocation or AllocationConfig(),
                                 prune or PruneConfig(), method_options(name, options), **run_kw)


def method_options(name: str, values: dict | None = None):
    """The options dataclass of method `name` filled from `values` (field -> value; None keeps
    the default), checked against its fields' choices / min / max. None for a method without options."""
    cls = METHOD_OPTIONS.get(name)  # explorer.config: the methods' options dataclasses
    values = {k: v for k, v in (values or {}).items() if v is not None}
    known = [f.name for f in fields(cls)] if cls else []
    bad = sorted(set(values) - set(known))
    if bad:
        flags = ", ".join("--" + b.replace("_", "-") for b in bad)
        has = f"its options are {', '.join('--' + k.replace('_', '-') for k in known)}" if known else "it has none"
        raise ExplorerError(f"{flags}: not an option of method '{name}' ({has})")
    if cls is None:
        return None
    opts = cls(**values)
    validate(opts)
    return opts


# --- the other methods: one file each ---------------------------------------------------------
from . import adapruner, apt, distill, fusion, layer_drop, lora_order, lottery, unstructured  # noqa: E402

for _method in (
    Method("apt", "APT: LoRA-style adapters with ranks grown in salient layers, Eq. 5 salience re-estimated "
           "during training (EMA), cubic schedule with masks reaching 0 inside training, self-distillation from "
           "the dense model in place, physical removal at the end", apt.make,
           departs="one protected unit per layer and kind; the budget the density threshold leaves is filled (later units that fit, or the next unit in exchange for smaller kept ones), so the cut is the target to within one neuron; hidden channels on their own schedule; masks decay at α = 1/update_frequency a step (the document's 0.01 at its 100), faster only where the deadline prune_until needs it; update_frequency scaled with the run (T_p/10, at most 100); the classifier head frozen with adapters"),
    Method("adapruner", "AdaPruner: TPE search (50 trials) over categorical calibration subsets, Taylor orders and "
           "the coarse/fine mix, each trial a one-shot cut with a ridge refit scored on val without a model copy; "
           "then staged pruning with the best configuration in every stage", adapruner.make,
           departs="the per-trial refit uses the dense inputs (non-sequential) at a fixed λ; second order = the Fisher diagonal"),
    Method("fusion", "adaptive estimation fusion: coarse (vector) and fine (element) Taylor mixed per layer and "
           "kind with attention weights (our reading of arXiv 2403.10799's abstract; option fusion_rule="
           "inverse-variance: our split-half variant), then Adapt-Pruner stages", fusion.make,
           departs="the paper's formula is not available here: the attention rule is our reading of its abstract"),
    Method("magnitude", "unstructured |W| pruning with the per-layer allocation (masks: no dense speed-up); "
           "option pattern='2:4'", unstructured.make_magnitude, structural=False,
           departs="masks only (no speed-up); the masks are held through LoRA recovery"),
    Method("wanda", "unstructured Wanda |W|·||X|| pruning per output row with the per-layer allocation "
           "(masks: no dense speed-up); option pattern='2:4'", unstructured.make_wanda, structural=False,
           departs="masks only (no speed-up); per-layer sparsity from the allocation instead of uniform"),
    Method("lottery", "lottery ticket: iterative magnitude pruning over rounds with rewinding to the dense "
           "weights (or step rewind_step), unstructured masks", lottery.make, structural=False,
           departs="rounds = stages, each trained for recovery_steps (the same budget), not to convergence"),
    Method("layer-drop", "ShortGPT: remove whole blocks with the lowest cosine importance, then recover",
           layer_drop.make, departs="the blocks dropped are rounded to the parameter budget; recovery between stages"),
    Method("distill-baseline", "uniform one-shot prune to the target, trained only by distillation from the "
           "dense teacher for the whole recovery budget", distill.make,
           departs="DistilBERT's logits and hidden-state (cosine) losses without its masked-LM term"),
    Method("lora-before", "LoRA fine-tune the dense model (merged), then prune adaptively without recovery",
           lora_order.make_before, departs="the document's first alternative, at the same total LoRA steps"),
    Method("lora-after", "prune adaptively without recovery, then LoRA fine-tune the pruned model (merged)",
           lora_order.make_after, departs="the document's second alternative, at the same total LoRA steps"),
    Method("lora-prune-ft", "the recommended order: LoRA fine-tune the dense model (merged), prune adaptively, "
           "LoRA fine-tune the pruned model (merged); the same total LoRA steps as lora-before / lora-after",
           lora_order.make_prune_ft, departs="the split of the steps (pre_fraction 0.5) is ours"),
):
    register(_method)
