"""A device's round, judged on its own test split: the base, its own adapter, and the mix.

The test split is never the trust-validation split that picked the weights (the paper's code
reported on the text it had tuned on). Written to rounds/<r>/evaluation.json:

    {"round", "split": "test", "tokens_scored", "runtime_quant",
     "models": {"base": {"perplexity", "mean_nll"}, "local": {...}, "aggregated": {...}},
     "trust": {"scheme", "devices", "weights"}}

`local` is the adapter this device trained in the round, before mixing (in round 0, with
nothing mixed in yet, a purely local adapter); `aggregated` is what it carries on with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext

from edgefed.atomic import atomic_write_text
from edgefed.device.aggregate import AGGREGATED_GGUF, TRUST_FILE
from edgefed.device.split_text import device_split_tokens
from edgefed.device.workspace import Workspace
from edgefed.errors import InputFileError
from edgefed.runtime.llama import ScoreJob
from edgefed.scoring import ScoreProgress
from edgefed.train.loaded_base import LoadedBase
from edgefed.train.run import GGUF_ADAPTER_FILE
from edgefed.train.split import TEST

EVALUATION_FILE = "evaluation.json"
TRAIN_DIR = "train"
DEFAULT_TEST_TOKENS = 8192


def read_evaluation(workspace: Workspace, round_number: int) -> dict | None:
    path = workspace.round_dir(round_number) / EVALUATION_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def evaluate_round(
    workspace: Workspace,
    round_number: int,
    *,
    runtime_quant: str | None = None,
    test_tokens: int | None = DEFAULT_TEST_TOKENS,
    loaded: LoadedBase | None = None,
    threads: int | None = None,
    on_progress: Callable[[ScoreProgress], None] | None = None,
) -> dict:
    """Score base, local and aggregated adapters of the round on the test split; record it.

    `loaded` scores over an already loaded base; `on_progress` gets the scoring's progress.
    Raises InputFileError when the round has not been trained and aggregated yet.
    """
    round_dir = workspace.round_dir(round_number)
    run_dir = round_dir / TRAIN_DIR
    models = {"local": run_dir / GGUF_ADAPTER_FILE, "aggregated": round_dir / AGGREGATED_GGUF}
    trust_path = round_dir / TRUST_FILE
    if not trust_path.is_file() or not all(p.is_file() for p in models.values()):
        raise InputFileError(
            f"round {round_number} of {workspace.device} is not trained and aggregated yet",
            "run `edgefed round` to finish it",
        )
    trust = json.loads(trust_path.read_text(encoding="utf-8"))
    with (
        nullcontext(loaded)
        if loaded is not None
        else LoadedBase(workspace.config["base"], runtime_quant=runtime_quant, threads=threads)
    ) as loaded:
        runtime, quant = loaded.runtime, loaded.runtime_quant
        tokens = device_split_tokens(workspace, run_dir, runtime, TEST, test_tokens)
        jobs = [ScoreJob(tokens, None, "base")] + [
            ScoreJob(tokens, loaded.load_file(path), name) for name, path in models.items()
        ]
        scored = runtime.perplexities(jobs, task="test split", on_progress=on_progress)
        results = {job.label: result for job, result in zip(jobs, scored, strict=True)}
    record = {
        "round": round_number,
        "device": workspace.device,
        "split": TEST,
        "tokens_scored": results["base"].tokens_scored,
        "runtime_quant": quant,
        "models": {
            name: {"perplexity": r.perplexity, "mean_nll": r.mean_nll}
            for name, r in results.items()
        },
        "trust": {k: trust[k] for k in ("scheme", "devices", "weights")},
    }
    atomic_write_text(round_dir / EVALUATION_FILE, json.dumps(record, indent=1) + "\n")
    return record
