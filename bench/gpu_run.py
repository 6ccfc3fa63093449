"""A GPU session's performance checks in one run, printed as one table.

    bash bench/make_gpu_kit.sh                  # here, with PyPI: .gpukit/ (Ray for the GPU image, MiniLM's
                                                # config and tokenizer; keep it out of git)
    # on the GPU machine, .gpukit brought along (device tool: carry [".gpukit"]):
    bash .gpukit/raykit/install.sh && PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_run.py
    python bench/gpu_run.py --scale toy         # the rehearsal on CPU: the same steps, small

Models have random weights (speed only): MiniLM-L6 and a BERT-base-sized config, each with the
bert-base-uncased vocabulary. Rows:
- train: samples/s and the fraction of the bf16 dense peak, at batch 32 and 128, and MiniLM under
  torch.compile (bench/gpu_check.py's step: bf16 autocast, fused AdamW);
- infer: the predictor alone on pre-tokenized reviews in memory, then `bertjob infer --use-gpu` end
  to end on N reviews (the embedded IMDb sample repeated, Parquet), with the job's own batch size
  and tokenize workers; ratio = the job's reviews/s over the predictor's sequences/s;
- prepare: the tokenizer's batch encoding of 100k reviews (all cores) against `bertjob prepare` of
  the same reviews as an IMDb-layout tar.gz and as Parquet files; ratio = job over bound.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.gpu_check import peak_flops, predictor_rate, train_rate  # noqa: E402
from bench.prepare_bench import imdb_texts, tokenize_bound  # noqa: E402
from bertjob import models  # noqa: E402
from bertjob.infer import DEFAULT_TEXT  # noqa: E402
from bertjob.sources import sample_path  # noqa: E402
from bertjob.text import TextSettings, tokenize_rows  # noqa: E402

KIT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".gpukit", "minilm")
SCALES = {  # seconds per timed loop, reviews scored end to end, reviews prepared
    "full": {
        "seconds": 10,
        "infer_n": 500_000,
        "prepare_n": 100_000,
        "batches": (32, 128),
        "train_length": 512,
    },
    "toy": {"seconds": 2, "infer_n": 300, "prepare_n": 4_000, "batches": (4,), "train_length": 128},
}


def random_classifier(out: str, base: str, **overrides: int) -> str:
    """A BertForSequenceClassification with random weights shaped like `base` (a config directory)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(base, num_labels=2, **overrides)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    models.load_tokenizer(base).save_pretrained(out)
    return out


def imdb_tar(path: str, texts: list[str], labels: list[str | None]) -> None:
    """The reviews as an IMDb-layout tar.gz (train/pos/<id>_<rating>.txt ...)."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        for i, (text, label) in enumerate(zip(texts, labels)):
            data = text.encode()
            info = tarfile.TarInfo(f"aclImdb/train/{label or 'unsup'}/{i}_{7 if label == 'pos' else 2}.txt")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def parquet_dir(path: str, texts: list[str], labels: list[str | None], files: int) -> None:
    os.makedirs(path)
    per = -(-len(texts) // files)
    for k in range(0, len(texts), per):
        table = pa.table({"id": [str(i) for i in range(k, min(k + per, len(texts)))], "text": texts[k : k + per],
                          "label": labels[k : k + per]})  # fmt: skip
        pq.write_table(table, os.path.join(path, f"part-{k // per:03d}.parquet"))


def job(*args: str) -> tuple[float, dict]:
    """Wall seconds of a bertjob command (a local Ray, as a user on one machine runs it) and its manifest."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "bertjob", *args], env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"bertjob {' '.join(args)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    out = args[args.index("--output") + 1]
    with open(os.path.join(out, "manifest.json")) as f:
        return wall, json.load(f)


def infer_rows(rows: list, texts: list[str], labels: list, minilm: str, bert_base: str, scale: dict, gpu: bool,
               tmp: str) -> None:  # fmt: skip
    tokens = tokenize_rows(texts, [None] * len(texts), None, models.load_encoder(minilm), TextSettings.of(DEFAULT_TEXT), False)  # fmt: skip
    ids = pa.concat_arrays([tokens.input_ids] * -(-20_000 // len(texts))) if gpu else tokens.input_ids[:64]
    pretokenized = pa.table({"id": [str(i) for i in range(len(ids))], "input_ids": ids})
    batch = 256 if gpu else 16  # the job's default batch size
    bare, _ = predictor_rate(minilm, batch, 512, scale["seconds"], pretokenized)
    rows.append((f"predictor alone, MiniLM-L6, batch {batch}", f"{bare:.0f} seq/s", "1.00", "pre-tokenized, in memory"))  # fmt: skip
    bert, _ = predictor_rate(bert_base, batch, 512, scale["seconds"], pretokenized)
    rows.append((f"predictor alone, BERT-base, batch {batch}", f"{bert:.0f} seq/s", "", ""))
    n = scale["infer_n"]
    reps = -(-n // len(texts))
    corpus = os.path.join(tmp, "infer-corpus")
    parquet_dir(corpus, (texts * reps)[:n], (labels * reps)[:n], 16)
    wall, manifest = job("infer", "--input", corpus, "--model", minilm, "--output", os.path.join(tmp, "scored"),
                         "--id-column", "id", *(["--use-gpu"] if gpu else []))  # fmt: skip
    rows.append((f"bertjob infer, {n} reviews, whole command", f"{n / wall:.0f} reviews/s", f"{n / wall / bare:.2f}",
                 f"{wall:.0f} s; scoring stage {n / manifest['scoring_s']:.0f}/s"))  # fmt: skip


def prepare_rows(rows: list, texts: list[str], labels: list, minilm: str, n: int, tmp: str) -> None:
    reps = -(-n // len(texts))
    texts, labels = (texts * reps)[:n], (labels * reps)[:n]
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    bound_s = tokenize_bound(texts, minilm)
    rows.append((f"tokenizer bound, {n} reviews, all cores", f"{n / bound_s:.0f} reviews/s", "1.00", ""))
    tar = os.path.join(tmp, "imdb.tar.gz")
    imdb_tar(tar, texts, labels)
    pq_corpus = os.path.join(tmp, "prepare-corpus")
    parquet_dir(pq_corpus, texts, labels, 16)
    for label, source in (("IMDb tar.gz", tar), ("16 Parquet files", pq_corpus)):
        out = os.path.join(tmp, f"prepared-{len(rows)}")
        wall, manifest = job("prepare", "--input", source, "--model", minilm, "--output", out)
        assert manifest["rows_read"] == n, manifest["rows_read"]
        rows.append((f"bertjob prepare, {label}, whole command", f"{n / wall:.0f} reviews/s",
                     f"{bound_s / wall:.2f}", f"{wall:.0f} s"))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", choices=SCALES, default="full")
    ap.add_argument("--parts", default="train,infer,prepare", help="which rows to measure")
    args = ap.parse_args()
    scale = SCALES[args.scale]
    import torch

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    base = KIT if os.path.isdir(KIT) else models.resolve_model(models.EMBEDDED)
    rows: list[tuple[str, str, str, str]] = []  # (what, rate, ratio or share of peak, note)
    peak = peak_flops(device)

    def share(flops: float) -> str:
        return f"{flops / peak:.1%} of peak" if peak else f"{flops / 1e12:.2f} TFLOP/s"

    with tempfile.TemporaryDirectory() as tmp:
        minilm = random_classifier(os.path.join(tmp, "minilm"), base)
        bert_base = random_classifier(os.path.join(tmp, "bert-base"), base, hidden_size=768, num_hidden_layers=12,
                                      num_attention_heads=12, intermediate_size=3072)  # fmt: skip
        t0 = time.time()

        # Train
        if "train" in args.parts:
            for name, model in (("MiniLM-L6", minilm), ("BERT-base", bert_base)):
                for batch in scale["batches"]:
                    rate, flops = train_rate(model, batch, scale["train_length"], scale["seconds"])
                    rows.append((f"train {name}, batch {batch}", f"{rate:.1f} samples/s", share(flops), ""))
            batch = scale["batches"][-1]
            rate, flops = train_rate(minilm, batch, scale["train_length"], scale["seconds"], compiled=True)
            rows.append((f"train MiniLM-L6, batch {batch}, torch.compile", f"{rate:.1f} samples/s", share(flops),
                         "compile time not counted"))  # fmt: skip
        print(f"[train rows: {time.time() - t0:.0f} s]", flush=True)

        _, texts, labels = imdb_texts(sample_path())
        if "infer" in args.parts:  # the predictor alone, then the whole job
            infer_rows(rows, texts, labels, minilm, bert_base, scale, gpu, tmp)
        print(f"[infer rows: {time.time() - t0:.0f} s]", flush=True)
        if "prepare" in args.parts:
            prepare_rows(rows, texts, labels, minilm, scale["prepare_n"], tmp)
        print(f"[all rows: {time.time() - t0:.0f} s]", flush=True)

    print(
        f"device: {device}; {os.cpu_count()} CPU cores; torch {torch.__version__}; scale {args.scale}; "
        f"max_length {scale['train_length']} (train), 512 (infer, prepare)"
    )
    print(f"{'':58} {'rate':>18} {'ratio':>16}  note")
    for what, rate, ratio, note in rows:
        print(f"{what:58} {rate:>18} {ratio:>16}  {note}")
    print("targets: infer >= 0.7x the predictor alone; prepare >= 0.7x the tokenizer bound")


if __name__ == "__main__":
    main()
