"""Bad data files, shared by the UI tests (test_app_hardening) and the CLI tests (test_cli):
file name, content, and what the message must say (case-insensitive)."""
from pathlib import Path

HEADER = "text,label\n"


def reviews(n: int = 40, classes: int = 2, words: int = 4) -> str:
    """A CSV of n short (or, with many words, long) reviews with labels 0..classes-1."""
    return HEADER + "".join(f"{'a fine film ' * words}number {i},{i % classes}\n" for i in range(n))


BAD_FILES = {
    "empty": ("empty.csv", "", "empty"),
    "header only": ("header.csv", HEADER, "0 example(s)"),
    "binary": ("weights.csv", b"\x00\x01\x02PK\x03\x04" * 400, "binary"),
    "not UTF-8": ("latin.csv", HEADER.encode() + "un film très réussi,1\n".encode("latin-1") * 40, "UTF-8"),
    "wrong column": ("cols.csv", "review,stars\n" + "good film,1\nbad film,0\n" * 20, "no column 'text'"),
    "single class": ("one.csv", reviews(classes=1), "one class"),
    "three classes for two labels": ("three.csv", reviews(60, classes=3), "3 classes"),
    "bad JSON": ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": oops\n', "line 2"),
}


def write(folder: Path, name: str, content) -> Path:
    p = Path(folder) / name
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    return p
