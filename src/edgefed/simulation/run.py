"""A whole federation of virtual devices on one machine, once per trust variant and seed.

Every device is a real workspace joined to a real store (a folder under the run folder, or a
relay), and every round runs `edgefed.device.round.run_round`: the code of a real device. What
the simulation adds is scheduling and sharing:

- all devices train and publish round r before any of them pulls, as a federation in
  lock-step (`run_round(until="publish")`, then the rest of the round);
- one `LoadedBase` (llama.cpp runtime + training copy) serves every device, variant and seed;
- round 0 (the warm-up) depends only on the data, the seed and the shared init, not on the
  trust variant, so it is trained once per (seed, device) and copied into the other variants'
  workspaces, where `run_round` finds it finished.

Run folder:

    clients/<client>/*.txt, clients/reference.txt     the data each device holds
    federations/<variant>/seed-<s>/store/             the federation store (folder stores)
    federations/<variant>/seed-<s>/devices/<client>/  each device's workspace
    simulation.json                                    what the federations are made from
    results.json                                       everything measured (see `summarize`)

A stopped simulation (Ctrl-C, a crash, the end of a session) goes on where it stopped with
`resume=True` and the same data and settings: its device workspaces record every finished
step, and `run_round` skips those, so a finished round is read back, not run again.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgefed.adapter import LoraSpec
from edgefed.atomic import atomic_write_text
from edgefed.device.federation import DEFAULT_SCHEDULE, init_federation, join_federation
from edgefed.device.round import RoundOptions, run_round
from edgefed.device.workspace import DeviceConfig, Workspace
from edgefed.errors import ConfigError, DataError, InputFileError
from edgefed.loaded_base import LoadedBase
from edgefed.simulation.clients import ClientSet
from edgefed.sync.folder import FolderStore
from edgefed.sync.layout import manifest_key
from edgefed.sync.manifest import Schedule, parse_document
from edgefed.train.loop import TrainConfig
from edgefed.trust.settings import TrustSettings, parse_variants

RESULTS_FILE = "results.json"
RESULTS_FORMAT = 1
IDENTITY_FILE = "simulation.json"
IDENTITY_FORMAT = 1


DEFAULT_VARIANTS = "local,fedavg,oracle,perplexity"
# the demo: scarce data (a cell of the regime map, docs/measurements/regime-map.md) trained by
# the federation's default schedule; minutes on a laptop CPU; the CLI's defaults are these
# a simulation trains every device on one machine, where time is short and memory is not:
# without gradient checkpointing (the same adapters; training 1.2x faster,
# docs/measurements/memory.md)
DEMO_TRAIN = TrainConfig(
    seq_len=128, batch_size=2, learning_rate=2e-3, gradient_checkpointing=False
)
DEMO_ROUNDS = 1
DEMO_VAL_TOKENS = 1024  # at most: a client's split of 10 documents holds about 500-900
DEMO_TEST_TOKENS = 1024
# steps, when the training is given as steps instead of epochs and one of them is not
DEFAULT_WARMUP_STEPS, DEFAULT_ROUND_STEPS = 8, 4
# a simulation's devices train as a federation's do by default (warm-up and round epochs of
# each device's own train split, capped in steps), and never wait: all publish before any pulls
SIMULATION_SCHEDULE = replace(DEFAULT_SCHEDULE, wait_seconds=0.0)
# the figures in the docs were measured with CPU training: a simulation trains there unless
# told otherwise, so its results compare with them
DEFAULT_SIMULATION_DEVICE = "cpu"
# one machine trains every virtual device, so a simulation favours speed over memory: the fp32
# copy trains the demo's 2 x 128 blocks 1.16x faster than the gguf copy on a 2-core CPU and
# gives the same adapters (docs/measurements/training.md, "Training speed: what limits it")
DEFAULT_SIMULATION_PRECISION = "fp32"


@dataclass(frozen=True)
class SimulationSettings:
    """What a simulation runs: its variants (each a TrustSettings; a variant's clip bound and
    by-tokens come from `round_options.trust`), seeds, rounds and schedule."""

    variants: tuple[TrustSettings, ...] = field(
        default_factory=lambda: parse_variants(DEFAULT_VARIANTS)
    )
    seeds: int = 1
    # seeds first_seed .. first_seed + seeds - 1: a long comparison split over sessions or
    # machines runs the same federations as one run would, and its results merge by seed
    first_seed: int = 0
    rounds: int = DEMO_ROUNDS
    # the training: `epochs` passes over each device's own train split in all, shared equally
    # by the rounds; or steps; neither: the federation's default schedule (SIMULATION_SCHEDULE);
    # one step count given: the other's default
    epochs: float | None = None
    warmup_steps: int | None = None
    round_steps: int | None = None
    lora: LoraSpec = field(default_factory=LoraSpec)
    round_options: RoundOptions = field(
        default_factory=lambda: RoundOptions(
            train=DEMO_TRAIN, val_tokens=DEMO_VAL_TOKENS, test_tokens=DEMO_TEST_TOKENS
        )
    )

    def __post_init__(self) -> None:
        steps = (self.warmup_steps, self.round_steps)
        if self.first_seed < 0:
            raise ConfigError(f"--first-seed {self.first_seed} is negative", "e.g. --first-seed 3")
        if self.epochs is not None and steps != (None, None):
            raise ConfigError(
                "--epochs and --warmup-steps/--round-steps both set the training",
                "give --epochs, or the steps",
            )
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ConfigError(f"--epochs {self.epochs:g} is not positive", "e.g. --epochs 3")
        if steps != (None, None):
            if self.warmup_steps is None:
                object.__setattr__(self, "warmup_steps", DEFAULT_WARMUP_STEPS)
            if self.round_steps is None:
                object.__setattr__(self, "round_steps", DEFAULT_ROUND_STEPS)

    @property
    def schedule(self) -> Schedule:
        """The federation schedule every simulated federation is made with: the default's
        waits and staleness whatever the training. Epochs given are trained whole (no step
        cap): a cell of the map asks for exactly that much training."""
        if self.round_steps is not None:
            amounts = {"warmup_steps": self.warmup_steps, "round_steps": self.round_steps}
        elif self.epochs is not None:
            per_round = self.epochs / self.rounds
            amounts = {"warmup_epochs": per_round, "round_epochs": per_round}
        else:
            return SIMULATION_SCHEDULE
        nothing = dict.fromkeys(("warmup_steps", "round_steps", "warmup_epochs", "round_epochs",
                                 "max_steps"))  # fmt: skip
        return replace(SIMULATION_SCHEDULE, **(nothing | amounts))


@dataclass(frozen=True)
class Progress:
    """What the simulation is doing now, for a progress display."""

    done: int
    total: int
    message: str


def _federation_dir(out: Path, variant: TrustSettings, seed: int) -> Path:
    safe = variant.label.replace(":", "_").replace("=", "-")
    return out / "federations" / safe / f"seed-{seed}"


def _copy_warmup(source: Workspace, target: Workspace) -> None:
    """Round 0's training (identical for every variant of a seed) into another workspace."""
    destination = target.train_run(0).root
    if not destination.exists():
        tmp = destination.with_name(".train-copy")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source.train_run(0).root, tmp)
        os.replace(tmp, destination)


def _round_bytes(store, workspace: Workspace, round_number: int, peers: list[str]) -> dict:
    """Bytes this device sent (its blob and manifest) and received (its peers') in the round."""

    def published(manifest: bytes) -> int:
        return len(manifest) + int(parse_document(manifest, "manifest")["bytes"])

    sent = published(store.read(manifest_key(round_number, workspace.device)))
    received = sum(
        published(workspace.peer_manifest_path(round_number, p).read_bytes()) for p in peers
    )
    return {"sent": sent, "received": received}


def simulate(
    client_set: ClientSet,
    out: str | os.PathLike[str],
    loaded: LoadedBase,
    settings: SimulationSettings | None = None,
    *,
    store_url: str | None = None,
    token: str | None = None,
    max_tokens: int | None = None,
    resume: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> dict:
    """Run every variant x seed federation over the clients, every device over the one
    `loaded` base; write and return the results. `resume`: `out` may hold a stopped
    simulation of the same data and settings (other variants or seeds may be asked for now);
    its finished steps are kept and the rest run.

    Raises InputFileError for a run folder in use (or, resuming, made from other data or
    settings), ConfigError for settings that cannot work
    (a relay store with more than one federation to run), DataError for clients whose data
    cannot be split.
    """
    from edgefed.sync.backends import open_store

    settings = settings or SimulationSettings()
    # N devices x R rounds train in this one process: loading llama.cpp's copy again after
    # each training would cost more than the memory it frees
    loaded.keep_loaded = True
    out_dir = Path(out)
    in_use = out_dir.exists() and any(out_dir.iterdir())
    if in_use and not resume:
        raise InputFileError(
            f"{out_dir} is not empty",
            "choose a new --out folder, or add --resume to go on with the simulation there",
        )
    federations = len(settings.variants) * settings.seeds
    if store_url is not None and federations != 1:
        raise ConfigError(
            f"a store URL holds one federation; this simulation runs {federations}",
            "give one --trust variant and --seeds 1 with --store, or drop --store",
        )
    _check_splits(client_set)
    options = settings.round_options
    total = federations * settings.rounds * len(client_set.clients) * 2
    done = 0

    def progress(message: str) -> None:
        if on_progress is not None:
            on_progress(Progress(done, total, message))

    progress("writing the clients' data")
    if max_tokens:
        client_set = _cap_tokens(client_set, loaded.runtime, max_tokens)
        _check_splits(client_set)
    identity = _identity(client_set, settings, loaded, options, max_tokens, store_url)
    if in_use:
        _check_identity(out_dir, identity)
    else:
        atomic_write_text(out_dir / IDENTITY_FILE, json.dumps(identity, indent=1) + "\n")
    train_tokens = {c.name: _train_tokens(c, loaded.runtime) for c in client_set.clients}
    data = client_set.write(out_dir / "clients")
    reference = out_dir / "clients" / "reference.txt"
    runs: dict[str, dict[str, list]] = {v.label: {} for v in settings.variants}
    seeds = range(settings.first_seed, settings.first_seed + settings.seeds)
    # round 0 trained by an earlier session in another variant's federation: copied, not
    # trained again (a session that resumes asks only for the variants still missing)
    warmup = _finished_warmups(out_dir, seeds, client_set) if in_use else {}
    for seed in seeds:
        for variant in settings.variants:
            folder = _federation_dir(out_dir, variant, seed)
            store = (
                open_store(store_url, token=token) if store_url else FolderStore(folder / "store")
            )
            with store:
                spaces = _resumed_devices(folder, client_set)
                if spaces is None and store_url is not None and folder.exists():
                    raise InputFileError(
                        f"the simulation in {out_dir} stopped while its devices joined the "
                        f"relay federation at {store_url}, which cannot be set up twice",
                        "start again with a new --store and a new --out",
                    )
                if spaces is None:
                    shutil.rmtree(folder, ignore_errors=True)  # set up part-way: nothing trained
                    spaces = _new_federation(
                        store, folder, client_set, data, loaded, settings, variant, seed, reference
                    )
                trust = replace(
                    variant, clip_norm=options.trust.clip_norm, by_tokens=options.trust.by_tokens
                )
                round_options = replace(
                    options,
                    trust=trust,
                    train=replace(options.train, seed=seed),
                    mixtures={c.name: c.mixture for c in client_set.clients},
                )
                rounds = []
                for round_number in range(settings.rounds):
                    for space in spaces:
                        progress(f"{variant.label} seed {seed} round {round_number}: "
                                 f"training {space.device}")  # fmt: skip
                        cached = warmup.get((seed, space.device))
                        if round_number == 0 and cached is not None:
                            _copy_warmup(cached, space)
                        run_round(store, space, loaded, round_number, options=round_options,
                                  until="publish")  # fmt: skip
                        if round_number == 0:
                            warmup.setdefault((seed, space.device), space)
                        done += 1
                    devices = {}
                    for space in spaces:
                        progress(f"{variant.label} seed {seed} round {round_number}: "
                                 f"trust and evaluation of {space.device}")  # fmt: skip
                        report = run_round(store, space, loaded, round_number,
                                           options=round_options)  # fmt: skip
                        peers = report.record.steps["pull"]["verified_peers"]
                        record = space.read_trust(round_number)
                        devices[space.device] = {
                            "perplexity": report.evaluation.perplexities(),
                            "trust": report.evaluation.trust,
                            # the raw scores and their standard errors, in trust's order
                            "scores": record.scores,
                            "errors": record.errors,
                            # auto trust: every candidate mix and its selection score
                            "candidates": record.candidates,
                            "bytes": _round_bytes(store, space, round_number, peers),
                        }
                        done += 1
                    rounds.append({"round": round_number, "devices": devices})
                runs[variant.label][str(seed)] = rounds
                # written as each federation ends: an interrupted simulation keeps what it
                # finished ("finished": false until the last)
                results = _results_document(
                    client_set, settings, loaded, options, train_tokens, warmup, runs, max_tokens
                )
                atomic_write_text(out_dir / RESULTS_FILE, json.dumps(results, indent=1) + "\n")

    return results


def _new_federation(
    store,
    folder: Path,
    client_set: ClientSet,
    data: dict[str, Path],
    loaded: LoadedBase,
    settings: SimulationSettings,
    variant: TrustSettings,
    seed: int,
    reference: Path,
) -> list[Workspace]:
    """A variant x seed federation in its store, every client joined."""
    init_federation(
        store,
        base=loaded.base_path,
        lora=replace(settings.lora, init_seed=seed),
        schedule=settings.schedule,
        trust=variant,
        reference=reference,
    )
    return [
        join_federation(
            store,
            c.name,
            data=data[c.name],
            workspace=folder / "devices" / c.name,
            base=loaded.base_path,
        )
        for c in client_set.clients
    ]


def _finished_warmups(
    out_dir: Path, seeds: range, client_set: ClientSet
) -> dict[tuple[int, str], Workspace]:
    """Every (seed, client) whose round 0 some federation in the run folder finished training."""
    found: dict[tuple[int, str], Workspace] = {}
    for seed in seeds:
        for client in client_set.clients:
            pattern = f"federations/*/seed-{seed}/devices/{client.name}/{DeviceConfig.FILE}"
            for config in sorted(out_dir.glob(pattern)):
                space = Workspace(config.parent)
                if "train" in space.read_round_record(0).steps:
                    found[(seed, client.name)] = space
                    break
    return found


def _resumed_devices(folder: Path, client_set: ClientSet) -> list[Workspace] | None:
    """The workspaces of a federation an earlier run of this simulation made, or None when it
    has none or stopped before every device had joined (join writes device.json last)."""
    spaces = [Workspace(folder / "devices" / c.name) for c in client_set.clients]
    if all((space.root / DeviceConfig.FILE).is_file() for space in spaces):
        return spaces
    return None


def _identity(
    client_set: ClientSet,
    settings: SimulationSettings,
    loaded: LoadedBase,
    options: RoundOptions,
    max_tokens: int | None,
    store_url: str | None,
) -> dict:
    """What every federation of a run folder is made from: the clients' documents, the base,
    the training and scoring settings, the store. A resumed run must match it; the variants and
    seeds are not part of it (each has its own federation folder)."""
    settings_document = _settings_document(settings, loaded, options, max_tokens or None)
    for per_run in ("variants", "seeds", "first_seed"):
        del settings_document[per_run]
    # what scores and trains them: a resume on other settings would not give the numbers of
    # an unbroken run (float sums differ with the thread count: docs/limits.md)
    settings_document |= {
        "runtime_quant": loaded.runtime_quant,
        "device": loaded.device,
        "threads": loaded.threads or os.cpu_count(),
    }
    return {  # the clients by their documents, not by the dataset's name or a typed path
        "format": IDENTITY_FORMAT,
        "clients": {c.name: [d.id for d in c.documents] for c in client_set.clients},
        "reference": [d.id for d in client_set.reference],
        "base": {"sha256": loaded.info.fingerprint},  # the file, whatever it is called
        "settings": settings_document,
        "store": store_url,
    }


def _check_identity(out_dir: Path, identity: dict) -> None:
    """Refuse to resume a run folder made from other data or settings, naming what differs."""
    path = out_dir / IDENTITY_FILE
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            raise ValueError(path)
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputFileError(
            f"{out_dir} holds no simulation this version can resume ({IDENTITY_FILE} is "
            "missing or damaged)",
            "choose a new --out folder",
        ) from None
    identity = json.loads(json.dumps(identity))  # as it reads back: tuples become lists
    differ = [name for name, value in identity.items() if recorded.get(name) != value]
    if "settings" in differ:
        was, now = recorded.get("settings") or {}, identity["settings"]
        changed = [key for key in {**was, **now} if was.get(key) != now.get(key)]
        differ[differ.index("settings")] = f"settings ({', '.join(changed)})"
    if differ:
        raise InputFileError(
            f"the simulation in {out_dir} was made with other {', '.join(differ)}",
            f"give the options it was started with (its {IDENTITY_FILE}), or a new --out",
        )


def _base_document(loaded: LoadedBase) -> dict:
    return {"name": loaded.info.name, "bytes": loaded.base_path.stat().st_size}


def _settings_document(
    settings: SimulationSettings, loaded: LoadedBase, options: RoundOptions, max_tokens: int | None
) -> dict:
    return {
        "variants": [v.label for v in settings.variants],
        "seeds": settings.seeds,
        "first_seed": settings.first_seed,
        "rounds": settings.rounds,
        "schedule": settings.schedule.as_dict(),
        "epochs": settings.epochs,
        "lora": settings.lora.as_dict(),
        "train": asdict(options.train),
        "precision": loaded.precision,
        "test_tokens": options.test_tokens,
        "val_tokens": options.val_tokens,
        "max_tokens": max_tokens,
    }


def _results_document(
    client_set: ClientSet,
    settings: SimulationSettings,
    loaded: LoadedBase,
    options: RoundOptions,
    train_tokens: dict[str, int],
    warmup: dict[tuple[int, str], Workspace],
    runs: dict[str, dict[str, list]],
    max_tokens: int | None,
) -> dict:
    """results.json of the federations finished so far: `runs` holds only those, and
    `finished` says whether every variant x seed is among them."""
    first_seed = settings.first_seed
    finished = {label: seeds for label, seeds in runs.items() if seeds}
    results = {
        "format": RESULTS_FORMAT,
        "dataset": client_set.dataset,
        "finished": sum(map(len, finished.values())) == len(settings.variants) * settings.seeds,
        "settings": _settings_document(settings, loaded, options, max_tokens),
        "base": _base_document(loaded),
        "clients": [
            {
                "name": c.name,
                "documents": len(c.documents),
                "mixture": c.mixture,
                "train_tokens": train_tokens[c.name],
                # what one device trained over all rounds, in passes over its train split
                "epochs": _epochs_done(
                    warmup.get((first_seed, c.name)), settings.rounds, train_tokens[c.name]
                ),
            }
            for c in client_set.clients
        ],
        "runs": finished,
    }
    results["summary"] = summarize(results)
    return results


def _check_splits(client_set: ClientSet) -> None:
    """Every client must have a document in each split; say which client does not."""
    from edgefed.train.split import SplitRule, split_documents

    for client in client_set.clients:
        try:
            split_documents(client.documents, SplitRule())
        except DataError as exc:
            raise DataError(
                f"client {client.name}: {exc.problem}",
                "give every client more documents (--docs-per-client, or more files)",
            ) from exc


def _train_tokens(client, runtime) -> int:
    """Tokens of the client's train split, as its device's training will cut it."""
    from edgefed.train.split import TRAIN, SplitRule, split_documents

    documents = split_documents(client.documents, SplitRule())[TRAIN]
    return sum(len(runtime.tokenize(d.text, add_bos=False)) + 1 for d in documents)


def _epochs_done(space: Workspace | None, rounds: int, train_tokens: int) -> float | None:
    """Training tokens of every round of the first seed's first variant over the train split."""
    if space is None or not train_tokens:
        return None
    seen = sum(space.train_run(r).read_metrics().tokens_seen for r in range(rounds))
    return seen / train_tokens


def _cap_tokens(client_set: ClientSet, runtime, max_tokens: int) -> ClientSet:
    """Each client keeps its documents, in order, while they fit in `max_tokens` tokens."""
    clients = []
    for client in client_set.clients:
        kept, labels, used = [], [], 0
        for document, label in zip(client.documents, client.labels, strict=True):
            used += len(runtime.tokenize(document.text, add_bos=False)) + 1
            if used > max_tokens and kept:
                break
            kept.append(document)
            labels.append(label)
        clients.append(replace(client, documents=tuple(kept), labels=tuple(labels)))
    return replace(client_set, clients=tuple(clients))


def _trust_matrix(devices: dict, clients: list[str]) -> list[list[float]]:
    """W with rows and columns in client order: row i is device i's trust in each device."""
    matrix = []
    for client in clients:
        trust = devices[client]["trust"]
        weights = dict(zip(trust["devices"], trust["weights"], strict=True))
        matrix.append([weights.get(other, 0.0) for other in clients])
    return matrix


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: dict) -> dict:
    """Per variant: test perplexity of the final round's mix, mean and std over seeds of the
    mean over clients; per client (mean over seeds); gains over local and FedAvg; clients that
    beat local; trust matrices; communication per device per round."""
    clients = [c["name"] for c in results["clients"]]
    summary = {}
    per_client = {}
    for label, seeds in results["runs"].items():
        finals = [rounds[-1]["devices"] for rounds in seeds.values()]
        per_client[label] = {
            c: statistics.fmean(f[c]["perplexity"]["aggregated"] for f in finals) for c in clients
        }
        seed_means = [statistics.fmean(f[c]["perplexity"]["aggregated"] for c in clients)
                      for f in finals]  # fmt: skip
        by_round = [
            statistics.fmean(
                rounds[r]["devices"][c]["perplexity"]["aggregated"]
                for rounds in seeds.values()
                for c in clients
            )
            for r in range(results["settings"]["rounds"])
        ]
        traffic = [d["bytes"] for rounds in seeds.values() for rd in rounds
                   for d in rd["devices"].values()]  # fmt: skip
        summary[label] = {
            "mean": statistics.fmean(seed_means),
            "std": _std(seed_means),
            "seed_means": seed_means,
            "per_client": per_client[label],
            "per_round": by_round,
            "trust_matrices": [_trust_matrix(final, clients) for final in finals],
            "bytes_per_device_round": {
                "sent": statistics.fmean(t["sent"] for t in traffic),
                "received": statistics.fmean(t["received"] for t in traffic),
            },
        }
    for baseline in ("local", "fedavg"):
        if baseline not in summary:
            continue
        for row in summary.values():
            reference = summary[baseline]
            row[f"gain_over_{baseline}"] = 1 - row["mean"] / reference["mean"]
            row[f"beats_{baseline}"] = sum(
                row["per_client"][c] < reference["per_client"][c] for c in clients
            )
            row[f"sigmas_over_{baseline}"] = (
                (reference["mean"] - row["mean"]) / math.hypot(row["std"], reference["std"])
                if row["std"] or reference["std"]
                else None
            )
    return summary
