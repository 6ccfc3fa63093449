"""The pipeline in-process on a local Ray: all four stages, then a rerun that reuses them."""

import dataclasses
import json
import os
import re
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertjob import pipeline, prepare, pretrain, train, training
from bertjob.config import PipelineConfig, Workers, build, to_dict
from bertjob.sources import InputError, open_corpus
from tests.conftest import make_imdb_dir, run_in_session

pytestmark = pytest.mark.integration


def reused(summary: dict) -> dict[str, bool]:
    """What summary.json says of each stage: kept as it was, or run (evaluate and infer said nothing)."""
    return {stage: section["reused"] for stage, section in summary["stages"].items()}


def test_pipeline_runs_every_stage_then_reuses_them(tmp_path, tiny_model_dir, ray_local, caplog):
    corpus = make_imdb_dir(tmp_path / "data", {"train": 40, "test": 20, "unsup": 10}, seed=3)
    settings = {
        "input": str(corpus), "output_dir": str(tmp_path / "out"), "model": tiny_model_dir, "max_length": 32,
        "num_workers": 1, "name": "p", "prepare": {"head_tokens": 8},
        # lr as a `--train.lr 5e-3` flag gives it: text, which summary.json records as the number train read
        "train": {"epochs": 1, "batch_size": 16, "mixed_precision": "off", "lr": "5e-3"},
    }  # fmt: skip
    cfg = build(PipelineConfig, settings)
    first = pipeline.run(cfg)
    # 72 rows in batches of 16: 5 steps, and the advice in the pipeline's flags (it named --epochs)
    assert "Use more data, more --train.epochs or a smaller --train.batch-size" in caplog.text
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["config"]["train"]["lr"] == 5e-3
    assert first["stages"]["prepare"]["rows"] == {"train": 72, "validation": 8, "test": 40, "unsup": 10}
    assert first["stages"]["evaluate"]["rows_scored"] == 40 and first["stages"]["infer"]["rows_scored"] == 10
    assert reused(first) == {"prepare": False, "train": False, "evaluate": False, "infer": False}
    model_mtime = (tmp_path / "out" / "train" / "model" / "model.safetensors").stat().st_mtime
    caplog.clear()
    with caplog.at_level("INFO"):
        second = pipeline.run(cfg)
    assert reused(second) == {"prepare": True, "train": True, "evaluate": True, "infer": True}
    assert "reusing" in caplog.text and "nothing to do" in caplog.text
    assert (tmp_path / "out" / "train" / "model" / "model.safetensors").stat().st_mtime == model_mtime
    assert second["stages"]["evaluate"]["accuracy"] == first["stages"]["evaluate"]["accuracy"]
    assert reused(json.loads((tmp_path / "out" / "summary.json").read_text())) == reused(second)

    # A changed infer setting redoes that stage only (the others are still reused); so do settings of
    # how training runs, not of what it learns (they made a new run, trained from step 0).
    cfg = build(PipelineConfig, {**settings, "num_workers": 2, "infer": {"split": "test"},
                                 "train": {**settings["train"], "log_every_steps": 7, "micro_batch_size": 4}})  # fmt: skip
    caplog.clear()
    with caplog.at_level("INFO"):
        third = pipeline.run(cfg)
    assert "infer: inputs or settings changed" in caplog.text
    assert reused(third) == {"prepare": True, "train": True, "evaluate": True, "infer": False}
    assert third["stages"]["infer"]["rows_scored"] == 40
    assert pq.read_table(tmp_path / "out" / "infer" / "predictions").num_rows == 40

    # The trained model's bertjob.json removed since: reused as it was, it scored text at prepare's
    # defaults; its weights removed, evaluate refused the directory. Now it is exported again from
    # the run's checkpoints, the same model (evaluate and infer have nothing to do), in the driver:
    # it started a worker group (and a local Ray) only to export the last checkpoint, ~45 s.
    model = {f.name: f.read_bytes() for f in (tmp_path / "out" / "train" / "model").iterdir()}
    trained = json.loads((tmp_path / "out" / "train" / "metrics.json").read_text())
    (tmp_path / "out" / "train" / "model" / "bertjob.json").unlink()
    caplog.clear()
    with caplog.at_level("INFO"):
        fourth = pipeline.run(cfg)
    assert "no bertjob.json; exporting the run's model again" in caplog.text
    assert re.search(r"train: run 'p-\w+' has finished its 5 steps; exporting its model again, nothing to train",
                     caplog.text)  # fmt: skip
    assert "optimizer steps" not in caplog.text  # the few-steps warning is for runs that train
    assert reused(fourth) == {"prepare": True, "train": False, "evaluate": True, "infer": True}
    assert {f.name: f.read_bytes() for f in (tmp_path / "out" / "train" / "model").iterdir()} == model
    exported = json.loads((tmp_path / "out" / "train" / "metrics.json").read_text())
    # The record of the run that trained it: no worker group, no resume (nor the micro-batch of the
    # third run's settings, which trained nothing); the config is this command's, as it was.
    assert len(exported["workers_over_time"]) == 1 and exported["micro_batch_size"] == 16
    assert {k: v for k, v in exported.items() if k not in ("wall_s", "config")} == {
        k: v for k, v in trained.items() if k not in ("wall_s", "config")
    }
    assert fourth["stages"]["train"] == first["stages"]["train"]  # the summary's numbers, not reused
    assert caplog.text.count("nothing to do") == 2
    assert fourth["stages"]["evaluate"]["accuracy"] == first["stages"]["evaluate"]["accuracy"]


def test_workers_the_cluster_cannot_hold_are_an_error_before_prepare(tmp_path, tiny_model_dir, ray_local):
    """The train stage's placement check came after prepare had run (hours on a big corpus)."""
    corpus = make_imdb_dir(tmp_path / "data", {"train": 10, "test": 5}, seed=3)
    cfg = build(PipelineConfig, {"input": str(corpus), "output_dir": str(tmp_path / "out"), "model": tiny_model_dir,
                                 "max_length": 32, "num_workers": 3})  # fmt: skip
    with pytest.raises(train.TrainSetupError, match=r"3 worker\(s\) of 1 CPUs each do not fit"):
        pipeline.run(cfg)
    assert not (tmp_path / "out" / "prepared").exists()
    # Sequences too long for the model, at the max_length prepare will use (its section's, if set).
    cfg = dataclasses.replace(cfg, num_workers=Workers(1, 1), prepare={"max_length": 1024})
    with pytest.raises(train.TrainSetupError, match="prepared with max_length 1024, more than model"):
        pipeline.run(cfg)
    assert not (tmp_path / "out" / "prepared").exists()
    # Of the model train starts from, a train section's own (it was the top-level model's)
    short = tmp_path / "short"
    shutil.copytree(tiny_model_dir, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    with pytest.raises(
        train.TrainSetupError, match=f"prepared with max_length 32, more than model {short} has"
    ):
        pipeline.run(dataclasses.replace(cfg, prepare=None, train={"model": str(short)}))
    assert not (tmp_path / "out" / "prepared").exists()
    cfg = dataclasses.replace(cfg, prepare=None, pretrain_stage=True, pretrain={"max_length": 1024})
    with pytest.raises(
        pretrain.PretrainSetupError, match="max_length 1024 packs sequences longer than model"
    ):
        pipeline.run(cfg)
    assert not (tmp_path / "out" / "prepared").exists()


def test_train_s_advice_names_the_flags_the_pipeline_takes(tmp_path, tiny_model_dir, ray_local):
    """A non-finite loss said to lower --lr, a worker killed for memory to give a smaller
    --micro-batch-size: in the pipeline flags it refuses (its are --train.lr, --train.micro-batch-size)."""
    corpus = make_imdb_dir(tmp_path / "data", {"train": 20, "test": 4}, seed=3)
    shared = {"input": str(corpus), "output_dir": str(tmp_path / "out"), "model": tiny_model_dir,
              "max_length": 32, "num_workers": 1, "name": "p"}  # fmt: skip
    huge_lr = {"epochs": 1, "batch_size": 16, "mixed_precision": "off", "lr": 1e20, "warmup_ratio": 0.0}
    with pytest.raises(training.NonFiniteLossError, match=r"step 1; lower --train\.lr, check the data, or try "
                       r"--train\.mixed-precision off$"):  # fmt: skip
        pipeline.run(build(PipelineConfig, {**shared, "train": huge_lr}))
    # As test_train's memory test: a threshold below what the node uses kills the workers as they
    # start (prepare, done above, is reused: no Ray Data task to kill).
    args = [sys.executable, "-m", "bertjob", "pipeline", *(f"--{k.replace('_', '-')}={v}" for k, v in shared.items()),
            "--train.max-failures", "0", "--train.mixed-precision", "off", "--train.batch-size", "16"]  # fmt: skip
    env = {**os.environ, "RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "50"}
    proc = run_in_session(args, timeout=300, env=env)
    last = proc.stderr.strip().splitlines()[-2]
    assert proc.returncode == 1 and last.startswith("bertjob: error: training failed: "), proc.stderr[-3000:]
    assert "where memory ran out, give a smaller --train.micro-batch-size (the same global batch" in last


def test_a_corpus_with_nothing_to_evaluate_or_score_fails_before_any_work(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Without a test split, an unsup split or a corpus to score, the pipeline trained, skipped
    evaluate, then failed to find the test split to score: now one clear error before any work.
    A corpus to score (--infer-input) or an unsup split is the way to run it without evaluate, a
    test split held out of train (--prepare.test-fraction) the way to run it with."""
    rows = [{"text": "great fun" if i % 2 else "awful bore", "label": i % 2} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    settings = {"output_dir": str(tmp_path / "out"), "model": tiny_model_dir, "max_length": 32}
    for corpus in (tmp_path / "train.parquet", make_imdb_dir(tmp_path / "imdb", {"train": 3})):
        cfg = build(PipelineConfig, {**settings, "input": str(corpus)})
        with pytest.raises(InputError, match=r"no test split to evaluate on, nor an unsup split .*train, "
                           r"validation\)\. Hold out part of train as the test split \(--prepare\.test-fraction 0\.2\).*"
                           r"--infer-input CORPUS: the pipeline then runs without evaluate"):  # fmt: skip
            pipeline.run(cfg)
        assert not (tmp_path / "out").exists()  # nothing prepared, nothing trained
    pq.write_table(
        pa.table({"review": ["great fun", "awful bore"], "sentiment": ["pos", "neg"]}), tmp_path / "k.parquet"
    )
    unlabelled = build(
        PipelineConfig,
        {**settings, "input": str(tmp_path / "k.parquet"), "prepare": {"text_column": "review"}},
    )
    with pytest.raises(InputError, match=r"no labels to train on \(no column 'label'; the columns are \['review', "
                       r"'sentiment'\]\); name its label column with --prepare.label-column"):  # fmt: skip
        pipeline.run(unlabelled)
    assert not (tmp_path / "out").exists()
    # A --train.tracking that cannot log: the pipeline prepared (and pre-trained) before train said so.
    tracked = build(PipelineConfig, {**settings, "input": str(tmp_path / "train.parquet"),
                                     "train": {"tracking": "tensorboard"}, "output_dir": "s3://b/out"})  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(pipeline, "check_access", lambda paths: None)  # no bucket: the check comes before
        with pytest.raises(train.TrainSetupError, match="tracking tensorboard writes its event files"):
            pipeline.run(tracked)
    train_only = {**settings, "input": str(tmp_path / "train.parquet")}
    to_score = build(PipelineConfig, {**train_only, "infer_input": str(tmp_path / "train.parquet")})
    written = prepare.splits_written(to_score.stage("prepare"), open_corpus(to_score.input))
    assert written == {"train", "validation"}
    assert list(pipeline.scoring_stages(to_score, {"train", "validation"})) == ["infer"]
    evaluated = build(PipelineConfig, {**train_only, "infer_input": str(tmp_path / "train.parquet"),
                                       "evaluate": {"input": str(tmp_path / "train.parquet")}})  # fmt: skip
    assert list(pipeline.scoring_stages(evaluated, {"train", "validation"})) == ["evaluate", "infer"]
    # the prepared data keeps no text: --infer.include-text gave a text column all null
    with_text = build(
        PipelineConfig, {**train_only, "prepare": {"test_fraction": 0.2}, "infer": {"include_text": True}}
    )
    with pytest.raises(
        InputError, match="the infer stage scores the prepared data, which keeps token ids, not text"
    ):
        pipeline.run(with_text)
    assert not (tmp_path / "out").exists()
    # Text settings of its own for a stage that scores the prepared data: an error after training.
    resized = build(PipelineConfig, {**train_only, "prepare": {"test_fraction": 0.2},
                                     "evaluate": {"max_length": 64, "truncation": "head+tail"}})  # fmt: skip
    with pytest.raises(InputError, match=r"the evaluate stage scores the prepared data, tokenized as prepare "
                       r"was set; its own max_length 64 \(prepare: 32\) would need"):  # fmt: skip
        pipeline.run(resized)
    assert not (tmp_path / "out").exists()
    same = build(PipelineConfig, {**train_only, "evaluate": {"max_length": 32}})  # as prepared: fine
    assert list(pipeline.scoring_stages(same, {"train", "validation", "test"})) == ["evaluate", "infer"]
    text_to_score = build(PipelineConfig, {**train_only, "infer_input": str(tmp_path / "train.parquet"),
                                           "infer": {"include_text": True}})  # fmt: skip
    assert list(pipeline.scoring_stages(text_to_score, {"train", "validation"})) == ["infer"]
    held_out = build(PipelineConfig, {**train_only, "prepare": {"test_fraction": 0.2}})
    splits = prepare.splits_written(held_out.stage("prepare"), open_corpus(held_out.input))
    assert splits == {"train", "validation", "test"}
    assert {k: v.split for k, v in pipeline.scoring_stages(held_out, splits).items()} == {
        "evaluate": "test", "infer": "test"}  # fmt: skip
    # A corpus partitioned by split: its test rows were prepared as train, and trained on.
    pq.write_to_dataset(pa.Table.from_pylist([{**r, "split": ("train", "test")[i % 4 == 0]} for i, r in enumerate(rows)]),
                        tmp_path / "by_split", partition_cols=["split"])  # fmt: skip
    partitioned = build(PipelineConfig, {**settings, "input": str(tmp_path / "by_split")})
    splits = prepare.splits_written(partitioned.stage("prepare"), open_corpus(partitioned.input))
    assert splits == {"train", "validation", "test"}
    assert {k: v.split for k, v in pipeline.scoring_stages(partitioned, splits).items()} == {
        "evaluate": "test", "infer": "test"}  # fmt: skip
    with_unsup = make_imdb_dir(tmp_path / "u", {"train": 3, "unsup": 2})
    unsup = build(PipelineConfig, {**settings, "input": str(with_unsup)})
    splits = prepare.splits_written(unsup.stage("prepare"), open_corpus(unsup.input))
    assert splits == {"train", "validation", "unsup"}
    assert {k: v.split for k, v in pipeline.scoring_stages(unsup, splits).items()} == {"infer": "unsup"}


def test_a_corpus_whose_every_row_is_quarantined_says_so_not_that_it_lacks_a_test_split(
    tmp_path, tiny_model_dir, ray_local, caplog
):
    """Texts all empty or labels all missing: prepare quarantined every row, and the pipeline said
    there was no test split and to hold one out with --prepare.test-fraction 0.2, the flag it had."""
    lines = ["text,label"] + [" ,1" if i % 2 else "great fun," for i in range(10)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "in" / "notes.md").write_text("where the reviews came from\n")
    cfg = build(PipelineConfig, {"input": str(tmp_path / "in"), "output_dir": str(tmp_path / "out"),
                                 "model": tiny_model_dir, "max_length": 32, "prepare": {"test_fraction": 0.2}})  # fmt: skip
    with pytest.raises(InputError, match=r"input .*in: nothing to train on: prepare quarantined all 10 train rows "
                       r"\(empty_text 5, missing_label 5; they are in .*out/prepared/quarantine\)\. Give each row a "
                       r"text and a label"):  # fmt: skip
        pipeline.run(cfg)
    assert not (tmp_path / "out" / "train").exists()
    # the input is opened once: what it says of its files was logged twice
    assert [m for m in caplog.messages if "left out" in m] == [
        f"input {tmp_path / 'in'}: 1 file(s) of no format bertjob reads are left out (notes.md)"
    ]


def test_the_summary_counts_the_rows_prepare_quarantined(capsys):
    """The summary's prepare line gave the rows each split holds, and nothing of those it left out."""
    summary = {
        "output_dir": "out/", "wall_s": 1.0,
        "stages": {"prepare": {"output": "out/prepared", "rows": {"train": 36, "validation": 4},
                               "rows_quarantined": 160, "rows_per_s": 9.0, "reused": False},
                   "train": {"output": "out/train", "best_val_accuracy": 0.5, "test_accuracy": 0.75,
                             "samples_per_s": 12.5, "reused": True}},
    }  # fmt: skip
    pipeline.print_summary(summary)
    out = capsys.readouterr().out
    assert "prepare   train 36, validation 4; 160 quarantined  (9.0 rows/s)" in out
    assert "summary in out/summary.json" in out  # --output-dir out/ gave out//summary.json
    # A reused stage's speed is the earlier run's, which read as this run's
    assert (
        "train     val acc 0.5000, test acc 0.7500  (reused, 12.5 samples/s when it ran)  -> out/train/model"
        in out
    )


def test_a_changed_train_setting_says_it_starts_a_new_run_and_what_happens_to_the_old(tmp_path, monkeypatch):
    """With another --train.epochs the pipeline trained a new run from step 0 and replaced the
    finished run's model without a word (a user expected it extended)."""
    cfg = build(PipelineConfig, {"output_dir": str(tmp_path), "name": "p", "train": {"epochs": 2}})
    t_cfg = dataclasses.replace(cfg.stage("train"), name="p-new")
    assert pipeline._new_run_note(t_cfg, "train", t_cfg.storage_path) is None  # nothing trained yet
    # lr and a local model's path as the run recorded them: resolved, absolute
    earlier = {**to_dict(t_cfg), "name": "p-old", "epochs": 1, "lr": 2e-4}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    t_cfg = dataclasses.replace(t_cfg, model="base")
    earlier["model"] = str(tmp_path / "base")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.json").write_text(json.dumps({"config": earlier}))
    note = pipeline._new_run_note(t_cfg, "train", t_cfg.storage_path)
    assert note.startswith(
        f"train: {tmp_path}/train holds the model of run p-old (epochs 1 -> 2): training run p-new from step 0"
    )
    assert note.endswith(f"checkpoints stay in {tmp_path}/checkpoints")
    # the new run finished before (its model since replaced): it said "resuming" that run, then train
    # said it had finished
    (tmp_path / "s" / "p-new").mkdir(parents=True)
    (tmp_path / "s" / "p-new" / train.SNAPSHOT).write_text(
        json.dumps({"latest_checkpoint_result": {"metrics": {"step": 12, "final": 1}}})
    )
    assert pipeline._new_run_note(t_cfg, "train", str(tmp_path / "s")).startswith(
        f"train: {tmp_path}/train holds the model of run p-old (epochs 1 -> 2): run p-new has finished its 12 steps "
    )
    (tmp_path / "train" / "metrics.json").write_text(json.dumps({"config": {**earlier, "epochs": 2}}))
    assert "(its prepared data, starting model or name differ)" in pipeline._new_run_note(t_cfg, "train", "s")
    (tmp_path / "train" / "metrics.json").write_text(json.dumps({"config": {**earlier, "name": "p-new"}}))
    assert pipeline._new_run_note(t_cfg, "train", "s") is None  # its own model: reused, not new


def test_how_often_a_run_checkpoints_or_whether_it_compiles_is_no_part_of_its_identity():
    """A pipeline rerun after Ctrl-C with --train.checkpoint-every-steps 50 started a new run from step 0.
    --train.compile changes how a step runs, not what it trains: a rerun with it resumes."""
    cfg = build(
        PipelineConfig,
        {"train": {"checkpoint_every_steps": 50, "compile": True}, "pretrain": {"checkpoint_every_steps": 9}},
    )
    base = build(PipelineConfig, {})
    for stage in ("train", "pretrain"):
        assert pipeline._run_settings(cfg.stage(stage)) == pipeline._run_settings(base.stage(stage))


def test_a_stage_given_the_pipeline_file_trains_the_pipeline_s_run(tmp_path, tiny_model_dir):
    """`bertjob train --config PIPELINE_FILE` trained run NAME where the pipeline trains NAME-KEY:
    after an interrupted pipeline it started another run from step 0, after a finished one it
    trained again and replaced the pipeline's model. Now both name the run alike, so either resumes
    it (pretrain too); a stage flag changes the run as the pipeline's --train.KEY does."""
    from bertjob.cli import resolve
    from bertjob.config import read_yaml

    f = tmp_path / "pipe.yaml"
    f.write_text(f"output_dir: {tmp_path / 'out'}\nmodel: {tiny_model_dir}\nname: p\ntrain: {{epochs: 3}}\n")
    assert resolve("train", {"config": str(f)}, {}).name == "p"  # nothing prepared: train says to prepare
    manifest = {"identity": "prepared-data"}
    (tmp_path / "out" / "prepared").mkdir(parents=True)
    (tmp_path / "out" / "prepared" / "manifest.json").write_text(json.dumps(manifest))
    cfg = build(PipelineConfig, read_yaml(str(f)))
    for stage, name in (("train", "p"), ("pretrain", "p-pretrain")):
        key = pipeline._run_key(cfg.stage(stage), manifest)  # as pipeline.run names the stage's run
        assert resolve(stage, {"config": str(f)}, {}).name == f"{name}-{key}"
    longer = build(PipelineConfig, {**read_yaml(str(f)), "train": {"epochs": 4}}).stage("train")
    assert (
        resolve("train", {"config": str(f), "epochs": "4"}, {}).name
        == f"p-{pipeline._run_key(longer, manifest)}"
    )
