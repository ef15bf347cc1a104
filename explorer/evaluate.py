"""Evaluation: quality on held-out data (accuracy or perplexity), size, analytic FLOPs and
measured latency. Dense and pruned models are measured the same way."""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

import torch

from . import cache as result_cache
from .data import TextData
from .hidden import fresh_like
from .models import LoadedModel
from .surgery import reshape_to, widths
from .timing import interleaved, random_ids, timed


@torch.inference_mode()
def batched_logits(lm: LoadedModel, texts: list[str], labels: list[int], batch_size: int = 64):
    """Yields (logits, labels) per batch, examples in the given order (eval mode, no grad)."""
    lm.model.eval()
    for i in range(0, len(texts), batch_size):
        logits = lm.model(**lm.encode(texts[i:i + batch_size])).logits.float()  # argmax / loss in float32
        yield logits, torch.as_tensor(labels[i:i + batch_size], device=logits.device)


def accuracy(lm: LoadedModel, texts: list[str], labels: list[int], batch_size: int = 64) -> float:
    """Fraction of correct predictions (examples in the given order, no shuffling)."""
    correct = sum(int((logits.argmax(-1) == y).sum()) for logits, y in batched_logits(lm, texts, labels, batch_size))
    return correct / max(len(texts), 1)


Z95 = 1.959964  # two-sided 95 % normal quantile


def binomial_interval(correct: int, n: int) -> list[float]:
    """95 % Wilson score interval of an accuracy of correct / n (honest at 0 and 1, unlike ±1.96·√(p(1-p)/n))."""
    if n <= 0:
        return [0.0, 1.0]
    p, z2 = correct / n, Z95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def perplexity_interval(token_nll: torch.Tensor, block: int = 128) -> list[float]:
    """95 % interval of a perplexity from its scored tokens' NLLs (in text order): neighbouring
    tokens' losses are correlated, so the standard error of the mean NLL comes from the spread of
    the means of consecutive blocks of `block` tokens (batch means), not from single tokens;
    the interval is exp(mean ± 1.96 SE). Fewer than two blocks: the point, no spread known."""
    nll = token_nll.double().flatten()  # (tokens,)
    mean = float(nll.mean()) if nll.numel() else 0.0
    n_blocks = nll.numel() // block
    if n_blocks < 2:
        return [math.exp(mean), math.exp(mean)]
    means = nll[:n_blocks * block].view(n_blocks, block).mean(1)  # (blocks,)
    se = float(means.std(unbiased=True)) / math.sqrt(n_blocks)
    return [math.exp(mean - Z95 * se), math.exp(mean + Z95 * se)]


def perplexity(lm: LoadedModel, texts: list[str], max_tokens: int = 16384,
               window: int | None = None, stride: int | None = None) -> float:
    """Strided perplexity over the concatenated texts (EOS between documents): each window
    of `window` tokens scores only its last `stride` tokens, so every scored token sees up
    to window-stride tokens of context."""
    return math.exp(float(token_nlls(lm, texts, max_tokens, window, stride).double().mean()))


@torch.inference_mode()
def token_nlls(lm: LoadedModel, texts: list[str], max_tokens: int = 16384,
               window: int | None = None, stride: int | None = None) -> torch.Tensor:
    """`perplexity`'s scored tokens' negative log-likelihoods in text order, (tokens,) float32 on
    the CPU: exp of their mean is the perplexity, their spread its interval."""
    lm.model.eval()
    tok = lm.tokenizer
    sep = tok.eos_token or "\n\n"
    ids = tok(sep.join(texts), return_tensors="pt", truncation=False).input_ids[0][:max_tokens + 1]
    window = window or lm.max_length
    stride = stride or window // 2
    out, prev_end = [], 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        chunk = ids[begin:end].unsqueeze(0).to(lm.device)  # (1, T)
        n_new = end - prev_end  # tokens not scored by an earlier window
        logits = lm.model(input_ids=chunk).logits[0, :-1].float()  # (T-1, vocab): the loss in float32 in every dtype
        nll = torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="none")  # (T-1,)
        out.append(nll[-min(n_new, nll.numel()):].cpu())  # the window's new tokens
        prev_end = end
        if end == len(ids):
            break
    return torch.cat(out) if out else torch.zeros(0)


def flops_per_token(lm: LoadedModel, seq_len: int = 128) -> int:
    """Analytic forward FLOPs per token in the transformer blocks: 2 per weight of every
    matrix multiply, plus attention scores and mixing (2·2·seq·heads·head_dim)."""
    total = 0
    for b in lm.adapter.blocks(lm.model):
        mat = sum(p.numel() for n, p in b.module.named_parameters() if p.dim() == 2)
        total += 2 * mat + 4 * seq_len * b.attn.n_units * b.heads_per_group * b.head_dim
    return int(total)


@torch.inference_mode()
def latency(lm: LoadedModel, batch_size: int = 32, seq_len: int = 128, repeats: int = 5, warmup: int = 2) -> dict:
    """Median wall time of one forward pass on random tokens (after warm-up)."""
    lm.model.eval()
    ids = _random_ids(lm, batch_size, seq_len)  # (B, T)
    times = [s * 1000 for s in interleaved({"model": lambda: _forward_once(lm, ids)}, repeats, warmup)["model"]]
    med = statistics.median(times)
    return {"latency_ms": med, "latency_min_ms": min(times), "latency_max_ms": max(times),
            "latency_spread": (max(times) - min(times)) / med,  # large on a busy machine: read with care
            "batch_size": batch_size, "seq_len": seq_len, "repeats": repeats}


def weight_mb(lm: LoadedModel) -> float:
    """Memory of the weights and buffers in MB (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(lm.model.parameters()) + list(lm.model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 1e6


@torch.inference_mode()
def _decode_once(lm: LoadedModel, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Greedy generation with the KV cache, timed in two parts: (prefill s, decode s of new_tokens - 1 steps)."""
    model, state = lm.model, {}

    def prefill():
        state["out"] = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # logits (B, 1, V)
        state["next"] = state["out"].logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)

    def decode():
        out, nxt = state["out"], state["next"]
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt, cache=out.cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    return timed(prefill, lm.device), timed(decode, lm.device)


def _random_ids(lm: LoadedModel, batch_size: int, seq_len: int) -> torch.Tensor:
    """(B, T) fixed random tokens on the model's device (explorer.timing.random_ids)."""
    return random_ids(lm.model.config.vocab_size, batch_size, seq_len, lm.device)


@torch.inference_mode()
def _forward_once(lm: LoadedModel, ids: torch.Tensor) -> float:
    """Seconds of one forward pass over `ids` (B, T), no padding."""
    mask = torch.ones_like(ids)  # (B, T)
    return timed(lambda: lm.model(input_ids=ids, attention_mask=mask), lm.device)


@dataclass(frozen=True)
class SpeedSetup:
    """What the speed figures refer to (stated next to them in every report)."""
    prompt_len: int = 32  # LMs: prompt tokens (prefill)
    new_tokens: int = 16  # LMs: generated tokens per measurement (greedy, KV cache)
    decode_batches: tuple[int, ...] = (1, 8)
    encoder_shapes: tuple[tuple[int, int], ...] = ((1, 128), (32, 128))  # (batch, seq) for encoders
    repeats: int = 3  # timed repeats per figure after one warm-up; the median is reported


def _speed_samples(lm: LoadedModel, setup: SpeedSetup) -> dict[str, float]:
    """One measurement of every figure (no warm-up)."""
    lm.model.eval()
    if lm.task == "causal-lm":
        out = {}
        for b in setup.decode_batches:
            prefill, decode = _decode_once(lm, _random_ids(lm, b, setup.prompt_len), setup.new_tokens)
            out["decode_tokens_per_s" + (f"_b{b}" if b != 1 else "")] = b * (setup.new_tokens - 1) / max(decode, 1e-9)
            if b == 1:
                out["prefill_ms"] = prefill * 1000
        return out
    return {f"latency_b{b}x{t}_ms": _forward_once(lm, _random_ids(lm, b, min(t, lm.max_positions))) * 1000
            for b, t in setup.encoder_shapes}


def speed(lm: LoadedModel, setup: SpeedSetup = SpeedSetup()) -> dict:
    """Speed as users feel it: for LMs decode tokens/s with the KV cache (batch 1 and 8) and
    prefill (time to first token, batch 1); for encoders latency at batch 1 and 32 x 128. Medians
    of `setup.repeats` after a warm-up, with min/max; plus weight memory."""
    return compare_speed({"model": lm}, setup)["model"]


def compare_speed(models: dict[str, LoadedModel], setup: SpeedSetup = SpeedSetup()) -> dict[str, dict]:
    """The same figures for several models measured interleaved (round r times every model once),
    so that a machine getting busier or quieter shifts them all alike. Per model: the median and
    [min, max] of each figure, weight MB; and `speedup` of every figure over the first model."""
    rounds = interleaved({name: (lambda lm=lm: _speed_samples(lm, setup)) for name, lm in models.items()},
                         setup.repeats, warmup=1)  # name -> one {figure: value} per timed round
    samples = {name: {k: [r[k] for r in rs] for k in (rs[0] if rs else {})} for name, rs in rounds.items()}
    out = {}
    for name, lm in models.items():
        fig = {k: statistics.median(v) for k, v in samples[name].items()}
        fig["spread"] = {k: [min(v), max(v)] for k, v in samples[name].items()}
        fig["weight_mb"] = weight_mb(lm)
        fig["setup"] = asdict(setup) | {"device": str(lm.device)}
        out[name] = fig
    first = next(iter(out.values()))
    for name, fig in out.items():
        fig["speedup"] = {k: (v / first[k] if k.startswith("decode") else first[k] / v)
                          for k, v in fig.items() if isinstance(v, float) and k in first and k != "weight_mb"}
    return out


def quality(lm: LoadedModel, data: TextData, eval_samples: int = 0, split: str = "test") -> dict:
    """Accuracy (classifiers) or perplexity (LMs) on a held-out split: "test" for figures,
    "val" while choosing (A, λ, steps, …), with its 95 % interval (`accuracy_ci`: Wilson;
    `perplexity_ci`: batch means of the tokens' NLLs). Records the split and the real number of
    examples."""
    if split not in ("val", "test"):
        raise ValueError(f"evaluation split must be val or test, got '{split}'")
    if lm.task == "classification":
        if not data.has_labels:
            raise ValueError("accuracy needs a labelled data set")
        n = min(eval_samples or len(data.texts[split]), len(data.texts[split]))
        acc = accuracy(lm, data.texts[split][:n], data.labels[split][:n])
        return {"accuracy": acc, "accuracy_ci": binomial_interval(round(acc * n), n), "eval_examples": n,
                "eval_split": split}
    if lm.task == "causal-lm":
        n = eval_samples or 16384
        nll = token_nlls(lm, data.texts[split], max_tokens=n)  # (scored tokens,)
        return {"perplexity": math.exp(float(nll.double().mean())), "perplexity_ci": perplexity_interval(nll),
                "eval_tokens": int(nll.numel()), "eval_split": split}  # the tokens really scored (≤ n: the split may be shorter)
    return {}


def quality_settings(lm: LoadedModel, data: TextData, eval_samples: int, split: str) -> dict:
    """What `quality` depends on (explorer.cache keys it by their hash): the model's fingerprint
    (every weight's bytes), the tokenizer, the window (lm.max_length), the split's texts and labels,
    how many examples / tokens are scored."""
    labels = data.labels[split] if lm.task == "classification" and data.has_labels else None
    return {"model": result_cache.model_fingerprint(lm), "tokenizer": result_cache.tokenizer_digest(lm.tokenizer),
            "max_length": lm.max_length, "max_positions": lm.max_positions,
            "data": result_cache.data_digest(data.texts[split], labels), "eval_samples": int(eval_samples or 0),
            "split": split, **result_cache.versions()}


def cached_quality(lm: LoadedModel, data: TextData, eval_samples: int = 0, split: str = "test",
                   cache: bool = True) -> tuple[dict, bool]:
    """(`quality(...)`, whether it was reused): the result of an earlier evaluation of the same
    weights on the same data and settings when there is one (explorer.cache), else measured now
    and stored. A model with hooks on it is always measured."""
    key = settings = None
    if split in ("val", "test") and lm.task in ("classification", "causal-lm") and result_cache.enabled(cache):
        try:
            settings = quality_settings(lm, data, eval_samples, split)
            key = result_cache.make_key("quality", settings)
        except Exception as e:  # noqa: BLE001 - Uncacheable (hooks on the model) or inputs we cannot fingerprint
            result_cache.skipped("quality", e)
    if key is not None:
        hit = result_cache.get("quality", key, dict)
        if hit is not None:
            return hit, True
    q = quality(lm, data, eval_samples, split)
    if key is not None:
        result_cache.put("quality", key, q, dict, settings)
    return q, False


def evaluate(lm: LoadedModel, data: TextData, eval_samples: int = 0, timing: bool = True,
             batch_size: int = 32, seq_len: int = 128, speed_setup: SpeedSetup | None = None,
             split: str = "test", cache: bool = True) -> dict:
    """Everything the reports show for one model: quality, size, FLOPs; with `timing`, the
    forward latency at batch_size x seq_len and, with a `speed_setup`, the speed figures.

    The quality figure (accuracy / perplexity, the slow part) is reused when the same weights were
    evaluated on the same data and settings before (explorer.cache; `cache=False` or
    $EXPLORER_CACHE=0 always measures); the result then says `quality_cached: True`. Size and FLOPs
    are computed, and timings always measured, now: a timing is a fact about this machine at this
    moment, and reports compare it with other models timed in the same session."""
    q, reused = cached_quality(lm, data, eval_samples, split, cache)
    out = {"params": lm.n_params, "block_params": lm.block_params, "weight_mb": weight_mb(lm),
           "flops_per_token": flops_per_token(lm, seq_len), **q}
    if reused:
        out["quality_cached"] = True
    if timing:
        if lm.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out.update(latency(lm, batch_size=batch_size, seq_len=seq_len))
        if speed_setup is not None:
            out["speed"] = speed(lm, speed_setup)
        if lm.device.type == "cuda":
            out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def metric_name(lm: LoadedModel) -> str:
    return {"classification": "accuracy", "causal-lm": "perplexity"}.get(lm.task, "")


def even_split(total: int, n: int) -> list[int]:
    """`total` units over `n` layers as evenly as integers allow (divmod): the first
    total % n layers get one unit more, e.g. 78 over 30 -> 18 layers of 3 and 12 of 2."""
    q, r = divmod(int(total), n)
    return [q + 1] * r + [q] * (n - r)


def same_width_reference(lm: LoadedModel) -> LoadedModel:
    """The same-width limit of a pruned model: a dense-structured model (built from the config,
    same hidden size and depth) with exactly the pruned model's *total* attention units (KV
    groups) and *total* FFN neurons, spread as evenly as integers allow (`even_split`). It has
    the pruned widths, only evenly laid out, so its speed-up is what those widths allow; a
    rounded mean width would not be (3 groups where the pruned model averages 2.6 is a limit
    that cannot fail). Random weights; for timing only."""
    ws = widths(lm.adapter, lm.model)
    groups = even_split(sum(w["groups"] for w in ws), len(ws))
    neurons = even_split(sum(w["neurons"] for w in ws), len(ws))
    model = fresh_like(lm).to(lm.device).eval()  # the pruned hidden size too, in the model's dtype
    dense_depth = len(lm.adapter.layers(model))
    assert dense_depth == len(ws), "reference must have the pruned depth"
    reshape_to(lm.adapter, model, [{"groups": g, "neurons": n} for g, n in zip(groups, neurons)])
    return LoadedModel(model, lm.tokenizer, lm.task, lm.name + " (same-width dense)", lm.adapter, lm.device,
                       lm.default_data, lm.max_length)


def interleaved_latency(models: dict[str, LoadedModel], batch_size: int = 32, seq_len: int = 128,
                        repeats: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """ms of one forward pass of every model, timed in turn (round r times every model once, as
    compare_speed does), so a machine getting busier or quieter shifts them all alike."""
    calls = {}
    for name, lm in models.items():
        lm.model.eval()
        ids = _random_ids(lm, batch_size, min(seq_len, lm.max_positions))  # (B, T)
        calls[name] = lambda lm=lm, ids=ids: _forward_once(lm, ids) * 1000
    return interleaved(calls, repeats, warmup)


def speedup_report(dense: LoadedModel | float, lm: LoadedModel, batch_size: int = 32, seq_len: int = 128,
                   repeats: int = 5, warmup: int = 1) -> dict:
    """Measured speed-up of `lm` over dense and over its same-width limit (`same_width_reference`),
    dense, pruned and reference timed interleaved in one process. Per repeat r the fraction of
    the limit is reference_r / pruned_r; the report gives its median and [min, max] spread. A
    limit slower than dense (limit_speedup < 1) says the measurement is noise at these widths:
    flagged `limit_is_noise` and no fraction is counted. `dense` may be a time in ms (older
    callers): then it is not re-timed and its spread is that one value."""
    ref = same_width_reference(lm)
    models = {"pruned": lm, "reference": ref} if isinstance(dense, (int, float)) else \
        {"dense": dense, "pruned": lm, "reference": ref}
    times = interleaved_latency(models, batch_size, seq_len, repeats, warmup)
    dense_times = times.get("dense") or [float(dense)] * repeats
    med = {k: statistics.median(v) for k, v in (("dense", dense_times), ("pruned", times["pruned"]),
                                                  ("reference", times["reference"]))}
    fractions = [r / p for r, p in zip(times["reference"], times["pruned"])]
    limit = med["dense"] / med["reference"]
    noise = limit < 1
    ws = widths(ref.adapter, ref.model)
    return {"dense_ms": med["dense"], "pruned_ms": med["pruned"], "same_width_ms": med["reference"],
            "dense_ms_spread": [min(dense_times), max(dense_times)],
            "pruned_ms_spread": [min(times["pruned"]), max(times["pruned"])],
            "same_width_ms_spread": [min(times["reference"]), max(times["reference"])],
            "speedup": med["dense"] / med["pruned"], "limit_speedup": limit,
            "fraction_of_limit": None if noise else statistics.median(fractions),
            "fraction_of_limit_spread": None if noise else [min(fractions), max(fractions)],
            "limit_is_noise": noise,
            "same_width_groups": [w["groups"] for w in ws], "same_width_neurons": [w["neurons"] for w in ws],
            "batch_size": batch_size, "seq_len": seq_len, "repeats": repeats}
