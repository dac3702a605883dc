"""`edgefed simulate` on a tiny model: every scheme, real stores, the report's files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run, write_repetitive_corpus

SCHEMES = "local,fedavg,weights,prediction,perplexity"
SMALL = ("--rounds", 2, "--warmup-steps", 4, "--round-steps", 2, "--seq-len", 32,
         "--batch-size", 2, "--lr", 2e-3, "--test-tokens", 256,
         "--runtime-quant", "keep")  # fmt: skip


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
        "has 1 client sub-folder(s)": ["--clients", single],
        "client small has 2 document(s)": ["--clients", tiny],
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
