"""A bench document is only as new as the code it measured: this test fails when the code a
document measures has changed (as committed, at HEAD) since the run that wrote it.

Each bench JSON records the run that wrote it (bench.common.write_json: `provenance.commit`, and
on a dirty tree the content of every uncommitted file, `dirty_blobs`) and the earlier runs whose
rows it keeps (`provenance.merged`). A run measured the files of MEASURES[document] as they were
then: at its commit, with its uncommitted files as recorded. The document is stale when any of
them differs at HEAD (a file changed, added or removed). A Python file differs when what it does
differs: its syntax tree without docstrings, so a reworded docstring or comment, or a reflowed line,
leaves its documents fresh, while any change to a statement, a name or a string the code uses does
not. A document or merged run that records no
commit (written before provenance was recorded) is judged from the date it states: the code of
the last commit before that date. A dirty run without `dirty_blobs` (recorded before they were)
is judged from its commit alone.

Needs the git history back to the documents' commits: in a checkout without it (no .git, or a
shallow clone missing those commits) the test is skipped and says why. CI clones with full history.
"""
from __future__ import annotations

import ast
import datetime as dt
import functools
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# --- what each document measures -------------------------------------------------------------
# The code whose behaviour its figures depend on: the bench module that runs the protocol, the bench
# harness it runs through (models, data, training, timing) and the library code on the path it
# measures. Not the renderers (bench/report.py, bench/readme.py): a change there re-renders, it
# does not re-measure. A folder stands for every file in it.
HARNESS = ["bench/common.py", "bench/config.py"]
STAGE = ["explorer/pruning.py", "explorer/importance.py", "explorer/scores.py", "explorer/allocation.py",
         "explorer/reconstruct.py", "explorer/surgery.py", "explorer/adapters/", "explorer/evaluate.py",
         "explorer/models.py", "explorer/data.py", "explorer/config.py", "explorer/recovery.py"]
TIMING = ["explorer/evaluate.py", "explorer/timing.py"]
METHODS = ["explorer/methods/", "bench/methods_table.py", "bench/quality.py", "bench/tp_baseline.py"]

MEASURES: dict[str, list[str]] = {
    "results.json": HARNESS + STAGE + TIMING + METHODS + [
        "bench/__main__.py", "bench/speed.py", "bench/cost.py", "bench/ui.py", "bench/recon.py",
        "explorer/hidden.py", "explorer/recipes.py"],
    "recon.json": HARNESS + STAGE + ["bench/recon.py", "bench/tp_baseline.py", "explorer/recipes.py",
                                     "explorer/hidden.py"],
    "recipe.json": HARNESS + STAGE + ["bench/recipe.py"],
    "methods_goals.json": HARNESS + STAGE + METHODS + ["bench/methods_goals.py"],
    "budgets.json": HARNESS + STAGE + METHODS + ["bench/budgets.py", "bench/methods_goals.py"],
    "metrics.json": HARNESS + STAGE + ["bench/metrics.py", "explorer/recipes.py"],
    "plans.json": HARNESS + STAGE + ["bench/plans.py", "bench/recon.py", "explorer/predict.py", "explorer/search.py",
                                     "explorer/latency.py", "explorer/cache.py"],
    "decode.json": HARNESS + TIMING + ["bench/decode.py", "bench/tp_baseline.py", "explorer/surgery.py",
                                       "explorer/adapters/", "explorer/models.py", "explorer/export.py",
                                       "explorer/export_onnx.py"],
    "deploy.json": HARNESS + STAGE + TIMING + ["bench/deploy.py", "explorer/export.py", "explorer/export_onnx.py",
                                               "explorer/export_gguf.py", "explorer/llama_cpp.py",
                                               "explorer/deploy.py"],
    "bigmodel.json": ["bench/bigmodel.py", "bench/common.py", "explorer/stream.py", "explorer/scores.py",
                      "explorer/importance.py", "explorer/reconstruct.py", "explorer/pruning.py",
                      "explorer/allocation.py", "explorer/surgery.py", "explorer/adapters/", "explorer/models.py"],
    "rounding.json": ["bench/rounding.py", "bench/common.py"],
    "app_memory.json": HARNESS + STAGE + ["bench/app_memory.py", "app.py", "ui/", "explorer/sessions.py",
                                          "explorer/cache.py"],
    "app_stage.json": HARNESS + STAGE + TIMING + ["bench/app_stage.py", "app.py", "ui/", "explorer/sessions.py",
                                                  "explorer/cache.py"],
}
# Records of how the code *was*, kept verbatim as the "before" of a report: stale by design, so not
# checked against today's code; each must be cited as the before by the report named here.
HISTORICAL = {"app_stage_before.json": "APP_STAGE.md"}  # bench.app_stage's run of 2026-12-02 (365 s / 294 s)
MEASURES["app_stage_before.json"] = MEASURES["app_stage.json"]

# Stale when this test was written (2026-12-07): their code changed after their runs and they were
# not rerun (a rerun costs from minutes to hours of the shared machine). Each one's check is an
# expected failure, by name; rerun the bench and delete its name here.
KNOWN_STALE = {
    "budgets.json",
}


# --- git ---------------------------------------------------------------------------------------

def git(*args: str, cwd: Path = ROOT) -> str | None:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    return proc.stdout if proc.returncode == 0 else None


def history_or_skip(cwd: Path = ROOT) -> None:
    if git("rev-parse", "HEAD", cwd=cwd) is None:
        pytest.skip("no git history here (not a checkout): the documents' commits cannot be compared")


def blobs(rev: str, paths: list[str], cwd: Path = ROOT) -> dict[str, str]:
    """path -> blob id of every file at `rev` under `paths` (files or folders)."""
    out = git("ls-tree", "-r", rev, "--", *paths, cwd=cwd)
    if out is None:
        raise LookupError(rev)
    return {line.split("\t", 1)[1]: line.split()[2] for line in out.splitlines() if line.strip()}


@functools.lru_cache(maxsize=None)  # a blob is its content: the same pair recurs across runs and documents
def code_of(path: str, blob: str | None, cwd: Path = ROOT) -> str | None:
    """What the Python file `blob` does: the dump of its syntax tree with every docstring dropped
    (comments and layout never reach the tree). None for a file that is not Python, a blob not in
    the repository (an uncommitted file of a dirty run) or a file that does not parse."""
    if blob is None or not path.endswith(".py") or (text := git("cat-file", "-p", blob, cwd=cwd)) is None:
        return None
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree)


def _same_code(path: str, then: str | None, now: str | None, cwd: Path = ROOT) -> bool:
    if then == now:
        return True
    before = code_of(path, then, cwd)
    return before is not None and before == code_of(path, now, cwd)


def _under(path: str, paths: list[str]) -> bool:
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in paths)


# --- the runs a document states ---------------------------------------------------------------

@dataclass
class Run:
    commit: str | None  # None: not recorded
    dirty_blobs: dict | None  # the run's uncommitted files (None: not recorded)
    dirty: bool | None
    date: dt.datetime | None  # when it ran (the fallback without a commit)

    def label(self) -> str:
        if self.commit:
            return f"commit {self.commit[:12]}" + (" (dirty)" if self.dirty else "")
        return f"no commit recorded, ran {self.date:%Y-%m-%d %H:%M} UTC" if self.date else "no commit, no date"


_DATE = re.compile(r'"(?:date|ran_at)": "(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d)')


def _earliest_date(text: str) -> dt.datetime | None:
    found = [dt.datetime.fromisoformat(f"{d}T{t}").replace(tzinfo=dt.timezone.utc) for d, t in _DATE.findall(text)]
    return min(found) if found else None


def _parse(ts: str | None) -> dt.datetime | None:
    if not ts:
        return None
    d = dt.datetime.fromisoformat(ts)
    return d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)


def runs_of(text: str) -> list[Run]:
    """The run that wrote the document and every earlier run whose rows it keeps."""
    doc = json.loads(text)
    prov = doc.get("provenance") if isinstance(doc, dict) else None
    undated = _earliest_date(text)  # a run without a commit: the document's oldest stated date
    if not prov:
        return [Run(None, None, None, undated)]
    out = [Run(prov.get("commit"), prov.get("dirty_blobs"), prov.get("dirty"), _parse(prov.get("ran_at")))]
    out += [Run(m.get("commit"), m.get("dirty_blobs"), m.get("dirty"), _parse(m.get("ran_at")) or undated)
            for m in prov.get("merged", [])]
    return out


def changed_since(run: Run, paths: list[str], cwd: Path = ROOT) -> list[str]:
    """The files of `paths` whose content at HEAD differs from what `run` measured."""
    base = run.commit
    if base is None or git("cat-file", "-e", f"{base}^{{commit}}", cwd=cwd) is None:
        if base is not None and git("rev-parse", "--is-shallow-repository", cwd=cwd) == "true\n":
            pytest.skip(f"shallow clone: commit {base[:12]} is not in this history")
        if run.date is None:
            return ["(the run states neither a commit nor a date)"]
        base = (git("rev-list", "-1", f"--before={run.date.isoformat()}", "HEAD", cwd=cwd) or "").strip()
    then = blobs(base, paths, cwd) if base else {}  # a run before the first commit: every file is newer
    for path, blob in (run.dirty_blobs or {}).items():
        if _under(path, paths):
            if blob is None:
                then.pop(path, None)
            else:
                then[path] = blob
    now = blobs("HEAD", paths, cwd)
    return sorted(p for p in set(then) | set(now) if not _same_code(p, then.get(p), now.get(p), cwd))


def staleness(name: str, cwd: Path = ROOT, measures: dict[str, list[str]] = MEASURES) -> str | None:
    """Why `name` is stale ("recon.json (commit abc: explorer/pruning.py, ...)"), or None."""
    text = (cwd / "bench" / name).read_text()
    reasons = []
    for run in runs_of(text):
        files = changed_since(run, measures[name], cwd)
        if files:
            more = f", and {len(files) - 6} more" if len(files) > 6 else ""
            reasons.append(f"{run.label()}: {', '.join(files[:6])}{more} changed since")
    return f"{name} ({'; '.join(reasons)})" if reasons else None


# --- the tests ---------------------------------------------------------------------------------

DOCUMENTS = sorted(p.name for p in BENCH.glob("*.json"))


def test_every_bench_document_says_what_it_measures():
    unmapped = [n for n in DOCUMENTS if n not in MEASURES]
    assert not unmapped, f"add these bench documents to MEASURES with the code they measure: {unmapped}"
    for name, paths in MEASURES.items():
        missing = [p for p in paths if not (ROOT / p).exists()]
        assert not missing, f"{name} measures files that do not exist: {missing}"


def test_no_bench_document_is_older_than_the_code_it_measures():
    """Every document but the KNOWN_STALE ones (each an expected failure of its own below)."""
    history_or_skip()
    stale = [s for n in DOCUMENTS if n not in KNOWN_STALE | set(HISTORICAL) and (s := staleness(n))]
    assert not stale, ("bench documents older than the code they measure (rerun their bench):\n"
                       + "\n".join(stale))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(
    strict=False, reason=f"{n} was stale when the provenance test was written: rerun its bench")) for n in
    sorted(KNOWN_STALE) if n in DOCUMENTS])
def test_known_stale_document(name):
    history_or_skip()
    why = staleness(name)
    assert why is None, why


@pytest.mark.parametrize("name", sorted(HISTORICAL))
def test_a_historical_document_is_the_before_of_its_report(name):
    """A historical record is exempt only while a report shows it as the "before": its date is in
    that report, which is regenerated from today's run of the same bench."""
    doc = json.loads((BENCH / name).read_text())
    report = (BENCH / HISTORICAL[name]).read_text()
    date = (doc.get("meta") or {}).get("date") or doc.get("date")
    assert date and date in report, f"{HISTORICAL[name]} does not cite {name} (its run of {date})"
    assert name not in KNOWN_STALE


# --- the check itself, on a small repository --------------------------------------------------

def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "lib").mkdir()
    for args in (["init", "-q"], ["config", "user.email", "t@t"], ["config", "user.name", "t"]):
        git(*args, cwd=repo)
    return repo


def _commit(repo: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        (repo / name).write_text(text)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", message, cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo).strip()


def _doc(prov: dict | None, date: str = "2020-01-01 00:00 UTC") -> str:
    return json.dumps({"meta": {"date": date}, **({"provenance": prov} if prov else {})})


def test_the_check_fails_a_document_whose_code_changed_after_its_run(tmp_path):
    repo = _repo(tmp_path)
    measures = {"x.json": ["lib/"]}
    c1 = _commit(repo, {"lib/a.py": "a = 1\n", "lib/b.py": "b = 1\n", "other.py": "o = 1\n"}, "code")
    _commit(repo, {"bench/x.json": _doc({"commit": c1, "dirty": False})}, "run on c1")
    assert staleness("x.json", repo, measures) is None
    _commit(repo, {"other.py": "o = 2\n"}, "unmeasured change")
    assert staleness("x.json", repo, measures) is None
    _commit(repo, {"lib/a.py": "a = 2\n"}, "measured change")
    why = staleness("x.json", repo, measures)
    assert why is not None and "lib/a.py" in why and "lib/b.py" not in why and c1[:12] in why
    c4 = _commit(repo, {"lib/c.py": "c = 1\n"}, "a new measured file")
    _commit(repo, {"bench/x.json": _doc({"commit": c4, "dirty": False})}, "rerun")
    assert staleness("x.json", repo, measures) is None
    # a merged-in earlier run keeps the document stale until its rows are rerun too
    _commit(repo, {"bench/x.json": _doc({"commit": c4, "dirty": False,
                                          "merged": [{"commit": c1, "dirty": False}]})}, "merge")
    assert "lib/a.py" in staleness("x.json", repo, measures)


def test_the_check_ignores_docstrings_comments_and_layout_but_not_code(tmp_path):
    repo = _repo(tmp_path)
    measures = {"x.json": ["lib/"]}
    c1 = _commit(repo, {"lib/a.py": '"""Old words."""\nA = 1\nTEXT = "shown"\n\n\ndef f(x):\n    """Doc."""\n    return x + A\n',
                        "lib/data.txt": "1\n"}, "code")
    _commit(repo, {"bench/x.json": _doc({"commit": c1, "dirty": False})}, "run on c1")
    _commit(repo, {"lib/a.py": '"""New words, new figures: 36.83."""\nA = 1  # a comment\nTEXT = "shown"\n\n\n'
                               'def f(x):\n    """Another doc."""\n    return (x\n            + A)\n'}, "words only")
    assert staleness("x.json", repo, measures) is None
    words_only = {"lib/a.py": (repo / "lib/a.py").read_text(), "lib/data.txt": "1\n"}
    for change in ({"lib/a.py": '"""New words, new figures: 36.83."""\nA = 1\nTEXT = "shown!"\n\n\ndef f(x):\n'
                                '    return x + A\n'},  # a string the code uses
                   {"lib/a.py": '"""Old words."""\nA = 2\nTEXT = "shown"\n\n\ndef f(x):\n    return x + A\n'},
                   {"lib/data.txt": "2\n"}):  # not Python: any change counts
        _commit(repo, change, "a change the run did not measure")
        why = staleness("x.json", repo, measures)
        assert why is not None and next(iter(change)) in why, change
        _commit(repo, words_only, "back to the words-only change")
        assert staleness("x.json", repo, measures) is None


def test_the_check_reads_a_dirty_run_from_its_recorded_blobs(tmp_path):
    repo = _repo(tmp_path)
    measures = {"x.json": ["lib/"]}
    c1 = _commit(repo, {"lib/a.py": "a = 1\n"}, "code")
    (repo / "lib/a.py").write_text("a = 2\n")  # the run measures this uncommitted edit
    blob = git("hash-object", "lib/a.py", cwd=repo).strip()
    doc = _doc({"commit": c1, "dirty": True, "dirty_blobs": {"lib/a.py": blob}})
    _commit(repo, {"bench/x.json": doc}, "the edit and its run committed together")
    assert staleness("x.json", repo, measures) is None  # HEAD holds exactly the code it ran
    _commit(repo, {"lib/a.py": "a = 3\n"}, "a later change")
    assert "lib/a.py" in staleness("x.json", repo, measures)


def test_the_check_dates_a_document_without_a_commit(tmp_path):
    repo = _repo(tmp_path)
    measures = {"x.json": ["lib/"]}
    _commit(repo, {"lib/a.py": "a = 1\n"}, "code")
    _commit(repo, {"bench/x.json": _doc(None, date="2090-01-01 00:00 UTC")}, "a run after every commit")
    assert staleness("x.json", repo, measures) is None
    _commit(repo, {"bench/x.json": _doc(None, date="2000-01-01 00:00 UTC")}, "a run before every commit")
    assert "lib/a.py" in staleness("x.json", repo, measures)
