"""Bounded memory: peak memory of `bertjob infer` on 100k and on 1M reviews.

    python bench/infer_memory_bench.py [--sizes 100000 1000000] [--model tiny|PATH]

The corpus is the 50,000 unlabelled IMDb reviews repeated (each copy with new ids) as Parquet files
of 50,000 rows. Memory, not speed, is the point here, so the default model is a 2-layer BERT with the
MiniLM vocabulary (random weights) to keep the 1M run within minutes on 2 cores; pass --model to use
a real one. Peak = the largest summed RSS of the job's processes (driver, Ray, workers) while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine, run_measured  # noqa: E402
from bertjob.sources import IMDB_FILE  # noqa: E402


def unsup_reviews(path: str) -> list[str]:
    texts = []
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            match = IMDB_FILE.search(m.name) if m.isfile() else None
            if match and match.group(2) == "unsup":
                texts.append(tf.extractfile(m).read().decode("utf-8", errors="replace"))
    return texts


def tiny_model(where: str) -> str:
    from transformers import BertConfig, BertForSequenceClassification

    from bertjob import models

    tok = models.load_tokenizer("minilm")
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, num_labels=2)  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(where)
    tok.save_pretrained(where)
    with open(os.path.join(where, "bertjob.json"), "w") as f:
        json.dump({"max_length": 256, "truncation": "head+tail", "head_tokens": 128, "strip_html": True}, f)
    return where


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default="../shared/data/aclImdb_v1.tar.gz")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args()
    texts = unsup_reviews(args.input)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(os.path.join(tmp, "model")) if args.model == "tiny" else args.model
        for size in args.sizes:
            corpus = os.path.join(tmp, f"corpus-{size}")
            os.makedirs(corpus)
            for copy in range((size + len(texts) - 1) // len(texts)):
                n = min(len(texts), size - copy * len(texts))
                pq.write_table(pa.table({"id": [f"c{copy}-{i}" for i in range(n)], "text": texts[:n]}),
                               os.path.join(corpus, f"part-{copy:04d}.parquet"))  # fmt: skip
            out = os.path.join(tmp, f"out-{size}")
            cmd = [sys.executable, "-m", "bertjob", "infer", "--input", corpus, "--model", model, "--output", out,
                   "--id-column", "id", "--num-workers", "2"]  # fmt: skip
            run = run_measured(cmd)
            manifest = json.load(open(os.path.join(out, "manifest.json")))
            assert manifest["rows_read"] == size == manifest["rows_scored"] + manifest["rows_quarantined"]
            results.append((size, run["wall_s"], run["peak_rss_gib"]))
    print(f"machine: {machine()}")
    print(f"model: {args.model}; corpus: the 50k unlabelled IMDb reviews repeated")
    print(f"{'reviews':>10} {'seconds':>8} {'reviews/s':>10} {'peak RSS GiB':>13}")
    for size, wall, peak in results:
        print(f"{size:>10} {wall:8.1f} {size / wall:10.0f} {peak:13.2f}")


if __name__ == "__main__":
    main()
