import gzip
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertjob import models
from bertjob.config import PrepareConfig
from bertjob.prepare import tokenize_batch
from bertjob.sources import InputError, open_corpus
from tests.conftest import make_imdb_dir, tar_dir


def read_all(corpus):
    return pa.concat_tables([t for u in corpus.units for t in corpus.read(u)])


def test_imdb_dir_and_tar_give_the_same_rows(imdb_small, tmp_path):
    from_dir = read_all(open_corpus(str(imdb_small)))
    tar = tar_dir(imdb_small, tmp_path / "aclImdb_v1.tar.gz")
    from_tar = read_all(open_corpus(str(tar)))
    assert from_dir.num_rows == from_tar.num_rows == 310
    assert sorted(from_dir.column("id").to_pylist()) == sorted(from_tar.column("id").to_pylist())
    splits = from_dir.column("split").to_pylist()
    assert (splits.count("train"), splits.count("test"), splits.count("unsup")) == (200, 80, 30)
    row = from_dir.filter(pa.compute.equal(from_dir.column("split"), "unsup")).slice(0, 1).to_pylist()[0]
    assert row["label"] is None and row["id"].startswith("train/unsup/")


def test_csv_jsonl_parquet_with_configurable_columns(tmp_path):
    (tmp_path / "a.csv").write_bytes(
        'review,sentiment,key\n"caf\xe9, good",pos,k1\nbad,negative,k2\n'.encode("latin-1")
    )
    c = open_corpus(str(tmp_path / "a.csv"), text_column="review", label_column="sentiment", id_column="key")
    t = read_all(c).to_pylist()
    assert [r["id"] for r in t] == ["k1", "k2"]
    assert t[0]["utf8_replaced"] and t[0]["text"] == "caf\ufffd, good" and t[0]["label"] == "pos"

    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(
            json.dumps({"text": "fine", "label": 1})
            + "\n\n"
            + json.dumps({"text": None, "label": "neg"})
            + "\n"
        )
    t = read_all(open_corpus(str(tmp_path / "b.jsonl.gz"))).to_pylist()
    assert [(r["text"], r["label"]) for r in t] == [("fine", "1"), (None, "neg")]
    assert t[0]["id"] == "b.jsonl.gz:0" and t[1]["id"] == "b.jsonl.gz:1"

    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"text": ["x", "y", "z"]}), d / "part-0.parquet")
    pq.write_table(pa.table({"text": ["w"]}), d / "part-1.parquet")
    t = read_all(open_corpus(str(d)))
    assert t.column("id").to_pylist() == [
        "part-0.parquet:0",
        "part-0.parquet:1",
        "part-0.parquet:2",
        "part-1.parquet:0",
    ]
    assert len(open_corpus(str(d / "*.parquet")).units) == 2


def test_missing_text_column_names_the_file_and_its_columns(tmp_path):
    (tmp_path / "a.csv").write_text("body,label\nhello,1\n")
    with pytest.raises(InputError) as err:
        open_corpus(str(tmp_path / "a.csv"))
    assert "a.csv" in str(err.value) and "'text'" in str(err.value) and "['body', 'label']" in str(err.value)
    # Excel's CSV in many locales: semicolons; the fix is the separator, not --text-column. Its
    # first review with a comma was a parse error ("Expected 1 columns, got 2") that did not say so.
    for name, content in (("semi", "text;label\nhello;1\n"), ("tab", "id\ttext\n1\tGreat, loved it\n")):
        (tmp_path / f"{name}.csv").write_text(content)
        with pytest.raises(
            InputError,
            match=r"holds no comma: the file looks '(;|\\t)'-separated; bertjob reads .csv files as comma-sep",
        ):
            open_corpus(str(tmp_path / f"{name}.csv"))
    # Excel's CSV in Windows-1252: a review's accents are replaced and counted, but a header's named
    # no column and said only "'utf-8' codec can't decode byte 0xe9"
    (tmp_path / "cp1252.csv").write_bytes("texte,\xe9valuation\nTr\xe8s bien,1\n".encode("cp1252"))
    with pytest.raises(
        InputError, match=r"cp1252.csv: its header .* is not UTF-8 .* iconv -f CP1252 -t UTF-8"
    ):
        open_corpus(str(tmp_path / "cp1252.csv"))


def test_a_tsv_file_is_read_as_csv_separated_by_tabs(tmp_path):
    """GLUE's SST-2 comes as .tsv files: they were an unknown format. Quoted as Python's csv module
    and pandas write them, a field may hold a tab, a newline or a quote."""
    import csv

    rows = [
        ("s1", "a comma, and a\ttab", "1"),
        ("s2", 'a "quote"\nand a second line', "0"),
        ("s3", "plain", "1"),
    ]
    with open(tmp_path / "train.tsv", "w", newline="") as f:
        csv.writer(f, dialect="excel-tab").writerows([("id", "sentence", "label"), *rows])
    with open(tmp_path / "train.tsv", "rb") as f, gzip.open(tmp_path / "copy.tsv.gz", "wb") as g:
        g.write(f.read())
    for name in ("train.tsv", "copy.tsv.gz"):
        corpus = open_corpus(str(tmp_path / name), text_column="sentence", id_column="id")
        assert [(r["id"], r["text"], r["label"]) for r in read_all(corpus).to_pylist()] == rows
        assert corpus.describe().startswith(f"tsv corpus at {tmp_path / name} (1 unit(s)")  # the log's line
    # a .tsv file whose first line holds commas alone is comma-separated: said so, not a missing column
    (tmp_path / "commas.tsv").write_text("text,label\ngood,1\n")
    with pytest.raises(InputError, match=r"commas.tsv: .* holds no tab: the file looks ','-separated"):
        open_corpus(str(tmp_path / "commas.tsv"))
    (tmp_path / "rows.tsv").write_text("1\tLoved it, every minute of a film this long.\n0\tdull\n")
    with pytest.raises(InputError) as err:
        open_corpus(str(tmp_path / "rows.tsv"))
    assert str(err.value).endswith("(printf 'label\\ttext\\n'; cat rows.tsv) > header-rows.tsv")


def test_a_csv_file_without_a_header_is_an_error_saying_so(tmp_path):
    """Yelp's and Amazon's polarity CSVs have no header: the error listed the first review as a
    column name, hundreds of characters of it, and did not say that a header was wanted."""
    review = "This movie was so horrible, " * 20
    (tmp_path / "yelp.csv").write_text(f'"1","{review}"\n"2","Loved it, every minute."\n')
    with pytest.raises(InputError) as err:
        open_corpus(str(tmp_path / "yelp.csv"))
    message = str(err.value)
    assert (
        "its first line ('1', 'This movie was so horrible, This movie w...') looks like a row, not a header"
        in message
    )
    assert message.endswith("(echo 'label,text'; cat yelp.csv) > header-yelp.csv") and review not in message
    (tmp_path / "h.csv").write_text(f'label,text\n"1","{review}"\n')  # the header that message suggests
    assert read_all(open_corpus(str(tmp_path / "h.csv"))).num_rows == 1


def test_a_dataset_saved_with_save_to_disk_is_read_with_its_splits(tmp_path):
    """A `datasets` save_to_disk directory was read as files: its dataset_info.json was refused as a
    JSON array, with advice to convert it with jq, and its Arrow files were left out."""
    import datasets

    rows = {"sentence": ["great", "awful", "fine"], "label": [1, 0, 1]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    corpus = open_corpus(str(tmp_path / "one"), text_column="sentence")
    t = read_all(corpus)
    assert corpus.labelled and t.column("text").to_pylist() == rows["sentence"]
    assert set(t.column("split").to_pylist()) == {"train"}  # a Dataset's rows go to --split
    parts = {
        "train": datasets.Dataset.from_dict(rows),
        "test": datasets.Dataset.from_dict({"sentence": ["meh"]}),
    }
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "dict"))
    corpus = open_corpus(str(tmp_path / "dict"), text_column="sentence")
    t = read_all(corpus)
    assert corpus.splits() == {"train", "test"} and t.column("split").to_pylist() == ["train"] * 3 + ["test"]
    assert t.column("label").to_pylist() == ["1", "0", "1", None]
    with pytest.raises(InputError, match=r"dict/train/data-00000-of-00001.arrow: no column 'text'; the columns are "
                                         r"\['sentence', 'label'\]"):  # fmt: skip
        open_corpus(str(tmp_path / "dict"))
    datasets.DatasetDict({"dev": parts["test"]}).save_to_disk(str(tmp_path / "dev"))
    with pytest.raises(InputError, match="its split 'dev' is not a split bertjob reads"):
        open_corpus(str(tmp_path / "dev"), text_column="sentence")


def test_a_manifest_json_of_another_tool_or_stage_is_not_taken_for_a_prepared_one(tmp_path):
    """A corpus directory with its own manifest.json (a download's list of files), or an infer
    output given as input, was refused as 'manifest.json is not a bertjob prepared manifest'."""
    d = tmp_path / "download"
    d.mkdir()
    pq.write_table(pa.table({"text": ["good", "bad"]}), d / "reviews.parquet")
    (d / "manifest.json").write_text('{"files": ["reviews.parquet"]}')
    with pytest.raises(
        InputError, match=r"mixes formats: jsonl \(manifest.json\), parquet \(reviews.parquet\)"
    ):
        open_corpus(str(d))
    assert read_all(open_corpus(str(d / "*.parquet"))).num_rows == 2
    scored = tmp_path / "scored"
    scored.mkdir()
    (scored / "_bertjob_output").write_text('{"stage": "infer"}')
    (scored / "manifest.json").write_text('{"format": "bertjob-infer/1"}')
    with pytest.raises(InputError, match=r"scored is an infer output of bertjob, not a corpus; give the corpus it "
                                         r"came from, or a `bertjob prepare` output$"):  # fmt: skip
        open_corpus(str(scored))


def test_a_text_column_of_lists_or_structs_is_an_error_naming_its_type(tmp_path):
    """Such a column (or a JSONL value) was scored as its Python repr ("['Great film', 'loved it']") without a word."""
    sentences = pa.array([["Great film", "loved it"], ["dull"]])
    for name, column in (
        ("l.parquet", sentences),
        ("s.parquet", pa.array([{"body": "good"}, {"body": "bad"}])),
    ):
        pq.write_table(pa.table({"text": column, "body": ["good", "bad"]}), tmp_path / name)
        with pytest.raises(
            InputError, match=f"{name}: column 'text' holds (list|struct)<.*> values, not text"
        ):
            open_corpus(str(tmp_path / name))
        assert read_all(open_corpus(str(tmp_path / name), text_column="body")).num_rows == 2
    (tmp_path / "l.jsonl").write_text('{"text": "fine"}\n{"text": ["Great film", "loved it"]}\n')
    with pytest.raises(InputError, match="l.jsonl, line 2: 'text' holds a JSON array, not text"):
        read_all(open_corpus(str(tmp_path / "l.jsonl")))
    (tmp_path / "n.jsonl").write_text('{"text": "fine", "stars": 4}\n{"text": "10/10", "stars": 5}\n')
    with pytest.raises(InputError, match="n.jsonl, line 1: 'stars' holds a JSON number, not text; set --text-column "
                                         "to the review's text$"):  # fmt: skip
        read_all(open_corpus(str(tmp_path / "n.jsonl"), text_column="stars"))
    assert read_all(open_corpus(str(tmp_path / "n.jsonl"))).column("text").to_pylist() == ["fine", "10/10"]
    # pandas' df.to_json() (its default orient, one line) was told to join the review's parts
    pd.DataFrame({"text": ["fine", "dull"], "label": [1, 0]}).to_json(tmp_path / "pandas.json")
    with pytest.raises(
        InputError, match=r"pandas.json, line 1: a table of columns .* orient='records', lines=True\)$"
    ):
        read_all(open_corpus(str(tmp_path / "pandas.json")))
    pq.write_table(pa.table({"text": pa.array(["a", None]).dictionary_encode()}), tmp_path / "d.parquet")
    assert read_all(open_corpus(str(tmp_path / "d.parquet"))).column("text").to_pylist() == ["a", None]
    # A --text-column naming the rating or the date was scored as "4" or "2024-05-01 00:00:00"
    for name, column in (
        ("i.parquet", pa.array([4, 1])),
        ("b.parquet", pa.array([True, False])),
        ("t.parquet", pa.array([0, 1], pa.timestamp("s"))),
        ("di.parquet", pa.array([4, 1]).dictionary_encode()),
    ):
        pq.write_table(pa.table({"text": column, "body": ["good", "bad"]}), tmp_path / name)
        with pytest.raises(InputError, match=f"{name}: column 'text' holds .* values, not text; set --text-column "
                                             f"to the column of the review's text$"):  # fmt: skip
            open_corpus(str(tmp_path / name))
    texts = (pa.array(["a", "b"], pa.large_string()), pa.array([b"a", b"b"]), pa.array([b"a", b"b"], pa.large_binary()),
             pa.nulls(2))  # fmt: skip
    for i, column in enumerate(texts):
        pq.write_table(pa.table({"text": column}), tmp_path / f"ok{i}.parquet")
        assert read_all(open_corpus(str(tmp_path / f"ok{i}.parquet"))).num_rows == 2


def test_unreadable_and_empty_inputs_are_clear_errors(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="broken.parquet"):
        open_corpus(str(tmp_path / "broken.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no IMDb layout"):
        open_corpus(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="no such file"):
        open_corpus(str(tmp_path / "nope.csv"))
    os.mkfifo(tmp_path / "fifo.csv")  # was a traceback: NotADirectoryError listing it
    with pytest.raises(InputError, match="fifo.csv: neither a regular file nor a directory"):
        open_corpus(str(tmp_path / "fifo.csv"))
    with pytest.raises(InputError, match="broken.parquet: cannot be listed"):  # a directory that is not one
        open_corpus(str(tmp_path / "broken.parquet" / "*.csv"))
    for fmt in ("csv", "jsonl"):  # named .gz, not gzip: "zlib inflate failed", naming no file
        (tmp_path / f"plain.{fmt}.gz").write_text("text,label\ngood,1\n")
        with pytest.raises(
            InputError, match=rf"plain.{fmt}.gz: cannot be read as {fmt} \(zlib inflate failed"
        ):
            open_corpus(str(tmp_path / f"plain.{fmt}.gz"))


@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar-plain", "bz2"])
def test_tar_reader_matches_tarfile_for_long_names_pax_plain_and_other_compressions(tmp_path, fmt):
    """The streaming tar parser against Python's tarfile: same members, same bytes."""
    import io
    import re
    import tarfile

    import pyarrow.fs as pafs

    from bertjob.sources import tar_members

    long_dir = "aclImdb/" + "d" * 120 + "/train/pos"  # over ustar's 100-character name field
    files = {f"aclImdb/train/pos/{i}_9.txt": f"review {i} caf\u00e9".encode() * (i + 1) for i in range(5)}
    files[f"{long_dir}/7_8.txt"] = b"x" * 1000  # a long name: GNU 'L' or pax 'x' header
    files["aclImdb/README"] = b"not a review"
    tar_format, mode, name = {
        "gnu": (tarfile.GNU_FORMAT, "w:gz", "a.tar.gz"),
        "pax": (tarfile.PAX_FORMAT, "w:gz", "a.tar.gz"),
        "ustar-plain": (tarfile.USTAR_FORMAT, "w", "a.tar"),
        "bz2": (tarfile.PAX_FORMAT, "w:bz2", "a.tar.gz"),  # misnamed on purpose: read by its bytes
    }[fmt]
    if fmt == "ustar-plain":
        files.pop(f"{long_dir}/7_8.txt")  # ustar cannot hold it
    path = tmp_path / name
    with tarfile.open(path, mode, format=tar_format) as tf:
        for n, data in files.items():
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    wanted = re.compile(r"\.txt$")
    got = {n: read() for n, read in tar_members(pafs.LocalFileSystem(), str(path), wanted)}
    assert got == {n: d for n, d in files.items() if n.endswith(".txt")}
    # members left unread are skipped, not mixed into the next one
    names = [n for n, _ in tar_members(pafs.LocalFileSystem(), str(path), wanted)]
    assert names == [n for n in files if n.endswith(".txt")]


def test_a_corrupt_tar_is_a_clear_error(tmp_path):
    import pyarrow.fs as pafs

    from bertjob.sources import IMDB_FILE, tar_members

    path = tmp_path / "aclImdb_v1.tar.gz"
    path.write_bytes(gzip.compress(b"this is not a tar archive" * 100))
    with pytest.raises(InputError, match="not a tar archive"):
        list(tar_members(pafs.LocalFileSystem(), str(path), IMDB_FILE))


def test_a_corpus_is_labelled_when_its_files_have_the_label_column(tmp_path, imdb_small):
    pq.write_table(pa.table({"text": ["a", "b"], "label": [1, None]}), tmp_path / "l.parquet")
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "u.parquet")
    (tmp_path / "l.jsonl").write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": null}\n')
    (tmp_path / "u.jsonl").write_text('{"text": "a"}\n')
    assert (
        open_corpus(str(tmp_path / "l.parquet")).labelled and open_corpus(str(tmp_path / "l.jsonl")).labelled
    )
    unlabelled = open_corpus(str(tmp_path / "u.parquet"))
    assert not unlabelled.labelled  # and prepare's log says so, naming the one file it reads:
    assert unlabelled.describe() == (
        f"parquet corpus at {tmp_path / 'u.parquet'} (1 unit(s), unlabelled: no column 'label')"
    )
    assert "unlabelled" not in open_corpus(str(tmp_path / "l.parquet")).describe()
    assert not open_corpus(str(tmp_path / "u.jsonl")).labelled
    assert not open_corpus(str(tmp_path / "l.parquet"), label_column="").labelled
    assert open_corpus(str(imdb_small)).labelled


def test_a_file_without_the_label_column_of_a_labelled_corpus_is_named(tmp_path, caplog):
    """Its rows were quarantined one by one as missing_label, and no message named the file."""
    (tmp_path / "a.csv").write_text("text,label\ngreat,1\n")
    (tmp_path / "b.csv").write_text("text\ndull\n")
    (tmp_path / "c.csv").write_text("")  # no columns, no rows: not named
    with caplog.at_level(logging.WARNING, logger="bertjob.sources"):
        assert open_corpus(str(tmp_path)).labelled
        assert not open_corpus(str(tmp_path / "[bc].csv")).labelled  # unlabelled as a whole: nothing to say
    assert caplog.messages == [f"input {tmp_path}: 1 of 3 files have no column 'label' (b.csv): their rows have no label"]


def test_a_label_in_the_path_of_a_partitioned_dataset_is_read(tmp_path):
    """A dataset partitioned by its label (Spark's, pyarrow's or Ray Data's write with partition
    columns) keeps the label in the directory names, not in the files: it was read as unlabelled."""
    table = pa.table({"text": ["good", "bad", "fine", "meh"], "label": ["pos", "neg", "pos", "very bad"]})
    pq.write_to_dataset(table, tmp_path / "pq", partition_cols=["label"])
    c = open_corpus(str(tmp_path / "pq"))
    assert c.labelled and "unlabelled" not in c.describe()
    rows = sorted((r["text"], r["label"]) for r in read_all(c).to_pylist())
    assert rows == [("bad", "neg"), ("fine", "pos"), ("good", "pos"), ("meh", "very bad")]

    for name, rows in {
        "sentiment=pos": "text\nloved it\n",
        "sentiment=__HIVE_DEFAULT_PARTITION__": "text\nhm\n",
    }.items():
        (tmp_path / "csv" / name).mkdir(parents=True)
        (tmp_path / "csv" / name / "part.csv").write_text(rows)
    (tmp_path / "csv" / "sentiment=neg").mkdir()  # a file's own column is its label, as in pyarrow
    (tmp_path / "csv" / "sentiment=neg" / "part.csv").write_text("text,sentiment\nawful,negative\n")
    c = open_corpus(str(tmp_path / "csv" / "**" / "*.csv"), label_column="sentiment")
    assert c.labelled
    rows = sorted((r["text"], r["label"]) for r in read_all(c).to_pylist())
    assert rows == [("awful", "negative"), ("hm", None), ("loved it", "pos")]  # Hive's null: no label


def test_the_split_in_the_path_of_a_partitioned_dataset_is_read(tmp_path):
    """reviews/split=train/, reviews/split=test/ (Hive's layout, as Spark or pyarrow write a split
    column): every row went to --split, train, so that prepare trained on the test rows."""
    table = pa.table({"text": ["good", "bad", "fine", "meh"], "label": [1, 0, 1, 0], "split": ["train", "train", "test", "unsupervised"]})  # fmt: skip
    pq.write_to_dataset(table, tmp_path / "pq", partition_cols=["split"])
    # A file outside the split=... directories goes to --split.
    pq.write_table(pa.table({"text": ["fine"], "label": [1]}), tmp_path / "pq" / "loose.parquet")
    c = open_corpus(str(tmp_path / "pq"), split="train")
    assert c.splits() == {"train", "test", "unsup"}
    rows = sorted((r["text"], r["split"]) for r in read_all(c).to_pylist())
    assert rows == [
        ("bad", "train"),
        ("fine", "test"),
        ("fine", "train"),
        ("good", "train"),
        ("meh", "unsup"),
    ]
    for kind, body in (("csv", "text,label\nloved it,1\n"), ("jsonl", '{"text": "loved it", "label": 1}\n')):
        (tmp_path / kind / "split=test").mkdir(parents=True)
        (tmp_path / kind / "split=test" / f"part.{kind}").write_text(body)
        assert [r["split"] for r in read_all(open_corpus(str(tmp_path / kind))).to_pylist()] == ["test"]
    (tmp_path / "csv" / "split=dev").mkdir()  # a name train, evaluate and the pipeline would not read
    (tmp_path / "csv" / "split=dev" / "part.csv").write_text("text,label\nfine,1\n")
    with pytest.raises(
        InputError, match=r"split=dev/part.csv: split=dev is not a split bertjob reads \(train, "
    ):
        open_corpus(str(tmp_path / "csv"))


def test_a_glob_matches_each_path_segment_like_a_shell(tmp_path):
    """`*`, `?` and `[...]` never match `/`: gl/*.parquet is the files in gl/, not also gl/backup/'s."""
    rows = pa.table({"id": ["1", "2", "3"], "text": ["a", "b", "c"], "label": [1, 0, 1]})
    top, backup = tmp_path / "gl" / "a.parquet", tmp_path / "gl" / "backup" / "a.parquet"
    backup.parent.mkdir(parents=True)
    pq.write_table(rows, top)
    pq.write_table(rows, backup)
    corpus = open_corpus(str(tmp_path / "gl" / "*.parquet"))
    assert corpus.units == [str(top)] and read_all(corpus).num_rows == 3
    assert open_corpus(str(tmp_path / "gl" / "?.parquet")).units == [str(top)]
    assert open_corpus(str(tmp_path / "gl" / "*" / "a.parquet")).units == [str(backup)]
    nested = open_corpus(str(tmp_path / "gl" / "b[a]ckup" / "*.parquet"))
    assert nested.units == [str(backup)]
    assert read_all(nested).column("id").to_pylist()[0] == "backup/a.parquet:0"  # from gl/, not ../
    with pytest.raises(InputError, match="matches no file"):
        open_corpus(str(tmp_path / "g*.parquet"))
    with pytest.raises(
        InputError, match=r"\[final\].csv: no such file or directory, and as a glob pattern it"
    ):
        open_corpus(str(tmp_path / "reviews [final].csv"))  # a typo, not meant as a pattern
    hidden = tmp_path / "gl" / ".a.parquet"  # an editor's or a sync tool's copy: a shell's * skips it
    pq.write_table(rows, hidden)
    assert open_corpus(str(tmp_path / "gl" / "*.parquet")).units == [str(top)]
    assert open_corpus(str(tmp_path / "gl" / ".*.parquet")).units == [str(hidden)]
    # `**` is any number of directories (none too), as in Python's recursive glob and bash's
    # globstar; it passes no directory a directory's listing leaves out
    deep, temporary = (
        tmp_path / "gl" / "backup" / "x" / "b.parquet",
        tmp_path / "gl" / "_temporary" / "c.parquet",
    )
    deep.parent.mkdir()
    temporary.parent.mkdir()
    pq.write_table(rows, deep)
    pq.write_table(rows, temporary)
    everything = open_corpus(str(tmp_path / "gl" / "**" / "*.parquet"))
    assert everything.units == [str(top), str(backup), str(deep)] and read_all(everything).num_rows == 9
    assert open_corpus(str(tmp_path / "gl" / "**")).units == everything.units
    assert open_corpus(str(tmp_path / "gl" / "**" / "x" / "*.parquet")).units == [str(deep)]
    # A path that exists is read as named: its brackets were a pattern that matched no file.
    literal = tmp_path / "exports [2024]" / "reviews [1].parquet"
    literal.parent.mkdir()
    pq.write_table(rows, literal)
    assert open_corpus(str(literal)).units == open_corpus(str(literal.parent)).units == [str(literal)]
    # So is a directory of that name holding the pattern's matches: exports [2024]/*.parquet matched
    # no file, its brackets a pattern for exports 2/, exports 0/...
    in_literal = open_corpus(str(literal.parent / "*.parquet"))
    assert in_literal.units == [str(literal)] and in_literal.root == str(literal.parent)
    assert read_all(in_literal).column("id").to_pylist()[0] == "reviews [1].parquet:0"


def test_a_glob_matching_a_directory_of_data_it_does_not_read_is_an_error(tmp_path):
    """Spark writes a table as a directory named like a file (reviews.parquet/part-00000-....parquet):
    data/*.parquet matched it, read only the files it matched, and left its rows out without a word."""
    rows = pa.table({"text": ["a", "b", "c"]})
    (tmp_path / "data" / "2024.parquet" / "_temporary").mkdir(parents=True)
    pq.write_table(rows, tmp_path / "data" / "2023.parquet")
    pq.write_table(rows, tmp_path / "data" / "2024.parquet" / "part-00000-c0ffee.snappy.parquet")
    pq.write_table(rows, tmp_path / "data" / "2024.parquet" / "_temporary" / "part-0.parquet")
    for pattern in ("*.parquet", "2*"):
        with pytest.raises(
            InputError,
            match=re.escape(
                f"data/{pattern} matches the directory {tmp_path}/data/2024.parquet, whose data "
                "files (such as part-00000-c0ffee.snappy.parquet) it does not read"
            )
            + r": .* such as .*data/\*\*/\*\.parquet$",
        ):
            open_corpus(str(tmp_path / "data" / pattern))
    everything = open_corpus(
        str(tmp_path / "data" / "**" / "*.parquet")
    )  # matches the directory and its file
    assert read_all(everything).num_rows == 6
    # A directory of no data, or a hidden one, holds nothing a pattern could leave out
    os.rename(tmp_path / "data" / "2024.parquet", tmp_path / "data" / "_2024.parquet")
    (tmp_path / "data" / "notes.parquet").mkdir()
    assert open_corpus(str(tmp_path / "data" / "*.parquet")).units == [
        str(tmp_path / "data" / "2023.parquet")
    ]


def test_a_corpus_file_that_is_a_broken_symlink_is_an_error(tmp_path):
    """pyarrow lists no link to nothing, and a FIFO was left out as no file: their rows were
    missing without a word."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (tmp_path / "a.csv").write_text("text\ngood\n")
    (corpus / "a.csv").symlink_to(tmp_path / "a.csv")  # a link to a file is read as the file
    (corpus / "b.csv").symlink_to(tmp_path / "moved.csv")
    (corpus / ".b.csv").symlink_to(tmp_path / "moved.csv")  # hidden: not read, nor asked about
    for path in (corpus, corpus / "*.csv"):
        with pytest.raises(
            InputError, match=r"corpus/b\.csv: a symbolic link to .*moved\.csv, which does not exist"
        ):
            open_corpus(str(path))
    assert read_all(open_corpus(str(corpus / "a*.csv"))).column("id").to_pylist() == ["a.csv:0"]
    (corpus / "b.csv").unlink()
    assert open_corpus(str(corpus)).units == [str(corpus / "a.csv")]
    # A link to a directory that is gone (an unmounted share) held files too: refused under any name,
    # where a pattern reaches below it; a pattern of the top level's .csv files does not.
    (corpus / "part2").symlink_to(tmp_path / "unmounted")
    for path in (corpus, corpus / "*" / "*.csv", corpus / "**" / "*.csv"):
        with pytest.raises(
            InputError, match=r"corpus/part2: a symbolic link to .*unmounted, which does not exist"
        ):
            open_corpus(str(path))
    assert open_corpus(str(corpus / "*.csv")).units == [str(corpus / "a.csv")]
    (corpus / "part2").unlink()
    os.mkfifo(corpus / "c.csv")  # nor a FIFO's (an input of its own, it was this error already)
    for path in (corpus, corpus / "*.csv"):
        with pytest.raises(InputError, match=r"corpus/c\.csv: neither a regular file nor a directory"):
            open_corpus(str(path))


def test_a_file_reached_twice_through_a_link_is_an_error(tmp_path):
    """reviews/latest -> 2024-12 beside reviews/2024-12 read each review twice; a link to a parent
    directory, which pyarrow's listing follows 40 levels deep, read it 41 times."""
    (tmp_path / "reviews" / "2024-12").mkdir(parents=True)
    (tmp_path / "reviews" / "2024-12" / "a.csv").write_text("text\ngood\n")
    (tmp_path / "reviews" / "latest").symlink_to("2024-12")
    for path in (tmp_path / "reviews", tmp_path / "reviews" / "*" / "*.csv"):
        with pytest.raises(InputError, match=r"reviews/latest/a.csv is the same file as .*reviews/2024-12/a.csv "
                           r"\(through a symbolic or hard link\), so its rows would be read twice"):  # fmt: skip
            open_corpus(str(path))
    assert open_corpus(str(tmp_path / "reviews" / "latest")).units == [
        str(tmp_path / "reviews" / "latest" / "a.csv")
    ]
    (tmp_path / "reviews" / "latest").unlink()
    (tmp_path / "reviews" / "2024-12" / "up").symlink_to("..")
    with pytest.raises(
        InputError, match=r"2024-12/up/2024-12/a.csv is the same file as .*reviews/2024-12/a.csv"
    ):
        open_corpus(str(tmp_path / "reviews"))
    imdb = make_imdb_dir(tmp_path / "imdb", {"train": 1})
    (imdb / "again").symlink_to(".")
    with pytest.raises(InputError, match="is the same file as"):
        open_corpus(str(imdb))


def test_a_file_beside_its_compressed_copy_is_an_error(tmp_path):
    """a.csv beside a.csv.gz (`gzip -k` keeps both; a.CSV too), or a.jsonl.gz beside a.jsonl.zst: the directory
    or a glob matching both read every row twice without a word."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.csv").write_text("text\ngood\n")
    (tmp_path / "d" / "a.csv.gz").write_bytes(gzip.compress(b"text\ngood\n"))
    (tmp_path / "d" / "b.csv").write_text("text\nfine\n")
    for path in (tmp_path / "d", tmp_path / "d" / "a*"):
        with pytest.raises(InputError, match=r"^input .*d/a\.csv and a\.csv\.gz: the same data twice \(as `gzip -k` "
                           r"leaves a file beside its \.gz\)\? both would be read, every row likely twice; remove or "
                           r"move one of them"):  # fmt: skip
            open_corpus(str(path))
    assert len(open_corpus(str(tmp_path / "d" / "*.csv")).units) == 2  # a pattern that matches one: read
    (tmp_path / "d" / "a.csv").unlink()
    (tmp_path / "d" / "a.csv.BZ2").write_bytes(b"")
    with pytest.raises(InputError, match=r"d/a\.csv\.BZ2 and a\.csv\.gz: the same data twice"):
        open_corpus(str(tmp_path / "d"))
    (tmp_path / "d" / "a.csv.BZ2").rename(tmp_path / "d" / "a.CSV")  # its format's suffix in another case too
    with pytest.raises(InputError, match=r"d/a\.CSV and a\.csv\.gz: the same data twice"):
        open_corpus(str(tmp_path / "d"))


def test_a_byte_order_mark_opening_a_jsonl_file_is_skipped(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "bom.jsonl").write_bytes(
        bom + b'{"id":"a","text":"good","label":1}\n{"id":"b","text":"ok"}\n'
    )
    t = read_all(open_corpus(str(tmp_path / "bom.jsonl"), id_column="id")).to_pylist()
    assert [(r["id"], r["text"], r["label"]) for r in t] == [("a", "good", "1"), ("b", "ok", None)]
    # Also after decompression; a BOM anywhere else is still not JSON, on the line it is on.
    (tmp_path / "bom.jsonl.gz").write_bytes(
        gzip.compress(bom + b'{"text":"good"}\n' + bom + b'{"text":"x"}\n')
    )
    corpus = open_corpus(str(tmp_path / "bom.jsonl.gz"))
    with pytest.raises(InputError, match=r"bom.jsonl.gz, line 2: not valid JSON"):
        read_all(corpus)


def test_a_bad_row_or_page_past_the_first_block_is_a_clear_error(tmp_path):
    """Opening a corpus checks only a file's first block (1 MiB); what is wrong further on is found
    while reading, in a Ray task, and must be the same one-line InputError naming the file."""
    lines = [f"{i},good text {'y' * 100},1" for i in range(20_000)]
    lines[19_000] = "19000,a,b,c,d"  # 5 fields, ~2 MiB into the file
    (tmp_path / "deep.csv").write_text("id,text,label\n" + "\n".join(lines) + "\n")
    corpus = open_corpus(str(tmp_path / "deep.csv"))
    with pytest.raises(InputError, match=r"deep.csv: cannot be read as csv \(.*got 5: 19000,a,b,c,d"):
        read_all(corpus)

    table = pa.table({"text": [f"text {i}" for i in range(2000)]})
    pq.write_table(
        table, tmp_path / "bad.parquet", row_group_size=1000, use_dictionary=False, compression="snappy"
    )
    page = pq.ParquetFile(tmp_path / "bad.parquet").metadata.row_group(1).column(0).data_page_offset
    data = bytearray((tmp_path / "bad.parquet").read_bytes())
    data[page + 50 : page + 150] = bytes(100)  # in the second row group's values; the footer is intact
    (tmp_path / "bad.parquet").write_bytes(data)
    corpus = open_corpus(str(tmp_path / "bad.parquet"))
    with pytest.raises(InputError, match=r"bad.parquet: cannot be read as parquet \(Corrupt snappy"):
        read_all(corpus)

    jsonl = gzip.compress(b"".join(b'{"text": "t %d"}\n' % i for i in range(200_000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(jsonl[: len(jsonl) * 3 // 4])  # a truncated download
    corpus = open_corpus(str(tmp_path / "cut.jsonl.gz"))
    with pytest.raises(InputError, match=r"cut.jsonl.gz: cannot be read as jsonl \(Truncated compressed"):
        read_all(corpus)


def test_a_jsonl_files_columns_are_its_first_records_keys_and_no_later_value_is_dropped(tmp_path):
    """A later record without a column is a missing value; keys the reader does not use are ignored;
    a value under a column the first record lacks (which decided, before any work, that the corpus
    is unlabelled) is one error naming the file and line, not a row read as if it had none."""
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"id": "a", "text": "good", "label": 1}\n{"id": "b", "text": "fine", "stars": 5}\n'
                  '{"text": "meh", "label": null}\n')  # fmt: skip
    t = read_all(open_corpus(str(ok), id_column="id")).to_pylist()
    assert [(r["id"], r["text"], r["label"]) for r in t] == [("a", "good", "1"), ("b", "fine", None), ("ok.jsonl:2", "meh", None)]  # fmt: skip
    ok.rename(tmp_path / "ok.ndjson")  # the same format under its other common name: it was "unknown format"
    assert read_all(open_corpus(str(tmp_path / "ok.ndjson"), id_column="id")).to_pylist()[:2] == t[:2]
    late = tmp_path / "late.jsonl"
    late.write_text(
        '{"text": "no label yet"}\n{"text": "x", "label": null}\n\n{"text": "great", "label": "pos"}\n'
    )
    corpus = open_corpus(str(late))
    assert not corpus.labelled
    first_line_lacks = r"late.jsonl, line 4: has 'label', which the file's first record lacks; .*\(null where"
    with pytest.raises(InputError, match=first_line_lacks):
        corpus.first_rows()  # what prepare and infer read before any work
    with pytest.raises(InputError, match=first_line_lacks):
        read_all(corpus)
    (tmp_path / "notext.jsonl").write_text('{"label": 1}\n{"text": "a", "label": 0}\n')
    with pytest.raises(InputError, match=r"no column 'text'; its first record's keys are \['label'\]"):
        open_corpus(str(tmp_path / "notext.jsonl"))
    # A .json file that is one JSON array or an indented document (pandas, json.dump) failed as
    # "Expecting value: line 1 column 2 (char 1)"
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    for name, doc in (("pretty.json", json.dumps(rows, indent=2)), ("array.json", json.dumps(rows))):
        (tmp_path / name).write_text(doc)
        with pytest.raises(InputError, match=rf"{name}, line 1: not a JSON object on a line of its own; bertjob reads "
                           r"\.json and \.jsonl files as JSON Lines .* jq -c '\.\[\]'"):  # fmt: skip
            open_corpus(str(tmp_path / name))
    (tmp_path / "list.jsonl").write_text('{"text": "a"}\n["b"]\n')
    with pytest.raises(InputError, match=r"list.jsonl, line 2: not a JSON object"):
        read_all(open_corpus(str(tmp_path / "list.jsonl")))


def test_files_in_hidden_or_underscore_directories_are_not_read(tmp_path):
    """Spark's `_temporary/` attempts and Jupyter's `.ipynb_checkpoints/` copies are not data: reading
    them would score every row twice, as `_SUCCESS` and `.crc` files beside the data are skipped."""
    d = tmp_path / "corpus"
    for rel in ("a.csv", ".ipynb_checkpoints/a-checkpoint.csv", "_temporary/0/part-0.csv", ".a.csv.crc"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text("text,label\ngood,1\nbad,0\n")
    (d / "_SUCCESS").write_text("")
    corpus = open_corpus(str(d))
    assert corpus.units == [str(d / "a.csv")] and read_all(corpus).num_rows == 2


def test_a_delta_lake_or_hudi_table_is_an_error_not_its_files_of_every_version(tmp_path):
    """A Delta table's directory keeps the files of replaced versions until a VACUUM: read as Parquet
    files (its _delta_log/ skipped as hidden), an overwritten table's old rows were read beside the
    new ones, without a word."""
    for log, kind in (("_delta_log", "a Delta Lake table"), (".hoodie", "an Apache Hudi table")):
        table = tmp_path / log.strip("._") / "reviews"
        (table / log).mkdir(parents=True)
        (table / log / "00000000000000000001.json").write_text("{}\n")
        for version in (0, 1):  # an overwrite: version 1's file replaces version 0's, which stays
            pq.write_table(pa.table({"text": [f"v{version}"]}), table / f"part-0000{version}.snappy.parquet")
        for path in (table, table / "*.parquet", table.parent / "**" / "*.parquet"):
            with pytest.raises(InputError, match=rf"input {table} is {kind}: .* export its current version"):
                open_corpus(str(path))


def test_files_of_no_format_we_read_beside_the_data_are_named_in_a_warning(tmp_path, caplog):
    """A .txt or .xlsx export beside the .csv files is left out: the log says which, so its rows are
    not missing without a word."""
    for name in ("a.csv", "b.txt", "c.xlsx"):
        (tmp_path / name).write_text("text,label\ngood,1\n")
    with caplog.at_level("WARNING", logger="bertjob.sources"):
        corpus = open_corpus(str(tmp_path))
    assert corpus.units == [str(tmp_path / "a.csv")]
    assert "2 file(s) of no format bertjob reads are left out (b.txt, c.xlsx)" in caplog.text


def test_two_columns_with_a_name_we_read_are_an_error_naming_it(tmp_path):
    """A CSV reader takes one of the two silently, a Parquet reader fails in the middle of the job."""
    (tmp_path / "a.csv").write_text("text,text,label,note,note\na,b,1,x,y\n")
    two = pa.Table.from_arrays(
        [pa.array(["a"]), pa.array(["b"]), pa.array([1])], names=["text", "label", "label"]
    )
    pq.write_table(two, tmp_path / "b.parquet")
    for name, column in (("a.csv", "'text'"), ("b.parquet", "'label'")):
        with pytest.raises(InputError, match=f"{name}: more than one column is named {column}"):
            open_corpus(str(tmp_path / name))
    assert read_all(open_corpus(str(tmp_path / "a.csv"), text_column="label", label_column="")).num_rows == 1


def test_a_csv_row_longer_than_a_read_block_is_read_once(tmp_path, monkeypatch):
    """pyarrow reads a CSV file in blocks that must each hold whole rows: a multi-megabyte review
    first in its file was an error at open, one further on an error mid-job. A read that meets one
    starts again with larger blocks, without giving a row twice."""
    import csv

    from bertjob import sources

    def write(name, texts):
        with open(tmp_path / name, "w", newline="") as f:
            csv.writer(f).writerows([["text"], *[[t] for t in texts]])
        return [r["text"] for r in read_all(open_corpus(str(tmp_path / name))).to_pylist()]

    long = "great film " * 200_000  # 2.2 MB: more than the 1 MiB block the header is read from
    assert write("first.csv", [long, "bad"]) == [long, "bad"]
    monkeypatch.setattr(sources, "CSV_BLOCKS", (1 << 12, 1 << 14, 1 << 22))
    later = [f"ok {i}" for i in range(3000)] + [long, "bad"]  # rows of several 16 KiB blocks first
    assert write("later.csv", later) == later


def test_a_blank_csv_id_or_label_is_a_missing_one(tmp_path):
    """CSV writes a missing value as a blank cell (pandas writes None so): a blank label is then
    quarantined as missing_label, not unrecognised_label, and a blank id falls back to file:row
    like a null one, instead of every such row sharing the id ''."""
    (tmp_path / "a.csv").write_text('id,text,label\n7,good,1\n,bad,0\n8,fine,\n"",meh,""\n')
    rows = read_all(open_corpus(str(tmp_path / "a.csv"), id_column="id")).to_pylist()
    assert [(r["id"], r["label"]) for r in rows] == [
        ("7", "1"),
        ("a.csv:1", "0"),
        ("8", None),
        ("a.csv:3", None),
    ]


def test_a_nan_label_is_a_missing_one(tmp_path, tiny_model_dir):
    """A float label column keeps a missing label as NaN (Polars' Parquet, pyarrow's from NaN, JSON's
    NaN): it was the label "nan", quarantined as unrecognised_label, not as missing_label."""
    pq.write_table(pa.table({"text": ["good", "bad", "fine"], "label": pa.array([1.0, float("nan"), 0.0])}),
                   tmp_path / "a.parquet")  # fmt: skip
    (tmp_path / "b.jsonl").write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": NaN}\n')
    cfg = PrepareConfig(input="unused", output="unused", model=tiny_model_dir, max_length=8)
    for name, labels in (("a.parquet", ["1.0", None, "0.0"]), ("b.jsonl", ["1", None])):
        rows = read_all(open_corpus(str(tmp_path / name)))
        assert rows.column("label").to_pylist() == labels
        out = tokenize_batch(rows, cfg, models.load_encoder(tiny_model_dir), labelled=True)
        assert [r for r in out.column("reason").to_pylist() if r] == ["missing_label"]


def test_a_label_written_as_missing_text_is_a_missing_one(tmp_path, tiny_model_dir):
    """A label column with "NaN", "NA", "null", "None" (any case) or "" where a label is missing (a
    pandas or R export, NULL printed as text): each was an unrecognised label, named as one of the
    labels not read; now a missing label, as a float NaN is."""
    missing = ["NaN", "NA", "null", "None", "", "nan", "NULL", " none "]
    pq.write_table(pa.table({"text": ["good", *["fine"] * len(missing)], "label": ["pos", *missing]}),
                   tmp_path / "a.parquet")  # fmt: skip
    cfg = PrepareConfig(input="unused", output="unused", model=tiny_model_dir, max_length=8)
    rows = read_all(open_corpus(str(tmp_path / "a.parquet")))
    assert rows.column("label").to_pylist() == ["pos"] + [None] * len(missing)
    out = tokenize_batch(rows, cfg, models.load_encoder(tiny_model_dir), labelled=True)
    assert out.column("reason").to_pylist() == [None] + ["missing_label"] * len(missing)


def test_a_float_id_column_of_pandas_reads_as_its_integers(tmp_path):
    """pandas stores an integer id column with a missing value as floats: the ids were "7.0" (joined
    to no row's 7) and "nan" for every row without one; a missing one falls back to file:row."""
    pd.DataFrame({"id": [7, None, 9], "text": ["good", "bad", "fine"]}).to_parquet(tmp_path / "f.parquet")
    rows = read_all(open_corpus(str(tmp_path / "f.parquet"), id_column="id")).to_pylist()
    assert [r["id"] for r in rows] == ["7", "f.parquet:1", "9"]
    pq.write_table(pa.table({"id": [0.5, float("inf")], "text": ["good", "bad"]}), tmp_path / "g.parquet")
    assert read_all(open_corpus(str(tmp_path / "g.parquet"), id_column="id")).column("id").to_pylist() == [
        "0.5",
        "inf",
    ]


def test_ids_of_every_json_type_read_as_json_writes_them(tmp_path):
    """A JSON boolean id was Python's "True", JSONL's 7.0 "7.0" (Parquet's: "7"), and an object or
    list id (from JSONL or a Parquet struct column) a repr joined to nothing: now "true", "7", and an
    error before any scoring."""
    values = [7, 7.0, 7.5, True, False, None, "r1"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"id": v, "text": "good"}) + "\n" for v in values))
    want = ["7", "7", "7.5", "true", "false", "a.jsonl:5", "r1"]
    assert read_all(open_corpus(str(tmp_path / "a.jsonl"), id_column="id")).column("id").to_pylist() == want
    pq.write_table(pa.table({"id": [True, False], "text": ["good", "bad"]}), tmp_path / "b.parquet")
    assert read_all(open_corpus(str(tmp_path / "b.parquet"), id_column="id")).column("id").to_pylist() == [
        "true",
        "false",
    ]
    (tmp_path / "c.jsonl").write_text('{"id": "r0", "text": "good"}\n{"id": {"n": 1}, "text": "bad"}\n')
    with pytest.raises(
        InputError, match=r"c.jsonl, line 2: id column 'id' holds a JSON object, not an id; give"
    ):
        read_all(open_corpus(str(tmp_path / "c.jsonl"), id_column="id"))
    pq.write_table(pa.table({"id": [{"n": 1}], "text": ["good"]}), tmp_path / "d.parquet")
    with pytest.raises(InputError, match=r"d.parquet: id column 'id' holds struct<n: int64> values, not ids"):
        open_corpus(str(tmp_path / "d.parquet"), id_column="id")


def test_a_compression_suffix_is_recognised_in_any_case(tmp_path, imdb_small):
    """DATA.CSV.GZ was taken for CSV (its format suffix is read in any case) but not decompressed."""
    with gzip.open(tmp_path / "DATA.CSV.GZ", "wt") as f:
        f.write("text,label\ngood,1\n")
    with gzip.open(tmp_path / "DATA.JSONL.GZ", "wt") as f:
        f.write('{"text": "good", "label": 1}\n')
    for name in ("DATA.CSV.GZ", "DATA.JSONL.GZ"):
        assert read_all(open_corpus(str(tmp_path / name))).column("text").to_pylist() == ["good"]
    assert open_corpus(str(tar_dir(imdb_small, tmp_path / "ACLIMDB.TAR.GZ"))).kind == "imdb-tar"
    # Through a glob too: "unknown format (expected .parquet, .csv, .jsonl, or an IMDb tar.gz)".
    assert (
        open_corpus(str(tmp_path / "ACLIMDB*")).units == open_corpus(str(tmp_path / "ACLIMDB.TAR.GZ")).units
    )
    with pytest.raises(InputError, match=r"ACLIMDB.TAR.GZ: an IMDb archive is read alone; give its path"):
        open_corpus(str(tmp_path / "*"))


def test_a_bertjob_output_inside_the_input_directory_is_not_read(tmp_path):
    """infer --input corpus --output corpus/scored: the next run on the corpus read the output's
    manifest and predictions as more input ('mixes formats', or its Parquet files as more rows)."""
    from bertjob.outputs import MARKER

    d = tmp_path / "corpus"
    d.mkdir()
    pq.write_table(pa.table({"text": ["good", "bad"]}), d / "a.parquet")
    scored = d / "scored"
    (scored / "predictions").mkdir(parents=True)
    (scored / MARKER).write_text('{"stage": "infer"}')
    (scored / "manifest.json").write_text("{}")
    pq.write_table(
        pa.table({"id": ["a.parquet:0"], "text": ["good"]}), scored / "predictions" / "part-0.parquet"
    )
    corpus = open_corpus(str(d))
    assert corpus.units == [str(d / "a.parquet")] and read_all(corpus).num_rows == 2
    assert open_corpus(str(d / "**" / "*.parquet")).units == corpus.units  # nor through a glob
    assert open_corpus(str(scored / "predictions")).units == [str(scored / "predictions" / "part-0.parquet")]


def test_a_directory_mixing_formats_is_an_error_naming_a_file_of_each(tmp_path):
    (tmp_path / "a.csv").write_text("text\ngood\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "metadata.json").write_text("{}")
    with pytest.raises(
        InputError, match=r"mixes formats: csv \(a.csv\), jsonl \(sub/metadata.json\); point at one"
    ):
        open_corpus(str(tmp_path))


def test_binary_id_and_label_columns_are_read_as_text(tmp_path):
    """Parquet strings written without their UTF-8 annotation come back as binary: the ids were
    "b'k1'" and every label "b'pos'", each row then quarantined as unrecognised_label."""
    binary = {"id": [b"k1", b"k2"], "text": [b"good", b"bad"], "label": [b"pos", None]}
    pq.write_table(pa.table(binary), tmp_path / "b.parquet")
    rows = read_all(open_corpus(str(tmp_path / "b.parquet"), id_column="id")).to_pylist()
    assert [(r["id"], r["text"], r["label"]) for r in rows] == [("k1", "good", "pos"), ("k2", "bad", None)]
    # Ids of bytes that are not text (digests, a UUID's 16 bytes) were each 16 U+FFFD, all the same id
    digests = [b"\xff" * 16, b"\xfe" * 16]
    for kind in (pa.binary(), pa.binary(16)):
        pq.write_table(
            pa.table({"id": pa.array(digests, kind), "text": ["good", "bad"]}), tmp_path / "d.parquet"
        )
        rows = read_all(open_corpus(str(tmp_path / "d.parquet"), id_column="id")).to_pylist()
        assert [r["id"] for r in rows] == ["ff" * 16, "fe" * 16]


def test_parquet_strings_that_are_not_utf8_or_dictionary_encoded_bytes_are_read_as_text(tmp_path):
    """pyarrow does not check a Parquet string column's UTF-8: a file whose strings were not (Arrow's
    and Impala's writers do not check either) ended the read task with a UnicodeDecodeError
    traceback. A dictionary column of bytes was read as the text "b'good'", without a word."""
    invalid = pa.array([b"good \xff film", b"bad", b"k\xff"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": invalid[2:].take([0, 0]), "text": invalid[:2], "label": [1, 0]}),
                   tmp_path / "latin.parquet")  # fmt: skip
    rows = read_all(open_corpus(str(tmp_path / "latin.parquet"), id_column="id")).to_pylist()
    assert [(r["id"], r["text"], r["utf8_replaced"]) for r in rows] == [
        ("6bff", "good \ufffd film", True),  # an id that is not text is its hex, as one of bytes is
        ("6bff", "bad", False),
    ]
    texts = pa.array([b"good", b"bad", None], pa.binary()).dictionary_encode()
    pq.write_table(pa.table({"text": texts, "label": pa.array(["pos", "neg", "pos"]).dictionary_encode()}),
                   tmp_path / "dict.parquet")  # fmt: skip
    rows = read_all(open_corpus(str(tmp_path / "dict.parquet"))).to_pylist()
    assert [(r["text"], r["label"]) for r in rows] == [("good", "pos"), ("bad", "neg"), (None, "pos")]


def test_a_lone_surrogate_in_a_jsonl_string_is_replaced_and_counted(tmp_path):
    """A JSON escape of half an emoji ("\\ud83d" without its pair: tweets cut at 140 characters)
    cannot be held by Arrow: the read task ended the job with a UnicodeEncodeError traceback."""
    (tmp_path / "cut.jsonl").write_text(
        '{"id": "a\\udc00", "text": "Loved it \\ud83d", "label": "1"}\n'
        '{"id": "b", "text": "Loved it \\ud83d\\ude00", "label": "\\ud83d"}\n'
    )
    rows = read_all(open_corpus(str(tmp_path / "cut.jsonl"), id_column="id")).to_pylist()
    assert [(r["id"], r["text"], r["label"], r["utf8_replaced"]) for r in rows] == [
        ("a\ufffd", "Loved it \ufffd", "1", True),
        ("b", "Loved it \U0001f600", "\ufffd", True),  # a whole pair is the emoji it escapes
    ]


def test_a_review_file_the_imdb_layout_cannot_name_is_an_error(tmp_path, imdb_small):
    """train/pos/great.txt has no <id>_<rating> to read: it was left out of the corpus without a word,
    from a directory and from an archive. A directory's listing finds it before any work; an archive
    is only read through by its readers (a scan at open would cost prepare a second pass)."""
    import shutil

    d = tmp_path / "aclImdb"
    shutil.copytree(imdb_small, d)
    (d / "train" / "pos" / "._0_9.txt").write_text("macOS metadata")  # hidden: not a review
    assert read_all(open_corpus(str(d))).num_rows == 310
    assert read_all(open_corpus(str(tar_dir(d, tmp_path / "hidden.tar.gz")))).num_rows == 310
    (d / "train" / "pos" / "great.txt").write_text("A great film.")
    with pytest.raises(InputError, match=r"1 file\(s\) .* not named <id>_<rating>.txt .*train/pos/great.txt"):
        open_corpus(str(d))
    archive = open_corpus(str(tar_dir(d, tmp_path / "stray.tar.gz")))
    for unit in archive.units:  # every reader of the archive sees it, whichever slice it reads
        with pytest.raises(
            InputError, match=r"stray.tar.gz: .*train/pos/great.txt is not named <id>_<rating>.txt"
        ):
            list(archive.read(unit))


def test_the_imdb_layout_beside_other_data_files_is_an_error_naming_both(tmp_path, imdb_small):
    """aclImdb/ beside reviews.csv in one directory was read as the IMDb layout alone: the CSV's rows
    were missing without a word (and `infer --input .` scored only the IMDb reviews)."""
    import shutil

    shutil.copytree(imdb_small, tmp_path / "data" / "aclImdb")
    (tmp_path / "data" / "extra").mkdir()
    (tmp_path / "data" / "extra" / "reviews.csv").write_text("text,label\ngreat,1\n")
    (tmp_path / "data" / "notes.txt").write_text("no format bertjob reads: no part of a corpus")
    with pytest.raises(InputError) as err:
        open_corpus(str(tmp_path / "data"))
    assert str(err.value) == (
        f"input {tmp_path / 'data'}: holds the IMDb layout ({tmp_path / 'data' / 'aclImdb'}) and 1 other data "
        f"file(s) (extra/reviews.csv), which bertjob does not read as one corpus; give the one to read as --input: "
        f"the IMDb directory, or the other files (a glob)"
    )
    assert read_all(open_corpus(str(tmp_path / "data" / "aclImdb"))).num_rows == 310
    assert read_all(open_corpus(str(tmp_path / "data" / "extra" / "*.csv"))).num_rows == 1


def test_an_empty_csv_file_adds_no_rows_as_an_empty_jsonl_file(tmp_path):
    """A 0-byte part file (an empty partition's) made the whole directory an error for CSV alone."""
    for fmt, content in (("csv", "text,label\ngood,1\n"), ("jsonl", '{"text": "good", "label": 1}\n')):
        d = tmp_path / fmt
        d.mkdir()
        (d / f"part-0.{fmt}").write_text(content)
        (d / f"part-1.{fmt}").write_text("")
        corpus = open_corpus(str(d))
        assert corpus.labelled and read_all(corpus).column("text").to_pylist() == ["good"]
        (d / f"part-0.{fmt}").write_text("")
        assert open_corpus(str(d)).first_rows() is None  # which prepare and infer refuse: "no rows found"


def test_a_utf16_or_utf32_file_is_an_error_naming_its_encoding(tmp_path):
    """Excel's "Unicode text" and PowerShell's `>` write UTF-16: read as UTF-8 it was a parse error
    ("Expected 2 columns, got 1") or "not valid JSON", which did not say what to do."""
    content = {"csv": "text,label\ngood film,pos\n", "jsonl": '{"text": "good film", "label": "pos"}\n'}
    for fmt, encoding, name in (("csv", "utf-16", "UTF-16"), ("jsonl", "utf-16-le", "UTF-16"),
                                ("csv", "utf-32", "UTF-32"), ("jsonl", "utf-32-be", "UTF-32")):  # fmt: skip
        path = tmp_path / f"{encoding}.{fmt}"
        path.write_text(content[fmt], encoding=encoding)  # utf-16 and utf-32 with a BOM, -le and -be without
        with pytest.raises(
            InputError, match=rf"{path}: the file is {name} text; .* iconv -f {name} -t UTF-8"
        ):
            open_corpus(str(path))
        path.write_text(content[fmt], encoding="utf-8")
        assert read_all(open_corpus(str(path))).column("text").to_pylist() == ["good film"]


HF_PROBE = """
import sys
from bertjob.sources import InputError, open_corpus
try:
    open_corpus(sys.argv[1])
except InputError as err:
    print(err)
"""


def test_a_hub_dataset_without_the_hub_is_an_error_at_once(tmp_path):
    """As a hub model: datasets retried for ~30 s, ten warnings, before the same error."""
    with socket.socket() as closed:  # an address where nothing listens
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        env = {
            "HF_HOME": str(tmp_path / "hf"),
            "HF_ENDPOINT": f"http://127.0.0.1:{port}",
            "PATH": "/usr/bin:/bin",
        }
        out = subprocess.run([sys.executable, "-c", HF_PROBE, "hf://bertjob-tests/reviews"], env=env, text=True,
                             capture_output=True, cwd=Path(__file__).parent.parent, timeout=20)  # fmt: skip
    assert out.stdout.startswith("input hf://bertjob-tests/reviews: could not load the dataset"), out
    assert f"the hub cannot be reached (127.0.0.1:{port} cannot be reached" in out.stdout
    assert "Retrying" not in out.stderr
