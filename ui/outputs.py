"""What each handler may change on the page, by name.

A handler returns one of these tuples and fills only the fields it changes; the others stay
`SKIP` (Gradio's `gr.skip()`: the component keeps its value). Each field is named after the
component it goes to (`app.py` keeps the components under the same names), and `app.py`
wires a handler's outputs as `outputs(RunOut)`, so a field and its component cannot drift
apart:

    return RunOut(run_status=warn("stages must be at least 1"))   # only the status line changes
"""
from __future__ import annotations

from typing import Any, NamedTuple

SKIP: Any = {"__type__": "update"}  # what gr.skip() returns: leave the component as it is


class AllocationOut(NamedTuple):
    """The Allocation tab's chart, table and summary (every edit of a slider or the table)."""
    alloc_plot: Any = SKIP
    alloc_table: Any = SKIP
    alloc_md: Any = SKIP


class NormalizationOut(NamedTuple):
    """A new layer normalisation redraws the layer plot (Importance tab) and the allocation."""
    layer_plot: Any = SKIP
    alloc_plot: Any = SKIP
    alloc_table: Any = SKIP
    alloc_md: Any = SKIP


class ImportanceOut(NamedTuple):
    """Compute importance: the Importance tab's plots and status, then the allocation it feeds."""
    layer_plot: Any = SKIP
    heads_plot: Any = SKIP
    neurons_plot: Any = SKIP
    imp_status: Any = SKIP
    alloc_plot: Any = SKIP
    alloc_table: Any = SKIP
    alloc_md: Any = SKIP


class RunOut(NamedTuple):
    """One update of a pruning run (the Prune & recover tab)."""
    quality_plot: Any = SKIP
    loss_plot: Any = SKIP
    cost_plot: Any = SKIP
    stages_table: Any = SKIP
    run_status: Any = SKIP
    history_plot: Any = SKIP
    pareto_plot: Any = SKIP


class LoadOut(NamedTuple):
    """A Load: the model tab, the task's defaults, and fresh contents for everything that depended
    on the previous model (see `views.fresh_views`)."""
    summary: Any = SKIP
    load_status: Any = SKIP
    metric_in: Any = SKIP
    recovery_in: Any = SKIP
    layer_plot: Any = SKIP
    heads_plot: Any = SKIP
    neurons_plot: Any = SKIP
    imp_status: Any = SKIP
    alloc_plot: Any = SKIP
    alloc_table: Any = SKIP
    alloc_md: Any = SKIP
    quality_plot: Any = SKIP
    loss_plot: Any = SKIP
    cost_plot: Any = SKIP
    stages_table: Any = SKIP
    run_status: Any = SKIP
    history_plot: Any = SKIP
    pareto_plot: Any = SKIP


class ExportOut(NamedTuple):
    export_files: Any = SKIP
    export_status: Any = SKIP


class GenerateOut(NamedTuple):
    """The same prompt through the dense and the pruned model (Export tab, "Try it")."""
    dense_out: Any = SKIP
    pruned_out: Any = SKIP
    generate_status: Any = SKIP
