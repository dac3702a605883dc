"""The documents of the federation store: federation manifest, registrations, adapter manifests.

All are JSON objects with a `format` version, checked first. An adapter manifest is signed by
its device: the Ed25519 signature covers the canonical bytes of every other field (see
`edgefed.sync.signing`), and among them the sha256 and size of the adapter blob, so one
signature vouches for the manifest and the blob together.

    federation.json  {"format", "id", "created", "base": {"sha256", "architecture", "name",
                      "parameters"}, "lora": {"rank", "alpha", "dropout", "targets",
                      "init_seed"}, "lora_modules": {module: [in, out]}, "schedule":
                      {"warmup_steps", "round_steps"}, "trust": {...}, "reference":
                      {"sha256", "bytes"} | null, "limits": {"adapter_bytes"}}
    devices/<d>.json {"format", "device", "public_key" (base64 raw Ed25519), "registered"}
    rounds/<r>/<d>.json
                     {"format", "federation", "round", "device", "sha256", "bytes",
                      "encoding": "fp16" | "int8", "base_sha256", "train_tokens", "metrics",
                      "created", "signature"}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime

from edgefed.errors import ModelFormatError
from edgefed.sync.signing import DeviceKey, signature_is_valid

FORMAT_VERSION = 1
ENCODING_FP16 = "fp16"
ENCODING_INT8 = "int8"  # lossy: per-row absmax int8 codes + float16 scales (`--compress`)
ENCODINGS = (ENCODING_FP16, ENCODING_INT8)
MAX_DOCUMENT_BYTES = 1 << 20  # a manifest or registration; the federation manifest is ~20 KB


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def parse_document(data: bytes, what: str) -> dict:
    """A JSON object of our format from untrusted bytes; ModelFormatError says what is wrong."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ModelFormatError(f"{what} is {len(data):,} bytes, over the 1 MiB limit", "")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFormatError(f"{what} is not JSON ({exc})", "") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
        raise ModelFormatError(f"{what} is not a format-{FORMAT_VERSION} edgefed document", "")
    return document


def encode_document(document: Mapping) -> bytes:
    return (json.dumps(document, indent=1, sort_keys=True) + "\n").encode("utf-8")


def registration(device: str, key: DeviceKey) -> dict:
    return {
        "format": FORMAT_VERSION,
        "device": device,
        "public_key": key.public_key,
        "registered": now(),
    }


def adapter_manifest(
    *,
    federation: str,
    round_number: int,
    device: str,
    sha256: str,
    size: int,
    base_sha256: str,
    train_tokens: int,
    metrics: Mapping,
    key: DeviceKey,
    encoding: str = ENCODING_FP16,
) -> dict:
    """A signed manifest for one published adapter."""
    body = {
        "format": FORMAT_VERSION,
        "federation": federation,
        "round": round_number,
        "device": device,
        "sha256": sha256,
        "bytes": size,
        "encoding": encoding,
        "base_sha256": base_sha256,
        "train_tokens": int(train_tokens),
        "metrics": dict(metrics),
        "created": now(),
    }
    return body | {"signature": key.sign(body)}


def manifest_signed_by(manifest: Mapping, public_key: str) -> bool:
    """Whether `manifest`'s signature is `public_key`'s over all its other fields."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    signature = manifest.get("signature")
    return isinstance(signature, str) and signature_is_valid(public_key, body, signature)


def federation_manifest(
    *,
    federation_id: str,
    base_info,
    lora,
    warmup_steps: int,
    round_steps: int,
    trust: Mapping,
    reference: bytes | None = None,
) -> dict:
    """The manifest of a new federation over `base_info` with LoRA spec `lora`.

    The adapter size limit is twice the float16 size the LoRA config implies, plus 1 MiB for
    the safetensors header: room for any honest adapter, none for a flood.
    """
    import hashlib
    import math

    from edgefed.adapter import lora_module_shapes, lora_tensor_shapes

    modules = lora_module_shapes(base_info, lora)
    fp16_bytes = sum(2 * math.prod(s) for s in lora_tensor_shapes(modules, lora.rank).values())
    return {
        "format": FORMAT_VERSION,
        "id": federation_id,
        "created": now(),
        "base": {
            "sha256": base_info.fingerprint,
            "architecture": base_info.architecture,
            "name": base_info.name,
            "parameters": base_info.n_params,
        },
        "lora": lora.as_dict(),
        "lora_modules": {m: list(s) for m, s in modules.items()},
        "schedule": {"warmup_steps": warmup_steps, "round_steps": round_steps},
        "trust": dict(trust),
        "reference": None
        if reference is None
        else {"sha256": hashlib.sha256(reference).hexdigest(), "bytes": len(reference)},
        "limits": {"adapter_bytes": 2 * fp16_bytes + (1 << 20)},
    }
