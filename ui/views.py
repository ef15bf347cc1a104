"""What the page shows, computed from the library's objects: status lines, tables, run labels
and the settings read from the controls. Plain data, no gradio (the handlers in
`ui.handlers` turn these into component updates)."""
from __future__ import annotations

import csv
import io
import ipaddress
import logging
from dataclasses import fields
from pathlib import Path

import pandas as pd

from explorer import plots
from explorer.allocation import Allocation, allocate
from explorer.config import (LABEL_FREE_METRICS, METHOD_OPTIONS, AllocationConfig, AnalysisConfig, PruneConfig, choices_of,
                             split_recovery, validate)
from explorer.errors import OOM_HINT, ExplorerError, is_oom
from explorer.generate import classify, generate
from explorer.latency import FlopsModel, allocate_flops, allocate_latency, predict
from explorer.pruning import PruningRun
from explorer.sessions import Loaded, Session

log = logging.getLogger("explorer.app")

EVAL_EXAMPLES = 500  # test examples for accuracy (a subset, so loading stays quick)
EVAL_TOKENS = 4096  # test tokens for perplexity
MAX_UPLOAD_MB = 100  # largest data file a browser may upload (--max-upload-mb)
MODEL_DEFAULT_DATA = "(the model's default)"
# Config fields the tabs do not show: the Prune tab's "Advanced" accordion is generated from their metadata,
# so a new field appears there without UI code. (class, field name) in the order of on_run's *advanced.
SHOWN = {"stages", "recovery", "recovery_steps", "eval_samples", "eval_split", "samples", "metric", "target", "amplitude", "mode",
         "max_sparsity", "round_to", "split", "normalization", "batch_size", "budget", "speedup"}
ADVANCED = [(cls, f.name) for cls in (PruneConfig, AnalysisConfig, AllocationConfig) for f in fields(cls)
            if f.name not in SHOWN]
# The methods' own options (explorer.config.METHOD_OPTIONS): one group of controls per options class, shown
# while one of its methods is chosen. (class, field name) in the order of on_run's values after ADVANCED.
METHOD_OPTION_CLASSES = list(dict.fromkeys(METHOD_OPTIONS.values()))
METHOD_ADVANCED = [(cls, f.name) for cls in METHOD_OPTION_CLASSES for f in fields(cls)]
EXPORT_ZIP = "pruned model (safetensors, zip)"
EXPORT_FORMATS = {EXPORT_ZIP: None, "ONNX": "onnx", "GGUF f16 (llama.cpp)": "gguf-f16"}  # label -> export format
TABLE_COLUMNS = ["layer", "Î_L", "sparsity", "actual", "heads kept", "neurons kept", "note"]
EDITABLE = TABLE_COLUMNS.index("sparsity")

def eval_size(lm, n: int | float | None = 0) -> int:
    """Test examples (classifiers) or tokens (LMs) to evaluate on; 0 = the quick default."""
    n = int(n or 0)
    return n if n > 0 else (EVAL_TOKENS if lm.task == "causal-lm" else EVAL_EXAMPLES)


def number(value, name: str, kind: type = float):
    """A number from a UI control; anything else (a crafted request, an emptied box) is a message.
    Empty counts as 0, which the config checks then reject or accept."""
    if value is None or value == "":
        return kind(0)
    try:
        v = float(value)
        if kind is int and v != int(v):
            raise ValueError
        return kind(v)
    except (TypeError, ValueError, OverflowError):
        raise ExplorerError(f"{name} must be {'a whole number' if kind is int else 'a number'}, "
                            f"got '{str(value)[:20]}'") from None


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _widths(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else ", ".join(map(str, values))


def _quality_text(ev: dict) -> str:
    for m in ("accuracy", "perplexity"):
        if m in ev:
            return f"{m} {quality_text(ev, m)}"
    return "not measured (no task head: encoder models are analysed with label-free metrics only)"


def quality_value(v: float, metric: str, digits: int = 2) -> str:
    return f"{v:.{digits}%}" if metric == "accuracy" else f"{v:.{digits}f}"


def eval_budget(ev: dict) -> str:
    """'4,096 val tokens' / '200 val examples': what a quality figure was measured on ('' if not said)."""
    n, unit = (ev.get("eval_tokens"), "tokens") if ev.get("eval_tokens") else (ev.get("eval_examples"), "examples")
    return f"{n:,} {ev.get('eval_split') or ''} {unit}".replace("  ", " ") if n else ""


def quality_text(ev: dict, metric: str) -> str:
    """'**47.13** (95 % 45.91–48.39) on 4,096 val tokens': a quality figure with its 95 % interval (perplexity:
    from the tokens' spread; accuracy: binomial) and the evaluation budget it was measured on."""
    v = ev.get(metric)
    if v is None:
        return "not measured"
    ci = ev.get(f"{metric}_ci")
    text = f"**{quality_value(v, metric)}**" + (
        f" (95 % {quality_value(ci[0], metric, 1)}–{quality_value(ci[1], metric, 1)})" if ci else "")
    budget = eval_budget(ev)
    return text + (f" on {budget}" if budget else "")


def model_summary(loaded: Loaded | None) -> str:
    if loaded is None:
        return "*No model loaded.*"
    lm, data = loaded.lm, loaded.data
    s = lm.summary()
    heads = s["heads"]
    kv = "" if s["heads_per_group"] == 1 else f" in {_widths(s['kv_groups'])} KV groups"
    pruned = " (a pruned model: per-layer widths from its plan)" if lm.plan else ""
    rows = [("architecture", f"{s['architecture']} (`{s['model_type']}`), task `{s['task']}`"),
            ("layers", s["layers"]), ("attention heads per layer", f"{_widths(heads)}{kv}, head size {s['head_dim']}"),
            ("FFN width", _widths(s["ffn"])),
            ("parameters", f"{s['params'] / 1e6:.2f} M ({s['block_params'] / 1e6:.2f} M in prunable blocks)"),
            ("dense quality", _quality_text(loaded.dense_eval)), ("data", data.summary()), ("device", s["device"])]
    return f"| model | `{lm.name}`{pruned} |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def budget_plan(norm, structure: list[dict], cfg: AllocationConfig, scores, manual: dict, head_dim: int,
                latency=None, base=None) -> Allocation:
    """The plan for the Allocation tab's settings under its budget: parameters (with the table's hand
    edits), a FLOPs cut, or a predicted speed-up (`latency`: the cost model). Mode "search": `base`, the
    searched levels, under the params budget."""
    if cfg.mode == "search" and cfg.budget != "params":
        raise ExplorerError("the searched plan meets a params budget: choose budget params (or another mode)")
    if cfg.budget == "latency":
        return allocate_latency(norm, structure, cfg, latency, cfg.speedup, scores)
    if cfg.budget == "flops":
        return allocate_flops(norm, structure, cfg, FlopsModel.from_structure(structure[0], head_dim), scores)
    return allocate(norm, structure, cfg, manual=manual, scores=scores, base=base)


def predicted_speedup(cost, alloc: Allocation) -> float:
    """The cost model's speed-up of a plan over the full-width structure it was made for."""
    full = predict(cost, [(lp.groups, lp.neurons) for lp in alloc.layers])
    return full / predict(cost, [(lp.keep_groups, lp.keep_neurons) for lp in alloc.layers])


def latency_note(cost) -> str:
    """Where the predicted speed-ups come from, and how far to trust them."""
    sig, check = cost.signature, getattr(cost, "check", None) or {}
    what = (f"one decode step at batch {sig['batch_size']} over {sig['seq_len']} cached tokens"
            if sig["mode"] == "decode" else f"a forward pass at {sig['batch_size']} × {sig['seq_len']}")
    err = f"; the whole dense model measured {check['error']:+.0%} off its prediction" if "error" in check else ""
    return (f"<small>Predicted speed-ups: the latency cost model of this device ({what}, {sig['device']}, measured "
            f"{cost.measured_at}{err}). Measured speed-ups are in the Prune tab's stage table.</small>")


def allocation_table(alloc: Allocation, heads_per_group: list[int]) -> pd.DataFrame:
    rows = []
    for lp, hpg in zip(alloc.layers, heads_per_group):
        note = "set by hand" if lp.manual else ("clipped" if lp.clipped else "")
        rows.append([lp.index, round(lp.importance, 3), round(lp.sparsity, 3), round(lp.actual_sparsity, 3),
                     f"{lp.keep_groups * hpg} / {lp.groups * hpg}", f"{lp.keep_neurons} / {lp.neurons}", note])
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def parse_manual(table, shown: Allocation, manual: dict[int, float]) -> dict[int, float]:
    """Manual overrides from an edited table: every row whose sparsity differs from the value
    shown becomes (or stays) set by hand. Raises ExplorerError for anything not a number."""
    df = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table, columns=TABLE_COLUMNS)
    if len(df) != len(shown.layers):
        raise ExplorerError(f"the table must keep one row per layer ({len(shown.layers)}); rows were added or removed")
    out = dict(manual)
    for i, (raw, lp) in enumerate(zip(df.iloc[:, EDITABLE].tolist(), shown.layers)):
        text = str(raw).strip()
        try:
            v = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
        except ValueError:
            raise ExplorerError(f"layer {i}: sparsity '{text[:20]}' is not a number; type a fraction such as 0.35") from None
        if not (0 <= v < 1):  # NaN fails too
            raise ExplorerError(f"layer {i}: sparsity {text[:20]} is outside [0, 1)")
        if abs(v - round(lp.sparsity, 3)) > 5e-4:
            out[i] = v
    return out


def report_rows(rep: dict, dense: dict | None = None) -> list[dict]:
    """The dense model and each completed stage of a run report (`PruningRun.report()`), one
    flat row each: what the stage table, the history, the Pareto chart and the CSV show. Each row
    has its quality's 95 % interval (quality_lo / quality_hi) and evaluation budget where known;
    `dense`: the run's full dense evaluation, for an interval the report's brief leaves out."""
    m, d = rep["metric"], {**(dense or {}), **{k: v for k, v in rep["dense"].items() if v is not None}}
    split = rep.get("eval_split") or d.get("eval_split")
    base = {"run": rep["label"], "status": rep["status"], "metric": m}
    rows = [{**base, "model": "dense", "params": d["params"], "block_params": d["block_params"],
             "removed_fraction": 0.0, "quality": d.get(m), **_interval(d.get(f"{m}_ci")),
             "eval_split": split, **_budget(d), "latency_ms": d.get("latency_ms"),
             "flops_per_token": d.get("flops_per_token"), "last_loss": None, "seconds": None,
             "latency_spread": d.get("latency_spread"), **speed_columns(d)}]
    for st in rep["stages"]:
        phases = {f"after_{k}": v.get(m) for k, v in (st.get("phases") or {}).items()}
        if st.get("reconstruction") and "after_reconstructed" not in phases and not st["losses"]:
            phases["after_reconstructed"] = st["quality"].get(m)  # nothing trained after the refit: its figure
        recon = st.get("reconstruction") or {}
        rows.append({**base, "model": f"stage {st['stage']}", "params": st["params"], "block_params": st["block_params"],
                     "removed_fraction": st["removed_fraction"], "quality": st["quality"].get(m),
                     **_interval((st.get("interval") or {}).get(m)), "eval_split": split,
                     **_budget(st.get("eval_size") or {}),
                     "latency_ms": st["latency_ms"], "flops_per_token": st["flops_per_token"],
                     "last_loss": st["losses"][-1] if st["losses"] else None, "seconds": st["seconds"],
                     "latency_spread": st.get("latency_spread"), **speed_columns(st.get("speed") or {}),
                     "refit_error_ratio": recon.get("error_ratio"), **phases})
    return rows


def _interval(ci) -> dict:
    return {"quality_lo": ci[0], "quality_hi": ci[1]} if ci else {"quality_lo": None, "quality_hi": None}


def _budget(ev: dict) -> dict:
    """The evaluation budget of a figure: {"eval_n": 4096, "eval_unit": "tokens"} (None where not said)."""
    if ev.get("eval_tokens"):
        return {"eval_n": ev["eval_tokens"], "eval_unit": "tokens"}
    return {"eval_n": ev.get("eval_examples"), "eval_unit": "examples" if ev.get("eval_examples") else None}


def stage_quality(record, metric: str) -> dict:
    """A stage record's quality as one flat dict for `quality_text`: the figure, its interval, its budget."""
    return {**record.quality, **{f"{k}_ci": v for k, v in (getattr(record, "interval", None) or {}).items()},
            **(getattr(record, "eval_size", None) or {})}


SPEED_COLUMNS = {"decode_tokens_per_s": "decode tok/s (b1)", "decode_tokens_per_s_b8": "decode tok/s (b8)",
                 "prefill_ms": "prefill ms (b1)", "latency_b1x128_ms": "latency ms (1×128)"}


BUSY_SPREAD = 0.25  # latency repeats further apart than this (of the median): the machine is busy


def spread_text(spread: float | None) -> str | None:
    """'±8 %', or flagged when the repeats disagree so much that a speed-up could be noise."""
    if spread is None:
        return None
    return f"±{spread / 2:.0%}" + (" ⚠ busy machine" if spread > BUSY_SPREAD else "")


def speed_columns(ev: dict) -> dict:
    """The speed figures of a dense evaluation or a stage record (None where not measured)."""
    return {k: ev.get(k) for k in SPEED_COLUMNS}


NOT_TIMED = "not timed"


def stage_table(rows: list[dict], metric: str, split: str = "") -> pd.DataFrame:
    """One row per model (dense, each stage): quality (after the cut, after reconstruction, at the stage's
    end) with its 95 % interval, latency ("not timed" where Measure latency was off), the speed figures that
    were measured, FLOPs, the last recovery loss and the stage's time."""
    def num(v, digits):
        return None if v is None else round(v, digits)

    def interval(r):
        if r.get("quality_lo") is None:
            return None
        digits = 4 if metric == "accuracy" else 2  # as the quality column
        return f"{r['quality_lo']:.{digits}f}–{r['quality_hi']:.{digits}f}"
    speed = [k for k in SPEED_COLUMNS if any(r.get(k) is not None for r in rows)]  # only what was measured
    return pd.DataFrame(
        [[r["model"], num(r["params"] / 1e6, 3), f"{r['removed_fraction']:.1%}", num(r.get("after_cut"), 4),
          num(r.get("after_reconstructed"), 4), num(r["quality"], 4), interval(r),
          NOT_TIMED if r["latency_ms"] is None else num(r["latency_ms"], 1), spread_text(r.get("latency_spread")),
          *[num(r.get(k), 1) for k in speed], num(r["flops_per_token"] / 1e6, 2),
          num(r["last_loss"], 4), num(r["seconds"], 1)]
         for r in rows],
        columns=["model", "params (M)", "removed", "after cut", "after reconstruction",
                 f"{metric or 'quality'} ({split})" if split else (metric or "quality"), "95 % interval",
                 "latency (ms, 32×128)", "latency spread", *[SPEED_COLUMNS[k] for k in speed], "FLOPs/token (M)",
                 "last loss",
                 "time (s)"])


# --- the run's charts, from report rows ----------------------------------------------------------

def quality_figure(rows: list[dict], metric: str, label: str = ""):
    """The Quality chart of one run: dense and each stage with their 95 % intervals as error bars, the
    evaluation budget in the title, the run's label below it, and in each point's hover what it has
    (interval, budget, latency or "not timed")."""
    stages = rows[1:]
    first = rows[0]
    budget = eval_budget({"eval_tokens": first.get("eval_n") if first.get("eval_unit") == "tokens" else None,
                          "eval_examples": first.get("eval_n") if first.get("eval_unit") == "examples" else None,
                          "eval_split": first.get("eval_split")})
    title = f"{metric or 'quality'} ({first.get('eval_split') or 'val'}) vs parameters removed"
    what = f"{budget} a point" + (", bars: 95 % intervals" if any(r.get("quality_lo") is not None for r in rows)
                                  else "") if budget else ""
    return plots.quality_chart(
        first["quality"], [r["removed_fraction"] for r in stages], [r["quality"] for r in stages], metric,
        title=title, subtitle="; ".join(t for t in (what, label) if t),
        phases=[{k: r.get(f"after_{k}") for k in ("cut", "reconstructed")} for r in stages],
        intervals=[(r["quality_lo"], r["quality_hi"]) if r.get("quality_lo") is not None else None for r in rows],
        notes=[point_note(r) for r in rows])


def point_note(row: dict) -> str:
    """What one point of the Quality chart has besides its quality: its latency, or that it was not timed."""
    if row.get("latency_ms") is None:
        return NOT_TIMED
    return f"latency {row['latency_ms']:.1f} ms (32 × 128)"


def cost_figure(rows: list[dict]):
    """Size and latency per stage; says "not timed" when the run measured no latency."""
    return plots.stage_cost_chart([r["model"] for r in rows], [r["params"] for r in rows],
                                  [r["latency_ms"] for r in rows],
                                  not_timed="latency not timed: tick “Measure latency” (Prune tab, Evaluation) to time "
                                            "the dense model (once) and every stage")


def recovery_figure(losses: dict, reconstructions: dict):
    """The Recovery chart: the training loss per step; a run that only reconstructs (closed-form refit, no
    steps) shows each layer's calibration error after the refit as a share of the plain cut's."""
    if reconstructions and not any(losses.values()):
        return plots.reconstruction_chart(reconstructions)
    return plots.loss_chart(losses, after_reconstruction=bool(reconstructions))


# --- the dense model's measurements, kept per loaded model ------------------------------------------

SIZE_KEYS = ("params", "block_params", "weight_mb", "flops_per_token")


def dense_parts(ev: dict) -> tuple[dict, dict]:
    """(quality and size, timing) of a dense evaluation: the first depends on the evaluation budget, the
    second only on the timing settings, so each is measured once per loaded model and reused."""
    quality = {k: v for k, v in ev.items()
               if k in SIZE_KEYS or k.startswith(("accuracy", "perplexity", "eval_")) or k == "quality_cached"}
    return quality, {k: v for k, v in ev.items() if k not in quality}


def remember_quality(cache: dict, ev: dict, eval_samples: int, split: str) -> None:
    cache[("quality", int(eval_samples or 0), split)] = dense_parts(ev)[0]


def known_dense(cache: dict, run: PruningRun) -> tuple[dict | None, dict | None]:
    """(the dense model's quality at this run's budget, its timing) as measured before for this loaded model;
    None where not measured yet; the timing is {} for a run that does not time."""
    quality = cache.get(("quality", int(run.prune.eval_samples or 0), run.prune.eval_split))
    timing = cache.get(("timing", run.prune.speed_repeats)) if run.timing else {}
    return quality, timing


def remember_dense(cache: dict, run: PruningRun) -> None:
    """Keep the run's dense evaluation: its quality for this budget, its timing (the first one) for every run."""
    quality, timing = dense_parts(run.dense)
    remember_quality(cache, quality, run.prune.eval_samples, run.prune.eval_split)
    if run.timing and timing.get("latency_ms") is not None:
        cache.setdefault(("timing", run.prune.speed_repeats), timing)


def fresh_export() -> dict:
    """The Export tab's status and downloads, emptied (a Load: they belonged to the previous model)."""
    return {"export_status": "", "export_files": None}


def report_csv(history: list[dict]) -> str:
    """One row per model (dense and each stage) of every run in the history."""
    buf = io.StringIO()
    rows = [r for rep in history for r in report_rows(rep)]
    names = list(dict.fromkeys(k for r in rows for k in r)) or ["run"]  # stages add phase columns
    w = csv.DictWriter(buf, fieldnames=names)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def message(e: BaseException) -> str:
    """What the user reads about an exception: ours as is, out-of-memory with a hint, anything
    else as one line (the traceback goes to the server log, never to the page)."""
    if isinstance(e, ExplorerError):
        return str(e)
    if is_oom(e):
        return OOM_HINT
    log.error("internal error", exc_info=e)
    first = (str(e).splitlines() or [""])[0][:300]
    return f"internal error: {type(e).__name__}: {first} (details in the server log)"


def export_stem(rep: dict, number: int) -> str:
    """A file name that says which run it is: model, run number, method and budget."""
    cfg = rep.get("config", {}).get("allocation", {})
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(str(rep["model"])).name)
    return f"{safe}-run{number}-{rep.get('method', 'adaptive')}-S{cfg.get('target', 0):g}"


def try_model(lm, prompt: str, max_new_tokens: int, temperature: float) -> dict:
    """One model's answer to the prompt: a continuation (LMs) or class probabilities (classifiers)."""
    if lm.task == "causal-lm":
        g = generate(lm, prompt, max_new_tokens=max_new_tokens, temperature=temperature)
        return {"text": g["text"], "stats": f"{g['new_tokens']} tokens in {g['seconds']:.1f} s "
                                            f"({g['tokens_per_s']:.1f} tokens/s, {'greedy' if g['greedy'] else 'sampled'})"}
    if lm.task == "classification":
        c = classify(lm, prompt)
        return {"text": "\n".join(f"{k}: {v:.3f}" for k, v in sorted(c["probabilities"].items(), key=lambda kv: -kv[1])),
                "stats": f"{c['label']} in {c['seconds'] * 1000:.0f} ms"}
    raise ExplorerError("this model is an encoder without a task head: there is nothing to generate or classify")


def advanced_configs(values) -> dict[type, dict]:
    """The Advanced accordion's values, per config class: {PruneConfig: {"lr": ...}, ...}."""
    out: dict[type, dict] = {PruneConfig: {}, AnalysisConfig: {}, AllocationConfig: {}}
    for (cls, name), v in zip(ADVANCED, values or ()):
        out[cls][name] = field_value(cls, name, v)
    return out


def field_value(cls, name: str, v):
    """A generated control's value as the config field's type: booleans and choices as they come,
    numbers checked (a crafted request or an emptied box is a message)."""
    default = next(f.default for f in fields(cls) if f.name == name)
    return v if isinstance(default, (bool, str)) else number(v, name.replace("_", " "), type(default))


def method_values(method: str, values) -> dict:
    """The chosen method's options from the Method options controls (values in METHOD_ADVANCED's order;
    the other methods' controls are ignored): field -> value, for make_run."""
    cls = METHOD_OPTIONS.get(method)
    out = {}
    for (c, name), v in zip(METHOD_ADVANCED, values or ()):
        if c is cls:
            out[name] = field_value(c, name, v)
    return out


def method_note(method: str, values=()) -> str:
    """The Method options' note: the method's description, with any option its text quotes at the default
    ("TPE search (50 trials)") given the value set in the controls (`values`, METHOD_ADVANCED's order)."""
    from explorer.methods import METHODS
    if method not in METHODS:
        return ""
    text = METHODS[method].description
    cls = METHOD_OPTIONS.get(method)
    if cls is None:
        return f"**{method}**: {text}. It has no options of its own."
    try:
        now = method_values(method, values)
    except ExplorerError:  # a value the run will refuse with a message; the note keeps the defaults' text
        now = {}
    for f in fields(cls):
        if now.get(f.name, f.default) != f.default:
            text = text.replace(f"({f.default} {f.name})", f"({now[f.name]} {f.name})")
    return f"**{method}**: {text}."


def non_default(configs: dict[type, dict]) -> str:
    """', lr=0.0001, seed=3' for the advanced values that differ from the defaults (for run labels)."""
    parts = []
    for cls, vals in configs.items():
        defaults = {f.name: f.default for f in fields(cls)}
        parts += [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in vals.items() if v != defaults[k]]
    return "".join(", " + p for p in parts)


def run_label(number: int, method: str, alloc: AllocationConfig, prune: PruneConfig, adv: dict[type, dict],
              by_hand: list[int] = ()) -> str:
    """'#3 exact A=0.05, S=0.3, K=2, reconstruct+lora 10 steps, seed 0, lora_rank=16': every setting
    that tells two runs apart (the number keeps equal settings apart too)."""
    if alloc.mode == "search":
        plan = "searched plan" + (f", {len(by_hand)} layer(s) by hand" if by_hand else "")
    elif by_hand:
        plan = f"table ({len(by_hand)} layer(s) by hand)"
    elif alloc.mode == "uniform":
        plan = "uniform"
    else:
        plan = f"{alloc.mode} A={alloc.amplitude:g}" + ("" if alloc.normalization == "maxabs" else f" {alloc.normalization}")
    desc = plan if method == "adaptive" else f"{method}, {plan}"
    if alloc.split != "salience":
        desc += f", {alloc.split} split"
    steps = f" {prune.recovery_steps} steps" if split_recovery(prune.recovery)[1] != "none" else ""
    rest = {cls: {k: v for k, v in vals.items() if k != "seed" or cls is not PruneConfig} for cls, vals in adv.items()}
    budget = {"params": f"S={alloc.target:g}", "flops": f"S={alloc.target:g} of FLOPs",
              "latency": f"×{alloc.speedup:g} latency"}[alloc.budget]
    return (f"#{number} {desc}, {budget}, K={prune.stages}, {prune.recovery}{steps}, seed {prune.seed}"
            + non_default(rest))


def loading_status(model) -> str:
    """What the status says the moment Load is pressed (the load itself follows)."""
    slow = " (the bundled SmolLM2 takes about a minute on 2 cores: GGUF dequantisation, then the dense model " \
           "on val)" if model == "smollm2-135m" else ""
    return f"Loading `{model}`{slow}…"


def eta(seconds: float) -> str:
    return f"about {seconds:.0f} s" if seconds < 120 else f"about {seconds / 60:.0f} min"


def evaluation_note(run: PruningRun, timing: bool = True) -> str:
    """What one evaluation of a run costs, in words: the status line shows it while it runs (`timing`
    False: its quality part only)."""
    n = run.prune.eval_samples
    split = run.prune.eval_split
    if run.lm.task == "causal-lm":
        what = f"{n or EVAL_TOKENS:,} {split} tokens"
    else:  # never more than the split has
        n_split = len(run.data.texts[split])
        what = f"{min(n, n_split) if n else n_split:,} {split} examples"
    if not timing:
        return what
    if not run.timing:
        return what + ", no timing"
    speed = ("decode at batch 1 and 8 + prefill" if run.lm.task == "causal-lm" else "latency at 1 and 32 × 128")
    return f"{what}, latency 32 × 128, {speed} × {run.prune.speed_repeats}"


def allocation_config(target, amplitude, mode, max_sparsity, round_to, split, normalization="maxabs",
                      budget="params", speedup=0.0) -> AllocationConfig:
    """The Allocation tab's controls (the same six inputs on every event that uses them, then the
    layer normalisation, the budget and the speed-up, which handlers take after the request)."""
    budgets = choices_of(AllocationConfig, "budget")
    if (budget or "params") not in budgets:
        raise ExplorerError(f"budget must be one of {', '.join(budgets)}, got '{budget}'")
    return AllocationConfig(target=number(target, "target sparsity S_base"), amplitude=number(amplitude, "A"),
                            mode=mode, max_sparsity=number(max_sparsity, "S_max"),
                            round_to=number(round_to or 1, "round to", int), split=split or "salience",
                            normalization=normalization_choice(normalization), budget=budget or "params",
                            speedup=number(speedup, "speed-up"))


def normalization_choice(value) -> str:
    """The layer-normalisation radio's value (maxabs, the reference, when empty); anything else is a message."""
    v = value or "maxabs"
    choices = choices_of(AllocationConfig, "normalization")
    if v not in choices:
        raise ExplorerError(f"layer normalisation must be one of {', '.join(choices)}, got '{v}'")
    return v


def layer_figure(imp, normalization: str = "maxabs"):
    """The layer-importance plot: raw I_L and Î_L by the chosen normalisation."""
    return plots.layer_importance(imp.layer_cos, imp.normalized_by(normalization), imp.attn_cos, imp.mlp_cos)


# The quick look's salience metric: forward only (FLAP's fluctuation, streamed layer by layer), within the
# seed spread of the gradient metric after reconstruction on both bundled models and 2-4x faster to compute
# (bench/METRICS.md); taylor & co. stay one click away in the Importance tab.
QUICK_LOOK_METRIC = "fluctuation"


def task_defaults(task: str | None) -> tuple[str, str]:
    """(metric, recovery) that work for a task: encoders have no head, so no gradients."""
    return (LABEL_FREE_METRICS[0], "reconstruct") if task == "encoder" else (QUICK_LOOK_METRIC, "reconstruct")


def require_loaded(s: Session) -> Loaded:
    if s.loaded is None:
        raise ExplorerError("no model loaded: load one in the Model & data tab")
    return s.loaded


def config_from(cls, **values):
    """A config dataclass from the page's controls: None keeps a field's default; numbers are checked
    (a message naming the field) and every field against its choices and range."""
    kinds = {f.name: type(f.default) for f in fields(cls)}
    given = {}
    for k, v in values.items():
        if v is None or v == "":
            continue
        given[k] = number(v, k.replace("_", " "), int) if kinds[k] is int else (
            number(v, k.replace("_", " ")) if kinds[k] is float else v)
    cfg = cls(**given)
    validate(cfg)
    return cfg


PREDICT_FIELDS = ("tokens", "examples", "levels", "checks")  # the Allocation tab's predictor settings, in order
SEARCH_FIELDS = ("small", "large", "max_seconds", "offspring")  # and the search's (generations stands apart)


def require_importance(s: Session, who: str) -> Loaded:
    """The loaded model of a session whose importance is computed (the predictor and the search cut the
    units it ranks)."""
    loaded = require_loaded(s)
    if s.importance is None:
        raise ExplorerError(f"compute importance first (Importance tab): {who} cuts the units it ranks")
    return loaded


def empty_table() -> pd.DataFrame:
    return pd.DataFrame([], columns=TABLE_COLUMNS)


def fresh_views() -> dict:
    """The contents of every output that depends on the loaded model, by component name: the
    page's initial values, and what a new Load puts back."""
    return {"layer_plot": plots.empty("Compute importance to see layer importance"),
            "heads_plot": plots.empty("Compute importance"), "neurons_plot": plots.empty("Compute importance"),
            "imp_status": "Compute importance for this model.",
            "alloc_plot": plots.empty("Compute importance first (Importance tab)"), "alloc_table": empty_table(),
            "alloc_md": "Compute importance first (Importance tab).",
            "predict_plot": plots.empty("Measure the predictor to see each plan's predicted quality"),
            "predict_status": "Predicted quality: measure the predictor once for this model (then cached).",
            "plan_search_plot": plots.search_curve([]),
            "quality_plot": plots.empty("Run pruning to see quality against parameters removed"),
            "loss_plot": plots.empty("Recovery loss"), "cost_plot": plots.empty("Size and latency per stage"),
            "stages_table": stage_table([], ""), "run_status": "Ready to run.",
            "history_plot": plots.empty("Finished runs appear here"),
            "pareto_plot": plots.empty("Pareto chart of finished runs"),
            "search_plot": plots.search_curve([])}
