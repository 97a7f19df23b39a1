"""Model upload: stream to a temp blob, check size and sha256, validate the ONNX, then store.

Nothing becomes visible until every check has passed: the blob is renamed into place and the
model version row is written only at the end, so a failed or interrupted upload leaves nothing.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hotswap.control.blobs import BlobStore, check_sha256
from hotswap.control.domain import ModelVersion, check_name
from hotswap.control.errors import InvalidArgument, LimitExceeded
from hotswap.control.onnx_check import inspect_onnx
from hotswap.control.store import Store


@dataclass(frozen=True, slots=True)
class UploadHeader:
    workspace: str
    name: str
    sha256: str
    size_bytes: int  # 0 when the client does not say


class ModelUploads:
    def __init__(self, store: Store, blobs: BlobStore, max_bytes: int) -> None:
        self._store = store
        self._blobs = blobs
        self._max_bytes = max_bytes

    def _too_big(self, size: int) -> LimitExceeded:
        return LimitExceeded(
            f"model is {size} bytes, over the {self._max_bytes}-byte limit "
            "(raise it with --max-model-bytes / HOTSWAP_MAX_MODEL_BYTES)"
        )

    async def upload(self, header: UploadHeader, chunks: AsyncIterator[bytes]) -> ModelVersion:
        check_name("model", header.name)
        sha = check_sha256(header.sha256, "header.sha256 (the file's sha256)")
        if header.size_bytes > self._max_bytes:
            raise self._too_big(header.size_bytes)
        # Fail fast on an unknown workspace, before receiving any bytes.
        self._store.list_models(header.workspace)
        try:
            return await self._receive(header, sha, chunks)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise LimitExceeded(
                "the control plane's disk is full: free space under its --data-dir, then "
                "upload again (nothing was stored)"
            ) from None

    async def _receive(
        self, header: UploadHeader, sha: str, chunks: AsyncIterator[bytes]
    ) -> ModelVersion:
        with self._blobs.writer() as writer:
            async for chunk in chunks:
                writer.write(chunk)
                if writer.size > self._max_bytes:
                    raise self._too_big(writer.size)
            actual = writer.finish()
            if writer.size == 0:
                raise InvalidArgument("the upload carried no bytes")
            if actual != sha:
                raise InvalidArgument(
                    f"sha256 mismatch: header says {sha}, received bytes hash to {actual} "
                    "(the file changed or the upload was corrupted; upload again)"
                )
            inputs, outputs = await asyncio.to_thread(inspect_onnx, writer.tmp_path)
            self._blobs.commit(writer, actual)
            size = writer.size
        return self._store.add_model_version(
            header.workspace, header.name, actual, size, inputs, outputs
        )
