"""Collation: padding and masks, the dummy image of text-only micro-batches, length grouping, and the real-token
fraction measured on the demo mixture."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rmpl_ds.backbones import get_adapter
from rmpl_ds.backbones.base import IGNORE_INDEX
from rmpl_ds.collate import Collator, length_grouped_batches, model_inputs, real_token_fraction

PAD = 0


def _encoded(length: int, *, n_target: int = 2, image: bool = False, token: int = 7, **extra: Any) -> dict[str, Any]:
    ids = torch.full((length,), token, dtype=torch.long)
    labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
    labels[length - n_target :] = token
    encoded: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "mm_token_type_ids": torch.zeros(length, dtype=torch.int32),
        "image_tokens": (4,) if image else (),
        "n_target_tokens": n_target,
        "n_target_tokens_dropped": 0,
        "truncated": False,
        "length": length,
        "key": f"k{length}",
    }
    if image:
        encoded["pixel_values"] = torch.full((16, 6), float(length))
        encoded["image_grid_thw"] = torch.tensor([[1, 4, 4]])
        encoded["mm_token_type_ids"][:4] = 1
    encoded.update(extra)
    return encoded


DUMMY = {
    "input_ids": torch.tensor([91, 92, 92, 93]),
    "mm_token_type_ids": torch.tensor([0, 1, 1, 0], dtype=torch.int32),
    "pixel_values": torch.zeros(8, 6),
    "image_grid_thw": torch.tensor([[1, 2, 4]]),
}


def test_right_padding_masks_and_labels() -> None:
    batch = Collator(PAD)([_encoded(5, image=True), _encoded(3), _encoded(4, image=True, token=8)])
    assert batch["input_ids"].shape == (3, 5)
    assert batch["input_ids"][1].tolist() == [7, 7, 7, PAD, PAD]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 7, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["mm_token_type_ids"][2].tolist() == [1, 1, 1, 1, 0]
    # pixels of the image examples, concatenated in example order
    assert batch["pixel_values"].shape == (32, 6)
    assert batch["pixel_values"][:16].eq(5.0).all() and batch["pixel_values"][16:].eq(4.0).all()
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    stats = batch["stats"]
    assert (stats.examples, stats.real_tokens, stats.slots, stats.target_tokens, stats.images) == (3, 12, 15, 6, 2)
    assert stats.real_fraction == pytest.approx(12 / 15)
    assert not stats.dummy_image
    assert set(model_inputs(batch)) == {
        "input_ids",
        "attention_mask",
        "labels",
        "mm_token_type_ids",
        "pixel_values",
        "image_grid_thw",
    }


def test_left_padding_and_multiple_of() -> None:
    batch = Collator(PAD, padding_side="left", pad_to_multiple_of=4)([_encoded(5), _encoded(2)])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][1].tolist() == [0] * 6 + [1, 1]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 3 + [IGNORE_INDEX] * 3 + [7, 7]


def test_dummy_image_goes_to_the_shortest_row_of_a_text_only_batch() -> None:
    collator = Collator(PAD, dummy_image=DUMMY)
    batch = collator([_encoded(6), _encoded(3), _encoded(5)])
    stats = batch["stats"]
    assert stats.dummy_image and stats.images == 0 and stats.real_tokens == 14
    assert batch["input_ids"].shape == (3, 7)
    assert batch["input_ids"][1].tolist() == [7, 7, 7, 91, 92, 92, 93]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert batch["labels"][1, 3:].eq(IGNORE_INDEX).all()
    assert batch["mm_token_type_ids"][1].tolist() == [0, 0, 0, 0, 1, 1, 0]
    assert torch.equal(batch["pixel_values"], DUMMY["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], DUMMY["image_grid_thw"])
    # a batch with a real image gets no dummy
    with_image = collator([_encoded(6), _encoded(3, image=True)])
    assert not with_image["stats"].dummy_image and with_image["pixel_values"].shape == (16, 6)


def test_truncation_counts_reach_the_batch() -> None:
    batch = Collator(PAD)([_encoded(4, truncated=True, n_target_tokens_dropped=5), _encoded(4)])
    assert batch["stats"].truncated_examples == 1
    assert batch["stats"].target_tokens_dropped == 5


def test_inconsistent_examples_are_refused() -> None:
    text_only = _encoded(3)
    del text_only["labels"]
    with pytest.raises(ValueError, match="disagree on their sequence keys"):
        Collator(PAD)([_encoded(3), text_only])
    with pytest.raises(ValueError, match="needs right padding"):
        Collator(PAD, padding_side="left", dummy_image=DUMMY)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=200),
    batch_size=st.integers(min_value=1, max_value=8),
    group_batches=st.integers(min_value=1, max_value=6),
    seed=st.integers(min_value=0, max_value=3),
)
def test_length_grouping_is_a_windowed_permutation(
    lengths: list[int], batch_size: int, group_batches: int, seed: int
) -> None:
    batches = length_grouped_batches(lengths, batch_size, group_batches=group_batches, seed=seed)
    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert sum(1 for batch in batches if len(batch) != batch_size) <= 1  # only the last window's remainder
    window = batch_size * group_batches
    for batch in batches:
        assert len({index // window for index in batch}) == 1  # never mixes windows
    assert batches == length_grouped_batches(lengths, batch_size, group_batches=group_batches, seed=seed)
    if len(lengths) % batch_size == 0:
        # all batches full: sorting inside a window minimizes the sum of batch maxima, so padding never grows
        contiguous = [list(range(start, start + batch_size)) for start in range(0, len(lengths), batch_size)]
        assert real_token_fraction(lengths, batches) >= real_token_fraction(lengths, contiguous) - 1e-9


def _demo_lengths(tiny_dir: Path, demo_dir: Path) -> dict[str, list[int]]:
    """Encoded lengths of the demo recipe's two stage mixtures (launch/recipes/demo.yaml): demo data in its raw
    formats -> the real converters -> tasks.render -> the tiny Qwen2-VL's encode (max_image_tokens 64,
    max_seq_len 768), sampled round-robin over each stage's streams (equal weights)."""
    from rmpl_ds import records, tasks
    from rmpl_ds.data import choose_event_type
    from rmpl_ds.images import load_image
    from rmpl_ds.sources import SOURCES, find_image
    from rmpl_ds.sources.demo import write_demo

    write_demo(demo_dir, size=30)
    converted = {
        "ace": SOURCES["ace"](demo_dir / "ace").records,
        "swig": SOURCES["swig"](demo_dir / "swig/SWiG_jsons", images_dir=demo_dir / "swig/images_512").records,
        "mnre": SOURCES["mnre"](demo_dir / "mnre/mnre_txt", images_dir=demo_dir / "mnre/img_org").records,
    }
    image_dirs = {"swig": demo_dir / "swig/images_512", "mnre": demo_dir / "mnre/img_org"}
    bundle = get_adapter("qwen2-vl").load_processor(tiny_dir, max_image_tokens=64)
    stages = {
        "stage1": [("ace", "t"), ("swig", "i"), ("mnre", "r")],
        "stage2": [("ace", "EM"), ("swig", "EM"), ("ace", "AR"), ("swig", "AR")],
    }
    rng = np.random.default_rng(0)
    lengths: dict[str, list[int]] = {}
    for stage, streams in stages.items():
        lengths[stage] = []
        for slot in range(96):
            source, task = streams[slot % len(streams)]
            record = converted[source][int(rng.integers(len(converted[source])))]
            image = None
            if not isinstance(record, records.TextSentence):
                image = load_image(find_image(image_dirs[source], record.image, record.split))
            event_type = choose_event_type(record, rng) if task == "AR" else None
            example = tasks.render(record, task, image=image, event_type=event_type)
            lengths[stage].append(bundle.encode(example, max_seq_len=768)["length"])
    return lengths


def test_real_token_fraction_on_the_demo_mixture(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    lengths = _demo_lengths(tiny_model_dir("qwen2-vl"), tmp_path / "demo")
    micro = 4  # the demo recipe's micro batch
    for stage_lengths in lengths.values():
        grouped = length_grouped_batches(stage_lengths, micro, group_batches=4, seed=0)
        assert real_token_fraction(stage_lengths, grouped) >= 0.9
    # shuffled arrival order (what a sampler without grouping gives) is measurably worse on stage 1
    shuffled = list(lengths["stage1"])
    random.Random(0).shuffle(shuffled)
    contiguous = [list(range(start, start + micro)) for start in range(0, len(shuffled), micro)]
    grouped = length_grouped_batches(shuffled, micro, group_batches=4, seed=0)
    assert real_token_fraction(shuffled, grouped) > real_token_fraction(shuffled, contiguous)
