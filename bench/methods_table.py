"""Issue #5's comparison table: every method in explorer.methods.METHODS (whatever the
registry holds at run time) at each budget on one model, with one recovery budget for all
(the same AnalysisConfig / PruneConfig is handed to every method; what each method does with
it is its own business, and the steps it actually trained are recorded from its events).

Structural methods are timed against dense (round-robin, median); masks-only methods
(`structural=False`) report quality and "no speed-up (masks)".
"""
from __future__ import annotations

import time

from explorer.config import AllocationConfig
from explorer.evaluate import flops_per_token
from explorer.methods import METHODS, make_run

from .common import fresh, forward_fn, interleaved, log, median, quality
from .config import BenchConfig, ModelBench
from .quality import analysis_config, prune_config


def steps_of(run) -> int:
    """Run a method to its end; the optimiser steps it trained (its "step" events). A run that
    stops or fails raises, with its message."""
    steps = 0
    for ev in run.events():
        if ev["type"] == "step":
            steps += 1
        elif ev["type"] in ("error", "stopped"):
            raise RuntimeError(ev.get("message", ev["type"]))
    return steps


def run_methods(base, data, mb: ModelBench, cfg: BenchConfig, amplitude: float) -> list[dict]:
    rows = []
    dense_q = None
    seed = cfg.methods_seed
    test_mb = mb if not cfg.methods_test_n else type(mb)(**{**mb.__dict__, "test_n": cfg.methods_test_n})
    t = time.perf_counter()
    dense_q = quality(base, data, "test", test_mb)
    log(f"  dense {base.name}: test {dense_q:.4f} ({time.perf_counter() - t:.0f} s); methods: {', '.join(METHODS)}")
    dense_fn = forward_fn(base, mb.speed_batch, mb.speed_seq)
    for budget in cfg.methods_budgets:
        for name, method in list(METHODS.items()):
            lm = fresh(base, mb.max_length)
            original = lm.block_params
            prune = prune_config(mb, seed, None, lm)
            row = {"model": base.name, "budget": budget, "method": name, "structural": method.structural,
                   "description": method.description, "seed": seed, "stages": prune.stages,
                   "recovery_steps_per_stage": prune.recovery_steps, "recovery": prune.recovery,
                   "amplitude": amplitude, "dense": dense_q}
            t0 = time.perf_counter()
            steps = 0
            try:
                run = make_run(name, lm, data, analysis_config(mb, seed),
                               AllocationConfig(target=budget, amplitude=amplitude), prune, timing=False)
                steps = steps_of(run)
            except Exception as e:  # one failing method must not sink the table
                row.update({"error": f"{type(e).__name__}: {e}"[:300], "seconds": time.perf_counter() - t0})
                rows.append(row)
                log(f"  {name:<17} {budget:.0%}: FAILED {row['error']}")
                continue
            row["seconds"] = time.perf_counter() - t0
            row["recovery_steps_run"] = steps
            row["test"] = quality(lm, data, "test", test_mb)
            row["params"] = lm.n_params
            row["block_params"] = lm.block_params
            row["removed_fraction"] = 1 - lm.block_params / original
            zeros = _zero_fraction(lm)
            row["zero_fraction_of_blocks"] = zeros
            rep = run.report() if hasattr(run, "report") else {}
            if rep.get("note") or getattr(run, "note", ""):
                row["note"] = rep.get("note") or run.note
            if method.structural:
                row["flops_per_token"] = flops_per_token(lm, mb.speed_seq)
                times = interleaved({"dense": dense_fn, "pruned": forward_fn(lm, mb.speed_batch, mb.speed_seq)},
                                    cfg.methods_speed_repeats, warmup=1)
                row["dense_ms"], row["pruned_ms"] = median(times["dense"]), median(times["pruned"])
                row["speedup"] = row["dense_ms"] / row["pruned_ms"]
                speed = f"{row['speedup']:.2f}x"
            else:
                row["speedup"] = None
                row["speed_note"] = "no speed-up (masks)"
                speed = "no speed-up (masks)"
            rows.append(row)
            removed = row["removed_fraction"] if method.structural else zeros
            log(f"  {name:<17} {budget:.0%}: test {row['test']:.4f} (dense {dense_q:.4f}), removed/zeroed "
                f"{removed:.3f}, {steps} recovery steps, {speed} ({row['seconds']:.0f} s)")
    return rows


def _zero_fraction(lm) -> float:
    """Fraction of the prunable-block weights that are exactly zero (what masks remove)."""
    total = zeros = 0
    for b in lm.adapter.blocks(lm.model):
        for p in b.module.parameters():
            if p.dim() == 2:
                total += p.numel()
                zeros += int((p == 0).sum())
    return zeros / max(total, 1)
