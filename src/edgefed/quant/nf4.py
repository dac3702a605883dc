"""The NF4 training copy of a GGUF base: 4-bit NF4 linear layers (bitsandbytes, QLoRA).

`training_copy.build_training_model(base, "nf4")` streams the GGUF: each linear weight is
dequantized, handed to bitsandbytes and quantized to NF4 at once (`set_nf4`), so at most one
float32 matrix is alive beside the NF4 weights and the float embedding.

The result is cached under $EDGEFED_HOME/cache/nf4/<base sha256>/ (safetensors holding the
packed NF4 weights and their quantization statistics), so the second load skips all of this.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from edgefed.atomic import atomic_dir
from edgefed.home import cache_dir
from edgefed.quant.gguf_file import read_base_info, resolve_base
from edgefed.quant.training_copy import (
    KEEP_FLOAT,
    ROPE_FACTORS_BUFFER,
    build_training_model,
    empty_model,
    finish,
    scale_rope,
    set_float,
)

logger = logging.getLogger(__name__)

# 2: a base's RoPE factors (Llama 3's scaling) are kept in the cache
CACHE_FORMAT_VERSION = 2
NF4_BLOCKSIZE = 64


def replace_linears(model) -> None:
    """Swap the meta model's linear layers (but the embedding and head) for NF4 ones."""
    import bitsandbytes as bnb
    import torch

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and not name.endswith(KEEP_FLOAT):
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


def set_nf4(model, name: str, weight) -> None:
    """Quantize one float matrix to NF4 in place of its meta weight."""
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
    model = empty_model(config)
    replace_linears(model)
    state = load_file(folder / "model.safetensors")
    for name, module in model.named_modules():
        prefix = f"{name}.weight."
        if isinstance(module, bnb.nn.Linear4bit):
            stats = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            module.weight = bnb.nn.Params4bit.from_prequantized(
                data=state[f"{name}.weight"], quantized_stats=stats, device="cpu", module=module
            )
            if module.bias is not None:
                set_float(model, f"{name}.bias", state[f"{name}.bias"])
    for name, _ in list(model.named_parameters()):
        if name in state and not isinstance(
            model.get_submodule(name.rpartition(".")[0]), bnb.nn.Linear4bit
        ):
            set_float(model, name, state[name])
    model = finish(model)
    if ROPE_FACTORS_BUFFER in state:
        scale_rope(model, state[ROPE_FACTORS_BUFFER].numpy())
    return model


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
