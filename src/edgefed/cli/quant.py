"""`edgefed quant`: HF folder -> GGUF, GGUF requantization, PEFT LoRA -> GGUF LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefed.cli.options import BaseOption, JsonOption, ThreadsOption
from edgefed.cli.output import emit_json, stderr, stdout, user_errors
from edgefed.runtime.quantize import QUANT_TYPES

app = typer.Typer(help="Convert and quantize models and adapters.", no_args_is_help=True)

OutputArg = Annotated[Path, typer.Option("--output", "-o", help="File to write (atomically).")]


def _report(path: Path, as_json: bool, **extra: object) -> None:
    size = path.stat().st_size
    if as_json:
        emit_json({"output": str(path), "size_bytes": size, **extra})
    else:
        stdout.print(f"wrote {path} ({size / 2**20:.1f} MiB)")


@app.command("convert")
@user_errors
def convert(
    folder: Annotated[
        Path,
        typer.Argument(
            help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json)."
        ),
    ],
    output: OutputArg,
    out_type: Annotated[
        str, typer.Option("--type", help="Tensor type of the weights: f16 or f32.")
    ] = "f16",
    as_json: JsonOption = False,
) -> None:
    """Write a Hugging Face model as a GGUF file for llama.cpp.

    Converts the families edgefed trains: Llama (SmolLM, Llama 3.x), Mistral, Qwen2, Qwen3,
    Gemma 2, Gemma 3 and Phi-3 (docs/guides/your-model.md); llama.cpp's own
    convert_hf_to_gguf.py converts more, and edgefed evaluates any GGUF llama.cpp loads.
    """
    from edgefed.quant.hf_convert import convert_hf_to_gguf

    with stderr.status(f"converting {folder} ..."):
        path = convert_hf_to_gguf(folder, output, out_type=out_type)
    _report(path, as_json, type=out_type)


@app.command("requantize")
@user_errors
def requantize(
    source: Annotated[Path, typer.Argument(help="GGUF base model to re-quantize.")],
    output: OutputArg,
    quant_type: Annotated[
        str,
        typer.Option("--type", help=f"One of {', '.join(QUANT_TYPES)}."),
    ] = "q8_0",
    threads: ThreadsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Re-quantize a GGUF base with llama.cpp's own quantizer."""
    from edgefed.runtime import requantize as run_requantize

    with stderr.status(f"quantizing {source} to {quant_type} ..."):
        path = run_requantize(source, output, quant_type, threads=threads)
    _report(path, as_json, type=quant_type)


@app.command("lora")
@user_errors
def lora(
    adapter: Annotated[
        Path,
        typer.Argument(
            help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."
        ),
    ],
    output: OutputArg,
    base: BaseOption = None,
    out_type: Annotated[
        str,
        typer.Option(
            "--type",
            help="Tensor type of A and B: f32 (fastest in llama.cpp's CPU kernels, exact) or "
            "f16 (half the file; rounds an adapter trained in float32).",
        ),
    ] = "f32",
    as_json: JsonOption = False,
) -> None:
    """Turn a PEFT LoRA adapter into a GGUF LoRA adapter for llama.cpp (checked against --base).

    The rank is padded with zeros to a multiple of 16, which lets llama.cpp's fast CPU matrix
    kernels run the adapter (rank 8 fell back to a slow path); the adapter computes the same.
    """
    from edgefed.quant.gguf_file import resolve_base
    from edgefed.quant.lora_gguf import convert_lora_to_gguf

    with stderr.status(f"converting {adapter} ..."):
        path = convert_lora_to_gguf(adapter, output, base=resolve_base(base), out_type=out_type)
    _report(path, as_json, type=out_type)
