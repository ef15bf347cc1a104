"""Shared pieces of the benchmark: the machine, loading models (real or tiny), fresh copies,
held-out quality, and interleaved timing."""
from __future__ import annotations

import copy
import datetime as _dt
import importlib.metadata
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402

from explorer.models import ASSETS, LoadedModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def log(*args) -> None:
    """Print a figure as the benchmark goes (flushed, so `make bench | tee` shows it live)."""
    print(*args, flush=True)


# --- the machine -----------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    info = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "transformers": _version("transformers"), "peft": _version("peft"),
        "torch_pruning": _version("torch-pruning"), "numpy": _version("numpy"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def generated_line(command: str, meta: dict) -> str:
    """The first line of a bench report: when, by what, how long, on which machine under which load."""
    m = meta["machine"]
    return (f"Generated {meta['date']} by `{command}` in {meta['seconds'] / 60:.1f} min on {m.get('cpu', '?')}, "
            f"{m.get('torch_threads', '?')} torch threads, load average before/after {meta['load_before']} / "
            f"{meta['load_after']}.")


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- models and data -------------------------------------------------------------------------

ADAPTER_DIR = ASSETS / "minilm-rt" / "adapter"
ADAPTER_METRICS = ASSETS / "minilm-rt" / "metrics.json"


def adapter_ready() -> bool:
    return (ADAPTER_DIR / "adapter_config.json").exists() and ADAPTER_METRICS.exists()


def wait_for_adapter(timeout_s: float) -> None:
    """minilm-rt needs the bundled LoRA adapter; it may still be training. Poll for it."""
    t0 = time.monotonic()
    said = False
    while not adapter_ready():
        if time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"the minilm-rt adapter is still missing at {ADAPTER_DIR} after {timeout_s:.0f} s "
                             "(run scripts/train_minilm_rt.py, or pass --models smollm2-135m)")
        if not said:
            log(f"waiting for the minilm-rt adapter ({ADAPTER_DIR}) ...")
            said = True
        time.sleep(15)
    # the adapter weights may be written a moment after the config
    time.sleep(2 if said else 0)


def tiny_tokenizer():
    """A word-level tokenizer over 120 words w3..w119 (built in memory, never downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, 120)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def tiny_model(name: str) -> LoadedModel:
    """Random tiny BERT classifier or LLaMA LM (GQA) for --smoke."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from explorer.adapters import adapter_for
    torch.manual_seed(0)
    if name == "tiny-bert":
        cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=4, num_attention_heads=8,
                         intermediate_size=128, max_position_embeddings=64, num_labels=2, pad_token_id=0)
        model, task = BertForSequenceClassification(cfg), "classification"
    elif name == "tiny-llama":
        cfg = LlamaConfig(vocab_size=120, hidden_size=48, num_hidden_layers=4, num_attention_heads=6,
                          num_key_value_heads=3, head_dim=8, intermediate_size=96, max_position_embeddings=64,
                          tie_word_embeddings=True, pad_token_id=0)
        model, task = LlamaForCausalLM(cfg), "causal-lm"
    else:
        raise ValueError(f"unknown tiny model '{name}'")
    return LoadedModel(model.eval(), tiny_tokenizer(), task, name, adapter_for(cfg.model_type),
                       torch.device("cpu"), max_length=16)


def tiny_data(task: str, n: int = 240, seed: int = 0):
    """Word sequences over the tiny vocabulary; labelled by their mean word id (classifier),
    or plain text with a learnable pattern (LM)."""
    from explorer.data import TextData
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        if task == "classification":
            words = [rng.randrange(3, 120) for _ in range(rng.randrange(4, 12))]
            labels.append(int(sum(words) / len(words) > 61))
        else:
            start = rng.randrange(3, 100)
            words = [start + (i % 7) for i in range(rng.randrange(8, 20))]
        texts.append(" ".join(f"w{w}" for w in words))
    a, b = int(n * 0.6), int(n * 0.75)
    split = {"train": texts[:a], "val": texts[a:b], "test": texts[b:]}
    if task == "classification":
        return TextData("tiny-labelled", split, {"train": labels[:a], "val": labels[a:b], "test": labels[b:]},
                        ["low", "high"])
    return TextData("tiny-text", split, None, None)


def load(name: str, wait_s: float = 0.0):
    """(LoadedModel, TextData) for a model name used by the benchmark."""
    if name.startswith("tiny-"):
        lm = tiny_model(name)
        return lm, tiny_data(lm.task)
    from explorer.data import load_data
    from explorer.models import load_model
    if name == "minilm-rt":
        wait_for_adapter(wait_s)
    t0 = time.perf_counter()
    lm = load_model(name, device="auto")
    data = load_data(lm.default_data)
    log(f"loaded {name} ({lm.n_params / 1e6:.1f} M params, {lm.task}) and {data.summary()} "
        f"in {time.perf_counter() - t0:.1f} s")
    return lm, data


def fresh(base: LoadedModel, max_length: int = 0) -> LoadedModel:
    """An independent copy of the dense model (runs mutate `lm.model`)."""
    lm = replace(base, model=copy.deepcopy(base.model), plan=dict(base.plan))
    if max_length:
        lm.max_length = max_length
    return lm


def with_widths(base: LoadedModel, layer_widths: list[dict]) -> LoadedModel:
    """A dense copy sliced to the given per-layer widths (first units kept): the same
    architecture as a pruned model with those widths, which is all latency depends on."""
    from explorer.surgery import reshape_to
    lm = fresh(base)
    if len(layer_widths) != len(lm.adapter.layers(lm.model)):
        raise ValueError("depth differs: rebuilding by widths only works for width pruning")
    reshape_to(lm.adapter, lm.model, layer_widths)
    return lm


# --- quality on held-out data ----------------------------------------------------------------

@torch.inference_mode()
def accuracy(lm: LoadedModel, texts: list[str], labels: list[int], batch_size: int = 64) -> float:
    """explorer.evaluate.accuracy, with examples sorted by length so batches carry little padding
    (the same predictions, computed about twice as fast)."""
    lm.model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    correct = 0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = lm.encode([texts[i] for i in idx])
        pred = lm.model(**batch).logits.argmax(-1).cpu()
        correct += int((pred == torch.as_tensor([labels[i] for i in idx])).sum())
    return correct / max(len(texts), 1)


def quality(lm: LoadedModel, data, split: str, mb) -> float:
    """Accuracy (classifiers) on `split`, or perplexity (LMs) on its text."""
    from explorer.evaluate import perplexity
    n = mb.test_n if split == "test" else mb.val_n
    if lm.task == "classification":
        texts, labels = data.texts[split], data.labels[split]
        if n:
            texts, labels = texts[:n], labels[:n]
        return accuracy(lm, texts, labels)
    return perplexity(lm, data.texts[split], max_tokens=n or 16384, window=mb.ppl_window, stride=mb.ppl_stride)


def metric_of(lm: LoadedModel) -> str:
    return "accuracy" if lm.task == "classification" else "perplexity"


def higher_is_better(metric: str) -> bool:
    return metric == "accuracy"


# --- timing ----------------------------------------------------------------------------------

def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each callable `repeats` times in round-robin order (after `warmup` rounds), so that
    load from other jobs on the machine falls on all of them alike. Returns ms per call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[k].append((time.perf_counter() - t) * 1000)
    return times


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def forward_fn(lm: LoadedModel, batch_size: int, seq_len: int) -> Callable[[], object]:
    """One inference forward on random tokens, as explorer.evaluate.latency does it."""
    vocab = lm.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), vocab, (batch_size, seq_len), generator=g).to(lm.device)
    mask = torch.ones_like(ids)

    def fn():
        with torch.inference_mode():
            lm.model(input_ids=ids, attention_mask=mask)
    return fn


def python_cmd() -> str:
    return Path(sys.executable).name
