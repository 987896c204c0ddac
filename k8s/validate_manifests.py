"""Validate the KubeRay manifests in k8s/ offline, without a cluster.

    python k8s/validate_manifests.py            # every k8s/*.yaml
    python k8s/validate_manifests.py FILE...    # just these

ray.io/v1 kinds (RayCluster, RayJob, RayService) are checked against the openAPIV3Schema of the
KubeRay CRDs (../shared/kuberay-crds next to the clone, or $DREAMBLEND_CRDS_DIR), made *strict* the
way `kubectl apply` (server-side field validation "Strict") treats them: an unknown or misspelled
field is an error, not silently pruned. Core kinds (Secret, ServiceAccount, ...) and the metadata of
every object are checked with the `kubernetes-validate` package (its bundled, offline schemas).

Not checked: the CEL rules (`x-kubernetes-validations`) of the CRDs, and anything only the operator
or the API server decides at admission (quotas, immutability, name collisions).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = REPO_ROOT / "k8s"
CRDS_ENV = "DREAMBLEND_CRDS_DIR"
# Oldest Kubernetes minor the manifests target; kubernetes-validate ships schemas from 1.25 on.
K8S_VERSION = "1.30"
RAY_KINDS = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
# YAML files of k8s/ that are not Kubernetes objects.
NOT_OBJECTS = {"kustomization.yaml", "serve_overrides.yaml"}
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def crds_dir() -> Path:
    """The KubeRay CRD directory; FileNotFoundError (never a silent skip) when it is missing."""
    override = os.environ.get(CRDS_ENV)
    path = Path(override) if override else REPO_ROOT.parent / "shared" / "kuberay-crds"
    missing = [name for name in RAY_KINDS.values() if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"KubeRay CRDs not found: {path} lacks {', '.join(missing)}. Put the ray.io CRD YAMLs "
            f"there (they live in ../shared/kuberay-crds next to the clone) or set {CRDS_ENV}."
        )
    return path


def load_documents(path: Path) -> list[dict]:
    """All non-empty YAML documents of a manifest file."""
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: document {i} is a {type(doc).__name__}, not a mapping")
    return docs


def strict_schema(node: Any) -> Any:
    """Translate a CRD structural schema (OpenAPI v3 + x-kubernetes-*) into plain JSON Schema.

    - `x-kubernetes-int-or-string: true` -> anyOf integer/string (when controller-gen left it out);
    - `nullable: true` -> the type also admits null;
    - `x-kubernetes-list-type: set` -> uniqueItems;
    - an object with `properties`, no `additionalProperties` and no
      `x-kubernetes-preserve-unknown-fields` -> `additionalProperties: false` (unknown fields fail,
      as with kubectl's default strict field validation instead of being pruned).
    `x-kubernetes-list-map-keys` is enforced by a custom keyword (see `_validator_class`).
    """
    if isinstance(node, list):
        return [strict_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator, keys, instance, schema) -> Iterator[jsonschema.ValidationError]:
    """`x-kubernetes-list-type: map`: no two items may share the values of the key fields."""
    if not validator.is_type(instance, "array"):
        return
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(
                f"items {seen[key]} and {i} share the list-map key(s) {keys}: "
                f"{[item.get(k) for k in keys]}"
            )
        seen.setdefault(key, i)


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()
    for name, (low, high) in _INT_RANGES.items():
        checker.checks(name)(
            functools.partial(
                lambda value, low, high: not isinstance(value, int)
                or isinstance(value, bool)
                or low <= value <= high,
                low=low,
                high=high,
            )
        )
    return checker


@functools.lru_cache(maxsize=1)
def _validator_class():
    # Structural schemas are OpenAPI 3.0 schema objects: Draft 4 semantics (boolean exclusive
    # bounds, no $schema). Draft 4 also accepts the `type: [t, "null"]` lists made above.
    return jsonschema.validators.extend(
        jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
    )


@functools.lru_cache(maxsize=None)
def _crd(kind: str) -> dict:
    if kind not in RAY_KINDS:
        raise ValueError(f"kind must be one of {sorted(RAY_KINDS)}, got {kind!r}")
    with open(crds_dir() / RAY_KINDS[kind]) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, version: str = "v1") -> jsonschema.protocols.Validator:
    """A strict validator for one ray.io kind at one CRD version (default v1)."""
    crd = _crd(kind)
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        raise ValueError(f"{crd['metadata']['name']} has no version {version!r}: {sorted(versions)}")
    schema = strict_schema(copy.deepcopy(versions[version]["schema"]["openAPIV3Schema"]))
    cls = _validator_class()
    cls.check_schema(schema)  # the translation must itself be a valid Draft 4 schema
    return cls(schema, format_checker=_format_checker())


def _path(error: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "<root>"


def _core_errors(doc: dict, k8s_version: str) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_path(e)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def validation_errors(doc: dict, k8s_version: str = K8S_VERSION) -> list[str]:
    """Every schema violation of one manifest document, as 'path: message' lines (empty: valid)."""
    kind, api_version = doc.get("kind"), doc.get("apiVersion", "")
    if not kind or not api_version:
        return ["<root>: apiVersion and kind are required"]
    if api_version.startswith("ray.io/"):
        if kind not in RAY_KINDS:
            return [f"kind: unknown ray.io kind {kind!r}"]
        validator = crd_validator(kind, api_version.split("/", 1)[1])
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        lines = [f"{_path(e)}: {e.message}" for e in errors]
        # The CRD leaves metadata free-form; check it as Kubernetes ObjectMeta.
        meta_doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})}
        return lines + _core_errors(meta_doc, k8s_version)
    return _core_errors(doc, k8s_version)


def manifest_files(directory: Path = K8S_DIR) -> list[Path]:
    """The Kubernetes object files of k8s/ (every *.yaml but NOT_OBJECTS)."""
    return sorted(p for p in directory.glob("*.yaml") if p.name not in NOT_OBJECTS)


def main(argv: list[str] | None = None) -> int:
    paths = [Path(a) for a in (argv if argv is not None else sys.argv[1:])] or manifest_files()
    failed = 0
    for path in paths:
        for doc in load_documents(path):
            name = f"{path.name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            errors = validation_errors(doc)
            failed += bool(errors)
            print(f"{'FAIL' if errors else 'ok  '} {name}")
            for line in errors:
                print(f"     {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
