"""GGUF's quantized blocks as torch tensors, and their dequantization with torch operations.

A GGUF tensor of type Q4_1, Q4_K, ... stores each row as a run of blocks: a few float16
scales and the packed integer codes of 32 or 256 weights. `split_blocks` cuts a tensor's raw
bytes once, at load, into one contiguous torch tensor per block field (scales, minimums, low
and high bits of the codes), shaped (rows, blocks per row, field width). That costs the same
memory as the file (the 6-bit scales of the K types are unpacked to a byte each, +3%), and it
makes every later dequantization a handful of vectorised torch operations over contiguous
memory: about a tenth of the matmul it feeds on this CPU, where slicing the fields out of the
interleaved bytes on every call cost as much again.

`dequantize_fields` repeats, operation for operation in float32, what the `gguf` library's
numpy dequantizers (and llama.cpp's C ones) compute, so the values are bit for bit those of a
float copy of the file: the tests compare them with `gguf.quants.dequantize` for every type.
Rows stay rows, so selecting rows (an embedding lookup, Llama's q/k row order) is indexing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# GGMLQuantizationType values (gguf.constants), spelled here so importing this module needs no
# gguf: name -> (type id, weights per block, bytes per block)
BLOCK_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "BF16": (30, 1, 2),
}
TYPE_NAMES = {type_id: name for name, (type_id, _, _) in BLOCK_TYPES.items()}
SUPPORTED_TYPES = tuple(BLOCK_TYPES)

# byte ranges of each block's fields, and the numpy dtype each is viewed as
_F16, _U8, _I8 = np.float16, np.uint8, np.int8
_LAYOUTS: dict[str, tuple[tuple[str, int, int, type], ...]] = {
    "Q4_0": (("d", 0, 2, _F16), ("qs", 2, 18, _U8)),
    "Q4_1": (("d", 0, 2, _F16), ("m", 2, 4, _F16), ("qs", 4, 20, _U8)),
    "Q5_0": (("d", 0, 2, _F16), ("qh", 2, 6, _U8), ("qs", 6, 22, _U8)),
    "Q5_1": (("d", 0, 2, _F16), ("m", 2, 4, _F16), ("qh", 4, 8, _U8), ("qs", 8, 24, _U8)),
    "Q8_0": (("d", 0, 2, _F16), ("qs", 2, 34, _I8)),
    "Q4_K": (("d", 0, 2, _F16), ("dmin", 2, 4, _F16), ("scales", 4, 16, _U8), ("qs", 16, 144, _U8)),
    "Q5_K": (
        ("d", 0, 2, _F16),
        ("dmin", 2, 4, _F16),
        ("scales", 4, 16, _U8),
        ("qh", 16, 48, _U8),
        ("qs", 48, 176, _U8),
    ),
    "Q6_K": (
        ("ql", 0, 128, _U8),
        ("qh", 128, 192, _U8),
        ("scales", 192, 208, _I8),
        ("d", 208, 210, _F16),
    ),
}
_FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def type_name(type_id: int) -> str:
    """The GGML type's name for messages, also for types edgefed does not train on."""
    if type_id in TYPE_NAMES:
        return TYPE_NAMES[type_id]
    try:
        import gguf

        return gguf.GGMLQuantizationType(type_id).name
    except (ImportError, ValueError):
        return f"type {type_id}"


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K pack 8 scales and 8 minimums of 6 bits into 12 bytes; one byte each here."""
    low, mins, high = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    scale = np.concatenate([low & 0x3F, (high & 0x0F) | ((low >> 2) & 0x30)], axis=-1)
    minimum = np.concatenate([mins & 0x3F, (high >> 4) | ((mins >> 2) & 0x30)], axis=-1)
    return scale, minimum


def split_blocks(raw: np.ndarray, type_id: int) -> dict[str, torch.Tensor]:
    """One tensor's raw bytes, (rows, bytes per row) uint8, as contiguous per-field tensors.

    Float types give {"values": (rows, cols)}; block types {field: (rows, blocks, width)}.
    Raises KeyError for a type not in SUPPORTED_TYPES (the caller words the message).
    """
    import torch

    name = TYPE_NAMES[type_id]
    rows = raw.shape[0]
    if name in _FLOAT_TYPES:
        values = np.ascontiguousarray(raw).view(_FLOAT_TYPES[name]).reshape(rows, -1)
        tensor = torch.from_numpy(values.copy())
        return {"values": tensor.view(torch.bfloat16) if name == "BF16" else tensor}
    _, _, block_bytes = BLOCK_TYPES[name]
    blocks = raw.reshape(rows, -1, block_bytes)
    fields: dict[str, np.ndarray] = {}
    for field, start, end, dtype in _LAYOUTS[name]:
        fields[field] = np.ascontiguousarray(blocks[..., start:end]).view(dtype)
    if name in ("Q4_K", "Q5_K"):
        fields["scale"], fields["minimum"] = _k_scales(fields.pop("scales"))
    return {field: torch.from_numpy(array) for field, array in fields.items()}


def _nibbles(qs: torch.Tensor, dim: int) -> torch.Tensor:
    """Low nibbles, then high nibbles, side by side at `dim` (ggml's order of the codes).

    Written into one preallocated tensor: a stack of two temporaries costs a third more here.
    """
    import torch

    dim = dim % (qs.dim() + 1)
    shape = list(qs.shape)
    shape.insert(dim, 2)
    out = torch.empty(shape, dtype=torch.uint8, device=qs.device)
    torch.bitwise_and(qs, 0x0F, out=out.select(dim, 0))
    torch.bitwise_right_shift(qs, 4, out=out.select(dim, 1))
    return out


def _bits(qh: torch.Tensor, count: int, width: int, dim: int) -> torch.Tensor:
    """`count` fields of `width` bits of every byte of qh, lowest first, stacked at `dim`."""
    import torch

    shifts = torch.arange(0, count * width, width, dtype=torch.uint8, device=qh.device)
    shape = [1] * (qh.dim() + 1)
    shape[dim] = count
    return (qh.unsqueeze(dim) >> shifts.view(shape)) & ((1 << width) - 1)


def dequantize_fields(
    fields: dict[str, torch.Tensor], type_id: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The float32 (rows, cols) matrix of a tensor split by `split_blocks` (or rows of it).

    Each type is ggml's formula in ggml's order of float operations (a product, then a sum or
    difference, never fused), done in place on one float32 buffer: `out` when given (a
    reused buffer of the right size), else a new one.
    """
    import torch

    name = TYPE_NAMES[type_id]
    if name in _FLOAT_TYPES:
        values = fields["values"]
        if out is not None:
            return out.view(values.shape).copy_(values)
        return values if values.dtype == torch.float32 else values.float()
    rows, n_blocks = fields["d"].shape[:2]

    def as_float(codes: torch.Tensor) -> torch.Tensor:
        if out is None:
            return codes.float()
        return out.view(codes.shape).copy_(codes)

    if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        codes = _nibbles(fields["qs"], dim=2).view(rows, n_blocks, 32)
        if name in ("Q5_0", "Q5_1"):
            high = _bits(fields["qh"], 8, 1, dim=3).view(rows, n_blocks, 32)
            codes.bitwise_or_(high.bitwise_left_shift_(4))
        out = as_float(codes)
        if name in ("Q4_0", "Q5_0"):
            out.sub_(8.0 if name == "Q4_0" else 16.0)  # exact: small integers
            out.mul_(fields["d"].float())
        else:
            out.mul_(fields["d"].float()).add_(fields["m"].float())
    elif name == "Q8_0":
        out = as_float(fields["qs"]).mul_(fields["d"].float())
    elif name in ("Q4_K", "Q5_K"):
        scale = (fields["d"].float() * fields["scale"].float()).unsqueeze(-1)
        shift = (fields["dmin"].float() * fields["minimum"].float()).unsqueeze(-1)
        codes = _nibbles(fields["qs"].view(rows, n_blocks, 4, 32), dim=3)
        codes = codes.view(rows, n_blocks, 8, 32)
        if name == "Q5_K":
            codes.bitwise_or_(_bits(fields["qh"], 8, 1, dim=2).bitwise_left_shift_(4))
        out = as_float(codes).mul_(scale).sub_(shift)
    elif name == "Q6_K":
        codes = _nibbles(fields["ql"].view(rows, n_blocks, 2, 64), dim=3)
        codes = codes.view(rows, n_blocks, 8, 32)
        high = _bits(fields["qh"].view(rows, n_blocks, 2, 32), 4, 2, dim=3)
        codes.bitwise_or_(high.view(rows, n_blocks, 8, 32).bitwise_left_shift_(4))
        out = as_float(codes.view(rows, n_blocks, 16, 16)).sub_(32.0)  # exact: small integers
        out.mul_((fields["d"].float() * fields["scales"].float()).unsqueeze(-1))
    else:  # split_blocks refused it already
        raise KeyError(name)
    return out.view(rows, -1)


def field_bytes(fields: dict[str, torch.Tensor]) -> int:
    """Memory the fields hold, for the benchmark's share of weights in the peak."""
    return sum(t.numel() * t.element_size() for t in fields.values())
