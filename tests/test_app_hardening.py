"""Issue 7 at the UI level: every bad input gives a visible message (a toast and a ⚠️ status
line), the session keeps its model and charts, and the page stays usable; Stop during the
analysis; uploads checked; memory given back when sessions end.

The handlers are called as Gradio calls them, with fake requests, on the tiny BERT of
conftest."""
import gc
import threading
import weakref
from pathlib import Path

import pytest
from transformers import OPTConfig, OPTForCausalLM

import app as A
from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig  # noqa: F401
from ui import handlers as H, views as V  # noqa: F401
from ui.outputs import LoadOut  # noqa: F401
from app_helpers import alloc_args, req, run_all
from bad_inputs import BAD_FILES, reviews, write
from conftest import fail_recovery_at_stage
from explorer.sessions import SessionRegistry


def load_upload(app, model, path, text_col="text", label_col="label"):
    """Load `model` with `path` as the uploaded data file, for session 'a'."""
    return app.on_load(model, "auto", V.MODEL_DEFAULT_DATA, str(path), text_col, label_col, req("a"))


def assert_usable(app, session="a"):
    """The page still works: the allocation redraws and importance can be computed."""
    fig, table, summary, _ = app.on_allocation(*alloc_args(amplitude=0.1), req(session))
    assert "⚠️" not in summary and len(table) == 3
    assert "Importance from" in app.on_importance("taylor", 16, 8, *alloc_args(), req(session))[3]


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_files_are_visible_messages_and_keep_the_model(ready, tiny_dir, tmp_path, case):
    name, content, needle = BAD_FILES[case]
    s = ready.registry.get("a")
    before, imp, figures = s.loaded, s.importance, dict(s.figures)
    out = load_upload(ready, tiny_dir, write(tmp_path, name, content))
    status = out[1]
    assert status.startswith("⚠️ **Load failed, the previous model stays:"), status
    assert needle.lower() in status.lower(), status
    assert all(o == A.gr.skip() for k, o in out._asdict().items() if k not in ("load_status", "model_in"))  # nothing
    assert out.model_in["value"] == before.lm.name  # on the page is replaced; the Model box names the loaded model
    assert s.loaded is before and s.importance is imp and s.figures.keys() == figures.keys()
    assert_usable(ready)


def test_an_upload_over_the_size_limit_is_refused_before_parsing(template, tiny_dir, tmp_path):
    app = A.ExplorerApp(SessionRegistry(template), max_upload_mb=0.01)  # 10 KiB
    big = write(tmp_path, "big.csv", reviews(2000))
    assert big.stat().st_size > 10 * 2**10
    status = load_upload(app, tiny_dir, big)[1]
    assert "Load failed" in status and "is 120.0 KiB, larger than the limit of 10.2 KiB" in status, status


def test_texts_longer_than_the_model_maximum_load_and_analyse(app, tiny_dir, tmp_path):
    long = write(tmp_path, "long.csv", reviews(40, words=2000))  # ~8000 words a text, the model takes 128 tokens
    status = load_upload(app, tiny_dir, long)[1]
    assert status.startswith("Loaded"), status
    assert "Importance from 16" in app.on_importance("taylor", 16, 8, *alloc_args(), req("a"))[3]
    assert "Done" in run_all(app, req("a"), stages=1)[-1][4]


def test_uploads_must_come_from_the_upload_folder_when_local_paths_are_off(template, tiny_csv, tmp_path):
    """A request can name any path as 'the uploaded file'; only Gradio's upload folder is trusted.
    (Local model paths are off too, so the model is the built-in MiniLM with a classification head.)"""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    app = A.ExplorerApp(SessionRegistry(template), allow_local=False, upload_dir=str(uploads))
    for path in ("/etc/passwd", uploads / ".." / "x.csv"):
        status = load_upload(app, "minilm", path)[1]
        assert "must come through the upload box" in status, status
    inside = write(uploads, "ok.csv", Path(tiny_csv).read_text())
    status = app.on_load("minilm", "classification", V.MODEL_DEFAULT_DATA, str(inside), "text", "label", req("a"))[1]
    assert status.startswith("Loaded"), status


@pytest.mark.parametrize("model, needle", [
    ("no-such-org/no-such-model", "could not load"),
    ("/no/such/dir", "no such model directory"),
    ("", "no model given"),
])
def test_bad_model_names_are_visible_messages(ready, model, needle):
    s = ready.registry.get("a")
    before = s.loaded
    status = ready.on_load(model, "auto", V.MODEL_DEFAULT_DATA, None, "text", "label", req("a"))[1]
    assert status.startswith("⚠️ **Load failed") and needle in status, status
    assert s.loaded is before
    assert_usable(ready)


def test_a_directory_that_is_not_a_model_and_an_unsupported_architecture(ready, tmp_path):
    (tmp_path / "notes").mkdir()
    write(tmp_path / "notes", "readme.txt", "hello")
    status = ready.on_load(str(tmp_path / "notes"), "auto", V.MODEL_DEFAULT_DATA, None, "text", "label", req("a"))[1]
    assert "Load failed" in status and "not a model directory" in status, status
    OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                             word_embed_proj_dim=16)).save_pretrained(tmp_path / "opt")
    status = ready.on_load(str(tmp_path / "opt"), "auto", V.MODEL_DEFAULT_DATA, None, "text", "label", req("a"))[1]
    assert "Load failed" in status and "unsupported architecture 'opt'" in status and "LLaMA" in status, status
    assert_usable(ready)


@pytest.mark.parametrize("kw, needle", [
    (dict(target=1.0), "target sparsity must be in [0, 1)"),
    (dict(target=-0.1), "target sparsity must be in [0, 1)"),
    (dict(target="lots"), "target sparsity S_base must be a number, got 'lots'"),
    (dict(amplitude=-0.5), "amplitude A must be in [0, 1]"),
    (dict(amplitude=1e9), "amplitude A must be in [0, 1]"),
    (dict(amplitude="nan"), "amplitude A must be in [0, 1]"),
    (dict(max_sparsity=1.5), "S_max must be in (0, 1)"),
    (dict(round_to=2.5), "round to must be a whole number"),
    (dict(mode="wild"), "unknown allocation mode 'wild'"),
])
def test_bad_allocation_numbers_are_messages_and_the_chart_stays(ready, kw, needle):
    fig, table, summary, _ = ready.on_allocation(*alloc_args(**kw), req("a"))
    assert fig == A.gr.skip() and table == A.gr.skip()  # the last good chart and table stay
    assert summary.startswith("⚠️") and needle in summary, summary
    assert "⚠️" not in ready.on_allocation(*alloc_args(), req("a"))[2]


@pytest.mark.parametrize("text, needle", [("abc", "is not a number"), ("", "is not a number"),
                                          ("1.5", "outside [0, 1)"), ("-0.2", "outside [0, 1)"),
                                          ("nan", "outside [0, 1)"), ("1e400", "outside [0, 1)")])
def test_non_numbers_in_the_table_keep_the_plan(ready, text, needle):
    fig, table, _, _ = ready.on_allocation(*alloc_args(), req("a"))
    before = list(table["sparsity"])
    table["sparsity"] = table["sparsity"].astype(object)  # the browser sends what was typed, as text
    table.loc[1, "sparsity"] = text
    fig2, table2, summary, _ = ready.on_table_edit(table, *alloc_args(), req("a"))
    assert needle in summary and "⚠️" in summary, summary
    assert list(table2["sparsity"]) == before and not ready.registry.get("a").manual


@pytest.mark.parametrize("kw, needle", [
    (dict(stages=0), "stages must be at least 1"),
    (dict(stages=10**6), "stages must be in [1, 100]"),
    (dict(stages="two"), "stages must be a whole number"),
    (dict(steps=-3), "--recovery-steps must be in [0, 100000], got -3"),
    (dict(samples=0), "--samples must be in [1, inf], got 0"),
    (dict(recovery="magic"), "recovery must be one of"),
    (dict(target=0.99, max_sparsity=0.95), "exceeds S_max"),
    (dict(method="no-such-method"), "no-such-method"),
])
def test_bad_run_settings_are_messages_and_keep_the_history(ready, kw, needle):
    s = ready.registry.get("a")
    run_all(ready, req("a"), stages=1)
    history, pruned = list(s.history), s.pruned
    outs = run_all(ready, req("a"), **kw)
    assert len(outs) == 1 and outs[0][4].startswith("⚠️") and needle in outs[0][4], outs[0][4]
    assert all(o == A.gr.skip() for i, o in enumerate(outs[0]) if i != 4)  # charts stay
    assert s.history == history and s.pruned is pruned


@pytest.mark.parametrize("samples, batch, needle", [(0, 8, "--samples must be in [1, inf], got 0"),
                                                    (16, 0, "--batch-size must be in [1, inf], got 0"),
                                                    ("x", 8, "calibration samples must be a whole number, got 'x'")])
def test_bad_analysis_settings_keep_the_last_importance(ready, samples, batch, needle):
    s = ready.registry.get("a")
    imp = s.importance
    out = ready.on_importance("taylor", samples, batch, *alloc_args(), req("a"))
    assert out[3].startswith("⚠️") and needle in out[3], out[3]
    assert s.importance is imp and all(o == A.gr.skip() for i, o in enumerate(out) if i != 3)


def test_stop_during_the_importance_analysis(ready):
    """Stop pressed while the analysis runs (here: from its progress callback, at the first
    batch): the analysis ends at its next check and the previous importance stays."""
    s = ready.registry.get("a")
    imp = s.importance
    said = []

    def progress(value, desc=""):
        if isinstance(value, tuple) and not said:  # the first calibration batch is done
            said.append(ready.on_stop(req("a")))
    out = ready.on_importance("taylor", 64, 4, *alloc_args(), req("a"), progress=progress)
    assert said == ["Stopping the importance analysis after the current batch…"]
    assert out[3] == "Stopped: the analysis was cancelled; the previous importance and allocation stay.", out[3]
    assert s.importance is imp and all(o == A.gr.skip() for i, o in enumerate(out) if i != 3)
    assert ready.on_stop(req("a")) == "Nothing is running."
    assert "Importance from" in ready.on_importance("taylor", 16, 8, *alloc_args(), req("a"))[3]  # not stuck


def test_stop_from_another_thread_ends_a_run_and_frees_the_session(ready):
    s = ready.registry.get("a")
    started = threading.Event()
    outs = []

    def run():
        for o in ready.on_run(4, "full", 200, "adaptive", "taylor", 16, 0, False, *alloc_args(), req("a")):
            outs.append(o)
            started.set()
    t = threading.Thread(target=run)
    t.start()
    assert started.wait(60)
    assert ready.on_stop(req("a")).startswith("Stopping after the current step")
    t.join(120)
    assert not t.is_alive() and "Stopped" in outs[-1][4], outs[-1][4]
    assert s.job == "" and len(s.history) == 1


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def test_memory_does_not_grow_across_20_sequential_sessions(template):
    """Each session analyses the shared model, prunes a copy, exports it, then its page closes.
    Every model of a closed session is freed (weak references die) and the process does not grow."""
    app = A.ExplorerApp(SessionRegistry(template))
    refs, rss = [], []
    for i in range(20):
        r = req(f"visitor-{i}")
        assert app.on_page_load(r)[1] == "Ready."
        assert "Importance from" in app.on_importance("taylor", 16, 8, *alloc_args(), r)[3]
        assert "Done" in run_all(app, r, stages=1)[-1][4]
        assert "-run1-adaptive-" in app.on_export(r)[1]
        s = app.registry.get(r.session_hash)
        assert s.loaded is template  # shared, not copied
        refs += [weakref.ref(s.pruned.model), weakref.ref(s)]
        workdir = s.workdir
        del s
        app.on_unload(r)
        assert not workdir.exists()
        gc.collect()
        rss.append(rss_mb())
    assert len(app.registry) == 0
    alive = [ref for ref in refs if ref() is not None]
    assert not alive, f"{len(alive)} models or sessions of closed sessions are still in memory"
    per_session = template.lm.n_params * 4 / 2**20 * 2  # a run's copy and its pruned model, in MiB
    growth = rss[-1] - rss[4]  # after warm-up (allocator pools, lazy imports)
    assert growth < 5 * per_session, f"RSS grew {growth:.0f} MiB over 15 sessions ({per_session:.1f} MiB per session)"


def test_an_exception_in_stage_2_keeps_stage_1_its_charts_and_its_report(ready, monkeypatch):
    fail_recovery_at_stage(monkeypatch, 2, "simulated failure in recovery")
    outs = run_all(ready, req("a"), stages=3)
    last = outs[-1]
    quality, table, status, history = last.quality_plot, last.stages_table, last.run_status, last.history_plot
    assert status.startswith("⚠️") and "simulated failure in recovery" in status and "after stage 1" in status, status
    stages = next(t for t in quality.data if t.name == "stages")
    assert list(stages.text) == ["", "stage 1"]  # the dense point and the one completed stage
    assert list(table["model"]) == ["dense", "stage 1"] and history.data
    s = ready.registry.get("a")
    assert s.pruned is not None and s.pruned.n_params < s.loaded.lm.n_params
    files, status = ready.on_export(req("a"))
    assert {Path(f).suffix for f in files} == {".html", ".json", ".csv", ".zip"} and len(files) == 4, status


def test_stop_says_when_a_job_cannot_be_stopped(app):
    s = app.registry.get("a")
    with s.busy("loading minilm"):
        assert app.on_stop(req("a")) == "Loading minilm cannot be stopped; it finishes on its own."
    assert app.on_stop(req("a")) == "Nothing is running."


def test_two_sessions_run_at_the_same_time_without_touching_each_other(ready):
    """Two sessions prune concurrently (as two of Gradio's workers would run them): each ends
    with its own run in its own history, at its own target."""
    assert "Importance from" in ready.on_importance("taylor", 16, 8, *alloc_args(), req("b"))[3]
    results = {}

    def run(name, target):
        results[name] = run_all(ready, req(name), stages=2, target=target)[-1][4]
    threads = [threading.Thread(target=run, args=("a", 0.2)), threading.Thread(target=run, args=("b", 0.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r.startswith("Done: 2 stage(s)") for r in results.values()), results
    a, b = ready.registry.get("a"), ready.registry.get("b")
    assert len(a.history) == len(b.history) == 1
    assert a.history[0]["stages"][-1]["removed_fraction"] == pytest.approx(0.2, abs=0.02)
    assert b.history[0]["stages"][-1]["removed_fraction"] == pytest.approx(0.5, abs=0.02)
    assert a.pruned.model is not b.pruned.model and a.loaded.lm.n_params == b.loaded.lm.n_params
