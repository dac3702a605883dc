"""Which model a user means: a device's personalised mix, its own adapter, the bare base, or a
file, as `generate`, `chat` and `export` take it.

In a workspace the words name the device's adapters of a round: `aggregated` (the personalised
mix it carries on with, the default: `rounds/<r>/aggregated.gguf`), `local` (its own adapter of
the round, before mixing) and `base`; the round is the latest that has the adapter unless one is
given. Outside a workspace a GGUF LoRA file, a PEFT adapter folder or an `edgefed train` run
folder works with any base (`--base`; by default the device's, where one workspace is the
default, else the embedded one; `base` means that base bare). An adapter records
the base it was trained on (edgefed writes its sha256 into both formats), so one of another base is
refused here, before llama.cpp would run it silently over a base of the same shapes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from edgefed.adapter import (
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    read_adapter_folder,
)
from edgefed.device.workspace import (
    WORKSPACE_VARIABLE,
    Workspace,
    find_workspace,
    known_workspaces,
)
from edgefed.errors import ConfigError, InputFileError
from edgefed.home import cache_dir
from edgefed.quant.gguf_file import read_base_info, resolve_base, sha256_file
from edgefed.quant.lora_gguf import check_trained_on, convert_lora_to_gguf, open_lora_gguf

AGGREGATED, LOCAL, BASE = "aggregated", "local", "base"
CHOICES = (AGGREGATED, LOCAL, BASE)


@dataclass(frozen=True)
class ChosenModel:
    """A base and the adapter over it (None: the bare base), in both forms where both exist."""

    label: str  # what the user reads: "aggregated, round 3", "base", a file name
    base: Path
    adapter: Path | None = None  # GGUF LoRA, for llama.cpp
    peft: Path | None = None  # the same adapter's PEFT folder, for transformers
    round: int | None = None
    device: str | None = None

    def as_dict(self) -> dict:
        return {
            "model": self.label,
            "base": str(self.base),
            "adapter": str(self.adapter) if self.adapter else None,
            "round": self.round,
            "device": self.device,
        }


def choose_model(
    adapter: str | os.PathLike[str] | None = AGGREGATED,
    *,
    round_number: int | None = None,
    workspace: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
) -> ChosenModel:
    """The model `adapter` names (see the module docstring); None means `aggregated`.

    Raises InputFileError for a workspace, round or file that does not hold the adapter,
    AdapterMismatchError for an adapter of another base, ConfigError for contradicting options.
    """
    choice = AGGREGATED if adapter is None else adapter
    named = isinstance(choice, str) and choice in CHOICES
    if named and choice != BASE:
        ws = _workspace(workspace)
        if base is not None and resolve_base(base).resolve() != Path(ws.config.base).resolve():
            raise ConfigError(
                f"--base {base} is not the base of workspace {ws.root}",
                "leave --base out: a device's adapters run over its own base",
            )
        return _device_adapter(ws, choice, round_number)
    if round_number is not None:
        raise ConfigError(
            "--round picks a device's adapter", "use it with --adapter aggregated or local"
        )
    ws = Workspace.open(workspace) if workspace is not None else None
    if ws is not None and base is not None:
        raise ConfigError("--base and --workspace both name a base", "give one of them")
    if ws is None and base is None:
        ws = _default_workspace()  # the device's own base, not the embedded one
    base_path = Path(ws.config.base) if ws is not None else resolve_base(base)
    if named:
        return ChosenModel(label=BASE, base=base_path)
    return _adapter_file(Path(choice), base_path)


def _default_workspace() -> Workspace | None:
    """The workspace a command without --workspace means ($EDGEFED_WORKSPACE, or the only one
    this machine knows), whose base `--adapter base` or a file then runs over; None where
    there is none or several (a machine that simulated knows many): the embedded base."""
    known = known_workspaces()
    if os.environ.get(WORKSPACE_VARIABLE) or len(known) == 1:
        return find_workspace(None)
    return None


def _workspace(root: str | os.PathLike[str] | None) -> Workspace:
    if root is None and not os.environ.get(WORKSPACE_VARIABLE) and not known_workspaces():
        raise InputFileError(
            "no device workspace on this machine, so no device's adapter to use",
            "join a federation with `edgefed join`, pass --workspace DIR, or give "
            "--adapter base or --adapter FILE to use a base without a device",
        )
    return find_workspace(root)


def _device_adapter(ws: Workspace, choice: str, round_number: int | None) -> ChosenModel:
    """The device's `choice` adapter of `round_number` (default: the latest round with one)."""

    def files(r: int) -> tuple[Path, Path]:
        if choice == AGGREGATED:
            return ws.aggregated_gguf(r), ws.aggregated_dir(r)
        run = ws.train_run(r)
        return run.gguf_adapter, run.adapter

    having = [r for r in ws.rounds() if files(r)[0].is_file()]
    if round_number is None:
        if not having:
            raise InputFileError(
                f"{ws.device} has no {choice} adapter yet",
                "run `edgefed round` first, or use --adapter base",
            )
        round_number = having[-1]
    elif round_number not in having:
        rounds = ", ".join(map(str, having)) or "none"
        raise InputFileError(
            f"round {round_number} of {ws.device} has no {choice} adapter "
            f"(rounds with one: {rounds})",
            "finish it with `edgefed round`, or choose another --round",
        )
    gguf, peft = files(round_number)
    return ChosenModel(
        label=f"{choice}, round {round_number}",
        base=Path(ws.config.base),
        adapter=gguf,
        peft=peft if (peft / PEFT_CONFIG_FILE).is_file() else None,
        round=round_number,
        device=ws.device,
    )


def _adapter_file(path: Path, base: Path) -> ChosenModel:
    """A GGUF LoRA file, a PEFT adapter folder or a training run folder, over `base`."""
    if not path.exists():
        raise InputFileError(
            f"{path} does not exist",
            f"give an adapter file or folder, or one of {', '.join(CHOICES)}",
        )
    if path.is_dir():
        run_gguf = path / "adapter.gguf"
        peft = path / "adapter" if (path / "adapter" / PEFT_CONFIG_FILE).is_file() else path
        _, _, trained_on = read_adapter_folder(peft)
        check_trained_on(path, trained_on, read_base_info(base))
        gguf = run_gguf if run_gguf.is_file() else _converted(peft, base)
        return ChosenModel(label=path.name, base=base, adapter=gguf, peft=peft)
    _, trained_on = open_lora_gguf(path)
    check_trained_on(path, trained_on, read_base_info(base))
    return ChosenModel(label=path.name, base=base, adapter=path)


def _converted(peft: Path, base: Path) -> Path:
    """The PEFT folder as a GGUF LoRA for `base`, converted once and cached."""
    # the config's alpha and patterns go into the GGUF's scales as well as the weights
    weights = hashlib.sha256(
        (peft / PEFT_CONFIG_FILE).read_bytes() + sha256_file(peft / PEFT_WEIGHTS_FILE).encode()
    ).hexdigest()[:16]
    target = cache_dir("adapters") / f"{weights}-{read_base_info(base).fingerprint[:16]}.gguf"
    if not target.is_file():  # written atomically: a cached file is always whole
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_lora_to_gguf(peft, target, base=base)
    return target
