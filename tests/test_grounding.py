"""Box syntaxes (rmpl_ds.grounding): each family's native grounding format as published, the exact round trip of
render and parse in every syntax on generated records, the real fixtures and the demo set, what the scorer sees, and
the native tokens surviving the tokenizer and greedy decoding."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tasks import DEMO_INPUTS, REAL_INPUTS, _image_for, _tasks_for, _with_size, image_records

from rmpl_ds.backbones import FAMILIES, get_adapter
from rmpl_ds.evaluate.m2e2 import box_iou
from rmpl_ds.grounding import PLAIN, BoxSyntax, quantize_box
from rmpl_ds.images import load_image
from rmpl_ds.ontology import RELATION_LABELS
from rmpl_ds.records import CrossMediaLink, ImageEvent, ImageRecord, RelationPair, TextSentence, VisualArgument
from rmpl_ds.sources import SOURCES, find_image
from rmpl_ds.sources.demo import MIN_SIZE, write_demo
from rmpl_ds.tasks import parse, render, render_all, to_structure


def _native(family: str) -> BoxSyntax:
    """The family's syntax as a published checkpoint's processor sees a 512x512 protocol image."""
    adapter = get_adapter(family)
    return adapter.native_box_syntax(adapter.reference_image_processor(), 512)


SYNTAXES: dict[str, BoxSyntax] = {"plain": PLAIN, **{family: _native(family) for family in sorted(FAMILIES)}}

# One argument of each family, as its documentation writes a grounded object (the record: a 2000 x 1630 image, an
# Agent at pixels (250, 190)-(846, 1629)).
PUBLISHED = {
    "plain": "Agent: [125,116,423,999]",
    "qwen2-vl": "<|object_ref_start|>Agent<|object_ref_end|><|box_start|>(125,116),(423,999)<|box_end|>",
    "qwen3-vl": '{"bbox_2d": [125, 116, 423, 999], "label": "Agent"}',
    "internvl3_5": "<ref>Agent</ref><box>[[125, 116, 423, 999]]</box>",
}


def _agent_record() -> ImageRecord:
    event = ImageEvent("Justice:Arrest-Jail", (VisualArgument("Agent", (250, 190, 846, 1629)),))
    return ImageRecord("img", "m2e2", "test", "img.jpg", 2000, 1630, (event,))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_family_writes_its_published_grounding_format(name: str) -> None:
    example = render(
        _agent_record(), "AR", image=_image_for(_agent_record()), event_type="Justice:Arrest-Jail", boxes=SYNTAXES[name]
    )
    assert example.target == PUBLISHED[name]
    assert SYNTAXES[name].note in example.prompt  # the prompt says which grid the coordinates are on


def test_absolute_pixels_are_those_of_the_image_the_model_sees() -> None:
    """Qwen2.5-VL's boxes are pixels of the resized input: a 512x512 protocol image is 504x504 for its processor,
    whatever the record's original size."""
    absolute = [name for name, syntax in SYNTAXES.items() if syntax.scale == "absolute"]
    for name in absolute:
        syntax = SYNTAXES[name]
        assert syntax.grid(2000, 1630) == (504, 504) == syntax.grid(512, 512)
        example = render(
            _agent_record(), "AR", image=_image_for(_agent_record()), event_type="Justice:Arrest-Jail", boxes=syntax
        )
        assert example.target == '{"bbox_2d": [63, 58, 213, 503], "label": "Agent"}'


@pytest.mark.parametrize("name", sorted(SYNTAXES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=image_records())
def test_parse_inverts_render_in_every_syntax(name: str, record: ImageRecord) -> None:
    _round_trip(record, SYNTAXES[name])


@pytest.mark.parametrize("name", sorted(SYNTAXES))
@given(role=st.text(min_size=1, max_size=12), box=st.tuples(*[st.integers(0, 998)] * 4))
def test_one_argument_reads_back_exactly(name: str, role: str, box: tuple[int, int, int, int]) -> None:
    """Any role text (quotes, backslashes, brackets) and any box on the grid survive write then read."""
    syntax = SYNTAXES[name]
    x1, y1, x2, y2 = box
    box = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    written = syntax.write(role.replace(";", ","), box)
    read_role, boxes, leftover = syntax.read_item(written)
    if name == "plain" and (":" in role or not role.strip()):
        return  # the plain syntax splits at the first colon: roles are ontology names there, never free text
    assert (read_role, boxes, leftover) == (role.replace(";", ",").strip(), [box], False)


@pytest.mark.parametrize("name", sorted(SYNTAXES))
@pytest.mark.parametrize(("source", "relative"), [entry for entry in REAL_INPUTS if entry[0] in ("swig", "m2e2")])
def test_round_trip_on_real_fixtures_in_every_syntax(
    real_fixtures: Path, source: str, relative: str, name: str
) -> None:
    records = [_with_size(record) for record in SOURCES[source](real_fixtures / relative).records]
    images = [record for record in records if isinstance(record, ImageRecord)]
    assert images, relative
    for record in images:
        _round_trip(record, SYNTAXES[name])


@pytest.fixture(scope="module")
def demo_records(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[object, object]]:
    root = tmp_path_factory.mktemp("grounding-demo") / "demo"
    write_demo(root, size=MIN_SIZE)
    pairs = []
    for source, relative, images in DEMO_INPUTS:
        images_dir = root / images if images else None
        for record in SOURCES[source](root / relative, images_dir=images_dir, strict=True).records:
            if images_dir is None or isinstance(record, CrossMediaLink | TextSentence):
                continue  # records without an image (sentences, links, schema questions)
            pairs.append((record, load_image(find_image(images_dir, record.image, record.split))))
    return pairs


@pytest.mark.parametrize("name", sorted(SYNTAXES))
def test_round_trip_on_the_demo_set_in_every_syntax(demo_records: list, name: str) -> None:
    syntax = SYNTAXES[name]
    grounded = 0
    for record, image in demo_records:
        if isinstance(record, RelationPair) and record.relation not in RELATION_LABELS:
            continue
        grounded += _round_trip(record, syntax, image)
    assert grounded > 20  # boxes were written and read, not only "none"


@pytest.mark.parametrize("name", sorted(SYNTAXES))
def test_the_scorer_sees_the_same_pixel_boxes_whatever_the_syntax(demo_records: list, name: str) -> None:
    """Every box read back from a target maps to the record's box at IoU well above the scorer's 0.5; on the
    relative grids (all but Qwen2.5-VL's) the pixel boxes are identical to the plain syntax's."""
    syntax = SYNTAXES[name]
    for record, _ in demo_records:
        if not isinstance(record, ImageRecord) or not record.events:
            continue
        gold: dict[tuple[str, str], list] = {}
        for event in record.events:
            for arg in event.arguments:
                gold.setdefault((event.event_type, arg.role), []).append(arg.box)
        read = to_structure(record, "i", boxes=syntax)
        plain = to_structure(record, "i")
        for event in read.events:
            for argument in event.arguments:
                ious = [box_iou(argument.box, box) for box in gold[event.event_type, argument.role] if box]
                assert max(ious) >= 0.8
        if syntax.scale == "relative":
            assert read == plain


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_native_targets_survive_the_tokenizer(family: str, tiny_model_dir: Callable[[str], Path]) -> None:
    """The grounding tokens (``<|box_start|>``, ``<ref>``) are special tokens of the family tokenizer: a target
    tokenizes to them and decodes back to the same text when special tokens are kept, as evaluation decodes."""
    bundle = get_adapter(family).load_processor(tiny_model_dir(family))
    syntax = bundle.box_syntax("native")
    record = _agent_record()
    example = render(record, "AR", image=_image_for(record), event_type="Justice:Arrest-Jail", boxes=syntax)
    ids = bundle.tokenizer(example.target, add_special_tokens=False)["input_ids"]
    special = set(bundle.tokenizer.all_special_ids) | {
        bundle.tokenizer.convert_tokens_to_ids(token) for token in bundle.spec.special_tokens
    }
    if "<" in example.target and syntax is not SYNTAXES["qwen3-vl"]:
        assert special & set(ids), "the markers should be single special tokens"
    decoded = bundle.tokenizer.decode(ids, skip_special_tokens=False)
    assert decoded == example.target
    assert parse("AR", decoded, example_meta=example.meta, boxes=syntax) == to_structure(
        record, "AR", event_type="Justice:Arrest-Jail", boxes=syntax
    )


def test_generation_honours_the_checkpoint_generation_config(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """End tokens and repetition penalty from generation_config.json; its sampling settings never apply."""
    from rmpl_ds.evaluate.generate import generation_config

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir("qwen2-vl"), model_dir)
    bundle = get_adapter("qwen2-vl").load_processor(model_dir)
    extra_end = bundle.special.image_start  # any id the family would not stop on
    published = {  # the published Qwen2-VL-7B-Instruct file's shape
        "bos_token_id": bundle.special.pad,
        "pad_token_id": bundle.special.pad,
        "do_sample": True,
        "eos_token_id": [bundle.special.end_of_turn, extra_end],
        "repetition_penalty": 1.05,
        "temperature": 0.1,
        "top_k": 1,
        "top_p": 0.001,
    }
    (model_dir / "generation_config.json").write_text(json.dumps(published))
    config = generation_config(bundle, max_new_tokens=7)
    assert (config.do_sample, config.num_beams, config.max_new_tokens) == (False, 1, 7)
    assert config.repetition_penalty == 1.05
    assert set(config.eos_token_id) == {*bundle.special.stop, extra_end}
    (model_dir / "generation_config.json").unlink()
    assert generation_config(bundle, max_new_tokens=7).repetition_penalty in (None, 1.0)  # no penalty


def _round_trip(record: object, syntax: BoxSyntax, image: object = None) -> int:
    """parse(render(record)) == to_structure(record) for every task that writes boxes; returns the boxes seen."""
    seen = 0
    image = image if image is not None else _image_for(record)  # type: ignore[arg-type]
    for task in _tasks_for(record):
        if task not in ("i", "EM", "AR"):
            continue
        for example in render_all(record, task, image=image, boxes=syntax):  # type: ignore[arg-type]
            parsed = parse(task, example.target, example_meta=example.meta, boxes=syntax)
            expected = to_structure(record, task, event_type=example.meta.get("event_type"), boxes=syntax)
            assert parsed == expected, f"{syntax.name} {task} target {example.target!r}"
            assert parsed.errors == 0
            seen += sum(argument.box is not None for event in parsed.events for argument in event.arguments)
    return seen


def test_quantizing_on_a_canvas_is_the_same_rule() -> None:
    assert quantize_box((0, 0, 511, 511), 512, 512, (504, 504)) == (0, 0, 503, 503)
    assert dataclasses.replace(PLAIN).grid(7, 9) == (1000, 1000)
