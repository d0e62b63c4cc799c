"""One harness for the tests that need a real process group (like TorchRec's
MultiProcessTestBase): :func:`run_ranks` starts ``world_size`` spawned processes on
127.0.0.1, each joins one group, runs ``fn(rank, world_size, *args)`` and hands its
result back; a failing rank's traceback is raised in the test, named by its rank.

``fn`` must be importable by the children (a top-level function of a test module), and
its result picklable. The ``torchrun`` CLI tests start ``torchrun`` on purpose and do not
use this.

Named ``multiprocess_harness``, not ``multiprocess``: tests/ comes first on sys.path under
pytest, and ``multiprocess`` is a PyPI package (dill's fork of multiprocessing) that it
would shadow.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

__all__ = ["RankFailed", "free_port", "run_ranks"]

GRACE_S = 10.0  # after one rank fails, how long the others get before they are killed


class RankFailed(AssertionError):
    """One or more ranks raised (or died); the message holds each rank's traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, backend: str,
               threads: int, results, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "GLOO_SOCKET_IFNAME": "lo", "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(world_size)})
    torch.set_num_threads(threads)
    try:
        kw = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            kw["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, **kw)
        out = fn(rank, world_size, *args)
        # leave together: a rank that tears its group down while another still runs its
        # last collectives closes the sockets under gloo's threads (SIGABRT at exit)
        dist.barrier()
        results.put((rank, True, out))
    except BaseException:  # reported to the parent, raised there with the rank's number
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int = 2, *args: Any, backend: str = "gloo",
              timeout: float = 120.0, threads: int = 1) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined in
    one ``backend`` group (gloo over loopback; nccl puts rank r on GPU r) and return the
    ranks' results in rank order. Raises :class:`RankFailed` naming every rank that
    raised, died or outlived ``timeout`` seconds."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main,
                         args=(fn, r, world_size, port, backend, threads, results, args))
             for r in range(world_size)]
    try:
        got, killed = _collect(procs, results, timeout)
    finally:  # an interrupted test leaves no rank behind
        for p in procs:
            if p.is_alive():
                p.kill()
    failures = []
    for r, p in enumerate(procs):
        if r not in got:
            why = (f"still running, killed (the timeout of {timeout:g} s, or "
                   "another rank failed)" if r in killed
                   else f"exited with code {p.exitcode} and no result")
            failures.append(f"rank {r}: {why}")
        elif not got[r][0]:
            failures.append(f"rank {r} raised:\n{got[r][1]}")
    if failures:
        raise RankFailed(f"{len(failures)} of {world_size} ranks failed\n" + "\n".join(failures))
    return [got[r][1] for r in range(world_size)]


def _collect(procs, results, timeout: float) -> tuple[dict[int, tuple[bool, Any]], set[int]]:
    """Each rank's (ok, result or traceback) as it arrives, and the ranks killed."""
    world_size = len(procs)
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    # read while the ranks run: a result larger than a pipe's buffer would otherwise keep
    # its process from exiting
    while len(got) < world_size:
        now = time.monotonic()
        if now >= deadline:
            break
        try:
            rank, ok, out = results.get(timeout=min(0.5, deadline - now))
            got[rank] = (ok, out)
            if not ok:  # the others may wait in a collective for it: give them a moment
                deadline = min(deadline, time.monotonic() + GRACE_S)
            continue
        except queue.Empty:
            pass
        if any(p.exitcode is not None and r not in got for r, p in enumerate(procs)):
            time.sleep(0.2)  # a rank that exited cleanly has its result in the pipe by now
            while True:
                try:
                    rank, ok, out = results.get_nowait()
                    got[rank] = (ok, out)
                except queue.Empty:
                    break
            if any(p.exitcode is not None and r not in got for r, p in enumerate(procs)):
                # died without a word (a signal, os._exit): the others get a moment
                deadline = min(deadline, time.monotonic() + GRACE_S)
    killed: set[int] = set()
    # ranks that reported are leaving (destroying their group): a few seconds for all of
    # them; the others are past the deadline, stopped now
    leave_by = time.monotonic() + GRACE_S
    for r, p in enumerate(procs):
        p.join(timeout=max(0.0, leave_by - time.monotonic()) if r in got else 0)
        if p.is_alive():
            p.kill()
            p.join()
            killed.add(r)
    return got, killed
