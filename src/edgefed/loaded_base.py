"""The one resource handle every step takes: a base model, loaded at most once per process.

A device step needs some of: the base file and its fingerprint, the llama.cpp runtime copy of
the base (scoring), the PyTorch training copy with a LoRA attached (training), the torch device
and the CPU threads. `LoadedBase` owns all of them, makes each on first use and only then, and
is the only thing a step is given: no step takes a precision, a device, a thread count or a
runtime quant of its own, so none can disagree with the base it runs over.

A real device makes one per command. A simulation makes one for its N devices x R rounds:
reloading the training copy (seconds) and the runtime for every run would cost more than the
training itself. Each run loads its own starting LoRA tensors into the one PEFT model, so a run
over a shared LoadedBase gives the same adapter as a run over a fresh one (tested).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edgefed.adapter import LoraSpec, attach_lora, initialize_lora, lora_state
from edgefed.errors import AdapterMismatchError, ConfigError, InputFileError
from edgefed.quant.gguf_file import read_base_info, resolve_base
from edgefed.quant.training_copy import PRECISIONS as TRAIN_PRECISIONS
from edgefed.quant.training_copy import check_trainable, load_training_copy
from edgefed.runtime.quantize import DEFAULT_RUNTIME_QUANT, check_runtime_quant

if TYPE_CHECKING:
    from edgefed.runtime.llama import Adapter, LlamaRuntime

DEVICES = ("auto", "cpu", "cuda")
# gguf: fp32's adapter quality at the GGUF file's weight memory (bench/train.py,
# docs/measurements/training.md)
DEFAULT_PRECISION = "gguf"
DEFAULT_DEVICE = "auto"


def resolve_device(device: str) -> str:
    """'auto' is CUDA when torch sees a GPU, else the CPU; a named device must exist."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda") or (kind == "cuda" and not torch.cuda.is_available()):
        raise InputFileError(
            f"device '{device}' is not available here",
            "use --device auto, cpu, or cuda on a machine with a CUDA GPU",
        )
    return device


class LoadedBase:
    """A base model and what is made of it: see the module docstring.

    `precision` is the training copy's (gguf, nf4 or fp32), `device` torch's (auto, cpu, cuda),
    `runtime_quant` the llama.cpp copy's ('keep': the file as it is), `threads` the CPU threads of
    both (None: all cores). By default training frees llama.cpp's copy of the base and scoring frees
    the training copy after training, each made again at its next use (seconds): on a 1B base each
    is a gigabyte or more, and a device's round uses them one after the other. `keep_loaded` keeps
    both (a simulation, which trains and scores many devices in one process, sets it). Raises
    InputFileError or ModelFormatError for a missing or malformed base and ConfigError for an
    unknown precision or quant, at once: nothing heavy is loaded until a step asks for it.
    """

    def __init__(
        self,
        base: str | os.PathLike[str] | None = None,
        *,
        precision: str = DEFAULT_PRECISION,
        device: str = DEFAULT_DEVICE,
        runtime_quant: str | None = None,
        threads: int | None = None,
        keep_loaded: bool = False,
    ) -> None:
        if precision not in TRAIN_PRECISIONS:
            raise ConfigError(
                f"unknown training precision '{precision}'",
                f"choose one of {', '.join(TRAIN_PRECISIONS)}",
            )
        if threads is not None and threads < 1:
            raise ConfigError(f"{threads} threads", "give --threads 1 or more, or leave it out")
        self.base_path = resolve_base(base)
        self.info = read_base_info(self.base_path)
        self.precision = precision
        self.runtime_quant = check_runtime_quant(runtime_quant or DEFAULT_RUNTIME_QUANT)
        self.threads = threads
        self.keep_loaded = keep_loaded
        self._device_request = device
        self._device: str | None = None
        self._runtime: LlamaRuntime | None = None
        self._scratch_dir: tempfile.TemporaryDirectory | None = None
        self._model = None
        self._shape: tuple | None = None
        self._initial: dict[int, dict] = {}  # init seed -> initial LoRA state
        # told what a first use is about to do when it takes long (building a cache)
        self.on_status: Callable[[str], None] = lambda message: None

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def device(self) -> str:
        """The torch device, resolved on first use (it needs torch)."""
        if self._device is None:
            self._device = resolve_device(self._device_request)
        return self._device

    @property
    def runtime(self) -> LlamaRuntime:
        """The llama.cpp runtime over the base's runtime copy, loaded on first use."""
        if self._runtime is None:
            from edgefed.runtime.llama import LlamaRuntime
            from edgefed.runtime.quantize import runtime_copy

            self._runtime = LlamaRuntime(
                runtime_copy(self.base_path, self.runtime_quant, on_build=self.on_status),
                threads=self.threads,
                remember_scores=True,
            )
        return self._runtime

    def free_runtime_for_training(self) -> None:
        """Before training: free llama.cpp's copy of the base (with `keep_loaded`, only its
        lanes' caches and buffers), so that it does not sit in memory under the activations.
        Adapters loaded into it before are gone with it: load them again after."""
        if self._runtime is None:
            return
        if self.keep_loaded:
            self._runtime.release_lanes()
        else:
            self._runtime.close()
            self._runtime = None

    def free_training_copy(self) -> None:
        """After training: free the PyTorch training copy (unless `keep_loaded`) and give the
        heap's free pages back, so that scoring, mixing and evaluating do not run beside it."""
        if self.keep_loaded or self._model is None:
            return
        import gc

        from edgefed.memory import release_freed_memory

        self._model, self._shape, self._initial = None, None, {}
        gc.collect()
        release_freed_memory()

    def check_trainable(self) -> None:
        """Refuse, in one line, a base the chosen training copy cannot hold (the gguf copy and a
        Q3_K matrix, a family edgefed has no record of, a RoPE scaling it cannot compute);
        scoring with llama.cpp alone needs no training copy and no such check."""
        check_trainable(self.info, self.precision)

    def training_model(self, spec: LoraSpec):
        """The PEFT model for `spec` and its initial LoRA state (the shared seeded init)."""
        self.check_trainable()
        shape = (spec.rank, spec.alpha, spec.dropout, spec.targets)
        if self._model is None:
            if self.threads:
                import torch

                torch.set_num_threads(self.threads)
            self.on_status(f"loading the {self.precision} training copy of the base")
            self._model = attach_lora(
                load_training_copy(self.base_path, self.precision).to(self.device), spec
            )
            self._shape = shape
        elif shape != self._shape:
            raise AdapterMismatchError(
                "a LoadedBase trains one LoRA shape; this run asks for another",
                "use one LoadedBase per LoRA configuration",
            )
        if spec.init_seed not in self._initial:
            initialize_lora(self._model, spec.init_seed)
            self._initial[spec.init_seed] = lora_state(self._model)
        return self._model, self._initial[spec.init_seed]

    @property
    def _scratch(self) -> Path:
        if self._scratch_dir is None:
            self._scratch_dir = tempfile.TemporaryDirectory(prefix="edgefed-loaded-")
        return Path(self._scratch_dir.name)

    def load_tensors(self, tensors, spec: LoraSpec) -> Adapter:
        """LoRA tensors as a runtime adapter, converted and loaded once per distinct content.

        N devices scoring the same N peer adapters would otherwise convert each N times.
        """
        import numpy as np

        from edgefed.adapter import save_lora_tensors
        from edgefed.quant.lora_gguf import convert_lora_to_gguf

        digest = hashlib.sha256()
        for name in sorted(tensors):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(tensors[name].float().numpy()).tobytes())
        key = digest.hexdigest()[:32]
        gguf = self._scratch / f"{key}.gguf"
        if not gguf.is_file():
            folder = save_lora_tensors(tensors, spec, self._scratch / key)
            convert_lora_to_gguf(folder, gguf, base=self.base_path)
        return self.runtime.load_adapter(gguf)

    def load_file(self, gguf: str | os.PathLike[str]) -> Adapter:
        """A GGUF LoRA file as a runtime adapter, loaded once per distinct content.

        The runtime knows adapters by path; a path rewritten with another adapter (a round
        aggregated again) must not come back as the old one.
        """
        key = hashlib.sha256(Path(gguf).read_bytes()).hexdigest()[:32]
        copy = self._scratch / f"{key}.gguf"
        if not copy.is_file():
            shutil.copyfile(gguf, copy)
        return self.runtime.load_adapter(copy)

    def close(self) -> None:
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None
        if self._scratch_dir is not None:
            self._scratch_dir.cleanup()
            self._scratch_dir = None

    def __enter__(self) -> LoadedBase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
