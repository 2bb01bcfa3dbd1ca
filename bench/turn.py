"""TURN relay figures for `make bench` (issue 14): relayed packets per CPU-second and the delay a relay adds,
ours (`huddle serve`) side by side with coturn (Debian `coturn`, `turnserver`) under the same load.

    scripts/in-netns .venv/bin/python -m bench.turn            # ~2.5 minutes
    scripts/in-netns .venv/bin/python -m bench.turn --quick    # ~1 minute
    scripts/in-netns .venv/bin/python -m bench.run --only turn --no-janus

Both servers run as child processes for the whole section, on 127.0.0.1 (IPv4 for everything), with the same
time-limited credentials secret (coturn: `--use-auth-secret`), and coturn with its defaults otherwise (one
relay thread per CPU). Ours gets a per-allocation bandwidth cap far above the load, as coturn has none.

The load generator is this module's, in one thread of the bench process: N TURN clients over UDP, each with
its own socket, allocating, creating a permission and binding a channel to one UDP echo socket (the peer),
then sending ChannelData at a fixed rate, round robin, with 1,200-byte payloads that carry their send time.
The echo sends every datagram back to where it came from: through the relay again, so each round trip is
two relayed packets (client -> peer and peer -> client). Every fourth send, that client also sends the same
payload straight to the echo from a second socket: the direct round trip, at the same moments, through the
same generator loop, without the relay.

Per window, over the packets sent in it (a warm-up before, a drain after): relayed packets (those the echo
received through the relay plus those the clients received back) per CPU-second of the server process (its
process CPU clock: every thread, in ns, where /proc/PID/stat counts 10 ms ticks), loss (round trips that
did not come back), and the round-trip percentiles through the relay and direct; the added delay is their
difference, per run. Windows alternate, ours then coturn's, `runs` times per load; each figure is the median
of the runs with their range, and a ratio ours/coturn is called a difference only where the ranges do not
overlap. Before the loads, each server's CPU with nothing to do (its timers), over the same span. Then a
bounded search per server for the highest rate with < 1 % loss: rates doubling from twice the heavy load
until one fails, then halving the gap between the best pass and the lowest failure, one window per step.

The generator, the echo and the server share this machine's 2 cores: the generator thread's CPU is reported
with each figure, and a failure where the generator fell behind its schedule (or most of the loss was in its
own sockets' receive buffers, /proc/net/udp drops) is put down to the generator, not to the relay.

Everything is bounded: process starts, each request's retries, each window's length, the run and step
counts, and a deadline over the section.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import secrets
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.cluster import RESULTS, Serve, cpu_seconds, save_results, terminate
from huddle.stun.message import (
    BINDING,
    ERROR_CODE,
    NONCE,
    REALM,
    USERNAME,
    Attribute,
    MessageClass,
    StunError,
    StunMessage,
    decode_error_code,
    encode,
    encode_username,
    parse,
)
from huddle.turn.attributes import (
    ALLOCATE,
    CHANNEL_BIND,
    CHANNEL_MIN,
    CHANNEL_NUMBER,
    CREATE_PERMISSION,
    LIFETIME,
    REQUESTED_TRANSPORT,
    TRANSPORT_UDP,
    XOR_PEER_ADDRESS,
    XOR_RELAYED_ADDRESS,
    decode_xor_address,
    encode_channel_number,
    encode_lifetime,
    encode_requested_transport,
    encode_xor_address,
)
from huddle.turn.credentials import issue, long_term_key

Say = Callable[[str], None]

HOST = "127.0.0.1"
SECRET = "bench-turn-secret"
PAYLOAD = 1200  # bytes of application data per packet, as a video packet
CHANNEL = CHANNEL_MIN
DIRECT_EVERY = 4  # one direct probe per this many relayed sends
OUR_PORTS = (50000, 50999)
COTURN_PORTS = (51000, 51999)
START_TIMEOUT = 30.0
REQUEST_TIMEOUT = 0.5
REQUEST_TRIES = 4
DRAIN_SECONDS = 0.3  # after a window's last send: what is still in flight comes back
MAX_BURST = 64  # sends per loop turn when the generator is behind, so that receiving still gets turns
POLL_MAX = 0.005
SOCKET_BUFFER = 4 * 1024 * 1024
LOSS_LIMIT = 1.0  # percent: the max-rate search's bar
KEPT_UP = 0.99  # the generator kept to its rate if it sent this share of the schedule
SECTION_TIMEOUT = 300.0
ALLOCATION_LIFETIME = 1800  # seconds: longer than the section, so nothing needs refreshing mid-window

RELAYED, DIRECT = 0, 1
_PROBE = struct.Struct(">BHIQ")  # kind, client, sequence, send time (monotonic ns)
_CHANNEL_HEADER = struct.Struct(">HH")
_ZERO_TID = bytes(12)  # an IPv4 XOR address does not depend on the transaction id


@dataclass(frozen=True)
class Load:
    clients: int
    pps: float  # per client, each way

    @property
    def label(self) -> str:
        return f"{self.clients} clients x {self.pps:g} pps"


@dataclass(frozen=True)
class Plan:
    loads: tuple[Load, ...]
    runs: int
    warmup: float
    window: float
    search_steps: int  # per server; 0: no search
    search_window: float


FULL = Plan((Load(10, 50), Load(40, 250)), runs=3, warmup=1.0, window=6.0, search_steps=5, search_window=3.0)
QUICK = Plan((Load(10, 50), Load(40, 250)), runs=3, warmup=0.5, window=2.0, search_steps=0, search_window=2.0)


# ---------------------------------------------------------------------------------------------------------
# Small helpers


def spread(values: list[float], digits: int = 3) -> dict[str, Any]:
    """Median and range of repeated measurements (all kept)."""
    if not values:
        return {"median": None, "min": None, "max": None, "values": []}
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "values": [round(v, digits) for v in values],
    }


def percentile(sorted_values: list[int], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return float(sorted_values[index])


def free_port() -> int:
    """A port free for both UDP and TCP on HOST (the STUN port takes both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError("no port free for both UDP and TCP")


_libc = ctypes.CDLL(None, use_errno=True)


class CpuClock:
    """A process's CPU time (all its threads) in seconds, from its POSIX CPU-time clock: ns where
    /proc/PID/stat counts 10 ms ticks, which at light load is a good part of what a window spends."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        clock = ctypes.c_int()
        self.clock = clock.value if _libc.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0 else None

    def read(self) -> float:
        if self.clock is not None:
            with contextlib.suppress(OSError):
                return time.clock_gettime(self.clock)
        return cpu_seconds(self.pid)


def udp_drops(ports: set[int]) -> tuple[int, int]:
    """(datagrams dropped by receive buffers of sockets on these local ports, by all other UDP sockets) in
    this network namespace, from /proc/net/udp."""
    mine = others = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) < 13:
                continue
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if port in ports:
                mine += int(fields[-1])
            else:
                others += int(fields[-1])
    return mine, others


# ---------------------------------------------------------------------------------------------------------
# The servers


class Server(Protocol):
    name: str
    port: int

    @property
    def pid(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Ours:
    """`huddle serve` with its TURN relay on a known STUN port (Serve's later --stun-port wins)."""

    name = "huddle"

    def __init__(self) -> None:
        self.port = free_port()
        self.serve = Serve(
            "turn",
            "--stun-port",
            str(self.port),
            "--turn-secret",
            SECRET,
            "--turn-allow-peer",
            "127.0.0.0/8",
            "--turn-ports",
            f"{OUR_PORTS[0]}-{OUR_PORTS[1]}",
            "--turn-bandwidth-kbps",
            "10000000",  # far above any load here: coturn has no cap by default
        )

    @property
    def pid(self) -> int:
        return self.serve.pid

    def start(self) -> None:
        self.serve.start()

    def stop(self) -> None:
        self.serve.stop()


class Coturn:
    """`turnserver` in the foreground, no configuration file, our realm and secret, logging to a file."""

    name = "coturn"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.log = RESULTS / "turn-coturn.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        return [
            "turnserver",
            "-n",
            "--listening-ip",
            HOST,
            "--listening-port",
            str(self.port),
            "--relay-ip",
            HOST,
            "--min-port",
            str(COTURN_PORTS[0]),
            "--max-port",
            str(COTURN_PORTS[1]),
            "--use-auth-secret",
            "--static-auth-secret",
            SECRET,
            "--realm",
            "huddle",
            "--allow-loopback-peers",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--no-tcp-relay",
            "--log-file",
            "stdout",
            "--simple-log",
            # Unprivileged: its pid file and user database in our own folder, not under /var.
            "--pidfile",
            str(self.workdir / "turnserver.pid"),
            "--userdb",
            str(self.workdir / "turndb"),
        ]

    def start(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        # Ready when it answers a Binding request on its port.
        deadline = time.monotonic() + START_TIMEOUT
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.settimeout(0.2)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"turnserver exited with {self.proc.returncode}: see {self.log}")
                tid = secrets.token_bytes(12)
                probe.sendto(encode(StunMessage(BINDING, MessageClass.REQUEST, tid)), (HOST, self.port))
                with contextlib.suppress(TimeoutError, ConnectionRefusedError, StunError):
                    data, _ = probe.recvfrom(2048)
                    if parse(data).transaction_id == tid:
                        return
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"turnserver did not answer within {START_TIMEOUT:g} s: see {self.log}")

    def stop(self) -> None:
        if self.proc is None:
            return
        terminate(self.proc, 10)
        self.proc = None


def coturn_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["turnserver", "--version"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or out.stderr.strip()
    return "?"


# ---------------------------------------------------------------------------------------------------------
# TURN clients (setup: blocking, bounded; the load itself is in `drive`)


def _transact(
    sock: socket.socket, server: tuple[str, int], message: StunMessage, key: bytes | None
) -> StunMessage:
    data = encode(message, integrity_key=key)
    for _ in range(REQUEST_TRIES):
        sock.sendto(data, server)
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                reply, _ = sock.recvfrom(4096)
            except TimeoutError:
                break
            with contextlib.suppress(StunError):
                answer = parse(reply)
                if answer.transaction_id == message.transaction_id:
                    return answer
    raise RuntimeError(f"no answer to method {message.method:#x} from {server[0]}:{server[1]}")


@dataclass
class Client:
    index: int
    sock: socket.socket  # to the TURN server
    direct: socket.socket  # straight to the echo
    relayed: tuple[str, int]
    frame: bytearray = field(default_factory=lambda: bytearray(4 + PAYLOAD))


def connect(server: tuple[str, int], peer: tuple[str, int], identity: str, index: int) -> Client:
    """Allocate, CreatePermission for the peer and ChannelBind to it, with time-limited credentials."""
    username, _ = issue(SECRET.encode(), identity, time.time(), ALLOCATION_LIFETIME + 600)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    direct = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for s in (sock, direct):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER // 4)
            s.bind((HOST, 0))
        transport = Attribute(REQUESTED_TRANSPORT, encode_requested_transport(TRANSPORT_UDP))
        first = _transact(
            sock,
            server,
            StunMessage(ALLOCATE, MessageClass.REQUEST, secrets.token_bytes(12), [transport]),
            None,
        )
        realm, nonce = first.get(REALM), first.get(NONCE)
        if realm is None or nonce is None:
            raise RuntimeError(f"{identity}: the first Allocate got no REALM and NONCE")
        key = long_term_key(username, realm.decode(), SECRET.encode())
        peer_attr = Attribute(XOR_PEER_ADDRESS, encode_xor_address(*peer, _ZERO_TID))

        def authed(method: int, attributes: list[Attribute]) -> StunMessage:
            nonlocal nonce
            for _ in range(3):  # a 438 (stale nonce) brings a fresh one: try again with it
                assert nonce is not None
                auth = [
                    Attribute(USERNAME, encode_username(username)),
                    Attribute(REALM, realm),
                    Attribute(NONCE, nonce),
                ]
                message = StunMessage(
                    method, MessageClass.REQUEST, secrets.token_bytes(12), attributes + auth
                )
                answer = _transact(sock, server, message, key)
                if answer.message_class == MessageClass.SUCCESS:
                    return answer
                code, reason = decode_error_code(answer.get(ERROR_CODE) or b"\0\0\0\0")
                if code != 438 or answer.get(NONCE) is None:
                    raise RuntimeError(f"{identity}: method {method:#x} refused: {code} {reason}")
                nonce = answer.get(NONCE)
            raise RuntimeError(f"{identity}: method {method:#x}: stale nonce three times")

        allocated = authed(ALLOCATE, [transport, Attribute(LIFETIME, encode_lifetime(ALLOCATION_LIFETIME))])
        value = allocated.get(XOR_RELAYED_ADDRESS)
        if value is None:
            raise RuntimeError(f"{identity}: Allocate success without XOR-RELAYED-ADDRESS")
        _, relay_host, relay_port = decode_xor_address(value, allocated.transaction_id)
        authed(CREATE_PERMISSION, [peer_attr])
        authed(CHANNEL_BIND, [Attribute(CHANNEL_NUMBER, encode_channel_number(CHANNEL)), peer_attr])
        sock.connect(server)
        direct.connect(peer)
        for s in (sock, direct):
            s.setblocking(False)
    except BaseException:
        sock.close()
        direct.close()
        raise
    client = Client(index, sock, direct, (relay_host, relay_port))
    _CHANNEL_HEADER.pack_into(client.frame, 0, CHANNEL, PAYLOAD)
    return client


def connect_all(server: Server, count: int, peer: tuple[str, int], tag: str) -> list[Client]:
    clients: list[Client] = []
    try:
        for i in range(count):
            clients.append(connect((HOST, server.port), peer, f"bench-{tag}-{i}", i))
    except BaseException:
        close_all(clients)
        raise
    return clients


def close_all(clients: list[Client]) -> None:
    for client in clients:
        client.sock.close()
        client.direct.close()


# ---------------------------------------------------------------------------------------------------------
# The load: one thread, one epoll, sends on a schedule, receives whatever is ready


CLIENT, DIRECT_SOCK, ECHO = 0, 1, 2


def drive(
    server: str,
    clients: list[Client],
    echo: socket.socket,
    pps: float,
    warmup: float,
    window: float,
    clock: CpuClock,
) -> dict[str, Any]:
    """Send `pps` per client through the relay (and a direct probe every DIRECT_EVERY sends) for warmup +
    window seconds, then drain; figures over what was sent in the window."""
    count = len(clients)
    interval = 1e9 / (count * pps)
    poller = select.epoll()
    roles: dict[int, tuple[int, socket.socket]] = {echo.fileno(): (ECHO, echo)}
    for client in clients:
        roles[client.sock.fileno()] = (CLIENT, client.sock)
        roles[client.direct.fileno()] = (DIRECT_SOCK, client.direct)
    for fd in roles:
        poller.register(fd, select.EPOLLIN)
    ports = {echo.getsockname()[1]} | {sock.getsockname()[1] for _, sock in roles.values()}
    probe = bytearray(PAYLOAD)
    relay_rtt: list[int] = []
    direct_rtt: list[int] = []
    sent = send_errors = to_peer = to_client = direct_sent = direct_back = echo_errors = 0
    seq = turn = 0
    edges: dict[str, tuple[float, float, float]] = {}  # edge -> (monotonic s, server CPU s, generator CPU s)
    drops_before = (0, 0)
    monotonic_ns, thread_time = time.monotonic_ns, time.thread_time
    pack, unpack = _PROBE.pack_into, _PROBE.unpack_from
    started = monotonic_ns()
    t0 = started + int(warmup * 1e9)
    t1 = t0 + int(window * 1e9)
    end = t1 + int(DRAIN_SECONDS * 1e9)
    next_send = float(started)
    try:
        while True:
            now = monotonic_ns()
            if now >= t0 and "before" not in edges:
                edges["before"] = (now / 1e9, clock.read(), thread_time())
                drops_before = udp_drops(ports)
            if now >= t1 and "after" not in edges:
                edges["after"] = (now / 1e9, clock.read(), thread_time())
            if now >= end:
                break
            if now < t1:
                burst = 0
                while next_send <= now and burst < MAX_BURST:
                    client = clients[turn]
                    turn = turn + 1 if turn + 1 < count else 0
                    next_send += interval
                    burst += 1
                    seq += 1
                    stamp = monotonic_ns()
                    frame = client.frame
                    pack(frame, 4, RELAYED, client.index, seq, stamp)
                    counted = t0 <= stamp < t1
                    try:
                        client.sock.send(frame)
                    except OSError:
                        send_errors += 1
                        continue
                    if counted:
                        sent += 1
                    if seq % DIRECT_EVERY == 0:
                        pack(probe, 0, DIRECT, client.index, seq, stamp)
                        with contextlib.suppress(OSError):
                            client.direct.send(probe)
                            if counted:
                                direct_sent += 1
                wait = min(POLL_MAX, max(0.0, (next_send - monotonic_ns()) / 1e9))
            else:
                wait = min(POLL_MAX, (end - now) / 1e9)
            for fd, _ in poller.poll(wait):
                role, sock = roles[fd]
                for _ in range(MAX_BURST):
                    try:
                        if role == ECHO:
                            data, source = sock.recvfrom(4096)
                        else:
                            data = sock.recv(4096)
                    except BlockingIOError:
                        break
                    except OSError:  # an ICMP error on a connected socket
                        continue
                    arrived = monotonic_ns()
                    if role == CLIENT:
                        # ChannelData back from the relay (anything else: a late answer, not ours to count)
                        if len(data) >= 4 + _PROBE.size and 0x40 <= data[0] <= 0x7F:
                            stamp = unpack(data, 4)[3]
                            if t0 <= stamp < t1:
                                to_client += 1
                                relay_rtt.append(arrived - stamp)
                    elif role == ECHO:
                        if len(data) >= _PROBE.size:
                            kind, _, _, stamp = unpack(data)
                            if kind == RELAYED and t0 <= stamp < t1:
                                to_peer += 1
                        try:
                            sock.sendto(data, source)
                        except OSError:
                            echo_errors += 1
                    elif len(data) >= _PROBE.size:
                        stamp = unpack(data)[3]
                        if t0 <= stamp < t1:
                            direct_back += 1
                            direct_rtt.append(arrived - stamp)
    finally:
        poller.close()
    drops_after = udp_drops(ports)
    (at0, cpu0, gen0), (at1, cpu1, gen1) = edges["before"], edges["after"]
    seconds = at1 - at0
    cpu = cpu1 - cpu0
    relayed = to_peer + to_client
    relay_rtt.sort()
    direct_rtt.sort()
    intended = round(window * count * pps)
    result: dict[str, Any] = {
        "server": server,
        "clients": count,
        "pps": pps,
        "window_s": round(seconds, 3),
        "intended": intended,
        "sent": sent,
        "kept_up": sent >= KEPT_UP * intended,
        "send_errors": send_errors,
        "echo_errors": echo_errors,
        "to_peer": to_peer,
        "to_client": to_client,
        "relayed": relayed,
        "relayed_per_s": round(relayed / seconds),
        "loss_percent": round(100 * (sent - to_client) / sent, 3) if sent else None,
        "server_cpu_s": round(cpu, 4),
        "server_cpu_percent": round(100 * cpu / seconds, 2),
        "relayed_per_cpu_s": round(relayed / cpu) if cpu > 0 else None,
        "generator_cpu_percent": round(100 * (gen1 - gen0) / seconds, 1),
        "generator_drops": drops_after[0] - drops_before[0],
        "other_drops": drops_after[1] - drops_before[1],
        "direct_sent": direct_sent,
        "direct_back": direct_back,
    }
    if relay_rtt and direct_rtt:
        for q in (50, 99):
            through, straight = percentile(relay_rtt, q) / 1e6, percentile(direct_rtt, q) / 1e6
            result[f"relay_rtt_p{q}_ms"] = round(through, 4)
            result[f"direct_rtt_p{q}_ms"] = round(straight, 4)
            result[f"added_p{q}_ms"] = round(through - straight, 4)
    return result


def generator_bound(run: dict[str, Any]) -> bool:
    """The generator, not the server, set this run's limit: it fell behind its schedule, or lost at least
    half of what was lost in its own sockets' receive buffers."""
    lost = run["sent"] - run["to_client"]
    return not run["kept_up"] or (lost > 0 and run["generator_drops"] * 2 >= lost)


def passed(run: dict[str, Any]) -> bool:
    return run["loss_percent"] is not None and run["loss_percent"] < LOSS_LIMIT and run["send_errors"] == 0


# ---------------------------------------------------------------------------------------------------------
# All of it

FIGURES = (
    ("relayed_per_cpu_s", 0),
    ("relayed_per_cpu_s_above_idle", 0),
    ("server_cpu_percent", 2),
    ("loss_percent", 3),
    ("added_p50_ms", 3),
    ("added_p99_ms", 3),
    ("relay_rtt_p50_ms", 3),
    ("relay_rtt_p99_ms", 3),
    ("direct_rtt_p50_ms", 3),
    ("direct_rtt_p99_ms", 3),
    ("generator_cpu_percent", 1),
    ("relayed_per_s", 0),
)


RATIO_FLOOR = {"added_p50_ms": 0.005, "added_p99_ms": 0.005}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: spread([r[key] for r in runs if r.get(key) is not None], digits) for key, digits in FIGURES}


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """ours/coturn of the medians, and whether the ranges of the runs keep apart."""
    out = {}
    for key, _ in FIGURES:
        a, b = ours[key], theirs[key]
        if a["median"] is None or b["median"] is None:
            continue
        # A delay of a few µs is within what the clock and the generator's loop can tell: no ratio to it.
        ratio = round(a["median"] / b["median"], 3) if b["median"] > RATIO_FLOOR.get(key, 0) else None
        out[key] = {"ratio": ratio, "differs": a["min"] > b["max"] or b["min"] > a["max"]}
    return out


async def measure_load(
    say: Say,
    plan: Plan,
    load: Load,
    servers: list[Server],
    clients: dict[str, list[Client]],
    echo: socket.socket,
    clocks: dict[str, CpuClock],
    idle: dict[str, float],
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for run in range(plan.runs):
        # Alternating, and each pair in the other order the next time, so that neither is always second.
        order = servers if run % 2 == 0 else servers[::-1]
        for server in order:
            result = await asyncio.to_thread(
                drive,
                server.name,
                clients[server.name],
                echo,
                load.pps,
                plan.warmup,
                plan.window,
                clocks[server.name],
            )
            # What the server spends with nothing to do (its timers) taken out: the cost of relaying itself.
            busy = result["server_cpu_s"] - idle[server.name] / 100 * result["window_s"]
            result["relayed_per_cpu_s_above_idle"] = round(result["relayed"] / busy) if busy > 0 else None
            runs[server.name].append(result)
            say(
                f"turn: {load.label} run {run + 1} {server.name}:"
                f" {result['relayed_per_cpu_s'] or 0:,} relayed/CPU-s,"
                f" loss {result['loss_percent']} %, added p50 {result.get('added_p50_ms')} ms,"
                f" generator {result['generator_cpu_percent']} %"
            )
    summaries = {name: summarise(found) for name, found in runs.items()}
    figures: dict[str, Any] = {
        "load": asdict(load),
        "round_trips_per_s": load.clients * load.pps,
        "servers": summaries,
        "runs": runs,
        "complete": all(
            len(found) == plan.runs and all(r["to_client"] for r in found) for found in runs.values()
        ),
    }
    if "huddle" in summaries and "coturn" in summaries:
        figures["ours_to_coturn"] = compare(summaries["huddle"], summaries["coturn"])
    return figures


STEP_KEYS = (
    "pps",
    "relayed_per_s",
    "loss_percent",
    "kept_up",
    "generator_drops",
    "other_drops",
    "server_cpu_percent",
    "generator_cpu_percent",
    "relayed_per_cpu_s",
)


async def search_max(
    say: Say,
    plan: Plan,
    start_pps: float,
    servers: list[Server],
    clients: dict[str, list[Client]],
    echo: socket.socket,
    clocks: dict[str, CpuClock],
) -> dict[str, Any]:
    """Per server: the highest per-client rate with < 1 % loss, doubling from start_pps until a rate fails,
    then halving the gap between the best pass and the lowest failure; each failure says whether the
    generator (behind its schedule, or the loss in its own buffers) or the rest failed."""
    state: dict[str, dict[str, Any]] = {s.name: {"ok": None, "failed": None, "steps": []} for s in servers}
    for _ in range(plan.search_steps):
        for server in servers:
            mine = state[server.name]
            good = mine["ok"]["pps"] if mine["ok"] else None
            bad = mine["failed"]["pps"] if mine["failed"] else None
            if bad is None:
                pps = 2 * good if good is not None else start_pps
            else:
                pps = (good + bad) / 2 if good is not None else bad / 2
            result = await asyncio.to_thread(
                drive,
                server.name,
                clients[server.name],
                echo,
                pps,
                0.5,
                plan.search_window,
                clocks[server.name],
            )
            step = {key: result[key] for key in STEP_KEYS}
            if passed(result) and result["kept_up"]:
                step["outcome"] = "pass"
                mine["ok"] = result
            else:
                step["outcome"] = "generator" if generator_bound(result) else "relay"
                mine["failed"] = result | {"failed_by": step["outcome"]}
            mine["steps"].append(step)
            say(
                f"turn: max-rate step {server.name} {pps:g} pps x {len(clients[server.name])}:"
                f" {step['outcome']}, loss {result['loss_percent']} %,"
                f" server {result['server_cpu_percent']} %, generator {result['generator_cpu_percent']} %"
            )
    out = {}
    for name, mine in state.items():
        best, failed = mine["ok"], mine["failed"]
        out[name] = {
            "clients": len(clients[name]),
            "max_pps_per_client": best["pps"] if best else None,
            "relayed_per_s": best["relayed_per_s"] if best else None,
            "relayed_per_cpu_s": best["relayed_per_cpu_s"] if best else None,
            "server_cpu_percent": best["server_cpu_percent"] if best else None,
            "generator_cpu_percent": best["generator_cpu_percent"] if best else None,
            # The lowest rate that failed (None: every step passed), and by whose limit.
            "first_failed_pps": failed["pps"] if failed else None,
            "failed_by": failed["failed_by"] if failed else None,
            "steps": mine["steps"],
        }
    return out


async def idle_cpu(clocks: dict[str, CpuClock], seconds: float) -> dict[str, float]:
    """Each server's CPU, % of one core, with no client at all (after a second to settle from its start)."""
    await asyncio.sleep(1.0)
    before = {name: clock.read() for name, clock in clocks.items()}
    at = time.monotonic()
    await asyncio.sleep(seconds)
    span = time.monotonic() - at
    return {name: round(100 * (clock.read() - before[name]) / span, 3) for name, clock in clocks.items()}


async def measure_turn(say: Say, *, quick: bool = False) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    figures: dict[str, Any] = {
        "quick": quick,
        "plan": asdict(plan),
        "idle_cpu_percent": None,
        "payload_bytes": PAYLOAD,
        "cpus": os.cpu_count(),
        "coturn_version": None,
        "loads": [],
        "max_rate": None,
        "notes": [],
        "complete": False,
    }
    if shutil.which("turnserver") is None:
        figures["notes"].append("coturn is not installed (Debian package coturn): no comparison")
        return figures
    figures["coturn_version"] = await asyncio.to_thread(coturn_version)
    workdir = Path(tempfile.mkdtemp(prefix="huddle-bench-turn-"))
    servers: list[Server] = [Ours(), Coturn(workdir)]
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    echo.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    echo.bind((HOST, 0))
    echo.setblocking(False)
    peer = echo.getsockname()
    held: list[list[Client]] = []
    try:
        async with asyncio.timeout(SECTION_TIMEOUT):
            for server in servers:
                await asyncio.to_thread(server.start)
                say(f"turn: {server.name} up (pid {server.pid}, port {server.port})")
            clocks = {s.name: CpuClock(s.pid) for s in servers}
            figures["idle_cpu_percent"] = await idle_cpu(clocks, plan.window)
            clients: dict[str, list[Client]] = {}
            for number, load in enumerate(plan.loads):
                clients = {}
                for server in servers:
                    clients[server.name] = await asyncio.to_thread(
                        connect_all, server, load.clients, peer, f"{number}"
                    )
                    held.append(clients[server.name])
                say(f"turn: {load.label}: {load.clients} allocations with a channel on each server")
                figures["loads"].append(
                    await measure_load(
                        say, plan, load, servers, clients, echo, clocks, figures["idle_cpu_percent"]
                    )
                )
            if plan.search_steps and clients:
                heaviest = plan.loads[-1]
                figures["max_rate"] = await search_max(
                    say, plan, heaviest.pps * 2, servers, clients, echo, clocks
                )
    except (RuntimeError, OSError, TimeoutError) as exc:
        figures["notes"].append(f"stopped: {exc!r}"[:400])
    finally:
        for group in held:
            close_all(group)
        echo.close()
        for server in servers:
            await asyncio.to_thread(server.stop)
        shutil.rmtree(workdir, ignore_errors=True)
    figures["complete"] = len(figures["loads"]) == len(plan.loads) and all(
        x["complete"] for x in figures["loads"]
    )
    return figures


# ---------------------------------------------------------------------------------------------------------
# The table


def _s(found: dict[str, Any] | None, spec: str) -> str:
    """median [min, max] of a spread."""
    if not found or found.get("median") is None:
        return "-"
    return f"{found['median']:{spec}} [{found['min']:{spec}}, {found['max']:{spec}}]"


ROWS = (
    ("relayed pkt per CPU-second", "relayed_per_cpu_s", ",.0f"),
    ("  the same, CPU above idle", "relayed_per_cpu_s_above_idle", ",.0f"),
    ("server CPU, % of one core", "server_cpu_percent", ".1f"),
    ("loss (round trips), %", "loss_percent", ".2f"),
    ("added delay p50, ms", "added_p50_ms", ".3f"),
    ("added delay p99, ms", "added_p99_ms", ".3f"),
    ("round trip via relay p50, ms", "relay_rtt_p50_ms", ".3f"),
    ("round trip via relay p99, ms", "relay_rtt_p99_ms", ".3f"),
    ("round trip direct p50, ms", "direct_rtt_p50_ms", ".3f"),
    ("round trip direct p99, ms", "direct_rtt_p99_ms", ".3f"),
    ("generator CPU, % of one core", "generator_cpu_percent", ".1f"),
)


def format_turn(figures: dict[str, Any]) -> str:
    plan = figures["plan"]
    lines = [
        f"TURN relay (issue 14): huddle against coturn ({figures.get('coturn_version') or 'not run'}, its"
        f" defaults: one relay thread per CPU), UDP over {HOST}, {PAYLOAD:,}-byte ChannelData payloads;"
        f" median [min, max] of {plan['runs']} runs of {plan['window']:g} s per server, alternating"
    ]
    for load in figures["loads"]:
        count, pps = load["load"]["clients"], load["load"]["pps"]
        rate = load["round_trips_per_s"]
        lines.append(
            f"  {count} clients x {pps:g} pps: {rate:,.0f} round trips/s = {2 * rate:,.0f} relayed pkt/s"
            f" (client -> relay -> echo peer -> relay -> client)"
        )
        lines.append(f"    {'':<30} {'huddle':>26} {'coturn':>26}  ours/coturn")
        ours, theirs = load["servers"].get("huddle"), load["servers"].get("coturn")
        ratios = load.get("ours_to_coturn", {})
        for label, key, spec in ROWS:
            ratio = ratios.get(key)
            said = "-"
            if ratio:
                said = "-" if ratio["ratio"] is None else f"{ratio['ratio']:.2f}"
                said += " differs" if ratio["differs"] else " (ranges overlap)"
            mine, others = _s(ours and ours[key], spec), _s(theirs and theirs[key], spec)
            lines.append(f"    {label:<30} {mine:>26} {others:>26}  {said}")
    idle = figures.get("idle_cpu_percent")
    if idle:
        lines.append(
            "  with no load at all (timers only), % of one core: "
            + ", ".join(f"{name} {value:.2f}" for name, value in idle.items())
        )
    top = figures.get("max_rate")
    if top:
        lines.append(
            f"  highest rate with < {LOSS_LIMIT:g} % loss (one {plan['search_window']:g} s window per step,"
            f" {plan['search_steps']} steps, rates doubling then bisecting):"
        )
        for name, found in top.items():
            if found["max_pps_per_client"] is None:
                lines.append(
                    f"    {name:<7} no step passed (first failure at"
                    f" {found['first_failed_pps']:g} pps per client)"
                )
                continue
            if found["failed_by"] is None:
                bound = "every step passed: a lower bound"
            elif found["failed_by"] == "generator":
                bound = (
                    f"at {found['first_failed_pps']:g} pps the generator fell behind or lost in its own"
                    " buffers: this machine's limit, not necessarily the relay's"
                )
            else:
                bound = f"the relay lost >= {LOSS_LIMIT:g} % at {found['first_failed_pps']:g} pps"
            lines.append(
                f"    {name:<7} {found['relayed_per_s']:,} relayed pkt/s ({found['clients']} clients x"
                f" {found['max_pps_per_client']:g} pps), {found['relayed_per_cpu_s'] or 0:,} per CPU-s,"
                f" server {found['server_cpu_percent']:.0f} %, generator"
                f" {found['generator_cpu_percent']:.0f} % ({bound})"
            )
        if any(found["failed_by"] == "generator" for found in top.values()):
            lines.append(
                "    (one window per step, no spread, and the generator was the first to give: where this"
                " machine ran out, not a difference between the relays)"
            )
    lines += [
        f"  The generator (one thread of the bench process: clients and echo peer) and the servers share this"
        f" machine's {figures['cpus']} cores.",
        "  Server CPU: the process's CPU clock (all threads) over the window; relayed = packets the echo",
        "  got through the relay + packets the clients got back; added delay = round trip via the relay",
        "  minus the direct round trip measured in the same window (every 4th send), per run. A ratio",
        "  'differs' only where the runs' ranges do not overlap.",
    ]
    lines.extend(f"  note: {n}" for n in figures.get("notes", [])[:3])
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    def say(text: str) -> None:
        print(f"bench.turn: {text}", file=sys.stderr, flush=True)

    started = time.time()
    figures = await measure_turn(say, quick=args.quick)
    table = format_turn(figures)
    print(table, flush=True)
    save_results("turn", started, figures, table)
    return 0 if figures["complete"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.turn", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows, no max-rate search (~1 minute)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(asyncio.wait_for(main_async(args), timeout=SECTION_TIMEOUT + 60))
    except TimeoutError:
        print("bench.turn: the run overran its deadline and was stopped", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
