"""`python -m bench.bigmodel [--smoke] [--layers N] [--hidden H] ... [--out bench/]`: memory and time
of a ~1 B-parameter LLaMA (TinyLlama-1.1B's shape, random weights, built directly in bfloat16) on
the CPU, each mode in its own subprocess so that its peak RSS is its own:

  streamed  layer-streamed analysis (explorer.stream: forward only, block by block on cached
            calibration activations; fluctuation salience) + allocation at the target + one stage
            of physical pruning with reconstruction (explorer.reconstruct, layer-sequential)
  whole     whole-model analysis (importance.analyze with every metric, as PruningRun runs it:
            one forward + backward per batch; taylor salience) + the same pruning + reconstruction
  defaults  the streamed mode with the library's default
            reconstruction (structured-OBS unit choice and λ searched on held-out samples) on
            --probe-layers layers, extrapolated to the full depth

The streamed and whole modes reconstruct with a fixed λ and the metric's units (--recon-lambda,
--recon-select): the defaults' λ search and OBS cost several times the fixed λ's time per block on
the 5632-wide down_proj (the report's `defaults` row against the streamed one), which would put one
mode alone past half an hour; their memory is measured by the `defaults` probe and given by the formula.

For each: peak RSS (VmHWM; reset between phases through /proc/self/clear_refs so that the
build, the analysis and the reconstruction each get their own peak), the bfloat16 weight size,
their ratio, seconds in total and per block. The estimate of explorer.stream.memory_estimate
stands next to each measurement, and a table gives the estimate for the 1 B / 8 B / 70 B LLaMA
shapes. Writes bigmodel.json and BIGMODEL.md in --out.

The pipeline is the library's (analyze -> allocate -> reconstruct), not PruningRun: a run also
keeps a copy of the last completed stage for Stop / errors (+1x the weights), which the report
states but does not measure.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common  # noqa: F401  (offline environment first)
from .common import generated_line, load_average, log, machine, write_json

ONE_B = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)  # TinyLlama-1.1B
SMOKE = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)
MODES = ("streamed", "whole", "defaults")
GOAL_RATIO = 2.5  # the bound for the streamed mode: peak RSS <= 2.5x the bf16 weights
RUNTIME = 0.4 * 2**30  # the Python / torch runtime's RSS, which the estimates leave out


# --- measurement helpers (in the child) --------------------------------------------------------

def _status_kb(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss() -> int:
    """VmHWM in bytes (the resident-set high-water mark), or ru_maxrss where /proc is missing."""
    kb = _status_kb("VmHWM")
    if not kb:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


def rss() -> int:
    return _status_kb("VmRSS") * 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def llama_config(shape: dict, seq_len: int):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(2048, seq_len),
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       architectures=["LlamaForCausalLM"])


def word_tokenizer(vocab: int):
    """A word-level tokenizer over w3 .. w{vocab-1} (built in memory: no download, no BOS token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tk = Tokenizer(models.WordLevel(words, unk_token="[PAD]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[PAD]", eos_token="[EOS]")


def calibration(vocab: int, samples: int, seq_len: int, seed: int = 0) -> list[str]:
    """`samples` texts of exactly `seq_len` random words (= tokens)."""
    import random
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(3, vocab)}" for _ in range(seq_len)) for _ in range(samples)]


def build(shape: dict, seq_len: int):
    """The random LLaMA in bfloat16, built in that dtype (transformers sets the default dtype while it
    initialises), so no float32 copy ever exists (the build's peak RSS in the report shows it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from explorer.adapters import adapter_for
    from explorer.models import LoadedModel
    torch.manual_seed(0)
    cfg = llama_config(shape, seq_len)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    return LoadedModel(model, word_tokenizer(shape["vocab"]), "causal-lm", "random-llama", adapter_for("llama"),
                       torch.device("cpu"), max_length=seq_len)


def settings(mode: str, a) -> dict:
    """What a mode runs: its analysis and its reconstruction settings."""
    if mode == "defaults":
        return {"analysis": "streamed", "select": "obs", "lam": 0.0}
    return {"analysis": "whole" if mode == "whole" else "streamed", "select": a.recon_select, "lam": a.recon_lambda}


def child(mode: str, shape: dict, a) -> dict:
    """One mode, start to end, in this process; returns its measurements."""
    import torch

    from explorer.allocation import allocate
    from explorer.config import AllocationConfig, AnalysisConfig
    from explorer.importance import analyze
    from explorer.pruning import plan_keeps
    from explorer.reconstruct import reconstruct
    if a.threads:
        torch.set_num_threads(a.threads)
    st = settings(mode, a)
    res: dict = {"mode": mode, **st, "shape": shape, "samples": a.samples, "seq_len": a.seq_len,
                 "batch_size": a.batch_size, "target": a.target, "torch_threads": torch.get_num_threads(),
                 "rss_start": rss(), "phase_peaks_measured": reset_peak()}
    t0 = time.perf_counter()
    lm = build(shape, a.seq_len)
    res["build_seconds"] = time.perf_counter() - t0
    res["params"] = lm.n_params
    res["weight_bytes"] = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    res["peak_build"] = peak_rss()
    res["rss_after_build"] = rss()
    log(f"[{mode}] built {lm.n_params / 1e9:.3f} B params in bf16 ({res['weight_bytes'] / 2**30:.2f} GiB) in "
        f"{res['build_seconds']:.1f} s; peak RSS so far {res['peak_build'] / 2**30:.2f} GiB")
    texts = calibration(shape["vocab"], a.samples, a.seq_len)
    n_layers = shape["layers"]

    # analysis
    reset_peak()
    marks: list[float] = []
    t1 = time.perf_counter()
    streamed = st["analysis"] == "streamed"
    cfg = AnalysisConfig(samples=a.samples, batch_size=a.batch_size, metric="fluctuation" if streamed else "taylor",
                         max_length=a.seq_len, streamed=streamed)
    imp = analyze(lm, texts, None, cfg, progress=lambda i, n: marks.append(time.perf_counter()))
    res["analysis_seconds"] = time.perf_counter() - t1
    res["analysis_per_block"] = res["analysis_seconds"] / n_layers
    res["analysis_block_seconds"] = [round(y - x, 3) for x, y in zip([t1] + marks[:-1], marks)] if streamed else []
    res["peak_analysis"] = peak_rss()
    res["tokens"], res["metric"], res["metrics"] = imp.tokens, imp.metric, sorted(imp.heads)
    log(f"[{mode}] analysis ({imp.metric}, {imp.tokens} tokens) {res['analysis_seconds']:.1f} s "
        f"({res['analysis_per_block']:.2f} s / block); peak RSS {res['peak_analysis'] / 2**30:.2f} GiB")

    # allocation, then the cut with reconstruction
    t2 = time.perf_counter()
    alloc = allocate(imp.normalized_by("maxabs"), imp.params, AllocationConfig(target=a.target),
                     scores=imp.unit_scores())
    keeps = plan_keeps(imp, alloc)
    before = lm.block_params
    del imp
    res["rss_before_recon"] = rss()
    reset_peak()
    rmarks: list[float] = []
    t3 = time.perf_counter()
    rep = reconstruct(lm, keeps, texts, lam=st["lam"], select="obs" if st["select"] == "obs" else "given",
                      batch_size=a.batch_size, max_length=a.seq_len,
                      progress=lambda i, n: rmarks.append(time.perf_counter()))
    res["allocation_seconds"] = t3 - t2
    res["recon_seconds"] = time.perf_counter() - t3
    res["recon_per_block"] = res["recon_seconds"] / n_layers
    res["recon_block_seconds"] = [round(y - x, 3) for x, y in zip([t3] + rmarks[:-1], rmarks)]
    res["peak_recon"] = peak_rss()
    res["removed_fraction"] = 1 - lm.block_params / before
    res["recon_error_ratio"] = rep.error_ratio
    res["lambdas"] = sorted({str(r["lambda"]) for layer in rep.layers for r in layer})
    res["widths"] = [[b.attn.n_units, b.mlp.n_units] for b in lm.adapter.blocks(lm.model)]
    res["seconds"] = res["analysis_seconds"] + res["allocation_seconds"] + res["recon_seconds"]
    res["per_block"] = res["seconds"] / n_layers
    res["peak_rss"] = max(res["peak_build"], res["peak_analysis"], res["peak_recon"])
    res["ratio"] = res["peak_rss"] / res["weight_bytes"]
    log(f"[{mode}] pruned {res['removed_fraction']:.1%} of the block parameters, reconstruction "
        f"{res['recon_seconds']:.1f} s ({res['recon_per_block']:.2f} s / block, error ratio {rep.error_ratio:.3f}); "
        f"peak RSS {res['peak_recon'] / 2**30:.2f} GiB")
    log(f"[{mode}] peak RSS {res['peak_rss'] / 2**30:.2f} GiB = {res['ratio']:.2f}x the bf16 weights; "
        f"{res['seconds']:.1f} s ({res['per_block']:.2f} s / block)")
    return res


# --- the parent: one subprocess per mode, the report ---------------------------------------------

def shape_of(a) -> dict:
    base = SMOKE if a.smoke else ONE_B
    return {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in base.items()}


def _cfg_dict(shape: dict) -> dict:
    return dict(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"], tie_word_embeddings=False)


def estimate(shape: dict, a, mode: str) -> dict:
    """explorer.stream.memory_estimate for `mode`'s analysis and reconstruction settings."""
    from explorer.stream import memory_estimate
    st = settings(mode, a)
    return memory_estimate(_cfg_dict(shape), a.samples * a.seq_len, "bfloat16", st["analysis"],
                           seq_len=a.seq_len, batch_size=a.batch_size, keep=1 - a.target,
                           lam_search=st["lam"] <= 0, obs=st["select"] == "obs")


def run_child(mode: str, shape: dict, a, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        cmd = [sys.executable, "-m", "bench.bigmodel", "--child", mode, "--result", str(out),
               "--samples", str(a.samples), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size),
               "--target", str(a.target), "--recon-select", a.recon_select, "--recon-lambda", str(a.recon_lambda),
               "--threads", str(a.threads)]
        for k, v in shape.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=common.ROOT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"mode": mode, "shape": shape, "error": f"exceeded the time limit of {timeout:.0f} s"}
        if proc.returncode != 0 or not out.exists():
            why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit status {proc.returncode}"
            return {"mode": mode, "shape": shape, "error": why, "wall_seconds": time.perf_counter() - t0}
        res = json.loads(out.read_text())
        res["wall_seconds"] = time.perf_counter() - t0
        return res


def run_shape(mode: str, shape: dict, a) -> tuple[dict, str]:
    """The shape a mode runs at, and why it is not the full one: `defaults` on --probe-layers layers;
    `whole` at the full depth if its estimate fits in --mem-fraction of the memory available now (or
    --whole-layers), else on as many layers as fit (extrapolated in the report)."""
    if mode == "defaults":
        n = min(a.probe_layers, shape["layers"])
        return {**shape, "layers": n}, (
            f"the default reconstruction (λ search, structured OBS) is several times the fixed-λ one per "
            f"block (the row's seconds): --probe-layers {n}" if n < shape["layers"] else "")
    if mode != "whole":
        return shape, ""
    if a.whole_layers:
        n = min(a.whole_layers, shape["layers"])
        why = f"--whole-layers {n}"
    else:
        avail = mem_available()
        budget = a.mem_fraction * avail

        def need(n):
            return estimate({**shape, "layers": n}, a, "whole")["peak"] + RUNTIME + 0.5 * 2**30
        if not avail or need(shape["layers"]) <= budget:
            return shape, ""
        n = shape["layers"]
        while n > 1 and need(n) > budget:
            n -= 1
        why = (f"its estimate ({need(shape['layers']) / 2**30:.1f} GiB with the runtime) exceeds {a.mem_fraction:.0%} "
               f"of the memory available ({avail / 2**30:.1f} GiB)")
    return ({**shape, "layers": n}, why) if n < shape["layers"] else (shape, "")


def extrapolate(res: dict, full: dict, a) -> dict:
    """Scale a run on fewer layers to the full depth: the peak RSS by adding the estimate's growth
    (estimate(full) - estimate(run)), the seconds by the ratio of the layer counts."""
    if "error" in res:
        return res
    from explorer.stream import llama_params
    part = res["shape"]
    e_part, e_full = estimate(part, a, res["mode"]), estimate(full, a, res["mode"])
    weight_bytes = llama_params(_cfg_dict(full))["total"] * 2
    ext = {"layers": full["layers"], "from_layers": part["layers"],
           "peak_rss": res["peak_rss"] + e_full["peak"] - e_part["peak"], "weight_bytes": weight_bytes,
           "seconds": res["seconds"] * full["layers"] / part["layers"], "per_block": res["per_block"],
           "analysis_per_block": res["analysis_per_block"], "recon_per_block": res["recon_per_block"]}
    ext["ratio"] = ext["peak_rss"] / weight_bytes
    return {**res, "extrapolated": ext}


def gib(x) -> str:
    return f"{x / 2**30:.2f}"


def estimate_table(a) -> list[dict]:
    """The README table, with the library's default reconstruction (OBS units, λ searched): each
    LLaMA shape x analysis mode, at the bench's calibration and at a typical one (128 samples x
    2048 tokens, 4 samples a batch)."""
    from explorer.stream import LLAMA_SHAPES, llama_params, memory_estimate
    rows = []
    for name, cfg in LLAMA_SHAPES.items():
        for mode in ("streamed", "whole"):
            small = memory_estimate(cfg, a.samples * a.seq_len, "bfloat16", mode, seq_len=a.seq_len,
                                    batch_size=a.batch_size, keep=1 - a.target)
            big = memory_estimate(cfg, 128 * 2048, "bfloat16", mode, seq_len=2048, batch_size=4, keep=1 - a.target)
            rows.append({"model": name, "params": llama_params(cfg)["total"], "mode": mode,
                         "weights": small["parts"]["weights"], "bench_calibration": small,
                         "typical_calibration": big})
    return rows


def _recon_words(r: dict) -> str:
    units = "structured-OBS units" if r["select"] == "obs" else "the metric's units"
    lam = "λ searched on held-out samples" if r["lam"] <= 0 else f"λ = {r['lam']:g} fixed"
    return f"{units}, {lam}"


def write_report(out: Path, data: dict) -> None:
    meta, a = data["meta"], data["args"]
    shape, rows = data["shape"], data["runs"]
    cmd = "python -m bench.bigmodel" + (" --smoke" if a["smoke"] else "")
    L = [f"# Big models: layer-streamed and whole-model analysis on a {data['params'] / 1e9:.2f} B LLaMA",
         "", generated_line(cmd, meta, data.get("provenance"))
         + (f" Estimates recomputed from bigmodel.json on {meta['rewritten']} (`python -m bench.bigmodel --rewrite`)."
            if meta.get("rewritten") else ""), "",
         f"Model: LLaMA architecture from a config, random weights built directly in bfloat16 (no float32 copy at any "
         f"time: the build's peak is in the table): hidden {shape['hidden']}, {shape['layers']} layers, "
         f"{shape['heads']} query / {shape['kv_heads']} KV heads, FFN {shape['intermediate']}, vocabulary "
         f"{shape['vocab']}{' (TinyLlama-1.1B)' if not a['smoke'] else ' (--smoke)'}: "
         f"{data['params'] / 1e9:.3f} B parameters, {gib(data['weight_bytes'])} GiB of bf16 weights. Calibration: "
         f"{a['samples']} samples x {a['seq_len']} random tokens ({a['samples'] * a['seq_len']} tokens), "
         f"{a['batch_size']} samples a batch, on the CPU ({meta['machine'].get('torch_threads')} torch threads, "
         f"{meta.get('mem_available_gib')} GiB available at the start). Each mode ran in its own subprocess: "
         f"analysis -> allocation (exact, A = 0.05, salience split) at {a['target']:.0%} of the block parameters -> "
         f"one stage of physical pruning with reconstruction (explorer.reconstruct, layer-sequential).", "",
         "| mode | analysis | reconstruction | peak RSS GiB | x bf16 weights | estimate + runtime GiB "
         "| build / analysis / reconstruction peak GiB | seconds | s / block (analysis + reconstruction) | tokens |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        est = r.get("estimate", {})
        est_s = f"{(est['peak'] + RUNTIME) / 2**30:.2f}" if est else ""
        if "error" in r:
            L.append(f"| {r['mode']} | | | {r['error']} | | {est_s} | | | | |")
            continue
        what = ("streamed, fluctuation (forward only)" if r["analysis"] == "streamed"
                else "whole model, every metric (forward + backward), taylor chosen")
        n_run = r["shape"]["layers"]
        layers_note = "" if n_run == shape["layers"] else f" ({n_run} layer{'s' if n_run != 1 else ''})"
        L.append(f"| {r['mode']}{layers_note} | {what} | {_recon_words(r)} | {gib(r['peak_rss'])} | {r['ratio']:.2f} | "
                 f"{est_s} | {gib(r['peak_build'])} / {gib(r['peak_analysis'])} / {gib(r['peak_recon'])} | "
                 f"{r['seconds']:.0f} | {r['per_block']:.2f} ({r['analysis_per_block']:.2f} + "
                 f"{r['recon_per_block']:.2f}) | {r['tokens']} |")
        if "extrapolated" in r:
            x = r["extrapolated"]
            full_est = estimate_full(data, r["mode"])
            L.append(f"| {r['mode']}, **extrapolated** to {x['layers']} layers | from the {x['from_layers']}-layer run: "
                     f"peak + the estimate's growth, time x layers | | {gib(x['peak_rss'])} | {x['ratio']:.2f} | "
                     f"{(full_est + RUNTIME) / 2**30:.2f} | | {x['seconds']:.0f} | {x['per_block']:.2f} | |")
    L.append("")
    for r in rows:
        if "extrapolated" in r:
            L += [f"The {r['mode']} mode ran on {r['shape']['layers']} of {shape['layers']} layers because "
                  f"{r['reduced_because']}; its full-depth figures are extrapolated, not measured.", ""]
    st = next((r for r in rows if r["mode"] == "streamed" and "error" not in r), None)
    wh = next((r for r in rows if r["mode"] == "whole" and "error" not in r), None)
    dft = next((r for r in rows if r["mode"] == "defaults" and "error" not in r), None)
    if st is not None:
        ok = st["ratio"] <= GOAL_RATIO
        L += [f"Streamed mode: peak RSS {gib(st['peak_rss'])} GiB = **{st['ratio']:.2f}x** the bf16 weights "
              f"({'within' if ok else 'above'} the {GOAL_RATIO}x goal), {st['per_block']:.2f} s per block "
              f"({st['analysis_per_block']:.2f} s analysis + {st['recon_per_block']:.2f} s reconstruction), "
              f"{st['removed_fraction']:.1%} of the block parameters removed, calibration error after the refit "
              f"{st['recon_error_ratio']:.3f} of plain removal's."
              + (f" Whole-model mode: analysis peak {gib(wh['peak_analysis'])} GiB against the streamed "
                 f"{gib(st['peak_analysis'])} GiB ({wh['peak_analysis'] / st['peak_analysis']:.1f}x), analysis "
                 f"{wh['analysis_seconds']:.0f} s against {st['analysis_seconds']:.0f} s." if wh else ""), ""]
    L += ["Peak RSS is the process's VmHWM (reset between phases through /proc/self/clear_refs, so each phase has its "
          "own peak), the Python / torch runtime included; the estimates (explorer.stream.memory_estimate, for each "
          f"run's own settings) leave the runtime out, so {RUNTIME / 2**30:.1f} GiB is added to them here. The "
          f"streamed and whole modes reconstruct with {_recon_words(settings('streamed', _ns(a)))}: the library's "
          "defaults (λ searched over 7 values on held-out samples, units re-chosen by structured OBS) spend far longer "
          f"in float64 Cholesky factorisations and products of {shape['intermediate']}-wide Gram matrices ("
          + (f"{dft['recon_per_block']:.0f} s per block in the `defaults` row against {st['recon_per_block']:.0f} s"
             if dft and st else "about 100 s per block for a 5632-wide down_proj on two busy cores, measured while "
             "writing this bench, against about 25 s with the fixed λ")
          + "), which would put one mode past half an hour; their memory is in the `defaults` row where it ran, "
          "and in the formula. Besides the weights the streamed mode holds mainly "
          "reconstruction's float64 statistics of the widest projection (a "
          f"{shape['intermediate']} x {shape['intermediate']} Gram matrix for the fit and one for the held-out "
          "samples, and the λ search's / OBS's work arrays); the whole-model mode's analysis adds each block "
          "parameter's gradient (bf16) and its float32 running sum, and the activations the backward keeps.", ""]
    slack = [(r["mode"], r["peak_rss"] - r["estimate"]["peak"] - RUNTIME) for r in rows
             if "error" not in r and r["estimate"]]
    if slack:
        L.append("Measured minus (estimate + runtime): " + ", ".join(f"{m} {d / 2**30:+.2f} GiB" for m, d in slack)
                 + ". The estimate counts live tensors only; on the CPU glibc keeps freed buffers below its mmap "
                 "threshold (at most 32 MiB: gradients of the smaller projections, activations, the products' "
                 "temporaries) in its heaps instead of returning them, and the peak RSS includes them."
                 + (f" The whole mode shows it most: after its analysis, with every gradient freed, its RSS still "
                    f"stood at {gib(wh['rss_before_recon'])} GiB, {gib(wh['rss_before_recon'] - wh['rss_after_build'])} "
                    f"GiB above the model's after the build (`malloc_trim(0)` returns such memory)."
                    if wh and "rss_before_recon" in wh else ""))
        L.append("")
    L += ["## GPU and big models", "",
          "Two ways to analyse a model (`AnalysisConfig.streamed`):", "",
          "* **whole-model** `analyze()` (the default): one forward + backward per calibration batch over the whole "
          "model; every metric, the gradient ones included (taylor, fisher, act_grad, apt, taylor_vector). Besides "
          "the weights it holds the gradients of all block parameters (in the model dtype), their float32 running "
          "sum and the activations the backward keeps: about 4-5x the bf16 weights at the peak (table).",
          "* **layer-streamed** `analyze_streamed()` (`streamed=True`): the calibration batches are embedded once and "
          "their hidden states cached; the blocks run one at a time on the cache, which then moves on to the block's "
          "outputs (Wanda / SparseGPT style). Forward only: cosine layer importance, magnitude_l1 / magnitude_l2 and "
          "fluctuation (activation-based, and on one scale for heads and neurons, so the salience split works). "
          "Peak: weights + activation cache + one block's working set, with the same scores as whole-model "
          "analysis (tested to float32 rounding). A gradient metric with `streamed=True` is refused with an "
          "error naming the streamed metrics.", "",
          f"Memory of analysis + one stage of pruning with reconstruction at {a['target']:.0%} (the library's "
          "defaults: λ searched, OBS units), in bf16 on one device, from `explorer.stream.memory_estimate`: weights + "
          "calibration cache + max(one block's working set, reconstruction's float64 statistics of the widest "
          "projection); the whole mode adds the gradients, their float32 sum and the activations kept for the "
          "backward. GiB, the ratio to the bf16 weights in brackets:", "",
          f"| model | params | bf16 weights | streamed, {a['samples']} x {a['seq_len']} tokens | whole, "
          f"{a['samples']} x {a['seq_len']} tokens | streamed, 128 x 2048 tokens | whole, 128 x 2048 tokens | "
          "measured here (peak RSS, runtime included) |",
          "|---|---|---|---|---|---|---|---|"]
    table = data["estimates"]
    for name in dict.fromkeys(r["model"] for r in table):
        s, w = (next(r for r in table if r["model"] == name and r["mode"] == m) for m in ("streamed", "whole"))

        def cell(r, key):
            e = r[key]
            return f"{e['peak_gib']:.1f} ({e['ratio']:.1f}x)"
        measured = ""
        if name == "1B" and not a["smoke"]:
            got = []
            for r in rows:
                if "error" in r:
                    got.append(f"{r['mode']}: {r['error']}")
                    continue
                x = r.get("extrapolated")
                peak, ratio = (x["peak_rss"], x["ratio"]) if x else (r["peak_rss"], r["ratio"])
                est = (estimate_full(data, r["mode"]) + RUNTIME) / 2**30
                got.append(f"{r['mode']}{' (extrapolated)' if x else ''} {gib(peak)} ({ratio:.1f}x; its estimate "
                           f"+ runtime {est:.2f})")
            measured = "; ".join(got)
        L.append(f"| {name} | {s['params'] / 1e9:.2f} B | {s['weights'] / 2**30:.1f} | {cell(s, 'bench_calibration')} | "
                 f"{cell(w, 'bench_calibration')} | {cell(s, 'typical_calibration')} | {cell(w, 'typical_calibration')} "
                 f"| {measured} |")
    eight = next(r for r in table if r["model"] == "8B" and r["mode"] == "streamed")["bench_calibration"]["parts"]
    seventy = next(r for r in table if r["model"] == "70B" and r["mode"] == "streamed")["bench_calibration"]["parts"]
    L += ["", "Shapes: TinyLlama-1.1B (hidden 2048, 22 layers, FFN 5632, 32 / 4 heads, vocabulary 32000), Llama-3.1-8B "
          "(4096, 32, 14336, 32 / 8, 128256), Llama-3.1-70B (8192, 80, 28672, 64 / 8, 128256). 128 x 2048 tokens is the "
          "usual calibration of Wanda / SparseGPT, run 4 samples a batch (whole-model analysis caps a backward at "
          "1024 tokens, so 1 sample). The measured figures use the bench's reconstruction settings (see above) and "
          "stand next to the estimate for those settings. Not in the estimate: the runtime (~0.4 GiB on the CPU, the "
          "CUDA context on a GPU) and the allocator's slack; a PruningRun (the app, the CLI) also keeps a copy of "
          "the last completed stage so that Stop or an error can roll back (+1x the weights, in host memory, never on "
          "the accelerator: `pruning.cpu_snapshot`). "
          f"What the streamed mode adds is mostly reconstruction's float64 statistics of down_proj: "
          f"{eight['recon'] / 2**30:.0f} GiB at 8 B (14336 wide), {seventy['recon'] / 2**30:.0f} GiB at 70 B (28672 "
          "wide), the same in both modes; the calibration cache is tokens x hidden in bf16 (128 x 2048 tokens of a "
          "70 B model: 4 GiB)."]
    (out / "BIGMODEL.md").write_text("\n".join(L) + "\n")


def _ns(args: dict):
    return argparse.Namespace(**args)


def estimate_full(data: dict, mode: str) -> int:
    return data["estimates_full"][mode]["peak"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bigmodel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny config (seconds), for the tests")
    for k in ONE_B:
        ap.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, default=None,
                        help=f"model {k} (default {ONE_B[k]}; --smoke: {SMOKE[k]})")
    ap.add_argument("--samples", type=int, default=None, help="calibration samples (default 8; --smoke 4)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default 128; --smoke 16)")
    ap.add_argument("--batch-size", type=int, default=8, help="calibration samples per batch (default 8)")
    ap.add_argument("--target", type=float, default=0.2, help="fraction of the block parameters removed (default 0.2)")
    ap.add_argument("--recon-select", choices=("obs", "metric"), default="metric",
                    help="reconstruction's unit choice in the streamed / whole modes (default metric; obs is the "
                         "library's default, see the defaults mode)")
    ap.add_argument("--recon-lambda", type=float, default=0.1,
                    help="reconstruction's ridge λ in the streamed / whole modes (default 0.1; 0: searched, the "
                         "library's default)")
    ap.add_argument("--modes", default="streamed,whole,defaults",
                    help="comma-separated modes out of streamed, whole, defaults (default: all three)")
    ap.add_argument("--probe-layers", type=int, default=1, help="layers of the defaults mode (default 1)")
    ap.add_argument("--whole-layers", type=int, default=0,
                    help="run the whole-model mode on this many layers and extrapolate (0: the full depth "
                         "if its estimate fits in --mem-fraction of the available memory, else as many as fit)")
    ap.add_argument("--mem-fraction", type=float, default=0.7, help="see --whole-layers (default 0.7)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the children (0: torch's default)")
    ap.add_argument("--timeout", type=float, default=1500, help="seconds per mode before it is stopped (default 1500)")
    ap.add_argument("--out", default="bench", help="where bigmodel.json and BIGMODEL.md go (default bench/)")
    ap.add_argument("--rewrite", action="store_true",
                    help="only recompute the estimates for --out's bigmodel.json and rewrite its report (no runs)")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.samples = a.samples or (4 if a.smoke else 8)
    a.seq_len = a.seq_len or (16 if a.smoke else 128)
    if a.smoke and not a.threads:
        a.threads = 1
    shape = shape_of(a)
    if a.child:
        res = child(a.child, shape, a)
        Path(a.result).write_text(json.dumps(res))
        return 0
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode '{bad[0]}': use {', '.join(MODES)}")

    out = Path(a.out)
    if a.rewrite:
        return rewrite(out)
    t0 = time.perf_counter()
    meta = {"machine": machine(), "load_before": load_average(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "mem_available_gib": round(mem_available() / 2**30, 1)}
    if a.threads:
        meta["machine"]["torch_threads"] = a.threads
    runs = []
    for mode in modes:
        shp, why = run_shape(mode, shape, a)
        log(f"== {mode}: {shp['layers']} layers, hidden {shp['hidden']}, FFN {shp['intermediate']}"
            + (f" (reduced: {why})" if why else ""))
        res = run_child(mode, shp, a, a.timeout)
        res.setdefault("analysis", settings(mode, a)["analysis"])
        if shp["layers"] != shape["layers"]:
            res["reduced_because"] = why
        runs.append(res)
    meta.update(seconds=time.perf_counter() - t0, load_after=load_average())
    args = {k: v for k, v in vars(a).items() if k not in ("child", "result", "rewrite")}
    finish(out, meta, args, shape, runs)
    log(f"wrote {out / 'bigmodel.json'} and {out / 'BIGMODEL.md'} after {meta['seconds'] / 60:.1f} min")
    return 0 if all("error" not in r for r in runs) else 1


def finish(out: Path, meta: dict, args: dict, shape: dict, runs: list[dict], earlier=()) -> None:
    """Estimates next to the measurements, extrapolations of the shortened runs, the files."""
    from explorer.stream import llama_params
    a = _ns(args)
    for i, r in enumerate(runs):
        r = {k: v for k, v in r.items() if k != "extrapolated"}
        r["estimate"] = estimate(r["shape"], a, r["mode"])
        if r["shape"]["layers"] != shape["layers"]:
            r = extrapolate(r, shape, a)
        runs[i] = r
    p = llama_params(_cfg_dict(shape))
    data = {"meta": meta, "args": args, "shape": shape, "params": p["total"], "weight_bytes": p["total"] * 2,
            "runs": runs, "estimates_full": {m: estimate(shape, a, m) for m in MODES}, "estimates": estimate_table(a)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bigmodel.json", data, earlier, default=float)  # sets data["provenance"]
    write_report(out, data)


def rewrite(out: Path) -> int:
    """Recompute the estimates and extrapolations of out/bigmodel.json's measurements (after a change
    of the formula) and rewrite both files; the measurements and their date stay as they were."""
    data = json.loads((out / "bigmodel.json").read_text())
    meta = {**data["meta"], "rewritten": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    finish(out, meta, data["args"], data["shape"], data["runs"], [data])  # the measurements' commit stays
    log(f"rewrote {out / 'bigmodel.json'} and {out / 'BIGMODEL.md'} from the measurements of {meta['date']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
