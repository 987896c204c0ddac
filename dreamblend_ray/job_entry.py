"""Run a batch job by name: ``python -m dreamblend_ray.job_entry finetune|generate JOB_ARGS...``.

What ``dreamblend submit`` runs on a cluster where the code is the shipped or installed package
(no jobs/ scripts there). The jobs' command lines (``jobs/cli.py``) are imported under their own
names, not run as ``__main__``: their loggers keep their ``dreamblend_ray.*`` names (the console
shows them) and Ray pickles the actor classes by reference to the package, as with the jobs/*.py
entry points.
"""

from __future__ import annotations

import importlib
import sys

from dreamblend_ray.runtime import lifecycle

JOBS = ("finetune", "generate")  # the keys of jobs/cli.py's MAINS


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in JOBS:
        print(f"usage: python -m dreamblend_ray.job_entry {{{','.join(JOBS)}}} JOB_ARGS...", file=sys.stderr)
        return 2
    if argv[0] == "finetune":  # the toy world's pair scorer registers on import (--choose-pair embedded)
        importlib.import_module("dreamblend_ray.embedded.scorer")
    # Imported only once the name is known good: the jobs load torch and Ray Data.
    return importlib.import_module("dreamblend_ray.jobs.cli").MAINS[argv[0]](argv[1:])


if __name__ == "__main__":
    lifecycle.exit_process(main())
