"""The HTTP relay: stores and forwards a federation's blobs, and nothing more.

It never aggregates and never opens an adapter; it checks only names, sizes and who writes.
The routes, headers and status codes are the protocol of `edgefed.sync.wire`, which the client
(`edgefed.sync.relay_client`) shares without importing this module or Starlette.

Security model:
- Every request needs the federation's bearer token (401 otherwise).
- A key that belongs to a device (devices/<d>.json, rounds/<r>/<d>.*) may be written only with
  headers X-Edgefed-Device: <d> and X-Edgefed-Signature: an Ed25519 signature by d's key over
  {"key", "sha256" of the body} (403 otherwise). The key is the one registered in
  devices/<d>.json; a registration itself must be signed by the key it registers (proof of
  possession), and the first registration of a name wins. So a token holder can read
  everything but cannot publish in another device's name, and the relay, which holds no device
  key, cannot forge an adapter either: devices verify every manifest's signature themselves.
- What the relay can do: withhold or delay blobs, and see who publishes when. It cannot read
  anyone's text (it never leaves a device) and cannot alter an adapter undetected.
- Keys are checked against the strict layout after URL decoding: `..`, absolute paths and
  encoded forms are 400. Bodies over --max-bytes are 413, checked while streaming.
- TLS: pass --ssl-certfile/--ssl-keyfile (uvicorn terminates TLS), or run behind a reverse
  proxy that does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgefed.sync.folder import FolderStore
from edgefed.sync.layout import DEVICES_PREFIX, device_key, is_store_key, key_owner
from edgefed.sync.signing import signature_is_valid, write_claim
from edgefed.sync.store import KeyExists, KeyMissing
from edgefed.sync.wire import (
    BLOB_PATH_PREFIX,
    DEVICE_HEADER,
    ERROR_FIELD,
    KEYS_PATH,
    PREFIX_PARAM,
    SHA256_HEADER,
    SIGNATURE_HEADER,
)

DEFAULT_MAX_BYTES = 64 << 20


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({ERROR_FIELD: message}, status_code=status)


def create_app(root: str | os.PathLike[str], token: str, max_bytes: int = DEFAULT_MAX_BYTES):
    """The relay as an ASGI app over the folder `root` (a FolderStore)."""
    store = FolderStore(root)
    expected = f"Bearer {token}".encode()

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, expected)

    def registered_key(device: str) -> str | None:
        try:
            return json.loads(store.read(device_key(device)))["public_key"]
        except (KeyMissing, ValueError, KeyError, TypeError):
            return None  # not registered, or not a JSON object with a public_key: refuse

    async def keys(request: Request) -> Response:
        if not authorized(request):
            return _error(401, "missing or wrong bearer token")
        prefix = request.query_params.get(PREFIX_PARAM, "")
        if ".." in prefix or prefix.startswith("/") or "\\" in prefix:
            return _error(400, "bad prefix")
        return JSONResponse(store.keys(prefix))

    def refusal(request: Request) -> Response | None:
        """401 without the token, 400 for a key outside the layout, else None."""
        if not authorized(request):
            return _error(401, "missing or wrong bearer token")
        if not is_store_key(request.path_params["key"]):
            return _error(400, "not a federation store key")
        return None

    async def get_blob(request: Request) -> Response:
        if (refused := refusal(request)) is not None:
            return refused
        key = request.path_params["key"]
        try:
            data = store.read(key)
        except KeyMissing:
            return _error(404, "no such key")
        return Response(
            data,
            media_type="application/octet-stream",
            headers={SHA256_HEADER: hashlib.sha256(data).hexdigest()},
        )

    async def put_blob(request: Request) -> Response:
        if (refused := refusal(request)) is not None:
            return refused
        key = request.path_params["key"]
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            return _error(413, f"body over the {max_bytes} byte limit")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                return _error(413, f"body over the {max_bytes} byte limit")
            chunks.append(chunk)
        body = b"".join(chunks)
        owner = key_owner(key)
        if owner is not None:
            device = request.headers.get(DEVICE_HEADER)
            signature = request.headers.get(SIGNATURE_HEADER, "")
            if device != owner:
                return _error(403, f"only device '{owner}' may write {key}")
            if key.startswith(DEVICES_PREFIX):
                try:
                    public_key = json.loads(body)["public_key"]
                except (ValueError, KeyError, TypeError):
                    return _error(400, "a registration needs a public_key")
            else:
                public_key = registered_key(owner)
                if public_key is None:
                    return _error(403, f"device '{owner}' is not registered")
            if not signature_is_valid(public_key, write_claim(key, body), signature):
                return _error(403, f"the write is not signed by {owner}'s key")
        try:
            store.create(key, body)
        except KeyExists:
            return _error(409, f"{key} exists; nothing is ever overwritten")
        return Response(status_code=201)

    return Starlette(
        routes=[
            Route(KEYS_PATH, keys, methods=["GET"]),
            Route(BLOB_PATH_PREFIX + "{key:path}", get_blob, methods=["GET"]),
            Route(BLOB_PATH_PREFIX + "{key:path}", put_blob, methods=["PUT"]),
        ]
    )


def read_token(path: str | os.PathLike[str]) -> str:
    """The bearer token in the file at `path`; OSError when unreadable, ValueError when too
    short to be a secret (the CLI turns both into one InputFileError)."""
    token = Path(path).read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise ValueError("a relay token must be at least 16 characters")
    return token


def new_token() -> str:
    """A fresh random token: 24 bytes from the OS, URL-safe so that it fits in a header."""
    return base64.urlsafe_b64encode(os.urandom(24)).decode("ascii")
