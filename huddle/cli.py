"""Command line: `huddle serve` runs a node, `huddle token` prints a join link, `huddle record-consumer`
writes recordings from Kafka into the store."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import signal
import sys
from urllib.parse import quote

from huddle import config, logs
from huddle.loadtest import cli as loadtest_cli
from huddle.recording import record_consumer
from huddle.signaling import tokens
from huddle.signaling.messages import valid_room_name


def _default_url() -> str:
    host = os.environ.get("HUDDLE_HOST") or config.Settings().host
    port = os.environ.get("HUDDLE_PORT") or str(config.Settings().port)
    return f"http://{host}:{port}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="huddle", description="Self-hosted video calls.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run a Huddle node",
        description="Run a Huddle node: the call page and signaling over HTTP/WebSocket, a STUN server "
        "and the media port. When ready it prints one JSON line on stdout: "
        '{"event": "ready", "http": PORT, "stun": PORT, "media": PORT}, and "scheme": "https" when the HTTP '
        "port serves TLS. Logs go to stderr.",
    )
    config.add_arguments(serve)

    token = sub.add_parser(
        "token",
        help="print a join link for one person and one room",
        description="Sign a join token (JWT HS256) with the server's secret and print the join URL.",
    )
    token.add_argument("--room", required=True, help="room the link admits to")
    token.add_argument("--identity", required=True, help="stable identity of the person (e.g. a user id)")
    token.add_argument("--name", help="display name shown to others (default: the identity)")
    token.add_argument("--ttl", type=int, default=tokens.DEFAULT_TTL, help="seconds the link stays valid")
    token.add_argument("--no-publish", action="store_true", help="may watch but not send media")
    token.add_argument("--record", action="store_true", help="may start and stop recordings of the call")
    token.add_argument(
        "--download", action="store_true", help="may download the room's recordings (listing needs no flag)"
    )
    token.add_argument(
        "--url",
        default=os.environ.get("HUDDLE_URL", _default_url()),
        help="base URL of the server [env HUDDLE_URL]",
    )
    config.add_arguments(token, ("secret", "secret_file"))

    loadtest = sub.add_parser(
        "loadtest",
        help="run synthetic participants against a server and measure what arrives",
        description="Join N synthetic participants (P of them publishing simulcast VP8 and Opus) to one room "
        "over the real protocol (signaling, ICE, DTLS, SRTP), measure packets, loss, freezes, layers and "
        "forwarding delay for a while, print a summary and leave. Bounded in count and time.",
    )
    loadtest_cli.add_arguments(loadtest)

    consumer = sub.add_parser(
        "record-consumer",
        help="write recordings from the Kafka recording topic into the store",
        description="Read the recording topic in a consumer group (instances share its partitions), write "
        "one WebM per track and a manifest per recording, store them (S3 or a local folder), and commit "
        "offsets only once what they cover is stored. When ready it prints one JSON line on stdout: "
        '{"event": "ready", "http": PORT}. Logs go to stderr.',
    )
    record_consumer.add_arguments(consumer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "token":
        return _token(args)
    if args.command == "loadtest":
        return loadtest_cli.main(args)
    if args.command == "record-consumer":
        return record_consumer.main(args)
    try:
        settings = config.from_namespace(args)
    except ValueError as exc:
        print(f"huddle serve: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level)
    from huddle.cluster.membership import ClusterError
    from huddle.tls import TlsError
    from huddle.workers import WorkerFailed

    try:
        asyncio.run(_serve(settings))
    except TlsError as exc:
        print(f"huddle serve: {exc}", file=sys.stderr)
        return 2
    except (ClusterError, WorkerFailed) as exc:
        print(f"huddle serve: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"huddle serve: cannot listen: {exc}. Is another server using the port? Pick others with "
            "--port, --stun-port and --media-port (0 picks a free one).",
            file=sys.stderr,
        )
        return 1
    return 0


async def _serve(settings: config.Settings) -> None:
    from huddle.node import Node
    from huddle.workers import Workers

    if settings.worker_ids:
        _stop_with_parent()
    node: Node | Workers = Workers(settings) if config.worker_count(settings) > 1 else Node(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before start: a --workers parent stopped while it starts its workers still stops them.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ports = await node.start()
    ready: dict[str, object] = {
        "event": "ready",
        "http": ports.http,
        "stun": ports.stun,
        "media": ports.media,
    }
    if ports.scheme != "http":
        ready["scheme"] = ports.scheme
    print(json.dumps(ready), flush=True)
    try:
        await stop.wait()
    finally:
        await node.stop()


def _stop_with_parent() -> None:
    """A worker of a --workers parent that died (kill -9) stops too, instead of holding its ports."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _token(args: argparse.Namespace) -> int:
    try:
        secret = config.from_namespace(args).secret
    except ValueError as exc:
        print(f"huddle token: {exc}", file=sys.stderr)
        return 2
    if not secret:
        print(
            "huddle token: no secret: pass --secret-file (or --secret), or set HUDDLE_SECRET_FILE or "
            "HUDDLE_SECRET: the one the server runs with",
            file=sys.stderr,
        )
        return 2
    if not valid_room_name(args.room):
        print("huddle token: --room must be 1-64 letters, digits, '-' or '_'", file=sys.stderr)
        return 2
    if args.ttl <= 0:
        print("huddle token: --ttl must be a positive number of seconds", file=sys.stderr)
        return 2
    permissions = tokens.Permissions(publish=not args.no_publish, record=args.record, download=args.download)
    token = tokens.issue(
        secret,
        room=args.room,
        identity=args.identity,
        name=args.name,
        ttl=args.ttl,
        permissions=permissions,
    )
    print(f"{args.url.rstrip('/')}/r/{quote(args.room)}?token={token}")
    return 0
