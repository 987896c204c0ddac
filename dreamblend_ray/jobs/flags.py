"""The flags the batch jobs and the ``dreamblend`` commands share, declared once, spelled alike.

``--base`` (every command and job that loads a model), ``--address`` and the actor-pool flags
(``--num-actors``, ``--cpus-per-actor``, ``--gpus-per-actor``, ``--torch-threads``; the fields of
``jobs.common.JobResources``, whose defaults are :data:`RESOURCE_DEFAULTS`). The settings of
fine-tuning and sampling are not here: config.py derives their flags (``config.add_arguments``).

Light on purpose (argparse only), as ``dreamblend --help`` imports it.
"""

from __future__ import annotations

import argparse

from dreamblend_ray.config import DEFAULT_TENANT, validate_tenant

DEFAULT_BASE = "embedded"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

RESOURCE_DEFAULTS = {"num_actors": 1, "cpus_per_actor": 1.0, "gpus_per_actor": 0.0, "torch_threads": None}
# JobResources field -> (flag type, help, older spellings that keep working)
RESOURCE_FLAGS = {
    "num_actors": (int, "actors in the pool (each holds one copy of the base model)", ("--actors",)),
    "cpus_per_actor": (float, "CPUs reserved per actor", ()),
    "gpus_per_actor": (float, "GPUs per actor (0: CPU)", ()),
    "torch_threads": (int, "torch threads per actor (auto: its CPUs)", ()),
}


def add_base_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default=DEFAULT_BASE,
                        help=f"base model: {DEFAULT_BASE} (default), tiny, tiny-sd2, tiny-sdxl, a diffusers folder "
                             "or a storage URI (s3://, gs://, ...) holding one")


def add_tenant_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", default=DEFAULT_TENANT, type=validate_tenant,
                        help="the tenant whose subjects these are: its prefix {root}/tenants/{tenant}/ under every "
                             "root given (default: 'default', the roots themselves, as before tenants)")


def add_resource_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] = tuple(RESOURCE_FLAGS)) -> None:
    """``--address`` and a flag per JobResources field in ``names``; each defaults to None ("not
    given": the dataclass's default, shown in the help, applies). :func:`given_resources` reads them."""
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, or a new local cluster)")
    for name in names:
        kind, text, aliases = RESOURCE_FLAGS[name]
        default = RESOURCE_DEFAULTS[name]
        parser.add_argument("--" + name.replace("_", "-"), *aliases, dest=name, type=kind, default=None,
                            help=f"{text} (default: {'auto' if default is None else default})")


def given_resources(args: argparse.Namespace) -> dict:
    """The JobResources fields given as flags: ``JobResources(**given_resources(args))``."""
    return {name: getattr(args, name) for name in RESOURCE_FLAGS if getattr(args, name, None) is not None}
