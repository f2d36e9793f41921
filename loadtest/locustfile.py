"""Load test for casproxy: a mix of hits and misses over a set of blobs seeded by upload.

    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 1m --host http://127.0.0.1:8080

At the start of a test the blobs (deterministic bytes, from --blob-seed) are uploaded with
PUT /sha1/<hash> — only those the proxy does not have yet, asked with POST /sha1/missing — so
repeated runs against the same proxy reuse them. Then every user, in a loop:

- hit (--hit-ratio of requests): GET a seeded blob; the body must hash to its name;
- miss (the rest): GET a hash the proxy cannot have; 404 is the right answer;
- cold (--cold-ratio of hits, needs --admin-token): DELETE the blob from the cache tiers first,
  so the GET refills it from the source tier.

Every request is named "/sha1/[hash]", so the statistics group them by method. Each option also
reads an environment variable (shown in `locust -f loadtest/locustfile.py --help`). This file needs
only locust and the standard library: it can run on any machine that reaches the proxy.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from dataclasses import dataclass
from typing import Any

import gevent
import requests
from gevent.pool import Pool
from locust import FastHttpUser, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

NAME = "/sha1/[hash]"
MISSING_BATCH = 10_000  # the most hashes POST /sha1/missing takes at once
UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
log = logging.getLogger("casproxy.loadtest")


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    # On the parser itself, not a group: only it knows locust's is_secret (masked in the web UI).
    parser.add_argument(
        "--hit-ratio", type=float, default=0.9, env_var="CASPROXY_HIT_RATIO", help="share of GETs for seeded blobs"
    )
    parser.add_argument("--blob-count", type=int, default=200, env_var="CASPROXY_BLOB_COUNT", help="blobs to seed")
    parser.add_argument(
        "--blob-sizes",
        default="1KiB,4KiB,4KiB,16KiB,16KiB,64KiB,256KiB,1MiB",
        env_var="CASPROXY_BLOB_SIZES",
        help="sizes given to the blobs in turn; repeat a size to weight it",
    )
    parser.add_argument(
        "--blob-seed", default="casproxy", env_var="CASPROXY_BLOB_SEED", help="same seed, same blobs (across runs)"
    )
    parser.add_argument(
        "--miss-pool",
        type=int,
        default=0,
        env_var="CASPROXY_MISS_POOL",
        help="absent hashes to reuse (the negative cache answers repeats); 0: a new one each time",
    )
    parser.add_argument(
        "--cold-ratio",
        type=float,
        default=0.0,
        env_var="CASPROXY_COLD_RATIO",
        help="share of hits evicted first (DELETE, needs --admin-token) so they refill from the source",
    )
    parser.add_argument(
        "--upload-token", default="", env_var="CASPROXY_UPLOAD_TOKEN", is_secret=True, help="bearer token for seeding"
    )
    parser.add_argument(
        "--admin-token", default="", env_var="CASPROXY_ADMIN_TOKEN", is_secret=True, help="bearer token for DELETE"
    )
    parser.add_argument(
        "--think-time", type=float, default=0.0, env_var="CASPROXY_THINK_TIME", help="seconds between a user's requests"
    )


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 4KiB, 1MiB, 1000)")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class Blob:
    index: int
    size: int
    sha1: str


class Corpus:
    """The seeded blobs: every node of a distributed run derives the same ones from the seed."""

    def __init__(self, seed: str, count: int, sizes: list[int]) -> None:
        self.seed = seed
        self.blobs = []
        for index in range(count):
            size = sizes[index % len(sizes)]
            self.blobs.append(Blob(index, size, hashlib.sha1(self.data(index, size)).hexdigest()))
        self.by_hash = {blob.sha1: blob for blob in self.blobs}

    def data(self, index: int, size: int) -> bytes:
        return random.Random(f"{self.seed}/{index}").randbytes(size)


class Settings:
    def __init__(self, options: Any) -> None:
        self.hit_ratio = _ratio(options.hit_ratio, "--hit-ratio")
        self.cold_ratio = _ratio(options.cold_ratio, "--cold-ratio")
        if options.blob_count < 1:
            raise ValueError("--blob-count: want at least 1")
        if self.cold_ratio and not options.admin_token:
            raise ValueError("--cold-ratio needs --admin-token (CASPROXY_ADMIN_TOKEN): eviction is a DELETE")
        sizes = [parse_size(size) for size in options.blob_sizes.split(",") if size.strip()]
        if not sizes:
            raise ValueError("--blob-sizes: want at least one size")
        self.corpus = Corpus(options.blob_seed, options.blob_count, sizes)
        pool = random.Random(f"{options.blob_seed}/missing")
        self.miss_pool = [f"{pool.getrandbits(160):040x}" for _ in range(options.miss_pool)]
        self.upload_token = options.upload_token
        self.admin_token = options.admin_token
        self.think_time = options.think_time


def _ratio(value: float, flag: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{flag}: want a share between 0 and 1, got {value}")
    return value


settings: Settings | None = None


@events.test_start.add_listener
def _seed(environment: Environment, **_: Any) -> None:
    """Build the corpus on every node; upload it once, from the master (or the only) node."""
    global settings
    try:
        chosen = Settings(environment.parsed_options)
        if not isinstance(environment.runner, WorkerRunner):
            uploaded = seed(environment.host or "", chosen)
            total = sum(blob.size for blob in chosen.corpus.blobs)
            log.info("seeded %d blobs (%d bytes), %d of them uploaded now", len(chosen.corpus.blobs), total, uploaded)
        settings = chosen  # users start asking only now
    except (ValueError, requests.RequestException, SeedError) as error:
        log.error("casproxy load test cannot start: %s", error)
        environment.process_exit_code = 1
        if environment.runner is not None:
            gevent.spawn(environment.runner.quit)  # not from inside the runner's own start()


class SeedError(Exception):
    pass


def seed(host: str, chosen: Settings) -> int:
    """Upload the blobs the proxy lacks, 8 at a time; the number uploaded."""
    if not host:
        raise SeedError("no --host given")
    session = requests.Session()
    if chosen.upload_token:
        session.headers["Authorization"] = f"Bearer {chosen.upload_token}"
    corpus = chosen.corpus
    hashes = [blob.sha1 for blob in corpus.blobs]
    missing: list[str] = []
    for start in range(0, len(hashes), MISSING_BATCH):
        answer = session.post(f"{host}/sha1/missing", json={"hashes": hashes[start : start + MISSING_BATCH]})
        if answer.status_code != 200:
            raise SeedError(f"POST /sha1/missing: {answer.status_code} {answer.text[:200]}")
        missing += answer.json()["missing"]

    def upload(digest: str) -> str | None:
        """None, or what went wrong (returned, not raised: a failed greenlet prints a traceback)."""
        blob = corpus.by_hash[digest]
        try:
            answer = session.put(f"{host}/sha1/{digest}", data=corpus.data(blob.index, blob.size))
        except requests.RequestException as error:
            return f"PUT /sha1/{digest}: {error}"
        if answer.status_code not in (200, 201):
            return f"PUT /sha1/{digest}: {answer.status_code} {answer.text[:200]}"
        return None

    for problem in Pool(8).imap_unordered(upload, missing):
        if problem is not None:
            raise SeedError(problem)
    return len(missing)


class CasproxyUser(FastHttpUser):
    """One client in a closed loop: ask, check the answer, (think,) ask again."""

    def wait_time(self) -> float:
        return settings.think_time if settings else 0.0

    @task
    def read(self) -> None:
        if settings is None:  # seeding failed: the runner is quitting
            gevent.sleep(0.1)
            return
        if random.random() < settings.hit_ratio:
            blob = random.choice(settings.corpus.blobs)
            if settings.cold_ratio and random.random() < settings.cold_ratio:
                self.evict(blob.sha1)
            self.hit(blob)
        else:
            self.miss(random.choice(settings.miss_pool) if settings.miss_pool else f"{random.getrandbits(160):040x}")

    def hit(self, blob: Blob) -> None:
        with self.client.get(f"/sha1/{blob.sha1}", name=NAME, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"seeded blob: expected 200, got {_describe(response)}")
                return
            body = response.content or b""
            if len(body) != blob.size:
                response.failure(f"body of {len(body)} bytes, the blob has {blob.size}")
            elif hashlib.sha1(body).hexdigest() != blob.sha1:
                response.failure("body does not hash to the name it was asked by")
            else:
                response.success()

    def miss(self, digest: str) -> None:
        with self.client.get(f"/sha1/{digest}", name=NAME, catch_response=True) as response:
            if response.status_code == 404:
                response.success()  # the right answer for a blob nobody has
            else:
                response.failure(f"absent blob: expected 404, got {_describe(response)}")

    def evict(self, digest: str) -> None:
        assert settings is not None
        headers = {"Authorization": f"Bearer {settings.admin_token}"}
        with self.client.delete(f"/sha1/{digest}", name=NAME, headers=headers, catch_response=True) as response:
            if response.status_code == 204:
                response.success()
            else:
                response.failure(f"evict: expected 204, got {_describe(response)}")


def _describe(response: Any) -> str:
    if not response.status_code:
        return f"no answer ({response.error})"
    return f"{response.status_code} {(response.text or '')[:120]}"
