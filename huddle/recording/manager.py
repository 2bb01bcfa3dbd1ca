"""Recordings of this node: start and stop per room, the pipeline behind each, finishing, storage, listing.

A recording of a room is a Recorder on its Router (the call moves to the SFU first) whose records go to
the outputs chosen for it: `composite`, a CompositeWorker process writing the speaker-view MP4, and
`tracks`, the recording log (keyed by room) that the TrackConsumer reads to write one WebM per track and a
manifest. When it stops, the files go to the store through the durable Uploader, under
`<room>/<recording id>/`. Files are written under `<recordings dir>/.partial` meanwhile, so a local store
lists only finished recordings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huddle.logs import event
from huddle.recording.log import InProcessLog, RecordingLog
from huddle.recording.recorder import STOP_GRACE, Recorder
from huddle.recording.store import ObjectStream, Store, StoreError, Uploader, store_from_settings
from huddle.recording.worker import CompositeWorker

if TYPE_CHECKING:
    from huddle.calls.registry import Calls
    from huddle.calls.room import Room
    from huddle.config import Settings
    from huddle.recording.tracks import TrackConsumer, TrackWriter

log = logging.getLogger("huddle.recording")

OUTPUTS = ("composite", "tracks")
COMPOSITE_FILE = "speaker-view.mp4"
FINISH_TIMEOUT = 60.0  # seconds a stopped recording's outputs get to finish their files
SHUTDOWN_UPLOAD_WAIT = 10.0  # on shutdown, how long to wait for uploads (the spool keeps the rest)


class RecordingError(Exception):
    """A request about recordings that cannot be done; `code` is the signaling error code / HTTP status."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(slots=True)
class RecordingInfo:
    id: str
    room: str
    outputs: tuple[str, ...]
    started_at: float
    started_by: str
    state: str = "recording"  # → "processing" (finishing files) → "uploading" → "stored" | "failed"
    stopped_at: float | None = None
    files: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "room": self.room,
            "outputs": list(self.outputs),
            "state": self.state,
            "started_at": self.started_at,
            "stopped_at": self.stopped_at,
            "started_by": self.started_by,
        }


@dataclass(slots=True)
class _Running:
    info: RecordingInfo
    recorder: Recorder
    composite: CompositeWorker | None


class Recordings:
    def __init__(
        self,
        calls: Calls,
        *,
        root: Path,
        store: Store,
        max_recordings: int,
        recording_log: RecordingLog | None = None,
        node_id: str = "local",
    ) -> None:
        self.calls = calls
        self.max_recordings = max_recordings
        self.root = root
        self.work = root / ".partial"
        self.store = store
        # One spool per node: --workers siblings share the recordings folder, and a spool has one uploader.
        self.uploader = Uploader(store, root / ".spool" / node_id)
        self.log = recording_log or InProcessLog()
        # The per-track writer starts with the first recording that needs it: it loads PyAV, which a node
        # that never records need not carry.
        self.writer: TrackWriter | None = None
        self.tracks: TrackConsumer | None = None
        self._running: dict[str, _Running] = {}  # by room
        self._finishing: dict[str, RecordingInfo] = {}  # by id: stopped, files not stored yet
        self._tasks: set[asyncio.Task[None]] = set()  # finishing files
        self._uploads: set[asyncio.Task[None]] = set()  # waiting for the store to have them
        calls.room_closed.append(self._room_closed)

    @classmethod
    def from_settings(cls, calls: Calls, settings: Settings) -> Recordings:
        root = Path(settings.recordings_dir)
        store = store_from_settings(
            root,
            settings.s3_endpoint,
            settings.s3_bucket,
            settings.s3_access_key,
            settings.s3_secret_key,
            settings.s3_region,
        )
        return cls(
            calls, root=root, store=store, max_recordings=settings.max_recordings, node_id=settings.node_id
        )

    async def start(self) -> None:
        (self.work / "composite").mkdir(parents=True, exist_ok=True)
        self.uploader.start()

    def _track_consumer(self) -> TrackConsumer:
        if self.tracks is None:
            from huddle.recording.tracks import TrackConsumer, TrackWriter

            self.writer = TrackWriter(self.work / "tracks")
            self.tracks = TrackConsumer(self.log, self.writer)
            self.tracks.start()
        return self.tracks

    # -- Start and stop -------------------------------------------------------------------------------------

    def running(self, room: str) -> RecordingInfo | None:
        running = self._running.get(room)
        return running.info if running is not None else None

    def begin(self, room_name: str, *, by: str, outputs: tuple[str, ...] = OUTPUTS) -> RecordingInfo:
        room = self.calls.get(room_name)
        if room is None or not len(room):
            raise RecordingError("not_found", f"nobody is in room {room_name!r}: nothing to record", 404)
        if room_name in self._running:
            raise RecordingError("already_recording", "this call is being recorded already", 409)
        unknown = [o for o in outputs if o not in OUTPUTS]
        if unknown or not outputs:
            raise RecordingError("bad_request", f"outputs must be some of {list(OUTPUTS)}", 400)
        # Those still finishing their files hold their worker process too: counting only running ones would
        # let start-stop loops pile up workers.
        busy = len(self._running) + len(self._tasks)
        if busy >= self.max_recordings:
            raise RecordingError(
                "too_many_recordings",
                f"this node is making or finishing {busy} recordings, its limit (--max-recordings "
                f"{self.max_recordings}); try again when one has finished",
                503,
            )
        router = self.calls.move_to_sfu(room)
        if router is None:
            raise RecordingError("unavailable", "this node has no SFU to record with", 503)
        started = time.time()
        rid = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started)) + "-" + secrets.token_hex(3)
        info = RecordingInfo(rid, room_name, tuple(o for o in OUTPUTS if o in outputs), started, by)
        if "tracks" in info.outputs:
            self._track_consumer()
        composite = None
        if "composite" in info.outputs:
            composite = CompositeWorker(self.work / "composite" / f"{rid}.mp4")
            try:
                composite.start()
            except OSError as exc:  # out of processes or memory: say so, and keep the call as it is
                raise RecordingError("unavailable", f"cannot start the composite worker: {exc}", 503) from exc
        emit = _emitter(self.log, room_name, composite, "tracks" in info.outputs)
        recorder = Recorder(
            rid,
            router,
            emit,
            started_at=started,
            outputs=info.outputs,
            names=lambda pid: _name(room, pid),
        )
        self._running[room_name] = _Running(info, recorder, composite)
        room.recording = info.describe()
        room.broadcast({"type": "recording", "recording": room.recording})
        event(
            log, logging.INFO, "recording started", room=room_name, recording=rid, by=by, outputs=info.outputs
        )
        return info

    def end(
        self, room_name: str, recording_id: str | None = None, *, reason: str = "stopped"
    ) -> RecordingInfo:
        running = self._running.get(room_name)
        if running is None or (recording_id is not None and running.info.id != recording_id):
            raise RecordingError("not_recording", "no such recording is running in this call", 404)
        del self._running[room_name]
        info = running.info
        info.stopped_at = info.started_at + running.recorder.stop()
        info.state = "processing"
        self._finishing[info.id] = info
        room = self.calls.get(room_name)
        if room is not None:
            room.recording = None
            room.broadcast({"type": "recording", "recording": info.describe()})
        event(
            log,
            logging.INFO,
            "recording stopped",
            room=room_name,
            recording=info.id,
            reason=reason,
            seconds=round(info.stopped_at - info.started_at, 1),
        )
        task = asyncio.get_running_loop().create_task(self._finish(running))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return info

    def _room_closed(self, room: Room) -> None:
        if room.name in self._running:
            self.end(room.name, reason="call ended")

    async def _finish(self, running: _Running) -> None:
        """Wait for the outputs to close their files, then hand them to the uploader (manifest last)."""
        info = running.info
        prefix = f"{info.room}/{info.id}/"
        try:
            await asyncio.sleep(STOP_GRACE)
            running.recorder.finish()
            if running.composite is not None:
                await running.composite.stop(timeout=FINISH_TIMEOUT)
                path = running.composite.path
                if path.exists():
                    await self.uploader.submit(prefix + COMPOSITE_FILE, path)
                    info.files.append(COMPOSITE_FILE)
            if "tracks" in info.outputs:
                assert self.tracks is not None and self.writer is not None
                try:
                    paths = await self.tracks.wait_finished(info.id, FINISH_TIMEOUT)
                except TimeoutError:
                    # Its stop record was lost (a full log drops): finish with what was written.
                    await self.tracks.finish(info.id)
                    paths = await self.tracks.wait_finished(info.id, FINISH_TIMEOUT)
                base = self.writer.root / info.id
                for path in paths:
                    name = path.relative_to(base).as_posix()
                    await self.uploader.submit(prefix + name, path)
                    info.files.append(name)
        except Exception as exc:  # one recording's failure must not stop the others from finishing
            info.state = "failed"
            self._finishing.pop(info.id, None)
            event(log, logging.ERROR, "recording could not be finished", recording=info.id, error=repr(exc))
            return
        # The files are safe in the spool; the listing says "uploading" until the store has them all.
        info.state = "uploading"
        task = asyncio.get_running_loop().create_task(self._until_stored(info, prefix + info.files[-1]))
        self._uploads.add(task)
        task.add_done_callback(self._uploads.discard)

    async def _until_stored(self, info: RecordingInfo, last_key: str) -> None:
        """The uploader keeps submission order, so the last file stored means all of them are."""
        try:
            await self.uploader.wait_uploaded(last_key)
            info.state = "stored"
        finally:
            self._finishing.pop(info.id, None)

    # -- Listing and download -------------------------------------------------------------------------------

    async def list(self, room_name: str) -> list[dict[str, Any]]:
        """Running, finishing and stored recordings of a room, newest first."""
        found: dict[str, dict[str, Any]] = {}
        try:
            stored = await self.store.list(f"{room_name}/")
        except StoreError as exc:
            raise RecordingError(
                "store_unreachable", f"the recordings store ({self.store.describe()}) failed: {exc}", 503
            ) from exc
        for obj in stored:
            parts = obj.key.split("/", 2)
            if len(parts) != 3:
                continue  # not a recording's file (something else put into the bucket)
            _, rid, name = parts
            entry = found.setdefault(rid, {"id": rid, "room": room_name, "state": "stored", "files": []})
            entry["files"].append({"name": name, "size": obj.size, "url": _file_url(room_name, rid, name)})
        pending = [r.info for r in self._running.values() if r.info.room == room_name]
        pending += [i for i in self._finishing.values() if i.room == room_name]
        for info in pending:
            entry = found.setdefault(info.id, {"id": info.id, "room": room_name, "files": []})
            entry.update(info.describe())
        for entry in found.values():
            entry["files"].sort(key=lambda f: (f["name"] != COMPOSITE_FILE, f["name"]))
        return sorted(found.values(), key=lambda e: e["id"], reverse=True)

    async def open(self, room_name: str, recording_id: str, name: str) -> ObjectStream:
        key = f"{room_name}/{recording_id}/{name}"
        try:
            return await self.store.read(key)
        except (FileNotFoundError, ValueError) as exc:  # missing, or not a key at all (`..`, say)
            raise RecordingError("not_found", "no such recording file", 404) from exc
        except StoreError as exc:
            raise RecordingError(
                "store_unreachable", f"the recordings store ({self.store.describe()}) failed: {exc}", 503
            ) from exc

    # -- Shutdown -------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every recording and finish its files (SIGTERM lands here): they stay playable."""
        for room_name in list(self._running):
            self.end(room_name, reason="shutdown")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.tracks is not None:
            await self.tracks.close()
        if not await self.uploader.wait_idle(SHUTDOWN_UPLOAD_WAIT):
            event(
                log,
                logging.WARNING,
                "recordings not uploaded yet stay in the spool and go up at the next start",
                pending=self.uploader.pending,
                store=self.store.describe(),
            )
        for task in list(self._uploads):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.uploader.close()


def _emitter(recording_log: RecordingLog, key: str, composite: CompositeWorker | None, tracks: bool):
    if composite is not None and tracks:

        def both(data: bytes) -> None:
            recording_log.publish(key, data)
            composite.send(data)

        return both
    if composite is not None:
        return composite.send
    return lambda data: recording_log.publish(key, data)


def _name(room: Room, participant_id: str) -> str:
    participant = room.participants.get(participant_id)
    return participant.name if participant is not None else participant_id


def _file_url(room: str, recording_id: str, name: str) -> str:
    return f"/api/rooms/{room}/recordings/{recording_id}/files/{name}"
