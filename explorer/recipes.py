"""Default recovery recipes per built-in model: PruneConfig fields chosen on **val** by
`python -m bench.recipe` (bench/recipe.py; figures, grid and test tables in bench/RECIPE.md and
bench/recipe.json), to be applied over the PruneConfig defaults when the user has not set them.

minilm-rt: reconstruction without training. None of the distillation configurations of the grid
  (learning rate, kd_alpha, temperature, hidden-state loss, batch, steps) nor the LoRA ones beats
  reconstruction alone on val, and val NLL rises with the learning rate. Cause: the dense teacher
  was fine-tuned on the very train split that recovery trains on (bench.recipe's `--teacher-fit`
  measures its fit there against val), so distilling it there teaches its fit to the training
  sentences, not what generalises, while reconstruction already keeps nearly all of the dense
  accuracy. "kd_fallback" in EXTRA is the best distillation setting on val, for users who ask
  for distillation anyway.

smollm2-135m: distillation after reconstruction, kd_alpha 1 (pure KL, no next-token loss, as
  Minitron), T 1, logits only, batch 4 (1,024 tokens a step on CPU), lr 1e-4 x 40 steps: the best
  of bench.recipe's two rounds on BBC val (round 2 runs under a 10-minute cap on one CPU thread,
  so the schedule may stop a few steps short). It does not reach the 1.15x-dense goal on test in
  that time, and more steps keep helping: raise recovery_steps where the hardware allows.

The figures behind both choices (every configuration's val score, the chosen one's test score,
steps done, seconds) are in bench/RECIPE.md, generated from bench/recipe.json.
"""
from __future__ import annotations

import copy

RECIPES: dict[str, dict] = {
    "minilm-rt": {"recovery": "reconstruct", "recovery_steps": 0},
    "smollm2-135m": {"recovery": "reconstruct+kd", "recovery_steps": 40, "lr": 1e-4, "train_batch_size": 4,
                     "kd_alpha": 1.0, "kd_temperature": 1.0, "kd_hidden_weight": 0.0, "kd_hidden_loss": "cosine"},
}

# The Allocation tab's starting point per built-in model: the (normalisation, A) that val chose most
# often after reconstruction in bench.recon's long run of 2026-12-02 (3 seeds per budget): rank / 0.15
# for SmolLM2 (with maxabs, layer 0's outlier leaves the other 29 layers within ±0.1 of each other, so
# moving A changes almost nothing), maxabs / 0.05 for MiniLM-RT. The choices of the current run are
# the "Adaptive choices" line of each model in bench/RECON.md. The salience metric stays taylor for
# both (the bench's metric).
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
