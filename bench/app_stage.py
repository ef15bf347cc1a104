"""`python -m bench.app_stage [--model smollm2-135m] [--out bench/]`: how long a user waits in the app.

Drives the app's own Run handler (`app.ExplorerApp.on_run`, no browser) on a loaded model with
the Prune tab's defaults for a quick look: 1 stage, S_base 0.2, adaptive A = 0.05, recovery
`reconstruct`, 64 calibration samples, the default evaluation size (4,096 val tokens / 500 val
examples) with timing on. It times every status line from the Run click, twice: the first run
measures the dense model, the second reuses that measurement (as every later run does).
Writes app_stage.json and APP_STAGE.md in --out.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import common  # noqa: F401  (offline environment first)
from .common import ROOT, log, machine, provenance_text, write_json


class _Request:
    session_hash = "bench"


def timed_run(app, recovery: str) -> list[tuple[float, str]]:
    """(seconds since the click, status line) for every status the run shows."""
    sys.path.insert(0, str(ROOT / "tests"))
    from app_helpers import alloc
    t0 = time.perf_counter()
    out = []
    for o in app.on_run(1, recovery, 10, "adaptive", "taylor", 64, 0, True, alloc(target=0.2, amplitude=0.05),
                        _Request()):
        if isinstance(o.run_status, str):
            out.append((time.perf_counter() - t0, o.run_status))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.app_stage")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recovery", default="reconstruct")
    ap.add_argument("--out", default="bench")
    args = ap.parse_args(argv)
    sys.argv = ["app.py"]
    sys.path.insert(0, str(ROOT))
    import app as A
    meta = {"machine": machine(), "load_before": common.load_average(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model,
            "recovery": args.recovery}
    t0 = time.perf_counter()
    ui = A.ExplorerApp()
    ui.preload(args.model)
    if ui.startup_error:
        raise SystemExit(ui.startup_error)
    meta["load_seconds"] = time.perf_counter() - t0
    log(f"loaded {args.model} in {meta['load_seconds']:.0f} s")
    runs = []
    for i in (1, 2):
        statuses = timed_run(ui, args.recovery)
        runs.append(statuses)
        for t, st in statuses:
            log(f"  run {i}: {t:6.1f} s  {st[:140]}")
    meta["load_after"] = common.load_average()
    out = Path(args.out)
    prov = write_json(out / "app_stage.json", {"meta": meta, "runs": runs})
    lines = ["# One stage in the app (`python -m bench.app_stage`)", "",
             f"Generated {meta['date']} on {meta['machine'].get('cpu', '?')}, {meta['machine'].get('torch_threads')} "
             f"torch threads, load average before/after {meta['load_before']} / {meta['load_after']}. "
             + provenance_text(prov) + " "
             f"`{args.model}` loaded in {meta['load_seconds']:.0f} s (before the first click). The Run handler with the "
             f"Prune tab's quick-look settings: 1 stage, S_base 0.2, A 0.05, recovery `{args.recovery}`, 64 calibration "
             "samples, default evaluation size on val, timing on. Seconds from the click to each status line.", ""]
    for i, statuses in enumerate(runs, 1):
        lines += [f"## Run {i}" + (" (the dense model is measured)" if i == 1 else " (the dense measurement is reused)"),
                  "", "| s | status |", "|---|---|"]
        lines += [f"| {t:.1f} | {st.replace('|', '/')[:200]} |" for t, st in statuses]
        lines.append("")
    (out / "APP_STAGE.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {out / 'APP_STAGE.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
