"""Training that helps: epoch schedules, stopping at the best, the guard, the chosen mix, FedSA."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPETITIVE_WORDS, run
from safetensors.torch import load_file

from edgefed.documents import document_id
from edgefed.errors import ConfigError
from edgefed.loaded_base import LoadedBase
from edgefed.sync.manifest import Schedule
from edgefed.train.loop import TrainConfig
from edgefed.train.run import train_adapter
from edgefed.train.split import TRAIN, SplitRule
from edgefed.train.stopping import PATIENCE, Stopper

# the whole suite only: `make test-fast` leaves this module out (docs/developer/index.md)
pytestmark = pytest.mark.slow

TRAIN_WORDS = REPETITIVE_WORDS
OTHER_WORDS = [
    "seven",
    "quantum",
    "harbor",
    "violet",
    "engine",
    "marble",
    "falcon",
    "copper",
    "winter",
    "ledger",
]


def _text(words: list[str], seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(12)) + f". Note {seed}. "


def write_shifted_corpus(folder: Path, train_words, held_words, n_train=12, n_held=2) -> Path:
    """Documents of `train_words` where the hash split puts them in train, and of
    `held_words` where it puts them in trust-validation or test: a device whose held-out
    text is not what it trains on."""
    rule, counts, seed = SplitRule(), {"train": 0, "trust-val": 0, "test": 0}, 0
    folder.mkdir(parents=True)
    while counts["train"] < n_train or min(counts["trust-val"], counts["test"]) < n_held:
        seed += 1
        text = _text(train_words, seed) * 6
        if rule.split_of(document_id(text)) == TRAIN and counts["train"] < n_train:
            (folder / f"t{seed}.txt").write_text(text)
            counts["train"] += 1
        text = _text(held_words, seed) * 6
        split = rule.split_of(document_id(text))
        if split != TRAIN and counts[split] < n_held:
            (folder / f"h{seed}.txt").write_text(text)
            counts[split] += 1
    return folder


def test_epoch_schedules_give_the_steps_they_claim_for_small_and_large_data():
    config = TrainConfig(batch_size=4, epochs=2.0, max_steps=200)
    assert config.total_steps(11) == 6  # 10 articles: 11 blocks, 3 steps an epoch
    assert config.total_steps(1000) == 200  # much text: the cap
    assert TrainConfig(batch_size=4, epochs=0.5).total_steps(3) == 1  # never below one
    schedule = Schedule(warmup_epochs=2.0, round_epochs=1.0, max_steps=50)
    assert (schedule.training_of(0).epochs, schedule.training_of(3).epochs) == (2.0, 1.0)
    assert schedule.training_of(3).max_steps == 50
    assert Schedule.from_dict(schedule.as_dict()) == schedule
    steps = Schedule(warmup_steps=0, round_steps=5)
    assert steps.training_of(0).steps == 5 and Schedule.from_dict(steps.as_dict()) == steps
    with pytest.raises(ConfigError, match="both in steps and in epochs"):
        Schedule(round_steps=5, round_epochs=1.0)
    with pytest.raises(ConfigError, match="trains nothing"):
        Schedule(round_epochs=0.0)


def test_stopping_keeps_the_best_points_adapter_of_a_run_trained_past_it(tmp_path, tiny_llama_gguf):
    from edgefed.adapter import load_lora_state, read_adapter_folder

    data = write_shifted_corpus(tmp_path / "data", TRAIN_WORDS, OTHER_WORDS)
    config = TrainConfig(seq_len=64, batch_size=4, learning_rate=0.3, steps=40, eval_every=2)
    with LoadedBase(tiny_llama_gguf, runtime_quant="keep") as loaded:
        result = train_adapter(data, tmp_path / "run", loaded, config=config)
        stopping = result.metrics.stopping
        curve = dict((int(step), nll) for step, nll in stopping["curve"])
        trained = {step: nll for step, nll in curve.items() if step > 0}
        best = min(trained, key=trained.get)
        # trained past its best: the last point is worse than the best, and the best is kept;
        # the run ended PATIENCE evaluations after its best, or at its last step
        last = stopping["final_step"]
        assert stopping["kept"] == "trained" and stopping["kept_step"] == best < last
        assert curve[last] > curve[best], curve
        assert result.metrics.steps == last and last in (40, best + PATIENCE * 2)
        # the written adapter is the best point's: scored again it gives the best loss
        spec, tensors, _ = read_adapter_folder(result.adapter_dir)
        model, _ = loaded.training_model(spec)
        load_lora_state(model, tensors)
        scorer = Stopper(_stop_tokens(loaded, data), 64, 2)
        again = float(scorer._score(model).mean())
        assert again == pytest.approx(stopping["best_nll"], abs=1e-3)


def _stop_tokens(loaded, data):
    from edgefed.documents import read_documents
    from edgefed.train.blocks import evaluation_stream, validation_halves
    from edgefed.train.split import TRUST_VAL, split_documents
    from edgefed.train.stopping import DEFAULT_STOP_TOKENS

    runtime = loaded.runtime
    documents = split_documents(read_documents(data).documents, SplitRule())[TRUST_VAL]
    first, _ = validation_halves(
        documents, lambda t: runtime.tokenize(t, add_bos=False), runtime.eos
    )
    return evaluation_stream(first, runtime.bos, DEFAULT_STOP_TOKENS)


def test_training_that_makes_the_model_worse_keeps_where_it_started_and_says_so(
    tmp_path, tiny_llama_gguf, caplog
):
    """A device whose adapter already fits its held-out text (the previous round's mix), then
    trained hard on other text: the run keeps its start, warns and records it."""
    good = write_shifted_corpus(tmp_path / "good", OTHER_WORDS, OTHER_WORDS)
    shifted = write_shifted_corpus(tmp_path / "shifted", TRAIN_WORDS, OTHER_WORDS)
    fast = {"seq_len": 64, "batch_size": 4}
    with LoadedBase(tiny_llama_gguf, runtime_quant="keep") as loaded:
        start = train_adapter(good, tmp_path / "start", loaded,
                              config=TrainConfig(**fast, learning_rate=0.05, steps=30))  # fmt: skip
        with caplog.at_level("WARNING"):
            result = train_adapter(
                shifted, tmp_path / "wrecked", loaded,
                config=TrainConfig(**fast, learning_rate=0.3, steps=40),
                from_adapter=start.adapter_dir,
            )  # fmt: skip
    stopping = result.metrics.stopping
    assert stopping["kept"] == "start", stopping
    assert stopping["best_nll"] > stopping["start_nll"] + 2 * stopping["standard_error"]
    assert "kept the adapter it started from" in caplog.text
    kept = load_file(result.adapter_dir / "adapter_model.safetensors")
    began = load_file(start.adapter_dir / "adapter_model.safetensors")
    assert kept.keys() == began.keys()
    assert all(torch.equal(kept[name], began[name]) for name in kept)


def test_a_round_forced_to_train_far_past_its_best_publishes_its_start_and_says_so(
    tmp_path, tiny_llama_gguf
):
    """A device whose round 0 fit its text; then its folder's training documents change to
    other text and `edgefed round` is forced to train far too hard on them: the wrecked adapter
    never leaves the device. The round keeps (and publishes) the adapter it started from, the
    previous round's mix, warns in one line and records what it kept."""
    store, workspace = tmp_path / "shared", tmp_path / "alice"
    data = write_shifted_corpus(tmp_path / "data", OTHER_WORDS, OTHER_WORDS)
    assert run("init", store, "--base", tiny_llama_gguf, "--wait", 0).exit_code == 0
    joined = run("join", store, "--device", "alice", "--data", data, "--workspace", workspace,
                 "--base", tiny_llama_gguf)  # fmt: skip
    assert joined.exit_code == 0, joined.stderr
    fast = ("--seq-len", "64", "--batch-size", "4")

    def round_(*options: str) -> subprocess.CompletedProcess:
        # a process of its own, as a user runs it: the warning reaches a real stderr
        return subprocess.run(
            [sys.executable, "-m", "edgefed", "round", "--workspace", str(workspace), *fast,
             *options],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    fitted = round_("--steps", "30", "--lr", "0.05")
    assert fitted.returncode == 0 and "made the model worse" not in fitted.stderr, fitted.stderr
    shutil.rmtree(data)
    write_shifted_corpus(data, TRAIN_WORDS, OTHER_WORDS)
    wrecked = round_("--steps", "40", "--lr", "0.3")
    assert wrecked.returncode == 0, wrecked.stderr
    warned = [line for line in wrecked.stderr.splitlines() if "made the model worse" in line]
    assert len(warned) == 1 and "kept the adapter it started from" in warned[0], wrecked.stderr

    record = json.loads((workspace / "rounds" / "1" / "round.json").read_text())
    train = record["steps"]["train"]
    assert train["kept"] == "start" and train["steps"] <= 40, train
    metrics = json.loads((workspace / "rounds" / "1" / "train" / "metrics.json").read_text())
    stopping = metrics["stopping"]
    assert stopping["best_nll"] > stopping["start_nll"] + 2 * stopping["standard_error"]
    # what round 1 kept, and sent to its peers, is round 0's mix, tensor for tensor
    kept = load_file(workspace / "rounds" / "1" / "train" / "adapter" / "adapter_model.safetensors")
    began = load_file(workspace / "rounds" / "0" / "aggregated" / "adapter_model.safetensors")
    assert kept.keys() == began.keys()
    assert all(torch.allclose(kept[n], began[n]) for n in kept)


def test_the_validation_halves_are_disjoint_and_cover_the_split():
    from edgefed.documents import Document
    from edgefed.train.blocks import validation_halves

    documents = [Document(id=str(i), text="x" * n, source="s") for i, n in enumerate((5, 8, 1))]
    first, second = validation_halves(
        documents, lambda text: np.arange(len(text), dtype=np.int32) + 10, eos=2
    )
    # each document (its tokens and EOS) is cut at its middle: the halves add up to the whole
    assert len(first) + len(second) == (5 + 1) + (8 + 1) + (1 + 1)
    assert first.tolist() == [10, 11, 12, 10, 11, 12, 13, 10]
    assert second.tolist() == [13, 14, 2, 14, 15, 16, 17, 2, 2]


@pytest.mark.parametrize("stop_at_best", [True, False])
def test_the_start_is_a_point_and_the_guard_warns_only_beyond_noise(stop_at_best):
    stopper = Stopper(np.arange(10), 4, 1, stop_at_best=stop_at_best)
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 1.0, 400)
    stopper.nlls = {"start": base, "base": base}
    stopper.curve = [[0, float(base.mean())]]
    for step, shift in ((1, 0.01), (2, 0.02)):
        stopper.curve.append([step, float((base + shift).mean())])
    noise = rng.normal(0.0, 0.5, 400)
    stopper.nlls |= {"best": base + 0.01 + noise, "final": base + 0.02 + noise}
    stopper.best_step = 1
    # 0.01 nats worse, within noise: stopping at the best keeps the start (step 0 is the best
    # point) without a warning; keeping the last step keeps the trained adapter
    within = stopper.outcome()
    assert within.kept == ("start" if stop_at_best else "trained") and not within.guarded
    if stop_at_best:
        assert "no step scored better" in within.describe()
    stopper.nlls |= {"best": base - 0.05 + noise, "final": base + noise}
    assert stopper.outcome().kept == "trained"  # better than the start: kept
    stopper.nlls |= {"best": base + 0.5 + noise, "final": base + 0.6 + noise}
    outcome = stopper.outcome()
    assert outcome.kept == "start" and outcome.guarded and "worse" in outcome.describe()


def test_fedsa_averages_a_and_keeps_b_and_graph_rows_solve_their_objective(shapes):
    from conftest import random_adapter

    from edgefed.trust.merge import merge_factors
    from edgefed.trust.schemes import TrustInputs, compute_trust, project_to_simplex

    adapters = {d: random_adapter(shapes, seed) for seed, d in enumerate(("me", "p1", "p2"))}
    row = compute_trust("fedsa", TrustInputs(own="me", adapters=adapters))
    assert row.weights == pytest.approx([1 / 3] * 3) and row.b_weights == [1.0, 0.0, 0.0]
    ordered = [adapters[d] for d in row.devices]
    mixed = merge_factors(ordered, row.weights, row.b_weights).tensors
    for name, tensor in mixed.items():
        if ".lora_B." in name:
            assert torch.equal(tensor, adapters["me"][name].float())
        else:
            mean = sum(a[name].float() for a in ordered) / 3
            assert torch.allclose(tensor, mean, atol=1e-6)

    graph = compute_trust(
        "graph", TrustInputs(own="me", adapters=adapters, train_tokens={"me": 1, "p1": 1, "p2": 2})
    )
    assert sum(graph.weights) == pytest.approx(1) and min(graph.weights) >= 0
    # KKT of min Σ w d + α‖w − p‖² on the simplex: every weighted device has the same
    # gradient d_j + 2α(w_j − p_j), no smaller than an unweighted one's
    alpha, prior = 0.8, np.array([0.25, 0.25, 0.5])
    gradient = -np.array(graph.scores) + 2 * alpha * (np.array(graph.weights) - prior)
    active = np.array(graph.weights) > 0
    assert np.ptp(gradient[active]) < 1e-9
    assert (gradient[~active] >= gradient[active].max() - 1e-9).all()
    assert project_to_simplex(np.array([0.2, 0.3, 0.5])).tolist() == pytest.approx([0.2, 0.3, 0.5])
    assert math.isclose(project_to_simplex(np.array([5.0, -1.0, 0.0])).sum(), 1.0)


def test_init_refuses_a_schedule_in_both_steps_and_epochs_and_a_device_override_keeps_the_cap(
    tmp_path, tiny_llama_gguf, train_corpus
):
    from conftest import assert_one_line_error

    from edgefed.device.train import round_training
    from edgefed.device.workspace import Workspace

    store = tmp_path / "shared"
    mixed = run("init", store, "--base", tiny_llama_gguf, "--epochs", 2, "--round-steps", 5)
    assert_one_line_error(mixed, "both in steps", "in epochs")
    assert not store.exists() or not any(store.iterdir())  # nothing half-written
    assert run("init", store, "--base", tiny_llama_gguf, "--max-steps", 7).exit_code == 0
    joined = run("join", store, "--device", "alice", "--data", train_corpus, "--workspace",
                 tmp_path / "alice", "--base", tiny_llama_gguf)  # fmt: skip
    assert joined.exit_code == 0, joined.stderr
    workspace = Workspace.open(tmp_path / "alice")
    schedule = round_training(workspace, 1, TrainConfig())
    assert (schedule.epochs, schedule.max_steps) == (1.0, 7)
    # `round --epochs 3`: the device's epochs, the federation's cap; `--steps 50`: exactly 50
    assert round_training(workspace, 1, TrainConfig(epochs=3.0)).max_steps == 7
    exact = round_training(workspace, 1, TrainConfig(steps=50))
    assert exact.total_steps(10_000) == 50
