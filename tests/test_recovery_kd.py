"""Distillation that recovers: KL on logits plus hidden-state (residual stream) distillation."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from conftest import TINY, tiny_batch, tiny_data, tiny_lm
from explorer import recovery
from explorer.config import PruneConfig
from explorer.data import TextData
from explorer.errors import ExplorerError
from explorer.recovery import distil_loss, hidden_kd_loss, hidden_layers, hidden_pairs, kd_loss, recover
from explorer.surgery import drop_layers, prune_block

KINDS = ["cosine", "mse"]
KD = PruneConfig(recovery="kd", recovery_steps=12, train_batch_size=8, lr=2e-3, kd_alpha=0.0,
                 kd_hidden_weight=1.0)


def _hidden(model, batch):
    """The model's hidden_states tuple (L + 1 tensors (B, T, H)), without gradients, in eval mode."""
    model.eval()
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states


def _measure(student, teacher, batch, kind="cosine", every=1):
    """The hidden-state KD loss of `student` against `teacher` on `batch`."""
    s, t = hidden_pairs(_hidden(student, batch), _hidden(teacher, batch), every)
    return hidden_kd_loss(s, t, batch["attention_mask"], kind).item()


def _pruned(lm, keep=0.5):
    """Prune every block of `lm.model` in place to the first `keep` of its attention groups and neurons."""
    for i, b in enumerate(lm.adapter.blocks(lm.model)):
        prune_block(lm.adapter, lm.model, i, list(range(max(1, int(b.attn.n_units * keep)))),
                    list(range(max(1, int(b.mlp.n_units * keep)))))
    return lm


def _eval_batch(lm):
    data = tiny_data()
    return {k: v for k, v in lm.encode(data.texts["val"][:8]).items() if k != "labels"}


# --- the loss itself ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(TINY))
def test_hidden_loss_is_exactly_zero_for_identical_models(name, kind):
    teacher = TINY[name]()
    student = copy.deepcopy(teacher)
    assert len(_hidden(teacher, tiny_batch())) == teacher.config.num_hidden_layers + 1  # embeddings + blocks
    assert _measure(student, teacher, tiny_batch(), kind) == 0.0
    assert _measure(student, teacher, tiny_batch(), kind, every=2) == 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(TINY))
def test_hidden_loss_is_positive_after_pruning_or_perturbing(name, kind):
    teacher_lm = tiny_lm(name)
    teacher = copy.deepcopy(teacher_lm.model)
    batch = _eval_batch(teacher_lm)
    assert _measure(_pruned(teacher_lm).model, teacher, batch, kind) > 0
    noisy = copy.deepcopy(teacher)
    with torch.no_grad():
        p = next(p for n, p in noisy.named_parameters() if "layers.0." in n or ".h.0." in n or "layer.0." in n)
        p.add_(0.5 * torch.randn_like(p))
    assert _measure(noisy, teacher, batch, kind) > 0


def test_cosine_is_one_minus_cos_over_real_tokens_only():
    t = torch.randn(2, 5, 8)
    s = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    want = (1 - torch.cosine_similarity(s, t, dim=-1))[mask.bool()].mean()
    assert torch.allclose(hidden_kd_loss([s], [t], mask, "cosine"), want, atol=1e-6)
    assert hidden_kd_loss([3 * t], [t], mask, "cosine").item() == pytest.approx(0, abs=1e-6)  # scale-free
    assert hidden_kd_loss([-t], [t], None, "cosine").item() == pytest.approx(2.0)
    s2 = s.clone()
    s2[1, 3:] = 1e3  # padding never counts
    assert torch.allclose(hidden_kd_loss([s2], [t], mask, "cosine"), want, atol=1e-6)


def test_mse_is_normalised_by_the_teachers_mean_square():
    t = torch.randn(2, 5, 8)
    s = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5)
    mask[0, 4:] = 0
    m = mask.bool()
    want = ((s - t) ** 2).sum(-1)[m].sum() / (t ** 2).sum(-1)[m].sum()
    assert torch.allclose(hidden_kd_loss([s], [t], mask, "mse"), want, atol=1e-6)
    # a layer with massive activations weighs no more than a quiet one
    assert torch.allclose(hidden_kd_loss([100 * s], [100 * t], mask, "mse"), want, rtol=1e-5)
    both = hidden_kd_loss([s, 100 * s], [t, 100 * t], mask, "mse")
    assert torch.allclose(both, want, rtol=1e-5)  # mean over layers
    assert hidden_kd_loss([torch.zeros_like(t)], [t], mask, "mse").item() == pytest.approx(1.0)


def test_hidden_loss_rejects_bad_input():
    t = torch.randn(1, 3, 4)
    with pytest.raises(ExplorerError, match="unknown hidden-state loss"):
        hidden_kd_loss([t], [t], None, "l1")
    with pytest.raises(ExplorerError, match="differ in shape"):
        hidden_kd_loss([torch.randn(1, 3, 5)], [t], None)
    with pytest.raises(ExplorerError, match="number of layers"):
        hidden_kd_loss([t, t], [t], None)


# --- which layers ------------------------------------------------------------------------------------

def test_layer_selection_every_k_and_always_the_last():
    assert hidden_layers(3, 1) == [0, 1, 2]
    assert hidden_layers(3, 2) == [1, 2]
    assert hidden_layers(6, 2) == [1, 3, 5]
    assert hidden_layers(6, 4) == [3, 5]
    assert hidden_layers(5, 10) == [4]


def test_hidden_pairs_skip_the_embeddings_and_fall_back_to_the_last_after_layer_drop():
    teacher = tuple(torch.full((1, 2, 3), float(i)) for i in range(7))  # embeddings + 6 blocks
    student = tuple(torch.full((1, 2, 3), 10.0 + i) for i in range(7))
    s, t = hidden_pairs(student, teacher, 4)  # blocks 3 and 5 -> hidden_states[4], [6]
    assert [x[0, 0, 0].item() for x in t] == [4, 6] and [x[0, 0, 0].item() for x in s] == [14, 16]
    s, t = hidden_pairs(student[:5], teacher, 1)  # 4 blocks left of 6: only the final hidden state
    assert len(s) == len(t) == 1 and s[0] is student[4] and t[0] is teacher[6]


# --- inside recover_steps -----------------------------------------------------------------------------

def _spy(monkeypatch):
    """Record the number of layers each hidden_kd_loss call compares."""
    calls = []
    real = recovery.hidden_kd_loss

    def spy(s, t, mask, kind):
        calls.append((len(s), kind))
        return real(s, t, mask, kind)
    monkeypatch.setattr(recovery, "hidden_kd_loss", spy)
    return calls


class _CountingTeacher(torch.nn.Module):
    """Wraps a teacher and records the keyword arguments of every forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, **kw):
        self.calls.append((sorted(kw), torch.is_grad_enabled()))
        return self.model(**kw)


def _distil(name, kind, **cfg):
    """Prune a tiny model, distil it toward its dense teacher; the hidden loss before and after."""
    lm = tiny_lm(name)
    teacher = copy.deepcopy(lm.model).eval()
    _pruned(lm)
    batch = _eval_batch(lm)
    before = _measure(lm.model, teacher, batch, kind)
    cfg = replace(KD, kd_hidden_loss=kind, **cfg)
    losses = recover(lm, tiny_data(), cfg, teacher=teacher)
    assert len(losses) == cfg.recovery_steps and all(torch.isfinite(torch.tensor(losses)))
    return before, _measure(lm.model, teacher, batch, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("recovery_", ["kd", "reconstruct+kd"])
def test_hidden_distillation_pulls_a_pruned_model_toward_its_teacher(recovery_, kind):
    before, after = _distil("llama", kind, recovery=recovery_)  # kd_alpha=0: task loss + hidden loss
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("name,alpha,lr", [("llama", 0.0, 1e-3), ("gpt2", 1.0, 3e-4)])
def test_the_hidden_term_is_what_closes_the_gap(name, alpha, lr):
    """Same seeds, same batches: with the hidden term the residual stream ends closer to the teacher's."""
    before, logits_only = _distil(name, "cosine", kd_alpha=alpha, lr=lr, kd_hidden_weight=0.0)
    _, with_hidden = _distil(name, "cosine", kd_alpha=alpha, lr=lr, kd_hidden_weight=1.0)
    assert with_hidden < before and with_hidden < 0.95 * logits_only, (before, logits_only, with_hidden)


def test_teacher_runs_once_per_batch_without_grad_and_layers_follow_every(monkeypatch):
    lm = tiny_lm("llama")  # 3 blocks
    teacher = _CountingTeacher(copy.deepcopy(lm.model).eval())
    _pruned(lm)
    calls = _spy(monkeypatch)
    recover(lm, tiny_data(), replace(KD, recovery_steps=3, kd_hidden_every=2, kd_hidden_loss="mse"), teacher=teacher)
    assert len(teacher.calls) == 3
    assert all(not grad and "output_hidden_states" in kw and "labels" not in kw for kw, grad in teacher.calls)
    assert calls == [(2, "mse")] * 3  # blocks 1 and 2


def test_layer_drop_distils_the_final_hidden_state_only(monkeypatch):
    lm = tiny_lm("gpt2")
    teacher = copy.deepcopy(lm.model).eval()
    drop_layers(lm.adapter, lm.model, [1])
    calls = _spy(monkeypatch)
    losses = recover(lm, tiny_data(), replace(KD, recovery_steps=2), teacher=teacher)
    assert calls == [(1, "cosine")] * 2 and len(losses) == 2


def test_logits_only_kd_asks_for_no_hidden_states(monkeypatch):
    lm = tiny_lm("llama")
    teacher = _CountingTeacher(copy.deepcopy(lm.model).eval())
    calls = _spy(monkeypatch)
    cfg = replace(KD, recovery_steps=2, kd_alpha=0.5, kd_hidden_weight=0.0)
    losses = recover(lm, tiny_data(), cfg, teacher=teacher)
    assert calls == [] and len(losses) == 2 and len(teacher.calls) == 2


@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_total_loss_combines_kl_task_and_hidden_terms(name, labelled):
    lm = tiny_lm(name)
    teacher = copy.deepcopy(lm.model).eval()
    _pruned(lm)
    lm.model.eval()  # no dropout: both computations see the same forward
    data = tiny_data()
    batch = lm.encode(data.texts["train"][:6], data.labels["train"][:6])
    if not labelled:
        batch.pop("labels")  # a causal LM then has no task loss either
    cfg = replace(KD, kd_alpha=0.3, kd_hidden_weight=2.0, kd_hidden_every=2, kd_temperature=1.5)
    with torch.no_grad():
        got = distil_loss(lm.model, teacher, batch, cfg, lm.task)
        out = lm.model(**batch, output_hidden_states=True)
        t_out = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
        mask = batch["attention_mask"]
        kl = kd_loss(out.logits, t_out.logits, mask if lm.task == "causal-lm" else None, 1.5)
        s, t = hidden_pairs(out.hidden_states, t_out.hidden_states, 2)
        task = 0.7 * out.loss if labelled else 0.0
        want = 0.3 * kl + task + 2.0 * hidden_kd_loss(s, t, mask, "cosine")
    assert (out.loss is None) == (not labelled)
    assert torch.allclose(got, want, rtol=1e-5), (got, want)


def test_classifier_without_labels_trains_on_the_kd_terms_only():
    lm = tiny_lm("bert")
    teacher = copy.deepcopy(lm.model).eval()
    _pruned(lm)
    w0 = lm.model.classifier.weight.detach().clone()
    d = tiny_data()
    unlabelled = TextData("plain", d.texts, None, None)
    losses = recover(lm, unlabelled, replace(KD, kd_alpha=0.5, lr=1e-4), teacher=teacher)
    assert len(losses) == KD.recovery_steps and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(lm.model.classifier.weight, w0)  # it trained


def test_kd_without_teacher_is_refused_for_reconstruct_kd_too():
    with pytest.raises(ExplorerError, match="dense teacher"):
        recover(tiny_lm("llama"), tiny_data(), replace(KD, recovery="reconstruct+kd"))
