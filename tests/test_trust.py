"""Trust schemes, their normalisation and the merges, on hand-built and trained tiny adapters."""

from __future__ import annotations

import pytest
import torch
from conftest import random_adapter

from edgefed.adapter import LoraSpec, save_lora_tensors
from edgefed.errors import ConfigError, DataError
from edgefed.trust.merge import merge_exact, merge_factors
from edgefed.trust.noise import PERPLEXITY_NOISE_FLOOR, paired_standard_error
from edgefed.trust.normalize import trust_row
from edgefed.trust.schemes import SCHEMES, Normalization, TrustInputs, compute_trust
from edgefed.trust.settings import TrustSettings
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


def test_a_temperature_in_standard_errors_scales_each_difference_by_its_own_error():
    scores = [-2.0, -1.9, -1.0, -2.5]  # own, then three peers
    errors = [None, 0.1, 0.5, 0.05]
    row = trust_row(scores, 0, temperature=2.0, errors=errors)
    z = [0.0, 0.1 / 0.1, 1.0 / 0.5, -0.5 / 0.05]
    expected = torch.softmax(torch.tensor(z, dtype=torch.float64) / 2.0, 0).tolist()
    assert row == pytest.approx(expected, rel=1e-12)
    kept = trust_row(scores, 0, temperature=2.0, errors=errors, top_k=2)  # by raw score
    kept_total = row[0] + row[2]
    assert kept == pytest.approx([row[0] / kept_total, 0, row[2] / kept_total, 0])
    with pytest.raises(ValueError, match="standard error"):
        trust_row(scores, 0, errors=[None, 0.1, 0.0, 0.1])


def test_the_paired_standard_error_follows_the_noise_and_its_correlation():
    generator = torch.Generator().manual_seed(0)
    own = torch.randn(4096, generator=generator, dtype=torch.float64).numpy() * 3
    independent = own + torch.randn(4096, generator=generator, dtype=torch.float64).numpy()
    error = paired_standard_error(own, independent, floor=0.0)
    assert error == pytest.approx(1 / 64, rel=0.25)  # σ/√n of the differences, not of own
    # the same differences held for 32 tokens at a time: 128 independent values, not 4096
    blocky = own + torch.randn(128, generator=generator, dtype=torch.float64).repeat_interleave(
        32).numpy()  # fmt: skip
    assert paired_standard_error(own, blocky, floor=0.0) == pytest.approx(1 / 128**0.5, rel=0.25)
    assert paired_standard_error(own, own, floor=PERPLEXITY_NOISE_FLOOR) == PERPLEXITY_NOISE_FLOOR
    assert paired_standard_error(own, independent, floor=0.03) == pytest.approx(
        (error**2 + 0.03**2) ** 0.5
    )


def test_the_oracle_mixes_by_the_normalised_dot_products_of_the_known_mixtures(shapes):
    adapters = {d: random_adapter(shapes, i) for i, d in enumerate(("a", "b", "c"))}
    mixtures = {"a": {"code": 45, "prose": 15}, "b": {"code": 3, "prose": 1},
                "c": {"prose": 30, "code": 10}}  # fmt: skip
    row = compute_trust("oracle", TrustInputs(own="a", adapters=adapters, mixtures=mixtures))
    dots = [0.75 * 0.75 + 0.25 * 0.25, 0.625, 0.75 * 0.25 + 0.25 * 0.75]
    assert row.devices == ["a", "b", "c"]
    assert row.weights == pytest.approx([d / sum(dots) for d in dots], rel=1e-12)
    specific = {"a": {"code": 5}, "b": {"code": 9}, "c": {"prose": 5}}
    row = compute_trust("oracle", TrustInputs(own="c", adapters=adapters, mixtures=specific))
    assert row.weights == [1.0, 0.0, 0.0] and row.devices[0] == "c"
    with pytest.raises(DataError, match="known data mixture; c has none"):
        compute_trust("oracle", TrustInputs(own="a", adapters=adapters, mixtures=specific | {
            "c": {}}))  # fmt: skip


def test_settings_take_one_sharpness_and_a_temperature_in_standard_errors_only_where_measured():
    settings = TrustSettings.parse("perplexity:se=2:top-k=3")
    assert settings.se_temperature == 2 and settings.temperature is None
    assert TrustSettings.parse(settings.label) == settings
    assert settings.normalization.se_temperature == 2
    assert TrustSettings.from_federation(settings.federation_default()) == TrustSettings(
        "perplexity", se_temperature=2
    )
    # a federation's se default fills a device's unset sharpness, and a fixed one replaces it
    federation = TrustSettings("perplexity", se_temperature=3)
    assert TrustSettings().resolved(federation).se_temperature == 3
    resolved = TrustSettings(temperature=0.05).resolved(federation)
    assert (resolved.temperature, resolved.se_temperature) == (0.05, None)
    with pytest.raises(ConfigError, match="both given"):
        TrustSettings("perplexity", temperature=0.1, se_temperature=1)
    with pytest.raises(ConfigError, match="no standard errors"):
        TrustSettings.parse("weights:se=1")
    with pytest.raises(ConfigError, match="not positive"):
        TrustSettings.parse("prediction:se=0")


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


def test_a_scheme_registered_in_its_own_code_is_offered_computed_and_never_renamed(shapes):
    """A new scheme is a function and one `register_scheme` call: --trust's help lists it,
    compute_trust runs it, and its name cannot be bound twice."""
    from edgefed.trust import Needs, TrustRow, TrustScheme, register_scheme
    from edgefed.trust.schemes import schemes_help

    def half_own(inputs: TrustInputs, norm: Normalization) -> TrustRow:
        devices = sorted(inputs.adapters)
        share = 0.5 / max(1, len(devices) - 1)
        weights = [0.5 if d == inputs.own else share for d in devices]
        return TrustRow("half-own", devices, [None] * len(devices), weights)

    scheme = TrustScheme(name="half-own", function=half_own, help="half yourself, half the rest")
    register_scheme(scheme)
    try:
        assert "half-own (half yourself, half the rest)" in schemes_help()
        assert scheme.needs == Needs.NOTHING and not scheme.needs_runtime
        inputs = TrustInputs(
            own="d1", adapters={f"d{i}": random_adapter(shapes, i) for i in range(3)}
        )
        row = compute_trust("half-own", inputs)
        assert dict(zip(row.devices, row.weights, strict=True)) == {
            "d0": 0.25,
            "d1": 0.5,
            "d2": 0.25,
        }
        with pytest.raises(ConfigError, match="registered twice"):
            register_scheme(TrustScheme(name="fedavg", function=half_own, help="an impostor"))
        assert SCHEMES["fedavg"].function is not half_own
    finally:
        SCHEMES.pop("half-own")


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


def test_calibrated_trust_is_uniform_on_copies_and_decisive_for_a_far_better_peer(
    trained_runtime, tmp_path, tiny_llama_gguf
):
    from edgefed.quant.lora_gguf import convert_lora_to_gguf

    adapters, runtime, loaded, tokens = trained_runtime
    calibrated = Normalization(se_temperature=1.0)
    # the own adapter three more times, each its own file, loaded on its own
    copies = {"own": adapters["own"]} | {f"copy-{i}": adapters["own"] for i in range(3)}
    copy_handles = {"own": loaded["own"]}
    for name in list(copies)[1:]:
        peft_dir = save_lora_tensors(adapters["own"], LoraSpec(rank=4), tmp_path / name)
        gguf = convert_lora_to_gguf(peft_dir, tmp_path / f"{name}.gguf", base=tiny_llama_gguf)
        copy_handles[name] = runtime.load_adapter(gguf)
    for scheme in ("perplexity", "prediction"):
        inputs = TrustInputs(own="own", adapters=copies, runtime=runtime,
                             runtime_adapters=copy_handles, val_tokens=tokens,
                             reference_tokens=tokens)  # fmt: skip
        row = compute_trust(scheme, inputs, calibrated)
        assert row.weights == pytest.approx([0.25] * 4, abs=0.02), (scheme, row)
        assert row.errors[0] is None and all(e > 0 for e in row.errors[1:])

    inputs = TrustInputs(own="own", adapters=adapters, runtime=runtime, runtime_adapters=loaded,
                         val_tokens=tokens)  # fmt: skip
    row = compute_trust("perplexity", inputs, calibrated)
    assert row.weight_of("good") > 0.99 and row.weight_of("huge") < 1e-6, row
    good = row.devices.index("good")
    assert row.errors[good] < 0.2 * (row.scores[good] - row.scores[0])  # many errors better
    with pytest.raises(ConfigError, match="no standard errors"):
        compute_trust("weights", inputs, calibrated)


def test_every_scheme_name_runs_its_own_code_and_unknown_names_fail(trained_runtime):
    adapters, runtime, loaded, tokens = trained_runtime
    mixtures = {"own": {"x": 3, "y": 1}, "good": {"x": 1}, "noisy": {"y": 2}, "huge": {"x": 1,
                "y": 1}}  # fmt: skip
    inputs = TrustInputs(
        own="own", adapters=adapters, train_tokens={d: 100 for d in adapters},
        runtime=runtime, runtime_adapters=loaded, val_tokens=tokens, reference_tokens=tokens,
        mixtures=mixtures,
    )  # fmt: skip
    # auto, fedsa and graph reuse perplexity's, fedavg's and weights' scores by design: they
    # differ in what they make of them (tested in test_stopping and test_simulate)
    derived = {"auto", "fedsa", "graph"}
    names = [n for n in SCHEMES if n != "auto"]
    rows = {name: compute_trust(name, inputs, Normalization(temperature=0.5)) for name in names}
    assert {name: row.scheme for name, row in rows.items()} == {n: n for n in names}
    distinct = {tuple(round(s, 9) for s in rows[n].scores) for n in names if n not in derived}
    assert len(distinct) == len(SCHEMES) - len(derived)  # no two produced the same scores
    assert rows["fedsa"].b_weights != rows["fedavg"].weights
    with pytest.raises(Exception, match="no selection tokens"):
        compute_trust("auto", inputs)  # the choice needs tokens the scores never saw
    with pytest.raises(Exception, match="unknown trust scheme 'dynamic'"):
        compute_trust("dynamic", inputs)
