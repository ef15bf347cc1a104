"""Knowing a plan before running it: a predictor of a plan's val quality.

Measured once per model, data, metric and recovery (and cached on disk, as the latency cost
model is): every layer L is cut *alone* to a few levels s with the run's own cut — the plan's
salience split and unit choice — and, when the recovery reconstructs, the run's own closed-form
refit (explorer.reconstruct, on the same calibration stream a one-stage run uses), and the
whole model is scored on a fixed slice of the val split (`ValScorer`). That gives each layer's
response Δ_L(s), the change of the objective

    language models: log perplexity   (Δ = log ppl(cut L to s) − log ppl(dense))
    classifiers:     accuracy         (Δ = acc(cut L to s) − acc(dense))

A plan with per-layer sparsities s_L is then predicted additively, with one interaction factor α:

    q̂(plan) = q_dense + α · Σ_L Δ_L(s_L)       (log ppl, or accuracy clipped to [0, 1])

Δ_L is piecewise linear through (0, 0) and the measured levels (extrapolated from the last two
beyond them). EvoPress showed that sums of per-layer errors can rank plans wrongly, so the
predictor is checked: `checks` whole plans (uniform at the middle level, then random plans) are
run through the same pipeline and scored; α is fitted on them (least squares through the origin
on the gaps), and the error reported is the leave-one-out error of that fit, as a share of the
dense-to-plan gap. Predicting a plan costs a few interpolations: far under the 100 ms a redraw
may take.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import math
import os
import pathlib
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import cache
from .allocation import Allocation, allocate
from .config import AllocationConfig, AnalysisConfig, PredictConfig, PruneConfig, split_recovery
from .data import TextData
from .errors import Cancelled, ExplorerError
from .importance import Importance
from .models import LoadedModel
from .pruning import apply_allocation, cpu_snapshot, plan_keeps
from .latency import plan_flops
from .latency import predict as predict_cost  # a cost model's ms / FLOPs for per-layer widths
from .reconstruct import _forward_block, _refit_group, capture_inputs, reconstruct
from .scores import average_ranks
from .surgery import prune_block, widths

PREDICTOR_VERSION = 2


def parse_levels(text: str) -> list[float]:
    """'0.25,0.5,0.75' -> [0.25, 0.5, 0.75]; each in (0, 1), at least one."""
    try:
        levels = sorted({float(x) for x in str(text).replace(" ", "").split(",") if x})
    except ValueError:
        raise ExplorerError(f"levels must be comma-separated numbers in (0, 1), got '{text}'") from None
    if not levels or any(not (0 < s < 1) for s in levels):
        raise ExplorerError(f"levels must be comma-separated numbers in (0, 1), got '{text}'")
    return levels


# --- scoring a model on a fixed slice of val -------------------------------------------------------------

class ValScorer:
    """The loss of `lm` on a fixed slice of the **val** split, per row (LM: rows of seq_len tokens of
    the concatenated val texts, EOS between documents) or per example (classifiers), so that a caller
    can score on the first rows only (a search's quick ranking) or on all of them. Tokenised once."""

    def __init__(self, lm: LoadedModel, data: TextData, n: int, seq_len: int = 128, batch_size: int = 16):
        if lm.task not in ("causal-lm", "classification"):
            raise ExplorerError("predicting a plan's quality needs a task head (classification or causal LM)")
        val = data.texts.get("val") or []
        if not val:
            raise ExplorerError(f"data '{data.name}' has no val split to score on")
        self.task, self.batch_size = lm.task, batch_size
        if lm.task == "causal-lm":
            tok = lm.tokenizer
            ids = tok((tok.eos_token or "\n\n").join(val), return_tensors="pt", truncation=False).input_ids[0]
            seq_len = min(seq_len, lm.max_positions)
            rows = max(1, min(len(ids) // seq_len, math.ceil(n / seq_len)))
            if len(ids) < seq_len:
                raise ExplorerError(f"the val split of '{data.name}' has {len(ids)} tokens, fewer than one row "
                                    f"of {seq_len}")
            self.rows = ids[: rows * seq_len].view(rows, seq_len)  # (rows, seq_len)
            self.size = rows * (seq_len - 1)  # scored tokens
            self.unit = "tokens"
        else:
            labels = data.labels["val"]
            self.texts, self.labels = list(val[:n]), list(labels[:n])
            self.rows = None
            self.size = len(self.texts)
            self.unit = "examples"
        self.metric = "perplexity" if lm.task == "causal-lm" else "accuracy"

    def count(self, limit: int | None) -> int:
        """Rows / examples to score to cover `limit` tokens / examples (None: all)."""
        total = len(self.rows) if self.rows is not None else len(self.texts)
        if limit is None:
            return total
        per = self.rows.shape[1] - 1 if self.rows is not None else 1
        return max(1, min(total, math.ceil(limit / per)))

    @torch.inference_mode()
    def losses(self, lm: LoadedModel, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per row / example: (mean loss, quality): LMs: (NLL per token, NLL per token); classifiers:
        (cross-entropy, 1 if correct else 0)."""
        was = lm.model.training
        lm.model.eval()
        k = self.count(limit)
        loss, hit = [], []
        try:
            for i in range(0, k, self.batch_size):
                j = min(k, i + self.batch_size)
                if self.rows is not None:
                    x = self.rows[i:j].to(lm.device)  # (b, T)
                    logits = lm.model(input_ids=x).logits[:, :-1].float()  # (b, T-1, V)
                    nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(1)  # (b,)
                    loss.append(nll.cpu().numpy())
                    hit.append(nll.cpu().numpy())
                else:
                    logits = lm.model(**lm.encode(self.texts[i:j])).logits.float()  # (b, classes)
                    y = torch.as_tensor(self.labels[i:j], device=logits.device)
                    loss.append(F.cross_entropy(logits, y, reduction="none").cpu().numpy())
                    hit.append((logits.argmax(-1) == y).float().cpu().numpy())
        finally:
            lm.model.train(was)
        return np.concatenate(loss), np.concatenate(hit)

    def score(self, lm: LoadedModel, limit: int | None = None) -> dict:
        """{"loss", "objective", "quality", "interval", "n"}: objective is log perplexity (LMs) or accuracy;
        interval: ±1.96 standard errors of the quality (per-row spread of the NLL, or binomial)."""
        loss, hit = self.losses(lm, limit)
        if self.rows is not None:
            mean, se = float(loss.mean()), float(loss.std(ddof=1) / math.sqrt(len(loss))) if len(loss) > 1 else 0.0
            return {"loss": mean, "objective": mean, "quality": math.exp(mean),
                    "interval": [math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)],
                    "n": len(loss) * (self.rows.shape[1] - 1)}
        acc = float(hit.mean())
        half = 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / len(hit))
        return {"loss": float(loss.mean()), "objective": acc, "quality": acc,
                "interval": [max(0.0, acc - half), min(1.0, acc + half)], "n": len(hit)}


def objective_to_quality(metric: str, objective: float) -> float:
    return math.exp(objective) if metric == "perplexity" else float(min(1.0, max(0.0, objective)))


# --- the predictor ------------------------------------------------------------------------------------

@dataclass
class Predictor:
    """Per-layer responses and what they were measured with; `predict` is the additive model."""

    metric: str  # perplexity | accuracy
    dense: float  # the objective of the dense model on the scorer's slice (log ppl or accuracy)
    levels: list[float]
    sparsity: list[list[float]]  # per layer: the actual parameter sparsity at each level (rounded counts)
    delta: list[list[float]]  # per layer: Δ objective at each level
    loss_dense: float = 0.0  # mean val loss of the dense model (NLL per token, or cross-entropy)
    loss_delta: list[list[float]] = field(default_factory=list)  # per layer: Δ loss at each level (ranks plans)
    settings: dict = field(default_factory=dict)
    key: str = ""
    measured_at: str = ""
    seconds: float = 0.0
    alpha: float = 1.0  # interaction correction fitted on the check plans
    checks: list[dict] = field(default_factory=list)  # {"name", "sparsity", "additive", "measured"} (objectives)
    cached: bool = False

    @property
    def n_layers(self) -> int:
        return len(self.delta)

    def layer_delta(self, i: int, s: float, loss: bool = False) -> float:
        """Δ_L(s) of the objective (or, `loss`, of the val loss): piecewise linear through (0, 0) and the
        measured points, extrapolated beyond."""
        xs = np.array([0.0] + list(self.sparsity[i]))
        ys = np.array([0.0] + list((self.loss_delta if loss and self.loss_delta else self.delta)[i]))
        if s <= xs[-1]:
            return float(np.interp(s, xs, ys))
        x0, x1, y0, y1 = xs[-2], xs[-1], ys[-2], ys[-1]
        slope = (y1 - y0) / (x1 - x0) if x1 > x0 else 0.0
        return float(y1 + slope * (s - x1))

    def additive(self, sparsity, loss: bool = False) -> float:
        """Σ_L Δ_L(s_L) (no interaction correction); `loss`: of the val loss, which ranks plans more finely
        than a classifier's accuracy (for language models the two are the same)."""
        s = list(sparsity)
        if len(s) != self.n_layers:
            raise ExplorerError(f"the plan has {len(s)} layers, the predictor was measured on {self.n_layers}")
        loss = loss and bool(self.loss_delta)
        return float(sum(self.layer_delta(i, float(v), loss) for i, v in enumerate(s)))

    def objective(self, sparsity) -> float:
        return self.dense + self.alpha * self.additive(sparsity)

    def predict(self, sparsity) -> float:
        """The predicted val quality (perplexity or accuracy) of a plan given its per-layer sparsities
        (an Allocation's actual sparsities: `plan_sparsity(alloc)`)."""
        return objective_to_quality(self.metric, self.objective(sparsity))

    @property
    def dense_quality(self) -> float:
        return objective_to_quality(self.metric, self.dense)

    def error(self) -> dict | None:
        """The predictor's measured error on the check plans: leave-one-out (α fitted on the others;
        with one check, the uncorrected additive sum) as a share of each plan's dense-to-plan gap, and
        Spearman ρ of predicted against measured when there are 3 or more."""
        if not self.checks:
            return None
        errs, preds = [], []
        for j, c in enumerate(self.checks):
            others = [o for k, o in enumerate(self.checks) if k != j]
            a = fit_alpha(others) if others else 1.0
            pred = self.dense + a * c["additive"]
            gap = abs(c["measured"] - self.dense)
            errs.append(abs(pred - c["measured"]) / gap if gap > 1e-12 else 0.0)
            preds.append(pred)
        out = {"median_share_of_gap": float(np.median(errs)), "max_share_of_gap": float(np.max(errs)),
               "plans": len(self.checks)}
        if len(self.checks) >= 3:
            out["spearman"] = spearman(preds, [c["measured"] for c in self.checks])
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("cached")
        return {"version": PREDICTOR_VERSION, **d}

    @classmethod
    def from_json(cls, d: dict) -> "Predictor":
        if d.get("version") != PREDICTOR_VERSION:
            raise ExplorerError("the predictor file was written by another version")
        d = {k: v for k, v in d.items() if k != "version"}
        return cls(**d)


def fit_alpha(checks: list[dict]) -> float:
    """α minimising Σ (measured − dense − α·additive)² over the checks (through the origin), kept in
    [0.25, 4]; 1 when the additive sums are all zero."""
    num = sum(c["additive"] * (c["measured"] - c["dense"]) for c in checks)
    den = sum(c["additive"] ** 2 for c in checks)
    return float(min(4.0, max(0.25, num / den))) if den > 1e-18 else 1.0


def spearman(a, b) -> float:
    """Spearman's rank correlation: Pearson's r of the average ranks (ties share their mean rank);
    0 when either side is constant (no order to agree with) or has fewer than two values."""
    ra, rb = average_ranks(a), average_ranks(b)  # (n,) each
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def plan_sparsity(alloc: Allocation) -> list[float]:
    """A plan's actual per-layer parameter sparsity (what its rounded counts remove)."""
    return [lp.actual_sparsity for lp in alloc.layers]


# --- measuring --------------------------------------------------------------------------------------

@dataclass
class Recipe:
    """What the measurement shares with a run: the settings a one-stage run would cut and refit with."""

    analysis: AnalysisConfig
    allocation: AllocationConfig
    prune: PruneConfig
    predict: PredictConfig

    @property
    def reconstructs(self) -> bool:
        return split_recovery(self.prune.recovery)[0]

    def signature(self, lm: LoadedModel, data: TextData) -> dict:
        """Everything the measurement depends on (the cache key is its hash)."""
        a, al, p = self.analysis, self.allocation, self.prune
        return {"model": lm.name, "task": lm.task, "dtype": str(next(lm.model.parameters()).dtype),
                "widths": [[w["groups"], w["neurons"]] for w in widths(lm.adapter, lm.model)],
                "params": lm.n_params, "weights": cache.weights_digest(lm.model), "data": data.name,
                "data_sizes": {k: len(v) for k, v in data.texts.items()},
                "val": cache.data_digest(data.texts.get("val") or [], (data.labels or {}).get("val")),
                "metric": a.metric, "samples": a.samples, "max_length": a.max_length, "calibration_seed": a.seed,
                "split": al.split, "round_to": al.round_to, "prune_attention": al.prune_attention,
                "prune_mlp": al.prune_mlp, "max_sparsity": al.max_sparsity,
                "recovery": "reconstruct" if self.reconstructs else "none",
                **({"recon_lambda": p.recon_lambda, "recon_bias": p.recon_bias, "recon_select": p.recon_select,
                    "recon_weighting": p.recon_weighting, "recon_samples": p.recon_samples}
                   if self.reconstructs else {}),
                "predict": asdict(self.predict), "version": PREDICTOR_VERSION}


def key_of(signature: dict) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:24]


def load_cached(signature: dict) -> Predictor | None:
    """The cached predictor for exactly these settings, or None (a file written by another version,
    for other settings, or half-written is ignored and removed)."""
    key = key_of(signature)
    path = cache.cache_dir() / "predictors" / f"{key}.json"
    try:
        d = json.loads(path.read_text())
        pred = Predictor.from_json(d)
        if pred.key != key or pred.settings != signature:
            raise ExplorerError("stale")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, ExplorerError):
        try:
            path.unlink()
        except OSError:
            pass
        return None
    pred.cached = True
    return pred


def save_cached(pred: Predictor) -> pathlib.Path | None:
    """Write atomically; a failing write (full disk, read-only folder) costs the cache, not the result."""
    path = cache.cache_dir() / "predictors" / f"{pred.key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(pred.to_json()))
        os.replace(tmp, path)
        return path
    except OSError:
        return None


def check_fits(pred: Predictor, lm: LoadedModel, data: TextData) -> None:
    """A predictor measured on another model or other data is refused with a message."""
    s = pred.settings
    here = [[w["groups"], w["neurons"]] for w in widths(lm.adapter, lm.model)]
    if s.get("model") != lm.name or s.get("widths") != here:
        raise ExplorerError(f"this predictor was measured on '{s.get('model')}' with other widths: measure it "
                            "again for the loaded model")
    if s.get("data") != data.name:
        raise ExplorerError(f"this predictor was measured on data '{s.get('data')}', not '{data.name}': measure "
                            "it again")


def single_layer_plan(imp: Importance, cfg: AllocationConfig, i: int, s: float) -> Allocation:
    """The plan that cuts layer i alone to s (every other layer kept whole), by the run's split."""
    manual = {j: 0.0 for j in range(imp.n_layers)}
    manual[i] = s
    return allocate(imp.normalized_by(cfg.normalization), imp.params, replace(cfg, mode="exact", target=0.0),
                    manual, scores=imp.unit_scores())


def _bias_for_refit(lm: LoadedModel, i: int) -> None:
    """Give block i's (a copy's) output projections the zero bias a reconstructing run adds to the whole
    model (adapter.enable_output_bias, LLaMA only), so that the refit of the copy is the run's refit."""
    if lm.model.config.model_type != "llama":  # the others have their biases, or no flag for them
        return
    b = lm.adapter.block(lm.model, i)
    for m in (b.attn.out_module, b.mlp.out_module):
        if m.bias is None:
            m.bias = torch.nn.Parameter(torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device))


def _refit_layer(lm: LoadedModel, i: int, inp, keep: tuple[list[int], list[int]], p: PruneConfig) -> None:
    """Cut block i to `keep` and refit it on the stream `inp` (its dense input), exactly as
    `reconstruct` does for each layer: attention first, then the MLP's statistics behind it."""
    layer = lm.adapter.layers(lm.model)[i]
    auto = p.recon_lambda <= 0
    for kind, kept in (("attention", keep[0]), ("mlp", keep[1])):
        block = lm.adapter.block(lm.model, i)
        group = block.attn if kind == "attention" else block.mlp
        if kept is None or len(kept) >= group.n_units:
            continue
        stats = _forward_block(layer, inp, collect=group, auto=auto, relative=p.recon_weighting == "relative")
        _refit_group(group, kept, stats, p.recon_lambda, p.recon_bias, "obs" if p.recon_select == "obs" else "given")
        lm.adapter.after_prune(lm.adapter.block(lm.model, i))


def measure(lm: LoadedModel, data: TextData, imp: Importance, recipe: Recipe,
            progress: Callable[[dict], None] | None = None,
            should_stop: Callable[[], bool] | None = None, use_cache: bool = True) -> Predictor:
    """Measure (or read from the cache) the predictor for `lm` on `data` with `recipe`. `imp` is the
    analysis of the dense model on the run's stage-1 calibration samples (units and split are chosen
    from it, as a one-stage run does). `progress({"done", "total", "eta_s", "phase"})` after each
    measurement; `should_stop()` -> True raises Cancelled with the model untouched."""
    sig = recipe.signature(lm, data)
    use_cache = use_cache and cache.mode() == "disk"  # $EXPLORER_CACHE: off / memory keep nothing on disk
    if use_cache:
        hit = load_cached(sig)
        if hit is not None:
            return hit
    t0 = time.perf_counter()
    cfg = recipe.predict
    levels = parse_levels(cfg.levels)
    scorer = ValScorer(lm, data, cfg.tokens if lm.task == "causal-lm" else cfg.examples, cfg.seq_len,
                       batch_size=recipe.analysis.batch_size)
    n_layers = imp.n_layers
    assert n_layers == len(lm.adapter.layers(lm.model)), "the analysis does not fit the model"
    total = n_layers * len(levels) + cfg.checks
    done = 0

    def tick(phase: str):
        nonlocal done
        done += 1
        if progress:
            el = time.perf_counter() - t0
            progress({"done": done, "total": total, "phase": phase, "seconds": el,
                      "eta_s": el / done * (total - done)})

    def stop():
        if should_stop and should_stop():
            raise Cancelled()

    first = scorer.score(lm)
    dense, dense_loss = first["objective"], first["loss"]
    texts = _recon_texts(data, recipe)
    model, layers = lm.model, lm.adapter.layers(lm.model)
    sparsity, delta, loss_delta = [], [], []
    with torch.no_grad():
        inp = capture_inputs(lm, texts, recipe.analysis.batch_size, recipe.analysis.max_length or None) \
            if recipe.reconstructs else None
        for i in range(n_layers):
            original = layers[i]
            xs, ds, ls = [], [], []
            try:
                for s in levels:
                    stop()
                    plan = single_layer_plan(imp, recipe.allocation, i, s)
                    keep = plan_keeps(imp, plan)[i]
                    layers[i] = copy.deepcopy(original)
                    if recipe.reconstructs:
                        if recipe.prune.recon_bias:
                            _bias_for_refit(lm, i)
                        _refit_layer(lm, i, inp, keep, recipe.prune)
                    else:
                        prune_block(lm.adapter, model, i, *keep)
                    xs.append(plan.layers[i].actual_sparsity)
                    sc = scorer.score(lm)
                    ds.append(sc["objective"] - dense)
                    ls.append(sc["loss"] - dense_loss)
                    tick(f"layer {i} at {s:g}")
            finally:
                layers[i] = original
                lm.adapter.after_prune(lm.adapter.block(model, i))
            sparsity.append(xs)
            delta.append(ds)
            loss_delta.append(ls)
            if inp is not None and i < n_layers - 1:
                _forward_block(original, inp, update=True)  # the dense stream moves on to block i + 1
    del inp
    pred = Predictor(scorer.metric, dense, levels, sparsity, delta, dense_loss, loss_delta, settings=sig, key=key_of(sig),
                     measured_at=_dt.datetime.now().isoformat(timespec="seconds"))
    for name, s in check_plans(imp, recipe, levels, cfg.checks):
        stop()
        measured = run_plan(lm, data, imp, recipe, s, scorer)
        pred.checks.append({"name": name, "sparsity": measured["sparsity"], "dense": dense,
                            "additive": pred.additive(measured["sparsity"]), "measured": measured["objective"]})
        tick(f"check plan {name}")
    pred.alpha = fit_alpha(pred.checks) if pred.checks else 1.0
    pred.seconds = time.perf_counter() - t0
    if use_cache:
        save_cached(pred)
    return pred


def _recon_texts(data: TextData, recipe: Recipe) -> list[str]:
    """The calibration texts a one-stage run refits on (PruningRun._cut, stage 1)."""
    a, p = recipe.analysis, recipe.prune
    texts, _ = data.calibration(p.recon_samples or a.samples, stage=1, seed=a.seed)
    return texts


def check_plans(imp: Importance, recipe: Recipe, levels: list[float], n: int) -> Iterator[tuple[str, list[float]]]:
    """Uniform at the middle level, then random plans around it (same total, levels in [0, S_max])."""
    if n <= 0:
        return
    mid = levels[len(levels) // 2]
    yield "uniform", [mid] * imp.n_layers
    rng = np.random.default_rng(recipe.predict.seed)
    smax = recipe.allocation.max_sparsity
    for j in range(1, n):
        raw = rng.dirichlet(np.ones(imp.n_layers) * 2.0) * mid * imp.n_layers  # (L,) sums to L·mid
        yield f"random {j}", list(np.clip(raw, 0.0, min(smax, 0.9)))


def run_plan(lm: LoadedModel, data: TextData, imp: Importance, recipe: Recipe, levels: list[float],
             scorer: ValScorer) -> dict:
    """Cut the whole model to per-layer `levels` with the run's cut (and refit), score it on the scorer's
    slice, and put the dense model back (a host-memory snapshot, never a second model on the device).
    Returns {"objective", "quality", "sparsity": actual per-layer sparsity}."""
    plan = allocate(imp.normalized_by(recipe.allocation.normalization), imp.params,
                    replace(recipe.allocation, mode="exact", target=0.0),
                    {i: float(s) for i, s in enumerate(levels)}, scores=imp.unit_scores())
    snapshot = cpu_snapshot(lm.model)
    try:
        if recipe.reconstructs:
            p = recipe.prune
            reconstruct(lm, plan_keeps(imp, plan), _recon_texts(data, recipe), lam=p.recon_lambda,
                        fit_bias=p.recon_bias, weighting=p.recon_weighting,
                        select="obs" if p.recon_select == "obs" else "given",
                        batch_size=recipe.analysis.batch_size, max_length=recipe.analysis.max_length or None)
        else:
            apply_allocation(lm, imp, plan)
        sc = scorer.score(lm)
    finally:
        lm.model = snapshot.to(lm.device)
    return {"objective": sc["objective"], "quality": sc["quality"], "sparsity": plan_sparsity(plan)}


# --- what the Allocation tab and `preview` show ------------------------------------------------------------

def plan_speedup(alloc: Allocation, structure: list[dict], head_dim: int, latency=None) -> float:
    """A plan's predicted speed-up over its full widths: by the latency cost model when there is one
    (explorer.latency.cost_model), else the blocks' forward FLOPs, dense ÷ plan."""
    if latency is not None:
        return predict_cost(latency, [(lp.groups, lp.neurons) for lp in alloc.layers]) / predict_cost(
            latency, [(lp.keep_groups, lp.keep_neurons) for lp in alloc.layers])
    before, after = plan_flops(alloc, structure, head_dim)
    return before / after


def speedup_label(latency) -> str:
    return "predicted speed-up (latency cost model)" if latency is not None else "FLOPs reduction (blocks, dense ÷ plan)"


def front(pred: Predictor, imp: Importance, cfg: AllocationConfig, cost: Callable[[Allocation], float],
          amplitudes=(0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)) -> list[dict]:
    """Predicted quality against predicted cost (speed-up or parameters) for uniform and the adaptive
    plans over an A sweep, at cfg's target: [{"name", "amplitude", "quality", "cost"}]."""
    norm, scores = imp.normalized_by(cfg.normalization), imp.unit_scores()
    out = []
    for name, c in [("uniform", replace(cfg, mode="uniform"))] + [
            (f"A={a:g}", replace(cfg, mode="exact", amplitude=a)) for a in amplitudes]:
        try:
            alloc = allocate(norm, imp.params, c, scores=scores)
        except ExplorerError:
            continue
        out.append({"name": name, "amplitude": c.amplitude, "quality": pred.predict(plan_sparsity(alloc)),
                    "cost": cost(alloc), "sparsity": plan_sparsity(alloc)})
    return out
