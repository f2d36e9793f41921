"""A user's mistakes through the real ``casproxy`` command: one line on stderr naming the key or
flag, a non-zero exit, never a traceback (SPEC 6). And an honest start-up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from proxy.config import load_config, reference
from tests.conftest import write_config
from tests.processes import casproxy

REPO = Path(__file__).resolve().parent.parent
HASH = "a" * 40


def _config(folder: Path, **sections: dict[str, object]) -> str:
    tiers: list[dict[str, object]] = [
        {"name": "disk", "kind": "disk", "path": str(folder / "cache")},
        {"name": "local", "kind": "fs", "path": str(folder / "blobs")},
    ]
    return str(write_config(folder / "config.toml", tiers, **sections))


MISTAKES: list[tuple[str, list[str], dict[str, dict[str, object]], str]] = [
    ("port too large", ["serve", "--port", "70000"], {}, "--port"),
    ("negative port", ["serve", "--port", "-1"], {}, "--port"),
    ("port in the file", ["check-config"], {"server": {"port": 70000}}, "server.port"),
    ("short secret, serve", ["serve"], {"auth": {"ticket_secret": "s3cr3t"}}, "auth.ticket_secret"),
    ("short secret, check", ["check-config"], {"auth": {"ticket_secret": "s3cr3t"}}, "auth.ticket_secret"),
    ("short secret, ticket", ["ticket", HASH], {"auth": {"ticket_secret": "s3cr3t"}}, "auth.ticket_secret"),
    ("ttl not a duration", ["ticket", HASH, "--ttl", "forever"], {}, "--ttl"),
    ("negative ttl", ["ticket", HASH, "--ttl", "-5"], {}, "--ttl"),
    ("bad host", ["serve", "--host", "no such host"], {}, "server.host"),
    ("bad host, check", ["check-config"], {"server": {"host": "256.1.1.1"}}, "server.host"),
    ("open to the network", ["check-config"], {"server": {"host": "0.0.0.0"}}, "auth.upload_tokens"),
    ("not a url", ["get", HASH, "--url", "notaurl"], {}, "--url"),
    ("bad cors origin", ["check-config"], {"cors": {"allow_origins": ["app.example.com"]}}, "cors.allow_origins[0]"),
    ("jobs place", ["check-config"], {"jobs": {"allow": ["exports"]}}, "jobs.allow[0]"),
    ("bad workers", ["serve", "--workers", "0"], {}, "--workers"),
    ("unknown key", ["check-config"], {"coalesce": {"wiat": "1s"}}, "coalesce.wiat"),
]


@pytest.mark.parametrize(("args", "sections", "named"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_a_mistake_is_one_line_naming_the_key_or_flag(
    tmp_path: Path, args: list[str], sections: dict[str, dict[str, object]], named: str
) -> None:
    config = [] if args[0] in ("get", "put") else ["-c", _config(tmp_path, **sections)]
    out = casproxy(*args, *config, cwd=tmp_path)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert named in out.stderr


@pytest.mark.parametrize("command", [["check-config"], ["cache", "stats"], ["serve"]])
def test_a_cache_path_that_is_a_file_names_the_tier_and_key(tmp_path: Path, command: list[str]) -> None:
    config = _config(tmp_path)
    (tmp_path / "cache").write_text("not a folder")
    out = casproxy(*command, "-c", config, cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "tiers[0] (disk).path:" in out.stderr and "is a file, not a folder" in out.stderr


def test_a_folder_that_cannot_be_created_names_the_tier_and_key(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    config = write_config(tmp_path / "c.toml", [{"name": "local", "kind": "fs", "path": str(tmp_path / "file/sub")}])
    out = casproxy("check-config", "-c", str(config), cwd=tmp_path)
    assert out.returncode == 2 and "tiers[0] (local).path: cannot create" in out.stderr


def test_serve_says_serving_on_the_real_port_once_it_answers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASPROXY_")}
    command = [sys.executable, "-m", "proxy", "serve", "--port", "0"]  # no config file here
    server = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        deadline = time.monotonic() + 60
        said: list[str] = []
        while not said or "serving on" not in said[-1]:
            assert time.monotonic() < deadline
            said.append(server.stderr.readline())
            assert said[-1], f"the server ended before saying it serves: {said}"
        found = re.search(r"serving on http://127\.0\.0\.1:(\d+)", said[-1])
        assert found and found.group(1) != "0", said[-1]
        with urllib.request.urlopen(f"http://127.0.0.1:{found.group(1)}/healthz", timeout=10) as answer:
            assert answer.status == 200
        told = "".join(said[:-1])
        assert "built-in defaults" in told and str(tmp_path / "data" / "cache") in told
    finally:
        server.terminate()
        server.wait(30)


def test_no_config_file_says_it_runs_on_built_in_defaults(tmp_path: Path) -> None:
    out = casproxy("check-config", cwd=tmp_path)
    assert out.returncode == 0 and '"source": "built-in defaults"' in out.stdout


def test_config_defaults_is_the_complete_default_config(tmp_path: Path) -> None:
    out = casproxy("config", "--defaults", cwd=tmp_path)
    assert out.returncode == 0
    (tmp_path / "defaults.toml").write_text(out.stdout)
    assert tomllib.loads(out.stdout)  # valid TOML, as printed
    # read back, it is exactly the built-in default
    assert load_config(str(tmp_path / "defaults.toml"), environ={}).tiers == load_config(environ={}).tiers
    for key in ("max_blob_size", "metrics_port", "allow_origins", "CASPROXY_COALESCE__WAIT", 'kind = "s3"'):
        assert key in out.stdout


def test_the_readme_configuration_section_is_config_defaults() -> None:
    readme = (REPO / "README.md").read_text()
    assert f"```toml\n{reference()}```" in readme, "README's reference differs: paste `casproxy config --defaults`"


def test_serve_help_points_to_the_reference(tmp_path: Path) -> None:
    assert "casproxy config --defaults" in casproxy("serve", "--help", cwd=tmp_path).stdout


def test_ctrl_c_while_a_command_loads_is_not_a_traceback(tmp_path: Path) -> None:
    # Deterministic stand-in for Ctrl-C in the first second: the interrupt arrives while the
    # command imports the config module.
    code = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'proxy.config':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from proxy.cli import main\n"
        "sys.exit(main(['check-config']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 130 and "Traceback" not in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_cache_folder_of_another_user_is_named_as_such(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (tmp_path / "cache").mkdir(mode=0o700)
    os.chown(tmp_path / "cache", 12345, 12345)
    out = casproxy("check-config", "-c", config, cwd=tmp_path)
    assert out.returncode == 2 and "tiers[0] (disk).path:" in out.stderr
    assert "belongs to another user (uid 12345)" in out.stderr and "writable by others" not in out.stderr


def test_workers_on_port_0_share_the_one_real_port(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASPROXY_")}
    command = [sys.executable, "-m", "proxy", "serve", "--port", "0", "--workers", "2", "-c", _config(tmp_path)]
    server = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        ports: set[str] = set()
        deadline = time.monotonic() + 120
        serving = 0
        while serving < 2 and time.monotonic() < deadline:
            line = server.stderr.readline()
            assert line, "the server ended before its workers said they serve"
            found = re.search(r"worker \d serving on http://127\.0\.0\.1:(\d+)", line)
            if found:
                serving += 1
                ports.add(found.group(1))
        assert serving == 2 and len(ports) == 1 and ports != {"0"}
    finally:
        server.terminate()
        server.wait(60)
