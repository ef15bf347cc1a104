"""Configuration dataclasses. Each field carries its help text once, in `metadata`, for
both the CLI (`add_arguments`) and the UI (`help_of`)."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields

METRICS = ("taylor", "fisher", "act_grad", "apt", "magnitude_l1", "magnitude_l2", "taylor_vector", "fluctuation")
LABEL_FREE_METRICS = ("magnitude_l1", "magnitude_l2", "fluctuation")  # need no gradients (fluctuation: forward only)
NORMALIZATIONS = ("maxabs", "rank", "zscore")
TRAININGS = ("none", "full", "lora", "kd")
RECOVERY = TRAININGS + ("reconstruct", "reconstruct+lora", "reconstruct+full", "reconstruct+kd")


def split_recovery(recovery: str) -> tuple[bool, str]:
    """'reconstruct+lora' -> (True, 'lora'); 'kd' -> (False, 'kd'); 'reconstruct' -> (True, 'none')."""
    if recovery.startswith("reconstruct"):
        return True, recovery.partition("+")[2] or "none"
    return False, recovery


def opt(default, help: str, choices=None, **kw):
    return field(default=default, metadata={"help": help, "choices": choices, **kw})


@dataclass
class AnalysisConfig:
    samples: int = opt(64, "calibration samples for importance estimation", min=1)
    batch_size: int = opt(16, "calibration batch size", min=1)
    metric: str = opt("taylor", "salience metric used to choose heads / neurons", METRICS)
    max_length: int = opt(0, "tokens per sample (0: the model's default: 128 for classifiers, 256 for LMs)", min=0)
    seed: int = opt(0, "seed for the choice of calibration samples")
    streamed: bool = opt(False, "layer-streamed analysis for models that do not fit with whole-model gradients: "
                         "walks the blocks one at a time on cached calibration activations (Wanda/SparseGPT style), "
                         "so peak memory is about one block plus activations; offers the forward-only metrics "
                         "(cosine importance, magnitude_l1/l2, fluctuation)")


@dataclass
class AllocationConfig:
    target: float = opt(0.3, "S_base: fraction of the prunable-block parameters to remove, in [0, 1)")
    amplitude: float = opt(0.05, "A: shifts sparsity from important to unimportant layers, S_L = S_base - A*Î_L")
    mode: str = opt("exact", "exact: redistribute what clipping removed so the budget is met exactly "
                    "(our default, a departure from the reference); reference: clip only; uniform: S_L = S_base; "
                    "search: per-layer levels chosen by an evolutionary search on the real model's val loss "
                    "(explorer.search; the CLI runs it, the app's Search button fills the table)",
                    ("exact", "reference", "uniform", "search"))
    max_sparsity: float = opt(0.95, "S_max: no layer is pruned more than this")
    round_to: int = opt(1, "round kept neuron counts to a multiple of this (e.g. 8) for faster kernels")
    split: str = opt("salience", "how a layer's cut is shared between attention and FFN: proportional "
                     "(attention units in proportion to S_L, neurons fill the rest) or salience (the split with the "
                     "least summed salience removed, attention units and neurons compared per parameter; needs a "
                     "metric on one scale for attention and FFN: taylor, taylor_vector, fisher, act_grad (loss "
                     "estimates) or fluctuation (output-error estimate), else proportional)",
                     ("proportional", "salience"))
    normalization: str = opt("maxabs", "how the layer importance I_L becomes Î_L in [-1, 1]: maxabs (the reference: "
                             "(I - mean) / max|I - mean|), rank (departure: ranks mapped linearly onto [-1, 1], ties "
                             "averaged) or zscore (departure: (I - mean) / std, halved and clipped to [-1, 1]); rank and "
                             "zscore keep one outlier layer from squeezing the others towards 0",
                             NORMALIZATIONS)
    prune_attention: bool = opt(True, "prune attention heads (whole KV groups for GQA)")
    prune_mlp: bool = opt(True, "prune FFN neurons")
    budget: str = opt("params", "what the budget counts: params (target = fraction of the block parameters removed), "
                      "flops (target = fraction of the blocks' forward FLOPs per token removed) or latency (reach "
                      "--speedup over dense as predicted by a per-layer cost model measured once on this device and "
                      "cached; encoders: forward at 32 x 128, LMs: one decode step at batch 1 over a 32-token KV "
                      "cache); S_L = S_base - A*Î_L still shapes the plan, S_base is found by bisection",
                      ("params", "flops", "latency"))
    speedup: float = opt(0.0, "predicted speed-up over dense to reach with --budget latency, e.g. 1.6 (0: unused)",
                         min=0, max=1000)


@dataclass
class PruneConfig:
    stages: int = opt(2, "K: prune from dense to the target in this many stages (1 = one-shot)", min=1, max=100)
    recovery: str = opt("reconstruct", "recovery after each stage's cut: reconstruct (closed-form refit of each block's "
                        "output projections to the dense block, layer by layer, no training), training (full, lora, "
                        "kd: distillation from the dense model), or reconstruct followed by training", RECOVERY)
    recovery_steps: int = opt(10, "optimiser steps of recovery per stage", min=0, max=100_000)
    lr: float = opt(0.0, "recovery learning rate (0: 5e-5 full, 5e-4 LoRA, 1e-4 KD)", min=0, max=1)
    train_batch_size: int = opt(16, "recovery batch size", min=1)
    lora_rank: int = opt(8, "LoRA rank for LoRA recovery", min=1, max=1024)
    kd_alpha: float = opt(0.5, "weight of the distillation (KL) loss; the task loss gets 1 - alpha", min=0, max=1)
    kd_temperature: float = opt(2.0, "distillation temperature", min=0.01, max=100)
    kd_hidden_weight: float = opt(0.0, "weight of the hidden-state distillation loss (residual stream after "
                                  "the chosen blocks, student vs dense teacher); 0: logits only", min=0, max=100)
    kd_hidden_loss: str = opt("cosine", "hidden-state distillation loss: cosine (1 - cos per token, as "
                              "DistilBERT) or mse (normalised by the teacher's mean square, as Minitron)",
                              ("cosine", "mse"))
    kd_hidden_every: int = opt(1, "distil the residual stream after every k-th block (and always the last)",
                               min=1, max=1000)
    recon_lambda: float = opt(0.0, "reconstruction ridge strength, relative to each kept channel's energy "
                              "(diag of the Gram matrix), pulling the refit toward the original weights; "
                              "0: chosen per projection on held-out calibration tokens", min=0, max=1e6)
    recon_bias: bool = opt(True, "reconstruction refits a bias that absorbs the removed channels' mean "
                           "contribution (FLAP's bias compensation); LLaMA projections get biases for it "
                           "(config attention_bias / mlp_bias)")
    recon_select: str = opt("obs", "which units reconstruction removes: obs (re-chosen per layer on the pruned "
                            "model's own inputs by greedy structured Optimal Brain Surgeon, the units whose loss the "
                            "refit can best make up; the plan's counts are kept) or metric (the analysis metric's choice)",
                            ("obs", "metric"))
    recon_weighting: str = opt("relative", "reconstruction token weights: relative (each token's error relative to "
                               "its own output, so a few massive-activation tokens do not decide the refit) or none",
                               ("relative", "none"))
    recon_samples: int = opt(0, "calibration samples for reconstruction (0: the analysis samples)", min=0)
    eval_phases: bool = opt(True, "also evaluate each stage right after the cut (and after reconstruction when "
                            "training follows), so the quality chart shows what each step buys")
    layer_drop: int = opt(0, "also remove this many whole blocks first (lowest cosine importance, ShortGPT style)", min=0)
    prune_hidden: float = opt(0.0, "also remove this fraction of the residual (hidden) channels first, across the "
                              "embeddings, every block's projections and norms and the head (Minitron's activation "
                              "salience; LLaMA keeps a multiple of the head count); it counts towards the parameter "
                              "budget, and the stages remove the rest", min=0, max=0.9)
    eval_samples: int = opt(0, "held-out examples for accuracy (0: all) / tokens for perplexity (0: 16384)", min=0)
    eval_split: str = opt("test", "split the stages are evaluated on: test for reported figures, val while tuning "
                          "a plan (the app uses val during runs and evaluates the final model on test on request)",
                          ("val", "test"))
    speed_repeats: int = opt(1, "timed repeats of the speed figures of the dense model and after every stage "
                             "(LMs: decode tokens/s with the KV cache at batch 1 and 8, 16 new tokens, and prefill "
                             "ms; encoders: latency at 1 x 128 and 32 x 128), after one warm-up; each repeat costs "
                             "about 2 s for SmolLM2 on 2 cores; 0: skip them", min=0, max=100)
    seed: int = opt(0, "random seed for recovery and sampling")


@dataclass
class PredictConfig:
    """How the plan predictor (explorer.predict) is measured: each layer cut alone at a few levels with
    the run's own cut and reconstruction, scored on a fixed slice of the val split."""
    levels: str = opt("0.25,0.5,0.75", "comma-separated per-layer sparsity levels each layer is cut to alone "
                      "(between them the response is interpolated linearly, beyond the last extrapolated)")
    tokens: int = opt(1024, "val tokens the predictor scores on (language models; rows of seq_len tokens)", min=64)
    examples: int = opt(512, "val examples the predictor scores on (classifiers)", min=16)
    seq_len: int = opt(128, "tokens per row when scoring a language model", min=16, max=4096)
    checks: int = opt(2, "whole plans run through the pipeline after the per-layer sweep (uniform at the middle "
                      "level, then random plans), to measure the predictor's error and fit its interaction "
                      "correction", min=0, max=20)
    seed: int = opt(0, "seed of the random check plans")


@dataclass
class SearchConfig:
    """The per-layer allocation search (explorer.search): a (1 + λ) evolutionary search in the style of
    EvoPress, with level-switch mutations at a fixed total and multi-step selection."""
    generations: int = opt(40, "generations of the (1 + λ) search (each: λ offspring, the best few re-scored)",
                           min=1, max=100_000)
    offspring: int = opt(8, "λ: offspring per generation", min=1, max=256)
    survivors: int = opt(2, "offspring re-scored on the larger token set each generation", min=1, max=64)
    step: float = opt(0.05, "size of one sparsity level: a mutation moves this much sparsity from one layer "
                      "to another", min=0.005, max=0.5)
    max_moves: int = opt(3, "level switches per offspring, at most (1 to this, uniformly)", min=1, max=64)
    small: int = opt(256, "val tokens (LMs) / examples (classifiers) that rank the offspring", min=8)
    large: int = opt(1024, "val tokens / examples that rank the survivors against the parent", min=8)
    max_seconds: float = opt(300.0, "stop after this many seconds (0: no limit); the best plan so far is kept",
                             min=0)
    prescreen: bool = opt(True, "with a measured predictor, draw 3λ candidates and score only the λ it "
                          "predicts best")
    seed: int = opt(0, "seed of the mutations")


def validate(cfg) -> None:
    """Check every field against its `choices` and `min`/`max` metadata; raises ExplorerError
    naming the field and the bad value."""
    import math

    from .errors import ExplorerError
    for f in fields(cfg):
        v, md = getattr(cfg, f.name), f.metadata
        flag = "--" + f.name.replace("_", "-")
        if md.get("choices") and v not in md["choices"]:
            raise ExplorerError(f"{flag} must be one of {', '.join(md['choices'])}, got '{v}'")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise ExplorerError(f"{flag} must be a finite number, got {v}")
        if "min" in md and v < md["min"] or "max" in md and v > md["max"]:
            lo, hi = md.get("min", "-inf"), md.get("max", "inf")
            raise ExplorerError(f"{flag} must be in [{lo}, {hi}], got {v}")


def help_of(cls, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


def default_of(cls, name: str):
    """A field's default: the one source of defaults for the library, the CLI, the app and the bench."""
    return next(f.default for f in fields(cls) if f.name == name)


def choices_of(cls, name: str):
    return next(f.metadata.get("choices") for f in fields(cls) if f.name == name)


def add_arguments(parser: argparse.ArgumentParser, cls, skip=(), rename: dict | None = None,
                  unset: bool = False, tag=None) -> None:
    """Add one --option per field of `cls` (field `foo_bar` -> `--foo-bar`). unset: the flag defaults to
    None (so a caller sees what the user set; the help still names the field's default); tag(name):
    a prefix for the field's help, e.g. the methods the option belongs to."""
    rename = rename or {}
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + rename.get(f.name, f.name).replace("_", "-")
        default = f.default if f.default is not MISSING else None
        kw = {"default": None if unset else default, "dest": f.name,
              "help": f"{tag(f.name) if tag else ''}{f.metadata.get('help', '')} (default: {default})"}
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag, type=type(default), choices=f.metadata.get("choices"), **kw)


def from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


# --- the methods' own options (explorer.methods): one dataclass per method, CLI flags and UI controls ---
# generated from them as from the configs above. They live here, not in explorer/methods, so that the
# CLI can build its flags without importing torch.

@dataclass
class APTOptions:
    tuning: str = opt("lora", "lora: APT adapters (low-rank, ranks grown in the most salient ones) on every block "
                      "linear, base weights frozen, merged at the end; the self-distillation teacher is the same "
                      "model with adapters off and masks 1. full: every weight trained; the teacher is a host (CPU) "
                      "copy of the dense model", ("lora", "full"))
    adapter_rank: int = opt(8, "initial rank of every APT adapter (tuning lora)", min=1, max=1024)
    adapter_scale: float = opt(2.0, "adapter output scale s in W x + s*B A x (fixed while ranks grow)",
                               min=1e-6, max=1e4)
    adapter_budget: float = opt(2.0, "most adapter parameters, as a multiple of the initial ones (1: no rank "
                                "growth)", min=1.0, max=1000.0)
    rank_growth_steps: int = opt(2, "rank growth events, evenly spaced over the pruning phase: the top half of "
                                 "the adapters by salience sum|B*dL/dB| get extra ranks (0: none)", min=0, max=1000)
    update_frequency: int = opt(0, "re-estimate the salience from the training batches (and the masks' targets) "
                                "every this many optimiser steps (0: a tenth of the pruning phase, at least 1, at most the document's 100)",
                                min=0, max=1_000_000)
    salience_momentum: float = opt(0.9, "EMA momentum of the salience, s = m*s + (1-m)*s_new", min=0.0, max=0.999)
    salience_scale: str = opt("eq5", "eq5: APT's Eq. 5 as written, sum|dL/dH|*sum|H| + sqrt(kurtosis); layer_mean: "
                              "each term divided by its mean over the (layer, kind) before adding; first_order: "
                              "Eq. 5 rescaled per (layer, kind) to the mean first-order loss estimate |sum H*dL/dH|",
                              ("eq5", "layer_mean", "first_order"))
    prune_until: float = opt(0.7, "share of the run's optimiser steps over which the cubic schedule prunes; the "
                             "pruned units' masks reach exactly 0 by then, the remaining steps train with them at 0",
                             min=0.0, max=1.0)
    hidden_fraction: float = opt(0.0, "also prune this fraction of the hidden (residual) channels, lowest "
                                 "activation salience first, with soft masks in every norm during training and "
                                 "physical removal at the end", min=0.0, max=0.9)
    self_distill: float = opt(0.5, "weight mu of the self-distillation loss at the end of the pruning phase (it "
                              "rises linearly from 0; the task loss gets 1 - mu); 0: task loss only",
                              min=0.0, max=1.0)
    self_distill_hidden: float = opt(1.0, "weight of the hidden-state term (prune.kd_hidden_loss) next to the "
                                     "logits' KL inside the self-distillation loss", min=0.0, max=100.0)


@dataclass
class AdaPrunerOptions:
    trials: int = opt(50, "TPE trials (each a one-shot cut scored on the val split)", min=1, max=100_000)
    subsets: int = opt(8, "disjoint calibration subsets to choose from (a categorical choice)", min=1, max=10_000)
    taylor_orders: str = opt("all", "Taylor orders the search may choose for both granularities: all (first, "
                             "second, both), or one of them fixed; second = the Fisher (diagonal / per-vector) "
                             "second-order term, both = first + second", ("all", "first", "second", "both"))
    search_amplitude: bool = opt(False, "also search the amplitude A in [0, amplitude_max]")
    amplitude_max: float = opt(0.2, "the largest A searched", min=0.0, max=1.0)
    val_samples: int = opt(0, "val examples (classifiers) / tokens (LMs) per trial (0: 256 / 4096)", min=0)
    trial_refit: bool = opt(True, "score each trial after a closed-form ridge refit of the cut output projections "
                            "(Gram matrices of their dense inputs, computed once per subset; non-sequential); "
                            "False: the plain cut")
    trial_lambda: float = opt(0.1, "ridge strength of the per-trial refit, relative to each kept channel's energy "
                              "(as --recon-lambda)", min=1e-6, max=1e6)
    keep_searched_units: bool = opt(True, "the final stages' reconstruction keeps the units the searched importance "
                                    "chose (recon_select metric); False: the configured --recon-select (obs re-chooses "
                                    "them, so only the per-layer counts would follow the search)")


@dataclass
class UnstructuredOptions:
    pattern: str = opt("none", "N:M semi-structured pattern, e.g. 2:4 (none: free masks per row)")


@dataclass
class LotteryOptions:
    rounds: int = opt(0, "pruning rounds (0: the number of stages)", min=0)
    rewind_step: int = opt(0, "rewind to the weights after this many training steps (0: the dense start)", min=0)


@dataclass
class FusionOptions:
    fusion_rule: str = opt("attention", "how the coarse (vector-wise) and fine (element-wise) Taylor estimates are "
                           "fused per (layer, kind): attention (default; our reading of arXiv 2403.10799, whose "
                           "exact formula was not available: softmax attention over the two estimates) or "
                           "inverse-variance (our own variant: weights from split-half noise)",
                           ("attention", "inverse-variance"))
    fusion_temperature: float = opt(1.0, "temperature tau of the attention rule's softmax", min=1e-6, max=1e6)


@dataclass
class DistillOptions:
    distill_hidden_weight: float = opt(1.0, "weight of the hidden-state loss next to the logits' KL (DistilBERT "
                                       "matches hidden states too; 0: logits only)", min=0.0, max=1000.0)
    distill_hidden_loss: str = opt("cosine", "hidden-state loss: cosine (DistilBERT) or mse relative to the "
                                   "teacher's mean square (Minitron)", ("cosine", "mse"))


@dataclass
class LoraPruneFtOptions:
    pre_fraction: float = opt(0.5, "share of the LoRA steps (stages x recovery steps) spent on the dense model "
                              "before pruning; the rest fine-tunes the pruned model", min=0.0, max=1.0)


METHOD_OPTIONS: dict[str, type] = {"apt": APTOptions, "adapruner": AdaPrunerOptions, "magnitude": UnstructuredOptions,
                                   "wanda": UnstructuredOptions, "lottery": LotteryOptions,
                                   "lora-prune-ft": LoraPruneFtOptions, "distill-baseline": DistillOptions,
                                   "fusion": FusionOptions}


def option_fields() -> dict[str, list[str]]:
    """Option field name -> the methods that have it (the CLI makes one flag per name)."""
    out: dict[str, list[str]] = {}
    for method, cls in METHOD_OPTIONS.items():
        for f in fields(cls):
            out.setdefault(f.name, []).append(method)
    return out
