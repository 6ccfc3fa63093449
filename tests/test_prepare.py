"""The prepare job end to end on a local Ray: splits, manifest, quarantine, reruns."""

import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertjob import cli, outputs, prepare
from bertjob.config import ConfigError, PrepareConfig, build
from bertjob.outputs import LEASE, MARKER, OutputError
from bertjob.sources import InputError, open_corpus
from tests.conftest import kill_each_try, kill_session, make_imdb_dir, run_in_session

pytestmark = pytest.mark.integration


def test_imdb_layout_gives_exact_stratified_splits_and_a_balanced_manifest(prepared_small, tiny_model_dir):
    m = json.loads((prepared_small / "manifest.json").read_text())
    rows = {k: v["rows_written"] for k, v in m["splits"].items()}
    assert rows == {"train": 180, "validation": 20, "test": 80, "unsup": 30}
    assert m["splits"]["validation"]["label_counts"] == {"0": 10, "1": 10}
    assert m["splits"]["train"]["label_counts"] == {"0": 90, "1": 90}
    for s in m["splits"].values():
        assert s["rows_read"] == s["rows_written"] + s["rows_quarantined"]
        assert 0 < s["tokens"]["p50"] <= s["tokens"]["p95"] <= s["tokens"]["max"]
    assert m["tokenizer"]["vocab_size"] > 0 and len(m["tokenizer"]["fingerprint"]) == 16
    assert (prepared_small / "config.json").exists()
    train = pq.read_table(prepared_small / "train")
    assert train.num_rows == 180 and set(train.column_names) >= {"id", "label", "input_ids", "length"}
    lengths = train.column("length").to_pylist()
    assert max(lengths) <= 64
    assert all(len(ids) == n for ids, n in zip(train.column("input_ids").to_pylist(), lengths))
    ids = train.column("input_ids").to_pylist()[0]
    assert ids[0] == 2 and ids[-1] == 3  # [CLS] ... [SEP] in the tiny vocabulary
    # validation is disjoint from train, and the same seed gives the same split
    val_ids = set(pq.read_table(prepared_small / "validation").column("id").to_pylist())
    assert not val_ids & set(train.column("id").to_pylist())


def test_bad_rows_are_quarantined_with_reasons_and_counts_balance(
    tmp_path, tiny_model_dir, ray_local, caplog
):
    rows = [
        ("good one great", "pos"), ("bad one awful", "negative"), (None, "pos"), ("", "neg"), ("   \n\t ", "1"),
        ("fine movie", "maybe"), ("<br /><br />", "0"), ("great " * 2_000_000, "POS"), ("\u200b\u200b", "pos"),
    ]  # fmt: skip
    lines = []
    for i, (text, label) in enumerate(rows):
        lines.append(json.dumps({"text": text, "label": label, "rid": f"r{i}"}).encode())
    lines.append(b'{"text": "caf\xe9 au lait awful", "label": 0, "rid": "latin"}')  # Latin-1 bytes
    lines.append(b'{"text": "great fun", "label": null, "rid": "nolabel"}')  # a labelled corpus: quarantined
    lines.append(b'{"text": "awful fun", "rid": "nokey"}')
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="bertjob.prepare"):
        m = prepare.run(PrepareConfig(input=str(tmp_path / "in.jsonl"), output=str(out), model=tiny_model_dir,
                                      max_length=32, head_tokens=8, id_column="rid", validation_fraction=0.0))  # fmt: skip
    # The Latin-1 row's accent became U+FFFD: counted in the manifest alone, without a word
    assert "prepare: 1 of 12 rows held text that is not valid UTF-8, read with U+FFFD" in caplog.text
    assert not (out / outputs.LEASE).exists()  # the run's lease on its output goes when it ends
    # labelled train rows without a validation split: train refused the output only once it was given it
    assert (f"prepare: `bertjob train` will refuse this output: split 'validation' of {out} has no rows (set "
            f"validation_fraction > 0 in prepare)") in caplog.text  # fmt: skip
    train = m["splits"]["train"]
    assert train["rows_read"] == 12 == train["rows_written"] + train["rows_quarantined"]
    assert sum(train["label_counts"].values()) == train["rows_written"]
    assert train["quarantined_by_reason"] == {"empty_text": 4, "missing_label": 2, "null_text": 1,
                                              "unrecognised_label": 1}  # fmt: skip
    assert train["unrecognised_labels"] == {"maybe": 1}  # what the log's warning names
    assert train["utf8_replaced"] == 1 and train["capped_chars"] == 1
    q = pq.read_table(out / "quarantine")
    assert sorted(q.column("id").to_pylist()) == ["nokey", "nolabel", "r2", "r3", "r4", "r5", "r6", "r8"]
    written = pq.read_table(out / "train")
    assert sorted(written.column("id").to_pylist()) == ["latin", "r0", "r1", "r7"]
    huge = written.filter(pa.compute.equal(written.column("id"), "r7")).column("length").to_pylist()
    assert huge == [32]


def test_star_ratings_as_labels_are_an_error_not_ones_read_as_positive(tmp_path, tiny_model_dir, ray_local):
    """A user's reviews with 1-5 stars as the label column: the 1-star reviews were read as
    positive, the rest quarantined, and prepare reported success ('wrote train 36, validation 4')."""
    (tmp_path / "a").mkdir()
    lines = ["id,text,stars"] + [f"{i},great awful film,{1 + i % 5}" for i in range(50)]
    (tmp_path / "a" / "stars.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    cfg = PrepareConfig(input=str(tmp_path / "a"), output=str(out), model=tiny_model_dir,
                        label_column="stars", max_length=16)  # fmt: skip
    # Seen in the first rows: said before any work (it was after all of it)
    with pytest.raises(InputError, match=r"label column 'stars' holds numbers above 1 .*'2' x10.*rating scale.*"
                                         r"\(0 and 10\) would count as negative and positive and the others would be "
                                         r"quarantined.*the middle left out\)$"):  # fmt: skip
        prepare.run(cfg)
    assert not out.exists()
    # Seen only further on (a first file of 0s and 1s): after the run, before the manifest
    (tmp_path / "a" / "0-first.csv").write_text("id,text,stars\nx,great film,1\ny,awful film,0\n")
    with pytest.raises(InputError, match=r"label column 'stars' holds numbers above 1 .*'2' x10.*"
                                         r"rating scale.*\(1 and 11\) would count as negative and positive.*then prepare again"):  # fmt: skip
        prepare.run(cfg)
    assert not (out / "manifest.json").exists()  # train refuses it


def test_polarity_labels_of_one_and_two_are_an_error_saying_to_map_them(tmp_path, tiny_model_dir):
    """Yelp's and Amazon's polarity files label 1 negative, 2 positive: the error asked whether they
    were a rating scale and gave IMDb's rule of 10 stars; neither fit, and it did not say how to map them."""
    lines = ["label,text"] + [f"{1 + i % 2},great awful film" for i in range(20)]
    (tmp_path / "yelp.csv").write_text("\n".join(lines) + "\n")
    cfg = PrepareConfig(input=str(tmp_path / "yelp.csv"), output=str(tmp_path / "out"), model=tiny_model_dir)
    with pytest.raises(InputError, match=r"label column 'label' holds 1 \(10 rows\) and 2 \(10 rows\) but no 0: labels of 1 "
                                         r"negative and 2 positive, as Yelp's and Amazon's polarity files have\? .*"
                                         r"so the 1s would count as positive and the 2s would be quarantined\. "
                                         r"Map 1 to 0 and 2 to 1 first$"):  # fmt: skip
        prepare.run(cfg)
    assert not (tmp_path / "out").exists()


def test_labels_of_another_vocabulary_are_an_error_not_every_row_quarantined(
    tmp_path, tiny_model_dir, ray_local
):
    """A user's reviews labelled good/bad: every row was quarantined, prepare reported success
    ('wrote train 0'), and the pipeline said there was no test split to hold out, with the
    --prepare.test-fraction 0.2 it had been given."""
    (tmp_path / "a").mkdir()
    lines = ["id,text,opinion"] + [f"{i},great awful film,{('good', 'bad')[i % 2]}" for i in range(40)]
    (tmp_path / "a" / "reviews.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    cfg = PrepareConfig(input=str(tmp_path / "a"), output=str(out), model=tiny_model_dir,
                        label_column="opinion", max_length=16, test_fraction=0.2)  # fmt: skip
    with pytest.raises(InputError, match=r"label column 'opinion' holds none of bertjob's labels \('bad' x20, "
                                         r"'good' x20\).*every row would be quarantined. Map yours to 0/1 first.*"
                                         r"then prepare again"):  # fmt: skip
        prepare.run(cfg)
    assert not (out / "manifest.json").exists()
    # Only the whole corpus tells: a first file of other labels before files of 0s and 1s is prepared
    (tmp_path / "a" / "reviews.csv").write_text(
        "\n".join(["id,text,opinion"] + [f"{i},great awful film,{i % 2}" for i in range(40)]) + "\n"
    )
    (tmp_path / "a" / "0-first.csv").write_text("id,text,opinion\nx,great film,mixed\ny,fine film,mixed\n")
    m = prepare.run(cfg)
    assert m["rows_written"] == 40 and m["rows_quarantined"] == 2


def test_rerun_replaces_the_output_and_refuses_foreign_directories(
    tmp_path, imdb_small, tiny_model_dir, ray_local
):
    out = tmp_path / "out"
    cfg = PrepareConfig(input=str(imdb_small), output=str(out), model=tiny_model_dir, max_length=32, head_tokens=8,
                        validation_fraction=0.2)  # fmt: skip
    prepare.run(cfg)
    (out / "train" / "stale.parquet").write_bytes(b"left over")
    m = prepare.run(cfg)
    assert not (out / "train" / "stale.parquet").exists()
    assert m["splits"]["validation"]["rows_written"] == 40
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not written by bertjob"):
        prepare.run(PrepareConfig(input=str(imdb_small), output=str(foreign), model=tiny_model_dir))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_shards_keep_the_corpus_order_whichever_tokenize_actor_finishes_first(
    tmp_path, tiny_model_dir, ray_local
):
    """The same input prepares to the same shards, so a run trains in the same order for the same
    seed. Here the first batch (long reviews) takes the first actor far longer than the second
    batch (short ones) takes the other: the short rows used to reach the writer first."""
    rows = [{"id": f"r{i:05d}", "text": f"review {i} " + ("word " * 600 if i < 1024 else "short"), "label": i % 2}
            for i in range(2048)]  # fmt: skip
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PrepareConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out"), model=tiny_model_dir,
                        id_column="id", batch_size=1024, max_length=512, rows_per_shard=512)  # fmt: skip
    m = prepare.run(cfg)
    assert m["splits"]["train"]["rows_written"] + m["splits"]["validation"]["rows_written"] == 2048
    for split in ("train", "validation"):
        # Each reader takes the shards in the order the manifest lists them; by name, the order of
        # train's was random (each name starts with a random run id).
        units = open_corpus(str(tmp_path / "out"), split=split).units
        assert len(units) == 4
        ids = [i for u in units for i in pq.read_table(u, columns=["id"]).column("id").to_pylist()]
        assert ids == sorted(ids), split  # each split is the corpus' rows in their order
        assert ids[0] < "r01024" < ids[-1]


def test_a_second_run_meanwhile_is_refused_and_a_killed_run_never_leaves_a_directory_that_looks_complete(
    tmp_path, imdb_small, tiny_model_dir, ray_local
):
    """A prepare started on the output of one that is running (the same job submitted twice) emptied
    the directory the first was writing, and each wrote its shards into it: now it is refused."""
    out = tmp_path / "out"
    cfg = PrepareConfig(
        input=str(imdb_small), output=str(out), model=tiny_model_dir, max_length=32, head_tokens=8
    )
    prepare.run(cfg)
    assert (out / "manifest.json").exists()
    # A bigger corpus, prepared by a separate `bertjob prepare` process that we kill part-way.
    with open(tmp_path / "big.jsonl", "w") as f:
        for i in range(60_000):
            f.write(json.dumps({"text": f"great movie number {i} " * 20, "label": i % 2}) + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bertjob", "prepare", "--input", str(tmp_path / "big.jsonl"), "--output", str(out),
         "--model", tiny_model_dir, "--max-length", "32", "--head-tokens", "8", "--batch-size", "256"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (out / "manifest.json").exists():
            time.sleep(0.2)  # the new run removes the old manifest first
        assert not (out / "manifest.json").exists(), "the rerun did not start in time"
        while time.time() < deadline and not (out / LEASE).exists():
            time.sleep(0.05)
        with pytest.raises(OutputError, match=rf"being written by another run now: `bertjob prepare --input "
                           rf"{tmp_path / 'big.jsonl'} .*\(pid {proc.pid} on "):  # fmt: skip
            prepare.run(cfg)
        assert proc.poll() is None and (out / MARKER).exists()  # left as it was, and killed now
    finally:
        kill_session(proc.pid)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()


def _big_jsonl(tmp_path, rows: int, repeats: int = 20) -> None:
    with open(tmp_path / "big.jsonl", "w") as f:
        for i in range(rows):
            f.write(json.dumps({"text": f"great movie number {i} " * repeats, "label": i % 2}) + "\n")


def _prepare_killed(
    tmp_path, model: str, title: str, flags=("--max-length", "32"), python=("-m", "bertjob")
) -> str:
    """The last line of `bertjob prepare` of tmp_path/big.jsonl whose processes titled `title` are
    killed on every try (kill_each_try), which ends it as an error, with no manifest."""
    from bertjob.cluster import BATCH_RETRIES

    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, *python, "prepare", "--input", str(tmp_path / "big.jsonl"), "--output",
             str(tmp_path / "out"), "--model", model, *flags],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    rc, last, kills = kill_each_try(proc, title, 150, tmp_path / "stderr")
    assert rc == 1 and kills >= BATCH_RETRIES + 1, (rc, kills, last)
    assert not (tmp_path / "out" / "manifest.json").exists()
    return last


def test_a_batch_whose_tokenizer_or_reader_is_killed_on_every_try_ends_prepare_with_one_line(
    tmp_path, tiny_model_dir
):
    """The kernel's OOM killer SIGKILLs a tokenize actor whose batch takes more memory than its node
    has, on every try: Ray Data restarted the actor and handed it the same batch again, for ever
    (its default max_task_retries=-1), so the job never ended. Now it ends after a few tries, with
    one line saying what killed it and what to lower. So does a read killed on every try."""
    from bertjob.cluster import BATCH_RETRIES, KILLED_FROM_OUTSIDE

    _big_jsonl(tmp_path, 20_000)
    # without a bound on the retries the job never ended
    last = _prepare_killed(tmp_path, tiny_model_dir, "ray::MapWorker(MapBatches(Tokenize)).submit",
                           ["--max-length", "32", "--batch-size", "256"])  # fmt: skip
    assert last.startswith(
        f"bertjob: error: prepare stopped: a tokenize or write process was killed on each of the {BATCH_RETRIES + 1} "
        f"tries of a batch: it {KILLED_FROM_OUTSIDE}. Where memory ran out, "
    ), last
    assert "lower --batch-size (rows tokenized at once, now 256)" in last
    # The process reading the corpus, a plain task of Ray Data's: retried for ever too (its default
    # max_retries=-1), once the bound above held for the actors.
    last = _prepare_killed(tmp_path, tiny_model_dir, "ray::ReadRead")  # ReadJsonl's tasks
    assert last == (
        f"bertjob: error: prepare stopped: a process reading the corpus was killed on each of its {BATCH_RETRIES + 1} "
        f"tries: it {KILLED_FROM_OUTSIDE}. Where memory ran out, run on nodes with more memory, or split the corpus "
        f"into smaller files; the same command again prepares the corpus anew"
    ), last


def test_a_split_task_killed_on_every_try_ends_prepare_with_one_line(tmp_path, tiny_model_dir):
    """Over LOCAL_SPLIT_ROWS staged train rows, Ray tasks split them into train, validation and
    test. One whose process was killed on every try (the kernel's OOM killer) ended the job in a
    traceback (WorkerCrashedError); now in one line, after as many tries as the other tasks get.
    The command runs with the threshold at 0 so that a small corpus is split in tasks; its rows of
    512 tokens take each try long enough (~0.4 s) to be caught."""
    from bertjob.cluster import BATCH_RETRIES, KILLED_FROM_OUTSIDE

    _big_jsonl(tmp_path, 5_000, repeats=150)
    code = "import sys; from bertjob import cli, prepare; prepare.LOCAL_SPLIT_ROWS = 0; sys.exit(cli.main())"
    last = _prepare_killed(
        tmp_path, tiny_model_dir, "ray::_split_staged", ["--max-length", "512"], ["-c", code]
    )
    assert last == (
        f"bertjob: error: prepare stopped: a process splitting the staged train rows was killed on each of its "
        f"{BATCH_RETRIES + 1} tries: it {KILLED_FROM_OUTSIDE}. Where memory ran out, run on nodes with more memory; "
        f"the same command again prepares the corpus anew"
    ), last


def test_a_prepared_directory_is_refused_as_input_and_left_as_it_is(tmp_path, prepared_small, tiny_model_dir):
    """`bertjob prepare --input prep --output prep` wiped the prepared data, then failed with a
    traceback from inside Ray; with another output it failed inside Ray too. Now one error first."""
    import shutil

    from bertjob import pipeline
    from bertjob.config import PipelineConfig

    prep = tmp_path / "prep"
    shutil.copytree(prepared_small, prep)
    for output in (prep, tmp_path / "again"):
        with pytest.raises(InputError, match=r"input .*prep is already prepared \(a `bertjob prepare` output of "
                           r".*\); give it to train \(--data\), infer or evaluate"):  # fmt: skip
            prepare.run(
                PrepareConfig(input=str(prep), output=str(output), model=tiny_model_dir, max_length=64)
            )
        assert (prep / "manifest.json").exists() and pq.read_table(prep / "train").num_rows == 180
    with pytest.raises(InputError, match="is already prepared"):
        pipeline.run(build(PipelineConfig, {"input": str(prep), "output_dir": str(tmp_path / "p"),
                                            "model": tiny_model_dir, "max_length": 64}))  # fmt: skip
    assert not (tmp_path / "again").exists() and not (tmp_path / "p").exists()


def test_a_prepared_directory_changed_since_is_refused_by_every_reader(
    tmp_path, prepared_small, tiny_model_dir
):
    """A shard deleted, cut short, replaced by another split's or renamed, or a copy of one beside
    them: evaluate, infer, train and pretrain read whatever .parquet files were there, fewer or
    more rows than the manifest counts, and said nothing. Files no reader takes for a shard
    (.DS_Store, a README) are left alone."""
    from bertjob import pretrain, train
    from bertjob.config import PretrainConfig, TrainConfig
    from bertjob.models import load_tokenizer

    m = json.loads((prepared_small / "manifest.json").read_text())
    test, first = m["splits"]["test"]["files"][0]["name"], m["splits"]["train"]["files"][0]["name"]

    def cut(d):
        with open(d / "test" / test, "r+b") as f:
            f.truncate(100)

    cases = [
        ("test", "is missing", lambda d: (d / "test" / test).unlink()),
        ("test", r"has changed \(100 bytes; prepare wrote \d+\)", cut),
        ("train", "has changed", lambda d: shutil.copy(d / "validation" / first, d / "train" / first)),
        ("train", r"is missing \(and 1 more\)", lambda d: (d / "train" / first).rename(d / "train" / "part-x.parquet")),
        ("test", r"part-00001 \(copy\).parquet was not written by prepare",
         lambda d: shutil.copy(d / "test" / test, d / "test" / "part-00001 (copy).parquet")),
    ]  # fmt: skip
    for i, (split, problem, change) in enumerate(cases):
        d = tmp_path / f"p{i}"
        shutil.copytree(prepared_small, d)
        change(d)
        want = rf"prepared data .*p{i}: {split}/.*{problem}.*no longer holds what its manifest.json describes"
        with pytest.raises(InputError, match=want):
            open_corpus(str(d), split=split)
        assert any(
            re.search(want, p) for p in train.check_setup(TrainConfig(data=str(d), model=tiny_model_dir), m)
        )
        if split == "train":
            cfg = PretrainConfig(data=str(d), model=tiny_model_dir)
            assert any(
                re.search(want, p) for p in pretrain.check_setup(cfg, m, load_tokenizer(tiny_model_dir))
            )
    for name in (".DS_Store", "README.txt"):
        (tmp_path / "p0" / "train" / name).write_text("x")
    assert len(open_corpus(str(tmp_path / "p0"), split="train").units) == len(m["splits"]["train"]["files"])
    # Its manifest removed: infer and evaluate read the directory as a corpus ("mixes formats: jsonl
    # (config.json), parquet")
    (tmp_path / "p0" / "manifest.json").unlink()
    with pytest.raises(InputError, match=r"p0 is a `bertjob prepare` output without its manifest.json: its prepare "
                       r"did not finish, or the manifest was removed; run that prepare again"):  # fmt: skip
        open_corpus(str(tmp_path / "p0"), split="test")


def test_label_columns_and_splits_a_user_would_be_surprised_by_are_errors_before_ray(tmp_path):
    """A header `text,Label` (Excel's capital) or `text, label` was read as an unlabelled corpus:
    prepare wrote a train split without labels, and only train said so, as having none. A test
    split got train rows added by --test-fraction, and files named as splits went to one."""
    for header, column in (("text,Label", "'Label'"), ("text, label", "' label'")):
        (tmp_path / "r.csv").write_text(f"{header}\ngreat fun,1\nawful bore,0\n")
        with pytest.raises(
            InputError, match=f"no column 'label', but one named {column}; set --label-column"
        ):
            prepare.open_input(PrepareConfig(input=str(tmp_path / "r.csv"), output=str(tmp_path / "out")))
    # A corpus with a test split of its own got train rows added to it by --test-fraction.
    (tmp_path / "parts" / "split=test").mkdir(parents=True)
    (tmp_path / "parts" / "split=test" / "t.csv").write_text("text,label\ngreat fun,1\n")
    for corpus in (tmp_path / "parts", make_imdb_dir(tmp_path / "imdb", {"train": 2, "test": 2})):
        with pytest.raises(
            InputError, match="has a test split of its own; --test-fraction 0.2 would add train rows"
        ):
            prepare.open_input(
                PrepareConfig(input=str(corpus), output=str(tmp_path / "o"), test_fraction=0.2)
            )
    # Hugging Face's Parquet export (plain_text/train-00000-of-00001.parquet, test-..., unsupervised-...)
    # and Kaggle's train.csv beside test.csv were one corpus, all of it --split train.
    for names in (("train-00000-of-00001.parquet", "test-00000-of-00001.parquet"), ("train.csv", "dev.csv")):
        d = tmp_path / names[0].split(".")[-1]
        d.mkdir()
        for name in names:
            if name.endswith(".parquet"):
                pq.write_table(pa.table({"text": ["great fun"], "label": [1]}), d / name)
            else:
                (d / name).write_text("text,label\ngreat fun,1\n")
        with pytest.raises(InputError, match=rf"its files are named as splits \(.*\), but bertjob puts every file's "
                           rf"rows in one split \(--split train\).* alone \(--input '{d}/train\*'\)"):  # fmt: skip
            prepare.open_input(PrepareConfig(input=str(d), output=str(tmp_path / "o")))
        assert prepare.open_input(PrepareConfig(input=str(d / "train*"), output=str(tmp_path / "o"))).units
    # A DataFrame of every split saved as one file: its test rows were trained on.
    pq.write_table(pa.table({"text": ["great fun", "awful bore"], "label": [1, 0], "split": ["train", "test"]}),
                   tmp_path / "all.parquet")  # fmt: skip
    with pytest.raises(InputError, match=r"a column 'split' \(all.parquet\) is not read: bertjob puts every row "
                       r"in one split \(--split train\)\. Write each split's rows to a directory of their own"):  # fmt: skip
        prepare.open_input(PrepareConfig(input=str(tmp_path / "all.parquet"), output=str(tmp_path / "o")))
    (tmp_path / "r.csv").write_text("text,sentiment\ngreat fun,1\n")  # a label column named, misspelt
    with pytest.raises(InputError, match=r"no file has the label column 'sentimnt' \(columns of r.csv: text, "
                       r"sentiment\); correct --label-column, or leave it out"):  # fmt: skip
        prepare.open_input(PrepareConfig(input=str(tmp_path / "r.csv"), output=str(tmp_path / "o"),
                                         label_column="sentimnt"))  # fmt: skip
    (tmp_path / "r.csv").write_text("text,stars\ngreat fun,5\n")  # unlabelled (for pre-training) as before
    assert not prepare.open_input(
        PrepareConfig(input=str(tmp_path / "r.csv"), output=str(tmp_path / "o"))
    ).labelled


def test_an_output_prepare_may_not_replace_is_refused_before_ray_starts(tmp_path, tiny_model_dir):
    """`bertjob prepare --output scored/` (an infer output) started a local Ray and loaded the
    tokenizer, ~15 s, before saying that it never replaces it: now the command ends at once."""
    import os

    from bertjob import infer
    from bertjob.outputs import claim_output

    claim_output(str(tmp_path / "scored"), "infer", infer.OWN_ENTRIES)
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "great fun", "label": 1}) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = run_in_session([sys.executable, "-m", "bertjob", "prepare", "--input", str(tmp_path / "c.jsonl"),
                           "--output", str(tmp_path / "scored"), "--model", tiny_model_dir], env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"bertjob: error: output {tmp_path / 'scored'} holds an infer output, which `bertjob prepare` never "
        f"replaces; choose another directory"
    ]


def test_a_max_length_past_the_models_positions_is_refused_before_any_work(tmp_path, tiny_model_dir):
    """`--max-length 514` for a RoBERTa (514 position embeddings, 512 usable) tokenized the whole
    corpus, then train refused it."""
    from bertjob.models import ModelError

    roberta = tmp_path / "roberta"
    shutil.copytree(tiny_model_dir, roberta)
    config = json.loads((roberta / "config.json").read_text())
    (roberta / "config.json").write_text(json.dumps({**config, "model_type": "roberta", "max_position_embeddings": 514,
                                                     "pad_token_id": 1}))  # fmt: skip
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "great fun", "label": 1}) + "\n")
    for model, max_length, usable in ((tiny_model_dir, 1024, 512), (str(roberta), 514, 512)):
        with pytest.raises(ModelError, match=rf"max_length {max_length} is more than model .* has positions for "
                                             rf"\({usable}\); give --max-length {usable} or less"):  # fmt: skip
            prepare.run(PrepareConfig(input=str(tmp_path / "c.jsonl"), output=str(tmp_path / "o"), model=model,
                                      max_length=max_length))  # fmt: skip
        assert not (tmp_path / "o").exists()


def test_empty_input_is_an_error_before_any_output(tmp_path, tiny_model_dir, ray_local):
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(InputError, match="no rows"):
        prepare.run(
            PrepareConfig(
                input=str(tmp_path / "empty.csv"), output=str(tmp_path / "out"), model=tiny_model_dir
            )
        )
    assert not (tmp_path / "out").exists()


def test_a_corpus_whose_every_row_is_quarantined_is_an_error_its_outputs_kept(
    tmp_path, tiny_model_dir, ray_local, capsys
):
    """Texts all blank or labels all missing: `bertjob prepare` logged 'wrote train 0' and a warning,
    and exited 0; only the pipeline or train said more. Now one line and exit 2, the quarantine and
    manifest kept to look at."""
    lines = ["text,label"] + [" ,1" if i % 2 else "great fun," for i in range(10)]
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["prepare", "--input", str(tmp_path / "r.csv"), "--output", str(out), "--model", tiny_model_dir,
                  "--max-length", "32"])  # fmt: skip
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        f"bertjob: error: input {tmp_path / 'r.csv'}: nothing prepared: prepare quarantined all 10 rows (empty_text "
        f"5, missing_label 5; they are in {out / 'quarantine'}). Give each row a text and a label (0/1, neg/pos, "
        f"negative/positive, false/true), or name the columns that hold them (--text-column, --label-column)\n"
    )
    assert pq.read_table(out / "quarantine").num_rows == 10
    assert json.loads((out / "manifest.json").read_text())["rows_quarantined"] == 10


def test_only_a_corpus_with_no_row_kept_is_nothing_prepared():
    """Which corpus is nothing to prepare, and which nothing to train on (the pipeline's): not one of
    unlabelled or test rows alone, which prepare keeps (none of them train rows)."""

    def manifest(**splits):
        return {"splits": {name: {"rows_read": read, "rows_written": kept, "quarantined_by_reason": {"empty_text":
                read - kept}} for name, (read, kept) in splits.items()}}  # fmt: skip

    def problem(m, split=None, in_pipeline=False):
        return prepare.nothing_kept("r.csv", "out", m, split, in_pipeline)

    for kept in (manifest(unsup=(5, 5)), manifest(test=(5, 4)), manifest(train=(5, 0), test=(5, 5))):
        assert problem(kept) is None
    assert problem(manifest(test=(5, 5)), "train", True) is None  # train's own check: no train rows
    assert problem(manifest(train=(5, 0), test=(5, 5)), "train", True) == (
        "input r.csv: nothing to train on: prepare quarantined all 5 train rows (empty_text 5; they are in "
        "out/quarantine). Give each row a text, or name the column that holds it (--prepare.text-column)"
    )
    assert problem(manifest(train=(3, 0), unsup=(2, 0))).startswith(
        "input r.csv: nothing prepared: prepare quarantined all 5 rows (empty_text 5; they are in out/quarantine)"
    )


def test_a_corpus_without_train_rows_needs_no_validation_split(tmp_path, tiny_model_dir, ray_local):
    (tmp_path / "t.csv").write_text("text,label\ngreat movie,pos\nawful movie,neg\n")
    out = tmp_path / "out"
    m = prepare.run(
        PrepareConfig(input=str(tmp_path / "t.csv"), output=str(out), model=tiny_model_dir, split="test")
    )
    assert {k: v["rows_written"] for k, v in m["splits"].items()} == {"test": 2}
    assert not (out / "_staging").exists()


def test_a_corpus_without_a_test_split_holds_one_out_of_train(tmp_path, tiny_model_dir, ray_local, caplog):
    """One labelled file (the common Kaggle layout): test_fraction carves an exact, stratified test
    split out of train beside validation's, disjoint, every row in exactly one split."""
    rows = [
        {"rid": f"r{i}", "text": f"great fun {i}" if i % 3 else f"awful bore {i}", "label": int(i % 3 > 0)}
        for i in range(300)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "reviews.parquet")
    out = tmp_path / "out"
    m = prepare.run(PrepareConfig(input=str(tmp_path / "reviews.parquet"), output=str(out), model=tiny_model_dir,
                                  max_length=16, head_tokens=4, id_column="rid", test_fraction=0.2))  # fmt: skip
    counts = {k: v["label_counts"] for k, v in m["splits"].items()}
    assert counts == {
        "test": {"0": 20, "1": 40},
        "validation": {"0": 10, "1": 20},
        "train": {"0": 70, "1": 140},
    }
    ids = {s: pq.read_table(out / s).column("id").to_pylist() for s in counts}
    assert sorted(i for split in ids.values() for i in split) == sorted(r["rid"] for r in rows)
    assert m["test_from_train"] == {"fraction": 0.2, "seed": 42, "stratified": True, "by": "text"}
    assert not (out / "_staging").exists()
    known = prepare.splits_written(
        PrepareConfig(output="x", test_fraction=0.2), open_corpus(str(tmp_path / "reviews.parquet"))
    )
    assert known == {"train", "validation", "test"}  # before reading: the pipeline's check
    with pytest.raises(ConfigError, match="validation_fraction \\+ test_fraction"):
        build(PrepareConfig, {"input": "x", "output": "y", "validation_fraction": 0.5, "test_fraction": 0.5})
    # A corpus with a validation split of its own (split=validation/) keeps it as it is: a share of
    # train (--validation-fraction, 0.1 by default) was added to it.
    table = pa.Table.from_pylist(
        [{**r, "split": "validation" if i < 30 else "train"} for i, r in enumerate(rows)]
    )
    pq.write_to_dataset(table, tmp_path / "parts", partition_cols=["split"])
    m = prepare.run(PrepareConfig(input=str(tmp_path / "parts"), output=str(tmp_path / "out-parts"),
                                  model=tiny_model_dir, max_length=16, id_column="rid"))  # fmt: skip
    assert {k: v["rows_written"] for k, v in m["splits"].items()} == {"validation": 30, "train": 270}
    assert m["validation"]["fraction"] == 0.0


def test_a_review_repeated_under_another_id_is_never_trained_on_and_held_out_at_once(
    tmp_path, tiny_model_dir, ray_local, caplog
):
    """Held-out rows are chosen by a hash of the cleaned text. Chosen by id, a review repeated under
    another id (Kaggle's IMDB Dataset.csv repeats 418, scraped corpora many more) landed in train
    and its twin in validation or test, and the held-out accuracy counted reviews trained on. A
    corpus' own test split holding train's reviews is counted and said."""

    def review(n: int) -> str:
        return f"{'great fun' if n % 2 else 'awful bore'} {chr(97 + n // 10)} {chr(97 + n % 10)}"

    rows = [  # each train review twice, the second copy with markup that cleaning removes
        {"rid": f"r{i}", "text": review(i % 100) if i < 100 else f" {review(i % 100)} <br /><br />",
         "label": i % 2, "split": "train"} for i in range(200)
    ] + [{"rid": f"t{n}", "text": review(n), "label": n % 2, "split": "test"} for n in range(97, 120)]  # fmt: skip
    pq.write_to_dataset(pa.Table.from_pylist(rows), tmp_path / "parts", partition_cols=["split"])
    with caplog.at_level("WARNING"):
        m = prepare.run(PrepareConfig(input=str(tmp_path / "parts"), output=str(tmp_path / "out"),
                                      model=tiny_model_dir, max_length=16, id_column="rid", validation_fraction=0.3))  # fmt: skip
    counts = {k: v["label_counts"] for k, v in m["splits"].items()}
    assert counts == {"test": {"0": 11, "1": 12}, "validation": {"0": 30, "1": 30}, "train": {"0": 70, "1": 70}}  # fmt: skip
    texts = {s: {tuple(ids) for ids in pq.read_table(tmp_path / "out" / s).column("input_ids").to_pylist()}
             for s in counts}  # fmt: skip
    # each review in one split, both its copies there
    assert len(texts["train"]) + len(texts["validation"]) == 100
    assert m["validation"]["by"] == "text"
    assert "100 train rows repeat the text of another row of their label" in caplog.text
    # test's 3 reviews of train's are counted, wherever train's copies went
    shared = m["shared_texts"]
    assert shared["train/validation"] == 0 and shared["test/train"] + shared["test/validation"] == 3
    assert "held-out splits hold texts of the splits trained on (test/train 3; " in caplog.text
    # said of a review trained on and held out, not of one held out twice or trained on twice
    pairs = ("test/train", "test/validation", "train/unsup", "test/unsup", "unsup/validation")
    assert [p for p in pairs if prepare._leaks(p)] == ["test/train", "test/unsup", "unsup/validation"]


def test_driver_and_ray_tasks_give_the_same_validation_split(
    tmp_path, imdb_small, prepared_small, tiny_model_dir, ray_local, monkeypatch
):
    monkeypatch.setattr(prepare, "LOCAL_SPLIT_ROWS", 0)  # small corpora split in the driver; force tasks
    out = tmp_path / "out"
    m = prepare.run(PrepareConfig(input=str(imdb_small), output=str(out), model=tiny_model_dir, max_length=64,
                                  head_tokens=16))  # fmt: skip
    assert {k: v["rows_written"] for k, v in m["splits"].items()} == {
        "train": 180, "validation": 20, "test": 80, "unsup": 30,
    }  # fmt: skip
    for split in ("train", "validation"):
        ids = sorted(pq.read_table(out / split).column("id").to_pylist())
        assert ids == sorted(pq.read_table(prepared_small / split).column("id").to_pylist())
    assert not (out / "_staging").exists()


def test_files_no_write_reported_are_removed(tmp_path):
    sink = prepare.PreparedSink(str(tmp_path))
    batch = pa.table({
        "id": ["a", "b"], "split": ["test", "test"], "label": pa.array([1, 0], pa.int8()),
        "input_ids": pa.array([[2, 5, 3], [2, 3]], pa.list_(pa.int32())), "length": pa.array([3, 2], pa.int32()),
        "full_length": pa.array([3, 2], pa.int32()), "truncated": [False, False], "capped": [False, False],
        "utf8_replaced": [False, False], "reason": pa.array([None, None], pa.string()),
        "raw_label": ["pos", "neg"], "raw_text": pa.array([None, None], pa.string()),
        "h": pa.array([0, 0], pa.uint64()),
    })  # fmt: skip
    stats, kept = sink.write_blocks([batch], 0)
    assert stats["test"]["rows_written"] == 2 and list(kept.values()) == [2]
    failed = prepare.PreparedSink(str(tmp_path)).write_blocks([batch], 0)[1]  # an attempt nobody saw end
    assert len(list((tmp_path / "test").glob("*.parquet"))) == 2
    assert prepare.remove_unfinished(str(tmp_path), kept) == list(failed)
    assert pq.read_table(tmp_path / "test").num_rows == 2


def test_a_disk_that_fills_under_the_writers_is_one_line_naming_the_output(
    tmp_path, tiny_model_dir, ray_local, capsys
):
    """A full disk met by the shard writers (Ray Data actors) ended prepare with a traceback: Ray
    Data wrapped the OSError in a UserCodeException that held it only as text."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        pytest.skip("needs a small tmpfs (mount as root)")
    try:
        rows = [f"{i},great awful film number {i} " + "and more words " * 20 for i in range(600)]
        (tmp_path / "r.csv").write_text("id,text\n" + "\n".join(rows) + "\n")
        with pytest.raises(SystemExit) as exit_:
            cli.main(["prepare", "--input", str(tmp_path / "r.csv"), "--output", str(disk / "p"), "--model",
                      tiny_model_dir, "--max-length", "64", "--rows-per-shard", "50"])  # fmt: skip
        assert exit_.value.code == 1
        assert capsys.readouterr().err.endswith(
            f"No space left on device; free space where the job writes (output {disk}/p), or give it another "
            f"directory\nbertjob: prepare does not resume: the same command again prepares from the start\n"
        )
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # a writer may hold a file open
