"""Output directories on any filesystem: claim (never wiping a directory bertjob did not write), versions."""

from __future__ import annotations

import functools
import json
import os
import platform
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow.fs as pafs

from bertjob.config import SetupError
from bertjob.storage import filesystem, job_copy_holding, join, read_json, uri, write_json

MARKER = "_bertjob_output"  # written first, naming the stage: only that stage may replace the directory
MANIFEST = "manifest.json"  # written last: its presence means the output is complete
LEASE = "_bertjob_running"  # while a run writes the directory: which process, and when it was last alive
LEASE_RENEW_S = 30
LEASE_STALE_S = 3 * LEASE_RENEW_S  # a lease not renewed for this long is a gone run's


class OutputError(SetupError):
    """The output location cannot be used."""


def _existing(path: str, stage: str, own: tuple[str, ...] = ()) -> tuple[pafs.FileSystem, str, set[str]]:
    """The entries of an existing output directory that `stage` may use (none for a new one).

    A non-empty directory must carry bertjob's marker, naming this same stage: a typo can never wipe
    an unrelated directory, nor one stage another's output (a train run with its checkpoints).
    `own`: the names this stage writes; an unmarked directory holding only those is adopted (outputs
    written before markers named their stage).
    """
    if copy := job_copy_holding(path):
        raise OutputError(
            f"output {path} is in the job's working directory ({copy}), a temporary copy that `ray job submit "
            f"--working-dir` unpacks on each node: what the job wrote there would be split between nodes and "
            f"deleted with it; give a path every node shares (--output / --output-dir: absolute on NFS, or s3://, gs://)"
        )
    fs, where = filesystem(path)
    info = fs.get_file_info(where)
    if info.type in (pafs.FileType.File, pafs.FileType.Unknown):  # Unknown: /dev/null, a FIFO, a socket
        what = "a file" if info.type == pafs.FileType.File else "neither a directory nor a regular file"
        raise OutputError(f"output {path} is {what}; give a directory")
    if info.type == pafs.FileType.NotFound:
        return fs, where, set()
    names = {os.path.basename(c.path) for c in fs.get_file_info(pafs.FileSelector(where))}
    if own and names and MARKER not in names and names <= set(own):
        _mark(fs, where, stage)
        names.add(MARKER)
    if names and MARKER not in names:
        raise OutputError(
            f"output {path} exists and was not written by bertjob ({len(names)} entries); "
            f"choose another directory or empty it"
        )
    owner = stage_of(path) if names else stage
    if owner != stage:
        raise OutputError(
            f"output {path} holds {a_or_an(owner)} output, which `bertjob {stage}` never replaces; "
            f"choose another directory"
        )
    if LEASE in names:
        refuse_if_held(path)
    return fs, where, names


def a_or_an(word: str) -> str:
    """The word after its indefinite article: "a train", "an infer", "an evaluate"."""
    return ("an " if word[:1].lower() in ("a", "e", "i", "o", "u") else "a ") + word


def stage_of(path: str) -> str:
    """The stage named by a directory's marker ("unknown" when it cannot be read)."""
    try:
        return str(read_json(join(path, MARKER)).get("stage", "unknown"))
    except (OSError, ValueError, AttributeError):
        return "unknown"


def _mark(fs: pafs.FileSystem, where: str, stage: str) -> None:
    try:
        fs.create_dir(where, recursive=True)
        with fs.open_output_stream(join(where, MARKER)) as f:
            f.write(json.dumps({"stage": stage, "started": time.time()}).encode())
    except OSError as err:  # read-only, no permission, no space: before any work
        raise OutputError(f"output {uri(fs, where)}: cannot write there ({err})") from err


def check_replaceable(path: str, stage: str, own: tuple[str, ...]) -> tuple[pafs.FileSystem, str, set[str]]:
    """What `claim_output` checks, changing nothing: a stage that replaces its output calls it before
    any work, so that a wrong `--output` fails at once, not after Ray has started. `own`: the names
    the stage writes in its directory; anything else there is the user's (notes, an analysis beside
    the predictions), which replacing the output deleted without a word. Hidden entries (Finder's
    .DS_Store, an editor's swap file) are not counted as the user's."""
    fs, where, names = _existing(path, stage)
    check_writable(path)
    if names:
        listing = fs.get_file_info(pafs.FileSelector(where, recursive=True))
        top = join(where, MARKER)
        nested = [i.path for i in listing if os.path.basename(i.path) == MARKER and i.path != top]
        if nested:  # the output of another job inside this one (a pipeline's, a train run's)
            raise OutputError(
                f"output {path} holds another bertjob output ({os.path.dirname(nested[0])}), which `bertjob {stage}` "
                f"never replaces; choose another directory"
            )
    foreign = sorted(n for n in names - {MARKER, LEASE, MANIFEST, *own} if not n.startswith("."))
    if foreign:
        raise OutputError(
            f"output {path} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} that `bertjob {stage}` "
            f"did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}), which replacing the "
            f"output would delete; move them elsewhere, or choose another directory"
        )
    return fs, where, names


def check_writable(path: str, role: str = "output") -> None:
    """A directory that cannot be created or written (no permission, read-only, under a file; in an
    object store, credentials that may only read) is refused here: `_mark` found an output only once
    Ray had started, seconds later, and a train run's checkpoints (`role` storage_path) failed as an
    OSError that said the same command resumes. In an object store a probe object is written and
    deleted (pyarrow then leaves an empty directory object at a new path, as claiming it makes)."""
    fs, where = filesystem(path)
    if not isinstance(fs, pafs.LocalFileSystem):
        probe = join(where, f"_bertjob_write_probe_{uuid.uuid4().hex[:8]}")
        try:
            fs.open_output_stream(probe).close()
            fs.delete_file(probe)
        except OSError as err:
            raise OutputError(f"{role} {path}: cannot write there ({err})") from err
        return
    probe = where
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise OutputError(f"{role} {path}: cannot write there ({probe} is a file, not a directory)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{role} {path}: cannot write there (no permission to write in {probe})")


def claim_output(path: str, stage: str, own: tuple[str, ...]) -> None:
    """Make `path` an empty output directory of `stage`, replacing an earlier output of the same
    stage (see `_existing`, `check_replaceable`). The manifest goes first, so a crash part-way leaves
    a directory that does not look complete."""
    fs, where, names = check_replaceable(path, stage, own)
    if MANIFEST in names:
        fs.delete_file(join(where, MANIFEST))
    if names:
        # pyarrow empties no local directory named through a symlink, without a word: infer
        # --overwrite on one found the old predictions beside its own.
        local = isinstance(fs, pafs.LocalFileSystem)
        fs.delete_dir_contents(os.path.realpath(where) if local else where, missing_dir_ok=True)
    _mark(fs, where, stage)
    hold(path)


def ensure_output(path: str, stage: str, own: tuple[str, ...] = ()) -> None:
    """Create `path`, or keep an earlier output of `stage` as it is (`own`: see `_existing`)."""
    fs, where, names = _existing(path, stage, own)
    if MARKER not in names:
        _mark(fs, where, stage)
    hold(path)


# Leases: a directory a run writes carries LEASE, renewed every LEASE_RENEW_S by the run's process and
# removed when its run ends, so that a second run started on it meanwhile (the same job submitted
# twice, a retried submitter) is refused instead of replacing or mixing into what the first writes.
# A killed run's lease is taken over at once on the same host (its process is gone), from another
# host once it is stale. Two runs started within the same instant may both take it.
_held: dict[str, dict[str, Any]] = {}  # path -> its lease, for this process's runs
_held_lock = threading.Lock()  # also held while a lease is renewed: none is written once released
_renewer: threading.Thread | None = None
F = TypeVar("F", bound=Callable[..., Any])


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid())}


def _process_start(pid: int) -> str | None:
    """When process `pid` started (Linux: clock ticks since boot), to tell it from a later process
    given the same pid; "zombie" for one that has exited; None where unknown (no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return "zombie" if fields[0] == "Z" else fields[19]


def _running(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    now = _process_start(pid)
    return now != "zombie" and (now is None or start is None or now == start)


def refuse_if_held(path: str) -> None:
    """An error if another run, alive, holds `path`'s lease."""
    try:
        lease = read_json(join(path, LEASE))
        host, pid, seen = str(lease["host"]), int(lease["pid"]), float(lease["seen"])
    except (OSError, ValueError, KeyError, TypeError):  # none, or torn: no run to protect
        return
    me = _me()
    age = time.time() - seen
    if (host, pid) == (me["host"], me["pid"]) or age > LEASE_STALE_S:
        return
    if host == me["host"] and not _running(pid, lease.get("process_start")):
        return
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("since", seen))))
    gone = (
        ""
        if host == me["host"]
        else f"; if it was killed, it is taken over {LEASE_STALE_S - age:.0f} s from now"
    )
    raise OutputError(
        f"output {path} is being written by another run now: `{lease.get('command', '?')}` (pid {pid} on "
        f"{host}, since {since}, alive {age:.0f} s ago); wait for it to end or stop it{gone}"
    )


def hold(path: str) -> None:
    """Take `path`'s lease for this process (after `refuse_if_held`) until `releasing` ends the run."""
    refuse_if_held(path)
    prog = os.path.basename(sys.argv[0]) if sys.argv else "?"
    argv = ["bertjob" if prog == "__main__.py" else prog, *sys.argv[1:]]  # `python -m bertjob`: bertjob
    now = time.time()
    lease = {**_me(), "command": " ".join(argv)[:300], "since": now, "seen": now}
    write_json(join(path, LEASE), lease)  # whole or not at all: a torn lease would protect nothing
    global _renewer
    with _held_lock:
        _held[path] = lease
        if _renewer is None:
            _renewer = threading.Thread(target=_renew, name="bertjob-lease", daemon=True)
            _renewer.start()


def _renew() -> None:
    while True:
        time.sleep(LEASE_RENEW_S)
        with _held_lock:
            paths = list(_held)
        for path in paths:
            with _held_lock:
                if path not in _held:  # released meanwhile
                    continue
                try:
                    write_json(join(path, LEASE), {**_held[path], "seen": time.time()})
                except OSError:  # the store is away for now: the run itself says so if it stays away
                    pass


def releasing(run: F) -> F:
    """Decorate a stage's run: the leases it took are removed when it ends, however it ends."""

    @functools.wraps(run)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _held_lock:
            before = set(_held)
        try:
            return run(*args, **kwargs)
        finally:
            with _held_lock:
                mine = [p for p in _held if p not in before]
                for p in mine:
                    del _held[p]
            for p in mine:
                try:
                    fs, where = filesystem(join(p, LEASE))
                    fs.delete_file(where)
                except OSError:  # gone already (a replaced directory), or the store is away: it goes stale
                    pass

    return wrapper  # type: ignore[return-value]


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("bertjob", "ray", "torch", "transformers", "tokenizers", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
