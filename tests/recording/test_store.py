"""Recording storage against a real SeaweedFS (S3 with real authentication) and a temporary folder."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import boto3
import pytest

from huddle.recording.store import (
    LocalStore,
    MiB,
    S3Store,
    Store,
    StoreAccessDenied,
    StoreUnreachable,
    Uploader,
    store_from_settings,
)
from tests.recording.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedS3, free_ports, start_seaweed


def make_file(path: Path, size: int) -> str:
    """Write `size` random bytes to `path`; return their sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, MiB))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


async def sha256_of(chunks: AsyncIterator[bytes]) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    async for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


async def download_sha(store: Store, key: str) -> tuple[str, int]:
    async with await store.read(key, chunk_size=64 * 1024) as stream:
        return await sha256_of(stream)


def boto_client(seaweed: SeaweedS3) -> object:
    """A plain boto3 client, to look at what the store did from the outside."""
    return boto3.client(
        "s3",
        endpoint_url=seaweed.endpoint,
        aws_access_key_id=seaweed.access_key,
        aws_secret_access_key=seaweed.secret_key,
        region_name=seaweed.region,
    )


def spool_entries(spool: Path) -> list[str]:
    return sorted(name for name in os.listdir(spool) if name != ".lock")


# --- S3 ---


async def test_s3_small_file_round_trip(s3_store: S3Store, prefix: str, tmp_path: Path) -> None:
    src = tmp_path / "audio.webm"
    sha = make_file(src, 300_000)
    key = prefix + "audio.webm"

    await s3_store.put(key, src)

    assert src.exists(), "put leaves the source file alone"
    assert await s3_store.exists(key)
    assert not await s3_store.exists(prefix + "other.webm")
    stream = await s3_store.read(key)
    assert stream.size == 300_000
    assert await sha256_of(stream) == (sha, 300_000)

    await s3_store.delete(key)
    assert not await s3_store.exists(key)
    await s3_store.delete(key)  # already gone: no error
    with pytest.raises(FileNotFoundError):
        await s3_store.read(key)


async def test_s3_multipart_upload_round_trip(
    s3_factory: Callable[..., S3Store], seaweed: SeaweedS3, prefix: str, tmp_path: Path
) -> None:
    store = s3_factory(multipart_threshold=5 * MiB)
    src = tmp_path / "composite.mp4"
    sha = make_file(src, 12 * MiB)
    key = prefix + "composite.mp4"

    await store.put(key, src)

    # An S3 multipart object's ETag is "<md5 of the part md5s>-<number of parts>": 12 MiB in 5 MiB parts.
    head = boto_client(seaweed).head_object(Bucket=store.bucket, Key=key)  # type: ignore[attr-defined]
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]
    assert await download_sha(store, key) == (sha, 12 * MiB)


async def test_s3_list_by_prefix(s3_store: S3Store, prefix: str, tmp_path: Path) -> None:
    for name, size in (("rec1/manifest.json", 120), ("rec1/a.webm", 5000), ("rec2/a.webm", 70)):
        make_file(tmp_path / "f", size)
        await s3_store.put(prefix + name, tmp_path / "f")
    started = time.time()

    listed = await s3_store.list(prefix + "rec1/")

    assert [(o.key, o.size) for o in listed] == [
        (prefix + "rec1/a.webm", 5000),
        (prefix + "rec1/manifest.json", 120),
    ]
    assert all(abs(o.modified - started) < 60 for o in listed)
    assert [o.key for o in await s3_store.list(prefix + "rec")] == [
        prefix + "rec1/a.webm",
        prefix + "rec1/manifest.json",
        prefix + "rec2/a.webm",
    ]
    assert await s3_store.list(prefix + "nothing/") == []


async def test_s3_creates_missing_bucket(
    s3_factory: Callable[..., S3Store], seaweed: SeaweedS3, tmp_path: Path
) -> None:
    store = s3_factory(bucket="huddle-fresh")
    client = boto_client(seaweed)
    assert "huddle-fresh" not in [b["Name"] for b in client.list_buckets()["Buckets"]]  # type: ignore[attr-defined]
    make_file(tmp_path / "f", 10)

    await store.put("x/f", tmp_path / "f")

    assert "huddle-fresh" in [b["Name"] for b in client.list_buckets()["Buckets"]]  # type: ignore[attr-defined]
    assert [o.key for o in await store.list("")] == ["x/f"]


async def test_s3_partial_read_then_close(s3_store: S3Store, prefix: str, tmp_path: Path) -> None:
    make_file(tmp_path / "f", 1_000_000)
    await s3_store.put(prefix + "f", tmp_path / "f")
    for _ in range(15):  # more than the connection pool holds: closing must release each connection
        stream = await s3_store.read(prefix + "f", chunk_size=1000)
        assert len(await anext(stream)) == 1000
        await stream.aclose()
    assert await s3_store.exists(prefix + "f")


@pytest.mark.parametrize("wrong", ["secret", "access key"])
async def test_s3_wrong_credentials_are_refused_clearly(
    wrong: str, seaweed: SeaweedS3, prefix: str, tmp_path: Path
) -> None:
    store = S3Store(
        seaweed.endpoint,
        "huddle-tests",
        access_key="nobody" if wrong == "access key" else seaweed.access_key,
        secret_key="wrong-secret" if wrong == "secret" else seaweed.secret_key,
    )
    make_file(tmp_path / "f", 10)
    started = time.monotonic()

    with pytest.raises(StoreAccessDenied) as caught:
        await store.put(prefix + "f", tmp_path / "f")

    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert seaweed.endpoint in message and "secret key" in message, message
    assert "wrong-secret" not in message, "secrets never appear in errors"
    assert "wrong-secret" not in store.describe()


async def test_s3_unreachable_endpoint_fails_fast(dead_endpoint: str, tmp_path: Path) -> None:
    store = S3Store(dead_endpoint, "huddle-tests", "key", "secret")
    make_file(tmp_path / "f", 10)
    started = time.monotonic()

    with pytest.raises(StoreUnreachable) as caught:
        await store.put("a/f", tmp_path / "f")
    with pytest.raises(StoreUnreachable):
        await store.list("a/")

    assert time.monotonic() - started < 8
    assert dead_endpoint in str(caught.value) and "running" in str(caught.value), caught.value


async def test_s3_hung_endpoint_times_out(tmp_path: Path) -> None:
    """A server that takes the connection but never answers: a timeout, not a hang."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel completes the handshakes; nobody ever reads or answers
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        store = S3Store(endpoint, "huddle-tests", "key", "secret", read_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(StoreUnreachable) as caught:
            await store.exists("a/f")
    assert time.monotonic() - started < 5
    assert endpoint in str(caught.value) and "did not answer" in str(caught.value), caught.value


# --- local folder ---


async def test_local_round_trip_list_and_delete(local_store: LocalStore, tmp_path: Path) -> None:
    src = tmp_path / "in.mp4"
    sha = make_file(src, 2 * MiB + 7)

    await local_store.put("rec1/composite.mp4", src)
    make_file(tmp_path / "m", 50)
    await local_store.put("rec1/manifest.json", tmp_path / "m")
    await local_store.put("rec2/manifest.json", tmp_path / "m")

    assert src.exists(), "put leaves the source file alone"
    assert await download_sha(local_store, "rec1/composite.mp4") == (sha, 2 * MiB + 7)
    assert [(o.key, o.size) for o in await local_store.list("rec1/")] == [
        ("rec1/composite.mp4", 2 * MiB + 7),
        ("rec1/manifest.json", 50),
    ]
    assert [o.key for o in await local_store.list("rec")] == [
        "rec1/composite.mp4",
        "rec1/manifest.json",
        "rec2/manifest.json",
    ]
    assert await local_store.list("nothing/") == []
    (local_store.root / ".spool").mkdir()
    (local_store.root / ".spool" / "job.data").write_bytes(b"x")
    assert len(await local_store.list("")) == 3, "hidden folders (a node's work folders) are not listed"
    assert await local_store.exists("rec2/manifest.json")

    await local_store.delete("rec2/manifest.json")
    await local_store.delete("rec2/manifest.json")
    assert not await local_store.exists("rec2/manifest.json")
    assert not (local_store.root / "rec2").exists(), "an emptied folder goes too"
    with pytest.raises(FileNotFoundError):
        await local_store.read("rec2/manifest.json")


async def test_local_put_replaces_atomically(local_store: LocalStore, tmp_path: Path) -> None:
    make_file(tmp_path / "v1", 100)
    sha2 = make_file(tmp_path / "v2", 200)
    await local_store.put("r/f", tmp_path / "v1")
    await local_store.put("r/f", tmp_path / "v2")
    assert await download_sha(local_store, "r/f") == (sha2, 200)
    assert os.listdir(local_store.root / "r") == ["f"], "no temporary files left behind"


@pytest.mark.parametrize(
    "key",
    [
        "../escape",
        "/etc/passwd",
        "rec/../../escape",
        "rec//f",
        "",
        ".",
        "rec/./f",
        "rec\\f",
        "a/..",
        ".spool/x",
        "r/.f",
    ],
)
async def test_local_refuses_keys_outside_root(local_store: LocalStore, key: str, tmp_path: Path) -> None:
    make_file(tmp_path / "f", 10)
    with pytest.raises(ValueError):
        await local_store.put(key, tmp_path / "f")
    with pytest.raises(ValueError):
        await local_store.read(key)
    with pytest.raises(ValueError):
        await local_store.delete(key)
    assert not (tmp_path / "escape").exists()


async def test_local_refuses_symlink_out_of_root(local_store: LocalStore, tmp_path: Path) -> None:
    local_store.root.mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (local_store.root / "link").symlink_to(tmp_path / "outside")
    make_file(tmp_path / "f", 10)
    with pytest.raises(ValueError):
        await local_store.put("link/f", tmp_path / "f")
    assert not (tmp_path / "outside" / "f").exists()


async def test_keys_with_traversal_are_refused_by_s3_too(dead_endpoint: str, tmp_path: Path) -> None:
    # Checked before any network call, and the same rule as the local folder's.
    store = S3Store(dead_endpoint, "huddle-tests", "key", "secret")
    with pytest.raises(ValueError):
        await store.put("../x", tmp_path / "f")
    with pytest.raises(ValueError):
        await store.list("../")


# --- choosing a store ---


def test_store_from_settings(tmp_path: Path) -> None:
    local = store_from_settings(tmp_path, None, None, None, None, None)
    assert isinstance(local, LocalStore) and local.root == tmp_path.resolve()
    assert isinstance(store_from_settings(tmp_path, "", "b", None, None, None), LocalStore)

    s3 = store_from_settings(tmp_path, "http://127.0.0.1:9000", "rec", "ak", "sk", "eu-west-1")
    assert isinstance(s3, S3Store)
    assert (s3.endpoint_url, s3.bucket, s3.region) == ("http://127.0.0.1:9000", "rec", "eu-west-1")
    assert "sk" not in s3.describe().replace("S3", "")

    with pytest.raises(ValueError, match=r"s3-bucket.*s3-secret-key"):
        store_from_settings(tmp_path, "http://127.0.0.1:9000", None, "ak", "", None)
    with pytest.raises(ValueError, match="URL"):
        store_from_settings(tmp_path, "127.0.0.1:9000", "rec", "ak", "sk", None)


# --- the upload queue ---


async def test_uploader_moves_file_into_store(local_store: LocalStore, tmp_path: Path) -> None:
    uploader = Uploader(local_store, tmp_path / "spool")
    uploader.start()
    try:
        files = {f"rec/{i}.webm": make_file(tmp_path / f"{i}.webm", 1000 * (i + 1)) for i in range(3)}
        for i in range(3):
            await uploader.submit(f"rec/{i}.webm", tmp_path / f"{i}.webm")
        kept = make_file(tmp_path / "kept.json", 10)
        await uploader.submit("rec/manifest.json", tmp_path / "kept.json", keep=True)

        assert await uploader.wait_idle(10)
    finally:
        await uploader.close()

    assert (uploader.uploaded, uploader.failures, uploader.pending) == (4, 0, 0)
    for key, sha in files.items():
        assert (await download_sha(local_store, key))[0] == sha
    assert not (tmp_path / "0.webm").exists(), "submit takes the file over"
    assert (tmp_path / "kept.json").exists() and (await download_sha(local_store, "rec/manifest.json"))[
        0
    ] == kept
    assert spool_entries(tmp_path / "spool") == []


async def test_uploader_refuses_bad_keys_and_second_uploader_on_spool(
    local_store: LocalStore, tmp_path: Path
) -> None:
    uploader = Uploader(local_store, tmp_path / "spool")
    with pytest.raises(RuntimeError):
        await uploader.submit("a/b", tmp_path / "x")  # not started
    uploader.start()
    try:
        make_file(tmp_path / "f", 10)
        with pytest.raises(ValueError):
            await uploader.submit("../f", tmp_path / "f")
        assert (tmp_path / "f").exists()
        other = Uploader(local_store, tmp_path / "spool")
        with pytest.raises(RuntimeError, match="in use"):
            other.start()
    finally:
        await uploader.close()


async def test_uploader_waits_out_an_unreachable_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store is down when the file is submitted; SeaweedFS then comes up on that port and the file
    arrives, byte-identical, and leaves the spool."""
    caplog.set_level(logging.INFO, logger="huddle.recording")
    seaweed_dir = tmp_path / "seaweed-late"
    # A port free now, where SeaweedFS starts later.
    (port,) = free_ports(1)
    store = S3Store(f"http://127.0.0.1:{port}", "huddle-late", ACCESS_KEY, SECRET_KEY)
    spool = tmp_path / "spool"
    uploader = Uploader(store, spool, backoff_start=0.05, backoff_cap=0.5)
    uploader.start()
    server = None
    try:
        sha = make_file(tmp_path / "composite.mp4", 3 * MiB)
        await uploader.submit("rec9/composite.mp4", tmp_path / "composite.mp4")
        await asyncio.sleep(1.5)

        assert uploader.pending == 1 and uploader.uploaded == 0 and uploader.failures >= 3
        assert len(spool_entries(spool)) == 2, "the file and its job stay in the spool"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, "one warning per outage, not one per retry"
        fields = warnings[0].fields  # type: ignore[attr-defined]
        assert f"127.0.0.1:{port}" in fields["store"] and "unreachable" in fields["error"]

        # Started in a thread: the uploader keeps retrying on the event loop meanwhile.
        server = await asyncio.to_thread(start_seaweed, seaweed_dir, s3_port=port)
        assert await uploader.wait_idle(30), f"still pending; SeaweedFS log:\n{server.log_tail()}"

        assert (uploader.uploaded, uploader.pending) == (1, 0)
        assert spool_entries(spool) == []
        assert await download_sha(store, "rec9/composite.mp4") == (sha, 3 * MiB)
        recovered = [r for r in caplog.records if r.getMessage() == "recording uploads recovered"]
        assert len(recovered) == 1 and recovered[0].levelno == logging.INFO
    finally:
        await uploader.close()
        if server is not None:
            await asyncio.to_thread(server.stop)


async def test_uploader_restart_uploads_leftover_jobs(
    s3_store: S3Store, dead_endpoint: str, prefix: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    # First run: the store is down; the node stops with two jobs spooled.
    down = S3Store(dead_endpoint, s3_store.bucket, "key", "secret")
    first = Uploader(down, spool, backoff_start=0.05, backoff_cap=0.1)
    first.start()
    shas = {}
    for name in ("a.webm", "b.webm"):
        shas[prefix + name] = make_file(tmp_path / name, 200_000)
        await first.submit(prefix + name, tmp_path / name)
    await asyncio.sleep(0.3)
    await first.close()
    assert first.uploaded == 0 and len(spool_entries(spool)) == 4
    # What a crash in the middle of a submit leaves: a temporary file and a data file with no job file.
    (spool / "000000000099-deadbeef.data.huddle-tmp").write_bytes(b"half")
    (spool / "000000000098-deadbeef.data").write_bytes(b"orphan")

    # Second run, store up again.
    second = Uploader(s3_store, spool)
    second.start()
    try:
        assert second.pending == 2
        assert await second.wait_idle(15)
        make_file(tmp_path / "c.webm", 10)
        await second.submit(prefix + "c.webm", tmp_path / "c.webm")
        assert await second.wait_idle(15)
    finally:
        await second.close()

    assert second.uploaded == 3
    assert spool_entries(spool) == []
    for key, sha in shas.items():
        assert (await download_sha(s3_store, key))[0] == sha
    assert [o.key for o in await s3_store.list(prefix)] == [
        prefix + n for n in ("a.webm", "b.webm", "c.webm")
    ]


class OrderedStore(LocalStore):
    """A local folder that notes the order of its puts."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.puts: list[str] = []

    async def put(self, key: str, path: Path) -> None:
        await super().put(key, path)
        self.puts.append(key)


async def test_uploader_keeps_submission_order_across_restarts(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (tmp_path / "not-a-dir").write_text("a file where the store's folder should be")
    broken = LocalStore(tmp_path / "not-a-dir")
    for run, names in enumerate((["1", "2", "3"], ["4", "5"])):
        first = Uploader(broken, spool, backoff_start=10)
        first.start()
        for name in names:
            make_file(tmp_path / name, 10)
            await first.submit(f"r/{name}", tmp_path / name)
        await first.close()
        assert first.pending == 3 * (run + 1) - run  # 3, then 3 + 2

    store = OrderedStore(tmp_path / "store")
    second = Uploader(store, spool)
    second.start()
    try:
        make_file(tmp_path / "6", 10)
        await second.submit("r/6", tmp_path / "6")
        assert await second.wait_idle(10)
    finally:
        await second.close()
    assert store.puts == [f"r/{n}" for n in "123456"]


async def test_spooled_job_file_is_plain_json(local_store: LocalStore, tmp_path: Path) -> None:
    """Operators may look into the spool: a job is a .data file and a .json naming its key and size."""
    spool = tmp_path / "spool"
    blocked = LocalStore(tmp_path / "file-not-dir")
    (tmp_path / "file-not-dir").write_text("a file where the store's folder should be")
    uploader = Uploader(blocked, spool, backoff_start=10)
    uploader.start()
    try:
        make_file(tmp_path / "f", 123)
        await uploader.submit("rec/f", tmp_path / "f")
        await asyncio.sleep(0.1)
        jobs = [name for name in spool_entries(spool) if name.endswith(".json")]
        assert len(jobs) == 1
        spec = json.loads((spool / jobs[0]).read_text())
        assert spec["key"] == "rec/f" and spec["size"] == 123
        assert (spool / spec["data"]).stat().st_size == 123
        assert uploader.failures == 1 and uploader.pending == 1
    finally:
        await uploader.close()
