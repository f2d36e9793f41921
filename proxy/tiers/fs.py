"""A plain folder of blobs: ``<path>/<hash>`` or ``<path>/<hash[0:2]>/<hash>``.

Files here may have been put by anyone, so their bytes are verified like any upstream's.
Writes go to a temp file in the same folder and are renamed into place: never a partial blob.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from proxy.blocking import run_on
from proxy.digest import Digest
from proxy.encoding import Encoding, EncodingReader, Layout, decode_stream, object_key
from proxy.errors import TierError
from proxy.liveness import orphans, temp_prefix
from proxy.tier import CHUNK_SIZE, Blob, FileBlob, Payload, Role, Stat, StreamBlob, Tier

_TEMP_PREFIX = ".casproxy-tmp-"


class FsTier(Tier):
    can_store = True

    def __init__(
        self,
        path: str,
        *,
        name: str = "fs",
        role: Role = "source",
        layout: Layout = "flat",
        encoding: Encoding = "identity",
        timeout: float = 10.0,
        threads: int = 8,
    ) -> None:
        self.name = name
        self.role = role
        self.timeout = timeout
        self.path = os.path.abspath(path)
        self.layout = layout
        self.encoding = encoding
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=f"tier-{name}")

    def _path(self, digest: Digest) -> str:
        return os.path.join(self.path, object_key("", digest, self.layout))

    async def start(self) -> None:
        await run_on(self._executor, self._prepare)

    def _prepare(self) -> None:
        """Create the folder, and remove temp files of writers killed mid-put (a kill -9 must
        leave nothing that outlives the next start)."""
        os.makedirs(self.path, exist_ok=True)
        folders = [self.path]
        if self.layout == "sharded":
            folders += [entry.path for entry in os.scandir(self.path) if entry.is_dir() and len(entry.name) == 2]
        for folder in folders:
            for orphan in orphans(folder, _TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(orphan)

    async def close(self) -> None:
        self._executor.shutdown(wait=False)

    async def open(self, digest: Digest) -> Blob | None:
        try:
            file: BinaryIO = await run_on(self._executor, open, self._path(digest), "rb")
        except FileNotFoundError:
            return None
        except OSError as error:
            raise TierError(f"{self.name}: {error}") from error
        if self.encoding == "identity":
            return FileBlob(file, os.fstat(file.fileno()).st_size)
        raw = FileBlob(file, os.fstat(file.fileno()).st_size)
        return StreamBlob(decode_stream(raw.chunks(), self.encoding), None, raw.close)

    async def stat(self, digest: Digest) -> Stat | None:
        try:
            info = await run_on(self._executor, os.stat, self._path(digest))
        except FileNotFoundError:
            return None
        except OSError as error:
            raise TierError(f"{self.name}: {error}") from error
        return Stat(info.st_size if self.encoding == "identity" else None)

    async def put(self, digest: Digest, payload: Payload) -> None:
        try:
            await run_on(self._executor, self._put, self._path(digest), payload)
        except OSError as error:
            raise TierError(f"{self.name}: cannot store {digest}: {error}") from error

    def _put(self, target: str, payload: Payload) -> None:
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=temp_prefix(_TEMP_PREFIX), dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                source = payload.open()
                if source is None:
                    data = payload.data or b""
                    out.write(EncodingReader(io.BytesIO(data), self.encoding).read())
                else:
                    with source:
                        shutil.copyfileobj(EncodingReader(source, self.encoding), out, CHUNK_SIZE)
                out.flush()
                os.fsync(out.fileno())  # a source folder is durable storage, not a cache
            os.chmod(temp, 0o644)
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise

    async def delete(self, digest: Digest) -> bool:
        try:
            await run_on(self._executor, os.unlink, self._path(digest))
        except FileNotFoundError:
            return False
        return True
