"""The object store's contract, run over both backends (the `store_url` fixture): a
local directory and S3, as moto's real S3 server over HTTP on 127.0.0.1 (started in
this process, once per module). A backend that passes is interchangeable. Each backend
has a probe that looks behind the interface: S3 objects' metadata through a second
client, the directory's temporary files, a failure injected mid-write."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import errno
import os
import random
import socket
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from serve.errors import ConfigError, StorageUnavailable
from serve.storage.store import open_store

pytestmark = pytest.mark.timeout(120)

from moto_s3 import BUCKET, MotoS3

PREFIX = "some/prefix"
MiB = 1024 * 1024
IMMUTABLE = "public, max-age=31536000, immutable"


def run(coro):
    return asyncio.run(coro)


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


class LocalProbe:
    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, **kwargs):
        return open_store(f"file://{self.root}", **kwargs)

    def head(self, key: str) -> dict | None:
        return None  # no metadata is kept beside a file

    def plant_outside(self) -> None:
        (self.root.parent / "outside").write_bytes(b"not in the store")

    def partials(self) -> list[str]:
        """Temporary files left anywhere under the root."""
        return [f for _, _, files in os.walk(self.root) for f in files if f.startswith(".")]

    def unreachable(self):
        (self.root.parent / "a-file").write_bytes(b"")
        return open_store(f"file://{self.root.parent / 'a-file' / 'store'}")

    @contextlib.contextmanager
    def failing_writes(self):
        """The store, with every fsync failing as on a failing disk: the temporary
        file is written, then the write fails."""
        def fsync(fd):
            raise OSError(errno.EIO, "injected I/O error")

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "fsync", fsync)
            yield self.open()


class S3Probe:
    def __init__(self, s3: MotoS3) -> None:
        self.s3 = s3

    def open(self, **kwargs):
        return open_store(f"s3://{BUCKET}/{PREFIX}", endpoint_url=self.s3.endpoint, **kwargs)

    def head(self, key: str) -> dict | None:
        return self.s3.admin.head_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")

    def plant_outside(self) -> None:
        for key in ("elsewhere/objects/x", "some/prefixed/objects/x", "objects/x"):
            self.s3.admin.put_object(Bucket=BUCKET, Key=key, Body=b"not in the store")

    def partials(self) -> list[str]:
        """Multipart uploads begun and neither completed nor aborted."""
        uploads = self.s3.admin.list_multipart_uploads(Bucket=BUCKET).get("Uploads", ())
        return [u["Key"] for u in uploads]

    def unreachable(self):
        from serve.storage.s3 import S3Store

        return S3Store(BUCKET, PREFIX, endpoint_url=f"http://127.0.0.1:{closed_port()}",
                       max_attempts=2, connect_timeout_s=1, read_timeout_s=2)

    @contextlib.contextmanager
    def failing_writes(self):
        """The store, with S3 answering 500 to every part of a multipart upload but
        the first (retried, then failed)."""
        from botocore.awsrequest import AWSResponse

        from serve.storage.s3 import S3Store

        class Body:
            def stream(self, **_):
                yield b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"

        def upload_part(request, **_):
            if parse_qs(urlsplit(request.url).query)["partNumber"] != ["1"]:
                return AWSResponse(request.url, 500, {}, Body())
            return None

        store = S3Store(BUCKET, PREFIX, endpoint_url=self.s3.endpoint, max_attempts=2)
        store._client.meta.events.register("before-send.s3.UploadPart", upload_part)
        try:
            yield store
        finally:
            run(store.close())


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    """A fresh, empty store on each backend: a directory under tmp_path, or the
    module's moto server (emptied) under the prefix some/prefix."""
    if request.param == "local":
        return f"file://{tmp_path / 'store'}"
    request.getfixturevalue("moto_s3").empty()
    return f"s3://{BUCKET}/{PREFIX}"


@pytest.fixture
def probe(store_url, request):
    if is_s3(store_url):
        return S3Probe(request.getfixturevalue("moto_s3"))
    return LocalProbe(Path(urlsplit(store_url).path))


@pytest.fixture
def store(probe):
    s = probe.open()
    yield s
    run(s.close())


def test_put_then_get_is_byte_exact(store):
    blobs = {"objects/ab/abcd.webp": payload(4096, 1), "objects/ab/empty.bin": b"",
             "sidecars/ab/abcd.json": b'{"seed": 7}\n', "a b/+=@,;~!$'()*&:.png": b"\x00\xff"}

    async def body():
        for key, data in blobs.items():
            await store.put(key, data, "application/octet-stream")
        return {key: await store.get(key) for key in blobs}, await store.get("objects/zz/no")

    got, missing = run(body())
    assert got == blobs and missing is None


def test_exists(store):
    async def body():
        before = await store.exists("objects/ab/abcd.webp")
        await store.put("objects/ab/abcd.webp", b"x", "image/webp")
        # a "directory" of other keys is no object
        return before, await store.exists("objects/ab/abcd.webp"), await store.exists("objects/ab")

    assert run(body()) == (False, True, False)


def test_overwrite_replaces(store):
    async def body():
        await store.put("objects/ab/k", payload(10_000, 1), "image/png")
        await store.put("objects/ab/k", b"short", "image/png")  # shorter: no old tail left
        return await store.get("objects/ab/k"), await store.keys("")

    assert run(body()) == (b"short", ["objects/ab/k"])


def test_delete_is_idempotent(store):
    async def body():
        await store.put("objects/ab/k", b"x", "image/png")
        await store.put("objects/ab/kept", b"y", "image/png")
        await store.delete("objects/ab/k")
        await store.delete("objects/ab/k")
        await store.delete("objects/never/was")
        return await store.get("objects/ab/k"), await store.keys("")

    assert run(body()) == (None, ["objects/ab/kept"])


def test_keys_are_sorted_and_only_under_the_prefix(store, probe):
    keys = ["objects/ab/2.webp", "objects/abc/1.webp", "objects/b/0.webp",
            "objects/ab/1.webp", "sidecars/ab/1.json", "top.txt"]
    probe.plant_outside()

    async def body():
        for key in random.Random(3).sample(keys, len(keys)):
            await store.put(key, key.encode(), "application/octet-stream")
        return {p: await store.keys(p) for p in ("", "objects/", "objects/ab", "objects/ab/",
                                                  "sidecars/", "to", "nothing/", "objects/zz")}

    got = run(body())
    assert got[""] == sorted(keys)
    assert got["objects/"] == sorted(k for k in keys if k.startswith("objects/"))
    # a string prefix, as S3's: objects/ab matches objects/abc/ too
    assert got["objects/ab"] == ["objects/ab/1.webp", "objects/ab/2.webp", "objects/abc/1.webp"]
    assert got["objects/ab/"] == ["objects/ab/1.webp", "objects/ab/2.webp"]
    assert got["sidecars/"] == ["sidecars/ab/1.json"] and got["to"] == ["top.txt"]
    assert got["nothing/"] == got["objects/zz"] == []


BAD_KEYS = ["", "/objects/a", "objects//a", "objects/a/", "../a", "objects/../a", "objects/./a",
            ".hidden", "objects/.a.tmp", "objects\\a", "objects/é", "objects/a\nb", "a\x00b",
            "a\tb", "x" * 1025, "objects/" + "y" * 256]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_bad_keys_are_rejected(store, key):
    async def body():
        for call in (store.put(key, b"x", "image/png"), store.get(key), store.exists(key),
                     store.delete(key)):
            with pytest.raises(ValueError):
                await call
        with pytest.raises(ValueError):
            store.presigned_url(key, 60)
        return await store.keys("")

    assert run(body()) == []


@pytest.mark.parametrize("prefix", ["/", "../", "objects//", "objects/../", "é"])
def test_bad_prefixes_are_rejected(store, prefix):
    with pytest.raises(ValueError):
        run(store.keys(prefix))


def test_a_large_object_round_trips(store, probe, store_url):
    data = payload(20 * MiB, 2)

    async def body():
        await store.put("objects/big/one.png", data, "image/png", IMMUTABLE)
        return await store.get("objects/big/one.png")

    assert run(body()) == data
    if is_s3(store_url):  # uploaded in parts: 8 + 8 + 4 MiB, the ETag says how many
        head = probe.head("objects/big/one.png")
        assert head["ETag"].strip('"').endswith("-3"), head["ETag"]
        assert head["ContentLength"] == len(data)
        assert (head["ContentType"], head["CacheControl"]) == ("image/png", IMMUTABLE)
    assert probe.partials() == []


def test_content_type_and_cache_control_are_stored(store, probe, store_url):
    async def body():
        await store.put("objects/ab/a.webp", b"w", "image/webp", IMMUTABLE)
        await store.put("sidecars/ab/a.json", b"{}", "application/json")

    run(body())
    if is_s3(store_url):
        head = probe.head("objects/ab/a.webp")
        assert (head["ContentType"], head["CacheControl"]) == ("image/webp", IMMUTABLE)
        head = probe.head("sidecars/ab/a.json")
        assert head["ContentType"] == "application/json" and "CacheControl" not in head
    else:  # the service serves local files itself: the directory keeps only the bytes
        assert probe.head("objects/ab/a.webp") is None


def test_a_presigned_url_fetches_the_object_and_expires(store, store_url):
    data = payload(3000, 4)
    run(store.put("objects/ab/p.webp", data, "image/webp"))
    for expires_s in (0, 7 * 24 * 3600 + 1):
        with pytest.raises(ValueError):
            store.presigned_url("objects/ab/p.webp", expires_s)
    url = store.presigned_url("objects/ab/p.webp", 90)
    if not is_s3(store_url):
        assert url is None  # the service serves local objects itself
        return
    with httpx.Client(trust_env=False, timeout=10) as client:  # no credentials: the URL only
        r = client.get(url)
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-type"] == "image/webp"
    # moto does not enforce expiry; the signed query is what S3 enforces it by
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256" and query["X-Amz-Expires"] == "90"
    signed_at = calendar.timegm(time.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
    assert abs(signed_at - time.time()) < 300
    assert urlsplit(url).path == f"/{BUCKET}/{PREFIX}/objects/ab/p.webp"


@pytest.mark.parametrize("sse, kms_key_id", [("AES256", None), ("aws:kms", "alias/imagegen")])
def test_server_side_encryption_is_recorded(probe, store_url, sse, kms_key_id):
    if not is_s3(store_url):  # asking a directory to encrypt is a configuration error
        with pytest.raises(ConfigError, match="s3:// only"):
            probe.open(sse=sse, kms_key_id=kms_key_id)
        return
    store = probe.open(sse=sse, kms_key_id=kms_key_id)

    async def body():
        try:
            await store.put("objects/ab/small.webp", b"s", "image/webp")
            await store.put("objects/ab/large.png", payload(9 * MiB), "image/png")  # multipart
        finally:
            await store.close()

    run(body())
    for key in ("objects/ab/small.webp", "objects/ab/large.png"):
        head = probe.head(key)
        assert head["ServerSideEncryption"] == sse, key
        assert head.get("SSEKMSKeyId") == kms_key_id, key


def test_an_unreachable_store_raises_storage_unavailable(probe, store_url):
    store = probe.unreachable()

    async def body():
        try:
            for data in (b"small", payload(9 * MiB)):
                with pytest.raises(StorageUnavailable):
                    await store.put("objects/ab/k", data, "image/png")
            if is_s3(store_url):  # a directory that cannot exist reads as empty
                for call in (store.get("objects/ab/k"), store.exists("objects/ab/k"),
                             store.delete("objects/ab/k"), store.keys("")):
                    with pytest.raises(StorageUnavailable):
                        await call
        finally:
            await store.close()

    run(body())  # bounded: two attempts, short timeouts (and the module's timeout)
    assert probe.partials() == []
    live = probe.open()
    assert run(live.keys("")) == []  # nothing reached the real store
    run(live.close())


def test_a_failed_write_leaves_the_old_object_and_no_partial_one(store, probe):
    run(store.put("objects/ab/k", b"old", "image/png"))

    async def body(failing):
        for key, seed in (("objects/ab/k", 5), ("objects/ab/new", 6)):
            with pytest.raises(StorageUnavailable):
                await failing.put(key, payload(20 * MiB, seed), "image/png")

    with probe.failing_writes() as failing:
        run(body(failing))
    assert run(store.get("objects/ab/k")) == b"old"
    assert run(store.keys("")) == ["objects/ab/k"]
    assert probe.partials() == []


@pytest.mark.parametrize("url, says", [
    ("objects", "scheme must be file:// .* or s3://"),
    ("http://bucket/prefix", "scheme must be"),
    ("file://relative/path", "absolute path"),
    ("file:///", "absolute directory"),
    ("file:///srv/images?x=1", "no query"),
    ("s3://", "not a bucket name"),
    ("s3://Bucket_Upper/p", "not a bucket name"),
    ("s3://bucket:9000/p", "not a bucket name"),
    ("s3://bucket/a/../b", "bad prefix"),
    ("s3://AKIA:secret@bucket/p", "no credentials"),
])
def test_a_bad_url_is_a_config_error(url, says):
    with pytest.raises(ConfigError, match=says) as e:
        open_store(url)
    assert "secret" not in str(e.value)


@pytest.mark.parametrize("kwargs, says", [
    ({"sse": "aes256"}, "must be one of AES256, aws:kms"),
    ({"sse": "AES256", "kms_key_id": "k"}, "needs sse=aws:kms"),
    ({"endpoint_url": "minio:9000"}, "http\\(s\\)://host"),
])
def test_bad_s3_options_are_config_errors(kwargs, says):
    with pytest.raises(ConfigError, match=says):
        open_store("s3://bucket/prefix", **kwargs)
