"""Write k8s/monitoring/grafana-dashboard.json, the DreamBlend Grafana dashboard, from the panels below.

    python k8s/monitoring/render_dashboard.py           # rewrite the JSON
    python k8s/monitoring/render_dashboard.py --check   # exit 1 when the JSON differs from the render

The JSON is what Grafana (and its dashboard sidecar, through the ConfigMap of kustomization.yaml)
loads; this script is how it is edited: a panel is a few lines here, ids and the grid are laid out
for you. tests/test_monitoring.py checks the committed JSON equals the render, and
k8s/validate_monitoring.py checks the JSON itself (every query parses and names exported metrics
only, every catalog metric has a panel).

Every panel and query uses the `${datasource}` variable (a Prometheus data source picked on the
dashboard) and `$family` (the model families the replicas serve) where the metric has that label.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "grafana-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
FAM = 'family=~"$family"'
WIDTH = 24  # Grafana's grid

# The guided share (docs/operations.md#the-guided-share): DreamBlend's cost over plain sampling.
GUIDED_SHARE = ('sum(rate(ray_dreamblend_denoise_seconds_total{part="guidance"}[5m])) / '
                'sum(rate(ray_dreamblend_denoise_seconds_total[5m]))')


def q(expr: str, legend: str = "__auto") -> dict:
    return {"expr": expr, "legendFormat": legend}


def quantiles(metric: str, by: str = "", selector: str = "", qs=(0.5, 0.95, 0.99)) -> list[dict]:
    """histogram_quantile targets of a histogram, one per quantile, grouped `by` its labels."""
    group = f"le, {by}" if by else "le"
    sel = f"{{{selector}}}" if selector else ""
    suffix = f" {{{{{by.split(', ')[0]}}}}}" if by else ""
    return [q(f"histogram_quantile({x}, sum by ({group}) (rate({metric}_bucket{sel}[{RATE}])))",
              f"p{round(x * 100)}{suffix}") for x in qs]


def mean(metric: str, by: str = "", selector: str = "") -> dict:
    """A histogram's mean over the interval: rate(_sum) / rate(_count)."""
    sel = f"{{{selector}}}" if selector else ""
    agg = f"sum by ({by})" if by else "sum"
    legend = f"mean {{{{{by.split(', ')[0]}}}}}" if by else "mean"
    return q(f"{agg} (rate({metric}_sum{sel}[{RATE}])) / {agg} (rate({metric}_count{sel}[{RATE}]))", legend)


def ts(title: str, description: str, unit: str, targets: list[dict], width: int = 12, stack: bool = False) -> dict:
    panel = {
        "type": "timeseries",
        "title": title,
        "description": description,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                           "showPoints": "never", "stacking": {"mode": "normal" if stack else "none", "group": "A"}},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": targets,
        "_w": width, "_h": 8,
    }
    return panel


def stat(title: str, description: str, unit: str, targets: list[dict], width: int = 6,
         thresholds: list[tuple[float | None, str]] | None = None) -> dict:
    steps = [{"color": color, "value": value} for value, color in (thresholds or [(None, "green")])]
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "justifyMode": "auto", "textMode": "auto",
                    "orientation": "auto"},
        "targets": targets,
        "_w": width, "_h": 4,
    }


def rows() -> list[tuple[str, list[dict]]]:
    ingress = [
        stat("Requests", "HTTP requests answered per second (ray_dreamblend_http_requests_total).", "reqps",
             [q("sum(rate(ray_dreamblend_http_requests_total[$__rate_interval]))", "requests/s")]),
        stat("5xx share", "Share of requests answered with a 5xx status.", "percentunit",
             [q('sum(rate(ray_dreamblend_http_requests_total{status=~"5.."}[$__rate_interval])) / '
                "sum(rate(ray_dreamblend_http_requests_total[$__rate_interval]))", "5xx")],
             thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")]),
        stat("p95 latency of /v1/generate", "95th percentile of the ingress latency of POST /v1/generate "
             "(alert: over 60 s for 10 minutes).", "s",
             [q('histogram_quantile(0.95, sum by (le) (rate(ray_dreamblend_http_request_seconds_bucket'
                '{route="/v1/generate"}[$__rate_interval])))', "p95")],
             thresholds=[(None, "green"), (30, "orange"), (60, "red")]),
        stat("Refused for capacity", "Requests refused per second (429, 503, 413): "
             "ray_dreamblend_http_rejections_total.", "reqps",
             [q("sum(rate(ray_dreamblend_http_rejections_total[$__rate_interval]))", "refused/s")]),
        ts("Requests by route and status", "ray_dreamblend_http_requests_total: route template, method, status.",
           "reqps", [q("sum by (route, method, status) (rate(ray_dreamblend_http_requests_total[$__rate_interval]))",
                       "{{method}} {{route}} {{status}}")]),
        ts("Requests by tenant", "ray_dreamblend_http_requests_total by tenant (`default` without tenants, "
           "`anonymous` before authentication).", "reqps",
           [q("sum by (tenant) (rate(ray_dreamblend_http_requests_total[$__rate_interval]))", "{{tenant}}")]),
        ts("Latency by route", "ray_dreamblend_http_request_seconds: quantiles and mean, from the request reaching "
           "the ingress to its response.", "s",
           quantiles("ray_dreamblend_http_request_seconds", "route", qs=(0.5, 0.95))
           + [mean("ray_dreamblend_http_request_seconds", "route")]),
        ts("Refused by reason", "ray_dreamblend_http_rejections_total: quota, 401 throttle, overloaded, replica or "
           "storage unavailable, body too large.", "reqps",
           [q("sum by (status, reason) (rate(ray_dreamblend_http_rejections_total[$__rate_interval]))",
              "{{status}} {{reason}}")], stack=True),
        ts("Request body bytes", "ray_dreamblend_http_request_bytes_total by route.", "Bps",
           [q("sum by (route) (rate(ray_dreamblend_http_request_bytes_total[$__rate_interval]))", "{{route}}")]),
        ts("Response body bytes", "ray_dreamblend_http_response_bytes_total by route.", "Bps",
           [q("sum by (route) (rate(ray_dreamblend_http_response_bytes_total[$__rate_interval]))", "{{route}}")]),
    ]
    replica = [
        stat("Guided share", "DreamBlend's guidance time over all denoising time (5 minutes): "
             "rate(guidance) / rate(all) of ray_dreamblend_denoise_seconds_total.", "percentunit",
             [q(GUIDED_SHARE, "guided share")]),
        stat("Images", "Images returned per second (ray_dreamblend_images_generated_total).", "short",
             [q(f"sum(rate(ray_dreamblend_images_generated_total{{{FAM}}}[$__rate_interval]))", "images/s")]),
        stat("Adapter cache hit ratio", "Pair lookups served from a replica's LRU "
             "(ray_dreamblend_adapter_cache_total).", "percentunit",
             [q(f'sum(rate(ray_dreamblend_adapter_cache_total{{result="hit", {FAM}}}[$__rate_interval])) / '
                f"sum(rate(ray_dreamblend_adapter_cache_total{{{FAM}}}[$__rate_interval]))", "hit ratio")]),
        stat("Healthy Serve replicas", "Replicas passing Ray Serve's health check, of all replicas "
             "(ray_serve_deployment_replica_healthy).", "short",
             [q("sum(ray_serve_deployment_replica_healthy)", "healthy"),
              q("count(ray_serve_deployment_replica_healthy)", "replicas")]),
        ts("Queue depth", "ray_dreamblend_queue_depth: jobs on a replica waiting to start sampling "
           "(alert: over 32 on a replica for 10 minutes).", "short",
           [q(f"sum by (family, batching) (ray_dreamblend_queue_depth{{{FAM}}})", "{{family}} {{batching}}"),
            q(f"max by (family) (ray_dreamblend_queue_depth{{{FAM}}})", "max per replica {{family}}")]),
        ts("Active rows", "ray_dreamblend_active_rows: images being denoised right now.", "short",
           [q(f"sum by (family, batching) (ray_dreamblend_active_rows{{{FAM}}})", "{{family}} {{batching}}")]),
        ts("Rows per UNet call", "ray_dreamblend_rows_per_unet_call: images sharing one denoising step "
           "(batching efficiency).", "short",
           quantiles("ray_dreamblend_rows_per_unet_call", "family", FAM)
           + [mean("ray_dreamblend_rows_per_unet_call", "family", FAM)]),
        ts("Step time", "ray_dreamblend_step_seconds: one denoising step of the whole batch.", "s",
           quantiles("ray_dreamblend_step_seconds", "family", FAM)
           + [mean("ray_dreamblend_step_seconds", "family", FAM)]),
        ts("Denoising time by part", "ray_dreamblend_denoise_seconds_total: seconds of denoising per second, "
           "plain sampling and DreamBlend's guidance.", "s",
           [q(f"sum by (family, part) (rate(ray_dreamblend_denoise_seconds_total{{{FAM}}}[$__rate_interval]))",
              "{{family}} {{part}}")], stack=True),
        ts("Guided share", "The guidance part's share of denoising time: from the counters (5-minute rate) and "
           "each replica's own gauge over its last steps (ray_dreamblend_guided_share).", "percentunit",
           [q(GUIDED_SHARE, "all replicas"),
            q(f"avg by (family, batching) (ray_dreamblend_guided_share{{{FAM}}})", "gauge {{family}} {{batching}}")]),
        ts("Time to first step", "ray_dreamblend_time_to_first_step_seconds: from a job reaching the replica to "
           "its first denoising step.", "s",
           quantiles("ray_dreamblend_time_to_first_step_seconds", "family", FAM, qs=(0.5, 0.95))
           + [mean("ray_dreamblend_time_to_first_step_seconds", "family", FAM)]),
        ts("Images generated", "ray_dreamblend_images_generated_total by family and tenant.", "short",
           [q(f"sum by (family, tenant) (rate(ray_dreamblend_images_generated_total{{{FAM}}}[$__rate_interval]))",
              "{{family}} {{tenant}}")]),
        ts("Adapters loaded", "ray_dreamblend_adapters_loaded: subjects' checkpoint pairs loaded per family.",
           "short", [q(f"sum by (family) (ray_dreamblend_adapters_loaded{{{FAM}}})", "{{family}}")]),
        ts("Adapter loads, evictions and lookups", "ray_dreamblend_adapter_loads_total, "
           "ray_dreamblend_adapter_evictions_total, ray_dreamblend_adapter_cache_total (per second).", "short",
           [q(f"sum by (family) (rate(ray_dreamblend_adapter_loads_total{{{FAM}}}[$__rate_interval]))",
              "loads {{family}}"),
            q(f"sum by (family) (rate(ray_dreamblend_adapter_evictions_total{{{FAM}}}[$__rate_interval]))",
              "evictions {{family}}"),
            q(f"sum by (family, result) (rate(ray_dreamblend_adapter_cache_total{{{FAM}}}[$__rate_interval]))",
              "lookups {{result}} {{family}}")]),
        ts("Serve replicas", "Ray Serve's replicas by deployment: healthy of all "
           "(ray_serve_deployment_replica_healthy; alerts: one unhealthy 5 minutes, none healthy 2 minutes).",
           "short", [q("sum by (application, deployment) (ray_serve_deployment_replica_healthy)",
                       "healthy {{deployment}}"),
                     q("count by (application, deployment) (ray_serve_deployment_replica_healthy)",
                       "all {{deployment}}")], width=24),
    ]
    training = [
        stat("Trainings running", "ray_dreamblend_trainings_active{state=\"training\"}.", "short",
             [q('sum(ray_dreamblend_trainings_active{state="training"})', "training")]),
        stat("Trainings queued", "ray_dreamblend_trainings_active{state=\"queued\"}.", "short",
             [q('sum(ray_dreamblend_trainings_active{state="queued"})', "queued")]),
        stat("Failure rate (1 h)", "Failed trainings over finished ones (ready or failed) in the last hour "
             "(alert: over 25 % with at least 4 finished).", "percentunit",
             [q('sum(increase(ray_dreamblend_training_failures_total[1h])) / '
                'sum(increase(ray_dreamblend_trainings_total{state=~"ready|failed"}[1h]))', "failed")],
             thresholds=[(None, "green"), (0.1, "orange"), (0.25, "red")]),
        stat("Ready (1 h)", "Trainings that reached ready in the last hour.", "short",
             [q('sum(increase(ray_dreamblend_trainings_total{state="ready"}[1h]))', "ready")]),
        ts("Trainings by state", "ray_dreamblend_trainings_total: trainings entering each state, per hour, by "
           "kind (job: Ray Data fine-tune jobs; service: the subject service).", "short",
           [q("sum by (kind, state) (increase(ray_dreamblend_trainings_total[1h]))", "{{kind}} {{state}}")]),
        ts("Active trainings", "ray_dreamblend_trainings_active: queued or training right now.", "short",
           [q("sum by (kind, state) (ray_dreamblend_trainings_active)", "{{kind}} {{state}}")], stack=True),
        ts("Optimizer steps", "ray_dreamblend_training_steps_total: steps per second.", "short",
           [q("sum by (kind, family) (rate(ray_dreamblend_training_steps_total[$__rate_interval]))",
              "{{kind}} {{family}}")]),
        ts("Time to ready", "ray_dreamblend_training_seconds: from a training's start to its checkpoint pair "
           "being published.", "s",
           quantiles("ray_dreamblend_training_seconds", "kind", qs=(0.5, 0.95))
           + [mean("ray_dreamblend_training_seconds", "kind")]),
        ts("Failures by reason", "ray_dreamblend_training_failures_total, per hour.", "short",
           [q("sum by (kind, reason) (increase(ray_dreamblend_training_failures_total[1h]))",
              "{{kind}} {{reason}}")], width=24, stack=True),
    ]
    storage = [
        ts("Checkpoint pair load", "ray_dreamblend_pair_load_seconds: reading and attaching a subject's pair on "
           "a replica.", "s",
           quantiles("ray_dreamblend_pair_load_seconds", "family", FAM, qs=(0.5, 0.95))
           + [mean("ray_dreamblend_pair_load_seconds", "family", FAM)]),
        ts("Checkpoint upload", "ray_dreamblend_checkpoint_upload_seconds: writing one checkpoint (weights and "
           "manifest) to storage.", "s",
           quantiles("ray_dreamblend_checkpoint_upload_seconds", "kind", qs=(0.5, 0.95))
           + [mean("ray_dreamblend_checkpoint_upload_seconds", "kind")]),
        ts("Refused: storage unavailable", "503s answered because storage did not respond "
           "(ray_dreamblend_http_rejections_total{reason=\"storage_unavailable\"}).", "reqps",
           [q('sum(rate(ray_dreamblend_http_rejections_total{reason="storage_unavailable"}[$__rate_interval]))',
              "storage_unavailable")], width=24),
    ]
    webhooks = [
        ts("Deliveries by outcome", "ray_dreamblend_webhook_deliveries_total: delivered, retried, dead (gave up "
           "after the last try).", "short",
           [q("sum by (outcome) (rate(ray_dreamblend_webhook_deliveries_total[$__rate_interval]))", "{{outcome}}")],
           stack=True),
        ts("Backlog", "ray_dreamblend_webhook_backlog: events waiting for delivery or a retry "
           "(alert: over 100 for 15 minutes).", "short",
           [q("max(ray_dreamblend_webhook_backlog)", "backlog")]),
    ]
    return [("Ingress", ingress), ("Model replica", replica), ("Training", training),
            ("Storage", storage), ("Webhooks", webhooks)]


def layout(groups: list[tuple[str, list[dict]]]) -> list[dict]:
    """Row panels and their panels, left to right, top to bottom, with unique ids and gridPos."""
    panels, next_id, y = [], 1, 0
    for title, members in groups:
        panels.append({"type": "row", "title": title, "id": next_id, "collapsed": False,
                       "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y}, "panels": []})
        next_id, y = next_id + 1, y + 1
        x, line_h = 0, 0
        for panel in members:
            w, h = panel.pop("_w"), panel.pop("_h")
            if x + w > WIDTH:
                x, y, line_h = 0, y + line_h, 0
            targets = [{"datasource": DATASOURCE, "refId": chr(ord("A") + i), **t}
                       for i, t in enumerate(panel.pop("targets"))]
            panels.append({"id": next_id, "datasource": DATASOURCE, "gridPos": {"h": h, "w": w, "x": x, "y": y},
                           **panel, "targets": targets})
            next_id, x, line_h = next_id + 1, x + w, max(line_h, h)
        y += line_h
    return panels


def dashboard() -> dict:
    return {
        "title": "DreamBlend",
        "uid": "dreamblend-ray",
        "description": "DreamBlend on Ray Serve: ingress, model replicas, trainings, storage, webhooks "
                       "(docs/operations.md#metrics).",
        "tags": ["dreamblend", "ray"],
        "editable": True,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": "", "includeAll": False, "multi": False,
             "options": []},
            {"name": "family", "label": "Model family", "type": "query", "datasource": DATASOURCE,
             "definition": "label_values(ray_dreamblend_step_seconds_count, family)",
             "query": {"query": "label_values(ray_dreamblend_step_seconds_count, family)",
                       "qryType": 1, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
             "current": {}, "hide": 0, "refresh": 2, "regex": "", "sort": 1, "includeAll": True,
             "allValue": ".*", "multi": True, "options": []},
        ]},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "weekStart": "",
        "panels": layout(rows()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    text = render()
    if "--check" in args:
        if OUT.read_text() != text:
            print(f"{OUT} differs from its render: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
