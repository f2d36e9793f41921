"""Configuration: defaults < file < CASPROXY_* env < flags; errors name the key and the file."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from proxy.config import load_config, redacted
from proxy.errors import ConfigError
from proxy.schema import convert
from proxy.tiers.kinds import KINDS
from tests.conftest import write_config

REPO = Path(__file__).resolve().parent.parent


def test_embedded_default_runs_with_no_cloud_account(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    config = load_config(environ={})
    assert [(t.name, t.kind, t.role) for t in config.tiers] == [("disk", "disk", "cache"), ("local", "fs", "source")]
    assert config.server.port == 8080
    assert config.server.stream_threshold == 4 << 20
    assert config.uploads.targets == ("local",)


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.toml",
        [
            {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "c")},
            {"name": "local", "kind": "fs", "path": str(tmp_path / "b")},
        ],
        server={"port": 9001, "host": "127.0.0.2"},
        negative_cache={"ttl": "2m"},
    )
    env = {
        "CASPROXY_SERVER__PORT": "9002",
        "CASPROXY_TIERS__DISK__SIZE_LIMIT": "1 GiB",
        "CASPROXY_NEGATIVE_CACHE__URL": "memory://",
    }
    config = load_config(str(path), environ=env, overrides={"server": {"host": "0.0.0.0", "port": None}})
    assert config.server.port == 9002  # env beats file
    assert config.server.host == "0.0.0.0"  # flag beats file; a flag left unset (None) changes nothing
    assert config.negative_cache.ttl == 120
    assert config.tier("disk").options["size_limit"] == 1 << 30


def test_env_references_resolve_secrets(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.toml",
        [{"name": "local", "kind": "fs", "path": str(tmp_path)}],
        auth={"upload_tokens": ["env:MY_TOKEN"], "ticket_secret": "env:MY_SECRET"},
    )
    config = load_config(str(path), environ={"MY_TOKEN": "t0ken", "MY_SECRET": "s3cret-s3cret-s3cret"})
    assert config.auth.upload_tokens == ("t0ken",)
    shown = json.dumps(redacted(config))
    assert "t0ken" not in shown and "s3cret-s3cret-s3cret" not in shown
    with pytest.raises(ConfigError, match=r"auth.upload_tokens\[0\].*MY_TOKEN"):
        load_config(str(path), environ={"MY_SECRET": "x"})
    with pytest.raises(ConfigError, match=r"auth.upload_tokens\[0\]: empty token"):
        load_config(str(path), environ={"MY_TOKEN": "", "MY_SECRET": "s3cret-s3cret-s3cret"})


def test_check_config_masks_header_secrets_and_url_passwords(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.toml",
        [
            {
                "name": "cdn",
                "kind": "http",
                "url": "https://user:urlpass@cdn.example/{hash}",
                "headers": {"Authorization": "Bearer hdrsecret", "X-Api-Key": "keysecret"},
            }
        ],
        negative_cache={"url": "redis://:redispass@127.0.0.1:6379/0"},
    )
    shown = json.dumps(redacted(load_config(str(path), environ={})))
    for secret in ("urlpass", "hdrsecret", "keysecret", "redispass"):
        assert secret not in shown
    assert "cdn.example" in shown and "127.0.0.1:6379" in shown


@pytest.mark.parametrize(
    ("sections", "tiers", "message"),
    [
        ({"server": {"prot": 1}}, None, r"server\.prot: unknown key"),
        ({"server": {"port": "eighty"}}, None, r"server\.port: .*whole number"),
        ({"server": {"stream_threshold": "4 parsecs"}}, None, r"server\.stream_threshold: .*not a size"),
        ({"negative_cache": {"ttl": "soon"}}, None, r"negative_cache\.ttl: .*not a duration"),
        ({"server": {"log_format": "xml"}}, None, r"server\.log_format: .*one of"),
        ({"servr": {}}, None, r"unknown section"),
        ({}, [{"name": "x", "kind": "ftp"}], r"tiers\[0\] \(x\)\.kind: unknown kind 'ftp'"),
        ({}, [{"name": "x", "kind": "fs"}], r"tiers\[0\] \(x\)\.path: required"),
        ({}, [{"name": "x", "kind": "fs", "path": "/tmp", "colour": "red"}], r"\.colour: unknown key for kind 'fs'"),
        ({}, [{"name": "x", "kind": "disk", "path": "/tmp", "size_limit": "big"}], r"\.size_limit: .*not a size"),
        ({}, [{"name": "x", "kind": "fs", "path": "/tmp", "role": "boss"}], r"tiers\[0\] \(x\)\.role: .*one of"),
        ({"uploads": {"targets": ["nowhere"]}}, [{"name": "x", "kind": "fs", "path": "/tmp"}], r"no tier named"),
        ({}, [{"name": "x", "kind": "fs", "path": "/a"}, {"name": "x", "kind": "fs", "path": "/b"}], r"two tiers"),
    ],
)
def test_bad_values_name_the_key_and_the_file(
    tmp_path: Path, sections: dict[str, dict[str, object]], tiers: list[dict[str, object]] | None, message: str
) -> None:
    tiers = tiers or [{"name": "local", "kind": "fs", "path": str(tmp_path)}]
    if "uploads" not in sections:
        sections = {**sections, "uploads": {"targets": [tiers[0]["name"]]}}
    path = write_config(tmp_path / "bad.toml", tiers, **sections)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(str(path), environ={})
    assert "bad.toml" in str(caught.value)


def test_check_config_prints_resolved_config_and_fails_in_one_line(tmp_path: Path) -> None:
    good = write_config(
        tmp_path / "good.toml",
        [{"name": "local", "kind": "fs", "path": str(tmp_path)}],
        uploads={"targets": ["local"]},
        auth={"ticket_secret": "hush-hush-hush-hush"},
    )
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "-c", str(good)], capture_output=True, text=True, check=True
    )
    shown = json.loads(out.stdout)
    assert shown["tiers"][0]["path"] == str(tmp_path) and shown["auth"]["ticket_secret"] == "***"

    bad = write_config(tmp_path / "bad.toml", [{"name": "local", "kind": "fs", "path": str(tmp_path), "x": 1}])
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "-c", str(bad)], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "tiers[0] (local).x: unknown key" in out.stderr


def test_a_bad_value_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", [{"name": "disk", "kind": "disk", "path": str(tmp_path)}])
    with pytest.raises(ConfigError, match=r"server\.port: .*whole number.*c\.toml.*set by CASPROXY_SERVER__PORT"):
        load_config(str(path), environ={"CASPROXY_SERVER__PORT": "eighty"})
    with pytest.raises(ConfigError, match=r"\(disk\)\.size_limit: .*set by CASPROXY_TIERS__DISK__SIZE_LIMIT"):
        load_config(str(path), environ={"CASPROXY_TIERS__DISK__SIZE_LIMIT": "huge"})


def test_new_keys_are_parsed_and_checked(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.toml",
        [{"name": "local", "kind": "fs", "path": str(tmp_path), "min_rate": "1 MiB", "layout": "sharded"}],
        server={"max_blob_size": "1 GiB", "metrics_port": 9100},
        cors={"allow_origins": ["https://app.example.com"], "max_age": "1m"},
        coalesce={"url": "redis://127.0.0.1:6379/0", "wait": "5s"},
        jobs={"allow": ["s3://bucket/exports/", "/srv/exports/"]},
    )
    config = load_config(str(path), environ={})
    assert (config.server.max_blob_size, config.server.metrics_port) == (1 << 30, 9100)
    assert config.cors.allow_origins == ("https://app.example.com",) and config.cors.max_age == 60
    assert config.coalesce.wait == 5 and config.jobs.allow == ("s3://bucket/exports/", "/srv/exports/")
    assert config.tier("local").min_rate == 1 << 20 and config.tier("local").options["layout"] == "sharded"
    with pytest.raises(ConfigError, match=r"server\.metrics_port: 70000 is not a port"):
        load_config(str(path), environ={"CASPROXY_SERVER__METRICS_PORT": "70000"})
    with pytest.raises(ConfigError, match=r"coalesce\.url: .*redis"):
        load_config(str(path), environ={"CASPROXY_COALESCE__URL": "memcached://x"})


@pytest.mark.parametrize("kind", ["disk", "fs", "s3", "gcs", "http"])
def test_a_kinds_schema_defaults_are_its_constructors(kind: str) -> None:
    """The library (constructors) and the config (schema) agree on every default they share."""
    schema = KINDS[kind].config
    hints = typing.get_type_hints(schema, include_extras=True)
    parameters = inspect.signature(KINDS[kind].load().__init__).parameters
    for key in dataclasses.fields(schema):
        if key.name in parameters and key.name not in ("role", "name") and key.default is not dataclasses.MISSING:
            default = parameters[key.name].default
            expected = default if default is None else convert(default, hints[key.name])
            assert key.default == expected, key.name
