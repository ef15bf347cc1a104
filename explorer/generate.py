"""Reading what a model does: continue a prompt (causal LMs) or classify a sentence
(classifiers), timed, so that a dense and a pruned model can be put side by side."""
from __future__ import annotations

import time

import torch

from .errors import ExplorerError
from .models import LoadedModel

MAX_NEW_TOKENS = 512
MAX_PROMPT_CHARS = 4000


def _check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ExplorerError("type a prompt first")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ExplorerError(f"the prompt has {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    return prompt


@torch.inference_mode()
def generate(lm: LoadedModel, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0,
             seed: int = 0) -> dict:
    """Greedy (temperature 0) or sampled continuation with the KV cache. Returns the new text
    only, the number of new tokens and tokens/s of the whole call (prefill included)."""
    if lm.task != "causal-lm":
        raise ExplorerError(f"'{lm.name}' is not a language model: use classify")
    _check_prompt(prompt)
    if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS:
        raise ExplorerError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")
    if temperature < 0:
        raise ExplorerError(f"temperature must be >= 0, got {temperature}")
    enc = lm.tokenizer(prompt, return_tensors="pt", truncation=True, max_length=lm.max_positions - int(max_new_tokens))
    ids = enc.input_ids.to(lm.device)  # [1, T]
    sample = temperature > 0
    kw = {"do_sample": True, "temperature": float(temperature), "top_k": 0} if sample else {"do_sample": False}
    if sample:
        torch.manual_seed(seed)
    lm.model.eval()
    t0 = time.perf_counter()
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_new_tokens),
                            pad_token_id=lm.tokenizer.pad_token_id, **kw)  # [1, T + new]
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return {"text": lm.tokenizer.decode(new, skip_special_tokens=True), "new_tokens": int(new.numel()),
            "prompt_tokens": int(ids.shape[1]), "seconds": seconds,
            "tokens_per_s": new.numel() / max(seconds, 1e-9), "greedy": not sample}


@torch.inference_mode()
def classify(lm: LoadedModel, text: str) -> dict:
    """Class probabilities of one sentence, with the label names the model carries."""
    if lm.task != "classification":
        raise ExplorerError(f"'{lm.name}' is not a classifier")
    _check_prompt(text)
    lm.model.eval()
    t0 = time.perf_counter()
    logits = lm.model(**lm.encode([text])).logits[0]  # [C]
    seconds = time.perf_counter() - t0
    probs = torch.softmax(logits.float(), -1).tolist()
    names = getattr(lm.model.config, "id2label", None) or {}
    labels = [str(names.get(i, names.get(str(i), f"class {i}"))) for i in range(len(probs))]
    best = max(range(len(probs)), key=probs.__getitem__)
    return {"label": labels[best], "probabilities": dict(zip(labels, probs)), "seconds": seconds}
