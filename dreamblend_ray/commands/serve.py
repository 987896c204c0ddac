"""`dreamblend serve`: start local Ray and the DreamBlend Serve application, run until SIGTERM or Ctrl-C.

The same application as ``serve run deployments/serve_config.yaml`` (``dreamblend_ray.serving.app``),
with the arguments taken from flags. ``--config FILE`` reads the ``args:`` block of the first
application of a Serve config file instead; flags given explicitly override it.
"""

from __future__ import annotations

import argparse
import logging

from dreamblend_ray.dtypes import add_dtype_argument
from dreamblend_ray.runtime import lifecycle

logger = logging.getLogger(__name__)

# flag -> AppArgs field, for the flags that map one to one
FLAG_FIELDS = ("base", "storage_root", "device", "dtype", "max_batch_size", "batch_wait_timeout_s", "batching",
               "max_models_per_replica", "min_replicas", "max_replicas", "num_gpus", "num_cpus",
               "default_steps", "request_timeout_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default=None,
                        help="base model: embedded (default), tiny, tiny-sd2, tiny-sdxl, a diffusers directory "
                             "or s3:// URI")
    parser.add_argument("--storage-root", dest="storage_root", default=None,
                        help="root with subjects/{id}/ (local path or s3://); default ./dreamblend-storage")
    parser.add_argument("--config", default=None,
                        help="a Serve config YAML (e.g. deployments/serve_config.yaml) to take args from")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    add_dtype_argument(parser)
    parser.add_argument("--max-batch-size", dest="max_batch_size", type=int, default=None)
    parser.add_argument("--batch-wait-timeout-s", dest="batch_wait_timeout_s", type=float, default=None)
    parser.add_argument("--batching", choices=("continuous", "static"), default=None,
                        help="continuous (default): LoRA subjects' requests share denoising steps across subjects "
                             "and join a running batch; static: one sampler call per (subject, settings) group")
    parser.add_argument("--max-models-per-replica", dest="max_models_per_replica", type=int, default=None)
    parser.add_argument("--min-replicas", dest="min_replicas", type=int, default=None)
    parser.add_argument("--max-replicas", dest="max_replicas", type=int, default=None)
    parser.add_argument("--num-gpus", dest="num_gpus", type=float, default=None, help="GPUs per model replica")
    parser.add_argument("--num-cpus", dest="num_cpus", type=float, default=None, help="CPUs per model replica")
    parser.add_argument("--default-steps", dest="default_steps", type=int, default=None)
    parser.add_argument("--request-timeout-s", dest="request_timeout_s", type=float, default=None)
    parser.add_argument("--auth", action="store_true",
                        help="require an API key (from $DREAMBLEND_API_KEY or --api-key-file)")
    parser.add_argument("--api-key-file", default=None, help="file holding the API key")
    parser.add_argument("--keys-file", default=None,
                        help="tenants' keys file (YAML/JSON: each tenant's hashed keys and quotas; reloaded when "
                             "it changes; `dreamblend keys new --tenant T` makes an entry); turns auth on")
    parser.add_argument("--allow-insecure", action="store_true",
                        help="serve without auth on a non-loopback --host (refused otherwise)")
    parser.add_argument("--metrics-port", dest="metrics_port", type=int, default=None,
                        help="serve the local Ray cluster's Prometheus export (Ray's and the dreamblend_* metrics) "
                             "on this port (default: a port Ray picks; ignored with --ray-address)")
    parser.add_argument("--ray-address", default=None,
                        help="connect to this Ray cluster instead of starting a local one")


def app_args(args: argparse.Namespace):
    """AppArgs from --config (if given) overlaid with the explicitly given flags."""
    from dreamblend_ray.serving.requests import AppArgs

    values: dict = {}
    if args.config:
        import yaml

        with open(args.config, encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
        apps = config.get("applications") or [{}]
        values.update(apps[0].get("args") or {})
    for name in FLAG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    if args.auth:
        values["auth_enabled"] = True
    if args.api_key_file:
        values["api_key_file"] = args.api_key_file
    if args.keys_file:
        values.update(keys_file=args.keys_file, auth_enabled=True)
    if args.allow_insecure:
        values["allow_insecure"] = True
    if getattr(args, "log_format", None) == "json":
        values["log_format"] = "json"
    try:
        return AppArgs.model_validate(values)
    except Exception as exc:  # pydantic.ValidationError -> the CLI's "bad input" path
        raise ValueError(f"invalid serve arguments: {exc}") from exc


def check_exposure(settings, host: str) -> None:
    """ValueError for auth off on an address other machines can reach, unless --allow-insecure."""
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not settings.auth_enabled and not loopback and not settings.allow_insecure:
        raise ValueError(f"refusing to serve without auth on {host}: pass --auth (or --keys-file), or "
                         "--allow-insecure if this network is yours alone")


def run(args: argparse.Namespace) -> int:
    from ray import serve

    from dreamblend_ray.models.components import resolve_base
    from dreamblend_ray.serving.app import build_app, cluster_node_count
    from dreamblend_ray.serving.requests import key_source, resolve_local_root

    settings = app_args(args)
    check_exposure(settings, args.host)
    resolve_base(settings.base)  # fail fast on a bad --base
    key_source(settings)  # fail fast when --auth has no key, a weak one, or a bad keys file
    if args.metrics_port is not None and not 1 <= args.metrics_port <= 65535:
        raise ValueError(f"--metrics-port must be a port number (1-65535), got {args.metrics_port}")
    local = {} if args.metrics_port is None else {"_metrics_export_port": args.metrics_port}
    lifecycle.init_ray(args.ray_address, **local)
    if args.metrics_port is not None:
        logger.info("Prometheus metrics on http://127.0.0.1:%d/metrics", args.metrics_port)
    try:
        root = resolve_local_root(settings.storage_root, cluster_node_count())  # ValueError on several nodes
        settings = settings.model_copy(update={"storage_root": root})
        lifecycle.start_serve(args.host, args.port)
        serve.run(build_app(settings), name="dreamblend", route_prefix="/")
        logger.info("DreamBlend is serving on http://%s:%d (API docs at /docs and /redoc); "
                    "SIGTERM or Ctrl-C stops it", args.host, args.port)
        lifecycle.wait_for_shutdown()
    finally:
        lifecycle.stop_serve()  # in-flight requests finish within the grace period; Ray stops after
