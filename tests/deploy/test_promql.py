"""The alerts, the dashboard's queries and the KEDA query, run through the real Prometheus engine.

Regexes over PromQL (test_monitoring.py) catch a metric nobody exports, not a query Prometheus
refuses or an alert that never fires. Here the built manifests become plain Prometheus rule files
and promtool (pinned in deploy/tools.env, built by scripts/install-deploy-tools.sh) checks them and
runs the unit tests in tests/deploy/promql/ against them, offline.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from enclave_common import topics

from .conftest import OVERLAYS, REPO_ROOT, SERVICES

PROMQL_DIR = Path(__file__).resolve().parent / "promql"
ALERT_TESTS = PROMQL_DIR / "alerts.test.yaml"
#: The files the unit tests name in ``rule_files``, written from the built manifests next to a copy
#: of the unit-test file (promtool reads them relative to it).
ALERTS_RULES = "alerts.rules.yaml"
QUERIES_RULES = "queries.rules.yaml"

#: What Grafana puts in place of the dashboard's variables before it sends a query. $__rate_interval
#: is at least four scrape intervals (30 s here); any duration parses the same.
GRAFANA_BUILTINS = {"__rate_interval": "2m", "__interval": "30s", "__range": "1h"}
#: PrometheusRule fields Prometheus itself does not accept in a rule file (Thanos only).
OPERATOR_ONLY_GROUP_FIELDS = {"partial_response_strategy"}

#: Labels prometheus-operator attaches to every series of a ServiceMonitor / PodMonitor target.
SERVICE_MONITOR_TARGET_LABELS = {"namespace", "service", "pod", "container", "endpoint", "job", "instance"}
POD_MONITOR_TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "job", "instance"}
#: The label names of the Kafka exporter's families the rules read (kafka_exporter, which Strimzi runs).
KAFKA_EXPORTER_LABELS = {
    "kafka_consumergroup_lag": {"consumergroup", "topic", "partition"},
    "kafka_consumergroup_current_offset": {"consumergroup", "topic", "partition"},
    "kafka_consumergroup_members": {"consumergroup"},
    "kafka_topic_partition_current_offset": {"topic", "partition"},
}
#: Series of other exporters the rules read: kube-state-metrics (scraped with its labels kept,
#: honor_labels, so ``namespace`` is the object's namespace) and cert-manager (either way: with its
#: Helm chart's default, honorLabels false, the Certificate's namespace is ``exported_namespace``).
OTHER_EXPORTER_LABELS = {
    "kube_pod_status_ready": {"namespace", "pod", "uid", "condition"},
    "kube_deployment_status_replicas_available": {"namespace", "deployment"},
    "kube_deployment_spec_replicas": {"namespace", "deployment"},
    "certmanager_certificate_expiration_timestamp_seconds": {
        "name",
        "namespace",
        "issuer_name",
        "issuer_kind",
        "issuer_group",
    },
}
SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}$")
LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')
TEMPLATE_ACTION = re.compile(r"\{\{.*?\}\}")


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=120)


def prometheus_rule_groups(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rule group of every PrometheusRule, as a Prometheus rule file holds it: what
    prometheus-operator hands Prometheus, less the fields only Thanos reads."""
    groups = []
    for rule in (d for d in docs if d["kind"] == "PrometheusRule"):
        for group in rule["spec"]["groups"]:
            groups.append({k: v for k, v in group.items() if k not in OPERATOR_ONLY_GROUP_FIELDS})
    return groups


def dashboard_queries(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Each panel target's PromQL, by ``<dashboard>_panel<id>_<refId>``, with the dashboard's
    variables replaced as Grafana does (a custom variable by its current value)."""
    queries = {}
    for config in (
        d for d in docs if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"].get("labels", {})
    ):
        for filename, text in config.get("data", {}).items():
            dashboard = json.loads(text)
            values = dict(GRAFANA_BUILTINS)
            for variable in dashboard.get("templating", {}).get("list", []):
                if variable["type"] == "custom":
                    values[variable["name"]] = variable["current"]["value"]
            stem = re.sub(r"\W", "_", Path(filename).stem)
            for panel in dashboard["panels"]:
                for target in panel.get("targets", []):
                    expr = re.sub(
                        r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), target["expr"]
                    )
                    queries[f"{stem}_panel{panel['id']}_{target['refId']}"] = expr
    return queries


def keda_queries(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Each KEDA ``prometheus`` trigger's query, by ``<ScaledObject>:prometheus_<n>``."""
    queries = {}
    for scaled in (d for d in docs if d["kind"] == "ScaledObject"):
        prometheus = [t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
        for n, trigger in enumerate(prometheus):
            queries[f"{scaled['metadata']['name'].replace('-', '_')}:prometheus_{n}"] = trigger["metadata"][
                "query"
            ]
    return queries


def query_rule_groups(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The dashboard's and KEDA's queries as recording rules: Prometheus parses and type-checks
    them as it would a rule, and the unit tests can query what KEDA would read
    (``keda:<ScaledObject>:prometheus_<n>``)."""
    return [
        {
            "name": "grafana-dashboards",
            "rules": [{"record": f"grafana:{k}", "expr": v} for k, v in dashboard_queries(docs).items()],
        },
        {
            "name": "keda-triggers",
            "rules": [{"record": f"keda:{k}", "expr": v} for k, v in keda_queries(docs).items()],
        },
    ]


def template_actions_only(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rules with each annotation cut down to its template actions (``{{ $labels.pod }}``),
    joined by a space, and annotations without any dropped. The unit tests then prove that every
    label an annotation names is on the alert and every filter renders, yet a reworded summary
    needs no change to them."""
    trimmed = []
    for group in groups:
        rules = []
        for rule in group["rules"]:
            rule = dict(rule)
            if "annotations" in rule:
                annotations = {
                    key: " ".join(TEMPLATE_ACTION.findall(value))
                    for key, value in rule["annotations"].items()
                }
                rule["annotations"] = {k: v for k, v in annotations.items() if v}
            rules.append(rule)
        trimmed.append({**group, "rules": rules})
    return trimmed


def promtool_test(
    promtool: Path, test_file: Path, directory: Path, docs: list[dict[str, Any]], *extra: str
) -> subprocess.CompletedProcess[str]:
    """``promtool test rules`` on a copy of ``test_file`` beside the rule files it names, written
    from ``docs``: the unit tests always run against what the overlay deploys."""
    alerts = template_actions_only(prometheus_rule_groups(docs))
    (directory / ALERTS_RULES).write_text(yaml.safe_dump({"groups": alerts}, sort_keys=False))
    (directory / QUERIES_RULES).write_text(
        yaml.safe_dump({"groups": query_rule_groups(docs)}, sort_keys=False)
    )
    shutil.copy(test_file, directory / test_file.name)
    return _run([str(promtool), "test", "rules", *extra, test_file.name], cwd=directory)


def deployed_rule_groups(docs: list[dict[str, Any]], overlay: str) -> list[dict[str, Any]]:
    """The overlay's rule groups: every overlay deploys the base's PrometheusRule, so an overlay
    without it lost its alerts."""
    groups = prometheus_rule_groups(docs)
    assert groups, f"{overlay} deploys no PrometheusRule"
    return groups


def _unit_tests(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def _parse_series(series: str) -> tuple[str, dict[str, str]]:
    match = SERIES.match(series.strip())
    assert match, f"input series not in the form name{{labels}}: {series!r}"
    name, body = match.groups()
    labels = dict(LABEL.findall(body))
    assert LABEL.sub("", body).strip() == "", f"unparsed labels in {series!r}"
    return name, labels


def _declared_enclave_metrics() -> dict[str, set[str]]:
    """Each ``enclave_*`` series the services' code registers, with its label names as it serves
    them: counters get ``_total``, histograms ``_bucket`` (with ``le``), ``_count`` and ``_sum``.
    Read from the source's syntax tree, so a help text split over lines does not hide a metric."""
    suffixes = {"Counter": {"_total": set()}, "Gauge": {"": set()}}
    suffixes["Histogram"] = {"_bucket": {"le"}, "_count": set(), "_sum": set()}
    declared: dict[str, set[str]] = {}
    for path in [*REPO_ROOT.glob("libs/*/src/**/*.py"), *REPO_ROOT.glob("services/*/src/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in suffixes
            ):
                continue
            if not (
                node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).startswith("enclave_")
            ):
                continue
            names = (
                node.args[2]
                if len(node.args) > 2
                else next((k.value for k in node.keywords if k.arg == "labelnames"), None)
            )
            labels = (
                {e.value for e in names.elts if isinstance(e, ast.Constant)}
                if isinstance(names, ast.List | ast.Tuple)
                else set()
            )
            for suffix, extra in suffixes[node.func.id].items():
                declared[f"{node.args[0].value}{suffix}"] = labels | extra
    return declared


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_prometheus_rule_loads_in_prometheus(overlay, documents, tools, tmp_path):
    """What prometheus-operator hands Prometheus parses, its templates parse, and no two rules
    duplicate each other (``--lint=all``, fatal)."""
    groups = deployed_rule_groups(documents[overlay], overlay)
    path = tmp_path / ALERTS_RULES
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    result = _run([str(tools["promtool"]), "check", "rules", "--lint=all", "--lint-fatal", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(g["rules"]) for g in groups)
    assert f"SUCCESS: {count} rules found" in result.stdout, result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dashboard_and_keda_queries_parse(overlay, documents, tools, tmp_path):
    """Grafana and KEDA send these to Prometheus as they are: a query it refuses is an empty panel
    or a ScaledObject that never scales. As recording rules, promtool parses each."""
    docs = documents[overlay]
    dashboards, keda = dashboard_queries(docs), keda_queries(docs)
    assert len(dashboards) >= 12 and list(keda) == ["enclave_analysis:prometheus_0"], (dashboards, keda)
    leftover = {k: v for k, v in dashboards.items() if "$" in v}
    assert leftover == {}, f"dashboard variables nothing replaces: {leftover}"
    path = tmp_path / QUERIES_RULES
    path.write_text(yaml.safe_dump({"groups": query_rule_groups(docs)}, sort_keys=False))
    result = _run([str(tools["promtool"]), "check", "rules", "--lint=all", "--lint-fatal", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(dashboards) + len(keda)} rules found" in result.stdout, result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_alerts_and_the_keda_query_behave_as_the_unit_tests_say(overlay, documents, tools, tmp_path):
    """Series as the services, the Kafka exporter, kube-state-metrics and cert-manager serve them,
    evaluated by Prometheus's own rule engine: each alert fires when it should, not before its
    ``for:``, and not on the look-alikes; KEDA reads ready + in progress (tests/deploy/promql/)."""
    deployed_rule_groups(documents[overlay], overlay)
    result = promtool_test(tools["promtool"], ALERT_TESTS, tmp_path, documents[overlay])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not(documents):
    """A new alert without a firing case here would go untested, and one without a quiet case
    (before its ``for:``, or on a look-alike) could fire on everything; an alert the tests name that
    the manifests lost would pass silently (promtool expects no alert from an unknown rule)."""
    alerts = {
        r["alert"] for g in prometheus_rule_groups(documents["prod"]) for r in g["rules"] if "alert" in r
    }
    assert len(alerts) >= 24, sorted(alerts)
    cases = [c for group in _unit_tests(ALERT_TESTS)["tests"] for c in group.get("alert_rule_test", [])]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    assert alerts - fired == set(), "alerts without a firing unit test"
    assert {c["alertname"] for c in cases} - alerts == set(), "unit tests of alerts the manifests lack"
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts - quiet == set(), "alerts without a case where they must stay quiet"
    exprs = [
        c["expr"] for group in _unit_tests(ALERT_TESTS)["tests"] for c in group.get("promql_expr_test", [])
    ]
    assert "keda:enclave_analysis:prometheus_0" in exprs


def test_the_unit_tests_feed_the_series_the_exporters_serve(gen):
    """A unit test on a series name or label nobody serves proves nothing about production. The
    ``enclave_*`` series carry exactly the labels their code declares plus the ServiceMonitor's
    target labels; the Kafka exporter's, its own plus the PodMonitor's; groups and topics exist."""
    declared = _declared_enclave_metrics()
    groups = {s.group for s in gen.SERVICES}
    known_topics = set(topics.ALL_TOPICS) | {topics.dlq(t) for t in topics.ALL_TOPICS}
    services = {f"enclave-{name}" for name in SERVICES}
    for group in _unit_tests(ALERT_TESTS)["tests"]:
        for item in group["input_series"]:
            name, labels = _parse_series(item["series"])
            if name.startswith("enclave_"):
                assert name in declared, f"{name}: no code registers it"
                assert set(labels) == declared[name] | SERVICE_MONITOR_TARGET_LABELS, (name, sorted(labels))
                assert labels["service"] in services and labels["job"] == labels["service"], labels
                assert labels["pod"].startswith(labels["service"] + "-"), labels
            elif name.startswith("kafka_"):
                assert name in KAFKA_EXPORTER_LABELS, f"{name}: not a family the Kafka exporter serves"
                assert set(labels) == KAFKA_EXPORTER_LABELS[name] | POD_MONITOR_TARGET_LABELS, (
                    name,
                    sorted(labels),
                )
                assert "consumergroup" not in labels or labels["consumergroup"] in groups, labels
                assert "topic" not in labels or labels["topic"] in known_topics, labels
            else:
                assert name in OTHER_EXPORTER_LABELS, f"{name}: which exporter serves it?"
                assert OTHER_EXPORTER_LABELS[name] <= set(labels), (name, sorted(labels))
