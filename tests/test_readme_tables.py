"""The benchmark tables of README.md and docs/*.md are rendered from the committed JSONs
(bench/readme.py): a run that changes a bench JSON without re-rendering the documents fails here."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import readme


def test_documents_match_the_committed_runs():
    out = readme.render_all()
    assert {readme.ROOT / "README.md"} <= set(out)
    held = {n for p in out for n in readme.names_in(p.read_text())}
    assert set(readme.REQUIRED) <= held, f"no document holds {set(readme.REQUIRED) - held}"
    stale = {str(p.relative_to(readme.ROOT)): changed for p, (_, changed) in out.items() if changed}
    assert not stale, f"stale blocks {stale}: run `python -m bench.readme`"


def test_check_exits_zero_when_up_to_date():
    assert readme.main(["--check"]) == 0


def test_apply_replaces_only_the_marked_block():
    text = "intro\n<!-- bench:x -->\nold 1.23\n<!-- /bench:x -->\nrest\n"
    new, changed = readme.apply(text, {"x": "new 4.56\n"})
    assert changed == ["x"] and new == "intro\n<!-- bench:x -->\nnew 4.56\n<!-- /bench:x -->\nrest\n"
    assert readme.apply(new, {"x": "new 4.56\n"}) == (new, [])
    with pytest.raises(SystemExit, match="no <!-- bench:y -->"):
        readme.apply(text, {"y": "z\n"})
    assert readme.apply(text, {"y": "z\n"}, missing_ok=True) == (text, [])


def test_links_in_a_block_are_rebased_for_a_file_under_docs():
    body = "see [`bench/RECON.md`](bench/RECON.md), ![c](bench/x.svg), [web](https://x.org/a), [top](#t)\n"
    assert readme.rebase_links(body, "") == body
    assert readme.rebase_links(body, "docs") == (
        "see [`bench/RECON.md`](../bench/RECON.md), ![c](../bench/x.svg), [web](https://x.org/a), [top](#t)\n")
    text = "<!-- bench:x -->\n<!-- /bench:x -->\n"
    assert readme.apply(text, {"x": "[a](bench/A.md)\n"}, "docs")[0] == (
        "<!-- bench:x -->\n[a](../bench/A.md)\n<!-- /bench:x -->\n")


def _tree(tmp_path: Path, readme_text: str, docs: dict[str, str]) -> Path:
    (tmp_path / "README.md").write_text(readme_text)
    (tmp_path / "docs").mkdir()
    for name, text in docs.items():
        (tmp_path / "docs" / name).write_text(text)
    return tmp_path


def test_a_block_may_live_in_any_document(tmp_path, monkeypatch):
    blocks = {name: f"{name} body [r](bench/R.md)\n" for name in readme.REQUIRED}
    monkeypatch.setattr(readme, "blocks", lambda root, names=None: {n: blocks[n] for n in (names or blocks)})
    empty = "".join(f"<!-- bench:{n} -->\n<!-- /bench:{n} -->\n" for n in readme.REQUIRED[1:])
    root = _tree(tmp_path, "top\n<!-- bench:make-bench -->\nold\n<!-- /bench:make-bench -->\n",
                 {"RESULTS.md": empty})
    out = readme.render_all(root)
    assert out[root / "README.md"] == ("top\n<!-- bench:make-bench -->\nmake-bench body [r](bench/R.md)\n"
                                       "<!-- /bench:make-bench -->\n", ["make-bench"])
    text, changed = out[root / "docs" / "RESULTS.md"]
    assert sorted(changed) == sorted(readme.REQUIRED[1:]) and "recon-long body [r](../bench/R.md)" in text


def test_unknown_or_missing_blocks_are_errors(tmp_path):
    root = _tree(tmp_path, "<!-- bench:nope -->\n<!-- /bench:nope -->\n", {})
    with pytest.raises(SystemExit, match="unknown block"):
        readme.render_all(root)
    root2 = tmp_path / "b"
    root2.mkdir()
    _tree(root2, "no blocks\n", {})
    with pytest.raises(SystemExit, match="no document holds"):
        readme.render_all(root2)
