"""Train: data-parallel fine-tuning with Ray Train's TorchTrainer, from prepared shards to a HF model.

    driver: validate (manifest, tokenizer fingerprint, splits, resources) -> TorchTrainer.fit()
            -> export the best model to OUTPUT/model, metrics.json, training_curves.png
    worker: train_loop (bertjob.training does the step) -> ray.train.report(metrics, checkpoint)

Resuming: a restarted worker group, or a rerun with the same `name` and `storage_path`, finds the
latest checkpoint through `ray.train.get_checkpoint()` (Ray Train V2 restores its checkpoint
manager from storage) and continues mid-epoch.
"""

from __future__ import annotations

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

from bertjob import models
from bertjob.config import SetupError, TrainConfig, to_dict
from bertjob.metrics import classification_metrics
from bertjob.outputs import MANIFEST, ensure_output, versions
from bertjob.pretrain import pretrain_record
from bertjob.storage import (
    check_access,
    copy,
    exists,
    filesystem,
    is_remote,
    join,
    read_json,
    remove,
    write_json,
)
from bertjob.text import TextSettings
from bertjob.training import (
    Stepper,
    TrainState,
    chunks,
    collate,
    group_by_length,
    lr_factor,
    make_optimizer,
    malloc_env,
    predict_batches,
    resolve_precision,
    rng_state,
    row_lengths,
    seed_everything,
    set_lr,
    set_rng_state,
    torch_threads,
)

log = logging.getLogger(__name__)

COLUMNS = ["label", "input_ids", "length"]
STATE_FILE = "training_state.pt"
BEST_DIR = "best_model"
FINAL_FILE = "final.json"


class TrainSetupError(SetupError):
    """The run cannot start; raised on the driver before any worker starts."""


# ---------------------------------------------------------------------------------------------
# Driver side


def read_manifest(data: str) -> dict[str, Any]:
    path = join(data, MANIFEST)
    if not exists(path):
        raise TrainSetupError(
            f"{data} has no {MANIFEST}: it is not a complete prepared directory. Run `bertjob prepare "
            f"--output {data}` first (an interrupted prepare leaves no manifest)."
        )
    return read_json(path)


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
    splits = manifest.get("splits", {})
    for name in ("train", "validation"):
        written = splits.get(name, {}).get("rows_written", 0)
        if written == 0:
            hint = " (set validation_fraction > 0 in prepare)" if name == "validation" else ""
            problems.append(f"split {name!r} of {cfg.data} has no rows{hint}")
        elif name == "train" and set(splits[name].get("label_counts", {})) != {"0", "1"}:
            problems.append(
                f"split 'train' of {cfg.data} needs both labels; it has {splits[name].get('label_counts')}"
            )
    if splits.get("train", {}).get("rows_written", 0) and splits["train"]["rows_written"] < cfg.num_workers:
        problems.append(f"split 'train' has fewer rows than num_workers ({cfg.num_workers})")
    return problems


def check_resources(cfg: TrainConfig) -> list[str]:
    from bertjob.cluster import cluster_cpus, cluster_gpus

    problems = []
    cpus, gpus = cluster_cpus(), cluster_gpus()
    if cfg.use_gpu and gpus == 0:
        problems.append(
            "use_gpu is set but the Ray cluster has no GPU (set --use-gpu false, or add GPU nodes)"
        )
    elif cfg.use_gpu and gpus < cfg.num_workers:
        problems.append(f"{cfg.num_workers} workers need {cfg.num_workers} GPUs; the cluster has {gpus:g}")
    need = cfg.num_workers * cfg.cpus_per_worker + (1 if cfg.stream_data else 0)
    if need > cpus:
        problems.append(
            f"{cfg.num_workers} workers x {cfg.cpus_per_worker:g} CPUs need {need:g} CPUs; the cluster has {cpus:g} "
            f"(lower --num-workers or --cpus-per-worker; on an autoscaling cluster set --check-resources false)"
        )
    return problems


def run(cfg: TrainConfig) -> dict[str, Any]:
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bertjob.cluster import init_ray

    started = time.time()
    check_access({"data": cfg.data, "output": cfg.output, "storage_path": cfg.storage_path})
    manifest = read_manifest(cfg.data)
    problems = check_setup(cfg, manifest)
    if problems:
        raise TrainSetupError("cannot train:\n  - " + "\n  - ".join(problems))
    ensure_output(cfg.output, "train")  # never wiped: it may hold the checkpoints a rerun resumes from
    init_ray()
    if cfg.check_resources:
        problems = check_resources(cfg)
        if problems:
            raise TrainSetupError("cannot train:\n  - " + "\n  - ".join(problems))

    datasets = {
        name: _read_split(
            cfg.data, name, shuffle_seed=cfg.seed if name == "train" else None, stream=cfg.stream_data
        )
        for name in ("train", "validation", "test")
        if manifest["splits"].get(name, {}).get("rows_written", 0) > 0
    }
    has_test_labels = bool(manifest["splits"].get("test", {}).get("label_counts"))
    if not has_test_labels:
        datasets.pop("test", None)
    n_train = manifest["splits"]["train"]["rows_written"]
    micro_per_epoch = math.ceil((n_train // cfg.num_workers) / cfg.batch_size_per_worker)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.grad_accum_steps))
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    meta = {
        "micro_per_epoch": micro_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "pad_token_id": manifest["tokenizer"]["pad_token_id"] or 0,
        "fail_at_step": int(os.environ.get("BERTJOB_FAIL_AT_STEP", "-1")),
        "fail_marker": os.environ.get("BERTJOB_FAIL_MARKER", ""),
        "has_test": "test" in datasets,
        "tracking_dir": os.path.abspath(join(cfg.output, "tensorboard")) if "://" not in cfg.output else "",
    }
    log.info(
        "train: %d rows, %d workers x %d per worker x %d accumulation = global batch %d; %d steps/epoch, %d steps",
        n_train, cfg.num_workers, cfg.batch_size_per_worker, cfg.grad_accum_steps, cfg.global_batch_size,
        steps_per_epoch, total_steps,
    )  # fmt: skip
    storage = cfg.storage_path or join(cfg.output, "ray_results")
    if is_remote(storage):  # Ray gets the filesystem the standard variables describe (storage.py)
        storage_fs, storage_where = filesystem(storage)
    else:
        storage = os.path.abspath(storage)
        storage_fs, storage_where = None, storage
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(cfg), "meta": meta},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_where,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": malloc_env()} if cfg.malloc_tuning else None,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="val_accuracy",
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        # Only train is split (equally, so every worker runs the same number of steps); evaluation
        # splits reach every worker whole and each worker scores every world_size-th batch.
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise RuntimeError(f"training failed: {_root_message(err)}") from err
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return export(cfg, manifest, result.checkpoint, wall_s=time.time() - started, storage=storage)


def _root_message(err: BaseException) -> str:
    text = str(err)
    for line in reversed(text.splitlines()):
        if "Error" in line and ":" in line:
            return line.strip()
    return text.strip().splitlines()[-1] if text.strip() else repr(err)


def _read_split(data: str, split: str, shuffle_seed: int | None, stream: bool) -> Any:
    import ray.data

    fs, where = filesystem(join(data, split))
    ds = ray.data.read_parquet(where, filesystem=fs, columns=COLUMNS)
    if shuffle_seed is not None:
        # The prepared order follows the source (IMDb: all neg, then all pos); shuffle once, seeded,
        # so that a resumed epoch sees the same order. Each epoch adds a seeded local shuffle.
        ds = ds.random_shuffle(seed=shuffle_seed)
    if not stream:
        # Token ids are small (IMDb train: ~30 MB). Loading them into the object store up front
        # means the workers need no CPU for Ray Data tasks while they train: on a 2-CPU machine
        # with 2 workers there is none to spare, and a streaming read would wait for ever.
        ds = ds.materialize()
    return ds


def export(
    cfg: TrainConfig, manifest: dict[str, Any], checkpoint: Any, wall_s: float, storage: str
) -> dict[str, Any]:
    """OUTPUT/model (the best model, HF format, loadable by transformers.pipeline), metrics.json, curves."""
    if not is_remote(cfg.output):
        return _export_to(cfg.output, cfg, manifest, checkpoint, wall_s, storage)
    # Object stores take whole objects: build the outputs locally, then upload them, metrics.json
    # last (the pipeline takes a train output with metrics.json and a model as complete).
    with tempfile.TemporaryDirectory(prefix="bertjob-export-") as local:
        metrics = _export_to(local, cfg, manifest, checkpoint, wall_s, storage)
        remove(join(cfg.output, "model"))
        for name in ("model", "training_curves.png", "metrics.json"):
            copy(os.path.join(local, name), join(cfg.output, name))
    return metrics


def _export_to(
    out: str, cfg: TrainConfig, manifest: dict[str, Any], checkpoint: Any, wall_s: float, storage: str
) -> dict[str, Any]:
    model_dir = os.path.join(out, "model")
    with checkpoint.as_directory() as ckpt:
        final = json.loads(open(os.path.join(ckpt, FINAL_FILE)).read())
        if os.path.isdir(model_dir):
            shutil.rmtree(model_dir)
        shutil.copytree(os.path.join(ckpt, BEST_DIR), model_dir)
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
    metrics = {
        "best_epoch": state["best_epoch"],
        "best_val_accuracy": state["best_val_accuracy"],
        "validation": final.get("best_validation", {}),
        "test": final.get("test"),
        "history": state["history"],
        "steps": state["step"],
        "resumed_at_steps": state["resumed_at_steps"],
        "samples_seen": state["samples_seen"],
        "train_samples_per_s": round(state["samples_seen"] / state["train_time_s"], 2)
        if state["train_time_s"]
        else None,
        "train_time_s": round(state["train_time_s"], 1),
        "padding_fraction": round(1 - state.get("tokens_seen", 0) / state["padded_tokens_seen"], 4)
        if state.get("padded_tokens_seen")
        else None,
        "wall_s": round(wall_s, 1),
        "global_batch_size": cfg.global_batch_size,
        "precision": final.get("precision"),
        "worker_glibc_tunables": final.get("glibc_tunables", ""),
        "checkpoints": storage,
        "config": to_dict(cfg),
        "prepared": {k: manifest[k] for k in ("max_length", "truncation", "input")},
        "versions": versions(),
    }
    write_json(os.path.join(out, "metrics.json"), metrics)
    plot_curves(state["history"], os.path.join(out, "training_curves.png"))
    test = metrics["test"] or {}
    log.info(
        "train: best epoch %d, val accuracy %.4f, test accuracy %s; model in %s",
        state["best_epoch"] + 1, state["best_val_accuracy"],
        f"{test['accuracy']:.4f}" if test else "n/a", join(cfg.output, "model"),
    )  # fmt: skip
    return metrics


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


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in _unwrap(model).state_dict().items()}


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = TrainConfig(**config["cfg"])
    meta = config["meta"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
    seed_everything(cfg.seed)
    device = ray.train.torch.get_device()
    precision = resolve_precision(cfg.mixed_precision, device)
    multiple_of = cfg.pad_to_multiple_of or (8 if device.type == "cuda" else 1)
    pad_id = meta["pad_token_id"]
    total_steps = meta["total_steps"]
    warmup_steps = int(cfg.warmup_ratio * total_steps)

    model = models.load_classifier(cfg.model, cfg.trust_remote_code)
    state, best_sd, saved = TrainState(), None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
            saved = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
            state = TrainState(**saved["state"])
            if saved.get("best_is_current"):
                best_sd = {k: v.clone() for k, v in model.state_dict().items()}
            elif os.path.exists(os.path.join(d, BEST_DIR, "model.safetensors")):
                best_sd = load_file(os.path.join(d, BEST_DIR, "model.safetensors"))
        state.resumed_at_steps.append(state.step)
        if rank == 0:
            log.info(
                "resuming from step %d (epoch %d, step %d in epoch)",
                state.step,
                state.epoch + 1,
                state.step_in_epoch,
            )
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.layer_lr_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    stepper = Stepper(
        model, optimizer, device, precision, cfg.max_grad_norm, cfg.grad_accum_steps,
        no_sync=getattr(model, "no_sync", None),
    )  # fmt: skip
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        base_lrs = saved.get("base_lrs", base_lrs)
        if stepper.scaler is not None and saved.get("scaler"):
            stepper.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
    tracker = _Tracker(cfg.tracking, meta["tracking_dir"], config["cfg"]) if rank == 0 else None
    if rank == 0:
        log.info(
            "worker setup: %d workers on %s, precision %s, global batch %d, GLIBC_TUNABLES=%s",
            world,
            device,
            precision,
            cfg.global_batch_size,
            os.environ.get("GLIBC_TUNABLES", "(unset)"),
        )

    def evaluate(split: str) -> dict[str, Any]:
        it = ray.train.get_dataset_shard(split).iter_batches(
            batch_size=max(64, cfg.batch_size_per_worker * 2), batch_format="numpy"
        )
        limit = cfg.max_eval_rows or None

        def mine():
            seen = 0
            for i, b in enumerate(it):
                if limit is not None and seen >= limit:
                    break
                seen += len(b["label"])
                if i % world == rank:
                    yield collate(b, pad_id, multiple_of, device)

        probs, labels, loss_sum = predict_batches(_unwrap(model), mine(), device, precision)
        if world > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (probs, labels, loss_sum))
            probs = np.concatenate([g[0] for g in gathered])
            labels = np.concatenate([g[1] for g in gathered])
            loss_sum = sum(g[2] for g in gathered)
        m = classification_metrics(labels, probs)
        m["loss"] = loss_sum / max(1, len(labels))
        return m

    def report(metrics: dict[str, Any], final: dict[str, Any] | None = None) -> None:
        """Checkpoint on rank 0 (others report None, as Ray Train requires every worker to report)."""
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                net = _unwrap(model)
                net.save_pretrained(tmp, safe_serialization=True)
                best_is_current = (
                    best_sd is not None and state.best_epoch >= 0 and metrics.get("is_best", False)
                )
                if best_is_current:
                    net.save_pretrained(os.path.join(tmp, BEST_DIR), safe_serialization=True)
                elif best_sd is not None:
                    _save_hf(net.config, best_sd, os.path.join(tmp, BEST_DIR))
                torch.save(
                    {
                        "state": dataclasses.asdict(state),
                        "optimizer": optimizer.state_dict(),
                        "scaler": stepper.scaler.state_dict() if stepper.scaler else None,
                        "rng": rng_state(),
                        "base_lrs": base_lrs,
                        "best_is_current": best_is_current,
                        # The schedule is a pure function of (step, total_steps, warmup): no state.
                        "schedule": {
                            "step": state.step,
                            "total_steps": total_steps,
                            "warmup_steps": warmup_steps,
                        },
                    },
                    os.path.join(tmp, STATE_FILE),
                )
                if final is not None:
                    with open(os.path.join(tmp, FINAL_FILE), "w") as f:
                        json.dump(
                            {
                                **final,
                                "state": dataclasses.asdict(state),
                                "precision": precision,
                                "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                            },
                            f,
                            default=float,
                        )
                ckpt = Checkpoint.from_directory(tmp)
            clean = {
                k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            ray.train.report(clean, checkpoint=ckpt)

    def after_eval(m: dict[str, Any]) -> tuple[bool, bool]:
        """Record an evaluation; returns (is_best, stop_early)."""
        nonlocal best_sd
        state.history.append(
            {
                "type": "eval",
                "step": state.step,
                "epoch": state.epoch,
                **{f"val_{k}": v for k, v in m.items() if k != "confusion_matrix"},
            }
        )
        # Best by accuracy; validation loss breaks ties (small validation sets tie often).
        is_best = (m["accuracy"], -m["loss"]) > (state.best_val_accuracy, -state.best_val_loss)
        if is_best:
            state.best_val_accuracy, state.best_val_loss = m["accuracy"], m["loss"]
            state.best_epoch, state.evals_without_improvement = state.epoch, 0
            best_sd = _cpu_state(model)
        else:
            state.evals_without_improvement += 1
        if rank == 0:
            log.info(
                "eval epoch %d step %d: val accuracy %.4f f1 %.4f auc %.4f loss %.4f%s", state.epoch + 1, state.step,
                m["accuracy"], m["f1"], m["roc_auc"], m["loss"], " (best)" if is_best else "",
            )  # fmt: skip
            tracker.log({f"val/{k}": v for k, v in m.items() if isinstance(v, float)}, state.step)  # type: ignore[union-attr]
        stop = (
            cfg.early_stopping_patience > 0 and state.evals_without_improvement >= cfg.early_stopping_patience
        )
        return is_best, stop

    train_shard = ray.train.get_dataset_shard("train")
    stop = state.finished and state.step >= total_steps
    window_loss, window_n, window_t, window_samples = 0.0, 0, time.time(), 0
    while not stop and state.epoch < cfg.epochs and state.step < total_steps:
        epoch_seed = cfg.seed + 1000 * state.epoch + rank
        groups = train_shard.iter_batches(
            batch_size=cfg.batch_size_per_worker * cfg.length_grouping,
            batch_format="numpy",
            local_shuffle_buffer_size=cfg.batch_size_per_worker * max(8, cfg.length_grouping),
            local_shuffle_seed=epoch_seed,
            prefetch_batches=1,
        )
        it = group_by_length(groups, cfg.batch_size_per_worker, epoch_seed)
        skip = state.step_in_epoch * cfg.grad_accum_steps  # resume mid-epoch: skip what was trained on
        micro = (b for i, b in enumerate(it) if i >= skip and i < meta["micro_per_epoch"])
        epoch_t0 = time.time()
        for group in chunks(micro, cfg.grad_accum_steps):
            if (
                meta["fail_at_step"] == state.step
                and meta["fail_marker"]
                and not os.path.exists(meta["fail_marker"])
            ):
                open(meta["fail_marker"], "w").write(f"failed at step {state.step} on rank {rank}\n")
                raise RuntimeError(f"injected test failure at step {state.step}")
            set_lr(optimizer, base_lrs, lr_factor(state.step, total_steps, warmup_steps))
            batches = [collate(b, pad_id, multiple_of, device) for b in group]
            loss, _ = stepper.step(batches, state.step)
            n = sum(len(b["labels"]) for b in batches) * world
            state.tokens_seen += (
                sum(int(row_lengths(b).sum()) for b in group) * world
            )  # host side: no GPU sync
            state.padded_tokens_seen += sum(b["input_ids"].numel() for b in batches) * world
            state.step += 1
            state.step_in_epoch += 1
            state.samples_seen += n
            window_loss, window_n, window_samples = window_loss + loss, window_n + 1, window_samples + n
            if state.step % cfg.log_every_steps == 0 or state.step == total_steps:
                dt = time.time() - window_t
                rate = window_samples / dt if dt > 0 else 0.0
                lr_now = optimizer.param_groups[-1]["lr"]
                state.history.append(
                    {
                        "type": "train",
                        "step": state.step,
                        "epoch": state.epoch,
                        "loss": window_loss / window_n,
                        "lr": lr_now,
                        "samples_per_s": rate,
                    }
                )
                if rank == 0:
                    eta = (total_steps - state.step) * cfg.global_batch_size / rate if rate else float("nan")
                    log.info(
                        "epoch %d step %d/%d loss %.4f lr %.2e %.1f samples/s ETA %.0fs",
                        state.epoch + 1, state.step, total_steps, window_loss / window_n, lr_now, rate, eta,
                    )  # fmt: skip
                    tracker.log(
                        {
                            "train/loss": window_loss / window_n,
                            "train/lr": lr_now,
                            "train/samples_per_s": rate,
                        },
                        state.step,
                    )  # type: ignore[union-attr]
                window_loss, window_n, window_t, window_samples = 0.0, 0, time.time(), 0
            end_of_epoch = state.step_in_epoch >= meta["steps_per_epoch"] or state.step >= total_steps
            if end_of_epoch:
                break
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
                state.train_time_s += time.time() - epoch_t0
                epoch_t0 = time.time()
                m = evaluate("validation")
                is_best, stop = after_eval(m)
                report(
                    {
                        "val_accuracy": m["accuracy"],
                        "step": state.step,
                        "epoch": state.epoch,
                        "is_best": is_best,
                    }
                )
                if stop:
                    break
            elif cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
                # Mid-epoch checkpoints rank last (-1) so that best-N keeps evaluated ones; Ray Train
                # always keeps the latest checkpoint as well, which is what a restart resumes from.
                report({"val_accuracy": -1.0, "step": state.step, "epoch": state.epoch})
        state.train_time_s += time.time() - epoch_t0
        if stop:
            break
        m = evaluate("validation")
        is_best, stop = after_eval(m)
        state.epoch += 1
        state.step_in_epoch = 0
        report({"val_accuracy": m["accuracy"], "step": state.step, "epoch": state.epoch, "is_best": is_best})

    # The end: the best weights, evaluated on the test split when there is one.
    state.finished = True
    final: dict[str, Any] = {}
    current = _cpu_state(model)
    if best_sd is not None:
        _unwrap(model).load_state_dict(best_sd)
    final["best_validation"] = evaluate("validation")
    if meta["has_test"]:
        final["test"] = evaluate("test")
        if rank == 0:
            log.info(
                "test (best model): accuracy %.4f f1 %.4f auc %.4f",
                final["test"]["accuracy"],
                final["test"]["f1"],
                final["test"]["roc_auc"],
            )
    best_for_export = best_sd if best_sd is not None else current
    _unwrap(model).load_state_dict(current)  # the checkpoint keeps the latest weights for extension
    best_sd = best_for_export
    report(
        {"val_accuracy": state.best_val_accuracy, "step": state.step, "epoch": state.epoch, "final": 1},
        final=final,
    )
    if tracker is not None:
        tracker.close()


def _save_hf(config: Any, state_dict: dict[str, torch.Tensor], path: str) -> None:
    """Save `state_dict` as a HF model directory without disturbing the live model."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    shared = {k: v.contiguous() for k, v in state_dict.items()}
    # Tied weights share storage; safetensors refuses shared tensors, so keep the first name only.
    seen, out = set(), {}
    for k, v in shared.items():
        key = (v.data_ptr(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
