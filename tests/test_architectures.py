"""Every family of the architecture table, end to end on a tiny random model of it.

One parametrised module: a record added to `edgefed.quant.architectures` (with its tiny model's
dimensions in conftest's FAMILY_DIMS) gets conversion, runtime, training-copy, loss and
LoRA-export tests with nothing else to write. The broader suites keep Llama and Qwen2.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import (
    FAMILIES,
    SAMPLE_TEXT,
    assert_one_line_error,
    attach_random_lora,
    build_tiny_model,
    hf_tokens,
    load_hf,
    run,
    write_repetitive_corpus,
)

from edgefed.adapter import LoraSpec, attach_lora
from edgefed.quant.architectures import ARCHITECTURES, architecture_for_model_type
from edgefed.quant.gguf_file import copy_metadata, read_base_info
from edgefed.quant.hf_convert import convert_hf_to_gguf
from edgefed.quant.lora_gguf import convert_lora_to_gguf
from edgefed.quant.merge import merge_lora
from edgefed.quant.training_copy import build_training_model
from edgefed.runtime import LlamaRuntime
from edgefed.runtime.generate import Sampling
from edgefed.runtime.quantize import requantize
from edgefed.train.loss import IGNORE, causal_lm_loss
from edgefed.train.perplexity import torch_perplexity

# the whole suite only: `make test-fast` leaves this module out (docs/developer/index.md)
pytestmark = pytest.mark.slow

WINDOW = 128


def test_the_tests_build_every_family_of_the_table():
    assert {architecture_for_model_type(t).gguf_name for t in FAMILIES} == set(ARCHITECTURES)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, tokenizer_dir):
    """(model_type, HF folder, f32 GGUF written by `quant convert`'s code) of one family."""
    folder = tmp_path_factory.mktemp(f"family-{request.param}")
    hf = build_tiny_model(request.param, folder / "hf", tokenizer_dir)
    return request.param, hf, convert_hf_to_gguf(hf, folder / "f32.gguf", out_type="f32")


def _reference_logprobs(folder, tokens) -> np.ndarray:
    with torch.no_grad():
        logits = load_hf(folder)(torch.tensor([tokens])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).numpy()


def test_llama_cpp_runs_the_converted_model_as_transformers_does(family):
    kind, folder, base = family
    tokens = hf_tokens(folder, SAMPLE_TEXT)
    assert len(tokens) > 40  # past the tiny Gemmas' 16-token local attention
    reference = _reference_logprobs(folder, tokens)
    with LlamaRuntime(base) as runtime:
        assert runtime.tokenize(SAMPLE_TEXT, add_bos=False).tolist() == tokens
        logprobs, _ = runtime.token_logprobs(tokens)
    expected = reference[np.arange(len(tokens) - 1), tokens[1:]]
    assert np.abs(logprobs - expected).max() < 0.01, kind  # llama.cpp: f16 KV cache
    assert read_base_info(base).architecture == architecture_for_model_type(kind).gguf_name


def test_the_training_copies_compute_what_transformers_does_and_train_only_lora(family, tmp_path):
    kind, folder, base = family
    tokens = hf_tokens(folder, SAMPLE_TEXT)
    ids = torch.tensor([tokens])
    reference = torch.from_numpy(_reference_logprobs(folder, tokens))
    with torch.inference_mode():
        fp32 = torch.log_softmax(build_training_model(base, "fp32")(ids).logits[0, :-1], -1)
    assert (fp32.double() - reference).abs().max() < 1e-4, kind

    # the gguf copy of a quantized file computes the fp32 copy's numbers of the same file
    q8 = requantize(base, tmp_path / "q8_0.gguf", "q8_0")
    native, float_copy = build_training_model(q8, "gguf"), build_training_model(q8, "fp32")
    with torch.inference_mode():
        assert torch.equal(native(ids).logits, float_copy(ids).logits), kind

    # gradients reach every default target's LoRA tensors and nothing else
    spec = LoraSpec(rank=4).for_architecture(read_base_info(base).architecture)
    assert set(spec.targets) == set(architecture_for_model_type(kind).lora_targets)
    model = attach_lora(native, spec)
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    lora = {n for n, p in model.named_parameters() if "lora_" in n}
    assert with_grad == lora and len(lora) == 2 * len(spec.targets) * 2, kind
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in lora if "lora_B" in n)


def test_the_sliced_loss_is_the_familys_own_loss_with_its_gradient(family):
    """Gemma 2 soft-caps its logits: the sliced loss must cap them the same way."""
    kind, _, base = family
    model = attach_lora(build_training_model(base, "fp32"), LoraSpec(rank=4))
    model.eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = ids.masked_fill(mask == 0, IGNORE)
    results = []
    for compute in (
        lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss,
        lambda: causal_lm_loss(model, ids, mask, labels, vocab_slice=5000),
    ):
        model.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                      if p.grad is not None}))  # fmt: skip
    (want, want_grads), (got, got_grads) = results
    assert got == pytest.approx(want, rel=1e-6), kind
    for name, grad in got_grads.items():
        assert torch.allclose(grad, want_grads[name], rtol=1e-4, atol=1e-7), (kind, name)


def test_an_exported_adapter_scores_in_llama_cpp_as_in_peft(family, tmp_path):
    kind, folder, base = family
    targets = list(architecture_for_model_type(kind).lora_targets)
    peft_model = attach_random_lora(load_hf(folder), targets=targets, alpha=32.0)
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = convert_lora_to_gguf(tmp_path / "peft", tmp_path / "adapter.gguf", base=base)
    tokens = hf_tokens(folder, SAMPLE_TEXT * 2)
    expected = torch_perplexity(peft_model, tokens, window=WINDOW).perplexity
    with LlamaRuntime(base, window=WINDOW) as runtime:
        got = runtime.perplexity(tokens, runtime.load_adapter(adapter)).perplexity
        bare = runtime.perplexity(tokens).perplexity
    assert abs(got / expected - 1) < 0.01, (kind, got, expected)
    assert abs(bare / expected - 1) > 0.03, kind  # the adapter really changes the model
    # merged into the (f32) base, it computes what base + adapter compute, and writes text
    merged = merge_lora(base, adapter, tmp_path / "merged.gguf", "f32")
    with LlamaRuntime(merged, window=WINDOW) as runtime:
        assert runtime.perplexity(tokens).perplexity == pytest.approx(got, rel=1e-4), kind
        written = runtime.generate(SAMPLE_TEXT, None, Sampling(max_tokens=4, temperature=0))
    assert written.tokens == 4 or written.stop == "end", kind


def _rewritten(source, destination, *, arch: str | None = None, extra: dict | None = None, keys=()):
    """The GGUF `source` with its architecture (and its keys' prefix) renamed to `arch`, the
    tensors of `extra` (name -> array) and the (key, value, GGUFValueType) of `keys` added."""
    import gguf

    reader = gguf.GGUFReader(source)
    old = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    arch = arch or old
    writer = gguf.GGUFWriter(destination, arch)
    copy_metadata(
        reader, writer, rename=lambda name: re.sub(rf"^{re.escape(old)}\.", f"{arch}.", name)
    )
    for name, value, value_type in keys:
        writer.add_key_value(name, value, value_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return destination


def test_a_family_edgefed_cannot_train_is_still_evaluated_and_training_says_why(
    tmp_path, tokenizer_dir
):
    """Gemma (the first) is llama.cpp's, not edgefed's: a tied Llama's tensors under its name."""
    hf = build_tiny_model("llama", tmp_path / "hf", tokenizer_dir, tie_word_embeddings=True)
    gemma = _rewritten(convert_hf_to_gguf(hf, tmp_path / "llama.gguf"), tmp_path / "gemma.gguf",
                       arch="gemma")  # fmt: skip
    data = write_repetitive_corpus(tmp_path / "notes", 12)
    shown = run("base", "show", gemma, "--json")
    assert shown.exit_code == 0 and '"supported": false' in shown.stdout, shown.stderr
    scored = run("evaluate", "--base", gemma, "--data", data, "--window", "64", "--json")
    assert scored.exit_code == 0, scored.stderr
    assert '"perplexity"' in scored.stdout
    refused = run("train", "--base", gemma, "--data", data, "--out", tmp_path / "run")
    assert_one_line_error(refused, "training does not support architecture 'gemma'", "evaluate")
    assert not (tmp_path / "run").exists()


# Llama 3.1/3.2's RoPE scaling, with an original context short enough to act on the test text
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # fmt: skip


def test_llama_3_rope_scaling_is_converted_and_trained_as_llama_cpp_runs_it(
    tmp_path, tokenizer_dir
):
    """Llama 3.x stretch RoPE's long wavelengths: conversion writes llama.cpp's rope_freqs
    factors and the training copies (the NF4 cache included) divide their frequencies by them,
    so llama.cpp and every copy compute transformers' model, not the plain-RoPE one."""
    from edgefed.quant.nf4 import load_training_model

    hf = build_tiny_model("llama", tmp_path / "hf", tokenizer_dir, rope_parameters=LLAMA3_ROPE)
    plain = build_tiny_model("llama", tmp_path / "plain", tokenizer_dir)  # same weights
    base = convert_hf_to_gguf(hf, tmp_path / "f32.gguf", out_type="f32")
    assert "rope_freqs.weight" in {t.name for t in read_base_info(base).tensors}
    tokens = hf_tokens(hf, SAMPLE_TEXT * 2)
    reference = _reference_logprobs(hf, tokens)
    assert np.abs(reference - _reference_logprobs(plain, tokens)).max() > 0.05  # it acts

    with LlamaRuntime(base) as runtime:
        logprobs, _ = runtime.token_logprobs(tokens)
    expected = reference[np.arange(len(tokens) - 1), tokens[1:]]
    assert np.abs(logprobs - expected).max() < 0.01
    ids = torch.tensor([tokens])
    with torch.inference_mode():
        for precision in ("fp32", "gguf"):
            copy = build_training_model(base, precision)
            got = torch.log_softmax(copy(ids).logits[0, :-1], -1).double()
            assert (got - torch.from_numpy(reference)).abs().max() < 1e-4, precision
        built, cached = load_training_model(base), load_training_model(base)
        assert torch.equal(cached.model.rotary_emb.inv_freq, built.model.rotary_emb.inv_freq)
        assert torch.equal(cached(ids).logits, built(ids).logits)


@pytest.mark.parametrize("scaling", ["factors", "keys"])
def test_rope_scaling_the_copy_cannot_compute_is_refused_in_one_line(
    scaling, tmp_path, tokenizer_dir
):
    """Phi-3's long-context factors (rope_factors_long) and a scaling given by keys (linear,
    as Gemma 3 4B's), both of which llama.cpp runs, are not Llama 3's frequency divisors:
    training says so instead of training another model."""
    import gguf

    phi3 = build_tiny_model("phi3", tmp_path / "hf", tokenizer_dir)
    source = convert_hf_to_gguf(phi3, tmp_path / "plain.gguf", out_type="f32")
    if scaling == "factors":
        changed = {"extra": {"rope_factors_long.weight": np.ones(8, dtype=np.float32)}}
        needles = ("rope_factors_long", "training copy")
    else:
        changed = {
            "keys": [
                ("phi3.rope.scaling.type", "linear", gguf.GGUFValueType.STRING),
                ("phi3.rope.scaling.factor", 8.0, gguf.GGUFValueType.FLOAT32),
            ]
        }
        needles = ("linear, factor 8", "training copy")
    long = _rewritten(source, tmp_path / "long.gguf", **changed)
    shown = run("base", "show", long, "--json")
    assert shown.exit_code == 0 and '"supported": false' in shown.stdout, shown.stderr
    data = write_repetitive_corpus(tmp_path / "notes", 12)
    refused = run("train", "--base", long, "--data", data, "--out",
                  tmp_path / "run", "--steps", 1)  # fmt: skip
    assert_one_line_error(refused, *needles)
    assert not (tmp_path / "run").exists()
