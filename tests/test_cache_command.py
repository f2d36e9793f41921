"""``casproxy cache stats|check|purge``: what an operator runs against a cache directory."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import main
from proxy.config import load_config
from proxy.service import build_store
from proxy.tier import FilePayload
from tests.conftest import make_blob, write_config


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "config.toml",
        [
            {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
            {"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")},
        ],
    )


def cache_blobs(config_path: Path, blobs: list[tuple[bytes, str]]) -> None:
    async def fill() -> None:
        async with build_store(load_config(str(config_path), environ={})) as store:
            for data, digest in blobs:
                path = config_path.parent / digest
                path.write_bytes(data)
                await store.put(digest, FilePayload(str(path), len(data)), [store.tier("disk")])

    asyncio.run(fill())


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    status = main(list(args))
    return status, json.loads(capsys.readouterr().out)


def test_stats_check_and_purge(config_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small, large = make_blob(1000), make_blob(200_000)
    cache_blobs(config_path, [small, large])
    config = ("-c", str(config_path))

    status, stats = run(capsys, "cache", "stats", *config)
    assert status == 0 and stats["disk"]["entries"] == 2 and stats["disk"]["kind"] == "DiskTier"

    assert run(capsys, "cache", "check", *config) == (0, {"disk": {"checked": 2, "removed": []}})

    # Bit rot in the large entry's file: check finds it, removes it, and says so in its status.
    [blob_file] = [path for path in (tmp_path / "cache").rglob("*.val") if path.stat().st_size == len(large[0])]
    raw = bytearray(blob_file.read_bytes())
    raw[100] ^= 0xFF
    blob_file.write_bytes(bytes(raw))
    assert run(capsys, "cache", "check", *config) == (1, {"disk": {"checked": 2, "removed": [large[1]]}})
    assert run(capsys, "cache", "check", *config) == (0, {"disk": {"checked": 1, "removed": []}})

    assert run(capsys, "cache", "purge", small[1], *config) == (0, {small[1]: ["disk"]})
    assert run(capsys, "cache", "stats", *config)[1]["disk"]["entries"] == 0


def test_purge_needs_good_hashes(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "purge", "-c", str(config_path)]) == 2
    assert "purge" in capsys.readouterr().err
    assert main(["cache", "purge", "../etc/passwd", "-c", str(config_path)]) == 2
    assert "not a" in capsys.readouterr().err
