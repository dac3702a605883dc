"""Uploads cut half-way and a relay killed mid-write: nothing partial is ever visible, and the
clients' retries finish the work. Real relay and S3 processes; the cuts are real sockets closed
half-way through a body, which is what the server sees when a device is killed mid-upload."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
from conftest import free_port, start_relay

from edgefed.faults import CRASH_ENV
from edgefed.sync.relay_client import RelayStore

BODY = os.urandom(300_000)


def raw_put(host: str, port: int, path: str, headers: dict[str, str], *, cut: bool) -> bytes:
    """Send a PUT by hand; with `cut` its body stops half-way and the connection drops (a
    killed client), else the whole body goes and the status line comes back."""
    head = [f"PUT {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(BODY)}",
            "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    with socket.create_connection((host, port)) as connection:
        body = BODY[: len(BODY) // 2] if cut else BODY
        connection.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        if cut:
            time.sleep(0.2)
            return b""
        return connection.makefile("rb").readline()


@pytest.mark.parametrize("store_url", ["relay", "s3"], indirect=True)
def test_an_upload_cut_half_way_leaves_nothing_and_the_retry_completes(request, store_url, store):
    if store_url.startswith("http"):
        url, token, _ = request.getfixturevalue("relay_server")  # the one store_url started
        server, prefix = urlsplit(url), "/v1/blob/"
        headers = {"Authorization": f"Bearer {token}"}
    else:
        url = store_url
        server, prefix = urlsplit(url.split("endpoint=")[1]), f"/{urlsplit(url).netloc}/federation/"
        headers = {}
    # the control: the same request with its whole body is stored, so the cut one is not
    # refused for some other reason
    status = raw_put(server.hostname, server.port, prefix + "reference.txt", headers, cut=False)
    assert status.split()[1] in (b"200", b"201"), status
    raw_put(server.hostname, server.port, prefix + "federation.json", headers, cut=True)
    assert store.keys() == ["reference.txt"]  # the half body was never stored
    store.create("federation.json", BODY)
    assert hashlib.sha256(store.read("federation.json")).digest() == hashlib.sha256(BODY).digest()


def test_a_relay_killed_mid_write_restarts_and_the_client_retry_completes(tmp_path, monkeypatch):
    # the client's backoff must outlast a relay restart on a busy machine: 8 tries span 64 s
    monkeypatch.setattr("edgefed.sync.relay_client.RETRIES", 8)
    token, port = "restart-token-0123456789", free_port()
    root = tmp_path / "relay-root"
    dying = start_relay(root, token, port, env=dict(os.environ, **{CRASH_ENV: "store-write"}))
    outcome: dict = {}

    def upload() -> None:
        try:
            with RelayStore(f"http://127.0.0.1:{port}", token=token) as store:
                store.create("federation.json", BODY)
                outcome["read"] = store.read("federation.json")
        except Exception as exc:
            outcome["error"] = exc

    client = threading.Thread(target=upload)
    client.start()
    assert dying.wait(timeout=60) == -signal.SIGKILL  # it died writing the blob
    assert [p.name for p in root.glob(".*.tmp")]  # the write it was killed in is a hidden temp
    restarted = start_relay(root, token, port)  # the client is backing off meanwhile
    try:
        client.join(timeout=60)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["read"] == BODY
        with RelayStore(f"http://127.0.0.1:{port}", token=token) as store:
            assert store.keys() == ["federation.json"]  # the temp file is never listed
    finally:
        restarted.terminate()
        restarted.wait(timeout=30)
