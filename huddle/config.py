"""One Settings object for a Huddle node: command-line flags > HUDDLE_* environment > defaults."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    stun_port: int = 3478
    media_port: int = 7882
    secret: str | None = None
    secret_file: str | None = None
    api_key: str | None = None
    allowed_origins: str | None = None
    max_recordings: int = 4
    max_connections_per_address: int = 200
    log_level: str = "info"
    max_participants: int = 100
    max_participants_per_node: int = 100
    sfu_always: bool = False
    announce_ip: str | None = None
    reconnect_grace: float = 20.0
    recordings_dir: str = "recordings"
    s3_endpoint: str | None = None
    s3_bucket: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str = "us-east-1"
    turn_secret: str | None = None
    turn_allow_peer: str | None = None
    turn_user_quota: int = 10
    turn_total_quota: int = 1000
    turn_bandwidth_kbps: int = 10_000
    turn_ports: str = "49152-65535"
    turn_tls_port: int = 5349
    tls_cert: str | None = None
    tls_key: str | None = None
    self_signed: bool = False
    kafka: str | None = None
    kafka_topic: str = "huddle.recording"
    kafka_buffer_mb: int = 1024
    zookeeper: str | None = None
    node_id: str = "local"
    zk_session_timeout: float = 6.0
    standby_for: str | None = None
    workers: str = "1"
    public_url: str | None = None
    worker_ids: str | None = None
    pipe_url: str | None = None

    @property
    def open_rooms(self) -> bool:
        return not self.secret


# Help text per setting; the flag is --name-with-dashes and the variable HUDDLE_NAME_IN_CAPS.
_HELP = {
    "host": "address to listen on for HTTP, WebSocket, STUN and media",
    "port": "HTTP and WebSocket port (0 picks a free port)",
    "stun_port": "STUN server port, UDP and TCP (0 picks a free port)",
    "media_port": "UDP port for SFU media (0 picks a free port)",
    "secret": "key that signs join tokens (HS256); unset means open rooms: anyone with the room name joins",
    "secret_file": "file whose first line is the secret (keeps it out of `ps` and the environment)",
    "api_key": "key for the REST API's recording control and, with --secret, /metrics (send it as "
    "'Authorization: Bearer KEY'); unset: REST recording control is refused (403)",
    "allowed_origins": "comma-separated origins (scheme://host[:port]) whose pages may open the "
    "WebSocket and call state-changing REST endpoints; default: the server's own origin only",
    "max_recordings": "most recordings running at once on this node",
    "max_connections_per_address": "most TCP connections one client address may hold open, per listener "
    "(HTTP/WebSocket, STUN over TCP, ICE-TCP)",
    "log_level": "log level for the structured logs on stderr",
    "max_participants": "most participants one room admits",
    "max_participants_per_node": "participants of one call a node seats before the call's next joiners go to "
    "the next node in the chat id's hashing order (a cluster or --workers)",
    "sfu_always": "send every call through the SFU, even 1:1 calls (default: 1:1 calls are peer to peer)",
    "announce_ip": "address put in the SFU's ICE candidates, when clients reach the node at another address "
    "than --host (behind NAT, or --host 0.0.0.0)",
    "reconnect_grace": "seconds a participant whose connection dropped keeps its place before removal",
    "recordings_dir": "folder for recordings (the store itself unless --s3-endpoint is set; also the upload "
    "spool and unfinished files)",
    "s3_endpoint": "S3-compatible endpoint URL to store recordings in (e.g. http://127.0.0.1:8333)",
    "s3_bucket": "bucket for recordings (created if missing)",
    "s3_access_key": "S3 access key id",
    "s3_secret_key": "S3 secret access key (prefer the environment variable to the flag)",
    "s3_region": "S3 region",
    "turn_secret": "secret of the TURN relay's time-limited credentials (shared with whatever else hands "
    "them out); default: derived from --secret, or from this run's resume key in open mode",
    "turn_allow_peer": "comma-separated CIDRs the TURN relay may send to although they are private, loopback "
    "or link-local (e.g. 127.0.0.0/8 for tests); by default only public addresses are relayed to",
    "turn_user_quota": "most TURN allocations one user (credential identity) holds at once",
    "turn_total_quota": "most TURN allocations on this node at once",
    "turn_bandwidth_kbps": "most kbit/s one TURN allocation relays (each way); beyond, packets are dropped",
    "turn_ports": "UDP port range of the TURN relay's addresses, as FIRST-LAST",
    "turn_tls_port": "TURN over TLS port, with --tls-cert and --tls-key or --self-signed",
    "tls_cert": "PEM certificate chain (the server's certificate first): the HTTP port serves HTTPS and WSS, "
    "and TURN over TLS runs on --turn-tls-port",
    "tls_key": "PEM private key of --tls-cert (not protected by a passphrase)",
    "self_signed": "serve HTTPS with a self-signed certificate for this machine's names and addresses, made "
    "once and kept under --recordings-dir (for a try-out on a LAN: browsers warn; its SHA-256 fingerprint "
    "is logged to check against)",
    "kafka": "send per-track recordings through Kafka: bootstrap servers as HOST:PORT[,HOST:PORT...]; "
    "`huddle record-consumer` writes the files; unset: this node writes them itself",
    "kafka_topic": "Kafka topic of the recordings' frames (keyed by chat id)",
    "kafka_buffer_mb": "MiB of recording records kept on disk (under --recordings-dir) while Kafka is slow "
    "or away; beyond it records are dropped and counted",
    "zookeeper": "join a cluster: ZooKeeper servers as HOST:PORT[,HOST:PORT...][/chroot] (default chroot "
    "/huddle); unset: this node is on its own",
    "node_id": "this node's id in the cluster (letters, digits, '-', '_'); a live node's id is unique",
    "zk_session_timeout": "seconds without ZooKeeper after which this node stops serving its calls and "
    "a dead node's standby takes over",
    "standby_for": "run as the passive standby of the active node with this id: host no call until it dies, "
    "then take over its calls",
    "workers": "node processes on this machine behind the one HTTP port, calls placed over them by chat id "
    "('auto': one per core)",
    "public_url": "the URL clients reach this node's HTTP port at (default: http://HOST:PORT, https:// with "
    "TLS); other nodes "
    "redirect participants here",
    "worker_ids": argparse.SUPPRESS,
    "pipe_url": argparse.SUPPRESS,
}

# Set by the --workers parent for its children only (pipe_url: its plain HTTP door on the loopback, where a
# worker reaches its siblings' /pipe whatever the public URL's scheme or proxy).
_HIDDEN = ("worker_ids", "pipe_url")


def env_name(field_name: str) -> str:
    return "HUDDLE_" + field_name.upper()


def add_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """Add one flag per setting, with defaults taken from the environment so that flags win over it."""
    defaults = Settings()
    for f in fields(Settings):
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        env = os.environ.get(env_name(f.name))
        help_text = (
            argparse.SUPPRESS
            if f.name in _HIDDEN
            else f"{_HELP[f.name]} [env {env_name(f.name)}; default {default!r}]"
        )
        if isinstance(default, bool):
            value = env.lower() in ("1", "true", "yes", "on") if env else default
            parser.add_argument(flag, dest=f.name, action="store_true", default=value, help=help_text)
            continue
        kind = type(default) if isinstance(default, int | float) else str
        if f.name == "zk_session_timeout":
            kind = float
        value = kind(env) if env not in (None, "") else default
        kwargs: dict = {"type": kind, "default": value, "help": help_text}
        if f.name == "log_level":
            kwargs["choices"] = LOG_LEVELS
        parser.add_argument(flag, dest=f.name, **kwargs)


def from_namespace(ns: argparse.Namespace) -> Settings:
    values = {f.name: getattr(ns, f.name) for f in fields(Settings) if hasattr(ns, f.name)}
    settings = Settings(**values)
    for name in ("port", "stun_port", "media_port"):
        port = getattr(settings, name)
        if not 0 <= port <= 65535:
            raise ValueError(f"--{name.replace('_', '-')} must be 0-65535, got {port}")
    if settings.reconnect_grace < 0:
        raise ValueError("--reconnect-grace must be 0 or more seconds")
    if settings.max_participants < 1:
        raise ValueError("--max-participants must be at least 1")
    if settings.max_participants_per_node < 1:
        raise ValueError("--max-participants-per-node must be at least 1")
    turn_ports(settings)
    for part in (settings.turn_allow_peer or "").split(","):
        if part.strip():
            try:
                ipaddress.ip_network(part.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"--turn-allow-peer: {part.strip()!r} is not a CIDR (e.g. 127.0.0.0/8)"
                ) from None
    if settings.turn_user_quota < 1 or settings.turn_total_quota < 1:
        raise ValueError("--turn-user-quota and --turn-total-quota must be at least 1")
    if settings.turn_bandwidth_kbps < 1:
        raise ValueError("--turn-bandwidth-kbps must be at least 1")
    if not 0 <= settings.turn_tls_port <= 65535:
        raise ValueError(f"--turn-tls-port must be 0-65535, got {settings.turn_tls_port}")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ValueError("--tls-cert and --tls-key go together: give both or neither")
    if settings.self_signed and settings.tls_cert:
        raise ValueError(
            "--self-signed makes its own certificate: give either it or --tls-cert/--tls-key, not both"
        )
    if settings.self_signed and settings.zookeeper:
        raise ValueError(
            "--self-signed is for a try-out on one machine: each node would make its own certificate, which "
            "browsers redirected between nodes cannot accept; give every node a real one with "
            "--tls-cert/--tls-key"
        )
    if settings.kafka_buffer_mb < 1:
        raise ValueError("--kafka-buffer-mb must be at least 1")
    servers = (settings.kafka or "").split(",")
    if settings.kafka is not None and not all(_BOOTSTRAP.fullmatch(b.strip()) for b in servers):
        raise ValueError(f"--kafka must be HOST:PORT[,HOST:PORT...], got {settings.kafka!r}")
    if settings.max_recordings < 0:
        raise ValueError("--max-recordings must be 0 or more")
    if settings.max_connections_per_address < 1:
        raise ValueError("--max-connections-per-address must be at least 1")
    if not _ID.fullmatch(settings.node_id):
        raise ValueError("--node-id must be 1-64 letters, digits, '-' or '_'")
    if settings.standby_for is not None:
        if not _ID.fullmatch(settings.standby_for):
            raise ValueError("--standby-for must be a node id: 1-64 letters, digits, '-' or '_'")
        if not settings.zookeeper:
            raise ValueError("--standby-for needs --zookeeper: the standby learns there that its active died")
        if settings.standby_for == settings.node_id:
            raise ValueError("--standby-for must name another node than --node-id")
    if settings.zk_session_timeout < 1.0:
        raise ValueError("--zk-session-timeout must be at least 1 second (ZooKeeper's minimum is 2 ticks)")
    worker_count(settings)
    if settings.secret_file:
        if settings.secret:
            raise ValueError("give the secret once: --secret or --secret-file, not both")
        try:
            secret = Path(settings.secret_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as exc:
            raise ValueError(f"--secret-file {settings.secret_file}: cannot read a secret ({exc})") from None
        if not secret:
            raise ValueError(f"--secret-file {settings.secret_file}: the first line is empty")
        settings = replace(settings, secret=secret)
    return settings


_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BOOTSTRAP = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")


def turn_ports(settings: Settings) -> tuple[int, int]:
    """--turn-ports as (first, last)."""
    first, dash, last = settings.turn_ports.partition("-")
    if not (dash and first.strip().isdigit() and last.strip().isdigit()):
        raise ValueError(f"--turn-ports must be FIRST-LAST, got {settings.turn_ports!r}")
    low, high = int(first), int(last)
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"--turn-ports must be within 1024-65535, first <= last: {settings.turn_ports!r}")
    return low, high


def worker_count(settings: Settings) -> int:
    """--workers as a number of processes (`auto`: one per core this process may run on)."""
    if settings.workers == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    try:
        count = int(settings.workers)
    except ValueError:
        raise ValueError(f"--workers must be a number or 'auto', got {settings.workers!r}") from None
    if not 1 <= count <= 64:
        raise ValueError("--workers must be 1-64")
    if count > 1 and settings.zookeeper:
        raise ValueError("--workers and --zookeeper do not go together yet: run one node per core instead")
    return count


def origins(settings: Settings) -> frozenset[str]:
    """The configured --allowed-origins, normalised (no trailing slash, lower case); empty: same origin."""
    if not settings.allowed_origins:
        return frozenset()
    return frozenset(o.strip().rstrip("/").lower() for o in settings.allowed_origins.split(",") if o.strip())
