"""`python -m bench.readme [--check]`: the benchmark tables of the README and of docs/*.md, rendered
from the committed bench JSONs, so that no figure there is older than the run that produced it.

Each block sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in any of FILES (README.md
and every docs/*.md); a NAME may live in any of them (once per file). The blocks (BLOCKS):
  * make-bench : `make bench`'s headline (bench/results.json: recon tables, targets, speed, analysis
                 cost, UI server time), with the run's date, load and wall time;
  * recon-long : the long reconstruction runs (bench/recon.json, `python -m bench.recon`);
  * plans      : the plan predictor against reality and the searched plans (bench/plans.json,
                 `python -m bench.plans`);
  * decode     : decode / prefill / serving-batch speed and ONNX Runtime (bench/decode.json,
                 `python -m bench.decode`);
  * bigmodel   : the big-model memory summary and the estimate table for 1 B / 8 B / 70 B
                 (bench/bigmodel.json, `python -m bench.bigmodel`);
  * budgets    : quality against the training budget (bench/budgets.json, `python -m bench.budgets`);
  * budgets-summary : its six methods, chart and claims alone (the README's Results).
  * app-stage  : the app's handlers timed as a demo runs them (bench/app_stage.json, `python -m bench.app_stage`);
  * app-speed  : the same run as one table (the README's performance section);
  * app-phases : its runs' phases beside the 2026-12-02 run's (bench/app_stage_before.json);
  * metrics    : the quick look's importance metric and refit (bench/metrics.json, `python -m bench.metrics`);
  * metrics-summary : its metric table alone (the README's Importance panel).
A block body is written with links relative to the repository root; in a file below it (docs/) its
relative links are rebased (`bench/X.md` becomes `../bench/X.md`). A marker whose NAME is not in
BLOCKS is an error, and so is a block of make-bench / recon-long / plans that no file holds.
Without --check the blocks are rewritten in place; with --check nothing is written and the exit
status is 1 when a block differs from its JSON (tests/test_readme_tables.py runs this).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!-- bench:([\w.-]+) -->")
REQUIRED = ("make-bench", "recon-long", "plans")  # the blocks some file must hold


def files(root: Path = ROOT) -> list[Path]:
    """The documents that may hold blocks: README.md and docs/*.md."""
    out = [root / "README.md"] if (root / "README.md").exists() else []
    return out + sorted((root / "docs").glob("*.md"))


def _demote(lines: list[str], by: int = 2) -> list[str]:
    """Headings one or two levels deeper (a report's "## Speed" becomes the README's "#### Speed")."""
    return [("#" * by + ln) if ln.startswith("#") else ln for ln in lines]


def _load(root: Path, name: str) -> dict | None:
    p = root / "bench" / name
    return json.loads(p.read_text()) if p.exists() else None


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


def plans_block(plans: dict) -> str:
    from .plans import render
    body = render(plans).split("\n", 3)  # drop the report's own title
    return "\n".join(_demote([body[0], ""] + body[3].splitlines(), 2)).strip() + "\n"


def decode_block(decode: dict) -> str:
    from .decode import render
    body = render(decode["results"], decode["meta"], decode.get("provenance")).split("\n", 2)[2]  # no title
    return "\n".join(_demote(body.splitlines(), 2)).strip() + "\n"


def bigmodel_block(data: dict) -> str:
    """BIGMODEL.md's summary of the measured streamed / whole runs, then its "GPU and big models"
    section (the two analysis modes and the estimate table), rendered by bench.bigmodel."""
    from .bigmodel import write_report
    with tempfile.TemporaryDirectory() as d:
        write_report(Path(d), data)
        md = (Path(d) / "BIGMODEL.md").read_text()
    head, found, gpu = md.partition("\n## GPU and big models\n")
    if not found:
        raise SystemExit("bench.bigmodel's report has no '## GPU and big models' section (bench/readme.py bigmodel)")
    first = head.splitlines()[2]  # the "Generated ... by python -m bench.bigmodel" line
    summary = [p for p in head.split("\n\n") if p.startswith("Streamed mode:")]
    return "\n\n".join([first, *summary, gpu.strip()]).strip() + "\n"


def budgets_block(doc: dict) -> str:
    from .budgets import readme_block
    return readme_block(doc)


def runs_line(doc: dict) -> str:
    """One line for a JSON many `--merge` runs wrote (BUDGETS.md lists each run's command and load):
    how many, from when to when, at which commits, on how many threads, under what load."""
    from .budgets import commit_name
    runs = sorted(doc["meta"]["runs"], key=lambda r: r.get("date", ""))
    loads = [x for r in runs for k in ("load_before", "load_after") for x in (r.get(k) or [])[:1]]
    prov = doc.get("provenance") or {}  # the writers' commits, and those the runs record since they do
    commits = {commit_name(m) for m in [prov, *prov.get("merged", [])]} | {r.get("commit") for r in runs}
    at = ", ".join(f"`{c}`" for c in sorted(commits - {None}))
    threads = sorted({r.get("threads") or doc["meta"].get("machine", {}).get("torch_threads") for r in runs} - {None})
    cpu = doc["meta"].get("machine", {}).get("cpu", "")
    return (f"From {len(runs)} runs of `python -m bench.budgets` (`--merge`) between {runs[0]['date']} and "
            f"{runs[-1]['date']} on {cpu}, {'/'.join(map(str, threads)) or '?'} torch thread(s) each, 1-minute load "
            f"average {min(loads):.1f}-{max(loads):.1f}; the rows were measured at commits {at}. Each run's command, "
            f"time and load: [`bench/BUDGETS.md`](bench/BUDGETS.md).")


def budgets_summary_block(doc: dict) -> str:
    """The README's block (bench.readme "budgets-summary"): quality against training steps for the
    design documents' methods (ablation variants left to BUDGETS.md), the chart and each claim's reading."""
    from .budgets import SVG_NAME, apt_settings, claim_summary, header, quality_table
    plain = {**doc, "rows": [r for r in doc["rows"] if "[" not in r["method"]]}  # "apt[no growth]" etc. left out
    runs = doc["meta"].get("runs", [])
    L = [header(doc) if len(runs) < 3 else runs_line(doc), ""]
    targets = sorted({r["target"] for r in plain["rows"]}, reverse=True)
    for target in targets[:1]:  # the main target; the others in BUDGETS.md (the README stays short)
        L += [f"{doc['model']} at **{target:.0%}** removed, test accuracy after T optimiser steps (mean ± std (seeds; "
              f"% of dense {doc['dense']['test']:.4f})):", ""]
        L += quality_table(plain, target) + [""]
    if targets[1:]:
        L += [f"At {', '.join(f'{t:.0%}' for t in targets[1:])} removed: [`bench/BUDGETS.md`](bench/BUDGETS.md).", ""]
    L += [f"![quality against steps and wall time](bench/{SVG_NAME})", ""] + claim_summary(doc)
    st = apt_settings(doc)
    if st:
        L += ["", "APT's settings at each budget (`explorer.methods.apt.schedule_for`):", ""] + st
    return "\n".join(L).strip() + "\n"


# A status line of the app's Run handler -> the phase it starts (the first match wins); the phase
# lasts until the next line. Lines that end a run ("... done", "Done: ...") start nothing.
PHASES = [("Measuring the dense model", "dense measurement (quality, latency, decode)"),
          ("estimating importance", "importance analysis"), ("pruning, then recovery", "cut and its evaluation"),
          ("); reconstructing", "cut and its evaluation"), ("reconstructing layer by layer", "reconstruction"),
          ("evaluating", "evaluation of the stage")]


def phase_seconds(status: list) -> dict[str, float]:
    """[(seconds since the click, status line), ...] -> seconds per phase."""
    out: dict[str, float] = {}
    for (t, line), (t_next, _) in zip(status, status[1:]):
        phase = next((name for key, name in PHASES if key in line), None)
        if phase:
            out[phase] = out.get(phase, 0.0) + t_next - t
    return out


def app_phases_block(doc: dict, before: dict | None) -> str:
    """docs/RESULTS.md's block (bench.readme "app-phases"): one reconstructed stage's phases, before
    (bench/app_stage_before.json, the 2026-12-02 run kept verbatim) and after (bench/app_stage.json)."""
    cols = []  # (label, phases, total)
    if before:
        cols += [(f"{before['meta']['model']} before, run {i + 1}", phase_seconds(run), run[-1][0])
                 for i, run in enumerate(before["runs"])]
    for res in doc["results"]:
        cols += [(f"{res['model']} after, {st['step']}", phase_seconds(st["status"]), st["seconds"])
                 for st in res["steps"] if st["step"].startswith("run")]
    names = list(dict.fromkeys(name for _, name in PHASES))
    L = [f"Seconds per phase of one reconstructed stage from the Run click, read from the status lines "
         f"(before: {before['meta']['date'] if before else 'not recorded'}, taylor importance inside the run, "
         f"every stage timed; after: {doc['meta']['date']}, importance computed beforehand and reused, no "
         "timing). MiniLM-RT's before was not recorded as a run.", "",
         "| phase | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name in names:
        L.append(f"| {name} | " + " | ".join(f"{c[1][name]:.1f}" if name in c[1] else "–" for c in cols) + " |")
    L.append("| **click to the stage's point** | " + " | ".join(f"**{c[2]:.1f}**" for c in cols) + " |")
    return "\n".join(L) + "\n"


def app_stage_block(doc: dict) -> str:
    from .app_stage import readme_block
    return readme_block(doc)


def app_speed_block(doc: dict) -> str:
    from .app_stage import summary_block
    return summary_block(doc)


def metrics_summary_block(doc: dict) -> str:
    """The README's block (bench.readme "metrics-summary"): per model the metrics' test quality and
    analysis time, and the quick-look choice."""
    from .common import generated_line
    lines = [generated_line("python -m bench.metrics", doc["meta"], doc.get("provenance")), "",
             "| model | budget | metric | test quality after the refit (accuracy ↑, perplexity ↓) | analysis s | seeds |",
             "|---|---|---|---|---|---|"]
    picks = []
    for res in doc["results"]:
        s = res["summary"]
        for m, v in s["per_metric"].items():
            lines.append(f"| {res['model']} | {res['case']['target']:.0%} | {m} | {v['mean']:.4f} ± {v['std']:.4f} | "
                         f"{v['analysis_s']:.1f} | {v['n']} |")
        if s["per_metric"]:
            picks.append(f"{res['model']}: best {s['best']}, within one spread {', '.join(s['within_spread'])}, "
                         f"fastest of those {s['fastest_within']}")
    return "\n".join(lines + ["", "; ".join(picks) + "."]) + "\n"


def metrics_block(doc: dict) -> str:
    from .metrics import render
    return "\n".join(_demote(render(doc).split("\n", 2)[2].splitlines(), 2)).strip() + "\n"


# name -> (the JSON under bench/ it is rendered from, the renderer); a renderer of several JSONs names
# them all (the first decides whether the block is rendered, the others are passed as None when absent)
BLOCKS: dict[str, tuple[str | tuple[str, ...], Callable[..., str]]] = {
    "make-bench": ("results.json", make_bench_block),
    "recon-long": ("recon.json", recon_long_block),
    "plans": ("plans.json", plans_block),
    "decode": ("decode.json", decode_block),
    "bigmodel": ("bigmodel.json", bigmodel_block),
    "budgets": ("budgets.json", budgets_block),
    "budgets-summary": ("budgets.json", budgets_summary_block),
    "app-phases": (("app_stage.json", "app_stage_before.json"), app_phases_block),
    "app-stage": ("app_stage.json", app_stage_block),
    "app-speed": ("app_stage.json", app_speed_block),
    "metrics": ("metrics.json", metrics_block),
    "metrics-summary": ("metrics.json", metrics_summary_block),
}


def blocks(root: Path = ROOT, names=None) -> dict[str, str]:
    """NAME -> the block's body (links relative to the repository root), for every name in `names`
    (default: every block in BLOCKS) whose JSON exists."""
    out = {}
    for name in (BLOCKS if names is None else names):
        src, render = BLOCKS[name]
        docs = [_load(root, s) for s in ((src,) if isinstance(src, str) else src)]
        if docs[0] is not None:
            out[name] = render(*docs)
    return out


_LINK = re.compile(r"(\]\()([^)\s#][^)\s]*)(\))")


def rebase_links(body: str, rel_dir: str) -> str:
    """`body`'s relative links (written from the repository root) as seen from `rel_dir`."""
    if rel_dir in ("", "."):
        return body

    def fix(m):
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("/"):
            return m.group(0)
        return m.group(1) + os.path.relpath(target, rel_dir).replace(os.sep, "/") + m.group(3)
    return _LINK.sub(fix, body)


def names_in(text: str) -> list[str]:
    return MARKER.findall(text)


def apply(text: str, rendered: dict[str, str], rel_dir: str = "", missing_ok: bool = False) -> tuple[str, list[str]]:
    """`text` with each marked block replaced (links rebased for a file in `rel_dir`); the names of
    the blocks that changed. A name of `rendered` absent from `text` is an error unless missing_ok."""
    changed = []
    for name, body in rendered.items():
        body = rebase_links(body, rel_dir)
        pat = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n)(.*?)(<!-- /bench:{re.escape(name)} -->)", re.S)
        m = pat.search(text)
        if not m:
            if missing_ok:
                continue
            raise SystemExit(f"no <!-- bench:{name} --> ... <!-- /bench:{name} --> block")
        if m.group(2) != body:
            changed.append(name)
            text = text[:m.start(2)] + body + text[m.end(2):]
    return text, changed


def render_all(root: Path = ROOT) -> dict[Path, tuple[str, list[str]]]:
    """Every document of FILES -> (its text with its blocks rendered, the names that changed)."""
    docs = {p: p.read_text() for p in files(root)}
    held = {p: names_in(t) for p, t in docs.items()}
    for p, names in held.items():
        unknown = sorted(set(names) - set(BLOCKS))
        if unknown:
            raise SystemExit(f"{p.relative_to(root)}: unknown block(s) {', '.join(unknown)} (bench/readme.py BLOCKS)")
    everywhere = {n for names in held.values() for n in names}
    absent = [n for n in REQUIRED if n not in everywhere]
    if absent:
        raise SystemExit(f"no document holds the block(s) {', '.join(absent)} (README.md, docs/*.md)")
    rendered = blocks(root, sorted(everywhere))
    out = {}
    for p, text in docs.items():
        mine = {n: b for n, b in rendered.items() if n in held[p]}
        rel = p.parent.relative_to(root).as_posix()
        out[p] = apply(text, mine, rel)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a document's tables differ from the JSONs")
    args = ap.parse_args(argv)
    stale = []
    for path, (text, changed) in render_all().items():
        rel = path.relative_to(ROOT)
        if not changed:
            continue
        stale.append(f"{rel} ({', '.join(changed)})")
        if not args.check:
            path.write_text(text)
            print(f"{rel}: rewrote {', '.join(changed)}")
    if args.check:
        if stale:
            print(f"stale block(s) in {'; '.join(stale)}: run python -m bench.readme", file=sys.stderr)
            return 1
        return 0
    if not stale:
        print("every block is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
