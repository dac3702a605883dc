"""PyTorch layers over a GGUF tensor's own quantized blocks: the frozen base of the `gguf` copy.

`GGUFLinear` keeps its weight as the file's blocks (see `gguf_blocks`) and dequantizes it
inside forward and again inside backward, through an autograd function that saves nothing:
autograd's own `F.linear` would keep every layer's float32 weight alive from the forward to
the backward pass, which is the fp32 copy's memory again. The weight is frozen, so backward
only needs grad_input = grad_output @ W, and W is made again from the blocks.

`GGUFEmbedding` dequantizes only the rows a batch looks up. A tied output head is a
`GGUFLinear` over the very same blocks module as the embedding, so it is held once.

Both subclass their torch.nn counterparts so PEFT and transformers treat them as what they
are. Their `weight` is the packed codes (uint8 or int8): it tells PEFT the device, and
`compute_dtype` tells it that LoRA computes in float32 beside it.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from edgefed.quant.gguf_blocks import dequantize_fields, field_bytes

_SERIALS = itertools.count()


class DequantBuffers:
    """One float32 buffer per layer-sized weight, shared by the layers of a model.

    Every forward and backward makes each layer's float weight again and drops it a moment
    later; a buffer per size spares the allocator that churn (the layers run one after
    another, so a buffer is never needed by two at once). A buffer also remembers whose
    weight it holds: the last layer of each size finds its weight still there when backward
    starts. Weights above `MAX_BUFFERED` values (an output head: 28M on the embedded base) get
    no buffer: kept, one would double the frozen base's memory; the training loss takes the
    head a slice at a time instead (`edgefed.train.loss`).
    """

    MAX_BUFFERED = 1 << 22  # 16 MiB of float32

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}
        self._holder: dict[tuple[int, str], int] = {}

    def weight(self, blocks: GGUFBlocks) -> torch.Tensor:
        numel = blocks.rows * blocks.cols
        if numel > self.MAX_BUFFERED:
            return blocks.dequantize()
        key = (numel, str(blocks.codes.device))
        buffer = self._buffers.get(key)
        if buffer is None:
            with torch.inference_mode(False):  # made while scoring, it must serve training too
                buffer = torch.empty(numel, dtype=torch.float32, device=blocks.codes.device)
            self._buffers[key] = buffer
        elif self._holder.get(key) == blocks.serial:
            return buffer.view(blocks.rows, blocks.cols)
        self._holder.pop(key, None)  # a failed dequantization must not look like a finished one
        weight = blocks.dequantize(out=buffer)
        self._holder[key] = blocks.serial
        return weight


class GGUFBlocks(nn.Module):
    """One GGUF tensor's fields as buffers (moved by .to(), never in a state dict)."""

    def __init__(
        self, type_id: int, fields: dict[str, torch.Tensor], cols: int, buffers: DequantBuffers
    ) -> None:
        super().__init__()
        self.type_id = type_id
        self.serial = next(_SERIALS)  # identifies its weight in DequantBuffers (ids are reused)
        self.cols = cols
        self.buffers_for_weights = buffers
        self.names = tuple(fields)
        self._codes_name = max(fields, key=lambda name: fields[name].numel())
        self.rows = next(iter(fields.values())).shape[0]
        for name, tensor in fields.items():
            self.register_buffer(name, tensor, persistent=False)

    def fields(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.names}

    @property
    def codes(self) -> torch.Tensor:
        """The largest field: the packed codes (the values for a float type)."""
        return getattr(self, self._codes_name)

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize_fields(self.fields(), self.type_id, out)

    def reused_weight(self) -> torch.Tensor:
        """The float weight in the shared buffer of its size: valid until the next layer's."""
        return self.buffers_for_weights.weight(self)

    def dequantize_slice(self, start: int, end: int) -> torch.Tensor:
        """Rows start..end as float32: views of the fields, no copy of the blocks."""
        selected = {name: tensor[start:end] for name, tensor in self.fields().items()}
        return dequantize_fields(selected, self.type_id)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        selected = {name: tensor[rows] for name, tensor in self.fields().items()}
        return dequantize_fields(selected, self.type_id)

    def memory_bytes(self) -> int:
        return field_bytes(self.fields())

    def extra_repr(self) -> str:
        from edgefed.quant.gguf_blocks import type_name

        return f"type={type_name(self.type_id)}, rows={self.rows}"


class _BlocksLinear(torch.autograd.Function):
    """y = x W^T + b with W made from its blocks in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, blocks: GGUFBlocks):
        ctx.blocks = blocks
        # backward runs outside forward's autocast: it takes the same one (bf16 training)
        kind = x.device.type
        ctx.autocast = (
            (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
            if torch.amp.is_autocast_available(kind)
            else (kind, False, None)
        )
        return F.linear(x, blocks.reused_weight(), bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_input = None
        if ctx.needs_input_grad[0]:
            kind, enabled, dtype = ctx.autocast
            if enabled:
                with torch.autocast(kind, dtype=dtype):
                    grad_input = grad_output @ ctx.blocks.reused_weight()
            else:
                grad_input = grad_output @ ctx.blocks.reused_weight()
        return grad_input, None, None


class GGUFLinear(nn.Linear):
    """A frozen linear layer whose weight is a GGUF tensor's blocks (see the module docstring)."""

    compute_dtype = torch.float32

    def __init__(self, blocks: GGUFBlocks, in_features: int, bias: torch.Tensor | None) -> None:
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a float weight
        self.in_features = in_features
        self.out_features = blocks.rows
        self.blocks = blocks
        if bias is None or isinstance(bias, nn.Parameter):
            self.register_parameter("bias", bias)  # a meta bias is filled in when it is read
        else:
            self.bias = nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.blocks.codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BlocksLinear.apply(x, self.bias, self.blocks)


class GGUFEmbedding(nn.Embedding):
    """A frozen embedding whose table is a GGUF tensor's blocks; a lookup dequantizes its rows
    and multiplies them by `scale` (Gemma's sqrt(hidden), which transformers' own scaled
    embedding applies in the float copies)."""

    def __init__(self, blocks: GGUFBlocks, embedding_dim: int, scale: float = 1.0) -> None:
        nn.Module.__init__(self)
        self.scale = scale
        self.num_embeddings = blocks.rows
        self.embedding_dim = embedding_dim
        self.padding_idx = None
        self.max_norm = None
        self.norm_type = 2.0
        self.scale_grad_by_freq = False
        self.sparse = False
        self.blocks = blocks

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.blocks.codes

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        unique, position = torch.unique(flat, return_inverse=True)
        rows = self.blocks.dequantize_rows(unique)
        if self.scale != 1.0:
            rows = rows * self.scale
        return rows[position].reshape(*ids.shape, self.embedding_dim)
