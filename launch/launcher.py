"""``--launcher torchrun``: rerun a ``svdfill train``/``fill`` command as a one-machine
torchrun job, ``python -m torch.distributed.run --standalone --nproc_per_node=N -m
svdfill.launch.torchrun_train|torchrun_fill …``, with the same options (minus the launcher's)
rebuilt from the parsed arguments, loopback rendezvous, and Ctrl-C forwarded to the job."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

LAUNCHERS = ("local", "torchrun")
DEFAULT_NPROC = 2


def add_launcher_arguments(parser: argparse.ArgumentParser, module: str) -> None:
    g = parser.add_argument_group("launcher")
    g.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: run in this process (default) | torchrun: rerun this command as "
                        "`python -m torch.distributed.run --standalone --nproc_per_node=N "
                        f"-m {module} …` on this machine")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help=f"processes of --launcher torchrun (default: {DEFAULT_NPROC})")


def launcher_nproc(args: argparse.Namespace) -> int | None:
    """The world size ``--launcher torchrun`` asks for, or None for ``--launcher local``.
    Raises a UserError for ``--nproc`` < 1 or ``--nproc`` without ``--launcher torchrun``."""
    from svdfill.launch.errors import UserError

    launcher = getattr(args, "launcher", None) or "local"
    nproc = getattr(args, "nproc", None)
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher {launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    if launcher == "local":
        if nproc is not None:
            raise UserError(f"--nproc {nproc} needs --launcher torchrun "
                            "(--launcher local runs in this one process)")
        return None
    n = DEFAULT_NPROC if nproc is None else nproc
    if n < 1:
        raise UserError(f"--nproc must be at least 1, got {n}")
    return n


def forwarded_argv(args: argparse.Namespace,
                   add_arguments_fn: Callable[..., None]) -> list[str]:
    """The command line of ``args`` minus ``--launcher``/``--nproc``, for the torchrun entry
    point that parses the same options.

    Rebuilt from the parsed Namespace (not from ``sys.argv``: the CLI can be called with an
    argv of its own, and argparse accepts ``--opt=value``, ``--opt value`` and abbreviations):
    every option whose value differs from its default (and every required one) is written
    back as ``--opt=value``, so values that start with ``-`` survive."""
    p = argparse.ArgumentParser(add_help=False)
    add_arguments_fn(p, launcher=False)
    argv: list[str] = []
    for a in p._actions:
        if not a.option_strings:
            raise NotImplementedError(f"positional argument {a.dest!r} is not forwarded")
        value = getattr(args, a.dest, a.default)
        if value == a.default and not a.required:
            continue
        opt = next((o for o in a.option_strings if o.startswith("--")), a.option_strings[0])
        if isinstance(a, argparse.BooleanOptionalAction):
            argv.append(opt if value else "--no-" + opt[2:])
        elif a.nargs == 0:  # store_true / store_const
            if value != a.const:
                raise ValueError(f"{opt}: cannot forward the value {value!r}")
            argv.append(opt)
        elif isinstance(value, (list, tuple)):
            argv += [opt, *map(str, value)]
        else:
            argv.append(f"{opt}={value}")
    return argv


def torchrun_command(module: str, argv: list[str], nproc: int) -> list[str]:
    """``python -m torch.distributed.run`` of ``-m module argv`` on ``nproc`` local processes,
    rendezvous on the loopback interface."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "--rdzv-endpoint=127.0.0.1:0",
            "-m", module, *argv]


def torchrun_env(environ: dict | None = None, nproc: int = 1) -> dict:
    """The children's environment: ``environ`` (default os.environ) plus loopback and
    thread defaults where the user has not set them: each of the ``nproc`` processes gets
    an equal share of the cores for its intra-op threads (one process on a 16-core GPU box
    keeps all 16 for its data preparation and export; 2 on 2 cores get 1 each)."""
    from svdfill.distributed.world import core_share

    env = dict(os.environ if environ is None else environ)
    defaults = {"MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": str(core_share(nproc))}
    if sys.platform.startswith("linux"):
        defaults["GLOO_SOCKET_IFNAME"] = "lo"
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


def run_forwarding_signals(cmd: list[str], env: dict | None = None) -> int:
    """Run ``cmd`` with stdout/stderr streaming through; SIGINT, SIGTERM (and SIGHUP) sent to
    this process are passed on to it. Returns its exit code (128 + N when killed by signal N).

    The child gets its own session, so a Ctrl-C in the terminal reaches it once, through
    this process, and torchrun's agent shuts its workers down in order."""
    import signal
    import subprocess

    sigs = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    proc: list = []
    pending: list[int] = []

    def forward(signum, frame):
        if proc:
            proc[0].send_signal(signum)
        else:
            pending.append(signum)

    old = {}
    try:
        for s in sigs:
            old[s] = signal.signal(s, forward)
    except ValueError:  # not the main thread: no handlers, the child still runs
        pass
    try:
        proc.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        for s in pending:
            proc[0].send_signal(s)
        rc = proc[0].wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc and proc[0].poll() is None:  # this process failed: leave nothing behind
            proc[0].kill()
            proc[0].wait()
    return rc if rc >= 0 else 128 - rc


def launch_torchrun(module: str, args: argparse.Namespace,
                    add_arguments_fn: Callable[..., None], nproc: int) -> int:
    return run_forwarding_signals(torchrun_command(module, forwarded_argv(args, add_arguments_fn),
                                                   nproc), torchrun_env(nproc=nproc))
