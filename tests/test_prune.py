"""`edgefed prune` on a workspace of fake rounds: what goes, what stays, what is never touched."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import assert_one_line_error, edgefed, no_wait_schedule, run

from edgefed.device.records import ROUND_STEPS, RoundRecord

HEAVY = 1000  # bytes of each bulky file; records are a few bytes
RECORDS = {
    "round.json",
    "trust.json",
    "evaluation.json",
    "rejected.json",
    "peers/bob.json",
    "peers/carol.json",
    "train/metrics.json",
    "train/split.json",
    "release.safetensors",  # a noised release: `repair` must resend this very draw
}
PEER_ADAPTERS = {"peers/bob.safetensors", "peers/carol.safetensors"}
OWN_BULK = {
    "train/adapter/adapter_model.safetensors",
    "train/adapter/adapter_config.json",
    "train/adapter.gguf",
    "train/optimizer.safetensors",
    "aggregated/adapter_model.safetensors",
    "aggregated.gguf",
}


@pytest.fixture
def workspace(tmp_path, train_corpus):
    """A device of a federation with max staleness 2 (the embedded base: nothing is loaded)."""
    from edgefed.device.federation import init_federation, join_federation
    from edgefed.sync.folder import FolderStore

    store = FolderStore(tmp_path / "shared")
    init_federation(store, schedule=replace(no_wait_schedule(), max_staleness=2))
    return join_federation(store, "alice", data=train_corpus, workspace=tmp_path / "alice")


def fake_round(workspace, number: int, *, finished: bool = True) -> None:
    """Every file a round leaves, bulky ones of HEAVY bytes; round.json says how far it got."""
    root = workspace.round_dir(number)
    for name in OWN_BULK | PEER_ADAPTERS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"\0" * HEAVY)
    for name in RECORDS - {"round.json"}:
        (root / name).write_text("{}")
    steps = ROUND_STEPS if finished else ROUND_STEPS[:2]
    RoundRecord(round=number, steps={s: {"finished": "2026-01-01T00:00:00Z"} for s in steps}).write(
        workspace.round_record_path(number)
    )


def files(workspace, number: int | None = None) -> dict[str, int]:
    """Each file under the round's folder (the whole workspace: None) and its size."""
    root = workspace.root if number is None else workspace.round_dir(number)
    return {
        p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()
    }


def test_prune_keeps_the_newest_rounds_whole_every_record_and_what_later_rounds_need(workspace):
    for number in range(5):
        fake_round(workspace, number)
    fake_round(workspace, 5, finished=False)  # trained and published, not mixed yet
    killed = workspace.train_run(1).root / ".adapter.k2j3x9ab.tmp"  # a write killed by kill -9
    killed.mkdir()
    (killed / "adapter_model.safetensors").write_bytes(b"\0" * 500)
    (workspace.train_run(5).root / ".adapter.abcdefgh.tmp").write_bytes(b"\0" * 500)
    before = files(workspace)

    dry = run("prune", "--keep", 1, "--dry-run", "--workspace", workspace.root, "--json")
    assert dry.exit_code == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert files(workspace) == before  # a dry run deletes nothing
    assert planned["dry_run"] is True and planned["kept"] == [4] and planned["unfinished"] == [5]
    # round 5 mixes the peers' adapters of rounds 3..5 (max staleness 2): round 3's stay
    assert sorted(planned["needed"]) == [f"rounds/3/{name}" for name in sorted(PEER_ADAPTERS)]
    expected_bytes = 3 * (len(OWN_BULK | PEER_ADAPTERS) * HEAVY) + len(OWN_BULK) * HEAVY + 500
    assert planned["bytes"] == expected_bytes
    assert [r["round"] for r in planned["pruned"]] == [0, 1, 2, 3]
    assert f"rounds/1/train/{killed.name}" in planned["pruned"][1]["paths"]

    done = edgefed("prune", "--keep", 1, "--workspace", workspace.root)
    assert (
        f"freed {expected_bytes / 1024:.1f} KiB" in done.stdout
        and "kept round 4 whole" in done.stdout
    ), done.stdout
    for number in (0, 1, 2):
        assert set(files(workspace, number)) == RECORDS, number
    assert set(files(workspace, 3)) == RECORDS | PEER_ADAPTERS
    assert set(files(workspace, 4)) == RECORDS | OWN_BULK | PEER_ADAPTERS  # the newest, whole
    unfinished = {k: v for k, v in before.items() if k.startswith("rounds/5/")}
    assert {k: v for k, v in files(workspace).items() if k.startswith("rounds/5/")} == unfinished
    left_alone = {k: v for k, v in before.items() if not k.startswith("rounds/")}
    assert {k: v for k, v in files(workspace).items() if not k.startswith("rounds/")} == left_alone
    assert not [p for p in workspace.root.rglob(".*") if "rounds/5/" not in p.as_posix()]

    again = edgefed("prune", "--keep", 1, "--workspace", workspace.root)
    assert again.stdout.startswith("nothing to prune"), again.stdout


def test_a_round_left_unfinished_keeps_the_mix_and_optimizer_it_starts_from(workspace):
    """Round 1 failed after its training started (the device went on with `--round 2`): round
    0's mix and optimizer state are still its start, whatever --keep says."""
    from edgefed.device.prune import prune_workspace

    for number in (0, 2, 3):
        fake_round(workspace, number)
    fake_round(workspace, 1, finished=False)
    report = prune_workspace(workspace, keep=1)
    assert [r.round for r in report.pruned] == [0, 2] and report.unfinished == [1]
    assert set(files(workspace, 0)) == RECORDS | PEER_ADAPTERS | {
        "train/optimizer.safetensors",
        "aggregated/adapter_model.safetensors",
    }
    assert set(files(workspace, 2)) == RECORDS | PEER_ADAPTERS  # round 4 may mix them
    assert set(files(workspace, 1)) == RECORDS | OWN_BULK | PEER_ADAPTERS
    assert set(files(workspace, 3)) == RECORDS | OWN_BULK | PEER_ADAPTERS


def test_a_keep_below_one_gets_one_line_and_deletes_nothing(workspace):
    fake_round(workspace, 0)
    fake_round(workspace, 1)
    before = files(workspace)
    for keep in (0, -2):
        result = run("prune", "--keep", keep, "--workspace", workspace.root)
        assert_one_line_error(result, f"--keep {keep}", "keep 1 or more rounds")
    assert files(workspace) == before
