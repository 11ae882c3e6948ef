"""The local-directory object store, the embedded default: one file per key under a
root directory. A put writes a temporary file beside the target, fsyncs it and
renames it over the target (os.replace is atomic on POSIX), so a reader sees the old
object or the new one. Content type and cache-control are not kept: the service
serves these files itself and knows both from the key. Blocking file I/O runs in
asyncio.to_thread."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import stat
import tempfile
from pathlib import Path

from ..errors import StorageUnavailable
from .store import check_expiry, check_key, check_prefix

log = logging.getLogger(__name__)

# Errors that mean "no such object", not "the store is down": the key, or a directory
# on its path, is absent or is the other kind of entry than expected.
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
_TMP_SUFFIX = ".tmp"  # temp files start with '.', which no key segment may


def _unavailable(fn):
    """OSError reaching the directory -> StorageUnavailable (logged with the cause)."""

    @functools.wraps(fn)
    async def call(self, *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        except OSError as e:
            log.warning("object store %s: %s: %s", self.root, type(e).__name__, e)
            raise StorageUnavailable("the object store is unavailable") from None

    return call


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @_unavailable
    async def put(self, key: str, data: bytes, content_type: str,
                  cache_control: str | None = None) -> None:
        await asyncio.to_thread(_write, self._path(key), data)

    @_unavailable
    async def get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(_read, self._path(key))

    @_unavailable
    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(_is_file, self._path(key))

    @_unavailable
    async def delete(self, key: str) -> None:
        await asyncio.to_thread(_remove, self._path(key))

    @_unavailable
    async def keys(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(_list, self.root, check_prefix(prefix))

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        check_key(key)
        check_expiry(expires_s)
        return None  # the service serves local objects itself

    async def close(self) -> None:
        pass


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        # mkstemp makes the file 0600; objects are read by whoever serves the directory
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a crash


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that cannot
            raise
    finally:
        os.close(fd)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except _MISSING:
        return None


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except _MISSING:
        return False


def _remove(path: Path) -> None:
    with contextlib.suppress(*_MISSING):
        os.unlink(path)


def _list(root: Path, prefix: str) -> list[str]:
    # Walk only the directory the prefix ends in, and below it only what can match.
    top = prefix.rpartition("/")[0]

    def raise_unless_missing(e: OSError) -> None:
        if not isinstance(e, _MISSING):
            raise e

    found = []
    for dirpath, dirnames, filenames in os.walk(root / top, onerror=raise_unless_missing):
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel = "" if rel == "." else rel + "/"
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and _may_hold(rel + d, prefix)]
        found += [rel + f for f in filenames if not f.startswith(".") and
                  (rel + f).startswith(prefix)]
    return sorted(found)


def _may_hold(directory: str, prefix: str) -> bool:
    d = directory + "/"
    return d.startswith(prefix) or prefix.startswith(d)
