"""AdaPruner (seed `adapruner-sample-aware-summary.md`, arXiv 2503.06184): Bayesian optimisation
(Optuna's TPE) over the choice of calibration samples and of the importance estimate, then
pruning with the best configuration in every stage, and recovery.

Search space (one trial = one configuration):
  subset     which calibration samples, a **categorical** choice (optuna CategoricalDistribution
             over the subset ids 0..subsets-1): subset s is the s-th disjoint chunk of
             `analysis.samples` training examples (TextData.calibration, stage=s);
  order      which Taylor terms, categorical: first, second or both (option taylor_orders fixes one);
  alpha1     the equilibrium coefficient of the coarse (vector-wise) estimate, float in [0, 1];
             the fine (element-wise) one gets alpha2 = 1 - alpha1;
  amplitude  A of the per-layer allocation (only with search_amplitude=True; [0, amplitude_max]).

The importance of a unit u (attention group / head / neuron) with weights w_k, G_k = Σ_b g_bk the
gradient summed over the calibration batches b and g_bk batch b's gradient (its mean loss):
  first order    I_vec¹ = |Σ_k w_k G_k|                 (metric taylor_vector)
                 I_elem¹ = Σ_k |w_k G_k|                (metric taylor)
  second order   I_vec² = ½ Σ_b (Σ_k w_k g_bk)²         (metric fisher_vector: ½ wᵀFw with the
                                                          empirical Fisher F = Σ_b g_b g_bᵀ of the unit)
                 I_elem² = ½ Σ_b Σ_k (w_k g_bk)²        (metric fisher: ½ Σ_k w_k² F_kk, the Hessian
                                                          diagonal approximated by the Fisher diagonal)
  both           I_x = I_x¹ + I_x²  (the magnitudes of the two Taylor terms added, |g·w| + ½(g·w)²
                 with the Fisher in place of (g·w)²)
  mix            I = alpha1 · norm(I_vec) + alpha2 · norm(I_elem)   (metric "mix")
norm(.) divides by the mean over the units of the (layer, kind), so only alpha1 : alpha2 matters.
I_vec² needs per-batch vector sums, which the library's pass does not keep: it is computed from
one extra gradient pass over the subset, batch by batch (same batches as the main pass), so a
subset costs two gradient passes when second order is searched.

A trial cuts the dense model one-shot to the target (allocation as configured, units by the mix)
**without copying it** and scores the cut on the **val** split (never test): mean
cross-entropy for classifiers, perplexity for LMs (lower is better). With trial_refit (default)
the cut is reconstructed cheaply: for each subset, the Gram statistics G = Σ_t w_t x_t x_tᵀ,
s = Σ w_t x_t, n = Σ w_t of every output projection's input x (o_proj / down_proj ...) are taken
once on the **dense** model (token weights w_t as prune.recon_weighting); per trial, per cut
projection, the kept channels K get the library's ridge refit (`reconstruct.refit`)
    W', b' = argmin Σ_t w_t ‖W x_t + b − W' x_t,K − b'‖² + λ Σ_k D_k ‖W'_:,k − W_:,k‖²,  D = diag G_KK
(λ = trial_lambda; b' only where the projection already has a bias), written in place (removed
channels 0, kept ones W'); only those projections' weights and biases are saved and put back.
Departure: the trial refit is **non-sequential** (every layer's statistics come from the dense
stream, not from the already-cut layers below, and no λ is chosen on held-out tokens) — it
ranks configurations, it is not the final model. trial_refit=False scores the plain cut
(`base.zeroed_units`). One "trial" event per trial carries {trial, value, params, best_value,
best_params, seconds}; summary["trials"] the same per trial (`plots.search_curve` draws it).

Then the real model is pruned in `stages` incremental stages, **every** stage with the best
configuration: its subset (re-estimated on the pruned model each stage; the reconstruction's
calibration samples are that subset too, unless prune.recon_samples is set), its order, its
alpha1 and its amplitude; each stage's cut uses the library's layer-sequential reconstruction
when prune.recovery starts with "reconstruct" (with keep_searched_units, recon_select is
"metric" so the searched importance chooses the units; "obs" would re-choose them), then the
configured training. Departures from the paper: LoRA recovery is whatever prune.recovery says;
the search objective is the val loss / perplexity of our models rather than WikiText2 / PTB.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..allocation import allocate
from ..config import AdaPrunerOptions
from ..errors import Cancelled, ExplorerError
from ..importance import Importance, analysis_batch_size
from ..pruning import plan_keeps
from ..reconstruct import GramStats, out_weight, refit, token_weights
from .base import MethodRun, add_metric, normalized_scores, val_objective, zeroed_units

ORDERS = ("first", "second", "both")
TERMS = {"first": (("taylor_vector",), ("taylor",)), "second": (("fisher_vector",), ("fisher",)),
         "both": (("taylor_vector", "fisher_vector"), ("taylor", "fisher"))}  # order -> (vector, element) metrics


def tpe_search(objective: Callable[[dict], float], space: dict[str, tuple], trials: int, seed: int = 0,
               should_stop: Callable[[], bool] | None = None, startup: int | None = None) -> Iterator[dict]:
    """Minimise `objective(params)` with Optuna's TPE sampler (seeded); yields one "trial"
    event per trial. `space`: name -> ("int", lo, hi) | ("float", lo, hi) (inclusive) |
    ("cat", choices) (an unordered choice: optuna's CategoricalDistribution)."""
    import optuna  # local: optional and slow to import, only AdaPruner's search needs it
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def dist(spec):
        if spec[0] == "cat":
            return CategoricalDistribution(tuple(spec[1]))
        kind, lo, hi = spec
        return IntDistribution(lo, hi) if kind == "int" else FloatDistribution(lo, hi)
    dists = {k: dist(v) for k, v in space.items()}
    n_startup = startup if startup is not None else min(10, max(3, trials // 3))
    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup))
    for n in range(trials):
        if should_stop and should_stop():
            raise Cancelled()
        trial = study.ask(dists)
        t0 = time.perf_counter()
        value = float(objective(dict(trial.params)))
        seconds = time.perf_counter() - t0
        study.tell(trial, value)
        yield {"type": "trial", "trial": n + 1, "value": value, "params": dict(trial.params),
               "best_value": study.best_value, "best_params": dict(study.best_params), "seconds": seconds}


# --- importance ---------------------------------------------------------------------------

def taylor_mix(imp: Importance, order: str, alpha1: float, name: str = "mix") -> Importance:
    """imp's metric `name` = alpha1·norm(I_vec) + (1 - alpha1)·norm(I_elem) with the terms of
    `order` (TERMS), each granularity's terms added raw, then normalised to mean 1 per (layer, kind)."""
    vec, elem = TERMS[order]

    def fn(kind, i, where):
        src = getattr(imp, where)
        v = sum(np.asarray(src[m][i], np.float64) for m in vec)
        e = sum(np.asarray(src[m][i], np.float64) for m in elem)
        return alpha1 * normalized_scores(v) + (1 - alpha1) * normalized_scores(e)
    return add_metric(imp, name, fn)


# --- the per-trial refit --------------------------------------------------------------------

def _groups(lm):
    """Per block: (attention UnitGroup, MLP UnitGroup)."""
    return [(b.attn, b.mlp) for b in lm.adapter.blocks(lm.model)]


def unit_channels(group, kept) -> torch.Tensor:
    """Input channels of the out_module that belong to the kept units (act_unit_size each)."""
    u = group.act_unit_size
    dev = group.out_module.weight.device
    return torch.cat([torch.arange(k * u, (k + 1) * u, device=dev) for k in sorted(kept)])


@torch.no_grad()
def dense_grams(lm, texts: list[str], batch_size: int, max_length: int | None = None,
                relative: bool = True) -> list[tuple[GramStats, GramStats]]:
    """Per block (attention, MLP): Gram statistics of the out_module's input on the model as it
    is (Σ w x xᵀ, Σ w x, Σ w over the real tokens; w = reconstruct.token_weights when `relative`,
    else 1), accumulated in float64 and kept in float32 (the weights' device)."""
    groups = _groups(lm)
    stats = [tuple(GramStats.zeros(g.n_units * g.act_unit_size, g.out_module.weight.device) for g in pair)
             for pair in groups]
    cur: dict = {}
    handles = []

    def hook_for(st):
        def hook(module, args):
            x, mask = args[0], cur["mask"].to(args[0].device)  # (B, T, C), (B, T)
            w = token_weights(module, x, mask) if relative else None
            st.add(x[mask], None if w is None else w[mask])
        return hook
    for pair, st_pair in zip(groups, stats):
        for g, st in zip(pair, st_pair):
            handles.append(g.out_module.register_forward_pre_hook(hook_for(st)))
    was_training = lm.model.training
    lm.model.eval()
    try:
        for _, batch in lm.forward_batches(texts, batch_size, max_length):
            cur["mask"] = batch["attention_mask"].bool()
            lm.model(**batch)
    finally:
        for h in handles:
            h.remove()
        lm.model.train(was_training)
    return [tuple(GramStats(st.G.float(), st.s.float(), st.n) for st in pair) for pair in stats]


@contextmanager
def refit_units(lm, keeps: list[tuple[list[int] | None, list[int] | None]], grams, lam: float,
                fit_bias: bool = True) -> Iterator:
    """The model as if cut to `keeps` and each cut output projection refit by ridge least
    squares (`reconstruct.refit`, relative ridge `lam`) from the dense Gram statistics `grams`
    (`dense_grams`), written in place: removed channels 0, kept channels W', bias b' where the
    projection has one. Only those projections' weights (and biases) are saved, and copied
    back on exit (bit-identical); no model copy."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for (pair, keep, st_pair) in zip(_groups(lm), keeps, grams):
                for g, kept, st in zip(pair, keep, st_pair):
                    if kept is None or len(kept) >= g.n_units:
                        continue
                    m = g.out_module
                    W = out_weight(m).detach().double()  # (out, C)
                    has_bias = m.bias is not None
                    b = m.bias.detach().double() if has_bias else None
                    ch = unit_channels(g, kept)
                    Wn, bn = refit(W, b, GramStats(st.G.double(), st.s.double(), st.n), ch, lam, fit_bias and has_bias)
                    full = torch.zeros_like(W)
                    full[:, ch] = Wn
                    saved.append((m.weight, m.weight.detach().clone()))
                    m.weight.copy_(full if isinstance(m, nn.Linear) else full.T)
                    if fit_bias and has_bias:
                        saved.append((m.bias, m.bias.detach().clone()))
                        m.bias.copy_(bn)
        yield lm
    finally:
        with torch.no_grad():
            for p, old in reversed(saved):
                p.copy_(old)


# --- the run -------------------------------------------------------------------------------

class AdaPrunerRun(MethodRun):
    method = "adapruner"
    Options = AdaPrunerOptions

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        o = self.opts
        self.trials, self.subsets = o.trials, o.subsets
        self.orders = ORDERS if o.taylor_orders == "all" else (o.taylor_orders,)
        self.seed = self.prune.seed
        self._imp: dict[int, Importance] = {}
        self._grams: dict[int, list] = {}
        self.best: dict | None = None
        self.stage_configs: list[dict] = []  # what each final stage used (for the report and tests)
        if self.final_plan is not None and o.search_amplitude:
            raise ExplorerError("search_amplitude searches the A of the per-layer allocation, but this run prunes "
                                "to the per-layer table set by hand: turn search_amplitude off, or reset the hand "
                                "edits / drop --plan")

    def _cleanup(self) -> None:
        self._imp.clear()
        self._grams.clear()

    # --- pieces ---
    def _val_n(self) -> int:
        if self.opts.val_samples:
            return self.opts.val_samples
        return 256 if self.lm.task == "classification" else 4096

    def _subset(self, s: int):
        return self.data.calibration(self.analysis.samples, stage=s, seed=self.analysis.seed)

    def _calibration(self, stage: int):
        """After the search every stage (its reconstruction too) uses the best subset."""
        if self.best is not None:
            return self._subset(self.best["subset"])
        return super()._calibration(stage)

    def _taylor(self, texts, labels, second: bool = True) -> Importance:
        """taylor, taylor_vector, fisher from one pass; with `second`, fisher_vector
        (½ Σ_b (Σ w·g_b)²) from one more pass, batch by batch over the same batches."""
        imp = self._analyze(texts, labels, ("taylor", "taylor_vector", "fisher"))
        if not second:
            return imp
        bs = analysis_batch_size(self.lm, self.analysis, grads=True)
        sq = None
        for i in range(0, len(texts), bs):
            part = self._analyze(texts[i:i + bs], labels[i:i + bs] if labels is not None else None, ("taylor_vector",))
            cur = [[np.asarray(x, np.float64) ** 2 for x in getattr(part, where)["taylor_vector"]]
                   for where in ("heads", "groups", "neurons")]
            sq = cur if sq is None else [[a + c for a, c in zip(A, C)] for A, C in zip(sq, cur)]
        for where, vals in zip(("heads", "groups", "neurons"), sq):
            getattr(imp, where)["fisher_vector"] = [0.5 * v for v in vals]
        return imp

    def _dense_importance(self, s: int) -> Importance:
        if s not in self._imp:
            self._imp[s] = self._taylor(*self._subset(s), second=self.orders != ("first",))
        return self._imp[s]

    def _dense_grams(self, s: int):
        if s not in self._grams:
            texts, _ = self._subset(s)
            self._grams[s] = dense_grams(self.lm, texts, self.analysis.batch_size, self.analysis.max_length or None,
                                         relative=self.prune.recon_weighting == "relative")
        return self._grams[s]

    def _trial_params(self, p: dict) -> dict:
        a1 = float(p["alpha1"])
        out = {"subset": int(p["subset"]), "order": str(p.get("order", self.orders[0])), "alpha1": a1, "alpha2": 1 - a1}
        out["amplitude"] = float(p["amplitude"]) if "amplitude" in p else self.allocation.amplitude
        return out

    def space(self) -> dict[str, tuple]:
        sp = {"subset": ("cat", tuple(range(self.subsets))), "alpha1": ("float", 0.0, 1.0)}
        if len(self.orders) > 1:
            sp["order"] = ("cat", self.orders)
        if self.opts.search_amplitude:
            sp["amplitude"] = ("float", 0.0, self.opts.amplitude_max)
        return sp

    def _plan(self, imp: Importance, amplitude: float):
        """A trial's one-shot plan: the allocation with `amplitude`, or the table set by hand."""
        if self.final_plan is not None:
            return self._one_shot_plan(imp)
        return allocate(imp.normalized_by(self.allocation.normalization), imp.params,
                        replace(self.allocation, amplitude=amplitude), scores=imp.unit_scores())

    def _objective(self, p: dict) -> float:
        q = self._trial_params(p)
        imp = taylor_mix(self._dense_importance(q["subset"]), q["order"], q["alpha1"])
        keeps = plan_keeps(imp, self._plan(imp, q["amplitude"]), metric="mix")
        if self.opts.trial_refit:
            cut = refit_units(self.lm, keeps, self._dense_grams(q["subset"]), self.opts.trial_lambda,
                              fit_bias=self.prune.recon_bias)
        else:
            cut = zeroed_units(self.lm, keeps)
        with cut as lm:  # no copy of the model: slices of the output projections, put back on exit
            value, self._objective_name = val_objective(lm, self.data, self._val_n())
        return value

    def _body(self) -> Iterator[dict]:
        if self.lm.task not in ("classification", "causal-lm"):
            raise ExplorerError("AdaPruner scores trials by loss/perplexity: use a classifier or a causal LM")
        space = self.space()
        t0 = time.perf_counter()
        history = []
        self._objective_name = "val_loss"
        last = None
        for ev in tpe_search(self._objective, space, self.trials, self.seed, self._should_stop):
            ev["params"] = self._trial_params(ev["params"])
            ev["best_params"] = self._trial_params(ev["best_params"])
            ev["objective"] = self._objective_name
            history.append({k: ev[k] for k in ("trial", "value", "params", "best_value", "seconds")})
            last = ev
            yield ev
        best = self.best = last["best_params"]
        secs = [h["seconds"] for h in history]
        self.summary = {"objective": self._objective_name, "trials": history, "best_params": best,
                        "best_value": last["best_value"], "search_seconds": time.perf_counter() - t0,
                        "seconds_per_trial": float(np.mean(secs)),
                        "seconds_per_trial_median": float(np.median(secs)),
                        "val_samples": self._val_n(),
                        "space": {k: list(v[1]) if v[0] == "cat" else [v[1], v[2]] for k, v in space.items()},
                        "trial_scoring": ("one-shot cut + per-layer ridge refit from dense Gram matrices "
                                          "(non-sequential)" if self.opts.trial_refit else "one-shot cut (zeroed channels)")}
        self._imp.clear()
        self._grams.clear()
        self.allocation = replace(self.allocation, amplitude=best["amplitude"])
        if self.reconstructs and self.opts.keep_searched_units:
            self.prune = replace(self.prune, recon_select="metric")

        def importance(k: int) -> Importance:
            texts, labels = self._subset(best["subset"])
            self.stage_configs.append({"stage": k, **best, "samples": list(texts)})
            imp = self._taylor(texts, labels, second=best["order"] != "first")
            return taylor_mix(imp, best["order"], best["alpha1"])
        for ev in self._structured_stages(importance):
            if ev["type"] == "analysis":
                ev["config"] = best
            if ev["type"] == "stage":
                ev["record"].extra = {"config": best}
            yield ev


def make(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
    opts = opts or AdaPrunerOptions()
    return AdaPrunerRun(lm, data, analysis, allocation, prune, opts=opts, label=label or f"adapruner {opts.trials} trials",
                        **run_kw)
