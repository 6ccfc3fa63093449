"""What a stage's output was made from, as one digest: the one rule by which prepare, train and
infer/evaluate decide to reuse (or resume) an output rather than redo it.

A stage's identity is its input's content, its settings, the model it used and the bertjob version.
Content, not path: a corpus replaced at the same path is a new input, and a moved one the same.
Files are told by size and modification time (on object stores, the object's size and
last-modified time, which a new upload changes); a small input is hashed outright, since a
rewrite within the filesystem's timestamp granularity, or a copy that keeps timestamps, leaves
size and time as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pyarrow.fs as pafs

from bertjob import models
from bertjob.sources import Corpus
from bertjob.storage import filesystem

SMALL_INPUT_BYTES = 8 << 20  # inputs up to this size (and SMALL_INPUT_FILES files) are hashed
SMALL_INPUT_FILES = 256


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_fingerprint(fs: pafs.FileSystem, paths: list[str], root: str, content: bool = False) -> list[Any]:
    """[relative path, size, mtime (ns)] per file, or [relative path, content hash] for a small input
    (or any, with `content`)."""
    infos = fs.get_file_info(paths)
    small = content or (len(infos) <= SMALL_INPUT_FILES and sum(i.size or 0 for i in infos) <= SMALL_INPUT_BYTES)
    out = []
    for info in infos:
        rel = os.path.relpath(info.path, root) if root else info.path
        if info.type != pafs.FileType.File:
            out.append([rel, "missing"])
        elif small:
            h = hashlib.sha256()
            with fs.open_input_stream(info.path) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            out.append([rel, h.hexdigest()[:16]])
        else:
            out.append([rel, info.size, info.mtime_ns])
    return out


def corpus_fingerprint(corpus: Corpus) -> list[Any]:
    """Every file a corpus reads (a prepared directory: also its manifest)."""
    if corpus.kind == "imdb-tar":
        paths, root = [corpus.root], os.path.dirname(corpus.root)
    elif corpus.kind == "imdb-dir":
        paths, root = [p for unit in corpus.units for p in unit], corpus.root
    elif corpus.kind == "prepared":
        paths, root = [*corpus.units, corpus.root + "/manifest.json"], corpus.root
    elif corpus.root.startswith("hf://"):  # the dataset cache's Arrow files
        paths, root = list(corpus.units), ""
    else:
        paths, root = list(corpus.units), corpus.root
    return files_fingerprint(corpus.fs, paths, root)


def model_fingerprint(model: str, content: bool = False) -> Any:
    """The files of a local model directory (weights, config, tokenizer), or a hub id as given.
    `content`: by their content, which the same model exported again (new times) keeps."""
    if models.is_hub_id(model):  # as given, with the hub in reach or not (then the local cache's copy loads)
        return {"hub": model}
    where = models.resolve_model(model)
    fs, root = filesystem(where)
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.File]
    return files_fingerprint(fs, sorted(files), root, content)


def bertjob_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("bertjob")
    except md.PackageNotFoundError:
        return "unknown"


def identity(inputs: Any, settings: dict[str, Any], model: Any) -> str:
    """The digest a stage records beside its output and compares on a rerun."""
    return digest({"inputs": inputs, "settings": settings, "model": model, "bertjob": bertjob_version()})
