"""The gguf training copy: the file's own blocks, dequantized by torch to exactly the file's values.

Every supported type is made by llama.cpp's own quantizer from tiny random Llama and Qwen2
models wide enough (256) for the 256-weight K blocks; the copy's logits must be the very
numbers of the fp32 copy (gguf's numpy dequantizers), not close ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, build_tiny_model, run

from edgefed.adapter import LoraSpec, attach_lora
from edgefed.demo_text import demo_evaluation_text
from edgefed.errors import ModelFormatError
from edgefed.quant.gguf_blocks import BLOCK_TYPES, dequantize_fields, split_blocks, type_name
from edgefed.quant.gguf_file import embedded_base_path, read_base_info, read_tensor_bytes
from edgefed.quant.gguf_layers import GGUFEmbedding, GGUFLinear
from edgefed.quant.training_copy import build_training_model, frozen_weight_bytes
from edgefed.runtime import LlamaRuntime
from edgefed.runtime.quantize import requantize
from edgefed.train.perplexity import torch_perplexity

# the whole suite only: `make test-fast` leaves this module out (docs/developer/index.md)
pytestmark = pytest.mark.slow

WIDE = {"hidden_size": 256, "intermediate_size": 512}
# llama.cpp file type -> the block type it gives the layers' matrices
FILE_TYPES = {
    "f32": "F32",
    "f16": "F16",
    "bf16": "BF16",
    "q4_0": "Q4_0",
    "q4_1": "Q4_1",
    "q5_0": "Q5_0",
    "q5_1": "Q5_1",
    "q8_0": "Q8_0",
    "q4_k_s": "Q4_K",
    "q5_k_s": "Q5_K",
    "q6_k": "Q6_K",
}


def _wide_f32(kind: str, tmp_path_factory, tokenizer_dir):
    from edgefed.quant.hf_convert import convert_hf_to_gguf

    folder = tmp_path_factory.mktemp(f"wide-{kind}")
    build_tiny_model(kind, folder / "hf", tokenizer_dir, **WIDE)
    return convert_hf_to_gguf(folder / "hf", folder / "f32.gguf", out_type="f32")


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, tokenizer_dir):
    return _wide_f32("llama", tmp_path_factory, tokenizer_dir)


@pytest.fixture(scope="module")
def wide_qwen2(tmp_path_factory, tokenizer_dir):
    return _wide_f32("qwen2", tmp_path_factory, tokenizer_dir)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_every_supported_type_gives_the_fp32_copys_logits_and_trains_only_lora(
    kind, request, tmp_path
):
    f32 = request.getfixturevalue(f"wide_{kind}")
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    for file_type, block_type in FILE_TYPES.items():
        base = (
            f32
            if file_type == "f32"
            else requantize(f32, tmp_path / f"{file_type}.gguf", file_type)
        )
        matrices = {type_name(e.type) for e in read_base_info(base).tensors if len(e.shape) > 1}
        assert block_type in matrices, (file_type, matrices)
        native = build_training_model(base, "gguf")
        reference = build_training_model(base, "fp32")
        layer = native.model.layers[0]
        assert isinstance(layer.mlp.up_proj, GGUFLinear)
        assert isinstance(native.model.embed_tokens, GGUFEmbedding)
        with torch.inference_mode():
            got, want = native(ids).logits, reference(ids).logits
        assert torch.equal(got, want), (kind, file_type, (got - want).abs().max())
        if kind == "qwen2":  # a tied head is the embedding's blocks, held once
            assert native.lm_head.blocks is native.model.embed_tokens.blocks
        assert frozen_weight_bytes(native) < 0.6 * frozen_weight_bytes(reference) or (
            block_type == "F32"
        )

    # gradients reach the LoRA tensors and nothing else, through dequantized forward and
    # backward (B starts at zero, so only B's gradients are non-zero on the first step)
    model = attach_lora(native, LoraSpec(rank=4))
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    lora = {n for n, p in model.named_parameters() if "lora_" in n}
    assert with_grad == lora
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in lora if "lora_B" in n)


def test_the_torch_dequantizers_match_ggufs_for_every_type_on_any_bits():
    """Random bytes reach every code and sign; NaN scales must stay NaN in the same places."""
    import gguf

    rng = np.random.default_rng(0)
    for name, (type_id, block, size) in BLOCK_TYPES.items():
        if name in ("F32", "F16", "BF16"):
            values = rng.standard_normal((3, 512)).astype(np.float32)
            raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType(type_id))
            raw = raw.view(np.uint8).reshape(3, -1)
        else:
            raw = rng.integers(0, 256, size=(3, 512 // block * size), dtype=np.uint8)
        with np.errstate(invalid="ignore"):
            want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(type_id))
        fields = split_blocks(raw, type_id)
        got = dequantize_fields(fields, type_id).numpy()
        assert np.array_equal(got, want.reshape(3, 512), equal_nan=True), name
        rows = dequantize_fields({k: v[torch.tensor([2, 0])] for k, v in fields.items()}, type_id)
        assert np.array_equal(rows.numpy(), want.reshape(3, 512)[[2, 0]], equal_nan=True), name


def test_the_embedded_base_copy_is_the_file_at_a_sixth_of_fp32s_memory():
    with LlamaRuntime(embedded_base_path()) as runtime:
        tokens = runtime.tokenize(demo_evaluation_text(docs_per_topic=1))[:1024]
        gguf_ppl = runtime.perplexity(tokens).perplexity
    native = build_training_model(None, "gguf")
    native_ppl = torch_perplexity(native, tokens, window=512).perplexity
    reference = build_training_model(None, "fp32")
    assert torch_perplexity(reference, tokens, window=512).perplexity == native_ppl
    assert abs(native_ppl / gguf_ppl - 1) < 0.005, (native_ppl, gguf_ppl)
    size = embedded_base_path().stat().st_size
    assert frozen_weight_bytes(native) < 1.0 * size < 0.2 * frozen_weight_bytes(reference)


def test_a_base_the_copy_cannot_keep_is_refused_in_one_line(wide_llama, tmp_path, train_corpus):
    f32 = wide_llama
    q3 = requantize(f32, tmp_path / "q3_k_m.gguf", "q3_k_m")
    with pytest.raises(ModelFormatError, match=r"is Q3_K.*--precision fp32"):
        build_training_model(q3, "gguf")
    result = run(
        "train", "--data", train_corpus, "--base", q3, "--out", tmp_path / "run",
        "--steps", "1", "--precision", "gguf",
    )  # fmt: skip
    assert_one_line_error(result, "Q3_K", "supported", "--precision fp32")
    assert not (tmp_path / "run").exists()

    # a file cut short after it was described: the read says so, nothing is built
    info = read_base_info(f32)
    last = max(info.tensors, key=lambda e: e.offset)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(f32.read_bytes()[: last.offset + last.n_bytes // 2])
    with pytest.raises(ModelFormatError, match="truncated"):
        read_tensor_bytes(cut, last)
