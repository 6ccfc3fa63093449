"""Prepare throughput against its upper bound, on the full IMDb archive (100,000 reviews).

    python bench/prepare_bench.py [--input ../shared/data/aclImdb_v1.tar.gz] [--max-length 512]

Bound: the same tokenizer's batch encoding of the same texts in one process, all cores, nothing
else (texts already in memory). A second row times bertjob's own encoder on the same texts (it takes
printable ASCII texts past BERT's normalizer, to the same ids): the job's tokenizing alone. Job: `bertjob prepare` end to end (read, clean, tokenize, write),
as a user runs it: on a laptop (it starts a local Ray) and on a running Ray (`ray start --head`,
as on a cluster or under `ray job submit`). All in the same run, on the same machine.
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

from bench.common import machine, ray_head, run_measured  # noqa: E402
from bertjob import models, storage  # noqa: E402
from bertjob.sources import IMDB_FILE  # noqa: E402


def imdb_texts(path: str) -> tuple[list[str], list[str], list[str | None]]:
    """Every review of an IMDb archive: (member names, texts, labels: pos / neg / None for unsup)."""
    names, texts, labels = [], [], []
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            match = IMDB_FILE.search(m.name) if m.isfile() else None
            if match:
                names.append(m.name)
                texts.append(tf.extractfile(m).read().decode("utf-8", errors="replace"))
                labels.append(None if match.group(2) == "unsup" else match.group(2))
    return names, texts, labels


def tokenize_bound(texts: list[str], model: str) -> float:
    """Seconds the model's tokenizer takes to batch-encode `texts` (all cores, nothing else)."""
    tok = models.load_tokenizer(model)
    t0 = time.perf_counter()
    for i in range(0, len(texts), 1000):
        tok(
            texts[i : i + 1000],
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
    return time.perf_counter() - t0


def encoder_bound(texts: list[str], model: str) -> float:
    """Seconds bertjob's own encoder (`models.Encoder.ids`: printable ASCII texts without BERT's
    normalizer, the same ids) takes on the same texts, cleaned beforehand (not timed), all cores.
    The issue's bound is the tokenizer's own encoding; this one is the job's tokenizing alone."""
    from bertjob.text import clean_text

    encoder, cleaned = models.load_encoder(model), [clean_text(t) for t in texts]
    t0 = time.perf_counter()
    for i in range(0, len(cleaned), 1000):
        encoder.ids(cleaned[i : i + 1000])
    return time.perf_counter() - t0


def run_job(args: argparse.Namespace, env: dict[str, str]) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "prepared")
        cmd = [sys.executable, "-m", "bertjob", "prepare", "--input", args.input, "--output", out,
               "--model", args.model, "--max-length", args.max_length]  # fmt: skip
        job = run_measured(cmd, env=env)
        with open(os.path.join(out, "manifest.json")) as f:
            return job, json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default="../shared/data/aclImdb_v1.tar.gz")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--max-length", default="512")
    args = ap.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    texts = imdb_texts(args.input)[1]
    n, bound_s = len(texts), tokenize_bound(texts, args.model)
    own_s = encoder_bound(texts, args.model)
    # The job reads its tokenizer from bertjob's cache, as every run after a user's first does.
    models.tokenizer_record(args.model)
    env = {**os.environ, "BERTJOB_CACHE": storage.cache_root()}
    env.pop("RAY_ADDRESS", None)
    job, manifest = run_job(args, env)
    with ray_head() as client:
        client = {**client, "BERTJOB_CACHE": storage.cache_root()}
        # The first job on a fresh head also starts Ray Data's helper actors, which stay for later jobs.
        first_job, first_manifest = run_job(args, client)
        cjob, cmanifest = run_job(args, client)
    for m in (manifest, first_manifest, cmanifest):
        assert m["rows_read"] == n, (m["rows_read"], n)
    print(f"machine: {machine()}")
    splits = {k: v["rows_written"] for k, v in manifest["splits"].items()}
    print(f"reviews: {n}; max_length {args.max_length}; splits {json.dumps(splits)}")
    print(f"{'':46} {'seconds':>8} {'reviews/s':>10} {'ratio':>6}")

    def row(name: str, seconds: float) -> None:
        print(f"{name:46} {seconds:8.1f} {n / seconds:10.0f} {bound_s / seconds:6.2f}")

    row("bound: tokenizer batch encode, 1 process", bound_s)
    row("bertjob's own encoder alone, 1 process", own_s)
    row("bertjob prepare, whole command (local Ray)", job["wall_s"])
    row("  after its Ray start-up", manifest["wall_s"] - manifest["ray_init_s"])
    row("bertjob prepare on a running Ray: first job", first_job["wall_s"])
    row("  after connecting", first_manifest["wall_s"] - first_manifest["ray_init_s"])
    row("bertjob prepare on a running Ray: next job", cjob["wall_s"])
    row("  after connecting", cmanifest["wall_s"] - cmanifest["ray_init_s"])
    print(f"next job on a running Ray against bertjob's own encoder alone: {own_s / cjob['wall_s']:.2f}")
    print(f"peak memory of the job (all its processes, RSS, local Ray): {job['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
