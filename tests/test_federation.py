"""Devices in a federation, as real processes over a real shared folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DEVICES, assert_one_line_error, edgefed, no_wait_schedule, run
from safetensors.torch import load_file

from edgefed.errors import AdapterMismatchError, StoreError

# the whole suite only: `make test-fast` leaves this module out (docs/developer/index.md)
pytestmark = pytest.mark.slow


def start(*args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgefed", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ,
    )


def finish(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return json.loads(stdout)


def test_three_device_processes_exchange_verified_adapters_through_a_store(
    store_url, tmp_path, tiny_llama_gguf, train_corpus, adapters
):
    store, spaces = store_url, {d: tmp_path / "ws" / d for d in DEVICES}
    edgefed("init", store, "--base", tiny_llama_gguf, "--id", "fed-folder", "--wait", 0)
    for device in ("alice", "bob"):  # carol joins late
        edgefed("join", store, "--device", device, "--data", train_corpus,
                "--workspace", spaces[device], "--base", tiny_llama_gguf)  # fmt: skip

    # round 0: alice and bob publish at the same time and wait for each other
    running = [
        start(
            "sync",
            "--round",
            0,
            "--adapter",
            adapters[d, 0],
            "--workspace",
            spaces[d],
            "--min-peers",
            1,
            "--wait",
            120,
            "--json",
        )
        for d in ("alice", "bob")
    ]
    reports = [finish(p) for p in running]
    assert [r["verified_peers"] for r in reports] == [["bob"], ["alice"]]
    assert all(r["published"] and not r["rejected"] for r in reports)

    # carol joins late and catches up on round 0 without publishing anything for it
    edgefed("join", store, "--device", "carol", "--data", train_corpus,
            "--workspace", spaces["carol"], "--base", tiny_llama_gguf)  # fmt: skip
    late = json.loads(
        edgefed("sync", "--round", 0, "--workspace", spaces["carol"], "--json").stdout
    )
    assert late["verified_peers"] == ["alice", "bob"] and not late["published"]

    # round 1: all three publish concurrently, each ends with both peers' adapters
    running = [
        start(
            "sync",
            "--round",
            1,
            "--adapter",
            adapters[d, 1],
            "--workspace",
            spaces[d],
            "--min-peers",
            2,
            "--wait",
            120,
            "--json",
        )
        for d in DEVICES
    ]
    for device, report in zip(DEVICES, (finish(p) for p in running), strict=True):
        assert report["verified_peers"] == [d for d in DEVICES if d != device], report
    for device in DEVICES:
        for peer in (d for d in DEVICES if d != device):
            pulled = load_file(spaces[device] / "rounds" / "1" / "peers" / f"{peer}.safetensors")
            sent = load_file(adapters[peer, 1] / "adapter_model.safetensors")
            assert pulled.keys() == sent.keys()
            for name in sent:
                assert torch.allclose(pulled[name].float(), sent[name], atol=1e-3), name

    status = json.loads(edgefed("status", "--workspace", spaces["carol"], "--json").stdout)
    assert status["current_round"] == 1
    assert status["devices"] == {d: {"latest_round": 1, "left": False} for d in DEVICES}
    assert status["damaged_publishes"] == {}


def test_a_missing_device_does_not_block_the_round(
    tmp_path, tiny_llama_gguf, train_corpus, adapters
):
    store = tmp_path / "shared"
    edgefed("init", store, "--base", tiny_llama_gguf, "--wait", 0)
    for device in DEVICES:
        edgefed("join", store, "--device", device, "--data", train_corpus,
                "--workspace", tmp_path / device, "--base", tiny_llama_gguf)  # fmt: skip
    edgefed(
        "sync", "--round", 0, "--adapter", adapters["alice", 0], "--workspace", tmp_path / "alice"
    )
    done = edgefed("sync", "--round", 0, "--adapter", adapters["bob", 0],
                   "--workspace", tmp_path / "bob", "--min-peers", 2, "--wait", 2)  # fmt: skip
    assert "1 peer adapter verified: alice" in done.stdout
    assert "went on without carol" in " ".join(done.stderr.split())


def test_join_refuses_another_base_and_a_taken_name(
    tmp_path, tiny_llama, tiny_llama_gguf, train_corpus
):
    from edgefed.device.federation import init_federation, join_federation
    from edgefed.quant.hf_convert import convert_hf_to_gguf
    from edgefed.sync.folder import FolderStore

    store = FolderStore(tmp_path / "shared")
    init_federation(store, base=tiny_llama_gguf, schedule=no_wait_schedule())
    other_base = convert_hf_to_gguf(tiny_llama, tmp_path / "other.f32.gguf", out_type="f32")
    with pytest.raises(AdapterMismatchError, match="is not the federation's"):
        join_federation(
            store, "alice", data=train_corpus, workspace=tmp_path / "a", base=other_base
        )
    join_federation(
        store, "alice", data=train_corpus, workspace=tmp_path / "a", base=tiny_llama_gguf
    )
    with pytest.raises(StoreError, match="already registered"):
        join_federation(
            store, "alice", data=train_corpus, workspace=tmp_path / "b", base=tiny_llama_gguf
        )
    with pytest.raises(StoreError, match="already holds a federation"):
        init_federation(store, base=tiny_llama_gguf, schedule=no_wait_schedule())


def test_a_tampered_adapter_in_the_store_is_rejected_and_reported_while_others_are_used(
    tmp_path, tiny_llama_gguf, train_corpus, adapters
):
    from edgefed.device.federation import federation_status, init_federation, join_federation
    from edgefed.device.publish import publish_adapter
    from edgefed.device.pull import pull_round
    from edgefed.sync.folder import FolderStore

    store = FolderStore(tmp_path / "shared")
    init_federation(store, base=tiny_llama_gguf, schedule=no_wait_schedule())
    spaces = {
        d: join_federation(
            store, d, data=train_corpus, workspace=tmp_path / d, base=tiny_llama_gguf
        )
        for d in DEVICES
    }
    for device in ("alice", "carol"):
        publish_adapter(store, spaces[device], 0, adapters[device, 0])
        pull_round(store, spaces[device], 0)
    blob = tmp_path / "shared" / "rounds" / "0" / "alice.safetensors"
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0x01  # one flipped bit in a tensor value, as a bad disk or a poisoner would
    blob.write_bytes(bytes(data))

    publish_adapter(store, spaces["bob"], 0, adapters["bob", 0])
    report = pull_round(store, spaces["bob"], 0)
    assert report.verified == ["carol"]
    assert report.rejected == [
        {
            "device": "alice",
            "round": 0,
            "reason": "adapter sha256 differs from the signed manifest (damaged or tampered)",
        }
    ]
    status = federation_status(store, spaces["bob"])
    assert status["rejected"] == report.rejected
    assert status["devices"]["alice"] == {"latest_round": 0, "left": False}
    assert not (tmp_path / "bob" / "rounds" / "0" / "peers" / "alice.safetensors").exists()


def test_reference_text_reaches_every_workspace_and_bad_input_gets_one_line(
    tmp_path, tiny_llama_gguf, train_corpus, relay_server
):

    reference = tmp_path / "reference.txt"
    reference.write_text("A shared public text that every device scores.")
    store = tmp_path / "shared"
    assert run("init", store, "--base", tiny_llama_gguf, "--reference", reference).exit_code == 0
    joined = run("join", store, "--device", "dana", "--data", train_corpus,
                 "--workspace", tmp_path / "dana", "--base", tiny_llama_gguf, "--json")  # fmt: skip
    assert joined.exit_code == 0, joined.stderr
    assert (tmp_path / "dana" / "reference.txt").read_text() == reference.read_text()

    url, _, _ = relay_server
    cases = {
        "already holds a federation": ["init", store, "--base", tiny_llama_gguf],
        "holds no federation": [
            "join",
            tmp_path / "empty",
            "--device",
            "x",
            "--data",
            train_corpus,
        ],
        "not a valid device name": ["join", store, "--device", "Bad/Name", "--data", train_corpus],
        "is not the federation's": ["join", store, "--device", "erin", "--data", train_corpus],
        "refused to store federation.json (401": ["init", url, "--base", tiny_llama_gguf],
        "not a device workspace": ["sync", "--round", "0", "--workspace", tmp_path],
        "unknown trust scheme 'dynamic'": ["init", tmp_path / "other", "--trust", "dynamic"],
    }
    # another file under --base, where the federation runs on the embedded base every device
    # already has: the fix is to leave --base out, not to find the federation's file
    embedded = tmp_path / "on-the-embedded-base"
    assert run("init", embedded).exit_code == 0
    cases["runs on the embedded base: join without --base"] = [
        "join", embedded, "--device", "fred", "--data", train_corpus, "--base", tiny_llama_gguf,
    ]  # fmt: skip
    for needle, args in cases.items():
        assert_one_line_error(run(*args), needle)


def test_aggregate_writes_the_mix_and_its_trust_row_for_each_scheme(
    tmp_path, tiny_llama_gguf, train_corpus, adapters
):

    from edgefed.adapter import read_adapter_folder
    from edgefed.device.aggregate import aggregate_round, trust_history
    from edgefed.device.federation import init_federation, join_federation
    from edgefed.device.publish import publish_adapter
    from edgefed.device.pull import pull_round
    from edgefed.loaded_base import LoadedBase
    from edgefed.sync.folder import FolderStore
    from edgefed.trust.settings import TrustSettings

    store = FolderStore(tmp_path / "shared")
    init_federation(store, base=tiny_llama_gguf, schedule=no_wait_schedule())
    spaces = {
        d: join_federation(
            store, d, data=train_corpus, workspace=tmp_path / d, base=tiny_llama_gguf
        )
        for d in DEVICES
    }
    for device in DEVICES:
        publish_adapter(store, spaces[device], 0, adapters[device, 0])
        pull_round(store, spaces[device], 0)
    alice = spaces["alice"]
    pull_round(store, alice, 0)
    own = adapters["alice", 0]
    rows = {}
    killed_mix = alice.round_dir(0) / ".aggregated.k2j3x9ab.tmp"  # what kill -9 mid-write left
    (killed_mix / "adapter").mkdir(parents=True)
    loaded = LoadedBase(tiny_llama_gguf, runtime_quant="keep")
    for scheme in ("local", "fedavg", "weights", "perplexity"):
        rows[scheme] = aggregate_round(alice, 0, own, loaded, TrustSettings(scheme))
        assert rows[scheme].row.scheme == scheme
        assert sum(rows[scheme].row.weights) == pytest.approx(1.0)
    _, mixed, _ = read_adapter_folder(tmp_path / "alice" / "rounds" / "0" / "aggregated")
    assert rows["local"].row.weights == [1.0, 0.0, 0.0]
    assert rows["fedavg"].row.weights == pytest.approx([1 / 3] * 3)
    history = trust_history(alice)
    assert len(history) == 1 and history[0].scheme == "perplexity"  # the last one written
    assert history[0].devices == ["alice", "bob", "carol"]
    assert set(mixed) == set(read_adapter_folder(own)[1])

    exact = aggregate_round(alice, 0, own, loaded, TrustSettings("fedavg", merge="exact"))
    loaded.close()
    assert 0 < exact.relative_error < rows["fedavg"].relative_error
    shown = run("trust", "show", "--workspace", alice.root, "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)[0]["merge"] == "exact"
    assert not killed_mix.exists()
    table = run("trust", "show", "--workspace", alice.root).stdout
    assert "alice (self)" in table and "bob" in table and "bob (self)" not in table
    cli = run("aggregate", "--round", 0, "--adapter", own, "--workspace", alice.root,
              "--trust", "prediction")  # fmt: skip
    assert cli.exit_code == 2 and "reference text" in cli.stderr


def test_a_relative_store_path_names_the_same_federation_from_any_folder(
    tmp_path, monkeypatch, tiny_llama_gguf, train_corpus
):
    monkeypatch.chdir(tmp_path)
    edgefed("init", "x/fed", "--base", tiny_llama_gguf, "--id", "fed-relative", "--wait", 0)
    edgefed("join", "x/fed", "--device", "alice", "--data", train_corpus, "--workspace", "ws",
            "--base", tiny_llama_gguf)  # fmt: skip
    config = json.loads((tmp_path / "ws" / "device.json").read_text())
    assert config["store"] == str(tmp_path / "x" / "fed")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    status = json.loads(edgefed("status", "--workspace", tmp_path / "ws", "--json").stdout)
    assert status["federation"] == "fed-relative" and list(status["devices"]) == ["alice"]
    assert list(elsewhere.iterdir()) == []


def test_round_checks_store_token_registration_and_data_before_any_training(
    tmp_path, monkeypatch, relay_server, tiny_llama_gguf, train_corpus
):
    url, token, root = relay_server
    monkeypatch.setenv("EDGEFED_TOKEN", token)
    edgefed("init", url, "--base", tiny_llama_gguf, "--wait", 0)
    workspace = tmp_path / "alice"
    edgefed("join", url, "--device", "alice", "--data", train_corpus, "--workspace", workspace,
            "--base", tiny_llama_gguf)  # fmt: skip

    monkeypatch.setenv("EDGEFED_TOKEN", "not-the-token-of-this-relay")
    assert_one_line_error(run("round", "--workspace", workspace), "relay token")
    monkeypatch.setenv("EDGEFED_TOKEN", token)
    (root / "devices" / "alice.json").rename(tmp_path / "registration")
    assert_one_line_error(run("round", "--workspace", workspace), "alice is not registered")
    (tmp_path / "registration").rename(root / "devices" / "alice.json")
    config = json.loads((workspace / "device.json").read_text())
    (workspace / "device.json").write_text(json.dumps(config | {"data": str(tmp_path / "gone")}))
    assert_one_line_error(run("round", "--workspace", workspace), "does not exist")
    assert not (workspace / "rounds").exists()  # nothing trained, nothing written


def test_init_refuses_a_folder_of_other_files_but_not_what_sync_tools_keep(
    tmp_path, tiny_llama_gguf
):
    """`init` makes an empty store: a folder that holds the user's own files (a mistyped path)
    is refused in one line and left as it was, while what Syncthing, Resilio or Dropbox keep
    in a folder they sync does not count."""
    busy = tmp_path / "documents"
    (busy / ".stfolder").mkdir(parents=True)
    (busy / "notes.txt").write_text("mine")
    assert_one_line_error(
        run("init", busy, "--base", tiny_llama_gguf),
        f"{busy} is not empty (holds 1 entry, e.g. notes.txt)",
        "init into an empty or new folder",
    )
    (busy / "photos").mkdir()
    assert_one_line_error(run("init", busy), "holds 2 entries, e.g. notes.txt")
    assert sorted(p.name for p in busy.iterdir()) == [".stfolder", "notes.txt", "photos"]

    synced = tmp_path / "synced"
    for name in (".stfolder", ".stversions", ".sync", ".dropbox", ".dropbox.cache"):
        (synced / name).mkdir(parents=True)
    (synced / ".federation.json.0a1b2c3d.tmp").write_bytes(b"{")  # an init killed mid-write
    edgefed("init", synced, "--base", tiny_llama_gguf)
    assert (synced / "federation.json").is_file()


def test_a_store_this_device_cannot_write_is_refused_before_training(
    tmp_path, tiny_llama_gguf, train_corpus
):
    store, workspace, data = tmp_path / "fed", tmp_path / "alice", tmp_path / "data"
    shutil.copytree(train_corpus, data)
    (data / "scan.txt").write_bytes(b"\xff\xfe\x00 a scanned page, not text")
    edgefed("init", store, "--base", tiny_llama_gguf, "--wait", 0)
    joined = edgefed("join", store, "--device", "alice", "--data", data, "--workspace",
                     workspace, "--base", tiny_llama_gguf)  # fmt: skip
    assert "skipped 1 file that is not UTF-8 text: scan.txt" in joined.stderr
    # a file where the rounds go: no write there succeeds, root's included (a chmod would not
    # stop root, a read-only mount needs privileges)
    (store / "rounds").write_text("")
    assert_one_line_error(run("round", "--workspace", workspace), "cannot write to the store")
    assert not (workspace / "rounds").exists()  # found before training, not after
