"""The federation store's contract, signatures, and the verification of everything pulled."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import honest_adapter, publish

from edgefed.adapter import LoraSpec, lora_module_shapes
from edgefed.errors import InputFileError, StoreError
from edgefed.quant.gguf_file import read_base_info
from edgefed.sync.folder import FolderStore
from edgefed.sync.layout import adapter_key, device_key, is_store_key, manifest_key
from edgefed.sync.manifest import Federation, encode_document, registration
from edgefed.sync.signing import DeviceKey
from edgefed.sync.store import KeyExists, KeyMissing
from edgefed.sync.verify import Rejected, Verifier, encode_adapter

# ---------------------------------------------------------------------------- store contract


def test_store_creates_once_reads_back_and_lists_only_complete_layout_keys(store):
    alice = DeviceKey.generate()
    assert store.keys() == []
    store.create("federation.json", b"{}")
    alice_doc = encode_document(registration("alice", alice))
    store.create(device_key("alice"), alice_doc, signer=alice)
    store.create(adapter_key(0, "alice"), b"\x00\x01", signer=alice)
    store.create(manifest_key(0, "alice"), b"m", signer=alice)
    assert store.read(adapter_key(0, "alice")) == b"\x00\x01"
    with pytest.raises(KeyExists):
        store.create(device_key("alice"), alice_doc, signer=alice)
    assert store.read(device_key("alice")) == alice_doc  # never overwritten
    with pytest.raises(KeyMissing):
        store.read(device_key("bob"))
    assert store.keys("rounds/") == ["rounds/0/alice.json", "rounds/0/alice.safetensors"]
    assert len(store.keys()) == 4


def test_layout_refuses_traversal_and_stray_names():
    for key in (
        "../etc/passwd",
        "/etc/passwd",
        "devices/../federation.json",
        "rounds/01/alice.json",
        "rounds/0/Alice.json",
        "rounds/0/alice.json.sync-conflict-20260101-120000-ABCDEFG",
        "rounds/0/alice (conflicted copy 2026-01-01).json",
        "devices/.alice.json.x1.tmp",
        "rounds/0/alice.safetensors/x",
    ):
        assert not is_store_key(key), key
    with pytest.raises(InputFileError, match="not a valid device name"):
        device_key("../x")
    with pytest.raises(StoreError, match="not a federation store key"):
        FolderStore("/tmp").read("../etc/passwd")


def test_folder_store_ignores_conflict_copies_and_temp_files(tmp_path):
    store = FolderStore(tmp_path)
    store.create(manifest_key(1, "bob"), b"real")
    (tmp_path / "rounds" / "1" / "bob.sync-conflict-20260101-120000-ABC.json").write_bytes(b"x")
    (tmp_path / "rounds" / "1" / "bob (conflicted copy 2026-01-01).json").write_bytes(b"x")
    (tmp_path / "rounds" / "1" / ".bob.json.k2j3.tmp").write_bytes(b"partial")
    assert store.keys() == ["rounds/1/bob.json"]


# not on S3: there exclusivity is the server's conditional write, and moto's test server checks
# If-None-Match and writes without a lock between them
@pytest.mark.parametrize("store_url", ["folder", "relay"], indirect=True)
def test_concurrent_creates_of_one_key_have_exactly_one_winner(store):
    outcomes: list[str] = []

    def attempt(i: int) -> None:
        try:
            store.create("federation.json", f"key {i}".encode())
            outcomes.append("won")
        except KeyExists:
            outcomes.append("lost")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["lost"] * 15 + ["won"]
    winner = store.read("federation.json")
    assert winner.startswith(b"key ")
    with pytest.raises(KeyExists):
        store.create("federation.json", b"late")
    assert store.read("federation.json") == winner  # nothing is ever overwritten
    if isinstance(store, FolderStore):
        assert list(store.root.rglob(".*")) == []  # no temp file left behind


# ---------------------------------------------------------------------------- verification


def test_honest_adapters_pass_and_every_kind_of_bad_one_is_rejected_with_its_reason(federation):
    alice, bob, mallory = DeviceKey.generate(), DeviceKey.generate(), DeviceKey.generate()
    verifier = Verifier(
        Federation.from_document(federation), {"alice": alice.public_key, "bob": bob.public_key}
    )
    tensors = honest_adapter(federation)
    manifest, blob = publish(federation, "alice", alice, tensors)
    verified = verifier.check(0, "alice", manifest, blob)
    name = next(iter(tensors))
    assert verified.tensors[name].dtype == torch.float16
    assert torch.allclose(verified.tensors[name].float(), tensors[name], atol=1e-3)

    def rejected(*args) -> str:
        with pytest.raises(Rejected) as caught:
            verifier.check(*args)
        return str(caught.value)

    flipped = bytearray(blob)
    flipped[len(flipped) // 2] ^= 0x01
    assert "sha256 differs" in rejected(0, "alice", manifest, bytes(flipped))
    forged, forged_blob = publish(federation, "alice", mallory, tensors)  # mallory signs as alice
    assert "does not verify with alice's registered key" in rejected(
        0, "alice", forged, forged_blob
    )
    assert "claims" in rejected(0, "bob", manifest, blob)  # alice's files put under bob's name
    assert "claims" in rejected(1, "alice", manifest, blob)  # replayed into another round
    assert "not registered" in rejected(0, "eve", *publish(federation, "eve", mallory, tensors))

    other_base = federation | {"base": federation["base"] | {"sha256": "0" * 64}}
    wrong_base = publish(other_base, "alice", alice, tensors)
    assert "not the federation's" in rejected(0, "alice", *wrong_base)

    bigger = dict(tensors)
    bigger[name] = torch.randn(tensors[name].shape[0] + 1, tensors[name].shape[1])
    assert "has shape" in rejected(0, "alice", *publish(federation, "alice", alice, bigger))
    fewer = dict(list(tensors.items())[1:])
    assert "1 missing" in rejected(0, "alice", *publish(federation, "alice", alice, fewer))
    poisoned = dict(tensors)
    poisoned[name] = tensors[name].clone()
    poisoned[name][0, 0] = float("nan")
    assert "NaN or infinite" in rejected(0, "alice", *publish(federation, "alice", alice, poisoned))
    assert "not JSON" in rejected(0, "alice", b"\x00garbage", blob)

    tiny_limit = Verifier(
        Federation.from_document(federation | {"limits": {"adapter_bytes": 100}}),
        {"alice": alice.public_key},
    )
    with pytest.raises(Rejected, match="over the 100 limit"):
        tiny_limit.check(0, "alice", manifest, blob)
    # after all that, the honest adapter still passes
    assert verifier.check(0, "alice", manifest, blob).device == "alice"


def test_federation_limits_and_shapes_follow_the_base_and_lora_config(federation, tiny_llama_gguf):
    info = read_base_info(tiny_llama_gguf)
    modules = lora_module_shapes(info, LoraSpec(rank=4))
    assert federation["lora_modules"] == {m: list(s) for m, s in modules.items()}
    assert len(modules) == 2 * 7  # 2 layers, 7 projections
    assert federation["lora_modules"]["model.layers.0.self_attn.k_proj"] == [64, 32]
    fp16 = len(encode_adapter(honest_adapter(federation)))
    assert fp16 < federation["limits"]["adapter_bytes"] < 3 * fp16 + (1 << 20)


def test_compressed_adapters_are_half_the_bytes_and_close_to_the_original(federation):
    alice = DeviceKey.generate()
    verifier = Verifier(Federation.from_document(federation), {"alice": alice.public_key})
    tensors = honest_adapter(federation, seed=3)
    fp16 = publish(federation, "alice", alice, tensors)
    int8 = publish(federation, "alice", alice, tensors, encoding="int8")
    # tiny tensors: the names in the header are a large share (0.52x on the embedded base)
    assert len(int8[1]) < 0.8 * len(fp16[1])
    restored = verifier.check(0, "alice", *int8).tensors
    for name, tensor in tensors.items():
        assert restored[name].dtype == torch.float16
        error = (restored[name].float() - tensor).abs().max()
        assert error <= tensor.abs().amax() / 127 * 0.51 + 1e-3, name  # half a code step
    nan = dict(tensors)
    nan[next(iter(tensors))] = torch.full_like(tensors[next(iter(tensors))], float("nan"))
    with pytest.raises(Rejected, match="NaN or infinite"):
        verifier.check(0, "alice", *publish(federation, "alice", alice, nan, encoding="int8"))


def test_folder_store_files_get_the_users_mode_while_the_device_key_stays_private(tmp_path):
    """A store folder shared over NFS is read by the other users: its files get the mode any
    file the user makes gets (0666 less the umask), not a temporary file's 0600, while the
    device key stays 0600 whatever the umask."""
    import os
    import stat

    for umask, expected in ((0o022, 0o644), (0o027, 0o640)):
        previous = os.umask(umask)
        try:
            store = FolderStore(tmp_path / f"shared-{umask:o}")
            store.create("federation.json", b"{}")
            store.create(manifest_key(0, "bob"), b"m")
            key_path = tmp_path / f"device-{umask:o}.key"
            DeviceKey.generate().save(key_path)
        finally:
            os.umask(previous)
        for key in ("federation.json", manifest_key(0, "bob")):
            assert stat.S_IMODE((store.root / key).stat().st_mode) == expected, (key, umask)
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        assert not list(store.root.rglob(".*"))  # no temporary left behind
