"""Robustness benchmark: poisoned peers, norm clipping, and the cost of privacy noise.

Five honest devices (bbc-mixed, 60 articles each, the demo's schedule) train round 0 and
publish; two attackers publish adapters that pass verification (registered, signed, right
shapes, finite): `scaler` republishes an honest device's adapter with B x100, `shuffler` trains
on its articles with the words of every document shuffled. Every honest device then mixes its
round under `perplexity` and `fedavg` trust, without an attacker, with each attacker, and with
each attacker under `--clip-norm` (the bound: the median honest ΔW norm), and scores the mix on
its test split. Last, the cost of `--dp-clip/--dp-noise`: the test perplexity of each device's
release (clip: the median honest change norm; z = 0 clips only) at a few noise multipliers,
against its exact adapter, with ε.

    python bench/robustness.py [--work DIR] [--json FILE]     (about 12 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
from pathlib import Path

DOCS, TEST_TOKENS, VAL_TOKENS = 60, 384, 256
NOISES = (1e-3, 1e-2, 3e-2, 0.1)


def shuffled_words(source: Path, target: Path, seed: int = 0) -> Path:
    """The same articles with every document's words in random order: fluent-looking garbage."""
    generator = random.Random(seed)
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.txt")):
        words = path.read_text(encoding="utf-8").split()
        generator.shuffle(words)
        (target / path.name).write_text(" ".join(words), encoding="utf-8")
    return target


def main() -> None:
    from edgefed.adapter import initial_tensors, read_adapter_folder, save_lora_tensors
    from edgefed.device.aggregate import aggregate_round
    from edgefed.device.evaluate import evaluate_round
    from edgefed.device.federation import init_federation, join_federation
    from edgefed.device.publish import publish_adapter
    from edgefed.device.pull import pull_round
    from edgefed.device.round import RoundOptions, run_round
    from edgefed.device.split_text import device_split_tokens
    from edgefed.device.workspace import Workspace
    from edgefed.loaded_base import LoadedBase
    from edgefed.privacy import DpNoise, change_norm, epsilon, privatize
    from edgefed.simulation.clients import load_clients
    from edgefed.sync.folder import FolderStore
    from edgefed.sync.manifest import Schedule
    from edgefed.train.loop import TrainConfig
    from edgefed.train.split import TEST
    from edgefed.trust.settings import TrustSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="run folder, its training reused when finished")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="edgefed-bench-robustness-")
    out = args.work or Path(scratch)
    fresh = not (out / "store" / "federation.json").is_file()
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    options = RoundOptions(
        train=TrainConfig(seq_len=128, batch_size=2, learning_rate=2e-3),
        val_tokens=VAL_TOKENS,
        test_tokens=TEST_TOKENS,
    )
    clients = load_clients("bbc-mixed", docs_per_client=DOCS)
    # on the CPU, as the figures in docs/measurements/robustness.md
    with LoadedBase(None, device="cpu") as loaded:
        data = clients.write(out / "clients")
        data["shuffler"] = shuffled_words(data[clients.clients[0].name], out / "clients-shuffled")
        store = FolderStore(out / "store")
        names = [c.name for c in clients.clients]
        if fresh:
            init_federation(
                store, base=loaded.base_path, schedule=Schedule(warmup_steps=8, round_steps=4)
            )
            spaces = {
                d: join_federation(store, d, data=data.get(d, data[names[0]]),
                                   workspace=out / "devices" / d, base=loaded.base_path)
                for d in [*names, "shuffler", "scaler"]
            }  # fmt: skip
        else:  # a finished run folder: its training is reused, everything else measured again
            spaces = {
                d: Workspace.open(out / "devices" / d) for d in [*names, "shuffler", "scaler"]
            }
        for device in [*names, "shuffler"]:
            print(f"training {device} ...", flush=True)
            run_round(store, spaces[device], loaded, 0, options=options, until="publish")
        spec, honest0, _ = read_adapter_folder(spaces[names[0]].train_run(0).root)
        scaled = {n: t * 100 if "lora_B" in n else t for n, t in honest0.items()}
        if fresh:
            publish_adapter(store, spaces["scaler"], 0,
                            save_lora_tensors(scaled, spec, out / "scaled-adapter"))  # fmt: skip

        def mix(device: str, scheme: str, attacker: str | None, clip: float | None) -> dict:
            """Aggregate with only the honest peers (+ one attacker) present; the evaluation."""
            peers = spaces[device].peers_dir(0)
            stash = peers.parent / "peers-stash"
            stash.mkdir(exist_ok=True)
            for other in ("scaler", "shuffler"):
                if other != attacker:
                    for path in peers.glob(f"{other}.*"):
                        path.rename(stash / path.name)
            try:
                aggregate_round(spaces[device], 0, spaces[device].train_run(0).root, loaded,
                                TrustSettings(scheme, clip_norm=clip),
                                val_tokens=VAL_TOKENS)  # fmt: skip
                trust = spaces[device].read_trust(0).as_dict()
                evaluation = evaluate_round(spaces[device], 0, loaded,
                                            test_tokens=TEST_TOKENS).as_dict()  # fmt: skip
            finally:
                for path in stash.iterdir():
                    path.rename(peers / path.name)
            return {"evaluation": evaluation, "trust": trust}

        for device in names:
            pull_round(store, spaces[device], 0)
        clean = {d: mix(d, "perplexity", None, None) for d in names}
        norms = [clean[d]["trust"]["delta_norms"][d] for d in names]
        bound = statistics.median(norms)
        print(f"honest ΔW norms {', '.join(f'{n:.3g}' for n in norms)}; clip bound {bound:.3g}")
        conditions = [("no attacker", None, None)]
        for attacker in ("scaler", "shuffler"):
            conditions += [(attacker, attacker, None), (f"{attacker} + clip", attacker, bound)]
        results: dict = {}
        for scheme in ("perplexity", "fedavg"):
            for label, attacker, clip in conditions:
                print(f"{scheme}: {label} ...", flush=True)
                runs = {d: mix(d, scheme, attacker, clip) for d in names}
                results[f"{scheme} | {label}"] = {
                    "mean": statistics.fmean(
                        r["evaluation"]["models"]["aggregated"]["perplexity"] for r in runs.values()
                    ),
                    "attacker_weight": statistics.fmean(
                        dict(zip(r["trust"]["devices"], r["trust"]["weights"], strict=True)).get(
                            attacker, 0.0
                        )
                        for r in runs.values()
                    ),
                    "per_device": {
                        d: r["evaluation"]["models"]["aggregated"]["perplexity"]
                        for d, r in runs.items()
                    },
                }
        local = statistics.fmean(
            clean[d]["evaluation"]["models"]["local"]["perplexity"] for d in names
        )

        # the cost of privacy noise: each device's own release, scored on its test split
        federation = spaces[names[0]].federation
        exact, tokens = {}, {}
        for d in names:
            run_dir = spaces[d].train_run(0).root
            exact[d] = {n: t.float() for n, t in read_adapter_folder(run_dir)[1].items()}
            tokens[d] = device_split_tokens(spaces[d], run_dir, loaded.runtime, TEST, TEST_TOKENS)
        # one federation, one shared initial adapter
        initial = initial_tensors(exact[names[0]], federation.lora.init_seed)
        clip = statistics.median(change_norm(exact[d], initial) for d in names)
        privacy = {}
        for noise in (0.0, *NOISES):
            scores = []
            for d in names:
                released, _ = privatize(exact[d], initial, DpNoise(clip=clip, noise=noise))
                adapter = loaded.load_tensors(released, spec)
                scores.append(loaded.runtime.perplexity(tokens[d], adapter).perplexity)
            privacy[noise] = {
                "mean": statistics.fmean(scores),
                "epsilon_per_round": epsilon(noise, 1),
                "epsilon_10_rounds": epsilon(noise, 10),
            }
        base = statistics.fmean(
            clean[d]["evaluation"]["models"]["base"]["perplexity"] for d in names
        )

    reference = results["perplexity | no attacker"]["mean"]
    fedavg_reference = results["fedavg | no attacker"]["mean"]
    print(f"\nmean test perplexity of 5 honest devices (base {base:.3f}, local {local:.3f})")
    print("| trust | peers | test ppl | vs no attacker | attacker weight |")
    print("|---|---|---|---|---|")
    for key, row in results.items():
        scheme, label = key.split(" | ")
        clean_mean = reference if scheme == "perplexity" else fedavg_reference
        print(f"| {scheme} | {label} | {row['mean']:.3f} | {row['mean'] / clean_mean - 1:+.2%} | "
              f"{row['attacker_weight']:.3g} |")  # fmt: skip
    print(f"\nprivacy noise on each device's published adapter (clip {clip:.3g}, the median "
          "change norm from the shared init)")  # fmt: skip
    print("| noise z | release test ppl | vs the exact adapter | ε per round | ε over 10 rounds |")
    print("|---|---|---|---|---|")
    for noise, row in privacy.items():
        print(f"| {noise:g} | {row['mean']:.3f} | {row['mean'] / local - 1:+.2%} | "
              f"{row['epsilon_per_round']:.3g} | {row['epsilon_10_rounds']:.3g} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"base": base, "local": local, "clip_bound": bound,
                                         "attacks": results, "dp_clip": clip,
                                         "privacy": {str(k): v for k, v in privacy.items()}},
                                        indent=1) + "\n")  # fmt: skip
    if args.work is None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
