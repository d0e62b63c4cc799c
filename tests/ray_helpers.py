"""A real local Ray cluster on 127.0.0.1 for the tests: start a head (and extra nodes), stop
exactly the processes we started, leave no files behind.

``ray stop`` would end every Ray process of this user on the machine (other people's
clusters too), so each node is started with ``ray start`` in a fresh session and stopped
by its own process group id, then by the pids of any straggler whose command line names
the node's private temp dir. The temp dir (session logs, sockets, ``ray_current_cluster``)
is deleted afterwards.

The head is shared by every Ray test module of one pytest session (:func:`shared_head`),
started on first use and stopped at the end of the session.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))

RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Keep Ray from polling for new package versions or cloud metadata.
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
}


def ray_env(**extra: str) -> dict[str, str]:
    """The environment for ``ray`` CLI calls and jobs: the test settings on top of ours."""
    env = dict(os.environ)
    env.update(RAY_ENV)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNode:
    """One ``ray start`` node: its process group, temp dir and, for a head, its addresses."""

    def __init__(self, temp_dir: Path, pgid: int, gcs_address: str | None,
                 dashboard_url: str | None):
        self.temp_dir = temp_dir
        self.pgid = pgid
        self.gcs_address = gcs_address
        self.dashboard_url = dashboard_url

    def _pids(self) -> set[int]:
        """Our node's processes: its process group, anything whose command line names its
        temp dir, and every descendant of those (workers start their own sessions and
        retitle themselves ``ray::IDLE``). Read from /proc (no psutil needed)."""
        tag = str(self.temp_dir).encode()
        procs = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2:].split()
            # fields[0] = state, [1] = ppid, [2] = pgrp
            if fields[0] == b"Z":
                continue
            procs[int(entry)] = (int(fields[1]), int(fields[2]), cmd)
        pids = {pid for pid, (_, pgrp, cmd) in procs.items() if pgrp == self.pgid or tag in cmd}
        grew = True
        while grew:
            new = {pid for pid, (ppid, _, _) in procs.items() if ppid in pids and pid not in pids}
            pids |= new
            grew = bool(new)
        pids.discard(os.getpid())
        return pids

    def alive(self) -> set[int]:
        return self._pids()

    def stop(self, grace_s: float = 8.0) -> None:
        """SIGTERM the node's processes, SIGKILL what is left after ``grace_s``, remove files."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            pids = self._pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self._pids():
                time.sleep(0.2)
        left = self._pids()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if left:
            raise RuntimeError(f"Ray processes still running after stop: {sorted(left)}")


# `ray start --address` (Ray's own CLI) for a second node on loopback. With
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which keeps every address on 127.0.0.1) the CLI refuses
# to join a node ("multi-node clusters are not supported"); with =1 it rewrites 127.0.0.1 to
# the machine's outward IP. So the joining CLI process alone passes that guard and keeps
# loopback addresses as given; its daemons inherit =0 like the head's.
_JOIN_ON_LOOPBACK = (
    "import sys, ray._private.ray_constants as c, ray._private.services as s\n"
    "c.ENABLE_RAY_CLUSTER = True\n"
    "s.get_node_ip_address = lambda address=None: '127.0.0.1'\n"
    "s.resolve_ip_for_localhost = lambda host: host\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv = ['ray'] + sys.argv[1:]\n"
    "main()\n")


def _ray_start(args: list[str], temp_dir: Path, timeout_s: float = 90.0,
               join_loopback: bool = False) -> tuple[int, str]:
    """Run ``ray start`` in a new session (so its daemons share one process group)."""
    exe = [sys.executable, "-c", _JOIN_ON_LOOPBACK] if join_loopback else [RAY]
    proc = subprocess.Popen(
        [*exe, "start", *args, "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, cwd=str(temp_dir))
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            RayNode(temp_dir, proc.pid, None, None).stop(grace_s=2)
        finally:
            out, _ = proc.communicate()
        raise RuntimeError(f"ray start timed out:\n{out[-3000:]}")
    node = RayNode(temp_dir, proc.pid, None, None)
    if proc.returncode != 0:
        node.stop(grace_s=2)
        raise RuntimeError(f"ray start failed (rc={proc.returncode}):\n{out[-3000:]}")
    return proc.pid, out


def _node_args(num_cpus: int, object_store_mb: int, resources: dict | None) -> list[str]:
    """What every node of a test cluster takes: loopback, its resources, and free ports for
    the per-node agents (the defaults clash when two nodes share a machine)."""
    args = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
            "--object-store-memory", str(object_store_mb * 1024 * 1024)]
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port", "--metrics-export-port"):
        args += [flag, str(free_port())]
    if resources:
        args += ["--resources", json.dumps(resources)]
    return args


def _temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="svdray", dir="/tmp"))  # short: socket paths ≤ 107 chars


def start_head(num_cpus: int = 4, resources: dict | None = None) -> RayNode:
    """A head node on 127.0.0.1 with the dashboard (the jobs API needs it), free ports only."""
    temp_dir = _temp_dir()
    args = ["--head", "--port", "0", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()),
            *_node_args(num_cpus, 200, resources)]
    pgid, out = _ray_start(args, temp_dir)
    gcs = (temp_dir / "ray_current_cluster").read_text().strip()
    m = re.search(r"RAY_API_SERVER_ADDRESS='(http://[^']+)'", out)
    if not m:
        RayNode(temp_dir, pgid, gcs, None).stop()
        raise RuntimeError(f"no dashboard address in ray start output:\n{out[-3000:]}")
    return RayNode(temp_dir, pgid, gcs, m.group(1))


def add_node(head: RayNode, num_cpus: int = 1, resources: dict | None = None) -> RayNode:
    """A second node of ``head``'s cluster on this machine, with its own resources and ports."""
    temp_dir = _temp_dir()
    args = ["--address", head.gcs_address, *_node_args(num_cpus, 100, resources)]
    pgid, _ = _ray_start(args, temp_dir, join_loopback=True)
    return RayNode(temp_dir, pgid, head.gcs_address, None)


_SHARED: dict[str, RayNode] = {}


def shared_head(request: pytest.FixtureRequest) -> RayNode:
    """The session's Ray head, started on first use, stopped when pytest ends."""
    if "head" not in _SHARED:
        head = start_head()
        _SHARED["head"] = head

        def _stop():
            _SHARED.pop("head", None)
            head.stop()

        request.config.add_cleanup(_stop)
    return _SHARED["head"]


def job_submit(head: RayNode, entry: list[str], *, timeout_s: float = 240.0,
               working_dir: Path = REPO) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir REPO -- ENTRY`` against ``head``; waits for the end.

    The job's output (tail) is in the result's ``stdout``; ``returncode`` 0 means SUCCEEDED.
    """
    cmd = [RAY, "job", "submit", "--address", head.dashboard_url,
           "--working-dir", str(working_dir),
           "--runtime-env-json", json.dumps({"env_vars": RAY_ENV,
                                             "excludes": [".venv", "runs", "*.parquet", ".git",
                                                          "__pycache__", ".pytest_cache"]}),
           "--", *entry]
    return subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=timeout_s,
                          cwd=str(working_dir))
