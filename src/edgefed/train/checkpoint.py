"""Training checkpoints: one safetensors file, replaced atomically, never unpickled.

A checkpoint holds everything that decides the rest of a run: the LoRA tensors, AdamW's moment
estimates, the torch RNG state (LoRA dropout draws from it) and, in the JSON metadata, the step,
the run's configuration, the training data's fingerprint and the loss curve so far. The data
order needs no state of its own: it is a pure function of (seed, epoch). So a resumed run takes
exactly the steps the uninterrupted run would have taken.

One file rather than a folder, because replacing one file is atomic on every file system edgefed
runs on; at any instant the previous or the new checkpoint is complete on disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgefed.atomic import atomic_path
from edgefed.errors import ModelFormatError

CHECKPOINT_FORMAT_VERSION = 1
_META_KEY = "edgefed.checkpoint"
_LORA, _OPTIMIZER, _RNG, _CUDA_RNG = "lora.", "optimizer.", "rng.torch", "rng.cuda"
_EXTRA = "extra."  # tensors of the run's other state (the stopper's best point and scores)


@dataclass(frozen=True)
class Checkpoint:
    """A run's state after `step` optimizer steps."""

    step: int
    lora: dict  # PEFT tensor name -> tensor
    optimizer: dict  # torch optimizer state_dict
    rng_state: object  # torch ByteTensor
    meta: dict  # config, data fingerprint, loss curve, tokens seen, seconds
    cuda_rng_state: object | None = None  # when training on a GPU, its dropout RNG too
    extra: dict | None = None  # name -> tensor: the stopper's state (`Stopper.state`)


def optimizer_tensors(state_dict: Mapping) -> tuple[dict, list]:
    """Split an optimizer state_dict into flat tensors and JSON-able parameter groups."""
    import torch

    tensors = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
        for group in state_dict["param_groups"]
    ]
    return tensors, groups


def optimizer_state_dict(tensors: Mapping, groups: list) -> dict:
    """The inverse of `optimizer_tensors`."""
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    param_groups = [
        {k: (tuple(v) if k == "betas" else v) for k, v in group.items()} for group in groups
    ]
    return {"state": state, "param_groups": param_groups}


def save_checkpoint(path: str | os.PathLike[str], checkpoint: Checkpoint) -> None:
    """Write `checkpoint` to `path` atomically."""
    from safetensors.torch import save_file

    tensors, groups = optimizer_tensors(checkpoint.optimizer)
    flat = {f"{_LORA}{k}": v.contiguous() for k, v in checkpoint.lora.items()}
    flat |= {f"{_OPTIMIZER}{k}": v for k, v in tensors.items()}
    flat[_RNG] = checkpoint.rng_state
    if checkpoint.cuda_rng_state is not None:
        flat[_CUDA_RNG] = checkpoint.cuda_rng_state
    flat |= {f"{_EXTRA}{k}": v.contiguous() for k, v in (checkpoint.extra or {}).items()}
    meta = checkpoint.meta | {
        "format": CHECKPOINT_FORMAT_VERSION,
        "step": checkpoint.step,
        "optimizer_groups": groups,
    }
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={_META_KEY: json.dumps(meta)})


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint; raise ModelFormatError when it is not one of ours or is damaged."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(_META_KEY)
            flat = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        meta = json.loads(raw) if raw else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFormatError(
            f"checkpoint {path} is damaged ({exc})", "delete it and train again without --resume"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT_VERSION:
        raise ModelFormatError(
            f"{path} is not an edgefed checkpoint of format {CHECKPOINT_FORMAT_VERSION}",
            "train again without --resume in a new output folder",
        )
    lora = {k.removeprefix(_LORA): v for k, v in flat.items() if k.startswith(_LORA)}
    tensors = {k.removeprefix(_OPTIMIZER): v for k, v in flat.items() if k.startswith(_OPTIMIZER)}
    groups = meta.pop("optimizer_groups")
    return Checkpoint(
        step=int(meta.pop("step")),
        lora=lora,
        optimizer=optimizer_state_dict(tensors, groups),
        rng_state=flat[_RNG],
        meta=meta,
        cuda_rng_state=flat.get(_CUDA_RNG),
        extra={k.removeprefix(_EXTRA): v for k, v in flat.items() if k.startswith(_EXTRA)},
    )


def save_optimizer_state(path: str | os.PathLike[str], state_dict: Mapping) -> None:
    """The optimizer state alone, kept on the device to carry AdamW's moments into next round."""
    from safetensors.torch import save_file

    tensors, groups = optimizer_tensors(state_dict)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"optimizer_groups": json.dumps(groups)})


def load_optimizer_state(path: str | os.PathLike[str]) -> dict:
    """Read what `save_optimizer_state` wrote; ModelFormatError when it is not that."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            groups = json.loads((handle.metadata() or {})["optimizer_groups"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise ModelFormatError(
            f"{path} is not an edgefed optimizer state ({exc})",
            "pass the optimizer.safetensors that `edgefed train` wrote",
        ) from exc
    return optimizer_state_dict(tensors, groups)
