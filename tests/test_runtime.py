"""The llama.cpp runtime: hot-swapped adapters, the scoring rule, top-k, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE_TEXT, hf_tokens

from edgefed.errors import DataError, ModelFormatError
from edgefed.runtime import LlamaRuntime
from edgefed.scoring import windows

# the whole suite only: `make test-fast` leaves this module out (docs/developer/index.md)
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("n", "window", "stride"),
    [(10, 4, 2), (10, 4, 3), (3, 4, 2), (1000, 512, 256), (9, 4, 1), (2, 2, 1)],
)
def test_windows_score_every_token_once_with_enough_context(n, window, stride):
    scored = []
    for w in windows(n, window, stride):
        assert w.end - w.start <= window
        first_target = w.start + w.first_scored + 1
        if w.start > 0:
            assert first_target - w.start >= window - stride  # context of the first scored token
        scored.extend(range(first_target, w.end))
    assert scored == list(range(1, n))


def test_hot_swap_reproduces_every_value_exactly(tiny_lora, tmp_path):
    from conftest import attach_random_lora, load_hf

    from edgefed.quant.lora_gguf import convert_lora_to_gguf

    _kind, folder, base, _, adapter_a = tiny_lora
    attach_random_lora(load_hf(folder), seed=9).save_pretrained(tmp_path / "b")
    adapter_b = convert_lora_to_gguf(tmp_path / "b", tmp_path / "b.gguf", base=base)
    tokens = hf_tokens(folder, SAMPLE_TEXT * 3)
    with LlamaRuntime(base, window=128) as runtime:
        a, b = runtime.load_adapter(adapter_a), runtime.load_adapter(adapter_b)
        assert runtime.load_adapter(adapter_a) is a  # loaded once
        sequence = [a, b, None, a, None, b]
        values = [runtime.perplexity(tokens, adapter).perplexity for adapter in sequence]
    assert values[0] == values[3] and values[1] == values[5] and values[2] == values[4]
    assert len({values[0], values[1], values[2]}) == 3


def test_perplexity_is_exp_mean_nll_and_top_k_is_ordered(tiny_gguf):
    _kind, folder, base = tiny_gguf
    tokens = hf_tokens(folder, SAMPLE_TEXT * 2)
    with LlamaRuntime(base, window=64) as runtime:
        result = runtime.perplexity(tokens, stride=16)
        logprobs, positions = runtime.token_logprobs(tokens, stride=16)
        top = runtime.top_k(tokens, 5, stride=16)
    assert positions.tolist() == list(range(1, len(tokens)))
    assert result.tokens_scored == len(tokens) - 1
    assert result.tokens_evaluated > len(tokens)  # overlapping windows re-read context
    assert result.perplexity == pytest.approx(float(np.exp(-logprobs.mean())))
    assert top.token_ids.shape == (len(tokens) - 1, 5)
    assert (np.diff(top.logprobs, axis=1) <= 0).all() and (top.logprobs <= 0).all()
    assert (top.logprobs[:, 0] >= logprobs - 1e-4).all()  # nothing beats the top-1


def test_remembered_scores_are_the_computed_ones_per_adapter_text_and_k(tiny_lora):
    _kind, folder, base, _, adapter_path = tiny_lora
    tokens = hf_tokens(folder, SAMPLE_TEXT * 2)
    with LlamaRuntime(base, window=64) as fresh:
        adapter = fresh.load_adapter(adapter_path)
        expected = fresh.perplexity(tokens, adapter).mean_nll, fresh.top_k(tokens, 4, adapter)
    with LlamaRuntime(base, window=64, remember_scores=True) as runtime:
        adapter = runtime.load_adapter(adapter_path)
        first = runtime.top_k(tokens, 4, adapter)
        assert runtime.top_k(tokens, 4, adapter) is first  # a lookup, not a second pass
        assert runtime.top_k(tokens, 3, adapter).token_ids.shape[1] == 3  # k is in the key
        assert runtime.top_k(tokens, 4).logprobs.tolist() != first.logprobs.tolist()  # base
        assert runtime.top_k(tokens[:-5], 4, adapter).token_ids.shape[0] == len(tokens) - 6
        nll = runtime.perplexity(tokens, adapter).mean_nll
        assert runtime.perplexity(tokens, adapter).mean_nll == nll == expected[0]
    assert first.token_ids.tolist() == expected[1].token_ids.tolist()
    assert np.allclose(first.logprobs, expected[1].logprobs)


def test_tokenize_adds_bos_only_when_the_model_asks(tiny_gguf):
    _, _, base = tiny_gguf
    with LlamaRuntime(base) as runtime:
        assert (
            runtime.tokenize("hello").tolist()
            == runtime.tokenize("hello", add_bos=runtime.add_bos).tolist()
        )
        assert runtime.tokenize("hello", add_bos=True)[0] == runtime.bos


def test_too_short_text_and_bad_stride_are_data_errors(tiny_gguf):
    _, _, base = tiny_gguf
    with LlamaRuntime(base, window=32) as runtime:
        with pytest.raises(DataError, match="at least 2"):
            runtime.perplexity("")
        with pytest.raises(DataError, match="stride"):
            runtime.perplexity(SAMPLE_TEXT, stride=32)


def test_a_base_model_is_not_an_adapter(tiny_gguf):
    _, _, base = tiny_gguf
    with LlamaRuntime(base) as runtime, pytest.raises(ModelFormatError, match="not a LoRA adapter"):
        runtime.load_adapter(base)


def test_runtime_copy_is_made_once_and_keep_uses_the_file(tiny_gguf, edgefed_home):
    from edgefed.quant.gguf_file import read_base_info
    from edgefed.runtime import runtime_copy

    _, _, base = tiny_gguf
    assert runtime_copy(base, "keep") == base
    copy = runtime_copy(base, "q8_0")
    assert copy.parent == edgefed_home / "cache" / "gguf" and copy.name.endswith(".q8_0.gguf")
    assert read_base_info(copy).file_type == "Q8_0"
    made = copy.stat().st_mtime_ns
    assert runtime_copy(base, "q8_0") == copy and copy.stat().st_mtime_ns == made
    assert runtime_copy(copy, "q8_0") == copy  # already of that type: used as is


def _three_jobs(runtime, tokens, adapters):
    from edgefed.runtime import ScoreJob

    loaded = [runtime.load_adapter(a) for a in adapters]
    return [ScoreJob(tokens, None, "base")] + [
        ScoreJob(tokens, a, f"adapter-{i}") for i, a in enumerate(loaded)
    ]


def test_parallel_lanes_score_exactly_what_one_lane_does(tiny_lora, tmp_path):
    from conftest import attach_random_lora, load_hf

    from edgefed.quant.lora_gguf import convert_lora_to_gguf

    _kind, folder, base, _, adapter_a = tiny_lora
    attach_random_lora(load_hf(folder), seed=11).save_pretrained(tmp_path / "b")
    adapter_b = convert_lora_to_gguf(tmp_path / "b", tmp_path / "b.gguf", base=base)
    tokens = np.asarray(hf_tokens(folder, SAMPLE_TEXT * 4), dtype=np.int32)
    results, events = {}, []
    for lanes, threads in ((1, 1), (2, 2), (3, 2)):
        with LlamaRuntime(
            base, window=64, lanes=lanes, threads=threads, cache_base_scores=False
        ) as runtime:
            assert runtime.lanes == min(lanes, threads)
            jobs = _three_jobs(runtime, tokens, [adapter_a, adapter_b])
            scored = runtime.perplexities(jobs, stride=16, on_progress=events.append)
            tops = runtime.top_ks(jobs, 4, stride=16)
            logprobs = runtime.token_logprobs(tokens, jobs[2].adapter, stride=16)[0]
        results[lanes] = ([r.mean_nll for r in scored], tops, logprobs)
    one, *parallel = results.values()
    assert len(set(one[0])) == 3  # base and two different adapters
    for other in parallel:
        assert other[0] == one[0]  # bit for bit, not approximately
        for mine, theirs in zip(one[1], other[1], strict=True):
            assert np.array_equal(mine.token_ids, theirs.token_ids)
            assert np.array_equal(mine.logprobs, theirs.logprobs)
        assert np.array_equal(other[2], one[2])
    last_run = events[-len(events) // 3 :]
    assert [e.tokens_done for e in last_run] == sorted(e.tokens_done for e in last_run)
    assert last_run[-1].tokens_done == last_run[-1].tokens_total
    assert [e.finished for e in last_run if e.finished] == ["base", "adapter-0", "adapter-1"]


def test_a_window_decoded_in_pieces_scores_what_one_call_with_that_micro_batch_does(tiny_lora):
    """A large vocabulary's window is decoded a few positions at a time, so that its logits
    stay bounded; the KV cache carries the context, so nothing changes but the buffers."""
    _kind, folder, base, _, adapter = tiny_lora
    tokens = np.asarray(hf_tokens(folder, SAMPLE_TEXT * 4), dtype=np.int32)
    for rows in (16, 24):
        scores = []
        for pieces in (rows, None):  # `rows` positions per call, or the window in one call
            with LlamaRuntime(
                base, window=64, rows=pieces, ubatch=rows, lanes=1, cache_base_scores=False
            ) as runtime:
                assert runtime.rows == (pieces or 64)
                jobs = _three_jobs(runtime, tokens, [adapter])
                first = [r.mean_nll for r in runtime.perplexities(jobs)]
                runtime.release_lanes()  # as training does: the next score makes them again
                scores.append(
                    (
                        [r.mean_nll for r in runtime.perplexities(jobs)],
                        [r.mean_nll for r in runtime.perplexities(jobs, stride=16)],
                        runtime.top_ks(jobs, 3, stride=16),
                        runtime.token_logprobs(tokens, jobs[1].adapter)[0],
                    )
                )
                assert scores[-1][0] == first
        pieces, whole = scores
        assert pieces[0] == whole[0] and pieces[1] == whole[1]  # bit for bit
        assert pieces[0][0] != pieces[0][1]  # the adapter changes the scores it is compared by
        for mine, theirs in zip(pieces[2], whole[2], strict=True):
            assert np.array_equal(mine.token_ids, theirs.token_ids)
            assert np.array_equal(mine.logprobs, theirs.logprobs)
        assert np.array_equal(pieces[3], whole[3]) and len(pieces[3]) == len(tokens) - 1


def test_logits_and_lanes_follow_the_vocabulary_and_the_memory():
    from edgefed.runtime.llama import default_lanes, logits_rows

    assert logits_rows(512, 49_152) == 512  # the embedded base: one call per window
    assert logits_rows(512, 262_144) == 96  # Gemma 3: 96 MiB of logits, not 512
    assert logits_rows(512, 10_000_000) == 16 and logits_rows(8, 262_144) == 8
    mib = 1 << 20
    assert default_lanes(2, 200 * mib, 24 << 30) == 2  # threads decide
    assert default_lanes(16, 200 * mib, 64 << 30) == 4  # MAX_DEFAULT_LANES decides
    assert default_lanes(8, 200 * mib, 8 << 30) == 2  # 1/16 of 8 GiB holds two lanes
    assert default_lanes(8, 2048 * mib, 8 << 30) == 1  # always one


def test_base_scores_are_remembered_across_runtimes_and_a_bad_cache_is_ignored(
    tiny_gguf, edgefed_home
):
    _kind, folder, base = tiny_gguf
    tokens = hf_tokens(folder, SAMPLE_TEXT * 2)
    with LlamaRuntime(base, window=64) as runtime:
        first = runtime.perplexity(tokens)
    with LlamaRuntime(base, window=64) as runtime:
        assert runtime.perplexity(tokens) == first  # `seconds` too: read back, not recomputed
        assert runtime.perplexity(tokens, stride=16) != first  # the stride is in the key
    with LlamaRuntime(base, window=64, cache_base_scores=False) as runtime:
        fresh = runtime.perplexity(tokens)
    assert fresh.mean_nll == first.mean_nll and fresh.seconds != first.seconds
    (cache,) = (edgefed_home / "cache" / "scores").iterdir()
    cache.write_text("{not json")
    with LlamaRuntime(base, window=64) as runtime:
        assert runtime.perplexity(tokens).mean_nll == first.mean_nll


def test_an_error_in_any_lane_stops_every_lane_and_the_runtime_stays_usable(tiny_lora):
    _kind, folder, base, _, adapter = tiny_lora
    tokens = np.asarray(hf_tokens(folder, SAMPLE_TEXT * 4), dtype=np.int32)
    calls = []

    def broken_display(event):
        calls.append(event)
        raise RuntimeError("the display broke")

    with LlamaRuntime(base, window=64, lanes=2, threads=2, cache_base_scores=False) as runtime:
        jobs = _three_jobs(runtime, tokens, [adapter, adapter])
        expected = [r.mean_nll for r in runtime.perplexities(jobs, stride=16)]
        with pytest.raises(RuntimeError, match="the display broke"):
            runtime.perplexities(jobs, stride=16, on_progress=broken_display)
        assert len(calls) <= 2  # each lane stopped after its window in flight, of dozens
        assert [r.mean_nll for r in runtime.perplexities(jobs, stride=16)] == expected
