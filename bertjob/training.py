"""The training step and its parts, in plain PyTorch (no Ray): collate, optimizer, schedule,
precision, one optimizer step, evaluation, and the checkpointed training state.

`bertjob.train` runs these inside Ray Train workers; `bench/` and the GPU check run them alone.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

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


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN/inf; continuing would only waste compute."""


@dataclass
class Stepper:
    """One optimizer step over `grad_accum_steps` micro-batches, with mixed precision and clipping."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str = "off"
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 1
    scaler: Any = None
    no_sync: Any = None  # DDP's model.no_sync, to skip all-reduce on accumulation micro-batches

    def __post_init__(self) -> None:
        if self.precision == "fp16" and self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type)

    def step(self, micro_batches: list[dict[str, torch.Tensor]], step_no: int) -> tuple[float, float]:
        """Returns (mean loss, gradient norm). Raises NonFiniteLossError on NaN/inf (not with fp16,
        whose scaler skips such steps by design)."""
        self.model.train()
        total = 0.0
        n = len(micro_batches)
        for i, mb in enumerate(micro_batches):
            sync = i == n - 1 or self.no_sync is None
            ctx = contextlib.nullcontext() if sync else self.no_sync()
            with ctx:
                with autocast(self.precision, self.device):
                    loss = self.model(**mb).loss / n
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += float(loss.detach())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        )
        norm_value = float(norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if not math.isfinite(norm_value) or not math.isfinite(total):
                raise NonFiniteLossError(
                    f"loss became non-finite at step {step_no} (loss {total}, grad norm {norm_value})"
                )
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, norm_value


def group_by_length(
    groups: Iterable[dict[str, np.ndarray]], batch_size: int, seed: int
) -> Iterator[dict[str, np.ndarray]]:
    """Length-grouped batching: sort each group of rows by length, cut it into batches of
    `batch_size`, and yield those in a seeded random order.

    With dynamic padding a batch costs its longest row times its size; neighbours in length waste
    little (random IMDb batches at max_length 256 are ~25% padding). Every row is still used once.
    """
    rng = np.random.default_rng(seed)
    for group in groups:
        rows = group["input_ids"]
        lengths = np.asarray(group["length"]) if "length" in group else np.array([len(r) for r in rows])
        order = np.argsort(lengths, kind="stable")
        cuts = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for j in rng.permutation(len(cuts)):
            yield {k: v[cuts[j]] for k, v in group.items()}


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


# ---------------------------------------------------------------------------------------------
# Training state (saved in every checkpoint next to model.safetensors)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps done within `epoch`
    best_val_accuracy: float = -1.0
    best_val_loss: float = float("inf")
    best_epoch: int = -1
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    samples_seen: int = 0
    tokens_seen: int = 0  # real tokens trained on, all workers
    padded_tokens_seen: int = 0  # the same plus their batches' padding
    train_time_s: float = 0.0
    resumed_at_steps: list[int] = field(default_factory=list)  # one entry per restart or rerun


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def chunks(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def torch_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)
