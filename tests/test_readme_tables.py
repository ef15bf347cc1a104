"""The README's benchmark tables are rendered from the committed JSONs (bench/readme.py): a run
that changes bench/results.json or bench/recon.json without re-rendering the README fails here."""
from __future__ import annotations

import pytest

from bench import readme


def test_readme_tables_match_the_committed_runs():
    text = readme.ROOT.joinpath("README.md").read_text()
    rendered = readme.blocks()
    assert {"make-bench", "recon-long"} <= set(rendered)
    _, changed = readme.apply(text, rendered)
    assert not changed, f"README.md is stale in {changed}: run `python -m bench.readme`"


def test_apply_replaces_only_the_marked_block():
    text = "intro\n<!-- bench:x -->\nold 1.23\n<!-- /bench:x -->\nrest\n"
    new, changed = readme.apply(text, {"x": "new 4.56\n"})
    assert changed == ["x"] and new == "intro\n<!-- bench:x -->\nnew 4.56\n<!-- /bench:x -->\nrest\n"
    assert readme.apply(new, {"x": "new 4.56\n"}) == (new, [])
    with pytest.raises(SystemExit, match="no <!-- bench:y -->"):
        readme.apply(text, {"y": "z\n"})
