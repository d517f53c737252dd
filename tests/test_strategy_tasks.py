"""The strategy tasks of rmpl_ds.tasks: ``joint`` (M-MRE's headed joint answer), ``vs`` and ``ts`` (LLaVA-MS-PIT's
visual and textual schema questions), the ``schema_guided`` prompts, and the schema file converter
(rmpl_ds.sources.schema): exact round trips on the real fixtures, the demo set and every box syntax, tolerance of
bad answers, and the converter's skip rules."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_grounding import SYNTAXES
from test_tasks import DEMO_INPUTS, REAL_INPUTS, _image_for, _image_record, _sentence, _with_size, image_records

from rmpl_ds.errors import UserError
from rmpl_ds.grounding import BoxSyntax
from rmpl_ds.images import load_image
from rmpl_ds.ontology import DEFINITIONS, EVENT_TYPES, IMAGE_ROLES, TEXT_ROLES
from rmpl_ds.records import ImageEvent, ImageRecord, SchemaQuestion, TextSentence, VisualArgument
from rmpl_ds.sources import SOURCES, SourceError, find_image
from rmpl_ds.sources import schema as schema_source
from rmpl_ds.sources.demo import MIN_SIZE, write_demo
from rmpl_ds.tasks import (
    SCHEMA_FORMS,
    TASKS,
    Parsed,
    ParsedArgument,
    ParsedEvent,
    parse,
    render,
    render_all,
    to_structure,
)


def _image(record: TextSentence | ImageRecord) -> Image.Image | None:
    return None if isinstance(record, TextSentence) else _image_for(record)


def _check_joint(record: TextSentence | ImageRecord, boxes: BoxSyntax, image: Image.Image | None = None) -> None:
    """joint reads back exactly, and its two answers are exactly the EM answer and the t / i answer."""
    image = image if image is not None or isinstance(record, TextSentence) else _image_for(record)
    example = render(record, "joint", image=image, boxes=boxes)
    mentions = render(record, "EM", image=image, boxes=boxes).target
    events = render(record, "t" if isinstance(record, TextSentence) else "i", image=image, boxes=boxes).target
    assert example.target == f"Task 1 Answer: {mentions}\nTask 2 Answer:\n{events}"
    parsed = parse("joint", example.target, example_meta=example.meta, boxes=boxes)
    assert parsed == to_structure(record, "joint", boxes=boxes)
    assert parsed.errors == 0


def _expected_vs(record: ImageRecord) -> str:
    """The vs target written out from the spec: each type once, roles of its image schema that have a box."""
    visible: dict[str, set[str]] = {}
    for event in record.events:
        if event.event_type in IMAGE_ROLES:
            visible.setdefault(event.event_type, set()).update(
                argument.role for argument in event.arguments if argument.box is not None
            )
    lines = []
    for event_type in (event_type for event_type in EVENT_TYPES if event_type in visible):
        roles = [role for role in IMAGE_ROLES[event_type] if role in visible[event_type]]
        lines.append(f"{event_type} | {' ; '.join(roles)}" if roles else event_type)
    return "\n".join(lines) or "none"


def _check_vs(record: ImageRecord, image: Image.Image | None = None) -> None:
    example = render(record, "vs", image=image if image is not None else _image_for(record))
    assert example.target == _expected_vs(record)
    parsed = parse("vs", example.target, example_meta=example.meta)
    assert parsed == to_structure(record, "vs")
    assert parsed.errors == 0
    assert all(
        argument.box is None and argument.span is None for event in parsed.events for argument in event.arguments
    )


# ---------------------------------------------------------------------------------------------------------------
# joint and vs: formats and round trips


def test_joint_and_vs_formats() -> None:
    sentence, image_record = _sentence(), _image_record()
    image = _image_for(image_record)
    assert render(sentence, "joint").target == (
        "Task 1 Answer: Conflict:Attack ; Life:Die\n"
        "Task 2 Answer:\n"
        "Conflict:Attack | fired | Attacker: Soldiers ; Target: the village\n"
        "Life:Die | killed | Agent: soldiers ; Victim: two men\n"
        "Conflict:Attack | attacked | Attacker: soldiers"
    )
    boxes = "Agent: [125,117,423,999] ; Agent: [606,147,891,999] ; Person: [330,131,683,999]"
    assert render(image_record, "joint", image=image).target == (
        f"Task 1 Answer: Justice:Arrest-Jail\nTask 2 Answer:\nJustice:Arrest-Jail | {boxes}"
    )
    negative = dataclasses.replace(sentence, events=())
    assert render(negative, "joint").target == "Task 1 Answer: none\nTask 2 Answer:\nnone"
    assert to_structure(sentence, "joint") == Parsed(
        "joint", events=to_structure(sentence, "t").events, event_types=("Conflict:Attack", "Life:Die")
    )
    # Two Arrest-Jail events and an ungrounded Die: each type once; Place is no image role of Arrest-Jail.
    record = dataclasses.replace(
        image_record,
        events=(
            *image_record.events,
            ImageEvent("Justice:Arrest-Jail", (VisualArgument("Instrument", (1, 2, 30, 40)),)),
            ImageEvent("Life:Die", (VisualArgument("Victim", None),)),
        ),
    )
    assert render(record, "vs", image=image).target == "Justice:Arrest-Jail | Agent ; Instrument ; Person\nLife:Die"
    assert to_structure(record, "vs").events == (
        ParsedEvent("Justice:Arrest-Jail", arguments=tuple(map(ParsedArgument, ("Agent", "Instrument", "Person")))),
        ParsedEvent("Life:Die"),
    )
    assert render(dataclasses.replace(record, events=()), "vs", image=image).target == "none"
    # vs writes no box, so a record without a size (M2E2 converted without its images) renders.
    assert render(dataclasses.replace(record, width=0, height=0), "vs", image=image).target == (
        "Justice:Arrest-Jail | Agent ; Instrument ; Person\nLife:Die"
    )


def test_new_tasks_are_registered_for_their_records() -> None:
    assert {name: TASKS[name].record_types for name in ("joint", "vs", "ts")} == {
        "joint": (TextSentence, ImageRecord),
        "vs": (ImageRecord,),
        "ts": (SchemaQuestion,),
    }
    with pytest.raises(ValueError, match=r"task 'vs'.*renders ImageRecord"):
        render(_sentence(), "vs")
    with pytest.raises(ValueError, match="task 'joint' takes no event_type"):
        render(_sentence(), "joint", event_type="Life:Die")


@pytest.mark.parametrize(("source", "relative"), [entry for entry in REAL_INPUTS if entry[0] != "mnre"])
def test_joint_and_vs_round_trip_on_real_fixtures(real_fixtures: Path, source: str, relative: str) -> None:
    records = [_with_size(record) for record in SOURCES[source](real_fixtures / relative).records]
    checked = 0
    for record in records:
        if isinstance(record, TextSentence):
            _check_joint(record, SYNTAXES["plain"])
            checked += 1
        elif isinstance(record, ImageRecord):
            for syntax in SYNTAXES.values():
                _check_joint(record, syntax)
            _check_vs(record)
            checked += 1
    assert checked > 0, relative


@pytest.fixture(scope="module")
def demo_records(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[TextSentence | ImageRecord, object]]:
    """The demo set's sentences and image records, with their decoded images."""
    root = tmp_path_factory.mktemp("strategy-demo") / "demo"
    write_demo(root, size=MIN_SIZE)
    found = []
    for source, relative, images in DEMO_INPUTS:
        images_dir = root / images if images else None
        for record in SOURCES[source](root / relative, images_dir=images_dir, strict=True).records:
            if isinstance(record, TextSentence):
                found.append((record, None))
            elif isinstance(record, ImageRecord):
                found.append((record, load_image(find_image(images_dir, record.image, record.split))))
    return found


def test_joint_and_vs_round_trip_on_demo_set(demo_records: list) -> None:
    visible_roles = 0
    for record, image in demo_records:
        if isinstance(record, TextSentence):
            _check_joint(record, SYNTAXES["plain"])
            continue
        for syntax in SYNTAXES.values():
            _check_joint(record, syntax, image)
        _check_vs(record, image)
        visible_roles += sum(len(event.arguments) for event in to_structure(record, "vs").events)
    assert visible_roles > 10  # roles were written and read, not only types and "none"


@pytest.mark.parametrize("name", sorted(SYNTAXES))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=image_records())
def test_joint_round_trip_on_generated_images_in_every_syntax(name: str, record: ImageRecord) -> None:
    _check_joint(record, SYNTAXES[name])


# ---------------------------------------------------------------------------------------------------------------
# ts: schema questions from the package's own schema file


@pytest.fixture(scope="module")
def schema_questions(tmp_path_factory: pytest.TempPathFactory) -> list[SchemaQuestion]:
    path = schema_source.write_schema_file(tmp_path_factory.mktemp("schema") / "m2e2_schema.json")
    conversion = schema_source.convert(path, strict=True)
    assert conversion.skipped == []
    return conversion.records  # type: ignore[return-value]


def test_schema_file_converts_to_one_question_per_type_and_form(schema_questions: list[SchemaQuestion]) -> None:
    assert [(q.event_type, q.form) for q in schema_questions] == [
        (event_type, form) for event_type in EVENT_TYPES for form in SCHEMA_FORMS
    ]
    for question in schema_questions:
        assert question.id == f"schema:{question.event_type}:{question.form}"
        assert (question.source, question.split) == ("schema", "train")
        assert question.definition == DEFINITIONS[question.event_type]
        assert question.text_roles == TEXT_ROLES[question.event_type]
        assert question.image_roles == IMAGE_ROLES[question.event_type]


def test_ts_round_trip_and_targets(schema_questions: list[SchemaQuestion]) -> None:
    for question in schema_questions:
        (example,) = render_all(question, "ts")
        expected_target = {
            "roles": " ; ".join(TEXT_ROLES[question.event_type]),
            "image_roles": " ; ".join(IMAGE_ROLES[question.event_type]),
            "type_of_definition": question.event_type,
        }[question.form]
        assert example.target == expected_target
        assert question.definition in example.prompt
        assert example.images == ()
        parsed = parse("ts", example.target, example_meta=example.meta)
        assert parsed == to_structure(question, "ts")
        assert parsed.errors == 0
        if question.form == "type_of_definition":
            assert parsed == Parsed("ts", event_types=(question.event_type,))
            assert question.event_type not in example.prompt.split("Answer one of:")[0]
        else:
            assert parsed.roles == tuple(expected_target.split(" ; "))
            where = "text" if question.form == "roles" else "images"
            assert f"Which argument roles does {question.event_type} take in {where}?" in example.prompt


def test_ts_renders_the_records_own_definition_and_roles() -> None:
    """A user's schema file may word a definition its own way and list a subset of the roles (or none)."""
    question = SchemaQuestion(
        "q", "schema", "train", "Life:Die", "roles", "somebody passes away", ("Victim", "Place"), ()
    )
    example = render(question, "ts")
    assert "Life:Die: somebody passes away\n" in example.prompt and DEFINITIONS["Life:Die"] not in example.prompt
    assert example.target == "Victim ; Place"
    assert parse("ts", example.target, example_meta=example.meta) == Parsed("ts", roles=("Victim", "Place"))
    no_roles = dataclasses.replace(question, form="image_roles")
    example = render(no_roles, "ts")
    assert example.target == "none"
    assert parse("ts", example.target, example_meta=example.meta) == to_structure(no_roles, "ts") == Parsed("ts")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"form": "synonyms"}, "form 'synonyms' is not one of"),
        ({"event_type": "Business:Merge-Org"}, "'Business:Merge-Org' is not one of the 8 event types"),
        ({"text_roles": ("Agent", "Money")}, r"text_roles \['Money'\] are not roles of Justice:Arrest-Jail"),
        ({"image_roles": ("Place",)}, r"image_roles \['Place'\] are not roles of Justice:Arrest-Jail"),
        ({"definition": "  "}, "the definition is empty"),
    ],
)
def test_ts_refuses_questions_outside_the_ontology(change: dict, message: str) -> None:
    question = SchemaQuestion(
        "bad", "schema", "train", "Justice:Arrest-Jail", "roles", DEFINITIONS["Justice:Arrest-Jail"], ("Agent",), ()
    )
    with pytest.raises(ValueError, match=f"schema question 'bad': {message}"):
        render(dataclasses.replace(question, **change), "ts")
    with pytest.raises(ValueError, match="take no image"):
        render(question, "ts", image=Image.new("RGB", (8, 8)))


# ---------------------------------------------------------------------------------------------------------------
# schema_guided changes the system turn only


def test_schema_guided_changes_only_the_system_turn(demo_records: list) -> None:
    checked = 0
    for record, image in demo_records[::5]:
        roles = TEXT_ROLES if isinstance(record, TextSentence) else IMAGE_ROLES
        for task in ("EM", "AR", "joint", "t", "i", "vs"):
            if not isinstance(record, TASKS[task].record_types):
                continue
            plain = render_all(record, task, image=image)
            guided = render_all(record, task, image=image, schema_guided=True)
            assert len(plain) == len(guided)
            for before, after in zip(plain, guided, strict=True):
                assert (after.target, after.prompt, after.meta) == (before.target, before.prompt, before.meta)
                assert (after.task, after.source, after.key, len(after.images)) == (
                    before.task,
                    before.source,
                    before.key,
                    len(before.images),
                )
                if task in ("EM", "AR", "joint"):
                    assert after.system != before.system
                    for event_type in EVENT_TYPES:
                        line = f"{event_type} ({', '.join(roles[event_type])}): {DEFINITIONS[event_type]}"
                        assert line in after.system.splitlines()
                        assert DEFINITIONS[event_type] not in before.system
                    checked += 1
                else:
                    assert after.system == before.system  # t, i and vs ignore the option
    assert checked > 20
    question = SchemaQuestion("q", "schema", "train", "Life:Die", "roles", DEFINITIONS["Life:Die"], ("Victim",), ())
    assert render(question, "ts", schema_guided=True).system == render(question, "ts").system


# ---------------------------------------------------------------------------------------------------------------
# Tolerance: parse never raises, and counts what is wrong


def _joint_meta(record: TextSentence | ImageRecord) -> dict:
    return render(record, "joint", image=_image(record)).meta


def _ts_meta(form: str) -> dict:
    question = SchemaQuestion(
        "q", "schema", "train", "Justice:Arrest-Jail", form, DEFINITIONS["Justice:Arrest-Jail"], ("Agent",), ()
    )
    return render(question, "ts").meta


GOLD_TASK_2 = "Life:Die | killed | Agent: soldiers ; Victim: two men"


@pytest.mark.parametrize(
    ("text", "event_types", "n_events", "errors"),
    [
        ("", (), 0, 1),  # empty output
        (" \n ", (), 0, 1),
        ("none", (), 0, 2),  # both headers missing; "none" read as Task 1's answer
        ("I cannot tell.", (), 0, 3),  # both headers missing, and no event type
        ("Task 1 Answer:\nTask 2 Answer:", (), 0, 2),  # headers only: both answers empty
        ("Task 1 Answer: Life:Die\nTask 2 Answer:\nnone", ("Life:Die",), 0, 0),
        (f"Task 1 Answer: Life:Die\n{GOLD_TASK_2}", ("Life:Die",), 1, 1),  # no Task 2 header
        (f"Life:Die\nTask 2 Answer:\n{GOLD_TASK_2}", ("Life:Die",), 1, 1),  # no Task 1 header
        ("Task 1 Answer: Life:Die", ("Life:Die",), 0, 1),  # Task 2 missing altogether
        (f"Sure!\nTask 1 Answer: Life:Die\nTask 2 Answer:\n{GOLD_TASK_2}", ("Life:Die",), 1, 1),  # stray text
        (f"task 1 answer : life:die\nTASK 2  ANSWER: {GOLD_TASK_2}", ("Life:Die",), 1, 0),  # case and spacing
        (f"Task 2 Answer:\n{GOLD_TASK_2}\nTask 1 Answer: Life:Die", ("Life:Die",), 1, 0),  # swapped
        (f"Task 1 Answer: Life:Die ; Sports:Win\nTask 2 Answer:\n{GOLD_TASK_2}\nSports:Win | won", ("Life:Die",), 1, 2),
        (GOLD_TASK_2, (), 0, 4),  # no header: the line is taken as Task 1's answer, two items that are no type
    ],
)
def test_joint_answers_with_missing_headers_and_stray_text(
    text: str, event_types: tuple[str, ...], n_events: int, errors: int
) -> None:
    parsed = parse("joint", text, example_meta=_joint_meta(_sentence()))
    assert (parsed.event_types, len(parsed.events), parsed.errors) == (event_types, n_events, errors)
    if n_events:
        assert parsed.events == to_structure(_sentence(), "t").events[1:2]  # the Life:Die event, exactly


def test_vs_and_ts_answers_count_their_errors() -> None:
    vs_meta = render(_image_record(), "vs", image=_image_for(_image_record())).meta
    parsed = parse(
        "vs",
        "Justice:Arrest-Jail | Agent, person ; Victim ;\nSports:Win | Agent\nlife:die | Victim | Instrument",
        example_meta=vs_meta,
    )
    assert parsed.events == (
        ParsedEvent("Justice:Arrest-Jail", arguments=(ParsedArgument("Agent"), ParsedArgument("Person"))),
        ParsedEvent("Life:Die", arguments=(ParsedArgument("Victim"), ParsedArgument("Instrument"))),
    )
    assert parsed.errors == 3  # Victim is no Arrest-Jail image role, Sports:Win, "|" between roles
    assert parse("vs", "", example_meta=vs_meta) == Parsed("vs", errors=1)
    assert parse("vs", "None", example_meta=vs_meta) == Parsed("vs")

    roles_meta = _ts_meta("roles")
    assert parse("ts", "agent ; Victim, Place\nPerson", example_meta=roles_meta) == Parsed(
        "ts", roles=("Agent", "Place", "Person"), errors=1
    )
    assert parse("ts", "Instrument", example_meta=roles_meta) == Parsed("ts", errors=1)  # an image-only role
    assert parse("ts", "Instrument", example_meta=_ts_meta("image_roles")) == Parsed("ts", roles=("Instrument",))
    definition_meta = _ts_meta("type_of_definition")
    assert parse("ts", " justice:arrest-jail \n", example_meta=definition_meta) == Parsed(
        "ts", event_types=("Justice:Arrest-Jail",)
    )
    assert parse("ts", "Life:Die\nbecause", example_meta=definition_meta) == Parsed(
        "ts", event_types=("Life:Die",), errors=1
    )
    assert parse("ts", "an arrest", example_meta=definition_meta) == Parsed("ts", errors=1)
    assert parse("ts", "", example_meta=definition_meta) == Parsed("ts", errors=1)
    with pytest.raises(ValueError, match="example_meta\\['form'\\]"):
        parse("ts", "Agent", example_meta={**roles_meta, "form": "synonyms"})


STRATEGY_METAS = [
    ("joint", _joint_meta(_sentence())),
    ("joint", _joint_meta(_image_record())),
    ("vs", render(_image_record(), "vs", image=_image_for(_image_record())).meta),
    *(("ts", _ts_meta(form)) for form in SCHEMA_FORMS),
]
SOUP = st.text(alphabet="|;:#[](),\\\n 0123456789-abnoeTAskswrLifeDi", max_size=80)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(STRATEGY_METAS), st.one_of(st.text(max_size=120), SOUP))
def test_arbitrary_text_never_raises(task_meta: tuple[str, dict], text: str) -> None:
    task, meta = task_meta
    parsed = parse(task, text, example_meta=meta)
    assert isinstance(parsed, Parsed) and parsed.task == task and parsed.errors >= 0


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([_sentence(), _image_record()]), st.data())
def test_damaged_joint_targets_never_raise(record: TextSentence | ImageRecord, data) -> None:
    """Cut, spliced and garbled joint targets: a partial structure, never an exception; a lost header is counted."""
    example = render(record, "joint", image=_image(record))
    target = example.target
    start = data.draw(st.integers(0, len(target)))
    end = data.draw(st.integers(start, len(target)))
    damaged = target[:start] + data.draw(SOUP) + target[end:]
    parsed = parse("joint", damaged, example_meta=example.meta)
    assert parsed.errors >= 0
    compact = "".join(damaged.lower().split())
    if "task1answer:" not in compact or "task2answer:" not in compact:
        assert parsed.errors >= 1


# ---------------------------------------------------------------------------------------------------------------
# The schema converter: skip rules


def _entry(event_type: str, **change: object) -> dict:
    entry = {
        "definition": DEFINITIONS[event_type],
        "text_roles": list(TEXT_ROLES[event_type]),
        "image_roles": list(IMAGE_ROLES[event_type]),
    }
    entry.update(change)
    return {key: value for key, value in entry.items() if value is not None}


BAD_ENTRIES = {
    "Business:Merge-Org": (_entry("Life:Die"), 'event_types["Business:Merge-Org"]', "unknown event type"),
    "Transaction:Transfer-Money": (
        _entry("Transaction:Transfer-Money", text_roles=["Giver", "Money"]),  # Money is an image role only
        'event_types["Transaction:Transfer-Money"].text_roles[1]',
        "unknown role",
    ),
    "Life:Die": (_entry("Life:Die", image_roles=None), 'event_types["Life:Die"].image_roles', "missing field"),
    "Contact:Meet": (
        _entry("Contact:Meet", text_roles="Entity"), 'event_types["Contact:Meet"].text_roles', "wrong field type"
    ),
    "Contact:Phone-Write": (
        _entry("Contact:Phone-Write", image_roles=["Entity", 3]),
        'event_types["Contact:Phone-Write"].image_roles[1]',
        "wrong field type",
    ),
    "Conflict:Demonstrate": (["Entity"], 'event_types["Conflict:Demonstrate"]', "wrong field type"),
    "Movement:Transport": (
        _entry("Movement:Transport", definition=" "), 'event_types["Movement:Transport"].definition', "malformed input"
    ),
    "Conflict:Attack": (
        _entry("Conflict:Attack", image_roles=["Target", "Target"]),
        'event_types["Conflict:Attack"].image_roles[1]',
        "duplicate role",
    ),
}  # fmt: skip


def _write(path: Path, entries: dict) -> Path:
    path.write_text(json.dumps({"event_types": entries}), encoding="utf-8")
    return path


def test_converter_skips_bad_entries_naming_file_and_key_path(tmp_path: Path) -> None:
    entries = {name: entry for name, (entry, _, _) in BAD_ENTRIES.items()}
    entries["Justice:Arrest-Jail"] = _entry("Justice:Arrest-Jail", text_roles=["Person"], extra="ignored")
    path = _write(tmp_path / "a.json", entries)
    again = _write(tmp_path / "b.json", {"Justice:Arrest-Jail": _entry("Justice:Arrest-Jail")})
    conversion = schema_source.convert(tmp_path)
    assert [(q.event_type, q.form, q.text_roles) for q in conversion.records] == [
        ("Justice:Arrest-Jail", form, ("Person",)) for form in SCHEMA_FORMS
    ]
    expected = [(str(path), where, reason) for _, where, reason in BAD_ENTRIES.values()]
    expected.append((str(again), 'event_types["Justice:Arrest-Jail"]', "duplicate id"))
    assert [(skip.file, skip.line_or_key, skip.reason) for skip in conversion.skipped] == expected
    assert conversion.counts["records"] == 3 and conversion.counts["event_types"] == 1
    assert conversion.counts["by_form"] == dict.fromkeys(sorted(SCHEMA_FORMS), 1)
    assert conversion.format == "schema-json"


@pytest.mark.parametrize("name", sorted(BAD_ENTRIES))
def test_strict_conversion_raises_naming_the_key(tmp_path: Path, name: str) -> None:
    entry, where, reason = BAD_ENTRIES[name]
    path = _write(tmp_path / "schema.json", {name: entry})
    with pytest.raises(SourceError, match=re.escape(f"{path}:{where}: {reason}")) as error:
        schema_source.convert(path, strict=True)
    assert error.value.skip.line_or_key == where


@pytest.mark.parametrize(
    ("content", "found"),
    [
        ("[]", "found an array"),
        ('{"types": {}}', 'found an object without "event_types"'),
        ('{"event_types": []}', 'found "event_types" as an array'),
        ('{"event_types": {', "invalid JSON"),
    ],
)
def test_unreadable_schema_file_is_an_error(tmp_path: Path, content: str, found: str) -> None:
    path = tmp_path / "schema.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=found):
        schema_source.convert(path)


def test_write_schema_file_writes_the_ontology(tmp_path: Path) -> None:
    path = schema_source.write_schema_file(tmp_path / "schema.json")
    document = json.loads(path.read_text(encoding="utf-8"))
    assert list(document["event_types"]) == list(EVENT_TYPES)
    assert document["event_types"]["Justice:Arrest-Jail"] == {
        "definition": DEFINITIONS["Justice:Arrest-Jail"],
        "text_roles": ["Agent", "Person", "Place"],
        "image_roles": ["Agent", "Instrument", "Person"],
    }
    conversion = schema_source.convert(path)
    assert conversion.counts["by_form"] == dict.fromkeys(sorted(SCHEMA_FORMS), len(EVENT_TYPES))
    assert conversion.counts["by_kind"] == {"schema_question": 3 * len(EVENT_TYPES)}
    assert list(tmp_path.iterdir()) == [path]  # nothing left beside it
