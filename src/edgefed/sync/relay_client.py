"""The relay backend of `Store`: httpx, retries with backoff, a sha256 check on every download.

It speaks the protocol of `edgefed.sync.wire` and never imports the relay's server side, so a
device that syncs through a relay does not load Starlette.

Transient failures (connection errors, timeouts, a connection cut mid-body, 5xx, 429) are
retried with exponential backoff; answers that will not change on retry (401, 403, 400, 413)
become one clear StoreError at once. Every answer is streamed and refused as soon as it is over
`MAX_DOWNLOAD_BYTES` (at once when its Content-Length says so): the relay, or whoever answers
in its place, must not make a device hold gigabytes before anything checks them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import httpx

from edgefed.errors import StoreError
from edgefed.sync.layout import is_store_key, key_owner
from edgefed.sync.signing import DeviceKey, write_claim
from edgefed.sync.store import (
    KEY_EXISTS_FIX,
    KEY_MISSING_FIX,
    MAX_DOWNLOAD_BYTES,
    KeyExists,
    KeyMissing,
    Store,
    StoreUnreachable,
)
from edgefed.sync.wire import (
    DEVICE_HEADER,
    ERROR_FIELD,
    KEYS_PATH,
    PREFIX_PARAM,
    SHA256_HEADER,
    SIGNATURE_HEADER,
    blob_path,
)

logger = logging.getLogger(__name__)

RETRIES = 5
FIRST_BACKOFF_SECONDS = 0.5
_UNREACHABLE_FIX = "check that the relay is running and reachable"
_FIXES = {
    401: "check the relay token (--token-file or EDGEFED_TOKEN)",
    403: "a device may write only its own keys, signed with its own key",
    413: "the relay refuses bodies this large (its --max-bytes)",
    400: "this is a bug; report it",
}


@dataclass(frozen=True)
class _Answer:
    """A relay's answer with its whole body, read within `MAX_DOWNLOAD_BYTES`."""

    status: int
    headers: httpx.Headers
    body: bytes


def _transient(status: int) -> bool:
    """Whether the same request may well succeed later (server trouble, rate limiting)."""
    return status >= 500 or status == 429


class RelayStore(Store):
    """A federation store behind an edgefed relay at `url`."""

    def __init__(self, url: str, *, token: str | None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _request(self, method: str, path: str, what: str, **kwargs) -> _Answer:
        """`method path`, retried while the failure is transient; `what` names the body in
        errors. Raises StoreError when the relay stays unreachable or the body is too large."""
        delay = FIRST_BACKOFF_SECONDS
        for attempt in range(1, RETRIES + 1):
            try:
                with self._client.stream(method, path, **kwargs) as response:
                    if not _transient(response.status_code):
                        body = self._limited_body(response, what)
                        return _Answer(response.status_code, response.headers, body)
                    problem = f"the relay {self.url} answered {response.status_code}"
            except httpx.TransportError as exc:
                problem = f"cannot reach the relay {self.url} ({exc.__class__.__name__}: {exc})"
                if attempt == RETRIES:
                    raise StoreUnreachable(problem, _UNREACHABLE_FIX) from exc
            if attempt == RETRIES:
                raise StoreUnreachable(problem, _UNREACHABLE_FIX)
            logger.info("%s; retry %d/%d in %.1f s", problem, attempt, RETRIES - 1, delay)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _limited_body(self, response: httpx.Response, what: str) -> bytes:
        """The body of a streamed `response`; StoreError as soon as it is over the limit."""
        limit = MAX_DOWNLOAD_BYTES
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self._too_large(what, limit)
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > limit:
                raise self._too_large(what, limit)  # leaving the stream closes the connection
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, what: str, limit: int) -> StoreError:
        return StoreError(
            f"{what} from the relay {self.url} is over the {limit} byte download limit",
            "no federation blob is that large: ask the relay's operator to check its store",
        )

    def _fail(self, answer: _Answer, what: str) -> StoreError:
        try:
            detail = json.loads(answer.body)[ERROR_FIELD]
        except (ValueError, KeyError, TypeError):
            detail = answer.body[:200].decode("utf-8", "replace")
        return StoreError(
            f"the relay refused to {what} ({answer.status}: {detail})",
            _FIXES.get(answer.status, "check the relay's log"),
        )

    def read(self, key: str) -> bytes:
        answer = self._request("GET", blob_path(key), key)
        if answer.status == 404:
            raise KeyMissing(f"{key} is not in the relay {self.url}", KEY_MISSING_FIX)
        if answer.status != 200:
            raise self._fail(answer, f"read {key}")
        if hashlib.sha256(answer.body).hexdigest() != answer.headers.get(SHA256_HEADER):
            raise StoreError(f"{key} arrived damaged from {self.url}", "sync again")
        return answer.body

    def keys(self, prefix: str = "") -> list[str]:
        answer = self._request("GET", KEYS_PATH, "the key list", params={PREFIX_PARAM: prefix})
        if answer.status != 200:
            raise self._fail(answer, "list keys")
        malformed = f"the relay {self.url} sent a malformed key list"
        try:
            listed = json.loads(answer.body)
        except ValueError as exc:
            raise StoreError(malformed, "check the relay") from exc
        if not isinstance(listed, list):
            raise StoreError(malformed, "check the relay")
        # a relay is not trusted to name keys: anything outside the layout is dropped here
        return sorted(k for k in listed if isinstance(k, str) and is_store_key(k))

    def create(self, key: str, data: bytes, *, signer: DeviceKey | None = None) -> None:
        headers = {}
        if signer is not None:
            headers = {
                DEVICE_HEADER: key_owner(key) or "",
                SIGNATURE_HEADER: signer.sign(write_claim(key, data)),
            }
        answer = self._request(
            "PUT", blob_path(key), f"the answer to storing {key}", content=data, headers=headers
        )
        if answer.status == 409:
            raise KeyExists(f"{key} already exists in the relay {self.url}", KEY_EXISTS_FIX)
        if answer.status != 201:
            raise self._fail(answer, f"store {key}")

    def close(self) -> None:
        self._client.close()
