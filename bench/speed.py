"""Speed: latency and throughput of each pruned architecture against dense and against the
same-width dense limit (explorer.evaluate.same_width_reference: a dense model with the pruned
model's *average* widths in every layer), with parameters and FLOPs.

Latency depends on the architecture only, not on the weights, so each pruned model is rebuilt
from the per-layer widths its quality run recorded (a dense copy sliced by the same surgery).
All models of one size are timed round-robin (dense, every pruned model, every reference, then
again), so load from other jobs falls on all of them alike; the median of each is reported.
"""
from __future__ import annotations

import numpy as np

from explorer.allocation import allocate
from explorer.config import AllocationConfig, AnalysisConfig
from explorer.evaluate import flops_per_token, same_width_reference
from explorer.importance import analyze
from explorer.surgery import widths

from .common import fresh, forward_fn, interleaved, log, median, with_widths
from .config import ModelBench


def widths_from_runs(runs: list[dict], model: str, seed) -> dict[tuple, list[dict]]:
    """(budget, method) -> widths of the first seed's run (the chosen A for adaptive)."""
    out = {}
    for r in runs:
        if r.get("model") != model or r.get("method") == "dense" or r.get("seed") != seed or r.get("error"):
            continue
        if r.get("sweep") and not r.get("chosen"):
            continue
        out.setdefault((r["budget"], r["method"]), r["widths"])
    return out


def widths_from_recon(recon: list[dict], model: str) -> dict[tuple, list[dict]]:
    """(budget, method) -> widths of the recon section's first seed (the refit keeps the plan's counts)."""
    out = {}
    for res in recon:
        if res["model"] != model:
            continue
        first = min(r["seed"] for r in res["rows"])
        for r in res["rows"]:
            if r["seed"] == first and r.get("widths") and r["method"] != "flap+refit":  # flap's plan, once
                out.setdefault((r["budget"], r["method"]), r["widths"])
    return out


def widths_by_allocation(base, data, mb: ModelBench) -> dict[tuple, list[dict]]:
    """Without quality runs: one analysis, then the uniform and adaptive one-shot plans."""
    from explorer.pruning import apply_allocation
    texts, labels = data.calibration(mb.calib_samples, seed=mb.seeds[0])
    lm = fresh(base, mb.max_length)
    imp = analyze(lm, texts, labels if lm.task == "classification" else None,
                  AnalysisConfig(samples=mb.calib_samples, batch_size=mb.calib_batch), metrics=("taylor",))
    out = {}
    for budget in mb.budgets:
        for method, cfg in (("uniform", AllocationConfig(target=budget, mode="uniform")),
                            ("adaptive", AllocationConfig(target=budget, amplitude=mb.amplitudes[0]))):
            alloc = allocate(imp.normalized_by(cfg.normalization), imp.params, cfg, scores=imp.unit_scores())
            pruned = fresh(base)
            apply_allocation(pruned, imp, alloc, "taylor")
            out[(budget, method)] = [{"groups": w["groups"], "neurons": w["neurons"]}
                                     for w in widths(pruned.adapter, pruned.model)]
    return out


def _key(ws: list[dict]) -> tuple:
    return tuple((w["groups"], w["neurons"]) for w in ws)


def run_speed(base, mb: ModelBench, plans: dict[tuple, list[dict]], source: str) -> list[dict]:
    """Speed rows for one model; `plans` maps (budget, method) to per-layer widths."""
    B, T = mb.speed_batch, mb.speed_seq
    archs: dict[tuple, object] = {}
    refs: dict[tuple, tuple] = {}  # pruned arch -> its same-width reference arch
    for ws in plans.values():
        k = _key(ws)
        if k in refs:
            continue
        if k not in archs:
            archs[k] = with_widths(base, ws)
        ref = same_width_reference(archs[k])
        rk = _key(widths(ref.adapter, ref.model))
        refs[k] = rk
        if rk not in archs:
            archs[rk] = ref
    names = {k: f"arch{i}" for i, k in enumerate(archs)}
    fns = {"dense": forward_fn(base, B, T)}
    fns.update({names[k]: forward_fn(lm, B, T) for k, lm in archs.items()})
    log(f"  timing {base.name}: dense + {len(archs)} distinct architectures, batch {B} x {T} tokens, "
        f"{mb.speed_repeats} interleaved repeats")
    times = interleaved(fns, mb.speed_repeats, warmup=1)
    dense_ms = median(times["dense"])
    dense_flops = flops_per_token(base, T)
    rows = []
    for (budget, method), ws in sorted(plans.items()):
        k = _key(ws)
        lm = archs[k]
        ms = median(times[names[k]])
        ref_ms = median(times[names[refs[k]]])
        speedup, limit = dense_ms / ms, dense_ms / ref_ms
        row = {"model": base.name, "budget": budget, "method": method, "speedup": speedup, "limit_speedup": limit,
               "fraction_of_limit": speedup / limit, "dense_ms": dense_ms, "pruned_ms": ms, "same_width_ms": ref_ms,
               "pruned_ms_all": times[names[k]], "dense_ms_all": times["dense"],
               "throughput_tokens_s": B * T / (ms / 1000), "dense_throughput_tokens_s": B * T / (dense_ms / 1000),
               "batch_size": B, "seq_len": T, "repeats": mb.speed_repeats,
               "params": lm.n_params, "dense_params": base.n_params, "block_params": lm.block_params,
               "flops_per_token": flops_per_token(lm, T), "dense_flops_per_token": dense_flops,
               "flops_ratio": flops_per_token(lm, T) / dense_flops,
               "heads": [w["groups"] for w in ws], "neurons": [w["neurons"] for w in ws],
               "own_reference": refs[k] == k,  # the same widths in every layer: 100 % of the limit by construction
               "widths_from": source}
        rows.append(row)
        log(f"  {base.name} {method:<13} budget {budget:.0%}: {ms:.0f} ms vs dense {dense_ms:.0f} ms -> "
            f"{speedup:.2f}x (same-width limit {limit:.2f}x, {speedup / limit:.0%} of it); "
            f"FLOPs {row['flops_ratio']:.2f} of dense")
    return rows


def spread(rows: list[dict]) -> dict:
    """Relative spread (IQR / median) of the dense timings, a noise indicator for the report."""
    out = {}
    for r in rows:
        xs = np.asarray(r["dense_ms_all"])
        if len(xs) > 1:
            out[r["model"]] = float((np.percentile(xs, 75) - np.percentile(xs, 25)) / np.median(xs))
    return out
