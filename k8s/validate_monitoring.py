"""Validate the monitoring objects of k8s/monitoring/ offline, without a cluster or a Prometheus.

    python k8s/validate_monitoring.py       # k8s/monitoring/, as `kubectl kustomize` builds it

What is checked (tests/test_monitoring.py runs the same checks, and their negative cases):

- the objects: the kustomization's resources and its configMapGenerator's ConfigMap (label
  `grafana_dashboard: "1"`, the sidecar's convention). PodMonitor and PrometheusRule against the
  vendored JSON Schemas of k8s/monitoring/schemas/, strict subsets of the prometheus-operator CRDs
  (each names the upstream version): an unknown or misspelled field is an error at any level the
  subset describes. Their metadata, and the ConfigMap, with kubernetes-validate's bundled schemas;
- the PodMonitor scrapes the port named `metrics` of pods whose templates in k8s/base carry every
  label it selects, and every head and worker container there declares that port;
- every PromQL expression (alert rules, dashboard targets, the dashboard's variable queries) parses
  with `promql-parser`, and every metric it names is one the service exports
  (`dreamblend_ray.observability.catalog.exported_series()`) or one of RAY_METRICS below; a matcher
  on a label with fixed values (state, reason, outcome, part, ...) names only the catalog's values;
- every alert has `for`, a `severity` label, `summary` and `description` annotations and a
  `runbook_url` into docs/operations.md whose anchor exists there;
- the Grafana dashboard: loads, a `datasource` variable of type datasource (prometheus), the rows
  Ingress, Model replica, Training, Storage, Webhooks; unique panel ids; every panel has a gridPos
  inside the 24-column grid that overlaps no other; every panel and target uses the `${datasource}`
  variable; every target has an `expr`; every catalog metric is queried by at least one panel (a new
  metric needs a panel); the guided share (GUIDED_SHARE) is on it.
Not checked: what Prometheus or Grafana decide at run time (that a series has data, label names).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = REPO_ROOT / "k8s"
MONITORING_DIR = K8S_DIR / "monitoring"
SCHEMAS_DIR = MONITORING_DIR / "schemas"
BASE_DIR = K8S_DIR / "base"
DASHBOARD = MONITORING_DIR / "grafana-dashboard.json"
OPERATIONS_DOC = REPO_ROOT / "docs" / "operations.md"
SCHEMAS = {"PodMonitor": "podmonitor.schema.json", "PrometheusRule": "prometheusrule.schema.json"}
METRICS_PORT = "metrics"
DASHBOARD_LABEL = {"grafana_dashboard": "1"}
# Metrics that Ray, Ray Serve or Prometheus export themselves, which the rules or panels may name
# besides the catalog's. Keep it short: every name here is a promise about someone else's export.
RAY_METRICS = {
    "ray_serve_deployment_replica_healthy",  # Ray Serve: 1 per healthy replica, 0 per unhealthy one
    "up",  # Prometheus: 1 per target scraped, 0 when the scrape failed
}
ROWS = ("Ingress", "Model replica", "Training", "Storage", "Webhooks")
SEVERITIES = ("critical", "warning", "info")
GRID_WIDTH = 24
DATASOURCE_UID = "${datasource}"
GUIDED_SHARE = ('sum(rate(ray_dreamblend_denoise_seconds_total{part="guidance"}[5m])) / '
                'sum(rate(ray_dreamblend_denoise_seconds_total[5m]))')
# Grafana's variables, replaced before parsing: a range or step variable by a duration, any other
# by a plain word (they stand inside label matchers' strings here).
_DURATION_VARS = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")
_OTHER_VARS = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_:]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[A-Za-z_][A-Za-z0-9_]*\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<expr>.+?)\s*,\s*)?(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")


def _load_module(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _vm():
    """k8s/validate_manifests.py (its error formatting and core-kind checks; no CRDs needed)."""
    return _load_module("dreamblend_k8s_validate", K8S_DIR / "validate_manifests.py")


def catalog():
    if str(REPO_ROOT) not in sys.path:  # run as a script from a clone that is not installed
        sys.path.insert(0, str(REPO_ROOT))
    from dreamblend_ray.observability import catalog as module

    return module


# --------------------------------------------------------------------------------------------
# objects

def build(directory: Path = MONITORING_DIR) -> list[dict]:
    """The objects `kubectl kustomize` makes of the folder: its resources, its configMapGenerator's
    ConfigMaps (files, options.labels; disableNameSuffixHash must be set: a hash suffix is not
    emulated here) and its `labels` on every object's metadata."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    unknown = set(kust) - {"apiVersion", "kind", "resources", "labels", "configMapGenerator"}
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml: {sorted(unknown)} not emulated here; use `kubectl kustomize`")
    docs = [doc for resource in kust.get("resources") or [] for doc in _vm().load_documents(directory / resource)]
    for gen in kust.get("configMapGenerator") or []:
        options = gen.get("options") or {}
        if not options.get("disableNameSuffixHash"):
            raise ValueError(f"configMapGenerator {gen.get('name')}: set options.disableNameSuffixHash (the "
                             "name is emulated without kustomize's hash suffix)")
        data = {}
        for entry in gen.get("files") or []:
            key, _, path = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
            data[key] = (directory / path).read_text()
        meta = {"name": gen["name"]}
        if options.get("labels"):
            meta["labels"] = dict(options["labels"])
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for entry in kust.get("labels") or []:
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(entry.get("pairs") or {})
    return docs


@functools.lru_cache(maxsize=None)
def schema(kind: str) -> dict:
    return json.loads((SCHEMAS_DIR / SCHEMAS[kind]).read_text())


@functools.lru_cache(maxsize=None)
def _validator(kind: str) -> jsonschema.protocols.Validator:
    cls = jsonschema.Draft4Validator
    cls.check_schema(schema(kind))
    return cls(schema(kind))


def object_errors(doc: dict) -> list[str]:
    """Schema violations of one monitoring object, as 'path: message' lines (empty: valid)."""
    vm = _vm()
    kind = doc.get("kind")
    if kind in SCHEMAS:
        errors = sorted(_validator(kind).iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
        lines = [line for e in errors for line in vm._messages(e, tuple(e.absolute_path))]
        meta_doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})}
        return lines + vm._core_errors(meta_doc, vm.K8S_VERSION)
    if doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
        return [f"kind: {kind!r} has no vendored schema in {SCHEMAS_DIR.relative_to(REPO_ROOT)}"]
    return vm._core_errors(doc, vm.K8S_VERSION)


def _pod_templates() -> list[tuple[str, dict]]:
    vm = _vm()
    found = []
    for path in vm.manifest_files(BASE_DIR):
        for doc in vm.load_documents(path):
            if doc.get("apiVersion", "").startswith("ray.io/"):
                found += [(f"{path.name}: {vm.dotted(where)}", t) for where, t in vm.pod_templates(doc)
                          if where[-1] != "submitterPodTemplate"]
    return found


def podmonitor_errors(doc: dict, templates: list[tuple[str, dict]] | None = None) -> list[str]:
    """The PodMonitor scrapes the `metrics` port, and the Ray pod templates of k8s/base carry the
    labels it selects (those KubeRay sets itself aside) and declare that port on every container."""
    spec = doc.get("spec") or {}
    endpoints = spec.get("podMetricsEndpoints") or []
    lines = []
    if not any(e.get("port") == METRICS_PORT for e in endpoints):
        lines.append(f"spec.podMetricsEndpoints: no endpoint scrapes the port named {METRICS_PORT!r}")
    wanted = {k: v for k, v in ((spec.get("selector") or {}).get("matchLabels") or {}).items()
              if not k.startswith("ray.io/")}  # KubeRay's own labels: on every Ray pod it makes
    for where, template in templates if templates is not None else _pod_templates():
        labels = (template.get("metadata") or {}).get("labels") or {}
        missing = {k: v for k, v in wanted.items() if labels.get(k) != v}
        if missing:
            lines.append(f"{where}: the pod template lacks the label(s) the PodMonitor selects: {missing}")
        for i, c in enumerate((template.get("spec") or {}).get("containers") or []):
            if not any(p.get("name") == METRICS_PORT for p in c.get("ports") or []):
                lines.append(f"{where}.spec.containers[{i}] ({c.get('name')}): no container port named {METRICS_PORT!r}")
    return lines


# --------------------------------------------------------------------------------------------
# PromQL

def known_metrics() -> set[str]:
    return catalog().exported_series() | RAY_METRICS


def grafana_to_promql(expr: str) -> str:
    """A Grafana target's query with its variables replaced, so that a PromQL parser reads it."""
    return _OTHER_VARS.sub("grafana_var", _DURATION_VARS.sub("5m", expr))


def _children(node: Any) -> Iterator[Any]:
    import promql_parser as pp

    if isinstance(node, pp.BinaryExpr):
        yield from (node.lhs, node.rhs)
    elif isinstance(node, pp.AggregateExpr):
        yield node.expr
        if node.param is not None:
            yield node.param
    elif isinstance(node, pp.Call):
        yield from node.args
    elif isinstance(node, (pp.ParenExpr, pp.UnaryExpr, pp.SubqueryExpr)):
        yield node.expr
    elif isinstance(node, pp.MatrixSelector):
        yield node.vector_selector


# The catalog's fixed label values (catalog constants), per label and, where a label's values depend
# on the metric, per metric. A matcher on one of these labels must name values from the list.
_LABEL_VALUE_LISTS = {"batching": "BATCHINGS", "kind": "TRAINING_KINDS", "state": "TRAINING_STATES",
                      "outcome": "WEBHOOK_OUTCOMES", "part": "STEP_PARTS", "result": "CACHE_RESULTS"}
_METRIC_LABEL_VALUE_LISTS = {("dreamblend_http_rejections", "reason"): "REJECT_REASONS",
                             ("dreamblend_training_failures", "reason"): "TRAINING_FAILURES"}


def label_values(metric: str, label: str) -> tuple[str, ...] | None:
    """The values the catalog allows for `label` of exported series `metric`; None when not fixed."""
    module = catalog()
    spec = next((s for s in module.CATALOG if metric in s.series()), None)
    if spec is None or label not in spec.labels:
        return None
    name = _METRIC_LABEL_VALUE_LISTS.get((spec.name, label)) or _LABEL_VALUE_LISTS.get(label)
    if not name:
        return None
    return tuple(getattr(module, name, ())) or None


def _selectors(tree: Any) -> Iterator[Any]:
    import promql_parser as pp

    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, pp.VectorSelector):
            yield node
        else:
            todo.extend(_children(node))


def label_value_errors(expr: str) -> list[str]:
    """Matchers naming a value the catalog does not have for that metric's label (`outcome="failed"`
    where the outcomes are delivered, retried, dead). A regex matcher is checked when it is a plain
    alternation (`a|b`)."""
    import promql_parser as pp

    lines = []
    for node in _selectors(pp.parse(expr)):
        if not node.name:
            continue
        for m in node.matchers.matchers:
            allowed = label_values(node.name, m.name)
            if allowed is None:
                continue
            regex = m.op not in (pp.MatchOp.Equal, pp.MatchOp.NotEqual)
            if regex and not re.fullmatch(r"[A-Za-z0-9_]+(\|[A-Za-z0-9_]+)*", m.value):
                continue
            values = m.value.split("|") if regex else [m.value]
            bad = [v for v in values if v not in allowed]
            if bad:
                lines.append(f"{node.name}{{{m.name}}}: {bad} not among the catalog's values {list(allowed)}")
    return lines


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (by name or by a `__name__="..."` matcher).
    ValueError with the parser's message when it does not parse; a selector without a fixed name
    (`{__name__=~"..."}`) is a ValueError too: its metrics could not be checked."""
    import promql_parser as pp

    try:
        tree = pp.parse(expr)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"PromQL does not parse: {e}") from None
    names, todo = set(), [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, pp.VectorSelector):
            if node.name:
                names.add(node.name)
                continue
            fixed = [m.value for m in node.matchers.matchers if m.name == "__name__" and m.op == pp.MatchOp.Equal]
            if not fixed:
                raise ValueError(f"a selector without a metric name cannot be checked: {node}")
            names.update(fixed)
        else:
            todo.extend(_children(node))
    return names


def promql_errors(expr: Any, where: str, known: set[str] | None = None, grafana: bool = False) -> list[str]:
    """'where: ...' lines for an expression that does not parse or names a metric not exported."""
    if not isinstance(expr, str) or not expr.strip():
        return [f"{where}: no PromQL expression"]
    try:
        names = metric_names(grafana_to_promql(expr) if grafana else expr)
    except ValueError as e:
        return [f"{where}: {e}: {' '.join(expr.split())}"]
    unknown = sorted(names - (known if known is not None else known_metrics()))
    return [f"{where}: {name}: no such metric (not in dreamblend_ray/observability/catalog.py's exported "
            f"series nor in the validator's RAY_METRICS)" for name in unknown] + \
        [f"{where}: {line}" for line in label_value_errors(grafana_to_promql(expr) if grafana else expr)]


# --------------------------------------------------------------------------------------------
# alert rules

def doc_anchors(path: Path = OPERATIONS_DOC) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces to -)."""
    anchors = set()
    for line in path.read_text().splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def rule_errors(doc: dict, known: set[str] | None = None, anchors: set[str] | None = None) -> list[str]:
    """The PrometheusRule's expressions and the completeness of its alerts."""
    anchors = anchors if anchors is not None else doc_anchors()
    lines, groups = [], [g.get("name") for g in (doc.get("spec") or {}).get("groups") or []]
    if len(groups) != len(set(groups)):
        lines.append(f"spec.groups: group names repeat: {groups}")
    alerts = []
    for gi, group in enumerate((doc.get("spec") or {}).get("groups") or []):
        for ri, rule in enumerate(group.get("rules") or []):
            where = f"spec.groups[{gi}].rules[{ri}]"
            name = rule.get("alert") or rule.get("record")
            lines += promql_errors(rule.get("expr"), f"{where} ({name}).expr", known)
            if "alert" not in rule:
                continue
            alerts.append(rule["alert"])
            if not rule.get("for"):
                lines.append(f"{where} ({name}): no `for` (an alert must hold a while before it fires)")
            if (rule.get("labels") or {}).get("severity") not in SEVERITIES:
                lines.append(f"{where} ({name}): labels.severity must be one of {SEVERITIES}")
            notes = rule.get("annotations") or {}
            for key in ("summary", "description", "runbook_url"):
                if not notes.get(key):
                    lines.append(f"{where} ({name}): no annotations.{key}")
            runbook = notes.get("runbook_url") or ""
            if runbook:
                page, _, anchor = runbook.partition("#")
                if not page.endswith("docs/operations.md") or anchor not in anchors:
                    lines.append(f"{where} ({name}): annotations.runbook_url {runbook!r} is no heading of "
                                 "docs/operations.md")
    if len(alerts) != len(set(alerts)):
        lines.append(f"spec.groups: alert names repeat: {sorted(alerts)}")
    return lines


# --------------------------------------------------------------------------------------------
# the dashboard

def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' collapsed panels included, in order."""
    out = []
    for panel in dashboard.get("panels") or []:
        out.append(panel)
        out += panel.get("panels") or []
    return out


def _uses_datasource_variable(ds: Any) -> bool:
    if isinstance(ds, str):
        return ds in (DATASOURCE_UID, "$datasource")
    return isinstance(ds, dict) and ds.get("uid") in (DATASOURCE_UID, "$datasource") and ds.get("type") in (None, "prometheus")


def _grid_errors(panels: list[dict]) -> list[str]:
    lines, cells = [], {}
    for p in panels:
        where = f"panel {p.get('id')} ({p.get('title')!r})"
        pos = p.get("gridPos")
        if not isinstance(pos, dict) or not all(isinstance(pos.get(k), int) and not isinstance(pos.get(k), bool)
                                                 for k in "hwxy"):
            lines.append(f"{where}: no gridPos with integer h, w, x, y")
            continue
        if pos["h"] < 1 or pos["w"] < 1 or pos["x"] < 0 or pos["y"] < 0 or pos["x"] + pos["w"] > GRID_WIDTH:
            lines.append(f"{where}: gridPos {pos} is outside the {GRID_WIDTH}-column grid")
            continue
        if p.get("type") == "row" and p.get("collapsed"):
            continue  # its panels are laid out when it opens
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                if (x, y) in cells:
                    lines.append(f"{where}: overlaps panel {cells[(x, y)]} at x={x}, y={y}")
                    break
                cells[(x, y)] = p.get("id")
            else:
                continue
            break
    return lines


def dashboard_errors(dashboard: Any, metrics: Iterable | None = None, known: set[str] | None = None) -> list[str]:
    """Everything wrong with a Grafana dashboard model; `metrics`: the catalog's MetricSpecs that must
    each be queried by a panel (default: the whole catalog)."""
    if not isinstance(dashboard, dict):
        return ["<root>: the dashboard is not a JSON object"]
    lines = []
    for key in ("title", "uid", "panels", "templating", "schemaVersion"):
        if key not in dashboard:
            lines.append(f"<root>: no {key!r}")
    if not isinstance(dashboard.get("schemaVersion"), int) or dashboard.get("schemaVersion", 0) < 36:
        lines.append("schemaVersion: an integer >= 36 (Grafana 9+) expected")
    variables = {v.get("name"): v for v in (dashboard.get("templating") or {}).get("list") or []}
    ds = variables.get("datasource") or {}
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        lines.append("templating: no `datasource` variable of type datasource for prometheus")
    for name, var in variables.items():
        if var.get("type") != "query":
            continue
        if not _uses_datasource_variable(var.get("datasource")):
            lines.append(f"templating.{name}: its datasource is not ${{datasource}}")
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        m = _LABEL_VALUES.match(query or "")
        expr = m.group("expr") if m else query
        if expr:
            lines += promql_errors(expr, f"templating.{name}.query", known, grafana=True)

    panels = all_panels(dashboard)
    ids = [p.get("id") for p in panels]
    repeated = sorted({i for i in ids if ids.count(i) > 1}, key=str)
    if repeated or any(not isinstance(i, int) for i in ids):
        lines.append(f"panels: ids must be unique integers; repeated or missing: {repeated or [i for i in ids if not isinstance(i, int)]}")
    lines += _grid_errors(panels)
    rows = [p.get("title") for p in panels if p.get("type") == "row"]
    missing_rows = [r for r in ROWS if r not in rows]
    if missing_rows:
        lines.append(f"panels: no row panel(s) {missing_rows}")

    exprs = []
    for p in panels:
        if p.get("type") == "row":
            continue
        where = f"panel {p.get('id')} ({p.get('title')!r})"
        if not _uses_datasource_variable(p.get("datasource")):
            lines.append(f"{where}: datasource is not the ${{datasource}} variable")
        targets = p.get("targets") or []
        if not targets:
            lines.append(f"{where}: no targets")
        for t in targets:
            twhere = f"{where} target {t.get('refId')}"
            if not _uses_datasource_variable(t.get("datasource")):
                lines.append(f"{twhere}: datasource is not the ${{datasource}} variable")
            if "expr" not in t:
                lines.append(f"{twhere}: no expr")
                continue
            lines += promql_errors(t["expr"], twhere, known, grafana=True)
            exprs.append(t["expr"])

    used = set()
    for expr in exprs:
        try:
            used |= metric_names(grafana_to_promql(expr))
        except ValueError:
            pass  # reported above
    for spec in metrics if metrics is not None else catalog().CATALOG:
        if not used & set(spec.series()):
            lines.append(f"{spec.exported}: no panel queries it (every catalog metric needs a panel)")
    if not any(" ".join(e.split()) == GUIDED_SHARE for e in exprs):
        lines.append(f"panels: the guided share query is missing: {GUIDED_SHARE}")
    return lines


def load_dashboard(path: Path = DASHBOARD) -> dict:
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------

def all_errors(directory: Path = MONITORING_DIR) -> list[tuple[str, list[str]]]:
    """(name, errors) of every monitoring object and of the dashboard."""
    out = []
    for doc in build(directory):
        kind = doc.get("kind")
        errors = object_errors(doc)
        if kind == "PodMonitor":
            errors += podmonitor_errors(doc)
        elif kind == "PrometheusRule":
            errors += rule_errors(doc)
        elif kind == "ConfigMap" and DASHBOARD.name in (doc.get("data") or {}):
            labels = (doc.get("metadata") or {}).get("labels") or {}
            if any(labels.get(k) != v for k, v in DASHBOARD_LABEL.items()):
                errors.append(f"metadata.labels: the Grafana sidecar finds dashboards by {DASHBOARD_LABEL}")
        out.append((f"{kind}/{(doc.get('metadata') or {}).get('name')}", errors))
    try:
        dashboard = json.loads((directory / DASHBOARD.name).read_text())
    except (OSError, json.JSONDecodeError) as e:
        out.append((DASHBOARD.name, [f"does not load: {e}"]))
    else:
        out.append((DASHBOARD.name, dashboard_errors(dashboard)))
    return out


def main(argv: list[str] | None = None) -> int:
    failed = 0
    for name, errors in all_errors():
        print(f"{'FAIL' if errors else 'ok  '} monitoring: {name}")
        for line in errors:
            print(f"     {line}")
        failed += bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
