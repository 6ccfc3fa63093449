"""Ray Data edge of `bertjob.sources`: a Corpus becomes a streaming Ray dataset."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from bertjob.cluster import BATCH_RETRIES, cluster_cpus, retries_allowed
from bertjob.sources import ROW_SCHEMA, Corpus
from bertjob.storage import exists, join, read_json, write_json
from bertjob.text import tally_labels

# Reading is light next to tokenizing and scoring. Read tasks reserve no CPU: any reservation, however
# small, makes Ray Data admit one fewer whole-CPU task of the heavy stage (on 2 cores: half the
# throughput). Their number is capped instead, and the different resources keep Ray Data from
# fusing them into the heavy stage, so a single archive still feeds every core.
READ_CPUS = 0.0
# One reader moves 100k-160k rows/s (Parquet, CSV, JSONL; measured), what ~50 cores tokenize; each
# reader at once is a Ray worker process of its own (~1.5 s of CPU to start). So one per 8 CPUs, at
# most 4: on 2 cores, 4 readers made a 100k-review infer 7% and prepare 6% slower than 1.
CPUS_PER_READER = 8
READ_CONCURRENCY = 4


class CorpusDatasource(Datasource):
    """Reads a Corpus; with `positions`, adds `unit` and `row` (a row's stable place in the input),
    keeps only rows of `split` (when set) and drops rows whose position is in `done`. With
    `receipts` (a directory), each unit's count of rows in `split` is written there as
    `unit-<i>.json` before its last rows leave the reader, so that a job counts what it read from
    the input itself, not from what reached its output."""

    def __init__(
        self,
        corpus: Corpus,
        keys_only: bool = False,
        positions: bool = False,
        split: str = "",
        done: dict[int, Any] | None = None,
        receipts: str = "",
    ):
        self.corpus = corpus
        self.keys_only = keys_only
        self.positions = positions
        self.split = split
        self.done = done or {}
        self.receipts = receipts

    def get_name(self) -> str:
        return f"Read{self.corpus.kind.title().replace('-', '')}"

    def estimate_inmemory_data_size(self) -> int | None:
        return self.corpus.size_bytes or None

    def pending(self) -> list[tuple[int, Any]]:
        """(index, unit) of the units left to read: all but those `done` marks finished."""
        return [(i, u) for i, u in enumerate(self.corpus.units) if self.done.get(i) is not True]

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        units = self.pending()
        n = max(1, min(len(units), parallelism))
        groups = [units[i::n] for i in range(n)]
        corpus, keys_only, positions, split, done, receipts = (
            self.corpus, self.keys_only, self.positions, self.split, self.done, self.receipts,
        )  # fmt: skip

        def make(group: list[Any]) -> ReadTask:
            def read() -> Any:
                for index, unit in group:
                    row, in_split, last, labels = 0, 0, None, {}
                    for table in corpus.read(unit, keys_only):
                        if positions:
                            n_in = table.num_rows
                            mine = split_labels(table, split)
                            in_split += len(mine)
                            if receipts:  # what finish checks for a rating scale
                                tally_labels(mine, labels)
                            table = with_positions(table, index, row, split, done.get(index))
                            row += n_in
                        if last is not None:
                            yield last
                        last = table if table.num_rows else None
                    if receipts:
                        write_json(join(receipts, f"unit-{index}.json"), {"rows": in_split, "labels": labels})
                    if last is not None:
                        yield last

            size = corpus.size_bytes // max(1, len(groups))
            meta = BlockMetadata(num_rows=None, size_bytes=size, exec_stats=None, input_files=None)
            return ReadTask(read, meta, schema=None if positions else ROW_SCHEMA)

        return [make(g) for g in groups]


def split_labels(table: pa.Table, split: str) -> pa.ChunkedArray:
    """The labels of the rows of `split` (of all rows when none is given)."""
    labels = table.column("label")
    if not split:
        return labels
    return labels.filter(pa.array(table.column("split").to_numpy(zero_copy_only=False) == split))


def rows_read(receipts: str, units: int) -> tuple[int, dict[str, Any]]:
    """The input's rows and its labels' tally (`text.tally_labels`), from the receipts of every unit
    (this run's and earlier runs')."""
    missing = [i for i in range(units) if not exists(join(receipts, f"unit-{i}.json"))]
    if missing:
        raise RuntimeError(f"{len(missing)} of {units} input units were never read to the end (first: unit "
                           f"{missing[0]}); rerun to complete")  # fmt: skip
    rows, labels, unrecognised = 0, Counter(), Counter()
    for i in range(units):
        receipt = read_json(join(receipts, f"unit-{i}.json"))
        rows += receipt["rows"]
        tally = dict(receipt.get("labels") or {})  # none in an earlier bertjob's receipt
        unrecognised.update(tally.pop("unrecognised", {}))
        labels.update(tally)
    return rows, {**labels, "unrecognised": dict(unrecognised)}


def with_positions(table: pa.Table, unit: int, first_row: int, split: str, done: Any) -> pa.Table:
    """Add unit/row columns, then keep the rows of `split` that are not in the `done` mask."""
    n = table.num_rows
    rows = np.arange(first_row, first_row + n, dtype=np.int64)
    table = table.append_column("unit", pa.array(np.full(n, unit, dtype=np.int32))).append_column(
        "row", pa.array(rows)
    )
    keep = np.ones(n, dtype=bool)
    if split:
        keep &= table.column("split").to_numpy(zero_copy_only=False) == split
    if done is not None and len(done):
        inside = rows < len(done)
        keep[inside] &= ~done[rows[inside]]
    return table if keep.all() else table.filter(pa.array(keep))


def read_corpus(
    corpus: Corpus,
    keys_only: bool = False,
    positions: bool = False,
    split: str = "",
    done: dict[int, Any] | None = None,
    num_cpus: float = READ_CPUS,
    receipts: str = "",
) -> ray.data.Dataset:
    source = CorpusDatasource(corpus, keys_only, positions, split, done, receipts)
    # No more than there are read tasks (one per unit at most): Ray Data warns of a cap it cannot use.
    readers = max(1, min(READ_CONCURRENCY, int(cluster_cpus()) // CPUS_PER_READER, len(source.pending())))
    with retries_allowed():
        return ray.data.read_datasource(source, num_cpus=num_cpus, concurrency=readers,
                                        ray_remote_args={"max_retries": BATCH_RETRIES})  # fmt: skip
