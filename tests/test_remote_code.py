"""Saved models load where their users run them: a non-uniform plan (per-layer heads / KV groups
and FFN neurons) loads with plain transformers' `from_pretrained(dir, trust_remote_code=True)`
in a Python where the explorer cannot be imported, reproduces the explorer's logits and runs in a
`pipeline`; a uniform plan loads with no remote code at all; the explorer's own loader reads both
forms, directories saved before the remote code existed and remote-code directories without their
plan file, and never runs a directory's code.

All transformers-side checks run in ONE subprocess (one start-up of torch + transformers)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_lm
from explorer import hub_code
from explorer.export import model_card
from explorer.hidden import prune_hidden
from explorer.models import PLAN_FILE, load_model, save_model
from explorer.surgery import prune_block, widths

TEXTS = ["w5 w6 w7 w8 w9 w10", "w11 w12 w13"]  # the second is padded
PROMPT = "w5 w6 w7"


def _cut(lm, groups, neurons):
    for i, (g, n) in enumerate(zip(groups, neurons)):
        prune_block(lm.adapter, lm.model, i, list(range(g)), list(range(0, 2 * n, 2)))


def _llama():  # GQA: 6 query heads over 3 KV groups, a different width in every layer
    lm = tiny_lm("llama")
    _cut(lm, [1, 3, 2], [20, 32, 11])
    return lm


def _llama_classifier():  # transformers' generic classifier: builds its base with AutoModel.from_config
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from conftest import tiny_tokenizer
    from explorer.adapters import adapter_for
    from explorer.models import LoadedModel
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
                      head_dim=8, intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=0)
    lm = LoadedModel(LlamaForSequenceClassification(cfg).eval(), tiny_tokenizer(), "classification", "tiny-llama-cls",
                     adapter_for("llama"), torch.device("cpu"), max_length=16)
    _cut(lm, [2, 1, 3], [7, 32, 20])
    return lm


def _bert():
    lm = tiny_lm("bert")
    _cut(lm, [4, 1, 3], [30, 32, 7])
    return lm


def _bert_hidden():  # hidden size cut too: the pooler keeps its width, the head size stays 8
    lm = tiny_lm("bert")
    prune_hidden(lm, list(range(0, 32, 2)) + [1, 3])
    _cut(lm, [2, 2, 2], [16, 16, 16])  # uniform, but fewer heads than a BERT config can say
    return lm


def _distilbert():
    lm = tiny_lm("distilbert")
    _cut(lm, [2, 4, 1], [9, 32, 25])
    return lm


def _gpt2():
    lm = tiny_lm("gpt2")
    _cut(lm, [3, 1, 4], [32, 5, 18])
    return lm


def _llama_uniform():  # every layer alike: config.json says it, no code
    lm = tiny_lm("llama")
    _cut(lm, [2, 2, 2], [16, 16, 16])
    return lm


CASES = {"llama": _llama, "llama-classifier": _llama_classifier, "bert": _bert, "bert-hidden": _bert_hidden, "distilbert": _distilbert, "gpt2": _gpt2,
         "llama-uniform": _llama_uniform}
REMOTE = [c for c in CASES if c != "llama-uniform"]


def _batch(lm):
    return {k: v for k, v in lm.encode(TEXTS).items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def _reference(lm) -> dict:
    """What the in-process model gives: logits on TEXTS, and what the pipeline should give."""
    out = {"logits": lm.model(**_batch(lm)).logits}
    if lm.task == "classification":
        p = lm.model(**_batch(lm)).logits.softmax(-1)
        out["top_score"] = float(p[0].max())  # pipeline("text-classification") on TEXTS[0]
    else:
        ids = lm.tokenizer(PROMPT, return_tensors="pt")
        gen = lm.model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
                                return_dict_in_generate=True)
        out["continuation"] = lm.tokenizer.decode(gen.sequences[0, ids["input_ids"].shape[1]:],
                                                  skip_special_tokens=True)
        out["gen_logits"] = torch.stack(gen.logits)  # every decoding step, through the KV cache
    return out


# Runs in a fresh Python where `explorer` is not importable: plain transformers only.
CHILD = r'''
import json, sys, torch
try:
    import explorer
    json.dump({"explorer_importable": explorer.__file__}, open(sys.argv[2], "w")); sys.exit(0)
except ImportError:
    pass
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          pipeline)
AUTO = {"causal-lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification}
cases = json.load(open(sys.argv[1]))
res = {"explorer_importable": False}
for name, c in cases.items():
    r, cls = {}, AUTO[c["task"]]
    trust = {"trust_remote_code": True} if c["remote"] else {}
    model = cls.from_pretrained(c["dir"], **trust).eval()
    r["class"] = type(model).__name__
    ref = torch.load(c["ref"])
    tok = AutoTokenizer.from_pretrained(c["dir"], **trust)
    batch = tok(c["texts"], padding=True, return_tensors="pt")
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    assert torch.equal(batch["input_ids"], ref["input_ids"]), "tokenised differently"
    with torch.no_grad():
        r["max_abs_diff"] = float((model(**batch).logits - ref["logits"]).abs().max())
    if c["task"] == "classification":
        out = pipeline("text-classification", model=c["dir"], **trust)(c["texts"][0])
        r["top_score"] = out[0]["score"]
    else:
        out = pipeline("text-generation", model=c["dir"], **trust)(c["prompt"], max_new_tokens=4, do_sample=False,
                                                                    return_full_text=False, pad_token_id=0)
        r["continuation"] = out[0]["generated_text"]
        gen = model.generate(**tok(c["prompt"], return_tensors="pt"), max_new_tokens=4, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        r["gen_max_abs_diff"] = float((torch.stack(gen.logits) - ref["gen_logits"]).abs().max())
    r["bare_class"] = type(AutoModel.from_pretrained(c["dir"], **trust)).__name__
    if c["remote"]:
        try:  # without the flag: transformers must refuse and say why
            cls.from_pretrained(c["dir"])
            r["untrusted"] = "loaded"
        except ValueError as e:
            r["untrusted"] = str(e)
    if c.get("resave"):  # a user's own save_pretrained keeps the code and the widths
        model.save_pretrained(c["resave"])
        again = cls.from_pretrained(c["resave"], trust_remote_code=True).eval()
        with torch.no_grad():
            r["resaved_max_abs_diff"] = float((again(**batch).logits - ref["logits"]).abs().max())
    res[name] = r
json.dump(res, open(sys.argv[2], "w"))
'''


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case pruned, its reference outputs taken, saved by the explorer; then the
    transformers-only subprocess run once over all of them."""
    root = tmp_path_factory.mktemp("remote")
    out, manifest = {}, {}
    for name, make in CASES.items():
        lm = make()
        ref = _reference(lm)
        d = save_model(lm, root / name)
        torch.save({"input_ids": _batch(lm)["input_ids"], **{k: v for k, v in ref.items() if torch.is_tensor(v)}},
                   root / f"{name}.pt")
        out[name] = {"lm": lm, "dir": d, "ref": ref, "widths": widths(lm.adapter, lm.model)}
        manifest[name] = {"dir": str(d), "task": lm.task, "remote": name in REMOTE, "ref": str(root / f"{name}.pt"),
                          "texts": TEXTS, "prompt": PROMPT,
                          **({"resave": str(root / "resaved")} if name == "llama" else {})}
    (root / "cases.json").write_text(json.dumps(manifest))
    work = tmp_path_factory.mktemp("elsewhere")  # no explorer on the path: not the repository, no PYTHONPATH
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root / "cases.json"), str(root / "results.json")],
                          cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((root / "results.json").read_text())


def test_the_subprocess_cannot_import_the_explorer(saved):
    assert saved[1]["explorer_importable"] is False


@pytest.mark.parametrize("name", REMOTE)
def test_non_uniform_model_loads_with_plain_transformers(saved, name):
    cases, child = saved
    c, r = cases[name], child[name]
    assert sorted(p.name for p in c["dir"].glob("*.py")) == ["configuration_pruned.py", "modeling_pruned.py"]
    cfg = json.loads((c["dir"] / "config.json").read_text())
    assert cfg["model_type"].startswith("pruned_") and set(cfg["auto_map"]) >= {"AutoConfig", "AutoModel"}
    assert r["class"] == f"Pruned{type(c['lm'].model).__name__}" and r["bare_class"].startswith("Pruned")
    assert r["max_abs_diff"] <= 1e-5, r
    if c["lm"].task == "classification":
        assert abs(r["top_score"] - c["ref"]["top_score"]) <= 1e-5
    else:
        assert r["continuation"] == c["ref"]["continuation"]  # pipeline("text-generation"), greedy
        assert r["gen_max_abs_diff"] <= 1e-5  # every decoding step through the KV cache (per-layer KV heads)
    assert "trust_remote_code=True" in r["untrusted"]


def test_a_users_own_save_pretrained_keeps_code_and_widths(saved):
    assert saved[1]["llama"]["resaved_max_abs_diff"] <= 1e-5


def test_uniform_plan_loads_without_remote_code(saved):
    cases, child = saved
    c, r = cases["llama-uniform"], child["llama-uniform"]
    assert not list(c["dir"].glob("*.py")) and "auto_map" not in json.loads((c["dir"] / "config.json").read_text())
    assert r["class"] == "LlamaForCausalLM" and r["max_abs_diff"] <= 1e-5 and r["gen_max_abs_diff"] <= 1e-5
    assert r["continuation"] == c["ref"]["continuation"]
    plan = json.loads((c["dir"] / PLAN_FILE).read_text())
    assert plan["loads_with_plain_from_pretrained"] is True and plan["loads_with_remote_code"] is False


@pytest.mark.parametrize("name", ["llama", "bert-hidden", "gpt2", "llama-uniform"])
def test_explorer_loader_reads_both_forms_without_running_their_code(saved, name, tmp_path):
    c = saved[0][name]
    again = load_model(str(c["dir"]), device="cpu")
    assert widths(again.adapter, again.model) == c["widths"]
    assert type(again.model).__module__.startswith("transformers.")  # transformers' class, not the folder's
    with torch.no_grad():
        torch.testing.assert_close(again.model(**_batch(again)).logits, c["ref"]["logits"], atol=1e-5, rtol=0)
    if name == "llama-uniform":
        return
    # the folder's code is never run, even when trust is offered: booby-trap it
    trap = tmp_path / "trapped"
    trap.mkdir()
    for f in c["dir"].iterdir():
        (trap / f.name).write_bytes(f.read_bytes())
    for f in hub_code.FILES:
        (trap / f).write_text("raise RuntimeError('the explorer ran the folder code')\n")
    (trap / PLAN_FILE).unlink()  # and without the plan file: the widths come from config.json
    again = load_model(str(trap), device="cpu", trust_remote_code=True)
    assert widths(again.adapter, again.model) == c["widths"]
    with torch.no_grad():
        torch.testing.assert_close(again.model(**_batch(again)).logits, c["ref"]["logits"], atol=1e-5, rtol=0)


def test_explorer_reads_directories_saved_before_the_remote_code(monkeypatch, tmp_path):
    """The old form: the base config at its dense widths and the plan file, no code."""
    lm = _bert()
    ref = _reference(lm)["logits"]
    monkeypatch.setattr(hub_code, "write_remote_code", lambda *a, **k: None)
    d = save_model(lm, tmp_path / "old")
    assert not list(d.glob("*.py")) and json.loads((d / "config.json").read_text())["model_type"] == "bert"
    again = load_model(str(d), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(again.model(**_batch(again)).logits, ref, atol=1e-5, rtol=0)


def test_only_the_explorers_own_code_is_saved(monkeypatch, tmp_path):
    """Code that save_pretrained copies from a model loaded with trust_remote_code is not kept."""
    for make, ours in ((_gpt2, ["configuration_pruned.py", "modeling_pruned.py"]), (_llama_uniform, [])):
        lm = make()
        real = lm.model.save_pretrained

        def with_foreign_code(d, *a, real=real, **k):
            real(d, *a, **k)
            (Path(d) / "modeling_other.py").write_text("print('other')\n")
            cfg = json.loads((Path(d) / "config.json").read_text())
            (Path(d) / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "modeling_other.Other"}}))
        monkeypatch.setattr(lm.model, "save_pretrained", with_foreign_code)
        d = save_model(lm, tmp_path / make.__name__)
        assert sorted(p.name for p in d.glob("*.py")) == ours
        auto_map = json.loads((d / "config.json").read_text()).get("auto_map") or {}
        assert all(v.split(".")[0] in ("configuration_pruned", "modeling_pruned") for v in auto_map.values())


def test_model_card_says_the_form_and_why_the_flag(saved):
    cases = saved[0]
    card = (cases["llama"]["dir"] / "README.md").read_text()
    assert "- custom_code" in card.split("---")[1]
    assert "trust_remote_code=True" in card and "configuration_pruned.py" in card and "per_layer_config" in card
    assert "pipeline('text-generation'" in card and "Why `trust_remote_code=True`" in card
    bert = (cases["bert-hidden"]["dir"] / "README.md").read_text()
    assert "AutoModelForSequenceClassification" in bert and "pipeline('text-classification'" in bert
    plain = (cases["llama-uniform"]["dir"] / "README.md").read_text()
    assert "Form: plain transformers" in plain and "trust_remote_code" not in plain


@pytest.mark.parametrize("split", ["val", "test", None])
def test_model_card_labels_figures_with_the_split_they_were_measured_on(split):
    lm = tiny_lm("bert")
    report = {"metric": "accuracy", "dense": {"accuracy": 0.8, "params": 10}, "final": {"accuracy": 0.7, "params": 8},
              "config": {"prune": {"eval_split": split} if split else {}}}
    card = model_card(lm, {"base": "tiny", "report": report, "layers": widths(lm.adapter, lm.model),
                           "loads_with_plain_from_pretrained": True})
    row = next(line for line in card.splitlines() if line.startswith("| accuracy"))
    assert row.startswith(f"| accuracy ({split} split) |" if split else "| accuracy (split not recorded) |"), row
    assert "(test)" not in card
    if split == "val":
        assert "not a held-out test figure" in card
