"""APT: adaptive pruning *and tuning* during fine-tuning (Zhao et al. 2024, "APT: Adaptive Pruning
and Tuning Pretrained Language Models for Efficient Training and Inference"; seed
`apt-adaptive-pruner-logic.md`).

One training run of T = stages x recovery_steps optimiser steps (the budget every method gets);
pruning happens *inside* it, per optimiser step, over the first T_p = round(prune_until x T) steps:

  * APT adapters (tuning="lora", default): every linear of every block (q/k/v/o, up/gate/down;
    GPT-2's Conv1D, weight (in, out), alike) gets a low-rank adapter, output = W x + s·B A x with
    the base weight W frozen, A (r, in) uniform(±1/sqrt(in)), B (out, r) = 0 and a fixed scale s
    (`adapter_scale`). Soft masks sit on every unit (attention head group / FFN neuron: its
    activation, the input channels of o_proj / down_proj, is multiplied by m_u) and, with
    `hidden_fraction`, on the hidden channels (below). tuning="full" trains every weight instead.
  * Salience (Eq. 5 of the paper, per input column j of a unit's output projection, summed over
    the unit's columns):
        S_j = Σ_t |∂L/∂H_j,t| · Σ_t |H_j,t|  +  sqrt(Kurt(O_j)),   O_j = {W_ij · H_j,t}_(i,t)
    H_j the unit's activation *before* its mask (so ∂L/∂H_j is the mask-scaled gradient), the sums
    over the non-padding tokens of the training batches since the last update (the gradients of
    the very backward passes that train the model: no extra pass), W the effective weight
    W + s·(B A) of the output projection. Kurt from raw moments: the entries of O_j are the
    products of the column W_:j and the activations, so E[O^k] = mean_i W_ij^k · mean_t H_j,t^k
    exactly, and Kurt = μ4/σ⁴ (not excess). `salience_scale="eq5"` (default) uses Eq. 5 as
    written; "layer_mean" divides each of the two terms by its mean over the units of the (layer,
    kind) before adding; "first_order" rescales the Eq. 5 scores of each (layer, kind) so their
    mean equals that of the first-order loss estimate Σ_samples |Σ_(t,j∈u) H ⊙ ∂L/∂H|.
    Re-estimated every `update_frequency` optimiser steps (0: T_p/10, at most the document's 100)
    and once on the calibration samples before the first step, then an EMA: s ← β·s + (1-β)·ŝ, β = `salience_momentum` (0.9).
  * Cubic schedule of the kept block parameters, γ_t = γ_T + (1-γ_T)(1 - t/T_p)^3, γ_T = 1 - target.
    At an update at step t < T_p all units of all layers and kinds are ranked together by
    salience density (salience / parameters of the unit) and a binary search keeps the longest
    prefix that fits γ_t'·(dense block parameters), t' = min(t + update_frequency, T_p) (the
    density due by the next update, so the last update before T_p asks for γ_T); the budget the
    prefix leaves (less than the next unit, up to one attention head) is filled with the best-ranked
    later units that still fit (FFN neurons, usually) or, where none is left out, by keeping the
    next unit and dropping the lowest-ranked smaller kept ones, so the cut is the target to within
    the smallest unit; the most salient unit of each (layer, kind) is always kept (`select_by_density`).
  * Masks move toward their target τ ∈ {0, 1} by the document's mask_decay_rate α per optimiser step
    (before the first step and after every step t ≤ T_p), α = 1/update_frequency (the document's
    0.01 with its 100: a unit pruned at an update is at 0 by the next one), faster only where the
    deadline needs it: m moves by max(α, |τ - m|/(T_p - t + 1)), so every mask is exactly τ from
    step T_p + 1 on; the last T - T_p steps train with the pruned units at 0 (nothing is cut that
    training has not seen).
  * Scaled with the run's length T (`schedule_for`, recorded in the summary's "schedule"):
    T_p = round(prune_until x T); update_frequency (0) = T_p/10 capped at the document's 100; α =
    1/update_frequency; the rank growths evenly spaced over T_p. Settings that cannot work for T are
    refused at construction (`check_schedule`): an update frequency longer than the run or than
    its pruning phase, a schedule ending after training.
  * Adaptive tuning: adapter salience Σ|B ⊙ ∂L/∂B| summed since the last growth; at
    `rank_growth_steps` evenly spaced steps of the pruning phase the top half of the adapters by
    that salience get extra ranks (the same number each, then one more in salience order while it
    fits) so that the adapter parameters Σ r(in + out) reach P0 + (P_max - P0)·g/G at growth g,
    P_max = `adapter_budget` x P0. New columns of A are random, of B zero: outputs do not change.
  * Self-distillation: loss = (1 - μ_t)·task + μ_t·(KD(logits) + `self_distill_hidden`·hidden),
    μ_t = `self_distill`·min(1, t/T_p) (APT's moving μ); KD = explorer.recovery.kd_loss at
    prune.kd_temperature, hidden = hidden_kd_loss (prune.kd_hidden_loss, every
    prune.kd_hidden_every-th block) over the kept hidden channels. The teacher is the dense model
    exactly: with tuning="lora" the base weights are frozen and nothing is removed before the end,
    so it is the same model run once more under no_grad, in eval mode, with every hook off
    (adapters off, masks 1): no copy. With tuning="full" it is a copy of the dense model in host
    memory (run on the CPU: never a second model on the accelerator).
  * Hidden channels (`hidden_fraction` > 0): the residual channels with the lowest EMA of
    explorer.hidden's salience (Minitron: mean |norm output| per channel summed over the norms;
    here measured by hooks on the training batches) get soft masks on their own cubic schedule
    (removed fraction hidden_fraction·(1 - (1 - t/T_p)^3), kept count a multiple of what the config
    needs). The mask acts in every norm over the hidden size: statistics weighted by the mask
    (mean/variance for LayerNorm, mean square for RMSNorm: Σ_c m_c·x_c^k / Σ_c m_c) and the output
    multiplied by it. With binary masks that is exactly the norm of the pruned model over the kept
    channels, for LayerNorm and RMSNorm alike, and nothing reads the stream except through norms
    (pre-LN) or *is* a norm output (post-LN BERT), so the removal (`prune_hidden` with
    rescale_norms=False) changes nothing. The hidden channels count towards the parameter budget.
  * The end: adapters merged (W += s·B A), masks folded (W[:, unit] *= m), units with τ = 0
    removed (`surgery.prune_block`), hidden channels at 0 removed: a plain, physically smaller
    model, no hooks, no adapter modules, every parameter trainable again.

Events: "dense" (base), per stage k "analysis" (an Importance holding the current EMA salience
as metric "apt"; layer cosines are not measured: zeros), one "step" per optimiser step (step
1..recovery_steps within the stage), "stage". Stage records before the last are measured on the
masked model in place (quality exact: it is the committed model's function; the speed figures are
those of the model in place, whose units are physically still there), their sizes (params, FLOPs,
widths) are those of the committed plain model (units at 0 removed); the committed (Stop / failure) model is that plain
host copy (soft masks folded; soft *hidden* masks folded into the norms, which is approximate, the
norms' statistics being weighted).

Departures from the paper, stated:
  * One global cut: every unit of every layer in one density ranking (as the paper) but with one
    protected unit per (layer, kind); the hidden dimension has its own schedule and Minitron's
    activation salience instead of a density rank against heads and neurons (the two saliences are
    on different scales). allocation.mode / amplitude / round_to do not apply (prune_attention /
    prune_mlp do: a kind switched off keeps all its units).
  * The salience of a block sums Eq. 5 over its columns; the paper states it per column.
  * α = 1/update_frequency per optimiser step (the document's ratio, 0.01 at 100) rather than a fixed
    0.01, with the deadline above, so that the masks reach 0 within any budget.
  * Adapter rank growth gives the same increment to the top half (by Σ|B ⊙ ∇B|); the scale s stays
    fixed when ranks grow (so growth does not change outputs). The task head is frozen with the
    adapters (the bundled models are fine-tuned already), so the in-place teacher stays dense.
  * The distillation targets the dense model's logits and residual stream (same layers) rather
    than a learned layer mapping; one AdamW and one linear learning-rate decay over the whole run
    (recovery.py's Optimisation, the same as every recovery; APT's loop adds its mask, salience and
    growth steps around it).
  * prune.recovery only switches training off ("none"); its reconstruct part does not apply
    (APT's recovery is its own fine-tuning); prune.layer_drop and prune.prune_hidden are refused
    (use hidden_fraction).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..config import APTOptions, validate
from ..errors import ExplorerError
from ..evaluate import flops_per_token, weight_mb
from ..hidden import channels_to_keep, cut_hidden, hidden_multiple, hidden_spec, keep_count
from ..importance import Importance, acc_dtype, kurtosis_from_moments
from ..pruning import cpu_snapshot
from ..recovery import (Optimisation, _train_batches, default_lr, float32_masters, hidden_kd_loss, hidden_pairs,
                        kd_loss, micro_batches, model_dtype, restore_dtypes)
from ..surgery import prune_block
from .base import MethodRun

KINDS = ("attention", "mlp")


# --- pure pieces (unit-tested) --------------------------------------------------------------

def cubic_schedule(t: float, T: float, final_density: float) -> float:
    """Density kept at step t of T: γ_t = γ_T + (1-γ_T)(1-t/T)^3 (t clipped to [0, T]; T <= 0: γ_T)."""
    if T <= 0:
        return float(final_density)
    x = min(max(t / T, 0.0), 1.0)
    return float(final_density + (1 - final_density) * (1 - x) ** 3)


def ema_update(prev: np.ndarray | None, new: np.ndarray, momentum: float = 0.9) -> np.ndarray:
    """Exponential moving average: momentum·prev + (1-momentum)·new (new when there is no prev)."""
    new = np.asarray(new, dtype=np.float64)
    if prev is None:
        return new.copy()
    return momentum * np.asarray(prev, dtype=np.float64) + (1 - momentum) * new


def ramp_masks(mask: torch.Tensor, target: torch.Tensor, updates_left: int, rate: float = 0.0) -> torch.Tensor:
    """Move every mask toward its target (bool: 1 keep, 0 prune), in place, by max(rate, |τ - m| /
    updates_left) (never past τ), so that it is exactly the target after `updates_left` such calls
    whatever the rate: rate 0 is the linear ramp m += (τ - m) / updates_left; rate α moves α per
    call (APT's mask_decay_rate), faster only where the deadline needs it. With updates_left <= 1
    the mask is set to the target."""
    tau = target.to(mask.dtype)
    if updates_left <= 1:
        return mask.copy_(tau)
    gap = tau - mask
    dist = gap.abs()
    move = torch.clamp(dist / updates_left, min=float(rate))
    arrived = move >= dist
    mask.add_(torch.sign(gap) * move)
    mask.copy_(torch.where(arrived, tau, mask))  # exactly τ (no rounding) once it is reached
    return mask.clamp_(0.0, 1.0)


DOC_UPDATE_FREQUENCY = 100  # the document's pruning.update_frequency (optimiser steps between mask updates)
DOC_MASK_DECAY = 0.01  # the document's mask_decay_rate: α·update_frequency = 1, a pruned mask reaches 0 by the next update


def schedule_for(T: int, opts) -> dict:
    """APT's settings for a run of T optimiser steps, scaled with its length:
      * prune_steps T_p = round(prune_until x T): the cubic schedule's length (masks exactly at their
        targets from step T_p + 1 on);
      * update_frequency f: the option, or (0) a tenth of T_p capped at the document's 100 (so the
        schedule has about 10 mask updates, and the document's value from T_p >= 1,000 steps on);
      * mask_decay α = 1/f per optimiser step: the document's pair (0.01 every step, targets re-chosen
        every 100 steps), a mask pruned at an update reaches 0 by the next one, at any length;
      * growth_at: the steps of the `rank_growth_steps` adapter growths, evenly spaced over T_p (at
        most one per step, none at step 0).
    The numbers every run records (summary "schedule") and the bench reports per budget."""
    Tp = int(round(opts.prune_until * T))
    f = int(opts.update_frequency or min(DOC_UPDATE_FREQUENCY, max(1, Tp // 10)))
    G = int(opts.rank_growth_steps)
    growth_at = sorted({int(round(g * Tp / (G + 1))) for g in range(1, G + 1)} - {0}) if Tp > 0 else []
    return {"steps": int(T), "prune_steps": Tp, "update_frequency": f, "mask_decay": 1.0 / f,
            "mask_updates": len(range(f, Tp, f)) + 1 if Tp > 0 else 0, "growth_at": growth_at}


def check_schedule(T: int, opts, where: str = "") -> None:
    """Refuse settings that cannot work for a run of T optimiser steps (ExplorerError naming the
    setting and the run's length): a schedule that ends after training (prune_until > 1), an
    update frequency longer than the run or than its pruning phase (the cubic schedule would be one
    cut). More rank growths than steps in the pruning phase are not refused: at most one per step
    happens (schedule_for's growth_at), and the run's summary records how many did."""
    if T <= 0:
        return
    run = f"the run's {T} optimiser steps" + (f" ({where})" if where else "")
    if opts.prune_until > 1:
        raise ExplorerError(f"--prune-until {opts.prune_until:g} ends the pruning schedule after training: "
                            f"T_p = {opts.prune_until:g} x {T} = {opts.prune_until * T:g} steps > {run}; use at most 1")
    Tp = int(round(opts.prune_until * T))
    f = opts.update_frequency
    if f and f > T:
        raise ExplorerError(f"--update-frequency {f} is longer than {run}: no salience update would happen "
                            f"during training; use at most {max(1, Tp)} (or 0: a tenth of the pruning phase)")
    if f and Tp > 0 and f > Tp:
        raise ExplorerError(f"--update-frequency {f} is longer than the pruning phase (T_p = round(prune_until "
                            f"{opts.prune_until:g} x {T}) = {Tp} steps of {run}): the cubic schedule would be "
                            f"a single cut; use at most {Tp} (or 0: a tenth of the pruning phase)")


def select_by_density(salience, params, budget: float, always_keep=None) -> tuple[np.ndarray, float]:
    """Keep the units with the highest salience density (salience / params) whose parameters
    fit in `budget`. Units in `always_keep` are kept first (they count against the budget).
    Binary search over the ranked list for the longest prefix that fits; then the budget left
    (smaller than the next unit of the ranking) is filled, in ranking order, with the later units
    that still fit, so that no unit left out would fit; where that leaves a gap, the next unit is
    kept in exchange for the lowest-ranked smaller kept units if the gap shrinks. Returns (keep
    mask, density threshold: the density of the last unit of the prefix, inf if none)."""
    sal = np.asarray(salience, dtype=np.float64)
    par = np.asarray(params, dtype=np.float64)
    n = len(sal)
    forced = np.zeros(n, bool) if always_keep is None else np.asarray(always_keep, bool).copy()
    density = sal / np.maximum(par, 1)
    rest = np.flatnonzero(~forced)
    rest = rest[np.lexsort((rest, -density[rest]))]  # by density descending, ties by index
    cum = np.concatenate([[0.0], np.cumsum(par[rest])])
    spent = par[forced].sum()
    lo, hi = 0, len(rest)  # invariant: prefix lo fits; prefix hi+1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if spent + cum[mid] <= budget:
            lo = mid
        else:
            hi = mid - 1
    keep = forced
    keep[rest[:lo]] = True
    left = _fill(keep, rest, par, budget - spent - cum[lo])  # the prefix's gap: less than par[rest[lo]]
    if lo < len(rest) and left > 0:  # rest[lo] is left out: it did not fit in the gap
        # Still a gap (every later unit that fits is kept already, e.g. all neurons rank above the last
        # heads): keep the next unit of the ranking and pay for it with the lowest-ranked kept units
        # smaller than it, when that leaves a smaller gap.
        j, trial = rest[lo], keep.copy()
        need = par[j] - left
        trial[j] = True
        for u in rest[keep[rest]][::-1]:  # the kept ones, lowest density first
            if need <= 0:
                break
            if par[u] < par[j]:
                trial[u] = False
                need -= par[u]
        if need <= 0 and _fill(trial, rest, par, -need) < left:
            keep[:] = trial
    return keep, float(density[rest[lo - 1]]) if lo > 0 else float("inf")


def _fill(keep: np.ndarray, ranked: np.ndarray, par: np.ndarray, left: float) -> float:
    """Keep, in ranking order, every unit left out that still fits in `left` (in place); returns
    what is left."""
    for u in ranked:
        if not keep[u] and par[u] <= left:
            keep[u] = True
            left -= par[u]
    return left


def eq5_terms(abs_g: torch.Tensor, abs_x: torch.Tensor, w_moments: list[torch.Tensor],
              x_moments: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5's two terms per input channel j (all (C,) tensors): Σ|∂L/∂H_j|·Σ|H_j| and
    sqrt(Kurt(O_j)), O_j = W_:j ∘ H_j, from the raw moments mean_i W_ij^k and mean_t H_jt^k, k=1..4."""
    mom = [w * x for w, x in zip(w_moments, x_moments)]
    return abs_g * abs_x, kurtosis_from_moments(*mom).sqrt()


def outlier_aware_salience(H: torch.Tensor, G: torch.Tensor, W_rows: torch.Tensor, unit_size: int) -> np.ndarray:
    """Eq. 5 summed over each unit's columns, from whole tensors (for checks and small inputs):
    H, G (N tokens, C channels) the activations and their gradients, W_rows (C, out) the output
    projection's weights per input channel (W[:, j] of a Linear)."""
    H, G, W = H.double(), G.double(), W_rows.double()
    wm = [(W ** k).mean(1) for k in range(1, 5)]
    xm = [(H ** k).mean(0) for k in range(1, 5)]
    a, o = eq5_terms(G.abs().sum(0), H.abs().sum(0), wm, xm)
    return (a + o).view(-1, unit_size).sum(1).numpy()


def unit_params_at(group, h: int, H: int) -> float:
    """Parameters of one unit once the hidden size is h of H: weight slices scale with h/H
    (their other dimension is the hidden size), bias slices do not."""
    total = 0.0
    for s in group.slices:
        p = s.param
        other = p.numel() // p.shape[s.dim]
        total += s.unit_size * other * (h / H if s.name == "weight" else 1.0)
    return total


# --- the APT adapter -------------------------------------------------------------------------

class LowRank(nn.Module):
    """A low-rank adapter for one frozen Linear / GPT-2 Conv1D: delta(x) = s · (x Aᵀ) Bᵀ, A (r, in),
    B (out, r), float32 (at least), on the base weight's device. Not part of the model: the forward
    hook adds it, `merge` folds it into the base weight."""

    def __init__(self, base: nn.Module, rank: int, scale: float):
        super().__init__()
        w = base.weight
        self.conv = not isinstance(base, nn.Linear)  # Conv1D weight (in, out)
        self.n_in, self.n_out = (w.shape[0], w.shape[1]) if self.conv else (w.shape[1], w.shape[0])
        self.scale = float(scale)
        dt = acc_dtype(w.dtype)
        self.A = nn.Parameter(self._random(rank, w.device, dt))
        self.B = nn.Parameter(torch.zeros(self.n_out, rank, device=w.device, dtype=dt))

    def _random(self, rank: int, device, dtype) -> torch.Tensor:
        bound = 1.0 / math.sqrt(self.n_in)
        return (torch.rand(rank, self.n_in, device=device, dtype=dtype) * 2 - 1) * bound

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def n_params(self) -> int:
        return self.rank * (self.n_in + self.n_out)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.A.dtype) @ self.A.t()) @ self.B.t() * self.scale

    def weight_delta(self) -> torch.Tensor:
        """s·B A shaped like the base weight ((out, in) for Linear, (in, out) for Conv1D)."""
        d = (self.B @ self.A) * self.scale
        return d.t() if self.conv else d

    def rows_delta(self) -> torch.Tensor:
        """The weight change per input channel: (in, out)."""
        return ((self.B @ self.A) * self.scale).t()

    @torch.no_grad()
    def grow(self, extra: int) -> tuple[nn.Parameter, nn.Parameter]:
        """Add `extra` ranks: new rows of A random, new columns of B zero (the output does not change).
        Returns the old (A, B) so the optimiser state can follow."""
        old = (self.A, self.B)
        A = torch.cat([self.A.data, self._random(extra, self.A.device, self.A.dtype)], 0)
        B = torch.cat([self.B.data, torch.zeros(self.n_out, extra, device=self.B.device, dtype=self.B.dtype)], 1)
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)
        return old


def growth_plan(salience: list[float], costs: list[int], spend: int) -> list[int]:
    """Extra ranks per adapter for one growth: the top half by salience (ties by index) get the same
    increment floor(spend / Σ their (in + out)), then one more each in salience order while the
    total still fits `spend`. Σ extra_i·cost_i <= spend."""
    n = len(salience)
    order = sorted(range(n), key=lambda i: (-salience[i], i))[: max(1, (n + 1) // 2)] if n else []
    extra = [0] * n
    per = sum(costs[i] for i in order)
    if per <= 0 or spend <= 0:
        return extra
    inc = int(spend // per)
    left = spend - inc * per
    for i in order:
        extra[i] = inc
    for i in order:
        if costs[i] <= left:
            extra[i] += 1
            left -= costs[i]
    return extra


# --- norms with a channel mask ------------------------------------------------------------------

def _norm_kind(m: nn.Module) -> str:
    if isinstance(m, nn.LayerNorm):
        return "layer"
    if "RMSNorm" in type(m).__name__ and hasattr(m, "weight"):
        return "rms"
    raise ExplorerError(f"APT's hidden-channel masks do not know the norm {type(m).__name__}")


def masked_norm(module: nn.Module, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The norm of `module` over the channels weighted by m (H,), its output multiplied by m. With a
    binary m it equals the same norm over the kept channels only, the removed ones 0."""
    xf = x.float()
    mf = m.to(xf.device, torch.float32)
    M = mf.sum().clamp_min(1e-12)
    if _norm_kind(module) == "layer":
        mu = (xf * mf).sum(-1, keepdim=True) / M
        var = ((xf - mu) ** 2 * mf).sum(-1, keepdim=True) / M
        y = (xf - mu) * torch.rsqrt(var + module.eps)
        if module.weight is not None:
            y = y * module.weight.float()
        if module.bias is not None:
            y = y + module.bias.float()
        return (y * mf).to(x.dtype)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    var = (xf * xf * mf).sum(-1, keepdim=True) / M
    y = module.weight * (xf * torch.rsqrt(var + eps)).to(x.dtype)  # as LlamaRMSNorm: weight in its dtype
    return (y.float() * mf).to(y.dtype)


# --- the run ----------------------------------------------------------------------------------

class APTRun(MethodRun):
    method = "apt"
    Options = APTOptions
    chooses_widths = "its masks pick the units across all layers by salience during training"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        o = self.opts
        self.trains = self.prune.recovery != "none" and self.prune.recovery_steps > 0
        T = self.prune.stages * self.prune.recovery_steps if self.trains else 0
        check_schedule(T, o, f"{self.prune.stages} stage(s) x {self.prune.recovery_steps} recovery steps")
        validate(o)  # choices / min / max of every field: ExplorerError naming the flag
        if self.prune.layer_drop or self.prune.prune_hidden:
            raise ExplorerError("apt prunes the hidden size itself: use --hidden-fraction instead of "
                                "--prune-hidden, and no --layer-drop")
        if o.tuning not in ("lora", "full"):
            raise ExplorerError(f"--tuning must be lora or full, got '{o.tuning}'")
        self.training = "apt"  # not "kd": the base class makes no teacher copy (APT's teacher: see _teacher_out)
        self.momentum = o.salience_momentum
        self.masks: dict[tuple[int, str], torch.Tensor] = {}
        self.targets: dict[tuple[int, str], torch.Tensor] = {}
        self.ema: dict[tuple[int, str], np.ndarray] = {}
        self.hmask: torch.Tensor | None = None  # (H,) hidden-channel masks
        self.htarget: torch.Tensor | None = None
        self.hema: np.ndarray | None = None
        self.adapters: dict[str, LowRank] = {}
        self.adapter_sal: dict[str, float] = {}
        self.initial_adapter_params = 0
        self.adapter_limit = 0
        self.salience_updates = 0
        self.growths: list[dict] = []
        self._handles: list = []
        self._ones: dict = {}
        self._hones = True
        self._teacher_on = False  # hooks off: the dense model
        self._collect = False  # hooks record salience statistics (training / calibration forwards)
        self._mask_now: torch.Tensor | None = None  # (B, T) of the current forward
        self._stats: dict = {}
        self._hstats: dict = {}
        self._teacher_model = None
        self._opt: Optimisation | None = None
        self._masters: dict = {}  # full tuning of a low-precision model: float32 masters (recovery.float32_masters)
        self._pending = None  # the committed snapshot of an intermediate stage, made for its record
        self._snap_hidden = None
        self._last_hidden = None
        self._norms: list[nn.Module] = []
        self.H = 0
        self._dtype = torch.float32
        self._names: dict = {}
        self.schedule: dict = {}

    # --- hooks ---------------------------------------------------------------------------------
    def _install(self) -> None:
        model = self.lm.model
        for b in self.lm.adapter.blocks(model):
            for g in (b.attn, b.mlp):
                self._handles.append(g.out_module.register_forward_pre_hook(
                    self._unit_hook((b.index, g.kind), g.act_unit_size, g.n_units)))
        for name, ad in self.adapters.items():
            self._handles.append(model.get_submodule(name).register_forward_hook(self._adapter_hook(ad)))
        if self.hmask is not None:
            self._norms = hidden_spec(self.lm.adapter, model).norms
            for n in self._norms:
                self._handles.append(n.register_forward_hook(self._norm_hook))

    def _uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _unit_hook(self, key, size: int, n_units: int):
        def hook(module, args):
            if self._teacher_on:
                return None
            x = args[0]
            if self._collect and x.requires_grad:
                self._record_unit(key, x, size, n_units)
            if self._ones.get(key, True):
                return None
            m = self.masks[key]
            return ((x * m.repeat_interleave(size)).to(x.dtype),) + tuple(args[1:])
        return hook

    def _record_unit(self, key, x: torch.Tensor, size: int, n_units: int) -> None:
        st = self._stats.setdefault(key, {})
        dt = acc_dtype(x.dtype)
        mk = self._mask_now.to(x.device, dt).unsqueeze(-1)  # (B, T, 1)
        xd = x.detach()
        xm = xd.to(dt) * mk
        _acc(st, "n", mk.sum())
        _acc(st, "abs_x", xm.abs().sum((0, 1)))
        xk = xm
        for k in range(1, 5):
            _acc(st, f"x{k}", xk.sum((0, 1)))
            if k < 4:
                xk = xk * xm

        def grad_hook(g):
            gm = g.detach().to(dt) * mk
            _acc(st, "abs_g", gm.abs().sum((0, 1)))
            per_sample = (xd.to(dt) * gm).sum(1)  # (B, C)
            _acc(st, "first_order", per_sample.view(per_sample.shape[0], n_units, size).sum(-1).abs().sum(0))
        x.register_hook(grad_hook)

    def _adapter_hook(self, ad: LowRank):
        def hook(module, args, out):
            if self._teacher_on:
                return None
            return out + ad.delta(args[0]).to(out.dtype)
        return hook

    def _norm_hook(self, module, args, out):
        if self._teacher_on:
            return None
        y = out[0] if isinstance(out, tuple) else out
        if self._collect:
            mk = self._mask_now.to(y.device, torch.float32)
            _acc(self._hstats, "sum", torch.einsum("bth,bt->h", y.detach().float().abs(), mk))
        if self._hones:
            return None
        return masked_norm(module, args[0], self.hmask)

    def _refresh_flags(self) -> None:
        self._ones = {k: bool((m == 1).all()) for k, m in self.masks.items()}
        self._hones = self.hmask is None or bool((self.hmask == 1).all())

    @contextmanager
    def _as_teacher(self):
        """The model with every hook off: adapters off, masks 1, i.e. the dense model (frozen base
        weights, nothing removed yet), in eval mode, under no_grad."""
        model = self.lm.model
        was = model.training
        self._teacher_on = True
        model.eval()
        try:
            with torch.no_grad():
                yield model
        finally:
            self._teacher_on = False
            model.train(was)

    def _teacher_out(self, inputs: dict, hidden: bool):
        if self._teacher_model is None:
            with self._as_teacher() as m:
                return m(**inputs, output_hidden_states=hidden)
        dev = self.lm.device
        with torch.no_grad():
            out = self._teacher_model(**{k: v.to("cpu") for k, v in inputs.items()}, output_hidden_states=hidden)
        logits = out.logits.to(dev)
        hs = tuple(h.to(dev) for h in out.hidden_states) if hidden else None
        return _Out(logits, hs)

    # --- setting up / taking down ----------------------------------------------------------------
    def _setup(self) -> None:
        lm, o = self.lm, self.opts
        model = lm.model
        torch.manual_seed(self.prune.seed)
        self._dtype = model_dtype(model)
        for b in lm.adapter.blocks(model):
            for g in (b.attn, b.mlp):
                dev = g.out_module.weight.device
                self.masks[(b.index, g.kind)] = torch.ones(g.n_units, device=dev)
                self.targets[(b.index, g.kind)] = torch.ones(g.n_units, dtype=torch.bool, device=dev)
        if o.hidden_fraction > 0:
            spec = hidden_spec(lm.adapter, model)  # raises for an architecture it does not know
            for n in spec.norms:
                _norm_kind(n)
            self.H = spec.size
            dev = next(model.parameters()).device
            self.hmask = torch.ones(self.H, device=dev)
            self.htarget = torch.ones(self.H, dtype=torch.bool, device=dev)
        if self.trains and o.tuning == "lora":
            prefix = {id(m): n for n, m in model.named_modules()}
            for layer in lm.adapter.layers(model):
                for m in layer.modules():
                    w = getattr(m, "weight", None)
                    if isinstance(w, nn.Parameter) and w.dim() == 2 and (isinstance(m, nn.Linear) or hasattr(m, "nf")):
                        self.adapters[prefix[id(m)]] = LowRank(m, o.adapter_rank, o.adapter_scale)
            self.initial_adapter_params = sum(a.n_params for a in self.adapters.values())
            self.adapter_limit = int(o.adapter_budget * self.initial_adapter_params)
            self.adapter_sal = {n: 0.0 for n in self.adapters}
            for p in model.parameters():
                p.requires_grad_(False)
        elif self.trains:  # full fine-tuning: every weight; the teacher is a host copy of the dense model
            if o.self_distill > 0:
                self._teacher_model = cpu_snapshot(model).float().eval()
            for p in model.parameters():
                p.requires_grad_(True)
        self._install()
        self._refresh_flags()

    def _cleanup(self) -> None:
        self._uninstall()
        self._collect = self._teacher_on = False
        restore_dtypes(self._masters)
        for p in self.lm.model.parameters():
            p.requires_grad_(True)
            p.grad = None
        self._teacher_model = None
        self._opt = None

    # --- making a plain model --------------------------------------------------------------------
    @torch.no_grad()
    def _make_plain(self, model: nn.Module, final: bool) -> dict | None:
        """Adapters merged, unit masks folded, units removed (final: every unit with target 0,
        whose mask is 0 then; else the units whose mask is 0), hidden channels likewise, in
        `model` (the live one or a copy without hooks). Returns the hidden cut {"dense", "size"} or None."""
        ad = self.lm.adapter
        for name, a in self.adapters.items():
            m = model.get_submodule(name)
            m.weight.data += a.weight_delta().to(m.weight.device, m.weight.dtype)
        keeps = []
        for b in ad.blocks(model):
            kk = []
            for g in (b.attn, b.mlp):
                mk = self.masks[(b.index, g.kind)]
                if not bool((mk == 1).all()):
                    s = next(s for s in g.slices if s.module is g.out_module and s.name == "weight")
                    scale = mk.repeat_interleave(g.act_unit_size).to(s.param.device)
                    shape = [1] * s.param.dim()
                    shape[s.dim] = -1
                    s.param.data.mul_(scale.view(shape).to(s.param.dtype))
                gone = ~self.targets[(b.index, g.kind)] if final else (mk <= 0)
                kk.append(torch.nonzero(~gone).flatten().tolist())
            keeps.append(kk)
        for i, (ka, km) in enumerate(keeps):
            prune_block(ad, model, i, ka, km)
        if self.hmask is None:
            return None
        hm = self.hmask
        gone = ~self.htarget if final else (hm <= 0)
        if not final and not bool((hm == 1).all()):
            for n in hidden_spec(ad, model).norms:  # y = m·norm(x): approximate (weighted statistics)
                for p in (getattr(n, "weight", None), getattr(n, "bias", None)):
                    if p is not None:
                        p.data.mul_(hm.to(p.device, p.dtype))
        keep = torch.nonzero(~gone).flatten().tolist()
        if len(keep) == self.H:
            return None
        cut_hidden(ad, model, keep, rescale_norms=False)  # the masked norms ran over the kept channels
        return {"dense": self.H, "size": len(keep)}

    def _snapshot(self):
        if not self._handles:
            self._snap_hidden = self.lm.plan.get("hidden")
            return cpu_snapshot(self.lm.model)
        self._uninstall()  # a copy without the hooks
        try:
            snap = cpu_snapshot(self.lm.model)
        finally:
            self._install()
        self._snap_hidden = self._make_plain(snap, final=False)
        for p in snap.parameters():
            p.requires_grad_(True)
            if self._masters and p.is_floating_point():  # full tuning of a low-precision model: its dtype again
                p.data = p.data.to(self._dtype)
        return snap

    def _commit(self) -> None:
        if self._pending is not None:
            self._last_good, self._pending = self._pending, None
        else:
            self._last_good = self._snapshot()
        self._last_hidden = self._snap_hidden

    def _restore(self) -> None:
        super()._restore()
        if self._last_hidden:
            self.lm.plan["hidden"] = dict(self._last_hidden)
        for p in self.lm.model.parameters():
            p.requires_grad_(True)

    # --- salience --------------------------------------------------------------------------------
    def _weight_rows(self, g) -> torch.Tensor:
        """The effective output-projection weight per input channel (C, out): W (+ s·B A)."""
        s = next(s for s in g.slices if s.module is g.out_module and s.name == "weight")
        w = s.param.detach()
        rows = w.to(acc_dtype(w.dtype)).movedim(s.dim, 0)
        name = self._names.get(id(g.out_module))
        if name in self.adapters:
            rows = rows + self.adapters[name].rows_delta().detach().to(rows.dtype)
        return rows

    def _fresh_salience(self) -> dict[tuple[int, str], np.ndarray]:
        """Eq. 5 per unit from the statistics gathered since the last update (then cleared)."""
        out = {}
        scale = self.opts.salience_scale
        self._names = {id(m): n for n, m in self.lm.model.named_modules()}
        for b in self.lm.adapter.blocks(self.lm.model):
            for g in (b.attn, b.mlp):
                key = (b.index, g.kind)
                st = self._stats.get(key)
                if not st or "abs_g" not in st:
                    continue
                rows = self._weight_rows(g)
                wm, wp = [], rows
                for k in range(1, 5):
                    wm.append(wp.mean(1))
                    if k < 4:
                        wp = wp * rows
                n = st["n"].clamp_min(1)
                xm = [st[f"x{k}"].to(rows.device) / n for k in range(1, 5)]
                a, o = eq5_terms(st["abs_g"].to(rows.device), st["abs_x"].to(rows.device), wm, xm)
                a = a.detach().to("cpu", torch.float64).view(g.n_units, -1).sum(1).numpy()
                o = o.detach().to("cpu", torch.float64).view(g.n_units, -1).sum(1).numpy()
                if scale == "layer_mean":
                    s = a / max(a.mean(), 1e-30) + o / max(o.mean(), 1e-30)
                else:
                    s = a + o
                    if scale == "first_order":
                        fo = st["first_order"].detach().to("cpu", torch.float64).numpy()
                        s = s * (fo.mean() / max(s.mean(), 1e-30))
                out[key] = s
        self._stats = {}
        return out

    def _update_salience(self) -> None:
        fresh = self._fresh_salience()
        for key, v in fresh.items():
            self.ema[key] = ema_update(self.ema.get(key), v, self.momentum)
        if self.hmask is not None and "sum" in self._hstats:
            tokens = float(self._hstats.get("tokens", 1.0))
            hs = (self._hstats["sum"] / max(tokens, 1.0)).detach().to("cpu", torch.float64).numpy()
            self.hema = ema_update(self.hema, hs, self.momentum)
        self._hstats = {}
        if fresh:
            self.salience_updates += 1

    def _count_tokens(self) -> None:
        if self.hmask is not None:
            self._hstats["tokens"] = self._hstats.get("tokens", 0.0) + float(self._mask_now.sum())

    def _calibration_salience(self, k: int) -> None:
        """One estimate on the stage's calibration samples (forward + backward, no update)."""
        texts, labels = self._calibration(k)
        if self.lm.task != "classification":
            labels = None
        model = self.lm.model
        bs = self.analysis.batch_size
        flags = {}
        if not self.adapters:  # the activations need gradients: through the weights when there are no adapters
            flags = {p: p.requires_grad for p in model.parameters()}
            for p in model.parameters():
                p.requires_grad_(True)
        was = model.training
        model.eval()
        self._collect = True
        try:
            for i in range(0, len(texts), bs):
                self._check_stop()
                batch = self.lm.encode(texts[i:i + bs], labels[i:i + bs] if labels is not None else None,
                                       max_length=self.analysis.max_length or None)
                for part, w in micro_batches(self.lm, batch):
                    self._mask_now = part["attention_mask"]
                    self._count_tokens()
                    out = model(**part)
                    if out.loss is None:
                        raise ExplorerError("APT's salience needs a loss: labelled data for a classifier")
                    (out.loss * w).backward()
        finally:
            self._collect = False
            model.train(was)
            for p in model.parameters():
                p.grad = None
            for a in self.adapters.values():
                a.A.grad = a.B.grad = None
            for p, f in flags.items():
                p.requires_grad_(f)
        self._update_salience()

    def _importance(self) -> Importance:
        blocks = self.lm.adapter.blocks(self.lm.model)
        L = len(blocks)
        groups, heads, neurons, params = {"apt": []}, {"apt": []}, {"apt": []}, []
        for b in blocks:
            ga = self.ema.get((b.index, "attention"), np.zeros(b.attn.n_units))
            gm = self.ema.get((b.index, "mlp"), np.zeros(b.mlp.n_units))
            groups["apt"].append(ga)
            heads["apt"].append(np.repeat(ga, b.heads_per_group) / b.heads_per_group)
            neurons["apt"].append(gm)
            params.append({"group_params": b.attn.params_per_unit, "neuron_params": b.mlp.params_per_unit,
                           "block_params": b.params, "groups": b.attn.n_units,
                           "heads_per_group": b.heads_per_group, "n_neurons": b.mlp.n_units})
        z = np.zeros(L)
        return Importance(z, z.copy(), z.copy(), groups, heads, neurons, "apt",
                          samples=self.analysis.samples, params=params)

    # --- the cut ---------------------------------------------------------------------------------
    def _select(self, progress_step: float, Tp: float) -> dict:
        """Targets for the density due at `progress_step` of `Tp` (see the module docstring)."""
        lm, al = self.lm, self.allocation
        gamma = cubic_schedule(progress_step, Tp, 1 - al.target)
        H = self.H or 1
        h = H
        if self.hmask is not None and self.hema is not None:
            x = 1.0 if Tp <= 0 else min(max(progress_step / Tp, 0.0), 1.0)
            frac = self.opts.hidden_fraction * (1 - (1 - x) ** 3)
            h = keep_count(self.H, frac, hidden_multiple(lm.model.config)) if frac > 0 else self.H
            keep = channels_to_keep(torch.tensor(self.hema, device="cpu"), h)
            self.htarget.zero_()
            self.htarget[torch.tensor(keep, device=self.htarget.device)] = True
        keys, sal, par, forced = [], [], [], []
        units_dense = 0.0
        for b in lm.adapter.blocks(lm.model):
            for g in (b.attn, b.mlp):
                key = (b.index, g.kind)
                s = self.ema.get(key, np.ones(g.n_units))
                top = int(np.argmax(s))
                locked = (g.kind == "attention" and not al.prune_attention) or (g.kind == "mlp" and not al.prune_mlp)
                pp = unit_params_at(g, h, H)
                units_dense += g.n_units * g.params_per_unit
                for u in range(g.n_units):
                    keys.append((key, u))
                    sal.append(s[u])
                    par.append(pp)
                    forced.append(u == top or locked)
        fixed = (lm.block_params - units_dense) * (h / H)  # norms, output biases: scale with the hidden size
        budget = gamma * self.original - fixed
        keep, threshold = select_by_density(sal, par, budget, forced)
        for key in self.targets:
            self.targets[key].zero_()
        idx: dict = {}
        for (key, u), kp in zip(keys, keep):
            if kp:
                idx.setdefault(key, []).append(u)
        for key, us in idx.items():
            self.targets[key][torch.tensor(us, device=self.targets[key].device)] = True
        return {"density_target": gamma, "hidden_kept": h if self.hmask is not None else None,
                "density_threshold": threshold if np.isfinite(threshold) else None,
                "planned_removed": 1 - (fixed + float(np.dot(keep, par))) / self.original}

    def _ramp(self, updates_left: int, rate: float = 0.0) -> None:
        for key in self.masks:
            ramp_masks(self.masks[key], self.targets[key], updates_left, rate)
        if self.hmask is not None:
            ramp_masks(self.hmask, self.htarget, updates_left, rate)
        self._refresh_flags()

    # --- adaptive tuning -------------------------------------------------------------------------
    def _grow(self, g: int, G: int) -> dict | None:
        if not self.adapters or G <= 0 or self.adapter_limit <= self.initial_adapter_params:
            return None
        names = list(self.adapters)
        now = sum(a.n_params for a in self.adapters.values())
        goal = self.initial_adapter_params + (self.adapter_limit - self.initial_adapter_params) * g // G
        extra = growth_plan([self.adapter_sal[n] for n in names],
                            [self.adapters[n].n_in + self.adapters[n].n_out for n in names], goal - now)
        grown = {}
        for n, e in zip(names, extra):
            if e > 0:
                old = self.adapters[n].grow(e)
                self._swap_params(old, (self.adapters[n].A, self.adapters[n].B), e)
                grown[n] = self.adapters[n].rank
        self.adapter_sal = {n: 0.0 for n in names}
        return {"growth": g, "grown": len(grown), "adapter_params": sum(a.n_params for a in self.adapters.values())}

    def _swap_params(self, old, new, extra: int) -> None:
        """Put the grown A, B into the optimiser, its state padded with zeros for the new ranks."""
        if self._opt is None:
            return
        opt = self._opt.opt
        self._opt.params = self._trainable()  # clipped over the new ones
        for o, n, dim in zip(old, new, (0, 1)):
            for group in opt.param_groups:
                group["params"] = [n if p is o else p for p in group["params"]]
            st = opt.state.pop(o, None)
            if st:
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in st:
                        pad = list(st[k].shape)
                        pad[dim] = extra
                        st[k] = torch.cat([st[k], torch.zeros(pad, device=st[k].device, dtype=st[k].dtype)], dim)
                opt.state[n] = st

    # --- one optimiser step ----------------------------------------------------------------------
    def _trainable(self) -> list[nn.Parameter]:
        if self.adapters:
            return [p for a in self.adapters.values() for p in (a.A, a.B)]
        return [p for p in self.lm.model.parameters() if p.requires_grad]

    def _loss(self, part: dict, mu: float) -> torch.Tensor:
        cfg, o, lm = self.prune, self.opts, self.lm
        hidden = mu > 0 and o.self_distill_hidden > 0
        t_out = None
        if mu > 0:
            t_out = self._teacher_out({k: v for k, v in part.items() if k != "labels"}, hidden)
        self._collect = True
        try:
            with self._opt.autocast:
                out = lm.model(**part, output_hidden_states=hidden)
        finally:
            self._collect = False
        if t_out is None:
            if out.loss is None:
                raise ExplorerError("APT's training needs labels (or self-distillation, --self-distill > 0)")
            return out.loss
        mask = part["attention_mask"]
        kd = kd_loss(out.logits, t_out.logits, mask if lm.task == "causal-lm" else None, cfg.kd_temperature)
        if hidden:
            s_hs, t_hs = hidden_pairs(out.hidden_states, t_out.hidden_states, cfg.kd_hidden_every)
            if self.hmask is not None and not self._hones:
                hm = self.hmask
                s_hs = [h * hm.to(h.device, h.dtype) for h in s_hs]
                t_hs = [h * hm.to(h.device, h.dtype) for h in t_hs]
            kd = kd + o.self_distill_hidden * hidden_kd_loss(s_hs, t_hs, mask, cfg.kd_hidden_loss)
        if out.loss is None:
            return kd
        return (1 - mu) * out.loss + mu * kd

    def _step(self, batch: dict, mu: float, step: int) -> float:
        opt = self._opt
        opt.zero_grad()
        total = 0.0
        for part, weight in micro_batches(self.lm, batch):
            self._mask_now = part["attention_mask"]
            self._count_tokens()
            loss = self._loss(part, mu)
            if not torch.isfinite(loss):
                raise ExplorerError(f"APT training diverged at step {step} (loss {loss.item()}); lower the learning rate")
            opt.backward(loss * weight)
            total += loss.item() * weight
        opt.unscale()
        with torch.no_grad():
            for n, a in self.adapters.items():
                if a.B.grad is not None:
                    self.adapter_sal[n] += float((a.B * a.B.grad).abs().sum())
        opt.step()
        return total

    def _make_optimizer(self, T: int) -> None:
        """recovery's Optimisation over the trained parameters; full tuning of a low-precision model
        trains float32 masters under autocast, the adapters (float32) compute beside the weights."""
        lm = self.lm
        if not self.adapters:
            self._masters = float32_masters(lm.model.parameters(), self._dtype)
        dev = next(lm.model.parameters()).device.type
        self._opt = Optimisation(self._trainable(), self._dtype, dev, self.prune.lr or default_lr(self.opts.tuning),
                                 T, autocast=not self.adapters)

    # --- the run ---------------------------------------------------------------------------------
    def _finalize(self) -> None:
        """Merge, fold, remove: the live model becomes plain and physically smaller."""
        self._uninstall()
        restore_dtypes(self._masters)
        hid = self._make_plain(self.lm.model, final=True)
        if hid:
            dense = int((self.lm.plan.get("hidden") or {}).get("dense", hid["dense"]))
            self.lm.plan["hidden"] = {"dense": dense, "size": hid["size"]}
        self.adapters_final = {n: a.rank for n, a in self.adapters.items()}
        self.adapter_params_final = sum(a.n_params for a in self.adapters.values())
        self.adapters = {}
        self.masks, self.targets = {}, {}
        for p in self.lm.model.parameters():
            p.requires_grad_(True)
            p.grad = None
        self.lm.model.eval()

    def _body(self) -> Iterator[dict]:
        lm, cfg, o = self.lm, self.prune, self.opts
        if lm.task not in ("classification", "causal-lm"):
            raise ExplorerError("APT's salience needs gradients: use a classifier or a causal LM")
        K, R = cfg.stages, cfg.recovery_steps
        T = K * R if self.trains else 0
        self.schedule = schedule_for(T, o)
        Tp, f, alpha = self.schedule["prune_steps"], self.schedule["update_frequency"], self.schedule["mask_decay"]
        growth_at = self.schedule["growth_at"]
        dense_layer = [b.params for b in lm.adapter.blocks(lm.model)]
        self._setup()
        if self.trains:
            self._make_optimizer(T)
        s = 0
        info: dict = {}
        for k in range(1, K + 1):
            t0 = time.perf_counter()
            if k == 1 or not self.trains:
                self._calibration_salience(k)
            yield {"type": "analysis", "stage": k, "importance": self._importance()}
            losses: list[float] = []
            if not self.trains:  # no training: the stage's cut at once
                info = self._select(k, K)
                self._ramp(1)
            else:
                if s == 0:  # the first cut, from the calibration estimate
                    info = self._select(min(f, Tp), Tp)
                    self._ramp(Tp + 1, alpha)
                lm.model.train()
                for n, batch in enumerate(_train_batches(lm, self.data, R, cfg.train_batch_size,
                                                         seed=cfg.seed * 1000 + k), start=1):
                    self._check_stop()
                    s += 1
                    mu = o.self_distill * (min(1.0, s / Tp) if Tp > 0 else 1.0)
                    loss = self._step(batch, mu, s)
                    if s % f == 0 or s == T:
                        self._update_salience()
                    if s in growth_at:
                        g = self._grow(growth_at.index(s) + 1, len(growth_at))
                        if g:
                            self.growths.append({"step": s, **g})
                    if s < Tp and s % f == 0:
                        info = self._select(min(s + f, Tp), Tp)
                    if s <= Tp:
                        self._ramp(Tp - s + 1, alpha)
                    losses.append(loss)
                    lm.model.eval()
                    yield {"type": "step", "stage": k, "step": n, "loss": loss}
                    lm.model.train()
                lm.model.eval()
            extra = {"density_target": info.get("density_target"), "planned_removed": info.get("planned_removed"),
                     "density_threshold": info.get("density_threshold"), "optimizer_steps": s,
                     "salience_updates": self.salience_updates}
            if self.masks:
                extra["mask_mean"] = float(torch.cat([m.float() for m in self.masks.values()]).mean())
                extra["masks_at_zero"] = int(sum(int((m == 0).sum()) for m in self.masks.values()))
            if self.hmask is not None:
                extra["hidden_kept"] = int(self.htarget.sum())
            if self.adapters:
                extra["adapter_params"] = sum(a.n_params for a in self.adapters.values())
            if k == K:
                self._finalize()
                rec = self._record(k, losses, time.perf_counter() - t0, self._sparsity(dense_layer), **extra)
            else:
                rec = self._intermediate_record(k, losses, t0, dense_layer, extra)
            yield self._stage_event(rec)
        self.summary = {"final_density_target": 1 - self.allocation.target, "tuning": o.tuning,
                        "optimizer_steps": s, "prune_steps": Tp, "update_frequency": f, "mask_decay": alpha,
                        "schedule": {k: v for k, v in self.schedule.items() if k != "growth_at"},
                        "salience_momentum": self.momentum, "salience_scale": o.salience_scale,
                        "salience_updates": self.salience_updates,
                        "teacher": ("none" if o.self_distill == 0 or not self.trains else
                                    "in place: adapters off, masks 1" if o.tuning == "lora" else "host copy (CPU)"),
                        "adapter_params_initial": self.initial_adapter_params,
                        "adapter_params_final": getattr(self, "adapter_params_final", 0),
                        "adapter_budget": self.adapter_limit, "rank_growths": self.growths,
                        "hidden": lm.plan.get("hidden")}

    def _sparsity(self, dense_layer: list[int]) -> list[float]:
        return [1 - b.params / d for b, d in zip(self.lm.adapter.blocks(self.lm.model), dense_layer)]

    def _intermediate_record(self, k: int, losses, t0: float, dense_layer, extra: dict):
        """Quality of the masked model in place; sizes of the committed plain copy (units at 0 removed)."""
        lm = self.lm
        snap = self._snapshot()
        ev = self._eval()  # quality and speed of the model in place (masked, not yet cut)
        live = lm.model
        lm.model = snap
        try:
            snap_lm = replace(lm, model=snap, device=torch.device("cpu"))
            ev.update(params=snap_lm.n_params, block_params=snap_lm.block_params,
                      flops_per_token=flops_per_token(snap_lm), weight_mb=weight_mb(snap_lm))
            rec = self._record(k, losses, time.perf_counter() - t0, self._sparsity(dense_layer), ev=ev,
                                    evaluated="quality and speed: the masked model in place (not yet cut); "
                                              "sizes: the committed model (units at mask 0 removed)", **extra)
        finally:
            lm.model = live
        self._pending = snap
        return rec


class _Out:
    def __init__(self, logits, hidden_states):
        self.logits, self.hidden_states = logits, hidden_states


def _acc(d: dict, k: str, v: torch.Tensor) -> None:
    v = v.detach()
    d[k] = d[k] + v if k in d else v


def make(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
    return APTRun(lm, data, analysis, allocation, prune, opts=opts, label=label or f"apt target={allocation.target:g}",
                  **run_kw)
