"""Encoding Examples with the tiny variants' tokenizers and image processors (no model weights are loaded):
chat format, label masking, image-token expansion, truncation accounting, generation prompts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from rmpl_ds import ontology
from rmpl_ds.backbones import FAMILIES, get_adapter
from rmpl_ds.backbones.adapter import ProcessorBundle, SequenceTooLongError
from rmpl_ds.backbones.tiny import build_tiny
from rmpl_ds.constants import IGNORE_INDEX
from rmpl_ds.errors import UserError
from rmpl_ds.example import Example

# A 512×512 image (after the protocol resize) is 16 tokens in every tiny variant (112/128-px caps).
TINY_TOKENS_PER_IMAGE = 16
TARGET = "Conflict:Attack | attacked | Attacker: rebels ; Target: village"


def _image(width: int = 400, height: int = 300, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _example(n_images: int = 1, prompt: str = "What happens here?", target: str = TARGET) -> Example:
    return Example(
        task="i" if n_images else "t",
        system="Extract events. Types: Conflict:Attack (Attacker, Target).",
        prompt=prompt,
        target=target,
        images=tuple(_image(seed=index) for index in range(n_images)),
        source="unit",
        key=f"example-{n_images}",
    )


@pytest.fixture(params=sorted(FAMILIES))
def bundle(request: pytest.FixtureRequest, tiny_model_dir: Callable[[str], Path]) -> ProcessorBundle:
    return get_adapter(request.param).load_processor(tiny_model_dir(request.param))


def test_chat_format_has_the_family_shape(bundle: ProcessorBundle) -> None:
    rendered = bundle.adapter.render(bundle, _example(), with_target=True)
    image = (
        "<IMG_CONTEXT>\n" if bundle.adapter.family == "internvl3_5" else "<|vision_start|><|image_pad|><|vision_end|>"
    )
    assert rendered == (
        "<|im_start|>system\nExtract events. Types: Conflict:Attack (Attacker, Target).<|im_end|>\n"
        f"<|im_start|>user\n{image}What happens here?<|im_end|>\n"
        f"<|im_start|>assistant\n{TARGET}<|im_end|>\n"
    )
    # the tiny checkpoint carries the same template, so tools that read the tokenizer's own template agree
    assert bundle.tokenizer.chat_template == bundle.spec.chat_template


def test_labels_cover_exactly_the_target_and_its_end_of_turn(bundle: ProcessorBundle) -> None:
    encoded = bundle.encode(_example(), max_seq_len=1024)
    ids, labels = encoded["input_ids"], encoded["labels"]
    labelled = labels != IGNORE_INDEX
    assert bundle.tokenizer.decode(ids[labelled]) == TARGET + "<|im_end|>"
    # one contiguous labelled span, followed only by the template's newline; labels equal the ids there
    positions = labelled.nonzero().flatten().tolist()
    assert positions == list(range(positions[0], positions[-1] + 1))
    assert bundle.tokenizer.decode(ids[positions[-1] + 1 :]) == "\n"
    assert (labels[labelled] == ids[labelled]).all()
    assert bundle.tokenizer.decode(ids[: positions[0]]).endswith("<|im_start|>assistant\n")
    assert encoded["n_target_tokens"] == int(labelled.sum())
    assert encoded["attention_mask"].tolist() == [1] * len(ids)
    assert encoded["length"] == len(ids) and not encoded["truncated"]


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_image_placeholders_expand_to_the_processor_count(bundle: ProcessorBundle, n_images: int) -> None:
    encoded = bundle.encode(_example(n_images), max_seq_len=1024)
    ids = encoded["input_ids"]
    special = bundle.special
    per_image = bundle.image_token_count(512, 512)
    assert per_image == TINY_TOKENS_PER_IMAGE
    assert encoded["image_tokens"] == (per_image,) * n_images
    assert int((ids == special.image).sum()) == per_image * n_images
    # every image is one contiguous span: start marker, the image tokens, end marker
    starts = (ids == special.image_start).nonzero().flatten().tolist()
    assert len(starts) == n_images
    for start in starts:
        assert (ids[start + 1 : start + 1 + per_image] == special.image).all()
        assert int(ids[start + 1 + per_image]) == special.image_end
    if n_images == 0:
        assert "pixel_values" not in encoded
    elif bundle.adapter.family == "internvl3_5":
        assert tuple(encoded["pixel_values"].shape) == (n_images, 3, 112, 112)
    else:
        grid = encoded["image_grid_thw"]
        assert grid.shape == (n_images, 3)
        assert (grid.prod(-1) // 4).tolist() == [per_image] * n_images
        assert encoded["pixel_values"].shape[0] == int(grid.prod(-1).sum())
        assert int(encoded["mm_token_type_ids"].sum()) == per_image * n_images
    if bundle.adapter.family == "internvl3_5":
        assert "mm_token_type_ids" not in encoded


def test_image_span_equals_the_official_processor_expansion(bundle: ProcessorBundle) -> None:
    from test_backbones_registry import official_processor

    family = bundle.adapter.family
    official = official_processor(family, bundle.image_processor, bundle.extra.get("tokens_per_tile", 0))
    resized = bundle.adapter.protocol_resize(_image(), bundle.image_size)
    expansion = official.replace_image_token(official.image_processor(images=[resized], return_tensors="pt"), 0)
    if family != "internvl3_5":  # Qwen's template writes the markers; its processor repeats the pad between them
        expansion = f"<|vision_start|>{expansion}<|vision_end|>"
    official_ids = bundle.tokenizer(expansion, add_special_tokens=False)["input_ids"]
    ids = bundle.encode(_example(), max_seq_len=1024)["input_ids"].tolist()
    start = ids.index(bundle.special.image_start)
    assert ids[start : start + len(official_ids)] == official_ids


@pytest.mark.parametrize("n_images", [0, 2])
def test_sequence_length_without_pixels_equals_encode(bundle: ProcessorBundle, n_images: int) -> None:
    example = _example(n_images)
    for max_seq_len, with_target in ((1024, True), (1024, False), (60 + 16 * n_images, True)):
        encoded = bundle.encode(example, max_seq_len=max_seq_len, with_target=with_target)
        assert bundle.sequence_length(example, max_seq_len=max_seq_len, with_target=with_target) == encoded["length"]


def test_generation_prompt_is_the_training_prefix(bundle: ProcessorBundle) -> None:
    example = _example()
    prompt = bundle.encode(example, max_seq_len=1024, with_target=False)
    full = bundle.encode(example, max_seq_len=1024)
    assert "labels" not in prompt
    n = len(prompt["input_ids"])
    assert full["input_ids"][:n].tolist() == prompt["input_ids"].tolist()
    assert (full["labels"][:n] == IGNORE_INDEX).all() and full["labels"][n] != IGNORE_INDEX
    assert bundle.tokenizer.decode(prompt["input_ids"]).endswith("<|im_start|>assistant\n")


def test_truncation_drops_target_tail_and_says_so(bundle: ProcessorBundle, caplog: pytest.LogCaptureFixture) -> None:
    example = _example()
    full = bundle.encode(example, max_seq_len=1024)
    prompt_length = len(bundle.encode(example, max_seq_len=1024, with_target=False)["input_ids"])
    with caplog.at_level(logging.WARNING, logger="rmpl_ds"):
        cut = bundle.encode(example, max_seq_len=prompt_length + 3)
    assert cut["truncated"] and cut["length"] == prompt_length + 3
    assert cut["n_target_tokens"] == 3
    assert cut["n_target_tokens_dropped"] == full["n_target_tokens"] - 3
    assert "truncated" in caplog.text and "example-1" in caplog.text
    assert full["input_ids"][: prompt_length + 3].tolist() == cut["input_ids"].tolist()


def test_max_target_tokens_caps_the_labelled_tokens_and_says_so(
    bundle: ProcessorBundle, caplog: pytest.LogCaptureFixture
) -> None:
    """The bound the planner's logits term relies on: no example carries more than max_target_tokens labels."""
    example = _example()
    full = bundle.encode(example, max_seq_len=1024)
    n_target = full["n_target_tokens"]
    assert n_target > 4
    assert bundle.encode(example, max_seq_len=1024, max_target_tokens=n_target)["input_ids"].tolist() == (
        full["input_ids"].tolist()
    )
    with caplog.at_level(logging.WARNING, logger="rmpl_ds"):
        cut = bundle.encode(example, max_seq_len=1024, max_target_tokens=4)
    assert cut["truncated"] and cut["n_target_tokens"] == 4 and cut["n_target_tokens_dropped"] == n_target - 4
    assert int((cut["labels"] != IGNORE_INDEX).sum()) == 4
    assert cut["input_ids"].tolist() == full["input_ids"][: cut["length"]].tolist()
    assert "max_target_tokens=4" in caplog.text and "example-1" in caplog.text
    # the tighter of the two limits wins
    prompt_length = len(bundle.encode(example, max_seq_len=1024, with_target=False)["input_ids"])
    both = bundle.encode(example, max_seq_len=prompt_length + 2, max_target_tokens=4)
    assert both["n_target_tokens"] == 2


def test_a_prompt_that_does_not_fit_is_an_error(bundle: ProcessorBundle) -> None:
    example = _example()
    prompt_length = len(bundle.encode(example, max_seq_len=1024, with_target=False)["input_ids"])
    with pytest.raises(SequenceTooLongError, match=r"example 'example-1'.*image tokens.*max_seq_len"):
        bundle.encode(example, max_seq_len=prompt_length)
    assert bundle.encode(example, max_seq_len=prompt_length, with_target=False)["length"] == prompt_length


def test_image_tokens_in_the_text_are_refused(bundle: ProcessorBundle) -> None:
    injected = _example(n_images=0, prompt=f"look {bundle.spec.image_token}")
    with pytest.raises(UserError, match="0 image\\(s\\) but the rendered prompt has 1"):
        bundle.encode(injected, max_seq_len=1024)


def test_image_cap_limits_tokens(tiny_model_dir: Callable[[str], Path]) -> None:
    adapter = get_adapter("qwen2-vl")
    capped = adapter.load_processor(tiny_model_dir("qwen2-vl"), max_image_tokens=4)
    assert capped.image_token_count(512, 512) == 4
    assert capped.encode(_example(), max_seq_len=1024)["image_tokens"] == (4,)
    # without the protocol resize the image processor sees the original 400×300 image
    as_given = adapter.load_processor(tiny_model_dir("qwen2-vl"), image_size=None)
    assert as_given.encode(_example(), max_seq_len=1024)["image_tokens"] == (as_given.image_token_count(400, 300),)


def test_a_checkpoint_of_another_family_is_refused(tiny_model_dir: Callable[[str], Path]) -> None:
    with pytest.raises(UserError, match="model_type 'qwen2_vl', but backbone 'qwen3-vl' expects 'qwen3_vl'"):
        get_adapter("qwen3-vl").load_processor(tiny_model_dir("qwen2-vl"))


def test_tiny_tokenizer_knows_the_ontology(tiny_model_dir: Callable[[str], Path]) -> None:
    bundle = get_adapter("internvl3_5").load_processor(tiny_model_dir("internvl3_5"))
    tokenizer = bundle.tokenizer
    assert 2000 <= len(tokenizer) <= 8000
    assert bundle.config.get_text_config().vocab_size >= len(tokenizer)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # learned as words: a type is its pieces (Contact : Phone - Write), a role one or two tokens
    assert all(n_tokens(event_type) <= 5 for event_type in ontology.EVENT_TYPES)
    assert all(n_tokens(f" {role}") <= 2 for role in ontology.ROLES)
    text = "Justice:Arrest-Jail | Agent: [121,100,412,998]"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # the named image tokens InternVLProcessor reads by attribute
    assert tokenizer.context_image_token == "<IMG_CONTEXT>" and tokenizer.start_image_token == "<img>"


def test_build_tiny_is_reproducible_and_refuses_to_overwrite(tmp_path: Path) -> None:
    first = build_tiny("qwen3-vl", tmp_path / "a", seed=3)
    second = build_tiny("qwen3-vl", tmp_path / "b", seed=3)
    other_seed = build_tiny("qwen3-vl", tmp_path / "c", seed=4)

    def tensors(directory: Path) -> dict[str, bytes]:
        with safe_open(directory / "model.safetensors", "pt") as handle:
            return {key: handle.get_tensor(key).float().numpy().tobytes() for key in handle.keys()}  # noqa: SIM118

    assert tensors(first) == tensors(second)
    assert tensors(first) != tensors(other_seed)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    with pytest.raises(UserError, match="not empty"):
        build_tiny("qwen3-vl", first)


def test_bundle_and_collator_pickle_for_loader_workers(bundle: ProcessorBundle) -> None:
    import pickle

    example = _example(n_images=1)
    copy = pickle.loads(pickle.dumps(bundle))
    assert copy.encode(example, max_seq_len=1024)["input_ids"].tolist() == (
        bundle.encode(example, max_seq_len=1024)["input_ids"].tolist()
    )
    collator = pickle.loads(pickle.dumps(bundle.collator()))
    assert collator([copy.encode(_example(n_images=0), max_seq_len=1024)])["stats"].dummy_image
