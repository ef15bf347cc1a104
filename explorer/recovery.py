"""Recovery training between pruning stages: none, full fine-tuning, LoRA (merged back into
the weights before the next physical prune, so adapters never meet changed shapes), or
knowledge distillation from the dense model (KL on logits, alone or added to the task loss).
"""
from __future__ import annotations

import random
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import PruneConfig
from .data import TextData
from .errors import Cancelled, ExplorerError
from .models import LoadedModel

RECOVERY = ("none", "full", "lora", "kd")


def default_lr(method: str) -> float:
    return 5e-5 if method == "full" else 5e-4 if method == "lora" else 1e-4


def _train_batches(lm: LoadedModel, data: TextData, steps: int, batch_size: int, seed: int):
    """`steps` shuffled batches from the train split (cycling), deterministic per seed."""
    texts = data.texts["train"]
    labels = data.labels["train"] if data.labels else None
    order = list(range(len(texts)))
    rng = random.Random(seed)
    rng.shuffle(order)
    pos = 0
    for _ in range(steps):
        idx = [order[(pos + j) % len(order)] for j in range(batch_size)]
        pos += batch_size
        yield lm.encode([texts[i] for i in idx], [labels[i] for i in idx] if labels else None)


def kd_loss(student_logits, teacher_logits, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on softened logits, scaled by T² (Hinton et al.).
    logits: (B, C) for classifiers or (B, T, V) for LMs with mask (B, T)."""
    t = temperature
    log_p = F.log_softmax(student_logits / t, dim=-1)
    q = F.softmax(teacher_logits / t, dim=-1)
    kl = (q * (q.clamp_min(1e-12).log() - log_p)).sum(-1)  # (B,) or (B, T)
    if mask is not None and kl.dim() == 2:
        kl = (kl * mask).sum() / mask.sum().clamp_min(1)
    else:
        kl = kl.mean()
    return kl * t * t


def _lora_wrap(lm: LoadedModel, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    save = ["classifier", "score"] if lm.task == "classification" else None
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(lm.adapter.lora_targets),
                     modules_to_save=save, fan_in_fan_out=lm.model.config.model_type == "gpt2")
    return get_peft_model(lm.model, cfg)


def recover(lm: LoadedModel, data: TextData, cfg: PruneConfig, stage: int = 0,
            teacher: nn.Module | None = None, should_stop: Callable[[], bool] | None = None) -> list[float]:
    """Train `lm.model` in place for cfg.recovery_steps steps; returns the loss per step."""
    return [loss for _, loss in recover_steps(lm, data, cfg, stage, teacher, should_stop)]


def recover_steps(lm: LoadedModel, data: TextData, cfg: PruneConfig, stage: int = 0,
                  teacher: nn.Module | None = None,
                  should_stop: Callable[[], bool] | None = None) -> Iterator[tuple[int, float]]:
    """Generator: trains `lm.model` in place, yielding (step, loss) after each optimiser step.
    On Stop, raises Cancelled (the caller restores the last completed model)."""
    method = cfg.recovery
    if method not in RECOVERY:
        raise ExplorerError(f"unknown recovery '{method}': use one of {', '.join(RECOVERY)}")
    if method == "none" or cfg.recovery_steps <= 0:
        return
    if lm.task == "encoder":
        raise ExplorerError("recovery training needs a task head (classification or causal LM)")
    if method == "kd" and teacher is None:
        raise ExplorerError("distillation needs the dense teacher model")
    torch.manual_seed(cfg.seed + stage)
    if method != "lora":
        for p in lm.model.parameters():  # full fine-tuning / KD train every weight
            p.requires_grad_(True)
    model = _lora_wrap(lm, cfg.lora_rank) if method == "lora" else lm.model
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr or default_lr(method)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(cfg.recovery_steps, 1))
    model.train()
    try:
        for step, batch in enumerate(_train_batches(lm, data, cfg.recovery_steps, cfg.train_batch_size,
                                                    seed=cfg.seed * 1000 + stage)):
            if should_stop and should_stop():
                raise Cancelled()
            out = model(**batch)
            loss = out.loss
            if method == "kd":
                with torch.no_grad():
                    t_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
                mask = batch["attention_mask"] if lm.task == "causal-lm" else None
                loss = cfg.kd_alpha * kd_loss(out.logits, t_logits, mask, cfg.kd_temperature) \
                    + (1 - cfg.kd_alpha) * out.loss
            if not torch.isfinite(loss):
                raise ExplorerError(f"recovery diverged at step {step + 1} (loss {loss.item()}); lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            yield step + 1, loss.item()
    finally:
        model.eval()
        if method == "lora":
            lm.model = model.merge_and_unload()  # plain weights again, original module objects
        for p in lm.model.parameters():
            p.requires_grad_(True)
            p.grad = None
