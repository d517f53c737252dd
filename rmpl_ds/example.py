"""The Example: what a task renders from a record and what a backbone adapter tokenizes.

It is model-agnostic: a system turn, one user turn (images first, then text) and the assistant's target.
Each backbone adapter turns it into input ids, an attention mask, pixel inputs and labels with the loss on
the target tokens only. A :class:`ChatExample` is a whole conversation (the ``chat`` task, rmpl_ds.chat): the
loss is on every assistant turn, or on the last one only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image


@dataclass(frozen=True, eq=False)
class Example:
    """One rendered example.

    Attributes:
        task: the task that rendered it: Stage I schema families ``t`` / ``i`` / ``r``, Stage II ``EM`` / ``AR``.
        system: the system turn (schema-guided instructions: event types and roles).
        prompt: the user turn's text; the images are shown before it, in order.
        target: the assistant turn, linearized deterministically; ``""`` at inference time.
        images: decoded RGB images (the adapter resizes them per its family's protocol).
        source: the data source the record came from (``ace``, ``swig``, ``mnre``, ``m2e2``, ...).
        key: the record's id, for tracing a sample back to its shard.
        meta: anything the renderer needs back at parse time (e.g. the image size for boxes).
    """

    task: str
    system: str
    prompt: str
    target: str
    images: tuple[Image.Image, ...] = ()
    source: str = ""
    key: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def messages(self, with_target: bool = True) -> list[dict[str, Any]]:
        """The example as HF chat-template messages (content parts, images before text)."""
        user_content: list[dict[str, Any]] = [{"type": "image"} for _ in self.images]
        user_content.append({"type": "text", "text": self.prompt})
        messages = [
            {"role": "system", "content": [{"type": "text", "text": self.system}]},
            {"role": "user", "content": user_content},
        ]
        if with_target:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": self.target}]})
        return messages


ChatLabels = Literal["all", "last"]
CHAT_LABELS: tuple[str, ...] = ("all", "last")


@dataclass(frozen=True, eq=False)
class ChatExample:
    """A rendered conversation.

    Attributes:
        task: ``chat``.
        messages: HF chat-template messages: ``{"role": "system" | "user" | "assistant", "content": [parts]}`` with
            ``{"type": "text", "text": ...}`` and ``{"type": "image"}`` parts in the conversation's order; an
            optional system turn, then user and assistant turns alternating, ending with an assistant turn.
        images: decoded RGB images, one per image part, in order.
        labels: ``all``: the loss covers every assistant turn and its end-of-turn token; ``last``: the last one only.
        source, key, meta: as :class:`Example`'s.
    """

    task: str
    messages: tuple[dict[str, Any], ...]
    images: tuple[Image.Image, ...] = ()
    labels: ChatLabels = "all"
    source: str = ""
    key: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def assistant_turns(self) -> tuple[int, ...]:
        """Indices of the assistant messages."""
        return tuple(index for index, message in enumerate(self.messages) if message["role"] == "assistant")

    def labelled_turns(self) -> tuple[int, ...]:
        """Indices of the assistant messages the loss covers."""
        turns = self.assistant_turns
        return turns if self.labels == "all" else turns[-1:]
