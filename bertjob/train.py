"""Train: data-parallel fine-tuning with Ray Train's TorchTrainer, from prepared shards to a HF model.

    driver: validate (manifest, tokenizer, splits, run compatibility), plan the workers (CPUs,
            micro-batch for their memory) -> TorchTrainer.fit() -> OUTPUT/model, metrics.json, curves
    worker: Recipe (setup, train: epochs -> steps, evaluate, save/load checkpoint, finish)

One optimizer step: `Recipe.train_step` takes global batch `state.step` of the epoch's order
(`training.epoch_batches`: a function of seed and epoch only), keeps this worker's share of it,
and `training.Stepper.step` runs it in micro-batches, weighting each row 1 / batch size.

Resuming: a restarted worker group, or a rerun with the same `name` and `storage_path`, finds the
latest checkpoint through `ray.train.get_checkpoint()` (Ray Train V2 restores its checkpoint
manager from storage) and continues with the next global batch, with any number of workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch

from bertjob import checkpoint, models, prepare, runlog
from bertjob.checkpoint import TrainState
from bertjob.config import Interrupted, JobError, PretrainConfig, SetupError, TrainConfig, stage_flag, to_dict
from bertjob.identity import digest, model_fingerprint
from bertjob.metrics import classification_metrics
from bertjob.outputs import MANIFEST, check_writable, ensure_output, hold, releasing, stage_of, versions
from bertjob.pretrain import pretrain_record
from bertjob.sources import InputError, prepared_files
from bertjob.storage import (
    check_access,
    copy,
    delete_command,
    exists,
    filesystem,
    for_workers,
    is_remote,
    join,
    read_json,
    remove,
    write_json,
)
from bertjob.text import TextSettings
from bertjob.training import (
    IGNORE,
    NonFiniteLossError,
    SplitRows,
    Stepper,
    all_workers_sum,
    collate,
    epoch_batches,
    lr_factor,
    make_optimizer,
    malloc_env,
    predict_batches,
    resolve_precision,
    set_lr,
    step_seed,
    torch_threads,
    worker_micro_batches,
)

log = logging.getLogger(__name__)

NONFINITE_FILE = "nonfinite.json"  # left by the workers when the loss became NaN/inf
RUN_FILE = (
    "bertjob_run.json"  # beside Ray's checkpoints: what the run trains on, to refuse resuming a changed one
)
MIN_STEPS = 100  # fewer optimizer steps than this rarely fine-tune a BERT (finding: 12 steps learned nothing)
IN_MEMORY_BYTES = 2**30  # a train split whose token ids take up to this is shuffled whole, in memory
WINDOW_ROWS = 250_000  # else: rows per shuffle window


class TrainSetupError(SetupError):
    """The run cannot start; raised on the driver before any worker starts."""


# ---------------------------------------------------------------------------------------------
# Driver side


def read_manifest(data: str) -> dict[str, Any]:
    path = join(data, MANIFEST)
    if exists(path):
        return read_json(path)
    if stage_of(data) == "prepare":
        raise TrainSetupError(
            f"{data} has no {MANIFEST}: its prepare did not finish. Run that `bertjob prepare ... --output "
            f"{data}` again."
        )
    if not (exists(data) or data == "imdb-sample" or data.startswith("hf://")):
        raise TrainSetupError(f"--data {data}: no such directory; it names what `bertjob prepare` wrote")
    raise TrainSetupError(  # a corpus (imdb-sample, aclImdb/, reviews.csv) given where prepared data goes
        f"--data {data} is not prepared data (no {MANIFEST}); --data names what `bertjob prepare` writes: "
        f"`bertjob prepare --input {data} --output PREPARED`, then `--data PREPARED` (or run both with "
        f"`bertjob pipeline --input {data}`)"
    )


def check_setup(cfg: TrainConfig, manifest: dict[str, Any]) -> list[str]:
    """Everything that can be known to be wrong before Ray Train starts, as one list."""
    problems = []
    try:
        fp = models.tokenizer_info(cfg.model, cfg.trust_remote_code)["fingerprint"]
        want = manifest["tokenizer"]["fingerprint"]
        if fp != want:
            problems.append(
                f"the tokenizer of model {cfg.model!r} (fingerprint {fp}) does not match the one the data was "
                f"prepared with ({manifest['tokenizer']['name']!r}, {want}); prepare again with --model {cfg.model}"
            )
    except models.ModelError as err:
        problems.append(str(err))
    if problem := models.weights_problem(cfg.model):
        problems.append(problem)
    problems += prepare.trainable_problems(cfg.data, manifest)
    if prepare.unlabelled_train(manifest):
        return problems  # nothing else about the data matters then
    try:
        split_shards(cfg.data, manifest)
    except InputError as err:
        problems.append(str(err))
    return problems + tracking_problems(cfg)


def split_shards(data: str, manifest: dict[str, Any]) -> dict[str, list[str]]:
    """The shards of the splits train reads, by name, as the manifest lists them (checked against it)."""
    fs, where = filesystem(data)
    return {
        s: [os.path.basename(p) for p in prepared_files(fs, where, s, manifest)]
        for s in ("train", "validation", "test")
        if s in manifest.get("splits", {})
    }


# What each --tracking imports on rank 0 (`_Tracker`): TensorBoard's writer is torch's, which needs the
# tensorboard package, or tensorboardX's.
TRACKING_PACKAGES = {"mlflow": ("mlflow",), "tensorboard": ("tensorboard", "tensorboardX")}


def tracking_problems(cfg: TrainConfig) -> list[str]:
    """A --tracking that cannot log: its package missing failed every worker with an ImportError
    after the model had loaded; TensorBoard with an output in object storage logged nothing."""
    import importlib.util

    if cfg.tracking == "none":
        return []
    if cfg.tracking == "tensorboard" and is_remote(cfg.output):
        return [f"tracking tensorboard writes its event files to OUTPUT/tensorboard, a local or mounted directory; "
                f"output {cfg.output} is in object storage (use --tracking mlflow, or a mounted --output)"]  # fmt: skip
    packages = TRACKING_PACKAGES[cfg.tracking]
    if not any(importlib.util.find_spec(p) for p in packages):
        return [f"tracking {cfg.tracking}: {' or '.join(packages)} is not installed "
                f"(pip install {packages[0]}), or use --tracking none"]  # fmt: skip
    return []


@dataclasses.dataclass
class WorkerPlan:
    """What each worker gets, decided on the driver from the cluster and the data."""

    cpus: float
    micro_batch_size: int
    memory_budget: int | None  # bytes a worker may use (CPU workers), None where unknown
    memory_estimate: int | None  # bytes a worker needs at that micro-batch


def memory_estimate(model_config: dict[str, Any], max_length: int, micro_batch_size: int) -> int:
    """Resident bytes of a CPU training worker for a BERT-like model: the Ray Train worker process
    with its libraries, data, evaluation and checkpoint copies (PROCESS_BYTES), 18
    bytes per parameter (fp32 weights, gradients, AdamW's two moments, bf16 copies) and what
    autograd keeps for backward per sequence and layer, linear and quadratic in max_length.

    Measured on MiniLM-L6 (bench/train_memory_bench.py), MiB per sequence at 128 / 256 / 512 that
    autograd keeps: sdpa+bf16 38 / 93 / 284, eager+bf16 30 / 63 / 169, fp32 55 / 116 / 320; peak RSS
    per sequence at 512 with sdpa+bf16: 304 with the system's malloc, 378 with malloc_tuning (freed
    blocks are kept). The constants below bound all of these (at 512: 405). At 512 the old default,
    32 sequences per worker, needed ~10 GB per worker: what Ray's memory monitor killed on 24 GiB."""
    h = model_config.get("hidden_size", 768)
    layers = model_config.get("num_hidden_layers", 12)
    heads = model_config.get("num_attention_heads", 12)
    inter = model_config.get("intermediate_size", 4 * h)
    params = model_config.get("vocab_size", 30522) * h + layers * (4 * h * h + 2 * h * inter)
    per_seq = layers * (ACT_PER_TOKEN * h * max_length + ACT_PER_SCORE * heads * max_length**2)
    return int(PROCESS_BYTES + 18 * params + micro_batch_size * per_seq)


# Bytes kept for backward per layer: per token and unit of hidden width, per attention score.
ACT_PER_TOKEN, ACT_PER_SCORE = 200, 10
# A plain training process holds ~600 MiB besides weights and activations; a Ray Train worker more:
# the default pipeline at 512 (MiniLM, micro-batches of 13) peaked at 6.86 GiB in rank 0 (it also
# checkpoints and evaluates) against 6.1 estimated with 600 MiB. 1.4 GiB bounds that run.
PROCESS_BYTES = 1400 * 2**20


def plan_workers(
    cfg: TrainConfig, nodes: list[dict[str, float]], model_config: dict[str, Any], max_length: int
) -> tuple[WorkerPlan, list[str]]:
    """CPUs and micro-batch per worker from the nodes' resources (Ray's `ray.nodes()` Resources).

    CPUs: the nodes that can host a worker, split between the workers each would host (a local
    Ray: the machine's CPUs split across the workers; GPU nodes: their CPUs per GPU). Micro-batch:
    the largest that fits the memory Ray gives each worker, up to its share of `batch_size`."""
    problems: list[str] = []
    kind = "GPU" if cfg.use_gpu else "CPU"
    hosts = [n for n in nodes if n.get(kind, 0) >= 1]
    # An elastic run plans for its largest group (CPUs shared by the most workers per node) and
    # its smallest (the largest share of each global batch per worker).
    per_node = math.ceil(cfg.num_workers.max / max(1, len(hosts)))

    def workers_on(n: dict[str, float]) -> float:  # one worker per GPU on GPU nodes
        return n["GPU"] if cfg.use_gpu else per_node

    cpus = cfg.cpus_per_worker or max(
        1, min((int(n.get("CPU", 0) // workers_on(n)) for n in hosts), default=1)
    )
    share = math.ceil(cfg.batch_size / cfg.num_workers.min)
    micro = min(cfg.micro_batch_size or share, share)
    budget = estimate = None
    if not cfg.use_gpu and hosts:
        # Ray's memory resource is what its tasks may use; its memory monitor kills workers when the
        # node as a whole passes 95%. Keep a fifth of a worker's share for everything else.
        budget = int(0.8 * min(n.get("memory", 0) / workers_on(n) for n in hosts)) or None
        while (
            budget
            and not cfg.micro_batch_size
            and micro > 1
            and memory_estimate(model_config, max_length, micro) > budget
        ):
            micro -= 1
        estimate = memory_estimate(model_config, max_length, micro)
        if budget and estimate > budget:
            gib = 2**30
            message = (
                f"a worker training micro-batches of {micro} at max_length {max_length} needs ~{estimate / gib:.1f} GiB; "
                f"each of {per_node} worker(s) per node gets {budget / gib:.1f} GiB"
            )
            if cfg.micro_batch_size:  # the user's choice; the estimate may be cautious
                log.warning("train: %s; a smaller micro_batch_size would fit", message)
            else:
                problems.append(f"{message}. Use fewer workers per node or a smaller max_length (prepare)")
    return WorkerPlan(cpus, micro, budget, estimate), problems


def default_lr(model_config: dict[str, Any]) -> float:
    """Peak lr by model width. Small models want more: MiniLM-L6 at 5e-5 or 1e-4 learned nothing
    in the ~20 steps of a few hundred reviews (chance accuracy), 2e-4 reached 74%; BERT-base's
    recipes use 2e-5 to 5e-5 (Sun et al. 2019; Devlin et al. 2019)."""
    width = model_config.get("hidden_size", 768)
    return 2e-4 if width <= 384 else 5e-5 if width <= 768 else 2e-5


def check_resources(cfg: TrainConfig, plan: WorkerPlan) -> list[str]:
    """The minimum worker group must fit the nodes alive now (an elastic run starts with it)."""
    from bertjob.cluster import resource_problem

    problem = resource_problem(cfg.num_workers.min, plan.cpus, 1 if cfg.use_gpu else 0)
    return [problem] if problem else []


def run_identity(cfg: Any, manifest: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """What a checkpoint of this run (train, or pretrain with its `settings`) depends on: resuming
    it with any of these changed would continue another run's weights or data order. The data is
    the prepared output's own identity (its corpus' content, every prepare setting): data prepared
    again otherwise (another truncation, another corpus) with the same row counts is another run.
    The model is its files' content too: another model at the same path (pretrained again) is
    another run; the same model exported again (a finished pretrain run rerun) is the same."""
    return {
        "model": cfg.model,
        "model_files": digest(model_fingerprint(cfg.model, content=True)),
        "data": {
            "tokenizer": manifest["tokenizer"]["fingerprint"],
            "max_length": manifest["max_length"],
            "prepared": manifest["identity"],
        },
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        **settings,
    }


def shuffle_window(token_bytes: float, setting: int = 0) -> int:
    """Rows shuffled together: 0 (the whole split, in memory) when its token ids take up to
    IN_MEMORY_BYTES, else WINDOW_ROWS read a window at a time; `setting` when given."""
    return setting or (0 if token_bytes <= IN_MEMORY_BYTES else WINDOW_ROWS)


# Settings that shape the weights besides the data order: resuming with another value would mix two
# runs' training under the new one's name, or export a finished run's model as trained with it.
# Only the steps a rerun adds to a finished run may take new values (README: Extending).
OPTIMISATION = ("lr", "layer_lr_decay", "weight_decay", "warmup_ratio", "max_grad_norm", "mixed_precision")
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's registered checkpoints


def latest_checkpoint(run_dir: str) -> dict[str, Any]:
    """The metrics reported with a run's latest registered checkpoint (step, final), {} if none."""
    return (read_snapshot(run_dir).get("latest_checkpoint_result") or {}).get("metrics") or {}


def saved_checkpoint(run_dir: str) -> Any:
    """The run's latest registered checkpoint, as Ray Train's Result of a fit gives it (local or in
    object storage); no Ray needs to run."""
    from ray.train import Checkpoint

    name = read_snapshot(run_dir)["latest_checkpoint_result"]["checkpoint_dir_name"]
    fs, where = filesystem(join(run_dir, name))
    return Checkpoint(where, filesystem=fs)


def read_snapshot(run_dir: str) -> dict[str, Any]:
    """Ray Train's record of a run's registered checkpoints, {} if none. Ray rewrites it in place:
    one cut short (a crash as it wrote) ended the job in a JSONDecodeError traceback."""
    path = join(run_dir, SNAPSHOT)
    try:
        return read_json(path) if exists(path) else {}
    except ValueError as err:
        raise TrainSetupError(
            f"{path}, Ray Train's list of the checkpoints of run {os.path.basename(run_dir)!r}, cannot be read "
            f"({err}: cut short by a crash as it was written?). Delete it to train that run again from step 0 "
            f"(its checkpoints are then left unused), or start a new run with another --name"
        ) from err


def settle_checkpoints(run_dir: str, what: str, state_file: str = checkpoint.STATE_FILE) -> None:
    """Resume from the newest whole checkpoint: drop from Ray Train's snapshot the registered ones
    that are missing or damaged (`checkpoint.problem`), saying so. Ray refused a snapshot that named
    a deleted checkpoint with its traceback ("corrupted run directory"), and resumed from a damaged
    one, failing each worker group in turn, after which the job said that a rerun resumes."""
    snapshot = read_snapshot(run_dir)
    results = snapshot.get("checkpoint_results") or []
    damaged = {}
    for r in results:
        name = r["checkpoint_dir_name"]
        if why := checkpoint.problem(join(run_dir, name), bool(r["metrics"].get("final")), state_file):
            damaged[name] = f"{name} (step {r['metrics'].get('step')}): {why}"
    if damaged:
        _pass_over(run_dir, what, snapshot, damaged)
    note_unused(run_dir, what, snapshot)


def _pass_over(run_dir: str, what: str, snapshot: dict[str, Any], damaged: dict[str, str]) -> None:
    """Drop the `damaged` checkpoints (name: why) from Ray Train's `snapshot`, saying so."""
    results = snapshot["checkpoint_results"]
    run, said = os.path.basename(run_dir), "; ".join(damaged.values())
    kept = [(r, i) for r, i in zip(results, snapshot["checkpoint_report_indices"])
            if r["checkpoint_dir_name"] not in damaged]  # fmt: skip
    if not kept:
        raise TrainSetupError(
            f"run {run!r} in {os.path.dirname(run_dir)} has no whole checkpoint to resume from: {said}. "
            f"Delete {run_dir} to train that run again from step 0, or start a new run with another --name"
        )
    snapshot["checkpoint_results"] = [r for r, _ in kept]
    snapshot["checkpoint_report_indices"] = [i for _, i in kept]
    if (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") in damaged:
        snapshot["latest_checkpoint_result"] = max(kept, key=lambda pair: pair[1])[0]
    write_json(join(run_dir, SNAPSHOT), snapshot)
    latest = snapshot["latest_checkpoint_result"]
    log.warning("%s: run %s has damaged checkpoints, not resumed from: %s; resuming from %s (step %s)",
                what, run, said, latest["checkpoint_dir_name"], latest["metrics"].get("step"))  # fmt: skip


UNUSED_FILE = "bertjob_unused.json"  # the checkpoint directories a warning has named: each is named once


def note_unused(run_dir: str, what: str, snapshot: dict[str, Any]) -> None:
    """Name once, with the command that deletes them, a run's checkpoint directories that Ray Train's
    snapshot does not list: passed over as damaged, or written by a process that stopped before Ray
    registered them. No run resumes from them and nothing deleted them: they took their space for
    ever, unsaid. Never deleted here: they may be what is left to find out what went wrong."""
    import pyarrow.fs as pafs

    listed = {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results") or []}
    listed.add((snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name"))
    fs, where = filesystem(run_dir)
    names = [os.path.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(where, allow_not_found=True))
             if i.type == pafs.FileType.Directory]  # fmt: skip
    unused = sorted(n for n in names if n.startswith("checkpoint_") and n not in listed)
    said = join(run_dir, UNUSED_FILE)
    if set(unused) <= set(read_json(said) if exists(said) else []):
        return
    log.warning("%s: run %s has checkpoint directories that no run resumes from (passed over as damaged, or "
                "written by a process that stopped before Ray Train registered them): %s. They are kept; to free "
                "their space: %s", what, os.path.basename(run_dir), ", ".join(unused),
                delete_command([join(run_dir, n) for n in unused]))  # fmt: skip
    write_json(said, unused)


def check_run_compatible(
    cfg: Any, identity: dict[str, Any], run_dir: str, may_change: tuple[str, ...] = (), finished: bool = False
) -> None:
    """A rerun with the same name resumes; one whose model, data or order changed is an error
    (`may_change`: identity keys a rerun may change, those that only shape the steps it adds).
    `finished`: the run has no steps left to train, so --resume-changed has nothing to continue
    (it exported the model as trained with the changed settings, and recorded them as the run's)."""
    path = join(run_dir, RUN_FILE)
    if exists(join(run_dir, SNAPSHOT)) and exists(path):
        try:
            if not isinstance(before := read_json(path), dict):
                raise ValueError(f"it holds {json.dumps(before)[:40]}, not a JSON object")
        except ValueError as err:  # cut short or edited by hand: a JSONDecodeError traceback
            raise TrainSetupError(
                f"{path}, the record of what run {cfg.name!r} trains on, cannot be read ({err}). Delete it to "
                f"resume that run unchecked (it is written again), or start a new run with another --name"
            ) from err
        # a key an older bertjob did not record is not compared: its runs resume as before
        changed = [k for k in identity if k in before and before[k] != identity[k] and k not in may_change]
        details = "; ".join(f"{k}: {before.get(k)} -> {identity[k]}" for k in changed)
        if changed and finished:
            extend = ", or more --epochs to train added steps with them" if set(changed) <= set(OPTIMISATION) else ""
            raise TrainSetupError(
                f"run {cfg.name!r} in {os.path.dirname(run_dir)} has finished, trained with other settings "
                f"({details}): it has no steps left to train with these. Start a new run with another --name{extend}"
            )
        if changed and not cfg.resume_changed:
            raise TrainSetupError(
                f"run {cfg.name!r} in {os.path.dirname(run_dir)} has checkpoints of a different run ({details}). "
                f"Start a new run with another --name, or pass --resume-changed true to continue those weights anyway"
            )
    write_json(path, identity)


def refuse_shorter(cfg: Any, storage: str, trained: int, planned: int, total_steps: int) -> None:
    """A rerun of a train or pretrain run that has `trained` steps of `planned` (more than `trained`
    for an early-stopped one) asking for fewer, `total_steps`: it would export the longer run's
    model as this one's."""
    if max(trained, planned) > total_steps:
        what = (
            f"has trained {trained} steps"
            if planned <= trained
            else f"stopped early at step {trained} of {planned}"
        )
        raise TrainSetupError(
            f"run {cfg.name!r} in {storage} {what}, a longer run than the {total_steps} steps this one asks for "
            f"(--epochs {cfg.epochs}, --max-steps {cfg.max_steps}); start a new run with another --name"
        )


def plan_run(cfg: TrainConfig, model_config: dict[str, Any], max_length: int) -> WorkerPlan:
    """The workers' plan on the Ray this process is connected to, or a TrainSetupError naming all
    that cannot work: too long sequences for the model, workers that do not fit the cluster. The
    pipeline asks before prepare (with the max_length it will prepare at), train again before training."""
    from bertjob.cluster import alive_nodes

    plan, problems = plan_workers(cfg, alive_nodes(), model_config, max_length)
    positions = models.max_positions(model_config)
    if positions and max_length > positions:
        problems.append(f"data {cfg.data} is prepared with max_length {max_length}, more than model "
                        f"{cfg.model} has positions for ({positions}): prepare it with --max-length {positions} or less")  # fmt: skip
    # Rounded up past the model's positions, the longest batches failed every worker with a tensor
    # size RuntimeError (`--pad-to-multiple-of 3` at max_length 512: 513 positions).
    m = cfg.pad_to_multiple_of
    if positions and m and max_length <= positions < -(-max_length // m) * m:
        problems.append(f"pad_to_multiple_of {m} pads sequences of max_length {max_length} to {-(-max_length // m) * m} "
                        f"tokens, more than model {cfg.model} has positions for ({positions}): give one that "
                        f"{max_length} rounds up to at most {positions} (such as 8), or 0")  # fmt: skip
    if cfg.check_resources:
        problems += check_resources(cfg, plan)
    if problems:
        raise TrainSetupError("cannot train:\n  - " + "\n  - ".join(problems))
    return plan


@releasing
def run(cfg: TrainConfig, in_pipeline: bool = False) -> dict[str, Any]:
    """Run the train job; returns its metrics. `in_pipeline`: as `bertjob pipeline`'s train stage,
    whose advice names its flags as --train.KEY."""
    from ray.train import CheckpointConfig

    from bertjob.cluster import init_ray

    started = time.time()
    check_access({"data": cfg.data, "output": cfg.output, "storage_path": cfg.storage_path})
    # Every path as the workers open it: an output of `~/run` (a config file's, or quoted) put the
    # checkpoints in ./~/run/ray_results, the model in ~/run.
    cfg = dataclasses.replace(cfg, data=for_workers(cfg.data), model=for_workers(cfg.model),
                              output=for_workers(cfg.output, output=True),
                              storage_path=for_workers(cfg.storage_path, output=True))  # fmt: skip
    manifest = read_manifest(cfg.data)
    problems = check_setup(cfg, manifest)
    if problems:
        raise TrainSetupError("cannot train:\n  - " + "\n  - ".join(problems))
    storage = run_storage(cfg)
    if is_remote(storage) and cfg.sample_log:
        raise TrainSetupError("sample_log needs a local or mounted storage_path")
    ensure_output(cfg.output, "train")  # never wiped: it may hold the checkpoints a rerun resumes from
    model_config = models.model_config(cfg.model, cfg.trust_remote_code)
    if labels := models.other_head(model_config):
        log.warning("train: model %s has a classification head of %d labels (%s); training replaces it with a "
                    "fresh one of two (NEGATIVE, POSITIVE) and keeps the encoder", cfg.model, len(labels),
                    ", ".join(labels))  # fmt: skip
    if not cfg.lr:
        cfg = dataclasses.replace(
            cfg, lr=default_lr(model_config)
        )  # the resolved value is what metrics.json records
    n_train = manifest["splits"]["train"]["rows_written"]
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or math.inf)
    run_dir = join(storage, cfg.name)
    hold(run_dir)  # another output may name the same checkpoints (--storage-path, --name)
    settle_checkpoints(run_dir, "train")
    done = latest_checkpoint(run_dir)
    trained = done.get("step", 0)
    planned = done.get("planned_steps", trained)  # a finished run's plan: an early-stopped one trained fewer
    refuse_shorter(cfg, storage, trained, planned, total_steps)
    extends = bool(done.get("final")) and total_steps > planned
    identity = run_identity(
        cfg, manifest, length_grouping=cfg.length_grouping, **{k: getattr(cfg, k) for k in OPTIMISATION}
    )
    finished = bool(done.get("final")) and not extends
    check_run_compatible(cfg, identity, run_dir, may_change=OPTIMISATION if extends else (), finished=finished)
    if finished:
        # Its last checkpoint holds the model and its results: exported here, with no Ray. A worker
        # group started only to hand the checkpoint back, ~30 s (and a local Ray's start, ~15 s).
        log.info("train: run %r has finished its %d steps; exporting its model again, nothing to train",
                 cfg.name, trained)  # fmt: skip
        return export(cfg, manifest, saved_checkpoint(run_dir), wall_s=time.time() - started, storage=storage,
                      events=runlog.timeline(run_dir))  # fmt: skip
    # Only now: a rerun the checks above refuse (a shorter or changed run under its name) was
    # refused after a local Ray had started, ~15 s.
    init_ray()
    plan = plan_run(cfg, model_config, manifest["max_length"])

    share = math.ceil(cfg.batch_size / cfg.num_workers.min)
    log.info(
        "train: %d rows, global batch %d = %s workers x up to %d rows (micro-batches of %d, up to %d accumulated); "
        "%d steps/epoch, %d steps; %g CPUs and %d threads per worker%s",
        n_train, cfg.batch_size, cfg.num_workers, share, plan.micro_batch_size,
        math.ceil(share / plan.micro_batch_size), steps_per_epoch, total_steps, plan.cpus,
        cfg.torch_threads or max(1, int(plan.cpus)),
        f", ~{plan.memory_estimate / 2**30:.1f} of {plan.memory_budget / 2**30:.1f} GiB memory each" if plan.memory_budget else "",
    )  # fmt: skip
    if few := few_steps(cfg, f"{n_train} rows", total_steps, in_pipeline):
        log.warning("train: %s", few)
    mean_tokens = min(manifest["max_length"], manifest["splits"]["train"].get("tokens", {}).get("mean", 1e9))
    token_bytes = mean_tokens * n_train * 4  # int32 token ids
    window = shuffle_window(token_bytes, cfg.shuffle_window_rows)
    meta = {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "micro_batch_size": plan.micro_batch_size,
        "cpus": plan.cpus,
        "threads": cfg.torch_threads or max(1, int(plan.cpus)),
        "window_rows": window,
        "pad_token_id": manifest["tokenizer"]["pad_token_id"] or 0,
        "splits": [s for s in ("validation", "test") if manifest["splits"].get(s, {}).get("label_counts")],
        "shards": split_shards(cfg.data, manifest),
        "run_dir": join(storage, cfg.name),
        "tracking_dir": "" if is_remote(cfg.output) else os.path.abspath(join(cfg.output, "tensorboard")),
    }
    checkpoints = CheckpointConfig(
        num_to_keep=cfg.keep_checkpoints,
        checkpoint_score_attribute="val_accuracy",
        checkpoint_score_order="max",
    )
    result = fit(cfg, train_loop, {"cfg": to_dict(cfg), "meta": meta}, plan, storage, checkpoints, "training",
                 in_pipeline)  # fmt: skip
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return export(cfg, manifest, result.checkpoint, wall_s=time.time() - started, storage=storage,
                  events=runlog.timeline(meta["run_dir"]))  # fmt: skip


def few_steps(
    cfg: TrainConfig | PretrainConfig, examples: str, total_steps: int, in_pipeline: bool
) -> str | None:
    """A warning when the epochs of a train or pretrain run (`examples`: "648 rows") schedule too
    few optimizer steps to learn much. None where --max-steps cut the run to its length: the user
    asked for it. Any --max-steps silenced it, also one the epochs never reach (--max-steps 30 trained
    21 steps without a word). Its flags as the command takes them (`stage_flag`)."""
    if total_steps >= MIN_STEPS or total_steps == cfg.max_steps:
        return None
    stage, what = (
        ("pretrain", "masked-LM pre-training")
        if isinstance(cfg, PretrainConfig)
        else ("train", "fine-tuning")
    )

    def flag(key: str) -> str:
        return stage_flag(stage, key, in_pipeline)

    unreached = f"; {flag('max_steps')} {cfg.max_steps} is never reached" if cfg.max_steps else ""
    return (
        f"only {total_steps} optimizer steps ({examples} / batch_size {cfg.batch_size} x {cfg.epochs} "
        f"epochs{unreached}): {what} a BERT usually needs at least ~{MIN_STEPS}; the model may learn "
        f"little. Use more data, more {flag('epochs')} or a smaller {flag('batch_size')}"
    )


def run_storage(cfg: Any) -> str:
    """Where a run's checkpoints go: storage_path or OUTPUT/ray_results, absolute when local; one
    that cannot be written is an error before any work."""
    storage = cfg.storage_path or join(cfg.output, "ray_results")
    check_writable(storage, "storage_path" if cfg.storage_path else "output")
    return storage if is_remote(storage) else os.path.abspath(storage)


# The last line of a fit that failed: its checkpoints are kept (a worker's error, a process killed, a
# storage endpoint gone).
RESUMES = "\nbertjob: the same command again resumes from its last checkpoint"


def fit(cfg: Any, loop: Any, loop_config: dict[str, Any], plan: WorkerPlan, storage: str, checkpoints: Any,
        what: str, in_pipeline: bool) -> Any:  # fmt: skip
    """Ray Train's TorchTrainer for a train or pretrain run (`cfg`: their shared worker settings):
    a fixed or elastic worker group, a bounded wait for placement, restarts recorded under
    STORAGE/NAME/events and logged. Returns Ray's Result. `in_pipeline`: its advice in the
    pipeline's flags (`stage_flag`)."""
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Malloc tuning is measured on CPU workers only; a GPU worker's host memory does not pace its step.
    env = malloc_env() if cfg.malloc_tuning and not cfg.use_gpu else {}
    # How long Ray Train waits for a worker group's placement before the attempt fails (its
    # controller reads this variable). A fixed-size run then stops (controller failures are not
    # retried: without that, Ray Train waits for capacity forever). An elastic one tries again with
    # what the cluster holds then: right after a node dies Ray still counts it for a few seconds,
    # and a group sized with it waits for it, so it waits a minute at most.
    attempt_s = cfg.placement_timeout_s if cfg.num_workers.fixed else min(cfg.placement_timeout_s, 60)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(attempt_s)
    storage_fs, storage_where = filesystem(storage) if is_remote(storage) else (None, storage)
    run_dir = join(storage, cfg.name)
    stage = "pretrain" if isinstance(cfg, PretrainConfig) else "train"
    nonfinite = join(run_dir, NONFINITE_FILE)
    remove(nonfinite)  # from an earlier attempt of this run
    trainer = _Interruptible(TorchTrainer)(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers.scaling(),
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": plan.cpus},
            elastic_resize_monitor_interval_s=cfg.resize_check_s,
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_where,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(
                max_failures=cfg.max_failures, controller_failure_limit=0 if cfg.num_workers.fixed else -1
            ),
            callbacks=[runlog.RunEvents(run_dir)],
            worker_runtime_env={"env_vars": env} if env else None,
            checkpoint_config=checkpoints,
        ),
    )
    try:
        result = trainer.fit()
    except KeyboardInterrupt as stop:
        raise Interrupted(kept_at_stop(cfg, run_dir, stage, in_pipeline)) from stop
    except (ray.train.TrainingFailedError, ray.exceptions.OutOfMemoryError) as err:
        if runlog.is_placement_timeout(err):
            raise PlacementTimeoutError(
                cfg, {"CPU": plan.cpus, **({"GPU": 1} if cfg.use_gpu else {})}
            ) from err
        if why := _killed(err):
            raise WorkerKilledError(
                what, plan, why, stage_flag(stage, "micro_batch_size", in_pipeline)
            ) from err
        # Its checkpoints are kept (a worker's error, a storage endpoint gone, ...): no traceback of
        # the driver's, Ray printed the failed process' own above.
        raise JobError(f"{what} failed: {_root_message(err)}{RESUMES}") from err
    for e in runlog.timeline(run_dir)["restarts"]:
        log.info("%s: %s at %s (%s): %s -> %s workers, resumed from step %s", what, e["event"],
                 time.strftime("%H:%M:%S", time.localtime(e["at"])), e["why"], e["workers_before"],
                 e["workers_after"], e["from_step"])  # fmt: skip
    if exists(nonfinite):
        raise NonFiniteLossError(read_json(nonfinite)["step"], stage, in_pipeline)
    return result


def kept_at_stop(cfg: Any, run_dir: str, stage: str, in_pipeline: bool) -> str:
    """What a stopped train or pretrain run keeps: its last registered checkpoint. It said that the
    same command resumes where it stopped, and before the first checkpoint (an epoch's end, by
    default) that was from step 0."""
    try:
        step = latest_checkpoint(run_dir).get("step", 0)
    except (OSError, ValueError):  # its store is away, its snapshot cut short: the rerun says which
        return ""
    if step:
        return f"its last checkpoint is at step {step}: the same command again resumes from it"
    every = f" and every {cfg.checkpoint_every_steps} steps" if cfg.checkpoint_every_steps else ""
    return (f"no checkpoint was written yet (one is at each epoch's end{every}; more often: "
            f"{stage_flag(stage, 'checkpoint_every_steps', in_pipeline)} N): the same command again starts from "
            f"step 0")  # fmt: skip


def leave_nonfinite(run_dir: str, rank: int, step: int) -> None:
    """On each worker, after a NonFiniteLossError at `step`: not a fault to retry from a checkpoint,
    so the workers end cleanly (no FailureConfig restart) and rank 0 leaves the step for `fit` to
    raise, beside the checkpoints (Ray's Result only carries the metrics of the latest checkpoint)."""
    if rank == 0:
        write_json(join(run_dir, NONFINITE_FILE), {"step": step})


def _Interruptible(trainer_cls: Any) -> Any:
    """The trainer class without Ray Train's SIGINT handler, so that Ctrl-C raises KeyboardInterrupt
    as SIGTERM raises cli.Terminated: the job ends with status 130 and says that a rerun resumes.
    Ray's handler instead let the workers train on past the last registered checkpoint, exited with
    status 1 without a word, and stayed installed after fit(), where it swallowed the Ctrl-C of a
    later stage (a pipeline's evaluate)."""

    class Trainer(trainer_cls):  # type: ignore[misc, valid-type]
        def _register_sigint_handler(self, controller: Any) -> None:
            pass

    return Trainer


class PlacementTimeoutError(JobError):
    """A fixed-size run whose workers the cluster could not place within placement_timeout_s."""

    def __init__(self, cfg: Any, per_worker: dict[str, float]):
        import ray

        from bertjob.cluster import alive_nodes

        alive = alive_nodes()
        free = ray.available_resources()
        have = {k: f"{free.get(k, 0):g} free of {ray.cluster_resources().get(k, 0):g}" for k in per_worker}
        super().__init__(
            f"training stopped: Ray could not place {cfg.num_workers} workers x {per_worker} within "
            f"placement_timeout_s={cfg.placement_timeout_s:g}s; the cluster has {len(alive)} alive nodes, "
            + ", ".join(f"{k} {v}" for k, v in have.items())
            + ". Add nodes, lower --num-workers, or give a range (--num-workers 1-N) to train on what is there; "
            "a rerun with the same --name resumes from the latest checkpoint"
        )


def _killed(err: BaseException) -> str | None:
    """What killed a process of a failed fit, where it was killed: Ray's memory monitor (its
    OutOfMemoryError: a worker's failure, or fit's own when the controller was the one), or a
    signal from outside Ray (a worker's ActorDiedError: the kernel's OOM killer, most often)."""
    import ray

    from bertjob.cluster import KILLED_FROM_OUTSIDE, memory_note

    # A worker's failure is Ray Train's WorkerHealthCheckFailedError, what Ray raised inside it.
    failures = {
        r: getattr(c, "health_check_failure", c) for r, c in getattr(err, "worker_failures", {}).items()
    }
    causes = [err, *failures.values(), getattr(err, "controller_failure", None)]
    if oom := next((c for c in causes if isinstance(c, ray.exceptions.OutOfMemoryError)), None):
        note = memory_note(str(oom))
        return f"Ray's memory monitor killed a process of the run: its node ran low on memory{note}"
    died = sorted(r for r, c in failures.items() if isinstance(c, ray.exceptions.ActorDiedError))
    if died:
        return f"the process of worker rank {died[0]} {KILLED_FROM_OUTSIDE}"
    return None


class WorkerKilledError(JobError):
    """A process of the run was killed, most likely for memory. Ray printed its report above; the
    job's last word ended "training failed: [Rank 0 Error Snippet]:", or was a driver traceback of
    Ray's OutOfMemoryError when its memory monitor killed the controller."""

    def __init__(self, what: str, plan: WorkerPlan, why: str, micro_batch_flag: str):
        planned = f"~{plan.memory_estimate / 2**30:.1f} GiB each, " if plan.memory_estimate else ""
        super().__init__(
            f"{what} failed: {why}. Workers were planned at {planned}micro-batches of {plan.micro_batch_size}: "
            f"where memory ran out, give a smaller {micro_batch_flag} (the same global batch, in more accumulated "
            "micro-batches), fewer workers per node (--num-workers), or data prepared with a smaller --max-length, "
            f"or free the node's memory{RESUMES}"
        )


def _root_message(err: BaseException) -> str:
    text = str(err)
    for line in reversed(text.splitlines()):
        if "Error" in line and ":" in line:
            return line.strip()
    return text.strip().splitlines()[-1] if text.strip() else repr(err)


def export(
    cfg: TrainConfig,
    manifest: dict[str, Any],
    result_checkpoint: Any,
    wall_s: float,
    storage: str,
    events: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """OUTPUT/model (the best model, HF format, loadable by transformers.pipeline), metrics.json, curves."""
    if not is_remote(cfg.output):
        return _export_to(cfg.output, cfg, manifest, result_checkpoint, wall_s, storage, events)
    # Object stores take whole objects: build the outputs locally, then upload them, metrics.json
    # last (the pipeline takes a train output with metrics.json and a model as complete).
    with tempfile.TemporaryDirectory(prefix="bertjob-export-") as local:
        metrics = _export_to(local, cfg, manifest, result_checkpoint, wall_s, storage, events)
        remove(join(cfg.output, "model"))
        for name in ("model", "training_curves.png", "metrics.json"):
            copy(os.path.join(local, name), join(cfg.output, name))
    return metrics


def _export_to(
    out: str,
    cfg: TrainConfig,
    manifest: dict[str, Any],
    result_checkpoint: Any,
    wall_s: float,
    storage: str,
    events: dict[str, Any] | None = None,
) -> dict[str, Any]:
    model_dir = os.path.join(out, "model")
    with result_checkpoint.as_directory() as ckpt:
        final = json.loads(open(os.path.join(ckpt, checkpoint.FINAL_FILE)).read())
        if os.path.isdir(model_dir):
            shutil.rmtree(model_dir)
        shutil.copytree(os.path.join(ckpt, checkpoint.BEST_DIR), model_dir)
    tok = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    tok.model_max_length = manifest["max_length"]
    tok.save_pretrained(model_dir)
    bertjob_settings = {
        **TextSettings.of(manifest).as_dict(),  # every text setting: infer and evaluate follow them
        "tokenizer_fingerprint": manifest["tokenizer"]["fingerprint"],
        "trained_from": cfg.model,
        "prepared_data": cfg.data,
        "pretraining": pretrain_record(cfg.model),  # where a `bertjob pretrain` model came from, or None
    }
    write_json(os.path.join(model_dir, "bertjob.json"), bertjob_settings)
    state = final["state"]
    # No evaluation during training (--max-steps stopped the run before its first): the model is the
    # last step's, validated at the end; the -1 placeholders read as a best epoch 0 at accuracy -1.
    evaluated = state["best_epoch"] >= 0
    metrics = {
        "best_epoch": state["best_epoch"] if evaluated else None,
        "best_val_accuracy": state["best_val_accuracy"]
        if evaluated
        else (final.get("best_validation") or {}).get("accuracy"),
        "validation": final.get("best_validation", {}),
        "test": final.get("test"),
        "history": state["history"],
        "steps": state["step"],
        "resumed_at_steps": state["resumed_at_steps"],
        # Every worker group of the run (count, from which step) and what ended the one before it.
        "workers_over_time": (events or {}).get("workers", []),
        "restarts": (events or {}).get("restarts", []),
        "placement_retries": (events or {}).get("placement_retries", []),
        "samples_seen": state["samples_seen"],
        "train_samples_per_s": round(state["samples_seen"] / state["train_time_s"], 2)
        if state["train_time_s"]
        else None,
        "train_time_s": round(state["train_time_s"], 1),
        "padding_fraction": round(1 - state.get("tokens_seen", 0) / state["padded_tokens_seen"], 4)
        if state.get("padded_tokens_seen")
        else None,
        "wall_s": round(wall_s, 1),
        "global_batch_size": cfg.batch_size,
        # The workers' that trained it (a rerun that exports a finished run's model starts none).
        "micro_batch_size": final.get("micro_batch_size"),
        "cpus_per_worker": final.get("cpus_per_worker"),
        "worker_threads": final.get("threads"),
        "precision": final.get("precision"),
        "worker_glibc_tunables": final.get("glibc_tunables", ""),
        # With --compile: the graphs rank 0's last worker process compiled (one per shape class Dynamic
        # shapes cannot share, train and eval apart); a count that grows with the data means recompiles.
        "compiled_graphs": final.get("compiled_graphs"),
        "checkpoints": storage,
        "config": to_dict(cfg),
        "prepared": {k: manifest[k] for k in ("max_length", "truncation", "input")},
        "versions": versions(),
    }
    write_json(os.path.join(out, "metrics.json"), metrics)
    plot_curves(state["history"], os.path.join(out, "training_curves.png"))
    log.info("train: %s; model in %s", result_line(metrics), join(cfg.output, "model"))
    return metrics


def result_line(metrics: dict[str, Any]) -> str:
    """The model's accuracies as the log gives them: the best epoch's, or the last step's model."""

    def acc(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    which = (f"best epoch {metrics['best_epoch'] + 1}" if metrics["best_epoch"] is not None
             else f"no evaluation during training: the model of its last step ({metrics['steps']})")  # fmt: skip
    return (f"{which}, val accuracy {acc(metrics['best_val_accuracy'])}, "
            f"test accuracy {acc((metrics['test'] or {}).get('accuracy'))}")  # fmt: skip


def plot_curves(history: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if h["type"] == "train"]
    evals = [h for h in history if h["type"] == "eval"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss", color="tab:blue")
    if evals:
        ax.plot(
            [h["step"] for h in evals],
            [h["val_loss"] for h in evals],
            "o--",
            label="val loss",
            color="tab:cyan",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    if evals:
        ax2.plot(
            [h["step"] for h in evals],
            [h["val_accuracy"] for h in evals],
            "s-",
            color="tab:red",
            label="val accuracy",
        )
    ax2.set_ylabel("validation accuracy")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    ax.set_title("bertjob training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Worker side


class _Tracker:
    """Optional MLflow or TensorBoard logging on rank 0."""

    def __init__(self, kind: str, log_dir: str, cfg: dict[str, Any]):
        self.kind, self.writer = kind, None
        if kind == "tensorboard" and log_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(log_dir)
        elif kind == "mlflow":
            import mlflow

            mlflow.start_run(run_name=cfg["name"])
            mlflow.log_params({k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool))})

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
        elif self.kind == "mlflow":
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        elif self.kind == "mlflow":
            import mlflow

            mlflow.end_run()


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in _unwrap(model).state_dict().items()}


class Recipe:
    """The worker side of a run, one object per Ray Train worker: setup, then epochs of steps with
    evaluations and checkpoints, then finish. State lives on the object; Ray calls are marked."""

    def __init__(self, cfg: TrainConfig, meta: dict[str, Any], rank: int, world: int, device: torch.device):
        self.cfg, self.meta, self.rank, self.world, self.device = cfg, meta, rank, world, device
        self.total_steps = meta["total_steps"]
        self.state = TrainState()
        self.best: dict[str, torch.Tensor] | None = None  # best weights so far, on the CPU
        self.best_is_current = False
        self.window = [0, 0, time.time()]  # since the last progress line: rows, steps, start

    # --- setup ----------------------------------------------------------------------------------

    def setup(self, resume_from: str | None) -> None:
        cfg = self.cfg
        torch_threads(self.meta["threads"])
        models.quiet_transformers()
        models.load_report_on_rank_zero(self.rank)
        torch.manual_seed(cfg.seed)  # the classifier head's initialisation
        self.precision = resolve_precision(cfg.mixed_precision, self.device)
        self.multiple_of = cfg.pad_to_multiple_of or (8 if self.device.type == "cuda" else 1)
        model = models.load_classifier(cfg.model, cfg.trust_remote_code)
        import ray.train.torch  # Ray: DDP wrapping and device placement

        self.model = ray.train.torch.prepare_model(model)
        if cfg.compile:
            # In place (nn.Module.compile), after DDP wraps the model (Dynamo then splits the graph at
            # DDP's buckets): state_dict keys stay the model's own, no `_orig_mod.` prefix, so a
            # checkpoint resumes and exports alike with compile on or off. Dynamic shapes: length-grouped
            # batches pad to their longest row, and one graph serves every width.
            self.model.compile(dynamic=True)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.layer_lr_decay)
        # The configured lr, also when resuming (a changed --lr applies to the steps still to come).
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.stepper = Stepper(self.model, self.optimizer, self.device, self.precision, cfg.max_grad_norm,
                               no_sync=getattr(self.model, "no_sync", None))  # fmt: skip
        if resume_from:
            self.load_checkpoint(resume_from)
        window = self.meta["window_rows"]
        self.train_rows = SplitRows(join(cfg.data, "train"), cache_rows=2 * window if window else None,
                                    names=self.meta["shards"]["train"])  # fmt: skip
        self.windows = self.train_rows.windows(window) if window else None
        self.tracker = (
            _Tracker(cfg.tracking, self.meta["tracking_dir"], to_dict(cfg)) if self.rank == 0 else None
        )
        group = None  # this worker group: the id of the start event its rank 0 records
        if self.rank == 0:
            import ray  # Ray: the node this worker group's rank 0 runs on

            group = runlog.record(self.meta["run_dir"], "start", workers=self.world, from_step=self.state.step,
                                  epoch=self.state.epoch, node=ray.get_runtime_context().get_node_id())  # fmt: skip
            log.info("worker setup: %d workers on %s, precision %s, %d threads, GLIBC_TUNABLES=%s", self.world,
                     self.device, self.precision, torch.get_num_threads(), os.environ.get("GLIBC_TUNABLES", "(unset)"))  # fmt: skip
        self.sample_log = None
        if cfg.sample_log:
            if self.world > 1:  # every rank tags its records with the group rank 0 recorded
                import torch.distributed as dist

                shared = [group]
                dist.broadcast_object_list(shared, src=0, device=self.device)
                group = shared[0]
            self.group = group
            samples = join(self.meta["run_dir"], runlog.SAMPLES_DIR)
            os.makedirs(samples, exist_ok=True)
            self.sample_log = open(join(samples, f"rank-{self.rank}.jsonl"), "a")

    # --- checkpoints: save and load, one the mirror of the other ---------------------------------

    def save_checkpoint(self, metrics: dict[str, Any], final: dict[str, Any] | None = None) -> None:
        """Report `metrics` with a checkpoint written by rank 0 (every worker must report)."""
        import ray.train  # Ray: the checkpoint goes to storage through report()

        self.stepper.check_finite(self.world)  # never checkpoint NaN weights
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if self.rank == 0:
                checkpoint.save(tmp, _unwrap(self.model), self.optimizer, self.stepper.scaler, self.state,
                                self.best, self.best_is_current, final)  # fmt: skip
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    def load_checkpoint(self, path: str) -> None:
        self.state, self.best = checkpoint.load(
            path, _unwrap(self.model), self.optimizer, self.stepper.scaler
        )
        self.best_is_current = False
        if self.state.finished and self.total_steps > (self.state.planned_steps or self.state.step):
            # Extending a finished run with more epochs: the added steps get a schedule of their own
            # (warm-up to the configured lr, decay to 0 at the new end), not the old one stretched.
            self.state.schedule_start, self.state.finished = self.state.step, False
        self.state.resumed_at_steps.append(self.state.step)
        if self.rank == 0:
            log.info("resuming at step %d (epoch %d, step %d of it)", self.state.step, self.state.epoch + 1,
                     self.state.step_in_epoch)  # fmt: skip

    # --- training -------------------------------------------------------------------------------

    def train(self) -> None:
        cfg, state = self.cfg, self.state
        while state.epoch < cfg.epochs and state.step < self.total_steps and not state.finished:
            stopped = self.train_epoch()
            if stopped:
                break
            is_best, stop = self.evaluate_and_record()
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            self.save_checkpoint({"val_accuracy": state.history[-1]["val_accuracy"], "step": state.step,
                                  "epoch": state.epoch, "is_best": int(is_best)})  # fmt: skip
            if stop:
                break

    def train_epoch(self) -> bool:
        """The rest of the current epoch; True when stopped early (max_steps, early stopping)."""
        cfg, state = self.cfg, self.state
        batches = epoch_batches(self.train_rows.lengths, cfg.batch_size, cfg.seed, state.epoch,
                                cfg.length_grouping, self.windows)  # fmt: skip
        t0 = time.time()
        for rows in batches[state.step_in_epoch :]:
            self.train_step(rows)
            if state.step >= self.total_steps:
                state.train_time_s += time.time() - t0
                return state.step_in_epoch < len(batches)
            if state.step_in_epoch == len(batches):
                break
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
                state.train_time_s += time.time() - t0
                is_best, stop = self.evaluate_and_record()
                self.save_checkpoint({"val_accuracy": state.history[-1]["val_accuracy"], "step": state.step,
                                      "epoch": state.epoch, "is_best": int(is_best)})  # fmt: skip
                t0 = time.time()
                if stop:
                    return True
            elif cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
                # Mid-epoch checkpoints rank last (-1) so that best-N keeps evaluated ones; Ray Train
                # always keeps the latest checkpoint as well, which is what a restart resumes from.
                self.save_checkpoint({"val_accuracy": -1.0, "step": state.step, "epoch": state.epoch})
        state.train_time_s += time.time() - t0
        return False

    def train_step(self, rows: np.ndarray) -> None:
        """Optimizer step `state.step`: this worker's share of the global batch `rows`."""
        cfg, state = self.cfg, self.state
        # Dropout masks from (seed, step, rank): a resumed step draws the same ones, nothing to restore.
        torch.manual_seed(step_seed(cfg.seed, state.step, self.rank))
        segment = self.total_steps - state.schedule_start
        factor = lr_factor(state.step - state.schedule_start, segment, int(cfg.warmup_ratio * segment))
        set_lr(self.optimizer, self.base_lrs, factor)
        parts = worker_micro_batches(rows, self.rank, self.world, self.meta["micro_batch_size"])
        micro = []
        for part in parts:
            host = self.train_rows.take(part if len(part) else rows[:1])
            if not len(part):  # a short last batch left this worker nothing: one row that weighs nothing
                host["label"] = np.full(1, IGNORE)
            micro.append(collate(host, self.meta["pad_token_id"], self.multiple_of, self.device))
        self.stepper.step(micro, len(rows), state.step, self.world)
        # Counted on the host for all workers from the rows' lengths: no device sync.
        state.tokens_seen += int(self.train_rows.lengths[rows].sum())
        state.padded_tokens_seen += self.padded_tokens(rows)
        if self.sample_log is not None:
            # group: the worker group that ran the step; one that a later group runs again (after a
            # restart, a resize, in a rerun) is logged again, and runlog.trained_rows keeps the last.
            # Not the resume count: two groups that resumed from the same checkpoint share it.
            record = {"step": state.step, "epoch": state.epoch, "group": self.group,
                      "rank": self.rank, "world": self.world, "rows": np.concatenate(parts).tolist()}  # fmt: skip
            self.sample_log.write(json.dumps(record) + "\n")
            self.sample_log.flush()
        state.step += 1
        state.step_in_epoch += 1
        state.samples_seen += len(rows)
        self.window[:2] = [self.window[0] + len(rows), self.window[1] + 1]
        self.best_is_current = False
        # A host read: free on CPU, so there every step; on a GPU at log steps.
        if self.device.type != "cuda" or state.step % cfg.log_every_steps == 0:
            self.stepper.check_finite(self.world)
        if state.step % cfg.log_every_steps == 0 or state.step == self.total_steps:
            self.log_progress()

    def padded_tokens(self, rows: np.ndarray) -> int:
        """Tokens with padding that all workers' micro-batches of the global batch `rows` hold."""
        m = self.multiple_of
        return sum(
            len(part) * -(-int(self.train_rows.lengths[part].max()) // m) * m
            for r in range(self.world)
            for part in worker_micro_batches(rows, r, self.world, self.meta["micro_batch_size"])
            if len(part)
        )

    def log_progress(self) -> None:
        state, (rows, steps, t0) = self.state, self.window
        loss_sum, norm_sum = self.stepper.take_stats()
        loss_sum = all_workers_sum(loss_sum, self.device, self.world)
        dt = time.time() - t0
        rate = rows / dt if dt > 0 else 0.0
        entry = {"type": "train", "step": state.step, "epoch": state.epoch, "loss": loss_sum / max(1, rows),
                 "grad_norm": norm_sum / max(1, steps), "lr": self.optimizer.param_groups[-1]["lr"], "samples_per_s": rate}  # fmt: skip
        state.history.append(entry)
        if self.rank == 0:
            eta = (self.total_steps - state.step) * self.cfg.batch_size / rate if rate else float("nan")
            log.info("epoch %d step %d/%d loss %.4f lr %.2e %.1f samples/s ETA %.0fs", state.epoch + 1, state.step,
                     self.total_steps, entry["loss"], entry["lr"], rate, eta)  # fmt: skip
            self.tracker.log(
                {f"train/{k}": entry[k] for k in ("loss", "grad_norm", "lr", "samples_per_s")}, state.step
            )  # type: ignore[union-attr]
        self.window = [0, 0, time.time()]

    # --- evaluation -----------------------------------------------------------------------------

    def evaluate(self, split: str) -> dict[str, Any]:
        """Metrics on a split: each worker scores its own contiguous share, the results are gathered."""
        self.stepper.check_finite(self.world)
        rows = SplitRows(join(self.cfg.data, split), cache_rows=WINDOW_ROWS, names=self.meta["shards"][split])
        n = min(len(rows), self.cfg.max_eval_rows or len(rows))
        # A cap takes rows spread evenly over the split: its first rows were taken, which in a corpus
        # kept in its order (IMDb's neg/ then pos/) are one class, and accuracy, F1 and AUC meant nothing.
        picked = np.linspace(0, len(rows) - 1, n).astype(int) if n < len(rows) else np.arange(n)
        mine = np.array_split(picked, self.world)[self.rank]
        size = 2 * self.meta["micro_batch_size"]

        def batches():
            for start in range(0, len(mine), 16 * size):  # sorted by length in chunks: little padding
                chunk = mine[start : start + 16 * size]
                chunk = chunk[np.argsort(rows.lengths[chunk], kind="stable")]
                for i in range(0, len(chunk), size):
                    yield collate(
                        rows.take(chunk[i : i + size]),
                        self.meta["pad_token_id"],
                        self.multiple_of,
                        self.device,
                    )

        # Eager also under --compile: evaluation is a small share of a run, and a graph of its own
        # (inference mode, other batch sizes) was a second compile per worker, minutes on CPU.
        with torch.compiler.set_stance("force_eager"):
            probs, labels, loss_sum = predict_batches(
                _unwrap(self.model), batches(), self.device, self.precision
            )
        if self.world > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, (probs, labels, loss_sum))
            probs = np.concatenate([g[0] for g in gathered])
            labels = np.concatenate([g[1] for g in gathered])
            loss_sum = sum(g[2] for g in gathered)
        m = classification_metrics(labels, probs)
        m["loss"] = loss_sum / max(1, len(labels))
        return m

    def evaluate_and_record(self) -> tuple[bool, bool]:
        """Evaluate on validation and record it; returns (is_best, stop_early)."""
        state, m = self.state, self.evaluate("validation")
        state.history.append({"type": "eval", "step": state.step, "epoch": state.epoch,
                              **{f"val_{k}": v for k, v in m.items() if k != "confusion_matrix"}})  # fmt: skip
        # Best by accuracy; validation loss breaks ties (small validation sets tie often).
        is_best = (m["accuracy"], -m["loss"]) > (state.best_val_accuracy, -state.best_val_loss)
        if is_best:
            state.best_val_accuracy, state.best_val_loss = m["accuracy"], m["loss"]
            state.best_epoch, state.evals_without_improvement = state.epoch, 0
            self.best, self.best_is_current = _cpu_state(self.model), True
        else:
            state.evals_without_improvement += 1
            self.best_is_current = False
        if self.rank == 0:
            log.info("eval epoch %d step %d: val accuracy %.4f f1 %.4f auc %.4f loss %.4f%s", state.epoch + 1,
                     state.step, m["accuracy"], m["f1"], m["roc_auc"], m["loss"], " (best)" if is_best else "")  # fmt: skip
            self.tracker.log({f"val/{k}": v for k, v in m.items() if isinstance(v, float)}, state.step)  # type: ignore[union-attr]
        patience = self.cfg.early_stopping_patience
        return is_best, patience > 0 and state.evals_without_improvement >= patience

    # --- the end --------------------------------------------------------------------------------

    def finish(self) -> None:
        """The best weights, scored on validation and test; the last checkpoint keeps the latest
        weights (to extend the run) and these results."""
        self.state.finished, self.state.planned_steps = True, self.total_steps
        current = _cpu_state(self.model)
        if self.best is not None:
            _unwrap(self.model).load_state_dict(self.best)
        final = {"best_validation": self.evaluate("validation"), "precision": self.precision,
                 "micro_batch_size": self.meta["micro_batch_size"], "cpus_per_worker": self.meta["cpus"],
                 "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "threads": torch.get_num_threads(),
                 "compiled_graphs": _compiled_graphs() if self.cfg.compile else None}  # fmt: skip
        if "test" in self.meta["splits"]:
            final["test"] = self.evaluate("test")
            if self.rank == 0:
                t = final["test"]
                log.info(
                    "test (best model): accuracy %.4f f1 %.4f auc %.4f", t["accuracy"], t["f1"], t["roc_auc"]
                )
        _unwrap(self.model).load_state_dict(current)
        # The best weights always in their own directory of the last checkpoint: export copies it.
        self.best, self.best_is_current = (self.best if self.best is not None else current), False
        self.save_checkpoint({"val_accuracy": self.state.best_val_accuracy, "step": self.state.step,
                              "epoch": self.state.epoch, "final": 1, "planned_steps": self.total_steps}, final=final)  # fmt: skip
        self.close()

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self.sample_log is not None:
            self.sample_log.close()


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train  # Ray: this worker's place in the group, its device, the checkpoint to resume
    import ray.train.torch

    ctx = ray.train.get_context()
    recipe = Recipe(TrainConfig(**config["cfg"]), config["meta"], ctx.get_world_rank(), ctx.get_world_size(),
                    ray.train.torch.get_device())  # fmt: skip
    resume = ray.train.get_checkpoint()
    with resume.as_directory() if resume else contextlib.nullcontext() as path:
        recipe.setup(path)
    try:
        recipe.train()
        recipe.finish()
    except NonFiniteLossError as err:
        recipe.close()
        leave_nonfinite(recipe.meta["run_dir"], recipe.rank, err.step)
