"""The training step and its parts, in plain PyTorch (no Ray): collate, optimizer, schedule,
precision, one optimizer step, evaluation, and the checkpointed training state.

`bertjob.train` runs these inside Ray Train workers; `bench/` and the GPU check run them alone.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from bertjob.config import JobError, stage_flag

# ---------------------------------------------------------------------------------------------
# Batches


def ragged(input_ids: Any, lengths: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(the rows' token ids end to end, each row's length) of a column of token-id rows, without a
    Python loop over rows: a pyarrow list array (the predictor's batches), a numpy array of rows
    (Ray Data's numpy batches) or a 2-D array (rows of one length)."""
    if isinstance(input_ids, pa.ChunkedArray):
        input_ids = input_ids.combine_chunks()
    if isinstance(input_ids, (pa.ListArray, pa.LargeListArray)):
        offsets = input_ids.offsets.to_numpy()  # into .values, which a slice shares with its parent
        values = input_ids.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
        return values, np.diff(offsets).astype(np.int64)
    if isinstance(input_ids, np.ndarray) and input_ids.dtype != object and input_ids.ndim == 2:
        return input_ids.reshape(-1), np.full(len(input_ids), input_ids.shape[1], dtype=np.int64)
    if lengths is None:
        lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
    values = np.concatenate(input_ids) if len(input_ids) else np.zeros(0, dtype=np.int64)
    return values, np.asarray(lengths, dtype=np.int64)


def row_lengths(batch: dict[str, Any]) -> np.ndarray:
    """Token count of each row of a host-side batch (its `length` column when it has one)."""
    if "length" in batch:
        return np.asarray(batch["length"], dtype=np.int64)
    return ragged(batch["input_ids"])[1]


def collate(
    batch: dict[str, Any], pad_id: int, multiple_of: int = 1, device: Any = "cpu"
) -> dict[str, torch.Tensor]:
    """Dynamic padding, shared by training and the predictor: pad to the longest sequence in the
    batch (rounded up to `multiple_of`), in one masked assignment rather than a copy per row."""
    values, lengths = ragged(batch["input_ids"], batch.get("length"))
    width = max(int(lengths.max()) if len(lengths) else 0, 1)
    if multiple_of > 1:
        width = int(math.ceil(width / multiple_of) * multiple_of)
    mask = np.arange(width) < lengths[:, None]
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    ids[mask] = values  # row-major: each row's tokens, then the next row's
    out = {
        "input_ids": torch.from_numpy(ids).to(device, non_blocking=True),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)).to(device, non_blocking=True),
    }
    if "label" in batch:
        out["labels"] = torch.as_tensor(np.asarray(batch["label"], dtype=np.int64)).to(
            device, non_blocking=True
        )
    return out


# ---------------------------------------------------------------------------------------------
# Memory

# glibc's malloc hands big blocks (an attention map is tens of MB) back to the kernel when they are
# freed and page-faults them in again, zeroed, on the next step: on CPU that was a quarter of a
# training step's time (~500k minor faults per step). Without mmap, without trimming and with one
# arena (a thread's own heaps are unmapped whenever they empty), freed memory is reused instead; the
# process keeps its peak. Read by the dynamic loader, so it must be in a process's environment when
# it starts: Ray Train workers get it through their runtime env.
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296:glibc.malloc.arena_max=1"


def malloc_env() -> dict[str, str]:
    """Environment for a training process: the tunables above, on Linux, unless the user set their own."""
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ:
        return {}
    return {"GLIBC_TUNABLES": MALLOC_TUNABLES}


# ---------------------------------------------------------------------------------------------
# Precision


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """AMX or AVX-512 BF16 make bf16 autocast fast on CPU; elsewhere it is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def resolve_precision(setting: str, device: torch.device) -> str:
    """auto -> bf16 on GPUs that have it, fp16 on older GPUs, bf16 on CPUs with AMX/AVX512-BF16, else off."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "off"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule


def _layer_index(name: str, num_layers: int) -> int:
    """Depth of a parameter: embeddings 0, encoder layer i -> i + 1, everything above -> num_layers + 1."""
    if "embeddings" in name:
        return 0
    m = re.search(r"\.layer\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1


def param_groups(
    model: torch.nn.Module, lr: float, weight_decay: float, layer_lr_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases and LayerNorm; lr * decay**(depth from the top) per layer.

    Layer-wise decay after Sun et al. 2019 (0.95 with lr 2e-5 gave 94.6% on IMDb with BERT-base).
    """
    model = getattr(model, "module", model)  # DDP wraps the model; its config is on the inside
    config = getattr(model, "config", None)
    num_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = _layer_index(name, num_layers)
        no_decay = p.ndim == 1 or name.endswith(".bias") or "LayerNorm" in name or "layer_norm" in name
        key = (depth, no_decay)
        if key not in groups:
            scale = layer_lr_decay ** (num_layers + 1 - depth)
            groups[key] = {"params": [], "lr": lr * scale, "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, layer_lr_decay: float
) -> torch.optim.Optimizer:
    groups = param_groups(model, lr, weight_decay, layer_lr_decay)
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then linear decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor


# ---------------------------------------------------------------------------------------------
# The step

IGNORE = -100  # label of a row that only fills a worker's empty micro-batch: it weighs nothing


class NonFiniteLossError(JobError):
    """The loss or the gradients became NaN/inf: a problem with the data or the settings, not a
    fault to retry."""

    def __init__(self, step: int, stage: str = "train", in_pipeline: bool = False):
        self.step = step
        lr, precision = (stage_flag(stage, key, in_pipeline) for key in ("lr", "mixed_precision"))
        super().__init__(
            f"the loss or the gradient norm became NaN/inf at optimizer step {step}; "
            f"lower {lr}, check the data, or try {precision} off"
        )


def classification_loss(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy of a micro-batch's rows (fill-in rows labelled IGNORE weigh nothing)."""
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits.float(), mb["labels"], reduction="sum", ignore_index=IGNORE
    )


@dataclass
class Stepper:
    """One optimizer step over a worker's micro-batches of a global batch, with mixed precision
    and clipping. Loss and gradient norm stay on the device until `take_stats` reads them (at log
    steps), so a GPU step never waits for the host. `loss_fn(model, micro_batch)` sums the loss of
    the micro-batch's units (rows for classification, predicted tokens for masked-LM)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str = "off"
    max_grad_norm: float = 1.0
    scaler: Any = None
    no_sync: Any = None  # DDP's model.no_sync, to skip all-reduce on accumulation micro-batches
    loss_fn: Any = classification_loss

    def __post_init__(self) -> None:
        if self.precision == "fp16" and self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type)
        self._sums = torch.zeros(2, device=self.device)  # summed loss of this worker's rows, grad norms
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)

    def step(
        self, micro_batches: list[dict[str, torch.Tensor]], batch_rows: int, step_no: int, world: int = 1
    ) -> None:
        """`micro_batches` are this worker's share of a global batch of `batch_rows` rows.

        Each row's loss weighs world / batch_rows and DDP averages the workers' gradients, so the
        gradient is the mean over the global batch, however many workers and micro-batches share
        it: the same weights whatever num_workers (up to float rounding)."""
        self.model.train()
        weight = world / batch_rows
        loss_sum = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last or self.no_sync is None else self.no_sync():
                with autocast(self.precision, self.device):
                    ce = self.loss_fn(self.model, mb)
                loss = ce * weight
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += ce.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        )
        # fp16: inf gradients are the scaler's business (it skips the step and lowers the scale).
        finite = torch.isfinite(loss_sum) if self.scaler else torch.isfinite(loss_sum) & torch.isfinite(norm)
        self._first_bad.masked_fill_(~finite & (self._first_bad < 0), step_no)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sums += torch.stack([loss_sum, norm.float()])

    def take_stats(self) -> tuple[float, float]:
        """(summed loss of this worker's rows, summed gradient norm) since the last call; reads the device."""
        loss_sum, norm_sum = self._sums.tolist()
        self._sums.zero_()
        return loss_sum, norm_sum

    def first_nonfinite_step(self) -> int:
        """The first step whose loss or gradient norm was NaN/inf, or -1; reads the device."""
        return int(self._first_bad)

    def check_finite(self, world: int = 1) -> None:
        """NonFiniteLossError at the first step whose loss or gradient norm was NaN/inf on any
        worker; reads the device, and is a collective when `world` > 1 (every worker calls it)."""
        bad = self._first_bad.clone()
        if world > 1:  # a NaN loss on one worker only (fp16) must stop them all
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if int(bad) >= 0:
            raise NonFiniteLossError(int(bad))


# ---------------------------------------------------------------------------------------------
# Data order: which rows train in which step


def epoch_batches(
    lengths: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    length_grouping: int = 1,
    windows: list[tuple[int, int]] | None = None,
) -> list[np.ndarray]:
    """The epoch's global batches as arrays of row indices: a function of the split, (seed, epoch)
    and the settings only, never of how many workers read it or how often the run restarted.

    Rows are shuffled (a streamed split in `windows` of consecutive rows: the windows in a random
    order, rows shuffled within each); each run of `length_grouping` batches' worth of rows is
    sorted by length and cut into batches, which go in a random order within the run. With dynamic
    padding a batch costs its longest row: neighbours in length waste little (random IMDb batches
    at max_length 256 are ~25% padding). Every row is in one batch; only the last may be short.
    """
    rng = np.random.default_rng([seed, epoch])
    windows = windows or [(0, len(lengths))]
    order = np.concatenate(
        [
            windows[w][0] + rng.permutation(windows[w][1] - windows[w][0])
            for w in rng.permutation(len(windows))
        ]
    )
    span = batch_size * length_grouping
    batches: list[np.ndarray] = []
    for i in range(0, len(order), span):
        run = order[i : i + span]
        run = run[np.argsort(lengths[run], kind="stable")]
        full = len(run) // batch_size
        cuts = [run[j * batch_size : (j + 1) * batch_size] for j in range(full)]
        batches += [cuts[j] for j in rng.permutation(full)]
        if len(run) % batch_size:
            batches.append(run[full * batch_size :])
    return batches


def worker_micro_batches(batch: np.ndarray, rank: int, world: int, micro_batch_size: int) -> list[np.ndarray]:
    """Worker `rank`'s share of a global batch, cut into micro-batches for gradient accumulation.

    Every worker gets the same number of micro-batches (DDP all-reduces on the last one); a share
    smaller than that count (a short last batch) leaves some empty, to be filled with IGNORE rows."""
    shares = np.array_split(batch, world)
    accumulate = max(1, math.ceil(len(shares[0]) / micro_batch_size))
    return np.array_split(shares[rank], accumulate)


def all_workers_sum(value: float, device: torch.device, world: int) -> float:
    """`value` summed over the worker group (a collective: every worker calls it, at log steps)."""
    total = torch.tensor([value], dtype=torch.float64, device=device)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
    return float(total[0])


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one worker's step (dropout masks): restored by knowing the step alone."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class SplitRows:
    """A prepared split's rows by index, read straight from its Parquet shards (no Ray Data):
    length and label of every row up front, token ids a shard at a time, keeping at most
    `cache_rows` rows' worth of shards in memory (None: all). `names`: the shards in `split_dir`,
    in order (a prepared split's, as the driver checked them against its manifest); None: every
    .parquet file there, by name. Unlabelled rows (pretrain's packed sequences) have no label column."""

    def __init__(
        self,
        split_dir: str,
        cache_rows: int | None = None,
        labelled: bool = True,
        names: list[str] | None = None,
    ):
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        from bertjob.storage import filesystem

        self._fs, where = filesystem(split_dir)
        if names is None:
            infos = self._fs.get_file_info(pafs.FileSelector(where))
            names = sorted(os.path.basename(i.path) for i in infos if i.path.endswith(".parquet"))
        self.files = [f"{where}/{name}" for name in names]
        columns = ["length", "label"] if labelled else ["length"]
        tables = [pq.read_table(f, columns=columns, filesystem=self._fs) for f in self.files]
        self.offsets = np.cumsum([0] + [t.num_rows for t in tables])
        self.lengths = np.concatenate([t["length"].to_numpy() for t in tables]).astype(np.int64)
        self.labels = (
            np.concatenate([t["label"].to_numpy() for t in tables]).astype(np.int64) if labelled else None
        )
        self.cache_rows = cache_rows
        self._shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # shard -> (token values, offsets)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def windows(self, rows_per_window: int) -> list[tuple[int, int]]:
        """Consecutive shards grouped into windows of at least `rows_per_window` rows."""
        out, start = [], 0
        for end in self.offsets[1:]:
            if end - start >= rows_per_window or end == self.offsets[-1]:
                out.append((start, int(end)))
                start = int(end)
        return out

    def _shard(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        import pyarrow.parquet as pq

        if s not in self._shards:
            col = pq.read_table(self.files[s], columns=["input_ids"], filesystem=self._fs)["input_ids"]
            arr = col.combine_chunks()
            self._shards[s] = (arr.values.to_numpy(), arr.offsets.to_numpy())
            while (
                self.cache_rows is not None
                and len(self._shards) > 1
                and sum(int(self.offsets[k + 1] - self.offsets[k]) for k in self._shards) > self.cache_rows
            ):
                del self._shards[next(iter(self._shards))]  # oldest first
        return self._shards[s]

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The rows (split positions) as a host batch: input_ids (arrays), length, label."""
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        ids = np.empty(len(rows), dtype=object)
        for s in np.unique(shard_of):
            values, offs = self._shard(int(s))
            for i in np.nonzero(shard_of == s)[0]:
                local = rows[i] - self.offsets[s]
                ids[i] = values[offs[local] : offs[local + 1]]
        batch = {"input_ids": ids, "length": self.lengths[rows]}
        return batch if self.labels is None else {**batch, "label": self.labels[rows]}


@torch.inference_mode()
def predict_batches(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, precision: str
) -> tuple[np.ndarray, np.ndarray, float]:
    """Positive-class probabilities, labels and summed loss over batches."""
    model.eval()
    probs, labels, loss_sum = [], [], 0.0
    for b in batches:
        with autocast(precision, device):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        logits = out.logits.float()
        if "labels" in b:
            loss_sum += float(torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
            labels.append(b["labels"].cpu().numpy())
        probs.append(torch.softmax(logits, dim=-1)[:, 1].cpu().numpy())
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    return cat(probs, np.float32), cat(labels, np.int64), loss_sum


def torch_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)
