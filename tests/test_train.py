"""The train job on a local Ray with 2 CPU workers and a tiny BERT: model, checkpoints, resume."""

import json
import os
import sys

import pytest

from bertjob import train, training
from bertjob.config import TrainConfig

pytestmark = pytest.mark.integration


def cfg(prepared, out, tiny_model_dir, **kw):
    base = dict(data=str(prepared), output=str(out), model=tiny_model_dir, num_workers=2, epochs=2,
                batch_size_per_worker=8, lr=5e-3, log_every_steps=4, name="t", storage_path=str(out / "ckpt"),
                mixed_precision="off")  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_two_workers_train_and_save_a_model_that_transformers_loads(prepared_small, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    # a randomly initialised tiny BERT: 2 epochs learn the task for some data orders, 3 for all we tried
    m = train.run(
        cfg(prepared_small, out, tiny_model_dir, epochs=3, checkpoint_every_steps=5, keep_checkpoints=1)
    )
    # 180 train rows over 2 workers, 8 per worker: 12 steps per epoch, 3 epochs
    assert m["steps"] == 36 and m["global_batch_size"] == 16
    assert [h["epoch"] for h in m["history"] if h["type"] == "eval"] == [0, 1, 2]
    assert m["test"]["count"] == 80 and m["validation"]["count"] == 20
    assert m["test"]["accuracy"] > 0.9  # the synthetic reviews are easy: the model must have learned
    assert set(m["test"]) >= {"accuracy", "precision", "recall", "f1", "roc_auc", "confusion_matrix"}
    if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
        assert m["worker_glibc_tunables"] == training.MALLOC_TUNABLES  # reached the worker processes
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["best_epoch"] in (0, 1, 2) and saved["config"]["num_workers"] == 2
    assert (out / "training_curves.png").stat().st_size > 1000
    settings = json.loads((out / "model" / "bertjob.json").read_text())
    assert {k: settings[k] for k in ("max_length", "truncation", "head_tokens", "strip_html", "max_chars_per_end")} == {
        "max_length": 64, "truncation": "head+tail", "head_tokens": 16, "strip_html": True, "max_chars_per_end": 1024,
    }  # every text setting training used: infer and evaluate follow them  # fmt: skip
    assert (out / "model" / "model.safetensors").exists()

    from transformers import pipeline

    clf = pipeline("text-classification", model=str(out / "model"), device="cpu")
    preds = clf(["great wonderful superb loved it", "awful terrible boring hated it"])
    assert {p["label"] for p in preds} <= {"POSITIVE", "NEGATIVE"}
    assert preds[0]["label"] == "POSITIVE" and preds[1]["label"] == "NEGATIVE"


def test_a_worker_failure_is_survived_by_resuming_from_the_checkpoint(
    prepared_small, tiny_model_dir, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    marker = tmp_path / "failed-once"
    monkeypatch.setenv("BERTJOB_FAIL_AT_STEP", "7")
    monkeypatch.setenv("BERTJOB_FAIL_MARKER", str(marker))
    m = train.run(
        cfg(
            prepared_small,
            out,
            tiny_model_dir,
            epochs=1,
            checkpoint_every_steps=5,
            max_failures=1,
            malloc_tuning=False,
        )  # fmt: skip
    )
    assert marker.exists(), "the injected failure did not happen"
    assert m["worker_glibc_tunables"] == os.environ.get("GLIBC_TUNABLES", "")  # off: left as it was
    assert m["resumed_at_steps"] == [5]
    assert m["steps"] == 12  # the run finishes with the right number of steps


def test_rerunning_a_finished_run_with_more_epochs_continues_from_its_checkpoint(
    prepared_small, tiny_model_dir, tmp_path
):
    out = tmp_path / "run"
    first = train.run(cfg(prepared_small, out, tiny_model_dir, epochs=1))
    assert first["steps"] == 12 and first["resumed_at_steps"] == []
    second = train.run(cfg(prepared_small, out, tiny_model_dir, epochs=2))
    assert second["resumed_at_steps"] == [12]
    assert second["steps"] == 24
    evals = [h for h in second["history"] if h["type"] == "eval"]
    assert [h["epoch"] for h in evals] == [0, 1]
    assert evals[0] == [h for h in first["history"] if h["type"] == "eval"][0]


def test_setup_problems_are_clear_errors_before_training(prepared_small, tiny_model_dir, tmp_path, ray_local):
    with pytest.raises(train.TrainSetupError, match="no manifest.json"):
        train.run(cfg(tmp_path, tmp_path / "o1", tiny_model_dir))
    with pytest.raises(train.TrainSetupError, match="does not match"):
        train.run(cfg(prepared_small, tmp_path / "o2", "minilm"))
    with pytest.raises(train.TrainSetupError, match="no GPU"):
        train.run(cfg(prepared_small, tmp_path / "o3", tiny_model_dir, use_gpu=True))
    with pytest.raises(train.TrainSetupError, match="need 8 CPUs"):
        train.run(cfg(prepared_small, tmp_path / "o4", tiny_model_dir, num_workers=4, cpus_per_worker=2))
