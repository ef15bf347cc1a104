"""llama.cpp on the explorer's GGUF files (explorer/llama_cpp.py, issue 25).

Always run: parsing of llama-perplexity / llama-bench output, the k-quant row-size rule
(`quant_fallbacks`), quantisation type names, finding the build (stamped versions, newest first,
a clear error naming `make llama-cpp`), the wrappers against stand-in tools (shell scripts that
print what llama.cpp prints, or fail as it fails), and the allocation's round_to=256 on
SmolLM2's shape.

With llama.cpp built (`make llama-cpp`; skipped with the reason otherwise): a tiny random LLaMA
with a byte-level BPE tokenizer, pruned non-uniformly, exported as `deci`: llama-perplexity
equals the explorer's own perplexity on the same token chunks (f32, f16, Q8_0); the greedy
completion equals transformers' greedy generation; llama-quantize's fall-backs are exactly the
ones `quant_fallbacks` predicts, and its Q8_0 blocks are the bytes gguf-py writes; llama-bench
times two files interleaved. Slow: SmolLM2 dense and pruned non-uniformly, exported f16,
perplexity on the BBC test text: llama.cpp's pruned/dense ratio within 5 % of the explorer's.
"""
from __future__ import annotations

import math
import os
import stat

import numpy as np
import pytest
import torch

from explorer import llama_cpp
from explorer.errors import ExplorerError
from explorer.llama_cpp import (explorer_perplexity, fallback_summary, find_tools, parse_bench, parse_perplexity,
                                quant_block, quant_fallbacks, quant_type)

SKIP = llama_cpp.skip_reason()
needs_llama_cpp = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

PPL_OUT = """perplexity: tokenizing the input ..
perplexity: tokenization took 12.3 ms
perplexity: calculating perplexity over 3 chunks, n_ctx=512, batch_size=512, n_seq=1
perplexity: 0.41 seconds per pass - ETA 0.02 minutes
[1]18.5012,[2]17.9031,[3]19.2207,
Final estimate: PPL = 19.2207 +/- 0.81234

llama_perf_context_print:        load time =     102.67 ms
"""

BENCH_OUT = """[
  {
    "build_commit": "unknown",
    "build_number": 0,
    "model_filename": "/tmp/m.gguf",
    "model_type": "deci ?B F16",
    "model_size": 269060096,
    "model_n_params": 134515008,
    "n_prompt": 0,
    "n_gen": 32,
    "n_depth": 0,
    "avg_ns": 402000000,
    "stddev_ns": 1000000,
    "avg_ts": 79.601,
    "stddev_ts": 0.2,
    "samples_ns": [ 400000000, 404000000 ],
    "samples_ts": [ 80.0, 79.2 ]
  },
  {
    "model_filename": "/tmp/m.gguf",
    "n_prompt": 64,
    "n_gen": 0,
    "avg_ts": 901.5,
    "samples_ts": [ 900.0, 903.0 ]
  }
]
"""


# --- parsing --------------------------------------------------------------------------------------

def test_parse_perplexity_reads_the_final_estimate_and_the_running_values():
    r = parse_perplexity(PPL_OUT)
    assert r == {"ppl": 19.2207, "ppl_error": 0.81234, "chunks": 3, "running": [18.5012, 17.9031, 19.2207]}


def test_parse_perplexity_explains_a_short_text_and_a_missing_estimate():
    short = ("perplexity: tokenizing the input ..\nperplexity: you need at least 1024 tokens to evaluate perplexity "
             "with a context of 512\nperplexity: the data file you provided tokenizes to only 300 tokens\n")
    with pytest.raises(ExplorerError, match="needs at least 1024 tokens for a context of 512, the text has 300"):
        parse_perplexity(short)
    with pytest.raises(ExplorerError, match="no final estimate.*failed to load model"):
        parse_perplexity("llama_model_load: error loading model: tensor 'blk.0.attn_q.weight' has wrong shape\n"
                         "main: failed to load model\n")


def test_parse_perplexity_when_the_logger_lost_the_final_line():
    """llama.cpp's asynchronous logger can drop its last lines at exit: with every chunk's running
    value there, the last one is the estimate; with chunks missing too, an error."""
    lost = PPL_OUT[:PPL_OUT.index("Final estimate")]
    assert parse_perplexity(lost) == {"ppl": 19.2207, "ppl_error": None, "chunks": 3,
                                      "running": [18.5012, 17.9031, 19.2207]}
    with pytest.raises(ExplorerError, match="no final estimate"):
        parse_perplexity(lost.replace("[3]19.2207,", ""))


def test_parse_bench_reads_llama_bench_json_between_log_lines():
    rows = parse_bench("load_backend: loaded CPU backend\n" + BENCH_OUT + "\n")
    assert [(r["n_prompt"], r["n_gen"], r["avg_ts"]) for r in rows] == [(0, 32, 79.601), (64, 0, 901.5)]
    with pytest.raises(ExplorerError, match="no JSON"):
        parse_bench("error: failed to load model\n")


# --- the row-size rule ------------------------------------------------------------------------------

SMOL = {"token_embd.weight": [49152, 576], "blk.0.attn_q.weight": [576, 576], "blk.0.attn_k.weight": [192, 576],
        "blk.0.attn_output.weight": [576, 384], "blk.0.ffn_up.weight": [1100, 576],
        "blk.0.ffn_down.weight": [576, 1100], "blk.1.ffn_down.weight": [576, 1024], "blk.1.ffn_up.weight": [1024, 576],
        "blk.2.ffn_down.weight": [576, 40], "blk.0.attn_norm.weight": [576], "blk.0.attn_q.bias": [576]}


def test_k_quant_rows_must_be_multiples_of_256():
    fb = {f["tensor"]: f for f in quant_fallbacks(SMOL, "q4_k_m")}
    # rows of 576 (SmolLM2's hidden size), 384, 1100 are no multiple of 256; 1024 is
    assert set(fb) == {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_output.weight",
                       "blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "blk.1.ffn_up.weight", "blk.2.ffn_down.weight"}
    assert fb["blk.0.attn_q.weight"] == {"tensor": "blk.0.attn_q.weight", "row": 576, "block": 256, "type": "Q4_K",
                                         "fallback": "Q5_0"}
    assert fb["blk.0.ffn_down.weight"]["fallback"] == "F16"  # 1100 is no multiple of 32 either
    assert fb["blk.2.ffn_down.weight"]["row"] == 40
    assert {f["fallback"] for f in quant_fallbacks(SMOL, "Q6_K")} == {"Q8_0", "F16"}
    assert {f["fallback"] for f in quant_fallbacks(SMOL, "q5_k_s")} == {"Q5_1", "F16"}
    assert {f["fallback"] for f in quant_fallbacks(SMOL, "q3_k_m")} == {"Q4_0", "F16"}


def test_legacy_quants_need_multiples_of_32_and_f16_needs_nothing():
    fb = quant_fallbacks(SMOL, "Q8_0")
    assert [(f["tensor"], f["fallback"]) for f in fb] == [("blk.0.ffn_down.weight", "F16"),
                                                          ("blk.2.ffn_down.weight", "F16")]
    assert quant_fallbacks(SMOL, "q4_0") == [dict(f, type="Q4_0") for f in fb]
    assert quant_fallbacks(SMOL, "f16") == [] and quant_fallbacks(SMOL, "bf16") == []


def test_fallback_summary_names_the_rows_and_the_way_out():
    text = fallback_summary(quant_fallbacks(SMOL, "q4_k_m"), "q4_k_m")
    assert text.startswith("7 matrices") and "Q4_K_M" in text and "Q4_K -> Q5_0" in text and "round_to=256" in text
    assert "\n" not in text and fallback_summary([], "q4_k_m") == ""


def test_quant_type_names():
    assert quant_type("q4_k_m") == "Q4_K_M" and quant_type(" Q8_0 ") == "Q8_0"
    assert quant_block("q4_k_m") == 256 and quant_block("Q8_0") == 32 and quant_block("q4_0") == 32
    assert quant_block("f16") == 1
    for bad in ("q4_k_x", "iq2_xxs", "", None):
        with pytest.raises(ExplorerError, match="unknown quantisation type.*Q4_K_M"):
            quant_type(bad)


def test_round_to_256_gives_k_quant_ffn_widths_on_smollm2s_shape():
    """AllocationConfig.round_to applies to FFN neurons: 256 keeps every ffn_down row a multiple of
    256 (SmolLM2: 30 layers of 3 KV groups, 1536 neurons) and still meets the budget."""
    from explorer.allocation import allocate
    from explorer.config import AllocationConfig
    gp, npar = 576 * 64 * 3 * 2 + 576 * 64 * 2, 3 * 576  # a KV group: 3 q + 1 k + 1 v heads + 3 o heads; a neuron
    P = 3 * gp + 1536 * npar + 2 * 576
    st = [{"groups": 3, "n_neurons": 1536, "group_params": gp, "neuron_params": npar, "block_params": P}] * 30
    imp = np.random.default_rng(0).random(30)
    for target in (0.2, 0.4):
        alloc = allocate(imp, st, AllocationConfig(target=target, amplitude=0.05, mode="exact", round_to=256,
                                                   split="proportional"))
        ns = [lp.keep_neurons for lp in alloc.layers]
        assert all(n % 256 == 0 and 256 <= n <= 1536 for n in ns), ns
        assert len(set(ns)) > 1  # still non-uniform
        kept = sum(lp.params_after for lp in alloc.layers) / (30 * P)
        assert abs((1 - kept) - target) < 0.02, kept
        shapes = {f"blk.{i}.ffn_down.weight": [576, n] for i, n in enumerate(ns)}
        assert quant_fallbacks(shapes, "q4_k_m") == []


# --- finding the build ------------------------------------------------------------------------------

def _fake_build(root, version="b100", scripts=None, stamp=True):
    """Stand-in tools: shell scripts under root/<version>/bin (an `exit 0` by default)."""
    d = root / version / "bin"
    d.mkdir(parents=True, exist_ok=True)
    for t in (*llama_cpp.REQUIRED, "llama-completion"):
        f = d / t
        f.write_text("#!/bin/sh\n" + (scripts or {}).get(t, "exit 0\n"))
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    if stamp:
        (root / version / "BUILT").write_text(f"version={version}\n")
    return d


def test_find_tools_takes_the_newest_stamped_build(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLORER_LLAMA_CPP", str(tmp_path))
    with pytest.raises(ExplorerError, match="not built.*make llama-cpp.*EXPLORER_LLAMA_CPP") as e:
        find_tools()
    assert "\n" not in str(e.value) and find_tools(required=False) is None
    assert "make llama-cpp" in llama_cpp.skip_reason()
    _fake_build(tmp_path, "b99")
    _fake_build(tmp_path, "b100")
    _fake_build(tmp_path, "b200", stamp=False)  # an unfinished build: no stamp
    t = find_tools()
    assert t.version == "b100" and t.bin_dir == tmp_path / "b100" / "bin" and t.generator == "llama-completion"
    assert llama_cpp.skip_reason() is None
    # a folder holding the binaries themselves
    monkeypatch.setenv("EXPLORER_LLAMA_CPP", str(tmp_path / "b99" / "bin"))
    assert find_tools().bin_dir == tmp_path / "b99" / "bin"
    # a build missing one of the tools is not a build
    (tmp_path / "b99" / "bin" / "llama-quantize").unlink()
    assert find_tools(required=False) is None


def test_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("EXPLORER_LLAMA_CPP", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert llama_cpp.cache_root() == tmp_path / "pruning-explorer" / "llama.cpp"


def test_wrappers_on_stand_in_tools(tmp_path, monkeypatch):
    """The commands the wrappers build and how they read the tools' output, on shell scripts
    that print llama.cpp's output (arguments echoed to a file) or fail as it fails."""
    log = tmp_path / "args.txt"
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(BENCH_OUT)
    ppl_file = tmp_path / "ppl.txt"
    ppl_file.write_text(PPL_OUT)
    scripts = {
        "llama-perplexity": f'echo "$@" >> {log}\ncat {ppl_file} >&2\n',
        "llama-bench": f'echo "$@" >> {log}\ncat {bench_json}\n',
        "llama-completion": f'echo "$@" >> {log}\nprintf "Once upon a time there was a fox\\n\\n"\n',
        "llama-quantize": (f'echo "$@" >> {log}\ncp "$1" "$2"\n'
                           'echo "warning: blk.0.ffn_down.weight                - ncols   1100 not divisible by 256 '
                           '(required for type    q4_K) -> falling back to    q5_0" >&2\n'
                           'echo "llama_model_quantize_impl: WARNING: 1 of 272 tensor(s) required fallback '
                           'quantization" >&2\n'),
    }
    _fake_build(tmp_path / "build", scripts=scripts)
    monkeypatch.setenv("EXPLORER_LLAMA_CPP", str(tmp_path / "build"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    text = tmp_path / "t.txt"
    text.write_text("some text")
    r = llama_cpp.perplexity(model, text, ctx=256, chunks=4, threads=2)
    assert r["ppl"] == 19.2207 and r["ctx"] == 256 and r["chunks"] == 3
    args = log.read_text().split()
    assert args[args.index("-c") + 1] == "256" and args[args.index("--chunks") + 1] == "4"
    assert args[args.index("-t") + 1] == "2" and args[args.index("-m") + 1] == str(model)
    log.unlink()
    c = llama_cpp.completion(model, "Once upon a time", n=8)
    assert c["text"] == " there was a fox"
    assert "-no-cnv" in log.read_text() and "--temp 0" in log.read_text()
    log.unlink()
    b = llama_cpp.bench({"dense": model, "pruned": model}, n_gen=32, rounds=3, reps=2, threads=1)
    calls = log.read_text().splitlines()
    assert len(calls) == 6 and all("-o json" in c and "-n 32" in c and "-r 2" in c for c in calls)
    m = b["models"]["pruned"]
    assert m["decode_tokens_per_s"] == 79.601 and m["decode_rounds"] == [79.601] * 3
    assert m["prefill_tokens_per_s"] == 901.5 and m["decode_spread"] == [79.601, 79.601]
    q = llama_cpp.quantize(model, tmp_path / "out" / "m.q4.gguf", "q4_k_m")
    assert q["fallback_tensors"] == 1 and q["type"] == "Q4_K_M"
    assert q["fallbacks"] == [{"tensor": "blk.0.ffn_down.weight", "row": 1100, "block": 256, "fallback": "q5_0"}]
    assert (tmp_path / "out" / "m.q4.gguf").read_bytes() == b"GGUF"
    assert sorted(os.listdir(tmp_path / "out")) == ["m.q4.gguf"]
    with pytest.raises(ExplorerError, match="does not exist"):
        llama_cpp.perplexity(tmp_path / "missing.gguf", text)
    with pytest.raises(ExplorerError, match="unknown quantisation type"):
        llama_cpp.quantize(model, tmp_path / "x.gguf", "q9")


def test_a_run_whose_final_lines_were_lost_is_run_again(tmp_path, monkeypatch):
    count = tmp_path / "count"
    out = tmp_path / "ppl.txt"
    out.write_text(PPL_OUT[:PPL_OUT.index("Final")].replace("[3]19.2207,", ""))  # 1st run: chunk 3, estimate lost
    full = tmp_path / "full.txt"
    full.write_text(PPL_OUT)
    script = (f'echo x >> {count}\nif [ $(wc -l < {count}) -lt 2 ]; then cat {out} >&2; else cat {full} >&2; fi\n')
    _fake_build(tmp_path / "build", scripts={"llama-perplexity": script})
    monkeypatch.setenv("EXPLORER_LLAMA_CPP", str(tmp_path / "build"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "t.txt").write_text("x")
    r = llama_cpp.perplexity(tmp_path / "m.gguf", tmp_path / "t.txt")
    assert r["ppl"] == 19.2207 and r["ppl_error"] == 0.81234 and count.read_text().count("x") == 2


def test_failing_tools_become_one_line_errors_and_leave_no_file(tmp_path, monkeypatch):
    scripts = {
        "llama-perplexity": 'echo "llama_model_load: error loading model: tensor \'blk.0.attn_q.weight\' has '
                            'wrong shape; expected 576, 576, got 576, 384" >&2\necho "main: failed to load model" >&2\n'
                            'exit 1\n',
        "llama-quantize": 'touch "$2"\necho "main: failed to quantize model from $1" >&2\nexit 1\n',
        "llama-bench": "sleep 5\n",
    }
    _fake_build(tmp_path / "build", scripts=scripts)
    monkeypatch.setenv("EXPLORER_LLAMA_CPP", str(tmp_path / "build"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(ExplorerError, match="llama-perplexity failed.*exit 1.*wrong shape") as e:
        llama_cpp.perplexity(model, tmp_path / "t.txt")
    assert "\n" not in str(e.value)
    out = tmp_path / "q" / "m.q4.gguf"
    with pytest.raises(ExplorerError, match="llama-quantize to Q4_K_M failed.*failed to quantize"):
        llama_cpp.quantize(model, out, "q4_k_m")
    assert not out.exists() and os.listdir(out.parent) == []
    with pytest.raises(ExplorerError, match="did not finish within 1 s"):
        llama_cpp.bench({"m": model}, rounds=1, reps=1, timeout=1)


def test_explorer_perplexity_refuses_a_short_text():
    from conftest import tiny_lm
    with pytest.raises(ExplorerError, match="has 3 tokens; a context of 8 needs at least 16"):
        explorer_perplexity(tiny_lm("llama"), "w5 w6 w7", ctx=8)


# --- with llama.cpp built -----------------------------------------------------------------------------

TEXT = ("The committee will publish its findings on the new railway line next spring. "
        "A quiet film, beautifully shot, that never quite finds its story. Prices rose again in March, "
        "the third rise this year, and the bank said the economy would slow. She said the results were "
        "better than anyone had expected, and that the team would keep going. ") * 3


def _bpe_tokenizer():
    """Byte-level BPE: the 256 byte symbols, a few merges, <|endoftext|> (id 0, EOS). Text splits
    the same way in transformers and in llama.cpp's default GPT-2 pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a"), ("o", "n"), ("r", "e")]
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def _bpe_llama(seed: int = 0):
    """A tiny LLaMA (hidden 64, head_dim 16, 4 query / 2 KV heads, 3 layers) over the BPE vocabulary,
    weights large enough that attention and every layer shape the logits; pruned non-uniformly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from explorer.adapters import adapter_for
    from explorer.models import LoadedModel
    from explorer.surgery import prune_block
    tok = _bpe_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=272, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True,
                      eos_token_id=0, bos_token_id=0, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:  # (out, in): unit-scale rows, so every matrix matters
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
        model.model.embed_tokens.weight.normal_(0, 0.1)
        for L in model.model.layers:  # sharp attention: the rotary layout matters
            L.self_attn.q_proj.weight.mul_(3)
            L.self_attn.k_proj.weight.mul_(3)
    lm = LoadedModel(model, tok, "causal-lm", "tiny-bpe", adapter_for("llama"), torch.device("cpu"), max_length=64)
    prune_block(lm.adapter, lm.model, 0, [1], list(range(0, 128, 2)))  # 1 of 2 groups, 64 neurons
    prune_block(lm.adapter, lm.model, 2, [0, 1], list(range(96)))  # 96 neurons
    return lm


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from explorer.export_gguf import export_gguf
    d = tmp_path_factory.mktemp("bpe")
    lm = _bpe_llama()
    res = {q: export_gguf(lm, d / f"m.{q}.gguf", dtype="f16" if q == "f16" else "f32",
                          quant="q8_0" if q == "q8_0" else None) for q in ("f32", "f16", "q8_0")}
    text = d / "text.txt"
    text.write_text(TEXT)
    return lm, d, res, text


@needs_llama_cpp
def test_llama_cpp_perplexity_equals_the_explorers_on_a_pruned_deci_file(bpe):
    lm, d, res, text = bpe
    assert res["f32"]["architecture"] == "deci"
    ours = explorer_perplexity(lm, TEXT, ctx=64, gguf=d / "m.f32.gguf")
    assert ours["chunks"] >= 4 and not ours["add_bos"]
    assert 50 < ours["ppl"] < 5000 and abs(math.log(ours["ppl"] / 272)) > 0.2  # not the uniform 272
    for q, tol in (("f32", 0.002), ("f16", 0.01), ("q8_0", 0.03)):
        got = llama_cpp.perplexity(d / f"m.{q}.gguf", text, ctx=64, threads=2)
        assert got["chunks"] == ours["chunks"]
        assert abs(math.log(got["ppl"]) - math.log(ours["ppl"])) < tol, (q, got["ppl"], ours["ppl"])


@needs_llama_cpp
def test_a_wrong_layout_would_show_in_the_perplexity(bpe, tmp_path, monkeypatch):
    """The comparison is sensitive: with the Q/K permutation skipped, llama.cpp's perplexity moves."""
    from explorer import export_gguf as eg
    lm, d, res, text = bpe
    monkeypatch.setattr(eg, "permute_qk", lambda w, n: w)
    eg.export_gguf(lm, tmp_path / "bad.gguf")
    good = llama_cpp.perplexity(d / "m.f32.gguf", text, ctx=64)["ppl"]
    bad = llama_cpp.perplexity(tmp_path / "bad.gguf", text, ctx=64)["ppl"]
    assert abs(math.log(bad) - math.log(good)) > 0.02, (good, bad)


@needs_llama_cpp
def test_llama_cpp_completion_equals_greedy_generation(bpe):
    lm, d, res, _ = bpe
    prompt = "The committee will publish"
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = lm.tokenizer.decode(out[0, ids.shape[1]:])
    got = llama_cpp.completion(d / "m.f32.gguf", prompt, n=6, threads=2)
    assert got["text"] == want, (got["output"], want)


@needs_llama_cpp
def test_llama_quantize_falls_back_exactly_where_predicted_and_q8_0_matches_gguf_py(bpe, tmp_path):
    import gguf
    lm, d, res, text = bpe
    from explorer.export_gguf import check_gguf, export_gguf, read_gguf_summary
    shapes = read_gguf_summary(d / "m.f32.gguf")["tensors"]  # [out, in] per tensor
    q = llama_cpp.quantize(d / "m.f32.gguf", tmp_path / "m.q4_k_m.gguf", "q4_k_m")
    predicted = {f["tensor"] for f in quant_fallbacks(shapes, "q4_k_m")}
    assert predicted and {f["tensor"] for f in q["fallbacks"]} == predicted
    assert q["fallback_tensors"] == len(predicted)
    # the export's warning says the same before quantising
    r = export_gguf(lm, tmp_path / "e.q4_k_m.gguf", quant="q4_k_m")
    assert {f["tensor"] for f in r["fallbacks"]} == predicted and r["quantize"]["fallback_tensors"] == len(predicted)
    assert any("round_to=256" in w for w in r["warnings"])
    chk = check_gguf(lm, tmp_path / "e.q4_k_m.gguf", all_values=True)
    assert chk["ok"], chk["problems"]
    # llama.cpp runs it, close to the f32 file
    p32 = llama_cpp.perplexity(d / "m.f32.gguf", text, ctx=64)["ppl"]
    p4 = llama_cpp.perplexity(tmp_path / "e.q4_k_m.gguf", text, ctx=64)["ppl"]
    assert abs(math.log(p4 / p32)) < 0.15, (p32, p4)
    # Q8_0: llama-quantize's blocks are the ones gguf-py wrote
    llama_cpp.quantize(d / "m.f32.gguf", tmp_path / "m.q8_0.gguf", "Q8_0")
    ours = {t.name: t for t in gguf.GGUFReader(str(d / "m.q8_0.gguf")).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.q8_0.gguf")).tensors}
    assert ours["blk.1.attn_q.weight"].tensor_type.name == theirs["blk.1.attn_q.weight"].tensor_type.name == "Q8_0"
    for name in ("blk.1.attn_q.weight", "blk.0.ffn_down.weight", "blk.2.ffn_up.weight"):
        np.testing.assert_array_equal(np.asarray(ours[name].data), np.asarray(theirs[name].data), err_msg=name)


@needs_llama_cpp
def test_llama_bench_times_files_interleaved(bpe):
    lm, d, res, _ = bpe
    b = llama_cpp.bench({"f32": d / "m.f32.gguf", "q8_0": d / "m.q8_0.gguf"}, n_gen=16, rounds=2, reps=1, threads=1)
    for name in ("f32", "q8_0"):
        m = b["models"][name]
        assert len(m["decode_rounds"]) == 2 and m["decode_tokens_per_s"] > 0
        assert m["decode_spread"][0] <= m["decode_tokens_per_s"] <= m["decode_spread"][1]
    assert b["models"]["q8_0"]["mb"] < b["models"]["f32"]["mb"]


@pytest.mark.slow
@needs_llama_cpp
def test_smollm2_pruned_nonuniform_perplexity_ratio_in_llama_cpp_matches_the_explorers(tmp_path):
    """SmolLM2 dense and cut non-uniformly (KV groups and neurons per layer), exported f16 with the
    source tokenizer: llama-perplexity on the BBC test text; the pruned/dense ratio within 5 % of
    the explorer's ratio on the same token chunks; a completion is generated; both decode."""
    from explorer.data import load_data
    from explorer.export import export
    from explorer.models import load_model
    from explorer.surgery import prune_block
    dense = load_model("smollm2-135m", device="cpu")
    text = "\n\n".join(load_data("bbc-news").texts["test"])
    (tmp_path / "bbc.txt").write_text(text)
    export(dense, "gguf-f16", tmp_path / "dense.gguf")
    ctx, chunks = 256, 6
    d_ours = explorer_perplexity(dense, text, ctx, chunks, gguf=tmp_path / "dense.gguf")
    d_cpp = llama_cpp.perplexity(tmp_path / "dense.gguf", tmp_path / "bbc.txt", ctx, chunks)
    for i in range(0, 30, 3):  # every third layer: 2 of 3 KV groups and 3/4 of the neurons
        prune_block(dense.adapter, dense.model, i, [0, 2], list(range(1152)))
    res = export(dense, "gguf-f16", tmp_path / "pruned.gguf")
    assert res["architecture"] == "deci" and res["check"]["ok"]
    p_ours = explorer_perplexity(dense, text, ctx, chunks, gguf=tmp_path / "pruned.gguf")
    p_cpp = llama_cpp.perplexity(tmp_path / "pruned.gguf", tmp_path / "bbc.txt", ctx, chunks)
    ours, theirs = p_ours["ppl"] / d_ours["ppl"], p_cpp["ppl"] / d_cpp["ppl"]
    assert ours > 1.02  # the cut costs something
    assert abs(theirs / ours - 1) < 0.05, (d_ours, d_cpp, p_ours, p_cpp)
    assert abs(math.log(d_cpp["ppl"] / d_ours["ppl"])) < 0.05  # and the absolute values agree too
    c = llama_cpp.completion(tmp_path / "pruned.gguf", "The government said", n=12)
    assert len(c["text"].strip()) > 5
    b = llama_cpp.bench({"dense": tmp_path / "dense.gguf", "pruned": tmp_path / "pruned.gguf"}, n_gen=16, rounds=1,
                        reps=1)
    assert all(m["decode_tokens_per_s"] > 0 for m in b["models"].values())


@pytest.mark.parametrize("extra, message", [
    (["--format", "onnx", "--gguf-quant", "q8_0"], "--gguf-quant applies to --format gguf"),
    (["--format", "gguf", "--gguf-quant", "q9"], "unknown quantisation type 'q9'"),
    (["--format", "gguf-f16", "--gguf-quant", "q4_k_m"], "not built.*make llama-cpp"),
])
def test_cli_refuses_bad_quant_requests_before_loading(tmp_path, monkeypatch, capsys, extra, message):
    import re

    from explorer.cli import main
    monkeypatch.setenv("EXPLORER_LLAMA_CPP", str(tmp_path / "no-build"))
    rc = main(["export", "--model", str(tmp_path / "never-loaded"), "--out", str(tmp_path / "m.gguf"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err) and "Traceback" not in err, err
    assert not list(tmp_path.glob("*.gguf"))
