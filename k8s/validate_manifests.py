"""Validate the KubeRay manifests in k8s/ offline, without a cluster.

    python k8s/validate_manifests.py            # k8s/base/*.yaml and every overlay, as built
    python k8s/validate_manifests.py FILE...    # just these

An overlay (k8s/overlays/NAME/kustomization.yaml) is built the way `kubectl kustomize` builds it,
for what the overlays here use: its resources (the base's objects, its own files) with its patches
merged in (strategic-merge patches made of mappings only, matched by kind and name; JSON 6902
patches, a list of add/replace/remove/test operations, applied to their `target`).

ray.io/v1 kinds (RayCluster, RayJob, RayService) are checked against the openAPIV3Schema of the
KubeRay CRDs (../shared/kuberay-crds next to the clone, or $DREAMBLEND_CRDS_DIR), made *strict* the
way `kubectl apply` (server-side field validation "Strict") treats them: an unknown or misspelled
field is an error at any depth ("spec.workerGroupSpecs[0].template.spec.containers[0].imagePullPolicyy:
unknown field"), not silently pruned, except under a node the CRD marks
`x-kubernetes-preserve-unknown-fields`. A CRD may describe the embedded pod templates that way
(free-form) instead of with the full PodSpec schema: those templates are then checked as core
PodTemplates. Core kinds (Secret, ServiceAccount, ...) and the metadata of every object are checked
with the `kubernetes-validate` package (its bundled, offline schemas).

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
BASE_DIR = K8S_DIR / "base"
OVERLAYS_DIR = K8S_DIR / "overlays"
CRDS_ENV = "DREAMBLEND_CRDS_DIR"
DEFAULT_CRDS_DIR = REPO_ROOT.parent / "shared" / "kuberay-crds"
# Oldest Kubernetes minor the manifests target; kubernetes-validate ships schemas from 1.25 on.
K8S_VERSION = "1.30"
RAY_KINDS = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
# YAML files of k8s/base that are not Kubernetes objects.
NOT_OBJECTS = {"kustomization.yaml", "serve_overrides.yaml"}
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def crds_dir() -> Path:
    """The KubeRay CRD directory; FileNotFoundError (never a silent skip) when it is missing."""
    override = os.environ.get(CRDS_ENV)
    path = Path(override) if override else DEFAULT_CRDS_DIR
    missing = [name for name in RAY_KINDS.values() if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"KubeRay CRDs not found: {path} lacks {', '.join(missing)}. Put the ray.io CRD YAMLs "
            f"there (the ray.io_*.yaml of a KubeRay release, kept in ../shared/kuberay-crds next to the "
            f"project's clone) or set {CRDS_ENV}=/path/to/kuberay-crds."
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
    - an object with no `additionalProperties` and no `x-kubernetes-preserve-unknown-fields`
      -> `additionalProperties: false`, whether or not it lists `properties` (the API server prunes
      every field its structural schema does not name; kubectl's strict field validation rejects
      them). Preserving a node does not preserve the named children below it: they stay strict.
    The object's own `metadata` is left open here; `validation_errors` checks it as ObjectMeta.
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
        (out.get("type") == "object" or "properties" in out)
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def schema_at(schema: dict, path: tuple) -> dict | None:
    """The (untranslated) schema node that governs `path` of an instance; None when the path runs
    through fields the schema does not name (kept free-form by `x-kubernetes-preserve-unknown-fields`)."""
    node = schema
    for key in path:
        if isinstance(key, int):
            node = node.get("items")
        elif key in node.get("properties", {}):
            node = node["properties"][key]
        else:
            extra = node.get("additionalProperties")
            node = extra if isinstance(extra, dict) else None
        if node is None:
            return None
    return node


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
def crd_schema(kind: str, version: str = "v1") -> dict:
    """The openAPIV3Schema of one ray.io kind at one CRD version, as the CRD gives it."""
    crd = _crd(kind)
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        raise ValueError(f"{crd['metadata']['name']} has no version {version!r}: {sorted(versions)}")
    return versions[version]["schema"]["openAPIV3Schema"]


def make_validator(crd_schema_: dict) -> jsonschema.protocols.Validator:
    """A strict validator for a CRD's openAPIV3Schema (see `strict_schema`)."""
    schema = strict_schema(copy.deepcopy(crd_schema_))
    # The object's metadata is ObjectMeta, checked by `validation_errors` with the core schemas.
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    cls = _validator_class()
    cls.check_schema(schema)  # the translation must itself be a valid Draft 4 schema
    return cls(schema, format_checker=_format_checker())


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, version: str = "v1") -> jsonschema.protocols.Validator:
    """A strict validator for one ray.io kind at one CRD version (default v1)."""
    return make_validator(crd_schema(kind, version))


def dotted(path) -> str:
    """kubectl's spelling of a field path: spec.workerGroupSpecs[0].template."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _messages(error: jsonschema.ValidationError, path: tuple) -> list[str]:
    """'path: message' lines of one error at `path`; an unknown field is named by its own full path."""
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = error.schema.get("properties", {})
        return [f"{dotted(path + (name,))}: unknown field (not in the schema: the API server would "
                "drop it, `kubectl apply --validate=strict` rejects it)"
                for name in error.instance if name not in known]
    return [f"{dotted(path)}: {error.message}"]


def _core_errors(doc: dict, k8s_version: str, prefix: tuple = (), skip: int = 0) -> list[str]:
    """kubernetes-validate's first error of a core object; its path's first `skip` parts are
    replaced by `prefix` (to report a part of a bigger document at its place there)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return _messages(e, prefix + tuple(e.absolute_path)[skip:])
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def pod_templates(doc: dict) -> list[tuple[tuple, dict]]:
    """(path, template) of every pod template of a ray.io object: head, worker groups, submitter."""
    spec = doc.get("spec") or {}
    cluster_key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[doc["kind"]]
    base = ("spec", cluster_key) if cluster_key else ("spec",)
    cluster = (spec.get(cluster_key) if cluster_key else spec) or {}
    found = [(base + ("headGroupSpec", "template"), (cluster.get("headGroupSpec") or {}).get("template"))]
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        found.append((base + ("workerGroupSpecs", i, "template"), (group or {}).get("template")))
    if doc["kind"] == "RayJob":
        found.append((("spec", "submitterPodTemplate"), spec.get("submitterPodTemplate")))
    return [(path, t) for path, t in found if isinstance(t, dict)]


def _free_form(schema: dict, path: tuple) -> bool:
    """Whether the CRD leaves `path` (or its `spec`) open to any field: the CRD checks nothing there."""
    for node in (schema_at(schema, path), schema_at(schema, path + ("spec",))):
        if node is None or node.get("x-kubernetes-preserve-unknown-fields"):
            return True
    return False


def ray_errors(doc: dict, crd_schema_: dict, k8s_version: str = K8S_VERSION,
               validator: jsonschema.protocols.Validator | None = None) -> list[str]:
    """Violations of a ray.io object against its CRD schema, its free-form pod templates checked as
    core PodTemplates, and its metadata checked as ObjectMeta."""
    validator = validator or make_validator(crd_schema_)
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    lines = [line for e in errors for line in _messages(e, tuple(e.absolute_path))]
    for path, template in pod_templates(doc):
        if _free_form(crd_schema_, path):
            wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            lines += _core_errors(wrapper, k8s_version, prefix=path, skip=1)
    meta_doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})}
    return lines + _core_errors(meta_doc, k8s_version)


def validation_errors(doc: dict, k8s_version: str = K8S_VERSION) -> list[str]:
    """Every schema violation of one manifest document, as 'path: message' lines (empty: valid)."""
    kind, api_version = doc.get("kind"), doc.get("apiVersion", "")
    if not kind or not api_version:
        return ["<root>: apiVersion and kind are required"]
    if api_version.startswith("ray.io/"):
        if kind not in RAY_KINDS:
            return [f"kind: unknown ray.io kind {kind!r}"]
        version = api_version.split("/", 1)[1]
        return ray_errors(doc, crd_schema(kind, version), k8s_version, crd_validator(kind, version))
    return _core_errors(doc, k8s_version)


def kustomization(directory: Path) -> dict:
    with open(directory / "kustomization.yaml") as f:
        return yaml.safe_load(f) or {}


def _patch_files(directory: Path) -> set[str]:
    if not (directory / "kustomization.yaml").is_file():
        return set()
    return {p["path"] for p in kustomization(directory).get("patches") or [] if "path" in p}


def manifest_files(directory: Path = BASE_DIR) -> list[Path]:
    """The Kubernetes object files of a manifest folder: every *.yaml but NOT_OBJECTS and the
    kustomization's patches (partial objects)."""
    skip = NOT_OBJECTS | _patch_files(directory)
    return sorted(p for p in directory.glob("*.yaml") if p.name not in skip)


def merge_patch(doc: dict, patch: Any, where: str = "") -> dict:
    """A strategic-merge patch made of mappings only, applied to a copy of `doc`: mappings merge
    key by key, scalars replace. A list in the patch is refused (kustomize merges lists by their
    patch strategy, which this does not emulate)."""
    if isinstance(patch, list):
        raise ValueError(f"patch {where or '<root>'}: lists are not supported here; use `kubectl kustomize`")
    if not isinstance(patch, dict) or not isinstance(doc, dict):
        return copy.deepcopy(patch)
    out = dict(doc)
    for key, value in patch.items():
        out[key] = merge_patch(doc.get(key, {}), value, f"{where}.{key}" if where else key)
    return out


def _identity(doc: dict) -> tuple:
    return doc.get("kind"), (doc.get("metadata") or {}).get("name")


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _child(node: Any, key: str, path: str) -> Any:
    if isinstance(node, list):
        if not key.isdigit() or int(key) >= len(node):
            raise ValueError(f"JSON patch path {path}: no item {key!r} (the list has {len(node)})")
        return node[int(key)]
    if not isinstance(node, dict) or key not in node:
        raise ValueError(f"JSON patch path {path}: no {key!r}")
    return node[key]


def json_patch(doc: dict, operations: list, where: str = "<patch>") -> dict:
    """RFC 6902 operations (add, replace, remove, test), as kustomize applies them, on a copy of
    `doc`. A path that does not exist (replace, remove, test) or a failed test is a ValueError."""
    out = copy.deepcopy(doc)
    for op in operations:
        kind, path = op.get("op"), op.get("path", "")
        if kind not in ("add", "replace", "remove", "test"):
            raise ValueError(f"{where}: JSON patch op {kind!r} is not supported (add, replace, remove, test)")
        *parents, last = _pointer(path)
        node = out
        for key in parents:
            node = _child(node, key, path)
        if kind == "test":
            if _child(node, last, path) != op.get("value"):
                raise ValueError(f"{where}: test failed at {path}: {_child(node, last, path)!r} != {op.get('value')!r}")
        elif kind == "remove":
            _child(node, last, path)
            del node[int(last) if isinstance(node, list) else last]
        elif kind == "replace":
            _child(node, last, path)
            node[int(last) if isinstance(node, list) else last] = copy.deepcopy(op["value"])
        elif isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
        elif isinstance(node, dict):
            node[last] = copy.deepcopy(op["value"])
        else:
            raise ValueError(f"{where}: JSON patch path {path}: its parent is not an object or a list")
    return out


def _targets(docs: list[dict], target: dict) -> list[int]:
    """Indices of the objects a kustomize patch `target` selects (group, version, kind, name)."""
    def selected(doc: dict) -> bool:
        group, _, version = doc.get("apiVersion", "").rpartition("/")
        wanted = {"group": group, "version": version, "kind": doc.get("kind"),
                  "name": (doc.get("metadata") or {}).get("name")}
        return all(target[key] == value for key, value in wanted.items() if key in target)

    unknown = set(target) - {"group", "version", "kind", "name"}
    if unknown:
        raise ValueError(f"patch target selectors {sorted(unknown)} are not supported here; use `kubectl kustomize`")
    return [i for i, doc in enumerate(docs) if selected(doc)]


def build(directory: Path) -> list[dict]:
    """The objects of a kustomization folder: its resources (folders built recursively, files
    loaded) with its patches applied. ValueError when a patch matches no object."""
    kust = kustomization(directory)
    docs: list[dict] = []
    for resource in kust.get("resources") or []:
        path = (directory / resource).resolve()
        docs += build(path) if path.is_dir() else load_documents(path)
    for entry in kust.get("patches") or []:
        where = f"{directory.name}/{entry['path']}"
        with open(directory / entry["path"]) as f:
            content = yaml.safe_load(f)
        if isinstance(content, list):  # JSON 6902: a list of operations on the target's objects
            matches = _targets(docs, entry.get("target") or {})
            if not entry.get("target") or not matches:
                raise ValueError(f"{where}: a JSON 6902 patch needs a target that selects an object")
            for i in matches:
                docs[i] = json_patch(docs[i], content, where)
            continue
        for patch in load_documents(directory / entry["path"]):
            matches = [i for i, d in enumerate(docs) if _identity(d) == _identity(patch)]
            if not matches:
                raise ValueError(f"{where}: no {_identity(patch)} among the resources")
            for i in matches:
                docs[i] = merge_patch(docs[i], patch)
    return docs


def overlay_dirs() -> list[Path]:
    return sorted(p.parent for p in OVERLAYS_DIR.glob("*/kustomization.yaml"))


def _report(name: str, doc: dict) -> bool:
    errors = validation_errors(doc)
    print(f"{'FAIL' if errors else 'ok  '} {name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}")
    for line in errors:
        print(f"     {line}")
    return bool(errors)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    named = [(p.name, doc) for p in map(Path, args) for doc in load_documents(p)]
    if not args:
        named = [(p.name, doc) for p in manifest_files() for doc in load_documents(p)]
        for d in overlay_dirs():
            named += [(f"overlays/{d.name}", doc) for doc in build(d)]
            listed = set(kustomization(d).get("resources") or [])  # + examples kept beside it
            named += [(f"overlays/{d.name}/{p.name}", doc) for p in manifest_files(d) if p.name not in listed
                      for doc in load_documents(p)]
    failed = 0
    try:
        for name, doc in named:
            failed += _report(name, doc)
    except FileNotFoundError as exc:  # no CRDs: say so in one line, no traceback
        print(exc, file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
