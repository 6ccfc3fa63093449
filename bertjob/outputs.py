"""Output directories on any filesystem: claim (never wiping a directory bertjob did not write), versions."""

from __future__ import annotations

import json
import os
import platform
import time

import pyarrow.fs as pafs

from bertjob.config import SetupError
from bertjob.storage import filesystem, join

MARKER = "_bertjob_output"  # written first: this directory belongs to bertjob and may be replaced
MANIFEST = "manifest.json"  # written last: its presence means the output is complete


class OutputError(SetupError):
    """The output location cannot be used."""


def claim_output(path: str, stage: str, replace: bool = True) -> None:
    """Make `path` an empty output directory of `stage`.

    An existing directory is replaced only when it is empty or was written by bertjob (it has the
    marker), so a typo can never wipe an unrelated directory. The manifest goes first, so a crash
    part-way leaves a directory that does not look complete.
    """
    fs, where = filesystem(path)
    info = fs.get_file_info(where)
    if info.type == pafs.FileType.File:
        raise OutputError(f"output {path} is a file; give a directory")
    if info.type == pafs.FileType.Directory:
        children = fs.get_file_info(pafs.FileSelector(where))
        names = {os.path.basename(c.path) for c in children}
        if names and MARKER not in names:
            raise OutputError(
                f"output {path} exists and was not written by bertjob ({len(names)} entries); "
                f"choose another directory or empty it"
            )
        if names and not replace:
            raise OutputError(f"output {path} already holds a bertjob output")
        if MANIFEST in names:
            fs.delete_file(join(where, MANIFEST))
        fs.delete_dir_contents(where, missing_dir_ok=True)
    fs.create_dir(where, recursive=True)
    with fs.open_output_stream(join(where, MARKER)) as f:
        f.write(json.dumps({"stage": stage, "started": time.time()}).encode())


def ensure_output(path: str, stage: str) -> None:
    """Create `path` (or reuse one bertjob wrote) without deleting what is in it."""
    fs, where = filesystem(path)
    info = fs.get_file_info(where)
    if info.type == pafs.FileType.File:
        raise OutputError(f"output {path} is a file; give a directory")
    if info.type == pafs.FileType.Directory:
        names = {os.path.basename(c.path) for c in fs.get_file_info(pafs.FileSelector(where))}
        if names and MARKER not in names:
            raise OutputError(
                f"output {path} exists and was not written by bertjob; choose another directory"
            )
        if MARKER in names:
            return
    fs.create_dir(where, recursive=True)
    with fs.open_output_stream(join(where, MARKER)) as f:
        f.write(json.dumps({"stage": stage, "started": time.time()}).encode())


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("bertjob", "ray", "torch", "transformers", "tokenizers", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
