"""Infer and evaluate: score a corpus of any size with a fine-tuned model, exactly once per row.

    read (units, with each row's stable (unit, row) position)
      -> [tasks on GPU runs: clean + tokenize]
      -> Predictor on an actor pool (clean + tokenize on CPU runs; sort by length, pad, score)
      -> PredictionSink: Parquet files committed atomically, named by their content

Exactly once: every committed file holds the (unit, row) of its rows. A rerun reads those
positions back, skips finished units and drops finished rows, so it completes only what is
missing. Nothing is ever renamed on an object store (a "rename" there is a copy and a delete):
each file is one PUT, visible whole or not at all, and the manifest, written last, is the commit
record. Before writing it, `settle` merges files that share positions (a killed run's write that
landed after the rerun listed the output), so every position is committed once. `--overwrite`
starts clean.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bertjob import checkpoint, models
from bertjob.config import InferConfig, JobError, SetupError, stage_flag, to_dict
from bertjob.identity import bertjob_version, corpus_fingerprint, digest, identity, model_fingerprint
from bertjob.metrics import classification_metrics
from bertjob.outputs import (
    LEASE,
    MANIFEST,
    MARKER,
    OutputError,
    a_or_an,
    check_replaceable,
    claim_output,
    ensure_output,
    releasing,
    versions,
)
from bertjob.sources import InputError, open_corpus
from bertjob.storage import (
    check_access,
    copy,
    exists,
    filesystem,
    for_workers,
    is_remote,
    join,
    read_json,
    remove,
    uri,
    write_json,
)
from bertjob.text import (
    BAD_LABEL,
    CAP_CHARS_PER_TOKEN,
    LABEL_NAMES,
    MINUS_ONE,
    TRUNCATIONS,
    TextSettings,
    commonest_labels,
    first_rows_rating_scale,
    parse_label,
    quarantine_note,
    rating_scale,
    tokenize_rows,
    utf8_note,
)

log = logging.getLogger(__name__)

PREDICTIONS = "predictions"
QUARANTINE = "quarantine"
RUN_FILE = "run.json"
REPORTS = ("metrics.json", "report.png")  # evaluate's, beside its manifest
NO_LABELS = " (or score without labels: --label-column '')"  # infer's other way out of a rating scale
RECEIPTS = "_read"  # per input unit, the rows its reader read (datasource.CorpusDatasource)
TMP = "_tmp"  # a local output's files while they are written, each then renamed into place
OWN_ENTRIES = (PREDICTIONS, QUARANTINE, RUN_FILE, *REPORTS, RECEIPTS, TMP)  # and outputs.py's
# A CPU predictor's default threads (one per core it takes): not measured beyond 2 cores; each
# thread holds Python's lock while it dispatches an operation, so one actor per 8 cores keeps that small.
MAX_SCORING_THREADS = 8

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.int8()),
        ("label_name", pa.string()),
        ("score", pa.float32()),
        ("prob_positive", pa.float32()),
        ("true_label", pa.int8()),  # the corpus' label when it has one (evaluate)
        ("unit", pa.int32()),
        ("row", pa.int64()),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("reason", pa.string()),
        ("text", pa.string()),
        ("unit", pa.int32()),
        ("row", pa.int64()),
        ("label", pa.string()),  # an unrecognised label as read (evaluate), else null
    ]
)


# ---------------------------------------------------------------------------------------------
# Model settings and checks


# What a model without bertjob.json (a hub model) gets: prepare's defaults (head_tokens: a quarter of
# max_length, the character cap: 16 per token).
DEFAULT_TEXT = {"max_length": 512, "truncation": "head+tail", "strip_html": True}


def model_settings(model: str) -> dict[str, Any] | None:
    """The text settings the model was trained with (bertjob.json beside it), or None."""
    where = models.resolve_model(model)
    path = os.path.join(where, "bertjob.json")
    if not (os.path.isdir(where) and os.path.exists(path)):
        return None
    try:  # one edited by hand (or cut short) failed with a traceback from json or int()
        with open(path) as f:
            recorded = json.load(f)
        text = TextSettings.of(recorded)
        if (
            text.truncation not in TRUNCATIONS
            or min(text.max_length, text.head_tokens, text.max_chars_per_end) < 1
        ):
            raise ValueError(
                f"max_length {text.max_length}, truncation {text.truncation!r}, head_tokens {text.head_tokens}"
            )
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        what = f"no {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        raise models.ModelError(f"model {model}: its bertjob.json, the text settings it was trained with, cannot be read "
                                f"({what}); restore the one its train run wrote") from err  # fmt: skip
    return recorded


def text_settings(cfg: InferConfig, base: dict[str, Any] | None) -> TextSettings:
    """The model's text settings (`base`: its bertjob.json, else a prepared input's manifest, else
    prepare's defaults at the max_length in effect), each overridden by the command line where
    given there."""
    max_length = cfg.max_length or int((base or DEFAULT_TEXT)["max_length"])
    b = TextSettings.of(base or {**DEFAULT_TEXT, "max_length": max_length})
    cap = b.max_chars_per_end
    if cfg.max_length:  # a longer max_length than the model's needs a longer cap
        cap = max(cap, CAP_CHARS_PER_TOKEN * max_length)
    return TextSettings(
        max_length=max_length,
        truncation=cfg.truncation or b.truncation,
        head_tokens=cfg.head_tokens or b.head_tokens,
        strip_html=b.strip_html if cfg.strip_html is None else cfg.strip_html,
        max_chars_per_end=cfg.max_chars_per_end or cap,
    )


def check_model(model: str, trust_remote_code: bool = False) -> list[str]:
    """A model directory without a classification head or a tokenizer is an error before any work."""
    where = models.resolve_model(model)
    if os.path.isdir(where):
        if os.path.exists(os.path.join(where, checkpoint.STATE_FILE)):
            return [f"model {model} is a training checkpoint, which holds no tokenizer; give the model directory "
                    f"its run exported (`bertjob train --output DIR` writes DIR/model)"]  # fmt: skip
        if not os.path.exists(os.path.join(where, "config.json")):
            return [f"model {model}: no config.json; give the train job's OUTPUT/model directory"]
        if problem := models.weights_problem(model):
            return [problem]
        if not models.has_classification_head(where):
            return [f"model {model}: has no sequence-classification head (architectures in config.json); "
                    f"fine-tune it first with `bertjob train`"]  # fmt: skip
        config = models.model_config(where)
        id2label = config.get("id2label") or {}
        if labels := models.other_head(config):
            return [f"model {model}: its head has {len(labels)} labels ({', '.join(labels)}); bertjob scores two "
                    f"(negative, positive): fine-tune it with `bertjob train` first"]  # fmt: skip
        # Output 1 is read as positive: a model trained elsewhere with {0: positive, 1: negative} had
        # every prediction inverted without a word (evaluate: an accuracy of 1 less the real one).
        names = {str(k): v for k, v in id2label.items()}
        if parse_label(names.get("0")) == 1 and parse_label(names.get("1")) == 0:
            return [f"model {model}: its label 0 is {names['0']!r} and 1 is {names['1']!r}; bertjob reads label 1 "
                    f"as positive, so every prediction would be inverted. Give a model whose label 1 is positive "
                    f"(as `bertjob train` writes)"]  # fmt: skip
        if any(parse_label(names.get(k)) != int(k) and names.get(k) != f"LABEL_{k}" for k in ("0", "1")):
            # a head of another task (entailment / not_entailment) was scored as sentiment without a word
            log.warning("model %s: its labels are %r and %r, not negative and positive; bertjob reads label 1 as "
                        "positive", model, names.get("0"), names.get("1"))  # fmt: skip
        try:  # from bertjob's cache when this directory's tokenizer was loaded before: no transformers import
            models.tokenizer_record(model, trust_remote_code)
        except models.ModelError as err:
            return [f"model {model}: {err}"]
    return []


# ---------------------------------------------------------------------------------------------
# The predictor: plain Python, loads the model once (__init__), scores a batch (__call__).


class Predictor:
    """Cleans, tokenizes (unless the batch already has input_ids), sorts by length, pads per
    sub-batch and scores. Used by Ray Data as an actor class, and directly in tests and benchmarks."""

    def __init__(
        self,
        model: str,
        batch_size: int = 64,
        text: dict[str, Any] | None = None,
        precision: str = "auto",
        device: str = "auto",
        include_text: bool = False,
        evaluate: bool = False,
        threads: int = 0,
        trust_remote_code: bool = False,
    ):
        # torch is the actor's alone: the driver and the read and write tasks never import it
        # (~1.3 s of CPU per process on a small machine).
        import torch
        from transformers import AutoModelForSequenceClassification

        from bertjob.training import resolve_precision, torch_threads

        # `text`: TextSettings as a dict (infer.text_settings); by default the model's own
        self.text = TextSettings(**text) if text else TextSettings.of(model_settings(model) or DEFAULT_TEXT)
        self.include_text = include_text
        self.evaluate = evaluate
        self.device = torch.device(
            "cuda"
            if device == "auto" and torch.cuda.is_available()
            else ("cpu" if device == "auto" else device)
        )
        # On CPU, small length-sorted batches are fastest (measured: 16 beats 64 by ~30% on MiniLM).
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 16)
        self.precision = resolve_precision(precision, self.device)
        models.quiet_transformers()
        self.tokenizer = models.load_tokenizer(model, trust_remote_code)
        self.encoder = models.Encoder.of(self.tokenizer)
        where = models.resolve_model(model)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            where, trust_remote_code=trust_remote_code
        )
        models.classify_from_cls(self.model)
        self.model.to(self.device).eval()
        if self.precision == "bf16":
            # Inference only: bf16 weights outright instead of autocast, which re-casts every weight
            # on every forward pass (measured +20% on CPU). Logits go back to fp32 for the softmax.
            self.model.to(torch.bfloat16)
            self.precision = "off"
        models.fuse_feed_forward(self.model)
        self.key_mask = models.takes_key_mask(self.model)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.multiple_of = 8 if self.device.type == "cuda" else 1
        # On CPU, `threads` sub-batches at once, each on one core: ~20% more sequences/s than each
        # forward pass split over the cores (MiniLM at 512 on 2 cores), whose threads wait for each
        # other at every operation. The GPU scores one sub-batch at a time.
        self.pool = ThreadPoolExecutor(threads) if self.device.type == "cpu" and threads > 1 else None
        torch_threads(1 if self.pool else threads)
        models.tokenizer_threads(threads or os.cpu_count() or 1)

    # Text -> token ids, with quarantine reasons; shared with the tokenize task stage.
    def tokenize(self, table: pa.Table) -> pa.Table:
        return tokenize_table(table, self.encoder, self.text, self.include_text, self.evaluate)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "reason" not in batch.column_names:  # not yet through tokenize_table (CPU runs tokenize here)
            batch = self.tokenize(batch)
        return self.score(batch)

    def forward(self, input_ids: pa.ListArray) -> np.ndarray:
        """P(positive) of each sequence of one sub-batch."""
        import torch

        from bertjob.training import autocast, collate

        t = collate({"input_ids": input_ids}, self.pad_id, self.multiple_of, self.device)
        # Without padding (common: sorted sub-batches of texts truncated to max_length), no mask:
        # the model then builds none and attention takes its unmasked kernel.
        mask = t["attention_mask"]
        if int(np.diff(input_ids.offsets.to_numpy()).min()) == mask.shape[1]:
            mask = None
        elif self.key_mask:
            mask = mask.bool()[:, None, None, :]
        with torch.inference_mode(), autocast(self.precision, self.device):  # inference mode: per thread
            logits = self.model(input_ids=t["input_ids"], attention_mask=mask).logits
        return torch.softmax(logits.float(), dim=-1)[:, 1].cpu().numpy()

    def score(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        reasons = batch.column("reason").to_pylist() if "reason" in batch.column_names else [None] * n
        good = np.array([r is None for r in reasons], dtype=bool)
        prob = np.full(n, np.nan, dtype=np.float32)
        rows = batch.column("input_ids").combine_chunks()
        lengths = np.diff(rows.offsets.to_numpy())
        idx = np.flatnonzero(good)
        order = idx[np.argsort(lengths[idx], kind="stable")]  # similar lengths together: less padding
        in_order = rows.take(order)  # once per batch; each sub-batch is then a zero-copy slice
        # Longest first: the sub-batches that run last, while other cores may idle, are the shortest.
        starts = range(0, len(order), self.batch_size)[::-1]
        subs = [in_order.slice(start, self.batch_size) for start in starts]
        for start, p in zip(starts, (self.pool.map if self.pool else map)(self.forward, subs)):
            prob[order[start : start + self.batch_size]] = p
        label = (prob >= 0.5).astype(np.int8)
        score = np.where(label == 1, prob, 1 - prob).astype(np.float32)
        out = {
            "id": batch.column("id"),
            "label": pa.array(label, pa.int8(), mask=~good),
            "label_name": pa.array(
                [LABEL_NAMES[int(v)] if g else None for v, g in zip(label, good)], pa.string()
            ),
            "score": pa.array(score, pa.float32(), mask=~good),
            "prob_positive": pa.array(prob, pa.float32(), mask=~good),
            "true_label": batch.column("true_label")
            if "true_label" in batch.column_names
            else pa.nulls(n, pa.int8()),
            "reason": pa.array(reasons, pa.string()),
        }
        for name in ("unit", "row", "text", "raw_text", "raw_label", "utf8_replaced"):
            if name in batch.column_names:
                out[name] = batch.column(name)
        return pa.table(out)


def tokenize_table(
    table: pa.Table,
    encoder: models.Encoder,
    settings: TextSettings,
    include_text: bool = False,
    evaluate: bool = False,
) -> pa.Table:
    """Source rows -> rows with input_ids (or a quarantine reason), through prepare's own path
    (`text.tokenize_rows`); evaluate quarantines rows without a usable label. Pre-tokenized rows
    (a prepared directory) pass through."""
    n = table.num_rows
    raw_labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * n
    cols: dict[str, Any] = {"id": table.column("id")}
    if include_text:
        cols["text"] = pa.nulls(n, pa.string())  # a prepared directory keeps no text
    if "input_ids" in table.column_names:  # a prepared directory: already tokenized and checked
        cols.update(input_ids=table.column("input_ids"), true_label=pa.array([parse_label(v) for v in raw_labels], pa.int8()),
                    reason=pa.nulls(n, pa.string()), raw_text=pa.nulls(n, pa.string()))  # fmt: skip
    else:
        splits = table.column("split").to_pylist() if "split" in table.column_names else None
        t = tokenize_rows(table.column("text").to_pylist(), raw_labels, splits, encoder, settings, evaluate,
                          exact_lengths=False)  # fmt: skip
        cols.update(input_ids=t.input_ids, true_label=pa.array(t.labels, pa.int8()),
                    reason=pa.array(t.reasons, pa.string()), raw_text=pa.array(t.quarantined_text, pa.string()))  # fmt: skip
        if evaluate:  # what the quarantine shows, and what finish() looks for a rating scale in
            bad = [None if r != BAD_LABEL else str(v) for r, v in zip(t.reasons, raw_labels)]
            cols["raw_label"] = pa.array(bad, pa.string())
        if include_text:
            cols["text"] = pa.array(t.cleaned, pa.string())
    for name in ("unit", "row", "utf8_replaced"):
        if name in table.column_names:
            cols[name] = table.column(name)
    return pa.table(cols)


def _tokenize_task(batch: pa.Table, settings: dict[str, Any], encoder: models.Encoder) -> pa.Table:
    models.tokenizer_threads(1)  # the task's one CPU
    return tokenize_table(
        batch, encoder, TextSettings(**settings["text"]), settings["include_text"], settings["evaluate"]
    )


# ---------------------------------------------------------------------------------------------
# Committing output exactly once


def _content_name(table: pa.Table) -> str:
    """A file name from the positions it holds: a retried write of the same rows replaces, never duplicates."""
    h = hashlib.sha1()
    h.update(table.column("unit").to_numpy().tobytes())
    h.update(table.column("row").to_numpy().tobytes())
    return h.hexdigest()[:20]


class PredictionSink:
    """Writes predictions and quarantined rows; each file appears under its final name in one step."""

    def __init__(self, output: str, include_text: bool):
        self.output = output
        self.include_text = include_text

    def write_blocks(self, blocks: Iterable[pa.Table]) -> dict[str, Any]:
        tables = [b for b in blocks if b.num_rows]
        stats: dict[str, Any] = {"scored": 0, "quarantined": Counter(), "utf8_replaced": 0}
        if not tables:
            return stats
        table = pa.concat_tables(tables, promote_options="default")
        if "utf8_replaced" in table.column_names:
            stats["utf8_replaced"] = int(
                np.count_nonzero(table.column("utf8_replaced").to_numpy(zero_copy_only=False))
            )
        bad = table.column("reason").is_valid().to_numpy(zero_copy_only=False)
        good = table.filter(pa.array(~bad))
        q = table.filter(pa.array(bad))
        schema = OUTPUT_SCHEMA.append(pa.field("text", pa.string())) if self.include_text else OUTPUT_SCHEMA
        if good.num_rows:
            self.commit(PREDICTIONS, good.select(schema.names).cast(schema))
            stats["scored"] = good.num_rows
        if q.num_rows:
            qt = pa.table(
                {"id": q.column("id"), "reason": q.column("reason"), "text": q.column("raw_text"),
                 "unit": q.column("unit"), "row": q.column("row"),
                 "label": q.column("raw_label") if "raw_label" in q.column_names else pa.nulls(q.num_rows, pa.string())},
                schema=QUARANTINE_SCHEMA,
            )  # fmt: skip
            self.commit(QUARANTINE, qt)
            stats["quarantined"] = Counter(q.column("reason").to_pylist())
        return stats

    def commit(self, kind: str, table: pa.Table) -> str:
        """Write `table` under its content name; returns the path in the output's filesystem."""
        fs, root = filesystem(self.output)
        final = join(root, kind, f"part-{_content_name(table)}.parquet")
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = join(root, TMP, f"{uuid.uuid4().hex}.parquet")
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, final)  # atomic on one filesystem
        else:
            # Object stores make a PUT visible whole or not at all.
            pq.write_table(table, final, filesystem=fs, compression="zstd")
        return final


def make_sink(output: str, include_text: bool, rows_per_file: int) -> Any:
    from ray.data.datasource import Datasink

    class _Sink(Datasink):
        def __init__(self) -> None:
            self.inner = PredictionSink(output, include_text)
            self.scored = 0
            self.quarantined: Counter = Counter()
            self.utf8_replaced = 0

        @property
        def min_rows_per_write(self) -> int:
            return rows_per_file

        def get_name(self) -> str:
            return "WritePredictions"

        def write(self, blocks: Iterable[pa.Table], ctx: Any) -> dict[str, Any]:
            return self.inner.write_blocks(blocks)

        def on_write_complete(self, write_result: Any) -> None:
            for part in write_result.write_returns:
                self.scored += part["scored"]
                self.quarantined.update(part["quarantined"])
                self.utf8_replaced += part["utf8_replaced"]

    return _Sink()


def rows_per_file(cfg: InferConfig) -> int:
    """Rows per committed output file. A file is committed once full, and a stopped run keeps only
    those: on CPU 50,000 rows were 20 min to 3 h of scoring, and Ctrl-C lost all of it."""
    return cfg.rows_per_shard or (50_000 if cfg.use_gpu else 2_000)


def committed_rows(output: str) -> int:
    """The rows committed so far (predictions and quarantine), from the files' footers."""
    fs, root = filesystem(output)
    files = [name for name in committed_files(output) if name.endswith(".parquet")]
    return sum(pq.read_metadata(join(root, name), filesystem=fs).num_rows for name in files)


def committed_positions(output: str, units: int, redo: str) -> tuple[dict[int, Any], int]:
    """Read back what earlier runs committed: {unit: True (finished) | bool mask of done rows}.
    `redo`: the flag that scores from the start (`overwrite_flag`)."""
    fs, root = filesystem(output)
    masks: dict[int, list[np.ndarray]] = {}
    total = 0
    for kind in (PREDICTIONS, QUARANTINE):
        listing = fs.get_file_info(pafs.FileSelector(join(root, kind), allow_not_found=True))
        for f in listing:
            if not f.path.endswith(".parquet"):
                continue
            try:
                t = pq.read_table(f.path, columns=["unit", "row"], filesystem=fs)
            except (pa.ArrowInvalid, KeyError) as err:  # a file put there since, not one a run committed
                raise OutputError(f"output {output}: {kind}/{os.path.basename(f.path)} is no file bertjob committed "
                                  f"({str(err).splitlines()[0]}); remove it, or pass {redo} to score from the start") from err  # fmt: skip
            total += t.num_rows
            u, r = t.column("unit").to_numpy(), t.column("row").to_numpy()
            for unit in np.unique(u):
                masks.setdefault(int(unit), []).append(r[u == unit])
    done: dict[int, Any] = {}
    for unit, parts in masks.items():
        rows = np.concatenate(parts)
        mask = np.zeros(int(rows.max()) + 1, dtype=bool)
        mask[rows] = True
        done[unit] = mask
    return done, total


def committed_files(output: str) -> dict[str, int]:
    """The committed files ({"predictions/part-....parquet": bytes}) and evaluate's metrics.json and
    report.png: a finished run's manifest lists them, and a rerun compares."""
    fs, root = filesystem(output)
    out = {}
    for kind in (PREDICTIONS, QUARANTINE):
        for f in fs.get_file_info(pafs.FileSelector(join(root, kind), allow_not_found=True)):
            if f.path.endswith(".parquet"):
                out[f"{kind}/{os.path.basename(f.path)}"] = f.size
    for name, f in zip(REPORTS, fs.get_file_info([join(root, n) for n in REPORTS])):
        if f.type == pafs.FileType.File:
            out[name] = f.size
    return out


def file_changes(recorded: dict[str, int], found: dict[str, int]) -> str | None:
    """How the committed files differ from those a manifest lists, in words (None: they do not)."""
    gone = sorted(set(recorded) - set(found))
    added = sorted(set(found) - set(recorded))
    changed = sorted(k for k in set(recorded) & set(found) if recorded[k] != found[k])
    parts = [f"{len(names)} {what} (first: {names[0]})" for names, what in
             ((gone, "removed"), (changed, "changed"), (added, "not written by it")) if names]  # fmt: skip
    return "; ".join(parts) or None


def settle(output: str, kind: str) -> int:
    """Leave every position committed under DIR/<kind> in exactly one file; returns the rows dropped.

    Committed files never change, so two can share positions only when two writes grouped
    overlapping rows differently: a killed run's write whose PUT completed after the rerun had
    listed the output, or a write retried with another grouping. Each set of files that share
    positions is replaced by one file holding each position once: the merged file is written first
    (named by its content, so doing it again writes the same object), then the others are deleted.
    A crash in between leaves the merged file overlapping its sources: the next finish merges them
    again into that same object.
    """
    fs, root = filesystem(output)
    listing = fs.get_file_info(pafs.FileSelector(join(root, kind), allow_not_found=True))
    files = sorted(f.path for f in listing if f.path.endswith(".parquet"))
    if len(files) < 2:
        return 0
    keys = [_positions(pq.read_table(p, columns=["unit", "row"], filesystem=fs)) for p in files]
    owner = np.repeat(np.arange(len(files)), [len(k) for k in keys])
    all_keys = np.concatenate(keys)
    order = np.argsort(all_keys, kind="stable")
    same = np.flatnonzero(all_keys[order][1:] == all_keys[order][:-1])
    if not len(same):
        return 0
    group = list(range(len(files)))  # union-find over files that share a position

    def top(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i in same:
        group[top(int(owner[order[i + 1]]))] = top(int(owner[order[i]]))
    sets: dict[int, list[str]] = {}
    for i in {int(owner[order[j]]) for j in np.concatenate([same, same + 1])}:
        sets.setdefault(top(i), []).append(files[i])
    dropped = 0
    sink = PredictionSink(output, include_text=False)
    for paths in sets.values():
        table = pa.concat_tables(
            [pq.read_table(p, filesystem=fs) for p in sorted(paths)], promote_options="default"
        )
        _, first = np.unique(_positions(table), return_index=True)  # sorted by position: deterministic
        merged = sink.commit(kind, table.take(first))
        for p in paths:
            if p != merged:
                fs.delete_file(p)
        dropped += table.num_rows - len(first)
    return dropped


def _positions(table: pa.Table) -> np.ndarray:
    return table.column("unit").to_numpy().astype(np.int64) << 40 | table.column("row").to_numpy()


# ---------------------------------------------------------------------------------------------
# The job


def describe(cfg: InferConfig, evaluate: bool = False) -> tuple[Any, dict[str, Any]]:
    """The corpus, and the run's identity: what an output must have been written with to be resumed."""
    problems = check_model(cfg.model, cfg.trust_remote_code)
    if problems:
        raise models.ModelError("; ".join(problems))
    label_column = cfg.label_column if evaluate or cfg.label_column else ""
    corpus = open_corpus(cfg.input, cfg.text_column, label_column, cfg.id_column, cfg.split)
    # A corpus of several splits (prepared, IMDb, hf://; an IMDb archive's are known only by reading
    # it): evaluated whole, its train rows would make the metrics meaningless.
    splits = sorted(corpus.manifest["splits"]) if corpus.kind == "prepared" else corpus.splits()  # type: ignore[attr-defined]
    if evaluate and not cfg.split and (splits is None or len(splits) > 1):
        which = f"splits {sorted(splits)}" if splits else "the IMDb layout's splits (train, test, unsup)"
        raise InputError(f"input {cfg.input} is {a_or_an(corpus.kind)} corpus with {which}; choose the one to "
                         f"evaluate with --split (such as --split test)")  # fmt: skip
    named = corpus.named_splits()
    if evaluate and len(named) > 1:
        # train-...parquet beside test-...parquet (Hugging Face), train.csv beside test.csv (Kaggle):
        # evaluated whole, the train rows the model learnt from went into the metrics.
        words = sorted(named)
        one = cfg.split if cfg.split in named else "test" if "test" in named else words[-1]
        raise InputError(f"input {cfg.input}: its files are named as splits "
                         f"({', '.join(corpus.relpath(named[w]) for w in words)}), and evaluate would score them as "
                         f"one corpus: the {', '.join(words[:-1])} and {words[-1]} rows alike. Evaluate one split's "
                         f"files: --input '{uri(corpus.fs, os.path.dirname(named[one]))}/{one}*'")  # fmt: skip
    plain = (
        [u for u in corpus.units if u not in corpus.split_of_unit]
        if corpus.kind in ("parquet", "csv", "jsonl", "arrow")
        else []
    )
    if cfg.split and plain:
        # A file outside split=NAME/ directories has no split: it was read whole as --split's, so
        # `evaluate --input reviews.csv --split test` (the file prepare held a test split out of)
        # scored its train rows into the metrics.
        raise InputError(f"input {cfg.input}: {corpus.relpath(plain[0])} has no split of its own (it is in no "
                         f"split=NAME/ directory), so --split {cfg.split} would read all of it; drop --split to score "
                         f"the input whole, or, for the split `bertjob prepare` held out of it, give the prepared "
                         f"directory: --input PREPARED --split {cfg.split}")  # fmt: skip
    first, names = corpus.header
    if not cfg.id_column and "id" in names:  # its own ids go unused unless named
        log.warning("%s: %s has a column 'id', not read: predictions are keyed by file and row (%s:0, ...); "
                    "give --id-column id to key them by it", "evaluate" if evaluate else "infer",
                    corpus.relpath(first), corpus.relpath(first))  # fmt: skip
    if cfg.split and splits is not None and cfg.split not in splits:  # it scored nothing and called that done
        raise InputError(f"input {cfg.input}: no split {cfg.split!r}; the splits are {sorted(splits)}")
    if cfg.include_text and corpus.kind == "prepared":  # its text column came out all null, without a word
        raise InputError(f"input {cfg.input} is a prepared directory, which keeps token ids, not text; "
                         f"--include-text needs the raw corpus as --input")  # fmt: skip
    near = corpus.near_label_column()
    if near and not evaluate:  # its values were left out of true_label without a word
        log.warning("infer: no column %r, but one named %r, not read: give --label-column %r to record its values as "
                    "true_label", cfg.label_column, near, near)  # fmt: skip
    if evaluate and not corpus.labelled:
        fix = f"Set --label-column {near!r} (the column named so but for case or spaces)" if near else "Set --label-column"
        if corpus.kind == "prepared":  # its labels were read by prepare: only a split can have them
            by_split = corpus.manifest["splits"]  # type: ignore[attr-defined]
            labelled = sorted(s for s, v in by_split.items() if v.get("label_counts"))
            fix = f"Evaluate a split with labels ({', '.join(labelled) or 'it has none'})"
        raise InputError(
            f"input {cfg.input}: no labels to evaluate against: {corpus.describe()}. {fix}, or score it with "
            f"`bertjob infer`"
        )
    # A raw corpus labelled elsewhere (IMDb's unsup): every review was scored, then "no labelled rows
    # to evaluate". A prepared split without labels was refused just above.
    if evaluate and cfg.split == "unsup":
        raise InputError(f"input {cfg.input}: split unsup holds unlabelled reviews, nothing to evaluate against; "
                         f"evaluate a labelled split (--split test), or score it with `bertjob infer`")  # fmt: skip
    recorded = model_settings(cfg.model)
    fingerprint = models.tokenizer_info(cfg.model, cfg.trust_remote_code)["fingerprint"]
    if corpus.kind == "prepared":
        manifest = corpus.manifest  # type: ignore[attr-defined]
        prepared_fp = manifest["tokenizer"]["fingerprint"]
        if prepared_fp != fingerprint:
            raise InputError(f"input {cfg.input} was tokenized with another tokenizer ({prepared_fp}) than model "
                             f"{cfg.model} uses ({fingerprint}); give the raw corpus instead")  # fmt: skip
        # Its rows are already tokenized: they must be as the model (or the command line) wants them.
        effective = text_settings(cfg, recorded or manifest)
        want, have = effective.as_dict(), TextSettings.of(manifest).as_dict()
        # A text flag on the command line (--max-length 128) changes what this command scores with:
        # its values were reported as the model's.
        changed = effective != TextSettings.of(recorded or manifest)
        whose, scorer = ("this command", f"this command scores with (model {cfg.model}'s, changed by its flags)") \
            if changed else ("model", f"model {cfg.model} was trained with")  # fmt: skip
        differ = [k for k in want if want[k] != have[k]]
        if differ:
            # prepare's head_tokens default follows max_length: named too, so that the two agree
            keys = [*differ, *(["head_tokens"] if "max_length" in differ and "head_tokens" not in differ else [])]
            flags = " ".join(f"--{k.replace('_', '-')} {str(want[k]).lower() if isinstance(want[k], bool) else want[k]}"
                             for k in keys)  # fmt: skip
            raise InputError(f"input {cfg.input} was prepared with other text settings than {scorer}: "
                             f"{', '.join(f'{k} {have[k]!r} ({whose}: {want[k]!r})' for k in differ)}; give the raw "
                             f"corpus, or prepare it again with these settings ({flags})")  # fmt: skip
    else:
        effective = text_settings(cfg, recorded)
        if recorded:  # flags that score otherwise than the model was trained: it may do worse, unsaid
            trained, now = TextSettings.of(recorded).as_dict(), effective.as_dict()
            # the cap follows max_length unless given: not the user's change
            keys = [k for k in now if now[k] != trained[k] and (k != "max_chars_per_end" or cfg.max_chars_per_end)]  # fmt: skip
            if keys:
                log.warning("%s: scoring with other text settings than model %s was trained with: %s; its "
                            "predictions may be worse than its evaluation said (leave out these flags to score "
                            "as it was trained)", "evaluate" if evaluate else "infer", cfg.model,
                            ", ".join(f"{k} {now[k]!r} (trained: {trained[k]!r})" for k in keys))  # fmt: skip
    if effective.truncation == "head+tail" and not effective.head_tokens < effective.max_length - 2:
        # prepare's rule: `--max-length 16` on a model trained with 16 head tokens, or `--head-tokens 200`
        # at 64, was cut to the budget, the head alone, without a word
        raise InputError(f"head_tokens {effective.head_tokens} leaves no tail at max_length {effective.max_length} "
                         f"with head+tail truncation (it must be under max_length - 2): give --head-tokens "
                         f"{max(1, effective.max_length // 4)}, say, or --truncation head")  # fmt: skip
    if problem := models.max_length_problem(cfg.model, effective.max_length):
        raise InputError(problem)
    # The run's identity: the input's content (not its path), what scoring depends on, the model.
    # mixed_precision too: its scores differ (bf16 or not), and a rerun asking for fp32 was told the
    # bf16 output was complete for its settings (or resumed it, mixing the two).
    settings = {"text": effective.as_dict(), "split": cfg.split, "include_text": cfg.include_text, "evaluate": evaluate,
                "columns": [cfg.text_column, cfg.label_column, cfg.id_column],
                "mixed_precision": cfg.mixed_precision}  # fmt: skip
    model = {"files": model_fingerprint(cfg.model), "tokenizer": fingerprint}
    run_info = {"identity": identity(corpus_fingerprint(corpus), settings, model), "input": cfg.input, "model": cfg.model,
                "tokenizer_fingerprint": fingerprint, "weights": digest(model["files"]), "units": len(corpus.units),
                "inputs": input_files(corpus), "settings": effective.as_dict(),
                "scoring": {k: v for k, v in settings.items() if k != "text"}, "bertjob": bertjob_version()}  # fmt: skip
    return corpus, run_info


def changes(earlier: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between an output's run.json and this run's identity, in words: a rerun with
    another max_length, model or file in the input was refused as 'other (or unknown) inputs or
    settings', leaving the user to guess which."""
    out = []
    for group in ("settings", "scoring"):
        before, after = earlier.get(group) or {}, now.get(group) or {}
        out += [f"{k} {before[k]!r} -> {v!r}" for k, v in after.items() if k in before and before[k] != v]
    model = ("weights", "tokenizer_fingerprint")
    if any(earlier.get(k) != now[k] for k in model):
        out.append(f"the model's files ({now['model']})")
    if earlier.get("bertjob", now["bertjob"]) != now["bertjob"]:
        out.append(f"bertjob {earlier['bertjob']} -> {now['bertjob']}")
    before_files, after_files = earlier.get("inputs"), now.get("inputs")
    if before_files is not None and after_files is not None:
        added = [f for f in after_files if f not in before_files]
        removed = [f for f in before_files if f not in after_files]
        for what, files in (("added", added), ("removed", removed)):
            if files:
                out.append(f"input files {what}: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}")
    return "; ".join(out) or f"the content of input {now['input']}"


def input_files(corpus: Any) -> list[str] | None:
    """The file of each unit, relative to the input: a prediction's `unit` indexes it. With an id
    column whose ids repeat across files (each file's own 0..n), nothing else said which file a
    prediction came from. None for the IMDb layout, whose ids name their review."""
    if corpus.kind not in ("parquet", "csv", "jsonl", "prepared"):
        return None
    return [corpus.relpath(u) for u in corpus.units]


def run(cfg: InferConfig, evaluate: bool = False, replace_changed: bool = False) -> dict[str, Any]:
    """Score cfg.input into cfg.output (see `score`); the output's manifest."""
    return score(cfg, evaluate, replace_changed)[0]


@releasing
def score(
    cfg: InferConfig, evaluate: bool = False, replace_changed: bool = False
) -> tuple[dict[str, Any], bool]:
    """Score cfg.input into cfg.output, completing an interrupted run; `replace_changed` (the
    pipeline) redoes an output of other inputs or settings. (The output's manifest, whether the
    output was already complete for these inputs and settings and kept as it was.)"""
    import ray

    from bertjob.cluster import (
        BATCH_RETRIES,
        actor_pool_map,
        init_ray,
        killed,
        killed_starting,
        killed_task,
        resource_problem,
        retries_allowed,
    )
    from bertjob.datasource import read_corpus

    started = time.time()
    stage = "evaluate" if evaluate else "infer"
    check_access({"input": cfg.input, "model": cfg.model, "output": cfg.output})
    corpus, run_info = describe(cfg, evaluate)
    first = corpus.first_rows()
    if first is None:
        raise InputError(f"input {cfg.input}: no rows found ({corpus.describe()})")
    others, fix = ("would be quarantined", "") if evaluate else ("would have no true_label", NO_LABELS)
    if problem := first_rows_rating_scale(first.column("label"), cfg.label_column, others):
        raise InputError(f"input {cfg.input}: {problem}{fix}")
    effective = run_info["settings"]
    redo = overwrite_flag(stage, replace_changed)
    done, already, fresh = _resume_state(cfg, run_info, stage, replace_changed)
    if done is None:
        log.info("%s: %s is complete for these inputs and settings; nothing to do (use %s to redo)", stage,
                 cfg.output, redo)  # fmt: skip
        return read_json(join(cfg.output, MANIFEST)), True
    # The paths the actors are handed: on a running cluster they start where their node was started.
    cfg = dataclasses.replace(cfg, model=for_workers(cfg.model), output=for_workers(cfg.output, output=True))
    init_ray(dashboard=False)
    cpus = cfg.cpus_per_worker or predictor_cpus(cfg)
    problem = cfg.check_resources and resource_problem(cfg.num_workers.min, cpus, 1 if cfg.use_gpu else 0)
    if problem:
        raise SetupError(f"cannot score: {problem}")
    if fresh:  # only now that it can run: a run that cannot start leaves an earlier output as it was
        claim_output(cfg.output, stage, OWN_ENTRIES)
        write_json(join(cfg.output, RUN_FILE), run_info)
    use_tasks_for_tokens = cfg.use_gpu and corpus.kind != "prepared"
    ds = read_corpus(corpus, positions=True, split=cfg.split if corpus.kind != "prepared" else "", done=done,
                     num_cpus=0, receipts=join(cfg.output, RECEIPTS))  # fmt: skip
    pred_kwargs = dict(
        model=cfg.model, batch_size=cfg.batch_size, text=effective, precision=cfg.mixed_precision,
        include_text=cfg.include_text, evaluate=evaluate, threads=max(1, int(cpus)),
        trust_remote_code=cfg.trust_remote_code,
    )  # fmt: skip
    if use_tasks_for_tokens:
        # GPUs should only score: tokenize on CPU tasks ahead of them.
        with retries_allowed():
            ds = ds.map_batches(_tokenize_task, fn_kwargs={"settings": pred_kwargs, "encoder": models.load_encoder(cfg.model, cfg.trust_remote_code)},
                                batch_format="pyarrow", batch_size=1024, num_cpus=1, max_retries=BATCH_RETRIES)  # fmt: skip
    ds = actor_pool_map(
        ds,
        Predictor,
        cfg.num_workers.min,
        cfg.num_workers.max,
        cpus,
        1 if cfg.use_gpu else 0,
        fn_constructor_kwargs=pred_kwargs,
        batch_size=max((cfg.batch_size or 16) * 16, 512),
        batch_format="pyarrow",
    )
    sink = make_sink(cfg.output, cfg.include_text, rows_per_file(cfg))
    scoring_t0 = time.time()
    try:
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0, "max_retries": BATCH_RETRIES})
    except ray.exceptions.RayError as err:  # `killed` tells those it knows; the others are raised again
        if why := killed(err, scoring_t0):
            kind = "loading" if killed_starting(err) else "task" if killed_task(err) else "batch"
            raise ScoringKilledError(stage, why, cfg, effective["max_length"], cpus, kind) from err
        raise
    scoring_s = time.time() - scoring_t0
    resources = ray.cluster_resources()
    return finish(cfg, stage, run_info, sink, already, started, scoring_s, resources, evaluate, redo), False


def overwrite_flag(stage: str, in_pipeline: bool) -> str:
    """The flag that has `stage` score from the start, as the command being run takes it: the
    pipeline's advice named --overwrite, which `bertjob pipeline` does not take (its stage settings
    are --STAGE.KEY VALUE, a bool's value too)."""
    return stage_flag(stage, "overwrite", in_pipeline) + (" true" if in_pipeline else "")


class ScoringKilledError(JobError):
    """A batch whose scoring process was killed on every try (`kind` "batch"), a scoring process
    killed on every try while it loaded the model ("loading"), or a read or write task killed on
    every try ("task"), most likely for memory. Ray Data retried each for ever (Ray's defaults):
    the job never ended."""

    def __init__(
        self, stage: str, why: str, cfg: InferConfig, max_length: int, cpus: float, kind: str = "batch"
    ):
        from bertjob.cluster import BATCH_RETRIES

        threads, tries = max(1, int(cpus)), BATCH_RETRIES + 1
        if kind == "task":  # the input's reads and the output's writes: Ray Data's plain tasks
            what = (
                f"a process reading the input or writing predictions was killed on each of its {tries} tries"
            )
            fix = "score on nodes with more memory, or split the input into smaller files"
        elif kind == "loading":  # each worker holds the model: fewer of them per node, or a smaller model
            fewer = (
                "fewer --num-workers"
                if cfg.use_gpu
                else f"a higher --cpus-per-worker (now {threads}) or fewer --num-workers"
            )
            what = f"a scoring process was killed while loading the model on each of its {tries} tries"
            fix = f"score on nodes with more memory, with a smaller model, or on fewer workers per node ({fewer})"
        else:
            lower = [f"--batch-size (sequences scored at once per thread, now {cfg.batch_size or '16 on CPU, 256 on GPU'})",
                     f"--max-length (now {max_length})"]  # fmt: skip
            if not cfg.use_gpu:
                lower.append(f"--cpus-per-worker (threads per worker, now {threads})")
            what = f"the scoring process of a batch was killed on each of its {tries} tries"
            fix = (f"lower {', '.join(lower[:-1])} or {lower[-1]}, score on fewer workers per node (--num-workers), "
                   f"or on nodes with more memory")  # fmt: skip
        super().__init__(
            f"{stage} stopped: {what}: {why}. Where memory ran out, {fix}; the rows committed are kept: the same "
            f"command again resumes from them"
        )


def predictor_cpus(cfg: InferConfig) -> int:
    """The CPUs (and scoring threads) of a CPU predictor when not set: a node's, at most
    MAX_SCORING_THREADS, fewer where the smallest worker count needs it.

    A GPU predictor reserves none (it runs on one thread): every CPU tokenizes in the tasks beside
    it. Ray Data (2.60) hands the CPU budget that no operator has claimed to an actor pool without a
    size limit, which the GPUs keep to one actor each, so a GPU actor holding even 1 CPU left the
    tokenize tasks 6 of 16 CPUs (measured: 6,575 reviews/s on an H200 that scores 14,352/s alone).
    """
    from bertjob.cluster import cluster_cpus, node_cpus

    if cfg.use_gpu:
        return 0
    return max(1, min(MAX_SCORING_THREADS, node_cpus(), int(cluster_cpus() // cfg.num_workers.min)))


def _resume_state(
    cfg: InferConfig, run_info: dict[str, Any], stage: str, replace_changed: bool = False
) -> tuple[dict[int, Any] | None, int, bool]:
    """({unit: done mask}, rows already committed, whether the output is to be started afresh), or
    (None, 0, False) when the output is already complete.

    An earlier output of this stage with other inputs or settings (or unknown ones) is an error, or
    with `--overwrite`, or `replace_changed` (the pipeline), to be replaced. Other directories never are.
    """
    run_path = join(cfg.output, RUN_FILE)
    if not cfg.overwrite:
        ensure_output(cfg.output, stage)  # refuses a directory of anything but this stage
        earlier = read_json(run_path) if exists(run_path) else None
        if earlier is not None and earlier.get("identity") == run_info["identity"]:
            if exists(join(cfg.output, MANIFEST)):
                recorded = read_json(join(cfg.output, MANIFEST)).get("files")  # none from an earlier bertjob
                if (
                    recorded is None
                    or (differ := file_changes(recorded, committed_files(cfg.output))) is None
                ):
                    return None, 0, False
                # A file removed since (or one added): the output was called complete with rows missing.
                log.warning("%s: %s is no longer as its manifest lists it (%s); completing it again", stage,
                            cfg.output, differ)  # fmt: skip
                remove(join(cfg.output, MANIFEST))
            done, already = committed_positions(
                cfg.output, run_info["units"], overwrite_flag(stage, replace_changed)
            )
            log.info("%s: resuming: %d rows already committed in %s", stage, already, cfg.output)
            return done, already, False
        fs, root = filesystem(cfg.output)
        entries = [
            i
            for i in fs.get_file_info(pafs.FileSelector(root))
            if os.path.basename(i.path) not in (MARKER, LEASE)
        ]
        if earlier is not None or entries:
            what = f" ({changes(earlier, run_info)})" if earlier is not None else ""
            if not replace_changed:
                raise OutputError(f"output {cfg.output} holds {a_or_an(stage)} run with other {'' if earlier else '(or unknown) '}"
                                  f"inputs or settings{what}; pass --overwrite to replace it")  # fmt: skip
            log.info(
                "%s: inputs or settings changed since %s was written%s; redoing it", stage, cfg.output, what
            )
    check_replaceable(cfg.output, stage, OWN_ENTRIES)  # refused now, before Ray; replaced once the run can start
    return {}, 0, True


def finish(
    cfg: InferConfig, stage: str, run_info: dict[str, Any], sink: Any, already: int, started: float,
    scoring_s: float, resources: dict[str, float], evaluate: bool, redo: str,
) -> dict[str, Any]:  # fmt: skip
    """Count what is committed (all runs), check it, then write metrics (evaluate) and the manifest.
    `redo`: the flag that scores from the start (`overwrite_flag`)."""
    scored, quarantined = sink.scored, sink.quarantined
    fs, root = filesystem(cfg.output)
    for kind in (PREDICTIONS, QUARANTINE):
        merged = settle(cfg.output, kind)
        if merged:
            log.warning(
                "%s: %d rows were committed twice (a killed run's late write); kept once", stage, merged
            )
    totals: dict[str, Any] = {"scored": 0, "quarantined": Counter()}
    pairs = 0
    positions, ids = [], []
    for kind in (PREDICTIONS, QUARANTINE):
        d = join(root, kind)
        if fs.get_file_info(d).type == pafs.FileType.NotFound:
            continue
        cols = (
            ["unit", "row"]
            + (["id"] if cfg.id_column else [])
            + (["reason", "label"] if kind == QUARANTINE else [])
        )
        # The quarantine's schema given: files of a run before its `label` column read it as null.
        schema = QUARANTINE_SCHEMA if kind == QUARANTINE else None
        t = pq.read_table(d, columns=cols, filesystem=fs, schema=schema)
        pairs += t.num_rows
        positions.append(_positions(t))
        ids += t.column("id").chunks if cfg.id_column else []
        if kind == PREDICTIONS:
            totals["scored"] = t.num_rows
        else:
            totals["quarantined"] = Counter(t.column("reason").to_pylist())
            totals["unrecognised_labels"] = Counter(v for v in t.column("label").to_pylist() if v is not None)
    unique = len(np.unique(np.concatenate(positions))) if positions else 0
    if unique != pairs:
        raise RuntimeError(f"{cfg.output}: {pairs - unique} rows are committed twice; rerun with {redo}")
    # Counted from the input (each unit's reader wrote how many rows it read), not from the output.
    from bertjob.datasource import rows_read as input_rows

    rows_read, labels = input_rows(join(cfg.output, RECEIPTS), run_info["units"])
    if rows_read != pairs:
        raise RuntimeError(f"{cfg.output}: {pairs} rows committed but {rows_read} read; rerun to complete")
    if not rows_read:  # a split an IMDb archive does not have (its splits are known only by reading it)
        raise InputError(f"input {cfg.input}: no rows{f' in split {cfg.split!r}' if cfg.split else ''}")
    # Before the manifest and metrics, as prepare's: 1-star reviews scored against as positives
    # (evaluate), or recorded as true_label 1 (infer, where the other ratings were left null).
    others, fix = ("were quarantined", "") if evaluate else ("had no true_label", NO_LABELS)
    problem = rating_scale(labels.pop("unrecognised"), labels, cfg.label_column, others)
    if problem:
        raise InputError(f"input {cfg.input}: {problem}{fix}, then {stage} again with {redo}")
    if ids:  # a corpus's own ids (file:row ones are unique)
        repeated, example, n = repeated_ids(pa.chunked_array(ids, pa.string()))
        if repeated:
            log.warning("%s: %d rows share their id (--id-column %r) with another row, e.g. %r (%d rows): each has a "
                        "prediction of its own, so a join on id matches several; the unit and row columns tell them "
                        "apart", stage, repeated, cfg.id_column, example, n)  # fmt: skip
    wall = time.time() - started
    manifest = {
        "format": f"bertjob-{stage}/1",
        "rows_read": rows_read,
        "rows_scored": totals["scored"],
        "rows_quarantined": sum(totals["quarantined"].values()),
        "quarantined_by_reason": dict(sorted(totals["quarantined"].items())),
        "rows_this_run": scored + sum(quarantined.values()),
        "utf8_replaced_this_run": sink.utf8_replaced,
        "rows_resumed": already,
        "inputs": run_info["inputs"],
        "model": {
            "name": cfg.model,
            "tokenizer_fingerprint": run_info["tokenizer_fingerprint"],
            "weights_fingerprint": run_info["weights"],
        },  # fmt: skip
        "settings": run_info["settings"],
        "config": to_dict(cfg),
        "versions": versions(),
        "wall_s": round(wall, 2),
        "scoring_s": round(scoring_s, 2),
        "rows_per_s": round((scored + sum(quarantined.values())) / wall, 1) if wall else None,
        "ray_cluster": {k: v for k, v in resources.items() if k in ("CPU", "GPU")},
    }
    if evaluate:
        manifest["unrecognised_labels"] = commonest_labels(totals.get("unrecognised_labels") or {})
        manifest["metrics"] = evaluation(cfg, totals["quarantined"], manifest["unrecognised_labels"])
    manifest["files"] = committed_files(cfg.output)  # a rerun checks they are all still there
    write_json(join(cfg.output, MANIFEST), manifest)
    remove(join(cfg.output, TMP))  # what writes a stop cut short left half-written, kept for ever
    log.info("%s: %d rows read, %d scored, %d quarantined, %.1f rows/s -> %s", stage, rows_read, totals["scored"],
             manifest["rows_quarantined"], manifest["rows_per_s"] or 0, cfg.output)  # fmt: skip
    if sink.utf8_replaced:
        log.warning("%s: %s", stage, utf8_note(sink.utf8_replaced, manifest["rows_this_run"]))
    if manifest["rows_quarantined"]:  # rows without a prediction (evaluate: left out of the metrics)
        note = quarantine_note(manifest["rows_quarantined"], rows_read, totals["quarantined"],
                               join(cfg.output, QUARANTINE), manifest.get("unrecognised_labels") or {})  # fmt: skip
        log.warning("%s: %s", stage, note)
    return manifest


def repeated_ids(ids: pa.ChunkedArray) -> tuple[int, str | None, int]:
    """(rows whose id another row has too, the commonest such id, its rows). A hash of the ids: less
    than the sort of the positions beside it (measured: 1.1 s and 5.8 s for 2M rows on 2 busy cores)."""
    if len(pc.unique(ids)) == len(ids):
        return 0, None, 0
    counts = pc.value_counts(ids)
    n = counts.field("counts").to_numpy()
    top = counts[int(np.argmax(n))]
    return int(n[n > 1].sum()), top["values"].as_py(), top["counts"].as_py()


def evaluation(cfg: InferConfig, quarantined: Counter, unrecognised: dict[str, int]) -> dict[str, Any]:
    """metrics.json and report.png from the committed predictions (labelled rows only)."""
    fs, root = filesystem(cfg.output)
    if fs.get_file_info(join(root, PREDICTIONS)).type == pafs.FileType.NotFound:
        # Labels of another vocabulary ("good"/"bad", stars) quarantine every row: say so, not only
        # that nothing could be scored, which reads as a problem with the text.
        reasons = ", ".join(f"{n} {reason}" for reason, n in quarantined.most_common())
        hint = ("; labels are read as 0/1, neg/pos or negative/positive (any case): map yours to these, or "
                "name the label column with --label-column") if BAD_LABEL in quarantined else ""  # fmt: skip
        if unrecognised and all(v.strip() in MINUS_ONE for v in unrecognised):
            # GLUE's test splits: told to map its labels to 0/1, there were none to map.
            hint = ("; every label is -1, Hugging Face's mark of a row without one (GLUE's test splits): there are "
                    "no labels to evaluate against; score it with `bertjob infer`")  # fmt: skip
        raise InputError(f"input {cfg.input}: no row could be scored, nothing to evaluate: every row was "
                         f"quarantined ({reasons}){hint}; the rows are in {join(cfg.output, QUARANTINE)}")  # fmt: skip
    t = pq.read_table(join(root, PREDICTIONS), columns=["prob_positive", "true_label"], filesystem=fs)
    t = t.filter(t.column("true_label").is_valid())
    if t.num_rows == 0:
        raise InputError(
            f"input {cfg.input}: no labelled rows to evaluate (label column {cfg.label_column!r})"
        )
    labels = t.column("true_label").to_numpy()
    probs = t.column("prob_positive").to_numpy()
    m = classification_metrics(labels, probs)
    if len(np.unique(labels)) == 1:  # a folder of one polarity, or a split filtered by label
        only = LABEL_NAMES[int(labels[0])].lower()
        neg = (
            ", and precision, recall and F1, which measure the positive class, are 0"
            if labels[0] == 0
            else ""
        )
        log.warning("evaluate: all %d labelled rows are %s: the ROC AUC is undefined (null in metrics.json)%s; "
                    "check the input, --split and --label-column", len(labels), only, neg)  # fmt: skip
    write_json(join(cfg.output, "metrics.json"), m)
    if is_remote(cfg.output):
        with tempfile.TemporaryDirectory(prefix="bertjob-report-") as local:
            plot_report(labels, probs, m, os.path.join(local, "report.png"))
            copy(os.path.join(local, "report.png"), join(cfg.output, "report.png"))
    else:
        plot_report(labels, probs, m, os.path.join(cfg.output, "report.png"))
    log.info(
        "evaluate: accuracy %.4f f1 %.4f roc_auc %.4f on %d rows",
        m["accuracy"],
        m["f1"],
        m["roc_auc"],
        m["count"],
    )
    return m


def plot_report(labels: np.ndarray, probs: np.ndarray, m: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    cm = np.array(m["confusion_matrix"])
    a.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        a.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    a.set_xticks([0, 1], ["NEGATIVE", "POSITIVE"])
    a.set_yticks([0, 1], ["NEGATIVE", "POSITIVE"])
    a.set_xlabel("predicted")
    a.set_ylabel("true")
    a.set_title(f"accuracy {m['accuracy']:.4f} (n={m['count']})")
    order = np.argsort(-probs)
    y = labels[order].astype(bool)
    tpr = np.concatenate([[0], np.cumsum(y) / max(1, y.sum())])
    fpr = np.concatenate([[0], np.cumsum(~y) / max(1, (~y).sum())])
    b.plot(fpr, tpr, color="tab:red")
    b.plot([0, 1], [0, 1], "--", color="grey")
    b.set_xlabel("false positive rate")
    b.set_ylabel("true positive rate")
    b.set_title(
        f"ROC (AUC {m['roc_auc']:.4f})" if np.isfinite(m["roc_auc"]) else "ROC (AUC undefined: one class)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
