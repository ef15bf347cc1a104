"""ONNX export of non-uniformly pruned tiny models: onnxruntime reproduces PyTorch."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import tiny_lm, tiny_tokenizer
from explorer.errors import ExplorerError
from explorer.export_onnx import _move_into_place, check_onnx, cpu_float32_model, export_onnx
from explorer.surgery import prune_block, widths

ARCHS = ["bert", "distilbert", "gpt2", "llama"]
FFN_0, FFN_2 = 20, 50  # FFN widths of layers 0 and 2 after pruning (layer 1 keeps all 64)


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


PADDED = [words(*range(3, 8)), words(10, 11), words(*range(20, 29))]  # 5, 2 and 9 tokens


def pruned_lm(name: str):
    """A tiny model whose three layers all have different widths: layer 0 keeps one attention
    unit (head / KV group) and 20 neurons, layer 1 everything, layer 2 all but one unit and 50."""
    lm = tiny_lm(name)
    ad = lm.adapter
    n_attn = ad.block(lm.model, 0).attn.n_units
    prune_block(ad, lm.model, 0, [n_attn - 1], list(range(0, 2 * FFN_0, 2)))
    prune_block(ad, lm.model, 2, list(range(n_attn - 1)), list(range(FFN_2)))
    return lm


@pytest.fixture(scope="module", params=ARCHS)
def exported(request, tmp_path_factory):
    """(name, pruned LoadedModel, export_onnx's result), one export per architecture."""
    lm = pruned_lm(request.param)
    info = export_onnx(lm, tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx")
    return request.param, lm, info


def torch_output(lm, enc):
    with torch.no_grad():
        return lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy()


def ort_output(path, enc):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()})[0]


def test_export_writes_one_self_contained_file(exported):
    name, lm, info = exported
    w = widths(lm.adapter, lm.model)
    assert [l["neurons"] for l in w] == [FFN_0, 64, FFN_2]
    assert len({l["groups"] for l in w}) == 3  # three different attention widths
    path = info["path"]
    assert info["output"] == "logits" and info["opset"] == 17 and info["seconds"] > 0
    assert info["inputs"] == ["input_ids", "attention_mask"]
    assert info["bytes"] > 4 * lm.n_params // 2  # float32 weights inside the file
    files = sorted(p.name for p in Path(path).parent.iterdir())
    assert files == [f"{name}.onnx"]  # no temporary files, no external data
    model = onnx.load(path, load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert model.opset_import[0].version == 17
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in list(model.graph.input) + list(model.graph.output)}
    assert dims["input_ids"] == dims["attention_mask"] == ["batch", "sequence"]
    assert dims["logits"] == (["batch", 2] if lm.task == "classification" else ["batch", "sequence", 120])


def test_initializers_have_the_pruned_shapes(exported):
    name, lm, info = exported
    hidden = lm.model.config.hidden_size
    matrices = [t for t in onnx.load(info["path"]).graph.initializer  # weight matrices, embeddings aside
                if len(t.dims) == 2 and not any(e in t.name for e in ("embed", "wte", "wpe"))]
    shapes = Counter(tuple(sorted(t.dims)) for t in matrices)
    per_layer = 3 if name == "llama" else 2  # FFN matrices per layer: up, (gate,) down
    assert shapes[tuple(sorted((hidden, FFN_0)))] == per_layer
    assert shapes[tuple(sorted((hidden, FFN_2)))] == per_layer
    assert shapes[tuple(sorted((hidden, 64)))] == per_layer  # only layer 1 keeps the full width


def test_onnxruntime_matches_pytorch_on_padded_batch(exported):
    name, lm, info = exported
    res = check_onnx(lm, info["path"], PADDED, repeats=3)
    assert res["ok"] and res["max_abs_diff"] <= 1e-4, res
    assert res["batch_size"] == 3 and res["seq_len"] == 9
    assert res["providers"] == ["CPUExecutionProvider"]
    assert res["onnx_ms"] > 0 and res["torch_ms"] > 0
    # The same comparison without check_onnx, on the real (non-padded) positions.
    enc = lm.encode(PADDED)
    assert (enc["attention_mask"] == 0).sum() == 4 + 7  # rows of 5 and 2 tokens padded to 9
    got, ref = ort_output(info["path"], enc), torch_output(lm, enc)
    keep = enc["attention_mask"].numpy().astype(bool)
    if lm.task == "causal-lm":
        got, ref = got[keep], ref[keep]
    assert got.shape == ref.shape and np.abs(ref).max() > 1e-3
    assert np.abs(got - ref).max() <= 1e-4
    assert res["max_abs_diff"] == pytest.approx(float(np.abs(got - ref).max()), abs=1e-6)
    strict = check_onnx(lm, info["path"], PADDED, repeats=1, atol=res["max_abs_diff"] / 2)
    assert strict["ok"] == (res["max_abs_diff"] == 0)


def test_other_batch_sizes_and_lengths(exported):
    """The export traced a batch of 2 rows of 13 tokens; other shapes run through the same graph."""
    name, lm, info = exported
    long = [words(*range(3 + i, 19 + i)) for i in range(5)]  # 16 tokens (max_length), no padding
    res = check_onnx(lm, info["path"], long, batch_size=5, repeats=1)
    assert res["ok"] and (res["batch_size"], res["seq_len"]) == (5, 16), res
    one = check_onnx(lm, info["path"], [words(7)], repeats=1)  # one token
    assert one["ok"] and (one["batch_size"], one["seq_len"]) == (1, 1), one
    mixed = check_onnx(lm, info["path"], PADDED + long[:2], batch_size=2, repeats=1)  # batches 2, 2, 1
    assert mixed["ok"] and mixed["batch_size"] == 2, mixed
    if lm.task == "causal-lm":
        lm.tokenizer.padding_side = "left"
        try:
            left = check_onnx(lm, info["path"], PADDED, repeats=1)
        finally:
            lm.tokenizer.padding_side = "right"
        assert left["ok"], left


def test_export_leaves_a_half_precision_model_alone(tmp_path):
    lm = pruned_lm("llama")
    lm.model.to(torch.bfloat16)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    info = export_onnx(lm, tmp_path / "m.onnx")
    after = lm.model.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in after.values() if v.is_floating_point())
    assert all(torch.equal(before[k], after[k]) for k in before)
    weights = [t for t in onnx.load(info["path"]).graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT for t in weights)  # exported in float32
    res = check_onnx(lm, info["path"], PADDED, repeats=1)  # against PyTorch in float32 on the CPU
    assert res["ok"], res


def test_float32_cpu_model_is_used_without_a_copy():
    lm = tiny_lm("bert")
    lm.model.train()
    with cpu_float32_model(lm) as model:
        assert model is lm.model and not model.training
    assert lm.model.training  # mode restored
    lm.model.to(torch.float16)
    with cpu_float32_model(lm) as model:
        assert model is not lm.model and next(model.parameters()).dtype == torch.float32
    assert next(lm.model.parameters()).dtype == torch.float16
    lm = tiny_lm("llama")
    lm.model.to(torch.float16)
    with cpu_float32_model(lm) as model:  # tied input/output embeddings stay one tensor in the copy
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_export_keeps_the_train_eval_mode(tmp_path):
    lm = tiny_lm("gpt2")
    for training in (True, False):
        lm.model.train(training)
        export_onnx(lm, tmp_path / "m.onnx")
        assert all(m.training == training for m in lm.model.modules())


def test_token_type_ids_input_only_where_the_model_takes_them(tmp_path):
    tok = tiny_tokenizer()
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    bert = replace(tiny_lm("bert"), tokenizer=tok)
    distil = replace(tiny_lm("distilbert"), tokenizer=tok)
    assert "token_type_ids" in bert.encode(["w3"])
    info = export_onnx(bert, tmp_path / "bert.onnx")
    assert info["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert check_onnx(bert, info["path"], PADDED, repeats=1)["ok"]
    assert export_onnx(distil, tmp_path / "distil.onnx")["inputs"] == ["input_ids", "attention_mask"]


def test_encoder_exports_last_hidden_state(tmp_path):
    lm = tiny_lm("bert")
    enc_lm = replace(lm, model=lm.model.bert, task="encoder")
    info = export_onnx(enc_lm, tmp_path / "enc.onnx")
    assert info["output"] == "last_hidden_state"
    out = onnx.load(info["path"]).graph.output[0]
    assert out.name == "last_hidden_state"
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", "sequence", 32]
    res = check_onnx(enc_lm, info["path"], PADDED, repeats=1)
    assert res["ok"] and res["seq_len"] == 9, res


def test_large_model_weights_are_gathered_into_one_data_file(tmp_path):
    """Over 2 GB the exporter writes one external file per tensor; _move_into_place packs
    them into a single `<name>.data` next to the model (simulated here on a tiny export)."""
    lm = tiny_lm("gpt2")
    src = export_onnx(lm, tmp_path / "src.onnx")["path"]
    work = tmp_path / "work"
    work.mkdir()
    onnx.save_model(onnx.load(src), str(work / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(work.iterdir())) > 10  # one file per weight
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    written = _move_into_place(work, work / "m.onnx", out_dir / "m.onnx")
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.onnx", "m.onnx.data"] == sorted(p.name for p in written)
    res = check_onnx(lm, out_dir / "m.onnx", PADDED, repeats=1)
    assert res["ok"], res


def test_check_onnx_errors(tmp_path):
    lm = tiny_lm("bert")
    with pytest.raises(ExplorerError, match="no ONNX file"):
        check_onnx(lm, tmp_path / "missing.onnx", PADDED)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ExplorerError, match="onnxruntime cannot load") as e:
        check_onnx(lm, bad, PADDED)
    assert "\n" not in str(e.value)
    with pytest.raises(ExplorerError, match="at least one text"):
        check_onnx(lm, bad, [])


def test_export_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
    lm = tiny_lm("distilbert")
    with pytest.raises(ExplorerError, match="opset"):
        export_onnx(lm, tmp_path / "m.onnx", opset=11)
    with pytest.raises(ExplorerError, match="task"):
        export_onnx(replace(lm, task="tagging"), tmp_path / "m.onnx")

    def broken(*a, **k):
        raise RuntimeError("unsupported operator aten::foo\nlong C++ trace")
    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ExplorerError, match="ONNX export of tiny-distilbert .distilbert. failed: "
                                            "RuntimeError: unsupported operator aten::foo$"):
        export_onnx(lm, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []  # no half-written file, no temporary folder
