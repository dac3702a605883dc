"""PEFT LoRA adapter folder -> GGUF LoRA adapter that llama.cpp applies over a GGUF base.

llama.cpp computes W x + s * B (A x) with s = adapter.lora.alpha / r, r read per tensor from
A's shape. PEFT's scale can differ per module (rank_pattern / alpha_pattern) or be alpha/sqrt(r)
(rsLoRA); we write the global alpha and fold any difference into B, so llama.cpp reproduces
PEFT exactly. Llama's q/k rows are permuted for RoPE in the base GGUF (see `architectures`), so
the rows of the q/k B matrices are permuted the same way. Everything is checked against the
base's own tensor shapes before a byte is written: an adapter for another base never reaches
llama.cpp. DoRA and other variants llama.cpp cannot apply are refused.

The file is laid out for speed, not size (it never leaves the device; the wire carries the PEFT
tensors): the rank is padded with zeros to `RANK_MULTIPLE` and A and B are stored in float32.
Both change no value: zero rows of A and zero columns of B add nothing to B·A, float16 values
are exact in float32, and the global alpha is scaled with the rank so alpha/r stays the same.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefed.adapter import BASE_FINGERPRINT_KEY, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from edgefed.errors import (
    AdapterMismatchError,
    InputFileError,
    ModelFormatError,
    UnsupportedModelError,
)
from edgefed.quant.architectures import architecture
from edgefed.quant.gguf_file import open_gguf, read_base_info, write_gguf
from edgefed.quant.hf_convert import permute_for_rope

OUT_TYPES = ("f32", "f16")
DEFAULT_OUT_TYPE = "f32"
# llama.cpp applies a LoRA as mul_mat(B, mul_mat(A, x)). On the CPU a mul_mat takes its fast
# tiled kernel (llamafile sgemm) only when the inner dimension is a multiple of the kernel's
# block: 16 floats with AVX-512 (8 with AVX2, 4 with NEON). For the B product the inner dimension
# is the rank, so rank 8 fell back to the generic dot-product path, which runs an 8-long row in
# its scalar tail: 4.8 ms against 1.0 ms per 576x1536 layer at rank 16 (bench/runtime.py has the
# end-to-end figures). 16 suits every CPU we know; the padding doubles the adapter's few FLOPs.
RANK_MULTIPLE = 16
# PEFT name: <prefix>layers.<i>.<path to module>.lora_A|lora_B.weight
_LORA_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# options that change what a LoRA computes in ways llama.cpp does not implement
_REFUSED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "layer_replication": "layer replication",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
    "lora_bias": "LoRA bias terms",
    "use_qalora": "QA-LoRA",
}


@dataclass(frozen=True)
class PeftLoraConfig:
    """The parts of adapter_config.json that decide how the adapter is applied."""

    rank: int
    alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: tuple[str, ...]

    def scale_for(self, module: str, rank: int) -> float:
        """PEFT's scaling for `module` (patterns match a suffix of the module name)."""
        alpha = self.alpha
        for pattern, value in self.alpha_pattern.items():
            if re.search(rf"(^|\.){pattern}$", module):
                alpha = float(value)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def read_peft_config(folder: Path) -> PeftLoraConfig:
    """Read and vet adapter_config.json; refuse every variant llama.cpp cannot apply."""
    path = folder / PEFT_CONFIG_FILE
    if not path.is_file():
        raise InputFileError(f"{folder} has no {PEFT_CONFIG_FILE}", "pass a PEFT adapter folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelFormatError(
            f"{path} is not valid JSON ({exc})", "save the adapter again"
        ) from exc
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedModelError(
            f"{folder} is a {peft_type or 'unknown'} adapter", "llama.cpp applies plain LoRA only"
        )
    for option, what in _REFUSED_OPTIONS.items():
        if cfg.get(option):
            raise UnsupportedModelError(
                f"{folder} uses {what}, which llama.cpp cannot apply",
                "train a plain LoRA adapter (no DoRA or other variants)",
            )
    if cfg.get("modules_to_save"):
        raise UnsupportedModelError(
            f"{folder} also saves full modules ({', '.join(cfg['modules_to_save'])})",
            "train with LoRA on linear layers only; edgefed shares low-rank deltas only",
        )
    targets = cfg.get("target_modules") or ()
    return PeftLoraConfig(
        rank=int(cfg.get("r", 8)),
        alpha=float(cfg.get("lora_alpha", 8)),
        use_rslora=bool(cfg.get("use_rslora", False)),
        rank_pattern=dict(cfg.get("rank_pattern") or {}),
        alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        target_modules=tuple([targets] if isinstance(targets, str) else targets),
    )


def _read_pairs(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """{module name: {'A': array, 'B': array}} from the adapter's safetensors (never pickles)."""
    from safetensors import SafetensorError, safe_open

    path = folder / PEFT_WEIGHTS_FILE
    if not path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise UnsupportedModelError(
                f"{folder} holds a pickled adapter_model.bin",
                "edgefed never unpickles; save with safe_serialization=True",
            )
        raise InputFileError(f"{folder} has no {PEFT_WEIGHTS_FILE}", "pass a PEFT adapter folder")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    try:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                match = _LORA_NAME.match(name)
                if match is None:
                    raise UnsupportedModelError(
                        f"{path} holds tensor {name}, which is not a LoRA A/B matrix",
                        "edgefed converts LoRA on linear layers only (no embeddings, no biases)",
                    )
                tensor = handle.get_tensor(name).float().numpy()
                pairs.setdefault(match["module"], {})[match["part"]] = tensor
    except SafetensorError as exc:
        raise ModelFormatError(
            f"{path} is not a valid safetensors file ({exc})", "save it again"
        ) from exc
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ModelFormatError(
                f"{path} has an incomplete LoRA pair for {module}", "save it again"
            )
    if not pairs:
        raise ModelFormatError(f"{path} holds no LoRA tensors", "save the adapter again")
    return pairs


def convert_lora_to_gguf(
    folder: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str],
    out_type: str = DEFAULT_OUT_TYPE,
    rank_multiple: int = RANK_MULTIPLE,
) -> Path:
    """Write the PEFT adapter in `folder` as a GGUF LoRA adapter for GGUF `base` (atomically).

    Each module's rank is padded with zeros to a multiple of `rank_multiple` (1: no padding).
    """
    import gguf

    src = Path(folder)
    if not src.is_dir():
        raise InputFileError(f"{src} is not a folder", "pass a PEFT adapter folder")
    if out_type not in OUT_TYPES:
        raise InputFileError(f"unknown output type '{out_type}'", f"choose one of {OUT_TYPES}")
    if rank_multiple < 1:
        raise InputFileError(
            f"rank multiple {rank_multiple} must be at least 1", "use 1 for no padding"
        )
    config = read_peft_config(src)
    pairs = _read_pairs(src)
    info = read_base_info(base)
    record = architecture(info.architecture, part="LoRA export")
    name_map = record.tensor_name_map(info.n_layers)
    float_type = np.float16 if out_type == "f16" else np.float32
    # llama.cpp scales by alpha / (the stored rank): scale alpha with the padding of the
    # adapter's own rank, so that for every module of that rank nothing needs folding into B
    alpha = config.alpha * _padded(config.rank, rank_multiple) / config.rank

    tensors: list[tuple[str, np.ndarray]] = []
    for module in sorted(pairs):
        a, b = pairs[module]["A"], pairs[module]["B"]
        base_name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if base_name is None or base_name not in info.tensor_shapes:
            raise AdapterMismatchError(
                f"adapter module {module} has no matching tensor in base {info.path.name}",
                "use the base the adapter was trained on",
            )
        n_in, n_out = info.tensor_shapes[base_name][:2]  # GGUF shapes list the input dim first
        rank = a.shape[0]
        if (
            a.ndim != 2
            or b.ndim != 2
            or b.shape[1] != rank
            or a.shape[1] != n_in
            or b.shape[0] != n_out
        ):
            raise AdapterMismatchError(
                f"adapter module {module} has A{tuple(a.shape)} B{tuple(b.shape)} but base tensor "
                f"{base_name} is {n_out}x{n_in}",
                "the adapter was made for another base model",
            )
        # llama.cpp applies alpha / r_stored; fold PEFT's own scale (rsLoRA, patterns) into B
        stored_rank = _padded(rank, rank_multiple)
        fold = config.scale_for(module, rank) / (alpha / stored_rank)
        if fold != 1.0:
            b = b * fold
        if record.permuted_qk:
            if module.endswith(".q_proj"):
                b = permute_for_rope(b, info.n_head)
            elif module.endswith(".k_proj"):
                b = permute_for_rope(b, info.n_head_kv)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ModelFormatError(
                f"adapter module {module} holds NaN or inf", "retrain the adapter"
            )
        padded_a = np.zeros((stored_rank, n_in), dtype=float_type)
        padded_a[:rank] = a
        padded_b = np.zeros((n_out, stored_rank), dtype=float_type)
        padded_b[:, :rank] = b
        tensors.append((f"{base_name}.lora_a", padded_a))
        tensors.append((f"{base_name}.lora_b", padded_b))

    with write_gguf(destination, info.architecture) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(src.name)
        # which base it was made for, checked by `generate` and `export` (llama.cpp ignores it)
        writer.add_string(BASE_FINGERPRINT_KEY, info.fingerprint)
        for name, tensor in tensors:
            writer.add_tensor(name, tensor)
    return Path(destination)


def open_lora_gguf(path: str | os.PathLike[str]):
    """A GGUF LoRA adapter's reader and the sha256 of the base it records (None: made
    elsewhere). Raises InputFileError / ModelFormatError for a missing, damaged or non-adapter
    file (a GGUF model given where an adapter belongs)."""
    import gguf

    reader = open_gguf(path, "adapter")
    kind = reader.fields.get(gguf.Keys.General.TYPE)
    if kind is None or kind.contents() != gguf.GGUFType.ADAPTER:
        raise ModelFormatError(
            f"{path} is a GGUF model, not a LoRA adapter",
            "give a GGUF LoRA adapter (`edgefed quant lora` converts a PEFT one)",
        )
    recorded = reader.fields.get(BASE_FINGERPRINT_KEY)
    return reader, (str(recorded.contents()) if recorded is not None else None)


def check_trained_on(adapter: str | os.PathLike[str], trained_on: str | None, base_info) -> None:
    """Refuse, in one line, an adapter that records another base than `base_info`'s; one that
    records none (made elsewhere) passes: llama.cpp still refuses shapes that do not fit."""
    if trained_on is not None and trained_on != base_info.fingerprint:
        raise AdapterMismatchError(
            f"{adapter} was trained on base {trained_on[:12]}, not on {base_info.path.name} "
            f"({base_info.fingerprint[:12]})",
            "give the base it was trained on with --base",
        )


def _padded(rank: int, multiple: int) -> int:
    return -(-rank // multiple) * multiple
