"""Engine pieces on their own: schedule, per-stream loss, signals, RNG state, sealed checkpoints, the hand-off.

Checkpoints go through a real single-process DeepSpeed ZeRO-2 engine (CPU accelerator, gloo); the 2-rank runs of
the whole stage are in test_train.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import signal
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rmpl_ds import checkpoint, handoff
from rmpl_ds import engine as engine_module
from rmpl_ds.config import recipe_from_dict
from rmpl_ds.constants import IGNORE_INDEX
from rmpl_ds.engine import (
    GracefulStop,
    build_optimizer,
    capture_rng,
    lr_factor,
    restore_rng,
)
from rmpl_ds.errors import UserError


def recipe(**stage_changes):
    stage = {
        "name": "stage1",
        "mixture": [{"source": "ace", "task": "t", "weight": 1}],
        "steps": 10,
        "lr": 1e-3,
        "warmup_steps": 2,
        "global_batch": 2,
        "micro_batch": 1,
        **stage_changes,
    }
    second = {**stage, "name": "stage2", "init_from": "stage1"}
    return recipe_from_dict(
        {
            "name": "unit",
            "model": {"family": "qwen2-vl", "path": "m"},
            "sources": {"ace": "s"},
            "stages": [stage, second],
            "launch": {"gpus": 1},
        }
    )


def test_lr_schedule_warmup_then_cosine_to_the_floor() -> None:
    stage = recipe(min_lr_ratio=0.1).stages[0]
    factors = [lr_factor(step, stage) for step in range(stage.steps)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[2:]))
    assert lr_factor(stage.steps, stage) == pytest.approx(0.1)
    linear = recipe(schedule="linear").stages[0]
    assert lr_factor(6, linear) == pytest.approx(0.5)
    assert lr_factor(7, recipe(schedule="constant").stages[0]) == 1.0


def test_optimizer_groups_only_trainable_parameters() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    optimizer, scheduler = build_optimizer(model, recipe(weight_decay=0.1).stages[0])
    decayed, plain = optimizer.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 4])] and decayed["weight_decay"] == 0.1
    assert len(plain["params"]) == 4 and plain["weight_decay"] == 0.0  # biases and the norm
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 * 0.5)
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        build_optimizer(model, recipe().stages[0])


def test_graceful_stop_one_request_then_abort_on_a_later_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    # A clock the test moves, and os._exit recorded instead of ending pytest.
    clock = [100.0]
    monkeypatch.setattr(engine_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    aborted: list[int] = []
    monkeypatch.setattr(os, "_exit", aborted.append)
    stop = GracefulStop(repeat_window_s=5.0)
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
        clock[0] += 4.9
        os.kill(os.getpid(), signal.SIGINT)  # the launcher's forwarded copy: same request, no abort
        assert stop.requested and stop.signal_name == "SIGTERM" and aborted == []
        clock[0] += 0.2  # 5.1 s after the first: a second request
        os.kill(os.getpid(), signal.SIGINT)
        assert aborted == [128 + signal.SIGINT]
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_rng_state_round_trip() -> None:
    state = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


@pytest.fixture(scope="module")
def ds_engine():
    """A real 1-rank ZeRO-2 engine on gloo; its environment and process group are gone after the module."""
    import deepspeed

    with pytest.MonkeyPatch.context() as patch:
        for key, value in {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
        }.items():
            patch.setenv(key, value)
        engine_module.init_distributed(torch.device("cpu"))  # the package's: DeepSpeed's shm buffer name is removed
        try:
            yield _trained_engine()
        finally:
            # DeepSpeed's own teardown: it also drops the groups it cached (torch's alone would leave them stale
            # for the next engine in this process)
            deepspeed.comm.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _zero2_engine(model: torch.nn.Module, bf16: dict):
    """A real ZeRO-2 engine (micro batch 2, one rank) around ``model`` with the package's optimizer and schedule."""
    import deepspeed

    optimizer, scheduler = build_optimizer(model, recipe().stages[0])
    config = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "bf16": bf16,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def _trained_engine():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    model[0].weight.requires_grad_(False)  # a frozen part, like the base model under LoRA
    engine = _zero2_engine(model, {"enabled": False})
    for _ in range(2):
        _step(engine)
    return engine


def test_checkpoints_are_sealed_pruned_and_verified(ds_engine, tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        ref = checkpoint.save(ds_engine, root, step, {"rmpl": {"step": step}}, keep_last=2, trainable_only=True)
    assert ref.tag == "step0000003"
    assert (root / "latest").read_text() == "step0000003"
    assert [r.step for r in checkpoint.complete_checkpoints(root)] == [2, 3]
    marker = json.loads((ref.path / checkpoint.MARKER).read_text())
    assert marker["step"] == 3 and any("optim_states" in name for name in marker["files"])
    checkpoint.verify(ref)

    # A checkpoint whose writing was interrupted (no marker) is never chosen, even when it is newer.
    (root / "step0000009").mkdir()
    (root / "step0000009" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert checkpoint.find(root, "auto").tag == "step0000003"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        checkpoint.find(root, str(root / "step0000009"))

    # A byte changed after writing: refused before anything is unpickled.
    victim = next(p for p in sorted(ref.path.iterdir()) if p.name.endswith(".pt"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{victim.name}: modified since the checkpoint was written"):
        checkpoint.verify(ref)
    assert checkpoint.find(tmp_path / "nothing", "auto") is None and checkpoint.find(root, "none") is None


def test_checkpoint_into_an_unwritable_place_names_the_path(ds_engine, tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    checkpoint.save(ds_engine, root, 1, {"rmpl": {"step": 1}}, keep_last=2, trainable_only=True)
    (root / "step0000002").write_text("a file where the checkpoint directory should go")
    with pytest.raises(UserError, match=r"cannot write checkpoint .*step0000002"):
        checkpoint.save(ds_engine, root, 2, {"rmpl": {"step": 2}}, keep_last=2, trainable_only=True)
    assert checkpoint.find(root, "auto").step == 1  # the earlier checkpoint is intact


def test_resume_restores_step_weights_optimizer_rng_sampler_and_health(ds_engine, tmp_path: Path) -> None:
    """The package's own save and resume (rmpl_ds.train.save, rmpl_ds.train.resume), as the stage runner calls them."""
    from rmpl_ds import train
    from rmpl_ds.engine import Faults, seed_everything
    from rmpl_ds.mixing import SlotStream

    the_recipe = recipe()
    stage = the_recipe.stages[0]
    paths = train.StageRun(the_recipe, stage, tmp_path / "run")

    def stage_data() -> SimpleNamespace:  # what resume needs of StageData: the slot stream
        return SimpleNamespace(stream=SlotStream([("ace", 1, 7), ("swig", 2, 5)], seed=stage.seed))

    data, health = stage_data(), train.Health(bad_steps=2, in_a_row=1, last_good_step=4)
    saved_rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    train.save(ds_engine, paths, 5, data, 5 * stage.global_batch, health, Faults())
    saved = _trained_state(ds_engine)
    expected_draws = (torch.rand(4), np.random.rand(3), random.random())  # the RNGs right after the checkpoint
    # The run goes on (another step, other draws), then stops; the next run resumes from the checkpoint.
    _step(ds_engine)
    seed_everything(99)
    assert not _same_state(_trained_state(ds_engine), saved)

    resumed_data = stage_data()
    ref = checkpoint.find(paths.checkpoint_root, "auto")
    step, next_slot, resumed_health, _ = train.resume(ds_engine, ref, resumed_data, paths, new_phase=False)
    assert (step, next_slot, resumed_health) == (5, 5 * stage.global_batch, health)
    (trace,) = [json.loads(line) for line in (paths.stage_dir / "resume.jsonl").read_text().splitlines()]
    assert trace == {
        "checkpoint": str(ref.path),
        "step": 5,
        "next_slot": next_slot,
        "sampler_origin": 0,
        "torch_rng_sha256": saved_rng,
        "world_size": 1,
        "saved_world_size": 1,
        "universal": None,
    }
    assert _same_state(_trained_state(ds_engine), saved)  # weights, Adam moments and the lr schedule
    draws = (torch.rand(4), np.random.rand(3), random.random())
    assert torch.equal(draws[0], expected_draws[0]) and np.array_equal(draws[1], expected_draws[1])
    assert draws[2] == expected_draws[2]
    # The sampler continues where it was (its per-source draws and epochs), not afresh at the resumed slot.
    later = range(next_slot, next_slot + 24)
    assert [resumed_data.stream.resolve(slot) for slot in later] == [data.stream.resolve(slot) for slot in later]


def _step(engine) -> None:
    loss = engine(torch.randn(2, 8)).pow(2).mean()
    engine.backward(loss)
    engine.step()


def _trained_state(engine) -> dict:
    """What a step changes: the trainable weights, the optimizer's state and the lr schedule's position."""
    state = engine.optimizer.optimizer.state
    return {
        "weights": [p.detach().clone() for p in engine.module.parameters()],
        "adam": [{key: value.clone() for key, value in state[param].items()} for param in sorted(state, key=id)],
        "fp32": [p.detach().clone() for p in engine.optimizer.single_partition_of_fp32_groups],
        "lr_step": engine.lr_scheduler.last_epoch,
    }


def _same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_handoff_export_is_verified(tmp_path: Path) -> None:
    the_recipe = recipe()
    stage_dir = tmp_path / "stage1"

    weights = {"layer.weight": torch.arange(6, dtype=torch.float32).view(2, 3), "layer.bias": torch.ones(2)}

    def write_model(directory: Path) -> None:
        save_file(weights, str(directory / "model.safetensors"))
        (directory / "config.json").write_text("{}")

    export = handoff.write_export(
        stage_dir, write_model, recipe=the_recipe, stage_name="stage1", step=10, kind="merged", base_model="m"
    )
    manifest = handoff.verify_export(export, the_recipe, "stage1")
    # The digest does not depend on tensor names (saved checkpoints rename them), only on the tensors.
    assert manifest["weights_digest"] == handoff.weights_digest(reversed(list(weights.values())))
    assert manifest["weights_digest"] != handoff.weights_digest([weights["layer.weight"]])
    assert (
        manifest["step"] == 10
        and manifest["lineage"] == ["stage1"]
        and set(manifest["files"]) == {"model.safetensors", "config.json"}
    )
    assert handoff.lineage(the_recipe, "stage2") == ["stage1", "stage2"]

    with pytest.raises(UserError, match="different recipe"):
        handoff.verify_export(export, recipe(lr=5e-4), "stage1")
    with pytest.raises(UserError, match="an export of stage 'stage1', not 'stage2'"):
        handoff.verify_export(export, the_recipe, "stage2")
    (export / "model.safetensors").write_bytes((export / "model.safetensors").read_bytes()[:-1] + b"\x01")
    with pytest.raises(UserError, match=r"model\.safetensors: modified"):
        handoff.verify_export(export, the_recipe, "stage1")
    (export / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"model\.safetensors: missing"):
        handoff.verify_export(export, the_recipe, "stage1")
    with pytest.raises(UserError, match="does not exist"):
        handoff.verify_export(tmp_path / "stage0" / "export", the_recipe, "stage1")

    def crash(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed while exporting")

    with pytest.raises(RuntimeError):
        handoff.write_export(
            tmp_path / "other", crash, recipe=the_recipe, stage_name="stage1", step=1, kind="merged", base_model="m"
        )
    assert not (tmp_path / "other" / "export").exists()
    assert not any(p.name.startswith(".export") for p in (tmp_path / "other").iterdir())


def test_cpu_ranks_split_the_cores_and_keep_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the deepspeed launcher leaves unset on CPU ranks: one share of the cores each, and glibc padding."""
    from rmpl_ds.engine import MALLOC_PAD_BYTES, configure_cpu_rank

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    try:
        applied = configure_cpu_rank({"LOCAL_SIZE": "2"})  # the deepspeed launcher's name
        assert applied["threads"] == 4 and torch.get_num_threads() == 4
        assert applied["malloc_top_pad"] == MALLOC_PAD_BYTES  # glibc (Linux) here
        assert configure_cpu_rank({"LOCAL_WORLD_SIZE": "8"})["threads"] == 1  # torchrun's
        # a user's OMP_NUM_THREADS or MALLOC_TOP_PAD_ wins
        assert configure_cpu_rank({"OMP_NUM_THREADS": "3", "MALLOC_TOP_PAD_": "0"}) == {}
    finally:
        torch.set_num_threads(before)


def test_a_non_finite_loss_poisons_every_gradient_and_a_finite_one_none() -> None:
    from rmpl_ds.engine import poison_non_finite

    for value, finite in ((2.0, True), (float("inf"), False), (float("nan"), False)):
        weights = torch.ones(3, requires_grad=True)
        poison_non_finite((weights * value).sum()).backward()
        if finite:
            assert weights.grad.tolist() == [2.0, 2.0, 2.0]  # exactly the plain gradient
        else:
            assert torch.isnan(weights.grad).all()


def test_bad_steps_in_a_row_are_counted_and_survive_a_checkpoint() -> None:
    from rmpl_ds.train import Health

    health = Health()
    trail = []
    for step, skipped in enumerate([False, True, True, False, True, True], start=1):
        health = health.after(step, skipped=skipped)
        trail.append((health.bad_steps, health.in_a_row, health.last_good_step))
    assert trail == [(0, 0, 1), (1, 1, 1), (2, 2, 1), (2, 0, 4), (3, 1, 4), (4, 2, 4)]
    assert Health.from_state({"health": dataclasses.asdict(health)}, 6) == health
    assert Health.from_state({}, 7) == Health(0, 0, 7)  # a checkpoint from before skipping existed


class TinyLM(torch.nn.Module):
    """A causal LM as the loop drives it: ``model(input_ids=..., attention_mask=..., use_cache=False,
    logits_to_keep=mask)`` returns ``.logits`` of the kept positions (rmpl_ds.loss's target-only path)."""

    def __init__(self, vocab: int = 11, width: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=None):
        hidden = self.embed(input_ids)
        return SimpleNamespace(logits=self.head(hidden if logits_to_keep is None else hidden[logits_to_keep]))


def _tiny_lm_engine(*, check_grad_overflow: bool = True):
    torch.manual_seed(0)
    return _zero2_engine(TinyLM(), {"enabled": True, "check_grad_overflow": check_grad_overflow})


def _lm_batch() -> dict:
    from rmpl_ds.collate import BatchStats

    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3:] = ids[:, 3:]
    stats = BatchStats(
        examples=2,
        real_tokens=10,
        slots=10,
        target_tokens=4,
        truncated_examples=0,
        target_tokens_dropped=0,
        images=0,
        dummy_image=False,
    )
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "stream_index": torch.tensor([0, 1]),
        "loss_weight": torch.ones(2),
        "stats": stats,
    }


def test_a_step_with_a_non_finite_loss_is_skipped_and_said_so(ds_engine) -> None:
    """rmpl_ds.train.train_step on a real bf16 ZeRO-2 engine (one rank): a NaN loss leaves the weights, the
    optimizer and the schedule as they were and the step says ``skipped``; the next finite step is applied."""
    from rmpl_ds.train import train_step

    lm = _tiny_lm_engine()
    batches, cpu, streams = itertools.repeat(_lm_batch()), torch.device("cpu"), ("a:t", "b:i")
    before = [p.detach().clone() for p in lm.module.parameters()]
    lr_step = lm.lr_scheduler.last_epoch
    bad = train_step(lm, batches, 1, cpu, streams, inject_nan=True)
    assert bad["skipped"] and math.isnan(bad["loss"]) and not bad["stop_requested"]
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, lm.module.parameters(), strict=True))
    assert lm.lr_scheduler.last_epoch == lr_step and lm.skipped_steps == 1
    good = train_step(lm, batches, 1, cpu, streams, stop_requested=True)
    assert not good["skipped"] and math.isfinite(good["loss"]) and good["stop_requested"]
    assert not all(torch.equal(a, b.detach()) for a, b in zip(before, lm.module.parameters(), strict=True))
    assert lm.lr_scheduler.last_epoch == lr_step + 1 and good["real_token_fraction"] == 1.0


def test_a_non_finite_step_that_deepspeed_applied_is_refused(ds_engine) -> None:
    # A DeepSpeed config that turned the overflow check off: the NaN step is applied, and the loop must not go on.
    from rmpl_ds.train import train_step

    lm = _tiny_lm_engine(check_grad_overflow=False)
    with pytest.raises(RuntimeError, match="DeepSpeed applied an optimizer step with non-finite gradients"):
        train_step(lm, itertools.repeat(_lm_batch()), 1, torch.device("cpu"), ("a:t", "b:i"), inject_nan=True)


def test_closing_the_batches_stops_the_loader_workers(tmp_path: Path) -> None:
    """The slot stream never ends and workers ignore SIGTERM: the loop stops them itself, or exit would hang."""
    from torch.utils.data import DataLoader

    from rmpl_ds.data import _ignore_signals_in_worker, close_batches

    loader = DataLoader(list(range(100)), batch_size=2, num_workers=1, worker_init_fn=_ignore_signals_in_worker)
    batches = iter(loader)
    next(batches)
    workers = list(batches._workers)
    assert workers and all(worker.is_alive() for worker in workers)
    close_batches(batches)
    for worker in workers:
        worker.join(timeout=10)
    assert not any(worker.is_alive() for worker in workers)
    close_batches(iter(DataLoader([1, 2])))  # no workers: nothing to stop
