"""Recovery training between pruning stages: none, full fine-tuning, LoRA (merged back into
the weights before the next physical prune, so adapters never meet changed shapes), or
knowledge distillation from the dense model ("kd", also the training part of "reconstruct+kd").

Distillation loss per batch, from one student forward and one teacher forward (no gradients):

    kd_alpha · KL(teacher ‖ student logits, temperature)  + (1 − kd_alpha) · task loss
    + kd_hidden_weight · hidden-state loss

The task loss is left out when the batch has no labels (a classifier on unlabelled text).
The hidden-state loss compares the residual stream after every `kd_hidden_every`-th block
(and always the last) over real tokens: cosine (1 − cos per token, as DistilBERT) or mse
normalised by the teacher's mean square (as Minitron, so blocks with massive activations do
not dominate). After layer drop the blocks no longer correspond, so only the final hidden
state is compared.

Precision: a bfloat16 / float16 model trains with float32 master weights (the trained
parameters are float32 during the steps, put back in the model's dtype after them), the forward
under autocast in the model's dtype (float16 with loss scaling); losses are float32.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import RECOVERY, PruneConfig, split_recovery
from .data import TextData
from .errors import Cancelled, ExplorerError
from .models import LoadedModel


LOW_PRECISION = (torch.bfloat16, torch.float16)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's (first) floating-point parameter: the dtype it computes in."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


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


MAX_LM_BATCH_TOKENS = 1024  # per forward/backward of a causal LM: ~1 GB per 256-token sample on SmolLM2


def micro_batches(lm: LoadedModel, batch: dict) -> list[tuple[dict, float]]:
    """A training batch as (part, weight) pieces of at most MAX_LM_BATCH_TOKENS tokens for causal LMs
    (the vocabulary-sized logits and their gradients dominate memory); weights are the parts' shares
    of the samples, so the accumulated gradient is the batch's. Other tasks: the batch whole."""
    n, length = batch["input_ids"].shape
    per = max(1, MAX_LM_BATCH_TOKENS // max(length, 1)) if lm.task == "causal-lm" else n
    if per >= n:
        return [(batch, 1.0)]
    return [({k: v[i:i + per] for k, v in batch.items()}, min(per, n - i) / n) for i in range(0, n, per)]


def kd_loss(student_logits, teacher_logits, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on softened logits, scaled by T² (Hinton et al.).
    logits: (B, C) for classifiers or (B, T, V) for LMs with mask (B, T)."""
    t = temperature
    log_p = F.log_softmax(student_logits.float() / t, dim=-1)  # float32 whatever the models' dtype
    q = F.softmax(teacher_logits.float() / t, dim=-1)
    kl = (q * (q.clamp_min(1e-12).log() - log_p)).sum(-1)  # (B,) or (B, T)
    if mask is not None and kl.dim() == 2:
        kl = (kl * mask).sum() / mask.sum().clamp_min(1)
    else:
        kl = kl.mean()
    return kl * t * t


def hidden_layers(n_blocks: int, every: int) -> list[int]:
    """Block indices whose output is distilled: i with (i + 1) % every == 0, and always the last."""
    return sorted({i for i in range(n_blocks) if (i + 1) % every == 0} | {n_blocks - 1})


def hidden_pairs(student_hs, teacher_hs, every: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Matching residual streams from HF `hidden_states` tuples (L + 1 tensors (B, T, H) each:
    the embeddings' output, then the output of every block). A student with fewer blocks than
    the teacher (layer drop) is compared on the final hidden state only."""
    if len(student_hs) != len(teacher_hs):
        return [student_hs[-1]], [teacher_hs[-1]]
    idx = hidden_layers(len(student_hs) - 1, every)
    return [student_hs[i + 1] for i in idx], [teacher_hs[i + 1] for i in idx]


def hidden_kd_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                   mask: torch.Tensor | None, kind: str = "cosine") -> torch.Tensor:
    """Hidden-state distillation loss, averaged over the given layers (lists of (B, T, H)).
    mask (B, T): 1 for real tokens (None: all). cosine: mean over tokens of 1 − cos(s, t);
    mse: Σ_tokens ‖s − t‖² / Σ_tokens ‖t‖² (relative to the teacher's mean square)."""
    if kind not in ("cosine", "mse"):
        raise ExplorerError(f"unknown hidden-state loss '{kind}': use cosine or mse")
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ExplorerError("hidden-state distillation needs the same, non-zero number of layers "
                            "from both models")
    losses = []
    for s, t in zip(student_hidden, teacher_hidden):
        if s.shape != t.shape:
            raise ExplorerError(f"student and teacher hidden states differ in shape: "
                                f"{tuple(s.shape)} vs {tuple(t.shape)}")
        s, t = s.float(), t.float()
        m = torch.ones(s.shape[:2], device=s.device) if mask is None else mask.to(s.device, s.dtype)  # (B, T)
        if kind == "cosine":
            # 1 − cos(s, t) = ½‖ŝ − t̂‖² for unit vectors: exactly 0 when s == t
            per_token = 0.5 * (F.normalize(s, dim=-1) - F.normalize(t, dim=-1)).pow(2).sum(-1)  # (B, T)
            losses.append((per_token * m).sum() / m.sum().clamp_min(1))
        else:
            err = ((s - t).pow(2).sum(-1) * m).sum()
            losses.append(err / (t.pow(2).sum(-1) * m).sum().clamp_min(1e-12))
    return torch.stack(losses).mean()


def distil_loss(model: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor], cfg: PruneConfig,
                task: str) -> torch.Tensor:
    """One batch's distillation loss (see the module docstring). The teacher runs once, under
    no_grad; hidden states are only requested when kd_hidden_weight > 0."""
    hidden = cfg.kd_hidden_weight > 0
    with torch.no_grad():
        t_out = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=hidden)
    out = model(**batch, output_hidden_states=hidden)
    mask = batch["attention_mask"]  # (B, T)
    loss = cfg.kd_alpha * kd_loss(out.logits, t_out.logits, mask if task == "causal-lm" else None,
                                  cfg.kd_temperature)
    if out.loss is not None:  # no labels (unlabelled classifier data): the KD terms only
        loss = loss + (1 - cfg.kd_alpha) * out.loss
    if hidden:
        s_hs, t_hs = hidden_pairs(out.hidden_states, t_out.hidden_states, cfg.kd_hidden_every)
        loss = loss + cfg.kd_hidden_weight * hidden_kd_loss(s_hs, t_hs, mask, cfg.kd_hidden_loss)
    return loss


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
    if cfg.recovery not in RECOVERY:
        raise ExplorerError(f"unknown recovery '{cfg.recovery}': use one of {', '.join(RECOVERY)}")
    method = split_recovery(cfg.recovery)[1]  # the training part ("reconstruct+kd" -> "kd")
    if method == "none" or cfg.recovery_steps <= 0:
        return
    if lm.task == "encoder":
        raise ExplorerError("recovery training needs a task head (classification or causal LM)")
    if method == "kd" and teacher is None:
        raise ExplorerError("distillation needs the dense teacher model")
    torch.manual_seed(cfg.seed + stage)
    dtype = model_dtype(lm.model)
    mixed = dtype in LOW_PRECISION
    if method != "lora":
        for p in lm.model.parameters():  # full fine-tuning / KD train every weight
            p.requires_grad_(True)
    model = _lora_wrap(lm, cfg.lora_rank) if method == "lora" else lm.model
    params = [p for p in model.parameters() if p.requires_grad]
    # Mixed precision for a bfloat16 / float16 model: the trained parameters are float32 master
    # weights for the steps (an AdamW step of lr 5e-5 on a bfloat16 weight of 0.02 rounds away),
    # the forward runs in the model's dtype under autocast (float16 with loss scaling), and the
    # weights go back to the model's dtype at the end. peft's LoRA adapters are float32 already.
    masters = {p: p.dtype for p in params if p.dtype != torch.float32} if mixed else {}
    device_type = params[0].device.type if params else lm.device.type
    autocast = torch.autocast(device_type, dtype=dtype if mixed else torch.bfloat16, enabled=mixed)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    lr = cfg.lr or default_lr(method)
    model.train()
    try:
        for p in masters:
            p.data = p.data.float()
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(cfg.recovery_steps, 1))
        for step, batch in enumerate(_train_batches(lm, data, cfg.recovery_steps, cfg.train_batch_size,
                                                    seed=cfg.seed * 1000 + stage)):
            if should_stop and should_stop():
                raise Cancelled()
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for part, weight in micro_batches(lm, batch):  # gradient accumulation within the step
                with autocast:
                    loss = distil_loss(model, teacher, part, cfg, lm.task) if method == "kd" else model(**part).loss
                if not torch.isfinite(loss):
                    raise ExplorerError(f"recovery diverged at step {step + 1} (loss {loss.item()}); "
                                        "lower the learning rate")
                scaler.scale(loss * weight).backward()
                total += loss.item() * weight
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
            sched.step()
            yield step + 1, total
    finally:
        model.eval()
        if method == "lora":
            lm.model = model.merge_and_unload()  # plain weights again, original module objects
        for p, dt in masters.items():  # the model's dtype again (the merged head too)
            p.data = p.data.to(dt)
        for p in lm.model.parameters():
            p.requires_grad_(True)
            p.grad = None
