"""Export a (possibly pruned) model to ONNX and check the file against PyTorch.

A pruned model has physically smaller weight matrices, possibly a different width in every
layer (attention heads / KV groups, FFN neurons). ONNX stores each weight with its own shape,
so such a model exports like any other; nothing here depends on the widths being uniform.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. The newer
torch.export-based exporter (the default since torch 2.9) needs the extra `onnxscript`
package; the TorchScript path needs nothing beyond torch and traces BERT, DistilBERT, GPT-2
and LLaMA (grouped-query attention, rotary embeddings) from transformers 5 correctly, with
dynamic batch and sequence axes.

Tracing runs the model once on an example batch and records the operations it executed, so
Python branches taken on that batch are fixed in the graph. transformers builds the full
attention mask while it is being traced (it only skips it for an unpadded batch when *not*
tracing), and the example batch below has padding and more than one token, so the recorded
branches are the general ones: masks are applied as data, and any batch size, sequence length
and padding pattern then runs through the same graph.

The file has one output: `logits` (classification: (batch, labels); causal LM:
(batch, seq, vocab)) or `last_hidden_state` for an encoder without a head (batch, seq, hidden).
Inputs: `input_ids`, `attention_mask` (int64, (batch, seq)), plus `token_type_ids` when the
tokenizer produces them and the model takes them.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ExplorerError
from .models import LoadedModel

OUTPUT_NAME = {"classification": "logits", "causal-lm": "logits", "encoder": "last_hidden_state"}
MIN_OPSET = 14  # scaled_dot_product_attention (transformers' default attention) needs opset 14
MAX_OPSET = 20  # the newest opset the TorchScript exporter writes
TOLERANCE = 1e-4  # check_onnx: default largest absolute difference from PyTorch that counts as "ok"

# Example text for tracing: long enough to give several tokens with any tokenizer.
_EXAMPLE_TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps"


class OnnxWrapper(nn.Module):
    """Calls a transformers model with plain tensors and returns its one output tensor.

    The exporter wants positional tensor inputs and a tensor output; transformers models take
    keyword arguments and return a ModelOutput (and, for LMs, a KV cache unless told not to).
    """

    def __init__(self, model: nn.Module, output: str, token_type_ids: bool):
        super().__init__()
        self.model = model
        self.output = output  # attribute of the ModelOutput to return
        self.token_type_ids = token_type_ids
        self.takes_use_cache = "use_cache" in inspect.signature(model.forward).parameters
        # A new Module starts in training mode, and torch.onnx.export restores the wrapper's
        # mode after exporting, recursively: mirror the model's mode so that stays unchanged.
        self.train(model.training)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, attention_mask, token_type_ids: (batch, seq) int64
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "return_dict": True}
        if self.token_type_ids:
            kwargs["token_type_ids"] = token_type_ids
        if self.takes_use_cache:
            kwargs["use_cache"] = False  # no KV cache among the outputs
        return getattr(self.model(**kwargs), self.output)


def input_names(lm: LoadedModel) -> list[str]:
    """The graph's inputs: token_type_ids only if the tokenizer gives them and the model takes them."""
    names = ["input_ids", "attention_mask"]
    takes_tt = "token_type_ids" in inspect.signature(lm.model.forward).parameters
    if takes_tt and "token_type_ids" in lm.encode(["a"]):
        names.append("token_type_ids")
    return names


def _output_name(lm: LoadedModel) -> str:
    if lm.task not in OUTPUT_NAME:
        raise ExplorerError(f"cannot export task '{lm.task}' to ONNX: use one of {', '.join(OUTPUT_NAME)}")
    return OUTPUT_NAME[lm.task]


def _cpu_float32_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` on the CPU in float32, made without a second copy on the model's own
    device: deepcopy is told up front to use CPU float32 versions of every parameter and buffer
    (tied weights stay tied: one original tensor maps to one copy)."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to("cpu", torch.float32 if p.is_floating_point() else p.dtype),
                                   requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", torch.float32 if b.is_floating_point() else b.dtype)
    return copy.deepcopy(model, memo).to("cpu")


@contextlib.contextmanager
def cpu_float32_model(lm: LoadedModel):
    """Yields the model on the CPU in float32 and in eval mode without changing `lm.model`: the
    model itself if it is already float32 on the CPU (no copy, its train/eval mode restored
    afterwards), otherwise a copy."""
    model = lm.model
    tensors = list(model.parameters()) + list(model.buffers())
    ready = all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point())
                for t in tensors)
    if not ready:
        model = _cpu_float32_copy(model)
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        if ready and was_training:
            model.train()


def _example_batch(lm: LoadedModel, names: list[str]) -> tuple[torch.Tensor, ...]:
    """Two rows of the same text, the second right-padded over its last half: padding and
    more than one token, so tracing records the general (masked) attention path."""
    enc = lm.encode([_EXAMPLE_TEXT, _EXAMPLE_TEXT])
    seq = enc["input_ids"].shape[1]
    if seq < 2:
        raise ExplorerError("cannot export to ONNX with a max length under 2 tokens")
    pad_id = getattr(lm.tokenizer, "pad_token_id", None)
    cut = max(1, seq // 2)  # at least one real and one padded position in row 1
    enc["input_ids"][1, cut:] = 0 if pad_id is None else pad_id
    enc["attention_mask"][1, cut:] = 0
    return tuple(enc[n].cpu() for n in names)  # each (2, seq) int64


def _dynamic_axes(names: list[str], output: str, task: str) -> dict[str, dict[int, str]]:
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[output] = {0: "batch"} if task == "classification" else {0: "batch", 1: "sequence"}
    return axes


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _move_into_place(tmp_dir: Path, tmp_file: Path, dest: Path) -> list[Path]:
    """Move an exported file from `tmp_dir` to `dest`; returns the files written.

    Up to 2 GB the exporter writes one self-contained file, which is simply renamed over
    `dest` (atomic on one file system). Above 2 GB (the protobuf limit) it writes the weights
    as one external file per tensor next to the model; those are gathered into a single
    `<dest name>.data` beside `dest`, which is moved in first, the model file last."""
    extra = [p for p in tmp_dir.iterdir() if p != tmp_file]
    data = dest.with_name(dest.name + ".data")
    if not extra:
        os.replace(tmp_file, dest)
        data.unlink(missing_ok=True)  # weights of an earlier, larger export to this path
        return [dest]
    import onnx  # local: optional and heavy, needed only to repack a large export's external weights
    proto = onnx.load(str(tmp_file), load_external_data=True)
    packed = tmp_dir / "packed"
    packed.mkdir()
    onnx.save_model(proto, str(packed / dest.name), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    del proto
    os.replace(packed / data.name, data)
    os.replace(packed / dest.name, dest)
    return [dest, data]


def export_onnx(lm: LoadedModel, path: str | Path, opset: int = 17) -> dict:
    """Write `lm` as one ONNX file at `path` (weights inside; up to 2 GB, else in a single
    `<name>.data` file beside it). Written under a temporary name in the same folder and
    renamed, so `path` is never half-written. The export runs on the CPU in float32, on a copy
    if the model is elsewhere or in another dtype; `lm.model` is not modified.

    Returns {"path", "bytes" (all files written), "opset", "inputs", "output", "seconds"}.
    Raises ExplorerError if the model cannot be exported."""
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExplorerError(f"ONNX opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}")
    output = _output_name(lm)
    names = input_names(lm)
    dest = Path(path).expanduser().resolve()
    if dest.is_dir():
        raise ExplorerError(f"'{path}' is a directory: give a file name such as model.onnx")
    dest.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp_dir = Path(tempfile.mkdtemp(prefix=".exporting-", dir=dest.parent))
    try:
        tmp_file = tmp_dir / dest.name
        with cpu_float32_model(lm) as model:
            wrapper = OnnxWrapper(model, output, token_type_ids="token_type_ids" in names)
            example = _example_batch(lm, names)
            try:
                with warnings.catch_warnings(), torch.no_grad():
                    # The tracer warns about every Python branch on a tensor; see the module
                    # docstring for why the branches recorded here are the general ones.
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    warnings.filterwarnings("ignore", category=DeprecationWarning)
                    # transformers' mask builder indexes the padding mask with aranges, never
                    # with the negative indices this warning is about.
                    warnings.filterwarnings("ignore", message="Exporting aten::index operator")
                    torch.onnx.export(wrapper, example, str(tmp_file), dynamo=False, opset_version=opset,
                                      input_names=names, output_names=[output],
                                      dynamic_axes=_dynamic_axes(names, output, lm.task),
                                      do_constant_folding=True)
            except Exception as e:  # noqa: BLE001 - any exporter failure becomes one readable line
                raise ExplorerError(f"ONNX export of {lm.name} ({model.config.model_type}) failed: "
                                    f"{_first_line(e)}") from None
        try:
            import onnx  # local: optional (without it the file is still written) and heavy
            onnx.checker.check_model(str(tmp_file))  # by path: works with external data too
        except ImportError:
            pass  # the file is still written; check_onnx validates it with onnxruntime
        except Exception as e:  # noqa: BLE001
            raise ExplorerError(f"the exported ONNX graph of {lm.name} is invalid: {_first_line(e)}") from None
        written = _move_into_place(tmp_dir, tmp_file, dest)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"path": str(dest), "bytes": sum(p.stat().st_size for p in written), "opset": opset,
            "inputs": names, "output": output, "seconds": round(time.perf_counter() - start, 3)}


def _session(path: str | Path, threads: int):
    """An onnxruntime CPU session, or ExplorerError with a one-line reason."""
    try:
        import onnxruntime as ort  # local: optional and heavy, only to check a written file
    except ImportError:
        raise ExplorerError("onnxruntime is not installed: run `pip install onnxruntime` to check ONNX files") from None
    p = Path(path).expanduser()
    if not p.is_file():
        raise ExplorerError(f"no ONNX file at '{path}'")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # as many threads as torch, for a fair timing
    opts.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(p), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExplorerError(f"onnxruntime cannot load '{path}': {_first_line(e)}") from None


def _compared(out, mask, task: str):
    """The output values to compare: all of a classifier's (batch, labels); for per-token
    outputs (batch, seq, dim) only the non-padded positions, as (n_tokens, dim)."""
    if task == "classification":
        return out
    return out[mask.astype(bool)]


def check_onnx(lm: LoadedModel, path: str | Path, texts: list[str], batch_size: int = 8,
               repeats: int = 5, atol: float = TOLERANCE) -> dict:
    """Run the ONNX file with onnxruntime (CPU) on `texts` and compare with PyTorch (CPU,
    float32, the same inputs) over the non-padded positions.

    Returns {"max_abs_diff", "max_rel_diff" (max_abs_diff over the largest |output| compared),
    "ok" (max_abs_diff <= atol, 1e-4 by default), "onnx_ms", "torch_ms", "batch_size",
    "seq_len", "providers", "texts"}. The times are the median of `repeats` runs on the first batch (`batch_size`
    texts padded to `seq_len` tokens) after one warm-up, ONNX and PyTorch runs alternating,
    onnxruntime given as many threads as torch.
    Raises ExplorerError if onnxruntime is missing or the file cannot be loaded or run.

    On 1e-4: the tiny test models and MiniLM (6 layers) match to about 1e-6, but the float32
    rounding of a deep LM is larger than that by itself: for SmolLM2-135M (30 layers, logits up
    to ~35) PyTorch on 1 vs 2 threads already differs by ~7e-4, and onnxruntime's ~6e-4 from
    PyTorch is no worse (both are ~1e-3 from float64). Judge such models by max_rel_diff
    (~2e-5 there) or pass a larger `atol`."""
    texts = list(texts)
    if not texts:
        raise ExplorerError("check_onnx needs at least one text")
    if batch_size < 1 or repeats < 1:
        raise ExplorerError("batch_size and repeats must be at least 1")
    output = _output_name(lm)
    sess = _session(path, torch.get_num_threads())
    feeds_names = [i.name for i in sess.get_inputs()]
    enc0 = lm.encode(texts[:1])
    missing = [n for n in feeds_names if n not in enc0]
    if missing:
        raise ExplorerError(f"the ONNX file expects input(s) {', '.join(missing)} that this model's "
                            "tokenizer does not produce: was it exported from another model?")
    wrapper_tt = "token_type_ids" in feeds_names
    diffs, scales = [], []  # per batch: largest |onnx - torch| and largest |torch|
    with cpu_float32_model(lm) as model, torch.inference_mode():
        wrapper = OnnxWrapper(model, output, token_type_ids=wrapper_tt)
        first = None
        for i in range(0, len(texts), batch_size):
            enc = {k: v.cpu() for k, v in lm.encode(texts[i:i + batch_size]).items()}
            feeds = {n: enc[n].numpy() for n in feeds_names}  # each (batch, seq) int64
            args = [enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids") if wrapper_tt else None]
            try:
                got = sess.run([sess.get_outputs()[0].name], feeds)[0]
            except Exception as e:  # noqa: BLE001
                raise ExplorerError(f"onnxruntime failed to run '{path}': {_first_line(e)}") from None
            ref = wrapper(*args).numpy()
            if got.shape != ref.shape:
                raise ExplorerError(f"the ONNX output has shape {got.shape}, PyTorch's {ref.shape}: "
                                    "was the file exported from another model?")
            mask = feeds["attention_mask"]
            g, r = _compared(got, mask, lm.task), _compared(ref, mask, lm.task)
            if g.size:
                diffs.append(float(np.max(np.abs(g - r))))
                scales.append(float(np.max(np.abs(r))))
            if first is None:
                first = (feeds, args)

        # Timing on the first batch: one warm-up each, then ONNX and PyTorch alternately.
        feeds, args = first
        out_name = sess.get_outputs()[0].name
        sess.run([out_name], feeds)
        wrapper(*args)
        onnx_s, torch_s = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run([out_name], feeds)
            t1 = time.perf_counter()
            wrapper(*args)
            t2 = time.perf_counter()
            onnx_s.append(t1 - t0)
            torch_s.append(t2 - t1)
    max_abs = float(np.max(diffs)) if diffs else 0.0  # np.max keeps a NaN (a NaN output is never "ok")
    ref_scale = float(np.max(scales)) if scales else 0.0
    batch, seq_len = feeds["input_ids"].shape
    return {"max_abs_diff": max_abs, "max_rel_diff": max_abs / ref_scale if ref_scale > 0 else None,
            "ok": bool(max_abs <= atol),  # False for NaN too
            "onnx_ms": 1000 * statistics.median(onnx_s), "torch_ms": 1000 * statistics.median(torch_s),
            "batch_size": int(batch), "seq_len": int(seq_len), "providers": sess.get_providers(),
            "texts": len(texts)}
