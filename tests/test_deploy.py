"""Where a pruned model runs (explorer/deploy.py): every row of the table on a plan that hits it,
and each claim checked against the runtime where this machine has it: plain transformers loads
(or refuses) the saved folder, the shipped modeling file loads it, the GGUF export writes the
architecture the row names (or refuses the family), ONNX exports. vLLM is not installed here:
its row is checked on shapes (same query heads in every layer). The model card carries the table;
a saved folder and the in-memory model give the same rows, and asking never changes the model."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_lm
from explorer.deploy import facts_of, table_markdown, where_it_runs
from explorer.errors import ExplorerError
from explorer.models import save_model
from explorer.surgery import prune_block

X = torch.tensor([[5, 6, 7, 8, 9, 10]])


def _cut(lm, groups, neurons):
    for i, (g, n) in enumerate(zip(groups, neurons)):
        prune_block(lm.adapter, lm.model, i, list(range(g)), list(range(n)))
    return lm


PLANS = {
    "uniform": lambda: _cut(tiny_lm("llama"), [2, 2, 2], [32, 32, 32]),
    "nonuniform": lambda: _cut(tiny_lm("llama"), [1, 3, 2], [20, 64, 40]),
    "ffn-only": lambda: _cut(tiny_lm("llama"), [3, 3, 3], [32, 64, 40]),  # same query heads everywhere
    "bert": lambda: _cut(tiny_lm("bert"), [4, 4, 4], [30, 30, 30]),  # FFN only, uniform: BertConfig says it
}


def _rows(source, plan=None) -> dict:
    return {r["runtime"]: r for r in where_it_runs(source, plan)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("deploy")
    for name, make in PLANS.items():
        lm = make()
        out[name] = (lm, save_model(lm, root / name))
    return out


def _plain_load(d, task):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    return cls.from_pretrained(str(d)).eval()


@pytest.mark.parametrize("name", sorted(PLANS))
def test_transformers_rows_match_what_transformers_does(saved, name):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    lm, d = saved[name]
    rows = _rows(d)
    plain, remote = rows["transformers (plain)"], rows["transformers + shipped modeling file"]
    assert remote["works"]
    cls = AutoModelForCausalLM if lm.task == "causal-lm" else AutoModelForSequenceClassification
    if plain["works"]:
        assert name in ("uniform", "bert") and "from_pretrained(dir)" in plain["how"]
        back = _plain_load(d, lm.task)
        with torch.no_grad():
            torch.testing.assert_close(back(X).logits, lm.model(X).logits, atol=1e-5, rtol=1e-5)
        assert "flag changes nothing" in remote["how"]
    else:
        assert name in ("nonuniform", "ffn-only")
        assert ("KV groups: layer 0: 1, layer 1: 3" if name == "nonuniform" else
                "FFN neurons: layer 0: 32, layer 1: 64") in plain["why_not"]
        with pytest.raises(Exception):  # transformers refuses (unknown model type / size mismatch)
            _plain_load(d, lm.task)
        assert "trust_remote_code=True" in remote["how"] and "5.25" in remote["how"]
        back = cls.from_pretrained(str(d), trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(back(X).logits, lm.model(X).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_llama_cpp_row_matches_the_gguf_export(saved, name, tmp_path):
    from explorer.export_gguf import export_gguf
    lm, d = saved[name]
    row = _rows(d)["llama.cpp"]
    if name == "bert":
        assert not row["works"] and "bert" in row["why_not"] and "ONNX" in row["why_not"]
        with pytest.raises(ExplorerError, match="ONNX"):
            export_gguf(lm, tmp_path / "m.gguf")
        return
    assert row["works"]
    arch = "llama" if name == "uniform" else "deci"
    assert f"architecture `{arch}`" in row["how"]
    assert export_gguf(lm, tmp_path / "m.gguf")["architecture"] == arch
    # the quantisation advice follows the FFN widths: 32 divides 32 and 64, not 20 / 40
    assert ("multiples of 32, not 256" in row["how"]) == (name == "uniform")
    assert ("no multiples of 32" in row["how"]) == (name in ("nonuniform", "ffn-only"))


def test_llama_cpp_row_for_widths_the_k_quants_fit():
    lm = tiny_lm("llama")
    f = facts_of(lm)
    f["layers"] = [{"groups": 3, "heads": 6, "neurons": 512}, {"groups": 2, "heads": 4, "neurons": 256}]
    from explorer.deploy import rows_for
    row = next(r for r in rows_for(f) if r.runtime == "llama.cpp")
    assert row.works and "multiples of 256: k-quants" in row.how


@pytest.mark.parametrize("name", sorted(PLANS))
def test_vllm_row_needs_the_same_query_heads_in_every_layer(saved, name):
    lm, d = saved[name]
    row = _rows(d)["vLLM (DeciLMForCausalLM)"]
    heads = {b.attn.n_units * b.heads_per_group for b in lm.adapter.blocks(lm.model)}
    if name == "bert":
        assert not row["works"] and "LLaMA block" in row["why_not"]
    elif name == "nonuniform":
        assert len(heads) > 1 and not row["works"]
        assert "query heads: layer 0: 2, layer 1: 6" in row["why_not"]
    elif name == "ffn-only":  # per-layer FFN widths, 6 query heads everywhere: DeciLM's block_configs hold it
        assert heads == {6} and row["works"] and "6 query heads in every layer" in row["how"]
        assert "does not write" in row["how"]
    else:
        assert row["works"] and "LLaMA class" in row["how"]


def test_onnx_row_and_export(saved, tmp_path):
    from explorer.export import export
    for name in ("nonuniform", "bert"):
        lm, d = saved[name]
        row = _rows(d)["ONNX Runtime"]
        assert row["works"] and "--format onnx" in row["how"]
    res = export(saved["nonuniform"][0], "onnx", tmp_path / "m.onnx")
    assert res["check"]["ok"]


def test_other_families_refused_by_llama_cpp_with_the_reason():
    gpt2 = _rows(tiny_lm("gpt2"))
    assert not gpt2["llama.cpp"]["works"] and "gpt2" in gpt2["llama.cpp"]["why_not"]
    assert gpt2["ONNX Runtime"]["works"]
    from test_export_gguf import _tiny_family
    q3 = _rows(_tiny_family("qwen3"))
    assert not q3["llama.cpp"]["works"] and "q/k norms" in q3["llama.cpp"]["why_not"]
    assert _rows(_tiny_family("qwen2"))["llama.cpp"]["works"]
    lm = tiny_lm("llama")
    lm.model.config.hidden_act = "gelu"
    assert "SiLU" in _rows(lm)["llama.cpp"]["why_not"]


@pytest.mark.parametrize("name", sorted(PLANS))
def test_saved_folder_and_in_memory_model_agree_and_the_card_has_the_table(saved, name):
    lm, d = saved[name]
    before = lm.model.config.to_dict()
    mem, disk = where_it_runs(lm), where_it_runs(d)
    assert lm.model.config.to_dict() == before  # the plain-form test ran on a copy of the config
    assert [(r["runtime"], r["works"]) for r in mem] == [(r["runtime"], r["works"]) for r in disk]
    card = (d / "README.md").read_text()
    table = table_markdown(d)
    assert "## Where it runs" in card and table.strip() in card
    assert len(table.strip().splitlines()) == 2 + 5
    for r in disk:
        assert f"| {r['runtime']} | {'yes' if r['works'] else 'no'} |" in table


def test_a_folder_without_a_plan_is_refused(tmp_path):
    with pytest.raises(ExplorerError, match="explorer_plan.json"):
        where_it_runs(tmp_path)


def _bench_doc(ratio_cpp: float) -> dict:
    """A bench.deploy document with made-up figures: dense, -20 % (llama.cpp's ratio given), -20 % r256."""
    def files(ppl, mb, tps, fb):
        return {q: {"path": f"/x.{q}", "mb": mb * k, "architecture": "deci", "predicted_fallbacks": fb,
                    "fallback_tensors": None if q == "f16" else fb, "warnings": [], "ppl": ppl * (1 + 0.01 * i),
                    "ppl_error": 0.5, "decode_tokens_per_s": tps / k, "decode_spread": [tps / k - 1, tps / k + 1],
                    "decode_rounds": [tps / k] * 3}
                for i, (q, k) in enumerate((("f16", 1.0), ("q8_0", 0.53), ("q4_k_m", 0.35)))}
    w = [{"groups": 3, "neurons": 1536}] * 30
    rows = [{"name": "dense", "budget": 0.0, "round_to": 1, "params": 134.5e6, "val_ppl": 37.0, "explorer_ppl": 20.0,
             "tokens_scored": 4080, "widths": w, "files": files(20.0, 270, 60, 210), "completion": " it would"},
            {"name": "-20%", "budget": 0.2, "round_to": 1, "params": 120e6, "val_ppl": 45.0, "explorer_ppl": 25.0,
             "tokens_scored": 4080, "widths": [{"groups": 2, "neurons": 1100}] * 30,
             "files": files(20.0 * ratio_cpp, 230, 75, 240), "completion": " it had"},
            {"name": "-20% r256", "budget": 0.2, "round_to": 256, "params": 120e6, "val_ppl": 46.0,
             "explorer_ppl": 25.5, "tokens_scored": 4080, "widths": [{"groups": 2, "neurons": 1024}] * 30,
             "files": files(25.6, 230, 76, 180), "completion": " it has"}]
    return {"model": "smollm2-135m", "rows": rows, "ctx": 512, "chunks": 16, "n_gen": 64, "rounds": 5, "reps": 2,
            "threads": 2, "val_tokens": 4096, "samples": 16, "args": "",
            "llama_cpp": {"version": "b11434", "build": {"full_build_seconds": "1136", "jobs": "2", "tools": "t",
                                                         "host": "x86_64 2 cores"}},
            "meta": {"machine": {"cpu": "cpu", "torch_threads": 2}, "date": "d", "seconds": 60, "load_before": [1],
                     "load_after": [1]}}


def test_bench_deploy_report_states_the_goals_from_the_figures():
    from bench.deploy import render
    ok = render(_bench_doc(1.26))  # 1.26 against the explorer's 1.25: within 5 %
    assert "+0.80 %, goal within ±5 %: met" in ok and "| -20% r256 | Q4_K_M |" in ok
    assert "smaller and faster, spreads apart" in ok and "19 min" in ok
    assert "FFN widths 1024" in ok and "180 matrices fall back against 240" in ok
    bad = render(_bench_doc(1.40))
    assert "goal within ±5 %: NOT met" in bad


def test_widths_that_differ_are_named_heads_without_grouped_query_attention():
    from explorer.deploy import _differ
    bert = [{"groups": 3, "heads": 3, "neurons": 64}, {"groups": 6, "heads": 6, "neurons": 64}]
    llama = [{"groups": 1, "heads": 3, "neurons": 64}, {"groups": 3, "heads": 9, "neurons": 64}]
    assert _differ(bert, "groups") == "heads: layer 0: 3, layer 1: 6"  # a BERT has no KV groups
    assert _differ(llama, "groups") == "KV groups: layer 0: 1, layer 1: 3"
