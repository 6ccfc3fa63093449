"""Prepare: raw reviews -> cleaned, tokenized, split Parquet shards plus a manifest.

    read (Corpus units, in parallel) -> tokenize_batch (clean, quarantine, tokenize, truncate,
    assign split) -> PreparedSink (one Parquet file per split per write task, plus statistics)

Validation is carved out of the corpus' `train` split. The driver only ever holds statistics and,
for the exact stratified validation split, one 64-bit hash per row (the "split pass", which reads
ids and labels only).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bertjob import models
from bertjob.config import PrepareConfig, join, to_dict
from bertjob.outputs import MANIFEST, claim_output, versions, write_json
from bertjob.sources import Corpus, InputError, filesystem, open_corpus
from bertjob.text import BAD_LABEL, EMPTY_TEXT, NULL_TEXT, cap_chars, clean_text, parse_label, truncate_ids

log = logging.getLogger(__name__)

LENGTH_HIST_MAX = 16_384  # token counts above this share the last histogram bin
QUARANTINE = "quarantine"
QUARANTINE_TEXT_CHARS = 10_000

PREPARED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.int8()),  # null in unlabelled splits
        ("input_ids", pa.list_(pa.int32())),  # with [CLS] and [SEP], unpadded
        ("length", pa.int32()),
        ("truncated", pa.bool_()),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("reason", pa.string()),
        ("label", pa.string()),
        ("text", pa.string()),
    ]
)


def row_hash(seed: int, row_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------
# Pure per-batch work (runs inside Ray Data tasks; testable without Ray).


def encode_texts(
    texts: list[str], tokenizer: Any, max_length: int, truncation: str, head_tokens: int
) -> tuple[list[list[int]], list[int]]:
    """Tokenize cleaned texts; returns ids with [CLS]/[SEP] within max_length, and the full lengths."""
    if not texts:
        return [], []
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    out, full = [], []
    for ids in enc["input_ids"]:
        kept, _ = truncate_ids(ids, max_length, truncation, head_tokens)
        out.append([cls, *kept, sep])
        full.append(len(ids) + 2)
    return out, full


def list_array(rows: list[list[int]]) -> pa.Array:
    """A list<int32> array built from flat numpy buffers: far faster than pa.array(list of lists)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def tokenize_batch(
    batch: pa.Table, cfg: dict[str, Any], thresholds: dict[int, int], split_train: str = "train"
) -> pa.Table:
    """Clean, quarantine, tokenize and assign the final split of one batch of source rows.

    `thresholds` maps label -> hash threshold: a train row whose hash is below it is validation.
    """
    c = PrepareConfig(**cfg)
    tok = models.load_tokenizer(c.model, c.trust_remote_code)
    max_chars = c.max_chars_per_end or 16 * c.max_length
    ids = batch.column("id").to_pylist()
    texts = batch.column("text").to_pylist()
    raw_labels = batch.column("label").to_pylist()
    splits = batch.column("split").to_pylist()
    n = len(ids)
    labels: list[int | None] = [None] * n
    reasons: list[str | None] = [None] * n
    capped = [False] * n
    good_idx, good_texts = [], []
    for i in range(n):
        raw = raw_labels[i]
        if raw is not None:
            labels[i] = parse_label(raw)
            if labels[i] is None:
                reasons[i] = BAD_LABEL
        if splits[i] == split_train and labels[i] is not None and labels[i] in thresholds:
            if row_hash(c.seed, ids[i]) < thresholds[labels[i]]:
                splits[i] = "validation"
        text = texts[i]
        if text is None:
            reasons[i] = NULL_TEXT
            continue
        text = clean_text(text, c.strip_html)
        if not text:
            reasons[i] = EMPTY_TEXT
            continue
        if reasons[i] is None:
            text, capped[i] = cap_chars(text, max_chars)
            good_idx.append(i)
            good_texts.append(text)
    encoded, full = encode_texts(good_texts, tok, c.max_length, c.truncation, c.head_tokens)
    input_ids: list[list[int] | None] = [None] * n
    lengths = [0] * n
    full_lengths = [0] * n
    for j, i in enumerate(good_idx):
        input_ids[i] = encoded[j]
        lengths[i] = len(encoded[j])
        full_lengths[i] = full[j]
    trunc = [full_lengths[i] > c.max_length or capped[i] for i in range(n)]
    quarantined_text = [
        (texts[i][:QUARANTINE_TEXT_CHARS] if texts[i] is not None else None) if reasons[i] else None
        for i in range(n)
    ]
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "split": pa.array(splits, pa.string()),
            "label": pa.array(labels, pa.int8()),
            "input_ids": list_array([r if r is not None else [] for r in input_ids]),
            "length": pa.array(lengths, pa.int32()),
            "full_length": pa.array(full_lengths, pa.int32()),
            "truncated": pa.array(trunc, pa.bool_()),
            "capped": pa.array(capped, pa.bool_()),
            "utf8_replaced": batch.column("utf8_replaced"),
            "reason": pa.array(reasons, pa.string()),
            "raw_label": pa.array(raw_labels, pa.string()),
            "raw_text": pa.array(quarantined_text, pa.string()),
        }
    )


# ---------------------------------------------------------------------------------------------
# Statistics: small, mergeable, computed where the rows are written.


def new_split_stats() -> dict[str, Any]:
    return {
        "rows_read": 0,
        "rows_written": 0,
        "quarantined": defaultdict(int),
        "labels": defaultdict(int),
        "truncated": 0,
        "capped_chars": 0,
        "utf8_replaced": 0,
        "hist": np.zeros(LENGTH_HIST_MAX + 1, dtype=np.int64),
        "max_length": 0,
        "sum_length": 0,
    }


def merge_stats(into: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]]) -> None:
    for split, s in other.items():
        t = into.setdefault(split, new_split_stats())
        for k in ("rows_read", "rows_written", "truncated", "capped_chars", "utf8_replaced", "sum_length"):
            t[k] += s[k]
        t["max_length"] = max(t["max_length"], s["max_length"])
        t["hist"] = t["hist"] + s["hist"]
        for k in ("quarantined", "labels"):
            for key, v in s[k].items():
                t[k][key] += v


def summarize(stats: dict[str, Any]) -> dict[str, Any]:
    """Manifest entry of one split: counts plus token-length mean/p50/p95/max (before truncation)."""
    written = stats["rows_written"]
    hist = stats["hist"]
    cum = np.cumsum(hist)

    def pct(q: float) -> int:
        return int(np.searchsorted(cum, q * cum[-1])) if cum[-1] else 0

    out = {
        "rows_read": stats["rows_read"],
        "rows_written": written,
        "rows_quarantined": sum(stats["quarantined"].values()),
        "quarantined_by_reason": dict(sorted(stats["quarantined"].items())),
        "label_counts": {str(k): v for k, v in sorted(stats["labels"].items())},
        "utf8_replaced": stats["utf8_replaced"],
        "capped_chars": stats["capped_chars"],
        "tokens": {
            "mean": round(stats["sum_length"] / written, 1) if written else 0,
            "p50": pct(0.5),
            "p95": pct(0.95),
            "max": stats["max_length"],
            "truncated_fraction": round(stats["truncated"] / written, 4) if written else 0.0,
        },
    }
    return out


class PreparedSink:
    """Writes each split's rows to DIR/<split>/part-*.parquet and quarantined rows to DIR/quarantine/.

    Used as a Ray Data Datasink (see `make_sink`); `write` itself is plain Python and returns the
    statistics of what it wrote.
    """

    def __init__(self, output: str, rows_per_shard: int):
        self.output = output
        self.rows_per_shard = rows_per_shard
        self.run_id = uuid.uuid4().hex[:8]

    def write_blocks(self, blocks: Iterable[pa.Table], task_index: int) -> dict[str, Any]:
        fs, root = filesystem(self.output)
        writers: dict[str, pq.ParquetWriter] = {}
        stats: dict[str, dict[str, Any]] = {}

        def writer(split: str, schema: pa.Schema) -> pq.ParquetWriter:
            if split not in writers:
                fs.create_dir(join(root, split), recursive=True)
                path = join(root, split, f"part-{self.run_id}-{task_index:05d}.parquet")
                writers[split] = pq.ParquetWriter(path, schema, filesystem=fs, compression="zstd")
            return writers[split]

        try:
            for block in blocks:
                if block.num_rows == 0:
                    continue
                self._write_block(block, stats, writer)
        finally:
            for w in writers.values():
                w.close()
        return {split: dict(s) for split, s in stats.items()}

    @staticmethod
    def _write_block(block: pa.Table, stats: dict[str, dict[str, Any]], writer: Any) -> None:
        cols = {name: block.column(name).to_numpy(zero_copy_only=False) for name in ("split", "reason")}
        splits, reasons = cols["split"], cols["reason"]
        for split in np.unique(splits):
            in_split = splits == split
            s = stats.setdefault(str(split), new_split_stats())
            part = block.filter(pa.array(in_split))
            bad = part.column("reason").is_valid().to_numpy(zero_copy_only=False)
            good = part.filter(pa.array(~bad))
            s["rows_read"] += part.num_rows
            s["rows_written"] += good.num_rows
            for r in reasons[in_split][bad]:
                s["quarantined"][str(r)] += 1
            if bad.any():
                q = part.filter(pa.array(bad))
                writer(QUARANTINE, QUARANTINE_SCHEMA).write_table(
                    pa.table(
                        {
                            "id": q.column("id"),
                            "split": q.column("split"),
                            "reason": q.column("reason"),
                            "label": q.column("raw_label"),
                            "text": q.column("raw_text"),
                        },
                        schema=QUARANTINE_SCHEMA,
                    )
                )
            s["utf8_replaced"] += int(
                np.count_nonzero(part.column("utf8_replaced").to_numpy(zero_copy_only=False))
            )
            if good.num_rows == 0:
                continue
            labels = good.column("label")
            for value, count in zip(*np.unique(labels.drop_null().to_numpy(), return_counts=True)):
                s["labels"][int(value)] += int(count)
            full = good.column("full_length").to_numpy()
            s["hist"] += np.bincount(np.minimum(full, LENGTH_HIST_MAX), minlength=LENGTH_HIST_MAX + 1)
            s["max_length"] = max(s["max_length"], int(full.max()))
            s["sum_length"] += int(full.sum())
            s["truncated"] += int(np.count_nonzero(good.column("truncated").to_numpy(zero_copy_only=False)))
            s["capped_chars"] += int(np.count_nonzero(good.column("capped").to_numpy(zero_copy_only=False)))
            writer(str(split), PREPARED_SCHEMA).write_table(
                good.select(PREPARED_SCHEMA.names).cast(PREPARED_SCHEMA)
            )


def make_sink(output: str, rows_per_shard: int) -> Any:
    """The Ray Data Datasink around PreparedSink; statistics come back through write results."""
    from ray.data.datasource import Datasink

    class _Sink(Datasink):
        def __init__(self) -> None:
            self.inner = PreparedSink(output, rows_per_shard)
            self.stats: dict[str, dict[str, Any]] = {}

        @property
        def min_rows_per_write(self) -> int:
            return rows_per_shard

        def get_name(self) -> str:
            return "WritePreparedShards"

        def write(self, blocks: Iterable[pa.Table], ctx: Any) -> dict[str, Any]:
            return self.inner.write_blocks(blocks, ctx.task_idx)

        def on_write_complete(self, write_result: Any) -> None:
            for part in write_result.write_returns:
                merge_stats(self.stats, part)

    return _Sink()


# ---------------------------------------------------------------------------------------------
# The job.


def split_thresholds(corpus: Corpus, cfg: PrepareConfig) -> tuple[dict[int, int], int]:
    """Per-label hash thresholds that put exactly round(fraction * n_label) train rows in validation.

    Returns (thresholds, rows seen). Reads only ids and labels.
    """
    from bertjob.datasource import read_corpus

    seed = cfg.seed

    def hashes(batch: pa.Table) -> pa.Table:
        # One (label, hash) per row; label is null for rows that are not labelled train rows.
        ids = batch.column("id").to_pylist()
        splits = batch.column("split").to_pylist()
        labels = [
            parse_label(v) if v is not None and s == "train" else None
            for v, s in zip(batch.column("label").to_pylist(), splits)
        ]
        h = [row_hash(seed, i) if lab is not None else 0 for i, lab in zip(ids, labels)]
        return pa.table({"label": pa.array(labels, pa.int8()), "h": pa.array(h, pa.uint64())})

    ds = read_corpus(corpus, keys_only=True).map_batches(hashes, batch_format="pyarrow", batch_size=None)
    per_label: dict[int, list[np.ndarray]] = defaultdict(list)
    seen = 0
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        seen += b.num_rows
        b = b.filter(b.column("label").is_valid())
        lab = b.column("label").to_numpy()
        h = b.column("h").to_numpy()
        for value in np.unique(lab):
            per_label[int(value)].append(h[lab == value])
    thresholds = {}
    if cfg.validation_fraction > 0:
        for label, parts in per_label.items():
            h = np.sort(np.concatenate(parts))
            k = int(round(cfg.validation_fraction * len(h)))
            thresholds[label] = int(h[k]) if k < len(h) else 2**64
    return thresholds, seen


def run(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the prepare job; returns the manifest."""
    import ray

    from bertjob.cluster import init_ray
    from bertjob.datasource import read_corpus

    started = time.time()
    corpus = open_corpus(cfg.input, cfg.text_column, cfg.label_column, cfg.id_column, cfg.split)
    tok_info = models.tokenizer_info(cfg.model, cfg.trust_remote_code)
    log.info("prepare: %s -> %s (tokenizer %s, max_length %d, %s)", corpus.describe(), cfg.output,
             cfg.model, cfg.max_length, cfg.truncation)  # fmt: skip
    t_init = time.time()
    init_ray()
    ray_init_s = time.time() - t_init
    t_split = time.time()
    thresholds, seen = split_thresholds(corpus, cfg)
    split_pass_s = time.time() - t_split
    if seen == 0:
        raise InputError(f"input {cfg.input}: no rows found ({corpus.describe()})")
    claim_output(cfg.output, "prepare")

    sink = make_sink(cfg.output, cfg.rows_per_shard)
    ds = read_corpus(corpus).map_batches(
        tokenize_batch,
        fn_kwargs={"cfg": to_dict(cfg), "thresholds": thresholds},
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        num_cpus=1,
    )
    # Writing reserves no CPU either, so it is not fused into tokenization: tokenize tasks stay
    # small (batch_size rows) and balanced across cores, while each write task gathers a whole shard.
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0})
    splits = {name: summarize(s) for name, s in sorted(sink.stats.items())}
    read_total = sum(s["rows_read"] for s in splits.values())
    manifest = {
        "format": "bertjob-prepared/1",
        "input": cfg.input,
        "corpus_kind": corpus.kind,
        "splits": splits,
        "rows_read": read_total,
        "rows_written": sum(s["rows_written"] for s in splits.values()),
        "rows_quarantined": sum(s["rows_quarantined"] for s in splits.values()),
        "tokenizer": tok_info,
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
        "head_tokens": cfg.head_tokens,
        "strip_html": cfg.strip_html,
        "validation": {"fraction": cfg.validation_fraction, "seed": cfg.seed, "stratified": True},
        "config": to_dict(cfg),
        "versions": versions(),
        "wall_s": round(time.time() - started, 2),
        "ray_init_s": round(ray_init_s, 2),
        "split_pass_s": round(split_pass_s, 2),
        "ray_cluster_cpus": ray.cluster_resources().get("CPU", 0),
    }
    if read_total != seen:
        raise RuntimeError(
            f"prepare read {read_total} rows but the split pass saw {seen}; output left incomplete"
        )
    write_json(join(cfg.output, "config.json"), to_dict(cfg))
    write_json(join(cfg.output, MANIFEST), manifest)  # last: marks the output complete
    log.info("prepare: wrote %s", ", ".join(f"{k} {v['rows_written']}" for k, v in splits.items()))
    return manifest
