"""Command line: `python -m explorer {analyze,allocate,prune,eval} ...`.

Bad input (model, data, numbers) prints one line on stderr and exits with code 2.

Each command imports the library code it runs inside its function, on purpose: the arguments
parse before torch and transformers load (`--help` or a usage error in 0.2 s, not 4 s), so this
module imports only the light config / data / errors at the top (tests/test_structure.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from .config import (METHOD_OPTIONS, AllocationConfig, AnalysisConfig, PredictConfig, PruneConfig, SearchConfig,
                     add_arguments, from_args,
                     option_fields, split_recovery,
                     validate)
from .data import MAX_DATA_BYTES
from .errors import OOM_HINT, ExplorerError, is_oom

EXIT_USAGE = 2


def _write_json(obj: dict, path: str | None) -> None:
    text = json.dumps(obj, indent=1, default=float)
    if path in (None, "-"):
        print(text)
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(p)


def _load(args, need_data: bool = True):
    from .data import load_data
    from .models import load_model
    from .pruning import check_pairing
    lm = load_model(args.model, task=args.task, device=args.device, trust_remote_code=args.trust_remote_code,
                    allow_pickle=args.allow_pickle, dtype=args.dtype, device_map=args.device_map)
    if not need_data:
        return lm, None
    data_name = args.data or lm.default_data
    if not data_name:
        raise ExplorerError(f"no --data given and '{args.model}' has no default data set")
    data = load_data(data_name, text_column=args.text_column, label_column=args.label_column,
                     max_bytes=int(args.max_data_mb * 2**20))
    check_pairing(lm, data)
    return lm, data


def _add_model_args(p: argparse.ArgumentParser, data: bool = True, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="built-in name (minilm-rt, smollm2-135m, minilm), HF id or "
                                                      "directory" + ("" if required else " (for --mode search)"))
    if data:
        p.add_argument("--data", default=None, help="built-in data (rotten-tomatoes, imdb, bbc-news) or a CSV/JSONL/TXT "
                                                    "file (default: the model's own data set)")
        p.add_argument("--text-column", default="text", help="text column of a CSV/JSONL file")
        p.add_argument("--label-column", default="label", help="label column of a CSV/JSONL file")
        p.add_argument("--max-data-mb", type=float, default=MAX_DATA_BYTES / 2**20,
                       help=f"refuse data files larger than this, in MiB (default: {MAX_DATA_BYTES // 2**20})")
    p.add_argument("--task", default=None, choices=["classification", "causal-lm", "encoder"],
                   help="override the task inferred from the config")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' precision (auto: bfloat16 on CUDA, float32 on the CPU; GGUF files are dequantised)")
    p.add_argument("--device-map", default=None, choices=["auto", "balanced", "sequential"],
                   help="spread a model that does not fit one device over the GPUs and the CPU with accelerate "
                        "(plain Hugging Face checkpoints only); the default: one device (--device)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run (unsafe)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle-based .bin weights (unsafe for untrusted files)")


def cmd_analyze(args) -> None:
    from .importance import analyze
    cfg = from_args(AnalysisConfig, args)
    validate(cfg)
    lm, data = _load(args)
    texts, labels = data.calibration(cfg.samples, seed=cfg.seed)
    if lm.task == "encoder":
        labels = None
    imp = analyze(lm, texts, labels, cfg, progress=_progress("analysis"))
    out = {"model": args.model, "data": data.name, "task": lm.task, "summary": lm.summary(),
           **imp.to_json(all_metrics=args.all_metrics)}
    _write_json(out, args.json)
    print(f"analysed {len(imp.layer_cos)} layers on {imp.samples} samples in {imp.seconds:.1f} s -> {args.json}",
          file=sys.stderr)


def cmd_allocate(args) -> None:
    from .importance import Importance
    try:
        analysis = json.loads(Path(args.analysis).read_text())
        imp = Importance.from_json(analysis)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExplorerError(f"cannot read analysis file '{args.analysis}': {e}") from None
    cfg = from_args(AllocationConfig, args)
    if args.uniform:
        cfg = replace(cfg, mode="uniform")
    manual = _parse_manual(args.manual)
    if cfg.mode == "search":
        if not args.model:
            raise ExplorerError("--mode search scores plans on the real model: add --model (and --data)")
        if cfg.budget != "params":
            raise ExplorerError("--mode search meets a params budget: use --budget params")
        lm, data = _load(args)
        alloc = _search(lm, data, imp, cfg, manual, from_args(SearchConfig, args))
    else:
        alloc = _allocate_from_analysis(imp, analysis, cfg, manual)
    out = dict(analysis)
    for layer, lp in zip(out["layers"], alloc.layers):
        layer.update({"normalized_importance": lp.importance,  # Î_L by the plan's normalisation
                      "sparsity": lp.sparsity, "actual_sparsity": lp.actual_sparsity, "clipped": lp.clipped,
                      "keep_groups": lp.keep_groups, "keep_heads": lp.keep_groups * layer.get("heads_per_group", 1),
                      "keep_neurons": lp.keep_neurons, "params_after": lp.params_after})
    out["allocation"] = {k: v for k, v in alloc.to_json().items() if k != "layers"}
    _write_json(out, args.json)
    print(f"allocated {alloc.removed_fraction:.4f} of block parameters (target {cfg.target}, A {cfg.amplitude}, "
          f"{cfg.mode}); clipped layers: {alloc.clipped_layers or 'none'}", file=sys.stderr)


def _search(lm, data, imp, cfg: AllocationConfig, manual: dict[int, float], scfg, predictor=None):
    """The searched plan (explorer.search), progress on stderr; hand edits (--manual) on top of it."""
    from .allocation import allocate
    from .search import PlanSearch
    validate(scfg)
    if imp.n_layers != len(lm.adapter.layers(lm.model)):
        raise ExplorerError("the analysis does not fit the model: analyse this model first")
    search = PlanSearch(lm, data, imp, replace(cfg, mode="exact"), scfg, predictor)
    done = None
    for ev in search.events():
        if ev["type"] == "start":
            print("search starts: " + ", ".join(f"{k} {v:.4f}" for k, v in ev["start"].items())
                  + f" -> from {ev['chosen']}", file=sys.stderr)
        elif ev["type"] == "generation":
            print(f"generation {ev['generation']}/{ev['generations']}: best val loss {ev['loss']:.4f}, "
                  f"{ev['trials_per_s']:.1f} trials/s, ETA {ev['eta_s']:.0f} s", file=sys.stderr)
        else:
            done = ev
    print(f"search {done['reason']}: {done['trials']} trials in {done['seconds']:.0f} s, val loss "
          f"{min(done['start'].values()):.4f} -> {done['loss']:.4f}", file=sys.stderr)
    levels = [lp.sparsity for lp in done["allocation"].layers]
    return allocate(imp.normalized_by(cfg.normalization), imp.params, replace(cfg, mode="search"), manual,
                    scores=imp.unit_scores(), base=levels)


def cmd_preview(args) -> None:
    """Predicted val quality and speed-up of a plan, before running it (explorer.predict)."""
    from .importance import analyze
    from .predict import Recipe, measure, plan_sparsity, plan_speedup, speedup_label
    analysis = from_args(AnalysisConfig, args)
    cfg = from_args(AllocationConfig, args)
    prune = replace(PruneConfig(), recovery=args.recovery)
    pcfg = from_args(PredictConfig, args)
    for c in (analysis, prune, pcfg):
        validate(c)
    from .allocation import validate as validate_allocation
    validate_allocation(cfg)
    from .predict import parse_levels
    parse_levels(pcfg.levels)
    manual = _parse_manual(args.manual)
    lm, data = _load(args)
    n = len(lm.adapter.layers(lm.model))
    for layer, level in manual.items():  # before any measurement
        if not (0 <= layer < n):
            raise ExplorerError(f"--manual names layer {layer}, but the model has layers 0..{n - 1}")
        if not (0 <= level <= cfg.max_sparsity):
            raise ExplorerError(f"--manual {layer}={level}: a level must be in [0, S_max = {cfg.max_sparsity}]")
    if lm.task not in ("classification", "causal-lm"):
        raise ExplorerError("preview predicts a quality: the model needs a task head (classification or causal LM)")
    texts, labels = data.calibration(analysis.samples, stage=1, seed=analysis.seed)  # a run's first stage
    imp = analyze(lm, texts, labels if lm.task == "classification" else None, analysis)
    recipe = Recipe(analysis, replace(cfg, mode="exact" if cfg.mode == "search" else cfg.mode), prune, pcfg)

    def tick(d):
        print(f"predictor: {d['done']}/{d['total']} ({d['phase']}), ETA {d['eta_s']:.0f} s", file=sys.stderr)
    pred = measure(lm, data, imp, recipe, progress=tick)
    head_dim = lm.summary()["head_dim"]
    if cfg.mode == "search":
        alloc = _search(lm, data, imp, cfg, manual, from_args(SearchConfig, args), pred)
    else:
        alloc = _allocate_from_analysis(imp, {"summary": {"head_dim": head_dim}}, cfg, manual)
    uniform = _allocate_from_analysis(imp, {"summary": {"head_dim": head_dim}}, replace(cfg, mode="uniform"), {})
    latency = None
    if cfg.budget == "latency":
        from .latency import cost_model
        latency = cost_model(lm)

    def speedup(a):
        return plan_speedup(a, imp.params, head_dim, latency)
    speed_as = speedup_label(latency)
    quality = pred.predict(plan_sparsity(alloc))
    out = {"predicted": {"metric": pred.metric, "split": "val", "quality": quality, "speedup": speedup(alloc),
                         "speedup_as": speed_as, "uniform": {"quality": pred.predict(plan_sparsity(uniform)),
                                                             "speedup": speedup(uniform)},
                         "dense": pred.dense_quality, "error": pred.error(), "alpha": pred.alpha,
                         "predictor": {"cached": pred.cached, "measured_at": pred.measured_at,
                                       "seconds": pred.seconds, "recovery": pred.settings.get("recovery")}},
           "plan": alloc.to_json()}
    if args.json:
        _write_json(out, args.json)
    fmt = (lambda q: f"{q:.3f}") if pred.metric == "perplexity" else (lambda q: f"{q:.2%}")
    err = pred.error()
    print(f"predicted val {pred.metric}: {fmt(quality)} (uniform {fmt(out['predicted']['uniform']['quality'])}, "
          f"dense {fmt(pred.dense_quality)}); predicted speed-up x{out['predicted']['speedup']:.2f} ({speed_as}); "
          + (f"predictor error: median {err['median_share_of_gap']:.0%} of the gap on {err['plans']} check plan(s)"
             if err else "predictor error not measured (--checks 0)"), file=sys.stderr)


def _allocate_from_analysis(imp, analysis: dict, cfg: AllocationConfig, manual: dict[int, float]):
    """The `allocate` command's plan: a parameter budget, or a FLOPs one from the analysed
    structure (a latency budget needs the model on its device: use `prune`)."""
    from .allocation import allocate, validate
    validate(cfg)
    norm, scores = imp.normalized_by(cfg.normalization), imp.unit_scores()
    if cfg.budget == "params":
        return allocate(norm, imp.params, cfg, manual, scores=scores)
    if cfg.budget == "latency":
        raise ExplorerError("--budget latency needs the model to time its blocks: use `prune --budget latency`")
    if manual:
        raise ExplorerError("--manual applies to the params budget only")
    head_dim = (analysis.get("summary") or {}).get("head_dim")
    if not head_dim:
        raise ExplorerError("--budget flops needs the head size, which this analysis file does not record")
    from .latency import FlopsModel, allocate_flops
    return allocate_flops(norm, imp.params, cfg, FlopsModel.from_structure(imp.params[0], head_dim), scores)


def _parse_manual(items: list[str] | None) -> dict[int, float]:
    out = {}
    for item in items or []:
        try:
            k, v = item.split("=")
            out[int(k)] = float(v)
        except ValueError:
            raise ExplorerError(f"--manual expects LAYER=SPARSITY (e.g. 3=0.5), got '{item}'") from None
    return out


def _read_hand_plan(args, cfg: AllocationConfig, prune: PruneConfig) -> dict | None:
    """`prune --plan FILE` / `--manual L=S`: the file read and its levels checked (before the model is
    loaded); None without either. Returns {"manual", "path", "data", "plan"} for `_hand_plan`."""
    manual = _parse_manual(args.manual)
    if args.plan is None and not manual:
        return None
    flags = " / ".join(f for f, on in (("--plan", args.plan is not None), ("--manual", bool(manual))) if on)
    if cfg.budget != "params":
        raise ExplorerError(f"{flags} set the per-layer table, a parameter plan: it does not combine with "
                            f"--budget {cfg.budget} (which chooses the widths itself)")
    if prune.layer_drop or prune.prune_hidden:
        raise ExplorerError(f"{flags} fix the widths of every layer: they do not combine with --layer-drop or "
                            "--prune-hidden")
    for layer, level in manual.items():
        _check_level(f"--manual {layer}={level:g}", level, cfg)
    out = {"manual": manual, "path": args.plan, "data": None, "plan": None}
    if args.plan is not None:
        from .allocation import Allocation
        try:
            out["data"] = json.loads(Path(args.plan).read_text())
        except (OSError, ValueError) as e:
            raise ExplorerError(f"cannot read plan file '{args.plan}': {e}") from None
        try:
            out["plan"] = plan = Allocation.from_json(out["data"])
        except ExplorerError as e:
            raise ExplorerError(f"--plan {args.plan}: {e}") from None
        for lp in plan.layers:
            if lp.index not in manual:
                _check_level(f"--plan {args.plan}: layer {lp.index}", lp.sparsity, cfg)
    return out


def _check_level(what: str, level: float, cfg: AllocationConfig) -> None:
    if not (0 <= level <= cfg.max_sparsity):  # NaN fails too
        raise ExplorerError(f"{what}: sparsity {level:g} is outside [0, S_max = {cfg.max_sparsity:g}]")


def _hand_plan(lm, data, analysis_cfg: AnalysisConfig, cfg: AllocationConfig, hand: dict):
    """The per-layer table a `prune` run prunes to, as the app's hand-edited table: (plan, allocation
    config, description for the label).
      --manual alone: the model is analysed now and allocated as `allocate --manual` would (those
        layers at their levels, the others by the allocation, the budget redistributed in exact mode).
      --plan FILE: every layer ends at the file's widths (keep_groups, keep_neurons). A layer whose
        widths were edited keeps them (set by hand); a layer whose level (sparsity) was edited, or that
        --manual names, gets the widths its level gives by the file's own analysis (the `allocate`
        output holds it), the other layers keep theirs."""
    from .allocation import Allocation, LayerPlan, allocate
    from .methods.base import check_plan_fits, model_structure
    manual, path, d, plan = hand["manual"], hand["path"], hand["data"], hand["plan"]
    if plan is None:
        from .importance import analyze
        texts, labels = data.calibration(analysis_cfg.samples, seed=analysis_cfg.seed)
        imp = analyze(lm, texts, None if lm.task == "encoder" else labels, analysis_cfg)
        plan = _allocate_from_analysis(imp, {}, cfg, manual)
        check_plan_fits(lm, plan)
        return plan, cfg, f"table ({len(manual)} layer(s) by hand: {', '.join(map(str, sorted(manual)))})"
    try:
        check_plan_fits(lm, plan)
    except ExplorerError as e:
        raise ExplorerError(f"--plan {path}: {e}") from None
    structure = model_structure(lm)

    def after(st, g, n):
        return st["block_params"] - (st["groups"] - g) * st["group_params"] - (st["n_neurons"] - n) * st["neuron_params"]
    rows = d["layers"]
    widths_edited = [i for i, (lp, st, row) in enumerate(zip(plan.layers, structure, rows))
                     if "params_after" in row and row["params_after"] != after(st, lp.keep_groups, lp.keep_neurons)]
    analysed = "metric" in d and all(isinstance(r.get("neurons"), list) and "cosine_importance" in r for r in rows)
    levels_edited: list[int] = []
    derived = None
    if analysed:  # the layers' widths at their levels, from the file's own analysis and plan settings
        from .importance import Importance
        try:
            imp = Importance.from_json(d)
            mode = "exact" if plan.mode in ("exact", "search") else "reference"
            levels = {lp.index: manual.get(lp.index, lp.sparsity) for lp in plan.layers}
            derived = allocate(imp.normalized_by(plan.normalization), imp.params,
                               replace(cfg, mode=mode, split=plan.split, normalization=plan.normalization),
                               levels, scores=imp.unit_scores())
        except (KeyError, TypeError, ValueError) as e:
            raise ExplorerError(f"--plan {path}: cannot read its analysis: {e}") from None
        block = max(cfg.round_to, 1)
        for lp, dp in zip(plan.layers, derived.layers):
            grown = dp.keep_neurons <= lp.keep_neurons <= min(lp.neurons, dp.keep_neurons + 2 * block) \
                if mode == "exact" else lp.keep_neurons == dp.keep_neurons
            if lp.index not in widths_edited and not (lp.keep_groups == dp.keep_groups and grown):
                levels_edited.append(lp.index)
    elif manual:
        raise ExplorerError(f"--manual with --plan re-allocates layers from the plan file's analysis, and "
                            f"'{path}' has none: give the `allocate --json` output, or edit the widths in the file")
    by_hand = sorted(set(widths_edited) | set(levels_edited) | set(manual))
    layers = []
    for lp, st in zip(plan.layers, structure):
        g, n, level, hand_set = lp.keep_groups, lp.keep_neurons, lp.sparsity, lp.manual or lp.index in by_hand
        if lp.index in manual or lp.index in levels_edited:  # re-allocated at the level
            dp = derived.layers[lp.index]
            g, n, level = dp.keep_groups, dp.keep_neurons, dp.sparsity
        params_after = after(st, g, n)
        if lp.index in widths_edited:
            level = 1 - params_after / st["block_params"]
            _check_level(f"--plan {path}: layer {lp.index} (its widths)", level, cfg)
        layers.append(LayerPlan(lp.index, lp.importance, float(level), lp.clipped and not hand_set, hand_set, g, n,
                                st["groups"], st["n_neurons"], int(st["block_params"]), int(params_after)))
    out = Allocation(layers, plan.target, plan.amplitude, plan.mode, plan.split, plan.normalization, "params")
    removed = min(max(out.removed_fraction, 0.0), cfg.max_sparsity)
    marked = [l.index for l in layers if l.manual]
    notes = [f"widths edited: {', '.join(map(str, widths_edited))}" if widths_edited else "",
             f"levels edited: {', '.join(map(str, levels_edited))}" if levels_edited else "",
             f"--manual: {', '.join(map(str, sorted(manual)))}" if manual else ""]
    note = "; ".join(n for n in notes if n)
    what = (f"plan {Path(path).name} ({len(marked)} layer(s) by hand" + (f": {', '.join(map(str, marked))}" if marked
                                                                        else "") + (f"; {note}" if note else "") + ")")
    return out, replace(cfg, target=round(removed, 6)), what


def _progress(what: str):
    from tqdm import tqdm
    bar = {}

    def cb(done, total):
        if "b" not in bar:
            bar["b"] = tqdm(total=total, desc=what, file=sys.stderr, leave=False)
        bar["b"].n = done
        bar["b"].refresh()
        if done >= total:
            bar.pop("b").close()
    return cb


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One flag per field of the methods' options dataclasses (explorer.config.METHOD_OPTIONS), default
    None so that only what the user set reaches the method; a flag of another method is a message."""
    owners, done = option_fields(), set()
    for cls in dict.fromkeys(METHOD_OPTIONS.values()):  # magnitude and wanda share one class
        add_arguments(parser, cls, skip=tuple(done), unset=True, tag=lambda name: f"[{', '.join(owners[name])}] ")
        done |= {f.name for f in fields(cls)}


def _quality_text(ev: dict, metric: str) -> str:
    """'47.1329 (95 % 45.91-48.39, 4,096 val tokens)': a quality figure with its interval and budget."""
    value = ev.get(metric)
    if value is None:
        return "n/a"
    text = f"{value:.4f}"
    ci = ev.get(f"{metric}_ci")
    n = ev.get("eval_tokens") or ev.get("eval_examples")
    what = "tokens" if ev.get("eval_tokens") else "examples"
    extra = ([f"95 % {ci[0]:.4f}-{ci[1]:.4f}"] if ci else []) + ([f"{n:,} {ev.get('eval_split', '')} {what}"] if n else [])
    return text + (f" ({', '.join(extra)})" if extra else "")


def cmd_prune(args) -> None:
    from tqdm import tqdm

    from .methods import METHODS, make_run
    from .models import save_model
    if args.method not in METHODS:
        raise ExplorerError(f"unknown method '{args.method}': use one of {', '.join(METHODS)}")
    analysis = from_args(AnalysisConfig, args)
    alloc = from_args(AllocationConfig, args)
    method = args.method
    if args.allocation == "uniform":
        alloc = replace(alloc, mode="uniform")
        method = "uniform" if method == "adaptive" else method
    prune = from_args(PruneConfig, args)
    if args.recipe:
        from .recipes import RECIPES, recipe_for
        recipe = recipe_for(args.model)
        if not recipe:
            raise ExplorerError(f"--recipe: there is no recipe for '{args.model}' (built-in recipes: "
                                f"{', '.join(sorted(RECIPES))})")
        prune = replace(prune, **recipe)
        print(f"recipe for {args.model}: " + ", ".join(f"{k}={v}" for k, v in recipe.items()), file=sys.stderr)
    if prune.stages < 1:
        raise ExplorerError(f"--stages must be at least 1, got {prune.stages}")
    from .allocation import validate
    validate(alloc)
    if alloc.budget != "params" and method not in ("adaptive", "uniform"):
        raise ExplorerError(f"--budget {alloc.budget} works with the adaptive and uniform methods, not '{method}'")
    hand = _read_hand_plan(args, alloc, prune)  # checked before the model loads
    lm, data = _load(args)
    options = {k: getattr(args, k) for k in option_fields() if getattr(args, k, None) is not None}
    options["timing"] = args.timing
    if hand is not None:  # the per-layer table: --plan FILE and/or --manual L=S
        final_plan, alloc, what = _hand_plan(lm, data, analysis, alloc, hand)
        options.update(final_plan=final_plan, label=f"{method}, {what}")
    run = make_run(method, lm, data, analysis, alloc, prune, **options)  # a method that picks its widths refuses
    if hand is not None:
        print(f"plan: {what}", file=sys.stderr)
    total = prune.stages * (1 + max(prune.recovery_steps, 0) * (split_recovery(prune.recovery)[1] != "none"))
    bar = tqdm(total=total, desc="pruning", file=sys.stderr)
    m = None
    for ev in run.events():
        t = ev["type"]
        if t == "dense":
            m = ev["metric"]
            bar.write(f"dense: {m} {_quality_text(ev['eval'], m)}  params {ev['eval']['params']:,}")
        elif t == "cost_model":
            bar.write(_cost_model_line(ev))
        elif t in ("analysis", "step"):
            bar.update(1)
            if t == "step":
                bar.set_postfix(stage=ev["stage"], loss=f"{ev['loss']:.3f}")
        elif t == "phase":
            bar.write(f"stage {ev['stage']} {ev['phase']}: {m} {ev['quality'].get(m):.4f}")
        elif t == "stage":
            r = ev["record"]
            if r.reconstruction:
                bar.write(f"stage {r.stage} reconstruction: {r.reconstruction['seconds']:.1f} s on "
                          f"{r.reconstruction['tokens']:,} tokens, calibration error x{r.reconstruction['error_ratio']:.3f} "
                          "of plain removal")
            bar.write(f"stage {r.stage}: removed {r.removed_fraction:.3f} of block params, {m} "
                      f"{_quality_text({**r.quality, **r.eval_size, f'{m}_ci': r.interval.get(m)}, m)}"
                      + (f", latency {r.latency_ms:.1f} ms" if r.latency_ms else ""))
        elif t == "trial":
            bar.write(f"trial {ev['trial']}: {ev['value']:.4f} (best {ev['best_value']:.4f})")
        elif t == "round":
            bar.write("round " + ", ".join(f"{k} {v}" for k, v in ev.items() if k != "type"))
        elif t in ("error", "stopped"):
            bar.close()
            _write_json(run.report(), args.json)
            raise ExplorerError(ev.get("message", "stopped"))
    bar.close()
    report = run.report()
    _write_json(report, args.json)  # first: a failed save must not lose the run
    f, d = report["final"], report["dense"]
    print(f"{m}: dense {d[m]:.4f} -> pruned {f[m]:.4f}; params {d['params']:,} -> {f['params']:,}"
          + (f"; latency {d['latency_ms']:.1f} -> {f['latency_ms']:.1f} ms" if d.get("latency_ms") and f.get("latency_ms")
             else "; not timed (--no-timing)"), file=sys.stderr)
    if f.get("predicted_speedup"):
        measured = f.get("measured_speedup")
        print(f"speed-up: predicted {f['predicted_speedup']:.2f}x, measured "
              + (f"{measured:.2f}x ({f['measured_as']})" if measured else "n/a"), file=sys.stderr)
    if args.out:
        try:
            path = save_model(lm, args.out, extra={"report": {k: report[k] for k in ("dense", "final", "metric",
                                                                                     "config", "method")
                                                              if k in report}})
        except (OSError, ValueError) as e:
            raise ExplorerError(f"the run finished and its report is in {args.json}, but saving the model to "
                                f"'{args.out}' failed: {e}") from None
        report["saved_to"] = str(path)
        _write_json(report, args.json)
        print(f"saved to {path}", file=sys.stderr)


def _cost_model_line(ev: dict) -> str:
    if ev.get("status") == "measuring":
        return "latency budget: measuring the per-layer cost model (once per model shape and device)..."
    if ev.get("budget") == "flops":
        return f"flops budget: dense blocks {ev['reference']:,.0f} FLOPs per token"
    sig, check = ev.get("signature", {}), ev.get("check") or {}
    how = f"cached from {ev.get('measured_at')}" if ev.get("cached") else f"measured in {ev.get('seconds', 0):.1f} s"
    line = (f"cost model ({sig.get('mode')} at {sig.get('batch_size')} x {sig.get('seq_len')}, {sig.get('device')}; "
            f"{how}): dense predicted {ev['reference']:.1f} ms, fixed {ev.get('fixed_ms', 0):.1f} ms")
    if check:
        line += f"; whole model measured {check['measured_ms']:.1f} ms (prediction {check['error']:+.1%})"
    return line


def cmd_eval(args) -> None:
    from .evaluate import SpeedSetup, evaluate, metric_name
    lm, data = _load(args)
    setup = SpeedSetup(repeats=args.speed_repeats, new_tokens=args.new_tokens) if args.speed_repeats else None
    ev = evaluate(lm, data, args.eval_samples, batch_size=args.batch_size, seq_len=args.seq_len, speed_setup=setup)
    m = metric_name(lm)
    sp = ev.pop("speed", {})
    out = {"model": args.model, "data": data.name, "metric": m, **ev,
           **{k: v for k, v in sp.items() if k not in ("speedup",)}}
    _write_json(out, args.json)
    figures = "  ".join(f"{k} {v:.1f}" for k, v in sp.items() if isinstance(v, float) and k != "weight_mb")
    print(f"{m}: {ev.get(m)}  params {ev['params']:,}  weights {ev['weight_mb']:.0f} MB  latency "
          f"{ev['latency_ms']:.1f} ms (batch {args.batch_size} x {args.seq_len})  {figures}", file=sys.stderr)


def _recover_skip() -> tuple[str, ...]:
    """PruneConfig fields that `recover` has no flag for (stages, reconstruction, ...)."""
    return tuple(f.name for f in fields(PruneConfig) if f.name not in RECOVER_FIELDS)


RECOVER_FIELDS = ("lr", "train_batch_size", "lora_rank", "kd_alpha", "kd_temperature", "kd_hidden_weight",
                  "kd_hidden_loss", "kd_hidden_every", "eval_samples", "seed")


def cmd_recover(args) -> None:
    """Fine-tune a (pruned, saved) model with the library's recovery loop: one process, or every
    process of `accelerate launch` / torchrun training its slice of each batch (explorer.recovery)."""
    import torch

    from .evaluate import metric_name, quality
    from .models import save_model
    from .recovery import launched_distributed, recover_steps, use_cpu
    state = None
    if launched_distributed():
        if args.device_map:
            raise ExplorerError("--device-map does not combine with a distributed launch: every process "
                                "holds the model on its own device (FSDP shards it)")
        from accelerate import PartialState
        state = PartialState(cpu=use_cpu("cpu" if args.device == "cpu" else "cuda"))
        if args.device == "auto":  # this process's GPU (cuda:LOCAL_RANK), or the CPU
            args.device = "cpu" if state.device.type == "cpu" else str(state.device)
    main_process = state is None or state.is_main_process
    cfg = PruneConfig(recovery=args.recovery, recovery_steps=args.steps,
                      **{k: getattr(args, k) for k in RECOVER_FIELDS})
    validate(cfg)
    if args.steps < 1:
        raise ExplorerError(f"--steps must be at least 1, got {args.steps}")
    if args.recovery == "kd" and not args.teacher:
        raise ExplorerError("--recovery kd distils from the dense model: give it with --teacher")
    if args.teacher and args.recovery != "kd":
        raise ExplorerError("--teacher is for --recovery kd")
    lm, data = _load(args)
    teacher = None
    if args.teacher:
        t = _load(argparse.Namespace(**{**vars(args), "model": args.teacher}), need_data=False)[0]
        if t.task != lm.task or t.model.config.model_type != lm.model.config.model_type:
            raise ExplorerError(f"the teacher '{args.teacher}' ({t.model.config.model_type}, {t.task}) does not match "
                                f"the model ({lm.model.config.model_type}, {lm.task})")
        teacher = t.model.eval()
    m = metric_name(lm)
    before = quality(lm, data, cfg.eval_samples, split="val") if main_process else None
    t0 = time.perf_counter()
    losses = []
    for step, loss in recover_steps(lm, data, cfg, teacher=teacher):
        losses.append(loss)
        if main_process:
            print(f"step {step}/{cfg.recovery_steps}: loss {loss:.4f}", file=sys.stderr)
    seconds = time.perf_counter() - t0
    world = state.num_processes if state else 1
    rank = state.process_index if state else 0
    with torch.no_grad():  # the same weights on every process: the same fingerprint
        sums = torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()]) for p in lm.model.parameters()])
    fingerprint = hashlib.sha256(sums.cpu().numpy().tobytes()).hexdigest()[:16]
    me = {"rank": rank, "final_loss": losses[-1], "weights": fingerprint}
    print(f"rank {rank}/{world}: {len(losses)} steps in {seconds:.1f} s, final loss {losses[-1]:.6f}, "
          f"weights {fingerprint}", file=sys.stderr)
    ranks = [me]
    if state is not None:
        from accelerate.utils import gather_object
        ranks = sorted(gather_object([me]), key=lambda r: r["rank"])
    if main_process:
        after = quality(lm, data, cfg.eval_samples, split="val")
        report = {"model": args.model, "data": data.name, "task": lm.task, "recovery": args.recovery,
                  "teacher": args.teacher, "steps": len(losses), "lr": cfg.lr, "train_batch_size": cfg.train_batch_size,
                  "world_size": world, "distributed": state.distributed_type.value if state else "no",
                  "seconds": seconds, "losses": losses, "final_loss": losses[-1], "metric": m,
                  "before": before, "after": after, "params": lm.n_params, "ranks": ranks}
        _write_json(report, args.json)  # first: a failed save must not lose the run
        if args.out:
            try:
                path = save_model(lm, args.out, extra={"recovery": {k: report[k] for k in (
                    "recovery", "steps", "lr", "train_batch_size", "world_size", "final_loss", "before", "after")}})
            except (OSError, ValueError) as e:
                raise ExplorerError(f"training finished and its report is in {args.json}, but saving the model to "
                                    f"'{args.out}' failed: {e}") from None
            report["saved_to"] = str(path)
            _write_json(report, args.json)
        print(f"{m} (val): {before.get(m):.4f} -> {after.get(m):.4f} after {len(losses)} {args.recovery} steps on "
              f"{world} process(es) in {seconds:.1f} s" + (f"; saved to {report['saved_to']}" if args.out else ""),
              file=sys.stderr)
    if state is not None:
        state.wait_for_everyone()
        # leave the process group before exit: a gloo group left to the interpreter's teardown aborted a
        # rank on a loaded machine ("terminate called without an active exception", SIGABRT)
        torch.distributed.destroy_process_group()


def cmd_generate(args) -> None:
    from .generate import classify, generate
    lm, _ = _load(args, need_data=False)
    others = [lm] + ([_load(argparse.Namespace(**{**vars(args), "model": args.against}), need_data=False)[0]]
                     if args.against else [])
    for model in others:
        if model.task == "causal-lm":
            g = generate(model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         seed=args.seed)
            print(f"--- {model.name} ({g['new_tokens']} tokens, {g['tokens_per_s']:.1f} tokens/s)", file=sys.stderr)
            print(args.prompt + g["text"])
        elif model.task == "classification":
            c = classify(model, args.prompt)
            print(f"--- {model.name}", file=sys.stderr)
            print(f"{c['label']}  " + "  ".join(f"{k} {v:.3f}" for k, v in c["probabilities"].items()))
        else:
            raise ExplorerError(f"'{model.name}' is an encoder without a task head: it neither generates nor classifies")


def cmd_export(args) -> None:
    from .export import FORMATS, export
    if args.format not in FORMATS:
        raise ExplorerError(f"unknown format '{args.format}': use one of {', '.join(FORMATS)}")
    if args.gguf_quant:  # an unknown type, the wrong format or a missing llama.cpp: said before the model loads
        from .llama_cpp import find_tools, quant_type
        if not args.format.startswith("gguf"):
            raise ExplorerError(f"--gguf-quant applies to --format gguf / gguf-f16, not {args.format}")
        if quant_type(args.gguf_quant) not in ("Q8_0", "F16"):
            find_tools()
    lm, _ = _load(args, need_data=False)
    res = export(lm, args.format, args.out, check=not args.no_check, quant=args.gguf_quant)
    if args.json:
        _write_json(res, args.json)
    print(f"exported {args.format} -> {res['path']} ({res['bytes'] / 1e6:.1f} MB)" + (
        f"; check: {res['check_summary']}" if res.get("check_summary") else ""), file=sys.stderr)
    for w in res.get("warnings", []) if not res.get("check_summary") else []:
        print(f"note: {w}", file=sys.stderr)  # with a check they are in its summary
    if res.get("check") and not res["check"].get("ok", True):
        raise ExplorerError(f"the exported file does not reproduce the model: {res['check_summary']}")


def cmd_sensitivity(args) -> None:
    from .sensitivity import sensitivity
    lm, data = _load(args)
    try:
        sparsities = [float(x) for x in args.sparsities.split(",")]
    except ValueError:
        raise ExplorerError(f"--sparsities expects comma-separated numbers, got '{args.sparsities}'") from None
    res = sensitivity(lm, data, sparsities, metric=args.metric, eval_samples=args.eval_samples,
                      progress=_progress("sensitivity"), kind=args.kind, calibration_samples=args.samples)
    _write_json(res, args.json)
    if args.html:
        from .plots import sensitivity_figure
        sensitivity_figure(res).write_html(args.html, include_plotlyjs="cdn")
    print(f"sensitivity of {len(res['layers'])} layers at {sparsities} -> {args.json}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m explorer", description="Pruning Explorer: analyse, allocate, "
                                 "prune and evaluate transformer models.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="layer cosine importance and head/neuron salience")
    _add_model_args(p)
    add_arguments(p, AnalysisConfig)
    p.add_argument("--all-metrics", action="store_true", help="include every metric per layer in the JSON")
    p.add_argument("--json", required=True, help="output file")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("allocate", help="per-layer sparsity from an analysis: S_L = S_base - A*Î_L "
                       "(--mode search: searched on the real model, needs --model)")
    p.add_argument("--analysis", required=True, help="JSON written by `analyze`")
    add_arguments(p, AllocationConfig, rename={"amplitude": "amplitude"})
    p.add_argument("--uniform", action="store_true", help="uniform allocation (same as --mode uniform)")
    p.add_argument("--manual", nargs="*", metavar="L=S", help="per-layer overrides, e.g. 0=0.1 5=0.6")
    p.add_argument("--json", required=True, help="output file")
    _add_model_args(p, required=False)
    add_arguments(p, SearchConfig, rename={"seed": "search_seed", "step": "search_step"})
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("preview", help="predicted val quality and speed-up of a plan before running it (the "
                       "predictor is measured once per model, data, metric and recovery, then cached)")
    _add_model_args(p)
    add_arguments(p, AnalysisConfig)
    add_arguments(p, AllocationConfig)
    p.add_argument("--manual", nargs="*", metavar="L=S", help="per-layer overrides, e.g. 0=0.1 5=0.6")
    p.add_argument("--recovery", default="reconstruct", choices=["none", "reconstruct"],
                   help="what the predicted stage does after its cut (default: reconstruct)")
    add_arguments(p, PredictConfig, skip=("seed",))  # --seed (the calibration's) seeds the checks and the search
    add_arguments(p, SearchConfig, skip=("seed",), rename={"step": "search_step"})
    p.add_argument("--json", default=None, help='also write {"predicted": {...}, "plan": {...}} here')
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("prune", help="incremental structural pruning with recovery; saves the smaller model")
    _add_model_args(p)
    add_arguments(p, AnalysisConfig)
    add_arguments(p, AllocationConfig, skip=("mode",))
    p.add_argument("--allocation", default="adaptive", choices=["adaptive", "uniform"],
                   help="adaptive (S_L = S_base - A*Î_L, exact budget) or uniform")
    p.add_argument("--mode", default="exact", choices=["exact", "reference"],
                   help="adaptive budget: exact (default, departure) or reference (clip only)")
    add_arguments(p, PruneConfig, skip=("seed",))
    p.add_argument("--method", default="adaptive",
                   help="pruning method: adaptive (default), uniform, apt, adapruner, fusion, magnitude, wanda, "
                        "lottery, layer-drop, distill-baseline, lora-before, lora-after")
    add_method_options(p)
    p.add_argument("--manual", nargs="*", metavar="L=S",
                   help="per-layer sparsity set by hand, as `allocate --manual` (e.g. 0=0.1 5=0.6): the run prunes "
                        "to that table (the other layers by the allocation; every method that takes per-layer "
                        "widths follows it; params budget only); with --plan: those layers re-allocated at S")
    p.add_argument("--plan", default=None, metavar="FILE",
                   help="prune to the per-layer plan in FILE, the JSON `allocate --json` writes (or the app's plan "
                        "JSON): each layer ends at its keep_groups / keep_neurons; edit those, or a layer's "
                        "sparsity (re-allocated at that level from the file's analysis)")
    p.add_argument("--recipe", action="store_true", help="use the built-in model's recovery recipe (explorer/recipes.py: "
                   "chosen on val by bench.recipe) instead of the recovery flags")
    p.add_argument("--no-timing", dest="timing", action="store_false",
                   help="quality only: skip the latency / decode timings of the dense model and of every stage (on a "
                        "CPU they take longer than the quality figure); measure the result with `eval` afterwards")
    p.add_argument("--out", default=None, help="directory to save the pruned model")
    p.add_argument("--json", required=True, help="report file")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("sensitivity", help="quality against sparsity when pruning one layer at a time (val split)")
    _add_model_args(p)
    p.add_argument("--sparsities", default="0.1,0.3,0.5,0.7,0.9", help="comma-separated sparsities per layer")
    p.add_argument("--metric", default="taylor", help="salience metric that picks the units")
    p.add_argument("--kind", default="structured", choices=["structured", "unstructured"],
                   help="structured: whole heads/neurons; unstructured: weights by magnitude")
    p.add_argument("--samples", type=int, default=64, help="calibration samples for the salience")
    p.add_argument("--eval-samples", type=int, default=200, help="val examples / tokens per measurement")
    p.add_argument("--json", required=True, help="output file")
    p.add_argument("--html", default=None, help="also write the curves as an HTML chart")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("eval", help="quality, size and latency of one model")
    _add_model_args(p)
    p.add_argument("--eval-samples", type=int, default=0, help="test examples / tokens (0: all / 16384)")
    p.add_argument("--batch-size", type=int, default=32, help="latency batch size")
    p.add_argument("--seq-len", type=int, default=128, help="latency sequence length")
    p.add_argument("--speed-repeats", type=int, default=3,
                   help="timed repeats of the speed figures (LMs: decode tokens/s at batch 1 and 8 with the KV cache, "
                        "prefill ms; encoders: latency at 1 x 128 and 32 x 128); 0: skip them")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per decode measurement")
    p.add_argument("--json", required=True, help="output file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("recover", help="fine-tune a (pruned) model with the recovery loop (LoRA, full, KD); "
                                       "runs on every process under `accelerate launch`")
    _add_model_args(p)
    p.add_argument("--recovery", required=True, choices=["lora", "full", "kd"], help="what trains: LoRA adapters "
                   "(merged into the weights at the end), every weight, or every weight distilled from --teacher")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps (default: 100)")
    p.add_argument("--teacher", default=None, help="the dense model to distil from (--recovery kd)")
    add_arguments(p, PruneConfig, skip=_recover_skip())
    p.add_argument("--out", default=None, help="directory to save the trained model (safetensors)")
    p.add_argument("--json", required=True, help="report file")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("generate", help="continue a prompt (LMs) or classify a sentence (classifiers)")
    _add_model_args(p, data=False)
    p.add_argument("--prompt", required=True, help="the prompt (LMs) or sentence to classify")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--against", default=None, help="a second model (e.g. the dense one) to run on the same prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a model as ONNX (every architecture) or GGUF (LLaMA family)")
    _add_model_args(p, data=False)
    p.add_argument("--format", required=True, help="onnx or gguf (gguf-f16 for half-precision weights)")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--gguf-quant", default=None, metavar="TYPE",
                   help="quantise the GGUF: q8_0 (no llama.cpp needed), q4_k_m, q5_k_m, q6_k, q4_0 ... "
                   "(llama-quantize's types; needs `make llama-cpp`)")
    p.add_argument("--no-check", action="store_true", help="skip reading the file back / running it")
    p.add_argument("--json", default=None, help="also write the export report here")
    p.set_defaults(func=cmd_export)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ExplorerError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # not the user's fault: short message, traceback on request
        if os.environ.get("EXPLORER_DEBUG"):
            raise
        if is_oom(e):
            print(f"error: {OOM_HINT}", file=sys.stderr)
            return EXIT_USAGE
        print(f"error: internal error: {type(e).__name__}: {e} (set EXPLORER_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    return 0
