"""Reconstruction: cut each block to its plan and refit what remains, in closed form, so
that the pruned block reproduces the dense one on calibration tokens (no training).

For each block's output projections (LLaMA o_proj / down_proj, BERT attention.output.dense
/ output.dense, DistilBERT out_lin / lin2, GPT-2 attn.c_proj / mlp.c_proj: `UnitGroup.out_module`),
with x the projection's C input channels (the units' activations), K the kept channels,
W (out, C) its weight and b its bias, the refit solves the weighted ridge least squares

    W', b' = argmin Σ_t w_t ‖W x_t + b − W' x_t,K − b'‖² + λ Σ_k D_k ‖W'_:,k − W_:,k‖²,   D = diag G_KK

from the Gram statistics G = Σ w x xᵀ, s = Σ w x, n = Σ w (float64). The free bias is
eliminated by centring: W' = (W Ĝ_:,K + λ W_:,K D)(Ĝ_KK + λD)⁻¹ with Ĝ = G − s sᵀ/n, and
b' = b + (W s − W' s_K)/n, which absorbs the removed channels' mean contribution W_:,R E[x_R]
(FLAP's bias compensation; λ = ∞ gives exactly that with W' = W_:,K). The ridge pulls toward
the original weights, so a refit never raises the calibration error above plain removal. λ is
relative to each channel's energy (scale-free); with `lam = 0` it is chosen per projection
from LAMBDA_GRID (∞ included) by the error on held-out calibration samples (every HOLDOUT-th),
then the refit uses all samples.

Token weights (`weighting="relative"`): w_t = 1/(e_t + ē), e_t the dense output's mean square
at token t, so the few tokens with massive activations do not decide the fit for all others.
Unit choice (`select="obs"`): the plan's counts are kept, the units re-chosen per projection by
greedy structured Optimal Brain Surgeon on the same statistics (`obs_select`).

Layer-sequential (as SparseGPT, Wanda, FLAP): the calibration stream enters block i as the
output of the already cut and refit blocks 0..i-1; within a block, attention is cut and
refit first, and the MLP's statistics are taken behind the refit attention. The target is
the dense weights applied to the pruned path's own inputs (the dense block i on that stream);
so these statistics cannot come from the analysis pass, which sees the dense stream.
Memory: the stream (tokens x hidden, with each batch's block kwargs) and one C x C Gram
(plus H⁻¹ for OBS) at a time; no second model.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .adapters import Adapter, UnitGroup
from .errors import Cancelled
from .models import LoadedModel
from .surgery import keep_units

LAMBDA_GRID = (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, math.inf)
HOLDOUT = 5  # every 5th calibration sample is held out to choose λ


# --- the closed form -----------------------------------------------------------------------

@dataclass
class GramStats:
    """Σ x xᵀ (C, C), Σ x (C,), token count: the refit needs nothing else."""

    G: torch.Tensor
    s: torch.Tensor
    n: float

    @classmethod
    def zeros(cls, c: int, device=None) -> "GramStats":
        return cls(torch.zeros(c, c, dtype=torch.float64, device=device),
                   torch.zeros(c, dtype=torch.float64, device=device), 0.0)

    def add(self, x: torch.Tensor, w: torch.Tensor | None = None) -> None:
        """x: (N, C) tokens, w: (N,) token weights or None (all 1). One matmul per batch in
        float32 (bfloat16 / float16 input cast up first, float64 input stays float64), summed in
        float64 where the totals live: G += Σ w x xᵀ, s += Σ w x."""
        xf = x if x.dtype == torch.float64 else x.float()
        xw = xf if w is None else xf * w.to(xf.dtype)[:, None]  # (N, C)
        self.G += (xw.T @ xf).to(self.G.device, torch.float64)
        self.s += xw.sum(0).to(self.s.device, torch.float64)
        self.n += float(x.shape[0]) if w is None else float(w.sum())

    def __add__(self, other: "GramStats") -> "GramStats":
        return GramStats(self.G + other.G, self.s + other.s, self.n + other.n)


def out_weight(m: nn.Module) -> torch.Tensor:
    """Weight as (out, in): nn.Linear stores it so; GPT-2's Conv1D stores (in, out)."""
    return m.weight if isinstance(m, nn.Linear) else m.weight.T


def set_out_weight(m: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Write a refit (out, in) weight and bias back in the module's own layout, dtype and device
    (the refit is float64; a bfloat16 model gets bfloat16 weights back)."""
    p = m.weight
    new = (w if isinstance(m, nn.Linear) else w.T).to(p.device, p.dtype).contiguous()
    assert new.shape == p.shape, (tuple(new.shape), tuple(p.shape))
    m.weight = nn.Parameter(new, requires_grad=p.requires_grad)
    if b is not None:
        assert m.bias is not None and m.bias.shape == b.shape, "refit bias does not fit the module"
        m.bias = nn.Parameter(b.to(m.bias.device, m.bias.dtype).contiguous(), requires_grad=m.bias.requires_grad)


@dataclass
class Problem:
    """What every λ shares for one projection and one set of statistics (float64):
    W_:,K (out, K), G_KK (K, K), W G_:,K (out, K), s_K (K,), W s (out,), n."""

    WK: torch.Tensor
    GKK: torch.Tensor
    WGK: torch.Tensor
    sK: torch.Tensor
    Ws: torch.Tensor
    n: float
    W: torch.Tensor
    G: torch.Tensor

    @classmethod
    def of(cls, W: torch.Tensor, st: GramStats, keep: torch.Tensor) -> "Problem":
        GK = st.G[:, keep]  # (C, K)
        return cls(W[:, keep], GK[keep], W @ GK, st.s[keep], W @ st.s, st.n, W, st.G)

    def energy(self) -> float:
        """tr(W G Wᵀ): the part of the error no refit changes (for reporting only)."""
        return float((self.W @ self.G * self.W).sum())


def refit(W: torch.Tensor, b: torch.Tensor | None, st: GramStats | Problem, keep: torch.Tensor, lam: float,
          fit_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ridge least-squares refit above. W: (out, C) dense weight (float64), b: (out,) or
    None, keep: (C_K,) kept channel indices; `st` the statistics (or their Problem). The
    free bias is eliminated by centring: b' = b + (W s − W' s_K)/n, and W' solves the ridge
    on the centred Gram matrix. Returns (W' (out, C_K), b' or None), float64."""
    P = st if isinstance(st, Problem) else Problem.of(W, st, keep)
    n = max(P.n, 1.0)
    if math.isinf(lam):  # plain removal, the bias alone compensates the removed channels' mean
        return (P.WK, (b if b is not None else 0) + (P.Ws - P.WK @ P.sK) / n) if fit_bias else (P.WK, b)
    diag = P.GKK.diagonal()
    D = diag.clamp_min(1e-12 * max(float(diag.max()), 1e-30))  # (K,) ridge scale: each channel's energy
    A, rhs = P.GKK, P.WGK  # (K, K), (out, K)
    if fit_bias:
        A = A - torch.outer(P.sK, P.sK) / n  # centred: Σ (x_K − x̄_K)(x_K − x̄_K)ᵀ
        rhs = rhs - torch.outer(P.Ws, P.sK) / n
    A = A + torch.diag(lam * D)  # symmetric positive definite
    rhs = rhs + lam * P.WK * D
    Wn = torch.cholesky_solve(rhs.T, torch.linalg.cholesky(A)).T  # W' = rhs A⁻¹   (out, K)
    if not fit_bias:
        return Wn, b
    return Wn, (b if b is not None else 0) + (P.Ws - Wn @ P.sK) / n


def error(W: torch.Tensor, b: torch.Tensor | None, Wn: torch.Tensor, bn: torch.Tensor | None,
          st: GramStats | Problem, keep: torch.Tensor, constant: bool = True) -> float:
    """Σ_tokens ‖(W x + b) − (W' x_K + b')‖² from the Gram statistics alone (float64);
    without the `constant` tr(W G Wᵀ) when only differences between refits matter."""
    P = st if isinstance(st, Problem) else Problem.of(W, st, keep)
    e = -2 * (P.WGK * Wn).sum() + (Wn @ P.GKK * Wn).sum()
    c = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
    if b is not None:
        c = c + b
    if bn is not None:
        c = c - bn
    e = e + 2 * c @ (P.Ws - Wn @ P.sK) + P.n * (c @ c)
    return float(e) + (P.energy() if constant else 0.0)


def choose_lambda(W, b, fit: GramStats, held: GramStats, keep, fit_bias: bool) -> tuple[float, dict]:
    """λ from LAMBDA_GRID with the least error on the held-out samples' statistics."""
    P_fit, P_held = Problem.of(W, fit, keep), Problem.of(W, held, keep)
    errs = {}
    for lam in LAMBDA_GRID:
        Wn, bn = refit(W, b, P_fit, keep, lam, fit_bias)
        errs[lam] = error(W, b, Wn, bn, P_held, keep, constant=False)
    best = min(errs, key=lambda k: (errs[k], -k))  # ties: the stronger ridge
    return best, errs


# --- the layer-sequential pass ---------------------------------------------------------------

class _Caught(Exception):
    pass


@dataclass
class BlockInputs:
    """The calibration stream at one block: per batch the block's (args, kwargs), the
    hidden states inside them, and which tokens count (mask) and are held out."""

    args: list[tuple]
    kwargs: list[dict]
    masks: list[torch.Tensor]  # (B, T) bool, real tokens
    held: list[torch.Tensor]  # (B,) bool, held-out samples

    def hidden(self, i: int) -> torch.Tensor:
        return self.args[i][0] if self.args[i] else self.kwargs[i]["hidden_states"]

    def set_hidden(self, i: int, h: torch.Tensor) -> None:
        if self.args[i]:
            self.args[i] = (h,) + tuple(self.args[i][1:])
        else:
            self.kwargs[i]["hidden_states"] = h


def capture_inputs(lm: LoadedModel, texts: list[str], batch_size: int, max_length: int | None) -> BlockInputs:
    """Run the model up to its first block for every batch and keep that block's inputs."""
    first = lm.adapter.layers(lm.model)[0]
    got: list = []

    def hook(module, args, kwargs):
        got.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                    {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kwargs.items()}))
        raise _Caught()

    inp = BlockInputs([], [], [], [])
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start, batch in lm.forward_batches(texts, batch_size, max_length):
            try:
                lm.model(**batch)
            except _Caught:
                pass
            args, kwargs = got.pop()
            kwargs.pop("past_key_values", None)  # no cache: each block is called on its own
            inp.args.append(args)
            inp.kwargs.append(kwargs)
            inp.masks.append(batch["attention_mask"].bool())
            idx = torch.arange(start, start + batch["attention_mask"].shape[0], device=lm.device)
            inp.held.append(idx % HOLDOUT == HOLDOUT - 1)
    finally:
        handle.remove()
    return inp


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def token_weights(m: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) weights 1 / (e_t + ē) with e_t the mean square of the dense projection's output
    at token t and ē its mean over the batch's real tokens: each token's error counts relative
    to its own output, so the few tokens with massive activations (BERT's [CLS]/[SEP], a
    decoder's first token) no longer decide the refit for all the others."""
    dt = torch.promote_types(x.dtype, torch.float32)  # a bfloat16 model's statistics in float32
    W = out_weight(m).detach().to(dt)  # (out, C)
    y = x.to(dt) @ W.T  # (B, T, out)
    if m.bias is not None:
        y = y + m.bias.detach().to(dt)
    e = y.pow(2).mean(-1)  # (B, T)
    e_bar = e[mask].mean().clamp_min(1e-30)
    return 1.0 / (e + e_bar)


def _forward_block(layer: nn.Module, inp: BlockInputs, collect: UnitGroup | None = None,
                   update: bool = False, auto: bool = True, relative: bool = False) -> tuple[GramStats, GramStats] | None:
    """One pass of the stream through `layer`. With `collect`, accumulates the Gram
    statistics of that group's out_module input (fit and held-out samples apart when `auto`);
    with `update`, the stream moves on to the layer's outputs."""
    stats = None
    handle = None
    if collect is not None:
        c = collect.n_units * collect.act_unit_size
        dev = collect.out_module.weight.device
        stats = (GramStats.zeros(c, dev), GramStats.zeros(c, dev))
        cur: dict = {}

        def hook(module, args):
            x = args[0]  # (B, T, C)
            assert x.shape[-1] == c, (tuple(x.shape), c)
            m, held = cur["mask"], cur["held"]
            w = token_weights(module, x, m) if relative else None  # (B, T) or None
            fit_tok = m & ~held[:, None] if auto else m  # (B, T)
            stats[0].add(x[fit_tok], None if w is None else w[fit_tok])
            if auto:
                held_tok = m & held[:, None]
                stats[1].add(x[held_tok], None if w is None else w[held_tok])
            if not update:
                raise _Caught()  # nothing after this projection is needed
        handle = collect.out_module.register_forward_pre_hook(hook)
    try:
        for i in range(len(inp.args)):
            if collect is not None:
                cur["mask"], cur["held"] = inp.masks[i], inp.held[i]
            try:
                out = _first(layer(*inp.args[i], **inp.kwargs[i]))
            except _Caught:
                continue
            if update:
                inp.set_hidden(i, out.detach())
    finally:
        if handle is not None:
            handle.remove()
    return stats


def _channels(group: UnitGroup, keep: list[int]) -> torch.Tensor:
    """Kept input channels of the out_module for kept units (each unit owns act_unit_size)."""
    size = group.act_unit_size
    dev = group.out_module.weight.device
    return torch.cat([torch.arange(u * size, (u + 1) * size, device=dev) for u in sorted(keep)])


def obs_select(W: torch.Tensor, st: GramStats, n_units: int, size: int, n_keep: int, centred: bool,
               damp: float = 0.01) -> list[int]:
    """Which `n_keep` of `n_units` units (each `size` consecutive input channels) to keep so
    that the least-squares refit loses least: greedy structured Optimal Brain Surgeon (as
    ZipLM, and SparseGPT for whole units). With H = G (+ damp·mean diag G, centred when the
    bias is refit) and H⁻¹ kept up to date, removing unit u costs tr(W_u (H⁻¹_uu)⁻¹ W_uᵀ) after
    the optimal update of the others; remove the cheapest (neurons: the cheapest k at once,
    jointly), update W and H⁻¹, repeat."""
    G = st.G - torch.outer(st.s, st.s) / max(st.n, 1.0) if centred else st.G  # (C, C)
    H = G + torch.eye(G.shape[0], dtype=G.dtype, device=G.device) * damp * float(G.diagonal().mean())
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))  # (C, C)
    Wc = W.clone()  # (out, C), updated as units go
    alive = list(range(n_units))
    while len(alive) > n_keep:
        if size == 1:  # neurons: remove the cheapest few at once (jointly exact), ~16 rounds a layer
            idx = torch.tensor(alive, device=W.device)
            cost = Wc[:, idx].pow(2).sum(0) / Hinv.diagonal()[idx]  # (n_alive,) single-removal costs
            k = min(len(alive) - n_keep, max(1, math.ceil((n_units - n_keep) / 16)))
            R = idx[cost.argsort()[:k]]  # (k,)
            inv = torch.linalg.inv(Hinv[R][:, R])  # (k, k)
            Wc -= Wc[:, R] @ inv @ Hinv[R]  # OBS update of the remaining weights
            Hinv -= Hinv[:, R] @ inv @ Hinv[R]
            gone = set(R.tolist())
            alive = [j for j in alive if j not in gone]
            continue
        costs = []
        for u in alive:
            c = slice(u * size, (u + 1) * size)
            costs.append(float((Wc[:, c] @ torch.linalg.inv(Hinv[c, c]) * Wc[:, c]).sum()))
        u = alive[min(range(len(alive)), key=costs.__getitem__)]
        c = slice(u * size, (u + 1) * size)
        inv = torch.linalg.inv(Hinv[c, c])  # (size, size)
        Wc -= Wc[:, c] @ inv @ Hinv[c]
        Hinv -= Hinv[:, c] @ inv @ Hinv[c]
        alive.remove(u)
    return alive


def _refit_group(group: UnitGroup, keep: list[int], stats: tuple[GramStats, GramStats],
                 lam: float, fit_bias: bool, select: str = "given") -> dict:
    """Cut `group` to `keep` and refit its out_module from the dense weights and the stats.
    With select "obs" only len(keep) counts: the units are chosen by `obs_select` on the fit
    samples' statistics."""
    m = group.out_module
    W = out_weight(m).detach().double()  # (out, C) dense
    b = m.bias.detach().double() if m.bias is not None else None
    fit_bias = fit_bias and m.bias is not None
    fit, held = stats
    if select == "obs":
        keep = obs_select(W, fit, group.n_units, group.act_unit_size, len(keep), centred=fit_bias)
    keep_ch = _channels(group, keep)
    chosen, errs = (lam, {}) if lam > 0 else choose_lambda(W, b, fit, held, keep_ch, fit_bias)
    P = Problem.of(W, fit + held if lam <= 0 else fit, keep_ch)
    Wn, bn = refit(W, b, P, keep_ch, chosen, fit_bias)
    energy = P.energy()
    base = error(W, b, P.WK, b, P, keep_ch, constant=False) + energy  # plain removal
    after = error(W, b, Wn, bn, P, keep_ch, constant=False) + energy
    keep_units(group, keep)
    set_out_weight(m, Wn, bn if fit_bias else None)
    return {"kind": group.kind, "kept": len(keep), "of": group.n_units, "lambda": chosen, "units": list(keep),
            "error_removed": base, "error_refit": after, "tokens": P.n,
            "heldout_errors": {str(k): v for k, v in errs.items()}}


@dataclass
class ReconstructReport:
    seconds: float = 0.0
    tokens: int = 0
    layers: list[list[dict]] = field(default_factory=list)  # per layer, per refit projection

    def to_json(self) -> dict:
        return {"seconds": round(self.seconds, 3), "tokens": self.tokens, "layers": self.layers}

    @property
    def error_ratio(self) -> float:
        """Σ refit error / Σ plain-removal error over every refit projection (calibration)."""
        base = sum(r["error_removed"] for l in self.layers for r in l)
        return sum(r["error_refit"] for l in self.layers for r in l) / base if base > 0 else 1.0


def reconstruct(lm: LoadedModel, keeps: list[tuple[list[int] | None, list[int] | None]], texts: list[str], *,
                lam: float = 0.0, fit_bias: bool = True, weighting: str = "relative", select: str = "given",
                batch_size: int = 16,
                max_length: int | None = None,
                should_stop: Callable[[], bool] | None = None,
                progress: Callable[[int, int], None] | None = None) -> ReconstructReport:
    """Cut `lm.model` (dense at the plan's widths) to `keeps` — per layer (attention units,
    neurons) to keep, None for all — and refit every cut block's output projections, layer
    by layer on the calibration `texts`. Modifies lm.model in place."""
    t0 = time.perf_counter()
    adapter: Adapter = lm.adapter
    model = lm.model
    n_layers = len(adapter.layers(model))
    assert len(keeps) == n_layers, (len(keeps), n_layers)
    if fit_bias:
        adapter.enable_output_bias(model)
    was_training = model.training
    model.eval()
    report = ReconstructReport()
    auto = lam <= 0
    with torch.no_grad():
        inp = capture_inputs(lm, texts, batch_size, max_length)
        report.tokens = int(sum(int(m.sum()) for m in inp.masks))
        try:
            for i in range(n_layers):
                if should_stop and should_stop():
                    raise Cancelled()
                layer = adapter.layers(model)[i]
                done = []
                for kind, keep in (("attention", keeps[i][0]), ("mlp", keeps[i][1])):
                    block = adapter.block(model, i)
                    group = block.attn if kind == "attention" else block.mlp
                    if keep is None or len(keep) >= group.n_units:
                        continue
                    stats = _forward_block(layer, inp, collect=group, auto=auto, relative=weighting == "relative")
                    done.append(_refit_group(group, keep, stats, lam, fit_bias, select))
                    adapter.after_prune(adapter.block(model, i))
                after = adapter.block(model, i)
                for kind, keep, g in (("attention", keeps[i][0], after.attn), ("mlp", keeps[i][1], after.mlp)):
                    assert keep is None or g.n_units == len(keep), f"layer {i} {kind}: {g.n_units} != {len(keep)}"
                if i < n_layers - 1:
                    _forward_block(layer, inp, update=True)
                report.layers.append(done)
                if progress:
                    progress(i + 1, n_layers)
        finally:
            model.train(was_training)
    for p in model.parameters():
        p.requires_grad_(True)
    report.seconds = time.perf_counter() - t0
    return report
