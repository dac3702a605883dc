"""Fuzzing (hypothesis): whatever arrives, the parsers and the relay answer with their clear
rejection, never with a crash or a hang.

- the document parser and the adapter verifier, on random bytes and on mutations of a valid
  signed manifest and of a valid adapter blob (a registered peer may sign anything);
- the safetensors reader, on random and corrupted bytes;
- a real relay process, on random methods, paths, headers and bodies: never a 5xx, and it
  serves an honest request afterwards.
"""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest
from conftest import free_port, honest_adapter, publish, start_relay
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edgefed.errors import ModelFormatError
from edgefed.sync.manifest import Federation, parse_document
from edgefed.sync.signing import DeviceKey
from edgefed.sync.verify import Rejected, Verifier, decode_adapter

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
ALICE = DeviceKey.generate()


@pytest.fixture
def signed(federation):
    """A verifier of the test federation, and alice's valid manifest and blob for round 0."""
    verifier = Verifier(Federation.from_document(federation), {"alice": ALICE.public_key})
    manifest, blob = publish(federation, "alice", ALICE, honest_adapter(federation))
    verifier.check(0, "alice", manifest, blob)  # the unmutated pair passes
    return verifier, manifest, blob


def flip(data: bytes, positions: list[int], values: list[int]) -> bytes:
    mutated = bytearray(data)
    for position, value in zip(positions, values, strict=False):
        mutated[position % len(mutated)] = value
    return bytes(mutated)


@FUZZ
@given(st.binary(max_size=4096))
def test_the_document_parser_takes_any_bytes_with_one_error_kind(data):
    with contextlib.suppress(ModelFormatError):
        assert isinstance(parse_document(data, "the manifest"), dict)


@FUZZ
@given(st.binary(max_size=4096))
def test_the_adapter_reader_takes_any_bytes_with_one_error_kind(data):
    with contextlib.suppress(ModelFormatError):
        assert isinstance(decode_adapter(data), dict)


@FUZZ
@given(
    index=st.integers(min_value=0),
    new_field=st.text(max_size=12),
    value=JSON_VALUES,
    action=st.sampled_from(["drop", "change", "add"]),
)
def test_a_manifest_with_any_field_changed_is_rejected_never_crashes(
    signed, index, new_field, value, action
):
    verifier, manifest, blob = signed
    original = json.loads(manifest)
    document = dict(original)
    existing = sorted(document)[index % len(document)]
    if action == "drop":
        document.pop(existing)
    else:
        document[existing if action == "change" else new_field] = value
    assume(document != original)
    with pytest.raises(Rejected):
        verifier.check(0, "alice", json.dumps(document).encode(), blob)


@FUZZ
@given(
    positions=st.lists(st.integers(min_value=0), min_size=1, max_size=8),
    values=st.lists(st.integers(0, 255), min_size=1, max_size=8),
    cut=st.integers(min_value=0, max_value=64),
)
def test_a_corrupted_blob_signed_by_a_registered_peer_is_rejected_or_well_formed(
    federation,
    positions,
    values,
    cut,
):
    """A malicious but registered peer signs whatever blob it likes: the verifier is the only
    guard, so it must reject anything not exactly the federation's shapes, dtypes and values."""
    _, blob = publish(federation, "alice", ALICE, honest_adapter(federation))
    header_end = 8 + int.from_bytes(blob[:8], "little")
    # aim half of the flips at the JSON header, where the parser's decisions are
    aimed = [p % header_end if i % 2 else p for i, p in enumerate(positions)]
    mutated = flip(blob, aimed, values)[: len(blob) - cut]
    import hashlib

    manifest = json.loads(publish(federation, "alice", ALICE, honest_adapter(federation))[0])
    manifest.pop("signature")
    manifest |= {"sha256": hashlib.sha256(mutated).hexdigest(), "bytes": len(mutated)}
    manifest["signature"] = ALICE.sign(manifest)
    verifier = Verifier(Federation.from_document(federation), {"alice": ALICE.public_key})
    try:
        verified = verifier.check(0, "alice", json.dumps(manifest).encode(), mutated)
    except Rejected:
        return
    import torch

    for name, shape in verifier.expected.items():  # what passes is exactly well-formed
        assert tuple(verified.tensors[name].shape) == shape
        assert torch.isfinite(verified.tensors[name]).all()


METHODS = st.sampled_from(["GET", "PUT", "POST", "DELETE", "HEAD", "PATCH", "OPTIONS"])
PATHS = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), max_size=60),
    st.sampled_from(
        [
            "/v1/keys",
            "/v1/blob/",
            "/v1/blob/federation.json",
            "/v1/blob/rounds/0/alice.json",
            "/v1/blob/devices/alice.json",
            "/v1/blob/%2e%2e/%2e%2e/etc/passwd",
            "/v1/blob/rounds/0/../x",
        ]
    ),
)
HEADER_VALUES = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    method=METHODS,
    path=PATHS,
    auth=st.booleans(),
    headers=st.dictionaries(
        st.sampled_from(
            [
                "X-Edgefed-Device",
                "X-Edgefed-Signature",
                "Content-Type",
                "Content-Length",
                "Transfer-Encoding",
                "Range",
            ]
        ),
        HEADER_VALUES,
        max_size=3,
    ),
    body=st.binary(max_size=2048),
    query=st.dictionaries(st.sampled_from(["prefix", "x"]), HEADER_VALUES, max_size=2),
)
def test_the_relay_answers_any_request_without_a_server_error(
    fuzz_relay, method, path, auth, headers, body, query
):
    url, token = fuzz_relay
    if auth:
        headers = headers | {"Authorization": f"Bearer {token}"}
    target = path if path.startswith("/") else "/" + path
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            response = client.request(method, target, headers=headers, content=body, params=query)
    except (httpx.LocalProtocolError, httpx.InvalidURL, UnicodeEncodeError):
        return  # the client refused to send it: nothing reached the relay
    assert response.status_code < 500, (method, target, response.status_code, response.text)


@pytest.fixture(scope="module")
def fuzz_relay(tmp_path_factory):
    """One relay process for the whole fuzzing run; checked healthy at the end."""
    token, port = "fuzz-token-0123456789abcdef", free_port()
    process = start_relay(tmp_path_factory.mktemp("fuzz-relay") / "store", token, port,
                          max_bytes=4096)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    yield url, token
    alive = httpx.get(f"{url}/v1/keys", headers={"Authorization": f"Bearer {token}"})
    process.terminate()
    process.wait(timeout=30)
    assert alive.status_code == 200 and isinstance(alive.json(), list)
