import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertjob.sources import InputError, open_corpus
from tests.conftest import tar_dir


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


def test_unreadable_and_empty_inputs_are_clear_errors(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="broken.parquet"):
        open_corpus(str(tmp_path / "broken.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no IMDb layout"):
        open_corpus(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="no such file"):
        open_corpus(str(tmp_path / "nope.csv"))
