"""What each handler may change on the page, by name.

A handler returns one of these tuples and fills only the fields it changes; the others stay
`SKIP` (Gradio's `gr.skip()`: the component keeps its value). Each field is named after the
component it goes to (`app.py` keeps the components under the same names), and `app.py`
wires a handler's outputs as `outputs(RunOut)`, so a field and its component cannot drift
apart:

    return RunOut(run_status=warn("stages must be at least 1"))   # only the status line changes
"""
from __future__ import annotations

from collections import namedtuple
from typing import Any, NamedTuple

SKIP: Any = {"__type__": "update"}  # what gr.skip() returns: leave the component as it is


class AllocationOut(NamedTuple):
    """The Allocation tab's chart, table and summary (every edit of a slider or the table)."""
    alloc_plot: Any = SKIP
    alloc_table: Any = SKIP
    alloc_md: Any = SKIP
    predict_plot: Any = SKIP  # predicted quality against predicted speed-up (uniform, A sweep, this plan, searched)


def combined(name: str, doc: str, *parts) -> type:
    """A named tuple whose fields are `parts` in order (field names, or other tuples' fields), each
    SKIP by default: for a handler that changes several tabs at once."""
    names = [f for p in parts for f in (p._fields if hasattr(p, "_fields") else (p,))]
    assert len(names) == len(set(names)), f"{name}: a component appears twice"
    cls = namedtuple(name, names, defaults=[SKIP] * len(names))
    cls.__doc__ = doc
    return cls


NormalizationOut = combined("NormalizationOut", "A new layer normalisation redraws the layer plot (Importance "
                            "tab) and the allocation.", "layer_plot", AllocationOut)
ImportanceOut = combined("ImportanceOut", "Compute importance: the Importance tab's plots and status, then the "
                         "allocation they feed.", "layer_plot", "heads_plot", "neurons_plot", "imp_status",
                         AllocationOut)

PredictOut = combined("PredictOut", "Measure the predictor, or search a plan: the status, the search curve, the "
                      "mode (a finished search switches to it) and the allocation.", "predict_status",
                      "plan_search_plot", "mode_in", AllocationOut)


class RunOut(NamedTuple):
    """One update of a pruning run (the Prune & recover tab)."""
    quality_plot: Any = SKIP
    loss_plot: Any = SKIP
    cost_plot: Any = SKIP
    stages_table: Any = SKIP
    run_status: Any = SKIP
    history_plot: Any = SKIP
    pareto_plot: Any = SKIP
    search_plot: Any = SKIP  # AdaPruner's search curve (best objective against trial)


class ExportOut(NamedTuple):
    export_files: Any = SKIP
    export_status: Any = SKIP


LoadOut = combined("LoadOut", "A Load: the model tab (a failed one puts the loaded model's name back in the Model "
                   "box), the task's defaults, and fresh contents for everything that depended on the previous model "
                   "(see `views.fresh_views`; the Export tab's status and downloads too).",
                   "summary", "load_status", "metric_in", "recovery_in", "model_in", "predict_status",
                   "plan_search_plot", ImportanceOut, RunOut, ExportOut)


class GenerateOut(NamedTuple):
    """The same prompt through the dense and the pruned model (Export tab, "Try it")."""
    dense_out: Any = SKIP
    pruned_out: Any = SKIP
    generate_status: Any = SKIP
