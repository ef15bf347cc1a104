"""Quality at equal parameters: dense, uniform, adaptive (best A on val), Torch-Pruning and
one-shot, at each budget, over seeds, with the same recovery budget for every pruned model.

One run = a fresh copy of the dense model pruned to the budget by one method. Every run
records its val and test quality, size and per-layer widths (the speed section rebuilds
each architecture from those widths).
"""
from __future__ import annotations

import statistics
import time

from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
from explorer.evaluate import flops_per_token
from explorer.methods import make_run
from explorer.surgery import widths

from .common import fresh, higher_is_better, log, metric_of, quality
from .config import ModelBench
from .tp_baseline import tp_run


def prune_config(mb: ModelBench, seed: int, stages: int | None = None, lm=None) -> PruneConfig:
    k = stages or mb.stages
    steps = mb.steps_per_stage * mb.stages // k  # the same total recovery steps for every schedule
    small_eval = 64 if lm is None or lm.task == "classification" else 128
    return PruneConfig(stages=k, recovery=mb.recovery, recovery_steps=steps, train_batch_size=mb.train_batch_size,
                       eval_samples=small_eval, seed=seed)


def analysis_config(mb: ModelBench, seed: int) -> AnalysisConfig:
    return AnalysisConfig(samples=mb.calib_samples, batch_size=mb.calib_batch, seed=seed)


def _finish(lm, data, mb: ModelBench, rec: dict, original: int, need_val: bool = True) -> dict:
    """Evaluate a finished run; val only where it is used (choosing A) unless mb.val_for_all."""
    t = time.perf_counter()
    val = quality(lm, data, "val", mb) if need_val or mb.val_for_all else None
    rec.update({"val": val, "test": quality(lm, data, "test", mb),
                "params": lm.n_params, "block_params": lm.block_params,
                "removed_fraction": 1 - lm.block_params / original,
                "flops_per_token": flops_per_token(lm, mb.speed_seq),
                "widths": [{"groups": w["groups"], "neurons": w["neurons"]} for w in widths(lm.adapter, lm.model)],
                "eval_seconds": time.perf_counter() - t})
    return rec


def explorer_run(base, data, mb: ModelBench, method: str, budget: float, seed: int, amplitude: float = 0.0,
                 stages: int | None = None, label: str | None = None, need_val: bool = False) -> dict:
    """Prune a fresh copy with a method from explorer.methods; returns the run record."""
    lm = fresh(base, mb.max_length)
    original = lm.block_params
    prune = prune_config(mb, seed, stages, lm)
    t0 = time.perf_counter()
    run = make_run(method, lm, data, analysis_config(mb, seed), AllocationConfig(target=budget, amplitude=amplitude),
                   prune, timing=False)
    for ev in run.events():
        if ev["type"] == "error":
            raise RuntimeError(f"{method} failed: {ev['message']}")
        if ev["type"] == "stopped":
            raise RuntimeError(f"{method} stopped")
    seconds = time.perf_counter() - t0
    rec = {"model": base.name, "budget": budget, "method": label or method, "seed": seed, "amplitude": amplitude,
           "stages": prune.stages, "recovery_steps_total": prune.stages * prune.recovery_steps,
           "run_seconds": seconds}
    rec = _finish(lm, data, mb, rec, original, need_val)
    log(f"  {base.name} {rec['method']:<13} budget {budget:.0%} seed {seed} A={amplitude:g} K={prune.stages}: "
        f"removed {rec['removed_fraction']:.3f}, val {_f(rec['val'])}, test {rec['test']:.4f} ({seconds:.0f} s)")
    return rec


def tp_method(importance: str) -> str:
    return "torch-pruning" if importance == "taylor" else f"torch-pruning-{importance}"


def torch_pruning_run(base, data, mb: ModelBench, budget: float, seed: int, importance: str = "taylor") -> dict:
    lm = fresh(base, mb.max_length)
    original = lm.block_params
    prune = prune_config(mb, seed, None, lm)
    out = tp_run(lm, data, budget, prune, mb.calib_samples, mb.calib_batch, seed, importance=importance)
    method = tp_method(importance)
    rec = {"model": base.name, "budget": budget, "method": method, "seed": seed, "amplitude": None,
           "stages": prune.stages, "recovery_steps_total": len(out["losses"]), "run_seconds": out["seconds"],
           "tp_seconds": out["tp_seconds"],
           "tp_scope": ("heads + FFN channels" if lm.adapter.family == "BERT" else "FFN channels only (GQA)")
           + f", {'GroupTaylorImportance' if importance == 'taylor' else 'GroupMagnitudeImportance(p=2)'}"}
    rec = _finish(lm, data, mb, rec, original, need_val=False)
    log(f"  {base.name} {method} budget {budget:.0%} seed {seed} K={prune.stages}: removed "
        f"{rec['removed_fraction']:.3f}, val {_f(rec['val'])}, test {rec['test']:.4f} ({out['seconds']:.0f} s)")
    return rec


def _f(v) -> str:
    return "–" if v is None else f"{v:.4f}"


def _summary(model: str, budget: float, method: str, metric: str, recs: list[dict], **extra) -> dict:
    vals = [r["test"] for r in recs]
    vv = [r["val"] for r in recs if r.get("val") is not None]
    return {"model": model, "budget": budget, "method": method, "metric": metric,
            "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "seeds": [r["seed"] for r in recs], "values": vals,
            "val_mean": statistics.fmean(vv) if vv else None,
            "removed_fraction": statistics.fmean(r["removed_fraction"] for r in recs),
            "params": recs[0]["params"], **extra}


def run_quality(base, data, mb: ModelBench) -> tuple[list[dict], list[dict]]:
    """(quality rows, run records) for one model."""
    metric = metric_of(base)
    better = max if higher_is_better(metric) else min
    rows, runs = [], []
    t = time.perf_counter()
    dense = {"model": base.name, "budget": 0.0, "method": "dense", "seed": None, "stages": 0,
             "recovery_steps_total": 0}
    dense = _finish(base, data, mb, dense, base.block_params)
    log(f"  {base.name} dense: val {dense['val']:.4f}, test {dense['test']:.4f} ({time.perf_counter() - t:.0f} s)")
    runs.append(dense)
    rows.append({"model": base.name, "budget": 0.0, "method": "dense", "metric": metric, "mean": dense["test"],
                 "std": 0.0, "seeds": [], "values": [dense["test"]], "val_mean": dense["val"],
                 "removed_fraction": 0.0, "params": dense["params"]})
    for budget in mb.budgets:
        sweep_seeds = mb.seeds if mb.sweep_all_seeds else mb.seeds[:1]
        sweep: dict[float, list[dict]] = {}
        for seed in sweep_seeds:
            for a in mb.amplitudes:
                sweep.setdefault(a, []).append(explorer_run(base, data, mb, "adaptive", budget, seed, a,
                                                            need_val=True))
        val_by_a = {a: statistics.fmean(r["val"] for r in recs) for a, recs in sweep.items()}
        best_a = better(val_by_a, key=lambda a: val_by_a[a])
        log(f"  {base.name} budget {budget:.0%}: val by A {({a: round(v, 4) for a, v in val_by_a.items()})} "
            f"-> A = {best_a:g}")
        by_method: dict[str, list[dict]] = {"uniform": [], "adaptive": [],
                                            **{tp_method(i): [] for i in mb.tp_importances}, "one-shot": []}
        for seed in mb.seeds:
            by_method["uniform"].append(explorer_run(base, data, mb, "uniform", budget, seed))
            pre = [r for r in sweep[best_a] if r["seed"] == seed]
            by_method["adaptive"].append(pre[0] if pre else explorer_run(base, data, mb, "adaptive", budget, seed, best_a))
            if mb.torch_pruning:
                for importance in mb.tp_importances:
                    try:
                        by_method[tp_method(importance)].append(
                            torch_pruning_run(base, data, mb, budget, seed, importance))
                    except Exception as e:  # recorded in the run list and the report, not fatal
                        log(f"  {base.name} {tp_method(importance)} budget {budget:.0%} seed {seed}: FAILED {e}")
                        runs.append({"model": base.name, "budget": budget, "method": tp_method(importance),
                                     "seed": seed, "error": f"{type(e).__name__}: {e}"[:400]})
            if mb.one_shot and mb.stages > 1:
                by_method["one-shot"].append(explorer_run(base, data, mb, "adaptive", budget, seed, best_a,
                                                          stages=1, label="one-shot"))
        for recs in sweep.values():
            for r in recs:
                r["sweep"] = True
                r["chosen"] = r["amplitude"] == best_a
                runs.append(r)
        for name, recs in by_method.items():
            runs.extend(r for r in recs if not r.get("sweep"))
            if not recs:
                continue
            extra = {"amplitude": best_a, "val_by_amplitude": val_by_a} if name in ("adaptive", "one-shot") else {}
            if name.startswith("torch-pruning"):
                extra["scope"] = recs[0].get("tp_scope")
            extra["stages"] = recs[0]["stages"]
            extra["recovery_steps_total"] = recs[0]["recovery_steps_total"]
            rows.append(_summary(base.name, budget, name, metric, recs, **extra))
        log(f"  {base.name} budget {budget:.0%} test {metric}: " + ", ".join(
            f"{r['method']} {r['mean']:.4f}±{r['std']:.4f}" for r in rows if r["budget"] == budget))
    return rows, runs
