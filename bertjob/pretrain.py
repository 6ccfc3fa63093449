"""Pretrain: within-task masked-LM pre-training (ITPT, Sun et al. 2019) on a prepared directory's own
reviews, before fine-tuning with `bertjob train --model OUTPUT/model`.

    driver: validate (manifest, splits, tokenizer, [MASK]) -> read unsup + train shards (never
            validation or test) -> pack into max_length sequences (bertjob.masking) -> shuffle once,
            seeded -> TorchTrainer.fit() -> export OUTPUT/model (AutoModelForMaskedLM + tokenizer),
            metrics.json (MLM loss and perplexity curve), pretraining_curves.png
    worker: PretrainRecipe: setup / train_epoch / save / load / finish; bertjob.training does the step.

Sequences come from the prepared shards, not from the raw corpus: one tokenize path, and the
validation rows prepare carved out of train are already elsewhere. The cost is the middle of
reviews prepare truncated (head+tail): ~10% of IMDb's tokens at max_length 512 (see the README).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bertjob import models
from bertjob.config import PretrainConfig, SetupError, to_dict
from bertjob.masking import MaskedLMLoss, Masker, MaskingRule, pack_sequences, sparse_targets
from bertjob.outputs import ensure_output, versions
from bertjob.storage import exists, for_workers, join, read_json, write_json
from bertjob.training import (
    NonFiniteLossError,
    Stepper,
    collate,
    lr_factor,
    make_optimizer,
    malloc_env,
    resolve_precision,
    set_lr,
    step_seed,
    torch_threads,
)

log = logging.getLogger(__name__)

STATE_FILE = "pretrain_state.pt"
FINAL_FILE = "final.json"
PACK_ROWS = 1024  # reviews packed together; only the last sequence of each such batch is short
PROVENANCE = "bertjob.json"  # in OUTPUT/model: what the model was pre-trained from and on


class PretrainSetupError(SetupError):
    """The run cannot start; raised on the driver before any worker starts."""


# ---------------------------------------------------------------------------------------------
# Driver side


def check_setup(cfg: PretrainConfig, manifest: dict[str, Any], tokenizer: Any) -> list[str]:
    """Everything that can be known to be wrong before Ray Train starts, as one list."""
    problems = []
    fp = models.tokenizer_fingerprint(tokenizer)
    if fp != manifest["tokenizer"]["fingerprint"]:
        problems.append(
            f"the tokenizer of model {cfg.model!r} (fingerprint {fp}) does not match the one the data was "
            f"prepared with ({manifest['tokenizer']['name']!r}); prepare again with --model {cfg.model}"
        )
    if tokenizer.mask_token_id is None:
        problems.append(f"the tokenizer of {cfg.model!r} has no mask token; masked-LM needs one")
    if cfg.whole_word_masking and not any(t.startswith("##") for t in tokenizer.get_vocab()):
        problems.append("whole_word_masking needs a WordPiece vocabulary ('##' pieces); this one has none")
    splits = manifest.get("splits", {})
    rows = sum(splits.get(s, {}).get("rows_written", 0) for s in cfg.split_names)
    if rows == 0:
        problems.append(
            f"splits {cfg.splits!r} of {cfg.data} have no rows (the prepared splits: {sorted(splits)})"
        )
    return problems


def run(cfg: PretrainConfig) -> dict[str, Any]:
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bertjob import train
    from bertjob.cluster import init_ray

    started = time.time()
    cfg = dataclasses.replace(cfg, data=for_workers(cfg.data), model=for_workers(cfg.model))
    manifest = train.read_manifest(cfg.data)
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    problems = check_setup(cfg, manifest, tokenizer)
    if "://" in cfg.output:
        problems.append(
            "pretrain output must be a local or mounted directory; put checkpoints on s3:// with --storage-path"
        )
    if problems:
        raise PretrainSetupError("cannot pretrain:\n  - " + "\n  - ".join(problems))
    ensure_output(cfg.output, "pretrain")  # never wiped: it may hold the checkpoints a rerun resumes from
    init_ray()
    if cfg.check_resources:
        from bertjob.cluster import cluster_cpus, cluster_gpus

        plan = train.WorkerPlan(cfg.cpus_per_worker, cfg.batch_size_per_worker, None, None)
        problems = train.check_resources(cfg, plan, cluster_cpus(), cluster_gpus())  # type: ignore[arg-type]
        if problems:
            raise PretrainSetupError("cannot pretrain:\n  - " + "\n  - ".join(problems))

    splits = [s for s in cfg.split_names if manifest["splits"].get(s, {}).get("rows_written", 0) > 0]
    sequences = read_sequences(cfg, manifest, splits)
    n_seq, n_tokens = sequences.count(), int(sequences.sum("length"))
    if n_seq < cfg.num_workers.max:
        raise PretrainSetupError(f"{n_seq} packed sequences cannot feed {cfg.num_workers.max} workers")
    micro_per_epoch = math.ceil((n_seq // cfg.num_workers.max) / cfg.batch_size_per_worker)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.grad_accum_steps))
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    # What packing kept of the text: prepare's token counts are before truncation and include
    # [CLS]/[SEP]; the packed stream has one [SEP] per review (two at a head+tail seam) and one [CLS]
    # per sequence.
    text_tokens = sum(
        manifest["splits"][s]["rows_written"] * (manifest["splits"][s]["tokens"]["mean"] - 2) for s in splits
    )
    rows = sum(manifest["splits"][s]["rows_written"] for s in splits)
    kept = (n_tokens - n_seq - rows) / text_tokens if text_tokens else 1.0
    rule = MaskingRule.of(tokenizer, cfg.mlm_probability, cfg.whole_word_masking)
    meta = {
        "micro_per_epoch": micro_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "pad_token_id": manifest["tokenizer"]["pad_token_id"] or 0,
        "masking": dataclasses.asdict(rule),
    }
    log.info(
        "pretrain: %s (%d reviews) -> %d sequences of up to %d tokens (%d tokens; %.0f%% of the reviews' text, "
        "the rest was truncated by prepare at max_length %d); %d workers x %d x %d accumulation = global batch %d; "
        "%d steps/epoch, %d steps",
        "+".join(splits), rows, n_seq, cfg.max_length, n_tokens, 100 * min(kept, 1.0), manifest["max_length"],
        cfg.num_workers.max, cfg.batch_size_per_worker, cfg.grad_accum_steps, cfg.global_batch_size,
        steps_per_epoch, total_steps,
    )  # fmt: skip
    storage = cfg.storage_path or join(cfg.output, "ray_results")
    if "://" not in storage:
        storage = os.path.abspath(storage)
    trainer = TorchTrainer(
        pretrain_loop,
        train_loop_config={"cfg": to_dict(cfg), "meta": meta},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers.max,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": malloc_env()} if cfg.malloc_tuning else None,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),  # the latest N
        ),
        datasets={"train": sequences},
        dataset_config=DataConfig(datasets_to_split=["train"]),  # equally: the same steps on every worker
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise RuntimeError(f"pre-training failed: {train._root_message(err)}") from err
    if result.checkpoint is None:
        raise RuntimeError("pre-training finished without a checkpoint")
    data_stats = {
        "splits": {s: manifest["splits"][s]["rows_written"] for s in splits},
        "sequences": n_seq,
        "tokens": n_tokens,
        "text_kept_fraction": round(min(kept, 1.0), 4),
    }
    return export(cfg, manifest, tokenizer, result.checkpoint, data_stats, time.time() - started, storage)


def read_sequences(cfg: PretrainConfig, manifest: dict[str, Any], splits: list[str]) -> Any:
    """The packed sequences of `splits`, shuffled once (seeded) and held in the object store."""
    import ray.data

    tok = manifest["tokenizer"]
    seam = (
        min(manifest.get("head_tokens", 0), manifest["max_length"] - 2)
        if manifest["truncation"] == "head+tail"
        else 0
    )
    ds = ray.data.read_parquet([join(cfg.data, s) for s in splits]).select_columns(["input_ids", "truncated"])
    ds = ds.map_batches(
        pack_sequences,
        batch_size=PACK_ROWS,
        batch_format="numpy",
        fn_kwargs=dict(
            max_length=cfg.max_length, cls_id=tok["cls_token_id"], sep_id=tok["sep_token_id"], seam_after=seam
        ),
    )
    # Shuffled once so that a resumed epoch sees the same order (each epoch adds a seeded local
    # shuffle); materialized so the workers spend no CPU on Ray Data tasks while they train.
    return ds.random_shuffle(seed=cfg.seed).materialize()


def export(
    cfg: PretrainConfig, manifest: dict[str, Any], tokenizer: Any, checkpoint: Any, data_stats: dict[str, Any],
    wall_s: float, storage: str,
) -> dict[str, Any]:  # fmt: skip
    """OUTPUT/model (AutoModelForMaskedLM with the tokenizer), metrics.json, pretraining_curves.png."""
    model_dir = join(cfg.output, "model")
    with checkpoint.as_directory() as ckpt:
        final = json.loads(open(os.path.join(ckpt, FINAL_FILE)).read())
        if os.path.isdir(model_dir):
            shutil.rmtree(model_dir)
        os.makedirs(model_dir)
        for name in os.listdir(ckpt):
            if name not in (STATE_FILE, FINAL_FILE):
                shutil.copy2(os.path.join(ckpt, name), model_dir)
    keep_pooler(cfg.model, model_dir, cfg.trust_remote_code)
    tokenizer.save_pretrained(model_dir)
    state = final["state"]
    last = [h for h in state["history"] if h["type"] == "train"][-1:]
    provenance = {
        "stage": "pretrain",
        "objective": "masked-lm",
        "pretrained_from": cfg.model,
        "prepared_data": cfg.data,
        **data_stats,
        "max_length": cfg.max_length,
        "mlm_probability": cfg.mlm_probability,
        "whole_word_masking": cfg.whole_word_masking,
        "steps": state["step"],
        "final_mlm_loss": last[0]["loss"] if last else None,
        "tokenizer_fingerprint": manifest["tokenizer"]["fingerprint"],
    }
    write_json(os.path.join(model_dir, PROVENANCE), provenance)
    metrics = {
        **provenance,
        "final_perplexity": last[0]["perplexity"] if last else None,
        "history": state["history"],
        "resumed_at_steps": state["resumed_at_steps"],
        "samples_seen": state["samples_seen"],
        "tokens_seen": state["tokens_seen"],
        "train_time_s": round(state["train_time_s"], 1),
        "train_samples_per_s": round(state["samples_seen"] / state["train_time_s"], 2)
        if state["train_time_s"]
        else None,
        "wall_s": round(wall_s, 1),
        "global_batch_size": cfg.global_batch_size,
        "precision": final.get("precision"),
        "checkpoints": storage,
        "config": to_dict(cfg),
        "prepared": {k: manifest[k] for k in ("max_length", "truncation", "input")},
        "versions": versions(),
    }
    write_json(join(cfg.output, "metrics.json"), metrics)
    plot_curves(state["history"], os.path.join(cfg.output, "pretraining_curves.png"))
    log.info(
        "pretrain: %d steps, MLM loss %s (perplexity %s); model in %s",
        state["step"], f"{metrics['final_mlm_loss']:.4f}" if last else "n/a",
        f"{metrics['final_perplexity']:.2f}" if last else "n/a", model_dir,
    )  # fmt: skip
    return metrics


def keep_pooler(base: str, model_dir: str, trust_remote_code: bool = False) -> None:
    """Carry the base model's pooler into the exported weights.

    A masked-LM model has no pooler, but sequence classification reads [CLS] through it; without
    this, `bertjob train --model OUTPUT/model` would start from a random pooler instead of the
    base model's. The masked-LM model ignores the extra tensors when it loads.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    path = os.path.join(model_dir, "model.safetensors")
    weights = load_file(path)
    anchor = "embeddings.word_embeddings.weight"
    prefix = next((k[: -len(anchor)] for k in weights if k.endswith(anchor)), None)  # "bert." for BERT
    if prefix is None or any(".pooler." in k for k in weights):
        return
    base_model = AutoModel.from_pretrained(models.resolve_model(base), trust_remote_code=trust_remote_code)
    pooler = getattr(base_model, "pooler", None)
    if pooler is None:
        return
    for k, v in pooler.state_dict().items():
        weights[f"{prefix}pooler.{k}"] = v.detach().contiguous()
    save_file(weights, path, metadata={"format": "pt"})


def pretrain_record(model: str) -> dict[str, Any] | None:
    """The pre-training record of a model directory `bertjob pretrain` wrote (None for any other model):
    `bertjob train` copies it into the fine-tuned model's bertjob.json."""
    where = os.path.expanduser(model)
    path = os.path.join(where, PROVENANCE)
    if not os.path.isdir(where) or not exists(path):
        return None
    record = read_json(path)
    return {**record, "model_dir": os.path.abspath(where)} if record.get("stage") == "pretrain" else None


def plot_curves(history: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if h["type"] == "train"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [h["step"] for h in train]
    ax.plot(steps, [h["loss"] for h in train], label="MLM loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked-LM loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["perplexity"] for h in train], "--", label="perplexity", color="tab:red")
    ax2.set_yscale("log")
    ax2.set_ylabel("perplexity (log scale)")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax.set_title("bertjob pretrain (masked-LM)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Worker side


@dataclass
class PretrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps done within `epoch`
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    samples_seen: int = 0  # sequences, all workers
    tokens_seen: int = 0  # real tokens, all workers
    train_time_s: float = 0.0
    resumed_at_steps: list[int] = field(default_factory=list)  # one entry per restart or rerun


def chunks(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    """Lists of n items (the last may be shorter)."""
    it = iter(it)
    while batch := list(itertools.islice(it, n)):
        yield batch


def masked_lm_loss(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the micro-batch's predicted tokens (MaskedLMLoss gives their mean)."""
    return model(**mb).loss * mb["masked_labels"].shape[0]


class PretrainRecipe:
    """Runs on every Ray Train worker: setup() then train() (epochs -> steps), save()/load() side by side."""

    def __init__(self, config: dict[str, Any]):
        import ray.train
        import ray.train.torch

        self.cfg = PretrainConfig(**config["cfg"])
        self.meta = config["meta"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.precision = resolve_precision(self.cfg.mixed_precision, self.device)
        self.masker = Masker(
            MaskingRule(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in self.meta["masking"].items()}
            )
        )
        self.state = PretrainState()
        self.total_steps = self.meta["total_steps"]
        self.warmup_steps = int(self.cfg.warmup_ratio * self.total_steps)

    def setup(self) -> None:
        import ray.train
        import ray.train.torch
        from transformers import AutoModelForMaskedLM

        cfg = self.cfg
        torch_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
        torch.manual_seed(cfg.seed)  # a fresh masked-LM head's initialisation
        # A base model without an MLM head (the embedded MiniLM is a bare BertModel) gets a freshly
        # initialised head; its decoder is tied to the word embeddings, so only the small transform
        # layer and the output bias start from scratch.
        checkpoint = ray.train.get_checkpoint()
        saved = None
        if checkpoint:
            with checkpoint.as_directory() as d:
                model = AutoModelForMaskedLM.from_pretrained(d, trust_remote_code=cfg.trust_remote_code)
                saved = self.load(d)
        else:
            model = AutoModelForMaskedLM.from_pretrained(
                models.resolve_model(cfg.model), trust_remote_code=cfg.trust_remote_code
            )
        self.model = ray.train.torch.prepare_model(MaskedLMLoss(model))
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay, layer_lr_decay=1.0)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.stepper = Stepper(
            self.model, self.optimizer, self.device, self.precision, cfg.max_grad_norm,
            no_sync=getattr(self.model, "no_sync", None), loss_fn=masked_lm_loss,
        )  # fmt: skip
        if saved is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
            if self.stepper.scaler is not None and saved.get("scaler"):
                self.stepper.scaler.load_state_dict(saved["scaler"])
        if self.rank == 0:
            log.info(
                "pretrain worker setup: %d workers on %s, precision %s, global batch %d, GLIBC_TUNABLES=%s",
                self.world, self.device, self.precision, cfg.global_batch_size,
                os.environ.get("GLIBC_TUNABLES", "(unset)"),
            )  # fmt: skip

    def load(self, directory: str) -> dict[str, Any]:
        """Restore what save() wrote (the weights are loaded with from_pretrained beside it): the
        state here, and returned, to apply once the model is wrapped, optimizer, scaler and RNG states."""
        saved = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)
        self.state = PretrainState(**saved["state"])
        self.state.resumed_at_steps.append(self.state.step)
        if self.rank == 0:
            log.info(
                "pretrain: resuming from step %d (epoch %d, step %d in epoch)",
                self.state.step, self.state.epoch + 1, self.state.step_in_epoch,
            )  # fmt: skip
        return saved

    def save(self, final: bool = False) -> None:
        """Checkpoint on rank 0 through ray.train.report (every worker must report)."""
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if self.rank == 0:
                net = self.model.module if hasattr(self.model, "module") else self.model  # DDP
                net.model.save_pretrained(tmp, safe_serialization=True)
                torch.save(
                    {
                        "state": dataclasses.asdict(self.state),
                        "optimizer": self.optimizer.state_dict(),
                        "scaler": self.stepper.scaler.state_dict() if self.stepper.scaler else None,
                    },
                    os.path.join(tmp, STATE_FILE),
                )
                if final:
                    with open(os.path.join(tmp, FINAL_FILE), "w") as f:
                        json.dump({"state": dataclasses.asdict(self.state), "precision": self.precision}, f)
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report({"step": self.state.step, "epoch": self.state.epoch}, checkpoint=ckpt)

    def masked_batch(self, rows: dict[str, Any], micro: int) -> dict[str, torch.Tensor]:
        """Pad, then mask with a generator seeded by (seed, step, micro-batch, rank): a resumed run
        draws the same masks as an uninterrupted one."""
        multiple_of = 8 if self.device.type == "cuda" else 1
        b = collate(rows, self.meta["pad_token_id"], multiple_of, "cpu")
        seed = np.random.SeedSequence([self.cfg.seed, self.state.step, micro, self.rank]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(seed))
        b["input_ids"], labels = self.masker(b["input_ids"], b["attention_mask"], g)
        b.update(sparse_targets(labels))
        return {k: v.to(self.device, non_blocking=True) for k, v in b.items()}

    def train_epoch(self) -> None:
        import ray.train

        cfg, st = self.cfg, self.state
        rows = ray.train.get_dataset_shard("train").iter_batches(
            batch_size=cfg.batch_size_per_worker,
            batch_format="numpy",
            local_shuffle_buffer_size=cfg.batch_size_per_worker * 8,
            local_shuffle_seed=cfg.seed + 1000 * st.epoch + self.rank,
            prefetch_batches=1,
        )
        skip = st.step_in_epoch * cfg.grad_accum_steps  # resume mid-epoch: skip what was trained on
        micro = (b for i, b in enumerate(rows) if skip <= i < self.meta["micro_per_epoch"])
        t0 = window_t = time.time()
        window_masked, window_samples = 0, 0
        for group in chunks(micro, cfg.grad_accum_steps):
            set_lr(self.optimizer, self.base_lrs, lr_factor(st.step, self.total_steps, self.warmup_steps))
            torch.manual_seed(step_seed(cfg.seed, st.step, self.rank))  # dropout: the same after a resume
            batches = [self.masked_batch(b, i) for i, b in enumerate(group)]
            # The mean over this worker's predicted tokens; DDP averages the workers (a tensor's
            # shape is known on the host: no device sync).
            masked = max(1, sum(int(b["masked_labels"].shape[0]) for b in batches))
            self.stepper.step(batches, masked * self.world, st.step, self.world)
            n = sum(len(b["input_ids"]) for b in group) * self.world
            st.tokens_seen += sum(int(b["length"].sum()) for b in group) * self.world  # host side
            st.step, st.step_in_epoch, st.samples_seen = (
                st.step + 1,
                st.step_in_epoch + 1,
                st.samples_seen + n,
            )
            window_masked, window_samples = window_masked + masked, window_samples + n
            if st.step % cfg.log_every_steps == 0 or st.step == self.total_steps:
                if self.stepper.first_nonfinite_step() >= 0:  # reads the device, at log steps only
                    raise NonFiniteLossError(self.stepper.first_nonfinite_step())
                loss_sum, _ = self.stepper.take_stats()
                self.log_progress(
                    loss_sum / window_masked, window_samples / max(time.time() - window_t, 1e-9)
                )
                window_masked, window_samples, window_t = 0, 0, time.time()
            if st.step_in_epoch >= self.meta["steps_per_epoch"] or st.step >= self.total_steps:
                break
            if cfg.checkpoint_every_steps and st.step % cfg.checkpoint_every_steps == 0:
                st.train_time_s += time.time() - t0
                t0 = time.time()
                self.save()
        st.train_time_s += time.time() - t0
        stopped_part_way = st.step >= self.total_steps and st.step_in_epoch < self.meta["steps_per_epoch"]
        if not stopped_part_way:  # max_steps: a rerun with more steps continues this epoch
            st.epoch, st.step_in_epoch = st.epoch + 1, 0

    def log_progress(self, loss: float, rate: float) -> None:
        st = self.state
        lr = self.optimizer.param_groups[-1]["lr"]
        ppl = math.exp(min(loss, 50.0))
        st.history.append(
            {"type": "train", "step": st.step, "epoch": st.epoch, "loss": loss, "perplexity": ppl, "lr": lr, "samples_per_s": rate}
        )  # fmt: skip
        if self.rank == 0:
            eta = (self.total_steps - st.step) * self.cfg.global_batch_size / rate if rate else float("nan")
            log.info(
                "pretrain epoch %d step %d/%d MLM loss %.4f perplexity %.2f lr %.2e %.1f sequences/s ETA %.0fs",
                st.epoch + 1, st.step, self.total_steps, loss, ppl, lr, rate, eta,
            )  # fmt: skip

    def train(self) -> None:
        while self.state.epoch < self.cfg.epochs and self.state.step < self.total_steps:
            self.train_epoch()
            if self.state.step < self.total_steps:
                self.save()
        self.finish()

    def finish(self) -> None:
        self.state.finished = True
        self.save(final=True)


def pretrain_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function."""
    recipe = PretrainRecipe(config)
    recipe.setup()
    recipe.train()
