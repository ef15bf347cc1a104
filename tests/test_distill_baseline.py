"""The distillation baseline matches hidden states as DistilBERT does (option), logits only at weight 0."""
import pytest

from conftest import tiny_data, tiny_lm
from explorer import recovery
from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
from explorer.methods import make_run


def _run(monkeypatch, **options):
    seen = []
    real = recovery.hidden_kd_loss

    def spy(*a, **kw):
        seen.append(kw.get("kind", a[3] if len(a) > 3 else "cosine"))
        return real(*a, **kw)
    monkeypatch.setattr(recovery, "hidden_kd_loss", spy)
    run = make_run("distill-baseline", tiny_lm("llama"), tiny_data(), AnalysisConfig(samples=8, batch_size=4),
                   AllocationConfig(target=0.4), PruneConfig(stages=1, recovery="none", recovery_steps=3,
                                                             train_batch_size=4, eval_samples=16),
                   timing=False, **options)
    events = list(run.events())
    return run, events, seen


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_states_are_distilled_by_default(monkeypatch, kind):
    run, events, seen = _run(monkeypatch, distill_hidden_loss=kind)
    assert run.status == "done" and sum(e["type"] == "step" for e in events) == 3
    assert seen == [kind] * 3  # one hidden-state loss per optimiser step
    rep = run.report()
    assert rep["stages"][0]["extra"]["hidden_weight"] == 1.0 and "hidden-state loss" in rep["summary"]["loss"]


def test_weight_zero_is_logits_only(monkeypatch):
    run, _, seen = _run(monkeypatch, distill_hidden_weight=0.0)
    assert run.status == "done" and seen == [] and "hidden" not in run.report()["summary"]["loss"]
