"""A GPU session's performance checks in one run, printed as one table.

    bash bench/make_gpu_kit.sh                  # here, with PyPI: .gpukit/ (Ray for the GPU image, MiniLM's
                                                # config and tokenizer; keep it out of git)
    # on the GPU machine, .gpukit brought along (device tool: carry [".gpukit"]):
    bash .gpukit/raykit/install.sh && PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_run.py
    python bench/gpu_run.py --scale toy         # the rehearsal on CPU: the same steps, small

Models have random weights (speed only): MiniLM-L6 and a BERT-base-sized config, each with the
bert-base-uncased vocabulary. Rows, each printed as it is measured (a run cut short keeps what it got):
- infer: the predictor alone on pre-tokenized reviews in memory, then `bertjob infer --use-gpu` end
  to end on N reviews (the embedded IMDb sample repeated, Parquet), with the job's own batch size
  and tokenize workers; ratio = the job's reviews/s over the predictor's sequences/s; with the GPU's
  busy share while scoring and the CPUs' over the command;
- prepare: the tokenizer's batch encoding of 100k reviews (IMDb's labelled ones, repeated; all
  cores) against `bertjob prepare` of the same reviews as an IMDb-layout tar.gz and as Parquet
  files, whole command (a local Ray) and on a running Ray; ratio = job over bound;
- train: samples/s and the fraction of the bf16 dense peak, at batch 32 and 128, and MiniLM under
  torch.compile (bench/gpu_check.py's step: bf16 autocast, fused AdamW);
- train-job: `bertjob train` of MiniLM (1 worker, on the GPU where there is one) on the IMDb sample
  prepared at the train length, with `--compile false`, then `true`, then `false` again (a slow spell
  hits both); samples/s over all steps (the compile included) and after the first 20, wall seconds,
  graphs compiled; ratio = compiled over the eager runs' mean.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ray_head, run_measured  # noqa: E402
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
        "job_timeout": 240,
        "train_job_steps": 300,
        "train_job_timeout": 480,
    },
    "toy": {
        "seconds": 2,
        "infer_n": 300,
        "prepare_n": 4_000,
        "batches": (4,),
        "train_length": 128,
        "job_timeout": 240,
        "train_job_steps": 30,
        "train_job_timeout": 1200,  # compiling MiniLM on 2 busy CPU cores took over 8 min
    },
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


def job(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[float, dict]:
    """Wall seconds of a bertjob command and its manifest; by default on a local Ray, as a user on one
    machine runs it."""
    env = env or {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = run_measured([sys.executable, "-m", "bertjob", *args], env=env, timeout=timeout)
    with open(os.path.join(args[args.index("--output") + 1], "manifest.json")) as f:
        return run["wall_s"], json.load(f)


class Usage:
    """Mean GPU and CPU use while a command runs: the GPU's busy share (NVML) over the seconds it was
    busy at all (the scoring span), and the CPUs' busy share over the whole command (/proc/stat)."""

    def __enter__(self) -> Usage:
        import threading

        self.gpu: list[int] = []
        self.cpu0 = self._cpu()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        busy, total = (b - a for a, b in zip(self.cpu0, self._cpu()))
        self.cpu = busy / total if total else 0.0

    def _sample(self) -> None:
        import torch

        while not self.stop.wait(0.5):
            self.gpu.append(torch.cuda.utilization(0) if torch.cuda.is_available() else 0)

    @staticmethod
    def _cpu() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # all but idle and iowait

    def __str__(self) -> str:
        busy = [u for u in self.gpu if u > 0]
        span = f"GPU busy {sum(busy) / len(busy):.0f}% over {len(busy) / 2:.0f} s; " if busy else ""
        return f"{span}CPUs {self.cpu:.0%} busy"


def infer_rows(add, texts: list[str], labels: list, named: dict[str, str], scale: dict, gpu: bool,
               tmp: str) -> None:  # fmt: skip
    """For each model: the predictor alone, then the whole job on the same machine."""
    tokens = tokenize_rows(texts, [None] * len(texts), None, models.load_encoder(next(iter(named.values()))),
                           TextSettings.of(DEFAULT_TEXT), False)  # fmt: skip
    ids = pa.concat_arrays([tokens.input_ids] * -(-20_000 // len(texts))) if gpu else tokens.input_ids[:64]
    pretokenized = pa.table({"id": [str(i) for i in range(len(ids))], "input_ids": ids})
    batch = 256 if gpu else 16  # the job's default batch size
    n = scale["infer_n"]
    reps = -(-n // len(texts))
    corpus = os.path.join(tmp, "infer-corpus")
    parquet_dir(corpus, (texts * reps)[:n], (labels * reps)[:n], 16)
    for name, model in named.items():
        bare, _ = predictor_rate(model, batch, 512, scale["seconds"], pretokenized)
        add(
            f"predictor alone, {name}, batch {batch}", f"{bare:.0f} seq/s", "1.00", "pre-tokenized, in memory"
        )
        with Usage() as usage:
            wall, manifest = job("infer", "--input", corpus, "--model", model, "--output", os.path.join(tmp, f"scored-{name}"),
                                 "--id-column", "id", *(["--use-gpu"] if gpu else []), timeout=scale["job_timeout"])  # fmt: skip
        assert manifest["rows_read"] == n, manifest["rows_read"]
        stage = n / manifest["scoring_s"]
        add(f"bertjob infer, {name}, {n} reviews, whole command", f"{n / wall:.0f} reviews/s", f"{n / wall / bare:.2f}",
            f"{wall:.0f} s; scoring stage {stage:.0f}/s ({stage / bare:.2f}); {usage}")  # fmt: skip


TRAIN_WARMUP = 20  # steps left out of the "after warm-up" rate (compiling happens in the first)


def train_job_rows(add, minilm: str, scale: dict, gpu: bool, tmp: str) -> None:
    """`bertjob train` with and without --compile, whole commands on the same prepared data."""
    prepared = os.path.join(tmp, "train-prepared")
    job("prepare", "--input", "imdb-sample", "--model", minilm, "--output", prepared,
        "--max-length", str(scale["train_length"]), timeout=scale["job_timeout"])  # fmt: skip
    batch = scale["batches"][0]
    results: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}  # steady, all steps, wall
    for k, compiled in enumerate((False, True, False)):
        out = os.path.join(tmp, f"train-job-{k}")
        env = {key: v for key, v in os.environ.items() if key != "RAY_ADDRESS"}
        try:
            run = run_measured([sys.executable, "-m", "bertjob", "train", "--data", prepared, "--model", minilm,
                                "--output", out, "--num-workers", "1", "--use-gpu", str(gpu).lower(),
                                "--batch-size", str(batch), "--epochs", "20", "--max-steps", str(scale["train_job_steps"]),
                                "--max-eval-rows", "64", "--log-every-steps", "10", "--compile", str(compiled).lower()],
                               env=env, timeout=scale["train_job_timeout"])  # fmt: skip
        except RuntimeError as err:  # a run past its timeout: the rows measured so far still print
            add(f"bertjob train, compile {compiled}", "failed", "", str(err).splitlines()[-1][:200])
            return
        with open(os.path.join(out, "metrics.json")) as f:
            m = json.load(f)
        late = [h for h in m["history"] if h["type"] == "train" and h["step"] > TRAIN_WARMUP]
        steady = (
            len(late) / sum(1 / h["samples_per_s"] for h in late) if late else float("nan")
        )  # equal windows
        results[compiled].append((steady, m["train_samples_per_s"], run["wall_s"]))
        add(f"bertjob train MiniLM-L6, batch {batch}, {scale['train_job_steps']} steps, compile {compiled}",
            f"{steady:.1f} samples/s", "", f"after {TRAIN_WARMUP} steps; all steps {m['train_samples_per_s']:.1f}/s; "
            f"{run['wall_s']:.0f} s whole command; graphs compiled {m.get('compiled_graphs')}")  # fmt: skip
    eager = [sum(r[i] for r in results[False]) / 2 for i in range(3)]
    ratios = [c / e for c, e in zip(results[True][0], eager)]
    add("bertjob train, compile over eager (mean of 2)", "", f"{ratios[0]:.2f}",
        f"all steps {ratios[1]:.2f}; whole command {ratios[2]:.2f}")  # fmt: skip


def _one_rayon_thread() -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # read by rayon at the process's first batch, after this


def _tokenize_chunk(item: tuple[list[str], models.Encoder]) -> int:
    texts, encoder = item
    settings = TextSettings.of(DEFAULT_TEXT)
    return len(
        tokenize_rows(texts, [None] * len(texts), None, encoder, settings, False, exact_lengths=False).reasons
    )


def tokenize_rows_capacity(add, texts: list[str], minilm: str, n: int) -> None:
    """What the CPUs can tokenize the job's way (clean, then the Rust tokenizer on one thread, in
    1,024-row batches): one process, then one per core (spawned: each its own tokenizer)."""
    import multiprocessing

    encoder = models.load_encoder(minilm)
    reps = -(-n // len(texts))
    texts = (texts * reps)[:n]
    chunks = [(texts[i : i + 1024], encoder) for i in range(0, n, 1024)]
    for procs in (1, os.cpu_count() or 1):
        with multiprocessing.get_context("spawn").Pool(procs, _one_rayon_thread) as pool:
            pool.map(_tokenize_chunk, chunks[:procs], chunksize=1)  # started, tokenizer built
            work = chunks[: max(8, len(chunks) * procs // (os.cpu_count() or 1))]
            t0 = time.perf_counter()
            done = sum(pool.map(_tokenize_chunk, work, chunksize=1))
            rate = done / (time.perf_counter() - t0)
        add(
            f"the job's tokenizing, {procs} process(es) of 1 thread",
            f"{rate:.0f} reviews/s",
            "",
            f"{done} reviews",
        )


def prepare_rows(add, texts: list[str], labels: list, minilm: str, scale: dict, tmp: str) -> None:
    n = scale["prepare_n"]
    # Labelled reviews only: a Parquet corpus has no unlabelled split, so an unlabelled row there is
    # quarantined untokenized (the first H200 run's Parquet rows did half the tar's work that way).
    texts, labels = map(list, zip(*((t, lab) for t, lab in zip(texts, labels) if lab is not None)))
    reps = -(-n // len(texts))
    texts, labels = (texts * reps)[:n], (labels * reps)[:n]
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    bound_s = tokenize_bound(texts, minilm)
    add(f"tokenizer bound, {n} reviews, all cores", f"{n / bound_s:.0f} reviews/s", "1.00", "")
    tar = os.path.join(tmp, "imdb.tar.gz")
    imdb_tar(tar, texts, labels)
    pq_corpus = os.path.join(tmp, "prepare-corpus")
    parquet_dir(pq_corpus, texts, labels, 16)
    runs = iter(range(100))

    def prepare(label: str, source: str, where: str, env: dict[str, str] | None = None) -> None:
        out = os.path.join(tmp, f"prepared-{next(runs)}")
        with Usage() as usage:
            wall, manifest = job("prepare", "--input", source, "--model", minilm, "--output", out, env=env,
                                 timeout=scale["job_timeout"])  # fmt: skip
        counts = (manifest["rows_read"], manifest["rows_written"])
        assert counts == (n, n), counts  # every row tokenized: the same work in either format
        add(f"bertjob prepare, {label}, {where}", f"{n / wall:.0f} reviews/s", f"{bound_s / wall:.2f}",
            f"{wall:.0f} s; after Ray's start {bound_s / (manifest['wall_s'] - manifest['ray_init_s']):.2f}; "
            f"validation split {manifest['validation_split_s']:.1f} s; {usage}")  # fmt: skip

    for label, source in (("IMDb tar.gz", tar), ("16 Parquet files", pq_corpus)):
        prepare(label, source, "whole command")
    with ray_head() as client:
        for label, source in (("IMDb tar.gz", tar), ("IMDb tar.gz", tar), ("16 Parquet files", pq_corpus)):
            prepare(label, source, "running Ray", client)  # the first also starts Ray Data's helpers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", choices=SCALES, default="full")
    ap.add_argument("--parts", default="train,infer,prepare,train-job", help="which rows to measure, of "
                    "tokenize, infer, infer-bert, prepare, train, train-job")  # fmt: skip
    args = ap.parse_args()
    scale = SCALES[args.scale]
    import torch

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    base = KIT if os.path.isdir(KIT) else models.resolve_model(models.EMBEDDED)
    print(f"device: {device}; {os.cpu_count()} CPU cores; torch {torch.__version__}; scale {args.scale}; "
          f"max_length {scale['train_length']} (train), 512 (infer, prepare)", flush=True)  # fmt: skip
    rows: list[tuple[str, str, str, str]] = []  # (what, rate, ratio or share of peak, note)

    def add(*row: str) -> None:  # printed as measured too: a run cut short still tells what it got
        rows.append(row)
        print("| " + " | ".join(row) + " |", flush=True)

    peak = peak_flops(device)

    def share(flops: float) -> str:
        return f"{flops / peak:.1%} of peak" if peak else f"{flops / 1e12:.2f} TFLOP/s"

    with tempfile.TemporaryDirectory() as tmp:
        minilm = random_classifier(os.path.join(tmp, "minilm"), base)
        bert_base = random_classifier(os.path.join(tmp, "bert-base"), base, hidden_size=768, num_hidden_layers=12,
                                      num_attention_heads=12, intermediate_size=3072)  # fmt: skip
        t0 = time.time()
        _, texts, labels = imdb_texts(sample_path())
        if "tokenize" in args.parts.split(","):
            tokenize_rows_capacity(add, texts, minilm, scale["prepare_n"])
        named = {"MiniLM-L6": minilm} if "infer" in args.parts.split(",") else {}
        named.update({"BERT-base": bert_base} if "infer-bert" in args.parts.split(",") else {})
        if named:
            infer_rows(add, texts, labels, named, scale, gpu, tmp)
        print(f"[infer rows: {time.time() - t0:.0f} s]", flush=True)
        if "prepare" in args.parts.split(","):
            prepare_rows(add, texts, labels, minilm, scale, tmp)
        print(f"[prepare rows: {time.time() - t0:.0f} s]", flush=True)
        if "train" in args.parts.split(","):
            for name, model in (("MiniLM-L6", minilm), ("BERT-base", bert_base)):
                for batch in scale["batches"]:
                    rate, flops = train_rate(model, batch, scale["train_length"], scale["seconds"])
                    add(f"train {name}, batch {batch}", f"{rate:.1f} samples/s", share(flops), "")
            batch = scale["batches"][-1]  # last: compiling takes the longest
            rate, flops = train_rate(minilm, batch, scale["train_length"], scale["seconds"], compiled=True)
            add(f"train MiniLM-L6, batch {batch}, torch.compile", f"{rate:.1f} samples/s", share(flops),
                "compile time not counted")  # fmt: skip
        if "train-job" in args.parts.split(","):
            train_job_rows(add, minilm, scale, gpu, tmp)
        print(f"[all rows: {time.time() - t0:.0f} s]", flush=True)

    print(f"{'':58} {'rate':>18} {'ratio':>16}  note")
    for what, rate, ratio, note in rows:
        print(f"{what:58} {rate:>18} {ratio:>16}  {note}")
    print("targets: infer >= 0.7x the predictor alone; prepare >= 0.7x the tokenizer bound")


if __name__ == "__main__":
    main()
