"""The external baseline: Torch-Pruning (`torch_pruning`, PyPI `torch-pruning`).

Its dependency graph finds the coupled parameters, its `GroupTaylorImportance` (or
`GroupMagnitudeImportance`) scores them and `tp.pruner.BasePruner` cuts them, uniformly in
every layer. To compare at equal parameters and with the same recovery budget, the per-layer
counts are those of the explorer's *uniform* allocation with the proportional attention/FFN
split (the explorer's own `uniform` runs use the salience split by default, so their widths
can differ inside a layer, never in total), the schedule is the same K stages, and recovery
between stages is `explorer.recovery.recover_steps`.

Model specifics:
  * BERT: whole attention heads (`num_heads` on query/key/value, `prune_num_heads=True`,
    `prune_head_dims=False`) and FFN channels; the hidden size is left alone by ignoring the
    layers whose outputs feed the residual stream. Transformers caches the head count on
    `BertSelfAttention` (`num_attention_heads`, `all_head_size`): after each cut those
    attributes are refreshed (the explorer's BERT adapter `after_prune` does exactly that).
  * LLaMA (GQA): Torch-Pruning's head pruning removes *query* heads inside each KV group and
    keeps every KV head, which cannot match KV-group pruning at equal parameters, so here it
    prunes FFN channels only (gate/up/down), with the FFN cut deep enough to remove the same
    number of parameters.

Counts: BasePruner removes ceil(r·H) heads and N - int(N·(1 - r)) channels of a fresh scope;
the ratios below are chosen so those formulas give exactly the planned counts.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import numpy as np

from explorer.allocation import allocate
from explorer.config import AllocationConfig, PruneConfig
from explorer.models import LoadedModel
from explorer.pruning import stage_sparsity
from explorer.recovery import recover_steps
from explorer.surgery import widths


def structure(lm: LoadedModel) -> list[dict]:
    """Per-layer structure in the form `allocate` takes (as importance analysis records it)."""
    out = []
    for b in lm.adapter.blocks(lm.model):
        out.append({"group_params": b.attn.params_per_unit, "neuron_params": b.mlp.params_per_unit,
                    "block_params": b.params, "groups": b.attn.n_units,
                    "heads_per_group": b.heads_per_group, "n_neurons": b.mlp.n_units})
    return out


def accumulate_grads(lm: LoadedModel, texts: list[str], labels, batch_size: int, max_length: int = 0) -> None:
    """Sum of dL/dW over the calibration batches (what GroupTaylorImportance reads)."""
    model = lm.model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    n = len(texts)
    for i in range(0, n, batch_size):
        bt = texts[i:i + batch_size]
        bl = labels[i:i + batch_size] if labels is not None else None
        batch = lm.encode(bt, bl, max_length=max_length or None)
        loss = model(**batch).loss * (len(bt) / n)
        loss.backward()


def _attention_modules(lm: LoadedModel, block) -> tuple[list, list]:
    """(q, k, v projections, modules whose outputs join the residual stream) of one block."""
    m = block.module
    family = lm.adapter.family
    if family == "BERT":
        sa = m.attention.self
        return [sa.query, sa.key, sa.value], [m.attention.output.dense, m.output.dense]
    if family == "LLaMA":
        sa = m.self_attn
        return [sa.q_proj, sa.k_proj, sa.v_proj], [sa.o_proj, m.mlp.down_proj]
    raise NotImplementedError(f"Torch-Pruning baseline not wired for {family}")


def _ffn_roots(lm: LoadedModel, block) -> tuple:
    m = block.module
    if lm.adapter.family == "BERT":
        return (m.intermediate.dense,)
    return (m.mlp.gate_proj, m.mlp.up_proj)


def tp_prune_step(lm: LoadedModel, plan, importance: str = "taylor") -> float:
    """Cut the model to the per-layer counts of `plan` (an Allocation) with Torch-Pruning;
    returns the seconds it took (graph tracing included)."""
    import torch
    import torch_pruning as tp
    t0 = time.perf_counter()
    model = lm.model
    # Torch-Pruning traces the autograd graph: gradients must be on for every parameter
    torch.set_grad_enabled(True)
    for p in model.parameters():
        p.requires_grad_(True)
    heads_ok = lm.adapter.family == "BERT"
    blocks = lm.adapter.blocks(model)
    num_heads, ratio_dict, head_ratio_dict, ignored = {}, {}, {}, []
    base = lm.adapter.base(model)
    for name, child in model.named_children():  # task heads and the pooler: never pruned
        if child is not base:
            ignored.append(child)
    if hasattr(base, "pooler") and base.pooler is not None:
        ignored.append(base.pooler)
    for b, lp in zip(blocks, plan.layers):
        qkv, residual = _attention_modules(lm, b)
        ignored += residual
        h_remove = b.attn.n_units - lp.keep_groups
        f_remove = b.mlp.n_units - lp.keep_neurons
        if heads_ok and h_remove > 0:
            for layer in qkv:
                num_heads[layer] = b.attn.n_units
            head_ratio_dict.update({layer: (h_remove - 0.5) / b.attn.n_units for layer in qkv})
            ratio_dict[tuple(qkv)] = 0.01  # needs > 0 for the head scope to run; head dims are kept
        else:
            ignored += qkv
        roots = _ffn_roots(lm, b)
        if f_remove > 0:
            ratio_dict[roots if len(roots) > 1 else roots[0]] = (f_remove - 0.25) / b.mlp.n_units
        else:
            ignored += list(roots)
    imp = tp.importance.GroupTaylorImportance() if importance == "taylor" else tp.importance.GroupMagnitudeImportance(p=2)
    ex = lm.encode(["a short example input for tracing", "and another one"])
    ex = {k: v for k, v in ex.items() if k != "labels"}
    pruner = tp.pruner.BasePruner(
        model, ex, importance=imp, global_pruning=False, pruning_ratio=0.0, pruning_ratio_dict=ratio_dict,
        ignored_layers=ignored, num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
        head_pruning_ratio=0.0, head_pruning_ratio_dict=head_ratio_dict or None,
        output_transform=lambda out: out.logits.sum())
    for group in pruner.step(interactive=True):
        group.prune()
    # transformers caches widths on the attention modules: refresh them from the weights
    for b in lm.adapter.blocks(model):
        lm.adapter.after_prune(b)
    got = [(w["groups"], w["neurons"]) for w in widths(lm.adapter, model)]
    want = [(lp.keep_groups, lp.keep_neurons) for lp in plan.layers]
    if got != want:
        n_groups = len(list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                     root_module_types=pruner.root_module_types)))
        raise RuntimeError(f"Torch-Pruning cut to {got[:2]}..., planned {want[:2]}... ({n_groups} prunable groups "
                           f"traced, grad enabled {torch.is_grad_enabled()}, importance {importance})")
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - t0


def tp_run(lm: LoadedModel, data, budget: float, prune: PruneConfig, calib_samples: int, calib_batch: int,
           seed: int, importance: str = "taylor", on_event: Callable[[dict], None] | None = None) -> dict:
    """Torch-Pruning in K stages to `budget` of the block parameters, with the explorer's
    recovery between stages (the same schedule and budget as the explorer's runs)."""
    original = lm.block_params
    heads_ok = lm.adapter.family == "BERT"
    losses: list[float] = []
    t0 = time.perf_counter()
    tp_seconds = 0.0
    for k in range(1, prune.stages + 1):
        stage_target = stage_sparsity(original, lm.block_params, budget, k, prune.stages)
        st = structure(lm)
        cfg = AllocationConfig(target=stage_target, mode="uniform", prune_attention=heads_ok, prune_mlp=True,
                               split="proportional")
        plan = allocate(np.zeros(len(st)), st, cfg)
        texts, labels = data.calibration(calib_samples, stage=k, seed=seed)
        if lm.task != "classification":
            labels = None
        if importance == "taylor":
            accumulate_grads(lm, texts, labels, calib_batch, 0)
        tp_seconds += tp_prune_step(lm, plan, importance)
        for step, loss in recover_steps(lm, data, replace(prune, seed=seed), stage=k):
            losses.append(loss)
        if on_event:
            on_event({"type": "stage", "stage": k, "removed": 1 - lm.block_params / original})
    lm.model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - t0, "tp_seconds": tp_seconds,
            "removed_fraction": 1 - lm.block_params / original}


def kept_units(base: LoadedModel, pruned: LoadedModel) -> list[tuple[list[int], list[int]]]:
    """Which attention groups and FFN neurons Torch-Pruning kept, per layer, found by matching
    the pruned rows to the dense ones (Torch-Pruning slices, it never changes a kept weight), so
    that the explorer's refit can start from Torch-Pruning's own choice."""
    import torch
    out = []
    for bd, bp in zip(base.adapter.blocks(base.model), pruned.adapter.blocks(pruned.model)):
        qd, qp = _attention_modules(base, bd)[0][0].weight, _attention_modules(pruned, bp)[0][0].weight
        width = bd.head_dim * bd.heads_per_group  # query rows per group
        groups = _match_rows(qd.reshape(-1, width * qd.shape[1]), qp.reshape(-1, width * qp.shape[1]))
        nd, np_ = _ffn_roots(base, bd)[0].weight, _ffn_roots(pruned, bp)[0].weight
        out.append((groups, _match_rows(nd, np_)))
        assert len(out[-1][0]) == bp.attn.n_units and len(out[-1][1]) == bp.mlp.n_units, "unmatched rows"
    return out


def _match_rows(dense, pruned) -> list[int]:
    """Indices i (increasing) with pruned[j] == dense[i_j]: each pruned row found exactly once."""
    index = {bytes(r.detach().cpu().float().numpy().tobytes()): i for i, r in enumerate(dense)}
    keep = [index[bytes(r.detach().cpu().float().numpy().tobytes())] for r in pruned]
    assert keep == sorted(keep) and len(set(keep)) == len(keep), "Torch-Pruning reordered or duplicated units"
    return keep
