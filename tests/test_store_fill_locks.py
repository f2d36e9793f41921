"""Fill locks across processes: a fill waits while another process holds the digest's lock,
and a holder that is killed never blocks the others."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from proxy.store.fill_locks import FillLocks

DIGEST = "a" * 40
HOLDER = """
import asyncio, sys
from proxy.store.fill_locks import FillLocks

async def main():
    async with FillLocks(sys.argv[1]).hold(sys.argv[2]):
        print("held", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

asyncio.run(main())
"""


async def holder(path: Path) -> asyncio.subprocess.Process:
    """Another process, holding the digest's lock until it reads a line."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, str(path), DIGEST, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    assert await child.stdout.readline() == b"held\n"
    return child


async def test_a_fill_waits_for_another_processes_fill_of_the_same_digest(tmp_path: Path) -> None:
    path = tmp_path / "fills.lock"
    child = await holder(path)
    locks = FillLocks(str(path))
    try:

        async def take() -> bool:
            async with locks.hold(DIGEST) as waited:
                return waited

        waiter = asyncio.create_task(take())
        await asyncio.sleep(0)  # one loop turn: the waiter's first step tries the lock and finds it held
        async with locks.hold("b" * 40) as waited:  # another digest is not held up
            assert not waited
        assert child.stdin is not None
        child.stdin.write(b"done\n")
        await child.stdin.drain()
        assert await waiter  # it had to wait for the other process
    finally:
        await child.wait()
        locks.close()


async def test_a_killed_holder_releases_its_lock(tmp_path: Path) -> None:
    path = tmp_path / "fills.lock"
    child = await holder(path)
    locks = FillLocks(str(path))
    try:
        child.kill()
        async with locks.hold(DIGEST):
            pass  # reached: the kernel dropped the dead process's lock
    finally:
        await child.wait()
        locks.close()
