"""deploy/regional/ is wired together: its casproxy configs load with casproxy's own loader and
coalesce through Redis in front of a shared bucket, and nginx's upstream lists exactly the nodes
the compose file and the StatefulSet run. (tests/test_fleet_nginx.py runs its nginx.conf.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from proxy.config import Config, load_config

REGIONAL = Path(__file__).resolve().parent.parent / "deploy" / "regional"
SECRETS = ("CASPROXY_UPLOAD_TOKEN", "CASPROXY_ADMIN_TOKEN", "CASPROXY_TICKET_SECRET")


def upstream_servers(nginx_conf: str) -> list[str]:
    block = nginx_conf.split("upstream casproxy {")[1].split("}")[0]
    assert "hash $uri consistent;" in block
    return re.findall(r"^\s*server (\S+)", block, re.M)


def check_regional(config: Config) -> None:
    """Own disk first, then a bucket every node shares, then the origin; Redis for both."""
    tiers = [(tier.kind, tier.role) for tier in config.tiers]
    assert tiers == [("disk", "cache"), ("s3", "cache"), ("http", "source")]
    assert config.coalesce.url.startswith("redis://")
    assert config.negative_cache.url.startswith("redis://")
    assert config.coalesce.url.rsplit(":", 1)[0] == config.negative_cache.url.rsplit(":", 1)[0]  # one Redis
    assert config.auth.ticket_secret, "every node must check every node's tickets"


def test_compose_runs_the_nodes_nginx_hashes_over(tmp_path: Path) -> None:
    compose: dict[str, Any] = yaml.safe_load((REGIONAL / "compose.yaml").read_text())
    nodes = sorted(name for name in compose["services"] if name.startswith("casproxy-"))
    assert len(nodes) >= 2
    assert upstream_servers((REGIONAL / "nginx.conf").read_text()) == [f"{node}:8080" for node in nodes]
    for node in nodes:
        service = compose["services"][node]
        assert "./config.toml:/etc/casproxy/config.toml:ro" in service["volumes"]
        assert set(SECRETS) | {"CASPROXY_ORIGIN_URL"} <= set(service["environment"])
    assert len({compose["services"][node]["volumes"][1] for node in nodes}) == len(nodes), "a cache volume each"
    environ = dict.fromkeys(SECRETS, "x" * 32) | {"S3_ACCESS_KEY_ID": "k", "S3_SECRET_ACCESS_KEY": "s"}
    environ["CASPROXY_ORIGIN_URL"] = "https://origin.example.com/blobs/{hash}"
    config = load_config(str(REGIONAL / "config.toml"), environ=environ)
    check_regional(config)
    assert config.coalesce.url.startswith("redis://redis:")
    assert "redis" in compose["services"]


def test_kubernetes_statefulset_names_are_nginx_upstream(tmp_path: Path) -> None:
    documents = list(yaml.safe_load_all((REGIONAL / "kubernetes.yaml").read_text()))
    by_name = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}
    nodes = by_name[("StatefulSet", "casproxy")]
    headless = by_name[("Service", nodes["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= nodes["spec"]["template"]["metadata"]["labels"].items()
    names = [
        f"casproxy-{index}.{headless['metadata']['name']}.default.svc.cluster.local:8080"
        for index in range(nodes["spec"]["replicas"])
    ]
    nginx = by_name[("ConfigMap", "casproxy-regional-nginx")]["data"]["nginx.conf"]
    assert upstream_servers(nginx) == names

    path = tmp_path / "config.toml"
    path.write_text(by_name[("ConfigMap", "casproxy-regional-config")]["data"]["config.toml"])
    config = load_config(str(path), environ=dict.fromkeys(SECRETS, "x" * 32))
    check_regional(config)
    redis_service = config.coalesce.url.removeprefix("redis://").split(":")[0]
    assert ("Service", redis_service) in by_name
    mounts = {m["mountPath"] for m in nodes["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert config.tiers[0].options["path"].startswith(tuple(mounts))
