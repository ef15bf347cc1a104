"""`python -m bench.decode [--mode quick|smoke] [--out bench/]`: speed as users feel it.

For each model, the dense architecture and the uniform plans at each budget (proportional
attention/FFN split; speed depends on the architecture only, so each plan is a dense copy
sliced to its widths) are timed **interleaved in one process** with
`explorer.evaluate.compare_speed`: every repeat measures every model once, in turn.
  * causal LMs: decode tokens/s with the KV cache at batch 1 and 8 (greedy, fixed random
    prompt of 32 tokens, 16 new tokens), prefill (time to first token) at batch 1;
  * encoders: latency at 1 x 128 and 32 x 128;
  * every model: weight MB; and the ONNX file of each plan run by onnxruntime against PyTorch
    on the same held-out sentences (explorer.export.export, checked).
Median and [min, max] over the repeats. Writes decode.json and DECODE.md in --out.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import common  # noqa: F401  (offline environment first)
from .common import generated_line, load, log, machine, with_widths, write_json


@dataclass
class Case:
    model: str
    budgets: list[float]
    repeats: int
    onnx: bool = True


PRESETS = {
    "quick": [Case("smollm2-135m", [0.2, 0.4], 5), Case("minilm-rt", [0.2, 0.4, 0.6], 7)],
    "smoke": [Case("tiny-llama", [0.3], 2), Case("tiny-bert", [0.3], 2)],
}


def uniform_widths(lm, budget: float) -> list[dict]:
    """Per-layer widths of the uniform plan (proportional split) at `budget` of the block parameters."""
    from explorer.allocation import allocate
    from explorer.config import AllocationConfig

    from .tp_baseline import structure
    st = structure(lm)
    plan = allocate(np.zeros(len(st)), st, AllocationConfig(target=budget, mode="uniform", split="proportional"))
    return [{"groups": lp.keep_groups, "neurons": lp.keep_neurons} for lp in plan.layers]


def run_case(case: Case, setup_kw: dict) -> dict:
    from explorer.evaluate import SpeedSetup, compare_speed
    from explorer.export import export
    base, _ = load(case.model)
    models = {"dense": base}
    for b in case.budgets:
        models[f"uniform {b:.0%}"] = with_widths(base, uniform_widths(base, b))
    setup = SpeedSetup(repeats=case.repeats, **setup_kw)
    t0 = time.perf_counter()
    speed = compare_speed(models, setup)
    log(f"{case.model}: timed {len(models)} models x {case.repeats} interleaved repeats in "
        f"{time.perf_counter() - t0:.0f} s")
    rows = []
    for name, lm in models.items():
        row = {"name": name, "params": lm.n_params, "block_params": lm.block_params, **speed[name]}
        if case.onnx:
            with tempfile.TemporaryDirectory() as d:
                res = export(lm, "onnx", Path(d) / "m.onnx")
                row["onnx"] = {k: res["check"][k] for k in ("max_abs_diff", "max_rel_diff", "ok", "onnx_ms",
                                                             "torch_ms", "batch_size", "seq_len")}
                row["onnx_mb"] = res["bytes"] / 1e6
        rows.append(row)
        log(f"  {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in speed[name].items() if isinstance(v, float))
            + (f"; onnx {row['onnx']['onnx_ms']:.1f} ms vs torch {row['onnx']['torch_ms']:.1f} ms" if case.onnx else ""))
    return {"model": case.model, "task": base.task, "rows": rows, "setup": speed["dense"]["setup"]}


FIGS = {"causal-lm": [("decode_tokens_per_s", "decode tok/s b1"), ("decode_tokens_per_s_b8", "decode tok/s b8"),
                      ("prefill_ms", "prefill ms b1")],
        "classification": [("latency_b1x128_ms", "latency ms 1×128"), ("latency_b32x128_ms", "latency ms 32×128")]}


def render(results: list[dict], meta: dict, prov: dict | None = None) -> str:
    lines = ["# Speed as users feel it (`python -m bench.decode`)", "",
             generated_line(f"python -m bench.decode --mode {meta['mode']}", meta, prov), "",
             "Dense and the uniform plans (proportional split) timed interleaved in one process: each repeat "
             "measures every model once in turn; median [min–max] over the repeats, speed-up of the medians over "
             "dense. LMs: greedy decode with the KV cache after a 32-token random prompt, 16 new tokens; prefill = "
             "time to first token. ONNX: the same model exported and run by onnxruntime (CPU), max |Δ| of the "
             "outputs against PyTorch on 4 held-out sentences, latency of one batch of them, interleaved with PyTorch.",
             ""]
    for res in results:
        figs = FIGS.get(res["task"], FIGS["classification"])
        lines += [f"## {res['model']}", ""]
        head = "| model | params (M) | weights MB | " + " | ".join(f"{label} | ×" for _, label in figs) \
            + " | ONNX ms | PyTorch ms | ONNX max abs diff |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in res["rows"]:
            cells = []
            for k, _ in figs:
                lo, hi = r["spread"].get(k, [r[k], r[k]])
                cells += [f"{r[k]:.1f} [{lo:.1f}–{hi:.1f}]", f"{r['speedup'].get(k, 1.0):.2f}x"]
            o = r.get("onnx")
            onnx = (f"{o['onnx_ms']:.1f} | {o['torch_ms']:.1f} | {o['max_abs_diff']:.1e}" if o else "– | – | –")
            lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f} | {r['weight_mb']:.0f} | " + " | ".join(cells)
                         + f" | {onnx} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import torch
    ap = argparse.ArgumentParser(prog="python -m bench.decode")
    ap.add_argument("--mode", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--out", default="bench")
    ap.add_argument("--models", default=None, help="comma-separated subset of the preset's models")
    args = ap.parse_args(argv)
    if args.mode == "smoke":
        torch.set_num_threads(1)
    cases = [c for c in PRESETS[args.mode] if not args.models or c.model in args.models.split(",")]
    setup_kw = {"new_tokens": 4} if args.mode == "smoke" else {}
    t0 = time.perf_counter()
    meta = {"mode": args.mode, "machine": machine(), "load_before": common.load_average(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results = [run_case(c, setup_kw) for c in cases]
    meta.update(seconds=time.perf_counter() - t0, load_after=common.load_average())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prov = write_json(out / "decode.json", {"meta": meta, "results": results})
    (out / "DECODE.md").write_text(render(results, meta, prov))
    log(f"wrote {out / 'DECODE.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
