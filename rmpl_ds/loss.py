"""The training loss: per-sample token-mean cross entropy on the target tokens, weighted per sample by its stream.

Two paths compute the same numbers (tests/test_loss.py holds them equal, losses and every trainable gradient):

* ``target_only`` (the default): the language-model head projects only the positions whose next token is a
  target. In every RMPL task the answer is tens to about a hundred tokens after a prompt of hundreds (324 of them
  image tokens), so the ``[tokens, vocab]`` logits, their fp32 upcast and the saved log-softmax, the largest
  activation of a step (5.8 GiB at 2048 tokens x micro-batch 2 with Qwen2-VL's 152,064-entry vocabulary), shrink
  to the target rows. It uses transformers' own ``logits_to_keep`` with a boolean ``[batch, seq]`` mask (the
  model gathers the kept hidden states before ``lm_head``; no model code is copied or patched).
* ``full_logits`` (the reference): logits for every position, as a plain HF forward computes them.

The micro-batch loss is ``sum_i w_i * L_i / B`` with ``L_i`` the token-mean loss of sample ``i``: with the sampler's
exact ratios this is the paper's α:β:λ mixture of the per-task losses (and ``L_EM + L_AR`` in Stage II), whatever
the sequence lengths.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.nn import functional as F  # noqa: N812  (the conventional name)

from rmpl_ds.constants import IGNORE_INDEX

LossPath = Literal["target_only", "full_logits"]
LOSS_PATHS: tuple[str, ...] = ("target_only", "full_logits")


@dataclass
class LossParts:
    """A micro-batch's loss and what the logs need: per-sample losses and target-token counts."""

    loss: torch.Tensor  # scalar, what backward sees
    sample_losses: torch.Tensor  # (B,) token-mean loss of each sample, fp32, detached
    target_tokens: torch.Tensor  # (B,) number of target tokens of each sample


def forward_loss(
    model: Any,
    inputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    loss_weights: torch.Tensor,
    *,
    path: LossPath = "target_only",
) -> LossParts:
    """Run ``model`` (an HF model, its PEFT wrapper or a DeepSpeed engine around either) on ``inputs`` and return
    the weighted per-stream loss of ``labels`` by ``path`` (see the module docstring)."""
    if path == "full_logits":
        outputs = model(**inputs, use_cache=False)
        return stream_loss(outputs.logits, labels, loss_weights)
    if path != "target_only":
        raise ValueError(f"unknown loss path {path!r}; expected one of {list(LOSS_PATHS)}")
    device = inputs["input_ids"].device
    labels = labels.to(device)
    keep = target_mask(labels)
    outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
    return target_stream_loss(outputs.logits, labels, keep, loss_weights)


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, T]``: position ``t`` is kept when it predicts a target, i.e. ``labels[:, t + 1]`` is labelled.

    A micro-batch without any target (every target truncated away) keeps position ``[0, 0]`` anyway, so that the
    loss stays connected to the graph (its contribution is 0 and so are its gradients): every rank must still
    back-propagate, as the full path does.
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    if not keep.any():
        keep[0, 0] = True
    return keep


def target_stream_loss(
    target_logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, loss_weights: torch.Tensor
) -> LossParts:
    """:func:`stream_loss` from the logits of the kept positions only.

    Args:
        target_logits: ``[N, V]`` (or ``[1, N, V]``), the logits of the ``N`` True positions of ``keep`` in
            row-major order, as ``logits_to_keep=keep`` returns them.
        labels: ``[B, T]`` labels of the micro-batch.
        keep: the :func:`target_mask` of ``labels``.
        loss_weights: ``[B]`` per-sample loss weights.
    """
    target_logits = target_logits.reshape(-1, target_logits.size(-1)).float()
    next_labels = torch.full_like(labels, IGNORE_INDEX)
    next_labels[:, :-1] = labels[:, 1:]
    targets = next_labels[keep]
    rows = keep.nonzero(as_tuple=True)[0]
    if target_logits.size(0) != targets.numel():
        raise ValueError(
            f"{target_logits.size(0)} logit rows for {targets.numel()} kept positions: the model ignored "
            "logits_to_keep (transformers >= 5.21 slices the hidden states with a boolean mask)"
        )
    token_loss = F.cross_entropy(target_logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    batch = labels.size(0)
    sums = torch.zeros(batch, dtype=token_loss.dtype, device=token_loss.device).index_add(0, rows, token_loss)
    counts = (next_labels != IGNORE_INDEX).sum(dim=1)
    return _weighted(sums, counts, loss_weights)


def stream_loss(logits: torch.Tensor, labels: torch.Tensor, loss_weights: torch.Tensor) -> LossParts:
    """Per-sample token-mean cross entropy on the target tokens, from ``[B, T, V]`` logits of every position (the
    ``full_logits`` reference), weighted per sample by its stream's loss weight."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return _weighted(token_loss.sum(dim=1), counts, loss_weights)


def _weighted(sums: torch.Tensor, counts: torch.Tensor, loss_weights: torch.Tensor) -> LossParts:
    per_sample = sums / counts.clamp(min=1)
    weights = loss_weights.to(per_sample.device, per_sample.dtype)
    loss = (per_sample * weights).sum() / per_sample.numel()
    return LossParts(loss=loss, sample_losses=per_sample.detach(), target_tokens=counts.detach())
