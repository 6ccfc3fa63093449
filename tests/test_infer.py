"""Infer and evaluate: the predictor without Ray, then end-to-end runs on a local Ray."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bertjob import infer, models
from bertjob.config import InferConfig, SetupError, Workers
from bertjob.models import ModelError
from bertjob.sources import InputError
from tests.conftest import kill_each_try, kill_session, make_imdb_dir, review


def test_predictor_scores_in_input_order_and_flags_bad_rows(tiny_classifier_dir):
    p = infer.Predictor(tiny_classifier_dir, batch_size=2, precision="off")
    texts = ["great " * 50, "awful", None, "  <br /> ", "superb movie", "x " * 5000]
    table = pa.table(
        {"id": [f"r{i}" for i in range(6)], "text": texts, "label": ["1", "0", None, "1", "pos", "neg"]}
    )
    out = p(table)
    assert out.column("id").to_pylist() == [f"r{i}" for i in range(6)]
    assert out.column("reason").to_pylist() == [None, None, "null_text", "empty_text", None, None]
    probs = out.column("prob_positive").to_pylist()
    assert all(0.0 <= probs[i] <= 1.0 for i in (0, 1, 4, 5)) and probs[2] is None
    labels, scores = out.column("label").to_pylist(), out.column("score").to_pylist()
    assert all(
        labels[i] == int(probs[i] >= 0.5) and scores[i] == pytest.approx(max(probs[i], 1 - probs[i]))
        for i in (0, 1, 4, 5)
    )
    assert out.column("true_label").to_pylist() == [1, 0, None, 1, 1, 0]
    # sorting by length inside the batch must not change any row's score
    alone = p(table.slice(4, 1)).column("prob_positive").to_pylist()[0]
    assert alone == pytest.approx(probs[4], abs=1e-5)
    # pre-tokenized rows (a prepared directory) score the same; with include_text their text is null
    tokens = p.tokenize(table).filter(pa.compute.is_null(pa.compute.field("reason")))
    prepared = pa.table({"id": tokens.column("id"), "input_ids": tokens.column("input_ids")})
    assert p.score(p.tokenize(prepared)).column("prob_positive").to_pylist() == pytest.approx(
        [probs[i] for i in (0, 1, 4, 5)], abs=1e-5
    )
    with_text = infer.tokenize_table(prepared, p.encoder, p.text, include_text=True)
    assert with_text.column("text").null_count == 4
    # on CPU, threads > 1 scores several sub-batches at once, each on one core: the same scores
    before = torch.get_num_threads()
    try:
        threaded = infer.Predictor(tiny_classifier_dir, batch_size=2, precision="off", threads=3)
        assert threaded.pool is not None and torch.get_num_threads() == 1
        assert threaded(table).column("prob_positive").to_pylist() == pytest.approx(
            probs, abs=1e-6, nan_ok=True
        )
    finally:
        torch.set_num_threads(before)


def test_models_without_a_head_or_a_tokenizer_are_errors_before_any_work(
    tiny_model_dir, tiny_classifier_dir, tmp_path
):
    assert "classification head" in infer.check_model(tiny_model_dir)[0]
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((open(os.path.join(tiny_classifier_dir, f), "rb")).read())
    assert infer.check_model(str(no_tok))
    with pytest.raises(ModelError):
        infer.run(InferConfig(input="imdb-sample", model=tiny_model_dir, output=str(tmp_path / "o")))


def test_a_model_directory_without_its_weights_whole_or_its_settings_readable_is_an_error_before_any_work(
    tiny_classifier_dir, tmp_path
):
    """Weights deleted, cut short in a copy, or a shard of a sharded checkpoint missing: every
    predictor actor (training worker) failed loading them, ~280 lines of traceback from inside Ray.
    A bertjob.json edited by hand failed with a traceback from json or int()."""
    from bertjob import train
    from bertjob.config import TrainConfig

    d = tmp_path / "m"
    shutil.copytree(tiny_classifier_dir, d)
    weights = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(weights[:-100])
    assert infer.check_model(str(d)) == [
        f"model {d}: model.safetensors holds {len(weights) - 100} bytes, not the {len(weights)} its header "
        f"describes (cut short in a copy?); copy it again"
    ]
    (d / "model.safetensors").unlink()
    assert infer.check_model(str(d)) == [
        f"model {d}: no weights (model.safetensors or pytorch_model.bin); give the train job's OUTPUT/model directory"
    ]
    assert f"model {d}: no weights" in " ".join(
        train.check_setup(TrainConfig(model=str(d)), {"tokenizer": {"fingerprint": "", "name": ""}})
    )
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    assert "no model-00001-of-00002.safetensors, a shard of the weights" in infer.check_model(str(d))[0]
    (d / "model-00001-of-00002.safetensors").write_bytes(weights)
    assert infer.check_model(str(d)) == []
    # bertjob.json edited by hand: a traceback from json or int()
    for text, why in (('{"max_length": 64,', "JSONDecodeError"), ('{"max_length": "x"}', "ValueError"),
                      ('[64]', "TypeError"), ('{"max_length": 64}', "no 'truncation'")):  # fmt: skip
        (d / "bertjob.json").write_text(text)
        with pytest.raises(ModelError, match=rf"model .*: its bertjob.json, the text settings it was trained with, "
                           rf"cannot be read \({why}.*\); restore the one its train run wrote"):  # fmt: skip
            infer.describe(InferConfig(input="imdb-sample", model=str(d), output=str(tmp_path / "o")))


def test_a_config_or_tokenizer_file_cut_short_is_one_line_of_error_before_any_work(
    tiny_classifier_dir, tmp_path, capsys
):
    """A model directory whose config.json or tokenizer.json is not what transformers reads (cut
    short in a copy, edited by hand) failed infer, evaluate, prepare and train with a traceback from
    json (or a KeyError from transformers); now one line naming the file."""
    from bertjob import cli, train
    from bertjob.config import TrainConfig

    manifest = {"tokenizer": {"fingerprint": "", "name": ""}}
    for name, text, why in (("config.json", '{"model_type": "bert",', "its config.json cannot be read"),
                            ("config.json", "[1]", "its config.json holds list"),
                            ("tokenizer.json", '{"version":', "no usable tokenizer files \\(JSONDecodeError"),
                            ("tokenizer.json", "{}", "no usable tokenizer files \\(KeyError")):  # fmt: skip
        d = tmp_path / f"m-{name}-{len(text)}"
        shutil.copytree(tiny_classifier_dir, d)
        (d / name).write_text(text)
        with pytest.raises(ModelError, match=why):
            infer.describe(InferConfig(input="imdb-sample", model=str(d), output=str(tmp_path / "o")))
        assert any(re.search(why, p) for p in train.check_setup(TrainConfig(model=str(d)), manifest))
        args = ["infer", "--input", "imdb-sample", "--model", str(d), "--output", str(tmp_path / "o")]
        with pytest.raises(SystemExit) as stop:
            cli.main(args)
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and len(err.splitlines()) == 1 and re.search(why, err), err
        assert err.endswith("copy the model directory again"), err


def test_a_two_label_head_of_another_task_is_pointed_out(tiny_classifier_dir, tmp_path, caplog):
    """An RTE head (entailment / not_entailment) was scored as sentiment without a word."""
    assert infer.check_model(tiny_classifier_dir) == [] and not caplog.records  # NEGATIVE / POSITIVE
    for names in ({"0": "LABEL_0", "1": "LABEL_1"}, {"0": "neg", "1": "pos"}):
        config = json.loads(open(os.path.join(tiny_classifier_dir, "config.json")).read())
        shutil.copytree(tiny_classifier_dir, tmp_path / names["0"])
        (tmp_path / names["0"] / "config.json").write_text(json.dumps({**config, "id2label": names}))
        assert infer.check_model(str(tmp_path / names["0"])) == [] and not caplog.records
    rte = tmp_path / "rte"
    shutil.copytree(tiny_classifier_dir, rte)
    (rte / "config.json").write_text(
        json.dumps({**config, "id2label": {"0": "entailment", "1": "not_entailment"}})
    )
    with caplog.at_level(logging.WARNING, logger="bertjob.infer"):
        assert infer.check_model(str(rte)) == []
    assert "its labels are 'entailment' and 'not_entailment', not negative and positive" in caplog.text


def test_a_training_checkpoint_as_the_model_names_the_exported_model_instead(
    tiny_classifier_dir, tmp_path, capsys
):
    """`bertjob infer --help` offered "a checkpoint" as --model; one (STORAGE/NAME/checkpoint_*) has
    no tokenizer and was refused for that alone. Now --help does not offer it, and the error names
    the model directory the run exported."""
    from transformers import AutoModelForSequenceClassification

    from bertjob import checkpoint
    from bertjob.cli import make_parser

    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = tmp_path / "checkpoint_000001"
    checkpoint.save(str(ckpt), model, opt, None, checkpoint.TrainState(step=1), None)
    assert infer.check_model(str(ckpt)) == [
        f"model {ckpt} is a training checkpoint, which holds no tokenizer; give the model directory its run "
        f"exported (`bertjob train --output DIR` writes DIR/model)"
    ]
    with pytest.raises(SystemExit):
        make_parser().parse_args(["infer", "--help"])
    assert "checkpoint" not in capsys.readouterr().out


def test_evaluate_on_an_unlabelled_corpus_fails_before_any_work(tiny_classifier_dir, tmp_path):
    pq.write_table(pa.table({"text": ["great movie", "awful movie"]}), tmp_path / "unlabelled.parquet")
    out = tmp_path / "eval"
    with pytest.raises(InputError, match=r"no labels to evaluate against: parquet corpus .*unlabelled: no column "
                       r"'label'\)\. Set --label-column, or score it with `bertjob infer`$"):  # fmt: skip
        infer.run(InferConfig(input=str(tmp_path / "unlabelled.parquet"), model=tiny_classifier_dir, output=str(out)),
                  evaluate=True)  # fmt: skip
    assert not out.exists()  # nothing scored, nothing written


def test_a_label_column_named_but_for_case_is_pointed_at(tiny_classifier_dir, tmp_path, caplog):
    """Excel's "Label": prepare said so, but infer left its values out of true_label without a word,
    and evaluate's error said only "Set --label-column"."""
    (tmp_path / "a.csv").write_text("text,Label\ngreat movie,1\n")
    cfg = InferConfig(input=str(tmp_path / "a.csv"), model=tiny_classifier_dir, output=str(tmp_path / "o"))
    with pytest.raises(InputError, match=r"Set --label-column 'Label' \(the column named so but for case or spaces\), "
                       r"or score it with `bertjob infer`$"):  # fmt: skip
        infer.describe(cfg, evaluate=True)
    with caplog.at_level(logging.WARNING, logger="bertjob.infer"):
        infer.describe(cfg)
    assert caplog.messages == ["infer: no column 'label', but one named 'Label', not read: give --label-column 'Label' "
                               "to record its values as true_label"]  # fmt: skip
    assert infer.describe(InferConfig(**{**infer.to_dict(cfg), "label_column": "Label"}), evaluate=True)


def test_evaluate_on_a_raw_corpus_of_several_splits_needs_one(tiny_classifier_dir, imdb_small, tmp_path):
    """An IMDb layout evaluated whole scored its train rows into the metrics without a word, where a
    prepared directory of the same splits is an error; an archive's splits are known only by reading it."""
    from tests.conftest import tar_dir

    tar = tar_dir(imdb_small, tmp_path / "aclImdb.tar.gz")
    for corpus in (imdb_small, tar):
        cfg = InferConfig(input=str(corpus), model=tiny_classifier_dir, output=str(tmp_path / "o"))
        with pytest.raises(InputError, match=r"imdb-(dir|tar) corpus with .*train.*; choose .* --split"):
            infer.describe(cfg, evaluate=True)
        assert infer.describe(InferConfig(**{**infer.to_dict(cfg), "split": "test"}), evaluate=True)
        assert infer.describe(cfg)  # infer scores every split
    # A file without a split of its own was read whole as --split's: its train rows were scored into
    # the metrics of `evaluate --input reviews.parquet --split test` (the file prepare split).
    (tmp_path / "hive" / "split=test").mkdir(parents=True)
    pq.write_table(
        pa.table({"text": ["great", "awful"], "label": [1, 0]}),
        tmp_path / "hive" / "split=test" / "a.parquet",
    )
    cfg = InferConfig(
        input=str(tmp_path / "hive"), split="test", model=tiny_classifier_dir, output=str(tmp_path / "o")
    )
    assert infer.describe(cfg, evaluate=True)  # its files' own splits: --split picks
    # a split it does not have: infer scored 0 rows and called that done, evaluate said every row was quarantined
    for evaluate in (True, False):
        with pytest.raises(InputError, match=r"hive: no split 'validation'; the splits are \['test'\]$"):
            infer.describe(InferConfig(**{**infer.to_dict(cfg), "split": "validation"}), evaluate=evaluate)
    pq.write_table(
        pa.table({"text": ["great", "awful"], "label": [1, 0]}), tmp_path / "hive" / "extra.parquet"
    )
    for where, name in (
        (tmp_path / "hive", "extra.parquet"),
        (tmp_path / "hive" / "extra.parquet", "extra.parquet"),
    ):
        for evaluate in (True, False):
            with pytest.raises(InputError, match=rf"{name} has no split of its own .*so --split test would read all of "
                                                 rf"it; drop --split .* --input PREPARED --split test$"):  # fmt: skip
                infer.describe(InferConfig(**{**infer.to_dict(cfg), "input": str(where)}), evaluate=evaluate)
    # Hugging Face's Parquet export: evaluated whole, its train rows went into the metrics; with
    # --split test the error above said to drop --split, and so back to them.
    hf = tmp_path / "plain_text"
    hf.mkdir()
    for name in ("train-00000-of-00001.parquet", "test-00000-of-00001.parquet", "unsupervised-00000-of-00001.parquet"):
        pq.write_table(pa.table({"text": ["great", "awful"], "label": [1, 0]}), hf / name)
    for split in ("", "test"):
        cfg = InferConfig(input=str(hf), split=split, model=tiny_classifier_dir, output=str(tmp_path / "o"))
        with pytest.raises(InputError, match=r"plain_text: its files are named as splits \(test-00000-of-00001.parquet, "
                           r"train-.*, unsupervised-.*\), and evaluate would score them as one corpus: the test, train and "
                           rf"unsupervised rows alike. Evaluate one split's files: --input '{hf}/test\*'$"):  # fmt: skip
            infer.describe(cfg, evaluate=True)
    assert infer.describe(InferConfig(input=str(hf), model=tiny_classifier_dir, output=str(tmp_path / "o")))
    cfg = InferConfig(input=str(hf / "test*"), model=tiny_classifier_dir, output=str(tmp_path / "o"))
    assert infer.describe(cfg, evaluate=True)  # the way the error names


def _model_trained_with(tiny_classifier_dir, tmp_path, **text):
    d = tmp_path / "model"
    shutil.copytree(tiny_classifier_dir, d)
    (d / "bertjob.json").write_text(
        json.dumps({"max_length": 64, "truncation": "head+tail", "head_tokens": 16, **text})
    )
    return str(d)


def test_infer_follows_every_text_setting_the_model_was_trained_with(tiny_classifier_dir, tmp_path, caplog):
    model = _model_trained_with(tiny_classifier_dir, tmp_path, strip_html=False, max_chars_per_end=100)
    pq.write_table(pa.table({"text": ["a <b>b</b>", "x " * 1000]}), tmp_path / "c.parquet")
    cfg = InferConfig(input=str(tmp_path / "c.parquet"), model=model, output=str(tmp_path / "o"))
    _, run_info = infer.describe(cfg)
    assert run_info["settings"] == {"max_length": 64, "truncation": "head+tail", "head_tokens": 16,
                                    "strip_html": False, "max_chars_per_end": 100}  # fmt: skip
    # the command line still wins
    flags = InferConfig(**{**infer.to_dict(cfg), "strip_html": True, "max_chars_per_end": 50})
    assert (
        infer.describe(flags)[1]["settings"]["strip_html"],
        infer.describe(flags)[1]["settings"]["max_chars_per_end"],
    ) == (True, 50)
    # flags that score otherwise than the model was trained are named (the cap only where given)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][-1] == (
        f"infer: scoring with other text settings than model {model} was trained with: strip_html True (trained: "
        f"False), max_chars_per_end 50 (trained: 100); its predictions may be worse than its evaluation said (leave "
        f"out these flags to score as it was trained)"
    )
    caplog.clear()
    infer.describe(InferConfig(**{**infer.to_dict(cfg), "max_length": 256, "truncation": "head"}))
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"infer: scoring with other text settings than model {model} was trained with: max_length 256 (trained: "
        f"64), truncation 'head' (trained: 'head+tail'); its predictions may be worse than its evaluation said (leave "
        f"out these flags to score as it was trained)"
    ]
    caplog.clear()
    infer.describe(cfg)  # as trained: no word
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    # more head than max_length holds (given, or the model's at a shorter max_length): an error, as in
    # prepare; it was cut to the budget, a plain head truncation, without a word
    for too_long in ({"head_tokens": 200}, {"max_length": 16}):
        with pytest.raises(InputError, match=r"head_tokens (200|16) leaves no tail at max_length (64|16) with "
                                             r"head\+tail truncation .*give --head-tokens (16|4), say, or"):  # fmt: skip
            infer.describe(InferConfig(**{**infer.to_dict(cfg), **too_long}))
    # a model without bertjob.json (a hub model) gets prepare's defaults at the max_length in effect
    bare = tmp_path / "bare"
    shutil.copytree(tiny_classifier_dir, bare, ignore=shutil.ignore_patterns("bertjob.json"))
    hub_like = InferConfig(**{**infer.to_dict(cfg), "model": str(bare), "max_length": 128})
    assert infer.describe(hub_like)[1]["settings"] == {"max_length": 128, "truncation": "head+tail", "head_tokens": 32,
                                                       "strip_html": True, "max_chars_per_end": 2048}  # fmt: skip
    # a shorter max_length with a head that leaves a tail is fine
    assert infer.describe(InferConfig(**{**infer.to_dict(cfg), "max_length": 16, "head_tokens": 4}))
    tokens = infer.Predictor(model, precision="off").tokenize(pa.table({"id": ["a"], "text": ["a <br /> b"]}))
    assert (
        len(tokens.column("input_ids")[0]) > 4
    )  # the tags were kept, as in training: more than [CLS] a b [SEP]


def test_a_prepared_input_with_other_text_settings_than_the_model_is_an_error(tiny_classifier_dir, tmp_path):
    from bertjob import models

    model = _model_trained_with(tiny_classifier_dir, tmp_path, strip_html=True)
    prepared = tmp_path / "prepared"
    (prepared / "test").mkdir(parents=True)
    manifest = {"format": "bertjob-prepared/1", "splits": {"test": {"rows_written": 0, "label_counts": {"0": 1}}},
                "tokenizer": models.tokenizer_info(model), "max_length": 32, "truncation": "head+tail",
                "head_tokens": 16, "strip_html": True}  # fmt: skip
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    cfg = InferConfig(input=str(prepared), split="test", model=model, output=str(tmp_path / "o"))
    with pytest.raises(InputError, match=r"other text settings.*max_length 32 \(model: 64\)"):
        infer.describe(cfg, evaluate=True)
    manifest["max_length"] = 64
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    assert infer.describe(cfg, evaluate=True)[1]["settings"]["max_length"] == 64
    # A flag's value is this command's, not the model's (it read "max_length 64 (model: 32)").
    with pytest.raises(InputError) as err:
        infer.describe(InferConfig(**{**infer.to_dict(cfg), "max_length": 32}), evaluate=True)
    assert str(err.value) == (
        f"input {prepared} was prepared with other text settings than this command scores with (model {model}'s, "
        f"changed by its flags): max_length 64 (this command: 32); give the raw corpus, or prepare it again with "
        f"these settings (--max-length 32 --head-tokens 16)"
    )
    manifest.update(head_tokens=8, strip_html=False)  # the quickstart's model (head 64) on a default prepare (32)
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"head_tokens 8 \(model: 16\), strip_html False \(model: True\); give the "
                       r"raw corpus, or prepare it again with these settings \(--head-tokens 16 --strip-html true\)$"):  # fmt: skip
        infer.describe(cfg, evaluate=True)


def test_evaluating_the_unlabelled_split_is_an_error_before_any_work(tiny_classifier_dir, tmp_path):
    """`evaluate --input aclImdb --split unsup` scored every review, then said there were no labelled rows."""
    imdb = make_imdb_dir(tmp_path, {"test": 2, "unsup": 3})
    cfg = InferConfig(input=str(imdb), split="unsup", model=tiny_classifier_dir, output=str(tmp_path / "o"))
    with pytest.raises(InputError) as err:
        infer.describe(cfg, evaluate=True)
    assert str(err.value) == (
        f"input {imdb}: split unsup holds unlabelled reviews, nothing to evaluate against; evaluate a labelled "
        f"split (--split test), or score it with `bertjob infer`"
    )
    assert infer.describe(cfg)[0].kind == "imdb-dir"  # infer scores it


def test_evaluating_a_prepared_directory_without_a_test_split_says_how_to_get_one(
    tiny_classifier_dir, prepared_small, tmp_path
):
    """`evaluate --input PREPARED --split test` on data prepared without a test split said which
    splits there are, not how to get one (the pipeline's message says it)."""
    prepared = tmp_path / "prepared"
    shutil.copytree(prepared_small, prepared, ignore=shutil.ignore_patterns("test"))
    manifest = json.loads((prepared / "manifest.json").read_text())
    del manifest["splits"]["test"]
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    said = (f"input {prepared}: no split 'test'; the splits are ['train', 'unsup', 'validation']: hold out part "
            f"of train as the test split (prepare again with --test-fraction 0.2), or score one of these with --split NAME")  # fmt: skip
    with pytest.raises(InputError, match=f"^{re.escape(said)}$"):
        infer.describe(InferConfig(input=str(prepared), split="test", model=tiny_classifier_dir,
                                   output=str(tmp_path / "o")), evaluate=True)  # fmt: skip


def test_an_id_column_left_unnamed_is_pointed_out(tiny_classifier_dir, tmp_path, caplog):
    """A corpus's own `id` column is read only where named (--id-column id): the predictions were
    keyed by file and row, not by the ids the user joins them back on, without a word."""
    _corpus(tmp_path / "c.parquet", 4, bad=False)
    cfg = InferConfig(
        input=str(tmp_path / "c.parquet"), model=tiny_classifier_dir, output=str(tmp_path / "o")
    )
    with caplog.at_level(logging.WARNING, logger="bertjob.infer"):
        infer.describe(cfg)
        assert "c.parquet has a column 'id', not read" in caplog.text and "give --id-column id" in caplog.text
        caplog.clear()
        infer.describe(InferConfig(**{**infer.to_dict(cfg), "id_column": "id"}))
        assert "not read" not in caplog.text


def _corpus(path, n, bad=True, seed=0, prefix="doc"):
    import random

    rng = random.Random(seed)
    rows = [
        {"id": f"{prefix}{i}", "text": review(rng, i % 2 == 0), "label": "pos" if i % 2 == 0 else "neg"}
        for i in range(n)
    ]
    if bad:
        rows[3]["text"] = None
        rows[5]["text"] = "   "
        rows[7]["text"] = "<br /><br />"
        rows[9]["text"] = "great " * 300_000
        rows[11]["text"] = "\u200b\u200b"  # only characters the tokenizer drops
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


@pytest.mark.integration
def test_infer_scores_every_row_exactly_once_with_bad_rows_quarantined(
    tiny_classifier_dir, tmp_path, ray_local, caplog
):
    d = tmp_path / "corpus"
    d.mkdir()
    rows = _corpus(d / "a.parquet", 300) + _corpus(d / "b.parquet", 200, bad=False, seed=1, prefix="other")
    (d / "c.csv").write_bytes(
        b"id,text,label\n" + 'r1,"d\xe9j\xe0 vu, awful",neg\nr1,fine,pos\n'.encode("latin-1")
    )
    out = tmp_path / "out"
    m = infer.run(InferConfig(input=str(d / "*.parquet"), model=tiny_classifier_dir, output=str(out), id_column="id",
                              batch_size=16, num_workers=2, rows_per_shard=100))  # fmt: skip
    assert m["rows_read"] == 500 == m["rows_scored"] + m["rows_quarantined"]
    assert m["quarantined_by_reason"] == {"empty_text": 3, "null_text": 1}
    pred = pq.read_table(out / "predictions")
    q = pq.read_table(out / "quarantine")
    ids = pred.column("id").to_pylist() + q.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 500
    assert set(ids) == {r["id"] for r in rows}
    assert set(pred.column_names) >= {"id", "label", "label_name", "score", "prob_positive"}
    assert set(pred.column("label_name").to_pylist()) <= {"NEGATIVE", "POSITIVE"}
    # a prediction's unit is the index of its file in the manifest's inputs (ids may repeat across files)
    assert m["inputs"] == ["a.parquet", "b.parquet"]
    files = {
        m["inputs"][u]: i[:3] for u, i in zip(pred.column("unit").to_pylist(), pred.column("id").to_pylist())
    }
    assert files == {"a.parquet": "doc", "b.parquet": "oth"}
    # a second run over the same inputs finds the output complete
    again = infer.run(
        InferConfig(input=str(d / "*.parquet"), model=tiny_classifier_dir, output=str(out), id_column="id")
    )
    assert again == json.loads((out / "manifest.json").read_text())
    assert "share their id" not in caplog.text
    # A copy of a predictions file beside it, then the predictions removed: the rerun said "complete,
    # nothing to do" with rows twice, then none. Now it keeps the copy's rows once, then scores
    # exactly the missing rows again.
    cfg = InferConfig(input=str(d / "*.parquet"), model=tiny_classifier_dir, output=str(out), id_column="id")
    first = sorted((out / "predictions").glob("*.parquet"))[0]
    shutil.copy(first, out / "predictions" / "part-1 (copy).parquet")
    with caplog.at_level(logging.WARNING, logger="bertjob.infer"):
        again = infer.run(cfg)
    assert (
        "is no longer as its manifest lists it (1 not written by it (first: predictions/part-1 (copy)"
        in caplog.text
    )
    assert again["rows_scored"] == m["rows_scored"] and again["rows_this_run"] == 0
    for f in (out / "predictions").glob("*.parquet"):
        f.unlink()
    again = infer.run(cfg)
    assert again["rows_resumed"] == m["rows_quarantined"] and again["rows_this_run"] == m["rows_scored"]
    ids = pq.read_table(out / "predictions").column("id").to_pylist() + q.column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in rows)
    assert infer.run(cfg) == json.loads((out / "manifest.json").read_text())  # complete again
    # A Parquet file of something else put there: a traceback from pyarrow
    pq.write_table(pa.table({"x": [1]}), out / "predictions" / "other.parquet")
    with pytest.raises(SetupError, match=r"predictions/other.parquet is no file bertjob committed \(No match for "
                       r"FieldRef.Name\(unit\) in x: int64\); remove it, or pass --overwrite"):  # fmt: skip
        infer.run(cfg)
    # Latin-1 CSV: decoded with replacement, counted; one file is one read task, and Ray Data is
    # not told to run more (it would warn that it cannot)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m2 = infer.run(InferConfig(input=str(d / "c.csv"), model=tiny_classifier_dir, output=str(tmp_path / "o2"),
                                   id_column="id"))  # fmt: skip
    assert m2["rows_scored"] == 2 and m2["utf8_replaced_this_run"] == 1
    assert (
        "infer: 1 of 2 rows held text that is not valid UTF-8, read with U+FFFD" in caplog.text
    )  # not silent
    # Two rows of one id: scored once each (one prediction per input row), and said, not silent
    assert (
        "infer: 2 rows share their id (--id-column 'id') with another row, e.g. 'r1' (2 rows)" in caplog.text
    )
    assert not [w for w in caught if "concurrent tasks" in str(w.message)], [str(w.message) for w in caught]


def test_a_cpu_predictor_takes_a_nodes_cpus_unless_the_worker_count_needs_fewer(ray_local):
    def cpus(**settings):
        return infer.predictor_cpus(InferConfig(input="in", model="m", output="out", **settings))

    assert cpus() == 2 and cpus(num_workers="1-4") == 2  # the 2-CPU local Ray: one actor, 2 scoring threads
    assert cpus(num_workers=2) == 1
    assert cpus(use_gpu=True) == 0  # a GPU predictor: every CPU tokenizes beside it


@pytest.mark.integration
def test_a_stopped_or_killed_infer_resumes_with_exactly_one_row_per_input(
    tiny_classifier_dir, tmp_path, ray_local
):
    """SIGTERM of the driver alone (what `kubectl delete pod`, `ray job stop` and `timeout` send) ends
    the run as Ctrl-C does: one line, exit status 143, no stack dump. The same command again resumes;
    SIGKILLed with its local Ray (a lost node) once it has committed more, it leaves what it committed.
    Then the kernel's OOM killer SIGKILLs the predictor on every try of a batch (one too big for its
    node's memory): Ray Data restarted the actor and handed it the same batch again, for ever (its
    default max_task_retries=-1), so the job never ended. Now it ends after a few tries with one line
    saying what killed it and what to lower, keeping what was committed before. The same command
    once more completes the output with one row per input."""
    from bertjob.cluster import BATCH_RETRIES, KILLED_FROM_OUTSIDE

    d = tmp_path / "corpus"
    d.mkdir()
    units, per_unit = 6, 4000
    for i in range(units):
        _corpus(d / f"part{i}.parquet", per_unit, bad=False, seed=i, prefix=f"p{i}-")
    total = units * per_unit
    out = tmp_path / "out"
    args = [sys.executable, "-m", "bertjob", "infer", "--input", str(d), "--model", tiny_classifier_dir,
            "--output", str(out), "--batch-size", "16", "--num-workers", "2", "--rows-per-shard", "200"]  # fmt: skip

    def committed() -> int:
        return len(pq.read_table(out / "predictions")) if (out / "predictions").exists() else 0

    for stop in (signal.SIGTERM, signal.SIGKILL):
        before = committed()
        with open(tmp_path / "stderr", "w") as stderr:
            proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            # Two predictors score a unit (4,000 rows) per wave of ~1 s on 2 cores and a write commits
            # whole units, so the first file lands seconds before the last: the stop comes mid-run.
            deadline = time.time() + 180
            while time.time() < deadline and committed() == before:
                time.sleep(0.05)
            proc.send_signal(stop)
            rc = proc.wait(timeout=120)
        finally:
            kill_session(proc.pid)  # after SIGTERM, anything left behind; after SIGKILL, its Ray
            proc.wait()
        if stop == signal.SIGTERM:
            err = (tmp_path / "stderr").read_text()
            assert rc == 128 + signal.SIGTERM, err[-3000:]
            said = re.fullmatch(r"bertjob: interrupted; ([\d,]+) rows are committed: the same command again "
                                r"resumes from them", err.strip().splitlines()[-1])  # fmt: skip
            assert said and 0 < int(said[1].replace(",", "")) <= committed(), err[-3000:]
            assert "SIGTERM received" not in err and "Traceback" not in err, err[-3000:]
        assert before < committed() < total and not (out / "manifest.json").exists()
    partial = committed()
    one = [*args]  # one predictor, as the advice to score on fewer workers per node gives
    one[one.index("--num-workers") + 1] = "1"
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(one, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
    # each time it scores; without a bound on the retries the job never ended
    rc, last, kills = kill_each_try(
        proc, "ray::MapWorker(MapBatches(Predictor)).submit", 150, tmp_path / "stderr"
    )
    assert rc == 1 and last.startswith(
        f"bertjob: error: infer stopped: the scoring process of a batch was killed on each of its "
        f"{BATCH_RETRIES + 1} tries: it {KILLED_FROM_OUTSIDE}. Where memory ran out, "
    ), last
    assert "lower --batch-size (sequences scored at once per thread, now 16), --max-length (now 64)" in last
    assert "the same command again resumes from them" in last and kills >= BATCH_RETRIES + 1
    assert committed() >= partial and not (out / "manifest.json").exists()  # what was committed is kept
    partial = committed()
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / "cut-short.parquet").write_bytes(b"PAR1")  # a write a stop cut short
    m = infer.run(
        InferConfig(input=str(d), model=tiny_classifier_dir, output=str(out), batch_size=16, num_workers=2)
    )
    assert m["rows_resumed"] == partial and m["rows_this_run"] == total - partial
    ids = pq.read_table(out / "predictions").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == total
    assert not (out / "_tmp").exists()  # such files were kept for ever


@pytest.mark.integration
def test_a_scorer_killed_while_loading_the_model_on_every_try_ends_the_job_with_one_line(
    tiny_classifier_dir, tmp_path
):
    """The kernel's OOM killer SIGKILLs a predictor while it loads a model too big for its node's
    memory, on every try: Ray Data restarted the actor for ever (its default max_restarts=-1) and
    the job waited for it without a word. Now it ends after as many tries as a batch gets, with one
    line saying so and what to change."""
    from bertjob.cluster import BATCH_RETRIES, KILLED_FROM_OUTSIDE

    d = tmp_path / "corpus"
    d.mkdir()
    _corpus(d / "part.parquet", 200, bad=False)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "bertjob", "infer", "--input", str(d), "--model", tiny_classifier_dir,
            "--output", str(out), "--num-workers", "1", "--cpus-per-worker", "1"]  # fmt: skip
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
    # without a bound on the restarts the job never ended
    rc, last, kills = kill_each_try(  # once it loads torch: the predictor's own __init__
        proc, "ray::MapWorker(MapBatches(Predictor)).__init__", 120, tmp_path / "stderr", mapping="libtorch"
    )
    assert rc == 1 and last == (
        f"bertjob: error: infer stopped: a scoring process was killed while loading the model on each of its "
        f"{BATCH_RETRIES + 1} tries: it {KILLED_FROM_OUTSIDE}. Where memory ran out, score on nodes with more memory, "
        f"with a smaller model, or on fewer workers per node (a higher --cpus-per-worker (now 1) or fewer "
        f"--num-workers); the rows committed are kept: the same command again resumes from them"
    ), last
    assert kills >= BATCH_RETRIES + 1 and not list(out.glob("predictions/*.parquet"))


@pytest.mark.integration
def test_a_read_killed_on_every_try_ends_the_job_with_one_line(tiny_classifier_dir, tmp_path):
    """The kernel's OOM killer SIGKILLs the process reading the input (a plain task of Ray Data's,
    as the writes are, not an actor of the scoring pool) on every try: Ray Data retried it for ever
    (its default max_retries=-1) and the job never ended. Now it ends after as many tries as a batch
    gets, with one line saying so and what to change."""
    from bertjob.cluster import BATCH_RETRIES, KILLED_FROM_OUTSIDE

    with open(tmp_path / "big.jsonl", "w") as f:  # a read that lasts long enough to be killed each try
        for i in range(20_000):
            f.write(json.dumps({"text": f"great movie number {i} " * 5, "label": i % 2}) + "\n")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "bertjob", "infer", "--input", str(tmp_path / "big.jsonl"), "--model",
            tiny_classifier_dir, "--output", str(out)]  # fmt: skip
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
    rc, last, kills = kill_each_try(proc, "ray::ReadRead", 150, tmp_path / "stderr")  # ReadJsonl's tasks
    assert rc == 1 and last == (
        f"bertjob: error: infer stopped: a process reading the input or writing predictions was killed on each of "
        f"its {BATCH_RETRIES + 1} tries: it {KILLED_FROM_OUTSIDE}. Where memory ran out, score on nodes with more "
        f"memory, or split the input into smaller files; the rows committed are kept: the same command again "
        f"resumes from them"
    ), last
    assert kills >= BATCH_RETRIES + 1 and not (out / "manifest.json").exists()


@pytest.mark.integration
def test_the_driver_of_infer_never_imports_torch(tiny_classifier_dir, tmp_path, ray_local):
    """Only the predictor actors score: the driver, and the read and write tasks that unpickle this
    module's sink, skip torch's import (~1.3 s of CPU per process on a small machine), once the
    model's tokenizer has been read on this machine (its record cached, as after any first run).
    Nor do the actors' transformers progress bars reach the job's log ('Loading weights: 0%' and
    100% as lines of their own, per actor started)."""
    _corpus(tmp_path / "reviews.parquet", 40, bad=False)
    models.tokenizer_record(tiny_classifier_dir)
    script = "import sys; from bertjob import cli; rc = cli.main(sys.argv[1:]); sys.exit(rc or ('torch' in sys.modules and 'the driver imported torch'))"
    done = subprocess.run(
        [sys.executable, "-c", script, "infer", "--input", str(tmp_path / "reviews.parquet"),
         "--model", tiny_classifier_dir, "--output", str(tmp_path / "out")],
        env={**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert pq.read_table(tmp_path / "out" / "predictions").num_rows == 40
    log = done.stderr
    assert "MapBatches(Predictor)" in log and "Loading weights" not in log, log[-3000:]


@pytest.mark.integration
def test_evaluate_metrics_match_a_direct_computation(tiny_classifier_dir, tmp_path, ray_local, caplog):
    from sklearn import metrics as skm

    rows = _corpus(tmp_path / "labelled.parquet", 240, bad=False)
    # Labels of another vocabulary on a few rows: left out of the metrics, which was said only as a
    # count at INFO; now a warning that names them, and the manifest keeps them, as prepare's does.
    rows += [{**rows[i], "id": f"x{i}", "label": ("good", "good", "bad")[i]} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "labelled.parquet")
    out = tmp_path / "eval"
    m = infer.run(InferConfig(input=str(tmp_path / "labelled.parquet"), model=tiny_classifier_dir, output=str(out),
                              id_column="id"), evaluate=True)  # fmt: skip
    assert m["unrecognised_labels"] == {"good": 2, "bad": 1} and m["quarantined_by_reason"] == {
        "unrecognised_label": 3
    }
    assert f"evaluate: quarantined 3 of 243 rows (unrecognised_label 3) in {out / 'quarantine'}; labels not read: " \
           f"'good' x2, 'bad' x1" in [r.getMessage() for r in caplog.records if r.levelname == "WARNING"][-1]  # fmt: skip
    pred = pq.read_table(out / "predictions").to_pandas()
    y, p = pred["true_label"].to_numpy(), pred["prob_positive"].to_numpy()
    yhat = (p >= 0.5).astype(int)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == m["metrics"]
    assert saved["count"] == 240
    assert saved["accuracy"] == pytest.approx(skm.accuracy_score(y, yhat))
    assert saved["f1"] == pytest.approx(skm.f1_score(y, yhat, zero_division=0))
    assert saved["precision"] == pytest.approx(skm.precision_score(y, yhat, zero_division=0))
    assert saved["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert np.array_equal(np.array(saved["confusion_matrix"]), skm.confusion_matrix(y, yhat))
    assert (out / "report.png").stat().st_size > 1000
    # metrics.json removed since: a rerun called the output complete and left it missing
    (out / "metrics.json").unlink()
    again = infer.run(InferConfig(input=str(tmp_path / "labelled.parquet"), model=tiny_classifier_dir,
                                  output=str(out), id_column="id"), evaluate=True)  # fmt: skip
    assert json.loads((out / "metrics.json").read_text()) == saved == again["metrics"]
    assert again["rows_this_run"] == 0 and again["rows_resumed"] == 243


def test_what_cannot_be_scored_is_an_error_before_any_work(tiny_classifier_dir, prepared_small, tmp_path):
    """A head of 3 labels, a max_length past the model's positions, an empty input, an output that
    cannot be written, and evaluate on a prepared directory without a split: each one clear error,
    before Ray runs anything; infer on a prepared directory without a split reads every split."""
    from transformers import AutoModelForSequenceClassification

    from bertjob.outputs import OutputError

    _corpus(tmp_path / "c.parquet", 8, bad=False)
    base = InferConfig(
        input=str(tmp_path / "c.parquet"), model=tiny_classifier_dir, output=str(tmp_path / "o")
    )
    three = tmp_path / "three"
    AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir, num_labels=3, ignore_mismatched_sizes=True,
                                                       id2label={0: "a", 1: "b", 2: "c"}).save_pretrained(three)  # fmt: skip
    with pytest.raises(ModelError, match="3 labels"):
        infer.describe(InferConfig(**{**infer.to_dict(base), "model": str(three)}))
    inverted = tmp_path / "inverted"  # trained elsewhere with 0 = positive: every prediction was inverted
    shutil.copytree(tiny_classifier_dir, inverted)
    config = json.loads((inverted / "config.json").read_text())
    config.update(id2label={"0": "positive", "1": "negative"}, label2id={"positive": 0, "negative": 1})
    (inverted / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelError, match="its label 0 is 'positive' and 1 is 'negative'; bertjob reads label 1"
    ):
        infer.describe(InferConfig(**{**infer.to_dict(base), "model": str(inverted)}))
    with pytest.raises(InputError, match="positions for"):
        infer.describe(InferConfig(**{**infer.to_dict(base), "max_length": 1024}))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="no rows found"):
        infer.run(InferConfig(**{**infer.to_dict(base), "input": str(tmp_path / "empty.jsonl")}))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputError, match="cannot write there"):
        infer.run(InferConfig(**{**infer.to_dict(base), "output": str(tmp_path / "a-file" / "out")}))
    on_prepared = InferConfig(**{**infer.to_dict(base), "input": str(prepared_small)})
    with pytest.raises(InputError, match="--split"):
        infer.describe(on_prepared, evaluate=True)
    with pytest.raises(  # it said to set --label-column, which a prepared directory does not read
        InputError, match=r"Evaluate a split with labels \(test, train, validation\), or score it with"
    ):
        infer.describe(InferConfig(**{**infer.to_dict(on_prepared), "split": "unsup"}), evaluate=True)
    splits = json.loads((prepared_small / "manifest.json").read_text())["splits"]
    corpus, _ = infer.describe(on_prepared)
    with pytest.raises(
        InputError, match="a prepared directory, which keeps token ids, not text; --include-text"
    ):
        infer.describe(
            InferConfig(**{**infer.to_dict(on_prepared), "include_text": True})
        )  # its text: all null
    assert len(splits) > 1 and {os.path.basename(os.path.dirname(u)) for u in corpus.units} == set(splits)
    # A split of it, or a shard of one, given as the input: its token ids were refused as a corpus
    # without a text column, with the advice to set --text-column
    for part in (prepared_small / "test", sorted((prepared_small / "test").glob("*.parquet"))[0]):
        with pytest.raises(InputError, match=re.escape(f"input {part} is part of the `bertjob prepare` output "
                           f"{prepared_small}, not a corpus of its own; give --input {prepared_small} --split test")):  # fmt: skip
            infer.describe(InferConfig(**{**infer.to_dict(base), "input": str(part)}))


@pytest.mark.integration
def test_predictors_no_node_can_host_are_an_error_not_a_wait(tiny_classifier_dir, tmp_path, ray_local):
    """Ray waits forever for an actor that no node can host (and Ray Data with it): more CPUs per
    predictor than a node has, or a GPU on a cluster without one, is an error at once instead, saying
    what to change (for a GPU it said to lower the CPUs). A run that cannot start leaves the output
    as it was: it wiped an earlier output with --overwrite, and without it left its run record, so
    that the next run with other settings was refused as if the output held a run."""
    _corpus(tmp_path / "c.parquet", 8, bad=False)
    base = {"input": str(tmp_path / "c.parquet"), "model": tiny_classifier_dir, "output": str(tmp_path / "o")}
    with pytest.raises(
        SetupError,
        match=r"1 worker\(s\) of 4 CPUs each do not fit the cluster's alive nodes \(2 CPUs/0 GPUs\)",
    ):
        infer.run(InferConfig(**base, cpus_per_worker=4))
    with pytest.raises(SetupError, match=r"3 worker\(s\) of 1 CPUs each do not fit"):
        infer.run(InferConfig(**base, num_workers=Workers(3, 3), cpus_per_worker=1))
    assert not (tmp_path / "o" / "predictions").exists()
    scored = infer.run(
        InferConfig(**base, include_text=True)
    )  # other settings, no --overwrite: nothing was run there
    with pytest.raises(SetupError, match=r"no GPU \(set --use-gpu false, or add GPU nodes\)$"):
        infer.run(InferConfig(**base, use_gpu=True, overwrite=True))
    assert json.loads((tmp_path / "o" / "manifest.json").read_text()) == scored
    assert pq.read_table(tmp_path / "o" / "predictions").num_rows == 8


@pytest.mark.integration
def test_evaluate_says_what_it_cannot_compute(tiny_classifier_dir, imdb_small, tmp_path, ray_local, caplog):
    """One class only: the ROC AUC is undefined, written as null (strict JSON). No row scorable
    (every label unrecognised): a clear error naming where the reasons are, not a crash."""

    def strict(path):
        return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))

    rows = _corpus(tmp_path / "one.parquet", 12, bad=False)
    pq.write_table(pa.Table.from_pylist([{**r, "label": "pos"} for r in rows]), tmp_path / "one.parquet")
    out = tmp_path / "one"
    infer.run(
        InferConfig(input=str(tmp_path / "one.parquet"), model=tiny_classifier_dir, output=str(out)),
        evaluate=True,
    )
    assert (
        strict(out / "metrics.json")["roc_auc"] is None
        and strict(out / "manifest.json")["metrics"]["count"] == 12
    )
    # said, not only a "roc_auc nan" in the log: a test set of one class is more often a mistake
    assert "evaluate: all 12 labelled rows are positive: the ROC AUC is undefined (null in metrics.json); check " \
           "the input, --split and --label-column" in caplog.text  # fmt: skip
    pq.write_table(
        pa.Table.from_pylist([{**r, "label": "3 stars"} for r in rows]), tmp_path / "stars.parquet"
    )
    cfg = InferConfig(
        input=str(tmp_path / "stars.parquet"), model=tiny_classifier_dir, output=str(tmp_path / "stars")
    )
    # labels of another vocabulary: said so, not only that nothing could be scored (as if the text were bad)
    with pytest.raises(InputError, match=r"no row could be scored, nothing to evaluate: every row was quarantined "
                       r"\(12 unrecognised_label\); labels are read as 0/1, neg/pos or negative/positive"):  # fmt: skip
        infer.run(cfg, evaluate=True)
    assert pq.read_table(tmp_path / "stars" / "quarantine").num_rows == 12  # every row, with its reason
    # GLUE's test splits label every row -1 (none known): it was told to map its labels to 0/1
    pq.write_table(pa.Table.from_pylist([{**r, "label": -1} for r in rows]), tmp_path / "glue-test.parquet")
    cfg = InferConfig(input=str(tmp_path / "glue-test.parquet"), model=tiny_classifier_dir,
                      output=str(tmp_path / "glue"))  # fmt: skip
    with pytest.raises(InputError, match=r"\(12 unrecognised_label\); every label is -1, Hugging Face's mark of a row "
                                         r"without one \(GLUE's test splits\): there are no labels to evaluate against; "
                                         r"score it with `bertjob infer`; the rows are in"):  # fmt: skip
        infer.run(cfg, evaluate=True)
    # Star ratings 1-5 as the label column: the 1-star reviews were scored as positives (accuracy
    # against them), the rest quarantined, and evaluate reported an accuracy; infer recorded them as
    # true_label 1 (the others null) and reported success. Seen in the first rows: said before any
    # work (it was after all of it).
    stars = [{**r, "label": 1 + i % 5} for i, r in enumerate(rows)]
    (tmp_path / "five").mkdir()
    pq.write_table(pa.Table.from_pylist(stars), tmp_path / "five" / "stars.parquet")
    for evaluate, others in ((True, "would be quarantined"), (False, "would have no true_label")):
        out = tmp_path / f"five-{evaluate}"
        with pytest.raises(InputError, match=rf"label column 'label' holds numbers above 1 \('2' x3, .*\(0 and 3\) "
                                             rf"would count as negative and positive and the others {others}"):  # fmt: skip
            infer.run(
                InferConfig(input=str(tmp_path / "five"), model=tiny_classifier_dir, output=str(out)),
                evaluate,
            )
        assert not out.exists()
    # Seen only further on (a first file of 0s and 1s): after the scoring, before the manifest and
    # metrics; and again by the same command (nothing left to score: the labels are counted from the
    # input's receipts).
    pq.write_table(pa.Table.from_pylist([{**r, "label": i % 2} for i, r in enumerate(rows)]),
                   tmp_path / "five" / "0-first.parquet")  # fmt: skip
    cfg = InferConfig(
        input=str(tmp_path / "five"), model=tiny_classifier_dir, output=str(tmp_path / "five-e")
    )
    with pytest.raises(InputError, match=r"label column 'label' holds numbers above 1 \('2' x3, .*\(6 and 9\) would "
                                         r"count as negative and positive.*evaluate again with --overwrite"):  # fmt: skip
        infer.run(cfg, evaluate=True)
    assert (
        not (tmp_path / "five-e" / "metrics.json").exists()
        and not (tmp_path / "five-e" / "manifest.json").exists()
    )
    q = pq.read_table(tmp_path / "five-e" / "quarantine")
    assert sorted(q.column("label").to_pylist()) == ["2", "2", "2", "3", "3", "4", "4", "5", "5"]  # not read
    cfg = InferConfig(**{**infer.to_dict(cfg), "output": str(tmp_path / "five-infer")})
    for _ in range(2):
        with pytest.raises(InputError, match=r"holds numbers above 1 \('2' x3, .*\(6 and 9\) would count as "
                           r"negative and positive and the others had no true_label.*\(or score without labels: "
                           r"--label-column ''\), then infer again with --overwrite$"):  # fmt: skip
            infer.run(cfg)
        assert not (tmp_path / "five-infer" / "manifest.json").exists()
    # A split an IMDb archive lacks (known only by reading it): "every row was quarantined ()"
    from tests.conftest import tar_dir

    tar = tar_dir(imdb_small, tmp_path / "aclImdb.tar.gz")
    cfg = InferConfig(
        input=str(tar), split="validation", model=tiny_classifier_dir, output=str(tmp_path / "v")
    )
    with pytest.raises(InputError, match=r"aclImdb.tar.gz: no rows in split 'validation'$"):
        infer.run(cfg, evaluate=True)


def test_a_bad_line_found_by_a_reader_is_one_line_of_error(tmp_path, tiny_classifier_dir, ray_local):
    """A reader meets the bad line inside a Ray task: the user still gets one line, exit status 2."""
    lines = [json.dumps({"id": i, "text": "a fine film", "label": i % 2}) for i in range(3000)]
    lines[2500] = '{"id": "broken", "text": "oops", '
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "bertjob", "infer", "--input", str(tmp_path / "bad.jsonl"),
         "--model", tiny_classifier_dir, "--output", str(tmp_path / "out")],
        env={**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stderr[-3000:]
    assert last == f"bertjob: error: input {tmp_path / 'bad.jsonl'}, line 2501: not valid JSON " + (
        "(Expecting property name enclosed in double quotes)"
    ), last


def test_a_disk_that_fills_under_a_write_is_said_in_its_own_words(ray_local):
    """A write that met a full disk (ENOSPC) reaches the driver as an OSError to which Ray Data
    appended its retry advice as the file name: the line read "[Errno 28] ...: 'Failed to apply UDF
    transform after 1/1 attempts (total backoff 0.0s).\\nTo change retry attempts, ...
    `ray.data.DataContext.get_current()` ...'"; now the error alone."""
    import errno

    from ray.data.datasource import Datasink

    from bertjob.cli import _own_words

    class FullDisk(Datasink):  # pyarrow's error on a full disk, as infer's sink met it on a tmpfs
        def write(self, blocks, ctx):
            raise OSError(
                errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device"
            )

    with pytest.raises(OSError) as stop:
        ray_local.data.range(4).write_datasink(FullDisk())
    assert _own_words(stop.value) == (
        "[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"
    )


def test_relative_paths_name_the_drivers_directory_when_ray_workers_start_elsewhere(
    tmp_path, monkeypatch, tiny_model_dir, tiny_classifier_dir, ray_local
):
    """On a running cluster (RAY_ADDRESS) every worker starts in the directory its node was started
    in, not the driver's: `infer --model clf --output scored` had its actors look up 'clf' on the
    hub and its predictions written under the node's directory ("input units were never read to the
    end"), and `prepare --output prep` wrote its shards there and a manifest of 0 rows beside the
    driver. The in-process Ray's workers stay where it started; the driver moves away from them."""
    from bertjob import prepare
    from bertjob.config import PrepareConfig

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_classifier_dir, tmp_path / "clf")
    _corpus(tmp_path / "c.parquet", 8, bad=False)
    m = infer.run(InferConfig(input="c.parquet", model="clf", output="scored", num_workers=Workers(1, 1)))
    assert m["rows_scored"] == 8 and pq.read_table(tmp_path / "scored" / "predictions").num_rows == 8
    m = prepare.run(PrepareConfig(input="c.parquet", output="prep", model=tiny_model_dir, max_length=32,
                                  validation_fraction=0.0))  # fmt: skip
    assert m["rows_written"] == 8 and pq.read_table(tmp_path / "prep" / "train").num_rows == 8
