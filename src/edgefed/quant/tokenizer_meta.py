"""Tokenizer metadata for a GGUF written from a Hugging Face folder.

llama.cpp tokenizes by itself from what the GGUF says: the token list, token types, merges and,
crucially, the name of the pre-tokenizer (`tokenizer.ggml.pre`), which selects the regex that
splits text before BPE runs. A wrong name gives a model that loads fine and tokenizes
differently from Hugging Face. We therefore recognise the pre-tokenizer from the structure of the
tokenizer (a table, below) and refuse what we do not recognise rather than guess.

The structure is read from the tokenizer transformers actually builds for the folder, not from
the raw tokenizer.json: for some model types (Qwen2 in transformers 5) the tokenizer class
replaces the file's pre-tokenizer with its own, and llama.cpp must match what users get.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgefed.errors import ModelFormatError, UnsupportedModelError

# The split regexes of known BPE pre-tokenizers, as Hugging Face writes them in tokenizer.json,
# and the name llama.cpp knows each one by.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_REGEX_TO_PRE = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def _byte_level_with_regex(step: dict[str, Any]) -> bool:
    return step.get("type") == "ByteLevel" and step.get("use_regex", True)


def detect_pre_tokenizer(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a tokenizer.json `pre_tokenizer`, or None if we don't know it."""
    if pre is None:
        return None
    if _byte_level_with_regex(pre):
        return "gpt-2"
    if pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers", [])
    kinds = [step.get("type") for step in steps]
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and _byte_level_with_regex(steps[1])
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        return SPLIT_REGEX_TO_PRE.get(regex)
    return None


def write_tokenizer(writer, folder: Path, n_vocab: int) -> None:
    """Add the tokenizer of HF `folder` to a GGUFWriter, padded to the model's `n_vocab` rows.

    Raises ModelFormatError when tokenizer.json is missing or unreadable and
    UnsupportedModelError for tokenizers llama.cpp would not reproduce exactly.
    """
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        if (folder / "tokenizer.model").is_file():
            raise UnsupportedModelError(
                f"{folder} has only a SentencePiece tokenizer.model",
                "save the tokenizer as tokenizer.json (a fast tokenizer) and convert again",
            )
        raise ModelFormatError(
            f"{folder} has no tokenizer.json", "save the tokenizer with the model"
        )
    spec = _effective_tokenizer_spec(folder)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedModelError(
            f"{path} is a {model.get('type')} tokenizer"
            + (" with byte fallback (SentencePiece-style)" if model.get("byte_fallback") else ""),
            "edgefed converts byte-level BPE tokenizers (SmolLM, Llama 3, Qwen2, GPT-2 style)",
        )
    pre = detect_pre_tokenizer(spec.get("pre_tokenizer"))
    if pre is None:
        raise UnsupportedModelError(
            f"the pre-tokenizer in {path} is not one llama.cpp reproduces "
            f"({json.dumps(spec.get('pre_tokenizer'))[:120]})",
            "use a model with a SmolLM, Llama 3, Qwen2 or GPT-2 style tokenizer",
        )

    id_to_token: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    token_type = {i: gguf.TokenType.NORMAL for i in id_to_token}
    for added in spec.get("added_tokens", []):
        tid = int(added["id"])
        id_to_token[tid] = added["content"]
        token_type[tid] = (
            gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        )
    largest = max(id_to_token) + 1
    if largest > n_vocab:
        raise ModelFormatError(
            f"the tokenizer has {largest} tokens but the model's embedding only {n_vocab} rows",
            "the tokenizer does not belong to this model",
        )
    tokens: list[str] = []
    types: list[int] = []
    for tid in range(n_vocab):
        if tid in id_to_token:
            tokens.append(id_to_token[tid])
            types.append(int(token_type[tid]))
        else:  # embedding rows beyond the tokenizer (padding for matmul speed)
            tokens.append(f"[PAD{tid}]")
            types.append(int(gguf.TokenType.UNUSED))

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = model.get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)


def _effective_tokenizer_spec(folder: Path) -> dict[str, Any]:
    """The tokenizer.json of the tokenizer transformers builds for `folder` (see module doc)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return json.loads(tokenizer.backend_tokenizer.to_str())
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise ModelFormatError(
            f"cannot load the tokenizer in {folder} ({exc})", "save the tokenizer again"
        ) from exc
