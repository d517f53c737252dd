"""The ``chat`` task: a conversation of a chat source (:class:`~rmpl_ds.records.ChatRecord`) as a
:class:`~rmpl_ds.example.ChatExample`, and what ``rmpl-ds shards inspect`` says about a chat shard set.

A chat stream trains on the conversation as written: every turn in the family's chat template, the loss on every
assistant turn and its end-of-turn token (``tasks.chat_labels: all``, the default) or on the last assistant turn
only (``last``); system and user turns are masked (rmpl_ds.backbones.adapter). Nothing is rewritten: box
coordinates in a chat dataset are text and reach the model exactly as the dataset writes them, whatever the
recipe's ``tasks.box_format`` (which applies to the RMPL tasks' targets only).

The chat task renders chat records only, and chat records render for the chat task only: a recipe that mixes them
otherwise is refused before training (rmpl_ds.data.stream_problems) and, should a sample get there, at render time.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmpl_ds.errors import UserError
from rmpl_ds.example import CHAT_LABELS, ChatExample, ChatLabels
from rmpl_ds.records import ChatRecord, Record

if TYPE_CHECKING:
    from PIL import Image

CHAT_TASK = "chat"
# The shard members of a conversation's images: `{index}.{extension}`.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def render(record: Record, images: Sequence[Image.Image], *, labels: ChatLabels = "all") -> ChatExample:
    """``record`` (a ChatRecord) as a ChatExample with ``images`` (decoded, one per image of the record, in order).

    Raises:
        ValueError: not a ChatRecord, another number of images than the record has, or ``labels`` not one of
            ``all`` / ``last``.
    """
    if not isinstance(record, ChatRecord):
        raise ValueError(
            f"task {CHAT_TASK!r} renders conversations of a chat source, not {type(record).__name__} "
            f"{getattr(record, 'id', '')!r}; RMPL records train with the tasks t, i, r, EM and AR"
        )
    if labels not in CHAT_LABELS:
        raise ValueError(f"chat labels must be one of {list(CHAT_LABELS)}, got {labels!r}")
    if len(images) != len(record.images):
        raise ValueError(f"conversation {record.id!r} has {len(record.images)} image(s), {len(images)} given")
    messages = []
    for turn in record.turns:
        content: list[dict[str, Any]] = []
        for part in turn.parts:
            if part.image is not None:
                content.append({"type": "image"})
            elif part.text:
                content.append({"type": "text", "text": part.text})
        messages.append({"role": turn.role, "content": content})
    return ChatExample(
        task=CHAT_TASK,
        messages=tuple(messages),
        images=tuple(image if image.mode == "RGB" else image.convert("RGB") for image in images),
        labels=labels,
        source=record.source,
        key=record.id,
        meta={"task": CHAT_TASK, "record_kind": record.kind, "turns": len(record.turns), "images": len(images)},
    )


def sample_images(item: dict[str, Any], record: ChatRecord) -> list[Image.Image]:
    """A decoded shard sample's images of ``record``, in order (members ``0.jpg``, ``1.png``, ...).

    Raises:
        UserError: a member is missing (the shard set was not written by ``shards build --source chat``).
    """
    images = []
    for index in range(len(record.images)):
        image = next((item[f"{index}.{ext}"] for ext in IMAGE_EXTENSIONS if f"{index}.{ext}" in item), None)
        if image is None:
            raise UserError(
                f"shard sample {item.get('key')!r}: conversation {record.id!r} lacks its image member {index}"
            )
        images.append(image)
    return images


# --------------------------------------------------------------------------------------------- inspect


def describe_chat_shards(
    directory: str | Path, model: str | Path | None = None, *, max_seq_len: int = 2048, limit: int = 1000
) -> str:
    """What a chat shard set holds: assistant turns and images per conversation (from the manifest), and with
    ``model`` (a model directory of a registered family) the token lengths of up to ``limit`` conversations, evenly
    spread, as that checkpoint encodes them for training (no pixels are processed).

    Raises:
        UserError: not a chat shard set, a model directory of no registered family, ``limit`` < 1.
    """
    from rmpl_ds.shards import read_manifest

    manifest = read_manifest(directory)
    counts = manifest.get("counts", {})
    lines = [f"chat: {manifest['samples']} conversations"]
    for key, what in (("by_assistant_turns", "assistant turns"), ("by_images", "images")):
        histogram = {int(n): count for n, count in counts.get(key, {}).items()}
        if histogram:
            total = sum(histogram.values())
            mean = sum(n * count for n, count in histogram.items()) / total
            shown = ", ".join(f"{n}: {histogram[n]}" for n in sorted(histogram))
            lines.append(f"  {what} per conversation: {shown} (mean {mean:.2f}, max {max(histogram)})")
    lines.append(f"  images in all: {counts.get('images', 0)}; with a system turn: {counts.get('with_system', 0)}")
    if model is None:
        lines.append("  token lengths: give --model MODEL_DIR (a checkpoint of the family you will train)")
        return "\n".join(lines)
    if limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    lines += _token_lines(Path(directory), Path(model), max_seq_len, limit)
    return "\n".join(lines)


def family_of(model: Path) -> str:
    """The registered family whose ``model_type`` the model directory's config.json names.

    Raises:
        UserError: no readable config.json, or a model type no family has.
    """
    from rmpl_ds.backbones import specs

    try:
        model_type = json.loads((model / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise UserError(f"{model}: not a model directory with a readable config.json ({error})") from None
    for spec in specs():
        if spec.model_type == model_type:
            return spec.name
    known = ", ".join(f"{spec.model_type} ({spec.name})" for spec in specs())
    raise UserError(f"{model}: model_type {model_type!r} is not a registered family's; known: {known}")


def _token_lines(directory: Path, model: Path, max_seq_len: int, limit: int) -> list[str]:
    from rmpl_ds import records
    from rmpl_ds.backbones import get_adapter
    from rmpl_ds.shards import ShardSet

    family = family_of(model)
    bundle = get_adapter(family).load_processor(model)
    lengths: list[int] = []
    labelled: list[int] = []
    with ShardSet.open(directory) as shards:
        count = min(limit, len(shards))
        for number in range(count):
            index = number * len(shards) // count
            item = {**shards.read(index), "key": shards.key(index)}
            record = records.from_json(item["json"])
            example = render(record, sample_images(item, record))  # type: ignore[arg-type]
            tokens, targets = bundle.adapter.token_counts(bundle, example)
            lengths.append(tokens)
            labelled.append(targets)
    over = sum(1 for length in lengths if length > max_seq_len)
    return [
        f"  token lengths ({family}, {model.name}; {len(lengths)} of {len(shards)} conversations): "
        + _summary(lengths),
        "  labelled tokens (every assistant turn): " + _summary(labelled),
        f"  longer than max_seq_len {max_seq_len}: {over} ({over / len(lengths):.1%}; training cuts their tail)",
    ]


def _summary(values: list[int]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"min {ordered[0]}, median {statistics.median(ordered):g}, p95 {p95}, max {ordered[-1]}"


# --------------------------------------------------------------------------------------------- streams


def stream_problems(stage: Any, set_sources: dict[str, str]) -> list[str]:
    """What is wrong with the pairing of tasks and shard sets in ``stage``'s mixture: a chat stream must read a
    chat shard set and a chat shard set trains only with the chat task. ``set_sources``: recipe source name -> the
    ``source`` its shard manifest names (``ace``, ``swig``, ``chat``, ...); sources not in it are not checked."""
    from rmpl_ds.sources.chat import SOURCE as CHAT_SOURCE

    problems = []
    for index, stream in enumerate(stage.mixture):
        if stream.source not in set_sources:
            continue
        where = f"stages.{stage.name}.mixture[{index}] ({stream.name})"
        is_chat = set_sources[stream.source] == CHAT_SOURCE
        if stream.task == CHAT_TASK and not is_chat:
            problems.append(
                f"{where}: task chat trains on conversations, but source {stream.source!r} holds "
                f"{set_sources[stream.source]} records; build its shards with --source chat"
            )
        elif stream.task != CHAT_TASK and is_chat:
            problems.append(
                f"{where}: source {stream.source!r} holds conversations (a chat shard set), which train with task "
                f"chat, not {stream.task!r}"
            )
    return problems
