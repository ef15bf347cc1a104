"""Wall-clock timing, one way everywhere: the speed figures (explorer.evaluate), the cost models
(explorer.latency) and the benches (bench.common) time their forwards with these.

  random_ids   the tokens a timing runs on: fixed (seed 0), so every model sees the same input
  sync         wait for the device's queued work, so that wall time measures the work
  timed        seconds of one call, the device drained before and after
  interleaved  several things timed in turn: round r calls each once, so that a machine getting
               busier or quieter shifts them all alike
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def random_ids(vocab_size: int, batch: int, seq: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch, seq) token ids drawn from a generator seeded with 0 (the same ids on every call), in
    [min(5, vocab_size - 1), vocab_size): the first ids are special tokens in most vocabularies."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(min(5, vocab_size - 1), vocab_size, (batch, seq), generator=g).to(device)  # (B, T)


def sync(device: torch.device | str | None = None) -> None:
    """Wait for `device`'s queued kernels (CUDA launches return before the work is done); a no-op on
    the CPU. `None`: the current CUDA device, when there is one."""
    if device is None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Seconds of one `call()`, with `device` drained before (earlier work is not counted) and
    after (its own work is)."""
    sync(device)
    t0 = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - t0


def interleaved(calls: dict[str, Callable[[], T]], repeats: int, warmup: int = 1) -> dict[str, list[T]]:
    """`warmup` rounds, then `repeats` rounds, each calling every entry of `calls` once in order.
    Returns, per entry, what its call returned in the `repeats` timed rounds (seconds from `timed`,
    or a dict of figures): the warm-up rounds' results are dropped."""
    out: dict[str, list[T]] = {name: [] for name in calls}
    for r in range(warmup + repeats):
        for name, call in calls.items():
            result = call()
            if r >= warmup:
                out[name].append(result)
    return out
