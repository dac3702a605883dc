"""PEFT LoRA -> GGUF LoRA: llama.cpp with the adapter matches PEFT on transformers."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE_TEXT, attach_random_lora, hf_tokens, load_hf

from edgefed.errors import AdapterMismatchError, UnsupportedModelError
from edgefed.quant.lora_gguf import convert_lora_to_gguf
from edgefed.runtime import LlamaRuntime
from edgefed.train.perplexity import torch_perplexity

WINDOW = 128


def _peft_and_runtime_perplexity(folder, base, peft_model, gguf_adapter):
    tokens = hf_tokens(folder, SAMPLE_TEXT * 2)
    expected = torch_perplexity(peft_model, tokens, window=WINDOW).perplexity
    with LlamaRuntime(base, window=WINDOW) as runtime:
        got = runtime.perplexity(tokens, runtime.load_adapter(gguf_adapter)).perplexity
    return got, expected


def test_runtime_perplexity_with_adapter_matches_peft(tiny_lora):
    from peft import PeftModel

    _kind, folder, base, peft_dir, gguf_adapter = tiny_lora
    peft_model = PeftModel.from_pretrained(load_hf(folder), peft_dir).eval()
    got, expected = _peft_and_runtime_perplexity(folder, base, peft_model, gguf_adapter)
    with peft_model.disable_adapter():
        base_ppl = torch_perplexity(peft_model, hf_tokens(folder, SAMPLE_TEXT * 2), window=WINDOW)
    assert abs(got / expected - 1) < 0.01
    assert abs(base_ppl.perplexity / expected - 1) > 0.03  # the adapter really changes the model


def test_rslora_and_alpha_pattern_are_folded_into_b(tiny_gguf, tmp_path):
    _kind, folder, base = tiny_gguf
    peft_model = attach_random_lora(
        load_hf(folder), seed=5, use_rslora=True, alpha_pattern={"v_proj": 2.0}, rank_pattern={}
    )
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = convert_lora_to_gguf(tmp_path / "peft", tmp_path / "a.gguf", base=base)
    got, expected = _peft_and_runtime_perplexity(folder, base, peft_model, adapter)
    assert abs(got / expected - 1) < 0.01


def test_dora_is_refused_and_nothing_is_written(tiny_lora, tmp_path):
    _kind, _folder, base, peft_dir, _ = tiny_lora
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes(
        (peft_dir / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(UnsupportedModelError, match="DoRA"):
        convert_lora_to_gguf(dora, tmp_path / "out.gguf", base=base)
    assert list(tmp_path.glob("*.gguf")) == [] and not list(tmp_path.glob(".*tmp"))


def test_adapter_for_another_base_is_refused(tiny_lora, tmp_path, tokenizer_dir):
    from conftest import build_tiny_model

    from edgefed.quant.hf_convert import convert_hf_to_gguf

    kind, _folder, _base, peft_dir, gguf_adapter = tiny_lora
    other = build_tiny_model(kind, tmp_path / "other", tokenizer_dir, hidden_size=128)
    other_base = convert_hf_to_gguf(other, tmp_path / "other.gguf")
    with pytest.raises(AdapterMismatchError, match="another base"):
        convert_lora_to_gguf(peft_dir, tmp_path / "x.gguf", base=other_base)
    assert not (tmp_path / "x.gguf").exists()
    with LlamaRuntime(other_base) as runtime, pytest.raises(AdapterMismatchError):
        runtime.load_adapter(gguf_adapter)


def test_rank_padding_changes_nothing_on_an_f32_base(tiny_hf, tmp_path):
    """The fast layout (rank padded to 16, float32) scores what the plain rank-4 file does."""
    import gguf

    from edgefed.quant.hf_convert import convert_hf_to_gguf
    from edgefed.quant.lora_gguf import RANK_MULTIPLE

    _kind, folder = tiny_hf
    base = convert_hf_to_gguf(folder, tmp_path / "base.f32.gguf", out_type="f32")
    attach_random_lora(load_hf(folder), seed=3, rank=4, alpha=8.0).save_pretrained(tmp_path / "p")
    plain = convert_lora_to_gguf(
        tmp_path / "p", tmp_path / "plain.gguf", base=base, rank_multiple=1
    )
    padded = convert_lora_to_gguf(tmp_path / "p", tmp_path / "padded.gguf", base=base)
    reader = gguf.GGUFReader(padded)
    assert reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents() == 8.0 * RANK_MULTIPLE / 4
    a = next(t for t in reader.tensors if t.name.endswith(".lora_a"))
    b = next(t for t in reader.tensors if t.name.endswith(".lora_b"))
    assert a.tensor_type == gguf.GGMLQuantizationType.F32
    assert a.data.shape[0] == RANK_MULTIPLE and b.data.shape[1] == RANK_MULTIPLE
    assert not a.data[4:].any() and not b.data[:, 4:].any()  # the padding is zeros
    tokens = hf_tokens(folder, SAMPLE_TEXT * 2)
    with LlamaRuntime(base, window=WINDOW) as runtime:
        plain_nll = runtime.perplexity(tokens, runtime.load_adapter(plain)).mean_nll
        padded_nll = runtime.perplexity(tokens, runtime.load_adapter(padded)).mean_nll
        base_nll = runtime.perplexity(tokens).mean_nll
    assert abs(padded_nll / plain_nll - 1) < 1e-5
    assert abs(base_nll / plain_nll - 1) > 1e-4  # the adapter does change the scores
