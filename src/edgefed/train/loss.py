"""The training loss, computed over the vocabulary a slice of the output head at a time.

A causal LM's loss needs, for every position, logits over the whole vocabulary: at 4 x 256
tokens on a 49k vocabulary that is a 200 MB logits tensor, and transformers' loss keeps as
much again for its backward (log-softmax) and makes two more in it (their gradients). With a
frozen head whose weight is quantized (the gguf copy), the float head itself (108 MiB on the
embedded base, 1.5 GB for a 128k x 3072 head) would also have to exist while the loss runs.

Here the head is taken `VOCAB_SLICE` rows at a time, for all positions at once, with the
softmax kept online as flash attention keeps it: a running maximum and sum per position, and
the hidden-state gradient accumulated as the softmax-weighted sum of the head's rows,
rescaled when the maximum moves. One pass over the head gives the loss and its gradient with
respect to the hidden states (made in forward: the loss is a scalar, so backward only brings
a factor); no logits outlive their slice, no float head exists, no matmul is added, and a
quantized head is dequantized once per step. The result is transformers' loss up to float
summation order, and the same gradient (tested).

Gemma 2 soft-caps its logits (z = cap * tanh(logit / cap)) before the softmax; the slices do
the same, and the gradient carries the cap's slope (1 - tanh^2) per logit.

A head that is not a plain frozen projection (a LoRA on `lm_head`) is left to transformers'
own loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # transformers' ignore_index: padding and the last position's target
# rows of the head per slice: 8 MB of logits at 1,024 positions, 4.5 MB of float head on a
# 576-wide model
VOCAB_SLICE = 2048


def _head_rows(head: torch.nn.Module):
    """A function (start, end) -> the head's float rows, without making the whole matrix."""
    from edgefed.quant.gguf_layers import GGUFLinear

    if type(head) is GGUFLinear:
        return head.blocks.dequantize_slice
    if type(head) is torch.nn.Linear:
        return lambda start, end: head.weight[start:end]
    return None


def _online_cross_entropy(hidden, head, rows_of, targets, vocab_slice, want_grad, softcap=None):
    """Per position -log softmax(hidden @ W^T + b)[target] (0 where IGNORE), and with
    `want_grad` its gradient with respect to `hidden`; see the module docstring."""
    n = hidden.shape[0]
    vocab = head.out_features
    bias = head.bias
    # the softmax's sums in float32 even when autocast makes the logits in bfloat16
    running_max = hidden.new_full((n,), float("-inf"), dtype=torch.float32)
    running_sum = hidden.new_zeros(n, dtype=torch.float32)
    chosen = hidden.new_zeros(n, dtype=torch.float32)
    weighted = torch.zeros_like(hidden, dtype=torch.float32) if want_grad else None
    target_rows = torch.zeros_like(hidden, dtype=torch.float32) if want_grad else None
    # the target's own unnormalised probability, kept out of `weighted`: the gradient's
    # (p_t - 1) W_t then never comes from a difference of two near-equal products, which
    # bfloat16 matmuls (--bf16) would round away for a confident token
    target_mass = hidden.new_zeros(n, dtype=torch.float32) if want_grad else None
    valid = targets != IGNORE
    for start in range(0, vocab, vocab_slice):
        end = min(start + vocab_slice, vocab)
        rows = rows_of(start, end)
        logits = F.linear(hidden, rows, bias[start:end] if bias is not None else None).float()
        slope = None
        if softcap:
            logits = torch.tanh(logits.div_(softcap))
            slope = 1.0 - logits.square() if want_grad else None
            logits.mul_(softcap)
        inside = valid & (targets >= start) & (targets < end)
        has_targets = bool(inside.any())
        if has_targets:
            where = inside.nonzero()[:, 0]
            local = targets[where] - start
            chosen[where] = logits[where, local]
            if want_grad:
                target_rows[where] = rows[local].float()
                if slope is not None:
                    target_rows[where] *= slope[where, local][:, None]
        new_max = torch.maximum(running_max, logits.max(dim=1).values)
        rescale = torch.exp(running_max - new_max)
        probs = logits.sub_(new_max[:, None]).exp_()
        running_sum.mul_(rescale).add_(probs.sum(dim=1))
        if want_grad:
            target_mass.mul_(rescale)
            if has_targets:
                target_mass[where] = probs[where, local]
                probs[where, local] = 0.0
            if slope is not None:
                probs.mul_(slope)
            weighted.mul_(rescale[:, None]).add_(probs @ rows)
        running_max = new_max
    log_norm = running_max + running_sum.log()
    nll = torch.where(valid, log_norm - chosen, 0.0)
    grad = None
    if want_grad:
        # sum_v p_v W_v - W_t, with the target's term as (p_t - 1) W_t (each W_v times the
        # soft-cap's slope at its logit, when there is one)
        grad = weighted.div_(running_sum[:, None])
        grad.add_(target_rows * (target_mass / running_sum - 1.0)[:, None])
        grad.mul_(valid[:, None])
    return nll, grad


class _OnlineCrossEntropy(torch.autograd.Function):
    """Sum over positions of -log softmax(hidden @ W^T + b)[target]; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, head, rows_of, targets, vocab_slice, want_grad, softcap):
        nll, grad = _online_cross_entropy(
            hidden, head, rows_of, targets, vocab_slice, want_grad, softcap
        )
        ctx.save_for_backward(grad)
        return nll.sum()

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total if grad is not None else None), *(None,) * 6


def causal_lm_loss(model, input_ids, attention_mask, labels, vocab_slice: int = VOCAB_SLICE):
    """Mean next-token cross-entropy of a (PEFT-wrapped) causal LM, as transformers defines it:
    position t predicts labels[t + 1], IGNORE labels do not count."""
    language_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = language_model.lm_head
    rows_of = _head_rows(head)
    if rows_of is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    hidden = language_model.model(
        input_ids=input_ids, attention_mask=attention_mask
    ).last_hidden_state
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    count = (targets != IGNORE).sum()
    flat = hidden.reshape(-1, hidden.shape[-1])
    want_grad = torch.is_grad_enabled() and flat.requires_grad
    softcap = getattr(language_model.config, "final_logit_softcapping", None)
    total = _OnlineCrossEntropy.apply(flat, head, rows_of, targets, vocab_slice, want_grad, softcap)
    return total / count.clamp(min=1)


def token_nlls(model, tokens, *, window: int, batch_size: int, vocab_slice: int = VOCAB_SLICE):
    """Each token's NLL (float64 numpy, text order; the first token has no context and is not
    scored) under a (PEFT-wrapped) causal LM, with dropout off and no gradient.

    The text is cut into windows of `window` tokens that overlap by one (each token is
    predicted once, from the start of its window), scored `batch_size` windows at a time: a
    training copy that dequantizes its weights per forward pays that once per batch, as a
    training step does, and no full-vocabulary logits are made (the sliced head above). Used to
    score held-out tokens during training (`edgefed.train.stopping`)."""
    import numpy as np

    language_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = language_model.lm_head
    rows_of = _head_rows(head) or (lambda start, end: head.weight[start:end])
    softcap = getattr(language_model.config, "final_logit_softcapping", None)
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    body = window - 1
    starts = list(range(0, max(1, len(ids) - 1), body))
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for first in range(0, len(starts), batch_size):
                chunks = [ids[s : s + window] for s in starts[first : first + batch_size]]
                width = max(len(c) for c in chunks)
                batch = torch.zeros((len(chunks), width), dtype=torch.int64)
                mask = torch.zeros_like(batch)
                targets = torch.full_like(batch, IGNORE)
                for row, chunk in enumerate(chunks):
                    batch[row, : len(chunk)] = chunk
                    mask[row, : len(chunk)] = 1
                    targets[row, : len(chunk) - 1] = chunk[1:]
                hidden = language_model.model(
                    input_ids=batch.to(device), attention_mask=mask.to(device)
                ).last_hidden_state
                flat_targets = targets.reshape(-1).to(device)
                nll, _ = _online_cross_entropy(
                    hidden.reshape(-1, hidden.shape[-1]), head, rows_of, flat_targets,
                    vocab_slice, False, softcap,
                )  # fmt: skip
                nll = nll.reshape(len(chunks), width)
                for row, chunk in enumerate(chunks):
                    out.append(nll[row, : len(chunk) - 1].double().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out)
