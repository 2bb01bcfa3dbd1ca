"""A real ZooKeeper for the cluster tests: the Debian server, standalone on 127.0.0.1, with a short tick.

Faults are real: stop() is kill -9, pause()/resume() are SIGSTOP/SIGCONT (the server still holds its port, so
clients see a silent server, as behind a dropped link), restart() starts it again on the same port and data
directory, so that sessions and znodes survive as they would across a real ZooKeeper restart. A Relay cuts one
client off while the others still reach the server.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

JAVA = [
    "java",
    "-Xms32m",
    "-Xmx128m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-cp",
    "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar",
    "org.apache.zookeeper.server.quorum.QuorumPeerMain",
]
TICK_MS = 500


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def four_letters(port: int, word: str, timeout: float = 1.0) -> str:
    """A ZooKeeper four-letter command's answer ('' when the server does not answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(word.encode())
            chunks = []
            while chunk := s.recv(4096):
                chunks.append(chunk)
            return b"".join(chunks).decode(errors="replace")
    except OSError:
        return ""


class ZooKeeperServer:
    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.data_dir = directory / "data"
        self.log_path = directory / "zookeeper.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.directory / "zoo.cfg"
        config.write_text(
            f"tickTime={TICK_MS}\n"
            "minSessionTimeout=1000\n"
            f"dataDir={self.data_dir}\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n"
            "4lw.commands.whitelist=ruok,stat,srvr,mntr\n"
            "maxClientCnxns=0\n"
        )
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([*JAVA, str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        # `ruok` answers before the server serves clients; `srvr` shows a Mode only once it does.
        while "Mode:" not in four_letters(self.port, "srvr", timeout=0.5):
            if self.proc.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ZooKeeper did not serve within {timeout} s: {self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """kill -9: no goodbye to the clients, as when the machine dies."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, down: float = 0.0) -> None:
        """Kill and start again on the same port and data directory (`down` seconds in between)."""
        self.stop()
        time.sleep(down)
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


RELAY = r"""
import socket, sys, threading

target = (sys.argv[1], int(sys.argv[2]))
listener = socket.create_server(("127.0.0.1", int(sys.argv[3])))
print(listener.getsockname()[1], flush=True)


def pump(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(client):
    try:
        upstream = socket.create_connection(target)
    except OSError:
        client.close()
        return
    threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
    threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class Relay:
    """A TCP relay process in front of ZooKeeper for one client: SIGSTOP it to cut that client off silently
    (its connection stays open and nothing answers, as with a paused server or a dropped link), while other
    clients still reach ZooKeeper directly."""

    def __init__(self, server: ZooKeeperServer, port: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RELAY, "127.0.0.1", str(server.port), str(port)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        if not ready:
            self.stop()
            raise RuntimeError("the relay did not start")
        self.port = int(self.proc.stdout.readline())

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """kill -9: every connection through it is reset at once, as when ZooKeeper's machine reboots."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)
