"""Run a batch job by name: ``python -m dreamblend_ray.job_entry finetune|generate JOB_ARGS...``.

What ``dreamblend submit`` runs on a cluster where the code is the shipped or installed package
(no jobs/ scripts there). The job module is imported under its own name, not run as ``__main__``:
its loggers keep their ``dreamblend_ray.*`` names (the console shows them) and Ray pickles its
actor classes by reference to the package, as with the jobs/*.py entry points.
"""

from __future__ import annotations

import importlib
import sys

JOB_MODULES = {"finetune": "dreamblend_ray.jobs.finetune", "generate": "dreamblend_ray.jobs.generate"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in JOB_MODULES:
        print(f"usage: python -m dreamblend_ray.job_entry {{{','.join(JOB_MODULES)}}} JOB_ARGS...", file=sys.stderr)
        return 2
    if argv[0] == "finetune":  # the toy world's pair scorer registers on import (--choose-pair embedded)
        importlib.import_module("dreamblend_ray.embedded.scorer")
    return importlib.import_module(JOB_MODULES[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
