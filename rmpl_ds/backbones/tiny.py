"""Offline tiny variants of the backbones, for tests and the CPU demo.

:func:`build_tiny` writes a normal Hugging Face directory that ``adapter.load`` reads with
``from_pretrained``, exactly like a downloaded checkpoint:

* ``config.json`` + ``model.safetensors``: the family's real architecture class, random-initialized from the
  full-size config shrunk to hidden 128 / 2 layers / a 64-wide 2-layer ViT (bf16, a few M parameters);
* tokenizer files: a byte-level BPE (a few thousand tokens) trained at build time on generic English, the M2E2
  ontology (event types, roles, relation labels), JSON punctuation and digits, with the family's special tokens
  and the family's chat template (its spec's);
* ``preprocessor_config.json`` (and InternVL's ``processor_config.json``): the published settings with small
  pixel caps, so a 512×512 image becomes 16 image tokens instead of 256–324.

Nothing is downloaded; the same ``(family, seed)`` gives the same weights and tokenizer.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rmpl_ds import atomic, ontology
from rmpl_ds.backbones import get_adapter, get_spec
from rmpl_ds.log import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = get_logger(__name__)

TOKENIZER_VOCAB_SIZE = 4000
# The model's embedding table is the tokenizer rounded up, like the real checkpoints (152064 > 151665).
VOCAB_MULTIPLE = 64
MAX_SEQ_LEN = 4096
_CORPUS_SEED = 1234
_CORPUS_LINES = 6000

# Generic news English (the kind of sentences ACE and M2E2 hold), one string so it reads as prose.
_GENERIC_TEXT = """
the a an of to in on at by for with from into over after before during about against between through under
and or but not no yes if then than that this these those there here when where who whom whose which what why how
is are was were be been being has have had do does did will would can could may might must shall should
he she it they we you i me him her them us his its their our your my mine
man woman men women child children people police officer soldier soldiers army troops protester protesters
crowd government minister president leader official officials court judge lawyer suspect victim victims family
city town village country capital street road bridge border airport station hospital school building house
car bus truck train plane ship boat helicopter vehicle tank weapon gun rifle bomb missile knife stone sign flag
money cash check bank payment dollars euros million billion thousand hundred
attack attacked attacking bombed bombing shot shooting fired killed killing died dead death wounded injured hurt
arrest arrested jailed detained prison charged sentenced convicted released
meet met meeting talks summit visit visited called phoned wrote letter email message
protest protested rally march marched demonstrators demonstration strike gathered
move moved moving travel traveled transported sent arrived departed fled returned crossed drove flew carried
pay paid gave give given donated transferred loan funds grant sold bought
said says told reported according announced confirmed denied claimed stated added
new old large small big many few several some all each every other another first second third last next
today yesterday tomorrow morning evening night week month year years day days hour hours time
image photo picture shows showing shown depicts scene background front holding standing sitting walking running
sentence text event events trigger argument arguments role roles type types entity entities relation mention
extract extraction list output answer question none null true false label labels span spans box boxes
north south east west central northern southern eastern western local national international foreign
iraq baghdad syria damascus israel gaza afghanistan kabul ukraine kyiv russia moscow china beijing france paris
london washington york texas california africa europe asia america egypt cairo iran tehran pakistan india
john mary david sarah ahmed maria chen ali james anna michael fatima peter elena omar laura
"""
_GENERIC_WORDS = tuple(_GENERIC_TEXT.split())

_SENTENCE_SHAPES = (
    "{name} {verb} the {noun} in {place} on {day} .",
    "{count} {noun} were {verb} near the {noun2} , police said .",
    "the {noun} {verb} {name} at the {noun2} in {place} .",
    "officials in {place} said {count} people {verb} after the {noun} .",
    "the image shows {noun} {verb2} a {noun2} in front of a {noun3} .",
    "{name} told reporters that the {noun} had {verb} the {noun2} .",
)


def _corpus(rng: random.Random) -> Iterator[str]:
    """Training text for the tiny tokenizer: generic English sentences, ontology words and JSON answers."""
    nouns = [word for word in _GENERIC_WORDS if len(word) > 3]
    verbs = [word for word in _GENERIC_WORDS if word.endswith("ed")]
    verbs_ing = [word for word in _GENERIC_WORDS if word.endswith("ing")]
    names = ["john", "mary", "david", "sarah", "ahmed", "maria", "chen", "ali", "james", "anna"]
    places = ["baghdad", "gaza", "kabul", "kyiv", "moscow", "paris", "london", "washington", "cairo", "tehran"]
    days = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
    yield " ".join(_GENERIC_WORDS)
    yield " ".join(ontology.EVENT_TYPES) + " " + " ".join(ontology.ROLES)
    yield " ".join(ontology.RELATION_LABELS)
    yield " ".join(str(number) for number in range(1000))
    for _ in range(_CORPUS_LINES):
        shape = rng.choice(_SENTENCE_SHAPES)
        sentence = shape.format(
            name=rng.choice(names).capitalize(),
            verb=rng.choice(verbs),
            verb2=rng.choice(verbs_ing),
            noun=rng.choice(nouns),
            noun2=rng.choice(nouns),
            noun3=rng.choice(nouns),
            place=rng.choice(places).capitalize(),
            day=rng.choice(days).capitalize(),
            count=rng.randint(2, 500),
        )
        yield sentence
        event_type = rng.choice(ontology.EVENT_TYPES)
        roles = ontology.TEXT_ROLES[event_type]
        arguments = [{"role": role, "text": rng.choice(nouns)} for role in rng.sample(roles, k=min(2, len(roles)))]
        answer = {"event_type": event_type, "trigger": rng.choice(verbs), "arguments": arguments}
        if rng.random() < 0.3:
            answer["box"] = [rng.randint(0, 999) for _ in range(4)]
        yield json.dumps([answer])
        yield json.dumps({"relation": rng.choice(ontology.RELATION_LABELS), "head": rng.choice(names)})
        # the line formats of rmpl_ds.tasks: "type | trigger | Role: text ; Role: text" and boxes in 0-999
        text_arguments = " ; ".join(f"{argument['role']}: {argument['text']}" for argument in arguments)
        yield f"{event_type} | {answer['trigger']} | {text_arguments}"
        image_roles = ontology.IMAGE_ROLES[event_type]
        boxes = " ; ".join(
            f"{role}: [{','.join(str(rng.randint(0, 999)) for _ in range(4))}]"
            for role in rng.sample(image_roles, k=min(2, len(image_roles)))
        )
        yield f"{event_type} | {boxes}"
        yield " ; ".join(rng.sample(ontology.EVENT_TYPES, k=rng.randint(1, 3))) if rng.random() < 0.8 else "none"


@functools.cache
def _learned_bpe_json() -> str:
    """The learned byte-level BPE (no special tokens yet), serialized; the same for every family."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(random.Random(_CORPUS_SEED)), trainer=trainer)
    return tokenizer.to_str()


def train_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``family``'s special tokens (appended after the learned vocabulary, as in
    the real tokenizers) and its chat template."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = get_spec(family)
    tokenizer = Tokenizer.from_str(_learned_bpe_json())
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in spec.special_tokens])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=spec.end_of_turn_token,
        pad_token=spec.pad_token,
        extra_special_tokens=dict(spec.named_special_tokens) or None,
        chat_template=spec.chat_template,
        model_max_length=MAX_SEQ_LEN,
        clean_up_tokenization_spaces=False,
    )


def build_tiny(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny random-init variant of ``family`` to ``out_dir`` (absent or empty) and return it.

    Raises:
        UserError: unknown family, or ``out_dir`` exists and is not empty.
    """
    import torch

    from rmpl_ds.backbones.loading import config_from_dict, model_class, refuse_to_overwrite

    adapter = get_adapter(family)
    refuse_to_overwrite(out_dir)
    tokenizer = train_tokenizer(family)
    vocab = tokenizer.get_vocab()
    token_ids = {token: vocab[token] for token in adapter.spec.special_tokens}
    vocab_size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    config = config_from_dict(adapter.spec, adapter.tiny_config_dict(token_ids, vocab_size))

    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        model = model_class(adapter.spec)(config).to(torch.bfloat16)
    with atomic.directory(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _write_json(staging / "preprocessor_config.json", adapter.tiny_preprocessor())
        processor_config = adapter.tiny_processor_config()
        if processor_config is not None:
            _write_json(staging / "processor_config.json", processor_config)
        _write_json(
            staging / "rmpl_tiny.json",
            {
                "family": family,
                "seed": seed,
                "parameters": sum(parameter.numel() for parameter in model.parameters()),
                "note": "random-initialized tiny model built offline by rmpl_ds.backbones.tiny; not a real checkpoint",
            },
        )
    logger.debug("built tiny %s model in %s", family, out_dir)
    return Path(out_dir)


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
