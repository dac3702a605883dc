"""A GGUF LoRA adapter added into its base's weights: one GGUF that runs alone in any llama.cpp
build, Ollama, LM Studio or llama-server.

The arithmetic is done where llama.cpp's adapter works: in the GGUF's own tensor layout, whose
A and B are already arranged as the base's rows (q/k permuted for RoPE where the family needs
it), so W' = W + (alpha / r) B A for every tensor the adapter holds a pair for, with W
dequantized by gguf-py to float32. Every tensor is written as float32, tensor by tensor (a 2B
base never sits in memory), then llama.cpp's own quantizer makes the type asked for. At f32 the
merged file computes what base + adapter compute, to float rounding (tested to 1e-4); at a
quantized type each merged matrix is rounded again: onto the base's own grid it falls back onto
nearly its old values and most of the adapter is lost (measured in
docs/guides/using-the-model.md).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgefed.errors import AdapterMismatchError, InputFileError, ModelFormatError
from edgefed.quant.gguf_file import copy_metadata, open_gguf, read_base_info
from edgefed.quant.lora_gguf import check_trained_on, open_lora_gguf

F32 = "f32"


def merge_lora(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    quant_type: str,
    *,
    threads: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `base` with the GGUF LoRA `adapter` added into its weights at `destination`, as
    `quant_type` (a `QUANT_TYPES` name); atomically: a failure leaves nothing behind.

    `on_progress(done, total)` is told after each tensor. Raises ModelFormatError for a file
    that is not a LoRA adapter or a tensor type gguf-py cannot dequantize, and
    AdapterMismatchError for an adapter of another base."""
    from edgefed.runtime.quantize import check_quant_type, requantize

    key = check_quant_type(quant_type)
    out = Path(destination)
    try:
        if key == F32:
            _write_merged_f32(base, adapter, out, on_progress)
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".merge-", dir=out.parent) as scratch:
            merged = Path(scratch) / "merged.f32.gguf"
            _write_merged_f32(base, adapter, merged, on_progress)
            requantize(merged, out, key, threads=threads)
    except OSError as exc:  # a full disk (the float32 step is 4 bytes a parameter), no rights
        raise InputFileError(
            f"cannot write the merged model at {out} ({exc.strerror or exc})",
            "free disk space (4 bytes a parameter for the float32 step) or choose another -o",
        ) from exc
    return out


def _lora_pairs(adapter: Path, base_info) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """{base tensor name: (A, B, scale)} of the adapter, with llama.cpp's scale for each pair:
    alpha / (that pair's stored rank), or 1 where the adapter gives no alpha."""
    import gguf
    from gguf.quants import dequantize

    reader, trained_on = open_lora_gguf(adapter)
    check_trained_on(adapter, trained_on, base_info)
    if reader.fields[gguf.Keys.General.ARCHITECTURE].contents() != base_info.architecture:
        raise AdapterMismatchError(
            f"adapter {adapter.name} is for another architecture than {base_info.path.name}",
            "merge it into the base it was trained on",
        )
    alpha_field = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(alpha_field.contents()) if alpha_field is not None else 0.0
    tensors = {t.name: t for t in reader.tensors}
    pairs: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for name in tensors:
        if not name.endswith((".lora_a", ".lora_b")):
            continue
        target = name.rsplit(".", 1)[0]
        a_entry, b_entry = tensors.get(f"{target}.lora_a"), tensors.get(f"{target}.lora_b")
        if a_entry is None or b_entry is None or target not in base_info.tensor_shapes:
            raise AdapterMismatchError(
                f"adapter {adapter.name} has no pair or no base tensor for {target}",
                "merge it into the base it was trained on",
            )
        if target in pairs:
            continue
        a, b = (np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
                for t in (a_entry, b_entry))  # fmt: skip
        n_in, n_out = base_info.tensor_shapes[target][:2]  # GGUF lists the input dim first
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != n_in or b.shape != (n_out, a.shape[0]):
            raise AdapterMismatchError(
                f"adapter {adapter.name} has A{a.shape} B{b.shape} for {target}, a "
                f"{n_out}x{n_in} tensor of {base_info.path.name}",
                "merge it into the base it was trained on",
            )
        pairs[target] = (a, b, alpha / a.shape[0] if alpha else 1.0)
    if not pairs:
        raise ModelFormatError(f"{adapter} holds no LoRA tensors", "convert the adapter again")
    return pairs


def _write_merged_f32(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    destination: Path,
    on_progress: Callable[[int, int], None] | None,
) -> None:
    import gguf
    from gguf.quants import dequantize

    from edgefed.atomic import atomic_path

    info = read_base_info(base)
    pairs = _lora_pairs(Path(adapter), info)
    reader = open_gguf(base, "base model")
    with atomic_path(destination) as tmp:
        writer = gguf.GGUFWriter(tmp, info.architecture)
        # the writer lays tensors out at its own alignment: a base's custom one must not be copied
        copy_metadata(
            reader, writer, skip=(gguf.Keys.General.FILE_TYPE, gguf.Keys.General.ALIGNMENT)
        )
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        shapes = {}
        for tensor in reader.tensors:
            shape = tuple(int(n) for n in reversed(tensor.shape))  # numpy order: rows first
            shapes[tensor.name] = shape
            nbytes = 4 * int(np.prod(shape))
            writer.add_tensor_info(tensor.name, shape, np.dtype(np.float32), nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, tensor in enumerate(reader.tensors, 1):
            try:
                weights = dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError as exc:
                raise ModelFormatError(
                    f"gguf-py cannot dequantize {tensor.name}'s "
                    f"{gguf.GGMLQuantizationType(tensor.tensor_type).name} blocks",
                    "requantize the base to q8_0 or q4_k_m first (`edgefed quant requantize`)",
                ) from exc
            weights = np.ascontiguousarray(weights, dtype=np.float32).reshape(shapes[tensor.name])
            if tensor.name in pairs:
                a, b, scale = pairs[tensor.name]
                weights = weights + scale * (b @ a)  # F32 tensors are read-only views
            writer.write_tensor_data(weights)
            if on_progress is not None:
                on_progress(done, len(reader.tensors))
        writer.close()
