"""Pruning Explorer: the web UI.

    python app.py [--host 127.0.0.1] [--port 7860] [--model minilm-rt] [--data NAME] [--share]

A thin Gradio layer over the `explorer` library: each handler reads its session from
`explorer.sessions`, calls the library and turns the result into charts
(`explorer.plots`), tables and a status line. Every user-facing error
(`ExplorerError`) becomes a toast *and* a status line; the previous model and charts stay.

The default model is loaded once at start-up (before the server listens) and every new
browser session gets a deep copy of it, so each page opens ready and sessions never share
weights (a pruning run in one tab cannot touch another tab's model).

Layout first (`build_ui`), then wiring (inside it, after the layout), then `main`.
"""
import argparse
import copy
import csv
import io
import ipaddress
import json
import logging
import os
import shutil
import time
from dataclasses import fields, replace
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from explorer import plots  # noqa: E402
from explorer.allocation import Allocation, allocate  # noqa: E402
from explorer.config import (LABEL_FREE_METRICS, METRICS, AllocationConfig, AnalysisConfig,  # noqa: E402
                             PruneConfig, choices_of, help_of, split_recovery, validate)
from explorer.data import BUILTIN_DATA, load_data  # noqa: E402
from explorer.errors import OOM_HINT, Cancelled, DataError, ExplorerError, is_oom  # noqa: E402
from explorer.evaluate import evaluate, metric_name, quality  # noqa: E402
from explorer.export import export  # noqa: E402
from explorer.generate import classify, generate  # noqa: E402
from explorer.importance import analyze  # noqa: E402
from explorer.models import BUILTIN_MODELS, DEFAULT_MODEL, TASKS, load_model, save_model  # noqa: E402
from explorer.methods import METHODS, make_run  # noqa: E402
from explorer.pruning import PruningRun, check_pairing  # noqa: E402
from explorer.sessions import KEEP_RUNS, Loaded, Session, SessionRegistry  # noqa: E402

log = logging.getLogger("explorer.app")
EVAL_EXAMPLES = 500  # test examples for accuracy (a subset, so loading stays quick)
EVAL_TOKENS = 4096  # test tokens for perplexity
MAX_UPLOAD_MB = 100  # largest data file a browser may upload (--max-upload-mb)
MODEL_DEFAULT_DATA = "(the model's default)"
ANALYSIS_JOB, RUN_JOB = "the importance analysis", "the pruning run"  # what a busy session says it does
PLANS = ("adaptive", "uniform", "manual table")
# Config fields the tabs do not show: the Prune tab's "Advanced" accordion is generated from their metadata,
# so a new field appears there without UI code. (class, field name) in the order of on_run's *advanced.
SHOWN = {"stages", "recovery", "recovery_steps", "eval_samples", "eval_split", "samples", "metric", "target", "amplitude", "mode",
         "max_sparsity", "round_to", "split", "normalization", "batch_size"}
ADVANCED = [(cls, f.name) for cls in (PruneConfig, AnalysisConfig, AllocationConfig) for f in fields(cls)
            if f.name not in SHOWN]
EXPORT_ZIP = "pruned model (safetensors, zip)"
EXPORT_FORMATS = {EXPORT_ZIP: None, "ONNX": "onnx", "GGUF f16 (llama.cpp)": "gguf-f16"}  # label -> export format
TABLE_COLUMNS = ["layer", "Î_L", "sparsity", "actual", "heads kept", "neurons kept", "note"]
EDITABLE = TABLE_COLUMNS.index("sparsity")
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


# --- small helpers (formatting and plain data; no gradio) --------------------------------------

def eval_size(lm, n: int | float | None = 0) -> int:
    """Test examples (classifiers) or tokens (LMs) to evaluate on; 0 = the quick default."""
    n = int(n or 0)
    return n if n > 0 else (EVAL_TOKENS if lm.task == "causal-lm" else EVAL_EXAMPLES)


def number(value, name: str, kind: type = float):
    """A number from a UI control; anything else (a crafted request, an emptied box) is a message.
    Empty counts as 0, which the config checks then reject or accept."""
    if value is None or value == "":
        return kind(0)
    try:
        v = float(value)
        if kind is int and v != int(v):
            raise ValueError
        return kind(v)
    except (TypeError, ValueError, OverflowError):
        raise ExplorerError(f"{name} must be {'a whole number' if kind is int else 'a number'}, "
                            f"got '{str(value)[:20]}'") from None


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _widths(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else ", ".join(map(str, values))


def _quality_text(ev: dict) -> str:
    if "accuracy" in ev:
        return f"accuracy **{ev['accuracy']:.2%}** on {ev.get('eval_examples', '?'):,} {ev.get('eval_split', 'test')} examples"
    if "perplexity" in ev:
        return f"perplexity **{ev['perplexity']:.2f}** on {ev.get('eval_tokens', '?'):,} {ev.get('eval_split', 'test')} tokens"
    return "not measured (no task head: encoder models are analysed with label-free metrics only)"


def model_summary(loaded: Loaded | None) -> str:
    if loaded is None:
        return "*No model loaded.*"
    lm, data = loaded.lm, loaded.data
    s = lm.summary()
    heads = s["heads"]
    kv = "" if s["heads_per_group"] == 1 else f" in {_widths(s['kv_groups'])} KV groups"
    pruned = " (a pruned model: per-layer widths from its plan)" if lm.plan else ""
    rows = [("architecture", f"{s['architecture']} (`{s['model_type']}`), task `{s['task']}`"),
            ("layers", s["layers"]), ("attention heads per layer", f"{_widths(heads)}{kv}, head size {s['head_dim']}"),
            ("FFN width", _widths(s["ffn"])),
            ("parameters", f"{s['params'] / 1e6:.2f} M ({s['block_params'] / 1e6:.2f} M in prunable blocks)"),
            ("dense quality", _quality_text(loaded.dense_eval)), ("data", data.summary()), ("device", s["device"])]
    return f"| model | `{lm.name}`{pruned} |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def plan_flops(alloc: Allocation, structure: list[dict], head_dim: int, seq_len: int = 128) -> tuple[int, int]:
    """Approximate forward FLOPs per token of the blocks before and after a plan: 2 per
    weight plus attention scores and mixing (4·seq·heads·head_dim); biases and norms are
    counted as weights, a small overestimate applied to both sides."""
    before = after = 0
    for lp, st in zip(alloc.layers, structure):
        hpg = st["heads_per_group"]
        before += 2 * lp.params_before + 4 * seq_len * lp.groups * hpg * head_dim
        after += 2 * lp.params_after + 4 * seq_len * lp.keep_groups * hpg * head_dim
    return before, after


def allocation_table(alloc: Allocation, heads_per_group: list[int]) -> pd.DataFrame:
    rows = []
    for lp, hpg in zip(alloc.layers, heads_per_group):
        note = "set by hand" if lp.manual else ("clipped" if lp.clipped else "")
        rows.append([lp.index, round(lp.importance, 3), round(lp.sparsity, 3), round(lp.actual_sparsity, 3),
                     f"{lp.keep_groups * hpg} / {lp.groups * hpg}", f"{lp.keep_neurons} / {lp.neurons}", note])
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def parse_manual(table, shown: Allocation, manual: dict[int, float]) -> dict[int, float]:
    """Manual overrides from an edited table: every row whose sparsity differs from the value
    shown becomes (or stays) set by hand. Raises ExplorerError for anything not a number."""
    df = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table, columns=TABLE_COLUMNS)
    if len(df) != len(shown.layers):
        raise ExplorerError(f"the table must keep one row per layer ({len(shown.layers)}); rows were added or removed")
    out = dict(manual)
    for i, (raw, lp) in enumerate(zip(df.iloc[:, EDITABLE].tolist(), shown.layers)):
        text = str(raw).strip()
        try:
            v = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
        except ValueError:
            raise ExplorerError(f"layer {i}: sparsity '{text[:20]}' is not a number; type a fraction such as 0.35") from None
        if not (0 <= v < 1):  # NaN fails too
            raise ExplorerError(f"layer {i}: sparsity {text[:20]} is outside [0, 1)")
        if abs(v - round(lp.sparsity, 3)) > 5e-4:
            out[i] = v
    return out


def report_rows(rep: dict) -> list[dict]:
    """The dense model and each completed stage of a run report (`PruningRun.report()`), one
    flat row each: what the stage table, the history, the Pareto chart and the CSV show."""
    m, d = rep["metric"], rep["dense"]
    base = {"run": rep["label"], "status": rep["status"], "metric": m}
    rows = [{**base, "model": "dense", "params": d["params"], "block_params": d["block_params"],
             "removed_fraction": 0.0, "quality": d.get(m), "latency_ms": d.get("latency_ms"),
             "flops_per_token": d.get("flops_per_token"), "last_loss": None, "seconds": None,
             "latency_spread": d.get("latency_spread"), **speed_columns(d)}]
    for st in rep["stages"]:
        rows.append({**base, "model": f"stage {st['stage']}", "params": st["params"], "block_params": st["block_params"],
                     "removed_fraction": st["removed_fraction"], "quality": st["quality"].get(m),
                     "latency_ms": st["latency_ms"], "flops_per_token": st["flops_per_token"],
                     "last_loss": st["losses"][-1] if st["losses"] else None, "seconds": st["seconds"],
                     "latency_spread": st.get("latency_spread"), **speed_columns(st.get("speed") or {}),
                     **{f"after_{k}": v.get(m) for k, v in (st.get("phases") or {}).items()}})
    return rows


SPEED_COLUMNS = {"decode_tokens_per_s": "decode tok/s (b1)", "decode_tokens_per_s_b8": "decode tok/s (b8)",
                 "prefill_ms": "prefill ms (b1)", "latency_b1x128_ms": "latency ms (1×128)"}


BUSY_SPREAD = 0.25  # latency repeats further apart than this (of the median): the machine is busy


def spread_text(spread: float | None) -> str | None:
    """'±8 %', or flagged when the repeats disagree so much that a speed-up could be noise."""
    if spread is None:
        return None
    return f"±{spread / 2:.0%}" + (" ⚠ busy machine" if spread > BUSY_SPREAD else "")


def speed_columns(ev: dict) -> dict:
    """The speed figures of a dense evaluation or a stage record (None where not measured)."""
    return {k: ev.get(k) for k in SPEED_COLUMNS}


def stage_table(rows: list[dict], metric: str, split: str = "") -> pd.DataFrame:
    def num(v, digits):
        return None if v is None else round(v, digits)
    speed = [k for k in SPEED_COLUMNS if any(r.get(k) is not None for r in rows)]  # only what was measured
    return pd.DataFrame(
        [[r["model"], num(r["params"] / 1e6, 3), f"{r['removed_fraction']:.1%}", num(r.get("after_cut"), 4),
          num(r.get("after_reconstructed"), 4), num(r["quality"], 4),
          num(r["latency_ms"], 1), spread_text(r.get("latency_spread")), *[num(r.get(k), 1) for k in speed],
          num(r["flops_per_token"] / 1e6, 2),
          num(r["last_loss"], 4), num(r["seconds"], 1)]
         for r in rows],
        columns=["model", "params (M)", "removed", "after cut", "after reconstruction",
                 f"{metric or 'quality'} ({split})" if split else (metric or "quality"),
                 "latency (ms, 32×128)", "latency spread", *[SPEED_COLUMNS[k] for k in speed], "FLOPs/token (M)",
                 "last loss",
                 "time (s)"])


def report_csv(history: list[dict]) -> str:
    """One row per model (dense and each stage) of every run in the history."""
    buf = io.StringIO()
    rows = [r for rep in history for r in report_rows(rep)]
    names = list(dict.fromkeys(k for r in rows for k in r)) or ["run"]  # stages add phase columns
    w = csv.DictWriter(buf, fieldnames=names)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def message(e: BaseException) -> str:
    """What the user reads about an exception: ours as is, out-of-memory with a hint, anything
    else as one line (the traceback goes to the server log, never to the page)."""
    if isinstance(e, ExplorerError):
        return str(e)
    if is_oom(e):
        return OOM_HINT
    log.error("internal error", exc_info=e)
    first = (str(e).splitlines() or [""])[0][:300]
    return f"internal error: {type(e).__name__}: {first} (details in the server log)"


def warn(text: str) -> str:
    """Show an error as a toast and return it as a status line (both stay visible)."""
    gr.Warning(text)
    return f"⚠️ **{text}**"


# --- handlers -------------------------------------------------------------------------------------

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
        return Loaded(lm, data_, evaluate(lm, data_, eval_size(lm), timing=False, split="val"))  # test: on request

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
        """-> summary, status, metric, recovery, then placeholders for every derived output."""
        s = self.session(request)
        t0 = time.perf_counter()
        try:
            with s.busy(f"loading {model}"):
                loaded = self.load(model, task, data, upload, text_col, label_col, progress)
                s.set_loaded(loaded)
        except Exception as e:
            return (gr.skip(), warn(f"Load failed, the previous model stays: {message(e)}"), gr.skip(), gr.skip(),
                    *[gr.skip()] * N_DERIVED)
        metric, recovery = task_defaults(loaded.lm.task)
        return (model_summary(loaded), f"Loaded `{loaded.lm.name}` in {time.perf_counter() - t0:.1f} s.",
                gr.update(value=metric), gr.update(value=recovery), *derived_placeholders())

    # tab 2
    def on_importance(self, metric, samples, batch_size, target, amplitude, mode, max_sparsity, round_to, split,
                      request: gr.Request, normalization="maxabs", progress=gr.Progress()):
        """-> layer plot, heads heatmap, neurons heatmap, status, then the allocation outputs.
        (The normalisation comes after the request, so that callers passing the six allocation
        inputs positionally keep working; Gradio fills it from the seventh.)"""
        s = self.session(request)
        try:
            with s.busy(ANALYSIS_JOB):
                loaded = require_loaded(s)
                normalization = normalization_choice(normalization)
                cfg = AnalysisConfig(samples=number(samples, "calibration samples", int),
                                     batch_size=number(batch_size, "batch size", int), metric=metric)
                validate(cfg)
                texts, labels = loaded.data.calibration(cfg.samples, stage=0, seed=cfg.seed)
                progress(0, desc="calibration batches")
                imp = analyze(loaded.lm, texts, labels, cfg, should_stop=s.stop_requested,
                              progress=lambda done, total: progress((done, total), desc="calibration batches"))
                s.importance, s.manual, s.last_edit = imp, {}, None
        except Cancelled:
            kept = "the previous importance and allocation stay" if s.importance else "nothing was changed"
            return (gr.skip(),) * 3 + (f"Stopped: the analysis was cancelled; {kept}.",) + (gr.skip(),) * 3
        except Exception as e:
            return (gr.skip(),) * 3 + (warn(message(e)),) + (gr.skip(),) * 3
        figs = {"layer importance": layer_figure(imp, normalization),
                "head salience": plots.heads_heatmap(imp.heads[metric], metric,
                                                     s.loaded.lm.summary()["heads_per_group"]),
                "neuron salience": plots.neurons_heatmap(imp.neurons[metric], metric)}
        s.figures.update(figs)
        status = (f"Importance from {imp.samples} calibration samples ({imp.tokens:,} tokens), metric `{metric}`, "
                  f"in {imp.seconds:.1f} s. The Allocation tab now uses it.")
        return (*figs.values(), status,
                *self.allocation_outputs(s, target, amplitude, mode, max_sparsity, round_to, split,
                                         normalization=normalization))

    # tab 3
    def allocation_outputs(self, s: Session, target, amplitude, mode, max_sparsity, round_to, split, note: str = "",
                           normalization="maxabs"):
        """-> allocation chart, table, summary. Pure numpy + plotly: well under 100 ms."""
        t0 = time.perf_counter()
        imp, loaded = s.importance, s.loaded
        if imp is None or loaded is None:
            return (plots.empty("Compute importance first (Importance tab)"), empty_table(),
                    note or "Compute importance first (Importance tab).")
        cfg = allocation_config(target, amplitude, mode, max_sparsity, round_to, split, normalization)
        norm = imp.normalized_by(cfg.normalization)
        scores = imp.unit_scores()
        alloc = allocate(norm, imp.params, cfg, manual=s.manual, scores=scores)
        uniform = allocate(norm, imp.params, replace(cfg, mode="uniform"), scores=scores)
        s.allocation = alloc
        hpg = [p["heads_per_group"] for p in imp.params]
        head_dim = loaded.lm.summary()["head_dim"]
        f0, f1 = plan_flops(alloc, imp.params, head_dim)
        _, fu = plan_flops(uniform, imp.params, head_dim)
        title = (f"S_base={cfg.target:.2f}, A={cfg.amplitude:.2f} ({cfg.mode}"
                 + ("" if cfg.normalization == "maxabs" else f", {cfg.normalization} Î") + "): keeps "
                 f"{alloc.params_after / 1e6:.2f} of {alloc.params_before / 1e6:.2f} M block parameters")
        fig = plots.allocation_chart([l.sparsity for l in alloc.layers], [l.sparsity for l in uniform.layers],
                                     cfg.target, [l.clipped for l in alloc.layers], [l.manual for l in alloc.layers],
                                     norm, title=title)
        s.figures["allocation"] = fig
        lines = [f"**Adaptive**: keeps {alloc.params_after / 1e6:.2f} M of {alloc.params_before / 1e6:.2f} M block "
                 f"parameters (removes {alloc.removed_fraction:.1%}), ≈ {f1 / 1e6:.1f} M FLOPs/token "
                 f"({f1 / f0:.0%} of dense). **Uniform**: keeps {uniform.params_after / 1e6:.2f} M "
                 f"(removes {uniform.removed_fraction:.1%}), ≈ {fu / 1e6:.1f} M FLOPs/token ({fu / f0:.0%})."]
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
        lines.append(f"<small>computed in {(time.perf_counter() - t0) * 1000:.0f} ms</small>")
        return fig, allocation_table(alloc, hpg), "\n\n".join(lines)

    def on_allocation(self, target, amplitude, mode, max_sparsity, round_to, split, request: gr.Request,
                      normalization="maxabs"):
        s = self.session(request)
        s.last_edit = None
        try:
            return self.allocation_outputs(s, target, amplitude, mode, max_sparsity, round_to, split,
                                           normalization=normalization)
        except Exception as e:
            return gr.skip(), gr.skip(), warn(message(e))

    def on_normalization(self, target, amplitude, mode, max_sparsity, round_to, split, request: gr.Request,
                         normalization="maxabs"):
        """-> layer-importance plot (Î by the chosen normalisation), then the allocation outputs."""
        s = self.session(request)
        out = self.on_allocation(target, amplitude, mode, max_sparsity, round_to, split, request, normalization)
        try:
            fig = layer_figure(s.importance, normalization_choice(normalization)) if s.importance else gr.skip()
        except Exception:  # the allocation outputs already say what is wrong
            return (gr.skip(), *out)
        if s.importance:
            s.figures["layer importance"] = fig
        return (fig, *out)

    def on_table_edit(self, table, target, amplitude, mode, max_sparsity, round_to, split, request: gr.Request,
                      normalization="maxabs"):
        s = self.session(request)
        norm = {"normalization": normalization}
        if s.allocation is None:
            return self.allocation_outputs(s, target, amplitude, mode, max_sparsity, round_to, split, **norm)
        edited = [str(v) for v in (table.iloc[:, EDITABLE] if isinstance(table, pd.DataFrame) else
                                   [row[EDITABLE] for row in table])]
        if edited == s.last_edit:  # the browser sends one edit twice (commit, then blur): the copy is stale
            return gr.skip(), gr.skip(), gr.skip()
        s.last_edit = edited
        before = s.manual
        try:
            s.manual = parse_manual(table, s.allocation, s.manual)
            return self.allocation_outputs(s, target, amplitude, mode, max_sparsity, round_to, split, **norm)
        except Exception as e:
            s.manual = before
            return self.allocation_outputs(s, target, amplitude, mode, max_sparsity, round_to, split,
                                           note=warn(message(e)), **norm)

    def on_reset_manual(self, target, amplitude, mode, max_sparsity, round_to, split, request: gr.Request,
                        normalization="maxabs"):
        s = self.session(request)
        s.manual = {}
        return self.on_allocation(target, amplitude, mode, max_sparsity, round_to, split, request, normalization)

    # tab 4
    def on_run(self, stages, recovery, steps, plan, method, target, amplitude, mode, max_sparsity, round_to, split,
               metric, samples, eval_n, timing, request: gr.Request, normalization="maxabs", *advanced):
        """Generator -> (quality, loss, cost, stage table, status, history, pareto) per event.
        `advanced`: the Advanced accordion's values, in the order of ADVANCED (defaults when absent)."""
        s = self.session(request)
        skip7 = (gr.skip(),) * 7
        try:
            with s.busy(RUN_JOB):
                loaded = require_loaded(s)
                adv = advanced_configs(advanced) if advanced else {PruneConfig: {}, AnalysisConfig: {},
                                                                   AllocationConfig: {}}
                prune = PruneConfig(stages=number(stages, "stages", int), recovery=recovery,
                                    recovery_steps=number(steps, "recovery steps", int),
                                    eval_samples=eval_size(loaded.lm, number(eval_n, "evaluation size", int)),
                                    eval_split="val", **adv[PruneConfig])  # choices on val; test on request
                analysis = AnalysisConfig(samples=number(samples, "calibration samples", int), metric=metric,
                                          **adv[AnalysisConfig])
                alloc_cfg = replace(allocation_config(target, amplitude, mode, max_sparsity, round_to, split,
                                                      normalization), **adv[AllocationConfig])
                final_plan = None
                if plan == "uniform":
                    alloc_cfg = replace(alloc_cfg, mode="uniform", amplitude=0.0)
                elif plan == "manual table":
                    if s.allocation is None:
                        raise ExplorerError("the manual plan needs the Allocation tab's table: compute importance first")
                    final_plan = s.allocation
                desc = {"adaptive": f"{alloc_cfg.mode} A={alloc_cfg.amplitude:g}", "uniform": "uniform",
                        "manual table": "manual table"}[plan]
                method = method or "adaptive"
                if method not in ("adaptive", "uniform"):
                    desc = f"{method} A={alloc_cfg.amplitude:g}"
                if alloc_cfg.split != "salience":
                    desc += f", {alloc_cfg.split} split"
                steps_txt = f" {prune.recovery_steps} steps" if split_recovery(recovery)[1] != "none" else ""
                label = (f"#{len(s.history) + 1} {desc}, S={alloc_cfg.target:g}, K={prune.stages}, {recovery}{steps_txt}"
                         + non_default(adv))
                lm = copy.deepcopy(loaded.lm)  # the session's dense model stays intact for the next run
                if method in ("adaptive", "uniform"):  # the Allocation choice above decides
                    run = PruningRun(lm, loaded.data, analysis, alloc_cfg, prune, final_plan=final_plan,
                                     timing=bool(timing), label=label)
                else:
                    run = make_run(method, lm, loaded.data, analysis, alloc_cfg, prune, timing=bool(timing),
                                   label=label)
                run.dense_given = loaded.dense_runs.get(run.dense_settings())  # measured once per model and data
                s.run = run
                yield from self._stream(s, run, metric_name(lm), loaded)
        except Exception as e:
            yield (*skip7[:4], warn(message(e)), *skip7[5:])

    def _stream(self, s: Session, run: PruningRun, m: str, loaded: Loaded):
        """Turn the run's events into UI updates; unchanged outputs are skipped. Every phase
        (measuring, importance, pruning, reconstruction, recovery, evaluation) says so."""
        losses: dict[int, list[float]] = {}
        K = run.prune.stages
        skip = gr.skip()
        t_last = 0.0
        cost_note = evaluation_note(run)
        t_start = t_first = None  # after the dense model; the first recovery step of the current stage
        if run.dense_given is None:
            yield (skip,) * 4 + (f"Measuring the dense model ({cost_note}; once per loaded model and settings)…",
                                 skip, skip)
        for ev in run.events():
            kind = ev["type"]
            if kind == "dense":
                cached = run.dense_given is not None
                loaded.dense_runs[run.dense_settings()] = run.dense
                t_start = time.perf_counter()
                quality, cost, table = self._run_views(s, run, m)
                yield (quality, skip, cost, table, f"Dense model {'measurement reused' if cached else 'measured'}. "
                       f"Stage 1/{K}: estimating importance ({run.analysis.metric}, {run.analysis.samples} "
                       "calibration samples)…", skip, skip)
            elif kind == "evaluating":
                yield (skip,) * 4 + (f"Stage {ev['stage']}/{K}: evaluating ({cost_note})…", skip, skip)
            elif kind == "analysis":
                yield (skip,) * 4 + (f"Stage {ev['stage']}/{K}: pruning, then recovery ({run.prune.recovery})…", skip, skip)
            elif kind == "phase":
                q = ", ".join(f"{k} {v:.4f}" for k, v in ev["quality"].items() if k in ("accuracy", "perplexity"))
                nxt = {"cut": "reconstructing" if run.reconstructs else "training",
                       "reconstructed": "training"}[ev["phase"]]
                yield (skip,) * 4 + (f"Stage {ev['stage']}/{K}: {ev['phase']} ({q}); {nxt}…", skip, skip)
            elif kind == "reconstruct":
                yield (skip,) * 4 + (f"Stage {ev['stage']}/{K}: reconstructing layer by layer (closed-form refit "
                                     "of each block's output projections)…", skip, skip)
            elif kind == "step":
                losses.setdefault(ev["stage"], []).append(ev["loss"])
                now = time.perf_counter()
                if ev["step"] == 1:
                    t_first = now
                if now - t_last > 0.3 or ev["step"] == run.prune.recovery_steps:  # at most ~3 redraws a second
                    t_last = now
                    left = run.prune.recovery_steps - ev["step"]
                    rate = (now - t_first) / (ev["step"] - 1) if ev["step"] > 1 else None
                    s.figures["recovery loss"] = fig = plots.loss_chart(losses)
                    yield (skip, fig, skip, skip, f"Stage {ev['stage']}/{K}: recovery step {ev['step']}/"
                           f"{run.prune.recovery_steps}, loss {ev['loss']:.4f}"
                           + (f"; {eta(rate * left)} of recovery left" if rate and left else ""), skip, skip)
            elif kind == "stage":
                r = ev["record"]
                q = ", ".join(f"{k} {v:.4f}" for k, v in r.quality.items())
                s.figures["recovery loss"] = plots.loss_chart(losses)
                quality, cost, table = self._run_views(s, run, m)
                per_stage = (time.perf_counter() - t_start) / r.stage if t_start else 0.0
                yield (quality, s.figures["recovery loss"], cost, table,
                       f"Stage {r.stage}/{K} done: {r.removed_fraction:.1%} of block parameters removed, {q}"
                       + ("." if r.stage == K else f". Stage {r.stage + 1}/{K}: estimating importance… "
                                                   f"({eta(per_stage * (K - r.stage))} left at this pace)"), skip, skip)
            elif kind == "layer_drop":
                yield (skip,) * 4 + (f"Dropped blocks {ev['dropped']}.", skip, skip)
            elif kind == "trial":
                yield (skip,) * 4 + (f"Search trial {ev['trial']}: {ev['value']:.4f} (best {ev['best_value']:.4f}, "
                                     f"{ev.get('best_params')})", skip, skip)
            elif kind == "round":
                yield (skip,) * 4 + ("Round " + ", ".join(f"{k} {v}" for k, v in ev.items() if k != "type"), skip, skip)
            elif kind not in ("stopped", "error", "done"):
                continue
            else:  # stopped / error / done: the run is over
                done = len(run.records)
                rep = run.report()
                if kind != "done":  # a label that says how the run ended
                    rep["label"] += " (stopped)" if kind == "stopped" else f" (failed at stage {done + 1})"
                    run.label = rep["label"]
                s.history.append(rep)
                if run.records:
                    s.keep_run(rep["label"], run.lm)
                status = {"done": f"Done: {done} stage(s) in {ev.get('seconds', 0):.0f} s. Export it in the Export tab.",
                          "stopped": f"Stopped: kept the model after stage {done}." if done else
                                     "Stopped before the first stage finished: nothing was pruned.",
                          }.get(kind) or warn(f"Run failed ({ev.get('message')}); kept the model after stage {done}.")
                quality, cost, table = self._run_views(s, run, m)
                yield (quality, skip, cost, table, status, *self._history_views(s, m))

    @staticmethod
    def _run_views(s: Session, run: PruningRun, m: str):
        """Quality chart, size/latency chart and stage table of the run so far."""
        rows = report_rows(run.report())
        stages = rows[1:]
        s.figures["quality"] = quality = plots.quality_chart(
            rows[0]["quality"], [r["removed_fraction"] for r in stages], [r["quality"] for r in stages], m,
            title=f"{m or 'quality'} ({run.prune.eval_split}) vs parameters removed: {run.label}",
            phases=[{k: r.get(f"after_{k}") for k in ("cut", "reconstructed")} for r in stages])
        s.figures["size and latency"] = cost = plots.stage_cost_chart(
            [r["model"] for r in rows], [r["params"] for r in rows], [r["latency_ms"] for r in rows])
        return quality, cost, stage_table(rows, m, run.prune.eval_split)

    @staticmethod
    def _history_views(s: Session, m: str):
        """Every run of the session overlaid, and the Pareto chart of all their stages."""
        lines, points = [], []
        current = s.loaded.lm.name if s.loaded else None
        for rep in (r for r in s.history if r["model"] == current):  # one model's runs share one metric
            rows = report_rows(rep)
            lines.append({"label": rep["label"], "removed": [r["removed_fraction"] for r in rows],
                          "quality": [r["quality"] for r in rows]})
            points += rows
        s.figures["run history"] = hist = plots.history_chart(lines, m)
        s.figures["pareto"] = pareto = plots.pareto_chart(points, m)
        return hist, pareto

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

    # tab 5
    def on_prune_plan(self, plan, method, target, amplitude, mode, max_sparsity, round_to, split,
                      request: gr.Request, normalization="maxabs") -> str:
        """-> the line above the Run button: the plan the run will use, from the Allocation tab."""
        s = self.session(request)
        if plan == "manual table":
            what = (f"the Allocation tab's table ({len(s.manual)} layer(s) set by hand)" if s.allocation
                    else "the Allocation tab's table, **which needs importance first**")
        elif plan == "uniform" or method == "uniform":
            what = f"uniform, S_L = S_base = {float(target):g} in every layer"
        else:
            what = (f"adaptive, S_L = S_base − A·Î_L with S_base = {float(target):g}, A = {float(amplitude):g}, "
                    f"{mode} mode, Î_L normalised by {normalization}")
        return (f"**Plan** (from the Allocation tab): {what}; {split} split, S_max {float(max_sparsity):g}"
                + (f", neurons rounded to multiples of {int(round_to)}" if int(round_to) > 1 else "")
                + ("" if method in ("adaptive", "uniform") else f"; method **{method}**") + ".")

    def on_export_tab(self, request: gr.Request):
        """-> the run choice: the runs whose final model is kept, the last one selected."""
        labels = list(self.session(request).kept)
        return gr.update(choices=labels, value=labels[-1] if labels else None)

    def on_export(self, request: gr.Request, formats=(EXPORT_ZIP,), run_label=None, progress=gr.Progress()):
        """-> files, status. Charts always; reports once a run finished; the chosen run's pruned model
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
        except Exception as e:
            return [], warn(f"Export failed, nothing to download ({message(e)}); the pruned model is kept: try again.")
        names = ", ".join(f"`{p.name}`" for p in files) or "nothing yet"
        return [str(p) for p in files], (f"Exported {names}." + (f" Missing: {'; '.join(missing)}." if missing else "")
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
                dense = quality(loaded.lm, loaded.data, 0, "test")
                progress(0.5, desc="evaluating the pruned model on test")
                final = quality(s.kept[label], loaded.data, 0, "test")
                rep = next(r for r in s.history if r["label"] == label)
                rep["test"] = {"dense": dense, "final": final}
        except Exception as e:
            return warn(message(e))
        m = metric_name(loaded.lm)
        size = f"{final['eval_examples']:,} examples" if "eval_examples" in final else f"{final['eval_tokens']:,} tokens"
        return (f"**Test** ({size}, the whole split) for `{rep['label']}`: {m} **{final[m]:.4f}**, dense "
                f"{dense[m]:.4f}. Report this figure; the runs' charts and table show val.")

    def plan_json(self, request: gr.Request) -> dict:
        """The plan the Allocation tab shows now (per layer: S_L, kept heads/groups/neurons), as JSON."""
        s = self.session(request)
        if s.allocation is None:
            return {"error": "no plan yet: compute importance first"}
        return s.allocation.to_json()

    def analysis_json(self, request: gr.Request) -> dict:
        """The last importance analysis (per-layer importance, unit salience), as JSON."""
        s = self.session(request)
        if s.importance is None:
            return {"error": "no analysis yet: compute importance first"}
        return {"model": s.loaded.lm.name if s.loaded else None, **s.importance.to_json()}

    def on_generate(self, prompt, max_new_tokens, temperature, request: gr.Request):
        """-> dense output, pruned output, status: the same prompt through both models."""
        s = self.session(request)
        try:
            with s.busy("generation"):
                loaded = require_loaded(s)
                n = number(max_new_tokens, "max new tokens", int)
                t = number(temperature, "temperature")
                mine = s.pruned is not None and s.pruned.name == loaded.lm.name  # pruned from this model
                outs = [try_model(m, prompt, n, t) for m in ((loaded.lm, s.pruned) if mine else (loaded.lm,))]
        except Exception as e:
            return gr.skip(), gr.skip(), warn(message(e))
        dense, pruned = outs[0], (outs[1] if mine else None)
        none = (f" The last pruned model comes from `{s.pruned.name}`: run pruning on this model to compare."
                if s.pruned is not None else " No pruned model yet: run pruning in the Prune & recover tab.")
        status = f"Dense: {dense['stats']}." + (f" Pruned: {pruned['stats']}." if pruned else none)
        return dense["text"], pruned["text"] if pruned else "", status


def export_stem(rep: dict, number: int) -> str:
    """A file name that says which run it is: model, run number, method and budget."""
    cfg = rep.get("config", {}).get("allocation", {})
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(str(rep["model"])).name)
    return f"{safe}-run{number}-{rep.get('method', 'adaptive')}-S{cfg.get('target', 0):g}"


def try_model(lm, prompt: str, max_new_tokens: int, temperature: float) -> dict:
    """One model's answer to the prompt: a continuation (LMs) or class probabilities (classifiers)."""
    if lm.task == "causal-lm":
        g = generate(lm, prompt, max_new_tokens=max_new_tokens, temperature=temperature)
        return {"text": g["text"], "stats": f"{g['new_tokens']} tokens in {g['seconds']:.1f} s "
                                            f"({g['tokens_per_s']:.1f} tokens/s, {'greedy' if g['greedy'] else 'sampled'})"}
    if lm.task == "classification":
        c = classify(lm, prompt)
        return {"text": "\n".join(f"{k}: {v:.3f}" for k, v in sorted(c["probabilities"].items(), key=lambda kv: -kv[1])),
                "stats": f"{c['label']} in {c['seconds'] * 1000:.0f} ms"}
    raise ExplorerError("this model is an encoder without a task head: there is nothing to generate or classify")


def advanced_configs(values) -> dict[type, dict]:
    """The Advanced accordion's values, per config class: {PruneConfig: {"lr": ...}, ...}."""
    out: dict[type, dict] = {PruneConfig: {}, AnalysisConfig: {}, AllocationConfig: {}}
    for (cls, name), v in zip(ADVANCED, values):
        default = next(f.default for f in fields(cls) if f.name == name)
        out[cls][name] = v if isinstance(default, (bool, str)) else number(v, name.replace("_", " "), type(default))
    return out


def non_default(configs: dict[type, dict]) -> str:
    """', lr=0.0001, seed=3' for the advanced values that differ from the defaults (for run labels)."""
    parts = []
    for cls, vals in configs.items():
        defaults = {f.name: f.default for f in fields(cls)}
        parts += [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in vals.items() if v != defaults[k]]
    return "".join(", " + p for p in parts)


def loading_status(model) -> str:
    """What the status says the moment Load is pressed (the load itself follows)."""
    slow = " (the bundled SmolLM2 takes about a minute on 2 cores: GGUF dequantisation, then the dense model " \
           "on val)" if model == "smollm2-135m" else ""
    return f"Loading `{model}`{slow}…"


def eta(seconds: float) -> str:
    return f"about {seconds:.0f} s" if seconds < 120 else f"about {seconds / 60:.0f} min"


def evaluation_note(run: PruningRun) -> str:
    """What one evaluation of a run costs, in words: the status line shows it while it runs."""
    n = run.prune.eval_samples
    split = run.prune.eval_split
    if run.lm.task == "causal-lm":
        what = f"{n or EVAL_TOKENS:,} {split} tokens"
    else:  # never more than the split has
        n_split = len(run.data.texts[split])
        what = f"{min(n, n_split) if n else n_split:,} {split} examples"
    if not run.timing:
        return what + ", no timing"
    speed = ("decode at batch 1 and 8 + prefill" if run.lm.task == "causal-lm" else "latency at 1 and 32 × 128")
    return f"{what}, latency 32 × 128, {speed} × {run.prune.speed_repeats}"


def allocation_config(target, amplitude, mode, max_sparsity, round_to, split, normalization="maxabs") -> AllocationConfig:
    """The Allocation tab's controls (the same six inputs on every event that uses them, then the
    layer normalisation, which handlers take after the request)."""
    return AllocationConfig(target=number(target, "target sparsity S_base"), amplitude=number(amplitude, "A"),
                            mode=mode, max_sparsity=number(max_sparsity, "S_max"),
                            round_to=number(round_to or 1, "round to", int), split=split or "salience",
                            normalization=normalization_choice(normalization))


def normalization_choice(value) -> str:
    """The layer-normalisation radio's value (maxabs, the reference, when empty); anything else is a message."""
    v = value or "maxabs"
    choices = choices_of(AllocationConfig, "normalization")
    if v not in choices:
        raise ExplorerError(f"layer normalisation must be one of {', '.join(choices)}, got '{v}'")
    return v


def layer_figure(imp, normalization: str = "maxabs"):
    """The layer-importance plot: raw I_L and Î_L by the chosen normalisation."""
    return plots.layer_importance(imp.layer_cos, imp.normalized_by(normalization), imp.attn_cos, imp.mlp_cos)


def task_defaults(task: str | None) -> tuple[str, str]:
    """(metric, recovery) that work for a task: encoders have no head, so no gradients."""
    return (LABEL_FREE_METRICS[0], "reconstruct") if task == "encoder" else ("taylor", "reconstruct")


def require_loaded(s: Session) -> Loaded:
    if s.loaded is None:
        raise ExplorerError("no model loaded: load one in the Model & data tab")
    return s.loaded


def empty_table() -> pd.DataFrame:
    return pd.DataFrame([], columns=TABLE_COLUMNS)


def derived_placeholders() -> tuple:
    """Fresh contents for every output that depends on the model (after a new Load)."""
    return (plots.empty("Compute importance to see layer importance"), plots.empty("Compute importance"),
            plots.empty("Compute importance"), "Compute importance for this model.",
            plots.empty("Compute importance first (Importance tab)"), empty_table(),
            "Compute importance first (Importance tab).",
            plots.empty("Run pruning to see quality against parameters removed"), plots.empty("Recovery loss"),
            plots.empty("Size and latency per stage"), stage_table([], ""), "Ready to run.",
            plots.empty("Finished runs appear here"), plots.empty("Pareto chart of finished runs"))


N_DERIVED = len(derived_placeholders())


# --- layout, then wiring ---------------------------------------------------------------------------

CSS = """
#load-btn, #importance-btn, #run-btn { min-width: 140px; }
.status-line { min-height: 1.6em; }
"""


def config_control(cls, name: str):
    """A control for one config field, from its metadata (type, default, help, choices, range)."""
    f = next(f for f in fields(cls) if f.name == name)
    md = f.metadata
    prefix = "calibration " if cls is AnalysisConfig else ""  # AnalysisConfig.seed vs PruneConfig.seed
    kw = {"label": prefix + name.replace("_", " "), "info": md.get("help"),
          "elem_id": "adv-" + (prefix + name).replace("_", "-").replace(" ", "-")}
    if isinstance(f.default, bool):
        return gr.Checkbox(f.default, **kw)
    if md.get("choices"):
        return gr.Dropdown(list(md["choices"]), value=f.default, **kw)
    return gr.Number(f.default, precision=0 if isinstance(f.default, int) else None, minimum=md.get("min"),
                     maximum=md.get("max"), **kw)


def build_ui(app: ExplorerApp, default_model: str = DEFAULT_MODEL, default_data: str | None = None,
             default_task: str = "auto") -> gr.Blocks:
    """The page shows the start-up model's settings, so Load reloads exactly that model."""
    t = app.registry.template
    ph = derived_placeholders()
    metric, recovery = task_defaults(t.lm.task if t else None)
    # delete_cache: exported files (copied into Gradio's cache to be served) go after an hour
    with gr.Blocks(title="Pruning Explorer", delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# Pruning Explorer\nAdaptive structured pruning, step by step: load a model, measure how "
                    "important each layer is, shape the per-layer sparsity, then prune, recover and compare runs.")
        with gr.Tabs():
            with gr.Tab("Model & data", id="model"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        model_in = gr.Dropdown(list(BUILTIN_MODELS), value=default_model, allow_custom_value=True,
                                               label="Model", elem_id="model-input",
                                               info="built-in, a Hugging Face id or a local directory")
                        task_in = gr.Dropdown(["auto", *TASKS], value=default_task, label="Task",
                                              info="auto: from the model's config", elem_id="task-input")
                        data_in = gr.Dropdown([MODEL_DEFAULT_DATA, *BUILTIN_DATA], value=default_data or MODEL_DEFAULT_DATA,
                                              allow_custom_value=True, label="Data",
                                              info="built-in or a file path (or upload below)")
                        upload = gr.File(label="…or upload CSV / JSONL / TXT", file_types=[".csv", ".tsv", ".jsonl", ".json", ".txt"],
                                         type="filepath", height=120, elem_id="upload-input")
                        with gr.Row():
                            text_col = gr.Textbox("text", label="Text column")
                            label_col = gr.Textbox("label", label="Label column", info="empty: no labels")
                        load_btn = gr.Button("Load", variant="primary", elem_id="load-btn")
                    with gr.Column(scale=2):
                        summary = gr.Markdown(model_summary(t), elem_id="model-summary")
                        load_status = gr.Markdown(elem_classes="status-line", elem_id="load-status")
                gr.Markdown("Models: " + "; ".join(f"`{k}`: {v.description}" for k, v in BUILTIN_MODELS.items())
                            + ". Data: " + "; ".join(f"`{k}`: {v}" for k, v in BUILTIN_DATA.items()) + ".")

            with gr.Tab("Importance", id="importance"):
                with gr.Row(equal_height=True):
                    metric_in = gr.Dropdown(list(METRICS), value=metric, label="Salience metric",
                                            info=help_of(AnalysisConfig, "metric"))
                    samples_in = gr.Slider(8, 512, value=64, step=8, label="Calibration samples", elem_id="samples-input",
                                           info=help_of(AnalysisConfig, "samples"))
                    batch_in = gr.Slider(1, 64, value=16, step=1, label="Batch size", elem_id="batch-input",
                                         info=help_of(AnalysisConfig, "batch_size"))
                    with gr.Column(scale=0, min_width=140):
                        imp_btn = gr.Button("Compute importance", variant="primary", elem_id="importance-btn")
                        imp_stop_btn = gr.Button("Stop", variant="stop", size="sm", elem_id="importance-stop-btn")
                imp_status = gr.Markdown(ph[3], elem_classes="status-line", elem_id="importance-status")
                layer_plot = gr.Plot(ph[0], label="Layer importance", elem_id="layer-importance-plot")
                with gr.Row():
                    heads_plot = gr.Plot(ph[1], label="Heads", elem_id="heads-heatmap")
                    neurons_plot = gr.Plot(ph[2], label="Neurons", elem_id="neurons-heatmap")
                with gr.Accordion("How the scores are computed", open=False):
                    gr.Markdown(IMPORTANCE_HELP, latex_delimiters=LATEX)

            with gr.Tab("Allocation", id="allocation"):
                with gr.Row():
                    target_in = gr.Slider(0, 0.9, value=0.3, step=0.01, label="Target S_base", elem_id="target-slider",
                                          info=help_of(AllocationConfig, "target"))
                    amp_in = gr.Slider(0, 0.5, value=0.05, step=0.01, label="Amplitude A", elem_id="amplitude-slider",
                                       info=help_of(AllocationConfig, "amplitude"))
                    mode_in = gr.Radio(list(choices_of(AllocationConfig, "mode")), value="exact", label="Mode",
                                       elem_id="mode-input")
                    split_in = gr.Radio(list(choices_of(AllocationConfig, "split")), value="salience",
                                        label="Attention / FFN split", elem_id="split-input",
                                        info=help_of(AllocationConfig, "split"))
                    norm_in = gr.Radio(list(choices_of(AllocationConfig, "normalization")), value="maxabs",
                                       label="Layer normalisation", elem_id="normalization-input",
                                       info=help_of(AllocationConfig, "normalization"))
                with gr.Accordion("Limits and rounding", open=False):
                    with gr.Row():
                        smax_in = gr.Slider(0.5, 0.99, value=0.95, step=0.01, label="S_max",
                                            info=help_of(AllocationConfig, "max_sparsity"))
                        round_in = gr.Number(1, precision=0, minimum=1, maximum=128, label="Round neurons to",
                                             info=help_of(AllocationConfig, "round_to"))
                alloc_md = gr.Markdown(ph[6], elem_id="allocation-summary")
                alloc_plot = gr.Plot(ph[4], label="Per-layer sparsity", elem_id="allocation-plot")
                alloc_table = gr.Dataframe(ph[5], label="Per-layer plan (edit the sparsity column)", interactive=True,
                                           static_columns=[i for i in range(len(TABLE_COLUMNS)) if i != EDITABLE],
                                           elem_id="allocation-table", max_height=420)
                reset_btn = gr.Button("Reset hand edits", size="sm")
                gr.Markdown(ALLOCATION_HELP, latex_delimiters=LATEX)

            with gr.Tab("Prune & recover", id="prune") as prune_tab:
                plan_md = gr.Markdown(elem_id="prune-plan")
                with gr.Row():
                    stages_in = gr.Number(2, precision=0, minimum=1, maximum=20, label="Stages K", elem_id="stages-input",
                                          info=help_of(PruneConfig, "stages"))
                    recovery_in = gr.Radio(list(choices_of(PruneConfig, "recovery")), value=recovery, label="Recovery",
                                           info=help_of(PruneConfig, "recovery"), elem_id="recovery-input")
                    steps_in = gr.Number(10, precision=0, minimum=0, maximum=5000, label="Recovery steps per stage",
                                         info=help_of(PruneConfig, "recovery_steps"), elem_id="steps-input")
                    plan_in = gr.Radio(list(PLANS), value="adaptive", label="Allocation", elem_id="plan-input",
                                       info="adaptive / uniform use the Allocation tab's S_base (and A); "
                                            "manual table prunes to the table's plan")
                    method_in = gr.Dropdown(list(METHODS), value="adaptive", label="Method", elem_id="method-input",
                                            info="adaptive/uniform follow the Allocation choice; the others are the "
                                                 "methods of the design documents (see the README table)")
                with gr.Accordion("Evaluation", open=False):
                    with gr.Row():
                        eval_in = gr.Number(0, precision=0, minimum=0, label="Evaluation size", elem_id="eval-input",
                                            info=f"0: {EVAL_EXAMPLES} test examples (accuracy) / {EVAL_TOKENS} tokens (perplexity)")
                        timing_in = gr.Checkbox(True, label="Measure latency (batch 32 × 128 tokens, median of 5)",
                                                elem_id="timing-input")
                with gr.Accordion("Advanced: every other setting of the run", open=False):
                    adv_in = []
                    for i in range(0, len(ADVANCED), 4):
                        with gr.Row():
                            adv_in += [config_control(cls, name) for cls, name in ADVANCED[i:i + 4]]
                with gr.Row():
                    run_btn = gr.Button("Run", variant="primary", elem_id="run-btn")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                    test_btn = gr.Button("Evaluate the last run on test", elem_id="test-btn")
                run_status = gr.Markdown(ph[11], elem_classes="status-line", elem_id="run-status")
                with gr.Row():
                    quality_plot = gr.Plot(ph[7], label="Quality", elem_id="quality-plot")
                    loss_plot = gr.Plot(ph[8], label="Recovery loss", elem_id="loss-plot")
                with gr.Row():
                    cost_plot = gr.Plot(ph[9], label="Size and latency", elem_id="cost-plot")
                    history_plot = gr.Plot(ph[12], label="History", elem_id="history-plot")
                stage_table = gr.Dataframe(ph[10], label="Stages of this run", interactive=False, elem_id="stage-table")
                pareto_plot = gr.Plot(ph[13], label="Pareto (every stage of every run)", elem_id="pareto-plot")

            with gr.Tab("Export", id="export") as export_tab:
                gr.Markdown("Download the pruned model of the last run: a zip of the directory written by "
                            "`save_model` (safetensors, config, tokenizer, `explorer_plan.json` and a model card; "
                            "reload it with `load_model(path)`), an ONNX graph (every architecture, checked by "
                            "onnxruntime) or a GGUF file for llama.cpp (LLaMA family, per-layer widths); the run "
                            "reports (JSON and CSV, every run of this session) and all charts in one HTML page.")
                with gr.Row():
                    run_in = gr.Dropdown([], label="Run to export", elem_id="export-run",
                                         info=f"the final models of the last {KEEP_RUNS} runs are kept")
                    formats_in = gr.CheckboxGroup(list(EXPORT_FORMATS), value=[EXPORT_ZIP], label="Formats",
                                                  elem_id="export-formats")
                    export_btn = gr.Button("Prepare downloads", variant="primary", elem_id="export-btn", scale=0)
                export_status = gr.Markdown(elem_classes="status-line", elem_id="export-status")
                export_files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="export-files")
                gr.Markdown("### Try it: dense and pruned side by side\nA language model continues the prompt "
                            "(greedy at temperature 0); a classifier gives its class probabilities.")
                with gr.Row():
                    prompt_in = gr.Textbox("The government said on Monday that", label="Prompt or sentence", lines=2,
                                           elem_id="prompt-input", scale=3)
                    new_tokens_in = gr.Number(40, precision=0, minimum=1, maximum=512, label="Max new tokens",
                                              elem_id="new-tokens-input", scale=1)
                    temperature_in = gr.Number(0.0, minimum=0, maximum=5, label="Temperature (0: greedy)",
                                               elem_id="temperature-input", scale=1)
                    generate_btn = gr.Button("Run both", elem_id="generate-btn", scale=0)
                with gr.Row():
                    dense_out = gr.Textbox(label="Dense model", lines=6, interactive=False, elem_id="dense-output")
                    pruned_out = gr.Textbox(label="Pruned model (last run)", lines=6, interactive=False,
                                            elem_id="pruned-output")
                generate_status = gr.Markdown(elem_classes="status-line", elem_id="generate-status")

        # --- wiring ---
        alloc_in = [target_in, amp_in, mode_in, smax_in, round_in, split_in, norm_in]  # handlers: norm after request
        alloc_out = [alloc_plot, alloc_table, alloc_md]
        derived = [layer_plot, heads_plot, neurons_plot, imp_status, *alloc_out, quality_plot, loss_plot, cost_plot,
                   stage_table, run_status, history_plot, pareto_plot]
        private = {"api_visibility": "private"}  # UI plumbing; the named endpoints below are the API
        demo.load(app.on_page_load, None, [summary, load_status], **private)
        load_btn.click(loading_status, model_in, load_status, show_progress="hidden", **private).then(
            app.on_load, [model_in, task_in, data_in, upload, text_col, label_col],
            [summary, load_status, metric_in, recovery_in, *derived], api_name="load")
        imp_btn.click(app.on_importance, [metric_in, samples_in, batch_in, *alloc_in],
                      [layer_plot, heads_plot, neurons_plot, imp_status, *alloc_out], api_name="analyze")
        for comp in alloc_in[:-1]:
            comp.change(app.on_allocation, alloc_in, alloc_out, concurrency_limit=None, show_progress="hidden",
                        **private)
        norm_in.change(app.on_normalization, alloc_in, [layer_plot, *alloc_out], concurrency_limit=None,
                       show_progress="hidden", **private)
        alloc_table.input(app.on_table_edit, [alloc_table, *alloc_in], alloc_out, concurrency_limit=None,
                          show_progress="hidden", **private)
        reset_btn.click(app.on_reset_manual, alloc_in, alloc_out, concurrency_limit=None, **private)
        gr.api(app.plan_json, api_name="plan_json")
        gr.api(app.analysis_json, api_name="analysis_json")
        run_btn.click(app.on_run, [stages_in, recovery_in, steps_in, plan_in, method_in, *alloc_in[:-1], metric_in,
                                   samples_in, eval_in, timing_in, norm_in, *adv_in],
                      [quality_plot, loss_plot, cost_plot, stage_table, run_status, history_plot, pareto_plot],
                      show_progress="minimal", api_name="run")
        stop_btn.click(app.on_stop, None, run_status, concurrency_limit=None, show_progress="hidden", api_name="stop")
        test_btn.click(app.on_test, None, run_status, api_name="test")
        imp_stop_btn.click(app.on_stop, None, imp_status, concurrency_limit=None, show_progress="hidden", **private)
        export_tab.select(app.on_export_tab, None, run_in, **private)
        for trigger in (prune_tab.select, plan_in.change, method_in.change):
            trigger(app.on_prune_plan, [plan_in, method_in, *alloc_in], plan_md, show_progress="hidden",
                    **private)
        export_btn.click(app.on_export, [formats_in, run_in], [export_files, export_status], api_name="export")
        generate_btn.click(app.on_generate, [prompt_in, new_tokens_in, temperature_in],
                           [dense_out, pruned_out, generate_status], api_name="generate")
        demo.unload(app.on_unload)
    return demo


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
