"""Hugging Face folder (config.json + safetensors + tokenizer.json) -> GGUF, with the gguf library.

Tensor names come from gguf's own name maps (`gguf.get_tensor_name_map`), so this module holds
only what the maps cannot know: which config keys feed which GGUF keys, and llama.cpp's storage
of Llama q/k projections with rows permuted for its RoPE kernel (Qwen2 uses the NeoX RoPE layout
and is stored as is). The same permutation is applied to LoRA B matrices in `lora_gguf`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefed.errors import InputFileError, ModelFormatError, UnsupportedModelError
from edgefed.quant.gguf_file import write_gguf
from edgefed.quant.tokenizer_meta import write_tokenizer

logger = logging.getLogger(__name__)

# HF `model_type` -> (gguf architecture enum name, whether q/k rows are permuted for RoPE)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
}
OUT_TYPES = ("f32", "f16")
# HF buffers that are recomputed at load time and have no place in a GGUF
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


def permute_for_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotate-half layout to llama.cpp's interleaved one.

    Rows of each head are [first halves | second halves] in HF; llama.cpp wants the pairs
    interleaved. Works for a weight (out, in), a bias (out,) and a LoRA B matrix (out, r).
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ModelFormatError(
            f"cannot permute a tensor of {rows} rows for {n_head} heads", "check config.json"
        )
    rest = weight.shape[1:]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(weight.shape)
    )


def unpermute_for_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_for_rope`: llama.cpp's row order back to Hugging Face's."""
    rows = weight.shape[0]
    rest = weight.shape[1:]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape)
    )


@dataclass(frozen=True)
class HFModelConfig:
    """The fields of config.json a GGUF needs, normalised across transformers versions."""

    model_type: str
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context_length: int
    rms_eps: float
    rope_theta: float
    vocab_size: int
    tied_embeddings: bool

    @classmethod
    def from_folder(cls, folder: Path) -> HFModelConfig:
        path = folder / "config.json"
        if not path.is_file():
            raise InputFileError(f"{folder} has no config.json", "pass a Hugging Face model folder")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelFormatError(
                f"{path} is not valid JSON ({exc})", "save the model again"
            ) from exc
        model_type = cfg.get("model_type", "")
        if model_type not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{folder} is a '{model_type or 'unknown'}' model",
                f"edgefed converts {', '.join(sorted(ARCHITECTURES))}",
            )
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        if scaling:
            raise UnsupportedModelError(
                f"{folder} uses RoPE scaling ({scaling.get('rope_type') or scaling.get('type')})",
                "edgefed converts models with plain RoPE only",
            )
        try:
            n_head = int(cfg["num_attention_heads"])
            n_embd = int(cfg["hidden_size"])
            return cls(
                model_type=model_type,
                n_layers=int(cfg["num_hidden_layers"]),
                n_embd=n_embd,
                n_ff=int(cfg["intermediate_size"]),
                n_head=n_head,
                n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
                head_dim=int(cfg.get("head_dim") or n_embd // n_head),
                context_length=int(cfg.get("max_position_embeddings", 2048)),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                vocab_size=int(cfg["vocab_size"]),
                tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(
                f"{path} lacks or mangles {exc}", "save the model again"
            ) from exc


def _safetensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return sorted({folder / name for name in weight_map.values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")):
            raise UnsupportedModelError(
                f"{folder} holds pickled .bin weights",
                "edgefed never unpickles; re-save with safe_serialization=True",
            )
        raise InputFileError(f"{folder} has no .safetensors weights", "pass a model folder")
    return files


def _iter_tensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every tensor; bf16 goes through torch, which reads it."""
    from safetensors import safe_open

    for file in _safetensor_files(folder):
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, handle.get_tensor(name).float().numpy()
        except Exception as exc:  # safetensors raises its own errors and bare OSError/ValueError
            raise ModelFormatError(f"cannot read {file} ({exc})", "the file is damaged") from exc


def convert_hf_to_gguf(
    folder: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    out_type: str = "f16",
    name: str | None = None,
) -> Path:
    """Write the HF model in `folder` as a GGUF file at `destination` (atomically)."""
    import gguf

    src = Path(folder)
    if not src.is_dir():
        raise InputFileError(f"{src} is not a folder", "pass a Hugging Face model folder")
    if out_type not in OUT_TYPES:
        raise InputFileError(f"unknown output type '{out_type}'", f"choose one of {OUT_TYPES}")
    cfg = HFModelConfig.from_folder(src)
    arch_name, permute_qk = ARCHITECTURES[cfg.model_type]
    arch = gguf.MODEL_ARCH[arch_name]
    name_map = gguf.get_tensor_name_map(arch, cfg.n_layers)
    float_type = np.float16 if out_type == "f16" else np.float32

    with write_gguf(destination, gguf.MODEL_ARCH_NAMES[arch]) as writer:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or src.name)
        writer.add_context_length(cfg.context_length)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(cfg.n_ff)
        writer.add_head_count(cfg.n_head)
        writer.add_head_count_kv(cfg.n_head_kv)
        if cfg.head_dim != cfg.n_embd // cfg.n_head:
            writer.add_key_length(cfg.head_dim)
            writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.rms_eps)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(
            gguf.LlamaFileType.MOSTLY_F16 if out_type == "f16" else gguf.LlamaFileType.ALL_F32
        )
        write_tokenizer(writer, src, cfg.vocab_size)

        seen_embedding = False
        for hf_name, tensor in _iter_tensors(src):
            if hf_name.endswith(_SKIPPED_SUFFIXES):
                continue
            if hf_name == "lm_head.weight" and cfg.tied_embeddings:
                continue
            gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UnsupportedModelError(
                    f"tensor {hf_name} has no GGUF name for {cfg.model_type}",
                    "the checkpoint has parts llama.cpp cannot run",
                )
            if permute_qk and ".self_attn.q_proj." in hf_name:
                tensor = permute_for_rope(tensor, cfg.n_head)
            elif permute_qk and ".self_attn.k_proj." in hf_name:
                tensor = permute_for_rope(tensor, cfg.n_head_kv)
            seen_embedding |= gguf_name == "token_embd.weight"
            writer.add_tensor(
                gguf_name, tensor.astype(float_type if tensor.ndim > 1 else np.float32)
            )
        if not seen_embedding:
            raise ModelFormatError(
                f"{src} has no token embedding tensor", "the checkpoint is incomplete"
            )
    return Path(destination)
