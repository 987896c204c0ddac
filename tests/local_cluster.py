"""A `ray start --head` cluster on loopback for tests: random free ports, its own --temp-dir, and a
clean stop that kills only its processes (never a machine-wide `ray stop`: other clusters may run here)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def head_command(temp_dir: str, num_cpus: int = 2) -> tuple[list[str], int]:
    """The `ray start --head` command line and its dashboard port."""
    gcs, dash, client, nm, om, agent, agent_grpc, renv, metrics, wmin = ports = free_ports(10)
    first_worker = worker_ports_start(wmin, ports[:-1])
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--include-dashboard", "true", "--ray-client-server-port", str(client),
           "--node-manager-port", str(nm), "--object-manager-port", str(om),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(renv), "--metrics-export-port", str(metrics),
           "--min-worker-port", str(first_worker), "--max-worker-port", str(first_worker + WORKER_PORTS - 1),
           "--num-cpus", str(num_cpus), "--temp-dir", temp_dir, "--disable-usage-stats"]
    return cmd, dash


WORKER_PORTS = 51


def worker_ports_start(seed: int, taken) -> int:
    """The first of WORKER_PORTS worker ports in 20000-39999 around ``seed``, a range holding none of
    ``taken`` (Ray refuses a worker range that overlaps another component's port: one CI run drew
    an object-manager port inside it)."""
    start = 20000 + seed % 20000
    while any(start <= port < start + WORKER_PORTS for port in taken) or start + WORKER_PORTS > 40000:
        start = 20000 + (start - 20000 + WORKER_PORTS) % (20000 - WORKER_PORTS)
    return start


def _parents() -> dict[int, int]:
    parents = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def cluster_pids(temp_dir: str, token: str | None = None) -> list[int]:
    """This cluster's processes: those whose command line names its temp dir or whose environment
    holds its (unique) auth token, and all their descendants. Ray renames some children
    (``ray::DashboardAgent``) and detaches its client server, so the temp dir alone misses them."""
    pids = set()
    marker = f"RAY_AUTH_TOKEN={token}".encode() if token else None
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if temp_dir.encode() in (proc / "cmdline").read_bytes() or (
                        marker and marker in (proc / "environ").read_bytes()):
                    pids.add(int(proc.name))
            except OSError:
                continue
    parents = _parents()
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in pids and pid != os.getpid()}
        grew = not children <= pids
        pids |= children
    return sorted(pids)


def alive(pids) -> list[int]:
    """The pids still running (zombies, already dead, count as gone)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            running.append(pid)
    return running


def stop_cluster(temp_dir: str, token: str | None = None) -> None:
    """SIGTERM, then SIGKILL, this cluster's processes only."""
    tree = set(cluster_pids(temp_dir, token))
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        pids = tree | set(cluster_pids(temp_dir, token))
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.2)


def start_head(temp_dir: str, env: dict, cwd: str | None = None, num_cpus: int = 2) -> str:
    """Start the head; its dashboard address. RuntimeError with ray's output when it fails."""
    cmd, dash = head_command(temp_dir, num_cpus)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{out.stdout}\n{out.stderr}")
    return f"http://127.0.0.1:{dash}"
