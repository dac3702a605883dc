"""Text from the base model, bare or with an adapter, sampled by llama.cpp's own sampler chain.

A generation context is a llama context of its own over the runtime's loaded model: a process
that scores and generates (`generate --compare`) loads the weights once, and the scoring lanes
keep their buffers. Sampling is llama.cpp's chain as its own tools run it: top-p, then the
temperature, then a draw from a seeded generator; at temperature 0 the most likely token, so
the text is the model's greedy continuation (tested against the scoring path's argmax).

The context keeps the tokens it has decoded in its KV cache and, for the next prompt, decodes
only what follows the part it shares with them: a chat re-renders the whole conversation every
turn and pays only for the new turn.
"""

from __future__ import annotations

import codecs
import ctypes
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edgefed.errors import ConfigError, DataError, ModelFormatError, RuntimeBackendError
from edgefed.runtime.backend import take_recent_errors
from edgefed.runtime.context import apply_adapter

DEFAULT_MAX_TOKENS = 256
# llama.cpp's own defaults for its tools (common/common.h): creative enough to read, not noise
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
# positions a prompt is decoded in per llama_decode call
PROMPT_BATCH = 512
MAX_SEED = 2**32 - 2  # 2**32 - 1 is llama.cpp's "pick a random seed"
_UNKNOWN = object()  # the adapter a context holds after an interrupted switch


@dataclass(frozen=True)
class Sampling:
    """How a continuation is drawn. `seed` None: a fresh one, reported in the Generation."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"--max-tokens {self.max_tokens}", "ask for at least 1 token")
        if not self.temperature >= 0:
            raise ConfigError(
                f"temperature {self.temperature}", "use 0 (greedy) or a positive temperature"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top-p {self.top_p}", "use a top-p in (0, 1]")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed {self.seed}", f"use a seed in 0..{MAX_SEED}")


@dataclass(frozen=True)
class Generation:
    """One continuation: its text, token counts, why it stopped and what drew it."""

    text: str
    prompt_tokens: int
    tokens: int
    stop: str  # "end": the model ended its turn; "length": max_tokens; "context": it is full
    seconds: float
    seed: int
    token_ids: tuple[int, ...] = ()  # the tokens written (the end-of-turn token not among them)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "tokens": self.tokens,
            "stop": self.stop,
            "seconds": round(self.seconds, 3),
            "seed": self.seed,
        }


class GenerationContext:
    """A llama context of `n_ctx` positions for generation, over a loaded model."""

    def __init__(self, ll, model, vocab, *, n_ctx: int, threads: int) -> None:
        self._ll = ll
        self._vocab = vocab
        self.n_ctx = n_ctx
        params = ll.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = min(PROMPT_BATCH, n_ctx)
        params.n_ubatch = min(PROMPT_BATCH, n_ctx)
        params.n_seq_max = 1
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        take_recent_errors()
        ctx = ll.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeBackendError(
                f"llama.cpp could not create a {n_ctx}-token context "
                f"({take_recent_errors() or 'no reason'})",
                "ask for a smaller --context",
            )
        self._ctx = ctx
        self._memory = ll.llama_get_memory(ctx)
        self._cached: list[int] = []  # the tokens in the KV cache, in order
        self._active: object | None = None
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._ll.llama_free(self._ctx)
            self._closed = True

    def generate(
        self,
        prompt: Sequence[int],
        handle: object | None,
        label: str,
        sampling: Sampling,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Continue `prompt` (token ids) with the adapter `handle` applied (None: the bare base);
        `on_text` gets the text as it is made, in whole UTF-8 characters.

        Raises DataError when prompt and max_tokens do not fit the context."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise DataError("the prompt is empty", "give a prompt of at least one token")
        room = self.n_ctx - len(prompt)
        if room < 1:
            raise DataError(
                f"the prompt is {len(prompt):,} tokens and the context holds {self.n_ctx:,}",
                "shorten the prompt, or give a larger --context",
            )
        budget = min(sampling.max_tokens, room)
        try:
            return self._generate(prompt, handle, label, sampling, budget, on_text)
        except BaseException:
            # an interrupt (Ctrl-C) can land after llama.cpp changed its cache or adapter and
            # before the bookkeeping did: start the next generation from a clean context
            self._forget(0)
            self._active = _UNKNOWN
            raise

    def _generate(
        self,
        prompt: list[int],
        handle: object | None,
        label: str,
        sampling: Sampling,
        budget: int,
        on_text: Callable[[str], None] | None,
    ) -> Generation:
        ll = self._ll
        if handle is not self._active:
            self._forget(0)  # the cache was computed under another adapter
            apply_adapter(ll, self._ctx, handle, label)
            self._active = handle
        seed = secrets.randbelow(MAX_SEED + 1) if sampling.seed is None else sampling.seed
        sampler = self._sampler(sampling, seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        started = time.perf_counter()
        made: list[int] = []
        stop = "length"
        try:
            self._feed(prompt)
            while len(made) < budget:
                token = int(ll.llama_sampler_sample(sampler, self._ctx, -1))
                if ll.llama_vocab_is_eog(self._vocab, token):
                    stop = "end"
                    break
                made.append(token)
                text = decoder.decode(self._piece(token))
                if text:
                    pieces.append(text)
                    if on_text is not None:
                        on_text(text)
                if len(made) < budget:
                    self._decode([token], len(self._cached))
        finally:
            ll.llama_sampler_free(sampler)
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            if on_text is not None:
                on_text(tail)
        if stop != "end" and len(made) < sampling.max_tokens:
            stop = "context"
        return Generation(
            text="".join(pieces),
            prompt_tokens=len(prompt),
            tokens=len(made),
            stop=stop,
            seconds=time.perf_counter() - started,
            seed=seed,
            token_ids=tuple(made),
        )

    def _sampler(self, sampling: Sampling, seed: int):
        ll = self._ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if sampling.temperature == 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(sampling.top_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(sampling.temperature))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        return chain

    def _feed(self, prompt: list[int]) -> None:
        """Bring the KV cache to `prompt`: keep the shared prefix, decode the rest (at least the
        last token, whose logits the first draw needs)."""
        shared = 0
        for cached, token in zip(self._cached, prompt, strict=False):
            if cached != token:
                break
            shared += 1
        shared = self._forget(min(shared, len(prompt) - 1))
        for start in range(shared, len(prompt), PROMPT_BATCH):
            self._decode(prompt[start : start + PROMPT_BATCH], start)

    def _forget(self, keep: int) -> int:
        """Drop the cached positions from `keep` on; return how many are kept (0 where the
        model's cache cannot drop a tail, as a sliding-window one may refuse to)."""
        # always asked (cheap): it also drops anything llama.cpp holds beyond the bookkeeping
        if keep > 0 and not self._ll.llama_memory_seq_rm(self._memory, 0, keep, -1):
            keep = 0
        if keep == 0:
            self._ll.llama_memory_clear(self._memory, True)
        del self._cached[keep:]
        return keep

    def _decode(self, tokens: list[int], first_position: int) -> None:
        ll = self._ll
        assert first_position == len(self._cached)
        array = (ll.llama_token * len(tokens))(*tokens)
        rc = ll.llama_decode(self._ctx, ll.llama_batch_get_one(array, len(tokens)))
        if rc != 0:
            raise RuntimeBackendError(
                f"llama_decode failed with code {rc}",
                take_recent_errors() or "run with --verbose to see llama.cpp's log",
            )
        self._cached.extend(tokens)

    def _piece(self, token: int) -> bytes:
        return token_bytes(self._ll, self._vocab, token, special=False)


def token_bytes(ll, vocab, token: int, *, special: bool) -> bytes:
    """The bytes llama.cpp renders for one token (a piece of UTF-8, maybe partial)."""
    buffer = ctypes.create_string_buffer(64)
    n = ll.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, special)
    if n < 0:
        buffer = ctypes.create_string_buffer(-n)
        n = ll.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, special)
    return buffer.raw[:n]


def chat_formatter(ll, model, vocab) -> Callable[[Sequence[dict[str, str]]], str]:
    """The base's own chat template (the GGUF's `tokenizer.chat_template`, run by Jinja as
    transformers and llama-cpp-python run it), compiled once: a function from a conversation to
    its text, ending where the assistant's next turn starts. ModelFormatError, in one line,
    when the base has no template or the template cannot render."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = ll.llama_model_chat_template(model, None)
    if not template:
        raise ModelFormatError(
            "the base has no chat template (tokenizer.chat_template in its GGUF)",
            "generate without --chat, or use a base converted with its chat template",
        )

    def special_text(token: int) -> str:
        if token < 0:
            return ""
        return token_bytes(ll, vocab, token, special=True).decode("utf-8", errors="replace")

    def refused(exc: Exception) -> ModelFormatError:
        return ModelFormatError(
            f"the base's chat template refused the conversation ({exc})",
            "generate without --chat",
        )

    try:
        formatter = Jinja2ChatFormatter(
            template.decode("utf-8"),
            eos_token=special_text(int(ll.llama_vocab_eos(vocab))),
            bos_token=special_text(int(ll.llama_vocab_bos(vocab))),
            add_generation_prompt=True,
        )
    except Exception as exc:  # a template Jinja cannot compile
        raise refused(exc) from exc

    def render(messages: Sequence[dict[str, str]]) -> str:
        try:
            return formatter(messages=list(messages)).prompt
        except Exception as exc:  # a template's own raise_exception, a Jinja error
            raise refused(exc) from exc

    return render
