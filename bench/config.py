"""Benchmark presets: what each mode measures, and what quick mode cuts.

Three presets share one shape:
  * smoke: tiny random models built from configs, < 60 s, used by tests/test_bench.py;
  * quick: the real bundled models (minilm-rt, smollm2-135m) on 2 CPU cores, about 30 min;
  * full:  the same grid with more seeds, budgets, steps and evaluation data (for a GPU machine).

Every number in a preset is written into results.json ("meta.config") and REPORT.md, so a
reader sees exactly what a row was computed with.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass
class ModelBench:
    """Settings for one model in the quality / speed / cost sections."""

    name: str  # built-in model name (or "tiny-bert" / "tiny-llama" in smoke mode)
    budgets: list[float]  # fractions of the prunable-block parameters removed
    seeds: list[int]  # calibration sample choice and recovery order/initialisation
    amplitudes: list[float]  # A values swept for "adaptive"; the best on val is reported
    sweep_all_seeds: bool = False  # False: sweep A on the first seed, run the others at the chosen A
    stages: int = 2  # K for the incremental runs (one-shot: K = 1)
    steps_per_stage: int = 10  # recovery steps per stage (one-shot gets stages x this in one go)
    recovery: str = "lora"
    train_batch_size: int = 16
    calib_samples: int = 64  # calibration samples per stage
    calib_batch: int = 16
    max_length: int = 0  # tokens per sample for analysis and recovery (0: the model's default)
    test_n: int = 0  # test examples (classifier, 0 = all) / test tokens (LM)
    val_n: int = 0  # val examples / tokens for choosing A
    ppl_window: int = 256  # perplexity window (LMs)
    ppl_stride: int = 256  # stride (= window: non-overlapping windows)
    torch_pruning: bool = True  # run the Torch-Pruning baseline
    tp_importances: list[str] = field(default_factory=lambda: ["taylor"])  # "taylor" and/or "magnitude"
    one_shot: bool = True
    val_for_all: bool = False  # also evaluate val for runs that do not choose A
    speed_batch: int = 32
    speed_seq: int = 128
    speed_repeats: int = 5
    cost_samples: list[int] = field(default_factory=lambda: [32, 64, 128])
    cost_max_length: int = 0
    cost_batch: int = 16
    cost_repeats: int = 3


@dataclass
class BenchConfig:
    mode: str
    models: list[ModelBench]
    methods_model: str = "minilm-rt"
    methods_budgets: list[float] = field(default_factory=lambda: [0.3, 0.5])
    methods_seed: int = 0
    methods_test_n: int = 0
    methods_speed_repeats: int = 3
    ui_repeats: int = 20
    ui_stage_model: str = "minilm-rt"
    ui_stage_full_defaults: bool = True  # time a stage with the library's default settings (as the UI)
    threads: int = 0  # torch threads (0: torch's default)

    def model(self, name: str) -> ModelBench:
        return next(m for m in self.models if m.name == name)

    def to_json(self) -> dict:
        return asdict(self)


def quick() -> BenchConfig:
    return BenchConfig("quick", [
        ModelBench("minilm-rt", budgets=[0.2, 0.4, 0.6], seeds=[0, 1], amplitudes=[0.05, 0.15],
                   stages=2, steps_per_stage=10, calib_samples=32, test_n=0, val_n=0,
                   speed_batch=32, speed_seq=128, speed_repeats=5,
                   cost_samples=[32, 64, 128], cost_repeats=2),
        ModelBench("smollm2-135m", budgets=[0.2, 0.4], seeds=[0], amplitudes=[0.05, 0.15],
                   stages=2, steps_per_stage=2, train_batch_size=4, calib_samples=8, calib_batch=8,
                   max_length=128, test_n=2048, val_n=1024, ppl_window=256, ppl_stride=256, one_shot=False,
                   speed_batch=1, speed_seq=256, speed_repeats=3,
                   cost_samples=[8], cost_max_length=128, cost_batch=8, cost_repeats=2),
    ], methods_budgets=[0.3, 0.5], methods_test_n=0, methods_speed_repeats=3, ui_repeats=20)


def full() -> BenchConfig:
    return BenchConfig("full", [
        ModelBench("minilm-rt", budgets=[0.2, 0.4, 0.6], seeds=[0, 1, 2, 3, 4], amplitudes=[0.03, 0.05, 0.1, 0.15, 0.2],
                   sweep_all_seeds=True, tp_importances=["taylor", "magnitude"], stages=4, steps_per_stage=50,
                   calib_samples=128, test_n=0, val_n=0,
                   speed_batch=32, speed_seq=128, speed_repeats=20,
                   cost_samples=[32, 64, 128, 256], cost_repeats=5),
        ModelBench("smollm2-135m", budgets=[0.2, 0.4, 0.6], seeds=[0, 1, 2], amplitudes=[0.03, 0.05, 0.1, 0.15],
                   sweep_all_seeds=True, stages=4, steps_per_stage=50, train_batch_size=8, calib_samples=64,
                   calib_batch=8, max_length=256, test_n=16384, val_n=8192, ppl_window=256, ppl_stride=128,
                   speed_batch=8, speed_seq=256, speed_repeats=10,
                   cost_samples=[32, 64, 128], cost_max_length=256, cost_batch=8, cost_repeats=5),
    ], methods_budgets=[0.3, 0.5], methods_test_n=0, methods_speed_repeats=10, ui_repeats=50)


def smoke() -> BenchConfig:
    return BenchConfig("smoke", [
        ModelBench("tiny-bert", budgets=[0.2, 0.4], seeds=[0, 1], amplitudes=[0.05, 0.15], stages=2,
                   tp_importances=["taylor", "magnitude"],
                   steps_per_stage=2, train_batch_size=8, calib_samples=16, calib_batch=8, test_n=0, val_n=0,
                   speed_batch=4, speed_seq=16, speed_repeats=2, cost_samples=[8, 16], cost_batch=8,
                   cost_repeats=2),
        ModelBench("tiny-llama", budgets=[0.2], seeds=[0], amplitudes=[0.1], stages=2, steps_per_stage=1,
                   train_batch_size=4, calib_samples=8, calib_batch=8, max_length=16, test_n=256, val_n=128,
                   ppl_window=16, ppl_stride=16, speed_batch=2, speed_seq=16, speed_repeats=2,
                   cost_samples=[8], cost_max_length=16, cost_batch=8, cost_repeats=2),
    ], methods_model="tiny-bert", methods_budgets=[0.3], methods_speed_repeats=2, ui_repeats=3,
        ui_stage_model="tiny-bert", ui_stage_full_defaults=False)


PRESETS = {"quick": quick, "full": full, "smoke": smoke}


def preset(mode: str) -> BenchConfig:
    return PRESETS[mode]()


def with_models(cfg: BenchConfig, names: list[str]) -> BenchConfig:
    """Keep only the named models (for --models)."""
    return replace(cfg, models=[m for m in cfg.models if m.name in names])


QUICK_CUTS = """\
Quick mode (`make bench`, about 30 min on 2 CPU cores) against full mode (`--full`; hours on 2 cores):
- recon, minilm-rt: 40 / 60 % (full adds 20 %), 3 seeds, 128 calibration samples (full 512), A in {0, 0.05, 0.15}
  with rank normalisation (full: also maxabs) chosen on 500 val sentences, all 1,000 test sentences; recovery rows
  at 40 % (as full).
- recon, smollm2-135m: 20 % only (full: 20 / 30 / 40 %), 1 seed (full 3), 16 calibration samples (full 32), A in
  {0, 0.15} with rank normalisation (full: also maxabs) on 1,024 val tokens (full 2,048), test 2,048 BBC + 512
  IMDB tokens (full 16,384 + 4,096); no recovery rows (full: the recipe's 40 distillation steps, at most 10 min a
  run; a step takes about 16 s on 2 cores).
- speed: the recon plans of the first seed, 5 (minilm-rt) / 3 (smollm2-135m) interleaved repeats (full 20 / 10).
- analysis cost: MiniLM 32/64/128 samples x 2 alternating repeats (full 5); SmolLM2 8 samples x 128 tokens x 2
  repeats (full: 32/64/128 x 256 tokens x 5).
- the K-stage quality section and the methods table are not run by default (`--only quality,methods`).
"""
