"""The training copies of a GGUF base: PyTorch models that LoRA trains on.

Three copies, one builder:

- "gguf": every matrix stays in memory as the file's own quantized blocks and is dequantized
  on the fly in forward and backward (`gguf_layers`), so the frozen base costs about the
  GGUF's size and computes exactly the values llama.cpp dequantizes: the adapter is trained on
  the weights it will be used with.
- "nf4": QLoRA's 4-bit NF4 layers (bitsandbytes), the standard path from a Hugging Face
  folder; on an already 4-bit GGUF it is a second rounding onto another grid (`nf4`).
- "fp32": the dequantized weights in float32, the reference (8x a 4-bit file's memory).

transformers can load a GGUF (`gguf_file=`), but it dequantizes the whole file into a float32
state dict and builds the model beside it, and cannot combine that with bitsandbytes. So the
model is built on the meta device and the file is streamed one tensor at a time, read with
plain file I/O from the entries `read_base_info` recorded (a GGUF reader alone costs ~180 MB
of Python objects on a 49k vocabulary), largest tensor first: at most one tensor's raw bytes
are alive beside what is already placed.
"""

from __future__ import annotations

import os

import numpy as np

from edgefed.errors import ModelFormatError, UnsupportedModelError
from edgefed.quant.architectures import Architecture, architecture, config_from_gguf
from edgefed.quant.gguf_blocks import SUPPORTED_TYPES, TYPE_NAMES, split_blocks, type_name
from edgefed.quant.gguf_file import (
    BaseInfo,
    TensorEntry,
    read_base_info,
    read_tensor_bytes,
    resolve_base,
)
from edgefed.quant.hf_convert import ROPE_FACTORS, unpermute_for_rope

PRECISIONS = ("gguf", "nf4", "fp32")
# modules kept in float by NF4: embeddings are small next to the layers, and sensitive
KEEP_FLOAT = ("embed_tokens", "lm_head")
# where the training copy keeps them
ROPE_FACTORS_BUFFER = "model.rotary_emb.rope_factors"


def empty_model(config):
    """The model on the meta device: its structure, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def finish(model):
    """Re-create buffers that lived on meta (RoPE frequencies, Gemma's embedding scale), tie
    the head, freeze, eval."""
    import torch

    from edgefed.quant.gguf_layers import GGUFEmbedding, GGUFLinear

    rotary = model.model.rotary_emb
    with torch.device("cpu"):
        model.model.rotary_emb = type(rotary)(config=model.config)
    embedding = model.model.embed_tokens
    if isinstance(getattr(embedding, "embed_scale", None), torch.Tensor):
        embedding.embed_scale = torch.tensor(model.config.hidden_size**0.5)
    if model.config.tie_word_embeddings:
        if isinstance(embedding, GGUFEmbedding):  # one set of blocks serves both
            model.lm_head = GGUFLinear(embedding.blocks, embedding.embedding_dim, None)
        else:
            model.lm_head.weight = embedding.weight
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    leftover = [n for n, p in (*model.named_parameters(), *model.named_buffers())
                if p.device.type == "meta"]  # fmt: skip
    if leftover:
        raise ModelFormatError(
            f"the base has no weights for {', '.join(leftover[:3])}",
            "the file lacks tensors its architecture needs: convert or download it again",
        )
    return model.eval()


def set_float(model, name: str, tensor) -> None:
    import torch

    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(tensor, requires_grad=False))


def dequantize(raw: np.ndarray, entry: TensorEntry, rows_per_chunk: int = 2048) -> np.ndarray:
    """A tensor's raw bytes as float32 in the model's shape, a slab of rows at a time.

    gguf's numpy dequantizers allocate several float copies of their input; on the 28M-value
    embedding that alone was 450 MB. Slabs keep those temporaries small.
    """
    import gguf

    qtype = gguf.GGMLQuantizationType(entry.type)
    out = np.empty(tuple(reversed(entry.shape)), dtype=np.float32)
    flat = out.reshape(raw.shape[0], -1)
    for start in range(0, raw.shape[0], rows_per_chunk):
        slab = raw[start : start + rows_per_chunk]
        flat[start : start + len(slab)] = gguf.quants.dequantize(slab, qtype).reshape(len(slab), -1)
    return out


def _rope_rows(record: Architecture, info: BaseInfo, entry: TensorEntry) -> np.ndarray | None:
    """llama.cpp stores Llama's q/k rows permuted for its RoPE; the order that undoes it."""
    if not record.permuted_qk:
        return None
    heads = {".attn_q.": info.n_head, ".attn_k.": info.n_head_kv}
    for marker, n_head in heads.items():
        if marker in entry.name:
            return unpermute_for_rope(np.arange(int(np.prod(entry.shape[1:]))), n_head)
    return None


def check_rope(info: BaseInfo) -> None:
    """Refuse a base whose RoPE the copies cannot compute. They rotate as `config_from_gguf`
    says (plain RoPE) and divide the frequencies by Llama 3's rope_freqs factors on a llama
    base, where llama.cpp applies them; a scaling llama.cpp reads from keys (linear, YaRN: e.g.
    Gemma 3 4B's) or from long-context factors (Phi-3's rope_factors_long/short) would train
    another model than the one llama.cpp scores."""
    fix = ("evaluate it with `edgefed evaluate --base`, or train a base with plain RoPE or "
           "Llama 3's scaling")  # fmt: skip
    scaling = info.hparams.get(f"{info.architecture}.rope.scaling.type")
    factor = info.hparams.get(f"{info.architecture}.rope.scaling.factor")
    if scaling not in (None, "none") or factor not in (None, 0, 1):
        raise UnsupportedModelError(
            f"the base scales RoPE ({scaling or 'type unnamed'}, factor {factor}), which the "
            "training copy does not compute",
            fix,
        )
    for entry in info.tensors:
        if not entry.name.startswith("rope_"):
            continue
        if entry.name != ROPE_FACTORS or info.architecture != "llama":
            raise UnsupportedModelError(
                f"the base scales RoPE with {entry.name} on a {info.architecture} model, "
                "which the training copy does not compute",
                fix,
            )
        if entry.shape[0] * 2 != info.head_dim:
            raise ModelFormatError(
                f"the base's {ROPE_FACTORS} has {entry.shape[0]} factors for a head of "
                f"{info.head_dim}",
                "convert or download the base again",
            )


def check_trainable(info: BaseInfo, precision: str | None = None) -> None:
    """Refuse, in one line, a base the training copy in `precision` cannot hold: a family
    edgefed has no record of, a RoPE it cannot compute, and for the gguf copy a matrix type it
    cannot keep (None: whatever the copy). Scoring with llama.cpp needs none of this."""
    architecture(info.architecture)
    check_rope(info)
    if precision == "gguf":
        check_block_types(info)


def check_block_types(info: BaseInfo) -> None:
    """Refuse, before anything is read, a base with a matrix the gguf copy cannot keep."""
    for entry in info.tensors:
        if len(entry.shape) > 1 and entry.type not in TYPE_NAMES:
            raise ModelFormatError(
                f"base tensor {entry.name} is {type_name(entry.type)}, which the gguf training "
                f"copy cannot train on (supported: {', '.join(SUPPORTED_TYPES)})",
                "train with --precision fp32 (exact values, 8x the weight memory) or nf4, or "
                "requantize the base: `edgefed quant requantize BASE -o OUT --type q4_k_m`",
            )


def _tensor_places(model, record: Architecture, info: BaseInfo) -> dict[str, str]:
    """GGUF tensor name -> parameter name in the transformers model."""
    name_map = record.tensor_name_map(info.n_layers)
    places: dict[str, str] = {}
    for hf_name, _ in model.named_parameters():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            places[gguf_name] = hf_name
    return places


def _place_blocks(model, hf_name: str, raw: np.ndarray, entry: TensorEntry, order, buffers) -> None:
    """Put a matrix into the model as a GGUF layer over its own blocks."""
    import torch

    from edgefed.quant.gguf_layers import GGUFBlocks, GGUFEmbedding, GGUFLinear

    fields = split_blocks(raw, entry.type)
    if order is not None:  # whole rows move, blocks untouched: exact
        index = torch.from_numpy(order)
        fields = {name: tensor[index].contiguous() for name, tensor in fields.items()}
    blocks = GGUFBlocks(entry.type, fields, entry.shape[0], buffers)
    parent_name, _, child = hf_name.removesuffix(".weight").rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    if isinstance(old, torch.nn.Embedding):
        # Gemma's scaled embedding multiplies by sqrt(hidden) in forward (its buffer is on meta)
        scale = model.config.hidden_size**0.5 if hasattr(old, "embed_scale") else 1.0
        setattr(parent, child, GGUFEmbedding(blocks, entry.shape[0], scale))
    else:
        setattr(parent, child, GGUFLinear(blocks, entry.shape[0], old.bias))


def build_training_model(base: str | os.PathLike[str] | None = None, precision: str = "gguf"):
    """Stream a GGUF base into a PyTorch model in `precision` (see the module docstring)."""
    import torch

    if precision not in PRECISIONS:
        raise ModelFormatError(
            f"unknown precision '{precision}'", f"choose one of {', '.join(PRECISIONS)}"
        )
    base_path = resolve_base(base)
    info = read_base_info(base_path)
    check_trainable(info, precision)
    record = architecture(info.architecture)
    model = empty_model(config_from_gguf(info))
    if precision == "nf4":
        from edgefed.quant.nf4 import replace_linears, set_nf4

        replace_linears(model)
    places = _tensor_places(model, record, info)
    from edgefed.quant.gguf_layers import DequantBuffers

    buffers = DequantBuffers()
    rope_factors = None
    for entry in sorted(info.tensors, key=lambda e: -e.n_bytes):
        hf_name = places.get(entry.name)
        if hf_name is None:
            if entry.name == "output.weight":
                continue
            if entry.name == ROPE_FACTORS:
                rope_factors = dequantize(read_tensor_bytes(base_path, entry), entry)
                continue
            raise ModelFormatError(
                f"base tensor {entry.name} has no place in the model",
                "use a base of a supported architecture (`edgefed base show` checks one)",
            )
        raw = read_tensor_bytes(base_path, entry)
        order = _rope_rows(record, info, entry)
        if precision == "gguf" and len(entry.shape) > 1:
            _place_blocks(model, hf_name, raw, entry, order, buffers)
            continue
        array = dequantize(raw, entry)
        del raw
        if order is not None:
            array = array[order]
        if record.norm_offset and entry.name.endswith("norm.weight"):
            array -= record.norm_offset  # stored as offset + w; transformers' norms add it
        weight = torch.from_numpy(np.ascontiguousarray(array))
        if precision == "nf4" and _is_nf4_weight(model, hf_name):
            set_nf4(model, hf_name, weight)
        else:
            set_float(model, hf_name, weight)
    model = finish(model)
    if rope_factors is not None:
        scale_rope(model, rope_factors)
    return model


def scale_rope(model, factors: np.ndarray) -> None:
    """Divide the rotary frequencies by the base's rope_freqs factors, as llama.cpp does for
    every layer (Llama 3.1/3.2's scaling: the long wavelengths stretched)."""
    import torch

    rotary = model.model.rotary_emb
    divisors = torch.from_numpy(np.ascontiguousarray(factors, dtype=np.float32))
    rotary.inv_freq = rotary.inv_freq / divisors
    rotary.original_inv_freq = rotary.inv_freq.clone()
    # kept in the state dict (the frequencies are not), so a saved copy (the NF4 cache) has them
    rotary.register_buffer(ROPE_FACTORS_BUFFER.rpartition(".")[2], divisors)


def _is_nf4_weight(model, hf_name: str) -> bool:
    import bitsandbytes as bnb

    module = model.get_submodule(hf_name.rpartition(".")[0])
    return isinstance(module, bnb.nn.Linear4bit) and hf_name.endswith(".weight")


def load_training_copy(base: str | os.PathLike[str] | None, precision: str):
    """The training copy of `base` in `precision`; NF4 comes from its cache when it can."""
    if precision == "nf4":
        from edgefed.quant.nf4 import load_training_model

        return load_training_model(base)
    return build_training_model(base, precision)


def frozen_weight_bytes(model) -> int:
    """Memory the frozen base's weights take in the copy (LoRA tensors excluded)."""
    from edgefed.quant.gguf_layers import GGUFBlocks

    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, GGUFBlocks) and id(module) not in seen:
            seen.add(id(module))
            total += module.memory_bytes()
    for name, parameter in model.named_parameters():
        if "lora_" not in name and id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel() * parameter.element_size()
    return total
