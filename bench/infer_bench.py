"""`bertjob infer` against the Hugging Face pipeline on the same 5,000 IMDb test reviews.

    python bench/infer_bench.py --model bertjob-output/train/model [--max-length 512] [--batch-size 64]

Baseline: transformers.pipeline("text-classification", model, batch_size, truncation=True,
max_length) in one process (model loading included). Candidate: the `bertjob infer` command end to
end (Python and Ray start-up included). Same model, texts, max_length and batch size, in the same
run. Accuracy of both is computed here from their predictions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine, run_measured  # noqa: E402
from bertjob.sources import IMDB_FILE  # noqa: E402


def test_reviews(path: str, n: int) -> pa.Table:
    """n IMDb test reviews, balanced, chosen by a hash of the file name (the same every run)."""
    rows = []
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            match = IMDB_FILE.search(m.name) if m.isfile() else None
            if match and match.group(1) == "test":
                rows.append(
                    (
                        hashlib.sha256(m.name.encode()).hexdigest(),
                        m.name,
                        match.group(2),
                        tf.extractfile(m).read().decode(),
                    )
                )
    rows.sort()
    pos = [r for r in rows if r[2] == "pos"][: n // 2]
    neg = [r for r in rows if r[2] == "neg"][: n - n // 2]
    chosen = sorted(pos + neg, key=lambda r: r[0])
    return pa.table(
        {"id": [r[1] for r in chosen], "text": [r[3] for r in chosen], "label": [r[2] for r in chosen]}
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default="../shared/data/aclImdb_v1.tar.gz")
    ap.add_argument("--model", default="bertjob-output/train/model")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    table = test_reviews(args.input, args.n)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "reviews.parquet")
        pq.write_table(table, corpus)

        import torch
        from transformers import pipeline

        torch.set_num_threads(os.cpu_count() or 1)
        t0 = time.time()
        clf = pipeline("text-classification", model=args.model, device=0 if torch.cuda.is_available() else -1)
        preds = clf(
            table.column("text").to_pylist(),
            batch_size=args.batch_size,
            truncation=True,
            max_length=args.max_length,
        )
        base_s = time.time() - t0
        base_acc = sum(
            (p["label"] == "POSITIVE") == (y == "pos")
            for p, y in zip(preds, table.column("label").to_pylist())
        ) / len(preds)

        out = os.path.join(tmp, "scored")
        cmd = [sys.executable, "-m", "bertjob", "infer", "--input", corpus, "--model", args.model, "--output", out,
               "--id-column", "id", "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]  # fmt: skip
        job = run_measured(cmd)
        manifest = json.load(open(os.path.join(out, "manifest.json")))
        pred = pq.read_table(os.path.join(out, "predictions"), columns=["id", "label"]).to_pydict()
    truth = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))
    job_acc = sum((lab == 1) == (truth[i] == "pos") for i, lab in zip(pred["id"], pred["label"])) / len(
        pred["id"]
    )
    n = len(table)
    assert manifest["rows_scored"] == n
    print(f"machine: {machine()}")
    print(
        f"{n} IMDb test reviews, model {args.model}, max_length {args.max_length}, batch size {args.batch_size}"
    )
    print(f"{'':42} {'seconds':>8} {'reviews/s':>10} {'ratio':>6} {'accuracy':>9}")
    print(
        f"{'HF pipeline (1 process, all threads)':42} {base_s:8.1f} {n / base_s:10.1f} {1.0:6.2f} {base_acc:9.4f}"
    )
    print(
        f"{'bertjob infer, whole command':42} {job['wall_s']:8.1f} {n / job['wall_s']:10.1f} {base_s / job['wall_s']:6.2f} {job_acc:9.4f}"
    )
    print(
        f"{'bertjob, scoring stage only':42} {manifest['scoring_s']:8.1f} {n / manifest['scoring_s']:10.1f} {base_s / manifest['scoring_s']:6.2f}"
    )
    print(f"peak memory of the job (all its processes, RSS): {job['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
