"""Groups of controls that several handlers read, as one named value each.

The Allocation tab's nine settings feed the importance analysis, every redraw of the plan, the
predictor, the search, the Prune tab's plan line and the run; the run also reads the Advanced
accordion and the Method options. Handlers take such a group as one parameter (`alloc:
AllocationSettings`, `advanced: AdvancedSettings`) and turn it into checked config objects
(`AllocationSettings.config()` raises `ExplorerError`, which the handler shows).

Gradio passes component values to a function's parameters, so `takes_settings` adapts a handler
for an event: every field of a group becomes a keyword parameter of its own, which the event
fills by name (`inputs_kwargs={"target": page.target_in, ...}`) and the API shows under that
name (never as `param_17`).
"""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, fields, make_dataclass
from typing import Any, Callable

from explorer.config import AllocationConfig, AnalysisConfig, default_of

from .views import ADVANCED, METHOD_ADVANCED, allocation_config

_A = AllocationConfig


@dataclass(frozen=True)
class AllocationSettings:
    """The Allocation tab's controls as the page sends them (numbers may come as text or None: a
    crafted request, an emptied box); `config()` checks them. The defaults are AllocationConfig's."""
    target: Any = default_of(_A, "target")
    amplitude: Any = default_of(_A, "amplitude")
    mode: Any = default_of(_A, "mode")
    max_sparsity: Any = default_of(_A, "max_sparsity")
    round_to: Any = default_of(_A, "round_to")
    split: Any = default_of(_A, "split")
    normalization: Any = default_of(_A, "normalization")
    budget: Any = default_of(_A, "budget")
    speedup: Any = default_of(_A, "speedup")

    def config(self, **over) -> AllocationConfig:
        """The checked AllocationConfig (ExplorerError naming the bad control); `over` replaces raw values first
        (e.g. mode="exact")."""
        v = {f.name: getattr(self, f.name) for f in fields(self)} | over
        return allocation_config(v["target"], v["amplitude"], v["mode"], v["max_sparsity"], v["round_to"],
                                 v["split"], v["normalization"], v["budget"], v["speedup"])


def api_name(cls: type, name: str) -> str:
    """The keyword (and API parameter) name of a generated control: the field's name, except the one
    field two config classes share (AnalysisConfig.seed: `calibration_seed`, as its label says)."""
    return f"calibration_{name}" if cls is AnalysisConfig and name == "seed" else name


ADVANCED_NAMES = [api_name(cls, name) for cls, name in ADVANCED]
METHOD_NAMES = [api_name(cls, name) for cls, name in METHOD_ADVANCED]
assert len(set(ADVANCED_NAMES + METHOD_NAMES)) == len(ADVANCED_NAMES) + len(METHOD_NAMES), "a control name twice"
assert not set(ADVANCED_NAMES + METHOD_NAMES) & {f.name for f in fields(AllocationSettings)}


def _default(cls: type, name: str):
    return next(f.default for f in fields(cls) if f.name == name)


# The Advanced accordion and the Method options, one field per control (None: the config's default).
AdvancedSettings = make_dataclass(
    "AdvancedSettings", [(n, Any, None) for n in ADVANCED_NAMES + METHOD_NAMES], frozen=True,
    namespace={"__doc__": "The run's Advanced accordion (PruneConfig, AnalysisConfig and AllocationConfig fields "
                          "the tabs do not show) and every method's options, by control name; None keeps a default.",
               "__module__": __name__})


def advanced_values(adv) -> list:
    """The Advanced accordion's values in ADVANCED's order (defaults where None)."""
    return [_or(getattr(adv, n), _default(cls, name)) for n, (cls, name) in zip(ADVANCED_NAMES, ADVANCED)]


def method_option_values(adv) -> list:
    """The Method options' values in METHOD_ADVANCED's order (defaults where None)."""
    return [_or(getattr(adv, n), _default(cls, name)) for n, (cls, name) in zip(METHOD_NAMES, METHOD_ADVANCED)]


def _or(value, default):
    return default if value is None else value


def takes_settings(handler: Callable, **groups: type) -> Callable:
    """`handler` as a Gradio event calls it: each parameter named in `groups` (e.g. alloc=AllocationSettings)
    is replaced by one keyword-only parameter per field of that dataclass; the adapter builds the dataclass
    from them and passes it to the handler as the one named value. Its other parameters (the Request, the
    Progress) stay as they are, so Gradio fills them as before; a generator stays a generator."""
    sig = inspect.signature(handler)
    missing = set(groups) - set(sig.parameters)
    assert not missing, f"{handler.__name__} has no parameter {missing}"
    hints = typing.get_type_hints(handler)  # the handlers' annotations are strings (postponed evaluation)
    kept = [p for name, p in sig.parameters.items() if name not in groups]
    own = {param: [f.name for f in fields(cls)] for param, cls in groups.items()}
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
             for param, cls in groups.items() for name, f in zip(own[param], fields(cls))]
    outer = sig.replace(parameters=kept + extra)

    def call_args(args, kw) -> dict:
        bound = outer.bind(*args, **kw)
        named = dict(bound.arguments)
        for param, cls in groups.items():
            named[param] = cls(**{n: named.pop(n) for n in own[param] if n in named})
        return named

    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def adapter(*args, **kw):
            yield from handler(**call_args(args, kw))
    else:
        @functools.wraps(handler)
        def adapter(*args, **kw):
            return handler(**call_args(args, kw))
    adapter.__signature__ = outer
    adapter.__annotations__ = {p.name: hints[p.name] for p in kept if p.name in hints}
    return adapter
