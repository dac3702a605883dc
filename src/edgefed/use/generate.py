"""Text from a device's model: one continuation, the three models of a round side by side, and a
chat that keeps its history within the context.

Everything runs through the base's llama.cpp runtime (`LoadedBase.runtime`, the copy the
device evaluates with), the chosen adapter hot-swapped in: the model a user talks to is the
model whose perplexity the round reported.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edgefed.errors import AdapterMismatchError, DataError
from edgefed.loaded_base import LoadedBase
from edgefed.runtime.generate import MAX_SEED, Generation, Sampling
from edgefed.use.chosen import AGGREGATED, BASE, LOCAL, ChosenModel, choose_model


def generate(
    loaded: LoadedBase,
    model: ChosenModel,
    prompt: str,
    sampling: Sampling | None = None,
    *,
    chat: bool = False,
    context: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """`model`'s continuation of `prompt` (with `chat`, its reply to it as a user message),
    streamed to `on_text`. `loaded` must be `model`'s base."""
    adapter = _adapter(loaded, model)
    return loaded.runtime.generate(
        prompt, adapter, sampling, chat=chat, context=context, on_text=on_text
    )


@dataclass(frozen=True)
class Compared:
    """One model's continuation beside its perplexity on the device's test split."""

    model: ChosenModel
    generation: Generation
    test_perplexity: float

    def as_dict(self) -> dict:
        return {
            **self.model.as_dict(),
            "test_perplexity": self.test_perplexity,
            **self.generation.as_dict(),
        }


def compare(
    loaded: LoadedBase,
    workspace,
    prompt: str,
    sampling: Sampling | None = None,
    *,
    round_number: int | None = None,
    chat: bool = False,
    context: int | None = None,
    on_model: Callable[[ChosenModel], None] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> list[Compared]:
    """The base, the device's own adapter and its personalised mix of one round (default: the
    latest aggregated) continuing the same prompt with the same seed, each with its test-split
    perplexity (the round's evaluation, computed and recorded first if the round lacks one).
    `on_model` is told which model starts before its text streams to `on_text`."""
    from edgefed.device.evaluate import evaluate_round

    if round_number is None:
        round_number = workspace.last_aggregated_round()
    models = [
        choose_model(choice, round_number=round_number, workspace=workspace.root)
        for choice in (LOCAL, AGGREGATED)
    ]
    models.insert(0, dataclasses.replace(models[0], label=BASE, adapter=None, peft=None))
    evaluation = workspace.read_evaluation(round_number) or evaluate_round(
        workspace, round_number, loaded
    )
    sampling = sampling or Sampling()
    if sampling.seed is None:  # one draw for all three: the models differ, the dice do not
        sampling = dataclasses.replace(sampling, seed=secrets.randbelow(MAX_SEED + 1))
    rows = []
    for model, name in zip(models, (BASE, LOCAL, AGGREGATED), strict=True):
        if on_model is not None:
            on_model(model)
        generation = generate(
            loaded, model, prompt, sampling, chat=chat, context=context, on_text=on_text
        )
        rows.append(Compared(model, generation, evaluation.models[name]["perplexity"]))
    return rows


class ChatSession:
    """A conversation with one model by the base's chat template; turns that no longer fit
    the context (with room for a whole reply) are dropped oldest first, a system message
    kept."""

    def __init__(
        self,
        loaded: LoadedBase,
        model: ChosenModel,
        sampling: Sampling | None = None,
        *,
        system: str | None = None,
        context: int | None = None,
    ) -> None:
        self._loaded = loaded
        self._adapter = _adapter(loaded, model)
        self.model = model
        self.sampling = sampling or Sampling()
        self.context = loaded.runtime.generation_context(context)
        self.messages: list[dict[str, str]] = (
            [{"role": "system", "content": system}] if system else []
        )
        self.dropped = 0  # turns dropped to fit the context

    def reply(self, message: str, on_text: Callable[[str], None] | None = None) -> Generation:
        """The model's answer to `message`, kept in the history with it. A reply cut short
        (Ctrl-C) is kept as far as it went. Raises DataError, the history untouched, when the
        message alone does not fit the context."""
        runtime = self._loaded.runtime
        messages, tokens = self._fitted([*self.messages, {"role": "user", "content": message}])
        self.dropped += (len(self.messages) + 1 - len(messages)) // 2
        self.messages = messages
        parts: list[str] = []

        def collect(text: str) -> None:
            parts.append(text)
            if on_text is not None:
                on_text(text)

        try:
            return runtime.generate(
                tokens, self._adapter, self.sampling, context=self.context, on_text=collect
            )
        finally:
            self.messages.append({"role": "assistant", "content": "".join(parts)})

    def _fitted(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], Sequence[int]]:
        """`messages` without their oldest turns, as few dropped as lets a whole reply fit,
        and their tokens."""
        runtime = self._loaded.runtime
        system = 1 if messages[0]["role"] == "system" else 0
        while True:
            tokens = runtime.chat_tokens(messages)
            if len(tokens) + self.sampling.max_tokens <= self.context:
                return messages, tokens
            if len(messages) - system <= 1:
                raise DataError(
                    f"the message is {len(tokens):,} tokens; with room for a "
                    f"{self.sampling.max_tokens}-token reply the context holds "
                    f"{self.context - self.sampling.max_tokens:,}",
                    "write a shorter message, lower --max-tokens, or give a larger --context",
                )
            messages = messages[:system] + messages[system + 2 :]  # the oldest turn and reply


def _adapter(loaded: LoadedBase, model: ChosenModel):
    if loaded.base_path.resolve() != model.base.resolve():
        raise AdapterMismatchError(
            f"{model.label} runs over {model.base.name}, not {loaded.base_path.name}",
            "load the model's own base",
        )
    return loaded.load_file(model.adapter) if model.adapter is not None else None
