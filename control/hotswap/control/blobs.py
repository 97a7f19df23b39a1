"""Content-addressed blob store: ``<root>/<sha[:2]>/<sha>``, written atomically.

A blob is first streamed into ``<root>/tmp``, hashed as it arrives, fsynced, then renamed into
place, so a reader never sees a partial blob and the same bytes are stored once. Leftover temp
files (from a crash mid-upload) are removed when the store opens.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from hotswap.control.errors import InvalidArgument, NotFound

_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_sha256(sha256: str, what: str = "sha256") -> str:
    """Returns `sha256` if it is 64 lowercase hex digits; else raises InvalidArgument.

    Every digest from the wire passes here before it becomes part of a path.
    """
    if not _SHA256.fullmatch(sha256):
        shown = sha256 if len(sha256) <= 70 else sha256[:70] + "..."
        raise InvalidArgument(f"{what} must be 64 lowercase hex digits, not {shown!r}")
    return sha256


class BlobWriter:
    """One blob being written: feed chunks, then `commit` or `discard`."""

    def __init__(self, tmp_dir: Path) -> None:
        fd, name = tempfile.mkstemp(dir=tmp_dir, suffix=".part")
        self._file = os.fdopen(fd, "wb")
        self.tmp_path = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def finish(self) -> str:
        """Flushes to disk and returns the hex sha256 of everything written."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        try:
            if not self._file.closed:
                self._file.close()  # may fail flushing to a full disk: the file goes anyway
        except OSError:
            pass
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Whatever was not committed is garbage.
        self.discard()


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self._tmp.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()

    def writer(self) -> BlobWriter:
        return BlobWriter(self._tmp)

    def _path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def path(self, sha256: str) -> Path:
        path = self._path(sha256)
        if not path.is_file():
            raise NotFound(f"blob {sha256} not found")
        return path

    def commit(self, writer: BlobWriter, sha256: str) -> Path:
        """Moves a finished writer's file into place under `sha256` (a no-op if already there)."""
        final = self._path(sha256)
        if final.is_file():
            writer.discard()
            return final
        final.parent.mkdir(exist_ok=True)
        os.replace(writer.tmp_path, final)
        _fsync_dir(final.parent)
        return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
