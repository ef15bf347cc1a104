"""`python -m bench.recon [--mode long|quick|smoke] [--out bench/]`: what reconstruction buys.

Also the headline section ("recon") of `python -m bench`: its --quick mode runs the "quick" cases
(about 30 min on 2 cores with the other sections), --full the "long" ones (hours: the committed
RECON.md is long mode, run per model and seed with --merge).

One-shot cuts at equal block parameters, each evaluated right after the cut ("cut") and
after the layer-sequential refit ("recon"), for
  * uniform   : S_L = S_base, taylor salience, salience split; its "recon" re-chooses the units
                per layer by structured OBS (the plan's counts) and refits (explorer's default);
  * adaptive  : exact mode, taylor salience, (A, normalisation) chosen on the **val** split
                from a small grid (A = 0 allowed) *after reconstruction*;
  * flap      : FLAP (An et al. 2024) from its paper: fluctuation metric, per-layer widths from
                scores standardised per (layer, kind) and compared globally, bias compensation
                only (λ = ∞: kept weights unchanged); "flap+refit" is the same plan with our refit;
  * torch-pruning : the external baseline (GroupTaylorImportance + BasePruner, uniform widths with
                the proportional split; FFN channels only on GQA models); its "recon" keeps exactly
                the units Torch-Pruning kept and refits them.
Quality on the **test** split (SmolLM2: BBC perplexity, and IMDB reviews, a second domain used
for nothing else); several calibration seeds, mean ± std, and paired differences per seed.
Writes recon.json and RECON.md in --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import common  # noqa: F401  (offline environment first)
from explorer.recipes import EXTRA, RECIPES

from .common import (accuracy, fresh, generated_line, load, log, machine, other_corpus, provenance_text, train,
                     write_json)


@dataclass
class Case:
    model: str
    budgets: list[float]
    seeds: list[int]
    samples: int  # calibration samples (analysis and reconstruction)
    amplitudes: list[float]
    normalizations: list[str]
    val_n: int  # val examples / tokens for the choice of A
    test_n: int  # test examples (0: all) / BBC tokens
    other_n: int = 0  # tokens of the second-domain corpus (LMs)
    batch_size: int = 16
    extra_budgets: list[float] = field(default_factory=list)  # run for the first seed only
    fixed: dict = field(default_factory=dict)  # A / normalisation fixed instead of chosen (stated in the report)
    # the recovery row: these PruneConfig fields (bench.common.RECOVERY_KEYS) train a copy of each method's
    # reconstructed model at `recovery_budgets`, every seed, the dense model as teacher for KD
    recovery: dict = field(default_factory=dict)
    recovery_budgets: list[float] = field(default_factory=list)
    recovery_cap_s: float = 0.0  # wall-time cap per recovery run (0: none); the steps done are kept


# Recovery rows: each model's recipe (explorer/recipes.py) where it trains; MiniLM-RT's recipe trains
# nothing (reconstruction alone is best on val), so its row is the best distillation on val (EXTRA).
MINILM_RECOVERY = {**EXTRA["minilm-rt"]["kd_fallback"], "recovery_steps": 20}
SMOLLM2_RECOVERY = dict(RECIPES["smollm2-135m"])


PRESETS = {
    # `make bench` (python -m bench --quick): about 30 min on 2 cores with the bench's other sections
    # (SmolLM2 has no recovery row here: a distillation step takes ~16 s on 2 cores, see bench/RECIPE.md)
    "quick": [Case("minilm-rt", [0.4, 0.6], [0, 1, 2], 128, [0.0, 0.05, 0.15], ["rank"], 500, 0,
                   recovery=MINILM_RECOVERY, recovery_budgets=[0.4]),
              Case("smollm2-135m", [0.2], [0], 16, [0.0, 0.15], ["rank"], 1024, 2048, 512, batch_size=8)],
    # the committed RECON.md / REPORT.md rows: hours on 2 cores, run per model and seed with --merge
    "long": [Case("minilm-rt", [0.2, 0.4, 0.6], [0, 1, 2], 512, [0.0, 0.05, 0.15], ["maxabs", "rank"], 500, 0,
                  recovery=MINILM_RECOVERY, recovery_budgets=[0.4]),
             Case("smollm2-135m", [0.2, 0.3, 0.4], [0, 1, 2], 32, [0.0, 0.15], ["maxabs", "rank"], 2048, 16384, 4096,
                  batch_size=8, recovery=SMOLLM2_RECOVERY, recovery_budgets=[0.2], recovery_cap_s=600)],
    "smoke": [Case("tiny-bert", [0.3], [0, 1], 40, [0.0, 0.1], ["maxabs", "rank"], 0, 0,
                   recovery={**MINILM_RECOVERY, "recovery_steps": 2, "train_batch_size": 8}, recovery_budgets=[0.3]),
              Case("tiny-llama", [0.3], [0], 40, [0.1], ["maxabs"], 256, 512, 256,
                   recovery={**SMOLLM2_RECOVERY, "recovery_steps": 1}, recovery_budgets=[0.3])],
}


METHODS = ("uniform", "adaptive", "flap", "flap+refit", "torch-pruning")


def flap_keeps(imp, target: float) -> list[tuple[list[int], list[int]]]:
    """FLAP's adaptive structure: standardise each (layer, kind)'s fluctuation scores, then remove
    the globally lowest units (each with its parameters) until `target` of the block parameters
    are gone; at least one unit of each kind stays in every layer."""
    units = []  # (z, layer, kind, unit, params)
    for i, p in enumerate(imp.params):
        for kind, scores, per in (("attention", imp.groups["fluctuation"][i], p["group_params"]),
                                  ("mlp", imp.neurons["fluctuation"][i], p["neuron_params"])):
            s = np.asarray(scores, dtype=np.float64)
            z = (s - s.mean()) / (s.std() + 1e-12)
            units += [(float(z[u]), i, kind, u, per) for u in range(len(s))]
    goal = target * sum(p["block_params"] for p in imp.params)
    left = {(i, k): (p["groups"] if k == "attention" else p["n_neurons"]) for i, p in enumerate(imp.params)
            for k in ("attention", "mlp")}
    removed, drop = 0, set()
    for z, i, kind, u, per in sorted(units):
        if removed >= goal:
            break
        if left[(i, kind)] <= 1:
            continue
        drop.add((i, kind, u))
        left[(i, kind)] -= 1
        removed += per
    return [([u for u in range(p["groups"]) if (i, "attention", u) not in drop],
             [u for u in range(p["n_neurons"]) if (i, "mlp", u) not in drop]) for i, p in enumerate(imp.params)]


def run_case(case: Case, methods: tuple[str, ...] = METHODS, dense: dict | None = None, loaded=None) -> dict:
    """Every (seed, budget, method) row of one model; `dense`: its test figures from an earlier
    run of the same case (a merge), not measured again; `loaded`: (base, data) already loaded."""
    from explorer.allocation import allocate
    from explorer.config import AllocationConfig, AnalysisConfig
    from explorer.evaluate import perplexity
    from explorer.importance import analyze
    from explorer.pruning import plan_keeps
    from explorer.reconstruct import reconstruct
    from explorer.surgery import prune_block

    base, data = loaded or load(case.model)
    other = other_corpus(case.model) if base.task == "causal-lm" else None

    def score(lm, split: str) -> dict:
        if lm.task == "classification":
            n = case.val_n if split == "val" else case.test_n
            t, y = data.texts[split], data.labels[split]
            return {"accuracy": accuracy(lm, t[:n] if n else t, y[:n] if n else y)}
        out = {"perplexity": perplexity(lm, data.texts[split], max_tokens=case.val_n if split == "val" else case.test_n)}
        if split == "test" and other:
            out["perplexity_imdb"] = perplexity(lm, other, max_tokens=case.other_n)
        return out

    t0 = time.perf_counter()
    dense = dense or score(base, "test")
    log(f"{case.model} dense {dense} ({time.perf_counter() - t0:.0f} s)")
    needs_analysis = bool(set(methods) - {"torch-pruning"})  # Torch-Pruning scores units itself
    rows = []
    for seed in case.seeds:
        texts, labels = data.calibration(case.samples, stage=1, seed=seed)
        labels = labels if base.task == "classification" else None
        t0 = time.perf_counter()
        imp = analyze(base, texts, labels, AnalysisConfig(samples=len(texts), batch_size=case.batch_size,
                                                           metric="taylor", seed=seed),
                      metrics=("taylor", "fluctuation")) if needs_analysis else None
        t_analysis = time.perf_counter() - t0
        if imp is not None:
            log(f"  seed {seed}: analysis {t_analysis:.0f} s on {imp.tokens:,} tokens")

        def evaluate_plan(keeps, lam, label, budget, split="test", extra=None, cut=True, also_val=False,
                          select="obs", recover=True):
            """Cut (plain) -> score; then the refit from the dense copy -> score; at a recovery
            budget, a trained copy of the refit model -> score."""
            row = {"method": label, "budget": budget, "seed": seed, **(extra or {}),
                   "widths": [{"groups": len(g), "neurons": len(n)} for g, n in keeps]}
            if cut:
                lm = fresh(base)
                for i, (g, n) in enumerate(keeps):
                    prune_block(lm.adapter, lm.model, i, g, n)
                row["cut"] = score(lm, split)
                row["block_params"] = lm.block_params
                del lm
            lm = fresh(base)
            t1 = time.perf_counter()
            rep = reconstruct(lm, keeps, texts, lam=lam, batch_size=case.batch_size, select=select)
            row["recon_seconds"] = time.perf_counter() - t1
            row["analysis_seconds"] = t_analysis
            row["recon"] = score(lm, split)
            if also_val:
                row["recon_val"] = score(lm, "val")
            row["calibration_error_ratio"] = rep.error_ratio
            row["block_params"] = lm.block_params
            if recover and case.recovery and split == "test" and budget in case.recovery_budgets:
                trained, secs, steps, losses = train(lm, base, data, case.recovery, seed, case.recovery_cap_s)
                row["recovered"] = score(trained, split)
                row["recovery"] = {"seconds": secs, "steps": steps, "first_loss": losses[0] if losses else None,
                                   "last_loss": losses[-1] if losses else None}
                log(f"    {budget:.0%} {label} recovered ({steps} {case.recovery['recovery']} steps, {secs:.0f} s): "
                    f"{row['recovered']}")
                del trained
            return row

        for budget in case.budgets + (case.extra_budgets if seed == case.seeds[0] else []):
            def adaptive(a, norm):
                cfg = AllocationConfig(target=budget, amplitude=a, mode="exact" if a else "uniform", normalization=norm)
                return plan_keeps(imp, allocate(imp.normalized_by(norm), imp.params, cfg, scores=imp.unit_scores()))
            if "torch-pruning" in methods:
                rows.append(torch_pruning_row(base, texts, labels, budget, case.batch_size, score, evaluate_plan))
                log(f"    {budget:.0%} torch-pruning {rows[-1]['cut']} -> refit {rows[-1]['recon']}")
            # uniform (also the A = 0 point of adaptive's choice)
            if {"uniform", "adaptive"} & set(methods):
                uni = evaluate_plan(adaptive(0.0, "maxabs"), 0.0, "uniform", budget, also_val=not case.fixed)
                rows.append(uni)
                log(f"    {budget:.0%} uniform {uni['cut']} -> {uni['recon']}")
            # adaptive: (A, normalisation) chosen on val after reconstruction
            if "adaptive" in methods and case.fixed:
                best = (case.fixed["amplitude"], case.fixed["normalization"])
                choice = {"chosen_on": "fixed (not chosen on val: too slow here)"}
            elif "adaptive" in methods:
                vals = {(0.0, "maxabs"): list(uni["recon_val"].values())[0]}  # A = 0 is the uniform row
                for a in case.amplitudes:
                    for norm in (case.normalizations if a else []):
                        r = evaluate_plan(adaptive(a, norm), 0.0, "val", budget, split="val", cut=False)
                        vals[(a, norm)] = list(r["recon"].values())[0]
                hib = base.task == "classification"
                best = (max if hib else min)(vals, key=vals.get)
                choice = {"chosen_on": "val", "val": {f"A={a:g},{n}": v for (a, n), v in vals.items()}}
            if "adaptive" in methods:
                rows.append(evaluate_plan(adaptive(*best), 0.0, "adaptive", budget,
                                          extra={"amplitude": best[0], "normalization": best[1], **choice}))
                log(f"    {budget:.0%} adaptive A={best[0]:g} {best[1]} {rows[-1]['cut']} -> {rows[-1]['recon']}")
            if "flap" not in methods:
                continue
            fk = flap_keeps(imp, budget)
            flap = evaluate_plan(fk, float("inf"), "flap", budget, select="given", recover=False)  # trained as flap+refit
            rows.append(flap)
            refit = evaluate_plan(fk, 0.0, "flap+refit", budget, cut=False, select="given")
            refit["cut"] = flap["recon"]  # the same plan: its "before" is FLAP itself
            rows.append(refit)
            log(f"    {budget:.0%} flap {flap['cut']} -> bias only {flap['recon']} -> refit {refit['recon']}")
    return {"model": case.model, "task": base.task, "dense": dense, "case": case.__dict__, "rows": rows,
            "block_params_dense": base.block_params}


def torch_pruning_row(base, texts, labels, budget, batch_size, score, evaluate_plan) -> dict:
    """Torch-Pruning's one-shot cut on the same calibration texts ("cut"), then our refit of exactly
    the units it kept ("recon")."""
    from explorer.allocation import allocate
    from explorer.config import AllocationConfig

    from .tp_baseline import accumulate_grads, kept_units, structure, tp_prune_step
    lm = fresh(base)
    st = structure(lm)
    heads_ok = lm.adapter.family == "BERT"
    plan = allocate(np.zeros(len(st)), st, AllocationConfig(target=budget, mode="uniform", prune_attention=heads_ok,
                                                            prune_mlp=True, split="proportional"))
    t0 = time.perf_counter()
    accumulate_grads(lm, texts, labels, batch_size)
    tp_seconds = tp_prune_step(lm, plan, "taylor")
    scoring_seconds = time.perf_counter() - t0  # its gradients and its dependency graph
    cut = score(lm, "test")
    keeps = kept_units(base, lm)
    del lm
    row = evaluate_plan(keeps, 0.0, "torch-pruning", budget, cut=False, select="given",
                        extra={"tp_seconds": tp_seconds, "importance": "GroupTaylorImportance",
                               "units": "heads + FFN channels" if heads_ok else "FFN channels only (GQA)"})
    row["cut"] = cut
    row["analysis_seconds"] = scoring_seconds
    return row


def paired(diffs: list[float]) -> tuple[float, float, bool, int]:
    """Per-seed differences -> (mean, std, whether |mean| exceeds the std, seeds); one seed has no
    spread (std nan, never beyond it)."""
    m = statistics.mean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    return m, sd, len(diffs) > 1 and abs(m) > sd, len(diffs)


def fmt_value(metric: str, v: float, sign: str = "") -> str:
    """A figure at its metric's precision: accuracy to 4 decimals, perplexity to 2."""
    return f"{v:{sign}{'.4f' if metric == 'accuracy' else '.2f'}}"


def summarise(res: dict) -> list[dict]:
    """Mean ± std over seeds per (budget, method, phase), and paired differences vs uniform."""
    metric = "accuracy" if res["task"] == "classification" else "perplexity"
    out = []
    by = {}
    for r in res["rows"]:
        by.setdefault((r["budget"], r["method"]), []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    for (budget, method), rs in sorted(by.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        d = {"budget": budget, "method": method, "n": len(rs)}
        for phase in ("cut", "recon", "recovered"):
            vals = [r[phase][metric] for r in rs if phase in r]
            d[phase] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else None
        gains = [r["recovered"][metric] - r["recon"][metric] for r in rs if "recovered" in r]
        if gains:  # what the recovery adds to the same seed's reconstruction
            d["recovery_gain"] = paired(gains)
            d["recovery_seconds"] = statistics.mean(r["recovery"]["seconds"] for r in rs if "recovered" in r)
            d["recovery_steps"] = statistics.mean(r["recovery"]["steps"] for r in rs if "recovered" in r)
        if res["task"] == "causal-lm":
            vals = [r["recon"].get("perplexity_imdb") for r in rs if r["recon"].get("perplexity_imdb")]
            d["imdb"] = statistics.mean(vals) if vals else None
        d["recon_seconds"] = statistics.mean(r["recon_seconds"] for r in rs)
        d["analysis_seconds"] = statistics.mean(r["analysis_seconds"] for r in rs)
        d["params_removed"] = 1 - statistics.mean(r["block_params"] for r in rs) / res["block_params_dense"]
        d["paired"] = {}  # other method -> this minus it after reconstruction, seed by seed
        for other in METHODS:
            theirs = {r["seed"]: r["recon"][metric] for r in by.get((budget, other), [])}
            diffs = [r["recon"][metric] - theirs[r["seed"]] for r in rs if r["seed"] in theirs]
            if other != method and diffs:
                d["paired"][other] = paired(diffs)
        if "uniform" in d["paired"]:
            d["vs_uniform"] = d["paired"]["uniform"]
        out.append(d)
    return out


def _first(meta: dict) -> dict:
    """The oldest run of a chain of merges."""
    while meta.get("earlier"):
        meta = meta["earlier"]
    return meta


EXPLAIN = ("One-shot cuts at equal block parameters. *cut*: the plan's units (taylor salience) removed, nothing "
           "else; *recon*: the same per-layer counts, cut layer by layer with the units re-chosen by structured OBS "
           "and refit (explorer/reconstruct.py defaults: relative token weights, λ per projection on held-out "
           "calibration samples). "
           "FLAP's *recon* column is its own bias compensation (λ = ∞); *flap+refit* is FLAP's plan with our refit "
           "(its *cut* column repeats FLAP). Adaptive's (A, normalisation) is chosen on val after reconstruction; "
           "figures are on test. ± is the std over calibration seeds; *vs uniform* is the mean paired difference "
           "(recon) per seed ± its std, **bold** where it exceeds its spread. *Recovery*: a copy of each method's "
           "reconstructed model trained with the recipe stated under the table (FLAP's with our refit), the dense "
           "model as teacher; *gain* is the paired difference recovered − recon per seed.")


def header(meta: dict, prov: dict | None = None) -> str:
    """When, how, under which load and (`prov`: recon.json's provenance) from which commit the runs
    behind recon.json ran."""
    ran_as = (f" It ran as `--mode {meta['ran_as']}`, the name these settings had before the quick preset was cut "
              "down for `make bench`." if meta.get("ran_as") else "")
    return generated_line(meta.get("command") or f"python -m bench.recon --mode {meta['mode']}", meta) + ran_as + (
        f" It keeps the rows of earlier runs (the first " + (f"`{_first(meta)['command']}`, " if _first(meta).get("command")
                                                            else "") +
        f"generated {_first(meta)['date']}); recon.json keeps every run's machine, load and time." if meta.get("earlier")
        else "") \
        + (" " + provenance_text(prov) if prov else "")


def render(results: list[dict], meta: dict, prov: dict | None = None) -> str:
    lines = ["# Reconstruction benchmark (`python -m bench.recon`)", "", header(meta, prov), "", EXPLAIN, ""]
    return "\n".join(lines + model_tables(results)) + "\n"


def _ms(v, n: int, metric: str, sign: str = "") -> str:
    """mean ± std (or the one seed's value)."""
    if v is None:
        return "–"
    return fmt_value(metric, v[0], sign) + (f" ± {fmt_value(metric, v[1])}" if n > 1 else " (1 seed)")


def _paired(v, n: int, metric: str) -> str:
    if not v:
        return "–"
    out = _ms(v, n, metric, "+")
    return f"**{out}**" if v[2] else out


def model_tables(results: list[dict], level: str = "##") -> list[str]:
    """Per model: the cut / recon table, the recovery table, the adaptive choices."""
    lines = []
    for res in results:
        metric = "accuracy" if res["task"] == "classification" else "perplexity"
        lm = res["task"] == "causal-lm"
        dense = res["dense"][metric]
        case = res["case"]
        lines += [f"{level} {res['model']}", "",
                  f"Dense {metric} {dense:.4g}" + (f", IMDB perplexity {res['dense']['perplexity_imdb']:.4g}"
                                                    if "perplexity_imdb" in res["dense"] else "")
                  + f". Seeds {case['seeds']}, {case['samples']} calibration samples, test "
                  + (f"{case['test_n']:,} BBC tokens + {case['other_n']:,} IMDB tokens" if lm
                     else f"{case['test_n'] or 'all'} examples") + "."
                  + (f" Adaptive uses fixed {case['fixed']} (not chosen on val)." if case.get("fixed") else ""), ""]
        head = "| budget | method | seeds | removed | cut | recon | recon / dense |" + (" IMDB ppl |" if lm else "") \
            + " vs uniform | analysis s | recon s |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        summary = summarise(res)
        for d in summary:
            rel = d["recon"][0] / dense if d["recon"] else float("nan")
            row = (f"| {d['budget']:.0%} | {d['method']} | {d['n']} | {d['params_removed']:.1%} | "
                   f"{_ms(d['cut'], d['n'], metric)} | {_ms(d['recon'], d['n'], metric)} | {rel:.3f}x |")
            if lm:
                row += f" {d['imdb']:.2f} |" if d.get("imdb") else " – |"
            row += f" {_paired(d.get('vs_uniform'), d['n'], metric)} | {d['analysis_seconds']:.0f} | {d['recon_seconds']:.1f} |"
            lines.append(row)
        rec = [d for d in summary if d.get("recovered")]
        if rec:
            r = case.get("recovery") or {}
            lines += ["", f"Recovery ({r.get('recovery')}, {r.get('recovery_steps')} steps, lr {r.get('lr')}, batch "
                      f"{r.get('train_batch_size')}, kd_alpha {r.get('kd_alpha')}, T {r.get('kd_temperature')}"
                      + (f", at most {case['recovery_cap_s']:.0f} s a run" if case.get("recovery_cap_s") else "")
                      + "):", "",
                      "| budget | method | seeds | recon | recovered | recovered / dense | gain (paired) | steps | train s |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for d in rec:
                lines.append(f"| {d['budget']:.0%} | {d['method']} | {d['n']} | {_ms(d['recon'], d['n'], metric)} | "
                             f"{_ms(d['recovered'], d['n'], metric)} | {d['recovered'][0] / dense:.3f}x | "
                             f"{_paired(d['recovery_gain'], d['n'], metric)} | {d['recovery_steps']:.0f} | "
                             f"{d['recovery_seconds']:.0f} |")
        chosen = sorted({(r["budget"], r["seed"], r.get("amplitude"), r.get("normalization"))
                         for r in res["rows"] if r["method"] == "adaptive"})
        picks = [("A = 0 (uniform)" if not a else n) for _, _, a, n in chosen]
        lines += ["", "Adaptive choices (budget, seed, A, normalisation): "
                  + ", ".join(f"({b:.0%}, {s}, {a:g}, {n})" for b, s, a, n in chosen)
                  + ". Chosen on val: " + ", ".join(f"{k} {picks.count(k)} of {len(picks)}" for k in
                                                    sorted(set(picks), key=lambda k: (-picks.count(k), k))) + ".", ""]
    return lines


def merge_rows(old: dict | None, new: dict) -> dict:
    """`new`'s rows over `old`'s: a row of the same (method, budget, seed) is replaced; the case
    records every seed and budget that has rows."""
    if not old:
        return new
    key = lambda r: (r["method"], r["budget"], r["seed"])  # noqa: E731
    fresh_keys = {key(r) for r in new["rows"]}
    rows = [r for r in old["rows"] if key(r) not in fresh_keys] + new["rows"]
    case = {**old["case"], **new["case"]}  # the newest settings (e.g. a recovery recipe), every seed and budget
    case["seeds"] = sorted({r["seed"] for r in rows})
    case["budgets"] = sorted({r["budget"] for r in rows})
    case["extra_budgets"] = []
    return {**old, "rows": rows, "case": case, "dense": new["dense"]}


def combine(docs: list[dict], out: Path) -> int:
    """recon.json from runs made apart (side by side, or a rerun of one model): per model the newest
    run's results; the provenance lists every run whose results stay (write_json's `earlier`)."""
    docs = sorted(docs, key=lambda d: d["meta"]["date"])
    newest = {r["model"]: (d, r) for d in docs for r in d["results"]}  # later runs override earlier ones
    kept = [d for d in docs if any(src is d for src, _ in newest.values())]
    chain = kept[0]["meta"]  # the oldest run, with the runs it merged itself
    for d in kept[1:]:  # each newer run's meta points to the one before, as a --merge writes it
        chain = {**d["meta"], "earlier": chain}
    meta = chain
    results = [r for _, r in newest.values()]
    prov = write_json(out / "recon.json", {"meta": meta, "results": results}, kept)
    (out / "RECON.md").write_text(render(results, meta, prov))
    log(f"wrote {out / 'RECON.md'} from {len(kept)} runs: " + ", ".join(f"{m} ({src['meta']['date']})"
                                                                     for m, (src, _) in newest.items()))
    return 0


def main(argv=None) -> int:
    import torch
    ap = argparse.ArgumentParser(prog="python -m bench.recon")
    ap.add_argument("--mode", choices=sorted(PRESETS), default="long")
    ap.add_argument("--out", default="bench")
    ap.add_argument("--models", default=None)
    ap.add_argument("--render-only", action="store_true", help="rewrite RECON.md from the existing recon.json")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS)
                    + " (flap includes flap+refit; adaptive includes uniform)")
    ap.add_argument("--budgets", default=None, help="comma-separated budgets instead of the preset's")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds instead of the preset's")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; smoke: 1)")
    ap.add_argument("--merge", action="store_true", help="add the new rows to recon.json, replacing rows of the "
                    "same (model, method, budget, seed) and keeping the rest")
    ap.add_argument("--no-recovery", action="store_true", help="skip the recovery rows (training after the refit)")
    ap.add_argument("--combine", nargs="+", metavar="JSON", help="run nothing: write recon.json / RECON.md from "
                    "these recon.json (runs made apart), per model the newest run's results, with every kept run's "
                    "provenance")
    args = ap.parse_args(argv)
    if args.combine:
        return combine([json.loads(Path(f).read_text()) for f in args.combine], Path(args.out))
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}")
    if args.render_only:
        res = json.loads((Path(args.out) / "recon.json").read_text())
        (Path(args.out) / "RECON.md").write_text(render(res["results"], res["meta"], res.get("provenance")))
        return 0
    if args.threads or args.mode == "smoke":
        torch.set_num_threads(args.threads or 1)
    cases = PRESETS[args.mode]
    if args.models:
        cases = [c for c in cases if c.model in args.models.split(",")]
    if args.budgets:
        cases = [replace(c, budgets=[float(b) for b in args.budgets.split(",")], extra_budgets=[]) for c in cases]
    if args.seeds:
        cases = [replace(c, seeds=[int(s) for s in args.seeds.split(",")]) for c in cases]
    if args.no_recovery:
        cases = [replace(c, recovery_budgets=[]) for c in cases]
    t0 = time.perf_counter()
    meta = {"mode": args.mode, "command": "python -m bench.recon " + " ".join(argv if argv is not None else sys.argv[1:]), "machine": machine(), "load_before": common.load_average(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    old = out / "recon.json"
    keep = []
    prev = json.loads(old.read_text()) if old.exists() and (args.models or args.merge) else None
    if prev:  # a partial rerun keeps the other models' results (and says when they ran)
        keep = [r for r in prev["results"] if r["model"] not in {c.model for c in cases}]
        meta["earlier"] = prev.get("meta")
    results = []
    for c in cases:  # written after each model, so a long run that is stopped keeps what it finished
        earlier = next((r for r in prev["results"] if r["model"] == c.model), None) if args.merge and prev else None
        res = run_case(c, methods, dense=earlier["dense"] if earlier else None)
        if args.merge:
            res = merge_rows(earlier, res)
        results.append(res)
        meta.update(seconds=time.perf_counter() - t0, load_after=common.load_average())
        prov = write_json(out / "recon.json", {"meta": meta, "results": keep + results}, [prev] if prev else [])
        (out / "RECON.md").write_text(render(keep + results, meta, prov))
        log(f"wrote {out / 'RECON.md'} after {meta['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
