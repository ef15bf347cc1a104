"""lora-prune-ft (LoRA fine-tune, prune, LoRA fine-tune) against lora-before / lora-after at equal steps."""
import numpy as np
import pytest

from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
from explorer.errors import ExplorerError
from explorer.methods import make_run

from conftest import tiny_data, tiny_lm


def _run(method, name="llama", stages=2, steps=3, recovery="reconstruct", **options):
    lm = tiny_lm(name)
    run = make_run(method, lm, tiny_data(), AnalysisConfig(samples=8, batch_size=4),
                   AllocationConfig(target=0.4, amplitude=0.2),
                   PruneConfig(stages=stages, recovery=recovery, recovery_steps=steps, train_batch_size=4,
                               eval_samples=16), timing=False, **options)
    return lm, run, list(run.events())


def test_lora_prune_ft_runs_its_three_phases_in_order():
    lm, run, events = _run("lora-prune-ft", stages=2, steps=3)  # T = 6: 3 dense steps, cut, cut, 3 pruned steps
    kinds = [(e["type"], e.get("stage")) for e in events if e["type"] in ("step", "analysis", "stage", "lora")]
    first_cut = kinds.index(("analysis", 1))
    dense_steps = [k for k in kinds[:first_cut] if k[0] == "step"]
    assert dense_steps == [("step", 0)] * 3 and ("lora", None) in kinds[:first_cut]
    last = kinds.index(("analysis", 2))
    tail = kinds[last:]
    assert [k for k in tail if k[0] == "step"] == [("step", 2)] * 3  # the pruned model's fine-tuning, last stage
    assert tail[-1][0] == "stage" and run.records[-1].stage == 2 and tail.index(("lora", None)) < tail.index(("step", 2))
    assert not [k for k in kinds[first_cut:last] if k[0] == "step"]  # no training between the cuts
    pipe = run.report()["summary"]["pipeline"]
    assert (pipe["lora_steps_dense"], pipe["lora_steps_pruned"], pipe["lora_steps"]) == (3, 3, 6)
    assert all(np.isfinite(pipe[k]) for k in ("dense", "dense_after_lora", "pruned_before_lora", "final"))
    assert run.status == "done" and run.records[-1].removed_fraction == pytest.approx(0.4, abs=0.08)


@pytest.mark.parametrize("method", ["lora-before", "lora-after", "lora-prune-ft"])
def test_the_three_orders_spend_the_same_optimiser_steps(method):
    _, run, events = _run(method, name="gpt2", stages=2, steps=2, recovery="none")
    assert sum(e["type"] == "step" for e in events) == 4
    assert run.report()["summary"]["pipeline"]["lora_steps"] == 4


def test_pre_fraction_splits_the_steps_and_is_checked():
    """pre_fraction 0.25 of T = 4: one LoRA step on the dense model (stage 0, before the cut), three on the
    pruned one (after the cut), as taken, not only as reported."""
    _, run, events = _run("lora-prune-ft", name="bert", stages=1, steps=4, recovery="none", pre_fraction=0.25)
    assert run.status == "done", run.error
    pipe = run.report()["summary"]["pipeline"]
    assert (pipe["lora_steps_dense"], pipe["lora_steps_pruned"]) == (1, 3)
    kinds = [(e["type"], e.get("stage")) for e in events if e["type"] in ("step", "analysis")]
    cut = kinds.index(("analysis", 1))
    assert kinds[:cut] == [("step", 0)] and kinds[cut + 1:] == [("step", 1)] * 3
    assert len(run.records[-1].losses) == 3  # the pruned model's steps are its stage's
    with pytest.raises(ExplorerError, match="pre-fraction"):
        _run("lora-prune-ft", pre_fraction=1.5)
    with pytest.raises(ExplorerError, match="not an option of method 'lora-prune-ft'"):
        _run("lora-prune-ft", trials=3)
