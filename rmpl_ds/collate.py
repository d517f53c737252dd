"""Batching encoded examples: padding with attention masks and a dummy image for text-only micro-batches.

The encoded examples come from :meth:`rmpl_ds.backbones.adapter.BackboneAdapter.encode`. :class:`Collator` is a
DataLoader ``collate_fn``; it returns the model's keyword arguments plus ``stats`` (a :class:`BatchStats`), which
carries what the workers know about the batch (real tokens, target tokens, truncations) back to the training
loop. ``model(**model_inputs(batch))`` runs the forward pass.

Why a dummy image: under ZeRO every rank must run the same collectives each step. A rank whose micro-batch has no
image would skip the vision tower while the others run it, and the gradient reductions of its parameters would
wait forever. So a text-only micro-batch gets one minimal image appended to its shortest row, with attention
mask 0 and no labels: the tower runs, its gradients are exactly zero, the loss and the real tokens' outputs are
unchanged.

Micro-batches are the slot stream's contiguous slots, padded to their longest row (never to ``max_seq_len``): 0.83 to
0.85 real tokens on the demo mixture. No packing (several examples in one row need per-example attention blocks,
varlen flash attention, which SDPA on the CPU does not give) and no length grouping: sorting by length inside
windows would reach 0.98 but mixes the sampler's per-step ratios and gathers text-only samples into micro-batches
that then carry the dummy image (bench/bench_padding.py measures both).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from rmpl_ds.constants import IGNORE_INDEX

# Per-token sequences and what pads them (input_ids pads with the tokenizer's pad id).
SEQUENCE_PAD_VALUES: dict[str, int] = {"attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}
SEQUENCE_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")
# Per-image tensors, concatenated along their first dimension in example order.
IMAGE_KEYS: tuple[str, ...] = ("pixel_values", "image_grid_thw")
STATS_KEY = "stats"


@dataclass(frozen=True)
class BatchStats:
    """What a batch holds, counted in the worker that built it.

    Attributes:
        examples: rows in the batch.
        real_tokens: tokens with attention mask 1 (the dummy image's tokens are not real).
        slots: rows × columns, i.e. real tokens + padding (+ dummy image tokens).
        target_tokens: labelled tokens (the loss's denominator).
        truncated_examples: examples whose target lost its tail to ``max_seq_len``.
        target_tokens_dropped: target tokens those truncations removed.
        images: real images in the batch.
        dummy_image: whether a dummy image was appended (text-only micro-batch).
    """

    examples: int
    real_tokens: int
    slots: int
    target_tokens: int
    truncated_examples: int
    target_tokens_dropped: int
    images: int
    dummy_image: bool

    @property
    def real_fraction(self) -> float:
        """Real tokens / slots: 1.0 means no padding."""
        return self.real_tokens / self.slots if self.slots else 1.0


class Collator:
    """Pads encoded examples into a batch (a DataLoader ``collate_fn``).

    Args:
        pad_token_id: the tokenizer's padding id.
        padding_side: ``right`` for training, ``left`` for batched generation.
        pad_to_multiple_of: round the batch length up to a multiple (e.g. 8 for tensor cores).
        dummy_image: an encoded image fragment (``BackboneAdapter.dummy_image_inputs``) appended, masked and
            unlabelled, to a micro-batch without images; ``None`` disables it (generation, text-only models).
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        padding_side: Literal["right", "left"] = "right",
        pad_to_multiple_of: int | None = None,
        dummy_image: Mapping[str, Any] | None = None,
    ) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if padding_side == "left" and dummy_image is not None:
            raise ValueError("the dummy image goes after a row's real tokens, which needs right padding")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.dummy_image = dummy_image

    def __call__(self, encoded: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Batch ``encoded`` (same sequence keys in every example) into padded tensors plus ``stats``."""
        if not encoded:
            raise ValueError("cannot collate an empty batch")
        sequence_keys = [key for key in SEQUENCE_KEYS if key in encoded[0]]
        missing = [key for key in sequence_keys for example in encoded if key not in example]
        if missing:
            raise ValueError(f"examples disagree on their sequence keys (missing {sorted(set(missing))})")
        rows: list[dict[str, torch.Tensor]] = [{key: example[key] for key in sequence_keys} for example in encoded]
        real_tokens = sum(int(row["attention_mask"].sum()) for row in rows)
        n_images = sum(len(example.get("image_tokens", ())) for example in encoded)

        image_sources: list[Mapping[str, Any]] = [example for example in encoded if "pixel_values" in example]
        use_dummy = not image_sources and self.dummy_image is not None
        if use_dummy:
            dummy = self.dummy_image
            shortest = min(range(len(rows)), key=lambda index: len(rows[index]["input_ids"]))
            rows[shortest] = _append_masked(rows[shortest], dummy)
            image_sources = [dummy]

        length = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, Any] = {}
        for key in sequence_keys:
            pad_value = self.pad_token_id if key == "input_ids" else SEQUENCE_PAD_VALUES[key]
            batch[key] = torch.stack([self._pad(row[key], length, pad_value) for row in rows])
        for key in IMAGE_KEYS:
            parts = [source[key] for source in image_sources if key in source]
            if parts:
                batch[key] = torch.cat(parts, dim=0)
        batch[STATS_KEY] = BatchStats(
            examples=len(rows),
            real_tokens=real_tokens,
            slots=len(rows) * length,
            target_tokens=sum(int(example.get("n_target_tokens", 0)) for example in encoded),
            truncated_examples=sum(1 for example in encoded if example.get("truncated")),
            target_tokens_dropped=sum(int(example.get("n_target_tokens_dropped", 0)) for example in encoded),
            images=n_images,
            dummy_image=use_dummy,
        )
        return batch

    def _pad(self, values: torch.Tensor, length: int, pad_value: int) -> torch.Tensor:
        padding = torch.full((length - len(values),), pad_value, dtype=values.dtype)
        parts = (values, padding) if self.padding_side == "right" else (padding, values)
        return torch.cat(parts)


def model_inputs(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model's keyword arguments of a collated batch (everything but ``stats``)."""
    return {key: value for key, value in batch.items() if key != STATS_KEY}


def _append_masked(row: dict[str, torch.Tensor], fragment: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``row`` followed by ``fragment``'s tokens, unattended and unlabelled."""
    ids = fragment["input_ids"]
    extended = dict(row)
    extended["input_ids"] = torch.cat([row["input_ids"], ids])
    extended["attention_mask"] = torch.cat([row["attention_mask"], torch.zeros_like(ids)])
    if "labels" in row:
        extended["labels"] = torch.cat([row["labels"], torch.full_like(ids, IGNORE_INDEX)])
    if "mm_token_type_ids" in row:
        extended["mm_token_type_ids"] = torch.cat([row["mm_token_type_ids"], fragment["mm_token_type_ids"]])
    return extended
