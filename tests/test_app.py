"""The UI's handlers called directly (no browser, no server) with fake requests.

A tiny BERT classifier (conftest's `tiny_dir`: saved with the bundled MiniLM tokenizer)
keeps every step fast; one test loads the real bundled MiniLM encoder through the Load
handler."""
import re
import statistics
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import app as A
from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig  # noqa: F401
from ui import handlers as H, views as V  # noqa: F401
from ui.outputs import LoadOut  # noqa: F401
from app_helpers import alloc, alloc_args, req, run_all
from ui.settings import AdvancedSettings
from explorer.models import load_model
from explorer.sessions import SessionRegistry


def test_new_session_starts_on_the_preloaded_model(app, template):
    summary, status = app.on_page_load(req("a"))
    assert status == "Ready." and "| layers | 3 |" in summary and "accuracy" in summary
    s = app.registry.get("a")
    assert s.loaded is template  # shared by every session that has not loaded another model: no copy


def test_sessions_share_the_preloaded_model_and_never_change_it(app, template):
    """Copy on write: analysis and runs of two sessions leave the shared dense weights bit-identical."""
    before = {k: v.clone() for k, v in template.lm.model.state_dict().items()}
    for name in ("a", "b"):
        assert "Importance from" in app.on_importance("taylor", 16, 8, *alloc_args(), req(name)).imp_status
        assert run_all(app, req(name), stages=1, recovery="full", steps=2)[-1].run_status.startswith("Done")
        app.on_generate("a fine film", 4, 0, req(name))
    after = template.lm.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in template.lm.model.parameters())
    assert app.registry.get("a").pruned is not app.registry.get("b").pruned


def test_load_bundled_minilm_encoder(app):
    out = app.on_load("minilm", "encoder", V.MODEL_DEFAULT_DATA, None, "text", "label", req("a"))
    summary, status, metric, recovery = out[:4]
    assert "Loaded `minilm`" in status, status
    assert "| layers | 6 |" in summary and "1536" in summary and "12, head size 32" in summary
    assert metric["value"] == "magnitude_l1" and recovery["value"] == "reconstruct"  # no head: no gradients, no training
    assert len(out) == len(LoadOut._fields)
    assert app.registry.get("a").loaded.lm.task == "encoder"


@pytest.mark.parametrize("name, message", [("/no/such/model", "no such model directory"),
                                           ("not-a-model-anywhere", "could not load")])
def test_failed_load_keeps_the_previous_model(ready, name, message):
    s = ready.registry.get("a")
    before, imp = s.loaded, s.importance
    out = ready.on_load(name, "auto", V.MODEL_DEFAULT_DATA, None, "text", "label", req("a"))
    assert "Load failed, the previous model stays" in out[1] and message in out[1]
    assert out[1].startswith("⚠️") and f"(loaded: `{before.lm.name}`)" in out[1]  # visible, naming what is loaded
    assert out.model_in["value"] == before.lm.name  # the Model box names the loaded model again, not the bad name
    assert all(o == A.gr.skip() for k, o in out._asdict().items() if k not in ("load_status", "model_in"))
    assert s.loaded is before and s.importance is imp


def test_local_paths_can_be_refused(template, tiny_dir, tmp_path):
    app = A.ExplorerApp(SessionRegistry(template), allow_local=False)
    out = app.on_load(tiny_dir, "auto", V.MODEL_DEFAULT_DATA, None, "text", "label", req("a"))
    assert "disabled" in out[1]
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"review {i},{i % 2}\n" for i in range(30)))
    out = app.on_load("minilm", "classification", str(csv), None, "text", "label", req("a"))
    assert "local data paths are disabled" in out[1]


def test_uploaded_csv_with_custom_columns(app, tiny_dir, tmp_path):
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,stars\n" + "".join(f"this film is {'good' if i % 2 else 'bad'} {i},{i % 2}\n" for i in range(40)))
    out = app.on_load(tiny_dir, "auto", V.MODEL_DEFAULT_DATA, str(csv), "review", "stars", req("a"))
    assert out[1].startswith("Loaded"), out[1]
    assert "reviews.csv" in out[0] and "2 classes" in out[0]
    bad = app.on_load(tiny_dir, "auto", V.MODEL_DEFAULT_DATA, str(csv), "text", "stars", req("a"))
    assert "Load failed" in bad[1] and "text" in bad[1]


def test_importance_fills_plots_and_allocation(app):
    out = app.on_importance("fisher", 16, 8, *alloc_args(), req("a"))
    layer, heads, neurons, status, alloc_fig, table, summary, _ = out  # the last: the predicted-quality chart
    assert "metric `fisher`" in status
    assert len(layer.data[0].y) == 3
    assert len(heads.data[0].z) == 3 and len(heads.data[0].z[0]) == 4  # layers x query heads
    assert len(neurons.data[0].z[0]) == 64  # 64 neurons -> 64 bins
    assert list(table["layer"]) == [0, 1, 2] and "Adaptive" in summary


def test_unexpected_errors_are_one_line_messages(app, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("something broke\nTraceback (most recent call last): ...")
    monkeypatch.setattr(H, "analyze", boom)
    status = app.on_importance("taylor", 16, 8, *alloc_args(), req("a"))[3]
    assert status.startswith("⚠️") and "internal error: RuntimeError: something broke" in status
    monkeypatch.setattr(H, "analyze", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")))
    assert "out of GPU memory" in app.on_importance("taylor", 16, 8, *alloc_args(), req("a"))[3]
    assert app.registry.get("a").importance is None


def test_allocation_redraw_follows_amplitude_and_is_fast(ready):
    flat = ready.on_allocation(*alloc_args(amplitude=0.0), req("a"))[0]
    steep = ready.on_allocation(*alloc_args(amplitude=0.4), req("a"))[0]
    assert list(flat.data[0].y) == pytest.approx(list(flat.data[1].y))  # A = 0 is uniform
    assert list(steep.data[0].y) != pytest.approx(list(flat.data[0].y))
    times = []
    for a in (0.1, 0.2, 0.3, 0.4, 0.5):
        t = time.perf_counter()
        ready.on_allocation(*alloc_args(amplitude=a), req("a"))
        times.append(time.perf_counter() - t)
    assert statistics.median(times) < 0.1, times


def test_a_metric_without_a_common_scale_gets_the_proportional_split(app):
    out = app.on_importance("magnitude_l1", 16, 8, *alloc_args(), req("a"))
    assert "Split: proportional, because `magnitude_l1` scores are not losses" in out[6]
    assert "Split: proportional" not in app.on_allocation(*alloc_args(split="proportional"), req("a"))[2]
    assert app.registry.get("a").allocation.split == "proportional"


def test_allocation_before_importance_says_what_to_do(app):
    fig, table, summary, _ = app.on_allocation(*alloc_args(), req("fresh"))
    assert "Compute importance first" in summary and table.empty


def test_a_repeated_stale_edit_event_is_ignored(ready):
    """The browser fires `input` twice for one cell edit; the second copy predates the
    server's redistribution and must not turn every other layer into a hand-set one."""
    _, table, _, _ = ready.on_allocation(*alloc_args(), req("a"))
    t = table.astype(object)
    t.loc[1, "sparsity"] = "0.6"
    ready.on_table_edit(t, *alloc_args(), req("a"))
    assert ready.on_table_edit(t, *alloc_args(), req("a")) == (A.gr.skip(),) * 4
    assert ready.registry.get("a").manual == {1: 0.6}


def test_clipping_is_flagged(ready):
    fig, table, summary, _ = ready.on_allocation(*alloc_args(target=0.1, amplitude=0.5), req("a"))
    assert "Clipped" in summary and "clipped" in list(table["note"])
    assert "clipped" in [t.name for t in fig.data]


def test_bad_table_input_gives_a_message_not_a_crash(ready):
    _, table, _, _ = ready.on_allocation(*alloc_args(), req("a"))
    for bad, message in (("abc", "not a number"), ("1.5", "outside [0, 1)"), ("", "not a number")):
        t = table.astype(object)
        t.loc[1, "sparsity"] = bad
        fig, new_table, summary, _ = ready.on_table_edit(t, *alloc_args(), req("a"))
        assert message in summary, summary
        assert ready.registry.get("a").manual == {}
        assert new_table["sparsity"].tolist() == table["sparsity"].tolist()  # the table is restored
    assert "rows were added" in ready.on_table_edit(table.iloc[:2], *alloc_args(), req("a"))[2]


def test_table_edit_sets_a_layer_by_hand_and_the_chart_follows(ready):
    _, table, _, _ = ready.on_allocation(*alloc_args(), req("a"))
    t = table.copy()
    t.loc[0, "sparsity"] = 0.6
    fig, new_table, summary, _ = ready.on_table_edit(t, *alloc_args(), req("a"))
    assert ready.registry.get("a").manual == {0: 0.6}
    assert fig.data[0].y[0] == pytest.approx(0.6) and "set by hand" in [d.name for d in fig.data]
    assert new_table.loc[0, "note"] == "set by hand" and "Set by hand: layer(s) 0" in summary
    moved, moved_table, _, _ = ready.on_allocation(*alloc_args(amplitude=0.3), req("a"))  # a slider move keeps it
    assert moved.data[0].y[0] == pytest.approx(0.6)
    t2 = moved_table.astype(object)
    t2.loc[1, "sparsity"] = "40%"
    ready.on_table_edit(t2, *alloc_args(amplitude=0.3), req("a"))
    assert ready.registry.get("a").manual == {0: 0.6, 1: 0.4}
    ready.on_reset_manual(*alloc_args(), req("a"))
    assert ready.registry.get("a").manual == {}


def test_run_streams_stages_then_history(ready):
    outs = run_all(ready, req("a"), stages=2)
    statuses = [o[4] for o in outs if isinstance(o[4], str)]
    assert statuses[0].startswith("Measuring the dense model (8 val examples, no timing")  # the tiny val split
    assert statuses[1].startswith("Dense model measured") and statuses[-1].startswith("Done: 2 stage(s)")
    assert "Stage 2/2: evaluating (8 val examples" in " ".join(statuses)
    last = outs[-1]
    quality, cost, table, history = last.quality_plot, last.cost_plot, last.stages_table, last.history_plot
    assert list(quality.data[1].text) == ["", "stage 1", "stage 2"]
    assert list(table["model"]) == ["dense", "stage 1", "stage 2"]
    assert list(cost.data[0].x) == ["dense", "stage 1", "stage 2"]
    assert [t.name for t in history.data] == ["#1 exact A=0.05, S=0.3, K=2, none, seed 0"]
    s = ready.registry.get("a")
    assert s.pruned is not None and s.pruned.block_params < s.loaded.lm.block_params  # the dense model stays
    outs = run_all(ready, req("a"), stages=1, mode="uniform")  # a second run overlays the first
    assert outs[0].run_status.startswith("Dense model measurement reused")  # measured once per model and settings
    assert [t.name for t in outs[-1].history_plot.data] == ["#1 exact A=0.05, S=0.3, K=2, none, seed 0",
                                                            "#2 uniform, S=0.3, K=1, none, seed 0"]


def test_run_with_recovery_streams_the_loss(ready):
    outs = run_all(ready, req("a"), stages=1, recovery="full", steps=3)
    loss_figs = [o.loss_plot for o in outs if hasattr(o.loss_plot, "data")]
    assert loss_figs and len(loss_figs[-1].data[0].y) == 3


def test_hand_edits_of_the_table_are_the_plan_the_run_prunes_to(ready):
    table = ready.on_allocation(*alloc_args(), req("a")).alloc_table
    t = table.copy()
    t.loc[2, "sparsity"] = 0.0
    ready.on_table_edit(t, *alloc_args(), req("a"))
    assert "table (1 layer(s) set by hand: 2" in ready.on_prune_plan("adaptive", alloc(), req("a"))
    outs = run_all(ready, req("a"), stages=1)
    assert "table (1 layer(s) by hand)" in ready.registry.get("a").history[-1]["label"], outs[-1].run_status
    widths = ready.registry.get("a").pruned.summary()
    assert widths["ffn"][2] == 64 and widths["heads"][2] == 4  # layer 2 kept whole, as set by hand


def test_stop_keeps_the_last_completed_stage(ready):
    gen = ready.on_run(3, "none", 0, "adaptive", "taylor", 16, 0, False, alloc(), req("a"))
    outs = []
    for o in gen:
        outs.append(o)
        if isinstance(o[4], str) and o[4].startswith("Stage 1/3 done"):
            assert ready.on_stop(req("a")).startswith("Stopping")
    assert outs[-1][4] == "Stopped: kept the model after stage 1."
    s = ready.registry.get("a")
    assert len(s.history[-1]["stages"]) == 1 and s.history[-1]["status"] == "stopped"
    assert s.pruned is not None
    assert ready.on_stop(req("a")) == "Nothing is running."


def test_a_busy_session_refuses_a_second_job(ready):
    gen = ready.on_run(1, "none", 0, "adaptive", "taylor", 16, 0, False, alloc(), req("a"))
    next(gen)  # the run holds the session now
    out = ready.on_importance("taylor", 16, 8, *alloc_args(), req("a"))
    assert "wait until the pruning run has finished" in out[3]
    assert ready.on_allocation(*alloc_args(amplitude=0.2), req("a"))[0].data  # a redraw still works
    gen.close()
    assert "Importance from" in ready.on_importance("taylor", 16, 8, *alloc_args(), req("a"))[3]


def test_run_errors_are_messages(ready):
    assert "stages must be at least 1" in run_all(ready, req("a"), stages=0)[-1][4]


def test_two_sessions_do_not_share_state(ready):
    a, b = ready.registry.get("a"), ready.registry.get("b")
    assert a.loaded.lm.model is b.loaded.lm.model  # the dense model is shared read-only; nothing else is
    assert a.importance is not None and b.importance is None
    params_b = b.loaded.lm.n_params
    run_all(ready, req("a"), stages=1)
    assert b.loaded.lm.n_params == params_b and b.pruned is None and not b.history
    assert "Compute importance first" in ready.on_allocation(*alloc_args(), req("b"))[2]
    ready.on_stop(req("b"))
    assert a.history and a.run.status == "done"


def test_export_writes_model_zip_reports_and_charts(ready):
    files, status = ready.on_export(req("a"))
    assert [Path(f).name for f in files] == ["charts.html"] and "Missing: report" in status
    run_all(ready, req("a"), stages=1)
    files, status = ready.on_export(req("a"))
    got = {Path(f).name: Path(f) for f in files}
    zname = next(n for n in got if n.endswith(".zip"))
    assert zname.startswith("tiny-bert") and zname.endswith("-run1-adaptive-S0.3.zip")  # model, run, method, budget
    assert set(got) == {"charts.html", "report.json", "report.csv", zname}, status
    with zipfile.ZipFile(got[zname]) as z:
        names = z.namelist()
        z.extractall(got[zname].parent / "unzipped")
    stem = zname[:-4]
    assert f"{stem}/explorer_plan.json" in names and f"{stem}/README.md" in names
    assert any(n.endswith(".safetensors") for n in names)
    reloaded = load_model(str(got[zname].parent / "unzipped" / stem))
    assert reloaded.summary()["ffn"] == ready.registry.get("a").pruned.summary()["ffn"]  # it loads back
    csv = pd.read_csv(got["report.csv"])
    assert list(csv["model"]) == ["dense", "stage 1"]
    html = got["charts.html"].read_text()
    assert "layer importance" in html and "quality" in html
    # where the exported model runs, said in the Export tab as in its card (explorer.deploy): a BERT runs in
    # ONNX Runtime and with transformers, never in llama.cpp (LLaMA family only)
    assert re.search(r"\*\*Where the model of run #\d[^'*]*runs\*\*", status), status  # one label, no stray quotes
    assert "ONNX Runtime" in status
    assert re.search(r"\| llama\.cpp[^|]*\| no \|", status), status


def test_unload_drops_the_session_and_its_files(ready):
    ready.on_export(req("a"))
    workdir = ready.registry.get("a").workdir
    assert workdir.exists()
    ready.on_unload(req("a"))
    assert "a" not in ready.registry and not workdir.exists()


def test_cli_defaults_and_local_path_policy():
    args = A.parse_args([])
    assert (args.host, args.port, args.model, args.data, args.share) == ("127.0.0.1", 7860, "minilm-rt", None, False)
    assert A.allow_local_paths(args) is True
    assert (args.trust_remote_code, args.allow_pickle, args.max_upload_mb) == (False, False, V.MAX_UPLOAD_MB)
    assert A.allow_local_paths(A.parse_args(["--host", "0.0.0.0"])) is False
    assert A.allow_local_paths(A.parse_args(["--share"])) is False
    assert A.allow_local_paths(A.parse_args(["--host", "0.0.0.0", "--allow-local-paths"])) is True
    assert A.allow_local_paths(A.parse_args(["--no-allow-local-paths"])) is False


@pytest.mark.parametrize("method", ["layer-drop", "magnitude"])
def test_other_methods_run_from_the_ui(ready, method):
    """Methods from the design documents stream into the same charts and history."""
    outs = run_all(ready, req("methods-" + method), method=method, stages=1)
    status = outs[-1][4]
    assert "Done" in status, status
    s = ready.registry.get("methods-" + method)
    rep = s.history[-1]
    assert rep["method"] == method and len(rep["stages"]) == 1 and rep["status"] == "done"
    last = outs[-1]
    assert list(last.stages_table["model"]) == ["dense", "stage 1"]  # the stage table and the charts: its stage
    assert list(last.cost_plot.data[0].x) == ["dense", "stage 1"]
    assert [t.name for t in last.history_plot.data] == [rep["label"]]
    dense, pruned = s.loaded.lm, s.pruned
    if method == "layer-drop":  # whole blocks gone: a shallower model
        assert len(pruned.adapter.layers(pruned.model)) < len(dense.adapter.layers(dense.model))
        assert pruned.block_params < dense.block_params
    else:  # masks: the same shapes with the smallest block weights at zero
        from explorer.methods.base import block_linear_weights
        assert pruned.n_params == dense.n_params
        ws = [w for block in block_linear_weights(pruned) for _, w, _ in block]
        zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
        assert zeros > 0.1 and zeros == pytest.approx(rep["stages"][0]["extra"]["sparsity_reached"], abs=0.05)


def test_advanced_settings_reach_the_run_and_its_label(ready):
    """The Advanced accordion (generated from the config dataclasses) sets any field of the run."""
    from dataclasses import replace
    values = AdvancedSettings(lora_rank=4, seed=3, prune_attention=False)
    outs = list(ready.on_run(1, "lora", 2, "adaptive", "taylor", 16, 0, False, alloc(), req("a"), values))
    assert outs[-1][4].startswith("Done"), outs[-1][4]
    rep = ready.registry.get("a").history[-1]
    assert rep["config"]["prune"]["lora_rank"] == 4 and rep["config"]["prune"]["seed"] == 3
    assert rep["config"]["allocation"]["prune_attention"] is False
    assert rep["label"].endswith("lora 2 steps, seed 3, lora_rank=4, prune_attention=False"), rep["label"]
    assert ready.registry.get("a").pruned.summary()["kv_groups"] == [4, 4, 4]  # attention left whole
    bad = replace(values, lr="fast")
    out = list(ready.on_run(1, "lora", 2, "adaptive", "taylor", 16, 0, False, alloc(), req("a"), bad))[-1]
    assert out[4].startswith("⚠️") and "lr" in out[4]


def test_method_options_reach_the_chosen_method_only(ready):
    """The Method options controls (generated from explorer.config.METHOD_OPTIONS) set the chosen
    method's options; another method's controls are ignored; the label names what differs."""
    opts = AdvancedSettings(pre_fraction=0.25, trials="many")  # trials: another method's, never read
    outs = list(ready.on_run(1, "none", 4, "lora-prune-ft", "taylor", 16, 0, False, alloc(), req("a"), opts))
    assert outs[-1][4].startswith("Done"), outs[-1][4]
    rep = ready.registry.get("a").history[-1]
    assert (rep["summary"]["pipeline"]["lora_steps_dense"], rep["summary"]["pipeline"]["lora_steps_pruned"]) == (1, 3)
    assert rep["label"].endswith("pre_fraction=0.25"), rep["label"]


def test_adapruner_streams_its_search_curve(ready):
    """Each trial of AdaPruner's search redraws the search curve (best objective against trial)."""
    opts = AdvancedSettings(trials=3, subsets=2)
    outs = list(ready.on_run(1, "none", 0, "adapruner", "taylor", 16, 0, False, alloc(), req("a"), opts))
    assert outs[-1].run_status.startswith("Done"), outs[-1].run_status
    curves = [c for c in (o.search_plot for o in outs) if hasattr(c, "data")]
    assert len(curves) == 3 and "after 3 trials" in curves[-1].layout.title.text
    assert [len(c.data[0].x) for c in curves] == [1, 2, 3]


def test_runs_are_judged_on_val_and_test_is_asked_for(ready):
    """Tuning never sees test: runs (and the load's dense figure) use val; one button gives test."""
    assert "on 8 val examples" in V.model_summary(ready.registry.get("a").loaded)  # the tiny split's real size
    assert "no pruned model of this model yet" in ready.on_test(req("a"))
    outs = run_all(ready, req("a"), stages=1)
    table = outs[-1][3]
    assert "accuracy (val)" in table.columns
    rep = ready.registry.get("a").history[-1]
    assert rep["eval_split"] == "val" and "(val)" in outs[-1][0].layout.title.text
    status = ready.on_test(req("a"))
    assert status.startswith("**Test** (16 examples, the whole split)"), status
    assert set(rep["test"]) == {"dense", "final"} and rep["test"]["final"]["eval_split"] == "test"


def test_load_keeps_the_run_history_and_the_pruned_model(ready, tiny_dir, tiny_csv):
    run_all(ready, req("a"), stages=1)
    s = ready.registry.get("a")
    pruned = s.pruned
    out = ready.on_load(tiny_dir, "auto", tiny_csv, None, "text", "label", req("a"))
    assert out[1].startswith("Loaded")
    assert len(s.history) == 1 and s.pruned is pruned and s.importance is None  # work kept; analysis anew
    files, status = ready.on_export(req("a"))
    assert any(f.endswith(".zip") for f in files), status  # the earlier run can still be exported
    run_all(ready, req("a"), stages=1, mode="uniform")
    assert [r["label"].split()[0] for r in s.history] == ["#1", "#2"]  # labels stay unique across loads


def test_export_picks_a_run_and_keeps_only_the_last_runs_models(ready):
    from explorer.sessions import KEEP_RUNS
    s = ready.registry.get("a")
    for target in (0.2, 0.3, 0.4, 0.5):
        run_all(ready, req("a"), stages=1, target=target)
    labels = [r["label"] for r in s.history]
    assert list(s.kept) == labels[-KEEP_RUNS:] and s.pruned is s.kept[labels[-1]]
    assert all(m.device.type == "cpu" for m in s.kept.values())
    tab = ready.on_export_tab(req("a"))
    assert tab["choices"] == labels[-KEEP_RUNS:] and tab["value"] == labels[-1]
    files, status = ready.on_export(req("a"), [V.EXPORT_ZIP], labels[-2])  # the second-to-last run
    assert any(f.endswith("-run3-adaptive-S0.4.zip") for f in files), (files, status)
    files, status = ready.on_export(req("a"), [V.EXPORT_ZIP], labels[0])
    assert files == [] and "no longer kept" in status


def test_prune_tab_states_the_plan_it_will_run(ready):
    line = ready.on_prune_plan("adaptive", alloc(normalization="rank"), req("a"))
    assert "S_base = 0.3, A = 0.05, exact mode, Î_L normalised by rank" in line and "salience split" in line
    uniform = ready.on_prune_plan("adaptive", *alloc_args(mode="uniform"), req("a"))
    assert "uniform, S_L = S_base = 0.3" in uniform  # uniform is chosen in one place: the Allocation mode
    assert "method **apt**" in ready.on_prune_plan("apt", alloc(), req("a"))
    assert "must be a number" in ready.on_prune_plan("adaptive", *alloc_args(target="x"), req("a"))
    assert "uniform" not in A.PRUNE_METHODS


def test_latency_spread_is_shown_and_flagged():
    assert V.spread_text(0.1) == "±5%" and V.spread_text(None) is None
    assert V.spread_text(0.6) == "±30% ⚠ busy machine"
    rows = [{"model": "dense", "params": 1e6, "removed_fraction": 0.0, "quality": 0.8, "latency_ms": 10.0,
             "latency_spread": 0.6, "flops_per_token": 1e6, "last_loss": None, "seconds": None}]
    table = V.stage_table(rows, "accuracy", "val")
    assert table["latency spread"].tolist() == ["±30% ⚠ busy machine"]


def _tiny_cost_model(lm):
    """A synthetic latency cost model for the tiny model's shape (nothing is timed)."""
    from explorer.latency import CostModel, monotone
    b = lm.adapter.block(lm.model, 0)
    g, n = np.meshgrid([1.0, b.attn.n_units], [1.0, b.mlp.n_units], indexing="ij")
    raw = 1.0 + 0.5 * g + 0.02 * n  # (G, N) ms
    sig = {"mode": "forward", "batch_size": 32, "seq_len": 128, "device": "cpu (test)"}
    return CostModel(sig, [1, b.attn.n_units], [1, b.mlp.n_units], monotone(raw).tolist(), 0.5, raw.tolist(),
                     measured_at="2026-12-02T00:00:00+00:00")


def test_allocation_tab_budgets_flops_and_latency_with_predicted_speedup(ready):
    """The budget selector: a FLOPs cut, and a latency goal met on the cost model's prediction, shown as
    the sliders move; the run uses the app's cost model (measured once per model) and reports it."""
    s = ready.registry.get("a")
    flops = ready.on_allocation(alloc(budget="flops", speedup=0), req("a"))
    assert "Budget **flops**" in flops.alloc_md and "(70% of dense)" in flops.alloc_md, flops.alloc_md
    assert "predicted speed-up" not in flops.alloc_md  # no cost model measured yet
    s.loaded.costs["latency"] = cost = _tiny_cost_model(s.loaded.lm)
    out = ready.on_allocation(alloc(budget="latency", speedup=1.5), req("a"))
    assert "Budget **latency**" in out.alloc_md and "latency cost model of this device" in out.alloc_md
    assert s.allocation.budget == "latency" and s.allocation.cost["predicted_speedup"] >= 1.5
    assert V.predicted_speedup(cost, s.allocation) == pytest.approx(s.allocation.cost["predicted_speedup"])
    assert "predicted speed-up **×" in ready.on_allocation(*alloc_args(), req("a")).alloc_md  # shown for params too
    assert "predicted speed-up is ×1.5" in ready.on_prune_plan("adaptive", alloc(budget="latency", speedup=1.5),
                                                                req("a"))
    outs = list(ready.on_run(1, "none", 0, "adaptive", "taylor", 16, 0, False, alloc(budget="latency", speedup=1.5),
                             req("a")))
    assert outs[-1].run_status.startswith("Done"), outs[-1].run_status
    rep = s.history[-1]
    assert "×1.5 latency" in rep["label"] and rep["stages"][-1]["predicted_speedup"] >= 1.5 - 1e-9
    assert s.loaded.costs["latency"] is cost  # not measured again
    bad = ready.on_allocation(alloc(budget="wall-clock", speedup=2), req("a"))
    assert "budget must be one of params, flops, latency" in bad.alloc_md


# --- issue 26 item 6: the app says only what is so; issue 24 item 4: evaluation the user can size ------------

def _export_card(app, session="a") -> tuple[str, dict, "pd.DataFrame"]:
    """Export the last run: (the model card README.md, report.json, report.csv)."""
    import json
    files, status = app.on_export(req(session))
    got = {Path(f).name: Path(f) for f in files}
    zpath = next(p for n, p in got.items() if n.endswith(".zip"))
    with zipfile.ZipFile(zpath) as z:
        card = z.read(next(n for n in z.namelist() if n.endswith("/README.md"))).decode()
    return card, json.loads(got["report.json"].read_text()), pd.read_csv(got["report.csv"])


def test_model_card_labels_the_val_figures_it_has(ready):
    """The app judges runs on val and never evaluates test unless asked: the exported card says val."""
    run_all(ready, req("a"), stages=1)
    card, report, _ = _export_card(ready)
    assert report["last_run"]["eval_split"] == "val"
    assert "accuracy (val split)" in card and "accuracy (test" not in card and "test split" not in card


def test_one_latency_per_model_measured_once_and_quoted_everywhere(ready, monkeypatch):
    """A timed run: the dense model's 32 x 128 latency is measured once per loaded model (a second timed run
    at another evaluation size reuses it) and the stage table, the report, the CSV and the model card quote
    the same single figure per model (no second 32 x 128 measurement beside it)."""
    from explorer import evaluate as E
    calls = []
    real = E.latency
    monkeypatch.setattr(E, "latency", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = run_all(ready, req("a"), stages=1, timing=True)
    assert first[-1].run_status.startswith("Done"), first[-1].run_status
    assert len(calls) == 2  # the dense model, then the stage
    second = run_all(ready, req("a"), stages=1, timing=True, eval_n=4)
    statuses = " ".join(o.run_status for o in second if isinstance(o.run_status, str))
    assert len(calls) == 3, statuses  # only the new stage: the dense timing is reused
    assert "its timing was measured once for this loaded model and is reused" in statuses
    assert "Dense model quality measured, timing reused" in statuses
    s = ready.registry.get("a")
    d1, d2 = s.history[0]["dense"], s.history[1]["dense"]
    assert d1["latency_ms"] == d2["latency_ms"] and d2["eval_examples"] == 4
    table = second[-1].stages_table
    assert table["latency (ms, 32×128)"].tolist()[0] == round(d2["latency_ms"], 1)
    card, report, csv = _export_card(ready)
    lat_rows = [line for line in card.splitlines() if "32 x 128" in line]
    assert len(lat_rows) == 1, lat_rows  # one 32 x 128 latency per model
    dense_ms, final_ms = report["last_run"]["dense"]["latency_ms"], report["last_run"]["final"]["latency_ms"]
    cells = [c.strip() for c in lat_rows[0].split("|")[1:-1]]
    assert [float(c) for c in cells[1:]] == pytest.approx([dense_ms, final_ms], abs=0.01)
    assert "latency_b32x128_ms" not in csv.columns
    assert csv["latency_ms"].tolist()[-2:] == pytest.approx([dense_ms, final_ms])


def test_reconstruct_runs_fill_after_reconstruction_and_show_the_refit(ready):
    """Recovery reconstruct (no training): the stage table's "after reconstruction" column holds the
    reconstructed model's figure, and the Recovery chart shows the closed-form refit per layer instead of
    "no recovery steps"."""
    outs = run_all(ready, req("a"), stages=2, recovery="reconstruct")
    last = outs[-1]
    assert last.run_status.startswith("Done"), last.run_status
    table = last.stages_table
    stages = table[table["model"] != "dense"]
    assert stages["after reconstruction"].notna().all()
    assert stages["after reconstruction"].tolist() == stages["accuracy (val)"].tolist()
    loss = next(o.loss_plot for o in reversed(outs) if hasattr(o.loss_plot, "layout"))
    title = loss.layout.title.text
    assert title.startswith("Reconstruction: closed-form refit, no training steps"), title
    assert "stage 2:" in title and "of the plain cut's error left" in title
    assert [t.name for t in loss.data] == ["stage 1", "stage 2"] and len(loss.data[0].x) == 3  # per layer
    assert all(0 <= y <= 1.0 + 1e-9 for t in loss.data for y in t.y)  # the refit never does worse than the cut
    assert not any("no recovery steps" in (a.text or "") for a in loss.layout.annotations)
    st = ready.registry.get("a").history[-1]["stages"][0]
    assert len(st["reconstruction"]["layer_errors"]) == 3


def test_load_clears_the_export_tab(ready, tiny_dir, tiny_csv):
    """The Export tab's status and downloads belong to the model they came from: a Load empties them."""
    run_all(ready, req("a"), stages=1)
    files, status = ready.on_export(req("a"))
    assert files and status.startswith("Exported")
    out = ready.on_load(tiny_dir, "auto", tiny_csv, None, "text", "label", req("a"))
    assert out.load_status.startswith("Loaded"), out.load_status
    assert out.export_status == "" and out.export_files is None


def test_the_adapruner_note_says_the_trials_that_are_set(ready):
    """The Method options note quotes the description's trial count: it follows the trials control."""
    from explorer.config import AdaPrunerOptions
    opts = [V.METHOD_ADVANCED.index((AdaPrunerOptions, "trials"))]
    values = [next(f.default for f in __import__("dataclasses").fields(c) if f.name == n) for c, n in V.METHOD_ADVANCED]
    assert "(50 trials)" in A.method_options_shown("adapruner", *values)[0]
    values[opts[0]] = 5
    note = A.method_options_shown("adapruner", *values)[0]
    assert "(5 trials)" in note and "(50 trials)" not in note
    values[opts[0]] = "many"  # a value the run refuses: the note keeps the default's text, no crash
    assert "(50 trials)" in A.method_options_shown("adapruner", *values)[0]
    assert "no options of its own" in A.method_options_shown("layer-drop", *values)[0]


def test_every_api_parameter_has_a_readable_name(app):
    """Through gradio_client every parameter of every endpoint has its own name (never param_17)."""
    import re
    demo = A.build_ui(app)
    api = demo.get_api_info()["named_endpoints"]
    unnamed = {ep: [p["parameter_name"] for p in d["parameters"] if re.fullmatch(r"param_\d+", p["parameter_name"])]
               for ep, d in api.items()}
    assert not any(unnamed.values()), unnamed
    run = [p["parameter_name"] for p in api["/run"]["parameters"]]
    assert {"target", "amplitude", "normalization", "lr", "lora_rank", "calibration_seed", "trials"} <= set(run)
    assert len(run) == len(set(run)) == 17 + len(V.ADVANCED) + len(V.METHOD_ADVANCED)


def test_quality_comes_with_its_interval_and_budget_and_latency_on_request(ready):
    """Evaluation the user can size: the summary, the run's status, its table and its Quality chart give each
    quality figure with its 95 % interval and the val budget; a run without timing says "not timed"."""
    assert "(95 % " in V.model_summary(ready.registry.get("a").loaded) and "on 8 val examples" in \
        V.model_summary(ready.registry.get("a").loaded)
    outs = run_all(ready, req("a"), stages=2)
    statuses = [o.run_status for o in outs if isinstance(o.run_status, str)]
    assert any(t.startswith("Dense model measured: accuracy **") and "(95 % " in t and "on 8 val examples" in t
               for t in statuses), statuses
    assert any(t.startswith("Stage 2/2 done") and "(95 % " in t for t in statuses), statuses
    last = outs[-1]
    table = last.stages_table
    assert table["95 % interval"].notna().all()
    assert table["latency (ms, 32×128)"].tolist() == ["not timed"] * 3
    q = last.quality_plot
    assert "8 val examples a point, bars: 95 % intervals" in q.layout.title.text
    assert q.data[0].error_y.array[0] > 0 and all(v > 0 for v in q.data[-1].error_y.array[1:])
    assert all("not timed" in c for c in q.data[-1].customdata[1:])
    cost = last.cost_plot
    assert "not timed" in cost.layout.title.text and "Measure latency" in cost.layout.annotations[0].text
    rep = ready.registry.get("a").history[-1]
    assert rep["dense"]["accuracy_ci"] and all(st["interval"]["accuracy"] for st in rep["stages"])


def test_latency_is_off_by_default(app):
    """The quick look: quality first; the Measure latency setting is there, off."""
    demo = A.build_ui(app)
    box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "timing-input")
    assert box.value is False


def test_the_quick_look_metric_is_forward_only(app):
    """The Importance tab opens on the forward-only metric that bench/METRICS.md found within the seed spread
    of taylor after reconstruction (issue 24); encoders without a head keep a label-free one too."""
    from explorer.importance import GRAD_METRICS
    from ui.views import QUICK_LOOK_METRIC, task_defaults
    demo = A.build_ui(app)
    drop = next(b for b in demo.blocks.values() if getattr(b, "label", None) == "Salience metric")
    assert drop.value == QUICK_LOOK_METRIC == "fluctuation"
    for task in ("classification", "causal-lm", "encoder"):
        assert task_defaults(task)[0] not in GRAD_METRICS
