"""Using the model a device made: generation, chat, comparison and export, on real llama.cpp
with the tiny models (and a real federation round for the device's own adapters)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, edgefed, run

from edgefed.errors import DataError
from edgefed.runtime import LlamaRuntime, requantize
from edgefed.runtime.generate import Sampling

# the whole suite only: `make test-fast` leaves this module out (docs/developer/index.md)
pytestmark = pytest.mark.slow

PROMPT = "The cat sat on the mat and the dog"


def test_greedy_generation_is_the_models_own_argmax_continuation_with_the_adapter(tiny_lora):
    _, _, base, _, adapter_path = tiny_lora
    with LlamaRuntime(base, threads=1) as runtime:
        adapter = runtime.load_adapter(adapter_path)
        greedy = Sampling(max_tokens=12, temperature=0)
        made = runtime.generate(PROMPT, adapter, greedy)
        assert made.tokens == len(made.token_ids) > 0 and made.stop in ("length", "end")
        assert runtime.generate(PROMPT, adapter, greedy).token_ids == made.token_ids
        # the scoring path's argmax, one position at a time (a dummy token gets scored last)
        tokens = list(runtime.tokenize(PROMPT))
        for token in made.token_ids:
            top = runtime.top_k([*tokens, 0], 1, adapter)
            assert int(top.token_ids[-1, 0]) == token
            tokens.append(token)
        assert made.text == runtime.detokenize(made.token_ids)
        # the adapter changes what is written
        assert runtime.generate(PROMPT, None, greedy).token_ids != made.token_ids


def test_a_seed_repeats_a_draw_and_another_seed_changes_it(tiny_gguf):
    _, _, base = tiny_gguf
    with LlamaRuntime(base, threads=1) as runtime:
        draws = [runtime.generate(PROMPT, None, Sampling(max_tokens=10, seed=s)) for s in (1, 1, 2)]
    assert draws[0].token_ids == draws[1].token_ids != draws[2].token_ids
    assert draws[0].seed == 1


def test_a_chat_keeps_its_history_within_the_context_in_the_bases_template(tiny_gguf):
    from edgefed import LoadedBase
    from edgefed.use import ChatSession, choose_model

    _, _, base = tiny_gguf
    with LoadedBase(base, runtime_quant="keep", threads=1) as loaded:
        session = ChatSession(loaded, choose_model("base", base=base), Sampling(max_tokens=8),
                              system="Be brief.", context=160)  # fmt: skip
        rendered = loaded.runtime.detokenize(
            loaded.runtime.chat_tokens([{"role": "user", "content": "hi"}]), special=True
        )
        assert "<|im_start|>user\nhi<|im_end|>" in rendered  # the embedded base's ChatML
        for turn in range(6):
            reply = session.reply(f"Tell me about the cat number {turn}, please, in a sentence.")
            assert reply.tokens <= 8
            fitted = loaded.runtime.chat_tokens(session.messages[:-1])
            assert len(fitted) + 8 <= 160
        assert session.dropped > 0  # six turns do not fit 160 tokens
        assert session.messages[0] == {"role": "system", "content": "Be brief."}
        assert session.messages[-2]["content"].endswith("number 5, please, in a sentence.")
        with pytest.raises(DataError, match="context holds"):
            session.reply("cat " * 400)
        assert session.messages[-2]["content"].endswith("number 5, please, in a sentence.")


def test_generate_reads_stdin_and_a_file_and_reports_json(tiny_gguf, tmp_path):
    from typer.testing import CliRunner

    from edgefed.cli.app import app

    _, _, base = tiny_gguf
    args = ["generate", "--adapter", "base", "--base", str(base), "--temperature", "0", "-n", "6"]
    piped = CliRunner().invoke(app, [*args, "--json"], input=PROMPT)
    assert piped.exit_code == 0, piped.stderr
    document = json.loads(piped.stdout)
    assert document["model"] == "base" and document["tokens"] == 6 and document["adapter"] is None
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT)
    from_file = CliRunner().invoke(app, [*args, "--file", str(prompt_file)])
    assert from_file.exit_code == 0 and from_file.stdout.strip() == document["text"].strip()
    assert "6 tokens" in from_file.stderr
    long_prompt = run(*args, "--context", 32, "cat " * 100)
    assert_one_line_error(long_prompt, "the context holds 32")
    no_workspace = run("generate", "hello")
    assert_one_line_error(no_workspace, "no device workspace", "--adapter base")


def test_an_adapter_of_another_base_is_refused_in_one_line(tiny_lora, tmp_path):
    """The GGUF adapter records its base (a PEFT folder edgefed trained does too: tested with
    the device's run below); llama.cpp alone would run it over any base of the same shapes."""
    _, _, base, _, adapter = tiny_lora
    other = requantize(base, tmp_path / "other.gguf", "q8_0")  # same shapes, another file
    refused = run("generate", "--adapter", adapter, "--base", other, "hello")
    assert_one_line_error(refused, "was trained on base", other.name)
    merged = run("export", "--adapter", adapter, "--base", other, "-o", tmp_path / "m.gguf")
    assert_one_line_error(merged, "was trained on base")
    assert not (tmp_path / "m.gguf").exists()


def test_the_lora_pair_and_the_peft_export_name_files_that_exist(tiny_lora, tmp_path):
    _, _, base, peft_dir, adapter = tiny_lora
    pair = tmp_path / "pair"
    assert (
        run(
            "export", "--adapter", peft_dir, "--base", base, "--format", "lora", "-o", pair
        ).exit_code
        == 0
    )
    modelfile = (pair / "Modelfile").read_text()
    named = re.findall(r"^(?:FROM|ADAPTER) \./(\S+)$", modelfile, re.MULTILINE)
    assert named == ["base.gguf", "adapter.gguf"]
    named = re.findall(r"(?<!\S)(?:-m|--lora|-f) (\S+)", (pair / "README.md").read_text())
    assert named == ["base.gguf", "adapter.gguf", "base.gguf", "adapter.gguf", "Modelfile"]
    assert all((pair / name).is_file() for name in named)
    assert (pair / "base.gguf").read_bytes() == base.read_bytes()
    merge_line = re.search(r"`edgefed (export [^`]+)`", (pair / "README.md").read_text())[1]
    in_pair = [str(pair / a) if (pair / a).is_file() or a.endswith(".gguf") else a
               for a in merge_line.split()]  # fmt: skip
    assert run(*in_pair).exit_code == 0  # the LM Studio line, as run from the folder
    assert (pair / "pair.gguf").is_file()
    (pair / "pair.gguf").unlink()
    with LlamaRuntime(pair / "base.gguf", threads=1) as runtime:
        exported = runtime.perplexity(PROMPT * 4, runtime.load_adapter(pair / "adapter.gguf"))
        original = runtime.perplexity(PROMPT * 4, runtime.load_adapter(adapter))
    assert exported.perplexity == pytest.approx(original.perplexity, rel=1e-6)
    again = run("export", "--adapter", peft_dir, "--base", base, "--format", "lora", "-o", pair)
    assert_one_line_error(again, "exists", "--force")
    peft = tmp_path / "peft"
    assert (
        run(
            "export", "--adapter", peft_dir, "--base", base, "--format", "peft", "-o", peft
        ).exit_code
        == 0
    )
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (peft / name).read_bytes() == (peft_dir / name).read_bytes()
    assert "PeftModel.from_pretrained" in (peft / "README.md").read_text()
    gguf_only = run(
        "export", "--adapter", adapter, "--base", base, "--format", "peft", "-o", tmp_path / "x"
    )
    assert_one_line_error(gguf_only, "PEFT form")
    bad_type = run(
        "export", "--adapter", adapter, "--base", base, "--type", "q9", "-o", tmp_path / "m.gguf"
    )
    assert_one_line_error(bad_type, "unknown quantization type 'q9'")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "x").exists()


def test_a_merged_export_computes_what_base_and_adapter_compute(tiny_lora, tmp_path):
    """f32: the same log-probabilities to 1e-4 relative; q8_0: most of the adapter's change."""
    _, _, base, _, adapter = tiny_lora
    f32_base = requantize(base, tmp_path / "base.f32.gguf", "f32")  # f16 -> f32 is exact
    text = PROMPT * 6
    with LlamaRuntime(f32_base, threads=1) as runtime:
        with_adapter, _ = runtime.token_logprobs(text, runtime.load_adapter(adapter))
        bare, _ = runtime.token_logprobs(text)
    for quant_type in ("f32", "q8_0"):
        merged = tmp_path / f"merged.{quant_type}.gguf"
        done = run(
            "export",
            "--adapter",
            adapter,
            "--base",
            base,
            "--type",
            quant_type,
            "-o",
            merged,
            "--json",
        )
        assert done.exit_code == 0, done.stderr
        assert json.loads(done.stdout)["type"] == quant_type
        with LlamaRuntime(merged, threads=1) as runtime:
            logprobs, _ = runtime.token_logprobs(text)
        if quant_type == "f32":
            np.testing.assert_allclose(logprobs, with_adapter, rtol=1e-4, atol=1e-5)
        else:  # rounded again: nearer base + adapter than the bare base, by far
            assert np.abs(logprobs - with_adapter).mean() < 0.2 * np.abs(bare - with_adapter).mean()


@pytest.fixture(scope="module")
def device_after_a_round(tmp_path_factory, tiny_llama_gguf) -> Path:
    """alice's workspace after round 0 of a two-device federation on the tiny base."""
    from conftest import write_repetitive_corpus

    root = tmp_path_factory.mktemp("use-federation")
    store = root / "store"
    edgefed("init", store, "--base", tiny_llama_gguf, "--warmup-steps", 2, "--round-steps", 1,
            "--wait", 0)  # fmt: skip
    for device, start in (("alice", 0), ("bob", 5)):
        data = write_repetitive_corpus(root / f"data-{device}", 12, start=start)
        edgefed("join", store, "--device", device, "--data", data, "--workspace",
                root / device, "--base", tiny_llama_gguf)  # fmt: skip
    for device in ("bob", "alice"):
        edgefed("round", "--workspace", root / device, "--seq-len", 32, "--batch-size", 2,
                "--runtime-quant", "keep", "--test-tokens", 256)  # fmt: skip
    return root / "alice"


def test_a_device_talks_to_compares_and_exports_its_personalised_model(
    device_after_a_round, tmp_path, monkeypatch
):
    alice = device_after_a_round
    common = ("--workspace", alice, "--runtime-quant", "keep", "--temperature", 0, "-n", 8)
    default = run("generate", *common, PROMPT, "--json")
    assert default.exit_code == 0, default.stderr
    chosen = json.loads(default.stdout)
    assert chosen["model"] == "aggregated, round 0" and chosen["adapter"].endswith(
        "aggregated.gguf"
    )
    compared = run("generate", *common, "--compare", PROMPT, "--json")
    assert compared.exit_code == 0, compared.stderr
    rows = json.loads(compared.stdout)["models"]
    assert [row["model"] for row in rows] == ["base", "local, round 0", "aggregated, round 0"]
    assert rows[2]["text"] == chosen["text"]
    evaluation = json.loads((alice / "rounds" / "0" / "evaluation.json").read_text())
    for row, name in zip(rows, ("base", "local", "aggregated"), strict=True):
        assert row["test_perplexity"] == evaluation["models"][name]["perplexity"]
    table = run("generate", *common, "--compare", PROMPT)
    assert (
        table.exit_code == 0
        and "test perplexity" in table.stdout
        and "local, round 0" in table.stdout
    )
    talk = run_chat(alice, "Hello there\nAnd the dog?\n")
    assert talk.exit_code == 0, talk.stderr
    assert len([line for line in talk.stdout.splitlines() if line.strip()]) >= 2
    monkeypatch.setenv("EDGEFED_WORKSPACE", str(alice))  # the device's base, not the embedded
    bare = run("generate", "--adapter", "base", "-n", 1, PROMPT, "--json")
    assert bare.exit_code == 0 and json.loads(bare.stdout)["base"] == str(alice_base(alice))
    monkeypatch.delenv("EDGEFED_WORKSPACE")
    missing = run("generate", "--workspace", alice, "--round", 3, PROMPT)
    assert_one_line_error(
        missing, "round 3 of alice has no aggregated adapter", "rounds with one: 0"
    )
    other = requantize(alice_base(alice), tmp_path / "other.gguf", "q8_0")
    trained_elsewhere = run(
        "generate", "--adapter", alice / "rounds" / "0" / "train", "--base", other, PROMPT
    )
    assert_one_line_error(trained_elsewhere, "was trained on base")
    merged = tmp_path / "alice.gguf"
    exported = run("export", "--workspace", alice, "-o", merged, "--type", "f32")
    assert exported.exit_code == 0 and "aggregated, round 0" in exported.stdout
    with LlamaRuntime(merged, threads=1) as runtime:
        assert runtime.info.architecture == "llama"


def alice_base(workspace: Path) -> Path:
    from edgefed.device.workspace import Workspace

    return Workspace.open(workspace).config.base


def run_chat(workspace: Path, lines: str):
    from typer.testing import CliRunner

    from edgefed.cli.app import app

    args = [
        "chat",
        "--workspace",
        str(workspace),
        "--runtime-quant",
        "keep",
        "-n",
        "6",
        "--seed",
        "3",
    ]
    return CliRunner().invoke(app, args, input=lines)
