"""`python -m bench [--quick | --full | --smoke] [--only recon,speed,analysis,ui] [--out bench/]`

Runs the sections, prints figures as it goes, writes results.json (merged with an existing
one of the same mode, so `--only` re-runs a section), REPORT.md and plots.html.

  recon    : the headline, bench/recon.py: uniform / adaptive / FLAP / Torch-Pruning at equal
             parameters, each cut, reconstructed and (at one budget) recovered, several seeds;
  speed    : latency of the recon section's architectures against dense and the same-width limit;
  analysis : what the one-pass analysis costs against a forward + backward pass;
  ui       : server time of the app's allocation updates and of one pruning stage;
  quality, methods (not run by default): the K-stage Adapt-Accel runs with LoRA between stages,
             and the methods table (bench/methods_goals.py measures the methods with 3 seeds).
"""
from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

SECTIONS = ("recon", "quality", "speed", "analysis", "ui", "methods")
DEFAULT_SECTIONS = ("recon", "speed", "analysis", "ui")
RECON_MODE = {"quick": "quick", "full": "long", "smoke": "smoke"}  # bench.recon preset of each mode


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description="Pruning Explorer benchmark suite (issue #6).")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode",
                      help="real bundled models, cut down to ~30 min on 2 CPU cores (default)")
    mode.add_argument("--full", action="store_const", const="full", dest="mode",
                      help="more seeds, budgets, steps and data: hours on 2 cores, or a GPU machine")
    mode.add_argument("--smoke", action="store_const", const="smoke", dest="mode",
                      help="tiny random models, every section, < 60 s (used by the tests)")
    ap.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                    help=f"comma-separated sections to run (default: {','.join(DEFAULT_SECTIONS)}) of "
                         f"{','.join(SECTIONS)}")
    ap.add_argument("--out", default=None, help="output folder (default: bench/; --smoke: a temporary folder)")
    ap.add_argument("--models", default=None, help="comma-separated subset of the preset's models")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--wait-adapter", type=float, default=3600.0,
                    help="seconds to wait for the minilm-rt adapter to appear (it may still be training)")
    ap.add_argument("--fresh", action="store_true", help="do not merge with an existing results.json")
    ap.add_argument("--merge", default=None, metavar="RESULTS_JSON",
                    help="take the sections of another run's results.json (e.g. a section run in parallel) into "
                         "--out before running; with --only none this just merges and re-renders the report")
    args = ap.parse_args(argv)
    args.mode = args.mode or "quick"
    args.only = [s.strip() for s in args.only.split(",") if s.strip() and s.strip() != "none"]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}: use {', '.join(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    from . import common  # sets the offline environment before transformers loads
    import torch

    from .config import QUICK_CUTS, preset, with_models
    from .report import write_outputs

    if args.threads or args.mode == "smoke":  # tiny models: one thread avoids sync overhead
        torch.set_num_threads(args.threads or 1)
    cfg = preset(args.mode)
    if args.models:
        cfg = with_models(cfg, [m.strip() for m in args.models.split(",")])
    cfg.threads = torch.get_num_threads()
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "bench-smoke" if args.mode == "smoke"
                                           else common.ROOT / "bench")
    out.mkdir(parents=True, exist_ok=True)
    results = {"recon": [], "quality": [], "speed": [], "analysis_cost": [], "ui": [], "methods": [], "runs": [],
               "meta": {}}
    old_path = out / "results.json"
    earlier = []  # the documents whose rows this one keeps: their commits go into its provenance
    if old_path.exists() and not args.fresh:
        try:
            old = json.loads(old_path.read_text())
            if old.get("meta", {}).get("mode") == args.mode:
                results.update({k: v for k, v in old.items() if k in results})
                earlier.append(old)
        except (OSError, ValueError):
            pass
    if args.merge:
        other = json.loads(Path(args.merge).read_text())
        earlier.append(other)
        if other.get("meta", {}).get("mode") != args.mode:
            raise SystemExit(f"{args.merge} is a {other.get('meta', {}).get('mode')} run, not {args.mode}")
        om = other["meta"]
        for key in ("recon", "quality", "speed", "analysis_cost", "ui", "methods", "runs"):
            if other.get(key):
                models = {r.get("model") for r in other[key]}
                keep = [r for r in results[key] if r.get("model") not in models] if key != "ui" else []
                results[key] = keep + other[key] if key not in ("methods", "ui") else other[key]
        results["meta"].setdefault("commands", [])
        results["meta"]["commands"] += [c for c in om.get("commands", []) if c not in results["meta"]["commands"]]
        results["meta"].setdefault("section_seconds", {}).update(
            {f"{k} (parallel run)": v for k, v in om.get("section_seconds", {}).items()})
        results["meta"]["merged_from"] = results["meta"].get("merged_from", []) + [
            {"file": str(args.merge), "commands": om.get("commands"), "date": om.get("machine", {}).get("date"),
             "config": om.get("config"), "sections": sorted(om.get("section_seconds", {})),
             "load_average": [om.get("load_average_start"), om.get("load_average_end")]}]
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    meta = results["meta"]
    if args.only or not meta.get("machine"):  # a merge-only call keeps the measuring run's machine record
        meta.update({"mode": args.mode, "machine": common.machine(), "load_average_start": common.load_average(),
                     "config": cfg.to_json(), "quick_cuts": QUICK_CUTS if args.mode == "quick" else None})
    meta.setdefault("commands", [])
    meta["commands"] = [c for c in meta["commands"] if c != command] + [command]
    meta.setdefault("section_seconds", {})
    common.log(f"bench ({args.mode}): sections {', '.join(args.only)} -> {out}")
    m = meta["machine"]
    common.log(f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, GPU {m['gpu']}; "
               f"torch {m['torch']}, transformers {m['transformers']}; load average {meta['load_average_start']}")
    t_all = time.perf_counter()

    # a model whose files are not there yet (the minilm-rt adapter may still be training) goes last
    cfg.models.sort(key=lambda mb: mb.name == "minilm-rt" and not common.adapter_ready())
    loaded: dict[str, tuple] = {}

    def get(name):
        if name not in loaded:
            loaded[name] = common.load(name, wait_s=args.wait_adapter)
        return loaded[name]

    def section(name, fn):
        if name not in args.only:
            return
        common.log(f"\n== {name} ==")
        t = time.perf_counter()
        fn()
        meta["section_seconds"][name] = round(time.perf_counter() - t, 1)
        common.log(f"== {name}: {meta['section_seconds'][name]:.0f} s")
        meta["load_average_end"] = common.load_average()
        meta["total_seconds"] = round(sum(v for k, v in meta["section_seconds"].items() if "parallel" not in k), 1)
        write_outputs(results, out, earlier)  # after every section: a crash later keeps what was measured

    def do_recon():
        from .recon import PRESETS, run_case
        names = [mb.name for mb in cfg.models]
        cases = [c for c in PRESETS[RECON_MODE[args.mode]] if c.model in names]
        results["recon"] = [r for r in results["recon"] if r["model"] not in names]
        for case in cases:
            t = time.perf_counter()
            results["recon"].append(run_case(case, loaded=get(case.model)))
            meta.setdefault("recon_seconds_by_model", {})[case.model] = round(time.perf_counter() - t, 1)
            write_outputs(results, out, earlier)
            gc.collect()

    def do_quality():
        from .quality import run_quality
        names = [mb.name for mb in cfg.models]
        results["quality"] = [r for r in results["quality"] if r["model"] not in names]
        results["runs"] = [r for r in results["runs"] if r["model"] not in names]
        for mb in cfg.models:
            base, data = get(mb.name)
            common.log(f"-- {mb.name}: budgets {mb.budgets}, seeds {mb.seeds}, A in {mb.amplitudes}, "
                       f"K = {mb.stages} x {mb.steps_per_stage} {mb.recovery} steps")
            t = time.perf_counter()
            rows, runs = run_quality(base, data, mb)
            meta.setdefault("quality_seconds_by_model", {})[mb.name] = round(time.perf_counter() - t, 1)
            results["quality"] += rows
            results["runs"] += runs
            write_outputs(results, out, earlier)
            gc.collect()

    def per_model(key: str, rows_for) -> None:
        """Replace this run's models' rows of results[key] with rows_for(base, data, mb)."""
        names = [mb.name for mb in cfg.models]
        results[key] = [r for r in results[key] if r["model"] not in names]
        for mb in cfg.models:
            base, data = get(mb.name)
            results[key] += rows_for(base, data, mb)
            gc.collect()

    def do_speed():
        from .speed import run_speed, widths_by_allocation, widths_from_recon, widths_from_runs

        def speed_rows(base, data, mb):
            plans = widths_from_recon(results["recon"], mb.name)
            source = "recon section (first seed's plans)"
            if not plans:
                plans = widths_from_runs(results["runs"], mb.name, mb.seeds[0])
                source = "quality runs (first seed)"
            if not plans:
                plans = widths_by_allocation(base, data, mb)
                source = "one analysis + one-shot allocation (quality not run)"
            return run_speed(base, mb, plans, source)
        per_model("speed", speed_rows)

    def do_analysis():
        from .cost import run_cost
        per_model("analysis_cost", run_cost)

    def do_ui():
        from .ui import allocation_updates, pruning_stage
        rows = []
        for mb in cfg.models:
            base, data = get(mb.name)
            rows += allocation_updates(base, data, cfg.ui_repeats, calib=min(128, mb.calib_samples * 2))
        if cfg.ui_stage_model in [mb.name for mb in cfg.models]:
            base, data = get(cfg.ui_stage_model)
            rows += pruning_stage(base, data, cfg.ui_stage_full_defaults, cfg.model(cfg.ui_stage_model))
        results["ui"] = rows

    def do_methods():
        from .methods_table import run_methods
        if cfg.methods_model not in [mb.name for mb in cfg.models]:
            common.log(f"  skipped: {cfg.methods_model} is not among the models run")
            return
        mb = cfg.model(cfg.methods_model)
        base, data = get(mb.name)
        chosen = [r for r in results["quality"] if r["model"] == mb.name and r["method"] == "adaptive"]
        amplitude = _amplitude_for(chosen, mb)
        results["methods"] = run_methods(base, data, mb, cfg, amplitude)

    section("recon", do_recon)
    section("quality", do_quality)
    section("speed", do_speed)
    section("analysis", do_analysis)
    section("ui", do_ui)
    section("methods", do_methods)
    write_outputs(results, out, earlier)
    common.log(f"\nwrote {out / 'results.json'}, {out / 'REPORT.md'}, {out / 'plots.html'} "
               f"in {time.perf_counter() - t_all:.0f} s")
    return 0


def _amplitude_for(chosen: list[dict], mb) -> float:
    """A for the methods table: the value chosen on val most often in the quality section."""
    if not chosen:
        return mb.amplitudes[0]
    votes = [r["amplitude"] for r in chosen]
    return max(set(votes), key=lambda a: (votes.count(a), -a))


if __name__ == "__main__":
    sys.exit(main())
