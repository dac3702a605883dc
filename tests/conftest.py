"""Fixtures: tiny random models of every family built in code, with the embedded base's tokenizer.

Nothing is downloaded. The tokenizer is rebuilt by transformers from the embedded GGUF (so the
tests exercise a real 49k-token byte-level BPE), and every test runs with EDGEFED_HOME in a
temporary folder so that no test touches the user's real state.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from edgefed.quant.gguf_file import embedded_base_path

if TYPE_CHECKING:
    import subprocess

    from edgefed.sync.signing import DeviceKey

TINY_DIMS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.15,
}


@pytest.fixture(autouse=True)
def edgefed_home(tmp_path_factory, monkeypatch) -> Path:
    home = tmp_path_factory.mktemp("edgefed-home")
    monkeypatch.setenv("EDGEFED_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The embedded base's tokenizer as a Hugging Face tokenizer.json folder."""
    from transformers import AutoTokenizer

    base = embedded_base_path()
    tok = AutoTokenizer.from_pretrained(str(base.parent), gguf_file=base.name)
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(folder)
    return folder


# what a tiny model of each family needs beyond TINY_DIMS: a head size of its own where the
# family allows one (so `attention.key_length` is tested), llama.cpp's attention scale for Gemma,
# local attention short enough to act on the test texts, no local attention where the GGUF
# architecture has none (Mistral runs as LLAMA), the head tied where the family ties it
FAMILY_DIMS: dict[str, dict] = {
    "llama": {"rope_theta": 10000.0},
    "mistral": {"sliding_window": None},
    "qwen2": {"rope_theta": 10000.0, "tie_word_embeddings": True},
    "qwen3": {"head_dim": 32},
    "gemma2": {
        "initializer_range": 0.05,  # logits inside its soft-cap, where the cap acts
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "sliding_window": 16,
        "tie_word_embeddings": True,
    },
    "gemma3_text": {
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "sliding_window": 16,
        "tie_word_embeddings": True,
    },
    "phi3": {"pad_token_id": 0},
}
FAMILIES = tuple(FAMILY_DIMS)


def build_tiny_model(
    kind: str, folder: Path, tokenizer_dir: Path, seed: int = 0, **overrides: object
) -> Path:
    """Save a tiny random model of Hugging Face model_type `kind` with the shared tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dims = {"vocab_size": len(tok), "tie_word_embeddings": False} | TINY_DIMS
    config = AutoConfig.for_model(kind, **(dims | FAMILY_DIMS[kind] | overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):  # zero at init: give them values, so they are tested
                parameter.normal_(0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_hf(request, tmp_path_factory, tokenizer_dir) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return request.param, build_tiny_model(request.param, folder, tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory, tiny_llama) -> Path:
    from edgefed.quant.hf_convert import convert_hf_to_gguf

    return convert_hf_to_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny-llama.f16.gguf")


SAMPLE_TEXT = (
    "Héllo wörld! Ça va? naïve façade — Zürich, São Paulo, Kraków.\n"
    "東京は日本の首都です。中文分词测试。한국어 문장.\n"
    "Emoji: 😀🚀🎉👍🏽 and symbols ±∞≠≈ €£¥.\n"
    "def fibonacci(n: int) -> int:\n"
    "    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
    "\tindent\t\ttabs   spaces  12345 3.14159 0xFF <html><b>bold</b></html> it's we'll they've\n"
    "The BBC reported that markets rose 2.5% on Tuesday after the announcement."
)


def attach_random_lora(
    model, *, seed: int = 1, rank: int = 4, alpha: float = 8.0, targets=None, **options
):
    """Wrap `model` in a PEFT LoRA on every projection (of a Llama block, unless `targets`
    says others) with random non-zero A and B."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=targets
        or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        **options,
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return peft_model.eval()


def load_hf(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_tokens(folder: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_hf) -> tuple[str, Path, Path]:
    """(kind, HF folder, f16 GGUF) for each architecture."""
    from edgefed.quant.hf_convert import convert_hf_to_gguf

    kind, folder = tiny_hf
    out = convert_hf_to_gguf(folder, tmp_path_factory.mktemp("gguf") / f"tiny-{kind}.f16.gguf")
    return kind, folder, out


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory, tiny_gguf) -> tuple[str, Path, Path, Path, Path]:
    """(kind, HF folder, base GGUF, PEFT adapter folder, GGUF adapter) with a random LoRA."""
    from edgefed.quant.lora_gguf import convert_lora_to_gguf

    kind, folder, base = tiny_gguf
    peft_dir = tmp_path_factory.mktemp(f"peft-{kind}")
    attach_random_lora(load_hf(folder)).save_pretrained(peft_dir)
    gguf_adapter = convert_lora_to_gguf(
        peft_dir, peft_dir.parent / f"{peft_dir.name}.gguf", base=base
    )
    return kind, folder, base, peft_dir, gguf_adapter


# the words of the tiny models' easy training text
REPETITIVE_WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "the",
    "dog",
    "ran",
    "to",
    "the",
    "park",
    "while",
    "birds",
    "sang",
    "songs",
]


def write_repetitive_corpus(folder: Path, n_docs: int = 40, *, start: int = 0) -> Path:
    """`n_docs` small .txt documents built from five repeated sentences: easy to learn."""
    import random

    words = REPETITIVE_WORDS
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n_docs):
        rng = random.Random(i % 5)
        sentence = " ".join(rng.choice(words) for _ in range(12)) + ". "
        (folder / f"doc{i:03d}.txt").write_text(sentence * 8 + f"Number {i}.", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def train_corpus(tmp_path_factory) -> Path:
    return write_repetitive_corpus(tmp_path_factory.mktemp("corpus"))


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_relay(root: Path, token: str, port: int, *, env: dict | None = None, max_bytes=1 << 20):
    """A real relay process (`edgefed relay serve`, uvicorn) on 127.0.0.1:port, once it answers."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    token_file = root.parent / f"{root.name}.token"
    token_file.write_text(token + "\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "edgefed", "relay", "serve", "--root", str(root),
         "--token-file", str(token_file), "--port", str(port), "--max-bytes", str(max_bytes)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env if env is not None else os.environ,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/v1/keys", headers={"Authorization": f"Bearer {token}"}).is_success:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the relay did not start: {process.stderr.read().decode()}")
        time.sleep(0.1)


@pytest.fixture
def relay_server(tmp_path):
    """A real relay on 127.0.0.1: yields (url, token, root)."""
    token = "test-token-0123456789abcdef"
    root, port = tmp_path / "relay-root", free_port()
    process = start_relay(root, token, port)
    yield f"http://127.0.0.1:{port}", token, root
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> str:
    """A real S3 API server on 127.0.0.1: the one `.ci/run` started (EDGEFED_TEST_S3), else a
    `moto_server` process of our own. Its fake credentials reach every child process."""
    import os
    import shutil
    import subprocess
    import time

    import httpx

    os.environ.update(
        AWS_ACCESS_KEY_ID="edgefed-test",
        AWS_SECRET_ACCESS_KEY="edgefed-test-secret",
        AWS_DEFAULT_REGION="us-east-1",
    )
    endpoint = os.environ.get("EDGEFED_TEST_S3")
    process = None
    if not endpoint:
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
        process = subprocess.Popen(
            [shutil.which("moto_server") or "moto_server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(endpoint)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline or (process and process.poll() is not None):
                raise RuntimeError(f"no S3 API server answers at {endpoint}") from None
            time.sleep(0.2)
    yield endpoint
    if process is not None:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def s3_url(s3_endpoint) -> str:
    """A fresh bucket on the test S3 server, as an edgefed store URL."""
    import uuid

    import boto3

    bucket = f"edgefed-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/federation?endpoint={s3_endpoint}"


@pytest.fixture(params=["folder", "relay", "s3"])
def store_url(request, tmp_path, monkeypatch) -> str:
    """A shared folder, a real relay process (its token reaches devices by EDGEFED_TOKEN), or
    a bucket on a real S3 API server."""
    if request.param == "folder":
        return str(tmp_path / "shared")
    if request.param == "s3":
        return request.getfixturevalue("s3_url")
    url, token, _ = request.getfixturevalue("relay_server")
    monkeypatch.setenv("EDGEFED_TOKEN", token)
    return url


@pytest.fixture
def store(store_url):
    """`store_url` opened: a FolderStore, a RelayStore with the relay's token, or an S3Store."""
    import os

    from edgefed.sync.backends import open_store

    # store_url hands the relay's token to devices by EDGEFED_TOKEN; S3 and folders ignore it
    with open_store(store_url, token=os.environ.get("EDGEFED_TOKEN")) as opened:
        yield opened


# ---------------------------------------------------------------------------- federations

DEVICES = ("alice", "bob", "carol")


def no_wait_schedule():
    """The default schedule with no wait for peers: tests run their devices one after another."""
    from dataclasses import replace

    from edgefed.device.federation import DEFAULT_SCHEDULE

    return replace(DEFAULT_SCHEDULE, wait_seconds=0.0)


def edgefed(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    """The `edgefed` command with ARGS, run in this process by Typer's runner (the code a shell
    runs, without paying a Python start-up and torch import per call), reported as a finished
    process would be; asserts exit code 0 unless `check` is False. Where a test needs a process
    of its own (to kill it, or to run devices at the same time) it starts one."""
    result = run(*args)
    done = subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, tiny_llama_gguf) -> dict[tuple[str, int], Path]:
    """A distinct PEFT adapter folder per (device, round), on the tiny base. Shared by the whole
    run: tests read these folders and never write into them."""
    import torch

    from edgefed.adapter import BASE_FINGERPRINT_KEY, LoraSpec, attach_lora, save_peft_adapter
    from edgefed.quant.gguf_file import read_base_info
    from edgefed.quant.training_copy import build_training_model

    folder = tmp_path_factory.mktemp("adapters")
    fingerprint = read_base_info(tiny_llama_gguf).fingerprint
    made = {}
    for index, (device, round_number) in enumerate((d, r) for r in (0, 1) for d in DEVICES):
        model = attach_lora(build_training_model(tiny_llama_gguf, "fp32"), LoraSpec())
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
        made[device, round_number] = save_peft_adapter(
            model, folder / f"{device}-{round_number}", metadata={BASE_FINGERPRINT_KEY: fingerprint}
        )
    return made


@pytest.fixture(scope="session")
def shapes(tiny_llama_gguf) -> dict:
    """The rank-4 LoRA tensor shapes of the tiny base, by tensor name (never mutated)."""
    from edgefed.adapter import LoraSpec, lora_module_shapes, lora_tensor_shapes
    from edgefed.quant.gguf_file import read_base_info

    modules = lora_module_shapes(read_base_info(tiny_llama_gguf), LoraSpec(rank=4))
    return lora_tensor_shapes(modules, 4)


def random_adapter(shapes: dict, seed: int, scale: float = 0.1) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=generator) * scale for n, s in shapes.items()}


@pytest.fixture
def federation(tiny_llama_gguf) -> dict:
    """The manifest of a rank-4 federation on the tiny base (a fresh dict for each test)."""
    from edgefed.adapter import LoraSpec
    from edgefed.quant.gguf_file import read_base_info
    from edgefed.sync.manifest import Schedule, federation_manifest

    return federation_manifest(
        federation_id="fed-test",
        base_info=read_base_info(tiny_llama_gguf),
        lora=LoraSpec(rank=4),
        schedule=Schedule(warmup_steps=10, round_steps=5),
        trust={"scheme": "perplexity"},
    )


def honest_adapter(federation: dict, seed: int = 0) -> dict:
    """Random tensors of exactly the federation's LoRA shapes."""
    import torch

    from edgefed.adapter import lora_tensor_shapes

    shapes = lora_tensor_shapes(federation["lora_modules"], federation["lora"]["rank"])
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=generator) * 0.1 for n, s in shapes.items()}


def publish(
    federation, device: str, key: DeviceKey, tensors: dict, round_number: int = 0, encoding="fp16"
) -> tuple[bytes, bytes]:
    """`device`'s signed manifest and adapter blob for a round, as they would be stored."""
    import hashlib

    from edgefed.sync.manifest import adapter_manifest, encode_document
    from edgefed.sync.verify import encode_adapter

    blob = encode_adapter(tensors, encoding)
    manifest = adapter_manifest(
        federation=federation["id"],
        round_number=round_number,
        device=device,
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        base_sha256=federation["base"]["sha256"],
        train_tokens=1000,
        metrics={"val_perplexity": 12.5},
        key=key,
        encoding=encoding,
    )
    return encode_document(manifest), blob


def run(*args: object):
    """The CLI in this process (typer's runner): exit code, stdout and stderr apart."""
    from typer.testing import CliRunner

    from edgefed.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *needles: str) -> None:
    """Exit code 2 and one line that starts `error:`, last; before it at most the progress
    lines a command writes when stderr is not a terminal (each phase that lasted: `... ...`)."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    *progress, message = result.stderr.strip().splitlines() or [""]
    assert message.startswith("error:"), result.stderr
    assert all(line.endswith(" ...") for line in progress), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in message, message
