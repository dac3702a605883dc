"""A device's model handed to the tools people run models with.

Three forms (`FORMATS`):

- `merged`: one GGUF, the base with the adapter added into its weights (`quant.merge`): any
  llama.cpp build, Ollama, LM Studio and llama-server load it with no adapter. Its default type
  is q8_0, not the base's own: re-rounded onto the embedded base's Q4_1 grid the merged weights
  kept 9% of the adapter's gain, while q8_0 scored as base + adapter
  (docs/guides/using-the-model.md); the `lora` pair keeps the 4-bit base and all of the adapter.
- `lora`: a folder with the base and the GGUF adapter side by side, an Ollama `Modelfile`
  (`FROM` + `ADAPTER`) and a README with the llama-cli / llama-server commands (`--lora`):
  the base stays shared, the adapter is a few MB.
- `peft`: the adapter's PEFT folder (adapter_config.json, adapter_model.safetensors) for
  transformers users.

Every output is written atomically, and an existing one is replaced only when asked (`force`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgefed.adapter import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from edgefed.atomic import atomic_dir, atomic_write_text
from edgefed.errors import ConfigError, InputFileError
from edgefed.use.chosen import ChosenModel

MERGED, LORA, PEFT = "merged", "lora", "peft"
FORMATS = (MERGED, LORA, PEFT)
PAIR_BASE = "base.gguf"
PAIR_ADAPTER = "adapter.gguf"
MODELFILE = "Modelfile"
PAIR_README = "README.md"  # beside the pair's and the PEFT folder's files
DEFAULT_MERGED_TYPE = "q8_0"


@dataclass(frozen=True)
class Export:
    """What was written: the path, its form, and the files in it (a folder's)."""

    path: Path
    format: str
    quant_type: str | None
    files: tuple[str, ...]

    def as_dict(self) -> dict:
        return {
            "output": str(self.path),
            "format": self.format,
            "type": self.quant_type,
            "files": list(self.files),
        }


def export_model(
    model: ChosenModel,
    output: str | os.PathLike[str],
    *,
    format: str = MERGED,
    quant_type: str | None = None,
    force: bool = False,
    threads: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Export:
    """Write `model` at `output` in `format` (see the module docstring).

    `quant_type` (merged only; default q8_0) is a `QUANT_TYPES` name. Raises
    ConfigError for a format or type that cannot be written, InputFileError for an output that
    exists (without `force`) or a model with nothing to export."""
    from edgefed.runtime.quantize import check_quant_type

    if format not in FORMATS:
        raise ConfigError(f"unknown export format '{format}'", f"choose {', '.join(FORMATS)}")
    out = Path(output)
    inputs = [Path(p).resolve() for p in (model.base, model.adapter, model.peft) if p is not None]
    if any(out.resolve() == p or out.resolve() in p.parents for p in inputs):
        raise InputFileError(
            f"{out} holds the model being exported", "choose an output outside its files"
        )
    if out.exists() and not force:
        raise InputFileError(f"{out} exists", "choose another output, or pass --force")
    if model.adapter is None:
        raise InputFileError(
            "the bare base has no adapter to export",
            f"use the base file itself ({model.base}), or choose an adapter",
        )
    if format != MERGED and quant_type is not None:
        raise ConfigError("--type is for the merged export", "leave it out, or use merged")
    if format == MERGED:
        if out.suffix.lower() != ".gguf" or out.is_dir():
            raise ConfigError(f"a merged export is one GGUF file, not {out}", "name it *.gguf")
        key = check_quant_type(quant_type or DEFAULT_MERGED_TYPE)
        from edgefed.quant.merge import merge_lora

        merge_lora(model.base, model.adapter, out, key, threads=threads, on_progress=on_progress)
        _shareable(out)
        return Export(out, MERGED, key, (out.name,))
    if format == LORA:
        with atomic_dir(out) as tmp:
            shutil.copyfile(model.base, tmp / PAIR_BASE)
            shutil.copyfile(model.adapter, tmp / PAIR_ADAPTER)
            atomic_write_text(tmp / MODELFILE, f"FROM ./{PAIR_BASE}\nADAPTER ./{PAIR_ADAPTER}\n")
            atomic_write_text(tmp / PAIR_README, _pair_readme(model, out.name))
            _shareable(tmp)
        return Export(out, LORA, None, (PAIR_BASE, PAIR_ADAPTER, MODELFILE, PAIR_README))
    if model.peft is None:
        raise InputFileError(
            f"{model.label} is a GGUF adapter: its PEFT form is not here",
            "export a device's round, or the PEFT folder the GGUF was converted from",
        )
    with atomic_dir(out) as tmp:
        for name in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE):
            shutil.copyfile(model.peft / name, tmp / name)
        atomic_write_text(tmp / PAIR_README, _peft_readme(model, out.name))
        _shareable(tmp)
    return Export(out, PEFT, None, (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, PAIR_README))


def _shareable(path: Path) -> None:
    """Give an export the permissions of a file the user made (atomic writes start private):
    an Ollama or llama-server run by another user must read it."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [path, *(path.iterdir() if path.is_dir() else ())]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def _pair_readme(model: ChosenModel, folder: str) -> str:
    name = folder.lower().replace(" ", "-")
    return f"""# {model.label} over {model.base.name}

`{PAIR_BASE}` is the base, `{PAIR_ADAPTER}` the LoRA adapter edgefed made (GGUF, llama.cpp's
format). Run them together from this folder:

    llama-cli -m {PAIR_BASE} --lora {PAIR_ADAPTER} -cnv
    llama-server -m {PAIR_BASE} --lora {PAIR_ADAPTER} --port 8080
    ollama create {name} -f {MODELFILE} && ollama run {name}

LM Studio loads a single GGUF: merge the two into one from this folder with
`edgefed export --adapter {PAIR_ADAPTER} --base {PAIR_BASE} -o {name}.gguf` and import that
file (`lms import {name}.gguf`).
"""


def _peft_readme(model: ChosenModel, folder: str) -> str:
    return f"""# {model.label} over {model.base.name}

A PEFT LoRA adapter. Load it over the base in transformers (which reads the GGUF base
itself, dequantized):

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        "{model.base.parent}", gguf_file="{model.base.name}"
    )
    model = PeftModel.from_pretrained(base, "{folder}")
"""
