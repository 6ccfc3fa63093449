"""Text sources: every input format is one small reader that yields Arrow tables of one shape.

Each reader turns a "unit" (a file, or a slice of an IMDb listing) into tables with the columns of
`ROW_SCHEMA`. Nothing here needs Ray; `bertjob.raydata` wraps a Corpus as a Ray Data datasource, so
Ray reads units in parallel and streams the tables on.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bertjob.config import SetupError
from bertjob.outputs import MARKER, a_or_an, stage_of
from bertjob.storage import filesystem, uri
from bertjob.text import MISSING_LABEL_TEXTS, decode_text

log = logging.getLogger(__name__)

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),  # decoded, not yet cleaned; null when the source had none
        ("label", pa.string()),  # raw label as text (parsed later); null when unlabelled
        ("split", pa.string()),
        ("utf8_replaced", pa.bool_()),  # the source bytes were not valid UTF-8
    ]
)

ROWS_PER_TABLE = 1024
IMDB_FILE = re.compile(r"(?:^|/)(train|test)/(pos|neg|unsup)/(\d+)_(\d+)\.txt$")
IMDB_REVIEW_TXT = re.compile(r"(?:^|/)(train|test)/(pos|neg|unsup)/[^/._][^/]*\.txt$")  # visible .txt there
GENERIC_FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "csv",  # read as CSV separated by tabs (GLUE's SST-2)
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
COMPRESSIONS = (".gz", ".bz2", ".zst")  # of CSV, TSV and JSONL files, by suffix in any case
SAMPLE_NAME = "aclImdb_sample.tar.gz"
IMDB_ARCHIVES = (".tar.gz", ".tgz", ".tar")  # read as the IMDb layout, alone
SPLITS = ("train", "validation", "test", "unsup")  # of a split=... directory
SPLIT_WORDS = ("train", "test", "validation", "valid", "val", "dev", "unsupervised", "unsup")  # as file names
TAR_SLICES = 1
PREPARED_FORMAT = "bertjob-prepared/1"
UTF8_BOM = b"\xef\xbb\xbf"
# How UTF-32 and UTF-16 text begins (UTF-32 first: its marks begin with UTF-16's): a byte-order mark,
# or, without one, the zero bytes of ASCII's first two (UTF-32) or four (UTF-16) characters.
WIDE_TEXT = {
    "UTF-32": ((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"), ((1, 2, 3, 5, 6, 7), (0, 1, 2, 4, 5, 6))),
    "UTF-16": ((b"\xff\xfe", b"\xfe\xff"), ((1, 3, 5, 7), (0, 2, 4, 6))),
}


class InputError(SetupError):
    """The input cannot be read as a corpus; raised before any work starts."""


def sample_path() -> str:
    return str(Path(__file__).parent / "data" / SAMPLE_NAME)


def _table(rows: dict[str, list[Any]]) -> pa.Table:
    return pa.Table.from_pydict(rows, schema=ROW_SCHEMA)


def _empty_rows() -> dict[str, list[Any]]:
    return {name: [] for name in ROW_SCHEMA.names}


@dataclass
class Corpus:
    """A listed input: what it is, the units to read, and how to read one unit."""

    kind: str  # imdb-tar | imdb-dir | parquet | csv | jsonl | arrow
    root: str
    units: list[Any]
    fs: Any = None
    text_column: str = "text"
    label_column: str = "label"
    id_column: str = ""
    split: str = "train"
    split_of_unit: dict[str, str] = field(default_factory=dict)  # hf:// splits, split=... directories
    header: tuple[str, list[str]] = ("", [])  # a file-based corpus's first file with columns, and those
    size_bytes: int = 0
    # Rows carry labels (outside the unlabelled split): a row without one is quarantined, and
    # evaluate refuses a corpus without them before any work.
    labelled: bool = False

    def read(self, unit: Any, keys_only: bool = False) -> Iterator[pa.Table]:
        reader = {
            "imdb-tar": _read_imdb_tar,
            "imdb-dir": _read_imdb_files,
            "parquet": _read_parquet,
            "csv": _read_csv,
            "jsonl": _read_jsonl,
            "arrow": _read_arrow,
            "prepared": _read_prepared,
        }[self.kind]
        yield from reader(self, unit, keys_only)

    def first_rows(self, keys_only: bool = False) -> pa.Table | None:
        """The first rows a unit yields (None: no unit yields any); reads only up to them."""
        for unit in self.units:
            tables = self.read(unit, keys_only)
            try:
                for t in tables:
                    if t.num_rows:
                        return t
            finally:
                tables.close()
        return None

    def splits(self) -> set[str] | None:
        """The splits its rows go to, when known without reading them (an IMDb tar's are not)."""
        if self.kind == "imdb-dir":
            return {_imdb_split(m) for unit in self.units for m in map(IMDB_FILE.search, unit) if m}
        if self.kind in ("imdb-tar", "prepared"):
            return None
        return {self.split_of(unit) for unit in self.units}

    def named_splits(self) -> dict[str, str]:
        """The splits its files are named as, each with its first such file: Hugging Face's Parquet
        exports and Kaggle's downloads name them (train-00000-of-00001.parquet, test-...; train.csv,
        dev.csv). A file in a split=NAME/ directory has a split of its own."""
        named: dict[str, str] = {}
        for unit in self.units if self.kind in ("parquet", "csv", "jsonl") else ():
            word = re.split(r"[-_.]", os.path.basename(unit).lower(), maxsplit=1)[0]
            if word in SPLIT_WORDS and unit not in self.split_of_unit:
                named.setdefault(word, unit)
        return named

    def near_label_column(self) -> str | None:
        """A column named as the label column but for case or spaces (Excel's "Label", " label" after a
        header's comma), where no file has the label column itself."""
        want = self.label_column.strip().lower()
        if self.labelled or not want:
            return None
        return next((n for n in self.header[1] if n.strip().lower() == want), None)

    def split_of(self, unit: str) -> str:
        """The split of a file's rows: its own (hf://, a split=test/ directory), else `split`."""
        return self.split_of_unit.get(unit, self.split)

    def describe(self) -> str:
        files = self.kind in ("parquet", "csv", "jsonl")
        where = self.units[0] if files and len(self.units) == 1 else self.root  # one file: that file
        unlabelled = not self.labelled and (files or self.kind == "arrow")
        labels = f", unlabelled: no column {self.label_column!r}" if unlabelled and self.label_column else ""
        tabs = self.kind == "csv" and all(_separator(unit) == "\t" for unit in self.units)
        return f"{'tsv' if tabs else self.kind} corpus at {uri(self.fs, where)} ({len(self.units)} unit(s){labels})"

    def relpath(self, path: str) -> str:
        root = self.root if self.kind != "arrow" else os.path.dirname(self.root)
        rel = os.path.relpath(path, root) if not os.path.isabs(path) or os.path.isabs(root) else path
        return path if rel == "." else rel


# ---------------------------------------------------------------------------------------------
# Opening an input: detect the format, list the units, check columns before any work.


def _refuse_part_of_prepared(fs: pafs.FileSystem, where: str, path: str) -> None:
    """A split directory of a prepared output, or a shard in one (`--input prepared/test`), was read
    as a corpus of its own: its token ids were refused as a corpus without a text column, with the
    advice to set --text-column. Name the prepared directory and the split to give instead."""
    below, root = [], where
    for _ in range(2):  # prepared/SPLIT, prepared/SPLIT/part-N.parquet
        below, root = [os.path.basename(root), *below], os.path.dirname(root)
        if root and fs.get_file_info(root + "/manifest.json").type == pafs.FileType.File:
            if stage_of(uri(fs, root)) != "prepare":
                return
            prepared = uri(fs, root)
            give = f"--input {prepared} --split {below[0]}" if below[0] in SPLITS else f"--input {prepared}"
            raise InputError(f"input {path} is part of the `bertjob prepare` output {prepared}, not a corpus of its "
                             f"own; give {give}")  # fmt: skip


def open_corpus(
    path: str,
    text_column: str = "text",
    label_column: str = "label",
    id_column: str = "",
    split: str = "train",
) -> Corpus:
    """The corpus at `path`. `split`: of a prepared directory, the split to read (empty: every one);
    of any other corpus, the split its rows without one of their own go to (empty: train)."""
    if path == "imdb-sample":
        path = sample_path()
    opts = dict(
        text_column=text_column, label_column=label_column, id_column=id_column, split=split or "train"
    )
    if path.startswith("hf://"):
        return _open_hf(path[len("hf://") :], **opts)
    fs, where = filesystem(path)
    info = fs.get_file_info(where)
    # A path that exists is read as named, even with a glob's characters in it ("reviews [2024].csv").
    if info.type == pafs.FileType.NotFound and any(ch in where for ch in "*?["):
        base, files = _glob(fs, where)
        if not files:
            # Worded for both: a missing `reviews [final].csv` is a pattern too (it matches reviewsf.csv ...).
            raise InputError(
                f"input {path}: no such file or directory, and as a glob pattern it matches no file"
            )
        if len(files) == 1 and files[0][0].lower().endswith(IMDB_ARCHIVES):  # data/aclImdb*.tar.gz
            return _open_imdb_tar(fs, *files[0], opts)
        return _generic(fs, base, files, opts)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {path}: no such file or directory")
    if info.type == pafs.FileType.Unknown:  # a FIFO, a device, a socket
        raise InputError(f"input {path}: neither a regular file nor a directory")
    if (
        info.type == pafs.FileType.Directory
        and fs.get_file_info(where + "/manifest.json").type == pafs.FileType.File
        and (prepared := _open_prepared(fs, where, split))
    ):
        return prepared
    _refuse_part_of_prepared(fs, where, path)
    if info.type == pafs.FileType.Directory and stage_of(uri(fs, where)) == "prepare":
        # Its shards, config.json and quarantine were read as a corpus: "mixes formats", or its
        # token ids as rows without text
        raise InputError(f"input {path} is a `bertjob prepare` output without its manifest.json: its prepare did "
                         f"not finish, or the manifest was removed; run that prepare again")  # fmt: skip
    if info.type == pafs.FileType.Directory and (saved := _saved_dataset_files(fs, where)) is not None:
        return _open_saved_dataset(fs, where, saved, opts)
    if info.type == pafs.FileType.File:
        if where.lower().endswith(IMDB_ARCHIVES):
            return _open_imdb_tar(fs, where, info.size, opts)
        return _generic(fs, os.path.dirname(where), [(where, info.size)], opts)
    # A directory: the IMDb layout (possibly one level down, as in aclImdb_v1/aclImdb), else files.
    listing = _list(fs, where, recursive=True)
    _refuse_versioned_tables(fs, listing)
    outputs = _outputs_below(listing, where)
    # A broken link of any name: one to a directory (an unmounted share, a moved folder) held files too.
    _refuse_unreadable(fs, [
        f for f in listing
        if (_format_of(f.path) or IMDB_REVIEW_TXT.search(f.path) or f.type == pafs.FileType.NotFound)
        and not _hidden(f.path, where) and not f.path.startswith(outputs)
    ])  # fmt: skip
    imdb = [f for f in listing if f.type == pafs.FileType.File and IMDB_FILE.search(f.path)]
    visible = [
        f for f in listing
        if f.type == pafs.FileType.File and not _hidden(f.path, where) and not f.path.startswith(outputs)
    ]  # fmt: skip
    files = [(f.path, f.size) for f in visible if _format_of(f.path)]
    if imdb and files:
        # aclImdb/ beside a reviews.csv: read as the IMDb layout, the other files' rows were missing without a word
        home = imdb[0].path[: IMDB_FILE.search(imdb[0].path).start()] or where  # type: ignore[union-attr]
        names = sorted(os.path.relpath(p, where) for p, _ in files)
        raise InputError(
            f"input {path}: holds the IMDb layout ({uri(fs, home)}) and {len(names)} other data file(s) "
            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}), which bertjob does not read as one corpus; "
            f"give the one to read as --input: the IMDb directory, or the other files (a glob)"
        )
    if imdb:
        # A review not named <id>_<rating>.txt would be left out without a word.
        stray = [f.path for f in listing if IMDB_REVIEW_TXT.search(f.path) and not IMDB_FILE.search(f.path)]
        if stray:
            raise InputError(
                f"input {path}: {len(stray)} file(s) in the IMDb layout's review directories are not named "
                f"<id>_<rating>.txt and would not be read (first: {stray[0]}); rename or remove them"
            )
        imdb.sort(key=lambda f: f.path)
        _refuse_read_twice(fs, [f.path for f in imdb])
        chunk = 1000
        units = [[f.path for f in imdb[i : i + chunk]] for i in range(0, len(imdb), chunk)]
        return Corpus(
            "imdb-dir", where, units, fs, size_bytes=sum(f.size for f in imdb), labelled=True, **opts
        )
    other = [os.path.relpath(f.path, where) for f in visible if not _format_of(f.path)]
    if files and other:  # a .txt or .xlsx beside the .csv files: its rows would be missing without a word
        log.warning("input %s: %d file(s) of no format bertjob reads are left out (%s%s)", path, len(other),
                    ", ".join(sorted(other)[:3]), ", ..." if len(other) > 3 else "")  # fmt: skip
    if not files:
        raise InputError(
            f"input {path}: no IMDb layout (train/pos/*.txt ...) and no .parquet, .csv, .tsv or .jsonl file found"
        )
    return _generic(fs, where, sorted(files), opts)


def _list(fs: pafs.FileSystem, where: str, recursive: bool) -> list[pafs.FileInfo]:
    """A directory's entries; one that cannot be listed (a subdirectory without permission) is an
    error naming it, not a traceback. A broken symbolic link is an entry of type NotFound."""
    try:
        listing = fs.get_file_info(pafs.FileSelector(where, recursive=recursive))
    except OSError as err:
        raise InputError(f"input {uri(fs, where)}: cannot be listed ({err})") from err
    if isinstance(fs, pafs.LocalFileSystem):  # pyarrow leaves broken links out of its listing
        listing += [pafs.FileInfo(p, pafs.FileType.NotFound) for p in _broken_links(where, recursive)]
    return listing


def _broken_links(where: str, recursive: bool) -> list[str]:
    """The symbolic links to nothing in a local directory (not below a linked directory: a link
    loop would never end)."""
    found, todo = [], [where]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for e in entries:
                if e.is_symlink() and not os.path.exists(e.path):
                    found.append(e.path)
                elif recursive and e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
    return found


def _refuse_read_twice(fs: pafs.FileSystem, paths: list[str]) -> None:
    """Two paths of one file (a `latest` link to a sibling directory, a link to a parent, which
    pyarrow's listing followed 40 levels deep) are an error: its rows were read once per path."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    seen: dict[tuple[int, int], str] = {}
    for path in paths:
        st = os.stat(path)
        first = seen.setdefault((st.st_dev, st.st_ino), path)
        if first != path:
            raise InputError(
                f"input {uri(fs, path)} is the same file as {first} (through a symbolic or hard link), so its rows "
                f"would be read twice; remove the link, or give a glob that reaches the file once"
            )


def _refuse_unreadable(fs: pafs.FileSystem, entries: list[pafs.FileInfo]) -> None:
    """A corpus file that is a link to nothing (a moved or unmounted target), or a FIFO, device or
    socket, is an error: left out of the files read, its rows were missing without a word."""
    broken = sorted(f.path for f in entries if f.type == pafs.FileType.NotFound)
    if broken:
        raise InputError(
            f"input {uri(fs, broken[0])}: a symbolic link to {os.readlink(broken[0])}, which does not exist"
            + (f" (and {len(broken) - 1} more such link(s))" if len(broken) > 1 else "")
            + "; restore its target or remove the link"
        )
    special = sorted(f.path for f in entries if f.type == pafs.FileType.Unknown)
    if special:
        raise InputError(f"input {uri(fs, special[0])}: neither a regular file nor a directory")


VERSIONED_TABLES = {
    "_delta_log": ("a Delta Lake table", "delta"),
    ".hoodie": ("an Apache Hudi table", "hudi"),
}


def _refuse_versioned_tables(fs: pafs.FileSystem, listing: list[pafs.FileInfo]) -> None:
    """A Delta Lake or Hudi table is an error: its directory also holds the Parquet files of the rows
    its later versions updated or deleted (until a VACUUM or a clean removes them), which were read
    as data beside the current ones without a word, as its log, a hidden directory, was not read."""
    for f in listing:
        if os.path.basename(f.path) in VERSIONED_TABLES and f.type == pafs.FileType.Directory:
            kind, spark_format = VERSIONED_TABLES[os.path.basename(f.path)]
            raise InputError(
                f"input {uri(fs, os.path.dirname(f.path))} is {kind}: its directory also holds the files of rows "
                f"that later versions replaced or deleted, which would be read too; export its current version to "
                f"Parquet first (in Spark: spark.read.format('{spark_format}').load(TABLE).write.parquet(OUT))"
            )


def _outputs_below(listing: list[pafs.FileInfo], where: str) -> tuple[str, ...]:
    """The bertjob outputs inside a listed directory (infer --output corpus/scored), as path prefixes:
    not input, whose manifest and predictions would be read as more rows by the next run on it."""
    return tuple(
        os.path.dirname(f.path) + "/"
        for f in listing
        if os.path.basename(f.path) == MARKER and f.path[len(where) :].strip("/") != MARKER
    )


def _hidden(path: str, root: str) -> bool:
    """A file, or one inside a directory, named with `.` or `_` below `root`: not data (Spark's
    `_SUCCESS` and `_temporary/`, `.crc` files, `.ipynb_checkpoints/`, a bertjob output's `_tmp/`),
    whose rows would otherwise be read twice or half-written, as Spark, Hive and pyarrow skip them."""
    return any(part.startswith(("_", ".")) for part in path[len(root) :].strip("/").split("/"))


def _uncompressed(path: str) -> str:
    """A file's path without its compression suffixes (a.csv of a.csv.gz)."""
    for suffix in COMPRESSIONS:
        if path.lower().endswith(suffix):
            path = path[: -len(suffix)]
    return path


def _format_of(path: str) -> str | None:
    return GENERIC_FORMATS.get(os.path.splitext(_uncompressed(path).lower())[1])


def _refuse_compressed_twins(fs: pafs.FileSystem, paths: list[str]) -> None:
    """A file beside its compressed copy (a.csv and a.csv.gz, as `gzip -k` leaves them) is an error:
    both were read, every row likely twice, without a word. Suffixes in any case, as they are read
    (a.CSV beside a.csv.gz)."""
    seen: dict[tuple[str, str], str] = {}
    for path in paths:
        stem, suffix = os.path.splitext(_uncompressed(path))
        first = seen.setdefault((stem, suffix.lower()), path)
        if first != path:
            raise InputError(
                f"input {uri(fs, first)} and {os.path.basename(path)}: the same data twice (as `gzip -k` leaves a file "
                f"beside its .gz)? both would be read, every row likely twice; remove or move one of them (or rename "
                f"one, if they hold other rows)"
            )


def _glob_base(fs: pafs.FileSystem, pattern: str) -> str:
    """The deepest directory of a glob pattern without a wildcard: where its matches are listed. A
    directory that exists as named is that, even with a glob's characters in its name, as an input
    path that exists is read as named (`reviews [2024]/*.csv`)."""
    base = pattern
    while any(ch in base for ch in "*?[") and fs.get_file_info(base).type != pafs.FileType.Directory:
        base = os.path.dirname(base)
    return base


def _glob(fs: pafs.FileSystem, pattern: str) -> tuple[str, list[tuple[str, int]]]:
    """The base directory of a pattern and (path, size) of the files it matches there, with a shell's
    meaning: segment by segment, so `*`, `?` and `[...]` never match `/` (gl/*.parquet leaves out
    gl/backup/a.parquet), and `**` is any number of directories (gl/**/*.parquet is every .parquet
    file under gl/, gl/'s own too)."""
    base = _glob_base(fs, pattern)
    segments = pattern[len(base) :].strip("/").split("/")  # the segments below the base
    # Only a pattern that reaches below the base's own entries needs the slower recursive listing.
    recursive = len(segments) > 1 or "**" in segments
    listing = _list(fs, base, recursive=recursive)
    _refuse_versioned_tables(fs, listing)
    outputs = _outputs_below(listing, base)  # corpus/**/*.parquet would reach corpus/scored/predictions/
    below = [
        (f, f.path[len(base) :].strip("/").split("/")) for f in listing if not f.path.startswith(outputs)
    ]
    matches = [f for f, names in below if _match_segments(names, segments)]
    # A broken link where the pattern reaches below (data/*/x.csv, data/**/*.csv) may have been a
    # directory of matches: refused as one to a matching file is.
    gone = [
        f for f, names in below
        if f.type == pafs.FileType.NotFound and any(_match_segments(names, segments[:k]) for k in range(1, len(segments)))
    ]  # fmt: skip
    _refuse_unreadable(fs, matches + gone)
    files = sorted((f.path, f.size) for f in matches if f.type == pafs.FileType.File)
    dirs = {f.path for f in matches if f.type == pafs.FileType.Directory and not _hidden(f.path, base)}
    if dirs:  # a listing that is not recursive holds none of their files: they are listed now
        entries = (
            [f for f, _ in below]
            if recursive
            else [f for d in sorted(dirs) for f in _list(fs, d, recursive=True)]
        )
        _refuse_directories_unread(fs, pattern, base, dirs, {p for p, _ in files}, entries)
    return base, files


def _refuse_directories_unread(
    fs: pafs.FileSystem,
    pattern: str,
    base: str,
    dirs: set[str],
    files: set[str],
    entries: list[pafs.FileInfo],
) -> None:
    """A pattern that matches a directory holding data files it does not match is an error: Spark
    writes a table as a directory (reviews.parquet/part-00000.parquet), and data/*.parquet left its
    rows out without a word, reading only the files the pattern matched."""
    outputs = _outputs_below(entries, base)
    for f in entries:
        if (
            f.type != pafs.FileType.File
            or not _format_of(f.path)
            or f.path in files
            or f.path.startswith(outputs)
        ):
            continue
        where = os.path.dirname(f.path)
        while where not in dirs and len(where) > len(base):
            where = os.path.dirname(where)
        if where in dirs and not _hidden(f.path, where):
            reaching = f"{uri(fs, pattern).rpartition('/')[0]}/**/*{os.path.splitext(f.path)[1]}"
            raise InputError(
                f"input {uri(fs, pattern)} matches the directory {uri(fs, where)}, whose data files (such as "
                f"{os.path.relpath(f.path, where)}) it does not read: Spark writes a table as such a directory. Give "
                f"the directory itself, or a pattern that reaches its files too, such as {reaching}"
            )


def _match_segments(names: list[str], parts: list[str]) -> bool:
    # fnmatch alone lets `*` match `/`; matching each segment on its own keeps it within one. Nor
    # does a shell's wildcard match a leading `.`: data/*.csv is not also data/.backup.csv. `**` (as
    # Python's recursive glob and bash's globstar read it) is zero or more segments: matched as `*`,
    # data/**/*.parquet was data/x/a.parquet alone, without data/a.parquet or data/x/y/b.parquet.
    # It passes no directory a directory's listing leaves out (`.git/`, Spark's `_temporary/`).
    if not parts:
        return not names
    if parts[0] == "**":
        return _match_segments(names, parts[1:]) or (
            bool(names) and not names[0].startswith((".", "_")) and _match_segments(names[1:], parts)
        )
    return (
        bool(names)
        and fnmatch.fnmatch(names[0], parts[0])
        and (parts[0].startswith(".") or not names[0].startswith("."))
        and _match_segments(names[1:], parts[1:])
    )


def _generic(fs: pafs.FileSystem, root: str, files: list[tuple[str, int]], opts: dict[str, str]) -> Corpus:
    kinds = {_format_of(p) for p, _ in files}
    if None in kinds:
        bad = next(p for p, _ in files if _format_of(p) is None)
        if bad.lower().endswith(IMDB_ARCHIVES):  # matched by a glob beside other files
            raise InputError(
                f"input {uri(fs, bad)}: an IMDb archive is read alone; give its path as the input"
            )
        raise InputError(
            f"input {uri(fs, bad)}: unknown format (expected .parquet, .csv, .tsv, .jsonl, or an IMDb tar.gz)"
        )
    if len(kinds) > 1:  # name a file of each: a stray metadata.json is otherwise hard to find
        first = {
            k: next(os.path.relpath(p, root) for p, _ in files if _format_of(p) == k) for k in sorted(kinds)
        }
        mixed = ", ".join(f"{k} ({p})" for k, p in first.items())
        raise InputError(
            f"input {uri(fs, root)}: mixes formats: {mixed}; point at one format at a time (a glob)"
        )
    kind = kinds.pop()
    _refuse_read_twice(fs, [p for p, _ in files])
    _refuse_compressed_twins(fs, [p for p, _ in files])
    corpus = Corpus(kind, root, [p for p, _ in files], fs, size_bytes=sum(s for _, s in files), **opts)
    bare = []  # files with columns but not the label column
    for path, _ in files:
        # A corpus partitioned by split (Hive's layout: reviews/split=test/part-0.parquet) keeps its
        # files' splits in their paths: read as --split's, its test rows were trained on.
        own = _partition_keys(corpus, path).get("split")
        own = _split_name(own) if own is not None else None
        if own is not None and own not in SPLITS:
            raise InputError(
                f"input {uri(fs, path)}: split={own} is not a split bertjob reads ({', '.join(SPLITS)}); "
                f"rename the directory (split=validation for a dev set)"
            )
        if own is not None:
            corpus.split_of_unit[path] = own
        names = _add_columns(corpus, path)
        if names and corpus.label_column not in names:
            bare.append(corpus.relpath(path))
    if corpus.labelled and bare:  # each of their rows was quarantined as missing_label, the file unnamed
        log.warning("input %s: %d of %d files have no column %r (%s%s): their rows have no label", uri(fs, root),
                    len(bare), len(files), corpus.label_column, ", ".join(bare[:3]), ", ..." if len(bare) > 3 else "")  # fmt: skip
    return corpus


def _add_columns(corpus: Corpus, path: str) -> list[str]:
    """Check a file's columns (`_check_columns`) and note them: whether the corpus is labelled, and
    its first file with columns. Returns them."""
    try:
        names = _check_columns(corpus, path)
    except InputError:
        # The likelier causes of a first line that makes no sense
        _refuse_wide_text(corpus, path)
        _refuse_foreign_csv(corpus, path)
        raise
    corpus.labelled |= bool(corpus.label_column) and corpus.label_column in names
    if names and not corpus.header[1]:
        corpus.header = (path, names)
    return names


def _saved_dataset_files(fs: pafs.FileSystem, where: str) -> dict[str, str] | None:
    """The Arrow files of a Hugging Face dataset saved with `save_to_disk` ({path: its split; "" for
    a Dataset's, which go to --split}), None for another directory. A DatasetDict's directory has
    dataset_dict.json and one directory per split, a Dataset's state.json naming its files."""
    as_dict, as_dataset = fs.get_file_info([f"{where}/dataset_dict.json", f"{where}/state.json"])
    if as_dict.type == pafs.FileType.File:
        with fs.open_input_stream(as_dict.path) as f:
            splits = json.loads(f.read())["splits"]
        return {p: _split_name(s) for s in splits for p in _saved_dataset_files(fs, f"{where}/{s}") or ()}
    if as_dataset.type != pafs.FileType.File:
        return None
    with fs.open_input_stream(as_dataset.path) as f:
        return {f"{where}/{d['filename']}": "" for d in json.loads(f.read())["_data_files"]}


def _open_saved_dataset(
    fs: pafs.FileSystem, where: str, files: dict[str, str], opts: dict[str, str]
) -> Corpus:
    """A `save_to_disk` directory, read from its Arrow files: read as files, its dataset_info.json was
    refused as a JSON array (with advice to convert it) and its Arrow files were left out."""
    for split in set(files.values()) - {"", *SPLITS}:
        raise InputError(
            f"input {uri(fs, where)}: its split {split!r} is not a split bertjob reads ({', '.join(SPLITS)}); "
            f"rename it (validation for a dev set), e.g. DatasetDict(...).save_to_disk again"
        )
    units = list(files)
    sizes = fs.get_file_info(units)
    corpus = Corpus("arrow", where, units, fs, split_of_unit={p: s for p, s in files.items() if s},
                    size_bytes=sum(i.size or 0 for i in sizes), **opts)  # fmt: skip
    for path in units:
        _add_columns(corpus, path)
    return corpus


def _split_name(name: str) -> str:
    """A split as bertjob names it: Hugging Face's `unsupervised` (IMDb's) is `unsup`."""
    return "unsup" if name == "unsupervised" else name


def _refuse_wide_text(corpus: Corpus, path: str) -> None:
    """A CSV, TSV or JSONL file in UTF-16 or UTF-32 (Excel's "Unicode text", PowerShell's redirections) is
    an error saying so: read as UTF-8 it failed as a parse error or a missing column."""
    if corpus.kind not in ("csv", "jsonl"):
        return
    try:
        with _open_text_stream(corpus.fs, path) as f:
            head = f.read(64)
    except OSError:  # a .gz that is not gzip: the error being raised names the file, this one did not
        return
    zeros = tuple(i for i, b in enumerate(head[:8]) if b == 0)
    for encoding, (marks, ascii_zeros) in WIDE_TEXT.items():
        if head.startswith(marks) or zeros in ascii_zeros:
            raise InputError(
                f"input {uri(corpus.fs, path)}: the file is {encoding} text; bertjob reads UTF-8. Convert it "
                f"first, e.g. iconv -f {encoding} -t UTF-8 {os.path.basename(path)} > utf8-{os.path.basename(path)}"
            )


def _refuse_foreign_csv(corpus: Corpus, path: str) -> None:
    """A CSV file as Excel saves one in many locales is an error saying so: separated by semicolons
    or tabs, its header was one column ("text;label") and its first review with a comma in it a
    parse error ("Expected 1 columns, got 2"); in Windows-1252, a header with an accent was "'utf-8'
    codec can't decode byte 0xe9". None said what to do. The same for a .tsv file without tabs."""
    if corpus.kind != "csv":
        return
    try:
        with _open_text_stream(corpus.fs, path) as f:
            first = next(iter_lines(f, 1 << 16), b"")
    except OSError:
        return
    header, replaced = decode_text(first.removeprefix(UTF8_BOM).rstrip(b"\r"))
    if replaced:
        name = os.path.basename(path)
        raise InputError(
            f"input {uri(corpus.fs, path)}: its header {header[:80]!r} is not UTF-8 (Windows-1252 or Latin-1?); "
            f"bertjob reads UTF-8: convert it first, e.g. iconv -f CP1252 -t UTF-8 {name} > utf8-{name}"
        )
    sep = _separator(path)
    found = [other for other in (",", ";", "\t", "|") if other != sep and other in header]
    if found and sep not in header:
        wanted = "tab" if sep == "\t" else "comma"
        rename = " (or, tab-separated, name it .tsv)" if found[0] == "\t" else ""
        raise InputError(
            f"input {uri(corpus.fs, path)}: its first line {header[:80]!r} holds no {wanted}: the file looks "
            f"{found[0]!r}-separated; bertjob reads .csv files as comma-separated and .tsv files as "
            f"tab-separated: save it with {wanted}s{rename}"
        )


def columns_of(corpus: Corpus, path: str) -> list[str]:
    """The column names of one file, reading as little of it as the format allows."""
    with _file_errors(corpus, path, (OSError, ValueError)):  # ValueError: also ArrowInvalid (a CSV header)
        if corpus.kind == "parquet":
            return parquet_schema(corpus, path).names
        if corpus.kind == "csv":
            return _csv_names(corpus.fs, path)
        with _open_text_stream(corpus.fs, path) as f:
            for lineno, line in enumerate(_jsonl_lines(f), start=1):
                if line.strip():
                    try:  # decoded as the reader does: json.loads of bytes would take UTF-16 too
                        row = json.loads(decode_text(line)[0])
                    except ValueError:
                        row = None
                    if not isinstance(row, dict):
                        # A .json file is most often one JSON array or an indented document, which
                        # failed as "Expecting value: line 1 column 2 (char 1)".
                        name = os.path.basename(path)
                        raise InputError(
                            f"input {uri(corpus.fs, path)}, line {lineno}: not a JSON object on a line of "
                            f"its own; bertjob reads .json and .jsonl files as JSON Lines (one object per "
                            f"line), and a JSON array or an indented document is not that: convert it first, "
                            f"e.g. jq -c '.[]' {name} > {name.split('.')[0]}-lines.jsonl"
                        )
                    return list(row)
            return []


@contextmanager
def _file_errors(
    corpus: Corpus, path: str, errors: tuple[type[Exception], ...] = (OSError, pa.ArrowInvalid)
) -> Iterator[None]:
    """Errors reading one file (a malformed CSV row, a corrupt Parquet page, a truncated .gz) as an
    InputError naming it, with the library's own message. Opening a corpus reads only each file's
    first block; what is wrong further on is found by a reader, in a Ray read task, where any other
    error ends the job with a traceback instead of one line."""
    try:
        yield
    except InputError:  # already one line (and a ValueError, which columns_of catches)
        raise
    except errors as err:
        raise InputError(f"input {uri(corpus.fs, path)}: cannot be read as {corpus.kind} ({err})") from err


def parquet_schema(corpus: Corpus, path: str) -> pa.Schema:
    with _file_errors(corpus, path), corpus.fs.open_input_file(path) as f:
        return pq.ParquetFile(f).schema_arrow


def arrow_schema(corpus: Corpus, path: str) -> pa.Schema:
    with _file_errors(corpus, path), _open_arrow(corpus, path) as reader:
        return reader.schema


def _no_schema(corpus: Corpus, path: str) -> None:
    return None  # CSV and JSONL: their names only (columns_of)


def _is_text_type(kind: pa.DataType) -> bool:
    """Strings, or bytes (decoded as UTF-8: older writers store strings without the annotation);
    a column of nulls only is text that is missing."""
    return any(
        check(kind)
        for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view, pa.types.is_binary,
                      pa.types.is_large_binary, pa.types.is_binary_view, pa.types.is_null)
    )  # fmt: skip


def _check_columns(corpus: Corpus, path: str) -> list[str]:
    """The file's columns (a JSONL file's: those of its first object), checked for text and id, and
    for a name we read given to two columns."""
    schema = {"parquet": parquet_schema, "arrow": arrow_schema}.get(corpus.kind, _no_schema)(corpus, path)
    names = schema.names if schema is not None else columns_of(corpus, path)
    # A list or struct column (sentences, tokens, {"title": ..., "body": ...}) was scored as its
    # Python repr, "['Great film', 'loved it']", and a column of numbers, booleans or dates (a
    # --text-column naming the rating or the date) as "4" or "2024-05-01 00:00:00", without a word.
    if schema is not None and corpus.text_column in names:
        kind = schema.field(corpus.text_column).type
        values = kind.value_type if pa.types.is_dictionary(kind) else kind
        if not _is_text_type(values):
            join_parts = ", or join its parts into one string first" if pa.types.is_nested(values) else ""
            raise InputError(
                f"input {uri(corpus.fs, path)}: column {corpus.text_column!r} holds {kind} values, not text; "
                f"set --text-column to the column of the review's text{join_parts}"
            )
    # An id of a list or struct (a record, {"source": ..., "n": ...}) was its Python repr, joined to nothing.
    if (
        schema is not None
        and corpus.id_column in names
        and pa.types.is_nested(schema.field(corpus.id_column).type)
    ):
        kind = schema.field(corpus.id_column).type
        raise InputError(_not_scalar_ids(uri(corpus.fs, path), corpus.id_column, f"{kind} values, not ids"))
    if corpus.kind in ("csv", "jsonl") and not names:
        return names  # an empty file adds no rows; the corpus-level emptiness check catches all-empty inputs
    # A CSV reader would silently take one of two same-named columns, a Parquet reader fail mid-job.
    twice = [
        c for c in (corpus.text_column, corpus.label_column, corpus.id_column) if c and names.count(c) > 1
    ]
    if twice:
        raise InputError(
            f"input {uri(corpus.fs, path)}: more than one column is named {twice[0]!r}, so which to read "
            f"is ambiguous; the columns are {names}. Rename one."
        )
    if (
        corpus.label_column
        and corpus.label_column not in names
        and corpus.label_column in _partition_keys(corpus, path)
    ):
        names = [*names, corpus.label_column]
    missing = [c for c in (corpus.text_column, corpus.id_column) if c and c not in names]
    if missing and corpus.kind == "csv" and _looks_like_a_row(names):
        raise InputError(_headerless_csv(uri(corpus.fs, path), names, missing))
    if missing:
        columns = "its first record's keys" if corpus.kind == "jsonl" else "the columns"
        raise InputError(
            f"input {uri(corpus.fs, path)}: no column {', '.join(map(repr, missing))}; {columns} are {names}. "
            f"Set --text-column / --id-column (in a pipeline, per stage: --prepare.text-column, ...)."
        )
    return names


def _looks_like_a_row(names: list[str]) -> bool:
    """Whether a CSV's first line reads as data, not column names: a number ("1", "2": Yelp's and
    Amazon's polarity files have no header) or a name as long as a sentence."""
    return any(re.fullmatch(r"\s*[-+]?\d+(\.\d*)?\s*", n) or len(n) > 60 for n in names)


def _headerless_csv(where: str, names: list[str], missing: list[str]) -> str:
    """The error for a CSV file without a header line: its first review was listed as a column
    name, hundreds of characters of it, and nothing said that bertjob wants a header."""
    shown = ", ".join(repr(n if len(n) <= 40 else n[:40] + "...") for n in names)
    longest = max(range(len(names)), key=lambda i: len(names[i]))
    columns = [
        "text" if i == longest else "label" if _looks_like_a_row([n]) else f"column{i + 1}"
        for i, n in enumerate(names)
    ]
    name = os.path.basename(where)
    if _separator(where) == ",":
        line = f"echo '{','.join(columns)}'"
    else:  # a tab as printf writes one (echo's `\t` is not every shell's)
        line = "printf '" + "\\t".join(columns) + "\\n'"
    return (
        f"input {where}: no column {', '.join(map(repr, missing))}; its first line ({shown}) looks like a row, "
        f"not a header: bertjob takes a CSV file's column names from its first line. Add a header line first, "
        f"e.g. ({line}; cat {name}) > header-{name}"
    )


def iter_lines(f: Any, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a (possibly compressed) pyarrow stream, as bytes, without holding the whole file."""
    rest = b""
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            break
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _jsonl_lines(f: Any) -> Iterator[bytes]:
    """A JSONL stream's lines, less a UTF-8 byte-order mark at the very start (Windows tools write
    one); one anywhere else stays, to fail as JSON on its own line."""
    for i, line in enumerate(iter_lines(f)):
        yield line.removeprefix(UTF8_BOM) if i == 0 else line


def _open_text_stream(fs: pafs.FileSystem, path: str) -> Any:
    # The suffix in any case, as _format_of reads it: DATA.CSV.GZ read undecompressed was gibberish.
    name = path.lower()
    compression = pa.Codec.detect(name).name if name.endswith(COMPRESSIONS) else None
    return fs.open_input_stream(path, compression=compression)


# ---------------------------------------------------------------------------------------------
# Tar archives, read as a stream.


def tar_members(fs: pafs.FileSystem, path: str, wanted: re.Pattern[str]) -> Iterator[tuple[str, Any]]:
    """(name, read) for each regular file of a tar archive whose name matches `wanted`; read()
    returns the file's bytes and must be called, if at all, before the next item is taken.

    The archive is read once, front to back. Plain and gzipped tars are parsed here (ustar, GNU long
    names, pax paths): ~5x faster than Python's tarfile on 100k small files, whose per-member objects
    cost more than decompressing. Other compressions (bzip2, xz) go through tarfile.
    """
    with fs.open_input_stream(path, compression=None) as f:
        head = f.read(512)
    if head[:2] == b"\x1f\x8b":
        codec = "gzip"
    elif len(head) == 512 and head[257:262] == b"ustar" and _checksum_ok(head):
        codec = None
    else:
        yield from _tarfile_members(fs, path, wanted)
        return
    with fs.open_input_stream(path, compression=codec, buffer_size=1 << 20) as f:
        yield from _stream_members(f, uri(fs, path), wanted)


def _checksum_ok(header: bytes) -> bool:
    field = header[148:156].split(b"\0", 1)[0].strip()
    try:
        return int(field or b"0", 8) == sum(header[:148]) + 256 + sum(header[156:])
    except ValueError:
        return False


def _stream_members(f: Any, path: str, wanted: re.Pattern[str]) -> Iterator[tuple[str, Any]]:
    long_name: str | None = None
    while True:
        header = f.read(512)
        if len(header) < 512 or header == bytes(512):
            return  # end of archive (two zero blocks, or a truncated last one)
        if not _checksum_ok(header):
            raise InputError(f"input {path}: not a tar archive, or a corrupt one (bad header checksum)")
        size_field = header[124:136]
        if size_field[0] & 0x80:  # base-256, for members over 8 GiB
            size = int.from_bytes(size_field[1:], "big")
        else:
            size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
        padded = (size + 511) & ~511
        kind = header[156:157]
        if kind in (b"L", b"x"):  # GNU long name, or pax records that may carry one
            data = f.read(padded)[:size]
            long_name = (
                _pax_path(data) if kind == b"x" else data.split(b"\0", 1)[0].decode("utf-8", "replace")
            )
            continue
        name = long_name or _ustar_name(header)
        long_name = None
        if kind in (b"0", b"\0", b"7") and wanted.search(name):
            taken: list[bytes] = []
            yield name, lambda t=taken, n=padded, k=size: t.append(f.read(n)[:k]) or t[0]
            if taken:
                continue
        _skip(f, padded)


def _skip(f: Any, n: int) -> None:
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            return
        n -= len(chunk)


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _pax_path(data: bytes) -> str | None:
    """The `path` record of pax extended headers ("<length> path=<value>\\n" records)."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        record = data[space + 1 : pos + length - 1]
        if record.startswith(b"path="):
            return record[5:].decode("utf-8", "replace")
        pos += length
    return None


def _tarfile_members(fs: pafs.FileSystem, path: str, wanted: re.Pattern[str]) -> Iterator[tuple[str, Any]]:
    with fs.open_input_stream(path, compression=None) as f:
        try:
            tf = tarfile.open(fileobj=f, mode="r|*")
        except tarfile.TarError as err:
            raise InputError(f"input {uri(fs, path)}: not a readable tar archive ({err})") from err
        with tf:
            for member in tf:
                if member.isfile() and wanted.search(member.name):
                    yield member.name, lambda m=member: tf.extractfile(m).read()  # type: ignore[union-attr]


def _open_imdb_tar(fs: pafs.FileSystem, path: str, size: int, opts: dict[str, str]) -> Corpus:
    # A gzipped tar cannot be read from the middle, so each read task scans the archive and keeps
    # one of N interleaved slices. N is small (gunzip is ~1 s per scan, tokenizing ~30 s) and fixed,
    # so that (unit, row) positions stay the same across runs and machines (infer resumes by them).
    slices = TAR_SLICES
    for _ in tar_members(fs, path, IMDB_FILE):
        break
    else:
        raise InputError(
            f"input {uri(fs, path)}: an archive without the IMDb layout (train/pos/<id>_<rating>.txt ...)"
        )
    units = [(i, slices) for i in range(slices)]
    return Corpus("imdb-tar", path, units, fs, size_bytes=size * 3, labelled=True, **opts)


def _open_prepared(fs: pafs.FileSystem, where: str, split: str) -> Corpus | None:
    """A directory written by `bertjob prepare`: already tokenized rows, one split or all. None for a
    directory of files with another tool's manifest.json among them, which is read as files: it was
    refused as 'manifest.json is not a bertjob prepared manifest', as was another stage's output."""
    with fs.open_input_stream(where + "/manifest.json") as f:
        manifest = json.loads(f.read())
    if manifest.get("format") != PREPARED_FORMAT:
        if (stage := stage_of(uri(fs, where))) == "unknown":
            return None
        raise InputError(f"input {uri(fs, where)} is {a_or_an(stage)} output of bertjob, not a corpus; give the "
                         f"corpus it came from, or a `bertjob prepare` output")  # fmt: skip
    splits = [split] if split else sorted(manifest["splits"])
    missing = [s for s in splits if s not in manifest["splits"]]
    if missing:  # as the pipeline's "no test split to evaluate on", in this command's flags
        name = missing[0]
        hold = (
            f"hold out part of train as the {name} split (prepare again with --{name}-fraction 0.2), or "
            if name in ("validation", "test")
            else ""
        )
        raise InputError(
            f"input {uri(fs, where)}: no split {name!r}; the splits are {sorted(manifest['splits'])}: "
            f"{hold}score one of these with --split NAME"
        )
    units = [path for s in splits for path in prepared_files(fs, where, s, manifest)]
    labelled = any(manifest["splits"][s].get("label_counts") for s in splits)
    corpus = Corpus("prepared", where, units, fs, split=split, labelled=labelled)
    corpus.manifest = manifest  # type: ignore[attr-defined]
    return corpus


def prepared_files(fs: pafs.FileSystem, where: str, split: str, manifest: dict[str, Any]) -> list[str]:
    """The shards of a prepared split, in the corpus' order, checked against its manifest: a shard
    deleted, renamed, cut short or replaced by another, or a .parquet file added beside them (a
    `part-00001 (copy).parquet`), is an error. Each was read as it was, and the rows came out
    fewer, or twice, than the manifest counts, without a word."""
    entry = manifest["splits"][split]
    found = {
        os.path.basename(f.path): f
        for f in fs.get_file_info(pafs.FileSelector(f"{where}/{split}", allow_not_found=True))
        if f.path.endswith(".parquet")
    }
    recorded = entry.get("files")
    problems = []
    if recorded is None:  # a manifest older than its list of shards: their rows must add up to its count
        rows = 0
        for name in sorted(found):
            try:
                rows += pq.ParquetFile(found[name].path, filesystem=fs).metadata.num_rows
            except (OSError, pa.ArrowInvalid) as err:
                problems.append(f"{split}/{name} cannot be read ({err})")
        if not problems and rows != entry.get("rows_written", 0):
            problems.append(f"{split}/ holds {rows} rows, not the {entry.get('rows_written', 0)} it records")
        recorded = [{"name": name} for name in sorted(found)]
    elif sum(shard["rows"] for shard in recorded) != entry.get("rows_written"):  # an edited manifest
        problems.append(f"its {split} shards hold {sum(shard['rows'] for shard in recorded)} rows, "
                        f"not the {entry.get('rows_written')} it counts")  # fmt: skip
    for shard in recorded:
        info = found.pop(shard["name"], None)
        if info is None:
            problems.append(f"{split}/{shard['name']} is missing")
        elif "bytes" in shard and info.size != shard["bytes"]:
            problems.append(
                f"{split}/{shard['name']} has changed ({info.size} bytes; prepare wrote {shard['bytes']})"
            )
    problems += [f"{split}/{name} was not written by prepare" for name in sorted(found)]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(
            f"prepared data {uri(fs, where)}: {problems[0]}{more}, so it no longer holds what its manifest.json "
            f"describes; put the files back as prepare wrote them, or prepare it again"
        )
    return [f"{where}/{split}/{shard['name']}" for shard in recorded]


def _open_hf(name: str, **opts: str) -> Corpus:
    """A Hugging Face dataset: downloaded (or found in the cache), then read from its Arrow files."""
    import datasets

    from bertjob.models import hub_unreachable

    if offline := hub_unreachable():
        # Its cached copy or an error at once: datasets' own retries took ~30 s of warnings to fail.
        datasets.config.HF_HUB_OFFLINE = True
    try:
        dd = datasets.load_dataset(name)
    except Exception as err:  # noqa: BLE001 - datasets raises many types for "unreachable"
        why = f"; the hub cannot be reached ({offline})" if offline else ""
        raise InputError(
            f"input hf://{name}: could not load the dataset ({type(err).__name__}: {err}){why}. Without network "
            f"access, export it to Parquet and pass that path."
        ) from err
    units, split_of = [], {}
    for split, ds in dd.items():
        for cache in ds.cache_files:
            units.append(cache["filename"])
            split_of[cache["filename"]] = _split_name(split)
    if not units:
        raise InputError(f"input hf://{name}: the dataset has no cached Arrow files to read")
    labelled = any(opts["label_column"] in ds.column_names for ds in dd.values())
    return Corpus("arrow", f"hf://{name}", units, pafs.LocalFileSystem(), split_of_unit=split_of, labelled=labelled,
                  **opts)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Readers: one per format, each yielding ROW_SCHEMA tables.


def _imdb_split(m: re.Match[str]) -> str:
    """The split of an IMDb file: its directory's, but train/unsup/ is the unlabelled split."""
    return "unsup" if m.group(2) == "unsup" else m.group(1)


def _imdb_row(rows: dict[str, list[Any]], name: str, raw: bytes | None) -> None:
    m = IMDB_FILE.search(name)
    assert m is not None
    split, polarity, rid, _rating = m.groups()
    text, replaced = decode_text(raw) if raw is not None else (None, False)
    rows["id"].append(f"{split}/{polarity}/{rid}")
    rows["text"].append(text)
    rows["label"].append(None if polarity == "unsup" else polarity)
    rows["split"].append(_imdb_split(m))
    rows["utf8_replaced"].append(replaced)


def _read_imdb_tar(corpus: Corpus, unit: tuple[int, int], keys_only: bool) -> Iterator[pa.Table]:
    index, slices = unit
    rows, seen = _empty_rows(), 0
    for name, read in tar_members(corpus.fs, corpus.root, IMDB_REVIEW_TXT):
        if not IMDB_FILE.search(name):  # a directory's listing finds these at open; an archive's readers
            raise InputError(
                f"input {corpus.root}: {name} is not named <id>_<rating>.txt and would not be read; "
                f"rename or remove it"
            )
        seen += 1
        if seen % slices != index:
            continue
        _imdb_row(rows, name, None if keys_only else read())
        if len(rows["id"]) >= ROWS_PER_TABLE:
            yield _table(rows)
            rows = _empty_rows()
    if rows["id"]:
        yield _table(rows)


def _read_imdb_files(corpus: Corpus, unit: list[str], keys_only: bool) -> Iterator[pa.Table]:
    rows = _empty_rows()
    for path in unit:
        raw = None
        if not keys_only:
            with corpus.fs.open_input_stream(path) as f:
                raw = f.read()
        _imdb_row(rows, path, raw)
    yield _table(rows)


def _as_text(value: Any) -> str | None:
    """An id or label as text. Bytes are decoded: a Parquet string column written without its UTF-8
    annotation (older Spark, Hive) is read as binary, and str() made b'pos' of its 'pos'. A float NaN
    (a float label column's missing value, as pandas and Polars keep it) is a missing one: it was the
    label "nan", quarantined as unrecognised_label, not as missing_label."""
    if isinstance(value, bytes):
        return decode_text(value)[0]
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _label_text(value: Any) -> str | None:
    """A label as text; one of MISSING_LABEL_TEXTS ("NA", "null", "None", ...) is no label, as a
    float NaN is."""
    text = _as_text(value)
    return None if text is not None and text.strip().lower() in MISSING_LABEL_TEXTS else text


def _id_text(value: Any) -> str | None:
    """An id as text; bytes that are not UTF-8 (a digest, a UUID's 16 bytes) as hex: decoded with
    replacement, every byte outside ASCII became U+FFFD, so that distinct ids came out as one string
    of U+FFFD, no prediction could be joined back to its row, and a validation split by id hash
    took them all together."""
    if isinstance(value, bytes):
        text, replaced = decode_text(value)
        return value.hex() if replaced else text
    if isinstance(value, bool):  # JSON's own text: it was Python's "True"
        return "true" if value else "false"
    if isinstance(value, float):
        # pandas keeps an integer id column with a missing value as floats: NaN is that missing id (it
        # was the id "nan" of every such row), and 7.0 the id 7 (it was "7.0", joined to no row's 7).
        return None if math.isnan(value) else str(int(value)) if value.is_integer() else str(value)
    return _as_text(value)


def _not_scalar_ids(where: str, column: str, holds: str) -> str:
    return (f"input {where}: id column {column!r} holds {holds}; give --id-column a column of "
            f"strings or numbers, or leave it out (ids are then <file>:<row>)")  # fmt: skip


STRING_BYTES = {
    pa.string(): pa.binary(),
    pa.large_string(): pa.large_binary(),
    pa.string_view(): pa.binary_view(),
}


def _values(column: pa.ChunkedArray) -> list[Any]:
    """A column's values, its strings as bytes for the caller to decode with replacement: pyarrow
    does not check that a Parquet file's strings are UTF-8 (nor do Arrow's or Impala's writers), and
    to_pylist() of one that was not ended the job with a traceback. A dictionary column is decoded
    first: of one of bytes, str() made the text "b'Great film'"."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    return column.cast(STRING_BYTES.get(column.type, column.type)).to_pylist()


def _generic_table(corpus: Corpus, path: str, table: pa.Table, first_row: int, split: str) -> pa.Table:
    """Map a file's own columns onto ROW_SCHEMA."""
    n = table.num_rows
    names = table.column_names
    rel = corpus.relpath(path)
    ids = [f"{rel}:{first_row + i}" for i in range(n)]
    if corpus.id_column:  # a missing id falls back to file:row, which is unique too
        for i, v in enumerate(_values(table.column(corpus.id_column))):
            if v is not None:
                ids[i] = _id_text(v)
    texts: list[str | None] = [None] * n
    replaced = [False] * n
    if corpus.text_column in names:
        for i, v in enumerate(_values(table.column(corpus.text_column))):
            texts[i], replaced[i] = decode_text(v if v is None or isinstance(v, bytes) else str(v))
    labels: list[str | None] = [None] * n
    if corpus.label_column and corpus.label_column in names:
        labels = [_label_text(v) for v in _values(table.column(corpus.label_column))]
    elif corpus.label_column:
        labels = [_label_text(_partition_keys(corpus, path).get(corpus.label_column))] * n
    return pa.Table.from_pydict(
        {"id": ids, "text": texts, "label": labels, "split": [split] * n, "utf8_replaced": replaced},
        schema=ROW_SCHEMA,
    )


def _partition_keys(corpus: Corpus, path: str) -> dict[str, str | None]:
    """The `key=value` directories between the corpus root and a file: a dataset partitioned by a
    column (Hive's layout, which Spark, pyarrow and Ray Data write: reviews/label=pos/part-0.parquet)
    keeps that column's value in the path, not in the file."""
    keys: dict[str, str | None] = {}
    for segment in corpus.relpath(path).split("/")[:-1]:
        key, eq, value = segment.partition("=")
        if eq and key:
            value = unquote(value)
            keys[unquote(key)] = None if value == "__HIVE_DEFAULT_PARTITION__" else value
    return keys


def _wanted(corpus: Corpus, keys_only: bool) -> list[str]:
    cols = (
        [corpus.id_column, corpus.label_column]
        if keys_only
        else [corpus.id_column, corpus.text_column, corpus.label_column]
    )
    return [c for c in cols if c]


def _read_parquet(corpus: Corpus, path: str, keys_only: bool) -> Iterator[pa.Table]:
    with _file_errors(corpus, path), corpus.fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in _wanted(corpus, keys_only) if c in pf.schema_arrow.names]
        row = 0
        for batch in pf.iter_batches(batch_size=ROWS_PER_TABLE * 4, columns=cols or None):
            table = pa.Table.from_batches([batch])
            yield _generic_table(corpus, path, table, row, corpus.split_of(path))
            row += table.num_rows


PREPARED_ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("utf8_replaced", pa.bool_()),
        ("input_ids", pa.list_(pa.int32())),
        ("length", pa.int32()),
    ]
)


def _read_prepared(corpus: Corpus, path: str, keys_only: bool) -> Iterator[pa.Table]:
    split = os.path.basename(os.path.dirname(path))
    with corpus.fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_TABLE * 4):
            t = pa.Table.from_batches([batch])
            labels = t.column("label").cast(pa.string())
            yield pa.table(
                {
                    "id": t.column("id"),
                    "label": labels,
                    "split": pa.array([split] * t.num_rows, pa.string()),
                    "utf8_replaced": pa.array([False] * t.num_rows, pa.bool_()),
                    "input_ids": t.column("input_ids"),
                    "length": t.column("length"),
                },
                schema=PREPARED_ROW_SCHEMA,
            )


@contextmanager
def _open_arrow(corpus: Corpus, path: str) -> Iterator[Any]:
    """An Arrow IPC file's reader: the stream format, as `datasets` writes, or the file format."""
    local = isinstance(corpus.fs, pafs.LocalFileSystem)
    with pa.memory_map(path) if local else corpus.fs.open_input_file(path) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
        yield reader


def _read_arrow(corpus: Corpus, path: str, keys_only: bool) -> Iterator[pa.Table]:
    with _open_arrow(corpus, path) as reader:
        row = 0
        batches = (
            reader
            if hasattr(reader, "__iter__")
            else (reader.get_batch(i) for i in range(reader.num_record_batches))
        )
        for batch in batches:
            table = pa.Table.from_batches([batch])
            yield _generic_table(corpus, path, table, row, corpus.split_of(path))
            row += table.num_rows


# pyarrow's CSV reader needs each row within one of its blocks ("straddling object straddles two
# block boundaries"): a read that meets a longer row (a multi-megabyte review) starts again with
# the next size. The header is read from a small first block; rows from 8 MiB ones.
CSV_BLOCKS = (1 << 20, 8 << 20, 64 << 20, 512 << 20)


def _separator(path: str) -> str:
    """A CSV file's field separator: a tab in a .tsv file (compressed or not), else a comma."""
    return "\t" if _uncompressed(path).lower().endswith(".tsv") else ","


def _csv_parse(path: str) -> pacsv.ParseOptions:
    # Quoted as Python's csv module and pandas write both (a quoted field may hold the separator, a
    # newline, and a quote doubled).
    return pacsv.ParseOptions(delimiter=_separator(path), newlines_in_values=True)


def _straddles(err: pa.ArrowInvalid, block: int) -> bool:
    return "straddl" in str(err) and block < CSV_BLOCKS[-1]


def _csv_names(fs: pafs.FileSystem, path: str) -> list[str]:
    for block in CSV_BLOCKS:
        with _open_text_stream(fs, path) as f:
            try:
                read = pacsv.ReadOptions(block_size=block)
                return pacsv.open_csv(f, read_options=read, parse_options=_csv_parse(path)).schema.names
            except pa.ArrowInvalid as err:
                if str(err).startswith("Empty CSV file"):  # 0 bytes: no columns, no rows (as empty JSONL)
                    return []
                if not _straddles(err, block):
                    raise
    raise AssertionError("unreachable: the last block size re-raises")


def _csv_batches(fs: pafs.FileSystem, path: str, convert: pacsv.ConvertOptions) -> Iterator[pa.RecordBatch]:
    """A CSV file's record batches; a read started again skips the rows it already gave."""
    given = 0
    for block in CSV_BLOCKS[1:]:
        seen = 0
        with _open_text_stream(fs, path) as f:
            try:
                read = pacsv.ReadOptions(block_size=block)
                for batch in pacsv.open_csv(
                    f, read_options=read, parse_options=_csv_parse(path), convert_options=convert
                ):
                    if seen + batch.num_rows > given:
                        part = batch.slice(max(0, given - seen))
                        given = seen + batch.num_rows
                        yield part
                    seen += batch.num_rows
                return
            except pa.ArrowInvalid as err:
                if not _straddles(err, block):
                    raise


def _read_csv(corpus: Corpus, path: str, keys_only: bool) -> Iterator[pa.Table]:
    # Text columns are read as binary so that invalid UTF-8 (Latin-1 files) is decoded with
    # replacement and counted, rather than failing the whole file.
    wanted = _wanted(corpus, keys_only)
    names = columns_of(corpus, path)
    if not names:  # an empty file
        return
    present = [c for c in wanted if c in names]
    convert = pacsv.ConvertOptions(
        include_columns=present,
        column_types={c: pa.binary() for c in present},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    with _file_errors(corpus, path):
        row = 0
        for batch in _csv_batches(corpus.fs, path, convert):
            table = pa.Table.from_batches([batch])
            decoded = {}
            for c in table.column_names:
                if c == corpus.text_column:
                    decoded[c] = table.column(c)
                else:  # ids and labels: plain text; a blank cell is how CSV writes a missing one
                    decoded[c] = pa.array(
                        [decode_text(v)[0] or None for v in table.column(c).to_pylist()], pa.string()
                    )
            yield _generic_table(corpus, path, pa.table(decoded), row, corpus.split_of(path))
            row += table.num_rows


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace_lone_surrogates(obj: dict[str, Any], keys: list[str]) -> bool:
    """Replace a lone surrogate in a JSON string with U+FFFD, as invalid UTF-8 is: an escape such as
    "\\ud83d" without its pair, half an emoji cut off by a writer that truncates (tweets at 140
    characters). Arrow cannot hold one: the read task ended the job with a traceback. True when
    one was replaced."""
    found = False
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str) and LONE_SURROGATE.search(value):
            obj[key] = LONE_SURROGATE.sub("\ufffd", value)
            found = True
    return found


def _read_jsonl(corpus: Corpus, path: str, keys_only: bool) -> Iterator[pa.Table]:
    """A JSONL file's columns are its first record's keys, as a CSV file's are its header: they
    decide before any work whether the corpus is labelled and has its text and id columns. A later
    record may lack one (a missing value); one with a value for a column the first record lacks
    would be read under rules decided without it, so it is an error naming its line."""
    cols = _wanted(corpus, keys_only)
    buf: dict[str, list[Any]] = {c: [] for c in cols}
    row = 0
    bad_utf8: list[bool] = []
    first: set[str] | None = None  # the columns read that the first record has

    def flush() -> pa.Table:
        table = pa.Table.from_pydict({c: pa.array(buf[c], pa.string()) for c in cols})
        out = _generic_table(corpus, path, table, row, corpus.split_of(path))
        return out.set_column(4, "utf8_replaced", pa.array(bad_utf8, pa.bool_()))

    with _file_errors(corpus, path), _open_text_stream(corpus.fs, path) as f:
        for lineno, raw_line in enumerate(_jsonl_lines(f), start=1):
            if not raw_line.strip():
                continue
            line, replaced = decode_text(raw_line)
            try:
                obj = json.loads(line)  # type: ignore[arg-type]
            except json.JSONDecodeError as err:
                raise InputError(
                    f"input {uri(corpus.fs, path)}, line {lineno}: not valid JSON ({err.msg})"
                ) from err
            if not isinstance(obj, dict):
                raise InputError(f"input {uri(corpus.fs, path)}, line {lineno}: not a JSON object")
            replaced |= b"\\u" in raw_line and _replace_lone_surrogates(obj, cols)
            if first is None:
                first = {c for c in cols if c in obj}
            late = [c for c in cols if c not in first and obj.get(c) is not None]
            if late:
                raise InputError(
                    f"input {uri(corpus.fs, path)}, line {lineno}: has {' and '.join(map(repr, late))}, "
                    f"which the file's first record lacks; a JSONL file's columns are its first record's "
                    f"keys: give that record the key too (null where it has no value)"
                )
            text = obj.get(corpus.text_column)
            if isinstance(text, dict) and text and all(key.isdigit() for key in text):
                raise InputError(  # pandas' df.to_json() by default: told to join a review's parts
                    f"input {uri(corpus.fs, path)}, line {lineno}: a table of columns ({{column: {{row: value}}}}, "
                    f"as pandas' to_json() writes by default), not JSON Lines; write it with "
                    f"df.to_json(PATH, orient='records', lines=True)"
                )
            # An array or object was scored as its JSON, '["Great film", "loved it"]'; a number or
            # boolean (a --text-column naming the rating) as "4" or "True"
            if text is not None and not isinstance(text, str):
                kind = {dict: "object", list: "array", bool: "boolean"}.get(type(text), "number")
                join_parts = (
                    ", or join its parts into one string first" if isinstance(text, (dict, list)) else ""
                )
                raise InputError(
                    f"input {uri(corpus.fs, path)}, line {lineno}: {corpus.text_column!r} holds a JSON "
                    f"{kind}, not text; set --text-column to the review's text{join_parts}"
                )
            ident = obj.get(corpus.id_column) if corpus.id_column else None
            if isinstance(ident, (dict, list)):
                kind = "a JSON object" if isinstance(ident, dict) else "a JSON array"
                where = f"{uri(corpus.fs, path)}, line {lineno}"
                raise InputError(_not_scalar_ids(where, corpus.id_column, f"{kind}, not an id"))
            for c in cols:
                v = obj.get(c)
                if c == corpus.id_column:  # 7.0 and true as Parquet's: "7", "true" (not "7.0", "True")
                    buf[c].append(_id_text(v))
                    continue
                buf[c].append(json.dumps(v) if isinstance(v, (dict, list)) else _as_text(v))
            bad_utf8.append(replaced)
            if len(bad_utf8) >= ROWS_PER_TABLE:
                yield flush()
                row += len(bad_utf8)
                buf = {c: [] for c in cols}
                bad_utf8 = []
    if bad_utf8:
        yield flush()
