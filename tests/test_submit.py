"""`dreamblend submit`: argument handling, and a real job on a `ray start --head` cluster on loopback.

The cluster gets random free ports and its own --temp-dir; it is stopped by killing the
processes that carry that temp dir (never a machine-wide `ray stop`: other clusters may run here).
"""

import argparse
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from dreamblend_ray.commands import submit
from local_cluster import VENV_BIN, alive, cluster_pids, start_head, stop_cluster

REPO = Path(__file__).resolve().parents[1]


def parse(argv):
    parser = argparse.ArgumentParser()
    submit.add_arguments(parser)
    return submit.split_arguments(parser.parse_args(argv))


def test_options_before_and_after_the_job_name_and_job_args_after_dashes(monkeypatch):
    monkeypatch.setenv("DREAMBLEND_S3_ENDPOINT", "http://minio:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    args = parse(["finetune", "--address", "http://h:8265", "--follow", "--env", "X=1", "--",
                  "--subjects", "s3://b/s.jsonl", "--address", "auto"])
    assert (args.address, args.follow) == ("http://h:8265", True)
    sub = submit.build_submission(args)
    assert sub["entrypoint"] == "python jobs/finetune_subjects.py --subjects s3://b/s.jsonl --address auto"
    env = sub["runtime_env"]["env_vars"]
    assert env["DREAMBLEND_S3_ENDPOINT"] == "http://minio:9000" and env["X"] == "1"
    assert "AWS_SECRET_ACCESS_KEY" not in env  # only with --forward-aws-credentials
    assert sub["runtime_env"]["working_dir"] == str(REPO)
    assert {".venv", ".git", "outputs"} <= set(sub["runtime_env"]["excludes"])
    args = parse(["--address", "http://h:8265", "generate", "--forward-aws-credentials", "--", "--requests", "r"])
    sub = submit.build_submission(args)
    assert sub["entrypoint"] == "python jobs/generate_batch.py --requests r"
    assert sub["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "secret"


def test_installed_package_outside_a_checkout_ships_py_modules(monkeypatch):
    monkeypatch.setattr(submit, "repo_root", lambda: None)
    sub = submit.build_submission(parse(["generate", "--address", "http://h:8265", "--", "--requests", "r"]))
    assert sub["entrypoint"] == "python -m dreamblend_ray.generate_job --requests r"
    assert sub["runtime_env"]["py_modules"][0].endswith("dreamblend_ray")


def test_bad_submit_arguments_are_value_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown option"):
        parse(["finetune", "--adress", "x", "--", "--subjects", "s"])
    with pytest.raises(ValueError, match="--env must be NAME"):
        submit.job_env(parse(["finetune", "--env", "=1", "--", "a"]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="--address is required"):
        submit.run(parse(["finetune", "--", "--subjects", "s"]))


def test_token_from_environment_or_file(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert submit.auth_headers() == {}
    (tmp_path / "token").write_text("abc\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert submit.auth_headers() == {"Authorization": "Bearer abc"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "xyz")
    assert submit.auth_headers() == {"Authorization": "Bearer xyz"}


# --------------------------------------------------------------------------- a real cluster

@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` on 127.0.0.1 with random ports, its own temp dir and token authentication.

    Yields the dashboard address, the cluster's environment, and a client environment that holds
    the token only as RAY_AUTH_TOKEN (so `dreamblend submit` must send it itself).
    """
    temp_dir = tempfile.mkdtemp(prefix="dbrs", dir="/tmp")
    token = secrets.token_hex(16)
    # `python` in the job's entrypoint is the cluster's python: put this venv first on its PATH.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    client_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    try:
        try:
            address = start_head(temp_dir, env)
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield {"address": address, "env": env, "client_env": client_env, "temp_dir": temp_dir}
    finally:
        stop_cluster(temp_dir, token)
        survivors = alive(cluster_pids(temp_dir, token))
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"the test cluster's processes {survivors} outlived the test"


@pytest.mark.slow
def test_submit_runs_the_finetune_job_on_a_cluster_and_follows_it(ray_head, tmp_path):
    import numpy as np
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(2):
        array = np.full((32, 32, 3), 40 * i, np.uint8)
        array[8:24, 8:24] = (200, 30, 30)
        Image.fromarray(array).save(tmp_path / "imgs" / f"{i}.png")
    manifest = tmp_path / "subjects.jsonl"
    manifest.write_text(json.dumps({"subject_id": "cube", "class_noun": "cube", "images": "imgs"}) + "\n")
    output = tmp_path / "out"
    cmd = [str(VENV_BIN / "dreamblend"), "submit", "finetune", "--address", ray_head["address"], "--follow",
           "--submission-id", "dreamblend-test-finetune", "--",
           "--subjects", str(manifest), "--output", str(output), "--run-id", "submitted", "--base", "tiny",
           "--steps", "2", "--checkpoint-steps", "1,2", "--no-prior-preservation", "--rank", "2",
           "--num-actors", "1", "--torch-threads", "1"]
    out = subprocess.run(cmd, env=ray_head["client_env"], capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert out.stdout.splitlines()[0] == "dreamblend-test-finetune"  # the submission id comes first
    assert "cube: succeeded" in out.stdout  # the job's logs were followed
    assert (output / "subjects" / "cube" / "subject.json").is_file()
    assert (output / "runs" / "submitted" / "results.parquet").is_file()


@pytest.mark.slow
def test_submit_without_the_token_is_refused(ray_head, tmp_path):
    env = {k: v for k, v in ray_head["client_env"].items() if k != "RAY_AUTH_TOKEN"}
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = [str(VENV_BIN / "dreamblend"), "submit", "generate", "--address", ray_head["address"], "--",
           "--requests", "r.jsonl", "--output", str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "cannot submit to" in out.stderr and "Authentication required" in out.stderr
