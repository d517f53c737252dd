"""Training metrics: TensorBoard scalars and ``metrics.jsonl`` on rank 0, a progress bar and a periodic line.

Every optimizer step produces one metrics dict (already reduced over ranks by the loop). Rank 0 writes it as
one JSON line to ``metrics.jsonl`` in the stage's output directory and as TensorBoard scalars; other ranks
write nothing.

TensorBoard: one run per stage, ``<run dir>/tensorboard/<stage>`` (``tensorboard --logdir <run dir>/tensorboard``
lists ``stage1``, ``stage2`` and ``eval``), on a global step that continues across stages: a stage's step ``s`` is
logged at ``offset + s``, the offset being the steps of the recipe's earlier stages, so Stage II's curves follow
Stage I's on one axis. Tags, grouped by what they say (:func:`scalars`):

* ``train/``: ``loss`` (the mean of the per-sample weighted losses), ``loss_by_stream/<stream>``, ``lr``,
  ``grad_norm``, and with ``loss_weighting: {kind: dwa}`` ``loss_weight/<stream>`` (the weight each stream's loss
  had in the step: ``loss_weight`` x its DWA weight, rmpl_ds.weighting);
* ``throughput/``: ``samples_per_s``, ``tokens_per_s``, ``step_time_s``;
* ``data/``: ``realized_share/<stream>`` (the stream's cumulative share of the samples so far, exact by the
  sampler), ``epochs/<stream>`` (source-epochs drawn), ``real_token_fraction``;
* ``memory/``: ``peak_allocated_gib`` and ``peak_reserved_gib`` (GPU: the caching allocator's peaks) or
  ``peak_rss_gib`` (CPU: the process's peak resident set);
* ``health/``: ``bad_steps``, ``bad_steps_in_a_row``, ``skipped`` (steps with a non-finite loss);
* ``eval/loss`` (the mean over the eval streams), ``eval/loss/<stream>``, ``eval/time_s``: the held-out loss of a
  stage with an ``eval`` section, at the steps it evaluates (rmpl_ds.dev_eval); with ``eval.generate`` also
  ``eval/f1``, ``eval/f1/<stream>`` and ``eval/<task>/f1`` (``eval/EM/f1``, ``eval/AR/f1``);
* ``eval/m2e2/...``: the evaluation's scores, written where evaluation runs (rmpl_ds.pipeline).

A custom-scalars layout (TensorBoard's "Custom Scalars" tab, :data:`LAYOUT`) puts the loss with the per-stream
losses, the lr, the throughput and the memory on one page.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rmpl_ds import dist
from rmpl_ds.log import get_logger

log = get_logger(__name__)

# The "Custom Scalars" page: category -> chart -> tags (regular expressions) drawn together.
LAYOUT: dict[str, dict[str, list[Any]]] = {
    "training": {
        "loss, total and per stream": ["Multiline", [r"train/loss$", r"train/loss_by_stream/.*"]],
        "learning rate": ["Multiline", [r"train/lr"]],
        "gradient norm": ["Multiline", [r"train/grad_norm"]],
        "loss weight per stream (DWA)": ["Multiline", [r"train/loss_weight/.*"]],
    },
    "throughput and memory": {
        "samples and tokens per second": ["Multiline", [r"throughput/samples_per_s", r"throughput/tokens_per_s"]],
        "peak memory (GiB)": ["Multiline", [r"memory/.*"]],
    },
    "data": {
        "realized share per stream (cumulative)": ["Multiline", [r"data/realized_share/.*"]],
        "source-epochs per stream": ["Multiline", [r"data/epochs/.*"]],
    },
    "evaluation": {
        "held-out loss, total and per stream": ["Multiline", [r"eval/loss$", r"eval/loss/.*"]],
        "held-out F1 (generation)": ["Multiline", [r"eval/f1$", r"eval/f1/.*", r"eval/(EM|AR)/f1"]],
        "M2E2 F1": ["Multiline", [r"eval/.*/f1$", r"eval/.*_f1$"]],
    },
}

# metrics key -> TensorBoard tag (dict-valued keys get "/<stream>" appended).
_TAGS: dict[str, str] = {
    "loss": "train/loss",
    "loss_by_stream": "train/loss_by_stream",
    "loss_weights": "train/loss_weight",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "samples_per_s": "throughput/samples_per_s",
    "tokens_per_s": "throughput/tokens_per_s",
    "step_time_s": "throughput/step_time_s",
    "realized_share": "data/realized_share",
    "epochs": "data/epochs",
    "real_token_fraction": "data/real_token_fraction",
    "peak_memory_reserved_gib": "memory/peak_reserved_gib",
    "bad_steps": "health/bad_steps",
    "bad_steps_in_a_row": "health/bad_steps_in_a_row",
    "skipped": "health/skipped",
    "eval_loss": "eval/loss",
    "eval_loss_by_stream": "eval/loss",
    "eval_f1": "eval/f1",
    "eval_f1_by_stream": "eval/f1",
    "eval_f1_by_task": "eval/{name}/f1",
    "eval_time_s": "eval/time_s",
}


def scalars(metrics: dict[str, Any], device_type: str) -> list[tuple[str, float]]:
    """The TensorBoard (tag, value) pairs of one step's metrics (see the module docstring)."""
    tags = dict(_TAGS, peak_memory_gib="memory/peak_allocated_gib" if device_type == "cuda" else "memory/peak_rss_gib")
    pairs: list[tuple[str, float]] = []
    for key, tag in tags.items():
        value = metrics.get(key)
        items = value.items() if isinstance(value, dict) else [("", value)]
        for name, item in items:
            if isinstance(item, bool | int | float) and math.isfinite(float(item)):
                where = tag.format(name=name) if "{name}" in tag else f"{tag}/{name}" if name else tag
                pairs.append((where, float(item)))
    return pairs


class Monitor:
    """Rank-0 sink for per-step metrics (a no-op elsewhere).

    Args:
        out_dir: the stage's directory (``metrics.jsonl``).
        total_steps, start_step: the stage's steps and where this run starts (for the bar).
        tensorboard_dir: this stage's TensorBoard run directory, or None for no TensorBoard.
        step_offset: added to the stage's step on TensorBoard's axis (the recipe's earlier stages' steps).
        console_every: a summary line every this many steps.
        device_type: ``cuda`` or ``cpu`` (what the memory tags measure).
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        total_steps: int,
        start_step: int,
        tensorboard_dir: Path | None,
        console_every: int,
        step_offset: int = 0,
        device_type: str = "cpu",
    ) -> None:
        self.enabled = dist.is_main()
        self.total_steps = total_steps
        self.console_every = console_every
        self.step_offset = step_offset
        self.device_type = device_type
        self.writer = None
        self.bar = None
        self._jsonl = None
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        # Appending keeps the steps before a resume; steps after it are rewritten identically by an exact resume.
        self._jsonl = (out_dir / "metrics.jsonl").open("a", encoding="utf-8")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir))
            self.writer.add_custom_scalars(LAYOUT)
        from tqdm import tqdm

        # disable=None: a bar on a terminal only (under `rmpl-ds train` the output goes to train.log, where the
        # periodic line below is the progress)
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, disable=None
        )

    def log_step(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = int(metrics["step"])
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(metrics, sort_keys=True) + "\n")
        self._jsonl.flush()
        if self.writer is not None:
            for tag, value in scalars(metrics, self.device_type):
                self.writer.add_scalar(tag, value, self.step_offset + step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        if step % self.console_every == 0:
            streams = " ".join(f"{name}={value:.4f}" for name, value in sorted(metrics["loss_by_stream"].items()))
            log.info(
                "step %d/%d loss %.4f [%s] lr %.2e grad_norm %.3f %.1f samples/s",
                step,
                self.total_steps,
                metrics["loss"],
                streams,
                metrics["lr"],
                metrics.get("grad_norm", float("nan")),
                metrics["samples_per_s"],
            )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
