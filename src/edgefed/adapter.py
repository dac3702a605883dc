"""The LoRA adapter a federation shares: its shape (`LoraSpec`) and its one initial state.

Every device of a federation must start from the *same* adapter, or their adapters are not
comparable (weight-similarity trust) nor meaningfully averageable (the factor-wise mix). The
paper's public code drew A afresh on every device; here A is drawn from the federation's shared
`init_seed` and B is zero, so the initial ΔW = B·A is zero and identical everywhere.

Each A matrix gets its own generator seeded from (init_seed, module name), so the draw does not
depend on the order in which PEFT happens to visit modules, nor on anything else that touched
the global torch RNG. The distribution is PEFT's default (kaiming-uniform with a=√5, i.e.
U(-1/√fan_in, 1/√fan_in)).

torch and peft are imported on demand: `import edgefed.adapter` stays light.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgefed.atomic import atomic_dir
from edgefed.errors import AdapterMismatchError, ConfigError, InputFileError, ModelFormatError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
BASE_FINGERPRINT_KEY = "edgefed.base_sha256"  # safetensors metadata: the base it was trained on
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSpec:
    """Rank, scaling, dropout and target modules of a LoRA adapter, plus its shared init seed."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"LoRA rank {self.rank} is below 1", "give a --rank of 1 or more")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                f"LoRA dropout {self.dropout} is not in [0, 1)", "give a --dropout in [0, 1)"
            )
        if not self.targets:
            raise ConfigError(
                "LoRA has no target module", "name modules with --targets, e.g. q_proj,v_proj"
            )
        # PEFT stores targets as a set: keep one canonical order so equal specs compare equal
        object.__setattr__(self, "targets", tuple(sorted(set(self.targets))))

    def for_architecture(self, gguf_architecture: str) -> LoraSpec:
        """This spec on a base of that family: the default targets, every projection of a
        Llama block, become every projection of the family's blocks (Phi-3 fuses q/k/v into
        qkv_proj and gate/up into gate_up_proj); targets the user chose stay as they are."""
        from edgefed.quant.architectures import architecture

        if self.targets != tuple(sorted(DEFAULT_TARGETS)):
            return self
        return replace(self, targets=architecture(gguf_architecture).lora_targets)

    def as_dict(self) -> dict:
        return asdict(self) | {"targets": list(self.targets)}

    @staticmethod
    def parse_targets(text: str) -> tuple[str, ...]:
        """'q_proj, v_proj' (as typed on a command line) → ('q_proj', 'v_proj')."""
        return tuple(t.strip() for t in text.split(",") if t.strip())

    @classmethod
    def from_dict(cls, data: Mapping) -> LoraSpec:
        return cls(
            rank=int(data["rank"]),
            alpha=float(data["alpha"]),
            dropout=float(data["dropout"]),
            targets=tuple(data["targets"]),
            init_seed=int(data["init_seed"]),
        )

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.targets),
            bias="none",
            task_type="CAUSAL_LM",
        )


def _module_seed(init_seed: int, module: str) -> int:
    digest = hashlib.sha256(f"edgefed-lora-init:{init_seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def lora_modules(peft_model) -> dict[str, object]:
    """{module name without PEFT's wrapper prefix: LoRA layer}, in model order."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix(_PEFT_PREFIX): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


def _initial_a(shape, init_seed: int, module: str):
    import torch

    bound = 1.0 / math.sqrt(shape[1])
    generator = torch.Generator().manual_seed(_module_seed(init_seed, module))
    drawn = torch.rand(tuple(shape), generator=generator, dtype=torch.float32)
    return (drawn * 2.0 - 1.0) * bound


def initialize_lora(peft_model, init_seed: int) -> None:
    """Set every A from the shared seed and every B to zero (see the module docstring)."""
    import torch

    with torch.no_grad():
        for name, module in lora_modules(peft_model).items():
            for adapter_name, lora_a in module.lora_A.items():
                lora_a.weight.copy_(_initial_a(lora_a.weight.shape, init_seed, name))
                module.lora_B[adapter_name].weight.zero_()


def initial_tensors(like: Mapping, init_seed: int) -> dict:
    """The federation's initial adapter under the names and shapes of `like` (PEFT's saved
    names): every device's common starting point, public to all of them."""
    import torch

    initial = {}
    for name, tensor in like.items():
        if name.endswith(".lora_A.weight"):
            module = name.removeprefix(_PEFT_PREFIX).removesuffix(".lora_A.weight")
            initial[name] = _initial_a(tensor.shape, init_seed, module)
        else:
            initial[name] = torch.zeros(tuple(tensor.shape), dtype=torch.float32)
    return initial


def attach_lora(model, spec: LoraSpec):
    """Wrap `model` in a PEFT LoRA of `spec`, initialised from the shared seed."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, spec.peft_config())
    initialize_lora(peft_model, spec.init_seed)
    return peft_model


def lora_state(peft_model) -> dict:
    """The adapter's tensors under PEFT's saved names (no adapter name), detached CPU copies."""
    from peft.utils import get_peft_model_state_dict

    return {
        name: tensor.detach().to("cpu", copy=True).contiguous()
        for name, tensor in get_peft_model_state_dict(peft_model).items()
    }


def load_lora_state(peft_model, state: Mapping) -> None:
    """Copy `state` into the adapter; the names and shapes must be exactly the adapter's own."""
    from peft.utils import set_peft_model_state_dict

    expected = {name: tuple(t.shape) for name, t in lora_state(peft_model).items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
        detail = (
            f"missing {missing[0]}"
            if missing
            else f"unexpected {extra[0]}"
            if extra
            else f"{wrong[0]} is {found[wrong[0]]}, expected {expected[wrong[0]]}"
        )
        raise AdapterMismatchError(
            f"the adapter does not fit this base and LoRA configuration ({detail})",
            "use an adapter trained on the same base with the same rank and target modules",
        )
    set_peft_model_state_dict(peft_model, dict(state))


def save_peft_adapter(
    peft_model, folder: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a PEFT model's adapter as a PEFT adapter folder, atomically."""
    return save_lora_tensors(
        lora_state(peft_model), peft_model.peft_config["default"], folder, metadata=metadata
    )


def save_lora_tensors(
    tensors: Mapping,
    config,
    folder: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write LoRA tensors (PEFT names) as a PEFT adapter folder, atomically.

    `config` is a PEFT LoraConfig or a LoraSpec. Written by hand rather than with PEFT's
    `save_pretrained`, which would also write a model card and record the meta-device model's
    empty name as the base.
    """
    from safetensors.torch import save_file

    peft_config = config.peft_config() if isinstance(config, LoraSpec) else config
    with atomic_dir(folder) as tmp:
        peft_config.save_pretrained(str(tmp))
        save_file(
            {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()},
            str(tmp / PEFT_WEIGHTS_FILE),
            metadata={"format": "pt", **(metadata or {})},
        )
    return Path(folder)


def read_adapter_folder(
    folder: str | os.PathLike[str],
) -> tuple[LoraSpec, dict, str | None]:
    """The LoRA spec, tensors and base fingerprint (None if unrecorded) of a PEFT adapter folder.

    An edgefed run folder also works (its adapter/ is read).

    Raises InputFileError when the folder is not an adapter and ModelFormatError when its files
    are damaged.
    """
    from safetensors import SafetensorError, safe_open

    root = Path(folder)
    if (root / "adapter" / PEFT_CONFIG_FILE).is_file():
        root = root / "adapter"
    config_path, weights_path = root / PEFT_CONFIG_FILE, root / PEFT_WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise InputFileError(
            f"{folder} is not a PEFT adapter folder (needs {PEFT_CONFIG_FILE} and "
            f"{PEFT_WEIGHTS_FILE})",
            "pass the adapter/ folder that `edgefed train` wrote, or its run folder",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        targets = config["target_modules"]
        spec = LoraSpec(
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout", 0.0)),
            targets=tuple([targets] if isinstance(targets, str) else targets),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFormatError(
            f"{config_path} is not a valid LoRA config ({exc})", "save the adapter again"
        ) from exc
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            base_fingerprint = (handle.metadata() or {}).get(BASE_FINGERPRINT_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise ModelFormatError(
            f"{weights_path} is not a readable safetensors file ({exc})", "copy the adapter again"
        ) from exc
    return spec, tensors, base_fingerprint


def lora_module_shapes(base_info, spec: LoraSpec) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every module `spec` adapts on the base.

    Read from the base's own tensor shapes (GGUF lists the input dimension first), so a
    federation manifest can state exactly which adapter tensors it accepts.
    Raises AdapterMismatchError for a target the base does not have.
    """
    from edgefed.quant.architectures import architecture

    record = architecture(base_info.architecture)
    name_map = record.tensor_name_map(base_info.n_layers)
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(base_info.n_layers):
        for target in spec.targets:
            module = f"model.layers.{layer}.{record.block_of(target)}.{target}"
            gguf_name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
            if gguf_name is None or gguf_name not in base_info.tensor_shapes:
                raise AdapterMismatchError(
                    f"LoRA target '{target}' is not a module of this {record.gguf_name} base",
                    f"use targets among {', '.join(record.lora_targets)}",
                )
            n_in, n_out = base_info.tensor_shapes[gguf_name][:2]
            shapes[module] = (int(n_in), int(n_out))
    return shapes


def lora_tensor_shapes(
    module_shapes: Mapping[str, tuple[int, int]], rank: int
) -> dict[str, tuple[int, int]]:
    """The PEFT tensor names and shapes of a rank-`rank` adapter on those modules."""
    tensors: dict[str, tuple[int, int]] = {}
    for module, (n_in, n_out) in module_shapes.items():
        tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = (rank, n_in)
        tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = (n_out, rank)
    return tensors
