"""results.json -> REPORT.md (tables, targets with pass/fail per row) and plots.html.
Everything in the report is computed from results.json; nothing is typed in."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .common import provenance_text, write_json

ORDER = ["dense", "uniform", "adaptive", "torch-pruning", "torch-pruning-magnitude", "one-shot"]
TARGET_FRACTION_OF_LIMIT = 0.85
TARGET_ANALYSIS_RATIO = 1.5


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def write_outputs(results: dict, out: Path, earlier=()) -> None:
    """results.json (with its provenance: bench.common.write_json; `earlier`: the documents whose rows
    it keeps), REPORT.md and plots.html."""
    out = Path(out)
    write_json(out / "results.json", results, earlier, default=_json_default)
    render_outputs(results, out)


def render_outputs(results: dict, out: Path) -> None:
    """REPORT.md and plots.html from `results` (results.json is not touched)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "REPORT.md").write_text(render(results))
    try:
        html = plots_html(results)
    except Exception as e:  # plots are a convenience: never lose the numbers over them
        html = f"<html><body>plots could not be drawn: {type(e).__name__}: {e}</body></html>"
    (out / "plots.html").write_text(html)


# --- formatting --------------------------------------------------------------------------------

def _higher(metric: str) -> bool:
    return metric == "accuracy"


def _fmt(metric: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.1f}" if metric == "accuracy" else f"{v:.2f}"


def _fmt_ms(mean, std, metric) -> str:
    s = _fmt(metric, mean)
    if std:
        s += f" ± {_fmt(metric, std)}"
    return s


def _pf(ok: bool | None) -> str:
    return "–" if ok is None else ("**pass**" if ok else "**FAIL**")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _models(results: dict) -> list[str]:
    """Models in the preset's order (minilm-rt first), then any others found."""
    seen = [m["name"] for m in results.get("meta", {}).get("config", {}).get("models", [])]
    found = {r["model"] for sec in ("recon", "quality", "speed", "analysis_cost") for r in results.get(sec, [])}
    seen = [m for m in seen if m in found]
    for sec in ("recon", "quality", "speed", "analysis_cost"):
        for r in results.get(sec, []):
            if r["model"] not in seen:
                seen.append(r["model"])
    return seen


def _q(results, model, budget, method):
    for r in results.get("quality", []):
        if r["model"] == model and r["method"] == method and (method == "dense" or abs(r["budget"] - budget) < 1e-9):
            return r
    return None


def _speed(results, model, budget, method):
    for r in results.get("speed", []):
        if r["model"] == model and r["method"] == method and abs(r["budget"] - budget) < 1e-9:
            return r
    return None


# --- targets ------------------------------------------------------------------------------------

def own_reference(r: dict) -> bool:
    """A speed row whose plan has the same widths in every layer is its own same-width reference
    (one architecture, timed once): its fraction of the limit is 1.0 by construction."""
    if "own_reference" in r:  # recorded by bench.speed; rows of earlier runs: read off their widths
        return bool(r["own_reference"])
    heads, neurons = r.get("heads"), r.get("neurons")
    return bool(heads and neurons) and len(set(heads)) == 1 and len(set(neurons)) == 1


def chose_uniform(row: dict) -> bool:
    """An adaptive row where val chose A = 0: the uniform plan itself, tied with uniform by construction."""
    return row.get("amplitude") is not None and float(row["amplitude"]) == 0.0


# A target row has "ok": True / False when it is judged, None when it is "tied by construction"
# ("by_construction": how many seed-budgets or rows were set aside), which the verdict does not count;
# and "fails_when": what result would make it fail (shown next to the verdict).
BY_CONSTRUCTION = "tied by construction, not counted"


def fails_when_worse(other: str, paired: bool = False) -> str:
    """What fails "adaptive ≥ `other`"."""
    text = (f"adaptive is worse than {other} on the paired difference over seeds" if paired
            else f"adaptive's mean over seeds is worse than {other}'s") + " (lower accuracy / higher perplexity)"
    if other == "uniform":
        text += "; a seed-budget where val chose A = 0 (adaptive is then the uniform plan) is set aside, not a pass"
    return text


FAILS_WHEN_SPEED = (f"a plan whose widths differ between layers runs at < {TARGET_FRACTION_OF_LIMIT:.0%} of the speed-up "
                    "of its same-width dense limit (plans with the same widths in every layer are their own "
                    "limit, set aside)")
FAILS_WHEN_ANALYSIS = (f"one analysis pass (every metric) takes > {TARGET_ANALYSIS_RATIO}x the time of a forward + "
                       "backward over the same calibration batches")


def targets(results: dict) -> list[dict]:
    out = []
    for model in _models(results):
        rows = [r for r in results.get("quality", []) if r["model"] == model]
        for budget in sorted({r["budget"] for r in rows if r["method"] != "dense"}):
            ad = _q(results, model, budget, "adaptive")
            if not ad:
                continue
            metric = ad["metric"]
            for other, name in (("uniform", "adaptive ≥ uniform"), ("torch-pruning", "adaptive ≥ Torch-Pruning"),
                                ("torch-pruning-magnitude", "adaptive ≥ Torch-Pruning (magnitude)")):
                o = _q(results, model, budget, other)
                if not o:
                    continue
                fails = fails_when_worse(other)
                if other == "uniform" and chose_uniform(ad):
                    out.append({"target": name, "model": model, "budget": budget, "ok": None,
                                "by_construction": max(len(ad.get("seeds") or []), 1), "fails_when": fails,
                                "detail": f"val chose uniform (A = 0): {BY_CONSTRUCTION}"})
                    continue
                diff = ad["mean"] - o["mean"]
                ok = diff >= 0 if _higher(metric) else diff <= 0
                noise = math.hypot(ad["std"], o["std"])
                out.append({"target": name, "model": model, "budget": budget, "ok": ok, "fails_when": fails,
                            "detail": f"{_fmt(metric, ad['mean'])} vs {_fmt(metric, o['mean'])} "
                                      f"({'+' if diff >= 0 else '−'}{_fmt(metric, abs(diff))}"
                                      f"{'; seed spread ' + _fmt(metric, noise) if noise else ''})"})
    out += recon_targets(results)
    for r in results.get("speed", []):
        detail = (f"{r['speedup']:.2f}x of {r['limit_speedup']:.2f}x = {r['fraction_of_limit']:.0%} "
                  f"({r['method']})")
        own = own_reference(r)  # the same widths in every layer: its own reference, 100 % by construction
        out.append({"target": "speed-up ≥ 85 % of the same-width limit", "model": r["model"], "budget": r["budget"],
                    "method": r["method"], "ok": None if own else r["fraction_of_limit"] >= TARGET_FRACTION_OF_LIMIT,
                    "by_construction": int(own), "fails_when": FAILS_WHEN_SPEED,
                    "detail": detail + (f"; the same widths in every layer, its own reference: {BY_CONSTRUCTION}"
                                        if own else "")})
    for r in results.get("analysis_cost", []):
        out.append({"target": "analysis ≤ 1.5x forward+backward", "model": r["model"], "budget": None,
                    "ok": r["ratio"] <= TARGET_ANALYSIS_RATIO, "fails_when": FAILS_WHEN_ANALYSIS,
                    "detail": f"{r['samples']} samples: {r['analysis_s']:.2f} s vs {r['forward_backward_s']:.2f} s = "
                              f"{r['ratio']:.2f}x"})
    return out


# The goals for the recon section: (model, budget) -> (phase, bound, higher is better), quality
# relative to dense; and seconds of one reconstructed stage (analysis + refit).
RECON_GOALS = {("smollm2-135m", 0.2): [("recon", 1.30, False), ("recovered", 1.15, False)],
               ("minilm-rt", 0.4): [("best", 0.99, True)], ("minilm-rt", 0.6): [("best", 0.97, True)]}
STAGE_SECONDS_GOAL = {"minilm-rt": 10.0, "smollm2-135m": 60.0}


def recon_targets(results: dict) -> list[dict]:
    """Adaptive against every baseline (paired over seeds, after reconstruction), and the goals. Against
    uniform, the seeds where val chose A = 0 (adaptive *is* the uniform plan) are set aside as tied by
    construction; the paired difference is over the other seeds."""
    from .recon import fmt_value, paired, summarise
    out = []
    for res in results.get("recon", []):
        metric = "accuracy" if res["task"] == "classification" else "perplexity"
        hib, dense, model = _higher(metric), res["dense"][metric], res["model"]
        summary = summarise(res)
        for budget in sorted({d["budget"] for d in summary}):
            at = {d["method"]: d for d in summary if d["budget"] == budget}
            ad = at.get("adaptive")
            if not ad:
                continue
            by_seed = {}  # method -> seed -> row
            for r in res["rows"]:
                if r["budget"] == budget:
                    by_seed.setdefault(r["method"], {})[r["seed"]] = r
            for other in ("uniform", "torch-pruning", "flap", "flap+refit"):
                if other not in ad["paired"]:
                    continue
                name = f"adaptive ≥ {other} (reconstructed)"
                seeds = sorted(set(by_seed["adaptive"]) & set(by_seed[other]))
                tied = [s for s in seeds if other == "uniform" and chose_uniform(by_seed["adaptive"][s])]
                seeds = [s for s in seeds if s not in tied]
                note = (f"; val chose uniform (A = 0) on seed{'s' if len(tied) > 1 else ''} "
                        f"{', '.join(map(str, tied))}: {BY_CONSTRUCTION}" if tied else "")
                fails = fails_when_worse(other, paired=True)
                if not seeds:
                    out.append({"target": name, "model": model, "budget": budget, "ok": None,
                                "by_construction": len(tied), "fails_when": fails, "detail": note.lstrip("; ")})
                    continue
                mine = [by_seed["adaptive"][s]["recon"][metric] for s in seeds]
                theirs = [by_seed[other][s]["recon"][metric] for s in seeds]
                m, sd, beyond, n = paired([a - b for a, b in zip(mine, theirs)])  # adaptive minus it, per seed
                out.append({"target": name, "model": model, "budget": budget, "ok": m >= 0 if hib else m <= 0,
                            "tie": n > 1 and not beyond, "by_construction": len(tied), "fails_when": fails,
                            "detail": f"{fmt_value(metric, sum(mine) / n)} vs {fmt_value(metric, sum(theirs) / n)}"
                                      f"; paired {fmt_value(metric, m, '+')}"
                                      + (f" ± {fmt_value(metric, sd)} over {n} seeds"
                                         + ("" if beyond else " (inside the spread)") if n > 1 else " (1 seed)")
                                      + note})
            for phase, bound, higher in RECON_GOALS.get((model, budget), []):
                vals = [v for v in (ad.get("recon"), ad.get("recovered")) if v] if phase == "best" else \
                    [ad[phase]] if ad.get(phase) else []
                if not vals:
                    continue
                v = (max if hib else min)(x[0] for x in vals)
                rel = v / dense
                out.append({"target": f"adaptive {'≥' if higher else '≤'} {bound:.2f}x dense "
                                      f"({'reconstruction' if phase == 'recon' else 'reconstruction + recovery' if phase == 'recovered' else 'best of recon / recovered'})",
                            "model": model, "budget": budget, "ok": rel >= bound if higher else rel <= bound,
                            "fails_when": f"adaptive's {'best ' if phase == 'best' else ''}{metric} (its seeds' mean) "
                                          f"is {'below' if higher else 'above'} {bound:.2f}x the dense model's",
                            "detail": f"{fmt_value(metric, v)} = {rel:.3f}x dense {fmt_value(metric, dense)}"})
        goal = STAGE_SECONDS_GOAL.get(model)
        rows = [r for r in res["rows"] if r["method"] == "adaptive"]
        if goal and rows:
            secs = sorted(r["analysis_seconds"] + r["recon_seconds"] for r in rows)
            med = secs[len(secs) // 2]
            out.append({"target": f"a reconstructed stage (analysis + refit) ≤ {goal:.0f} s", "model": model,
                        "budget": None, "ok": med <= goal,
                        "fails_when": f"the median over adaptive rows of analysis + refit seconds is above {goal:.0f} s",
                        "detail": f"median {med:.1f} s over {len(secs)} adaptive rows (range {secs[0]:.1f}–"
                                  f"{secs[-1]:.1f} s; {results.get('meta', {}).get('machine', {}).get('torch_threads')}"
                                  " torch threads)"})
    return out


def recon_headline(results: dict) -> list[str]:
    from .recon import EXPLAIN, model_tables
    if not results.get("recon"):
        return []
    return ["## Headline: methods at equal parameters, cut → reconstructed → recovered", "",
            "Budget = fraction of the transformer-block parameters removed, in one stage. " + EXPLAIN
            + " The same tables for longer runs (SmolLM2 at 30 / 40 %, 16,384 BBC tokens) are bench/RECON.md "
            "(`python -m bench.recon`).", ""] + model_tables(results["recon"], level="###")


def _recon_settings(results: dict) -> list[str]:
    L = []
    for res in results.get("recon", []):
        c = res["case"]
        L.append(f"- **{res['model']}** (recon): budgets {c['budgets']}, seeds {c['seeds']}, {c['samples']} "
                 f"calibration samples (analysis and refit), A over {c['amplitudes']} × normalisation "
                 f"{c['normalizations']} chosen on {c['val_n'] or 'all'} val "
                 + ("tokens" if res["task"] == "causal-lm" else "examples")
                 + f"; recovery rows at {c.get('recovery_budgets')}: {c.get('recovery')}.")
    return L


# --- the report ---------------------------------------------------------------------------------

def headline(results: dict) -> str:
    parts = []
    for model in _models(results):
        rows = [r for r in results.get("quality", []) if r["model"] == model]
        if not rows:
            continue
        metric = rows[0]["metric"]
        budgets = sorted({r["budget"] for r in rows if r["method"] != "dense"})
        methods = [m for m in ORDER if any(r["method"] == m for r in rows)]
        dense = _q(results, model, 0, "dense")
        head = ["removed"] + [("adaptive (A)" if m == "adaptive" else m) for m in methods if m != "dense"] + \
               ["speed-up (adaptive / limit)"]
        table = []
        for b in budgets:
            line = [f"{b:.0%}"]
            for m in methods:
                if m == "dense":
                    continue
                r = _q(results, model, b, m)
                cell = _fmt_ms(r["mean"], r["std"], metric) if r else "–"
                if r and m == "adaptive" and r.get("amplitude") is not None:
                    cell += f" (A={r['amplitude']:g})"
                line.append(cell)
            s = _speed(results, model, b, "adaptive")
            line.append(f"{s['speedup']:.2f}x / {s['limit_speedup']:.2f}x" if s else "–")
            table.append(line)
        unit = "test accuracy, %" if metric == "accuracy" else "test perplexity, lower is better"
        seeds = max((len(r["seeds"]) for r in rows if r["method"] != "dense"), default=0)
        parts.append(f"**{model}** ({unit}; dense {_fmt(metric, dense['mean']) if dense else '–'}; "
                     f"mean ± std over {seeds} seed{'s' if seeds != 1 else ''}):\n\n" + _table(head, table))
    return "\n\n".join(parts) if parts else "_quality section not run_"


def render(results: dict) -> str:
    meta = results.get("meta", {})
    m = meta.get("machine", {})
    cfg = meta.get("config", {})
    L = [f"# Pruning Explorer benchmark ({meta.get('mode', '?')} mode)", "",
         "Generated by `python -m bench` from `bench/results.json`; every number below is computed by the run, "
         "none is typed in.", ""]
    L += ["## Machine and commands", "",
          f"- CPU: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gb', '?')} GiB; torch threads "
          f"{m.get('torch_threads')}; GPU: {m.get('gpu') or 'none'}",
          f"- torch {m.get('torch')}, transformers {m.get('transformers')}, peft {m.get('peft')}, "
          f"torch-pruning {m.get('torch_pruning')}, numpy {m.get('numpy')}, Python {m.get('python')} "
          f"({m.get('platform')})",
          f"- date: {m.get('date')}; load average (1/5/15 min) at start {meta.get('load_average_start')}, "
          f"at end {meta.get('load_average_end')} (above the core count means other jobs shared the CPU and "
          "timings are noisy: latencies are interleaved and medians)",
          "- runtime (wall clock on the shared machine): " + _runtime(results)]
    if results.get("provenance"):
        L += ["- code: " + provenance_text(results["provenance"])]
    L += ["- commands (run from the repository root; `make bench` runs `.venv/bin/python -m bench $(BENCH_ARGS)` "
          "with HF_HUB_OFFLINE=1):", ""]
    L += [f"      {c}" for c in meta.get("commands", [])] + [""]
    for mf in meta.get("merged_from", []):
        L += [f"- merged in from a run started {mf.get('date')} (load average at start/end {mf.get('load_average')}): "
              + "; ".join(f"`{c}`" for c in mf.get("commands") or []), ""]
    L += recon_headline(results)
    if results.get("quality"):
        L += ["## K-stage runs (quality at equal parameters, same recovery budget)", "",
              "Budget = fraction of the transformer-block parameters removed. `adaptive` is ours (Adapt-Pruner "
              "allocation, exact budget, K stages; A picked on the val split, test reported), `uniform` the same "
              "pipeline with S_L = S_base, `torch-pruning` the external baseline (Torch-Pruning's GroupTaylor "
              "importance and BasePruner, uniform, same K stages and recovery), `one-shot` = adaptive with K = 1 "
              "and the same total recovery steps.", "", headline(results), ""]
    L += _targets_section(results, fails_when=True)
    L += _quality_section(results)
    L += _speed_section(results)
    L += _cost_section(results)
    L += _ui_section(results)
    L += _methods_section(results)
    L += ["## Settings", ""] + _recon_settings(results)
    for mb in (cfg.get("models", []) if results.get("quality") else []):
        L.append(f"- **{mb['name']}**: budgets {mb['budgets']}, seeds {mb['seeds']}, A swept over {mb['amplitudes']} "
                 f"({'every seed' if mb['sweep_all_seeds'] else 'first seed; other seeds use the chosen A'}), "
                 f"K = {mb['stages']} stages x {mb['steps_per_stage']} {mb['recovery']} recovery steps of batch "
                 f"{mb['train_batch_size']} (one-shot: 1 x {mb['stages'] * mb['steps_per_stage']}), "
                 f"{mb['calib_samples']} calibration samples per stage, tokens per sample "
                 f"{mb['max_length'] or 'model default'}; test {mb['test_n'] or 'all'}, val {mb['val_n'] or 'all'}"
                 + (f" tokens, perplexity window {mb['ppl_window']} stride {mb['ppl_stride']}"
                    if 'llama' in mb['name'] or 'smollm' in mb['name'] else " examples")
                 + f"; latency batch {mb['speed_batch']} x {mb['speed_seq']}, {mb['speed_repeats']} repeats.")
    if meta.get("quick_cuts"):
        L += ["", "### What quick mode cuts", "", meta["quick_cuts"]]
    L += ["", "## Method notes", ""]
    if results.get("recon"):
        L += ["- Recon section: every method starts from the same dense weights and the same calibration samples "
              "per seed (`TextData.calibration(n, 1, seed)`); the plan's units are removed in one stage and the "
              "output projections refit layer by layer (`explorer.reconstruct`). Torch-Pruning scores units with "
              "its own GroupTaylorImportance (heads + FFN channels on BERT, FFN channels only on GQA models, where "
              "its head pruning would cut query heads inside KV groups); FLAP is implemented from its paper "
              "(bench/recon.py: fluctuation metric, standardised global widths, bias compensation). Speed rows "
              "time these plans' architectures."]
    if not results.get("quality"):
        return "\n".join(L + [""]) + "\n"
    L += ["- Every pruned model starts from the same dense weights and gets the same recovery (LoRA, merged back "
          "after each stage) and the same number of optimiser steps; calibration samples differ per stage and "
          "per seed (`TextData.calibration(n, stage, seed)`); the seed also sets the recovery batches.",
          "- Torch-Pruning is given the per-layer counts of the uniform allocation, so on MiniLM `uniform` and "
          "`torch-pruning` have identical widths and differ only in which heads/channels they keep (explorer "
          "Taylor score vs Torch-Pruning's GroupTaylorImportance over its dependency graph; "
          "`torch-pruning-magnitude`: its GroupMagnitudeImportance, p = 2). " + _tp_identity(results) + " After each cut the "
          "cached `num_attention_heads` / `all_head_size` of `BertSelfAttention` are refreshed from the weights. "
          "On SmolLM2 (GQA) Torch-Pruning's head pruning would remove query heads inside KV groups only, so it "
          "prunes FFN channels only, to the same parameter count (its widths then differ from `uniform`, which "
          "also removes whole KV groups once a layer's S_L reaches 1/6 of its 3 groups: see the heads column of "
          "the speed table).",
          "- Accuracy is `explorer.evaluate.accuracy` with examples sorted by length (less padding; the same "
          "predictions); perplexity is `explorer.evaluate.perplexity` with the window/stride given above.",
          "- Latency depends only on the architecture: each pruned model is rebuilt from the per-layer widths its "
          "run recorded. `limit` = dense / same-width dense (`explorer.evaluate.same_width_reference`: every layer "
          "at the pruned model's average widths).", ""]
    return "\n".join(L) + "\n"


def _runtime(results) -> str:
    meta = results.get("meta", {})
    secs = meta.get("section_seconds", {})
    by_model = meta.get("quality_seconds_by_model", {})
    run_sum = {mod: sum(r.get("run_seconds", 0) + r.get("eval_seconds", 0) for r in results.get("runs", [])
                        if r.get("model") == mod) for mod in _models(results)}
    # quality of a model measured by an earlier invocation that did not finish its section: sum of its runs
    extra = {mod: v for mod, v in run_sum.items() if mod not in by_model and v}
    seq = sum(v for k, v in secs.items() if "parallel" not in k) + sum(extra.values())
    parts = [f"{k} {v / 60:.1f} min" + (" (" + ", ".join(f"{m} {t / 60:.1f}" for m, t in by_model.items()) + ")"
                                           if k == "quality" and by_model else "")
             for k, v in secs.items() if "parallel" not in k]
    parts += [f"quality of {m} {v / 60:.1f} min (sum of its runs, from the first invocation)" for m, v in extra.items()]
    par = [f"{k.replace(' (parallel run)', '')} {v / 60:.1f} min" for k, v in secs.items() if "parallel" in k]
    return (f"{seq / 60:.1f} min for the sections run one after another (" + "; ".join(parts) + ")"
            + (f", plus {', '.join(par)} run at the same time in a second process" if par else "") + ".")


def _tp_identity(results) -> str:
    """How often Torch-Pruning (Taylor) ended exactly where `uniform` did (computed, per seed)."""
    same = total = 0
    for r in results.get("runs", []):
        if r.get("method") != "torch-pruning" or r.get("error"):
            continue
        twin = [u for u in results["runs"] if u.get("method") == "uniform" and u["model"] == r["model"]
                and u["budget"] == r["budget"] and u["seed"] == r["seed"]]
        if twin:
            total += 1
            vals = (twin[0].get("val"), r.get("val"))
            same += int(twin[0]["test"] == r["test"] and (None in vals or vals[0] == vals[1]))
    if not total:
        return ""
    msg = f"In {same} of {total} runs Torch-Pruning (Taylor) reached exactly the test quality of `uniform`"
    if same == total:
        msg += (": both rank units by the group sum of |W·dL/dW| over the same coupled parameters, so at equal "
                "widths they keep the same units, and the explorer's `uniform` is Torch-Pruning's Taylor pruning "
                "with the same schedule.")
    return msg + "."  if same != total else msg


def _targets_section(results, fails_when: bool = False) -> list[str]:
    """The targets' summary (pass / FAIL per target) and every row; `fails_when`: with a column
    saying what would make each target fail (REPORT.md has it; the README block does not yet)."""
    ts = targets(results)
    if not ts:
        return []
    L = ["## Targets", ""]
    groups: dict[str, list[dict]] = {}
    for t in ts:
        groups.setdefault(t["target"], []).append(t)
    summary = []
    for name, items in groups.items():
        judged = [t for t in items if t["ok"] is not None]
        n_ok = sum(1 for t in judged if t["ok"])
        ties = sum(1 for t in judged if t.get("tie"))
        built = sum(t.get("by_construction", 0) for t in items)
        summary.append([name, f"{n_ok} / {len(judged)}" + (f" ({ties} inside the seed spread)" if ties else "")
                        + (f"; {built} {BY_CONSTRUCTION}" if built else ""),
                        ("**pass**" if n_ok == len(judged) else "**FAIL**") if judged else "– (nothing to judge)"]
                       + ([items[0].get("fails_when", "–")] if fails_when else []))
    L += ["A comparison whose paired difference is inside the seed spread says so: its sign is not a result. "
          "Rows tied by construction are set aside, not counted as passes: where val chose A = 0, adaptive *is* the "
          "uniform model; a plan with the same widths in every layer is its own same-width reference.", "",
          _table(["target", "rows passing", "verdict"] + (["fails when"] if fails_when else []), summary), ""]
    rows = [[t["target"], t["model"], f"{t['budget']:.0%}" if t["budget"] is not None else "–", t["detail"],
             _pf(t["ok"]) + (" (tie)" if t.get("tie") else "")
             + (" (tied by construction)" if t["ok"] is None and t.get("by_construction") else "")] for t in ts]
    L += ["<details><summary>every row</summary>", "", _table(["target", "model", "budget", "measured", "verdict"], rows),
          "", "</details>", ""]
    return L


def _rows_by_model(results, key: str) -> list[dict]:
    """The rows of one section, by model (in report order), then budget."""
    order = _models(results)
    return sorted(results.get(key, []), key=lambda r: (order.index(r["model"]) if r["model"] in order else 99,
                                                       r["budget"]))


def _quality_section(results) -> list[str]:
    rows = _rows_by_model(results, "quality")
    if not rows:
        return []
    L = ["## Quality (all rows)", ""]
    table = []
    for r in rows:
        extra = ""
        if r.get("val_by_amplitude"):
            extra = "val by A: " + ", ".join(f"{float(a):g}→{_fmt(r['metric'], v)}" for a, v in r["val_by_amplitude"].items())
        if r.get("scope"):
            extra = r["scope"]
        table.append([r["model"], f"{r['budget']:.0%}", r["method"], r["metric"],
                      _fmt_ms(r["mean"], r["std"], r["metric"]),
                      ", ".join(_fmt(r["metric"], v) for v in r.get("values", [])),
                      f"{r.get('removed_fraction', 0):.3f}", f"{r.get('params', 0) / 1e6:.2f} M",
                      r.get("recovery_steps_total", "–"), extra])
    L += [_table(["model", "budget", "method", "metric", "test mean ± std", "per seed", "removed (blocks)",
                  "params", "recovery steps", "notes"], table), ""]
    failed = [r for r in results.get("runs", []) if r.get("error")]
    if failed:
        L += ["Failed runs (left out of the means above):", ""]
        L += [f"- {r['model']} {r['method']} {r['budget']:.0%} seed {r['seed']}: {r['error']}" for r in failed] + [""]
    return L


def _speed_section(results) -> list[str]:
    rows = _rows_by_model(results, "speed")
    if not rows:
        return []
    L = ["## Speed", "", "Inference forward pass on random tokens; median of interleaved repeats.", ""]
    table = [[r["model"], f"{r['budget']:.0%}", r["method"], f"{r['batch_size']} x {r['seq_len']}",
              f"{r['dense_ms']:.0f}", f"{r['pruned_ms']:.0f}", f"{r['same_width_ms']:.0f}",
              f"{r['speedup']:.2f}x", f"{r['limit_speedup']:.2f}x", f"{r['fraction_of_limit']:.0%}",
              f"{r['throughput_tokens_s']:.0f} (dense {r['dense_throughput_tokens_s']:.0f})",
              f"{r['params'] / 1e6:.2f} M / {r['dense_params'] / 1e6:.2f} M", f"{r['flops_ratio']:.2f}",
              " ".join(str(h) for h in r["heads"])] for r in rows]
    L += [_table(["model", "budget", "method", "batch x tokens", "dense ms", "pruned ms", "same-width ms", "speed-up",
                  "limit", "of limit", "tokens/s", "params", "FLOPs vs dense", "heads (KV groups) per layer"], table), ""]
    own = sorted({r["method"] for r in rows if own_reference(r)})
    if own:
        L += [f"Rows of {', '.join(own)} with the same widths in every layer are their own same-width reference "
              "(one architecture, timed once), so 100 % of the limit holds by construction there; the 85 % target "
              "counts only the plans whose widths differ between layers.", ""]
    return L


def _cost_section(results) -> list[str]:
    rows = results.get("analysis_cost", [])
    if not rows:
        return []
    L = ["## Cost of analysis", "",
         "`explorer.importance.analyze` with every metric (cosine, magnitude, Taylor, Fisher, act×grad, APT, "
         "vector Taylor) against a plain forward + backward over the same batches; alternated, median.", ""]
    table = [[r["model"], f"{r['params'] / 1e6:.1f} M", r["samples"], r["tokens"], f"{r['analysis_s']:.2f}",
              f"{r['forward_backward_s']:.2f}", f"{r['ratio']:.2f}x",
              f"{1000 * r['analysis_s'] / max(r['tokens'], 1):.2f}"] for r in rows]
    L += [_table(["model", "params", "samples", "tokens", "analysis s", "forward+backward s", "ratio",
                  "analysis ms / token"], table), ""]
    return L


def _ui_section(results) -> list[str]:
    rows = results.get("ui", [])
    if not rows:
        return []
    L = ["## UI server time", ""]
    table = []
    for r in rows:
        v = r["server_ms"]
        cell = f"{v:.2f} ms" if v < 1000 else f"{v / 1000:.1f} s"
        parts = "; ".join(f"{k} {p / 1000:.1f} s" for k, p in r.get("parts_ms", {}).items())
        table.append([r["action"], cell, parts or r.get("note", "")])
    L += [_table(["action", "server time (median)", "breakdown"], table), ""]
    return L


def _methods_section(results) -> list[str]:
    rows = results.get("methods", [])
    if not rows:
        return []
    meta = results.get("meta", {})
    cfg = meta.get("config", {})
    for mf in meta.get("merged_from", []):
        if "methods" in (mf.get("sections") or []) and mf.get("config"):
            cfg = mf["config"]
    mb = next((m for m in cfg.get("models", []) if m["name"] == cfg.get("methods_model")), None)
    r0 = next((r for r in rows if not r.get("error")), rows[0])
    sched = (f"K = {r0.get('stages')} stages x {r0.get('recovery_steps_per_stage')} {r0.get('recovery')} recovery steps, "
             f"A = {r0.get('amplitude')}, seed {r0.get('seed')}")
    if mb:
        sched += (f", {mb['calib_samples']} calibration samples per stage, test on "
                  f"{cfg.get('methods_test_n') or 'all'} examples, latency batch {mb['speed_batch']} x {mb['speed_seq']} "
                  f"over {cfg.get('methods_speed_repeats')} interleaved repeats")
    L = ["## All methods (issue #5)", "",
         "Every method registered in `explorer.methods.METHODS`, one recovery budget for all: " + sched + ". "
         "Masks-only methods report the fraction of block weights set to zero and no speed-up.", ""]
    table = []
    for r in rows:
        if r.get("error"):
            table.append([r["method"], f"{r['budget']:.0%}", "–", "–", "–", "–", f"failed: {r['error']}"])
            continue
        removed = r["removed_fraction"] if r["structural"] else r.get("zero_fraction_of_blocks", 0)
        speed = f"{r['speedup']:.2f}x" if r.get("speedup") else r.get("speed_note", "–")
        table.append([r["method"], f"{r['budget']:.0%}", f"{100 * r['test']:.1f}", f"{100 * r['dense']:.1f}",
                      f"{removed:.3f}" + ("" if r["structural"] else " (zeros)"), r.get("recovery_steps_run", "–"),
                      speed])
    L += [_table(["method", "budget", "test accuracy %", "dense %", "removed (blocks)", "recovery steps run",
                  "speed-up (batch 32 x 128)"], table), ""]
    return L


# --- plots --------------------------------------------------------------------------------------

def _recon_figure(res: dict):
    """Test quality against parameters removed, one line per (method, phase), ± the seed spread."""
    import plotly.graph_objects as go

    import plotly.colors

    from .recon import METHODS, summarise
    metric = "accuracy" if res["task"] == "classification" else "perplexity"
    summary = summarise(res)
    palette = plotly.colors.qualitative.Plotly
    fig = go.Figure()
    shown = [res["dense"][metric]]  # the values on visible traces, for a log axis' range
    for k, method in enumerate(METHODS):  # one colour per method; the phase is the line style
        ds = sorted((d for d in summary if d["method"] == method), key=lambda d: d["budget"])
        for phase, dash in (("recon", "solid"), ("cut", "dot"), ("recovered", "dash")):
            pts = [d for d in ds if d.get(phase)]
            if pts:
                fig.add_scatter(x=[100 * d["budget"] for d in pts], y=[d[phase][0] for d in pts],
                                error_y=dict(type="data", array=[d[phase][1] for d in pts]), mode="lines+markers",
                                line=dict(dash=dash, color=palette[k % len(palette)]), name=f"{method} ({phase})",
                                legendgroup=method, visible=True if phase != "cut" else "legendonly")
                shown += [d[phase][0] for d in pts] if phase != "cut" else []
    fig.add_hline(y=res["dense"][metric], line=dict(dash="dash", color="grey"), annotation_text="dense")
    log = metric == "perplexity"
    fig.update_layout(title=f"{res['model']}: test {metric} vs block parameters removed (one stage; ± seed std)",
                      xaxis_title="% of block parameters removed", yaxis_title=metric + (" (log)" if log else ""),
                      yaxis_type="log" if log else None, template="plotly_white")
    if log:  # plotly's log autorange is thrown by zero-width error bars; the visible values decide
        fig.update_yaxes(range=[math.log10(min(shown)) - 0.1, math.log10(max(shown)) + 0.1])
    return fig


def plots_html(results: dict) -> str:
    import plotly.graph_objects as go
    try:
        from explorer.plots import charts_html
    except ImportError:
        charts_html = None
    figs = {}
    for res in results.get("recon", []):
        figs[f"Reconstruction: {res['model']}"] = _recon_figure(res)
    for model in _models(results):
        rows = [r for r in results.get("quality", []) if r["model"] == model]
        if rows:
            fig = go.Figure()
            metric = rows[0]["metric"]
            dense = _q(results, model, 0, "dense")
            for m in ORDER[1:]:
                rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["budget"])
                if rs:
                    fig.add_scatter(x=[100 * r["budget"] for r in rs], y=[r["mean"] for r in rs],
                                    error_y=dict(type="data", array=[r["std"] for r in rs]), mode="lines+markers", name=m)
            if dense:
                fig.add_hline(y=dense["mean"], line=dict(dash="dash", color="grey"), annotation_text="dense")
            fig.update_layout(title=f"{model}: test {metric} vs parameters removed", xaxis_title="% of block parameters removed",
                              yaxis_title=metric + (" (log scale)" if metric == "perplexity" else ""),
                              yaxis_type="log" if metric == "perplexity" else None, template="plotly_white")
            figs[f"Quality: {model}"] = fig
        srows = [r for r in results.get("speed", []) if r["model"] == model]
        if srows:
            fig = go.Figure()
            labels = [f"{r['method']} {r['budget']:.0%}" for r in srows]
            fig.add_bar(x=labels, y=[r["speedup"] for r in srows], name="measured speed-up")
            fig.add_bar(x=labels, y=[r["limit_speedup"] for r in srows], name="same-width dense limit")
            fig.update_layout(title=f"{model}: speed-up over dense (batch {srows[0]['batch_size']} x {srows[0]['seq_len']})",
                              yaxis_title="x dense", barmode="group", template="plotly_white")
            figs[f"Speed: {model}"] = fig
    crows = results.get("analysis_cost", [])
    if crows:
        fig = go.Figure()
        for model in _models(results):
            rs = [r for r in crows if r["model"] == model]
            if rs:
                fig.add_scatter(x=[r["samples"] for r in rs], y=[r["analysis_s"] for r in rs], mode="lines+markers",
                                name=f"{model}: analysis")
                fig.add_scatter(x=[r["samples"] for r in rs], y=[r["forward_backward_s"] for r in rs],
                                mode="lines+markers", line=dict(dash="dot"), name=f"{model}: forward+backward")
        fig.update_layout(title="Cost of analysis vs calibration samples", xaxis_title="samples",
                          yaxis_title="seconds", xaxis_type="log", yaxis_type="log", template="plotly_white")
        figs["Cost of analysis"] = fig
    mrows = [r for r in results.get("methods", []) if not r.get("error")]
    if mrows:
        fig = go.Figure()
        for b in sorted({r["budget"] for r in mrows}):
            rs = [r for r in mrows if r["budget"] == b]
            fig.add_bar(x=[r["method"] for r in rs], y=[100 * r["test"] for r in rs], name=f"{b:.0%} removed")
        fig.add_hline(y=100 * mrows[0]["dense"], line=dict(dash="dash", color="grey"), annotation_text="dense")
        fig.update_layout(title=f"All methods on {mrows[0]['model']} (test accuracy)", yaxis_title="accuracy %",
                          barmode="group", template="plotly_white")
        figs["All methods"] = fig
    if not figs:
        return "<html><body>no results yet</body></html>"
    if charts_html:
        return charts_html(figs, "Pruning Explorer benchmark")
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs.values())]
    return "<!doctype html><html><head><meta charset='utf-8'></head><body>" + "".join(parts) + "</body></html>"


def main(argv=None) -> int:
    """`python -m bench.report [--out bench/]`: REPORT.md and plots.html again from the results.json
    there (after a change of the report's code), leaving the JSON and its provenance as they are."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__.split(":", 1)[1].strip())
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = ap.parse_args(argv)
    out = Path(args.out)
    render_outputs(json.loads((out / "results.json").read_text()), out)
    print(f"rewrote {out / 'REPORT.md'} and {out / 'plots.html'} from {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
