"""Bad input and safe loading at the library level: clear ExplorerErrors, never tracebacks."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_data, tiny_lm
from explorer.config import AllocationConfig, AnalysisConfig, PruneConfig
from explorer.errors import ExplorerError, ModelError
from explorer.importance import analyze
from explorer.models import load_model, save_model
from explorer.pruning import PruningRun


def test_unknown_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not a built-in model.*hub could not provide it"):
        load_model("some-org/surely-not-a-model", device="cpu")


def test_unsupported_architecture_names_the_supported_families(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM
    OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                             num_attention_heads=2, word_embed_proj_dim=16)).save_pretrained(tmp_path / "opt")
    with pytest.raises(ModelError, match="unsupported architecture 'opt'.*BERT.*GPT-2.*LLaMA"):
        load_model(str(tmp_path / "opt"), device="cpu")


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="not a model directory"):
        load_model(str(tmp_path), device="cpu")


def test_pickle_weights_need_explicit_opt_in(tmp_path):
    lm = tiny_lm("bert")
    d = tmp_path / "pickled"
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    for f in d.glob("*.safetensors"):  # an old-style checkpoint: pickle only
        f.unlink()
    torch.save(lm.model.state_dict(), d / "pytorch_model.bin")
    assert list(d.glob("*.bin")) and not list(d.glob("*.safetensors"))
    with pytest.raises(ModelError, match="pickle"):
        load_model(str(d), device="cpu")
    assert load_model(str(d), device="cpu", allow_pickle=True).task == "classification"


def test_local_paths_can_be_disabled(tmp_path):
    lm = tiny_lm("bert")
    path = save_model(lm, tmp_path / "m")
    with pytest.raises(ModelError, match="local paths is disabled"):
        load_model(str(path), allow_local=False, device="cpu")


def test_unknown_device_and_missing_cuda():
    with pytest.raises(ModelError, match="unknown device"):
        load_model("minilm", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            load_model("minilm", device="cuda")


def test_labels_that_do_not_match_the_models_classes():
    lm = tiny_lm("bert")  # 2 classes
    with pytest.raises(ExplorerError, match="label 4 does not match the model's 2 classes"):
        analyze(lm, ["w5 w6", "w7 w8"], [0, 4], AnalysisConfig(batch_size=2))
    data = tiny_data()
    data.labels = {k: [y * 3 for y in v] for k, v in data.labels.items()}
    data.label_names = ["a", "b", "c", "d"]
    with pytest.raises(ExplorerError, match="4 classes but the model's head has 2"):
        PruningRun(lm, data)


def test_texts_longer_than_the_model_maximum_are_truncated():
    lm = tiny_lm("llama")  # max_position_embeddings 64, max_length 16
    long_text = " ".join(f"w{3 + i % 100}" for i in range(5000))
    imp = analyze(lm, [long_text, "w5 w6"], None, AnalysisConfig(batch_size=2, max_length=500))
    assert imp.tokens <= 2 * 64
    batch = lm.encode([long_text])
    assert batch["input_ids"].shape[1] == 16


@pytest.mark.parametrize("kw,needle", [
    ({"target": 1.0}, "target"), ({"target": -0.2}, "target"), ({"target": float("nan")}, "target"),
    ({"amplitude": -0.5}, "amplitude"), ({"amplitude": 1e9}, "amplitude"), ({"amplitude": float("inf")}, "amplitude"),
])
def test_bad_allocation_numbers(kw, needle):
    from explorer.allocation import allocate
    structure = [{"groups": 4, "n_neurons": 64, "group_params": 100, "neuron_params": 10, "block_params": 1100}] * 3
    with pytest.raises(ExplorerError, match=needle):
        allocate([0.0, 1.0, -1.0], structure, AllocationConfig(**kw))


def test_zero_stages_and_unknown_recovery():
    lm = tiny_lm("bert")
    with pytest.raises(ExplorerError, match="stages must be at least 1"):
        PruningRun(lm, tiny_data(), prune=PruneConfig(stages=0))
    with pytest.raises(ExplorerError, match="--recovery must be one of none, full, lora, kd, reconstruct, reconstruct\\+lora, reconstruct\\+full, reconstruct\\+kd, got 'magic'"):
        PruningRun(lm, tiny_data(), prune=PruneConfig(stages=1, recovery="magic"))
    for bad, needle in [(AnalysisConfig(samples=0), "--samples must be in"),
                        (AnalysisConfig(batch_size=-3), "--batch-size must be in"),
                        (PruneConfig(lr=float("nan")), "--lr must be a finite number"),
                        (PruneConfig(kd_alpha=2.0), "--kd-alpha must be in")]:
        kw = {"analysis": bad} if isinstance(bad, AnalysisConfig) else {"prune": bad}
        with pytest.raises(ExplorerError, match=needle):
            PruningRun(lm, tiny_data(), **kw)


def test_cuda_out_of_memory_gets_a_helpful_message(monkeypatch):
    lm = tiny_lm("bert")
    run = PruningRun(lm, tiny_data(), AnalysisConfig(samples=4, batch_size=4), AllocationConfig(target=0.2),
                     PruneConfig(stages=1, recovery="none"), timing=False)

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr("explorer.pruning.analyze", oom)
    events = list(run.events())
    assert events[-1]["type"] == "error"
    assert "fewer calibration samples" in events[-1]["message"] and "smaller batch" in events[-1]["message"]


def test_stop_during_importance_analysis_keeps_the_model():
    lm = tiny_lm("gpt2")
    before = sum(p.numel() for p in lm.model.parameters())
    run = PruningRun(lm, tiny_data(), AnalysisConfig(samples=16, batch_size=4), AllocationConfig(target=0.4),
                     PruneConfig(stages=2, recovery="none"), timing=False)
    calls = {"n": 0}
    orig = run._should_stop

    def stop_in_analysis():
        calls["n"] += 1
        return calls["n"] >= 2  # second check: inside the first stage's analysis
    run._should_stop = stop_in_analysis
    events = list(run.events())
    assert events[-1]["type"] == "stopped" and not run.records
    assert sum(p.numel() for p in lm.model.parameters()) == before
    del orig
