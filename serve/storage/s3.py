"""The S3 object store (AWS S3, or an S3-compatible server through `endpoint_url`:
MinIO, Ceph RGW). One boto3 client per store, its sync calls run on the store's own
threads: a call retrying against an S3 outage (standard mode, 5 attempts, 5 s
connect / 30 s read timeouts) never holds the default executor's threads, which
encode images. Credentials and region come from boto3's usual chain (AWS_* env,
web identity on EKS, instance profile).

Every key is put under the URL's prefix. A put is one PutObject below 8 MiB and a
multipart upload above, which S3 makes visible only once complete (a failed one is
aborted), so a reader never sees part of an object. Server-side encryption (AES256
or aws:kms with a key id) is requested on every put.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
from concurrent.futures import ThreadPoolExecutor

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    MetadataRetrievalError,
    NoCredentialsError,
    PartialCredentialsError,
    TokenRetrievalError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from ..errors import StorageUnavailable
from .store import check_expiry, check_key, check_prefix

log = logging.getLogger(__name__)

MiB = 1024 * 1024
THREADS = 16  # S3 calls in flight per store
TRANSFER = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB,
                          max_concurrency=4)

# Not reaching the store, or not allowed to use it: retry later, not a bug. Other
# BotoCoreErrors (a bad region or retry setting, bad parameters) are bugs and surface.
_DOWN = (HTTPClientError, BotoConnectionError, IncompleteReadError, ChecksumError,
         NoCredentialsError, PartialCredentialsError, CredentialRetrievalError,
         TokenRetrievalError, MetadataRetrievalError)
_DENIED = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "ExpiredToken", "InvalidToken", "NoSuchBucket", "AccountProblem"}
_MISSING = {"404", "NoSuchKey", "NotFound"}


def _code(e: ClientError) -> tuple[int, str]:
    return (e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0),
            str(e.response.get("Error", {}).get("Code", "")))


def _is_down(e: Exception) -> bool:
    if isinstance(e, ClientError):
        status, code = _code(e)
        return status >= 500 or status in (401, 403) or code in _DENIED or code.startswith("KMS.")
    return isinstance(e, _DOWN)


def _is_missing(e: ClientError) -> bool:
    status, code = _code(e)
    return code in _MISSING or (status == 404 and code != "NoSuchBucket")


def _config(endpoint_url: str | None, max_attempts: int, connect_timeout_s: float,
            read_timeout_s: float) -> Config:
    extra = {}
    if endpoint_url is not None:
        # S3-compatible servers: bucket-in-path addressing (no wildcard DNS needed), and
        # checksums only where S3 requires them: servers that predate S3's default CRC
        # checksums (botocore 1.36) reject the headers or the aws-chunked bodies.
        extra = {"s3": {"addressing_style": "path"},
                 "request_checksum_calculation": "when_required",
                 "response_checksum_validation": "when_required"}
    return Config(
        signature_version="s3v4",
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        # each of the store's threads may run a multipart upload on TRANSFER's threads
        max_pool_connections=THREADS * TRANSFER.max_concurrency,
        **extra,
    )


class S3Store:
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 sse: str | None = None, kms_key_id: str | None = None,
                 max_attempts: int = 5, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 30.0) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        config = _config(endpoint_url, max_attempts, connect_timeout_s, read_timeout_s)
        # A session per store: boto3's default session is shared state, not thread-safe.
        self._client = boto3.session.Session().client("s3", endpoint_url=endpoint_url,
                                                      config=config)
        self._sse = {}
        if sse:
            self._sse["ServerSideEncryption"] = sse
        if kms_key_id:
            self._sse["SSEKMSKeyId"] = kms_key_id
        self._executor = ThreadPoolExecutor(THREADS, thread_name_prefix="imagegen-s3")

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    async def _run(self, fn, *args, **kwargs):
        call = functools.partial(fn, *args, **kwargs)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except (BotoCoreError, ClientError) as e:
            if not _is_down(e):
                raise
            log.warning("object store s3://%s/%s: %s: %s", self.bucket, self.prefix,
                        type(e).__name__, e)
            raise StorageUnavailable("the object store is unavailable") from None

    async def put(self, key: str, data: bytes, content_type: str,
                  cache_control: str | None = None) -> None:
        name = self._name(key)
        args = {"ContentType": content_type, **self._sse}
        if cache_control is not None:
            args["CacheControl"] = cache_control
        if len(data) < TRANSFER.multipart_threshold:  # one request, no transfer manager
            await self._run(self._client.put_object, Bucket=self.bucket, Key=name, Body=data,
                            **args)
        else:
            await self._run(self._client.upload_fileobj, io.BytesIO(data), self.bucket, name,
                            ExtraArgs=args, Config=TRANSFER)

    async def get(self, key: str) -> bytes | None:
        return await self._run(self._read, self._name(key))

    def _read(self, name: str) -> bytes | None:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=name)["Body"].read()
        except ClientError as e:
            if _is_missing(e):
                return None
            raise

    async def exists(self, key: str) -> bool:
        return await self._run(self._head, self._name(key))

    def _head(self, name: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=name)
            return True
        except ClientError as e:
            if _is_missing(e):
                return False
            raise

    async def delete(self, key: str) -> None:
        # S3 answers 204 for a missing key too
        await self._run(self._client.delete_object, Bucket=self.bucket, Key=self._name(key))

    async def keys(self, prefix: str) -> list[str]:
        return await self._run(self._list, self.prefix + check_prefix(prefix))

    def _list(self, prefix: str) -> list[str]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        cut = len(self.prefix)
        return sorted(o["Key"][cut:] for page in pages for o in page.get("Contents", ()))

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        name, expires_s = self._name(key), check_expiry(expires_s)
        try:  # signed locally, no request: only missing credentials can fail it
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": name}, ExpiresIn=expires_s)
        except _DOWN as e:
            log.warning("object store s3://%s: cannot sign: %s", self.bucket, e)
            raise StorageUnavailable("the object store is unavailable") from None

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()
