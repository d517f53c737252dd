"""Box syntaxes: how a target writes an image argument (a role and its box), in the plain form or in the form each
backbone was pretrained to ground with (``tasks.box_format: native``).

Every syntax puts a box on a grid and writes ``x1, y1, x2, y2`` as integers on it:

* relative grids (``0-999`` of the image's width and height, Qwen2-VL's convention): ``x * 1000 // W``;
* absolute grids (pixels of the image as the model sees it, Qwen2.5-VL's convention): ``x * Gw // W`` for the
  model's canvas ``Gw x Gh`` (a 512 x 512 protocol image is 504 x 504 for Qwen2.5-VL).

Quantizing is the same rule on every grid (:func:`quantize_box`), and reading maps a coordinate back to the middle of
the pixels that quantize to it (:func:`dequantize_box`), so a rendered box reads back exactly and the strict scorer
sees the same pixel boxes whatever the syntax.

The native syntaxes, as published (the sources are the checkpoints' own documentation and grounding code):

* ``qwen2-vl``: ``<|object_ref_start|>Agent<|object_ref_end|><|box_start|>(121,100),(412,998)<|box_end|>`` on the
  0-1000 grid (Qwen2-VL model card, "grounding"; the same special tokens in its tokenizer);
* ``internvl``: ``<ref>Agent</ref><box>[[121, 100, 412, 998]]</box>`` on the 0-1000 grid (InternVL documentation,
  "grounding": coordinates normalized to 1000; ``<ref>``/``<box>`` are special tokens of the InternVL tokenizer);
* ``qwen3-vl``: ``{"bbox_2d": [121, 100, 412, 998], "label": "Agent"}`` on the 0-1000 grid (Qwen3-VL cookbook,
  "2D grounding": relative coordinates in [0, 1000]);
* ``qwen2.5-vl``: ``{"bbox_2d": [61, 50, 207, 503], "label": "Agent"}`` in absolute pixels of the resized image
  (Qwen2.5-VL cookbook, "spatial understanding": boxes in the coordinates of the image the processor resized).

Arguments are joined with `` ; `` in every syntax (the task's line format); :meth:`BoxSyntax.read` finds the
arguments of one such piece. Nothing here imports torch or PIL.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Box = tuple[int, int, int, int]
Grid = tuple[int, int]

RELATIVE_SCALE = 1000
_NUMBER = re.compile(r"[0-9]+")


def quantize_box(box: Box, width: int, height: int, grid: Grid = (RELATIVE_SCALE, RELATIVE_SCALE)) -> Box:
    """A pixel box as integers on ``grid`` (``[0, Gw) x [0, Gh)``), normalized by the image size and clipped to it.

    Raises ValueError unless width and height are positive.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"cannot normalize a box by an image size of {width}x{height}")
    x1, y1, x2, y2 = (min(max(v, 0), limit) for v, limit in zip(box, (width, height, width, height), strict=True))
    gw, gh = grid
    return (_quantize(x1, width, gw), _quantize(y1, height, gh), _quantize(x2, width, gw), _quantize(y2, height, gh))


def dequantize_box(box: Box, width: int, height: int, grid: Grid = (RELATIVE_SCALE, RELATIVE_SCALE)) -> Box:
    """The pixel box in the middle of a quantized box's bins; :func:`quantize_box` of it gives ``box`` back."""
    x1, y1, x2, y2 = box
    gw, gh = grid
    return (
        _dequantize(x1, width, gw),
        _dequantize(y1, height, gh),
        _dequantize(x2, width, gw),
        _dequantize(y2, height, gh),
    )


def _quantize(value: int, limit: int, scale: int) -> int:
    return min(value * scale // limit, scale - 1)


def _dequantize(value: int, limit: int, scale: int) -> int:
    # The middle of the integer pixels that quantize to ``value``, so that quantizing the result gives ``value``
    # back whenever some pixel does (always for a value that came from a pixel).
    first = -(-value * limit // scale)
    last = -(-(value + 1) * limit // scale) - 1
    middle = (first + last) // 2 if first <= last else first
    return min(max(middle, 0), limit)


@dataclass(frozen=True)
class BoxSyntax:
    """One way of writing ``role + box`` (the native syntaxes; :class:`PlainSyntax` is the plain one).

    Attributes:
        name: ``plain`` or the family whose pretraining syntax it is.
        template: ``str.format`` pattern with ``role``, ``x1``, ``y1``, ``x2``, ``y2``.
        pattern: a regular expression for one argument; groups ``role`` and ``x1`` ... ``y2``.
        scale: ``relative`` (the 0-999 grid) or ``absolute`` (pixels of the model's canvas, from ``canvas``).
        canvas: for ``absolute``: (image width, height) -> the canvas the model sees (a picklable callable).
        note: how the prompt describes the coordinates.
    """

    name: str
    template: str
    pattern: str = ""
    scale: Literal["relative", "absolute"] = "relative"
    canvas: Callable[[int, int], Grid] | None = field(default=None, compare=False)
    note: str = "coordinates 0-999 of the image width and height"

    def grid(self, width: int, height: int) -> Grid:
        """The grid boxes of a ``width x height`` image are written on."""
        if self.scale == "relative":
            return (RELATIVE_SCALE, RELATIVE_SCALE)
        assert self.canvas is not None, f"box syntax {self.name!r} needs a canvas"
        return self.canvas(width, height)

    def write(self, role: str, box: Box) -> str:
        """One argument, ``box`` already on the grid."""
        x1, y1, x2, y2 = box
        label = json.dumps(role)[1:-1] if _is_json(self.template) else role
        return self.template.format(role=label, x1=x1, y1=y1, x2=x2, y2=y2)

    def example(self) -> str:
        """Two arguments as the prompt shows the format."""
        written = self.template.format(role="role", x1="x1", y1="y1", x2="x2", y2="y2")
        return f"{written} ; {written}"

    def read_item(self, item: str) -> tuple[str | None, list[Box | None], bool]:
        """One ``;``-separated piece of an answer: (the role as written or None, its boxes on the grid, None for a
        malformed one, and whether anything but the argument was left over)."""
        match = re.search(self.pattern, item, flags=re.DOTALL)
        if match is None:
            return None, [], True
        role = match.group("role")
        if _is_json(self.template):
            with contextlib.suppress(json.JSONDecodeError):
                role = json.loads(f'"{role}"')
        leftover = (item[: match.start()] + item[match.end() :]).strip()
        return role.strip(), [_box([match.group(k) for k in ("x1", "y1", "x2", "y2")])], bool(leftover)


@dataclass(frozen=True)
class PlainSyntax(BoxSyntax):
    """``role: [x1,y1,x2,y2]``, read leniently: brackets or parentheses, several boxes per role."""

    def read_item(self, item: str) -> tuple[str | None, list[Box | None], bool]:
        role_text, colon, value = item.partition(":")
        if not colon:
            return None, [], True
        boxes = _BOX.findall(value)
        leftover = _BOX.sub("", value).replace(",", "").strip()
        return role_text.strip(), [_box(inside.split(",")) for inside in boxes], bool(leftover) or not boxes


def _is_json(template: str) -> bool:
    return template.startswith("{{")


def _box(values: list[str | None]) -> Box | None:
    """Four non-negative integers with x1 <= x2 and y1 <= y2; None if not (the grid bound is the caller's)."""
    if len(values) != 4 or any(value is None or not _NUMBER.fullmatch(value.strip()) for value in values):
        return None
    x1, y1, x2, y2 = (int(value) for value in values)  # type: ignore[union-attr]
    if x1 > x2 or y1 > y2:
        return None
    return (x1, y1, x2, y2)


_BOX = re.compile(r"[\[(]([^\[\]()]*)[\])]")
_N = r"\s*(?P<{}>[^\s,\]\)\[\(]*)\s*"  # a coordinate (checked to be digits afterwards)

PLAIN = PlainSyntax(name="plain", template="{role}: [{x1},{y1},{x2},{y2}]")

QWEN2_VL = BoxSyntax(
    name="qwen2-vl",
    template="<|object_ref_start|>{role}<|object_ref_end|><|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>",
    pattern=(
        r"<\|object_ref_start\|>(?P<role>.*?)<\|object_ref_end\|>\s*<\|box_start\|>\s*"
        rf"\({_N.format('x1')},{_N.format('y1')}\)\s*,\s*\({_N.format('x2')},{_N.format('y2')}\)\s*<\|box_end\|>"
    ),
)

INTERNVL = BoxSyntax(
    name="internvl",
    template="<ref>{role}</ref><box>[[{x1}, {y1}, {x2}, {y2}]]</box>",
    pattern=(
        r"<ref>(?P<role>.*?)</ref>\s*<box>\s*\[\["
        + ",".join(_N.format(k) for k in ("x1", "y1", "x2", "y2"))
        + r"\]\]\s*</box>"
    ),
)

_JSON_TEMPLATE = '{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "{role}"}}'
_JSON_PATTERN = (
    r'\{\s*"bbox_2d"\s*:\s*\['
    + ",".join(_N.format(k) for k in ("x1", "y1", "x2", "y2"))
    + r'\]\s*,\s*"label"\s*:\s*"(?P<role>(?:[^"\\]|\\.)*)"\s*\}'
)

QWEN3_VL = BoxSyntax(name="qwen3-vl", template=_JSON_TEMPLATE, pattern=_JSON_PATTERN)


def absolute_json(name: str, canvas: Callable[[int, int], Grid] | None = None) -> BoxSyntax:
    """The JSON object in absolute pixels of the ``canvas`` the model sees (Qwen2.5-VL's syntax); a family spec leaves
    the canvas to the adapter, which binds it to the loaded image processor (``ProcessorBundle.box_syntax``)."""
    return BoxSyntax(
        name=name,
        template=_JSON_TEMPLATE,
        pattern=_JSON_PATTERN,
        scale="absolute",
        canvas=canvas,
        note="pixel coordinates of the image as the model sees it",
    )
