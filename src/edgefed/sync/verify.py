"""Everything pulled from a store is verified here before any of it is used.

A peer's adapter passes when, in this order: its manifest is one of ours and names the round,
device and federation its key says; the device is registered and the manifest is signed by the
registered key; the base is the federation's; the blob is within the size limit, has the size
and sha256 the manifest signs; it parses as safetensors (never unpickled) with exactly the
tensor names, shapes and dtype the federation's LoRA configuration implies; and every value is
finite. The first check that fails is the reason it is rejected; a rejected adapter never
reaches aggregation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from edgefed.adapter import lora_tensor_shapes
from edgefed.errors import ModelFormatError
from edgefed.sync.manifest import (
    DEPARTURE_KIND,
    ENCODING_FP16,
    ENCODING_INT8,
    ENCODINGS,
    Federation,
    manifest_signed_by,
    parse_document,
)

ADAPTER_DTYPE = "float16"
SCALE_SUFFIX = ".int8_scale"


class Rejected(Exception):
    """An item failed verification; the message is the reason."""


@dataclass(frozen=True)
class PeerAdapter:
    """A verified adapter: its tensors (float16, PEFT names) and its signed manifest."""

    device: str
    round: int
    tensors: dict
    manifest: dict


@dataclass(frozen=True)
class Rejection:
    """Why an item of the store was not used."""

    device: str
    round: int
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def _scale_axis(shape) -> int:
    """int8 scales run along the rank dimension (A: rows, B: columns): r scales per tensor."""
    return 1 if shape[0] <= shape[1] else 0


def encode_adapter(tensors: Mapping, encoding: str = ENCODING_FP16) -> bytes:
    """LoRA tensors as safetensors bytes: float16, or (lossy) int8 codes with one float16
    scale (absmax / 127) per rank index, about half the bytes of float16."""
    import torch
    from safetensors.torch import save

    out = {}
    for name, tensor in tensors.items():
        values = tensor.detach().to("cpu", torch.float32)
        if encoding == ENCODING_INT8:
            axis = _scale_axis(values.shape)
            scale = (values.abs().amax(dim=axis) / 127.0).clamp_min(1e-12).to(torch.float16)
            codes = torch.round(values / scale.float().unsqueeze(axis)).clamp(-127, 127)
            out[name] = codes.to(torch.int8).contiguous()
            out[name + SCALE_SUFFIX] = scale.contiguous()
        else:
            out[name] = values.to(torch.float16).contiguous()
    return save(out)


def _dequantize_int8(tensors: Mapping) -> dict:
    import torch

    restored = {}
    for name, codes in tensors.items():
        if not name.endswith(SCALE_SUFFIX):
            scale = tensors[name + SCALE_SUFFIX].float().unsqueeze(_scale_axis(codes.shape))
            restored[name] = (codes.float() * scale).to(torch.float16)
    return restored


def decode_adapter(data: bytes) -> dict:
    """Tensors from safetensors bytes; ModelFormatError when they are not safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(
            f"not a safetensors file ({exc})", "publish a safetensors adapter written by edgefed"
        ) from exc


class Verifier:
    """Checks items of one federation against its manifest and its devices' registered keys."""

    def __init__(self, federation: Federation, public_keys: Mapping[str, str]) -> None:
        self.federation = federation
        self.public_keys = dict(public_keys)
        self.expected = lora_tensor_shapes(federation.lora_modules, federation.lora.rank)
        self.max_bytes = federation.adapter_bytes_limit

    def check(
        self,
        round_number: int,
        device: str,
        manifest_bytes: bytes,
        adapter_bytes: bytes,
        version: int = 1,
    ) -> PeerAdapter:
        """The verified adapter; raises Rejected with the first reason it fails."""
        try:
            manifest = parse_document(manifest_bytes, "the manifest")
        except ModelFormatError as exc:
            raise Rejected(exc.problem) from exc
        claimed = (
            manifest.get("federation"),
            manifest.get("round"),
            manifest.get("device"),
            manifest.get("version", 1),
        )
        if claimed != (self.federation.id, round_number, device, version):
            raise Rejected(
                f"the manifest claims federation/round/device/version {claimed}, not its place "
                "in the store"
            )
        public_key = self.public_keys.get(device)
        if public_key is None:
            raise Rejected(f"device '{device}' is not registered")
        if not manifest_signed_by(manifest, public_key):
            raise Rejected(f"the signature does not verify with {device}'s registered key")
        if manifest.get("base_sha256") != self.federation.base_sha256:
            raise Rejected(
                f"adapter for base {str(manifest.get('base_sha256'))[:12]}, not the federation's "
                f"{self.federation.base_sha256[:12]}"
            )
        encoding = manifest.get("encoding")
        if encoding not in ENCODINGS:
            raise Rejected(f"unknown encoding {encoding!r}")
        if len(adapter_bytes) > self.max_bytes:
            raise Rejected(
                f"adapter is {len(adapter_bytes):,} bytes, over the {self.max_bytes:,} limit"
            )
        if len(adapter_bytes) != manifest.get("bytes"):
            raise Rejected(
                f"adapter is {len(adapter_bytes):,} bytes, "
                f"the manifest says {manifest.get('bytes')}"
            )
        if hashlib.sha256(adapter_bytes).hexdigest() != manifest.get("sha256"):
            raise Rejected("adapter sha256 differs from the signed manifest (damaged or tampered)")
        try:
            tensors = decode_adapter(adapter_bytes)
        except ModelFormatError as exc:
            raise Rejected(f"adapter is {exc.problem}") from exc
        if encoding == ENCODING_INT8:
            self._check_int8(tensors)
            tensors = _dequantize_int8(tensors)
        self._check_tensors(tensors)
        return PeerAdapter(device=device, round=round_number, tensors=tensors, manifest=manifest)

    def departed(self, device: str, notice_bytes: bytes) -> bool:
        """Whether `notice_bytes` is `device`'s own signed departure from this federation (a
        notice anyone else could have written is ignored, so nobody can make peers stop
        waiting for a device but the device itself)."""
        public_key = self.public_keys.get(device)
        try:
            notice = parse_document(notice_bytes, "the departure notice")
        except ModelFormatError:
            return False
        claimed = (notice.get("kind"), notice.get("federation"), notice.get("device"))
        return (
            public_key is not None
            and claimed == (DEPARTURE_KIND, self.federation.id, device)
            and manifest_signed_by(notice, public_key)
        )

    def _check_int8(self, tensors: Mapping) -> None:
        import torch

        expected = set(self.expected) | {n + SCALE_SUFFIX for n in self.expected}
        if set(tensors) != expected:
            raise Rejected("int8 tensor names differ from the federation's LoRA config")
        for name, shape in self.expected.items():
            codes, scale = tensors[name], tensors[name + SCALE_SUFFIX]
            if codes.dtype != torch.int8 or scale.dtype != torch.float16:
                raise Rejected(f"{name} is not int8 codes with float16 scales")
            if tuple(codes.shape) != shape or tuple(scale.shape) != (min(shape),):
                raise Rejected(f"{name} has shape {tuple(codes.shape)}, expected {shape}")

    def _check_tensors(self, tensors: Mapping) -> None:
        import torch

        missing = sorted(set(self.expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(self.expected))
        if missing or unexpected:
            raise Rejected(
                f"tensor names differ from the federation's LoRA config "
                f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. "
                f"{(missing or unexpected)[0]})"
            )
        for name, shape in self.expected.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != shape:
                raise Rejected(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
            if tensor.dtype != torch.float16:
                raise Rejected(f"{name} is {tensor.dtype}, expected {ADAPTER_DTYPE}")
            if not torch.isfinite(tensor).all():
                raise Rejected(f"{name} holds NaN or infinite values")
