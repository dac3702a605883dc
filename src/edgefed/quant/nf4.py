"""The training copy of a GGUF base: PyTorch modules with 4-bit NF4 linear layers (bitsandbytes).

transformers can load a GGUF (`gguf_file=`), but it dequantizes the whole file into a float32
state dict and then builds the model beside it (1.5x the fp32 model above the process's
baseline on the embedded base, measured), and it refuses to combine that with bitsandbytes.
So we build the model on the meta device and stream the GGUF ourselves, one tensor at a
time: each linear weight is dequantized (gguf's own dequantizers), handed to bitsandbytes and
quantized to NF4 at once, so at most one float32 matrix is alive beside the NF4 weights and
the float embedding.

The result is cached under $EDGEFED_HOME/cache/nf4/<base sha256>/ (safetensors holding the
packed NF4 weights and their quantization statistics), so the second load skips all of this.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from edgefed.atomic import atomic_dir
from edgefed.errors import ModelFormatError
from edgefed.home import cache_dir
from edgefed.quant.gguf_file import BaseInfo, open_gguf, read_base_info, resolve_base
from edgefed.quant.hf_convert import unpermute_for_rope

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
NF4_BLOCKSIZE = 64
# modules kept in float: norms and embeddings are small and sensitive; lm_head is tied or small
_KEEP_FLOAT = ("embed_tokens", "lm_head")
# "nf4": QLoRA's 4-bit linear layers; "fp32": the dequantized GGUF weights as they are (the
# reference the benchmark compares against, and a faithful copy when memory allows)
PRECISIONS = ("nf4", "fp32")


def hf_config_for(info: BaseInfo, reader):
    """A transformers config equivalent to the GGUF base's hyper-parameters."""
    import gguf
    from transformers import LlamaConfig, Qwen2Config

    arch = info.architecture

    def value(key: str, default=None):
        field = reader.fields.get(key.format(arch=arch))
        return field.contents() if field is not None else default

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    n_ff = value(gguf.Keys.LLM.FEED_FORWARD_LENGTH)
    head_dim = value(gguf.Keys.Attention.KEY_LENGTH) or info.n_embd // info.n_head
    return config_class(
        vocab_size=info.vocab_size,
        hidden_size=info.n_embd,
        intermediate_size=int(n_ff),
        num_hidden_layers=info.n_layers,
        num_attention_heads=info.n_head,
        num_key_value_heads=info.n_head_kv,
        head_dim=int(head_dim),
        max_position_embeddings=info.context_length,
        rms_norm_eps=float(value(gguf.Keys.Attention.LAYERNORM_RMS_EPS, 1e-6)),
        rope_theta=float(value(gguf.Keys.Rope.FREQ_BASE, 10000.0)),
        tie_word_embeddings="output.weight" not in info.tensor_shapes,
        bos_token_id=value(gguf.Keys.Tokenizer.BOS_ID),
        eos_token_id=value(gguf.Keys.Tokenizer.EOS_ID),
    )


def _empty_model(config, precision: str = "nf4"):
    """The model on the meta device (no memory), with NF4 linear layers in place for "nf4"."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if precision != "nf4":
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and not name.endswith(_KEEP_FLOAT):
            parent_name, _, child = name.rpartition(".")
            replacement = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=torch.float32,
                compress_statistics=False,
                quant_type="nf4",
                device="meta",
            )
            setattr(model.get_submodule(parent_name), child, replacement)
    return model


def _finish(model):
    """Re-create buffers that lived on meta (RoPE frequencies), tie embeddings, freeze, eval."""
    import torch

    rotary = model.model.rotary_emb
    with torch.device("cpu"):
        model.model.rotary_emb = type(rotary)(config=model.config)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise ModelFormatError(
            f"the base has no weights for {leftover[:3]}", "check the base model"
        )
    return model.eval()


def _set_float(model, name: str, tensor) -> None:
    import torch

    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(tensor, requires_grad=False))


def _set_nf4(model, name: str, weight) -> None:
    import bitsandbytes as bnb

    module_name, _, _ = name.rpartition(".")
    module = model.get_submodule(module_name)
    param = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=False,
        quant_type="nf4",
        module=module,
    )
    module.weight = param.to("cpu")  # .to() on an unquantized Params4bit quantizes it


def _dequantize(tensor, rows_per_chunk: int = 2048) -> np.ndarray:
    """A GGUF tensor as float32, dequantized a slab of rows at a time.

    gguf's numpy dequantizers allocate several float copies of their input; on the 28M-value
    embedding that alone was 450 MB. Slabs keep those temporaries small.
    """
    import gguf

    data = tensor.data
    out = np.empty(tuple(int(d) for d in reversed(tensor.shape)), dtype=np.float32)
    flat_out = out.reshape(data.shape[0], -1) if data.ndim > 1 else out.reshape(1, -1)
    rows = data if data.ndim > 1 else data.reshape(1, -1)
    for start in range(0, rows.shape[0], rows_per_chunk):
        block = rows[start : start + rows_per_chunk]
        flat_out[start : start + len(block)] = gguf.quants.dequantize(
            block, tensor.tensor_type
        ).reshape(len(block), -1)
    return out


def build_training_model(base_path: Path, precision: str = "nf4"):
    """Stream a GGUF base into a PyTorch model, NF4 or fp32 (see the module docstring)."""
    import bitsandbytes as bnb
    import gguf
    import torch

    reader = open_gguf(base_path, "base model")
    info = read_base_info(base_path, reader=reader)
    if precision not in PRECISIONS:
        raise ModelFormatError(f"unknown precision '{precision}'", f"choose one of {PRECISIONS}")
    config = hf_config_for(info, reader)
    model = _empty_model(config, precision)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[info.architecture.upper()], info.n_layers)
    gguf_to_hf: dict[str, str] = {}
    for hf_name, _ in model.named_parameters():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            gguf_to_hf[gguf_name] = hf_name
    for tensor in reader.tensors:
        hf_name = gguf_to_hf.get(tensor.name)
        if hf_name is None:
            if tensor.name == "output.weight" or tensor.name.startswith("rope_"):
                continue
            raise ModelFormatError(
                f"base tensor {tensor.name} has no place in the model",
                "use a base of a supported architecture (`edgefed base show` checks one)",
            )
        array = _dequantize(tensor)
        if info.architecture == "llama" and ".attn_q." in tensor.name:
            array = unpermute_for_rope(array, info.n_head)
        elif info.architecture == "llama" and ".attn_k." in tensor.name:
            array = unpermute_for_rope(array, info.n_head_kv)
        weight = torch.from_numpy(array)
        module = model.get_submodule(hf_name.rpartition(".")[0])
        if isinstance(module, bnb.nn.Linear4bit) and hf_name.endswith(".weight"):
            _set_nf4(model, hf_name, weight)
        else:
            _set_float(model, hf_name, weight)
    return _finish(model)


def _save_cache(model, folder: Path, fingerprint: str) -> None:
    from safetensors.torch import save_file

    tied = model.config.tie_word_embeddings  # a tied head is the embedding: stored once
    state = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    with atomic_dir(folder) as tmp:
        save_file(state, tmp / "model.safetensors")
        (tmp / "config.json").write_text(model.config.to_json_string(), encoding="utf-8")
        meta = {"format": CACHE_FORMAT_VERSION, "base_sha256": fingerprint, "quant": "nf4"}
        (tmp / "edgefed-nf4.json").write_text(json.dumps(meta), encoding="utf-8")


def _load_cache(folder: Path):
    import bitsandbytes as bnb
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = _empty_model(config)
    state = load_file(folder / "model.safetensors")
    for name, module in model.named_modules():
        prefix = f"{name}.weight."
        if isinstance(module, bnb.nn.Linear4bit):
            stats = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            module.weight = bnb.nn.Params4bit.from_prequantized(
                data=state[f"{name}.weight"], quantized_stats=stats, device="cpu", module=module
            )
            if module.bias is not None:
                _set_float(model, f"{name}.bias", state[f"{name}.bias"])
    for name, _ in list(model.named_parameters()):
        if name in state and not isinstance(
            model.get_submodule(name.rpartition(".")[0]), bnb.nn.Linear4bit
        ):
            _set_float(model, name, state[name])
    return _finish(model)


def load_training_model(base: str | os.PathLike[str] | None = None, *, use_cache: bool = True):
    """The NF4 training copy of `base` (default: the embedded base), from cache when possible.

    Raises the same one-line errors as `read_base_info` for a bad base.
    """
    base_path = resolve_base(base)
    folder = cache_dir("nf4") / read_base_info(base_path).fingerprint
    marker = folder / "edgefed-nf4.json"
    if use_cache and marker.is_file():
        try:
            meta = json.loads(marker.read_text(encoding="utf-8"))
            if meta.get("format") == CACHE_FORMAT_VERSION:
                return _load_cache(folder)
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            logger.warning("NF4 cache %s unusable (%s); rebuilding it", folder, exc)
    model = build_training_model(base_path, "nf4")
    if use_cache:
        _save_cache(model, folder, folder.name)
    return model
