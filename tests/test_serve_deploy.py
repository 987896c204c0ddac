"""`serve deploy` of the project's Serve config on a `ray start --head` cluster (issue 21).

The cluster runs with a working directory outside the repository and nothing of the checkout on
its import path (only the installed package): the config's import_path must resolve inside the
package, as on a cluster without the project's image. Auth is off for this loopback cluster
(RAY_AUTH_MODE=disabled, see ARCHITECTURE.md); it is stopped by killing its own processes.
"""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

from local_cluster import VENV_BIN, alive, cluster_pids, free_ports, start_head, stop_cluster

REPO = Path(__file__).resolve().parents[1]


def cluster_env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "PYTHONPATH"):
        env.pop(name, None)
    env["DREAMBLEND_API_KEY"] = "serve-deploy-k3y-7f2a9c01d4e5b6a8c9d0e1f2"  # the shipped config has auth on
    return env


def deploy_config(source: Path, port: int, storage_root: Path) -> dict:
    """The repository's config, unchanged but for what a loopback test needs: the tiny base, an
    absolute local storage root, one CPU replica, the proxy on a free loopback port."""
    config = yaml.safe_load(source.read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    app = config["applications"][0]
    app["args"].update(base="tiny", storage_root=str(storage_root), num_gpus=0, num_cpus=1,
                       min_replicas=1, max_replicas=1, ingress_num_cpus=0.1)
    assert app["args"]["auth_enabled"] is True  # shipped with auth on; the key comes from cluster_env
    return config


def serve_cli(*args, env, cwd, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "serve"), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def wait_running(address: str, timeout_s: float = 240) -> dict:
    """The application's status from the dashboard's Serve REST API (what `serve status` reads)."""
    deadline, app = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        try:
            body = requests.get(f"{address}/api/serve/applications/", timeout=10).json()
            app = (body.get("applications") or {}).get("dreamblend") or {}
        except (requests.RequestException, ValueError):
            app = {}
        if app.get("status") in ("RUNNING", "DEPLOY_FAILED"):
            return app
        time.sleep(1)
    raise AssertionError(f"the application did not become RUNNING in {timeout_s} s: {app}")


@pytest.mark.slow
def test_serve_deploy_of_the_config_works_with_only_the_package_installed(tmp_path):
    workdir = tmp_path / "elsewhere"  # not the repository: `deployments` is not importable here
    workdir.mkdir()
    env = cluster_env()
    probe = subprocess.run([str(VENV_BIN / "python"), "-c", "import deployments"], env=env, cwd=workdir,
                           capture_output=True, text=True)
    assert probe.returncode != 0, "the test's premise: the repository's deployments/ is not importable"
    (port,) = free_ports(1)
    config_file = workdir / "serve_config.yaml"
    config_file.write_text(yaml.safe_dump(deploy_config(REPO / "deployments" / "serve_config.yaml", port,
                                                        tmp_path / "storage")))
    temp_dir = tempfile.mkdtemp(prefix="dbsd", dir="/tmp")
    address = None
    try:
        address = start_head(temp_dir, env, cwd=str(workdir))
        out = serve_cli("deploy", str(config_file), "--address", address, env=env, cwd=workdir)
        assert out.returncode == 0, out.stdout + out.stderr
        app = wait_running(address)
        assert app["status"] == "RUNNING", app.get("message")
        response = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
        assert response.status_code == 200, response.text
    finally:
        if address:
            serve_cli("shutdown", "-y", "--address", address, env=env, cwd=workdir)
        stop_cluster(temp_dir)  # this cluster's processes only (never a machine-wide `ray stop`)
        survivors = alive(cluster_pids(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"the test cluster's processes {survivors} outlived the test"
