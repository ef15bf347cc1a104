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


@pytest.fixture(scope="module")
def driver():
    args = ["--model", MODEL, *shlex.split(os.environ.get("BROWSER_TEST_APP_ARGS", ""))]
    with AppServer(*args) as server, browser() as page:
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
    d.edit_cell("allocation-table", 1, 2, "abc")
    d.wait_text("allocation-summary", "layer 1: sparsity 'abc' is not a number")
    d.edit_cell("allocation-table", 1, 2, "0.6")
    assert "Set by hand: layer(s) 1 (" in d.wait_text("allocation-summary", "Set by hand")
    assert d.wait_plot("allocation-plot", "Math.abs(data[0].y[1] - 0.6) < 1e-9")[0]["y"][1] == 0.6
    d.page.get_by_role("button", name="Reset hand edits").click()
    d.wait_plot("allocation-plot", "Math.abs(data[0].y[1] - 0.6) > 1e-3")

    # Prune: two stages give a dense point plus two stage points on the quality chart.
    d.tab("prune")
    d.page.get_by_text("Evaluation", exact=True).click()  # open the accordion
    d.set_number("eval-input", 200)
    d.page.locator("#timing-input input[type=checkbox]").uncheck()
    status = d.run(2, "none")
    assert status.startswith("Done: 2 stage(s)"), status
    stages = next(t for t in d.plot("quality-plot") if t["name"] == "stages")
    assert stages["text"] == ["", "stage 1", "stage 2"] and len(stages["x"]) == 3
    assert "stage 2" in d.text("stage-table")

    # Stop: a second run is stopped; the history keeps both runs.
    d.run(4, "none", wait=False)
    d.wait_text("run-status", "Stage 1/4")
    d.page.locator("#stop-btn").click()
    assert "Stopped" in d.wait_text("run-status", "Stopped")
    runs = [t["name"] for t in d.wait_plot("history-plot", "data.length == 2")]
    assert runs[0].startswith("#1 ") and runs[1].startswith("#2 ")
    assert "⚠️" not in d.text("run-status")
