"""Export: formats that run outside the explorer, and the model card of a saved directory.

  * onnx      every adapter; any per-layer width is fine in a graph (export_onnx.py), checked
              by onnxruntime against PyTorch's logits on held-out sentences;
  * gguf      LLaMA family (export_gguf.py), per-layer `feed_forward_length` / `head_count(_kv)`
              arrays; written as llama.cpp's `llama` architecture when every layer has the same
              width, else as `deci` (same tensors, per-layer sizes: llama.cpp's `llama` graph sizes
              every layer from layer 0); checked by reading it back; gguf-f16 halves it; `quant`
              ("q8_0", "q4_k_m", ...) stores the matrices quantised (Q8_0 by gguf-py, the others
              by llama.cpp's llama-quantize: explorer/llama_cpp.py, `make llama-cpp`).
The model card (README.md of a saved directory) lives in card.py, written by `save_model`; its
names stay importable from here.
"""
from __future__ import annotations

import time
from pathlib import Path

from .card import AUTO_CLASS, HUB_IDS, eval_split, model_card  # the model card moved to card.py; kept importable
from .errors import ExplorerError
from .export_gguf import check_gguf, export_gguf
from .export_onnx import check_onnx, export_onnx
from .models import BUILTIN_MODELS, LoadedModel, package_dir

__all__ = ["AUTO_CLASS", "CHECK_SENTENCES", "FORMATS", "HUB_IDS", "eval_split", "export", "model_card", "source_gguf"]

FORMATS = ("onnx", "gguf", "gguf-f16")
ONNX_ATOL, ONNX_RTOL = 1e-4, 2e-5  # onnxruntime vs PyTorch: absolute, or relative to the largest output

# Held-out inputs of the ONNX check: none of them comes from a data set the explorer uses.
CHECK_SENTENCES = [
    "The committee will publish its findings on the new railway line next spring.",
    "A quiet film, beautifully shot, that never quite finds its story.",
    "Prices rose again in March",
    "She said the results were better than anyone had expected, and that the team would keep going.",
]



def source_gguf(lm: LoadedModel) -> Path | None:
    """The GGUF file a model (or the model it was pruned from) was loaded from, if any: its
    tokenizer is copied verbatim into an exported GGUF."""
    for name in (lm.name, lm.plan.get("base")):
        b = BUILTIN_MODELS.get(name or "")
        if b and b.gguf:
            return package_dir(b.package) / b.subdir / b.gguf
    return None


def export(lm: LoadedModel, fmt: str, out: str | Path, check: bool = True, quant: str | None = None) -> dict:
    """Write `lm` as `fmt` to the file `out`; with `check`, verify the file reproduces the model.
    `quant`: a GGUF quantisation type (llama-quantize's names, e.g. q8_0, q4_k_m); gguf formats only."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise ExplorerError(f"'{out}' is a directory: give a file name (e.g. {out / ('model.' + fmt.split('-')[0])})")
    if fmt not in FORMATS:
        raise ExplorerError(f"unknown export format '{fmt}': use one of {', '.join(FORMATS)}")
    if quant and not fmt.startswith("gguf"):
        raise ExplorerError(f"a quantisation type ('{quant}') applies to GGUF files only, not {fmt}")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if fmt == "onnx":
        res = export_onnx(lm, out)
        if check:
            c = check_onnx(lm, out, CHECK_SENTENCES)
            # 1e-4 absolute; a 30-layer LM's float32 logits (|z| ~ 30) differ by more than that between two
            # PyTorch thread counts (SmolLM2: 6.6e-4), so a relative 2e-5 of the largest logit also passes
            c["ok"] = c["max_abs_diff"] <= ONNX_ATOL or c["max_rel_diff"] <= ONNX_RTOL
            res["check"] = c
            res["check_summary"] = (f"onnxruntime max |Δ| {c['max_abs_diff']:.1e} (relative {c['max_rel_diff']:.1e}; "
                                    f"{'ok' if c['ok'] else 'NOT within tolerance'}), {c['onnx_ms']:.1f} ms vs "
                                    f"PyTorch {c['torch_ms']:.1f} ms at {c['batch_size']} x {c['seq_len']}")
    else:
        res = export_gguf(lm, out, dtype="f16" if fmt == "gguf-f16" else "f32", source_gguf=source_gguf(lm),
                          quant=quant or None)
        if check:
            c = check_gguf(lm, out)
            res["check"] = c
            res["check_summary"] = (f"read back ({res['architecture']} architecture"
                                    + (f", {res['quant']}" if res.get("quant") else "") + "): per-layer widths, tensor "
                                    "shapes and values match" + (" within the quantisation's error" if res.get("quant")
                                                                 else "") if c["ok"] else "; ".join(c["problems"][:3]))
            res["check_summary"] += "".join(f"; note: {w}" for w in res.get("warnings", []))
    res.update(format=fmt, seconds=time.perf_counter() - t0)
    return res
