"""`edgefed round` and a device's evaluation: real processes, real kills, real stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICES, edgefed, run

from edgefed.faults import CRASH_ENV
from edgefed.sync.manifest import Schedule

# the whole suite only: `make test-fast` leaves this module out (docs/developer/index.md)
pytestmark = pytest.mark.slow

ROUND = ("--seq-len", 32, "--batch-size", 2, "--checkpoint-every", 2, "--runtime-quant", "keep",
         "--test-tokens", 512)  # fmt: skip


def round_process(workspace: Path, *args: object, crash_at: str | None = None):
    env = dict(os.environ)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "edgefed", "round", "--workspace", str(workspace), *map(str, ROUND),
         *map(str, args), "--json"],
        capture_output=True,
        text=True,
        env=env,
    )  # fmt: skip


@pytest.fixture
def federation(store_url, tmp_path, tiny_llama_gguf, train_corpus) -> dict[str, Path]:
    """alice and bob in a federation of 4 warm-up steps, then 2 per round; on the folder store
    bob did round 0."""
    edgefed("init", store_url, "--base", tiny_llama_gguf, "--warmup-steps", 4,
            "--round-steps", 2, "--wait", 0)  # fmt: skip
    spaces = {}
    for device in ("alice", "bob"):
        spaces[device] = tmp_path / device
        edgefed("join", store_url, "--device", device, "--data", train_corpus,
                "--workspace", spaces[device], "--base", tiny_llama_gguf)  # fmt: skip
    if "://" not in store_url:  # bob's round, a peer to mix, matters only where mixing is tested
        done = round_process(spaces["bob"])
        assert done.returncode == 0, done.stderr
    return spaces


# where a kill can leave the store half-written: run on every backend. store-write is mid-write
# of the adapter into a shared folder (a relay or S3 upload is all-or-nothing: test_store_faults
# kills uploads half-way there)
STORE_CRASHES = ("publish-blob", "round-publish")
# the rest happen between local files whatever the store: run once, on the folder store
LOCAL_CRASHES = ("train-checkpoint", "round-train", "round-pull", "aggregate-mix",
                 "round-aggregate", "round-evaluate")  # fmt: skip


def test_a_round_killed_at_every_step_resumes_and_never_repeats_a_step(federation, store_url):
    alice, bob = federation["alice"], federation["bob"]
    round_dir = alice / "rounds" / "0"
    folder = "://" not in store_url
    crashes = (["train-checkpoint", "round-train", "store-write", "publish-blob", "round-publish",
                "round-pull", "aggregate-mix", "round-aggregate", "round-evaluate"]
               if folder else list(STORE_CRASHES))  # fmt: skip
    assert set(crashes) >= set(STORE_CRASHES) and (not folder or set(crashes) >= set(LOCAL_CRASHES))
    stderr = {}
    for point in crashes:
        done = round_process(alice, crash_at=point)
        assert done.returncode == -signal.SIGKILL, (point, done.stderr)
        stderr[point] = done.stderr
        if point == "publish-blob":
            trained = (round_dir / "train" / "metrics.json").stat().st_mtime_ns
        if point == "round-aggregate":
            mixed = (round_dir / "trust.json").stat().st_mtime_ns
    # training resumed from the checkpoint the first kill left, and was never redone after
    assert "train finished earlier" in stderr["round-publish"]
    if folder:
        assert "resumed from the checkpoint at step 2" in stderr["round-train"]
        assert "train finished earlier" in stderr["publish-blob"]
        assert "aggregate finished earlier" in stderr["round-evaluate"]

    final = round_process(alice)
    assert final.returncode == 0, final.stderr
    report = json.loads(final.stdout)
    steps = ["train", "publish", "pull", "aggregate", "evaluate"]
    assert report["round"] == 0
    # the last kill (round-publish) came after the publish and before its record: a relay or S3
    # rerun publishes again, finds its own blob and manifest there, and sends nothing twice
    assert report["ran"] == ([] if folder else steps[1:])
    assert report["skipped"] == (steps if folder else ["train"])
    assert folder or report["record"]["steps"]["publish"]["published"] is False
    assert (round_dir / "train" / "metrics.json").stat().st_mtime_ns == trained
    if folder:
        assert (round_dir / "trust.json").stat().st_mtime_ns == mixed
    metrics = json.loads((round_dir / "train" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and not (round_dir / "train" / "checkpoint.safetensors").exists()
    assert report["evaluation"]["trust"]["devices"] == (["alice", "bob"] if folder else ["alice"])
    assert set(report["evaluation"]["models"]) == {"base", "local", "aggregated"}

    # the store holds alice's signed adapter once and bob verifies it; nothing half-written
    # is visible (a folder keeps the killed write's hidden temp file, outside the layout)
    if folder:
        from edgefed.sync.folder import FolderStore

        leftovers = [p.name for p in Path(store_url).rglob(".*.tmp")]
        assert len(leftovers) == 1 and leftovers[0].startswith(".alice.safetensors.")
        assert FolderStore(store_url).keys("rounds/") == [
            f"rounds/0/{d}.{s}" for d in ("alice", "bob") for s in ("json", "safetensors")
        ]
    pulled = json.loads(edgefed("sync", "--round", 0, "--workspace", bob, "--json").stdout)
    assert pulled["verified_peers"] == ["alice"] and pulled["rejected"] == []
    if not folder:
        return  # what follows does not depend on the store

    # round 1 trains its 2 steps from round 0's mix; running it again trains nothing
    second = round_process(alice)
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert report["round"] == 1 and report["ran"] == steps
    train = report["record"]["steps"]["train"]
    assert train["steps"] == 2 and train["from"].endswith(str(Path("rounds", "0", "aggregated")))
    again = json.loads(round_process(alice, "--round", 1).stdout)
    assert again["ran"] == [] and again["record"] == report["record"]

    shown = edgefed("evaluate", "--workspace", alice, "--json")
    assert json.loads(shown.stdout) == report["evaluation"]
    mixed_up = edgefed("evaluate", "--round", 0, "--workspace", alice, "--data", alice,
                       check=False)  # fmt: skip
    assert mixed_up.returncode == 2 and "give one or the other" in mixed_up.stderr


def test_a_poisoned_peer_gets_no_weight_and_does_no_harm(tmp_path, tiny_llama_gguf, train_corpus):
    from edgefed.adapter import read_adapter_folder, save_lora_tensors
    from edgefed.device.aggregate import aggregate_round
    from edgefed.device.evaluate import evaluate_round
    from edgefed.device.federation import init_federation, join_federation
    from edgefed.device.publish import publish_adapter
    from edgefed.device.records import ROUND_STEPS
    from edgefed.device.round import RoundOptions, run_round
    from edgefed.loaded_base import LoadedBase
    from edgefed.sync.folder import FolderStore
    from edgefed.train.loop import TrainConfig
    from edgefed.trust.settings import TrustSettings

    store = FolderStore(tmp_path / "shared")
    init_federation(store, base=tiny_llama_gguf, schedule=Schedule(warmup_steps=10, round_steps=2))
    spaces = {
        d: join_federation(store, d, data=train_corpus, workspace=tmp_path / d,
                           base=tiny_llama_gguf)
        for d in ("alice", "bob", "mallory")
    }  # fmt: skip
    options = RoundOptions(
        train=TrainConfig(seq_len=32, batch_size=2, learning_rate=1e-2), test_tokens=512
    )
    with LoadedBase(tiny_llama_gguf, runtime_quant="keep") as loaded:
        run_round(store, spaces["bob"], loaded, options=options)
    # mallory publishes bob's adapter with B scaled -1000x (the learned step reversed and
    # blown up): finite, right shapes, signed
    spec, tensors, _ = read_adapter_folder(spaces["bob"].root / "rounds" / "0" / "train")
    poisoned = {n: t * -1000 if "lora_B" in n else t for n, t in tensors.items()}
    assert max(float(t.abs().max()) for t in poisoned.values()) < 6e4  # survives float16
    publish_adapter(store, spaces["mallory"], 0, save_lora_tensors(poisoned, spec, tmp_path / "p"))

    with LoadedBase(tiny_llama_gguf, runtime_quant="keep") as loaded:
        report = run_round(store, spaces["alice"], loaded, options=options)
    assert report.ran == list(ROUND_STEPS) and report.skipped == []  # every step, in order
    evaluation = report.evaluation
    weights = dict(zip(evaluation.trust["devices"], evaluation.trust["weights"], strict=True))
    assert set(weights) == {"alice", "bob", "mallory"} and weights["mallory"] < 1e-6
    models = evaluation.perplexities()
    assert models["aggregated"] <= models["local"] * 1.01 < models["base"]

    # for contrast, FedAvg takes the poison in and the device's test perplexity gets worse
    loaded = LoadedBase(tiny_llama_gguf, runtime_quant="keep")
    aggregate_round(spaces["alice"], 0, spaces["alice"].root / "rounds" / "0" / "train", loaded,
                    TrustSettings("fedavg"))  # fmt: skip
    fedavg = evaluate_round(spaces["alice"], 0, loaded, test_tokens=512).as_dict()
    assert fedavg["models"]["aggregated"]["perplexity"] > 1.03 * models["local"]
    assert torch.isfinite(torch.tensor(fedavg["models"]["aggregated"]["perplexity"]))

    # --clip-norm at the honest peer's norm takes most of the poison's power away, even in FedAvg
    trust = json.loads((spaces["alice"].round_dir(0) / "trust.json").read_text())
    norms = trust["delta_norms"]
    assert norms["mallory"] == pytest.approx(1000 * norms["bob"], rel=1e-3)
    aggregate_round(spaces["alice"], 0, spaces["alice"].round_dir(0) / "train", loaded,
                    TrustSettings("fedavg", clip_norm=norms["bob"]))  # fmt: skip
    clipped = evaluate_round(spaces["alice"], 0, loaded, test_tokens=512).as_dict()
    loaded.close()
    clipped_trust = json.loads((spaces["alice"].round_dir(0) / "trust.json").read_text())
    assert clipped_trust["clip_norm"] == norms["bob"]
    poisoned_ppl = fedavg["models"]["aggregated"]["perplexity"]
    assert clipped["models"]["aggregated"]["perplexity"] < poisoned_ppl


def test_a_round_over_a_shared_loaded_base_equals_one_that_loads_everything(
    tmp_path, tiny_llama_gguf, train_corpus
):
    from edgefed.adapter import read_adapter_folder
    from edgefed.device.federation import init_federation, join_federation
    from edgefed.device.round import RoundOptions, run_round
    from edgefed.loaded_base import LoadedBase
    from edgefed.sync.folder import FolderStore
    from edgefed.train.loop import TrainConfig

    options = RoundOptions(
        train=TrainConfig(seq_len=32, batch_size=2, learning_rate=1e-2), test_tokens=512
    )
    results = {}
    with LoadedBase(tiny_llama_gguf, runtime_quant="keep") as loaded:
        for mode, shared in (("own loads", None), ("shared", loaded)):
            store = FolderStore(tmp_path / mode / "shared")
            init_federation(
                store, base=tiny_llama_gguf, schedule=Schedule(warmup_steps=4, round_steps=2)
            )
            for device in ("bob", "alice"):  # bob first: alice must not see his state
                space = join_federation(store, device, data=train_corpus, base=tiny_llama_gguf,
                                        workspace=tmp_path / mode / device)  # fmt: skip
                if shared is None:  # a fresh base for every device, as a real device has
                    with LoadedBase(tiny_llama_gguf, runtime_quant="keep") as own:
                        report = run_round(store, space, own, options=options)
                else:
                    report = run_round(store, space, shared, options=options)
            rounds = space.root / "rounds" / "0"
            results[mode] = {
                "trained": read_adapter_folder(rounds / "train")[1],
                "aggregated": read_adapter_folder(rounds / "aggregated")[1],
                "perplexity": report.evaluation.perplexities(),
            }
    own, shared = results["own loads"], results["shared"]
    for adapter in ("trained", "aggregated"):
        assert own[adapter].keys() == shared[adapter].keys()
        assert all(torch.allclose(own[adapter][n], shared[adapter][n], atol=1e-6)
                   for n in own[adapter])  # fmt: skip
    assert own["perplexity"] == pytest.approx(shared["perplexity"], rel=1e-5)


@pytest.mark.parametrize("store_url", ["folder", "relay"], indirect=True)
def test_devices_on_their_own_schedules_each_mix_every_peer_by_round_1(
    store_url, tmp_path, tiny_llama_gguf, train_corpus
):
    """alice and bob run round 0, carol starts only after both finished it; each device runs
    its rounds when it likes. Every device mixes every peer by round 1, a late peer with its
    freshest adapter, and trust.json says which round each mixed adapter is from."""
    edgefed("init", store_url, "--base", tiny_llama_gguf, "--warmup-steps", 2,
            "--round-steps", 1, "--wait", 0)  # fmt: skip
    spaces = {d: tmp_path / d for d in DEVICES}
    for device in DEVICES:
        edgefed("join", store_url, "--device", device, "--data", train_corpus,
                "--workspace", spaces[device], "--base", tiny_llama_gguf)  # fmt: skip
    before = run("trust", "show", "--workspace", spaces["alice"])
    assert before.exit_code == 0 and "alice has no trust rows yet" in before.stdout
    order = [("alice", 0), ("bob", 0), ("carol", 0), ("alice", 1), ("bob", 1), ("carol", 1)]
    rounds = {}
    for device, number in order:
        done = round_process(spaces[device])
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["round"] == number
        rounds[device, number] = json.loads(
            (spaces[device] / "rounds" / str(number) / "trust.json").read_text()
        )["adapter_rounds"]
    assert rounds["alice", 0] == {"alice": 0}  # the first device has nobody to mix yet
    assert rounds["bob", 0] == {"alice": 0, "bob": 0}
    assert rounds["carol", 0] == {"alice": 0, "bob": 0, "carol": 0}
    # round 1: whoever has not published it yet is mixed with its round-0 adapter
    assert rounds["alice", 1] == {"alice": 1, "bob": 0, "carol": 0}
    assert rounds["bob", 1] == {"alice": 1, "bob": 1, "carol": 0}
    assert rounds["carol", 1] == {"alice": 1, "bob": 1, "carol": 1}
    # alone in round 0, alice's mix is her own adapter: scored once, reported for both
    alone = json.loads((spaces["alice"] / "rounds" / "0" / "evaluation.json").read_text())
    assert alone["models"]["aggregated"] == alone["models"]["local"]
    # what a user sees of the late peers: which round each mixed adapter came from
    shown = run("trust", "show", "--workspace", spaces["alice"])
    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout.count("(r0)") == 2 and "was from round N" in shown.stdout
    evaluated = run("evaluate", "--round", "1", "--workspace", spaces["alice"], "--json")
    assert json.loads(evaluated.stdout)["trust"]["adapter_rounds"] == [1, 0, 0]
    table = run("evaluate", "--round", "1", "--workspace", spaces["alice"]).stdout
    assert "adapter of round" in table
