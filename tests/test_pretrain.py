"""The pretrain job on a local Ray with 2 CPU workers and a tiny BERT: masked-LM on unsup + train only,
a run stopped by max_steps resumes from its checkpoint, and train -> evaluate start from its model."""

import contextlib
import json
import logging
import os
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from bertjob import infer, pretrain, runlog, train
from bertjob.config import ConfigError, InferConfig, PretrainConfig, TrainConfig, build, to_dict
from bertjob.masking import pack_sequences
from bertjob.training import NonFiniteLossError
from tests.conftest import run_in_session
from tests.test_train import _no_dropout

pytestmark = pytest.mark.integration


def cfg(prepared, out, model, **kw):
    base = dict(data=str(prepared), output=str(out), model=model, num_workers=2, epochs=1, max_length=32,
                batch_size=16, lr=5e-3, log_every_steps=2, name="pt", storage_path=str(out / "ckpt"),
                mixed_precision="off", checkpoint_every_steps=2)  # fmt: skip
    return PretrainConfig(**{**base, **kw})


@contextlib.contextmanager
def warnings_of(logger: str):
    """The warnings `logger` gives meanwhile (caplog sees a test's, not a module fixture's)."""
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger(logger).addHandler(handler)
    try:
        yield said
    finally:
        logging.getLogger(logger).removeHandler(handler)


@pytest.fixture(scope="module")
def pretrained(prepared_small, tiny_model_dir, ray_local, tmp_path_factory):
    """A 2-worker run stopped after 3 steps by max_steps (a checkpoint at step 2, its last at step
    3), then the same run again without the cap on 1 worker; and the same two runs on 2 workers
    both times (the second elastic: 1-2 workers, 2 on this Ray). The model has no dropout: then 1 and 2 workers compute the same gradients."""
    root = tmp_path_factory.mktemp("pretrain")
    model = _no_dropout(tiny_model_dir, root)
    out, same = root / "out", root / "same-workers"
    first = pretrain.run(cfg(prepared_small, out, model, max_steps=3))
    with warnings_of("bertjob.pretrain") as warned:
        second = pretrain.run(cfg(prepared_small, out, model, num_workers=1, checkpoint_every_steps=0))
    pretrain.run(cfg(prepared_small, same, model, max_steps=3, checkpoint_every_steps=0))
    reference = pretrain.run(cfg(prepared_small, same, model, num_workers="1-2", checkpoint_every_steps=0))
    return out, first, second, reference, warned


def test_a_stopped_pretrain_run_resumes_on_fewer_workers_as_if_never_stopped_and_its_loss_falls(
    pretrained, prepared_small
):
    out, first, second, reference, warned = pretrained
    assert first["steps"] == 3 and first["resumed_at_steps"] == []
    assert second["resumed_at_steps"] == [3]  # not from scratch
    assert [w["workers"] for w in second["workers_over_time"]] == [2, 1]
    assert [w["workers"] for w in reference["workers_over_time"]] == [2, 2]
    assert reference["config"]["num_workers"] == [1, 2]
    # every sequence once per epoch: global batches of 16, however many workers
    assert second["steps"] == reference["steps"] == -(-second["sequences"] // 16)
    # so few steps are warned of, as in train (pretrain said nothing)
    assert warned == [f"pretrain: only {second['steps']} optimizer steps ({second['sequences']} packed sequences / "
                      f"batch_size 16 x 1 epochs): masked-LM pre-training a BERT usually needs at least ~100; the "
                      f"model may learn little. Use more data, more --epochs or a smaller --batch-size"]  # fmt: skip
    # The same masked global batches in the same steps on 1 worker as on 2: the same weights.
    a, b = (load_file(d / "model" / "model.safetensors") for d in (out, out.parent / "same-workers"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)  # float rounding only
    loss = [h["loss"] for h in second["history"]]
    assert loss == pytest.approx([h["loss"] for h in reference["history"]], rel=1e-4)
    losses = [h["loss"] for h in second["history"] if h["type"] == "train"]  # all "train" entries
    assert [h["step"] for h in second["history"]][:2] == [2, 3]  # the first run's history carried over
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 0.3
    assert all(h["perplexity"] == pytest.approx(np.exp(h["loss"])) for h in second["history"])
    assert (out / "pretraining_curves.png").stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text())["config"]["name"] == "pt"


def test_pretrain_reads_the_unsup_and_train_splits_only(pretrained, prepared_small):
    _, _, m, _, _ = pretrained
    assert m["splits"] == {"unsup": 30, "train": 180}  # validation (20) and test (80) stay unseen
    # The packed stream (all tokens but each sequence's [CLS]) is exactly that of unsup + train.
    rows = pq.read_table(
        [*(prepared_small / "unsup").glob("*.parquet"), *(prepared_small / "train").glob("*.parquet")]
    )
    manifest = json.loads((prepared_small / "manifest.json").read_text())
    packed = pack_sequences(
        {"input_ids": np.array(rows.column("input_ids").to_pylist(), dtype=object),
         "truncated": rows.column("truncated").to_numpy(zero_copy_only=False)},
        32, manifest["tokenizer"]["cls_token_id"], manifest["tokenizer"]["sep_token_id"], seam_after=16,
    )  # fmt: skip
    assert m["tokens"] - m["sequences"] == int(packed["length"].sum()) - len(packed["length"])
    with pytest.raises(ConfigError, match="never.*validation|must stay unseen"):
        build(PretrainConfig, {"data": "d", "output": "o", "splits": "unsup,validation"})


def test_train_fine_tunes_the_pretrained_model_and_records_where_it_came_from(
    pretrained, prepared_small, tiny_model_dir, tmp_path
):
    import torch
    from transformers import (
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    out, _, m, _, _ = pretrained
    model_dir = out / "model"
    AutoModelForMaskedLM.from_pretrained(model_dir)  # a Hugging Face masked-LM directory ...
    assert AutoTokenizer.from_pretrained(model_dir).mask_token == "[MASK]"  # ... with its tokenizer
    # The classifier starts from the pre-trained encoder and the base model's pooler.
    clf = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    base = AutoModel.from_pretrained(tiny_model_dir)
    assert torch.equal(clf.bert.pooler.dense.weight, base.pooler.dense.weight)
    assert not torch.equal(clf.bert.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)

    run = tmp_path / "train"
    t = train.run(
        TrainConfig(data=str(prepared_small), output=str(run), model=str(model_dir), num_workers=2, epochs=1,
                    batch_size=16, lr=5e-3, name="ft", storage_path=str(run / "ckpt"), mixed_precision="off")
    )  # fmt: skip
    record = json.loads((run / "model" / "bertjob.json").read_text())
    assert record["trained_from"] == str(model_dir)
    assert record["pretraining"]["pretrained_from"] == m["pretrained_from"] == m["config"]["model"]
    assert record["pretraining"]["steps"] == m["steps"] and record["pretraining"]["splits"] == m["splits"]
    e = infer.run(
        InferConfig(input=str(prepared_small), split="test", model=str(run / "model"), output=str(tmp_path / "eval"),
                    num_workers=1),
        evaluate=True,
    )  # fmt: skip
    assert e["rows_scored"] == 80 and e["metrics"]["accuracy"] == pytest.approx(
        t["test"]["accuracy"], abs=0.02
    )


def test_the_export_carries_the_pooler_without_a_progress_bar_in_the_jobs_log(
    tiny_model_dir, tmp_path, capfd
):
    """The driver loads the base model to copy its pooler into the exported masked-LM weights; that
    load put transformers' 'Loading weights' bar into the job's log, as workers' loads did once."""
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)  # no pooler
    capfd.readouterr()
    pretrain.keep_pooler(tiny_model_dir, str(tmp_path))
    assert any(".pooler." in k for k in load_file(tmp_path / "model.safetensors"))
    assert "Loading weights" not in capfd.readouterr().err


def test_setup_problems_are_one_clear_error_before_any_worker_starts(
    prepared_small, tiny_model_dir, tmp_path
):
    with pytest.raises(train.TrainSetupError, match="no manifest.json"):
        pretrain.run(cfg(tmp_path, tmp_path / "o1", "minilm"))
    with pytest.raises(pretrain.PretrainSetupError, match="does not match"):
        pretrain.run(cfg(prepared_small, tmp_path / "o2", "minilm"))
    # packed longer than the model's positions: every worker failed with a tensor size RuntimeError
    with pytest.raises(
        pretrain.PretrainSetupError, match="max_length 1024 packs sequences longer than model"
    ):
        pretrain.run(cfg(prepared_small, tmp_path / "o3", tiny_model_dir, max_length=1024))
    assert not (tmp_path / "o3").exists()


def test_a_rerun_of_a_run_with_other_masking_settings_is_refused(pretrained, prepared_small):
    out, _, m, _, _ = pretrained
    with pytest.raises(train.TrainSetupError, match=r"different run \(mlm_probability: 0.15 -> 0.2\)"):
        pretrain.run(cfg(prepared_small, out, m["config"]["model"], mlm_probability=0.2))


def test_a_rerun_of_a_finished_run_exports_its_model_again_before_ray_starts(
    pretrained, prepared_small, tmp_path
):
    """As train's: the same command again after a finished run started a local Ray (~15 s) and a
    worker group only to save the final checkpoint once more, then exported it."""
    out, _, _, reference, _ = pretrained
    same = out.parent / "same-workers"
    model = {f.name: f.read_bytes() for f in (same / "model").iterdir()}
    c = cfg(prepared_small, same, reference["config"]["model"], num_workers="1-2", checkpoint_every_steps=0)
    (tmp_path / "run.json").write_text(json.dumps(to_dict(c)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = run_in_session([sys.executable, "-m", "bertjob", "pretrain", "--config", str(tmp_path / "run.json")],
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"run 'pt' has finished its {reference['steps']} steps; exporting its model again" in proc.stderr
    assert "local Ray" not in proc.stderr, proc.stderr
    assert {f.name: f.read_bytes() for f in (same / "model").iterdir()} == model
    again = json.loads((same / "metrics.json").read_text())
    assert {k: v for k, v in again.items() if k != "wall_s"} == {
        k: v for k, v in reference.items() if k != "wall_s"
    }


def test_a_shorter_rerun_of_a_finished_run_is_refused_before_ray_starts(pretrained, prepared_small, tmp_path):
    """As train's: `--max-steps 2` (or fewer --epochs) under a finished run's name started a worker
    group that resumed past its end and saved it again, then exported the longer run's model as
    this one's. Now the command ends at once, with one line."""
    out, _, _, reference, _ = pretrained
    shutil.copytree(out.parent / "same-workers" / "ckpt", tmp_path / "ckpt")  # the shared run stays as it is
    c = cfg(prepared_small, tmp_path / "out", reference["config"]["model"], storage_path=str(tmp_path / "ckpt"),
            max_steps=2)  # fmt: skip
    (tmp_path / "run.json").write_text(json.dumps(to_dict(c)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = run_in_session([sys.executable, "-m", "bertjob", "pretrain", "--config", str(tmp_path / "run.json")],
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no Ray started
    assert (
        f"has trained {reference['steps']} steps, a longer run than the 2 steps this one asks for"
        in proc.stderr
    )
    assert not (tmp_path / "out" / "model").exists()


def test_a_non_finite_loss_ends_the_run_once_naming_the_flag_of_the_command(
    prepared_small, tiny_model_dir, ray_local, tmp_path
):
    """As in train: a NaN loss was raised inside the workers, so Ray Train ran the worker group
    again (max_failures times) to fail each time, and the job ended 'pre-training failed: ...
    NonFiniteLossError ...' saying that a rerun resumes, with '--lr' also in `bertjob pipeline`."""
    c = cfg(prepared_small, tmp_path, tiny_model_dir, lr=1e20, warmup_ratio=0.0, max_failures=2, max_steps=4)
    with pytest.raises(NonFiniteLossError, match=r"at optimizer step 1; lower --pretrain.lr, check the data, "
                                                 r"or try --pretrain.mixed-precision off$"):  # fmt: skip
        pretrain.run(c, in_pipeline=True)
    # one worker group: not retried
    assert len(runlog.timeline(str(tmp_path / "ckpt" / "pt"))["workers"]) == 1
