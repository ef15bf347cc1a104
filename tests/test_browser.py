"""The real app in a real browser: `python app.py` on the bundled default (minilm-rt),
driven with Debian's chromium through playwright. Waits on elements and chart contents,
never on sleeps. About 2-3 minutes on 2 CPU cores.

BROWSER_TEST_MODEL (default minilm-rt) and BROWSER_TEST_APP_ARGS (extra app.py arguments)
choose another start-up model, e.g. `minilm` with "--task classification".
"""
import os
import shlex
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

pytestmark = pytest.mark.browser

if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian chromium is not installed (apt-get install -y chromium); browser tests skipped",
                allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make setup-test)")

from screenshots import AppServer, Driver, browser  # noqa: E402

MODEL = os.environ.get("BROWSER_TEST_MODEL", "minilm-rt")


UPLOAD_MB = 1  # a small upload limit, so that the test can exceed it


@pytest.fixture(scope="module")
def server():
    args = ["--model", MODEL, "--max-upload-mb", str(UPLOAD_MB), *shlex.split(os.environ.get("BROWSER_TEST_APP_ARGS", ""))]
    with AppServer(*args) as s:
        yield s


@pytest.fixture(scope="module")
def driver(server):
    with browser() as page:
        d = Driver(page, server.url, timeout_s=180)
        d.open()
        yield d


def test_load_importance_allocation_run_and_stop(driver):
    d = driver
    # Model & data: the default is loaded at start-up; loading it again works and says so.
    assert MODEL in d.text("model-summary") and "accuracy" in d.text("model-summary")
    d.page.locator("#load-btn").click()
    d.wait_text("load-status", f"Loaded {MODEL} in")

    # Importance: per-layer scores and a layers x heads heatmap.
    assert "Importance from 32 calibration samples" in d.compute_importance(32)
    layers = d.plot("layer-importance-plot")
    assert len(layers[0]["y"]) == 6
    assert d.page.evaluate("document.querySelector('#heads-heatmap .js-plotly-plot').data[0].z.length") == 6

    # Allocation: moving A redraws the per-layer sparsity chart.
    d.tab("allocation")
    before = d.wait_plot("allocation-plot", "data.length >= 2")[0]["y"]
    t0 = time.monotonic()
    after = d.set_amplitude(0.3)[0]["y"]
    assert after != before
    assert time.monotonic() - t0 < 10  # the round trip; the server side is timed in test_app
    assert "computed in" in d.text("allocation-summary")

    # The per-layer table: a non-number gives a message; a number sets that one layer by hand.
    d.edit_cell("allocation-table", 1, 2, "abc", until=("allocation-summary", "layer 1: sparsity 'abc' is not a number"))
    d.edit_cell("allocation-table", 1, 2, "0.6", until=("allocation-summary", "Set by hand"))
    assert "Set by hand: layer(s) 1 (" in d.text("allocation-summary")
    assert d.wait_plot("allocation-plot", "Math.abs(data[0].y[1] - 0.6) < 1e-9")[0]["y"][1] == 0.6
    d.page.get_by_role("button", name="Reset hand edits").click()
    d.wait_plot("allocation-plot", "Math.abs(data[0].y[1] - 0.6) > 1e-3")

    # Prune: two stages give a dense point plus two stage points on the quality chart, judged on val.
    d.tab("prune")
    assert "A = 0.3, exact mode" in d.wait_text("prune-plan", "Plan")  # the plan it will run: the Allocation tab's
    d.page.get_by_text("Evaluation", exact=True).click()  # open the accordion
    d.set_number("eval-input", 200)
    assert not d.page.locator("#timing-input input[type=checkbox]").is_checked()  # the quick look: quality first
    status = d.run(2, "none")
    assert status.startswith("Done: 2 stage(s)"), status
    stages = next(t for t in d.plot("quality-plot") if t["name"] == "stages")
    assert stages["text"] == ["", "stage 1", "stage 2"] and len(stages["x"]) == 3
    assert "stage 2" in d.text("stage-table") and "accuracy (val)" in d.text("stage-table")
    assert "95 % interval" in d.text("stage-table") and "not timed" in d.text("stage-table")
    # Each point with its 95 % interval (error bars), the budget in the title, an axis that holds the dense figure
    # and every interval and spans at least twice the widest, and a title that fits the chart.
    q = d.page.evaluate("""() => { const g = document.querySelector('#quality-plot .js-plotly-plot');
        const t = g.querySelector('.gtitle').getBBox();
        return {range: g._fullLayout.yaxis.range, width: g._fullLayout.width, title: g.layout.title.text,
                left: t.x, right: t.x + t.width,
                bars: g.data.filter(t => t.error_y && t.error_y.array).map(t => ({y: t.y, up: t.error_y.array,
                                                                                   down: t.error_y.arrayminus}))}; }""")
    assert "200 val examples a point, bars: 95 % intervals" in q["title"], q["title"]
    assert q["left"] >= 0 and q["right"] <= q["width"], q  # not cut off
    lo, hi = q["range"]
    ends = [(y - dn, y + up) for b in q["bars"] for y, up, dn in zip(b["y"], b["up"], b["down"]) if up is not None]
    assert len(ends) == 3 and all(lo <= a and b <= hi for a, b in ends), (q["range"], ends)
    assert hi - lo >= 2 * max(b - a for a, b in ends)
    d.wait_plot("cost-plot", "layout.title.text.includes('not timed')")  # says so, rather than an empty axis
    assert "Measure latency" in d.page.evaluate(
        "document.querySelector('#cost-plot .js-plotly-plot').layout.annotations[0].text")

    # A second adaptive run with another A, LoRA recovery and the LoRA rank set in the Advanced accordion.
    d.set_amplitude(0.1)
    d.tab("prune")
    d.page.get_by_text("Advanced: every other setting of the run", exact=True).click()
    d.set_number("adv-lora-rank", 4)
    assert d.run(1, "lora", 2).startswith("Done: 1 stage(s)")
    # A uniform run: uniform is chosen in one place, the Allocation tab's mode.
    d.tab("allocation")
    d.choose("mode-input", "uniform")
    d.wait_plot("allocation-plot", "layout.title.text.includes('(uniform')")
    d.tab("prune")
    assert "uniform, S_L = S_base = 0.3 in every layer" in d.wait_text("prune-plan", "uniform")
    assert d.run(1, "none").startswith("Done: 1 stage(s)")
    runs = [t["name"] for t in d.wait_plot("history-plot", "data.length == 3")]
    assert runs[0].startswith("#1 exact A=0.3, S=0.3, K=2, none")
    assert runs[1].startswith("#2 exact A=0.1, S=0.3, K=1, lora 2 steps") and runs[1].endswith("lora_rank=4")
    assert runs[2].startswith("#3 uniform, S=0.3, K=1, none") and len(set(runs)) == 3

    # Stop: a fourth run is stopped, and its label says so; the history keeps every run.
    d.tab("allocation")
    d.choose("mode-input", "exact")
    d.run(4, "none", wait=False)
    d.wait_text("run-status", "Stage 1/4")
    d.page.locator("#stop-btn").click()
    d.page.locator(".toast-body", has_text="Stopping after the current step").wait_for()
    assert "Stopped" in d.wait_text("run-status", "Stopped")
    runs = [t["name"] for t in d.wait_plot("history-plot", "data.length == 4")]
    assert runs[3].startswith("#4 ") and runs[3].endswith("(stopped)"), runs
    assert "⚠️" not in d.text("run-status")

    # Export: the run picker offers the kept runs; the second run's model is exported under its own name.
    d.tab("export")
    d.page.locator("#export-run input").click()
    d.page.get_by_role("option", name=runs[1], exact=True).click()
    status = d.click_and_wait("export-btn", "export-status", "Exported")
    assert "-run2-adaptive-S0.3.zip" in status, status


def test_predicted_quality_follows_a_table_edit_and_the_search_fills_the_table(driver):
    import re
    d = driver
    d.tab("importance")
    assert "Importance from 32 calibration samples" in d.compute_importance(32)
    d.tab("allocation")
    d.choose("mode-input", "exact")
    d.page.get_by_text("Predictor and search settings", exact=True).click()  # smaller than the defaults: a test
    for elem, value in (("adv-examples", 128), ("adv-checks", 1), ("adv-small", 32), ("adv-large", 128)):
        d.set_number(elem, value)
    d.page.locator("#predict-btn").click()
    d.wait_text("predict-status", "Predictor ", timeout_s=600)
    assert "⚠️" not in d.text("predict-status"), d.text("predict-status")

    def predicted():
        m = re.search(r"this plan ([0-9.]+)%", d.text("allocation-summary"))
        return float(m.group(1)) if m else None
    d.wait_text("allocation-summary", "Predicted val accuracy")
    before = predicted()
    assert before is not None and {"uniform", "this plan"} <= {t["name"] for t in d.plot("predict-plot")}
    # make layer 1 much sparser: the prediction moves
    d.edit_cell("allocation-table", 1, 2, "0.9", until=("allocation-summary", "Set by hand: layer(s) 1"))
    deadline = time.monotonic() + 30
    while predicted() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert predicted() != before, d.text("allocation-summary")
    d.page.get_by_role("button", name="Reset hand edits").click()

    d.set_number("generations-input", 2)
    d.page.locator("#search-btn").click()
    status = d.wait_text("predict-status", "trials in", timeout_s=600)
    assert status.startswith("Search "), status
    curve = d.wait_plot("plan-search-plot", "data.length == 2")
    assert len(curve[1]["x"]) >= 2  # the start and at least one generation
    d.wait_plot("allocation-plot", "layout.title.text.includes('(search')")
    # the searched plan stays editable
    d.edit_cell("allocation-table", 2, 2, "0.5", until=("allocation-summary", "Set by hand: layer(s) 2"))
    d.page.get_by_role("button", name="Reset hand edits").click()
    d.choose("mode-input", "exact")


def test_two_sessions_on_different_models_bad_input_and_a_closed_tab(driver, server, tmp_path):
    """A second browser (its own session) loads another model and feeds it bad input; the first
    browser sees none of it; closing the second tab frees its session on the server."""
    a = driver
    a_summary = a.text("model-summary")
    page_b = a.page.context.browser.new_page(viewport={"width": 1400, "height": 1000})  # a new context: a new session
    b = Driver(page_b, server.url, timeout_s=180)
    b.open()
    assert server.wait_log("opened (2 open)", 30), server.log[-2000:]

    assert b.load("minilm").startswith("Loaded minilm in")
    assert "task encoder" in b.text("model-summary").replace("\t", " ")
    b.tab("allocation")
    assert "Compute importance first" in b.text("allocation-summary")  # A's importance is not B's
    assert not [t for t in b.plot("history-plot") or [] if t.get("name")]  # nor are A's runs

    # Bad input in B: a visible status line and toast, B keeps its model.
    binary = tmp_path / "weights.csv"
    binary.write_bytes(b"\x00\x01PK\x03\x04" * 500)
    status = b.load(upload=binary, expect="Load failed")
    assert status.startswith("⚠️") and "weights.csv does not look like a text file (binary content)" in status
    assert any("binary content" in t for t in b.toasts())
    status = b.load("no-such-org/no-such-model", expect="Load failed")
    assert "could not load 'no-such-org/no-such-model'" in status and status.startswith("⚠️")
    assert "task encoder" in b.text("model-summary").replace("\t", " ")  # still B's model
    assert "(loaded: minilm)" in status  # the status says which model stays ...
    assert b.page.locator("#model-input input").input_value() == "minilm"  # ... and the Model box names it again

    # An upload over the server's limit is refused by the page, and by the server for a crafted request.
    big = tmp_path / "big.csv"
    big.write_text("text,label\n" + "a fine film indeed,1\n" * (UPLOAD_MB * 2**20 // 20 + 1000))
    b.page.locator("#upload-input button[aria-label='Clear']").click()
    b.page.locator("#upload-input input[type=file]").set_input_files(str(big))
    b.page.locator(".toast-body", has_text="exceed the maximum allowed size").wait_for()
    import httpx
    r = httpx.post(f"{server.url}/gradio_api/upload", files={"files": ("big.csv", big.read_bytes())}, timeout=60)
    assert r.status_code == 413, (r.status_code, r.text[:200])

    # A is untouched: same model, its importance still drives the allocation chart, its runs remain.
    assert a.text("model-summary") == a_summary
    a.set_amplitude(0.1)
    assert len([t for t in a.plot("history-plot") if t.get("name")]) == 4

    page_b.context.close()  # the tab goes: the server drops B's session and its model
    assert server.wait_log("closed (1 open)", 60), server.log[-2000:]


def test_stop_during_the_importance_analysis(driver):
    d = driver
    d.tab("importance")
    # the slowest analysis the tab offers (a backward per sample, 512 samples one at a time): under load
    # the Stop's round trip took longer than the quick-look metric's whole pass (CI: "Nothing is running")
    metric_box = d.page.locator(".block", has_text="Salience metric").locator("input").first
    metric_box.click()
    d.page.get_by_role("option", name="taylor", exact=True).click()
    d.set_number("samples-input", 512)
    d.set_number("batch-input", 1)
    before = d.text("importance-status")
    d.page.locator("#importance-btn").click()
    d.page.locator("#importance-status", has_text="calibration batches").wait_for()  # the analysis is under way
    d.page.locator("#importance-stop-btn").click()
    # what the Stop does, on the job's own status line (the "Stopping …" toast is transient: under load
    # CI once waited 180 s for it, so it is read, not waited for)
    d.page.wait_for_function("() => /Stopped|Importance from 512/.test(document.getElementById('importance-status')"
                             ".innerText)", timeout=d.timeout)  # the analysis ends either way
    status = d.text("importance-status")
    assert "Stopped: the analysis was cancelled" in status, (status, d.toasts())  # the click reached the analysis
    assert "the previous importance and allocation stay" in status and status != before
    assert d.plot("layer-importance-plot")  # the last heatmaps stay
    metric_box.click()
    d.page.get_by_role("option", name="fluctuation", exact=True).click()  # the tab as the tests after expect it


def _answers(d: Driver, prompt: str) -> tuple[str, str, str]:
    """Type a prompt in the Export tab's side-by-side panel, press Run both; (dense, pruned, status)."""
    d.tab("export")
    d.page.locator("#prompt-input textarea").fill(prompt)
    status = d.click_and_wait("generate-btn", "generate-status", "Dense:")
    return (d.page.locator("#dense-output textarea").input_value(),
            d.page.locator("#pruned-output textarea").input_value(), status)


def test_side_by_side_classification_and_onnx_export(driver):
    """After the runs above: both models classify a typed sentence; the pruned model exports to ONNX."""
    d = driver
    dense, pruned, status = _answers(d, "A warm, funny and beautifully acted film.")
    assert "positive:" in dense and "negative:" in dense and "positive:" in pruned, (dense, pruned)
    assert "Pruned:" in status and "ms" in status
    d.page.locator("#export-formats label", has_text="ONNX").click()
    status = d.click_and_wait("export-btn", "export-status", "Exported")
    assert ".onnx" in status and "onnxruntime max" in status and "ok" in status, status
    assert ".onnx" in d.text("export-files") and ".zip" in d.text("export-files")


def test_the_method_note_says_the_options_that_are_set(driver):
    """AdaPruner's note quotes its trial count: it says the number set in the Method options, not the default."""
    d = driver
    d.tab("prune")
    d.page.get_by_text("Method options", exact=True).click()  # a closed accordion's contents are not on the page
    d.page.locator("#method-input input").click()
    d.page.get_by_role("option", name="adapruner", exact=True).click()
    assert "(50 trials)" in d.wait_text("method-options-note", "adapruner")
    d.set_number("opt-trials", 5)
    note = d.wait_text("method-options-note", "(5 trials)")
    assert "(50 trials)" not in note
    d.page.locator("#method-input input").click()
    d.page.get_by_role("option", name="adaptive", exact=True).click()
    d.wait_text("method-options-note", "adaptive")


@pytest.fixture(scope="module")
def tiny_llama_server(tmp_path_factory):
    """The app on a tiny random LLaMA (GQA) saved as a model directory, and a text file."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_data, tiny_lm
    from explorer.models import save_model
    root = tmp_path_factory.mktemp("tiny-llama-app")
    model = save_model(tiny_lm("llama"), root / "tiny-llama")
    text = root / "words.txt"
    text.write_text("\n\n".join(sum(tiny_data(200).texts.values(), [])))
    with AppServer("--model", str(model), "--data", str(text)) as s:
        yield s


def test_language_model_prune_generate_and_export_gguf_and_onnx(driver, tiny_llama_server):
    """A causal LM end to end in the page: prune with reconstruction, read both continuations,
    export the pruned model to GGUF and ONNX (both checked)."""
    page = driver.page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    d = Driver(page, tiny_llama_server.url, timeout_s=180)
    d.open()
    d.tab("prune")
    d.page.get_by_text("Evaluation", exact=True).click()
    d.page.locator("#timing-input input[type=checkbox]").check()  # timing is on request (off by default)
    status = d.run(1, "reconstruct")
    assert status.startswith("Done: 1 stage(s)"), status
    assert "decode tok/s (b1)" in d.text("stage-table")  # speed as users feel it, per stage
    # A reconstruct run: "after reconstruction" holds the reconstructed model's figure (the stage's, as nothing
    # was trained after it) and the Recovery chart shows the refit per layer, not "no recovery steps".
    after, final = (d.page.locator(f"#stage-table [data-testid=cell-1-{c}]").inner_text().strip() for c in (4, 5))
    assert after and after == final, (after, final)
    loss = d.wait_plot("loss-plot", "layout.title.text.startsWith('Reconstruction: closed-form refit')")
    assert [t["name"] for t in loss] == ["stage 1"] and len(loss[0]["x"]) == 3  # the tiny LLaMA's 3 layers
    dense, pruned, status = _answers(d, "w3 w4 w5")
    assert dense.strip() and pruned.strip() and "tokens/s" in status, (dense, pruned, status)
    for fmt in ("ONNX", "GGUF"):
        d.page.locator("#export-formats label", has_text=fmt).click()
    status = d.click_and_wait("export-btn", "export-status", "Exported")
    assert "onnxruntime max" in status and "read back (" in status and "match" in status, status
    files = d.text("export-files")
    assert ".gguf" in files and ".onnx" in files and ".zip" in files
    # Another Load: the Export tab's status and downloads were the previous model's, and go.
    assert d.load().startswith("Loaded")
    d.tab("export")
    assert d.text("export-status").strip() == "" and ".zip" not in d.text("export-files")
    page.close()


def test_gradio_client_named_endpoints(server):
    """The programmable API: named endpoints, and plain JSON for the analysis and the plan."""
    from gradio_client import Client
    c = Client(server.url, verbose=False)
    names = set(c.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/load", "/analyze", "/allocate", "/plan_json", "/analysis_json", "/run", "/stop", "/export",
            "/generate"} <= names
    assert not any(n.startswith("/on_") or n.startswith("/lambda") for n in names)  # handlers stay private
    assert c.predict(api_name="/plan_json")["error"].startswith("no plan yet")
    out = c.predict(MODEL, "auto", "(the model's default)", None, "text", "label", api_name="/load")
    assert out[1].startswith(f"Loaded `{MODEL}`") or f"Loaded {MODEL}" in out[1], out[1]
    out = c.predict("taylor", 16, 8, 0.3, 0.05, "exact", 0.95, 1, "salience", "maxabs", "params", 1.6, api_name="/analyze")
    assert "Importance from 16" in out[3]
    plan = c.predict(api_name="/plan_json")
    assert len(plan["layers"]) == 6 and abs(plan["removed_fraction"] - 0.3) < 0.02
    assert all({"sparsity", "keep_groups", "keep_neurons"} <= set(layer) for layer in plan["layers"])
    steep = c.predict(0.4, 0.2, "exact", 0.95, 1, "salience", "rank", api_name="/allocate")
    assert abs(steep["removed_fraction"] - 0.4) < 0.02 and steep == c.predict(api_name="/plan_json")
    analysis = c.predict(api_name="/analysis_json")
    assert len(analysis["layers"]) == 6 and analysis["model"] == MODEL
    api = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
    unnamed = {ep: [p["parameter_name"] for p in d["parameters"] if p["parameter_name"].startswith("param_")]
               for ep, d in api.items()}
    assert not any(unnamed.values()), unnamed  # every parameter of every endpoint has a readable name
    outs = c.predict(stages=1, recovery="reconstruct", steps=0, method="adaptive", metric="taylor", samples=16,
                     eval_n=100, timing=False, target=0.3, amplitude=0.05, lora_rank=4, api_name="/run")
    assert outs[4].startswith("Done: 1 stage(s)"), outs[4]
