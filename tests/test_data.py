"""explorer.data: built-in data sets, user files, fixed splits, calibration draws, errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explorer.data import BUILTIN_DATA, DataError, TextData, load_data
from explorer.errors import DataError as ErrorsDataError, ExplorerError

SPLITS = ("train", "val", "test")


def _all_texts(d: TextData) -> list[str]:
    return [t for s in SPLITS for t in d.texts[s]]


def _check_consistent(d: TextData) -> None:
    assert set(d.texts) == set(SPLITS)
    for s in SPLITS:
        assert all(isinstance(t, str) and t.strip() == t and t for t in d.texts[s])
    if d.has_labels:
        assert set(d.labels) == set(SPLITS)
        for s in SPLITS:
            assert len(d.labels[s]) == len(d.texts[s])
            assert all(0 <= y < d.num_labels for y in d.labels[s])
        assert d.num_labels == len(d.label_names) >= 2
    else:
        assert d.labels is None and d.num_labels == 0


# ------------------------------------------------------------------------------ built-ins

def test_error_class_is_shared():
    assert DataError is ErrorsDataError and issubclass(DataError, ExplorerError)
    assert issubclass(DataError, ValueError)


def test_builtin_names_listed():
    assert set(BUILTIN_DATA) == {"rotten-tomatoes", "imdb", "bbc-news"}
    assert all(isinstance(v, str) and v for v in BUILTIN_DATA.values())


def test_rotten_tomatoes():
    d = load_data("rotten-tomatoes")
    _check_consistent(d)
    sizes = {s: len(d.texts[s]) for s in SPLITS}
    assert sizes == {"train": 7030, "val": 500, "test": 1000}
    assert d.label_names == ["negative", "positive"] and d.num_labels == 2
    for s in SPLITS:  # stratified: balanced in every split
        c = Counter(d.labels[s])
        assert c[0] == c[1] == sizes[s] // 2
    assert "7,030 train" in d.summary() and "2 classes" in d.summary()
    # label 1 is positive
    pairs = {t: y for s in SPLITS for t, y in zip(d.texts[s], d.labels[s])}
    assert pairs[next(t for t in pairs if t.startswith("the rock is destined"))] == 1
    assert pairs[next(t for t in pairs if t.startswith("interminably bleak"))] == 0


def test_imdb():
    d = load_data("imdb")
    _check_consistent(d)
    assert {s: len(d.texts[s]) for s in SPLITS} == {"train": 22500, "val": 500, "test": 2000}
    assert d.label_names == ["negative", "positive"]
    assert Counter(d.labels["test"]) == {0: 1000, 1: 1000}


def test_bbc_news():
    d = load_data("bbc-news")
    _check_consistent(d)
    assert {s: len(d.texts[s]) for s in SPLITS} == {"train": 1558, "val": 222, "test": 445}
    assert d.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    total = Counter(d.labels["train"]) + Counter(d.labels["val"]) + Counter(d.labels["test"])
    assert total == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    for k, n in total.items():  # stratified: each class about 20 % in test
        assert abs(Counter(d.labels["test"])[k] - 0.2 * n) <= 1
    assert any("\u00a3" in t for t in _all_texts(d))  # the latin-1 article decoded


def test_builtin_aliases():
    assert load_data("rotten_tomatoes").name == "rotten-tomatoes"
    assert load_data("BBC").name == "bbc-news"


def test_split_is_deterministic_and_disjoint():
    a, b = load_data("rotten-tomatoes"), load_data("rotten-tomatoes")
    assert a.texts == b.texts and a.labels == b.labels
    sets = {s: set(a.texts[s]) for s in SPLITS}
    assert not sets["train"] & sets["test"] and not sets["train"] & sets["val"] and not sets["val"] & sets["test"]
    c = load_data("rotten-tomatoes", seed=1)
    assert c.texts["test"] != a.texts["test"]
    assert sorted(_all_texts(c)) == sorted(_all_texts(a))


def test_max_examples_keeps_prefixes():
    full = load_data("rotten-tomatoes")
    small = load_data("rotten-tomatoes", max_examples=50)
    for s in SPLITS:
        assert small.texts[s] == full.texts[s][:50]
        assert small.labels[s] == full.labels[s][:50]


def test_calibration_stages_disjoint_and_deterministic():
    d = load_data("rotten-tomatoes")
    draws = [d.calibration(128, stage=k) for k in range(5)]
    texts = [t for x, _ in draws for t in x]
    assert len(texts) == len(set(texts)) == 640
    train = set(d.texts["train"])
    assert all(t in train for t in texts)
    x0, y0 = draws[0]
    assert d.calibration(128, stage=0) == (x0, y0)
    assert d.calibration(128, stage=0, seed=1)[0] != x0
    assert 48 <= sum(y0) <= 80  # classes mixed in every draw
    for x, y in draws:
        assert [d.labels["train"][d.texts["train"].index(t)] for t in x[:10]] == y[:10]


def test_calibration_cycles_when_exhausted(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(20)))
    d = load_data(str(p))
    n = len(d.texts["train"])
    assert n == 14
    seen = [t for k in range(3) for t in d.calibration(5, stage=k)[0]]
    assert len(set(seen[:14])) == 14  # the first 14 draws cover the train split
    assert seen[14] == seen[0]  # then the order cycles
    assert len(d.calibration(100)[0]) == n
    assert d.calibration(0) == ([], [])


# ------------------------------------------------------------------------------ user files

def test_csv_int_labels(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("id,text,label\n" + "".join(f'{i},"text, number {i}",{i % 2}\n' for i in range(30)) + '31,"  ",1\n')
    d = load_data(str(p))
    _check_consistent(d)
    assert {s: len(d.texts[s]) for s in SPLITS} == {"train": 21, "val": 3, "test": 6}
    assert d.label_names == ["0", "1"] and d.name == "x.csv"
    assert "text, number 0" in _all_texts(d)


def test_csv_string_labels_sorted(tmp_path):
    p = tmp_path / "x.csv"
    rows = [("good one", "pos"), ("bad one", "neg"), ("meh", "neutral"), ("great", "pos"), ("awful", "neg")]
    p.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    d = load_data(str(p))
    assert d.label_names == ["neg", "neutral", "pos"]
    pairs = {t: d.label_names[y] for s in SPLITS for t, y in zip(d.texts[s], d.labels[s])}
    assert pairs == dict(rows)


def test_csv_custom_columns_and_semicolons(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("review;sentiment\n" + "".join(f"r{i};{i % 3 + 1}\n" for i in range(9)))
    d = load_data(str(p), text_column="review", label_column="sentiment")
    assert d.label_names == ["1", "2", "3"] and len(_all_texts(d)) == 9


def test_csv_text_only_is_plain(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("text\na\nb\nc\nd\n")
    d = load_data(str(p))
    assert not d.has_labels and d.num_labels == 0 and sorted(_all_texts(d)) == list("abcd")
    assert "no labels" in d.summary()


def test_jsonl(tmp_path):
    p = tmp_path / "x.jsonl"
    rows = [{"text": f"t{i}", "label": ["a", "b"][i % 2], "x": 1} for i in range(10)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    d = load_data(str(p))
    _check_consistent(d)
    assert d.label_names == ["a", "b"] and len(_all_texts(d)) == 10


def test_json_array_and_float_labels(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"text": f"t{i}", "label": float(i % 2)} for i in range(6)]))
    d = load_data(str(p))
    assert d.label_names == ["0", "1"]


def test_txt_paragraphs_and_lines(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("first para\ncontinues\n\nsecond\n\n\nthird\n\n fourth \n")
    d = load_data(str(p))
    assert not d.has_labels
    assert sorted(_all_texts(d)) == ["first para\ncontinues", "fourth", "second", "third"]
    q = tmp_path / "y.txt"
    q.write_text("a\nb\r\nc\n")
    assert sorted(_all_texts(load_data(str(q)))) == ["a", "b", "c"]


def test_three_examples_give_one_per_split(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("a\nb\nc\n")
    d = load_data(str(p))
    assert [len(d.texts[s]) for s in SPLITS] == [1, 1, 1]


def test_user_split_deterministic_and_stratified(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("text,label\n" + "".join(f"t{i},{int(i < 50)}\n" for i in range(100)))
    a, b = load_data(str(p)), load_data(str(p))
    assert a.texts == b.texts and a.labels == b.labels
    assert Counter(a.labels["test"]) == {0: 10, 1: 10}
    assert Counter(a.labels["val"]) == {0: 5, 1: 5}


def test_bom_and_crlf(tmp_path):
    p = tmp_path / "x.csv"
    p.write_bytes(b"\xef\xbb\xbftext,label\r\na,0\r\nb,1\r\nc,0\r\n")
    assert sorted(_all_texts(load_data(str(p)))) == ["a", "b", "c"]


# ------------------------------------------------------------------------------ errors

def _error(tmp_path, name: str, content: bytes | str, **kw) -> str:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as e:
        load_data(str(p), **kw)
    return str(e.value)


def test_error_missing_label_column(tmp_path):
    msg = _error(tmp_path, "x.csv", "text,sentiment\na,1\nb,0\nc,1\n")
    assert "no column 'label' (columns: text, sentiment); choose the label column (--label-column)" in msg and "x.csv" in msg


def test_error_missing_text_column(tmp_path):
    msg = _error(tmp_path, "x.csv", "review,label\na,1\nb,0\nc,1\n")
    assert "no column 'text'" in msg and "--text-column" in msg


def test_error_invalid_json_line(tmp_path):
    lines = [json.dumps({"text": "a", "label": i % 2}) for i in range(16)] + ["{not json"]
    msg = _error(tmp_path, "x.jsonl", "\n".join(lines))
    assert msg.startswith("line 17 of x.jsonl is not valid JSON: ")


def test_error_json_not_object_and_missing_key(tmp_path):
    assert "line 2 of x.jsonl is not a JSON object" in _error(tmp_path, "x.jsonl", '{"text": "a", "label": 0}\n[1]\n')
    msg = _error(tmp_path, "y.jsonl", '{"text": "a", "label": 0}\n{"text": "b"}\n{"text": "c", "label": 1}\n')
    assert "line 2 of y.jsonl has no key 'label'" in msg
    msg = _error(tmp_path, "z.jsonl", '{"text": "a", "y": 0}\n{"text": "b", "y": 1}\n{"text": "c", "y": 1}\n')
    assert "no key 'label'" in msg and "--label-column" in msg


def test_error_empty(tmp_path):
    assert _error(tmp_path, "x.csv", b"") == "x.csv is empty"
    assert "is empty" in _error(tmp_path, "y.txt", "  \n\n ")


def test_error_binary(tmp_path):
    msg = _error(tmp_path, "x.bin", bytes(range(256)) * 4)
    assert msg == "x.bin does not look like a text file (binary content)"


def test_error_not_utf8(tmp_path):
    msg = _error(tmp_path, "x.csv", b"text,label\nab\xff,1\n")
    assert "x.csv is not UTF-8 text (byte 0xff at offset 13)" in msg


def test_error_utf16(tmp_path):
    assert "UTF-16" in _error(tmp_path, "x.csv", "text,label\na,0\nb,1\nc,0\n".encode("utf-16"))


def test_blank_lines_before_header(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("\n\ntext,label\na,0\nb,1\nc,0\n")
    assert load_data(str(p)).num_labels == 2


def test_error_one_class(tmp_path):
    msg = _error(tmp_path, "x.csv", "text,label\na,1\nb,1\nc,1\n")
    assert "x.csv has only one class (label 1): a classifier needs at least two" in msg


def test_error_too_large(tmp_path):
    msg = _error(tmp_path, "x.csv", "text,label\n" + "a,1\nb,0\n" * 100, max_bytes=100)
    assert "larger than" in msg and "x.csv" in msg


def test_error_too_few(tmp_path):
    msg = _error(tmp_path, "x.csv", "text,label\na,1\n,0\nb,0\n")
    assert "at least 3" in msg and "x.csv" in msg


def test_error_bad_rows(tmp_path):
    assert "line 3 of x.csv" in _error(tmp_path, "x.csv", "id,text,label\n1,a,0\n2\n3,c,1\n")
    assert "line 2 of y.csv: empty label" in _error(tmp_path, "y.csv", "text,label\na,\nb,1\nc,0\n")
    assert "not a class" in _error(tmp_path, "z.jsonl", "\n".join(
        json.dumps({"text": t, "label": 0.5}) for t in "abc"))


def test_error_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(DataError) as e:
        load_data("sst2")
    msg = str(e.value)
    assert "sst2" in msg and "rotten-tomatoes" in msg and "bbc-news" in msg and "neither" in msg
    with pytest.raises(DataError) as e:
        load_data(str(tmp_path / "nope.csv"))
    assert "not found" in str(e.value) and "imdb" in str(e.value)
    with pytest.raises(DataError, match="folder"):
        load_data(str(tmp_path))
    with pytest.raises(DataError):
        load_data("")


# ------------------------------------------------------------------------------ any bytes

@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".txt", ".json", ".dat"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=2000))
def test_any_bytes_load_or_dataerror(tmp_path, ext, content):
    p = tmp_path / f"fuzz{ext}"
    p.write_bytes(content)
    try:
        d = load_data(str(p))
    except DataError as e:
        assert str(e) and "\n" not in str(e)
        return
    _check_consistent(d)


_PIECES = list('ab ,;"\'\n\r\t{}[]:\\0123.-é\x0b\x1c\u2028') + ["text", "label", "\ufeff", "null", "true", "1e999"]
_TEXTY = st.lists(st.sampled_from(_PIECES), max_size=120).map("".join)


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".txt"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=_TEXTY)
def test_any_texty_content_load_or_dataerror(tmp_path, ext, content):
    """Text built from the characters that matter to the parsers reaches deeper paths than random bytes."""
    p = tmp_path / f"fuzz{ext}"
    p.write_bytes(("text,label\n" if ext == ".csv" else "").encode() + content.encode("utf-8"))
    try:
        d = load_data(str(p))
    except DataError:
        return
    _check_consistent(d)


def test_a_lone_carriage_return_in_a_csv_header_is_a_message(tmp_path):
    """Found by test_any_bytes_load_or_dataerror on a busy run: '\\x80\\r ' raised csv.Error from the header sniff."""
    p = tmp_path / "fuzz.csv"
    p.write_bytes("\x80\r ".encode())
    with pytest.raises(ExplorerError, match="no column 'text'"):
        load_data(str(p))


def test_a_quoted_line_break_in_the_header_keeps_the_comma(tmp_path):
    """The header is read by the CSV parser's own row rules: a quoted column name holding a line break and
    a ';' is one column, not a first line '"a;b' that made ';' the delimiter and lost every column."""
    p = tmp_path / "x.csv"
    p.write_text('"notes; a\nsecond line",text,label\n' + "".join(f"n{i},review {i},{i % 2}\n" for i in range(30)))
    d = load_data(str(p))
    _check_consistent(d)
    assert "review 0" in _all_texts(d) and d.label_names == ["0", "1"]
