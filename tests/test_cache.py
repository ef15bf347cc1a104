"""The result cache (explorer.cache) behind `importance.analyze` and `evaluate.evaluate`'s quality:
a second analysis of the same weights, texts and settings runs no pass and returns the same numbers;
any change of a weight, a text, a label or the metrics misses; stale, foreign, corrupted or
half-written entries are refused and recomputed; an unwritable cache folder costs the cache, not
the result; timings are always measured."""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import tiny_data, tiny_lm
from explorer import cache
from explorer import evaluate as E
from explorer import importance as I
from explorer.config import AnalysisConfig
from explorer.errors import Cancelled
from explorer.importance import analyze

TEXTS = [" ".join(f"w{3 + (7 * i + 5 * j) % 117}" for j in range(3 + i % 9)) for i in range(10)]
LABELS = [i % 2 for i in range(10)]
CFG = AnalysisConfig(batch_size=4, metric="taylor")


@pytest.fixture(autouse=True)
def cache_here(tmp_path, monkeypatch):
    """Every test's cache in its own folder (never the user's home), switched on, memory empty."""
    d = tmp_path / "cache"
    monkeypatch.setenv(cache.DIR_ENV, str(d))
    monkeypatch.setenv(cache.SWITCH_ENV, "1")
    monkeypatch.setattr(cache, "_warned", set())
    cache.clear_memory()
    yield d
    cache.clear_memory()


@pytest.fixture
def passes(monkeypatch):
    """Counts of the whole-model analysis pass and of the model's forward calls."""
    n = {"pass": 0, "forward": 0}
    real = I._analyze_pass

    def counted(*a, **k):
        n["pass"] += 1
        return real(*a, **k)
    monkeypatch.setattr(I, "_analyze_pass", counted)
    return n


def count_forwards(monkeypatch, lm, n):
    """Count forward calls at the class level (an instance-level forward would make the model uncacheable)."""
    cls = type(lm.model)
    real = cls.forward

    def forward(self, *a, **k):
        n["forward"] += 1
        return real(self, *a, **k)
    monkeypatch.setattr(cls, "forward", forward)


def labels_for(lm):
    return LABELS if lm.task == "classification" else None


def assert_identical(a, b):
    for name in ("layer_cos", "attn_cos", "mlp_cos"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for kind in ("heads", "groups", "neurons"):
        da, db = getattr(a, kind), getattr(b, kind)
        assert list(da) == list(db)
        for m in da:
            assert len(da[m]) == len(db[m])
            for x, y in zip(da[m], db[m]):
                assert x.dtype == y.dtype and x.shape == y.shape
                np.testing.assert_array_equal(x, y)
    assert (a.samples, a.tokens, a.params, a.batch_size) == (b.samples, b.tokens, b.params, b.batch_size)


def entries(d):
    return sorted(d.glob("importance-*.pt")) if d.exists() else []


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_second_analysis_runs_no_pass(arch, passes, monkeypatch, cache_here):
    lm = tiny_lm(arch)
    count_forwards(monkeypatch, lm, passes)
    first = analyze(lm, TEXTS, labels_for(lm), CFG)
    assert passes["pass"] == 1 and passes["forward"] == 3 and not first.cached  # 10 texts, batches of 4
    assert len(entries(cache_here)) == 1
    seen = []
    second = analyze(lm, TEXTS, labels_for(lm), CFG, progress=lambda i, n: seen.append((i, n)))
    assert passes == {"pass": 1, "forward": 3}, "the second analysis ran the model"
    assert second.cached and second.seconds == first.seconds and seen == [(3, 3)]
    assert_identical(first, second)
    cache.clear_memory()  # a new process: read back from the file
    third = analyze(lm, TEXTS, labels_for(lm), CFG)
    assert passes == {"pass": 1, "forward": 3} and third.cached
    assert_identical(first, third)
    # another chosen metric among the same ones: the same entry, the caller's metric
    other = analyze(lm, TEXTS, labels_for(lm), replace(CFG, metric="fisher"))
    assert passes["pass"] == 1 and other.metric == "fisher" and other.cached


def test_a_reused_result_is_a_copy(passes):
    lm = tiny_lm("llama")
    first = analyze(lm, TEXTS, None, CFG)
    keep = first.heads["taylor"][0].copy()
    first.heads["taylor"][0][:] = -1  # callers may change what they got
    second = analyze(lm, TEXTS, None, CFG)
    second.neurons["taylor"][1][:] = -1
    third = analyze(lm, TEXTS, None, CFG)
    assert passes["pass"] == 1
    np.testing.assert_array_equal(third.heads["taylor"][0], keep)
    assert (third.neurons["taylor"][1] != -1).all()


def test_any_change_misses(passes):
    lm = tiny_lm("bert")
    base = analyze(lm, TEXTS, LABELS, CFG)
    n = 1

    def misses(*a, **k):
        nonlocal n
        imp = analyze(*a, **k)
        n += 1
        assert passes["pass"] == n and not imp.cached
        return imp

    misses(lm, TEXTS[:-1] + [TEXTS[-1] + " w5"], LABELS, CFG)  # one text
    misses(lm, TEXTS, LABELS[:-1] + [1 - LABELS[-1]], CFG)  # one label
    misses(lm, TEXTS, LABELS, CFG, metrics=("taylor", "magnitude_l1"))  # the metrics asked for
    misses(lm, TEXTS, LABELS, replace(CFG, batch_size=5))  # the batches (fisher, act_grad sum per batch)
    misses(lm, TEXTS, LABELS, replace(CFG, max_length=6))  # the tokens per sample
    w = lm.adapter.blocks(lm.model)[1].mlp.slices[0].param
    with torch.no_grad():  # the smallest possible change of one weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    changed = misses(lm, TEXTS, LABELS, CFG)
    assert changed.layer_cos.shape == base.layer_cos.shape
    again = analyze(lm, TEXTS, LABELS, CFG)  # the changed model's own entry
    assert again.cached and passes["pass"] == n
    assert_identical(changed, again)


def test_fingerprint_is_exact_and_copies_share_it():
    lm = tiny_lm("llama")
    fp = cache.model_fingerprint(lm)
    twin = copy.deepcopy(lm)  # what a run works on: a copy of the dense model
    assert cache.model_fingerprint(twin) == fp
    with torch.no_grad():
        next(twin.model.parameters()).view(-1)[7] += 1e-6
    assert cache.model_fingerprint(twin)["weights"] != fp["weights"]
    half = copy.deepcopy(lm)
    half.model.to(torch.bfloat16)
    assert cache.model_fingerprint(half)["dtype"] != fp["dtype"]


KEY_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_lm
from explorer.config import AnalysisConfig
from explorer.importance import analyze
from explorer import cache
lm = tiny_lm("bert")
imp = analyze(lm, {texts!r}, {labels!r}, AnalysisConfig(batch_size=4, metric="taylor"))
print("CACHED" if imp.cached else "COMPUTED")
"""


def test_another_process_finds_the_entry(tmp_path, cache_here):
    """The key is the same in a new process with another hash seed (nothing in it depends on
    set order or object ids): the entry written here is read there."""
    import subprocess
    import sys
    from pathlib import Path
    lm = tiny_lm("bert")
    analyze(lm, TEXTS, LABELS, CFG)
    script = KEY_SCRIPT.format(tests=str(Path(__file__).parent), texts=TEXTS, labels=LABELS)
    env = {**os.environ, "PYTHONHASHSEED": "123", cache.DIR_ENV: str(cache_here), cache.SWITCH_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "CACHED"


def test_hooks_make_a_model_uncacheable(passes, cache_here):
    lm = tiny_lm("llama")
    h = lm.adapter.blocks(lm.model)[0].mlp.out_module.register_forward_pre_hook(lambda m, a: (a[0] * 0,))
    analyze(lm, TEXTS, None, CFG)
    analyze(lm, TEXTS, None, CFG)
    assert passes["pass"] == 2 and not entries(cache_here)
    h.remove()
    analyze(lm, TEXTS, None, CFG)
    assert analyze(lm, TEXTS, None, CFG).cached and passes["pass"] == 3


def test_switches(passes, monkeypatch, cache_here):
    lm = tiny_lm("llama")
    analyze(lm, TEXTS, None, CFG, cache=False)
    analyze(lm, TEXTS, None, CFG, cache=False)
    assert passes["pass"] == 2 and not entries(cache_here)
    monkeypatch.setenv(cache.SWITCH_ENV, "0")
    analyze(lm, TEXTS, None, CFG)
    analyze(lm, TEXTS, None, CFG)
    assert passes["pass"] == 4 and not entries(cache_here)
    monkeypatch.setenv(cache.SWITCH_ENV, "memory")
    analyze(lm, TEXTS, None, CFG)
    assert analyze(lm, TEXTS, None, CFG).cached
    assert passes["pass"] == 5 and not entries(cache_here)


def test_a_stop_before_a_reused_result_still_cancels():
    lm = tiny_lm("llama")
    analyze(lm, TEXTS, None, CFG)
    with pytest.raises(Cancelled):
        analyze(lm, TEXTS, None, CFG, should_stop=lambda: True)


def test_streamed_analysis_is_cached_separately(passes, monkeypatch):
    import explorer.stream as S
    calls = []
    real = S.analyze_streamed
    monkeypatch.setattr(S, "analyze_streamed", lambda *a, **k: calls.append(1) or real(*a, **k))
    lm = tiny_lm("llama")
    cfg = AnalysisConfig(batch_size=4, metric="fluctuation", streamed=True)
    first = analyze(lm, TEXTS, None, cfg)
    second = analyze(lm, TEXTS, None, cfg)
    assert calls == [1] and second.cached
    assert_identical(first, second)
    whole = analyze(lm, TEXTS, None, replace(cfg, streamed=False), metrics=tuple(S.STREAMED_METRICS))
    assert passes["pass"] == 1 and not whole.cached  # whole-model analysis is its own entry


# --- stale, foreign and broken entries -------------------------------------------------------

def _one_entry(lm, d):
    analyze(lm, TEXTS, None, CFG)
    (path,) = entries(d)
    cache.clear_memory()
    return path


def _recomputed(lm, path, passes, before: int):
    imp = analyze(lm, TEXTS, None, CFG)
    assert passes["pass"] == before + 1 and not imp.cached, "a bad entry was used"
    d = torch.load(path, weights_only=True)  # replaced by a good one
    assert d["header"]["version"] == cache.CACHE_VERSION and d["header"]["key"] == path.stem.split("-", 1)[1]
    cache.clear_memory()
    assert analyze(lm, TEXTS, None, CFG).cached and passes["pass"] == before + 1
    return imp


def test_header_of_another_version_or_key_is_refused(passes, cache_here):
    lm = tiny_lm("llama")
    path = _one_entry(lm, cache_here)
    good = torch.load(path, weights_only=True)
    bad = copy.deepcopy(good)
    bad["header"]["version"] = cache.CACHE_VERSION + 1
    torch.save(bad, path)
    _recomputed(lm, path, passes, 1)
    cache.clear_memory()
    bad = copy.deepcopy(good)
    bad["header"]["key"] = "0" * 64  # a file renamed or copied under another entry's name
    torch.save(bad, path)
    _recomputed(lm, path, passes, 2)
    cache.clear_memory()
    bad = copy.deepcopy(good)
    bad["header"]["kind"] = "quality"
    torch.save(bad, path)
    _recomputed(lm, path, passes, 3)


def test_another_cache_version_misses(passes, monkeypatch, cache_here):
    lm = tiny_lm("llama")
    _one_entry(lm, cache_here)
    monkeypatch.setattr(cache, "CACHE_VERSION", cache.CACHE_VERSION + 1)
    assert not analyze(lm, TEXTS, None, CFG).cached and passes["pass"] == 2
    assert len(entries(cache_here)) == 2


@pytest.mark.parametrize("damage", ["garbage", "half", "empty", "payload"])
def test_corrupted_or_half_written_entries_are_refused(damage, passes, cache_here):
    lm = tiny_lm("llama")
    path = _one_entry(lm, cache_here)
    raw = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a cache entry" * 100)
    elif damage == "half":
        path.write_bytes(raw[:len(raw) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a well-formed file whose payload is not an Importance
        d = torch.load(path, weights_only=True)
        d["payload"] = {"layer_cos": [1.0]}
        torch.save(d, path)
    _recomputed(lm, path, passes, 1)


class Planted:
    """A pickle that would run code when loaded without weights_only."""
    ran: list = []

    def __reduce__(self):
        return (Planted.ran.append, ("ran",))


def test_a_planted_pickle_is_never_run(passes, cache_here):
    lm = tiny_lm("llama")
    path = _one_entry(lm, cache_here)
    d = torch.load(path, weights_only=True)
    d["payload"] = Planted()
    torch.save(d, path)
    _recomputed(lm, path, passes, 1)
    assert Planted.ran == []


def test_an_unwritable_cache_folder_costs_the_cache_not_the_result(passes, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(cache.DIR_ENV, str(blocker / "cache"))  # a folder inside a file: never creatable (even as root)
    lm = tiny_lm("llama")
    with pytest.warns(RuntimeWarning, match="cannot write"):
        first = analyze(lm, TEXTS, None, CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert analyze(lm, TEXTS, None, replace(CFG, batch_size=5)).batch_size == 5
        second = analyze(lm, TEXTS, None, CFG)  # still reused from memory
    assert second.cached and passes["pass"] == 2
    assert_identical(first, second)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_cache_folder(passes, cache_here):
    cache_here.mkdir()
    cache_here.chmod(0o555)
    try:
        lm = tiny_lm("llama")
        with pytest.warns(RuntimeWarning):
            analyze(lm, TEXTS, None, CFG)
        assert not entries(cache_here)
    finally:
        cache_here.chmod(0o755)


def test_disk_keeps_the_most_recent_entries(passes, monkeypatch, cache_here):
    monkeypatch.setattr(cache, "DISK_ENTRIES", 2)
    lm = tiny_lm("llama")
    for k in range(2):  # two entries, the first used longest ago
        seen = set(entries(cache_here))
        analyze(lm, TEXTS[k:], None, CFG)
        (new,) = set(entries(cache_here)) - seen
        os.utime(new, (1000 * (k + 1),) * 2)
    analyze(lm, TEXTS[2:], None, CFG)
    assert len(entries(cache_here)) == 2
    cache.clear_memory()
    assert analyze(lm, TEXTS[2:], None, CFG).cached and analyze(lm, TEXTS[1:], None, CFG).cached
    assert not analyze(lm, TEXTS, None, CFG).cached and passes["pass"] == 4


# --- evaluation: the quality is reused, timings are measured -----------------------------------

def test_evaluate_reuses_quality_and_measures_timings(monkeypatch):
    lm, data = tiny_lm("llama"), tiny_data()
    n = {"quality": 0, "latency": 0}
    real_q, real_l = E.quality, E.latency

    def quality(*a, **k):
        n["quality"] += 1
        return real_q(*a, **k)

    def latency(*a, **k):
        n["latency"] += 1
        return real_l(*a, **k)
    monkeypatch.setattr(E, "quality", quality)
    monkeypatch.setattr(E, "latency", latency)
    kw = dict(batch_size=2, seq_len=8)
    first = E.evaluate(lm, data, **kw)
    second = E.evaluate(lm, data, **kw)
    assert n == {"quality": 1, "latency": 2}
    assert "quality_cached" not in first and second["quality_cached"] is True
    assert second["perplexity"] == first["perplexity"] and second["eval_tokens"] == first["eval_tokens"]
    assert "latency_ms" in second
    E.evaluate(lm, data, split="val", timing=False)  # another split
    E.evaluate(lm, data, eval_samples=8, timing=False)  # another number of tokens
    E.evaluate(lm, data, timing=False, cache=False)
    assert n["quality"] == 4
    with torch.no_grad():
        lm.model.lm_head.weight[3, 3] += 1e-3
    assert "quality_cached" not in E.evaluate(lm, data, timing=False) and n["quality"] == 5


def test_evaluate_classifier_accuracy_is_reused():
    lm, data = tiny_lm("bert"), tiny_data()
    first = E.evaluate(lm, data, timing=False)
    second = E.evaluate(lm, data, timing=False)
    assert second.pop("quality_cached") is True and second == first
    data.labels["test"][0] = 1 - data.labels["test"][0]
    assert "quality_cached" not in E.evaluate(lm, data, timing=False)
