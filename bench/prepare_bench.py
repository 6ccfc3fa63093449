"""Prepare throughput against its upper bound, on the full IMDb archive (100,000 reviews).

    python bench/prepare_bench.py [--input ../shared/data/aclImdb_v1.tar.gz] [--max-length 512]

Bound: the same tokenizer's batch encoding of the same texts in one process, all cores, nothing
else (texts already in memory). Job: `bertjob prepare` end to end (read, clean, tokenize, write),
as a user runs it. Both in the same run, on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine, run_measured  # noqa: E402
from bertjob import models  # noqa: E402
from bertjob.sources import IMDB_FILE  # noqa: E402


def bound(path: str, model: str) -> tuple[int, float]:
    texts = []
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            if m.isfile() and IMDB_FILE.search(m.name):
                texts.append(tf.extractfile(m).read().decode("utf-8", errors="replace"))
    tok = models.load_tokenizer(model)
    t0 = time.perf_counter()
    for i in range(0, len(texts), 1000):
        tok(
            texts[i : i + 1000],
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
    return len(texts), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default="../shared/data/aclImdb_v1.tar.gz")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--max-length", default="512")
    args = ap.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    n, bound_s = bound(args.input, args.model)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "prepared")
        cmd = [sys.executable, "-m", "bertjob", "prepare", "--input", args.input, "--output", out,
               "--model", args.model, "--max-length", args.max_length]  # fmt: skip
        job = run_measured(cmd)
        manifest = json.load(open(os.path.join(out, "manifest.json")))
    rows = manifest["rows_read"]
    assert rows == n, (rows, n)
    job_s, in_job_s = job["wall_s"], manifest["wall_s"] - manifest.get("ray_init_s", 0)
    print(f"machine: {machine()}")
    print(
        f"reviews: {n}; max_length {args.max_length}; splits {json.dumps({k: v['rows_written'] for k, v in manifest['splits'].items()})}"
    )
    print(f"{'':38} {'seconds':>8} {'reviews/s':>10} {'ratio':>6}")
    print(f"{'bound: tokenizer batch encode, 1 proc':38} {bound_s:8.1f} {n / bound_s:10.0f} {1.0:6.2f}")
    print(f"{'bertjob prepare, whole command':38} {job_s:8.1f} {n / job_s:10.0f} {bound_s / job_s:6.2f}")
    print(
        f"{'bertjob prepare, after Ray start-up':38} {in_job_s:8.1f} {n / in_job_s:10.0f} {bound_s / in_job_s:6.2f}"
    )
    print(f"peak memory of the job (all its processes, RSS): {job['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
