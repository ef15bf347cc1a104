"""The model card of a saved directory (README.md with Hugging Face front matter), written by
`models.save_model`: what the model came from, how it was pruned, what it measures (each quality
figure labelled with the split it was measured on), where it runs (deploy.table_markdown: plain
transformers, transformers with the folder's own modeling code, ONNX Runtime, llama.cpp, vLLM) and
how to load it in the form the directory has (plain transformers, or transformers with the
explorer's own modeling code and why that needs `trust_remote_code=True`; see hub_code).

Imports nothing from models.py (models imports this module): the card works on the LoadedModel
it is given.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .deploy import table_markdown

if TYPE_CHECKING:
    from .models import LoadedModel

HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm-rt": "sentence-transformers/all-MiniLM-L6-v2",
           "minilm": "sentence-transformers/all-MiniLM-L6-v2"}


# --- pieces ------------------------------------------------------------------------------

def _fmt(v, metric: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    if metric == "accuracy":
        return f"{v:.4f}"
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.4f}"


AUTO_CLASS = {"causal-lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification",
              "encoder": "AutoModel"}


def eval_split(report: dict) -> str | None:
    """The split a run's quality figures were measured on (the run's `eval_split`, which the app
    sets to val and the CLI to test unless told), or None where the report does not say."""
    split = report.get("eval_split") or ((report.get("config") or {}).get("prune") or {}).get("eval_split")
    for ev in (report.get("final"), report.get("dense")):
        split = split or (ev or {}).get("eval_split")
    return split


def _quality_label(metric: str, split: str | None) -> str:
    return f"{metric} ({split} split)" if split else f"{metric} (split not recorded)"


def _how_to_load(lm: LoadedModel, plan: dict) -> list[str]:
    auto = AUTO_CLASS.get(lm.task, "AutoModel")
    pipe = {"causal-lm": "text-generation", "classification": "text-classification"}.get(lm.task)
    remote = plan.get("remote_code")
    lines = ["## How to load", ""]
    if plan.get("loads_with_plain_from_pretrained"):
        lines += ["**Form: plain transformers.** Every layer has the same width and config.json says it, so "
                  "transformers loads the folder with its own classes; the folder holds no code.", "", "```python",
                  f"from transformers import {auto}", f"model = {auto}.from_pretrained('path/to/this/folder')",
                  "```", ""]
    elif remote:
        family = lm.adapter.family
        how = ("transformers' own decoder layer, built from the layer's entry of `per_layer_config` in config.json"
               if family == "LLaMA" else
               f"transformers' own {family} layer, its projections made at the layer's widths "
               "(`pruned_layer_heads`, `pruned_layer_ffn` in config.json)")
        need = remote.get("min_transformers")
        layers = plan.get("layers") or []
        if len({(w["groups"], w["neurons"]) for w in layers}) > 1:
            why = "The widths differ between layers"
        elif family == "LLaMA":
            why = ("Every layer has the same widths, but LlamaConfig cannot say them (it wants the hidden size to be "
                   "a multiple of the query-head count)")
        else:
            why = (f"Every layer has the same widths, but a {family} config cannot say them (it derives the head size "
                   "from hidden size / head count" + (", and the hidden size was pruned" if plan.get("hidden") else "")
                   + ")")
        lines += [f"**Form: transformers with this folder's own modeling code.** {why}, and transformers' {family} "
                  "classes build every layer at the one width the config names: plain `from_pretrained` stops at the "
                  "size mismatch. So the folder "
                  "carries `configuration_pruned.py` and `modeling_pruned.py`, written by Pruning Explorer and named "
                  "in config.json's `auto_map`:", "", "```python",
                  f"from transformers import {auto}" + (", pipeline" if pipe else ""),
                  f"model = {auto}.from_pretrained('path/to/this/folder', trust_remote_code=True)"]
        if pipe:
            lines.append(f"pipe = pipeline('{pipe}', model='path/to/this/folder', trust_remote_code=True)")
        lines += ["```", "",
                  "Why `trust_remote_code=True`: transformers runs those two files to build the model. They import "
                  "nothing but the standard library, torch and transformers, subclass transformers' own classes and "
                  f"build each layer with {how}; then the safetensors weights load as usual. Read them before "
                  "trusting a copy of this folder from elsewhere. Without the flag transformers refuses to load it "
                  f"(config.json's model type `{remote.get('model_type')}` is not one of its own)."
                  + (f" Needs transformers >= {need} (`per_layer_config`)." if need else "")
                  + f" Written with transformers {remote.get('written_with_transformers')}.", ""]
    lines += ["Pruning Explorer reads the folder without running any of its code:", "", "```python",
              "from explorer.models import load_model  # Pruning Explorer",
              "lm = load_model('path/to/this/folder')  # rebuilds the per-layer widths from explorer_plan.json",
              "```", ""]
    if not plan.get("loads_with_plain_from_pretrained"):
        lines += ["For runtimes without Python export it: `python -m explorer export --model DIR --format onnx "
                  "--out model.onnx`" + (" (or `--format gguf` for llama.cpp)." if lm.adapter.family == "LLaMA"
                                          else "."), ""]
    return lines


def model_card(lm: LoadedModel, plan: dict) -> str:
    """README.md of a saved model: what it came from, how it was pruned, what it measures (each
    quality figure labelled with the split it was measured on), and how to load it, in the form
    the directory was written (front matter as the Hugging Face hub reads it)."""
    base = plan.get("base", lm.name)
    report = plan.get("report") or {}
    metric = report.get("metric", "")
    pipeline = {"causal-lm": "text-generation", "classification": "text-classification"}.get(lm.task,
                                                                                              "feature-extraction")
    lines = ["---", f"base_model: {HUB_IDS.get(base, base)}", "library_name: transformers",
             f"pipeline_tag: {pipeline}", "tags:", "- pruned", "- structured-pruning", "- pruning-explorer",
             *(["- custom_code"] if plan.get("remote_code") else []), "---", "",
             f"# {Path(str(base)).name}, structurally pruned", "",
             f"Pruned with Pruning Explorer from `{base}` ({plan.get('model_type')}, task {lm.task}). "
             "Attention heads (whole KV groups for GQA) and FFN neurons were removed physically: every layer has "
             "its own width, listed below.", ""]
    cfg = report.get("config") or {}
    if cfg:
        a, al, p = cfg.get("analysis", {}), cfg.get("allocation", {}), cfg.get("prune", {})
        lines += ["## Method", "",
                  f"- method: {report.get('method', 'adaptive')}; allocation {al.get('mode')} with target "
                  f"S_base = {al.get('target')}, A = {al.get('amplitude')} (normalisation {al.get('normalization')}), "
                  f"split {al.get('split')}",
                  f"- importance: {a.get('metric')} on {a.get('samples')} calibration samples of `{plan.get('data')}`",
                  f"- {p.get('stages')} stage(s), recovery {p.get('recovery')}, {p.get('recovery_steps')} steps per "
                  "stage", ""]
    dense, final = report.get("dense") or {}, report.get("final") or {}
    if dense and final:
        split = eval_split(report)
        rows = [(_quality_label(metric, split), metric), ("parameters", "params"),
                ("block parameters", "block_params"),
                ("weights, MB", "weight_mb"), ("latency, ms (forward, 32 x 128)", "latency_ms"),
                ("decode tokens/s (batch 1, KV cache)", "decode_tokens_per_s"),
                ("decode tokens/s (batch 8)", "decode_tokens_per_s_b8"), ("prefill ms (batch 1)", "prefill_ms"),
                ("latency ms (1 x 128)", "latency_b1x128_ms"), ("latency ms (32 x 128)", "latency_b32x128_ms")]
        lines += ["## Dense vs pruned", "", "Measured by the explorer at the end of the run (speed on the machine "
                  "that ran it, dense measured at the start of the run)"
                  + (f"; {metric} on the {split} split of `{plan.get('data')}`"
                     + (" (the split the run chose its settings on, not a held-out test figure)"
                        if split == "val" else "") if split else "") + ".", "",
                  "| | dense | pruned |", "|---|---|---|"]
        lines += [f"| {label} | {_fmt(dense.get(k), metric)} | {_fmt(final.get(k), metric)} |"
                  for label, k in rows if dense.get(k) is not None or final.get(k) is not None]
        lines.append("")
    rec = plan.get("recovery") or {}
    before, after = rec.get("before") or {}, rec.get("after") or {}
    m = next((k for k in ("accuracy", "perplexity") if k in after), None)
    if m:
        split = after.get("eval_split") or before.get("eval_split")
        lines += ["## Recovery", "", f"{rec.get('recovery')} recovery, {rec.get('steps')} steps: "
                  f"{_quality_label(m, split)} {_fmt(before.get(m), m)} before, {_fmt(after.get(m), m)} after.", ""]
    layers = plan.get("layers") or []
    if layers:
        lines += ["## Plan per layer", "", "| layer | KV groups (attention units) | FFN neurons |", "|---|---|---|"]
        lines += [f"| {i} | {w['groups']} | {w['neurons']} |" for i, w in enumerate(layers)]
        lines.append("")
    lines += ["## Where it runs", "", "Derived from the plan (explorer.deploy): which runtimes load these per-layer "
              "widths, and how.", "", table_markdown(lm, plan)]
    lines += _how_to_load(lm, plan)
    return "\n".join(lines)
