"""`dreamblend submit`: argument handling, and a real job on a `ray start --head` cluster on loopback.

The cluster gets random free ports and its own --temp-dir; it is stopped by killing the
processes that carry that temp dir (never a machine-wide `ray stop`: other clusters may run here).
"""

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

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
    assert sub["entrypoint"] == "python -m dreamblend_ray.job_entry finetune --subjects s3://b/s.jsonl --address auto"
    env = sub["runtime_env"]["env_vars"]
    assert env["DREAMBLEND_S3_ENDPOINT"] == "http://minio:9000" and env["X"] == "1"
    assert "AWS_SECRET_ACCESS_KEY" not in env  # only with --forward-aws-credentials
    args = parse(["--address", "http://h:8265", "generate", "--forward-aws-credentials", "--", "--requests", "r"])
    sub = submit.build_submission(args)
    assert sub["entrypoint"] == "python -m dreamblend_ray.job_entry generate --requests r"
    assert sub["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "secret"


def _package_zip(tmp_path, runtime_env) -> tuple[list[str], int]:
    """The files Ray itself would upload for the runtime_env's py_modules entry (its own packer)."""
    from ray._private.runtime_env.packaging import create_package

    (module,) = runtime_env["py_modules"]
    target = tmp_path / "pkg.zip"
    create_package(module, target, include_gitignore=True, include_parent_dir=True,
                   excludes=runtime_env["excludes"])
    import zipfile

    return zipfile.ZipFile(target).namelist(), target.stat().st_size


def test_default_ships_only_the_package_without_the_embedded_weights(tmp_path):
    """Issue 21: not the whole checkout (15.8 MiB with the embedded weights), only the package."""
    sub = submit.build_submission(parse(["finetune", "--", "--subjects", "s", "--base", "s3://b/model"]))
    env = sub["runtime_env"]
    assert "working_dir" not in env
    assert env["py_modules"] == [str(REPO / "dreamblend_ray")]
    names, size = _package_zip(tmp_path, env)
    assert any(n.endswith("dreamblend_ray/jobs/finetune.py") for n in names)
    assert any(n.endswith("dreamblend_ray/job_entry.py") for n in names)
    assert any(n.endswith("dreamblend_ray/data/dreambooth_prompts.json") for n in names)
    assert not [n for n in names if "/weights/" in n or "__pycache__" in n]
    assert size < 2 * 2**20, f"{size / 2**20:.1f} MiB shipped"
    # the embedded base needs its weights: then, and only then, they travel with the package
    env = submit.build_submission(parse(["finetune", "--", "--subjects", "s"]))["runtime_env"]
    assert submit.WEIGHTS not in env["excludes"]
    env = submit.build_submission(parse(["finetune", "--", "--base=tiny", "--subjects", "s"]))["runtime_env"]
    assert submit.WEIGHTS in env["excludes"]


def test_code_installed_ships_nothing_and_pip_passes_through():
    sub = submit.build_submission(parse(["generate", "--code", "installed", "--pip", "dreamblend-ray==0.1.0",
                                         "--pip", "boto3>=1.34", "--", "--requests", "r"]))
    env = sub["runtime_env"]
    assert not {"py_modules", "working_dir", "excludes"} & set(env)
    assert env["pip"] == ["dreamblend-ray==0.1.0", "boto3>=1.34"]
    assert sub["entrypoint"] == "python -m dreamblend_ray.job_entry generate --requests r"


def test_working_dir_leaves_out_what_a_job_never_needs(tmp_path):
    sub = submit.build_submission(parse(["finetune", "--working-dir", str(REPO), "--", "--base", "s3://b/m"]))
    env = sub["runtime_env"]
    assert env["working_dir"] == str(REPO) and sub["entrypoint"] == "python jobs/finetune_subjects.py --base s3://b/m"
    assert {".venv", ".git", "outputs", "tests", "docs", "benchmarks", "dreamblend_ray/embedded/weights/"} <= set(env["excludes"])
    with pytest.raises(ValueError, match="either --working-dir or --code"):
        submit.build_submission(parse(["finetune", "--working-dir", str(REPO), "--code", "package", "--", "x"]))
    with pytest.raises(ValueError, match="has no jobs/finetune_subjects.py"):
        submit.build_submission(parse(["finetune", "--working-dir", str(tmp_path), "--", "x"]))


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_runtime_env_file_is_merged(tmp_path, suffix, monkeypatch):
    monkeypatch.delenv("DREAMBLEND_S3_ENDPOINT", raising=False)
    given = {"env_vars": {"HF_HOME": "/cache", "X": "from-file"}, "conda": {"dependencies": ["pip"]},
             "config": {"setup_timeout_seconds": 1200}}
    path = tmp_path / f"env.{suffix}"
    path.write_text(json.dumps(given) if suffix == "json" else yaml.safe_dump(given))
    sub = submit.build_submission(parse(["finetune", "--runtime-env", str(path), "--code", "installed",
                                         "--env", "X=1", "--", "--subjects", "s"]))
    env = sub["runtime_env"]
    assert env["env_vars"]["HF_HOME"] == "/cache" and env["env_vars"]["X"] == "1"  # the option wins
    assert env["conda"] == given["conda"] and env["config"] == given["config"]


@pytest.mark.parametrize("content, message", [
    ("pip: [requests]", "'pip', which --pip also sets"),
    ("py_modules: [x]", "'py_modules', which --code package also sets"),
    ("- a list", "expected a mapping"),
    ("pipp: [x]", "unknown runtime_env field"),
    ("env_vars: {A: 1}", "invalid runtime_env"),
    ("a: [", "not valid YAML or JSON"),
])
def test_bad_runtime_env_files_are_value_errors(tmp_path, content, message):
    path = tmp_path / "env.yaml"
    path.write_text(content)
    argv = ["finetune", "--runtime-env", str(path), "--pip", "x", "--", "--subjects", "s"]
    with pytest.raises(ValueError, match=re.escape(message)):
        submit.build_submission(parse(argv))
    with pytest.raises(ValueError, match="cannot read it"):
        submit.build_submission(parse(["finetune", "--runtime-env", str(tmp_path / "missing.yaml"), "--", "x"]))


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


def test_job_entry_runs_the_named_job_under_its_module_name(capsys):
    from dreamblend_ray import job_entry

    assert job_entry.main(["nope"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        job_entry.main(["generate", "--help"])
    assert exit_info.value.code == 0 and "--requests" in capsys.readouterr().out
