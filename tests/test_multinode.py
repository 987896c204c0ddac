"""A two-raylet Ray cluster on loopback (issue 21): `ray start --head` plus a second `ray start
--address` with its own temp dir and a custom resource, so that placement on the second node is
observable. Auth is off for this loopback cluster (RAY_AUTH_MODE=disabled, see ARCHITECTURE.md); it
is stopped by killing its own processes, never by a machine-wide `ray stop`.
"""

import os
import subprocess
import sys
import tempfile

import pytest

from local_cluster import VENV_BIN, WORKER_PORTS, free_ports, head_command, stop_cluster, worker_ports_start

pytestmark = pytest.mark.slow


def cluster_env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    return env


def worker_command(gcs_address: str, temp_dir: str) -> list[str]:
    nm, om, agent, agent_grpc, runtime_env, metrics, low = ports = free_ports(7)
    first_worker_port = worker_ports_start(low, ports[:-1])
    return [str(VENV_BIN / "ray"), "start", "--address", gcs_address, "--node-ip-address", "127.0.0.1",
            "--node-manager-port", str(nm), "--object-manager-port", str(om),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
            "--min-worker-port", str(first_worker_port), "--max-worker-port", str(first_worker_port + WORKER_PORTS - 1),
            "--num-cpus", "1", "--resources", '{"second_node": 1}', "--temp-dir", temp_dir,
            "--disable-usage-stats"]


def run(cmd: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, **kwargs)


@pytest.fixture(scope="module")
def two_nodes():
    """The GCS address of a head (1 CPU) and a second raylet (1 CPU, resource ``second_node``)."""
    env = cluster_env()
    head_dir = tempfile.mkdtemp(prefix="dbh", dir="/tmp")
    worker_dir = tempfile.mkdtemp(prefix="dbw", dir="/tmp")
    cmd, _ = head_command(head_dir, num_cpus=1)
    gcs = f"127.0.0.1:{cmd[cmd.index('--port') + 1]}"
    try:
        for command in (cmd, worker_command(gcs, worker_dir)):
            done = run(command, env)
            assert done.returncode == 0, f"{' '.join(command[:3])} failed:\n{done.stdout}\n{done.stderr}"
        yield gcs, env
    finally:
        stop_cluster(worker_dir)
        stop_cluster(head_dir)


def test_the_cluster_has_two_nodes_and_placement_is_observable(two_nodes):
    gcs, env = two_nodes
    code = ("import ray\n"
            f"ray.init(address={gcs!r}, log_to_driver=False)\n"
            "@ray.remote(num_cpus=0, resources={'second_node': 1})\n"
            "def node(): return ray.get_runtime_context().get_node_id()\n"
            "alive = [n for n in ray.nodes() if n['Alive']]\n"
            "print(len(alive), ray.get(node.remote()) != ray.get_runtime_context().get_node_id())\n")
    done = run([sys.executable, "-c", code], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["2", "True"]


def test_serve_refuses_a_relative_storage_root_on_two_nodes(two_nodes, tmp_path):
    """Each node would resolve ./store against its own disk and the store would split silently."""
    gcs, env = two_nodes
    port = free_ports(1)[0]
    done = run([str(VENV_BIN / "dreamblend"), "serve", "--base", "tiny", "--ray-address", gcs,
                "--storage-root", "store", "--host", "127.0.0.1", "--port", str(port)], env, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "2 nodes" in done.stderr and "s3://" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "store").exists()
