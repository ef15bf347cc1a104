"""Recovery through accelerate: one process through `Accelerator` trains exactly as the plain loop,
and a real 2-process run on the CPU (gloo, DDP) with `accelerate launch -m explorer recover` trains
the same model on both ranks, saves it once and the saved model reloads."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_data, tiny_lm
from explorer.cli import main
from explorer.config import PruneConfig
from explorer.models import load_model, save_model
from explorer.recovery import load_into_skeleton, meta_skeleton, recover_steps

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps its process state in a singleton: start from none and leave none."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _train(name, recovery, use_accelerate):
    lm = tiny_lm(name)
    teacher = copy.deepcopy(lm.model).eval() if recovery == "kd" else None
    cfg = PruneConfig(recovery=recovery, recovery_steps=3, train_batch_size=8, lr=1e-2, lora_rank=4,
                      kd_hidden_weight=1.0 if recovery == "kd" else 0.0)
    losses = [loss for _, loss in recover_steps(lm, tiny_data(), cfg, teacher=teacher,
                                                use_accelerate=use_accelerate)]
    return losses, {n: p.detach().clone() for n, p in lm.model.named_parameters()}


@pytest.mark.parametrize("name,recovery", [("llama", "lora"), ("llama", "full"), ("gpt2", "kd"), ("bert", "lora")])
def test_one_process_through_accelerator_is_the_plain_loop(name, recovery, fresh_accelerate):
    plain, w_plain = _train(name, recovery, use_accelerate=False)
    acc, w_acc = _train(name, recovery, use_accelerate=True)
    assert acc == plain  # bit for bit
    assert w_acc.keys() == w_plain.keys()
    assert all(torch.equal(w_acc[k], w_plain[k]) for k in w_plain)


def test_skeleton_takes_a_gathered_state_dict():
    """The FSDP path's last step, checked without FSDP: a weightless copy of the model takes the full
    state dict (wrapper prefixes in its names), and the LM head is tied to the embeddings again."""
    lm = tiny_lm("llama")
    skeleton = meta_skeleton(lm.model)
    assert all(p.is_meta for p in skeleton.parameters())
    state = {k.replace("layers.0.", "layers.0._fsdp_wrapped_module."): v.clone()
             for k, v in lm.model.state_dict().items()}
    out = load_into_skeleton(skeleton, state, "cpu")
    assert out.lm_head.weight is out.model.embed_tokens.weight
    ref = dict(lm.model.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in out.named_parameters())
    batch = lm.encode(tiny_data().texts["val"][:4])
    with torch.no_grad():
        assert torch.equal(out(**batch).logits, lm.model(**batch).logits)


def test_recover_command_bad_input(tmp_path, capsys):
    d = str(save_model(tiny_lm("llama"), tmp_path / "m"))
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(tiny_data().texts["train"]))
    for argv, msg in [(["--recovery", "kd"], "--teacher"), (["--recovery", "lora", "--teacher", d], "--teacher"),
                      (["--recovery", "lora", "--steps", "0"], "--steps"),
                      (["--recovery", "lora", "--lr", "-1"], "--lr")]:
        assert main(["recover", "--model", d, "--data", str(data), "--json", str(tmp_path / "r.json"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error:") and msg in err[-1], err


def test_recover_command_one_process(tmp_path, capsys):
    d = str(save_model(tiny_lm("llama"), tmp_path / "m"))
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(sum(tiny_data(120).texts.values(), [])))
    rep, out = tmp_path / "r.json", tmp_path / "out"
    assert main(["recover", "--model", d, "--data", str(data), "--recovery", "kd", "--teacher", d, "--steps", "2",
                 "--train-batch-size", "4", "--lr", "1e-3", "--out", str(out), "--json", str(rep)]) == 0
    r = json.loads(rep.read_text())
    assert r["world_size"] == 1 and r["steps"] == 2 and len(r["losses"]) == 2 and r["saved_to"]
    assert r["metric"] == "perplexity" and r["before"]["eval_split"] == "val"
    lm = load_model(str(out), device="cpu")
    assert lm.n_params == r["params"]


def _launcher() -> list[str] | None:
    exe = Path(sys.executable).parent / "accelerate"
    return [str(exe)] if exe.exists() else None


@pytest.mark.slow
@pytest.mark.skipif(_launcher() is None, reason="the `accelerate` launcher is not installed next to this Python")
def test_two_processes_on_the_cpu(tmp_path):
    """`accelerate launch --config_file scripts/accelerate_ddp.yaml` with 2 processes: on a machine
    without a GPU they form a gloo group (MULTI_CPU) and train with DDP."""
    lm = tiny_lm("llama")
    d = str(save_model(lm, tmp_path / "m"))
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(sum(tiny_data(120).texts.values(), [])))
    rep, out = tmp_path / "r.json", tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    cmd = _launcher() + ["launch", "--config_file", str(ROOT / "scripts" / "accelerate_ddp.yaml"),
                         "--num_processes", "2", "-m", "explorer", "recover", "--model", d, "--data", str(data),
                         "--recovery", "lora", "--steps", "3", "--train-batch-size", "4", "--lr", "1e-2",
                         "--eval-samples", "200", "--out", str(out), "--json", str(rep)]
    res = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(rep.read_text())
    assert r["world_size"] == 2 and r["distributed"] == "MULTI_CPU", r
    assert [x["rank"] for x in r["ranks"]] == [0, 1]
    assert r["ranks"][0]["final_loss"] == r["ranks"][1]["final_loss"] == r["final_loss"]
    assert r["ranks"][0]["weights"] == r["ranks"][1]["weights"]  # the same trained weights on both ranks
    assert len(r["losses"]) == 3 and all(map(torch.isfinite, torch.tensor(r["losses"])))
    assert "rank 0/2" in res.stderr and "rank 1/2" in res.stderr
    from explorer.evaluate import quality
    saved = load_model(str(out), device="cpu")
    assert saved.n_params == r["params"]
    q = quality(saved, __import__("explorer.data", fromlist=["load_data"]).load_data(str(data)), 200, split="val")
    assert q["perplexity"] == pytest.approx(r["after"]["perplexity"], rel=1e-5)
