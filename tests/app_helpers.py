"""Calling the UI's handlers as Gradio does (fake requests, the Allocation tab's settings as one
value, a whole run); shared by test_app and test_app_hardening. Fixtures are in conftest."""
from types import SimpleNamespace

from ui.outputs import RunOut
from ui.settings import AdvancedSettings, AllocationSettings

ALLOC = dict(target=0.3, amplitude=0.05, mode="exact", max_sparsity=0.95, round_to=1, split="salience")


def req(name):
    return SimpleNamespace(session_hash=name)


def alloc(**kw) -> AllocationSettings:
    """The Allocation tab's settings: ALLOC with `kw` (normalization, budget, speedup: their defaults)."""
    return AllocationSettings(**{**ALLOC, **kw})


def alloc_args(**kw) -> tuple:
    """`alloc(**kw)` as the one-element tuple a `*alloc_args()` call spreads: the handlers' `alloc` argument."""
    return (alloc(**kw),)


def run_all(app, request, advanced: AdvancedSettings | None = None, **kw):
    args = dict(stages=2, recovery="none", steps=0, method="adaptive", metric="taylor", samples=16,
                eval_n=0, timing=False, **ALLOC)
    args.update(kw)
    settings = alloc(**{k: args.pop(k) for k in list(args) if k in AllocationSettings.__dataclass_fields__})
    outs = list(app.on_run(args["stages"], args["recovery"], args["steps"], args["method"], args["metric"],
                           args["samples"], args["eval_n"], args["timing"], settings, request, advanced))
    assert all(isinstance(o, RunOut) for o in outs)  # quality, loss, cost, table, status, history, pareto by name
    return outs
