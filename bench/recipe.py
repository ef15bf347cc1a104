"""`python -m bench.recipe [--mode quick|smoke] [--out bench/]`: a recovery recipe for
`reconstruct+kd`, chosen on the **val** split, then reported on **test**.

One-stage runs through `explorer.pruning.PruningRun` (the app's and the CLI's pipeline):
adaptive allocation, reconstruction, then distillation from the dense model. The grid
(steps x learning rate x hidden-state weight) is scored by val accuracy at one budget and
seed; the chosen recipe then runs at every budget and seed, and each row reports the test
quality after the cut, after reconstruction and after distillation (the run's phases).
Writes recipe.json and RECIPE.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from . import common  # noqa: F401  (offline environment first)
from .common import accuracy, fresh, load, log, machine


@dataclass
class Preset:
    model: str
    choose_budget: float
    budgets: list[float]
    seeds: list[int]
    steps: list[int]
    lrs: list[float]
    hidden: list[float]
    samples: int = 512
    batch_size: int = 16
    amplitude: float = 0.05


PRESETS = {"quick": Preset("minilm-rt", 0.4, [0.4, 0.6], [0, 1, 2], [40], [1e-4], [0.0, 1.0]),
           "smoke": Preset("tiny-bert", 0.3, [0.3], [0, 1], [2], [1e-4], [0.0, 1.0], samples=40, batch_size=8)}


def one_run(base, data, p: Preset, budget: float, seed: int, steps: int, lr: float, hidden: float):
    from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
    from explorer.pruning import PruningRun
    lm = fresh(base)
    run = PruningRun(lm, data, AnalysisConfig(samples=p.samples, batch_size=p.batch_size, metric="taylor", seed=seed),
                     AllocationConfig(target=budget, amplitude=p.amplitude),
                     PruneConfig(stages=1, recovery="reconstruct+kd", recovery_steps=steps, lr=lr,
                                 train_batch_size=p.batch_size, kd_hidden_weight=hidden, seed=seed), timing=False)
    t0 = time.perf_counter()
    rep = run.run()
    if rep["status"] != "done":
        raise RuntimeError(rep["error"])
    st = rep["stages"][0]
    return {"budget": budget, "seed": seed, "steps": steps, "lr": lr, "kd_hidden_weight": hidden,
            "cut": st["phases"]["cut"]["accuracy"], "reconstructed": st["phases"]["reconstructed"]["accuracy"],
            "trained": st["quality"]["accuracy"], "removed": st["removed_fraction"],
            "val": accuracy(lm, data.texts["val"], data.labels["val"]), "seconds": time.perf_counter() - t0,
            "reconstruction_seconds": st["reconstruction"]["seconds"]}


def main(argv=None) -> int:
    import torch
    ap = argparse.ArgumentParser(prog="python -m bench.recipe")
    ap.add_argument("--mode", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--out", default="bench")
    args = ap.parse_args(argv)
    if args.mode == "smoke":
        torch.set_num_threads(1)
    p = PRESETS[args.mode]
    t0 = time.perf_counter()
    meta = {"mode": args.mode, "machine": machine(), "load_before": common.load_average(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    base, data = load(p.model)
    dense_test = accuracy(base, data.texts["test"], data.labels["test"])
    grid = []
    for steps, lr, hidden in itertools.product(p.steps, p.lrs, p.hidden):
        grid.append(one_run(base, data, p, p.choose_budget, p.seeds[0], steps, lr, hidden))
        log(f"  grid {steps} steps, lr {lr:g}, hidden {hidden:g}: val {grid[-1]['val']:.4f}")
    best = max(grid, key=lambda r: (r["val"], -r["steps"]))
    recipe = {k: best[k] for k in ("steps", "lr", "kd_hidden_weight")}
    log(f"recipe (val): {recipe}")
    rows = []
    for budget in p.budgets:
        for seed in p.seeds:
            rows.append(one_run(base, data, p, budget, seed, **{"steps": recipe["steps"], "lr": recipe["lr"],
                                                                 "hidden": recipe["kd_hidden_weight"]}))
            log(f"  {budget:.0%} seed {seed}: cut {rows[-1]['cut']:.4f} -> recon {rows[-1]['reconstructed']:.4f} "
                f"-> kd {rows[-1]['trained']:.4f}")
    meta.update(seconds=time.perf_counter() - t0, load_after=common.load_average())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"meta": meta, "model": p.model, "dense_test": dense_test, "grid": grid, "recipe": recipe, "rows": rows}
    (out / "recipe.json").write_text(json.dumps(res, indent=1))
    (out / "RECIPE.md").write_text(render(res, p))
    log(f"wrote {out / 'RECIPE.md'} in {meta['seconds'] / 60:.1f} min")
    return 0


def render(res: dict, p: Preset) -> str:
    m = res["meta"]
    lines = ["# Recovery recipe for `reconstruct+kd` (`python -m bench.recipe`)", "",
             f"Generated {m['date']} by `python -m bench.recipe --mode {m['mode']}` in {m['seconds'] / 60:.1f} min on "
             f"{m['machine'].get('cpu', '?')}, {m['machine'].get('torch_threads', '?')} torch threads, load average "
             f"before/after {m['load_before']} / {m['load_after']}.", "",
             f"`{res['model']}`, one stage, adaptive A = {p.amplitude}, taylor salience, {p.samples} calibration samples, "
             f"batch {p.batch_size}. Grid scored by **val** accuracy at {p.choose_budget:.0%}, seed {p.seeds[0]}:", "",
             "| steps | lr | hidden-state weight | val accuracy |", "|---|---|---|---|"]
    for g in res["grid"]:
        lines.append(f"| {g['steps']} | {g['lr']:g} | {g['kd_hidden_weight']:g} | {g['val']:.4f} |")
    r = res["recipe"]
    lines += ["", f"Chosen: {r['steps']} steps, lr {r['lr']:g}, hidden-state weight {r['kd_hidden_weight']:g}. "
              f"Test accuracy (dense {res['dense_test']:.4f}), mean ± std over seeds {p.seeds}:", "",
              "| budget | removed | after cut | after reconstruction | after distillation | % of dense | s per run |",
              "|---|---|---|---|---|---|---|"]
    for b in p.budgets:
        rs = [x for x in res["rows"] if x["budget"] == b]

        def ms(k):
            v = [x[k] for x in rs]
            return f"{statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0:.4f}"
        mean_t = statistics.mean(x["trained"] for x in rs)
        lines.append(f"| {b:.0%} | {statistics.mean(x['removed'] for x in rs):.1%} | {ms('cut')} | {ms('reconstructed')} "
                     f"| {ms('trained')} | {mean_t / res['dense_test']:.1%} | "
                     f"{statistics.mean(x['seconds'] for x in rs):.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
