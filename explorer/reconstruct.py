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
(plus H⁻¹ for OBS) at a time; no second model. Where a block adds its MLP's output projection
straight onto the residual stream (pre-norm families, RESIDUAL_FAMILIES) the MLP's statistics pass
also keeps that projection's input and the rest of the block's output per batch (tokens x C_ffn
plus tokens x hidden, in the model's dtype / float32; for SmolLM2 on 16k tokens ~140 MB), so
that the stream moves on by adding the refit projection's output instead of running the block
a third time (`_replay`).

Cost (per projection, out x C weight, K kept channels): the Gram statistics in one pass of the
stream (fit and held-out samples apart in the same pass; token weights from the projection's own
output; float32 products, float64 totals); W G once for all samples and W G_:,K for the fit ones
(the held-out ones' by difference); λ chosen from one eigendecomposition of the scaled fit system
(`heldout_errors`: every λ of the grid, ∞ included, for the price of one; float32 where it only
ranks the candidates); then one float64 Cholesky solve for the chosen λ on all samples (the
weights written back). The factorisations, the OBS rounds and the per-λ scores run on one CPU
thread, the large products on all (`_one_thread`).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
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
# Families whose block output is (what came before) + the MLP's out_module output, unchanged
# (pre-norm residual blocks; dropout is off in eval): a refit of that projection moves the
# stream by the change of its output alone (`_replay`). Not BERT / DistilBERT (post-norm).
RESIDUAL_FAMILIES = ("LLaMA", "GPT-2")
# The λ search ranks candidates only (the weights written back are float64 solves): its
# eigendecomposition and rotations run in float32, the errors are summed in float64.
SEARCH_DTYPE = torch.float32


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
        if x.shape[0] == 0:
            return
        xf = x if x.dtype == torch.float64 else x.float()
        xw = xf if w is None else xf * w.to(xf.dtype)[:, None]  # (N, C)
        self.G.add_((xw.T @ xf).to(self.G.device))  # float32 product, float64 total
        self.s.add_(xw.sum(0).to(self.s.device))
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
    W_:,K (out, K), G_KK (K, K), W G_:,K (out, K), s_K (K,), W s (out,), n; and W G (out, C)
    when it was computed anyway (then the energy costs nothing more)."""

    WK: torch.Tensor
    GKK: torch.Tensor
    WGK: torch.Tensor
    sK: torch.Tensor
    Ws: torch.Tensor
    n: float
    W: torch.Tensor
    G: torch.Tensor
    WG: torch.Tensor | None = None

    @classmethod
    def of(cls, W: torch.Tensor, st: GramStats, keep: torch.Tensor, WG: torch.Tensor | None = None) -> "Problem":
        """`WG`: W @ st.G if already at hand (its columns K are W G_:,K)."""
        GK = st.G[:, keep]  # (C, K)
        WGK = WG[:, keep] if WG is not None else W @ GK
        return cls(W[:, keep], GK[keep], WGK, st.s[keep], W @ st.s, st.n, W, st.G, WG)

    def energy(self) -> float:
        """tr(W G Wᵀ): the part of the error no refit changes (for reporting only)."""
        WG = self.WG if self.WG is not None else self.W @ self.G
        return float((WG * self.W).sum())


def _ridge_terms(P: Problem, fit_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(A, R, D, n) with the ridge system (A + λ diag D) W'ᵀ = (R + λ W_:,K D)ᵀ: A = G_KK and
    R = W G_:,K, centred when the bias is refit; D = diag G_KK (floored), n = max(n, 1)."""
    n = max(P.n, 1.0)
    diag = P.GKK.diagonal()
    D = diag.clamp_min(1e-12 * max(float(diag.max()), 1e-30))  # (K,) ridge scale: each channel's energy
    if fit_bias:  # centred: Σ (x_K − x̄_K)(x_K − x̄_K)ᵀ, and the same for the target
        return torch.addr(P.GKK, P.sK, P.sK, alpha=-1 / n), torch.addr(P.WGK, P.Ws, P.sK, alpha=-1 / n), D, n
    return P.GKK, P.WGK, D, n


def refit(W: torch.Tensor, b: torch.Tensor | None, st: GramStats | Problem, keep: torch.Tensor, lam: float,
          fit_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ridge least-squares refit above. W: (out, C) dense weight (float64), b: (out,) or
    None, keep: (C_K,) kept channel indices; `st` the statistics (or their Problem). The
    free bias is eliminated by centring: b' = b + (W s − W' s_K)/n, and W' solves the ridge
    on the centred Gram matrix (one float64 Cholesky solve). Returns (W' (out, C_K), b' or
    None), float64."""
    P = st if isinstance(st, Problem) else Problem.of(W, st, keep)
    n = max(P.n, 1.0)
    if math.isinf(lam):  # plain removal, the bias alone compensates the removed channels' mean
        return (P.WK, (b if b is not None else 0) + (P.Ws - P.WK @ P.sK) / n) if fit_bias else (P.WK, b)
    A, rhs, D, n = _ridge_terms(P, fit_bias)
    A = A + torch.diag(lam * D)  # symmetric positive definite
    rhs = torch.addcmul(rhs, P.WK, D, value=lam)  # R + λ W_:,K D
    with _one_thread(A):
        L = torch.linalg.cholesky(A)
    Wn = torch.cholesky_solve(rhs.T, L).T  # W' = rhs A⁻¹   (out, K)
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


@contextmanager
def _one_thread(t: torch.Tensor):
    """One CPU thread for LAPACK's factorisations (eigh, Cholesky, its inverse) and for loops of
    small operations (the OBS rounds, the per-λ scores): the factorisations synchronise their
    threads at every panel and each small operation is a parallel region, so when other
    processes share the 2 cores each synchronisation can wait a whole time slice for a
    descheduled thread (seen at load 3-4 on 2 cores: eigh of a 1297 x 1297 matrix 14-20 s instead
    of 0.2 s, the inverse from a 1536 x 1536 Cholesky factor 2.5 s instead of 0.05 s). The large
    products around them keep every thread (they gain ~2x on an idle machine and lose little
    under load). SmolLM2's refits (3 attention + 3 MLP projections, OBS and the λ search; 2
    cores): 2.7-3.3 s so, 3.9-4.4 s all on one thread, 2.0-2.4 s all on two at load ~2.5; at
    load ~3.8 5.7-9.3 s so, 4.4-8.0 s on one thread, 4.4-29 s on two. Other threads of the
    process run with one intra-op thread meanwhile. Nests."""
    n = torch.get_num_threads()
    if t.device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _eig_fit(P: Problem, fit_bias: bool, dtype: torch.dtype):
    """(R, D, n, s = D^-½, Λ (float64, ≥ 0), Q (`dtype`)) with S A S = Q diag Λ Qᵀ."""
    A, R0, D, n = _ridge_terms(P, fit_bias)
    s = D.rsqrt()  # (K,)
    with _one_thread(A):
        evals, Q = torch.linalg.eigh((A * s[:, None] * s).to(dtype))  # Ã = S A S: the ridge becomes λ I
    return R0, D, n, s, evals.double().clamp_min(0), Q  # A is positive semi-definite: only rounding goes below 0


def ridge_path(W, b, fit: GramStats | Problem, keep, fit_bias: bool, grid=LAMBDA_GRID,
               dtype: torch.dtype = torch.float64) -> dict[float, tuple[torch.Tensor, torch.Tensor | None]]:
    """`refit(W, b, fit, keep, λ, fit_bias)` for every λ in `grid` from one eigendecomposition
    (W'_λ = Z_λ Tᵀ, see `heldout_errors`); what `heldout_errors` scores, spelled out (tests)."""
    P = fit if isinstance(fit, Problem) else Problem.of(W, fit, keep)
    R0, D, n, s, evals, Q = _eig_fit(P, fit_bias, dtype)
    T = s[:, None] * Q.double()  # (K, K)
    out = {}
    for lam in grid:
        if math.isinf(lam):
            out[lam] = refit(W, b, P, keep, lam, fit_bias)
            continue
        Wn = ((R0 + lam * P.WK * D) @ T / (evals + lam)) @ T.T
        out[lam] = (Wn, (b if b is not None else 0) + (P.Ws - Wn @ P.sK) / n) if fit_bias else (Wn, b)
    return out


def heldout_errors(W, b, fit: GramStats | Problem, held: GramStats | Problem, keep, fit_bias: bool,
                   grid=LAMBDA_GRID, dtype: torch.dtype = SEARCH_DTYPE) -> dict[float, float]:
    """`error(..., held, constant=False)` of `refit(..., fit, λ)` for every λ in `grid` (∞
    allowed), from one eigendecomposition. With S = D^-½ the fit system is
    A + λD = S⁻¹ (Ã + λI) S⁻¹, Ã = S A S = Q Λ Qᵀ, so with T = S Q
        W'_λ = Z_λ Tᵀ,   Z_λ = (B0 + λ B1) diag 1/(Λ + λ),   B0 = R T, B1 = W_:,K D T
    (λ = ∞: Z = B1, W' = W_:,K). The held-out error is quadratic in Z: with H = Tᵀ G^h_KK T,
    U = W G^h_:,K T and α = 1/(Λ+λ), β = λα its quadratic part
    Σ (Z H) ∘ Z = αᵀ(H∘B0ᵀB0)α + 2 αᵀ(H∘B0ᵀB1)β + βᵀ(H∘B1ᵀB1)β, the rest is linear in Z; so
    after the decomposition and a few products every λ costs O(out·K). The decomposition and
    products in `dtype` (float32: only the ranking of the candidates depends on them), the
    sums in float64."""
    P_fit = fit if isinstance(fit, Problem) else Problem.of(W, fit, keep)
    P_held = held if isinstance(held, Problem) else Problem.of(W, held, keep)
    R0, D, n, s, evals, Q = _eig_fit(P_fit, fit_bias, dtype)
    out = P_fit.WK.shape[0]
    X = torch.cat([R0 * s, P_fit.WK * D.sqrt(), P_held.WGK * s]).to(dtype) @ Q  # (3 out, K)
    B0, B1 = X[:out], X[out:2 * out]
    U = X[2 * out:].double()
    H = Q.T @ (P_held.GKK * s[:, None] * s).to(dtype) @ Q  # (K, K) held-out Gram in the fit's eigenbasis
    H00, H01, H11 = [(M.double() * H.double()) for M in (B0.T @ B0, B0.T @ B1, B1.T @ B1)]
    B0, B1 = B0.double(), B1.double()
    Qd = Q.double()
    tf, th = Qd.T @ (s * P_fit.sK), Qd.T @ (s * P_held.sK)  # s_K's in the eigenbasis: W' s_K = Z Tᵀ s_K
    u0, u1 = (U * B0).sum(0), (U * B1).sum(0)  # Σ U∘Z = α·u0 + β·u1
    errs = {}
    with _one_thread(B0):  # a few small operations per λ
        for lam in grid:
            if math.isinf(lam):
                a, be = torch.zeros_like(evals), torch.ones_like(evals)
            else:
                a = 1 / (evals + lam)
                be = lam * a
            e = -2 * (a @ u0 + be @ u1) + a @ H00 @ a + 2 * (a @ H01 @ be) + be @ H11 @ be
            if fit_bias:  # c = b − b' = −(W s − W' s_K)/n on the fit samples
                c = -(P_fit.Ws - B0 @ (a * tf) - B1 @ (be * tf)) / n
                e = e + 2 * c @ (P_held.Ws - B0 @ (a * th) - B1 @ (be * th)) + P_held.n * (c @ c)
            errs[lam] = float(e)
    return errs


def choose_lambda(W, b, fit: GramStats | Problem, held: GramStats | Problem, keep,
                  fit_bias: bool) -> tuple[float, dict]:
    """λ from LAMBDA_GRID with the least error on the held-out samples' statistics
    (`heldout_errors`: one eigendecomposition for the whole grid)."""
    errs = heldout_errors(W, b, fit, held, keep, fit_bias)
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


def block_output(x):
    """A block's hidden states from what its forward returns: the tensor, or a tuple's first element."""
    return x[0] if isinstance(x, (tuple, list)) else x


def _weights_of(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) weights 1 / (e_t + ē) from the dense projection's output y (B, T, out)."""
    e = y.to(torch.promote_types(y.dtype, torch.float32)).pow(2).mean(-1)  # (B, T)
    e_bar = e[mask].mean().clamp_min(1e-30)
    return 1.0 / (e + e_bar)


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
    return _weights_of(y, mask)


def _forward_block(layer: nn.Module, inp: BlockInputs, collect: UnitGroup | None = None,
                   update: bool = False, auto: bool = True, relative: bool = False,
                   replay: list | None = None) -> tuple[GramStats, GramStats] | None:
    """One pass of the stream through `layer`. With `collect`, accumulates the Gram
    statistics of that group's out_module input (fit and held-out samples apart when `auto`,
    in the same pass; token weights from the projection's own output); with `update`, the
    stream moves on to the layer's outputs. With a `replay` list (needs `collect`, the group's
    out_module added straight onto the block output), the whole block runs and per batch
    (out_module input, block output − out_module output) is appended, for `_replay`."""
    stats = None
    handle = None
    if collect is not None:
        c = collect.n_units * collect.act_unit_size
        dev = collect.out_module.weight.device
        stats = (GramStats.zeros(c, dev), GramStats.zeros(c, dev))
        cur: dict = {}
        stop = not update and replay is None  # nothing after this projection is needed

        def gather(module, x, y):
            assert x.shape[-1] == c, (tuple(x.shape), c)
            m, held = cur["mask"], cur["held"]
            w = None
            if relative:  # (B, T)
                w = _weights_of(y, m) if y is not None else token_weights(module, x, m)
            fit_tok = m & ~held[:, None] if auto else m  # (B, T)
            stats[0].add(x[fit_tok], None if w is None else w[fit_tok])
            if auto:
                held_tok = m & held[:, None]
                stats[1].add(x[held_tok], None if w is None else w[held_tok])
            if replay is not None:
                cur["x"], cur["y"] = x.detach(), y.detach().clone()
            if stop:
                raise _Caught()

        if relative or replay is not None:  # the projection's output is needed: let it run
            handle = collect.out_module.register_forward_hook(lambda mod, args, y: gather(mod, args[0], y))
        else:
            handle = collect.out_module.register_forward_pre_hook(lambda mod, args: gather(mod, args[0], None))
    try:
        for i in range(len(inp.args)):
            if collect is not None:
                cur["mask"], cur["held"] = inp.masks[i], inp.held[i]
            try:
                out = block_output(layer(*inp.args[i], **inp.kwargs[i]))
            except _Caught:
                continue
            if replay is not None:
                dt = torch.promote_types(out.dtype, torch.float32)
                replay.append((cur.pop("x"), out.detach().to(dt) - cur.pop("y").to(dt)))
            if update:
                inp.set_hidden(i, out.detach())
    finally:
        if handle is not None:
            handle.remove()
    return stats


def _replay(inp: BlockInputs, m: nn.Module, keep_ch: torch.Tensor, replay: list) -> None:
    """The stream moves on through a block whose out_module `m` (added straight onto the block
    output) was just cut to `keep_ch` and refit: block output = (block output − dense m output)
    + m(kept channels of its input), from what `_forward_block(..., replay=...)` kept; the
    block does not run again. Empties `replay`."""
    assert len(replay) == len(inp.args), (len(replay), len(inp.args))
    for i in range(len(inp.args)):
        x, rest = replay[i]
        replay[i] = None  # free as we go
        h = inp.hidden(i)
        inp.set_hidden(i, (rest + m(x.index_select(-1, keep_ch)).to(rest.dtype)).to(h.dtype))
    replay.clear()


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
    jointly), update W and H⁻¹ (in place: rank-k updates), repeat."""
    H = torch.addr(st.G, st.s, st.s, alpha=-1 / max(st.n, 1.0)) if centred else st.G.clone()  # (C, C)
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    with _one_thread(H):
        return _obs_rounds(W, H, n_units, size, n_keep)


def _obs_rounds(W: torch.Tensor, H: torch.Tensor, n_units: int, size: int, n_keep: int) -> list[int]:
    """`obs_select`'s greedy rounds from the damped Gram matrix H (consumed)."""
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))  # (C, C)
    del H
    Wc = W.clone()  # (out, C), updated as units go
    alive = list(range(n_units))
    while len(alive) > n_keep:
        if size == 1:  # neurons: remove the cheapest few at once (jointly exact), ~16 rounds a layer
            idx = torch.tensor(alive, device=W.device)
            cost = Wc[:, idx].pow(2).sum(0) / Hinv.diagonal()[idx]  # (n_alive,) single-removal costs
            k = min(len(alive) - n_keep, max(1, math.ceil((n_units - n_keep) / 16)))
            R = idx[cost.argsort()[:k]]  # (k,)
            inv = torch.linalg.inv(Hinv[R][:, R])  # (k, k)
            HR = Hinv[R]  # (k, C)
            Wc.addmm_(Wc[:, R] @ inv, HR, alpha=-1)  # OBS update of the remaining weights
            Hinv.addmm_(HR.T @ inv, HR, alpha=-1)  # H⁻¹ −= H⁻¹_:,R (H⁻¹_RR)⁻¹ H⁻¹_R,: (symmetric)
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
        Hc = Hinv[c].clone()  # (size, C)
        Wc.addmm_(Wc[:, c] @ inv, Hc, alpha=-1)
        Hinv.addmm_(Hc.T @ inv, Hc, alpha=-1)
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
    if lam > 0:  # a fixed λ: the fit samples are all the samples
        chosen, errs = lam, {}
        P = Problem.of(W, fit, keep_ch, WG=W @ fit.G)
    else:  # W G once for all samples, W G_:,K for the fit ones, the held-out ones' by difference
        every = fit + held
        P = Problem.of(W, every, keep_ch, WG=W @ every.G)
        P_fit = Problem.of(W, fit, keep_ch)
        P_held = Problem(P.WK, held.G[keep_ch][:, keep_ch], P.WGK - P_fit.WGK, held.s[keep_ch], W @ held.s, held.n,
                         W, held.G)
        chosen, errs = choose_lambda(W, b, P_fit, P_held, keep_ch, fit_bias)
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
    residual = adapter.family in RESIDUAL_FAMILIES
    with torch.no_grad():
        inp = capture_inputs(lm, texts, batch_size, max_length)
        report.tokens = int(sum(int(m.sum()) for m in inp.masks))
        try:
            for i in range(n_layers):
                if should_stop and should_stop():
                    raise Cancelled()
                layer = adapter.layers(model)[i]
                done = []
                moved = False  # the stream already at block i's output
                for kind, keep in (("attention", keeps[i][0]), ("mlp", keeps[i][1])):
                    block = adapter.block(model, i)
                    group = block.attn if kind == "attention" else block.mlp
                    if keep is None or len(keep) >= group.n_units:
                        continue
                    # the MLP's pass runs the whole block and keeps what moves the stream on
                    replay = [] if kind == "mlp" and residual and i < n_layers - 1 else None
                    stats = _forward_block(layer, inp, collect=group, auto=auto, relative=weighting == "relative",
                                           replay=replay)
                    done.append(_refit_group(group, keep, stats, lam, fit_bias, select))
                    del stats
                    adapter.after_prune(adapter.block(model, i))
                    if replay is not None:
                        _replay(inp, group.out_module, _channels(group, done[-1]["units"]), replay)
                        moved = True
                after = adapter.block(model, i)
                for kind, keep, g in (("attention", keeps[i][0], after.attn), ("mlp", keeps[i][1], after.mlp)):
                    assert keep is None or g.n_units == len(keep), f"layer {i} {kind}: {g.n_units} != {len(keep)}"
                if i < n_layers - 1 and not moved:
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
