"""AdaPruner (seed `adapruner-sample-aware-summary.md`): Bayesian optimisation (Optuna's TPE)
over the choice of calibration samples and the coarse/fine importance mix, then pruning with
the best configuration and recovery.

Search space (one trial = one configuration):
  subset     which calibration samples: subset s takes the s-th disjoint chunk of
             `analysis.samples` examples of the training split (TextData.calibration, stage=s),
             s in 0..subsets-1;
  alpha1     weight of the coarse, vector-wise Taylor importance I_vector = |Σ w·∂L/∂w| per unit;
             the fine, element-wise I_element = Σ|w·∂L/∂w| gets alpha2 = 1 - alpha1. Each is
             divided by its mean over the units of its (layer, kind) before mixing, so only the
             ratio alpha1 : alpha2 matters and one number spans the space;
  amplitude  A of the per-layer allocation (only with option search_amplitude=True; range
             [0, amplitude_max]).
Each trial cuts the model one-shot to the target (allocation as configured, units by
I = alpha1·I_vector + alpha2·I_element) without copying it: the removed units' channels of the
output projections are zeroed for the trial and put back after (`base.zeroed_units`, exactly a
cut's output), and the cut is scored on the **val** split (never test):
mean cross-entropy for classifiers, perplexity for LMs (lower is better). Importance per subset
is computed once on the dense model and cached. One "trial" event per trial carries
{trial, value, params, best_value, best_params}.

Then the real model is pruned with the best configuration in `stages` incremental stages
(stage k estimates on subset (best + k - 1) mod subsets of the pruned model), each followed by
the configured recovery (LoRA by default, as in the paper).
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Iterator

from ..allocation import allocate
from ..config import AdaPrunerOptions
from ..errors import Cancelled, ExplorerError
from ..pruning import plan_keeps
from .base import MethodRun, mixed_importance, val_objective, zeroed_units


def tpe_search(objective: Callable[[dict], float], space: dict[str, tuple], trials: int, seed: int = 0,
               should_stop: Callable[[], bool] | None = None, startup: int | None = None) -> Iterator[dict]:
    """Minimise `objective(params)` with Optuna's TPE sampler (seeded); yields one "trial"
    event per trial. `space`: name -> ("int", lo, hi) | ("float", lo, hi) (inclusive)."""
    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {k: IntDistribution(lo, hi) if t == "int" else FloatDistribution(lo, hi)
             for k, (t, lo, hi) in space.items()}
    n_startup = startup if startup is not None else min(10, max(3, trials // 3))
    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup))
    for n in range(trials):
        if should_stop and should_stop():
            raise Cancelled()
        trial = study.ask(dists)
        value = float(objective(dict(trial.params)))
        study.tell(trial, value)
        yield {"type": "trial", "trial": n + 1, "value": value, "params": dict(trial.params),
               "best_value": study.best_value, "best_params": dict(study.best_params)}


class AdaPrunerRun(MethodRun):
    method = "adapruner"
    Options = AdaPrunerOptions

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        o = self.opts
        self.trials, self.subsets = o.trials, o.subsets
        self.search_amplitude, self.amplitude_max = o.search_amplitude, o.amplitude_max
        self.val_samples = o.val_samples
        self.seed = self.prune.seed
        self._cache: dict[int, object] = {}

    def _val_n(self) -> int:
        if self.val_samples:
            return self.val_samples
        return 256 if self.lm.task == "classification" else 4096

    def _dense_importance(self, subset: int):
        if subset not in self._cache:
            texts, labels = self.data.calibration(self.analysis.samples, stage=subset, seed=self.analysis.seed)
            self._cache[subset] = self._analyze(texts, labels, ("taylor", "taylor_vector"))
        return self._cache[subset]

    def _trial_params(self, p: dict) -> dict:
        out = {"subset": int(p["subset"]), "alpha1": float(p["alpha1"]), "alpha2": 1 - float(p["alpha1"])}
        out["amplitude"] = float(p["amplitude"]) if "amplitude" in p else self.allocation.amplitude
        return out

    def _objective(self, p: dict) -> float:
        q = self._trial_params(p)
        imp = mixed_importance(self._dense_importance(q["subset"]), q["alpha1"], q["alpha2"])
        alloc = allocate(imp.normalized_by(self.allocation.normalization), imp.params,
                         replace(self.allocation, amplitude=q["amplitude"]), scores=imp.unit_scores())
        with zeroed_units(self.lm, plan_keeps(imp, alloc, metric="mix")) as cut:  # no copy of the model
            value, self._objective_name = val_objective(cut, self.data, self._val_n())
        return value

    def _body(self) -> Iterator[dict]:
        if self.lm.task not in ("classification", "causal-lm"):
            raise ExplorerError("AdaPruner scores trials by loss/perplexity: use a classifier or a causal LM")
        space = {"subset": ("int", 0, self.subsets - 1), "alpha1": ("float", 0.0, 1.0)}
        if self.search_amplitude:
            space["amplitude"] = ("float", 0.0, self.amplitude_max)
        t0 = time.perf_counter()
        history = []
        self._objective_name = "val_loss"
        last = None
        for ev in tpe_search(self._objective, space, self.trials, self.seed, self._should_stop):
            ev["params"] = self._trial_params(ev["params"])
            ev["best_params"] = self._trial_params(ev["best_params"])
            ev["objective"] = self._objective_name
            history.append({k: ev[k] for k in ("trial", "value", "params")})
            last = ev
            yield ev
        best = last["best_params"]
        self.summary = {"objective": self._objective_name, "trials": history, "best_params": best,
                        "best_value": last["best_value"], "search_seconds": time.perf_counter() - t0,
                        "val_samples": self._val_n()}
        self.allocation = replace(self.allocation, amplitude=best["amplitude"])
        self._cache.clear()

        def importance(k: int):
            subset = (best["subset"] + k - 1) % self.subsets
            texts, labels = self.data.calibration(self.analysis.samples, stage=subset, seed=self.analysis.seed)
            imp = self._analyze(texts, labels, ("taylor", "taylor_vector"))
            return mixed_importance(imp, best["alpha1"], best["alpha2"])
        yield from self._structured_stages(importance)


def make(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
    opts = opts or AdaPrunerOptions()
    return AdaPrunerRun(lm, data, analysis, allocation, prune, opts=opts, label=label or f"adapruner {opts.trials} trials",
                        **run_kw)
