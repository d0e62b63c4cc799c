"""torch's CPU thread count around loops of small steps.

A gradient step on 1,024 ratings is a dozen small ops (gathers, row products, four
``index_add_``). With 2 OpenMP threads each op pays the team's wake-up and barrier, which
costs more than the op: measured on the 2-core VM (d = 32), 179 µs per 1k ratings on one
thread against 251 µs on two with OpenMP's default spin-wait, and 1.57 ms against 0.15 ms
per step under ``OMP_WAIT_POLICY=PASSIVE``. From about 8k ratings a step the second
thread pays off (396 vs 208 µs per 1k). So loops of small steps run on one thread.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

SMALL_STEP_RATINGS = 4096
"""Steps of at most this many ratings run single-threaded on a CPU."""


@contextmanager
def small_step_threads(device: torch.device | str, batch_size: int):
    """One torch thread inside the block when ``device`` is a CPU and steps are small
    (``batch_size`` ≤ :data:`SMALL_STEP_RATINGS`); the count is put back after. Other
    devices and big steps: nothing changes."""
    n = torch.get_num_threads()
    if torch.device(device).type != "cpu" or batch_size > SMALL_STEP_RATINGS or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
