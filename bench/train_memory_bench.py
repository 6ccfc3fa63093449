"""Training memory: peak resident memory of one training process per sequence length and batch.

    python bench/train_memory_bench.py [--model minilm] [--lengths 128,256,512] [--batches 8,16]

Each cell is a fresh process that runs a few optimizer steps (bertjob's Stepper, AdamW, fp32 or
bf16 as the job picks) on batches of full-length sequences (the worst case a length-grouped batch
reaches), and reports its peak RSS (ru_maxrss). Activation memory per sequence is the slope between
the two batch sizes; the fixed part (weights, gradients, AdamW state, libraries) is what is left.
Compared in the same run: attention "eager" vs "sdpa", the system's malloc vs the job's
`malloc_tuning` (training.malloc_env), so the cost of keeping freed memory is a measured number.
`--saved` instead prints what autograd keeps for backward per sequence (a forward pass with
saved-tensor hooks, seconds on a busy machine): the slope the RSS cells measure, without the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine  # noqa: E402


def one(model_name: str, length: int, batch: int, attn: str, steps: int) -> dict:
    import torch

    from bertjob import models
    from bertjob.training import Stepper, make_optimizer, resolve_precision

    torch.manual_seed(0)
    model = models.load_classifier(model_name, attn_implementation=attn)
    precision = resolve_precision("auto", torch.device("cpu"))
    stepper = Stepper(model, make_optimizer(model, 5e-5, 0.01, 0.95), torch.device("cpu"), precision)
    vocab = model.config.vocab_size
    times = []
    for s in range(steps):
        ids = torch.randint(1000, vocab, (batch, length))
        mb = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (batch,)),
        }
        t0 = time.perf_counter()
        stepper.step([mb], batch, s)
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_rss": rss, "step_s": min(times[1:] or times), "precision": precision}


def saved_per_seq(model_name: str, length: int, attn: str, precision: str) -> float:
    """Bytes autograd saves for backward per sequence (distinct storages, one forward pass of 2)."""
    import torch

    from bertjob import models
    from bertjob.training import autocast

    model = models.load_classifier(model_name, attn_implementation=attn)
    model.train()
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
        return t

    ids = torch.randint(1000, model.config.vocab_size, (2, length))
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        autocast(precision, torch.device("cpu")),
    ):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return total / 2


def cell(model: str, length: int, batch: int, attn: str, tuned: bool, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tuned:
        from bertjob.training import malloc_env

        env.update(malloc_env())
    args = [
        sys.executable,
        os.path.abspath(__file__),
        "--one",
        model,
        str(length),
        str(batch),
        attn,
        str(steps),
    ]
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        model, length, batch, attn, steps = sys.argv[2:7]
        print(json.dumps(one(model, int(length), int(batch), attn, int(steps))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--lengths", default="128,256,512")
    ap.add_argument("--batches", default="8,16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--attention", default="sdpa,eager", help="attention implementations to compare")
    ap.add_argument(
        "--malloc", default="plain,tuned", help="plain: the system's malloc; tuned: malloc_tuning"
    )
    ap.add_argument("--saved", action="store_true", help="autograd's saved tensors per sequence only")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.saved:
        print(f"machine: {machine()}; model {args.model}; MiB saved for backward per sequence")
        for attn in args.attention.split(","):
            for precision in ("bf16", "off"):
                sizes = [saved_per_seq(args.model, n, attn, precision) / 2**20 for n in lengths]
                print(
                    f"{attn:>6} {precision:>5} " + "  ".join(f"{n}: {v:6.1f}" for n, v in zip(lengths, sizes))
                )
        return
    b1, b2 = (int(x) for x in args.batches.split(","))
    print(f"machine: {machine()}; model {args.model}; {args.steps} steps per cell, full-length rows")
    print(f"{'length':>6} {'attention':>9} {'malloc':>7} {'peak@' + str(b1):>10} {'peak@' + str(b2):>10} "
          f"{'MiB/seq':>8} {'fixed MiB':>9} {'s/step@' + str(b2):>10}")  # fmt: skip
    for length in lengths:
        for attn in args.attention.split(","):
            for tuned in [m == "tuned" for m in args.malloc.split(",")]:
                r1 = cell(args.model, length, b1, attn, tuned, args.steps)
                r2 = cell(args.model, length, b2, attn, tuned, args.steps)
                per_seq = (r2["peak_rss"] - r1["peak_rss"]) / (b2 - b1)
                fixed = r1["peak_rss"] - per_seq * b1
                print(f"{length:6d} {attn:>9} {'tuned' if tuned else 'plain':>7} {r1['peak_rss'] / 2**20:10.0f} "
                      f"{r2['peak_rss'] / 2**20:10.0f} {per_seq / 2**20:8.1f} {fixed / 2**20:9.0f} "
                      f"{r2['step_s']:10.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
