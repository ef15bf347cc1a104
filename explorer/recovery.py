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

Masks (unstructured pruning): `recover_steps(..., masks=...)` holds 0/1 masks on named weights:
full / KD training re-applies them after every optimiser step, a LoRA layer on a masked weight
computes with (W + scale·B·A) ⊙ M, so the merged model keeps its zeros and computes what was trained.

Several processes (`accelerate launch`, torchrun; or `use_accelerate=True`): accelerate's
`Accelerator` wraps the model (DDP / FSDP), every process trains an equal slice of each batch, and
the yielded loss is the whole batch's. One process without a launcher runs the plain loop.
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import types
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


class Optimisation:
    """The optimiser side of every training loop here (recovery's and APT's), in one place: AdamW
    without weight decay, the learning rate decaying linearly to 0 over `total` steps, the forward
    under autocast in the model's dtype when that is bfloat16 / float16 (`with opt.autocast:`;
    `autocast=False`: adapters computing beside the weights, as APT's), float16 with loss scaling, gradients clipped to norm 1 before each step.

    Float32 master weights (`float32_masters`) are taken by the caller before the parameters are
    wrapped (accelerate) and given back with `restore_dtypes` after the run."""

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype, device_type: str, lr: float, total: int,
                 autocast: bool = True):
        self.params = params
        mixed = dtype in LOW_PRECISION and autocast
        self.autocast = torch.autocast(device_type, dtype=dtype if mixed else torch.bfloat16, enabled=mixed)
        self.scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1 - s / max(total, 1))

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, acc=None) -> None:
        """Backward of the (scaled) loss; through accelerate's when it wraps the model."""
        scaled = self.scaler.scale(loss)
        acc.backward(scaled) if acc is not None else scaled.backward()

    def unscale(self) -> None:
        """The gradients in their true scale (before reading or clipping them; once per step)."""
        self.scaler.unscale_(self.opt)

    def step(self, clip: Callable[[], object] | None = None) -> None:
        """Clip (norm 1 over `params`, or `clip()`), step, update the scale, decay the rate.
        Call `unscale()` first."""
        clip() if clip is not None else torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()


def float32_masters(params, dtype: torch.dtype) -> dict[nn.Parameter, torch.dtype]:
    """Float32 master weights for a bfloat16 / float16 model's trained parameters (an AdamW step of
    lr 5e-5 on a bfloat16 weight of 0.02 rounds away): converts them in place and returns
    {parameter: its dtype} for `restore_dtypes`. A float32 model: nothing to do, {}."""
    if dtype not in LOW_PRECISION:
        return {}
    masters = {p: p.dtype for p in params if p.is_floating_point() and p.dtype != torch.float32}
    for p in masters:
        p.data = p.data.float()
    return masters


def restore_dtypes(masters: dict[nn.Parameter, torch.dtype]) -> None:
    """The trained parameters back in the model's dtype (and the map emptied)."""
    for p, dt in masters.items():
        p.data = p.data.to(dt)
    masters.clear()


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
                  should_stop: Callable[[], bool] | None = None, *,
                  masks: dict[str, torch.Tensor] | None = None,
                  use_accelerate: bool | None = None) -> Iterator[tuple[int, float]]:
    """Generator: trains `lm.model` in place, yielding (step, loss) after each optimiser step.
    On Stop, raises Cancelled (the caller restores the last completed model).

    masks: {parameter name in `lm.model.named_parameters()` -> 0/1 tensor of the weight's shape}:
    those weights keep their zeros while they train (see `MaskedTraining`).
    use_accelerate: train through accelerate's `Accelerator` (None: when the process was started
    by `accelerate launch` / torchrun with WORLD_SIZE > 1). Every process then trains its slice of
    each batch, accelerate all-reduces (DDP) or reduce-scatters (FSDP) the gradients, and every
    process ends with the same trained model; the loss yielded is the whole batch's."""
    if cfg.recovery not in RECOVERY:
        raise ExplorerError(f"unknown recovery '{cfg.recovery}': use one of {', '.join(RECOVERY)}")
    method = split_recovery(cfg.recovery)[1]  # the training part ("reconstruct+kd" -> "kd")
    if method == "none" or cfg.recovery_steps <= 0:
        return
    if lm.task == "encoder":
        raise ExplorerError("recovery training needs a task head (classification or causal LM)")
    if method == "kd" and teacher is None:
        raise ExplorerError("distillation needs the dense teacher model")
    acc = _accelerator(lm) if (launched_distributed() if use_accelerate is None else use_accelerate) else None
    ranks = acc.num_processes if acc else 1
    if cfg.train_batch_size % ranks:
        raise ExplorerError(f"the recovery batch size ({cfg.train_batch_size}) must be a multiple of the number "
                            f"of processes ({ranks}): every process trains an equal slice of each batch")
    masking = MaskedTraining(lm.model, masks) if masks else None
    torch.manual_seed(cfg.seed + stage)
    dtype = model_dtype(lm.model)
    if method != "lora":
        for p in lm.model.parameters():  # full fine-tuning / KD train every weight
            p.requires_grad_(True)
    model = _lora_wrap(lm, cfg.lora_rank) if method == "lora" else lm.model
    if masking:
        masking.attach(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # Mixed precision (see Optimisation): float32 masters for the steps; peft's LoRA adapters are float32 already.
    device_type = params[0].device.type if params else lm.device.type
    lr = cfg.lr or default_lr(method)
    model.train()
    wrapped, fsdp, masters = model, None, {}
    try:
        masters = float32_masters(params, dtype)
        if acc is not None:
            wrapped, fsdp = _prepare(acc, lm, model, masters)
            params = [p for p in wrapped.parameters() if p.requires_grad]
            device_type = acc.device.type
            if teacher is not None:
                teacher.to(acc.device)
            if masking:
                masking.to(acc.device)
        if masking:
            masking.apply(wrapped)  # full / KD start from the masked weights (LoRA masks its forward)
        opt = Optimisation(params, dtype, device_type, lr, cfg.recovery_steps)
        for step, batch in enumerate(_train_batches(lm, data, cfg.recovery_steps, cfg.train_batch_size,
                                                    seed=cfg.seed * 1000 + stage)):
            if should_stop and _any_rank(acc, should_stop()):
                raise Cancelled()
            opt.zero_grad()
            total = 0.0
            # one process: the whole batch; several: this process's slice of it, whose gradients
            # accelerate averages across the processes (DDP all-reduce / FSDP reduce-scatter) in backward
            n = batch["input_ids"].shape[0]
            rank = acc.process_index if acc else 0
            lo, hi = rank * n // ranks, (rank + 1) * n // ranks
            mine = batch if acc is None else {k: v[lo:hi].to(acc.device) for k, v in batch.items()}
            parts = micro_batches(lm, mine)  # gradient accumulation within the step
            for i, (part, weight) in enumerate(parts):
                sync = acc is None or i == len(parts) - 1 or fsdp is not None  # DDP: all-reduce once, at the end
                with contextlib.nullcontext() if sync else acc.no_sync(wrapped):
                    with opt.autocast:
                        loss = (distil_loss(wrapped, teacher, part, cfg, lm.task) if method == "kd"
                                else wrapped(**part).loss)
                    if _any_rank(acc, not torch.isfinite(loss).item()):
                        where = f" on process {rank}" if acc else ""
                        raise ExplorerError(f"recovery diverged at step {step + 1} (loss {loss.item()}{where}); "
                                            "lower the learning rate")
                    opt.backward(loss * weight, acc)
                total += loss.item() * weight
            if acc is not None:
                total = _batch_loss(acc, total * (hi - lo) / n)
            opt.unscale()
            # several processes, FSDP: the norm over every shard (accelerate matches the model's own parameters)
            opt.step(None if acc is None else lambda: acc.clip_grad_norm_(wrapped.parameters() if fsdp else params, 1.0))
            if masking:
                masking.apply(wrapped)
            yield step + 1, total
    finally:
        model.eval()
        if acc is not None:
            model = _unprepare(acc, lm, wrapped, model, fsdp, masters)
        if masking:
            masking.detach(model)
        if method == "lora":
            lm.model = model.merge_and_unload()  # plain weights again, original module objects
        elif model is not lm.model:
            lm.model = model
        restore_dtypes(masters)  # the model's dtype again (the merged head too)
        if masking:
            masking.apply(lm.model)  # merged LoRA deltas: zeros where the masks are
        for p in lm.model.parameters():
            p.requires_grad_(True)
            p.grad = None


# --- masks held during training (unstructured pruning) ------------------------------------------------

_WRAPPER_PARTS = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


def strip_wrappers(name: str) -> str:
    """A parameter's name without accelerate's / torch's wrappers: DDP's leading `module.`,
    FSDP1's `_fsdp_wrapped_module.`, activation checkpointing's, torch.compile's `_orig_mod.`."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    return ".".join(parts[1:] if parts[:1] == ["module"] else parts)


def plain_name(name: str) -> str:
    """A parameter's name in the unwrapped model: without the wrappers (`strip_wrappers`) and
    peft's parts (`base_model.model.`, `.base_layer`, a saved head's `.modules_to_save.default`)."""
    parts = strip_wrappers(name).split(".")
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    out, i = [], 0
    while i < len(parts):
        if parts[i] == "base_layer":
            i += 1
        elif parts[i:i + 2] == ["modules_to_save", "default"]:
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def _masked_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A peft LoRA layer's forward on its effective merged weight (W + scale·B·A) ⊙ M: the gradient
    flows through the masked delta, and `merge_and_unload` followed by the mask gives exactly the
    weight trained with (peft's delta is in the base layer's layout: (in, out) for GPT-2's Conv1D)."""
    base = self.get_base_layer()
    weight = base.weight
    for name in self.active_adapters:
        if name in self.lora_A:
            weight = weight + self.get_delta_weight(name)
    weight = weight * self._explorer_mask.to(weight.dtype)
    return torch.func.functional_call(base, {"weight": weight}, (x, *args), kwargs)


class MaskedTraining:
    """0/1 masks on named weights of the unwrapped model, held through recovery training:
    trained (full / KD) weights are multiplied by their mask after every optimiser step; a LoRA
    layer on a masked weight computes with (W + scale·B·A) ⊙ M at every step, so what is trained
    is what the merged, masked model computes."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        unknown = [n for n in masks if n not in params]
        if unknown:
            raise ExplorerError(f"masks name weights the model does not have: {', '.join(unknown[:3])}")
        self.masks: dict[str, torch.Tensor] = {}
        self.by_param: dict[int, torch.Tensor] = {}
        for name, m in masks.items():
            p = params[name]
            if tuple(m.shape) != tuple(p.shape):
                raise ExplorerError(f"the mask of '{name}' has shape {tuple(m.shape)}, the weight {tuple(p.shape)}")
            self.masks[name] = m.detach().to(p.device, torch.bool)
            self.by_param[id(p)] = self.masks[name]
        self.lora_layers: list[nn.Module] = []

    def to(self, device) -> None:
        self.masks = {n: m.to(device) for n, m in self.masks.items()}
        for layer in self.lora_layers:
            layer._explorer_mask = layer._explorer_mask.to(device)

    def attach(self, model: nn.Module) -> None:
        """Mask the forward of every peft LoRA layer whose base weight is a masked one."""
        from peft.tuners.lora import LoraLayer
        for m in model.modules():
            if isinstance(m, LoraLayer) and id(getattr(m.get_base_layer(), "weight", None)) in self.by_param:
                m._explorer_mask = self.by_param[id(m.get_base_layer().weight)]
                m.forward = types.MethodType(_masked_lora_forward, m)
                self.lora_layers.append(m)

    def detach(self, model: nn.Module) -> None:
        """peft's own forward again (before the merge), on `model` (the trained one, or its copy)."""
        for m in model.modules():
            if "_explorer_mask" in m.__dict__:
                m.__dict__.pop("forward", None)
                del m._explorer_mask
        self.lora_layers = []

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Multiply the trained masked weights of `model` (wrapped or not) by their masks. Under
        FSDP2 a weight is a sharded DTensor: the mask is sharded alike, with no communication."""
        for name, p in model.named_parameters():
            m = self.masks.get(plain_name(name))
            if m is None:
                continue
            if type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor":
                from torch.distributed.tensor import distribute_tensor
                m = distribute_tensor(m.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            elif tuple(p.shape) != tuple(m.shape):
                raise ExplorerError(f"cannot hold the mask of '{plain_name(name)}': the weight is flattened "
                                    f"({tuple(p.shape)}); masks with full / KD training under FSDP need fsdp_version 2")
            p.mul_(m.to(p.dtype))


# --- accelerate: the same loop over several processes ---------------------------------------------

def launched_distributed() -> bool:
    """True in a process started by `accelerate launch` / torchrun with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def use_cpu(device: torch.device | str | None = None) -> bool:
    """Whether accelerate should run the processes on the CPU (gloo): asked for (accelerate launch
    --cpu, a model on the CPU) or no CUDA GPU. accelerate only forms a multi-CPU group when told."""
    asked = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return asked or torch.device(device or "cpu").type == "cpu" or not torch.cuda.is_available()


def _accelerator(lm: LoadedModel):
    try:
        from accelerate import Accelerator
    except ImportError:
        raise ExplorerError("distributed recovery needs accelerate (pip install accelerate)") from None
    # precision is the model's own (float32 masters + autocast above), not accelerate's
    return Accelerator(mixed_precision="no", cpu=use_cpu(lm.device))


def _any_rank(acc, flag: bool) -> bool:
    """`flag` of any process (the same answer everywhere, so that every process stops together)."""
    if acc is None or acc.num_processes == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, "sum").item() > 0)


def _batch_loss(acc, share: float) -> float:
    """The whole batch's loss from the processes' shares of it (summed across the processes)."""
    if acc.num_processes == 1:
        return share
    return float(acc.reduce(torch.tensor([share], dtype=torch.float64, device=acc.device), "sum").item())


def _prepare(acc, lm: LoadedModel, model: nn.Module, masters: dict):
    """accelerate's wrapping of the model (DDP, FSDP, ...; none for one process); FSDP also gets
    a weightless copy of the model (meta tensors) to rebuild the trained model in after the steps."""
    from accelerate.utils import DistributedType
    fsdp = None
    if acc.distributed_type == DistributedType.FSDP:
        fsdp = {"skeleton": meta_skeleton(model),
                "masters": {plain_name(n): masters[p] for n, p in model.named_parameters() if p in masters}}
    wrapped = acc.prepare(model)
    lm.device = acc.device
    return wrapped, fsdp


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are meta tensors (no memory); buffers are copied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def load_into_skeleton(skeleton: nn.Module, state: dict[str, torch.Tensor], device) -> nn.Module:
    """The trained model: the full state dict (names as the unwrapped model gives them) assigned to
    the skeleton's parameters; tied weights (the LM head) tied again."""
    from transformers import PreTrainedModel
    skeleton.load_state_dict({strip_wrappers(k): v for k, v in state.items()}, strict=False, assign=True)
    hf = next((m for m in skeleton.modules() if isinstance(m, PreTrainedModel)), None)
    if hf is not None and getattr(hf.config, "tie_word_embeddings", False):
        hf.tie_weights()
    left = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if left:
        raise ExplorerError(f"the trained model could not be gathered: no weights for {', '.join(left[:3])}")
    return skeleton.to(device)


def _unprepare(acc, lm: LoadedModel, wrapped: nn.Module, model: nn.Module, fsdp: dict | None,
               masters: dict) -> nn.Module:
    """The trained, plain model on every process. DDP (or one process): the same module objects,
    unwrapped. FSDP: the full state dict gathered on every process, loaded into the skeleton; the
    float32 masters of a low-precision model are cast back here by name."""
    if fsdp is None:
        return acc.unwrap_model(wrapped)
    if acc.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    else:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=False)):
            state = wrapped.state_dict()
    out = load_into_skeleton(fsdp["skeleton"], state, acc.device)
    for name, p in out.named_parameters():
        dt = fsdp["masters"].get(plain_name(name))
        if dt is not None:
            p.data = p.data.to(dt)
    masters.clear()  # the skeleton's parameters are new objects: cast above
    del wrapped
    return out
