"""The README's walk-through runs as written: every ``sh`` block from its "## Walk-through" heading
to the next level-two heading, pasted top to bottom into one bash, in an empty folder, with
casproxy on the PATH and a free port. It must succeed, say what the README says it says, and leave
nothing in the checkout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def walk_through() -> list[str]:
    """The runnable blocks, in order."""
    text = README.read_text()
    section = re.search(r"^## Walk-through\n(.*?)^## ", text, re.S | re.M)
    assert section, "README.md has no '## Walk-through' section"
    return re.findall(r"^```sh\n(.*?)^```$", section.group(1), re.S | re.M)


def checkout_state() -> set[str]:
    """Files git sees as new or changed (ignored ones included): what a run could leave behind."""
    done = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        pytest.skip("not a git checkout")
    # The test run's own files move under it, whatever the walk-through does: bytecode caches, the
    # virtualenv, and coverage data (scripts/test measures every subprocess, casproxy included).
    own = ("__pycache__", ".venv/", ".coverage")
    return {line for line in done.stdout.splitlines() if not any(part in line for part in own)}


def test_the_walk_through_runs_as_written(tmp_path: Path) -> None:
    for command in ("curl", "jq", "gzip", "sha1sum"):
        if shutil.which(command) is None:
            pytest.skip(f"the walk-through needs {command} (scripts/test installs it where it may)")
    blocks = walk_through()
    assert len(blocks) >= 5
    script = "\n".join(blocks)
    assert "mktemp -d" in blocks[0] and "kill %1" in blocks[-1]
    before = checkout_state()
    # Only the harness adds this: a failing step must not leave the server running.
    harness = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASPROXY_")}
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PORT": str(free_port()),
        "TMPDIR": str(tmp_path),  # where mktemp -d makes the empty folder
        "HOME": str(tmp_path),
    }
    done = subprocess.run(["bash", "-c", harness], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    (folder,) = [path for path in tmp_path.iterdir() if path.is_dir() and path.name.startswith("tmp.")]

    # What the comments in the README promise.
    assert re.search(r"X-Cache: MISS\r?\nX-Cache-Tier: local", done.stdout)
    assert re.search(r"X-Cache: HIT\r?\nX-Cache-Tier: disk", done.stdout)
    assert "HTTP/1.1 304 Not Modified" in done.stdout and "HTTP/1.1 400 Bad Request" in done.stdout
    assert '{"missing": ["0000000000000000000000000000000000000000"]}' in done.stdout
    assert "\nhello\n" in done.stdout  # the 206
    assert "hello, casproxy" in done.stdout  # read by ticket
    assert "export: done 2, skipped 0, failed 0, corrupt 0" in done.stderr
    assert "import: done 2, skipped 0, failed 0, corrupt 0" in done.stderr
    digest = (folder / "hashes.txt").read_text().split()[0]
    assert (folder / "downloads" / digest).read_text() == "hello, casproxy\n"
    log = (folder / "casproxy.log").read_text()
    assert "no config file" in log and "Traceback" not in log

    assert checkout_state() == before, "the walk-through left files in the checkout"
