"""Encoding for a backbone family: a :class:`BackboneAdapter` turns Examples into model inputs.

An adapter holds its family's :class:`~rmpl_ds.backbones.spec.FamilySpec` (the facts) and the code that needs the
family's processor:

* **images**: resized to the paper's 512×512 first, then through the family's own image processor (PIL backend, no
  torchvision); the chat template's image placeholder is expanded to exactly the number of tokens the official
  processor would emit (the family hooks :meth:`~BackboneAdapter.configure_image_processor`,
  :meth:`~BackboneAdapter.process_images`, :meth:`~BackboneAdapter.image_token_count`);
* **labels**: the loss covers the target and its end-of-turn token only;
* **boxes**: the grounding syntax the checkpoint was pretrained with, bound to the loaded image processor
  (:meth:`ProcessorBundle.box_syntax`).

Loading, quantization, PEFT and export are rmpl_ds.backbones.loading (``adapter.load`` and the export methods are
its entry points); generation is evaluation's (rmpl_ds.evaluate.generate). Heavy libraries are imported inside the
methods, so importing a family stays cheap.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rmpl_ds.backbones.spec import FamilySpec
from rmpl_ds.constants import IGNORE_INDEX
from rmpl_ds.errors import UserError
from rmpl_ds.grounding import PLAIN, BoxSyntax
from rmpl_ds.log import get_logger

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from rmpl_ds.backbones.loading import Mode
    from rmpl_ds.collate import Collator
    from rmpl_ds.example import ChatExample, Example

logger = get_logger(__name__)

# The paper's image protocol: every image is resized to 512×512 before the family's own preprocessing.
PAPER_IMAGE_SIZE = 512
BOX_FORMATS: tuple[str, ...] = ("native", "plain")


class SequenceTooLongError(UserError):
    """An example whose prompt (system + user turn + image tokens) alone does not fit ``max_seq_len``."""


@dataclass(frozen=True)
class SpecialTokenIds:
    """Token ids the adapter needs; all of them exist in every tokenizer of the family (real or tiny).

    Attributes:
        pad: the padding id.
        end_of_turn: the token that closes an assistant turn; the last labelled token.
        stop: ids that end greedy generation.
        image: the placeholder the model overwrites with image features, repeated once per image token.
        image_start: the token opening an image span.
        image_end: the token closing an image span.
    """

    pad: int
    end_of_turn: int
    stop: tuple[int, ...]
    image: int
    image_start: int
    image_end: int


@dataclass(frozen=True)
class ImageInputs:
    """The family image processor's output for the images of one example.

    Attributes:
        tensors: model keyword arguments (``pixel_values``, plus ``image_grid_thw`` for the Qwen families).
        tokens_per_image: how many placeholder tokens each image expands to, in order.
    """

    tensors: dict[str, torch.Tensor]
    tokens_per_image: tuple[int, ...]


@dataclass(eq=False)
class ProcessorBundle:
    """Everything needed to turn Examples into model inputs for one loaded checkpoint (no model weights).

    Built by :meth:`BackboneAdapter.load_processor` (cheap: data-loader workers use it without a model) and
    returned with the model by :meth:`BackboneAdapter.load`. Picklable.

    Attributes:
        adapter: the family adapter that made it.
        path: the checkpoint directory.
        tokenizer: the checkpoint's tokenizer.
        image_processor: the family image processor (PIL backend), its size limits capped at ``max_image_tokens``.
        config: the checkpoint's model config.
        special: the token ids the adapter uses.
        image_size: the side of the square protocol resize (the paper's 512); ``None`` keeps images as given.
        max_image_tokens: the cap on image tokens per image the image processor was configured with.
        extra: family-specific settings derived at load (InternVL: ``tokens_per_tile``).
    """

    adapter: BackboneAdapter
    path: Path
    tokenizer: PreTrainedTokenizerBase
    image_processor: Any
    config: PretrainedConfig
    special: SpecialTokenIds
    image_size: int | None
    max_image_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> FamilySpec:
        """The family's facts."""
        return self.adapter.spec

    def encode(
        self, example: Example, *, max_seq_len: int, with_target: bool = True, max_target_tokens: int | None = None
    ) -> dict[str, Any]:
        """Shortcut for :meth:`BackboneAdapter.encode` with this bundle."""
        return self.adapter.encode(
            self, example, max_seq_len=max_seq_len, with_target=with_target, max_target_tokens=max_target_tokens
        )

    def sequence_length(self, example: Example, *, max_seq_len: int, with_target: bool = True) -> int:
        """Shortcut for :meth:`BackboneAdapter.sequence_length` with this bundle."""
        return self.adapter.sequence_length(self, example, max_seq_len=max_seq_len, with_target=with_target)

    def image_token_count(self, width: int, height: int) -> int:
        """Image tokens for an image of this size as the image processor sees it (after the protocol resize)."""
        return self.adapter.image_token_count(width, height, bundle=self)

    def dummy_image_inputs(self) -> dict[str, Any]:
        """Shortcut for :meth:`BackboneAdapter.dummy_image_inputs` with this bundle."""
        return self.adapter.dummy_image_inputs(self)

    def box_syntax(self, box_format: str = "native") -> BoxSyntax:
        """How targets write boxes for this checkpoint: ``native`` (the family's pretraining syntax, on the grid of
        the image as this bundle's image processor resizes it) or ``plain`` (``role: [x1,y1,x2,y2]`` on 0-999)."""
        if box_format == "plain":
            return PLAIN
        if box_format != "native":
            raise UserError(f"box format must be one of {list(BOX_FORMATS)}, got {box_format!r}")
        return self.adapter.native_box_syntax(self.image_processor, self.image_size)

    def collator(
        self, *, padding_side: Literal["right", "left"] = "right", pad_to_multiple_of: int | None = None
    ) -> Collator:
        """A :class:`~rmpl_ds.collate.Collator` for this tokenizer, with this family's dummy image for text-only
        micro-batches (so every rank runs the vision tower every step)."""
        from rmpl_ds.collate import Collator

        return Collator(
            pad_token_id=self.special.pad,
            padding_side=padding_side,
            pad_to_multiple_of=pad_to_multiple_of,
            dummy_image=self.dummy_image_inputs() if padding_side == "right" else None,
        )

    def save(self, out_dir: str | Path) -> None:
        """Write the tokenizer (with its chat template) and the image processor settings into ``out_dir``."""
        out_dir = Path(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        for name in ("preprocessor_config.json", "processor_config.json", "generation_config.json"):
            source = self.path / name
            if source.is_file() and not (out_dir / name).exists():
                shutil.copyfile(source, out_dir / name)


class BackboneAdapter:
    """The encoding code of one family around its spec; families override the image hooks.

    Adapters are stateless: everything that depends on a checkpoint lives in its :class:`ProcessorBundle`.
    """

    def __init__(self, spec: FamilySpec) -> None:
        self.spec = spec

    @property
    def family(self) -> str:
        """The family's name (``model.family``)."""
        return self.spec.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Loader workers receive bundles by pickling: an adapter travels as its family's name.
        from rmpl_ds.backbones import get_adapter

        return (get_adapter, (self.spec.name,))

    # ------------------------------------------------------------------ family hooks

    def configure_image_processor(self, image_processor: Any, max_image_tokens: int, config: Any) -> dict[str, Any]:
        """Cap the image processor at ``max_image_tokens`` per image (in place); return bundle extras.
        ``config`` is the checkpoint's config, or None for the published settings."""
        raise NotImplementedError

    def process_images(self, bundle: ProcessorBundle, images: Sequence[Image.Image]) -> ImageInputs:
        """Run the family image processor on already protocol-resized RGB images."""
        raise NotImplementedError

    def image_token_count(self, width: int, height: int, *, bundle: ProcessorBundle | None = None) -> int:
        """Image tokens (without the start/end markers) for one ``width``×``height`` image, as the official
        processor counts them; ``bundle=None`` uses the full-size checkpoint's published processor settings."""
        raise NotImplementedError

    def reference_image_processor(self) -> Any:
        """The published checkpoint's image processor (its preprocessor_config.json values), capped at the
        default image-token cap; no weights or files needed."""
        raise NotImplementedError

    def dummy_image_size(self, bundle: ProcessorBundle) -> tuple[int, int]:
        """(width, height) of the dummy image: the smallest the image processor accepts without upscaling."""
        raise NotImplementedError

    def native_box_syntax(self, image_processor: Any, image_size: int | None) -> BoxSyntax:
        """The family's grounding syntax; an absolute one on the canvas of ``image_processor`` after the protocol
        resize to ``image_size``."""
        syntax = self.spec.box_syntax
        if syntax.scale == "absolute":
            return dataclasses.replace(syntax, canvas=self.canvas(image_processor, image_size))
        return syntax

    def canvas(self, image_processor: Any, image_size: int | None) -> Any:
        """For a family that grounds in absolute pixels: a picklable ``(width, height) -> (W, H)`` giving the size
        an image of the record's size has when the model sees it (protocol resize, then ``image_processor``)."""
        raise NotImplementedError(f"{self.family} grounds on a relative grid")

    def tiny_config_dict(self, token_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
        """config.json of the offline tiny variant: the full-size config with small widths and depths."""
        raise NotImplementedError

    def tiny_preprocessor(self) -> dict[str, Any]:
        """preprocessor_config.json of the tiny variant."""
        raise NotImplementedError

    def tiny_processor_config(self) -> dict[str, Any] | None:
        """processor_config.json of the tiny variant, where the family ships one."""
        return None

    def image_span(self, special: SpecialTokenIds, n_tokens: int) -> list[int]:
        """The token ids one image occupies in the final sequence, markers included."""
        return [special.image_start, *([special.image] * n_tokens), special.image_end]

    # ------------------------------------------------------------------ loading (rmpl_ds.backbones.loading)

    def load_processor(
        self,
        path: str | Path,
        *,
        image_size: int | None = PAPER_IMAGE_SIZE,
        max_image_tokens: int | None = None,
    ) -> ProcessorBundle:
        """Tokenizer + image processor + config of a local checkpoint directory (no weights are read).

        Args:
            path: a local HF directory (config.json, tokenizer files, preprocessor_config.json).
            image_size: side of the square protocol resize applied before the family preprocessing
                (``None`` keeps images as given).
            max_image_tokens: cap on image tokens per image (default: the family's ``default_max_image_tokens``);
                the image processor's own limits still apply when they are lower (tiny models).

        Raises:
            UserError: ``path`` is not a local model directory, or is one of another family.
        """
        from rmpl_ds.backbones.loading import resolve_model_dir

        model_dir = resolve_model_dir(path, self.spec)
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        config = AutoConfig.from_pretrained(model_dir)
        if config.model_type != self.spec.model_type:
            raise UserError(
                f"{model_dir}: config.json has model_type {config.model_type!r}, but backbone {self.family!r} "
                f"expects {self.spec.model_type!r}; pick the backbone that matches the checkpoint"
            )
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # The PIL backend on every host: identical pixels on the CPU test machine and the GPU hosts, and no
        # torchvision import (it cannot be installed next to the CPU torch build).
        image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
        cap = max_image_tokens if max_image_tokens is not None else self.spec.default_max_image_tokens
        if cap <= 0:
            raise UserError(f"max_image_tokens must be > 0, got {cap}")
        extra = self.configure_image_processor(image_processor, cap, config)
        special = self._special_token_ids(tokenizer, model_dir)
        if config.image_token_id != special.image:
            raise UserError(
                f"{model_dir}: config.json image_token_id={config.image_token_id} but the tokenizer maps "
                f"{self.spec.image_token!r} to {special.image}; the tokenizer does not belong to this checkpoint"
            )
        return ProcessorBundle(
            adapter=self,
            path=model_dir,
            tokenizer=tokenizer,
            image_processor=image_processor,
            config=config,
            special=special,
            image_size=image_size,
            max_image_tokens=cap,
            extra=extra,
        )

    def load(self, path: str | Path, mode: Mode, **options: Any) -> tuple[PreTrainedModel, ProcessorBundle]:
        """:func:`rmpl_ds.backbones.loading.load_model` for this family."""
        from rmpl_ds.backbones.loading import load_model

        return load_model(self, path, mode, **options)

    def export_adapter(self, model: Any, out_dir: str | Path, bundle: ProcessorBundle | None = None) -> Path:
        """:func:`rmpl_ds.backbones.loading.export_adapter`."""
        from rmpl_ds.backbones.loading import export_adapter

        return export_adapter(model, out_dir, bundle)

    def merge_and_export(
        self, model: Any, out_dir: str | Path, bundle: ProcessorBundle | None = None, **options: Any
    ) -> Path:
        """:func:`rmpl_ds.backbones.loading.merge_and_export`."""
        from rmpl_ds.backbones.loading import merge_and_export

        return merge_and_export(model, out_dir, bundle, **options)

    # ------------------------------------------------------------------ encoding

    def render(self, bundle: ProcessorBundle, example: Example, *, with_target: bool) -> str:
        """The chat text of ``example``: with the target turn, or ending in the generation prompt."""
        return bundle.tokenizer.apply_chat_template(
            example.messages(with_target=with_target),
            chat_template=self.spec.chat_template,
            tokenize=False,
            add_generation_prompt=not with_target,
        )

    def encode(
        self,
        bundle: ProcessorBundle,
        example: Example,
        *,
        max_seq_len: int,
        with_target: bool = True,
        max_target_tokens: int | None = None,
    ) -> dict[str, Any]:
        """Tokenize one example for training (``with_target``) or for generation (the prompt only).

        The loss covers the target's tokens and the end-of-turn token that closes it; the system turn, the user
        turn (text and image tokens) and the template's trailing newline are masked with ``IGNORE_INDEX``. A
        :class:`~rmpl_ds.example.ChatExample` is encoded the same way turn by turn (:meth:`chat_segments`): every
        assistant turn (or the last one only) is labelled through its end-of-turn token, everything else is masked;
        ``with_target=False`` gives the conversation before its last assistant turn, ending in the generation
        prompt.
        A sequence longer than ``max_seq_len``, or a target of more than ``max_target_tokens`` labelled tokens,
        loses its tail: the dropped target tokens are counted (``n_target_tokens_dropped``), flagged
        (``truncated``) and logged, never silently cut.

        Returns:
            ``input_ids``, ``attention_mask``, ``labels`` (training only), ``mm_token_type_ids`` (Qwen families),
            the pixel inputs (``pixel_values`` and, for Qwen, ``image_grid_thw``; absent without images) as
            tensors, and the plain values ``image_tokens`` (per image), ``n_target_tokens`` (labelled tokens
            kept), ``n_target_tokens_dropped``, ``truncated``, ``length`` and ``key``.

        Raises:
            SequenceTooLongError: the prompt alone does not leave room for one target token (or, for generation,
                does not fit); the message names the example and the lengths. A conversation for training is cut
                instead, however little of its labels remain.
        """
        import torch

        images = [self.protocol_resize(image, bundle.image_size) for image in example.images]
        image_inputs = self.process_images(bundle, images) if images else None
        tokens_per_image = image_inputs.tokens_per_image if image_inputs else ()
        input_ids, labelled = self._sequence(bundle, example, tokens_per_image, with_target)
        self._check_prompt_fits(example, input_ids, labelled, tokens_per_image, max_seq_len, with_target)
        labels = [token if flag else IGNORE_INDEX for token, flag in zip(input_ids, labelled, strict=True)]
        n_labelled = sum(labelled)
        limit, limit_name = max_seq_len, f"max_seq_len={max_seq_len}"
        if max_target_tokens is not None and n_labelled > max_target_tokens:
            # The sequence ends after its max_target_tokens-th labelled token (in a single-turn example: the prompt
            # plus that many target tokens).
            cap_end = [index for index, flag in enumerate(labelled) if flag][max_target_tokens - 1] + 1
            if cap_end < limit:
                limit, limit_name = cap_end, f"max_target_tokens={max_target_tokens}"
        truncated = len(input_ids) > limit
        n_dropped = 0
        if truncated:
            n_dropped = sum(1 for label in labels[limit:] if label != IGNORE_INDEX)
            input_ids, labels = input_ids[:limit], labels[:limit]
            logger.warning(
                "example %r (source %r, task %r) truncated to %s: %d of %d target tokens dropped",
                example.key,
                example.source,
                example.task,
                limit_name,
                n_dropped,
                n_labelled,
            )

        ids = torch.tensor(input_ids, dtype=torch.long)
        encoded: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if with_target:
            encoded["labels"] = torch.tensor(labels, dtype=torch.long)
        if self.spec.uses_mm_token_type_ids:
            encoded["mm_token_type_ids"] = (ids == bundle.special.image).to(torch.int32)
        if image_inputs is not None:
            encoded.update(image_inputs.tensors)
        encoded.update(
            image_tokens=tokens_per_image,
            n_target_tokens=n_labelled - n_dropped,
            n_target_tokens_dropped=n_dropped,
            truncated=truncated,
            length=len(input_ids),
            key=example.key,
        )
        return encoded

    def sequence_length(
        self, bundle: ProcessorBundle, example: Example | ChatExample, *, max_seq_len: int, with_target: bool = True
    ) -> int:
        """``encode(...)["length"]`` without processing any pixels: image token counts depend only on image sizes
        (what bench/bench_padding.py measures padding with). Raises as :meth:`encode` does."""
        tokens_per_image = self._image_token_counts(bundle, example)
        input_ids, labelled = self._sequence(bundle, example, tokens_per_image, with_target)
        self._check_prompt_fits(example, input_ids, labelled, tokens_per_image, max_seq_len, with_target)
        return min(len(input_ids), max_seq_len)

    def token_counts(self, bundle: ProcessorBundle, example: Example | ChatExample) -> tuple[int, int]:
        """(tokens, labelled tokens) of the whole example for training, before any truncation, without processing
        pixels (``rmpl-ds shards inspect --model``)."""
        input_ids, labelled = self._sequence(bundle, example, self._image_token_counts(bundle, example), True)
        return len(input_ids), sum(labelled)

    def _image_token_counts(self, bundle: ProcessorBundle, example: Example | ChatExample) -> tuple[int, ...]:
        sizes = [
            image.size if bundle.image_size is None else (bundle.image_size, bundle.image_size)
            for image in example.images
        ]
        return tuple(self.image_token_count(width, height, bundle=bundle) for width, height in sizes)

    def _sequence(
        self,
        bundle: ProcessorBundle,
        example: Example | ChatExample,
        tokens_per_image: Sequence[int],
        with_target: bool,
    ) -> tuple[list[int], list[bool]]:
        """(input ids with expanded image spans, which of them carry labels)."""
        from rmpl_ds.example import ChatExample

        if isinstance(example, ChatExample):
            return self._chat_sequence(bundle, example, tokens_per_image, with_target)
        prompt_ids, answer_ids, n_labelled = self._token_ids(bundle, example, tokens_per_image, with_target)
        labelled = [False] * len(prompt_ids) + [True] * n_labelled + [False] * (len(answer_ids) - n_labelled)
        return prompt_ids + answer_ids, labelled

    def _token_ids(
        self, bundle: ProcessorBundle, example: Example, tokens_per_image: Sequence[int], with_target: bool
    ) -> tuple[list[int], list[int], int]:
        """(prompt ids with expanded image spans, answer ids, how many answer ids carry labels)."""
        prompt_text = self.render(bundle, example, with_target=False)
        prompt_ids = self._expand_placeholders(bundle, self._tokenize(bundle, prompt_text), tokens_per_image, example)
        if not with_target:
            return prompt_ids, [], 0
        full_text = self.render(bundle, example, with_target=True)
        if not full_text.startswith(prompt_text):
            raise RuntimeError(
                f"{self.family} chat template renders the prompt differently with and without the answer; "
                "labels cannot be placed"
            )
        answer_ids = self._tokenize(bundle, full_text[len(prompt_text) :])
        return prompt_ids, answer_ids, self._labelled_length(bundle, answer_ids)

    @staticmethod
    def _labelled_length(bundle: ProcessorBundle, answer_ids: Sequence[int]) -> int:
        """How many of an assistant turn's ids carry labels: up to and including its end-of-turn token; what the
        template adds after it (a newline) is not something the model must learn to emit."""
        ends = [index for index, token in enumerate(answer_ids) if token == bundle.special.end_of_turn]
        return ends[-1] + 1 if ends else len(answer_ids)

    def chat_segments(
        self, bundle: ProcessorBundle, example: ChatExample, *, with_target: bool
    ) -> list[tuple[str, bool]]:
        """The chat text of a conversation cut where labels start and stop: ``(text, is an assistant turn the loss
        covers)`` in order, joining to the template's rendering of the whole conversation (``with_target``) or of
        the conversation before its last assistant turn, ending in the generation prompt.

        An assistant piece is what the template writes between the generation prompt (``<|im_start|>assistant\n``)
        and the next turn: the content, the end-of-turn token and what follows it. It is found by rendering the
        conversation up to each assistant turn with and without it, so it holds for any template that renders a
        conversation's prefix as a prefix of its rendering (checked: RuntimeError otherwise).
        """
        messages = list(example.messages)
        labelled = set(example.labelled_turns())
        last = example.assistant_turns[-1]
        stop = len(messages) if with_target else last
        segments: list[tuple[str, bool]] = []
        done = ""
        for index in example.assistant_turns:
            if index >= stop:
                break
            before = self._render_messages(bundle, messages[:index], generation_prompt=True)
            after = self._render_messages(bundle, messages[: index + 1], generation_prompt=False)
            if not (before.startswith(done) and after.startswith(before)):
                raise RuntimeError(
                    f"{self.family} chat template does not render a conversation's beginning as the beginning of "
                    "its rendering; labels cannot be placed"
                )
            segments += [(before[len(done) :], False), (after[len(before) :], index in labelled)]
            done = after
        end = (
            self._render_messages(bundle, messages, generation_prompt=False)
            if with_target
            else self._render_messages(bundle, messages[:last], generation_prompt=True)
        )
        if not end.startswith(done):
            raise RuntimeError(f"{self.family} chat template renders the conversation's end inconsistently")
        if end[len(done) :]:
            segments.append((end[len(done) :], False))
        return segments

    def _chat_sequence(
        self, bundle: ProcessorBundle, example: ChatExample, tokens_per_image: Sequence[int], with_target: bool
    ) -> tuple[list[int], list[bool]]:
        ids: list[int] = []
        labelled: list[bool] = []
        for text, is_target in self.chat_segments(bundle, example, with_target=with_target):
            piece = self._tokenize(bundle, text)
            n_labelled = self._labelled_length(bundle, piece) if is_target else 0
            ids += piece
            labelled += [True] * n_labelled + [False] * (len(piece) - n_labelled)
        return self._expand_placeholders_with_flags(bundle, ids, labelled, tokens_per_image, example)

    def _render_messages(
        self, bundle: ProcessorBundle, messages: list[dict[str, Any]], *, generation_prompt: bool
    ) -> str:
        if not messages and not generation_prompt:
            return ""
        return bundle.tokenizer.apply_chat_template(
            messages, chat_template=self.spec.chat_template, tokenize=False, add_generation_prompt=generation_prompt
        )

    @staticmethod
    def _check_prompt_fits(
        example: Example | ChatExample,
        input_ids: Sequence[int],
        labelled: Sequence[bool],
        tokens_per_image: Sequence[int],
        max_seq_len: int,
        with_target: bool,
    ) -> None:
        """SequenceTooLongError when the prompt (what comes before the first labelled token) leaves no room for
        the target. A conversation for training is exempt: chat data has long tails, so one that does not fit is cut
        like a long target (counted and logged) instead of stopping the run."""
        from rmpl_ds.example import ChatExample

        if with_target and isinstance(example, ChatExample):
            return
        prompt_length = labelled.index(True) if True in labelled else len(input_ids)
        room_for_target = 1 if with_target else 0
        if prompt_length + room_for_target > max_seq_len:
            raise SequenceTooLongError(
                f"example {example.key!r} (source {example.source!r}, task {example.task!r}): the prompt is "
                f"{prompt_length} tokens ({sum(tokens_per_image)} of them image tokens), which leaves no room for "
                f"the target within max_seq_len={max_seq_len}; raise max_seq_len or shorten the prompt"
            )

    def dummy_image_inputs(self, bundle: ProcessorBundle) -> dict[str, Any]:
        """A minimal black image as an encoded fragment: ``input_ids`` (its image span), ``mm_token_type_ids``
        (Qwen) and pixel inputs. The collator appends it, masked and unlabelled, to a micro-batch that has no
        image, so the vision tower (and its collectives under ZeRO) runs on every rank every step while the
        loss and the real tokens' outputs stay unchanged."""
        import torch
        from PIL import Image

        image_inputs = self.process_images(bundle, [Image.new("RGB", self.dummy_image_size(bundle), (0, 0, 0))])
        ids = torch.tensor(self.image_span(bundle.special, image_inputs.tokens_per_image[0]), dtype=torch.long)
        fragment: dict[str, Any] = {"input_ids": ids, **image_inputs.tensors}
        if self.spec.uses_mm_token_type_ids:
            fragment["mm_token_type_ids"] = (ids == bundle.special.image).to(torch.int32)
        return fragment

    @staticmethod
    def protocol_resize(image: Image.Image, image_size: int | None) -> Image.Image:
        """The paper's preprocessing: RGB, resized to ``image_size``×``image_size`` (bicubic)."""
        from PIL import Image as PILImage

        image = image.convert("RGB") if image.mode != "RGB" else image
        if image_size is None or image.size == (image_size, image_size):
            return image
        return image.resize((image_size, image_size), PILImage.Resampling.BICUBIC)

    # ------------------------------------------------------------------ helpers

    def _tokenize(self, bundle: ProcessorBundle, text: str) -> list[int]:
        return bundle.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _expand_placeholders(
        self, bundle: ProcessorBundle, ids: list[int], tokens_per_image: Sequence[int], example: Example
    ) -> list[int]:
        """Replace each image placeholder the template wrote with the image's full token span."""
        expanded, _ = self._expand_placeholders_with_flags(bundle, ids, [False] * len(ids), tokens_per_image, example)
        return expanded

    def _expand_placeholders_with_flags(
        self,
        bundle: ProcessorBundle,
        ids: list[int],
        flags: list[bool],
        tokens_per_image: Sequence[int],
        example: Example | ChatExample,
    ) -> tuple[list[int], list[bool]]:
        """:meth:`_expand_placeholders`, carrying a per-id flag along (image spans get False)."""
        placeholder = self._tokenize(bundle, self.spec.template_image_placeholder)
        expanded: list[int] = []
        expanded_flags: list[bool] = []
        image_index = 0
        position = 0
        width = len(placeholder)
        while position < len(ids):
            if ids[position : position + width] == placeholder:
                if image_index >= len(tokens_per_image):
                    break
                span = self.image_span(bundle.special, tokens_per_image[image_index])
                expanded.extend(span)
                expanded_flags.extend([False] * len(span))
                image_index += 1
                position += width
            else:
                expanded.append(ids[position])
                expanded_flags.append(flags[position])
                position += 1
        n_image_ids = sum(1 for token in ids if token == bundle.special.image)
        if image_index != len(tokens_per_image) or n_image_ids != len(tokens_per_image):
            raise UserError(
                f"example {example.key!r} (source {example.source!r}): {len(tokens_per_image)} image(s) but the "
                f"rendered prompt has {n_image_ids} image placeholder token(s) ({self.spec.image_token!r}); "
                "the prompt or system text must not contain image tokens"
            )
        return expanded, expanded_flags

    def _special_token_ids(self, tokenizer: PreTrainedTokenizerBase, model_dir: Path) -> SpecialTokenIds:
        spec = self.spec
        names = {
            "pad": spec.pad_token,
            "end_of_turn": spec.end_of_turn_token,
            "image": spec.image_token,
            "image_start": spec.image_start_token,
            "image_end": spec.image_end_token,
        }
        vocab = tokenizer.get_vocab()
        missing = [token for token in names.values() if token not in vocab]
        if missing:
            raise UserError(f"{model_dir}: the tokenizer lacks the {self.family} special tokens {missing}")
        ids = {role: vocab[token] for role, token in names.items()}
        stop = tuple(dict.fromkeys([ids["end_of_turn"], ids["pad"]]))
        return SpecialTokenIds(stop=stop, **ids)
