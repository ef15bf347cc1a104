"""Physical removal of units: slices weight matrices so the model really gets smaller.

Everything here works over the adapters' `ParamSlice`s, so one function serves every
architecture; adapters then refresh the attributes that cache widths.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .adapters import Adapter, UnitGroup
from .adapters.base import sync_linear_attrs


def _keep_index(size: int, slices, n_units: int, keep: list[int]) -> torch.Tensor:
    """Indices to keep along one dimension of one parameter of `size`, given the slices
    (possibly several sections, as in GPT-2's fused q|k|v) that map units onto it. Built on
    the CPU (many small writes); the caller moves it to the parameter's device once."""
    mask = torch.ones(size, dtype=torch.bool, device="cpu")
    drop = sorted(set(range(n_units)) - set(keep))
    for s in slices:
        for u in drop:
            mask[s.offset + u * s.unit_size: s.offset + (u + 1) * s.unit_size] = False
    return mask.nonzero().squeeze(1)


@torch.no_grad()
def keep_units(group: UnitGroup, keep: list[int]) -> None:
    """Keep units `keep` (indices into 0..n_units-1) of `group`, removing the others from
    every coupled parameter. Gradients and optimiser state do not survive."""
    keep = sorted(set(int(k) for k in keep))
    assert keep and 0 <= keep[0] and keep[-1] < group.n_units, f"bad keep list for {group.kind}: {keep}"
    by_param: dict[tuple[int, str], list] = defaultdict(list)
    for s in group.slices:
        by_param[(id(s.module), s.name)].append(s)
    removed = group.n_units - len(keep)
    for slices in by_param.values():
        s0 = slices[0]
        p = s0.param
        old_shape = list(p.shape)
        idx = _keep_index(p.shape[s0.dim], slices, group.n_units, keep).to(p.device)
        new = p.data.index_select(s0.dim, idx).contiguous()
        expected = old_shape[s0.dim] - removed * sum(s.unit_size for s in slices)
        assert new.shape[s0.dim] == expected, (s0.name, tuple(new.shape), expected)
        setattr(s0.module, s0.name, nn.Parameter(new, requires_grad=p.requires_grad))
        sync_linear_attrs(s0.module)


def prune_block(adapter: Adapter, model: nn.Module, index: int,
                keep_attn: list[int] | None, keep_mlp: list[int] | None) -> None:
    """Prune block `index` to the given attention units (KV groups) and MLP neurons.
    `None` leaves that part as it is."""
    block = adapter.block(model, index)
    before = block.params
    if keep_attn is not None and len(keep_attn) < block.attn.n_units:
        keep_units(block.attn, keep_attn)
    if keep_mlp is not None and len(keep_mlp) < block.mlp.n_units:
        keep_units(block.mlp, keep_mlp)
    adapter.after_prune(adapter.block(model, index))
    after = adapter.block(model, index)
    n_attn = len(keep_attn) if keep_attn is not None else block.attn.n_units
    n_mlp = len(keep_mlp) if keep_mlp is not None else block.mlp.n_units
    assert after.attn.n_units == n_attn and after.mlp.n_units == n_mlp, "surgery left wrong widths"
    expected = before - (block.attn.n_units - n_attn) * block.attn.params_per_unit \
        - (block.mlp.n_units - n_mlp) * block.mlp.params_per_unit
    assert after.params == expected, (after.params, expected)


def drop_layers(adapter: Adapter, model: nn.Module, drop: list[int]) -> None:
    """Remove whole blocks (ShortGPT style)."""
    n = len(adapter.layers(model))
    keep = [i for i in range(n) if i not in set(drop)]
    assert keep, "cannot drop every block"
    adapter.set_layers(model, keep)
    assert len(adapter.layers(model)) == len(keep)


def widths(adapter: Adapter, model: nn.Module) -> list[dict]:
    """Current per-layer widths: attention units, query heads, MLP neurons, parameters."""
    out = []
    for b in adapter.blocks(model):
        out.append({"groups": b.attn.n_units, "heads": b.attn.n_units * b.heads_per_group,
                    "neurons": b.mlp.n_units, "params": b.params})
    return out


def reshape_to(adapter: Adapter, model: nn.Module, layer_widths: list[dict]) -> None:
    """Give a freshly built (dense) model the per-layer widths of a saved plan, keeping the
    first units; the weights are then overwritten by the saved state dict."""
    assert len(layer_widths) == len(adapter.layers(model)), "plan and model disagree on depth"
    for i, w in enumerate(layer_widths):
        prune_block(adapter, model, i, list(range(w["groups"])), list(range(w["neurons"])))


@contextmanager
def zeroed_units(lm, keeps: list[tuple[list[int], list[int]]]) -> Iterator:
    """The model as if the units outside `keeps` (per layer: attention units, neurons) were
    removed, without a copy: the removed units' input channels of each block's output projection
    (o_proj / down_proj ...) are zeroed, which makes their contribution exactly zero, as a cut
    does; the saved channels (a slice per projection, never a model) are put back on exit."""
    saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []  # (weight, dim, channels, old values)
    try:
        with torch.no_grad():
            for block, keep in zip(lm.adapter.blocks(lm.model), keeps):
                for group, kept in zip((block.attn, block.mlp), keep):
                    if kept is None:
                        continue
                    gone = sorted(set(range(group.n_units)) - set(kept))
                    if not gone:
                        continue
                    u = group.act_unit_size
                    ch = torch.tensor([c for g in gone for c in range(g * u, (g + 1) * u)],
                                      device=group.out_module.weight.device)  # (removed channels,)
                    w = group.out_module.weight
                    dim = 1 if isinstance(group.out_module, torch.nn.Linear) else 0  # Linear (out, in); Conv1D (in, out)
                    assert w.shape[dim] == group.n_units * u, "unit channels do not match the output projection"
                    saved.append((w, dim, ch, w.index_select(dim, ch).clone()))
                    w.index_fill_(dim, ch, 0.0)
        yield lm
    finally:
        with torch.no_grad():
            for w, dim, ch, old in reversed(saved):
                w.index_copy_(dim, ch, old)
