"""Ray Data edge of `bertjob.sources`: a Corpus becomes a streaming Ray dataset."""

from __future__ import annotations

from typing import Any

import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from bertjob.sources import ROW_SCHEMA, Corpus

# Reading is light next to tokenizing and scoring; a fraction of a CPU keeps the read tasks
# from taking whole cores (and keeps Ray Data from fusing them into the heavy stage, so the
# heavy stage still runs in parallel when the input is a single archive).
READ_CPUS = 0.25


class CorpusDatasource(Datasource):
    def __init__(self, corpus: Corpus, keys_only: bool = False):
        self.corpus = corpus
        self.keys_only = keys_only

    def get_name(self) -> str:
        return f"Read{self.corpus.kind.title().replace('-', '')}"

    def estimate_inmemory_data_size(self) -> int | None:
        return self.corpus.size_bytes or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None) -> list[ReadTask]:
        units = self.corpus.units
        n = max(1, min(len(units), parallelism))
        groups = [units[i::n] for i in range(n)]
        corpus, keys_only = self.corpus, self.keys_only

        def make(group: list[Any]) -> ReadTask:
            def read() -> Any:
                for unit in group:
                    yield from corpus.read(unit, keys_only)

            size = corpus.size_bytes // max(1, len(groups))
            meta = BlockMetadata(num_rows=None, size_bytes=size, exec_stats=None, input_files=None)
            return ReadTask(read, meta, schema=ROW_SCHEMA)

        return [make(g) for g in groups]


def read_corpus(corpus: Corpus, keys_only: bool = False) -> ray.data.Dataset:
    return ray.data.read_datasource(CorpusDatasource(corpus, keys_only), num_cpus=READ_CPUS)
