"""UI responsiveness, measured on the server side (no browser):

  * an allocation update (the A / S_base slider): `explorer.allocation.allocate` plus building
    the per-layer figure with `explorer.plots.allocation_chart` (when that module exists) and
    serialising it to JSON as Gradio does;
  * a pruning stage with the library's default settings (what the UI's Prune button runs):
    importance analysis, allocation + surgery, recovery, evaluation, from the run's own events.
"""
from __future__ import annotations

import importlib
import time

from explorer.allocation import allocate
from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
from explorer.importance import analyze
from explorer.pruning import PruningRun

from .common import fresh, log, median


def _plots():
    try:
        return importlib.import_module("explorer.plots")
    except ImportError:
        return None


def allocation_updates(base, data, repeats: int, calib: int = 128) -> list[dict]:
    texts, labels = data.calibration(calib, seed=0)
    # layer importance is all an allocation needs: a forward-only analysis
    imp = analyze(base, texts, None, AnalysisConfig(samples=calib, metric="magnitude_l1"), metrics=("magnitude_l1",))
    plots = _plots()
    chart = getattr(plots, "allocation_chart", None) if plots else None
    amps = [0.01 * (i % 30) for i in range(repeats)]  # the slider moving
    t_alloc, t_fig, t_json = [], [], []
    for a in amps:
        t = time.perf_counter()
        cfg = AllocationConfig(target=0.3, amplitude=a)
        alloc = allocate(imp.normalized_by(cfg.normalization), imp.params, cfg, scores=imp.unit_scores())
        t_alloc.append((time.perf_counter() - t) * 1000)
        if chart:
            t = time.perf_counter()
            fig = chart([l.sparsity for l in alloc.layers], [0.3] * len(alloc.layers), 0.3,
                        clipped=[l.clipped for l in alloc.layers], manual=[l.manual for l in alloc.layers],
                        normalized=[l.importance for l in alloc.layers])
            t_fig.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            fig.to_json()
            t_json.append((time.perf_counter() - t) * 1000)
    layers = len(imp.layer_cos)
    rows = [{"action": f"allocation update: allocate ({base.name}, {layers} layers)", "server_ms": median(t_alloc),
             "model": base.name, "repeats": repeats}]
    if chart:
        both = [a + f for a, f in zip(t_alloc, t_fig)]
        rows.append({"action": f"allocation update: allocate + allocation_chart ({base.name})",
                     "server_ms": median(both), "model": base.name, "repeats": repeats})
        rows.append({"action": f"allocation update: allocate + chart + JSON for the browser ({base.name})",
                     "server_ms": median([b + j for b, j in zip(both, t_json)]), "model": base.name,
                     "repeats": repeats})
    else:
        rows[0]["note"] = "explorer.plots.allocation_chart not found: allocate alone"
    for r in rows:
        log(f"  {r['action']}: {r['server_ms']:.2f} ms")
    return rows


def pruning_stage(base, data, full_defaults: bool, mb=None) -> list[dict]:
    """Time the first stage of a PruningRun, split by its events."""
    lm = fresh(base)
    if full_defaults:
        analysis, prune = AnalysisConfig(), PruneConfig()
    else:
        analysis = AnalysisConfig(samples=mb.calib_samples, batch_size=mb.calib_batch)
        prune = PruneConfig(stages=2, recovery_steps=mb.steps_per_stage, train_batch_size=mb.train_batch_size,
                            eval_samples=64)
    run = PruningRun(lm, data, analysis, AllocationConfig(), prune, timing=full_defaults)
    marks = {}
    t0 = time.perf_counter()
    for ev in run.events():
        now = time.perf_counter()
        if ev["type"] == "dense":
            marks["dense"] = now
        elif ev["type"] == "analysis":
            marks["analysis"] = now
        elif ev["type"] == "step":
            marks.setdefault("first_step", now)
            marks["last_step"] = now
        elif ev["type"] == "stage":
            marks["stage"] = now
            run.stop()
            break
        elif ev["type"] in ("error", "stopped"):
            raise RuntimeError(f"pruning stage failed: {ev}")
    start = marks["dense"]
    n_steps = prune.recovery_steps if prune.recovery != "none" else 0
    first = marks.get("first_step", marks["analysis"])
    last = marks.get("last_step", marks["analysis"])
    step = (last - first) / (n_steps - 1) if n_steps > 1 else 0.0  # one recovery step, estimated
    parts = {"analysis": marks["analysis"] - start,
             "allocation + surgery": max(0.0, first - marks["analysis"] - step),
             "recovery": (last - first) + step if n_steps else 0.0,
             "evaluation (quality + latency)": marks["stage"] - last}
    total = marks["stage"] - start
    cfg = (f"{analysis.samples} calibration samples, {prune.recovery} recovery x {n_steps} steps of "
           f"{prune.train_batch_size}, eval on {'all' if not prune.eval_samples else prune.eval_samples} test examples"
           + (" + latency" if full_defaults else ""))
    rows = [{"action": f"pruning stage ({base.name}; {cfg})", "server_ms": total * 1000, "model": base.name,
             "parts_ms": {k: v * 1000 for k, v in parts.items()}, "dense_eval_ms": (start - t0) * 1000}]
    log(f"  {rows[0]['action']}: {total:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()) + ")")
    return rows
