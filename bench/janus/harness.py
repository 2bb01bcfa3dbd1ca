"""Janus 1.1.x (Debian `janus`, VideoRoom plugin) as the reference SFU of the side-by-side benchmark.

`JanusServer` writes a config directory of its own, starts `janus` on it and stops it again; `JanusClient`
speaks the Janus API over the HTTP transport (aiohttp) and `VideoRoomHandle` the VideoRoom plugin's requests.

    async with JanusServer() as server, JanusClient(server.url) as janus:
        admin = await janus.attach()
        room = await admin.create_room(publishers=100)
        pub = await janus.attach()
        answer = await pub.publish(room, offer_sdp, display="p1")        # pub.feed_id: the publisher's id
        sub = await janus.attach()
        offer = await sub.subscribe(room, [pub.feed_id])                  # one PeerConnection, many feeds
        await sub.start(answer_sdp)
        await sub.configure(substream=0)                                  # simulcast layer, per video stream
        server.cpu_seconds(), server.rss_bytes()                          # from /proc/<pid>

What Janus needs here (DESIGN.md, "Test environment"): it never offers candidates on loopback interfaces, so
its ICE is pinned to the namespace's veth (`nat.ice_enforce_list`, hx0 = 10.77.0.1 under scripts/in-netns),
in ICE-lite mode and without STUN/TURN; its HTTP API listens on 127.0.0.1 only. Over HTTP, `join`, `start`
and `configure` are answered with an ack and the real answer (with the jsep) arrives on the long poll
`GET /janus/<session>`, so the client runs one poll task per session that resolves requests by transaction
and files everything else (webrtcup, media, hangup, publishers...) in a mailbox per handle. Sessions expire
after `session_timeout` (60 s) without a request, and a pending long poll does not count as one (checked):
hence a keepalive task.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import struct
import sysconfig
import tempfile
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp

VIDEOROOM = "janus.plugin.videoroom"
HTTP_TRANSPORT = "libjanus_http.so"
VIDEOROOM_LIBRARY = "libjanus_videoroom.so"
JANUS_HTTP_NAME = "janus.transport.http"


class JanusError(RuntimeError):
    """An error answered by Janus (core `error`) or by the VideoRoom plugin (`error_code`)."""

    def __init__(self, code: int | None, reason: str, request: dict[str, Any] | None = None) -> None:
        super().__init__(f"Janus error {code}: {reason}" + (f" (request {request})" if request else ""))
        self.code = code
        self.reason = reason


class JanusStartError(RuntimeError):
    """Janus did not come up (or came up with a config other than the one written)."""


# ---------------------------------------------------------------------------------------------------------
# The server


def _library_dir() -> Path:
    """Where the Debian package puts the plugins/, transports/, events/ and loggers/ folders."""
    candidates = []
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        candidates.append(Path("/usr/lib") / multiarch / "janus")
    candidates += [Path("/usr/lib/janus"), Path("/usr/local/lib/janus"), Path("/opt/janus/lib/janus")]
    for candidate in candidates:
        if (candidate / "plugins" / VIDEOROOM_LIBRARY).exists():
            return candidate
    raise JanusStartError(
        f"no {VIDEOROOM_LIBRARY} under {', '.join(map(str, candidates))}: install the Debian package `janus`"
    )


def _modules(folder: Path) -> list[str]:
    """The shared objects Janus would load from a folder: it loads every `*.so` (not `*.so.1` etc.)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".so"))


def interface_ipv4(name: str) -> str | None:
    """The IPv4 address of a network interface (SIOCGIFADDR), or None if it has none or does not exist."""
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def _no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _free_tcp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tcp_port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libmicrohttpd does: TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _jcfg_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_jcfg_value(v) for v in value) + "]"
    return json.dumps(
        str(value), ensure_ascii=False
    )  # double-quoted, \" and \\ escaped as libconfig reads them


def render_jcfg(sections: dict[str, dict[str, Any]]) -> str:
    """Janus's .jcfg files are libconfig: `section: { key = value }`; None values are left out."""
    lines = []
    for section, keys in sections.items():
        lines.append(f"{section}: {{")
        lines += [f"\t{key} = {_jcfg_value(value)}" for key, value in keys.items() if value is not None]
        lines.append("}")
        lines.append("")
    return "\n".join(lines)


class JanusServer:
    """Janus with a config of its own in a temporary directory, on 127.0.0.1 (API) and `interface` (media).

    `debug_level` 2 logs errors only (Janus logs to stdout; with a hundred participants more is a cost that
    would show in the CPU figures). `overrides` patches the generated janus.jcfg, e.g.
    `{"media": {"rtp_port_range": "20000-20999"}}`.
    """

    def __init__(
        self,
        *,
        interface: str = "hx0",
        host: str = "127.0.0.1",
        port: int | None = None,
        debug_level: int = 2,
        session_timeout: int = 60,
        binary: str = "janus",
        startup_timeout: float = 15.0,
        overrides: dict[str, dict[str, Any]] | None = None,
        event_loops: int | None = None,
    ) -> None:
        self.interface = interface
        self.host = host
        self.port = port
        self.debug_level = debug_level
        self.session_timeout = session_timeout
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.overrides = overrides or {}
        self.event_loops = event_loops or os.cpu_count() or 1
        self.media_ip: str | None = None
        self.config_dir: Path | None = None
        self.info: dict[str, Any] = {}
        self._process: asyncio.subprocess.Process | None = None

    # -- what the benchmark reads

    @property
    def url(self) -> str:
        """Base URL of the Janus API (POST here to create a session)."""
        return f"http://{self.host}:{self.port}/janus"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("Janus is not running")
        return self._process.pid

    @property
    def stdout_path(self) -> Path:
        assert self.config_dir is not None
        return self.config_dir / "janus.out"

    @property
    def stderr_path(self) -> Path:
        assert self.config_dir is not None
        return self.config_dir / "janus.err"

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the Janus process so far (all its threads), from /proc/<pid>/stat."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; field 3 of stat(5) is fields[0]
        utime, stime = int(fields[11]), int(fields[12])
        return (utime + stime) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def log_errors(self) -> list[str]:
        """Lines Janus logged as errors or fatal errors so far (stdout), plus anything on stderr."""
        lines = []
        if self.stdout_path.exists():
            lines += [
                line
                for line in self.stdout_path.read_text(errors="replace").splitlines()
                if "[ERR]" in line or "[FATAL]" in line
            ]
        if self.stderr_path.exists():
            lines += [
                line for line in self.stderr_path.read_text(errors="replace").splitlines() if line.strip()
            ]
        return lines

    # -- config

    def write_config(self, directory: Path) -> Path:
        """Write janus.jcfg, the HTTP transport's and the VideoRoom plugin's config; return janus.jcfg."""
        lib = _library_dir()
        disabled_plugins = [m for m in _modules(lib / "plugins") if m != VIDEOROOM_LIBRARY]
        disabled_transports = [m for m in _modules(lib / "transports") if m != HTTP_TRANSPORT]
        core: dict[str, dict[str, Any]] = {
            "general": {
                "configs_folder": str(directory),
                "plugins_folder": str(lib / "plugins"),
                "transports_folder": str(lib / "transports"),
                "events_folder": str(lib / "events"),
                "loggers_folder": str(lib / "loggers"),
                "log_to_stdout": True,
                "debug_level": self.debug_level,
                "debug_colors": False,
                "debug_timestamps": True,
                "server_name": "huddle-bench-janus",
                # The address in the SDP: Janus guesses it from the default route, which the namespace lacks.
                "interface": self.media_ip,
                "session_timeout": self.session_timeout,
                # One event loop per core, as an operator sizes it: Janus's default is a thread per handle,
                # two hundred threads for a 100-person call on two cores.
                "event_loops": self.event_loops,
                "hide_dependencies": True,
                "exit_on_dl_error": True,
                # No admin_secret: the admin API is off (janus.transport.http.jcfg) and nothing else uses it.
            },
            "certificates": {},  # none: Janus makes a self-signed DTLS certificate at startup
            "media": {
                "ipv6": False,
                "no_media_timer": 1,
            },
            "nat": {
                "nice_debug": False,
                "ice_lite": True,
                "ice_tcp": False,
                "full_trickle": False,
                "ice_enforce_list": self.interface,
                "ignore_mdns": True,
                # No stun_server / turn_server: host candidates on the veth are all there is.
            },
            "plugins": {"disable": ",".join(disabled_plugins) or None},
            "transports": {"disable": ",".join(disabled_transports) or None},
            "loggers": {"disable": ",".join(_modules(lib / "loggers")) or None},
            "events": {"broadcast": False, "disable": ",".join(_modules(lib / "events")) or None},
        }
        for section, keys in self.overrides.items():
            core.setdefault(section, {}).update(keys)
        http = {
            "general": {
                "json": "compact",
                "base_path": "/janus",
                "http": True,
                "port": self.port,
                "ip": self.host,
                "https": False,
                "events": False,
            },
            "admin": {"admin_http": False, "admin_https": False},
            "cors": {},
            "certificates": {},
        }
        # Rooms are created through the API by the benchmark; none are predefined.
        videoroom = {"general": {"events": False, "string_ids": False}}
        (directory / "janus.jcfg").write_text(render_jcfg(core))
        (directory / "janus.transport.http.jcfg").write_text(render_jcfg(http))
        (directory / "janus.plugin.videoroom.jcfg").write_text(render_jcfg(videoroom))
        return directory / "janus.jcfg"

    # -- lifecycle

    async def __aenter__(self) -> JanusServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        binary = shutil.which(self.binary)
        if binary is None:
            raise JanusStartError(f"`{self.binary}` not found: install the Debian package `janus`")
        self.media_ip = interface_ipv4(self.interface)
        if self.media_ip is None:
            raise JanusStartError(
                f"interface {self.interface} has no IPv4 address: Janus would offer no ICE candidate "
                "(run inside scripts/in-netns, which gives hx0 10.77.0.1)"
            )
        if self.port is None:
            self.port = _free_tcp_port(self.host)
        elif not _tcp_port_free(self.host, self.port):
            # Janus would say "Couldn't start webserver" and exit, but it may crash on the way out (SIGSEGV
            # seen) before its log thread has written that line.
            raise JanusStartError(
                f"{self.host}:{self.port} is in use: Janus's HTTP transport cannot listen there"
            )
        self.config_dir = Path(tempfile.mkdtemp(prefix="huddle-janus-"))
        config = self.write_config(self.config_dir)
        # Files, not pipes: nobody would drain a pipe during a benchmark and Janus would block on it.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        out, err = os.open(self.stdout_path, flags, 0o644), os.open(self.stderr_path, flags, 0o644)
        # Janus's log goes to stdout, which a file makes block-buffered: lines would be lost when it dies
        # (and it can die on its way out after a fatal startup error, SIGSEGV seen). stdbuf execs Janus with
        # line-buffered stdio, so the PID stays Janus's own.
        stdbuf = shutil.which("stdbuf")
        command = [
            *([stdbuf, "-oL", "-eL"] if stdbuf else []),
            binary,
            "-C",
            str(config),
            "-F",
            str(self.config_dir),
        ]
        try:
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.config_dir,  # where a core dump would land: not the caller's directory
                preexec_fn=_no_core_dumps,
                start_new_session=True,  # a terminal's Ctrl-C goes to the benchmark, which stops Janus
            )
        finally:
            os.close(out)
            os.close(err)
        try:
            self.info = await self._wait_ready()
            self._check_info()
        except JanusStartError:
            await self.stop(keep_files=True)  # the config and Janus's output stay for a look
            raise
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self) -> dict[str, Any]:
        assert self._process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                status = self._process.returncode
                if status is not None:
                    how = f"status {status}" if status >= 0 else f"signal {signal.Signals(-status).name}"
                    raise JanusStartError(self._failure(f"janus exited with {how}"))
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    async with http.get(f"{self.url}/info") as response:
                        if response.status == 200:
                            info = await response.json(content_type=None)
                            if info.get("janus") == "server_info":
                                return info
                if loop.time() > deadline:
                    raise JanusStartError(
                        self._failure(f"no answer from {self.url}/info after {self.startup_timeout} s")
                    )
                await asyncio.sleep(0.1)

    def _check_info(self) -> None:
        plugins = set(self.info.get("plugins", {}))
        transports = set(self.info.get("transports", {}))
        problems = []
        if plugins != {VIDEOROOM}:
            problems.append(f"plugins loaded: {sorted(plugins)} (want only {VIDEOROOM})")
        if transports != {JANUS_HTTP_NAME}:
            problems.append(f"transports loaded: {sorted(transports)} (want only {JANUS_HTTP_NAME})")
        if not self.info.get("ice-lite"):
            problems.append("ICE-lite is off")
        errors = self.log_errors()
        if errors:
            problems.append("errors at startup:\n  " + "\n  ".join(errors[-20:]))
        if problems:
            raise JanusStartError(self._failure("; ".join(problems)))

    def _failure(self, what: str) -> str:
        """A message that leads with Janus's own error lines, then the tails of its output."""
        lines = [f"Janus failed to start: {what}"]
        errors = self.log_errors()
        if errors and "errors at startup" not in what:
            lines += ["Janus said:", *(f"  {line}" for line in errors[-10:])]
        for path in (self.stdout_path, self.stderr_path):
            text = path.read_text(errors="replace").strip().splitlines()[-15:] if path.exists() else []
            if text:
                lines += [f"--- {path} (last lines)", *text]
        lines.append(f"(config and output kept in {self.config_dir})")
        return "\n".join(lines)

    async def stop(self, grace: float = 5.0, *, keep_files: bool = False) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; removes the config directory unless `keep_files`."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self.config_dir is not None and not keep_files:
            shutil.rmtree(self.config_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# The client


class JanusClient:
    """One Janus session over the HTTP transport, with its long-poll and keepalive tasks.

    Many handles (publishers and subscribers) can share a session; the poll loop takes up to `max_events`
    events per GET. Pass `http` to share one aiohttp session (and its connection pool) between clients.
    """

    def __init__(
        self,
        url: str,
        *,
        http: aiohttp.ClientSession | None = None,
        keepalive_interval: float = 25.0,
        request_timeout: float = 15.0,
        max_events: int = 50,
    ) -> None:
        self.url = url.rstrip("/")
        self.keepalive_interval = keepalive_interval
        self.request_timeout = request_timeout
        self.max_events = max_events
        self.session_id: int | None = None
        self.handles: dict[int, VideoRoomHandle] = {}
        self._http = http
        self._own_http = http is None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.failure: BaseException | None = None  # why the session ended, once it has

    async def __aenter__(self) -> JanusClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session_url(self) -> str:
        return f"{self.url}/{self.session_id}"

    async def info(self) -> dict[str, Any]:
        async with self._session().get(f"{self.url}/info") as response:
            return await response.json(content_type=None)

    async def connect(self) -> None:
        if self._http is None:
            # The long poll holds its connection for up to 30 s; no overall timeout on the session.
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        created = await self._post(self.url, {"janus": "create"})
        self.session_id = created["data"]["id"]
        self._tasks = [
            asyncio.create_task(self._poll(), name=f"janus-poll-{self.session_id}"),
            asyncio.create_task(self._keepalive(), name=f"janus-keepalive-{self.session_id}"),
        ]

    async def close(self) -> None:
        """Destroy the session (Janus detaches its handles and hangs up their PeerConnections)."""
        if self._closed:
            return
        self._closed = True
        if self.session_id is not None and self.failure is None:
            with contextlib.suppress(JanusError, aiohttp.ClientError, TimeoutError):
                await self._post(self.session_url, {"janus": "destroy"})
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_pending(ConnectionError("Janus session closed"))
        if self._own_http and self._http is not None:
            await self._http.close()

    async def attach(self, opaque_id: str | None = None) -> VideoRoomHandle:
        """Attach a new VideoRoom handle to this session."""
        body: dict[str, Any] = {"janus": "attach", "plugin": VIDEOROOM}
        if opaque_id is not None:
            body["opaque_id"] = opaque_id
        attached = await self._post(self.session_url, body)
        handle = VideoRoomHandle(self, attached["data"]["id"])
        self.handles[handle.id] = handle
        return handle

    # -- transport

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("JanusClient is not connected")
        return self._http

    async def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST one request; return Janus's immediate reply (success or ack), raise on error."""
        body = {**body, "transaction": body.get("transaction") or secrets.token_hex(8)}
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        async with self._session().post(url, json=body, timeout=timeout) as response:
            reply = await response.json(content_type=None)
        if reply.get("janus") == "error":
            error = reply.get("error", {})
            if error.get("code") == 458 and self.failure is None:  # no such session
                self._gone("no such session (expired or destroyed)")
            raise JanusError(error.get("code"), error.get("reason", "?"), body)
        return reply

    async def message(
        self, handle_id: int, body: dict[str, Any], jsep: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Send a plugin message; return the plugin's reply, synchronous (`success`) or on the long poll.

        The returned dict is the whole Janus message: `plugindata.data` holds the plugin's answer and `jsep`
        the SDP when there is one. Raises JanusError on a plugin error.
        """
        if self.failure is not None:
            raise self.failure
        transaction = secrets.token_hex(8)
        request: dict[str, Any] = {"janus": "message", "transaction": transaction, "body": body}
        if jsep is not None:
            request["jsep"] = jsep
        # Registered before the POST: the event can come back on the long poll before the POST's own reply.
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[transaction] = future
        try:
            reply = await self._post(f"{self.session_url}/{handle_id}", request)
            if reply.get("janus") != "ack":
                message = reply
            else:
                message = await asyncio.wait_for(future, self.request_timeout)
        finally:
            self._pending.pop(transaction, None)
        if message.get("janus") == "error":
            error = message.get("error", {})
            raise JanusError(error.get("code"), error.get("reason", "?"), body)
        data = message.get("plugindata", {}).get("data", {})
        if "error_code" in data or data.get("videoroom") == "error":
            raise JanusError(data.get("error_code"), data.get("error", "?"), body)
        return message

    async def trickle(self, handle_id: int, candidate: dict[str, Any] | None = None) -> None:
        """Send one trickled candidate, or (None) the end of candidates."""
        request = {"janus": "trickle", "candidate": candidate or {"completed": True}}
        await self._post(f"{self.session_url}/{handle_id}", request)

    async def _poll(self) -> None:
        failures = 0
        while not self._closed:
            url = f"{self.session_url}?maxev={self.max_events}"  # maxev: a JSON array of up to that many
            try:
                # Janus answers after at most 30 s (a keepalive) when nothing happens.
                timeout = aiohttp.ClientTimeout(total=60)
                async with self._session().get(url, timeout=timeout) as response:
                    status = response.status
                    payload = await response.json(content_type=None) if status == 200 else None
                failures = 0
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                failures += 1
                if failures >= 5:
                    self._gone(f"long poll failed: {e!r}")
                    return
                await asyncio.sleep(0.2 * failures)
                continue
            if status == 404:  # what Janus answers a GET on a session that no longer exists, with no body
                self._gone("no such session (expired or destroyed)")
                return
            for event in payload if isinstance(payload, list) else [payload]:
                if not isinstance(event, dict):
                    continue
                if event.get("janus") == "timeout":  # the session expired: no request for session_timeout
                    self._gone("session timed out (no keepalive)")
                    return
                self._dispatch(event)

    def _gone(self, why: str) -> None:
        """The session is over on Janus's side: fail every request waiting and every wait_event."""
        self.failure = ConnectionError(f"Janus session {self.session_id}: {why}")
        self._fail_pending(self.failure)

    def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event.get("janus")
        if kind == "keepalive":
            return
        future = self._pending.get(event.get("transaction") or "")
        if future is not None and not future.done() and kind in ("event", "success", "error"):
            future.set_result(event)
            return
        handle = self.handles.get(event.get("sender") or 0)
        if handle is not None:
            handle._deliver(event)
            if kind == "detached":
                self.handles.pop(handle.id, None)

    def _fail_pending(self, error: BaseException) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        for handle in self.handles.values():
            handle._wake()

    async def _keepalive(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.keepalive_interval)
            with contextlib.suppress(JanusError, aiohttp.ClientError, TimeoutError):
                await self._post(self.session_url, {"janus": "keepalive"})


def _jsep_sdp(message: dict[str, Any], kind: str) -> str:
    jsep = message.get("jsep")
    if not jsep or jsep.get("type") != kind:
        raise JanusError(None, f"expected a jsep {kind} in {message}")
    return jsep["sdp"]


class VideoRoomHandle:
    """A handle attached to janus.plugin.videoroom: room administration, a publisher, or a subscriber.

    Events Janus sends on its own (webrtcup, media, slowlink, hangup, publishers, leaving, substream
    changes...) are kept in `events` (the last `mailbox` of them); `wait_event` takes matching ones out.
    """

    def __init__(self, client: JanusClient, handle_id: int, mailbox: int = 1000) -> None:
        self.client = client
        self.id = handle_id
        self.room: int | None = None
        self.feed_id: int | None = None  # as a publisher: the id others subscribe to
        self.private_id: int | None = None
        self.streams: list[dict[str, Any]] = []  # as a publisher or subscriber: Janus's list of streams
        self.events: deque[dict[str, Any]] = deque(maxlen=mailbox)
        self._arrived = asyncio.Event()

    def _deliver(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._wake()

    def _wake(self) -> None:
        self._arrived.set()

    async def wait_event(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """Take the first stored or future event for which `match(event)` is true."""
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events:
                    if match(event):
                        self.events.remove(event)
                        return event
                if self.client.failure is not None:
                    raise self.client.failure
                self._arrived.clear()
                await self._arrived.wait()

    async def wait_webrtcup(self, timeout: float = 10.0) -> None:
        """Until Janus reports the PeerConnection up (ICE and DTLS done). A publisher becomes a feed others
        can subscribe to only then (before, `subscribe` to it fails with 428 "No such feed")."""
        await self.wait_event(lambda e: e.get("janus") == "webrtcup", timeout)

    async def request(self, body: dict[str, Any], jsep: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.client.message(self.id, body, jsep)

    @staticmethod
    def data(message: dict[str, Any]) -> dict[str, Any]:
        return message.get("plugindata", {}).get("data", {})

    # -- rooms

    async def create_room(
        self,
        room: int | None = None,
        *,
        publishers: int = 100,
        videocodec: str = "vp8",
        audiocodec: str = "opus",
        bitrate: int = 0,
        fir_freq: int = 0,
        **options: Any,
    ) -> int:
        """Create a room (not permanent); return its id. Janus 1.x rooms take simulcast publishers as they
        are (there is no room option for it). `options` go into the request as they are, e.g.
        `notify_joining=True`, `audiolevel_ext=True`, `transport_wide_cc_ext=True`."""
        body: dict[str, Any] = {
            "request": "create",
            "publishers": publishers,
            "videocodec": videocodec,
            "audiocodec": audiocodec,
            "bitrate": bitrate,
            "fir_freq": fir_freq,
            "permanent": False,
            "is_private": False,
            **options,
        }
        if room is not None:
            body["room"] = room
        created = self.data(await self.request(body))
        return created["room"]

    async def destroy_room(self, room: int) -> None:
        await self.request({"request": "destroy", "room": room, "permanent": False})

    async def list_rooms(self) -> list[dict[str, Any]]:
        return self.data(await self.request({"request": "list"}))["list"]

    async def list_participants(self, room: int) -> list[dict[str, Any]]:
        """[{id, display, publisher, talking?}, ...] of everyone joined in the room (publishers or not)."""
        return self.data(await self.request({"request": "listparticipants", "room": room}))["participants"]

    # -- publisher

    async def publish(
        self,
        room: int,
        offer_sdp: str,
        *,
        display: str | None = None,
        feed_id: int | None = None,
        rid_order: str | None = None,
        **options: Any,
    ) -> str:
        """Join `room` as a publisher with an SDP offer (one `joinandconfigure` request); return the answer.

        Simulcast (rid or SSRC-group based) is taken from the offer. Janus reads rids as highest first
        unless the offer's jsep says `rid_order: "lmh"` (lowest first, as Chromium offers them). `options`
        are further `configure` fields, e.g. `bitrate=...` or `descriptions=[{"mid": "1", ...}]`.
        """
        body: dict[str, Any] = {"request": "joinandconfigure", "ptype": "publisher", "room": room, **options}
        if display is not None:
            body["display"] = display
        if feed_id is not None:
            body["id"] = feed_id
        jsep = {"type": "offer", "sdp": offer_sdp}
        if rid_order is not None:
            jsep["rid_order"] = rid_order
        message = await self.request(body, jsep)
        joined = self.data(message)
        self.room = room
        self.feed_id = joined.get("id")
        self.private_id = joined.get("private_id")
        self.streams = joined.get("streams", [])
        return _jsep_sdp(message, "answer")

    async def unpublish(self) -> None:
        await self.request({"request": "unpublish"})

    async def leave(self) -> None:
        await self.request({"request": "leave"})

    # -- subscriber

    async def subscribe(
        self,
        room: int,
        feeds: Iterable[int | dict[str, Any]],
        *,
        private_id: int | None = None,
        **options: Any,
    ) -> str:
        """Join `room` as a subscriber of `feeds` (publisher ids, or `{"feed": id, "mid": ..., "substream":
        ...}` stream entries) on one PeerConnection; return Janus's SDP offer. Answer it with `start`."""
        body: dict[str, Any] = {
            "request": "join",
            "ptype": "subscriber",
            "room": room,
            "streams": [_stream_entry(feed) for feed in feeds],
            **options,
        }
        if private_id is not None:
            body["private_id"] = private_id
        message = await self.request(body)
        self.room = room
        self.streams = self.data(message).get("streams", [])
        return _jsep_sdp(message, "offer")

    async def start(self, answer_sdp: str) -> None:
        """Answer the subscription's offer (first one or after `update`): media starts flowing."""
        await self.request({"request": "start"}, {"type": "answer", "sdp": answer_sdp})

    async def update(
        self,
        subscribe: Iterable[int | dict[str, Any]] = (),
        unsubscribe: Iterable[int | dict[str, Any]] = (),
    ) -> str | None:
        """Add and/or remove feeds on this subscription; return Janus's new offer (answer it with `start`),
        or None when nothing changed."""
        body: dict[str, Any] = {"request": "update"}
        if subscribe:
            body["subscribe"] = [_stream_entry(f) for f in subscribe]
        if unsubscribe:
            body["unsubscribe"] = [_stream_entry(f) for f in unsubscribe]
        message = await self.request(body)
        data = self.data(message)
        if "streams" in data:
            self.streams = data["streams"]
        return message["jsep"]["sdp"] if message.get("jsep") else None

    def video_mids(self) -> list[str]:
        return [s["mid"] for s in self.streams if s.get("type") == "video" and s.get("active", True)]

    async def configure(
        self,
        *,
        substream: int | None = None,
        temporal: int | None = None,
        mid: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Subscriber: choose the simulcast layer (`substream` 0 = low, 1, 2 = high; `temporal`) of the video
        stream `mid`, or of every video stream of this subscription. Janus answers `configured: ok` at once
        and switches on a keyframe of that layer; the switch itself comes as an event with `substream`."""
        mids = [mid] if mid is not None else self.video_mids()
        entry: dict[str, Any] = {**options}
        if substream is not None:
            entry["substream"] = substream
        if temporal is not None:
            entry["temporal"] = temporal
        body = {"request": "configure", "streams": [{"mid": m, **entry} for m in mids]}
        return self.data(await self.request(body))

    # -- both

    async def detach(self) -> None:
        await self.client._post(f"{self.client.session_url}/{self.id}", {"janus": "detach"})
        self.client.handles.pop(self.id, None)

    async def hangup(self) -> None:
        await self.client._post(f"{self.client.session_url}/{self.id}", {"janus": "hangup"})


def _stream_entry(feed: int | dict[str, Any]) -> dict[str, Any]:
    return dict(feed) if isinstance(feed, dict) else {"feed": feed}
