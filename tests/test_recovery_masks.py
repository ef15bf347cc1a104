"""Masks held through recovery training (unstructured magnitude / wanda / lottery): LoRA trains the
effective merged weight (W + scale·B·A) ⊙ M, so the merged model keeps its zeros exactly and computes
what was trained; full training re-applies the masks after every optimiser step."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_data, tiny_lm
from explorer.config import PruneConfig
from explorer.errors import ExplorerError
from explorer.methods.base import block_linear_weights
from explorer.recovery import _train_batches, plain_name, recover_steps

LORA = PruneConfig(recovery="lora", recovery_steps=4, train_batch_size=8, lr=2e-2, lora_rank=4)


def _masked_lm(name: str, seed: int = 0):
    """A tiny LM without dropout whose block weights lose a random half, and those masks."""
    lm = tiny_lm(name)
    for m in lm.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # GPT-2: deterministic train-mode forwards, to compare losses
    g = torch.Generator().manual_seed(seed)
    masks = {}
    with torch.no_grad():
        for block in block_linear_weights(lm):
            for n, w, _ in block:
                masks[n] = torch.rand(w.shape, generator=g) > 0.5
                w.mul_(masks[n])
    return lm, masks


def _loss(lm, batch) -> float:
    with torch.no_grad():
        return lm.model(**batch).loss.item()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_lora_with_masks_trains_what_is_evaluated(name):
    lm, masks = _masked_lm(name)
    data = tiny_data()
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters() if n in masks}
    batches = list(_train_batches(lm, data, LORA.recovery_steps, LORA.train_batch_size, seed=LORA.seed * 1000))
    probe = lm.encode(data.texts["val"][:8])
    gen = recover_steps(lm, data, LORA, masks=masks)
    losses, replayed = [], []
    for step, loss in gen:
        losses.append(loss)
        if step < LORA.recovery_steps:  # the next step's batch on the current (wrapped, masked) model
            replayed.append(_loss(lm, batches[step]))
        else:
            wrapped_probe = _loss(lm, probe)  # the trained model just before the merge
    assert len(losses) == LORA.recovery_steps
    # the loss the next step trained on is the loss of the masked model at that point
    assert replayed == pytest.approx(losses[1:], rel=1e-6, abs=1e-6)
    params = dict(lm.model.named_parameters())
    assert not any("lora" in n for n in params)  # merged: plain weights
    for n, keep in masks.items():
        w = params[n].detach()
        assert torch.count_nonzero(w[~keep]) == 0, f"{n}: pruned weights regrew"
        assert not torch.equal(w[keep], before[n][keep]), f"{n}: LoRA did not change the kept weights"
    # the merged, masked model computes what the masked LoRA model computed
    assert _loss(lm, probe) == pytest.approx(wrapped_probe, rel=1e-6, abs=1e-6)


def test_lora_without_masks_regrows_pruned_weights():
    """The failure the masks fix: LoRA's dense delta fills the zeros."""
    lm, masks = _masked_lm("llama")
    list(recover_steps(lm, tiny_data(), LORA))
    params = dict(lm.model.named_parameters())
    assert any(torch.count_nonzero(params[n].detach()[~k]) > 0 for n, k in masks.items())


@pytest.mark.parametrize("recovery", ["full", "kd"])
def test_full_and_kd_training_keep_the_zeros(recovery):
    import copy
    lm, masks = _masked_lm("gpt2")
    teacher = copy.deepcopy(lm.model).eval() if recovery == "kd" else None
    cfg = PruneConfig(recovery=recovery, recovery_steps=3, train_batch_size=8, lr=1e-2)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters() if n in masks}
    losses = [loss for _, loss in recover_steps(lm, tiny_data(), cfg, teacher=teacher, masks=masks)]
    assert len(losses) == 3
    params = dict(lm.model.named_parameters())
    for n, keep in masks.items():
        assert torch.count_nonzero(params[n].detach()[~keep]) == 0
        assert not torch.equal(params[n].detach()[keep], before[n][keep])


def test_bad_masks_are_refused():
    lm, masks = _masked_lm("llama")
    with pytest.raises(ExplorerError, match="does not have"):
        list(recover_steps(lm, tiny_data(), LORA, masks={"no.such.weight": torch.ones(2, 2)}))
    name = next(iter(masks))
    with pytest.raises(ExplorerError, match="shape"):
        list(recover_steps(lm, tiny_data(), LORA, masks={name: torch.ones(3, 3)}))


def test_plain_name_strips_wrappers():
    assert plain_name("module.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") \
        == "model.layers.0.self_attn.q_proj.weight"
    assert plain_name("_fsdp_wrapped_module.transformer.h.0._fsdp_wrapped_module.attn.c_attn.weight") \
        == "transformer.h.0.attn.c_attn.weight"
    assert plain_name("base_model.model.score.modules_to_save.default.weight") == "score.weight"


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_magnitude_masks_stay_zero_through_lora_recovery(method):
    """The method level: every step of the LoRA recovery runs on the masked weight, so each
    weight that a stage pruned is exactly zero after every step and in the final model."""
    from conftest import tiny_data, tiny_lm
    from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
    from explorer.methods import make_run
    lm = tiny_lm("llama")
    run = make_run(method, lm, tiny_data(), AnalysisConfig(samples=8, batch_size=4), AllocationConfig(target=0.5),
                   PruneConfig(stages=2, recovery="lora", recovery_steps=3, train_batch_size=4, eval_samples=16),
                   timing=False)
    for ev in run.events():
        if ev["type"] == "stage":
            params = dict(lm.model.named_parameters())
            assert run.masks and all(bool((params[n][~m] == 0).all()) for n, m in run.masks.items())
    assert run.status == "done"
    zeros = run.report()["summary"]["sparsity_reached"]
    assert zeros >= 0.45  # what was allocated is what the final model holds
