"""At-rest encodings of a tier (the digest is always of the decoded bytes) and key layouts."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Iterator
from typing import BinaryIO, Literal

from proxy.errors import CorruptBlob

Encoding = Literal["identity", "gzip", "deflate"]
Layout = Literal["flat", "sharded"]
ENCODINGS: tuple[Encoding, ...] = ("identity", "gzip", "deflate")

# zlib's wbits: 16+ is a gzip wrapper, plain MAX_WBITS a zlib (HTTP "deflate") stream.
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def object_key(prefix: str, digest: str, layout: Layout) -> str:
    """Where a blob lives under a prefix: prefix+hash, or prefix+hash[0:2]/hash."""
    return f"{prefix}{digest[:2]}/{digest}" if layout == "sharded" else f"{prefix}{digest}"


def decoder(encoding: Encoding) -> zlib._Decompress | None:
    if encoding == "identity":
        return None
    if encoding == "deflate":
        # Raw deflate (no zlib header) is still sent by some clients as "deflate"; accept both.
        return _AutoDeflate()  # type: ignore[return-value]
    return zlib.decompressobj(_WBITS[encoding])


class _AutoDeflate:
    """Decodes zlib-wrapped deflate, falling back to raw deflate (RFC 9110 8.4.1.2's caveat)."""

    def __init__(self) -> None:
        self._inner: zlib._Decompress | None = None
        self.eof = False
        self.unconsumed_tail = b""
        self.unused_data = b""

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        if self._inner is None:
            wrapped = len(data) >= 2 and (data[0] & 0x0F) == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._inner = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        out = self._inner.decompress(data, max_length)
        self.eof = self._inner.eof
        self.unconsumed_tail = self._inner.unconsumed_tail
        self.unused_data = self._inner.unused_data
        return out

    def flush(self) -> bytes:
        return self._inner.flush() if self._inner is not None else b""


async def decode_stream(chunks: AsyncIterator[bytes], encoding: Encoding) -> AsyncIterator[bytes]:
    """Decode a tier's encoded stream; a truncated or garbled one is a corrupt copy."""
    dec = decoder(encoding)
    if dec is None:
        async for chunk in chunks:
            yield chunk
        return
    try:
        async for chunk in chunks:
            out = dec.decompress(chunk)
            if out:
                yield out
        tail = dec.flush()
    except zlib.error as error:
        raise CorruptBlob(f"not valid {encoding} data: {error}") from None
    if tail:
        yield tail
    if not dec.eof:
        raise CorruptBlob(f"{encoding} data is truncated")


def decode_pieces(dec: zlib._Decompress, data: bytes, step: int = 1 << 18) -> Iterator[bytes]:
    """``data`` decoded in pieces of at most ``step`` bytes, so that a compression bomb is never
    whole in memory: the caller counts the pieces and stops when it has seen enough.
    Raises zlib.error for bytes that are not the encoding, or that follow its end."""
    while data:
        out = dec.decompress(data, step)
        if out:
            yield out
        data = dec.unconsumed_tail
    if dec.unused_data:
        raise zlib.error("data after the end of the compressed stream")


def encoder(encoding: Encoding) -> zlib._Compress | None:
    return None if encoding == "identity" else zlib.compressobj(6, zlib.DEFLATED, _WBITS[encoding])


def encode_bytes(data: bytes, encoding: Encoding) -> bytes:
    comp = encoder(encoding)
    return data if comp is None else comp.compress(data) + comp.flush()


class EncodingReader:
    """A file-like ``read(n)`` that yields a file's bytes encoded, in bounded memory
    (for boto3's upload_fileobj and folder writes of large blobs)."""

    def __init__(self, source: BinaryIO, encoding: Encoding, block: int = 1 << 20) -> None:
        self._source = source
        self._comp = encoder(encoding)
        self._block = block
        self._buffer = b""
        self._done = False

    def read(self, size: int = -1) -> bytes:
        if self._comp is None:
            return self._source.read(size)
        while not self._done and (size < 0 or len(self._buffer) < size):
            raw = self._source.read(self._block)
            if raw:
                self._buffer += self._comp.compress(raw)
            else:
                self._buffer += self._comp.flush()
                self._done = True
        if size < 0:
            out, self._buffer = self._buffer, b""
        else:
            out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out
