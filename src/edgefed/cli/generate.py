"""`edgefed generate` and `edgefed chat`: talk to a device's model, or compare it with the base
and its own adapter."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgefed.cli.builders import BaseOptions
from edgefed.cli.options import (
    AdapterChoiceOption,
    BaseOption,
    JsonOption,
    ModelRoundOption,
    RuntimeQuantOption,
    ThreadsOption,
    WorkspaceOption,
)
from edgefed.cli.output import emit_json, print_whole, stderr, user_errors
from edgefed.errors import ConfigError, EdgefedError, InputFileError
from edgefed.runtime.generate import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from edgefed.runtime.quantize import DEFAULT_RUNTIME_QUANT

_SAMPLING = "Sampling"
MaxTokensOption = Annotated[
    int,
    typer.Option(
        "--max-tokens", "-n", help="Most tokens to write.", min=1, rich_help_panel=_SAMPLING
    ),
]
TemperatureOption = Annotated[
    float,
    typer.Option(
        "--temperature",
        help="Sampling temperature; 0 writes the model's most likely continuation (greedy, "
        "the same every time).",
        min=0.0,
        rich_help_panel=_SAMPLING,
    ),
]
TopPOption = Annotated[
    float,
    typer.Option(
        "--top-p",
        help="Draw from the most likely tokens that make up this much probability.",
        min=0.0,
        max=1.0,
        rich_help_panel=_SAMPLING,
    ),
]
SeedOption = Annotated[
    int | None,
    typer.Option(
        "--seed",
        help="Seed of the draw: the same seed, prompt and model give the same text. Default: a "
        "fresh one, reported with --json.",
        min=0,
        show_default=False,
        rich_help_panel=_SAMPLING,
    ),
]
ContextOption = Annotated[
    int | None,
    typer.Option(
        "--context",
        help="Tokens of context (prompt, history and reply). Default: 4096, at most the "
        "base's own.",
        min=16,
        show_default=False,
    ),
]


def _sampling(max_tokens: int, temperature: float, top_p: float, seed: int | None):
    from edgefed.runtime.generate import Sampling

    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt: the argument, else --file, else stdin when it is not a terminal."""
    if prompt is not None and prompt != "-" and prompt_file is not None:
        raise ConfigError("a prompt and --file both given", "give one of them")
    if prompt_file is not None:
        try:
            return prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputFileError(
                f"cannot read prompt file {prompt_file} ({exc})", "give a UTF-8 text file"
            ) from exc
    if prompt is not None and prompt != "-":
        return prompt
    if prompt is None and sys.stdin.isatty():
        raise InputFileError(
            "no prompt", "give one as an argument, with --file, or on stdin (echo text | ...)"
        )
    return sys.stdin.read()


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@user_errors
def generate(
    prompt: Annotated[
        str | None,
        typer.Argument(help="The prompt. '-' or none: read it from stdin.", show_default=False),
    ] = None,
    prompt_file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="Read the prompt from this file.", show_default=False),
    ] = None,
    adapter: AdapterChoiceOption = None,
    round_number: ModelRoundOption = None,
    workspace: WorkspaceOption = None,
    base: BaseOption = None,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat", help="Send the prompt as a user message in the base's own chat template."
        ),
    ] = False,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Write the base's, the device's own adapter's and its personalised mix's "
            "continuations side by side (same seed), each with its test-split perplexity.",
        ),
    ] = False,
    max_tokens: MaxTokensOption = DEFAULT_MAX_TOKENS,
    temperature: TemperatureOption = DEFAULT_TEMPERATURE,
    top_p: TopPOption = DEFAULT_TOP_P,
    seed: SeedOption = None,
    context: ContextOption = None,
    threads: ThreadsOption = None,
    runtime_quant: RuntimeQuantOption = DEFAULT_RUNTIME_QUANT,
    as_json: JsonOption = False,
) -> None:
    """Write text with a device's model: by default its latest personalised (aggregated)
    adapter over its base, streamed as it is made.

    `--adapter local` is the device's own adapter of the round, `base` the bare base, and a
    path names any GGUF or PEFT adapter (with `--base` outside a workspace). `--compare` shows
    the three models of a round side by side with the perplexity each scored on the device's
    test split.
    """
    from edgefed.use import choose_model

    text = _read_prompt(prompt, prompt_file)
    sampling = _sampling(max_tokens, temperature, top_p, seed)
    loading = BaseOptions(runtime_quant=runtime_quant, threads=threads)
    if compare:
        if adapter is not None or base is not None:
            raise ConfigError(
                "--compare shows a device's base, local and aggregated models",
                "leave out --adapter and --base (choose the round with --round)",
            )
        _compare(text, sampling, round_number, workspace, loading, chat, context, as_json)
        return
    model = choose_model(adapter, round_number=round_number, workspace=workspace, base=base)
    from edgefed.use import generate as generate_text

    with loading.load(model.base) as loaded:
        loaded.on_status = lambda message: stderr.print(message)
        stream = None if as_json else _write
        result = generate_text(loaded, model, text, sampling, chat=chat, context=context,
                               on_text=stream)  # fmt: skip
    if as_json:
        emit_json({**model.as_dict(), **result.as_dict()})
        return
    _write("\n")
    stderr.print(
        f"[dim]{model.label}: {result.tokens} tokens at {result.tokens_per_second:.1f} "
        f"tokens/s, {_stopped(result.stop)}[/]",
        highlight=False,
    )


def _stopped(stop: str) -> str:
    return {"end": "the model ended", "length": "--max-tokens reached", "context": "context full"}[
        stop
    ]


def _compare(text, sampling, round_number, workspace, loading: BaseOptions, chat, context, as_json):
    from edgefed.device.workspace import find_workspace
    from edgefed.use import compare

    ws = find_workspace(workspace)
    with loading.load(ws.config.base) as loaded:
        loaded.on_status = lambda message: stderr.print(message)
        with stderr.status("generating") as status:
            rows = compare(
                loaded,
                ws,
                text,
                sampling,
                round_number=round_number,
                chat=chat,
                context=context,
                on_model=lambda model: status.update(f"generating with {model.label}"),
            )
    if as_json:
        emit_json({"device": ws.device, "prompt": text, "models": [r.as_dict() for r in rows]})
        return
    table = Table(title=f"{ws.device}: {text.strip()[:60]!r}", title_justify="left")
    for row in rows:
        table.add_column(f"{row.model.label}\ntest perplexity {row.test_perplexity:.3f}", ratio=1)
    table.add_row(*(row.generation.text.strip() for row in rows))
    print_whole(table)


@user_errors
def chat(
    adapter: AdapterChoiceOption = None,
    round_number: ModelRoundOption = None,
    workspace: WorkspaceOption = None,
    base: BaseOption = None,
    system: Annotated[
        str | None,
        typer.Option("--system", help="A system message the chat starts with.", show_default=False),
    ] = None,
    max_tokens: MaxTokensOption = DEFAULT_MAX_TOKENS,
    temperature: TemperatureOption = DEFAULT_TEMPERATURE,
    top_p: TopPOption = DEFAULT_TOP_P,
    seed: SeedOption = None,
    context: ContextOption = None,
    threads: ThreadsOption = None,
    runtime_quant: RuntimeQuantOption = DEFAULT_RUNTIME_QUANT,
) -> None:
    """Chat with a device's model (by default its latest personalised adapter) in the base's
    own chat template.

    The history stays within the context (the oldest turns are dropped when it is full). Ctrl-C
    stops a reply; Ctrl-D (or Ctrl-C at the prompt) ends the chat; `/reset` forgets the
    history. Lines read from a pipe are sent one by one.
    """
    from edgefed.use import ChatSession, choose_model

    model = choose_model(adapter, round_number=round_number, workspace=workspace, base=base)
    interactive = sys.stdin.isatty()
    with BaseOptions(runtime_quant=runtime_quant, threads=threads).load(model.base) as loaded:
        loaded.on_status = lambda message: stderr.print(message)
        session = ChatSession(
            loaded, model, _sampling(max_tokens, temperature, top_p, seed), system=system,
            context=context,
        )  # fmt: skip
        if interactive:
            stderr.print(f"chatting with {model.label} (Ctrl-D ends, /reset forgets)")
        while True:
            try:
                line = input("> ") if interactive else sys.stdin.readline()
            except (EOFError, KeyboardInterrupt):
                break
            if not interactive and not line:
                break
            message = line.strip()
            if not message:
                continue
            if message == "/reset":
                session.messages = session.messages[:1] if system else []
                stderr.print("history forgotten")
                continue
            dropped = session.dropped
            try:
                session.reply(message, on_text=_write)
            except KeyboardInterrupt:
                stderr.print("\n[dim](reply stopped)[/]")
            except EdgefedError as exc:  # a message too long for the context: say so, go on
                stderr.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
                continue
            _write("\n")
            if session.dropped > dropped:
                stderr.print("[dim](the oldest turns were dropped to fit the context)[/]")
    if interactive:
        stderr.print("")
