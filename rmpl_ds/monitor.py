"""Training metrics: TensorBoard scalars and ``metrics.jsonl`` on rank 0, a tqdm bar and a periodic line.

Every optimizer step produces one metrics dict (already reduced over ranks by the loop). Rank 0 writes it as
one JSON line to ``metrics.jsonl`` in the stage's output directory and as TensorBoard scalars; other ranks
write nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rmpl_ds import dist
from rmpl_ds.log import get_logger

log = get_logger(__name__)


class Monitor:
    """Rank-0 sink for per-step metrics (a no-op elsewhere)."""

    def __init__(self, out_dir: Path, *, total_steps: int, start_step: int, tensorboard: bool, console_every: int):
        self.enabled = dist.is_main()
        self.console_every = console_every
        self.writer = None
        self.bar = None
        self._jsonl = None
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        # Appending keeps the steps before a resume; steps after it are rewritten identically by an exact resume.
        self._jsonl = (out_dir / "metrics.jsonl").open("a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log_step(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = int(metrics["step"])
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(metrics, sort_keys=True) + "\n")
        self._jsonl.flush()
        if self.writer is not None:
            for tag, value in _flatten(metrics):
                if tag != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(tag, value, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        if step % self.console_every == 0:
            streams = " ".join(f"{name}={value:.4f}" for name, value in sorted(metrics["loss_by_stream"].items()))
            log.info(
                "step %d loss %.4f [%s] lr %.2e grad_norm %.3f %.1f samples/s",
                step,
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


def _flatten(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """{"loss_by_stream": {"ace:t": 1.0}} -> [("loss_by_stream/ace:t", 1.0)] (TensorBoard tag groups)."""
    items: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        tag = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            items += _flatten(value, tag)
        else:
            items.append((tag, value))
    return items
