"""Stage outputs: each stage claims its directory with a marker naming it, and replaces only its own."""

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertjob import infer, outputs, prepare
from bertjob.config import InferConfig
from bertjob.outputs import OutputError, check_replaceable, claim_output, ensure_output


def test_a_stage_never_deletes_another_stages_output(tmp_path):
    run = tmp_path / "run"
    ensure_output(str(run), "train")
    (run / "ray_results").mkdir()
    (run / "ray_results" / "checkpoint.pt").write_bytes(b"hours of training")
    for stage in ("prepare", "infer", "evaluate"):
        with pytest.raises(OutputError, match=r"train output"):
            claim_output(str(run), stage, ())
    assert (run / "ray_results" / "checkpoint.pt").read_bytes() == b"hours of training"
    claim_output(str(tmp_path / "prepared"), "prepare", prepare.OWN_ENTRIES)
    with pytest.raises(OutputError, match=r"prepare output"):
        ensure_output(str(tmp_path / "prepared"), "train")
    ensure_output(str(run), "train")  # its own: kept as it is
    claim_output(str(tmp_path / "scored"), "infer", infer.OWN_ENTRIES)
    with pytest.raises(OutputError, match=r"holds an infer output"):
        ensure_output(str(tmp_path / "scored"), "evaluate")
    claim_output(str(tmp_path / "prepared"), "prepare", prepare.OWN_ENTRIES)  # its own: prepare's rerun replaces it


def test_an_output_named_through_a_symlink_is_replaced_as_its_directory(tmp_path):
    # pyarrow left a symlinked directory's contents as they were: the old predictions stayed beside
    # the new ones ("60 rows committed but 30 read; rerun to complete").
    (tmp_path / "scored").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "scored")
    claim_output(str(tmp_path / "link"), "infer", infer.OWN_ENTRIES)
    (tmp_path / "scored" / "predictions").mkdir()
    (tmp_path / "scored" / "predictions" / "part-old.parquet").write_bytes(b"an earlier run's")
    claim_output(str(tmp_path / "link"), "infer", infer.OWN_ENTRIES)
    assert sorted(p.name for p in (tmp_path / "scored").iterdir()) == [outputs.MARKER, outputs.LEASE]
    assert (tmp_path / "link").is_symlink()


def test_a_stage_replaces_its_own_output_but_never_what_the_user_put_beside_it(tmp_path):
    """A prepare rerun (and infer --overwrite) emptied the directory: the user's notes and analysis
    beside the shards or predictions went with the stage's own files, without a word."""
    for stage, own in (("prepare", prepare.OWN_ENTRIES), ("infer", infer.OWN_ENTRIES)):
        out = tmp_path / stage
        claim_output(str(out), stage, own)
        for name in own:
            (out / name).mkdir()
            (out / name / "part-0").write_bytes(b"the stage's")
        (out / "manifest.json").write_text("{}")
        (out / ".DS_Store").write_bytes(b"Finder's: hidden, not the user's work")
        claim_output(str(out), stage, own)  # its own, replaced
        assert sorted(p.name for p in out.iterdir()) == sorted([outputs.LEASE, outputs.MARKER])
        (out / "NOTES.md").write_text("what I found")
        (out / "analysis").mkdir()
        (out / "analysis" / "plot.py").write_text("import matplotlib")
        with pytest.raises(OutputError) as err:
            claim_output(str(out), stage, own)
        assert str(err.value) == (
            f"output {out} holds 2 entries that `bertjob {stage}` did not write (NOTES.md, analysis), which "
            f"replacing the output would delete; move them elsewhere, or choose another directory"
        )
        assert (out / "analysis" / "plot.py").read_text() == "import matplotlib"


def test_an_output_that_is_not_a_directory_is_an_error(tmp_path):
    (tmp_path / "reviews.csv").write_text("text\ngood\n")
    with pytest.raises(OutputError, match="reviews.csv is a file; give a directory"):
        claim_output(str(tmp_path / "reviews.csv"), "prepare", prepare.OWN_ENTRIES)
    os.mkfifo(tmp_path / "fifo")  # as /dev/null: a traceback from listing it ("Cannot list directory")
    with pytest.raises(OutputError, match="fifo is neither a directory nor a regular file; give a directory"):
        ensure_output(str(tmp_path / "fifo"), "train")


def test_an_output_that_cannot_be_written_is_refused_by_the_check_before_ray(tmp_path, monkeypatch):
    """prepare and infer check their output before starting Ray; one under a file, or in a directory
    without write permission, passed that check and failed only once Ray had started."""
    (tmp_path / "reviews.csv").write_text("text\ngood\n")
    with pytest.raises(OutputError, match=r"cannot write there \(.*reviews.csv is a file, not a directory\)"):
        check_replaceable(str(tmp_path / "reviews.csv" / "prepared"), "prepare", prepare.OWN_ENTRIES)
    writable = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: p != str(tmp_path) and writable(p, mode))  # not as root
    with pytest.raises(OutputError, match=f"cannot write there \\(no permission to write in {tmp_path}\\)"):
        check_replaceable(str(tmp_path / "out" / "prepared"), "prepare", prepare.OWN_ENTRIES)
    assert not (tmp_path / "out").exists()


def test_nested_outputs_and_a_pipeline_root_are_never_wiped(tmp_path):
    from bertjob.pipeline import OWN_ENTRIES

    root = tmp_path / "root"
    claim_output(str(root), "prepare", prepare.OWN_ENTRIES)
    ensure_output(str(root / "inner"), "train")  # e.g. a pipeline's output_dir pointed into it
    with pytest.raises(OutputError, match="another bertjob output"):
        claim_output(str(root), "prepare", prepare.OWN_ENTRIES)
    assert (root / "inner").exists()
    # a pipeline root: adopted when it holds only what the pipeline writes, then protected
    legacy = tmp_path / "legacy"
    ensure_output(str(legacy / "train"), "train")
    (legacy / "summary.json").write_text("{}")
    ensure_output(str(legacy), "pipeline", own=OWN_ENTRIES)
    with pytest.raises(OutputError, match="pipeline output"):
        claim_output(str(legacy), "prepare", prepare.OWN_ENTRIES)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="not written by bertjob"):
        ensure_output(str(tmp_path / "mine"), "pipeline", own=OWN_ENTRIES)


def test_infer_replaces_its_own_output_only_with_overwrite(tmp_path, tiny_classifier_dir, capsys):
    """What --overwrite does, as `bertjob infer --help` says (it said only "start clean instead of
    completing a previous partial run"; it also replaces a complete output and one of other inputs
    or settings, which without it are kept and refused)."""
    from bertjob.cli import main

    with pytest.raises(SystemExit):
        main(["infer", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert (
        "replacing this command's earlier output in OUTPUT (complete, partial, or of other inputs or settings); "
        "never another command's or job's directory" in said
    )
    out = tmp_path / "scored"
    claim_output(str(out), "infer", infer.OWN_ENTRIES)
    (out / "predictions").mkdir()
    (out / "predictions" / "part-0.parquet").write_bytes(b"an earlier run of unknown inputs")
    cfg = InferConfig(input="unused", model=tiny_classifier_dir, output=str(out))
    run_info = {"identity": "x", "units": 1}
    with pytest.raises(OutputError, match="holds an infer run with other .* pass --overwrite"):
        infer._resume_state(cfg, run_info, "infer")
    assert (out / "predictions" / "part-0.parquet").exists()
    overwrite = InferConfig(**{**infer.to_dict(cfg), "overwrite": True})
    _, _, fresh = infer._resume_state(overwrite, run_info, "infer")
    assert fresh and (out / "predictions" / "part-0.parquet").exists()  # replaced once the run can start
    (out / "run.json").write_text(json.dumps(run_info))  # a complete run of these inputs and settings
    (out / "manifest.json").write_text("{}")
    assert infer._resume_state(cfg, run_info, "infer") == (None, 0, False)  # nothing to do
    assert infer._resume_state(overwrite, run_info, "infer") == ({}, 0, True)  # done again
    # --overwrite never reaches another stage's output: refused before the run starts Ray
    ensure_output(str(tmp_path / "run"), "train")
    (tmp_path / "run" / "metrics.json").write_text("{}")
    with pytest.raises(OutputError, match="train output"):
        infer._resume_state(InferConfig(**{**infer.to_dict(cfg), "output": str(tmp_path / "run"), "overwrite": True}),
                            run_info, "infer")  # fmt: skip
    assert (tmp_path / "run" / "metrics.json").exists()


def test_a_rerun_on_an_output_of_other_inputs_or_settings_names_what_changed(tmp_path, tiny_classifier_dir):
    """It said 'other (or unknown) inputs or settings', leaving the user to guess which."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.csv").write_text("text\nA wonderful film.\nA dull film.\n")
    out = tmp_path / "scored"
    cfg = InferConfig(input=str(corpus), model=tiny_classifier_dir, output=str(out))
    claim_output(str(out), "infer", infer.OWN_ENTRIES)
    (out / "run.json").write_text(json.dumps(infer.describe(cfg)[1]))

    def refused(cfg: InferConfig) -> str:
        with pytest.raises(OutputError, match="holds an infer run with other inputs or settings") as err:
            infer._resume_state(cfg, infer.describe(cfg)[1], "infer")
        return str(err.value)

    assert "(max_length 64 -> 32; include_text False -> True)" in refused(
        dataclasses.replace(cfg, max_length=32, include_text=True)
    )
    assert "(mixed_precision 'auto' -> 'off')" in refused(dataclasses.replace(cfg, mixed_precision="off"))
    (corpus / "b.csv").write_text("text\nAnother one.\n")
    assert "(input files added: b.csv)" in refused(cfg)
    (corpus / "b.csv").unlink()
    (corpus / "a.csv").write_text("text\nA wonderful film.\nA dull movie\n")  # same size, edited
    assert f"(the content of input {corpus})" in refused(cfg)


def test_in_the_pipeline_the_advice_names_the_flag_the_pipeline_takes(tmp_path, tiny_classifier_dir, caplog):
    """The infer and evaluate stages of `bertjob pipeline` said to use --overwrite, a flag the pipeline
    does not take: its own are --infer.overwrite true and --evaluate.overwrite true."""
    (tmp_path / "a.csv").write_text("text,label\nA wonderful film.,1\nA dull film.,0\n")
    for stage in ("infer", "evaluate"):
        evaluate, out = stage == "evaluate", tmp_path / stage
        cfg = InferConfig(input=str(tmp_path / "a.csv"), model=tiny_classifier_dir, output=str(out))
        claim_output(str(out), stage, infer.OWN_ENTRIES)
        (out / "run.json").write_text(json.dumps(infer.describe(cfg, evaluate)[1]))
        (out / "manifest.json").write_text("{}")  # complete (listing no files, as an earlier bertjob's)
        with caplog.at_level(logging.INFO, logger="bertjob.infer"):
            infer.run(cfg, evaluate=evaluate, replace_changed=True)  # as the pipeline runs it
        assert f"{stage}: {out} is complete for these inputs and settings; nothing to do (use --{stage}.overwrite " \
               f"true to redo)" in caplog.text  # fmt: skip
        (out / "manifest.json").unlink()
        (out / "predictions").mkdir()
        pq.write_table(pa.table({"x": [1]}), out / "predictions" / "other.parquet")
        with pytest.raises(OutputError, match=rf"no file bertjob committed .*; remove it, or pass --{stage}\.overwrite "
                           rf"true to score from the start$"):  # fmt: skip
            infer.run(cfg, evaluate=evaluate, replace_changed=True)
        with pytest.raises(OutputError, match=r"remove it, or pass --overwrite to score from the start$"):
            infer.run(cfg, evaluate=evaluate)  # `bertjob infer`, `bertjob evaluate`: their own flag


def _lease(path, **fields) -> None:
    now = time.time()
    lease = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": None,
             "command": "bertjob infer --input reviews", "since": now, "seen": now, **fields}  # fmt: skip
    (path / outputs.LEASE).write_text(json.dumps(lease))


def test_an_output_another_live_run_writes_is_refused_and_a_gone_runs_is_taken_over(tmp_path):
    """A second run on an output that a running one writes (the same job submitted twice) replaced
    or mixed into it: now it is refused, naming that run. A killed run's lease is no obstacle: on
    this host at once (its process is gone), from another host once it has not been renewed for
    LEASE_STALE_S. A run's leases go when it ends, however it ends."""
    out = tmp_path / "scored"
    claim_output(str(out), "infer", infer.OWN_ENTRIES)
    _lease(out, host="other-node", pid=1)  # another host's run, alive a moment ago
    for attempt in (lambda: claim_output(str(out), "infer", infer.OWN_ENTRIES), lambda: ensure_output(str(out), "infer")):
        with pytest.raises(OutputError, match=r"being written by another run now: `bertjob infer --input "
                           r"reviews` \(pid 1 on other-node, .*wait for it to end or stop it; if it was "
                           r"killed, it is taken over (89|90) s from now"):  # fmt: skip
            attempt()
    assert (out / outputs.MARKER).exists()  # nothing replaced
    _lease(out, host="other-node", pid=1, seen=time.time() - outputs.LEASE_STALE_S - 1)  # not renewed
    ensure_output(str(out), "infer")
    assert json.loads((out / outputs.LEASE).read_text())["pid"] == os.getpid()  # this run's now

    # On this host: a live process's lease holds until it ends; a later process given the same pid does not.
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        _lease(out, pid=live.pid, process_start=outputs._process_start(live.pid))
        with pytest.raises(OutputError, match=rf"\(pid {live.pid} on {socket.gethostname()}, .*stop it$"):
            check_replaceable(str(out), "infer", infer.OWN_ENTRIES)
        _lease(out, pid=live.pid, process_start="1")  # the pid's process started at another time
        check_replaceable(str(out), "infer", infer.OWN_ENTRIES)
        _lease(out, pid=live.pid, process_start=outputs._process_start(live.pid))
    finally:
        live.communicate(b"")  # it ends
    check_replaceable(str(out), "infer", infer.OWN_ENTRIES)

    @outputs.releasing
    def failing_run(path):
        claim_output(str(path), "prepare", prepare.OWN_ENTRIES)
        assert json.loads((path / outputs.LEASE).read_text())["pid"] == os.getpid()
        raise RuntimeError("the run fails")

    with pytest.raises(RuntimeError):
        failing_run(tmp_path / "prepared")
    assert not (tmp_path / "prepared" / outputs.LEASE).exists()


def test_a_running_run_renews_its_lease(tmp_path):
    """Its process renews the lease while the run goes on (every LEASE_RENEW_S, 0.2 s here), so that
    a run on another host is not taken for gone after LEASE_STALE_S."""
    script = """if True:
        import json, sys, time
        from bertjob import outputs
        outputs.LEASE_RENEW_S = 0.2
        path = sys.argv[1]
        @outputs.releasing
        def run():
            outputs.ensure_output(path, "infer")
            lease = path + "/" + outputs.LEASE
            first = json.load(open(lease))["seen"]
            deadline = time.time() + 60
            while json.load(open(lease))["seen"] == first:
                assert time.time() < deadline, "not renewed"
                time.sleep(0.05)
        run()
        """
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "scored")], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "scored").iterdir()) == [outputs.MARKER]  # released at its end
