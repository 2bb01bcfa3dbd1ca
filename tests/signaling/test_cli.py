"""The command line as an operator uses it: flags, environment, the ready line, join links, shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from huddle.signaling import tokens

ENV = {k: v for k, v in os.environ.items() if not k.startswith("HUDDLE_")}


def huddle(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "huddle", *args],
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        **kw,
    )


def test_serve_help_explains_every_flag_and_its_variable() -> None:
    out = huddle("serve", "--help").stdout
    for flag, var in [
        ("--host", "HUDDLE_HOST"),
        ("--port", "HUDDLE_PORT"),
        ("--stun-port", "HUDDLE_STUN_PORT"),
        ("--media-port", "HUDDLE_MEDIA_PORT"),
        ("--secret", "HUDDLE_SECRET"),
        ("--log-level", "HUDDLE_LOG_LEVEL"),
    ]:
        assert flag in out and var in out, flag


@pytest.mark.parametrize("use_env", [False, True], ids=["flags", "environment"])
def test_serve_prints_one_ready_line_serves_and_stops_on_sigterm(use_env: bool) -> None:
    if use_env:
        args, env = [], {"HUDDLE_PORT": "0", "HUDDLE_STUN_PORT": "0", "HUDDLE_MEDIA_PORT": "0"}
    else:
        args, env = ["--port", "0", "--stun-port", "0", "--media-port", "0"], {"HUDDLE_PORT": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "huddle", "serve", *args],
        env={**ENV, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready" and set(ready) == {"event", "http", "stun", "media"}
        assert all(ready[k] > 0 for k in ("http", "stun", "media"))
        with urllib.request.urlopen(f"http://127.0.0.1:{ready['http']}/healthz", timeout=5) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert stdout == ""  # nothing but the ready line goes to stdout
    logs = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert any(entry["msg"] == "serving" for entry in logs)


def test_serve_refuses_a_bad_port_with_a_clear_message() -> None:
    result = huddle("serve", "--port", "70000")
    assert result.returncode == 2 and "--port must be 0-65535" in result.stderr


def test_token_prints_a_join_url_with_a_token_for_that_room() -> None:
    result = huddle(
        "token",
        "--room",
        "standup",
        "--identity",
        "ada",
        "--name",
        "Ada",
        "--ttl",
        "120",
        env={"HUDDLE_SECRET": "a secret of at least thirty-two bytes"},
    )
    assert result.returncode == 0, result.stderr
    url = urllib.parse.urlparse(result.stdout.strip())
    assert (url.scheme, url.netloc, url.path) == ("http", "127.0.0.1:8080", "/r/standup")
    token = urllib.parse.parse_qs(url.query)["token"][0]
    grant = tokens.verify("a secret of at least thirty-two bytes", token, "standup")
    assert (grant.identity, grant.name) == ("ada", "Ada")


def test_token_without_secret_says_what_to_do() -> None:
    result = huddle("token", "--room", "standup", "--identity", "ada")
    assert result.returncode == 2 and "HUDDLE_SECRET" in result.stderr


def _granted(result: subprocess.CompletedProcess, secret: str) -> tokens.Permissions:
    assert result.returncode == 0, result.stderr
    token = urllib.parse.parse_qs(urllib.parse.urlparse(result.stdout.strip()).query)["token"][0]
    return tokens.verify(secret, token, "standup").permissions


def test_token_grants_recording_and_downloads_only_when_asked() -> None:
    secret = "a secret of at least thirty-two bytes"
    env = {"HUDDLE_SECRET": secret}
    plain = _granted(huddle("token", "--room", "standup", "--identity", "ada", env=env), secret)
    assert plain == tokens.Permissions(publish=True, subscribe=True, record=False, download=False)
    asked = huddle(
        "token", "--room", "standup", "--identity", "ada", "--record", "--download", "--no-publish", env=env
    )
    assert _granted(asked, secret) == tokens.Permissions(publish=False, record=True, download=True)


def test_token_and_serve_read_the_secret_from_a_file(tmp_path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("a secret of at least thirty-two bytes\n")
    result = huddle("token", "--room", "standup", "--identity", "ada", "--secret-file", str(secret_file))
    assert _granted(result, "a secret of at least thirty-two bytes").publish
    missing = huddle(
        "token", "--room", "standup", "--identity", "ada", "--secret-file", str(tmp_path / "nope")
    )
    assert missing.returncode == 2 and "--secret-file" in missing.stderr

    proc = subprocess.Popen(
        [sys.executable, "-m", "huddle", "serve", "--port", "0", "--stun-port", "0", "--media-port", "0"],
        env={**ENV, "HUDDLE_SECRET_FILE": str(secret_file), "HUDDLE_RECORDINGS_DIR": str(tmp_path / "rec")},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        ready = json.loads(proc.stdout.readline())
        # A node with a secret keeps /metrics to the API key: so it did read the file.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{ready['http']}/metrics", timeout=5)
        assert refused.value.code == 403
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
