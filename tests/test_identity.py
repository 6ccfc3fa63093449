"""Reuse by identity, not by path: the content of the input, the settings, the model, the version."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from bertjob import identity, pipeline
from bertjob.config import PipelineConfig, build, to_dict
from bertjob.sources import open_corpus


def _write(path, texts):
    pq.write_table(pa.table({"text": texts, "label": [i % 2 for i in range(len(texts))]}), path)


def test_a_corpus_replaced_at_the_same_path_is_a_new_input(tmp_path):
    path = tmp_path / "c.parquet"
    _write(path, ["great movie", "awful movie"])
    before = identity.corpus_fingerprint(open_corpus(str(path)))
    stat = os.stat(path)
    _write(path, ["great movie", "awful moviE"])  # same size; same mtime too, as a fast rewrite can give
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert identity.corpus_fingerprint(open_corpus(str(path))) != before
    # ... while the same content elsewhere is the same input
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    os.replace(path, moved / "c.parquet")
    _write(path, ["great movie", "awful movie"])
    assert identity.corpus_fingerprint(open_corpus(str(path))) == before


def test_big_inputs_are_told_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "SMALL_INPUT_BYTES", 0)
    path = tmp_path / "c.parquet"
    _write(path, ["great movie", "awful movie"])
    before = identity.corpus_fingerprint(open_corpus(str(path)))
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1))
    assert identity.corpus_fingerprint(open_corpus(str(path))) != before


def test_pipeline_redoes_prepare_when_the_corpus_is_replaced_at_the_same_path(tmp_path, tiny_model_dir):
    """The reuse decision alone (no Ray): a manifest written for the old corpus is not current."""
    from bertjob import models, prepare

    path = tmp_path / "c.parquet"
    _write(path, ["great movie", "awful movie"])
    cfg = build(
        PipelineConfig, {"input": str(path), "output_dir": str(tmp_path / "out"), "model": tiny_model_dir}
    )
    p_cfg = cfg.stage("prepare")
    fp = models.tokenizer_info(tiny_model_dir)["fingerprint"]
    manifest = {"identity": prepare.identity_of(p_cfg, open_corpus(str(path)), fp), "config": to_dict(p_cfg)}
    os.makedirs(p_cfg.output)
    (tmp_path / "out" / "prepared" / "manifest.json").write_text(json.dumps(manifest))
    assert pipeline._prepared_is_current(p_cfg, open_corpus(str(path))) == manifest
    # One prepared before held-out rows were chosen by text is not current either: chosen by id, a
    # review repeated under another id could be trained on and held out at once.
    settings = {k: v for k, v in to_dict(p_cfg).items() if k not in ("input", "output")}
    by_id = identity.identity(identity.corpus_fingerprint(open_corpus(str(path))), settings, fp)
    (tmp_path / "out" / "prepared" / "manifest.json").write_text(json.dumps({**manifest, "identity": by_id}))
    assert pipeline._prepared_is_current(p_cfg, open_corpus(str(path))) is None
    _write(path, ["great film!", "awful film!"])  # same path, other reviews
    assert pipeline._prepared_is_current(p_cfg, open_corpus(str(path))) is None
    # The same corpus, but a shard of the prepared output deleted since: it was reused, and every
    # later stage read one row fewer than its manifest counts.
    manifest["identity"] = prepare.identity_of(p_cfg, open_corpus(str(path)), fp)
    shard = tmp_path / "out" / "prepared" / "train" / "part-0.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.table({"label": [1]}), shard)
    manifest["splits"] = {"train": {"rows_written": 1, "files": [{"name": shard.name, "rows": 1,
                                                                 "bytes": shard.stat().st_size}]}}  # fmt: skip
    (tmp_path / "out" / "prepared" / "manifest.json").write_text(json.dumps(manifest))
    assert pipeline._prepared_is_current(p_cfg, open_corpus(str(path))) == manifest
    shard.unlink()
    assert pipeline._prepared_is_current(p_cfg, open_corpus(str(path))) is None
