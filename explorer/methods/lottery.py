"""Lottery ticket: iterative magnitude pruning (IMP) with weight rewinding.

The run starts from the (pre-trained) dense model θ_0. If `rewind_step` = k > 0, a round 0
first trains the dense model for `recovery_steps` steps and the rewind point becomes its
weights after step k (θ_k, "late rewinding"); otherwise the rewind point is θ_0.
Then for round r = 1..R (R = `rounds`, default the number of stages):
  1. prune: in every Linear weight matrix of block L, drop the lowest-magnitude weights among
     the survivors so that a fraction 1 - (1 - s_L)^(r/R) is pruned, i.e. p_L = 1 - (1-s_L)^(1/R)
     of the remaining weights per round; s_L is the Linear-weight sparsity that makes block L's
     parameter sparsity equal its allocated S_L (explorer.allocation, as magnitude/wanda);
     magnitudes are those of the weights trained in the previous round (round 1: θ_0, or the
     round-0 weights when late rewinding);
  2. rewind: every parameter of the model goes back to the rewind point, pruned weights to 0;
  3. train the ticket for `recovery_steps` steps with the masks held (re-applied after every
     optimiser step) and evaluate: one "round" event and one stage record per round.
Unstructured like magnitude: masks do not speed up dense kernels.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch

from ..config import LotteryOptions
from ..errors import ExplorerError
from ..evaluate import metric_name
from .base import block_linear_weights
from .unstructured import NOTE, UnstructuredRun, lowest_mask


def rewind(model: torch.nn.Module, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Load the rewind point `state` into `model` (same shapes) and zero the pruned weights."""
    with torch.no_grad():
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for name, value in state.items():
            target = params.get(name, buffers.get(name))
            if target is not None:
                target.copy_(value)
        for name, keep in masks.items():
            params[name].mul_(keep.to(params[name].dtype))


def round_sparsity(final: float, r: int, rounds: int) -> float:
    """Cumulative sparsity after round r when each round prunes the same share of survivors."""
    return 1 - (1 - final) ** (r / rounds)


class LotteryRun(UnstructuredRun):
    note = NOTE
    Options = LotteryOptions

    def __init__(self, *a, **kw):
        super().__init__(*a, score="magnitude", **kw)
        self.method = "lottery"
        self.rounds = self.opts.rounds or self.prune.stages
        self.rewind_step = self.opts.rewind_step
        if self.rounds < 1:
            raise ExplorerError(f"rounds must be at least 1, got {self.rounds}")
        if self.rewind_step < 0:
            raise ExplorerError(f"rewind_step must be >= 0, got {self.rewind_step}")
        if self.rewind_step > 0 and (self.prune.recovery == "none" or self.rewind_step > self.prune.recovery_steps):
            raise ExplorerError(f"rewind_step {self.rewind_step} needs recovery training of at least that many "
                                f"steps (recovery_steps is {self.prune.recovery_steps}, "
                                f"recovery '{self.prune.recovery}')")
        self.pattern = None
        self.rewind_state: dict[str, torch.Tensor] = {}

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.lm.model.state_dict().items()}

    def _body(self) -> Iterator[dict]:
        lm, R = self.lm, self.rounds
        m = metric_name(lm)
        teacher = self.teacher
        self.rewind_state = self._state()
        rewound_to = "dense (step 0)"
        if self.rewind_step > 0:  # round 0: dense training, remember θ_k
            losses: list[float] = []
            seen = {"n": 0}

            def remember():
                seen["n"] += 1
                if seen["n"] == self.rewind_step:
                    self.rewind_state = self._state()
            yield from self._train(0, self.prune, losses, teacher, after_step=remember)
            rewound_to = f"step {self.rewind_step}"
            ev = self._eval()
            yield {"type": "round", "round": 0, "sparsity": 0.0, m: ev.get(m), "losses": losses,
                   "rewound_to": rewound_to}
        texts, labels = self._calibration(0)
        imp = self._analyze(texts, labels, ("magnitude_l1",))
        yield {"type": "analysis", "stage": 0, "importance": imp}
        allocated, final_ws = self._weight_sparsity(imp, 1, 1)
        for r in range(1, R + 1):
            t0 = time.perf_counter()
            weights = block_linear_weights(lm)
            with torch.no_grad():  # 1. prune p % of the survivors by magnitude
                for block, s in zip(weights, final_ws):
                    goal = round_sparsity(s, r, R)
                    for name, w, _ in block:
                        score = w.detach().abs().float()
                        old = self.masks.get(name)
                        if old is not None:
                            score = torch.where(old, score, torch.full_like(score, -1.0))
                        keep = lowest_mask(score, goal)
                        self.masks[name] = keep if old is None else keep & old
            rewind(lm.model, self.rewind_state, self.masks)  # 2. rewind survivors
            losses = []
            yield from self._train_masked(r, self.prune, losses, teacher)  # 3. train the ticket
            rec = self._record_unstructured(r, losses, t0, block_linear_weights(lm), allocated,
                                            round=r, rewound_to=rewound_to)
            yield {"type": "round", "round": r, "sparsity": rec.extra["sparsity_reached"],
                   m: rec.quality.get(m), "losses": losses, "rewound_to": rewound_to}
            yield self._stage_event(rec)
        self.summary.update({"rounds": R, "rewind_step": self.rewind_step, "rewound_to": rewound_to})


def make(lm, data, analysis, allocation, prune, opts=None, label=None, **run_kw):
    opts = opts or LotteryOptions()
    return LotteryRun(lm, data, analysis, allocation, prune, opts=opts,
                      label=label or f"lottery {opts.rounds or prune.stages} rounds", **run_kw)


__all__ = ["LotteryRun", "rewind", "round_sparsity", "make"]
