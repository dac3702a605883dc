"""One base loaded once for many training runs and evaluations: a simulation's N devices.

A real device loads its base once per command. A simulation runs N devices x R rounds in one
process, and reloading the training copy (seconds) and the llama.cpp runtime for every run would
cost more than the training itself. `LoadedBase` holds both; each run loads its starting LoRA
tensors into the one PEFT model, so a run over a LoadedBase gives the same adapter as a run that
loaded everything itself (tested).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from edgefed.adapter import LoraSpec, attach_lora, lora_state
from edgefed.errors import AdapterMismatchError
from edgefed.quant.gguf_file import read_base_info, resolve_base


class LoadedBase:
    """The llama.cpp runtime copy of a base and, on first use, its training copy with a LoRA."""

    def __init__(
        self,
        base: str | os.PathLike[str] | None = None,
        *,
        precision: str = "nf4",
        device: str = "cpu",
        runtime_quant: str | None = None,
        threads: int | None = None,
    ) -> None:
        from edgefed.runtime import DEFAULT_RUNTIME_QUANT, LlamaRuntime, runtime_copy

        self.base_path = resolve_base(base)
        self.info = read_base_info(self.base_path)
        self.precision, self.device = precision, device
        self.runtime_quant = runtime_quant or DEFAULT_RUNTIME_QUANT
        self.runtime = LlamaRuntime(
            runtime_copy(self.base_path, self.runtime_quant),
            threads=threads,
            remember_scores=True,
        )
        self._scratch_dir = tempfile.TemporaryDirectory(prefix="edgefed-loaded-")
        self._scratch = Path(self._scratch_dir.name)
        self._model = None
        self._shape: tuple | None = None
        self._initial: dict[int, dict] = {}  # init seed -> initial LoRA state

    def training_model(self, spec: LoraSpec):
        """The PEFT model for `spec` and its initial LoRA state (the shared seeded init)."""
        from edgefed.adapter import initialize_lora

        shape = (spec.rank, spec.alpha, spec.dropout, spec.targets)
        if self._model is None:
            from edgefed.train.run import load_training_copy

            self._model = attach_lora(
                load_training_copy(self.base_path, self.precision, self.device), spec
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

    def load_tensors(self, tensors, spec: LoraSpec):
        """LoRA tensors as a runtime adapter, converted and loaded once per distinct content.

        N devices scoring the same N peer adapters would otherwise convert each N times.
        """
        import hashlib

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

    def load_file(self, gguf: Path):
        """A GGUF LoRA file as a runtime adapter, loaded once per distinct content.

        The runtime knows adapters by path; a path rewritten with another adapter (a round
        aggregated again) must not come back as the old one.
        """
        import hashlib
        import shutil

        key = hashlib.sha256(Path(gguf).read_bytes()).hexdigest()[:32]
        copy = self._scratch / f"{key}.gguf"
        if not copy.is_file():
            shutil.copyfile(gguf, copy)
        return self.runtime.load_adapter(copy)

    def close(self) -> None:
        self.runtime.close()
        self._scratch_dir.cleanup()

    def __enter__(self) -> LoadedBase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
