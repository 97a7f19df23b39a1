"""The engine's on-disk blob cache: ONNX files by sha256, verified before use.

A cached file is re-hashed once per process before it is trusted, so a file corrupted on disk
is detected and fetched again rather than served. Fetches resume from the last good offset.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO

from hotswap.engine.errors import BlobError

log = logging.getLogger(__name__)

# (sha256, offset) -> the blob's bytes from offset on, in chunks.
Fetcher = Callable[[str, int], AsyncIterator[bytes]]

FETCH_ATTEMPTS = 3
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_sha256(sha256: str) -> str:
    """Returns `sha256` if it is 64 lowercase hex digits; else raises BlobError. A digest
    from the control plane's messages passes here before it becomes part of a path."""
    if not _SHA256.fullmatch(sha256):
        raise BlobError(f"model sha256 {sha256[:70]!r} is not 64 lowercase hex digits")
    return sha256


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _append(f: BinaryIO, digest: Any, chunk: bytes) -> None:
    f.write(chunk)
    digest.update(chunk)


class BlobCache:
    def __init__(self, root: Path, fetch: Fetcher) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self._tmp.iterdir():
            leftover.unlink()
        self._fetch = fetch
        self._verified: set[str] = set()
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / sha256[:2] / sha256

    async def ensure(self, sha256: str) -> Path:
        """The local path of a verified copy of the blob, fetching it if needed."""
        check_sha256(sha256)
        async with self._locks[sha256]:
            path = self.path(sha256)
            if sha256 in self._verified and path.is_file():
                return path
            if path.is_file():
                actual = await asyncio.to_thread(_sha256_file, path)
                if actual == sha256:
                    self._verified.add(sha256)
                    return path
                log.warning(
                    "cached blob %s is corrupt (hashes to %s); fetching again", sha256, actual
                )
                path.unlink()
            await self._download(sha256, path)
            self._verified.add(sha256)
            return path

    async def _download(self, sha256: str, path: Path) -> None:
        log.info("fetching blob %s from the control plane", sha256)
        fd, name = tempfile.mkstemp(dir=self._tmp, suffix=".part")
        tmp = Path(name)
        digest = hashlib.sha256()
        offset = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for attempt in range(1, FETCH_ATTEMPTS + 1):
                    try:
                        async for chunk in self._fetch(sha256, offset):
                            # Writing and hashing a MiB takes ~2 ms: not on the serving loop.
                            await asyncio.to_thread(_append, f, digest, chunk)
                            offset += len(chunk)
                        break
                    except BlobError as exc:
                        if attempt == FETCH_ATTEMPTS:
                            raise
                        log.warning(
                            "fetch of %s failed at byte %d (%s); resuming", sha256, offset, exc
                        )
                f.flush()
                os.fsync(f.fileno())
            actual = digest.hexdigest()
            if actual != sha256:
                raise BlobError(f"blob {sha256} fetched from the control plane hashes to {actual}")
            path.parent.mkdir(exist_ok=True)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
