"""Storage on a real S3 endpoint (moto's server, see conftest `s3`): the storage module, every input
format, the early access check, exactly-once infer output, and the pipeline with every path in
the bucket, killed part-way and resumed from the bucket."""

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from bertjob import cli, infer, models, pipeline, storage
from bertjob.config import InferConfig, PipelineConfig, build
from bertjob.sources import InputError, open_corpus
from tests.conftest import kill_session, make_imdb_dir, review, run_in_session, tar_dir
from tests.relay import Relay

PACKAGE = Path(__file__).parent.parent / "bertjob"
STORAGE_FUNCTIONS = {"join", "filesystem", "exists", "read_json", "write_json", "copy", "remove",
                     "local_dir", "cache_root", "check_access"}  # fmt: skip


def test_storage_is_the_only_home_of_paths_and_filesystems():
    defined: dict[str, list[str]] = {}
    made_fs = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name in STORAGE_FUNCTIONS:
                defined.setdefault(node.name, []).append(path.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("from_uri", "S3FileSystem", "GcsFileSystem"):
                made_fs.append(path.name)
    assert defined == {name: ["storage.py"] for name in STORAGE_FUNCTIONS}
    assert set(made_fs) == {"storage.py"}


def test_a_key_is_taken_as_named_whatever_its_characters(monkeypatch):
    # Parsed as a URI (pyarrow's from_uri, used where no AWS_ENDPOINT_URL is set, and for gs://), a
    # space or a non-ASCII letter was "Cannot parse URI", `#` cut the key short and %20 was a space.
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    for key in ("runs #2/a.csv", "ä 日本/x.csv", "a%20b/c", "it's=1~/x/"):
        assert storage.filesystem(f"gs://bucket/{key}")[1] == f"bucket/{key}".rstrip("/")
    assert storage.filesystem("gs://bucket/")[1] == "bucket"
    # A `?` is a glob's, also with AWS_ENDPOINT_URL ("Unexpected query parameter"); `?k=v` at the
    # end still gives pyarrow's URI options.
    assert storage.filesystem("gs://bucket/202?/*.csv")[1] == "bucket/202?/*.csv"
    assert (
        storage.filesystem("gs://bucket/a b/x.csv?scheme=http&endpoint_override=localhost:9")[1]
        == "bucket/a b/x.csv"
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert storage.filesystem("s3://bucket/202?/*.csv")[1] == "bucket/202?/*.csv"


def test_json_files_and_directory_trees_round_trip_through_the_bucket(s3, tmp_path):
    root = s3.uri("run")
    assert not storage.exists(root)
    storage.write_json(storage.join(root, "a", "m.json"), {"rows": 3})
    assert storage.exists(root) and storage.read_json(storage.join(root, "a", "m.json")) == {"rows": 3}
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(os.urandom(6 << 20))  # above the 5 MiB multipart threshold
    (src / "sub" / "t.txt").write_text("tok")
    storage.copy(str(src), storage.join(root, "tree"))
    storage.copy(storage.join(root, "tree"), str(tmp_path / "back"))
    assert (tmp_path / "back" / "w.bin").read_bytes() == (src / "w.bin").read_bytes()
    assert (tmp_path / "back" / "sub" / "t.txt").read_text() == "tok"
    storage.remove(storage.join(root, "tree"))
    assert not storage.exists(storage.join(root, "tree")) and storage.exists(
        storage.join(root, "a", "m.json")
    )


def test_a_json_file_whose_write_fails_leaves_nothing_beside_it(tmp_path):
    """A write that met a full disk left its temporary file for ever (`_bertjob_running.tmp-...` in an
    output, `events/....json.tmp-...` in a train run's directory: a train run on a 2 MB tmpfs left
    six), and an output holding one read as a run of unknown settings, refused without --overwrite.
    The kernel's file size limit fails the write as a full disk does."""
    import resource
    import signal

    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, before[1]))
    try:
        with pytest.raises(OSError):
            storage.write_json(str(tmp_path / "run.json"), {"rows": list(range(100))})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)
    assert os.listdir(tmp_path) == []


def test_a_model_in_the_bucket_is_downloaded_once_per_content(s3, tiny_classifier_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BERTJOB_CACHE", str(tmp_path / "cache"))
    uri = s3.uri("model")
    storage.copy(tiny_classifier_dir, uri)
    first = models.resolve_model(uri)
    stamp = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns
    assert models.resolve_model(uri) == first  # the second actor on this node: no download
    assert os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns == stamp
    assert len(os.listdir(tmp_path / "cache" / "remote")) == 1
    assert infer.check_model(uri) == [] and infer.model_settings(uri)["max_length"] == 64
    storage.write_json(storage.join(uri, "bertjob.json"), {"max_length": 32, "truncation": "head"})
    changed = models.resolve_model(uri)  # a changed file is a new copy, never a stale one
    assert changed != first and json.loads(Path(changed, "bertjob.json").read_text())["max_length"] == 32


def test_a_model_in_the_bucket_with_no_place_for_its_copy_is_an_error_naming_bertjob_cache(
    s3, tiny_classifier_dir, tmp_path, monkeypatch
):
    # Was "[Errno 20] Not a directory: ..." and "the same command again resumes", which failed the same.
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("BERTJOB_CACHE", str(tmp_path / "a-file" / "cache"))
    uri = s3.uri("model")
    storage.copy(tiny_classifier_dir, uri)
    with pytest.raises(storage.StorageError) as err:
        models.resolve_model(uri)
    assert str(err.value) == (
        f"model {uri}: no place for its local copy in {tmp_path}/a-file/cache/remote (Not a directory); "
        f"set BERTJOB_CACHE to a writable directory"
    )


def _rows(corpus):
    out = []
    for unit in corpus.units:
        for t in corpus.read(unit):
            out += t.select(["id", "text", "label", "split"]).to_pylist()
    return out


def test_every_input_format_reads_the_same_from_the_bucket(s3, tmp_path):
    import random

    rng = random.Random(0)
    rows = [
        {"id": f"r{i}", "text": review(rng, i % 2 == 0), "label": "pos" if i % 2 else "neg"}
        for i in range(30)
    ]
    local = tmp_path / "formats"
    local.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), local / "a.parquet")
    pa.csv.write_csv(pa.Table.from_pylist(rows), pa.CompressedOutputStream(str(local / "a.csv.gz"), "gzip"))
    pa.csv.write_csv(pa.Table.from_pylist(rows), local / "a.tsv", pa.csv.WriteOptions(delimiter="\t"))
    with pa.CompressedOutputStream(str(local / "a.jsonl.gz"), "gzip") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    tar_dir(make_imdb_dir(tmp_path / "imdb", {"train": 3, "test": 2, "unsup": 2}), local / "imdb.tar.gz")
    remote = s3.uri("formats")
    storage.copy(str(local), remote)
    for name in ("a.parquet", "a.csv.gz", "a.tsv", "a.jsonl.gz", "imdb.tar.gz"):
        here, there = open_corpus(str(local / name)), open_corpus(storage.join(remote, name))
        assert there.kind == here.kind and _rows(there) == _rows(here) and _rows(here)


def test_a_file_in_the_bucket_is_named_by_its_uri(s3, tmp_path):
    """Errors and the log named bucket/key, pyarrow's path inside its S3 filesystem."""
    local = tmp_path / "named"
    local.mkdir()
    (local / "a.csv").write_text("review\nfine\n")
    (local / "b.parquet").write_bytes(b"not a parquet file")
    remote = s3.uri("named")
    storage.copy(str(local), remote)
    with pytest.raises(InputError) as err:
        open_corpus(storage.join(remote, "a.csv"))
    assert str(err.value).startswith(f"input {remote}/a.csv: no column 'text'")
    with pytest.raises(InputError) as err:
        open_corpus(storage.join(remote, "b.parquet"))
    assert str(err.value).startswith(f"input {remote}/b.parquet: cannot be read as parquet")
    described = open_corpus(storage.join(remote, "a.csv"), text_column="review").describe()
    assert described == f"csv corpus at {remote}/a.csv (1 unit(s), unlabelled: no column 'label')"


def test_storage_problems_are_one_clear_error_before_any_work(s3, tmp_path, capsys, monkeypatch):
    def fails(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            cli.main(list(argv))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err
        return err

    local_out = str(tmp_path / "out")
    err = fails("prepare", "--input", "s3://no-such-bucket/reviews.parquet", "--output", local_out)
    assert "s3://no-such-bucket/reviews.parquet: bucket 'no-such-bucket' does not exist" in err
    assert not os.path.exists(local_out)  # nothing was started
    data = s3.uri("prepared")
    with monkeypatch.context() as m:
        m.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")  # the server checks signatures
        err = fails("train", "--data", data, "--output", local_out)
    assert f"data {data}: access denied" in err
    # Nothing listens there; its number holds "403", which once read as a refusal (access denied).
    port = next(p for p in range(40300, 40400) if _nothing_listens(p))
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        err = fails("infer", "--input", "imdb-sample", "--model", "minilm", "--output", s3.uri("scored"))
    assert "output s3://" in err and "the endpoint cannot be reached" in err, err
    assert not os.path.exists(local_out)


def test_an_s3_output_that_cannot_be_written_is_refused_before_ray_starts(s3, imdb_small, tiny_model_dir):
    """Credentials that may read the bucket but not write to it: `bertjob prepare --output s3://...`
    (and infer's --overwrite) were refused only once the local Ray had started, ~15 s; local outputs
    already were at once."""
    out = s3.uri("prepared")
    proc = run_in_session([sys.executable, "-m", "bertjob", "prepare", "--input", str(imdb_small), "--output", out,
                           "--model", tiny_model_dir, "--max-length", "32"],
                          env={**os.environ, **s3.reader}, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]  # no Ray started
    line = lines[0]
    assert (
        line.startswith(f"bertjob: error: output {out}: cannot write there (") and "ACCESS_DENIED" in line
    ), line


def _nothing_listens(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _predictions(first: int, last: int) -> pa.Table:
    rows = np.arange(first, last)
    n = len(rows)
    return pa.table(
        {"id": [f"d{r}" for r in rows], "label": pa.array(np.ones(n), pa.int8()), "label_name": ["POSITIVE"] * n,
         "score": pa.array(np.full(n, 0.9), pa.float32()), "prob_positive": pa.array(np.full(n, 0.9), pa.float32()),
         "true_label": pa.nulls(n, pa.int8()), "unit": pa.array(np.zeros(n), pa.int32()), "row": rows},
        schema=infer.OUTPUT_SCHEMA,
    )  # fmt: skip


def test_overlapping_commits_are_settled_to_one_row_per_position(s3):
    out = s3.uri("scored")
    sink = infer.PredictionSink(out, include_text=False)
    sink.commit(infer.PREDICTIONS, _predictions(0, 100))
    sink.commit(infer.PREDICTIONS, _predictions(150, 200))
    # A killed run's write that landed late: rows 50-159, grouped otherwise, overlapping both.
    late = sink.commit(infer.PREDICTIONS, _predictions(50, 160))
    assert infer.settle(out, infer.PREDICTIONS) == 60
    fs, root = storage.filesystem(out)
    rows = pq.read_table(f"{root}/predictions", filesystem=fs).column("row").to_numpy()
    assert sorted(rows) == list(range(200))
    files = fs.get_file_info(pafs.FileSelector(f"{root}/predictions"))
    assert len(files) == 1 and late not in {f.path for f in files}
    # A crash after the merged file was written but before a source was deleted: settled again.
    sink.commit(infer.PREDICTIONS, _predictions(150, 200))
    assert infer.settle(out, infer.PREDICTIONS) == 50
    assert [f.path for f in fs.get_file_info(pafs.FileSelector(f"{root}/predictions"))] == [files[0].path]
    assert infer.settle(out, infer.PREDICTIONS) == 0


def _wait_for(fs, base: str, name: str, proc, timeout_s: float = 900) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        listing = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        if any(f.path.endswith(name) for f in listing):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.integration
def test_an_infer_whose_object_store_goes_away_stops_with_one_line_and_resumes_from_the_bucket(
    s3, tiny_classifier_dir, tmp_path, ray_local
):
    """The endpoint is cut once the first predictions are committed: the job stopped with ~200
    lines of Ray's traceback, three times; now one line of error and one saying that the same
    command resumes, which it does, with exactly one row per input."""
    import random

    # Six units of 3,000 rows: two predictors score and commit one unit each per wave, and the
    # first commit lands two waves (seconds) before the last.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        rng = random.Random(i)
        rows = [{"id": f"p{i}-{j}", "text": review(rng, j % 2 == 0)} for j in range(3000)]
        pq.write_table(pa.Table.from_pylist(rows), corpus / f"part{i}.parquet")
    data, model, out = s3.uri("corpus"), s3.uri("model"), s3.uri("scored")
    storage.copy(str(corpus), data)
    storage.copy(tiny_classifier_dir, model)
    args = [sys.executable, "-m", "bertjob", "infer", "--input", data, "--model", model, "--output", out,
            "--id-column", "id", "--batch-size", "16", "--num-workers", "2", "--rows-per-shard", "1000"]  # fmt: skip
    relay = Relay(int(s3.url.rsplit(":", 1)[1]))  # the job (and the Ray it starts) reach S3 through it
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}"}
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    fs, root = storage.filesystem(out)
    try:
        committed = _wait_for(fs, f"{root}/predictions", ".parquet", proc)
        relay.cut()
        _, err = proc.communicate(timeout=300)
    finally:
        kill_session(proc.pid)
    assert committed, "the run ended before it committed a file"
    assert proc.returncode == 1, err
    error, advice = err.strip().splitlines()[-2:]
    assert error.startswith("bertjob: error: ") and "NETWORK_CONNECTION" in error, err
    assert advice == "bertjob: the same command again resumes where this one stopped"
    partial = pq.read_table(f"{root}/predictions", filesystem=fs).num_rows
    assert 0 < partial < 18000 and not storage.exists(storage.join(out, "manifest.json"))
    m = infer.run(
        InferConfig(input=data, model=model, output=out, id_column="id", batch_size=16, num_workers=2)
    )
    assert m["rows_resumed"] == partial and m["rows_this_run"] == 18000 - partial
    ids = pq.read_table(f"{root}/predictions", filesystem=fs).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 18000
    assert storage.read_json(storage.join(out, "manifest.json"))["rows_scored"] == 18000


@pytest.mark.integration
def test_the_pipeline_on_s3_whose_object_store_goes_away_in_training_resumes_from_the_bucket(
    s3, tiny_model_dir, tmp_path, ray_local
):
    """The endpoint is cut once Ray Train has registered a checkpoint in the bucket: the job ended
    in a traceback of its driver's (RuntimeError: training failed); now one line of error and one
    saying that the same command resumes, which it does, from the bucket's checkpoint."""
    corpus = tar_dir(make_imdb_dir(tmp_path / "data", {"train": 40, "test": 20, "unsup": 10}, seed=3),
                     tmp_path / "imdb.tar.gz")  # fmt: skip
    data, out = s3.uri("imdb.tar.gz"), s3.uri("pipeline")
    storage.copy(str(corpus), data)
    settings = {
        "input": data, "output_dir": out, "model": tiny_model_dir, "max_length": 32, "num_workers": 1, "name": "p",
        "prepare": {"head_tokens": 8},
        # One restart, not the default two: the first failure comes in training (seen: the next
        # checkpoint's upload), the restart's in its resume from the bucket; a second restart only
        # repeated that resume (a worker group's start, ~10 s).
        "train": {"epochs": 1, "batch_size": 8, "mixed_precision": "off", "lr": 5e-3,
                  "checkpoint_every_steps": 3, "max_failures": 1},
    }  # fmt: skip
    config = tmp_path / "pipeline.yaml"
    config.write_text(json.dumps(settings))  # JSON is YAML
    relay = Relay(int(s3.url.rsplit(":", 1)[1]))  # the job (and the Ray it starts) reach S3 through it
    proc = subprocess.Popen([sys.executable, "-m", "bertjob", "pipeline", "--config", str(config)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}"})  # fmt: skip
    fs, root = storage.filesystem(out)
    try:
        checkpointed = _wait_for(fs, f"{root}/checkpoints", "checkpoint_manager_snapshot.json", proc)
        relay.cut()
        _, err = proc.communicate(timeout=300)
    finally:
        kill_session(proc.pid)
    assert checkpointed, "the pipeline ended before its first checkpoint"
    assert proc.returncode == 1, err
    error, advice = err.strip().splitlines()[-2:]
    assert error.startswith("bertjob: error: training failed: ") and "NETWORK_CONNECTION" in error, err
    assert advice == "bertjob: the same command again resumes from its last checkpoint"
    assert not storage.exists(storage.join(out, "train", "metrics.json"))

    summary = pipeline.run(build(PipelineConfig, settings))
    st = summary["stages"]
    assert st["prepare"]["reused"] and st["prepare"]["rows"] == {
        "train": 72,
        "validation": 8,
        "test": 40,
        "unsup": 10,
    }
    assert st["evaluate"]["rows_scored"] == 40 and st["infer"]["rows_scored"] == 10
    metrics = storage.read_json(storage.join(out, "train", "metrics.json"))
    assert metrics["resumed_at_steps"] and metrics["resumed_at_steps"][0] > 0  # from the bucket's checkpoint
    # Both invocations' worker groups, recorded in the bucket: the rerun's from the resumed step.
    groups = metrics["workers_over_time"]
    assert [g["from_step"] for g in groups] == [0, metrics["resumed_at_steps"][0]], groups
    assert metrics["steps"] == 9 and metrics["checkpoints"] == storage.join(out, "checkpoints")
    for name in ("train/model/model.safetensors", "train/model/bertjob.json", "train/training_curves.png",
                 "evaluate/metrics.json", "evaluate/report.png", "infer/manifest.json", "summary.json"):  # fmt: skip
        assert fs.get_file_info(f"{root}/{name}").type == pafs.FileType.File, name
    # The exported model loads from a local copy of the bucket, as transformers sees it.
    from transformers import AutoModelForSequenceClassification

    local = tmp_path / "model"
    storage.copy(storage.join(out, "train", "model"), str(local))
    assert AutoModelForSequenceClassification.from_pretrained(local).config.id2label[1] == "POSITIVE"
    model = {f.name: f.read_bytes() for f in local.iterdir()}
    shutil.rmtree(local)
    # Its bertjob.json lost: exported again from the bucket's last checkpoint, in the driver (no
    # worker group), the same files.
    storage.remove(storage.join(out, "train", "model", "bertjob.json"))
    again = pipeline.run(build(PipelineConfig, settings))
    assert not again["stages"]["train"]["reused"]
    assert storage.read_json(storage.join(out, "train", "metrics.json"))["workers_over_time"] == groups
    storage.copy(storage.join(out, "train", "model"), str(local))
    assert {f.name: f.read_bytes() for f in local.iterdir()} == model


def test_a_warning_that_names_directories_gives_the_command_that_deletes_them():
    assert storage.delete_command(["/runs/t/checkpoint_1", "/runs/my run/checkpoint_2"]) == (
        "rm -r /runs/t/checkpoint_1 && rm -r '/runs/my run/checkpoint_2'"
    )
    assert storage.delete_command(["s3://b/t/checkpoint_1"]) == "aws s3 rm --recursive s3://b/t/checkpoint_1"
    assert storage.delete_command(["gs://b/t/checkpoint_1"]) == "gcloud storage rm -r gs://b/t/checkpoint_1"


def test_local_paths_reach_ray_workers_absolute(tmp_path, monkeypatch):
    # Ray Train runs its workers in a directory of its own: `--data prepared/` must arrive absolute.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prepared").mkdir()
    assert storage.for_workers("prepared") == str(tmp_path / "prepared")
    assert storage.for_workers("s3://bucket/prepared") == "s3://bucket/prepared"
    assert storage.for_workers("minilm") == "minilm"  # a model name, not a directory here
    # BERTJOB_CACHE=~/cache as a container's environment gives it: it was a directory `~` in each
    # process' working directory.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("BERTJOB_CACHE", "~/cache")
    assert storage.cache_root() == str(tmp_path / "cache")
    assert storage.for_workers("~/prepared") == str(tmp_path / "prepared")  # the driver's home
    assert storage.for_workers("") == ""  # no storage_path: the default, not the working directory
