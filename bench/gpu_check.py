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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    precision = resolve_precision("auto", device)
    rng = np.random.default_rng(0)
    rows = []

    # Training step
    model = models.load_classifier(args.model).to(device)
    stepper = Stepper(model, make_optimizer(model, 5e-5, 0.01, 0.95), device, precision, 1.0)
    ids, labels = synthetic(args.batch * 64, args.max_length, rng)
    batches = [
        collate(
            {
                "input_ids": np.array(ids[i : i + args.batch], dtype=object),
                "label": labels[i : i + args.batch],
            },
            0,
            8 if device.type == "cuda" else 1,
            device,
        )  # fmt: skip
        for i in range(0, len(ids), args.batch)
    ]
    stepper.step([batches[0]], args.batch, 0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, steps, tokens = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < args.seconds:
        b = batches[steps % len(batches)]
        stepper.step([b], args.batch, steps)
        steps += 1
        tokens += int(b["attention_mask"].sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    train_flops = 3 * flops_per_token(model, 256) * tokens / dt
    rows.append(("train step (bf16, fused AdamW)", steps * args.batch / dt, train_flops))

    # Predictor
    out_dir = os.path.join("/tmp", "bertjob-gpu-check-model")
    model.save_pretrained(out_dir)
    models.load_tokenizer(args.model).save_pretrained(out_dir)
    pred = Predictor(
        out_dir, batch_size=256 if device.type == "cuda" else 32, precision="auto"
    )  # pre-tokenized batches below: the text settings do not apply
    ids, _ = synthetic(20_000 if device.type == "cuda" else 512, args.max_length, rng)
    table = pa.table({"id": [str(i) for i in range(len(ids))], "input_ids": pa.array([x.tolist() for x in ids], pa.list_(pa.int32())),
                      "reason": pa.nulls(len(ids), pa.string())})  # fmt: skip
    pred.score(table.slice(0, 512))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, n, tok = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < args.seconds:
        pred.score(table)
        n += table.num_rows
        tok += sum(len(x) for x in ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    rows.append(
        ("predictor (bf16, sorted dynamic padding)", n / dt, flops_per_token(pred.model, 256) * tok / dt)
    )

    peak = peak_flops(name)
    print(f"device: {name}; torch {torch.__version__}; precision {precision}; max_length {args.max_length}")
    print(f"{'':44} {'seq/s':>10} {'TFLOP/s':>9} {'of bf16 peak':>13}")
    for label, rate, flops in rows:
        frac = f"{flops / peak:13.1%}" if peak else f"{'n/a':>13}"
        print(f"{label:44} {rate:10.1f} {flops / 1e12:9.2f} {frac}")


if __name__ == "__main__":
    main()
