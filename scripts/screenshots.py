"""Screenshots of every panel of the running app, with real data.

    .venv/bin/python scripts/screenshots.py [--out assets/screenshots] [--model minilm-rt] [-- APP ARGS]

Starts `app.py` on a free port, drives it with Debian's chromium through playwright
(load, importance, allocation with A moved, a two-stage run, export) and writes
model.png, importance.png, allocation.png, prune.png and export.png.

`AppServer`, `browser` and `Driver` are also what tests/test_browser.py drives the app with.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PANELS = {"model": "Model & data", "importance": "Importance", "allocation": "Allocation",
          "prune": "Prune & recover", "export": "Export"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python app.py` in a subprocess on a free loopback port; stopped on exit."""

    def __init__(self, *app_args: str, startup_timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(self.port), *app_args]
        self.timeout = startup_timeout
        self.log = ""

    def __enter__(self) -> "AppServer":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        threading.Thread(target=self._drain, daemon=True).start()  # a full pipe would block the server
        if not self.wait_log("Running on local URL", self.timeout):  # the model loads before the server listens
            self.__exit__()
            raise RuntimeError(f"app.py did not start:\n{self.log[-3000:]}")
        return self

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log += line

    def wait_log(self, text: str, timeout_s: float = 60) -> bool:
        """Wait until the server's output contains `text` (True) or the time is up / it died (False)."""
        t0 = time.monotonic()
        while text not in self.log:
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                return text in self.log
            time.sleep(0.1)
        return True

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@contextmanager
def browser(width: int = 1400, height: int = 1000):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b.new_page(viewport={"width": width, "height": height})
        finally:
            b.close()


class Driver:
    """The app's panels as a few actions, each waiting for what it changes (never sleeping)."""

    def __init__(self, page, url: str, timeout_s: float = 240):
        self.page = page
        self.url = url
        self.timeout = timeout_s * 1000
        page.set_default_timeout(self.timeout)

    def open(self) -> None:
        self.page.goto(self.url)
        self.wait_text("load-status", "Ready")

    def tab(self, panel: str) -> None:
        self.page.get_by_role("tab", name=PANELS[panel]).click()

    def text(self, elem_id: str) -> str:
        return self.page.locator(f"#{elem_id}").inner_text()

    def wait_text(self, elem_id: str, text: str, timeout_s: float | None = None) -> str:
        self.page.wait_for_function(
            "([id, text]) => { const e = document.getElementById(id); return e && e.innerText.includes(text); }",
            arg=[elem_id, text], timeout=timeout_s * 1000 if timeout_s else self.timeout)
        return self.text(elem_id)

    def plot(self, elem_id: str) -> list[dict] | None:
        """The traces plotly is showing in a gr.Plot (name, x, y, text)."""
        return self.page.evaluate(
            """id => { const g = document.querySelector('#' + id + ' .js-plotly-plot');
                      return g && g.data ? g.data.map(t => ({name: t.name, x: t.x, y: t.y, text: t.text})) : null; }""",
            elem_id)

    def wait_plot(self, elem_id: str, predicate_js: str) -> list[dict]:
        """Wait until `predicate_js` (a JS expression over the plot's `data` and `layout`) holds."""
        self.page.wait_for_function(
            "([id, pred]) => { const g = document.querySelector('#' + id + ' .js-plotly-plot');"
            " if (!g || !g.data || !g.layout) return false; const data = g.data, layout = g.layout;"
            " try { return !!eval(pred); } catch (e) { return false; } }",
            arg=[elem_id, predicate_js])
        return self.plot(elem_id)

    def set_number(self, elem_id: str, value, tries: int = 5) -> None:
        """Type into a slider's or number box's input and commit it. A box inside an accordion that
        has just opened can be re-rendered with its old value after the first fill, so the value is
        read back (after a moment) and typed again until it holds."""
        box = self.page.locator(f"#{elem_id} input[type=number]")
        box.wait_for(state="visible")
        for _ in range(tries):
            box.fill(str(value))
            box.press("Enter")
            box.blur()
            self.page.wait_for_timeout(300)
            if float(box.input_value() or "nan") == float(value):
                return
        raise AssertionError(f"#{elem_id} did not keep the value {value} (shows {box.input_value()!r})")

    def choose(self, elem_id: str, option: str) -> None:
        self.page.locator(f"#{elem_id} label", has_text=option).first.click()

    def edit_cell(self, elem_id: str, row: int, col: int, text: str,
                  until: tuple[str, str] | None = None, tries: int = 3) -> None:
        """Type into one cell of a gr.Dataframe and commit it with Enter. The keys are typed only once
        the cell's editor has the focus (on a busy machine a double click can land while the table is
        still being re-rendered by the previous edit's answer, and the keys would go nowhere); with
        `until` = (element id, text), the edit is made again until that text shows."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        cell = self.page.locator(f"#{elem_id} [data-testid=cell-{row}-{col}]")
        for _ in range(tries):
            cell.dblclick()
            try:
                self.page.wait_for_function(
                    """id => { const a = document.activeElement, t = document.getElementById(id);
                               return !!a && !!t && t.contains(a) && ['INPUT', 'TEXTAREA'].includes(a.tagName); }""",
                    arg=elem_id, timeout=20_000)
            except PlaywrightTimeout:
                continue
            self.page.keyboard.press("Control+A")
            self.page.keyboard.type(text)
            self.page.keyboard.press("Enter")
            if until is None:
                return
            try:
                self.wait_text(*until, timeout_s=self.timeout / 1000 / tries)
                return
            except PlaywrightTimeout:
                continue
        raise AssertionError(f"#{elem_id} cell ({row}, {col}): the edit {text!r} did not register in {tries} tries"
                             + (f" (#{until[0]} never showed {until[1]!r})" if until else ""))

    def load(self, model: str | None = None, upload: Path | None = None, expect: str = "Loaded") -> str:
        """Load on the Model & data tab: pick `model` (a listed name or typed text), attach `upload`
        (replacing any file attached before), press Load and wait for a status containing `expect`."""
        self.tab("model")
        if model is not None:
            box = self.page.locator("#model-input input")
            box.fill(model)
            option = self.page.get_by_role("option", name=model, exact=True)  # a listed name, or typed text
            if option.count():
                option.click()
            else:
                box.press("Enter")
        if upload is not None:
            clear = self.page.locator("#upload-input button[aria-label='Clear']")
            if clear.count():
                clear.click()
            self.page.locator("#upload-input input[type=file]").set_input_files(str(upload))
            self.page.locator("#upload-input", has_text=Path(upload).name).wait_for()
        return self.click_and_wait("load-btn", "load-status", expect)

    def click_and_wait(self, button_id: str, status_id: str, expect: str) -> str:
        """Click, then wait until the status's progress overlay has come and gone and its text
        contains `expect` (so an old status with the same words does not count)."""
        self.page.evaluate("""id => { const t = document.querySelector('#' + id + ' [data-testid=status-tracker]');
            window.__busy = false; new MutationObserver(() => { if (!t.classList.contains('hide')) window.__busy = true; })
              .observe(t, {attributes: true}); }""", status_id)
        self.page.locator(f"#{button_id}").click()
        self.page.wait_for_function(
            """([id, text]) => { const e = document.getElementById(id);
                 const idle = e.querySelector('[data-testid=status-tracker]').classList.contains('hide');
                 return window.__busy && idle && e.querySelector('[data-testid=markdown]').innerText.includes(text); }""",
            arg=[status_id, expect])
        return self.page.locator(f"#{status_id} [data-testid=markdown]").inner_text()

    def toasts(self) -> list[str]:
        return self.page.locator(".toast-body").all_inner_texts()

    def compute_importance(self, samples: int = 32) -> str:
        self.tab("importance")
        self.set_number("samples-input", samples)
        self.page.locator("#importance-btn").click()
        status = self.wait_text("importance-status", "Importance from")
        self.wait_plot("heads-heatmap", "data.length > 0 && data[0].z !== undefined")
        return status

    def set_amplitude(self, value: float) -> list[dict]:
        """Move A on the Allocation tab; returns the redrawn chart once it shows the new A."""
        self.tab("allocation")
        self.set_number("amplitude-slider", value)
        return self.wait_plot("allocation-plot", f"layout.title.text.includes('A={value:.2f}')")

    def run(self, stages: int = 2, recovery: str = "none", steps: int = 0, wait: bool = True) -> str:
        """Start a run; with `wait`, until it is over (its line appears in the run history)."""
        self.tab("prune")
        self.set_number("stages-input", stages)
        self.choose("recovery-input", recovery)
        if recovery != "none":
            self.set_number("steps-input", steps)
        n = len([t for t in self.plot("history-plot") or [] if t.get("name")]) + 1
        self.page.locator("#run-btn").click()
        if not wait:
            return ""
        self.wait_plot("history-plot", f"data.some(t => (t.name || '').startsWith('#{n} '))")
        return self.text("run-status")

    def export(self) -> str:
        self.tab("export")
        self.page.locator("#export-btn").click()
        return self.wait_text("export-status", "Exported")

    def shot(self, path: Path) -> None:
        self.page.wait_for_timeout(600)  # let plotly finish its transition before the picture
        self.page.screenshot(path=str(path), full_page=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "assets" / "screenshots"))
    p.add_argument("--samples", type=int, default=64, help="calibration samples for the importance panel")
    p.add_argument("--recovery", default="lora")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompt", default="A warm, funny and beautifully acted film.",
                   help="typed into the Export tab's side-by-side panel")
    p.add_argument("--generations", type=int, default=8, help="generations of the Allocation tab's plan search")
    p.add_argument("--prefix", default="", help="prefix of the file names (e.g. lm- for a language model)")
    p.add_argument("app_args", nargs="*", help="passed to app.py (after --)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with AppServer(*args.app_args) as server, browser() as page:
        d = Driver(page, server.url, timeout_s=900)
        d.open()
        d.shot(out / f"{args.prefix}model.png")
        d.compute_importance(args.samples)
        d.shot(out / f"{args.prefix}importance.png")
        d.set_amplitude(0.15)
        d.page.locator("#predict-btn").click()  # the predictor (each layer cut alone, then cached) ...
        d.wait_text("predict-status", "Predictor ")
        d.set_number("generations-input", args.generations)  # ... and a short plan search
        d.page.locator("#search-btn").click()
        d.wait_text("predict-status", "trials in")
        d.wait_plot("predict-plot", "data.some(t => t.name == 'searched')")
        d.shot(out / f"{args.prefix}allocation.png")
        d.choose("mode-input", "uniform")  # two runs, to compare uniform with adaptive in the history
        d.run(2, "none")
        d.tab("allocation")
        d.choose("mode-input", "exact")
        print(d.run(2, args.recovery, args.steps))
        d.shot(out / f"{args.prefix}prune.png")
        d.export()
        d.page.locator("#prompt-input textarea").fill(args.prompt)
        d.click_and_wait("generate-btn", "generate-status", "Dense:")
        d.shot(out / f"{args.prefix}export.png")
    print(f"screenshots in {out}")


if __name__ == "__main__":
    main()
