"""Calling the UI's handlers as Gradio does (fake requests, the Allocation tab's six inputs,
a whole run); shared by test_app and test_app_hardening. Fixtures are in conftest."""
from types import SimpleNamespace

from ui.outputs import RunOut

ALLOC = dict(target=0.3, amplitude=0.05, mode="exact", max_sparsity=0.95, round_to=1, split="salience")


def req(name):
    return SimpleNamespace(session_hash=name)


def alloc_args(**kw):
    d = {**ALLOC, **kw}
    return d["target"], d["amplitude"], d["mode"], d["max_sparsity"], d["round_to"], d["split"]


def run_all(app, request, **kw):
    args = dict(stages=2, recovery="none", steps=0, method="adaptive", metric="taylor", samples=16,
                eval_n=0, timing=False, **ALLOC)
    args.update(kw)
    outs = list(app.on_run(args["stages"], args["recovery"], args["steps"], args["method"], args["target"],
                           args["amplitude"], args["mode"], args["max_sparsity"], args["round_to"], args["split"],
                           args["metric"], args["samples"], args["eval_n"], args["timing"], request))
    assert all(isinstance(o, RunOut) for o in outs)  # quality, loss, cost, table, status, history, pareto by name
    return outs
