"""The pretrain job on a local Ray with 2 CPU workers and a tiny BERT: masked-LM on unsup + train only,
a run stopped by max_steps resumes from its checkpoint, and train -> evaluate start from its model."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from bertjob import infer, pretrain, train
from bertjob.config import ConfigError, InferConfig, PretrainConfig, TrainConfig, build
from bertjob.masking import pack_sequences

pytestmark = pytest.mark.integration


def cfg(prepared, out, model, **kw):
    base = dict(data=str(prepared), output=str(out), model=model, num_workers=2, epochs=1, max_length=32,
                batch_size_per_worker=8, lr=5e-3, log_every_steps=2, name="pt", storage_path=str(out / "ckpt"),
                mixed_precision="off", checkpoint_every_steps=2)  # fmt: skip
    return PretrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pretrained(prepared_small, tiny_model_dir, ray_local, tmp_path_factory):
    """A run stopped after 3 steps by max_steps (a checkpoint at step 2, its last at step 3), then
    the same run again without the cap; the rerun's own mid-epoch checkpoints (~1.5 s each on 2
    CPUs) are not needed."""
    out = tmp_path_factory.mktemp("pretrain") / "out"
    first = pretrain.run(cfg(prepared_small, out, tiny_model_dir, max_steps=3))
    second = pretrain.run(cfg(prepared_small, out, tiny_model_dir, checkpoint_every_steps=0))
    return out, first, second


def test_a_stopped_pretrain_run_resumes_from_its_checkpoint_and_its_loss_falls(pretrained, prepared_small):
    out, first, second = pretrained
    assert first["steps"] == 3 and first["resumed_at_steps"] == []
    assert second["resumed_at_steps"] == [3]  # not from scratch
    # every sequence once per epoch: the sequences split equally over 2 workers, 8 per micro-batch
    assert second["steps"] == -(-(second["sequences"] // 2) // 8)
    losses = [h["loss"] for h in second["history"] if h["type"] == "train"]
    assert [h["step"] for h in second["history"]][:2] == [2, 3]  # the first run's history carried over
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 0.3
    assert all(h["perplexity"] == pytest.approx(np.exp(h["loss"])) for h in second["history"])
    assert (out / "pretraining_curves.png").stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text())["config"]["name"] == "pt"


def test_pretrain_reads_the_unsup_and_train_splits_only(pretrained, prepared_small):
    _, _, m = pretrained
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

    out, _, m = pretrained
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
    assert record["pretraining"]["pretrained_from"] == tiny_model_dir
    assert record["pretraining"]["steps"] == m["steps"] and record["pretraining"]["splits"] == m["splits"]
    e = infer.run(
        InferConfig(input=str(prepared_small), split="test", model=str(run / "model"), output=str(tmp_path / "eval"),
                    num_workers=1),
        evaluate=True,
    )  # fmt: skip
    assert e["rows_scored"] == 80 and e["metrics"]["accuracy"] == pytest.approx(
        t["test"]["accuracy"], abs=0.02
    )


def test_setup_problems_are_one_clear_error_before_any_worker_starts(prepared_small, tmp_path):
    with pytest.raises(train.TrainSetupError, match="no manifest.json"):
        pretrain.run(cfg(tmp_path, tmp_path / "o1", "minilm"))
    with pytest.raises(pretrain.PretrainSetupError, match="does not match"):
        pretrain.run(cfg(prepared_small, tmp_path / "o2", "minilm"))
