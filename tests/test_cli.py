"""The CLI end to end: tables and JSON on stdout, one-line errors with exit code 2 on bad input."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import gguf
import pytest
from conftest import assert_one_line_error, run

from edgefed.cli import progress
from edgefed.cli.output import configure_logging
from edgefed.train import TrainProgress

# the whole suite only: `make test-fast` leaves this module out (docs/developer/index.md)
pytestmark = pytest.mark.slow


def test_base_show_json_has_the_fingerprint(tiny_gguf):
    kind, _, base = tiny_gguf
    result = run("base", "show", base, "--json")
    assert result.exit_code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["fingerprint"] == hashlib.sha256(base.read_bytes()).hexdigest()
    assert shown["architecture"] == kind and shown["supported"] is True
    assert shown["layers"] == 2 and shown["embedding_length"] == 64 and shown["vocab_size"] == 49152
    assert shown["tokenizer"]["pre"] == {"llama": "gpt-2", "qwen2": "qwen2"}[kind]


def test_base_show_defaults_to_the_embedded_base():
    result = run("base", "show")
    assert result.exit_code == 0
    assert "SmolLM2-135M-Instruct" in result.stdout and "sha256:" in result.stdout


def test_evaluate_table_and_json_with_adapters(tiny_lora, tmp_path):
    _, _, base, _, adapter = tiny_lora
    data = tmp_path / "notes"
    data.mkdir()
    (data / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    (data / "b.md").write_text("# Notes\n\nMarkets rose on Tuesday. " * 20)
    (data / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    result = run(
        "evaluate", "--data", data, "--base", base, "--adapter", adapter, "--json", "--window", "64"
    )
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert [row["model"] for row in document["results"]] == ["base", adapter.stem]
    scored = {row["tokens_scored"] for row in document["results"]}
    assert len(scored) == 1 and scored.pop() > 100
    assert all(row["perplexity"] > 1 for row in document["results"])
    assert "skipped 1 file that is not UTF-8 text: blob.txt" in result.stderr
    # not a terminal: a line per scored model instead of a progress bar
    assert "evaluating: scored base (1/2" in result.stderr
    assert f"evaluating: scored {adapter.stem} (2/2" in result.stderr
    table = run("evaluate", "--data", data, "--base", base, "--adapter", adapter, "--window", "64")
    assert "perplexity" in table.stdout and adapter.stem in table.stdout


def test_quant_convert_requantize_and_lora_write_loadable_files(tiny_lora, tmp_path):
    _, folder, _base, peft_dir, _ = tiny_lora
    converted = tmp_path / "m.gguf"
    assert run("quant", "convert", folder, "-o", converted, "--type", "f32").exit_code == 0
    for quant_type in ("q8_0", "q4_0", "q4_k_m", "q5_k_m", "f16"):
        out = tmp_path / f"m.{quant_type}.gguf"
        result = run("quant", "requantize", converted, "-o", out, "--type", quant_type, "--json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["size_bytes"] == out.stat().st_size
        shown = json.loads(run("base", "show", out, "--json").stdout)
        assert shown["file_type"].lower() == quant_type
    adapter = tmp_path / "a.gguf"
    assert run("quant", "lora", peft_dir, "-o", adapter, "--base", converted).exit_code == 0
    (tmp_path / "text.txt").write_text("Shares in the company rose sharply on Monday. " * 30)
    result = run(
        "evaluate",
        "--data",
        tmp_path / "text.txt",
        "--base",
        tmp_path / "m.q8_0.gguf",
        "--adapter",
        adapter,
        "--json",
        "--window",
        "64",
    )
    assert result.exit_code == 0, result.stderr
    assert [r["model"] for r in json.loads(result.stdout)["results"]] == ["base", "a"]


@pytest.fixture()
def bad_files(tmp_path, tiny_gguf) -> dict[str, Path]:
    _, _, base = tiny_gguf
    files = {"missing": tmp_path / "missing.gguf", "text": tmp_path / "notes.gguf"}
    files["text"].write_text("not a model at all")
    data = base.read_bytes()
    files["truncated"] = tmp_path / "truncated.gguf"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["gpt2"] = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(files["gpt2"], "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 8), "float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    files["empty"] = tmp_path / "empty.txt"
    files["empty"].write_text("   \n")
    return files


def test_bad_bases_get_one_line_and_exit_2(bad_files, tiny_gguf, tmp_path):
    assert_one_line_error(run("base", "show", bad_files["missing"]), "does not exist")
    assert_one_line_error(run("base", "show", bad_files["text"]), "not a GGUF file")
    assert_one_line_error(run("base", "show", bad_files["truncated"]), "truncated")
    # scoring hands any architecture to llama.cpp, which says what this file lacks; a
    # federation, which trains, refuses the family first
    assert_one_line_error(run("evaluate", "--base", bad_files["gpt2"]), "gpt2.context_length")
    assert_one_line_error(
        run("init", tmp_path / "store", "--base", bad_files["gpt2"]), "architecture 'gpt2'"
    )
    _, _, base = tiny_gguf
    assert_one_line_error(run("evaluate", "--base", base, "--data", bad_files["empty"]), "no")
    assert_one_line_error(
        run("evaluate", "--base", base, "--adapter", bad_files["missing"]), "does not exist"
    )


def test_bad_conversions_leave_no_output_behind(bad_files, tiny_lora, tmp_path, tokenizer_dir):
    from conftest import build_tiny_model

    from edgefed.quant.hf_convert import convert_hf_to_gguf

    kind, _folder, base, peft_dir, adapter = tiny_lora
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    other = convert_hf_to_gguf(
        build_tiny_model(kind, tmp_path / "wide", tokenizer_dir, hidden_size=96),
        tmp_path / "wide.gguf",
    )
    # an adapter made for another base: refused at conversion and at evaluation
    assert_one_line_error(
        run("quant", "lora", peft_dir, "-o", out_dir / "x.gguf", "--base", other), "another base"
    )
    assert_one_line_error(run("evaluate", "--base", other, "--adapter", adapter), "does not fit")
    # DoRA
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes(
        (peft_dir / "adapter_model.safetensors").read_bytes()
    )
    assert_one_line_error(
        run("quant", "lora", dora, "-o", out_dir / "d.gguf", "--base", base), "DoRA"
    )
    # a truncated base, an unknown quant type, a folder that is not a model
    assert_one_line_error(
        run("quant", "requantize", bad_files["truncated"], "-o", out_dir / "q.gguf"), "truncated"
    )
    assert_one_line_error(
        run("quant", "requantize", base, "-o", out_dir / "q.gguf", "--type", "q3_x"), "q8_0"
    )
    assert_one_line_error(
        run("quant", "convert", peft_dir, "-o", out_dir / "c.gguf"), "config.json"
    )
    assert list(out_dir.iterdir()) == []  # nothing half-written, no temporaries


def test_base_show_into_a_pipe_keeps_the_fingerprint_and_path_whole(tiny_llama_gguf, tmp_path):
    """Piped or redirected, the table is not cut at 80 columns (nor at a narrow COLUMNS): the
    fingerprint and the path are copied and compared from there, so no value may lose its end
    to an ellipsis or be wrapped."""
    import os
    import shutil
    import subprocess
    import sys

    base = tmp_path / ("a-folder-with-a-long-name-" * 4) / "tiny-base.gguf"
    base.parent.mkdir()
    shutil.copy(tiny_llama_gguf, base)
    shown = subprocess.run(
        [sys.executable, "-m", "edgefed", "base", "show", str(base)],
        env=os.environ | {"COLUMNS": "40"},
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"sha256:{hashlib.sha256(base.read_bytes()).hexdigest()}" in shown.stdout
    assert str(base) in shown.stdout and "…" not in shown.stdout


def test_library_warnings_read_like_every_other_warning_line(capsys):
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers = []  # pytest's own capture handler would make basicConfig a no-op
    try:
        configure_logging(False)
        logging.getLogger("edgefed.device.pull").warning("rejected %s's adapter", "mallory")
        root.handlers = []
        configure_logging(True)
        logging.getLogger("edgefed.device.pull").debug("pulled %d peers", 2)
    finally:
        root.handlers, root.level = saved, level
    assert capsys.readouterr().err.splitlines() == [
        "warning: rejected mallory's adapter",
        "debug: edgefed.device.pull: pulled 2 peers",
    ]


def test_evaluate_tells_apart_adapters_of_one_name_and_points_peft_files_at_quant_lora(
    tiny_lora, tmp_path
):
    _, _, base, _, adapter = tiny_lora
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    copies = []
    for run_name in ("run-a", "run-b"):
        (tmp_path / run_name).mkdir()
        copies.append(tmp_path / run_name / "adapter.gguf")
        copies[-1].write_bytes(adapter.read_bytes())
    result = run("evaluate", "--data", text, "--base", base, "--adapter", copies[0],
                 "--adapter", copies[1], "--json", "--window", "64")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    labels = [row["model"] for row in json.loads(result.stdout)["results"]]
    assert labels == ["base", str(copies[0]), str(copies[1])]

    peft_file = tmp_path / "adapter_model.safetensors"
    peft_file.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    refused = run("evaluate", "--data", text, "--base", base, "--adapter", peft_file)
    assert_one_line_error(refused, "is not a GGUF file", "edgefed quant lora")


def test_progress_off_a_terminal_is_plain_lines_and_a_phase_gets_one_once_it_lasts(
    capsys, monkeypatch
):
    monkeypatch.setattr(progress, "STATUS_DELAY_SECONDS", 0.05)
    lines = progress.LogLines()
    lines.status("loading the base")  # over at once: a failing command stays one line
    lines.status("waiting for bob, 4:59 left")
    lines.status("waiting for bob, 4:58 left")  # the same shape: the newest figures, once
    said, deadline = "", time.monotonic() + 30
    while "waiting for bob" not in said:
        assert time.monotonic() < deadline, said
        said += capsys.readouterr().err
    for step in (1, 2, 3):
        lines.training(TrainProgress(step, 3, 2.5 - step / 10, 1e-3, 1024 * step, 250.0))
    lines.close()
    said += capsys.readouterr().err
    assert "loading the base" not in said
    assert said.count("waiting for bob") == 1 and "4:58 left ..." in said
    assert "training: step 1/3, loss 2.400, 250 tok/s, about" in said
    assert "step 2/3" not in said  # within a minute of the line before
    assert "training: step 3/3, loss 2.200, 250 tok/s\n" in said


def test_run_offers_every_option_of_round_with_the_same_meaning():
    """`run` and `round` declare their options separately (Typer needs one parameter per
    option): the same names, defaults and help, only --rounds for --round."""
    import typer.main

    from edgefed.cli.app import app

    commands = typer.main.get_command(app).commands

    def options(name: str) -> dict:
        return {
            p.name: (tuple(p.opts), p.default, getattr(p, "help", None))
            for p in commands[name].params
        }

    by_round, by_run = options("round"), options("run")
    assert by_round.pop("round_number")[0] == ("--round", "-r")
    assert by_run.pop("rounds")[0] == ("--rounds", "-n")
    assert len(by_round) == 31
    assert by_run == by_round
