"""HTTPS and WSS on the HTTP port: with an operator's certificate, with --self-signed, behind --workers, and
the errors an operator sees for certificate files that cannot serve."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from huddle.cluster.placement import choose
from huddle.config import Settings
from huddle.node import Node

ENV = {k: v for k, v in os.environ.items() if not k.startswith("HUDDLE_")}
SERVE = (sys.executable, "-m", "huddle", "serve", "--port", "0", "--stun-port", "0", "--media-port", "0")
FINGERPRINT = re.compile(r"(?:[0-9A-F]{2}:){31}[0-9A-F]{2}")


# -- Certificates made by the test: a CA of its own and a server certificate it signed ----------------------


def _key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass
class Pki:
    ca: Path  # the CA's certificate: what a client trusts
    cert: Path  # the server's chain: its certificate, then the CA's
    key: Path
    other_key: Path  # a key of another certificate
    encrypted_key: Path  # the server's key under a passphrase


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Huddle test CA"))
        .issuer_name(_name("Huddle test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "fullchain.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    (folder / "privkey.pem").write_bytes(_key_pem(key))
    (folder / "other.key").write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
    (folder / "encrypted.key").write_bytes(_key_pem(key, b"correct horse"))
    return Pki(
        folder / "ca.pem",
        folder / "fullchain.pem",
        folder / "privkey.pem",
        folder / "other.key",
        folder / "encrypted.key",
    )


def trusting(cafile: Path) -> ssl.SSLContext:
    """A client context that trusts `cafile` only and checks the host name, as a browser does."""
    return ssl.create_default_context(cafile=str(cafile))


async def served_certificate(port: int) -> bytes:
    """The DER certificate the server on 127.0.0.1:`port` presents (not verified)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=context), 5)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    assert der is not None
    return der


def colon_hex(digest: bytes) -> str:
    return digest.hex(":").upper()


async def join(
    http: aiohttp.ClientSession, url: str, message: dict[str, Any]
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any], list[str]]:
    """What client.js does: join at `url`, follow redirects (with their ticket); the socket, `joined` and
    the redirect URLs followed."""
    followed: list[str] = []
    for _ in range(4):
        ws = await http.ws_connect(url, headers={"Origin": url.replace("wss://", "https://").split("/ws")[0]})
        await ws.send_str(json.dumps({**message, "id": "j"}))
        reply = json.loads(await ws.receive_str(timeout=5))
        if reply["type"] != "redirect":
            assert reply["type"] == "joined", reply
            return ws, reply, followed
        await ws.close()
        url = reply["url"]
        followed.append(url)
        if "ticket" in reply:
            message = {**message, "ticket": reply["ticket"]}
    raise AssertionError(f"more than 3 redirects: {followed}")


# -- A node with the operator's certificate ------------------------------------------------------------------


@pytest.fixture
async def tls_node(pki: Pki) -> AsyncIterator[tuple[Node, int]]:
    settings = Settings(
        port=0,
        stun_port=0,
        media_port=0,
        turn_tls_port=0,
        reconnect_grace=0,
        recordings_dir=tempfile.mkdtemp("-recordings"),
        tls_cert=str(pki.cert),
        tls_key=str(pki.key),
    )
    node = Node(settings)
    ports = await node.start()
    assert ports.scheme == "https"
    try:
        yield node, ports.http
    finally:
        await node.stop()


async def test_the_page_is_served_over_https_and_a_join_over_wss_gives_wss_doors(
    tls_node: tuple[Node, int], pki: Pki
) -> None:
    node, port = tls_node
    base = f"https://127.0.0.1:{port}"
    connector = aiohttp.TCPConnector(ssl=trusting(pki.ca))
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(base + "/r/tls-room") as resp:
            assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
            assert "<html" in (await resp.text()).lower()
        ws, joined, _ = await join(
            http, f"wss://127.0.0.1:{port}/ws", {"type": "join", "room": "tls-room", "name": "Ann"}
        )
        try:
            # Where the page reconnects and the URL it is redirected to are this node's, over WSS.
            assert joined["doors"][0] == f"wss://127.0.0.1:{port}/ws?node=local", joined["doors"]
            assert all(door.startswith("wss://") for door in joined["doors"])
            assert node.cluster is not None and node.cluster.me().url == base
            # The same certificate serves TURN over TLS, offered to the page.
            urls = [u for server in joined["ice_servers"] for u in server["urls"]]
            turns = [u for u in urls if u.startswith("turns:")]
            assert turns, urls
            turns_port = int(turns[0].split(":")[2].split("?")[0])
            assert await served_certificate(turns_port) == await served_certificate(port)
        finally:
            await ws.close()
    # The plain scheme on the TLS port gets no page.
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(aiohttp.ClientError):
            async with plain.get(f"http://127.0.0.1:{port}/healthz", timeout=aiohttp.ClientTimeout(5)) as r:
                await r.read()


# -- `huddle serve` as an operator runs it -------------------------------------------------------------------


@dataclass
class Served:
    proc: subprocess.Popen[str]
    ready: dict[str, Any]
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text()


def serve(tmp: Path, *args: str, name: str = "stderr") -> Served:
    stderr = tmp / name
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [*SERVE, "--turn-tls-port", "0", "--recordings-dir", str(tmp / "recordings"), *args],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=tmp,
        )
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if readable else ""
    if not line:
        proc.kill()
        proc.wait(5)
        raise AssertionError(f"no ready line; its log:\n{stderr.read_text()[-3000:]}")
    return Served(proc, json.loads(line), stderr)


def stop(served: Served) -> None:
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
    try:
        assert served.proc.wait(15) == 0
    finally:
        served.proc.kill()


@pytest.fixture
def running() -> Iterator[list[Served]]:
    servers: list[Served] = []
    yield servers
    for served in servers:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait(5)


def logged_fingerprint(log: str) -> str:
    lines = [json.loads(line) for line in log.splitlines() if "self-signed certificate" in line]
    assert len(lines) == 1, log
    assert FINGERPRINT.fullmatch(lines[0]["fingerprint"]), lines[0]
    return lines[0]["fingerprint"]


async def test_self_signed_covers_the_local_names_logs_its_fingerprint_and_survives_a_restart(
    tmp_path: Path, running: list[Served]
) -> None:
    first = serve(tmp_path, "--self-signed")
    running.append(first)
    assert first.ready["scheme"] == "https"
    port = first.ready["http"]
    der = await served_certificate(port)
    fingerprint = logged_fingerprint(first.log())
    assert colon_hex(hashlib.sha256(der).digest()) == fingerprint
    certificate = x509.load_der_x509_certificate(der)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert socket.gethostname() in names.get_values_for_type(x509.DNSName)
    # A client that trusts this certificate (as a browser does once its user accepted it) gets the page,
    # at either name.
    pem = tmp_path / "accepted.pem"
    pem.write_text(ssl.DER_cert_to_PEM_cert(der))
    connector = aiohttp.TCPConnector(ssl=trusting(pem))
    async with aiohttp.ClientSession(connector=connector) as http:
        for host in ("127.0.0.1", "localhost"):
            async with http.get(f"https://{host}:{port}/r/lan") as resp:
                assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
        ws, joined, _ = await join(
            http, f"wss://localhost:{port}/ws", {"type": "join", "room": "lan", "name": "Ann"}
        )
        await ws.close()
    assert joined["doors"][0].startswith(f"wss://127.0.0.1:{port}/ws")
    # TURN over TLS runs with the same certificate.
    tls_ports = [
        json.loads(line).get("tls_port") for line in first.log().splitlines() if "TURN relay" in line
    ]
    assert tls_ports and tls_ports[0], first.log()
    assert await served_certificate(tls_ports[0]) == der
    stop(first)

    # Restarted: the same certificate, so a browser that accepted it is not asked again.
    second = serve(tmp_path, "--self-signed", name="stderr2")
    running.append(second)
    assert await served_certificate(second.ready["http"]) == der
    assert logged_fingerprint(second.log()) == fingerprint
    stop(second)

    # Another name to cover (--announce-ip): a new certificate that covers it.
    third = serve(tmp_path, "--self-signed", "--announce-ip", "127.0.0.2", name="stderr3")
    running.append(third)
    renewed = x509.load_der_x509_certificate(await served_certificate(third.ready["http"]))
    addresses = renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.2") in addresses.get_values_for_type(x509.IPAddress)
    assert logged_fingerprint(third.log()) != fingerprint
    stop(third)


def test_an_expired_self_signed_certificate_is_made_anew(tmp_path: Path) -> None:
    from huddle import tls

    path = tmp_path / "self-signed.pem"
    names = ("localhost", "127.0.0.1")
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=tls.SELF_SIGNED_DAYS + 1)
    assert tls.self_signed(path, names, now=long_ago)
    old = path.read_bytes()
    assert oct(path.stat().st_mode & 0o777) == "0o600"  # the key is in it
    assert tls.self_signed(path, names)
    assert path.read_bytes() != old
    assert not tls.self_signed(path, names)


# -- Errors at start -----------------------------------------------------------------------------------------


def huddle_serve(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SERVE, "--recordings-dir", str(tmp / "recordings"), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp,
    )


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", r"--tls-cert \S+/nowhere\.pem: no such file\..*--self-signed"),
        ("not pem", r"--tls-cert \S+: no PEM certificate in it.*openssl x509 -inform der"),
        ("other key", r"--tls-key \S+/other\.key does not belong to the certificate in --tls-cert"),
        ("passphrase", r"--tls-key \S+: the key is protected by a passphrase.*openssl pkey"),
        ("unreadable", r"--tls-key \S+: permission denied to the user running huddle"),
    ],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_certificate_files_that_cannot_serve_stop_the_start_with_what_to_do(
    tmp_path: Path, pki: Pki, case: str, expected: str, workers: str
) -> None:
    cert, key = str(pki.cert), str(pki.key)
    if case == "missing":
        cert = str(tmp_path / "nowhere.pem")
    elif case == "not pem":
        cert = str(tmp_path / "cert.der")
        Path(cert).write_bytes(
            x509.load_pem_x509_certificate(pki.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
        )
    elif case == "other key":
        key = str(pki.other_key)
    elif case == "passphrase":
        key = str(pki.encrypted_key)
    elif case == "unreadable":
        if os.getuid() == 0:
            pytest.skip("root reads any file")
        key = str(tmp_path / "locked.key")
        Path(key).write_bytes(pki.key.read_bytes())
        os.chmod(key, 0)
    result = huddle_serve(tmp_path, "--workers", workers, "--tls-cert", cert, "--tls-key", key)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""  # no ready line
    assert re.search(expected, result.stderr, re.S), result.stderr
    assert "Traceback" not in result.stderr


def test_self_signed_and_a_certificate_together_are_refused(tmp_path: Path, pki: Pki) -> None:
    result = huddle_serve(tmp_path, "--self-signed", "--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
    assert result.returncode == 2
    assert "--self-signed makes its own certificate" in result.stderr


# -- --workers: TLS at the parent ---------------------------------------------------------------------------


async def test_workers_serve_tls_at_the_parent_and_a_call_over_two_workers_is_one_call(
    tmp_path: Path, running: list[Served]
) -> None:
    served = serve(tmp_path, "--workers", "2", "--self-signed", "--max-participants-per-node", "1")
    running.append(served)
    assert served.ready["scheme"] == "https"
    port = served.ready["http"]
    der = await served_certificate(port)
    pem = tmp_path / "accepted.pem"
    pem.write_text(ssl.DER_cert_to_PEM_cert(der))
    # Made once, by the parent: one fingerprint in the log, the workers' TURN over TLS serves the same.
    logged_fingerprint(served.log())
    connector = aiohttp.TCPConnector(ssl=trusting(pem))
    base = f"wss://127.0.0.1:{port}/ws"
    room = next(n for n in (f"tls-{i}" for i in range(1000)) if choose(n, ("w0", "w1")) == "w1")
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"https://127.0.0.1:{port}/r/{room}") as resp:
            assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
        first, joined, followed = await join(http, base, {"type": "join", "room": room, "name": "Ann"})
        # Sent from w0 to the call's home w1, over WSS at the one public port.
        assert followed == [f"wss://127.0.0.1:{port}/ws?node=w1"]
        assert joined["doors"] == [f"wss://127.0.0.1:{port}/ws?node=w1", f"wss://127.0.0.1:{port}/ws?node=w0"]
        turns = [u for s in joined["ice_servers"] for u in s["urls"] if u.startswith("turns:")]
        assert turns and await served_certificate(int(turns[0].split(":")[2].split("?")[0])) == der
        # The home seats one: Bob goes on to w0, which links to w1 through the parent (worker to worker,
        # plain on the loopback), and Ann hears of him over that link.
        second, _, followed = await join(http, base, {"type": "join", "room": room, "name": "Bob"})
        assert followed[-1] == f"wss://127.0.0.1:{port}/ws?node=w0", followed
        try:
            deadline = time.monotonic() + 15
            while True:
                remaining = deadline - time.monotonic()
                assert remaining > 0, "Ann never heard that Bob joined on the other worker"
                message = json.loads(await first.receive_str(timeout=remaining))
                if message["type"] == "participant_joined" and message["participant"]["name"] == "Bob":
                    break
        finally:
            await first.close()
            await second.close()
    await asyncio.to_thread(stop, served)
