"""`edgefed simulate` on a tiny model: every scheme, real stores, the report's files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import write_repetitive_corpus
from test_cli import run

SCHEMES = "local,fedavg,weights,prediction,perplexity"
SMALL = ("--rounds", 2, "--warmup-steps", 4, "--round-steps", 2, "--seq-len", 32,
         "--batch-size", 2, "--test-tokens", 256, "--runtime-quant", "keep")  # fmt: skip


@pytest.fixture(scope="module")
def client_folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clients")
    for index, name in enumerate(("north", "south", "east")):
        write_repetitive_corpus(root / name, 30, start=100 * index)
    return root


def test_a_tiny_simulation_of_every_scheme_writes_finite_results_and_the_report(
    tmp_path, client_folders, tiny_llama_gguf
):
    out = tmp_path / "sim"
    done = run("simulate", "--clients", client_folders, "--trust", SCHEMES, "--out", out,
               "--base", tiny_llama_gguf, *SMALL, "--json")  # fmt: skip
    assert done.exit_code == 0, done.stderr
    results = json.loads(done.stdout)
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
