"""The relay as a real uvicorn process: auth, per-device write rights, limits, traversal."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import pytest
from conftest import free_port

from edgefed.errors import StoreError
from edgefed.sync.layout import adapter_key, device_key
from edgefed.sync.manifest import encode_document, registration
from edgefed.sync.relay_client import RelayStore
from edgefed.sync.signing import DeviceKey, write_claim
from edgefed.sync.wire import DEVICE_HEADER, SIGNATURE_HEADER


def raw(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One request sent as is (no client-side path normalisation): (status, body)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_relay_enforces_token_device_rights_size_and_layout_and_keeps_serving(relay_server):
    url, token, root = relay_server
    auth = {"Authorization": f"Bearer {token}"}
    alice, bob = DeviceKey.generate(), DeviceKey.generate()
    with RelayStore(url, token=token) as store:
        store.create(
            device_key("alice"), encode_document(registration("alice", alice)), signer=alice
        )
        store.create(device_key("bob"), encode_document(registration("bob", bob)), signer=bob)

    assert raw(url, "GET", "/v1/keys")[0] == 401
    assert raw(url, "GET", "/v1/keys", headers={"Authorization": "Bearer wrong"})[0] == 401
    with pytest.raises(StoreError, match=r"refused to list keys \(401.*token"):
        RelayStore(url, token="wrong").keys()

    # bob writing alice's adapter: in his own name, or in hers with his signature
    key, body = adapter_key(0, "alice"), b"adapter bytes"
    as_bob = {DEVICE_HEADER: "bob", SIGNATURE_HEADER: bob.sign(write_claim(key, body))}
    assert raw(url, "PUT", f"/v1/blob/{key}", body, auth | as_bob)[0] == 403
    forged = {DEVICE_HEADER: "alice", SIGNATURE_HEADER: bob.sign(write_claim(key, body))}
    assert raw(url, "PUT", f"/v1/blob/{key}", body, auth | forged)[0] == 403
    assert raw(url, "PUT", f"/v1/blob/{key}", body, auth)[0] == 403  # unsigned
    # a registration must be signed by the key it registers
    mallory = DeviceKey.generate()
    doc = encode_document(registration("eve", alice))
    claim = {
        DEVICE_HEADER: "eve",
        SIGNATURE_HEADER: mallory.sign(write_claim(device_key("eve"), doc)),
    }
    assert raw(url, "PUT", f"/v1/blob/{device_key('eve')}", doc, auth | claim)[0] == 403

    big = b"x" * ((1 << 20) + 1)
    signed_big = {DEVICE_HEADER: "alice", SIGNATURE_HEADER: alice.sign(write_claim(key, big))}
    assert raw(url, "PUT", f"/v1/blob/{key}", big, auth | signed_big)[0] == 413

    for path in (
        "/v1/blob/../../etc/passwd",
        "/v1/blob/..%2F..%2Fetc%2Fpasswd",
        "/v1/blob/%2Fetc%2Fpasswd",
        "/v1/blob/rounds/0/..%2F..%2Fdevices/alice.json",
        "/v1/blob/%2e%2e/%2e%2e/etc/passwd",
        "/v1/blob/rounds/0/alice.json%00.safetensors",
    ):
        status, _ = raw(url, "GET", path, headers=auth)
        assert status in (400, 404) and status != 200, path
        assert raw(url, "PUT", path, b"x", auth)[0] in (400, 404, 405), path
    assert raw(url, "GET", "/v1/keys?prefix=../", headers=auth)[0] == 400
    assert not list(root.parent.glob("etc*"))

    # after all of that, the relay still serves, and alice can publish her own adapter
    signed = {DEVICE_HEADER: "alice", SIGNATURE_HEADER: alice.sign(write_claim(key, body))}
    assert raw(url, "PUT", f"/v1/blob/{key}", body, auth | signed)[0] == 201
    assert raw(url, "PUT", f"/v1/blob/{key}", body, auth | signed)[0] == 409
    with RelayStore(url, token=token) as store:
        assert store.read(key) == body
        assert store.keys("rounds/") == [key]


def test_the_client_says_clearly_when_no_relay_answers(monkeypatch):
    from conftest import free_port

    import edgefed.sync.relay_client as client

    monkeypatch.setattr(client, "FIRST_BACKOFF_SECONDS", 0.01)
    store = RelayStore(f"http://127.0.0.1:{free_port()}", token="t" * 20)
    with pytest.raises(StoreError, match=r"cannot reach the relay.*running and reachable"):
        store.keys()


def test_downloads_over_the_limit_are_refused_and_those_under_it_read_back_exactly(
    relay_server, monkeypatch
):
    url, token, root = relay_server
    monkeypatch.setattr("edgefed.sync.relay_client.MAX_DOWNLOAD_BYTES", 4096)
    small, big = os.urandom(4096), os.urandom(4097)
    # the relay serves a FolderStore over its root: blobs placed there are what it sends
    (root / "rounds" / "0").mkdir(parents=True)
    (root / adapter_key(0, "alice")).write_bytes(small)
    (root / adapter_key(0, "bob")).write_bytes(big)
    with RelayStore(url, token=token) as store:
        assert store.read(adapter_key(0, "alice")) == small
        with pytest.raises(StoreError, match=r"rounds/0/bob\.safetensors.* 4096 byte") as refused:
            store.read(adapter_key(0, "bob"))
        assert refused.value.fix
        assert store.read(adapter_key(0, "alice")) == small  # the client still works after


def test_a_download_without_a_length_stops_at_the_limit_instead_of_reading_it_all(monkeypatch):
    """A server that streams without end (chunked, no Content-Length) is cut off at the limit:
    the client closes the connection, so the server cannot send all it meant to."""
    monkeypatch.setattr("edgefed.sync.relay_client.MAX_DOWNLOAD_BYTES", 100_000)
    chunk, chunks_meant = b"x" * 65536, 4096  # 256 MiB, far more than any socket buffers
    sent = {"chunks": 0, "cut_off": False}
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            try:
                connection.sendall(head)
                for _ in range(chunks_meant):
                    connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent["chunks"] += 1
                connection.sendall(b"0\r\n\r\n")
            except OSError:  # the client hung up: what this test wants
                sent["cut_off"] = True

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        store = RelayStore(f"http://127.0.0.1:{server.getsockname()[1]}", token="t" * 20)
        with store, pytest.raises(StoreError, match=r"100000 byte download limit"):
            store.read(adapter_key(0, "alice"))
        thread.join(timeout=60)
    finally:
        server.close()
    assert sent["cut_off"] and sent["chunks"] < chunks_meant


def test_a_busy_port_gets_one_line_and_leaves_no_root_behind(tmp_path):
    """Another server on the port: exit 2 and one line, before the root is made (uvicorn on
    its own logged its error, exited 3 and left an empty root folder)."""
    import subprocess
    import sys

    token_file = tmp_path / "token"
    token_file.write_text("t" * 32 + "\n")
    root = tmp_path / "relay-root"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "edgefed", "relay", "serve", "--root", str(root),
             "--token-file", str(token_file), "--port", str(port)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip()
    assert message.startswith("error:") and "\n" not in message, message
    assert f"port {port} on 127.0.0.1 is in use" in message and "--port" in message, message
    assert not root.exists()


def test_a_relay_on_every_address_without_tls_says_what_crosses_the_network(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("test-token-0123456789abcdef\n")
    command = [sys.executable, "-m", "edgefed", "relay", "serve", "--root", str(tmp_path / "r"),
               "--token-file", str(token_file), "--port", str(free_port())]  # fmt: skip
    said = {}
    for host in ("127.0.0.1", "0.0.0.0"):
        process = subprocess.Popen([*command, "--host", host], stderr=subprocess.PIPE, text=True)
        lines = []
        try:  # stderr up to the line that says it serves (readline: "" once the process ends)
            while not lines or "relay serving" not in lines[-1]:
                line = process.stderr.readline()
                if not line:
                    break
                lines.append(line)
        finally:
            process.terminate()
            process.wait(timeout=30)
        said[host] = "".join(lines)
    assert "relay serving" in said["0.0.0.0"]
    assert (
        "warning: plain HTTP on 0.0.0.0" in said["0.0.0.0"] and "--ssl-certfile" in said["0.0.0.0"]
    )
    assert "relay serving" in said["127.0.0.1"] and "warning" not in said["127.0.0.1"]
