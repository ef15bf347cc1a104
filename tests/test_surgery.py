"""Removing units gives the same outputs as zeroing them in the unpruned model."""
from __future__ import annotations

import copy

import torch

from explorer.adapters import adapter_for
from explorer.surgery import drop_layers, keep_units, prune_block, widths
from conftest import tiny_batch


def _zero_units(group, keep):
    drop = [u for u in range(group.n_units) if u not in keep]
    with torch.no_grad():
        for s in group.slices:
            for u in drop:
                s.param.narrow(s.dim, s.offset + u * s.unit_size, s.unit_size).zero_()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_pruned_equals_zeroed(tiny):
    name, model = tiny
    ad = adapter_for(model.config.model_type)
    zeroed = copy.deepcopy(model)
    plan = {}
    for b in ad.blocks(model):
        keep_a = [u for u in range(b.attn.n_units) if (u + b.index) % 3 != 0]
        keep_m = list(range(0, b.mlp.n_units, 2))
        plan[b.index] = (keep_a, keep_m)
    for b in ad.blocks(zeroed):
        _zero_units(b.attn, plan[b.index][0])
        _zero_units(b.mlp, plan[b.index][1])
    params_before = sum(p.numel() for p in model.parameters())
    for i, (ka, km) in plan.items():
        prune_block(ad, model, i, ka, km)
    assert sum(p.numel() for p in model.parameters()) < params_before
    for w, (ka, km) in zip(widths(ad, model), plan.values()):
        assert w["groups"] == len(ka) and w["neurons"] == len(km)
    batch = tiny_batch()
    torch.testing.assert_close(_logits(model, batch), _logits(zeroed, batch), atol=1e-5, rtol=1e-4)


def _out_projection(name, model, i):
    """Block i's attention output projection, found without the adapter: (module, input dim of its weight)."""
    if name == "llama":
        return model.model.layers[i].self_attn.o_proj, 1
    if name == "gpt2":
        return model.transformer.h[i].attn.c_proj, 0  # Conv1D: weight (in, out)
    if name == "bert":
        return model.bert.encoder.layer[i].attention.output.dense, 1
    return model.distilbert.transformer.layer[i].attention.out_lin, 1


def test_gqa_groups_carry_their_query_heads(tiny):
    """Keeping attention unit 1 of block 0 keeps its KV head and exactly the query heads that read it
    (HF's repeat_kv: query head h reads KV head h // heads_per_group, so unit 1 owns the contiguous query
    heads qpk..2·qpk-1). Checked without the adapter's slices: the cut model's logits equal the dense
    model's with every other query head's channels of the output projection's input zeroed, and for
    LLaMA the kept rows and columns are those heads' own."""
    name, model = tiny
    ad = adapter_for(model.config.model_type)
    b = ad.block(model, 0)
    qpk, hd, n = b.heads_per_group, b.head_dim, b.attn.n_units
    assert (qpk, n) == ((2, 3) if name == "llama" else (1, 4))
    dense = copy.deepcopy(model)
    kept = list(range(qpk * hd, 2 * qpk * hd))  # unit 1's query heads' channels (o_proj input)
    others = [c for c in range(n * qpk * hd) if c not in set(kept)]
    zeroed = copy.deepcopy(model)
    proj, in_dim = _out_projection(name, zeroed, 0)
    with torch.no_grad():
        proj.weight.index_fill_(in_dim, torch.tensor(others), 0.0)
    keep_units(b.attn, [1])
    ad.after_prune(ad.block(model, 0))
    b2 = ad.block(model, 0)
    assert b2.attn.n_units == 1 and widths(ad, model)[0]["heads"] == qpk
    cut_proj, _ = _out_projection(name, model, 0)
    assert cut_proj.weight.shape[in_dim] == qpk * hd
    batch = tiny_batch()
    torch.testing.assert_close(_logits(model, batch), _logits(zeroed, batch), atol=1e-5, rtol=1e-4)
    if name == "llama":  # the kept parameters are unit 1's: its query heads' rows, its KV head's rows
        sa, sd = model.model.layers[0].self_attn, dense.model.layers[0].self_attn
        assert torch.equal(sa.q_proj.weight, sd.q_proj.weight[kept])
        assert torch.equal(sa.k_proj.weight, sd.k_proj.weight[hd:2 * hd])
        assert torch.equal(sa.v_proj.weight, sd.v_proj.weight[hd:2 * hd])
        assert torch.equal(sa.o_proj.weight, sd.o_proj.weight[:, kept])


def test_drop_layers_keeps_model_working(tiny):
    """Dropping block 1 gives exactly the model whose block 1 passes its input through unchanged."""
    name, model = tiny
    ad = adapter_for(model.config.model_type)
    skipped = copy.deepcopy(model)

    def identity(module, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
    ad.layers(skipped)[1].register_forward_hook(identity, with_kwargs=True)
    drop_layers(ad, model, [1])
    assert len(ad.layers(model)) == 2 and model.config.num_hidden_layers == 2
    out = _logits(model, tiny_batch())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _logits(skipped, tiny_batch()), atol=1e-5, rtol=1e-4)


def test_generate_after_pruning():
    from conftest import tiny_llama
    model = tiny_llama()
    ad = adapter_for("llama")
    for i in range(3):
        prune_block(ad, model, i, [i % 3], list(range(10 + i)))
    drop_layers(ad, model, [0])
    prompt = torch.tensor([[5, 6, 7]])
    out = model.generate(prompt, max_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)  # with the KV cache of the pruned, shallower model
    ids = prompt
    with torch.no_grad():  # greedy decoding by hand, every step recomputed without a cache
        for step in range(5):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[step], logits, atol=1e-5, rtol=1e-4)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, ids)
