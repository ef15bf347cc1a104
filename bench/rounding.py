"""`python -m bench.rounding [--rounds 7]`: what rounding kept FFN widths to 8 or 16 buys on this device.

For the bundled models' FFN shapes, the FFN of one block (up [+ gate], activation, down) is timed
at every width of a window of 32 consecutive widths around 60 % of the dense width, in
interleaved rounds (each round times every width once, so a machine getting busier falls on all
alike); medians over the rounds. Each width's time is divided by its width (time per neuron),
and widths that are multiples of 16, of 8 only, and the others are compared: if multiples are
not faster per neuron than their neighbours, `round_to` buys nothing here and its default (1)
stays. Attention units are whole heads (32 or 64 channels), multiples of 16 already.

Writes rounding.json and ROUNDING.md in --out.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from . import common
from .common import generated_line, log, machine, write_json

SHAPES = {  # model: (hidden, dense FFN width, gated, tokens per call: encoder 32 x 128, LM decode batch 1)
    "minilm-rt (32 × 128 forward)": (384, 1536, False, 32 * 128),
    "smollm2-135m (decode, batch 1)": (576, 1536, True, 1),
    "smollm2-135m (prefill, 1 × 256)": (576, 1536, True, 256),
}


class FFN(nn.Module):
    def __init__(self, hidden: int, width: int, gated: bool):
        super().__init__()
        self.up = nn.Linear(hidden, width, bias=not gated)
        self.gate = nn.Linear(hidden, width, bias=False) if gated else None
        self.down = nn.Linear(width, hidden, bias=not gated)

    def forward(self, x):  # x: (tokens, hidden)
        h = self.up(x)  # (tokens, width)
        h = nn.functional.silu(self.gate(x)) * h if self.gate is not None else nn.functional.gelu(h)
        return self.down(h)  # (tokens, hidden)


def time_call(f, x, min_s: float = 0.02) -> float:
    """Seconds per call, from enough calls to last min_s."""
    n, t0 = 0, time.perf_counter()
    while True:
        f(x)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return dt / n


def measure(hidden: int, dense: int, gated: bool, tokens: int, rounds: int, window: int = 32) -> list[dict]:
    start = int(dense * 0.6) // 16 * 16 - window // 2
    widths = list(range(start, start + window))
    ffns = {w: FFN(hidden, w, gated).eval() for w in widths}
    x = torch.randn(tokens, hidden)
    times: dict[int, list[float]] = {w: [] for w in widths}
    with torch.inference_mode():
        for f in ffns.values():  # warm-up
            time_call(f, x, 0.005)
        for _ in range(rounds):
            for w, f in ffns.items():
                times[w].append(time_call(f, x))
    return [{"width": w, "ms": statistics.median(t) * 1e3, "spread_ms": [min(t) * 1e3, max(t) * 1e3]}
            for w, t in times.items()]


def classes(rows: list[dict]) -> dict[str, float]:
    """Median time per neuron (µs) of the multiples of 16, of 8 (not 16) and of the others."""
    def med(pred):
        return statistics.median(r["ms"] * 1e3 / r["width"] for r in rows if pred(r["width"]))
    return {"x16": med(lambda w: w % 16 == 0), "x8": med(lambda w: w % 8 == 0 and w % 16), "other": med(lambda w: w % 8)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rounding")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="bench")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    meta = {"machine": machine(), "load_before": common.load_average(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": args.rounds}
    results = {}
    for name, (hidden, dense, gated, tokens) in SHAPES.items():
        rows = measure(hidden, dense, gated, tokens, args.rounds)
        results[name] = {"rows": rows, "per_neuron_us": classes(rows)}
        log(f"{name}: " + ", ".join(f"{k} {v:.3f} µs" for k, v in results[name]["per_neuron_us"].items()))
    meta["load_after"], meta["seconds"] = common.load_average(), time.perf_counter() - t0
    out = Path(args.out)
    prov = write_json(out / "rounding.json", {"meta": meta, "results": results})
    lines = ["# What rounding FFN widths buys (`python -m bench.rounding`)", "",
             generated_line(f"python -m bench.rounding --rounds {args.rounds}", meta, prov), "",
             "One block's FFN timed at 32 consecutive widths around 60 % of the dense width, interleaved rounds, "
             "medians. Time per neuron (µs) of widths that are multiples of 16, of 8 only, and the others; "
             "*gain* is how much less a multiple of 16 costs per neuron than the others.", "",
             "| shape | ×16 | ×8 | other | gain of ×16 |", "|---|---|---|---|---|"]
    for name, r in results.items():
        c = r["per_neuron_us"]
        lines.append(f"| {name} | {c['x16']:.3f} | {c['x8']:.3f} | {c['other']:.3f} | {1 - c['x16'] / c['other']:+.1%} |")
    (out / "ROUNDING.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {out / 'ROUNDING.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
