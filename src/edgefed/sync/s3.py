"""The object-store backend of `Store`: S3 and S3-compatible stores (MinIO, Ceph, R2) via boto3.

    s3://bucket/prefix                              AWS, credentials from the usual chain
    s3://bucket/prefix?endpoint=http://host:9000    an S3-compatible store at that endpoint

The layout is the one of every store, under `prefix/`. An S3 PUT is atomic (an object appears
whole or not at all, so a writer killed mid-upload leaves nothing), and `create` sends
`If-None-Match: *`, which makes it exclusive as well: of two devices racing for one key the
store keeps exactly one (412 for the other), and nothing is ever overwritten. There is no server
of ours to check signatures on write; every reader verifies signatures and hashes against the
device registrations before it uses a blob, as with a shared folder. Credentials, region and
retries come from boto3's own configuration (environment, ~/.aws, instance roles); an endpoint in
the URL wins over AWS_ENDPOINT_URL_S3 so that a workspace records where its store is.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from edgefed.errors import StoreError
from edgefed.sync.layout import is_store_key
from edgefed.sync.signing import DeviceKey
from edgefed.sync.store import KeyExists, KeyMissing, Store

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_TAKEN = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_FIXES = {
    "NoSuchBucket": "create the bucket first (e.g. `aws s3 mb s3://BUCKET`)",
    "AccessDenied": "check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and bucket policy",
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID, or the profile in use",
    "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY, or the profile in use",
}


def parse_s3_url(url: str) -> tuple[str, str, str | None]:
    """`s3://bucket/prefix?endpoint=URL` → (bucket, prefix without slashes, endpoint or None)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    unknown = set(query) - {"endpoint"}
    if parts.scheme != "s3" or not parts.netloc or unknown:
        raise StoreError(
            f"'{url}' is not an S3 store URL",
            "write s3://BUCKET/PREFIX, optionally ?endpoint=http://HOST:PORT",
        )
    endpoint = query.get("endpoint", [None])[-1]
    return parts.netloc, parts.path.strip("/"), endpoint


class S3Store(Store):
    """A federation store under `prefix/` of an S3 bucket."""

    def __init__(self, url: str) -> None:
        import boto3
        from botocore.config import Config

        self.url = url
        self.bucket, self.prefix, endpoint = parse_s3_url(url)
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            config=Config(retries={"mode": "standard", "max_attempts": 5}),
        )

    def _object(self, key: str) -> str:
        if not is_store_key(key):
            raise StoreError(f"'{key}' is not a federation store key", "this is a bug; report it")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, what: str) -> StoreError:
        from botocore.exceptions import ClientError

        code = exc.response["Error"].get("Code", "") if isinstance(exc, ClientError) else ""
        return StoreError(
            f"cannot {what} in {self.url} ({code or exc.__class__.__name__}: {exc})",
            _FIXES.get(code, "check the endpoint, the bucket and the credentials"),
        )

    def read(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self._object(key))
            return answer["Body"].read()
        except ClientError as exc:
            if exc.response["Error"].get("Code") in _NOT_FOUND:
                raise KeyMissing(f"{key} is not in the store {self.url}") from None
            raise self._error(exc, f"read {key}") from None
        except BotoCoreError as exc:
            raise self._error(exc, f"read {key}") from None

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
            raise self._error(exc, "list keys") from None
        return sorted(found)

    def create(self, key: str, data: bytes, *, signer: DeviceKey | None = None) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(
                Bucket=self.bucket, Key=self._object(key), Body=data, IfNoneMatch="*"
            )
        except ClientError as exc:
            if exc.response["Error"].get("Code") in _TAKEN:
                raise KeyExists(f"{key} already exists in {self.url}") from None
            raise self._error(exc, f"store {key}") from None
        except BotoCoreError as exc:
            raise self._error(exc, f"store {key}") from None

    def close(self) -> None:
        self._client.close()
