"""`python -m bench.recon_seeds RUN.json ... [--out bench/]`: one recon.json / RECON.md from runs of
`python -m bench.recon` made side by side on different seeds (or models) of the same settings.

`bench.recon --combine` keeps one run per model (the newest) and `--merge` adds rows to the JSON a
run finds when it starts, so seeds of one model that ran at the same time on two cores need this:
per model, every run's rows, folded in date order by bench.recon.merge_rows (a later row replaces
an earlier one of the same method, budget and seed). Runs of one model must agree on every setting
but the seeds and budgets (the calibration samples, the A grid, the test tokens, the recovery
recipe ...): otherwise their rows are not the same measurement, and the merge is refused. The
provenance lists every run (bench.common.write_json); the report is bench.recon's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import log, write_json
from .recon import merge_rows, render

SAME = ("samples", "amplitudes", "normalizations", "val_n", "test_n", "other_n", "batch_size", "fixed",
        "recovery", "recovery_budgets", "recovery_cap_s")  # the settings a run's rows depend on


def _same_figures(a: dict, b: dict) -> bool:
    """The same dense figures (the same model and test set measured by the same code: equal up to
    float summation order)."""
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])) for k in a)


def merge_runs(docs: list[dict]) -> tuple[dict, list[dict], list[dict]]:
    """(meta, results, runs kept) of recon.json documents: per model the rows of every run, the
    newest run's meta first with the older ones chained under "earlier"."""
    docs = sorted(docs, key=lambda d: d["meta"]["date"])
    results: dict[str, dict] = {}
    for d in docs:
        for r in d["results"]:
            old = results.get(r["model"])
            if old:
                differ = [k for k in SAME if old["case"].get(k) != r["case"].get(k)]
                if differ:
                    raise ValueError(f"{r['model']}: runs of different settings ({', '.join(differ)}) "
                                     f"are not one measurement: {d['meta'].get('command')}")
                if not _same_figures(old["dense"], r["dense"]):
                    raise ValueError(f"{r['model']}: the runs measured different dense figures "
                                     f"({old['dense']} against {r['dense']})")
            results[r["model"]] = merge_rows(old, r)
    chain = None
    for d in docs:  # each newer run's meta points to the one before, as a --merge writes it
        chain = {**d["meta"], "earlier": chain} if chain else d["meta"]
    return chain, list(results.values()), docs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.recon_seeds", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="JSON", help="recon.json files of bench.recon runs")
    ap.add_argument("--out", default="bench", help="folder for recon.json and RECON.md")
    args = ap.parse_args(argv)
    try:
        meta, results, kept = merge_runs([json.loads(Path(f).read_text()) for f in args.runs])
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    prov = write_json(out / "recon.json", {"meta": meta, "results": results}, kept)
    (out / "RECON.md").write_text(render(results, meta, prov))
    log(f"wrote {out / 'RECON.md'} from {len(kept)} runs: "
        + ", ".join(f"{r['model']} seeds {r['case']['seeds']}" for r in results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
