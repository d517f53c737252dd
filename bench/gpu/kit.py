"""GPU proof kit: full-size random-init backbones through the real stage runner, measured against the planner.

Each case is one stage of a recipe this script writes, run by the package's own launcher command
(``deepspeed --num_gpus 1 --module rmpl_ds.train RECIPE --stage bench --stop-after N``: ZeRO-2 from
the package's zero2 DeepSpeed config, bf16, gradient checkpointing, LoRA r=64 on the seven LLM projections or
QLoRA NF4, the
target-only LM head) on synthetic shards written with the package's shard writer and record types:

* the model directory holds the full-size config from rmpl_ds/model_configs/ (vocabulary and widths untouched; the
  special-token ids are the tiny family tokenizer's, which fit under the vocabulary), the tiny family tokenizer and
  the published preprocessor settings, and no weights: the recipe's ``model.init: random`` makes the stage build
  the architecture on the GPU in bf16 with the family's own init (QLoRA: the random bf16 weights are quantized by
  transformers + bitsandbytes exactly as a checkpoint's would be; ``BackboneAdapter._random_model``);
* every row is an MNRE-style relation pair (``mnre:r``): one 512x512 image and a tweet long enough that the encoded
  row is exactly ``max_seq_len`` (2048) tokens, as the recipes' worst case; the target is a relation label, a few
  tokens. The planner's logits term is evaluated at that measured target count (``target_tokens``), and the
  prediction at the recipes' bound (256 per sample) is reported beside it;
* per case: peak allocated and reserved GiB of the rank (torch's counters, from metrics.jsonl), the peak of
  nvidia-smi's memory.used above the idle card, the planner's per-GPU prediction for the same settings at world
  size 1, the error in %, tokens/s and samples/s (median over the steps after the first), MFU, the step time split
  into forward / backward / optimizer step (DeepSpeed's wall_clock_breakdown timers, switched on in a copy of
  the zero2 config), and the prediction carried over to 2 x 24 GiB;
* a stop-and-resume check on one case: the same stage stopped at half its steps, resumed from its checkpoint, and
  its losses compared with the uninterrupted run's (the first half compares two fresh runs, which is the run-to-run
  noise; bf16 on a GPU is not bitwise reproducible);
* a hard time budget: each case runs under a timeout of what is left, a case that cannot start in time is recorded
  as not run, and the result files (JSON + markdown) are rewritten after every case, so what was measured survives.

Without a GPU: ``--dry-run`` takes the GPU cases through every step but the CUDA ones (full-size model directories,
shards, recipes, the planner, each model built on the meta device through the adapter, its parameter counts held
against the planner's); ``--cpu-smoke`` runs the tiny models (rmpl_ds.backbones.tiny configs) through the launcher
on one gloo rank: RSS instead of GPU memory, no nvidia-smi, no MFU, the rest as on the GPU.

Usage: python bench/gpu/kit.py [--dry-run | --cpu-smoke] [--out DIR] [--work DIR] [--budget-s 480] [--cases A,B]
bench/gpu/run.sh is the one command that installs what is missing and runs this.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_data import revision  # noqa: E402  (bench/ holds the shared benchmark helpers)
from benchlib import cpu_model  # noqa: E402

from rmpl_ds.ds_config import packaged_config  # noqa: E402
from rmpl_ds.errors import UserError  # noqa: E402

RESULTS = ROOT / "bench" / "results"
STAGE = "bench"
SEQ_LEN = 2048
IMAGE_SIDE = 512
LORA = {"rank": 64, "alpha": 128, "dropout": 0.05}
# A case that cannot get this many seconds of the budget is not started (model build + launcher start + 1 step).
MIN_CASE_S = {"gpu": 60.0, "cpu": 15.0}
# One case never gets more than this, so one hung case cannot eat the whole budget.
MAX_CASE_S = {"gpu": 180.0, "cpu": 240.0}
# Dense bf16 TFLOP/s by GPU name (vendor datasheets, without sparsity); MFU is stated against these.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "RTX 4090": 165.2, "L40S": 362.1}
# The relation every synthetic row asks about; its label is the whole target.
RELATION = "/per/per/peer"
SAMPLES = 16
# What the dry run plans for: the H200 the device tool lends (143,771 MiB as nvidia-smi reports it).
DRY_RUN_CARD_GIB = 140.4
USER_ERROR_EXIT = 2


@dataclass(frozen=True)
class Case:
    """One measured configuration: a family at full size (or tiny in the CPU smoke), a mode, a batch split."""

    name: str
    family: str
    mode: str
    micro_batch: int
    accumulation: int
    steps: int
    resume_check: bool = False

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation


# In priority order: what the budget runs out on last is the least important. The resume pair runs after them all.
GPU_CASES = (
    Case("qwen2-vl-7b-lora-2048x2", "qwen2-vl", "lora", 2, 2, 3),
    Case("qwen2-vl-7b-lora-2048x1", "qwen2-vl", "lora", 1, 2, 4, resume_check=True),
    Case("qwen3-vl-8b-lora-2048x1", "qwen3-vl", "lora", 1, 2, 3),
    Case("internvl3_5-8b-lora-2048x1", "internvl3_5", "lora", 1, 2, 3),
    Case("qwen2-vl-7b-qlora-2048x2", "qwen2-vl", "qlora", 2, 2, 3),
)
# The CPU smoke: the same code on the tiny models; every family, both modes and the resume check, fewer steps.
CPU_CASES = (
    Case("tiny-qwen2-vl-lora-2048x2", "qwen2-vl", "lora", 2, 1, 4, resume_check=True),
    Case("tiny-qwen3-vl-lora-2048x1", "qwen3-vl", "lora", 1, 2, 2),
    Case("tiny-internvl3_5-lora-2048x1", "internvl3_5", "lora", 1, 2, 2),
    Case("tiny-qwen2-vl-qlora-2048x2", "qwen2-vl", "qlora", 2, 1, 2),
)


# ------------------------------------------------------------------------------------------------ model directories


def write_model_dir(family: str, out_dir: Path, *, full_size: bool) -> Path:
    """A Hugging Face directory without weights, for ``model.init: random``: the full-size config (``full_size``)
    or the tiny one, the tiny family tokenizer, and the published (full size) or tiny preprocessor settings."""
    from rmpl_ds.backbones import get_adapter
    from rmpl_ds.backbones.loading import config_from_dict
    from rmpl_ds.backbones.tiny import VOCAB_MULTIPLE, train_tokenizer

    adapter = get_adapter(family)
    spec = adapter.spec
    tokenizer = train_tokenizer(family)
    vocab = tokenizer.get_vocab()
    token_ids = {token: vocab[token] for token in spec.special_tokens}
    tiny_vocab = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    tiny = adapter.tiny_config_dict(token_ids, tiny_vocab)
    if full_size:
        config = spec.full_size_config_dict()
        # Only the special-token ids change: they must be the tokenizer's (M-RoPE finds images by them).
        for section in (None, "text_config", "vision_config"):
            source = tiny if section is None else tiny.get(section, {})
            target = config if section is None else config.get(section)
            for key, value in source.items():
                if key.endswith("_token_id") and isinstance(target, dict):
                    target[key] = value
        preprocessor = {
            **spec.reference_preprocessor,
            **{key: adapter.tiny_preprocessor()[key] for key in ("image_processor_type", "processor_class")},
        }
    else:
        config, preprocessor = tiny, adapter.tiny_preprocessor()
    hf_config = config_from_dict(spec, config)
    vocab_size = hf_config.get_text_config().vocab_size
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"{family}: tokenizer ids up to {max(vocab.values())} do not fit the vocabulary {vocab_size}")
    out_dir.mkdir(parents=True, exist_ok=False)
    hf_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    processor_config = adapter.tiny_processor_config()
    if processor_config is not None:
        if full_size and "image_seq_length" in config:
            processor_config = {**processor_config, "image_seq_length": config["image_seq_length"]}
        (out_dir / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
    (out_dir / "rmpl_random_init.json").write_text(
        json.dumps(
            {
                "family": family,
                "config": spec.full_size_config if full_size else "tiny",
                "note": "no weights: train with model.init random (bench/gpu/kit.py); tokenizer from "
                "rmpl_ds.backbones.tiny",
            },
            indent=2,
        )
        + "\n"
    )
    return out_dir


# ------------------------------------------------------------------------------------------------ synthetic shards


# Common English words; each one that the family tokenizer encodes as one token (with its leading space) is filler.
_FILLER = (
    "the of to in and for with from said police people city government officials after before during about "
    "against between army troops protest meeting border court prison attack killed arrested visit money bank "
    "today week year morning night north south east west"
)


def synthetic_shards(bundle: Any, out_dir: Path, *, seq_len: int, samples: int = SAMPLES, seed: int = 0) -> dict:
    """Write ``samples`` relation-pair records with 512x512 images as a shard set (rmpl_ds.shards) whose every
    row encodes to exactly ``seq_len`` tokens for ``bundle``'s family; returns the row shape (tokens, image tokens,
    target tokens per row). Raises UserError when the tokenizer cannot make a row of that length."""
    from rmpl_ds import tasks
    from rmpl_ds.commands.shards import record_bytes, sample_key
    from rmpl_ds.images import encode_image
    from rmpl_ds.records import EntityMention, RelationPair
    from rmpl_ds.shards import ShardSample, write_shards
    from rmpl_ds.sources.demo import draw_scene

    tokenizer = bundle.tokenizer
    words = [w for w in _FILLER.split() if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    if len(words) < 8:
        raise UserError(f"{bundle.path}: the tokenizer splits the filler words; cannot size the rows")

    def record(index: int, length: int) -> RelationPair:
        rng = random.Random(seed * 100_003 + index)
        tokens = ("John", "and", "Mary", *(rng.choice(words) for _ in range(length)))
        return RelationPair(
            id=f"synthetic-{index:04d}",
            source="synthetic",
            split="train",
            tokens=tokens,
            head=EntityMention("John", 0, 1),
            tail=EntityMention("Mary", 2, 3),
            relation=RELATION,
            image=f"synthetic_{index:04d}.jpg",
        )

    def image(index: int) -> Any:
        return draw_scene(random.Random(seed * 7919 + index), IMAGE_SIDE, IMAGE_SIDE, None, [])[0]

    def encoded(index: int, length: int) -> dict[str, Any]:
        example = tasks.render(record(index, length), "r", image=image(index))
        return bundle.encode(example, max_seq_len=10 * seq_len)

    # Each filler word is one token, so the row grows by one per word: solve, then confirm (and nudge if a
    # word pair ever merges).
    length = max(0, seq_len - int(encoded(0, 0)["length"]))
    for _ in range(8):
        got = int(encoded(0, length)["length"])
        if got == seq_len:
            break
        length += seq_len - got
    else:
        raise UserError(f"{bundle.path}: cannot make a row of exactly {seq_len} tokens (got {got})")
    if length < 0:
        raise UserError(f"{bundle.path}: the prompt alone is longer than {seq_len} tokens")

    rows = []
    shard_samples = []
    for index in range(samples):
        item = record(index, length)
        picture = image(index)
        row = bundle.encode(tasks.render(item, "r", image=picture), max_seq_len=seq_len)
        rows.append(row)
        members = {"json": record_bytes(item), "jpg": encode_image(picture, "jpeg")}
        shard_samples.append(ShardSample(sample_key(index, item), members))
    lengths = {int(row["length"]) for row in rows}
    targets = {int(row["n_target_tokens"]) for row in rows}
    image_tokens = {int(sum(row["image_tokens"])) for row in rows}
    if lengths != {seq_len} or len(targets) != 1 or len(image_tokens) != 1:
        raise UserError(f"{out_dir}: rows differ: lengths {lengths}, targets {targets}, image tokens {image_tokens}")
    shape = {
        "tokens_per_row": seq_len,
        "image_tokens_per_row": image_tokens.pop(),
        "target_tokens_per_row": targets.pop(),
        "filler_words": length,
        "samples": samples,
        "task": "r (relation pair: one 512x512 image, the tweet, the relation label as target)",
    }
    write_shards(
        shard_samples,
        out_dir,
        source="synthetic",
        extra_manifest={"generator": "bench/gpu/kit.py synthetic_shards", "rows": shape},
    )
    return shape


# ------------------------------------------------------------------------------------------------ recipes and runs


def write_ds_config(out: Path) -> Path:
    """The package's zero2 config with DeepSpeed's wall_clock_breakdown timers on (forward / backward / step)."""
    config = json.loads(packaged_config("zero2").read_text())
    config["wall_clock_breakdown"] = True
    out.write_text(json.dumps(config, indent=2) + "\n")
    return out


def write_recipe(case: Case, out: Path, *, model_dir: Path, shards: Path, ds_config: Path, workers: int) -> Path:
    recipe = {
        "name": f"gpu-kit-{case.name}",
        "model": {
            "family": case.family,
            "path": str(model_dir),
            "mode": case.mode,
            "lora": dict(LORA),
            "image_size": IMAGE_SIDE,
            "max_seq_len": SEQ_LEN,
            "max_target_tokens": 256,
            "loss": "target_only",
            "gradient_checkpointing": True,
            "dtype": "bf16",
            "init": "random",
        },
        "sources": {"synthetic": str(shards)},
        "stages": [
            {
                "name": STAGE,
                "mixture": [{"source": "synthetic", "task": "r", "weight": 1}],
                "steps": case.steps,
                "lr": 1.0e-4,
                "schedule": "constant",
                "global_batch": case.global_batch,
                "micro_batch": case.micro_batch,
                "checkpoint_every": 1000,
                "keep_last": 1,
                "seed": 0,
            }
        ],
        "launch": {"gpus": 1, "deepspeed_config": str(ds_config), "num_workers": workers},
        "logging": {"tensorboard": False, "log_every": 1, "console_every": 1},
    }
    import yaml

    out.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class GpuMemoryPoller:
    """Samples nvidia-smi's memory.used (MiB) twice a second while a run lasts; a no-op without nvidia-smi."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.binary = shutil.which("nvidia-smi")
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read_mib(self) -> float | None:
        if self.binary is None:
            return None
        try:
            done = subprocess.run(
                [self.binary, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            return float(done.stdout.strip().splitlines()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def __enter__(self) -> GpuMemoryPoller:
        if self.binary is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            used = self.read_mib()
            if used is not None:
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)


@dataclass
class RunOutcome:
    exit_code: int | None
    wall_s: float
    timed_out: bool
    log: Path
    smi_peak_mib: float | None


def launch(recipe: Path, out: Path, *, stop_after: int, resume: str, timeout_s: float, log: Path) -> RunOutcome:
    """One stage run under the deepspeed launcher, 1 rank, killed (its whole process group) past ``timeout_s``."""
    from rmpl_ds.commands.train import launcher_command

    args = argparse.Namespace(
        recipe=str(recipe),
        overrides=[],
        stage=STAGE,
        hostfile=None,
        num_nodes=None,
        no_ssh=False,
        node_rank=0,
        master_addr=None,
        master_port=free_port(),
        out=str(out),
        resume=resume,
        new_phase=False,
        collective_timeout=None,
        stop_after=stop_after,
    )
    command = launcher_command(args, 1)
    env = dict(
        os.environ,
        PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    began = time.monotonic()
    timed_out = False
    with log.open("w") as sink, GpuMemoryPoller() as poller:
        sink.write("$ " + " ".join(command) + "\n")
        sink.flush()
        # A session of its own: on timeout the launcher, its launch.py and the rank go together.
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code: int | None = process.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            timed_out = True
            code = _stop_group(process)
    return RunOutcome(code, time.monotonic() - began, timed_out, log, poller.peak_mib)


def _stop_group(process: subprocess.Popen) -> int | None:
    for signum, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            return process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return None


_SPLIT = re.compile(r"time \(ms\) \| fwd: ([\d.]+) \| bwd: ([\d.]+) .*\| step: ([\d.]+)")


def step_splits(log: Path) -> list[dict[str, float]]:
    """DeepSpeed's per-optimizer-step forward / backward / step times (seconds), in step order, from a run's log."""
    splits = []
    for line in log.read_text(errors="replace").splitlines():
        match = _SPLIT.search(line)
        if match:
            forward, backward, step = (float(value) / 1000 for value in match.groups())
            splits.append({"forward_s": forward, "backward_s": backward, "optimizer_s": step})
    return splits


def log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# ------------------------------------------------------------------------------------------------ one case


@dataclass
class Context:
    """What the cases share: the mode, directories, the card, and the model directories and shards built so far.

    ``full_size``: the published configs (else the tiny ones); ``launch``: run the stages (else the dry run stops
    before the launcher); ``cuda``: a GPU run (torch's CUDA counters, nvidia-smi, MFU).
    """

    full_size: bool
    launch: bool
    cuda: bool
    work: Path
    card_gib: float
    card_name: str
    deadline: float
    models: dict[str, tuple[Path, Path, dict[str, Any]]] = dataclasses.field(default_factory=dict)
    ds_config: Path | None = None

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def limits(self) -> tuple[float, float]:
        """(the least time a case needs to start, the most one case may take), in seconds."""
        kind = "gpu" if self.cuda else "cpu"
        return MIN_CASE_S[kind], MAX_CASE_S[kind]


def family_inputs(ctx: Context, family: str) -> tuple[Path, Path, dict[str, Any]]:
    """(model directory, shard directory, row shape) of ``family``, built on first use."""
    if family not in ctx.models:
        from rmpl_ds.backbones import get_adapter

        model_dir = write_model_dir(family, ctx.work / "models" / family, full_size=ctx.full_size)
        bundle = get_adapter(family).load_processor(model_dir)
        shards = ctx.work / "shards" / family
        shape = synthetic_shards(bundle, shards, seq_len=SEQ_LEN)
        ctx.models[family] = (model_dir, shards, shape)
    return ctx.models[family]


def run_case(ctx: Context, case: Case) -> dict[str, Any]:
    """Build what the case needs, run it, and measure it against the planner; never raises for a failed run."""
    result: dict[str, Any] = {
        "name": case.name,
        "family": case.family,
        "mode": case.mode,
        "seq_len": SEQ_LEN,
        "micro_batch": case.micro_batch,
        "accumulation": case.accumulation,
        "global_batch": case.global_batch,
        "steps": case.steps,
    }
    model_dir, shards, shape = family_inputs(ctx, case.family)
    result["rows"] = shape
    case_dir = ctx.work / "cases" / case.name
    case_dir.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(
        case,
        case_dir / "recipe.yaml",
        model_dir=model_dir,
        shards=shards,
        ds_config=_ds_config(ctx),
        workers=1 if ctx.cuda else 0,
    )
    result["predicted"] = predict(recipe, shape, ctx)
    if not ctx.launch:
        result["meta_check"] = meta_check(case, model_dir, result["predicted"])
        result["status"] = "dry run" if result["meta_check"]["agree"] else "failed"
        return result
    idle = GpuMemoryPoller().read_mib()
    timeout = min(ctx.limits[1], ctx.remaining_s())
    outcome = launch(
        recipe, case_dir / "run", stop_after=case.steps, resume="none", timeout_s=timeout, log=case_dir / "run.log"
    )
    result["run"] = _outcome_dict(outcome)
    from rmpl_ds.evaluate.curves import read_metrics

    metrics = read_metrics(case_dir / "run" / STAGE / "metrics.jsonl")
    result["losses"] = [round(float(m["loss"]), 6) for m in metrics]
    if outcome.exit_code != 0 or len(metrics) < case.steps:
        result["status"] = "timeout" if outcome.timed_out else "failed"
        result["log_tail"] = log_tail(outcome.log)
        if metrics:
            result["measured"] = measure(metrics, outcome, idle, step_splits(outcome.log), result["predicted"], ctx)
        return result
    # A 7-8B LoRA checkpoint is ~2 GiB (fp32 master weights + Adam states); the GPU machine's disk holds 64 GB.
    shutil.rmtree(case_dir / "run" / STAGE / "checkpoints", ignore_errors=True)
    result["status"] = "ok"
    result["measured"] = measure(metrics, outcome, idle, step_splits(outcome.log), result["predicted"], ctx)
    result["error_pct"] = errors(result["measured"], result["predicted"])
    result["carried_to_2x24"] = carry_over(result["measured"], result["predicted"])
    return result


def meta_check(case: Case, model_dir: Path, predicted: dict[str, Any]) -> dict[str, Any]:
    """The dry run's stand-in for the GPU: the case's model built through ``BackboneAdapter.load`` with
    ``random_init`` on the meta device (no memory), its LoRA adapters attached as the stage attaches them, and its
    parameter counts held against the planner's. NF4 quantization needs real tensors, so a QLoRA case checks its
    architecture and adapters in lora mode (the CPU smoke quantizes the tiny model for real)."""
    from rmpl_ds.backbones import get_adapter
    from rmpl_ds.config import LoraConfig

    model, _ = get_adapter(case.family).load(
        model_dir,
        "lora",
        lora=LoraConfig(rank=LORA["rank"], alpha=LORA["alpha"], dropout=LORA["dropout"]),
        device="meta",
        random_init=True,
    )
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    return {
        "device": "meta",
        "mode_checked": "lora",
        "params_total": total - trainable,
        "params_trainable": trainable,
        "agree": total - trainable == predicted["params_total"] and trainable == predicted["params_trainable"],
    }


def _ds_config(ctx: Context) -> Path:
    if ctx.ds_config is None:
        ctx.ds_config = write_ds_config(ctx.work / "zero2_timed.json")
    return ctx.ds_config


def _outcome_dict(outcome: RunOutcome) -> dict[str, Any]:
    return {
        "exit_code": outcome.exit_code,
        "wall_s": round(outcome.wall_s, 1),
        "timed_out": outcome.timed_out,
        "log": str(outcome.log),
    }


def predict(recipe_path: Path, shape: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The planner for the case's recipe at world size 1 on this card, with the rows' measured target tokens, and
    at the recipe bound; plus the same recipe at 2 x 24 GiB (what the measurement is carried over to)."""
    from rmpl_ds.config import load_recipe
    from rmpl_ds.plan import ALLOCATOR_RESERVE_FRACTION, CUDA_CONTEXT_GIB, plan_memory, plan_recipe

    recipe = load_recipe(recipe_path, world_size=1)
    at_bound = plan_recipe(recipe, 1, gpu_mem_gib=ctx.card_gib)
    plan = plan_memory(dataclasses.replace(at_bound.settings, target_tokens=shape["target_tokens_per_row"]))
    two = plan_recipe(recipe, 2, gpu_mem_gib=24.0)
    allocated = plan.per_gpu_gib - CUDA_CONTEXT_GIB - plan.breakdown["allocator_reserve"]
    two_at_rows = plan_memory(dataclasses.replace(two.settings, target_tokens=shape["target_tokens_per_row"]))
    return {
        "backbone": plan.backbone,
        "target_tokens": shape["target_tokens_per_row"],
        "total_gib": round(plan.per_gpu_gib, 3),
        "allocated_gib": round(allocated, 3),
        # The allocator's reserved pool holds the allocations plus their fragmentation, not the CUDA context.
        "reserved_gib": round(plan.per_gpu_gib - CUDA_CONTEXT_GIB, 3),
        "breakdown": {key: round(value, 3) for key, value in plan.breakdown.items()},
        "params_total": plan.params.total,
        "params_trainable": plan.params.trainable,
        "total_at_recipe_target_bound_gib": round(at_bound.per_gpu_gib, 3),
        "two_gpus_24gib": {
            "total_gib": round(two_at_rows.per_gpu_gib, 3),
            "allocated_gib": round(
                two_at_rows.per_gpu_gib - CUDA_CONTEXT_GIB - two_at_rows.breakdown["allocator_reserve"], 3
            ),
            "total_at_recipe_target_bound_gib": round(two.per_gpu_gib, 3),
        },
        "constants": {"cuda_context_gib": CUDA_CONTEXT_GIB, "allocator_reserve_fraction": ALLOCATOR_RESERVE_FRACTION},
    }


def measure(
    metrics: list[dict[str, Any]],
    outcome: RunOutcome,
    idle_mib: float | None,
    splits: list[dict[str, float]],
    predicted: dict[str, Any],
    ctx: Context,
) -> dict[str, Any]:
    """Memory peaks over the whole run; speed as the median over the steps after the first (the first one pays
    for allocation, autotuning and the optimizer states' creation)."""
    timed = metrics[1:] or metrics
    tokens_per_s = statistics.median(float(m["tokens_per_s"]) for m in timed)
    measured: dict[str, Any] = {
        "memory_source": "torch.cuda max_memory_allocated / max_memory_reserved of the rank"
        if ctx.cuda
        else "peak RSS of the rank process (CPU smoke: not comparable with the planner's GPU terms)",
        "peak_allocated_gib": round(max(float(m["peak_memory_gib"]) for m in metrics), 3),
        "peak_reserved_gib": _max_of(metrics, "peak_memory_reserved_gib"),
        "nvidia_smi_peak_gib": None,
        "tokens_per_s": round(tokens_per_s, 1),
        "samples_per_s": round(statistics.median(float(m["samples_per_s"]) for m in timed), 3),
        "step_time_s": round(statistics.median(float(m["step_time_s"]) for m in timed), 3),
        "steps_timed": len(timed),
        "real_token_fraction": round(statistics.median(float(m["real_token_fraction"]) for m in timed), 4),
    }
    if outcome.smi_peak_mib is not None:
        measured["nvidia_smi_peak_gib"] = round((outcome.smi_peak_mib - (idle_mib or 0.0)) / 1024, 3)
    if len(splits) >= len(metrics):
        timed_splits = splits[1 : len(metrics)] or splits[: len(metrics)]
        split = {key: statistics.median(s[key] for s in timed_splits) for key in timed_splits[0]}
        split["other_s"] = measured["step_time_s"] - sum(split.values())
        measured["split_s"] = {key: round(value, 4) for key, value in split.items()}
    peak = next((tflops for name, tflops in PEAK_BF16_TFLOPS.items() if name in ctx.card_name), None)
    active = predicted["params_total"]
    measured["mfu"] = {
        "value": round(6 * active * tokens_per_s / (peak * 1e12), 4) if peak and ctx.cuda else None,
        "active_params": active,
        "peak_bf16_tflops": peak if ctx.cuda else None,
        "formula": "6 x active parameters x tokens/s / dense bf16 peak (datasheet); with LoRA and checkpointing "
        "a step is ~ forward + recompute + activation gradients = 6 x P x T as well, attention FLOPs left out",
    }
    return measured


def _max_of(metrics: list[dict[str, Any]], key: str) -> float | None:
    values = [float(m[key]) for m in metrics if m.get(key) is not None]
    return round(max(values), 3) if values else None


def errors(measured: dict[str, Any], predicted: dict[str, Any]) -> dict[str, float | None]:
    """(predicted - measured) / measured in %: positive when the planner over-predicts."""

    def pct(measured_value: float | None, predicted_value: float) -> float | None:
        if measured_value is None or measured_value <= 0:
            return None
        return round(100 * (predicted_value - measured_value) / measured_value, 1)

    return {
        "allocated": pct(measured["peak_allocated_gib"], predicted["allocated_gib"]),
        "reserved": pct(measured["peak_reserved_gib"], predicted["reserved_gib"]),
        "nvidia_smi_total": pct(measured["nvidia_smi_peak_gib"], predicted["total_gib"]),
    }


def carry_over(measured: dict[str, Any], predicted: dict[str, Any]) -> dict[str, Any]:
    """The 2 x 24 GiB per-rank prediction corrected by what world size 1 measured: every term the H200 run tests
    is the same at world size 2 except the ZeRO partition (gradients and optimizer states / N, exact arithmetic)
    and NCCL's buffers, so the measured-minus-predicted error of the allocations is added as is."""
    two = predicted["two_gpus_24gib"]
    error_gib = measured["peak_allocated_gib"] - predicted["allocated_gib"]
    corrected = two["total_gib"] + error_gib * (1 + predicted["constants"]["allocator_reserve_fraction"])
    bound = two["total_at_recipe_target_bound_gib"] + error_gib * (
        1 + predicted["constants"]["allocator_reserve_fraction"]
    )
    return {
        "allocation_error_gib": round(error_gib, 3),
        "predicted_total_gib": two["total_gib"],
        "corrected_total_gib": round(corrected, 3),
        "corrected_total_at_recipe_target_bound_gib": round(bound, 3),
        "fits_24gib_at_recipe_target_bound": bound <= 24.0,
    }


# ------------------------------------------------------------------------------------------------ resume check


def resume_check(ctx: Context, case: Case, reference: dict[str, Any]) -> dict[str, Any]:
    """Stop the reference case's stage at half its steps, resume it, and compare every step's loss with the
    uninterrupted reference run: steps up to the stop compare two fresh runs (the run-to-run noise), the steps
    after it the resumed run."""
    stop_at = case.steps // 2
    check: dict[str, Any] = {"case": case.name, "stop_after": stop_at, "steps": case.steps}
    if reference.get("status") != "ok":
        return {**check, "status": "not run", "reason": f"the reference run of {case.name} did not finish"}
    case_dir = ctx.work / "cases" / case.name
    out = case_dir / "resumed"
    runs = []
    for run_index, (stop, resume) in enumerate(((stop_at, "none"), (case.steps, "auto"))):
        if ctx.remaining_s() < ctx.limits[0]:
            return {**check, "status": "not run", "reason": "time budget", "runs": runs}
        timeout = min(ctx.limits[1], ctx.remaining_s())
        outcome = launch(
            case_dir / "recipe.yaml",
            out,
            stop_after=stop,
            resume=resume,
            timeout_s=timeout,
            log=case_dir / f"resume-{run_index}.log",
        )
        runs.append(_outcome_dict(outcome))
        if outcome.exit_code != 0:
            status = "timeout" if outcome.timed_out else "failed"
            return {**check, "status": status, "runs": runs, "log_tail": log_tail(outcome.log)}
    from rmpl_ds.evaluate.curves import read_metrics

    resumed = [float(m["loss"]) for m in read_metrics(out / STAGE / "metrics.jsonl")]
    shutil.rmtree(out / STAGE / "checkpoints", ignore_errors=True)
    # The reference's losses in its result are rounded; compare the raw ones from its metrics.
    uninterrupted = [float(m["loss"]) for m in read_metrics(case_dir / "run" / STAGE / "metrics.jsonl")]
    if len(resumed) != case.steps or len(uninterrupted) != case.steps:
        return {**check, "status": "failed", "runs": runs, "reason": f"losses {len(resumed)} vs {len(uninterrupted)}"}
    diffs = [abs(a - b) for a, b in zip(resumed, uninterrupted, strict=True)]
    return {
        **check,
        "status": "ok",
        "runs": runs,
        "uninterrupted_losses": uninterrupted,
        "resumed_losses": resumed,
        "abs_diff": diffs,
        "max_abs_diff_fresh_runs": max(diffs[:stop_at]),
        "max_abs_diff_after_resume": max(diffs[stop_at:]),
        "max_rel_diff_after_resume": max(
            diff / max(abs(loss), 1e-12) for diff, loss in zip(diffs[stop_at:], uninterrupted[stop_at:], strict=True)
        ),
        "bitwise_equal": resumed == uninterrupted,
    }


# ------------------------------------------------------------------------------------------------ the report


def machine_facts(*, cuda: bool) -> dict[str, Any]:
    """GPU, driver, library versions, without creating a CUDA context in this process (nvidia-smi and metadata)."""
    import platform

    versions = {}
    for name in ("torch", "transformers", "deepspeed", "peft", "bitsandbytes", "accelerate", "tokenizers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    import torch

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "versions": versions,
        "torch_cuda": torch.version.cuda,
        "gpu": None,
    }
    smi = shutil.which("nvidia-smi")
    if cuda and smi:
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
            line = subprocess.run(
                [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits", "--id=0"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout.strip()
            name, driver, memory = (part.strip() for part in line.split(","))
            facts["gpu"] = {"name": name, "driver": driver, "memory_gib": round(float(memory) / 1024, 2)}
    return facts


def write_report(report: dict[str, Any], out: Path) -> None:
    """gpu.json and gpu.md, each written to a temporary name and renamed: a reader never sees half a file."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu.json", json.dumps(report, indent=1) + "\n"), ("gpu.md", render(report))):
        staging = out / f".{name}.partial"
        staging.write_text(text, encoding="utf-8")
        staging.replace(out / name)


def _fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def render(report: dict[str, Any]) -> str:
    machine = report["machine"]
    gpu = machine.get("gpu")
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    where = (
        f"{gpu['name']} ({gpu['memory_gib']} GiB), driver {gpu['driver']}, CUDA {machine['torch_cuda']}"
        if gpu
        else f"CPU only: {machine['nproc']} CPUs, {machine['cpu']}"
    )
    titles = {"gpu": "", "dry-run": ": dry run (nothing measured)", "cpu-smoke": ": CPU smoke (tiny models)"}
    lines = [
        "# GPU proof kit" + titles[report["mode"]],
        "",
        f"Mode: {report['mode']}, {report['what']}.  ",
        f"Command: `{report['command']}`  ",
        f"Machine: {where}; Python {machine['python']}, {versions}  ",
        f"Date: {report['date']}; code: {report['revision']}; time budget {report['budget_s']:.0f} s, used "
        f"{report['elapsed_s']:.0f} s; state: {report['state']}",
        "",
        f"Rows: {SEQ_LEN} tokens each (one {IMAGE_SIDE}x{IMAGE_SIDE} image, an MNRE-style relation pair), the target "
        "a relation label; the planner is evaluated at that target count and, in the last column, at the recipes' "
        "bound of 256 target tokens per sample. Memory in GiB; error = (predicted - measured) / measured.",
        "",
        "| case | status | peak allocated | predicted | error | peak reserved | predicted | error | nvidia-smi "
        "| predicted total | error | total at 256 targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        measured, predicted, error = case.get("measured", {}), case.get("predicted", {}), case.get("error_pct", {})
        lines.append(
            f"| {case['name']} | {case['status']} | {_fmt(measured.get('peak_allocated_gib'))} "
            f"| {_fmt(predicted.get('allocated_gib'))} | {_fmt(error.get('allocated'), 1, ' %')} "
            f"| {_fmt(measured.get('peak_reserved_gib'))} | {_fmt(predicted.get('reserved_gib'))} "
            f"| {_fmt(error.get('reserved'), 1, ' %')} | {_fmt(measured.get('nvidia_smi_peak_gib'))} "
            f"| {_fmt(predicted.get('total_gib'))} | {_fmt(error.get('nvidia_smi_total'), 1, ' %')} "
            f"| {_fmt(predicted.get('total_at_recipe_target_bound_gib'))} |"
        )
    lines += [
        "",
        "| case | tokens/s | samples/s | step s | forward | backward | optimizer | other | MFU | 2 x 24 GiB: predicted "
        "| corrected | corrected at 256 targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        measured = case.get("measured", {})
        split = measured.get("split_s", {})
        mfu = (measured.get("mfu") or {}).get("value")
        carried = case.get("carried_to_2x24", {})
        two = case.get("predicted", {}).get("two_gpus_24gib", {})
        lines.append(
            f"| {case['name']} | {_fmt(measured.get('tokens_per_s'), 0)} | {_fmt(measured.get('samples_per_s'))} "
            f"| {_fmt(measured.get('step_time_s'), 3)} | {_fmt(split.get('forward_s'), 3)} "
            f"| {_fmt(split.get('backward_s'), 3)} | {_fmt(split.get('optimizer_s'), 3)} "
            f"| {_fmt(split.get('other_s'), 3)} | {_fmt(mfu * 100 if mfu is not None else None, 1, ' %')} "
            f"| {_fmt(two.get('total_gib'))} | {_fmt(carried.get('corrected_total_gib'))} "
            f"| {_fmt(carried.get('corrected_total_at_recipe_target_bound_gib'))} |"
        )
    resume = report.get("resume")
    lines += ["", "## Stop and resume (bf16)", ""]
    if not resume:
        lines.append("Not run in this mode." if report["mode"] == "dry-run" else "Not run.")
    elif resume["status"] != "ok":
        lines.append(f"{resume['case']}: {resume['status']} ({resume.get('reason', 'see gpu.json')}).")
    else:
        lines += [
            f"{resume['case']}: stopped after step {resume['stop_after']} of {resume['steps']} and resumed from its "
            "checkpoint. Steps up to the stop compare two fresh runs (run-to-run noise); the steps after it compare "
            "the resumed run with the uninterrupted one.",
            "",
            "| step | uninterrupted | stopped + resumed | abs diff |",
            "|---|---|---|---|",
        ]
        for step, (a, b, d) in enumerate(
            zip(resume["uninterrupted_losses"], resume["resumed_losses"], resume["abs_diff"], strict=True), start=1
        ):
            mark = " (resumed)" if step > resume["stop_after"] else ""
            lines.append(f"| {step}{mark} | {a:.6f} | {b:.6f} | {d:.2e} |")
        lines += [
            "",
            f"Observed tolerance: max |diff| {resume['max_abs_diff_after_resume']:.2e} after the resume "
            f"(relative {resume['max_rel_diff_after_resume']:.2e}), "
            f"{resume['max_abs_diff_fresh_runs']:.2e} between two fresh runs; "
            f"bitwise equal: {resume['bitwise_equal']}.",
        ]
    lines += ["", "## Notes", ""]
    lines += [f"- {note}" for note in report["notes"]]
    failed = [case for case in report["cases"] if case["status"] not in ("ok", "not run")]
    for case in failed:
        lines += [
            "",
            f"### {case['name']}: {case['status']}",
            "",
            "```",
            case.get("log_tail", case.get("error", "")),
            "```",
        ]
    return "\n".join(lines) + "\n"


MODES = {
    "gpu": "full-size backbones on the GPU",
    "dry-run": "full-size backbones, every step but the CUDA ones: model directories, shards, recipes, the planner "
    "and each model built on the meta device through the adapter (no launcher)",
    "cpu-smoke": "the tiny models on the CPU through the launcher (one gloo rank)",
}


def notes(mode: str) -> list[str]:
    items = [
        "Planner columns: `rmpl-ds plan` for the same recipe at world size 1 on this card (rmpl_ds.plan.plan_recipe), "
        "with target_tokens = the rows' measured target count; 'predicted' allocated = total - CUDA context - "
        "allocator reserve, reserved = total - CUDA context, nvidia-smi = total.",
        "Peak allocated / reserved are torch's counters over the whole run of the rank (model build included); "
        "nvidia-smi is the peak of memory.used during the run above the idle card (context, NCCL and allocator pool).",
        "Speed: the median over the optimizer steps after the first; the split is DeepSpeed's wall_clock_breakdown "
        "(forward = the model's forward through the engine, the loss is in 'other'; optimizer = engine.step).",
        "2 x 24 GiB: the planner's per-rank total for the same recipe on two 24 GiB cards, corrected by the "
        "allocation error measured here (world size 1 exercises every term but the ZeRO partition, which is exact "
        "arithmetic, and NCCL's buffers).",
    ]
    if mode == "cpu-smoke":
        items.insert(
            0,
            "CPU smoke: tiny models on one gloo rank; memory is the process RSS, so the planner errors "
            "are meaningless here. It proves the kit runs, not any GPU number.",
        )
    if mode == "dry-run":
        items.insert(
            0,
            "Dry run: nothing was measured; the predictions are for an H200 (140.4 GiB) and each case's "
            "parameter counts were checked against the planner's on the meta device.",
        )
    return items


# ------------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cpu-smoke", action="store_true", help=MODES["cpu-smoke"])
    which.add_argument("--dry-run", action="store_true", help=MODES["dry-run"])
    parser.add_argument("--out", type=Path, default=None, help="where gpu.json and gpu.md go (GPU: bench/results)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="hard time budget for all cases (s)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all of the mode)")
    parser.add_argument("--install-json", type=Path, default=None, help="the wheel install record run.sh wrote")
    args = parser.parse_args(argv)
    began = time.monotonic()
    mode = "cpu-smoke" if args.cpu_smoke else "dry-run" if args.dry_run else "gpu"
    try:
        cases = select_cases(CPU_CASES if mode == "cpu-smoke" else GPU_CASES, args.cases)
        if mode == "gpu":
            import torch

            if not torch.cuda.is_available():
                raise UserError("no CUDA device: the GPU run needs one (--dry-run or --cpu-smoke run without)")
        out = args.out or (RESULTS if mode == "gpu" else None)
        if out is None:
            raise UserError(f"--{mode} needs --out (its results are not measurements; keep them out of bench/results)")
        install = json.loads(args.install_json.read_text()) if args.install_json else None
    except UserError as error:
        print(f"kit.py: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    except (OSError, json.JSONDecodeError) as error:
        print(f"kit.py: error: {args.install_json}: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    machine = machine_facts(cuda=mode == "gpu")
    card = machine.get("gpu") or {}
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rmpl-gpu-kit-")))
        ctx = Context(
            full_size=mode != "cpu-smoke",
            launch=mode != "dry-run",
            cuda=mode == "gpu",
            work=work,
            card_gib=float(card.get("memory_gib", DRY_RUN_CARD_GIB if mode == "dry-run" else 24.0)),
            card_name=str(card.get("name", "")),
            deadline=began + args.budget_s,
        )
        report: dict[str, Any] = {
            "benchmark": "gpu",
            "mode": mode,
            "what": MODES[mode],
            "command": os.environ.get("RMPL_KIT_COMMAND") or "python bench/gpu/kit.py " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "revision": os.environ.get("RMPL_COMMIT") or revision(),
            "machine": machine,
            "install": install,
            "budget_s": args.budget_s,
            "elapsed_s": 0.0,
            "state": "running",
            "cases": [{"name": case.name, "status": "pending"} for case in cases],
            "resume": None,
            "notes": notes(mode),
        }
        write_report(report, out)
        results: dict[str, dict[str, Any]] = {}
        for index, case in enumerate(cases):
            if ctx.remaining_s() < ctx.limits[0]:
                results[case.name] = {"name": case.name, "status": "not run", "reason": "time budget"}
            else:
                results[case.name] = guarded(run_case, ctx, case)
            print(f"kit.py: {case.name}: {results[case.name]['status']}", file=sys.stderr, flush=True)
            report["cases"][index] = results[case.name]
            report["elapsed_s"] = time.monotonic() - began
            write_report(report, out)
        checked = next((case for case in cases if case.resume_check), None)
        if checked is not None and ctx.launch:
            report["resume"] = guarded(resume_check, ctx, checked, results[checked.name])
            print(f"kit.py: resume check: {report['resume']['status']}", file=sys.stderr, flush=True)
        report["elapsed_s"] = time.monotonic() - began
        report["state"] = "done"
        write_report(report, out)
    failed = [case["name"] for case in report["cases"] if case["status"] == "failed"]
    print(
        f"kit.py: wrote {out / 'gpu.json'} and {out / 'gpu.md'}" + (f"; failed: {failed}" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed or (report["resume"] or {}).get("status") == "failed" else 0


def select_cases(available: Sequence[Case], names: str | None) -> list[Case]:
    if not names:
        return list(available)
    known = {case.name: case for case in available}
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise UserError(f"--cases: unknown {unknown}; this mode's cases are {list(known)}")
    return [known[name] for name in wanted]


def guarded(function: Any, *args: Any) -> dict[str, Any]:
    """Run one case (or the resume check); any exception becomes a failed result with its reason, so the next case
    still runs and the report is still written."""
    try:
        return function(*args)
    except Exception as error:  # a failing case must not take the report down with it
        name = getattr(args[1], "name", "?")
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return {"name": name, "status": "failed", "error": f"{type(error).__name__}: {reason}"}


if __name__ == "__main__":
    sys.exit(main())
