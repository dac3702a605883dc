"""`edgefed simulate` on a tiny model: every scheme, real stores, the report's files."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run, write_repetitive_corpus

from edgefed.faults import CRASH_ENV

# the whole suite only: `make test-fast` leaves this module out (docs/developer/index.md)
pytestmark = pytest.mark.slow

SCHEMES = "local,fedavg,weights,prediction,perplexity,auto,fedsa,graph"
SMALL = ("--rounds", 2, "--warmup-steps", 4, "--round-steps", 2, "--seq-len", 32,
         "--batch-size", 2, "--lr", 2e-3, "--test-tokens", 256,
         "--runtime-quant", "keep", "--precision", "fp32")  # fmt: skip


@pytest.fixture(scope="module")
def client_folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clients")
    for index, name in enumerate(("north", "south", "east")):
        write_repetitive_corpus(root / name, 30, start=100 * index)
    return root


@pytest.fixture(scope="module")
def simulation(tmp_path_factory, client_folders, tiny_llama_gguf) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("simulation") / "sim"
    done = run("simulate", "--clients", client_folders, "--trust", SCHEMES, "--out", out,
               "--base", tiny_llama_gguf, *SMALL, "--json")  # fmt: skip
    assert done.exit_code == 0, done.stderr
    return out, json.loads(done.stdout)


def test_a_tiny_simulation_of_every_scheme_writes_finite_results_and_the_report(simulation):
    out, results = simulation
    assert results == json.loads((out / "results.json").read_text()) | {
        "outputs": results["outputs"]
    }
    assert results["finished"] is True
    assert [c["name"] for c in results["clients"]] == ["east", "north", "south"]
    summary = results["summary"]
    assert list(summary) == SCHEMES.split(",")
    for label, row in summary.items():
        assert math.isfinite(row["mean"]) and row["per_round"] and len(row["per_client"]) == 3
        for matrix in row["trust_matrices"]:
            assert all(sum(r) == pytest.approx(1.0) for r in matrix), label
        assert row["bytes_per_device_round"]["received"] == pytest.approx(
            2 * row["bytes_per_device_round"]["sent"], rel=0.01
        )
    assert summary["local"]["trust_matrices"][0] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    for plot in results["outputs"]["plots"]:
        assert Path(plot).read_bytes().startswith(b"\x89PNG")


def test_the_chosen_mix_is_the_best_candidate_on_tokens_the_trust_scores_never_saw(simulation):
    _, results = simulation
    for rounds in results["runs"]["auto"].values():
        for round_ in rounds:
            for record in round_["devices"].values():
                candidates = record["candidates"]
                labels = [c["label"] for c in candidates]
                assert "local" in labels and "fedavg" in labels, labels
                chosen = candidates[0]
                assert chosen["selection_nll"] == min(c["selection_nll"] for c in candidates)
                assert record["trust"]["weights"] == pytest.approx(chosen["weights"])
                assert all(c["standard_error"] > 0 for c in candidates[1:])
    # the trust scores and the choice read disjoint halves of the trust-validation split
    from edgefed.train.blocks import validation_halves

    first, second = validation_halves(
        [type("D", (), {"text": "abcdef"})()], lambda t: [ord(c) for c in t], eos=0
    )
    assert set(first.tolist()).isdisjoint(second.tolist())


def test_a_simulated_device_trains_the_adapter_its_real_round_would(
    simulation, tmp_path, tiny_llama_gguf
):
    from conftest import edgefed

    from edgefed.adapter import read_adapter_folder

    out, _ = simulation
    store, workspace = tmp_path / "store", tmp_path / "north"
    edgefed("init", store, "--base", tiny_llama_gguf, "--warmup-steps", 4, "--round-steps", 2,
            "--trust", "local", "--wait", 0)  # fmt: skip
    edgefed("join", store, "--device", "north", "--data", out / "clients" / "north",
            "--workspace", workspace, "--base", tiny_llama_gguf)  # fmt: skip
    edgefed("round", "--workspace", workspace, *SMALL[6:])
    simulated = out / "federations" / "local" / "seed-0" / "devices" / "north" / "rounds" / "0"
    for step in ("train", "aggregated"):
        real = read_adapter_folder(workspace / "rounds" / "0" / step)[1]
        twin = read_adapter_folder(simulated / step)[1]
        assert real.keys() == twin.keys()
        assert all(torch.allclose(real[n], twin[n], atol=1e-6) for n in real), step


def test_a_run_from_a_later_first_seed_is_that_seed_of_one_longer_run(
    tmp_path, client_folders, tiny_llama_gguf
):
    """A long comparison split over sessions (--first-seed) merges into what one run gives."""
    from edgefed.adapter import read_adapter_folder

    outs = {}
    for name, seeds in {"both": ("--seeds", 2), "second": ("--first-seed", 1)}.items():
        outs[name] = tmp_path / name
        done = run("simulate", "--clients", client_folders, "--trust", "local", "--out",
                   outs[name], "--base", tiny_llama_gguf, *SMALL, *seeds, "--json")  # fmt: skip
        assert done.exit_code == 0, done.stderr
    results = {n: json.loads((out / "results.json").read_text()) for n, out in outs.items()}
    assert list(results["both"]["runs"]["local"]) == ["0", "1"]
    assert list(results["second"]["runs"]["local"]) == ["1"]
    assert results["second"]["settings"]["first_seed"] == 1
    assert results["second"]["runs"]["local"]["1"] == results["both"]["runs"]["local"]["1"]
    device = Path("federations", "local", "seed-1", "devices", "north", "rounds", "1", "train")
    ours, theirs = (read_adapter_folder(out / device)[1] for out in outs.values())
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    seed_0 = read_adapter_folder(outs["both"] / str(device).replace("seed-1", "seed-0"))[1]
    assert not all(torch.equal(ours[n], seed_0[n]) for n in ours)


def test_client_folders_that_cannot_make_a_federation_get_one_clear_line(tmp_path, client_folders):
    empty = tmp_path / "empty"
    write_repetitive_corpus(empty / "full", 30)
    (empty / "nothing").mkdir()
    single = tmp_path / "single"
    write_repetitive_corpus(single / "only", 30)
    tiny = tmp_path / "unequal"
    write_repetitive_corpus(tiny / "big", 30)
    write_repetitive_corpus(tiny / "small", 2)  # 3 documents split, 2 cannot
    cases = {
        "client nothing: ": ["--clients", empty],
        "has 1 client sub-folder;": ["--clients", single],
        "client small has 2 documents;": ["--clients", tiny],
        "--dataset and --clients both name the data": ["--clients", single, "--dataset",
                                                      "bbc-mixed"],
        "unknown trust scheme 'dynamic'": ["--clients", client_folders, "--trust", "dynamic"],
    }  # fmt: skip
    for needle, args in cases.items():
        assert_one_line_error(run("simulate", *args, "--out", tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists()


def test_the_help_says_where_the_run_folder_goes_by_default(monkeypatch):
    """The markdown help drops `<...>` as HTML: it once read "Default: simulations/-."."""
    monkeypatch.setenv("COLUMNS", "200")  # one option per line, not wrapped mid-default
    shown = run("simulate", "--help")
    assert shown.exit_code == 0
    assert "Default: simulations/DATASET-YYYYMMDD-HHMMSS" in shown.stdout, shown.stdout


def test_code_and_prose_clients_hold_the_mixture_they_claim():
    from edgefed.code_text import code_documents
    from edgefed.demo_text import BBC_TOPICS, bbc_topic
    from edgefed.simulation.clients import load_clients

    code = {d.id for d in code_documents()}
    prose = {d.id for topic in BBC_TOPICS for d in bbc_topic(topic).documents}
    expected = {
        "code-prose": {"code-1": {"code": 20}, "code-2": {"code": 20},
                       "prose-1": {"prose": 20}, "prose-2": {"prose": 20}},
        "code-prose-mixed": {"code-mix-1": {"code": 15, "prose": 5},
                             "code-mix-2": {"code": 15, "prose": 5},
                             "prose-mix-1": {"prose": 15, "code": 5},
                             "prose-mix-2": {"prose": 15, "code": 5}},
    }  # fmt: skip
    for dataset, mixtures in expected.items():
        client_set = load_clients(dataset, docs_per_client=20, seed=1)
        dealt = [d.id for c in client_set.clients for d in c.documents]
        held_out = {d.id for d in client_set.reference}
        assert len(set(dealt)) == len(dealt) and not held_out & set(dealt)
        assert sum(i in code for i in held_out) == sum(i in prose for i in held_out) == 10
        for client in client_set.clients:
            counted = {"code": sum(d.id in code for d in client.documents),
                       "prose": sum(d.id in prose for d in client.documents)}  # fmt: skip
            claimed = mixtures[client.name]
            assert counted == {"code": claimed.get("code", 0), "prose": claimed.get("prose", 0)}
            assert client.mixture == claimed
    other_seed = load_clients("code-prose", docs_per_client=20, seed=2)
    assert (
        other_seed.clients[0].documents
        != load_clients("code-prose", docs_per_client=20, seed=1).clients[0].documents
    )


def test_a_tiny_code_prose_simulation_shows_the_oracle_and_calibrated_trust(
    tmp_path, tiny_llama_gguf
):
    out = tmp_path / "sim"
    done = run("simulate", "--dataset", "code-prose-mixed", "--docs-per-client", 8,
               "--trust", "local,fedavg,oracle,perplexity:se=1", "--out", out,
               "--base", tiny_llama_gguf, *SMALL, "--json")  # fmt: skip
    assert done.exit_code == 0, done.stderr
    results = json.loads(done.stdout)
    assert {c["name"]: c["mixture"] for c in results["clients"]} == {
        "code-mix-1": {"code": 6, "prose": 2}, "code-mix-2": {"code": 6, "prose": 2},
        "prose-mix-1": {"prose": 6, "code": 2}, "prose-mix-2": {"prose": 6, "code": 2},
    }  # fmt: skip
    same, other = 0.75**2 + 0.25**2, 2 * 0.75 * 0.25
    row = [same, same, other, other]
    expected = [[w / sum(row) for w in row], [w / sum(row) for w in row],
                [w / sum(row) for w in row[::-1]], [w / sum(row) for w in row[::-1]]]  # fmt: skip
    oracle = results["summary"]["oracle"]["trust_matrices"][0]
    assert oracle == [pytest.approx(r, rel=1e-12) for r in expected]
    for label, row in results["summary"].items():
        assert math.isfinite(row["mean"]), label
    record = json.loads(
        (out / "federations" / "perplexity_se-1" / "seed-0" / "devices" / "code-mix-1"
         / "rounds" / "1" / "trust.json").read_text()
    )  # fmt: skip
    assert record["normalization"]["se_temperature"] == 1
    assert record["errors"][0] is None and all(e > 0 for e in record["errors"][1:])


def test_oracle_trust_is_refused_where_no_mixture_is_known(tmp_path, tiny_llama_gguf):
    refused = run("init", tmp_path / "store", "--base", tiny_llama_gguf, "--trust", "oracle")
    assert_one_line_error(refused, "only a simulation has")
    assert not (tmp_path / "store").exists()
    both = run("init", tmp_path / "store", "--base", tiny_llama_gguf, "--temperature", "0.1",
               "--se-temperature", "1")  # fmt: skip
    assert_one_line_error(both, "both given")
    # a device's round refuses settings that cannot mix before it trains anything
    store, workspace = tmp_path / "store", tmp_path / "north"
    assert run("init", store, "--base", tiny_llama_gguf, "--trust", "fedavg").exit_code == 0
    data = write_repetitive_corpus(tmp_path / "data", 12)
    joined = run("join", store, "--device", "north", "--data", data, "--workspace", workspace,
                 "--base", tiny_llama_gguf)  # fmt: skip
    assert joined.exit_code == 0, joined.stderr
    cases = {"only a simulation has": ["--trust", "oracle"],
             "fedavg trust has no standard errors": ["--se-temperature", "2"]}  # fmt: skip
    for needle, args in cases.items():
        refused = run("round", "--workspace", workspace, *args, *SMALL[6:])
        assert_one_line_error(refused, needle)
        assert not (workspace / "rounds" / "0" / "train").exists()


def test_an_interrupted_simulation_keeps_the_federations_it_finished(
    tmp_path, client_folders, tiny_llama_gguf
):
    """Stopped while its second variant trains, a simulation's results.json holds the first
    variant whole and says it is not finished: a long run loses at most one federation."""
    from edgefed.device.round import RoundOptions
    from edgefed.loaded_base import LoadedBase
    from edgefed.simulation.clients import load_clients
    from edgefed.simulation.run import SimulationSettings, simulate
    from edgefed.train.loop import TrainConfig
    from edgefed.trust.settings import parse_variants

    settings = SimulationSettings(
        variants=parse_variants("local,fedavg"),
        rounds=2,
        warmup_steps=4,
        round_steps=2,
        round_options=RoundOptions(
            train=TrainConfig(seq_len=32, batch_size=2, learning_rate=2e-3), test_tokens=256
        ),
    )

    def stop_at_fedavg(progress) -> None:
        if progress.message.startswith("fedavg"):
            raise KeyboardInterrupt

    out = tmp_path / "sim"
    with (
        LoadedBase(tiny_llama_gguf, precision="fp32", runtime_quant="keep") as loaded,
        pytest.raises(KeyboardInterrupt),
    ):
        simulate(load_clients(None, client_folders), out, loaded, settings,
                 on_progress=stop_at_fedavg)  # fmt: skip
    kept = json.loads((out / "results.json").read_text())
    assert kept["finished"] is False
    assert list(kept["runs"]) == ["local"] and list(kept["runs"]["local"]) == ["0"]
    assert len(kept["runs"]["local"]["0"]) == 2
    assert list(kept["summary"]) == ["local"] and math.isfinite(kept["summary"]["local"]["mean"])


def test_a_simulation_killed_mid_round_resumes_where_it_stopped_and_ends_as_one_run(
    tmp_path, client_folders, tiny_llama_gguf
):
    """Killed (SIGKILL, as at the end of a session) while its first device mixes round 0,
    `--resume` goes on without training again and ends with the results of an unbroken run;
    other settings, or no --resume, are refused in one line and change nothing."""
    args = ("simulate", "--clients", client_folders, "--trust", "local,fedavg",
            "--base", tiny_llama_gguf, *SMALL, "--json")  # fmt: skip
    whole = run(*args, "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.stderr
    out = tmp_path / "killed"
    killed = subprocess.run(
        [sys.executable, "-m", "edgefed", *map(str, args), "--out", str(out)],
        capture_output=True,
        env=os.environ | {CRASH_ENV: "aggregate-mix"},
    )
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    trained = out / "federations" / "local" / "seed-0" / "devices" / "north" / "rounds" / "0"
    adapter = next((trained / "train").glob("*.safetensors"))
    stamp = adapter.stat().st_mtime_ns

    refused = run(*args, "--out", out)
    assert_one_line_error(refused, "not empty", "--resume")
    other = run(*args[:-1], "--seq-len", 16, "--out", out, "--resume")
    assert_one_line_error(other, "settings (train)")
    assert not (out / "results.json").exists()

    resumed = run(*args, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert adapter.stat().st_mtime_ns == stamp  # round 0 was read back, not trained again
    ours, theirs = json.loads(resumed.stdout), json.loads(whole.stdout)
    assert ours["finished"] is True
    assert ours["runs"] == theirs["runs"]

    # a later session asks for another variant: round 0 is copied from the finished one
    more = run(*args[:4], "fedavg,perplexity", *args[5:], "--out", out, "--resume")
    assert more.exit_code == 0, more.stderr
    assert list(json.loads(more.stdout)["runs"]) == ["fedavg", "perplexity"]
    copied = Path(str(trained).replace("/local/", "/perplexity/")) / "train" / "metrics.json"
    assert copied.read_bytes() == (trained / "train" / "metrics.json").read_bytes()
