"""One training run in its output folder: data → splits → blocks → QLoRA → adapter + metrics.

The run folder holds, when finished:

    split.json               the split rule and every document's split (see `edgefed.train.split`)
    adapter/                 PEFT adapter folder (adapter_config.json, adapter_model.safetensors)
    adapter.gguf             the same adapter as a GGUF LoRA for llama.cpp
    optimizer.safetensors    AdamW's state, to carry into the next round (`optimizer_state=`)
    metrics.json             steps, tokens, loss curve, val perplexity, wall time, peak RSS

and while training, `checkpoint.safetensors`. metrics.json is written last: its presence means
the run is complete, and a folder that has it is never trained over. A folder with a checkpoint
is only ever continued with `resume=True`, which first checks that the data, base and settings
are the ones the checkpoint was made with.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from edgefed.adapter import (
    BASE_FINGERPRINT_KEY,
    LoraSpec,
    attach_lora,
    load_lora_state,
    read_adapter_folder,
    save_peft_adapter,
)
from edgefed.atomic import atomic_write_text
from edgefed.documents import DEFAULT_TEXT_FIELD, Documents, read_documents
from edgefed.errors import AdapterMismatchError, InputFileError, TrainingError
from edgefed.quant.gguf_file import read_base_info, resolve_base
from edgefed.train.blocks import evaluation_stream, pack_blocks, token_stream
from edgefed.train.checkpoint import load_checkpoint, load_optimizer_state, save_optimizer_state
from edgefed.train.loaded_base import LoadedBase
from edgefed.train.loop import TrainConfig, TrainProgress, TrainState, train_steps
from edgefed.train.split import (
    SPLITS,
    TRAIN,
    TRUST_VAL,
    DataSplit,
    SplitRule,
    record_split,
    split_documents,
)

logger = logging.getLogger(__name__)

METRICS_FORMAT_VERSION = 1
SPLIT_FILE = "split.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
ADAPTER_DIR = "adapter"
GGUF_ADAPTER_FILE = "adapter.gguf"
OPTIMIZER_FILE = "optimizer.safetensors"
METRICS_FILE = "metrics.json"
DEFAULT_EVAL_TOKENS = 8192
EVAL_WINDOW = 512
TRAIN_PRECISIONS = ("nf4", "fp32")


@dataclass(frozen=True)
class SplitSummary:
    """Documents and tokens per split, as reported to the user and kept in the metrics."""

    documents: dict[str, int]
    tokens: dict[str, int]
    skipped_files: int
    duplicates: int


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run put its outputs, and its metrics document."""

    out_dir: Path
    adapter_dir: Path
    gguf_adapter: Path
    metrics: dict


def peak_rss_bytes() -> int:
    """The process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _check_out_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputFileError(f"{out} is a file, not a run folder", "choose another --out")
    if (out / METRICS_FILE).exists():
        raise InputFileError(
            f"{out} already holds a finished run", "choose another --out for a new run"
        )
    has_checkpoint = (out / CHECKPOINT_FILE).exists()
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
                "resume with the same data, base and options, or start a new --out",
            )


def load_training_copy(base_path: Path, precision: str, device: str):
    """The base as PyTorch trains it: the NF4 (QLoRA) copy or the exact fp32 one."""
    from edgefed.quant.nf4 import build_training_model, load_training_model

    model = (
        load_training_model(base_path)
        if precision == "nf4"
        else build_training_model(base_path, "fp32")
    )
    return model.to(device)


def resolve_device(device: str) -> str:
    """'auto' is CUDA when torch sees a GPU, else the CPU; a named device must exist."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda") or (kind == "cuda" and not torch.cuda.is_available()):
        raise InputFileError(
            f"device '{device}' is not available here",
            "use --device auto, cpu, or cuda on a machine with a CUDA GPU",
        )
    return device


def train_adapter(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    config: TrainConfig | None = None,
    lora: LoraSpec | None = None,
    split_rule: SplitRule | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
    from_adapter: str | os.PathLike[str] | None = None,
    optimizer_state: str | os.PathLike[str] | None = None,
    resume: bool = False,
    precision: str = "nf4",
    device: str = "auto",
    threads: int | None = None,
    runtime_quant: str | None = None,
    eval_tokens: int | None = DEFAULT_EVAL_TOKENS,
    loaded: LoadedBase | None = None,
    on_status: Callable[[str], None] | None = None,
    on_data: Callable[[SplitSummary], None] | None = None,
    on_progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on the text at `data` into the run folder `out`.

    `lora` is the adapter's shape and shared init seed (default `LoraSpec()`); with
    `from_adapter` the run continues that adapter instead, and `optimizer_state` may carry the
    previous run's AdamW state. `eval_tokens` caps the trust-validation tokens scored for the
    reported perplexity (None: all). `loaded` runs over an already loaded base (its runtime and
    training copy; precision and runtime quant are then the LoadedBase's). Raises the
    EdgefedError subclasses for bad data, paths or adapters, TrainingError for a diverged loss
    or a mismatched resume, and TrainingInterrupted (after writing a checkpoint) when
    `should_stop` turns true.
    """
    import torch

    from edgefed.quant.lora_gguf import convert_lora_to_gguf
    from edgefed.runtime import DEFAULT_RUNTIME_QUANT, LlamaRuntime, runtime_copy

    started = time.perf_counter()
    status = on_status or (lambda message: None)
    config = config or TrainConfig()
    split_rule = split_rule or SplitRule()
    out_dir = Path(out)
    if precision not in TRAIN_PRECISIONS:
        raise InputFileError(
            f"unknown training precision '{precision}'", f"choose one of {TRAIN_PRECISIONS}"
        )
    _check_out_dir(out_dir, resume)
    if loaded is not None:
        if base is not None and resolve_base(base).resolve() != loaded.base_path.resolve():
            raise InputFileError(
                f"this run asks for base {base}, the loaded base is {loaded.base_path}",
                "train over a LoadedBase of the same base",
            )
        base, precision, device = loaded.base_path, loaded.precision, loaded.device
        runtime_quant = loaded.runtime_quant
    device = resolve_device(device)
    base_path = resolve_base(base)
    base_info = loaded.info if loaded is not None else read_base_info(base_path)
    spec, start_tensors = _resolve_lora(
        lora, Path(from_adapter) if from_adapter else None, base_info.fingerprint
    )
    if threads:
        torch.set_num_threads(threads)

    status("reading data")
    documents: Documents = read_documents(data, text_field=text_field)
    split: DataSplit = split_documents(documents.documents, split_rule)
    record_split(split, out_dir / SPLIT_FILE)

    eval_quant = runtime_quant or DEFAULT_RUNTIME_QUANT
    status(f"loading the base in llama.cpp ({eval_quant})")
    with (
        nullcontext(loaded.runtime)
        if loaded is not None
        else LlamaRuntime(runtime_copy(base_path, eval_quant), window=EVAL_WINDOW, threads=threads)
    ) as runtime:
        streams = {
            name: token_stream(
                split[name], lambda t: runtime.tokenize(t, add_bos=False), runtime.eos
            )
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
        run_identity = {
            "base_sha256": base_info.fingerprint,
            "data_sha256": blocks.fingerprint(),
            # how often to checkpoint does not change the result: it may differ on resume
            "config": config.as_dict() | {"checkpoint_every": None},
            "lora": spec.as_dict(),
            "precision": precision,
        }

        checkpoint_path = out_dir / CHECKPOINT_FILE
        checkpoint = load_checkpoint(checkpoint_path) if resume else None
        if checkpoint is not None:
            _check_resume(checkpoint.meta, run_identity, checkpoint_path)
            base_val = checkpoint.meta["base_val_perplexity"]
        else:
            status("scoring the base on the trust-validation split")
            base_val = runtime.perplexity(val_tokens).perplexity

        status(f"loading the {precision} training copy of the base")
        if loaded is not None:
            model, initial_state = loaded.training_model(spec)
            start_tensors = start_tensors if start_tensors is not None else initial_state
        else:
            model = attach_lora(load_training_copy(base_path, precision, device), spec)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        elif loaded is not None and model.is_gradient_checkpointing:
            model.gradient_checkpointing_disable()  # left on by an earlier run over `loaded`
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        state = TrainState()
        if checkpoint is not None:
            load_lora_state(model, checkpoint.lora)
            optimizer.load_state_dict(checkpoint.optimizer)
            torch.set_rng_state(checkpoint.rng_state)
            if checkpoint.cuda_rng_state is not None and device.startswith("cuda"):
                torch.cuda.set_rng_state(checkpoint.cuda_rng_state)
            state = TrainState(
                step=checkpoint.step,
                tokens_seen=int(checkpoint.meta["tokens_seen"]),
                seconds=float(checkpoint.meta["seconds"]),
                loss_curve=[(int(s), float(v)) for s, v in checkpoint.meta["loss_curve"]],
            )
            status(f"resuming at step {state.step}")
        else:
            if start_tensors is not None:
                load_lora_state(model, start_tensors)
            if optimizer_state is not None:
                _load_optimizer(optimizer, optimizer_state)
            torch.manual_seed(config.seed)  # seeds the CUDA generators too

        status("training")
        state = train_steps(
            model,
            optimizer,
            blocks,
            config,
            state,
            checkpoint_path=checkpoint_path,
            checkpoint_meta={"run": run_identity, "base_val_perplexity": base_val},
            on_progress=on_progress,
            should_stop=should_stop,
        )

        status("writing the adapter")
        adapter_dir = save_peft_adapter(
            model,
            out_dir / ADAPTER_DIR,
            metadata={BASE_FINGERPRINT_KEY: base_info.fingerprint},
        )
        gguf_adapter = convert_lora_to_gguf(
            adapter_dir, out_dir / GGUF_ADAPTER_FILE, base=base_path
        )
        save_optimizer_state(out_dir / OPTIMIZER_FILE, optimizer.state_dict())

        status("scoring the adapter on the trust-validation split")
        val = runtime.perplexity(val_tokens, runtime.load_adapter(gguf_adapter))

    metrics = {
        "format": METRICS_FORMAT_VERSION,
        "base": {"path": str(base_path), "sha256": base_info.fingerprint},
        "run": run_identity,
        "from_adapter": str(from_adapter) if from_adapter else None,
        "data": asdict(summary) | {"train_blocks": blocks.count},
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "train_seconds": round(state.seconds, 3),
        "train_tokens_per_second": round(state.tokens_seen / max(state.seconds, 1e-9), 2),
        "loss_curve": state.loss_curve,
        "val": {
            "split": TRUST_VAL,
            "runtime_quant": eval_quant,
            "base_perplexity": base_val,
            "perplexity": val.perplexity,
            "tokens_scored": val.tokens_scored,
        },
        "wall_seconds": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    atomic_write_text(out_dir / METRICS_FILE, json.dumps(metrics, indent=1) + "\n")
    (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    return TrainResult(out_dir, adapter_dir, gguf_adapter, metrics)


def _load_optimizer(optimizer, path: str | os.PathLike[str]) -> None:
    state = load_optimizer_state(path)
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise AdapterMismatchError(
            f"the optimizer state {path} does not fit this adapter ({exc})",
            "pass the optimizer.safetensors of a run with the same LoRA configuration",
        ) from None
