"""A training checkpoint: what `save` writes, `load` restores (plain PyTorch, no Ray).

    DIR/model.safetensors, config.json   the latest weights (a Hugging Face model directory)
    DIR/training_state.pt                TrainState, optimizer, grad scaler
    DIR/best_model/                      the best weights so far, when they are not the latest
    DIR/final.json                       only in a finished run's last checkpoint: its results

The learning-rate schedule is a pure function of (step, TrainState.schedule_start, total steps) and
each step's random numbers of (seed, step, rank) (`training.step_seed`), so the step restores both.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: infer's driver reads STATE_FILE without torch
    import torch

STATE_FILE = "training_state.pt"
BEST_DIR = "best_model"
FINAL_FILE = "final.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done; global batch `step` of the order is the next one to train
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps done within `epoch`
    schedule_start: int = (
        0  # step where the lr schedule (warm-up, decay) began: 0, or where a finished run was extended
    )
    best_val_accuracy: float = -1.0
    best_val_loss: float = float("inf")
    best_epoch: int = -1
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    planned_steps: int = 0  # the steps the run was asked for when it finished (fewer trained: stopped early)
    samples_seen: int = 0
    tokens_seen: int = 0  # real tokens trained on, all workers
    padded_tokens_seen: int = 0  # the same plus their batches' padding
    train_time_s: float = 0.0
    resumed_at_steps: list[int] = field(default_factory=list)  # one entry per restart or rerun


def save(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    state: TrainState,
    best: dict[str, torch.Tensor] | None,
    best_is_current: bool = False,
    final: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint of the (unwrapped) `model` to the directory `path`.

    `best`: the best weights so far (None: no evaluation yet); not written again when they are
    the current weights (`best_is_current`)."""
    import torch

    model.save_pretrained(path, safe_serialization=True)
    if best is not None and not best_is_current:
        save_weights(model.config, best, os.path.join(path, BEST_DIR))
    torch.save(
        {
            "state": dataclasses.asdict(state),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "best_is_current": best is not None and best_is_current,
        },
        os.path.join(path, STATE_FILE),
    )
    if final is not None:
        with open(os.path.join(path, FINAL_FILE), "w") as f:
            json.dump({**final, "state": dataclasses.asdict(state)}, f, default=float)


def load(
    path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any
) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    """Restore what `save` wrote into `model`, `optimizer` and `scaler`; returns (state, best)."""
    import torch
    from safetensors.torch import load_file

    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    saved = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    if scaler is not None and saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])
    state = TrainState(**saved["state"])
    if saved["best_is_current"]:
        best = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    elif os.path.exists(os.path.join(path, BEST_DIR, "model.safetensors")):
        best = load_file(os.path.join(path, BEST_DIR, "model.safetensors"))
    else:
        best = None
    return state, best


def problem(path: str, final: bool, state_file: str = STATE_FILE) -> str | None:
    """What is missing or cut short in the checkpoint `save` (or pretrain's, with its `state_file`)
    wrote to `path` (local or a URI; `final`: a finished train run's last one), None when it is
    whole. A checkpoint Ray Train registered can still lose its files: deleted by hand, or left empty
    by a node that crashed before its disk caught up."""
    import zipfile

    import pyarrow.fs as pafs

    from bertjob.models import safetensors_problem
    from bertjob.storage import filesystem

    fs, where = filesystem(path)
    found = fs.get_file_info(pafs.FileSelector(where, recursive=True, allow_not_found=True))
    sizes = {i.path[len(where) + 1 :]: i.size for i in found if i.type == pafs.FileType.File}
    if not sizes:
        return "it is missing"
    best = f"{BEST_DIR}/model.safetensors"
    wanted = ["config.json", "model.safetensors", state_file, *([FINAL_FILE, best] if final else [])]
    if missing := [name for name in wanted if name not in sizes]:
        return f"it has no {missing[0]}"
    for name in ("model.safetensors", best):
        if name in sizes:
            with fs.open_input_file(f"{where}/{name}") as f:
                if why := safetensors_problem(f, sizes[name]):
                    return f"its {name} {why} (cut short?)"
    try:  # torch.save writes a zip archive, whose directory ends the file
        with fs.open_input_file(f"{where}/{state_file}") as f, zipfile.ZipFile(f):
            pass
    except zipfile.BadZipFile as err:
        return f"its {state_file} is cut short or damaged ({err})"
    for name in (n for n in ("config.json", FINAL_FILE) if n in sizes):
        try:
            with fs.open_input_stream(f"{where}/{name}") as f:
                json.loads(f.read())
        except ValueError as err:
            return f"its {name} is cut short or damaged ({err})"
    return None


def read_final(path: str) -> dict[str, Any]:
    with open(os.path.join(path, FINAL_FILE)) as f:
        return json.load(f)


def save_weights(config: Any, state_dict: dict[str, torch.Tensor], path: str) -> None:
    """`state_dict` as a HF model directory, without touching the live model."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    # Tied weights share storage; safetensors refuses shared tensors, so keep the first name only.
    seen, out = set(), {}
    for k, v in state_dict.items():
        v = v.contiguous()
        key = (v.data_ptr(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            out[k] = v
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
