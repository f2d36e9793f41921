"""/openapi.json: a valid OpenAPI 3.1 document naming every route, and a bounded schemathesis run
against a live `casproxy serve`: no 5xx, and every status code and content type documented."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    status_code_conformance,
    unsupported_method,
)

from proxy.config import load_config
from proxy.server.app import create_app
from proxy.server.openapi import openapi
from tests.conftest import free_port, write_config
from tests.processes import ProxyProcess

EXAMPLES = 12  # per operation, plus examples and edge cases: about 800 cases in ~25 s
schema = schemathesis.openapi.from_dict(openapi())
cases = 0


def test_the_document_is_valid_openapi() -> None:
    validate(openapi())


def test_every_route_is_documented_with_its_methods(tmp_path: Path) -> None:
    config = load_config(str(write_config(tmp_path / "c.toml", [])), environ={})
    documented = {path: {m.upper() for m in item} for path, item in openapi()["paths"].items()}
    for route in create_app(config).router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        path = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)
        if "{rest}" in path or path.startswith("/{repo}") or route.method == "*":  # 400s, 405s; the LFS alias
            continue
        method = "GET" if route.method == "HEAD" else route.method  # add_get's implicit HEAD
        assert method in documented.get(path, set()), f"{route.method} {path} is not in /openapi.json"


def test_hash_patterns_are_per_algorithm() -> None:
    paths = openapi()["paths"]
    for algorithm, length in (("sha1", 40), ("sha256", 64)):
        [name] = [p for p in paths[f"/{algorithm}/{{hash}}"]["get"]["parameters"] if p["name"] == "hash"]
        pattern = re.compile(name["schema"]["pattern"])
        assert pattern.fullmatch("a" * length) and not pattern.fullmatch("a" * (104 - length))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("schemathesis")
    (folder / "blobs").mkdir()
    for empty in (hashlib.sha1(b"").hexdigest(), hashlib.sha256(b"").hexdigest()):  # the document's examples
        (folder / "blobs" / empty).write_bytes(b"")
    port = free_port()
    tiers = [
        {"name": "disk", "kind": "disk", "role": "cache", "path": str(folder / "cache"), "size_limit": "64 MiB"},
        {"name": "local", "kind": "fs", "role": "source", "path": str(folder / "blobs")},
    ]
    config = write_config(
        folder / "config.toml",
        tiers,
        server={"host": "127.0.0.1", "port": port, "max_upload_size": "1 MiB"},
        uploads={"targets": ["local"]},
        cors={"allow_origins": ["http://app.example"]},
    )
    proxy = ProxyProcess(config, port, folder / "log")
    proxy.start()
    deadline = time.monotonic() + 60
    while True:
        assert proxy.process is not None and proxy.process.poll() is None, (folder / "log").read_text()
        try:
            if requests.get(f"{proxy.url}/healthz", timeout=5).status_code == 200:
                break
        except (requests.ConnectionError, requests.Timeout):  # bound, tiers still starting
            pass
        assert time.monotonic() < deadline, (folder / "log").read_text()
        time.sleep(0.05)
    yield proxy.url
    proxy.stop()
    log = (folder / "log").read_text()
    assert "Traceback" not in log, log


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases every run: a failure reproduces, a pass stays a pass
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_under_generated_requests(case: schemathesis.Case[Any], live: str) -> None:
    global cases
    cases += 1
    case.call_and_validate(
        base_url=live,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, unsupported_method],
        timeout=30,
    )


def test_the_run_was_not_empty() -> None:
    # Runs after the schemathesis tests (file order): their case count, for the record.
    print(f"schemathesis: {cases} cases")
    assert cases >= 100
