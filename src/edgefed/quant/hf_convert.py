"""Hugging Face folder (config.json + safetensors + tokenizer.json) -> GGUF, with the gguf library.

Tensor names come from gguf's own name maps (`gguf.get_tensor_name_map`) and each family's
storage conventions from the architecture table (`architectures`): Llama's q/k rows permuted for
llama.cpp's RoPE kernel (the others use the NeoX layout and are stored as is; the same
permutation is applied to LoRA B matrices in `lora_gguf`), Gemma's norms stored as 1 + w. This
module holds which config keys feed which GGUF keys.
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
from edgefed.quant.architectures import Architecture, architecture_for_model_type
from edgefed.quant.gguf_file import write_gguf
from edgefed.quant.tokenizer_meta import write_tokenizer

logger = logging.getLogger(__name__)

OUT_TYPES = ("f32", "f16")
# HF buffers that are recomputed at load time and have no place in a GGUF
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)
# llama.cpp's per-frequency RoPE divisors (Llama 3's scaling), a tensor of no layer
ROPE_FACTORS = "rope_freqs.weight"


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
    rope_dims: int  # the rotated part of each head (Phi-3's partial_rotary_factor)
    sliding_window: int | None  # Gemma's and Phi-3's local attention, when the family has it
    # Gemma 2's soft-caps of attention scores and final logits
    attn_softcap: float | None
    final_softcap: float | None
    # "llama3" (Llama 3.1/3.2's frequency scaling, stored as llama.cpp's rope_freqs factors) or
    # None for plain RoPE; other scalings are refused
    rope_scaling: str | None

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
        record = architecture_for_model_type(model_type)
        rope = cfg.get("rope_parameters") or {}
        if "full_attention" in rope:  # Gemma 3: one RoPE per attention kind
            local = rope.get("sliding_attention", {}).get("rope_theta", _GEMMA3_LOCAL_THETA)
            if local != _GEMMA3_LOCAL_THETA:
                raise UnsupportedModelError(
                    f"{folder} rotates local attention with theta {local:g}",
                    f"llama.cpp fixes it at {_GEMMA3_LOCAL_THETA:g}: convert with llama.cpp",
                )
            rope = rope["full_attention"]
        scaling = cfg.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        scaling_type = (scaling.get("rope_type") or scaling.get("type")) if scaling else None
        if scaling and not (scaling_type == "llama3" and record.gguf_name == "llama"):
            raise UnsupportedModelError(
                f"{folder} uses RoPE scaling ({scaling_type})",
                "edgefed converts plain RoPE and Llama 3's scaling; convert it with llama.cpp's "
                "convert_hf_to_gguf.py (edgefed evaluates any GGUF llama.cpp loads)",
            )
        try:
            n_head = int(cfg["num_attention_heads"])
            n_embd = int(cfg["hidden_size"])
            head_dim = int(cfg.get("head_dim") or n_embd // n_head)
            _check_attention_scale(folder, cfg, head_dim)
            rotary = float(cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor")
                           or 1.0)  # fmt: skip
            return cls(
                model_type=model_type,
                n_layers=int(cfg["num_hidden_layers"]),
                n_embd=n_embd,
                n_ff=int(cfg["intermediate_size"]),
                n_head=n_head,
                n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
                head_dim=head_dim,
                context_length=int(cfg.get("max_position_embeddings", 2048)),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                vocab_size=int(cfg["vocab_size"]),
                tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                rope_dims=int(head_dim * rotary),
                sliding_window=(cfg.get("sliding_window") or None)
                if record.local_attention
                else None,
                attn_softcap=cfg.get("attn_logit_softcapping"),
                final_softcap=cfg.get("final_logit_softcapping"),
                rope_scaling=scaling_type,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(
                f"{path} lacks or mangles {exc}", "save the model again"
            ) from exc


# llama.cpp's RoPE base for Gemma 3's local (sliding window) layers, not read from the file
_GEMMA3_LOCAL_THETA = 10000.0


def _check_attention_scale(folder: Path, cfg: dict, head_dim: int) -> None:
    """Gemma scales attention by 1/sqrt(query_pre_attn_scalar); llama.cpp by 1/sqrt(head size)
    (below 27B parameters): refuse a model whose two differ, as llama.cpp would run another
    model."""
    scalar = cfg.get("query_pre_attn_scalar")
    if scalar is not None and int(scalar) != head_dim:
        raise UnsupportedModelError(
            f"{folder} scales attention by query_pre_attn_scalar {scalar}, not its head size "
            f"{head_dim}",
            "llama.cpp scales by the head size: convert with llama.cpp's convert_hf_to_gguf.py",
        )


def _llama3_rope_factors(folder: Path) -> np.ndarray:
    """llama.cpp's per-frequency divisors for Llama 3's RoPE scaling: the plain inverse
    frequencies over the scaled ones, both as transformers computes them for this config."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.from_pretrained(folder)
    plain, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (plain / scaled).numpy().astype(np.float32)


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
    record = architecture_for_model_type(cfg.model_type)
    name_map = record.tensor_name_map(cfg.n_layers)
    float_type = np.float16 if out_type == "f16" else np.float32

    with write_gguf(destination, record.gguf_name) as writer:
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
        writer.add_rope_dimension_count(cfg.rope_dims)
        writer.add_rope_freq_base(cfg.rope_theta)
        if cfg.sliding_window:
            writer.add_sliding_window(int(cfg.sliding_window))
        if cfg.attn_softcap:
            writer.add_attn_logit_softcapping(float(cfg.attn_softcap))
        if cfg.final_softcap:
            writer.add_final_logit_softcapping(float(cfg.final_softcap))
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
            tensor = _stored_as(record, cfg, hf_name, tensor)
            seen_embedding |= gguf_name == "token_embd.weight"
            writer.add_tensor(
                gguf_name, tensor.astype(float_type if tensor.ndim > 1 else np.float32)
            )
        if cfg.rope_scaling == "llama3":
            writer.add_tensor(ROPE_FACTORS, _llama3_rope_factors(src))
        if not seen_embedding:
            raise ModelFormatError(
                f"{src} has no token embedding tensor", "the checkpoint is incomplete"
            )
    return Path(destination)


def _stored_as(record: Architecture, cfg: HFModelConfig, hf_name: str, tensor: np.ndarray):
    """A transformers tensor as llama.cpp stores it for the family (`architectures`)."""
    if record.permuted_qk and ".self_attn.q_proj." in hf_name:
        return permute_for_rope(tensor, cfg.n_head)
    if record.permuted_qk and ".self_attn.k_proj." in hf_name:
        return permute_for_rope(tensor, cfg.n_head_kv)
    if record.norm_offset and hf_name.endswith("norm.weight"):
        return tensor + record.norm_offset
    return tensor
