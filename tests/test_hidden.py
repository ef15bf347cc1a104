"""Hidden-size (residual channel) pruning: removal = zeroing, what the norms change, save/reload."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from conftest import TINY, tiny_batch, tiny_data, tiny_lm
from explorer.adapters import adapter_for
from explorer.errors import ExplorerError, ModelError
from explorer.hidden import (channels_to_keep, cut_hidden, hidden_salience, hidden_spec, keep_count,
                             prune_hidden, prune_hidden_fraction)
from explorer.models import PLAN_FILE, load_model, save_model
from explorer.surgery import prune_block, widths

FAMILIES = ["bert", "distilbert", "gpt2", "llama"]


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _keep(H, name="bert"):
    """Drop every 4th channel from 1, and channel 2 too where the config allows a hidden size
    that is not a multiple of the head count (LlamaConfig does not: 48 -> 36 for LLaMA,
    32 -> 23 for the others)."""
    return [c for c in range(H) if c % 4 != 1 and (c != 2 or name == "llama")]


def _conv_out_dim(m):
    return 0 if isinstance(m, nn.Linear) else 1  # GPT-2 Conv1D weights are (in, out)


def _stream_writers(name, model):
    """(tensor, dim) of everything that writes the residual stream, listed independently of
    explorer.hidden: the embeddings' columns and the output projections' rows and biases."""
    out = []

    def proj(m):
        out.append((m.weight, _conv_out_dim(m)))
        if m.bias is not None:
            out.append((m.bias, 0))
    if name == "llama":
        out.append((model.model.embed_tokens.weight, 1))
        for layer in model.model.layers:
            proj(layer.self_attn.o_proj)
            proj(layer.mlp.down_proj)
    elif name == "bert":
        e = model.bert.embeddings
        out += [(e.word_embeddings.weight, 1), (e.position_embeddings.weight, 1), (e.token_type_embeddings.weight, 1)]
        for layer in model.bert.encoder.layer:
            proj(layer.attention.output.dense)
            proj(layer.output.dense)
    elif name == "distilbert":
        e = model.distilbert.embeddings
        out += [(e.word_embeddings.weight, 1), (e.position_embeddings.weight, 1)]
        for layer in model.distilbert.transformer.layer:
            proj(layer.attention.out_lin)
            proj(layer.ffn.lin2)
    else:
        out += [(model.transformer.wte.weight, 1), (model.transformer.wpe.weight, 1)]
        for layer in model.transformer.h:
            proj(layer.attn.c_proj)
            proj(layer.mlp.c_proj)
    return out


def _norms(model):
    return [(parent, attr) for parent in model.modules() for attr, child in parent.named_children()
            if isinstance(child, nn.LayerNorm) or type(child).__name__.endswith("RMSNorm")]


def _identity_norms(model):
    for parent, attr in _norms(model):
        setattr(parent, attr, nn.Identity())
    return model


@torch.no_grad()
def _scale_channels(name, model, channels, factor):
    """Multiply what writes `channels` of the stream and the norms' weight and bias there by
    `factor`: factor 0 zeroes them, a small one leaves them little energy."""
    idx = torch.tensor(channels)
    for t, dim in _stream_writers(name, model):
        t.index_copy_(dim, idx, t.index_select(dim, idx) * factor)
    for parent, attr in _norms(model):  # post-LN (BERT): their outputs are the stream
        norm = getattr(parent, attr)
        for t in (norm.weight, getattr(norm, "bias", None)):
            if t is not None:
                t[idx] *= factor


# --- removal equals zeroing ------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_keep_all_is_identity(name):
    lm = tiny_lm(name)
    batch = tiny_batch()
    before, n = _logits(lm.model, batch), lm.n_params
    H = lm.model.config.hidden_size
    prune_hidden(lm, torch.arange(H))
    assert torch.equal(_logits(lm.model, batch), before)
    assert lm.n_params == n and lm.model.config.hidden_size == H


@pytest.mark.parametrize("name", FAMILIES)
def test_removal_equals_zeroing_with_identity_norms(name):
    """Every linear part is exact: with the norms patched to nn.Identity, removing channels
    gives the same logits as zeroing what writes them in the dense model."""
    model = _identity_norms(TINY[name]())
    ad = adapter_for(model.config.model_type)
    H = model.config.hidden_size
    keep = _keep(H, name)
    drop = sorted(set(range(H)) - set(keep))
    zeroed = copy.deepcopy(model)
    _scale_channels(name, zeroed, drop, 0.0)
    n = sum(p.numel() for p in model.parameters())
    cut_hidden(ad, model, keep)
    assert model.config.hidden_size == len(keep)
    assert sum(p.numel() for p in model.parameters()) < n
    batch = tiny_batch()
    torch.testing.assert_close(_logits(model, batch), _logits(zeroed, batch), atol=1e-5, rtol=1e-4)


def test_rmsnorm_rescale_makes_removal_equal_zeroing():
    """LLaMA's RMSNorm averages x² over the channels: over h instead of H. Scaling the norm
    weights by sqrt(H/h) (rescale_norms, the default) makes removal exactly zeroing (eps 0);
    without it every norm output shrinks by sqrt(h/H)."""
    model = TINY["llama"]()
    for parent, attr in _norms(model):
        getattr(parent, attr).variance_epsilon = 0.0
    ad = adapter_for("llama")
    H = model.config.hidden_size
    keep = _keep(H, "llama")
    zeroed = copy.deepcopy(model)
    _scale_channels("llama", zeroed, sorted(set(range(H)) - set(keep)), 0.0)
    plain = copy.deepcopy(model)
    cut_hidden(ad, model, keep)
    cut_hidden(ad, plain, keep, rescale_norms=False)
    batch = tiny_batch()
    ref = _logits(zeroed, batch)
    torch.testing.assert_close(_logits(model, batch), ref, atol=1e-5, rtol=1e-4)
    assert (_logits(plain, batch) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_real_norms_change_little_when_removed_channels_carry_little_energy(name):
    """With real norms (LayerNorm statistics over fewer channels; RMSNorm vs the dense model)
    removal is approximate: bounded and small when the removed channels carry little energy
    (here 1e-3 of their scale), and the salience finds exactly those channels. Without the
    norm rescale the same cut changes the logits by about 10 % on these models."""
    lm = tiny_lm(name)
    H = lm.model.config.hidden_size
    weak = list(range(3, H, 4)) if name == "llama" else list(range(3, H, 5))  # 25 / 20 %, 1e-3 of their scale
    _scale_channels(name, lm.model, weak, 1e-3)
    batch = tiny_batch()
    ref = _logits(lm.model, batch)
    other = copy.deepcopy(lm)
    rep = prune_hidden_fraction(lm, len(weak) / H, tiny_data().texts["train"][:16])
    assert rep["kept"] == [c for c in range(H) if c not in weak]  # the salience picked them
    assert rep["removed_salience_share"] < 0.01
    err = (_logits(lm.model, batch) - ref).abs().max() / ref.abs().max()
    # pre-LN LayerNorm (GPT-2): the token's mean over the channels moves with their number
    assert err < (0.05 if name == "gpt2" else 0.005), float(err)
    # removing as many ordinary channels instead changes the output far more
    prune_hidden(other, [c for c in range(H) if c not in [w - 1 for w in weak]])
    err_other = (_logits(other.model, batch) - ref).abs().max() / ref.abs().max()
    assert err_other > 5 * err, (float(err), float(err_other))


# --- the pieces ------------------------------------------------------------------------------

def test_tied_head_stays_tied_and_shapes_follow():
    lm = tiny_lm("llama")
    H = lm.model.config.hidden_size
    prune_hidden(lm, _keep(H, "llama"))
    h = len(_keep(H, "llama"))
    m = lm.model
    assert m.lm_head.weight is m.model.embed_tokens.weight and m.lm_head.weight.shape == (120, h)
    assert m.model.embed_tokens.embedding_dim == h and m.model.norm.weight.shape == (h,)
    assert m.config.hidden_size == h and m.config.head_dim == 8
    for layer in m.model.layers:
        sa, mlp = layer.self_attn, layer.mlp
        assert sa.q_proj.weight.shape == (48, h) and sa.k_proj.weight.shape == (24, h) and sa.q_proj.in_features == h
        assert sa.o_proj.weight.shape == (h, 48) and sa.o_proj.out_features == h
        assert mlp.gate_proj.weight.shape == (64, h) and mlp.down_proj.weight.shape == (h, 64)
        assert mlp.hidden_size == h and layer.hidden_size == h
    assert all(p.requires_grad for p in m.parameters())
    assert lm.plan["hidden"] == {"dense": H, "size": h}
    lm.summary()  # widths per layer unchanged, still readable


def test_bert_pooler_keeps_its_output_width():
    lm = tiny_lm("bert")
    prune_hidden(lm, range(0, 32, 2))
    bert = lm.model.bert
    assert bert.pooler.dense.weight.shape == (32, 16)  # reads the stream, writes 32 pooled features
    assert lm.model.classifier.weight.shape == (2, 32)
    assert bert.embeddings.LayerNorm.normalized_shape == (16,)
    assert bert.encoder.layer[0].attention.self.attention_head_size == 8  # head size unchanged


def test_salience_ignores_padding_and_removes_its_hooks():
    lm = tiny_lm("llama")
    texts = tiny_data().texts["train"][:6]
    one = hidden_salience(lm, texts, batch_size=1)
    padded = hidden_salience(lm, texts, batch_size=6)
    assert one.shape == (48,) and one.dtype == torch.float32 and (one >= 0).all() and torch.isfinite(one).all()
    torch.testing.assert_close(one, padded, atol=1e-5, rtol=1e-4)
    assert not any(m._forward_hooks for m in lm.model.modules())


def test_keep_count_and_choice():
    assert keep_count(576, 0.1) == 518 and keep_count(576, 0.1, round_to=64) == 512
    assert keep_count(48, 0.0, round_to=64) == 48 and keep_count(48, 0.99, round_to=8) == 8
    assert channels_to_keep(torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0]), 2) == [1, 2]
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ExplorerError):
            keep_count(48, bad)


def test_bad_keep_lists_and_unknown_heads_are_refused():
    lm = tiny_lm("llama")
    for bad in ([], [0, 48], [-1, 3], range(35)):  # LlamaConfig: hidden_size % num_heads (6) == 0
        with pytest.raises(ExplorerError):
            prune_hidden(lm, bad)
    assert lm.model.config.hidden_size == 48 and "hidden" not in lm.plan
    from transformers import BertConfig, BertForMaskedLM
    mlm = BertForMaskedLM(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64))
    with pytest.raises(ModelError):
        hidden_spec(adapter_for("bert"), mlm)


# --- save and reload -------------------------------------------------------------------------

TEXTS = ["w5 w6 w7 w8", "w9 w10 w11", "w30 w40 w50 w60 w70"]


def _out(lm):
    with torch.no_grad():
        return lm.model(**{k: v for k, v in lm.encode(TEXTS).items() if k != "labels"}).logits


def _roundtrip(lm, path):
    before = _out(lm)
    again = load_model(str(save_model(lm, path)), device="cpu")
    assert again.model.config.hidden_size == lm.model.config.hidden_size
    assert widths(again.adapter, again.model) == widths(lm.adapter, lm.model)
    assert again.n_params == lm.n_params
    assert torch.allclose(_out(again), before, atol=1e-5)
    return again, json.loads((path / PLAN_FILE).read_text())


@pytest.mark.parametrize("name", FAMILIES)
def test_hidden_pruned_model_roundtrips(tmp_path, name):
    lm = tiny_lm(name)
    H = lm.model.config.hidden_size
    rep = prune_hidden_fraction(lm, 0.3, tiny_data().texts["train"][:16])
    assert rep["multiple"] == (6 if name == "llama" else 1)  # LlamaConfig wants a multiple of the heads
    assert rep["hidden_after"] == (36 if name == "llama" else 22) and rep["params_after"] < rep["params_before"]
    again, plan = _roundtrip(lm, tmp_path / "hidden")
    assert plan["hidden"] == {"dense": H, "size": rep["hidden_after"]}
    # uniform LLaMA still loads with plain from_pretrained (explicit head_dim); the others cannot
    assert plan["loads_with_plain_from_pretrained"] is (name == "llama")
    if name == "llama":
        assert again.model.lm_head.weight is again.model.model.embed_tokens.weight


def test_uniform_hidden_pruned_llama_loads_with_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM
    lm = tiny_lm("llama")
    prune_hidden(lm, _keep(48, "llama"))
    before = _out(lm)
    save_model(lm, tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")).eval()
    with torch.no_grad():
        out = plain(**{k: v for k, v in lm.encode(TEXTS).items() if k != "labels"}).logits
    torch.testing.assert_close(out, before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_heads_neurons_then_hidden_then_again_roundtrips(tmp_path, name):
    """Non-uniform head / neuron cuts, then hidden; reloaded, cut again (heads and hidden):
    the plan keeps the dense hidden size of the first cut and every step reloads exactly."""
    lm = tiny_lm(name)
    ad = lm.adapter
    H = lm.model.config.hidden_size
    for b in ad.blocks(lm.model):
        prune_block(ad, lm.model, b.index, list(range(b.attn.n_units - b.index)), list(range(0, 64, b.index + 2)))
    keep = _keep(H, name)
    prune_hidden(lm, keep)
    again, plan = _roundtrip(lm, tmp_path / "one")
    assert plan["hidden"] == {"dense": H, "size": len(keep)}
    prune_block(again.adapter, again.model, 0, [0, 1], None)
    prune_hidden(again, range(0, len(keep), 2))
    third, plan = _roundtrip(again, tmp_path / "two")
    assert plan["hidden"] == {"dense": H, "size": len(keep) // 2 + len(keep) % 2}
    assert plan["loads_with_plain_from_pretrained"] is False


def test_uniform_head_cut_whose_count_does_not_divide_the_hidden_size(tmp_path):
    """LlamaConfig refuses hidden_size % num_attention_heads != 0: a uniform cut to 4 heads on
    a 42-channel stream cannot go into config.json, so save_model leaves the config's head
    counts dense and the plan rebuilds the widths."""
    lm = tiny_lm("llama")
    prune_hidden(lm, range(42))
    for i in range(3):
        prune_block(lm.adapter, lm.model, i, [0, 2], None)  # 2 KV groups x 2 = 4 query heads
    again, plan = _roundtrip(lm, tmp_path / "uneven")
    assert plan["loads_with_plain_from_pretrained"] is False
    assert again.model.config.num_attention_heads == 6 and again.model.config.hidden_size == 42
    lm2 = tiny_lm("llama")
    prune_hidden(lm2, range(36))
    for i in range(3):
        prune_block(lm2.adapter, lm2.model, i, [0, 2], None)
    _, plan = _roundtrip(lm2, tmp_path / "even")
    assert plan["loads_with_plain_from_pretrained"] is True  # 36 % 4 == 0


def test_pruning_run_works_on_a_hidden_pruned_model():
    """Head/neuron pruning stages run on top of a hidden cut (the pipeline order of
    --prune-hidden followed by the usual stages)."""
    from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
    from explorer.pruning import PruningRun
    lm = tiny_lm("llama")
    data = tiny_data()
    prune_hidden_fraction(lm, 0.25, data.texts["train"][:16])
    before = widths(lm.adapter, lm.model)
    run = PruningRun(lm, data, AnalysisConfig(samples=8, batch_size=4), AllocationConfig(target=0.3, amplitude=0.2),
                     PruneConfig(stages=1, recovery="none"), timing=False)
    run.run()
    assert run.status == "done", run.error
    r = run.records[0]
    after = widths(lm.adapter, lm.model)
    # the stage removed its 30 % of the block parameters as they are after the hidden cut
    assert abs(r.removed_fraction - 0.3) < 0.03
    assert sum(w["params"] for w in after) == r.block_params < sum(w["params"] for w in before)
    assert lm.model.config.hidden_size == 36
    batch = {k: v for k, v in lm.encode(data.texts["val"][:2]).items() if k != "labels"}
    with torch.no_grad():
        assert torch.isfinite(lm.model(**batch).logits).all()  # (2, T, vocab): the cut model still runs


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_a_run_with_prune_hidden_counts_it_in_the_budget_and_reloads(name, tmp_path):
    """--prune-hidden in the pipeline: channels go first, the stages remove the rest of the parameter
    budget, the report says what the hidden cut did, and the saved model reloads with the same logits."""
    from conftest import tiny_data, tiny_lm
    from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
    from explorer.models import load_model, save_model
    from explorer.pruning import PruningRun
    lm = tiny_lm(name)
    before = lm.model.config.hidden_size
    run = PruningRun(lm, tiny_data(), AnalysisConfig(samples=8, batch_size=4), AllocationConfig(target=0.4),
                     PruneConfig(stages=1, recovery="reconstruct", prune_hidden=0.25, eval_samples=16), timing=False)
    rep = run.run()
    assert rep["status"] == "done", rep.get("error")
    assert rep["hidden"]["hidden_before"] == before > rep["hidden"]["hidden_after"] == lm.model.config.hidden_size
    assert rep["stages"][-1]["removed_fraction"] == pytest.approx(0.4, abs=0.05)  # the total block budget
    ids = lm.encode(["w5 w6 w7", "w8 w9"])
    ids = {k: v for k, v in ids.items() if k != "labels"}
    with torch.no_grad():
        ref = lm.model(**ids).logits
        back = load_model(str(save_model(lm, tmp_path / "m")))
        assert torch.allclose(back.model(**ids).logits, ref, atol=1e-5)


def test_cpu_snapshot_copies_to_host_and_keeps_ties():
    from conftest import tiny_lm
    from explorer.pruning import cpu_snapshot
    lm = tiny_lm("llama")
    model = lm.model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie_word_embeddings
    snap = cpu_snapshot(model)
    assert snap is not model and all(p.device.type == "cpu" for p in snap.parameters())
    assert snap.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(snap.state_dict().values(), model.state_dict().values()))
    # the tie survives: one tensor in the copy too (a change of the embeddings moves the head with it)
    assert snap.lm_head.weight is snap.model.embed_tokens.weight, "the snapshot untied the head from the embeddings"
    assert len(list(snap.parameters())) == len(list(model.parameters()))
    # a copy: no tensor shares memory with the model, and changing one leaves the other as it was
    ours = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not any(t.data_ptr() in ours for t in [*snap.parameters(), *snap.buffers()]), "shares the model's memory"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for p in snap.parameters():
            p.zero_()
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_timing_references_of_a_hidden_pruned_model_have_its_hidden_size(name):
    """The same-width reference and the latency cost model's one-block shell are built at the pruned
    hidden size (BERT / DistilBERT / GPT-2's head size would be wrong from the config alone)."""
    from explorer.evaluate import same_width_reference
    from explorer.latency import _Shell
    lm = tiny_lm(name)
    prune_block(lm.adapter, lm.model, 0, [0], list(range(8)))
    prune_hidden_fraction(lm, 0.3, tiny_data().texts["train"][:16])
    ref = same_width_reference(lm)
    assert ref.model.config.hidden_size == lm.model.config.hidden_size
    for key in ("groups", "neurons"):  # the pruned totals, spread evenly
        assert sum(w[key] for w in widths(ref.adapter, ref.model)) == sum(w[key] for w in widths(lm.adapter, lm.model))
    ids = lm.encode(["w1 w2 w3"])["input_ids"]
    with torch.no_grad():
        assert ref.model(input_ids=ids).logits.shape == lm.model(input_ids=ids).logits.shape
        shell = _Shell(lm)
        assert shell.block().head_dim == lm.adapter.block(lm.model, 0).head_dim
