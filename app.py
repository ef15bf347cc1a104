"""Pruning Explorer: the web UI.

    python app.py [--host 127.0.0.1] [--port 7860] [--model minilm-rt] [--data NAME] [--share]

A thin Gradio layer over the `explorer` library, read top to bottom: the layout (one function
per tab, each adding its components to `page` under the names of `ui.outputs`), then the
wiring (which handler of `ui.handlers.ExplorerApp` each event calls and which named outputs
it changes), then `main`. Every default shown comes from the config dataclasses.
"""
import argparse
import logging
import os
import time
from dataclasses import fields
from types import SimpleNamespace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gradio as gr  # noqa: E402

from explorer.config import (METRICS, AllocationConfig, AnalysisConfig, PredictConfig, PruneConfig,  # noqa: E402
                             SearchConfig, choices_of, default_of, help_of)
from explorer.data import BUILTIN_DATA  # noqa: E402
from explorer.config import METHOD_OPTIONS  # noqa: E402
from explorer.methods import METHODS  # noqa: E402
from explorer.recipes import allocation_defaults  # noqa: E402
from explorer.models import BUILTIN_MODELS, DEFAULT_MODEL, TASKS  # noqa: E402
from explorer.sessions import KEEP_RUNS  # noqa: E402
from ui.handlers import ExplorerApp  # noqa: E402,F401  (tests and bench import it from here)
from ui.outputs import (AllocationOut, ExportOut, GenerateOut, ImportanceOut, LoadOut,  # noqa: E402
                        NormalizationOut, PredictOut, RunOut)
from ui.settings import (ADVANCED_NAMES, METHOD_NAMES, AdvancedSettings, AllocationSettings,  # noqa: E402
                         takes_settings)
from ui.views import (ADVANCED, EDITABLE, PREDICT_FIELDS, SEARCH_FIELDS, EVAL_EXAMPLES, EVAL_TOKENS, EXPORT_FORMATS, EXPORT_ZIP,  # noqa: E402,F401
                      METHOD_OPTION_CLASSES, MAX_UPLOAD_MB, MODEL_DEFAULT_DATA, TABLE_COLUMNS, fresh_views, is_loopback, loading_status,
                      method_note, model_summary, task_defaults)

PRUNE_METHODS = [m for m in METHODS if m != "uniform"]  # uniform is the Allocation tab's mode, chosen there only
# the page component of each field of ui.settings.AllocationSettings (the Allocation tab's controls)
ALLOCATION_CONTROLS = {"target": "target_in", "amplitude": "amp_in", "mode": "mode_in", "max_sparsity": "smax_in",
                       "round_to": "round_in", "split": "split_in", "normalization": "norm_in", "budget": "budget_in",
                       "speedup": "speedup_in"}
assert list(ALLOCATION_CONTROLS) == [f.name for f in fields(AllocationSettings)]


def method_options_shown(method: str, *options) -> list:
    """The chosen method's description (with its options' values now), and its group of option controls
    visible (the others hidden)."""
    cls = METHOD_OPTIONS.get(method)
    return [method_note(method, options), gr.update(visible=method == "adapruner"),
            *(gr.update(visible=c is cls) for c in METHOD_OPTION_CLASSES)]

LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]

IMPORTANCE_HELP = r"""
**Layer importance** (Adapt-Pruner). A block that barely changes its input matters little. With
$h_{in}, h_{out}$ the block's input and output (residual stream included), averaged over non-padding
calibration tokens:
$$I_L = -\cos(h_{in}, h_{out}) \qquad \hat I_L = \frac{I_L - \bar I}{\max_L |I_L - \bar I|} \in [-1, 1]$$
The sublayer bars use the same score between the block input and the attention output
($-\cos(h_{in}, h_{mid})$) and between that and the block output ($-\cos(h_{mid}, h_{out})$).

**Unit salience** (one score per query head, KV group and FFN neuron; higher = keep), summed over the
coupled weights $W$ of the unit, with $G = \partial L / \partial W$ summed over calibration batches and
$H$ the unit's activation:

| metric | score |
|---|---|
| `taylor` | $\sum \lvert W \odot G \rvert$ (first-order Taylor) |
| `taylor_vector` | $\lvert \sum W \odot G \rvert$ (coarse, vector-wise) |
| `fisher` | $\tfrac12 \sum_b \sum (W \odot g_b)^2$ (diagonal Fisher, per-batch gradients $g_b$) |
| `act_grad` | $\sum_{\text{samples}} \lvert \sum H \odot \partial L/\partial H \rvert$ |
| `apt` | $\sum\lvert\partial L/\partial H\rvert \cdot \sum\lvert H\rvert + \sqrt{\operatorname{kurt}(W_{:j} \circ X_j)}$ (APT, each term scaled by its layer mean) |
| `magnitude_l1`, `magnitude_l2` | $\sum \lvert W\rvert$, $\sqrt{\sum W^2}$ (need no labels) |
"""

ALLOCATION_HELP = r"""
$$S_L = \operatorname{clip}\big(S_{base} - A\,\hat I_L,\; 0,\; S_{max}\big)$$
Important layers ($\hat I_L > 0$) are pruned less, unimportant ones more. **reference** clips only, as the
Adapt-Pruner code does (clipping can miss the budget); **exact** (our default, a departure from the
reference) shifts every free layer by the same constant so that the parameters removed are exactly
$S_{base}$ of the blocks; **uniform** ignores importance. Inside a layer the **split** shares the cut between
attention units and FFN neurons: **salience** removes the $k$ lowest-salience groups and the lowest-salience
neurons for the rest, with $k$ chosen so that the summed salience removed is least (attention is cut only where it
is cheaper per parameter); **proportional** keeps $\mathrm{round}((1-S_L)\,G)$ groups and fills the rest with
neurons. Either way *actual* differs slightly from $S_L$.
**Layer normalisation** turns $I_L$ into $\hat I_L$: **maxabs** is the reference formula (one outlier layer takes
$\pm 1$ and squeezes the others towards 0); **rank** (ranks spread evenly over $[-1, 1]$) and **zscore**
($\frac{I_L - \bar I}{2\sigma}$ clipped to $[-1, 1]$) are departures that spread the layers.
Edit the **sparsity** column to set a layer by hand (the other layers make up the budget in exact mode).
"""

PREDICT_HELP = r"""
**Measure predictor** cuts every layer *alone* to a few levels with the run's own cut and reconstruction
(the Prune tab's recovery) and scores the model on a fixed slice of val; a plan's quality is then predicted
additively, $\log \widehat{ppl} = \log ppl_{dense} + \alpha \sum_L \Delta_L(s_L)$ (accuracy: the same sum
of drops), with $\Delta_L$ interpolated between the measured levels and $\alpha$ fitted on whole check plans
run through the pipeline; its measured error is shown beside the prediction. Measured once per model, data,
metric and recovery, then read from the disk cache. **Search plan** runs an EvoPress-style (1 + λ) search:
level switches between layers at a fixed parameter total, offspring ranked on a few hundred val tokens with the
removed units zeroed in place, the best re-scored on more; Stop keeps the best plan so far, which lands in the
table (mode *search*).
"""

CSS = """
#load-btn, #importance-btn, #run-btn { min-width: 140px; }
.status-line { min-height: 1.6em; }
"""


# --- layout: one function per tab ----------------------------------------------------------------

def config_control(cls, name: str, **over):
    """A control for one config field, from its metadata (type, default, help, choices, range);
    `over` replaces what the tab wants different (a slider's label, an elem_id)."""
    f = next(f for f in fields(cls) if f.name == name)
    md = f.metadata
    prefix = "calibration " if cls is AnalysisConfig else ""  # AnalysisConfig.seed vs PruneConfig.seed
    kw = {"label": prefix + name.replace("_", " "), "info": md.get("help"),
          "elem_id": "adv-" + (prefix + name).replace("_", "-").replace(" ", "-"), **over}
    if isinstance(f.default, bool):
        return gr.Checkbox(f.default, **kw)
    if md.get("choices"):
        return gr.Dropdown(list(md["choices"]), value=f.default, **kw)
    if isinstance(f.default, str):
        return gr.Textbox(f.default, **kw)
    return gr.Number(f.default, precision=0 if isinstance(f.default, int) else None, minimum=md.get("min"),
                     maximum=md.get("max"), **kw)


def slider(cls, name: str, lo: float, hi: float, step: float, label: str, elem_id: str | None = None, value=None):
    """A slider whose default (unless `value`) and help are the config field's."""
    return gr.Slider(lo, hi, value=default_of(cls, name) if value is None else value, step=step, label=label,
                     elem_id=elem_id,
                     info=help_of(cls, name))


def radio(cls, name: str, label: str, elem_id: str, value=None, info: str | None = None):
    """A radio of the field's choices, on its default (or `value`)."""
    return gr.Radio(list(choices_of(cls, name)), value=value or default_of(cls, name), label=label,
                    elem_id=elem_id, info=help_of(cls, name) if info is None else info)


def model_tab(page, loaded, default_model: str, default_data: str | None, default_task: str):
    with gr.Tab("Model & data", id="model"):
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                page.model_in = gr.Dropdown(list(BUILTIN_MODELS), value=default_model, allow_custom_value=True,
                                            label="Model", elem_id="model-input",
                                            info="built-in, a Hugging Face id or a local directory")
                page.task_in = gr.Dropdown(["auto", *TASKS], value=default_task, label="Task",
                                           info="auto: from the model's config", elem_id="task-input")
                page.data_in = gr.Dropdown([MODEL_DEFAULT_DATA, *BUILTIN_DATA],
                                           value=default_data or MODEL_DEFAULT_DATA, allow_custom_value=True,
                                           label="Data", info="built-in or a file path (or upload below)")
                page.upload = gr.File(label="…or upload CSV / JSONL / TXT", type="filepath", height=120,
                                      file_types=[".csv", ".tsv", ".jsonl", ".json", ".txt"], elem_id="upload-input")
                with gr.Row():
                    page.text_col = gr.Textbox("text", label="Text column")
                    page.label_col = gr.Textbox("label", label="Label column", info="empty: no labels")
                page.load_btn = gr.Button("Load", variant="primary", elem_id="load-btn")
            with gr.Column(scale=2):
                page.summary = gr.Markdown(model_summary(loaded), elem_id="model-summary")
                page.load_status = gr.Markdown(elem_classes="status-line", elem_id="load-status")
        gr.Markdown("Models: " + "; ".join(f"`{k}`: {v.description}" for k, v in BUILTIN_MODELS.items())
                    + ". Data: " + "; ".join(f"`{k}`: {v}" for k, v in BUILTIN_DATA.items()) + ".")


def importance_tab(page, fresh: dict, metric: str):
    with gr.Tab("Importance", id="importance"):
        with gr.Row(equal_height=True):
            page.metric_in = gr.Dropdown(list(METRICS), value=metric, label="Salience metric",
                                         info=help_of(AnalysisConfig, "metric"))
            page.samples_in = slider(AnalysisConfig, "samples", 8, 512, 8, "Calibration samples", "samples-input")
            page.batch_in = slider(AnalysisConfig, "batch_size", 1, 64, 1, "Batch size", "batch-input")
            with gr.Column(scale=0, min_width=140):
                page.imp_btn = gr.Button("Compute importance", variant="primary", elem_id="importance-btn")
                page.imp_stop_btn = gr.Button("Stop", variant="stop", size="sm", elem_id="importance-stop-btn")
        page.imp_status = gr.Markdown(fresh["imp_status"], elem_classes="status-line", elem_id="importance-status")
        page.layer_plot = gr.Plot(fresh["layer_plot"], label="Layer importance", elem_id="layer-importance-plot")
        with gr.Row():
            page.heads_plot = gr.Plot(fresh["heads_plot"], label="Heads", elem_id="heads-heatmap")
            page.neurons_plot = gr.Plot(fresh["neurons_plot"], label="Neurons", elem_id="neurons-heatmap")
        with gr.Accordion("How the scores are computed", open=False):
            gr.Markdown(IMPORTANCE_HELP, latex_delimiters=LATEX)


def allocation_tab(page, fresh: dict, own: dict):
    """`own`: the start-up model's bench-chosen normalisation and A (explorer.recipes.allocation_defaults)."""
    A = AllocationConfig
    with gr.Tab("Allocation", id="allocation"):
        with gr.Row():
            page.target_in = slider(A, "target", 0, 0.9, 0.01, "Target S_base", "target-slider")
            page.amp_in = slider(A, "amplitude", 0, 0.5, 0.01, "Amplitude A", "amplitude-slider",
                                 value=own.get("amplitude"))
            page.mode_in = radio(A, "mode", "Mode", "mode-input", info="exact: the budget is met exactly "
                                 "(our default); reference: clip only; uniform: S_L = S_base in every layer; "
                                 "search: the plan found by Search plan (below)")
            page.split_in = radio(A, "split", "Attention / FFN split", "split-input")
            page.norm_in = radio(A, "normalization", "Layer normalisation", "normalization-input",
                                 value=own.get("normalization"))
        with gr.Row():
            page.budget_in = radio(A, "budget", "Budget", "budget-input", info="params: S_base is the fraction of "
                                   "block parameters removed; flops: of the blocks' FLOPs per token; latency: reach "
                                   "the speed-up below, predicted by a cost model measured once on this device")
            page.speedup_in = gr.Number(default_of(A, "speedup") or 1.6, minimum=1, maximum=100, label="Speed-up "
                                        "(latency budget)", elem_id="speedup-input", info=help_of(A, "speedup"))
        with gr.Accordion("Limits and rounding", open=False):
            with gr.Row():
                page.smax_in = slider(A, "max_sparsity", 0.5, 0.99, 0.01, "S_max")
                page.round_in = gr.Number(default_of(A, "round_to"), precision=0, minimum=1, maximum=128,
                                          label="Round neurons to", info=help_of(A, "round_to"))
        page.alloc_md = gr.Markdown(fresh["alloc_md"], elem_id="allocation-summary")
        page.alloc_plot = gr.Plot(fresh["alloc_plot"], label="Per-layer sparsity", elem_id="allocation-plot")
        page.alloc_table = gr.Dataframe(fresh["alloc_table"], label="Per-layer plan (edit the sparsity column)",
                                        interactive=True, elem_id="allocation-table", max_height=420,
                                        static_columns=[i for i in range(len(TABLE_COLUMNS)) if i != EDITABLE])
        page.reset_btn = gr.Button("Reset hand edits", size="sm")
        with gr.Accordion("Predicted quality and plan search", open=True, elem_id="predict-section"):
            gr.Markdown(PREDICT_HELP, latex_delimiters=LATEX)
            with gr.Row(equal_height=True):
                page.predict_btn = gr.Button("Measure predictor", variant="primary", elem_id="predict-btn")
                page.search_btn = gr.Button("Search plan", elem_id="search-btn")
                page.gens_in = gr.Number(default_of(SearchConfig, "generations"), precision=0, minimum=1,
                                         maximum=10_000, label="Search generations", elem_id="generations-input",
                                         info=help_of(SearchConfig, "generations"))
                page.predict_stop_btn = gr.Button("Stop", variant="stop", size="sm", elem_id="predict-stop-btn")
            with gr.Accordion("Predictor and search settings", open=False):
                with gr.Row():
                    page.predict_cfg_in = [config_control(PredictConfig, n) for n in PREDICT_FIELDS]
                with gr.Row():
                    page.search_cfg_in = [config_control(SearchConfig, n) for n in SEARCH_FIELDS]
            page.predict_status = gr.Markdown(fresh["predict_status"], elem_classes="status-line",
                                              elem_id="predict-status")
            with gr.Row():
                page.predict_plot = gr.Plot(fresh["predict_plot"], label="Predicted quality", elem_id="predict-plot")
                page.plan_search_plot = gr.Plot(fresh["plan_search_plot"], label="Search curve",
                                                elem_id="plan-search-plot")
        gr.Markdown(ALLOCATION_HELP, latex_delimiters=LATEX)


def prune_tab(page, fresh: dict, recovery: str):
    P = PruneConfig
    with gr.Tab("Prune & recover", id="prune") as page.prune_tab:
        page.plan_md = gr.Markdown(elem_id="prune-plan")
        with gr.Row():
            page.stages_in = gr.Number(default_of(P, "stages"), precision=0, minimum=1, maximum=20, label="Stages K",
                                       elem_id="stages-input", info=help_of(P, "stages"))
            page.recovery_in = radio(P, "recovery", "Recovery", "recovery-input", value=recovery)
            page.steps_in = gr.Number(default_of(P, "recovery_steps"), precision=0, minimum=0, maximum=5000,
                                      label="Recovery steps per stage", info=help_of(P, "recovery_steps"),
                                      elem_id="steps-input")
            page.method_in = gr.Dropdown(PRUNE_METHODS, value="adaptive", label="Method", elem_id="method-input",
                                         info="adaptive: the Allocation tab's plan (its mode, A and table); the "
                                              "others are the methods of the design documents (README table)")
        with gr.Accordion("Evaluation", open=False):
            with gr.Row():
                page.eval_in = gr.Number(0, precision=0, minimum=0, label="Evaluation size", elem_id="eval-input",
                                         info=f"val examples (accuracy) / tokens (perplexity) per stage; 0: "
                                              f"{EVAL_EXAMPLES} examples / {EVAL_TOKENS} tokens (the whole split "
                                              "when smaller)")
                page.timing_in = gr.Checkbox(False, label="Measure latency (batch 32 × 128 tokens; LMs also decode "
                                             "speed)", elem_id="timing-input",
                                             info="off (the default): quality only, the quick look; on: the dense "
                                                  "model is timed once per loaded model (then reused) and every "
                                                  "stage after it, which on a CPU takes longer than the quality")
        with gr.Accordion("Advanced: every other setting of the run", open=False):
            page.adv_in = []
            for i in range(0, len(ADVANCED), 4):
                with gr.Row():
                    page.adv_in += [config_control(cls, name) for cls, name in ADVANCED[i:i + 4]]
        with gr.Accordion("Method options", open=False, elem_id="method-options"):
            page.method_md = gr.Markdown(method_note("adaptive"), elem_id="method-options-note")
            page.method_groups, page.opt_in = [], []
            for cls in METHOD_OPTION_CLASSES:
                with gr.Group(visible=False) as group:
                    for i in range(0, len(fields(cls)), 4):
                        with gr.Row():
                            page.opt_in += [config_control(cls, f.name, label=f.name.replace("_", " "),
                                                           elem_id="opt-" + f.name.replace("_", "-"))
                                            for f in fields(cls)[i:i + 4]]
                page.method_groups.append(group)
        with gr.Row():
            page.run_btn = gr.Button("Run", variant="primary", elem_id="run-btn")
            page.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
            page.test_btn = gr.Button("Evaluate the last run on test", elem_id="test-btn")
        page.run_status = gr.Markdown(fresh["run_status"], elem_classes="status-line", elem_id="run-status")
        with gr.Row():
            page.quality_plot = gr.Plot(fresh["quality_plot"], label="Quality", elem_id="quality-plot")
            page.loss_plot = gr.Plot(fresh["loss_plot"], label="Recovery (training loss, or the reconstruction)",
                                    elem_id="loss-plot")
        page.search_plot = gr.Plot(fresh["search_plot"], label="Search curve (AdaPruner's trials)", visible=False,
                                   elem_id="search-plot")
        with gr.Row():
            page.cost_plot = gr.Plot(fresh["cost_plot"], label="Size and latency", elem_id="cost-plot")
            page.history_plot = gr.Plot(fresh["history_plot"], label="History", elem_id="history-plot")
        page.stages_table = gr.Dataframe(fresh["stages_table"], label="Stages of this run", interactive=False,
                                         elem_id="stage-table")
        page.pareto_plot = gr.Plot(fresh["pareto_plot"], label="Pareto (every stage of every run)",
                                   elem_id="pareto-plot")


def export_tab(page):
    with gr.Tab("Export", id="export") as page.export_tab:
        gr.Markdown("Download the pruned model of a run: a zip of the directory written by `save_model` "
                    "(safetensors, config, tokenizer, `explorer_plan.json` and a model card; reload it with "
                    "`load_model(path)`), an ONNX graph (every architecture, checked by onnxruntime) or a GGUF file "
                    "for llama.cpp (LLaMA family, per-layer widths); the run reports (JSON and CSV, every run of "
                    "this session) and all charts in one HTML page.")
        with gr.Row():
            page.run_in = gr.Dropdown([], label="Run to export", elem_id="export-run",
                                      info=f"the final models of the last {KEEP_RUNS} runs are kept")
            page.formats_in = gr.CheckboxGroup(list(EXPORT_FORMATS), value=[EXPORT_ZIP], label="Formats",
                                               elem_id="export-formats")
            page.export_btn = gr.Button("Prepare downloads", variant="primary", elem_id="export-btn", scale=0)
        page.export_status = gr.Markdown(elem_classes="status-line", elem_id="export-status")
        page.export_files = gr.File(label="Downloads", file_count="multiple", interactive=False,
                                    elem_id="export-files")
        gr.Markdown("### Try it: dense and pruned side by side\nA language model continues the prompt "
                    "(greedy at temperature 0); a classifier gives its class probabilities.")
        with gr.Row():
            page.prompt_in = gr.Textbox("The government said on Monday that", label="Prompt or sentence", lines=2,
                                        elem_id="prompt-input", scale=3)
            page.new_tokens_in = gr.Number(40, precision=0, minimum=1, maximum=512, label="Max new tokens",
                                           elem_id="new-tokens-input", scale=1)
            page.temperature_in = gr.Number(0.0, minimum=0, maximum=5, label="Temperature (0: greedy)",
                                            elem_id="temperature-input", scale=1)
            page.generate_btn = gr.Button("Run both", elem_id="generate-btn", scale=0)
        with gr.Row():
            page.dense_out = gr.Textbox(label="Dense model", lines=6, interactive=False, elem_id="dense-output")
            page.pruned_out = gr.Textbox(label="Pruned model (last run)", lines=6, interactive=False,
                                         elem_id="pruned-output")
        page.generate_status = gr.Markdown(elem_classes="status-line", elem_id="generate-status")


# --- wiring ----------------------------------------------------------------------------------------

def outputs(page, named) -> list:
    """The components a handler's named outputs go to, in the tuple's field order."""
    return [getattr(page, name) for name in named._fields]


def wire(app: ExplorerApp, page, demo: gr.Blocks) -> None:
    """Which handler each event calls. The named endpoints (api_name) are the programmable API, every
    parameter under its own name; UI plumbing is private. The Allocation tab's controls reach a handler
    as one value (`alloc`, ui.settings.AllocationSettings), the run's Advanced accordion and Method
    options as another (`advanced`): each control is passed by name (`inputs_kwargs`), and
    `takes_settings` gathers them."""
    private = {"api_visibility": "private"}
    quiet = {"concurrency_limit": None, "show_progress": "hidden", **private}  # redraws: instant, never queued
    alloc = {name: getattr(page, attr) for name, attr in ALLOCATION_CONTROLS.items()}
    advanced = dict(zip(ADVANCED_NAMES + METHOD_NAMES, page.adv_in + page.opt_in))
    with_alloc = {name: takes_settings(getattr(app, name), alloc=AllocationSettings)
                  for name in ("on_importance", "on_allocation", "on_normalization", "on_table_edit",
                               "on_reset_manual", "on_predict", "on_search", "on_prune_plan")}
    run = takes_settings(app.on_run, alloc=AllocationSettings, advanced=AdvancedSettings)

    demo.load(app.on_page_load, None, [page.summary, page.load_status], **private)
    page.load_btn.click(loading_status, page.model_in, page.load_status, show_progress="hidden", **private).then(
        app.on_load, [page.model_in, page.task_in, page.data_in, page.upload, page.text_col, page.label_col],
        outputs(page, LoadOut), api_name="load")

    page.imp_btn.click(with_alloc["on_importance"], [page.metric_in, page.samples_in, page.batch_in],
                       outputs(page, ImportanceOut), inputs_kwargs=alloc, api_name="analyze")
    page.imp_stop_btn.click(app.on_stop_button, None, None, **quiet)
    gr.api(app.analysis_json, api_name="analysis_json")

    for name, comp in alloc.items():
        if name == "budget":  # latency: the cost model may be measured first (half a minute)
            comp.change(with_alloc["on_allocation"], [], outputs(page, AllocationOut), inputs_kwargs=alloc,
                        show_progress="minimal", **private)
        elif name == "normalization":
            comp.change(with_alloc["on_normalization"], [], outputs(page, NormalizationOut), inputs_kwargs=alloc,
                        **quiet)
        else:
            comp.change(with_alloc["on_allocation"], [], outputs(page, AllocationOut), inputs_kwargs=alloc, **quiet)
    page.alloc_table.input(with_alloc["on_table_edit"], [page.alloc_table], outputs(page, AllocationOut),
                           inputs_kwargs=alloc, **quiet)
    page.reset_btn.click(with_alloc["on_reset_manual"], [], outputs(page, AllocationOut), inputs_kwargs=alloc, **quiet)
    page.predict_btn.click(with_alloc["on_predict"], [page.recovery_in, *page.predict_cfg_in], outputs(page, PredictOut),
                           inputs_kwargs=alloc, show_progress="minimal", api_name="predict")
    page.search_btn.click(with_alloc["on_search"], [page.gens_in, *page.search_cfg_in], outputs(page, PredictOut),
                          inputs_kwargs=alloc, show_progress="minimal", api_name="search")
    page.predict_stop_btn.click(app.on_stop_button, None, None, **quiet)
    gr.api(app.plan_json, api_name="plan_json")
    gr.api(app.allocate_json, api_name="allocate")

    for trigger in (page.prune_tab.select, page.method_in.change):
        trigger(with_alloc["on_prune_plan"], [page.method_in], page.plan_md, inputs_kwargs=alloc,
                show_progress="hidden", **private)
    for trigger in (page.method_in.change, *(c.change for c in page.opt_in)):  # the note says the options' values
        trigger(method_options_shown, [page.method_in, *page.opt_in],
                [page.method_md, page.search_plot, *page.method_groups], show_progress="hidden", **private)
    page.run_btn.click(run, [page.stages_in, page.recovery_in, page.steps_in, page.method_in, page.metric_in,
                             page.samples_in, page.eval_in, page.timing_in],
                       outputs(page, RunOut), inputs_kwargs={**alloc, **advanced}, show_progress="minimal",
                       api_name="run")
    page.stop_btn.click(app.on_stop_button, None, None, **quiet)
    gr.api(app.on_stop, api_name="stop", concurrency_limit=None)  # the same, answering in words, never queued
    page.test_btn.click(app.on_test, None, page.run_status, api_name="test")

    page.export_tab.select(app.on_export_tab, None, page.run_in, **private)
    page.export_btn.click(app.on_export, [page.formats_in, page.run_in], outputs(page, ExportOut), api_name="export")
    page.generate_btn.click(app.on_generate, [page.prompt_in, page.new_tokens_in, page.temperature_in],
                            outputs(page, GenerateOut), api_name="generate")
    demo.unload(app.on_unload)


def build_ui(app: ExplorerApp, default_model: str = DEFAULT_MODEL, default_data: str | None = None,
             default_task: str = "auto") -> gr.Blocks:
    """The page shows the start-up model's settings, so Load reloads exactly that model."""
    loaded = app.registry.template
    metric, recovery = task_defaults(loaded.lm.task if loaded else None)
    fresh, page = fresh_views(), SimpleNamespace()
    # delete_cache: exported files (copied into Gradio's cache to be served) go after an hour
    with gr.Blocks(title="Pruning Explorer", delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# Pruning Explorer\nAdaptive structured pruning, step by step: load a model, measure how "
                    "important each layer is, shape the per-layer sparsity, then prune, recover and compare runs.")
        with gr.Tabs():
            model_tab(page, loaded, default_model, default_data, default_task)
            importance_tab(page, fresh, metric)
            allocation_tab(page, fresh, allocation_defaults(loaded.lm.name if loaded else default_model))
            prune_tab(page, fresh, recovery)
            export_tab(page)
        wire(app, page, demo)
    return demo


# --- main ------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pruning Explorer: interactive adaptive structured pruning (web UI).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model loaded at start-up: a built-in ({', '.join(BUILTIN_MODELS)}), a hub id or a "
                        f"directory (default: {DEFAULT_MODEL})")
    p.add_argument("--data", default=None, help="data loaded at start-up: a built-in (" + ", ".join(BUILTIN_DATA)
                   + ") or a file (default: the model's default data)")
    p.add_argument("--task", default="auto", choices=["auto", *TASKS],
                   help="task of the start-up model (default: auto, from its config)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' precision (default auto: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--share", action="store_true", help="also serve through a public Gradio share link")
    p.add_argument("--allow-local-paths", action=argparse.BooleanOptionalAction, default=None,
                   help="let users load models and data from paths on this machine (default: on when the host is "
                        "loopback and not sharing, off otherwise)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let hub models run their own code (unsafe: any user of the page can name any model)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="let models load pickle-based .bin weights (unsafe for untrusted files)")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                   help=f"largest data file a browser may upload, in MiB (default: {MAX_UPLOAD_MB})")
    p.add_argument("--concurrency", type=int, default=2, help="jobs run at once per event across sessions (default: 2)")
    return p.parse_args(argv)


def allow_local_paths(args: argparse.Namespace) -> bool:
    """--allow-local-paths if given, else on only for a loopback host without sharing."""
    if args.allow_local_paths is not None:
        return args.allow_local_paths
    return is_loopback(args.host) and not args.share


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("explorer").setLevel(logging.INFO)  # sessions opened / closed, internal errors
    if args.max_upload_mb <= 0 or args.concurrency < 1:
        raise SystemExit("app.py: error: --max-upload-mb must be > 0 and --concurrency at least 1")
    app = ExplorerApp(allow_local=True, device=args.device, max_upload_mb=args.max_upload_mb,  # operator's model
                      trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, dtype=args.dtype)
    t0 = time.perf_counter()
    print(f"Loading {args.model} …", flush=True)
    app.preload(args.model, args.data, args.task)
    app.allow_local = allow_local_paths(args)
    print(app.startup_error or f"Loaded {args.model} in {time.perf_counter() - t0:.1f} s.", flush=True)
    demo = build_ui(app, args.model, args.data, args.task)
    demo.queue(default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS,
                max_file_size=int(args.max_upload_mb * 2**20))


if __name__ == "__main__":
    main()
