"""`python -m bench.recipe [--mode quick|smoke] [--models ...] [--merge] [--out bench/]`: a default
recovery recipe per built-in model, chosen on the **val** split, then reported on **test**.

Every run starts from the same one-stage cut: `explorer.pruning.PruningRun` (the app's and the
CLI's pipeline) with adaptive allocation and recovery "reconstruct", one per (budget, seed). The
training recipes then continue from a copy of that reconstructed model through
`explorer.recovery.recover_steps` with the dense model as teacher, which is what PruningRun's
"reconstruct+kd" / "reconstruct+lora" do after their reconstruction (same seed, same batches;
`--check` runs one recipe through PruningRun end to end and compares). Sharing the cut keeps the
comparison paired: reconstruction alone, distillation and LoRA differ only in their training.

Classifiers (MiniLM-RT): a pruned grid searched coordinate-wise on val at one budget and seed
  1. lr at 40 steps, kd_alpha 0.5, T 2, no hidden loss, batch 16;
  2. around the best, one change each: kd_alpha 1 (no task loss), T 1, hidden cosine, hidden mse, batch 32;
  3. the best so far with more steps (100, 200);
plus "reconstruct+lora" with its own lr x steps grid. Each configuration is scored by val accuracy
(ties: lower val NLL), with the paired count of val examples it fixes / breaks against
reconstruction alone (McNemar). The chosen distillation and LoRA recipes then run on **test** at
every budget and seed next to reconstruction alone; the default recipe is the one that helps on
val (reconstruction alone if none does).

Causal LMs (SmolLM2): reconstruction, then at most a few distillation settings within a wall-time
cap each, scored by val perplexity; the chosen one on test (BBC + IMDB) per seed. Each run's wall
time is kept. Writes recipe.json and RECIPE.md (`--merge` keeps other models' results).

bench/RECIPE.md is
  python -m bench.recipe --mode quick --models minilm-rt
  python -m bench.recipe --teacher-fit --merge --models minilm-rt
  python -m bench.recipe --mode quick --models smollm2-135m --merge
  python -m bench.recipe --mode quick --models smollm2-135m --merge --add-round \
      --lm-settings '[{"lr": 1e-4, "recovery_steps": 40}]' --time-cap 600
(the second SmolLM2 round: the steps that fit 10 minutes, once the first round had shown the
step time).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import common  # noqa: F401  (offline environment first)
from .common import RECOVERY_KEYS as KEYS, fresh, load, log, machine, other_corpus, train, write_json

KD_BASE = {"recovery": "reconstruct+kd", "recovery_steps": 40, "lr": 1e-4, "train_batch_size": 16, "kd_alpha": 0.5,
           "kd_temperature": 2.0, "kd_hidden_weight": 0.0, "kd_hidden_loss": "cosine"}
LORA_BASE = {"recovery": "reconstruct+lora", "recovery_steps": 40, "lr": 5e-4, "train_batch_size": 16, "lora_rank": 8}


@dataclass
class Preset:
    model: str
    choose_budget: float
    budgets: list[float]
    seeds: list[int]
    # classifier search: stage 1 (lr, steps); stage 2 overrides of the best; stage 3 steps for the best so far
    stage1: list[tuple[float, int]] = field(default_factory=list)
    stage2: list[dict] = field(default_factory=list)
    stage3: list[int] = field(default_factory=list)
    lora: list[tuple[float, int]] = field(default_factory=list)
    # causal-LM settings (each a full config dict) and the wall-time cap per training, seconds
    lm_settings: list[dict] = field(default_factory=list)
    time_cap_s: float = 0.0
    samples: int = 512
    batch_size: int = 16
    amplitude: float = 0.05
    normalization: str = "maxabs"
    val_n: int = 0  # LMs: val tokens (0: 16384)
    test_n: int = 0  # LMs: BBC test tokens
    other_n: int = 0  # LMs: IMDB tokens


STAGE2 = [{"kd_alpha": 1.0}, {"kd_temperature": 1.0}, {"kd_hidden_weight": 1.0, "kd_hidden_loss": "cosine"},
          {"kd_hidden_weight": 1.0, "kd_hidden_loss": "mse"}, {"train_batch_size": 32}]
SMOL_KD = {**KD_BASE, "kd_alpha": 1.0, "kd_temperature": 1.0, "train_batch_size": 4, "recovery_steps": 16}
PRESETS = {
    "quick": [Preset("minilm-rt", 0.4, [0.4, 0.6], [0, 1, 2],
                     stage1=[(1e-5, 40), (3e-5, 40), (1e-4, 40)],
                     stage2=STAGE2, stage3=[100, 200], lora=[(5e-4, 40), (1e-4, 100)]),
              Preset("smollm2-135m", 0.2, [0.2], [0], samples=32, batch_size=8, amplitude=0.15,
                     normalization="rank", val_n=2048, test_n=16384, other_n=4096, time_cap_s=420,
                     lm_settings=[{**SMOL_KD, "lr": 1e-4}, {**SMOL_KD, "lr": 3e-5}])],
    "smoke": [Preset("tiny-bert", 0.3, [0.3], [0, 1], stage1=[(1e-4, 2)],
                     stage2=[{"kd_hidden_weight": 1.0}], lora=[(5e-4, 2)], samples=40, batch_size=8),
              Preset("tiny-llama", 0.3, [0.3], [0], samples=40, batch_size=8, amplitude=0.1, val_n=256, test_n=512,
                     other_n=256, time_cap_s=30, lm_settings=[{**KD_BASE, "recovery_steps": 2, "train_batch_size": 4},
                                                             {**KD_BASE, "recovery_steps": 2, "lr": 3e-5,
                                                              "train_batch_size": 4}])],
}


def label(cfg: dict) -> str:
    if cfg["recovery"] == "reconstruct":
        return "reconstruct"
    s = f"{cfg['recovery']} {cfg['recovery_steps']} steps lr {cfg['lr']:g} batch {cfg['train_batch_size']}"
    if cfg["recovery"].endswith("kd"):
        hidden = f"{cfg['kd_hidden_weight']:g} {cfg['kd_hidden_loss']}" if cfg["kd_hidden_weight"] else "0"
        s += f" alpha {cfg['kd_alpha']:g} T {cfg['kd_temperature']:g} hidden {hidden}"
    return s


# --- scoring -----------------------------------------------------------------------------------

@torch.inference_mode()
def predictions(lm, texts: list[str], labels: list[int], batch_size: int = 64) -> tuple[list[int], float]:
    """Per-example predictions (in the given order) and the mean NLL of the labels; batches sorted by
    length (as bench.common.accuracy)."""
    lm.model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    pred, nll = [0] * len(texts), 0.0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        logits = lm.model(**lm.encode([texts[i] for i in idx])).logits.float().cpu()
        y = torch.as_tensor([labels[i] for i in idx])
        nll += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            pred[i] = p
    return pred, nll / max(len(texts), 1)


def cls_score(lm, data, split: str) -> dict:
    pred, nll = predictions(lm, data.texts[split], data.labels[split])
    y = data.labels[split]
    return {"accuracy": sum(p == t for p, t in zip(pred, y)) / len(y), "nll": nll, "pred": pred}


def mcnemar(pred: list[int], ref: list[int], y: list[int]) -> dict:
    """Examples the model gets right where the reference is wrong (fixed), and the reverse (broken);
    z = (fixed - broken) / sqrt(fixed + broken)."""
    fixed = sum(p == t != r for p, r, t in zip(pred, ref, y))
    broken = sum(r == t != p for p, r, t in zip(pred, ref, y))
    return {"fixed": fixed, "broken": broken, "z": (fixed - broken) / math.sqrt(fixed + broken) if fixed + broken else 0.0}


def lm_score(lm, data, split: str, p: Preset, other: list[str] | None) -> dict:
    from explorer.evaluate import perplexity
    if split == "val":
        return {"perplexity": perplexity(lm, data.texts["val"], max_tokens=p.val_n or 16384)}
    out = {"perplexity": perplexity(lm, data.texts["test"], max_tokens=p.test_n or 16384)}
    if other:
        out["perplexity_imdb"] = perplexity(lm, other, max_tokens=p.other_n)
    return out


# --- runs --------------------------------------------------------------------------------------

def reconstructed(base, data, p: Preset, budget: float, seed: int, dense: dict):
    """PruningRun with recovery "reconstruct" (phases: the plain cut, evaluated on test for classifiers,
    val for LMs); returns (the reconstructed model, its report, seconds)."""
    from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
    from explorer.pruning import PruningRun
    lm = fresh(base)
    lmtask = base.task == "causal-lm"
    run = PruningRun(lm, data, AnalysisConfig(samples=p.samples, batch_size=p.batch_size, metric="taylor", seed=seed),
                     AllocationConfig(target=budget, amplitude=p.amplitude, normalization=p.normalization),
                     PruneConfig(stages=1, recovery="reconstruct", recovery_steps=0, seed=seed, speed_repeats=0,
                                 eval_split="val" if lmtask else "test", eval_samples=p.val_n if lmtask else 0),
                     timing=False, dense_eval=dense)
    t0 = time.perf_counter()
    rep = run.run()
    if rep["status"] != "done":
        raise RuntimeError(rep["error"])
    return lm, rep, time.perf_counter() - t0


def full_cfg(cfg: dict) -> dict:
    base = KD_BASE if cfg["recovery"].endswith("kd") else LORA_BASE
    return {**base, **cfg}


# --- classifiers -------------------------------------------------------------------------------

def classifier(p: Preset, check: bool) -> dict:
    base, data = load(p.model)
    y_val, y_test = data.labels["val"], data.labels["test"]
    dense_val, dense_test = cls_score(base, data, "val"), cls_score(base, data, "test")
    dense = {"accuracy": dense_test["accuracy"]}
    log(f"{p.model} dense val {dense_val['accuracy']:.4f}, test {dense_test['accuracy']:.4f}")
    cache: dict = {}

    def recon(budget, seed):
        if (budget, seed) not in cache:
            lm, rep, secs = reconstructed(base, data, p, budget, seed, dense)
            st = rep["stages"][0]
            cache[(budget, seed)] = {"lm": lm, "seconds": secs, "cut": st["phases"]["cut"]["accuracy"],
                                     "removed": st["removed_fraction"], "val": cls_score(lm, data, "val"),
                                     "test": cls_score(lm, data, "test"),
                                     "reconstruction_seconds": st["reconstruction"]["seconds"]}
            log(f"  {budget:.0%} seed {seed}: cut {cache[(budget, seed)]['cut']:.4f} -> recon test "
                f"{cache[(budget, seed)]['test']['accuracy']:.4f}, val {cache[(budget, seed)]['val']['accuracy']:.4f} "
                f"({secs:.0f} s)")
        return cache[(budget, seed)]

    r0 = recon(p.choose_budget, p.seeds[0])
    grid: list[dict] = []

    def trial(cfg: dict, stage: str) -> dict:
        cfg = full_cfg(cfg)
        for g in grid:
            if all(g["config"].get(k) == v for k, v in cfg.items()):
                return g
        lm, secs, steps, losses = train(r0["lm"], base, data, cfg, p.seeds[0])
        sc = cls_score(lm, data, "val")
        g = {"stage": stage, "config": cfg, "steps": cfg["recovery_steps"], "lr": cfg["lr"],
             "kd_hidden_weight": cfg.get("kd_hidden_weight", 0.0), "val": sc["accuracy"], "val_nll": sc["nll"],
             "vs_recon": mcnemar(sc["pred"], r0["val"]["pred"], y_val), "seconds": secs,
             "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
        grid.append(g)
        log(f"  [{stage}] {label(cfg)}: val {g['val']:.4f} (nll {g['val_nll']:.4f}, fixed {g['vs_recon']['fixed']} "
            f"broken {g['vs_recon']['broken']}) {secs:.0f} s")
        return g

    def key(g):
        return (g["val"], -g["val_nll"], -g["steps"])

    for lr, steps in p.stage1:
        trial({"recovery": "reconstruct+kd", "lr": lr, "recovery_steps": steps}, "1: lr")
    kd_rows = lambda: [g for g in grid if g["config"]["recovery"].endswith("kd")]  # noqa: E731
    best = max(kd_rows(), key=key)
    for ov in p.stage2:
        trial({**best["config"], **ov}, "2: around the best")
    best = max(kd_rows(), key=key)
    for steps in p.stage3:
        trial({**best["config"], "recovery_steps": steps}, "3: more steps")
    kd_grid = kd_rows()
    best_kd = max(kd_grid, key=key)
    lora_grid = []
    for lr, steps in p.lora:
        lora_grid.append(trial({"recovery": "reconstruct+lora", "lr": lr, "recovery_steps": steps}, "lora"))
    grid = kd_grid  # the KD grid stays "grid" (the schema of earlier runs); LoRA's beside it
    best_lora = max(lora_grid, key=key) if lora_grid else None
    recon_val = r0["val"]["accuracy"]
    helps = [g for g in [best_kd, best_lora] if g and key(g) > (recon_val, -r0["val"]["nll"], 0)
             and g["val"] > recon_val]
    default = max(helps, key=key)["config"] if helps else {"recovery": "reconstruct"}
    log(f"chosen on val: kd {label(best_kd['config'])} ({best_kd['val']:.4f}); "
        f"lora {label(best_lora['config']) if best_lora else '-'}; recon alone {recon_val:.4f}; default {label(default)}")

    # LoRA goes to test only where it beats reconstruction alone on val (time: ~1.5 min a run here)
    lora_on_test = bool(best_lora) and (best_lora["val"] > recon_val or p.model.startswith("tiny-"))
    rows = []
    for budget in p.budgets:
        for seed in p.seeds:
            r = recon(budget, seed)
            row = {"budget": budget, "seed": seed, "removed": r["removed"], "cut": r["cut"],
                   "reconstructed": r["test"]["accuracy"], "reconstructed_val": r["val"]["accuracy"],
                   "reconstruction_seconds": r["reconstruction_seconds"], "recon_run_seconds": r["seconds"]}
            for name, g in (("kd", best_kd), ("lora", best_lora)):
                if g is None or (name == "lora" and not lora_on_test):
                    continue
                lm, secs, _, _ = train(r["lm"], base, data, g["config"], seed)
                te, va = cls_score(lm, data, "test"), cls_score(lm, data, "val")
                row[name] = te["accuracy"]
                row[f"{name}_val"] = va["accuracy"]
                row[f"{name}_seconds"] = secs
                row[f"{name}_vs_recon"] = mcnemar(te["pred"], r["test"]["pred"], y_test)
                del lm
            row["trained"], row["val"] = row["kd"], row["kd_val"]  # the schema of earlier runs: "trained" is KD
            rows.append(row)
            log(f"  test {budget:.0%} seed {seed}: recon {row['reconstructed']:.4f} kd {row['kd']:.4f}"
                + (f" lora {row['lora']:.4f}" if "lora" in row else ""))
            if budget != p.choose_budget:
                cache.pop((budget, seed))  # keep memory bounded
    out = {"model": p.model, "task": "classification", "n_val": len(y_val), "dense_val": dense_val["accuracy"],
           "dense_test": dense_test["accuracy"], "recon_val": recon_val, "recon_val_nll": r0["val"]["nll"],
           "grid": grid, "lora_grid": lora_grid, "chosen_kd": best_kd["config"],
           "chosen_lora": best_lora["config"] if best_lora else None, "default": default, "rows": rows}
    if check:
        out["check"] = pipeline_check(base, data, p, best_kd["config"], dense,
                                      next(x for x in rows if x["budget"] == p.choose_budget and x["seed"] == p.seeds[0]))
    return out


def pipeline_check(base, data, p: Preset, cfg: dict, dense: dict, row: dict) -> dict:
    """The chosen KD recipe end to end through PruningRun ("reconstruct+kd"): its test accuracy
    should equal the shared-cut figure of the same budget and seed."""
    from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
    from explorer.pruning import PruningRun
    lm = fresh(base)
    seed = p.seeds[0]
    run = PruningRun(lm, data, AnalysisConfig(samples=p.samples, batch_size=p.batch_size, metric="taylor", seed=seed),
                     AllocationConfig(target=p.choose_budget, amplitude=p.amplitude, normalization=p.normalization),
                     PruneConfig(stages=1, seed=seed, speed_repeats=0, eval_phases=False,
                                 **{k: v for k, v in cfg.items() if k in KEYS}), timing=False, dense_eval=dense)
    t0 = time.perf_counter()
    rep = run.run()
    acc = rep["stages"][0]["quality"]["accuracy"]
    log(f"check: PruningRun {label(cfg)} test {acc:.4f} vs shared cut {row['kd']:.4f}")
    return {"pruning_run": acc, "shared_cut": row["kd"], "equal": abs(acc - row["kd"]) < 1e-9,
            "seconds": time.perf_counter() - t0}


# --- causal LMs --------------------------------------------------------------------------------

def causal_lm(p: Preset) -> dict:
    """Seed 0: every setting trained from the reconstructed model and scored on val; the trained models
    are kept so that only the chosen one is evaluated on test. Later seeds: the chosen setting only."""
    base, data = load(p.model)
    other = other_corpus(p.model)
    t0 = time.perf_counter()
    dense_val = lm_score(base, data, "val", p, None)
    dense_test = lm_score(base, data, "test", p, other)  # measured here: a figure copied from another
    # document (recon.json) would carry that run's commit, not this one's
    log(f"{p.model} dense val {dense_val}, test {dense_test} ({time.perf_counter() - t0:.0f} s)")
    budget, settings, rows, chosen = p.choose_budget, [], [], None
    for seed in p.seeds:
        lm, rep, secs = reconstructed(base, data, p, budget, seed, {"perplexity": dense_val["perplexity"]})
        st = rep["stages"][0]
        row = {"budget": budget, "seed": seed, "removed": st["removed_fraction"], "recon_run_seconds": secs,
               "reconstruction_seconds": st["reconstruction"]["seconds"], "cut_val": st["phases"]["cut"]["perplexity"],
               "recon_val": st["quality"]["perplexity"]}
        log(f"  seed {seed}: cut val {row['cut_val']:.2f} -> recon val {row['recon_val']:.2f} (run {secs:.0f} s)")
        models = []
        for cfg in (p.lm_settings if chosen is None else [chosen]):
            cfg = full_cfg(cfg)
            trained, tsecs, steps, losses = train(lm, base, data, cfg, seed, p.time_cap_s)
            v = lm_score(trained, data, "val", p, None)["perplexity"]
            r = {"config": cfg, "seed": seed, "val": v, "train_seconds": tsecs, "steps_done": steps,
                 "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
            log(f"  [seed {seed}] {label(cfg)}: {steps} steps in {tsecs:.0f} s, val ppl {v:.2f}")
            models.append((r, trained))
        if chosen is None:
            settings = [r for r, _ in models]
            chosen = min(settings, key=lambda s: s["val"])["config"]
        r, trained = next((r, m) for r, m in models if r["config"] == chosen)
        models.clear()
        t1 = time.perf_counter()
        r["test"] = lm_score(trained, data, "test", p, other)
        r["test_seconds"] = time.perf_counter() - t1
        row["kd"] = r
        del trained
        log(f"  seed {seed}: kd test {r['test']} ({r['steps_done']} steps, {r['train_seconds']:.0f} s)")
        t1 = time.perf_counter()
        row["recon_test"] = lm_score(lm, data, "test", p, other)  # after the training runs: they copy `lm`
        row["recon_test_seconds"] = time.perf_counter() - t1
        log(f"  seed {seed}: recon test {row['recon_test']} ({row['recon_test_seconds']:.0f} s)")
        rows.append(row)
        del lm
    return {"model": p.model, "task": "causal-lm", "dense_val": dense_val["perplexity"], "dense_test": dense_test,
            "settings": settings, "chosen_kd": chosen, "time_cap_s": p.time_cap_s, "rows": rows}


# --- main --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.recipe")
    ap.add_argument("--mode", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--models", nargs="*", help="only these models of the preset")
    ap.add_argument("--merge", action="store_true", help="keep the other models' results in recipe.json")
    ap.add_argument("--check", action="store_true", help="also run the chosen KD recipe through PruningRun")
    ap.add_argument("--lm-settings", help="causal LMs: a JSON list of overrides of the preset's distillation "
                    "setting (replacing its list), e.g. '[{\"lr\": 1e-4, \"recovery_steps\": 40}]'")
    ap.add_argument("--time-cap", type=float, help="causal LMs: wall-time cap per training, seconds")
    ap.add_argument("--add-round", action="store_true", help="with --merge, causal LMs: add this run's settings "
                    "to the earlier run's (same cut) and choose over both on val")
    ap.add_argument("--teacher-fit", action="store_true", help="classifiers: only score the dense model (the "
                    "distillation teacher) on train / val / test and add it to recipe.json (with --merge: the "
                    "other results kept); seconds, not a rerun")
    ap.add_argument("--render-only", action="store_true", help="re-render RECIPE.md from recipe.json, run nothing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.render_only:
        (out / "RECIPE.md").write_text(render(json.loads((out / "recipe.json").read_text())))
        log(f"wrote {out / 'RECIPE.md'} from {out / 'recipe.json'}")
        return 0
    torch.set_num_threads(args.threads)
    presets = [p for p in PRESETS[args.mode] if not args.models or p.model in args.models]
    keep = args.merge or args.teacher_fit  # --teacher-fit annotates the results already there
    old = json.loads((out / "recipe.json").read_text()) if keep and (out / "recipe.json").exists() else {}
    results = {r["model"]: r for r in old.get("results", [])}
    runs = old.get("runs", [])
    if args.teacher_fit:
        for p in presets:
            if p.lm_settings or p.model not in results:
                continue  # a causal LM, or a classifier without its recipe results to annotate
            t0 = time.perf_counter()
            results[p.model]["teacher_fit"] = teacher_fit(p)
            results[p.model]["teacher_fit_meta"] = {
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": time.perf_counter() - t0,
                "machine": machine(), **{k: v for k, v in common.state_at_start().items() if k in ("commit", "dirty")}}
            log(f"{p.model} teacher fit: {results[p.model]['teacher_fit']}")
        write(out, results, runs, [old] if old else [])
        return 0
    for p in presets:
        meta = {"mode": args.mode, "model": p.model, "machine": machine(), "load_before": common.load_average(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                **{k: v for k, v in common.state_at_start().items() if k in ("commit", "dirty")}}  # per model: --merge
        if p.lm_settings and args.lm_settings:
            p = dataclasses.replace(p, lm_settings=[{**SMOL_KD, **o} for o in json.loads(args.lm_settings)])
        if p.lm_settings and args.time_cap:
            p = dataclasses.replace(p, time_cap_s=args.time_cap)
        t0 = time.perf_counter()
        res = classifier(p, args.check or args.mode == "smoke") if not p.lm_settings else causal_lm(p)
        meta.update(seconds=time.perf_counter() - t0, load_after=common.load_average())
        res["meta"], res["preset"] = meta, {k: v for k, v in p.__dict__.items()}
        if args.add_round and p.lm_settings and p.model in results:
            prev = results[p.model]
            res = combine_rounds(prev.get("rounds", [prev]) + [res])
        results[p.model] = res
        runs.append(meta)
        write(out, results, runs, [old] if old else [])
    return 0


def combine_rounds(rounds: list[dict]) -> dict:
    """Causal LMs: several runs on the same cut (same seed and settings of the reconstruction), their
    distillation settings chosen over together on val; the test rows are those of the run holding
    the chosen setting (each run evaluated its own choice on test)."""
    rounds = [{k: v for k, v in r.items() if k != "rounds"} for r in rounds]
    settings = [{**st, "round": i + 1} for i, r in enumerate(rounds) for st in r["settings"]]
    best = min(settings, key=lambda st: st["val"])
    home = rounds[best["round"] - 1]
    return {**home, "settings": settings, "chosen_kd": best["config"], "round_of_choice": best["round"],
            "rounds": rounds}


def write(out: Path, results: dict, runs: list, earlier=()) -> None:
    """recipe.json (with its provenance; `earlier`: the document whose other models it keeps) and RECIPE.md."""
    out.mkdir(parents=True, exist_ok=True)
    first = next((r for r in results.values() if r["task"] == "classification"), None)
    doc = {"runs": runs, "results": list(results.values())}
    if first:  # the schema of earlier runs, for the first classifier: its KD grid, recipe and rows
        c = first["chosen_kd"]
        doc.update(model=first["model"], dense_test=first["dense_test"], grid=first["grid"], rows=first["rows"],
                   recipe={"steps": c["recovery_steps"], "lr": c["lr"], "kd_hidden_weight": c["kd_hidden_weight"]})
    strip = json.loads(json.dumps(doc, default=str))
    for r in strip["results"]:  # per-example predictions are not kept
        r.pop("pred", None)
    doc["provenance"] = write_json(out / "recipe.json", strip, earlier)
    (out / "RECIPE.md").write_text(render(doc))
    log(f"wrote {out / 'RECIPE.md'}")


def ms(vals: list[float], fmt: str = ".4f") -> str:
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):{fmt}} ± {s:{fmt}}"


def paired(a: list[float], b: list[float], fmt: str = "+.4f") -> str:
    d = [x - y for x, y in zip(a, b)]
    m, s = statistics.mean(d), (statistics.stdev(d) if len(d) > 1 else float("nan"))
    txt = f"{m:{fmt}} ± {s:{fmt[1:]}}"
    return f"**{txt}**" if len(d) > 1 and abs(m) > s else txt


# --- notes: prose whose every figure is read from recipe.json -----------------------------------

TEACHER_FIT_TRAIN = 500  # random train sentences the teacher is scored on (`--teacher-fit`)


def teacher_fit(p: Preset) -> dict:
    """How closely the dense classifier (the distillation teacher) fits the sentences recovery trains
    on: accuracy and mean NLL on TEACHER_FIT_TRAIN random train sentences (seed 0), on val and on test."""
    import random
    base, data = load(p.model)
    idx = sorted(random.Random(0).sample(range(len(data.texts["train"])),
                                         min(TEACHER_FIT_TRAIN, len(data.texts["train"]))))
    texts, labels = [data.texts["train"][i] for i in idx], [data.labels["train"][i] for i in idx]
    out = {}
    for split, (xs, ys) in {"train": (texts, labels), "val": (data.texts["val"], data.labels["val"]),
                            "test": (data.texts["test"], data.labels["test"])}.items():
        with torch.inference_mode():
            pred, nll = predictions(base, xs, ys)
        out[split] = {"accuracy": sum(a == y for a, y in zip(pred, ys)) / len(ys), "nll": nll, "n": len(ys)}
    out["train"]["seed"] = 0
    return out


def _lr(x: float) -> str:
    """A learning rate as written in the text: 3e-5, 1e-4, 2.5e-5."""
    return f"{x:.1e}".replace(".0e", "e").replace("e-0", "e-")


def _kd(g: dict) -> bool:
    return g["config"]["recovery"].endswith("kd")


def _same_but_steps(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "recovery_steps"} == {k: v for k, v in b.items() if k != "recovery_steps"}


def classifier_notes(res: dict) -> list[str]:
    """Why distillation does not beat reconstruction alone on this classifier, each figure and each
    comparison computed from `res` (one classifier's entry of recipe.json)."""
    n_val, recon_acc, recon_nll = res["n_val"], res["recon_val"], res["recon_val_nll"]
    kd = [g for g in res["grid"] if _kd(g)]
    fit = res.get("teacher_fit")
    if fit:
        tr, va, te = fit["train"], fit["val"], fit["test"]
        teacher = (f"Measured by `python -m bench.recipe --teacher-fit` ({tr['n']} random train sentences, seed "
                   f"{tr['seed']}): the teacher scores {tr['accuracy']:.3f} accuracy / NLL {tr['nll']:.3f} on train "
                   f"against {va['accuracy']:.3f} / {va['nll']:.3f} on val ({te['accuracy']:.3f} / {te['nll']:.3f} "
                   "on test). ")
    else:
        teacher = ("(How closely the teacher fits the train split is not in this recipe.json: "
                   "`python -m bench.recipe --teacher-fit --merge` measures it.) ")
    higher = [g for g in kd if g["val_nll"] > recon_nll]
    nll_claim = ("every distillation setting ends" if len(higher) == len(kd) else
                 f"{len(higher)} of the {len(kd)} distillation settings end")
    stage1 = sorted((g for g in kd if g["stage"].startswith("1")), key=lambda g: g["config"]["lr"])
    nlls = [g["val_nll"] for g in stage1]
    trend = "rising with" if all(x < y for x, y in zip(nlls, nlls[1:])) else "against"
    by_lr = ", ".join(f"{_lr(g['config']['lr'])}: {g['val_nll']:.3f}" for g in stage1)
    better = [g for g in kd if g["val"] > recon_acc]
    acc_claim = ("val accuracy never exceeds reconstruction alone" if not better else
                 f"val accuracy exceeds reconstruction alone in {len(better)} of them")
    L = ["Why distillation does not beat reconstruction alone here: the dense teacher is MiniLM + a LoRA adapter "
         "fine-tuned for 3 epochs on the **same train split** that recovery trains on. " + teacher +
         "On the recovery data the teacher's outputs are its fit to those very sentences, so distilling them (and "
         "the task loss on the same labels) teaches the student the teacher's train-set confidence, not what "
         f"generalises: {nll_claim} with a higher val NLL than reconstruction alone ({recon_nll:.3f}), {trend} the "
         f"learning rate ({by_lr}), and {acc_claim}."]
    longer = sorted((g for g in kd if g["stage"].startswith("3")), key=lambda g: g["config"]["recovery_steps"])
    shorter = next((g for g in kd if longer and not g["stage"].startswith("3")
                    and _same_but_steps(g["config"], longer[0]["config"])), None)
    if longer and shorter:
        last = longer[-1]
        nll_move = "lower" if last["val_nll"] < shorter["val_nll"] else "raise"
        acc_move = "lose" if last["val"] < shorter["val"] else "keep" if last["val"] == shorter["val"] else "gain"
        L[-1] += (f" More steps of the best setting so far {nll_move} the NLL ({shorter['config']['recovery_steps']} steps: "
                  f"{shorter['val_nll']:.3f}; " + ", ".join(f"{g['config']['recovery_steps']}: {g['val_nll']:.3f}"
                                                            for g in longer)
                  + f") and {acc_move} accuracy ({last['config']['recovery_steps']} steps: "
                    f"{last['vs_recon']['fixed']} fixed, {last['vs_recon']['broken']} broken).")
    stage2 = [g for g in kd if g["stage"].startswith("2")]
    best1 = max(stage1, key=lambda g: (g["val"], -g["val_nll"])) if stage1 else None
    if stage2 and best1:
        moved = max(round(abs(g["val"] - best1["val"]) * n_val) for g in stage2)
        L[-1] += (" Temperature, kd_alpha 1 (no task loss), the hidden-state losses (cosine or mse) and a larger "
                  f"batch move val by at most {moved} example{'s' if moved != 1 else ''} of {n_val}.")
    keep = {b: statistics.mean(x["reconstructed"] for x in res["rows"] if x["budget"] == b) / res["dense_test"]
            for b in sorted({x["budget"] for x in res["rows"]})}
    room = round((res["dense_val"] - recon_acc) * n_val)
    L[-1] += (" Reconstruction already keeps " + " / ".join(f"{v:.1%}" for v in keep.values()) + " of dense test "
              "accuracy at " + " / ".join(f"{b:.0%}" for b in keep) + f", so the room left on val ({room} example"
              f"{'s' if room != 1 else ''} of {n_val} at {res['preset']['choose_budget']:.0%}) is below what "
              f"{n_val} val examples can resolve.")
    worst = max(stage1, key=lambda g: g["config"]["lr"]) if stage1 else None
    if worst:
        v = worst["vs_recon"]
        L[-1] += (f" The highest learning rate, {_lr(worst['config']['lr'])} (the earlier default), is the harmful part "
                  f"({v['fixed']} val examples fixed, {v['broken']} broken).")
    c = res["chosen_kd"]
    spread = []
    for b in keep:
        rs = [x for x in res["rows"] if x["budget"] == b]
        d = [x["kd"] - x["reconstructed"] for x in rs]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        spread.append(len(d) > 1 and abs(statistics.mean(d)) <= sd)
    where = ("within the seed spread at " + ("both budgets" if len(spread) == 2 else "every budget") if all(spread)
             else "beyond the seed spread at " + ", ".join(f"{b:.0%}" for b, s in zip(keep, spread) if not s))
    L[-1] += f" At the chosen `{label(c)}` the paired test difference is {where}."
    lora = res.get("lora_grid") or []
    if lora:
        best = max(lora, key=lambda g: (g["val"], -g["val_nll"]))
        longest = max(lora, key=lambda g: g["config"]["recovery_steps"])
        verdict = "no better" if best["val"] <= recon_acc else "better"
        L[-1] += (f" LoRA (the adapter on top of the merged weights) is {verdict} on val (best {best['val']:.3f} "
                  f"against {recon_acc:.3f}; {longest['config']['recovery_steps']} steps at lr "
                  f"{_lr(longest['config']['lr'])} end at NLL {longest['val_nll']:.3f}, reconstruction alone "
                  f"{recon_nll:.3f}).")
    return L


def render(doc: dict) -> str:
    lines = ["# Default recovery recipes (`python -m bench.recipe`)", ""]
    for res in doc["results"]:
        p = res["preset"]
        lines += [f"## {res['model']}", ""]
        for i, r in enumerate(res.get("rounds", [res])):
            m = r["meta"]
            tag = f"Round {i + 1} ({len(r['settings'])} setting(s)): g" if "rounds" in res else "G"
            lines += [f"{tag}enerated {m['date']} by `python -m bench.recipe --mode {m['mode']} --models "
                      f"{res['model']}` in {m['seconds'] / 60:.1f} min on {m['machine'].get('cpu', '?')}, "
                      f"{m['machine'].get('cores', '?')} cores, {m['machine'].get('torch_threads', '?')} torch "
                      f"thread(s) (other jobs shared the machine), load average before/after {m['load_before']} / "
                      f"{m['load_after']}."
                      + (f" Commit `{m['commit'][:12]}`" + (" with uncommitted changes" if m.get("dirty") else "") + "."
                         if m.get("commit") else ""), ""]
        lines += render_classifier(res, p) if res["task"] == "classification" else render_lm(res, p)
        if res["task"] == "classification" and res.get("grid"):
            lines += [""] + classifier_notes(res)
        lines.append("")
    return "\n".join(lines) + "\n"


def render_classifier(res: dict, p: dict) -> list[str]:
    L = [f"One stage, adaptive A = {p['amplitude']} ({p['normalization']}), taylor salience, {p['samples']} "
         f"calibration samples, reconstruction, then the training below from a copy of the reconstructed model. "
         f"Search on **val** ({res['n_val']} examples) at {p['choose_budget']:.0%}, "
         f"seed {p['seeds'][0]}: dense val {res['dense_val']:.4f}, reconstruction alone {res['recon_val']:.4f} "
         f"(NLL {res['recon_val_nll']:.4f}). *fixed / broken*: val examples the configuration gets right where "
         f"reconstruction alone is wrong, and the reverse (McNemar z = (f - b) / sqrt(f + b)).", "",
         "| stage | recovery | steps | lr | batch | alpha | T | hidden | val acc | val NLL | fixed / broken | z | "
         "train s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in res["grid"] + res["lora_grid"]:
        c, v = g["config"], g["vs_recon"]
        kd = c["recovery"].endswith("kd")
        hid = (f"{c['kd_hidden_weight']:g} {c['kd_hidden_loss']}" if c["kd_hidden_weight"] else "0") if kd else "–"
        L.append(f"| {g['stage']} | {c['recovery']} | {c['recovery_steps']} | {c['lr']:g} | {c['train_batch_size']} | "
                 f"{c['kd_alpha'] if kd else '–'} | {c['kd_temperature'] if kd else '–'} | {hid} | {g['val']:.4f} | "
                 f"{g['val_nll']:.4f} | {v['fixed']} / {v['broken']} | {v['z']:+.2f} | {g['seconds']:.0f} |")
    L += ["", f"Chosen on val: distillation `{label(res['chosen_kd'])}`; LoRA "
          f"`{label(res['chosen_lora']) if res['chosen_lora'] else '-'}`. **Default recipe: `{label(res['default'])}`** "
          "(the best of the two if it beats reconstruction alone on val, else reconstruction alone). LoRA runs on "
          "test only where it beats reconstruction alone on val.", "",
          f"Test accuracy (dense {res['dense_test']:.4f}, 1,000 examples), mean ± std over seeds {p['seeds']}; "
          "*Δ*: paired difference against reconstruction alone on the same seed (same cut), mean ± std over seeds, "
          "**bold** where |mean| exceeds the std:", "",
          "| budget | removed | after cut | reconstruction alone | + distillation | Δ distillation | + LoRA | Δ LoRA | "
          "train s (KD / LoRA) |", "|---|---|---|---|---|---|---|---|---|"]
    for b in p["budgets"]:
        rs = [x for x in res["rows"] if x["budget"] == b]
        rec = [x["reconstructed"] for x in rs]
        kd = [x["kd"] for x in rs]
        lo = [x["lora"] for x in rs if "lora" in x]
        L.append(f"| {b:.0%} | {statistics.mean(x['removed'] for x in rs):.1%} | {ms([x['cut'] for x in rs])} | "
                 f"{ms(rec)} | {ms(kd)} | {paired(kd, rec)} | {ms(lo) if lo else '–'} | "
                 f"{paired(lo, rec) if lo else '–'} | {statistics.mean(x['kd_seconds'] for x in rs):.0f} / "
                 f"{statistics.mean(x['lora_seconds'] for x in rs) if lo else '–'} |")
    L += ["", "Per seed (test; fixed / broken vs reconstruction alone):", "",
          "| budget | seed | cut | reconstruction | after distillation | fixed / broken | + LoRA | fixed / broken |",
          "|---|---|---|---|---|---|---|---|"]
    for x in res["rows"]:
        k, lo = x["kd_vs_recon"], x.get("lora_vs_recon")
        L.append(f"| {x['budget']:.0%} | {x['seed']} | {x['cut']:.4f} | {x['reconstructed']:.4f} | {x['kd']:.4f} | "
                 f"{k['fixed']} / {k['broken']} | {format(x['lora'], '.4f') if 'lora' in x else '–'} | "
                 f"{(str(lo['fixed']) + ' / ' + str(lo['broken'])) if lo else '–'} |")
    if res.get("check"):
        c = res["check"]
        L += ["", f"Pipeline check: the chosen distillation recipe through `PruningRun` (\"reconstruct+kd\" end to end) "
              f"gives test {c['pruning_run']:.4f}, the shared-cut figure {c['shared_cut']:.4f} "
              f"({'equal' if c['equal'] else 'NOT equal'}), {c['seconds']:.0f} s."]
    return L


def render_lm(res: dict, p: dict) -> list[str]:
    d = res["dense_test"]
    L = [f"One stage at {p['choose_budget']:.0%}, adaptive A = {p['amplitude']} ({p['normalization']}), taylor salience, "
         f"{p['samples']} calibration samples, reconstruction, then distillation from a copy of the reconstructed "
         f"model, each training stopped after the step that crosses {p['time_cap_s']:.0f} s (on ONE torch thread of "
         "a shared machine: see the load averages; the 10-minute goal is stated for 2 cores). Round 2, where "
         "present, is `--merge --add-round` with its own `--lm-settings` / `--time-cap` (see the module "
         "docstring of bench/recipe.py). Settings scored by "
         f"**val** perplexity ({p['val_n']:,} tokens), seed {p['seeds'][0]}: dense val {res['dense_val']:.2f}, "
         f"reconstruction alone {res['rows'][0]['recon_val']:.2f}.", "",
         "| round | lr | batch | alpha | T | hidden | steps done | train s | first / last loss | val ppl |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for s in res["settings"]:
        c = s["config"]
        hid = f"{c['kd_hidden_weight']:g} {c['kd_hidden_loss']}" if c["kd_hidden_weight"] else "0"
        L.append(f"| {s.get('round', 1)} | {c['lr']:g} | {c['train_batch_size']} | {c['kd_alpha']} | "
                 f"{c['kd_temperature']} | {hid} | "
                 f"{s['steps_done']} / {c['recovery_steps']} | {s['train_seconds']:.0f} | "
                 f"{s['first_loss']:.3f} / {s['last_loss']:.3f} | {s['val']:.2f} |")
    L += ["", f"Chosen: `{label(res['chosen_kd'])}`. Test (BBC {p['test_n']:,} tokens, IMDB {p['other_n']:,} tokens; "
          f"dense {d['perplexity']:.2f} / {d.get('perplexity_imdb', float('nan')):.2f}); goal: BBC ≤ 1.15x dense = "
          f"{1.15 * d['perplexity']:.2f}:", "",
          "| seed | removed | reconstruction alone (BBC / IMDB) | + distillation (BBC / IMDB) | x dense (BBC) | "
          "KD steps | KD train s | reconstruct run s |", "|---|---|---|---|---|---|---|---|"]
    for x in res["rows"]:
        r, k = x["recon_test"], x["kd"]["test"]
        L.append(f"| {x['seed']} | {x['removed']:.1%} | {r['perplexity']:.2f} / {r.get('perplexity_imdb', float('nan')):.2f} "
                 f"| {k['perplexity']:.2f} / {k.get('perplexity_imdb', float('nan')):.2f} | "
                 f"{k['perplexity'] / d['perplexity']:.3f}x | {x['kd']['steps_done']} | {x['kd']['train_seconds']:.0f} | "
                 f"{x['recon_run_seconds']:.0f} |")
    if len(res.get("rounds", [])) > 1:
        L += ["", "Reconstruction alone on test per round (the same cut, so the same figure if it is reproducible): "
              + ", ".join(f"round {i + 1}: {r['rows'][0]['recon_test']['perplexity']:.4f}"
                          for i, r in enumerate(res["rounds"]))
              + ". Each round evaluated its own val choice on test; the table shows the round of the overall "
              f"val choice (round {res['round_of_choice']})."]
        for i, r in enumerate(res["rounds"]):
            if i + 1 != res["round_of_choice"]:
                k = r["rows"][0]["kd"]
                L.append(f"Round {i + 1}'s choice `{label(k['config'])}` on test (not chosen): BBC "
                         f"{k['test']['perplexity']:.2f}, IMDB {k['test'].get('perplexity_imdb', float('nan')):.2f}.")
    if len(res["rows"]) > 1:
        rec = [x["recon_test"]["perplexity"] for x in res["rows"]]
        kd = [x["kd"]["test"]["perplexity"] for x in res["rows"]]
        L += ["", f"BBC test over seeds: reconstruction {ms(rec, '.2f')}, + distillation {ms(kd, '.2f')}, paired "
              f"difference {paired(kd, rec, '+.2f')}."]
    return L


if __name__ == "__main__":
    raise SystemExit(main())
