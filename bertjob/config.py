"""Typed configuration: one dataclass per job, loaded from YAML plus `--key value` flags.

Every field carries a one-line help text (it becomes the CLI help). Problems are collected and raised
once, as a ConfigError, before Ray starts.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bertjob.text import CAP_CHARS_PER_TOKEN, TRUNCATIONS, TextSettings

T = TypeVar("T")

SAMPLE_INPUT = "imdb-sample"  # the small IMDb sample shipped inside the package


class SetupError(ValueError):
    """A problem found before any work starts (input, model, output, cluster): the CLI prints it
    and exits 2, without a traceback."""


class JobError(RuntimeError):
    """The job stopped for a reason it can name (no capacity for its workers, a NaN loss): the CLI
    prints it and exits 1, without a traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with what the stopped run keeps in words: the CLI's last line."""

    def __init__(self, kept: str):
        super().__init__(kept)
        self.kept = kept


class ConfigError(ValueError):
    """One or more configuration problems, each on its own line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


def opt(
    default: Any, help: str, *, choices: tuple[str, ...] = (), unbounded: bool = False, **bounds: float
) -> Any:
    """A setting: its default, its help line, and what values are valid, checked by `build()`.

    A number needs bounds (`ge`, `gt`, `le`, `lt`) or `unbounded=True`, so no numeric setting, a new
    one included, reaches a worker unchecked (tests/test_config.py tries a bad value for each).
    """
    assert set(bounds) <= {"ge", "gt", "le", "lt"}, bounds
    meta = {"help": help, **bounds, **({"choices": choices} if choices else {})}
    if unbounded:
        meta["unbounded"] = True
    return field(default=default, metadata=meta)


PRECISIONS = ("auto", "bf16", "fp16", "off")


class Workers(typing.NamedTuple):
    """A worker count: fixed (YAML `2`, flag `2`) or an elastic range (YAML `[1, 4]`, flag `1-4`)
    that Ray Train resizes within as nodes die and join (`ScalingConfig(num_workers=(1, 4))`)."""

    min: int
    max: int

    @classmethod
    def parse(cls, value: Any) -> Workers:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, int):
            return cls(int(value), int(value))
        if isinstance(value, str):
            lo, dash, hi = value.replace(" ", "").partition("-")
            return cls(int(lo), int(hi if dash else lo))  # `2-` (its end left out) is no count of 2
        if (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            return cls(*map(int, value))
        raise ValueError(value)

    @property
    def fixed(self) -> bool:
        return self.min == self.max

    def scaling(self) -> int | tuple[int, int]:
        """What Ray Train's ScalingConfig(num_workers=...) takes."""
        return self.min if self.fixed else (self.min, self.max)

    def __str__(self) -> str:
        return str(self.min) if self.fixed else f"{self.min}-{self.max}"


class Settings:
    """Base of the job configs: a worker count given as a plain int in code (`TrainConfig(...,
    num_workers=2)`, or a config dict a Ray worker rebuilds) becomes a Workers, as build() makes it."""

    def __post_init__(self) -> None:
        value = getattr(self, "num_workers", None)
        if value is not None and not isinstance(value, Workers):
            self.num_workers = Workers.parse(value)


@dataclass
class PrepareConfig(Settings):
    """Stream a review corpus through Ray Data into tokenized Parquet shards."""

    input: str = opt(
        SAMPLE_INPUT, "IMDb tar.gz/dir, Parquet/CSV/TSV/JSONL file/dir/glob, hf://NAME, or imdb-sample"
    )
    output: str = opt(
        "", "output directory (local or s3:// / gs://); a rerun replaces an earlier prepare output there"
    )
    model: str = opt("minilm", "tokenizer source: minilm (embedded), a local directory, or a hub id")
    max_length: int = opt(512, "tokens per sequence including [CLS] and [SEP]", ge=8, le=8192)
    truncation: str = opt(
        "head+tail", "head | tail | head+tail (Sun et al. 2019: best on IMDb)", choices=TRUNCATIONS
    )
    head_tokens: int = opt(
        0,
        "tokens kept from the start with head+tail truncation (0: a quarter of max_length, 128 at 512)",
        ge=0,
    )
    strip_html: bool = opt(True, "turn <br /> into spaces, drop tags and unescape HTML entities")
    max_chars_per_end: int = opt(
        0, "characters kept from each end of a huge text before tokenizing (0: 16 x max_length)", ge=0
    )
    text_column: str = opt("text", "text column of a generic corpus")
    label_column: str = opt(
        "label", "label column (0/1, neg/pos, negative/positive); absent means unlabelled"
    )
    id_column: str = opt("", "id column; empty: a stable id from source file and row number")
    split: str = opt("train", "split that a generic corpus without splits goes to")
    validation_fraction: float = opt(
        0.1, "share of train held out as validation (stratified, seeded)", ge=0, lt=1
    )
    test_fraction: float = opt(
        0.0,
        "share of train held out as the test split, for a corpus without one (stratified, seeded)",
        ge=0,
        lt=1,
    )
    seed: int = opt(42, "seed of the validation and test splits", unbounded=True)
    rows_per_shard: int = opt(25_000, "target rows per Parquet shard", ge=1)
    batch_size: int = opt(512, "rows per tokenization batch", ge=1)
    trust_remote_code: bool = opt(False, "let transformers run code shipped with a hub model")

    def problems(self) -> list[str]:
        p = []
        if not self.output:
            p.append("output: required (--output DIR)")
        if self.truncation == "head+tail" and not self.head_tokens < self.max_length - 2:
            p.append(f"head_tokens: {self.head_tokens} must be between 0 (auto) and max_length - 3 "
                     f"({self.max_length - 3} at max_length {self.max_length})")  # fmt: skip
        if not self.split or "/" in self.split:
            p.append(f"split: {self.split!r} must be a plain name such as train")
        if not self.text_column:  # no text read: every row quarantined as null_text
            p.append("text_column: must name the column of the review's text (default text)")
        if self.validation_fraction + self.test_fraction >= 1:
            p.append("validation_fraction + test_fraction: must leave some of train to train on (under 1)")
        return p

    @property
    def head_n(self) -> int:
        """head_tokens, or by default a quarter of max_length: Sun et al.'s 128 of 512."""
        return self.head_tokens or max(1, self.max_length // 4)

    def text_settings(self) -> TextSettings:
        return TextSettings(
            self.max_length, self.truncation, self.head_n, self.strip_html,
            self.max_chars_per_end or CAP_CHARS_PER_TOKEN * self.max_length,
        )  # fmt: skip


# Worker settings that train and pretrain share (one definition, one meaning).


def workers_opt() -> Any:
    return opt(
        Workers(2, 2),
        "data-parallel workers (one per GPU with use_gpu): N, or a range MIN-MAX (YAML [MIN, MAX]) that "
        "grows and shrinks with the cluster",
        ge=1,
    )


def cpus_per_worker_opt() -> Any:
    return opt(
        0,
        "CPUs per worker (0: a local Ray's CPUs split across the workers; on a cluster, a node's CPUs per worker)",
        ge=0,
    )


def batch_size_opt(default: int, what: str) -> Any:
    return opt(default, f"{what} per optimizer step, all workers together; independent of num_workers", ge=1)


def micro_batch_size_opt() -> Any:
    return opt(
        0,
        "most sequences a worker runs through the model at once (0: what fits its memory); "
        "a bigger share of batch_size accumulates gradients",
        ge=0,
    )


def seed_opt(help: str) -> Any:
    # numpy's SeedSequence takes no negative seed and torch.manual_seed none of 2**64 or more: `--seed -1`
    # ("random" elsewhere) failed every worker with a traceback after the model had loaded.
    return opt(42, help, ge=0, lt=2**64)


def run_name_problems(name: str) -> list[str]:
    """A train or pretrain run's name is one directory under storage_path, which a rerun resumes:
    Ray Train gives an empty name a fresh timestamped one, so such a run never resumed; and a name
    with a letter outside ASCII (`läuft-1`) failed the run with a traceback, in Ray Train's metrics."""
    if name.strip() and name not in (".", "..") and "/" not in name and name.isascii() and name.isprintable():
        return []
    return [
        f"name: {name!r} must be a plain directory name of ASCII characters such as bertjob-train "
        f"(checkpoints go to STORAGE/NAME)"
    ]


def placement_timeout_opt() -> Any:
    return opt(
        600,
        "a fixed-size run whose workers cannot all be placed for this long (at start, or after a node "
        "died) stops with an error naming what it asked for and what the cluster has; long enough for "
        "an autoscaler to add a node. An elastic run waits up to this (at most 60 s) for a group, then "
        "tries again with what the cluster holds",
        gt=0,
    )


def resize_check_opt() -> Any:
    return opt(
        60,
        "an elastic run (num_workers MIN-MAX) checks this often whether the cluster can hold more workers",
        gt=0,
    )


@dataclass
class TrainConfig(Settings):
    """Fine-tune data-parallel with Ray Train's TorchTrainer on a prepared directory."""

    data: str = opt("", "prepared directory written by `bertjob prepare`")
    output: str = opt("", "output directory: model/, metrics.json, training_curves.png")
    model: str = opt("minilm", "starting weights: minilm (embedded), a local directory, or a hub id")
    num_workers: Workers = workers_opt()
    use_gpu: bool = opt(False, "one GPU per worker")
    cpus_per_worker: float = cpus_per_worker_opt()
    torch_threads: int = opt(0, "intra-op threads per worker (0: its CPUs)", ge=0)
    malloc_tuning: bool = opt(
        True,
        "Linux CPU workers keep freed memory for reuse (glibc: no mmap, no trim, one arena) instead of "
        "page-faulting it back every step: CPU steps ~1.3x faster (off: the system's malloc settings)",
    )
    epochs: int = opt(3, "passes over the train split", ge=1)
    max_steps: int = opt(0, "stop after this many optimizer steps (0: epochs decide)", ge=0)
    batch_size: int = batch_size_opt(32, "sequences (the seed recipe's 32)")
    micro_batch_size: int = micro_batch_size_opt()
    lr: float = opt(
        0.0,
        "peak learning rate of the top layer (0: by model width: 2e-4 up to 384 wide like MiniLM, "
        "5e-5 up to 768 like BERT-base, 2e-5 beyond)",
        ge=0,
    )
    layer_lr_decay: float = opt(
        0.95, "lr multiplier per layer going down (Sun et al. 2019; 1.0 = off)", gt=0, le=1
    )
    weight_decay: float = opt(0.01, "AdamW weight decay (never on biases and LayerNorm)", ge=0)
    warmup_ratio: float = opt(0.1, "share of steps with linear warm-up", ge=0, lt=1)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)", ge=0)
    mixed_precision: str = opt(
        "auto", "auto | bf16 | fp16 | off (auto: bf16 where supported, else fp16 on GPU)", choices=PRECISIONS
    )
    pad_to_multiple_of: int = opt(0, "pad batches to a multiple of this (0: 8 on GPU, 1 on CPU)", ge=0)
    compile: bool = opt(
        False,
        "torch.compile the model, shapes dynamic (MiniLM's step: 1.2x on an H200; on CPU no faster, "
        "minutes to compile); checkpoints and the model are the same either way, resume switches freely",
    )
    length_grouping: int = opt(
        8,
        "sort each N batches' worth of shuffled rows by length before cutting batches: less padding (1: off)",
        ge=1,
    )
    eval_every_steps: int = opt(0, "also evaluate every N steps (0: once per epoch)", ge=0)
    checkpoint_every_steps: int = opt(0, "also checkpoint every N steps (0: once per epoch)", ge=0)
    keep_checkpoints: int = opt(2, "checkpoints kept, best by validation accuracy", ge=1)
    early_stopping_patience: int = opt(0, "stop after N evaluations without improvement (0: off)", ge=0)
    log_every_steps: int = opt(20, "progress line every N steps (rank 0)", ge=1)
    max_failures: int = opt(2, "worker-group restarts before giving up (-1: no limit)", ge=-1)
    placement_timeout_s: float = placement_timeout_opt()
    resize_check_s: float = resize_check_opt()
    shuffle_window_rows: int = opt(
        0,
        "rows shuffled together, read a window at a time (0: the whole split when its token ids "
        "take up to 1 GiB, else 250,000)",
        ge=0,
    )
    check_resources: bool = opt(
        True, "fail fast when the cluster cannot place the workers (off on autoscaling clusters)"
    )
    storage_path: str = opt("", "checkpoints root (local, NFS, s3://, gs://); empty: OUTPUT/ray_results")
    name: str = opt("bertjob-train", "run name; rerunning with the same name and storage_path resumes")
    resume_changed: bool = opt(
        False,
        "resume a run's checkpoint although model, data, batch_size, seed, length_grouping or an optimiser "
        "setting (lr, warmup...) changed (else an error)",
    )
    sample_log: bool = opt(
        False, "append each step's row indices per worker to STORAGE/NAME/samples/rank-N.jsonl (an audit)"
    )
    max_eval_rows: int = opt(
        0, "cap rows of validation/test evaluated, taken evenly over each (0: all)", ge=0
    )
    tracking: str = opt("none", "none | mlflow | tensorboard", choices=("none", "mlflow", "tensorboard"))
    seed: int = seed_opt("seed of initialisation and data order")
    trust_remote_code: bool = opt(False, "let transformers run code shipped with a hub model")

    def problems(self) -> list[str]:
        p = []
        if not self.data:
            p.append("data: required (--data PREPARED_DIR)")
        if not self.output:
            p.append("output: required (--output DIR)")
        return p + run_name_problems(self.name)


PRETRAIN_SPLITS = ("unsup", "train")  # never validation or test: they judge the fine-tuned model


@dataclass
class PretrainConfig(Settings):
    """Masked-LM pre-training on a prepared directory's own reviews (unsup + train) before fine-tuning."""

    data: str = opt("", "prepared directory written by `bertjob prepare` (its unsup and train splits)")
    output: str = opt("", "output directory: model/ (AutoModelForMaskedLM + tokenizer), metrics.json, PNG")
    model: str = opt("minilm", "starting weights: minilm (embedded), a local directory, or a hub id")
    splits: str = opt(
        "unsup,train", "comma-separated splits to learn from: unsup and/or train, never validation/test"
    )
    max_length: int = opt(
        128, "tokens per packed sequence incl. [CLS] (Sun et al. 2019 pre-trained at 128)", ge=8, le=8192
    )
    mlm_probability: float = opt(
        0.15,
        "share of tokens predicted; of those 8 in 10 become [MASK], 1 a random token, 1 stays",
        gt=0,
        lt=1,
    )
    whole_word_masking: bool = opt(False, "mask all WordPiece pieces of a word together")
    num_workers: Workers = workers_opt()
    use_gpu: bool = opt(False, "one GPU per worker")
    cpus_per_worker: float = cpus_per_worker_opt()
    torch_threads: int = opt(0, "intra-op threads per worker (0: its CPUs)", ge=0)
    malloc_tuning: bool = opt(True, "Linux: workers reuse freed memory (as in train); ~1.3x faster CPU steps")
    epochs: int = opt(1, "passes over the packed sequences", ge=1)
    max_steps: int = opt(0, "stop after this many optimizer steps (0: epochs decide)", ge=0)
    batch_size: int = batch_size_opt(32, "packed sequences (Sun et al. 2019: 32)")
    micro_batch_size: int = micro_batch_size_opt()
    lr: float = opt(5e-5, "peak learning rate (Sun et al. 2019 ITPT: 5e-5)", gt=0)
    weight_decay: float = opt(0.01, "AdamW weight decay (never on biases and LayerNorm)", ge=0)
    warmup_ratio: float = opt(0.1, "share of steps with linear warm-up (Sun et al.: 10k of 100k)", ge=0, lt=1)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)", ge=0)
    mixed_precision: str = opt(
        "auto", "auto | bf16 | fp16 | off (auto: bf16 where supported, else fp16 on GPU)", choices=PRECISIONS
    )
    checkpoint_every_steps: int = opt(
        500, "checkpoint every N steps, and at every epoch's end (0: epochs only)", ge=0
    )
    keep_checkpoints: int = opt(2, "latest checkpoints kept", ge=1)
    log_every_steps: int = opt(20, "progress line every N steps (rank 0)", ge=1)
    max_failures: int = opt(2, "worker-group restarts before giving up (-1: no limit)", ge=-1)
    placement_timeout_s: float = placement_timeout_opt()
    resize_check_s: float = resize_check_opt()
    check_resources: bool = opt(
        True, "fail fast when the cluster cannot place the workers (off on autoscaling clusters)"
    )
    storage_path: str = opt("", "checkpoints root (local, NFS, s3://, gs://); empty: OUTPUT/ray_results")
    name: str = opt("bertjob-pretrain", "run name; rerunning with the same name and storage_path resumes")
    resume_changed: bool = opt(
        False,
        "resume a run's checkpoint although its model, data or masking settings changed (else an error)",
    )
    seed: int = seed_opt("seed of the data order and the masks")
    trust_remote_code: bool = opt(False, "let transformers run code shipped with a hub model")

    def problems(self) -> list[str]:
        p = []
        for name in ("data", "output"):
            if not getattr(self, name):
                p.append(f"{name}: required (--{name} ...)")
        bad = [s for s in self.split_names if s not in PRETRAIN_SPLITS]
        if bad or not self.split_names:
            p.append(
                f"splits: {self.splits!r}; pre-training reads only {' and '.join(PRETRAIN_SPLITS)} "
                "(validation and test judge the fine-tuned model and must stay unseen)"
            )
        return p + run_name_problems(self.name)

    @property
    def split_names(self) -> list[str]:
        return [s.strip() for s in self.splits.split(",") if s.strip()]


@dataclass
class InferConfig(Settings):
    """Score a corpus with a fine-tuned model on a Ray Data actor pool (evaluate adds metrics)."""

    input: str = opt("", "corpus: IMDb tar.gz/dir, Parquet/CSV/TSV/JSONL, hf://NAME, or a prepared directory")
    model: str = opt(
        "",
        "model directory from `bertjob train` (DIR/model), any Hugging Face sequence-classification "
        "model directory, or a hub id",
    )
    output: str = opt("", "output directory for the prediction shards and manifest.json")
    split: str = opt("", "with a prepared directory or IMDb input: the split to score (empty: all)")
    batch_size: int = opt(
        0,
        "sequences per forward pass (0: 16 on CPU, where small length-sorted batches are fastest; 256 on GPU)",
        ge=0,
    )
    num_workers: Workers = opt(
        Workers(1, 64),
        "predictor actors: N, or a range MIN-MAX (YAML [MIN, MAX]): the pool grows onto CPUs and GPUs "
        "that join while it runs, up to MAX",
        ge=1,
    )
    use_gpu: bool = opt(False, "one GPU per predictor actor")
    cpus_per_worker: float = opt(
        0,
        "CPUs per predictor actor, each scoring on one (0: on CPU a node's CPUs, at most 8, fewer when "
        "num_workers' minimum needs it; on GPU none: all CPUs tokenize)",
        ge=0,
    )
    check_resources: bool = opt(
        True, "fail fast when the cluster cannot place the predictors (off on autoscaling clusters)"
    )
    mixed_precision: str = opt("auto", "auto | bf16 | fp16 | off", choices=PRECISIONS)
    max_length: int = opt(0, "tokens per sequence (0: what the model was trained with)", ge=0, le=8192)
    truncation: str = opt(
        "", "head | tail | head+tail (empty: what the model was trained with)", choices=("", *TRUNCATIONS)
    )
    head_tokens: int = opt(0, "head tokens for head+tail (0: what the model was trained with)", ge=0)
    strip_html: bool | None = opt(None, "clean HTML as prepare does (empty: what the model was trained with)")
    max_chars_per_end: int = opt(
        0, "characters kept from each end of a huge text (0: what the model was trained with)", ge=0
    )
    text_column: str = opt("text", "text column of a generic corpus")
    id_column: str = opt("", "id column; empty: a stable id from source file and row number")
    label_column: str = opt("label", "label column (evaluate); missing means unlabelled")
    include_text: bool = opt(False, "copy the (cleaned) text into the output")
    rows_per_shard: int = opt(
        0,
        "rows per output Parquet file, each committed whole: what a stopped run keeps (0: 2,000 on CPU, "
        "50,000 with use_gpu)",
        ge=0,
    )
    overwrite: bool = opt(
        False,
        "score from the start, replacing this command's earlier output in OUTPUT (complete, partial, or of "
        "other inputs or settings); never another command's or job's directory",
    )
    trust_remote_code: bool = opt(False, "let transformers run code shipped with a hub model")

    def problems(self) -> list[str]:
        p = []
        for name in ("input", "model", "output"):
            if not getattr(self, name):
                p.append(f"{name}: required (--{name} ...)")
        if 0 < self.max_length < 8:
            p.append(f"max_length: {self.max_length} must be 0 (the model's) or at least 8")
        if not self.text_column:  # no text read: every row quarantined as null_text, and exit 0
            p.append("text_column: must name the column of the review's text (default text)")
        return p


STAGES = ("prepare", "pretrain", "train", "evaluate", "infer")


def stage_flag(stage: str, key: str, in_pipeline: bool) -> str:
    """A stage setting's flag as the command being run takes it: `--epochs` in `bertjob train`,
    `--train.epochs` in `bertjob pipeline`, whose stage settings are --STAGE.KEY VALUE (advice
    that named --epochs there was an unrecognized argument)."""
    flag = key.replace("_", "-")
    return f"--{stage}.{flag}" if in_pipeline else f"--{flag}"


STAGE_CLASSES = {"prepare": PrepareConfig, "pretrain": PretrainConfig, "train": TrainConfig, "infer": InferConfig,
                 "evaluate": InferConfig}  # fmt: skip
# The shared pipeline settings each stage's config is derived from (see PipelineConfig.stage); a
# stage command given a pipeline file accepts these flags, and no other pipeline-only ones.
STAGE_SHARED = {
    "prepare": ("input", "output_dir", "model", "max_length", "truncation"),
    "pretrain": ("output_dir", "model", "num_workers", "use_gpu", "name", "storage_path"),
    "train": ("output_dir", "model", "num_workers", "use_gpu", "name", "storage_path", "pretrain_stage"),
    "evaluate": ("output_dir", "use_gpu"),
    "infer": ("infer_input", "output_dir", "use_gpu"),
}


# The settings by which one stage's output is the next stage's input: derived from output_dir, never
# set in a stage's section (`train: {output: X}` trained into X while evaluate scored
# OUTPUT_DIR/train/model, a stale model from an earlier run where there was one).
STAGE_LINKS = {
    "prepare": ("output",),
    "pretrain": ("data", "output"),
    "train": ("data", "output"),
    "evaluate": ("model",),
    "infer": ("model",),
}


@dataclass
class PipelineConfig(Settings):
    """prepare -> train -> evaluate (test split) -> infer, each stage's output feeding the next."""

    # Its problems() are its stage sections' own, checked with the shared values (defaults in place
    # of bad ones): reported beside a bad shared setting (a typo, 'max_lenght'), not once it is fixed.
    problems_with_bad_values: typing.ClassVar[bool] = True

    input: str = opt(SAMPLE_INPUT, "corpus to prepare (see `bertjob prepare --help`)")
    output_dir: str = opt(
        "bertjob-output", "root of all outputs: prepared/, [pretrain/], train/, evaluate/, infer/"
    )
    model: str = opt("minilm", "starting weights and tokenizer")
    max_length: int = opt(512, "tokens per sequence", ge=8, le=8192)
    truncation: str = opt("head+tail", "head | tail | head+tail", choices=TRUNCATIONS)
    num_workers: Workers = opt(
        Workers(2, 2), "Ray Train workers: N, or a range MIN-MAX (YAML [MIN, MAX]) for elastic training", ge=1
    )
    use_gpu: bool = opt(False, "train and score on GPUs")
    name: str = opt("bertjob", "run name (checkpoints resume under it)")
    storage_path: str = opt("", "checkpoints root (empty: OUTPUT_DIR/checkpoints)")
    infer_input: str = opt("", "corpus to score at the end (empty: the prepared unsup split, else test)")
    pretrain_stage: bool = opt(
        False, "masked-LM pre-training on the prepared unsup+train text first; train starts from its model"
    )
    prepare: dict = opt(None, "settings for the prepare stage (see `bertjob prepare --help`)")
    pretrain: dict = opt(None, "settings for the pretrain stage (with pretrain_stage: true)")
    train: dict = opt(None, "settings for the train stage")
    evaluate: dict = opt(None, "settings for the evaluate stage")
    infer: dict = opt(None, "settings for the infer stage")

    def problems(self) -> list[str]:
        p = []
        for stage in STAGES:
            section = getattr(self, stage)
            if section is not None and not isinstance(section, dict):
                p.append(f"{stage}: must be a mapping of {stage} settings")
                continue
            links = STAGE_LINKS[stage] + (("model",) if stage == "train" and self.pretrain_stage else ())
            p += [
                f"{stage}: {key}: the pipeline derives it from output_dir (it links the stages); set output_dir"
                for key in links
                if key in (section or {})
            ]
            # Every stage's settings now, not when the pipeline reaches the stage: a typo in the
            # train section was reported only after prepare had run, and one at a time.
            try:
                self.stage(stage)
            except ConfigError as err:
                p += err.problems
        return p

    @staticmethod
    def section_hint(key: str) -> str:
        """Where a stage's setting given at the top of a pipeline file (`epochs: 3`) goes."""
        owners = [s for s, cls in STAGE_CLASSES.items()
                  if key in {f.name for f in dataclasses.fields(cls)} and key not in STAGE_LINKS[s]]  # fmt: skip
        if not owners:
            return ""
        example = "train" if "train" in owners else owners[0]
        return (f" at the top level of a pipeline file; it is a setting of the {', '.join(owners)} stage"
                f"{'s' if len(owners) > 1 else ''}: put it in a stage's section ({example}: {{{key}: ...}})")  # fmt: skip

    def path(self, *parts: str) -> str:
        from bertjob.storage import join  # storage imports this module (SetupError)

        return join(self.output_dir, *parts)

    def stage(self, name: str, flags: dict[str, Any] | None = None) -> Any:
        """The stage's config: derived paths and shared settings, then the stage's own section, then
        `flags` (a stage command's own, given beside the pipeline file)."""
        section = {**(getattr(self, name) or {}), **(flags or {})}
        prepared = self.path("prepared")
        model_dir = self.path("train", "model")
        base: dict[str, Any]
        if name == "prepare":
            cls, base = PrepareConfig, dict(
                input=self.input, output=prepared, model=self.model,
                max_length=self.max_length, truncation=self.truncation,
            )  # fmt: skip
        elif name == "pretrain":
            cls, base = PretrainConfig, dict(
                data=prepared, output=self.path("pretrain"), model=self.model, num_workers=self.num_workers,
                use_gpu=self.use_gpu, name=f"{self.name}-pretrain",
                storage_path=self.storage_path or self.path("checkpoints"),
            )  # fmt: skip
        elif name == "train":
            start = self.path("pretrain", "model") if self.pretrain_stage else self.model
            cls, base = TrainConfig, dict(
                data=prepared, output=self.path("train"), model=start, num_workers=self.num_workers,
                use_gpu=self.use_gpu, name=self.name,
                storage_path=self.storage_path or self.path("checkpoints"),
            )  # fmt: skip
        elif name == "evaluate":
            # A corpus of its own is read whole, as by `bertjob evaluate --input X` (an IMDb tree or a
            # split=NAME/ layout is asked for --split): given the prepared data's test split, a CSV was
            # refused as having no split of its own.
            cls, base = InferConfig, dict(
                input=prepared, split="" if section.get("input") else "test", model=model_dir,
                output=self.path("evaluate"), use_gpu=self.use_gpu,
            )  # fmt: skip
        elif name == "infer":
            # A corpus of its own is scored whole, named as infer_input, in the section or by
            # `bertjob infer --config FILE --input X` (these scored only X's unsup split, the
            # prepared data's default).
            own = self.infer_input or section.get("input")
            cls, base = InferConfig, dict(
                input=own or prepared, split="" if own else "unsup",
                model=model_dir, output=self.path("infer"), use_gpu=self.use_gpu,
            )  # fmt: skip
        else:
            raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
        return build(cls, {**base, **section}, where=f"{name}: ")


# ---------------------------------------------------------------------------------------------
# Generic machinery: dict -> dataclass with type checks, YAML, argparse.


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def base_type(typ: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of a field annotated `T` or `T | None`."""
    args = typing.get_args(typ)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return typ, False


def _coerce(value: Any, typ: Any, key: str) -> Any:
    typ, optional = base_type(typ)
    if optional and (value is None or value == ""):
        return None
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # YAML's `use_gpu: 1`, as the CLI's `--use-gpu 1`
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return int(value)
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
        if isinstance(value, _Written):
            return value.text
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}: expected a string, got {value!r}")
    if typ is Workers:
        try:
            return Workers.parse(value)
        except ValueError:
            raise ValueError(
                f"{key}: expected a count N or a range MIN-MAX ([MIN, MAX] in YAML), got {value!r}"
            ) from None
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
        key_norm = key.replace("-", "_") if isinstance(key, str) else key  # YAML's `1:`, `~:`, `on:`
        if key_norm not in types:
            valid = ", ".join(f.name for f in dataclasses.fields(cls))
            hint = cls.section_hint(key_norm) if hasattr(cls, "section_hint") else ""
            problems.append(f"{where}unknown setting {key!r}{hint}; valid settings: {valid}")
            continue
        try:
            kwargs[key_norm] = _coerce(value, types[key_norm], where + key_norm)
        except ValueError as err:
            problems.append(str(err))
    # The values that passed, checked against their ranges too: all problems at once. Defaults are
    # valid, so those in place of bad values add nothing; checks across settings only once none is bad.
    cfg = cls(**kwargs)
    problems += [where + p for p in out_of_range(cfg)]
    if problems and getattr(cls, "problems_with_bad_values", False):
        # Out-of-range values too are replaced by their defaults, so that no section repeats them.
        bad = [f.name for f in dataclasses.fields(cls) if any(p.startswith(f"{f.name}:") for p in problems)]
        defaults = cls()
        cfg = dataclasses.replace(cfg, **{k: getattr(defaults, k) for k in bad})  # type: ignore[type-var]
        problems += [where + p for p in cfg.problems()]  # type: ignore[attr-defined]
    if not problems:
        problems = [where + p for p in cfg.problems()]  # type: ignore[attr-defined]
    if problems:
        raise ConfigError(problems)
    return cfg


def out_of_range(cfg: Any) -> list[str]:
    """Every value outside what its field declares (`opt(..., choices=, ge=, gt=, le=, lt=)`)."""
    problems = []
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None or isinstance(value, (bool, dict)):
            continue
        if isinstance(value, Workers):
            if value.min > value.max:
                problems.append(f"{f.name}: range {value} must go from the smaller to the larger count")
            value = value.min
        if isinstance(value, float) and math.isinf(value):
            # `--placement-timeout-s inf` (for "wait for ever") gave up at once, reporting that the
            # workers could not be placed within 'infs'; an infinite lr or CPU count is no better.
            problems.append(f"{f.name}: {value} must be a finite number")
            continue
        if meta.get("choices") and value not in meta["choices"]:
            shown = ", ".join(c or "'' (auto)" for c in meta["choices"])
            problems.append(f"{f.name}: {value!r} is not one of {shown}")
        # `not (value >= bound)`, so that NaN fails too
        for key, ok, words in (
            ("ge", lambda v, b: v >= b, "at least"),
            ("gt", lambda v, b: v > b, "greater than"),
            ("le", lambda v, b: v <= b, "at most"),
            ("lt", lambda v, b: v < b, "less than"),
        ):
            if key in meta and not ok(value, meta[key]):
                problems.append(f"{f.name}: {value} must be {words} {meta[key]:g}")
                break
    return problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of a key given twice and drops the others without a word; a setting
    given twice (`epochs: 3` ... `epochs: 1`) is an error instead, also when spelled both ways
    (`max-length: 64` ... `max_length: 128`: the last won). Keys come out with underscores, as the
    flags' do, so that `output-dir:` makes a pipeline file and a flag overrides either spelling."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            # A merge key (`<<: *base`) is not a setting: its keys are the anchor's, and this
            # mapping's own override them, as YAML has it (super() merges them).
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            norm = key.replace("-", "_") if isinstance(key, str) else key
            if norm in seen:
                both = "" if seen[norm] == key else f" (as {seen[norm]!r} and {key!r})"
                raise yaml.constructor.ConstructorError(
                    None, None, f"setting {norm!r} given twice{both}", key_node.start_mark
                )
            seen[norm] = key
        mapping = super().construct_mapping(node, deep=deep)
        return {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in mapping.items()}


class _Written:
    """A YAML number that remembers how it was written: a text setting takes it as written, where
    YAML 1.1 read `name: 0612` as octal 394, `12:30` as 750 and `007` as 7."""

    text: str


class _WrittenInt(int, _Written):
    pass


class _WrittenFloat(float, _Written):
    pass


def _keep_text(kind: type, tag: str) -> None:
    read = yaml.SafeLoader.yaml_constructors[tag]

    def construct(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
        value = kind(read(loader, node))
        value.text = node.value
        return value

    _UniqueKeyLoader.add_constructor(tag, construct)


_keep_text(_WrittenInt, "tag:yaml.org,2002:int")
_keep_text(_WrittenFloat, "tag:yaml.org,2002:float")


def read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError([f"config file {path}: {err.strerror}"]) from err
    except UnicodeDecodeError as err:  # a binary file, or a config saved as Latin-1
        raise ConfigError(
            [f"config file {path}: not a YAML text file (not UTF-8 at byte {err.start})"]
        ) from err
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        # PyYAML's text spans five lines (the context, the line quoted, a caret, the problem): say
        # where and what on one, as every other error
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"config file {path}{where}: not valid YAML ({what})"]) from err
    if not isinstance(data, dict):
        raise ConfigError([f"config file {path}: expected a mapping of settings at the top level"])
    return data


def is_pipeline_file(data: dict[str, Any]) -> bool:
    return any(k in data for k in ("output_dir", *STAGES))


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain values, as a YAML file would give them (a worker count: `2` or `[1, 4]`)."""
    return {k: (v.min if v.fixed else list(v)) if isinstance(v, Workers) else v
            for k, v in dataclasses.asdict(cfg).items()}  # fmt: skip
