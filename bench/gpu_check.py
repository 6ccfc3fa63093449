"""GPU check without Ray: the training step and the predictor of bertjob on one device.

    python bench/gpu_check.py [--seconds 20] [--batch 32] [--max-length 512]

Runs on a machine that has torch and transformers but no Ray (the lent GPU machines): synthetic
IMDb-length batches through `bertjob.training.Stepper` (bf16 autocast, fused AdamW, layer-wise lr)
and `bertjob.infer.Predictor` (length-sorted dynamic padding, bf16, inference_mode). Prints one table:
samples/s, sequences/s, and the fraction of the device's bf16 dense peak FLOP/s. Also runs on CPU
(small sizes) so the script can be tried before the GPU time is spent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bertjob import models  # noqa: E402
from bertjob.infer import Predictor  # noqa: E402
from bertjob.training import Stepper, collate, make_optimizer, resolve_precision  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def flops_per_token(model: torch.nn.Module, seq: int) -> float:
    """Forward FLOPs per token: 2 x non-embedding params + attention (4 x layers x seq x hidden)."""
    cfg = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    return 2 * params + 4 * cfg.num_hidden_layers * seq * cfg.hidden_size


def synthetic(n: int, max_length: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    # IMDb-like lengths: median ~230 tokens, long tail, capped at max_length.
    lengths = np.clip(rng.lognormal(np.log(230), 0.6, n).astype(int), 16, max_length)
    return [rng.integers(1000, 29000, size=int(k)) for k in lengths], rng.integers(0, 2, n)


def train_rate(
    model_dir: str, batch: int, max_length: int, seconds: float, compiled: bool = False
) -> tuple[float, float]:
    """(samples/s, FLOP/s) of bertjob's training step on synthetic IMDb-length batches."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    model = models.load_classifier(model_dir).to(device)
    if compiled:
        model = torch.compile(model, dynamic=True)
    stepper = Stepper(
        model, make_optimizer(model, 5e-5, 0.01, 0.95), device, resolve_precision("auto", device), 1.0
    )
    ids, labels = synthetic(batch * 16, max_length, rng)
    multiple = 8 if device.type == "cuda" else 1
    batches = [collate({"input_ids": np.array(ids[i : i + batch], dtype=object), "label": labels[i : i + batch]},
                       0, multiple, device) for i in range(0, len(ids), batch)]  # fmt: skip
    for b in batches[:3]:  # warm-up (and, compiled, the first shapes)
        stepper.step([b], batch, 0)
    sync()
    t0, steps, tokens = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < seconds:
        b = batches[steps % len(batches)]
        stepper.step([b], batch, steps)
        steps += 1
        tokens += int(b["attention_mask"].sum())
    sync()
    dt = time.perf_counter() - t0
    return steps * batch / dt, 3 * flops_per_token(model, 256) * tokens / dt


def predictor_rate(
    model_dir: str, batch: int, max_length: int, seconds: float, rows: pa.Table | None = None
) -> tuple[float, float]:
    """(sequences/s, FLOP/s) of bertjob's predictor on pre-tokenized rows (synthetic by default)."""
    pred = Predictor(
        model_dir, batch_size=batch, precision="auto"
    )  # pre-tokenized: text settings do not apply
    if rows is None:
        ids, _ = synthetic(20_000 if torch.cuda.is_available() else 512, max_length, np.random.default_rng(0))
        rows = pa.table({"id": [str(i) for i in range(len(ids))], "input_ids": pa.array([x.tolist() for x in ids], pa.list_(pa.int32()))})  # fmt: skip
    rows = rows.append_column("reason", pa.nulls(rows.num_rows, pa.string()))
    tokens = int(pa.compute.sum(pa.compute.list_value_length(rows.column("input_ids"))).as_py())
    pred.score(rows.slice(0, 512))  # warm-up
    sync()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        pred.score(rows)
        n += 1
    sync()
    dt = time.perf_counter() - t0
    return n * rows.num_rows / dt, flops_per_token(pred.model, 256) * n * tokens / dt


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def save_model(model_dir: str, out_dir: str) -> str:
    """A classifier directory (random head where the model has none) with the model's tokenizer."""
    models.load_classifier(model_dir).save_pretrained(out_dir)
    models.load_tokenizer(model_dir).save_pretrained(out_dir)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args()
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    classifier = save_model(args.model, os.path.join("/tmp", "bertjob-gpu-check-model"))
    rows = [
        ("train step (bf16, fused AdamW)", *train_rate(classifier, args.batch, args.max_length, args.seconds))
    ]
    pred_batch = 256 if torch.cuda.is_available() else 32
    rows.append(("predictor (bf16, sorted dynamic padding)", *predictor_rate(classifier, pred_batch, args.max_length, args.seconds)))  # fmt: skip
    peak = peak_flops(name)
    print(f"device: {name}; torch {torch.__version__}; max_length {args.max_length}")
    print(f"{'':44} {'seq/s':>10} {'TFLOP/s':>9} {'of bf16 peak':>13}")
    for label, rate, flops in rows:
        frac = f"{flops / peak:13.1%}" if peak else f"{'n/a':>13}"
        print(f"{label:44} {rate:10.1f} {flops / 1e12:9.2f} {frac}")


if __name__ == "__main__":
    main()
