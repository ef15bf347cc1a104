"""Layer-streamed analysis for models that do not fit with whole-model gradients (the
Wanda / SparseGPT / FLAP way): the calibration batches are embedded once, their hidden states
cached (tokens x hidden in the model's dtype, `reconstruct.capture_inputs`), and the blocks
walked one at a time: block i runs on the cached inputs, its statistics accumulate, and its
outputs replace the cache (layer-sequential, on the dense stream, so every block sees exactly
the inputs it sees inside the whole model). No backward pass, no gradient accumulators, no
autograd graph: peak memory is the weights, the activation cache and one block's working set
on one batch.

The scores are the forward-only ones, computed exactly as `importance.analyze` defines them
(the same `scores.Recorder` hooks and `scores.collect` reductions, so the numbers agree to float32
rounding): cosine layer importance (block, attention, MLP), magnitude_l1, magnitude_l2 and
fluctuation (FLAP, activation-based). The gradient metrics (taylor, fisher, act_grad, apt,
taylor_vector) need the whole model's backward: whole-model `analyze()` offers them where the
model fits.

Results are reused through `importance.analyze(cfg.streamed=True)`, which keys them in
explorer.cache like whole-model ones (streamed and whole analyses are separate entries: they agree
only to float32 rounding); calling `analyze_streamed` directly always computes.

`memory_estimate` is the formula the README's "GPU and big models" table is computed from:
what each mode (streamed / whole) holds at its peak for a LLaMA-shaped config.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .config import LABEL_FREE_METRICS, AnalysisConfig
from .errors import Cancelled, ExplorerError
from .models import LoadedModel
from .reconstruct import block_output, capture_inputs
from .scores import MAX_LM_BATCH_TOKENS, Importance, Recorder, collect

STREAMED_METRICS = LABEL_FREE_METRICS  # magnitude_l1, magnitude_l2, fluctuation (and cosine importance)


def check_streamed_metrics(metric: str, metrics: tuple[str, ...] | None = None) -> None:
    """ExplorerError unless `metric` (and every one of `metrics`) is offered by streamed analysis."""
    asked = [metric] + list(metrics or ())
    bad = [m for m in asked if m not in STREAMED_METRICS]
    if bad:
        raise ExplorerError(
            f"layer-streamed analysis offers only the forward-only metrics {', '.join(STREAMED_METRICS)} "
            f"(and cosine layer importance); '{bad[0]}' needs the gradients of the whole model: "
            f"switch streamed analysis off (whole-model analysis, where the model fits) or choose one of those")


def analyze_streamed(lm: LoadedModel, texts: list[str], labels: list[int] | None = None,
                     cfg: AnalysisConfig | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> Importance:
    """Cosine layer importance and the forward-only unit scores (STREAMED_METRICS), block by
    block on cached calibration hidden states; the same Importance as `importance.analyze`.
    `labels` are accepted for symmetry and unused (nothing here needs a task head).
    `progress(i, n_layers)` after each block; `should_stop()` is checked before each block."""
    cfg = cfg or AnalysisConfig()
    if not texts:
        raise ExplorerError("no calibration texts")
    check_streamed_metrics(cfg.metric)
    metrics = STREAMED_METRICS
    model, adapter = lm.model, lm.adapter
    blocks = adapter.blocks(model)
    layers = adapter.layers(model)
    n_layers = len(blocks)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    rec = Recorder(lm, blocks, grads=False, apt=False, fluctuation=True)
    try:
        with torch.no_grad():
            # embeddings once: the first block's inputs (hidden states and kwargs) per batch
            inp = capture_inputs(lm, texts, cfg.batch_size, cfg.max_length or None)
            for m in inp.masks:
                rec.count(m)  # the token count, once per batch (a device scalar, no sync)
            for i in range(n_layers):
                if should_stop and should_stop():
                    raise Cancelled()
                layer = layers[i]
                last = i == n_layers - 1
                for j in range(len(inp.args)):
                    rec.mask = inp.masks[j].float()  # what the hooks weight tokens with
                    out = block_output(layer(*inp.args[j], **inp.kwargs[j]))
                    if not last:
                        inp.set_hidden(j, out.detach())  # the cache moves on to block i's outputs
                    del out
                if progress:
                    progress(i + 1, n_layers)
            del inp
    finally:
        rec.close()
        model.train(was_training)

    return collect(rec, blocks, metrics, cfg.metric, len(texts), t0, cfg.batch_size)


# --- the memory formula ------------------------------------------------------------------------

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# LLaMA shapes for the README table (public configs: TinyLlama-1.1B, Llama-3.1-8B, Llama-3.1-70B).
LLAMA_SHAPES = {
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def _get(config, name, default=None):
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def llama_params(config) -> dict:
    """Parameter counts of a LLaMA-shaped config: per block, embeddings (+ head), total."""
    h, f = _get(config, "hidden_size"), _get(config, "intermediate_size")
    n_heads = _get(config, "num_attention_heads")
    kv = _get(config, "num_key_value_heads") or n_heads
    hd = _get(config, "head_dim") or h // n_heads
    L, V = _get(config, "num_hidden_layers"), _get(config, "vocab_size")
    block = h * n_heads * hd * 2 + h * kv * hd * 2 + 3 * h * f + 2 * h  # q, o, k, v, gate/up/down, 2 norms
    embed = V * h * (1 if _get(config, "tie_word_embeddings", False) else 2) + h  # embeddings, head, final norm
    return {"block": block, "blocks": L * block, "embed": embed, "total": L * block + embed,
            "hidden": h, "intermediate": f, "layers": L, "heads": n_heads, "kv_heads": kv, "head_dim": hd,
            "vocab": V}


def memory_estimate(config, tokens: int, dtype: str = "bfloat16", mode: str = "streamed", *,
                    seq_len: int = 128, batch_size: int = 8, recon: bool = True, keep: float = 0.8,
                    lam_search: bool = True, obs: bool = True) -> dict:
    """Peak memory in bytes (with its parts) of analysis + one stage of pruning with reconstruction
    for a LLaMA-shaped `config` (an HF config or a dict of its fields) on `tokens` calibration
    tokens in `dtype`, run with the library on one device: analysis (streamed: `analyze_streamed`,
    whole: `importance.analyze` with every metric, gradients included), then `reconstruct` (cut and
    refit, layer by layer). `seq_len`: tokens per sample; `batch_size`: samples per batch
    (AnalysisConfig.batch_size; whole-model analysis caps a backward at MAX_LM_BATCH_TOKENS tokens,
    `analysis_batch_size`); `keep`: the kept fraction of the FFN neurons (1 - the stage's sparsity);
    `lam_search`: λ chosen on held-out samples (PruneConfig.recon_lambda 0, the default) or fixed;
    `obs`: units re-chosen by structured OBS (recon_select "obs", the default) or the metric's.

    Parts (b = bytes per weight in `dtype`, B = tokens per batch, h = hidden, C = intermediate size,
    q / kv = query / key-value widths, K = keep·C):
      weights      P·b
      cache        the calibration stream, tokens·h·b (the blocks' inputs; analysis and
                   reconstruction alike), plus one batch's outputs and the saved block input and
                   mid stream for the cosine (3·B·h·b)
      block        one block on one batch: the projections' outputs and the norms / residual
                   temporaries B·(2q + 2kv + 4C + 6h)·b and the float32 copies of the unit
                   activations for the statistics (4·B·C·4); attention by SDPA (transformers' default),
                   whose fused kernels do not materialise the seq_len² scores (eager attention would
                   add B·heads·seq_len·4)
      recon        reconstruction's float64 statistics for the widest projection (down_proj, C input
                   channels), all ×8 bytes: the fit and held-out Gram matrices (2·C²) and, at the
                   peak, the largest of: the λ search's kept blocks G_:,K and G_KK of both (2·(C·K + K²))
                   with the ridge system's temporaries and Cholesky factor (4·K², measured); the final
                   refit on their sum (C² + C·K + K² + 4·K²); with a fixed λ only that refit on the fit
                   statistics (C·K + K² + 4·K²); OBS's centred Gram, H, its factor and H⁻¹ (4·C²);
                   plus the dense weight and its OBS update in float64 (2·h·C·8)
      whole mode adds, for the analysis, the gradients: p.grad in the model dtype for the block
                   parameters (P_blocks·b), the float32 running sum Σ_b ∂L/∂W (P_blocks·4), the
                   activations the backward keeps for every block, L·B·(6h + 4(q + kv) + 5C)·b, and the
                   logits with their log-softmax and gradient in float32 (3·B·vocab·4)
    Peak: weights + cache + max(block, recon) (streamed); weights + max(grads + saved + block,
    cache + max(block, recon)) (whole: the analysis's buffers are freed before reconstruction).
    Not counted: the Python / torch runtime (about 0.4 GiB of RSS on the CPU) and allocator slack
    (on the CPU glibc keeps freed mid-sized buffers: 10-15 % more RSS in the 1 B bench);
    PruningRun (the app and the CLI) also keeps a copy of the last completed stage (+P·b)."""
    if mode not in ("streamed", "whole"):
        raise ValueError(f"mode must be streamed or whole, got '{mode}'")
    name = str(dtype).replace("torch.", "")
    b = DTYPE_BYTES[name]
    p = llama_params(config)
    h, C, L = p["hidden"], p["intermediate"], p["layers"]
    q, kv = p["heads"] * p["head_dim"], p["kv_heads"] * p["head_dim"]
    seq_len = max(1, min(seq_len, tokens))
    samples = max(1, tokens // seq_len)
    B = min(batch_size, samples) * seq_len  # tokens per forward of the streamed analysis and of reconstruction
    weights = p["total"] * b
    cache = tokens * h * b + 3 * B * h * b

    def block_of(n):  # one block's forward on n tokens
        return n * (2 * q + 2 * kv + 4 * C + 6 * h) * b + 4 * n * C * 4

    block = block_of(B)
    K = keep * C
    refit = C * K + K * K + 4 * K * K  # Problem (G_:,K, G_KK) and the ridge solve's temporaries
    work = max(2 * (C * K + K * K) + 3 * K * K, C * C + refit) if lam_search else refit
    if obs:
        work = max(work, 4 * C * C)
    recon_b = (2 * C * C + work) * 8 + 2 * h * C * 8 if recon else 0
    parts = {"weights": weights, "cache": cache, "block": block, "recon": recon_b}
    if mode == "streamed":
        peak = weights + cache + max(block, recon_b)
    else:
        Bg = max(1, min(batch_size, samples, MAX_LM_BATCH_TOKENS // seq_len)) * seq_len  # tokens per backward
        grads = p["blocks"] * (b + 4)
        saved = L * Bg * (6 * h + 4 * (q + kv) + 5 * C) * b + 3 * Bg * p["vocab"] * 4
        parts.update(grads=grads, saved_activations=saved)
        peak = weights + max(grads + saved + block_of(Bg), cache + max(block, recon_b))
    return {"mode": mode, "dtype": name, "tokens": tokens, "params": p["total"],
            "parts": {k: int(v) for k, v in parts.items()}, "peak": int(peak), "peak_gib": peak / 2**30,
            "weights_gib": weights / 2**30, "ratio": peak / weights}
