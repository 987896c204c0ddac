"""`dreamblend submit finetune|generate`: run a batch job on a running Ray cluster.

    dreamblend submit finetune --address http://HEAD:8265 --follow -- \
        --subjects s3://bucket/subjects.jsonl --output s3://bucket/out --num-actors 4 --gpus-per-actor 1

Everything after ``--`` goes to the job (``python -m dreamblend_ray.job_entry finetune|generate``,
which runs what jobs/finetune_subjects.py and jobs/generate_batch.py run; see their --help). The job is
submitted through Ray's JobSubmissionClient with a runtime_env that ships only what it needs:

- ``--code package`` (default): this machine's ``dreamblend_ray`` package as a ``py_modules`` entry
  (about 1 MiB), without the embedded model's weights unless the job's ``--base`` is ``embedded``;
  the cluster's Python must have the dependencies (the project's image, or ``--pip``);
- ``--code installed``: nothing; the cluster runs its installed package (the image, or
  ``--pip dreamblend-ray==VERSION`` from your index);
- ``--working-dir DIR``: DIR as the ``working_dir``, running its jobs/ script, minus environments,
  outputs, tests, docs, benchmarks and manifests (``EXCLUDES``).

``--pip PKG`` (repeatable) adds pip packages; ``--runtime-env FILE`` (YAML or JSON) gives any other
runtime_env fields (conda, image_uri, ...), merged with the above (a field given both ways is an
error, but env_vars merge). The storage endpoint and region variables of this shell are passed to
the job; AWS credentials only with --forward-aws-credentials (they would show in the job's
runtime_env on the dashboard: prefer the cluster's own IAM role).
Token authentication: RAY_AUTH_TOKEN (or the file at RAY_AUTH_TOKEN_PATH) is sent as a Bearer
token; with RAY_AUTH_MODE=token Ray's client also finds its default token file itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import dreamblend_ray
from dreamblend_ray.jobs.flags import DEFAULT_BASE
from dreamblend_ray.runtime import exit_codes

logger = logging.getLogger(__name__)

# job -> (its script under jobs/, the module of its command line)
JOBS = {"finetune": ("jobs/finetune_subjects.py", "dreamblend_ray.jobs.cli"),
        "generate": ("jobs/generate_batch.py", "dreamblend_ray.jobs.cli")}
# --working-dir: what a job never needs (gitwildmatch patterns, relative to the directory).
EXCLUDES = [".venv", ".venv/**", ".git", "outputs", "dreamblend-storage", "**/__pycache__", ".pytest_cache",
            "*.egg-info", ".cache", "build", "dist", "tests", "benchmarks", "docs", "k8s", "deployments"]
# --code package: excluded from the shipped package (relative to dreamblend_ray/).
PACKAGE_EXCLUDES = ["**/__pycache__", "*.pyc"]
WEIGHTS = "embedded/weights/"  # the embedded base model's weights (~17 MiB), needed only by --base embedded
EMBEDDED_BASE = "embedded"  # DEFAULT_BASE is the jobs' --base default
CODE_MODES = ("package", "installed")
# runtime_env fields dreamblend submit sets itself, and the option that sets each
OWN_FIELDS = {"pip": "--pip", "py_modules": "--code package", "working_dir": "--working-dir",
              "excludes": "--code package / --working-dir"}
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
EXIT_CODES = (exit_codes.FAILED,)  # with --follow: the job ended other than SUCCEEDED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "dreamblend submit {finetune,generate} --address URL [options] -- JOB_ARGS..."
    parser.add_argument("job", choices=sorted(JOBS), help="which batch job to run")
    parser.add_argument("job_args", nargs=argparse.REMAINDER,
                        help="submit options, then `--`, then the job script's arguments "
                             "(see `python jobs/finetune_subjects.py --help`)")
    add_options(parser)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                        help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265 "
                             "(default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)")
    parser.add_argument("--follow", action="store_true",
                        help="stream the job's logs until it ends; exit 0 only if it SUCCEEDED")
    parser.add_argument("--submission-id", help="a name for the submission (default: Ray picks one)")
    parser.add_argument("--code", choices=CODE_MODES, default=None,
                        help="what code the job runs: `package` ships this machine's dreamblend_ray as "
                             "py_modules (default; no embedded weights unless --base embedded), "
                             "`installed` ships nothing and runs the cluster's installed package "
                             "(the project's image, or --pip)")
    parser.add_argument("--working-dir", help="instead of --code: ship this directory as the job's working_dir "
                                              "(minus tests, docs, environments, outputs) and run its jobs/ script")
    parser.add_argument("--pip", action="append", default=[], metavar="PKG",
                        help="pip requirement installed for the job (repeatable), e.g. "
                             "--pip dreamblend-ray==0.1.0 with --code installed")
    parser.add_argument("--runtime-env", metavar="FILE",
                        help="YAML or JSON file of further runtime_env fields (conda, image_uri, env_vars, ...); "
                             "merged with what the other options set")
    parser.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                        help="extra environment variable for the job (repeatable; NAME alone copies it)")
    parser.add_argument("--forward-aws-credentials", action="store_true",
                        help="also pass AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN from this shell")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=None,
                        help="CPUs reserved for the job's driver (default: none)")


def split_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Separate the submit options that argparse left among the job's arguments.

    With `--`, what precedes it are submit options and what follows is the job's. Without one
    (argparse drops it when the options come before the job name), known submit options are
    taken and the rest goes to the job. ``args.job_args`` becomes the job's arguments alone.
    """
    raw = list(args.job_args)
    own, rest = (raw[:raw.index("--")], raw[raw.index("--") + 1:]) if "--" in raw else (raw, None)
    parser = argparse.ArgumentParser(prog=f"dreamblend submit {args.job}", add_help=False, exit_on_error=False)
    add_options(parser)
    try:
        _, unknown = parser.parse_known_args(own, namespace=args)
    except argparse.ArgumentError as exc:
        raise ValueError(f"dreamblend submit: {exc}") from exc
    if rest is not None and unknown:
        raise ValueError(f"dreamblend submit: unknown option(s) {unknown} before `--` "
                         "(the job's own arguments go after it)")
    args.job_args = rest if rest is not None else unknown
    return args


def job_base(job_args: list[str]) -> str:
    """The job's --base (the last one given, as argparse reads it), or its default."""
    base = DEFAULT_BASE
    for i, arg in enumerate(job_args):
        if arg == "--base" and i + 1 < len(job_args):
            base = job_args[i + 1]
        elif arg.startswith("--base="):
            base = arg.split("=", 1)[1]
    return base


def code_env(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The runtime_env fields that ship the job's code, and the entrypoint's command (without job args)."""
    script = JOBS[args.job][0]
    if args.working_dir:
        if args.code:
            raise ValueError("give either --working-dir or --code, not both")
        working_dir = Path(args.working_dir)
        if not (working_dir / script).is_file():
            raise ValueError(f"--working-dir {working_dir} has no {script}")
        excludes = EXCLUDES + ([] if job_base(args.job_args) == EMBEDDED_BASE else [f"dreamblend_ray/{WEIGHTS}"])
        return {"working_dir": str(working_dir), "excludes": excludes}, ["python", script]
    if (args.code or "package") == "installed":
        return {}, ["python", "-m", "dreamblend_ray.job_entry", args.job]
    excludes = PACKAGE_EXCLUDES + ([] if job_base(args.job_args) == EMBEDDED_BASE else [WEIGHTS])
    return {"py_modules": [str(Path(dreamblend_ray.__file__).parent)], "excludes": excludes}, \
        ["python", "-m", "dreamblend_ray.job_entry", args.job]


def load_runtime_env(path: str) -> dict:
    """The runtime_env fields of a YAML or JSON file (JSON is YAML); ValueError with one sentence."""
    import yaml
    from ray.runtime_env import RuntimeEnv

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"--runtime-env {path}: cannot read it ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"--runtime-env {path}: not valid YAML or JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"--runtime-env {path}: expected a mapping of runtime_env fields, got {type(data).__name__}")
    unknown = sorted(set(data) - set(RuntimeEnv.known_fields))
    if unknown:
        raise ValueError(f"--runtime-env {path}: unknown runtime_env field(s) {unknown}; "
                         f"known: {sorted(k for k in RuntimeEnv.known_fields if not k.startswith('_'))}")
    return data


def merge_runtime_env(given: dict, own: dict) -> dict:
    """``own`` (what the options set) on top of ``given`` (--runtime-env): env_vars merge, the
    options' variables winning; any other field set both ways is an error."""
    from ray.runtime_env import RuntimeEnv

    merged = dict(given)
    for key, value in own.items():
        if key == "env_vars":
            merged[key] = {**(given.get(key) or {}), **value}
        elif key in given:
            raise ValueError(f"--runtime-env sets {key!r}, which {OWN_FIELDS.get(key, 'dreamblend submit')} "
                             "also sets: give it in one place (e.g. --code installed to ship no code)")
        else:
            merged[key] = value
    try:
        RuntimeEnv(**merged)  # Ray's own type checks (env_vars strings, pip list, ...)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid runtime_env: {exc}") from exc
    return merged


def job_env(args: argparse.Namespace) -> dict[str, str]:
    """Variables for the job: storage endpoint/region, optionally credentials, and --env entries."""
    from dreamblend_ray.jobs.common import storage_env  # deferred: jobs.common loads pyarrow

    env = storage_env()
    if args.forward_aws_credentials:
        env.update({n: os.environ[n] for n in CREDENTIAL_VARIABLES if os.environ.get(n)})
    for item in args.env:
        name, sep, value = item.partition("=")
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"--env must be NAME or NAME=VALUE, got {item!r}")
        if not sep and name not in os.environ:
            raise ValueError(f"--env {name}: not set in this shell")
        env[name] = value if sep else os.environ[name]
    return env


def build_submission(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``JobSubmissionClient.submit_job`` for ``args``."""
    import shlex

    own, entrypoint = code_env(args)
    own["env_vars"] = job_env(args)
    if args.pip:
        own["pip"] = list(args.pip)
    given = load_runtime_env(args.runtime_env) if args.runtime_env else {}
    runtime_env = merge_runtime_env(given, own)
    entrypoint += list(args.job_args)
    submission = {"entrypoint": shlex.join(entrypoint), "runtime_env": runtime_env,
                  "metadata": {"dreamblend_job": args.job}}
    if args.submission_id:
        submission["submission_id"] = args.submission_id
    if args.entrypoint_num_cpus is not None:
        submission["entrypoint_num_cpus"] = args.entrypoint_num_cpus
    return submission


def auth_headers() -> dict[str, str]:
    """A Bearer header from RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH; {} when neither is set."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        token = Path(path).expanduser().read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def follow(client, submission_id: str) -> str:
    """Print the job's logs as they come; return its final status name."""
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(submission_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    return wait_for_end(client, submission_id)


def wait_for_end(client, submission_id: str, poll_s: float = 1.0) -> str:
    import time

    while (status := str(client.get_job_status(submission_id).value)) not in TERMINAL:
        time.sleep(poll_s)
    return status


def run(args: argparse.Namespace) -> int:
    args = split_arguments(args)
    if not args.address:
        raise ValueError("--address is required (the dashboard URL, e.g. http://127.0.0.1:8265)")
    if not args.job_args:
        raise ValueError(f"give the job's arguments after `--`, e.g. `dreamblend submit {args.job} "
                         f"--address URL -- --help`")
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    submission = build_submission(args)
    try:
        client = JobSubmissionClient(args.address, headers=auth_headers())
        submission_id = client.submit_job(**submission)
    except (AuthenticationError, ConnectionError, RuntimeError) as exc:
        logger.error("cannot submit to %s: %s", args.address, exc)
        return exit_codes.USAGE
    logger.info("submitted %s job %s to %s: %s", args.job, submission_id, args.address, submission["entrypoint"])
    print(submission_id, flush=True)
    if not args.follow:
        logger.info("follow it with: ray job logs --address %s --follow %s", args.address, submission_id)
        return 0
    status = follow(client, submission_id)
    logger.info("job %s finished: %s", submission_id, status)
    return exit_codes.OK if status == "SUCCEEDED" else exit_codes.FAILED
