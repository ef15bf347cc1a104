"""The faster refit (explorer/reconstruct.py): the λ search from one eigendecomposition against
one Cholesky solve per λ, float32 where the refit uses it against float64, the in-place OBS
updates against the plain ones, token weights from the projection's own output, and the
stream moved on by the refit projection's output change (no third pass of the block) against
running the block again.

Tolerances (float32 machine epsilon 6e-8, float64 1e-16):
  * eigenbasis in float64: the same numbers as the direct solves up to float64 rounding (1e-9
    of the held-out energy; seen: 1e-15).
  * the λ search in float32 (`SEARCH_DTYPE`): its errors only rank the candidates; they must stay
    within 1e-5 of the held-out energy of the direct float64 ones (seen: ≤ 3e-7 on data
    conditioned up to 1e6), while neighbouring candidates differ by ≥ 3e-5 of it on the same data
    (and by 1e-5 .. 1e-3 on SmolLM2's projections), so the choice is the same wherever the
    choice matters; on a well-conditioned problem the chosen λ is identical. The weights
    written back are float64 solves whatever the search's dtype.
  * Gram accumulation in float32 (a float32 product per batch, float64 totals): the calibration
    error of the refit from float32 statistics within 1e-3 relative of the float64 one (seen: ≤
    1.1e-4 with means 3x the spread, massive tokens and condition numbers up to 1e6: centring
    cancels digits), the weights within 1e-2 relative (seen: ≤ 8e-4).
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_data, tiny_lm

from explorer import reconstruct as R


def _problem(seed: int, n: int = 4000, c: int = 96, out: int = 40, cond: float = 1e4, mean: float = 3.0):
    """Correlated, ill-conditioned activations (singular values over `cond`, a mean `mean` times
    the spread, every 97th token 30x larger), a dense projection and relative token weights."""
    g = torch.Generator().manual_seed(seed)
    spec = torch.logspace(0, -math.log10(cond), c, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))[0]
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * spec) @ mix.T \
        + mean * torch.randn(c, generator=g, dtype=torch.float64)
    x[::97] *= 30
    W = torch.randn(out, c, generator=g, dtype=torch.float64) / math.sqrt(c)
    b = torch.randn(out, generator=g, dtype=torch.float64) * 0.1
    e = ((x @ W.T + b) ** 2).mean(1)
    return x, W, b, 1 / (e + e.mean())


def _stats(x, w, held, dtype=torch.float64):
    fit, hold = R.GramStats.zeros(x.shape[1]), R.GramStats.zeros(x.shape[1])
    fit.add(x[~held].to(dtype), w[~held].to(dtype))
    hold.add(x[held].to(dtype), w[held].to(dtype))
    return fit, hold


def _direct(W, b, fit, held, keep, fit_bias):
    """The reference: one Cholesky solve per λ, each scored on the held-out statistics."""
    return {lam: R.error(W, b, *R.refit(W, b, fit, keep, lam, fit_bias), held, keep, constant=False)
            for lam in R.LAMBDA_GRID}


KEEP = torch.tensor([i for i in range(96) if i % 3])  # 64 of 96 channels


@pytest.mark.parametrize("fit_bias", [True, False])
@pytest.mark.parametrize("cond", [1e2, 1e6])
def test_eigenbasis_weights_equal_the_cholesky_solve_for_every_lambda(fit_bias, cond):
    x, W, b, w = _problem(0, cond=cond)
    fit, _ = _stats(x, w, torch.arange(len(x)) % 5 == 4)
    path = R.ridge_path(W, b, fit, KEEP, fit_bias)
    assert set(path) == set(R.LAMBDA_GRID)
    for lam, (Wn, bn) in path.items():
        Wd, bd = R.refit(W, b, fit, KEEP, lam, fit_bias)
        torch.testing.assert_close(Wn, Wd, rtol=1e-6, atol=1e-9 * float(Wd.abs().max()))
        if fit_bias:
            torch.testing.assert_close(bn, bd, rtol=1e-6, atol=1e-9 * float(bd.abs().max()))
        else:
            assert bn is b


@pytest.mark.parametrize("fit_bias", [True, False])
@pytest.mark.parametrize("seed,cond", [(0, 1e2), (1, 1e4), (2, 1e6)])
def test_heldout_errors_match_direct_solves(seed, cond, fit_bias):
    x, W, b, w = _problem(seed, cond=cond)
    fit, held = _stats(x, w, torch.arange(len(x)) % 5 == 4)
    direct = _direct(W, b, fit, held, KEEP, fit_bias)
    scale = R.Problem.of(W, held, KEEP).energy()  # held-out tr(W G Wᵀ): what the errors are made of
    e64 = R.heldout_errors(W, b, fit, held, KEEP, fit_bias, dtype=torch.float64)
    e32 = R.heldout_errors(W, b, fit, held, KEEP, fit_bias, dtype=torch.float32)
    assert set(e64) == set(e32) == set(R.LAMBDA_GRID)
    for lam in R.LAMBDA_GRID:
        assert abs(e64[lam] - direct[lam]) <= 1e-9 * scale, (lam, e64[lam], direct[lam])
        assert abs(e32[lam] - direct[lam]) <= 1e-5 * scale, (lam, e32[lam], direct[lam])
    assert min(e32, key=e32.get) == min(direct, key=direct.get)


@pytest.mark.parametrize("fit_bias", [True, False])
def test_float32_search_chooses_the_same_lambda_on_a_well_conditioned_problem(fit_bias):
    """Few fit tokens for the channels (the ridge matters: an interior λ wins), moderate
    condition: the float32 search picks exactly the λ the float64 direct solves pick, and
    `choose_lambda` returns it with its errors."""
    g = torch.Generator().manual_seed(5)
    c = 40
    mix = torch.eye(c, dtype=torch.float64) + 0.3 * torch.randn(c, c, generator=g, dtype=torch.float64)
    x_fit = torch.randn(60, c, generator=g, dtype=torch.float64) @ mix + 0.5
    x_held = torch.randn(400, c, generator=g, dtype=torch.float64) @ mix + 0.5
    W = torch.randn(6, c, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    fit, held = R.GramStats.zeros(c), R.GramStats.zeros(c)
    fit.add(x_fit)
    held.add(x_held)
    keep = torch.arange(0, c, 2)
    direct = _direct(W, b, fit, held, keep, fit_bias)
    want = min(direct, key=lambda k: (direct[k], -k))
    assert R.LAMBDA_GRID[0] < want < math.inf  # an interior choice: the test can tell λs apart
    lam, errs = R.choose_lambda(W, b, fit, held, keep, fit_bias)
    assert lam == want
    for k in R.LAMBDA_GRID:
        assert errs[k] == pytest.approx(direct[k], rel=1e-5, abs=1e-6 * abs(direct[want]))


def test_no_heldout_samples_choose_bias_compensation_only():
    """Held-out statistics empty (fewer samples than HOLDOUT): every error 0, the tie goes to
    the strongest ridge (∞), as with one solve per λ."""
    x, W, b, w = _problem(3, n=500)
    fit, held = _stats(x, w, torch.zeros(len(x), dtype=torch.bool))
    assert held.n == 0
    lam, errs = R.choose_lambda(W, b, fit, held, KEEP, True)
    assert lam == math.inf and set(errs.values()) == {0.0}


@pytest.mark.parametrize("seed,cond", [(0, 1e2), (1, 1e4), (2, 1e6)])
def test_float32_gram_accumulation_is_exact_enough(seed, cond):
    x, W, b, w = _problem(seed, cond=cond)
    held = torch.arange(len(x)) % 5 == 4
    f64, h64 = _stats(x, w, held)
    f32, h32 = _stats(x, w, held, torch.float32)  # what GramStats.add does with float32 activations
    exact = R.Problem.of(W, f64 + h64, KEEP)
    for lam in R.LAMBDA_GRID:
        W64, b64 = R.refit(W, b, f64 + h64, KEEP, lam, True)
        W32, b32 = R.refit(W, b, f32 + h32, KEEP, lam, True)
        e64, e32 = R.error(W, b, W64, b64, exact, KEEP), R.error(W, b, W32, b32, exact, KEEP)
        assert abs(e32 - e64) <= 1e-3 * e64, (lam, e32, e64)
        assert float((W32 - W64).norm()) <= 1e-2 * float(W64.norm()), lam


def _obs_reference(W, st, n_units, size, n_keep, centred, damp=0.01):
    """obs_select as it was written first (new tensors at every update)."""
    G = st.G - torch.outer(st.s, st.s) / max(st.n, 1.0) if centred else st.G
    H = G + torch.eye(G.shape[0], dtype=G.dtype) * damp * float(G.diagonal().mean())
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    Wc = W.clone()
    alive = list(range(n_units))
    while len(alive) > n_keep:
        if size == 1:
            idx = torch.tensor(alive)
            cost = Wc[:, idx].pow(2).sum(0) / Hinv.diagonal()[idx]
            k = min(len(alive) - n_keep, max(1, math.ceil((n_units - n_keep) / 16)))
            Rm = idx[cost.argsort()[:k]]
            inv = torch.linalg.inv(Hinv[Rm][:, Rm])
            Wc -= Wc[:, Rm] @ inv @ Hinv[Rm]
            Hinv -= Hinv[:, Rm] @ inv @ Hinv[Rm]
            gone = set(Rm.tolist())
            alive = [j for j in alive if j not in gone]
            continue
        costs = []
        for u in alive:
            c = slice(u * size, (u + 1) * size)
            costs.append(float((Wc[:, c] @ torch.linalg.inv(Hinv[c, c]) * Wc[:, c]).sum()))
        u = alive[min(range(len(alive)), key=costs.__getitem__)]
        c = slice(u * size, (u + 1) * size)
        inv = torch.linalg.inv(Hinv[c, c])
        Wc -= Wc[:, c] @ inv @ Hinv[c]
        Hinv -= Hinv[:, c] @ inv @ Hinv[c]
        alive.remove(u)
    return alive


@pytest.mark.parametrize("size,n_keep", [(1, 61), (8, 7)])
@pytest.mark.parametrize("centred", [True, False])
def test_obs_in_place_updates_choose_the_same_units(size, n_keep, centred):
    x, W, _, w = _problem(4, c=96, cond=1e3)
    st = R.GramStats.zeros(96)
    st.add(x, w)
    n_units = 96 // size
    assert R.obs_select(W, st, n_units, size, n_keep, centred) == _obs_reference(W, st, n_units, size, n_keep, centred)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_weights_from_the_projections_output_match_token_weights(name):
    """The statistics pass takes each token's weight from the projection's own output (a forward
    hook) instead of computing that output again: the same statistics."""
    lm, data = tiny_lm(name), tiny_data(40)
    inp = R.capture_inputs(lm, data.texts["train"][:24], 8, None)
    layer = lm.adapter.layers(lm.model)[0]
    group = lm.adapter.block(lm.model, 0).mlp
    seen = []
    h = group.out_module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        fit, held = R._forward_block(layer, inp, collect=group, auto=True, relative=True)
    h.remove()
    c = fit.G.shape[0]
    want = (R.GramStats.zeros(c), R.GramStats.zeros(c))
    for x, m, hd in zip(seen, inp.masks, inp.held):
        wt = R.token_weights(group.out_module, x, m)
        for st, tok in ((want[0], m & ~hd[:, None]), (want[1], m & hd[:, None])):
            st.add(x[tok], wt[tok])
    for got, ref in zip((fit, held), want):
        assert got.n == pytest.approx(ref.n, rel=1e-5)
        torch.testing.assert_close(got.G, ref.G, rtol=1e-5, atol=1e-6 * float(ref.G.abs().max()))
        torch.testing.assert_close(got.s, ref.s, rtol=1e-5, atol=1e-6 * float(ref.s.abs().max()))


def _logits(lm, texts):
    batch = lm.encode(texts)
    batch.pop("labels", None)
    with torch.no_grad():
        return lm.model(**batch).logits


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("select", ["given", "obs"])
def test_stream_moved_by_the_refit_output_equals_running_the_block(monkeypatch, name, select):
    """Residual families: after the MLP's refit the stream moves on by the projection's output
    change (`_replay`) instead of a third pass of the block; the reconstructed model is the one
    the extra pass gives (same λs and units, the same weights up to float32 rounding)."""
    data = tiny_data(120)
    texts = data.texts["train"]
    out = {}
    real = R._forward_block
    for families in (R.RESIDUAL_FAMILIES, ()):
        monkeypatch.setattr(R, "RESIDUAL_FAMILIES", families)
        calls = []

        def spy(layer, inp, collect=None, update=False, **kw):
            calls.append(update)
            return real(layer, inp, collect=collect, update=update, **kw)
        monkeypatch.setattr(R, "_forward_block", spy)
        lm = tiny_lm(name)
        assert lm.adapter.family in R.RESIDUAL_FAMILIES or not families
        keeps = [(list(range(0, b.attn.n_units, 2)), list(range(0, b.mlp.n_units, 2)))
                 for b in lm.adapter.blocks(lm.model)]
        rep = R.reconstruct(lm, keeps, texts, select=select, batch_size=16)
        out[bool(families)] = (rep, _logits(lm, data.texts["test"]), sum(calls))
    (fast, lf, passes_fast), (slow, ls, passes_slow) = out[True], out[False]
    assert passes_fast == 0 and passes_slow == len(fast.layers) - 1  # no update pass left
    for a, b in zip((r for l in fast.layers for r in l), (r for l in slow.layers for r in l)):
        assert a["units"] == b["units"] and a["lambda"] == b["lambda"]
        assert a["error_refit"] == pytest.approx(b["error_refit"], rel=1e-4)
    torch.testing.assert_close(lf, ls, rtol=1e-4, atol=1e-4)


def test_post_norm_blocks_still_run_again(monkeypatch):
    """BERT's blocks end in a LayerNorm, so the stream cannot move on by the output projection's change
    (`_replay`): after every block but the last the block runs again (an update pass), no replay is
    kept, and the next block's statistics are taken on the cut and refit block's real output."""
    from test_reconstruct import _layer_inputs  # block i's input in a forward of the whole model
    lm, data = tiny_lm("bert"), tiny_data(60)
    texts = data.texts["train"][:20]
    assert lm.adapter.family not in R.RESIDUAL_FAMILIES
    dense_l1_in = _layer_inputs(lm, texts, 1)
    calls, seen = [], {}
    real = R._forward_block

    def spy(layer, inp, collect=None, update=False, replay=None, **kw):
        calls.append((update, replay is not None))
        if collect is not None and layer is lm.adapter.layers(lm.model)[1] and "x" not in seen:
            seen["x"] = inp.hidden(0).clone()
        return real(layer, inp, collect=collect, update=update, replay=replay, **kw)
    monkeypatch.setattr(R, "_forward_block", spy)
    keeps = [(list(range(0, b.attn.n_units, 2)), list(range(0, b.mlp.n_units, 2))) for b in lm.adapter.blocks(lm.model)]
    rep = R.reconstruct(lm, keeps, texts, batch_size=len(texts))
    assert all(r["error_refit"] <= r["error_removed"] * (1 + 1e-9) for l in rep.layers for r in l)
    n = len(rep.layers)
    assert sum(update for update, _ in calls) == n - 1  # one update pass after every block but the last
    assert not any(kept for _, kept in calls)  # nothing replayed
    assert len(calls) == 2 * n + n - 1  # attention and MLP statistics passes, plus the update passes
    torch.testing.assert_close(seen["x"], _layer_inputs(lm, texts, 1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen["x"], dense_l1_in, atol=1e-4)


def test_one_thread_scope_restores_the_thread_count():
    """The closed form runs on one CPU thread (`_one_thread`); the count comes back afterwards,
    after an error too, and nested scopes leave it alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t = torch.zeros(1)
        with R._one_thread(t):
            assert torch.get_num_threads() == 1
            with R._one_thread(t):
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            with R._one_thread(t):
                raise ValueError("boom")
        assert torch.get_num_threads() == 2
        lm, data = tiny_lm("llama"), tiny_data(40)
        keeps = [(None, list(range(0, b.mlp.n_units, 2))) for b in lm.adapter.blocks(lm.model)]
        R.reconstruct(lm, keeps, data.texts["train"], select="obs")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
