"""The relay's wire protocol: routes, the query parameter and headers, shared by both sides.

The server (`edgefed.sync.relay`, Starlette) and the client (`edgefed.sync.relay_client`,
httpx) both take their names from here, so that they cannot drift apart, and so that a device
that only talks to a relay never imports the server's web framework.

    GET  /v1/keys?prefix=P   200: the layout keys under P (JSON list of strings)
    GET  /v1/blob/KEY        200: the blob, with header X-Content-SHA256 for the client to check;
                             404 when KEY is not there (yet)
    PUT  /v1/blob/KEY        201: KEY created; 409 when it exists: nothing is ever overwritten

Every request carries `Authorization: Bearer <federation token>` (401 without it). A PUT of a
key that belongs to a device (see `edgefed.sync.layout.key_owner`) also carries X-Edgefed-Device:
the owner's name, and X-Edgefed-Signature: the owner's Ed25519 signature over
`edgefed.sync.signing.write_claim(key, body)` (403 otherwise). KEY is a layout key, sent as is
(layout keys need no escaping); anything outside the layout is 400, a body over the relay's
limit 413. Refusals come back as a JSON object whose ERROR_FIELD says why.
"""

from __future__ import annotations

__all__ = [
    "BLOB_PATH_PREFIX",
    "DEVICE_HEADER",
    "ERROR_FIELD",
    "KEYS_PATH",
    "PREFIX_PARAM",
    "SHA256_HEADER",
    "SIGNATURE_HEADER",
    "blob_path",
]

KEYS_PATH = "/v1/keys"
BLOB_PATH_PREFIX = "/v1/blob/"
PREFIX_PARAM = "prefix"

DEVICE_HEADER = "X-Edgefed-Device"
SIGNATURE_HEADER = "X-Edgefed-Signature"
SHA256_HEADER = "X-Content-SHA256"

ERROR_FIELD = "error"


def blob_path(key: str) -> str:
    """The path of the blob at layout key `key`."""
    return f"{BLOB_PATH_PREFIX}{key}"
