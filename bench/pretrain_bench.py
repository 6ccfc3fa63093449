"""Masked-LM training step: the vocabulary projection everywhere (Hugging Face's own loss) vs only at
the predicted positions (bertjob.masking.MaskedLMLoss), same model, batches and masks.

    python bench/pretrain_bench.py [--model minilm] [--batch-size 32] [--max-length 128] [--steps 8]

Rounds alternate baseline and candidate; prints sequences/s of each and their ratio, and the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine  # noqa: E402
from bertjob import models  # noqa: E402
from bertjob.masking import MaskedLMLoss, Masker, MaskingRule, sparse_targets  # noqa: E402
from bertjob.training import Stepper, make_optimizer, resolve_precision, torch_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round (after 2 warm-up steps)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from transformers import AutoModelForMaskedLM

    torch_threads(os.cpu_count() or 1)
    tok = models.load_tokenizer(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision("auto", device)
    masker = Masker(MaskingRule.of(tok))
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(1000, len(tok), size=(args.batch_size, args.max_length)))
    ids[:, 0] = tok.cls_token_id
    attn = torch.ones_like(ids)
    masked, labels = masker(ids, attn, torch.Generator().manual_seed(0))
    dense = {"input_ids": masked, "attention_mask": attn, "labels": labels}
    sparse = {"input_ids": masked, "attention_mask": attn, **sparse_targets(labels)}

    def runner(wrap: bool):
        mlm = AutoModelForMaskedLM.from_pretrained(models.resolve_model(args.model)).to(device)
        net = MaskedLMLoss(mlm) if wrap else mlm
        stepper = Stepper(net, make_optimizer(net, 1e-5, 0.01, 1.0), device, precision)
        batch = {k: v.to(device) for k, v in (sparse if wrap else dense).items()}
        return lambda: stepper.step([batch], 0)

    cases = {
        "baseline: logits at every position (HF loss)": runner(False),
        "candidate: predicted positions only": runner(True),
    }
    rates: dict[str, list[float]] = {k: [] for k in cases}
    for step in cases.values():
        for _ in range(2):
            step()
    for _ in range(args.rounds):
        for name, step in cases.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
    print(
        f"{machine()}; {args.model}, batch {args.batch_size} x {args.max_length} tokens, precision {precision}"
    )
    base = max(rates[next(iter(cases))])
    for name, r in rates.items():
        print(
            f"{name:48s} {max(r):7.2f} sequences/s (rounds: {', '.join(f'{x:.2f}' for x in r)})  ratio {max(r) / base:.2f}"
        )


if __name__ == "__main__":
    main()
