"""The model families edgefed trains: one record each, read by every module that converts,
rebuilds or adapts a model.

Most of what a family means is mapped by well-kept libraries, and this table leaves it there:
tensor names by gguf-py's `TensorNameMap` (it knows every architecture llama.cpp runs), the
GGUF metadata keys that become a transformers config by transformers' own GGUF tables
(`transformers.integrations.ggml.GGUF_CONFIG_MAPPING`, private: `config_from_gguf` fails with
one line if it moves). A record holds only what neither says and edgefed's code needs:

- which Hugging Face `model_type`s convert to the GGUF architecture, and which transformers
  model the training copy is built as;
- llama.cpp's storage conventions that differ from transformers' weights: q/k rows permuted
  for its RoPE kernel (the LLAMA architecture only), norm weights stored as 1 + w (Gemma,
  whose transformers norms compute x * (1 + w)). (Gemma's embedding is scaled by sqrt(hidden)
  at run time in both runtimes: transformers' module says so, and the training copy keeps it.)
- GGUF keys transformers' table does not map (Gemma 2's logit soft-caps);
- the module names LoRA targets by default, grouped by the block they live in (Phi-3 fuses
  q/k/v into `qkv_proj` and gate/up into `gate_up_proj`).

A new family is one record here; the tests build a tiny model of every record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from edgefed.errors import UnsupportedModelError

ATTENTION_BLOCK, MLP_BLOCK = "self_attn", "mlp"
_LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    """What edgefed needs to know about one model family (see the module docstring)."""

    gguf_name: str  # the GGUF's general.architecture
    hf_model_types: tuple[str, ...]  # config.json model_types `quant convert` writes as it
    config_model_type: str  # the transformers model the training copy is built as
    permuted_qk: bool = False  # q/k rows stored in llama.cpp's interleaved RoPE order
    norm_offset: float = 0.0  # GGUF norm weight = transformers norm weight + this
    local_attention: bool = False  # sliding-window layers (`attention.sliding_window`)
    # GGUF key (without the "<arch>." prefix) -> config field, beyond transformers' table
    extra_config_keys: Mapping[str, str] = field(default_factory=dict)
    attention_modules: tuple[str, ...] = _LLAMA_ATTENTION
    mlp_modules: tuple[str, ...] = _LLAMA_MLP

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """Every projection of a block: the default LoRA targets."""
        return self.attention_modules + self.mlp_modules

    def block_of(self, module: str) -> str:
        """The sub-block of a decoder layer that holds projection `module`."""
        return ATTENTION_BLOCK if module in self.attention_modules else MLP_BLOCK

    def gguf_arch(self):
        """gguf-py's MODEL_ARCH member (looked up by name: members are not always upper())."""
        import gguf

        return next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.gguf_name)

    def tensor_name_map(self, n_layers: int):
        """gguf-py's HF -> GGUF tensor name map for this family's `n_layers` blocks."""
        import gguf

        return gguf.get_tensor_name_map(self.gguf_arch(), n_layers)


_GEMMA = {"norm_offset": 1.0, "local_attention": True}
ARCHITECTURES: dict[str, Architecture] = {
    a.gguf_name: a
    for a in (
        # llama.cpp runs Mistral's dense models as LLAMA (gguf-py has no MISTRAL), without
        # local attention: its converter drops Mistral's sliding window, and so does edgefed
        Architecture("llama", ("llama", "mistral"), "llama", permuted_qk=True),
        Architecture("qwen2", ("qwen2",), "qwen2"),
        Architecture("qwen3", ("qwen3",), "qwen3"),
        Architecture(
            "gemma2",
            ("gemma2",),
            "gemma2",
            **_GEMMA,
            extra_config_keys={
                "attn_logit_softcapping": "attn_logit_softcapping",
                "final_logit_softcapping": "final_logit_softcapping",
            },
        ),
        Architecture("gemma3", ("gemma3_text",), "gemma3_text", **_GEMMA),
        Architecture(
            "phi3",
            ("phi3",),
            "phi3",
            local_attention=True,
            attention_modules=("qkv_proj", "o_proj"),
            mlp_modules=("gate_up_proj", "down_proj"),
        ),
    )
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def architecture(gguf_name: str, *, part: str = "training") -> Architecture:
    """The record of a GGUF architecture, or one line saying that `part` cannot handle it."""
    try:
        return ARCHITECTURES[gguf_name]
    except KeyError:
        raise UnsupportedModelError(
            f"{part} does not support architecture '{gguf_name or 'unknown'}' (edgefed "
            f"trains {', '.join(SUPPORTED_ARCHITECTURES)})",
            "evaluate it with `edgefed evaluate --base`, or train a base of a supported family",
        ) from None


def architecture_for_model_type(model_type: str) -> Architecture:
    """The record that converts Hugging Face `model_type`, or one line saying none does."""
    for record in ARCHITECTURES.values():
        if model_type in record.hf_model_types:
            return record
    known = sorted(t for a in ARCHITECTURES.values() for t in a.hf_model_types)
    raise UnsupportedModelError(
        f"quant convert does not support '{model_type or 'unknown'}' models",
        f"edgefed converts {', '.join(known)}; llama.cpp's convert_hf_to_gguf.py converts more "
        "(edgefed evaluates any GGUF llama.cpp loads)",
    )


def config_from_gguf(info):
    """A transformers config of the base's family with the GGUF's hyper-parameters.

    transformers' table maps the metadata keys; edgefed sets what it gets wrong or leaves out
    for these files: the head size (Qwen's and Gemma's differ from hidden / heads, and only
    `attention.key_length` says so), the vocabulary (from the token list, which every GGUF
    has), a tied head (no `output.weight`), the special tokens, and Gemma's attention scale
    (llama.cpp scales by 1/sqrt(head size); transformers by 1/sqrt(query_pre_attn_scalar)).
    """
    import gguf
    from transformers import AutoConfig

    record = architecture(info.architecture)
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

        mapping = dict(GGUF_CONFIG_MAPPING[record.gguf_name])
    except (ImportError, KeyError) as exc:
        raise UnsupportedModelError(
            f"this transformers has no GGUF config table for '{record.gguf_name}' ({exc})",
            "install the transformers version edgefed pins: pip install -e .",
        ) from exc
    mapping |= record.extra_config_keys
    prefix = f"{record.gguf_name}."
    kwargs = {
        field_name: info.hparams[prefix + key]
        for key, field_name in mapping.items()
        if field_name and prefix + key in info.hparams
    }
    kwargs |= {
        "vocab_size": info.vocab_size,
        "head_dim": info.head_dim,
        "tie_word_embeddings": "output.weight" not in info.tensor_shapes,
        "bos_token_id": info.hparams.get(gguf.Keys.Tokenizer.BOS_ID),
        "eos_token_id": info.hparams.get(gguf.Keys.Tokenizer.EOS_ID),
    }
    config = AutoConfig.for_model(record.config_model_type, **kwargs)
    if hasattr(config, "query_pre_attn_scalar"):
        config.query_pre_attn_scalar = config.head_dim
    return config
