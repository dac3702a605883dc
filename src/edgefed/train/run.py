"""One training run in its output folder: data → splits → blocks → QLoRA → adapter + metrics.

The folder's layout is `RunFolder`'s. metrics.json is written last: its presence means the run
is complete, and a folder that has it is never trained over. A folder with a checkpoint is
only ever continued with `resume=True`, which first checks that the data, base and settings
are the ones the checkpoint was made with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgefed.adapter import (
    BASE_FINGERPRINT_KEY,
    LoraSpec,
    load_lora_state,
    read_adapter_folder,
    save_peft_adapter,
)
from edgefed.atomic import remove_leftovers
from edgefed.documents import DEFAULT_TEXT_FIELD, Documents, read_documents
from edgefed.errors import AdapterMismatchError, InputFileError, TrainingError
from edgefed.loaded_base import LoadedBase
from edgefed.train.blocks import (
    evaluation_stream,
    pack_blocks,
    token_stream,
    validation_halves,
)
from edgefed.train.checkpoint import load_checkpoint, load_optimizer_state, save_optimizer_state
from edgefed.train.loop import TrainConfig, TrainProgress, TrainState, train_steps
from edgefed.train.metrics import TrainMetrics, ValScore
from edgefed.train.run_folder import RunFolder
from edgefed.train.split import (
    SPLITS,
    TRAIN,
    TRUST_VAL,
    DataSplit,
    SplitRule,
    record_split,
    recorded_splits,
    split_documents,
)
from edgefed.train.stopping import DEFAULT_STOP_TOKENS, TRAINED, Stopper, interval

logger = logging.getLogger(__name__)

DEFAULT_VAL_TOKENS = 8192  # trust-validation tokens a run (and a trust row) scores


@dataclass(frozen=True)
class SplitSummary:
    """Documents and tokens per split, as reported to the user and kept in the metrics."""

    documents: dict[str, int]
    tokens: dict[str, int]
    skipped_files: tuple[str, ...]  # not UTF-8 text, so not read
    duplicates: int


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run put its outputs, and its metrics document."""

    out_dir: Path
    adapter_dir: Path
    gguf_adapter: Path
    metrics: TrainMetrics


def peak_rss_bytes() -> int:
    """The process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _check_out_dir(run: RunFolder, resume: bool) -> None:
    out = run.root
    if out.exists() and not out.is_dir():
        raise InputFileError(f"{out} is a file, not a run folder", "choose another --out")
    if run.is_finished():
        raise InputFileError(
            f"{out} already holds a finished run", "choose another --out for a new run"
        )
    has_checkpoint = run.checkpoint.exists()
    if resume and not has_checkpoint:
        raise InputFileError(
            f"{out} has no checkpoint to resume", "drop --resume to start a new run there"
        )
    if not resume and has_checkpoint:
        raise InputFileError(
            f"{out} holds an unfinished run's checkpoint",
            "add --resume to continue it, or choose another --out",
        )


def _resolve_lora(
    lora: LoraSpec | None, from_adapter: Path | None, base_fingerprint: str
) -> tuple[LoraSpec, dict | None]:
    """The run's LoRA spec and starting tensors: a fresh init, or an existing adapter's."""
    if from_adapter is None:
        return lora or LoraSpec(), None
    spec, tensors, trained_on = read_adapter_folder(from_adapter)
    if trained_on is not None and trained_on != base_fingerprint:
        raise AdapterMismatchError(
            f"{from_adapter} was trained on base {trained_on[:12]}, not on this base "
            f"({base_fingerprint[:12]})",
            "continue it with the --base it was trained on",
        )
    if lora is not None and (lora.rank, lora.alpha, lora.targets) != (
        spec.rank,
        spec.alpha,
        spec.targets,
    ):
        raise AdapterMismatchError(
            f"{from_adapter} has rank {spec.rank}, alpha {spec.alpha:g}, targets "
            f"{','.join(spec.targets)}; the options ask for rank {lora.rank}, alpha "
            f"{lora.alpha:g}, targets {','.join(lora.targets)}",
            "drop --rank/--alpha/--targets when continuing an adapter with --from",
        )
    dropout = lora.dropout if lora is not None else spec.dropout
    return LoraSpec(spec.rank, spec.alpha, dropout, spec.targets), tensors


def _check_resume(checkpoint_meta: dict, run: dict, path: Path) -> None:
    recorded = checkpoint_meta.get("run", {})
    for key, value in run.items():
        if recorded.get(key) != value:
            raise TrainingError(
                f"{path} was made with a different {key} "
                f"({json.dumps(recorded.get(key))} there, {json.dumps(value)} now)",
                f"resume with the same data, base and options, or delete {path} to train "
                "from the start",
            )


def train_adapter(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    loaded: LoadedBase,
    *,
    config: TrainConfig | None = None,
    lora: LoraSpec | None = None,
    split_rule: SplitRule | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
    from_adapter: str | os.PathLike[str] | None = None,
    optimizer_state: str | os.PathLike[str] | None = None,
    resume: bool = False,
    eval_tokens: int | None = DEFAULT_VAL_TOKENS,
    on_status: Callable[[str], None] | None = None,
    on_data: Callable[[SplitSummary], None] | None = None,
    on_progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on the text at `data` into the run folder `out`, over `loaded`.

    `lora` is the adapter's shape and shared init seed (default `LoraSpec()`); with
    `from_adapter` the run continues that adapter instead, and `optimizer_state` may carry the
    previous run's AdamW state. `eval_tokens` caps the trust-validation tokens scored for the
    reported perplexity (None: all). Raises the EdgefedError subclasses for bad data, paths or
    adapters, TrainingError for a diverged loss or a mismatched resume, and TrainingInterrupted
    (after writing a checkpoint) when `should_stop` turns true.
    """
    import torch

    from edgefed.quant.lora_gguf import convert_lora_to_gguf

    started = time.perf_counter()
    status = on_status or (lambda message: None)
    config = config or TrainConfig()
    split_rule = split_rule or SplitRule()
    run = RunFolder(Path(out))
    _check_out_dir(run, resume)
    # what a run killed mid-write left (a half-written adapter folder, checkpoint, ...):
    # nothing else writes into a run folder while its run goes on
    remove_leftovers(run.root)
    loaded.device  # noqa: B018 - an unavailable device is refused before any work
    loaded.check_trainable()
    spec, start_tensors = _resolve_lora(
        lora, Path(from_adapter) if from_adapter else None, loaded.fingerprint
    )
    spec = spec.for_architecture(loaded.info.architecture)

    status("reading data")
    documents: Documents = read_documents(data, text_field=text_field)
    # a document recorded in the folder's split.json (a resumed run, or a round seeded with the
    # previous round's record) keeps its recorded split
    split: DataSplit = split_documents(documents.documents, split_rule, recorded_splits(run.split))
    record_split(split, run.split)

    status(f"loading the base in llama.cpp ({loaded.runtime_quant})")
    runtime = loaded.runtime
    streams = {
        name: token_stream(split[name], lambda t: runtime.tokenize(t, add_bos=False), runtime.eos)
        for name in SPLITS
    }
    summary = SplitSummary(
        documents={name: len(split[name]) for name in SPLITS},
        tokens={name: len(streams[name]) for name in SPLITS},
        skipped_files=documents.skipped,
        duplicates=documents.duplicates,
    )
    if on_data is not None:
        on_data(summary)
    blocks = pack_blocks(streams[TRAIN], config.seq_len, runtime.bos)
    val_tokens = evaluation_stream(streams[TRUST_VAL], runtime.bos, eval_tokens)
    trust_half, _ = validation_halves(
        split[TRUST_VAL], lambda t: runtime.tokenize(t, add_bos=False), runtime.eos
    )
    stop_tokens = evaluation_stream(
        trust_half if len(trust_half) >= 2 else streams[TRUST_VAL],
        runtime.bos,
        DEFAULT_STOP_TOKENS,
    )
    total_steps = config.total_steps(blocks.count)
    run_identity = {
        "base_sha256": loaded.fingerprint,
        "data_sha256": blocks.fingerprint(),
        # the stopper's saved scores are per token of these: a document moved into the
        # trust-validation split since the checkpoint would compare different tokens
        "stop_tokens_sha256": hashlib.sha256(np.asarray(stop_tokens, np.int32)).hexdigest(),
        # how often to checkpoint, or whether activations are recomputed, does not change the
        # result: either may differ on resume
        "config": config.as_dict() | {"checkpoint_every": None, "gradient_checkpointing": None},
        "lora": spec.as_dict(),
        "precision": loaded.precision,
    }

    checkpoint = load_checkpoint(run.checkpoint) if resume else None
    if checkpoint is not None:
        _check_resume(checkpoint.meta, run_identity, run.checkpoint)
        base_val = checkpoint.meta["base_val_perplexity"]
    else:
        status("scoring the base on the trust-validation split")
        base_val = runtime.perplexity(val_tokens).perplexity

    loaded.free_runtime_for_training()  # from here to the adapter's score only PyTorch works
    status(f"loading the {loaded.precision} training copy of the base")
    model, initial_state = loaded.training_model(spec)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable()  # non-reentrant: the LoRA-only gradients flow
    elif model.is_activation_checkpointing:
        model.activation_checkpointing_disable()  # left on by an earlier run over `loaded`
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    state = TrainState()
    stopper = Stopper(
        stop_tokens,
        config.seq_len,
        interval(total_steps, config.eval_every),
        batch_size=config.batch_size,
        stop_at_best=config.stop_at_best,
    )
    if checkpoint is not None:
        load_lora_state(model, checkpoint.lora)
        optimizer.load_state_dict(checkpoint.optimizer)
        torch.set_rng_state(checkpoint.rng_state)
        if checkpoint.cuda_rng_state is not None and loaded.device.startswith("cuda"):
            torch.cuda.set_rng_state(checkpoint.cuda_rng_state)
        state = TrainState(
            step=checkpoint.step,
            tokens_seen=int(checkpoint.meta["tokens_seen"]),
            seconds=float(checkpoint.meta["seconds"]),
            loss_curve=[(int(s), float(v)) for s, v in checkpoint.meta["loss_curve"]],
        )
        stopper.restore(checkpoint.meta["stopper"], checkpoint.extra or {})
        status(f"resuming at step {state.step}")
    else:
        load_lora_state(model, start_tensors if start_tensors is not None else initial_state)
        if optimizer_state is not None:
            _load_optimizer(optimizer, optimizer_state)
        torch.manual_seed(config.seed)  # seeds the CUDA generators too
        status("scoring the starting point on the validation tokens it stops by")
        stopper.start(model, _without_b(start_tensors) if start_tensors is not None else None)

    status("training")
    state = train_steps(
        model,
        optimizer,
        blocks,
        config,
        state,
        checkpoint_path=run.checkpoint,
        checkpoint_meta={"run": run_identity, "base_val_perplexity": base_val},
        on_progress=on_progress,
        should_stop=should_stop,
        stopper=stopper,
    )
    stopping = stopper.outcome()
    if stopping.kept == TRAINED:
        load_lora_state(model, stopper.best_state)
    else:
        start = start_tensors if start_tensors is not None else initial_state
        load_lora_state(model, start if stopping.kept == "start" else _without_b(start))
    if stopping.guarded:
        logger.warning(stopping.describe())
    else:
        status(stopping.describe())

    status("writing the adapter")
    adapter_dir = save_peft_adapter(
        model, run.adapter, metadata={BASE_FINGERPRINT_KEY: loaded.fingerprint}
    )
    gguf_adapter = convert_lora_to_gguf(adapter_dir, run.gguf_adapter, base=loaded.base_path)
    if not stopping.fell_back:
        save_optimizer_state(run.optimizer, optimizer.state_dict())
    elif optimizer_state is not None:  # the moments of a discarded trajectory would steer the
        save_optimizer_state(run.optimizer, load_optimizer_state(optimizer_state))  # next run

    del model, optimizer, trainable, stopper  # nothing of the training copy outlives it
    loaded.free_training_copy()
    status("scoring the adapter on the trust-validation split")
    val = loaded.runtime.perplexity(val_tokens, loaded.load_file(gguf_adapter))

    metrics = TrainMetrics(
        base={"path": str(loaded.base_path), "sha256": loaded.fingerprint},
        run=run_identity,
        from_adapter=str(from_adapter) if from_adapter else None,
        data=asdict(summary) | {"train_blocks": blocks.count},
        steps=state.step,
        tokens_seen=state.tokens_seen,
        train_seconds=round(state.seconds, 3),
        train_tokens_per_second=round(state.tokens_seen / max(state.seconds, 1e-9), 2),
        loss_curve=state.loss_curve,
        val=ValScore(
            split=TRUST_VAL,
            runtime_quant=loaded.runtime_quant,
            base_perplexity=base_val,
            perplexity=val.perplexity,
            tokens_scored=val.tokens_scored,
        ),
        wall_seconds=round(time.perf_counter() - started, 3),
        peak_rss_bytes=peak_rss_bytes(),
        stopping=stopping.as_dict(),
    )
    metrics.write(run.metrics)
    run.checkpoint.unlink(missing_ok=True)
    return TrainResult(run.root, adapter_dir, gguf_adapter, metrics)


def _without_b(tensors: dict) -> dict:
    """The same LoRA tensors with every B zeroed: the bare base's adapter (ΔW = 0)."""
    return {name: t.clone().zero_() if ".lora_B." in name else t for name, t in tensors.items()}


def _load_optimizer(optimizer, path: str | os.PathLike[str]) -> None:
    state = load_optimizer_state(path)
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise AdapterMismatchError(
            f"the optimizer state {path} does not fit this adapter ({exc})",
            "pass the optimizer.safetensors of a run with the same LoRA configuration",
        ) from exc
