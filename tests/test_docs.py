"""The README a newcomer reads in ten minutes, and the documents it links (docs/*.md):

  * README.md stays short (MAX_README_LINES);
  * every relative link and image in README.md and docs/*.md points to a file that exists (and a
    `#anchor` to a heading of that file);
  * every `<!-- bench:NAME -->` block is one bench/readme.py renders, and is closed;
  * every result figure in their prose (outside generated blocks, code and inline code) sits in a
    paragraph, list item or table row that names the file it comes from (a bench JSON or document,
    docs/RESULTS.md, or the bundled model's metrics.json), or the list's lead-in line names it.
    A hand-typed figure with no source fails here: put it in a generated block, name its source,
    or leave it out.
"""
from __future__ import annotations

import re
from pathlib import Path

from bench import readme

ROOT = Path(__file__).resolve().parent.parent
MAX_README_LINES = 400


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# --- what a figure is ------------------------------------------------------------------------------

FIGURE = re.compile(r"""
      (?<![\w.])\d+(?:\.\d+)?e-\d+(?![\w.])            # 1.5e-5, 6e-4
    | (?<![\w.])\d+\.\d+(?![\w.])                       # 0.836, 1.40, +0.0023 (not 2.13.0, not 127.0.0.1)
    | (?<![\w.])\d+(?:\.\d+)?\s?%                       # 98.8 %, 50%
    | (?<![\w.])\d+(?:\.\d+)?[×x](?![\w])               # 1.40×, 2x
    | ×\d+(?:\.\d+)?(?![\w.])                           # ×1.27
    | (?<![\w.])\d+(?:\.\d+)?\s?(?:GiB|MiB|GB|MB|ms|s|min)\b   # 65 s, 263 MiB
""", re.X)

# Not results: versions, settings and the examples' values, tolerances. Each is a value a reader
# types or a threshold the code applies, not something a run measured. Add to these only such values.
ALLOWED = {
    "3.11",  # Python version
    "5.25",  # transformers version the per-layer LLaMA code needs
    "0.05", "0.15", "0.25", "0.3", "0.5", "0.75",  # A, S_base, the predictor's levels, the search grid
    "1.6",  # the --speedup example
    "1e-3", "1e-4", "1e-5", "2e-5", "3e-5",  # λ grid's end, ONNX / remote-code tolerances, learning rates
    "100 MiB",  # --max-upload-mb's default
}


def _round_percent(fig: str) -> bool:
    """Budgets, splits and goals are round (20 %, 85 %); a measured share rarely is (98.8 %, 83 %)."""
    m = re.fullmatch(r"(\d+)\s?%", fig)
    return bool(m) and int(m.group(1)) % 5 == 0


def figures(text: str) -> list[str]:
    return [f for f in (m.group(0).strip() for m in FIGURE.finditer(text))
            if f not in ALLOWED and not _round_percent(f)]


SOURCE = re.compile(r"bench/\w+\.(?:json|md)\b|\bRESULTS\.md\b|assets/[\w/.-]+\.json\b")

# --- the prose of a document -------------------------------------------------------------------------

BLOCK = re.compile(r"<!-- bench:([\w.-]+) -->\n.*?<!-- /bench:\1 -->", re.S)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def prose(text: str) -> str:
    """The text without front matter, generated blocks, fenced code and HTML comments."""
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)
    text = BLOCK.sub("", text)
    text = FENCE.sub("", text)
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


def units(text: str) -> list[tuple[str, str]]:
    """(the unit, its lead-in) for every paragraph, list item and table row of `text`'s prose."""
    out = []
    for para in re.split(r"\n\s*\n", prose(text)):
        lines = para.strip("\n").splitlines()
        if not lines:
            continue
        if lines[0].startswith("|"):
            out += [(ln, "") for ln in lines]
            continue
        items, lead = [], []
        for ln in lines:
            if re.match(r"(?:[*-]|\d+\.)\s", ln):
                items.append([ln])
            elif items:
                items[-1].append(ln)
            else:
                lead.append(ln)
        lead_text = "\n".join(lead)
        if lead:
            out.append((lead_text, ""))
        out += [("\n".join(it), lead_text) for it in items]
    return out


def unsourced(text: str) -> list[tuple[list[str], str]]:
    """[(its figures, the unit)] for each unit with a figure and no source in it or in its lead-in."""
    bad = []
    for unit, lead in units(text):
        figs = figures(re.sub(r"`[^`]*`", "CODE", re.sub(r"\]\([^)]*\)", "]", unit)))
        if figs and not SOURCE.search(unit) and not SOURCE.search(lead):
            bad.append((figs, unit))
    return bad


# --- the tests ---------------------------------------------------------------------------------------

def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move the long parts to docs/"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    h = re.sub(r"`|\*\*|\[([^]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M)}


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_points_to_an_existing_file():
    broken = []
    for doc in documents():
        for target in LINK.findall(FENCE.sub("", doc.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_links_every_document_and_bench_report():
    text = (ROOT / "README.md").read_text()
    for doc in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "RECON.md", ROOT / "bench" / "METHODS.md"]:
        rel = doc.relative_to(ROOT).as_posix()
        assert f"]({rel})" in text, f"README.md does not link {rel}"


def test_every_bench_block_is_known_and_closed():
    for doc in documents():
        text = doc.read_text()
        opened = re.findall(r"<!-- bench:([\w.-]+) -->", text)
        closed = re.findall(r"<!-- /bench:([\w.-]+) -->", text)
        assert sorted(opened) == sorted(closed), f"{doc.relative_to(ROOT)}: unbalanced bench markers"
        unknown = set(opened) - set(readme.BLOCKS)
        assert not unknown, f"{doc.relative_to(ROOT)}: blocks bench/readme.py does not render: {unknown}"


def test_every_figure_in_prose_names_its_source():
    bad = [f"{doc.relative_to(ROOT)}: {figs} in: {unit[:160]!r}" for doc in documents()
           for figs, unit in unsourced(doc.read_text())]
    assert not bad, ("figures without a source (name the bench JSON / document in the same paragraph, "
                     "or move them into a generated block):\n" + "\n".join(bad))


def test_the_figure_check_catches_a_hand_typed_figure():
    assert unsourced("Bias compensation alone collapsed MiniLM-RT to 50 % (0.836 with the weights).\n")
    assert unsourced("* peak +263 MiB over the loaded model (65 s, 2 cores)\n")
    assert unsourced("SmolLM2 at 20 % is ×1.40 of dense and 98.8 % kept.\n")
    assert not unsourced("SmolLM2 at 20 % is ×1.40 of dense (`bench/recon.json`).\n")
    assert not unsourced("Reading (from `bench/recon.json`):\n* ×1.40 of dense\n* 0.8170 ± 0.0040\n")
    assert not unsourced("A = 0.05, S_base 0.3, 40 % removed, Python 3.11, `--lr 0.0001`, 32 × 128 tokens.\n")
    assert not unsourced("<!-- bench:x -->\n0.836 and 65 s\n<!-- /bench:x -->\n```\nrun 1.23x\n```\n")
