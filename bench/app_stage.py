"""`python -m bench.app_stage [--models smollm2-135m minilm-rt] [--metric M]`: how long a user waits in the app.

Drives the app's own handlers (`app.ExplorerApp`, no browser) as a user giving a demo does, on each
model freshly loaded in this process (the disk cache off, so "the first time" is the first time):
  1. Compute importance (the Importance tab's button; the quick look's metric, 64 calibration samples);
  2. Run 1: one reconstructed stage at the model's quick-look budget (SmolLM2 20 %, MiniLM-RT 40 %) with
     the model's allocation defaults, the default evaluation size on val, timing off (the Run tab's default);
  3. Run 2: another plan (the budget + 10 points), as a hand-tuner's next try;
  4. MiniLM-RT only: a 2-stage run at 40 %.
Every status line is timed from its click. The issue's goals (SmolLM2: run 1 ≤ 60 s, run 2 ≤ 30 s,
importance ≤ 30 s; MiniLM-RT: a stage ≤ 10 s, 2 stages ≤ 30 s) are reported against the times, on
whatever load the machine had (stated). bench/app_stage_before.json is the run of 2026-12-02
(commit e8876ee: taylor, dense measured with timings, importance inside the run), copied verbatim.
Writes app_stage.json and APP_STAGE.md in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

from . import common
from .common import ROOT, generated_line, log, machine, write_json

QUICK = {"smollm2-135m": {"target": 0.2, "next": 0.3, "goals": {"importance": 30, "run 1": 60, "run 2": 30}},
         "minilm-rt": {"target": 0.4, "next": 0.5, "goals": {"run 1": 10, "run 2": 10, "2 stages": 30}}}


class _Request:
    session_hash = "bench"


def _timed(click: Callable[[], object], field: str) -> tuple[float, list[tuple[float, str]]]:
    """(seconds, [(seconds since the click, status)]) of a handler call (a generator or one output)."""
    t0, lines = time.perf_counter(), []
    res = click()
    outs = res if hasattr(res, "__next__") else iter([res])
    for o in outs:
        st = getattr(o, field, None)
        if isinstance(st, str) and (not lines or lines[-1][1] != st):
            lines.append((time.perf_counter() - t0, st))
    return time.perf_counter() - t0, lines


def run_model(name: str, metric: str | None) -> dict:
    sys.argv = ["app.py"]
    sys.path.insert(0, str(ROOT))
    import app as A
    from explorer.config import AnalysisConfig
    from explorer.recipes import allocation_defaults
    from ui.settings import AllocationSettings
    from ui.views import task_defaults
    q = QUICK[name]
    t0 = time.perf_counter()
    ui = A.ExplorerApp()
    ui.preload(name)
    if ui.startup_error:
        raise SystemExit(ui.startup_error)
    out = {"model": name, "metric": metric, "load_seconds": time.perf_counter() - t0, "steps": []}
    log(f"loaded {name} in {out['load_seconds']:.0f} s")
    r = _Request()
    ui.on_page_load(r)
    d = allocation_defaults(name)

    def settings(target):
        return AllocationSettings(target=target, amplitude=d.get("amplitude", 0.05), mode="exact", max_sparsity=0.95,
                                  round_to=1, split="salience", normalization=d.get("normalization", "maxabs"))

    def step(label, secs, lines):
        out["steps"].append({"step": label, "seconds": secs, "status": lines})
        log(f"  {label}: {secs:.1f} s — {lines[-1][1][:120] if lines else ''}")

    metric = metric or task_defaults(ui.registry.template.lm.task)[0]  # the Importance tab's default for this model
    out["metric"] = metric
    batch = AnalysisConfig().batch_size  # the Importance tab's default, as the run's analysis has it

    def run(stages, target):
        return lambda: ui.on_run(stages, "reconstruct", 0, "adaptive", metric, 64, 0, False, settings(target), r)

    step("importance", *_timed(lambda: ui.on_importance(metric, 64, batch, settings(q["target"]), r), "imp_status"))
    step("run 1", *_timed(run(1, q["target"]), "run_status"))
    step("run 2", *_timed(run(1, q["next"]), "run_status"))
    if "2 stages" in q["goals"]:
        step("2 stages", *_timed(run(2, q["target"]), "run_status"))
    out["goals"] = {k: {"goal_s": g, "seconds": next(s["seconds"] for s in out["steps"] if s["step"] == k),
                        "met": next(s["seconds"] for s in out["steps"] if s["step"] == k) <= g}
                    for k, g in q["goals"].items()}
    return out


def _before(path: Path) -> list[str]:
    """The 2026-12-02 run (one model, a run that measured the dense model and recomputed importance)."""
    if not path.exists():
        return []
    b = json.loads(path.read_text())
    m = b["meta"]
    lines = [f"## Before: {m['model']}, {m['date']} (commit e8876ee, load {m['load_before']} / {m['load_after']})", "",
             "Taylor importance computed inside every run, the dense model measured with latency and decode "
             "timings, every stage timed.", "", "| run | s from the click to the stage's point |", "|---|---|"]
    lines += [f"| {i} | {run[-1][0]:.0f} |" for i, run in enumerate(b["runs"], 1)]
    return lines + [""]


def render(doc: dict, before: Path) -> str:
    lines = ["# The app at the speed of a demo (`python -m bench.app_stage`)", "",
             generated_line("python -m bench.app_stage", doc["meta"], doc.get("provenance")), "",
             "The app's handlers as a demo runs them on a freshly loaded model (nothing cached on disk): Compute "
             "importance, then a one-stage reconstructed run at the quick-look budget with the model's allocation "
             "defaults, then a second run at another budget (and on MiniLM-RT a 2-stage run). Timing off (the "
             "Run tab's default: latency is measured on request); quality on the default val budget with its "
             "interval. Seconds from each click to its last status line.", ""]
    for res in doc["results"]:
        lines += [f"## {res['model']} (metric `{res['metric']}`; loaded in {res['load_seconds']:.0f} s before the "
                  "first click)", "", "| step | seconds | goal | last status |", "|---|---|---|---|"]
        for s in res["steps"]:
            g = res["goals"].get(s["step"])
            goal = f"≤ {g['goal_s']} s: {'met' if g['met'] else 'missed'}" if g else ""
            last = s["status"][-1][1].replace("|", "/").replace("\n", " ")[:160] if s["status"] else ""
            lines.append(f"| {s['step']} | {s['seconds']:.1f} | {goal} | {last} |")
        lines.append("")
        for s in res["steps"]:
            lines += [f"<details><summary>{res['model']}: {s['step']}, every status line</summary>", "",
                      "| s | status |", "|---|---|"]
            lines += [f"| {t:.1f} | {st.replace('|', '/').replace(chr(10), ' ')[:200]} |" for t, st in s["status"]]
            lines += ["", "</details>", ""]
    return "\n".join(lines + _before(before)) + "\n"


def readme_block(doc: dict, before: Path = ROOT / "bench" / "app_stage_before.json") -> str:
    """docs/RESULTS.md's block (bench.readme "app-stage"): the report without its title and without the
    per-step status lines (those stay in APP_STAGE.md)."""
    body = render(doc, before).split("\n", 2)[2]
    body = re.sub(r"<details>.*?</details>\n*", "", body, flags=re.S)
    lines = [("##" + ln) if ln.startswith("#") else ln for ln in body.splitlines()]
    return "\n".join(lines).strip() + "\n"


def summary_block(doc: dict) -> str:
    """The README's performance table (bench.readme "app-speed"): per model and step, seconds and goal."""
    lines = [generated_line("python -m bench.app_stage", doc["meta"], doc.get("provenance")), "",
             "| model | load | step | seconds from the click | goal |", "|---|---|---|---|---|"]
    for res in doc["results"]:
        for s in res["steps"]:
            g = res["goals"].get(s["step"])
            goal = f"≤ {g['goal_s']} s: {'met' if g['met'] else 'missed'}" if g else ""
            lines.append(f"| {res['model']} | {res['load_seconds']:.0f} s | {s['step']} | {s['seconds']:.1f} | {goal} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.app_stage")
    ap.add_argument("--models", nargs="*", default=list(QUICK), choices=list(QUICK))
    ap.add_argument("--metric", default=None, help="importance metric (default: the Importance tab's for the model)")
    ap.add_argument("--out", default="bench")
    args = ap.parse_args(argv)
    os.environ["EXPLORER_CACHE"] = "memory"  # the app's reuse within a session; nothing from an earlier process
    metric = args.metric
    meta = {"machine": machine(), "load_before": common.load_average(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    t0 = time.perf_counter()
    results = [run_model(m, metric) for m in args.models]
    meta.update(seconds=time.perf_counter() - t0, load_after=common.load_average())
    out = Path(args.out)
    doc = {"meta": meta, "results": results}
    write_json(out / "app_stage.json", doc)
    (out / "APP_STAGE.md").write_text(render(doc, out / "app_stage_before.json"))
    log(f"wrote {out / 'APP_STAGE.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
