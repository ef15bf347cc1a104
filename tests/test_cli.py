"""The command line: JSON outputs, and one clear line on stderr with exit code 2 on bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bad_inputs import BAD_FILES, reviews, write
from conftest import tiny_data, tiny_lm
from explorer.cli import main
from explorer.models import save_model


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny BERT classifier and a tiny LLaMA saved as ordinary model directories, and a CSV."""
    root = tmp_path_factory.mktemp("cli")
    out = {}
    for name in ("bert", "llama"):
        lm = tiny_lm(name)
        out[name] = str(save_model(lm, root / name))
    data = tiny_data(120)
    csv = root / "data.csv"
    rows = ["text,label"] + [f"{t},{l}" for t, l in zip(sum(data.texts.values(), []), sum(data.labels.values(), []))]
    csv.write_text("\n".join(rows))
    txt = root / "data.txt"
    txt.write_text("\n\n".join(sum(data.texts.values(), [])))
    out["csv"], out["txt"], out["root"] = str(csv), str(txt), root
    return out


def _err_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected a message on stderr"
    return err[-1]


def test_analyze_then_allocate(tiny_dirs, capsys):
    a = tiny_dirs["root"] / "a.json"
    assert main(["analyze", "--model", tiny_dirs["bert"], "--data", tiny_dirs["csv"], "--samples", "16",
                 "--batch-size", "8", "--json", str(a)]) == 0
    d = json.loads(a.read_text())
    assert len(d["layers"]) == 3
    for layer in d["layers"]:
        assert {"index", "cosine_importance", "normalized_importance", "heads", "neurons"} <= set(layer)
        assert len(layer["heads"]) == 4 and len(layer["neurons"]) == 64
    b = tiny_dirs["root"] / "b.json"
    assert main(["allocate", "--analysis", str(a), "--target", "0.4", "--amplitude", "0.2", "--json", str(b)]) == 0
    d2 = json.loads(b.read_text())
    assert all(0 <= layer["sparsity"] < 1 for layer in d2["layers"])
    assert abs(d2["allocation"]["removed_fraction"] - 0.4) < 0.02
    u = tiny_dirs["root"] / "u.json"
    assert main(["allocate", "--analysis", str(a), "--target", "0.4", "--amplitude", "0.2", "--uniform",
                 "--json", str(u)]) == 0
    assert {layer["sparsity"] for layer in json.loads(u.read_text())["layers"]} == {0.4}
    assert d2["allocation"]["split"] == "salience"  # the default, from the analysis' unit scores
    assert main(["allocate", "--analysis", str(a), "--target", "0.4", "--split", "proportional",
                 "--json", str(u)]) == 0
    assert json.loads(u.read_text())["allocation"]["split"] == "proportional"


@pytest.mark.parametrize("recovery", ["lora", "reconstruct+lora"])
def test_prune_saves_a_model_that_eval_reproduces(tiny_dirs, capsys, recovery):
    out, rep = tiny_dirs["root"] / f"pruned-{recovery}", tiny_dirs["root"] / "p.json"
    assert main(["prune", "--model", tiny_dirs["llama"], "--data", tiny_dirs["txt"], "--target", "0.3",
                 "--amplitude", "0.1", "--stages", "2", "--recovery", recovery, "--recovery-steps", "2",
                 "--train-batch-size", "4", "--samples", "8", "--batch-size", "4", "--eval-samples", "200",
                 "--out", str(out), "--json", str(rep)]) == 0
    r = json.loads(rep.read_text())
    assert {"dense", "final", "stages"} <= set(r) and len(r["stages"]) == 2
    for k in ("params", "perplexity", "latency_ms"):
        assert k in r["dense"] and k in r["final"]
    assert r["final"]["params"] < r["dense"]["params"]
    if recovery.startswith("reconstruct"):
        st = r["stages"][0]
        assert st["reconstruction"]["error_ratio"] < 1 and set(st["phases"]) == {"cut", "reconstructed"}
        cap = capsys.readouterr()
        assert "stage 1 reconstruction" in cap.out + cap.err
    ev = tiny_dirs["root"] / "e.json"
    assert main(["eval", "--model", str(out), "--data", tiny_dirs["txt"], "--eval-samples", "200",
                 "--batch-size", "2", "--seq-len", "8", "--json", str(ev)]) == 0
    e = json.loads(ev.read_text())
    assert e["perplexity"] == r["final"]["perplexity"]  # exact, in a fresh load
    assert e["params"] == r["final"]["params"]


def test_prune_no_timing_reports_quality_with_its_interval_and_no_timings(tiny_dirs, capsys, monkeypatch):
    """--no-timing: the quality point only (with its 95 % interval and the budget it was measured on);
    no latency or decode timing runs, for the dense model or any stage."""
    from explorer import evaluate
    calls = []
    monkeypatch.setattr(evaluate, "latency", lambda *a, **k: calls.append("latency") or {"latency_ms": 1.0})
    rep, txt = tiny_dirs["root"] / "nt.json", tiny_dirs["root"] / "long.txt"
    txt.write_text("\n\n".join(sum(tiny_data(1000).texts.values(), [])))  # a val split of > 512 tokens
    assert main(["prune", "--model", tiny_dirs["llama"], "--data", str(txt), "--target", "0.3",
                 "--stages", "1", "--recovery", "none", "--samples", "8", "--batch-size", "4",
                 "--eval-samples", "512", "--eval-split", "val", "--no-timing", "--json", str(rep)]) == 0
    assert calls == []
    r = json.loads(rep.read_text())
    assert r["dense"].get("latency_ms") is None and r["stages"][0]["latency_ms"] is None
    lo, hi = r["stages"][0]["interval"]["perplexity"]
    assert lo < r["stages"][0]["quality"]["perplexity"] < hi
    n = r["stages"][0]["eval_size"]["eval_tokens"]
    assert r["stages"][0]["eval_size"]["eval_split"] == "val" and 256 < n <= 512  # the tokens really scored
    cap = capsys.readouterr()
    assert "95 %" in cap.out and f"{n:,} val tokens" in cap.out and "not timed (--no-timing)" in cap.err


@pytest.mark.parametrize("argv,needle", [
    (["analyze", "--model", "no-such-model-xyz", "--json", "x.json"], "no-such-model-xyz"),
    (["analyze", "--model", "./does/not/exist", "--json", "x.json"], "no such model directory"),
    (["allocate", "--analysis", "missing.json", "--target", "0.3", "--json", "x.json"], "missing.json"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    line = _err_line(capsys)
    assert line.startswith("error:") and needle in line
    assert "Traceback" not in capsys.readouterr().err


def test_bad_numbers_and_files(tiny_dirs, capsys, tmp_path):
    a = tmp_path / "a.json"
    assert main(["analyze", "--model", tiny_dirs["bert"], "--data", tiny_dirs["csv"], "--samples", "8",
                 "--metric", "magnitude_l1", "--json", str(a)]) == 0
    for target in ("1.0", "-0.1", "nan"):
        assert main(["allocate", "--analysis", str(a), "--target", target, "--json", str(tmp_path / "b.json")]) == 2
        assert "target" in _err_line(capsys)
    assert main(["allocate", "--analysis", str(a), "--amplitude", "-1", "--json", str(tmp_path / "b.json")]) == 2
    assert "amplitude" in _err_line(capsys)
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    assert main(["analyze", "--model", str(not_a_model), "--json", str(a)]) == 2
    assert "not a model directory" in _err_line(capsys)
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,sentiment\nhello,1\n")
    assert main(["analyze", "--model", tiny_dirs["bert"], "--data", str(bad), "--json", str(a)]) == 2
    line = _err_line(capsys)
    assert "bad.csv" in line and ("label" in line or "text" in line)
    assert main(["prune", "--model", tiny_dirs["bert"], "--data", tiny_dirs["csv"], "--stages", "0",
                 "--json", str(a)]) == 2
    assert "stages" in _err_line(capsys)


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_files_are_one_line_and_exit_2(tiny_dirs, capsys, tmp_path, case):
    name, content, needle = BAD_FILES[case]
    path = write(tmp_path, name, content)
    assert main(["analyze", "--model", tiny_dirs["bert"], "--data", str(path), "--json", str(tmp_path / "a.json")]) == 2
    line = _err_line(capsys)
    assert line.startswith("error:") and needle.lower() in line.lower(), line
    assert not (tmp_path / "a.json").exists()


def test_an_enormous_data_file_and_long_texts(tiny_dirs, capsys, tmp_path):
    big = write(tmp_path, "big.csv", reviews(3000))
    out = tmp_path / "a.json"
    assert main(["analyze", "--model", tiny_dirs["bert"], "--data", str(big), "--max-data-mb", "0.05",
                 "--json", str(out)]) == 2
    assert "larger than the limit of 51.2 KiB" in _err_line(capsys)
    long = write(tmp_path, "long.csv", reviews(40, words=3000))  # far past the model's 64 positions
    assert main(["analyze", "--model", tiny_dirs["bert"], "--data", str(long), "--samples", "8",
                 "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())["layers"]) == 3


def test_module_entry_point_exit_code():
    p = subprocess.run([sys.executable, "-m", "explorer", "eval", "--model", "definitely/not-here", "--json", "x"],
                       capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "Traceback" not in p.stderr


def test_recipe_for_a_model_without_one_is_a_message(tiny_dirs, tmp_path, capsys):
    code = main(["prune", "--model", tiny_dirs["llama"], "--data", tiny_dirs["txt"], "--recipe",
                 "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "--recipe: there is no recipe for" in err and "smollm2-135m" in err
    assert not (tmp_path / "r.json").exists()


def test_preview_predicts_a_plan_and_search_allocates(tiny_dirs, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLORER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EXPLORER_CACHE", "1")
    base = ["preview", "--model", tiny_dirs["llama"], "--data", tiny_dirs["txt"], "--samples", "8", "--tokens", "128",
            "--seq-len", "16", "--checks", "1", "--target", "0.3"]
    out = tmp_path / "p.json"
    assert main(base + ["--json", str(out)]) == 0
    assert "predicted val perplexity" in capsys.readouterr().err
    d = json.loads(out.read_text())
    assert d["predicted"]["metric"] == "perplexity" and d["predicted"]["quality"] > 1
    assert d["predicted"]["speedup"] > 1 and len(d["plan"]["layers"]) == 3
    assert d["predicted"]["predictor"]["cached"] is False
    out2 = tmp_path / "p2.json"
    assert main(base + ["--manual", "1=0.8", "--json", str(out2)]) == 0  # the cached predictor, another plan
    d2 = json.loads(out2.read_text())
    assert d2["predicted"]["predictor"]["cached"] is True and d2["plan"]["layers"][1]["sparsity"] == 0.8
    assert d2["predicted"]["quality"] != d["predicted"]["quality"]
    capsys.readouterr()
    assert main(base + ["--manual", "7=0.5"]) == 2
    assert "layers 0..2" in _err_line(capsys)
    # allocate --mode search: scored on the real model, so it needs one
    a = tmp_path / "a.json"
    assert main(["analyze", "--model", tiny_dirs["llama"], "--data", tiny_dirs["txt"], "--samples", "8",
                 "--json", str(a)]) == 0
    capsys.readouterr()
    assert main(["allocate", "--analysis", str(a), "--mode", "search", "--json", str(tmp_path / "s.json")]) == 2
    assert "add --model" in _err_line(capsys)
    assert main(["allocate", "--analysis", str(a), "--mode", "search", "--model", tiny_dirs["llama"], "--data",
                 tiny_dirs["txt"], "--generations", "2", "--small", "32", "--large", "64",
                 "--json", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["allocation"]["mode"] == "search" and abs(s["allocation"]["removed_fraction"] - 0.3) < 0.05
    assert "search " in capsys.readouterr().err
