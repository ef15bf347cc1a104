"""Cost of analysis: explorer.importance.analyze (every metric the task allows, one pass)
against a plain forward + backward over the same calibration data (same batches, same
tokens, all parameters trainable, as one training step without the optimiser). The two are
run alternately, several times, and the ratio of the medians is reported, for a few
calibration-set sizes and for each model size."""
from __future__ import annotations

import time

from explorer.config import AnalysisConfig
from explorer.importance import analyze

from .common import log, median
from .config import ModelBench


def plain_forward_backward(lm, texts, labels, batch_size: int, max_length: int = 0) -> None:
    model = lm.model
    model.eval()  # as analyze does (no dropout)
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    for i in range(0, len(texts), batch_size):
        bt = texts[i:i + batch_size]
        bl = labels[i:i + batch_size] if labels is not None else None
        batch = lm.encode(bt, bl, max_length=max_length or None)
        model(**batch).loss.backward()
    for p in model.parameters():
        p.grad = None


def run_cost(base, data, mb: ModelBench) -> list[dict]:
    lm = base  # analysis leaves the weights untouched; no copy needed
    rows = []
    for n in mb.cost_samples:
        texts, labels = data.calibration(n, seed=0)
        if lm.task != "classification":
            labels = None
        cfg = AnalysisConfig(samples=n, batch_size=mb.cost_batch, max_length=mb.cost_max_length)
        t_an, t_fb = [], []
        tokens = 0
        analyze(lm, texts[: mb.cost_batch], labels[: mb.cost_batch] if labels else None, cfg)  # warm-up
        for _ in range(mb.cost_repeats):
            t = time.perf_counter()
            imp = analyze(lm, texts, labels, cfg)
            t_an.append(time.perf_counter() - t)
            tokens = imp.tokens
            t = time.perf_counter()
            plain_forward_backward(lm, texts, labels, mb.cost_batch, mb.cost_max_length)
            t_fb.append(time.perf_counter() - t)
        a, p = median(t_an), median(t_fb)
        row = {"model": base.name, "samples": n, "ratio": a / p, "analysis_s": a, "forward_backward_s": p,
               "analysis_s_all": t_an, "forward_backward_s_all": t_fb, "tokens": tokens,
               "batch_size": mb.cost_batch, "max_length": mb.cost_max_length or lm.max_length,
               "params": lm.n_params, "metrics": sorted(imp.heads), "repeats": mb.cost_repeats}
        rows.append(row)
        log(f"  {base.name} {n} samples ({tokens} tokens): analysis {a:.2f} s, plain forward+backward {p:.2f} s "
            f"-> ratio {a / p:.2f}")
    return rows
