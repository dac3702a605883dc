"""The relay backend of `Store`: httpx, retries with backoff, a sha256 check on every download.

Transient failures (connection errors, timeouts, 5xx, 429) are retried with exponential backoff;
answers that will not change on retry (401, 403, 400, 413) become one clear StoreError at once.
"""

from __future__ import annotations

import hashlib
import logging
import time

import httpx

from edgefed.errors import StoreError
from edgefed.sync.layout import is_store_key, key_owner
from edgefed.sync.relay import DEVICE_HEADER, SHA256_HEADER, SIGNATURE_HEADER
from edgefed.sync.signing import DeviceKey, write_claim
from edgefed.sync.store import MAX_DOWNLOAD_BYTES, KeyExists, KeyMissing, Store

logger = logging.getLogger(__name__)

RETRIES = 5
FIRST_BACKOFF_SECONDS = 0.5
_FIXES = {
    401: "check the relay token (--token-file or EDGEFED_TOKEN)",
    403: "a device may write only its own keys, signed with its own key",
    413: "the relay refuses bodies this large (its --max-bytes)",
    400: "this is a bug; report it",
}


class RelayStore(Store):
    """A federation store behind an edgefed relay at `url`."""

    def __init__(self, url: str, *, token: str | None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        delay = FIRST_BACKOFF_SECONDS
        for attempt in range(1, RETRIES + 1):
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                problem = f"cannot reach the relay {self.url} ({exc.__class__.__name__}: {exc})"
            else:
                if response.status_code < 500 and response.status_code != 429:
                    return response
                problem = f"the relay {self.url} answered {response.status_code}"
            if attempt == RETRIES:
                raise StoreError(problem, "check that the relay is running and reachable")
            logger.info("%s; retry %d/%d in %.1f s", problem, attempt, RETRIES - 1, delay)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _fail(self, response: httpx.Response, what: str) -> StoreError:
        try:
            detail = response.json().get("error", "")
        except ValueError:
            detail = response.text[:200]
        return StoreError(
            f"the relay refused to {what} ({response.status_code}: {detail})",
            _FIXES.get(response.status_code, "check the relay's log"),
        )

    def read(self, key: str) -> bytes:
        response = self._request("GET", f"/v1/blob/{key}")
        if response.status_code == 404:
            raise KeyMissing(f"{key} is not in the relay {self.url}")
        if response.status_code != 200:
            raise self._fail(response, f"read {key}")
        data = response.content
        if len(data) > MAX_DOWNLOAD_BYTES:
            raise StoreError(f"{key} from {self.url} is over {MAX_DOWNLOAD_BYTES} bytes", "")
        if hashlib.sha256(data).hexdigest() != response.headers.get(SHA256_HEADER):
            raise StoreError(f"{key} arrived damaged from {self.url}", "sync again")
        return data

    def keys(self, prefix: str = "") -> list[str]:
        response = self._request("GET", "/v1/keys", params={"prefix": prefix})
        if response.status_code != 200:
            raise self._fail(response, "list keys")
        try:
            listed = response.json()
        except ValueError:
            listed = None
        if not isinstance(listed, list):
            raise StoreError(f"the relay {self.url} sent a malformed key list", "check the relay")
        # a relay is not trusted to name keys: anything outside the layout is dropped here
        return sorted(k for k in listed if isinstance(k, str) and is_store_key(k))

    def create(self, key: str, data: bytes, *, signer: DeviceKey | None = None) -> None:
        headers = {}
        if signer is not None:
            headers = {
                DEVICE_HEADER: key_owner(key) or "",
                SIGNATURE_HEADER: signer.sign(write_claim(key, data)),
            }
        response = self._request("PUT", f"/v1/blob/{key}", content=data, headers=headers)
        if response.status_code == 409:
            raise KeyExists(f"{key} already exists in the relay {self.url}")
        if response.status_code != 201:
            raise self._fail(response, f"store {key}")

    def close(self) -> None:
        self._client.close()
