"""A quiet console: `rmpl-ds train` shows the package's own lines and keeps the launcher's, DeepSpeed's and the
libraries' output in <stage>/train.log (rmpl_ds.commands.train.relay); --verbose shows everything."""

from __future__ import annotations

import io

from rmpl_ds.commands.train import relay

LAUNCHER_OUTPUT = b"""\
[2026-12-03 10:51:36,140] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.
[2026-12-03 10:51:37,447] [INFO] [launch.py:152:main] WORLD INFO DICT: {'localhost': [0, 1]}
DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully
10:51:41 INFO [rank 0] rmpl_ds.train: stage stage1: 4 steps, batch 16 = 8 x 1 x 2 ranks
Loading weights: 100%|##########| 58/58 [00:00<00:00, 17828.48it/s]
/venv/lib/python3.11/site-packages/torch/distributed/c10d_logger.py:83: FutureWarning: deprecated
  return func(*args, **kwargs)
10:54:58 INFO [rank 0] rmpl_ds.monitor: step 2/4 loss 7.7721 [ace:t=8.0379] lr 1.00e-03 grad_norm 4.481 18.1 samples/s
10:55:00 WARNING [rank 0] rmpl_ds.train: step 3 skipped: non-finite loss on some rank
rmpl_ds.train [rank 1]: error: a collective failed (Timed out waiting 20000ms); another rank hung or died
rmpl_ds fault injection [rank 1]: SIGKILL in the middle of writing checkpoint 6
[2026-12-03 10:51:48,467] [INFO] [launch.py:285:main] Process 29228 exits successfully.
"""


def test_the_console_gets_the_package_lines_and_the_log_gets_everything() -> None:
    log, console = io.BytesIO(), io.StringIO()
    relay(io.BytesIO(LAUNCHER_OUTPUT), log, console)
    assert log.getvalue() == LAUNCHER_OUTPUT
    shown = console.getvalue().splitlines()
    assert shown == [
        "10:51:41 INFO [rank 0] rmpl_ds.train: stage stage1: 4 steps, batch 16 = 8 x 1 x 2 ranks",
        "10:54:58 INFO [rank 0] rmpl_ds.monitor: step 2/4 loss 7.7721 [ace:t=8.0379] lr 1.00e-03 grad_norm 4.481 "
        "18.1 samples/s",
        "10:55:00 WARNING [rank 0] rmpl_ds.train: step 3 skipped: non-finite loss on some rank",
        "rmpl_ds.train [rank 1]: error: a collective failed (Timed out waiting 20000ms); another rank hung or died",
        "rmpl_ds fault injection [rank 1]: SIGKILL in the middle of writing checkpoint 6",
    ]


def test_verbose_shows_everything() -> None:
    log, console = io.BytesIO(), io.StringIO()
    relay(io.BytesIO(LAUNCHER_OUTPUT), log, console, everything=True)
    assert console.getvalue().encode() == LAUNCHER_OUTPUT == log.getvalue()
