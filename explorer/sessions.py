"""Per-browser-session state for the UI, keyed by the session id the UI passes in.

Models are far too big for `gr.State` (which deep-copies its value on every event), so
each session's objects live here instead: the loaded (dense) model and its data, the last
importance analysis and allocation, the pruning run in progress, the pruned model of the
last run and the history of finished runs. The UI drops a session when its page closes.

A session does one long job at a time (loading, analysis, a run, an export): `busy()`
refuses a second one with a message instead of queueing it behind the first. Short reads
(redrawing the allocation) do not take the lock; they read the fields, which long jobs
replace only when they finish, so readers see the old or the new value, never a half.

This module does not import gradio: the UI passes `request.session_hash` in.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import sys
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .allocation import Allocation
from .data import TextData
from .errors import ExplorerError
from .importance import Importance
from .models import LoadedModel
from .pruning import PruningRun

log = logging.getLogger("explorer.sessions")


KEEP_RUNS = 3  # runs whose final model a session keeps for export


class SessionBusy(ExplorerError):
    """A long job was asked for while another one of the same session is running."""


@dataclass
class Loaded:
    """A dense model, its data and the dense evaluation: what a Load produces.

    The dense model is never changed in place (a run prunes a copy), so the model preloaded at
    start-up is shared by every session that has not loaded another one: one copy in memory,
    however many tabs are open. What touches the model's modules (an analysis registers hooks
    and accumulates gradients; copying a model copies its hooks) holds `lock`, which the sharing
    sessions share; a session's own Load gets its own lock."""

    lm: LoadedModel
    data: TextData
    dense_eval: dict
    # the dense model's measurements, each once (ui.views.remember_dense): ("quality", eval size, split) -> its
    # quality and size; ("timing", speed repeats) -> its timing
    dense_runs: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    costs: dict = field(default_factory=dict)  # "latency" -> the model's latency cost model on this device


@dataclass
class Session:
    loaded: Loaded | None = None
    importance: Importance | None = None
    manual: dict[int, float] = field(default_factory=dict)  # layer -> sparsity set by hand in the table
    last_edit: list[str] | None = None  # the sparsity column of the last table edit (to drop repeats)
    allocation: Allocation | None = None  # the plan currently shown (formula + manual overrides)
    predictor: object | None = None  # explorer.predict.Predictor measured on the loaded model (Allocation tab)
    searched: list[float] | None = None  # per-layer levels of the last searched plan (allocation mode "search")
    search_curve: list[dict] = field(default_factory=list)  # the last search's best loss after each generation
    run: PruningRun | None = None  # the run in progress or the last one
    kept: dict[str, LoadedModel] = field(default_factory=dict)  # run label -> its final model (last KEEP_RUNS)
    history: list[dict] = field(default_factory=list)  # reports of finished runs, oldest first
    figures: dict = field(default_factory=dict)  # chart name -> last figure (for the HTML export)
    job: str = ""  # what the lock is held for
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _ready: threading.Event = field(default_factory=threading.Event, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)  # Stop pressed during a job
    _workdir: Path | None = field(default=None, repr=False)

    @contextmanager
    def busy(self, job: str) -> Iterator["Session"]:
        """Hold the session for one long job; refuse (SessionBusy) if another is running.
        A plain Lock (not RLock), so a generator may resume in another worker thread."""
        if not self._lock.acquire(blocking=False):
            raise SessionBusy(f"wait until {self.job or 'the current job'} has finished (or press Stop)")
        self.job = job
        self._cancel.clear()
        try:
            yield self
        finally:
            self.job = ""
            self._lock.release()

    def stop(self) -> str:
        """Ask the running job to stop at its next check; '' when nothing is running.
        A pruning run stops after its current step; an analysis after its current batch."""
        job = self.job
        if not job:
            return ""
        self._cancel.set()
        if self.run is not None and self.run.status == "running":
            self.run.stop()
        return job

    def stop_requested(self) -> bool:
        """Polled by long computations (`analyze(should_stop=...)`)."""
        return self._cancel.is_set()

    def keep_run(self, label: str, lm: LoadedModel) -> None:
        """The final model of a run, exportable by its label. Earlier runs' models move to the CPU
        (never a second model on the accelerator) and only the last KEEP_RUNS are kept."""
        for old in self.kept.values():
            if old.device.type != "cpu":
                old.model.to("cpu")
                old.device = torch.device("cpu")
        self.kept[label] = lm
        while len(self.kept) > KEEP_RUNS:
            self.kept.pop(next(iter(self.kept)))

    @property
    def pruned(self) -> LoadedModel | None:
        """The model after the last finished run's last completed stage."""
        return next(reversed(self.kept.values()), None)

    def set_loaded(self, loaded: Loaded) -> None:
        """A new model: its analysis, plan and charts start afresh. The run history and the last
        pruned model stay (each report names its model), so a Load never throws work away."""
        self.loaded = loaded
        self.importance, self.allocation, self.run = None, None, None
        self.manual, self.last_edit = {}, None
        self.predictor, self.searched, self.search_curve = None, None, []
        self.figures = {}

    @property
    def workdir(self) -> Path:
        """A private temporary folder for this session's exports (removed with the session)."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="explorer-session-"))
        return self._workdir

    def close(self) -> None:
        """Stop what runs and forget every model, so that the memory can go back."""
        self._cancel.set()
        if self.run is not None:
            self.run.stop()
        self.loaded, self.run, self.importance, self.allocation = None, None, None, None
        self.kept, self.history, self.figures = {}, [], {}
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def release_memory() -> None:
    """Free unreachable models now (modules and hooks hold reference cycles) and hand freed heap
    pages back to the OS (glibc keeps them otherwise, and RSS would only grow)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


class SessionRegistry:
    """session id -> Session. A new session starts on `template` (the model preloaded at start-up),
    shared read-only with the other sessions (see `Loaded`), so every page opens on a ready model
    without a reload and without a copy."""

    def __init__(self, template: Loaded | None = None):
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.template = template

    def get(self, session_id: str) -> Session:
        if not session_id:
            raise ExplorerError("no session id: reload the page")
        with self._lock:
            s = self._sessions.get(session_id)
            new = s is None
            if new:
                s = self._sessions[session_id] = Session()
        if not new:
            s._ready.wait()  # its first caller may still be copying the template
            return s
        log.info("session %s opened (%d open)", session_id[:8], len(self))
        try:
            s.loaded = self.template  # shared, never changed in place: no copy
        finally:
            s._ready.set()
        return s

    def drop(self, session_id: str) -> None:
        """Close a session (its page went away) and give its models' memory back."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
        if s is None:
            return
        s.close()
        del s
        release_memory()
        log.info("session %s closed (%d open)", session_id[:8], len(self))

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)
