"""Quality against training budget: `python -m bench.budgets [--mode quick|long|smoke] [--merge] ...`.

Issue 27. METHODS.md compares every method at one recovery budget (2 stages x 10 LoRA steps), which
is fair for Adapt-Accel and not for APT, which prunes *during* fine-tuning and whose design document
assumes mask updates every 100 steps. Here each method runs on MiniLM-RT at several total optimiser
step budgets T (the whole run's steps, whatever the method does with them), on several seeds, and
the test accuracy is reported against T and against the run's wall time.

Per method family, one policy for every budget:
  * "lora" (adaptive, uniform, lora-before / lora-after / lora-prune-ft, adapruner): LoRA recovery
    (rank 8) at batch 16, one learning rate with linear decay to 0 over each training phase;
    K = the largest divisor of T that is <= min(target / 5 %, T / 10) stages of T/K steps (the
    document's ~5 % per stage where the budget allows at least 10 steps a stage: K = 2 at T = 20,
    K = 10 at 50 % from T = 100 on); the LoRA-order pipelines cut in the same K stages and put
    their T LoRA steps before / after / around the cuts;
  * "apt": one run of T steps at batch 16 (stages = 1), its schedule scaled with T by
    explorer.methods.apt.schedule_for (recorded per row: T_p, update frequency, mask decay, growths).
The learning rate of each family is chosen on the **val** split (500 sentences) from `lr_grid` at
one budget (`lr_budget`, target targets[0], the first seed; ties go to the library default); every
figure reported is on **test** (all 1,000 sentences). ± is the std over seeds; a claim is read from
the per-seed paired difference and counts only when |mean| > its std.

Modes (`MODES`; what each leaves out is in its `left_out`, printed in the report): smoke (tiny-bert,
seconds); quick (50 %, T = 20 / 100, the cut alone at T = 0 and the APT ablations at T = 20: about an
hour of one thread); long (50 %, T up to 1,000 for apt and adaptive, 400 for the others, AdaPruner at
its defaults, ablations at 20 and 400: sized for 2 h on a quiet 2-core machine as two shards); full
(the issue's whole grid, both targets, every method to 1,000, ablations at 1,000: ~23 thread-hours). Every
finished run is written at once (bench/budgets.json through common.write_json, with its provenance)
and BUDGETS.md, budgets.html (plotly) and budgets.svg (the same chart, for the README) are rendered
from the JSON; `--merge` keeps the rows of the existing JSON and skips the runs it already holds
(so a stopped run resumes; `--redo` runs them again after a change to the code they measure, each
row naming its run and each run its commit), `--shard i/n` runs every n-th job (several processes on one JSON: rows
are merged under a file lock), `--render-only` redraws from the JSON. METHODS.md's budget section is
rendered from the same JSON (bench.methods_goals).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import statistics
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

from . import common  # offline environment first
from .common import ROOT, generated_line, log, machine, provenance_text, write_json

OUT = ROOT / "bench"
JSON_NAME, MD_NAME, HTML_NAME, SVG_NAME = "budgets.json", "BUDGETS.md", "budgets.html", "budgets.svg"

SIX = ("adaptive", "uniform", "apt", "lora-prune-ft", "lora-after", "lora-before")
FAMILY = {"apt": "apt"}  # everything else: "lora"
REPRESENTATIVE = {"lora": "adaptive", "apt": "apt"}  # the method whose val accuracy picks the family's lr
DEFAULT_LR = {"lora": 5e-4, "apt": 5e-4}  # explorer.recovery.default_lr("lora"); APT's default is the same

# APT ablations: one component changed at a time (the label's suffix names it)
ABLATIONS = {
    "apt[salience=first_order]": ("salience", {"salience_scale": "first_order"},
                                  "Eq. 5 rescaled per (layer, kind) to the first-order loss estimate"),
    "apt[one cut]": ("schedule", {"prune_until": 0.0},
                     "no schedule: the whole cut at step 0 (T_p = 0), then T steps of training"),
    "apt[no distillation]": ("distillation", {"self_distill": 0.0}, "task loss only (self_distill 0)"),
    "apt[no growth]": ("adapter growth", {"adapter_budget": 1.0}, "adapters stay at rank 8 (adapter_budget 1)"),
    "apt[salience=layer_mean]": ("salience", {"salience_scale": "layer_mean"},
                                 "Eq. 5's two terms each divided by their mean over the (layer, kind)"),
}
# T = 0: the cut alone, no training (the salience and allocation without any recovery)
CUT_ONLY = ("adaptive", "uniform", "apt", "apt[salience=first_order]", "apt[salience=layer_mean]")

# the step budgets the design documents assume, marked on the chart
DOC_BUDGETS = [
    {"method": "apt", "steps": 1000,
     "why": "APT's document: masks re-chosen every 100 steps (update_frequency) and moved 0.01 per step "
            "(mask_decay_rate): 7 updates of 100 steps in a 70 % pruning phase need T = 1,000"},
    {"method": "adaptive", "steps": 100,
     "why": "Adapt-Accel: ~5 % per stage with recovery in between, 10 stages at 50 % (6 at 30 %); with at "
            "least 10 steps a stage that is T >= 100"},
]
CLAIMS = [  # (better, worse): "better >= worse", read at every budget and target run
    ("apt", "adaptive"),
    ("lora-prune-ft", "lora-after"),
    ("lora-after", "lora-before"),
    ("adapruner", "adaptive"),
]


@dataclass
class Mode:
    model: str
    targets: tuple[float, ...]
    budgets: tuple[int, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    lr_grid: dict  # family -> candidate learning rates
    lr_budget: int  # the budget T at which the lr is chosen on val
    budgets_for: dict = field(default_factory=dict)  # method -> its own budgets (default: `budgets`)
    adapruner: dict | None = None  # AdaPruner's options (None: not run); {} = its defaults
    adapruner_budgets: tuple[int, ...] = ()
    adapruner_targets: tuple[float, ...] = ()
    ablation_budgets: tuple[int, ...] = ()  # APT ablations at these budgets (target targets[0])
    cut_only: tuple[str, ...] = ()  # methods also run at T = 0 (the cut without training), every target
    calib_samples: int = 32
    train_batch_size: int = 16
    amplitude: float = 0.05
    min_stage_steps: int = 10
    left_out: str = ""


MODES = {
    "smoke": Mode("tiny-bert", (0.5,), (4, 8), SIX, (0, 1), {"lora": (5e-4, 1e-3), "apt": (5e-4, 1e-3)}, 4,
                  adapruner={"trials": 2, "subsets": 2}, adapruner_budgets=(4,), adapruner_targets=(0.5,),
                  ablation_budgets=(8,), calib_samples=8, train_batch_size=8, min_stage_steps=2,
                  left_out="a smoke test: tiny random BERT, numbers mean nothing"),
    "quick": Mode("minilm-rt", (0.5,), (20, 100), SIX, (0, 1, 2), {"lora": (5e-4, 1.5e-3), "apt": (5e-4, 1.5e-3)},
                  100, cut_only=CUT_ONLY, ablation_budgets=(20,),
                  left_out="30 % (only 50 %); the 400 and 1,000-step budgets (APT's own budget: about 1.4 s a step on "
                           "one quiet thread, 3 seeds at 1,000 would take ~70 min alone; 400 was added for apt and "
                           "adaptive by a separate `--merge --methods apt,adaptive --budgets 400` run); AdaPruner (its "
                           "50-trial search is 7-17 min a run); the APT ablations at 1,000 (run at 20, where APT "
                           "loses); a 2-point lr grid at T = 100 instead of 4 points at 400"),
    "long": Mode("minilm-rt", (0.5,), (20, 100, 400, 1000), SIX, (0, 1, 2),
                 {"lora": (5e-4, 1e-3, 2e-3), "apt": (5e-4, 1e-3, 2e-3)}, 100,
                 budgets_for={m: (20, 100, 400) for m in SIX if m not in ("apt", "adaptive")},
                 adapruner={}, adapruner_budgets=(100,), adapruner_targets=(0.5,), ablation_budgets=(20, 400),
                 cut_only=CUT_ONLY,
                 left_out="30 %; 1,000 steps for all but apt and adaptive; the ablations at 1,000 (at 20 and 400 "
                          "instead); AdaPruner at 100 steps only (its defaults: 8 subsets, 50 trials). Sized for 2 h "
                          "on a quiet 2-core machine as two processes (--shard 0/2, 1/2 after the lr choice): ~27,000 "
                          "thread-seconds at 0.7 s a LoRA step and 1.4 s an APT step"),
    "full": Mode("minilm-rt", (0.5, 0.3), (20, 100, 400, 1000), SIX, (0, 1, 2),
                 {"lora": (2.5e-4, 5e-4, 1e-3, 2e-3), "apt": (2.5e-4, 5e-4, 1e-3, 2e-3)}, 400,
                 adapruner={}, adapruner_budgets=(20, 400), adapruner_targets=(0.3, 0.5), ablation_budgets=(20, 1000),
                 cut_only=CUT_ONLY,
                 left_out="nothing of the issue's grid (AdaPruner at 20 and 400 steps: its search does not depend on "
                          "T). About 23 thread-hours (0.7 s a LoRA step, 1.4 s an APT step, AdaPruner's search ~12 min "
                          "a run): ~12 h on a quiet 2-core machine as two shards, not the issue's 2 h"),
}


def family(method: str) -> str:
    return FAMILY.get(method.split("[")[0], "lora")


def base_method(label: str) -> str:
    return label.split("[")[0]


def stages_for(T: int, target: float, min_stage_steps: int = 10, share: float = 0.05) -> int:
    """K for the "lora" family: the largest divisor of T that is <= min(target/share, T/min_stage_steps)."""
    cap = max(1, min(int(round(target / share)), T // max(min_stage_steps, 1)))
    return max(k for k in range(1, cap + 1) if T % k == 0)


def prune_for(method: str, T: int, target: float, seed: int, lr: float, mode: Mode):
    from explorer.config import PruneConfig
    k = 1 if family(method) == "apt" else stages_for(T, target, mode.min_stage_steps)
    return PruneConfig(stages=k, recovery="lora", recovery_steps=T // k, train_batch_size=mode.train_batch_size,
                       eval_samples=64, seed=seed, lr=lr)


def options_for(label: str, mode: Mode) -> dict:
    if label in ABLATIONS:
        return dict(ABLATIONS[label][1])
    if label == "adapruner":
        return dict(mode.adapruner or {})
    return {}


# --- one run ------------------------------------------------------------------------------------

def run_one(base, data, mode: Mode, label: str, target: float, T: int, seed: int, lr: float) -> dict:
    from explorer.config import AllocationConfig, AnalysisConfig
    from explorer.methods import make_run

    from .common import fresh, quality
    from .methods_table import steps_of
    ev_mb = SimpleNamespace(test_n=0, val_n=0)
    method = base_method(label)
    options = options_for(label, mode)
    lm = fresh(base)
    original = lm.block_params
    prune = prune_for(method, T, target, seed, lr, mode)
    row = {"method": label, "base": method, "family": family(method), "target": target, "budget": T, "seed": seed,
           "lr": lr, "stages": prune.stages, "steps_per_stage": prune.recovery_steps, "options": options,
           "batch": prune.train_batch_size, "load_start": common.load_average()}
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        run = make_run(method, lm, data, AnalysisConfig(samples=mode.calib_samples, batch_size=16, seed=seed),
                       AllocationConfig(target=target, amplitude=mode.amplitude), prune, timing=False, **options)
        steps = steps_of(run)
    except Exception as e:  # one failing run must not sink the others
        row.update(error=f"{type(e).__name__}: {e}"[:400], seconds=time.perf_counter() - t0)
        return row
    row["seconds"] = time.perf_counter() - t0
    row["cpu_seconds"] = time.process_time() - c0  # this process's CPU time: less load-dependent than wall time
    t1 = time.perf_counter()
    row.update(steps_run=steps, val=quality(lm, data, "val", ev_mb), test=quality(lm, data, "test", ev_mb),
               removed_fraction=1 - lm.block_params / original, eval_seconds=time.perf_counter() - t1,
               load_end=common.load_average())
    summary = run.report().get("summary") or {}
    if method == "apt":
        row["apt"] = {"schedule": summary.get("schedule"), "rank_growths": len(summary.get("rank_growths") or []),
                      "salience_updates": summary.get("salience_updates"),
                      "adapter_params_initial": summary.get("adapter_params_initial"),
                      "adapter_params_final": summary.get("adapter_params_final")}
    if method == "adapruner":
        row["search"] = {k: summary.get(k) for k in ("best_params", "best_value", "search_seconds") if k in summary}
        row["search"]["trials"] = len(summary.get("trials") or [])
        row["search"]["subsets"] = (mode.adapruner or {}).get("subsets", 8)
    if "pipeline" in summary:
        row["pipeline"] = summary["pipeline"]
    return row


def row_key(r: dict) -> tuple:
    return (r["method"], r["target"], r["budget"], r["seed"], round(r["lr"], 12))


# --- the JSON, shared by shards ----------------------------------------------------------------

@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def save(out: Path, doc: dict, new_rows: list[dict], earlier: list, start_fresh: bool = False) -> dict:
    """Merge `new_rows` (and doc's lr choices) into the JSON on disk under a lock (start_fresh: into
    doc's rows, replacing the file), write it with its provenance, render the reports; returns the
    merged document."""
    path = out / JSON_NAME
    with _locked(path):
        disk = None if start_fresh else _read(path)
        if disk is None:
            disk = {"rows": doc["rows"], "lr": {}, "meta": {"runs": []}}
        rows = list(disk["rows"]) if disk else []
        keys = {row_key(r): i for i, r in enumerate(rows)}
        for r in new_rows:
            if row_key(r) in keys:
                rows[keys[row_key(r)]] = r
            else:
                keys[row_key(r)] = len(rows)
                rows.append(r)
        merged = dict(doc)
        merged["rows"] = rows
        # a learning rate given on the command line (--lr) never replaces the record of one chosen on val
        merged["lr"] = {**disk.get("lr", {}), **{f: v for f, v in doc.get("lr", {}).items()
                                                 if not (v.get("given") and f in disk.get("lr", {}))}}
        mine = doc["meta"]["runs"][-1]
        # the other runs as the file has them (a side-by-side run updates its own entry there), then this one
        runs = [r for r in doc["meta"]["runs"][:-1] + disk["meta"].get("runs", []) if r.get("id") != mine.get("id")]
        merged["meta"] = {**doc["meta"], "runs": list({r["id"]: r for r in runs}.values()) + [mine]}
        write_json(path, merged, earlier)
        render_all(merged, out)
    return merged


# --- statistics ---------------------------------------------------------------------------------

def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def grid_rows(doc: dict) -> list[dict]:
    """The rows at each family's chosen learning rate (the lr trials at other rates are left out)."""
    chosen = {f: v["chosen"] for f, v in doc.get("lr", {}).items()}
    return [r for r in doc["rows"] if not r.get("error") and r["family"] in chosen
            and math.isclose(r["lr"], chosen[r["family"]], rel_tol=1e-9)]


def cells(doc: dict) -> dict[tuple[str, float, int], dict[int, dict]]:
    out: dict = {}
    for r in grid_rows(doc):
        out.setdefault((r["method"], r["target"], r["budget"]), {})[r["seed"]] = r
    return out


def paired(agg, better: str, worse: str, target: float, T: int) -> dict | None:
    a, b = agg.get((better, target, T), {}), agg.get((worse, target, T), {})
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s]["test"] - b[s]["test"] for s in seeds]
    mean, std = _ms(d)
    beyond = len(seeds) > 1 and abs(mean) > std
    return {"better": better, "worse": worse, "target": target, "budget": T, "seeds": seeds, "diff": mean, "std": std,
            "beyond_spread": beyond,
            "reading": ("one seed: no spread to read it against" if len(seeds) == 1 else
                        "holds, beyond the spread" if beyond and mean > 0 else "fails, beyond the spread" if beyond
                        else "inside the seed spread (no difference shown)")}


def claims(doc: dict) -> list[dict]:
    agg = cells(doc)
    out = []
    for better, worse in CLAIMS:
        for target in sorted({k[1] for k in agg}, reverse=True):
            for T in sorted({k[2] for k in agg}):
                p = paired(agg, better, worse, target, T)
                if p:
                    out.append(p)
    return out


def goals(doc: dict) -> list[str]:
    """The issue's two quality goals, read from the rows (the largest budget run for APT vs adaptive)."""
    cl = claims(doc)
    lines = []
    apt = [c for c in cl if (c["better"], c["worse"]) == ("apt", "adaptive") and c["target"] == 0.5]
    if apt:
        top = max(apt, key=lambda c: c["budget"])
        ok = top["beyond_spread"] and top["diff"] > 0
        state = (("met" if ok else "not met") if top["budget"] >= 1000 else
                 f"not measured at ≥ 1,000 steps (the largest budget run is T = {top['budget']:,}, where it "
                 + ("holds beyond the spread" if ok else "does not hold beyond the spread") + ")")
        lines.append(f"- **APT ≥ adaptive at 50 % at the largest budget (goal: ≥ 1,000 steps, beyond the spread)**: "
                     f"{state}. At T = {top['budget']:,}: APT − adaptive = {top['diff']:+.4f} ± "
                     f"{top['std']:.4f} over {len(top['seeds'])} seed(s) ({top['reading']}). "
                     + "By budget: " + ", ".join(f"T = {c['budget']}: {c['diff']:+.4f} ± {c['std']:.4f}"
                                                 for c in sorted(apt, key=lambda c: c["budget"])) + ".")
    for better, worse in (("lora-prune-ft", "lora-after"), ("lora-after", "lora-before")):
        cs = [c for c in cl if (c["better"], c["worse"]) == (better, worse)]
        if not cs:
            continue
        sep = [c for c in cs if c["beyond_spread"] and c["diff"] > 0]
        lines.append(f"- **{better} ≥ {worse} beyond the spread at some budget**: "
                     + (("yes, at " + ", ".join(f"T = {c['budget']} ({c['target']:.0%}, {c['diff']:+.4f} ± "
                                                 f"{c['std']:.4f})" for c in sep)) if sep else
                        "no budget run separates them") + ". All: "
                     + ", ".join(f"{c['target']:.0%} T = {c['budget']}: {c['diff']:+.4f} ± {c['std']:.4f}" for c in cs)
                     + ".")
    return lines


# --- reports ------------------------------------------------------------------------------------

def _fmt(xs: list[float]) -> str:
    m, s = _ms(xs)
    return f"{m:.4f} ± {s:.4f}" if len(xs) > 1 else f"{m:.4f}"


def quality_table(doc: dict, target: float) -> list[str]:
    agg = cells(doc)
    budgets = sorted({k[2] for k in agg if k[1] == target})
    methods = [m for m in _method_order(doc) if any((m, target, T) in agg for T in budgets)]
    dense = doc["dense"]["test"]
    L = ["| method | " + " | ".join(f"T = {T:,}" + (" (the cut, no training)" if T == 0 else "") for T in budgets)
         + " |", "|---|" + "---|" * len(budgets)]
    for m in methods:
        row = []
        for T in budgets:
            by = agg.get((m, target, T))
            row.append("–" if not by else f"{_fmt([r['test'] for r in by.values()])} ({len(by)}; "
                       f"{100 * statistics.mean(r['test'] for r in by.values()) / dense:.1f} %)")
        L.append(f"| {m} | " + " | ".join(row) + " |")
    return L


def time_table(doc: dict, target: float) -> list[str]:
    agg = cells(doc)
    budgets = sorted({k[2] for k in agg if k[1] == target})
    methods = [m for m in _method_order(doc) if any((m, target, T) in agg for T in budgets)]
    L = ["| method | " + " | ".join(f"T = {T:,}" for T in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for m in methods:
        row = []
        for T in budgets:
            by = agg.get((m, target, T))
            if not by:
                row.append("–")
                continue
            rs = list(by.values())
            cpu = [r["cpu_seconds"] for r in rs if r.get("cpu_seconds") is not None]
            row.append(f"{statistics.mean(r['seconds'] for r in rs):.0f} s"
                       + (f" ({statistics.mean(cpu):.0f} s CPU)" if len(cpu) == len(rs) else "") + f" (K = {rs[0]['stages']})")
        L.append(f"| {m} | " + " | ".join(row) + " |")
    return L


def _method_order(doc: dict) -> list[str]:
    seen = list(dict.fromkeys(r["method"] for r in doc["rows"]))
    first = [m for m in (*SIX, "adapruner") if m in seen]
    return first + [m for m in seen if m not in first]


def apt_settings(doc: dict) -> list[str]:
    rows = [r for r in grid_rows(doc) if r["method"] == "apt" and r.get("apt") and r["budget"] > 0]
    by_T = {}
    for r in rows:
        by_T.setdefault(r["budget"], r)
    if not by_T:
        return []
    L = ["| T (steps) | T_p (pruning phase) | update frequency | mask updates | mask decay / step | rank growths | "
         "adapter params (start → end) | lr |", "|---|---|---|---|---|---|---|---|"]
    for T in sorted(by_T):
        r = by_T[T]
        s = r["apt"]["schedule"] or {}
        L.append(f"| {T:,} | {s.get('prune_steps')} | {s.get('update_frequency')} | {s.get('mask_updates')} | "
                 f"{s.get('mask_decay', 0):.3g} | {r['apt']['rank_growths']} | "
                 f"{r['apt']['adapter_params_initial']:,} → {r['apt']['adapter_params_final']:,} | {r['lr']:g} |")
    return L


def lr_section(doc: dict) -> list[str]:
    L = []
    for fam, v in sorted(doc.get("lr", {}).items()):
        if v.get("given"):
            L.append(f"- **{fam}** family: {v['chosen']:g}, given on the command line (not chosen on val)")
            continue
        trials = ", ".join(f"{float(lr):g}: {acc:.4f}" for lr, acc in sorted(v["val"].items(), key=lambda kv: float(kv[0])))
        L.append(f"- **{fam}** family ({v['method']} at T = {v['budget']}, {v['target']:.0%}, seed {v['seed']}): "
                 f"val accuracy by lr {trials} → **{v['chosen']:g}**")
    return L


def ablation_section(doc: dict) -> list[str]:
    agg = cells(doc)
    abl = sorted({(k[1], k[2]) for k in agg if k[0] in ABLATIONS})
    if not abl:
        return []
    L = ["| target | T | variant | component | test accuracy | vs apt (paired, mean ± std) | reading |",
         "|---|---|---|---|---|---|---|"]
    for target, T in abl:
        base = agg.get(("apt", target, T), {})
        if base:
            L.append(f"| {target:.0%} | {T:,} | apt (as run) | – | {_fmt([r['test'] for r in base.values()])} | – | – |")
        for label, (comp, _, what) in ABLATIONS.items():
            by = agg.get((label, target, T))
            if not by:
                continue
            p = paired(agg, label, "apt", target, T)
            pd = f"{p['diff']:+.4f} ± {p['std']:.4f}" if p else "–"
            reading = "–" if not p else ("inside the spread" if not p["beyond_spread"] else
                                         f"the variant is better: APT's {comp} costs accuracy here" if p["diff"] > 0
                                         else f"the variant is worse: APT's {comp} is the better choice here")
            L.append(f"| {target:.0%} | {T:,} | {label}: {what} | {comp} | {_fmt([r['test'] for r in by.values()])} | "
                     f"{pd} | {reading} |")
    return L


def adapruner_section(doc: dict) -> list[str]:
    rs = [r for r in grid_rows(doc) if r["method"] == "adapruner" and r.get("search")]
    if not rs:
        return []
    return ["AdaPruner's searches: " + "; ".join(
        f"{r['target']:.0%} T = {r['budget']} seed {r['seed']}: {r['search'].get('trials')} trials over "
        f"{r['search'].get('subsets')} subsets in {r['search'].get('search_seconds', 0):.0f} s (run {r['seconds']:.0f} s)"
        for r in rs) + "."]


def header(doc: dict) -> str:
    meta = doc["meta"]
    runs = sorted(meta.get("runs", []), key=lambda r: r.get("date", ""))
    first = runs[0] if runs else meta
    line = generated_line(first.get("command", "python -m bench.budgets"), {"machine": meta.get("machine", {}), **first},
                          None if len(runs) > 1 else doc.get("provenance"))
    if len(runs) > 1:  # --merge runs, some of them side by side (their rows are merged under a lock)
        line += " Runs merged into the same JSON after it: " + "; ".join(
            f"{r['date']} `{r['command']}`{' at ' + r['commit'] if r.get('commit') else ''} {r['seconds'] / 60:.1f} min, "
            f"load {r['load_before']} / {r['load_after']}" for r in runs[1:]) + "."
        if doc.get("provenance"):  # the commit is the last writer's, not the first run's
            line += " The JSON as the last of these runs wrote it: " + provenance_text(doc["provenance"])
    return line


def commit_name(state: dict) -> str | None:
    """A run's commit as the reports name it: 12 hex digits, " (dirty)" for an uncommitted tree
    (state: common.state_at_start() or a provenance record; None when it has no commit)."""
    c = state.get("commit")
    return c[:12] + (" (dirty)" if state.get("dirty") else "") if c else None


def missing_cells(doc: dict) -> str:
    """The (target, T, method) cells of `--mode full`'s grid (T = 0 for its cut-only methods) that no
    row of `doc` holds, grouped by target and T ("nothing" when the grid is complete)."""
    full, have = MODES["full"], set(cells(doc))
    parts = []
    for target in full.targets:
        if not any(k[1] == target for k in have):
            parts.append(f"{target:.0%} removed: every cell")
            continue
        for T in (0, *full.budgets):
            methods = full.cut_only if T == 0 else full.methods
            miss = [m for m in methods if (m, target, T) not in have]
            if miss:
                parts.append(f"{target:.0%} at T = {T:,}: " + ", ".join(miss))
    return "; ".join(parts) or "nothing"


def claim_summary(doc: dict) -> list[str]:
    """One line per design-document claim: the budgets where it holds / fails beyond the seed spread,
    and where the seeds cannot tell."""
    cl = claims(doc)
    out = []
    for better, worse in CLAIMS:
        cs = [c for c in cl if (c["better"], c["worse"]) == (better, worse)]
        if not cs:
            out.append(f"- **{better} ≥ {worse}**: not run in this bench" + (
                " (AdaPruner against adaptive at one budget: bench/METHODS.md's claims table)."
                if better == "adapruner" else "."))
            continue

        def at(xs):
            return ", ".join(f"T = {c['budget']:,}" + (f" ({c['target']:.0%})" if len({x['target'] for x in cs}) > 1
                                                       else "") + f" ({c['diff']:+.4f} ± {c['std']:.4f})" for c in xs)
        holds = [c for c in cs if c["beyond_spread"] and c["diff"] > 0]
        fails = [c for c in cs if c["beyond_spread"] and c["diff"] < 0]
        unclear = [c for c in cs if not c["beyond_spread"]]
        parts = ([f"holds at {at(holds)}"] if holds else []) + ([f"fails at {at(fails)}"] if fails else []) \
            + ([f"undecided (inside the spread or one seed) at {at(unclear)}"] if unclear else [])
        out.append(f"- **{better} ≥ {worse}**: " + "; ".join(parts) + ".")
    return out


def claims_table(doc: dict) -> list[str]:
    cl = claims(doc)
    if not cl:
        return []
    L = ["| claim | target | T (steps) | seeds | mean difference ± std | reading |", "|---|---|---|---|---|---|"]
    for c in cl:
        L.append(f"| {c['better']} ≥ {c['worse']} | {c['target']:.0%} | {c['budget']:,} | {len(c['seeds'])} | "
                 f"{c['diff']:+.4f} ± {c['std']:.4f} | {c['reading']} |")
    return L


def render(doc: dict) -> str:
    mode = doc.get("config", {})
    dense = doc["dense"]
    L = ["# Quality against training budget (`python -m bench.budgets`)", "", header(doc), "",
         f"{doc['model']}: test accuracy on all {doc.get('test_examples')} test sentences (dense {dense['test']:.4f}; "
         f"val {dense['val']:.4f} on {doc.get('val_examples')}). T = the run's optimiser steps, batch "
         f"{mode.get('train_batch_size')}; the lora family (adaptive, uniform, the LoRA orders"
         + (", adapruner" if any(r["method"] == "adapruner" for r in doc["rows"]) else "")
         + f") in K stages (K = the largest divisor of T up to min(target/5 %, T/{mode.get('min_stage_steps')})), "
         f"A = {mode.get('amplitude')}, {mode.get('calib_samples')} calibration samples; APT as one run of T steps "
         f"with its schedule scaled by T (table below). The first run's mode: `{doc.get('mode')}`, which leaves "
         f"out: {mode.get('left_out') or 'nothing'}. Cells of the issue's grid (`--mode full`) that this "
         f"JSON does not hold yet: {missing_cells(doc)}.", "",
         "Learning rate per family, chosen on val (linear decay to 0 over each training phase):", ""]
    L += lr_section(doc)
    for target in sorted({r["target"] for r in grid_rows(doc)}, reverse=True):
        L += ["", f"## {target:.0%} of the block parameters removed: test accuracy (seeds; % of dense)", ""]
        L += quality_table(doc, target)
        L += ["", f"Wall time per run at {target:.0%} (pruning, training and the stages' small evaluations, not the "
              "final val / test evaluation; one torch thread on a shared machine whose load is in each row, so upper "
              "bounds; the process's CPU time where recorded):", ""]
        L += time_table(doc, target)
    L += ["", f"![quality against steps and wall time]({SVG_NAME})", "",
          f"The chart ({SVG_NAME}; interactive: [{HTML_NAME}]({HTML_NAME})): mean test accuracy ± std over seeds "
          "against T (log scale) and against the mean wall time of a run. The dashed lines mark the budgets the "
          "design documents assume:", ""]
    L += [f"- {d['method']}: T = {d['steps']:,} — {d['why']}" for d in DOC_BUDGETS]
    L += ["- the LoRA-order and AdaPruner documents state no training budget.", ""]
    st = apt_settings(doc)
    if st:
        L += ["## APT's settings at each budget (explorer.methods.apt.schedule_for)", ""] + st + [
            "", "Rank growths evenly spaced over T_p (the library default, 2), each giving the top half of the adapters "
            "by Σ|B ⊙ ∇B| the same extra rank, up to 2x the initial adapter parameters; self-distillation weight "
            "rising to 0.5 over T_p.", ""]
    cl = claims_table(doc)
    if cl:
        L += ["## The design documents' claims at each budget (paired by seed)", ""] + claim_summary(doc) + [""] \
            + cl + [""]
    g = goals(doc)
    if g:
        L += ["## The issue's goals", ""] + g + [""]
    ab = ablation_section(doc)
    if ab:
        L += ["## APT's components, one at a time", "",
              "Each variant changes one component of APT (paired with the default APT run of the same seed; a positive "
              "difference means the default's component costs accuracy at this budget):", ""] + ab + [""]
    ad = adapruner_section(doc)
    if ad:
        L += ["## AdaPruner", ""] + ad + [""]
    failed = [r for r in doc["rows"] if r.get("error")]
    if failed:
        L += ["Failed runs: " + "; ".join(f"{r['method']} {r['target']:.0%} T = {r['budget']} seed {r['seed']}: "
                                          f"{r['error']}" for r in failed), ""]
    return "\n".join(L).rstrip() + "\n"


def methods_section(doc: dict) -> list[str]:
    """METHODS.md's section (bench.methods_goals renders it): each claim with the budgets where it
    holds or fails, the goals and APT's settings."""
    L = ["## The claims against the training budget (`python -m bench.budgets`, [BUDGETS.md](BUDGETS.md))", "",
         header(doc), "",
         f"Test accuracy of {doc['model']} (dense {doc['dense']['test']:.4f}) "
         f"at T = total optimiser steps, batch {doc['config'].get('train_batch_size')}, lr per family chosen on val "
         "(" + "; ".join(f"{f} {v['chosen']:g}" for f, v in sorted(doc.get('lr', {}).items())) + "), ± = std over seeds.",
         ""]
    for target in sorted({r["target"] for r in grid_rows(doc)}, reverse=True):
        L += [f"**{target:.0%} removed**:", ""] + quality_table(doc, target) + [""]
    L += ["Each claim of the design documents, by budget (paired by seed):", ""] + claim_summary(doc) + [""]
    L += claims_table(doc) + [""] + goals(doc) + [""]
    st = apt_settings(doc)
    if st:
        L += ["APT's settings per budget:", ""] + st + [""]
    ab = ablation_section(doc)
    if ab:
        L += ["APT's components, one at a time:", ""] + ab + [""]
    L += [f"![quality against steps and wall time]({SVG_NAME})", ""]
    return L


def readme_block(doc: dict) -> str:
    """The README's block (bench.readme can render it between `<!-- bench:budgets -->` markers): the
    quality tables, the claims per budget, the goals, APT's settings and the chart."""
    L = [header(doc), "",
         f"{doc['model']}, test accuracy (all {doc.get('test_examples')} test sentences; dense {doc['dense']['test']:.4f}) "
         f"against T = total optimiser steps, batch {doc['config'].get('train_batch_size')}; learning rate per family "
         "chosen on val (" + "; ".join(f"{f} {v['chosen']:g}" for f, v in sorted(doc.get('lr', {}).items()))
         + "); ± = std over seeds; cells: mean ± std (seeds; % of dense). Details: "
         f"[`bench/{MD_NAME}`](bench/{MD_NAME}).", ""]
    for target in sorted({r["target"] for r in grid_rows(doc)}, reverse=True):
        L += [f"**{target:.0%} removed**:", ""] + quality_table(doc, target) + [""]
    L += [f"![quality against steps and wall time](bench/{SVG_NAME})", ""]
    L += claim_summary(doc) + [""] + claims_table(doc) + [""] + goals(doc) + [""]
    st = apt_settings(doc)
    if st:
        L += ["APT's settings at each budget (`explorer.methods.apt.schedule_for`):", ""] + st + [""]
    ab = ablation_section(doc)
    if ab:
        L += ["APT's components, one at a time (paired with APT as run):", ""] + ab + [""]
    return "\n".join(L).strip() + "\n"


# --- the chart ------------------------------------------------------------------------------------

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22", "#393b79", "#637939"]


def series(doc: dict):
    """[(target, method, [(T, mean seconds, mean, std, n)])] for the chart."""
    agg = cells(doc)
    out = []
    for target in sorted({k[1] for k in agg}, reverse=True):
        for m in _method_order(doc):
            if m in ABLATIONS:  # the ablations have their own table
                continue
            pts = []
            for T in sorted({k[2] for k in agg if k[0] == m and k[1] == target and k[2] > 0}):  # log axis: T > 0
                rs = list(agg[(m, target, T)].values())
                mean, std = _ms([r["test"] for r in rs])
                pts.append((T, statistics.mean(r["seconds"] for r in rs), mean, std, len(rs)))
            if pts:
                out.append((target, m, pts))
    return out


def svg_chart(doc: dict) -> str:
    """The chart as a standalone SVG (no plotting package needed; GitHub shows it in the README)."""
    ser = series(doc)
    targets = sorted({t for t, _, _ in ser}, reverse=True)
    methods = list(dict.fromkeys(m for _, m, _ in ser))
    color = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
    pw, ph, ml, mt, gap = 400, 250, 60, 40, 70
    W = ml + 2 * pw + gap + 20
    H = mt + len(targets) * (ph + 70) + 30 + 18 * ((len(methods) + 2) // 3)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">{doc["model"]}: test accuracy against '
           f'training budget (mean ± std over seeds)</text>']
    for ti, target in enumerate(targets):
        rows = [(m, pts) for t, m, pts in ser if t == target]
        ys = [p[2] + s * p[3] for _, pts in rows for p in pts for s in (-1, 1)]
        lo, hi = min(ys), max(ys)
        pad = (hi - lo) * 0.08 or 0.01
        lo, hi = lo - pad, hi + pad
        top = mt + ti * (ph + 70)
        for pi, (xname, xi) in enumerate((("optimiser steps T", 0), ("wall seconds per run", 1))):
            left = ml + pi * (pw + gap)
            xs = [p[xi] for _, pts in rows for p in pts] + ([d["steps"] for d in DOC_BUDGETS] if xi == 0 else [])
            x0, x1 = math.log10(max(min(xs), 1e-9)) - 0.1, math.log10(max(xs)) + 0.1

            def X(v):
                return left + (math.log10(max(v, 1e-9)) - x0) / (x1 - x0) * pw

            def Y(v):
                return top + ph - (v - lo) / (hi - lo) * ph
            out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
            out.append(f'<text x="{left + pw / 2}" y="{top - 6}" text-anchor="middle">{target:.0%} removed</text>')
            out.append(f'<text x="{left + pw / 2}" y="{top + ph + 32}" text-anchor="middle">{xname} (log)</text>')
            for k in range(6):  # y grid
                v = lo + (hi - lo) * k / 5
                out.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#eee"/>')
                out.append(f'<text x="{left - 4}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
            for e in range(math.floor(x0), math.ceil(x1) + 1):  # decades and their 2x, 5x
                for mult in (1, 2, 5):
                    v = mult * 10 ** e
                    if x0 <= math.log10(v) <= x1:
                        out.append(f'<line x1="{X(v):.1f}" x2="{X(v):.1f}" y1="{top}" y2="{top + ph}" stroke="#eee"/>')
                        out.append(f'<text x="{X(v):.1f}" y="{top + ph + 14}" text-anchor="middle">{v:g}</text>')
            if xi == 0:
                for d in DOC_BUDGETS:
                    c = color.get(d["method"], "#555")
                    out.append(f'<line x1="{X(d["steps"]):.1f}" x2="{X(d["steps"]):.1f}" y1="{top}" y2="{top + ph}" '
                               f'stroke="{c}" stroke-dasharray="5,4"/>')
                    right = X(d["steps"]) > left + 0.8 * pw  # label on the side with room
                    out.append(f'<text x="{X(d["steps"]) + (-3 if right else 3):.1f}" y="{top + 12}" fill="{c}" '
                               f'text-anchor="{"end" if right else "start"}">{d["method"]} doc</text>')
            dense = doc["dense"]["test"]
            if lo <= dense <= hi:
                out.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(dense):.1f}" y2="{Y(dense):.1f}" stroke="#000" '
                           f'stroke-dasharray="2,3"/>')
                out.append(f'<text x="{left + pw - 4}" y="{Y(dense) - 4:.1f}" text-anchor="end">dense</text>')
            for m, pts in rows:
                c = color[m]
                path = " ".join(f"{X(p[xi]):.1f},{Y(p[2]):.1f}" for p in pts)
                out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="1.8"/>')
                for p in pts:
                    x = X(p[xi])
                    out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{Y(p[2] - p[3]):.1f}" y2="{Y(p[2] + p[3]):.1f}" '
                               f'stroke="{c}"/>')
                    out.append(f'<circle cx="{x:.1f}" cy="{Y(p[2]):.1f}" r="3" fill="{c}"/>')
    ly = mt + len(targets) * (ph + 70) + 10
    for i, m in enumerate(methods):
        x, y = ml + (i % 3) * 260, ly + (i // 3) * 18
        out.append(f'<line x1="{x}" x2="{x + 24}" y1="{y}" y2="{y}" stroke="{color[m]}" stroke-width="2.5"/>')
        out.append(f'<text x="{x + 30}" y="{y + 4}">{m}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def html_chart(doc: dict) -> str | None:
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        return None
    ser = series(doc)
    targets = sorted({t for t, _, _ in ser}, reverse=True)
    fig = make_subplots(rows=len(targets), cols=2, subplot_titles=[f"{t:.0%} removed: against {x}" for t in targets
                                                                   for x in ("optimiser steps", "wall seconds")])
    methods = list(dict.fromkeys(m for _, m, _ in ser))
    color = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
    for ti, target in enumerate(targets, start=1):
        for m, pts in [(m, p) for t, m, p in ser if t == target]:
            for col, xi in ((1, 0), (2, 1)):
                fig.add_trace(go.Scatter(x=[p[xi] for p in pts], y=[p[2] for p in pts], name=m, legendgroup=m,
                                         showlegend=ti == 1 and col == 1, line={"color": color[m]},
                                         error_y={"type": "data", "array": [p[3] for p in pts]},
                                         text=[f"T = {p[0]}, {p[4]} seeds, {p[1]:.0f} s" for p in pts]), row=ti, col=col)
        for d in DOC_BUDGETS:
            fig.add_vline(x=math.log10(d["steps"]), line_dash="dash", line_color=color.get(d["method"], "#555"),
                          annotation_text=f"{d['method']} doc", row=ti, col=1)
    fig.update_xaxes(type="log")
    fig.update_yaxes(title_text="test accuracy")
    fig.update_layout(title=f"{doc['model']}: quality against training budget", template="plotly_white",
                      height=420 * len(targets))
    return fig.to_html(include_plotlyjs="cdn", full_html=True)


def render_all(doc: dict, out: Path) -> None:
    (out / MD_NAME).write_text(render(doc))
    if not series(doc):  # nothing at a chosen learning rate yet
        return
    (out / SVG_NAME).write_text(svg_chart(doc))
    html = html_chart(doc)
    if html:
        (out / HTML_NAME).write_text(html)
    goals_json = out / "methods_goals.json"
    if goals_json.exists():  # METHODS.md carries this run's section
        from .methods_goals import render as render_methods
        (out / "METHODS.md").write_text(render_methods(json.loads(goals_json.read_text()), doc))


# --- the run ------------------------------------------------------------------------------------

def jobs(mode: Mode, methods, budgets, targets, seeds, ablations: bool, adapruner: bool,
         cut_only: bool = False) -> list[tuple]:
    """(label, target, T, seed) in budget order, so that a stopped run has the small budgets whole;
    with cut_only, first the mode's `cut_only` methods at T = 0."""
    out = [(m, target, 0, seed) for target in targets for seed in seeds for m in mode.cut_only] if cut_only else []
    for T in sorted(set(budgets) | set(mode.adapruner_budgets if adapruner else ()) |
                    set(mode.ablation_budgets if ablations else ())):
        for target in targets:
            for seed in seeds:
                for m in methods:
                    if T in budgets and (m not in mode.budgets_for or T in mode.budgets_for[m]):
                        out.append((m, target, T, seed))
                if adapruner and mode.adapruner is not None and T in mode.adapruner_budgets \
                        and target in mode.adapruner_targets:
                    out.append(("adapruner", target, T, seed))
                if ablations and T in mode.ablation_budgets and target == mode.targets[0]:
                    out += [(label, target, T, seed) for label in ABLATIONS]
    return out


def main(argv=None) -> int:
    import os

    import torch
    ap = argparse.ArgumentParser(prog="python -m bench.budgets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="quick")
    ap.add_argument("--methods", help="comma-separated subset of the mode's methods (adapruner and apt[...] ablations "
                                      "are switched by --adapruner / --ablations)")
    ap.add_argument("--budgets", help="comma-separated step budgets (default: the mode's)")
    ap.add_argument("--targets", help="comma-separated removed fractions (default: the mode's)")
    ap.add_argument("--seeds", help="comma-separated seeds (default: the mode's)")
    ap.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=None,
                    help="APT's one-component ablations at the mode's ablation budgets (default: when the mode has them)")
    ap.add_argument("--adapruner", action=argparse.BooleanOptionalAction, default=None,
                    help="AdaPruner at the mode's budgets and options (default: when the mode has it)")
    ap.add_argument("--ablation-budgets", help="override the mode's ablation budgets")
    ap.add_argument("--cut-only", action=argparse.BooleanOptionalAction, default=None,
                    help="the mode's cut_only methods at T = 0, no training (default: when the mode has them)")
    ap.add_argument("--lr", help="fix the families' learning rates instead of choosing them, e.g. lora=5e-4,apt=1e-3")
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th job from the i-th (several processes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--merge", action="store_true", help="keep the existing JSON's rows, skip the runs it holds")
    ap.add_argument("--redo", action="store_true", help="with --merge: run again the runs the JSON holds, "
                                                        "replacing their rows (after a change to the code they measure)")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    path = out / JSON_NAME
    if args.render_only:
        render_all(json.loads(path.read_text()), out)
        return 0
    torch.set_num_threads(args.threads)
    mode = MODES[args.mode]

    def ints(s, d):
        return tuple(int(x) for x in s.split(",")) if s else tuple(d)

    def floats(s, d):
        return tuple(float(x) for x in s.split(",")) if s else tuple(d)
    methods = tuple(args.methods.split(",")) if args.methods else mode.methods
    budgets, targets, seeds = ints(args.budgets, mode.budgets), floats(args.targets, mode.targets), ints(args.seeds, mode.seeds)
    if args.ablation_budgets:
        mode = Mode(**{**asdict(mode), "ablation_budgets": ints(args.ablation_budgets, ())})
    ablations = bool(mode.ablation_budgets) if args.ablations is None else args.ablations
    adapruner = mode.adapruner is not None if args.adapruner is None else args.adapruner
    shard_i, shard_n = (int(x) for x in args.shard.split("/"))
    from .common import load, quality
    base, data = load(mode.model)
    ev_mb = SimpleNamespace(test_n=0, val_n=0)
    prev = _read(path) if args.merge else None
    if prev and prev.get("model") != mode.model:
        raise SystemExit(f"{path} holds {prev.get('model')}, not {mode.model}: use another --out")
    command = "python -m bench.budgets " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    t0 = time.perf_counter()
    git = common.state_at_start()
    run_meta = {"id": f"{os.getpid()}-{time.time():.0f}-{uuid.uuid4().hex[:6]}", "command": command, "machine": machine(),
                "commit": commit_name(git) or "?",
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": common.load_average(),
                "load_after": common.load_average(), "seconds": 0.0, "threads": args.threads}
    if prev:
        dense = prev["dense"]
    else:
        dense = {"val": quality(base, data, "val", ev_mb), "test": quality(base, data, "test", ev_mb)}
    doc = {"mode": args.mode, "model": mode.model, "config": asdict(mode), "dense": dense,
           "test_examples": len(data.texts["test"]), "val_examples": len(data.texts["val"]),
           "meta": {"machine": run_meta["machine"], "runs": (prev or {}).get("meta", {}).get("runs", []) + [run_meta]},
           "lr": dict((prev or {}).get("lr", {})), "rows": list((prev or {}).get("rows", []))}
    earlier = [prev] if prev else []
    done = set() if args.redo else {row_key(r) for r in doc["rows"] if not r.get("error")}

    first_save = [not args.merge]

    def finish(rows: list[dict]) -> None:
        nonlocal doc
        run_meta.update(load_after=common.load_average(), seconds=time.perf_counter() - t0)
        doc["meta"]["runs"][-1] = run_meta
        for r in rows:
            r["run"] = run_meta["id"]  # its commit: meta.runs[id]
        doc = save(out, doc, rows, earlier, start_fresh=first_save[0])
        first_save[0] = False
        doc["meta"]["runs"][-1] = run_meta
        done.update(row_key(r) for r in rows if not r.get("error"))

    def say(r: dict) -> None:
        log(f"{r['method']:<26} {r['target']:.0%} T={r['budget']:<5} seed {r['seed']} lr {r['lr']:g}: "
            + (f"FAILED {r['error']}" if r.get("error") else
               f"val {r['val']:.4f} test {r['test']:.4f} removed {r['removed_fraction']:.3f} "
               f"K={r['stages']} {r['steps_run']} steps {r['seconds']:.0f} s (+{r['eval_seconds']:.0f} s eval), "
               f"load {r['load_end']}"))

    # 1. each family's learning rate, on val
    fixed = dict(kv.split("=") for kv in args.lr.split(",")) if args.lr else {}
    fams = sorted({family(m) for m in (*methods, *(["adapruner"] if adapruner else []),
                                       *(list(ABLATIONS) if ablations else []))})
    for fam in fams:
        if fam in fixed:
            doc["lr"][fam] = {"method": REPRESENTATIVE[fam], "budget": None, "target": None, "seed": None, "val": {},
                              "chosen": float(fixed[fam]), "given": True}
            continue
        if fam in doc["lr"]:
            continue
        if shard_n > 1:
            raise SystemExit(f"no learning rate chosen yet for the {fam} family: run the choice first (one process, "
                             "or --lr), then the shards with --merge")
        rep, T, target, seed = REPRESENTATIVE[fam], mode.lr_budget, mode.targets[0], mode.seeds[0]
        trials = {}
        for lr in mode.lr_grid[fam]:
            hit = next((r for r in doc["rows"] if row_key(r) == (rep, target, T, seed, round(lr, 12))
                        and not r.get("error")), None)
            r = hit or run_one(base, data, mode, rep, target, T, seed, lr)
            r["lr_trial"] = True
            if not hit:
                say(r)
                finish([r])
            if not r.get("error"):
                trials[lr] = r["val"]
        if not trials:
            raise SystemExit(f"every lr trial of the {fam} family failed")
        best = max(trials, key=lambda lr: (trials[lr], math.isclose(lr, DEFAULT_LR[fam])))
        doc["lr"][fam] = {"method": rep, "budget": T, "target": target, "seed": seed,
                          "val": {str(k): v for k, v in trials.items()}, "chosen": best}
        log(f"{fam} family: val by lr {trials} -> {best:g}")
        finish([])
    # 2. the grid
    cut_only = bool(mode.cut_only) if args.cut_only is None else args.cut_only
    todo = jobs(mode, methods, budgets, targets, seeds, ablations, adapruner, cut_only)
    todo = [j for i, j in enumerate(todo) if i % shard_n == shard_i]
    log(f"{len(todo)} runs in this process (shard {shard_i}/{shard_n}); "
        f"{sum(1 for j in todo if (*j, round(doc['lr'][family(j[0])]['chosen'], 12)) in done)} already in the JSON")
    for label, target, T, seed in todo:
        lr = doc["lr"][family(label)]["chosen"]
        if (label, target, T, seed, round(lr, 12)) in done:
            continue
        r = run_one(base, data, mode, label, target, T, seed, lr)
        say(r)
        finish([r])
    finish([])
    log(f"wrote {path}, {MD_NAME}, {SVG_NAME} in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
