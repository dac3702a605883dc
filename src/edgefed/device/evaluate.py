"""The evaluate step: the round judged on this device's own test split.

Scores the base, the device's own adapter of the round before mixing (`local`; in round 0,
with nothing mixed in yet, a purely local adapter) and the mix it carries on with
(`aggregated`), and writes evaluation.json (`EvaluationRecord`). The test split is never the
trust-validation split that picked the weights (the paper's code reported on the text it had
tuned on).
"""

from __future__ import annotations

from collections.abc import Callable

from edgefed.device.records import EvaluationRecord
from edgefed.device.split_text import device_split_tokens
from edgefed.device.workspace import Workspace
from edgefed.errors import InputFileError
from edgefed.loaded_base import LoadedBase
from edgefed.scoring import ScoreProgress
from edgefed.train.split import TEST

DEFAULT_TEST_TOKENS = 8192


def evaluate_round(
    workspace: Workspace,
    round_number: int,
    loaded: LoadedBase,
    *,
    test_tokens: int | None = DEFAULT_TEST_TOKENS,
    on_progress: Callable[[ScoreProgress], None] | None = None,
) -> EvaluationRecord:
    """Score base, local and aggregated adapters of the round on the test split; record it.

    `on_progress` gets the scoring's progress. Raises InputFileError when the round has not
    been trained and aggregated yet.
    """
    from edgefed.runtime.llama import ScoreJob

    workspace.check_base(loaded)
    run = workspace.train_run(round_number)
    models = {"local": run.gguf_adapter, "aggregated": workspace.aggregated_gguf(round_number)}
    trust = workspace.read_trust(round_number)
    if trust is None or not all(p.is_file() for p in models.values()):
        raise InputFileError(
            f"round {round_number} of {workspace.device} is not trained and aggregated yet",
            "run `edgefed round` to finish it",
        )
    # a device that mixed no peer has its own adapter as its mix, weight 1: scored once
    alone = trust.devices == [workspace.device]
    if alone:
        del models["aggregated"]
    runtime = loaded.runtime
    tokens = device_split_tokens(workspace, run.root, runtime, TEST, test_tokens)
    jobs = [ScoreJob(tokens, None, "base")] + [
        ScoreJob(tokens, loaded.load_file(path), name) for name, path in models.items()
    ]
    scored = runtime.perplexities(jobs, task="test split", on_progress=on_progress)
    results = {job.label: result for job, result in zip(jobs, scored, strict=True)}
    if alone:
        results["aggregated"] = results["local"]
    record = EvaluationRecord(
        round=round_number,
        device=workspace.device,
        split=TEST,
        tokens_scored=results["base"].tokens_scored,
        runtime_quant=loaded.runtime_quant,
        models={
            name: {"perplexity": r.perplexity, "mean_nll": r.mean_nll}
            for name, r in results.items()
        },
        trust=trust.row(),
    )
    record.write(workspace.evaluation_path(round_number))
    return record
