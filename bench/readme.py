"""`python -m bench.readme [--check]`: the README's benchmark tables, rendered from the committed
bench JSONs, so that no figure in the README is older than the run that produced it.

Each block sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in README.md:
  * make-bench : `make bench`'s headline (bench/results.json: recon tables, targets, speed, analysis
                 cost, UI server time), with the run's date, load and wall time;
  * recon-long : the long reconstruction runs (bench/recon.json, `python -m bench.recon`);
  * plans      : the plan predictor against reality and the searched plans (bench/plans.json,
                 `python -m bench.plans`).
Without --check the blocks are rewritten in place; with --check nothing is written and the exit
status is 1 when a block differs from its JSON (tests/test_readme_tables.py runs this).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _demote(lines: list[str], by: int = 2) -> list[str]:
    """Headings one or two levels deeper (a report's "## Speed" becomes the README's "#### Speed")."""
    return [("#" * by + ln) if ln.startswith("#") else ln for ln in lines]


def make_bench_block(results: dict) -> str:
    from . import report
    from .common import provenance_text
    from .recon import model_tables
    meta = results.get("meta", {})
    m = meta.get("machine", {})
    lines = [f"Measured {m.get('date')} by `make bench` ({meta.get('mode')} mode; "
             + "; ".join(f"`{c}`" for c in meta.get("commands", [])) + f") on {m.get('cpu')}, {m.get('cores')} "
             f"cores, {m.get('torch_threads')} torch threads; load average {meta.get('load_average_start')} at the "
             f"start, {meta.get('load_average_end')} at the end; " + report._runtime(results)
             + (" " + provenance_text(results["provenance"]) if results.get("provenance") else ""), ""]
    if results.get("recon"):
        lines += model_tables(results["recon"], level="####")
    lines += _demote(report._targets_section(results))
    lines += _demote(report._speed_section(results))
    lines += _demote(report._cost_section(results))
    lines += _demote(report._ui_section(results))
    return "\n".join(lines).strip() + "\n"


def recon_long_block(recon: dict) -> str:
    from .recon import header, model_tables
    return "\n".join([header(recon["meta"], recon.get("provenance")), ""]
                     + model_tables(recon["results"], level="####")).strip() + "\n"


def blocks(root: Path = ROOT) -> dict[str, str]:
    out = {}
    res = root / "bench" / "results.json"
    if res.exists():
        out["make-bench"] = make_bench_block(json.loads(res.read_text()))
    rec = root / "bench" / "recon.json"
    if rec.exists():
        out["recon-long"] = recon_long_block(json.loads(rec.read_text()))
    plans = root / "bench" / "plans.json"
    if plans.exists():
        from .plans import render
        body = render(json.loads(plans.read_text())).split("\n", 3)  # drop the report's own title
        out["plans"] = "\n".join(_demote([body[0], ""] + body[3].splitlines(), 2)).strip() + "\n"
    return out


def apply(text: str, rendered: dict[str, str]) -> tuple[str, list[str]]:
    """README text with each marked block replaced; the names of blocks that changed."""
    changed = []
    for name, body in rendered.items():
        pat = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n)(.*?)(<!-- /bench:{re.escape(name)} -->)", re.S)
        m = pat.search(text)
        if not m:
            raise SystemExit(f"README.md has no <!-- bench:{name} --> ... <!-- /bench:{name} --> block")
        if m.group(2) != body:
            changed.append(name)
            text = text[:m.start(2)] + body + text[m.end(2):]
    return text, changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the README's tables differ from the JSONs")
    args = ap.parse_args(argv)
    readme = ROOT / "README.md"
    text, changed = apply(readme.read_text(), blocks())
    if args.check:
        if changed:
            print(f"README.md is stale in block(s) {', '.join(changed)}: run python -m bench.readme", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text)
    print(f"README.md: rewrote {', '.join(changed) or 'nothing (up to date)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
