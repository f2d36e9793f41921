"""The digests an export is asked for: in the spec, in a file, or on standard input, one per
line (the first word, so ``sha1sum`` output works). Files are read on the transfer's threads."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from proxy.blocking import run_on
from proxy.transfer.spec import TransferSpec, UsageError


class Hashes:
    """The words to export, in order; ``read`` is how many there were once a file (or standard
    input) has been read to its end, None before and for hashes given in the spec."""

    def __init__(self, spec: TransferSpec, executor: ThreadPoolExecutor, stdin: BinaryIO | None = None) -> None:
        self._spec = spec
        self._executor = executor
        self._stdin = stdin
        self.read: int | None = None

    async def count(self) -> int | None:
        """How many there are, when it can be known before reading them (not from stdin)."""
        spec = self._spec
        if spec.hashes:
            return len(spec.hashes)
        if spec.hashes_file not in (None, "-"):
            assert spec.hashes_file is not None
            return await run_on(self._executor, _count_lines, spec.hashes_file)
        return None

    async def words(self) -> AsyncIterator[str]:
        spec = self._spec
        if spec.hashes:
            for token in spec.hashes:
                yield token
            return
        assert spec.hashes_file is not None
        stdin = spec.hashes_file == "-"
        file: BinaryIO = (
            (self._stdin or sys.stdin.buffer) if stdin else await run_on(self._executor, _open_hashes, spec.hashes_file)
        )
        count = 0
        try:
            while lines := await run_on(self._executor, file.readlines, 1 << 16):
                for line in lines:
                    word = _first_word(line)
                    if word is not None:
                        count += 1
                        yield word
        finally:
            if not stdin:
                file.close()
        self.read = count


def _first_word(line: bytes | str) -> str | None:
    """The digest on a line of a hashes file: the first word; blank lines and # comments are
    not items."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    words = text.split(None, 1)
    if not words or words[0].startswith("#"):
        return None
    return words[0]


def _open_hashes(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, not a file of hashes") from None


def _count_lines(path: str) -> int:
    count = 0
    with _open_hashes(path) as file:
        for line in file:
            if _first_word(line) is not None:
                count += 1
    return count
