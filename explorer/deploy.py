"""Where a pruned model runs, derived from its plan (issue 25): one row per runtime, said once
per model (the model card's "Where it runs" section, the app's Export tab).

  * transformers, plain `from_pretrained`: every layer has the same widths and the config can
    say them (save_model then writes them into config.json and no code);
  * transformers with the folder's own modeling file (`trust_remote_code=True`, hub_code): any
    widths, every family the explorer prunes;
  * ONNX Runtime: any widths, every task (export_onnx, checked against PyTorch);
  * llama.cpp: the LLaMA block (llama, mistral, qwen2 causal LMs with SiLU); `llama`
    architecture for uniform widths, `deci` (per-layer head / KV-head / FFN arrays, llama.cpp
    b4380 and later) otherwise (export_gguf);
  * vLLM's DeciLMForCausalLM (nemotron_nas.py): per-layer KV heads and FFN widths, but
    `num_attention_heads` query heads in every layer. A pruned KV group takes its query heads
    with it, so the plan fits only where every layer kept the same number of groups (FFN
    widths may differ). The explorer does not write DeciLM's config.json nor run vLLM: the row
    says whether the shapes fit. A plan that plain transformers loads also loads in vLLM's
    own LLaMA class, from the same config.json.

The input is a LoadedModel (its current widths; the plain-form test is the one save_model
runs, on a copy of the config) or a directory written by save_model (explorer_plan.json and
config.json, read as JSON: nothing is loaded, no code runs). Nothing here imports models.py (models
imports card.py, which imports this).
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ExplorerError
from .hidden import config_valid, plain_loadable
from .surgery import widths

PLAN_FILE = "explorer_plan.json"  # = models.PLAN_FILE (not imported: models imports this module's users)
GGUF_TYPES = ("llama", "mistral", "qwen2")  # = export_gguf.MODEL_TYPES
LLAMA_FAMILY = ("llama", "qwen2", "qwen3", "mistral")  # the explorer's LLaMA adapter
ONNX_TASKS = ("classification", "causal-lm", "encoder")  # = export_onnx.OUTPUT_NAME
MIN_TRANSFORMERS = {"LLaMA": "5.25"}  # = hub_code.MIN_TRANSFORMERS (per_layer_config)


@dataclass
class Row:
    runtime: str
    works: bool
    how: str  # the command or the form it loads in (where it works)
    why_not: str = ""  # the reason (where it does not)
    verified: str = ""  # how the explorer checks this row


def _family(model_type: str) -> str:
    return {"bert": "BERT", "roberta": "BERT", "xlm-roberta": "BERT", "electra": "BERT",
            "distilbert": "DistilBERT", "gpt2": "GPT-2"}.get(model_type, "LLaMA" if model_type in LLAMA_FAMILY
                                                             else model_type)


def _plain_form(lm) -> bool:
    """Whether save_model would write `lm` as a plain transformers folder: the adapter writes the
    uniform widths into (a copy of) the config, which transformers must accept, and the hidden
    size must let the config rebuild the model (hidden.plain_loadable)."""
    model = lm.model
    original = model.config
    model.config = copy.deepcopy(original)
    try:
        ok = bool(lm.adapter.update_config(model)) and config_valid(model.config)
    finally:
        model.config = original
    return ok and plain_loadable(lm)


def facts_of(source) -> dict:
    """What the rows are derived from: model_type, family, task, per-layer widths ({groups,
    heads, neurons}), plain (bool), remote (bool), activation, min_transformers.
    `source`: a LoadedModel, or a directory written by save_model."""
    if isinstance(source, (str, Path)):
        d = Path(source).expanduser()
        pf = d / PLAN_FILE
        if not pf.is_file():
            raise ExplorerError(f"'{d}' has no {PLAN_FILE}: not a directory saved by Pruning Explorer")
        try:
            plan = json.loads(pf.read_text())
            cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
        except (OSError, json.JSONDecodeError) as e:
            raise ExplorerError(f"cannot read the plan of '{d}': {e}") from None
        mt = str(plan.get("model_type") or cfg.get("model_type") or "?")
        remote = plan.get("remote_code") or {}
        return {"model_type": mt, "family": _family(mt), "task": plan.get("task", "?"),
                "layers": list(plan.get("layers") or []),
                "plain": bool(plan.get("loads_with_plain_from_pretrained")),
                "remote": bool(plan.get("loads_with_remote_code")),
                "activation": cfg.get("hidden_act") or cfg.get("activation_function") or cfg.get("activation"),
                "min_transformers": remote.get("min_transformers")}
    cfg = source.model.config
    mt = str(getattr(cfg, "model_type", "?"))
    layers = [{k: w[k] for k in ("groups", "heads", "neurons")} for w in widths(source.adapter, source.model)]
    plain = _plain_form(source)
    family = source.adapter.family
    return {"model_type": mt, "family": family, "task": source.task, "layers": layers, "plain": plain,
            "remote": not plain,
            "activation": getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", None)
            or getattr(cfg, "activation", None),
            "min_transformers": None if plain else MIN_TRANSFORMERS.get(family)}


NAMES = {"groups": "KV groups", "heads": "query heads", "neurons": "FFN neurons"}


def _differ(layers: list[dict], key: str) -> str:
    """'query heads: layer 0: 6, layer 3: 9' for layer 0 and the first layer whose `key` differs
    from it (empty if none)."""
    if not layers:
        return ""
    first = layers[0][key]
    j = next((i for i, w in enumerate(layers) if w[key] != first), None)
    # without grouped-query attention every head is its own KV group: say "heads" (a BERT has no KV groups)
    name = "heads" if key == "groups" and all(w["groups"] == w["heads"] for w in layers) else NAMES[key]
    return "" if j is None else f"{name}: layer 0: {first}, layer {j}: {layers[j][key]}"


def _uniform(layers: list[dict]) -> bool:
    return len({(w["groups"], w["neurons"]) for w in layers}) <= 1


def rows_for(f: dict) -> list[Row]:
    """The table's rows from `facts_of`'s facts."""
    layers, auto = f["layers"], {"causal-lm": "AutoModelForCausalLM", "classification":
                                 "AutoModelForSequenceClassification"}.get(f["task"], "AutoModel")
    out = []
    # 1. plain transformers
    if f["plain"]:
        out.append(Row("transformers (plain)", True, f"`{auto}.from_pretrained(dir)`: config.json carries the widths",
                       verified="tests/test_remote_code.py loads saved folders with plain from_pretrained"))
    else:
        why = (f"the widths differ between layers ({_differ(layers, 'groups') or _differ(layers, 'neurons')}); "
               "transformers builds every layer at the one width its config names" if not _uniform(layers) else
               "every layer has the same widths, but this family's config cannot say them (head size or hidden "
               "size fixed by the config)")
        out.append(Row("transformers (plain)", False, "", why))
    # 2. transformers with the folder's modeling file
    need = f.get("min_transformers")
    if f["plain"]:
        how = "loads as plain transformers; the flag changes nothing (the folder ships no code)"
    else:
        how = (f"`{auto}.from_pretrained(dir, trust_remote_code=True)`: configuration_pruned.py / "
               "modeling_pruned.py build each layer at its own width" + (f" (transformers >= {need})" if need else ""))
    out.append(Row("transformers + shipped modeling file", True, how,
                   verified="tests/test_remote_code.py: same logits as the explorer's model"))
    # 3. ONNX Runtime
    if f["task"] in ONNX_TASKS:
        out.append(Row("ONNX Runtime", True, "`python -m explorer export --model DIR --format onnx --out model.onnx`: "
                       "any width per layer", verified="the export runs onnxruntime against PyTorch's outputs"))
    else:
        out.append(Row("ONNX Runtime", False, "", f"task '{f['task']}' has no ONNX output the explorer writes"))
    # 4. llama.cpp
    gg = _gguf_reason(f)
    if gg:
        out.append(Row("llama.cpp", False, "", gg))
    else:
        arch = "llama" if _uniform(layers) else "deci"
        widths_ffn = sorted({w["neurons"] for w in layers})
        kq = all(n % 256 == 0 for n in widths_ffn)
        q8 = all(n % 32 == 0 for n in widths_ffn)
        quant = ("FFN widths are multiples of 256: k-quants (Q4_K_M ...) keep their type on ffn_down" if kq else
                 "FFN widths are multiples of 32, not 256: Q8_0 / Q4_0 fit, k-quants fall back to Q5_0 / Q8_0 on "
                 "ffn_down (prune with round_to=256 to avoid it)" if q8 else
                 "FFN widths are no multiples of 32: quantised ffn_down falls back to F16 (prune with round_to=32, "
                 "or 256 for the k-quants)")
        how = (f"`python -m explorer export --model DIR --format gguf-f16 --out model.gguf` (architecture `{arch}`"
               + (", per-layer head / KV-head / FFN arrays, llama.cpp b4380 or later" if arch == "deci" else "")
               + f"); `--gguf-quant q4_k_m` quantises. {quant}")
        out.append(Row("llama.cpp", True, how, verified="tests/test_llama_cpp.py runs llama-perplexity on a "
                       "pruned export (when llama.cpp is built)"))
    # 5. vLLM's DeciLM
    if gg:
        out.append(Row("vLLM (DeciLMForCausalLM)", False, "", "DeciLM is the LLaMA block: " + gg.split("; ", 1)[1]))
    else:
        heads = {w["heads"] for w in layers}
        if len(heads) > 1:
            out.append(Row("vLLM (DeciLMForCausalLM)", False, "",
                           f"query heads differ between layers ({_differ(layers, 'heads')}); DeciLM keeps "
                           "num_attention_heads query heads in every layer (only KV heads and FFN widths vary): "
                           "prune attention uniformly, or FFN only, to fit it"))
        elif f["plain"]:
            out.append(Row("vLLM (DeciLMForCausalLM)", True, "uniform widths: vLLM's own LLaMA class loads the "
                           "folder as plain transformers does (DeciLM not needed)", verified="not run here"))
        else:
            out.append(Row("vLLM (DeciLMForCausalLM)", True,
                           f"shapes fit: {next(iter(heads))} query heads in every layer, per-layer FFN widths "
                           "(block_configs[i].ffn.intermediate_size); needs a DeciLM config.json, which the "
                           "explorer does not write", verified="not run here (shapes only)"))
    return out


def _gguf_reason(f: dict) -> str:
    """Why llama.cpp (and vLLM's DeciLM, the same LLaMA block) cannot run it, or ''."""
    if f["model_type"] not in GGUF_TYPES:
        extra = " (its q/k norms are not in llama.cpp's LLaMA block)" if f["model_type"] == "qwen3" else ""
        return (f"llama.cpp's LLaMA block (llama / deci) runs llama, mistral and qwen2 models; this is "
                f"{f['model_type']}{extra}: use ONNX Runtime")
    if f["task"] != "causal-lm":
        return f"llama.cpp's LLaMA block runs causal LMs; this model's task is {f['task']}: use ONNX Runtime"
    if f.get("activation") not in (None, "silu"):
        return f"llama.cpp's LLaMA block uses SiLU; this model uses {f['activation']}: use ONNX Runtime"
    return ""


def where_it_runs(source, plan: dict | None = None) -> list[dict]:
    """Rows {runtime, works, how, why_not, verified} for a LoadedModel or a saved directory.
    `plan`: a save_model plan dict to take the widths and form from instead (the model card)."""
    f = facts_of(source)
    if plan:
        f.update(layers=list(plan.get("layers") or f["layers"]))
        if "loads_with_plain_from_pretrained" in plan:
            f.update(plain=bool(plan["loads_with_plain_from_pretrained"]),
                     remote=bool(plan.get("loads_with_remote_code")),
                     min_transformers=(plan.get("remote_code") or {}).get("min_transformers"))
    return [asdict(r) for r in rows_for(f)]


def table_markdown(source, plan: dict | None = None, heading: str = "") -> str:
    """`where_it_runs` as a markdown table (the model card's section, the app's Export tab)."""
    rows = where_it_runs(source, plan)
    lines = ([heading, ""] if heading else []) + ["| runtime | runs? | how / why not | checked by |",
                                                  "|---|---|---|---|"]
    for r in rows:
        text = (r["how"] if r["works"] else r["why_not"]).replace("|", "\\|")
        lines.append(f"| {r['runtime']} | {'yes' if r['works'] else 'no'} | {text} | {r['verified'] or '–'} |")
    return "\n".join(lines) + "\n"
