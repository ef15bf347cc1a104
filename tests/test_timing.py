"""explorer.timing: the one timing loop the speed figures, the cost models and the benches share."""
from __future__ import annotations

import time

import torch

from explorer.timing import interleaved, random_ids, timed


def test_random_ids_are_fixed_and_skip_the_first_ids():
    a, b = random_ids(1000, 2, 7), random_ids(1000, 2, 7)
    assert a.shape == (2, 7) and a.dtype == torch.int64 and torch.equal(a, b)  # the same tokens every call
    assert int(a.min()) >= 5 and int(a.max()) < 1000
    assert int(random_ids(3, 4, 4).min()) >= 2  # a tiny vocabulary still has ids to draw


def test_timed_measures_the_call():
    assert 0.02 <= timed(lambda: time.sleep(0.02)) < 1.0


def test_interleaved_calls_in_rounds_and_drops_the_warmup():
    order = []
    calls = {name: (lambda name=name: order.append(name) or len(order)) for name in ("a", "b", "c")}
    got = interleaved(calls, repeats=2, warmup=1)
    assert order == ["a", "b", "c"] * 3  # round r calls every entry once, in order
    assert got == {"a": [4, 7], "b": [5, 8], "c": [6, 9]}  # the warm-up round's results are not kept
