"""QLoRA training on a tiny real model: it learns, it resumes exactly, its outputs agree."""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgefed.adapter import LoraSpec, attach_lora, lora_state
from edgefed.errors import AdapterMismatchError, DataError, InputFileError, TrainingError
from edgefed.loaded_base import LoadedBase
from edgefed.train.loop import TrainConfig, TrainingInterrupted, learning_rate_factor
from edgefed.train.run import train_adapter
from edgefed.train.split import SplitRule

# the whole suite only: `make test-fast` leaves this module out (docs/developer/index.md)
pytestmark = pytest.mark.slow

FAST = {"seq_len": 64, "batch_size": 4, "learning_rate": 1e-2}
KEEP = "keep"  # evaluate the tiny f16 base as it is: no cached requantized copy needed


def train(corpus: Path, out: Path, base: Path, **options):
    config = TrainConfig(**(FAST | options.pop("config", {})))
    with LoadedBase(base, runtime_quant=KEEP) as loaded:
        return train_adapter(corpus, out, loaded, config=config, **options)


def adapter_tensors(run: Path) -> dict:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_thirty_steps_lower_trust_val_perplexity_and_write_every_output(
    train_corpus, tiny_llama_gguf, tmp_path
):
    result = train(train_corpus, tmp_path / "run", tiny_llama_gguf, config={"steps": 30})
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    written = {"format": result.metrics.FORMAT} | result.metrics.as_dict()
    assert metrics == json.loads(json.dumps(written)) and metrics["steps"] == 30
    val = metrics["val"]
    # a random tiny model starts near the vocabulary size; 30 steps on repetitive text must
    # cut that by far more than noise
    assert val["perplexity"] < 0.2 * val["base_perplexity"], val
    assert val["tokens_scored"] > 100
    assert len(metrics["loss_curve"]) == 30
    assert metrics["loss_curve"][-1][1] < 0.7 * metrics["loss_curve"][0][1]
    assert metrics["tokens_seen"] > 30 * 4 * 60 * 0.5 and metrics["peak_rss_bytes"] > 0
    documents = metrics["data"]["documents"]
    assert sum(documents.values()) == 40 and min(documents.values()) > 0, documents
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == [
        "adapter",
        "adapter.gguf",
        "metrics.json",
        "optimizer.safetensors",
        "split.json",
    ]
    # a finished run is never trained over
    with pytest.raises(InputFileError, match="already holds a finished run"):
        train(train_corpus, tmp_path / "run", tiny_llama_gguf, config={"steps": 30})


def test_outputs_load_in_peft_and_llama_cpp_with_matching_perplexity(
    train_corpus, tiny_llama_gguf, tmp_path
):
    from peft import PeftModel

    from edgefed.documents import read_documents
    from edgefed.quant.training_copy import build_training_model
    from edgefed.runtime import LlamaRuntime
    from edgefed.train.perplexity import torch_perplexity

    result = train(train_corpus, tmp_path / "run", tiny_llama_gguf, config={"steps": 15})
    text = read_documents(train_corpus).joined()
    with LlamaRuntime(tiny_llama_gguf, window=128) as runtime:
        tokens = runtime.tokenize(text)[:1500]
        llama = runtime.perplexity(tokens, runtime.load_adapter(result.gguf_adapter))
        llama_base = runtime.perplexity(tokens)
    model = PeftModel.from_pretrained(
        build_training_model(tiny_llama_gguf, "fp32"), result.adapter_dir
    )
    peft = torch_perplexity(model, tokens, window=128)
    assert llama.perplexity < 0.5 * llama_base.perplexity  # the adapter is really applied
    assert abs(peft.perplexity / llama.perplexity - 1) < 0.02, (peft.perplexity, llama.perplexity)


def test_devices_with_one_init_seed_start_from_one_adapter(tiny_llama_gguf):
    from edgefed.quant.training_copy import build_training_model

    def initial(seed: int, global_seed: int) -> dict:
        torch.manual_seed(global_seed)  # whatever else the device did with the global RNG
        model = build_training_model(tiny_llama_gguf, "fp32")
        return lora_state(attach_lora(model, LoraSpec(rank=4, init_seed=seed)))

    first, second, other = initial(7, 0), initial(7, 123), initial(8, 0)
    assert first.keys() == second.keys() == other.keys() and len(first) == 2 * 7 * 2
    for name in first:
        assert torch.equal(first[name], second[name]), name
        if "lora_B" in name:
            assert not first[name].any(), name  # B = 0: the initial delta is zero
        else:
            assert first[name].std() > 0 and not torch.equal(first[name], other[name]), name


def test_from_adapter_continues_it_with_its_optimizer_state(
    train_corpus, tiny_llama, tiny_llama_gguf, tmp_path
):
    from edgefed.quant.hf_convert import convert_hf_to_gguf

    first = train(train_corpus, tmp_path / "first", tiny_llama_gguf, config={"steps": 10})
    # a vanishing learning rate: the continued adapter must still be the first one
    train(
        train_corpus,
        tmp_path / "next",
        tiny_llama_gguf,
        config={"steps": 2, "learning_rate": 1e-12},
        from_adapter=first.out_dir,
        optimizer_state=first.out_dir / "optimizer.safetensors",
    )
    before, after = adapter_tensors(first.out_dir), adapter_tensors(tmp_path / "next")
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-6), name
    assert any(before[n].abs().max() > 1e-3 for n in before if "lora_B" in n)
    # the same shapes on another base (an f32 conversion of the same model) are still refused
    other_base = convert_hf_to_gguf(tiny_llama, tmp_path / "other.f32.gguf", out_type="f32")
    with pytest.raises(AdapterMismatchError, match="was trained on base"):
        train(train_corpus, tmp_path / "elsewhere", other_base, config={"steps": 1},
              from_adapter=first.out_dir)  # fmt: skip
    with pytest.raises(AdapterMismatchError, match=r"rank 8.*ask for rank 4"):
        train(
            train_corpus,
            tmp_path / "mismatch",
            tiny_llama_gguf,
            config={"steps": 1},
            from_adapter=first.out_dir,
            lora=LoraSpec(rank=4),
        )


def test_resume_refuses_changed_settings_and_a_missing_checkpoint(
    train_corpus, tiny_llama_gguf, tmp_path
):
    calls = iter(range(100))
    with pytest.raises(TrainingInterrupted, match="interrupted after step 3/20"):
        train(
            train_corpus,
            tmp_path / "run",
            tiny_llama_gguf,
            config={"steps": 20},
            should_stop=lambda: next(calls) >= 3,
        )
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()
    with pytest.raises(InputFileError, match=r"unfinished run's checkpoint.*--resume"):
        train(train_corpus, tmp_path / "run", tiny_llama_gguf, config={"steps": 20})
    with pytest.raises(TrainingError, match="different config"):
        train(train_corpus, tmp_path / "run", tiny_llama_gguf, config={"steps": 21}, resume=True)
    with pytest.raises(InputFileError, match="no checkpoint to resume"):
        train(train_corpus, tmp_path / "fresh", tiny_llama_gguf, config={"steps": 20}, resume=True)
    with pytest.raises(DataError, match="was split with"):
        train(
            train_corpus,
            tmp_path / "run",
            tiny_llama_gguf,
            config={"steps": 20},
            resume=True,
            split_rule=SplitRule(seed=3),
        )
    # whether activations are recomputed does not change the result: a resume may switch it
    config = {"steps": 20, "gradient_checkpointing": False, "checkpoint_every": 7}
    result = train(train_corpus, tmp_path / "run", tiny_llama_gguf, config=config, resume=True)
    assert result.metrics.steps == 20


def test_importing_edgefed_puts_large_tensors_on_huge_pages_unless_the_user_chose():
    """PyTorch reads THP_MEM_ALLOC_ENABLE once, at its first allocation: edgefed sets it on
    import (it halved a training round's peak memory, docs/measurements/memory.md), never over
    the user's."""
    show = (
        "import os, edgefed, torch; torch.ones(9 << 20); print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    )
    for env, expected in (({}, "1"), ({"THP_MEM_ALLOC_ENABLE": "0"}, "0")):
        environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        done = subprocess.run(
            [sys.executable, "-c", show], env=environment | env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == expected


def _train_command(corpus: Path, base: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "edgefed", "train",
        "--data", str(corpus), "--base", str(base), "--out", str(out),
        "--steps", "24", "--seq-len", "64", "--lr", "1e-2",
        "--checkpoint-every", "2", "--threads", "1", "--runtime-quant", KEEP,
    ]  # fmt: skip


def test_sigterm_then_resume_ends_with_the_uninterrupted_adapter(
    train_corpus, tiny_llama_gguf, tmp_path
):
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    straight = subprocess.run(
        _train_command(train_corpus, tiny_llama_gguf, tmp_path / "straight"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "stopped"
    command = _train_command(train_corpus, tiny_llama_gguf, out)
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "checkpoint saved" in stderr and "--resume" in stderr
    assert not (out / "metrics.json").exists() and (out / "checkpoint.safetensors").exists()

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from the checkpoint at step" in resumed.stderr
    a, b = adapter_tensors(tmp_path / "straight"), adapter_tensors(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    curves = [
        json.loads((d / "metrics.json").read_text())["loss_curve"]
        for d in (tmp_path / "straight", out)
    ]
    assert [s for s, _ in curves[1]] == list(range(1, 25))
    assert [loss for _, loss in curves[0]] == pytest.approx(
        [loss for _, loss in curves[1]], abs=1e-5
    )
    assert not (out / "checkpoint.safetensors").exists()


def test_learning_rate_warms_up_then_decays_by_cosine():
    factors = [learning_rate_factor(s, 10, 2) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in itertools.pairwise(factors[2:])) and factors[-1] > 0


def test_train_command_writes_one_json_document_and_refuses_bad_input_in_one_line(
    train_corpus, tiny_llama_gguf, tmp_path
):
    from conftest import assert_one_line_error, run

    common = ["--base", tiny_llama_gguf, "--runtime-quant", KEEP, "--seq-len", "64"]
    result = run("train", "--data", train_corpus, "--out", tmp_path / "run", "--steps", "3",
                 "--rank", "4", "--init-seed", "11", "--json", *common)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["steps"] == 3 and document["run"]["lora"]["rank"] == 4
    assert document["run"]["lora"]["init_seed"] == 11
    assert Path(document["outputs"]["gguf"]).is_file()
    assert "data: train" in result.stderr
    # not a terminal (a log, nohup): plain lines, the first and the last step among them
    assert "training: step 1/3, loss " in result.stderr
    assert "training: step 3/3, loss " in result.stderr

    few = tmp_path / "few"
    few.mkdir()
    (few / "one.txt").write_text("a single document")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    cases = {
        "split is empty": ["--data", few],
        "bad.jsonl:2 is not valid JSON": ["--data", bad],
        "does not exist": ["--data", tmp_path / "nowhere"],
        "already holds a finished run": ["--data", train_corpus, "--out", tmp_path / "run"],
        "give one": ["--data", train_corpus, "--from", tmp_path / "run", "--init-seed", "1"],
        "is a file, not a run folder": ["--data", train_corpus, "--out", bad],
        "not a PEFT adapter folder": ["--data", train_corpus, "--from", tmp_path],
        "either steps or epochs": ["--data", train_corpus, "--steps", "2", "--epochs", "1"],
        "unknown training precision": ["--data", train_corpus, "--precision", "int3"],
        "device 'tpu' is not available": ["--data", train_corpus, "--device", "tpu"],
    }
    for needle, args in cases.items():
        out = ["--out", tmp_path / "new"] if "--out" not in args else []
        assert_one_line_error(run("train", *args, *out, *common), needle)
        assert not (tmp_path / "new" / "checkpoint.safetensors").exists(), needle

    # continuing an adapter on another base (same shapes, other weights) is refused
    from edgefed.runtime.quantize import requantize

    other = requantize(tiny_llama_gguf, tmp_path / "other.q8_0.gguf", "q8_0")
    refused = run("train", "--data", train_corpus, "--out", tmp_path / "elsewhere",
                  "--from", tmp_path / "run", "--base", other, "--runtime-quant", KEEP)  # fmt: skip
    assert_one_line_error(refused, "was trained on base")
    assert not (tmp_path / "elsewhere" / "metrics.json").exists()


def test_a_resumed_run_removes_what_a_killed_write_left_and_nothing_else(
    train_corpus, tiny_llama_gguf, tmp_path
):
    """kill -9 while the adapter is written leaves `.adapter.<random>.tmp/` in the run folder
    (no `finally` runs): the run that resumes it removes such leftovers, by their exact
    pattern only."""
    from edgefed.atomic import remove_leftovers

    out = tmp_path / "run"
    calls = iter(range(100))
    with pytest.raises(TrainingInterrupted):
        train(train_corpus, out, tiny_llama_gguf, config={"steps": 3},
              should_stop=lambda: next(calls) >= 1)  # fmt: skip
    names = (".adapter.k2j3x9_a.tmp", ".adapter.0a1b2c3d.old", ".adapter.gguf.abcdefgh.tmp")
    left = [out / name for name in names]
    (left[0] / "adapter").mkdir(parents=True)
    (left[0] / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    left[1].mkdir()
    left[2].write_bytes(b"partial")
    others = [out / ".adapter.tmp", out / "notes.tmp", out / ".adapter.short.tmp", out / ".mine"]
    for path in others:
        path.write_text("not edgefed's")

    train(train_corpus, out, tiny_llama_gguf, config={"steps": 3}, resume=True)
    assert [p for p in left if p.exists()] == []
    assert all(p.read_text() == "not edgefed's" for p in others)
    assert (out / "metrics.json").is_file() and (out / "adapter").is_dir()

    # limited to some destinations' names, the others' leftovers stay
    left[0].mkdir()
    left[2].write_bytes(b"partial")
    assert remove_leftovers(out, ["adapter.gguf"]) == [left[2]]
    assert left[0].is_dir() and remove_leftovers(tmp_path / "absent") == []


def test_the_sliced_loss_is_transformers_loss_with_its_gradient(tiny_llama_gguf):
    from edgefed.quant.training_copy import build_training_model
    from edgefed.train.loss import IGNORE, causal_lm_loss

    model = attach_lora(build_training_model(tiny_llama_gguf, "fp32"), LoraSpec(rank=4))
    model.eval()  # no LoRA dropout: the three passes must see one function
    with torch.no_grad():  # B = 0 would leave A's gradient at zero in both
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0  # a padded tail, as the last block of a corpus has
    labels = ids.masked_fill(mask == 0, IGNORE)
    results = []
    for compute in (
        lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss,
        lambda: causal_lm_loss(model, ids, mask, labels, vocab_slice=1000),  # 50 slices
        lambda: causal_lm_loss(model, ids, mask, labels, vocab_slice=1 << 20),  # one
    ):
        model.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads))
    reference_loss, reference_grads = results[0]
    assert len(reference_grads) == 2 * 7 * 2  # A and B of 7 modules in 2 layers
    for loss, grads in results[1:]:
        assert loss == pytest.approx(reference_loss, rel=1e-6)
        for name, grad in grads.items():
            assert torch.allclose(grad, reference_grads[name], rtol=1e-4, atol=1e-7), name


def test_the_gguf_copy_trains_the_fp32_copys_adapter(train_corpus, tiny_llama_gguf, tmp_path):
    """Same weights, so the same adapter: up to the float order of two backward passes; and
    gradient checkpointing (which runs each layer's forward again in backward) changes nothing."""
    from edgefed.runtime.quantize import requantize

    base = requantize(tiny_llama_gguf, tmp_path / "q4_1.gguf", "q4_1")
    runs = {}
    for name, precision, checkpointing in (
        ("gguf", "gguf", False),
        ("fp32", "fp32", False),
        ("gguf+gc", "gguf", True),
    ):
        config = TrainConfig(**FAST | {"steps": 12, "gradient_checkpointing": checkpointing})
        with LoadedBase(base, runtime_quant=KEEP, precision=precision) as loaded:
            runs[name] = train_adapter(train_corpus, tmp_path / name, loaded, config=config)
    native, reference, checkpointed = (
        adapter_tensors(runs[name].out_dir) for name in ("gguf", "fp32", "gguf+gc")
    )
    assert native.keys() == reference.keys() == checkpointed.keys()
    for name in native:
        scale = reference[name].abs().max()
        assert (native[name] - reference[name]).abs().max() <= 1e-4 * scale + 1e-7, name
        assert torch.allclose(native[name], checkpointed[name], atol=1e-6), name
    curves = [[loss for _, loss in runs[n].metrics.loss_curve] for n in ("gguf", "fp32")]
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)


def test_bf16_training_learns_what_float32_training_learns(
    train_corpus, tiny_llama_gguf, tmp_path, caplog, monkeypatch
):
    """bfloat16 matmuls round each product to 8 bits of mantissa: the adapter is not the float32
    one, but on both copies it lowers the loss as far, and the run records that it was bf16. On
    a CPU without a fast bfloat16 matmul the user is told once, however many runs the process
    trains (the CPU check is forced, so the test says the same on every machine)."""
    from edgefed.runtime.quantize import requantize
    from edgefed.train import loop

    loop.warn_emulated_bf16.cache_clear()
    monkeypatch.setattr(loop, "cpu_has_bf16_matmul", lambda: False)
    caplog.set_level(logging.WARNING, logger="edgefed.train.loop")
    base = requantize(tiny_llama_gguf, tmp_path / "q4_1.gguf", "q4_1")
    for precision in ("gguf", "fp32"):
        runs = {}
        for bf16 in (False, True):
            config = TrainConfig(**FAST | {"steps": 20, "bf16": bf16})
            with LoadedBase(base, runtime_quant=KEEP, precision=precision) as loaded:
                runs[bf16] = train_adapter(
                    train_corpus, tmp_path / f"{precision}-{bf16}", loaded, config=config
                )
        exact, rounded = (adapter_tensors(runs[b].out_dir) for b in (False, True))
        change = sum((rounded[n] - exact[n]).norm() ** 2 for n in exact) ** 0.5
        size = sum(exact[n].norm() ** 2 for n in exact) ** 0.5
        assert 0 < change < 0.2 * size, (precision, float(change / size))
        first, last = runs[True].metrics.loss_curve[0][1], runs[True].metrics.loss_curve[-1][1]
        assert last < 0.8 * first and last == pytest.approx(
            runs[False].metrics.loss_curve[-1][1], rel=0.05
        )
        assert runs[True].metrics.run["config"]["bf16"] is True
        assert "bf16" not in runs[False].metrics.run["config"]  # older runs still resume
    warned = [r for r in caplog.records if "no fast bfloat16 matmul" in r.getMessage()]
    assert len(warned) == 1
