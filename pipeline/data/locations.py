"""Where datasets and outputs live: a local path or an object-storage URI, resolved here only.

Every dataset or output location in the pipeline is a string: ``data/shards/x/train``,
``/abs/path``, ``s3://bucket/prefix`` or ``gs://bucket/prefix`` (anything
``pyarrow.fs.FileSystem.from_uri`` resolves). This module is the one place that turns such a
string into a filesystem and a path, so the rest of the code reads and writes both kinds
alike and never builds a ``Path`` from a dataset location.

Credentials and endpoints come from the usual environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``,
``GOOGLE_APPLICATION_CREDENTIALS``, ...), read by pyarrow on every process that opens the
location, so nothing secret travels inside task arguments.

Writes are whole or absent: a local file is written under a temporary name and renamed; an
object-storage object becomes visible only when its upload completes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


class LocationError(ValueError):
    """A location is malformed or cannot be reached; the message names it."""


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (object storage, ``file://``), False for a plain path."""
    return "://" in str(location)


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for object storage (a URI other than ``file://``): no other node shares a local
    path, so this is what a cluster's nodes can all read."""
    return is_uri(location) and not str(location).startswith("file://")


def absolute(location: str | os.PathLike[str]) -> str:
    """A location that means the same on every process: URIs unchanged (less a trailing
    ``/``), local paths expanded and made absolute (Ray workers run in other directories)."""
    text = str(location)
    if is_uri(text):
        scheme, _, rest = text.partition("://")
        return f"{scheme}://{rest.rstrip('/')}" if rest.strip("/") else text
    return str(Path(text).expanduser().resolve())


# What pyarrow reads to reach object storage: a filesystem is reused only while they hold.
_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


@functools.lru_cache(maxsize=32)
def _cached_filesystem(scheme_and_bucket: str, environment: tuple) -> pafs.FileSystem:
    filesystem, _ = pafs.FileSystem.from_uri(scheme_and_bucket)
    return filesystem


def _filesystem_for(scheme_and_bucket: str) -> pafs.FileSystem:
    """One filesystem per bucket and process (from_uri may ask the bucket for its region)."""
    return _cached_filesystem(scheme_and_bucket, tuple(os.environ.get(k) for k in _ENVIRONMENT))


def resolve(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``location`` and the path inside it (no trailing ``/``)."""
    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), absolute(text)
    scheme, _, rest = text.partition("://")
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise LocationError(f"{text}: no bucket or host after '{scheme}://'")
    try:
        if scheme == "file":
            filesystem: pafs.FileSystem = pafs.LocalFileSystem()
        else:
            filesystem = _filesystem_for(f"{scheme}://{bucket}")
        _, path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as err:
        raise LocationError(f"{text}: cannot resolve this location ({err})") from err
    return filesystem, path.rstrip("/") or path


def join(location: str | os.PathLike[str], *parts: str) -> str:
    """``location/part/...``: posix separators for URIs, the OS's for local paths."""
    text = str(location)
    if is_uri(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return os.path.join(text, *parts)


def parent(location: str | os.PathLike[str]) -> str:
    """The location one level up (``s3://b/x/train`` -> ``s3://b/x``)."""
    text = str(location).rstrip("/")
    if is_uri(text):
        head, _, _ = text.rpartition("/")
        return head if "://" in head and head.split("://", 1)[1] else text
    return str(Path(text).parent)


def name(location: str | os.PathLike[str]) -> str:
    """The last component (``s3://b/x/train`` -> ``train``)."""
    text = str(location).rstrip("/")
    return text.rsplit("/", 1)[-1] if is_uri(text) else Path(text).name


def _info(location: str | os.PathLike[str]) -> pafs.FileInfo:
    filesystem, path = resolve(location)
    try:
        return filesystem.get_file_info(path)
    except OSError as err:
        raise LocationError(f"{location}: cannot reach it ({err})") from err


def exists(location: str | os.PathLike[str]) -> bool:
    """Whether a file or directory (a non-empty prefix, in object storage) is there."""
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike[str]) -> bool:
    """Whether a file is there."""
    return _info(location).type == pafs.FileType.File


def is_dir(location: str | os.PathLike[str]) -> bool:
    """Whether a directory is there (in object storage, a non-empty prefix)."""
    return _info(location).type == pafs.FileType.Directory


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    """The whole file; FileNotFoundError when it is not there."""
    text = str(location)
    if not is_uri(text):  # the OS directly: prepare reads every image through here
        try:
            with open(os.path.expanduser(text), "rb") as file:
                return file.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{location}: no such file") from None
        except OSError as err:
            raise LocationError(f"{location}: cannot read it ({err})") from err
    filesystem, path = resolve(location)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise
    except OSError as err:
        if _info(location).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{location}: no such file") from err
        raise LocationError(f"{location}: cannot read it ({err})") from err


def read_text(location: str | os.PathLike[str]) -> str:
    """The whole file as UTF-8 text; FileNotFoundError when it is not there."""
    return read_bytes(location).decode()


def write_bytes(location: str | os.PathLike[str], data: bytes) -> None:
    """Write a whole file atomically: readers see the old file, or the new one complete."""
    filesystem, path = resolve(location)
    filesystem.create_dir(posixpath.dirname(path) or path, recursive=True)
    if is_uri(location) and not str(location).startswith("file://"):
        with filesystem.open_output_stream(path) as stream:  # visible only once complete
            stream.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with filesystem.open_output_stream(tmp) as stream:
            stream.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(location: str | os.PathLike[str], text: str) -> None:
    """Write a whole text file (UTF-8) atomically, as ``write_bytes`` does."""
    write_bytes(location, text.encode())


def make_dirs(location: str | os.PathLike[str]) -> None:
    """Create a local directory and its parents (object storage needs none)."""
    filesystem, path = resolve(location)
    filesystem.create_dir(path, recursive=True)


def delete_file(location: str | os.PathLike[str]) -> None:
    """Delete one file; a missing one is no error."""
    filesystem, path = resolve(location)
    with contextlib.suppress(FileNotFoundError):
        filesystem.delete_file(path)


@dataclass(frozen=True)
class FileEntry:
    """A file under a listed location: its full location, its path relative to the listed
    root (``/``-separated) and its size in bytes."""

    location: str
    relative: str
    size: int


def list_files(location: str | os.PathLike[str], *, recursive: bool = True) -> list[FileEntry]:
    """Every file under ``location``, sorted by relative path (hidden names starting with
    ``.`` or ``_`` included: callers filter). Raises LocationError when nothing is there."""
    filesystem, path = resolve(location)
    info = _info(location)
    if info.type == pafs.FileType.NotFound:
        raise LocationError(f"{location}: no such directory or prefix")
    if info.type == pafs.FileType.File:
        raise LocationError(f"{location}: is a file, not a directory or prefix")
    selector = pafs.FileSelector(path, recursive=recursive)
    try:
        infos = filesystem.get_file_info(selector)
    except OSError as err:
        raise LocationError(f"{location}: cannot list it ({err})") from err
    base = str(location).rstrip("/")
    entries = []
    for item in infos:
        if item.type != pafs.FileType.File:
            continue
        relative = posixpath.relpath(item.path, path) if path else item.path
        entries.append(FileEntry(join(base, *relative.split("/")), relative, item.size or 0))
    return sorted(entries, key=lambda entry: entry.relative)
