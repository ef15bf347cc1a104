"""Knowing a plan before running it, measured: `python -m bench.plans [--mode quick|long] [--models ...]`.

(a) **The predictor against reality.** On each model, at one budget: the predictor is measured (each layer
    cut alone with the run's cut and reconstruction, explorer.predict), then at least 12 plans — uniform,
    the adaptive plan over an A sweep, the searched plan, random plans and hand-shaped ones (the sparsity
    heavier in the first, middle or last third of the layers) — are each cut and reconstructed as one
    stage of a run and scored on the predictor's val slice. Reported: Spearman ρ of predicted against
    measured, and the median |error| as a share of the dense-to-plan gap (with and without the fitted
    interaction factor α).
(b) **Searched against uniform, adaptive and FLAP's structure** at equal parameters after reconstruction,
    per budget and seed (the seed draws the calibration samples and the search's mutations): quality on
    the **test** split (and, for SmolLM2, IMDB reviews as a second domain, never used to choose anything),
    paired differences over seeds with their spread. Adaptive's A is the predictor's best over the sweep
    (a val choice); the search ranks on val only; FLAP is its fluctuation-standardised global structure
    (bench.recon.flap_keeps) with our refit.

Writes bench/plans.json (with the commit it ran on) and bench/PLANS.md, both generated.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .common import ROOT, generated_line, load, log, machine, other_corpus, write_json
from .recon import flap_keeps

OUT_JSON, OUT_MD = ROOT / "bench" / "plans.json", ROOT / "bench" / "PLANS.md"
SWEEP = (0.05, 0.1, 0.2, 0.3)


@dataclass
class Case:
    model: str
    target: float  # the budget of part (a)
    budgets: tuple[float, ...]  # part (b)
    seeds: tuple[int, ...]
    samples: int  # calibration samples (analysis and refit)
    metric: str
    predict: dict = field(default_factory=dict)  # PredictConfig fields
    search: dict = field(default_factory=dict)  # SearchConfig fields
    test_n: int = 0  # test examples / tokens (0: all / 16384)
    other_n: int = 0  # second-domain tokens (LMs)
    max_length: int = 0  # calibration tokens per sample (0: the model's default)


MODES = {
    "quick": [Case("minilm-rt", 0.4, (0.4, 0.6), (0, 1, 2), 64, "taylor", {"examples": 512},
                   {"generations": 20, "small": 128, "large": 512}),
              Case("smollm2-135m", 0.2, (0.2,), (0,), 16, "taylor", {"tokens": 512},
                   {"generations": 10, "small": 256, "large": 512, "max_seconds": 600}, test_n=4096, other_n=4096,
                   max_length=128)],
    "long": [Case("minilm-rt", 0.4, (0.4, 0.6), (0, 1, 2), 64, "taylor", {"examples": 512},
                  {"generations": 40, "small": 128, "large": 512}),
             Case("smollm2-135m", 0.2, (0.2, 0.3, 0.4), (0, 1, 2), 32, "taylor", {"tokens": 2048},
                  {"generations": 40, "small": 256, "large": 1024, "max_seconds": 1200}, test_n=16384,
                  other_n=16384)],
    "smoke": [Case("tiny-llama", 0.3, (0.3,), (0,), 16, "taylor", {"tokens": 256, "seq_len": 16, "checks": 2},
                   {"generations": 3, "small": 32, "large": 64})],
}


def shaped(n: int, target: float, where: str) -> list[float]:
    """All layers at 0.6·target except one third at 1.8·target (the same total)."""
    third = {"first": range(0, n // 3), "middle": range(n // 3, 2 * n // 3), "last": range(2 * n // 3, n)}[where]
    heavy = target * n * (1 - 0.6 * (n - len(third)) / n) / len(third)
    return [heavy if i in third else 0.6 * target for i in range(n)]


def run_case(case: Case) -> dict:
    from explorer.allocation import allocate
    from explorer.config import AllocationConfig, AnalysisConfig, PredictConfig, PruneConfig, SearchConfig
    from explorer.evaluate import accuracy, perplexity
    from explorer.importance import analyze
    from explorer.predict import Recipe, ValScorer, measure, plan_sparsity, run_plan, spearman
    from explorer.pruning import cpu_snapshot, plan_keeps
    from explorer.reconstruct import reconstruct
    from explorer.search import PlanSearch

    lm, data = load(case.model)
    other = other_corpus(case.model) if lm.task == "causal-lm" and case.other_n else None
    out = {"model": case.model, "case": asdict(case), "predictor": [], "plans": [], "rows": []}

    def test_scores(m) -> dict:
        if lm.task == "classification":
            t, y = data.texts["test"], data.labels["test"]
            n = case.test_n or len(t)
            return {"test": accuracy(m, t[:n], y[:n])}
        d = {"test": perplexity(m, data.texts["test"], max_tokens=case.test_n or 16384)}
        if other:
            d["other"] = perplexity(m, other, max_tokens=case.other_n)
        return d

    dense_test = test_scores(lm)
    out["dense"] = dense_test
    for seed in case.seeds:
        analysis = AnalysisConfig(samples=case.samples, metric=case.metric, seed=seed, max_length=case.max_length)
        texts, labels = data.calibration(analysis.samples, stage=1, seed=seed)
        metrics = (case.metric, "fluctuation") if case.metric != "fluctuation" else ("fluctuation",)
        imp = analyze(lm, texts, labels if lm.task == "classification" else None, analysis, metrics=metrics)
        recipe = Recipe(analysis, AllocationConfig(target=case.target), replace(PruneConfig(), recovery="reconstruct"),
                        PredictConfig(**case.predict))
        t0 = time.perf_counter()
        pred = measure(lm, data, imp, recipe, use_cache=False)
        p_seconds = time.perf_counter() - t0
        out["predictor"].append({"seed": seed, "seconds": p_seconds, "alpha": pred.alpha, "error": pred.error(),
                                 "dense": pred.dense, "levels": pred.levels, "delta": pred.delta})
        log(f"{case.model} seed {seed}: predictor in {p_seconds:.0f} s, α {pred.alpha:.2f}, checks {pred.error()}")
        scorer = ValScorer(lm, data, case.predict.get("tokens", 1024) if lm.task == "causal-lm"
                           else case.predict.get("examples", 512), case.predict.get("seq_len", 128))
        norm, scores = imp.normalized_by("maxabs"), imp.unit_scores()

        def search(target):
            s = PlanSearch(lm, data, imp, AllocationConfig(target=target), replace(SearchConfig(**case.search), seed=seed),
                           predictor=pred)
            t = time.perf_counter()
            best = s.run()
            return best, time.perf_counter() - t, s

        # (a) the predictor against reality, seed 0 only
        if seed == case.seeds[0]:
            n, t = imp.n_layers, case.target
            plans = {"uniform": [t] * n}
            for a in SWEEP:
                al = allocate(norm, imp.params, AllocationConfig(target=t, amplitude=a), scores=scores)
                plans[f"adaptive A={a:g}"] = [lp.sparsity for lp in al.layers]
            best, secs, _ = search(t)
            plans["searched"] = [lp.sparsity for lp in best.layers]
            rng = np.random.default_rng(100 + seed)
            for j in range(3):
                plans[f"random {j + 1}"] = list(np.clip(rng.dirichlet(np.ones(n) * 2.0) * t * n, 0, 0.9))
            for where in ("first", "middle", "last"):
                plans[f"{where} third heavier"] = shaped(n, t, where)
            for name, levels in plans.items():
                got = run_plan(lm, data, imp, recipe, levels, scorer)
                row = {"plan": name, "sparsity": got["sparsity"], "measured": got["objective"],
                       "predicted": pred.objective(got["sparsity"]), "additive": pred.dense + pred.additive(got["sparsity"])}
                out["plans"].append(row)
                log(f"  (a) {name:22s} measured {row['measured']:.4f} predicted {row['predicted']:.4f}")
        # (b) searched vs uniform / adaptive / FLAP at each budget
        for budget in case.budgets:
            cfg = AllocationConfig(target=budget)
            ranked = []
            for a in SWEEP:
                al = allocate(norm, imp.params, replace(cfg, amplitude=a), scores=scores)
                ranked.append((pred.objective(plan_sparsity(al)) * (1 if pred.metric == "perplexity" else -1), a, al))
            _, a_best, adaptive = min(ranked, key=lambda r: r[0])
            best, secs, s = search(budget)
            keeps = {"uniform": plan_keeps(imp, allocate(norm, imp.params, replace(cfg, mode="uniform"), scores=scores)),
                     "adaptive": plan_keeps(imp, adaptive), "searched": plan_keeps(imp, best),
                     "flap structure": flap_keeps(imp, budget)}
            for method, k in keeps.items():
                snap = cpu_snapshot(lm.model)
                try:
                    t = time.perf_counter()
                    reconstruct(lm, k, data.calibration(case.samples, stage=1, seed=seed)[0],
                                batch_size=analysis.batch_size, max_length=analysis.max_length or None)
                    val = scorer.score(lm)
                    row = {"seed": seed, "budget": budget, "method": method, "val": val["quality"],
                           "params": lm.block_params, **test_scores(lm), "refit_s": time.perf_counter() - t}
                    if method == "adaptive":
                        row["amplitude"] = a_best
                    if method == "searched":
                        row.update(search_s=secs, trials=s.trials, start=s.start)
                finally:
                    lm.model = snap.to(lm.device)
                out["rows"].append(row)
                log(f"  (b) seed {seed} budget {budget} {method:15s} val {row['val']:.4f} test {row['test']:.4f}"
                    + (f" other {row['other']:.2f}" if "other" in row else ""))
    a = out["plans"]
    if a:
        gap = [abs(r["measured"] - out["predictor"][0]["dense"]) for r in a]
        out["summary"] = {
            "spearman": spearman([r["predicted"] for r in a], [r["measured"] for r in a]),
            "spearman_additive": spearman([r["additive"] for r in a], [r["measured"] for r in a]),
            "median_error_share": float(np.median([abs(r["predicted"] - r["measured"]) / g
                                                   for r, g in zip(a, gap) if g > 1e-12])),
            "median_error_share_additive": float(np.median([abs(r["additive"] - r["measured"]) / g
                                                            for r, g in zip(a, gap) if g > 1e-12])),
            "plans": len(a)}
    return out


def paired(rows: list[dict], budget: float, a: str, b: str, key: str) -> tuple[float, float, int] | None:
    """Mean and std over seeds of (a − b) on `key`."""
    by = {(r["seed"], r["method"]): r for r in rows if r["budget"] == budget and key in r}
    d = [by[(s, a)][key] - by[(s, b)][key] for s in sorted({s for s, _ in by}) if (s, a) in by and (s, b) in by]
    if not d:
        return None
    return statistics.mean(d), (statistics.stdev(d) if len(d) > 1 else float("nan")), len(d)


def render(doc: dict) -> str:
    lines = [generated_line("python -m bench.plans " + doc["mode_args"], doc["meta"], doc.get("provenance")), "",
             "# Knowing a plan before running it", ""]
    for case in doc["cases"]:
        m = case["model"]
        metric = "accuracy" if "minilm" in m else "perplexity"
        lines += [f"## {m}", ""]
        for p in case["predictor"]:
            e = p["error"] or {}
            lines.append(f"Predictor (seed {p['seed']}): measured in {p['seconds']:.0f} s; α = {p['alpha']:.2f}; "
                         f"leave-one-out error on its {e.get('plans', 0)} check plans: median "
                         f"{e.get('median_share_of_gap', float('nan')):.0%} of the gap.")
        lines.append("")
        if case.get("summary"):
            s = case["summary"]
            obj = "log perplexity" if metric == "perplexity" else "accuracy"
            lines += [f"**(a) predicted against measured** ({s['plans']} plans at S = {case['case']['target']}, "
                      f"val {obj} after one reconstructed stage): Spearman ρ **{s['spearman']:.3f}** "
                      f"(additive, α = 1: {s['spearman_additive']:.3f}); median |error| **{s['median_error_share']:.0%}**"
                      f" of the dense-to-plan gap (additive: {s['median_error_share_additive']:.0%}).", "",
                      "| plan | measured | predicted | additive |", "|---|---|---|---|"]
            lines += [f"| {r['plan']} | {r['measured']:.4f} | {r['predicted']:.4f} | {r['additive']:.4f} |"
                      for r in case["plans"]]
            lines.append("")
        rows = case["rows"]
        if rows:
            keys = ["test"] + (["other"] if any("other" in r for r in rows) else [])
            lines += [f"**(b) at equal parameters after reconstruction** ({metric} on test"
                      + (", and IMDB as a second domain" if "other" in keys else "") + "; dense "
                      + ", ".join(f"{k} {case['dense'][k]:.4g}" for k in keys) + "):", "",
                      "| budget | method | " + " | ".join(f"{k} (mean ± std over seeds)" for k in keys)
                      + " | val | seeds |", "|---|---|" + "---|" * len(keys) + "---|---|"]
            for budget in sorted({r["budget"] for r in rows}):
                for method in dict.fromkeys(r["method"] for r in rows):
                    rs = [r for r in rows if r["budget"] == budget and r["method"] == method]
                    cells = []
                    for k in keys:
                        v = [r[k] for r in rs]
                        cells.append(f"{statistics.mean(v):.4g} ± {statistics.stdev(v):.2g}" if len(v) > 1
                                     else f"{v[0]:.4g}")
                    lines.append(f"| {budget:g} | {method} | " + " | ".join(cells)
                                 + f" | {statistics.mean(r['val'] for r in rs):.4g} | {len(rs)} |")
            lines += ["", "Paired differences (searched − other, mean ± std over seeds; lower is better for "
                      "perplexity, higher for accuracy):", ""]
            for budget in sorted({r["budget"] for r in rows}):
                for other in ("uniform", "adaptive", "flap structure"):
                    for k in keys:
                        p = paired(rows, budget, "searched", other, k)
                        if p:
                            lines.append(f"- S = {budget:g}, vs {other}, {k}: {p[0]:+.4g} ± {p[1]:.2g} ({p[2]} seeds)")
            srch = [r for r in rows if r["method"] == "searched"]
            lines += ["", f"Search wall time: median {statistics.median(r['search_s'] for r in srch):.0f} s "
                      f"({statistics.median(r['trials'] for r in srch):.0f} trials).", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="quick")
    ap.add_argument("--models", nargs="*", help="only these models of the mode")
    ap.add_argument("--merge", action="store_true", help="keep the other models' results of the existing plans.json")
    ap.add_argument("--out", default=None, help="folder for plans.json and PLANS.md (default: bench/)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    from .common import load_average
    m = machine()
    meta = {"machine": m, "date": m["date"], "load_before": load_average()}
    cases = [c for c in MODES[args.mode] if not args.models or c.model in args.models]
    doc = {"mode": args.mode, "mode_args": " ".join(argv or []) or f"--mode {args.mode}", "cases": []}
    for case in cases:
        doc["cases"].append(run_case(case))
    meta.update(seconds=time.perf_counter() - t0, load_after=load_average())
    doc["meta"] = meta
    folder = Path(args.out) if args.out else ROOT / "bench"
    earlier = []
    old_path = folder / OUT_JSON.name
    if args.merge and old_path.exists():  # keep the other models' cases of an earlier run (its commit is listed)
        old = json.loads(old_path.read_text())
        ran = {c["model"] for c in doc["cases"]}
        kept = [c for c in old.get("cases", []) if c["model"] not in ran]
        if kept:
            doc["cases"] = kept + doc["cases"]
            earlier = [old]
    write_json(folder / OUT_JSON.name, doc, earlier=earlier)
    (folder / OUT_MD.name).write_text(render(doc))
    log(f"wrote {folder / OUT_JSON.name} and {OUT_MD.name} in {meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
