"""`huddle loadtest`: the command line of the load generator (light to import: no media libraries)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from huddle.loadtest import MAX_DURATION, MAX_PARTICIPANTS

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("HUDDLE_URL", "http://127.0.0.1:8080"),
        help="base URL of the server [env HUDDLE_URL]",
    )
    parser.add_argument(
        "--room", default="loadtest", help="room to join (open rooms: no --secret on the server)"
    )
    parser.add_argument(
        "--participants", type=int, default=3, help=f"synthetic participants, at most {MAX_PARTICIPANTS}"
    )
    parser.add_argument(
        "--publishers",
        type=int,
        default=None,
        help="how many of them publish camera and microphone (default: all)",
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help=f"seconds measured, at most {MAX_DURATION:g}"
    )
    parser.add_argument(
        "--layout", choices=("speaker", "gallery"), default="speaker", help="what everyone shows"
    )
    parser.add_argument("--speaker", type=int, default=0, help="index of the participant who talks")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds between connected and measuring")
    parser.add_argument("--join-rate", type=float, default=20.0, help="joins per second")
    parser.add_argument(
        "--connect-timeout", type=float, default=30.0, help="seconds to wait for every media connection"
    )
    parser.add_argument(
        "--decrypt-every",
        type=int,
        default=1,
        help="decrypt 1 received packet in this many per stream (1: all; more saves the generator's CPU, "
        "loss still counts every packet)",
    )
    parser.add_argument(
        "--churn",
        type=float,
        default=0.0,
        help="every this many seconds someone leaves (every third vanishes, as a closed tab) and a newcomer "
        "takes the seat, from the warm-up to the end (default 0: nobody leaves)",
    )
    parser.add_argument(
        "--no-simulcast",
        dest="simulcast",
        action="store_false",
        help="publishers send one video stream without simulcast (the 640x360 layer, h), as a browser "
        "without simulcast does; every shown video is then expected at that layer, whatever its size",
    )
    parser.add_argument(
        "--no-audio",
        dest="audio",
        action="store_false",
        help="publishers send no audio (no audio m-section is offered)",
    )
    parser.add_argument("--json", type=Path, help="also write the full results to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def main(args: argparse.Namespace) -> int:
    from huddle.loadtest.run import LoadtestConfig, format_summary, run_loadtest

    config = LoadtestConfig(
        url=args.url,
        room=args.room,
        participants=args.participants,
        publishers=args.publishers,
        duration=args.duration,
        layout=args.layout,
        speaker=args.speaker,
        warmup=args.warmup,
        join_rate=args.join_rate,
        connect_timeout=args.connect_timeout,
        decrypt_every=args.decrypt_every,
        churn=args.churn,
        simulcast=args.simulcast,
        audio=args.audio,
    )
    try:
        config.validate()
    except ValueError as exc:
        print(f"huddle loadtest: {exc}", file=sys.stderr)
        return 2

    def progress(text: str) -> None:
        if not args.quiet:
            print(f"huddle loadtest: {text}", file=sys.stderr, flush=True)

    try:
        result = asyncio.run(run_loadtest(config, progress=progress))
    except TimeoutError:
        print("huddle loadtest: the run overran its deadline and was stopped", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"huddle loadtest: cannot reach {config.url}: {exc}", file=sys.stderr)
        return 1
    print(format_summary(result), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if not result.complete:
        print(
            f"huddle loadtest: only {result.connected} of {result.participants} participants connected"
            + (f", {result.join_failures} of {result.joins} newcomers did not" if result.joins else ""),
            file=sys.stderr,
        )
        return 1
    return 0
