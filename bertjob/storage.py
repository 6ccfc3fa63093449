"""The one home for paths and filesystems: local paths and s3:// / gs:// URIs, through pyarrow.

Every stage reads and writes through `filesystem()`, so a local directory, S3 (or an
S3-compatible store such as MinIO or Ceph) and GCS behave alike. S3 is configured only by the
standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) or
the SDK's other sources (~/.aws, an instance role); GCS by Google's application default
credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import uuid
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from bertjob.config import SetupError

NOT_FOUND = pafs.FileType.NotFound
URI_OPTIONS = re.compile(r"\?\w+=[^&/?]*(?:&\w+=[^&/?]*)*$")  # ?region=eu-west-1&scheme=http


class StorageError(SetupError):
    """A storage location cannot be reached or used."""


def is_remote(path: str) -> bool:
    return "://" in path


def for_workers(path: str, output: bool = False) -> str:
    """A local path as every Ray worker can open it: absolute (Ray Train runs its workers in a
    directory of its own, and on a running cluster every worker starts where its node was started:
    a relative path means nothing there). URIs pass unchanged, and so do names of no local file,
    such as hub ids, unless `output` says that it is a path (one that need not exist yet). `~` is
    the driver's home (a worker's may be another, and `~` in a path it opens is a directory `~`)."""
    if not path or is_remote(path) or not (output or os.path.exists(os.path.expanduser(path))):
        return path
    return os.path.abspath(os.path.expanduser(path))


def job_copy_holding(path: str) -> str | None:
    """The job's working directory when `path` lies in it and this driver runs under `ray job submit
    --working-dir` (None otherwise). Ray unpacks a temporary copy of that directory on each node and
    starts the job in it: what workers write to a path in it lands in their own node's copy."""
    if is_remote(path):
        return None
    try:  # the job supervisor hands every job its config in this variable
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return None
    if not isinstance(job, dict) or not (job.get("runtime_env") or {}).get("working_dir"):
        return None
    here = os.getcwd()
    full = os.path.abspath(os.path.expanduser(path))
    return here if full == here or full.startswith(here + os.sep) else None


def join(root: str, *parts: str) -> str:
    """Join paths that may be URIs (s3://bucket/x) as well as local paths."""
    if is_remote(root):
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(root, *parts)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or an s3:// / gs:// / hdfs:// URI."""
    if not is_remote(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    scheme, rest = path.split("://", 1)
    # `?k=v&...` at the end is pyarrow's URI options (s3://bucket/key?region=eu-west-1); any other
    # `?` is the key's own, a glob's (s3://bucket/202?/*.csv was "Unexpected query parameter").
    options = URI_OPTIONS.search(rest)
    rest = rest[: options.start()] if options else rest
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if scheme == "s3" and endpoint and not options:
        # pyarrow's S3FileSystem() ignores AWS_ENDPOINT_URL (pyarrow 26: only FileSystem.from_uri
        # reads it), and Ray is handed this filesystem: pass what the standard variable says.
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        fs = pafs.S3FileSystem(
            endpoint_override=url.netloc + url.path.rstrip("/"), scheme=url.scheme, region=region
        )
        return fs, rest.rstrip("/")
    bucket, _, key = rest.partition("/")
    # Only the bucket goes through pyarrow's URI parser; the key is taken as named, as the AWS CLI
    # and boto3 take it. Parsed as a URI, a key with a space or a non-ASCII letter was "Cannot parse
    # URI", a `#` cut it short (s3://b/runs#2/x was b/runs: output written elsewhere), and %20 was a
    # space (with AWS_ENDPOINT_URL, above, the same key was %20).
    literal_key = scheme in ("s3", "gs")
    try:
        fs, where = pafs.FileSystem.from_uri(f"{scheme}://{bucket}{options.group(0) if options else ''}"
                                             if literal_key else path)  # fmt: skip
        if literal_key:
            where = f"{where}/{key}"
    except (pa.ArrowInvalid, OSError) as err:
        raise StorageError(f"{path}: {err}") from err
    return fs, where.rstrip("/")


def uri(fs: pafs.FileSystem, where: str) -> str:
    """A path inside `fs` as the user names it: s3://bucket/key, not the filesystem's bucket/key."""
    return {"local": "", "gcs": "gs://"}.get(fs.type_name, f"{fs.type_name}://") + where


def exists(path: str) -> bool:
    fs, where = filesystem(path)
    return fs.get_file_info(where).type != NOT_FOUND


def read_json(path: str) -> Any:
    fs, where = filesystem(path)
    with fs.open_input_stream(where) as f:
        return json.loads(f.read().decode())


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str, obj: Any) -> None:
    """Write JSON that readers see whole or not at all: locally a temporary file and a rename; on
    an object store one PUT, which becomes visible only once complete. NaN and infinities (an
    ROC AUC of one class) become null: JSON has no such numbers, and strict readers refuse them."""
    data = (json.dumps(_finite(obj), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n").encode()
    fs, where = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(where), exist_ok=True)
        tmp = f"{where}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, where)
        except BaseException:  # a full disk, Ctrl-C: the half-written file stayed beside `where` for ever
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        return
    with fs.open_output_stream(where) as f:
        f.write(data)


def copy(src: str, dst: str) -> None:
    """Copy a file or a directory tree between any two locations (upload, download, or both remote)."""
    src_fs, src_where = filesystem(src)
    dst_fs, dst_where = filesystem(dst)
    if isinstance(dst_fs, pafs.LocalFileSystem):  # pyarrow creates the directories below, not these
        is_dir = src_fs.get_file_info(src_where).type == pafs.FileType.Directory
        os.makedirs(dst_where if is_dir else os.path.dirname(dst_where), exist_ok=True)
    pafs.copy_files(src_where, dst_where, source_filesystem=src_fs, destination_filesystem=dst_fs)


# How a user deletes a directory at each kind of remote location (warnings that name one say how).
DELETE_TOOLS = {"s3": "aws s3 rm --recursive", "gs": "gcloud storage rm -r", "hdfs": "hdfs dfs -rm -r"}


def delete_command(paths: list[str]) -> str:
    """The shell command that deletes the directories `paths` (all local, or all at one kind of URI)."""
    tool = DELETE_TOOLS.get(paths[0].split("://", 1)[0], "rm -r") if is_remote(paths[0]) else "rm -r"
    return " && ".join(f"{tool} {shlex.quote(p)}" for p in paths)


def remove(path: str) -> None:
    """Delete a file or a directory tree; nothing there is fine."""
    fs, where = filesystem(path)
    kind = fs.get_file_info(where).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(where)
    elif kind == pafs.FileType.File:
        fs.delete_file(where)


def cache_root() -> str:
    # `~` expanded here too: a Kubernetes or Dockerfile `ENV BERTJOB_CACHE=~/cache` reaches us as is.
    return os.path.expanduser(os.environ.get("BERTJOB_CACHE") or os.path.join("~", ".cache", "bertjob"))


def local_dir(uri: str) -> str:
    """A local copy of a remote directory (a model), downloaded once per content.

    The cache key is each file's name, size and ETag (its modification time where a store gives no
    ETag), so a changed file makes a new copy and an unchanged one is never fetched again: every
    predictor actor on a node shares one download. Concurrent callers download to temporary
    directories; the first rename wins.
    """
    fs, where = filesystem(uri)
    files = sorted(
        (f for f in fs.get_file_info(pafs.FileSelector(where, recursive=True, allow_not_found=True))
         if f.type == pafs.FileType.File),
        key=lambda f: f.path,
    )  # fmt: skip
    if not files:
        raise StorageError(f"{uri}: no such directory, or it holds no files")
    h = hashlib.sha256(uri.encode())
    for f in files:
        with fs.open_input_file(f.path) as handle:  # a HEAD request: its headers carry the ETag
            tag = handle.metadata().get("ETag") or str(f.mtime_ns).encode()
        h.update(f"\0{f.path[len(where) :]}\0{f.size}\0".encode() + tag)
    dest = os.path.join(cache_root(), "remote", h.hexdigest()[:32])
    if os.path.isdir(dest):
        return dest
    tmp = f"{dest}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        os.makedirs(tmp)
    except OSError as err:  # else "[Errno 20] ...", and the advice that the same command resumes
        raise StorageError(f"model {uri}: no place for its local copy in {os.path.dirname(dest)} ({err.strerror}); "
                           f"set BERTJOB_CACHE to a writable directory") from err  # fmt: skip
    pafs.copy_files(where, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    try:
        os.rename(tmp, dest)
    except OSError:  # another process finished the same download first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def check_access(locations: dict[str, str]) -> None:
    """Reach every remote location ({role: path}) once, before any work: a wrong credential, a
    missing bucket or an unreachable endpoint is one StorageError naming the URI and what failed."""
    problems = []
    for role, path in locations.items():
        if not path or not is_remote(path) or path.startswith("hf://"):
            continue
        try:
            fs, where = filesystem(path)
            bucket = where.split("/", 1)[0]
            if fs.get_file_info(bucket).type == NOT_FOUND:
                problems.append(f"{role} {path}: bucket {bucket!r} does not exist{_endpoint_note(path)}")
                continue
            fs.get_file_info(pafs.FileSelector(where, allow_not_found=True))  # can we list it?
        except StorageError as err:
            problems.append(f"{role} {err}")
        except OSError as err:
            problems.append(f"{role} {path}: {_why(err)}{_endpoint_note(path)}: {err}")
    if problems:
        raise StorageError("storage problem:\n  - " + "\n  - ".join(problems))


def _why(err: OSError) -> str:
    # A failed connection first: its words may hold what reads as a refusal (port 50403's "403").
    text = str(err)
    if any(k in text for k in ("NETWORK_CONNECTION", "Could not connect", "resolve host", "curlCode")):
        return "the endpoint cannot be reached (check AWS_ENDPOINT_URL and the network)"
    if re.search(r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|\b403\b", text):
        return "access denied (check the credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the bucket's policy)"
    return "cannot be reached"


def _endpoint_note(path: str) -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" (endpoint {endpoint})" if path.startswith("s3://") and endpoint else ""
