"""Locations, local / NFS / s3:// alike: the only module that knows what a location looks like.

A location is a local path or a URI that pyarrow (and so Ray Train) understands: `s3://bucket/prefix`, or, for
an S3-protocol server other than AWS, `s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http`. The
?query holds client options, so a name is joined into the path before it:
`join("s3://b/runs?scheme=http", "r", "state.pt") == "s3://b/runs/r/state.pt?scheme=http"`. Without a query
an S3 server is found through AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3), which pyarrow >= 15 reads;
credentials come from the usual AWS variables and files.

A run directory and what it holds are distgan.rundir's. Writes to a local directory are atomic (a temporary
file, fsync, rename: a crash leaves the old file or none); an object store replaces an object in one PUT.
StagedDir keeps a URI run directory's files in a local staging directory and uploads the ones that changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"  # distgan.train's summary of a finished (or stopped) submission


def first_line(e: BaseException, with_type: bool = False) -> str:
    """The first line of an exception's message (its type's name when the message is empty), for one-line
    errors and warnings; with_type prefixes "TypeName: "."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return f"{type(e).__name__}: {line}" if with_type and text else line


# ------------------------------------------------------------------ names


def is_uri(location: Any) -> bool:
    """A URI is a string with a scheme (s3://bucket/key); a Path is always local."""
    return isinstance(location, str) and "://" in location


# The object-store scheme every read, write, listing and upload here is tested against (a local S3-protocol
# server). Others that pyarrow knows (gs://, hdfs://, abfs://) would reach this module untested, and gs:// without
# credentials waits minutes for a metadata server before failing.
URI_SCHEMES = ("s3",)
# Schemes that, typed with one slash or none (`s3:/bucket`), would silently become a local directory.
_LOOKS_LIKE_URI = re.compile(r"(s3[an]?|gs|gcs|hdfs|abfss?|az|file|https?|ftp|sftp|minio):(?!//)", re.IGNORECASE)


def location_problem(location: str) -> Optional[str]:
    """Why `location` cannot be a run's storage (a phrase to follow the location in an error), or None.
    Local and NFS paths and s3:// URIs are accepted; so is any S3-protocol store through s3:// (MinIO, Ceph,
    Google Cloud Storage's XML API with HMAC keys: `s3://bucket/prefix?endpoint_override=storage.googleapis.com`)."""
    text = str(location)
    if "://" not in text:
        typo = _LOOKS_LIKE_URI.match(text)
        if typo:
            return f"looks like a URI with a slash missing ({typo.group(1)}://...), not a local path"
        return None
    scheme, _, rest = text.partition("://")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme) or not rest.strip("/") or re.search(r"\s", text):
        return "is not a URI like s3://bucket/prefix"
    if scheme.lower() not in URI_SCHEMES:
        return (f"uses {scheme}://, which distgan does not read or write; use a local or NFS path, or s3:// for "
                f"AWS S3 and S3-protocol stores (MinIO, Ceph, Google Cloud Storage's XML API: "
                f"s3://bucket/prefix?endpoint_override=storage.googleapis.com with HMAC keys as AWS credentials)")
    return None


def directory_problem(directory: Path) -> Optional[str]:
    """Why files cannot be written in `directory` (made first if missing), or None. Probed by writing a file where
    the first write would go, not with os.access: root passes os.access on /proc and read-only mounts."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as e:
        if existing == directory:
            return f"{directory} is not writable ({e.strerror})"
        return f"{directory} does not exist and cannot be made in {existing} ({e.strerror})"
    return None


def _split(location: str | os.PathLike) -> tuple[str, str]:
    """(path part, "?query" or "")."""
    base, sep, query = str(location).partition("?") if is_uri(location) else (str(location), "", "")
    return base, sep + query


def join(location: str | os.PathLike, *names: str) -> str:
    """location/name/... as a string; a URI's ?query stays at the end."""
    base, query = _split(location)
    return "/".join([base.rstrip("/"), *names]) + query


def basename(location: str | os.PathLike) -> str:
    """The last name of a location's path (no query)."""
    return _split(location)[0].rstrip("/").rsplit("/", 1)[-1]


def parent(location: str | os.PathLike) -> str:
    """The directory above a location; a URI keeps its ?query."""
    base, query = _split(location)
    return base.rstrip("/").rsplit("/", 1)[0] + query


def within(location: str | os.PathLike, directory: str | os.PathLike) -> bool:
    """Whether `location` is `directory` or lies under it: local paths once resolved (links, `..`), URIs by their
    path (the ?query left out)."""
    if is_uri(location) != is_uri(directory):
        return False
    if not is_uri(location):
        inner, outer = Path(location).expanduser().resolve(), Path(directory).expanduser().resolve()
        return inner == outer or outer in inner.parents
    inner, outer = _split(location)[0].rstrip("/"), _split(directory)[0].rstrip("/")
    return inner == outer or inner.startswith(outer + "/")


def suffix(location: str | os.PathLike) -> str:
    """The file extension of a location's last name (".png"), the query left out."""
    return Path(basename(location)).suffix


def open_location(location: str | os.PathLike):
    """(pyarrow filesystem, path inside it) for a local path or a URI. A malformed or unknown URI raises
    ValueError (pyarrow's ArrowInvalid)."""
    import pyarrow.fs

    if is_uri(location):
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), str(Path(location).expanduser().resolve())


# ------------------------------------------------------------------ reading and writing


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Calls write(tmp) for a temporary file beside `path`, makes it durable (fsync) and renames it over `path`:
    a crash leaves the previous file or none, never half a file. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def exists(location: str | os.PathLike) -> bool:
    """Whether a file or directory is there. Unreachable storage raises OSError."""
    from pyarrow.fs import FileType

    fs, path = open_location(location)
    return fs.get_file_info(path).type != FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    from pyarrow.fs import FileType

    fs, path = open_location(location)
    return fs.get_file_info(path).type == FileType.File


def read_bytes(location: str | os.PathLike) -> Optional[bytes]:
    """A file's bytes; None when it does not exist. Unreachable storage raises OSError."""
    from pyarrow.fs import FileType

    fs, path = open_location(location)
    if fs.get_file_info(path).type != FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return fh.read()


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Writes a whole file, creating its directory: atomically on a local disk, in one PUT on an object store."""
    if not is_uri(location):
        atomic_write(location, lambda tmp: tmp.write_bytes(data))
        return
    fs, path = open_location(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def delete(location: str | os.PathLike) -> bool:
    """Removes a file; False when there was none."""
    from pyarrow.fs import FileType

    fs, path = open_location(location)
    if fs.get_file_info(path).type == FileType.NotFound:
        return False
    fs.delete_file(path)
    return True


def entries(location: str | os.PathLike) -> list:
    """pyarrow FileInfo of each entry of a directory (not recursive); empty when it does not exist."""
    from pyarrow.fs import FileSelector

    fs, path = open_location(location)
    return fs.get_file_info(FileSelector(path.rstrip("/") or "/", allow_not_found=True))


def list_names(location: str | os.PathLike) -> list[str]:
    """The names in a directory; empty when it does not exist or cannot be read."""
    try:
        return [info.base_name for info in entries(location)]
    except OSError:
        return []


def download(location: str | os.PathLike, dest: Path) -> bool:
    """Copies one file to a local path; False when it does not exist."""
    from pyarrow.fs import FileType

    fs, path = open_location(location)
    if fs.get_file_info(path).type != FileType.File:
        return False
    with fs.open_input_stream(path) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
    return True


def upload(src: Path, location: str | os.PathLike) -> None:
    """Copies one local file to a location, creating its directory (an object store needs none; HDFS-like
    filesystems do)."""
    fs, path = open_location(location)
    _put(src, fs, path, make_parent=True)


def _put(src: Path, fs, path: str, make_parent: bool) -> None:
    if make_parent:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with open(src, "rb") as fh, fs.open_output_stream(path) as out:
        shutil.copyfileobj(fh, out)


# ------------------------------------------------------------------ metrics.jsonl


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    """One JSON object a line; a torn line (a crash mid-write) and blank lines are skipped."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def drop_torn_line(path: str | os.PathLike) -> int:
    """Cuts a local JSONL file after its last newline, so the next append starts a line of its own: a process
    that died mid-write leaves a last line without one, and a record appended to it would be lost with it.
    Returns the number of bytes dropped (0 for a whole file or none)."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        keep = size
        while keep > 0:  # back to the last newline, a block at a time
            start = max(0, keep - 65536)
            fh.seek(start)
            block = fh.read(keep - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            keep = start
        fh.truncate(keep)
        return size - keep


def read_metrics(location: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl, given the file or its run directory (local or URI); empty when there
    is none. Row kinds: start | step | eval | alert | finish (distgan.tracking writes them)."""
    if basename(location) != METRICS_FILE:
        location = join(location, METRICS_FILE)
    if is_uri(location):
        data = read_bytes(location) or b""
    else:
        data = Path(location).read_bytes() if Path(location).is_file() else b""
    return parse_jsonl(data.decode())


# ------------------------------------------------------------------ a URI run directory, staged locally


def staging_dir(uri: str) -> Path:
    """Where the files of a URI run directory are written before they are uploaded: one directory per URI, so a
    restart on the same node finds the rows it wrote but had not yet uploaded."""
    digest = hashlib.sha1(uri.encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / "distgan-staging" / f"{basename(uri)}-{digest}"


def _warn(message: str) -> None:
    print(f"WARNING: distgan: {message}", file=sys.stderr, flush=True)


class StagedDir:
    """A run directory that is written as local files. For a local path (or a file:// URI) `local` is the run
    directory itself and sync() does nothing; for any other URI `local` is staging_dir(uri) and sync() uploads
    the files marked changed. An upload that fails never raises: one warning, a retry at most every `every_s`
    seconds, a last try at sync("finish"), and the files stay staged."""

    def __init__(self, location: str | os.PathLike, every_s: float):
        import pyarrow.fs

        self.location, self.every_s, self.remote = str(location), every_s, None
        local = location
        if is_uri(location):
            fs, path = open_location(location)  # once: resolving an S3 bucket's region is a request
            if isinstance(fs, pyarrow.fs.LocalFileSystem):  # file:///abs/path: written in place
                local = path
            else:
                self.remote, local = (fs, path.rstrip("/")), staging_dir(self.location)
        self.local = Path(local)
        self.local.mkdir(parents=True, exist_ok=True)
        self.pending: set[str] = set()  # relative paths changed since their last upload
        self._last_try = -math.inf  # time.monotonic() of the last upload attempt
        self._failing = False
        self._made_dirs: set[str] = set()  # each parent is created once: a create_dir is a request

    def mark(self, *rel: str) -> None:
        if self.remote is not None:
            self.pending.update(rel)

    def restore(self, rel: str) -> None:
        """A staged file from the URI's copy, so that a resume appends to it. A staged copy that extends the URI's
        (written before a crash, not yet uploaded) is kept and marked for upload."""
        if self.remote is None:
            return
        try:
            remote = read_bytes(join(self.location, rel)) or b""
        except OSError as e:
            _warn(f"could not read {join(self.location, rel)} ({first_line(e, with_type=True)}); continuing "
                  f"from the staged copy in {self.local}")
            return
        staged = self.local / rel
        local = staged.read_bytes() if staged.is_file() else b""
        if remote and local.startswith(remote) and len(local) > len(remote):
            self.pending.add(rel)
        else:  # nothing there yet is a new run: files staged for an earlier one under this URI are dropped
            staged.parent.mkdir(parents=True, exist_ok=True)
            staged.write_bytes(remote)

    def sync(self, when: str, last: tuple[str, ...] = ()) -> None:
        """Uploads the marked files. when: "step" (at most every every_s), "eval" (now, unless the last attempt
        failed less than every_s ago) or "finish" (now). `last`: names uploaded after the others (an index
        that names other files should not arrive before them). Never raises."""
        if self.remote is None or not self.pending:
            return
        now = time.monotonic()
        urgent = when == "finish" or (when == "eval" and not self._failing)
        if not urgent and now - self._last_try < self.every_s:
            return
        self._last_try = now
        for rel in sorted(self.pending, key=lambda r: (r in last, r)):
            fs, base = self.remote
            parent_dir = f"{base}/{rel}".rsplit("/", 1)[0]
            try:
                _put(self.local / rel, fs, f"{base}/{rel}", make_parent=parent_dir not in self._made_dirs)
                self._made_dirs.add(parent_dir)
            except Exception as e:  # noqa: BLE001 - an unreachable store must leave training running
                if not self._failing:
                    _warn(f"could not upload {rel} to {self.location} ({first_line(e, with_type=True)}); the files "
                          f"stay in {self.local}, retried every {self.every_s:.0f}s and at the end")
                self._failing = True
                break
            self.pending.discard(rel)
            if self._failing:
                self._failing = False
                print(f"distgan: uploads to {self.location} work again", flush=True)
        if when == "finish" and self.pending:
            _warn(f"{len(self.pending)} run files not uploaded to {self.location}; they are in {self.local}: "
                  f"{', '.join(sorted(self.pending))}")
