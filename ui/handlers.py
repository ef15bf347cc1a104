"""The page's handlers: each takes its session from `request.session_hash`, calls the library
and returns a named tuple of the outputs it changes (`ui.outputs`); no model ever goes through
gr.State. Every user-facing error (`ExplorerError`) becomes a toast *and* a status line, and
the previous model, charts and reports stay.

The default model is loaded once at start-up (before the server listens) and every new
browser session gets its own copy of it, so each page opens ready and sessions never share
weights (a pruning run in one tab cannot touch another tab's model).
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import gradio as gr
import pandas as pd

from explorer import plots
from explorer.config import (METHOD_OPTIONS, AllocationConfig, AnalysisConfig, PredictConfig, PruneConfig,
                             SearchConfig, default_of, validate)
from explorer.data import BUILTIN_DATA, load_data
from explorer.errors import Cancelled, DataError, ExplorerError
from explorer.deploy import table_markdown
from explorer.evaluate import evaluate, metric_name, quality
from explorer.export import export
from explorer.importance import analyze
from explorer.latency import cost_model
from explorer.methods import make_run
from explorer.models import load_model, save_model
from explorer.pruning import PruningRun, check_pairing
from explorer.latency import plan_flops
from explorer.predict import parse_levels
from explorer.predict import Recipe, check_fits, front, measure, plan_sparsity, plan_speedup, speedup_label
from explorer.search import PlanSearch
from explorer.sessions import KEEP_RUNS, Loaded, Session, SessionRegistry

from .outputs import (SKIP, AllocationOut, ExportOut, GenerateOut, ImportanceOut, LoadOut, NormalizationOut,
                      PredictOut, RunOut)
from .settings import AdvancedSettings, AllocationSettings, advanced_values, method_option_values
from .views import (EDITABLE, EXPORT_FORMATS, EXPORT_ZIP, MAX_UPLOAD_MB, MODEL_DEFAULT_DATA, advanced_configs,
                    allocation_table, budget_plan, config_from, cost_figure, dense_parts, empty_table, eta, eval_size,
                    evaluation_note, export_stem, fresh_export, fresh_views, known_dense, latency_note, layer_figure,
                    message, method_values, model_summary, normalization_choice, number, parse_manual,
                    predicted_speedup, quality_figure, quality_text, recovery_figure, remember_dense, remember_quality,
                    report_csv, report_rows, require_importance, require_loaded, run_label, stage_quality, stage_table,
                    task_defaults, try_model)

ANALYSIS_JOB, RUN_JOB = "the importance analysis", "the pruning run"  # what a busy session says it does


def warn(text: str) -> str:
    """Show an error as a toast and return it as a status line (both stay visible)."""
    gr.Warning(text)
    return f"⚠️ **{text}**"


class ExplorerApp:
    """The handlers. Each takes the session from `request.session_hash`, calls the library
    and returns figures / tables / status text; no model ever goes through gr.State."""

    def __init__(self, registry: SessionRegistry | None = None, allow_local: bool = True, device: str = "auto",
                 max_upload_mb: float = MAX_UPLOAD_MB, upload_dir: str | None = None,
                 trust_remote_code: bool = False, allow_pickle: bool = False, dtype: str = "auto"):
        self.registry = registry if registry is not None else SessionRegistry()
        self.allow_local = allow_local
        self.device, self.dtype = device, dtype  # dtype auto: bfloat16 on CUDA, float32 on the CPU
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.upload_dir = Path(upload_dir or gr.utils.get_upload_folder()).resolve()  # where Gradio puts uploads
        self.trust_remote_code, self.allow_pickle = trust_remote_code, allow_pickle  # off unless the operator says
        self.startup_error = ""

    # session plumbing
    def session(self, request) -> Session:
        return self.registry.get(getattr(request, "session_hash", None) or "")

    def on_unload(self, request: gr.Request):
        self.registry.drop(getattr(request, "session_hash", None) or "")

    def preload(self, model: str, data: str | None = None, task: str = "auto") -> None:
        """Load the default model once, before the server starts; sessions copy it."""
        try:
            self.registry.template = self.load(model, task, data or MODEL_DEFAULT_DATA, None, "text", "label")
        except Exception as e:
            self.startup_error = f"could not preload '{model}': {message(e)}"

    def load(self, model: str, task: str, data: str, upload, text_col: str, label_col: str, progress=None) -> Loaded:
        say = progress or (lambda *a, **k: None)
        say(0.05, desc=f"loading model {model}")
        lm = load_model(model, task=None if task in ("auto", "", None) else task, device=self.device,
                        dtype=self.dtype, allow_local=self.allow_local, trust_remote_code=self.trust_remote_code,
                        allow_pickle=self.allow_pickle)
        path = self.checked_upload(upload)
        name = path or (lm.default_data if data in (MODEL_DEFAULT_DATA, "", None) else data)
        if not name:
            raise DataError(f"'{model}' has no default data set: choose one ({', '.join(BUILTIN_DATA)}) or upload a file")
        if not path and name not in BUILTIN_DATA and not self.allow_local:
            raise DataError("local data paths are disabled on this server: choose a built-in data set or upload a file")
        say(0.6, desc=f"loading data {Path(str(name)).name}")
        limit = {"max_bytes": self.max_upload_bytes} if path else {}  # uploads: the server's limit
        data_ = load_data(name, text_column=(text_col or "text").strip(), label_column=(label_col or "").strip(),
                          **limit)
        check_pairing(lm, data_)
        say(0.75, desc="evaluating the dense model")
        loaded = Loaded(lm, data_, evaluate(lm, data_, eval_size(lm), timing=False, split="val"))  # test: on request
        remember_quality(loaded.dense_runs, loaded.dense_eval, eval_size(lm), "val")  # a run at this budget reuses it
        return loaded

    def checked_upload(self, upload) -> str | None:
        """The path of an uploaded file, refused unless it lies in Gradio's upload folder (a request
        could name any path) or local paths are allowed on this server."""
        path = getattr(upload, "name", upload)  # gr.File gives a path (str) or a tempfile wrapper
        if not path:
            return None
        resolved = Path(str(path)).resolve()
        if not self.allow_local and not resolved.is_relative_to(self.upload_dir):
            raise DataError("an uploaded file must come through the upload box; local paths are disabled on this server")
        return str(resolved)

    # tab 1
    def on_page_load(self, request: gr.Request):
        s = self.session(request)
        status = f"⚠️ **{self.startup_error}**" if self.startup_error and s.loaded is None else (
            "Ready." if s.loaded else "Load a model to start.")
        return model_summary(s.loaded), status

    def on_load(self, model, task, data, upload, text_col, label_col, request: gr.Request,
                progress=gr.Progress()):
        """-> the model summary and status, the task's metric and recovery, and fresh views of everything
        that depended on the previous model (the run history and kept models stay, marked by model)."""
        s = self.session(request)
        t0 = time.perf_counter()
        try:
            with s.busy(f"loading {model}"):
                loaded = self.load(model, task, data, upload, text_col, label_col, progress)
                s.set_loaded(loaded)
        except Exception as e:
            kept = s.loaded.lm.name if s.loaded else None  # the Model box names the model that is loaded
            return LoadOut(load_status=warn(f"Load failed, the previous model stays: {message(e)}"
                                            + (f" (loaded: `{kept}`)" if kept else " (no model is loaded)")),
                           model_in=gr.update(value=kept) if kept else SKIP)
        metric, recovery = task_defaults(loaded.lm.task)
        return LoadOut(summary=model_summary(loaded),
                       load_status=f"Loaded `{loaded.lm.name}` in {time.perf_counter() - t0:.1f} s.",
                       metric_in=gr.update(value=metric), recovery_in=gr.update(value=recovery),
                       **fresh_views(), **fresh_export())

    # tab 2
    def on_importance(self, metric, samples, batch_size, alloc: AllocationSettings, request: gr.Request,
                      progress=gr.Progress()):
        """-> ImportanceOut: the three plots, the status, then the allocation they feed."""
        s = self.session(request)
        try:
            with s.busy(ANALYSIS_JOB):
                loaded = require_loaded(s)
                normalization = normalization_choice(alloc.normalization)
                cfg = AnalysisConfig(samples=number(samples, "calibration samples", int),
                                     batch_size=number(batch_size, "batch size", int), metric=metric)
                validate(cfg)
                # stage 1's samples: the first stage of a run analyses the same dense model on them, and reuses this
                texts, labels = loaded.data.calibration(cfg.samples, stage=1, seed=cfg.seed)
                progress(0, desc="calibration batches")
                with loaded.lock:  # hooks on a model other sessions may share
                    imp = analyze(loaded.lm, texts, labels, cfg, should_stop=s.stop_requested,
                                  progress=lambda done, total: progress((done, total), desc="calibration batches"))
                s.importance, s.manual, s.last_edit = imp, {}, None
        except Cancelled:
            kept = "the previous importance and allocation stay" if s.importance else "nothing was changed"
            return ImportanceOut(imp_status=f"Stopped: the analysis was cancelled; {kept}.")
        except Exception as e:
            return ImportanceOut(imp_status=warn(message(e)))
        figs = {"layer importance": layer_figure(imp, normalization),
                "head salience": plots.heads_heatmap(imp.heads[metric], metric,
                                                     s.loaded.lm.summary()["heads_per_group"]),
                "neuron salience": plots.neurons_heatmap(imp.neurons[metric], metric)}
        s.figures.update(figs)
        try:
            out = self.allocation_outputs(s, alloc)
        except Exception as e:  # the analysis stands; the plan's settings are what is wrong
            out = AllocationOut(alloc_md=warn(message(e)))
        took = (f"reused from the cache (computed earlier in {imp.seconds:.1f} s)" if getattr(imp, "cached", False)
                else f"in {imp.seconds:.1f} s")
        return ImportanceOut(*figs.values(), imp_status=(
            f"Importance from {imp.samples} calibration samples ({imp.tokens:,} tokens), metric `{metric}`, "
            f"{took}. The Allocation tab now uses it."), **out._asdict())

    # tab 3
    def allocation_outputs(self, s: Session, alloc_in: AllocationSettings, note: str = ""):
        """-> AllocationOut: chart, table, summary. Pure numpy + plotly: well under 100 ms."""
        t0 = time.perf_counter()
        imp, loaded = s.importance, s.loaded
        if imp is None or loaded is None:
            return AllocationOut(plots.empty("Compute importance first (Importance tab)"), empty_table(),
                                 note or "Compute importance first (Importance tab).")
        cfg = alloc_in.config()
        norm = imp.normalized_by(cfg.normalization)
        scores = imp.unit_scores()
        head_dim = loaded.lm.summary()["head_dim"]
        latency = self.latency_model(loaded) if cfg.budget == "latency" else loaded.costs.get("latency")
        manual = s.manual if cfg.budget == "params" else {}  # hand edits set parameters, not a speed
        if cfg.mode == "search" and s.searched is None:
            raise ExplorerError("mode search shows the searched plan: press Search plan first (or choose another "
                                "mode)")
        alloc = budget_plan(norm, imp.params, cfg, scores, manual, head_dim, latency, base=s.searched)
        uniform = budget_plan(norm, imp.params, replace(cfg, mode="uniform"), scores, {}, head_dim, latency)
        s.allocation = alloc
        hpg = [p["heads_per_group"] for p in imp.params]
        f0, f1 = plan_flops(alloc, imp.params, head_dim)
        _, fu = plan_flops(uniform, imp.params, head_dim)
        goal = {"params": f"S_base={cfg.target:.2f}", "flops": f"{cfg.target:.0%} of FLOPs",
                "latency": f"×{cfg.speedup:g} predicted speed-up"}[cfg.budget]
        title = (f"{goal}, A={cfg.amplitude:.2f} ({cfg.mode}"
                 + ("" if cfg.normalization == "maxabs" else f", {cfg.normalization} Î") + "): keeps "
                 f"{alloc.params_after / 1e6:.2f} of {alloc.params_before / 1e6:.2f} M block parameters")
        fig = plots.allocation_chart([l.sparsity for l in alloc.layers], [l.sparsity for l in uniform.layers],
                                     alloc.target, [l.clipped for l in alloc.layers], [l.manual for l in alloc.layers],
                                     norm, title=title)
        s.figures["allocation"] = fig

        def brief(a, f):
            speed = f", predicted speed-up **×{predicted_speedup(latency, a):.2f}**" if latency else ""
            return (f"keeps {a.params_after / 1e6:.2f} M of {a.params_before / 1e6:.2f} M block parameters (removes "
                    f"{a.removed_fraction:.1%}), ≈ {f / 1e6:.1f} M FLOPs/token ({f / f0:.0%} of dense){speed}")
        lines = [f"**Adaptive**: {brief(alloc, f1)}. **Uniform**: {brief(uniform, fu)}."]
        if latency:
            lines.append(latency_note(latency))
        if cfg.budget != "params":
            lines.append(f"Budget **{cfg.budget}**: S_base = {alloc.target:.3f} (found by bisection), then unit by unit"
                         " to the goal" + (f"; the table's hand edits ({len(s.manual)}) apply to the params budget "
                                           "only" if s.manual else "") + ".")
        if alloc.clipped_layers:
            lines.append(f"⚠️ **Clipped** at 0 or S_max = {cfg.max_sparsity:g}: layer(s) "
                         f"{', '.join(map(str, alloc.clipped_layers))}"
                         + (" (exact mode gave their share to the other layers)." if cfg.mode == "exact" else
                            " (reference mode: the budget may be missed)."))
        if cfg.split == "salience" and alloc.split != "salience":
            lines.append(f"Split: proportional, because `{imp.metric}` scores are not losses on one scale for "
                         "attention and FFN (the salience split needs taylor, taylor_vector, fisher, act_grad or "
                         "fluctuation).")
        if s.manual:
            lines.append(f"Set by hand: layer(s) {', '.join(map(str, sorted(s.manual)))} (Reset to drop them).")
        if note:
            lines.insert(0, note)
        predicted, front_fig = self.prediction(s, cfg, alloc, uniform, head_dim, latency)
        if predicted:
            lines.insert(1, predicted)
        lines.append(f"<small>computed in {(time.perf_counter() - t0) * 1000:.0f} ms</small>")
        return AllocationOut(fig, allocation_table(alloc, hpg), "\n\n".join(lines), front_fig)

    def prediction(self, s: Session, cfg: AllocationConfig, alloc, uniform, head_dim: int, latency):
        """The predicted val quality of the plan on screen beside uniform's, with the predictor's measured
        error, and the chart of predicted quality against predicted speed-up (or FLOPs) of uniform, the A
        sweep, this plan and the searched plan. ('', SKIP) without a predictor for this model."""
        pred = s.predictor
        if pred is None:
            return "", SKIP
        try:
            check_fits(pred, s.loaded.lm, s.loaded.data)
        except ExplorerError as e:
            return f"⚠️ {message(e)}", SKIP
        imp = s.importance

        def cost(a):
            return plan_speedup(a, imp.params, head_dim, latency)
        label = speedup_label(latency)
        here = pred.predict(plan_sparsity(alloc))
        uni = pred.predict(plan_sparsity(uniform))
        m = pred.metric
        fmt = (lambda q: f"{q:.2f}") if m == "perplexity" else (lambda q: f"{q:.1%}")
        err = pred.error()
        err_text = (f"measured error: median {err['median_share_of_gap']:.0%} of the dense-to-plan gap on "
                    f"{err['plans']} check plan(s), leave-one-out" if err else "no check plans measured")
        text = (f"**Predicted val {m}** (one reconstructed stage{'' if pred.settings.get('recovery') == 'reconstruct' else ', no refit'}): "
                f"this plan **{fmt(here)}**, uniform {fmt(uni)}, dense {fmt(pred.dense_quality)} "
                f"<small>({err_text}; α = {pred.alpha:.2f})</small>")
        points = front(pred, imp, replace(cfg, budget="params") if cfg.mode == "search" else cfg, cost)
        current = {"quality": here, "cost": cost(alloc)}
        searched = None
        if s.searched is not None and cfg.budget == "params":
            sa = budget_plan(imp.normalized_by(cfg.normalization), imp.params, replace(cfg, mode="search"),
                             imp.unit_scores(), {}, head_dim, None, base=s.searched)
            if abs(sa.target - alloc.target) < 1e-9:
                searched = {"quality": pred.predict(plan_sparsity(sa)), "cost": cost(sa)}
        return text, plots.prediction_front(points, current, searched, pred.dense_quality, m, label)

    # --- the predictor and the plan search (Allocation tab) -----------------------------------------
    def _recipe(self, s: Session, recovery, alloc: AllocationSettings, predict: PredictConfig):
        imp = s.importance
        cfg = alloc.config(mode="exact" if alloc.mode == "search" else alloc.mode, budget="params")
        prune = replace(PruneConfig(), recovery=recovery or default_of(PruneConfig, "recovery"))
        validate(prune)
        analysis = AnalysisConfig(samples=imp.samples or AnalysisConfig().samples, metric=imp.metric)
        return Recipe(analysis, cfg, prune, predict)

    def on_predict(self, recovery, alloc: AllocationSettings, request: gr.Request, tokens=None, examples=None,
                   levels=None, checks=None, progress=gr.Progress()):
        """-> PredictOut: measure the plan predictor (or read it from the disk cache), then redraw the
        allocation with every plan's predicted quality. tokens / examples / levels / checks: PredictConfig's
        (its defaults when None)."""
        s = self.session(request)
        try:
            with s.busy("measuring the predictor"):
                loaded = require_importance(s, "the predictor")
                pcfg = config_from(PredictConfig, tokens=tokens, examples=examples, levels=levels, checks=checks)
                parse_levels(pcfg.levels)
                recipe = self._recipe(s, recovery, alloc, pcfg)
                progress(0, desc="the dense model on val")

                def tick(d):
                    progress((d["done"], d["total"]), desc=f"{d['phase']} · ETA {eta(d['eta_s'])}")
                with loaded.lock:  # layers are swapped in and out of the shared model
                    pred = measure(loaded.lm, loaded.data, s.importance, recipe, progress=tick,
                                   should_stop=s.stop_requested)
                s.predictor = pred
        except Cancelled:
            return PredictOut(predict_status="Stopped: the predictor was not measured; the plan is unchanged.")
        except Exception as e:
            return PredictOut(predict_status=warn(message(e)))
        err = pred.error()
        status = (f"Predictor {'read from the cache (measured ' + pred.measured_at + ')' if pred.cached else 'measured'}"
                  f" in {pred.seconds:.0f} s: {pred.n_layers} layers × {len(pred.levels)} levels, "
                  f"recovery `{pred.settings.get('recovery')}`, on {recipe.predict.tokens if pred.metric == 'perplexity' else recipe.predict.examples} val "
                  f"{'tokens' if pred.metric == 'perplexity' else 'examples'}"
                  + (f"; error on {err['plans']} check plan(s): median {err['median_share_of_gap']:.0%} of the gap"
                     if err else "") + ".")
        try:
            out = self.allocation_outputs(s, alloc)
        except Exception as e:
            out = AllocationOut(alloc_md=warn(message(e)))
        return PredictOut(predict_status=status, **out._asdict())

    def on_search(self, alloc: AllocationSettings, generations, request: gr.Request, small=None, large=None,
                  max_seconds=None, offspring=None):
        """Generator -> PredictOut: the search curve after every generation; at the end (or on Stop, with the
        best plan so far) the searched plan lands in the table (mode "search"), still editable."""
        s = self.session(request)
        try:
            with s.busy("the plan search"):
                loaded = require_importance(s, "the search")
                cfg = alloc.config(mode="exact")
                if cfg.budget != "params":
                    raise ExplorerError("the search meets a params budget: choose budget params")
                scfg = config_from(SearchConfig, generations=generations, small=small, large=large,
                                   max_seconds=max_seconds, offspring=offspring)
                predictor = s.predictor
                if predictor is not None:
                    try:
                        check_fits(predictor, loaded.lm, loaded.data)
                    except ExplorerError:
                        predictor = None
                search = PlanSearch(loaded.lm, loaded.data, s.importance, cfg, scfg, predictor)
                curve = []
                with loaded.lock:  # units are zeroed in place in the shared model
                    for ev in search.events():
                        if s.stop_requested():
                            search.stop()
                        if ev["type"] == "start":
                            curve.append({"trial": search.trials, "value": ev["loss"], "best_value": ev["loss"]})
                            starts = ", ".join(f"{k} {v:.4f}" for k, v in ev["start"].items())
                            yield PredictOut(predict_status=f"Search: starts scored ({starts}); from "
                                             f"**{ev['chosen']}**.", plan_search_plot=plots.search_curve(curve))
                        elif ev["type"] == "generation":
                            curve.append({"trial": ev["trials"], "value": ev["loss"], "best_value": ev["loss"]})
                            yield PredictOut(predict_status=(
                                f"Search: generation {ev['generation']} of {ev['generations']}, best val loss "
                                f"{ev['loss']:.4f}, {ev['trials_per_s']:.1f} trials/s, ETA {eta(ev['eta_s'])} "
                                "(Stop keeps the best plan so far)."), plan_search_plot=plots.search_curve(curve))
                        elif ev["type"] == "done":
                            done = ev
                s.searched = [lp.sparsity for lp in done["allocation"].layers]
                s.search_curve, s.manual, s.last_edit = curve, {}, None
        except Cancelled:
            yield PredictOut(predict_status="Stopped before the first trial: the plan is unchanged.")
            return
        except Exception as e:
            yield PredictOut(predict_status=warn(message(e)))
            return
        first = min(done["start"].values())
        out = self.allocation_outputs(s, replace(alloc, mode="search"))
        yield PredictOut(predict_status=(
            f"Search {done['reason']}: {done['trials']} trials in {done['seconds']:.0f} s; val loss "
            f"{first:.4f} → **{done['loss']:.4f}** (zeroed units, {scfg.large} val "
            f"{'tokens' if loaded.lm.task == 'causal-lm' else 'examples'}). The searched plan is in the table "
            "(mode search), where you can still edit it."), plan_search_plot=plots.search_curve(curve),
            mode_in=gr.update(value="search"), **out._asdict())

    def latency_model(self, loaded: Loaded):
        """The latency cost model of the loaded model on this device: read from the disk cache, or
        measured once (about half a minute for MiniLM on 2 cores) and kept with the model."""
        if "latency" not in loaded.costs:
            with loaded.lock:  # the measurement times the model with its blocks taken out
                loaded.costs["latency"] = cost_model(loaded.lm)
        return loaded.costs["latency"]

    def on_allocation(self, alloc: AllocationSettings, request: gr.Request):
        """-> AllocationOut: the plan for the Allocation tab's settings (every slider move)."""
        s = self.session(request)
        s.last_edit = None
        try:
            return self.allocation_outputs(s, alloc)
        except Exception as e:
            return AllocationOut(alloc_md=warn(message(e)))

    def on_normalization(self, alloc: AllocationSettings, request: gr.Request):
        """-> NormalizationOut: the layer-importance plot (Î by the chosen normalisation) and the allocation."""
        s = self.session(request)
        out = self.on_allocation(alloc, request)
        try:
            fig = layer_figure(s.importance, normalization_choice(alloc.normalization)) if s.importance else SKIP
        except Exception:  # the allocation outputs already say what is wrong
            return NormalizationOut(**out._asdict())
        if s.importance:
            s.figures["layer importance"] = fig
        return NormalizationOut(fig, **out._asdict())

    def on_table_edit(self, table, alloc: AllocationSettings, request: gr.Request):
        """-> AllocationOut: the plan with the table's edited rows set by hand (a bad cell: a message, the
        table as it was)."""
        s = self.session(request)
        if s.allocation is None:
            return self.on_allocation(alloc, request)
        edited = [str(v) for v in (table.iloc[:, EDITABLE] if isinstance(table, pd.DataFrame) else
                                   [row[EDITABLE] for row in table])]
        if edited == s.last_edit:  # the browser sends one edit twice (commit, then blur): the copy is stale
            return AllocationOut()
        s.last_edit = edited
        before = s.manual
        try:
            s.manual = parse_manual(table, s.allocation, s.manual)
            return self.allocation_outputs(s, alloc)
        except Exception as e:
            s.manual = before
            try:
                return self.allocation_outputs(s, alloc, note=warn(message(e)))
            except Exception as e2:  # the settings themselves are wrong too
                return AllocationOut(alloc_md=warn(message(e2)))

    def on_reset_manual(self, alloc: AllocationSettings, request: gr.Request):
        s = self.session(request)
        s.manual = {}
        return self.on_allocation(alloc, request)

    # tab 4
    def on_run(self, stages, recovery, steps, method, metric, samples, eval_n, timing, alloc: AllocationSettings,
               request: gr.Request, advanced: AdvancedSettings | None = None):
        """Generator -> RunOut per event. The plan is the Allocation tab's (`alloc`; its table when layers
        were set by hand); `advanced`: the Advanced accordion's values and the Method options' (defaults where
        absent). `timing`: also time the dense model (once per loaded model) and every stage."""
        s = self.session(request)
        advanced = advanced or AdvancedSettings()
        try:
            with s.busy(RUN_JOB):
                loaded = require_loaded(s)
                adv = advanced_configs(advanced_values(advanced))
                method = method or "adaptive"
                options = method_values(method, method_option_values(advanced))
                prune = PruneConfig(stages=number(stages, "stages", int), recovery=recovery,
                                    recovery_steps=number(steps, "recovery steps", int),
                                    eval_samples=eval_size(loaded.lm, number(eval_n, "evaluation size", int)),
                                    eval_split="val", **adv[PruneConfig])  # choices on val; test on request
                analysis = AnalysisConfig(samples=number(samples, "calibration samples", int), metric=metric,
                                          **adv[AnalysisConfig])
                alloc_cfg = replace(alloc.config(), **adv[AllocationConfig])
                if alloc_cfg.mode == "search" and (s.searched is None or s.allocation is None):
                    raise ExplorerError("mode search prunes to the searched plan: press Search plan in the "
                                        "Allocation tab first (or choose another mode)")
                # layers set by hand, or the searched plan: prune to the table
                final_plan = s.allocation if s.manual or alloc_cfg.mode == "search" else None
                shown = {**adv, **({METHOD_OPTIONS[method]: options} if options else {})}
                label = run_label(len(s.history) + 1, method, alloc_cfg, prune, shown, by_hand=sorted(s.manual))
                with loaded.lock:  # the dense model (perhaps shared) stays intact for the next run
                    lm = copy.deepcopy(loaded.lm)
                if method == "adaptive":  # the Allocation tab's mode decides (exact, reference or uniform)
                    cost = self.latency_model(loaded) if alloc_cfg.budget == "latency" else None
                    run = PruningRun(lm, loaded.data, analysis, alloc_cfg, prune, final_plan=final_plan,
                                     timing=bool(timing), label=label, cost_model=cost)
                elif alloc_cfg.budget != "params":
                    raise ExplorerError(f"the {alloc_cfg.budget} budget is for the adaptive method; {method} "
                                        "budgets parameters: set the Allocation tab's budget to params")
                else:
                    run = make_run(method, lm, loaded.data, analysis, alloc_cfg, prune, timing=bool(timing),
                                   label=label, final_plan=final_plan, **options)  # every method follows the table
                s.run = run
                yield from self._stream(s, run, metric_name(lm), loaded)
        except Exception as e:
            yield RunOut(run_status=warn(message(e)))

    def _stream(self, s: Session, run: PruningRun, m: str, loaded: Loaded):
        """Turn the run's events into RunOut updates; unchanged outputs are skipped. Every phase
        (measuring, importance, pruning, reconstruction, recovery, evaluation) says so."""
        losses: dict[int, list[float]] = {}
        reconstructions: dict[int, dict] = {}  # stage -> its reconstruction's report (recovery reconstruct)
        trials: list[dict] = []  # a search's trials (AdaPruner), for its curve
        K = run.prune.stages
        t_last = 0.0
        cost_note = evaluation_note(run)
        t_start = t_first = None  # after the dense model; the first recovery step of the current stage
        known, timing = known_dense(loaded.dense_runs, run)
        if known is not None and timing is not None:
            run.dense_given = {**known, **timing}
            reused = "measurement reused" + (" (its timing measured once for this loaded model)" if run.timing else "")
        elif timing:  # timed before, on another evaluation budget: only the quality is measured
            yield RunOut(run_status=f"Measuring the dense model's quality ({evaluation_note(run, timing=False)}; its "
                                    "timing was measured once for this loaded model and is reused)…")
            q = evaluate(run.lm, run.data, run.prune.eval_samples, timing=False, split=run.prune.eval_split)
            run.dense_given = {**dense_parts(q)[0], **timing}
            reused = "quality measured, timing reused (measured once for this loaded model)"
        else:
            yield RunOut(run_status=f"Measuring the dense model ({cost_note}; once per loaded model and settings)…")
            reused = "measured"
        for ev in run.events():
            kind = ev["type"]
            stage = f"Stage {ev.get('stage')}/{K}"
            if kind == "dense":
                remember_dense(loaded.dense_runs, run)
                t_start = time.perf_counter()
                yield self._run_views(s, run, m)._replace(run_status=(
                    f"Dense model {reused}: {m} {quality_text(run.dense, m)}. Stage 1/{K}: estimating "
                    f"importance ({run.analysis.metric}, {run.analysis.samples} calibration samples)…"))
            elif kind == "cost_model":
                yield RunOut(run_status="Measuring the latency cost model on this device (once per model shape; "
                                        "cached)…" if ev["status"] == "measuring" else
                             f"Latency cost model ready ({ev['reference']:.1f} {ev['unit']} predicted for the "
                             "start). Stage 1: estimating importance…")
            elif kind == "evaluating":
                yield RunOut(run_status=f"{stage}: evaluating ({cost_note})…")
            elif kind == "analysis":
                yield RunOut(run_status=f"{stage}: pruning, then recovery ({run.prune.recovery})…")
            elif kind == "phase":
                q = ", ".join(f"{k} {v:.4f}" for k, v in ev["quality"].items() if k in ("accuracy", "perplexity"))
                nxt = {"cut": "reconstructing" if run.reconstructs else "training",
                       "reconstructed": "training"}[ev["phase"]]
                yield RunOut(run_status=f"{stage}: {ev['phase']} ({q}); {nxt}…")
            elif kind == "reconstruct":
                yield RunOut(run_status=f"{stage}: reconstructing layer by layer (closed-form refit of each "
                                        "block's output projections)…")
            elif kind == "step":
                losses.setdefault(ev["stage"], []).append(ev["loss"])
                now = time.perf_counter()
                if ev["step"] == 1:
                    t_first = now
                if now - t_last > 0.3 or ev["step"] == run.prune.recovery_steps:  # at most ~3 redraws a second
                    t_last = now
                    left = run.prune.recovery_steps - ev["step"]
                    rate = (now - t_first) / (ev["step"] - 1) if ev["step"] > 1 else None
                    s.figures["recovery loss"] = fig = recovery_figure(losses, reconstructions)
                    yield RunOut(loss_plot=fig, run_status=(
                        f"{stage}: recovery step {ev['step']}/{run.prune.recovery_steps}, loss {ev['loss']:.4f}"
                        + (f"; {eta(rate * left)} of recovery left" if rate and left else "")))
            elif kind == "stage":
                r = ev["record"]
                if r.reconstruction:
                    reconstructions[r.stage] = r.reconstruction
                q = quality_text(stage_quality(r, m), m)
                s.figures["recovery loss"] = recovery_figure(losses, reconstructions)
                per_stage = (time.perf_counter() - t_start) / r.stage if t_start else 0.0
                yield self._run_views(s, run, m)._replace(loss_plot=s.figures["recovery loss"], run_status=(
                    f"Stage {r.stage}/{K} done: {r.removed_fraction:.1%} of block parameters removed, {m} {q}"
                    + ("." if r.stage == K else f". Stage {r.stage + 1}/{K}: estimating importance… "
                                                f"({eta(per_stage * (K - r.stage))} left at this pace)")))
            elif kind == "hidden":
                yield RunOut(run_status=f"Hidden size {ev['hidden_before']} → {ev['hidden_after']} "
                                        f"({ev['removed_fraction']:.1%} of the residual channels removed). Stage 1/{K}: "
                                        "estimating importance…")
            elif kind == "layer_drop":
                yield RunOut(run_status=f"Dropped blocks {ev['dropped']}.")
            elif kind == "trial":
                trials.append(ev)
                yield RunOut(run_status=f"Search trial {ev['trial']}: {ev['value']:.4f} (best "
                                        f"{ev['best_value']:.4f}, {ev.get('best_params')})",
                             search_plot=plots.search_curve(trials))
            elif kind == "round":
                yield RunOut(run_status="Round " + ", ".join(f"{k} {v}" for k, v in ev.items() if k != "type"))
            elif kind in ("stopped", "error", "done"):  # the run is over
                yield self._finish(s, run, m, kind, ev)

    def _finish(self, s: Session, run: PruningRun, m: str, kind: str, ev: dict) -> RunOut:
        """The run's report joins the history (its label says how it ended) and its model is kept."""
        done = len(run.records)
        rep = run.report()
        for k in (f"{m}_ci", "eval_split", "eval_tokens", "eval_examples"):  # the dense figure's interval and budget
            if run.dense.get(k) is not None:
                rep["dense"].setdefault(k, run.dense[k])
        if kind != "done":
            rep["label"] += " (stopped)" if kind == "stopped" else f" (failed at stage {done + 1})"
            run.label = rep["label"]
        s.history.append(rep)
        if run.records:
            s.keep_run(rep["label"], run.lm)
        status = {"done": f"Done: {done} stage(s) in {ev.get('seconds', 0):.0f} s. Export it in the Export tab.",
                  "stopped": f"Stopped: kept the model after stage {done}." if done else
                             "Stopped before the first stage finished: nothing was pruned.",
                  }.get(kind) or warn(f"Run failed ({ev.get('message')}); kept the model after stage {done}.")
        return self._run_views(s, run, m)._replace(run_status=status, **self._history_views(s, m))

    @staticmethod
    def _run_views(s: Session, run: PruningRun, m: str) -> RunOut:
        """Quality chart, size/latency chart and stage table of the run so far."""
        rows = report_rows(run.report(), dense=run.dense)
        s.figures["quality"] = quality = quality_figure(rows, m, run.label)
        s.figures["size and latency"] = cost = cost_figure(rows)
        return RunOut(quality_plot=quality, cost_plot=cost, stages_table=stage_table(rows, m, run.prune.eval_split))

    @staticmethod
    def _history_views(s: Session, m: str) -> dict:
        """Every run of the session overlaid, and the Pareto chart of all their stages."""
        lines, points = [], []
        current = s.loaded.lm.name if s.loaded else None
        for rep in (r for r in s.history if r["model"] == current):  # one model's runs share one metric
            rows = report_rows(rep)
            lines.append({"label": rep["label"], "removed": [r["removed_fraction"] for r in rows],
                          "quality": [r["quality"] for r in rows],
                          "intervals": [None if r.get("quality_lo") is None else [r["quality_lo"], r["quality_hi"]]
                                        for r in rows]})
            points += rows
        s.figures["run history"] = hist = plots.history_chart(lines, m)
        s.figures["pareto"] = pareto = plots.pareto_chart(points, m)
        return {"history_plot": hist, "pareto_plot": pareto}

    def on_stop(self, request: gr.Request):
        """The Stop buttons (Importance and Prune tabs): stop the analysis or the run in progress."""
        job = self.session(request).stop()
        if not job:
            return "Nothing is running."
        if job == RUN_JOB:
            return "Stopping after the current step; the last completed stage is kept…"
        if job == ANALYSIS_JOB:
            return f"Stopping {job} after the current batch…"
        return f"{job[0].upper()}{job[1:]} cannot be stopped; it finishes on its own."

    def on_stop_button(self, request: gr.Request) -> None:
        """A Stop button's click: `on_stop`'s answer as a toast. Not written to the job's status line,
        where it could arrive after (and overwrite) the job's own last line ("Stopped: …")."""
        gr.Info(self.on_stop(request), duration=15)

    # tab 5
    def on_prune_plan(self, method, alloc: AllocationSettings, request: gr.Request) -> str:
        """-> the line above the Run button: the plan the run will use, which is the Allocation tab's."""
        s = self.session(request)
        try:
            cfg = alloc.config()
        except ExplorerError as e:
            return warn(message(e))
        if cfg.mode == "search":
            what = ("the searched plan in the Allocation tab's table" if s.searched is not None else
                    "⚠️ mode search, but no plan has been searched yet: press Search plan in the Allocation tab")
            if s.manual:
                what += f" ({len(s.manual)} layer(s) set by hand: {', '.join(map(str, sorted(s.manual)))})"
        elif s.manual:
            what = (f"the Allocation tab's table ({len(s.manual)} layer(s) set by hand: "
                    f"{', '.join(map(str, sorted(s.manual)))}; Reset hand edits there to drop them)")
        elif cfg.mode == "uniform":
            what = f"uniform, S_L = S_base = {cfg.target:g} in every layer"
        else:
            what = (f"adaptive, S_L = S_base − A·Î_L with S_base = {cfg.target:g}, A = {cfg.amplitude:g}, "
                    f"{cfg.mode} mode, Î_L normalised by {cfg.normalization}")
        if cfg.budget == "latency":
            what += f"; S_base chosen so that the predicted speed-up is ×{cfg.speedup:g} (latency budget)"
        elif cfg.budget == "flops":
            what += f"; S_base chosen so that {cfg.target:.0%} of the blocks' FLOPs go (FLOPs budget)"
        return (f"**Plan** (from the Allocation tab): {what}; {cfg.split} split, S_max {cfg.max_sparsity:g}"
                + (f", neurons rounded to multiples of {cfg.round_to}" if cfg.round_to > 1 else "")
                + ("" if method == "adaptive" else f"; method **{method}**") + ".")

    def on_export_tab(self, request: gr.Request):
        """-> the run choice: the runs whose final model is kept, the last one selected."""
        labels = list(self.session(request).kept)
        return gr.update(choices=labels, value=labels[-1] if labels else None)

    def on_export(self, request: gr.Request, formats=(EXPORT_ZIP,), run_label=None, progress=gr.Progress()):
        """-> ExportOut: files, status. Charts always; reports once a run finished; the chosen run's pruned model
        (zip, ONNX, GGUF; the last run's by default). A failure clears the list (no stale download)
        and keeps the models."""
        s = self.session(request)
        formats = list(formats or [])
        try:
            with s.busy("the export"):
                out = s.workdir / time.strftime("export-%Y%m%d-%H%M%S")
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                files, missing, checks = [], [], []
                if s.figures:
                    (out / "charts.html").write_text(plots.charts_html(s.figures), encoding="utf-8")
                    files.append(out / "charts.html")
                else:
                    missing.append("charts (compute importance first)")
                if s.history:
                    (out / "report.json").write_text(json.dumps({"last_run": s.history[-1], "runs": s.history},
                                                                indent=1, default=str))
                    (out / "report.csv").write_text(report_csv(s.history))
                    files += [out / "report.json", out / "report.csv"]
                else:
                    missing.append("report (run pruning first)")
                if not s.kept:
                    missing.append("pruned model (run pruning first)")
                else:
                    label = run_label or list(s.kept)[-1]
                    if label not in s.kept:
                        raise ExplorerError(f"the model of run '{label}' is no longer kept (the last {KEEP_RUNS} "
                                            "runs' models are): choose another run")
                    model = s.kept[label]
                    rep = next(r for r in s.history if r["label"] == label)
                    stem = export_stem(rep, s.history.index(rep) + 1)
                    if EXPORT_ZIP in formats:
                        progress(0.2, desc="saving the pruned model")
                        d = save_model(model, out / stem, extra={"report": rep})
                        progress(0.4, desc="zipping")
                        files.append(Path(shutil.make_archive(str(d), "zip", root_dir=d.parent, base_dir=d.name)))
                        shutil.rmtree(d, ignore_errors=True)
                    for fmt, name in ((f, n) for n, f in EXPORT_FORMATS.items() if n in formats and f):
                        if fmt.startswith("gguf") and model.adapter.family != "LLaMA":
                            missing.append(f"GGUF (LLaMA-family models only; {model.adapter.family} exports to ONNX)")
                            continue
                        progress(0.6, desc=f"exporting {name}")
                        res = export(model, fmt, out / f"{stem}.{fmt.split('-')[0]}")
                        files.append(Path(res["path"]))
                        checks.append(f"{name}: {res.get('check_summary', 'written')}")
                    checks.append(table_markdown(model, heading=f"**Where the model of run {label} runs** (from "
                                                                "its widths; the model card has the same table)"))
        except Exception as e:
            return ExportOut([], warn(f"Export failed, nothing to download ({message(e)}); the pruned model is "
                                      "kept: try again."))
        names = ", ".join(f"`{p.name}`" for p in files) or "nothing yet"
        return ExportOut([str(p) for p in files], f"Exported {names}." + (f" Missing: {'; '.join(missing)}."
                                                                         if missing else "")
                         + "".join(f"\n\n{c}" for c in checks))

    def on_test(self, request: gr.Request, progress=gr.Progress()):
        """-> status: the last finished run's final model and the dense model on the whole test split, once the
        plan is chosen (runs are evaluated on val, so that tuning A and the table never sees test)."""
        s = self.session(request)
        try:
            with s.busy("the test evaluation"):
                loaded = require_loaded(s)
                label = next((lb for lb in reversed(s.kept) if s.kept[lb].name == loaded.lm.name), None)
                if label is None:
                    raise ExplorerError("no pruned model of this model yet: run pruning first")
                progress(0.1, desc="evaluating the dense model on test")
                with loaded.lock:
                    dense = quality(loaded.lm, loaded.data, 0, "test")
                progress(0.5, desc="evaluating the pruned model on test")
                final = quality(s.kept[label], loaded.data, 0, "test")
                rep = next(r for r in s.history if r["label"] == label)
                rep["test"] = {"dense": dense, "final": final}
        except Exception as e:
            return warn(message(e))
        m = metric_name(loaded.lm)
        size = f"{final['eval_examples']:,} examples" if "eval_examples" in final else f"{final['eval_tokens']:,} tokens"
        return (f"**Test** ({size}, the whole split) for `{rep['label']}`: {m} {quality_text(final, m)}, dense "
                f"{quality_text(dense, m)}. Report this figure; the runs' charts and table show val.")

    def plan_json(self, request: gr.Request) -> dict:
        """The plan the Allocation tab shows now (per layer: S_L, kept heads/groups/neurons), as JSON."""
        s = self.session(request)
        if s.allocation is None:
            return {"error": "no plan yet: compute importance first"}
        return s.allocation.to_json()

    def allocate_json(self, target: float = default_of(AllocationConfig, "target"),
                      amplitude: float = default_of(AllocationConfig, "amplitude"),
                      mode: str = default_of(AllocationConfig, "mode"),
                      max_sparsity: float = default_of(AllocationConfig, "max_sparsity"),
                      round_to: int = default_of(AllocationConfig, "round_to"),
                      split: str = default_of(AllocationConfig, "split"),
                      normalization: str = default_of(AllocationConfig, "normalization"),
                      budget: str = default_of(AllocationConfig, "budget"),
                      speedup: float = default_of(AllocationConfig, "speedup"),
                      request: gr.Request = None) -> dict:
        """The plan for these Allocation settings (it becomes the session's plan, as moving the sliders
        does), as JSON; hand edits of the table stay. Mode "search" runs the plan search first (minutes;
        SearchConfig's defaults). With a measured predictor the JSON carries the plan's predicted val
        quality under "predicted"."""
        s = self.session(request)
        alloc = AllocationSettings(target, amplitude, mode, max_sparsity, round_to, split, normalization, budget,
                                   speedup)
        if mode == "search":
            last = None
            for last in self.on_search(alloc, default_of(SearchConfig, "generations"), request):
                pass
            if last is None or last.mode_in is SKIP:
                return {"error": str(getattr(last, "predict_status", "the search did not run")).strip("⚠️* ")}
        try:
            out = self.allocation_outputs(s, alloc)
        except ExplorerError as e:
            return {"error": str(e)}
        if s.importance is None:
            return {"error": out.alloc_md}
        plan = s.allocation.to_json()
        if s.predictor is not None:
            try:
                check_fits(s.predictor, s.loaded.lm, s.loaded.data)
                plan["predicted"] = {"metric": s.predictor.metric, "split": "val",
                                     "quality": s.predictor.predict(plan_sparsity(s.allocation)),
                                     "error": s.predictor.error()}
            except ExplorerError:
                pass
        return plan

    def analysis_json(self, request: gr.Request) -> dict:
        """The last importance analysis (per-layer importance, unit salience), as JSON."""
        s = self.session(request)
        if s.importance is None:
            return {"error": "no analysis yet: compute importance first"}
        return {"model": s.loaded.lm.name if s.loaded else None, **s.importance.to_json()}

    def on_generate(self, prompt, max_new_tokens, temperature, request: gr.Request):
        """-> GenerateOut: the same prompt through the dense model and the pruned one."""
        s = self.session(request)
        try:
            with s.busy("generation"):
                loaded = require_loaded(s)
                n = number(max_new_tokens, "max new tokens", int)
                t = number(temperature, "temperature")
                mine = s.pruned is not None and s.pruned.name == loaded.lm.name  # pruned from this model
                with loaded.lock:
                    outs = [try_model(loaded.lm, prompt, n, t)]
                if mine:
                    outs.append(try_model(s.pruned, prompt, n, t))
        except Exception as e:
            return GenerateOut(generate_status=warn(message(e)))
        dense, pruned = outs[0], (outs[1] if mine else None)
        none = (f" The last pruned model comes from `{s.pruned.name}`: run pruning on this model to compare."
                if s.pruned is not None else " No pruned model yet: run pruning in the Prune & recover tab.")
        status = f"Dense: {dense['stats']}." + (f" Pruned: {pruned['stats']}." if pruned else none)
        return GenerateOut(dense["text"], pruned["text"] if pruned else "", status)
