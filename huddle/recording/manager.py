"""Recordings of this node: start and stop per room, the pipeline behind each, finishing, storage, listing.

A recording of a room is a Recorder on its Router (the call moves to the SFU first) whose records go to
the outputs chosen for it: `composite`, a CompositeWorker process writing the speaker-view MP4, and
`tracks`, the recording log (keyed by room) that the TrackConsumer reads to write one WebM per track and a
manifest. When it stops, the files go to the store through the durable Uploader, under
`<room>/<recording id>/`. Files are written under `<recordings dir>/.partial` meanwhile, so a local store
lists only finished recordings.

A recording outlives the node that makes it: its clients' resume tokens name it, and the node that rebuilds
the call from them (the same one restarted, or a standby that took over) goes on with it as a new segment of
the same recording, stored under `<room>/<recording id>/segment-<n>/`; that segment's manifest says how long
the gap before it was. A node that stops (shutdown, fencing) finishes its segment's files without telling
the participants that the recording stopped, since it has not: it goes on where the call goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huddle.logs import event
from huddle.recording import segments
from huddle.recording.log import InProcessLog, ReadableLog, RecordingLog
from huddle.recording.recorder import STOP_GRACE, Recorder
from huddle.recording.store import (
    ObjectStream,
    Store,
    StoredObject,
    StoreError,
    Uploader,
    store_from_settings,
)
from huddle.recording.worker import CompositeWorker

if TYPE_CHECKING:
    from huddle.calls.registry import Calls
    from huddle.calls.resume import RecordingClaim
    from huddle.calls.room import Room
    from huddle.config import Settings
    from huddle.recording.kafka_log import KafkaLog
    from huddle.recording.tracks import TrackConsumer, TrackWriter
    from huddle.sfu.router import Router

log = logging.getLogger("huddle.recording")

OUTPUTS = ("composite", "tracks")
COMPOSITE_FILE = "speaker-view.mp4"
MANIFEST_FILE = "manifest.json"
CHAT_FILE = "chat.json"
MAX_CHAT_MESSAGES = 100_000  # per recording: a flood of chat must not fill the node's memory
MAX_MANIFEST_BYTES = 4 << 20  # a manifest read back (to measure a gap, to name a listing's files)
MANIFESTS_CACHED = 512  # manifests' track lists kept for listings: stored manifests do not change
MANIFEST_READS = 8  # at once, for one listing
_RECORDING_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}")
_SEGMENT_KEY = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}(\.[0-9a-f]{6})?")
_SEGMENT = re.compile(r"segment-([0-9]{1,6})/")
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
    # This node's part of it: the key its records carry (the id for the first segment, another after a
    # failover) and when that segment started. The call's other nodes record their own participants'
    # tracks under the same key when the records go through Kafka.
    segment: str = ""
    segment_started_at: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "room": self.room,
            "outputs": list(self.outputs),
            "state": self.state,
            "started_at": self.started_at,
            "stopped_at": self.stopped_at,
            "started_by": self.started_by,
            "segment": {
                "key": self.segment or self.id,
                "started_at": self.segment_started_at or self.started_at,
            },
        }


@dataclass(slots=True)
class _Running:
    info: RecordingInfo
    recorder: Recorder
    composite: CompositeWorker | None
    # What this node's outputs know the segment by (its files, the log's records): the recording's id for
    # the first segment; a continuation has one of its own, as the first one's files may still be here.
    key: str
    since: float  # Unix time this segment started: 0 of its recorder's clock
    continued: bool  # a later segment: another node (or this one before a restart) recorded the first
    # The call's chat while it was recorded (times on the recorder's clock), stored as chat.json.
    chat: list[dict[str, Any]] = field(default_factory=list)


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
        # With Kafka (a log this process does not read) `huddle record-consumer` writes the per-track files;
        # with the in-process log this node does.
        self.writes_tracks = isinstance(self.log, ReadableLog)
        # Recorders of this node's own participants' tracks, for recordings another node of the call started
        # (Kafka only: with the in-process log that node's recorder gets every track through its pipes).
        self._following: dict[str, Recorder] = {}  # by room
        self._closing = False
        # The per-track writer starts with the first recording that needs it: it loads PyAV, which a node
        # that never records need not carry.
        self.writer: TrackWriter | None = None
        self.tracks: TrackConsumer | None = None
        self._running: dict[str, _Running] = {}  # by room
        self._finishing: dict[str, RecordingInfo] = {}  # by id: stopped, files not stored yet
        self._tasks: set[asyncio.Task[None]] = set()  # finishing files
        self._uploads: set[asyncio.Task[None]] = set()  # waiting for the store to have them
        # (key, size, modified) of a stored manifest → its files' people, for listings.
        self._manifest_files: OrderedDict[tuple[str, int, float], dict[str, dict[str, str]]] = OrderedDict()
        calls.room_closed.append(self._room_closed)
        calls.recording_restored.append(self._go_on)
        calls.recording_elsewhere.append(self._follow)
        calls.chat_posted.append(self._chat)

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
        recording_log: KafkaLog | None = None
        if settings.kafka:
            from huddle.recording.kafka_log import KafkaLog

            recording_log = KafkaLog(
                settings.kafka,
                settings.kafka_topic,
                buffer_dir=root / ".kafka-buffer" / settings.node_id,
                max_buffer_bytes=settings.kafka_buffer_mb << 20,
                client_id=f"huddle-{settings.node_id}",
            )
        return cls(
            calls,
            root=root,
            store=store,
            max_recordings=settings.max_recordings,
            recording_log=recording_log,
            node_id=settings.node_id,
        )

    async def start(self) -> None:
        (self.work / "composite").mkdir(parents=True, exist_ok=True)
        self.uploader.start()
        if not self.writes_tracks:
            await self.log.start()  # type: ignore[attr-defined]

    def _track_consumer(self) -> TrackConsumer:
        if self.tracks is None:
            from huddle.recording.tracks import TrackConsumer, TrackWriter

            self.writer = TrackWriter(self.work / "tracks")
            self.tracks = TrackConsumer(self.log, self.writer)
            self.tracks.start()
        return self.tracks

    def _emitters(
        self, room: str, composite: CompositeWorker | None, tracks: bool
    ) -> tuple[_Emit | None, _Emit | None]:
        """(everyone's records, this node's participants' records) for a Recorder: the log of a node that
        writes the tracks itself gets everyone's (its Router has every node's tracks); Kafka gets this node's
        participants' tracks, since the call's other nodes publish theirs."""
        if self.writes_tracks or not tracks:
            return _emitter(self.log, room, composite, tracks), None
        publish = self.log.publish
        return (composite.send if composite is not None else None), lambda data: publish(room, data)

    # -- Start and stop -------------------------------------------------------------------------------------

    def running(self, room: str) -> RecordingInfo | None:
        running = self._running.get(room)
        return running.info if running is not None else None

    def begin(self, room_name: str, *, by: str, outputs: tuple[str, ...] = OUTPUTS) -> RecordingInfo:
        room = self.calls.get(room_name)
        if room is None or not room.size():
            raise RecordingError("not_found", f"nobody is in room {room_name!r}: nothing to record", 404)
        # A call over several nodes is recorded once, by the node that started it (its Router has every
        # node's tracks); the others know of it from `recording`.
        if room_name in self._running or room.recording is not None:
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
        self._launch(room, router, info, key=rid, since=started, continued=False)
        self.calls.reissue_resume_tokens(room)
        event(
            log, logging.INFO, "recording started", room=room_name, recording=rid, by=by, outputs=info.outputs
        )
        return info

    def _go_on(self, room: Room, claim: RecordingClaim) -> None:
        """A call is rebuilt here from a token saying `claim` was being recorded: record on, as a new segment
        of the same recording (Calls.recording_restored)."""
        if room.name in self._running or claim.id in self._finishing:
            return  # recorded here already, or stopped here and the token is older than the stop
        outputs = tuple(o for o in OUTPUTS if o in claim.outputs)
        if not _RECORDING_ID.fullmatch(claim.id) or not outputs:
            event(log, logging.WARNING, "recording in a resume token unusable", room=room.name, id=claim.id)
            return
        busy = len(self._running) + len(self._tasks)
        if busy >= self.max_recordings:
            event(
                log,
                logging.WARNING,
                "recording cannot go on here: --max-recordings reached",
                room=room.name,
                recording=claim.id,
                limit=self.max_recordings,
            )
            return
        router = self.calls.move_to_sfu(room)
        if router is None:
            return
        info = RecordingInfo(claim.id, room.name, outputs, claim.started_at, claim.started_by)
        key = f"{claim.id}.{secrets.token_hex(3)}"
        try:
            self._launch(room, router, info, key=key, since=time.time(), continued=True)
        except RecordingError as exc:
            event(log, logging.ERROR, "recording cannot go on here", recording=claim.id, error=exc.message)
            return
        event(log, logging.WARNING, "recording goes on after a restart", room=room.name, recording=claim.id)

    def _follow(self, room: Room, state: dict[str, Any] | None) -> None:
        """Another node of the call started or stopped recording it (Calls.recording_elsewhere). With Kafka,
        this node publishes its own participants' tracks under that node's segment key; with the in-process
        log, that node's recorder gets them through its pipes and nothing happens here."""
        if self.writes_tracks:
            return
        segment = (state or {}).get("segment") or {}
        key, since = segment.get("key"), segment.get("started_at")
        following = self._following.get(room.name)
        if following is not None and state is not None and following.recording_id == key:
            return  # told again (a link to that node came back)
        self._stop_following(room.name)
        if state is None or "tracks" not in (state.get("outputs") or ()):
            return
        if (
            not isinstance(key, str)
            or not _SEGMENT_KEY.fullmatch(key)
            or not isinstance(since, int | float)
            or room.name in self._running
        ):
            event(log, logging.WARNING, "recording of another node unusable here", room=room.name, key=key)
            return
        router = self.calls.move_to_sfu(room)
        if router is None:
            return
        publish = self.log.publish
        name = room.name
        self._following[name] = Recorder(
            key,
            router,
            None,
            emit_local=lambda data: publish(name, data),
            started_at=float(since),
            outputs=tuple(o for o in OUTPUTS if o in state["outputs"]),
            names=lambda pid: _name(room, pid),
            announce_stop=False,
        )
        event(log, logging.INFO, "recording this node's part of a call", room=name, recording=key)

    def _chat(self, room: Room, entry: dict[str, Any]) -> None:
        running = self._running.get(room.name)
        if running is not None and len(running.chat) < MAX_CHAT_MESSAGES:
            at = round(entry["at"] - running.since, 3)
            running.chat.append({"at": at, **{k: entry[k] for k in ("from", "name", "text")}})

    def _stop_following(self, room_name: str) -> None:
        recorder = self._following.pop(room_name, None)
        if recorder is not None:
            recorder.stop()
            # Frames captured before the stop may still be on their way (Recorder.finish's docstring).
            asyncio.get_running_loop().call_later(STOP_GRACE, recorder.finish)

    def _launch(
        self, room: Room, router: Router, info: RecordingInfo, *, key: str, since: float, continued: bool
    ) -> None:
        info.segment, info.segment_started_at = key, since
        if "tracks" in info.outputs and self.writes_tracks:
            self._track_consumer()
        composite = None
        if "composite" in info.outputs:
            composite = CompositeWorker(self.work / "composite" / f"{key}.mp4")
            try:
                composite.start()
            except OSError as exc:  # out of processes or memory: say so, and keep the call as it is
                raise RecordingError("unavailable", f"cannot start the composite worker: {exc}", 503) from exc
        emit, emit_local = self._emitters(room.name, composite, "tracks" in info.outputs)
        recorder = Recorder(
            key,
            router,
            emit,
            emit_local=emit_local,
            started_at=since,
            outputs=info.outputs,
            names=lambda pid: _name(room, pid),
        )
        self._running[room.name] = _Running(info, recorder, composite, key, since, continued)
        room.recording = info.describe()
        self.calls.announce_recording(room, room.recording)

    def end(
        self, room_name: str, recording_id: str | None = None, *, reason: str = "stopped", tell: bool = True
    ) -> RecordingInfo:
        """Stop a recording and finish its files. With `tell` false (this node stops serving the call, which
        goes on elsewhere) the participants are not told, and their tokens still name the recording."""
        running = self._running.get(room_name)
        if running is None or (recording_id is not None and running.info.id != recording_id):
            raise RecordingError("not_recording", "no such recording is running in this call", 404)
        del self._running[room_name]
        info = running.info
        info.stopped_at = running.since + running.recorder.stop()
        info.state = "processing"
        self._finishing[info.id] = info
        room = self.calls.get(room_name)
        if room is not None and tell:
            room.recording = None
            self.calls.announce_recording(room, info.describe())
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
        self._stop_following(room.name)
        if room.name in self._running:
            self.end(room.name, reason="call ended")

    async def _finish(self, running: _Running) -> None:
        """Wait for the outputs to close their files, then hand them to the uploader (manifest last)."""
        info = running.info
        prefix = f"{info.room}/{info.id}/"
        folder = ""  # of this segment's files, within the recording
        try:
            await asyncio.sleep(STOP_GRACE)
            running.recorder.finish()
            number, previous = 1, None
            if running.continued:
                number, previous = await self._segment_after(prefix, running.key)
                folder = f"segment-{number}/"
            if running.composite is not None:
                await running.composite.stop(timeout=FINISH_TIMEOUT)
                path = running.composite.path
                if path.exists():
                    await self.uploader.submit(prefix + folder + COMPOSITE_FILE, path)
                    info.files.append(folder + COMPOSITE_FILE)
            if running.chat:
                path = self.work / "chat" / f"{running.key}.json"
                await asyncio.to_thread(_write_chat, path, info, running)
                await self.uploader.submit(prefix + folder + CHAT_FILE, path)
                info.files.append(folder + CHAT_FILE)
            if "tracks" in info.outputs and not self.writes_tracks:
                await self._until_sent(info)
            elif "tracks" in info.outputs:
                assert self.tracks is not None and self.writer is not None
                try:
                    paths = await self.tracks.wait_finished(running.key, FINISH_TIMEOUT)
                except TimeoutError:
                    # Its stop record was lost (a full log drops): finish with what was written.
                    await self.tracks.finish(running.key)
                    paths = await self.tracks.wait_finished(running.key, FINISH_TIMEOUT)
                base = self.writer.root / running.key
                if previous is not None:
                    await self._note_gap(base / MANIFEST_FILE, info, running.key, number, previous)
                for path in paths:
                    name = folder + path.relative_to(base).as_posix()
                    await self.uploader.submit(prefix + name, path)
                    info.files.append(name)
        except Exception as exc:  # one recording's failure must not stop the others from finishing
            info.state = "failed"
            self._finishing.pop(info.id, None)
            event(log, logging.ERROR, "recording could not be finished", recording=info.id, error=repr(exc))
            return
        if not info.files:
            # Its tracks went through Kafka: `huddle record-consumer` stores them, and the listing shows
            # them from the store.
            self._finishing.pop(info.id, None)
            return
        # The files are safe in the spool; the listing says "uploading" until the store has them all.
        info.state = "uploading"
        task = asyncio.get_running_loop().create_task(self._until_stored(info, prefix + info.files[-1]))
        self._uploads.add(task)
        task.add_done_callback(self._uploads.discard)

    async def _until_sent(self, info: RecordingInfo) -> None:
        """Until Kafka has acknowledged every record published so far (this recording's last among them):
        the node may stop then without losing any of it. A Kafka away for long keeps the state at
        "processing", with the records safe in the log's disk buffer meanwhile."""
        while not await self.log.flush(FINISH_TIMEOUT):  # type: ignore[attr-defined]
            if self._closing:
                return  # the disk buffer keeps them; the next start of this node sends them
            event(
                log,
                logging.WARNING,
                "recording's records not acknowledged by Kafka yet: kept in the disk buffer",
                recording=info.id,
                log_state=self.log.state,  # type: ignore[attr-defined]
            )

    async def _segment_after(self, prefix: str, key: str) -> tuple[int, tuple[int, str | None]]:
        """This segment's number, after those in the store, and the last of those: (number, manifest key
        or None). The first segment's files lie in the recording's own folder, later ones in segment-<n>/."""
        try:
            stored = await self.store.list(prefix)
        except StoreError as exc:
            # Unknown neighbours: a folder of its own, so that nothing stored is overwritten.
            event(log, logging.WARNING, "cannot see earlier segments", recording=key, error=str(exc))
            return 1000 + secrets.randbelow(9000), (0, None)
        numbers, manifests = segments.stored_segments(prefix, (obj.key for obj in stored))
        last = max({1, *numbers})
        return segments.next_segment(numbers), (last, manifests.get(last))

    async def _note_gap(
        self, path: Path, info: RecordingInfo, key: str, segment: int, previous: tuple[int, str | None]
    ) -> None:
        """Say in this segment's manifest which recording it continues, under which key, and how long
        nothing was recorded: from the end of the previous segment's last frame to this one's first."""
        manifest = json.loads(await asyncio.to_thread(path.read_bytes))
        _, before_key = previous
        before = await self._read_json(before_key) if before_key is not None else None
        manifest = segments.mark_continued(
            manifest, recording_id=info.id, segment=segment, segment_key=key, before=before
        )
        manifest["recording_started_at"] = info.started_at  # known here from the resume tokens' claim
        await asyncio.to_thread(_replace_file, path, json.dumps(manifest, indent=2).encode())
        duration = manifest["gap"]["duration"]
        event(log, logging.INFO, "recording segment after a gap", recording=info.id, gap=duration)

    async def _read_json(self, key: str, what: str = "an earlier segment's manifest") -> Any:
        try:
            stream = await self.store.read(key)
            async with stream:
                data = b""
                async for chunk in stream:
                    data += chunk
                    if len(data) > MAX_MANIFEST_BYTES:
                        return None
            return json.loads(data)
        except (StoreError, OSError, ValueError) as exc:
            event(log, logging.WARNING, f"cannot read {what}", key=key, error=str(exc))
            return None

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
        people = await self._people(stored)
        for obj in stored:
            parts = obj.key.split("/", 2)
            if len(parts) != 3:
                continue  # not a recording's file (something else put into the bucket)
            _, rid, name = parts
            entry = found.setdefault(rid, {"id": rid, "room": room_name, "state": "stored", "files": []})
            file = {"name": name, "size": obj.size, "url": _file_url(room_name, rid, name)}
            file.update(people.get(f"{rid}/{name}", {}))
            entry["files"].append(file)
        pending = [r.info for r in self._running.values() if r.info.room == room_name]
        pending += [i for i in self._finishing.values() if i.room == room_name]
        for info in pending:
            entry = found.setdefault(info.id, {"id": info.id, "room": room_name, "files": []})
            entry.update(info.describe())
            if not self.writes_tracks and "tracks" in info.outputs:
                # "live", or "buffering" / "dropping" while Kafka is slow or away (KafkaLog.state)
                entry["kafka"] = self.log.state  # type: ignore[attr-defined]
        for entry in found.values():
            # Segment by segment (the first in the recording's folder), each with its composite first.
            entry["files"].sort(key=_file_order)
            entry["segments"] = len({_file_order(f)[0] for f in entry["files"]})
        return sorted(found.values(), key=lambda e: e["id"], reverse=True)

    async def _people(self, stored: list[StoredObject]) -> dict[str, dict[str, str]]:
        """Whose each stored track file is, from its segment's manifest: `<recording id>/<file>` →
        {participant_id, participant_name, kind}. A manifest that cannot be read names nothing (the files
        are listed all the same); one not stored yet (it goes up last) names nothing for now."""
        manifests = [o for o in stored if o.key.rsplit("/", 1)[-1] == MANIFEST_FILE and o.key.count("/") >= 2]
        limit = asyncio.Semaphore(MANIFEST_READS)

        async def files_of(obj: StoredObject) -> dict[str, dict[str, str]]:
            cache_key = (obj.key, obj.size, obj.modified)
            cached = self._manifest_files.get(cache_key)
            if cached is not None:
                self._manifest_files.move_to_end(cache_key)
                return cached
            async with limit:
                document = await self._read_json(obj.key, "a manifest to name a listing's files")
            if document is None:
                return {}  # not cached: the next listing tries again
            _, rid, name = obj.key.split("/", 2)
            folder = f"{rid}/{name[: -len(MANIFEST_FILE)]}"
            files = _track_people(document, folder)
            self._manifest_files[cache_key] = files
            while len(self._manifest_files) > MANIFESTS_CACHED:
                self._manifest_files.popitem(last=False)
            return files

        people: dict[str, dict[str, str]] = {}
        for files in await asyncio.gather(*(files_of(o) for o in manifests)):
            people.update(files)
        return people

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
        self._closing = True
        for room_name in list(self._running):
            self.end(room_name, reason="shutdown", tell=False)
        for room_name in list(self._following):
            recorder = self._following.pop(room_name)
            recorder.stop()
            recorder.finish()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.tracks is not None:
            await self.tracks.close()
        if not self.writes_tracks:
            await self.log.close()  # what Kafka has not acknowledged stays in its disk buffer
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


_Emit = Callable[[bytes], None]


def _emitter(recording_log: RecordingLog, key: str, composite: CompositeWorker | None, tracks: bool) -> _Emit:
    if composite is not None and tracks:

        def both(data: bytes) -> None:
            recording_log.publish(key, data)
            composite.send(data)

        return both
    if composite is not None:
        return composite.send
    return lambda data: recording_log.publish(key, data)


def _name(room: Room, participant_id: str) -> str:
    participant = room.participants.get(participant_id) or room.remote.get(participant_id)
    return participant.name if participant is not None else participant_id


def _track_people(manifest: Any, folder: str) -> dict[str, dict[str, str]]:
    """`folder<file>` → whose track it is, for each track a manifest lists (read from the store: checked)."""
    tracks = manifest.get("tracks") if isinstance(manifest, dict) else None
    people: dict[str, dict[str, str]] = {}
    for track in tracks if isinstance(tracks, list) else ():
        if not isinstance(track, dict):
            continue
        fields = (track.get("file"), track.get("participant_id"), track.get("name"), track.get("kind"))
        if all(isinstance(f, str) for f in fields):
            file, participant_id, name, kind = fields
            person = {"participant_id": participant_id, "participant_name": name, "kind": kind}
            if isinstance(track.get("source"), str):
                person["source"] = track["source"]
            people[folder + file] = person
    return people


def _file_order(file: dict[str, Any]) -> tuple[int, bool, str]:
    found = _SEGMENT.match(file["name"])
    segment = int(found.group(1)) if found is not None else 1
    return segment, file["name"].rsplit("/", 1)[-1] != COMPOSITE_FILE, file["name"]


def _write_chat(path: Path, info: RecordingInfo, running: _Running) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "recording_id": info.id,
        "room": info.room,
        "started_at": running.since,  # 0 of the messages' `at`, as in the manifest
        "messages": running.chat,
    }
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False))


def _replace_file(path: Path, data: bytes) -> None:
    # A new file, not a rewrite in place: a local store may hold a hard link to what it replaces.
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _file_url(room: str, recording_id: str, name: str) -> str:
    return f"/api/rooms/{room}/recordings/{recording_id}/files/{name}"
