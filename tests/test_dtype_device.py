"""Device and dtype correctness of the whole pipeline (analyze, allocate, prune, reconstruct,
recover, evaluate, save, reload).

* bfloat16 on the CPU, every tiny architecture: every metric finite and close to float32, the
  runs stay bfloat16 and land close to the float32 runs, save + reload keeps bfloat16 and the
  logits bit for bit; recovery keeps float32 master weights, LoRA float32 adapters.
* A float64 model: the statistics follow the model's dtype (float64 sums, checked against
  float64 hand computations to 1e-10, which float32 accumulation would miss by 1e-7).
* "The device follows the model", on the CPU: a torch function mode watches every torch call
  the library makes directly and flags factories without `device=`, `.numpy()` of a tensor
  never moved to the CPU, and float64 made inside the analysis before its one move to the CPU.
* CUDA (skipped without a device): the same pipeline on cuda in float32 and bfloat16 for tiny
  models, and on SmolLM2-135M (slow).
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import explorer
from conftest import TINY, tiny_data, tiny_lm
from explorer.allocation import allocate
from explorer.config import METRICS, AllocationConfig, AnalysisConfig, PruneConfig
from explorer.evaluate import accuracy, evaluate, perplexity
from explorer.importance import analyze
from explorer.methods import make_run
from explorer.models import cast_model, load_model, save_model
from explorer.pruning import PruningRun, apply_allocation, plan_keeps
from explorer.reconstruct import reconstruct
from explorer.recovery import recover, recover_steps
from explorer.surgery import widths

NAMES = sorted(TINY)
BF16 = torch.bfloat16
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def float_dtypes(model) -> set:
    return {p.dtype for p in model.parameters() if p.is_floating_point()}


def logits(lm, texts=("w5 w6 w7 w8", "w9 w10 w11")):
    with torch.no_grad():
        return lm.model(**{k: v for k, v in lm.encode(list(texts)).items() if k != "labels"}).logits


def calib(lm, data, n=8):
    texts = data.texts["train"][:n]
    return texts, (data.labels["train"][:n] if lm.task == "classification" else None)


def check_importance(imp, lm) -> None:
    """Every score a finite float64 numpy array on the CPU with the model's shapes."""
    assert set(imp.heads) >= set(METRICS)
    for x in (imp.layer_cos, imp.attn_cos, imp.mlp_cos):
        assert isinstance(x, np.ndarray) and x.dtype == np.float64 and np.isfinite(x).all()
    for b in lm.adapter.blocks(lm.model):
        for m in METRICS:
            for where, n in (("heads", b.attn.n_units * b.heads_per_group), ("groups", b.attn.n_units),
                             ("neurons", b.mlp.n_units)):
                x = getattr(imp, where)[m][b.index]
                assert isinstance(x, np.ndarray) and x.dtype == np.float64, (m, where, type(x))
                assert x.shape == (n,) and np.isfinite(x).all(), (m, where)
    assert isinstance(imp.tokens, int) and imp.tokens > 0
    json.dumps(imp.to_json(all_metrics=True))  # plain Python numbers all the way down


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def quality_of(run) -> float:
    q = run.records[-1].quality
    return q.get("accuracy", q.get("perplexity"))


# --- bfloat16 on the CPU ------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_bf16_analysis_every_metric_matches_float32(name):
    data = tiny_data()
    imps = {}
    for dtype in (torch.float32, BF16):
        lm = tiny_lm(name)
        lm.model.to(dtype)
        imps[dtype] = analyze(lm, *calib(lm, data), AnalysisConfig(batch_size=4), metrics=METRICS)
        check_importance(imps[dtype], lm)
        assert float_dtypes(lm.model) == {dtype}
        assert all(p.grad is None for p in lm.model.parameters())
    a, b = imps[torch.float32], imps[BF16]
    np.testing.assert_allclose(b.layer_cos, a.layer_cos, atol=1e-3)
    assert a.tokens == b.tokens
    for m in METRICS:
        for x, y in zip(a.groups[m] + a.neurons[m], b.groups[m] + b.neurons[m]):
            # bfloat16 weights and activations: ~0.4 % per value; the sums stay within a few %
            assert np.abs(x - y).max() <= 0.05 * np.abs(x).max(), m
        for x, y in zip(a.neurons[m], b.neurons[m]):
            assert spearman(x, y) > 0.98, m


@pytest.mark.parametrize("name", NAMES)
def test_bf16_reconstruct_lora_run_matches_float32_and_reloads_exactly(name, tmp_path):
    data = tiny_data()
    runs = {}
    for dtype in (torch.float32, BF16):
        lm = tiny_lm(name)
        cast_model(lm.model, dtype)
        run = PruningRun(lm, data, AnalysisConfig(samples=8, batch_size=4), AllocationConfig(target=0.4, amplitude=0.1),
                         PruneConfig(stages=2, recovery="reconstruct+lora", recovery_steps=2, train_batch_size=4),
                         timing=False)
        run.run()
        assert run.status == "done", run.error
        runs[dtype] = (lm, run)
    lm, run = runs[BF16]
    assert float_dtypes(lm.model) == {BF16}
    assert not any("lora" in n for n, _ in lm.model.named_parameters())
    for r in run.records:
        assert r.reconstruction and math.isfinite(r.reconstruction["error_ratio"])
        assert r.reconstruction["error_ratio"] <= 1 + 1e-6  # a refit never loses to plain removal
        assert all(math.isfinite(v) for v in r.losses)
        for ph in r.phases.values():
            assert all(math.isfinite(v) for v in ph.values() if isinstance(v, float))
    q16, q32 = quality_of(run), quality_of(runs[torch.float32][1])
    assert math.isfinite(q16)
    if lm.task == "classification":
        assert abs(q16 - q32) <= 0.125  # 2 of the 16 test examples
    else:
        assert abs(q16 / q32 - 1) < 0.02
    before = logits(lm)
    assert before.dtype == BF16
    path = save_model(lm, tmp_path / "bf16")
    again = load_model(str(path), device="cpu")
    assert float_dtypes(again.model) == {BF16}
    assert widths(again.adapter, again.model) == widths(lm.adapter, lm.model)
    assert torch.equal(logits(again), before)


@pytest.mark.parametrize("recovery_", ["kd", "full"])
@pytest.mark.parametrize("name", NAMES)
def test_bf16_training_recoveries_stay_bf16(name, recovery_):
    lm = tiny_lm(name)
    lm.model.to(BF16)
    run = PruningRun(lm, tiny_data(), AnalysisConfig(samples=8, batch_size=4),
                     AllocationConfig(target=0.4, amplitude=0.1),
                     PruneConfig(stages=2, recovery=recovery_, recovery_steps=2, train_batch_size=4), timing=False)
    run.run()
    assert run.status == "done", run.error
    assert float_dtypes(lm.model) == {BF16}
    assert math.isfinite(quality_of(run)) and all(math.isfinite(v) for r in run.records for v in r.losses)


def _update(dtype, recovery_, steps=10):
    lm = tiny_lm("llama")
    w0 = {n: p.detach().to(dtype).double() for n, p in lm.model.named_parameters()}
    cast_model(lm.model, dtype)
    teacher = copy.deepcopy(lm.model)
    recover(lm, tiny_data(), PruneConfig(recovery=recovery_, recovery_steps=steps, train_batch_size=4), teacher=teacher)
    assert float_dtypes(lm.model) == {dtype}
    return {n: p.detach().double() - w0[n] for n, p in lm.model.named_parameters()}


@pytest.mark.parametrize("recovery_", ["full", "kd"])
def test_bf16_fine_tuning_keeps_float32_master_weights(recovery_):
    """AdamW steps of lr 5e-5 on bfloat16 weights of ~0.02 round away (half a bfloat16 ulp is
    6e-5): trained in bfloat16 the update is 73 % off the float32 one (full, 10 steps); with
    float32 master weights it is the float32 update up to the final rounding and the bfloat16
    forward (about 20 %)."""
    ref, got = _update(torch.float32, recovery_), _update(BF16, recovery_)
    err = math.sqrt(sum(float((got[n] - ref[n]).norm() ** 2) for n in ref))
    size = math.sqrt(sum(float(ref[n].norm() ** 2) for n in ref))
    assert err < 0.4 * size, err / size


def test_lora_on_a_bf16_base_trains_float32_adapters():
    lm = tiny_lm("bert")
    lm.model.to(BF16)
    seen = {}
    for step, loss in recover_steps(lm, tiny_data(), PruneConfig(recovery="lora", recovery_steps=2, train_batch_size=4)):
        if step == 1:  # during training: peft's adapters and the trained head in float32, the base bfloat16
            named = dict(lm.model.named_parameters())
            seen["adapters"] = {p.dtype for n, p in named.items() if "lora_" in n}
            seen["head"] = {p.dtype for n, p in named.items() if "modules_to_save" in n}
            seen["base"] = {p.dtype for n, p in named.items() if "base_layer" in n}
        assert math.isfinite(loss)
    assert seen == {"adapters": {torch.float32}, "head": {torch.float32}, "base": {BF16}}
    assert float_dtypes(lm.model) == {BF16} and not any("lora" in n for n, _ in lm.model.named_parameters())


def test_reconstruct_writes_the_models_dtype_back():
    lm, data = tiny_lm("llama"), tiny_data(60)
    cast_model(lm.model, BF16)
    imp = analyze(lm, data.texts["train"][:16], None, AnalysisConfig(batch_size=8), metrics=("magnitude_l1",))
    alloc = allocate(imp.normalized, imp.params, AllocationConfig(target=0.4, mode="uniform"))
    rep = reconstruct(lm, plan_keeps(imp, alloc), data.texts["train"][:30], batch_size=8)
    assert float_dtypes(lm.model) == {BF16}
    assert rep.error_ratio < 1 and torch.isfinite(logits(lm).float()).all()
    assert all(r["lambda"] in (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, math.inf) for layer in rep.layers for r in layer)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_evaluation_is_computed_in_float32(name):
    """Perplexity from float32 cross-entropy (the same as transformers' own upcast loss) and
    accuracy from float32 logits, so the definition does not change with the dtype."""
    lm, data = tiny_lm(name), tiny_data()
    lm.model.to(BF16)
    if lm.task == "classification":
        texts, labels = data.texts["test"], data.labels["test"]
        with torch.no_grad():
            pred = lm.model(**lm.encode(texts)).logits.float().argmax(-1)
        assert accuracy(lm, texts, labels) == float((pred == torch.tensor(labels)).float().mean())
        return
    text = " ".join(data.texts["test"])
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :lm.max_length]
    with torch.no_grad():
        hf = lm.model(input_ids=ids, labels=ids).loss  # transformers upcasts the logits itself
    assert hf.dtype == torch.float32
    ppl = perplexity(lm, [text], max_tokens=ids.shape[1] - 1, window=ids.shape[1])
    assert ppl == pytest.approx(math.exp(float(hf)), rel=1e-5)


def test_load_model_casts_like_transformers(tmp_path):
    """load_model(dtype=...) builds the model in that dtype the way transformers does: RoPE's
    inv_freq stays float32 (model.to(bfloat16) would round it); cast_model does the same."""
    lm = tiny_lm("llama")
    path = save_model(lm, tmp_path / "fp32")
    again = load_model(str(path), device="cpu", dtype="bfloat16")
    assert float_dtypes(again.model) == {BF16}
    assert again.model.model.rotary_emb.inv_freq.dtype == torch.float32
    cast_model(lm.model, BF16)
    assert lm.model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(logits(again), logits(lm))
    assert float_dtypes(load_model(str(path), device="cpu").model) == {torch.float32}  # None keeps what is saved


# --- a float64 model: the statistics follow the model's dtype -------------------------------------

def test_float64_model_accumulates_in_float64():
    from test_importance import TEXTS, reference_layer_cos
    from test_importance_extra import by_unit, hand_fluctuation, lm2, param_grads, run
    lm = lm2("llama")  # GQA: 3 query heads per KV group
    lm.model.double()
    imp = run(lm, METRICS)
    check_importance(imp, lm)
    assert float_dtypes(lm.model) == {torch.float64}
    ref_cos, _ = reference_layer_cos(lm, TEXTS)
    np.testing.assert_allclose(imp.layer_cos, ref_cos, atol=1e-12, rtol=0)
    params, per_batch = param_grads(lm)
    G = {id(p): sum(gb[k] for gb in per_batch) for k, p in enumerate(params)}
    index = {id(p): k for k, p in enumerate(params)}
    fluct = hand_fluctuation(lm)
    for b in lm.adapter.blocks(lm.model):
        for g in (b.attn, b.mlp):
            qpk = b.heads_per_group if g.kind == "attention" else 1
            where = "groups" if g.kind == "attention" else "neurons"
            refs = {
                "magnitude_l1": by_unit(g, qpk, lambda s: s.param.detach().abs()),
                "taylor": by_unit(g, qpk, lambda s: (s.param.detach() * G[id(s.param)]).abs()),
                "fisher": by_unit(g, qpk, lambda s: 0.5 * sum((s.param.detach() * gb[index[id(s.param)]]) ** 2
                                                              for gb in per_batch)),
                "fluctuation": fluct[(b.index, g.kind)],
            }
            for m, (h, grp) in refs.items():
                # float32 sums would be ~1e-7 off; float64 ones agree to rounding
                np.testing.assert_allclose(getattr(imp, where)[m][b.index], grp, rtol=1e-10, err_msg=m)
                if g.kind == "attention":
                    np.testing.assert_allclose(imp.heads[m][b.index], h, rtol=1e-10, err_msg=m)


def test_fluctuation_variance_is_exact_in_float32_for_offset_activations():
    """Channels with a large mean and a small spread (x = 1000 + 0.01·z): E[x²] − E[x]² in float32
    returns noise larger than the variance itself; per-batch centring with Chan's merge stays within
    a fraction of a percent in float32 (the means are only known to float32's 6e-5 at 1000), so the
    fluctuation statistics need no float64 on the device."""
    from explorer.scores import _fluct_sums
    g = torch.Generator().manual_seed(0)
    st, xs = {}, []
    for _ in range(5):
        x = 1000 + 0.01 * torch.randn(3, 7, 4, generator=g)  # (B, T, C) float32
        m = (torch.rand(3, 7, 1, generator=g) > 0.3).float()
        _fluct_sums(st, x, m)
        xs.append(x[m[..., 0].bool()].double())
    assert st["fl_m2"].dtype == torch.float32
    ref = torch.cat(xs).var(0, unbiased=False)  # float64 reference
    torch.testing.assert_close(st["fl_m2"].double() / st["fl_n"].double(), ref, rtol=1e-2, atol=0)
    naive = (torch.cat(xs).float() ** 2).mean(0) - torch.cat(xs).float().mean(0) ** 2
    assert ((naive.double() - ref).abs() > 10 * ref).any()  # what the float32 shortcut would give


def test_float64_model_runs_and_stays_float64():
    lm = tiny_lm("gpt2")
    lm.model.double()
    run = PruningRun(lm, tiny_data(), AnalysisConfig(samples=8, batch_size=4), AllocationConfig(target=0.4),
                     PruneConfig(stages=1, recovery="reconstruct+full", recovery_steps=1, train_batch_size=4),
                     timing=False)
    run.run()
    assert run.status == "done", run.error
    assert float_dtypes(lm.model) == {torch.float64} and math.isfinite(quality_of(run))


# --- the device follows the model (checked on the CPU) -----------------------------------------------

LIB = os.path.dirname(os.path.abspath(explorer.__file__)) + os.sep
PLUMBING = tuple(os.path.join(os.path.dirname(torch.__file__), f) for f in ("overrides.py", "_tensor.py"))
# The analysis pass: the whole-model loop (importance.py) and the hooks and reductions both passes share (scores.py).
ANALYSIS_FILES = ("importance.py", "scores.py")
FACTORIES = {"zeros", "ones", "full", "empty", "arange", "tensor", "as_tensor", "eye", "linspace", "rand", "randn",
             "randint", "randperm"}


def _to_cpu(x) -> bool:
    """A deliberate move: `.to("cpu", ...)` with the string (the library's convention; a move to
    `lm.device`, a torch.device that is the CPU here, must not count)."""
    return isinstance(x, str) and x == "cpu"


class Watch(TorchFunctionMode):
    """Records every torch call made directly by the library (a frame in explorer/) that would
    misplace a tensor on an accelerator: a factory without `device=` (it lands on the CPU),
    `.numpy()` of a tensor the library never moved with `.cpu()` / `.to("cpu")` (fails on a GPU), and
    in the analysis a float64 tensor made from non-float64 ones anywhere but in its one move to
    the CPU (`scores.to_cpu64`). Tensors computed from moved ones count as moved."""

    def __init__(self):
        super().__init__()
        self.host: dict[int, weakref.ref] = {}
        self.problems: set[str] = set()
        self.calls = 0

    def _is_host(self, t) -> bool:
        r = self.host.get(id(t))
        return r is not None and r() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        f = sys._getframe(1)
        while f is not None and f.f_code.co_filename in PLUMBING:
            f = f.f_back
        lib = f is not None and f.f_code.co_filename.startswith(LIB)
        moved = lib and (name == "cpu" or (name == "to" and any(_to_cpu(x) for x in tree_leaves((args[1:], kwargs)))))
        if moved or any(self._is_host(t) for t in tensors):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.host[id(t)] = weakref.ref(t)
        if not lib:
            return out
        self.calls += 1
        where = f"{f.f_code.co_filename[len(LIB):]}:{f.f_lineno} ({f.f_code.co_name})"
        if name in FACTORIES and "device" not in kwargs:
            self.problems.add(f"{where}: torch.{name} without device=")
        if name == "numpy" and tensors and not self._is_host(tensors[0]):
            self.problems.add(f"{where}: .numpy() of a tensor that was never moved to the CPU")
        if (f.f_code.co_filename.endswith(ANALYSIS_FILES) and f.f_code.co_name != "to_cpu64"
                and isinstance(out, torch.Tensor) and out.dtype == torch.float64
                and not any(t.dtype == torch.float64 for t in tensors)):
            self.problems.add(f"{where}: float64 {name} inside the analysis (before the move to the CPU)")
        return out


def test_watch_catches_what_it_should():
    """The checker itself: a CPU factory, a .numpy() of an unmoved tensor, float64 in the pass."""
    from explorer import importance

    def bad(x):
        return torch.zeros(3), x.numpy(), x.double(), x.cpu().numpy(), torch.zeros(3, device=x.device)
    bad.__code__ = bad.__code__.replace(co_filename=importance.__file__)
    with Watch() as w:
        bad(torch.ones(3))
    assert len(w.problems) == 3, w.problems
    assert {p.split(": ", 1)[1].split()[0] for p in w.problems} == {"torch.zeros", ".numpy()", "float64"}


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_library_tensors_follow_the_model(name):
    """analyze (every metric), a reconstruct + kd run, a LoRA run and APT (soft masks, full
    fine-tuning), under the watch: no tensor placed by the library ignores the model's device."""
    data = tiny_data(60)
    lm = tiny_lm(name)
    cfg = dict(stages=1, recovery_steps=1, train_batch_size=4)
    with Watch() as w:
        imp = analyze(lm, *calib(lm, data), AnalysisConfig(batch_size=4), metrics=METRICS)
        for recovery_ in ("reconstruct+kd", "lora"):
            PruningRun(tiny_lm(name), data, AnalysisConfig(samples=8, batch_size=4), AllocationConfig(target=0.3),
                       PruneConfig(recovery=recovery_, **cfg), timing=False).run()
        apt = make_run("apt", tiny_lm(name), data, AnalysisConfig(samples=8, batch_size=4),
                       AllocationConfig(target=0.3), PruneConfig(recovery="full", **cfg), timing=False)
        apt.run()
    assert apt.status == "done", apt.error
    assert w.calls > 100, "the watch saw no library calls"
    assert not w.problems, "\n".join(sorted(w.problems))
    check_importance(imp, lm)


# --- CUDA ------------------------------------------------------------------------------------------

def _on_cuda(lm, dtype):
    cast_model(lm.model, dtype)
    lm.model.to("cuda")
    return replace(lm, device=torch.device("cuda"))


def _cuda_pipeline(lm, data, tmp_path, dtype, target=0.4, n=16, eval_samples=0, timing=False, dev="cuda"):
    """load (done by the caller) -> analyze -> allocate -> prune -> reconstruct -> recover ->
    evaluate -> save -> reload, all on cuda; timing only for real models (the tiny ones have 64
    positions, latency uses 128)."""
    texts, labels = calib(lm, data, n)
    assert {p.device.type for p in lm.model.parameters()} == {dev}
    dense = evaluate(lm, data, eval_samples, timing=timing)
    # analyze: every metric
    imp = analyze(lm, texts, labels, AnalysisConfig(batch_size=4), metrics=METRICS)
    check_importance(imp, lm)
    # allocate, then prune a copy plainly and reconstruct the model itself
    alloc = allocate(imp.normalized, imp.params, AllocationConfig(target=target), scores=imp.unit_scores())
    cut = replace(lm, model=copy.deepcopy(lm.model))
    apply_allocation(cut, imp, alloc)
    assert torch.isfinite(logits(cut).float()).all()
    rep = reconstruct(lm, plan_keeps(imp, alloc), data.texts["train"][:2 * n], batch_size=4)
    assert rep.error_ratio <= 1 + 1e-6
    units = lambda m: [(w["groups"], w["neurons"]) for w in widths(m.adapter, m.model)]  # noqa: E731
    assert units(lm) == units(cut)  # (LLaMA gains output biases for the refit: params differ)
    # recover: LoRA, then distillation from the dense model
    teacher = copy.deepcopy(lm.model)
    for recovery_ in ("lora", "kd"):
        losses = recover(lm, data, PruneConfig(recovery=recovery_, recovery_steps=2, train_batch_size=4), teacher=teacher)
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert float_dtypes(lm.model) == {dtype} and {p.device.type for p in lm.model.parameters()} == {dev}
    ev = evaluate(lm, data, eval_samples, timing=timing)
    key = "accuracy" if lm.task == "classification" else "perplexity"
    assert math.isfinite(ev[key]) and ev["params"] < dense["params"]
    assert not timing or (ev["peak_memory_mb"] > 0 and ev["latency_ms"] > 0)
    # a whole run too
    run = PruningRun(lm, data, AnalysisConfig(samples=n, batch_size=4), AllocationConfig(target=0.2),
                     PruneConfig(stages=1, recovery="reconstruct+lora", recovery_steps=2, train_batch_size=4,
                                 eval_samples=eval_samples), timing=False)
    run.run()
    assert run.status == "done", run.error
    # save, reload on cuda: same dtype, same logits
    before = logits(lm)
    path = save_model(lm, tmp_path / "cuda")
    again = load_model(str(path), device=dev)
    assert float_dtypes(again.model) == {dtype}
    assert {p.device.type for p in again.model.parameters()} == {dev}
    assert torch.equal(logits(again), before)
    return dense, ev


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_cuda_pipeline_tiny(name, dtype, tmp_path):
    src = save_model(tiny_lm(name), tmp_path / "src")  # load -> ... from a saved directory
    lm = load_model(str(src), device="cuda", dtype="bfloat16" if dtype == BF16 else "float32")
    assert float_dtypes(lm.model) == {dtype} and lm.device.type == "cuda"
    _cuda_pipeline(lm, tiny_data(), tmp_path, dtype)


@cuda
def test_cuda_tiny_model_moved_by_hand():
    """A LoadedModel moved with .to('cuda') (not via load_model): analyze and a run still work."""
    lm = _on_cuda(tiny_lm("gpt2"), BF16)
    data = tiny_data()
    check_importance(analyze(lm, *calib(lm, data), AnalysisConfig(batch_size=4), metrics=METRICS), lm)
    run = make_run("apt", lm, data, AnalysisConfig(samples=8, batch_size=4), AllocationConfig(target=0.3),
                   PruneConfig(stages=1, recovery="full", recovery_steps=1, train_batch_size=4), timing=False)
    run.run()
    assert run.status == "done", run.error
    assert float_dtypes(lm.model) == {BF16}


@cuda
@pytest.mark.slow
def test_cuda_smollm2_bf16_pipeline(tmp_path):
    from explorer.data import load_data
    lm = load_model("smollm2-135m", device="cuda", dtype="auto")
    assert float_dtypes(lm.model) == {BF16}
    lm = replace(lm, max_length=64)
    data = load_data(lm.default_data, max_examples=64)
    dense, ev = _cuda_pipeline(lm, data, tmp_path, BF16, target=0.2, n=8, eval_samples=2048, timing=True)
    # a sanity bound (20 % cut from 8 short calibration texts, two LoRA steps), not a quality claim
    assert ev["perplexity"] < 10 * dense["perplexity"], (dense["perplexity"], ev["perplexity"])


def test_device_map_loading_through_accelerate_then_the_pipeline(tmp_path):
    """device_map="auto" (accelerate's big-model placement; all on the CPU here, the only device): the
    model loads where accelerate puts it, and analysis, a cut and evaluation run on it."""
    pytest.importorskip("accelerate")
    from conftest import tiny_data, tiny_lm
    from explorer.allocation import allocate
    from explorer.config import AllocationConfig, AnalysisConfig
    from explorer.errors import ModelError
    from explorer.evaluate import quality
    from explorer.importance import analyze
    from explorer.models import load_model
    from explorer.pruning import apply_allocation
    src = tiny_lm("llama")
    src.model.save_pretrained(tmp_path / "plain")
    src.tokenizer.save_pretrained(tmp_path / "plain")
    lm = load_model(str(tmp_path / "plain"), device_map="auto", dtype="float32")
    assert lm.device.type == "cpu" and all(p.device == lm.device for p in lm.model.parameters())
    data = tiny_data()
    texts, labels = data.calibration(8, stage=0)
    imp = analyze(lm, texts, labels, AnalysisConfig(samples=8, batch_size=4))
    alloc = allocate(imp.normalized_by("maxabs"), imp.params, AllocationConfig(target=0.3), scores=imp.unit_scores())
    apply_allocation(lm, imp, alloc)
    assert lm.block_params < src.block_params and quality(lm, data, 32, "val")["perplexity"] > 0
    with pytest.raises(ModelError, match="device_map is for plain"):
        load_model("smollm2-135m", device_map="auto")
