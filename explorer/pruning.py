"""Incremental structural pruning with recovery (Adapt-Accel).

From dense to the target in K stages. Each stage: re-estimate importance on fresh
calibration samples, re-allocate per-layer sparsity with the same A, physically remove the
least salient units, recover, evaluate. With AllocationConfig.budget "flops" or "latency" each
stage's plan meets a FLOPs cut or a predicted speed-up instead of a parameter count (see
explorer.latency): the cost model is built once, at the start, and stage k of K aims at
k/K of the FLOPs cut, or at speedup ** (k/K). `PruningRun.events()` is a generator yielding one
record per stage (and per recovery step) so the UI and the CLI can stream it; `stop()`
cancels between steps and leaves the last completed model in place.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .allocation import Allocation, allocate
from .allocation import validate as validate_allocation
from .config import AllocationConfig, AnalysisConfig, PruneConfig, split_recovery
from .config import validate as validate_config
from .data import TextData
from .errors import OOM_HINT, Cancelled, DataError, ExplorerError, is_oom
from .evaluate import SpeedSetup, evaluate, metric_name, quality
from .hidden import prune_hidden_fraction
from .importance import Importance, analyze
from .latency import FlopsModel, allocate_flops, allocate_latency, predict
from .latency import cost_model as latency_cost_model  # `cost_model` is also a PruningRun argument
from .models import LoadedModel
from .reconstruct import reconstruct
from .recovery import recover_steps
from .surgery import drop_layers, prune_block, widths, zeroed_units


def choose_units(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k highest scores, ties broken by the lower index; sorted."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))  # by -score, then index
    return sorted(int(i) for i in order[:k])


def stage_sparsity(original: int, current: int, target: float, k: int, stages: int) -> float:
    """Adapt-Accel's linear schedule: the sparsity to cut from the *current* blocks at stage k of
    `stages` so that (1 - target·k/stages) of the `original` block parameters remain."""
    goal = original * (1 - target * k / stages)
    return max(0.0, 1 - goal / current)


def plan_keeps(imp: Importance, alloc: Allocation, metric: str | None = None) -> list[tuple[list[int], list[int]]]:
    """Per layer (attention units, neurons) to keep: the most salient by `metric`."""
    m = metric or imp.metric
    return [(choose_units(imp.groups[m][lp.index], lp.keep_groups),
             choose_units(imp.neurons[m][lp.index], lp.keep_neurons)) for lp in alloc.layers]


def apply_allocation(lm: LoadedModel, imp: Importance, alloc: Allocation, metric: str | None = None) -> None:
    """Prune every layer to its allocated counts, keeping the most salient units."""
    assert len(alloc.layers) == len(lm.adapter.layers(lm.model)), "allocation does not fit the model"
    for lp, (keep_g, keep_n) in zip(alloc.layers, plan_keeps(imp, alloc, metric)):
        prune_block(lm.adapter, lm.model, lp.index, keep_g, keep_n)
    check_widths(lm, alloc)


def cpu_snapshot(model: nn.Module) -> nn.Module:
    """A copy of `model` in host memory, made without a second copy on the accelerator: each
    parameter and buffer is copied straight to the CPU and the module tree deep-copied around
    those host tensors (tied weights stay tied). On a CPU model it is a plain deep copy."""
    memo: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "cpu" and id(t) not in memo:
            host = t.detach().to("cpu", copy=True)
            memo[id(t)] = nn.Parameter(host, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else host
    snap = copy.deepcopy(model, memo)
    assert all(p.device.type == "cpu" for p in snap.parameters()), "the snapshot left a tensor on the device"
    return snap


def check_widths(lm: LoadedModel, alloc: Allocation) -> None:
    for lp, w in zip(alloc.layers, widths(lm.adapter, lm.model)):
        assert (w["groups"], w["neurons"]) == (lp.keep_groups, lp.keep_neurons), (lp.index, w)


def interpolate_plan(final: Allocation, current: list[dict], original: list[dict], frac: float,
                     template: AllocationConfig) -> Allocation:
    """Counts for a stage that moves each layer `frac` of the way from its original widths
    to a fixed final plan (used when the user edited the per-layer table by hand)."""
    layers = []
    for lp, cur, org in zip(final.layers, current, original):
        g = int(round(org["groups"] - (org["groups"] - lp.keep_groups) * frac))
        n = int(round(org["n_neurons"] - (org["n_neurons"] - lp.keep_neurons) * frac))
        g, n = max(1, min(g, cur["groups"])), max(1, min(n, cur["n_neurons"]))
        after = cur["block_params"] - (cur["groups"] - g) * cur["group_params"] - (cur["n_neurons"] - n) * cur["neuron_params"]
        layers.append(replace(lp, keep_groups=g, keep_neurons=n, groups=cur["groups"], neurons=cur["n_neurons"],
                              params_before=cur["block_params"], params_after=int(after)))
    return Allocation(layers, template.target, template.amplitude, "manual")


def check_pairing(lm: LoadedModel, data: TextData) -> None:
    """A classifier needs labelled data with no more classes than its head has."""
    if lm.task == "classification" and not data.has_labels:
        raise DataError(f"data '{data.name}' has no labels, but '{lm.name}' is a classifier")
    if lm.task == "classification" and data.num_labels > lm.model.config.num_labels:
        raise DataError(f"data '{data.name}' has {data.num_labels} classes but the model's head has "
                        f"{lm.model.config.num_labels}")


@dataclass
class StageRecord:
    stage: int
    params: int
    block_params: int
    removed_fraction: float  # of the original prunable-block parameters
    quality: dict
    latency_ms: float | None
    flops_per_token: int
    losses: list[float]
    seconds: float
    widths: list[dict]
    sparsity: list[float] = field(default_factory=list)
    phases: dict = field(default_factory=dict)  # quality right after the cut / after reconstruction
    reconstruction: dict | None = None  # seconds, tokens, calibration error ratio, λ per projection
    speed: dict | None = None  # decode tokens/s, prefill ms (LMs) or latencies (encoders), weight MB
    latency_spread: float | None = None  # (max - min) / median of the latency repeats
    cost: dict | None = None  # flops / latency budgets: the stage's goal and the prediction for its widths
    predicted_speedup: float | None = None  # latency budget: the cost model's speed-up over dense
    extra: dict | None = None  # a method's own figures (JSON-serialisable)
    interval: dict = field(default_factory=dict)  # metric -> its 95 % interval [lo, hi] (explorer.evaluate.quality)
    eval_size: dict = field(default_factory=dict)  # split and examples / tokens the quality was measured on

    def to_json(self) -> dict:
        d = asdict(self)
        if d["extra"] is None:
            d.pop("extra")
        return d


def speed_brief(ev: dict) -> dict | None:
    """The headline speed figures of an evaluation (None without a speed measurement)."""
    sp = ev.get("speed")
    if not sp:
        return None
    return {k: v for k, v in sp.items() if isinstance(v, float)} | {"spread": sp.get("spread", {})}


class PruningRun:
    """One pruning run over a loaded model. Mutates `lm.model`; keeps a copy of the last
    completed stage so that Stop or an error never leaves a half-pruned model behind."""

    def __init__(self, lm: LoadedModel, data: TextData, analysis: AnalysisConfig | None = None,
                 allocation: AllocationConfig | None = None, prune: PruneConfig | None = None,
                 final_plan: Allocation | None = None, timing: bool = True, label: str = "",
                 dense_eval: dict | None = None, cost_model=None):
        self.lm, self.data = lm, data
        self.analysis = analysis or AnalysisConfig()
        self.allocation = allocation or AllocationConfig()
        self.prune = prune or PruneConfig()
        self.final_plan = final_plan
        self.timing = timing
        self.dense_given = dense_eval  # the dense model measured before with the same settings (the app caches it)
        self.cost_model = cost_model  # budget latency: a cost model to use instead of measuring one (tests, the app)
        self.cost = None  # the budget's cost model (latency.CostModel or FlopsModel), built at the start of a run
        self.reference: float | None = None  # its prediction for the model the run started from
        self.label = label or f"{self.allocation.mode} A={self.allocation.amplitude:g}"
        self.records: list[StageRecord] = []
        self.dense: dict = {}
        self.original = 0  # block parameters when the run started
        self.original_structure: list[dict] | None = None  # the first analysis' per-layer structure
        self.teacher = None  # the dense model, for distillation (one per run)
        self._last_good = None  # host-memory copy of the last completed step
        self.hidden: dict | None = None  # prune_hidden: the residual channels before / after and what it cost
        self.status = "ready"
        self.error = ""
        self._stop = False
        if self.prune.stages < 1:
            raise ExplorerError(f"stages must be at least 1, got {self.prune.stages}")
        validate_config(self.analysis)
        validate_config(self.prune)
        validate_allocation(self.allocation)
        self.reconstructs, self.training = split_recovery(self.prune.recovery)
        if lm.task == "encoder" and self.training != "none":
            raise ExplorerError("this model has no task head to train: use recovery 'none' or 'reconstruct'")
        check_pairing(lm, data)

    def stop(self) -> None:
        self._stop = True

    def _should_stop(self) -> bool:
        return self._stop

    def dense_settings(self) -> tuple:
        """What a dense evaluation depends on: a cached one is reused only for the same settings."""
        return (self.prune.eval_samples, self.prune.eval_split, self.timing, self.prune.speed_repeats)

    def _dense_eval(self) -> dict:
        return dict(self.dense_given) if self.dense_given else self._eval()

    def _eval(self) -> dict:
        # evaluate() times the forward at 32 x 128 itself (latency_ms): the speed figures leave that shape out, so that
        # a model has one 32 x 128 latency, measured once, in every report (not two measurements of one thing)
        shapes = tuple(sh for sh in SpeedSetup.encoder_shapes if sh != (32, 128))
        setup = SpeedSetup(repeats=self.prune.speed_repeats, encoder_shapes=shapes) if self.prune.speed_repeats else None
        return evaluate(self.lm, self.data, self.prune.eval_samples, timing=self.timing, speed_setup=setup,
                        split=self.prune.eval_split)

    def _calibration(self, stage: int):
        return self.data.calibration(self.analysis.samples, stage=stage, seed=self.analysis.seed)

    # --- the run: one shell, one stage loop (the methods of explorer.methods hook into both) ------------
    def events(self) -> Iterator[dict]:
        """Yields {"type": "dense"|"analysis"|"step"|"stage"|"stopped"|"error"|"done", ...}: the dense
        evaluation, then `_body()`'s events; on Stop or any failure the model of the last `_commit()`
        (host memory) is put back and "stopped"/"error" ends the stream."""
        lm = self.lm
        self.status = "running"
        t_run = time.perf_counter()
        self.original = lm.block_params
        self.dense = self._dense_eval()
        yield self._dense_event()
        self.teacher = copy.deepcopy(lm.model).eval() if self.training == "kd" else None  # one teacher per run
        self._commit()
        try:
            yield from self._body()
        except Cancelled:
            self._restore()
            self.status = "stopped"
            yield {"type": "stopped", "completed": len(self.records)}
            return
        except ExplorerError as e:
            self._restore()
            self.status, self.error = "error", str(e)
            yield {"type": "error", "message": str(e), "completed": len(self.records)}
            return
        except Exception as e:  # an unexpected failure inside a stage: keep the last good model
            self._restore()
            reason = OOM_HINT if is_oom(e) else f"{type(e).__name__}: {e}"
            self.status, self.error = "error", f"stage {len(self.records) + 1} failed: {reason}"
            yield {"type": "error", "message": self.error, "completed": len(self.records)}
            return
        finally:
            self._cleanup()
        self.status = "done"
        yield {"type": "done", "seconds": time.perf_counter() - t_run}

    def _dense_event(self) -> dict:
        return {"type": "dense", "eval": self.dense, "metric": metric_name(self.lm)}

    def _commit(self) -> None:
        """The current model is a completed step: Stop or an error will come back to it. Kept in
        host memory (cpu_snapshot), never as a second model on the accelerator."""
        self._last_good = self._snapshot()

    def _snapshot(self) -> nn.Module:
        return cpu_snapshot(self.lm.model)

    def _restore(self) -> None:
        if self._last_good is not None:
            self.lm.model = self._last_good.to(self.lm.device)

    def _cleanup(self) -> None:
        """Remove hooks and the like (called after the body, whatever happened)."""

    def _body(self) -> Iterator[dict]:
        """Adapt-Accel: the optional hidden cut, budget cost model and layer drop, then the stages."""
        cfg = self.prune
        if cfg.prune_hidden:
            if self.allocation.budget == "latency":
                raise ExplorerError("--prune-hidden with --budget latency is not supported: the cost model "
                                    "is measured at the dense hidden size; use --budget params or flops")
            yield from self._cut_hidden()
            self._commit()
        if self.allocation.budget != "params" and self.final_plan is None:
            yield from self._prepare_budget()
        if cfg.layer_drop:
            yield from self._drop_layers()
            self._commit()
        yield from self._stages()

    def _stages(self, importance: Callable[[int], Importance] | None = None,
                plan: Callable[[int, Importance, float], Allocation] | None = None,
                cfg: PruneConfig | None = None, teacher=None, stages: int | None = None,
                before_record: Callable[[int, list], Iterator[dict]] | None = None) -> Iterator[dict]:
        """The one stage loop. Stage k of K: importance(k) (default: analysis on the stage's fresh
        calibration samples), plan(k, imp, stage_target) (default: the budget's allocation, or the
        hand-edited plan), the cut (with reconstruction when the recovery says so), training with
        `cfg`'s recovery, before_record(k, losses) (a method's extra phase), evaluation, record,
        commit. Methods hook in through these arguments instead of writing their own loop."""
        cfg = cfg or self.prune
        K = stages or self.prune.stages
        teacher = teacher if teacher is not None else self.teacher
        importance = importance or self._importance
        plan = plan or self._plan
        for k in range(1, K + 1):
            t0 = time.perf_counter()
            stage_target = stage_sparsity(self.original, self.lm.block_params, self.allocation.target, k, K)
            imp = importance(k)
            self.original_structure = self.original_structure or imp.params
            yield {"type": "analysis", "stage": k, "importance": imp}
            alloc = plan(k, imp, stage_target)
            phases, recon = yield from self._cut(k, imp, alloc)
            losses: list[float] = []
            yield from self._train(k, cfg, losses, teacher)
            if before_record is not None:
                yield from before_record(k, losses)
            yield {"type": "evaluating", "stage": k}
            rec = self._record(k, losses, time.perf_counter() - t0, [l.sparsity for l in alloc.layers], alloc=alloc)
            rec.phases, rec.reconstruction = phases, recon
            yield self._stage_event(rec)

    def _importance(self, k: int) -> Importance:
        texts, labels = self._calibration(k)
        return analyze(self.lm, texts, labels, self.analysis, should_stop=self._should_stop)

    def _plan(self, k: int, imp: Importance, stage_target: float) -> Allocation:
        if self.final_plan is not None:
            return interpolate_plan(self.final_plan, imp.params, self.original_structure, k / self.prune.stages,
                                    self.allocation)
        return self._allocate(k, imp, stage_target)

    def _stage_event(self, rec: StageRecord) -> dict:
        self.records.append(rec)
        self._commit()
        return {"type": "stage", "record": rec}

    def _prepare_budget(self) -> Iterator[dict]:
        """Build the budget's cost model once, on the model the run starts from: a latency cost
        model (measured on this device, or read from its cache) or the FLOPs model."""
        lm, budget = self.lm, self.allocation.budget
        if budget == "latency":
            yield {"type": "cost_model", "status": "measuring"}
            self.cost = self.cost_model or latency_cost_model(lm)
        else:
            self.cost = FlopsModel.from_model(lm)
        self.reference = predict(self.cost, widths(lm.adapter, lm.model))
        yield {"type": "cost_model", "status": "ready", "budget": budget, "unit": self.cost.unit,
               "reference": self.reference, **self._cost_brief()}

    def _cost_brief(self) -> dict:
        """How the latency cost model came about (for the event and the report)."""
        c = self.cost
        if c is None or not hasattr(c, "signature"):
            return {}
        return {"cached": getattr(c, "cached", False), "measured_at": getattr(c, "measured_at", ""),
                "seconds": getattr(c, "seconds", 0.0), "check": getattr(c, "check", None),
                "signature": c.signature, "fixed_ms": c.fixed, "grid": [c.groups, c.neurons]}

    def _allocate(self, k: int, imp: Importance, stage_target: float) -> Allocation:
        """The plan of stage k: the parameter schedule (stage_target), or the stage's share of the
        FLOPs cut (target·k/K) or of the speed-up (speedup ** (k/K)) from the run's start."""
        cfg, K = self.allocation, self.prune.stages
        norm, scores = imp.normalized_by(cfg.normalization), imp.unit_scores()
        if cfg.budget == "latency":
            return allocate_latency(norm, imp.params, cfg, self.cost, cfg.speedup ** (k / K), scores,
                                    reference_ms=self.reference)
        if cfg.budget == "flops":
            return allocate_flops(norm, imp.params, cfg, self.cost, scores, reference=self.reference,
                                  removed=cfg.target * k / K)
        return allocate(norm, imp.params, replace(cfg, target=stage_target), scores=scores)

    def _trains(self) -> bool:
        return self.training != "none" and self.prune.recovery_steps > 0

    def _cut(self, k: int, imp: Importance, alloc: Allocation) -> Iterator[dict]:
        """Remove the plan's units, once: with reconstruction, cut and refit layer by layer (the refit
        may re-choose the units, keeping the plan's counts). Yields "phase" events; returns (phases,
        reconstruction report). With eval_phases the plain cut is evaluated first, on the uncut model
        with the removed units zeroed in place (exactly the cut's output, no copy), and the
        reconstructed model too when training follows."""
        lm, cfg = self.lm, self.prune
        phases: dict = {}

        def phase(name):
            phases[name] = quality(lm, self.data, cfg.eval_samples, cfg.eval_split)
            return {"type": "phase", "stage": k, "phase": name, "quality": phases[name]}

        if cfg.eval_phases and (self.reconstructs or self._trains()):
            with zeroed_units(lm, plan_keeps(imp, alloc)):
                event = phase("cut")
            yield event
        if not self.reconstructs:
            apply_allocation(lm, imp, alloc)
            return phases, None
        yield {"type": "reconstruct", "stage": k}
        texts, _ = (self.data.calibration(cfg.recon_samples, stage=k, seed=self.analysis.seed)
                    if cfg.recon_samples else self._calibration(k))
        rep = reconstruct(lm, plan_keeps(imp, alloc), texts, lam=cfg.recon_lambda, fit_bias=cfg.recon_bias,
                          weighting=cfg.recon_weighting, select="obs" if cfg.recon_select == "obs" else "given",
                          batch_size=self.analysis.batch_size, max_length=self.analysis.max_length or None,
                          should_stop=self._should_stop)
        check_widths(lm, alloc)
        if cfg.eval_phases and self._trains():
            yield phase("reconstructed")
        return phases, {"seconds": rep.seconds, "tokens": rep.tokens, "error_ratio": rep.error_ratio,
                        "lambdas": [[r["lambda"] for r in layer] for layer in rep.layers],
                        # per layer: calibration output error of the plain cut and after the refit (summed projections)
                        "layer_errors": [[sum(r["error_removed"] for r in layer), sum(r["error_refit"] for r in layer)]
                                         for layer in rep.layers]}

    def _train(self, stage: int, cfg: PruneConfig, losses: list[float], teacher=None,
               after_step: Callable[[], None] | None = None,
               masks: dict[str, torch.Tensor] | None = None) -> Iterator[dict]:
        """Recovery training with `cfg` (explorer.recovery), one "step" event per optimiser step;
        `after_step` runs after each step (move soft masks, ...); `masks` (weight name -> 0/1) are
        held through the training, LoRA included (recover_steps)."""
        teacher = teacher if teacher is not None else self.teacher
        for step, loss in recover_steps(self.lm, self.data, cfg, stage, teacher, self._should_stop, masks=masks):
            if after_step is not None:
                after_step()
            losses.append(loss)
            yield {"type": "step", "stage": stage, "step": step, "loss": loss}

    def _cut_hidden(self) -> Iterator[dict]:
        """Remove the fraction prune_hidden of the residual channels first (Minitron's activation
        salience on stage-0 calibration texts; explorer.hidden). Block parameters shrink with it, so
        the stages' parameter budget counts it: the stages remove what is left to reach the target."""
        texts, _ = self._calibration(0)
        rep = prune_hidden_fraction(self.lm, self.prune.prune_hidden, texts, round_to=self.allocation.round_to,
                                    batch_size=self.analysis.batch_size, max_length=self.analysis.max_length or None)
        self.hidden = {k: rep[k] for k in ("hidden_before", "hidden_after", "removed_fraction", "params_before",
                                           "params_after", "removed_salience_share", "seconds")}
        yield {"type": "hidden", **self.hidden}

    def _drop_layers(self) -> Iterator[dict]:
        texts, _ = self._calibration(0)
        imp = analyze(self.lm, texts, None, replace(self.analysis, metric="magnitude_l1"),
                      metrics=("magnitude_l1",), should_stop=self._should_stop)
        order = np.argsort(imp.layer_cos, kind="stable")[: self.prune.layer_drop]
        drop_layers(self.lm.adapter, self.lm.model, [int(i) for i in order])
        yield {"type": "layer_drop", "dropped": sorted(int(i) for i in order)}

    def _record(self, k: int, losses: list[float], seconds: float, sparsity: list[float], ev: dict | None = None,
                alloc: Allocation | None = None, **extra) -> StageRecord:
        """The record of stage k: an evaluation of the model now (or `ev`), its widths, the stage's
        sparsity per layer; with a FLOPs / latency budget the cost model's prediction; `extra`:
        method-specific, JSON-serialisable figures."""
        ev = ev or self._eval()
        q = {key: ev[key] for key in ("accuracy", "perplexity") if key in ev}
        ws = widths(self.lm.adapter, self.lm.model)
        rec = StageRecord(k, ev["params"], ev["block_params"], 1 - ev["block_params"] / self.original, q,
                          ev.get("latency_ms"), ev["flops_per_token"], list(losses), seconds,
                          ws, [float(x) for x in sparsity], speed=speed_brief(ev),
                          latency_spread=ev.get("latency_spread"), extra=extra or None,
                          interval={key: ev[f"{key}_ci"] for key in q if f"{key}_ci" in ev},
                          eval_size={key: ev[key] for key in ("eval_split", "eval_tokens", "eval_examples") if key in ev})
        if self.cost is not None and alloc is not None:
            predicted = predict(self.cost, ws)  # the widths the stage really has
            rec.cost = {**(alloc.cost or {}), "predicted": predicted}
            if self.allocation.budget == "latency":
                rec.predicted_speedup = self.reference / predicted
        return rec

    def measured_speedup(self) -> dict:
        """The final model's measured speed-ups over dense: forward latency (batch 32 x 128) and,
        with speed figures, decode tokens/s at batch 1; `measured_speedup` is the one the latency
        cost model predicts (decode for LMs, the forward otherwise), `measured_as` names it."""
        d, f = self.dense, self.records[-1]
        out = {}
        if d.get("latency_ms") and f.latency_ms:
            out["latency_speedup"] = d["latency_ms"] / f.latency_ms
        dense_tps, tps = (d.get("speed") or {}).get("decode_tokens_per_s"), (f.speed or {}).get("decode_tokens_per_s")
        if dense_tps and tps:
            out["decode_speedup"] = tps / dense_tps
        mode = getattr(self.cost, "signature", {}).get("mode", "forward")
        key = "decode_speedup" if mode == "decode" else "latency_speedup"
        out["measured_speedup"], out["measured_as"] = out.get(key), key
        return out

    def run(self) -> dict:
        """Run to the end (no streaming) and return the report."""
        for _ in self.events():
            pass
        return self.report()

    def report(self) -> dict:
        m = metric_name(self.lm)

        def brief(ev):
            return {"params": ev.get("params"), "block_params": ev.get("block_params"), m: ev.get(m),
                    "latency_ms": ev.get("latency_ms"), "latency_spread": ev.get("latency_spread"),
                    "flops_per_token": ev.get("flops_per_token"), **(speed_brief(ev) or {})}
        final = brief({**asdict(self.records[-1]), **self.records[-1].quality}) if self.records else brief(self.dense)
        if self.records and self.records[-1].predicted_speedup is not None:
            final.update(predicted_speedup=self.records[-1].predicted_speedup, **self.measured_speedup())
        budget = {"budget": self.allocation.budget}
        if self.cost is not None:
            budget.update(unit=self.cost.unit, reference=self.reference, **self._cost_brief())
        # the plan actually used: where it came from (the table set by hand, the allocation or the method), the
        # per-layer widths the run ended with and the last stage's per-layer sparsity (masks: reached)
        fp, own = self.final_plan, getattr(self, "chooses_widths", "")
        if fp is not None:
            by_hand = [lp.index for lp in fp.layers if lp.manual]
            plan = {"source": "table", "by_hand": by_hand,
                    "description": f"the per-layer table ({len(by_hand)} layer(s) set by hand"
                                   + (f": {', '.join(map(str, by_hand))})" if by_hand else ")"),
                    "planned": [{"layer": lp.index, "sparsity": lp.sparsity, "groups": lp.keep_groups,
                                 "neurons": lp.keep_neurons} for lp in fp.layers]}
        elif own:
            plan = {"source": "method", "by_hand": [], "description": f"chosen by the method: {own}"}
        else:
            a = self.allocation
            plan = {"source": "allocation", "by_hand": [],
                    "description": ("uniform" if a.mode == "uniform" else f"{a.mode} A={a.amplitude:g}")
                                   + f" allocation, {a.budget} budget, target {a.target:g}"}
        if self.records:
            plan["widths"] = [{"groups": w["groups"], "neurons": w["neurons"]} for w in self.records[-1].widths]
            plan["sparsity"] = list(self.records[-1].sparsity)
        return {"label": self.label, "model": self.lm.name, "data": self.data.name, "metric": m,
                "eval_split": self.prune.eval_split,
                "status": self.status, "error": self.error,
                "config": {"analysis": asdict(self.analysis), "allocation": asdict(self.allocation),
                           "prune": asdict(self.prune)},
                "dense": brief(self.dense), "final": final, "budget": budget, "plan": plan,
                **({"hidden": self.hidden} if self.hidden else {}),
                "stages": [r.to_json() for r in self.records]}
