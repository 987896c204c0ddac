"""Generate the serveConfigV2 of k8s/base/rayservice.yaml from deployments/serve_config.yaml.

    python k8s/render_serve_config.py           # rewrite the block in k8s/base/rayservice.yaml and overlays
    python k8s/render_serve_config.py --check   # exit 1 if a block is stale (what the tests check)

One source of truth: the application (name, route_prefix, import_path, args, deployments) is the
one in deployments/serve_config.yaml. k8s/base/serve_overrides.yaml holds only what differs on
Kubernetes (the proxy listens on 0.0.0.0, s3:// storage, GPUs, replica bounds, auth); it may
change args and deployment options of an application named in the source, never an application's
identity (name, route_prefix, import_path) and never add an application.

An overlay that serves another application configuration (k8s/overlays/sdxl: another base model)
has its own serve_overrides.yaml, applied on top of the base's by the same rules; its RayService
patch (OVERLAY_PATCH) holds the rendered serveConfigV2 between the same markers.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(os.environ.get("DREAMBLEND_SERVE_CONFIG", REPO_ROOT / "deployments" / "serve_config.yaml"))
OVERRIDES = REPO_ROOT / "k8s" / "base" / "serve_overrides.yaml"
RAYSERVICE = REPO_ROOT / "k8s" / "base" / "rayservice.yaml"
OVERLAYS = REPO_ROOT / "k8s" / "overlays"
OVERRIDES_NAME = "serve_overrides.yaml"
OVERLAY_PATCH = "rayservice-serve-config.yaml"  # an overlay's strategic-merge patch with its serveConfigV2
BEGIN = "  # BEGIN serveConfigV2"
END = "  # END serveConfigV2"
KEY_LINE = "  serveConfigV2: |"
INDENT = "    "
IDENTITY = ("name", "route_prefix", "import_path")


def deep_merge(base: Any, override: Any) -> Any:
    """`override` on top of `base`: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def _merge_deployments(app_name: str, deployments: list[dict], overrides: dict) -> list[dict]:
    by_name = {d["name"]: i for i, d in enumerate(deployments)}
    merged = [dict(d) for d in deployments]
    for name, options in overrides.items():
        if not isinstance(options, dict):
            raise ValueError(f"overrides: applications.{app_name}.deployments.{name} must be a mapping")
        if name in by_name:
            merged[by_name[name]] = deep_merge(merged[by_name[name]], options)
        else:
            merged.append({"name": name, **copy.deepcopy(options)})
    return merged


def _override_app(app: dict, overrides: dict) -> dict:
    name = app["name"]
    unknown = set(overrides) - {"args", "deployments", "runtime_env"}
    if unknown & set(IDENTITY):
        raise ValueError(f"overrides: applications.{name} may not change {sorted(unknown & set(IDENTITY))}: "
                         "the application's identity comes from the source config only")
    if unknown:
        raise ValueError(f"overrides: applications.{name} has unknown keys {sorted(unknown)}; "
                         "allowed: args, deployments, runtime_env")
    out = dict(app)
    if "args" in overrides:
        out["args"] = deep_merge(app.get("args") or {}, overrides["args"])
    if "runtime_env" in overrides:
        out["runtime_env"] = deep_merge(app.get("runtime_env") or {}, overrides["runtime_env"])
    if "deployments" in overrides:
        out["deployments"] = _merge_deployments(name, app.get("deployments") or [], overrides["deployments"])
    return out


def render(source: dict, overrides: dict) -> dict:
    """The Kubernetes Serve config: `source` with `overrides` applied (see the module docstring)."""
    apps = source.get("applications")
    if not isinstance(apps, list) or not apps:
        raise ValueError("source config: 'applications' must be a non-empty list")
    app_overrides = overrides.get("applications") or {}
    names = [a.get("name") for a in apps]
    missing = sorted(set(app_overrides) - set(names))
    if missing:
        raise ValueError(f"overrides name applications {missing} that the source config lacks ({names})")
    top = {k: v for k, v in overrides.items() if k != "applications"}
    out = deep_merge({k: v for k, v in source.items() if k != "applications"}, top)
    out["applications"] = [_override_app(a, app_overrides.get(a["name"], {})) for a in apps]
    return out


def render_text(source_path: Path = SOURCE, overrides_path: Path = OVERRIDES, overlay: Path | None = None) -> str:
    """The serveConfigV2 YAML text rendered from the source and the overrides (then the overlay's
    ``serve_overrides.yaml``, when an overlay folder is given)."""
    with open(source_path) as f:
        config = yaml.safe_load(f)
    for path in [overrides_path] + ([overlay / OVERRIDES_NAME] if overlay is not None else []):
        with open(path) as f:
            config = render(config, yaml.safe_load(f) or {})
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def overlay_dirs() -> list[Path]:
    """Overlays with an application configuration of their own (a serve_overrides.yaml)."""
    return sorted(p.parent for p in OVERLAYS.glob(f"*/{OVERRIDES_NAME}"))


def block(config_text: str, overlay: Path | None = None) -> list[str]:
    """The lines between the markers of rayservice.yaml: the key and the indented literal block."""
    sources = ["deployments/serve_config.yaml + k8s/base/serve_overrides.yaml"]
    if overlay is not None:
        sources.append(f"+ k8s/overlays/{overlay.name}/{OVERRIDES_NAME}")
    sources[-1] += ". Do not edit by hand: a test fails on drift."
    header = [f"{BEGIN}: generated by `python k8s/render_serve_config.py` from"]
    header += [f"  # {line}" for line in sources] + [KEY_LINE]
    body = [(INDENT + line).rstrip() for line in config_text.splitlines()]
    return header + body + [END]


def replace_block(manifest_text: str, new_block: list[str]) -> str:
    """`manifest_text` with the lines from BEGIN to END (inclusive) replaced by `new_block`."""
    lines = manifest_text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(BEGIN)]
    ends = [i for i, line in enumerate(lines) if line.startswith(END)]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"a RayService manifest must hold exactly one '{BEGIN.strip()}' ... '{END.strip()}' block")
    return "\n".join(lines[: starts[0]] + new_block + lines[ends[0] + 1:]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="Serve config (default: %(default)s)")
    parser.add_argument("--overrides", type=Path, default=OVERRIDES, help="Kubernetes overrides")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="RayService manifest to update (default: k8s/base/rayservice.yaml and every "
                             f"overlay's {OVERLAY_PATCH})")
    parser.add_argument("--overlay", type=Path, default=None,
                        help=f"with --manifest: also apply this overlay folder's {OVERRIDES_NAME}")
    parser.add_argument("--check", action="store_true", help="only report whether the manifests are stale")
    args = parser.parse_args(argv)
    targets = [(args.manifest, args.overlay)] if args.manifest is not None else \
        [(RAYSERVICE, None)] + [(d / OVERLAY_PATCH, d) for d in overlay_dirs()]
    stale = 0
    for manifest, overlay in targets:
        stale += update(manifest, render_text(args.source, args.overrides, overlay), overlay, args.check)
    return 1 if stale else 0


def update(manifest: Path, config_text: str, overlay: Path | None, check: bool) -> bool:
    """Rewrite (or with ``check`` only compare) one manifest's block; True when it was stale."""
    current = manifest.read_text()
    updated = replace_block(current, block(config_text, overlay))
    if updated == current:
        print(f"{manifest} is up to date")
        return False
    if check:
        print(f"{manifest} is stale: run python k8s/render_serve_config.py", file=sys.stderr)
        return True
    manifest.write_text(updated)
    print(f"wrote serveConfigV2 of {manifest}")
    return False


if __name__ == "__main__":
    sys.exit(main())
