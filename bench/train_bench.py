"""Training throughput: this job against a plain PyTorch loop and the Hugging Face Trainer.

    python bench/train_bench.py [--max-length 256] [--batch-size 16] [--steps 0] [--short-steps 30]

Same model (embedded MiniLM-L6), data (the IMDb sample, prepared at --max-length), batch size and
sequence length, one run, one machine:
  (a) `bertjob train`, 1 worker with all cores, its defaults (bf16 autocast where the CPU supports
      it, batches grouped by length)
  (b) a plain PyTorch loop in one process at the same precision and batching (bertjob's collate,
      length grouping and step, no Ray)
  (b*) the same loop with the malloc settings the job gives its workers (training.malloc_env)
  (b') the same loop with plain random batches
  (c) transformers.Trainer with its defaults (fp32, random batches, DataCollatorWithPadding)
  (d) `bertjob train` with 2 workers x 1 core (data-parallel scaling on one machine)
All run the same global batches (`training.epoch_batches`, the job's order).
(a), (b), (b*) and (d) run --steps (0: one epoch, so that they see the same rows and their length-grouped
batches pad alike); (b') and (c), whose random batches all pad to max_length on IMDb, run
--short-steps. (b), (b*) and (a) run --rounds times, interleaved (b, b*, a, b, b*, a, ...), and each reports its best
round: a shared machine's slow spells then hit both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
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


WARMUP_STEPS = 20  # the "after warm-up" rates leave out this many first steps


@dataclasses.dataclass
class Rate:
    """Samples/s over all steps, and over the steps after the first WARMUP_STEPS."""

    whole: float
    steady: float
    padding: float = float("nan")  # share of the batches' tokens that are padding


def plain_loop(prepared: str, batch: int, steps: int, precision: str, grouping: int) -> Rate:
    """(b): bertjob's collate and step in a bare loop over shuffled rows (length-grouped when
    `grouping` > 1, as the job does by default)."""
    import torch

    from bertjob import models
    from bertjob.training import Stepper, collate, epoch_batches, make_optimizer

    torch.set_num_threads(os.cpu_count() or 1)
    ids, labels = rows(prepared)
    ids_arr = np.empty(len(ids), dtype=object)
    ids_arr[:] = [np.array(x) for x in ids]
    lengths = np.array([len(x) for x in ids_arr])
    order = epoch_batches(lengths, batch, seed=42, epoch=0, length_grouping=grouping)  # the job's order
    batches = ({"input_ids": ids_arr[b], "length": lengths[b], "label": labels[b]} for b in order)
    model = models.load_classifier("minilm")
    stepper = Stepper(model, make_optimizer(model, 5e-5, 0.01, 0.95), torch.device("cpu"), precision, 1.0)
    real = padded = 0
    t0 = time.perf_counter()
    for s in range(steps):
        if s == WARMUP_STEPS:
            t_warm = time.perf_counter()
        batch_t = collate(next(batches), 0)
        real += int(batch_t["attention_mask"].sum())
        padded += batch_t["input_ids"].numel()
        stepper.step([batch_t], len(batch_t["labels"]), s)
    t1 = time.perf_counter()
    steady = (steps - WARMUP_STEPS) * batch / (t1 - t_warm) if steps > WARMUP_STEPS else float("nan")
    return Rate(steps * batch / (t1 - t0), steady, 1 - real / padded)


def plain_loop_process(
    prepared: str, batch: int, steps: int, precision: str, grouping: int, tuned: bool
) -> Rate:
    """plain_loop in a fresh process: as a user's script runs it (the system's malloc settings), or
    with the GLIBC_TUNABLES the job gives its workers (`tuned`), which must be set when a process starts."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tuned:
        from bertjob.training import malloc_env

        env.update(malloc_env())
    args = [sys.executable, os.path.abspath(__file__), "--plain", prepared, str(batch), str(steps), precision,
            str(grouping)]  # fmt: skip
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    return Rate(**json.loads(out.strip().splitlines()[-1]))


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


def job(prepared: str, out: str, batch: int, steps: int, workers: int, precision: str) -> Rate:
    cpus = (os.cpu_count() or 1) // workers
    cmd = [sys.executable, "-m", "bertjob", "train", "--data", prepared, "--output", out, "--epochs", "1",
           "--max-steps", str(steps), "--num-workers", str(workers), "--cpus-per-worker", str(cpus),
           "--batch-size", str(batch), "--mixed-precision", precision,
           "--max-eval-rows", "64", "--log-every-steps", "10", "--name", f"bench-{workers}"]  # fmt: skip
    run_measured(cmd)
    m = json.load(open(os.path.join(out, "metrics.json")))
    # The job logs samples/s per window of 10 steps; the steady rate is that of the windows after warm-up.
    late = [h for h in m["history"] if h["type"] == "train" and h["step"] > WARMUP_STEPS]
    steady = len(late) / sum(1 / h["samples_per_s"] for h in late) if late else float("nan")  # equal windows
    return Rate(m["train_samples_per_s"], steady, m["padding_fraction"])


def main() -> None:
    if sys.argv[1:2] == ["--plain"]:
        prepared, batch, steps, precision, grouping = sys.argv[2:7]
        print(
            json.dumps(
                dataclasses.asdict(plain_loop(prepared, int(batch), int(steps), precision, int(grouping)))
            )
        )
        return
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
        runs: dict[str, list[Rate]] = {"a": [], "b": [], "b*": []}
        for r in range(args.rounds):
            runs["b"].append(plain_loop_process(prepared, b, s, precision, 8, tuned=False))
            runs["b*"].append(plain_loop_process(prepared, b, s, precision, 8, tuned=True))
            runs["a"].append(job(prepared, os.path.join(tmp, f"a{r}"), b, s, 1, "auto"))
            print(f"round {r + 1}: " + "  ".join(f"({k}) {v[-1].whole:.2f} / {v[-1].steady:.2f}" for k, v in runs.items())
                  + "  (samples/s: all steps / after warm-up)", flush=True)  # fmt: skip
        best = {
            k: Rate(max(x.whole for x in v), max(x.steady for x in v), v[0].padding) for k, v in runs.items()
        }
        plain = plain_loop_process(prepared, b, args.short_steps, precision, 1, tuned=False).whole
        hf = hf_trainer(prepared, b, args.short_steps, os.path.join(tmp, "hf"))
        d = job(prepared, os.path.join(tmp, "d"), b, s, 2, "auto")
    a, grouped, tuned = best["a"], best["b"], best["b*"]
    print(f"machine: {machine()}")
    print(f"MiniLM-L6, IMDb sample, max_length {args.max_length}, global batch {b}; precision {precision}")
    print(f"(a), (b), (b*): best of {args.rounds} interleaved rounds; 'after warm-up' leaves out the first "
          f"{WARMUP_STEPS} steps")  # fmt: skip
    print(
        f"{'':50} {'steps':>5} {'samples/s':>10} {'ratio':>6} {'after warm-up':>14} {'ratio':>6} {'padding':>8}"
    )

    def line(label: str, steps: int, x: Rate, note: str = "") -> None:
        print(f"{label:50} {steps:5d} {x.whole:10.2f} {x.whole / grouped.whole:6.2f} {x.steady:14.2f} "
              f"{x.steady / grouped.steady:6.2f} {x.padding:8.1%}{note}")  # fmt: skip

    line("(b) plain PyTorch loop, same precision, batching", s, grouped)
    line("(b*) the same with the malloc settings of (a)", s, tuned)
    line("(a) bertjob train, 1 worker x all cores", s, a, "   (target (a)/(b) >= 1.0)")
    print(f"{'(a) / (b*): what Ray costs':50} {'':5} {'':10} {a.whole / tuned.whole:6.2f} {'':14} "
          f"{a.steady / tuned.steady:6.2f}")  # fmt: skip
    label = "(b') plain loop, random batches"
    print(f"{label:50} {args.short_steps:5d} {plain:10.2f} {plain / grouped.whole:6.2f}")
    print(f"{'(c) HF Trainer, its defaults':50} {args.short_steps:5d} {hf:10.2f} {hf / grouped.whole:6.2f}")
    print(f"{'(a) / (c)':50} {'':5} {'':10} {a.whole / hf:6.2f}   (target >= 1.3)")
    line("(d) bertjob train, 2 workers x 1 core", s, d, f"   (2 vs 1 worker: {d.whole / a.whole:.2f})")


if __name__ == "__main__":
    main()
