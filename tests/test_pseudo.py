"""Pseudo-labels (rmpl_ds.pseudo, `rmpl-ds pseudo-label`): the filter rule, the answer confidence, the pairs
converter, the kept path with an oracle in place of generation, and the CLI on a tiny random Qwen2-VL, 1 vs 2 ranks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from rmpl_ds.cli import main
from rmpl_ds.commands.shards import build
from rmpl_ds.errors import UserError
from rmpl_ds.evaluate.generate import ScoredAnswer
from rmpl_ds.example import Example
from rmpl_ds.grounding import PLAIN
from rmpl_ds.ontology import IMAGE_ROLES
from rmpl_ds.pseudo import (
    DISAGREE,
    LOW_CONFIDENCE_IMAGE,
    LOW_CONFIDENCE_TEXT,
    NO_EVENT,
    NO_TRIGGER,
    REJECTION_REASONS,
    UNPARSABLE,
    Decision,
    PairItem,
    decide,
    export_digest,
    label_pairs,
    load_pairs,
)
from rmpl_ds.records import CaptionPair, ImageRecord, TextSentence, from_json
from rmpl_ds.shards import ShardSet, read_manifest, verify_shards
from rmpl_ds.sources import SOURCES
from rmpl_ds.sources.base import DUPLICATE_ID, IMAGE_NOT_FOUND, MALFORMED, MISSING_FIELD, SourceError
from rmpl_ds.sources.demo import PAIR_KINDS, SUMMARY_NAME, TRIGGERS, TYPE_GLYPHS, write_demo
from rmpl_ds.sources.pairs import EMPTY_CAPTION, UNSAFE_PATH, tokenize_caption
from rmpl_ds.tasks import Parsed

ATTACK, DIE, MEET = "Conflict:Attack", "Life:Die", "Contact:Meet"


def em(*types: str, errors: int = 0) -> Parsed:
    return Parsed(task="EM", event_types=types, errors=errors)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "raw"
    write_demo(root, seed=0, size=30)
    return root


@pytest.fixture(scope="module")
def pairs_shards(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "pairs"
    assert build("pairs", demo / "pairs", out_dir=out) == 0
    return out


@pytest.fixture
def one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------
# decide(): the filter


@pytest.mark.parametrize(
    ("text", "text_conf", "image", "image_conf", "expected"),
    [
        (em(ATTACK), 0.9, em(ATTACK), 0.85, Decision(True, (ATTACK,), None)),
        # the agreed types are the intersection, in EVENT_TYPES order
        (em(DIE, ATTACK), 0.9, em(MEET, DIE, ATTACK), 0.9, Decision(True, (ATTACK, DIE), None)),
        (em(ATTACK), 0.8, em(ATTACK), 0.8, Decision(True, (ATTACK,), None)),  # >= threshold passes
        (em(ATTACK), 0.99, em(DIE), 0.99, Decision(False, (), DISAGREE)),
        (em(ATTACK), 0.79, em(ATTACK), 0.99, Decision(False, (), LOW_CONFIDENCE_TEXT)),
        (em(ATTACK), 0.99, em(ATTACK), 0.5, Decision(False, (), LOW_CONFIDENCE_IMAGE)),
        (em(ATTACK), float("nan"), em(ATTACK), 0.99, Decision(False, (), LOW_CONFIDENCE_TEXT)),
        (em(ATTACK, errors=1), 0.99, em(ATTACK), 0.99, Decision(False, (), UNPARSABLE)),
        (em(ATTACK), 0.99, em(errors=1), 0.99, Decision(False, (), UNPARSABLE)),
        (em(), 0.99, em(ATTACK), 0.99, Decision(False, (), NO_EVENT)),
        (em(ATTACK), 0.99, em(), 0.99, Decision(False, (), NO_EVENT)),
        # the first failing rule names the rejection: unparsable before none before disagree before confidence
        (em(errors=2), 0.1, em(), 0.1, Decision(False, (), UNPARSABLE)),
        (em(), 0.1, em(DIE), 0.1, Decision(False, (), NO_EVENT)),
        (em(ATTACK), 0.1, em(DIE), 0.1, Decision(False, (), DISAGREE)),
        (em(ATTACK), 0.1, em(ATTACK), 0.1, Decision(False, (), LOW_CONFIDENCE_TEXT)),
    ],
)
def test_decide(text: Parsed, text_conf: float, image: Parsed, image_conf: float, expected: Decision) -> None:
    assert decide(text, text_conf, image, image_conf, 0.8) == expected


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.01, float("nan")])
def test_decide_refuses_a_threshold_outside_0_1(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        decide(em(ATTACK), 0.9, em(ATTACK), 0.9, threshold)


# ---------------------------------------------------------------------------------------------------------------
# The confidence of a greedy answer


def test_confidence_is_the_mean_token_probability_of_a_teacher_forced_pass(
    tiny_model_dir: Callable[[str], Path], demo: Path, one_thread: None
) -> None:
    import torch

    from rmpl_ds.collate import Collator, model_inputs
    from rmpl_ds.evaluate.generate import generate, generate_scored
    from rmpl_ds.evaluate.infer import load_for_inference, resolve_model
    from rmpl_ds.images import load_image
    from rmpl_ds.tasks import render

    model, bundle = load_for_inference(resolve_model(tiny_model_dir("qwen2-vl")), "cpu")
    pair = SOURCES["pairs"](demo / "pairs").records[0]
    image = load_image(demo / "pairs" / pair.image)
    examples = [
        render(TextSentence("a", "pairs", "train", pair.tokens), "EM"),
        render(TextSentence("b", "pairs", "train", ("Police", "met", "him", ".")), "EM"),
        render(ImageRecord("c", "pairs", "train", pair.image, *image.size), "EM", image=image),
    ]
    # A batch of two (left padding) and one of one, and a length cap short enough that some answer hits it.
    scored = generate_scored(model, bundle, examples, max_new_tokens=6, batch_size=2)
    assert [answer.text for answer in scored] == generate(model, bundle, examples, max_new_tokens=6, batch_size=2)
    stop = set(bundle.special.stop)
    for example, answer in zip(examples, scored, strict=True):
        assert 1 <= len(answer.token_ids) <= 6 and not stop & set(answer.token_ids[:-1])
        encoded = bundle.encode(example, max_seq_len=4096, with_target=False)
        prompt_length = len(encoded["input_ids"])
        answer_ids = torch.tensor(answer.token_ids)
        encoded = {**encoded, "input_ids": torch.cat([encoded["input_ids"], answer_ids])}
        encoded["attention_mask"] = torch.ones_like(encoded["input_ids"])
        if "mm_token_type_ids" in encoded:  # the answer's tokens are text (type 0)
            encoded["mm_token_type_ids"] = torch.cat([encoded["mm_token_type_ids"], torch.zeros_like(answer_ids)])
        batch = model_inputs(Collator(pad_token_id=bundle.special.pad, padding_side="left")([encoded]))
        with torch.no_grad():
            logits = model(**batch).logits[0].double()
        log_probs = torch.log_softmax(logits[prompt_length - 1 : -1], dim=-1)
        chosen = log_probs.gather(1, torch.tensor(answer.token_ids)[:, None])[:, 0]
        assert answer.total_log_prob == pytest.approx(float(chosen.sum()), abs=1e-4)
        assert answer.confidence == pytest.approx(float(chosen.mean().exp()), abs=1e-5)
        assert 0.0 < answer.confidence <= 1.0


# ---------------------------------------------------------------------------------------------------------------
# The pairs converter


def test_tokenize_caption_splits_outer_punctuation_only() -> None:
    assert tokenize_caption('FILE - "Police arrested him in Lagos, Nigeria."') == (
        "FILE", "-", '"', "Police", "arrested", "him", "in", "Lagos", ",", "Nigeria", ".", '"',
    )  # fmt: skip
    assert tokenize_caption("U.S. troops (right) paid $500-dollar fines; don't!") == (
        "U.S.", "troops", "(", "right", ")", "paid", "$500-dollar", "fines", ";", "don't", "!",
    )  # fmt: skip
    assert tokenize_caption("  ...  ") == ("...",) and tokenize_caption(" \t") == ()


def test_the_demo_pairs_convert_with_their_summary_counts(demo: Path) -> None:
    conversion = SOURCES["pairs"](demo / "pairs", strict=True)
    summary = json.loads((demo / SUMMARY_NAME).read_text())["counts"]["pairs"]
    assert conversion.format == "imagefolder" and conversion.skipped == []
    assert conversion.counts["records"] == summary["pairs"] == 10
    assert conversion.counts["by_split"] == {"train": 10}
    assert summary["by_kind"] == {"agree": 5, "disagree": 2, "image_only": 1, "negative": 1, "text_only": 1}
    first = conversion.records[0]
    assert isinstance(first, CaptionPair) and first.id == "voa_demo_00000" and first.image == "pair_00000.jpg"
    assert first.tokens[-1] == "." and min(first.width, first.height) == 224


def test_pairs_converter_skips_bad_lines_with_file_and_line(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "pairs"
    (root / "test").mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 20, 30)).save(root / "a.jpg")
    Image.new("RGB", (20, 50), (10, 20, 30)).save(root / "test" / "b.png")
    lines = [
        '{"file_name": "a.jpg", "text": "Rebels attacked the town."}',
        "",
        "{not json",
        '["a list"]',
        '{"file_name": "a.jpg"}',
        '{"file_name": "missing.jpg", "text": "x"}',
        '{"file_name": "../a.jpg", "text": "x"}',
        '{"file_name": "a.jpg", "text": "   "}',
        '{"file_name": "a.jpg", "text": "again", "id": "a.jpg"}',
        '{"file_name": "a.jpg", "text": "own id", "id": 7, "document_id": "doc1", "extra": 1}',
    ]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (root / "test" / "metadata.jsonl").write_text('{"file_name": "b.png", "text": "A rally."}\n')
    conversion = SOURCES["pairs"](root)
    assert [(record.id, record.split, record.width, record.height) for record in conversion.records] == [
        ("a.jpg", "train", 40, 30),
        ("7", "train", 40, 30),
        ("test/b.png", "test", 20, 50),
    ]
    assert conversion.records[1].document_id == "doc1"
    metadata = str(root / "metadata.jsonl")
    assert [(skip.file, skip.line_or_key, skip.reason) for skip in conversion.skipped] == [
        (metadata, "3", MALFORMED),
        (metadata, "4", "wrong field type"),
        (metadata, "5", MISSING_FIELD),
        (metadata, "6", IMAGE_NOT_FOUND),
        (metadata, "7", UNSAFE_PATH),
        (metadata, "8", EMPTY_CAPTION),
        (metadata, "9", DUPLICATE_ID),
    ]
    with pytest.raises(SourceError, match=r"metadata.jsonl:3: malformed input"):
        SOURCES["pairs"](root, strict=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"no metadata\.jsonl"):
        SOURCES["pairs"](empty)


def test_pairs_shards_store_the_image_like_image_records(pairs_shards: Path, demo: Path) -> None:
    assert verify_shards(pairs_shards) == []
    with ShardSet.open(pairs_shards) as shards:
        sample = shards.read(0)
        assert sorted(sample) == ["jpg", "json"]
        record = from_json(sample["json"])
        assert isinstance(record, CaptionPair) and sample["jpg"].size == (record.width, record.height)
    assert main(["shards", "build", "--source", "pairs", "--input", str(demo / "pairs"), "--no-images",
                 "--out", str(pairs_shards.parent / "no")]) == 2  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The kept path, with an oracle reading the demo's cues in place of a trained model


def _type_of_image(image: object) -> str | None:
    """The demo's image cue: the type colour covering the most pixels (at least 2%), as tests/test_demo_data.py."""
    pixels = np.asarray(image.reduce(2)).astype(np.int16)  # type: ignore[attr-defined]
    coverage = {
        event_type: int((np.abs(pixels - np.array(colour)).max(axis=2) < 40).sum())
        for event_type, (_, colour) in TYPE_GLYPHS.items()
    }
    best = max(coverage, key=coverage.__getitem__)
    return best if coverage[best] > 0.02 * pixels.shape[0] * pixels.shape[1] else None


def oracle(low_confidence_image: frozenset[str] = frozenset()) -> Callable[[Sequence[Example]], list[ScoredAnswer]]:
    """Answers EM from the demo's cues (trigger words, shape colours), AR with the trigger word (text) or one box of
    the type's first image role (image); confidences 0.95, or 0.5 for the images of ``low_confidence_image``."""
    owner = {word: event_type for event_type, words in TRIGGERS.items() for word in words}

    def answer(example: Example) -> ScoredAnswer:
        confidence = 0.95
        if example.meta["modality"] == "text":
            tokens = example.meta["tokens"]
            if example.task == "EM":
                types = [owner[token] for token in tokens if token in owner]
                return ScoredAnswer(" ; ".join(types) or "none", confidence, 0.0)
            event_type = example.meta["event_type"]
            trigger = next((t for t in tokens if t in TRIGGERS[event_type]), "nowhere")
            return ScoredAnswer(trigger, 0.7, 0.0)
        if example.key in low_confidence_image:
            confidence = 0.5
        if example.task == "EM":
            return ScoredAnswer(_type_of_image(example.images[0]) or "none", confidence, 0.0)
        return ScoredAnswer(f"{IMAGE_ROLES[example.meta['event_type']][0]}: [100,200,300,400]", 0.6, 0.0)

    return lambda examples: [answer(example) for example in examples]


def test_label_pairs_keeps_the_agreeing_pairs_of_the_demo(pairs_shards: Path) -> None:
    items = load_pairs(pairs_shards)
    kinds = [PAIR_KINDS[item.index % len(PAIR_KINDS)] for item in items]
    shards = ShardSet.open(pairs_shards)
    low = frozenset({items[2].pair.id})  # an agreeing pair whose image answer is unsure

    results = label_pairs(items, oracle(low), lambda item: shards.read(item.index)["jpg"], threshold=0.8, boxes=PLAIN)
    reasons = [result.reason for result in results]
    expected = {"agree": None, "disagree": DISAGREE, "text_only": NO_EVENT, "image_only": NO_EVENT}
    assert reasons == [LOW_CONFIDENCE_IMAGE if n == 2 else expected.get(kind, NO_EVENT) for n, kind in enumerate(kinds)]
    kept = [result for result in results if result.kept]
    assert len(kept) == 4
    for result in kept:
        text, image = (from_json(obj) for obj in result.records)
        pair = items[result.index].pair
        assert isinstance(text, TextSentence) and isinstance(image, ImageRecord)
        assert (text.id, image.id) == (f"{pair.id}-text", f"{pair.id}-image")
        assert text.source == image.source == "pseudo" and text.document_id == image.document_id == pair.id
        assert text.tokens == pair.tokens and (image.width, image.height) == (pair.width, pair.height)
        (event,) = text.events
        assert (event.event_type,) == result.types and text.tokens[event.trigger.start] in TRIGGERS[event.event_type]
        (image_event,) = image.events
        assert image_event.event_type == event.event_type
        assert image_event.arguments[0].role == IMAGE_ROLES[event.event_type][0]
        assert result.ar_confidence == {event.event_type: {"text": 0.7, "image": 0.6}}


def test_an_agreed_type_without_a_trigger_in_the_caption_is_dropped(pairs_shards: Path) -> None:
    items = load_pairs(pairs_shards)[:1]
    shards = ShardSet.open(pairs_shards)
    answers = oracle()

    def no_trigger(examples: Sequence[Example]) -> list[ScoredAnswer]:
        return [
            ScoredAnswer("somebody | Attacker: nobody", 0.9, 0.0) if example.task == "AR" else answer
            for example, answer in zip(examples, answers(examples), strict=True)
        ]

    (result,) = label_pairs(items, no_trigger, lambda item: shards.read(item.index)["jpg"], threshold=0.8, boxes=PLAIN)
    assert result.reason == NO_TRIGGER and result.records == () and result.types == ()


def test_the_cli_writes_a_verified_pseudo_set_with_its_manifest(
    tiny_model_dir: Callable[[str], Path],
    pairs_shards: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The real model is loaded, but its answers come from the oracle (a random model keeps nothing).
    monkeypatch.setattr(
        "rmpl_ds.evaluate.generate.generate_scored", lambda model, bundle, examples, **_: oracle()(examples)
    )
    out = tmp_path / "pseudo"
    model = tiny_model_dir("qwen2-vl")
    args = ["pseudo-label", "--model", str(model), "--pairs", str(pairs_shards), "--out", str(out),
            "--box-format", "plain"]  # fmt: skip
    assert main(args) == 0
    assert "kept 5 of 10 pairs (10 records)" in capsys.readouterr().out
    assert main(["shards", "verify", str(out)]) == 0
    manifest = read_manifest(out)
    assert manifest["source"] == "pseudo" and manifest["pseudo"] is True and manifest["threshold"] == 0.8
    assert manifest["model"]["path"] == str(model) and manifest["model"]["export_manifest_sha256"] is None
    assert manifest["input"]["source"] == "pairs" and "exp(mean log-probability" in manifest["confidence"]
    counts = manifest["counts"]
    assert (counts["read"], counts["kept"]) == (10, 5)
    assert counts["rejected"] == {reason: 0 for reason in REJECTION_REASONS} | {DISAGREE: 2, NO_EVENT: 3}
    assert sum(counts["kept_by_type"].values()) == 5
    assert counts["records"]["by_kind"] == {"image_record": 5, "text_sentence": 5}
    assert counts["ar_confidence_mean"] == {"text": 0.7, "image": 0.6}
    with ShardSet.open(out) as shards:
        assert [sorted(shards.read_raw(i)) for i in range(2)] == [["json"], ["jpg", "json"]]
        with ShardSet.open(pairs_shards) as pairs:  # the image bytes are the input's, unchanged
            assert shards.read_raw(1)["jpg"] == pairs.read_raw(0)["jpg"]


# ---------------------------------------------------------------------------------------------------------------
# End to end with the tiny random model


def pseudo_args(model: Path, pairs: Path, out: Path, *extra: str) -> list[str]:
    return ["pseudo-label", "--model", str(model), "--pairs", str(pairs), "--out", str(out),
            "--max-new-tokens", "12", "--limit", "4", "--batch-size", "3", *extra]  # fmt: skip


def test_the_cli_runs_a_random_model_end_to_end_and_keeps_nothing(
    tiny_model_dir: Callable[[str], Path],
    pairs_shards: Path,
    tmp_path: Path,
    one_thread: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    model = tiny_model_dir("qwen2-vl")
    assert main(pseudo_args(model, pairs_shards, tmp_path / "out", "--decisions", str(one))) == 2
    error = capsys.readouterr().err
    assert "no pair was kept (read 4: " in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()
    decisions = [json.loads(line) for line in one.read_text().splitlines()]
    assert [line["index"] for line in decisions] == [0, 1, 2, 3]
    assert all(line["reason"] in REJECTION_REASONS and 0 < line["text_confidence"] <= 1 for line in decisions)
    # Two ranks (worker processes) give the same decisions, byte for byte.
    assert main(pseudo_args(model, pairs_shards, tmp_path / "out", "--decisions", str(two), "--gpus", "2")) == 2
    assert one.read_bytes() == two.read_bytes()
    assert not list(tmp_path.glob(".*"))  # no parts left over


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda args, root: [*args, "--threshold", "0"], "--threshold must be in (0, 1]"),
        (lambda args, root: [*args, "--threshold", "1.5"], "--threshold must be in (0, 1]"),
        (lambda args, root: [a if a != "PAIRS" else str(root / "nowhere") for a in args], "nowhere: not a directory"),
        (lambda args, root: [a if a != "PAIRS" else "DEMO_ACE" for a in args], "not a pairs set"),
    ],
)
def test_bad_input_exits_2(
    change: Callable[[list[str], Path], list[str]],
    message: str,
    tiny_model_dir: Callable[[str], Path],
    demo: Path,
    pairs_shards: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ace = tmp_path / "ace"  # a shard set of another kind (built by the CLI, which binds logging to this test)
    assert main(["shards", "build", "--source", "ace", "--input", str(demo / "ace"), "--out", str(ace)]) == 0
    capsys.readouterr()
    args = change(pseudo_args(tiny_model_dir("qwen2-vl"), Path("PAIRS"), tmp_path / "out"), tmp_path)
    args = [str(pairs_shards) if a == "PAIRS" else str(ace) if a == "DEMO_ACE" else a for a in args]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("rmpl-ds pseudo-label: error:") and message in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_load_pairs_keeps_the_first_limit(pairs_shards: Path) -> None:
    items = load_pairs(pairs_shards, limit=3)
    assert [item.index for item in items] == [0, 1, 2] and all(isinstance(item, PairItem) for item in items)


def test_rank_shares_merged_by_index_equal_one_rank(pairs_shards: Path) -> None:
    items = load_pairs(pairs_shards)
    shards = ShardSet.open(pairs_shards)

    def label(share: Sequence[PairItem]) -> list:
        return label_pairs(share, oracle(), lambda item: shards.read(item.index)["jpg"], threshold=0.8, boxes=PLAIN)

    merged = sorted(
        (result for rank in range(3) for result in label([item for item in items if item.index % 3 == rank])),
        key=lambda result: result.index,
    )
    assert [result.to_json() for result in merged] == [result.to_json() for result in label(items)]


def test_the_pipeline_labels_a_pseudo_set_again_when_its_labelling_stage_was_retrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pseudo-labelled source is reused only while the export that labelled it is its stage's current one (the
    manifest's export_manifest_sha256); a retrained stage's export labels it again."""
    from rmpl_ds import pipeline, shards
    from rmpl_ds.config import load_recipe

    recipe_path = Path(__file__).resolve().parents[1] / "launch" / "recipes" / "demo_xmtl.yaml"
    recipe = load_recipe(recipe_path, [f"sources.pseudo={tmp_path / 'pseudo'}"])
    export = tmp_path / "run" / "mtl" / "export"
    export.mkdir(parents=True)
    (export / "rmpl_export.json").write_text('{"step": 400}')
    labelled_by: dict[str, str | None] = {"digest": export_digest(export)}
    monkeypatch.setattr(shards, "read_manifest", lambda _: {"model": {"export_manifest_sha256": labelled_by["digest"]}})
    assert not pipeline._stale_pseudo_labels(recipe, "pseudo", tmp_path / "run")
    (export / "rmpl_export.json").write_text('{"step": 300}')  # the stage ran again
    assert pipeline._stale_pseudo_labels(recipe, "pseudo", tmp_path / "run")
    labelled_by["digest"] = None  # labelled by a plain model directory, not this stage's export
    assert pipeline._stale_pseudo_labels(recipe, "pseudo", tmp_path / "run")
    assert not pipeline._stale_pseudo_labels(recipe, "ace", tmp_path / "run")  # not a pseudo source
