"""``casproxy export`` to S3 (moto in its own process) next to boto3's own ``upload_file`` for the
same data, in the same run: many small blobs, then one large blob; and one export fanned out to
two buckets next to two single-target exports of the same blobs.

    .venv/bin/python bench/transfer.py                       # 10,000 x 4 KiB and one 2 GiB blob
    .venv/bin/python bench/transfer.py --small-count 2000 --large-size 256MiB   # a quick look
    .venv/bin/python bench/transfer.py --only fanout --small-count 2000 --fanout-size 64KiB

The fan-out case reads from an HTTP origin tier (a server in this process counting every GET),
with no cache in front, so "blob reads at the source tier" is what each way costs the origin.

Each side is a fresh process (so start-up counts for both) writing to a fresh bucket; wall time
from spawn to exit, and the process's peak RSS from wait4(). casproxy exports from its disk cache
(the blobs are put there first with ``casproxy import``) and, as a second row, from a plain folder
tier, where every byte is hashed on the way (large blobs are spooled to a temp file first). boto3
uploads the same files: small ones with ``upload_file`` from ``--jobs`` threads (one PUT each,
``use_threads=False``), the large one with one ``upload_file`` and
``TransferConfig(multipart_threshold=64 MiB, multipart_chunksize=16 MiB, max_concurrency=jobs)``,
casproxy's own part settings. Both use path addressing and checksums only when required; casproxy
sends a Content-MD5 with every object and part, boto3 then none.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import botocore.config
from harness import PROCESSES, GiB, KiB, MiB, child_env, log
from misses import moto_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy.units import parse_size  # the repo root is on the path only now

BOTO3_SCRIPT = """
import os, sys
from concurrent.futures import ThreadPoolExecutor
import boto3, botocore.config
from boto3.s3.transfer import TransferConfig

endpoint, bucket, prefix, folder, jobs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
client = boto3.client("s3", endpoint_url=endpoint, config=botocore.config.Config(
    max_pool_connections=jobs * 2 + 4,
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
    s3={"addressing_style": "path"},
))
names = sorted(os.listdir(folder))
if len(names) == 1:
    config = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20, max_concurrency=jobs)
    client.upload_file(os.path.join(folder, names[0]), bucket, prefix + names[0], Config=config)
else:
    single = TransferConfig(use_threads=False)
    def one(name):
        client.upload_file(os.path.join(folder, name), bucket, prefix + name, Config=single)
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, names))
"""


@dataclass
class Row:
    case: str
    tool: str
    blobs: int
    bytes: int
    seconds: float
    peak_rss: int
    source_reads: int | None = None  # GETs at the source tier (fan-out case)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6

    @property
    def blobs_per_s(self) -> float:
        return self.blobs / self.seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-count", type=int, default=10_000)
    parser.add_argument("--small-size", type=parse_size, default=4 * KiB)
    parser.add_argument("--large-size", type=parse_size, default=2 * GiB)
    parser.add_argument("-j", "--jobs", type=int, default=8, help="parallel transfers, both sides (default: 8)")
    parser.add_argument("--fanout-size", type=parse_size, default=64 * KiB, help="blob size in the fan-out case")
    parser.add_argument("--only", default="small,large,fanout", help="small, large, fanout (default: all)")
    parser.add_argument("--workdir", help="where blobs and caches go (default: a temp folder, removed)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "transfer.json"))
    return parser.parse_args(argv)


def make_small(folder: Path, count: int, size: int) -> int:
    folder.mkdir(parents=True)
    for _ in range(count):
        data = os.urandom(size)
        (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)
    return count * size


def make_large(folder: Path, size: int) -> int:
    folder.mkdir(parents=True)
    temp = folder / ".partial"
    digest = hashlib.sha1()
    with open(temp, "wb") as out:
        left = size
        while left:
            block = os.urandom(min(left, 64 * MiB))
            digest.update(block)
            out.write(block)
            left -= len(block)
    temp.rename(folder / digest.hexdigest())
    return size


class CountingOrigin(ThreadingHTTPServer):
    """``GET /blobs/<hash>`` from a folder, counting the GETs: the source tier of the fan-out case."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.gets: Counter[str] = Counter()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _OriginHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/blobs/{{hash}}"


class _OriginHandler(BaseHTTPRequestHandler):
    server: CountingOrigin
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # the http.server name
        name = self.path.rsplit("/", 1)[-1]
        path = self.server.folder / name
        if not path.is_file():
            self.send_error(404)
            return
        with self.server.lock:
            self.server.gets[name] += 1
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def run_timed(args: list[str], log_path: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process; raises if it fails."""
    with open(log_path, "ab") as log_file:
        started = time.perf_counter()
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=child_env())
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{args[:4]} exited {proc.returncode}:\n{tail}")
    return seconds, usage.ru_maxrss * 1024


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        config=botocore.config.Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
        ),
    )


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, endpoint: str) -> None:
        self.args = args
        self.workdir = workdir
        self.endpoint = endpoint
        self.client = s3_client(endpoint)
        self.rows: list[Row] = []
        self.buckets = 0
        self.cached = self.write_config(
            "cached", [{"name": "disk", "kind": "disk", "role": "cache", "path": "cache", "size_limit": "64 GiB"}]
        )

    def write_config(self, name: str, tiers: list[dict[str, str]]) -> Path:
        lines = []
        for tier in tiers:
            lines.append("[[tiers]]")
            lines += [f'{key} = "{value}"' for key, value in tier.items()]
        path = self.workdir / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def casproxy(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "proxy", *args]

    def fresh_bucket(self) -> str:
        self.buckets += 1
        name = f"transfer-bench-{self.buckets}"
        self.client.create_bucket(Bucket=name)
        return name

    def empty(self, bucket: str, expected: int, size: int) -> None:
        """Check the bucket got every object, then free moto's memory."""
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys += [item["Key"] for item in page.get("Contents", [])]
            if any(item["Size"] != size for item in page.get("Contents", [])):
                raise RuntimeError(f"{bucket}: an object has the wrong size")
        if len(keys) != expected:
            raise RuntimeError(f"{bucket}: {len(keys)} objects, expected {expected}")
        for start in range(0, len(keys), 1000):
            objects = [{"Key": key} for key in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=bucket, Delete={"Objects": objects})
        self.client.delete_bucket(Bucket=bucket)

    def case(self, name: str, folder: Path, count: int, size: int) -> None:
        jobs = str(self.args.jobs)
        hashes = self.workdir / f"{name}.hashes"
        hashes.write_text("".join(f"{entry}\n" for entry in sorted(os.listdir(folder))))
        log(f"\n== {name}: {count} x {size} bytes; putting them into the disk cache")
        seconds, _ = run_timed(
            self.casproxy("import", "-c", str(self.cached), "--from", str(folder), "--into", "disk", "-j", jobs),
            self.workdir / "import.log",
        )
        self.rows.append(Row(name, "casproxy import (folder -> disk cache)", count, count * size, seconds, 0))
        verified = self.write_config(f"{name}-folder", [{"name": "folder", "kind": "fs", "path": str(folder)}])
        sides = [
            (
                "boto3 upload_file",
                [sys.executable, "-c", BOTO3_SCRIPT, self.endpoint, "{bucket}", "b/", str(folder), jobs],
            ),
            ("casproxy export (disk cache)", self.export_args(self.cached, hashes, jobs)),
            ("casproxy export (folder, verified)", self.export_args(verified, hashes, jobs)),
        ]
        for tool, command in sides:
            bucket = self.fresh_bucket()
            command = [part.replace("{bucket}", bucket) for part in command]
            seconds, rss = run_timed(command, self.workdir / f"{name}.log")
            self.empty(bucket, count, size)
            row = Row(name, tool, count, count * size, seconds, rss)
            self.rows.append(row)
            rates = f"{row.mb_per_s:9.1f} MB/s {row.blobs_per_s:9.1f} blobs/s"
            log(f"{tool:38} {seconds:8.2f} s {rates}  {rss / MiB:6.0f} MiB")

    def export_args(self, config: Path, hashes: Path, jobs: str, targets: int = 1) -> list[str]:
        places = [part for index in range(targets) for part in ("--to", f"s3://{{bucket{index or ''}}}/c/")]
        return self.casproxy(
            "export", "-c", str(config), "--hashes", str(hashes), *places,
            "--endpoint-url", self.endpoint, "-j", jobs,
        )  # fmt: skip

    def fanout(self, name: str, folder: Path, count: int, size: int) -> None:
        """Two buckets: two single-target exports, then one export to both; source GETs and time."""
        jobs = str(self.args.jobs)
        hashes = self.workdir / f"{name}.hashes"
        hashes.write_text("".join(f"{entry}\n" for entry in sorted(os.listdir(folder))))
        origin = CountingOrigin(folder)
        config = self.write_config(f"{name}-origin", [{"name": "origin", "kind": "http", "url": origin.url}])
        log(f"\n== {name}: {count} x {size} bytes to two buckets, from an HTTP origin (no cache)")
        try:
            seconds = 0.0
            rss = 0
            for _ in range(2):
                bucket = self.fresh_bucket()
                command = [part.replace("{bucket}", bucket) for part in self.export_args(config, hashes, jobs)]
                took, peak = run_timed(command, self.workdir / f"{name}.log")
                seconds, rss = seconds + took, max(rss, peak)
                self.empty(bucket, count, size)
            self.fanout_row(name, "2 single-target exports (sum)", count, size, seconds, rss, origin)
            first, second = self.fresh_bucket(), self.fresh_bucket()
            command = self.export_args(config, hashes, jobs, targets=2)
            command = [part.replace("{bucket}", first).replace("{bucket1}", second) for part in command]
            seconds, rss = run_timed(command, self.workdir / f"{name}.log")
            self.empty(first, count, size)
            self.empty(second, count, size)
            self.fanout_row(name, "1 fan-out export to 2 buckets", count, size, seconds, rss, origin)
        finally:
            origin.shutdown()
            origin.server_close()

    def fanout_row(
        self, name: str, tool: str, count: int, size: int, seconds: float, rss: int, origin: CountingOrigin
    ) -> None:
        with origin.lock:
            reads = sum(origin.gets.values())
            origin.gets.clear()
        row = Row(name, tool, 2 * count, 2 * count * size, seconds, rss, reads)
        self.rows.append(row)
        log(f"{tool:38} {seconds:8.2f} s {row.mb_per_s:9.1f} MB/s  {reads:6} source reads  {rss / MiB:6.0f} MiB")


def table(rows: list[Row]) -> str:
    head = f"| {'case':6} | {'tool':38} | {'blobs':>6} | {'MB':>8} | {'seconds':>8} | {'MB/s':>7} | {'blobs/s':>8} |"
    head += " peak RSS | source reads |"
    lines = [head, "|" + "|".join("-" * (len(cell)) for cell in head.split("|")[1:-1]) + "|"]
    for row in rows:
        rss = f"{row.peak_rss / MiB:.0f} MiB" if row.peak_rss else "-"
        lines.append(
            f"| {row.case:6} | {row.tool:38} | {row.blobs:>6} | {row.bytes / 1e6:>8.1f} | {row.seconds:>8.2f} | "
            f"{row.mb_per_s:>7.1f} | {row.blobs_per_s:>8.1f} | {rss:>8} | "
            f"{'-' if row.source_reads is None else row.source_reads:>12} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="casproxy-transfer-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # the configs' relative cache folder and ./data land here
    try:
        with moto_server(workdir, "process") as endpoint:
            bench = Bench(args, workdir, endpoint)
            if "small" in args.only:
                make_small(workdir / "small", args.small_count, args.small_size)
                bench.case("small", workdir / "small", args.small_count, args.small_size)
            if "large" in args.only:
                make_large(workdir / "large", args.large_size)
                bench.case("large", workdir / "large", 1, args.large_size)
            if "fanout" in args.only:
                make_small(workdir / "fanout", args.small_count, args.fanout_size)
                bench.fanout("fanout", workdir / "fanout", args.small_count, args.fanout_size)
        print("\n" + table(bench.rows))
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"options": vars(args), "rows": [asdict(row) for row in bench.rows]}, indent=2))
        log(f"\nwritten to {output}")
    finally:
        PROCESSES.stop_all()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
