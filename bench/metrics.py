"""Which importance metric for the quick look: `python -m bench.metrics [--mode quick|smoke] [--models ...]`.

The app's quick look on each bundled model — one stage at the budget, the model's allocation defaults
(explorer.recipes.ALLOCATION_DEFAULTS: normalisation and A, chosen on val with taylor), the layer-sequential
reconstruction with its OBS unit choice (PruneConfig's defaults), 64 calibration samples — run with each
importance metric in turn:
  * taylor      : first-order Taylor |a·∂L/∂a| per unit (a backward pass through the vocabulary);
  * fluctuation : FLAP's forward-only fluctuation of each unit's input, streamed layer by layer;
  * magnitude_l2: weight norms (no data at all).
Per metric and calibration seed: the analysis' wall time and the quality on the **test** split after the
reconstruction (SmolLM2: BBC perplexity; MiniLM-RT: Rotten Tomatoes accuracy). Nothing is chosen on
test: the plan's A comes from val (bench/RECON.md), the metric is what is compared. The quick-look
default becomes the fastest metric whose mean is within one seed spread (std) of the best mean.

The refit's cost, on the same plans of the quick-look metric (QUICK_METRIC): besides the defaults (λ
chosen per projection on held-out calibration samples, units re-chosen by structured OBS) the refit
with the plan's units as given (no OBS) and with λ = 0.1 fixed (no search; the value bench.bigmodel
uses), and with both; per variant the reconstruction's wall time and the test quality, paired per seed.

Writes bench/metrics.json (with the commit it ran on) and bench/METRICS.md, both generated.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from dataclasses import asdict, dataclass, replace
from typing import Callable

from .common import ROOT, generated_line, load, load_average, log, machine, write_json
from explorer.allocation import allocate
from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
from explorer.evaluate import accuracy, perplexity
from explorer.importance import analyze
from explorer.pruning import cpu_snapshot, plan_keeps
from explorer.recipes import allocation_defaults
from explorer.reconstruct import reconstruct

OUT_JSON, OUT_MD = ROOT / "bench" / "metrics.json", ROOT / "bench" / "METRICS.md"
METRICS = ("taylor", "fluctuation", "magnitude_l2")
QUICK_METRIC = "fluctuation"  # the app's quick look (ui.views.QUICK_LOOK_METRIC)
# refit variants run on QUICK_METRIC's plans: name -> reconstruct() keywords over PruneConfig's defaults
REFITS = {"default": {}, "no OBS": {"select": "given"}, "λ = 0.1": {"lam": 0.1},
          "no OBS, λ = 0.1": {"select": "given", "lam": 0.1}}


@dataclass
class Case:
    model: str
    target: float
    seeds: tuple[int, ...]
    samples: int = 64  # the app's quick look
    test_n: int = 0  # test examples (0: all) / tokens (0: 16384)
    max_length: int = 0  # calibration tokens per sample (0: the model's default)


MODES = {
    "quick": [Case("minilm-rt", 0.4, (0, 1, 2)), Case("smollm2-135m", 0.2, (0, 1, 2), test_n=8192)],
    "smoke": [Case("tiny-llama", 0.3, (0,), samples=16)],
}


def test_quality(lm, data, n: int) -> float:
    if lm.task == "classification":
        t, y = data.texts["test"], data.labels["test"]
        return accuracy(lm, t[:n or len(t)], y[:n or len(t)])
    return perplexity(lm, data.texts["test"], max_tokens=n or 16384)


def run_case(case: Case, save: Callable[[dict], None] = lambda res: None) -> dict:
    lm, data = load(case.model)
    defaults = allocation_defaults(case.model)
    alloc = AllocationConfig(target=case.target, **defaults)
    prune = PruneConfig()
    out = {"model": case.model, "case": asdict(case), "allocation": asdict(alloc), "higher_is_better": lm.task == "classification",
           "dense": test_quality(lm, data, case.test_n), "rows": []}
    for seed in case.seeds:
        a_cfg = AnalysisConfig(samples=case.samples, seed=seed, max_length=case.max_length)
        texts, labels = data.calibration(a_cfg.samples, stage=1, seed=seed)
        for metric in METRICS:
            cfg = replace(a_cfg, metric=metric)
            t0 = time.perf_counter()
            imp = analyze(lm, texts, labels if lm.task == "classification" else None, cfg, metrics=(metric,),
                          cache=False)  # this metric alone: its own cost
            t_imp = time.perf_counter() - t0
            plan = allocate(imp.normalized_by(alloc.normalization), imp.params, alloc, scores=imp.unit_scores())
            for refit, kw in (REFITS.items() if metric == QUICK_METRIC else [("default", {})]):
                snapshot = cpu_snapshot(lm.model)
                try:
                    t0 = time.perf_counter()
                    rep = reconstruct(lm, plan_keeps(imp, plan), texts, **{
                        "lam": prune.recon_lambda, "fit_bias": prune.recon_bias, "weighting": prune.recon_weighting,
                        "select": prune.recon_select, "batch_size": cfg.batch_size,
                        "max_length": cfg.max_length or None, **kw})
                    t_rec = time.perf_counter() - t0
                    q = test_quality(lm, data, case.test_n)
                finally:
                    lm.model = snapshot.to(lm.device)
                row = {"seed": seed, "metric": metric, "refit": refit, "analysis_s": t_imp, "recon_s": t_rec,
                       "test": q, "sparsity": [lp.sparsity for lp in plan.layers],
                       "lambdas": [[r["lambda"] for r in layer] for layer in rep.layers]}
                out["rows"].append(row)
                log(f"{case.model} seed {seed} {metric} refit {refit}: analysis {t_imp:.1f} s, refit {t_rec:.1f} s, "
                    f"test {q:.4f}")
                save(out)  # every row as it comes: a run cut short keeps what it measured
    return out


def summarise(res: dict) -> dict:
    """Per metric: mean/std of test quality and of the analysis time; the quick-look choice."""
    higher = res["higher_is_better"]
    per = {}
    if not res["rows"]:
        return {"per_metric": {}, "higher_is_better": higher}
    for m in METRICS:
        rows = [r for r in res["rows"] if r["metric"] == m and r.get("refit", "default") == "default"]
        if not rows:
            continue
        q = [r["test"] for r in rows]
        t = [r["analysis_s"] for r in rows]
        per[m] = {"mean": statistics.fmean(q), "std": statistics.stdev(q) if len(q) > 1 else 0.0,
                  "analysis_s": statistics.fmean(t), "n": len(q)}
    best = max(per, key=lambda m: per[m]["mean"] if higher else -per[m]["mean"])
    spread = max(per[best]["std"], max(v["std"] for v in per.values()))
    close = [m for m in per if abs(per[m]["mean"] - per[best]["mean"]) <= spread]
    return {"per_metric": per, "best": best, "spread": spread, "within_spread": close,
            "fastest_within": min(close, key=lambda m: per[m]["analysis_s"]), "higher_is_better": higher,
            "refits": refit_summary(res)}


def refit_summary(res: dict) -> dict:
    """Per refit variant of QUICK_METRIC's plans: test quality and reconstruction seconds (mean, std) and
    the paired difference to the default refit per seed (variant − default)."""
    rows = [r for r in res["rows"] if r["metric"] == QUICK_METRIC]
    base = {r["seed"]: r for r in rows if r.get("refit", "default") == "default"}
    out = {}
    for name in REFITS:
        rs = [r for r in rows if r.get("refit", "default") == name]
        if not rs:
            continue
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        q, t = [r["test"] for r in rs], [r["recon_s"] for r in rs]
        diff = [r["test"] - base[r["seed"]]["test"] for r in rs if r["seed"] in base]
        out[name] = {"mean": statistics.fmean(q), "std": sd(q), "recon_s": statistics.fmean(t), "recon_s_std": sd(t),
                     "n": len(rs), "diff": statistics.fmean(diff) if diff else None, "diff_std": sd(diff)}
    return out


def render(doc: dict) -> str:
    lines = ["# Which importance metric for the quick look (`python -m bench.metrics`)", "",
             generated_line("python -m bench.metrics", doc["meta"], doc.get("provenance")), "",
             "One stage at the budget with the model's allocation defaults (normalisation, A), reconstruction with "
             "its OBS unit choice, 64 calibration samples; quality on the **test** split after the refit; "
             "mean ± std over calibration seeds. `analysis` is the importance pass's wall time on this (busy) "
             "machine. The quick-look default is the fastest metric within one seed spread of the best.", ""]
    if not doc["meta"].get("complete"):
        lines += ["**Partial run**: the rows below are what was measured before it stopped.", ""]
    for res in doc["results"]:
        s = res["summary"]
        if not s["per_metric"]:
            continue
        metric = "accuracy" if s["higher_is_better"] else "perplexity"
        a = res["allocation"]
        lines += [f"## {res['model']}, {res['case']['target']:.0%} of block parameters "
                  f"({a['normalization']}, A = {a['amplitude']:g}; dense {metric} {res['dense']:.4f})", "",
                  f"| metric | test {metric} | analysis s | seeds |", "|---|---|---|---|"]
        for m, v in s["per_metric"].items():
            lines.append(f"| {m} | {v['mean']:.4f} ± {v['std']:.4f} | {v['analysis_s']:.1f} | {v['n']} |")
        lines += ["", f"Best: **{s['best']}**; within one spread ({s['spread']:.4f}): {', '.join(s['within_spread'])}; "
                      f"fastest of those: **{s['fastest_within']}**.", ""]
        refits = s.get("refits") or {}
        if len(refits) > 1:
            lines += [f"The refit on `{QUICK_METRIC}`'s plans (reconstruction seconds on this machine; *vs default*: "
                      "the paired difference per seed, mean ± std; a difference inside its std is no difference):", "",
                      f"| refit | test {metric} | vs default | reconstruction s | seeds |", "|---|---|---|---|---|"]
            for name, v in refits.items():
                vs = "" if name == "default" or v["diff"] is None else f"{v['diff']:+.4f} ± {v['diff_std']:.4f}"
                lines.append(f"| {name} | {v['mean']:.4f} ± {v['std']:.4f} | {vs} | "
                             f"{v['recon_s']:.1f} ± {v['recon_s_std']:.1f} | {v['n']} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.metrics")
    ap.add_argument("--mode", choices=sorted(MODES), default="quick")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--json", default=str(OUT_JSON))
    ap.add_argument("--md", default=str(OUT_MD))
    args = ap.parse_args(argv)
    cases = [c for c in MODES[args.mode] if not args.models or c.model in args.models]
    meta = {"mode": args.mode, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_before": load_average()}
    t0 = time.perf_counter()
    results = []

    def save(res: dict, complete: bool = False) -> None:
        res["summary"] = summarise(res)
        meta.update(seconds=time.perf_counter() - t0, load_after=load_average(), complete=complete)
        doc = {"meta": meta, "results": results + ([res] if res not in results else [])}
        write_json(Path(args.json), doc)
        Path(args.md).write_text(render(doc))

    for case in cases:
        res = run_case(case, save)
        results.append(res)
    save(results[-1], complete=True)
    log(f"wrote {args.json} and {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
