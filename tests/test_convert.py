"""HF folder -> GGUF: tokenization and logits agree with transformers, for Llama and Qwen2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, hf_tokens, load_hf

from edgefed.quant.hf_convert import permute_for_rope, unpermute_for_rope
from edgefed.quant.tokenizer_meta import detect_pre_tokenizer
from edgefed.runtime import LlamaRuntime


def test_llama_cpp_tokenizes_exactly_like_hugging_face(tiny_gguf):
    kind, folder, gguf_path = tiny_gguf
    expected = hf_tokens(folder, SAMPLE_TEXT)
    with LlamaRuntime(gguf_path) as runtime:
        got = runtime.tokenize(SAMPLE_TEXT, add_bos=False).tolist()
    assert got == expected, f"{kind}: llama.cpp {got[:20]}... != HF {expected[:20]}..."


def test_next_token_distributions_match_transformers_fp32(tiny_gguf):
    _kind, folder, gguf_path = tiny_gguf
    tokens = hf_tokens(folder, SAMPLE_TEXT)
    with torch.no_grad():
        logits = load_hf(folder)(torch.tensor([tokens])).logits[0, :-1].double()
    reference = torch.log_softmax(logits, -1).numpy()
    with LlamaRuntime(gguf_path) as runtime:
        logprobs, positions = runtime.token_logprobs(tokens)
        top = runtime.top_k(tokens, 2)
    assert positions.tolist() == list(range(1, len(tokens)))
    expected = reference[np.arange(len(tokens) - 1), tokens[1:]]
    assert np.abs(logprobs - expected).max() < 0.03  # f16 weights against fp32
    assert np.abs(top.logprobs[:, 0] - reference.max(-1)).max() < 0.03
    # same argmax everywhere the fp32 model is not within f16 noise of a tie
    ranked = np.sort(reference, axis=-1)
    decided = ranked[:, -1] - ranked[:, -2] > 0.03
    assert decided.mean() > 0.9
    assert (top.token_ids[decided, 0] == reference.argmax(-1)[decided]).all()


def test_llama_q_k_rows_are_permuted_and_qwen2_are_not(tiny_gguf):
    import gguf

    kind, folder, gguf_path = tiny_gguf
    from safetensors.torch import load_file

    hf = load_file(folder / "model.safetensors")
    q_hf = hf["model.layers.0.self_attn.q_proj.weight"].numpy()
    reader = gguf.GGUFReader(gguf_path)
    q_gguf = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    stored = np.array(q_gguf.data, dtype=np.float32).reshape(q_hf.shape)
    expected = permute_for_rope(q_hf, 4) if kind == "llama" else q_hf
    np.testing.assert_allclose(stored, expected, atol=1e-3)


def test_permutation_round_trips():
    weight = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
    assert not np.array_equal(permute_for_rope(weight, 4), weight)
    np.testing.assert_array_equal(unpermute_for_rope(permute_for_rope(weight, 4), 4), weight)


@pytest.mark.parametrize(
    ("pre_tokenizer", "expected"),
    [
        ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": True},
                    {"type": "ByteLevel", "use_regex": True},
                ],
            },
            "smollm",
        ),
        ({"type": "Whitespace"}, None),
        (None, None),
    ],
)
def test_pre_tokenizer_detection(pre_tokenizer, expected):
    assert detect_pre_tokenizer(pre_tokenizer) == expected


def test_qwen2_and_llama3_split_regexes_are_recognised(tiny_gguf):
    from transformers import AutoTokenizer

    kind, folder, _ = tiny_gguf
    spec = json.loads(AutoTokenizer.from_pretrained(folder).backend_tokenizer.to_str())
    # transformers rebuilds Qwen2's pre-tokenizer with its own split regex; llama keeps the file's
    assert detect_pre_tokenizer(spec["pre_tokenizer"]) == {"llama": "gpt-2", "qwen2": "qwen2"}[kind]
