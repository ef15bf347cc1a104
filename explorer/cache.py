"""Nothing computed twice: a content-addressed cache of results that depend only on a model's
weights, the data and a few settings (the importance analysis, the quality part of an evaluation).

Key: sha256 over CACHE_VERSION, the kind of result, and its settings, among them the model's
`fingerprint` (class, adapter, task, config, per-layer widths, dtype, device, and a sha256 over
the bytes of *every* parameter and buffer, so a pruned or fine-tuned model never meets the dense
model's entry), the tokenizer's, the inputs' digest and the library versions. A model whose
forward is altered by something the bytes do not show (module or tensor hooks, parametrizations,
an instance-level `forward`) is `Uncacheable`: its results are computed and never stored.

Two levels: an LRU in memory (MEMORY_ENTRIES per process) and files on disk under
$EXPLORER_CACHE_DIR (else $PRUNING_EXPLORER_CACHE, the latency cost model's variable, else
~/.cache/pruning-explorer/, where the cost models live too), `<kind>-<key>.pt`, at most
DISK_ENTRIES per kind (the least recently used go first). A file is written with torch.save to a
temporary name and renamed into place (atomic), and read with torch.load(weights_only=True): plain
tensors, lists, dicts, strings and numbers only, nothing a stranger could plant to run code. Its
header (format, version, kind, key, date, settings) must match what is asked for; a file that
does not (another CACHE_VERSION, another key, truncated, half-written, unreadable) is deleted and
the result computed again. A failed write (full disk, read-only folder) costs the cache, not the
computation: one warning, then the result is returned as usual.

$EXPLORER_CACHE: "0" / "off" / "false" / "no" switches the cache off, "memory" keeps it in
memory only (nothing on disk); anything else (or unset) uses both levels.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import transformers
from torch.nn.modules import module as torch_module

CACHE_VERSION = 2  # bump whenever what a cached computation returns changes
FORMAT = "pruning-explorer-cache"
DIR_ENV = "EXPLORER_CACHE_DIR"
LEGACY_DIR_ENV = "PRUNING_EXPLORER_CACHE"  # explorer.latency.CACHE_ENV: the cost models' folder
SWITCH_ENV = "EXPLORER_CACHE"
MEMORY_ENTRIES = 8
DISK_ENTRIES = 64  # per kind; an SmolLM2-135M importance entry is about 3 MB
_OFF = ("0", "off", "false", "no")

log = logging.getLogger(__name__)


class Uncacheable(Exception):
    """The model's results cannot be keyed by its weights (hooks, parametrizations, meta tensors)."""


# --- where and whether --------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or os.environ.get(LEGACY_DIR_ENV)
                or Path.home() / ".cache" / "pruning-explorer")


def mode() -> str:
    """'off', 'memory' or 'disk' (memory and disk), from $EXPLORER_CACHE."""
    v = os.environ.get(SWITCH_ENV, "").strip().lower()
    if v in _OFF:
        return "off"
    return "memory" if v == "memory" else "disk"


def enabled(requested: bool = True) -> bool:
    return bool(requested) and mode() != "off"


# --- fingerprints -------------------------------------------------------------------------------

def _default(o: Any) -> Any:
    """JSON for what json cannot write: sets sorted (their order changes with the hash seed), else str."""
    if isinstance(o, (set, frozenset)):
        return sorted(map(str, o))
    return str(o)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_default).encode()).hexdigest()


def _tensor_bytes(t: torch.Tensor):
    """A contiguous uint8 CPU view of `t`'s bytes (a copy only when it is elsewhere or strided)."""
    t = t.detach()
    if t.is_meta:
        raise Uncacheable("a tensor on the meta device has no bytes to hash")
    if t.is_sparse or t.layout != torch.strided:
        t = t.to_dense()
    t = t.to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the name, dtype, shape and sha256 of the bytes of every parameter and buffer
    (tied ones once). The tensors are hashed in a few threads (hashlib releases the GIL): on
    SmolLM2-135M's 538 MB about 1 s on 2 busy cores, against 100 s for its analysis."""
    items = [(f"{kind}:{name}:{t.dtype}:{tuple(t.shape)}\n".encode(), t)
             for kind, named in (("p", model.named_parameters()), ("b", model.named_buffers()))
             for name, t in named if t is not None]

    def one(t: torch.Tensor) -> bytes:
        return hashlib.sha256(_tensor_bytes(t)).digest()
    total = sum(t.numel() * t.element_size() for _, t in items)
    workers = min(4, os.cpu_count() or 1)
    if workers > 1 and total > 32 << 20:
        with ThreadPoolExecutor(workers) as ex:
            digests = list(ex.map(one, [t for _, t in items]))
    else:
        digests = [one(t) for _, t in items]
    h = hashlib.sha256()
    for (head, _), d in zip(items, digests):
        h.update(head)
        h.update(d)
    return h.hexdigest()


def _has_hooks(m: torch.nn.Module) -> bool:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(m, n, None) for n in names):
        return True
    if "forward" in m.__dict__ and not hasattr(m, "_hf_hook"):  # accelerate's placement wrapper is benign
        return True
    return bool(getattr(m, "parametrizations", None))


def check_cacheable(model: torch.nn.Module) -> None:
    """Uncacheable when anything besides the weights shapes the forward or backward."""
    glob = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks")
    if any(getattr(torch_module, n, None) for n in glob):
        raise Uncacheable("global module hooks are registered")
    for name, m in model.named_modules():
        if _has_hooks(m):
            raise Uncacheable(f"module '{name or type(m).__name__}' has hooks, a parametrization or its own forward")
    for name, p in model.named_parameters():
        if getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None):
            raise Uncacheable(f"parameter '{name}' has gradient hooks")


def _config_dict(model) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    for k in ("_name_or_path", "transformers_version", "_commit_hash"):  # where it came from, not what it is
        d.pop(k, None)
    d["_attn_implementation"] = getattr(cfg, "_attn_implementation", None)
    n_labels = getattr(cfg, "num_labels", None)
    if d.get("problem_type") is None and n_labels:  # what the first forward with (integer) labels sets it to
        d["problem_type"] = "regression" if n_labels == 1 else "single_label_classification"
    return d


def _device(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # change float32 results
            return f"cuda:{torch.cuda.get_device_name(device)}:tf32={int(tf32[0])}{int(tf32[1])}"
        except Exception:  # noqa: BLE001 - a name is only a label
            return "cuda"
    return device.type


def model_fingerprint(lm) -> dict:
    """What a LoadedModel's results depend on; Uncacheable when its forward is not its weights'.
    Hashing the weights is most of the cost (see `weights_digest`)."""
    model = lm.model
    check_cacheable(model)
    blocks = lm.adapter.blocks(model)
    first = next(iter(model.parameters()), None)
    return {"class": type(model).__name__, "adapter": getattr(lm.adapter, "family", type(lm.adapter).__name__),
            "task": lm.task, "config": _sha(_config_dict(model)),
            "widths": [[b.attn.n_units, b.heads_per_group, b.head_dim, b.mlp.n_units] for b in blocks],
            "dtype": str(first.dtype) if first is not None else "", "device": _device(lm.device),
            "weights": weights_digest(model)}


def tokenizer_digest(tok) -> str:
    """sha256 of everything that decides the tokens: the fast tokenizer's full JSON (vocabulary,
    merges, normaliser, post-processor) or a slow one's vocabulary, plus padding / truncation
    sides and the special tokens."""
    parts = {"class": type(tok).__name__, "padding_side": getattr(tok, "padding_side", None),
             "truncation_side": getattr(tok, "truncation_side", None),
             "special": {k: str(v) for k, v in (getattr(tok, "special_tokens_map", None) or {}).items()}}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        body = _backend_body(backend.to_str())
    elif hasattr(tok, "get_vocab"):
        body = json.dumps(tok.get_vocab(), sort_keys=True)
    else:
        raise Uncacheable(f"cannot fingerprint tokenizer {type(tok).__name__}")
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    h.update(body.encode())
    return h.hexdigest()


def _backend_body(s: str) -> str:
    """A fast tokenizer's JSON without its truncation / padding state (whatever the last call set:
    every call sets its own). The JSON starts {"version", "truncation", "padding", "added_tokens",
    ...}: only that short head is parsed (parsing the whole of SmolLM2's 1.5 MB takes 2 s)."""
    i = s.find(',"added_tokens":')
    if s.startswith('{"version":') and i > 0:
        try:
            head = json.loads(s[:i] + "}")
            return json.dumps(head.get("version")) + s[i:]
        except ValueError:
            pass
    d = json.loads(s)
    return json.dumps({k: v for k, v in d.items() if k not in ("truncation", "padding")}, sort_keys=True)


def data_digest(texts, labels=None) -> str:
    """sha256 over the texts (length-prefixed, in order) and the labels."""
    h = hashlib.sha256()
    for t in texts:
        b = str(t).encode()
        h.update(f"{len(b)}:".encode())
        h.update(b)
    h.update(json.dumps(None if labels is None else [int(y) for y in labels]).encode())
    return h.hexdigest()


def versions() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def make_key(kind: str, settings: dict) -> str:
    return _sha({"format": FORMAT, "version": CACHE_VERSION, "kind": kind, "settings": settings})


# --- the two levels -----------------------------------------------------------------------------

_lock = threading.Lock()
_memory: OrderedDict[tuple[str, str], Any] = OrderedDict()
_warned: set[str] = set()


def clear_memory() -> None:
    with _lock:
        _memory.clear()


def _warn_once(what: str, err: BaseException) -> None:
    msg = f"result cache: {what} ({type(err).__name__}: {err}); results are computed as usual"
    with _lock:
        if what in _warned:
            log.debug(msg)
            return
        _warned.add(what)
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def skipped(kind: str, err: BaseException) -> None:
    """A result computed without the cache: expected for Uncacheable models, else warned once."""
    if isinstance(err, Uncacheable):
        log.debug("result cache: %s not cached: %s", kind, err)
    else:
        _warn_once(f"cannot fingerprint the inputs of a {kind} result", err)


def path_for(kind: str, key: str) -> Path:
    return cache_dir() / f"{kind}-{key}.pt"


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _read(kind: str, key: str, decode: Callable[[Any], Any]):
    path = path_for(kind, key)
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        head = d["header"]
        if not (head["format"] == FORMAT and head["version"] == CACHE_VERSION and head["kind"] == kind
                and head["key"] == key):
            raise ValueError(f"header {head.get('format')} v{head.get('version')} {head.get('kind')} "
                             f"{str(head.get('key'))[:12]} does not match")
        value = decode(d["payload"])
    except Exception as e:  # noqa: BLE001 - any unreadable or foreign entry is discarded
        log.info("result cache: discarding %s (%s: %s)", path, type(e).__name__, e)
        _remove(path)
        return None
    try:
        os.utime(path)  # recently used: evicted last
    except OSError:
        pass
    return value


def _write(kind: str, key: str, payload: Any, settings: dict) -> None:
    folder = cache_dir()
    head = {"format": FORMAT, "version": CACHE_VERSION, "kind": kind, "key": key,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "settings": json.loads(json.dumps(settings, default=_default))}
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{kind}-{key[:16]}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({"header": head, "payload": payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path_for(kind, key))
        tmp = None
    except OSError as e:
        _warn_once(f"cannot write to {folder}", e)
        return
    finally:
        if tmp is not None:
            _remove(Path(tmp))
    _evict(folder, kind)


def _evict(folder: Path, kind: str) -> None:
    """Keep the DISK_ENTRIES most recently used entries of `kind`; drop temporary files older than an hour."""
    try:
        entries = sorted(folder.glob(f"{kind}-*.pt"), key=lambda p: p.stat().st_mtime)
        for p in entries[:max(0, len(entries) - DISK_ENTRIES)]:
            _remove(p)
        for p in folder.glob(f".{kind}-*.tmp"):
            if time.time() - p.stat().st_mtime > 3600:
                _remove(p)
    except OSError:
        pass


def get(kind: str, key: str, decode: Callable[[Any], Any]):
    """The value stored under (kind, key) — a fresh copy, so callers may change it — or None."""
    with _lock:
        if (kind, key) in _memory:
            _memory.move_to_end((kind, key))
            return copy.deepcopy(_memory[(kind, key)])
    if mode() != "disk":
        return None
    value = _read(kind, key, decode)
    if value is not None:
        _remember(kind, key, value)
        return copy.deepcopy(value)
    return None


def _remember(kind: str, key: str, value: Any) -> None:
    with _lock:
        _memory[(kind, key)] = copy.deepcopy(value)
        _memory.move_to_end((kind, key))
        while len(_memory) > MEMORY_ENTRIES:
            _memory.popitem(last=False)


def put(kind: str, key: str, value: Any, encode: Callable[[Any], Any], settings: dict) -> None:
    """Store `value` in memory and (unless $EXPLORER_CACHE=memory) on disk as `encode(value)`:
    plain tensors, lists, dicts, strings and numbers."""
    _remember(kind, key, value)
    if mode() == "disk":
        try:
            payload = plain(encode(value))
        except Exception as e:  # noqa: BLE001 - a value that cannot be stored stays in memory only
            _warn_once(f"cannot encode a {kind} result", e)
            return
        _write(kind, key, payload, settings)


def plain(obj: Any) -> Any:
    """`obj` with numpy arrays as tensors and numpy scalars / tuples as Python ones: what
    torch.load(weights_only=True) reads back."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__}")
