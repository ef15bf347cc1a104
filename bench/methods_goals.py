"""`python -m bench.methods_goals`: the methods' qualitative claims, checked at this scale with seeds.

Issue 15's goals, on MiniLM-RT (test accuracy on all 1,000 test sentences), at one recovery budget
for every method (the bench's quick schedule: K stages x steps LoRA recovery, the same PruneConfig
handed to every method, as in bench.methods_table):
  * APT >= adaptive at 50 %;
  * AdaPruner >= adaptive (Taylor salience) at 30 %;
  * lora-prune-ft >= lora-after >= lora-before (the same total LoRA steps).
Each (method, budget) runs on several seeds (calibration samples, training order); the report gives
mean ± std and, per claim, the paired difference per seed ± its std, and says whether it exceeds the
spread. `--runs` picks (method@budget) pairs; `--merge` adds rows to an existing methods_goals.json
(rows of the same method, budget and seed are replaced), so the work can be split over processes.
Writes methods_goals.json and METHODS.md in --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from . import common  # noqa: F401  (offline environment first)
from .common import fresh, generated_line, load, log, machine, quality, write_json

DEFAULT_RUNS = ("adaptive@0.3,adaptive@0.5,apt@0.5,adapruner@0.3,lora-before@0.3,lora-after@0.3,"
                "lora-prune-ft@0.3")
CLAIMS = [  # (better, worse, budget): the claim "better >= worse"
    ("apt", "adaptive", 0.5),
    ("adapruner", "adaptive", 0.3),
    ("adapruner", "adaptive", 0.5),
    ("lora-prune-ft", "lora-after", 0.3),
    ("lora-after", "lora-before", 0.3),
]


def parse_runs(text: str) -> list[tuple[str, float, dict]]:
    """'apt@0.5,adapruner@0.3:subsets=4+trials=50' -> [(name, budget, method options)]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        spec, _, opts = part.partition(":")
        name, _, budget = spec.partition("@")
        options = {}
        for kv in filter(None, opts.split("+")):
            k, _, v = kv.partition("=")
            options[k] = int(v) if v.isdigit() else float(v) if v.replace(".", "", 1).isdigit() else v
        out.append((name, float(budget), options))
    return out


def run_one(base, data, mb, name: str, budget: float, seed: int, amplitude: float, options: dict) -> dict:
    from explorer.config import AllocationConfig
    from explorer.methods import METHODS, make_run

    from .methods_table import steps_of
    from .quality import analysis_config, prune_config
    lm = fresh(base, mb.max_length)
    original = lm.block_params
    prune = prune_config(mb, seed, None, lm)
    row = {"model": base.name, "method": name, "budget": budget, "seed": seed, "stages": prune.stages,
           "recovery": prune.recovery, "recovery_steps_per_stage": prune.recovery_steps, "amplitude": amplitude,
           "structural": METHODS[name].structural, "options": options}
    t0 = time.perf_counter()
    steps = 0
    try:
        run = make_run(name, lm, data, analysis_config(mb, seed), AllocationConfig(target=budget, amplitude=amplitude),
                       prune, timing=False, **options)
        steps = steps_of(run)
    except Exception as e:  # one failing run must not sink the others
        row.update(error=f"{type(e).__name__}: {e}"[:300], seconds=time.perf_counter() - t0)
        return row
    row.update(seconds=time.perf_counter() - t0, recovery_steps_run=steps, test=quality(lm, data, "test", mb),
               removed_fraction=1 - lm.block_params / original, block_params=lm.block_params)
    summary = run.report().get("summary") or {}
    if not row["structural"]:  # masks: the blocks keep their size; this share of their weights is zero
        row["zeroed_fraction"] = summary.get("block_sparsity")
    if name == "adapruner":
        row["search"] = {k: summary.get(k) for k in ("best_params", "best_value", "search_seconds") if k in summary}
        row["trials"] = len(summary.get("trials") or [])
    if "pipeline" in summary:
        row["pipeline"] = summary["pipeline"]
    return row


def aggregate(rows: list[dict]) -> dict[tuple[str, float], dict]:
    out: dict[tuple[str, float], dict] = {}
    for r in rows:
        if r.get("error"):
            continue
        out.setdefault((r["method"], r["budget"]), {})[r["seed"]] = r
    return out


def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired(agg, better: str, worse: str, budget: float) -> dict | None:
    a, b = agg.get((better, budget), {}), agg.get((worse, budget), {})
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s]["test"] - b[s]["test"] for s in seeds]
    mean, std = _ms(d)
    p = {"better": better, "worse": worse, "budget": budget, "seeds": seeds, "diff": mean, "std": std,
         "beyond_spread": abs(mean) > std and len(seeds) > 1}
    return {**p, "reading": reading(p)}


# What makes a claim "better ≥ worse" fail, as the report states it.
FAILS_WHEN = ("a claim fails when the paired difference (better − worse, per seed) has a negative mean larger than "
              "its std over at least 2 seeds; it holds when the mean is positive and larger than the std; otherwise "
              "the seeds show no difference, which is neither")


def reading(p: dict) -> str:
    """"holds" / "fails" (the mean beyond the spread, over ≥ 2 seeds) or "no difference shown"."""
    if not p["beyond_spread"]:
        return "no difference shown"
    return "holds" if p["diff"] > 0 else "fails"


def _earlier(meta: dict) -> list[dict]:
    out, e = [], meta.get("earlier")
    while e:
        out.append(e)
        e = e.get("earlier")
    return out


def render(res: dict, budgets: dict | None = None) -> str:
    """METHODS.md: with `budgets` (bench/budgets.json), the claims against the training budget first
    (bench.budgets.methods_section), then every method at the one recovery budget of this JSON."""
    meta, rows = res["meta"], res["rows"]
    agg = aggregate(rows)
    dense = meta.get("dense")
    r0 = next((r for r in rows if not r.get("error")), {})
    L = ["# Methods against their papers' claims (`python -m bench.methods_goals`, `python -m bench.budgets`)", ""]
    if budgets:
        from .budgets import methods_section
        L += methods_section(budgets)
        L += ["## Every method at one recovery budget (`python -m bench.methods_goals`)", ""]
    L += [generated_line(meta.get("command", "python -m bench.methods_goals"), meta, res.get("provenance"))
         + "".join(f" Rows merged from an earlier run: {e['date']}, `{e['command']}`, {e['seconds'] / 60:.1f} min, load "
                   f"{e['load_before']} / {e['load_after']}." for e in _earlier(meta)), "",
         f"{meta.get('model')}: test accuracy on all {meta.get('test_examples')} test sentences (dense "
         f"{dense:.4f}). One recovery budget for every method: K = {r0.get('stages')} stages x "
         f"{r0.get('recovery_steps_per_stage')} {r0.get('recovery')} steps (the bench's quick schedule), "
         f"A = {r0.get('amplitude')}, {meta.get('calib_samples')} calibration samples; ± is the std over seeds.", "",
         "| method | budget | seeds | removed | test accuracy | % of dense | recovery steps run | s per run |",
         "|---|---|---|---|---|---|---|---|"]
    for (m, b), by_seed in sorted(agg.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        acc = [r["test"] for r in by_seed.values()]
        mean, std = _ms(acc)
        rs = list(by_seed.values())
        opts = rs[0].get("options") or {}
        label = m + (" (" + ", ".join(f"{k}={v}" for k, v in opts.items()) + ")" if opts else "")
        removed = (f"{statistics.mean(r['removed_fraction'] for r in rs):.1%}" if rs[0]["structural"] else
                   "masks" + (f" ({statistics.mean(r['zeroed_fraction'] for r in rs):.1%} zero)"
                              if all(r.get("zeroed_fraction") is not None for r in rs) else ""))
        L.append(f"| {label} | {b:.0%} | {len(rs)} | {removed} | "
                 + (f"{mean:.4f} ± {std:.4f}" if len(rs) > 1 else f"{mean:.4f}") + f" | {100 * mean / dense:.1f}% | "
                 f"{statistics.mean(r['recovery_steps_run'] for r in rs):.0f} | "
                 f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    failed = [r for r in rows if r.get("error")]
    if failed:
        L += ["", "Failed runs: " + "; ".join(f"{r['method']} {r['budget']:.0%} seed {r['seed']}: {r['error']}"
                                          for r in failed)]
    L += ["", "#" * (2 if not budgets else 3) + " The claims at this one budget, paired by seed", "",
          FAILS_WHEN[0].upper() + FAILS_WHEN[1:] + ".", "",
          "| claim | budget | seeds | mean difference ± std | reading |", "|---|---|---|---|---|"]
    for better, worse, budget in CLAIMS:
        p = paired(agg, better, worse, budget)
        if p is None:
            L.append(f"| {better} ≥ {worse} | {budget:.0%} | – | – | not run |")
            continue
        text = {"holds": "holds, beyond the spread", "fails": "**fails**, beyond the spread",
                "no difference shown": "inside the seed spread (no difference shown)"}[p["reading"]]
        L.append(f"| {better} ≥ {worse} | {budget:.0%} | {len(p['seeds'])} | {p['diff']:+.4f} ± {p['std']:.4f} | "
                 f"{text} |")
    from explorer.methods import METHODS
    shown = sorted({m for m, _ in agg}, key=list(METHODS).index)
    L += ["", "#" * (2 if not budgets else 3) + " What each method is, and where it departs from its document", "",
          "| method | what it is | departs from its document |", "|---|---|---|"]
    def cell(text: str) -> str:
        return text.replace("|", "\\|")
    L += [f"| {m} | {cell(METHODS[m].description)} | {cell(METHODS[m].departs or '–')} |" for m in shown if m in METHODS]
    searches = [r for r in rows if r.get("search")]
    if searches:
        L += ["", "AdaPruner's searches (best configuration, val objective): " + "; ".join(
            f"{r['budget']:.0%} seed {r['seed']}: {r['trials']} trials, "
            + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in (r['search'].get('best_params') or {}).items()) + ", "
            f"{r['search'].get('best_value'):.4f} in {r['search'].get('search_seconds', 0):.0f} s" for r in searches)]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    import torch
    ap = argparse.ArgumentParser(prog="python -m bench.methods_goals")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated method@budget pairs")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--model", default="minilm-rt")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="bench")
    ap.add_argument("--merge", action="store_true", help="add to an existing methods_goals.json")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    path = out / "methods_goals.json"
    bpath = out / "budgets.json"
    budgets = json.loads(bpath.read_text()) if bpath.exists() else None
    if args.render_only:
        (out / "METHODS.md").write_text(render(json.loads(path.read_text()), budgets))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from .config import preset
    mb = preset("quick").model(args.model)
    runs, seeds = parse_runs(args.runs), [int(s) for s in args.seeds.split(",")]
    base, data = load(args.model)
    command = "python -m bench.methods_goals " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    meta = {"model": args.model, "machine": machine(), "load_before": common.load_average(), "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "calib_samples": mb.calib_samples,
            "test_examples": len(data.texts["test"][:mb.test_n or None])}
    prev = json.loads(path.read_text()) if args.merge and path.exists() else None
    rows = [] if prev is None else prev["rows"]
    meta["dense"] = prev["meta"]["dense"] if prev else quality(base, data, "test", mb)
    if prev:
        meta["earlier"] = prev["meta"]
    amplitude = mb.amplitudes[0]
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:  # seed-major: a stopped run still has whole seeds of every pair
        for name, budget, options in runs:
            row = run_one(base, data, mb, name, budget, seed, amplitude, options)
            rows = [r for r in rows if (r["method"], r["budget"], r["seed"]) != (name, budget, seed)] + [row]
            log(f"{name:<14} {budget:.0%} seed {seed}: " + (f"FAILED {row['error']}" if row.get("error") else
                f"test {row['test']:.4f} (dense {meta['dense']:.4f}), removed {row['removed_fraction']:.3f}, "
                f"{row['recovery_steps_run']} steps, {row['seconds']:.0f} s"))
            meta.update(load_after=common.load_average(), seconds=time.perf_counter() - t0)
            res = {"meta": meta, "rows": rows}
            write_json(path, res, [prev] if prev else [])
            (out / "METHODS.md").write_text(render(res, budgets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
