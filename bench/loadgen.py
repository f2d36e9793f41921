"""wrk: a rotation script over several blob URLs, one run, and the parse of its report."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# wrk prints sizes and rates with binary multiples (1 MB = 2**20 bytes).
_BINARY = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
_TIME_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}

_REQUESTS_PER_S = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TRANSFER_PER_S = re.compile(r"^Transfer/sec:\s+([\d.]+)([KMGT]?B)", re.M)
_P99 = re.compile(r"^\s+99%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_TOTAL = re.compile(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.M)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    mib_per_s: float
    p99_ms: float
    requests: int
    errors: int  # socket errors plus non-2xx/3xx answers: a round with any is suspect

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rotation_script(path: Path, url_paths: Sequence[str]) -> Path:
    """A wrk script that cycles over ``url_paths`` so a cache serves several keys, not one.
    Requests are formatted once in init: the per-request Lua cost stays tiny and equal
    for both servers."""
    entries = ",\n  ".join(f'"{p}"' for p in url_paths)
    path.write_text(
        f"""local paths = {{
  {entries}
}}
local requests = {{}}
local counter = 0
function init(args)
  for i, p in ipairs(paths) do
    requests[i] = wrk.format("GET", p)
  end
end
function request()
  counter = counter + 1
  return requests[(counter % #requests) + 1]
end
"""
    )
    return path


def run_wrk(base_url: str, script: Path, connections: int, duration: float, threads: int = 2) -> WrkResult:
    seconds = max(1, round(duration))
    args = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        base_url + "/",
    ]
    # subprocess.run kills wrk if we are interrupted, so it never outlives the bench.
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)


def parse_wrk(text: str) -> WrkResult:
    rps = _REQUESTS_PER_S.search(text)
    transfer = _TRANSFER_PER_S.search(text)
    p99 = _P99.search(text)
    total = _TOTAL.search(text)
    if not (rps and transfer and p99 and total):
        raise ValueError(f"cannot parse wrk output:\n{text}")
    socket_errors = _SOCKET_ERRORS.search(text)
    errors = sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    non_2xx = _NON_2XX.search(text)
    if non_2xx:
        errors += int(non_2xx.group(1))
    return WrkResult(
        requests_per_s=float(rps.group(1)),
        mib_per_s=float(transfer.group(1)) * _BINARY[transfer.group(2)] / (1 << 20),
        p99_ms=float(p99.group(1)) * _TIME_MS[p99.group(2)],
        requests=int(total.group(1)),
        errors=errors,
    )
