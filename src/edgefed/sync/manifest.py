"""The documents of the federation store: federation manifest, registrations, adapter manifests.

All are JSON objects with a `format` version, checked first. An adapter manifest is signed by
its device: the Ed25519 signature covers the canonical bytes of every other field (see
`edgefed.sync.signing`), and among them the sha256 and size of the adapter blob, so one
signature vouches for the manifest and the blob together.

    federation.json  {"format", "id", "created", "base": {"sha256", "architecture", "name",
                      "parameters"}, "lora": {"rank", "alpha", "dropout", "targets",
                      "init_seed"}, "lora_modules": {module: [in, out]}, "schedule":
                      {"warmup_epochs", "round_epochs", "max_steps" | "warmup_steps",
                      "round_steps", "max_staleness", "wait_seconds"},
                      "trust": {...}, "reference": {"sha256", "bytes"} | null,
                      "limits": {"adapter_bytes"}}
    devices/<d>.json {"format", "device", "public_key" (base64 raw Ed25519), "registered"}
    rounds/<r>/<d>[.v<k>].json
                     {"format", "federation", "round", "device", "version" (absent: 1),
                      "sha256", "bytes", "encoding": "fp16" | "int8", "base_sha256",
                      "train_tokens", "metrics", "created", "signature"}
    departures/<d>.json
                     {"format", "kind": "departure", "federation", "device", "last_round",
                      "left", "signature"}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from edgefed.adapter import LoraSpec
from edgefed.errors import AdapterMismatchError, ConfigError, EdgefedError, ModelFormatError
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
    fix = "it is damaged or was not written by edgefed; ask its writer to publish it again"
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ModelFormatError(f"{what} is {len(data):,} bytes, over the 1 MiB limit", fix)
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFormatError(f"{what} is not JSON ({exc})", fix) from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
        raise ModelFormatError(f"{what} is not a format-{FORMAT_VERSION} edgefed document", fix)
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
    version: int = 1,
) -> dict:
    """A signed manifest for one published adapter; `version` > 1 marks a replacement of a
    damaged or lost publish (a manifest without one is version 1)."""
    body = {
        "format": FORMAT_VERSION,
        "federation": federation,
        "round": round_number,
        "device": device,
        "version": version,
        "sha256": sha256,
        "bytes": size,
        "encoding": encoding,
        "base_sha256": base_sha256,
        "train_tokens": int(train_tokens),
        "metrics": dict(metrics),
        "created": now(),
    }
    return body | {"signature": key.sign(body)}


DEPARTURE_KIND = "departure"


def departure(federation: str, device: str, last_round: int | None, key: DeviceKey) -> dict:
    """A device's signed notice that it left: its peers stop waiting for it (its adapters
    already published stay usable within the staleness window)."""
    body = {
        "format": FORMAT_VERSION,
        "kind": DEPARTURE_KIND,  # signed: no other signed document can pass for a departure
        "federation": federation,
        "device": device,
        "last_round": last_round,
        "left": now(),
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
    schedule: Schedule,
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
        "schedule": schedule.as_dict(),
        "trust": dict(trust),
        "reference": None
        if reference is None
        else {"sha256": hashlib.sha256(reference).hexdigest(), "bytes": len(reference)},
        "limits": {"adapter_bytes": 2 * fp16_bytes + (1 << 20)},
    }


@dataclass(frozen=True)
class RoundTraining:
    """How long one round trains: a number of steps, or epochs of the device's own train split
    with at most `max_steps` steps (None: no cap)."""

    steps: int | None = None
    epochs: float | None = None
    max_steps: int | None = None


@dataclass(frozen=True)
class Schedule:
    """How long each round trains: round 0 the warm-up, then every round the round's amount,
    either in epochs of each device's own train split (capped at `max_steps`, so a device with
    much text trains a bounded time) or, in a federation made so (or before epochs existed),
    in steps; and how many rounds old a peer's adapter may be and still be mixed
    (`max_staleness`: a device aggregating round r mixes each peer's freshest adapter of rounds
    r-max_staleness..r; 0 in a federation made before asynchronous mixing). `wait_seconds` is
    how long a round waits by default for its peers' adapters of the round (0 in a federation
    made before the wait had a default)."""

    warmup_steps: int | None = None
    round_steps: int | None = None
    warmup_epochs: float | None = None
    round_epochs: float | None = None
    max_steps: int | None = None
    max_staleness: int = 0
    wait_seconds: float = 0.0

    def __post_init__(self) -> None:
        # read from a store: a NaN or infinite wait would hold every device for ever
        if not (0 <= self.wait_seconds < math.inf) or self.max_staleness < 0:
            raise ConfigError(
                f"schedule wait {self.wait_seconds:g} s / max staleness {self.max_staleness} "
                "is not a finite number of seconds and a count of rounds",
                "give --wait and --max-staleness of 0 or more",
            )
        in_steps = self.round_steps is not None or self.warmup_steps is not None
        in_epochs = self.round_epochs is not None or self.warmup_epochs is not None
        if in_steps and in_epochs:
            raise ConfigError(
                "the schedule is given both in steps and in epochs",
                "give --epochs/--warmup-epochs, or --round-steps/--warmup-steps",
            )
        amounts = (self.warmup_steps, self.round_steps)
        epochs = (self.warmup_epochs, self.round_epochs)
        if (
            any(n is not None and n < 0 for n in amounts)
            or any(e is not None and not (0 <= e < math.inf) for e in epochs)
            or (self.max_steps is not None and self.max_steps < 1)
        ):
            raise ConfigError(
                f"schedule steps {amounts} / epochs {epochs} / max steps {self.max_steps} "
                "are not all finite and positive",
                "give positive --epochs, --warmup-epochs, --max-steps or step counts",
            )
        if not ((self.round_steps or 0) >= 1 or (self.round_epochs or 0) > 0):
            raise ConfigError(
                "the schedule trains nothing in a round",
                "give a positive --epochs (or --round-steps)",
            )

    def training_of(self, round_number: int) -> RoundTraining:
        if self.round_epochs is not None:
            warmup = self.warmup_epochs
            epochs = warmup if round_number == 0 and warmup else self.round_epochs
            return RoundTraining(epochs=epochs, max_steps=self.max_steps)
        warmup_steps = self.warmup_steps or 0
        steps = warmup_steps if round_number == 0 and warmup_steps > 0 else self.round_steps
        return RoundTraining(steps=steps)

    def as_dict(self) -> dict:
        """The manifest's "schedule": the fields in use."""
        if self.round_epochs is not None:
            amounts = {
                "warmup_epochs": self.warmup_epochs or 0.0,
                "round_epochs": self.round_epochs,
                "max_steps": self.max_steps,
            }
        else:
            amounts = {"warmup_steps": self.warmup_steps or 0, "round_steps": self.round_steps}
        return amounts | {"max_staleness": self.max_staleness, "wait_seconds": self.wait_seconds}

    @classmethod
    def from_dict(cls, schedule: Mapping) -> Schedule:
        def number(key: str, kind):
            value = schedule.get(key)
            return None if value is None else kind(value)

        return cls(
            warmup_steps=number("warmup_steps", int),
            round_steps=number("round_steps", int),
            warmup_epochs=number("warmup_epochs", float),
            round_epochs=number("round_epochs", float),
            max_steps=number("max_steps", int),
            max_staleness=int(schedule.get("max_staleness", 0)),
            wait_seconds=float(schedule.get("wait_seconds", 0.0)),
        )


@dataclass(frozen=True)
class Federation:
    """The federation manifest as read: typed, and checked once, here.

    `document` is the manifest exactly as the store holds it: a device pins it, and the store
    keeps it byte for byte; everything edgefed reads from it goes through the fields.
    """

    id: str
    base_sha256: str
    base_name: str | None
    base_architecture: str
    lora: LoraSpec
    lora_modules: dict[str, tuple[int, ...]]
    schedule: Schedule
    trust_default: dict  # the devices' default {"scheme", "temperature"? | "se_temperature"?}
    reference_sha256: str | None
    adapter_bytes_limit: int
    document: dict

    @classmethod
    def from_document(cls, document: Mapping, what: str = "the federation manifest") -> Federation:
        """ModelFormatError when a field is missing or of the wrong kind."""
        try:
            if document.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {document.get('format')!r}")
            base, schedule = document["base"], document["schedule"]
            return cls(
                id=str(document["id"]),
                base_sha256=str(base["sha256"]),
                base_name=base.get("name"),
                base_architecture=str(base["architecture"]),
                lora=LoraSpec.from_dict(document["lora"]),
                lora_modules={
                    m: tuple(int(n) for n in s) for m, s in document["lora_modules"].items()
                },
                schedule=Schedule.from_dict(schedule),
                trust_default=dict(document.get("trust") or {}),
                reference_sha256=(document.get("reference") or {}).get("sha256"),
                adapter_bytes_limit=int(document["limits"]["adapter_bytes"]),
                document=dict(document),
            )
        except (KeyError, TypeError, ValueError, AttributeError, EdgefedError) as exc:
            raise ModelFormatError(
                f"{what} is not a usable format-{FORMAT_VERSION} federation manifest ({exc})",
                "the store's federation.json is damaged; ask the federation's creator",
            ) from exc

    def check_base(self, info, fix: str) -> None:
        """AdapterMismatchError unless `info` (a BaseInfo) is this federation's base."""
        if info.fingerprint != self.base_sha256:
            raise AdapterMismatchError(
                f"this base ({info.path.name}, sha256 {info.fingerprint[:12]}) is not the "
                f"federation's: {self.base_name or self.base_architecture}, sha256 "
                f"{self.base_sha256[:12]}",
                fix,
            )
