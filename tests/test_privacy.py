"""Norm clipping of incoming adapters and the clipped, noised release of a device's own."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import no_wait_schedule, random_adapter

from edgefed.adapter import LoraSpec, attach_lora, initial_tensors, lora_state
from edgefed.errors import ConfigError, DataError
from edgefed.privacy import DpNoise, change_norm, epsilon, privatize
from edgefed.trust.clip import clip_peers, delta_norm
from edgefed.trust.similarity import delta_cosine


def test_clipping_bounds_peers_only_and_keeps_their_direction(shapes):
    own = random_adapter(shapes, 0)
    honest = random_adapter(shapes, 1)
    huge = {n: t * (100 if n.endswith("lora_B.weight") else 1) for n, t in honest.items()}
    incoming = {"me": {n: t * 10 for n, t in own.items()}, "bob": honest, "mallory": huge}
    bound = delta_norm(honest) * 1.5
    clipped, norms = clip_peers(incoming, "me", bound)
    assert norms["mallory"] == pytest.approx(100 * norms["bob"], rel=1e-6)
    assert clipped["bob"] is honest  # under the bound: untouched
    assert clipped["me"] is incoming["me"]  # own adapter: never clipped, whatever its norm
    assert delta_norm(clipped["mallory"]) == pytest.approx(bound, rel=1e-6)
    assert delta_cosine(clipped["mallory"], honest) == pytest.approx(1.0, abs=1e-6)
    unclipped, _ = clip_peers(incoming, "me", None)
    assert unclipped["mallory"] is huge


def test_initial_tensors_are_the_shared_init_of_a_real_peft_adapter(tiny_llama_gguf):
    from edgefed.quant.training_copy import build_training_model

    state = lora_state(attach_lora(build_training_model(tiny_llama_gguf, "fp32"), LoraSpec()))
    initial = initial_tensors(state, LoraSpec().init_seed)
    assert set(initial) == set(state)
    assert all(torch.equal(initial[n], state[n].float()) for n in state)


def test_release_is_clipped_around_the_init_and_noised_at_z_times_c(shapes):
    drawn = random_adapter(shapes, 5)
    initial = {n: t if n.endswith("lora_A.weight") else t * 0 for n, t in drawn.items()}
    trained = {n: t + 0.05 * random_adapter(shapes, 6)[n] for n, t in initial.items()}
    norm = change_norm(trained, initial)
    exact, reported = privatize(trained, initial, DpNoise(clip=norm * 2, noise=0.0))
    assert reported == pytest.approx(norm)
    assert all(torch.allclose(exact[n], trained[n], atol=1e-6) for n in trained)
    clipped, _ = privatize(trained, initial, DpNoise(clip=norm / 4, noise=0.0))
    assert change_norm(clipped, initial) == pytest.approx(norm / 4, rel=1e-5)
    noised, _ = privatize(trained, initial, DpNoise(clip=norm / 4, noise=0.5))
    residual = torch.cat([(noised[n] - clipped[n]).flatten() for n in trained])
    assert residual.std().item() == pytest.approx(0.5 * norm / 4, rel=0.05)
    again, _ = privatize(trained, initial, DpNoise(clip=norm / 4, noise=0.5))
    assert not torch.equal(again[next(iter(trained))], noised[next(iter(trained))])  # fresh draw


def test_epsilon_falls_with_noise_grows_with_rounds_and_bad_settings_are_refused():
    assert epsilon(0.0, 1) == math.inf
    assert epsilon(10, 1) < epsilon(3, 1) < epsilon(1, 1)
    assert epsilon(3, 1) < epsilon(3, 10) < 10 * epsilon(3, 1)
    # z = 10 at sensitivity 2C is σ/Δ = 5: one release costs about ε = 1 at δ = 1e-5
    assert 0.8 < epsilon(10, 1) < 1.2
    for clip, noise in ((0, 1), (-1, 1), (1, -1), (math.inf, 1), (1, 1e-170)):
        with pytest.raises(ConfigError):
            DpNoise(clip=clip, noise=noise)


def test_a_private_publish_sends_one_draw_even_when_resumed(
    tmp_path,
    tiny_llama_gguf,
    train_corpus,
    adapters,
):
    from safetensors.torch import load

    from edgefed.device.federation import init_federation, join_federation
    from edgefed.device.publish import publish_adapter
    from edgefed.sync.folder import FolderStore
    from edgefed.sync.layout import adapter_key, manifest_key
    from edgefed.sync.verify import decode_adapter
    from edgefed.train.metrics import TrainMetrics, ValScore

    store = FolderStore(tmp_path / "shared")
    init_federation(store, base=tiny_llama_gguf, schedule=no_wait_schedule())
    space = join_federation(store, "alice", data=train_corpus, workspace=tmp_path / "alice",
                            base=tiny_llama_gguf)  # fmt: skip
    dp = DpNoise(clip=0.5, noise=0.01)
    own = tmp_path / "alice-run"  # a finished run's folder: its metrics would be published
    shutil.copytree(adapters["alice", 0], own)
    TrainMetrics(
        base={}, run={}, from_adapter=None, data={}, steps=1, tokens_seen=100, train_seconds=1.0,
        train_tokens_per_second=100.0, loss_curve=[], wall_seconds=1.0, peak_rss_bytes=1,
        val=ValScore("trust-val", "keep", 9.0, 3.0, 10),
    ).write(own / "metrics.json")  # fmt: skip
    assert publish_adapter(store, space, 0, own, dp=dp)
    release = load(space.release_path(0).read_bytes())
    published = decode_adapter(store.read(adapter_key(0, "alice")))
    assert all(torch.allclose(published[n].float(), release[n], atol=2e-3) for n in release)
    manifest = json.loads(store.read(manifest_key(0, "alice")))
    assert manifest["metrics"] == {}  # scores of the exact adapter are not published
    # a crash between blob and manifest: the rerun must send the kept draw, not a new one
    (tmp_path / "shared" / manifest_key(0, "alice")).unlink()
    assert publish_adapter(store, space, 0, own, dp=dp)
    with pytest.raises(DataError, match="other privacy settings"):
        publish_adapter(store, space, 0, own, dp=DpNoise(clip=0.5, noise=0.02))
    with pytest.raises(DataError, match="from another adapter"):
        publish_adapter(store, space, 0, adapters["bob", 0], dp=dp)
