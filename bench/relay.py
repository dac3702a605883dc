"""Relay load benchmark: many concurrent devices pushing and pulling adapters through one relay.

Starts a real relay (`edgefed relay serve`, uvicorn) on 127.0.0.1 and registers --devices
devices. Phase 1: every device publishes --rounds signed adapter-sized blobs, --concurrency at a
time, through the real client (`RelayStore`: signatures, retries). Phase 2: every device pulls
--peers of the others' blobs (the client checks each sha256). Phase 3, the reference: the same
GETs of the same files from a plain static file server (`python -m http.server`) on the relay's
folder. Then every stored object is read back and compared with what was sent: lost or
corrupted objects are counted (the target is zero). Prints requests/s, p50 and p99 latency and
MB/s per phase, side by side.

    python bench/relay.py [--devices 32] [--rounds 2] [--peers 8] [--concurrency 16] [--mb 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from edgefed.sync.layout import adapter_key, device_key
from edgefed.sync.manifest import encode_document, registration
from edgefed.sync.relay_client import RelayStore
from edgefed.sync.signing import DeviceKey


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, headers: dict, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url, headers=headers)
            return
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server at {url} did not start") from None
            time.sleep(0.1)


def timed(calls, concurrency: int) -> tuple[list[float], float]:
    """Run the calls `concurrency` at a time; each call's latency and the wall time."""

    def one(call) -> float:
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, calls))
    return latencies, time.perf_counter() - started


def figures(name: str, latencies: list[float], wall: float, nbytes: int) -> dict:
    ordered = sorted(latencies)
    return {
        "phase": name,
        "requests": len(ordered),
        "requests_per_s": len(ordered) / wall,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "mb_per_s": nbytes / wall / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--peers", type=int, default=8, help="blobs each device pulls")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--mb", type=float, default=5.0, help="blob size (an adapter: 4.94 MB)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    size = int(args.mb * 1e6)
    token = "bench-relay-token-0123456789"

    with tempfile.TemporaryDirectory(prefix="edgefed-bench-relay-") as scratch:
        root = Path(scratch) / "relay"
        (Path(scratch) / "token").write_text(token)
        port, static_port = free_port(), free_port()
        relay = subprocess.Popen(
            [sys.executable, "-m", "edgefed", "relay", "serve", "--root", str(root),
             "--token-file", str(Path(scratch) / "token"), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {token}"}
        wait_until_up(f"{url}/v1/keys", auth, relay)
        root.mkdir(exist_ok=True)
        static = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(static_port), "--bind", "127.0.0.1",
             "--directory", str(root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        static_url = f"http://127.0.0.1:{static_port}"
        wait_until_up(static_url, {}, static)
        try:
            devices = [f"device-{i:03d}" for i in range(args.devices)]
            keys = {d: DeviceKey.generate() for d in devices}
            sent: dict[str, bytes] = {}
            with RelayStore(url, token=token) as setup:
                for d in devices:
                    setup.create(device_key(d), encode_document(registration(d, keys[d])),
                                 signer=keys[d])  # fmt: skip
            clients = [RelayStore(url, token=token) for _ in range(args.concurrency)]

            def put(index: int, d: str, r: int):
                blob = os.urandom(size)
                sent[adapter_key(r, d)] = blob
                return lambda: clients[index % len(clients)].create(
                    adapter_key(r, d), blob, signer=keys[d]
                )

            puts = [put(i, d, r) for i, (d, r) in
                    enumerate((d, r) for r in range(args.rounds) for d in devices)]  # fmt: skip
            put_latencies, put_wall = timed(puts, args.concurrency)

            pulls = [(i, adapter_key(0, devices[(i + j + 1) % len(devices)]))
                     for i in range(len(devices)) for j in range(args.peers)]  # fmt: skip
            get_latencies, get_wall = timed(
                [lambda i=i, k=k: clients[i % len(clients)].read(k) for i, k in pulls],
                args.concurrency,
            )
            static_clients = [httpx.Client(base_url=static_url) for _ in range(args.concurrency)]

            def static_get(i: int, k: str) -> None:
                response = static_clients[i % len(static_clients)].get(f"/{k}")
                assert response.status_code == 200 and len(response.content) == size

            static_latencies, static_wall = timed(
                [lambda i=i, k=k: static_get(i, k) for i, k in pulls], args.concurrency
            )
            with RelayStore(url, token=token) as check:
                stored = set(check.keys("rounds/"))
                lost = sum(k not in stored for k in sent)
                corrupted = sum(
                    hashlib.sha256(check.read(k)).digest() != hashlib.sha256(b).digest()
                    for k, b in sent.items()
                    if k in stored
                )
            for client in clients:
                client.close()
            for client in static_clients:
                client.close()
        finally:
            relay.terminate()
            static.terminate()
            relay.wait(timeout=30)
            static.wait(timeout=30)

    rows = [
        figures("relay PUT (signed)", put_latencies, put_wall, size * len(puts)),
        figures("relay GET (sha256 checked)", get_latencies, get_wall, size * len(pulls)),
        figures("static GET (http.server)", static_latencies, static_wall, size * len(pulls)),
    ]
    print(f"{args.devices} devices, {args.concurrency} concurrent clients, "
          f"{args.mb:g} MB blobs, 127.0.0.1")  # fmt: skip
    print("| phase | requests | req/s | p50 ms | p99 ms | MB/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['requests']} | {r['requests_per_s']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mb_per_s']:.1f} |")  # fmt: skip
    ratio = rows[1]["mb_per_s"] / rows[2]["mb_per_s"]
    print(f"relay GET throughput = {ratio:.2f}x the static server's; "
          f"objects lost: {lost}, corrupted: {corrupted} (of {len(sent)})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "lost": lost, "corrupted": corrupted,
                                         "ratio": ratio, "args": vars(args) | {"json": None}},
                                        indent=1) + "\n")  # fmt: skip
    if lost or corrupted:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
