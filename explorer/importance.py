"""Importance analysis: per-layer cosine importance and per-unit salience, every metric from one
pass over the calibration data (forward, plus one backward per batch when a metric needs
gradients). `analyze` is the entry point: it checks the request, reuses a cached result
(explorer.cache) and otherwise runs the whole-model pass here or, with `AnalysisConfig.streamed`,
the layer-streamed one (explorer.stream).

What the pass records and how the scores are defined (layer importance and its normalisations,
each salience metric) lives in explorer.scores, which both passes share; the names most callers
need are importable from here too.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from . import cache as result_cache
from . import stream
from .config import LABEL_FREE_METRICS, METRICS, AnalysisConfig
from .errors import Cancelled, ExplorerError
from .models import LoadedModel
from .scores import (LOSS_METRICS, MAX_LM_BATCH_TOKENS, Importance, Recorder, acc_dtype, collect, head_sums,
                     kurtosis_from_moments, normalize, to_acc)

# Re-exported: callers import the result type and the helpers they score with from here.
__all__ = ["GRAD_METRICS", "LOSS_METRICS", "MAX_LM_BATCH_TOKENS", "Importance", "acc_dtype", "analysis_batch_size",
           "analyze", "cache_settings", "kurtosis_from_moments", "normalize"]

# The metrics that need gradients: a backward pass of the whole model (streamed analysis offers none).
GRAD_METRICS = ("taylor", "taylor_vector", "fisher", "act_grad", "apt")


def analysis_batch_size(lm: LoadedModel, cfg: AnalysisConfig, grads: bool) -> int:
    """The calibration batch size, capped for a causal LM's backward pass at MAX_LM_BATCH_TOKENS
    tokens: the logits over the vocabulary and every block's saved activations cost about 1 GB per
    256-token sample on SmolLM2 (measured: 16 samples a batch peaked at 16 GB, 4 at 5 GB)."""
    if not grads or lm.task != "causal-lm":
        return cfg.batch_size
    length = min(cfg.max_length or lm.max_length, lm.max_positions)
    return max(1, min(cfg.batch_size, MAX_LM_BATCH_TOKENS // max(length, 1)))


def _batches(texts, labels, bs):
    for i in range(0, len(texts), bs):
        yield texts[i:i + bs], (labels[i:i + bs] if labels is not None else None)


def analyze(lm: LoadedModel, texts: list[str], labels: list[int] | None = None,
            cfg: AnalysisConfig | None = None, metrics: tuple[str, ...] | None = None,
            progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None, cache: bool = True) -> Importance:
    """One pass over `texts`: cosine importance per layer and salience per head / neuron
    for every metric in `metrics` (default: with a gradient metric, all the task allows; with a
    forward-only one (LABEL_FREE_METRICS), those only: a forward of the transformer body, no
    backward and no LM head, about a third of the time on SmolLM2).

    The result is reused when the same model (every weight's bytes), texts, labels, settings and
    metrics were analysed before (explorer.cache: in memory, then on disk); a reused result has
    `cached` set and the original pass's `seconds`. `cache=False` (or $EXPLORER_CACHE=0) always
    computes; a model with hooks on it is always computed and never stored."""
    cfg = cfg or AnalysisConfig()
    if not texts:
        raise ExplorerError("no calibration texts")
    grads_ok = lm.task == "causal-lm" or (lm.task == "classification" and labels is not None)
    if cfg.metric not in METRICS:
        raise ExplorerError(f"unknown metric '{cfg.metric}': use one of {', '.join(METRICS)}")
    if cfg.streamed:  # block by block on cached activations, forward-only metrics (explorer.stream)
        stream.check_streamed_metrics(cfg.metric, metrics)
        n_layers = len(lm.adapter.layers(lm.model))
        return _cached(lm, texts, labels, cfg, stream.STREAMED_METRICS, cfg.batch_size, n_layers,
                       lambda: stream.analyze_streamed(lm, texts, labels, cfg, progress=progress,
                                                       should_stop=should_stop),
                       progress, should_stop, cache)
    if cfg.metric not in LABEL_FREE_METRICS and not grads_ok:
        raise ExplorerError(f"metric '{cfg.metric}' needs gradients, which need a task head and labels; "
                            f"this {lm.task} model/data only supports {', '.join(LABEL_FREE_METRICS)} (and cosine)")
    if lm.task == "classification" and labels is not None:
        n_cls = lm.model.config.num_labels
        bad = [y for y in labels if not 0 <= int(y) < n_cls]
        if bad:
            raise ExplorerError(f"label {bad[0]} does not match the model's {n_cls} classes "
                                f"({', '.join(map(str, lm.model.config.id2label.values()))})")
    # by default every metric the pass can give at the price the asked one costs: all of them with a
    # gradient metric, the forward-only ones (no backward, no LM head) with a forward-only metric
    metrics = tuple(metrics or (METRICS if grads_ok and cfg.metric not in LABEL_FREE_METRICS else LABEL_FREE_METRICS))
    if cfg.metric not in metrics:
        metrics = metrics + (cfg.metric,)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ExplorerError(f"unknown metric '{unknown[0]}': use one of {', '.join(METRICS)}")
    if not grads_ok and any(m in GRAD_METRICS for m in metrics):
        raise ExplorerError(f"metrics {', '.join(m for m in metrics if m in GRAD_METRICS)} need gradients, which "
                            f"need a task head and labels; use {', '.join(LABEL_FREE_METRICS)}")
    grads = grads_ok and any(m in GRAD_METRICS for m in metrics)
    batch_size = analysis_batch_size(lm, cfg, grads)
    return _cached(lm, texts, labels, cfg, metrics, batch_size, (len(texts) + batch_size - 1) // batch_size,
                   lambda: _analyze_pass(lm, texts, labels, cfg, metrics, grads, batch_size, progress, should_stop),
                   progress, should_stop, cache)


def cache_settings(lm: LoadedModel, texts, labels, cfg: AnalysisConfig, metrics, batch_size: int) -> dict:
    """What an analysis result depends on (explorer.cache keys it by their hash): the model's
    fingerprint (every weight's bytes), the tokenizer, the tokens per sample, the texts and labels,
    the batch size actually used, whole or streamed, the metrics asked for (in order)."""
    return {"model": result_cache.model_fingerprint(lm), "tokenizer": result_cache.tokenizer_digest(lm.tokenizer),
            "max_length": min(cfg.max_length or lm.max_length, lm.max_positions),
            "data": result_cache.data_digest(texts, labels), "samples": len(texts), "batch_size": int(batch_size),
            "streamed": bool(cfg.streamed), "metrics": list(metrics), **result_cache.versions()}


def _cached(lm, texts, labels, cfg, metrics, batch_size, total, compute, progress, should_stop, use) -> Importance:
    """compute(), or its earlier result for the same model, data and settings (explorer.cache)."""
    key = settings = None
    if result_cache.enabled(use):
        try:
            settings = cache_settings(lm, texts, labels, cfg, metrics, batch_size)
            key = result_cache.make_key("importance", settings)
        except Exception as e:  # noqa: BLE001 - Uncacheable (hooks on the model) or a model we cannot fingerprint
            result_cache.skipped("importance", e)
            key = None
    if key is not None:
        hit = result_cache.get("importance", key, Importance.from_cache)
        if hit is not None:
            if should_stop and should_stop():
                raise Cancelled()
            hit.metric, hit.cached = cfg.metric, True  # the metrics are the same; the one to show is the caller's
            if progress:
                progress(total, total)
            return hit
    imp = compute()
    if key is not None:
        result_cache.put("importance", key, imp, Importance.to_cache, settings)
    return imp


def _analyze_pass(lm: LoadedModel, texts, labels, cfg: AnalysisConfig, metrics: tuple[str, ...], grads: bool,
                  batch_size: int, progress, should_stop) -> Importance:
    """The whole-model pass of `analyze` (arguments checked there)."""
    model, adapter = lm.model, lm.adapter
    blocks = adapter.blocks(model)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    # Gradients only for the prunable parameters; activations still carry them through.
    tracked = {id(s.param): s.param for b in blocks for g in (b.attn, b.mlp) for s in g.slices}
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(grads and id(p) in tracked)
        p.grad = None
    # Σ_b ∂L_b/∂W in the accumulation dtype (float32 for a bfloat16 model) on each parameter's device
    gsum = {k: torch.zeros_like(p, dtype=acc_dtype(p.dtype)) for k, p in tracked.items()} if grads else {}
    fisher: dict[tuple[int, str], torch.Tensor | None] = {(b.index, g.kind): None
                                                         for b in blocks for g in (b.attn, b.mlp)}
    rec = Recorder(lm, blocks, grads, "apt" in metrics, "fluctuation" in metrics)
    body = getattr(model, "base_model", model)  # LlamaModel / GPT2Model / BertModel ...; the model itself if bare
    n_batches = (len(texts) + batch_size - 1) // batch_size
    try:
        for bi, (bt, bl) in enumerate(_batches(texts, labels, batch_size)):
            if should_stop and should_stop():
                raise Cancelled()
            batch = lm.encode(bt, bl, max_length=cfg.max_length or None)
            rec.count(batch["attention_mask"])
            if grads:
                out = model(**batch)
                out.loss.backward()
                with torch.no_grad():
                    for k, p in tracked.items():
                        gsum[k] += p.grad
                    if "fisher" in metrics:
                        for b in blocks:
                            for g in (b.attn, b.mlp):
                                ph = head_sums(g, b.heads_per_group if g.kind == "attention" else 1,
                                               lambda s: (to_acc(s.param) * to_acc(s.param.grad)) ** 2)
                                prev = fisher[(b.index, g.kind)]
                                fisher[(b.index, g.kind)] = ph if prev is None else prev + ph
                    for p in tracked.values():
                        p.grad = None
            else:  # forward only: the transformer body alone (the hooks are on its blocks; no head, no loss)
                with torch.no_grad():
                    body(**{k: v for k, v in batch.items() if k != "labels"})
            if progress:
                progress(bi + 1, n_batches)
    finally:
        rec.close()
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
            p.grad = None
        model.train(was_training)

    return collect(rec, blocks, metrics, cfg.metric, len(texts), t0, batch_size, gsum, fisher)
