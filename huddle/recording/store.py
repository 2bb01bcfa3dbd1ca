"""Where finished recordings go: a local folder (the default) or an S3-compatible object store.

Keys are relative, '/'-separated names such as "<recording id>/composite.mp4". Both stores accept the same
keys (see `check_key`), so a deployment can move from a folder to S3 without renaming anything.

The recorder hands finished files to an `Uploader`, not to the store directly: the uploader keeps each file
in a spool folder until the store has it, so an S3 endpoint that is down for a while (or a restart in
between) never loses a recording.

boto3 is blocking; every call runs in a worker thread (asyncio.to_thread) so the event loop, which also
forwards media, never waits on the network or the disk here.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from huddle.logs import event

log = logging.getLogger("huddle.recording")

MiB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 256 * 1024
# S3 refuses parts under 5 MiB (except the last), whatever threshold the caller asks for.
MIN_PART_SIZE = 5 * MiB


class StoreError(Exception):
    """The store failed; the message names the store and what to check."""


class StoreUnreachable(StoreError):
    """No answer from the store (connection refused, timeout): worth retrying later."""


class StoreAccessDenied(StoreError):
    """The store answered but refused the credentials or the bucket: retrying will not help until the
    configuration changes."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    size: int
    modified: float  # Unix time


def check_key(key: str) -> str:
    """Return `key` if it is a clean relative name, else raise ValueError.

    LocalStore maps keys onto paths, so "..", absolute names and empty segments could write outside its
    root. Names starting with '.' are refused too: they are the store's temporary files, and a node keeps
    its own work folders (".spool", ".partial") inside the local store's root. S3Store refuses the same
    keys so that both stores behave alike."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"bad storage key {key!r}: must be a relative name like 'rec-id/file.mp4'")
    if any(not part or part.startswith(".") for part in key.split("/")):
        raise ValueError(f"bad storage key {key!r}: no empty segments or names starting with '.'")
    return key


def _check_prefix(prefix: str) -> str:
    # A prefix may end in '/' or be empty, but must not climb out of the root either.
    if prefix:
        check_key(prefix.rstrip("/") or "x")
    return prefix


class ObjectStream(AsyncIterator[bytes]):
    """An open stored object, read chunk by chunk.

    `Store.read` opens the object before returning this, so a missing key raises there (before an HTTP
    handler has sent its headers) and `size` is known for Content-Length. Reading to the end closes it;
    otherwise call `aclose()` or use `async with`."""

    def __init__(
        self, size: int, read: Callable[[int], bytes], close: Callable[[], None], chunk_size: int
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.size = size
        self._read = read
        self._close = close
        self._chunk_size = chunk_size
        self._closed = False

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        reading = loop.run_in_executor(None, self._read, self._chunk_size)
        try:
            chunk = await asyncio.shield(reading)
        except asyncio.CancelledError:
            # The read carries on in its thread; close once it is done, never under its feet.
            self._closed = True
            reading.add_done_callback(lambda _: loop.run_in_executor(None, self._close_quietly))
            raise
        except BaseException:
            await self.aclose()
            raise
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._close)

    def _close_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self._close()

    async def __aenter__(self) -> ObjectStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Store(ABC):
    """A flat namespace of keys → files. Writes are atomic: a reader sees a whole object or none."""

    @abstractmethod
    async def put(self, key: str, path: Path) -> None:
        """Store the file at `path` under `key`, replacing what was there. `path` is left as it is."""

    @abstractmethod
    async def list(self, prefix: str = "") -> builtins.list[StoredObject]:
        """Objects whose key starts with `prefix` (a plain string prefix), sorted by key."""

    @abstractmethod
    async def read(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ObjectStream:
        """Open `key` for streaming; FileNotFoundError if there is no such object."""

    @abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove `key`; no error if it is already gone."""

    @abstractmethod
    def describe(self) -> str:
        """Where the store is, for logs and errors; never includes secrets."""

    async def stat(self, key: str) -> StoredObject | None:
        """The object stored under exactly `key`, or None."""
        for obj in await self.list(key):
            if obj.key == key:
                return obj
        return None


# --- local folder ---

_TMP_SUFFIX = ".huddle-tmp"


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable: without it a crash can forget the new directory entry.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(src: Path, dest: Path) -> None:
    """Make `dest` a durable copy of `src`: a hard link on the same filesystem (no data copied), else a
    copy. `dest` must not exist."""
    try:
        os.link(src, dest)
    except OSError as exc:
        # EXDEV: another filesystem; EPERM/ENOTSUP/EMLINK: a filesystem that refuses hard links.
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP):
            raise
        shutil.copyfile(src, dest)
    _fsync_file(dest)


class LocalStore(Store):
    """Keys are paths under `root`. `put` hard-links the source when it can (same filesystem): no data is
    copied, and the stored file is the source's inode, so writers must replace files rather than rewrite
    them in place after handing them over (the recorder writes each file once, then submits it)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def describe(self) -> str:
        return f"local folder {self.root}"

    def path_for(self, key: str) -> Path:
        """The file for `key`; ValueError if the key would leave the root. Touches the disk (it resolves
        symlinks), so async code calls it in a thread."""
        path = self.root.joinpath(*check_key(key).split("/"))
        # check_key already rules out '..'; this also catches a symlink inside root that points out of it.
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(f"bad storage key {key!r}: resolves outside {self.root}")
        return path

    async def put(self, key: str, path: Path) -> None:
        check_key(key)
        await asyncio.to_thread(self._put, key, Path(path))

    def _put(self, key: str, src: Path) -> None:
        dest = self.path_for(key)
        if not src.is_file():
            raise FileNotFoundError(f"no file to store at {src}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")
        try:
            _link_or_copy(src, tmp)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(dest.parent)

    async def list(self, prefix: str = "") -> builtins.list[StoredObject]:
        return await asyncio.to_thread(self._list, _check_prefix(prefix))

    def _list(self, prefix: str) -> builtins.list[StoredObject]:
        # Walk only the deepest folder the prefix names, not the whole tree.
        folder, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        found = []
        for dirpath, dirs, files in os.walk(start):
            # Hidden names are never keys: temporary files, and the node's work folders in the root.
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.startswith("."):
                    continue
                full = Path(dirpath, name)
                key = full.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = full.stat()
                except FileNotFoundError:  # deleted while we walked
                    continue
                found.append(StoredObject(key=key, size=st.st_size, modified=st.st_mtime))
        found.sort(key=lambda obj: obj.key)
        return found

    async def read(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ObjectStream:
        check_key(key)

        def open_file() -> ObjectStream:
            f = self.path_for(key).open("rb")
            return ObjectStream(os.fstat(f.fileno()).st_size, f.read, f.close, chunk_size)

        return await asyncio.to_thread(open_file)

    async def stat(self, key: str) -> StoredObject | None:
        check_key(key)

        def stat_file() -> StoredObject | None:
            path = self.path_for(key)
            try:
                st = path.stat()
            except FileNotFoundError:
                return None
            return StoredObject(key, st.st_size, st.st_mtime) if path.is_file() else None

        return await asyncio.to_thread(stat_file)

    async def exists(self, key: str) -> bool:
        check_key(key)
        return await asyncio.to_thread(lambda: self.path_for(key).is_file())

    async def delete(self, key: str) -> None:
        check_key(key)
        await asyncio.to_thread(self._delete, key)

    def _delete(self, key: str) -> None:
        path = self.path_for(key)
        path.unlink(missing_ok=True)
        # Drop folders the delete left empty, so a deleted recording leaves nothing behind.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


# --- S3 ---


class S3Store(Store):
    """An S3-compatible store (AWS S3, SeaweedFS, MinIO, Ceph RGW, ...) through boto3."""

    def __init__(
        self,
        endpoint_url: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        multipart_threshold: int = 8 * MiB,
        *,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
    ) -> None:
        self.endpoint_url = endpoint_url.rstrip("/")
        self.bucket = bucket
        self.region = region
        self.multipart_threshold = multipart_threshold
        self._access_key = access_key
        self._secret_key = secret_key
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._client: Any = None
        self._transfer_config: Any = None
        self._ready = False
        self._ready_lock = asyncio.Lock()

    def describe(self) -> str:
        return f"S3 bucket {self.bucket!r} at {self.endpoint_url}"

    def _make_client(self) -> Any:
        # boto3 is imported where it is used: importing it takes ~0.15 s, which nodes that keep recordings
        # in a local folder need not pay.
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        config = Config(
            region_name=self.region,
            # Path style (endpoint/bucket/key) works on every S3-compatible server; virtual-host style
            # needs DNS for bucket.host, which self-hosted endpoints rarely have.
            s3={"addressing_style": "path"},
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            # Two attempts in all: a dead endpoint fails within seconds, and the Uploader does the
            # longer-term retrying with its own backoff.
            retries={"max_attempts": 2, "mode": "standard"},
            # botocore >= 1.36 adds CRC checksums to every upload by default; several S3-compatible
            # servers reject or mishandle them. Send them only where the API requires one.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session of our own: nothing from ~/.aws or AWS_* variables (profiles, other credentials) leaks
        # into a store configured explicitly.
        session = boto3.session.Session(
            aws_access_key_id=self._access_key,
            aws_secret_access_key=self._secret_key,
            region_name=self.region,
        )
        self._transfer_config = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=max(self.multipart_threshold, MIN_PART_SIZE),
            max_concurrency=4,
        )
        return session.client("s3", endpoint_url=self.endpoint_url, config=config)

    def _error(self, exc: Exception, action: str) -> StoreError:
        """Translate a botocore/boto3 failure into a StoreError that says what to check."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, Exception):
            # upload_file wraps the real ClientError into a message string; classify by the original.
            exc = exc.__context__
        where = self.describe()
        if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ConnectionClosedError):
            return StoreUnreachable(
                f"cannot {action}: {where} is unreachable ({exc}); check the endpoint URL and port, and "
                "that the S3 server is running and reachable from this host"
            )
        if isinstance(exc, ReadTimeoutError):
            return StoreUnreachable(
                f"cannot {action}: {where} did not answer within {self._read_timeout:g} s ({exc})"
            )
        if isinstance(exc, NoCredentialsError):
            return StoreAccessDenied(f"cannot {action}: no credentials for {where}")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if (
                code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403")
                or status == 403
            ):
                return StoreAccessDenied(
                    f"cannot {action}: {where} refused access key {self._access_key!r} ({code or status}); "
                    "check the access key and secret key, and that this identity may use the bucket"
                )
            return StoreError(
                f"cannot {action}: {where} answered {code or status}: {error.get('Message', exc)}"
            )
        return StoreError(f"cannot {action} on {where}: {exc}")

    async def _call(self, action: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        await self._ensure_ready()
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (FileNotFoundError, ValueError):
            raise
        except Exception as exc:
            if _error_code(exc) == "NoSuchBucket":
                self._ready = False  # deleted behind our back: create it again at the next call
            raise self._error(exc, action) from exc

    async def _ensure_ready(self) -> None:
        """Make the client and the bucket at first use, not in __init__: a node must start (and spool its
        recordings) even while the store is down."""
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            if self._client is None:
                self._client = await asyncio.to_thread(self._make_client)
            try:
                await asyncio.to_thread(self._create_bucket_if_missing)
            except StoreError:
                raise
            except Exception as exc:
                raise self._error(exc, f"check bucket {self.bucket!r}") from exc
            self._ready = True

    def _create_bucket_if_missing(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status != 404:
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            # AWS refuses a LocationConstraint of us-east-1 and requires one for every other region.
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as exc:
            # Someone (another node) created it between our HEAD and our CREATE.
            if exc.response.get("Error", {}).get("Code") not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise
        event(log, logging.INFO, "created bucket", store=self.describe())

    async def put(self, key: str, path: Path) -> None:
        check_key(key)
        path = Path(path)
        if not await asyncio.to_thread(path.is_file):
            raise FileNotFoundError(f"no file to store at {path}")
        await self._ensure_ready()
        # upload_file switches to a multipart upload above the threshold; S3 shows the object only once
        # every part is in, so readers never see half a file.
        await self._call(
            f"upload {key!r}",
            self._client.upload_file,
            str(path),
            self.bucket,
            key,
            Config=self._transfer_config,
        )

    async def list(self, prefix: str = "") -> builtins.list[StoredObject]:
        _check_prefix(prefix)

        def list_all() -> builtins.list[StoredObject]:
            found = []
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    found.append(
                        StoredObject(
                            key=item["Key"], size=int(item["Size"]), modified=item["LastModified"].timestamp()
                        )
                    )
            found.sort(key=lambda obj: obj.key)
            return found

        await self._ensure_ready()
        return await self._call(f"list {prefix!r}", list_all)

    async def read(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ObjectStream:
        check_key(key)
        await self._ensure_ready()

        def open_object() -> ObjectStream:
            from botocore.exceptions import ClientError

            try:
                reply = self._client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise FileNotFoundError(f"no object {key!r} in {self.describe()}") from exc
                raise
            body = reply["Body"]
            return ObjectStream(int(reply["ContentLength"]), body.read, body.close, chunk_size)

        return await self._call(f"read {key!r}", open_object)

    async def stat(self, key: str) -> StoredObject | None:
        check_key(key)
        await self._ensure_ready()

        def head() -> StoredObject | None:
            from botocore.exceptions import ClientError

            try:
                reply = self._client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None
                raise
            return StoredObject(key, int(reply["ContentLength"]), reply["LastModified"].timestamp())

        return await self._call(f"look up {key!r}", head)

    async def exists(self, key: str) -> bool:
        return await self.stat(key) is not None

    async def delete(self, key: str) -> None:
        check_key(key)
        await self._ensure_ready()
        await self._call(f"delete {key!r}", self._client.delete_object, Bucket=self.bucket, Key=key)


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


# --- choosing a store ---


def store_from_settings(
    recordings_dir: Path,
    s3_endpoint: str | None,
    s3_bucket: str | None,
    s3_access_key: str | None,
    s3_secret_key: str | None,
    s3_region: str | None = "us-east-1",
) -> Store:
    """The local folder unless an S3 endpoint is configured; then bucket and both keys are required."""
    if not s3_endpoint:
        return LocalStore(recordings_dir)
    parts = urlsplit(s3_endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--s3-endpoint must be a URL like http://host:9000, got {s3_endpoint!r}")
    missing = [
        name
        for name, value in (
            ("--s3-bucket (HUDDLE_S3_BUCKET)", s3_bucket),
            ("--s3-access-key (HUDDLE_S3_ACCESS_KEY)", s3_access_key),
            ("--s3-secret-key (HUDDLE_S3_SECRET_KEY)", s3_secret_key),
        )
        if not value
    ]
    if missing:
        raise ValueError(
            f"recordings go to S3 at {s3_endpoint}, which also needs {', '.join(missing)}; "
            "or leave --s3-endpoint unset to keep recordings in the local folder"
        )
    assert s3_bucket and s3_access_key and s3_secret_key  # checked above; narrows the types
    return S3Store(s3_endpoint, s3_bucket, s3_access_key, s3_secret_key, region=s3_region or "us-east-1")


# --- durable upload queue ---


_SPOOL_DATA = re.compile(r"[0-9]+-[0-9a-f]+\.data")


@dataclass(slots=True)
class _Job:
    id: str
    key: str
    size: int
    data: Path  # the spooled file
    meta: Path  # its job file


class Uploader:
    """A durable, ordered upload queue in front of a Store.

    `submit` puts the file into the spool folder (a hard link when it can, so no data is copied) together
    with a small job file, and returns. A background task uploads jobs oldest first, retrying a failing
    upload with exponential backoff, and removes a spooled file only once the store reports the object
    with the right size. Jobs left in the spool by a previous run (a crash, a restart while the store was
    down) are picked up at `start()`. One Uploader per spool folder: a lock file enforces it.
    """

    def __init__(
        self,
        store: Store,
        spool: Path,
        *,
        backoff_start: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        self.store = store
        self.spool = Path(spool)
        self.backoff_start = backoff_start
        self.backoff_cap = backoff_cap
        self.uploaded = 0  # successful uploads since start
        self.failures = 0  # failed upload attempts since start
        self._jobs: collections.deque[_Job] = collections.deque()
        self._key_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._closed = False
        self._next_seq = 0
        self._failing_since: float | None = None
        self._outage_failures = 0

    @property
    def pending(self) -> int:
        """Jobs in the spool not yet uploaded (including the one being uploaded)."""
        return len(self._jobs)

    def start(self) -> None:
        """Lock the spool, load the jobs a previous run left there, and start uploading.

        Synchronous on purpose: reading a folder of small job files is quick, and `pending` is then right
        as soon as start() returns."""
        if self._task is not None:
            raise RuntimeError("Uploader already started")
        if self._closed:
            raise RuntimeError("Uploader is closed")
        self.spool.mkdir(parents=True, exist_ok=True)
        self._lock_spool()
        leftover = self._load_spool()
        self._jobs.extend(leftover)
        if leftover:
            event(
                log, logging.INFO, "uploads resumed from spool", spool=str(self.spool), pending=len(leftover)
            )
        self._update_idle()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="recording uploader")

    def _lock_spool(self) -> None:
        fd = os.open(self.spool / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"spool {self.spool} is in use by another uploader") from None
        self._lock_fd = fd

    def _load_spool(self) -> builtins.list[_Job]:
        jobs = []
        for name in os.listdir(self.spool):
            path = self.spool / name
            if name.endswith(_TMP_SUFFIX):
                path.unlink(missing_ok=True)  # a submit that crashed halfway never returned: not ours
                continue
            if not name.endswith(".json"):
                continue
            try:
                int(path.stem.split("-", 1)[0])  # ids start with their sequence number
                spec = json.loads(path.read_text())
                # The data file is deleted after upload: it must be a file of the spool, nothing else.
                if not _SPOOL_DATA.fullmatch(str(spec["data"])):
                    raise ValueError(f"bad data file name {spec['data']!r}")
                job = _Job(
                    id=path.stem,
                    key=check_key(spec["key"]),
                    size=int(spec["size"]),
                    data=self.spool / spec["data"],
                    meta=path,
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                event(
                    log, logging.ERROR, "unreadable upload job left in spool", job=str(path), error=str(exc)
                )
                continue
            if not job.data.is_file():
                event(log, logging.ERROR, "spooled file missing; dropping job", job=str(path), key=job.key)
                path.unlink(missing_ok=True)
                continue
            jobs.append(job)
        # Orphaned data files: a submit that crashed after the data landed but before its job file did.
        # The caller never got an answer, and its own file is still in place, so these are safe to drop.
        referenced = {job.data.name for job in jobs}
        for name in os.listdir(self.spool):
            if name.endswith(".data") and name not in referenced:
                (self.spool / name).unlink(missing_ok=True)
        jobs.sort(key=lambda job: job.id)
        if jobs:
            self._next_seq = int(jobs[-1].id.split("-", 1)[0]) + 1
        return jobs

    async def submit(self, key: str, path: Path, *, keep: bool = False) -> None:
        """Queue `path` for upload under `key`; returns once the file is safe in the spool.

        The uploader takes the file over (it is removed from `path`) unless `keep` is true."""
        if self._closed:
            raise RuntimeError("Uploader is closed")
        if self._task is None:
            # start() reads the spool first, so that new ids sort after those a previous run left.
            raise RuntimeError("Uploader.start() must be called before submit()")
        check_key(key)
        path = Path(path)
        # Job ids sort in submission order, within a run and across restarts (start() continues from the
        # highest id it found).
        seq = self._next_seq
        self._next_seq += 1
        job_id = f"{seq:012d}-{uuid.uuid4().hex[:8]}"
        spooling = asyncio.ensure_future(asyncio.to_thread(self._spool_file, job_id, key, path, keep))
        try:
            job = await asyncio.shield(spooling)
        except asyncio.CancelledError:
            # The thread carries on and may still spool the file (and remove the caller's copy): queue the
            # job when it lands, or it would wait in the spool until the next start.
            spooling.add_done_callback(self._enqueue_when_spooled)
            raise
        self._enqueue(job)

    def _enqueue_when_spooled(self, spooling: asyncio.Future[_Job]) -> None:
        if not spooling.cancelled() and spooling.exception() is None:
            self._enqueue(spooling.result())

    def _enqueue(self, job: _Job) -> None:
        self._jobs.append(job)
        self._update_idle()
        self._wake.set()

    def _spool_file(self, job_id: str, key: str, src: Path, keep: bool) -> _Job:
        self.spool.mkdir(parents=True, exist_ok=True)
        data = self.spool / f"{job_id}.data"
        meta = self.spool / f"{job_id}.json"
        tmp_data = self.spool / f"{job_id}.data{_TMP_SUFFIX}"
        tmp_meta = self.spool / f"{job_id}.json{_TMP_SUFFIX}"
        try:
            _link_or_copy(src, tmp_data)
            size = tmp_data.stat().st_size
            os.replace(tmp_data, data)
            spec = {"key": key, "size": size, "data": data.name, "submitted": time.time()}
            tmp_meta.write_text(json.dumps(spec))
            _fsync_file(tmp_meta)
            os.replace(tmp_meta, meta)
            _fsync_dir(self.spool)
        except BaseException:
            for leftover in (tmp_data, tmp_meta, data, meta):
                leftover.unlink(missing_ok=True)
            raise
        # Only now that the job is durable does the caller's copy go: a crash before this point leaves
        # the caller's file in place and at worst an orphan in the spool (dropped at the next start).
        if not keep:
            src.unlink(missing_ok=True)
        return _Job(id=job_id, key=key, size=size, data=data, meta=meta)

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job is uploaded; False if `timeout` seconds pass first."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop uploading. Jobs not yet uploaded stay in the spool for the next start()."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    async def wait_uploaded(self, key: str) -> None:
        """Return once no upload of `key` is queued any more (a job leaves the queue once the store has
        it, or its spooled file vanished)."""
        if not any(job.key == key for job in self._jobs):
            return
        future = asyncio.get_running_loop().create_future()
        self._key_waiters.setdefault(key, []).append(future)
        await future

    def _update_idle(self) -> None:
        if self._jobs:
            self._idle.clear()
        else:
            self._idle.set()

    async def _run(self) -> None:
        delay = self.backoff_start
        while True:
            if not self._jobs:
                self._wake.clear()
                await self._wake.wait()
                continue
            job = self._jobs[0]
            try:
                await self._upload(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not await asyncio.to_thread(job.data.is_file):
                    # Nothing left to upload: someone removed the spooled file. Retrying cannot help.
                    event(log, logging.ERROR, "spooled file vanished; dropping job", key=job.key)
                    await asyncio.to_thread(job.meta.unlink, True)
                    self._done(job)
                    continue
                self.failures += 1
                self._outage_failures += 1
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    event(
                        log,
                        logging.WARNING,
                        "recording uploads failing; files stay spooled and are retried",
                        store=self.store.describe(),
                        key=job.key,
                        error=str(exc),
                        pending=self.pending,
                    )
                else:
                    event(log, logging.DEBUG, "upload retry failed", key=job.key, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_cap)
                continue
            delay = self.backoff_start
            self.uploaded += 1
            if self._failing_since is not None:
                event(
                    log,
                    logging.INFO,
                    "recording uploads recovered",
                    store=self.store.describe(),
                    outage_seconds=round(time.monotonic() - self._failing_since, 1),
                    failed_attempts=self._outage_failures,
                    pending=self.pending - 1,
                )
                self._failing_since = None
                self._outage_failures = 0
            self._done(job)

    async def _upload(self, job: _Job) -> None:
        await self.store.put(job.key, job.data)
        stored = await self.store.stat(job.key)
        if stored is None or stored.size != job.size:
            got = "nothing" if stored is None else f"{stored.size} bytes"
            raise StoreError(
                f"{self.store.describe()} has {got} under {job.key!r} after upload, not {job.size}"
            )
        event(log, logging.DEBUG, "uploaded", key=job.key, size=job.size, store=self.store.describe())

        def remove() -> None:
            # Job file first: a crash between the two leaves an orphaned data file, dropped at next start,
            # rather than a job whose upload would be repeated (harmless, but wasted).
            job.meta.unlink(missing_ok=True)
            job.data.unlink(missing_ok=True)

        await asyncio.to_thread(remove)

    def _done(self, job: _Job) -> None:
        if self._jobs and self._jobs[0] is job:
            self._jobs.popleft()
        self._update_idle()
        if not any(j.key == job.key for j in self._jobs):
            for future in self._key_waiters.pop(job.key, []):
                if not future.done():
                    future.set_result(None)
