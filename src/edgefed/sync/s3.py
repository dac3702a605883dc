"""The object-store backend of `Store`: S3 and S3-compatible stores (MinIO, Ceph, R2) via boto3.

    s3://bucket/prefix                              AWS, credentials from the usual chain
    s3://bucket/prefix?endpoint=http://host:9000    an S3-compatible store at that endpoint

The layout is the one of every store, under `prefix/`. An S3 PUT is atomic (an object appears
whole or not at all, so a writer killed mid-upload leaves nothing), and `create` sends `If-None-
Match: *`, which makes it exclusive as well on stores with conditional writes (AWS S3 since
2024, MinIO): of two devices racing for one key the store keeps exactly one (412 for the other),
and nothing is ever overwritten. (A PUT that boto3 retries after its answer was lost meets its
own object: 412, KeyExists; the callers that create keys read the key back and count their own
bytes as created.) There is no server of ours to check signatures on write; every reader
verifies signatures and hashes against the device registrations before it uses a blob, as with a
shared folder, and reads nothing over `MAX_DOWNLOAD_BYTES`. Credentials and region come from
boto3's own configuration (environment, ~/.aws, instance roles); retries are boto3's standard
mode with 5 attempts; an endpoint in the URL wins over AWS_ENDPOINT_URL_S3 so that a workspace
records where its store is, and with one, checksums are sent only where the API requires them
(some S3-compatible servers refuse boto3's default CRC headers).
"""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

from edgefed.errors import StoreError
from edgefed.sync.layout import is_store_key
from edgefed.sync.signing import DeviceKey
from edgefed.sync.store import (
    KEY_EXISTS_FIX,
    KEY_MISSING_FIX,
    MAX_DOWNLOAD_BYTES,
    KeyExists,
    KeyMissing,
    Store,
    StoreUnreachable,
)

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_TAKEN = {"PreconditionFailed", "412"}
_CONFLICT_RETRIES = 5  # 409 ConditionalRequestConflict: another write in flight; AWS says retry
_FIXES = {
    "NoSuchBucket": "create the bucket first (e.g. `aws s3 mb s3://BUCKET`)",
    "AccessDenied": "check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and bucket policy",
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID, or the profile in use",
    "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY, or the profile in use",
}


def parse_s3_url(url: str) -> tuple[str, str, str | None]:
    """`s3://bucket/prefix?endpoint=URL` → (bucket, prefix without slashes, endpoint or None)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    endpoint = query.get("endpoint", [None])[-1]
    bad_endpoint = endpoint is not None and (
        urlsplit(endpoint).scheme not in ("http", "https") or not urlsplit(endpoint).netloc
    )
    if parts.scheme != "s3" or not parts.netloc or set(query) - {"endpoint"} or bad_endpoint:
        raise StoreError(
            f"'{url}' is not an S3 store URL",
            "write s3://BUCKET/PREFIX, optionally ?endpoint=http://HOST:PORT",
        )
    return parts.netloc, parts.path.strip("/"), endpoint


class S3Store(Store):
    """A federation store under `prefix/` of an S3 bucket."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.bucket, self.prefix, endpoint = parse_s3_url(url)
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            raise StoreError(
                "s3:// stores need boto3, which is not installed", "pip install 'edgefed[s3]'"
            ) from exc
        checksums = {"request_checksum_calculation": "when_required"} if endpoint else {}
        # a session of our own: boto3's default session is not safe to share between threads
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            config=Config(retries={"mode": "standard", "max_attempts": 5}, **checksums),
        )

    def _object(self, key: str) -> str:
        if not is_store_key(key):
            raise StoreError(f"'{key}' is not a federation store key", "this is a bug; report it")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, what: str) -> StoreError:
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

        code = exc.response["Error"].get("Code", "") if isinstance(exc, ClientError) else ""
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) if code else 0
        # no answer, or a server in trouble, after botocore's own retries: may pass
        transient = isinstance(exc, ConnectionError | HTTPClientError) or status >= 500
        return (StoreUnreachable if transient else StoreError)(
            f"cannot {what} in {self.url} ({code or exc.__class__.__name__}: {exc})",
            _FIXES.get(code, "check the endpoint, the bucket and the credentials"),
        )

    def _too_large(self, key: str, limit: int) -> StoreError:
        return StoreError(
            f"{key} in {self.url} is over the {limit} byte download limit",
            "remove it from the bucket: no federation blob is that large",
        )

    def read(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        limit = MAX_DOWNLOAD_BYTES
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self._object(key))
            try:
                if int(answer.get("ContentLength", 0)) > limit:
                    raise self._too_large(key, limit)
                # one byte more than the limit tells an oversized body from one exactly at it
                data = answer["Body"].read(limit + 1)
            finally:
                answer["Body"].close()
        except ClientError as exc:
            if exc.response["Error"].get("Code") in _NOT_FOUND:
                raise KeyMissing(f"{key} is not in the store {self.url}", KEY_MISSING_FIX) from exc
            raise self._error(exc, f"read {key}") from exc
        except BotoCoreError as exc:
            raise self._error(exc, f"read {key}") from exc
        if len(data) > limit:
            raise self._too_large(key, limit)
        return data

    def keys(self, prefix: str = "") -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        root = f"{self.prefix}/" if self.prefix else ""
        found = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"][len(root) :]
                    if is_store_key(key):
                        found.append(key)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, "list keys") from exc
        return sorted(found)

    def create(self, key: str, data: bytes, *, signer: DeviceKey | None = None) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        for attempt in range(1, _CONFLICT_RETRIES + 1):
            try:
                self._client.put_object(
                    Bucket=self.bucket, Key=self._object(key), Body=data, IfNoneMatch="*"
                )
                return
            except ClientError as exc:
                code = exc.response["Error"].get("Code")
                if code in _TAKEN:
                    raise KeyExists(f"{key} already exists in {self.url}", KEY_EXISTS_FIX) from exc
                if code != "ConditionalRequestConflict" or attempt == _CONFLICT_RETRIES:
                    raise self._error(exc, f"store {key}") from exc
            except BotoCoreError as exc:
                raise self._error(exc, f"store {key}") from exc
            time.sleep(0.2 * attempt)

    def close(self) -> None:
        self._client.close()
