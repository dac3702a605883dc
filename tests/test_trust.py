"""Trust schemes, their normalisation and the merges, on hand-built and trained tiny adapters."""

from __future__ import annotations

import pytest
import torch
from conftest import random_adapter

from edgefed.adapter import LoraSpec, save_lora_tensors
from edgefed.errors import DataError
from edgefed.trust.merge import merge_exact, merge_factors
from edgefed.trust.normalize import trust_row
from edgefed.trust.schemes import SCHEMES, Normalization, TrustInputs, compute_trust
from edgefed.trust.similarity import delta_cosine


def test_rows_sum_to_one_keep_self_and_honour_top_k_threshold_and_temperature():
    scores = [-3.0, -1.0, -2.0, -5.0, -1.5]
    for options in ({}, {"top_k": 2}, {"top_k": 1}, {"threshold": -2.5}, {"temperature": 0.01}):
        row = trust_row(scores, 0, **options)
        assert sum(row) == pytest.approx(1.0) and min(row) >= 0 and row[0] > 0, options
    assert [w > 0 for w in trust_row(scores, 0, top_k=3)] == [True, True, False, False, True]
    assert trust_row(scores, 0, top_k=1) == [1.0, 0, 0, 0, 0]
    assert [w > 0 for w in trust_row(scores, 0, threshold=-2.5)] == [True, True, True, False, True]
    sharp, flat = trust_row(scores, 0, temperature=0.05), trust_row(scores, 0, temperature=100)
    assert sharp[1] > 0.99 and max(flat) - min(flat) < 0.05
    with pytest.raises(ValueError, match="temperature"):
        trust_row(scores, 0, temperature=0)
    assert trust_row([-1.0, float("nan"), float("-inf"), -2.0], 0)[1:3] == [0.0, 0.0]


def test_local_is_bit_exact_and_fedavg_is_the_mean(shapes):
    adapters = {f"d{i}": random_adapter(shapes, i) for i in range(3)}
    inputs = TrustInputs(own="d1", adapters=adapters, train_tokens={"d0": 10, "d1": 30, "d2": 60})
    local = compute_trust("local", inputs)
    assert local.devices[0] == "d1" and local.weights == [1.0, 0.0, 0.0]
    ordered = [adapters[d] for d in local.devices]
    kept = merge_factors(ordered, local.weights).tensors
    assert all(torch.equal(kept[n], adapters["d1"][n]) for n in shapes)

    fedavg = compute_trust("fedavg", inputs)
    assert fedavg.weights == pytest.approx([1 / 3] * 3)
    mixed = merge_factors([adapters[d] for d in fedavg.devices], fedavg.weights).tensors
    for name in shapes:
        mean = (adapters["d0"][name] + adapters["d1"][name] + adapters["d2"][name]) / 3
        assert torch.allclose(mixed[name], mean, atol=1e-6)
    by_tokens = compute_trust("fedavg", inputs, by_tokens=True)
    assert dict(zip(by_tokens.devices, by_tokens.weights, strict=True)) == pytest.approx(
        {"d0": 0.1, "d1": 0.3, "d2": 0.6}
    )


def test_a_device_alone_gets_weight_one_without_any_scoring(shapes):
    alone = TrustInputs(own="d0", adapters={"d0": random_adapter(shapes, 0)})  # no runtime at all
    for scheme in SCHEMES:
        row = compute_trust(scheme, alone)
        assert row.devices == ["d0"] and row.weights == [1.0], scheme
    assert compute_trust("perplexity", alone).scores == [None]  # not scored, not invented
    with_peer = TrustInputs(
        own="d0", adapters={"d0": random_adapter(shapes, 0), "d1": random_adapter(shapes, 1)}
    )
    with pytest.raises(DataError, match="trust-validation text is missing"):
        compute_trust("perplexity", with_peer)  # a peer does need the runtime


def test_weight_similarity_compares_low_rank_products(shapes):
    own = random_adapter(shapes, 0)
    scaled = {n: t * (3.0 if "lora_B" in n else 0.5) for n, t in own.items()}
    flipped = {n: -t if "lora_B" in n else t for n, t in own.items()}
    assert delta_cosine(own, scaled) == pytest.approx(1.0)
    assert delta_cosine(own, flipped) == pytest.approx(-1.0)
    assert abs(delta_cosine(own, random_adapter(shapes, 99))) < 0.3
    # same ΔW from different factors (A rotated, B counter-rotated): still identical
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(5)))[0]
    rotated = {n: (rotation @ t if "lora_A" in n else t @ rotation.T) for n, t in own.items()}
    assert delta_cosine(own, rotated) == pytest.approx(1.0, abs=1e-6)
    row = compute_trust(
        "weights", TrustInputs(own="me", adapters={"me": own, "copy": scaled, "flip": flipped})
    )
    assert row.weight_of("copy") > row.weight_of("flip")


def test_exact_merge_reproduces_the_weighted_sum_up_to_the_rank_truncation(shapes):
    adapters = [random_adapter(shapes, seed) for seed in range(3)]
    weights = [0.5, 0.3, 0.2]
    result = merge_exact(adapters, weights)
    factors = merge_factors(adapters, weights)
    assert result.relative_error < factors.relative_error
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = ".lora_A.weight", ".lora_B.weight"
    exact = sum(
        w * (x[module + b].double() @ x[module + a].double())
        for w, x in zip(weights, adapters, strict=True)
    )
    merged = result.tensors[module + b].double() @ result.tensors[module + a].double()
    singular = torch.linalg.svdvals(exact)
    best = (singular[4:] ** 2).sum().sqrt() / (singular**2).sum().sqrt()  # Eckart–Young
    achieved = torch.linalg.norm(exact - merged) / torch.linalg.norm(exact)
    assert float(achieved) == pytest.approx(float(best), rel=1e-6)
    assert result.module_errors[module] == pytest.approx(float(best), rel=1e-6)

    # adapters that share A: the sum has rank <= r and the exact merge is exact
    shared = [{n: (adapters[0][n] if "lora_A" in n else t) for n, t in x.items()} for x in adapters]
    exact_shared = merge_exact(shared, weights)
    assert exact_shared.relative_error < 1e-6
    for name in shapes:
        if "lora_A" in name:
            module = name.removesuffix(a)
            dense = sum(
                w * (x[module + b] @ x[module + a]) for w, x in zip(weights, shared, strict=True)
            )
            mixed = exact_shared.tensors[module + b] @ exact_shared.tensors[name]
            assert torch.allclose(mixed, dense, atol=1e-5)
    with pytest.raises(ValueError, match="sum to zero"):
        merge_exact(adapters, [0, 0, 0])


@pytest.fixture(scope="module")
def trained_runtime(tmp_path_factory, tiny_llama_gguf, train_corpus):
    """A runtime on the tiny base with four adapters: own (fresh), a trained peer, a noisy peer,
    and the trained peer with its B scaled 1000x (valid, but poisoned)."""
    from edgefed.documents import read_documents
    from edgefed.loaded_base import LoadedBase
    from edgefed.quant.lora_gguf import convert_lora_to_gguf
    from edgefed.runtime import LlamaRuntime
    from edgefed.train.loop import TrainConfig
    from edgefed.train.run import train_adapter

    folder = tmp_path_factory.mktemp("trust")
    spec = LoraSpec(rank=4)
    config = TrainConfig(steps=30, seq_len=64, learning_rate=1e-2)
    with LoadedBase(tiny_llama_gguf, runtime_quant="keep") as loaded:
        run = train_adapter(train_corpus, folder / "run", loaded, config=config, lora=spec)
    from safetensors.torch import load_file

    trained = load_file(run.adapter_dir / "adapter_model.safetensors")
    shapes = {n: tuple(t.shape) for n, t in trained.items()}
    fresh = {n: (t if "lora_A" in n else torch.zeros_like(t)) for n, t in trained.items()}
    adapters = {
        "own": fresh,
        "good": trained,
        "noisy": random_adapter(shapes, 7, scale=0.05),
        "huge": {n: (t * 1000 if "lora_B" in n else t) for n, t in trained.items()},
    }
    runtime = LlamaRuntime(tiny_llama_gguf, window=128)
    loaded = {}
    for name, tensors in adapters.items():
        peft_dir = save_lora_tensors(tensors, spec, folder / name)
        gguf = convert_lora_to_gguf(peft_dir, folder / f"{name}.gguf", base=tiny_llama_gguf)
        loaded[name] = runtime.load_adapter(gguf)
    tokens = runtime.tokenize(read_documents(train_corpus).joined())[:600]
    yield adapters, runtime, loaded, tokens
    runtime.close()


def test_perplexity_and_prediction_trust_find_the_peer_that_fits(trained_runtime):
    adapters, runtime, loaded, tokens = trained_runtime
    inputs = TrustInputs(
        own="own", adapters=adapters, runtime=runtime, runtime_adapters=loaded,
        val_tokens=tokens, reference_tokens=tokens,
    )  # fmt: skip
    row = compute_trust("perplexity", inputs)
    assert row.weight_of("good") > 0.9, row
    assert row.weight_of("huge") < 1e-6, row  # verified, but poisoned: no weight
    mixed = merge_factors([adapters[d] for d in row.devices], row.weights).tensors
    assert torch.isfinite(torch.stack([t.abs().max() for t in mixed.values()])).all()

    with_twin = TrustInputs(
        own="own", adapters=adapters | {"twin": adapters["own"]},
        runtime=runtime, runtime_adapters=loaded | {"twin": loaded["own"]},
        reference_tokens=tokens,
    )  # fmt: skip
    prediction = compute_trust("prediction", with_twin)
    finite = [(s, d) for s, d in zip(prediction.scores, prediction.devices, strict=True)
              if s == s and abs(s) != float("inf")]  # fmt: skip
    ranked = sorted(finite, reverse=True)
    assert {d for _, d in ranked[:2]} == {"own", "twin"} and ranked[0][0] == 0.0
    assert prediction.weight_of("twin") == pytest.approx(prediction.weight_of("own"))
    no_reference = TrustInputs(
        own="own", adapters=adapters, runtime=runtime, runtime_adapters=loaded
    )
    with pytest.raises(Exception, match="reference text"):
        compute_trust("prediction", no_reference)


def test_every_scheme_name_runs_its_own_code_and_unknown_names_fail(trained_runtime):
    adapters, runtime, loaded, tokens = trained_runtime
    inputs = TrustInputs(
        own="own", adapters=adapters, train_tokens={d: 100 for d in adapters},
        runtime=runtime, runtime_adapters=loaded, val_tokens=tokens, reference_tokens=tokens,
    )  # fmt: skip
    rows = {name: compute_trust(name, inputs, Normalization(temperature=0.5)) for name in SCHEMES}
    assert {name: row.scheme for name, row in rows.items()} == {n: n for n in SCHEMES}
    distinct = {tuple(round(s, 9) for s in row.scores) for row in rows.values()}
    assert len(distinct) == len(SCHEMES)  # no two schemes produced the same scores
    with pytest.raises(Exception, match="unknown trust scheme 'dynamic'"):
        compute_trust("dynamic", inputs)
