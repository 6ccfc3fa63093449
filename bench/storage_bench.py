"""What object storage costs: `bertjob prepare` and `bertjob infer` with input and output in S3
against the same on local disk, in one run.

    python bench/storage_bench.py [--input ../shared/data/aclImdb_v1.tar.gz] [--n 5000] [--model DIR]

The S3 endpoint is moto's server on 127.0.0.1 (`pip install 'moto[server]'`), reached through the
standard AWS_* variables as any S3-compatible store would be. It runs on this machine, so it
measures what the S3 path costs bertjob (requests, signing, multipart uploads, no rename), not a
network. Each command runs whole (Python and Ray start-up included); the model stays on local disk
so that only data input and output differ. Without --model, infer uses MiniLM with an untrained
classification head: the same work per review as a fine-tuned one.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine, run_measured  # noqa: E402
from bench.infer_bench import test_reviews  # noqa: E402
from bertjob import storage  # noqa: E402

BUCKET = "bertjob-bench"


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=5)
            return server, url
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("the moto S3 server did not start")


def classifier(tmp: str) -> str:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bertjob.models import embedded_model_path

    path = os.path.join(tmp, "minilm-classifier")
    model = AutoModelForSequenceClassification.from_pretrained(
        embedded_model_path(), num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )  # fmt: skip
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default="../shared/data/aclImdb_v1.tar.gz")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument(
        "--model", default="", help="a fine-tuned model directory (default: MiniLM, untrained head)"
    )
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    server, url = start_s3()
    env = {**os.environ, "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_REGION": "us-east-1"}  # fmt: skip
    os.environ.update(
        {k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    )
    try:
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            table = test_reviews(args.input, args.n)
            corpus = os.path.join(tmp, "reviews", "reviews.parquet")
            os.makedirs(os.path.dirname(corpus))
            pq.write_table(table, corpus)
            remote = f"s3://{BUCKET}/reviews"
            storage.copy(os.path.dirname(corpus), remote)
            model = args.model or classifier(tmp)
            where = {"local disk": (os.path.dirname(corpus), tmp), "S3 endpoint": (remote, f"s3://{BUCKET}")}
            for stage in ("prepare", "infer"):
                results = {}
                for name, (data, out_root) in where.items():
                    out = storage.join(out_root, f"{stage}-out")
                    cmd = [sys.executable, "-m", "bertjob", stage, "--input", data, "--output", out,
                           "--max-length", str(args.max_length), "--id-column", "id"]  # fmt: skip
                    cmd += (
                        ["--model", model]
                        if stage == "infer"
                        else ["--split", "test", "--validation-fraction", "0"]
                    )
                    job = run_measured(cmd, env=env)
                    manifest = storage.read_json(storage.join(out, "manifest.json"))
                    rows_done = manifest.get("rows_scored", manifest.get("rows_written"))
                    assert rows_done == len(table), (stage, name, rows_done)
                    results[name] = job["wall_s"]
                rows.append((stage, results["local disk"], results["S3 endpoint"]))
    finally:
        server.terminate()
        server.wait()
    n = args.n
    print(f"machine: {machine()}; load average before the run is the caller's to note")
    print(f"{n} IMDb test reviews (Parquet in, Parquet out), max_length {args.max_length}, whole commands")
    print(
        f"{'':10} {'local s':>8} {'S3 s':>8} {'local rev/s':>12} {'S3 rev/s':>9} {'S3 / local throughput':>22}"
    )
    for stage, local_s, s3_s in rows:
        print(
            f"{stage:10} {local_s:8.1f} {s3_s:8.1f} {n / local_s:12.1f} {n / s3_s:9.1f} {local_s / s3_s:22.2f}"
        )
    print(json.dumps({stage: round(local_s / s3_s, 3) for stage, local_s, s3_s in rows}))


if __name__ == "__main__":
    main()
