"""Greedy generation for evaluation: the answers a loaded backbone writes for rendered Examples.

Decoding is greedy (one beam, no sampling) so that a score is a property of the weights. The model directory's
``generation_config.json`` is honoured where it does not conflict with that: its end tokens (joined with the
family's end-of-turn and padding tokens), ``repetition_penalty``, ``no_repeat_ngram_size`` and ``bad_words_ids``
apply; its sampling settings (``do_sample``, ``temperature``, ``top_k``, ``top_p``) and beam count do not.
Answers are decoded up to the first end token with special tokens kept, since a native grounding syntax writes
boxes with them (``<|box_start|>``, ``<ref>``; rmpl_ds.grounding).

Confidence (:func:`generate_scored`, X-MTL's pseudo-label filter, rmpl_ds.pseudo). The confidence of a greedy
answer is its **sequence probability per token**: ``exp(mean log p(y_t | x, y_<t))`` over the generated tokens up to
and including the first end token (all of them when ``max_new_tokens`` ran out first), where ``p`` is the model's
own softmax over its raw logits, before the decoding constraints above (a repetition penalty or banned words change
what greedy picks, not what the model believes). The mean, not the total, because a total log-probability falls
with the answer's length: a correct three-type EM answer would score below a wrong one-type one. The total is
returned too (:attr:`ScoredAnswer.total_log_prob`; ``exp`` of it is the probability of the whole path).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmpl_ds.log import get_logger

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from rmpl_ds.backbones.adapter import ProcessorBundle
    from rmpl_ds.example import Example

logger = get_logger(__name__)

# generation_config.json keys that keep decoding greedy and are taken over.
HONOURED = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids")


def generation_config(bundle: ProcessorBundle, *, max_new_tokens: int) -> GenerationConfig:
    """Greedy decoding with the checkpoint's own end tokens and repetition settings (see the module docstring)."""
    from transformers import GenerationConfig

    stop = list(bundle.special.stop)
    honoured: dict[str, Any] = {}
    published = _published_generation_config(bundle.path)
    if published is not None:
        eos = published.eos_token_id
        for token in [eos] if isinstance(eos, int) else list(eos or []):
            if token not in stop:
                stop.append(token)
        defaults = GenerationConfig()
        honoured = {
            key: getattr(published, key)
            for key in HONOURED
            if getattr(published, key, None) is not None and getattr(published, key) != getattr(defaults, key)
        }
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stop,
        pad_token_id=bundle.special.pad,
        use_cache=True,
        **honoured,
    )


@dataclass(frozen=True)
class ScoredAnswer:
    """A greedy answer with its confidence (module docstring).

    Attributes:
        text: the answer decoded up to the first end token (special tokens kept), as :func:`generate` returns it.
        confidence: ``exp(total_log_prob / len(token_ids))``, in (0, 1].
        total_log_prob: the sum of the scored tokens' log-probabilities (the end token included).
        token_ids: the scored tokens: the answer's, then its end token if it wrote one before the length cap.
    """

    text: str
    confidence: float
    total_log_prob: float
    token_ids: tuple[int, ...] = ()


def generate(
    model: Any,
    bundle: ProcessorBundle,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 256,
    max_seq_len: int = 4096,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers for ``examples`` (their targets are ignored), decoded up to the first end token.

    Batches are left-padded; the model's train/eval mode is restored afterwards.
    """
    scored = _generate(
        model, bundle, examples, max_new_tokens=max_new_tokens, max_seq_len=max_seq_len, batch_size=batch_size,
        with_scores=False,
    )  # fmt: skip
    return [answer.text for answer in scored]


def generate_scored(
    model: Any,
    bundle: ProcessorBundle,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 256,
    max_seq_len: int = 4096,
    batch_size: int = 8,
) -> list[ScoredAnswer]:
    """:func:`generate`, with each answer's confidence (the module docstring defines it); the texts are the same."""
    return _generate(
        model, bundle, examples, max_new_tokens=max_new_tokens, max_seq_len=max_seq_len, batch_size=batch_size,
        with_scores=True,
    )  # fmt: skip


def _generate(
    model: Any,
    bundle: ProcessorBundle,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    max_seq_len: int,
    batch_size: int,
    with_scores: bool,
) -> list[ScoredAnswer]:
    """Greedy generation in left-padded batches; without ``with_scores`` the confidences are NaN."""
    import torch

    from rmpl_ds.collate import Collator, model_inputs

    collator = Collator(pad_token_id=bundle.special.pad, padding_side="left")
    config = generation_config(bundle, max_new_tokens=max_new_tokens)
    if with_scores:
        # output_logits: the raw logits (output_scores holds them after the logits processors).
        config.update(return_dict_in_generate=True, output_scores=True, output_logits=True)
    stop = set(config.eos_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[ScoredAnswer] = []
    try:
        for start in range(0, len(examples), batch_size):
            encoded = [
                bundle.encode(example, max_seq_len=max_seq_len, with_target=False)
                for example in examples[start : start + batch_size]
            ]
            inputs = {key: value.to(device) for key, value in model_inputs(collator(encoded)).items()}
            with torch.no_grad():
                output = model.generate(**inputs, generation_config=config)
            log_probs = None
            sequences = output
            if with_scores:
                sequences = output.sequences
                log_probs = model.compute_transition_scores(sequences, output.logits, normalize_logits=True)
                log_probs = log_probs.float().cpu().tolist()
            for number, row in enumerate(sequences[:, inputs["input_ids"].shape[1] :].tolist()):
                end = next((index for index, token in enumerate(row) if token in stop), len(row))
                text = bundle.tokenizer.decode(row[:end], skip_special_tokens=False)
                if log_probs is None:
                    answers.append(ScoredAnswer(text, math.nan, math.nan))
                    continue
                length = min(end + 1, len(row))
                total = math.fsum(log_probs[number][:length])
                answers.append(ScoredAnswer(text, math.exp(total / length), total, tuple(row[:length])))
    finally:
        model.train(was_training)
    return answers


def _published_generation_config(model_dir: Path) -> GenerationConfig | None:
    from transformers import GenerationConfig

    if not (Path(model_dir) / "generation_config.json").is_file():
        return None
    return GenerationConfig.from_pretrained(model_dir)
