"""A device's membership over time: its workspace and token, its data, leaving, repairing a
damaged publish, riding out a relay that goes away, and `edgefed run`. Real stores, real
relay processes, the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    assert_one_line_error,
    edgefed,
    free_port,
    no_wait_schedule,
    run,
    start_relay,
    write_repetitive_corpus,
)

from edgefed.device import RoundOptions, Workspace
from edgefed.device.round import estimate_round
from edgefed.train import TrainConfig

# the whole suite only: `make test-fast` leaves this module out (docs/developer/index.md)
pytestmark = pytest.mark.slow


def _config(workspace: Path) -> dict:
    return json.loads((workspace / "device.json").read_text())


def _join(store, device: str, workspace: Path, data: Path, base: Path, *extra) -> None:
    edgefed("join", store, "--device", device, "--data", data, "--workspace", workspace,
            "--base", base, *extra)  # fmt: skip


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_the_join_token_is_kept_private_and_the_default_workspace_is_the_only_one_known(
    tmp_path, tiny_llama_gguf, train_corpus, relay_server, monkeypatch
):
    url, token, _ = relay_server
    monkeypatch.delenv("EDGEFED_TOKEN", raising=False)
    token_file = tmp_path / "relay.token"
    token_file.write_text(token + "\n")
    created = edgefed("init", url, "--base", tiny_llama_gguf, "--wait", 0,
                      "--token-file", token_file)  # fmt: skip
    assert f"--data PATH --token-file {token_file}" in _flat(created.stdout)

    _join(url, "alice", tmp_path / "alice", train_corpus, tiny_llama_gguf,
          "--token-file", token_file)  # fmt: skip
    kept = tmp_path / "alice" / "token"
    assert kept.read_text() == token and stat.S_IMODE(kept.stat().st_mode) == 0o600
    # made outside $EDGEFED_HOME, yet the only workspace this machine knows: the default, and
    # it reaches the relay with the kept token
    assert json.loads(edgefed("status", "--json").stdout)["device"] == "alice"

    _join(url, "bob", tmp_path / "bob", train_corpus, tiny_llama_gguf,
          "--token-file", token_file, "--no-save-token")  # fmt: skip
    assert not (tmp_path / "bob" / "token").exists()
    assert_one_line_error(run("status"), "2 device workspaces", "--workspace")
    listed = json.loads(edgefed("device", "list", "--json").stdout)
    assert {(r["device"], r["workspace"]) for r in listed} == {
        ("alice", str(tmp_path / "alice")),
        ("bob", str(tmp_path / "bob")),
    }
    assert all(r["left"] is False for r in listed)  # a flag, as in `status --json`
    shown = edgefed("device", "list").stdout  # 80 columns here: no path is cut short
    assert str(tmp_path / "alice") in shown and str(train_corpus) in shown
    monkeypatch.setenv("EDGEFED_WORKSPACE", str(tmp_path / "bob"))
    assert_one_line_error(run("status"), "401")  # bob kept no token
    monkeypatch.setenv("EDGEFED_TOKEN", token)
    assert json.loads(edgefed("status", "--json").stdout)["device"] == "bob"


def test_join_checks_the_data_before_it_takes_the_name_and_device_set_repairs_a_workspace(
    tmp_path, tiny_llama_gguf, train_corpus
):
    store = tmp_path / "shared"
    assert_one_line_error(run("init", store, "--base", tiny_llama_gguf, "--wait", "inf"), "finite")
    assert not store.exists()
    edgefed("init", store, "--base", tiny_llama_gguf, "--wait", 0)
    few = write_repetitive_corpus(tmp_path / "few", n_docs=2)
    alice = tmp_path / "alice"
    for data, needle in ((tmp_path / "nowhere", "does not exist"), (few, "at least 3")):
        assert_one_line_error(
            run("join", store, "--device", "alice", "--data", data, "--workspace", alice,
                "--base", tiny_llama_gguf),
            needle,
        )  # fmt: skip
    assert not (store / "devices").exists() and not alice.exists()
    _join(store, "alice", alice, train_corpus, tiny_llama_gguf)  # the name is still free

    assert_one_line_error(run("device", "set", "--data", few, "--workspace", alice), "at least 3")
    assert _config(alice)["data"] == str(train_corpus.resolve())
    more = write_repetitive_corpus(tmp_path / "more", n_docs=12)
    edgefed("device", "set", "--data", more, "--workspace", alice)
    assert _config(alice)["data"] == str(more.resolve())

    # the shared folder moved: only a store holding this federation, with alice registered
    moved = tmp_path / "moved"
    shutil.copytree(store, moved)
    assert_one_line_error(
        run("device", "set", "--store", tmp_path / "elsewhere", "--workspace", alice),
        "holds no federation",
    )
    assert _config(alice)["store"] == str(store)
    edgefed("device", "set", "--store", moved, "--workspace", alice)
    assert _config(alice)["store"] == str(moved)
    assert_one_line_error(run("device", "set", "--workspace", alice), "nothing to set")

    # a workspace whose data went away says how to repair it, before any work
    shutil.rmtree(more)
    assert_one_line_error(run("round", "--workspace", alice), "does not exist", "device set")
    assert not (alice / "rounds").exists()


def test_a_device_that_leaves_is_no_longer_waited_for_and_only_its_own_notice_counts(
    tmp_path, tiny_llama_gguf, train_corpus, adapters
):
    from edgefed.sync.layout import departure_key
    from edgefed.sync.manifest import departure, encode_document
    from edgefed.sync.signing import DeviceKey

    store = tmp_path / "shared"
    edgefed("init", store, "--base", tiny_llama_gguf, "--wait", 120)
    spaces = {d: tmp_path / d for d in ("alice", "bob", "carol")}
    for device, workspace in spaces.items():
        _join(store, device, workspace, train_corpus, tiny_llama_gguf)
    edgefed("sync", "--round", 0, "--adapter", adapters["alice", 0],
            "--workspace", spaces["alice"], "--wait", 0)  # fmt: skip
    # leaving is permanent: with nobody at a terminal to confirm it, only --yes leaves
    unconfirmed = edgefed("leave", "--workspace", spaces["bob"], check=False)
    assert unconfirmed.returncode == 2 and "pass --yes" in unconfirmed.stderr
    assert not (store / "departures").exists()
    assert "left" in edgefed("leave", "--workspace", spaces["bob"], "--yes").stdout
    # alice cannot make her peers stop waiting for carol: a notice not signed by carol is ignored
    fed = json.loads((store / "federation.json").read_text())["id"]
    forged = departure(fed, "carol", None, DeviceKey.load(spaces["alice"] / "device.key"))
    (store / departure_key("carol")).write_bytes(encode_document(forged))

    waited = json.loads(edgefed("sync", "--round", 0, "--workspace", spaces["alice"],
                                "--wait", 3, "--json").stdout)  # fmt: skip
    assert waited["departed"] == ["bob"] and waited["missing"] == ["carol"]
    assert waited["waited_seconds"] >= 3

    edgefed("sync", "--round", 0, "--adapter", adapters["carol", 0],
            "--workspace", spaces["carol"], "--wait", 0)  # fmt: skip
    done = json.loads(
        edgefed("sync", "--round", 0, "--workspace", spaces["alice"], "--json").stdout
    )  # the federation's 120 s wait ends as soon as every peer still taking part is here
    assert done["missing"] == [] and done["verified_peers"] == ["carol"]
    assert done["waited_seconds"] < 120  # it did not sit out the federation's wait

    # nor can anyone pass carol's signed adapter manifest off as her departure
    shutil.copy(store / "rounds" / "0" / "carol.json", store / departure_key("carol"))
    status = json.loads(edgefed("status", "--workspace", spaces["alice"], "--json").stdout)
    assert status["devices"]["bob"]["left"] and not status["devices"]["carol"]["left"]
    assert_one_line_error(run("round", "--workspace", spaces["bob"]), "left the federation")
    assert "already left" in edgefed("leave", "--workspace", spaces["bob"]).stdout
    # bob's own status says he left, not which round he would run next
    assert (
        json.loads(edgefed("status", "--workspace", spaces["bob"], "--json").stdout)["next_round"]
        is None
    )
    assert (
        "this device: bob, left the federation"
        in edgefed("status", "--workspace", spaces["bob"]).stdout
    )


@pytest.mark.parametrize("kind", ["folder", "relay"])
def test_a_damaged_publish_is_reported_and_replaced_by_a_signed_version_peers_accept(
    kind, tmp_path, tiny_llama_gguf, train_corpus, adapters, relay_server, monkeypatch
):
    from safetensors.torch import load_file

    from edgefed.adapter import read_adapter_folder

    if kind == "folder":
        store = files = tmp_path / "shared"
    else:
        store, token, files = relay_server
        monkeypatch.setenv("EDGEFED_TOKEN", token)
    edgefed("init", store, "--base", tiny_llama_gguf, "--wait", 0)
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    _join(store, "alice", alice, train_corpus, tiny_llama_gguf)
    _join(store, "bob", bob, train_corpus, tiny_llama_gguf)
    edgefed("sync", "--round", 0, "--adapter", adapters["alice", 0], "--workspace", alice)
    blob = files / "rounds" / "0" / "alice.safetensors"
    damaged = bytearray(blob.read_bytes())
    damaged[-8] ^= 0xFF  # bit rot, or a sync tool that truncated and re-grew the file
    blob.chmod(0o644)
    blob.write_bytes(bytes(damaged))

    reported = edgefed("status", "--workspace", alice)
    assert "edgefed repair --round 0" in _flat(reported.stderr)
    status = json.loads(edgefed("status", "--workspace", alice, "--json").stdout)
    assert "sha256 differs" in status["damaged_publishes"]["0"]
    pulled = json.loads(edgefed("sync", "--round", 0, "--workspace", bob, "--json").stdout)
    assert pulled["verified_peers"] == [] and "sha256" in pulled["rejected"][0]["reason"]

    # published by hand, so the workspace holds no training of round 0 to publish again
    assert_one_line_error(run("repair", "--workspace", alice), "--adapter")
    assert_one_line_error(
        run("repair", "--workspace", alice, "--adapter", adapters["alice", 0]), "--round R"
    )
    repaired = json.loads(edgefed("repair", "--workspace", alice, "--round", 0, "--adapter",
                                  adapters["alice", 0], "--json").stdout)  # fmt: skip
    assert repaired["repaired"]["0"]["version"] == 2
    assert blob.read_bytes() == bytes(damaged)  # never overwritten
    assert (files / "rounds" / "0" / "alice.v2.safetensors").is_file()
    status = json.loads(edgefed("status", "--workspace", alice, "--json").stdout)
    assert status["damaged_publishes"] == {}
    assert "nothing to repair" in edgefed("repair", "--workspace", alice).stdout

    pulled = json.loads(edgefed("sync", "--round", 0, "--workspace", bob, "--json").stdout)
    assert pulled["verified_peers"] == ["alice"]
    _, sent, _ = read_adapter_folder(adapters["alice", 0])
    received = load_file(bob / "rounds" / "0" / "peers" / "alice.safetensors")
    for name, tensor in sent.items():
        assert (received[name].float() - tensor.half().float()).abs().max() == 0, name


def test_a_damaged_replacement_falls_back_to_the_version_before_it(
    tmp_path, tiny_llama_gguf, train_corpus, adapters
):
    from edgefed.adapter import read_adapter_folder
    from edgefed.device.federation import init_federation, join_federation
    from edgefed.device.publish import _publish, publish_adapter
    from edgefed.device.pull import pull_round
    from edgefed.sync.folder import FolderStore
    from edgefed.sync.manifest import ENCODING_FP16

    store = FolderStore(tmp_path / "shared")
    init_federation(store, base=tiny_llama_gguf, schedule=no_wait_schedule())
    alice, bob = (join_federation(store, d, data=train_corpus, workspace=tmp_path / d,
                                  base=tiny_llama_gguf) for d in ("alice", "bob"))  # fmt: skip
    publish_adapter(store, alice, 0, adapters["alice", 0])
    other = read_adapter_folder(adapters["bob", 0])[1]
    assert _publish(store, alice, 0, other, 0, {}, ENCODING_FP16, version=2)
    v2 = tmp_path / "shared" / "rounds" / "0" / "alice.v2.safetensors"
    v2.chmod(0o644)
    v2.write_bytes(v2.read_bytes()[:-4] + b"\0\0\0\0")
    report = pull_round(store, bob, 0)
    assert report.peer_rounds == {"alice": 0}
    assert [r["reason"].split(":")[0] for r in report.rejected] == ["version 2"]
    assert json.loads(bob.peer_manifest_path(0, "alice").read_text()).get("version", 1) == 1


def test_a_round_waiting_for_a_peer_rides_out_a_relay_outage(
    tmp_path, tiny_llama_gguf, train_corpus
):
    """The relay goes away for 30 s (longer than the client's own retries) while alice waits
    for bob; it comes back, bob publishes, and alice's round finishes mixing him."""
    token, port = "outage-token-0123456789", free_port()
    root, url = tmp_path / "relay-root", f"http://127.0.0.1:{port}"
    relay = start_relay(root, token, port)
    env = dict(os.environ, EDGEFED_TOKEN=token)
    try:
        edgefed("init", url, "--base", tiny_llama_gguf, "--warmup-steps", 2, "--wait", 240,
                "--token-file", root.parent / f"{root.name}.token")  # fmt: skip
        spaces = {d: tmp_path / d for d in ("alice", "bob")}
        for device, workspace in spaces.items():
            _join(url, device, workspace, train_corpus, tiny_llama_gguf,
                  "--token-file", root.parent / f"{root.name}.token")  # fmt: skip
        alice = subprocess.Popen(
            [sys.executable, "-m", "edgefed", "round", "--workspace", str(spaces["alice"]),
             "--seq-len", "32", "--batch-size", "2", "--test-tokens", "256", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        said: list[str] = []  # alice's stderr, line by line (not a terminal: plain lines)
        reader = threading.Thread(target=_collect, args=(alice.stderr, said), daemon=True)
        reader.start()

        def wait_for(text: str, seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while not any(text in line for line in said):
                assert alice.poll() is None and time.monotonic() < deadline, "".join(said)
                time.sleep(0.2)

        wait_for("waiting for bob", 300)  # alice published and polls for bob now
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=30)
        # the client's own retries are spent and the round still waits, riding the outage out
        wait_for("the store does not answer", 120)
        assert alice.poll() is None
        relay = start_relay(root, token, port)
        done = subprocess.run(
            [sys.executable, "-m", "edgefed", "round", "--workspace", str(spaces["bob"]),
             "--seq-len", "32", "--batch-size", "2", "--test-tokens", "256", "--wait", "0",
             "--json"],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        alice.wait(timeout=300)
        reader.join(timeout=30)
        assert alice.returncode == 0, "".join(said)
        report = json.loads(alice.stdout.read())
        assert report["record"]["steps"]["pull"]["peer_rounds"] == {"bob": 0}
        assert report["record"]["steps"]["pull"]["missing"] == []
    finally:
        relay.terminate()
        relay.wait(timeout=30)


def test_run_does_round_after_round_with_a_line_each_and_resumes_after_a_crash(
    tmp_path, tiny_llama_gguf, train_corpus
):
    store, alice = tmp_path / "shared", tmp_path / "alice"
    edgefed("init", store, "--base", tiny_llama_gguf, "--warmup-steps", 2, "--round-steps", 1,
            "--wait", 0)  # fmt: skip
    _join(store, "alice", alice, train_corpus, tiny_llama_gguf)
    command = [sys.executable, "-m", "edgefed", "run", "--workspace", str(alice), "--seq-len",
               "32", "--batch-size", "2", "--test-tokens", "256"]  # fmt: skip
    crashed = subprocess.run([*command, "--rounds", "2"], capture_output=True, text=True,
                             env=dict(os.environ, EDGEFED_CRASH_AT="round-aggregate"))  # fmt: skip
    assert crashed.returncode != 0 and not (alice / "rounds" / "0" / "round.json").read_text(
    ).count("aggregate")  # fmt: skip

    resumed = subprocess.run([*command, "--rounds", "1", "--json"], capture_output=True,
                             text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    [report] = json.loads(resumed.stdout)
    assert report["round"] == 0 and report["ran"] == ["evaluate"]  # nothing trained twice
    assert report["skipped"] == ["train", "publish", "pull", "aggregate"]

    done = subprocess.run([*command, "--rounds", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("round ")]
    assert [line.split(":")[0] for line in lines] == ["round 1", "round 2"]
    assert all("test perplexity" in line and "mixed no peer" in line for line in lines), lines
    assert "round 1: about" in _flat(done.stderr)  # an estimate from round 0's speeds
    workspace = Workspace.open(alice)
    measured_at = RoundOptions(train=TrainConfig(seq_len=32, batch_size=2))
    estimate = estimate_round(workspace, 3, measured_at)
    assert estimate is not None and estimate.train_steps == 1
    assert "1 training step at" in estimate.describe()
    # a speed measured on 32-token blocks says nothing of 256-token ones: no estimate at all
    assert estimate_round(workspace, 3, RoundOptions()) is None
    for number in (1, 2):
        record = json.loads((alice / "rounds" / str(number) / "round.json").read_text())
        assert "evaluate" in record["steps"]


def _collect(stream, lines: list[str]) -> None:
    """Read a process's text stream line by line into `lines` until it ends."""
    for line in iter(stream.readline, ""):
        lines.append(line)
