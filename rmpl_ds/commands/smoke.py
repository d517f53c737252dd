"""Smoke-test a backbone offline: build its tiny random-init variant, render one example of every task (the image
tasks with an image), run one forward and backward pass in the chosen mode by each loss path (the target-only LM
head training uses, and full logits for every position, the reference), and report both losses, the largest relative
gradient difference between them (a one-command check that the lean path is exact on this install), the trainable
and total parameter counts and the fraction of label tokens.

Nothing is downloaded: the tiny model (real architecture class, locally trained tokenizer) is written to a
temporary directory and read back through the same ``from_pretrained`` path the 7-8B checkpoints use. Exits
non-zero when anything fails, including a non-finite loss or trainable weights that got no gradient.

Example:
  rmpl-ds smoke --backbone qwen2-vl --mode qlora --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmpl_ds.backbones import FAMILIES
from rmpl_ds.backbones.loading import MODES

if TYPE_CHECKING:
    from rmpl_ds.example import Example
    from rmpl_ds.grounding import BoxSyntax

HELP = "build a tiny offline backbone and run one forward/backward on every task"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, choices=sorted(FAMILIES), help="backbone family")
    parser.add_argument("--mode", default="lora", choices=MODES, help="training mode (default: lora)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny model's weights and the examples")
    parser.add_argument("--max-seq-len", type=int, default=1024, help="token budget per example (default: 1024)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def smoke_examples(seed: int = 0, boxes: BoxSyntax | None = None) -> list[Example]:
    """One rendered Example per task of :data:`rmpl_ds.tasks.TASKS`: ``t`` on a sentence, ``r`` on an MNRE-style
    pair with its image, ``i`` / ``EM`` / ``AR`` / ``joint`` / ``vs`` on a synthetic scene drawn like the demo's
    (``joint`` with the schema-guided prompt, the longest), ``ts`` on a schema question; image arguments in
    ``boxes`` (default: the plain syntax)."""
    from rmpl_ds import tasks
    from rmpl_ds.grounding import PLAIN

    boxes = boxes or PLAIN
    from rmpl_ds.ontology import DEFINITIONS, IMAGE_ROLES, TEXT_ROLES
    from rmpl_ds.records import (
        EntityMention,
        ImageEvent,
        ImageRecord,
        RelationPair,
        SchemaQuestion,
        TextArgument,
        TextEvent,
        TextSentence,
        Trigger,
        VisualArgument,
    )
    from rmpl_ds.sources.demo import draw_scene

    rng = random.Random(seed)
    width, height = 320, 240
    scene, drawn = draw_scene(rng, width, height, "Justice:Arrest-Jail", ["Agent", "Person"])
    picture = ImageRecord(
        id="smoke-image",
        source="smoke",
        split="train",
        image="smoke-image.jpg",
        width=width,
        height=height,
        events=(ImageEvent("Justice:Arrest-Jail", tuple(VisualArgument(role, box) for role, box in drawn)),),
    )
    sentence = TextSentence(
        id="smoke-sentence",
        source="smoke",
        split="train",
        tokens=("Rebels", "attacked", "the", "village", "near", "Gaza", "on", "Monday", "."),
        events=(
            TextEvent(
                "Conflict:Attack",
                Trigger(1, 2, "attacked"),
                (TextArgument("Attacker", 0, 1, "Rebels"), TextArgument("Target", 3, 4, "village")),
            ),
        ),
    )
    pair = RelationPair(
        id="smoke-pair",
        source="smoke",
        split="train",
        tokens=("Barack", "Obama", "and", "his", "wife", "Michelle", "in", "Paris", "."),
        head=EntityMention("Barack Obama", 0, 2),
        tail=EntityMention("Michelle", 5, 6),
        relation="/per/per/couple",
        image="smoke-pair.jpg",
    )
    pair_image, _ = draw_scene(rng, width, height, None, [])
    arrest = "Justice:Arrest-Jail"
    question = SchemaQuestion(
        id=f"smoke:{arrest}:roles",
        source="smoke",
        split="train",
        event_type=arrest,
        form="roles",
        definition=DEFINITIONS[arrest],
        text_roles=TEXT_ROLES[arrest],
        image_roles=IMAGE_ROLES[arrest],
    )
    examples = [
        tasks.render(sentence, "t"),
        tasks.render(picture, "i", image=scene, boxes=boxes),
        tasks.render(pair, "r", image=pair_image),
        tasks.render(picture, "EM", image=scene),
        tasks.render(picture, "AR", image=scene, event_type=arrest, boxes=boxes),
        tasks.render(picture, "joint", image=scene, boxes=boxes, schema_guided=True),
        tasks.render(picture, "vs", image=scene),
        tasks.render(question, "ts"),
    ]
    assert {example.task for example in examples} == set(tasks.TASKS), "smoke must cover every task"
    return examples


def smoke(backbone: str, mode: str, *, seed: int = 0, max_seq_len: int = 1024) -> dict[str, Any]:
    """Build, load, encode, forward, backward by both loss paths; return the measurements (module docstring).

    Raises:
        RuntimeError: a non-finite loss, or a trainable parameter without a finite gradient.
    """
    import torch

    from rmpl_ds.backbones import get_adapter
    from rmpl_ds.backbones.loading import count_parameters
    from rmpl_ds.backbones.tiny import build_tiny

    adapter = get_adapter(backbone)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rmpl-smoke-") as tmp:
        torch.manual_seed(seed)
        model_dir = build_tiny(backbone, Path(tmp) / f"tiny-{backbone}", seed=seed)
        model, bundle = adapter.load(model_dir, mode)
        examples = smoke_examples(seed, boxes=bundle.box_syntax("native"))
        encoded = [bundle.encode(example, max_seq_len=max_seq_len) for example in examples]
        batch = bundle.collator()(encoded)
        lean_loss, lean_grads = _loss_and_gradients(model, batch, "target_only", seed)
        full_loss, full_grads = _loss_and_gradients(model, batch, "full_logits", seed)
        trainable_params, total_params = count_parameters(model)
    stats = batch["stats"]
    return {
        "loss": lean_loss,
        "loss_full_logits": full_loss,
        "max_grad_rel_diff": _max_relative_difference(lean_grads, full_grads),
        "trainable_params": trainable_params,
        "total_params": total_params,
        "label_fraction": stats.target_tokens / stats.real_tokens,
        "_details": {
            "examples": stats.examples,
            "images": stats.images,
            "real_tokens": stats.real_tokens,
            "target_tokens": stats.target_tokens,
            "seconds": time.perf_counter() - started,
        },
    }


def _loss_and_gradients(model: Any, batch: dict[str, Any], path: str, seed: int) -> tuple[float, dict[str, Any]]:
    """One forward (the training loss, ``path`` of rmpl_ds.loss) and backward; the loss and every trainable
    parameter's gradient. The same seed before each path gives both the same dropout masks."""
    import torch

    from rmpl_ds.collate import model_inputs
    from rmpl_ds.loss import forward_loss

    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in model_inputs(batch).items()}
    labels = inputs.pop("labels")
    torch.manual_seed(seed)
    loss = forward_loss(model, inputs, labels, torch.ones(len(labels)), path=path).loss  # type: ignore[arg-type]
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()} ({path})")
    loss.backward()
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    without_grad = [name for name, parameter in trainable if parameter.grad is None]
    if without_grad:
        raise RuntimeError(f"{len(without_grad)} trainable tensors got no gradient, e.g. {without_grad[:3]}")
    if not all(torch.isfinite(parameter.grad).all() for _, parameter in trainable):
        raise RuntimeError(f"non-finite gradients ({path})")
    if not any(parameter.grad.abs().sum() > 0 for _, parameter in trainable):
        raise RuntimeError("every gradient is zero: nothing would train")
    return float(loss.item()), {name: parameter.grad.detach().clone() for name, parameter in trainable}


def _max_relative_difference(lean: dict[str, Any], reference: dict[str, Any]) -> float:
    """max over parameters of max|lean - reference| / max|reference| (parameters whose reference gradient is
    exactly zero, e.g. LoRA's A before B has moved, compare in absolute terms)."""
    worst = 0.0
    for name, expected in reference.items():
        scale = float(expected.abs().max())
        difference = float((lean[name] - expected).abs().max())
        worst = max(worst, difference / scale if scale > 0 else difference)
    return worst


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    # Progress bars of the tiny model's save/load would bury the one line this command prints.
    hf_logging.disable_progress_bar()
    try:
        # Libraries that print to stdout while importing (DeepSpeed's accelerator notice) must not break --json.
        with contextlib.redirect_stdout(sys.stderr):
            result = smoke(args.backbone, args.mode, seed=args.seed, max_seq_len=args.max_seq_len)
    except RuntimeError as error:
        print(f"rmpl-ds smoke: {args.backbone} {args.mode} failed: {error}", file=sys.stderr)
        return 1
    details = result.pop("_details")
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(
            f"{args.backbone} {args.mode}: loss {result['loss']:.4f} (target-only LM head; full logits "
            f"{result['loss_full_logits']:.4f}, largest relative gradient difference "
            f"{result['max_grad_rel_diff']:.1e}), "
            f"trainable {result['trainable_params']:,} of {result['total_params']:,} parameters, label tokens "
            f"{result['label_fraction']:.1%} of {details['real_tokens']} ({details['examples']} examples, "
            f"{details['images']} images, {details['seconds']:.1f} s)"
        )
    return 0
