"""`python -m bench.app_memory [--model smollm2-135m] [--tabs 3]`: the app's memory across tabs.

The app's handlers, as Gradio calls them, in one process: preload the model (as `make run`
does), then open a tab, compute importance, prune one stage with reconstruction, close the tab;
`--tabs` times, one after another. RSS (resident set size, from /proc/self/status) after the
load and after each step; the goal (issue "GPU and models of 1-8 B parameters") is that RSS
after the last close stays within 1.5 GB of its value after the load.

Writes app_memory.json and APP_MEMORY.md in --out.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import common
from .common import generated_line, log, machine, write_json

ROOT = Path(__file__).resolve().parents[1]
GOAL_GB = 1.5


def rss_gb() -> tuple[float, float]:
    """(current, peak) resident set size of this process, GiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}
    return kb["VmRSS"] / 2**20, kb["VmHWM"] / 2**20


class _Request:
    def __init__(self, name: str):
        self.session_hash = name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.app_memory")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tabs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=16, help="calibration samples (importance and the run)")
    ap.add_argument("--eval-n", type=int, default=512, help="val tokens / examples per evaluation")
    ap.add_argument("--out", default="bench")
    args = ap.parse_args(argv)
    sys.argv = ["app.py"]
    sys.path.insert(0, str(ROOT))
    import app as A
    from ui.settings import AllocationSettings
    t_start = time.perf_counter()
    meta = {"machine": machine(), "load_before": common.load_average(), "model": args.model, "tabs": args.tabs,
            "samples": args.samples, "eval_n": args.eval_n,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    steps = [("start", *rss_gb())]
    ui = A.ExplorerApp()
    ui.preload(args.model)
    if ui.startup_error:
        raise SystemExit(ui.startup_error)
    steps.append(("model loaded", *rss_gb()))
    log(f"loaded {args.model}: RSS {steps[-1][1]:.2f} GiB")
    alloc = AllocationSettings(0.2, 0.05, "exact", 0.95, 1, "salience")
    for tab in range(1, args.tabs + 1):
        r = _Request(f"tab-{tab}")
        ui.on_page_load(r)
        steps.append((f"tab {tab} opened", *rss_gb()))
        status = ui.on_importance("taylor", args.samples, 8, alloc, r).imp_status
        assert status.startswith("Importance from"), status
        steps.append((f"tab {tab}: importance", *rss_gb()))
        last = None
        for last in ui.on_run(1, "reconstruct", 0, "adaptive", "taylor", args.samples, args.eval_n, False, alloc, r):
            pass
        assert last is not None and str(last.run_status).startswith("Done"), last.run_status
        steps.append((f"tab {tab}: pruned (1 stage, reconstruct)", *rss_gb()))
        ui.on_unload(r)
        steps.append((f"tab {tab} closed", *rss_gb()))
        log(f"tab {tab}: " + ", ".join(f"{s[0].split(': ')[-1]} {s[1]:.2f}" for s in steps[-4:]))
    meta["load_after"] = common.load_average()
    meta["seconds"] = time.perf_counter() - t_start
    loaded, final = steps[1][1], steps[-1][1]
    res = {"meta": meta, "steps": [{"step": s, "rss_gb": r, "peak_gb": p} for s, r, p in steps],
           "growth_gb": final - loaded, "goal_gb": GOAL_GB, "ok": final - loaded <= GOAL_GB}
    out = Path(args.out)
    prov = write_json(out / "app_memory.json", res)
    lines = ["# The app's memory across tabs (`python -m bench.app_memory`)", "",
             generated_line(f"python -m bench.app_memory --model {args.model} --tabs {args.tabs}", meta, prov), "",
             f"The app's handlers in one process: `{args.model}` preloaded (as `make run`), then {args.tabs} tabs one "
             f"after another, each computing importance ({args.samples} calibration samples), pruning one stage at "
             f"S_base 0.2 with `reconstruct` ({args.eval_n} val tokens per evaluation, no timing) and closing. "
             "Sessions share the preloaded model read-only (copy on write: a run prunes its own copy); a closed "
             "session's models are freed and the heap is trimmed (`malloc_trim`).", "",
             "| step | RSS GiB | peak GiB |", "|---|---|---|"]
    lines += [f"| {s} | {r:.2f} | {p:.2f} |" for s, r, p in steps]
    lines += ["", f"RSS after the last close minus RSS after the load: **{final - loaded:+.2f} GiB** (goal ≤ "
              f"{GOAL_GB} GiB: {'met' if res['ok'] else 'missed'})."]
    (out / "APP_MEMORY.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {out / 'APP_MEMORY.md'}: growth {final - loaded:+.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
