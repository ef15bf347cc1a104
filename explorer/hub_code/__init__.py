"""Remote code for saved models whose widths plain transformers cannot build.

transformers builds every layer of a LLaMA, BERT, DistilBERT or GPT-2 at the one width its
config gives, so a model pruned to different widths per layer (or to fewer heads than the config
can say: BERT-like configs derive the head size from hidden_size / num_heads) does not load
with plain `from_pretrained`. The Hub's convention for such models: the directory carries its
own configuration / modeling files, named in config.json's `auto_map`, and loads with
`from_pretrained(dir, trust_remote_code=True)`.

`write_remote_code` writes that pair into a directory saved by `models.save_model`: the templates
next to this file (`configuration_pruned.py`, `modeling_pruned.py`: they import only torch and
transformers and subclass transformers' own classes) with the class definitions for this model
appended, and rewrites config.json: model_type `pruned_<base type>` (so that plain transformers
asks for `trust_remote_code=True` instead of failing on sizes), `auto_map`, the architectures'
`Pruned…` names and the per-layer widths (see configuration_pruned.py). The global widths stay
the unpruned model's, so the explorer's own loader reads the directory without running its code
(`base_config`: the base architecture's config class from the same file, `layers_from_config`:
the plan's widths, for a directory whose plan file is missing).
"""
from __future__ import annotations

import json
from pathlib import Path

import transformers
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

HERE = Path(__file__).resolve().parent
CONFIG_FILE, MODELING_FILE = "configuration_pruned.py", "modeling_pruned.py"
FILES = (CONFIG_FILE, MODELING_FILE)
MARK = "# --- classes (generated) ---\n"
FAMILIES = {"LLaMA": "llama", "BERT": "bert", "DistilBERT": "distilbert", "GPT-2": "gpt2"}
AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification",
                "encoder": "AutoModel"}
PRUNED_KEYS = ("pruned_family", "pruned_base_model_type", "pruned_layer_heads", "pruned_layer_ffn", "pruned_head_dim",
               "pruned_head_width", "per_layer_config", "auto_map")  # what write_remote_code adds to config.json
MIN_TRANSFORMERS = {"llama": "5.25"}  # per_layer_config; the other families' code runs on older versions too


def is_pruned_config(d: dict) -> bool:
    """Whether a config.json (as a dict) was written by `write_remote_code`."""
    return bool(d.get("pruned_family")) and bool(d.get("pruned_base_model_type"))


def pruned_fields(lm, layers: list[dict], hidden: dict | None) -> dict:
    """The config.json entries that carry the per-layer widths (see configuration_pruned.py)."""
    family = FAMILIES[lm.adapter.family]
    out = {"pruned_family": family, "pruned_base_model_type": lm.model.config.model_type}
    if family == "llama":
        digits = len(str(len(layers) - 1))
        out["per_layer_config"] = {str(i).zfill(digits): {"num_attention_heads": w["heads"],
                                                          "num_key_value_heads": w["groups"],
                                                          "intermediate_size": w["neurons"]}
                                   for i, w in enumerate(layers)}
    else:
        out.update(pruned_layer_heads=[w["heads"] for w in layers], pruned_layer_ffn=[w["neurons"] for w in layers],
                   pruned_head_dim=lm.adapter.block(lm.model, 0).head_dim,
                   pruned_head_width=int(hidden["dense"]) if hidden else None)
    return out


def _classes(lm) -> tuple[str, dict[str, str]]:
    """(config class name of the base, {auto class: transformers model class name}) for `lm`."""
    base_type = lm.model.config.model_type
    models = {AUTO_CLASSES[lm.task]: type(lm.model).__name__}
    models.setdefault("AutoModel", MODEL_MAPPING_NAMES[base_type])  # the bare encoder / decoder of the same weights
    return type(lm.model.config).__name__, models


def _tail(imports: list[str], body: list[str]) -> str:
    return "\n".join([f"from transformers import {', '.join(sorted(set(imports)))}", *body]) + "\n"


def write_remote_code(directory: str | Path, lm, layers: list[dict], hidden: dict | None) -> dict:
    """Write configuration_pruned.py / modeling_pruned.py into `directory` (saved by
    `save_pretrained`) and rewrite its config.json to use them. Returns what the model card and
    the plan file say about it: {"files", "auto_map", "model_type", "min_transformers",
    "written_with_transformers"}."""
    directory = Path(directory)
    base_config, models = _classes(lm)
    config_cls = "Pruned" + base_config
    model_type = "pruned_" + lm.model.config.model_type
    config_src = (HERE / CONFIG_FILE).read_text().split(MARK)[0] + MARK + _tail(
        [base_config], ["", "", f"class {config_cls}(PrunedConfigMixin, {base_config}):",
                        f"    model_type = {model_type!r}"])
    body = ["", f"from .configuration_pruned import {config_cls}"]
    auto_map = {"AutoConfig": f"configuration_pruned.{config_cls}"}
    for auto, cls in models.items():
        body += ["", "", f"class Pruned{cls}(PrunedModelMixin, {cls}):", f"    config_class = {config_cls}"]
        auto_map[auto] = f"modeling_pruned.Pruned{cls}"
    body += ["", "", f"BASE_MODEL = Pruned{models['AutoModel']}"]
    modeling_src = (HERE / MODELING_FILE).read_text().split(MARK)[0] + MARK + _tail(list(models.values()), body)
    (directory / CONFIG_FILE).write_text(config_src)
    (directory / MODELING_FILE).write_text(modeling_src)

    path = directory / "config.json"
    d = json.loads(path.read_text())
    d.update(pruned_fields(lm, layers, hidden), model_type=model_type, auto_map=auto_map,
             architectures=[f"Pruned{type(lm.model).__name__}"])
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    family = FAMILIES[lm.adapter.family]
    return {"files": list(FILES), "auto_map": auto_map, "model_type": model_type,
            "min_transformers": MIN_TRANSFORMERS.get(family), "written_with_transformers": transformers.__version__}


def base_config(path: str | Path):
    """The config of a directory written by `write_remote_code`, as the base architecture's own
    config class at the unpruned widths, read from config.json without running the directory's
    code; None for any other directory."""
    d = json.loads((Path(path) / "config.json").read_text())
    if not is_pruned_config(d):
        return None
    base = d["pruned_base_model_type"]
    d = {k: v for k, v in d.items() if k not in PRUNED_KEYS}
    d["model_type"] = base
    d["architectures"] = [a.removeprefix("Pruned") for a in d.get("architectures") or []]
    return CONFIG_MAPPING[base].from_dict(d)


def layers_from_config(path: str | Path, config) -> dict:
    """The plan entries (`layers`, and `hidden` where the hidden size was pruned) that a
    directory's config.json written by `write_remote_code` holds: for a directory whose plan
    file is missing. `config` is `base_config(path)`."""
    d = json.loads((Path(path) / "config.json").read_text())
    n = int(config.num_hidden_layers)
    if d["pruned_family"] == "llama":
        per = {int(k): v for k, v in (d.get("per_layer_config") or {}).items()}
        kv, ffn = int(config.num_key_value_heads), int(config.intermediate_size)
        hpg = int(config.num_attention_heads) // kv
        layers = [{"groups": int(per.get(i, {}).get("num_key_value_heads", kv)),
                   "neurons": int(per.get(i, {}).get("intermediate_size", ffn))} for i in range(n)]
        for w in layers:
            w["heads"] = w["groups"] * hpg
        return {"layers": layers}
    layers = [{"groups": int(h), "heads": int(h), "neurons": int(f)}
              for h, f in zip(d["pruned_layer_heads"], d["pruned_layer_ffn"])]
    width = d.get("pruned_head_width")
    size = int(config.hidden_size)
    hidden = {"dense": int(width), "size": size} if width and int(width) != size else None
    return {"layers": layers, **({"hidden": hidden} if hidden else {})}
