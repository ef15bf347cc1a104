"""Default recovery recipes per built-in model: PruneConfig fields chosen on **val** by
`python -m bench.recipe` (bench/recipe.py; figures, grid and test tables in bench/RECIPE.md and
bench/recipe.json), to be applied over the PruneConfig defaults when the user has not set them.

minilm-rt (bench/RECIPE.md, 2026-12-02; one stage at 40 % of the block parameters, adaptive
  A = 0.05, reconstruction, seed 0, 500 val examples). Reconstruction alone: val 0.816. None of
  the 11 distillation configurations (lr 1e-5 / 3e-5 / 1e-4, kd_alpha 0.5 / 1, T 1 / 2, hidden
  state none / cosine / mse, batch 16 / 32, 40 / 100 / 200 steps) nor the 2 LoRA ones beat it on
  val (best: KD 40 steps, lr 3e-5, T 1: 0.814; LoRA 40 steps, lr 5e-4: 0.814), and val NLL rises
  with the learning rate. Cause: the dense teacher was fine-tuned on the very train split that
  recovery trains on (teacher accuracy 0.93 there, 0.83 on val), so distilling it there teaches
  its fit to the training sentences, not what generalises, and reconstruction already keeps
  98-99 % of dense accuracy. The default is reconstruction without training; "kd_fallback" in
  EXTRA is the best distillation setting on val, for users who ask for distillation anyway.

smollm2-135m (bench/RECIPE.md, 2026-12-02; one stage at 20 %, adaptive A = 0.15 rank,
  reconstruction, seed 0, 2,048 BBC val tokens; dense val 37.36, reconstruction alone 51.61):
  distillation after reconstruction, kd_alpha 1 (pure KL, no next-token loss, as Minitron), T 1,
  logits only, batch 4 (1,024 tokens a step on CPU). Val: lr 1e-4 x 16 steps 48.59, lr 3e-5 x 16
  steps 49.81, lr 1e-4 x 40 steps 47.13 (chosen; stopped at step 35 by the bench's 10-minute cap on
  one shared CPU thread, so the schedule had not quite reached 0). Test (BBC 16,384 tokens, seed 0):
  41.07 -> 36.87 (1.27x dense 29.06; IMDB 87.85 -> 78.45), short of the 1.15x goal within that
  time. More steps keep helping (16 -> 35 steps: val 48.59 -> 47.13); raise recovery_steps where
  the hardware allows.
"""
from __future__ import annotations

import copy

RECIPES: dict[str, dict] = {
    "minilm-rt": {"recovery": "reconstruct", "recovery_steps": 0},
    "smollm2-135m": {"recovery": "reconstruct+kd", "recovery_steps": 40, "lr": 1e-4, "train_batch_size": 4,
                     "kd_alpha": 1.0, "kd_temperature": 1.0, "kd_hidden_weight": 0.0, "kd_hidden_loss": "cosine"},
}

# The Allocation tab's starting point per built-in model: the (normalisation, A) that val chose most
# often after reconstruction in bench/RECON.md (2026-12-02, 3 seeds per budget): SmolLM2 rank / 0.15 at
# every budget and seed (9 of 9; with maxabs, layer 0's outlier leaves the other 29 layers within ±0.1
# of each other, so moving A changes almost nothing); MiniLM-RT maxabs / 0.05 (5 of 9, rank / 0.15 won
# the 60 % budget). The salience metric stays taylor for both (the bench's metric).
ALLOCATION_DEFAULTS: dict[str, dict] = {
    "smollm2-135m": {"normalization": "rank", "amplitude": 0.15},
    "minilm-rt": {"normalization": "maxabs", "amplitude": 0.05},
}


def allocation_defaults(model_name: str) -> dict:
    """The Allocation tab's (normalisation, A) for a built-in model; {} for any other model."""
    return dict(ALLOCATION_DEFAULTS.get((model_name or "").strip().lower(), {}))


# Not defaults: the best distillation setting on val where the default trains nothing.
EXTRA: dict[str, dict] = {
    "minilm-rt": {"kd_fallback": {"recovery": "reconstruct+kd", "recovery_steps": 40, "lr": 3e-5,
                                  "train_batch_size": 16, "kd_alpha": 0.5, "kd_temperature": 1.0,
                                  "kd_hidden_weight": 0.0, "kd_hidden_loss": "cosine"}},
}


def recipe_for(model_name: str) -> dict:
    """The default recovery recipe (PruneConfig field -> value) of a built-in model; {} for any
    other model. The name is matched case-insensitively; the dict is a copy."""
    return copy.deepcopy(RECIPES.get((model_name or "").strip().lower(), {}))
