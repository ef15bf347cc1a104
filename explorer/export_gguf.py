"""Export a (possibly non-uniformly pruned) LLaMA-family causal LM to GGUF for llama.cpp.

Pruned layers have their own widths: layer i keeps g_i KV groups (g_i KV heads and
g_i * heads_per_group query heads, head_dim fixed) and n_i FFN neurons. GGUF carries them
as per-layer arrays in `{arch}.feed_forward_length`, `{arch}.attention.head_count` and
`{arch}.attention.head_count_kv` (a scalar where every layer has the same value).

Architecture name. llama.cpp reads those arrays for every architecture, but its "llama"
loader and graph size every layer with layer 0's widths (`hparams.n_head()`, `n_ff()`), so a
non-uniform file named "llama" is refused at load ("tensor ... has wrong shape"). Its "deci"
architecture (DeciLM / Llama-3_1-Nemotron-NAS: the LLaMA block with per-layer widths, the
same tensor names, the same rotary layout and Q/K permutation) sizes each layer from the
arrays. `arch="auto"` writes "llama" when all widths are uniform and "deci" otherwise.

Tensors are written in llama.cpp's layout: q_proj / k_proj rows (and their biases) permuted
per head from HF's half-split rotary layout to llama.cpp's interleaved one, exactly as
convert_hf_to_gguf.py's `LlamaModel.permute` (query heads for q, KV heads for k). Norms and
biases are f32, matrices f32 or f16. A bias that is exactly zero is left out: llama.cpp's
biases are optional and a missing one adds nothing (reconstruction gives every projection a
bias but fits only o_proj / down_proj).

Tokenizer: with `source_gguf` (the model came from a GGUF file) every `tokenizer.*` field is
copied from that file verbatim. Otherwise it is built from the HF fast tokenizer: a byte-level
BPE tokenizer becomes tokenizer.ggml.model "gpt2" (tokens by id, token types, merges, special
ids); any other kind (WordLevel, WordPiece, Unigram) gets "none", which llama.cpp loads as a
vocabulary of `{arch}.vocab_size` ids without text tokenization (feed it token ids), while the
tokens and their types are still written for readers such as `read_gguf_summary`.

Quantised files (`quant`, llama-quantize's type names): Q8_0 is written here with gguf-py (the
same blocks as ggml's reference Q8_0, no llama.cpp needed); every other type is the f32/f16
file run through llama-quantize (explorer/llama_cpp.py, built by `make llama-cpp`). A matrix
whose rows are no multiple of the type's block (256 values for the k-quants, 32 for Q8_0 /
Q4_0 ...) is stored in another type by llama-quantize; the export says which, before
quantising. `check_gguf` dequantises such tensors and compares them within the type's error.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import llama_cpp
from .errors import ExplorerError
from .surgery import widths

MODEL_TYPES = ("llama", "mistral", "qwen2")  # the LLaMA block, as llama.cpp's llama loader runs it
ARCHES = ("auto", "llama", "deci")
F16_MAX = 65504.0
# relative error (|dequantised - model| / |model|, per tensor) a quantised tensor may show in check_gguf;
# measured on SmolLM2's Q8_0 / Q4_K_M files (largest over its matrices): Q8_0 0.0065, Q6_K 0.018,
# Q5_0 0.052, Q4_K 0.020 (its weights come from a Q4_1 file); the types not measured scaled by their bits
QUANT_REL_TOL = {"Q8_0": 0.02, "Q6_K": 0.04, "Q5_0": 0.08, "Q5_1": 0.08, "Q5_K": 0.08, "Q4_0": 0.15,
                 "Q4_1": 0.15, "Q4_K": 0.15, "Q3_K": 0.3, "Q2_K": 0.5, "BF16": 0.01}


def _refuse(what: str) -> ExplorerError:
    return ExplorerError(f"GGUF export needs a LLaMA-family causal LM ({', '.join(MODEL_TYPES)}); "
                         f"{what}: export it to ONNX instead")


# --- Q/K layout -------------------------------------------------------------------------------------

def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF half-split rotary rows -> llama.cpp interleaved rows, per head (as LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_head: int):
    """Inverse of `permute_qk` (works on torch tensors and numpy arrays)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- what gets written ------------------------------------------------------------------------------

def _check_model(lm) -> None:
    cfg = lm.model.config
    mt = getattr(cfg, "model_type", "?")
    if mt not in MODEL_TYPES:
        raise _refuse(f"'{lm.name}' is a {mt} model")
    if lm.task != "causal-lm" or lm.model.get_output_embeddings() is None:
        raise _refuse(f"'{lm.name}' is a {mt} model without its language-model head (task {lm.task})")
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise _refuse(f"'{lm.name}' uses the {act} activation, llama.cpp's LLaMA block uses SiLU")


def _rope(cfg) -> tuple[float, dict]:
    """(rope theta, scaling parameters) from a transformers 4 (`rope_theta`, `rope_scaling`) or
    5 (`rope_parameters`) config."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    theta = float(theta if theta is not None else 10000.0)
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ExplorerError(f"GGUF export does not support '{kind}' rotary scaling (only none, linear and llama3)")
    params["rope_type"] = kind
    return theta, params


def _llama3_rope_factors(head_dim: int, theta: float, p: dict) -> torch.Tensor:
    """The per-frequency factors llama.cpp expects as rope_freqs.weight (as convert_hf_to_gguf)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, lo, hi = p.get("factor", 8.0), p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old = p.get("original_max_position_embeddings", 8192)
    lo_wl, hi_wl = old / lo, old / hi
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(factor)
        else:
            s = (old / wl - lo) / (hi - lo)
            out.append(1 / ((1 - s) / factor + s))
    return torch.tensor(out, dtype=torch.float32)


def _layer_dims(lm) -> list[dict]:
    return [{"head_count": b.attn.n_units * b.heads_per_group, "head_count_kv": b.attn.n_units,
             "feed_forward_length": b.mlp.n_units} for b in lm.adapter.blocks(lm.model)]


def _tname(tensor, bid: int | None = None, suffix: str = "weight") -> str:
    import gguf  # optional dependency: the explorer imports without it
    base = gguf.TENSOR_NAMES[tensor]
    return (base.format(bid=bid) if bid is not None else base) + "." + suffix


def _entries(lm) -> list[tuple[str, torch.Tensor, int | None, str]]:
    """(GGUF name, HF tensor, heads to permute by or None, kind) for every tensor to write;
    kind is "matrix" (written in the chosen dtype) or "vector" (always f32). Zero biases are
    left out."""
    import gguf  # optional dependency: the explorer imports without it
    T = gguf.MODEL_TENSOR
    model = lm.model
    base = lm.adapter.base(model)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    out = [(_tname(T.TOKEN_EMBD), emb, None, "matrix")]
    for b in lm.adapter.blocks(model):
        i, layer = b.index, b.module
        sa, mlp = layer.self_attn, layer.mlp
        n_q, n_kv = b.attn.n_units * b.heads_per_group, b.attn.n_units
        out.append((_tname(T.ATTN_NORM, i), layer.input_layernorm.weight, None, "vector"))
        for t, m, nh in ((T.ATTN_Q, sa.q_proj, n_q), (T.ATTN_K, sa.k_proj, n_kv), (T.ATTN_V, sa.v_proj, None),
                         (T.ATTN_OUT, sa.o_proj, None), (T.FFN_GATE, mlp.gate_proj, None),
                         (T.FFN_UP, mlp.up_proj, None), (T.FFN_DOWN, mlp.down_proj, None)):
            out.append((_tname(t, i), m.weight, nh, "matrix"))
            if m.bias is not None and bool(m.bias.detach().ne(0).any()):
                out.append((_tname(t, i, "bias"), m.bias, nh, "vector"))
        out.append((_tname(T.FFN_NORM, i), layer.post_attention_layernorm.weight, None, "vector"))
    out.append((_tname(T.OUTPUT_NORM), base.norm.weight, None, "vector"))
    if head.data_ptr() != emb.data_ptr():
        out.append((_tname(T.OUTPUT), head, None, "matrix"))
    return out


def _gguf_layout(t: torch.Tensor, n_head: int | None) -> torch.Tensor:
    t = t.detach().to("cpu", torch.float32)
    return permute_qk(t, n_head) if n_head else t


def _scalar_or_list(values: list[int]):
    return values[0] if len(set(values)) == 1 else [int(v) for v in values]


# --- tokenizer ---------------------------------------------------------------------------------------

def _tokenizer_fields_from_gguf(path) -> list[tuple[str, object, object, object]]:
    """Every `tokenizer.*` field of a GGUF file as (key, value, type, array sub-type)."""
    import gguf  # optional dependency: the explorer imports without it
    V = gguf.GGUFValueType
    reader = gguf.GGUFReader(str(path))
    out = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = f.types[0]
        if main == V.ARRAY and len(f.types) > 2:
            raise ExplorerError(f"'{path}': nested array in {key} cannot be copied")
        out.append((key, f.contents(), main, f.types[-1] if main == V.ARRAY else None))
    if not any(k == "tokenizer.ggml.model" for k, *_ in out):
        raise ExplorerError(f"'{path}' has no tokenizer (tokenizer.ggml.model) to copy")
    return out


def _add_tokenizer_from_hf(writer, tok, n_vocab: int) -> list[str]:
    """Write the HF fast tokenizer's vocabulary; returns warnings."""
    import gguf  # optional dependency: the explorer imports without it
    TT = gguf.TokenType
    warnings: list[str] = []
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ExplorerError("GGUF export needs a fast (tokenizers-backed) tokenizer; pass source_gguf "
                            "to copy the tokenizer of the GGUF the model came from")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    is_bpe = model.get("type") == "BPE" and byte_level
    vocab = tok.get_vocab()
    n_tok = max(vocab.values()) + 1
    if n_tok > n_vocab:
        raise ExplorerError(f"the tokenizer has {n_tok} tokens but the model's embedding only {n_vocab} rows")
    tokens: list[str | None] = [None] * n_vocab
    for t, i in vocab.items():
        tokens[i] = t
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    types = []
    for i in range(n_vocab):
        if tokens[i] is None:
            tokens[i] = f"[PAD{i}]"
            types.append(int(TT.UNUSED))
        elif i in added:
            types.append(int(TT.CONTROL if added[i].special else TT.USER_DEFINED))
        else:
            types.append(int(TT.NORMAL))
    if is_bpe:
        writer.add_tokenizer_model("gpt2")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        if merges:
            writer.add_token_merges(merges)
        warnings.append("no tokenizer.ggml.pre written (llama.cpp will use its default GPT-2 "
                        "pre-tokenizer); pass source_gguf to copy the original tokenizer")
    else:
        writer.add_tokenizer_model("none")
        warnings.append(f"the tokenizer is {model.get('type', '?')}, not byte-level BPE: written as "
                        "tokenizer model 'none', so llama.cpp runs the model on token ids only")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id}
    for k, fn in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                  ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if ids[k] is not None:
            fn(int(ids[k]))
    try:
        enc = tok("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode: leave the flags out
        enc = []
    if enc:
        writer.add_add_bos_token(ids["bos"] is not None and enc[0] == ids["bos"])
        writer.add_add_eos_token(ids["eos"] is not None and enc[-1] == ids["eos"] and len(enc) > 1)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    return warnings


# --- export ------------------------------------------------------------------------------------------

def export_gguf(lm, path, dtype: str = "f32", source_gguf: str | Path | None = None,
                arch: str = "auto", quant: str | None = None, threads: int | None = None) -> dict:
    """Write `lm` to the GGUF file `path` (atomically: a temporary file in the same folder,
    then renamed). dtype "f32" or "f16" for the matrices (norms and biases stay f32).
    `quant` (e.g. "q8_0", "q4_k_m"; llama-quantize's names, any case): store the matrices in
    that type instead: Q8_0 by gguf-py here, the others by llama-quantize from the `dtype` file
    (needs `make llama-cpp`; checked before anything is written)."""
    import gguf  # optional dependency: the explorer imports without it

    _check_model(lm)
    if dtype not in ("f32", "f16"):
        raise ExplorerError(f"unknown GGUF dtype '{dtype}': use f32 or f16")
    if arch not in ARCHES:
        raise ExplorerError(f"unknown GGUF architecture '{arch}': use {', '.join(ARCHES)}")
    q = llama_cpp.quant_type(quant) if quant else None
    if q == "F16":
        dtype, q = "f16", None
    if q is not None and q != "Q8_0":
        llama_cpp.find_tools()  # a missing build is said before the export starts
    cfg = lm.model.config
    blocks = lm.adapter.blocks(lm.model)
    dims = _layer_dims(lm)
    head_dim = blocks[0].head_dim
    n_embd = int(cfg.hidden_size)
    n_vocab = int(lm.model.get_input_embeddings().weight.shape[0])
    ff = _scalar_or_list([d["feed_forward_length"] for d in dims])
    hc = _scalar_or_list([d["head_count"] for d in dims])
    hkv = _scalar_or_list([d["head_count_kv"] for d in dims])
    uniform = not any(isinstance(v, list) for v in (ff, hc, hkv))
    name = "llama" if arch == "llama" or (arch == "auto" and uniform) else "deci"
    warnings: list[str] = []
    if name == "llama" and not uniform:
        raise ExplorerError("architecture 'llama' cannot carry per-layer widths: llama.cpp's llama loader sizes "
                            "every layer like layer 0 and refuses the file (llama.cpp #9818); export with "
                            "arch 'deci' or 'auto' (the default), which llama.cpp runs with each layer's own widths")
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        window = None
    if window is not None and window < getattr(cfg, "max_position_embeddings", 0):
        warnings.append(f"sliding-window attention ({window} tokens) is not exported: llama.cpp attends "
                        "to the whole context")
    theta, rope = _rope(cfg)
    entries = _entries(lm)
    for gname, t, _, _ in entries:
        if gname.endswith("attn_q.bias") and t.shape[0] != n_embd:
            warnings.append(f"{gname} has {t.shape[0]} values; some llama.cpp versions expect the hidden "
                            f"size ({n_embd}) for it and refuse the file")
    fallbacks = llama_cpp.quant_fallbacks({g: list(t.shape) for g, t, _, k in entries if k == "matrix"}, q) if q else []
    if fallbacks:
        warnings.append(llama_cpp.fallback_summary(fallbacks, q))

    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    w = None
    try:
        w = gguf.GGUFWriter(tmp, name)
        w.add_type("model")
        w.add_name(str(lm.name))
        w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0 if q == "Q8_0" else gguf.LlamaFileType.MOSTLY_F16
                            if dtype == "f16" else gguf.LlamaFileType.ALL_F32))
        w.add_context_length(int(getattr(cfg, "max_position_embeddings", 0) or lm.max_positions))
        w.add_embedding_length(n_embd)
        w.add_block_count(len(blocks))
        w.add_feed_forward_length(ff)
        w.add_head_count(hc)
        w.add_head_count_kv(hkv)
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_rope_freq_base(theta)
        w.add_rope_dimension_count(int(head_dim))
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
        w.add_vocab_size(n_vocab)
        if rope["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        if source_gguf is not None:
            fields = _tokenizer_fields_from_gguf(source_gguf)
            toks = next((v for k, v, *_ in fields if k == "tokenizer.ggml.tokens"), None)
            if toks is not None and len(toks) != n_vocab:
                raise ExplorerError(f"'{source_gguf}' has {len(toks)} tokens but the model's embedding "
                                    f"{n_vocab} rows")
            for key, value, vtype, sub in fields:
                w.add_key_value(key, value, vtype, sub_type=sub)
        else:
            warnings += _add_tokenizer_from_hf(w, lm.tokenizer, n_vocab)

        np_dtype = np.float16 if dtype == "f16" else np.float32
        n_tensors = 0
        if rope["rope_type"] == "llama3":
            w.add_tensor(_tname(gguf.MODEL_TENSOR.ROPE_FREQS),
                         _llama3_rope_factors(head_dim, theta, rope).numpy())
            n_tensors += 1
        Q8 = gguf.GGMLQuantizationType.Q8_0
        for gname, t, nh, kind in entries:
            arr = _gguf_layout(t, nh).numpy()  # [out, in]: a GGUF row is one output's `in` values
            if kind == "matrix" and q == "Q8_0" and arr.shape[-1] % 32 == 0:
                # ggml's Q8_0 blocks (32 values: one f16 scale + 32 int8), as llama-quantize writes them
                w.add_tensor(gname, gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), Q8),
                             raw_dtype=Q8)
                n_tensors += 1
                continue
            if kind == "matrix" and (np_dtype is np.float16 or q == "Q8_0"):
                if np.abs(arr).max() > F16_MAX:
                    raise ExplorerError(f"{gname} has values beyond the f16 range: export with dtype f32")
                arr = arr.astype(np.float16)
            w.add_tensor(gname, np.ascontiguousarray(arr))
            n_tensors += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        quantized = None
        if q is not None and q != "Q8_0":
            quantized = llama_cpp.quantize(tmp, path, q, threads=threads)  # writes `path` atomically
        else:
            os.replace(tmp, path)
    finally:
        for f in (getattr(w, "fout", None) or []) if w is not None else []:
            f.close()  # a failed write leaves the writer's file open
        if os.path.exists(tmp):
            os.unlink(tmp)
    res = {"path": str(path), "bytes": path.stat().st_size, "tensors": n_tensors, "architecture": name,
           "dtype": dtype, "quant": q, "layers": dims, "warnings": warnings,
           "fallbacks": fallbacks}
    if quantized is not None:
        res["quantize"] = {k: quantized[k] for k in ("seconds", "fallback_tensors", "fallbacks")}
    return res


# --- reading back ------------------------------------------------------------------------------------

def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf_summary(path) -> dict:
    """Architecture, widths (per-layer lists even where the file has a scalar), tensor shapes
    in PyTorch order ([out, in]; GGUF stores dims innermost first) and the tokenizer."""
    import gguf  # optional dependency: the explorer imports without it
    return _summary(gguf.GGUFReader(str(path)))


def _summary(r) -> dict:
    arch = _field(r, "general.architecture")
    n_layer = int(_field(r, f"{arch}.block_count", 0))

    def per_layer(key):
        v = _field(r, f"{arch}.{key}")
        if v is None:
            return None
        return [int(x) for x in v] if isinstance(v, list) else [int(v)] * n_layer

    def count(key):  # array length without decoding every string
        f = r.fields.get(key)
        return len(f.data) if f is not None else 0

    return {
        "architecture": arch, "name": _field(r, "general.name"), "file_type": _field(r, "general.file_type"),
        "block_count": n_layer, "embedding_length": _field(r, f"{arch}.embedding_length"),
        "context_length": _field(r, f"{arch}.context_length"), "vocab_size": _field(r, f"{arch}.vocab_size"),
        "head_dim": _field(r, f"{arch}.attention.key_length"),
        "feed_forward_length": per_layer("feed_forward_length"),
        "head_count": per_layer("attention.head_count"),
        "head_count_kv": per_layer("attention.head_count_kv"),
        "tensors": {t.name: [int(d) for d in reversed(list(t.shape))] for t in r.tensors},
        "tensor_types": {t.name: t.tensor_type.name for t in r.tensors},
        "tokenizer": {"model": _field(r, "tokenizer.ggml.model"), "tokens": count("tokenizer.ggml.tokens"),
                      "merges": count("tokenizer.ggml.merges")},
    }


def check_gguf(lm, path, all_values: bool = False) -> dict:
    """Read `path` back and compare it with `lm`: per-layer widths, every tensor's name and
    shape, and the values of a few tensors (all with `all_values`), Q/K permutation undone,
    within f16 tolerance."""
    import gguf  # optional dependency: the explorer imports without it
    problems: list[str] = []
    reader = gguf.GGUFReader(str(path))
    s = _summary(reader)
    ws = widths(lm.adapter, lm.model)
    expect = {"head_count": [w["heads"] for w in ws], "head_count_kv": [w["groups"] for w in ws],
              "feed_forward_length": [w["neurons"] for w in ws]}
    if s["block_count"] != len(ws):
        problems.append(f"block_count {s['block_count']} != {len(ws)} layers")
    for key, want in expect.items():
        if s[key] != want:
            problems.append(f"{key} {s[key]} != model {want}")
    entries = _entries(lm)
    want_shapes = {n: list(t.shape) for n, t, _, _ in entries}
    got = {n: sh for n, sh in s["tensors"].items() if n != "rope_freqs.weight"}
    for n in sorted(set(want_shapes) - set(got)):
        problems.append(f"missing tensor {n}")
    for n in sorted(set(got) - set(want_shapes)):
        problems.append(f"unexpected tensor {n}")
    for n in sorted(set(got) & set(want_shapes)):
        if got[n] != want_shapes[n]:
            problems.append(f"{n}: shape {got[n]} != model {want_shapes[n]}")
    last = len(ws) - 1
    few = {"token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_q.weight",
           "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight",
           f"blk.{last}.attn_q.weight", f"blk.{last}.attn_k.weight", f"blk.{last}.ffn_gate.weight"}
    data = {t.name: t for t in reader.tensors}
    checked = []
    for n, t, nh, _ in entries:
        if n not in data or got.get(n) != want_shapes[n] or not (all_values or n in few or n.endswith(".bias")):
            continue
        rt = data[n]
        kind = rt.tensor_type.name
        b = t.detach().to("cpu", torch.float32).numpy()
        if kind in ("F32", "F16"):
            a = np.asarray(rt.data, dtype=np.float32).reshape(want_shapes[n])
            if nh:
                a = unpermute_qk(a, nh)
            if not np.allclose(a, b, rtol=1e-3, atol=1e-6):
                problems.append(f"{n}: values differ from the model (max |diff| {float(np.abs(a - b).max()):.3g})")
        else:
            tol = next((v for k, v in QUANT_REL_TOL.items() if kind.startswith(k)), None)
            try:
                a = gguf.quants.dequantize(rt.data, rt.tensor_type).astype(np.float32).reshape(want_shapes[n])
            except (NotImplementedError, ValueError, KeyError):
                a = None
            if tol is None or a is None:
                problems.append(f"{n}: stored as {kind}, which the check cannot read")
                continue
            if nh:
                a = unpermute_qk(a, nh)
            rel = float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-12))
            if rel > tol:
                problems.append(f"{n}: {kind} values differ from the model by {rel:.3f} (relative; {kind} "
                                f"allows {tol})")
        checked.append(n)
    return {"ok": not problems, "problems": problems, "checked_values": checked, "summary": s}
