"""The chat task: multi-turn labels for every family checked against the chat template's own assistant spans, the
one-turn case equal to the RMPL encoding, truncation, the recipe / data / render-time refusals, and (slow) the demo
chat recipe's mixed Stage II on 2 ranks with exact stream counts, stopped and resumed bit for bit."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from rmpl_ds import chat, records
from rmpl_ds.backbones import FAMILIES, get_adapter, get_spec
from rmpl_ds.backbones.adapter import SequenceTooLongError
from rmpl_ds.config import recipe_from_dict
from rmpl_ds.constants import IGNORE_INDEX
from rmpl_ds.errors import ConfigError, UserError
from rmpl_ds.example import ChatExample, Example
from rmpl_ds.records import ChatPart, ChatRecord, ChatTurn

ROOT = Path(__file__).resolve().parents[1]
DEMO_CHAT = ROOT / "launch" / "recipes" / "demo_chat.yaml"
# The chat templates of all four families are ChatML: an assistant turn is `<|im_start|>assistant\n` + content +
# `<|im_end|>`. The oracle below reads the spans from the rendered text with that pattern, independently of the
# adapter's turn-by-turn rendering.
ASSISTANT_SPAN = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.DOTALL)


def conversation() -> ChatRecord:
    """A system turn, three rounds, two images (one before and one inside the text), box-like text and non-ASCII."""
    return ChatRecord(
        "chat.jsonl-1",
        "chat",
        "train",
        (
            ChatTurn("system", (ChatPart("You describe pictures in short answers."),)),
            ChatTurn("user", (ChatPart(image=0), ChatPart("What is in the picture?"))),
            ChatTurn("assistant", (ChatPart("A red square at [12, 34, 56, 78] and a tree."),)),
            ChatTurn("user", (ChatPart("Compare it with "), ChatPart(image=1), ChatPart(", please."))),
            ChatTurn("assistant", (ChatPart("The second one is blue; both are café signs.\nDone."),)),
            ChatTurn("user", (ChatPart("Which is larger?"),)),
            ChatTurn("assistant", (ChatPart("The first."),)),
        ),
        ("a.jpg", "b.png"),
    )


PICTURES = (Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (40, 40), (20, 40, 210)))


@pytest.fixture(scope="module")
def bundles(tiny_model_dir) -> dict:
    return {family: get_adapter(family).load_processor(tiny_model_dir(family)) for family in FAMILIES}


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return runs


@pytest.mark.parametrize("labels", ["all", "last"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_multi_turn_label_masks_equal_the_chat_templates_assistant_spans(bundles, family: str, labels: str) -> None:
    bundle = bundles[family]
    spec = get_spec(family)
    assert spec.end_of_turn_token == "<|im_end|>", "the oracle reads ChatML; extend it for this family's template"
    example = chat.render(conversation(), PICTURES, labels=labels)
    encoded = bundle.encode(example, max_seq_len=4096)
    ids, ours = encoded["input_ids"].tolist(), encoded["labels"].tolist()

    # The oracle: the family's template renders the whole conversation; the tokenizer's offsets say which tokens
    # fall inside an assistant span (content + end-of-turn token).
    text = bundle.tokenizer.apply_chat_template(
        list(example.messages), chat_template=spec.chat_template, tokenize=False
    )
    spans = [match.span(1) for match in ASSISTANT_SPAN.finditer(text)]
    assert len(spans) == 3
    spans = spans if labels == "all" else spans[-1:]
    whole = bundle.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    expected_flags = []
    for start, end in whole["offset_mapping"]:
        inside = [s <= start and end <= e for s, e in spans]
        straddles = [start < e and s < end for s, e in spans]
        assert inside == straddles, "a token crosses a span boundary"
        expected_flags.append(any(inside))

    # Image spans are expanded in ours and a placeholder in the template's text: compare everything else.
    image_ids = {bundle.special.image, bundle.special.image_start, bundle.special.image_end}
    kept = [(token, label != IGNORE_INDEX) for token, label in zip(ids, ours, strict=True) if token not in image_ids]
    expected = [(t, f) for t, f in zip(whole["input_ids"], expected_flags, strict=True) if t not in image_ids]
    assert kept == expected
    # Labels are the tokens themselves where they are set, and each labelled run is one assistant span's text.
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, ours, strict=True))
    runs = [bundle.tokenizer.decode(run) for run in labelled_runs(ids, ours)]
    assert runs == [text[s:e] for s, e in spans]
    assert encoded["n_target_tokens"] == sum(flag for _, flag in expected) and not encoded["truncated"]
    assert sum(token == bundle.special.image for token in ids) == sum(encoded["image_tokens"])
    assert len(encoded["image_tokens"]) == 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_one_round_conversation_encodes_exactly_like_the_single_turn_example(bundles, family: str) -> None:
    """The chat path and the RMPL tasks' path agree where they overlap: same ids, labels, pixels."""
    bundle = bundles[family]
    single = Example(task="EM", system="Schema here.", prompt="Sentence: a b c", target="Life:Die", images=PICTURES[:1])
    record = ChatRecord(
        "x",
        "chat",
        "train",
        (
            ChatTurn("system", (ChatPart("Schema here."),)),
            ChatTurn("user", (ChatPart(image=0), ChatPart("Sentence: a b c"))),
            ChatTurn("assistant", (ChatPart("Life:Die"),)),
        ),
        ("a.jpg",),
    )
    as_chat = bundle.encode(chat.render(record, PICTURES[:1]), max_seq_len=512)
    as_single = bundle.encode(single, max_seq_len=512)
    for key in ("input_ids", "labels", "pixel_values"):
        assert as_chat[key].equal(as_single[key]), key
    prompt = bundle.encode(chat.render(record, PICTURES[:1]), max_seq_len=512, with_target=False)
    assert prompt["input_ids"].equal(bundle.encode(single, max_seq_len=512, with_target=False)["input_ids"])


def test_truncation_counts_labels_across_turns_and_never_stops_on_a_long_conversation(bundles) -> None:
    bundle = bundles["qwen2-vl"]
    example = chat.render(conversation(), PICTURES)
    full = bundle.encode(example, max_seq_len=4096)
    runs = labelled_runs(full["input_ids"].tolist(), full["labels"].tolist())
    # max_target_tokens counts labels over all turns: the sequence ends after the cap-th labelled token.
    cap = len(runs[0]) + 2
    capped = bundle.encode(example, max_seq_len=4096, max_target_tokens=cap)
    assert capped["n_target_tokens"] == cap and capped["truncated"]
    assert capped["n_target_tokens_dropped"] == full["n_target_tokens"] - cap
    assert capped["labels"][-1].item() != IGNORE_INDEX
    # A conversation whose first assistant turn starts after max_seq_len is cut and counted, not an error (an RMPL
    # prompt that long is one).
    first_label = next(i for i, label in enumerate(full["labels"].tolist()) if label != IGNORE_INDEX)
    cut = bundle.encode(example, max_seq_len=first_label)
    assert cut["n_target_tokens"] == 0 and cut["truncated"] and cut["length"] == first_label
    assert cut["n_target_tokens_dropped"] == full["n_target_tokens"]
    single = Example(task="EM", system="s", prompt="p " * 200, target="t")
    with pytest.raises(SequenceTooLongError):
        bundle.encode(single, max_seq_len=50)
    # sequence_length and token_counts agree with encode without processing pixels.
    assert bundle.sequence_length(example, max_seq_len=4096) == full["length"]
    assert bundle.adapter.token_counts(bundle, example) == (full["length"], full["n_target_tokens"])


def test_render_refuses_rmpl_records_and_counts_images() -> None:
    sentence = records.TextSentence("s1", "ace", "train", ("a", "b"))
    with pytest.raises(ValueError, match="task 'chat' renders conversations of a chat source, not TextSentence"):
        chat.render(sentence, ())
    with pytest.raises(ValueError, match="has 2 image"):
        chat.render(conversation(), PICTURES[:1])
    with pytest.raises(ValueError, match="chat labels must be one of"):
        chat.render(conversation(), PICTURES, labels="first")  # type: ignore[arg-type]
    example = chat.render(conversation(), PICTURES, labels="last")
    assert isinstance(example, ChatExample) and example.labelled_turns() == (6,)
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2


# --------------------------------------------------------------------------------------------- recipes and data


def recipe_dict(model: str, sources: dict[str, str], mixture: list[dict], raw: dict | None = None) -> dict:
    return {
        "name": "chat-test",
        "model": {"family": "qwen2-vl", "path": model, "mode": "lora", "max_seq_len": 512},
        "sources": sources,
        **({"raw": raw} if raw else {}),
        "stages": [{"name": "stage2", "mixture": mixture, "steps": 2, "lr": 1e-3, "global_batch": 4}],
        "launch": {"gpus": 2},
    }


def test_recipes_take_the_chat_task_and_refuse_it_on_another_converter() -> None:
    mixture = [{"source": "ace", "task": "EM", "weight": 1}, {"source": "mine", "task": "chat", "weight": 2}]
    recipe = recipe_from_dict(
        recipe_dict("m", {"ace": "a", "mine": "c"}, mixture, {"mine": {"converter": "chat", "input": "x"}})
    )
    assert [stream.name for stream in recipe.stages[0].mixture] == ["ace:EM", "mine:chat"]
    assert recipe.tasks.chat_labels == "all"
    with pytest.raises(ConfigError) as raised:
        recipe_from_dict(
            {
                **recipe_dict("m", {"ace": "a", "mine": "c"}, mixture, {"ace": {"converter": "chat", "input": "x"}}),
                "tasks": {"chat_labels": "first"},
            }
        )
    message = str(raised.value)
    assert "stages[0].mixture[0].task: raw.ace.converter is chat: its conversations train with task chat" in message
    assert "tasks.chat_labels" in message
    wrong = [{"source": "ace", "task": "chat", "weight": 1}]
    with pytest.raises(
        ConfigError, match=r"mixture\[0\]\.task: task chat trains on conversations; raw.ace.converter is ace"
    ):
        recipe_from_dict(recipe_dict("m", {"ace": "a"}, wrong, {"ace": {"converter": "ace", "input": "x"}}))


@pytest.fixture(scope="module")
def chat_shards(demo_shards, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of the demo chat set that conftest's demo_shards wrote (write_demo seed 0, size 40)."""
    from rmpl_ds.commands.shards import build

    raw = demo_shards["ace"].parents[1] / "raw" / "chat"
    assert raw.is_dir()
    out = tmp_path_factory.mktemp("chat-shards") / "chat"
    assert build("chat", raw, out_dir=out, strict=True) == 0
    return out


def test_stage_data_refuses_a_task_that_does_not_fit_its_shard_set(demo_shards, chat_shards, tiny_model_dir) -> None:
    """Before training (open_sources, and check --deep's preflight), from what the shard manifests hold."""
    from rmpl_ds.data import open_sources
    from rmpl_ds.preflight import Scope, preflight

    sources = {"ace": str(demo_shards["ace"]), "mine": str(chat_shards)}
    model = str(tiny_model_dir("qwen2-vl"))
    good = recipe_from_dict(
        recipe_dict(
            model,
            sources,
            [{"source": "ace", "task": "EM", "weight": 1}, {"source": "mine", "task": "chat", "weight": 1}],
        )
    )
    assert set(open_sources(good, good.stages[0])) == {"ace", "mine"}
    bad = recipe_from_dict(
        recipe_dict(
            model,
            sources,
            [{"source": "ace", "task": "chat", "weight": 1}, {"source": "mine", "task": "AR", "weight": 1}],
        )
    )
    with pytest.raises(UserError) as raised:
        open_sources(bad, bad.stages[0])
    message = str(raised.value)
    assert (
        "stages.stage2.mixture[0] (ace:chat): task chat trains on conversations, but source 'ace' holds ace records"
        in message
    )
    assert (
        "stages.stage2.mixture[1] (mine:AR): source 'mine' holds conversations (a chat shard set), which train "
        "with task chat, not 'AR'" in message
    )
    problems = preflight(
        bad, Scope(stages=("stage2",), run_dir=Path("/nonexistent/run"), world_size=2, verify_shards=False)
    )
    assert sum("mixture[" in problem for problem in problems) == 2


def test_the_renderer_trains_conversations_and_refuses_them_elsewhere(demo_shards, chat_shards, bundles) -> None:
    from rmpl_ds.data import Renderer
    from rmpl_ds.shards import ShardSet

    bundle = bundles["qwen2-vl"]
    renderer = Renderer(
        bundle=bundle,
        tasks=("chat", "EM"),
        loss_weights=(1.0, 1.0),
        stream_index={"mine:chat": 0, "x:EM": 1},
        max_seq_len=768,
        chat_labels="last",
    )
    with ShardSet.open(chat_shards) as shards:
        index = next(i for i in range(len(shards)) if len(records.from_json(shards.read(i)["json"]).images) == 2)
        item = {
            **shards.read(index),
            "key": shards.key(index),
            "source": "chat",
            "stream": "mine:chat",
            "sample_seed": 1,
        }
    encoded = renderer(dict(item))
    record = records.from_json(item["json"])
    expected = bundle.encode(chat.render(record, chat.sample_images(item, record), labels="last"), max_seq_len=768)
    assert encoded["input_ids"].equal(expected["input_ids"]) and encoded["labels"].equal(expected["labels"])
    assert len(encoded["image_tokens"]) == 2 and encoded["stream_index"] == 0
    with pytest.raises(UserError, match="a conversation cannot train stream 'x:EM': chat records train with task chat"):
        renderer({**item, "stream": "x:EM"})
    with ShardSet.open(demo_shards["ace"]) as ace:
        sentence = {**ace.read(0), "key": ace.key(0), "source": "ace", "stream": "mine:chat", "sample_seed": 1}
    with pytest.raises(UserError, match="task 'chat' renders conversations of a chat source, not TextSentence"):
        renderer(sentence)


# --------------------------------------------------------------------------------------------- 2 ranks

STEPS, STOP = 6, 3
GLOBAL_BATCH = 16


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train(out: Path, overrides: list[str], *extra: str) -> None:
    command = [
        sys.executable, "-m", "rmpl_ds", "train", str(DEMO_CHAT), "--stage", "stage2", "--out", str(out),
        "--master-port", str(free_port()), *extra, *overrides,
    ]  # fmt: skip
    log = out.parent / f"{out.name}.log"
    with log.open("a") as sink:
        code = subprocess.run(
            command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy(), timeout=900
        ).returncode
    assert code == 0, log.read_text()[-4000:]


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "stage2" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_demo_chat_recipe_mixes_chat_into_stage2_exactly_on_2_ranks_and_resumes_bitwise(
    tmp_path: Path, demo_shards, chat_shards, tiny_model_dir
) -> None:
    """launch/recipes/demo_chat.yaml's Stage II (ace:EM, swig:EM, ace:AR, swig:AR, chat:chat at 1:1:1:1:1), pointed
    at the test's shards and tiny model and started from the base model: every window of k steps holds each stream
    within one sample of 16k/5, and a run stopped after step 3 and resumed logs the uninterrupted run's losses."""
    overrides = [
        f"model.path={tiny_model_dir('qwen2-vl')}",
        f"sources.ace={demo_shards['ace']}",
        f"sources.swig={demo_shards['swig']}",
        f"sources.chat={chat_shards}",
        "stages.stage2.init_from=null",
        f"stages.stage2.steps={STEPS}",
        f"stages.stage2.checkpoint_every={STOP}",
        "stages.stage2.warmup_steps=1",
        "logging.console_every=1",
    ]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(reference, overrides)
    train(resumed, overrides, "--stop-after", str(STOP))
    assert len(metric_lines(resumed)) == STOP
    train(resumed, overrides)  # --resume auto

    metrics = metric_lines(reference)
    streams = ("ace:EM", "swig:EM", "ace:AR", "swig:AR", "chat:chat")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    totals = dict.fromkeys(streams, 0)
    for step, line in enumerate(metrics, start=1):
        assert set(line["stream_counts"]) <= set(streams) and sum(line["stream_counts"].values()) == GLOBAL_BATCH
        for name in streams:
            totals[name] += line["stream_counts"].get(name, 0)
            assert abs(totals[name] - step * GLOBAL_BATCH / len(streams)) < 1, (step, totals)
    assert all(m["loss_by_stream"].get("chat:chat") is not None for m in metrics)
    (trace,) = [json.loads(line) for line in (resumed / "stage2" / "resume.jsonl").read_text().splitlines()]
    assert (trace["step"], trace["next_slot"]) == (STOP, STOP * GLOBAL_BATCH)
    again = metric_lines(resumed)
    assert [m["step"] for m in again] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in again] == [m["loss"] for m in metrics]
    assert [m["stream_counts"] for m in again] == [m["stream_counts"] for m in metrics]
