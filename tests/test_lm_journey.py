"""The language-model journey end to end: GGUF-loaded models save and reload, the model card,
speed as users feel it (decode tokens/s, prefill), generation side by side, and a run's report
that survives a failed save."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_lm
from explorer import evaluate as ev_mod
from explorer.cli import main
from explorer.errors import ExplorerError
from explorer.generate import classify, generate
from explorer.models import _forget_gguf, load_model, save_model
from explorer.surgery import prune_block


def _pruned_llama():
    lm = tiny_lm("llama")
    prune_block(lm.adapter, lm.model, 0, [1], list(range(40)))
    prune_block(lm.adapter, lm.model, 1, [0, 2], list(range(64)))
    return lm


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("journey")
    return {"llama": str(save_model(_pruned_llama(), root / "llama")),
            "bert": str(save_model(tiny_lm("bert"), root / "bert")), "root": root}


def test_model_card_names_base_plan_and_loading(dirs):
    card = (dirs["root"] / "llama" / "README.md").read_text()
    front = card.split("---")[1]
    assert "pipeline_tag: text-generation" in front and "- pruned" in front and "library_name: transformers" in front
    assert "| 0 | 1 | 40 |" in card and "| 1 | 2 | 64 |" in card and "| 2 | 3 | 64 |" in card  # plan per layer
    assert "explorer_plan.json" in card and "--format gguf" in card  # non-uniform: how to load / export
    assert "pipeline_tag: text-classification" in (dirs["root"] / "bert" / "README.md").read_text()


def test_gguf_flags_are_forgotten_so_the_model_saves(tmp_path):
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig
    lm = tiny_lm("llama")
    lm.model.hf_quantizer = GgufHfQuantizer(GgufConfig())  # what from_pretrained(gguf_file=...) leaves behind
    lm.model.is_quantized = True
    lm.model.config.quantization_config = GgufConfig()
    with pytest.raises(ValueError, match="not serializable"):
        save_model(lm, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # nothing half-written
    _forget_gguf(lm.model)
    out = save_model(lm, tmp_path / "saved")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    again = load_model(str(out), device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, again.model(ids).logits)


def test_compare_speed_interleaves_models(monkeypatch):
    calls = []

    def fake(lm, setup):
        calls.append(lm.name)
        return {"decode_tokens_per_s": 10.0 if lm.name == "a" else 20.0, "prefill_ms": 4.0 if lm.name == "a" else 2.0}
    monkeypatch.setattr(ev_mod, "_speed_samples", fake)
    a, b = tiny_lm("llama"), tiny_lm("llama")
    a.name, b.name = "a", "b"
    res = ev_mod.compare_speed({"dense": a, "pruned": b}, ev_mod.SpeedSetup(repeats=3))
    assert calls == ["a", "b"] * 4  # warm-up, then each repeat measures both, alternately
    assert res["pruned"]["speedup"] == {"decode_tokens_per_s": 2.0, "prefill_ms": 2.0}
    assert res["pruned"]["spread"]["prefill_ms"] == [2.0, 2.0] and res["dense"]["weight_mb"] > 0


def test_speed_figures_of_real_generation():
    sp = ev_mod.speed(_pruned_llama(), ev_mod.SpeedSetup(repeats=1, new_tokens=4))
    assert {"decode_tokens_per_s", "decode_tokens_per_s_b8", "prefill_ms", "weight_mb"} <= set(sp)
    assert sp["decode_tokens_per_s"] > 0 and sp["prefill_ms"] > 0 and sp["setup"]["new_tokens"] == 4
    enc = ev_mod.speed(tiny_lm("bert"), ev_mod.SpeedSetup(repeats=1))
    assert {"latency_b1x128_ms", "latency_b32x128_ms"} <= set(enc)


def test_cli_eval_reports_decode_speed_and_prefill(dirs, tmp_path):
    from conftest import tiny_data
    txt = tmp_path / "d.txt"
    txt.write_text("\n\n".join(sum(tiny_data(60).texts.values(), [])))
    e = tmp_path / "e.json"
    assert main(["eval", "--model", dirs["llama"], "--data", str(txt), "--eval-samples", "100", "--batch-size", "2",
                 "--seq-len", "8", "--speed-repeats", "1", "--new-tokens", "4", "--json", str(e)]) == 0
    r = json.loads(e.read_text())
    assert r["decode_tokens_per_s"] > 0 and r["prefill_ms"] > 0 and r["decode_tokens_per_s_b8"] > 0
    assert r["weight_mb"] == pytest.approx(sum(p.numel() for p in _pruned_llama().model.parameters()) * 4 / 1e6,
                                           rel=0.05)


def test_generation_is_greedy_and_deterministic():
    lm = _pruned_llama()
    a, b = generate(lm, "w3 w4 w5", max_new_tokens=6), generate(lm, "w3 w4 w5", max_new_tokens=6)
    assert a["text"] == b["text"] and a["new_tokens"] <= 6 and a["greedy"] and a["tokens_per_s"] > 0
    s = generate(lm, "w3 w4 w5", max_new_tokens=6, temperature=1.5, seed=3)
    assert s["text"] == generate(lm, "w3 w4 w5", max_new_tokens=6, temperature=1.5, seed=3)["text"]
    for bad in ({"max_new_tokens": 0}, {"max_new_tokens": 10_000}, {"temperature": -1.0}):
        with pytest.raises(ExplorerError):
            generate(lm, "w3", **bad)
    with pytest.raises(ExplorerError, match="prompt"):
        generate(lm, "   ")
    c = classify(tiny_lm("bert"), "w3 w4 w5")
    assert abs(sum(c["probabilities"].values()) - 1) < 1e-5 and c["label"] in c["probabilities"]


def test_cli_generate_side_by_side_and_classify(dirs, capsys):
    assert main(["generate", "--model", dirs["llama"], "--prompt", "w3 w4", "--max-new-tokens", "3",
                 "--against", dirs["llama"]]) == 0
    cap = capsys.readouterr()
    assert cap.out.count("w3 w4") == 2 and cap.err.count("tokens/s") == 2
    assert main(["generate", "--model", dirs["bert"], "--prompt", "w3 w4"]) == 0
    assert "LABEL_" in capsys.readouterr().out
    assert main(["generate", "--model", dirs["llama"], "--prompt", ""]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: type a prompt")


def test_failed_save_keeps_the_report(dirs, tmp_path, capsys):
    from conftest import tiny_data
    txt = tmp_path / "d.txt"
    txt.write_text("\n\n".join(sum(tiny_data(60).texts.values(), [])))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rep = tmp_path / "rep.json"
    code = main(["prune", "--model", dirs["llama"], "--data", str(txt), "--target", "0.3", "--stages", "1",
                 "--recovery", "none", "--samples", "8", "--batch-size", "4", "--eval-samples", "100",
                 "--speed-repeats", "0", "--out", str(blocker / "sub"), "--json", str(rep)])
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error:") and "saving the model" in line and str(rep) in line
    r = json.loads(rep.read_text())
    assert r["final"]["params"] < r["dense"]["params"] and "saved_to" not in r


@pytest.mark.slow
def test_smollm2_from_gguf_saves_and_reloads_exactly(tmp_path):
    """The bundled GGUF model: dequantised, saved as plain safetensors, reloaded bit for bit."""
    lm = load_model("smollm2-135m", device="cpu")
    prune_block(lm.adapter, lm.model, 0, [0, 2], list(range(1000)))
    out = save_model(lm, tmp_path / "smol")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").exists() and "HuggingFaceTB/SmolLM2-135M-Instruct" in (out / "README.md").read_text()
    again = load_model(str(out), device="cpu")
    assert again.summary()["ffn"][0] == 1000 and again.summary()["kv_groups"][0] == 2
    batch = lm.encode(["The news today is that the council has agreed a budget."])
    with torch.no_grad():
        a = lm.model(input_ids=batch["input_ids"]).logits
        b = again.model(input_ids=batch["input_ids"]).logits
    assert torch.equal(a, b)
    assert again.tokenizer("Hello world").input_ids == lm.tokenizer("Hello world").input_ids


def test_cli_export_onnx_and_gguf_of_a_pruned_model(dirs, tmp_path, capsys):
    rep = tmp_path / "x.json"
    assert main(["export", "--model", dirs["llama"], "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                 "--json", str(rep)]) == 0
    r = json.loads(rep.read_text())
    assert r["check"]["ok"] and r["check"]["max_abs_diff"] <= 1e-4 and r["check"]["onnx_ms"] > 0
    assert "onnxruntime" in capsys.readouterr().err
    assert main(["export", "--model", dirs["llama"], "--format", "gguf", "--out", str(tmp_path / "m.gguf"),
                 "--json", str(rep)]) == 0
    r = json.loads(rep.read_text())
    assert r["check"]["ok"] and r["architecture"] == "deci"  # per-layer widths: llama.cpp's per-layer architecture
    assert [w["feed_forward_length"] for w in r["layers"]] == [40, 64, 64]
    assert [w["head_count_kv"] for w in r["layers"]] == [1, 2, 3]


@pytest.mark.parametrize("argv,needle", [
    (["--format", "gguf"], "ONNX"),  # a BERT model has no GGUF form
    (["--format", "tflite"], "unknown format"),
])
def test_cli_export_refuses_with_one_line(dirs, tmp_path, capsys, argv, needle):
    assert main(["export", "--model", dirs["bert"], "--out", str(tmp_path / "m.x"), *argv]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error:") and needle in line
    assert main(["export", "--model", dirs["bert"], "--format", "onnx", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_lm_batches_are_capped_in_tokens_with_the_same_gradient():
    """Analysis batches and training micro-batches of a causal LM stay under 1,024 tokens (memory),
    and gradient accumulation over the pieces gives the whole batch's gradient."""
    from explorer.config import AnalysisConfig
    from explorer.importance import analysis_batch_size
    from explorer.recovery import micro_batches
    lm = tiny_lm("llama")
    lm.max_length = 256
    lm.model.config.max_position_embeddings = 1024
    assert analysis_batch_size(lm, AnalysisConfig(batch_size=16), grads=True) == 4
    assert analysis_batch_size(lm, AnalysisConfig(batch_size=16), grads=False) == 16
    ids = torch.randint(3, 120, (12, 200), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    parts = micro_batches(lm, batch)
    assert [p["input_ids"].shape[0] for p, _ in parts] == [5, 5, 2] and sum(w for _, w in parts) == pytest.approx(1)
    lm.model.zero_grad()
    lm.model(**batch).loss.backward()
    whole = lm.model.model.layers[0].mlp.up_proj.weight.grad.clone()
    lm.model.zero_grad()
    for part, w in parts:
        (lm.model(**part).loss * w).backward()
    assert torch.allclose(lm.model.model.layers[0].mlp.up_proj.weight.grad, whole, rtol=1e-4, atol=1e-7)
    assert micro_batches(tiny_lm("bert"), batch)[0][1] == 1.0  # classifiers: the batch whole
