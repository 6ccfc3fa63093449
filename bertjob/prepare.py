"""Prepare: raw reviews -> cleaned, tokenized, split Parquet shards plus a manifest.

    read (Corpus units, in parallel) -> Tokenize actors (clean, quarantine, tokenize, truncate,
    hash train rows) -> WriteShards actor (one Parquet file per split per rows_per_shard rows, plus
    statistics) -> split_train (train rows -> train / validation / test by hash, exact per label)

Validation (and, for a corpus without a test split, test) is carved out of the corpus' `train` split
in one pass: train rows are staged with a 64-bit hash of their cleaned text (so a review repeated
under another id never lands in train and held out at once), the driver reads back only
(label, hash) to find per-label thresholds that put exactly round(fraction * n_label) rows in each,
and the staged files are rewritten, in the order their rows were read (with no validation or test
fraction too: whichever writer wrote a batch, the train split keeps the input's order).
Every write reports the files it finished; files that no write reported (a failed attempt's) are
removed before the manifest is written.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import logging
import os
import pickle
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bertjob import models
from bertjob.config import JobError, PrepareConfig, stage_flag, to_dict
from bertjob.identity import corpus_fingerprint, identity
from bertjob.outputs import MANIFEST, check_replaceable, claim_output, releasing, versions
from bertjob.sources import SPLITS, Corpus, InputError, open_corpus
from bertjob.storage import check_access, filesystem, for_workers, join, uri, write_json
from bertjob.text import (
    BAD_LABEL,
    BAD_LABELS_KEPT,
    MISSING_LABEL,
    commonest_labels,
    first_rows_rating_scale,
    quarantine_note,
    rating_scale,
    tokenize_rows,
    unread_labels,
    utf8_note,
)

log = logging.getLogger(__name__)

LENGTH_HIST_MAX = 16_384  # token counts above this share the last histogram bin
QUARANTINE = "quarantine"
LOCAL_SPLIT_ROWS = 250_000  # up to this many staged train rows, the driver splits them itself
STAGING = "_staging"  # train rows waiting for the validation split; gone once the job finishes
OWN_ENTRIES = ("config.json", QUARANTINE, STAGING, *SPLITS)  # besides outputs.py's marker, lease and manifest
WRITER_CPUS = 32  # one write actor per this many CPUs of tokenizing
# What held-out rows are chosen by, in each output's identity: outputs held out by id (before it) let
# a review repeated under another id be trained on and scored as held out, and are not reused.
HELD_OUT_BY = "text"
TRAIN, VALIDATION, TEST = "train", "validation", "test"

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


def identity_of(cfg: PrepareConfig, corpus: Corpus, tokenizer_fingerprint: str) -> str:
    """What a prepared output is made from: the corpus' content (not its path), the settings, the
    tokenizer. The pipeline reuses an output whose manifest records the same."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("input", "output")}
    settings["held_out_by"] = HELD_OUT_BY
    return identity(corpus_fingerprint(corpus), settings, tokenizer_fingerprint)


def text_hash(seed: int, text: str) -> int:
    """A cleaned text's split hash: rows of the same text, whatever their ids, share it."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------
# Pure per-batch work (runs inside Ray Data tasks; testable without Ray).


def tokenize_batch(batch: pa.Table, c: PrepareConfig, encoder: models.Encoder, labelled: bool) -> pa.Table:
    """Clean, quarantine and tokenize one batch of source rows (`labelled`: the corpus has labels,
    so a row without one is quarantined); every row kept gets its text's hash `h` (train's split by it)."""
    ids = batch.column("id").to_pylist()
    raw_labels = batch.column("label").to_pylist()
    splits = batch.column("split").to_pylist()
    t = tokenize_rows(
        batch.column("text").to_pylist(), raw_labels, splits, encoder, c.text_settings(), labelled
    )
    hashes = np.zeros(len(ids), dtype=np.uint64)
    for i, text in enumerate(t.cleaned):
        if text is not None:
            hashes[i] = text_hash(c.seed, text)
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "split": pa.array(splits, pa.string()),
            "label": pa.array(t.labels, pa.int8()),
            "input_ids": t.input_ids,
            "length": pa.array(np.diff(t.input_ids.offsets.to_numpy()), pa.int32()),
            "full_length": pa.array(t.full_lengths, pa.int32()),
            "truncated": pa.array(t.truncated, pa.bool_()),
            "capped": pa.array(t.capped, pa.bool_()),
            "utf8_replaced": batch.column("utf8_replaced"),
            "reason": pa.array(t.reasons, pa.string()),
            "raw_label": pa.array(raw_labels, pa.string()),
            "raw_text": pa.array(t.quarantined_text, pa.string()),
            "h": pa.array(hashes, pa.uint64()),
        }
    )


class Tokenize:
    """The tokenize stage: one actor per CPU, each holding its encoder for the whole run."""

    def __init__(self, cfg: dict[str, Any], encoder: models.Encoder, labelled: bool):
        models.tokenizer_threads(1)  # its one CPU
        self.cfg = PrepareConfig(**cfg)
        self.encoder = encoder
        self.labelled = labelled

    def __call__(self, batch: pa.Table) -> pa.Table:
        return tokenize_batch(batch, self.cfg, self.encoder, self.labelled)


# ---------------------------------------------------------------------------------------------
# Statistics: small, mergeable, computed where the rows are written.


def new_split_stats() -> dict[str, Any]:
    return {
        "rows_read": 0,
        "rows_written": 0,
        "quarantined": defaultdict(int),
        "labels": defaultdict(int),
        "bad_labels": defaultdict(int),  # unrecognised label values: the manifest names the commonest
        "truncated": 0,
        "capped_chars": 0,
        "utf8_replaced": 0,
        "hist": np.zeros(LENGTH_HIST_MAX + 1, dtype=np.int64),
        "max_length": 0,
        "sum_length": 0,
        "text_hashes": [],  # of the rows written, one array a block: 8 bytes a row, for shared_texts
    }


def merge_stats(into: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]]) -> None:
    for split, s in other.items():
        t = into.setdefault(split, new_split_stats())
        for k in ("rows_read", "rows_written", "truncated", "capped_chars", "utf8_replaced", "sum_length"):
            t[k] += s[k]
        t["max_length"] = max(t["max_length"], s["max_length"])
        t["hist"] = t["hist"] + s["hist"]
        t["text_hashes"] += s["text_hashes"]
        for k in ("quarantined", "labels", "bad_labels"):
            for key, v in s[k].items():
                t[k][key] += v
        if len(t["bad_labels"]) > 2 * BAD_LABELS_KEPT:  # a column of free text: bounded all the same
            kept = sorted(t["bad_labels"].items(), key=lambda kv: -kv[1])[:BAD_LABELS_KEPT]
            t["bad_labels"] = defaultdict(int, kept)


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
        "unrecognised_labels": commonest_labels(stats["bad_labels"]),
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

    `write_blocks` is plain Python: it returns the statistics of what it wrote and the files it
    wrote ({path: rows}), so the job can tell finished files from those of a failed attempt.
    """

    def __init__(self, output: str, stage_train: bool = False):
        self.output = output
        self.stage_train = stage_train  # train rows go to STAGING, uncounted, for split_train
        self.run_id = uuid.uuid4().hex[:8]

    def write_blocks(self, blocks: Iterable[pa.Table], index: int) -> tuple[dict[str, Any], dict[str, int]]:
        fs, root = filesystem(self.output)
        writers: dict[str, pq.ParquetWriter] = {}
        paths: dict[str, str] = {}
        files: dict[str, int] = {}
        stats: dict[str, dict[str, Any]] = {}

        def write(split: str, table: pa.Table) -> None:
            if split not in writers:
                fs.create_dir(join(root, split), recursive=True)
                paths[split] = join(root, split, f"part-{self.run_id}-{index:05d}.parquet")
                writers[split] = pq.ParquetWriter(
                    paths[split], table.schema, filesystem=fs, compression="zstd"
                )
                files[paths[split]] = 0
            writers[split].write_table(table)
            files[paths[split]] += table.num_rows

        try:
            for block in blocks:
                if block.num_rows == 0:
                    continue
                if self.stage_train:
                    in_train = pc.equal(block.column("split"), TRAIN)
                    staged = block.filter(in_train)
                    if staged.num_rows:
                        write(STAGING, staged)
                    block = block.filter(pc.invert(in_train))
                self._write_block(block, stats, write)
        finally:
            for w in writers.values():
                w.close()
        return {split: dict(s) for split, s in stats.items()}, files

    @staticmethod
    def _write_block(block: pa.Table, stats: dict[str, dict[str, Any]], write: Any) -> None:
        if block.num_rows == 0:
            return
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
            unrecognised = part.filter(pc.equal(part.column("reason"), BAD_LABEL))
            for value in unrecognised.column("raw_label").to_pylist():
                s["bad_labels"][str(value)] += 1
            if bad.any():
                q = part.filter(pa.array(bad))
                write(
                    QUARANTINE,
                    pa.table(
                        {
                            "id": q.column("id"),
                            "split": q.column("split"),
                            "reason": q.column("reason"),
                            "label": q.column("raw_label"),
                            "text": q.column("raw_text"),
                        },
                        schema=QUARANTINE_SCHEMA,
                    ),
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
            s["text_hashes"].append(good.column("h").to_numpy())
            s["hist"] += np.bincount(np.minimum(full, LENGTH_HIST_MAX), minlength=LENGTH_HIST_MAX + 1)
            s["max_length"] = max(s["max_length"], int(full.max()))
            s["sum_length"] += int(full.sum())
            s["truncated"] += int(np.count_nonzero(good.column("truncated").to_numpy(zero_copy_only=False)))
            s["capped_chars"] += int(np.count_nonzero(good.column("capped").to_numpy(zero_copy_only=False)))
            write(str(split), good.select(PREPARED_SCHEMA.names).cast(PREPARED_SCHEMA))


class WriteShards:
    """The write stage: a long-lived actor that writes each batch it is given (`rows_per_shard`
    rows) as one Parquet file per split, and returns what it wrote as one row.

    An actor rather than Ray Data's write tasks: each task needs an idle worker process, and a
    cluster that keeps few of them (Ray's default: one per CPU) starts a fresh Python, ~1 CPU-s,
    for nearly every write task. The actor starts once, while the first rows are tokenized.
    """

    def __init__(self, output: str):
        self.sink = PreparedSink(output, stage_train=True)
        self.calls = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        written = self.sink.write_blocks([batch], self.calls)
        self.calls += 1
        return pa.table({"written": [pickle.dumps(written)]})


# ---------------------------------------------------------------------------------------------
# The job.


def split_train(
    output: str, staged: dict[str, int], validation: float, test: float = 0.0
) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Move staged train rows ({path: rows}, in the corpus' order) to test/, validation/ or train/: exactly
    round(test * n) and round(validation * n) rows of each label, the lowest hashes to test, the next
    to validation. Returns the statistics and the files written.

    The driver reads only each staged row's label and hash (8 bytes a row). Up to LOCAL_SPLIT_ROWS
    rows the driver also rewrites the files, in threads (Parquet and numpy release the GIL): that
    takes less than starting worker processes. Beyond it, Ray tasks rewrite them, one file each.
    """
    fs, root = filesystem(output)
    paths = list(staged)  # in the order their rows were read: numbered so, they keep it
    per_label: dict[int, list[np.ndarray]] = defaultdict(list)
    for path in paths:
        t = pq.read_table(path, columns=["label", "h", "reason"], filesystem=fs)
        t = t.filter(pc.and_(t.column("label").is_valid(), t.column("reason").is_null()))
        lab, h = t.column("label").to_numpy(), t.column("h").to_numpy()
        for value in np.unique(lab):
            per_label[int(value)].append(h[lab == value])
    thresholds = {}  # label: (hashes below the first go to test, below the second to validation)
    shared = 0  # rows whose text another row of the label has: they share its hash, and so its split
    for label, parts in per_label.items():
        h = np.sort(np.concatenate(parts))
        shared += int(np.count_nonzero(h[1:] == h[:-1]))
        to_test = int(round(test * len(h)))
        to_val = to_test + int(round(validation * len(h)))
        thresholds[label] = tuple(int(h[k]) if k < len(h) else 2**64 for k in (to_test, to_val))
    if shared:  # the splits' sizes were said to be exact; repeated reviews were not mentioned
        log.warning("prepare: %d train rows repeat the text of another row of their label; each text's rows go "
                    "to one split together, so validation and test may hold up to that many rows fewer than "
                    "their fractions", shared)  # fmt: skip
    args = [(output, p, i, thresholds) for i, p in enumerate(paths)]
    if sum(staged.values()) <= LOCAL_SPLIT_ROWS:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            parts = list(pool.map(lambda a: _split_staged(*a), args))
    else:
        import ray

        from bertjob.cluster import BATCH_RETRIES

        task = ray.remote(num_cpus=1, max_retries=BATCH_RETRIES)(_split_staged)
        parts = ray.get([task.remote(*a) for a in args])
    stats: dict[str, dict[str, Any]] = {}
    files: dict[str, int] = {}
    for part_stats, part_files in parts:
        merge_stats(stats, part_stats)
        files.update(part_files)
    if paths:  # no train rows, no staging directory
        fs.delete_dir(join(root, STAGING))
    return stats, files


def _split_staged(
    output: str, path: str, index: int, thresholds: dict[int, tuple[int, int]]
) -> tuple[dict[str, Any], dict[str, int]]:
    fs, _ = filesystem(output)

    def below(h: np.ndarray, limit: int) -> np.ndarray:
        return np.ones(len(h), dtype=bool) if limit >= 2**64 else h < np.uint64(limit)

    def blocks() -> Iterable[pa.Table]:
        for batch in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=8192):
            t = pa.Table.from_batches([batch])
            # A quarantined row (no text to hash) stays in train, where it was read.
            lab = pc.if_else(t.column("reason").is_valid(), -1, t.column("label").fill_null(-1)).to_numpy()
            h = t.column("h").to_numpy()
            split = np.full(t.num_rows, TRAIN, dtype=object)
            for label, (to_test, to_val) in thresholds.items():
                rows = lab == label
                split[rows & below(h, to_val)] = VALIDATION
                split[rows & below(h, to_test)] = TEST
            yield t.set_column(t.schema.get_field_index("split"), "split", pa.array(split, pa.string()))

    return PreparedSink(output).write_blocks(blocks(), index)


def shared_texts(stats: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many texts each pair of splits both hold ({"test/train": n}): a review in train and in
    test (as a corpus' own splits can have it) is scored as held out although it was trained on."""
    texts = {
        split: np.unique(np.concatenate(s["text_hashes"])) if s["text_hashes"] else np.empty(0, np.uint64)
        for split, s in stats.items()
    }
    pairs = itertools.combinations(sorted(texts), 2)
    return {f"{a}/{b}": len(np.intersect1d(texts[a], texts[b], assume_unique=True)) for a, b in pairs}


def _leaks(pair: str) -> bool:
    """Whether texts both splits of a `shared_texts` pair hold are trained on and scored as held out
    (train or unsup beside validation or test), not only held out twice or trained on twice."""
    held_out = [split in (VALIDATION, TEST) for split in pair.split("/")]
    return any(held_out) and not all(held_out)


def remove_unfinished(output: str, finished: Iterable[str]) -> list[str]:
    """Delete the Parquet files under `output` that no successful write reported: those of a write
    attempt that failed and was retried. Returns what it removed."""
    fs, root = filesystem(output)
    keep = set(finished)
    gone = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File and info.path.endswith(".parquet") and info.path not in keep:
            fs.delete_file(info.path)
            gone.append(info.path)
    return gone


def shard_list(output: str, finished: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """Each split's shards as its manifest lists them ({split: [{name, rows, bytes}]}), in the
    corpus' order (the order the writes reported them): what every reader of the split reads, and
    checks the directory against (`sources.prepared_files`)."""
    fs, root = filesystem(output)
    paths = list(finished)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path, info in zip(paths, fs.get_file_info(paths)):
        split = os.path.basename(os.path.dirname(path))
        out[split].append({"name": os.path.basename(path), "rows": finished[path], "bytes": info.size})
    return dict(out)


def splits_written(cfg: PrepareConfig, corpus: Corpus) -> set[str] | None:
    """The splits prepare writes of the corpus, when they are known before reading it: the
    corpus' own, and validation's and test's shares of train."""
    splits = corpus.splits()
    if splits is None or TRAIN not in splits:
        return splits
    return splits | {
        name for name, share in ((VALIDATION, cfg.validation_fraction), (TEST, cfg.test_fraction)) if share
    }


def open_input(cfg: PrepareConfig) -> Corpus:
    """The corpus to prepare. A prepared directory is refused here, before any work: read as input it
    failed inside Ray, and as its own output (`--input prep --output prep`) it was wiped first."""
    corpus = open_corpus(cfg.input, cfg.text_column, cfg.label_column, cfg.id_column, cfg.split)
    if corpus.kind == "prepared":
        source = corpus.manifest.get("input", "?")  # type: ignore[attr-defined]
        raise InputError(
            f"input {cfg.input} is already prepared (a `bertjob prepare` output of {source}); give it to "
            f"train (--data), infer or evaluate, or prepare the corpus it came from"
        )
    problems = input_problems(cfg, corpus)
    if problems:
        raise InputError("\n".join(problems))
    return corpus


def input_problems(cfg: PrepareConfig, corpus: Corpus) -> list[str]:
    """What in a corpus would make prepare's splits or labels other than its user meant, found before
    any work: each was prepared without a word, and found (if at all) in training or evaluation."""
    problems = []
    generic = corpus.kind in ("parquet", "csv", "jsonl")
    # Read as one corpus, every row went to --split, and the test rows were trained on.
    named = corpus.named_splits()
    if len(named) > 1:
        words = sorted(named)
        alone = (
            f" (--input '{uri(corpus.fs, os.path.dirname(named[TRAIN]))}/train*')" if TRAIN in named else ""
        )
        problems.append(
            f"input {cfg.input}: its files are named as splits ({', '.join(corpus.relpath(named[w]) for w in words)}), "
            f"but bertjob puts every file's rows in one split (--split {cfg.split}), the {', '.join(words[:-1])} and "
            f"{words[-1]} files' alike. Put each split's files in a directory named split=train/, split=test/ "
            f"(validation, unsup), or prepare the train files alone{alone}"
        )
    own = corpus.splits()  # None: an IMDb archive's, which hold test/
    if cfg.test_fraction and (TEST in own if own is not None else corpus.kind == "imdb-tar"):
        # Its test split was written with train rows added, without a word (IMDb's 25,000 and a fifth of train).
        problems.append(
            f"input {cfg.input} has a test split of its own; --test-fraction {cfg.test_fraction:g} would add "
            f"train rows to it: leave it out (it is for a corpus without one)"
        )
    first, names = corpus.header
    if near := corpus.near_label_column():
        # "Label" (Excel's capital), " label" (a space after the header's comma): read as unlabelled,
        # the corpus was prepared to a train split without labels, which train refused afterwards.
        problems.append(
            f"input {cfg.input}: no column {cfg.label_column!r}, but one named {near!r}; set --label-column "
            f"to it (in a pipeline: --prepare.label-column), or rename it"
        )
    elif generic and not corpus.labelled and cfg.label_column not in ("", PrepareConfig.label_column):
        # A label column named (--label-column sentimnt) that no file has: read as unlabelled, the
        # corpus was prepared without labels; only the default's absence means an unlabelled corpus.
        problems.append(
            f"input {cfg.input}: no file has the label column {cfg.label_column!r} (columns of "
            f"{corpus.relpath(first)}: {', '.join(names)}); correct --label-column, or leave it out to "
            f"prepare the corpus as unlabelled"
        )
    if "split" in names and "split" not in (cfg.text_column, cfg.label_column, cfg.id_column):
        # A split column (a DataFrame of all splits saved as one file) was not read: its test rows were trained on.
        problems.append(
            f"input {cfg.input}: a column 'split' ({corpus.relpath(first)}) is not read: bertjob puts every "
            f"row in one split (--split {cfg.split}). Write each split's rows to a directory of their own, split=train/, "
            f"split=test/ (pyarrow.parquet.write_to_dataset(table, DIR, partition_cols=['split']) does), or drop the column"
        )
    return problems


def nothing_kept(
    corpus: str, output: str, manifest: dict[str, Any], split: str | None, in_pipeline: bool
) -> str | None:
    """An error when prepare quarantined every row it read of `split` (of every split: None), as when
    each text is empty or each label missing: `bertjob prepare` reported success (train 0), and the
    pipeline said there was no test split and to hold one out with the --prepare.test-fraction its
    user had given. `in_pipeline`: its flags as the pipeline takes them (`stage_flag`)."""
    splits = [s for name, s in manifest["splits"].items() if split in (None, name)]
    read = sum(s["rows_read"] for s in splits)
    if not read or any(s["rows_written"] for s in splits):
        return None
    reasons = sum((Counter(s["quarantined_by_reason"]) for s in splits), Counter())
    why = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
    if reasons.keys() & {MISSING_LABEL, BAD_LABEL}:
        give = "a text and a label (0/1, neg/pos, negative/positive, false/true), or name the columns that hold them"
        keys = ("text_column", "label_column")
    else:  # an unlabelled corpus needs texts alone
        give, keys = "a text, or name the column that holds it", ("text_column",)
    flags = ", ".join(stage_flag("prepare", key, in_pipeline) for key in keys)
    lead, rows = ("nothing to train on", f"{split} rows") if split else ("nothing prepared", "rows")
    return (
        f"input {corpus}: {lead}: prepare quarantined all {read} {rows} ({why}; they are in "
        f"{join(output, QUARANTINE)}). Give each row {give} ({flags})"
    )


def unlabelled_train(manifest: dict[str, Any]) -> bool:
    """Train rows read from a corpus without labels (its label column named otherwise)."""
    split = manifest.get("splits", {}).get(TRAIN, {})
    return bool(split.get("rows_written")) and not split.get("label_counts")


def trainable_problems(data: str, manifest: dict[str, Any]) -> list[str]:
    """What `bertjob train` refuses in the splits of a prepared output (`data`): it checks them before
    any work, and prepare warns of them, which wrote such an output without a word."""
    problems: list[str] = []
    splits = manifest.get("splits", {})
    if unlabelled_train(manifest):
        return [  # nothing else about the splits matters then
            f"split 'train' of {data} has no labels: its corpus was read as unlabelled (prepare takes "
            f"the labels of a Parquet, CSV, TSV or JSONL corpus from --label-column, by default 'label')"
        ]
    for name in ("train", "validation", "test"):
        split = splits.get(name, {})
        written, counts = split.get("rows_written", 0), split.get("label_counts") or {}
        if written == 0 and name != "test":
            hint = ""
            if name == "validation":
                share = (manifest.get("validation") or {}).get("fraction") or 0
                train_counts = splits.get("train", {}).get("label_counts") or {}
                hint = (  # a few rows: prepare holds out round(share x rows) of each label, here 0
                    f": validation_fraction {share:g} of each label's train rows {train_counts} rounds to none; "
                    f"prepare more rows or a larger --validation-fraction (in a pipeline: --prepare.validation-fraction)"
                    if share
                    else " (set validation_fraction > 0 in prepare)"
                )
            problems.append(f"split {name!r} of {data} has no rows{hint}")
        elif name == "train" and set(counts) != {"0", "1"}:
            problems.append(f"split 'train' of {data} needs both labels; it has {counts}")
        if counts and sum(counts.values()) != written:
            problems.append(
                f"split {name!r} of {data}: its label counts {counts} sum to {sum(counts.values())}, "
                f"not to its {written} rows; the manifest does not describe the data (prepare again)"
            )
    return problems


@releasing
def run(cfg: PrepareConfig, in_pipeline: bool = False, corpus: Corpus | None = None) -> dict[str, Any]:
    """Run the prepare job; returns the manifest. `in_pipeline`: as `bertjob pipeline`'s prepare
    stage, which trains next: a corpus whose train rows were all quarantined is an error there,
    worded with its --prepare.KEY flags (on its own, one whose every row was). `corpus`: the input
    as the pipeline opened it (opened again, its warnings were logged twice)."""
    import ray

    from bertjob.cluster import (
        BATCH_RETRIES,
        actor_pool_map,
        cluster_cpus,
        init_ray,
        killed,
        killed_starting,
        killed_task,
    )
    from bertjob.datasource import read_corpus

    started = time.time()
    check_access({"input": cfg.input, "output": cfg.output})
    # Token ids longer than the model holds: train refused them only after the whole corpus was tokenized.
    if problem := models.max_length_problem(cfg.model, cfg.max_length):
        raise models.ModelError(problem)
    corpus = corpus or open_input(cfg)
    first = corpus.first_rows()
    if first is None:
        raise InputError(f"input {cfg.input}: no rows found ({corpus.describe()})")
    # Not labels of another vocabulary (unread_labels): first rows of only those (a corpus sorted by
    # label, "mixed" first) say nothing of the rest
    if problem := first_rows_rating_scale(first.column("label"), cfg.label_column, "would be quarantined"):
        raise InputError(f"input {cfg.input}: {problem}")
    if cfg.validation_fraction and VALIDATION in (corpus.splits() or ()):
        # The corpus' own validation split (split=validation/, a hub dataset's): a share of train
        # held out as well was added to it without a word.
        log.info("prepare: validation is the corpus' own split; no share of train is held out as well "
                 "(--validation-fraction %g not applied)", cfg.validation_fraction)  # fmt: skip
        cfg = dataclasses.replace(cfg, validation_fraction=0.0)
    check_replaceable(cfg.output, "prepare", OWN_ENTRIES)
    cfg = dataclasses.replace(cfg, output=for_workers(cfg.output, output=True))  # the writers' path
    # Without a cached tokenizer record (a first run, a hub id) loading the tokenizer imports
    # transformers, ~1.5 s of one core: it overlaps Ray's start-up.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        tokenizer = pool.submit(
            lambda: (
                models.tokenizer_info(cfg.model, cfg.trust_remote_code),
                models.load_encoder(cfg.model, cfg.trust_remote_code),
            )
        )
        t_init = time.time()
        init_ray(dashboard=False)
        ray_init_s = time.time() - t_init
        tok_info, encoder = tokenizer.result()  # a hub id that cannot be reached fails here
    key = identity_of(
        cfg, corpus, tok_info["fingerprint"]
    )  # before reading: a change mid-run shows next time
    log.info("prepare: %s -> %s (tokenizer %s, max_length %d, %s)", corpus.describe(), cfg.output,
             cfg.model, cfg.max_length, cfg.truncation)  # fmt: skip
    claim_output(cfg.output, "prepare", OWN_ENTRIES)

    cpus = max(1, int(cluster_cpus()))
    # Actors, not tasks: each starts once, while the first rows are read, and never again; one per
    # CPU at start, more on nodes that join.
    ds = read_corpus(corpus)
    # Rows reach the writer in the corpus' order, whichever actor tokenized them first: the same
    # input prepares to the same shards, and so trains in the same order for the same seed.
    ds.context.execution_options.preserve_order = True
    ds = actor_pool_map(
        ds,
        Tokenize,
        1,
        None,
        fn_constructor_kwargs={"cfg": to_dict(cfg), "encoder": encoder, "labelled": corpus.labelled},
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
    )
    # Writing reserves no CPU, so tokenize batches stay small and balanced across cores while each
    # write gathers a whole shard. One writer keeps up with ~30 cores of tokenizing.
    writers = max(1, -(-cpus // WRITER_CPUS))
    ds = actor_pool_map(
        ds,
        WriteShards,
        writers,
        writers,
        cpus=0,
        fn_constructor_kwargs={"output": cfg.output},
        batch_format="pyarrow",
        batch_size=cfg.rows_per_shard,
    )
    stats: dict[str, dict[str, Any]] = {}
    finished: dict[str, int] = {}
    t_run = time.time()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for blob in batch.column("written").to_pylist():
                part_stats, part_files = pickle.loads(blob)
                merge_stats(stats, part_stats)
                finished.update(part_files)
    except ray.exceptions.RayError as err:  # `killed` tells those it knows; the others are raised again
        if (why := killed(err, t_run)) and killed_task(err):  # the plain tasks here are the reads
            raise JobError(
                f"prepare stopped: a process reading the corpus was killed on each of its {BATCH_RETRIES + 1} tries: "
                f"{why}. Where memory ran out, run on nodes with more memory, or split the corpus into smaller "
                f"files; the same command again prepares the corpus anew"
            ) from err
        if why and killed_starting(err):
            raise JobError(
                f"prepare stopped: a tokenize or write process was killed while starting on each of its "
                f"{BATCH_RETRIES + 1} tries: {why}. Where memory ran out, run on nodes with more memory (each "
                f"of a node's CPUs starts one); the same command again prepares the corpus anew"
            ) from err
        if why:
            raise JobError(
                f"prepare stopped: a tokenize or write process was killed on each of the {BATCH_RETRIES + 1} tries of "
                f"a batch: {why}. Where memory ran out, lower --batch-size (rows tokenized at once, now {cfg.batch_size}) "
                f"or --rows-per-shard (rows a writer holds, now {cfg.rows_per_shard}), or run on nodes with more "
                f"memory; the same command again prepares the corpus anew"
            ) from err
        raise
    staging = join(filesystem(cfg.output)[1], STAGING) + "/"
    staged = {p: n for p, n in finished.items() if p.startswith(staging)}
    t_split = time.time()
    try:
        split_stats, split_files = split_train(cfg.output, staged, cfg.validation_fraction, cfg.test_fraction)
    except ray.exceptions.RayError as err:  # the tasks splitting over LOCAL_SPLIT_ROWS staged rows
        if why := killed(err, t_split):
            raise JobError(
                f"prepare stopped: a process splitting the staged train rows was killed on each of its "
                f"{BATCH_RETRIES + 1} tries: {why}. Where memory ran out, run on nodes with more memory; the same "
                f"command again prepares the corpus anew"
            ) from err
        raise
    merge_stats(stats, split_stats)
    finished.update(split_files)
    split_s = time.time() - t_split
    for path in remove_unfinished(cfg.output, set(finished) - set(staged)):
        log.warning("prepare: removed %s, written by a write attempt that failed", path)
    shards = shard_list(cfg.output, {p: n for p, n in finished.items() if p not in staged})
    splits = {name: {**summarize(s), "files": shards.get(name, [])} for name, s in sorted(stats.items())}

    def total(key: str) -> Counter:  # a count of every split together
        return sum((Counter(s[key]) for s in splits.values()), Counter())

    bad_labels = total("unrecognised_labels")
    labels = total("label_counts")
    problem = rating_scale(bad_labels, labels, cfg.label_column) or unread_labels(
        bad_labels, labels, cfg.label_column
    )
    if problem:  # before the manifest: nothing downstream takes the output as complete
        raise InputError(f"input {cfg.input}: {problem}, then prepare again")
    read_total = sum(s["rows_read"] for s in splits.values())
    shared = shared_texts(stats)
    held_out = {"seed": cfg.seed, "stratified": True, "by": HELD_OUT_BY}
    manifest = {
        "format": "bertjob-prepared/1",
        "identity": key,
        "input": cfg.input,
        "corpus_kind": corpus.kind,
        "splits": splits,
        "rows_read": read_total,
        "rows_written": sum(s["rows_written"] for s in splits.values()),
        "rows_quarantined": sum(s["rows_quarantined"] for s in splits.values()),
        "shared_texts": shared,
        "tokenizer": tok_info,
        **cfg.text_settings().as_dict(),  # max_length, truncation, head_tokens, strip_html, the cap
        "validation": {"fraction": cfg.validation_fraction, **held_out},
        "test_from_train": {"fraction": cfg.test_fraction, **held_out},
        "config": to_dict(cfg),
        "versions": versions(),
        "wall_s": round(time.time() - started, 2),
        "ray_init_s": round(ray_init_s, 2),
        "validation_split_s": round(split_s, 2),
        "ray_cluster_cpus": ray.cluster_resources().get("CPU", 0),
    }
    write_json(join(cfg.output, "config.json"), to_dict(cfg))
    write_json(join(cfg.output, MANIFEST), manifest)  # last: marks the output complete
    # After the manifest: the quarantine and counts stay to be looked at, and a pipeline rerun that
    # reuses them says the same
    if problem := nothing_kept(cfg.input, cfg.output, manifest, TRAIN if in_pipeline else None, in_pipeline):
        raise InputError(problem)
    log.info("prepare: wrote %s", ", ".join(f"{k} {v['rows_written']}" for k, v in splits.items()))
    # Labelled train rows are for training (unlabelled ones are to score); the pipeline's train says it next.
    if manifest["splits"].get(TRAIN, {}).get("label_counts") and not in_pipeline:
        if problems := trainable_problems(cfg.output, manifest):
            log.warning("prepare: `bertjob train` will refuse this output: %s", "; ".join(problems))
    if counts := ", ".join(f"{pair} {n}" for pair, n in shared.items() if n and _leaks(pair)):
        log.warning("prepare: held-out splits hold texts of the splits trained on (%s; every pair in manifest.json's "
                    "shared_texts): such a review is scored as unseen though it was trained on (unsup: by "
                    "pretrain); drop the copies from one split", counts)  # fmt: skip
    if replaced := sum(s["utf8_replaced"] for s in splits.values()):
        log.warning("prepare: %s", utf8_note(replaced, read_total))
    if manifest["rows_quarantined"]:
        note = quarantine_note(manifest["rows_quarantined"], read_total, total("quarantined_by_reason"),
                               join(cfg.output, QUARANTINE), bad_labels)  # fmt: skip
        log.warning("prepare: %s", note)
    return manifest
