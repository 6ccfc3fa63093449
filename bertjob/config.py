"""Typed configuration: one dataclass per job, loaded from YAML plus `--key value` flags.

Every field carries a one-line help text (it becomes the CLI help). Problems are collected and raised
once, as a ConfigError, before Ray starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bertjob.text import TRUNCATIONS

T = TypeVar("T")

SAMPLE_INPUT = "imdb-sample"  # the small IMDb sample shipped inside the package


class SetupError(ValueError):
    """A problem found before any work starts (input, model, output, cluster): the CLI prints it
    and exits 2, without a traceback."""


class ConfigError(ValueError):
    """One or more configuration problems, each on its own line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


def opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class PrepareConfig:
    """Stream a review corpus through Ray Data into tokenized Parquet shards."""

    input: str = opt(
        SAMPLE_INPUT, "IMDb tar.gz/dir, Parquet/CSV/JSONL file/dir/glob, hf://NAME, or imdb-sample"
    )
    output: str = opt("", "output directory (local or s3:// / gs://); replaced on rerun")
    model: str = opt("minilm", "tokenizer source: minilm (embedded), a local directory, or a hub id")
    max_length: int = opt(512, "tokens per sequence including [CLS] and [SEP]")
    truncation: str = opt("head+tail", "head | tail | head+tail (Sun et al. 2019: best on IMDb)")
    head_tokens: int = opt(
        0, "tokens kept from the start with head+tail truncation (0: a quarter of max_length, 128 at 512)"
    )
    strip_html: bool = opt(True, "turn <br /> into spaces, drop tags and unescape HTML entities")
    max_chars_per_end: int = opt(
        0, "characters kept from each end of a huge text before tokenizing (0: 16 x max_length)"
    )
    text_column: str = opt("text", "text column of a generic corpus")
    label_column: str = opt(
        "label", "label column (0/1, neg/pos, negative/positive); absent means unlabelled"
    )
    id_column: str = opt("", "id column; empty: a stable id from source file and row number")
    split: str = opt("train", "split that a generic corpus without splits goes to")
    validation_fraction: float = opt(0.1, "share of train held out as validation (stratified, seeded)")
    seed: int = opt(42, "seed of the validation split")
    rows_per_shard: int = opt(25_000, "target rows per Parquet shard")
    batch_size: int = opt(512, "rows per tokenization batch")
    trust_remote_code: bool = opt(False, "let transformers run code shipped with a hub model")

    def problems(self) -> list[str]:
        p = []
        if not self.output:
            p.append("output: required (--output DIR)")
        if self.truncation not in TRUNCATIONS:
            p.append(f"truncation: {self.truncation!r} is not one of {', '.join(TRUNCATIONS)}")
        if not 8 <= self.max_length <= 8192:
            p.append(f"max_length: {self.max_length} must be between 8 and 8192")
        if self.truncation == "head+tail" and not 0 <= self.head_tokens < self.max_length - 2:
            p.append(f"head_tokens: {self.head_tokens} must be between 0 (auto) and max_length - 3")
        if not 0.0 <= self.validation_fraction < 1.0:
            p.append(f"validation_fraction: {self.validation_fraction} must be in [0, 1)")
        if self.rows_per_shard < 1 or self.batch_size < 1:
            p.append("rows_per_shard and batch_size must be positive")
        if not self.split or "/" in self.split:
            p.append(f"split: {self.split!r} must be a plain name such as train")
        return p

    @property
    def head_n(self) -> int:
        """head_tokens, or by default a quarter of max_length: Sun et al.'s 128 of 512."""
        return self.head_tokens or max(1, self.max_length // 4)


@dataclass
class TrainConfig:
    """Fine-tune data-parallel with Ray Train's TorchTrainer on a prepared directory."""

    data: str = opt("", "prepared directory written by `bertjob prepare`")
    output: str = opt("", "output directory: model/, metrics.json, training_curves.png")
    model: str = opt("minilm", "starting weights: minilm (embedded), a local directory, or a hub id")
    num_workers: int = opt(2, "data-parallel workers (one per GPU with use_gpu)")
    use_gpu: bool = opt(False, "one GPU per worker")
    cpus_per_worker: float = opt(
        0,
        "CPUs per worker (0: a local Ray's CPUs split across the workers; on a cluster, a node's CPUs per worker)",
    )
    torch_threads: int = opt(0, "intra-op threads per worker (0: its CPUs)")
    malloc_tuning: bool = opt(
        True,
        "Linux CPU workers keep freed memory for reuse (glibc: no mmap, no trim, one arena) instead of "
        "page-faulting it back every step: CPU steps ~1.3x faster (off: the system's malloc settings)",
    )
    epochs: int = opt(3, "passes over the train split")
    max_steps: int = opt(0, "stop after this many optimizer steps (0: epochs decide)")
    batch_size: int = opt(
        32,
        "sequences per optimizer step, all workers together (the seed recipe's 32); independent of num_workers",
    )
    micro_batch_size: int = opt(
        0,
        "most sequences a worker runs through the model at once (0: what fits its memory); "
        "a bigger share of batch_size accumulates gradients",
    )
    lr: float = opt(
        0.0,
        "peak learning rate of the top layer (0: by model width: 2e-4 up to 384 wide like MiniLM, "
        "5e-5 up to 768 like BERT-base, 2e-5 beyond)",
    )
    layer_lr_decay: float = opt(0.95, "lr multiplier per layer going down (Sun et al. 2019; 1.0 = off)")
    weight_decay: float = opt(0.01, "AdamW weight decay (never on biases and LayerNorm)")
    warmup_ratio: float = opt(0.1, "share of steps with linear warm-up")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    mixed_precision: str = opt(
        "auto", "auto | bf16 | fp16 | off (auto: bf16 where supported, else fp16 on GPU)"
    )
    pad_to_multiple_of: int = opt(0, "pad batches to a multiple of this (0: 8 on GPU, 1 on CPU)")
    length_grouping: int = opt(
        8,
        "sort each N batches' worth of shuffled rows by length before cutting batches: less padding (1: off)",
    )
    eval_every_steps: int = opt(0, "also evaluate every N steps (0: once per epoch)")
    checkpoint_every_steps: int = opt(0, "also checkpoint every N steps (0: once per epoch)")
    keep_checkpoints: int = opt(2, "checkpoints kept, best by validation accuracy")
    early_stopping_patience: int = opt(0, "stop after N evaluations without improvement (0: off)")
    log_every_steps: int = opt(20, "progress line every N steps (rank 0)")
    max_failures: int = opt(2, "worker-group restarts before giving up")
    shuffle_window_rows: int = opt(
        0,
        "rows shuffled together, read a window at a time (0: the whole split when its token ids "
        "take up to 1 GiB, else 250,000)",
    )
    check_resources: bool = opt(
        True, "fail fast when the cluster cannot place the workers (off on autoscaling clusters)"
    )
    storage_path: str = opt("", "checkpoints root (local, NFS, s3://, gs://); empty: OUTPUT/ray_results")
    name: str = opt("bertjob-train", "run name; rerunning with the same name and storage_path resumes")
    resume_changed: bool = opt(
        False, "resume a run's checkpoint although model, data, batch_size or seed changed (else an error)"
    )
    sample_log: bool = opt(
        False, "append each step's row indices per worker to STORAGE/NAME/samples/rank-N.jsonl (an audit)"
    )
    max_eval_rows: int = opt(0, "cap rows of validation/test evaluated (0: all)")
    tracking: str = opt("none", "none | mlflow | tensorboard")
    seed: int = opt(42, "seed of initialisation and data order")
    trust_remote_code: bool = opt(False, "let transformers run code shipped with a hub model")

    def problems(self) -> list[str]:
        p = []
        if not self.data:
            p.append("data: required (--data PREPARED_DIR)")
        if not self.output:
            p.append("output: required (--output DIR)")
        for name in (
            "num_workers",
            "epochs",
            "batch_size",
            "keep_checkpoints",
            "length_grouping",
        ):
            if getattr(self, name) < 1:
                p.append(f"{name}: must be at least 1")
        for name in ("cpus_per_worker", "micro_batch_size", "shuffle_window_rows", "max_steps"):
            if getattr(self, name) < 0:
                p.append(f"{name}: must be 0 (auto) or positive")
        if self.lr < 0:
            p.append("lr: must be 0 (auto) or positive")
        if not 0 < self.layer_lr_decay <= 1:
            p.append("layer_lr_decay: must be in (0, 1]")
        if not 0 <= self.warmup_ratio < 1:
            p.append("warmup_ratio: must be in [0, 1)")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "off"):
            p.append(f"mixed_precision: {self.mixed_precision!r} is not one of auto, bf16, fp16, off")
        if self.tracking not in ("none", "mlflow", "tensorboard"):
            p.append(f"tracking: {self.tracking!r} is not one of none, mlflow, tensorboard")
        return p


@dataclass
class InferConfig:
    """Score a corpus with a fine-tuned model on a Ray Data actor pool (evaluate adds metrics)."""

    input: str = opt("", "corpus: IMDb tar.gz/dir, Parquet/CSV/JSONL, hf://NAME, or a prepared directory")
    model: str = opt("", "model directory from `bertjob train` (DIR/model), a checkpoint, or a hub id")
    output: str = opt("", "output directory for the prediction shards and manifest.json")
    split: str = opt("", "with a prepared directory or IMDb input: the split to score (empty: all)")
    batch_size: int = opt(
        0,
        "sequences per forward pass (0: 16 on CPU, where small length-sorted batches are fastest; 256 on GPU)",
    )
    num_workers: int = opt(2, "predictor actors")
    use_gpu: bool = opt(False, "one GPU per predictor actor")
    cpus_per_worker: float = opt(1.0, "CPUs reserved per predictor actor")
    mixed_precision: str = opt("auto", "auto | bf16 | fp16 | off")
    max_length: int = opt(0, "tokens per sequence (0: what the model was trained with)")
    truncation: str = opt("", "head | tail | head+tail (empty: what the model was trained with)")
    head_tokens: int = opt(0, "head tokens for head+tail (0: what the model was trained with)")
    strip_html: bool = opt(True, "clean HTML as the prepare job does")
    text_column: str = opt("text", "text column of a generic corpus")
    id_column: str = opt("", "id column; empty: a stable id from source file and row number")
    label_column: str = opt("label", "label column (evaluate); missing means unlabelled")
    include_text: bool = opt(False, "copy the (cleaned) text into the output")
    rows_per_shard: int = opt(50_000, "target rows per output Parquet file")
    overwrite: bool = opt(False, "start clean instead of completing a previous partial run")
    trust_remote_code: bool = opt(False, "let transformers run code shipped with a hub model")

    def problems(self) -> list[str]:
        p = []
        for name in ("input", "model", "output"):
            if not getattr(self, name):
                p.append(f"{name}: required (--{name} ...)")
        if self.batch_size < 0 or self.num_workers < 1:
            p.append("batch_size must be 0 (auto) or positive, num_workers at least 1")
        if self.truncation and self.truncation not in TRUNCATIONS:
            p.append(f"truncation: {self.truncation!r} is not one of {', '.join(TRUNCATIONS)}")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "off"):
            p.append(f"mixed_precision: {self.mixed_precision!r} is not one of auto, bf16, fp16, off")
        return p


STAGES = ("prepare", "train", "evaluate", "infer")


@dataclass
class PipelineConfig:
    """prepare -> train -> evaluate (test split) -> infer, each stage's output feeding the next."""

    input: str = opt(SAMPLE_INPUT, "corpus to prepare (see `bertjob prepare --help`)")
    output_dir: str = opt("bertjob-output", "root of all outputs: prepared/, train/, evaluate/, infer/")
    model: str = opt("minilm", "starting weights and tokenizer")
    max_length: int = opt(512, "tokens per sequence")
    truncation: str = opt("head+tail", "head | tail | head+tail")
    num_workers: int = opt(2, "Ray Train workers and predictor actors")
    use_gpu: bool = opt(False, "train and score on GPUs")
    name: str = opt("bertjob", "run name (checkpoints resume under it)")
    storage_path: str = opt("", "checkpoints root (empty: OUTPUT_DIR/checkpoints)")
    infer_input: str = opt("", "corpus to score at the end (empty: the prepared unsup split, else test)")
    prepare: dict = opt(None, "settings for the prepare stage (see `bertjob prepare --help`)")
    train: dict = opt(None, "settings for the train stage")
    evaluate: dict = opt(None, "settings for the evaluate stage")
    infer: dict = opt(None, "settings for the infer stage")

    def problems(self) -> list[str]:
        p = []
        if self.truncation not in TRUNCATIONS:
            p.append(f"truncation: {self.truncation!r} is not one of {', '.join(TRUNCATIONS)}")
        for stage in STAGES:
            section = getattr(self, stage)
            if section is not None and not isinstance(section, dict):
                p.append(f"{stage}: must be a mapping of {stage} settings")
        return p

    def path(self, *parts: str) -> str:
        return join(self.output_dir, *parts)

    def stage(self, name: str) -> Any:
        """The stage's config: derived paths and shared settings, then the stage's own section."""
        prepared = self.path("prepared")
        model_dir = self.path("train", "model")
        base: dict[str, Any]
        if name == "prepare":
            cls, base = PrepareConfig, dict(
                input=self.input, output=prepared, model=self.model,
                max_length=self.max_length, truncation=self.truncation,
            )  # fmt: skip
        elif name == "train":
            cls, base = TrainConfig, dict(
                data=prepared, output=self.path("train"), model=self.model, num_workers=self.num_workers,
                use_gpu=self.use_gpu, name=self.name,
                storage_path=self.storage_path or self.path("checkpoints"),
            )  # fmt: skip
        elif name == "evaluate":
            cls, base = InferConfig, dict(
                input=prepared, split="test", model=model_dir, output=self.path("evaluate"),
                num_workers=self.num_workers, use_gpu=self.use_gpu,
            )  # fmt: skip
        elif name == "infer":
            cls, base = InferConfig, dict(
                input=self.infer_input or prepared, split="" if self.infer_input else "unsup",
                model=model_dir, output=self.path("infer"), num_workers=self.num_workers,
                use_gpu=self.use_gpu,
            )  # fmt: skip
        else:
            raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
        section = getattr(self, name) or {}
        return build(cls, {**base, **section}, where=f"{name}: ")


def join(root: str, *parts: str) -> str:
    """Join paths that may be URIs (s3://bucket/x) as well as local paths."""
    if "://" in root:
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(root, *parts)


# ---------------------------------------------------------------------------------------------
# Generic machinery: dict -> dataclass with type checks, YAML, argparse.


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}: expected a string, got {value!r}")
    if typ is dict:
        if value is None or isinstance(value, dict):
            return value
        raise ValueError(f"{key}: expected a mapping, got {value!r}")
    return value


def build(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Make a config from a plain dict: unknown keys and bad values are one ConfigError."""
    types = _field_types(cls)
    problems = []
    kwargs = {}
    for key, value in values.items():
        key_norm = key.replace("-", "_")
        if key_norm not in types:
            valid = ", ".join(f.name for f in dataclasses.fields(cls))
            problems.append(f"{where}unknown setting {key!r}; valid settings: {valid}")
            continue
        try:
            kwargs[key_norm] = _coerce(value, types[key_norm], where + key_norm)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError(problems)
    cfg = cls(**kwargs)
    problems = [where + p for p in cfg.problems()]  # type: ignore[attr-defined]
    if problems:
        raise ConfigError(problems)
    return cfg


def read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError([f"config file {path}: {err.strerror}"]) from err
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"config file {path}: not valid YAML ({err})"]) from err
    if not isinstance(data, dict):
        raise ConfigError([f"config file {path}: expected a mapping of settings at the top level"])
    return data


def is_pipeline_file(data: dict[str, Any]) -> bool:
    return any(k in data for k in ("output_dir", *STAGES))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
