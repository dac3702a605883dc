"""`edgefed simulate`: a whole federation of virtual devices on this machine, per trust scheme."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgefed.cli.builders import BaseOptions, train_config
from edgefed.cli.options import (
    BaseOption,
    BatchSizeOption,
    Bf16Option,
    DeviceOption,
    GradientCheckpointingOption,
    JsonOption,
    LearningRateOption,
    PrecisionOption,
    RuntimeQuantOption,
    SeqLenOption,
    ThreadsOption,
    TokenFileOption,
    store_token,
)
from edgefed.cli.output import emit_json, stderr, stdout, user_errors
from edgefed.device.federation import (
    DEFAULT_MAX_STEPS,
    DEFAULT_ROUND_EPOCHS,
    DEFAULT_WARMUP_EPOCHS,
)
from edgefed.errors import ConfigError
from edgefed.plural import counted
from edgefed.runtime.quantize import DEFAULT_RUNTIME_QUANT
from edgefed.simulation.clients import DEFAULT_DOCS_PER_CLIENT
from edgefed.simulation.run import (
    DEFAULT_ROUND_STEPS,
    DEFAULT_SIMULATION_DEVICE,
    DEFAULT_SIMULATION_PRECISION,
    DEFAULT_VARIANTS,
    DEFAULT_WARMUP_STEPS,
    DEMO_ROUNDS,
    DEMO_TEST_TOKENS,
    DEMO_TRAIN,
    DEMO_VAL_TOKENS,
)
from edgefed.trust.schemes import SCHEMES

_DATA = "Data"
_FEDERATION = "Federation"
_TRAINING = "Training"


@user_errors
def simulate(
    dataset: Annotated[
        str | None,
        typer.Option(
            help="bbc-specific (10 clients, half a topic each), bbc-mixed (5 clients, 75% "
            "one topic + 25% the next), code-prose (4 clients: 2 of Python code from this "
            "Python's standard library, 2 of BBC prose) or code-prose-mixed (4 clients, 75% "
            "code + 25% prose or the reverse). Default: code-prose.",
            show_default=False,
            rich_help_panel=_DATA,
        ),
    ] = None,
    clients: Annotated[
        Path | None,
        typer.Option(
            help="Your own clients instead: one sub-folder of text files per client.",
            show_default=False,
            rich_help_panel=_DATA,
        ),
    ] = None,
    docs_per_client: Annotated[
        int | None,
        typer.Option(
            help=f"Documents per client (scarce local data). Default: "
            f"{DEFAULT_DOCS_PER_CLIENT} for the built-in datasets, every file of a --clients "
            "folder.",
            min=3,
            show_default=False,
            rich_help_panel=_DATA,
        ),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            help="Cap each client's text at this many tokens.",
            min=64,
            show_default=False,
            rich_help_panel=_DATA,
        ),
    ] = None,
    trust: Annotated[
        str,
        typer.Option(
            help=f"Trust variants to compare, comma-separated: {', '.join(SCHEMES)}, each "
            "optionally with :t=T (temperature) or :se=Z (temperature in standard errors), "
            ":top-k=K :threshold=X :merge=exact (e.g. perplexity:se=2:merge=exact). oracle "
            "mixes by the clients' known mixtures: the reference no device could compute.",
            rich_help_panel=_FEDERATION,
        ),
    ] = DEFAULT_VARIANTS,
    seeds: Annotated[
        int,
        typer.Option(
            help="Seeds 0..N-1 of the shared init and the data order.",
            min=1,
            rich_help_panel=_FEDERATION,
        ),
    ] = 1,
    first_seed: Annotated[
        int,
        typer.Option(
            help="The first seed: --first-seed 3 --seeds 3 runs seeds 3..5, the federations "
            "one run of --seeds 6 would run after its first three, so a long comparison can be "
            "split over sessions or machines (bench/quality.py merges such runs by seed).",
            min=0,
            rich_help_panel=_FEDERATION,
        ),
    ] = 0,
    rounds: Annotated[
        int, typer.Option(help="Rounds per federation.", min=1, rich_help_panel=_FEDERATION)
    ] = DEMO_ROUNDS,
    epochs: Annotated[
        float | None,
        typer.Option(
            help="Training per device, in epochs of its own train split over all rounds, "
            "shared equally by the rounds. Default: a federation's default schedule "
            f"({DEFAULT_WARMUP_EPOCHS:g} epochs in round 0, {DEFAULT_ROUND_EPOCHS:g} in each "
            f"later round, at most {DEFAULT_MAX_STEPS} steps a round), unless the steps below "
            "are given.",
            min=0.01,
            show_default=False,
            rich_help_panel=_FEDERATION,
        ),
    ] = None,
    warmup_steps: Annotated[
        int | None,
        typer.Option(
            help=f"Local steps of round 0 (instead of --epochs). Default: {DEFAULT_WARMUP_STEPS}.",
            min=0,
            show_default=False,
            rich_help_panel=_FEDERATION,
        ),
    ] = None,
    round_steps: Annotated[
        int | None,
        typer.Option(
            help=f"Local steps of every later round (instead of --epochs). Default: "
            f"{DEFAULT_ROUND_STEPS}.",
            min=1,
            show_default=False,
            rich_help_panel=_FEDERATION,
        ),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            help="Run over this relay or s3:// store instead of a folder (one variant, one seed).",
            show_default=False,
            rich_help_panel=_FEDERATION,
        ),
    ] = None,
    token_file: TokenFileOption = None,
    precision: PrecisionOption = DEFAULT_SIMULATION_PRECISION,
    device: DeviceOption = DEFAULT_SIMULATION_DEVICE,
    seq_len: SeqLenOption = DEMO_TRAIN.seq_len,
    batch_size: BatchSizeOption = DEMO_TRAIN.batch_size,
    lr: LearningRateOption = DEMO_TRAIN.learning_rate,
    bf16: Bf16Option = DEMO_TRAIN.bf16,
    gradient_checkpointing: GradientCheckpointingOption = DEMO_TRAIN.gradient_checkpointing,
    val_tokens: Annotated[
        int,
        typer.Option(
            help="Tokens each device scores its peers on: its trust-validation split, or the "
            "reference text for prediction trust (0: all).",
            min=0,
        ),
    ] = DEMO_VAL_TOKENS,
    test_tokens: Annotated[
        int, typer.Option(help="Test-split tokens scored per device and round (0: all).", min=0)
    ] = DEMO_TEST_TOKENS,
    out: Annotated[
        Path | None,
        typer.Option(
            # no <placeholders>: the markdown help drops them as HTML tags
            help="Run folder. Default: simulations/DATASET-YYYYMMDD-HHMMSS (the start time).",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Go on with the stopped simulation in --out (the same data and options): "
            "finished rounds are read back, the interrupted one continues where it stopped. "
            "Other --trust variants or seeds may be asked for; results.json then holds those "
            "asked for.",
        ),
    ] = False,
    base: BaseOption = None,
    threads: ThreadsOption = None,
    runtime_quant: RuntimeQuantOption = DEFAULT_RUNTIME_QUANT,
    as_json: JsonOption = False,
) -> None:
    """Simulate a federation of virtual devices and compare trust schemes on the same data.

    Every device is a real workspace on a real store and runs the code of `edgefed round`;
    they share one loaded base. With no options this is the demo, a cell of the regime
    map: 4 devices, two with 10 pieces of Python code, two with 10 BBC articles, each training 1
    epoch, mixed by local, FedAvg, the oracle and perplexity trust, in minutes on a laptop CPU.
    Ends with test perplexity per scheme and per client (each device's test split, never its
    trust-validation split), results.json and PNG plots in the run folder.
    """
    from edgefed.device.round import RoundOptions
    from edgefed.simulation.clients import load_clients
    from edgefed.simulation.report import write_plots
    from edgefed.simulation.run import SimulationSettings
    from edgefed.simulation.run import simulate as run_simulation
    from edgefed.trust.settings import parse_variants

    client_set = load_clients(dataset, clients, docs_per_client=docs_per_client)
    settings = SimulationSettings(
        variants=parse_variants(trust),
        seeds=seeds,
        first_seed=first_seed,
        rounds=rounds,
        warmup_steps=warmup_steps,
        round_steps=round_steps,
        epochs=epochs,
        round_options=RoundOptions(
            train=train_config(
                seq_len=seq_len,
                batch_size=batch_size,
                lr=lr,
                bf16=bf16,
                gradient_checkpointing=gradient_checkpointing,
            ),
            test_tokens=test_tokens or None,
            val_tokens=val_tokens or None,
        ),
    )
    if resume and out is None:
        raise ConfigError("--resume needs the run folder", "give it with --out")
    out = out or Path("simulations") / (
        f"{client_set.dataset.split(':')[0]}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    if not as_json:
        _print_clients(client_set)
    with (
        BaseOptions(precision, device, runtime_quant, threads).load(base) as loaded,
        Progress(
            TextColumn("[bold]simulating"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=stderr,
            transient=True,
        ) as bar,
    ):
        loaded.check_trainable()  # before any workspace or store is made
        task = bar.add_task("starting", total=None)
        results = run_simulation(
            client_set,
            out,
            loaded,
            settings,
            store_url=store,
            token=store_token(token_file),
            max_tokens=max_tokens,
            resume=resume,
            on_progress=lambda p: bar.update(
                task, completed=p.done, total=p.total, description=p.message
            ),
        )
    plots = write_plots(results, out)
    if as_json:
        emit_json(results | {"outputs": {"folder": str(out), "plots": [str(p) for p in plots]}})
        return
    _print_results(results)
    stdout.print(f"report: {out / 'results.json'}, " + ", ".join(str(p) for p in plots))


def _print_clients(client_set) -> None:
    from edgefed.code_text import code_source_name

    table = Table("client", "documents", "mixture", title=f"clients ({client_set.dataset})",
                  title_justify="left")  # fmt: skip
    for client in client_set.clients:
        total = len(client.documents)
        mixture = ", ".join(f"{label} {n / total:.0%}" for label, n in client.mixture.items())
        table.add_row(client.name, str(total), mixture)
    stdout.print(table)
    if client_set.dataset.startswith("code-prose"):
        stdout.print(f"(code: the {code_source_name()}; prose: BBC News)")


def _print_results(results: dict) -> None:
    summary = results["summary"]
    mb = 1e6
    table = Table(
        title=f"test perplexity after round {results['settings']['rounds'] - 1} "
        f"(mean ± std over {counted(results['settings']['seeds'], 'seed')})",
        title_justify="left",
    )
    for column in ("trust", "perplexity", "vs local", "vs fedavg", "beats local",
                   "MB sent / received per round"):  # fmt: skip
        table.add_column(column, justify="left" if column == "trust" else "right")
    n = len(results["clients"])
    for label, row in summary.items():
        traffic = row["bytes_per_device_round"]
        table.add_row(
            label,
            f"{row['mean']:.3f} ± {row['std']:.3f}",
            f"{row['gain_over_local']:+.1%}" if "gain_over_local" in row else "-",
            f"{row['gain_over_fedavg']:+.1%}" if "gain_over_fedavg" in row else "-",
            f"{row['beats_local']}/{n}" if "beats_local" in row else "-",
            f"{traffic['sent'] / mb:.2f} / {traffic['received'] / mb:.2f}",
        )
    stdout.print(table)
    stdout.print(
        f"(the base model, {results['base']['name']}, is {results['base']['bytes'] / mb:.0f} MB; "
        "a device only ever sends its adapter)"
    )
    if results["settings"]["seeds"] == 1:
        stdout.print(
            "(one seed: differences of about 1% or less are within the spread between seeds; "
            "--seeds 3 measures it, and the regime map (docs/measurements/regime-map.md) gives "
            "this setting over 3 seeds)"
        )
    per_client = Table("client", *summary, title="per client (mean over seeds)",
                       title_justify="left")  # fmt: skip
    for client in results["clients"]:
        name = client["name"]
        per_client.add_row(name, *(f"{row['per_client'][name]:.3f}" for row in summary.values()))
    stdout.print(per_client)
