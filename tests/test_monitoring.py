"""The operator's monitoring artifacts of k8s/monitoring/, validated offline (issue 30).

- the PodMonitor and the PrometheusRule validate strictly against the vendored schema subsets of the
  prometheus-operator CRDs; the dashboard's ConfigMap carries the Grafana sidecar's label; the
  PodMonitor finds the `metrics` port on every Ray pod template of k8s/base;
- every PromQL expression (rules, dashboard targets and variables) parses and names only exported
  metrics, and only the catalog's values of fixed labels (state, reason, outcome, ...); every alert
  is complete; the dashboard is well formed, queries every catalog metric and
  shows the guided share; its JSON is what render_dashboard.py renders;
- docs/operations.md lists every catalog metric;
- negative cases: an unknown metric in a panel, a misspelled PodMonitor field, a PromQL syntax error,
  an unknown label value, a catalog metric without a panel, an incomplete alert are each reported.
No KubeRay CRDs are needed (a plain clone runs all of it); the `kubectl kustomize` comparison runs
where kubectl is installed.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dreamblend_ray.observability import catalog
from test_k8s import _load_module  # tests/ is on sys.path: the one loader of the k8s/ scripts

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "k8s" / "monitoring"


vmon = _load_module("dreamblend_k8s_validate_monitoring", REPO / "k8s" / "validate_monitoring.py")
render = _load_module("dreamblend_k8s_render_dashboard", MONITORING / "render_dashboard.py")


@pytest.fixture(scope="module")
def objects() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in vmon.build()}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return vmon.load_dashboard()


def test_everything_validates():
    results = vmon.all_errors()
    assert [name for name, _ in results] == ["PodMonitor/dreamblend-ray", "PrometheusRule/dreamblend-ray",
                                             "ConfigMap/dreamblend-grafana-dashboard", "grafana-dashboard.json"]
    assert {name: errors for name, errors in results if errors} == {}
    assert vmon.main([]) == 0


def test_monitoring_stays_out_of_the_base():
    base = yaml.safe_load((REPO / "k8s" / "base" / "kustomization.yaml").read_text())
    assert not any("monitoring" in r for r in base["resources"])


def test_podmonitor_scrapes_the_metrics_port_of_the_projects_ray_pods(objects):
    pm = objects["PodMonitor"]
    assert vmon.object_errors(pm) == [] and vmon.podmonitor_errors(pm) == []
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/part-of": "dreamblend-ray",
                                                     "ray.io/is-ray-node": "yes"}
    templates = vmon._pod_templates()
    assert len(templates) == 8  # raycluster 3, rayservice 3, rayjob 2 (head and worker groups)
    for where, template in templates:
        for c in template["spec"]["containers"]:
            assert {"containerPort": 8080, "name": "metrics"} in c["ports"], where


def test_podmonitor_with_a_misspelled_field_is_reported(objects):
    pm = copy.deepcopy(objects["PodMonitor"])
    pm["spec"]["podMetricsEndpoints"][0]["intervall"] = pm["spec"]["podMetricsEndpoints"][0].pop("interval")
    assert vmon.object_errors(pm) == [
        "spec.podMetricsEndpoints[0].intervall: unknown field (not in the schema: the API server would drop it, "
        "`kubectl apply --validate=strict` rejects it)"]
    pm = copy.deepcopy(objects["PodMonitor"])
    pm["spec"]["podMetricEndpoints"] = pm["spec"].pop("podMetricsEndpoints")
    assert any(line.startswith("spec.podMetricEndpoints: unknown field") for line in vmon.object_errors(pm))
    pm = copy.deepcopy(objects["PodMonitor"])
    pm["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    assert any("spec.podMetricsEndpoints[0].interval" in line and "does not match" in line
               for line in vmon.object_errors(pm))
    pm["spec"]["podMetricsEndpoints"][0]["port"] = "http"
    assert "no endpoint scrapes the port named 'metrics'" in " ".join(vmon.podmonitor_errors(pm))


def test_a_pod_template_without_the_label_or_port_is_reported(objects):
    template = {"metadata": {"labels": {}}, "spec": {"containers": [{"name": "ray-worker", "ports": []}]}}
    errors = vmon.podmonitor_errors(objects["PodMonitor"], [("x.yaml: spec.template", template)])
    assert errors == [
        "x.yaml: spec.template: the pod template lacks the label(s) the PodMonitor selects: "
        "{'app.kubernetes.io/part-of': 'dreamblend-ray'}",
        "x.yaml: spec.template.spec.containers[0] (ray-worker): no container port named 'metrics'"]


def test_prometheusrule_has_the_issues_alerts(objects):
    rule = objects["PrometheusRule"]
    assert vmon.object_errors(rule) == [] and vmon.rule_errors(rule) == []
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    names = {name: vmon.metric_names(r["expr"]) for name, r in alerts.items()}
    assert names["DreamblendGenerateLatencyHigh"] == {"ray_dreamblend_http_request_seconds_bucket"}
    assert "histogram_quantile(0.95" in alerts["DreamblendGenerateLatencyHigh"]["expr"]
    assert names["DreamblendQueueDepthHigh"] == {"ray_dreamblend_queue_depth"}
    assert names["DreamblendTrainingFailureRateHigh"] == {"ray_dreamblend_training_failures_total",
                                                          "ray_dreamblend_trainings_total"}
    assert names["DreamblendServeReplicasUnhealthy"] == {"ray_serve_deployment_replica_healthy"}
    for r in alerts.values():
        assert r["annotations"]["runbook_url"].startswith("docs/operations.md#")


def test_incomplete_alerts_and_misspelled_rule_fields_are_reported(objects):
    rule = copy.deepcopy(objects["PrometheusRule"])
    first = rule["spec"]["groups"][0]["rules"][0]
    del first["for"], first["annotations"]["summary"]
    first["labels"]["severity"] = "page"
    first["annotations"]["runbook_url"] = "docs/operations.md#no-such-heading"
    errors = vmon.rule_errors(rule)
    where = "spec.groups[0].rules[0] (DreamblendGenerateLatencyHigh)"
    assert f"{where}: no `for` (an alert must hold a while before it fires)" in errors
    assert f"{where}: no annotations.summary" in errors
    assert f"{where}: labels.severity must be one of ('critical', 'warning', 'info')" in errors
    assert any(line.startswith(f"{where}: annotations.runbook_url") for line in errors)
    first["fore"] = "10m"
    assert any(line.startswith("spec.groups[0].rules[0].fore: unknown field") for line in vmon.object_errors(rule))


def test_invalid_promql_is_reported(objects):
    assert vmon.promql_errors("sum(rate(ray_dreamblend_http_requests_total[5m])", "rule")[0].startswith(
        "rule: PromQL does not parse: ")
    assert vmon.promql_errors("rate(ray_dreamblend_http_requests_total)", "rule")[0].startswith(
        "rule: PromQL does not parse: ")  # a range vector is needed
    rule = copy.deepcopy(objects["PrometheusRule"])
    rule["spec"]["groups"][1]["rules"][0]["expr"] = "max by (family (ray_dreamblend_queue_depth) > 32"
    errors = vmon.rule_errors(rule)
    assert len(errors) == 1 and errors[0].startswith(
        "spec.groups[1].rules[0] (DreamblendQueueDepthHigh).expr: PromQL does not parse")


def test_a_label_value_the_catalog_does_not_have_is_reported():
    outcomes = list(catalog.WEBHOOK_OUTCOMES)
    assert vmon.promql_errors('sum(rate(ray_dreamblend_webhook_deliveries_total{outcome="gave_up"}[5m]))', "rule") == [
        f"rule: ray_dreamblend_webhook_deliveries_total{{outcome}}: ['gave_up'] not among the catalog's values {outcomes}"]
    reasons = "|".join(catalog.TRAINING_FAILURES)
    assert vmon.promql_errors(f'ray_dreamblend_training_failures_total{{reason=~"{reasons}"}}', "rule") == []
    assert len(vmon.promql_errors(f'ray_dreamblend_training_failures_total{{reason=~"{reasons}|nope"}}', "r")) == 1
    # a reason of the rejections is no training failure reason, and the other way round
    assert vmon.label_values("ray_dreamblend_http_rejections_total", "reason") == tuple(catalog.REJECT_REASONS)
    assert vmon.promql_errors('ray_dreamblend_http_rejections_total{reason=~".*overload.*"}', "r") == []  # a real regex
    assert vmon.promql_errors('ray_dreamblend_http_requests_total{route="/v1/anything"}', "r") == []  # not fixed


def test_metric_names_walks_every_kind_of_expression():
    expr = ('-(sum by (a) (rate({__name__="ray_dreamblend_http_requests_total", a="b"}[5m])) '
            'or max_over_time(ray_dreamblend_queue_depth[1h:5m])) / on() group_left '
            'topk(3, ray_dreamblend_active_rows) + scalar(ray_dreamblend_webhook_backlog offset 5m) '
            'unless count_values("v", up)')
    assert vmon.metric_names(expr) == {"ray_dreamblend_http_requests_total", "ray_dreamblend_queue_depth",
                                       "ray_dreamblend_active_rows", "ray_dreamblend_webhook_backlog", "up"}
    with pytest.raises(ValueError, match="without a metric name"):
        vmon.metric_names('{__name__=~"ray_dreamblend_.*"}')
    assert vmon.grafana_to_promql('rate(x{family=~"$family", t="${tenant}"}[$__rate_interval])') == \
        'rate(x{family=~"grafana_var", t="grafana_var"}[5m])'


def test_dashboard_queries_every_catalog_metric_and_nothing_else(dashboard):
    assert vmon.dashboard_errors(dashboard) == []
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Ingress", "Model replica", "Training", "Storage", "Webhooks"]
    exprs = [t["expr"] for p in vmon.all_panels(dashboard) for t in p.get("targets", [])]
    assert vmon.GUIDED_SHARE in exprs
    used = set().union(*(vmon.metric_names(vmon.grafana_to_promql(e)) for e in exprs))
    assert used - catalog.exported_series() <= vmon.RAY_METRICS
    for spec in catalog.CATALOG:
        assert used & set(spec.series()), spec.exported
    # rows per UNet call: quantiles from the buckets and the mean from _sum / _count
    assert {"ray_dreamblend_rows_per_unet_call_bucket", "ray_dreamblend_rows_per_unet_call_sum",
            "ray_dreamblend_rows_per_unet_call_count"} <= used


def test_dashboard_query_naming_an_unknown_metric_is_reported(dashboard):
    broken = copy.deepcopy(dashboard)
    panel = next(p for p in broken["panels"] if p.get("title") == "Queue depth")
    panel["targets"][0]["expr"] = "sum(ray_dreamblend_queue_depht)"
    errors = vmon.dashboard_errors(broken)
    assert errors == [f"panel {panel['id']} ('Queue depth') target A: ray_dreamblend_queue_depht: no such metric "
                      "(not in dreamblend_ray/observability/catalog.py's exported series nor in the validator's "
                      "RAY_METRICS)"]
    broken["templating"]["list"][1]["query"]["query"] = "label_values(ray_dreamblend_nope_count, family)"
    assert any(line.startswith("templating.family.query: ray_dreamblend_nope_count: no such metric")
               for line in vmon.dashboard_errors(broken))


def test_a_catalog_metric_without_a_panel_is_reported(dashboard):
    new = catalog.MetricSpec("dreamblend_new_thing", "gauge", "replica", "things", (), "A new metric.")
    assert vmon.dashboard_errors(dashboard, metrics=[*catalog.CATALOG, new]) == [
        "ray_dreamblend_new_thing: no panel queries it (every catalog metric needs a panel)"]


def test_dashboard_structure_errors_are_reported(dashboard):
    broken = copy.deepcopy(dashboard)
    panels = broken["panels"]
    panels[2]["id"] = panels[1]["id"]
    del panels[3]["gridPos"]
    panels[4]["datasource"] = {"type": "prometheus", "uid": "prometheus-prod"}
    panels[5]["targets"][0].pop("expr")
    panels[6]["gridPos"] = dict(panels[5]["gridPos"])
    broken["templating"]["list"] = broken["templating"]["list"][1:]
    errors = "\n".join(vmon.dashboard_errors(broken))
    assert f"ids must be unique integers; repeated or missing: [{panels[1]['id']}]" in errors
    assert f"panel {panels[3]['id']} ({panels[3]['title']!r}): no gridPos" in errors
    assert f"panel {panels[4]['id']} ({panels[4]['title']!r}): datasource is not the ${{datasource}} variable" in errors
    assert f"panel {panels[5]['id']} ({panels[5]['title']!r}) target A: no expr" in errors
    assert f"panel {panels[6]['id']} ({panels[6]['title']!r}): overlaps panel {panels[5]['id']}" in errors
    assert "templating: no `datasource` variable" in errors
    assert vmon.dashboard_errors([]) == ["<root>: the dashboard is not a JSON object"]


def test_dashboard_json_is_its_render():
    assert (MONITORING / "grafana-dashboard.json").read_text() == render.render(), \
        "run python k8s/monitoring/render_dashboard.py"
    assert render.main(["--check"]) == 0


def test_dashboard_configmap_has_the_sidecar_label_and_the_json(objects, dashboard):
    cm = objects["ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["grafana-dashboard.json"]) == dashboard
    assert vmon.object_errors(cm) == []


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) not installed")
def test_kustomize_build_matches_the_offline_build(objects):
    out = subprocess.run(["kubectl", "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = {d["kind"]: d for d in yaml.safe_load_all(out.stdout) if d}
    assert built == objects


def test_operations_doc_lists_every_metric_and_alert(objects):
    doc = (REPO / "docs" / "operations.md").read_text()
    section = doc[doc.index("\n## Metrics\n"):]
    section = section[:section.index("\n## ", 1)]
    for spec in catalog.CATALOG:
        assert f"`{spec.exported}`" in section, f"docs/operations.md#metrics lacks {spec.exported}"
    for group in objects["PrometheusRule"]["spec"]["groups"]:
        for rule in group["rules"]:
            assert f"`{rule['alert']}`" in section, rule["alert"]
    assert vmon.GUIDED_SHARE in section
    assert {"metrics", "what-to-alert-on", "the-guided-share", "the-dashboard"} <= vmon.doc_anchors()
