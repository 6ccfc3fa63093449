"""Pretrain: within-task masked-LM pre-training (ITPT, Sun et al. 2019) on a prepared directory's own
reviews, before fine-tuning with `bertjob train --model OUTPUT/model`.

    driver: validate (manifest, splits, tokenizer, [MASK]), plan the workers as train does -> pack
            unsup + train shards (never validation or test) into max_length sequences, once per run
            (STORAGE/NAME/packed) -> train.fit (TorchTrainer, fixed or elastic workers) -> export
            OUTPUT/model (AutoModelForMaskedLM + tokenizer), metrics.json (MLM loss and perplexity
            curve, workers over time), pretraining_curves.png
    worker: PretrainRecipe: setup / train_epoch / train_step / save beside load; each step takes the
            next global batch of the epoch's order (seed, epoch), masked as a whole with (seed, step),
            and this worker's share of it: the same run whatever the number of workers.

Sequences come from the prepared shards, not from the raw corpus: one tokenize path, and the
validation rows prepare carved out of train are already elsewhere. The cost is the middle of
reviews prepare truncated (head+tail): ~10% of IMDb's tokens at max_length 512 (see the README).
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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bertjob import models, runlog
from bertjob.config import PretrainConfig, SetupError, to_dict
from bertjob.masking import IGNORE_INDEX, MaskedLMLoss, Masker, MaskingRule, pack_sequences, sparse_targets
from bertjob.outputs import ensure_output, hold, releasing, versions
from bertjob.sources import InputError, prepared_files
from bertjob.storage import exists, filesystem, for_workers, join, read_json, remove, write_json
from bertjob.training import (
    NonFiniteLossError,
    SplitRows,
    Stepper,
    all_workers_sum,
    collate,
    epoch_batches,
    lr_factor,
    make_optimizer,
    resolve_precision,
    set_lr,
    step_seed,
    torch_threads,
    worker_micro_batches,
)

log = logging.getLogger(__name__)

STATE_FILE = "pretrain_state.pt"
FINAL_FILE = "final.json"
PACK_ROWS = 1024  # reviews packed together; only the last sequence of each such batch is short
PACKED_DIR = "packed"  # in the run's directory: the packed sequences, written once per run
PACKED_FILE = "_packed.json"  # written last: the packing is complete (sequences, tokens)
MASK_STREAM = 1  # the masks' random stream, apart from dropout's (training.step_seed)
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
    if problem := models.weights_problem(cfg.model):
        problems.append(problem)
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
    fs, where = filesystem(cfg.data)
    for split in [s for s in cfg.split_names if s in splits]:
        try:
            prepared_files(fs, where, split, manifest)
        except InputError as err:
            problems.append(str(err))
    return problems


def positions_problems(cfg: PretrainConfig, model_config: dict[str, Any]) -> list[str]:
    """Sequences packed longer than the model has positions for: every worker failed on its first step."""
    positions = models.max_positions(model_config)
    if positions and cfg.max_length > positions:
        return [f"max_length {cfg.max_length} packs sequences longer than model {cfg.model} has positions "
                f"for ({positions}): give --max-length {positions} or less"]  # fmt: skip
    return []


@releasing
def run(cfg: PretrainConfig, in_pipeline: bool = False) -> dict[str, Any]:
    """Run the pretrain job; returns its metrics. `in_pipeline`: as `bertjob pipeline`'s pretrain
    stage, whose advice names its flags as --pretrain.KEY."""
    from ray.train import CheckpointConfig

    from bertjob import train
    from bertjob.cluster import alive_nodes, init_ray

    started = time.time()
    # Every path as the workers open it: an output of `~/run` (a config file's, or quoted) put the
    # checkpoints in ./~/run/ray_results, the model in ~/run.
    cfg = dataclasses.replace(cfg, data=for_workers(cfg.data), model=for_workers(cfg.model),
                              output=for_workers(cfg.output, output=True),
                              storage_path=for_workers(cfg.storage_path, output=True))  # fmt: skip
    manifest = train.read_manifest(cfg.data)
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    problems = check_setup(cfg, manifest, tokenizer)
    model_config = models.model_config(cfg.model, cfg.trust_remote_code)
    problems += positions_problems(cfg, model_config)
    if "://" in cfg.output:
        problems.append(
            "pretrain output must be a local or mounted directory; put checkpoints on s3:// with --storage-path"
        )
    if problems:
        raise PretrainSetupError("cannot pretrain:\n  - " + "\n  - ".join(problems))
    ensure_output(cfg.output, "pretrain")  # never wiped: it may hold the checkpoints a rerun resumes from
    storage = train.run_storage(cfg)
    run_dir = join(storage, cfg.name)
    splits = [s for s in cfg.split_names if manifest["splits"].get(s, {}).get("rows_written", 0) > 0]
    identity = train.run_identity(cfg, manifest, max_length=cfg.max_length, splits=splits,
                                  mlm_probability=cfg.mlm_probability, whole_word_masking=cfg.whole_word_masking)  # fmt: skip
    train.check_run_compatible(cfg, identity, run_dir)
    hold(run_dir)  # another output may name the same checkpoints (--storage-path, --name)
    train.settle_checkpoints(run_dir, "pretrain", STATE_FILE)
    # Driver-only (no Ray Data), and read back once written: a finished run's rerun needs its count.
    packed = pack(cfg, manifest, splits, join(run_dir, PACKED_DIR))
    n_seq, n_tokens = packed["sequences"], packed["tokens"]
    steps_per_epoch = math.ceil(n_seq / cfg.batch_size)
    total_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or math.inf)
    # What packing kept of the text: prepare's token counts are before truncation and include
    # [CLS]/[SEP]; the packed stream has one [SEP] per review (two at a head+tail seam) and one [CLS]
    # per sequence.
    text_tokens = sum(
        manifest["splits"][s]["rows_written"] * (manifest["splits"][s]["tokens"]["mean"] - 2) for s in splits
    )
    rows = sum(manifest["splits"][s]["rows_written"] for s in splits)
    kept = (n_tokens - n_seq - rows) / text_tokens if text_tokens else 1.0
    data_stats = {
        "splits": {s: manifest["splits"][s]["rows_written"] for s in splits},
        "sequences": n_seq,
        "tokens": n_tokens,
        "text_kept_fraction": round(min(kept, 1.0), 4),
    }
    trained = train.latest_checkpoint(run_dir).get("step", 0)
    train.refuse_shorter(cfg, storage, trained, trained, total_steps)  # a pretrain run never stops early
    if finished := finished_checkpoint(run_dir, trained, total_steps):
        # Exported here, with no Ray, as train does: a local Ray (~15 s) and a worker group started
        # only to save the final checkpoint again.
        log.info("pretrain: run %r has finished its %d steps; exporting its model again, nothing to train",
                 cfg.name, total_steps)  # fmt: skip
        return export(cfg, manifest, tokenizer, finished, data_stats, time.time() - started, storage,
                      runlog.timeline(run_dir))  # fmt: skip
    init_ray()
    plan, problems = train.plan_workers(cfg, alive_nodes(), model_config, cfg.max_length)
    if cfg.check_resources:
        problems += train.check_resources(cfg, plan)  # type: ignore[arg-type]
    if problems:
        raise PretrainSetupError("cannot pretrain:\n  - " + "\n  - ".join(problems))
    rule = MaskingRule.of(tokenizer, cfg.mlm_probability, cfg.whole_word_masking)
    share = math.ceil(cfg.batch_size / cfg.num_workers.min)
    meta = {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "micro_batch_size": plan.micro_batch_size,
        "threads": cfg.torch_threads or max(1, int(plan.cpus)),
        "window_rows": train.shuffle_window(n_tokens * 4),  # int32 token ids
        "packed": join(run_dir, PACKED_DIR),
        "run_dir": run_dir,
        "pad_token_id": manifest["tokenizer"]["pad_token_id"] or 0,
        "masking": dataclasses.asdict(rule),
    }
    log.info(
        "pretrain: %s (%d reviews) -> %d sequences of up to %d tokens (%d tokens; %.0f%% of the reviews' text, "
        "the rest was truncated by prepare at max_length %d); global batch %d = %s workers x up to %d "
        "(micro-batches of %d); %d steps/epoch, %d steps; %g CPUs per worker",
        "+".join(splits), rows, n_seq, cfg.max_length, n_tokens, 100 * min(kept, 1.0), manifest["max_length"],
        cfg.batch_size, cfg.num_workers, share, plan.micro_batch_size, steps_per_epoch, total_steps, plan.cpus,
    )  # fmt: skip
    if few := train.few_steps(cfg, f"{n_seq} packed sequences", total_steps, in_pipeline):
        log.warning("pretrain: %s", few)
    result = train.fit(cfg, pretrain_loop, {"cfg": to_dict(cfg), "meta": meta}, plan, storage,
                       CheckpointConfig(num_to_keep=cfg.keep_checkpoints), "pre-training", in_pipeline)  # the latest N  # fmt: skip
    if result.checkpoint is None:
        raise RuntimeError("pre-training finished without a checkpoint")
    return export(cfg, manifest, tokenizer, result.checkpoint, data_stats, time.time() - started, storage,
                  runlog.timeline(run_dir))  # fmt: skip


def finished_checkpoint(run_dir: str, trained: int, total_steps: int) -> Any | None:
    """The final checkpoint of a run that has `trained` the `total_steps` asked for, else None (one
    that adds steps trains them, one that asks for fewer is refused before; only the last save of
    a run holds FINAL_FILE)."""
    from bertjob import train

    if trained != total_steps:
        return None
    name = train.read_snapshot(run_dir)["latest_checkpoint_result"]["checkpoint_dir_name"]
    return train.saved_checkpoint(run_dir) if exists(join(run_dir, name, FINAL_FILE)) else None


def pack(cfg: PretrainConfig, manifest: dict[str, Any], splits: list[str], where: str) -> dict[str, Any]:
    """The packed sequences of `splits` as Parquet shards in `where` (in the run's directory), written
    once per run: every restart and rerun trains on the same sequences in the same places, so that
    the data order (a function of seed and epoch over their positions) is the run's own. One shard
    per prepared shard, read and written in file order by the driver (no Ray Data: deterministic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = join(where, PACKED_FILE)
    if exists(done):
        return read_json(done)
    remove(where)  # an earlier attempt's partial packing
    tok = manifest["tokenizer"]
    seam = (
        min(manifest.get("head_tokens", 0), manifest["max_length"] - 2)
        if manifest["truncation"] == "head+tail"
        else 0
    )
    out_fs, out = filesystem(where)
    out_fs.create_dir(out, recursive=True)
    sequences = tokens = 0
    in_fs, data = filesystem(cfg.data)
    for split in splits:
        for i, f in enumerate(prepared_files(in_fs, data, split, manifest)):
            reader = pq.ParquetFile(f, filesystem=in_fs)
            chunks = [
                pack_sequences(
                    {k: b.column(k).to_numpy(zero_copy_only=False) for k in ("input_ids", "truncated")},
                    cfg.max_length,
                    tok["cls_token_id"],
                    tok["sep_token_id"],
                    seam,
                )  # fmt: skip
                for b in reader.iter_batches(PACK_ROWS, columns=["input_ids", "truncated"])
            ]
            seqs = [q for c in chunks for q in c["input_ids"]]
            lengths = np.array([len(q) for q in seqs], dtype=np.int32)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            values = np.concatenate(seqs) if seqs else np.zeros(0, np.int32)
            table = pa.table({"input_ids": pa.ListArray.from_arrays(offsets, values), "length": lengths})
            pq.write_table(table, f"{out}/{split}-{i:05d}.parquet", filesystem=out_fs)
            sequences, tokens = sequences + len(lengths), tokens + int(lengths.sum())
    record = {"splits": splits, "sequences": sequences, "tokens": tokens}
    write_json(done, record)
    return record


def export(
    cfg: PretrainConfig, manifest: dict[str, Any], tokenizer: Any, checkpoint: Any, data_stats: dict[str, Any],
    wall_s: float, storage: str, events: dict[str, Any],
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
        # Every worker group of the run (count, from which step) and what ended the one before it.
        "workers_over_time": events["workers"],
        "restarts": events["restarts"],
        "placement_retries": events["placement_retries"],
        "samples_seen": state["samples_seen"],
        "tokens_seen": state["tokens_seen"],
        "train_time_s": round(state["train_time_s"], 1),
        "train_samples_per_s": round(state["samples_seen"] / state["train_time_s"], 2)
        if state["train_time_s"]
        else None,
        "wall_s": round(wall_s, 1),
        "global_batch_size": cfg.batch_size,
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
    models.quiet_transformers()  # this runs in the driver: its bar would be lines of the job's log
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


def masked_lm_loss(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the micro-batch's predicted tokens (MaskedLMLoss gives their mean)."""
    return model(**mb).loss * mb["masked_labels"].shape[0]


class PretrainRecipe:
    """The worker side of a pretrain run, as train's Recipe: setup, then steps over the epoch's
    global batches (`training.epoch_batches` over the packed sequences), save() beside load()."""

    def __init__(
        self, cfg: PretrainConfig, meta: dict[str, Any], rank: int, world: int, device: torch.device
    ):
        self.cfg, self.meta, self.rank, self.world, self.device = cfg, meta, rank, world, device
        self.precision = resolve_precision(cfg.mixed_precision, device)
        rule = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["masking"].items()}
        self.masker = Masker(MaskingRule(**rule))
        self.state = PretrainState()
        self.total_steps = meta["total_steps"]
        self.warmup_steps = int(cfg.warmup_ratio * self.total_steps)
        self.multiple_of = 8 if device.type == "cuda" else 1
        self.window = [0, 0, time.time()]  # since the last progress line: sequences, predicted tokens, start

    def setup(self, resume_from: str | None) -> None:
        import ray
        import ray.train.torch  # Ray: DDP wrapping and device placement
        from transformers import AutoModelForMaskedLM

        cfg = self.cfg
        torch_threads(self.meta["threads"])
        models.quiet_transformers()
        models.load_report_on_rank_zero(self.rank)
        torch.manual_seed(cfg.seed)  # a fresh masked-LM head's initialisation
        # A base model without an MLM head (the embedded MiniLM is a bare BertModel) gets a freshly
        # initialised head; its decoder is tied to the word embeddings, so only the small transform
        # layer and the output bias start from scratch.
        source = resume_from or models.resolve_model(cfg.model)
        model = AutoModelForMaskedLM.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        self.model = ray.train.torch.prepare_model(MaskedLMLoss(model))
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay, layer_lr_decay=1.0)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.stepper = Stepper(
            self.model, self.optimizer, self.device, self.precision, cfg.max_grad_norm,
            no_sync=getattr(self.model, "no_sync", None), loss_fn=masked_lm_loss,
        )  # fmt: skip
        if resume_from:
            self.load(resume_from)
        window = self.meta["window_rows"]
        self.rows = SplitRows(self.meta["packed"], cache_rows=2 * window if window else None, labelled=False)
        self.windows = self.rows.windows(window) if window else None
        if self.rank == 0:
            runlog.record(self.meta["run_dir"], "start", workers=self.world, from_step=self.state.step,
                          epoch=self.state.epoch, node=ray.get_runtime_context().get_node_id())  # fmt: skip
            log.info("pretrain worker setup: %d workers on %s, precision %s, global batch %d, GLIBC_TUNABLES=%s",
                     self.world, self.device, self.precision, cfg.batch_size, os.environ.get("GLIBC_TUNABLES", "(unset)"))  # fmt: skip

    # --- checkpoints: save and load, one the mirror of the other ---------------------------------

    def save(self, final: bool = False) -> None:
        """Checkpoint on rank 0 through ray.train.report (every worker must report): the masked-LM
        weights as a Hugging Face directory, beside them the state, optimizer and scaler."""
        import ray.train

        self.stepper.check_finite(self.world)  # never checkpoint NaN weights: a rerun would resume them
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
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"step": self.state.step, "epoch": self.state.epoch}, checkpoint=ckpt)

    def load(self, directory: str) -> None:
        """Restore what save() wrote beside the weights (setup loaded those): state, optimizer, scaler."""
        saved = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)
        self.state = PretrainState(**saved["state"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.stepper.scaler is not None and saved.get("scaler"):
            self.stepper.scaler.load_state_dict(saved["scaler"])
        self.state.resumed_at_steps.append(self.state.step)
        if self.rank == 0:
            log.info("pretrain: resuming at step %d (epoch %d, step %d of it)", self.state.step,
                     self.state.epoch + 1, self.state.step_in_epoch)  # fmt: skip

    # --- training -------------------------------------------------------------------------------

    def train(self) -> None:
        st = self.state
        while st.epoch < self.cfg.epochs and st.step < self.total_steps:
            self.train_epoch()
            if st.step < self.total_steps:
                self.save()
        st.finished = True
        self.save(final=True)

    def train_epoch(self) -> None:
        """The rest of the current epoch (up to total_steps)."""
        cfg, st = self.cfg, self.state
        batches = epoch_batches(self.rows.lengths, cfg.batch_size, cfg.seed, st.epoch, 1, self.windows)
        t0 = time.time()
        for rows in batches[st.step_in_epoch :]:
            self.train_step(rows)
            if st.step >= self.total_steps or st.step_in_epoch == len(batches):
                break
            if cfg.checkpoint_every_steps and st.step % cfg.checkpoint_every_steps == 0:
                st.train_time_s, t0 = st.train_time_s + time.time() - t0, time.time()
                self.save()
        st.train_time_s += time.time() - t0
        if st.step_in_epoch == len(
            batches
        ):  # not stopped part-way by max_steps: a rerun with more continues it
            st.epoch, st.step_in_epoch = st.epoch + 1, 0

    def train_step(self, rows: np.ndarray) -> None:
        """Optimizer step `state.step`: this worker's share of the global batch `rows`, masked."""
        cfg, st = self.cfg, self.state
        set_lr(self.optimizer, self.base_lrs, lr_factor(st.step, self.total_steps, self.warmup_steps))
        torch.manual_seed(step_seed(cfg.seed, st.step, self.rank))  # dropout: the same after a resume
        micro, predicted = self.masked_share(rows)
        # Each predicted token of the global batch weighs 1 / `predicted`: the gradient is their mean
        # whatever the number of workers.
        self.stepper.step(micro, max(1, predicted), st.step, self.world)
        st.tokens_seen += int(self.rows.lengths[rows].sum())  # all workers, counted on the host
        st.step, st.step_in_epoch, st.samples_seen = (
            st.step + 1,
            st.step_in_epoch + 1,
            st.samples_seen + len(rows),
        )
        self.window[:2] = [self.window[0] + len(rows), self.window[1] + predicted]
        if st.step % cfg.log_every_steps == 0 or st.step == self.total_steps:
            self.stepper.check_finite(self.world)  # reads the device: at log steps only
            self.log_progress()

    def masked_share(self, rows: np.ndarray) -> tuple[list[dict[str, torch.Tensor]], int]:
        """The global batch `rows` masked as a whole with a generator seeded by (seed, step), so the
        masks do not depend on the number of workers or on a restart; returns this worker's micro-
        batches of it and the batch's count of predicted tokens (known to every worker: no sync)."""
        batch = collate(self.rows.take(rows), self.meta["pad_token_id"], self.multiple_of)
        seed = np.random.SeedSequence([self.cfg.seed, self.state.step], spawn_key=(MASK_STREAM,))
        ids, labels = self.masker(
            batch["input_ids"], batch["attention_mask"], torch.Generator().manual_seed(int(seed.generate_state(1)[0]))
        )  # fmt: skip
        lengths, m, out = self.rows.lengths[rows], self.multiple_of, []
        for part in worker_micro_batches(
            np.arange(len(rows)), self.rank, self.world, self.meta["micro_batch_size"]
        ):
            empty = not len(part)  # a short last batch left this worker nothing: one row predicting nothing
            part = part if not empty else np.arange(1)
            width = min(-(-int(lengths[part].max()) // m) * m, ids.shape[1])
            mb_labels = labels[part, :width] if not empty else torch.full((1, width), IGNORE_INDEX)
            mb = {"input_ids": ids[part, :width], "attention_mask": batch["attention_mask"][part, :width],
                  **sparse_targets(mb_labels)}  # fmt: skip
            out.append({k: v.to(self.device, non_blocking=True) for k, v in mb.items()})
        return out, int((labels != IGNORE_INDEX).sum())

    def log_progress(self) -> None:
        st, (sequences, predicted, t0) = self.state, self.window
        loss_sum, _ = self.stepper.take_stats()
        loss = all_workers_sum(loss_sum, self.device, self.world) / max(1, predicted)
        rate = sequences / max(time.time() - t0, 1e-9)
        lr = self.optimizer.param_groups[-1]["lr"]
        ppl = math.exp(min(loss, 50.0))
        st.history.append(
            {"type": "train", "step": st.step, "epoch": st.epoch, "loss": loss, "perplexity": ppl, "lr": lr, "samples_per_s": rate}
        )  # fmt: skip
        if self.rank == 0:
            eta = (self.total_steps - st.step) * self.cfg.batch_size / rate if rate else float("nan")
            log.info(
                "pretrain epoch %d step %d/%d MLM loss %.4f perplexity %.2f lr %.2e %.1f sequences/s ETA %.0fs",
                st.epoch + 1, st.step, self.total_steps, loss, ppl, lr, rate, eta,
            )  # fmt: skip
        self.window = [0, 0, time.time()]


def pretrain_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train  # Ray: this worker's place in the group, its device, the checkpoint to resume
    import ray.train.torch

    ctx = ray.train.get_context()
    recipe = PretrainRecipe(PretrainConfig(**config["cfg"]), config["meta"], ctx.get_world_rank(),
                            ctx.get_world_size(), ray.train.torch.get_device())  # fmt: skip
    resume = ray.train.get_checkpoint()
    with resume.as_directory() if resume else contextlib.nullcontext() as path:
        recipe.setup(path)
    try:
        recipe.train()
    except NonFiniteLossError as err:
        from bertjob import train

        train.leave_nonfinite(recipe.meta["run_dir"], recipe.rank, err.step)
