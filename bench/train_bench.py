"""Training throughput: this job against a plain PyTorch loop and the Hugging Face Trainer.

    python bench/train_bench.py [--max-length 256] [--batch-size 16] [--steps 0] [--short-steps 30]

Same model (embedded MiniLM-L6), data (the IMDb sample, prepared at --max-length), batch size and
sequence length, one run, one machine:
  (a) `bertjob train`, 1 worker with all cores, its defaults (bf16 autocast where the CPU supports
      it, batches grouped by length)
  (b) a plain PyTorch loop in one process at the same precision and batching (bertjob's collate,
      length grouping and step, no Ray)
  (b') the same loop with plain random batches
  (c) transformers.Trainer with its defaults (fp32, random batches, DataCollatorWithPadding)
  (d) `bertjob train` with 2 workers x 1 core (data-parallel scaling on one machine)
(a), (b) and (d) run --steps (0: one epoch, so that they see the same rows and their length-grouped
batches pad alike); (b') and (c), whose random batches all pad to max_length on IMDb, run
--short-steps. (b) and (a) run --rounds times, interleaved (b, a, b, a, ...), and each reports its best
round: a shared machine's slow spells then hit both alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine, run_measured  # noqa: E402


def rows(prepared: str) -> tuple[list, np.ndarray]:
    t = pq.read_table(os.path.join(prepared, "train")).to_pydict()
    order = np.random.default_rng(0).permutation(len(t["label"]))
    return [t["input_ids"][i] for i in order], np.array(t["label"])[order]


def plain_loop(prepared: str, batch: int, steps: int, precision: str, grouping: int) -> float:
    """(b): bertjob's collate and step in a bare loop over shuffled rows (length-grouped when
    `grouping` > 1, as the job does by default)."""
    import torch

    from bertjob import models
    from bertjob.training import Stepper, collate, group_by_length, make_optimizer

    torch.set_num_threads(os.cpu_count() or 1)
    ids, labels = rows(prepared)
    ids_arr = np.empty(len(ids), dtype=object)
    ids_arr[:] = [np.array(x) for x in ids]
    size = batch * grouping
    groups = (
        {"input_ids": ids_arr[i : i + size], "length": np.array([len(x) for x in ids_arr[i : i + size]]),
         "label": labels[i : i + size]}
        for i in range(0, len(ids_arr), size)
    )  # fmt: skip
    batches = group_by_length(groups, batch, seed=0)
    model = models.load_classifier("minilm")
    stepper = Stepper(model, make_optimizer(model, 5e-5, 0.01, 0.95), torch.device("cpu"), precision, 1.0, 1)
    t0 = time.perf_counter()
    for s in range(steps):
        stepper.step([collate(next(batches), 0)], s)
    return steps * batch / (time.perf_counter() - t0)


def hf_trainer(prepared: str, batch: int, steps: int, out: str) -> float:
    import datasets
    from transformers import Trainer, TrainingArguments

    from bertjob import models

    ids, labels = rows(prepared)
    ds = datasets.Dataset.from_dict(
        {"input_ids": ids[: steps * batch], "label": labels[: steps * batch].tolist()}
    )
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, report_to=[],
                             save_strategy="no", logging_steps=10_000, use_cpu=True)  # fmt: skip
    trainer = Trainer(model=models.load_classifier("minilm"), args=args, train_dataset=ds,
                      processing_class=models.load_tokenizer("minilm"))  # fmt: skip
    t0 = time.perf_counter()
    trainer.train()
    return steps * batch / (time.perf_counter() - t0)


def job(prepared: str, out: str, batch: int, steps: int, workers: int, precision: str) -> float:
    cpus = (os.cpu_count() or 1) // workers
    cmd = [sys.executable, "-m", "bertjob", "train", "--data", prepared, "--output", out, "--epochs", "1",
           "--max-steps", str(steps), "--num-workers", str(workers), "--cpus-per-worker", str(cpus),
           "--batch-size-per-worker", str(batch // workers), "--mixed-precision", precision,
           "--max-eval-rows", "64", "--log-every-steps", "10", "--name", f"bench-{workers}"]  # fmt: skip
    run_measured(cmd)
    return json.load(open(os.path.join(out, "metrics.json")))["train_samples_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-length", default="256")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--short-steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    import torch

    from bertjob.training import resolve_precision

    precision = resolve_precision("auto", torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        prepared = os.path.join(tmp, "prepared")
        run_measured(
            [
                sys.executable,
                "-m",
                "bertjob",
                "prepare",
                "--output",
                prepared,
                "--max-length",
                args.max_length,
            ]
        )
        b = args.batch_size
        s = args.steps or math.ceil(
            json.load(open(os.path.join(prepared, "manifest.json")))["splits"]["train"]["rows_written"] / b
        )
        rounds_a, rounds_b = [], []
        for r in range(args.rounds):
            rounds_b.append(plain_loop(prepared, b, s, precision, 8))
            rounds_a.append(job(prepared, os.path.join(tmp, f"a{r}"), b, s, 1, "auto"))
            print(f"round {r + 1}: (b) {rounds_b[-1]:.2f}  (a) {rounds_a[-1]:.2f}  ratio {rounds_a[-1] / rounds_b[-1]:.2f}",
                  flush=True)  # fmt: skip
        a, grouped = max(rounds_a), max(rounds_b)
        plain = plain_loop(prepared, b, args.short_steps, precision, 1)
        hf = hf_trainer(prepared, b, args.short_steps, os.path.join(tmp, "hf"))
        d = job(prepared, os.path.join(tmp, "d"), b, s, 2, "auto")
    print(f"machine: {machine()}")
    print(f"MiniLM-L6, IMDb sample, max_length {args.max_length}, global batch {b}; precision {precision}")
    print(f"(a) and (b): best of {args.rounds} interleaved rounds; each round: "
          + ", ".join(f"{x:.2f}/{y:.2f}" for x, y in zip(rounds_a, rounds_b)) + " (a/b samples/s)")  # fmt: skip
    print(f"{'':52} {'steps':>5} {'samples/s':>10} {'ratio':>6}")
    print(f"{'(b) plain PyTorch loop, same precision and batching':52} {s:5d} {grouped:10.2f} {1.0:6.2f}")
    print(
        f"{'(a) bertjob train, 1 worker x all cores':52} {s:5d} {a:10.2f} {a / grouped:6.2f}   (target >= 0.95)"
    )
    label = "(b') plain loop, random batches"
    print(f"{label:52} {args.short_steps:5d} {plain:10.2f} {plain / grouped:6.2f}")
    print(f"{'(c) HF Trainer, its defaults':52} {args.short_steps:5d} {hf:10.2f} {hf / grouped:6.2f}")
    print(f"{'(a) / (c)':52} {'':5} {'':10} {a / hf:6.2f}   (target >= 1.3)")
    print(
        f"{'(d) bertjob train, 2 workers x 1 core':52} {s:5d} {d:10.2f} {d / grouped:6.2f}   (2 vs 1 worker: {d / a:.2f})"
    )


if __name__ == "__main__":
    main()
