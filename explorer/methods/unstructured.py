"""Unstructured pruning: magnitude (|W|) and Wanda (|W|·‖X‖), with the same per-layer
allocation as the structured methods.

Per stage k of K: the dense model's layer importance gives S_L (explorer.allocation at k/K of
the target: it grows with k in every layer, so masks only ever extend); each Linear weight
matrix of block L (q/k/v/o, up/gate/down, GPT-2's Conv1D) then loses the fraction
s_L = min(S_max, S_L · P_L / W_L) of its weights with the lowest scores (P_L: parameters of
the block, W_L: its Linear weights, so the *block's* parameter sparsity equals S_L although
layer norms and biases are not pruned):
  magnitude  score |W_ij|, lowest per matrix;
  wanda      score |W_ij| · ‖X_j‖₂ (X_j: input feature j of that Linear over the calibration
             tokens, padding excluded), lowest per output row (Wanda's comparison group).
`pattern="N:M"` (e.g. "2:4") instead keeps the N highest scores in every M consecutive input
weights of each row (sparsity 1 - N/M, the allocation is then not used).

Pruned weights are set to zero and their masks are re-applied after every optimiser step of
recovery (and after LoRA is merged), so training never regrows them. Masks do NOT make dense
kernels faster: the matrices keep their shapes, latency and FLOPs stay the dense ones; the
parameter counts in the records count non-zero weights.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterator

import torch

from ..allocation import allocate
from ..config import UnstructuredOptions
from ..errors import ExplorerError
from .base import MethodRun, block_linear_weights

NOTE = ("unstructured: pruned weights are zeros held by masks; the matrices keep their dense shapes, so dense "
        "kernels run no faster (latency and FLOPs are the dense model's); params count non-zero weights")


def parse_pattern(pattern) -> tuple[int, int] | None:
    if pattern in (None, "", "none"):
        return None
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
    except ValueError:
        raise ExplorerError(f"pattern must look like N:M (e.g. 2:4), got '{pattern}'") from None
    if not (0 < n < m):
        raise ExplorerError(f"pattern N:M needs 0 < N < M, got '{pattern}'")
    return n, m


def lowest_mask(scores: torch.Tensor, sparsity: float, per_row_dim: int | None = None) -> torch.Tensor:
    """Keep-mask that drops the round(sparsity·count) lowest scores, over the whole matrix or
    (per_row_dim = the input dimension) within each output row."""
    if per_row_dim is None:
        flat = scores.flatten()
        k = int(round(sparsity * flat.numel()))
        keep = torch.ones_like(flat, dtype=torch.bool)
        if k > 0:
            keep[torch.argsort(flat, stable=True)[:k]] = False
        return keep.view_as(scores)
    s = scores.movedim(per_row_dim, -1)  # (rows, in)
    k = int(round(sparsity * s.shape[-1]))
    keep = torch.ones_like(s, dtype=torch.bool)
    if k > 0:
        idx = torch.argsort(s, dim=-1, stable=True)[..., :k]
        keep.scatter_(-1, idx, False)
    return keep.movedim(-1, per_row_dim)


def nm_mask(scores: torch.Tensor, n: int, m: int, in_dim: int) -> torch.Tensor:
    """Keep the n highest scores in every m consecutive weights along the input dimension
    (a trailing partial group keeps its min(n, size) highest)."""
    s = scores.movedim(in_dim, -1)
    size = s.shape[-1]
    full = size - size % m
    keep = torch.zeros_like(s, dtype=torch.bool)
    if full:
        g = s[..., :full].reshape(*s.shape[:-1], full // m, m)
        top = torch.topk(g, n, dim=-1).indices
        kg = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True)
        keep[..., :full] = kg.reshape(*s.shape[:-1], full)
    if size > full:
        tail = s[..., full:]
        top = torch.topk(tail, min(n, tail.shape[-1]), dim=-1).indices
        keep[..., full:] = torch.zeros_like(tail, dtype=torch.bool).scatter_(-1, top, True)
    return keep.movedim(-1, in_dim)


class _InputNorms:
    """Σ x_j² per input feature of every Linear in the blocks over non-padding tokens."""

    def __init__(self, model, weights):
        self.sq: dict[str, torch.Tensor] = {}
        self.mask = None
        self.handles = [model.register_forward_pre_hook(self._top, with_kwargs=True)]
        mods = {id(getattr(m, "weight", None)): m for m in model.modules()}
        for block in weights:
            for name, w, _ in block:
                self.handles.append(mods[id(w)].register_forward_pre_hook(self._hook(name)))

    def _top(self, module, args, kwargs):
        self.mask = kwargs.get("attention_mask")

    def _hook(self, name):
        def hook(module, args):
            x = args[0].detach().float()
            if self.mask is not None and x.dim() == 3 and tuple(self.mask.shape) == tuple(x.shape[:2]):
                x = x * self.mask.unsqueeze(-1).to(x.dtype)
            v = (x ** 2).reshape(-1, x.shape[-1]).sum(0)
            self.sq[name] = self.sq[name] + v if name in self.sq else v
        return hook

    def close(self):
        for h in self.handles:
            h.remove()

    def norms(self) -> dict[str, torch.Tensor]:
        return {k: v.sqrt() for k, v in self.sq.items()}


class UnstructuredRun(MethodRun):
    """magnitude or wanda (option `score`), optional `pattern` "N:M"."""

    note = NOTE
    Options = UnstructuredOptions

    def __init__(self, *a, score: str = "magnitude", **kw):
        super().__init__(*a, **kw)
        if score not in ("magnitude", "wanda"):
            raise ExplorerError(f"unknown score '{score}': use magnitude or wanda")
        self.score = score
        self.method = score
        self.pattern = parse_pattern(getattr(self.opts, "pattern", None))  # lottery has no pattern
        if self.pattern and self.final_plan is not None:
            raise ExplorerError(f"pattern {self.opts.pattern} fixes the sparsity of every layer "
                                f"({1 - self.pattern[0] / self.pattern[1]:g}), so it cannot follow the per-layer "
                                "table set by hand: use pattern none, or reset the hand edits / drop --plan")
        self.masks: dict[str, torch.Tensor] = {}

    # --- masks ----------------------------------------------------------------------------
    def _train_masked(self, k, cfg, losses, teacher) -> Iterator[dict]:
        """Recovery with the masks held (explorer.recovery: re-applied after every full/KD step; a
        LoRA layer computes with (W + scale·B·A) ⊙ M), so what is trained is what is evaluated."""
        yield from self._train(k, cfg, losses, teacher, masks=self.masks)

    def _prune_to(self, weights, layer_sparsity: list[float], norms: dict | None) -> None:
        """Extend the masks so block L's Linear weights reach `layer_sparsity[L]` (or the N:M
        pattern). Already pruned weights stay pruned."""
        with torch.no_grad():
            for block, s in zip(weights, layer_sparsity):
                for name, w, in_dim in block:
                    score = w.detach().abs().float()
                    if norms is not None:
                        shape = [1, 1]
                        shape[in_dim] = -1
                        score = score * norms[name].to(score.device).view(shape)
                    old = self.masks.get(name)
                    if old is not None:
                        score = torch.where(old, score, torch.full_like(score, -1.0))
                    if self.pattern:
                        keep = nm_mask(score, *self.pattern, in_dim=in_dim)
                    else:
                        keep = lowest_mask(score, s, per_row_dim=in_dim if self.score == "wanda" else None)
                    if old is not None:
                        keep &= old
                    self.masks[name] = keep
                    w.mul_(keep.to(w.dtype))

    def _counts(self, weights) -> tuple[list[int], list[int]]:
        zeros = [int(sum((w == 0).sum().item() for _, w, _ in block)) for block in weights]
        total = [int(sum(w.numel() for _, w, _ in block)) for block in weights]
        return zeros, total

    def _record_unstructured(self, k, losses, t0, weights, allocated: list[float], **extra):
        ev = dict(self._eval())
        zeros, total = self._counts(weights)
        ev["params"] -= sum(zeros)
        ev["block_params"] -= sum(zeros)
        block = [b.params for b in self.lm.adapter.blocks(self.lm.model)]
        rec = self._record(k, losses, time.perf_counter() - t0, [z / p for z, p in zip(zeros, block)], ev,
                                weight_sparsity=[z / t for z, t in zip(zeros, total)],
                                allocated=[float(a) for a in allocated],
                                sparsity_reached=sum(zeros) / max(sum(total), 1),
                                pattern=":".join(map(str, self.pattern)) if self.pattern else None,
                                note=NOTE, **extra)
        self.summary.update({"sparsity_reached": rec.extra["sparsity_reached"],
                             "block_sparsity": sum(zeros) / max(sum(block), 1),
                             "weight_sparsity_per_layer": rec.extra["weight_sparsity"],
                             "pattern": rec.extra["pattern"], "score": self.score})
        return rec

    def _weight_sparsity(self, imp, k: int, K: int) -> tuple[list[float], list[float]]:
        """(S_L at step k of K, the Linear-weight sparsity that gives that block sparsity). S_L: the
        allocation at k/K of the target, or k/K of each layer's level in the hand-edited plan."""
        if self.final_plan is not None:  # the table set by hand: each layer's level, reached linearly
            levels = [lp.sparsity * k / K for lp in self.final_plan.layers]
        else:
            alloc = allocate(imp.normalized_by(self.allocation.normalization), imp.params,
                             replace(self.allocation, target=self.allocation.target * k / K), scores=imp.unit_scores())
            levels = [lp.sparsity for lp in alloc.layers]
        weights = block_linear_weights(self.lm)
        out = []
        for s, st, block in zip(levels, imp.params, weights):
            W = sum(w.numel() for _, w, _ in block)
            out.append(min(self.allocation.max_sparsity, s * st["block_params"] / max(W, 1)))
        return levels, out

    def _body(self) -> Iterator[dict]:
        lm, K = self.lm, self.prune.stages
        teacher = self.teacher
        dense_imp = None
        for k in range(1, K + 1):
            t0 = time.perf_counter()
            texts, labels = self._calibration(k)
            weights = block_linear_weights(lm)
            rec_norms = _InputNorms(lm.model, weights) if self.score == "wanda" else None
            try:
                imp = self._analyze(texts, labels, ("magnitude_l1",))
            finally:
                if rec_norms:
                    rec_norms.close()
            yield {"type": "analysis", "stage": k, "importance": imp}
            dense_imp = dense_imp or imp  # the allocation follows the dense model's Î_L (monotone over stages)
            allocated, ws = self._weight_sparsity(dense_imp, k, K)
            self._prune_to(weights, ws, rec_norms.norms() if rec_norms else None)
            losses: list[float] = []
            yield from self._train_masked(k, self.prune, losses, teacher)
            rec = self._record_unstructured(k, losses, t0, block_linear_weights(lm), allocated)
            yield self._stage_event(rec)


def _make(score: str):
    def make(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
        opts = opts or UnstructuredOptions()
        label = label or f"{score}{'' if opts.pattern == 'none' else ' ' + opts.pattern}"
        return UnstructuredRun(lm, data, analysis, allocation, prune, score=score, opts=opts, label=label, **run_kw)
    return make


make_magnitude, make_wanda = _make("magnitude"), _make("wanda")
